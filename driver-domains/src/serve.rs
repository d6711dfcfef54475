//! The blk driver domain's serve mode: blkback for every vbd the start info
//! says this domain serves, over its one virtio-blk.
//!
//! ```text
//!  frontend A ──ring A──┐                              ┌── Backend A ──┐
//!  frontend B ──ring B──┼─ wait(ports) ─ poll/complete ┼── Backend B ──┼─ Dispatch ─ VirtIOBlk
//!  virtio-blk MSI-X ────┘                              └── ...         ┘  (queue, slots)
//! ```
//!
//! One event loop, one thread: `wait` on every vbd's port and the device's
//! MSI-X port. A vbd port that fires before its ring is mapped maps it (the
//! frontend grants the ring at `ring_gref`, then notifies); after that it
//! calls that vbd's [`Backend::poll`]. The device's port collects every
//! completion from the used ring and hands it to the backend that submitted
//! it ([`Backend::retire`]), then polls each of those backends once. An
//! event goes to a frontend whenever a call says
//! [`blkback::Poll::notify`]. The domain exits once every frontend's
//! connection is Closed (or its ring could never be mapped).
//!
//! The backends share the disk through [`Dispatch`]: a backend's request
//! becomes one virtio request per run of buffers that are contiguous in
//! memory (virtio-drivers' `read_blocks_nb` takes one buffer; the segments
//! of a blkif request are consecutive on the disk, so each run starts where
//! the last ended), queued in order and started as the virtqueue has room.
//! The request completes, towards its backend, when all its runs have; one
//! failed run fails it. A flush is a barrier: it starts only when the
//! device holds nothing, and nothing queued after it starts before it ends.
//! virtio-drivers 0.13's `flush` is blocking (it spins on the used ring for
//! that one request), which is sound only with nothing else in flight; the
//! barrier guarantees that. virtio-drivers notifies the device for every
//! request it adds, and under QEMU every notification traps into the device
//! model; the loop holds them back while it starts a batch and sends one
//! ([`crate::device::batched`]).
//!
//! Data paths (the manifest's `mode` per vbd):
//!
//! - **map**: each segment's page is mapped with `HOST_MAP | DEVICE_MAP` at a
//!   grant-window address this module hands out ([`Window`]); the
//!   hypervisor maps it for the domain's devices at I/O address = that
//!   address, so virtio-blk DMAs straight into the frontend's page. In the
//!   static DMA mode the page is in the IOMMU while the grant is mapped; in
//!   the strict mode only while a request that uses it is in the device
//!   (a turn of the loop: `reap` takes the completions and holds their
//!   unmaps back, the frontends are polled, `kick` claims the buffers of
//!   every request it starts and maps them with one `dma_batch` that also
//!   unmaps the reaped requests' pages, and only then `respond` writes the
//!   responses, after unmapping what `kick` did not take along; a page a
//!   new request uses again stays mapped). Up to [`persistent_budget`] grants per frontend
//!   stay mapped (persistent grants), INDIRECT segment-list pages among
//!   them.
//! - **copy**: the device works on page-aligned bounce pages from the heap,
//!   and the hypervisor copies between them and the frontend's pages
//!   (batched `grant_copy`, up to 64 operations per call).
//!
//! Everything that needs no hypervisor ([`ServeArgs`], [`config`],
//! [`Window`], [`Dispatch`]) is tested on the host; [`run`] is the domain's
//! loop.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;

use abi::blkif::{self, RING_SIZE};
use abi::domain::{VbdInfo, VbdMode, VbdRole};
use abi::grant::{Status as GrantStatus, GRANT_WINDOW, GRANT_WINDOW_SIZE};
use blkback::{Buf, Config, DataPath, DeviceError, Direction, PAGE_SIZE};
use libdom::args::ArgError;
use libdom::Args;

/// The keys serve mode takes.
pub const KEYS: &[&str] = &["serve", "indirect", "persistent"];

/// Grant mappings the hypervisor lets one domain hold at once
/// (`hypervisor::grant::MAX_MAPS_PER_DOMAIN`, which this crate cannot
/// name); past it a map fails with `NoDeviceSpace`.
pub const MAX_MAPS: usize = 4096;

/// Grant mappings this domain keeps for persistent grants, over all its
/// frontends, of [`MAX_MAPS`]; the rest is for the rings and the
/// per-request mappings past the persistent ones ([`map_quota`]).
pub const PERSISTENT_TOTAL: usize = 3584;
/// Persistent grants one frontend can use at most (data pages and INDIRECT
/// segment-list pages alike): room for [`blkif::MAX_SEGMENTS`] pages per
/// request slot for reads and as many for writes, a ring's worth of slots.
pub const PERSISTENT_PER_FRONTEND: usize = 2 * blkif::MAX_SEGMENTS * RING_SIZE as usize;

/// Serve mode's options, from the args:
/// `serve=1 [indirect=N] [persistent=N]`.
///
/// - `indirect`: most segments of one INDIRECT request (0 refuses
///   INDIRECT; default and most [`blkif::MAX_INDIRECT_SEGMENTS`]). A copy
///   vbd holds `max(11, indirect) + 1` bounce pages.
/// - `persistent`: persistent grants per map vbd (default
///   [`persistent_budget`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeArgs {
    pub indirect: u16,
    pub persistent: Option<usize>,
}

/// Why serve mode's args were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeArgError<'a> {
    Args(ArgError<'a>),
    Indirect(u64),
    Persistent(u64),
}

impl fmt::Display for ServeArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeArgError::Args(e) => e.fmt(f),
            ServeArgError::Indirect(n) => write!(
                f,
                "indirect={n}: expected 0..={}",
                blkif::MAX_INDIRECT_SEGMENTS
            ),
            ServeArgError::Persistent(n) => {
                write!(f, "persistent={n}: expected 0..={PERSISTENT_TOTAL}")
            }
        }
    }
}

/// Whether `args` ask for serve mode (`serve=1`). Malformed args are not
/// serve mode; the direct mode's parser reports them.
pub fn is_serve(args: &str) -> bool {
    Args::parse(args).is_ok_and(|a| a.get("serve") == Some("1"))
}

impl ServeArgs {
    pub fn parse(s: &str) -> Result<Self, ServeArgError<'_>> {
        let args = Args::parse(s).map_err(ServeArgError::Args)?;
        args.only(KEYS).map_err(ServeArgError::Args)?;
        let indirect = args
            .u64_or("indirect", blkif::MAX_INDIRECT_SEGMENTS.into())
            .map_err(ServeArgError::Args)?;
        if indirect > blkif::MAX_INDIRECT_SEGMENTS.into() {
            return Err(ServeArgError::Indirect(indirect));
        }
        let persistent = match args.get("persistent") {
            None => None,
            Some(_) => {
                let n = args.u64("persistent").map_err(ServeArgError::Args)?;
                if n > PERSISTENT_TOTAL as u64 {
                    return Err(ServeArgError::Persistent(n));
                }
                Some(n as usize)
            }
        };
        Ok(ServeArgs {
            indirect: indirect as u16,
            persistent,
        })
    }
}

/// Persistent grants per map vbd when `map_vbds` of them share
/// [`PERSISTENT_TOTAL`].
pub fn persistent_budget(map_vbds: usize) -> usize {
    PERSISTENT_PER_FRONTEND.min(PERSISTENT_TOTAL / map_vbds.max(1))
}

/// Per-request grant mappings one map vbd's backend may hold at once
/// ([`blkback::Config::map_quota`]) when the domain serves `vbds` vbds,
/// `map_vbds` of them by grant map with `persistent` persistent grants
/// each: what [`MAX_MAPS`] leaves after the rings (one per vbd), the
/// persistent grants and one segment-list page being read per map vbd,
/// split evenly among the map vbds. So however one frontend behaves (fresh
/// refs in every INDIRECT request, say), the others' maps and a new ring's
/// map still find room. [`config`] keeps a map vbd's INDIRECT limit within
/// it, which makes it a hard bound. With the default budget and at most
/// [`abi::domain::MAX_VBDS`] vbds it is at least 62.
pub fn map_quota(vbds: usize, map_vbds: usize, persistent: usize) -> usize {
    let fixed = vbds.saturating_add(map_vbds.saturating_mul(persistent.saturating_add(1)));
    MAX_MAPS.saturating_sub(fixed) / map_vbds.max(1)
}

/// The vbds of the start info this domain serves.
pub fn served<'a>(vbds: &[Option<VbdInfo<'a>>]) -> Vec<VbdInfo<'a>> {
    vbds.iter()
        .flatten()
        .filter(|v| v.role == VbdRole::Back)
        .copied()
        .collect()
}

/// Bounce pages a copy vbd needs with `indirect` segments per INDIRECT
/// request.
pub fn bounce_pages(indirect: u16) -> usize {
    blkif::MAX_SEGMENTS.max(usize::from(indirect)) + 1
}

/// The backend's configuration for `vbd`: `persistent` grants and at most
/// `quota` per-request mappings ([`map_quota`]) if it is a map vbd, its
/// INDIRECT limit `indirect` lowered to `quota` so that no request needs
/// more than the quota; `bounce` (page-aligned, at least
/// [`bounce_pages`]) if it is a copy vbd.
pub fn config(
    vbd: &VbdInfo<'_>,
    indirect: u16,
    persistent: usize,
    quota: usize,
    bounce: Vec<u64>,
) -> Config {
    let indirect = match vbd.mode {
        VbdMode::Map => indirect.min(u16::try_from(quota).unwrap_or(u16::MAX)),
        VbdMode::Copy => indirect,
    };
    Config {
        frontend: vbd.peer,
        first_sector: vbd.first_sector,
        sectors: vbd.sectors,
        read_only: vbd.readonly,
        path: match vbd.mode {
            VbdMode::Map => DataPath::Map { persistent },
            VbdMode::Copy => DataPath::Copy { bounce },
        },
        max_indirect_segments: indirect,
        map_quota: quota,
    }
}

