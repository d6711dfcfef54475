//! airlock's own virtio-blk driver, on virtio-drivers' `VirtQueue` and
//! `Transport` (both public), for the blk driver domain's two modes.
//!
//! Why not virtio-drivers' `VirtIOBlk`: its queue has 16 descriptors and it
//! allocates (and zeroes) an indirect descriptor list on the heap inside
//! every request, which in strict DMA mode lands on a general heap page the
//! device can then read; it takes one data buffer per request; and its only
//! flush spins on the used ring. Here:
//!
//! - **Direct descriptors only**, never indirect: nothing is allocated per
//!   request. A request is a chain of one header descriptor (read by the
//!   device), one descriptor per data buffer (scatter-gather, up to
//!   [`VirtioBlk::max_segs`]) and one status descriptor (written by the
//!   device): [`Layout`]. The queue has `SIZE` descriptors (the device
//!   must offer at least that many).
//! - **Per-slot headers and statuses** ([`SlotMem`]) on page-aligned pages
//!   of their own, made once and freed only when the driver is dropped, so
//!   a request's header and status never move while it is in the device.
//!   The pages are shared with the device once, for the driver's life (in
//!   strict DMA mode libdom's Hal then keeps them mapped, and the per
//!   request `share` of a header or status costs no call); they hold
//!   nothing but headers and statuses.
//! - **Nothing blocks**: a flush is a request like a read ([`Op::Flush`]),
//!   submitted with [`VirtioBlk::submit`] and found by [`VirtioBlk::pop`].
//! - **One notification per batch**: `submit` only adds; [`VirtioBlk::notify`]
//!   tells the device once (unless it asked not to be told, `should_notify`).
//! - **The device is untrusted**: every used entry is checked before it is
//!   believed. A token (descriptor head) that no request of ours holds
//!   breaks the driver ([`Broken`]: the used ring cannot be advanced past
//!   it, so nothing more can be taken from it); a used length longer than
//!   what the device may write, or a status other than OK/IOERR/UNSUPP, is
//!   counted ([`BadCounts`]) and answered as that request's error. Nothing
//!   the device writes can make the driver panic.
//!
//! VIRTIO_RING_F_EVENT_IDX is not negotiated: virtio-drivers 0.13's
//! `should_notify` compares the event index without wrapping, so after
//! 65536 requests it could skip a notification the device waits for. With
//! the plain flags the device says "don't notify" while it is working
//! through the queue, and re-checks the ring before it stops.
//!
//! The pure parts ([`Layout`], [`check`], [`Table`]) are tested on the host.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::mem::MaybeUninit;
use core::ptr::NonNull;

use bitflags::bitflags;
use blkback::Buf;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;
use virtio_drivers::{BufferDirection, Hal};

/// Bytes in a sector (virtio-blk's unit of `sector` and of lengths).
pub const SECTOR: u64 = 512;

/// Data buffers one request may carry at most, whatever the device's
/// SEG_MAX: the completion path builds its buffer lists on the stack.
pub const MAX_SEGS: usize = 64;

/// The queue size the blk driver domain asks for, the most QEMU 7.2's
/// virtio-blk offers. Descriptors are direct, so this bounds the requests
/// in the device by their buffers: 85 single-buffer reads, or 14 requests
/// of 16 pages none of which is contiguous with the next (18 descriptors
/// each).
pub const QUEUE_SIZE: usize = 256;

/// The queue index of virtio-blk's one request queue.
const QUEUE: u16 = 0;

bitflags! {
    /// virtio-blk feature bits (virtio 1.2, 5.2.3) and the ring bits this
    /// driver knows.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Features: u64 {
        const SIZE_MAX = 1 << 1;
        const SEG_MAX = 1 << 2;
        const GEOMETRY = 1 << 4;
        const RO = 1 << 5;
        const BLK_SIZE = 1 << 6;
        const FLUSH = 1 << 9;
        const TOPOLOGY = 1 << 10;
        const CONFIG_WCE = 1 << 11;
        const RING_INDIRECT_DESC = 1 << 28;
        const RING_EVENT_IDX = 1 << 29;
        const VERSION_1 = 1 << 32;
    }
}

/// What this driver accepts: read-only disks, SEG_MAX, FLUSH, and virtio 1.
/// (ACCESS_PLATFORM is added by libdom's transport wrapper.)
pub const SUPPORTED: Features = Features::RO
    .union(Features::SEG_MAX)
    .union(Features::FLUSH)
    .union(Features::VERSION_1);

/// Request types (virtio 1.2, 5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

/// Status values the device writes (5.2.6).
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// What the status byte holds before the device writes it.
const S_UNSET: u8 = 0xff;

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Disk to the buffers.
    Read,
    /// The buffers to the disk.
    Write,
    /// Everything written before is on stable storage when it completes.
    Flush,
}

/// Why [`VirtioBlk::submit`] did not take a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// No room in the queue now: try again after a completion.
    Full,
    /// The request is malformed (no buffers for I/O, buffers for a flush,
    /// an empty or partial-sector buffer, more than `max_segs` buffers, a
    /// range past the disk's end, a write to a read-only disk); it would
    /// never be taken.
    Invalid,
    /// The driver is broken ([`Broken`]).
    Broken,
}

/// Why the driver stopped: the device broke the queue's rules in a way no
/// single request can absorb.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// The used ring names a descriptor that is not the head of a request
    /// in the device: the ring cannot be advanced past it.
    UnknownToken(u16),
    /// The used ring changed under the driver while it took an entry.
    Queue,
}

/// What one request's completion says, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// The device reports an I/O error.
    IoErr,
    /// The device does not support the request.
    Unsupp,
    /// A status byte virtio does not define (counted).
    BadStatus(u8),
    /// A used length longer than what the device may write (counted).
    BadLength(u32),
}

impl Status {
    pub fn is_ok(self) -> bool {
        self == Status::Ok
    }
}

/// A request that left the device: its caller's `tag` and what happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    pub status: Status,
}

/// Bad values the device reported, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BadCounts {
    pub status: u64,
    pub length: u64,
    pub token: u64,
}

/// The request a submission describes, checked: its header and how many
/// descriptors and device-writable bytes it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The 16-byte `virtio_blk_req` header: type, reserved, sector (LE).
    pub header: [u8; 16],
    /// Descriptors: header, one per buffer, status.
    pub descs: usize,
    /// Data bytes (0 for a flush).
    pub data: u64,
    /// Bytes the device may write: the data of a read, and the status.
    pub writable: u64,
}

