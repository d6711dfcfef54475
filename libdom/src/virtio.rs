//! virtio-drivers (0.13) in ring 3: its `Hal` over the DMA hypercalls, a
//! PCI `ConfigurationAccess` over the mediated config space, and a
//! transport wrapper that accepts VIRTIO_F_ACCESS_PLATFORM.
//!
//! - [`DomHal`]: `dma_alloc` takes zeroed, page-aligned memory from the heap
//!   ([`DmaBuf`]); its I/O address is the virtual one in static mode or
//!   what `dma_map` returned in strict mode (rings: mapped while they
//!   live). `share` hands the buffer's own address over in both modes (I/O
//!   address = virtual address; no bounce copies). In static mode all of
//!   the domain's memory is reachable anyway; in strict mode `share` maps
//!   the pages the buffer touches and `unshare` unmaps them, through
//!   `dma_batch` (one call and one IOTLB invalidation for all the pages
//!   that need it). Pages are counted ([`SharedPages`]): two buffers on one
//!   page (a request header and its status byte) share its mapping, which
//!   goes only when the last of them is unshared, so an `unshare` never
//!   takes a page away from another buffer in the device. A page is
//!   writable by the device while any buffer on it is device-writable (and
//!   until it is unmapped). The granularity is the page: the rest of a page
//!   a buffer touches is reachable while the buffer is. An [`UnmapBatch`]
//!   holds `unshare`'s unmaps back so that the completions of several
//!   requests cost one call; any call made meanwhile takes them along. A
//!   loop that starts several requests [`claim`]s their buffers first and
//!   [`commit`]s them with one call; each `share` then finds its buffer
//!   claimed and mapped and makes no call.
//! - [`DomainConfig`]: config-space reads go through `dev_config_read`;
//!   the BARs are shadowed (their value is the domain's mapping, sizing
//!   writes answer with the mapping's length), because the hypervisor
//!   keeps the real BARs and the command register's decode bits to itself.
//!   Other writes go through `dev_config_write`; a refused one is dropped.
//! - [`AccessPlatform`]: virtio-drivers never accepts feature bit 33; QEMU
//!   then silently refuses FEATURES_OK (PLATFORM.md). The wrapper adds the
//!   bit to the driver features whenever the device offers it.
//! - MSI-X vectors ([`pci_transport_msix`]): virtio-drivers never writes
//!   `queue_msix_vector` or `msix_config`, and the hypervisor has MSI-X
//!   enabled on every assigned function, so a device left at reset's
//!   NO_VECTOR raises nothing at all. The wrapper writes them through the
//!   mapped common configuration where the virtio spec (1.2, 4.1.5.1.3
//!   and 4.1.5.1.2) puts them: a queue's vector after `queue_select` and
//!   before its addresses and `queue_enable`, the configuration vector
//!   before DRIVER_OK. The hypervisor routes every MSI-X entry of the
//!   function to the port `dev_irq_bind` returns.

use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

use abi::domain::{DeviceInfo, DmaMode, DEVICE_VA, USER_LIMIT};
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::{PciTransport, VirtioPciError};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use abi::hypercall::{dma_flags, DmaOp, DMA_BATCH_MAX};

use crate::device::{bar, dma_mode, DmaBuf, Mmio, PAGE};
use crate::hypercall;

/// VIRTIO_F_ACCESS_PLATFORM: the device's DMA goes through an IOMMU.
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;

const _: () = assert!(PAGE_SIZE == PAGE);

/// A lock for state the `Hal`'s associated functions share. A domain has
/// one thread; the lock only makes that an invariant rather than a hope.
struct Global<T> {
    busy: AtomicBool,
    cell: UnsafeCell<T>,
}

// SAFETY: every access goes through `with`, which admits one caller at a
// time (the flag is taken with acquire and released with release).
unsafe impl<T: Send> Sync for Global<T> {}

impl<T> Global<T> {
    const fn new(v: T) -> Self {
        Global {
            busy: AtomicBool::new(false),
            cell: UnsafeCell::new(v),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        while self
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the flag admits one caller at a time, so this is the
        // only reference to the value until it is released below.
        let r = f(unsafe { &mut *self.cell.get() });
        self.busy.store(false, Ordering::Release);
        r
    }
}

/// DMA buffers `dma_alloc` handed out (the rings), by I/O address: what
/// `dma_dealloc` finds them by. They are mapped for as long as they live,
/// outside the counts of [`SharedPages`].
static BUFFERS: Global<Vec<DmaBuf>> = Global::new(Vec::new());

fn take_buffer(iova: u64) -> Option<DmaBuf> {
    BUFFERS.with(|v| {
        let i = v.iter().position(|b| b.iova() == iova)?;
        Some(v.swap_remove(i))
    })
}

/// No run.
const NONE: u32 = u32::MAX;

/// Pages one [`Leaf`] of the [`RunIndex`] covers (2 MiB). No run crosses
/// from one leaf into another: a buffer that does is counted as one run
/// per leaf it touches.
const LEAF_PAGES: u64 = 512;

/// Leaves for keys below this (a domain's whole address space) are found
/// through [`RunIndex::top`], others by a search.
const TOP_KEYS: u64 = USER_LIMIT.div_ceil(LEAF_PAGES * PAGE as u64);

/// The first page of the leaf after the one `page` is in.
fn leaf_end(page: u64) -> u64 {
    (page / LEAF_PAGES + 1) * LEAF_PAGES
}

/// 2 MiB of the [`RunIndex`]: where runs start, and which.
#[derive(Debug)]
struct Leaf {
    /// Page number / [`LEAF_PAGES`].
    key: u64,
    /// Runs that start here.
    used: u32,
    /// A bit per page: a run starts there.
    starts: [u64; LEAF_PAGES as usize / 64],
    /// The number of the run that starts at each page whose bit is set.
    runs: [u32; LEAF_PAGES as usize],
}

/// Where the runs start, by page: a bit per page and the run's number,
/// in 2 MiB leaves made when first needed and found by their key in a
/// table. A page's run is the last one that starts at or before it in its
/// leaf (a search of the leaf's bits, backwards from the page, usually in
/// one word), if it reaches the page. Making or dropping a run costs one
/// bit, whatever its length. A leaf that empties is kept, and reused for
/// the next 2 MiB that needs one (so the leaves are as many as the most
/// 2 MiB pieces shared buffers have touched at once).
#[derive(Debug, Default)]
struct RunIndex {
    leaves: Vec<Leaf>,
    /// By key below [`TOP_KEYS`]: 1 + the index of its leaf, 0 for none
    /// (made with the first leaf).
    top: Vec<u16>,
}

impl RunIndex {
    const fn new() -> Self {
        RunIndex {
            leaves: Vec::new(),
            top: Vec::new(),
        }
    }

    /// The leaf of page `page`, if there is one.
    #[inline]
    fn leaf(&self, page: u64) -> Option<&Leaf> {
        let key = page / LEAF_PAGES;
        if key < TOP_KEYS {
            match self.top.get(key as usize) {
                Some(&i) if i != 0 => self.leaves.get(usize::from(i) - 1),
                _ => None,
            }
        } else {
            self.leaves.iter().find(|l| l.key == key)
        }
    }

    /// The leaf of page `page`, made (or an empty one reused) if need be.
    #[inline]
    fn leaf_mut(&mut self, page: u64) -> &mut Leaf {
        let key = page / LEAF_PAGES;
        let found = if key < TOP_KEYS {
            match self.top.get(key as usize) {
                Some(&i) if i != 0 => Some(usize::from(i) - 1),
                _ => None,
            }
        } else {
            self.leaves.iter().position(|l| l.key == key)
        };
        let i = match found {
            Some(i) => i,
            None => self.make(key),
        };
        &mut self.leaves[i]
    }