/// Addresses in the grant window, one page per mapping: the lowest never
/// used, or one given back. Pages whose unmap failed are never given back,
/// so an address is never mapped twice.
#[derive(Clone, Debug)]
pub struct Window {
    next: u64,
    end: u64,
    free: Vec<u64>,
}

impl Default for Window {
    fn default() -> Self {
        Self::new(GRANT_WINDOW, GRANT_WINDOW_SIZE)
    }
}

impl Window {
    /// A window of `len` bytes at `base` (page-aligned).
    pub fn new(base: u64, len: u64) -> Self {
        Window {
            next: base,
            end: base + len,
            free: Vec::new(),
        }
    }

    pub fn alloc(&mut self) -> Option<u64> {
        if let Some(a) = self.free.pop() {
            return Some(a);
        }
        if self.next >= self.end {
            return None;
        }
        let a = self.next;
        self.next += PAGE_SIZE;
        Some(a)
    }

    /// Gives back an address that is no longer mapped.
    pub fn free(&mut self, addr: u64) {
        self.free.push(addr);
    }

    /// Maps `dom`'s grant `gref` at a free address of the window (and, with
    /// `device`, for this domain's devices at the same I/O address);
    /// returns the handle and the address. The one place blkback's and
    /// netback's grant maps go through.
    pub fn map_grant(
        &mut self,
        dom: u16,
        gref: u32,
        readonly: bool,
        device: bool,
    ) -> Result<(u32, u64), GrantStatus> {
        use abi::grant::{map_flags, MapOp};
        let addr = self.alloc().ok_or(GrantStatus::NoDeviceSpace)?;
        let mut flags = map_flags::HOST_MAP;
        if device {
            flags |= map_flags::DEVICE_MAP;
        }
        if readonly {
            flags |= map_flags::READONLY;
        }
        let mut op = [MapOp {
            host_addr: addr,
            flags,
            gref,
            dom,
            status: GrantStatus::General as i16,
            ..MapOp::default()
        }];
        let r = libdom::grant::map(&mut op);
        let [op] = op;
        if !matches!(r, Ok(1)) || op.status != GrantStatus::Okay as i16 {
            self.free(addr);
            return Err(GrantStatus::from_raw(op.status)
                .filter(|s| *s != GrantStatus::Okay)
                .unwrap_or(GrantStatus::General));
        }
        if device && op.dev_bus_addr != addr {
            // The device could not reach the page at its address.
            let _ = self.unmap_grant(op.handle, addr);
            return Err(GrantStatus::NoDeviceSpace);
        }
        Ok((op.handle, addr))
    }

    /// Unmaps a mapping `map_grant` made. An address whose unmap failed is
    /// never reused: it may still be mapped.
    pub fn unmap_grant(&mut self, handle: u32, addr: u64) -> Result<(), GrantStatus> {
        let mut op = [abi::grant::UnmapOp {
            host_addr: addr,
            dev_bus_addr: 0,
            handle,
            status: GrantStatus::General as i16,
        }];
        let r = libdom::grant::unmap(&mut op);
        if matches!(r, Ok(1)) && op[0].status == GrantStatus::Okay as i16 {
            self.free(addr);
            Ok(())
        } else {
            Err(GrantStatus::from_raw(op[0].status).unwrap_or(GrantStatus::General))
        }
    }
}

/// What one virtio request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubOp {
    /// `len` bytes at `addr` (the domain's address, also the I/O address)
    /// from or to the disk at `sector`.
    Io {
        sector: u64,
        dir: Direction,
        addr: u64,
        len: u32,
    },
    Flush,
}

/// A backend's request that has ended on the device: hand `token` and `ok`
/// to backend `backend`'s `complete`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub backend: usize,
    pub token: u64,
    pub ok: bool,
}

#[derive(Clone, Copy, Debug)]
struct Parent {
    backend: usize,
    token: u64,
    /// Runs not yet ended.
    left: u32,
    ok: bool,
}

#[derive(Clone, Copy, Debug)]
struct Sub {
    parent: usize,
    op: SubOp,
}

/// A run (first sector, address, length) as a queued I/O whose parent is
/// set once the whole request is queued.
fn io_sub(dir: Direction, (sector, addr, len): (u64, u64, u32)) -> Sub {
    Sub {
        parent: 0,
        op: SubOp::Io {
            sector,
            dir,
            addr,
            len,
        },
    }
}

/// Counters of the device side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DispatchStats {
    /// Backend requests taken (I/O and flushes).
    pub requests: u64,
    /// virtio requests made of them.
    pub subs: u64,
    /// Buffers folded into the one before (contiguous in memory).
    pub merged: u64,
    pub flushes: u64,
    /// Most virtio requests in the device at once.
    pub max_in_device: usize,
    /// Submissions refused with `Busy`.
    pub busy: u64,
}

/// The backends' requests on their way through the one virtqueue: which
/// virtio request belongs to which backend's request.
///
/// Slots are the device's request memory (the glue keeps a `BlkReq` and a
/// `BlkResp` per slot); a slot in use holds the virtio token it got, and
/// `by_token` finds it again from that token. After the first requests
/// nothing here allocates: parents and slots are reused through free
/// lists, the queue is reserved for `max_queued`, and `by_token` has grown
/// to the largest token the device uses (its queue size).
#[derive(Debug)]
pub struct Dispatch {
    parents: Vec<Option<Parent>>,
    free_parents: Vec<usize>,
    queue: VecDeque<Sub>,
    slots: Vec<Option<(u16, Sub)>>,
    /// Free slots, the next one to use last.
    free_slots: Vec<usize>,
    /// `by_token[t]` is 1 + the slot of the request with virtio token `t`
    /// (0: none).
    by_token: Vec<u16>,
    max_queued: usize,
    busy: Vec<usize>,
    stats: DispatchStats,
}

impl Dispatch {
    /// `slots` virtio requests in the device at most (1 to 65535); more
    /// than `max_queued` waiting refuses new requests with `Busy` (a
    /// request that finds the queue empty is always taken, however long).
    pub fn new(slots: usize, max_queued: usize) -> Self {
        let slots = slots.clamp(1, usize::from(u16::MAX));
        let mut s = Vec::new();
        s.resize_with(slots, || None);
        Dispatch {
            parents: Vec::new(),
            free_parents: Vec::new(),
            queue: VecDeque::with_capacity(max_queued),
            slots: s,
            free_slots: (0..slots).rev().collect(),
            by_token: Vec::new(),
            max_queued,
            busy: Vec::new(),
            stats: DispatchStats::default(),
        }
    }

    pub fn stats(&self) -> &DispatchStats {
        &self.stats
    }

    /// virtio requests in the device.
    pub fn in_device(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// virtio requests waiting for the device.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Nothing queued and nothing in the device.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.in_device() == 0
    }

    /// Backend requests not ended yet.
    pub fn pending(&self) -> usize {
        self.parents.len() - self.free_parents.len()
    }

    fn new_parent(&mut self, backend: usize, token: u64, left: u32) -> usize {
        let p = Parent {
            backend,
            token,
            left,
            ok: true,
        };
        self.stats.requests += 1;
        if let Some(i) = self.free_parents.pop() {
            self.parents[i] = Some(p);
            i
        } else {
            self.parents.push(Some(p));
            self.parents.len() - 1
        }
    }

    /// `Busy` if `subs` more would overfill a queue that is not empty.
    fn refuse_busy(
        &mut self,
        backend: usize,
        queued: usize,
        subs: usize,
    ) -> Result<(), DeviceError> {
        if queued > 0 && queued + subs > self.max_queued {
            self.stats.busy += 1;
            if !self.busy.contains(&backend) {
                self.busy.push(backend);
            }
            return Err(DeviceError::Busy);
        }
        Ok(())
    }

    /// Backend `backend`'s request `token`: `bufs` in order, consecutive
    /// on the disk from `sector`.
    pub fn submit(
        &mut self,
        backend: usize,
        token: u64,
        sector: u64,
        dir: Direction,
        bufs: &[Buf],
    ) -> Result<(), DeviceError> {
        // Each run is built here and goes onto the queue when the next
        // begins; they come off it again if the request is refused.
        let before = self.queue.len();
        let mut run: Option<(u64, u64, u32)> = None; // sector, addr, len
        let mut at = sector;
        let mut merged = 0;
        for b in bufs {
            if b.len == 0 || b.len % blkif::SECTOR_SIZE as u32 != 0 {
                self.queue.truncate(before);
                return Err(DeviceError::Failed);
            }
            match &mut run {
                Some((_, addr, len))
                    if addr.checked_add(u64::from(*len)) == Some(b.addr)
                        && len.checked_add(b.len).is_some() =>
                {
                    *len += b.len;
                    merged += 1;
                }
                _ => {
                    if let Some(r) = run.replace((at, b.addr, b.len)) {
                        self.queue.push_back(io_sub(dir, r));
                    }
                }
            }
            at += u64::from(b.len) / blkif::SECTOR_SIZE;
        }
        let Some(last) = run else {
            return Err(DeviceError::Failed);
        };
        self.queue.push_back(io_sub(dir, last));
        let runs = self.queue.len() - before;
        if let Err(e) = self.refuse_busy(backend, before, runs) {
            self.queue.truncate(before);
            return Err(e);
        }
        self.stats.merged += merged;
        let parent = self.new_parent(backend, token, runs as u32);
        self.stats.subs += runs as u64;
        for sub in self.queue.range_mut(before..) {
            sub.parent = parent;
        }
        Ok(())
    }