impl Layout {
    /// The layout of `op` at `sector` over `bufs`, or `Invalid` (see
    /// [`SubmitError::Invalid`]) on a disk of `capacity` sectors taking at
    /// most `max_segs` buffers per request.
    pub fn new(
        op: Op,
        sector: u64,
        bufs: &[Buf],
        max_segs: usize,
        capacity: u64,
        readonly: bool,
    ) -> Result<Layout, SubmitError> {
        let ty = match op {
            Op::Read => T_IN,
            Op::Write if readonly => return Err(SubmitError::Invalid),
            Op::Write => T_OUT,
            Op::Flush => T_FLUSH,
        };
        let io = op != Op::Flush;
        if io == bufs.is_empty() || bufs.len() > max_segs.min(MAX_SEGS) {
            return Err(SubmitError::Invalid);
        }
        let mut data = 0u64;
        for b in bufs {
            if b.len == 0 || u64::from(b.len) % SECTOR != 0 {
                return Err(SubmitError::Invalid);
            }
            data += u64::from(b.len);
        }
        if io
            && sector
                .checked_add(data / SECTOR)
                .is_none_or(|end| end > capacity)
        {
            return Err(SubmitError::Invalid);
        }
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&ty.to_le_bytes());
        // A flush's sector is reserved: 0.
        let sector = if io { sector } else { 0 };
        header[8..].copy_from_slice(&sector.to_le_bytes());
        Ok(Layout {
            header,
            descs: bufs.len() + 2,
            data,
            writable: 1 + if op == Op::Read { data } else { 0 },
        })
    }
}

/// What a completion says, given what the request was: `used_len` (the
/// device's claim of bytes written) must not exceed `writable`, and the
/// status must be one virtio defines. Shorter lengths are accepted: the
/// length is advisory for virtio-blk (Linux ignores it) and the status
/// byte is what says whether the data is there.
pub fn check(writable: u64, used_len: u32, status: u8) -> Status {
    if u64::from(used_len) > writable {
        return Status::BadLength(used_len);
    }
    match status {
        S_OK => Status::Ok,
        S_IOERR => Status::IoErr,
        S_UNSUPP => Status::Unsupp,
        s => Status::BadStatus(s),
    }
}

/// A request in the device, as its slot remembers it.
#[derive(Clone, Debug, Default)]
struct InFlight {
    token: u16,
    tag: u64,
    /// The data buffers, in order (kept to hand the same buffers back to
    /// `pop_used`); the vector keeps its capacity between requests.
    bufs: Vec<Buf>,
    read: bool,
    writable: u64,
    busy: bool,
}

/// The driver's bookkeeping of slots (a request's header and status) and
/// tokens: which slot a token names, which slots are free. Allocates only
/// until each slot's buffer list has held its largest request.
#[derive(Debug)]
pub struct Table {
    slots: Vec<InFlight>,
    /// Free slots; the next one to use last.
    free: Vec<u16>,
    /// `by_token[t]`: 1 + the slot of the request whose chain starts at
    /// descriptor `t` (0: none). As long as the queue.
    by_token: Vec<u16>,
}

impl Table {
    /// `slots` slots (at most 65535) for a queue of `size` descriptors.
    pub fn new(slots: usize, size: usize) -> Table {
        let slots = slots.min(usize::from(u16::MAX));
        Table {
            slots: (0..slots).map(|_| InFlight::default()).collect(),
            free: (0..slots as u16).rev().collect(),
            by_token: alloc::vec![0; size],
        }
    }

    /// A free slot, taken; `None` if every slot is in use.
    pub fn alloc(&mut self) -> Option<usize> {
        self.free.pop().map(usize::from)
    }

    /// Gives back a slot [`Table::alloc`] gave that never went into the
    /// device.
    pub fn cancel(&mut self, slot: usize) {
        if self.slots.get(slot).is_some_and(|s| !s.busy) && !self.free.contains(&(slot as u16)) {
            self.free.push(slot as u16);
        }
    }

    /// `slot` went into the device as chain `token`, over `bufs` (copied).
    pub fn start(
        &mut self,
        slot: usize,
        token: u16,
        tag: u64,
        bufs: &[Buf],
        read: bool,
        writable: u64,
    ) {
        if let Some(list) = self.begin(slot, token, tag, read, writable) {
            list.clear();
            list.extend_from_slice(bufs);
        }
    }

    /// As [`Table::start`], but the slot takes over `bufs` itself; `bufs`
    /// is then the list the slot held before, emptied (its capacity kept,
    /// for the caller's next request). Unchanged if `slot` or `token` is
    /// out of range.
    pub fn start_owned(
        &mut self,
        slot: usize,
        token: u16,
        tag: u64,
        bufs: &mut Vec<Buf>,
        read: bool,
        writable: u64,
    ) {
        if let Some(list) = self.begin(slot, token, tag, read, writable) {
            core::mem::swap(list, bufs);
            bufs.clear();
        }
    }

    /// Marks `slot` busy as chain `token`; its buffer list, to set.
    #[inline]
    fn begin(
        &mut self,
        slot: usize,
        token: u16,
        tag: u64,
        read: bool,
        writable: u64,
    ) -> Option<&mut Vec<Buf>> {
        let (Some(s), Some(t)) = (
            self.slots.get_mut(slot),
            self.by_token.get_mut(usize::from(token)),
        ) else {
            return None;
        };
        s.token = token;
        s.tag = tag;
        s.read = read;
        s.writable = writable;
        s.busy = true;
        // no overflow: slots <= u16::MAX (`new`)
        *t = slot as u16 + 1;
        Some(&mut s.bufs)
    }

    /// The slot of the request in the device whose chain starts at `token`
    /// (anything the device says), if there is one.
    pub fn lookup(&self, token: u16) -> Option<usize> {
        let slot = usize::from(*self.by_token.get(usize::from(token))?).checked_sub(1)?;
        let s = self.slots.get(slot)?;
        (s.busy && s.token == token).then_some(slot)
    }

    /// The request in `slot` left the device: its tag and writable bytes;
    /// the slot is free again.
    pub fn finish(&mut self, slot: usize) -> Option<(u64, u64)> {
        let s = self.slots.get_mut(slot).filter(|s| s.busy)?;
        s.busy = false;
        if let Some(t) = self.by_token.get_mut(usize::from(s.token)) {
            *t = 0;
        }
        self.free.push(slot as u16);
        Some((s.tag, s.writable))
    }

    /// Requests in the device.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn get(&self, slot: usize) -> Option<&InFlight> {
        self.slots.get(slot).filter(|s| s.busy)
    }
}

/// One request's memory the device sees: its header (read) and its status
/// byte (written). 32 bytes, so 128 to a page.
#[repr(C, align(32))]
struct SlotMem {
    header: [u8; 16],
    status: u8,
}