    /// A leaf for `key`, which has none.
    #[cold]
    #[inline(never)]
    fn make(&mut self, key: u64) -> usize {
        let i = match self.leaves.iter().position(|l| l.used == 0) {
            Some(i) => {
                let old = self.leaves[i].key;
                if old < TOP_KEYS {
                    self.top[old as usize] = 0;
                }
                self.leaves[i].key = key;
                i
            }
            None => {
                self.leaves.push(Leaf {
                    key,
                    used: 0,
                    starts: [0; LEAF_PAGES as usize / 64],
                    runs: [NONE; LEAF_PAGES as usize],
                });
                self.leaves.len() - 1
            }
        };
        if key < TOP_KEYS {
            if self.top.is_empty() {
                self.top.resize(TOP_KEYS as usize, 0);
            }
            self.top[key as usize] = u16::try_from(i + 1).unwrap_or_else(|_| panic!("{i} leaves"));
        }
        i
    }

    /// The run that starts at `page`, or [`NONE`].
    #[inline]
    fn starting(&self, page: u64) -> u32 {
        match self.leaf(page) {
            Some(leaf) => {
                let off = (page % LEAF_PAGES) as usize;
                if leaf.starts[off / 64] >> (off % 64) & 1 != 0 {
                    leaf.runs[off]
                } else {
                    NONE
                }
            }
            None => NONE,
        }
    }

    /// The last run that starts at or before `page` in its leaf: its first
    /// page and number.
    #[inline]
    fn before(&self, page: u64) -> Option<(u64, u32)> {
        let leaf = self.leaf(page)?;
        let off = (page % LEAF_PAGES) as usize;
        let mut w = off / 64;
        let mut bits = leaf.starts[w] & (u64::MAX >> (63 - off % 64));
        loop {
            if bits != 0 {
                let b = w * 64 + 63 - bits.leading_zeros() as usize;
                return Some((page - (off - b) as u64, leaf.runs[b]));
            }
            if w == 0 {
                return None;
            }
            w -= 1;
            bits = leaf.starts[w];
        }
    }

    /// The first page in `[page, end)` where a run starts (`end` at most
    /// the end of `page`'s leaf).
    fn next_start(&self, page: u64, end: u64) -> Option<u64> {
        let leaf = self.leaf(page)?;
        let off = (page % LEAF_PAGES) as usize;
        let base = page - off as u64;
        let stop = (end - base) as usize;
        let mut w = off / 64;
        let mut bits = leaf.starts[w] & (u64::MAX << (off % 64));
        loop {
            if bits != 0 {
                let b = w * 64 + bits.trailing_zeros() as usize;
                return (b < stop).then_some(base + b as u64);
            }
            w += 1;
            if w * 64 >= stop {
                return None;
            }
            bits = leaf.starts[w];
        }
    }

    /// Run `run` starts at `page` (where none does).
    #[inline]
    fn insert(&mut self, page: u64, run: u32) {
        let leaf = self.leaf_mut(page);
        let off = (page % LEAF_PAGES) as usize;
        debug_assert!(leaf.starts[off / 64] & (1 << (off % 64)) == 0);
        leaf.starts[off / 64] |= 1 << (off % 64);
        leaf.runs[off] = run;
        leaf.used += 1;
    }

    /// No run starts at `page` any more (one did).
    #[inline]
    fn remove(&mut self, page: u64) {
        let leaf = self.leaf_mut(page);
        let off = (page % LEAF_PAGES) as usize;
        debug_assert!(leaf.starts[off / 64] & (1 << (off % 64)) != 0);
        leaf.starts[off / 64] &= !(1 << (off % 64));
        leaf.runs[off] = NONE;
        leaf.used -= 1;
    }
}

/// A run of pages shared buffers touch (strict mode), all used by the
/// same buffers: the unit the counts, the maps and the unmaps are kept in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    /// First page number (= I/O page number) and the one after the last;
    /// equal for a free number.
    start: u64,
    end: u64,
    /// Buffers on these pages now; 0: idle (mapped or not, waiting to go).
    users: u32,
    /// The device must be able to write the pages (some buffer on them is
    /// device-writable, now or since they were last unmapped).
    write: bool,
    /// What the IOMMU holds for them: `None` not mapped, `Some(w)` mapped,
    /// writable if `w`.
    sent: Option<bool>,
    /// In [`SharedPages::pending`].
    queued: bool,
}

impl Run {
    const FREE: Run = Run {
        start: 0,
        end: 0,
        users: 0,
        write: false,
        sent: None,
        queued: false,
    };

    /// Whether the IOMMU lacks what the run's users need.
    fn behind(&self) -> bool {
        self.users > 0 && self.sent != Some(self.write)
    }
}

/// A buffer claimed ahead of its `share` ([`claim`]): counted and mapped
/// already, so the `share` that matches it only takes it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Claim {
    va: u64,
    len: usize,
    write: bool,
}

/// The bit of [`SharedPages::claimed`] for a claim at `va`.
fn claim_bit(va: u64) -> (usize, u64) {
    let h = va.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56;
    ((h / 64) as usize, 1 << (h % 64))
}

/// The pages `share` has mapped in strict mode, with how many shared
/// buffers use each: a page is mapped from the first buffer's `share` until
/// the last one's `unshare` (and, inside an [`UnmapBatch`], until it ends
/// or the next call takes its unmap along). Pure bookkeeping: it says which
/// `dma_batch` operations to make ([`SharedPages::take_ops`]).
///
/// Kept as runs of pages ([`Run`]s), so a buffer of many pages that shares
/// none of them is one run, split only where buffers overlap (a request
/// header and its status byte on one page). A [`RunIndex`] says where
/// each run starts, so the common cases cost no search of the runs and
/// nothing per page: a buffer on pages no run touches becomes a new run;
/// a buffer that covers exactly one run (a data buffer's `unshare`, a
/// header on a slot page of its own run) only counts. Runs that may need an
/// operation (behind, or idle) are listed in `pending`, so a call's
/// operations come from them alone, not from a walk of every run.
///
/// Invariant (what makes the mode strict): whenever the `Hal` hands an
/// address to virtio-drivers, every run with users is `sent` with its
/// permission (`share` makes the call before it returns); a run's unmap
/// is in the first call after its last user left, and [`UnmapBatch`]
/// bounds when that call is made. Every run that is behind or idle is in
/// `pending`.
#[derive(Debug, Default)]
pub struct SharedPages {
    /// By number; a free number's run is [`Run::FREE`], its number in
    /// `free`.
    runs: Vec<Run>,
    free: Vec<u32>,
    index: RunIndex,
    /// Runs that may be behind or idle, each once ([`Run::queued`]).
    pending: Vec<u32>,
    /// Runs with no users.
    idle: usize,
    /// Some run may be [`Run::behind`].
    unsent: bool,
    /// Open [`UnmapBatch`]es.
    holding: u32,
    /// Buffers counted by [`claim`], in order; `None` once a `share` took
    /// one over.
    claims: Vec<Option<Claim>>,
    /// Claims before this index are all taken over (the `share`s come in
    /// the order of the claims, so the next one is usually here).
    next_claim: usize,
    /// A bit per claim's address ([`claim_bit`]): a `share` whose bit is
    /// clear has no claim, without a search (headers and statuses).
    claimed: [u64; 4],
    /// The operations of the next `dma_batch` (kept to reuse its memory).
    ops: Vec<DmaOp>,
}

impl SharedPages {
    pub const fn new() -> Self {
        SharedPages {
            runs: Vec::new(),
            free: Vec::new(),
            index: RunIndex::new(),
            pending: Vec::new(),
            idle: 0,
            unsent: false,
            holding: 0,
            claims: Vec::new(),
            next_claim: 0,
            claimed: [0; 4],
            ops: Vec::new(),
        }
    }