    /// Backend `backend`'s flush `token`.
    pub fn flush(&mut self, backend: usize, token: u64) -> Result<(), DeviceError> {
        self.refuse_busy(backend, self.queue.len(), 1)?;
        let parent = self.new_parent(backend, token, 1);
        self.stats.subs += 1;
        self.stats.flushes += 1;
        self.queue.push_back(Sub {
            parent,
            op: SubOp::Flush,
        });
        Ok(())
    }

    /// Backends refused with `Busy` since the last call: poll them again
    /// once the device has taken something.
    pub fn take_busy(&mut self) -> Vec<usize> {
        core::mem::take(&mut self.busy)
    }

    /// The next virtio request to start and the slot for it, if it may
    /// start now: a slot is free, and it is not a flush with anything in
    /// the device.
    pub fn next(&self) -> Option<(usize, SubOp)> {
        let sub = self.queue.front()?;
        let slot = *self.free_slots.last()?;
        if sub.op == SubOp::Flush && self.in_device() > 0 {
            return None;
        }
        Some((slot, sub.op))
    }

    /// The virtio requests [`Dispatch::next`] would offer one after another
    /// if each were started: the I/O requests at the front of the queue up
    /// to the first flush, each with the slot it would get, as many as
    /// there are free slots.
    pub fn upcoming(&self) -> impl Iterator<Item = (usize, SubOp)> + '_ {
        self.queue
            .iter()
            .map(|sub| sub.op)
            .take_while(|op| matches!(op, SubOp::Io { .. }))
            .zip(self.free_slots.iter().rev())
            .map(|(op, &slot)| (slot, op))
    }

    /// The request [`Dispatch::next`] gave is in the device in `slot` with
    /// virtio token `token`.
    pub fn started(&mut self, slot: usize, token: u16) {
        // `next` offers the last free slot, so this finds it at once.
        let Some(i) = self.free_slots.iter().rposition(|s| *s == slot) else {
            return;
        };
        let Some(sub) = self.queue.pop_front() else {
            return;
        };
        self.free_slots.swap_remove(i);
        self.slots[slot] = Some((token, sub));
        let t = usize::from(token);
        if t >= self.by_token.len() {
            self.by_token.resize(t + 1, 0);
        }
        // no overflow: slots.len() <= u16::MAX (`new`)
        self.by_token[t] = slot as u16 + 1;
        let n = self.in_device();
        self.stats.max_in_device = self.stats.max_in_device.max(n);
    }

    /// The request [`Dispatch::next`] gave ended without going into the
    /// device (a synchronous flush, or the device refused it).
    pub fn ended_now(&mut self, ok: bool) -> Option<Done> {
        let sub = self.queue.pop_front()?;
        self.end(sub, ok)
    }

    /// The slot and request of virtio token `token`; `None` if no request
    /// in the device has it.
    pub fn lookup(&self, token: u16) -> Option<(usize, SubOp)> {
        let slot = usize::from(*self.by_token.get(usize::from(token))?).checked_sub(1)?;
        match self.slots.get(slot)? {
            Some((t, sub)) if *t == token => Some((slot, sub.op)),
            _ => None,
        }
    }

    /// The request in `slot` ended (`ok`: without error). `Some` when that
    /// was the last part of a backend's request.
    pub fn finish(&mut self, slot: usize, ok: bool) -> Option<Done> {
        let (token, sub) = self.slots.get_mut(slot)?.take()?;
        self.free_slots.push(slot);
        if let Some(b) = self.by_token.get_mut(usize::from(token)) {
            if usize::from(*b) == slot + 1 {
                *b = 0;
            }
        }
        self.end(sub, ok)
    }

    fn end(&mut self, sub: Sub, ok: bool) -> Option<Done> {
        let p = self.parents.get_mut(sub.parent)?.as_mut()?;
        p.ok &= ok;
        p.left = p.left.saturating_sub(1);
        if p.left > 0 {
            return None;
        }
        let done = Done {
            backend: p.backend,
            token: p.token,
            ok: p.ok,
        };
        self.parents[sub.parent] = None;
        self.free_parents.push(sub.parent);
        Some(done)
    }
}

/// A [`blkback::BlockDevice`] for one backend: its requests go into the
/// shared [`Dispatch`], tagged with the backend's index.
pub struct Dev<'a> {
    pub dispatch: &'a mut Dispatch,
    pub backend: usize,
}

impl blkback::BlockDevice for Dev<'_> {
    fn submit(
        &mut self,
        token: u64,
        sector: u64,
        dir: Direction,
        bufs: &[Buf],
    ) -> Result<(), DeviceError> {
        self.dispatch.submit(self.backend, token, sector, dir, bufs)
    }

    fn flush(&mut self, token: u64) -> Result<(), DeviceError> {
        self.dispatch.flush(self.backend, token)
    }
}

pub use domain::run;

/// The domain's side: grants over the hypercalls, the virtqueue, the loop.
mod domain {
    use alloc::format;
    use alloc::vec::Vec;
    use core::alloc::Layout;

    use abi::domain::{VbdInfo, VbdMode};
    use abi::ev::{DataCheck, WorkDone};
    use abi::grant::{copy_flags, CopyOp, CopyPtr, Status as GrantStatus, DOMID_SELF};
    use abi::hypercall::PORT_WORDS;
    use blkback::{Backend, Conn, Direction, Grants, Mapping, Poll, Reject, Stats, PAGE_SIZE};
    use libdom::ports::Pending;
    use libdom::ring::SharedPage;
    use libdom::{event, evtchn_send, grant, println, set_timer, time_ns, wait};
    use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
    use virtio_drivers::transport::Transport;
    use virtio_drivers::{Error as VirtioError, Hal};

    use crate::device::{Batched, NotifyBatch};

    use abi::blkif::{self, RING_SIZE};

    use super::{
        bounce_pages, config, map_quota, persistent_budget, served, Dev, Dispatch, Done, ServeArgs,
        SubOp, Window,
    };

    const _: () = assert!(abi::domain::MAX_VBDS <= 64);

    /// With requests in the device, look at the used ring at least this
    /// often even without an interrupt (a lost one is counted, not a hang).
    const SAFETY_POLL_NS: u64 = 100_000_000;