const SLOTS_PER_PAGE: usize = 4096 / core::mem::size_of::<SlotMem>();

/// A page of [`SlotMem`]s and nothing else.
#[repr(C, align(4096))]
struct SlotPage([SlotMem; SLOTS_PER_PAGE]);

const _: () = assert!(core::mem::size_of::<SlotPage>() == 4096);

/// The slot pages: allocated once by `new`, freed by `Drop`, never moved in
/// between; only reached through raw pointers (the device writes them).
struct SlotPages<H: Hal> {
    base: NonNull<SlotPage>,
    pages: usize,
    /// The I/O address `H::share` gave for the whole run, for `unshare`.
    iova: u64,
    _hal: core::marker::PhantomData<H>,
}

impl<H: Hal> SlotPages<H> {
    fn new(slots: usize) -> SlotPages<H> {
        let pages = slots.div_ceil(SLOTS_PER_PAGE).max(1);
        let b: Box<[SlotPage]> = (0..pages)
            .map(|_| {
                SlotPage(core::array::from_fn(|_| SlotMem {
                    header: [0; 16],
                    status: S_UNSET,
                }))
            })
            .collect();
        let base = NonNull::from(Box::leak(b)).cast::<SlotPage>();
        let bytes = NonNull::slice_from_raw_parts(base.cast::<u8>(), pages * 4096);
        // SAFETY: `bytes` is the pages just leaked, valid until `Drop`
        // gives them back, which unshares them first. The device may write
        // them from now on; this driver only reaches them through raw
        // pointers (volatile accesses) and the slices it hands the queue.
        let iova = unsafe { H::share(bytes, BufferDirection::DeviceToDriver) };
        SlotPages {
            base,
            pages,
            iova,
            _hal: core::marker::PhantomData,
        }
    }

    fn slot(&self, i: usize) -> *mut SlotMem {
        debug_assert!(i < self.pages * SLOTS_PER_PAGE);
        // SAFETY: `i` is a slot of the table, which has at most
        // `pages * SLOTS_PER_PAGE` slots (`VirtioBlk::new`), so the
        // pointer stays inside the allocation.
        unsafe { self.base.cast::<SlotMem>().as_ptr().add(i) }
    }

    fn header(&self, i: usize) -> *mut u8 {
        // SAFETY: inside slot `i` (see `slot`); no reference is made.
        unsafe { core::ptr::addr_of_mut!((*self.slot(i)).header).cast() }
    }

    fn status(&self, i: usize) -> *mut u8 {
        // SAFETY: as for `header`.
        unsafe { core::ptr::addr_of_mut!((*self.slot(i)).status) }
    }
}

impl<H: Hal> Drop for SlotPages<H> {
    fn drop(&mut self) {
        let bytes = NonNull::slice_from_raw_parts(self.base.cast::<u8>(), self.pages * 4096);
        // SAFETY: shared in `new` with this address; the queue (dropped
        // before, see `VirtioBlk`'s field order) no longer names them.
        unsafe { H::unshare(self.iova, bytes, BufferDirection::DeviceToDriver) };
        let slice = core::ptr::slice_from_raw_parts_mut(self.base.as_ptr(), self.pages);
        // SAFETY: the box leaked in `new`, given back once.
        drop(unsafe { Box::from_raw(slice) });
    }
}

/// Counters of the driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub submitted: u64,
    pub completed: u64,
    pub notifies: u64,
    /// Submissions refused with `Full`.
    pub full: u64,
    pub bad: BadCounts,
}

/// virtio-blk over a queue of `SIZE` descriptors.
///
/// Invariants: a slot is in the [`Table`] as busy exactly while its chain is
/// in the queue (from `add` to `pop_used`); its data buffers, header and
/// status stay where they are until then (the caller's promise for the
/// data, the slot pages for the rest).
pub struct VirtioBlk<H: Hal, T: Transport, const SIZE: usize> {
    // Field order is drop order: the queue before the slot pages it names.
    queue: Box<VirtQueue<H, SIZE>>,
    transport: T,
    mem: SlotPages<H>,
    table: Table,
    capacity: u64,
    features: Features,
    max_segs: usize,
    /// Requests added since the last notification.
    unnotified: bool,
    broken: Option<Broken>,
    stats: Stats,
}

/// Why [`VirtioBlk::new`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    /// The device's queue is smaller than `SIZE` (its largest).
    QueueTooSmall(u32),
    Virtio(virtio_drivers::Error),
}

impl<H: Hal, T: Transport, const SIZE: usize> VirtioBlk<H, T, SIZE> {
    /// Initialises the device on `transport`: features, capacity and
    /// SEG_MAX, the queue, DRIVER_OK.
    pub fn new(mut transport: T) -> Result<Self, InitError> {
        let features = transport.begin_init(SUPPORTED);
        let (capacity, seg_max) = transport
            .read_consistent(|| {
                let lo: u32 = transport.read_config_space(0)?;
                let hi: u32 = transport.read_config_space(4)?;
                let seg_max: u32 = if features.contains(Features::SEG_MAX) {
                    transport.read_config_space(12)?
                } else {
                    0
                };
                Ok((u64::from(lo) | u64::from(hi) << 32, seg_max))
            })
            .map_err(InitError::Virtio)?;
        let max = transport.max_queue_size(QUEUE);
        if max < SIZE as u32 {
            return Err(InitError::QueueTooSmall(max));
        }
        let queue = Box::new(
            VirtQueue::<H, SIZE>::new(&mut transport, QUEUE, false, false)
                .map_err(InitError::Virtio)?,
        );
        transport.finish_init();
        // Without SEG_MAX the device promises nothing past one buffer
        // (Linux's choice too); a SEG_MAX of 0 is read the same way.
        let max_segs = (seg_max as usize).clamp(1, MAX_SEGS.min(SIZE - 2));
        // A flush takes two descriptors, the fewest of any request.
        let slots = SIZE / 2;
        Ok(VirtioBlk {
            queue,
            transport,
            mem: SlotPages::new(slots),
            table: Table::new(slots, SIZE),
            capacity,
            features,
            max_segs,
            unnotified: false,
            broken: None,
            stats: Stats::default(),
        })
    }