    /// Brings the IOMMU in line with one `dma_batch`: the maps the users
    /// need and, with `unmaps`, the unmaps of every idle run. No call
    /// when there is nothing to do.
    fn send(&mut self, unmaps: bool) {
        let mut ops = core::mem::take(&mut self.ops);
        ops.clear();
        self.take_ops(&mut ops, unmaps);
        if !ops.is_empty() {
            dma_batch(&ops);
        }
        self.ops = ops;
    }

    /// The pages `[va, va + len)` touches: first page number and count.
    fn span(va: u64, len: usize) -> (u64, u64) {
        if len == 0 {
            return (va / PAGE as u64, 0);
        }
        let first = va / PAGE as u64;
        let last = (va + len as u64 - 1) / PAGE as u64;
        (first, last - first + 1)
    }

    /// A new run (over pages of no other run, inside one leaf); returns
    /// its number.
    fn new_run(&mut self, run: Run) -> u32 {
        let n = match self.free.pop() {
            Some(n) => {
                self.runs[n as usize] = run;
                n
            }
            None => {
                self.runs.push(run);
                (self.runs.len() - 1) as u32
            }
        };
        self.index.insert(run.start, n);
        n
    }

    /// Lists run `n` in `pending` (once).
    #[inline]
    fn queue(&mut self, n: u32) {
        let r = &mut self.runs[n as usize];
        if !r.queued {
            r.queued = true;
            self.pending.push(n);
        }
    }

    /// Splits run `n` at `page` (inside it): `n` ends there, a new run
    /// with the same state takes the rest; returns the new one.
    fn split(&mut self, n: u32, page: u64) -> u32 {
        let old = self.runs[n as usize];
        self.runs[n as usize].end = page;
        let tail = self.new_run(Run {
            start: page,
            queued: false,
            ..old
        });
        if old.users == 0 {
            self.idle += 1;
        }
        if old.queued {
            self.queue(tail);
        }
        tail
    }

    /// One more buffer on run `n`.
    #[inline]
    fn add_user(&mut self, n: u32, write: bool) {
        let r = &mut self.runs[n as usize];
        if r.users == 0 {
            self.idle -= 1;
        }
        r.users += 1;
        r.write |= write;
        if r.behind() {
            self.unsent = true;
            self.queue(n);
        }
    }

    /// One buffer fewer on run `n`.
    #[inline]
    fn remove_user(&mut self, n: u32) {
        let r = &mut self.runs[n as usize];
        if r.users > 0 {
            r.users -= 1;
            if r.users == 0 {
                self.idle += 1;
                self.queue(n);
            }
        }
    }

    /// A new run with one user over the free pages `[start, end)` (inside
    /// one leaf).
    fn add_run(&mut self, start: u64, end: u64, write: bool) {
        let n = self.new_run(Run {
            start,
            end,
            users: 1,
            write,
            sent: None,
            queued: false,
        });
        self.queue(n);
        self.unsent = true;
    }

    /// A buffer at `va` of `len` bytes goes to the device (`write`: the
    /// device writes it): its pages are counted, and those the IOMMU does
    /// not hold as needed are marked for the next [`Self::take_ops`].
    /// Returns whether a call is needed before the device may see it.
    #[inline]
    pub fn share(&mut self, va: u64, len: usize, write: bool) -> bool {
        let (first, n) = Self::span(va, len);
        if n == 0 {
            return self.unsent;
        }
        let last = first + n;
        // The common case: exactly one run (a header on its slot page).
        let at = self.index.starting(first);
        if at != NONE && self.runs[at as usize].end == last {
            self.add_user(at, write);
            return self.unsent;
        }
        self.share_other(first, last, write);
        self.unsent
    }

    /// [`Self::share`] of pages `[first, last)` that are not exactly one
    /// run.
    #[inline(never)]
    fn share_other(&mut self, first: u64, last: u64, write: bool) {
        // The common case: pages no run touches, in one leaf (a data
        // buffer's claim).
        if last <= leaf_end(first)
            && self.run_at(first) == NONE
            && self.index.next_start(first + 1, last).is_none()
        {
            self.add_run(first, last, write);
            return;
        }
        let mut at = first;
        while at < last {
            let mut n = self.run_at(at);
            if n == NONE {
                // A gap up to the next run, the leaf's end or the end: new.
                let lend = leaf_end(at).min(last);
                let end = self.index.next_start(at, lend).unwrap_or(lend);
                self.add_run(at, end, write);
                at = end;
                continue;
            }
            if self.runs[n as usize].start < at {
                n = self.split(n, at);
            }
            if self.runs[n as usize].end > last {
                self.split(n, last);
            }
            self.add_user(n, write);
            at = self.runs[n as usize].end;
        }
    }

    /// The buffer at `va` of `len` bytes came back from the device. Its
    /// pages that no other buffer uses become idle, for the unmaps of
    /// [`Self::take_ops`].
    #[inline]
    pub fn unshare(&mut self, va: u64, len: usize) {
        let (first, n) = Self::span(va, len);
        if n == 0 {
            return;
        }
        let last = first + n;
        let at = self.index.starting(first);
        if at != NONE && self.runs[at as usize].end == last {
            self.remove_user(at);
            return;
        }
        self.unshare_other(first, last);
    }

    /// [`Self::unshare`] of pages `[first, last)` that are not exactly one
    /// run.
    #[inline(never)]
    fn unshare_other(&mut self, first: u64, last: u64) {
        let mut at = first;
        while at < last {
            let mut n = self.run_at(at);
            if n == NONE {
                let lend = leaf_end(at).min(last);
                at = self.index.next_start(at, lend).unwrap_or(lend);
                continue;
            }
            if self.runs[n as usize].start < at {
                n = self.split(n, at);
            }
            if self.runs[n as usize].end > last {
                self.split(n, last);
            }
            self.remove_user(n);
            at = self.runs[n as usize].end;
        }
    }

    /// The run page `page` is in, or [`NONE`].
    fn run_at(&self, page: u64) -> u32 {
        match self.index.before(page) {
            Some((_, n)) if self.runs[n as usize].end > page => n,
            _ => NONE,
        }
    }

    /// Appends the operations that bring the IOMMU in line, from the
    /// runs in `pending`, in the order they were listed (two runs next
    /// to each other there and in memory, with the same flags, are one
    /// operation; no two overlap): a map for every run behind,
    /// and with `unmaps` an unmap for every idle run that is mapped, which
    /// is then forgotten (an idle run never mapped is forgotten then too).
    pub fn take_ops(&mut self, ops: &mut Vec<DmaOp>, unmaps: bool) {
        let unmaps = unmaps && self.idle > 0;
        if !self.unsent && !unmaps {
            return;
        }
        let mut pending = core::mem::take(&mut self.pending);
        let mut kept = 0;
        for i in 0..pending.len() {
            let n = pending[i];
            let r = &mut self.runs[n as usize];
            if r.users > 0 {
                if r.behind() {
                    let flags = if r.write { dma_flags::WRITE } else { 0 } | dma_flags::MAP;
                    push_run(ops, r.start, r.end - r.start, flags);
                    r.sent = Some(r.write);
                }
                r.queued = false;
            } else if unmaps {
                if r.sent.is_some() {
                    push_run(ops, r.start, r.end - r.start, 0);
                }
                let start = r.start;
                *r = Run::FREE;
                self.index.remove(start);
                self.free.push(n);
            } else {
                pending[kept] = n;
                kept += 1;
            }
        }
        pending.truncate(kept);
        self.pending = pending;
        if unmaps {
            self.idle = 0;
        }
        self.unsent = false;
    }