    fn status_name(s: i16) -> &'static str {
        GrantStatus::from_raw(s).map_or("unknown", GrantStatus::name)
    }

    /// [`Grants`] over the grant hypercalls, mapping into the grant window.
    #[derive(Default)]
    struct DomGrants {
        window: Window,
        /// Grant hypercalls made (map, unmap, copy), and copy operations.
        calls: u64,
        copy_ops: u64,
    }

    impl DomGrants {
        /// Maps `dom`'s `gref` at a fresh window address; `DEVICE_MAP` also
        /// for the devices (and then the I/O address must be that address).
        fn map_at(
            &mut self,
            dom: u16,
            gref: u32,
            readonly: bool,
            device: bool,
        ) -> Result<Mapping, GrantStatus> {
            self.calls += 1;
            let (handle, addr) = self.window.map_grant(dom, gref, readonly, device)?;
            Ok(Mapping { handle, addr })
        }
    }

    impl Grants for DomGrants {
        fn map(&mut self, dom: u16, gref: u32, readonly: bool) -> Result<Mapping, GrantStatus> {
            self.map_at(dom, gref, readonly, true)
        }

        fn unmap(&mut self, m: Mapping) -> Result<(), GrantStatus> {
            self.calls += 1;
            self.window.unmap_grant(m.handle, m.addr)
        }

        fn copy(&mut self, ops: &mut [CopyOp]) -> Result<(), GrantStatus> {
            self.calls += ops.len().div_ceil(abi::grant::MAX_BATCH as usize) as u64;
            self.copy_ops += ops.len() as u64;
            match grant::copy(ops) {
                Ok(n) if n == ops.len() => Ok(()),
                _ => Err(GrantStatus::General),
            }
        }

        fn read(&self, addr: u64, buf: &mut [u8]) {
            let p = addr as *const u8;
            // Whole words while the address is aligned (segment lists
            // are), then bytes.
            let words = if addr.is_multiple_of(8) {
                buf.len() / 8
            } else {
                0
            };
            let (head, tail) = buf.split_at_mut(words * 8);
            for (i, w) in head.chunks_exact_mut(8).enumerate() {
                // SAFETY: blkback reads only pages it mapped through `map`
                // and has not unmapped, or its own bounce pages (its
                // contract), within one page; `p + 8i` is 8-aligned and
                // its 8 bytes are inside `buf`'s extent there. Each byte
                // is read once, volatile because the frontend may write a
                // mapped page.
                let v = unsafe { p.add(8 * i).cast::<u64>().read_volatile() };
                w.copy_from_slice(&v.to_ne_bytes());
            }
            for (i, b) in tail.iter_mut().enumerate() {
                // SAFETY: as above, one byte at a time.
                *b = unsafe { p.add(words * 8 + i).read_volatile() };
            }
        }
    }

    /// A page-aligned page of the heap, never freed (bounce pages live as
    /// long as the domain).
    fn heap_page() -> Option<u64> {
        let layout = Layout::from_size_align(PAGE_SIZE as usize, PAGE_SIZE as usize).ok()?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        (!p.is_null()).then_some(p as u64)
    }

    /// How a frontend's connection ended, or that it has not.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Phase {
        /// The ring is not mapped yet (not granted yet).
        Unmapped,
        Serving,
        Closed,
        /// The ring could not be mapped.
        Refused(GrantStatus),
    }

    struct Frontend<'a> {
        vbd: VbdInfo<'a>,
        backend: Backend,
        ring: Option<(SharedPage, Mapping)>,
        phase: Phase,
        connected_ns: u64,
        closed_ns: u64,
        notifies: u64,
        polls: u64,
    }

    impl Frontend<'_> {
        fn ended(&self) -> bool {
            matches!(self.phase, Phase::Closed | Phase::Refused(_))
        }
    }

    /// A virtio request's own memory, which must not move while it is out.
    #[derive(Default)]
    struct IoSlot {
        req: BlkReq,
        resp: BlkResp,
    }

    const SLOTS_PER_PAGE: usize = PAGE_SIZE as usize / core::mem::size_of::<IoSlot>();
    const _: () = assert!(SLOTS_PER_PAGE > 0);

    /// A page of [`IoSlot`]s and nothing else: page-aligned, and its size
    /// a page (`size_of` rounds up to the alignment).
    #[repr(C, align(4096))]
    struct SlotPage([IoSlot; SLOTS_PER_PAGE]);

    const _: () = assert!(core::mem::size_of::<SlotPage>() == PAGE_SIZE as usize);

    /// The virtio requests' [`IoSlot`]s, on pages of their own. In strict
    /// DMA mode libdom's Hal maps each buffer's whole pages for the device
    /// while its request is in flight, the page of a `BlkResp` writably:
    /// anything else on that page (in a plain heap vector: blkback's slot
    /// and cache tables, whose entries are addresses later handed to the
    /// device) would be open to a hostile device. Here those pages hold
    /// only other slots' headers and statuses, which only the device's own
    /// requests use. One boxed slice, made once and never grown or
    /// dropped while the loop runs: a slot never moves.
    struct IoSlots(alloc::boxed::Box<[SlotPage]>);

    impl IoSlots {
        fn new(n: usize) -> IoSlots {
            let pages = n.div_ceil(SLOTS_PER_PAGE).max(1);
            IoSlots(
                (0..pages)
                    .map(|_| SlotPage(core::array::from_fn(|_| IoSlot::default())))
                    .collect(),
            )
        }
    }

    impl core::ops::Index<usize> for IoSlots {
        type Output = IoSlot;
        fn index(&self, i: usize) -> &IoSlot {
            &self.0[i / SLOTS_PER_PAGE].0[i % SLOTS_PER_PAGE]
        }
    }

    impl core::ops::IndexMut<usize> for IoSlots {
        fn index_mut(&mut self, i: usize) -> &mut IoSlot {
            &mut self.0[i / SLOTS_PER_PAGE].0[i % SLOTS_PER_PAGE]
        }
    }

    #[test]
    fn io_slots_have_pages_of_their_own() {
        for n in [1, 16, SLOTS_PER_PAGE, SLOTS_PER_PAGE + 1, 256, 1024] {
            let s = IoSlots::new(n);
            let base = s.0.as_ptr() as u64;
            let len = core::mem::size_of_val(&*s.0) as u64;
            assert!(base.is_multiple_of(PAGE_SIZE));
            assert!(len.is_multiple_of(PAGE_SIZE) && len > 0);
            for i in 0..n {
                let req = core::ptr::from_ref(&s[i].req) as u64;
                let resp = core::ptr::from_ref(&s[i].resp) as u64;
                assert!(req >= base && resp < base + len, "{n} {i}");
            }
        }
    }

    #[derive(Default)]
    struct LoopStats {
        waits: u64,
        device_wakes: u64,
        /// Device wakes that found nothing in the used ring.
        spurious: u64,
        /// Completions found by the safety poll, not an interrupt.
        late: u64,
        completions: u64,
        failed_subs: u64,
        flush_ns: u64,
    }

    struct Server<'a, H: Hal, T: Transport> {
        blk: VirtIOBlk<H, Batched<T>>,
        /// The device hears of the requests `kick` adds once, at its end.
        notify: NotifyBatch<T>,
        dispatch: Dispatch,
        /// Made once, never grown: a slot's memory never moves, and shares
        /// its page with nothing but other slots ([`IoSlots`]).
        slots: IoSlots,
        grants: DomGrants,
        fronts: Vec<Frontend<'a>>,
        stats: LoopStats,
        /// The device broke the queue's rules; stop.
        broken: Option<&'static str>,
        /// Ended requests, kept between calls (no allocation per
        /// interrupt once it has held a queue's worth): `reap`'s, and
        /// those `kick` ended without the device (a flush, a request the
        /// virtqueue refused). Only `respond` retires them, after the held
        /// unmaps, so no response goes out while a piece of its request is
        /// still mapped for the device.
        reaped: Vec<Done>,
        /// Strict DMA: the unmaps of the reaped requests' pages, held back
        /// from `reap` to `respond` so that `kick`'s call in between takes
        /// them along with its maps.
        held: Option<libdom::virtio::UnmapBatch>,
        /// Strict DMA (`claim` does something).
        strict: bool,
        /// Blocks of the layout of virtio-drivers' indirect descriptor list
        /// reserved by `kick` (see [`INDIRECT_LIST`]).
        lists: Vec<*mut u8>,
    }

    /// virtio-drivers 0.13 gives each request (header, data, status) an
    /// indirect descriptor list of three 16-byte descriptors, allocated on
    /// the heap inside `add` and shared with the device there. `kick`
    /// reserves a block of this layout per request it is about to start,
    /// claims it, and frees it just before the request's `add`: the heap
    /// is first-fit, so the list lands there and its `share` finds it
    /// claimed and mapped. A guess: when it misses, that `share` makes its
    /// own call (correct, one call more).
    ///
    /// These blocks stay in the general heap: the list is allocated by
    /// virtio-drivers through the global allocator, so a block reserved in
    /// an arena of our own would not be where the list lands. What remains
    /// exposed in strict DMA mode: while a request is in flight, the page
    /// (or two) holding its 48-byte list is mapped for the device
    /// read-only, so a hostile device can read, but not write, whatever
    /// other heap objects share that page (blkback's tables, segment lists
    /// copied from frontends, and the like). The data buffers (grant
    /// mappings, page-aligned bounce pages) and the request headers and
    /// statuses ([`IoSlots`]) are on pages of their own.
    const INDIRECT_LIST: Layout = match Layout::from_size_align(48, 16) {
        Ok(l) => l,
        Err(_) => panic!("bad layout"),
    };

    /// What a backend call asks of the domain: report, unmap the ring
    /// once Closed, notify the frontend.
    fn act(f: &mut Frontend<'_>, grants: &mut DomGrants, p: Poll) {
        let name = f.vbd.name;
        let dom = f.vbd.peer;
        if p.connected {
            f.connected_ns = time_ns();
            println!(
                "blkback: {name} of domain {dom} connected ({} sectors from {}{}, {})",
                f.vbd.sectors,
                f.vbd.first_sector,
                if f.vbd.readonly { ", read-only" } else { "" },
                match f.vbd.mode {
                    VbdMode::Map => "grant map",
                    VbdMode::Copy => "grant copy",
                }
            );
        }
        if p.hostile {
            let why = f
                .backend
                .hostile()
                .map_or_else(|| "?".into(), |e| format!("{e}"));
            println!("blkback: {name} of domain {dom} is hostile ({why}): closing it");
            let _ = event(&DataCheck {
                what: "blkback-hostile",
                bytes: 0,
                ok: true,
            });
        }
        if p.closed {
            f.closed_ns = time_ns();
            if let Some((_, m)) = f.ring.take() {
                if let Err(s) = grants.unmap(m) {
                    println!("blkback: {name}: unmapping the ring: {}", s.name());
                }
            }
            f.phase = Phase::Closed;
            println!("blkback: {name} of domain {dom} closed");
        }
        if p.notify {
            f.notifies += 1;
            // A frontend that is gone has no port to signal: nothing to do.
            let _ = evtchn_send(f.vbd.port);
        }
    }

    impl<'a, H: Hal, T: Transport> Server<'a, H, T> {
        /// Maps frontend `i`'s ring if it is granted now.
        fn attach(&mut self, i: usize) {
            let f = &mut self.fronts[i];
            if f.phase != Phase::Unmapped {
                return;
            }
            match self
                .grants
                .map_at(f.vbd.peer, f.vbd.ring_gref, false, false)
            {
                Ok(m) => {
                    // SAFETY: a page of the grant window the hypervisor just
                    // mapped read-write for us; it is unmapped only after
                    // the `SharedPage` is dropped (`act`, on Closed), and
                    // nothing else of ours touches it.
                    let page = unsafe { SharedPage::new(m.addr) };
                    f.ring = Some((page, m));
                    f.phase = Phase::Serving;
                }
                // Not granted yet: the frontend notifies once it is.
                Err(GrantStatus::BadGntref) => {}
                Err(s) => {
                    let copy = probe_copy(&mut self.grants, &f.vbd);
                    println!(
                        "blkback: {} of domain {}: mapping its ring: {}; copying from it: {}; not serving it",
                        f.vbd.name,
                        f.vbd.peer,
                        s.name(),
                        status_name(copy)
                    );
                    f.phase = Phase::Refused(s);
                }
            }
        }

        /// Frontend `i`'s port fired (or it may have work): map its ring
        /// if need be, then poll its backend until it has no more.
        fn serve(&mut self, i: usize) {
            self.attach(i);
            loop {
                let f = &mut self.fronts[i];
                let Some((page, _)) = f.ring.as_mut() else {
                    return;
                };
                f.polls += 1;
                let mut dev = Dev {
                    dispatch: &mut self.dispatch,
                    backend: i,
                };
                let p = f.backend.poll(page, &mut self.grants, &mut dev);
                act(f, &mut self.grants, p);
                if !p.more {
                    return;
                }
            }
        }

        /// Strict DMA: claims every buffer of the requests `kick` is about
        /// to start (header, data, status, and a block where the indirect
        /// list will be), then maps them all with one `dma_batch`, which
        /// also carries the unmaps `reap` held back.
        fn claim_upcoming(&mut self) {
            if !self.strict {
                return;
            }
            let mut any = false;
            for (slot, op) in self.dispatch.upcoming() {
                let SubOp::Io { dir, addr, len, .. } = op else {
                    break;
                };
                let s = &self.slots[slot];
                let req = core::ptr::from_ref(&s.req) as u64;
                let resp = core::ptr::from_ref(&s.resp) as u64;
                libdom::virtio::claim(req, core::mem::size_of::<BlkReq>(), false);
                libdom::virtio::claim(addr, len as usize, dir == Direction::Read);
                libdom::virtio::claim(resp, core::mem::size_of::<BlkResp>(), true);
                // SAFETY: the layout has a non-zero size; the block is freed
                // in `kick` (before its request's `add`, or at the end).
                let list = unsafe { alloc::alloc::alloc(INDIRECT_LIST) };
                if !list.is_null() {
                    libdom::virtio::claim(list as u64, INDIRECT_LIST.size(), false);
                    self.lists.push(list);
                }
                any = true;
            }
            if any {
                libdom::virtio::commit();
            }
        }

        /// Frees the reserved list block of the `k`-th request of this kick.
        fn free_list(&mut self, k: usize) {
            if let Some(p) = self.lists.get_mut(k) {
                if !p.is_null() {
                    // SAFETY: allocated with this layout in `claim_upcoming`
                    // and not freed yet (set to null once freed).
                    unsafe { alloc::alloc::dealloc(*p, INDIRECT_LIST) };
                    *p = core::ptr::null_mut();
                }
            }
        }

        /// Starts queued virtio requests while the queue has room; in strict
        /// DMA mode their pages are mapped first, by one call.
        fn kick(&mut self) {
            self.claim_upcoming();
            let mut k = 0;
            self.notify.hold();
            while let Some((slot, op)) = self.dispatch.next() {
                match op {
                    SubOp::Flush => {
                        // Nothing else is in the device (the barrier), so
                        // the blocking flush pops its own completion; it
                        // notifies the device itself.
                        self.notify.release();
                        let t0 = time_ns();
                        let ok = self.blk.flush().is_ok();
                        self.stats.flush_ns += time_ns() - t0;
                        self.notify.hold();
                        // Answered by `respond`, like every ended request.
                        if let Some(d) = self.dispatch.ended_now(ok) {
                            self.reaped.push(d);
                        }
                    }
                    SubOp::Io {
                        sector,
                        dir,
                        addr,
                        len,
                    } => {
                        self.free_list(k);
                        k += 1;
                        let s = &mut self.slots[slot];
                        let r = match dir {
                            // SAFETY: `addr..addr + len` is what a backend
                            // handed to `submit`: its grant mapping (writable
                            // for a READ) or its bounce pages, kept until
                            // its `complete` for this request, which comes
                            // after this virtio request's completion below.
                            // The slot's `req` and `resp` stay put (the
                            // slots are never reallocated) until then too.
                            Direction::Read => unsafe {
                                let buf =
                                    core::slice::from_raw_parts_mut(addr as *mut u8, len as usize);
                                self.blk.read_blocks_nb(
                                    sector as usize,
                                    &mut s.req,
                                    buf,
                                    &mut s.resp,
                                )
                            },
                            // SAFETY: as for the read; the device only
                            // reads this buffer.
                            Direction::Write => unsafe {
                                let buf =
                                    core::slice::from_raw_parts(addr as *const u8, len as usize);
                                self.blk.write_blocks_nb(
                                    sector as usize,
                                    &mut s.req,
                                    buf,
                                    &mut s.resp,
                                )
                            },
                        };
                        match r {
                            Ok(token) => self.dispatch.started(slot, token),
                            Err(VirtioError::QueueFull) => break,
                            Err(e) => {
                                println!("blkback: the virtqueue refused a request: {e:?}");
                                self.stats.failed_subs += 1;
                                // Not answered here: earlier pieces of the
                                // same request may have been reaped with
                                // their unmaps held back; `respond` does
                                // those unmaps first.
                                if let Some(d) = self.dispatch.ended_now(false) {
                                    self.reaped.push(d);
                                }
                            }
                        }
                    }
                }
            }
            self.notify.release();
            for k in 0..self.lists.len() {
                self.free_list(k);
            }
            self.lists.clear();
            libdom::virtio::release_claims();
        }

        /// Takes every completion in the used ring; returns how many. The
        /// ended backend requests wait in `reaped` for `respond`.
        fn reap(&mut self) -> u64 {
            let mut n = 0;
            // Strict DMA: the pages of every completion found here stay
            // mapped until the next call (`kick`'s) or `respond`, whichever
            // comes first, and are unmapped before any request is retired
            // (its grants unmapped, its response written).
            if self.held.is_none() {
                self.held = Some(libdom::virtio::UnmapBatch::begin());
            }
            let mut done = core::mem::take(&mut self.reaped);
            while let Some(token) = self.blk.peek_used() {
                let Some((slot, SubOp::Io { dir, addr, len, .. })) = self.dispatch.lookup(token)
                else {
                    self.broken = Some("the device completed a request we did not make");
                    break;
                };
                let s = &mut self.slots[slot];
                let r = match dir {
                    // SAFETY: the very buffers `kick` submitted with this
                    // token (found by it above), still held by their backend.
                    Direction::Read => unsafe {
                        let buf = core::slice::from_raw_parts_mut(addr as *mut u8, len as usize);
                        self.blk
                            .complete_read_blocks(token, &s.req, buf, &mut s.resp)
                    },
                    // SAFETY: as for the read.
                    Direction::Write => unsafe {
                        let buf = core::slice::from_raw_parts(addr as *const u8, len as usize);
                        self.blk
                            .complete_write_blocks(token, &s.req, buf, &mut s.resp)
                    },
                };
                if r.is_err() {
                    self.stats.failed_subs += 1;
                }
                n += 1;
                self.stats.completions += 1;
                if let Some(d) = self.dispatch.finish(slot, r.is_ok()) {
                    done.push(d);
                }
            }
            self.reaped = done;
            n
        }

        /// Strict DMA: unmaps what `reap` held back and `kick` did not take
        /// along (the IOTLB invalidated when this returns); then each
        /// backend retires its ended requests and is polled once.
        fn respond(&mut self) {
            if let Some(unmaps) = self.held.take() {
                unmaps.end();
            }
            if self.reaped.is_empty() {
                return;
            }
            let mut done = core::mem::take(&mut self.reaped);
            // Bit i: backend i retired a request (fronts <= MAX_VBDS).
            let mut retired = 0u64;
            for d in done.drain(..) {
                if let Some(f) = self.fronts.get_mut(d.backend) {
                    if let Some((page, _)) = f.ring.as_mut() {
                        if f.backend.retire(d.token, d.ok, page, &mut self.grants) {
                            retired |= 1 << d.backend;
                        }
                    }
                }
            }
            self.reaped = done;
            while retired != 0 {
                let i = retired.trailing_zeros() as usize;
                retired &= retired - 1;
                self.serve(i);
            }
        }

        fn retry_busy(&mut self) {
            for i in self.dispatch.take_busy() {
                self.serve(i);
            }
        }

        fn all_ended(&self) -> bool {
            self.fronts.iter().all(Frontend::ended) && self.dispatch.is_idle()
        }
    }

    /// After a refused map: does a grant copy of the ring get through?
    /// (The policy that refuses one should refuse the other.)
    fn probe_copy(grants: &mut DomGrants, vbd: &VbdInfo<'_>) -> i16 {
        let Some(page) = heap_page() else {
            return GrantStatus::General as i16;
        };
        let mut op = [CopyOp {
            src: CopyPtr {
                gref_or_page: u64::from(vbd.ring_gref),
                domid: vbd.peer,
                offset: 0,
            },
            dst: CopyPtr {
                gref_or_page: page / PAGE_SIZE,
                domid: DOMID_SELF,
                offset: 0,
            },
            len: 64,
            flags: copy_flags::SRC_GREF,
            status: GrantStatus::General as i16,
        }];
        let _ = grants.copy(&mut op);
        op[0].status
    }

    fn print_stats(f: &Frontend<'_>) {
        let s: &Stats = f.backend.stats();
        let ns = f.closed_ns.saturating_sub(f.connected_ns);
        let bytes = s.bytes_read + s.bytes_written;
        let phase = match f.phase {
            Phase::Closed => "closed",
            Phase::Refused(st) => st.name(),
            Phase::Serving => "serving",
            Phase::Unmapped => "never connected",
        };
        println!(
            "blkback: {} of domain {} ({phase}): {} requests ({} reads, {} writes, {} flushes, {} indirect), {} KiB read, {} KiB written in {} ms ({} KB/s)",
            f.vbd.name,
            f.vbd.peer,
            s.requests,
            s.reads,
            s.writes,
            s.flushes,
            s.indirect,
            s.bytes_read / 1024,
            s.bytes_written / 1024,
            ns / 1_000_000,
            bytes.saturating_mul(1_000_000) / ns.max(1)
        );
        let mut errs = alloc::string::String::new();
        for r in Reject::ALL {
            if s.errors(r) > 0 {
                errs.push_str(&format!(" {}={}", r.name(), s.errors(r)));
            }
        }
        println!(
            "blkback: {}: errors {}{errs}; grants: {} maps, {} unmaps ({} failed), {} persistent hits, {} copies; {} stalls ({} for the mapping quota), {} stale completions, {} hostile; {} polls, {} notifies",
            f.vbd.name,
            s.total_errors(),
            s.maps,
            s.unmaps,
            s.unmap_failures,
            s.persistent_hits,
            s.copies,
            s.stalls,
            s.map_waits,
            s.stale_completions,
            s.hostile,
            f.polls,
            f.notifies
        );
        let _ = event(&WorkDone {
            work: &format!("blkback-{}", f.vbd.peer),
            units: s.requests,
        });
    }

    /// Serves every vbd of `si` with role Back on `blk`, whose interrupts
    /// raise `dev_port`; `timer` is the domain's timer VIRQ port. Returns
    /// the exit status: 0 once every frontend has closed (or could never be
    /// reached), 1 on a broken device or bad args.
    pub fn run<H: Hal, T: Transport>(
        si: &libdom::StartInfo<'_>,
        blk: VirtIOBlk<H, Batched<T>>,
        notify: NotifyBatch<T>,
        dev_port: u16,
        timer: u16,
    ) -> i64 {
        let args = match ServeArgs::parse(si.args) {
            Ok(a) => a,
            Err(e) => {
                println!("blkback: args: {e}");
                return 1;
            }
        };
        let vbds = served(&si.vbds);
        if vbds.is_empty() {
            println!("blkback: serve=1, but the start info names no vbd this domain serves");
            return 1;
        }
        let capacity = blk.capacity();
        let maps = vbds.iter().filter(|v| v.mode == VbdMode::Map).count();
        let persistent = args.persistent.unwrap_or(persistent_budget(maps));
        let quota = map_quota(vbds.len(), maps, persistent);
        if maps > 0 && quota < blkif::MAX_SEGMENTS {
            println!(
                "blkback: persistent={persistent} over {maps} map vbds leaves {quota} grant mappings each for requests, fewer than {}; lower persistent",
                blkif::MAX_SEGMENTS
            );
            return 1;
        }
        let mut fronts = Vec::new();
        for v in &vbds {
            if v.first_sector
                .checked_add(v.sectors)
                .is_none_or(|e| e > capacity)
            {
                println!(
                    "blkback: {}: sectors {}..+{} are not all on the disk ({capacity} sectors)",
                    v.name, v.first_sector, v.sectors
                );
                return 1;
            }
            let bounce = match v.mode {
                VbdMode::Map => Vec::new(),
                VbdMode::Copy => {
                    let n = bounce_pages(args.indirect);
                    let pages: Option<Vec<u64>> = (0..n).map(|_| heap_page()).collect();
                    let Some(pages) = pages else {
                        println!(
                            "blkback: {}: no memory for {n} bounce pages (try indirect=0)",
                            v.name
                        );
                        return 1;
                    };
                    pages
                }
            };
            let backend = match Backend::new(config(v, args.indirect, persistent, quota, bounce)) {
                Ok(b) => b,
                Err(e) => {
                    println!("blkback: {}: {e}", v.name);
                    return 1;
                }
            };
            fronts.push(Frontend {
                vbd: *v,
                backend,
                ring: None,
                phase: Phase::Unmapped,
                connected_ns: 0,
                closed_ns: 0,
                notifies: 0,
                polls: 0,
            });
        }
        let depth = usize::from(blk.virt_queue_size());
        let mut srv = Server {
            blk,
            notify,
            // Room for every frontend's full ring of 11-segment requests
            // split into one virtio request per segment.
            dispatch: Dispatch::new(
                depth,
                fronts.len() * RING_SIZE as usize * blkif::MAX_SEGMENTS,
            ),
            slots: IoSlots::new(depth),
            grants: DomGrants::default(),
            fronts,
            stats: LoopStats::default(),
            broken: None,
            reaped: Vec::with_capacity(RING_SIZE as usize),
            held: None,
            strict: libdom::device::dma_mode() == abi::domain::DmaMode::Strict,
            lists: Vec::with_capacity(depth),
        };
        println!(
            "blkback: serving {} vbds ({} by grant map, {persistent} persistent grants and {quota} more mappings each; {} by grant copy), indirect up to {} segments (map vbds: {}), {depth} virtio descriptors",
            srv.fronts.len(),
            maps,
            srv.fronts.len() - maps,
            args.indirect,
            args.indirect.min(u16::try_from(quota).unwrap_or(u16::MAX))
        );
        let t0 = time_ns();
        for i in 0..srv.fronts.len() {
            srv.serve(i);
        }
        let mut safety_armed = false;
        // A turn: the completions reaped and the frontends' new requests
        // polled after the last `wait`, then `kick` (strict DMA: one call
        // maps the new requests' pages and unmaps the reaped ones'), then
        // the responses.
        while srv.broken.is_none() {
            srv.kick();
            srv.respond();
            srv.retry_busy();
            srv.kick();
            if srv.all_ended() {
                break;
            }
            if !srv.reaped.is_empty() {
                // `kick` ended requests without the device (a flush, a
                // refused request): answer them before waiting.
                continue;
            }
            if srv.dispatch.in_device() > 0 && !safety_armed {
                let _ = set_timer(time_ns() + SAFETY_POLL_NS);
                safety_armed = true;
            }
            let mut words = [0u64; PORT_WORDS];
            if let Err(e) = wait(&mut words, 0) {
                println!("blkback: wait: {}", e.name());
                return 1;
            }
            srv.stats.waits += 1;
            let p = Pending(words);
            if p.contains(timer) {
                safety_armed = false;
            }
            if p.contains(dev_port) {
                srv.stats.device_wakes += 1;
                if srv.reap() == 0 {
                    srv.stats.spurious += 1;
                }
            } else if p.contains(timer) {
                srv.stats.late += srv.reap();
            }
            for i in 0..srv.fronts.len() {
                if p.contains(srv.fronts[i].vbd.port) {
                    srv.serve(i);
                }
            }
        }
        srv.respond();
        let _ = set_timer(0);
        let ns = time_ns() - t0;
        if let Some(why) = srv.broken {
            println!("blkback: stopping: {why}");
        }
        for f in &srv.fronts {
            print_stats(f);
        }
        let d = srv.dispatch.stats();
        let l = &srv.stats;
        println!(
            "blkback: device: {} requests as {} virtio requests ({} completed, {} buffers merged, {} flushes taking {} us), at most {} in the device, {} busy refusals, {} failed; {} waits, {} device wakes ({} with nothing new), {} completions found without an interrupt; {} grant calls ({} copy ops); {} ms",
            d.requests,
            d.subs,
            l.completions,
            d.merged,
            d.flushes,
            l.flush_ns / 1000,
            d.max_in_device,
            d.busy,
            l.failed_subs,
            l.waits,
            l.device_wakes,
            l.spurious,
            l.late,
            srv.grants.calls,
            srv.grants.copy_ops,
            ns / 1_000_000
        );
        let unfinished = srv
            .fronts
            .iter()
            .filter(|f| f.backend.conn() != Conn::Closed && f.phase == Phase::Serving)
            .count();
        i64::from(srv.broken.is_some() || unfinished > 0)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use abi::domain::VbdInfo;
    use std::vec;

    fn io(sector: u64, dir: Direction, addr: u64, len: u32) -> SubOp {
        SubOp::Io {
            sector,
            dir,
            addr,
            len,
        }
    }

    fn buf(addr: u64, len: u32) -> Buf {
        Buf { addr, len }
    }

    #[test]
    fn args() {
        assert!(is_serve("serve=1"));
        assert!(is_serve("indirect=0 serve=1"));
        assert!(!is_serve("serve=0"));
        assert!(!is_serve("verify=0..64 pattern=A"));
        assert!(!is_serve("serve=1 junk"));
        assert_eq!(
            ServeArgs::parse("serve=1").unwrap(),
            ServeArgs {
                indirect: blkif::MAX_INDIRECT_SEGMENTS,
                persistent: None
            }
        );
        assert_eq!(
            ServeArgs::parse("serve=1 indirect=0 persistent=16").unwrap(),
            ServeArgs {
                indirect: 0,
                persistent: Some(16)
            }
        );
        assert_eq!(
            ServeArgs::parse("serve=1 indirect=257").unwrap_err(),
            ServeArgError::Indirect(257)
        );
        assert_eq!(
            ServeArgs::parse("serve=1 persistent=5000").unwrap_err(),
            ServeArgError::Persistent(5000)
        );
        assert!(matches!(
            ServeArgs::parse("serve=1 verify=0..4"),
            Err(ServeArgError::Args(ArgError::Unknown { key: "verify" }))
        ));
    }

    fn vbd(mode: VbdMode, role: VbdRole) -> VbdInfo<'static> {
        VbdInfo {
            name: "xvda",
            role,
            peer: 3,
            port: 5,
            ring_gref: 1,
            first_sector: 4096,
            sectors: 2048,
            readonly: true,
            mode,
        }
    }

    #[test]
    fn configs_from_vbds() {
        let c = config(&vbd(VbdMode::Map, VbdRole::Back), 256, 704, 3000, vec![]);
        assert_eq!(
            c,
            Config {
                frontend: 3,
                first_sector: 4096,
                sectors: 2048,
                read_only: true,
                path: DataPath::Map { persistent: 704 },
                max_indirect_segments: 256,
                map_quota: 3000,
            }
        );
        // A map vbd's INDIRECT limit stays within its quota; a copy vbd's
        // does not depend on it.
        let c = config(&vbd(VbdMode::Map, VbdRole::Back), 256, 448, 62, vec![]);
        assert_eq!((c.max_indirect_segments, c.map_quota), (62, 62));
        let c = config(&vbd(VbdMode::Copy, VbdRole::Back), 256, 448, 62, vec![]);
        assert_eq!(c.max_indirect_segments, 256);
        let pages: Vec<u64> = (0..bounce_pages(0) as u64)
            .map(|i| 0x50_0000 + i * 4096)
            .collect();
        let c = config(&vbd(VbdMode::Copy, VbdRole::Back), 0, 704, 0, pages.clone());
        assert_eq!(c.path, DataPath::Copy { bounce: pages });
        assert_eq!(c.bounce_pages_needed(), bounce_pages(0));
        assert!(blkback::Backend::new(c).is_ok());
        assert_eq!(bounce_pages(256), 257);
        let c = config(
            &vbd(VbdMode::Copy, VbdRole::Back),
            256,
            0,
            0,
            vec![0x1000; 12],
        );
        assert!(blkback::Backend::new(c).is_err());
        // Only the vbds this domain serves.
        let mut list = [None; abi::domain::MAX_VBDS];
        list[0] = Some(vbd(VbdMode::Map, VbdRole::Front));
        list[2] = Some(vbd(VbdMode::Copy, VbdRole::Back));
        let s = served(&list);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].mode, VbdMode::Copy);
        // Persistent grants share the domain's mappings.
        assert_eq!(persistent_budget(0), PERSISTENT_PER_FRONTEND);
        assert_eq!(persistent_budget(2), PERSISTENT_PER_FRONTEND);
        assert_eq!(persistent_budget(8), PERSISTENT_TOTAL / 8);
        assert!(persistent_budget(8) * 8 <= PERSISTENT_TOTAL);
        // What is left is split among the map vbds, after the rings and
        // one segment-list page each; with the default budget every map
        // vbd can take a full request (11 segments) and then some.
        assert_eq!(map_quota(1, 1, 704), MAX_MAPS - 1 - 705);
        assert_eq!(
            map_quota(8, 8, persistent_budget(8)),
            (MAX_MAPS - 8 - 8 * 449) / 8
        );
        assert_eq!(map_quota(8, 8, persistent_budget(8)), 62);
        for vbds in 1..=abi::domain::MAX_VBDS {
            for maps in 1..=vbds {
                let p = persistent_budget(maps);
                let q = map_quota(vbds, maps, p);
                assert!(q >= 62, "{vbds} {maps}");
                assert!(vbds + maps * (p + 1 + q) <= MAX_MAPS, "{vbds} {maps}");
            }
        }
        // An overcommitted persistent= leaves nothing (run refuses it).
        assert_eq!(map_quota(2, 2, 3584), 0);
    }

    #[test]
    fn window_hands_out_pages_once() {
        let mut w = Window::new(GRANT_WINDOW, 3 * PAGE_SIZE);
        let a = w.alloc().unwrap();
        let b = w.alloc().unwrap();
        let c = w.alloc().unwrap();
        assert_eq!(
            (a, b, c),
            (GRANT_WINDOW, GRANT_WINDOW + 4096, GRANT_WINDOW + 8192)
        );
        assert_eq!(w.alloc(), None);
        w.free(b);
        assert_eq!(w.alloc(), Some(b));
        assert_eq!(w.alloc(), None);
        let mut d = Window::default();
        assert_eq!(d.alloc(), Some(GRANT_WINDOW));
    }

    #[test]
    fn runs_merge_and_complete_their_request() {
        let mut d = Dispatch::new(16, 64);
        // Four segments: two contiguous full pages, then a gap, then a
        // partial one.
        let bufs = [
            buf(0x8000_0000, 4096),
            buf(0x8000_1000, 4096),
            buf(0x8000_5200, 1024),
            buf(0x8000_3000, 512),
        ];
        d.submit(0, 77, 100, Direction::Read, &bufs).unwrap();
        assert_eq!(d.queued(), 3);
        assert_eq!(d.stats().merged, 1);
        let mut got = vec![];
        while let Some((slot, op)) = d.next() {
            got.push(op);
            d.started(slot, 10 + slot as u16);
        }
        assert_eq!(
            got,
            [
                io(100, Direction::Read, 0x8000_0000, 8192),
                io(116, Direction::Read, 0x8000_5200, 1024),
                io(118, Direction::Read, 0x8000_3000, 512),
            ]
        );
        assert_eq!(d.in_device(), 3);
        assert_eq!(d.lookup(11), Some((1, got[1])));
        assert_eq!(d.lookup(99), None);
        assert_eq!(d.lookup(9), None);
        // Completions in any order; the request ends with the last.
        assert_eq!(d.finish(1, true), None);
        assert_eq!(d.finish(0, true), None);
        assert_eq!(
            d.finish(2, true),
            Some(Done {
                backend: 0,
                token: 77,
                ok: true
            })
        );
        assert!(d.is_idle());
        assert_eq!(d.pending(), 0);
        assert_eq!(d.finish(2, true), None);
        // An ended request's token finds nothing.
        assert_eq!(d.lookup(12), None);
    }

    #[test]
    fn one_failed_run_fails_the_request() {
        let mut d = Dispatch::new(16, 64);
        d.submit(
            2,
            5,
            0,
            Direction::Write,
            &[buf(0x1000, 512), buf(0x3000, 512)],
        )
        .unwrap();
        let (s0, _) = d.next().unwrap();
        d.started(s0, 0);
        let (s1, _) = d.next().unwrap();
        d.started(s1, 3);
        assert_eq!(d.finish(s0, false), None);
        assert_eq!(
            d.finish(s1, true),
            Some(Done {
                backend: 2,
                token: 5,
                ok: false
            })
        );
    }

    #[test]
    fn tokens_go_back_to_their_backend() {
        let mut d = Dispatch::new(4, 64);
        for (be, tok) in [(0, 100u64), (1, 200), (0, 101), (2, 300)] {
            d.submit(be, tok, tok, Direction::Read, &[buf(tok << 12, 4096)])
                .unwrap();
        }
        // The device reuses descriptor indices as tokens; slots are ours.
        let mut vt = 0;
        while let Some((slot, _)) = d.next() {
            d.started(slot, vt);
            vt += 3;
        }
        assert_eq!(d.in_device(), 4);
        let mut ended = vec![];
        for t in [9u16, 0, 6, 3] {
            let (slot, op) = d.lookup(t).unwrap();
            let SubOp::Io { sector, .. } = op else {
                panic!()
            };
            let done = d.finish(slot, true).unwrap();
            assert_eq!(done.token, sector);
            ended.push((done.backend, done.token));
        }
        assert_eq!(ended, [(2, 300), (0, 100), (0, 101), (1, 200)]);
    }

    #[test]
    fn slots_limit_what_starts() {
        let mut d = Dispatch::new(2, 64);
        for t in 0..3u64 {
            d.submit(
                0,
                t,
                t * 8,
                Direction::Read,
                &[buf(0x10_0000 + t * 0x2000, 4096)],
            )
            .unwrap();
        }
        let (a, _) = d.next().unwrap();
        d.started(a, 0);
        let (b, _) = d.next().unwrap();
        d.started(b, 1);
        assert_eq!(d.next(), None);
        assert_eq!(d.stats().max_in_device, 2);
        assert!(d.finish(a, true).is_some());
        let (c, op) = d.next().unwrap();
        assert_eq!(c, a);
        assert_eq!(op, io(16, Direction::Read, 0x10_4000, 4096));
    }

    #[test]
    fn upcoming_is_what_next_offers_as_requests_start() {
        let mut d = Dispatch::new(3, 64);
        for t in 0..2u64 {
            d.submit(
                0,
                t,
                t * 8,
                Direction::Read,
                &[buf(0x10_0000 + t * 0x2000, 4096)],
            )
            .unwrap();
        }
        d.flush(0, 9).unwrap();
        d.submit(0, 3, 64, Direction::Read, &[buf(0x20_0000, 4096)])
            .unwrap();
        let (a, _) = d.next().unwrap();
        d.started(a, 0);
        // Two I/O requests before the flush, one of them started: the other,
        // with the slot it gets.
        let ahead: Vec<_> = d.upcoming().collect();
        assert_eq!(ahead.len(), 1);
        assert_eq!(Some(ahead[0]), d.next());
        let (b, _) = d.next().unwrap();
        d.started(b, 1);
        // The flush stops it.
        assert_eq!(d.upcoming().count(), 0);
        // Fewer free slots than queued requests: as many as there are slots.
        let mut d = Dispatch::new(2, 64);
        for t in 0..4u64 {
            d.submit(
                0,
                t,
                t * 8,
                Direction::Read,
                &[buf(0x10_0000 + t * 0x2000, 4096)],
            )
            .unwrap();
        }
        let ahead: Vec<_> = d.upcoming().collect();
        assert_eq!(ahead.len(), 2);
        for (i, want) in ahead.into_iter().enumerate() {
            assert_eq!(d.next(), Some(want));
            d.started(want.0, i as u16);
        }
        assert_eq!(d.next(), None);
    }

    #[test]
    fn a_flush_is_a_barrier() {
        let mut d = Dispatch::new(8, 64);
        d.submit(0, 1, 0, Direction::Write, &[buf(0x1000, 4096)])
            .unwrap();
        d.flush(1, 2).unwrap();
        d.submit(0, 3, 8, Direction::Write, &[buf(0x3000, 4096)])
            .unwrap();
        let (s, _) = d.next().unwrap();
        d.started(s, 0);
        // The flush waits for the write before it...
        assert_eq!(d.next(), None);
        assert!(d.finish(s, true).is_some());
        // ...then runs alone, and what follows waits for it.
        let (_, op) = d.next().unwrap();
        assert_eq!(op, SubOp::Flush);
        assert_eq!(
            d.ended_now(true),
            Some(Done {
                backend: 1,
                token: 2,
                ok: true
            })
        );
        let (_, op) = d.next().unwrap();
        assert_eq!(op, io(8, Direction::Write, 0x3000, 4096));
        assert_eq!(d.stats().flushes, 1);
    }

    #[test]
    fn a_full_queue_says_busy_and_remembers_who() {
        let mut d = Dispatch::new(1, 2);
        // An empty queue takes any request, however many runs.
        let many: Vec<Buf> = (0..4).map(|i| buf(0x1000 + i * 0x2000, 512)).collect();
        d.submit(0, 1, 0, Direction::Read, &many).unwrap();
        assert_eq!(d.queued(), 4);
        assert_eq!(
            d.submit(1, 2, 0, Direction::Read, &[buf(0x9000, 512)]),
            Err(DeviceError::Busy)
        );
        assert_eq!(d.flush(1, 3), Err(DeviceError::Busy));
        assert_eq!(d.stats().busy, 2);
        // A refused request leaves nothing behind.
        assert_eq!(d.queued(), 4);
        assert_eq!(d.pending(), 1);
        assert_eq!(
            d.submit(
                0,
                4,
                0,
                Direction::Read,
                &[buf(0x9000, 512), buf(0xa000, 100)]
            ),
            Err(DeviceError::Failed)
        );
        assert_eq!(d.queued(), 4);
        assert_eq!(d.take_busy(), [1]);
        assert!(d.take_busy().is_empty());
        // Bad buffers fail at once.
        let mut e = Dispatch::new(1, 2);
        assert_eq!(
            e.submit(0, 1, 0, Direction::Read, &[]),
            Err(DeviceError::Failed)
        );
        assert_eq!(
            e.submit(0, 1, 0, Direction::Read, &[buf(0x1000, 100)]),
            Err(DeviceError::Failed)
        );
        assert!(e.is_idle());
    }

    #[test]
    fn requests_refused_by_the_queue_end_at_once() {
        let mut d = Dispatch::new(4, 64);
        d.submit(
            3,
            9,
            0,
            Direction::Read,
            &[buf(0x1000, 512), buf(0x4000, 512)],
        )
        .unwrap();
        assert_eq!(d.ended_now(false), None);
        assert_eq!(
            d.ended_now(true),
            Some(Done {
                backend: 3,
                token: 9,
                ok: false
            })
        );
        assert_eq!(d.ended_now(true), None);
    }

    /// blkback over the dispatcher, with a fake disk that completes what
    /// the dispatcher starts: tokens of several backends end up where
    /// they came from.
    #[test]
    fn two_backends_share_the_dispatcher() {
        use abi::blkif::{op, Request, Response, Segment, ENTRY_SIZE, RESPONSE_SIZE};
        use abi::grant::{CopyOp, Status as GrantStatus};
        use abi::ring::{FrontRing, State};
        use blkback::{Backend, Grants, Mapping};
        use std::collections::BTreeMap;

        /// Frontend pages by (domain, gref), mapped at their own address.
        #[derive(Default)]
        struct FakeGrants {
            next: u64,
            pages: BTreeMap<u64, [u8; 4096]>,
        }
        impl Grants for FakeGrants {
            fn map(&mut self, dom: u16, gref: u32, _ro: bool) -> Result<Mapping, GrantStatus> {
                self.next += 1;
                let addr = (u64::from(dom) << 32) | u64::from(gref) << 12;
                self.pages.entry(addr).or_insert([0; 4096]);
                Ok(Mapping {
                    handle: self.next as u32,
                    addr,
                })
            }
            fn unmap(&mut self, _m: Mapping) -> Result<(), GrantStatus> {
                Ok(())
            }
            fn copy(&mut self, _ops: &mut [CopyOp]) -> Result<(), GrantStatus> {
                Err(GrantStatus::General)
            }
            fn read(&self, addr: u64, buf: &mut [u8]) {
                let page = &self.pages[&(addr & !0xfff)];
                let o = (addr & 0xfff) as usize;
                buf.copy_from_slice(&page[o..o + buf.len()]);
            }
        }

        let mut grants = FakeGrants::default();
        let mut disk = vec![0u8; 64 * 512];
        for (i, b) in disk.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        let mut d = Dispatch::new(3, 64);
        let mut rings: Vec<([u8; 4096], FrontRing, Backend)> = (0..2u16)
            .map(|i| {
                let mut page = [0u8; 4096];
                let f = FrontRing::init(&mut page, ENTRY_SIZE);
                f.set_state(&mut page, State::Connected);
                let v = VbdInfo {
                    peer: 10 + i,
                    first_sector: 32 * u64::from(i),
                    sectors: 32,
                    readonly: false,
                    ..vbd(VbdMode::Map, VbdRole::Back)
                };
                let b = Backend::new(config(&v, 0, 8, usize::MAX, vec![])).unwrap();
                (page, f, b)
            })
            .collect();
        // Each frontend reads 4 requests of 2 segments (8 sectors: its
        // sectors 4k..4k+8).
        for (page, f, _) in rings.iter_mut() {
            for k in 0..4u64 {
                let mut r = Request {
                    operation: op::READ,
                    nr_segments: 2,
                    id: k,
                    sector: 8 * k,
                    ..Request::default()
                };
                r.seg[0] = Segment {
                    gref: (2 * k + 8) as u32,
                    first_sect: 0,
                    last_sect: 3,
                };
                r.seg[1] = Segment {
                    gref: (2 * k + 9) as u32,
                    first_sect: 4,
                    last_sect: 7,
                };
                f.put_request(page, &r.encode()).unwrap();
            }
            f.push_requests(page);
        }
        for (i, (page, _, b)) in rings.iter_mut().enumerate() {
            let mut dev = Dev {
                dispatch: &mut d,
                backend: i,
            };
            b.poll(page, &mut grants, &mut dev);
        }
        // The "device": start what fits, complete the oldest, repeat.
        let mut vt = 0u16;
        let mut out: std::collections::VecDeque<(u16, usize, SubOp)> = Default::default();
        loop {
            while let Some((slot, op)) = d.next() {
                d.started(slot, vt);
                out.push_back((vt, slot, op));
                vt = vt.wrapping_add(1);
            }
            let Some((t, slot, op)) = out.pop_front() else {
                break;
            };
            assert_eq!(d.lookup(t).map(|x| x.0), Some(slot));
            if let SubOp::Io {
                sector, addr, len, ..
            } = op
            {
                let page = grants.pages.get_mut(&(addr & !0xfff)).unwrap();
                let o = (addr & 0xfff) as usize;
                let s = sector as usize * 512;
                page[o..o + len as usize].copy_from_slice(&disk[s..s + len as usize]);
            }
            if let Some(done) = d.finish(slot, true) {
                let (page, _, b) = &mut rings[done.backend];
                let mut dev = Dev {
                    dispatch: &mut d,
                    backend: done.backend,
                };
                b.complete(done.token, done.ok, page, &mut grants, &mut dev);
            }
        }
        assert!(d.is_idle());
        for (i, (page, f, b)) in rings.iter_mut().enumerate() {
            let mut seen = 0;
            let mut rsp = [0u8; RESPONSE_SIZE];
            while f.take_response(page, &mut rsp).unwrap() {
                let r = Response::decode(&rsp);
                assert_eq!(r.status, 0);
                seen += 1;
            }
            assert_eq!(seen, 4);
            assert_eq!(b.stats().reads, 4);
            // Frontend i's request k, segment 1 holds disk sectors
            // 32i + 8k + 4 .. +4 at offset 2048 of its page.
            for k in 0..4u64 {
                let addr = ((10 + i as u64) << 32) | (2 * k + 9) << 12;
                let p = &grants.pages[&addr];
                assert_eq!(p[2048], (32 * i as u64 + 8 * k + 4) as u8);
                assert_eq!(p[4095], (32 * i as u64 + 8 * k + 7) as u8);
            }
        }
    }
}