    /// The disk's size in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn readonly(&self) -> bool {
        self.features.contains(Features::RO)
    }

    /// Whether the device takes flushes; without FLUSH it writes through
    /// and a flush has nothing to do.
    pub fn has_flush(&self) -> bool {
        self.features.contains(Features::FLUSH)
    }

    /// The most data buffers one request takes.
    pub fn max_segs(&self) -> usize {
        self.max_segs
    }

    /// Descriptors in the queue.
    pub const fn queue_size() -> usize {
        SIZE
    }

    /// Requests in the device.
    pub fn in_flight(&self) -> usize {
        self.table.in_flight()
    }

    /// Room in the queue now: free descriptors and free slots (a request
    /// takes its buffers + 2 descriptors and one slot).
    pub fn room(&self) -> (usize, usize) {
        (
            self.queue.available_desc(),
            self.table.slots.len() - self.table.in_flight(),
        )
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn broken(&self) -> Option<Broken> {
        self.broken
    }

    /// Puts request `op` at `sector` over `bufs` (each an address that is
    /// also its I/O address, and a length) into the queue, without telling
    /// the device ([`VirtioBlk::notify`] does). Its completion carries
    /// `tag`.
    ///
    /// # Safety
    ///
    /// Each buffer is memory the caller owns, writable for a read, and
    /// stays valid and untouched by the caller until [`VirtioBlk::pop`]
    /// returns this request's completion (or the driver is dropped).
    pub unsafe fn submit(
        &mut self,
        op: Op,
        sector: u64,
        bufs: &[Buf],
        tag: u64,
    ) -> Result<(), SubmitError> {
        // SAFETY: this function's contract.
        let (slot, token, read, writable) = unsafe { self.add(op, sector, bufs)? };
        self.table.start(slot, token, tag, bufs, read, writable);
        Ok(())
    }

    /// As [`VirtioBlk::submit`], but the request keeps `bufs` itself
    /// instead of a copy: when it is taken, `bufs` is swapped for an empty
    /// list (with the capacity of one an earlier request kept), for the
    /// caller to reuse; when it is not, `bufs` is untouched.
    ///
    /// # Safety
    ///
    /// As for [`VirtioBlk::submit`].
    pub unsafe fn submit_owned(
        &mut self,
        op: Op,
        sector: u64,
        bufs: &mut Vec<Buf>,
        tag: u64,
    ) -> Result<(), SubmitError> {
        // SAFETY: this function's contract.
        let (slot, token, read, writable) = unsafe { self.add(op, sector, bufs)? };
        self.table
            .start_owned(slot, token, tag, bufs, read, writable);
        Ok(())
    }

    /// [`VirtioBlk::submit`]'s work but the table's record of the buffers:
    /// the request is in the queue (counted, to be notified); its slot,
    /// token, direction and writable bytes, for [`Table::start`], which
    /// the caller makes at once.
    ///
    /// # Safety
    ///
    /// As for [`VirtioBlk::submit`].
    #[inline(always)]
    unsafe fn add(
        &mut self,
        op: Op,
        sector: u64,
        bufs: &[Buf],
    ) -> Result<(usize, u16, bool, u64), SubmitError> {
        if self.broken.is_some() {
            return Err(SubmitError::Broken);
        }
        let l = Layout::new(
            op,
            sector,
            bufs,
            self.max_segs,
            self.capacity,
            self.readonly(),
        )?;
        if self.queue.available_desc() < l.descs {
            self.stats.full += 1;
            return Err(SubmitError::Full);
        }
        let Some(slot) = self.table.alloc() else {
            self.stats.full += 1;
            return Err(SubmitError::Full);
        };
        let (hdr, status) = (self.mem.header(slot), self.mem.status(slot));
        // SAFETY: slot `slot` is free (just taken from the table), so the
        // device has no request using its header or status now.
        unsafe {
            core::ptr::copy_nonoverlapping(l.header.as_ptr(), hdr, 16);
            status.write_volatile(S_UNSET);
        }
        let read = op == Op::Read;
        let mut chain = Chain::new();
        // SAFETY: the header and status are the slot's, which stays
        // reserved for this request until `pop`; the data buffers are the
        // caller's (this function's contract). The slices live only until
        // `add` returns; the queue keeps the addresses.
        unsafe { chain.fill(&self.mem, slot, bufs, read) };
        let (ins, outs) = chain.parts();
        // SAFETY: as above: every buffer stays valid and untouched until
        // `pop` takes this chain off the used ring (`pop_used`).
        let r = unsafe { self.queue.add(ins, outs) };
        match r {
            Ok(token) => {
                self.unnotified = true;
                self.stats.submitted += 1;
                Ok((slot, token, read, l.writable))
            }
            Err(virtio_drivers::Error::QueueFull) => {
                self.table.cancel(slot);
                self.stats.full += 1;
                Err(SubmitError::Full)
            }
            Err(_) => {
                self.table.cancel(slot);
                Err(SubmitError::Invalid)
            }
        }
    }

    /// Tells the device of the requests submitted since the last call
    /// (one notification, unless the device said it is looking anyway).
    pub fn notify(&mut self) {
        if core::mem::take(&mut self.unnotified) && self.queue.should_notify() {
            self.stats.notifies += 1;
            self.transport.notify(QUEUE);
        }
    }

    /// Takes the next completion off the used ring, checked; `Ok(None)` if
    /// there is none. `Err` once the device broke the queue's rules (then
    /// always).
    pub fn pop(&mut self) -> Result<Option<Completion>, Broken> {
        if let Some(b) = self.broken {
            return Err(b);
        }
        let Some(token) = self.queue.peek_used() else {
            return Ok(None);
        };
        let Some(slot) = self.table.lookup(token) else {
            self.stats.bad.token += 1;
            self.broken = Some(Broken::UnknownToken(token));
            return Err(Broken::UnknownToken(token));
        };
        let Some(f) = self.table.get(slot) else {
            return Err(Broken::Queue);
        };
        let mut chain = Chain::new();
        // SAFETY: the very slot and buffers `submit` put in the chain
        // `token` (the table says so), still valid by `submit`'s contract;
        // the slices end with this call.
        unsafe { chain.fill(&self.mem, slot, &f.bufs, f.read) };
        let (ins, outs) = chain.parts();
        // SAFETY: the same buffers, in the same order, as `add` took for
        // `token`, which is the head of a chain in the queue.
        let r = unsafe { self.queue.pop_used(token, ins, outs) };
        let Ok(used) = r else {
            // The used entry changed between the peek and the pop.
            self.broken = Some(Broken::Queue);
            return Err(Broken::Queue);
        };
        // SAFETY: the slot's status byte; the device is done with it (its
        // chain left the queue), and a volatile read takes whatever it is.
        let byte = unsafe { self.mem.status(slot).read_volatile() };
        let Some((tag, writable)) = self.table.finish(slot) else {
            return Err(Broken::Queue);
        };
        let status = check(writable, used, byte);
        match status {
            Status::BadStatus(_) => self.stats.bad.status += 1,
            Status::BadLength(_) => self.stats.bad.length += 1,
            _ => {}
        }
        self.stats.completed += 1;
        Ok(Some(Completion { tag, status }))
    }

    /// Whether the used ring holds something (cheap; no check).
    pub fn has_used(&self) -> bool {
        self.queue.can_pop()
    }
}