    /// Counts a buffer the caller is about to give virtio-drivers, so
    /// that one call maps the buffers of many requests: the `share` that
    /// matches it takes it over instead of counting it again.
    fn claim(&mut self, va: u64, len: usize, write: bool) {
        self.share(va, len, write);
        self.claims.push(Some(Claim { va, len, write }));
        let (w, bit) = claim_bit(va);
        self.claimed[w] |= bit;
    }

    /// Takes over a claim for this buffer (same address and length, and
    /// claimed writable if it needs to be), if there is one.
    fn take_claim(&mut self, va: u64, len: usize, write: bool) -> bool {
        let fits = |c: &Option<Claim>| {
            c.is_some_and(|c| c.va == va && c.len == len && (c.write || !write))
        };
        let i = if self.claims.get(self.next_claim).is_some_and(fits) {
            self.next_claim
        } else {
            let (w, bit) = claim_bit(va);
            if self.claimed[w] & bit == 0 {
                return false;
            }
            let start = self.next_claim.min(self.claims.len());
            match self.claims[start..].iter().position(fits) {
                Some(i) => start + i,
                None => return false,
            }
        };
        self.claims[i] = None;
        while self
            .claims
            .get(self.next_claim)
            .is_some_and(Option::is_none)
        {
            self.next_claim += 1;
        }
        true
    }

    /// Uncounts every claim no `share` took over.
    fn release_claims(&mut self) {
        let mut claims = core::mem::take(&mut self.claims);
        for c in claims.drain(..).flatten() {
            self.unshare(c.va, c.len);
        }
        self.claims = claims;
        self.next_claim = 0;
        self.claimed = [0; 4];
    }

    /// Whether unmaps are being held back.
    pub fn holding(&self) -> bool {
        self.holding != 0
    }

    /// How many pages the IOMMU holds now.
    pub fn mapped(&self) -> usize {
        self.runs
            .iter()
            .filter(|r| r.sent.is_some())
            .map(|r| (r.end - r.start) as usize)
            .sum()
    }
}

/// Adds `pages` pages from page `page` to `ops` with `flags`: onto the last
/// operation when they meet it (just after or just before) with the same
/// flags, else as a new one.
fn push_run(ops: &mut Vec<DmaOp>, page: u64, pages: u64, flags: u32) {
    let addr = page * PAGE as u64;
    let bytes = pages * PAGE as u64;
    let pages = pages as u32;
    if let Some(last) = ops.last_mut() {
        if last.flags == flags {
            if last.addr + u64::from(last.pages) * PAGE as u64 == addr {
                last.pages += pages;
                return;
            }
            if addr + bytes == last.addr {
                last.addr = addr;
                last.pages += pages;
                return;
            }
        }
    }
    ops.push(DmaOp { addr, pages, flags });
}

static SHARED: Global<SharedPages> = Global::new(SharedPages::new());

/// Makes `ops` with `dma_batch`, [`DMA_BATCH_MAX`] at a time. A refusal
/// means our counts and the hypervisor's mappings disagree: the device
/// could keep a page it should not, so the domain stops.
fn dma_batch(ops: &[DmaOp]) {
    for chunk in ops.chunks(DMA_BATCH_MAX as usize) {
        if let Err(e) = hypercall::dma_batch(chunk) {
            panic!("dma_batch of {} operations: {}", chunk.len(), e.name());
        }
    }
}

/// Strict mode: counts the buffer `[va, va + len)` (`write`: the device
/// writes it) for a request the caller is about to give virtio-drivers,
/// without a call yet. [`commit`] (or the first `share` that needs the
/// IOMMU) maps every claimed buffer with one `dma_batch`, which also takes
/// the unmaps an [`UnmapBatch`] holds back; the `share` of the same buffer
/// (address, length, and no more permission) then only takes the claim
/// over, and its `unshare` uncounts it as usual. Claims no `share` took
/// over must be given back with [`release_claims`]. Nothing in static mode.
pub fn claim(va: u64, len: usize, write: bool) {
    if dma_mode() != DmaMode::Static {
        SHARED.with(|s| s.claim(va, len, write));
    }
}

/// Strict mode: maps what [`claim`]s and `share`s need, with the unmaps
/// held back, in one `dma_batch`; no call if every page is mapped as
/// needed already.
pub fn commit() {
    if dma_mode() != DmaMode::Static {
        SHARED.with(|s| {
            if s.unsent {
                s.send(true);
            }
        });
    }
}

/// Uncounts the [`claim`]s no `share` took over (their pages go with the
/// next call's unmaps, or now outside an [`UnmapBatch`]).
pub fn release_claims() {
    if dma_mode() != DmaMode::Static {
        SHARED.with(|s| {
            s.release_claims();
            if !s.holding() && s.idle > 0 {
                s.send(true);
            }
        });
    }
}

/// Holds back the unmaps of `unshare` while it lives: the pages the
/// buffers used stay mapped until it ends, when those still idle are
/// unmapped in one `dma_batch` (one IOTLB invalidation), or until a call
/// made before then (a `share` or [`commit`] that maps) takes them along.
/// Strict mode's rule is the caller's then: hand no buffer unshared inside
/// the batch back to its owner (a frontend, the heap) before the batch
/// ends. Batches nest; the outermost one unmaps. In static mode it does
/// nothing.
#[must_use = "the unmaps happen when the batch ends"]
pub struct UnmapBatch(());

impl UnmapBatch {
    pub fn begin() -> Self {
        SHARED.with(|s| s.holding += 1);
        UnmapBatch(())
    }

    /// Ends the batch: the held-back pages are unmapped, and the IOTLB
    /// invalidated, when this returns.
    pub fn end(self) {}
}

impl Drop for UnmapBatch {
    fn drop(&mut self) {
        SHARED.with(|s| {
            s.holding = s.holding.saturating_sub(1);
            if s.holding == 0 && (s.idle > 0 || s.unsent) {
                s.send(true);
            }
        });
    }
}

/// virtio-drivers' `Hal` for an airlock domain.
pub struct DomHal;

// SAFETY: `dma_alloc` returns zeroed, page-aligned heap memory that nothing
// else uses until `dma_dealloc` (a `DmaBuf` owns it); `mmio_phys_to_virt`
// returns addresses inside the device window the hypervisor maps; `share`
// returns an address the device can reach for the buffer's bytes (the
// buffer itself: all of memory in static mode, its pages mapped by
// `dma_batch` before it returns in strict mode).
unsafe impl Hal for DomHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let buf = match DmaBuf::new(pages) {
            Ok(b) => b,
            Err(e) => panic!("dma_alloc of {pages} pages: {}", e.name()),
        };
        let (iova, ptr) = (buf.iova(), buf.as_ptr());
        BUFFERS.with(|v| v.push(buf));
        (iova, NonNull::new(ptr).unwrap_or(NonNull::dangling()))
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        // Dropping unmaps (strict mode) and frees.
        match take_buffer(paddr) {
            Some(b) => {
                drop(b);
                0
            }
            None => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        let end = paddr.checked_add(size as u64);
        assert!(
            paddr >= DEVICE_VA && end.is_some_and(|e| e <= USER_LIMIT),
            "MMIO region {paddr:#x}+{size:#x} is outside the device window"
        );
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let va = buffer.as_ptr() as *mut u8 as u64;
        let len = buffer.len();
        if dma_mode() == DmaMode::Static {
            return va;
        }
        // A ring's pages are mapped for its life: counting a buffer on them
        // would unmap them at its `unshare`. virtio-drivers never shares
        // its rings, and were it to, the device would lose the ring (and
        // fault), not gain anything: checked in debug builds only.
        debug_assert!(
            {
                let (first, n) = SharedPages::span(va, len);
                !BUFFERS.with(|v| {
                    v.iter().any(|b| {
                        let (bf, bn) = SharedPages::span(b.va(), b.len());
                        first < bf + bn && bf < first + n
                    })
                })
            },
            "share of {va:#x}+{len:#x}: it lies on a ring's pages"
        );
        let write = direction != BufferDirection::DriverToDevice;
        SHARED.with(|s| {
            // A claimed buffer is counted already; otherwise count it. Either
            // way, what is not mapped as needed is mapped now (with the
            // unmaps held back), before the device can see the buffer.
            if !s.take_claim(va, len, write) {
                s.share(va, len, write);
            }
            if s.unsent {
                s.send(true);
            }
        });
        va
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, _direction: BufferDirection) {
        if dma_mode() == DmaMode::Static {
            return;
        }
        SHARED.with(|s| {
            s.unshare(paddr, buffer.len());
            if !s.holding() && s.idle > 0 {
                s.send(true);
            }
        });
    }
}

/// Offset of BAR0 in config space, and of the command register.
const BAR0: u8 = 0x10;
const COMMAND: u8 = 0x04;

/// One BAR as the transport sees it: the domain's mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ShadowBar {
    /// The low dword's type bits (memory, 64-bit, prefetchable).
    flags: u32,
    va: u64,
    len: u64,
    /// The transport wrote all ones to size it (low, high dword).
    sizing: [bool; 2],
}

/// Config space of one assigned device, for virtio-drivers' `PciRoot`.
pub struct DomainConfig {
    dev: usize,
    /// By BAR number; the upper half of a 64-bit BAR is slot `n + 1`'s
    /// dword, answered from slot `n`.
    bars: [Option<ShadowBar>; 6],
    high_of: [Option<usize>; 6],
}

impl DomainConfig {
    /// The config space of device `dev` (its index in the start info),
    /// with its BARs shadowed by the mappings in `info`.
    pub fn new(dev: usize, info: &DeviceInfo) -> Self {
        let mut bars = [None; 6];
        let mut high_of = [None; 6];
        for b in info.bars.iter().flatten() {
            let i = usize::from(b.index);
            let raw = hypercall::dev_config_read(dev, u16::from(BAR0) + 4 * b.index as u16, 4)
                .unwrap_or(0);
            let flags = raw & 0xf;
            bars[i] = Some(ShadowBar {
                flags,
                va: b.va,
                len: b.len,
                sizing: [false; 2],
            });
            if flags & 0b110 == 0b100 && i < 5 {
                high_of[i + 1] = Some(i);
            }
        }
        DomainConfig { dev, bars, high_of }
    }

    fn bar_slot(offset: u8) -> Option<usize> {
        (BAR0..BAR0 + 24)
            .contains(&offset)
            .then(|| usize::from((offset - BAR0) / 4))
    }

    fn read_bar(&self, slot: usize) -> u32 {
        if let Some(i) = self.high_of[slot] {
            let Some(b) = self.bars[i] else { return 0 };
            return if b.sizing[1] {
                (!(b.len - 1) >> 32) as u32
            } else {
                (b.va >> 32) as u32
            };
        }
        match self.bars[slot] {
            None => 0,
            Some(b) if b.sizing[0] => (!(b.len - 1) as u32 & !0xf) | b.flags,
            Some(b) => (b.va as u32 & !0xf) | b.flags,
        }
    }

    fn write_bar(&mut self, slot: usize, data: u32) {
        let sizing = data == u32::MAX;
        if let Some(i) = self.high_of[slot] {
            if let Some(b) = self.bars[i].as_mut() {
                b.sizing[1] = sizing;
            }
        } else if let Some(b) = self.bars[slot].as_mut() {
            b.sizing[0] = sizing;
        }
    }
}

impl ConfigurationAccess for DomainConfig {
    fn read_word(&self, _df: DeviceFunction, offset: u8) -> u32 {
        if let Some(slot) = Self::bar_slot(offset) {
            return self.read_bar(slot);
        }
        hypercall::dev_config_read(self.dev, offset.into(), 4).unwrap_or(u32::MAX)
    }

    fn write_word(&mut self, _df: DeviceFunction, offset: u8, data: u32) {
        if let Some(slot) = Self::bar_slot(offset) {
            self.write_bar(slot, data);
            return;
        }
        // The transport toggles decoding around BAR sizing; the hypervisor
        // owns those bits, and the status half is write-one-to-clear.
        if offset == COMMAND {
            return;
        }
        let _ = hypercall::dev_config_write(self.dev, offset.into(), 4, data);
    }

    unsafe fn unsafe_clone(&self) -> Self {
        DomainConfig {
            dev: self.dev,
            bars: self.bars,
            high_of: self.high_of,
        }
    }
}

/// A virtio PCI capability (virtio 1.2, 4.1.4): where one configuration
/// structure lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCap {
    /// `VIRTIO_PCI_CAP_*_CFG`.
    pub cfg_type: u8,
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
}

/// `cfg_type` of the common configuration structure.
pub const CAP_COMMON_CFG: u8 = 1;
/// The vendor-specific capability id virtio uses.
const CAP_ID_VENDOR: u8 = 0x09;

/// The first virtio capability of type `cfg_type`, walking the capability
/// list with `read_dword(offset)` (an aligned config-space dword).
pub fn find_virtio_cap(read_dword: impl Fn(u16) -> u32, cfg_type: u8) -> Option<VirtioCap> {
    let byte = |off: u16| (read_dword(off & !3) >> (8 * (off & 3))) as u8;
    // Status register bit 4: the capability list exists.
    if read_dword(0x04) & (1 << 20) == 0 {
        return None;
    }
    let mut at = u16::from(byte(0x34) & !3);
    // At most 48 capabilities fit in the 192 bytes after the header: a
    // longer walk is a loop.
    for _ in 0..48 {
        if at < 0x40 {
            return None;
        }
        if byte(at) == CAP_ID_VENDOR && byte(at + 2) >= 16 && byte(at + 3) == cfg_type {
            return Some(VirtioCap {
                cfg_type,
                bar: byte(at + 4),
                offset: read_dword(at + 8),
                length: read_dword(at + 12),
            });
        }
        at = u16::from(byte(at + 1) & !3);
    }
    None
}

/// Offsets in the common configuration structure (virtio 1.2, 4.1.4.3).
pub mod common {
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// The structure's size up to `queue_device`.
    pub const LEN: u64 = 0x38;
}

/// `msix_config` / `queue_msix_vector` value meaning "no interrupt".
pub const NO_VECTOR: u16 = 0xffff;

/// The common configuration of assigned device `dev`, as mapped in the
/// domain: found through its capability, inside a BAR the start info lists.
pub fn common_cfg(dev: usize, info: &DeviceInfo) -> Option<Mmio> {
    let cap = find_virtio_cap(
        |off| hypercall::dev_config_read(dev, off, 4).unwrap_or(0),
        CAP_COMMON_CFG,
    )?;
    if u64::from(cap.length) < common::LEN {
        return None;
    }
    let b = bar(info, cap.bar)?;
    Mmio::from_bar(&b).sub(cap.offset.into(), cap.length.into())
}

/// The MSI-X vectors the device has now: `msix_config` and queue `queue`'s
/// `queue_msix_vector` ([`NO_VECTOR`] where it refused or none was set).
/// Leaves `queue_select` at `queue`.
pub fn msix_vectors(common_cfg: &Mmio, queue: u16) -> (u16, u16) {
    common_cfg.write16(common::QUEUE_SELECT, queue);
    (
        common_cfg.read16(common::MSIX_CONFIG),
        common_cfg.read16(common::QUEUE_MSIX_VECTOR),
    )
}