impl<H: Hal, T: Transport, const SIZE: usize> Drop for VirtioBlk<H, T, SIZE> {
    fn drop(&mut self) {
        // The device must stop using the queue before its memory goes: a
        // reset (status 0) is the one thing virtio obliges it to obey, even
        // with requests still in it (a broken queue); then the queue goes.
        self.transport
            .set_status(virtio_drivers::transport::DeviceStatus::empty());
        self.transport.queue_unset(QUEUE);
    }
}

/// A request's buffers as the slices `VirtQueue::add` and `pop_used` take,
/// in chain order: the header; the data (device-readable for a write,
/// device-writable for a read); the status. On the stack and never
/// initialised past what [`Chain::fill`] wrote: zeroing two lists of
/// `MAX_SEGS + 1` slices per request would cost more than the rest of the
/// request.
struct Chain<'a> {
    ins: [MaybeUninit<&'a [u8]>; MAX_SEGS + 1],
    outs: [MaybeUninit<&'a mut [u8]>; MAX_SEGS + 1],
    /// `ins[..ni]` and `outs[..no]` are initialised.
    ni: usize,
    no: usize,
}

impl<'a> Chain<'a> {
    fn new() -> Self {
        Chain {
            ins: [const { MaybeUninit::uninit() }; MAX_SEGS + 1],
            outs: [const { MaybeUninit::uninit() }; MAX_SEGS + 1],
            ni: 0,
            no: 0,
        }
    }

    /// Slot `slot`'s header and status around `bufs` (at most
    /// [`MAX_SEGS`] are taken).
    ///
    /// # Safety
    ///
    /// `bufs` are valid for `'a` (the caller's promise, writable if `read`);
    /// the slot's header and status are not otherwise referenced for `'a`.
    unsafe fn fill<H: Hal>(&mut self, mem: &SlotPages<H>, slot: usize, bufs: &[Buf], read: bool) {
        // SAFETY: the slot's header and status (inside the slot pages) and
        // the caller's buffers (its promise).
        unsafe {
            self.ins[0].write(core::slice::from_raw_parts(mem.header(slot), 16));
            let (mut ni, mut no) = (1, 0);
            for b in bufs.iter().take(MAX_SEGS) {
                let p = b.addr as *mut u8;
                if read {
                    self.outs[no].write(core::slice::from_raw_parts_mut(p, b.len as usize));
                    no += 1;
                } else {
                    self.ins[ni].write(core::slice::from_raw_parts(p, b.len as usize));
                    ni += 1;
                }
            }
            self.outs[no].write(core::slice::from_raw_parts_mut(mem.status(slot), 1));
            (self.ni, self.no) = (ni, no + 1);
        }
    }

    /// The initialised lists.
    fn parts(&mut self) -> (&[&'a [u8]], &mut [&'a mut [u8]]) {
        let ins = self.ins.as_ptr().cast::<&'a [u8]>();
        let outs = self.outs.as_mut_ptr().cast::<&'a mut [u8]>();
        // SAFETY: the first `ni` and `no` entries were written by `fill`
        // (0 before it), `MaybeUninit<T>` has `T`'s layout, and the two
        // lists are distinct fields borrowed with `self`.
        unsafe {
            (
                core::slice::from_raw_parts(ins, self.ni),
                core::slice::from_raw_parts_mut(outs, self.no),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn buf(addr: u64, len: u32) -> Buf {
        Buf { addr, len }
    }

    #[test]
    fn layouts() {
        let l = Layout::new(
            Op::Read,
            8,
            &[buf(0x1000, 4096), buf(0x3000, 512)],
            4,
            100,
            false,
        )
        .unwrap();
        assert_eq!(l.descs, 4);
        assert_eq!(l.data, 4608);
        assert_eq!(l.writable, 4609);
        assert_eq!(&l.header[..4], &0u32.to_le_bytes());
        assert_eq!(&l.header[8..], &8u64.to_le_bytes());
        let w = Layout::new(Op::Write, 91, &[buf(0x1000, 4096)], 4, 99, false).unwrap();
        assert_eq!((w.descs, w.writable), (3, 1));
        assert_eq!(&w.header[..4], &1u32.to_le_bytes());
        let f = Layout::new(Op::Flush, 77, &[], 4, 99, false).unwrap();
        assert_eq!((f.descs, f.data, f.writable), (2, 0, 1));
        assert_eq!(f.header, {
            let mut h = [0; 16];
            h[0] = 4;
            h
        });
        let bad = |op, sector, bufs: &[Buf], ro| {
            assert_eq!(
                Layout::new(op, sector, bufs, 2, 100, ro),
                Err(SubmitError::Invalid)
            )
        };
        bad(Op::Read, 0, &[], false);
        bad(Op::Flush, 0, &[buf(0x1000, 512)], false);
        bad(Op::Read, 0, &[buf(0x1000, 0)], false);
        bad(Op::Read, 0, &[buf(0x1000, 100)], false);
        bad(
            Op::Read,
            0,
            &[buf(0, 512), buf(512, 512), buf(1024, 512)],
            false,
        );
        bad(Op::Read, 99, &[buf(0x1000, 1024)], false);
        bad(Op::Read, u64::MAX, &[buf(0x1000, 512)], false);
        bad(Op::Write, 0, &[buf(0x1000, 512)], true);
        assert!(Layout::new(Op::Read, 99, &[buf(0x1000, 512)], 2, 100, true).is_ok());
        // Never past MAX_SEGS, whatever the device says.
        let many: std::vec::Vec<Buf> = (0..MAX_SEGS as u64 + 1)
            .map(|i| buf(i << 12, 512))
            .collect();
        assert!(Layout::new(Op::Read, 0, &many, 1000, 1 << 20, false).is_err());
        assert!(Layout::new(Op::Read, 0, &many[1..], 1000, 1 << 20, false).is_ok());
    }

    #[test]
    fn completions_are_checked() {
        assert_eq!(check(4097, 4097, S_OK), Status::Ok);
        assert_eq!(check(4097, 1, S_OK), Status::Ok);
        assert_eq!(check(1, 0, S_IOERR), Status::IoErr);
        assert_eq!(check(1, 1, S_UNSUPP), Status::Unsupp);
        assert_eq!(check(1, 1, 3), Status::BadStatus(3));
        assert_eq!(check(1, 1, S_UNSET), Status::BadStatus(S_UNSET));
        assert_eq!(check(1, 2, S_OK), Status::BadLength(2));
        assert_eq!(check(4097, u32::MAX, S_OK), Status::BadLength(u32::MAX));
        assert!(Status::Ok.is_ok() && !Status::IoErr.is_ok());
    }

    #[test]
    fn table_tracks_tokens() {
        let mut t = Table::new(2, 8);
        let a = t.alloc().unwrap();
        let b = t.alloc().unwrap();
        assert_eq!(t.alloc(), None);
        t.start(a, 5, 100, &[buf(0x1000, 512)], true, 513);
        assert_eq!(t.in_flight(), 2);
        // b never went in.
        t.cancel(b);
        t.cancel(b);
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.lookup(5), Some(a));
        // Tokens the device makes up find nothing: out of range, free,
        // the middle of a chain.
        assert_eq!(t.lookup(6), None);
        assert_eq!(t.lookup(8), None);
        assert_eq!(t.lookup(u16::MAX), None);
        assert_eq!(t.finish(a), Some((100, 513)));
        // Twice: the second finds nothing.
        assert_eq!(t.lookup(5), None);
        assert_eq!(t.finish(a), None);
        assert_eq!(t.in_flight(), 0);
        // Reuse keeps the buffer list's capacity.
        let c = t.alloc().unwrap();
        t.start(c, 0, 7, &[buf(0x2000, 512), buf(0x4000, 512)], false, 1);
        assert_eq!(t.get(c).unwrap().bufs.len(), 2);
        assert_eq!(t.lookup(0), Some(c));
        assert_eq!(t.finish(c), Some((7, 1)));
        // A token past the queue is ignored, not a panic.
        let d = t.alloc().unwrap();
        t.start(d, 9, 1, &[], false, 1);
        assert_eq!(t.lookup(9), None);
    }

    #[test]
    fn table_takes_over_buffer_lists() {
        let mut t = Table::new(1, 8);
        let a = t.alloc().unwrap();
        let mut mine = std::vec![buf(0x1000, 512), buf(0x3000, 1024)];
        let held = mine.as_ptr();
        t.start_owned(a, 3, 40, &mut mine, true, 1537);
        // The slot holds the very list; the caller got the slot's old one.
        let f = t.get(a).unwrap();
        assert_eq!(f.bufs, [buf(0x1000, 512), buf(0x3000, 1024)]);
        assert_eq!(f.bufs.as_ptr(), held);
        assert!(mine.is_empty());
        assert_eq!(t.finish(a), Some((40, 1537)));
        // Next time round the caller gets that list back, emptied.
        let a = t.alloc().unwrap();
        let mut next = std::vec![buf(0x5000, 512)];
        t.start_owned(a, 4, 41, &mut next, false, 1);
        assert!(next.is_empty() && next.capacity() >= 2);
        assert_eq!(next.as_ptr(), held);
        assert_eq!(t.get(a).unwrap().bufs, [buf(0x5000, 512)]);
        // Out of range: the list stays the caller's.
        let mut kept = std::vec![buf(0x7000, 512)];
        t.start_owned(9, 0, 1, &mut kept, false, 1);
        t.start_owned(a, 8, 1, &mut kept, false, 1);
        assert_eq!(kept, [buf(0x7000, 512)]);
    }

    mod fake {
        //! A virtio-blk device played by the test: a `Hal` whose I/O
        //! addresses are host addresses, a transport that records where
        //! the queue is, and a device that serves the available ring from
        //! a disk in memory (or says what the test makes it say).
        use super::*;
        use std::cell::RefCell;
        use std::rc::Rc;
        use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus};
        use virtio_drivers::PhysAddr;
        use zerocopy::{FromBytes, Immutable, IntoBytes};

        pub struct TestHal;

        // SAFETY: memory from the global allocator, page-aligned and zeroed,
        // at I/O address = its address; nothing is bounced.
        unsafe impl Hal for TestHal {
            fn dma_alloc(pages: usize, _: BufferDirection) -> (PhysAddr, NonNull<u8>) {
                let l = core::alloc::Layout::from_size_align(pages * 4096, 4096).unwrap();
                // SAFETY: non-zero size.
                let p = unsafe { std::alloc::alloc_zeroed(l) };
                (p as u64, NonNull::new(p).unwrap())
            }
            unsafe fn dma_dealloc(_: PhysAddr, v: NonNull<u8>, pages: usize) -> i32 {
                let l = core::alloc::Layout::from_size_align(pages * 4096, 4096).unwrap();
                // SAFETY: allocated by `dma_alloc` with this layout.
                unsafe { std::alloc::dealloc(v.as_ptr(), l) };
                0
            }
            unsafe fn mmio_phys_to_virt(p: PhysAddr, _: usize) -> NonNull<u8> {
                NonNull::new(p as *mut u8).unwrap()
            }
            unsafe fn share(b: NonNull<[u8]>, _: BufferDirection) -> PhysAddr {
                b.as_ptr() as *mut u8 as u64
            }
            unsafe fn unshare(_: PhysAddr, _: NonNull<[u8]>, _: BufferDirection) {}
        }

        #[derive(Default)]
        pub struct State {
            pub desc: u64,
            pub avail: u64,
            pub used: u64,
            pub size: u16,
            pub notified: u32,
            pub seen: u16,
            pub used_idx: u16,
            pub disk: std::vec::Vec<u8>,
            pub features: u64,
        }

        pub struct FakeTransport(pub Rc<RefCell<State>>);

        impl Transport for FakeTransport {
            fn device_type(&self) -> DeviceType {
                DeviceType::Block
            }
            fn read_device_features(&mut self) -> u64 {
                self.0.borrow().features
            }
            fn write_driver_features(&mut self, _: u64) {}
            fn max_queue_size(&mut self, _: u16) -> u32 {
                256
            }
            fn notify(&mut self, _: u16) {
                self.0.borrow_mut().notified += 1;
            }
            fn get_status(&self) -> DeviceStatus {
                DeviceStatus::empty()
            }
            fn set_status(&mut self, _: DeviceStatus) {}
            fn set_guest_page_size(&mut self, _: u32) {}
            fn requires_legacy_layout(&self) -> bool {
                false
            }
            fn queue_set(&mut self, _: u16, size: u32, d: PhysAddr, a: PhysAddr, u: PhysAddr) {
                let mut s = self.0.borrow_mut();
                (s.desc, s.avail, s.used, s.size) = (d, a, u, size as u16);
            }
            fn queue_unset(&mut self, _: u16) {}
            fn queue_used(&mut self, _: u16) -> bool {
                false
            }
            fn ack_interrupt(&mut self) -> InterruptStatus {
                InterruptStatus::empty()
            }
            fn read_config_generation(&self) -> u32 {
                0
            }
            fn read_config_space<V: FromBytes + IntoBytes>(
                &self,
                offset: usize,
            ) -> virtio_drivers::Result<V> {
                let s = self.0.borrow();
                let mut cfg = [0u8; 16];
                cfg[..8].copy_from_slice(&((s.disk.len() / 512) as u64).to_le_bytes());
                cfg[12..].copy_from_slice(&8u32.to_le_bytes());
                V::read_from_bytes(&cfg[offset..offset + core::mem::size_of::<V>()])
                    .map_err(|_| virtio_drivers::Error::ConfigSpaceTooSmall)
            }
            fn write_config_space<V: IntoBytes + Immutable>(
                &mut self,
                _: usize,
                _: V,
            ) -> virtio_drivers::Result<()> {
                Ok(())
            }
        }

        fn rd<T: Copy>(a: u64) -> T {
            // SAFETY: addresses inside the queue's memory (TestHal).
            unsafe { (a as *const T).read_volatile() }
        }
        fn wr<T>(a: u64, v: T) {
            // SAFETY: as for `rd`.
            unsafe { (a as *mut T).write_volatile(v) }
        }

        /// A chain the device took: (descriptor head, buffers as
        /// (address, length, device-writable)).
        pub type Chain = (u16, std::vec::Vec<(u64, u32, bool)>);

        impl State {
            /// The chains the driver made available since the last call.
            pub fn take(&mut self) -> std::vec::Vec<Chain> {
                let idx: u16 = rd(self.avail + 2);
                let mut out = std::vec::Vec::new();
                while self.seen != idx {
                    let slot = u64::from(self.seen % self.size);
                    let head: u16 = rd(self.avail + 4 + 2 * slot);
                    let mut bufs = std::vec::Vec::new();
                    let mut d = head;
                    loop {
                        let a = self.desc + 16 * u64::from(d);
                        let flags: u16 = rd(a + 12);
                        bufs.push((rd::<u64>(a), rd::<u32>(a + 8), flags & 2 != 0));
                        if flags & 1 == 0 {
                            break;
                        }
                        d = rd(a + 14);
                    }
                    out.push((head, bufs));
                    self.seen = self.seen.wrapping_add(1);
                }
                out
            }

            /// Carries `chain` out on the disk; returns its status address
            /// and the bytes written (data and status).
            pub fn serve(&mut self, chain: &Chain) -> (u64, u32) {
                let (_, bufs) = chain;
                let hdr = bufs[0].0;
                let ty: u32 = rd(hdr);
                let mut at = rd::<u64>(hdr + 8) as usize * 512;
                let mut written = 1;
                for &(a, len, w) in &bufs[1..bufs.len() - 1] {
                    let len = len as usize;
                    // SAFETY: the driver's data buffers (the test's).
                    let b = unsafe { core::slice::from_raw_parts_mut(a as *mut u8, len) };
                    if ty == T_IN {
                        assert!(w);
                        b.copy_from_slice(&self.disk[at..at + len]);
                        written += len as u32;
                    } else {
                        self.disk[at..at + len].copy_from_slice(b);
                    }
                    at += len;
                }
                let st = bufs[bufs.len() - 1];
                assert!(st.2 && st.1 == 1);
                (st.0, written)
            }

            /// Puts (id, len) on the used ring.
            pub fn used(&mut self, id: u32, len: u32) {
                let slot = u64::from(self.used_idx % self.size);
                wr(self.used + 4 + 8 * slot, id);
                wr(self.used + 8 + 8 * slot, len);
                self.used_idx = self.used_idx.wrapping_add(1);
                wr(self.used + 2, self.used_idx);
            }

            /// Serves every available chain with status OK, in order.
            pub fn run(&mut self) {
                for c in self.take() {
                    let (st, n) = self.serve(&c);
                    wr(st, S_OK);
                    self.used(u32::from(c.0), n);
                }
            }
        }
    }

    use fake::{FakeTransport, State, TestHal};
    use std::cell::RefCell;
    use std::rc::Rc;

    type Blk = VirtioBlk<TestHal, FakeTransport, 256>;

    fn device() -> (Blk, Rc<RefCell<State>>) {
        let st = Rc::new(RefCell::new(State {
            disk: (0..64 * 512).map(|i| (i / 512) as u8).collect(),
            features: (Features::SEG_MAX
                | Features::FLUSH
                | Features::VERSION_1
                | Features::RING_INDIRECT_DESC
                | Features::RING_EVENT_IDX)
                .bits(),
            ..State::default()
        }));
        let blk = Blk::new(FakeTransport(st.clone())).unwrap();
        (blk, st)
    }

    /// A page-aligned buffer the test owns.
    #[repr(align(4096))]
    struct Page([u8; 4096]);

    #[test]
    fn scatter_gather_read_write_and_flush() {
        let (mut blk, st) = device();
        assert_eq!(blk.capacity(), 64);
        assert_eq!(blk.max_segs(), 8);
        assert!(blk.has_flush() && !blk.readonly());
        let mut pages: std::vec::Vec<Page> = (0..3).map(|_| Page([0; 4096])).collect();
        let a = pages[0].0.as_mut_ptr() as u64;
        let b = pages[1].0.as_mut_ptr() as u64 + 512;
        // SAFETY: the pages outlive the requests (popped below).
        unsafe {
            blk.submit(Op::Read, 4, &[buf(a, 1024), buf(b, 512)], 11)
                .unwrap();
            blk.submit(Op::Flush, 0, &[], 12).unwrap();
        }
        assert_eq!(st.borrow().notified, 0, "submit does not notify");
        blk.notify();
        blk.notify();
        assert_eq!(st.borrow().notified, 1, "one notification per batch");
        let chains = st.borrow_mut().take();
        assert_eq!(chains.len(), 2);
        // Header, two data buffers, status; header and status for the flush.
        assert_eq!(chains[0].1.len(), 4);
        assert_eq!(chains[1].1.len(), 2);
        assert!(chains[0].1[1].2 && !chains[0].1[0].2);
        // Complete the flush first: order is the device's.
        for c in chains.iter().rev() {
            let (s, n) = st.borrow_mut().serve(c);
            fake_status(s, S_OK);
            st.borrow_mut().used(u32::from(c.0), n);
        }
        let c1 = blk.pop().unwrap().unwrap();
        let c2 = blk.pop().unwrap().unwrap();
        assert_eq!(blk.pop(), Ok(None));
        assert_eq!((c1.tag, c1.status), (12, Status::Ok));
        assert_eq!((c2.tag, c2.status), (11, Status::Ok));
        assert_eq!(pages[0].0[0], 4);
        assert_eq!(pages[0].0[1023], 5);
        assert_eq!(pages[1].0[512], 6);
        assert_eq!(pages[1].0[0], 0);
        // A write.
        pages[2].0.fill(0xab);
        let c = pages[2].0.as_ptr() as u64;
        // SAFETY: as above.
        unsafe { blk.submit(Op::Write, 60, &[buf(c, 2048)], 13).unwrap() };
        blk.notify();
        st.borrow_mut().run();
        assert_eq!(blk.pop().unwrap().unwrap().status, Status::Ok);
        assert!(st.borrow().disk[60 * 512..].iter().all(|&x| x == 0xab));
        assert_eq!(blk.in_flight(), 0);
        // Past the end, too many buffers: refused before the queue.
        // SAFETY: refused requests never reach the device.
        unsafe {
            assert_eq!(
                blk.submit(Op::Write, 63, &[buf(c, 1024)], 0),
                Err(SubmitError::Invalid)
            );
            let nine: std::vec::Vec<Buf> = (0..9).map(|i| buf(c + 512 * i, 512)).collect();
            assert_eq!(blk.submit(Op::Read, 0, &nine, 0), Err(SubmitError::Invalid));
        }
    }

    #[test]
    fn submit_owned_hands_the_list_to_the_request() {
        let (mut blk, st) = device();
        let mut pages: std::vec::Vec<Page> = (0..2).map(|_| Page([0; 4096])).collect();
        let a = pages[0].0.as_mut_ptr() as u64;
        let b = pages[1].0.as_mut_ptr() as u64;
        // Refused: the list stays the caller's, as it was.
        let mut bad = std::vec![buf(a, 1024)];
        // SAFETY: refused requests never reach the device.
        unsafe {
            assert_eq!(
                blk.submit_owned(Op::Read, 63, &mut bad, 1),
                Err(SubmitError::Invalid)
            );
        }
        assert_eq!(bad, [buf(a, 1024)]);
        let mut bufs = std::vec![buf(a, 1024), buf(b, 512)];
        // SAFETY: the pages outlive the request (popped below).
        unsafe { blk.submit_owned(Op::Read, 4, &mut bufs, 11).unwrap() };
        assert!(bufs.is_empty());
        blk.notify();
        // The device sees the buffers, and the completion hands the same
        // ones back to the queue.
        st.borrow_mut().run();
        let c = blk.pop().unwrap().unwrap();
        assert_eq!((c.tag, c.status), (11, Status::Ok));
        assert_eq!(pages[0].0[0], 4);
        assert_eq!(pages[0].0[1023], 5);
        assert_eq!(pages[1].0[0], 6);
        assert_eq!(pages[1].0[512], 0);
        assert_eq!(blk.in_flight(), 0);
    }

    fn fake_status(addr: u64, v: u8) {
        // SAFETY: a status byte of the driver's slot pages.
        unsafe { (addr as *mut u8).write_volatile(v) }
    }

    #[test]
    fn the_queue_fills_and_drains() {
        let (mut blk, st) = device();
        let mut page = Page([0; 4096]);
        let p = page.0.as_mut_ptr() as u64;
        // 8 buffers of 512 bytes: 10 descriptors each, 25 fit in 256.
        let bufs: std::vec::Vec<Buf> = (0..8).map(|i| buf(p + 512 * i, 512)).collect();
        let mut n = 0;
        // SAFETY: the page outlives every request (all popped below).
        while unsafe { blk.submit(Op::Read, 0, &bufs, n) }.is_ok() {
            n += 1;
        }
        assert_eq!(n, 25);
        assert_eq!(blk.stats().full, 1);
        // Flushes take two descriptors: until the slots run out.
        let mut f = 0;
        // SAFETY: no buffers.
        while unsafe { blk.submit(Op::Flush, 0, &[], 1000 + f) }.is_ok() {
            f += 1;
        }
        assert_eq!(f, 3);
        blk.notify();
        st.borrow_mut().run();
        let mut tags = std::vec::Vec::new();
        while let Some(c) = blk.pop().unwrap() {
            assert!(c.status.is_ok());
            tags.push(c.tag);
        }
        assert_eq!(tags.len(), 28);
        assert_eq!(blk.in_flight(), 0);
        // Many more than the queue, a few at a time: tokens and slots are
        // reused without end.
        for round in 0..200u64 {
            // SAFETY: as above.
            unsafe { blk.submit(Op::Read, round % 60, &bufs[..2], round) }.unwrap();
            blk.notify();
            st.borrow_mut().run();
            assert_eq!(blk.pop().unwrap().unwrap().tag, round);
        }
    }

    #[test]
    fn a_hostile_device_gets_errors_not_panics() {
        let (mut blk, st) = device();
        let mut page = Page([0; 4096]);
        let p = page.0.as_mut_ptr() as u64;
        for tag in 0..4 {
            // SAFETY: the page outlives the requests.
            unsafe { blk.submit(Op::Read, 0, &[buf(p + 1024 * tag, 1024)], tag) }.unwrap();
        }
        blk.notify();
        let chains = st.borrow_mut().take();
        // A status virtio does not define; a length past what it may write;
        // a request it never wrote the status of; IOERR.
        let answers = [(7u8, 1025u32), (S_OK, 1026), (S_UNSET, 1025), (S_IOERR, 1)];
        for (c, (s, len)) in chains.iter().zip(answers) {
            let (addr, _) = st.borrow_mut().serve(c);
            if s != S_UNSET {
                fake_status(addr, s);
            }
            st.borrow_mut().used(u32::from(c.0), len);
        }
        let got: std::vec::Vec<Status> =
            (0..4).map(|_| blk.pop().unwrap().unwrap().status).collect();
        assert_eq!(
            got,
            [
                Status::BadStatus(7),
                Status::BadLength(1026),
                Status::BadStatus(S_UNSET),
                Status::IoErr
            ]
        );
        assert_eq!(
            blk.stats().bad,
            BadCounts {
                status: 2,
                length: 1,
                token: 0
            }
        );
        // The same token again (now free), then one past the queue: the
        // driver stops, and says so every time after.
        let head = chains[0].0;
        st.borrow_mut().used(u32::from(head), 1);
        assert_eq!(blk.pop(), Err(Broken::UnknownToken(head)));
        assert_eq!(blk.pop(), Err(Broken::UnknownToken(head)));
        assert_eq!(
            // SAFETY: refused (no buffers anyway).
            unsafe { blk.submit(Op::Flush, 0, &[], 9) },
            Err(SubmitError::Broken)
        );
        let (mut blk, st) = device();
        st.borrow_mut().used(70_000, 1);
        assert_eq!(blk.pop(), Err(Broken::UnknownToken(70_000u32 as u16)));
        assert_eq!(blk.stats().bad.token, 1);
    }
}