/// A virtio-drivers PCI transport for assigned device `dev`, accepting
/// VIRTIO_F_ACCESS_PLATFORM, whose queues and configuration changes raise
/// MSI-X entry `vector` (so the port of `dev_irq_bind(dev)`).
pub fn pci_transport_msix(
    dev: usize,
    info: &DeviceInfo,
    vector: u16,
) -> Result<AccessPlatform<PciTransport>, VirtioPciError> {
    let common = common_cfg(dev, info).ok_or(VirtioPciError::MissingCommonConfig)?;
    Ok(pci_transport(dev, info)?.with_msix(common, vector))
}

/// A virtio-drivers PCI transport for assigned device `dev`, accepting
/// VIRTIO_F_ACCESS_PLATFORM.
pub fn pci_transport(
    dev: usize,
    info: &DeviceInfo,
) -> Result<AccessPlatform<PciTransport>, VirtioPciError> {
    let mut root = PciRoot::new(DomainConfig::new(dev, info));
    let df = DeviceFunction {
        bus: info.bdf.bus(),
        device: info.bdf.device(),
        function: info.bdf.function(),
    };
    PciTransport::new::<DomHal, _>(&mut root, df).map(AccessPlatform::new)
}

/// A transport that accepts VIRTIO_F_ACCESS_PLATFORM when the device
/// offers it (and otherwise passes everything through).
/// With [`AccessPlatform::with_msix`], it also sets the MSI-X vectors.
pub struct AccessPlatform<T> {
    inner: T,
    offered: u64,
    /// The common configuration and the vector for every queue and for
    /// configuration changes.
    msix: Option<(Mmio, u16)>,
}

impl<T: Transport> AccessPlatform<T> {
    pub fn new(inner: T) -> Self {
        AccessPlatform {
            inner,
            offered: 0,
            msix: None,
        }
    }

    /// Makes every queue the driver sets up, and configuration changes,
    /// signal MSI-X entry `vector`, written through `common_cfg` (the
    /// device's mapped common configuration). Whether the device took the
    /// vectors: [`msix_vectors`] after initialisation.
    pub fn with_msix(mut self, common_cfg: Mmio, vector: u16) -> Self {
        self.msix = Some((common_cfg, vector));
        self
    }

    pub fn inner(&mut self) -> &mut T {
        &mut self.inner
    }
}

/// The driver features to write: `driver`'s, plus ACCESS_PLATFORM if the
/// device offered it.
pub fn with_access_platform(offered: u64, driver: u64) -> u64 {
    driver | (offered & F_ACCESS_PLATFORM)
}

impl<T: Transport> Transport for AccessPlatform<T> {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.offered = self.inner.read_device_features();
        self.offered
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner
            .write_driver_features(with_access_platform(self.offered, driver_features))
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue)
    }
    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        if let Some((cfg, vector)) = self.msix {
            if status.contains(DeviceStatus::DRIVER_OK) {
                cfg.write16(common::MSIX_CONFIG, vector);
            }
        }
        self.inner.set_status(status)
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        if let Some((cfg, vector)) = self.msix {
            // The inner transport selects the queue again, then writes the
            // addresses and enables it.
            cfg.write16(common::QUEUE_SELECT, queue);
            cfg.write16(common::QUEUE_MSIX_VECTOR, vector);
        }
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }
    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }
    fn read_config_space<V: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<V> {
        self.inner.read_config_space(offset)
    }
    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_platform_is_added_only_when_offered() {
        assert_eq!(
            with_access_platform(F_ACCESS_PLATFORM | 1, 1),
            F_ACCESS_PLATFORM | 1
        );
        assert_eq!(with_access_platform(1, 1), 1);
        assert_eq!(
            with_access_platform(F_ACCESS_PLATFORM, 0),
            F_ACCESS_PLATFORM
        );
    }

    /// Config space of QEMU 7.2's virtio-blk-pci (modern only): MSI-X at
    /// 0x98, then the virtio capabilities common (BAR4 +0), ISR (+0x1000),
    /// device (+0x2000), notify (+0x3000), and the PCI-config window.
    fn virtio_blk_config() -> [u8; 256] {
        let mut c = [0u8; 256];
        c[0x06] = 0x10;
        c[0x34] = 0x98;
        c[0x98..0x9c].copy_from_slice(&[0x11, 0x84, 0x01, 0x00]);
        let caps: [(u8, u8, u8, u32, u32); 5] = [
            (0x84, 0x70, 3, 0x2000, 0x1000),
            (0x70, 0x60, 4, 0x3000, 0x1000),
            (0x60, 0x50, 1, 0, 0x1000),
            (0x50, 0x40, 2, 0x1000, 0x1000),
            (0x40, 0x00, 5, 0, 0),
        ];
        for (at, next, ty, off, len) in caps {
            let at = usize::from(at);
            c[at..at + 6].copy_from_slice(&[0x09, next, 16, ty, 4, 0]);
            c[at + 8..at + 12].copy_from_slice(&off.to_le_bytes());
            c[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
        }
        c
    }

    #[test]
    fn virtio_capabilities_are_found() {
        let c = virtio_blk_config();
        let read = |off: u16| {
            let o = usize::from(off);
            u32::from_le_bytes(c[o..o + 4].try_into().unwrap())
        };
        assert_eq!(
            find_virtio_cap(read, CAP_COMMON_CFG),
            Some(VirtioCap {
                cfg_type: 1,
                bar: 4,
                offset: 0,
                length: 0x1000
            })
        );
        assert_eq!(find_virtio_cap(read, 4).unwrap().offset, 0x3000);
        assert_eq!(find_virtio_cap(read, 9), None);
        // No capability list, and a list that loops.
        let mut none = c;
        none[0x06] = 0;
        let read_none = |off: u16| {
            let o = usize::from(off);
            u32::from_le_bytes(none[o..o + 4].try_into().unwrap())
        };
        assert_eq!(find_virtio_cap(read_none, CAP_COMMON_CFG), None);
        let mut looped = c;
        looped[0x85] = 0x98;
        let read_looped = |off: u16| {
            let o = usize::from(off);
            u32::from_le_bytes(looped[o..o + 4].try_into().unwrap())
        };
        assert_eq!(find_virtio_cap(read_looped, CAP_COMMON_CFG), None);
    }

    fn op(addr: u64, pages: u32, flags: u32) -> DmaOp {
        DmaOp { addr, pages, flags }
    }

    const MAP: u32 = dma_flags::MAP;
    const MAP_W: u32 = dma_flags::MAP | dma_flags::WRITE;

    /// Shares a buffer as the `Hal` does: counted, then the operations a
    /// call would carry if one is needed (by address: their order in a
    /// call does not matter).
    fn share(s: &mut SharedPages, va: u64, len: usize, write: bool) -> Vec<DmaOp> {
        let mut ops = Vec::new();
        if s.share(va, len, write) {
            s.take_ops(&mut ops, true);
        }
        ops.sort_by_key(|o| o.addr);
        ops
    }

    fn take(s: &mut SharedPages) -> Vec<DmaOp> {
        let mut ops = Vec::new();
        s.take_ops(&mut ops, true);
        ops.sort_by_key(|o| o.addr);
        ops
    }

    #[test]
    fn a_request_maps_its_pages_once_and_unmaps_them_when_the_last_buffer_returns() {
        let mut s = SharedPages::new();
        // Header (device reads) and status (device writes) on one page, a
        // 64 KiB data buffer over 16 pages of its own.
        assert_eq!(share(&mut s, 0x40_1010, 16, false), [op(0x40_1000, 1, MAP)]);
        assert_eq!(
            share(&mut s, 0x8000_0000, 0x1_0000, true),
            [op(0x8000_0000, 16, MAP_W)]
        );
        assert_eq!(
            share(&mut s, 0x40_1020, 1, true),
            [op(0x40_1000, 1, MAP_W)],
            "made writable"
        );
        assert_eq!(s.mapped(), 17);
        // A second request's header on the same page needs no call.
        assert!(share(&mut s, 0x40_1030, 16, false).is_empty());
        // The first request completes: only its data pages are free.
        s.unshare(0x40_1010, 16);
        s.unshare(0x8000_0000, 0x1_0000);
        s.unshare(0x40_1020, 1);
        assert_eq!(take(&mut s), [op(0x8000_0000, 16, 0)]);
        assert_eq!(s.mapped(), 1);
        // The second one's header was the last user of the shared page.
        s.unshare(0x40_1030, 16);
        assert_eq!(take(&mut s), [op(0x40_1000, 1, 0)]);
        assert_eq!(s.mapped(), 0);
    }

    #[test]
    fn held_back_pages_are_reused_and_runs_merge() {
        let mut s = SharedPages::new();
        // Unaligned: 0x1ff0..0x3010 touches three pages.
        assert_eq!(share(&mut s, 0x1ff0, 0x1020, false), [op(0x1000, 3, MAP)]);
        s.unshare(0x1ff0, 0x1020);
        // Still mapped (users 0): a new buffer there needs no map, and the
        // pages it does not use are what is left to unmap.
        assert!(share(&mut s, 0x2000, 8, false).is_empty());
        assert_eq!(take(&mut s), [op(0x1000, 1, 0), op(0x3000, 1, 0)]);
        // Around a mapped page: only the gaps are mapped, in one operation
        // where they meet; an empty buffer touches nothing.
        assert!(s.share(0x5000, 1, false));
        assert!(s.share(0x3000, 0x3000, false));
        assert_eq!(take(&mut s), [op(0x3000, 3, MAP)]);
        assert!(share(&mut s, 0x9000, 0, true).is_empty());
        s.unshare(0x9000, 0);
        assert_eq!(s.mapped(), 4);
    }

    /// The serve loop's order: a reap's unmaps held back, then the next
    /// requests claimed, then one call for both; the `share`s take the
    /// claims over without a call, and an unclaimed or unused buffer is
    /// handled as ever.
    #[test]
    fn claims_fold_many_requests_and_the_held_unmaps_into_one_call() {
        let mut s = SharedPages::new();
        assert_eq!(
            share(&mut s, 0x8000_0000, 0x2000, true),
            [op(0x8000_0000, 2, MAP_W)]
        );
        // It completes inside an UnmapBatch: held back.
        s.holding += 1;
        s.unshare(0x8000_0000, 0x2000);
        // Two requests claimed: a header page and two data runs (the second
        // reuses the held-back page 0x8000_1000, still writable).
        s.claim(0x40_0010, 16, false);
        s.claim(0x8000_1000, 0x1000, true);
        s.claim(0x8000_4000, 0x2000, true);
        s.claim(0x40_0030, 16, false);
        // A claim nobody will share.
        s.claim(0x40_5000, 48, false);
        assert_eq!(
            take(&mut s),
            [
                op(0x40_0000, 1, MAP),
                op(0x40_5000, 1, MAP),
                op(0x8000_0000, 1, 0),
                op(0x8000_4000, 2, MAP_W),
            ],
            "one call: the maps and the held unmap, no op for the page reused"
        );
        // The shares take the claims over: nothing more to send. A share
        // needing more permission than its claim is counted on its own.
        for (va, len, w) in [
            (0x40_0010, 16, false),
            (0x8000_1000, 0x1000, true),
            (0x8000_4000, 0x2000, true),
        ] {
            assert!(s.take_claim(va, len, w));
            assert!(!s.unsent);
        }
        assert!(!s.take_claim(0x40_0030, 16, true));
        assert_eq!(
            share(&mut s, 0x40_0030, 16, true),
            [op(0x40_0000, 1, MAP_W)]
        );
        s.release_claims();
        assert!(s.claims.is_empty());
        // Released: the read-only claim on the header page and the unused
        // one go; the header page keeps its users.
        assert_eq!(take(&mut s), [op(0x40_5000, 1, 0)]);
        s.holding -= 1;
        for (va, len) in [
            (0x40_0010, 16),
            (0x8000_1000, 0x1000),
            (0x8000_4000, 0x2000),
        ] {
            s.unshare(va, len);
        }
        s.unshare(0x40_0030, 16);
        assert_eq!(
            take(&mut s),
            [
                op(0x40_0000, 1, 0),
                op(0x8000_1000, 1, 0),
                op(0x8000_4000, 2, 0)
            ]
        );
        assert_eq!(s.mapped(), 0);
    }

    /// The table's own consistency: every run lies in one leaf, starts
    /// where the index says it does and is found from each of its pages,
    /// no other run starts in the index, the leaves count their runs and
    /// the table finds them, `idle` counts the idle runs, and every run
    /// idle or behind is in `pending` (once).
    fn check_table(s: &SharedPages, step: usize) {
        let mut live = 0usize;
        let mut idle = 0;
        for (n, r) in s.runs.iter().enumerate() {
            if r.start == r.end {
                assert_eq!(*r, Run::FREE, "step {step}: free run {n}");
                assert!(s.free.contains(&(n as u32)), "step {step}: run {n} lost");
                continue;
            }
            live += 1;
            assert!(
                r.end <= leaf_end(r.start),
                "step {step}: {r:?} crosses a leaf"
            );
            assert_eq!(s.index.before(r.start), Some((r.start, n as u32)));
            for p in r.start..r.end {
                let got = s.run_at(p);
                assert_eq!(got, n as u32, "step {step}: page {p:#x} of run {n}");
            }
            idle += usize::from(r.users == 0);
            if r.users == 0 || r.behind() {
                assert!(r.queued, "step {step}: run {n} {r:?} not pending");
            }
            assert_eq!(
                r.queued,
                s.pending.contains(&(n as u32)),
                "step {step}: run {n}"
            );
        }
        let mut indexed = 0usize;
        for (i, l) in s.index.leaves.iter().enumerate() {
            if l.key < TOP_KEYS {
                assert_eq!(usize::from(s.index.top[l.key as usize]), i + 1);
            }
            let mut used = 0;
            for (b, &n) in l.runs.iter().enumerate() {
                let bit = l.starts[b / 64] & (1 << (b % 64)) != 0;
                assert_eq!(bit, n != NONE, "step {step}: leaf {:#x} page {b}", l.key);
                if bit {
                    used += 1;
                    let start = s.runs[n as usize].start;
                    assert_eq!(start, l.key * LEAF_PAGES + b as u64, "step {step}");
                }
            }
            assert_eq!(l.used, used, "step {step}: leaf {:#x}", l.key);
            indexed += used as usize;
        }
        assert_eq!(indexed, live, "step {step}: runs indexed");
        for (key, &i) in s.index.top.iter().enumerate() {
            if i != 0 {
                assert_eq!(s.index.leaves[usize::from(i) - 1].key, key as u64);
            }
        }
        assert_eq!(s.idle, idle, "step {step}: idle count");
        let mut p = s.pending.clone();
        p.sort_unstable();
        p.dedup();
        assert_eq!(p.len(), s.pending.len(), "step {step}: pending twice");
    }

    /// Many buffers, claimed or shared and unshared in a scrambled order,
    /// against a plain count per page. The buffers: any size at any
    /// alignment over a few hundred pages, across a 2 MiB leaf boundary,
    /// page-aligned 64 KiB runs in other 2 MiB pieces (leaves emptied and
    /// reused), some above a domain's address space (leaves found by a
    /// search), and buffers shared again exactly (a run with several
    /// users). After every step each page's run has as many users as
    /// buffers touch the page; after every call the pages with users are
    /// mapped, writable where a buffer needs it; after a call that takes
    /// the unmaps exactly the pages with users are mapped; no batch has
    /// overlapping operations, an unmap finds its page mapped, and the
    /// table is consistent ([`check_table`]).
    #[test]
    fn the_table_agrees_with_a_model() {
        use std::collections::{BTreeMap, BTreeSet};
        type Live = Vec<(u64, usize, bool)>;
        let mut s = SharedPages::new();
        let mut mapped: BTreeMap<u64, bool> = BTreeMap::new();
        let mut live: Live = Vec::new();
        let mut x = 12345u64;
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let buffer = |rand: &mut dyn FnMut(u64) -> u64, live: &Live, max_pages: u64| {
            let write = rand(2) == 0;
            match rand(8) {
                0 | 1 if !live.is_empty() => {
                    let (va, len, _) = live[rand(live.len() as u64) as usize];
                    (va, len, write)
                }
                2 => {
                    let va = 0x5f_8000 + rand(64) * 512;
                    (va, 1 + rand(max_pages * 4096) as usize, write)
                }
                3 => {
                    let va = 0xb000_0000 + rand(4) * 0x20_0000 + rand(8) * 0x1_0000;
                    (va, 0x1_0000, write)
                }
                4 => {
                    let va = 0x1_0000_0000 + rand(3) * 0x20_0000 + rand(40) * 0x1_0000;
                    (va, 1 + rand(0x3_0000) as usize, write)
                }
                _ => {
                    let va = 0x40_0000 + rand(600) * 1024;
                    (va, 1 + rand(max_pages * 4096) as usize, write)
                }
            }
        };
        let apply = |ops: &[DmaOp], mapped: &mut BTreeMap<u64, bool>| {
            let mut seen = BTreeSet::new();
            for o in ops {
                for p in 0..u64::from(o.pages) {
                    let page = o.addr / 4096 + p;
                    assert!(seen.insert(page), "{page:#x} twice in one batch");
                    if o.is_map() {
                        mapped.insert(page, o.is_write());
                    } else {
                        assert!(mapped.remove(&page).is_some(), "unmap of {page:#x}");
                    }
                }
            }
        };
        // Users per page, and whether one of them writes.
        let users = |live: &Live| {
            let mut u: BTreeMap<u64, (u32, bool)> = BTreeMap::new();
            for &(va, len, write) in live {
                let (first, n) = SharedPages::span(va, len);
                for page in first..first + n {
                    let e = u.entry(page).or_default();
                    e.0 += 1;
                    e.1 |= write;
                }
            }
            u
        };
        for step in 0..10000 {
            let mut ops = Vec::new();
            // Whether the last thing done was a call that took the unmaps.
            let mut unmapped = false;
            let r = rand(10);
            if live.len() < 40 && r < 4 {
                let (va, len, write) = buffer(&mut rand, &live, 5);
                if s.share(va, len, write) {
                    s.take_ops(&mut ops, !s.holding());
                    unmapped = !s.holding();
                }
                live.push((va, len, write));
            } else if live.len() < 40 && r < 6 {
                // A few claims, one call, then shares take most of them;
                // the rest are released.
                let k = 1 + rand(4);
                let mut claimed = Vec::new();
                for _ in 0..k {
                    let (va, len, write) = buffer(&mut rand, &live, 3);
                    s.claim(va, len, write);
                    claimed.push((va, len, write));
                }
                s.take_ops(&mut ops, true);
                for (va, len, write) in claimed {
                    if rand(4) != 0 {
                        assert!(s.take_claim(va, len, write));
                        live.push((va, len, write));
                    }
                }
                apply(&ops, &mut mapped);
                ops.clear();
                s.release_claims();
                if !s.holding() {
                    s.take_ops(&mut ops, true);
                    unmapped = true;
                }
            } else if r == 6 {
                s.holding ^= 1;
                if !s.holding() {
                    s.take_ops(&mut ops, true);
                    unmapped = true;
                }
            } else if !live.is_empty() {
                let (va, len, _) = live.swap_remove(rand(live.len() as u64) as usize);
                s.unshare(va, len);
                if !s.holding() {
                    s.take_ops(&mut ops, true);
                    unmapped = true;
                }
            }
            apply(&ops, &mut mapped);
            check_table(&s, step);
            let want = users(&live);
            for (&page, &(n, _)) in &want {
                let run = s.run_at(page);
                assert_ne!(run, NONE, "step {step}: {page:#x} in no run");
                assert_eq!(s.runs[run as usize].users, n, "step {step}: {page:#x}");
            }
            for r in s.runs.iter().filter(|r| r.users > 0) {
                assert!(want.contains_key(&r.start), "step {step}: {r:?}");
            }
            if !s.unsent {
                for (&page, &(_, write)) in &want {
                    let w = mapped.get(&page).copied();
                    assert!(w.is_some(), "step {step}: {page:#x} not mapped");
                    assert!(
                        !write || w == Some(true),
                        "step {step}: {page:#x} read-only"
                    );
                }
            }
            if unmapped {
                let m: BTreeSet<u64> = mapped.keys().copied().collect();
                let w: BTreeSet<u64> = want.keys().copied().collect();
                assert_eq!(m, w, "step {step}: mapped without users");
            }
        }
        let mut ops = Vec::new();
        for (va, len, _) in live.drain(..) {
            s.unshare(va, len);
        }
        s.take_ops(&mut ops, true);
        apply(&ops, &mut mapped);
        assert!(mapped.is_empty(), "left mapped: {mapped:?}");
        assert_eq!(s.mapped(), 0);
        check_table(&s, usize::MAX);
        assert!(s.pending.is_empty());
        assert!(s.index.leaves.iter().all(|l| l.used == 0));
        assert!(
            s.index.leaves.len() <= 12,
            "{} leaves",
            s.index.leaves.len()
        );
    }

    fn config(bars: [Option<ShadowBar>; 6], high_of: [Option<usize>; 6]) -> DomainConfig {
        DomainConfig {
            dev: 0,
            bars,
            high_of,
        }
    }

    #[test]
    fn bars_are_shadowed_and_sized() {
        let df = DeviceFunction {
            bus: 0,
            device: 3,
            function: 0,
        };
        let mut bars = [None; 6];
        bars[1] = Some(ShadowBar {
            flags: 0,
            va: 0xc000_1000,
            len: 0x1000,
            sizing: [false; 2],
        });
        // A 64-bit prefetchable BAR4 of 16 KiB.
        bars[4] = Some(ShadowBar {
            flags: 0b1100,
            va: 0xc000_4000,
            len: 0x4000,
            sizing: [false; 2],
        });
        let mut high_of = [None; 6];
        high_of[5] = Some(4);
        let mut c = config(bars, high_of);
        assert_eq!(c.read_word(df, 0x14), 0xc000_1000);
        assert_eq!(c.read_word(df, 0x20), 0xc000_400c);
        assert_eq!(c.read_word(df, 0x24), 0);
        assert_eq!(c.read_word(df, 0x10), 0);
        // Sizing: all ones in, the size mask out; then restored.
        c.write_word(df, 0x14, u32::MAX);
        assert_eq!(c.read_word(df, 0x14), 0xffff_f000);
        c.write_word(df, 0x14, 0xc000_1000);
        assert_eq!(c.read_word(df, 0x14), 0xc000_1000);
        c.write_word(df, 0x20, u32::MAX);
        c.write_word(df, 0x24, u32::MAX);
        assert_eq!(c.read_word(df, 0x20), 0xffff_c00c);
        assert_eq!(c.read_word(df, 0x24), u32::MAX);
        c.write_word(df, 0x20, 0);
        c.write_word(df, 0x24, 0);
        assert_eq!(c.read_word(df, 0x20), 0xc000_400c);
        assert_eq!(c.read_word(df, 0x24), 0);
        assert_eq!(DomainConfig::bar_slot(0x0c), None);
        assert_eq!(DomainConfig::bar_slot(0x28), None);
    }
}
