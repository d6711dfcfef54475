//! blkback: serves one frontend's virtual disk over a blkif ring.
//!
//! A driver domain makes one [`Backend`] per frontend it serves, from a
//! [`Config`]: the frontend's domain id, its virtual disk (a sector range
//! of the real disk; the frontend sees sectors `0..sectors`), read-only or
//! not, and the data path:
//!
//! - [`DataPath::Map`]: each segment's granted page is mapped into the
//!   driver domain and its device's I/O space, and the device DMAs straight
//!   into it (zero copy). Up to `persistent` refs stay mapped once mapped
//!   and are reused (Xen's persistent grants), so the frontend should reuse
//!   a fixed pool of granted pages; past that, a ref is mapped per request
//!   and unmapped when it completes. The per-request mappings held at once
//!   are capped by [`Config::map_quota`], so that one frontend cannot take
//!   every mapping the driver domain may hold: a request that would exceed
//!   it waits, like a request that finds too few bounce pages in the copy
//!   path, until requests in the device give theirs back.
//! - [`DataPath::Copy`]: the device works on bounce pages of the driver
//!   domain and the hypervisor copies between them and the granted pages.
//!
//! Everything the backend needs from outside is a trait: the ring page
//! ([`abi::ring::RingPage`]), the grant operations ([`Grants`]) and the
//! disk ([`BlockDevice`]). The driver domain calls [`Backend::poll`] when
//! the frontend's event channel fires (and again while [`Poll::more`]),
//! [`Backend::complete`] when the device finishes a request (or
//! [`Backend::retire`] for each of several, then `poll` once), and sends
//! the frontend an event whenever a call returns [`Poll::notify`].
//!
//! Every request is copied out of the ring once and only that private copy
//! is looked at. It is then validated; a bad one is answered with
//! `BLKIF_RSP_ERROR` or `BLKIF_RSP_EOPNOTSUPP` and its id, and counted by
//! [`Reject`] reason. The device only ever sees addresses of pages the
//! hypervisor mapped for this request's grant refs (writable ones when it
//! writes into them) or of this backend's bounce pages. A frontend whose
//! `req_prod` overruns the ring is hostile: the backend stops reading the
//! ring, waits for the device to finish what it already started, unmaps
//! everything and ends the connection ([`Conn::Closed`], [`Poll::hostile`]).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

use alloc::vec::Vec;

use abi::blkif::{
    self, op, status, IndirectRequest, Request, Response, Segment, ENTRY_SIZE, RING_SIZE,
    SECTOR_SIZE, SEGMENTS_PER_INDIRECT_PAGE, SEGMENT_SIZE,
};
use abi::grant::{copy_flags, CopyOp, CopyPtr, Status as GrantStatus, DOMID_SELF, MAX_BATCH};
use abi::ring::{self, BackRing, RingPage, State};

#[cfg(test)]
mod tests;

/// Bytes of a page.
pub const PAGE_SIZE: u64 = 4096;

/// A grant ref mapped into the driver domain: its address there, which is
/// also its I/O address for the domain's devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub handle: u32,
    pub addr: u64,
}

/// Grant operations, carried out by the hypervisor on the driver domain's
/// behalf (`abi::grant`), and reads of the driver domain's own memory.
pub trait Grants {
    /// Map grant `gref` of domain `dom` into the driver domain and for its
    /// devices; read-only if `readonly`. The hypervisor refuses a ref that
    /// `dom` has not granted to the driver domain, or a writable map of a
    /// read-only grant.
    fn map(&mut self, dom: u16, gref: u32, readonly: bool) -> Result<Mapping, GrantStatus>;
    /// Undo a [`Grants::map`]; the page is unreachable by the CPU and the
    /// devices (TLB and IOTLB invalidated) when it returns.
    fn unmap(&mut self, m: Mapping) -> Result<(), GrantStatus>;
    /// Carry out `ops` (at most [`abi::grant::MAX_BATCH`]), writing each
    /// operation's status in place; `Err` if the call as a whole failed.
    fn copy(&mut self, ops: &mut [CopyOp]) -> Result<(), GrantStatus>;
    /// Copy `buf.len()` bytes of the driver domain's memory at `addr` into
    /// `buf`. The backend only asks for pages it mapped with
    /// [`Grants::map`] and not yet unmapped, or its own bounce pages.
    fn read(&self, addr: u64, buf: &mut [u8]);
}

/// Which way data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Disk to memory: the device writes into the buffers.
    Read,
    /// Memory to disk: the device reads the buffers.
    Write,
}

/// One buffer of a transfer, in the driver domain's address space (which
/// is its devices' I/O address space): the pages of one or more segments
/// that follow each other in memory (the backend merges them), at most
/// [`blkif::MAX_INDIRECT_SEGMENTS`] pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
}

/// Why the device did not take a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// No room now: the backend keeps the request and tries again on its
    /// next `poll` or `complete`.
    Busy,
    /// The device cannot do it: the request is answered with an error.
    Failed,
}

/// The real disk, shared by every backend of the driver domain.
pub trait BlockDevice {
    /// Start a transfer at `sector` of the real disk, the buffers in order
    /// (consecutive on the disk). When it is done, the driver domain calls
    /// [`Backend::complete`] with `token` on the backend that submitted it
    /// (never from inside this call).
    fn submit(
        &mut self,
        token: u64,
        sector: u64,
        dir: Direction,
        bufs: &[Buf],
    ) -> Result<(), DeviceError>;
    /// Start a cache flush; completes like [`BlockDevice::submit`].
    fn flush(&mut self, token: u64) -> Result<(), DeviceError>;
}

/// How data moves between the frontend's pages and the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataPath {
    /// Grant map, zero copy; at most `persistent` refs stay mapped for the
    /// life of the connection (0: map and unmap per request).
    Map { persistent: usize },
    /// Grant copy through these page-aligned bounce pages of the driver
    /// domain (at least [`Config::bounce_pages_needed`] of them).
    Copy { bounce: Vec<u64> },
}

/// One frontend's connection, as the manifest describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The frontend's domain id (its grant refs are looked up there).
    pub frontend: u16,
    /// First sector of the real disk the frontend's sector 0 is.
    pub first_sector: u64,
    /// Sectors the frontend sees.
    pub sectors: u64,
    pub read_only: bool,
    pub path: DataPath,
    /// Most segments in one INDIRECT request; 0 refuses INDIRECT with
    /// EOPNOTSUPP. Advertised to the frontend in the ring header
    /// (`abi::ring::off::BACK_MAX_INDIRECT`) when the backend attaches.
    pub max_indirect_segments: u16,
    /// [`DataPath::Map`]: most per-request grant mappings (those past the
    /// persistent ones) this backend holds at once, over all its requests
    /// in flight; the copy path ignores it. A request that would take the
    /// backend past it waits (counted in [`Stats::map_waits`]) and is
    /// started again when a request in the device completes and gives its
    /// mappings back; new requests are taken only once it has started. A
    /// request that alone needs more than the quota starts once the
    /// backend holds no per-request mapping, so it cannot wait forever:
    /// the backend then holds at most `max(map_quota, segments of its
    /// largest request)`; a driver domain that wants the quota to be a hard
    /// bound keeps `max_indirect_segments` (and 11) within it. Besides, an
    /// INDIRECT request's segment-list page that cannot stay mapped as a
    /// persistent grant is mapped for a moment while the list is read: one
    /// mapping more, at most. `usize::MAX`: no limit.
    pub map_quota: usize,
}

impl Config {
    /// Bounce pages [`DataPath::Copy`] needs: the largest request, plus one
    /// page to read indirect segment lists through.
    pub fn bounce_pages_needed(&self) -> usize {
        blkif::MAX_SEGMENTS.max(usize::from(self.max_indirect_segments)) + 1
    }
}

/// A configuration that cannot work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `first_sector + sectors` overflows.
    RangeOverflow,
    /// `max_indirect_segments` above [`blkif::MAX_INDIRECT_SEGMENTS`].
    IndirectLimit(u16),
    /// A bounce page address not page-aligned.
    BounceUnaligned(u64),
    /// Fewer bounce pages than [`Config::bounce_pages_needed`].
    TooFewBouncePages { have: usize, need: usize },
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ConfigError::RangeOverflow => f.write_str("first_sector + sectors overflows"),
            ConfigError::IndirectLimit(n) => write!(
                f,
                "max_indirect_segments {n} above {}",
                blkif::MAX_INDIRECT_SEGMENTS
            ),
            ConfigError::BounceUnaligned(a) => write!(f, "bounce page {a:#x} not page-aligned"),
            ConfigError::TooFewBouncePages { have, need } => {
                write!(f, "{have} bounce pages, {need} needed")
            }
        }
    }
}

/// Why a request was refused (each has its counter in [`Stats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Reject {
    /// An operation number blkif does not define. EOPNOTSUPP.
    UnknownOp,
    /// WRITE_BARRIER, DISCARD, or INDIRECT when it is off. EOPNOTSUPP.
    Unsupported,
    /// `nr_segments` 0 (except FLUSH, which must have 0), above 11, or
    /// (INDIRECT) above the limit.
    SegmentCount,
    /// A segment with `first_sect > last_sect` or `last_sect > 7`.
    Segment,
    /// The sectors reach past the frontend's disk (or overflow).
    OutOfRange,
    /// A WRITE to a read-only disk.
    ReadOnly,
    /// An INDIRECT request whose `indirect_op` is not READ or WRITE.
    IndirectOp,
    /// A grant map or copy failed (a ref not granted to us, granted
    /// read-only for a READ, ...).
    Grant,
    /// The device failed the request.
    Device,
}

impl Reject {
    pub const COUNT: usize = 9;
    pub const ALL: [Reject; Reject::COUNT] = [
        Reject::UnknownOp,
        Reject::Unsupported,
        Reject::SegmentCount,
        Reject::Segment,
        Reject::OutOfRange,
        Reject::ReadOnly,
        Reject::IndirectOp,
        Reject::Grant,
        Reject::Device,
    ];

    /// The status the response carries.
    pub const fn status(self) -> i16 {
        match self {
            Reject::UnknownOp | Reject::Unsupported => status::EOPNOTSUPP,
            _ => status::ERROR,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Reject::UnknownOp => "unknown-op",
            Reject::Unsupported => "unsupported",
            Reject::SegmentCount => "segment-count",
            Reject::Segment => "segment",
            Reject::OutOfRange => "out-of-range",
            Reject::ReadOnly => "read-only",
            Reject::IndirectOp => "indirect-op",
            Reject::Grant => "grant",
            Reject::Device => "device",
        }
    }
}

/// Counters for one frontend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests taken off the ring.
    pub requests: u64,
    /// Requests completed successfully, by kind.
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    /// INDIRECT requests taken (of `requests`).
    pub indirect: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests refused, indexed by `Reject as usize`.
    pub errors: [u64; Reject::COUNT],
    /// Segments and indirect pages served by an already mapped
    /// persistent grant.
    pub persistent_hits: u64,
    pub maps: u64,
    pub unmaps: u64,
    pub unmap_failures: u64,
    /// Grant copy operations issued.
    pub copies: u64,
    /// Times a request waited for bounce pages, mapping quota or a busy
    /// device.
    pub stalls: u64,
    /// Of `stalls`: times a request waited because its mappings would have
    /// taken the backend past [`Config::map_quota`].
    pub map_waits: u64,
    /// Completions with a token no request of ours holds.
    pub stale_completions: u64,
    /// Connections ended because the frontend was hostile.
    pub hostile: u64,
}

impl Stats {
    pub fn errors(&self, r: Reject) -> u64 {
        self.errors[r as usize]
    }
    pub fn total_errors(&self) -> u64 {
        self.errors.iter().sum()
    }
}

/// The connection's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conn {
    /// The frontend has not set its state to Connected yet.
    Waiting,
    Connected,
    /// Not reading the ring; waiting for the device to finish.
    Closing,
    /// Everything unmapped; the backend state word says Closed. Final: a
    /// new connection needs a new `Backend`.
    Closed,
}

/// What a call did that the driver domain must act on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Poll {
    /// Send the frontend an event.
    pub notify: bool,
    /// The budget ran out with requests left: call `poll` again.
    pub more: bool,
    /// The connection came up in this call.
    pub connected: bool,
    /// The frontend was found hostile in this call (see
    /// [`Backend::hostile`]).
    pub hostile: bool,
    /// The connection reached [`Conn::Closed`] in this call.
    pub closed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backing {
    /// Not acquired (yet).
    None,
    /// A persistent mapping, kept until the connection closes.
    Persistent,
    /// Mapped for this request under this handle; unmapped when it ends.
    Mapped(u32),
    /// Our bounce page at this position of [`FreePages`].
    Bounce(u32),
}

/// One validated segment and, once acquired, where its page is in the
/// driver domain.
#[derive(Clone, Copy, Debug)]
struct SegIo {
    seg: Segment,
    page: u64,
    backing: Backing,
}

impl SegIo {
    fn new(seg: Segment) -> SegIo {
        SegIo {
            seg,
            page: 0,
            backing: Backing::None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Taken off the ring and not in the device: being parsed or started,
    /// or waiting for bounce pages or a busy device (then `stalled` names
    /// it).
    Taken,
    /// In the device under the token `gen << 32 | index`.
    InDevice,
}

/// A request from the moment it is taken off the ring until it is
/// answered. Every unanswered request holds one, so [`RING_SIZE`] of them
/// always suffice (the ring lets the backend take a request only while
/// fewer than that are unanswered); a request stays in its slot, and the
/// token the device gets back names the slot.
#[derive(Debug)]
struct Slot {
    state: SlotState,
    gen: u32,
    id: u64,
    operation: u8,
    kind: Kind,
    /// On the real disk.
    sector: u64,
    bytes: u64,
    /// `acquire` has run to completion; `release` not yet.
    acquired: bool,
    /// Some segment is [`Backing::Mapped`] or [`Backing::Bounce`]: `release`
    /// has something to give back (with only persistent grants it has not).
    holds: bool,
    /// The request's segments.
    segs: SegList,
}

/// A request's segments in storage made in [`Backend::new`] for the most
/// segments a request may have: filled in place, never grown.
#[derive(Debug, Default)]
struct SegList {
    store: alloc::boxed::Box<[SegIo]>,
    /// `store[..len]` are the request's.
    len: usize,
}

impl SegList {
    fn new(most: usize) -> SegList {
        SegList {
            store: alloc::vec![SegIo::new(Segment::default()); most].into_boxed_slice(),
            len: 0,
        }
    }

    fn as_slice(&self) -> &[SegIo] {
        &self.store[..self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [SegIo] {
        &mut self.store[..self.len]
    }

    /// Append the segments `list` yields, adding their sectors to `total`;
    /// [`Reject::Segment`] if any has `first_sect > last_sect` or
    /// `last_sect > 7` (then the list holds them all, checked or not: the
    /// request is refused and its slot's list is cleared by the next
    /// parse), [`Reject::SegmentCount`] (nothing appended) if they do not
    /// fit. One pass without a branch per segment: the checks are folded
    /// and looked at once, and the segments are written in place.
    #[inline]
    fn push(
        &mut self,
        list: impl ExactSizeIterator<Item = Segment>,
        total: &mut u64,
    ) -> Result<(), Reject> {
        let n = list.len();
        let end = self.len.checked_add(n).ok_or(Reject::SegmentCount)?;
        let dst = self
            .store
            .get_mut(self.len..end)
            .ok_or(Reject::SegmentCount)?;
        let mut bad = false;
        let mut sectors = 0u64;
        for (d, seg) in dst.iter_mut().zip(list) {
            bad |= !seg.is_valid();
            sectors += seg.sectors();
            *d = SegIo::new(seg);
        }
        self.len = end;
        if bad {
            return Err(Reject::Segment);
        }
        *total += sectors;
        Ok(())
    }
}

/// Where a persistent grant is mapped, and whether writably.
#[derive(Clone, Copy, Debug)]
struct Persistent {
    addr: u64,
    writable: bool,
}

/// Grant refs a domain's grant table can hold at most; no ref at or past
/// this can be granted.
const GREFS: usize = abi::grant::MAX_TABLE_PAGES as usize * abi::grant::ENTRIES_PER_PAGE;

/// Persistent grants: refs that stay mapped for the connection's life (at
/// most `max`), found by ref in constant time. `index[gref]` is the ref's
/// page address with [`Cache::PRESENT`] (and [`Cache::WRITABLE`] for a
/// writable mapping) in its low bits, or 0; `maps` keeps the mappings to
/// undo. A ref at or past [`GREFS`] is never cached (its map fails anyway),
/// so the index needs no more room and a hostile frontend cannot make
/// lookups slow.
#[derive(Debug)]
struct Cache {
    max: usize,
    index: Vec<u64>,
    maps: Vec<Mapping>,
}

impl Cache {
    const PRESENT: u64 = 1;
    const WRITABLE: u64 = 2;

    fn new(max: usize) -> Cache {
        let max = max.min(GREFS);
        let mut index = Vec::new();
        if max > 0 {
            index.resize(GREFS, 0);
        }
        Cache {
            max,
            index,
            maps: Vec::with_capacity(max),
        }
    }

    fn get(&self, gref: u32) -> Option<Persistent> {
        let e = *self.index.get(gref as usize)?;
        (e & Self::PRESENT != 0).then_some(Persistent {
            addr: e & !(PAGE_SIZE - 1),
            writable: e & Self::WRITABLE != 0,
        })
    }

    /// Keep `m` as `gref`'s persistent mapping (writable or not) if there
    /// is room and the ref has none yet; false (and nothing kept)
    /// otherwise.
    fn insert(&mut self, gref: u32, m: Mapping, writable: bool) -> bool {
        if self.maps.len() >= self.max || !m.addr.is_multiple_of(PAGE_SIZE) {
            return false;
        }
        match self.index.get_mut(gref as usize) {
            Some(e) if *e == 0 => {
                self.maps.push(m);
                *e = m.addr | Self::PRESENT | if writable { Self::WRITABLE } else { 0 };
                true
            }
            _ => false,
        }
    }

    /// Mappings that can still be kept.
    fn room(&self) -> usize {
        self.max - self.maps.len()
    }

    /// An upper bound on the per-request mappings (those `insert` does not
    /// keep) that acquiring `segs` (`writable` for a READ) makes: a segment
    /// not served from the cache is mapped; it is kept if its ref can be
    /// cached and there is room, and later segments with that ref are then
    /// served from the cache. So past `room` such segments, each may be a
    /// per-request mapping, and so is every segment whose ref cannot be
    /// kept (cached read-only but wanted writable, or past the index).
    fn per_request_bound(&self, segs: &[SegIo], writable: bool) -> usize {
        let (mut keepable, mut not) = (0usize, 0usize);
        for io in segs {
            match self.get(io.seg.gref) {
                Some(p) if p.writable || !writable => {}
                Some(_) => not += 1,
                None if (io.seg.gref as usize) < self.index.len() => keepable += 1,
                None => not += 1,
            }
        }
        not + keepable.saturating_sub(self.room())
    }

    /// Forget every mapping; the caller unmaps them.
    fn take_all(&mut self) -> Vec<Mapping> {
        self.index.fill(0);
        core::mem::take(&mut self.maps)
    }
}

/// Persistent grants (map path) or bounce pages (copy path).
#[derive(Debug)]
enum PathState {
    Map(Cache),
    Copy {
        free: FreePages,
        /// Reserved for reading indirect segment lists.
        indirect_page: u64,
    },
}

/// The bounce pages, in ascending address order, and which are free (a
/// bitmap by position). A request takes the lowest run of free pages
/// adjacent in memory that holds all its segments, in order, so the device
/// gets one buffer per run of full-page segments rather than one per page:
///
/// ```text
///   free:  0x1000 0x2000 0x3000 | 0x5000 0x6000 0x7000 0x8000
///   take(4) -> 0x5000..=0x8000 (first run of 4); take(2) -> 0x1000, 0x2000
/// ```
///
/// With no such run it takes the lowest free pages, still ascending. A page
/// is given back by its position, so neither taking nor giving moves
/// anything.
#[derive(Debug)]
struct FreePages {
    pages: Vec<u64>,
    /// Bit `i % 64` of word `i / 64`: `pages[i]` is free.
    free: Vec<u64>,
    /// Bit `i % 64` of word `i / 64`: `pages[i]` follows `pages[i - 1]`
    /// in memory.
    follows: Vec<u64>,
    /// Bits set in `free`.
    count: usize,
}

impl FreePages {
    fn new(mut pages: Vec<u64>) -> FreePages {
        pages.sort_unstable();
        let words = pages.len().div_ceil(64);
        let mut free = alloc::vec![0u64; words];
        let mut follows = alloc::vec![0u64; words];
        for i in 0..pages.len() {
            free[i / 64] |= 1 << (i % 64);
            if i > 0 && pages[i - 1].checked_add(PAGE_SIZE) == Some(pages[i]) {
                follows[i / 64] |= 1 << (i % 64);
            }
        }
        let count = pages.len();
        FreePages {
            pages,
            free,
            follows,
            count,
        }
    }

    fn len(&self) -> usize {
        self.count
    }

    /// The position of the first free page at or after `from`.
    fn next_free(&self, from: usize) -> Option<usize> {
        let mut w = from / 64;
        let mut bits = *self.free.get(w)? & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                return Some(w * 64 + bits.trailing_zeros() as usize);
            }
            w += 1;
            bits = *self.free.get(w)?;
        }
    }

    /// How many free pages, each following the one before in memory, start
    /// at the free page `i`: a word of the bitmaps at a time.
    fn run_from(&self, i: usize) -> usize {
        let mut j = i + 1;
        loop {
            let w = j / 64;
            let (Some(f), Some(a)) = (self.free.get(w), self.follows.get(w)) else {
                return j - i;
            };
            let ones = ((f & a) >> (j % 64)).trailing_ones() as usize;
            j += ones;
            if ones == 0 || !j.is_multiple_of(64) {
                return j - i;
            }
        }
    }

    fn claim(&mut self, i: usize, put: &mut impl FnMut(u64, usize)) {
        self.free[i / 64] &= !(1 << (i % 64));
        self.count -= 1;
        put(self.pages[i], i);
    }

    /// Take `n` pages and hand each, ascending, with its position, to
    /// `put`; false (and nothing taken) if fewer are free.
    fn take(&mut self, n: usize, mut put: impl FnMut(u64, usize)) -> bool {
        if self.count < n {
            return false;
        }
        // The lowest run of n free pages adjacent in memory...
        let mut at = self.next_free(0);
        while let Some(i) = at {
            let run = self.run_from(i);
            if run >= n {
                for j in i..i + n {
                    self.claim(j, &mut put);
                }
                return true;
            }
            at = self.next_free(i + run);
        }
        // ...else the lowest n free pages (there are n).
        for _ in 0..n {
            let Some(i) = self.next_free(0) else { break };
            self.claim(i, &mut put);
        }
        true
    }

    /// Give back the page at position `i` (as `take` handed it out); a page
    /// that is free already stays free once (`count` stays true).
    fn give(&mut self, i: usize) {
        if let Some(w) = self.free.get_mut(i / 64) {
            if *w & 1 << (i % 64) == 0 {
                *w |= 1 << (i % 64);
                self.count += 1;
            }
        }
    }
}

const _: () = assert!(RING_SIZE as usize <= u64::BITS as usize);

/// One frontend's backend.
///
/// Taking, starting and completing a request allocates nothing: the
/// request lives in its [`Slot`] (reserved for the largest request), the
/// device's buffer list and grant copy batches are built in scratch
/// vectors reserved up front, and persistent grants are found through a
/// fixed index.
#[derive(Debug)]
pub struct Backend {
    frontend: u16,
    first_sector: u64,
    sectors: u64,
    read_only: bool,
    max_indirect: u16,
    path: PathState,
    conn: Conn,
    ring: Option<BackRing>,
    hostile: Option<ring::Error>,
    slots: Vec<Slot>,
    /// Bit `i` set: slot `i` is free.
    free_slots: u64,
    /// Slots in the device.
    in_device: usize,
    /// [`Config::map_quota`].
    map_quota: usize,
    /// Per-request mappings (segments [`Backing::Mapped`]) held now.
    request_maps: usize,
    gen: u32,
    /// The slot whose request waits for bounce pages or the device; it is
    /// started before any new request is taken.
    stalled: Option<usize>,
    /// Scratch: the buffer list of the request being submitted, as long
    /// as the most segments a request may have (one buffer each at most).
    bufs: alloc::boxed::Box<[Buf]>,
    /// Scratch: one batch of grant copies.
    ops: Vec<CopyOp>,
    /// Scratch: one indirect page's segment list, as read.
    list: Vec<u8>,
    dirty: bool,
    stats: Stats,
}

impl Backend {
    /// Requests one `poll` takes off the ring at most.
    pub const BUDGET: u32 = 2 * RING_SIZE;

    pub fn new(cfg: Config) -> Result<Backend, ConfigError> {
        if cfg.first_sector.checked_add(cfg.sectors).is_none() {
            return Err(ConfigError::RangeOverflow);
        }
        if cfg.max_indirect_segments > blkif::MAX_INDIRECT_SEGMENTS {
            return Err(ConfigError::IndirectLimit(cfg.max_indirect_segments));
        }
        let need = cfg.bounce_pages_needed();
        let path = match cfg.path {
            DataPath::Map { persistent } => PathState::Map(Cache::new(persistent)),
            DataPath::Copy { mut bounce } => {
                if let Some(a) = bounce.iter().find(|a| *a % PAGE_SIZE != 0) {
                    return Err(ConfigError::BounceUnaligned(*a));
                }
                if bounce.len() < need {
                    return Err(ConfigError::TooFewBouncePages {
                        have: bounce.len(),
                        need,
                    });
                }
                let indirect_page = bounce.pop().unwrap_or_default();
                PathState::Copy {
                    free: FreePages::new(bounce),
                    indirect_page,
                }
            }
        };
        let most_segments = blkif::MAX_SEGMENTS.max(usize::from(cfg.max_indirect_segments));
        let slots = (0..RING_SIZE)
            .map(|_| Slot {
                state: SlotState::Free,
                gen: 0,
                id: 0,
                operation: 0,
                kind: Kind::Flush,
                sector: 0,
                bytes: 0,
                acquired: false,
                holds: false,
                segs: SegList::new(most_segments),
            })
            .collect();
        Ok(Backend {
            frontend: cfg.frontend,
            first_sector: cfg.first_sector,
            sectors: cfg.sectors,
            read_only: cfg.read_only,
            max_indirect: cfg.max_indirect_segments,
            path,
            conn: Conn::Waiting,
            ring: None,
            hostile: None,
            slots,
            free_slots: u64::MAX >> (u64::BITS - RING_SIZE),
            in_device: 0,
            map_quota: cfg.map_quota,
            request_maps: 0,
            gen: 0,
            stalled: None,
            bufs: alloc::vec![Buf { addr: 0, len: 0 }; most_segments].into_boxed_slice(),
            ops: Vec::with_capacity(MAX_BATCH as usize),
            list: alloc::vec![0; SEGMENTS_PER_INDIRECT_PAGE * SEGMENT_SIZE],
            dirty: false,
            stats: Stats::default(),
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    pub fn conn(&self) -> Conn {
        self.conn
    }
    pub fn frontend(&self) -> u16 {
        self.frontend
    }
    /// Why the frontend was found hostile, if it was.
    pub fn hostile(&self) -> Option<ring::Error> {
        self.hostile
    }
    /// Requests the device is working on.
    pub fn in_flight(&self) -> usize {
        self.in_device
    }
    /// Per-request grant mappings held now (map path; see
    /// [`Config::map_quota`]).
    pub fn request_maps(&self) -> usize {
        self.request_maps
    }
    /// Grant refs mapped persistently now.
    pub fn persistent_grants(&self) -> usize {
        match &self.path {
            PathState::Map(cache) => cache.maps.len(),
            PathState::Copy { .. } => 0,
        }
    }
    /// Bounce pages not in use (copy path).
    pub fn free_bounce_pages(&self) -> usize {
        match &self.path {
            PathState::Map(_) => 0,
            PathState::Copy { free, .. } => free.len(),
        }
    }

    /// Look at the ring: connect, take and start requests, close. Call it
    /// when the frontend's event fires, and again while `more` is set.
    pub fn poll<P, G, D>(&mut self, page: &mut P, grants: &mut G, dev: &mut D) -> Poll
    where
        P: RingPage + ?Sized,
        G: Grants,
        D: BlockDevice,
    {
        let mut out = Poll::default();
        self.step(page, grants, dev, &mut out);
        out
    }

    /// The device finished the request `token` (`ok`: without error):
    /// answer it, then carry on as [`Backend::poll`] does.
    pub fn complete<P, G, D>(
        &mut self,
        token: u64,
        ok: bool,
        page: &mut P,
        grants: &mut G,
        dev: &mut D,
    ) -> Poll
    where
        P: RingPage + ?Sized,
        G: Grants,
        D: BlockDevice,
    {
        let mut out = Poll::default();
        if self.retire(token, ok, page, grants) {
            self.step(page, grants, dev, &mut out);
        }
        out
    }

    /// The first half of [`Backend::complete`]: answer the request `token`
    /// (false: no request of ours holds it), but leave the rest to the
    /// next [`Backend::poll`], which publishes the response (and says
    /// whether to notify), starts what waited and takes new requests. A
    /// driver domain that reaps several completions at once retires each
    /// and polls once.
    pub fn retire<P, G>(&mut self, token: u64, ok: bool, page: &mut P, grants: &mut G) -> bool
    where
        P: RingPage + ?Sized,
        G: Grants,
    {
        let s = (token & 0xffff_ffff) as usize;
        let gen = (token >> 32) as u32;
        match self.slots.get_mut(s) {
            Some(slot) if slot.state == SlotState::InDevice && slot.gen == gen => {
                slot.state = SlotState::Taken;
                self.in_device -= 1;
            }
            _ => {
                self.stats.stale_completions += 1;
                return false;
            }
        }
        let mut result = if ok { Ok(()) } else { Err(Reject::Device) };
        if ok && self.slots[s].kind == Kind::Read && matches!(self.path, PathState::Copy { .. }) {
            result = self.copy_out(s, grants);
        }
        self.answer(s, page, grants, result);
        true
    }

    /// End the connection from the driver domain's side: stop taking
    /// requests, and once the device has finished those it has, unmap
    /// everything and set the state Closed (keep calling `complete`).
    pub fn close<P, G>(&mut self, page: &mut P, grants: &mut G) -> Poll
    where
        P: RingPage + ?Sized,
        G: Grants,
    {
        let mut out = Poll::default();
        if self.conn == Conn::Waiting || self.conn == Conn::Connected {
            self.begin_close(page, grants, None, &mut out);
        }
        self.finish(page, grants, &mut out);
        out
    }

    fn step<P, G, D>(&mut self, page: &mut P, grants: &mut G, dev: &mut D, out: &mut Poll)
    where
        P: RingPage + ?Sized,
        G: Grants,
        D: BlockDevice,
    {
        if self.conn == Conn::Waiting {
            if ring::front_state(page) != Some(State::Connected) {
                return;
            }
            let r = BackRing::attach(page, ENTRY_SIZE);
            // Advertised before Connected (set_state fences first).
            page.store_u32(ring::off::BACK_MAX_INDIRECT, u32::from(self.max_indirect));
            r.set_state(page, State::Connected);
            self.ring = Some(r);
            self.conn = Conn::Connected;
            out.connected = true;
            out.notify = true;
        }
        if self.conn == Conn::Connected {
            if ring::front_state(page) != Some(State::Connected) {
                self.begin_close(page, grants, None, out);
            } else {
                self.run_ring(page, grants, dev, out);
            }
        }
        if self.dirty {
            self.dirty = false;
            if let Some(r) = self.ring.as_mut() {
                out.notify |= r.push_responses(page);
            }
        }
        if self.conn == Conn::Closing {
            self.finish(page, grants, out);
        }
    }

    fn run_ring<P, G, D>(&mut self, page: &mut P, grants: &mut G, dev: &mut D, out: &mut Poll)
    where
        P: RingPage + ?Sized,
        G: Grants,
        D: BlockDevice,
    {
        let mut budget = Self::BUDGET;
        loop {
            if let Some(s) = self.stalled.take() {
                if !self.start(s, page, grants, dev) {
                    return;
                }
            }
            if self.conn != Conn::Connected {
                return;
            }
            if budget == 0 {
                out.more = true;
                return;
            }
            let Some(r) = self.ring.as_mut() else { return };
            let mut e = [0u8; ENTRY_SIZE];
            match r.take_request(page, &mut e) {
                Ok(true) => {}
                Ok(false) => match r.final_check_for_requests(page) {
                    Ok(true) => continue,
                    Ok(false) => return,
                    Err(err) => {
                        self.begin_close(page, grants, Some(err), out);
                        return;
                    }
                },
                Err(err) => {
                    self.begin_close(page, grants, Some(err), out);
                    return;
                }
            }
            budget -= 1;
            self.stats.requests += 1;
            // From here on only `e`, our private copy, is looked at.
            let (id, operation) = (blkif::entry_id(&e), e[0]);
            // The ring let us take it, so fewer than RING_SIZE requests
            // (one slot each) were unanswered.
            if self.free_slots == 0 {
                self.refuse(page, id, operation, Reject::Device);
                continue;
            }
            let s = self.free_slots.trailing_zeros() as usize;
            self.free_slots &= !(1 << s);
            let slot = &mut self.slots[s];
            slot.state = SlotState::Taken;
            slot.id = id;
            slot.operation = operation;
            match self.parse(&e, s, grants) {
                Ok(()) => {
                    self.start(s, page, grants, dev);
                }
                Err(reason) => self.answer(s, page, grants, Err(reason)),
            }
        }
    }

    /// Decode and validate request `e` into slot `s` (whose `id` and
    /// `operation` are set); read an indirect request's segments.
    fn parse<G: Grants>(
        &mut self,
        e: &[u8; ENTRY_SIZE],
        s: usize,
        grants: &mut G,
    ) -> Result<(), Reject> {
        // Out of the slot while it is filled (moving a Vec moves no
        // segments), back in whatever happens.
        let mut segs = core::mem::take(&mut self.slots[s].segs);
        segs.len = 0;
        let r = self.parse_into(e, &mut segs, grants);
        let slot = &mut self.slots[s];
        slot.segs = segs;
        let (kind, sector, bytes) = r?;
        slot.kind = kind;
        slot.sector = sector;
        slot.bytes = bytes;
        slot.acquired = false;
        slot.holds = false;
        Ok(())
    }

    /// [`Backend::parse`]'s work: the segments into `segs` (empty, with
    /// room for the most a request may have); the kind, the first sector
    /// on the real disk and the bytes.
    fn parse_into<G: Grants>(
        &mut self,
        e: &[u8; ENTRY_SIZE],
        segs: &mut SegList,
        grants: &mut G,
    ) -> Result<(Kind, u64, u64), Reject> {
        let (kind, sector, total) = match e[0] {
            op @ (op::READ | op::WRITE) => {
                let r = Request::decode(e);
                let list = r
                    .segments()
                    .filter(|s| !s.is_empty())
                    .ok_or(Reject::SegmentCount)?;
                let kind = if op == op::READ {
                    Kind::Read
                } else {
                    Kind::Write
                };
                if kind == Kind::Write && self.read_only {
                    return Err(Reject::ReadOnly);
                }
                let mut total = 0;
                segs.push(list.iter().copied(), &mut total)?;
                (kind, r.sector, total)
            }
            op::FLUSH_DISKCACHE => {
                if e[1] != 0 {
                    return Err(Reject::SegmentCount);
                }
                return Ok((Kind::Flush, 0, 0));
            }
            op::INDIRECT => {
                if self.max_indirect == 0 {
                    return Err(Reject::Unsupported);
                }
                self.stats.indirect += 1;
                let r = IndirectRequest::from_entry(e);
                let kind = match r.indirect_op {
                    op::READ => Kind::Read,
                    op::WRITE => Kind::Write,
                    _ => return Err(Reject::IndirectOp),
                };
                if r.nr_segments == 0 || r.nr_segments > self.max_indirect {
                    return Err(Reject::SegmentCount);
                }
                // Refuse what we can before touching any grant.
                if kind == Kind::Write && self.read_only {
                    return Err(Reject::ReadOnly);
                }
                let total = self.read_indirect(&r, segs, grants)?;
                (kind, r.sector, total)
            }
            op::WRITE_BARRIER | op::DISCARD => return Err(Reject::Unsupported),
            _ => return Err(Reject::UnknownOp),
        };
        match sector.checked_add(total) {
            Some(end) if end <= self.sectors => {}
            _ => return Err(Reject::OutOfRange),
        }
        // no overflow: sector + total <= sectors, and first_sector +
        // sectors was checked in `new`
        Ok((kind, self.first_sector + sector, total * SECTOR_SIZE))
    }

    /// Copy an indirect request's segment list out of its granted pages,
    /// once, into `segs`, checking each segment; the sectors they cover. In the map path an indirect page is a grant like
    /// any other: it stays mapped as a persistent grant while there is
    /// room (read-only; a later READ into that ref maps it writable per
    /// request), and is read afresh for every request that names it.
    fn read_indirect<G: Grants>(
        &mut self,
        r: &IndirectRequest,
        segs: &mut SegList,
        grants: &mut G,
    ) -> Result<u64, Reject> {
        let n = usize::from(r.nr_segments);
        let mut total = 0;
        for (p, gref) in r.indirect_grefs.iter().take(r.pages()).enumerate() {
            let count = (n - p * SEGMENTS_PER_INDIRECT_PAGE).min(SEGMENTS_PER_INDIRECT_PAGE);
            let (addr, temporary) = match &mut self.path {
                PathState::Map(cache) => match cache.get(*gref) {
                    Some(pm) => {
                        self.stats.persistent_hits += 1;
                        (pm.addr, None)
                    }
                    None => {
                        let m = grants
                            .map(self.frontend, *gref, true)
                            .map_err(|_| Reject::Grant)?;
                        self.stats.maps += 1;
                        let kept = cache.insert(*gref, m, false);
                        (m.addr, (!kept).then_some(m))
                    }
                },
                PathState::Copy { indirect_page, .. } => {
                    let page = *indirect_page;
                    let op = CopyOp {
                        src: CopyPtr {
                            gref_or_page: u64::from(*gref),
                            domid: self.frontend,
                            offset: 0,
                        },
                        dst: CopyPtr {
                            gref_or_page: page / PAGE_SIZE,
                            domid: DOMID_SELF,
                            offset: 0,
                        },
                        len: (count * SEGMENT_SIZE) as u16,
                        flags: copy_flags::SRC_GREF,
                        status: 0,
                    };
                    run_copies(grants, &mut self.stats, &mut self.ops, core::iter::once(op))?;
                    (page, None)
                }
            };
            // count <= SEGMENTS_PER_INDIRECT_PAGE: within `list`
            let bytes = &mut self.list[..count * SEGMENT_SIZE];
            grants.read(addr, bytes);
            let list = bytes.as_chunks::<SEGMENT_SIZE>().0.iter().map(|b| Segment {
                gref: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                first_sect: b[4],
                last_sect: b[5],
            });
            let checked = segs.push(list, &mut total);
            if let Some(m) = temporary {
                unmap(grants, &mut self.stats, m);
            }
            checked?;
        }
        Ok(total)
    }

    /// Get the pages for slot `s`'s segments: map them, or take bounce
    /// pages (and copy a WRITE's data in). `Ok(false)`: not enough bounce
    /// pages free now, or the mappings would take the backend past its
    /// quota (nothing taken either way). On an error, what was taken is in
    /// the slot for `release`.
    fn acquire<G: Grants>(&mut self, s: usize, grants: &mut G) -> Result<bool, Reject> {
        let frontend = self.frontend;
        let stats = &mut self.stats;
        let request_maps = &mut self.request_maps;
        let slot = &mut self.slots[s];
        match &mut self.path {
            PathState::Map(cache) => {
                let writable = slot.kind == Kind::Read;
                // Persistent grants first: in the common case every
                // segment is one, and nothing is mapped or bounded.
                // Without a branch per segment: a miss's `page` is
                // meaningless (its backing says so) and set again below.
                let need = Cache::PRESENT | if writable { Cache::WRITABLE } else { 0 };
                let mut misses = 0usize;
                let index = cache.index.as_slice();
                for io in slot.segs.as_mut_slice().iter_mut() {
                    let e = index.get(io.seg.gref as usize).copied().unwrap_or(0);
                    let hit = e & need == need;
                    io.page = e & !(PAGE_SIZE - 1);
                    io.backing = if hit {
                        Backing::Persistent
                    } else {
                        Backing::None
                    };
                    misses += usize::from(!hit);
                }
                let first_hits = (slot.segs.len - misses) as u64;
                if misses == 0 {
                    stats.persistent_hits += first_hits;
                    slot.acquired = true;
                    return Ok(true);
                }
                // Within the quota, or alone if the request needs more
                // than all of it (then it waits for the others to end).
                let bound = cache.per_request_bound(slot.segs.as_slice(), writable);
                if bound > 0
                    && *request_maps > 0
                    && request_maps.saturating_add(bound) > self.map_quota
                {
                    stats.map_waits += 1;
                    return Ok(false);
                }
                let mut made = 0;
                let mut hits = first_hits;
                let mut result = Ok(());
                for io in slot.segs.as_mut_slice().iter_mut() {
                    if io.backing == Backing::Persistent {
                        continue;
                    }
                    let gref = io.seg.gref;
                    if let Some(p) = cache.get(gref) {
                        if p.writable || !writable {
                            hits += 1;
                            io.page = p.addr;
                            io.backing = Backing::Persistent;
                            continue;
                        }
                    }
                    let Ok(m) = grants.map(frontend, gref, !writable) else {
                        result = Err(Reject::Grant);
                        break;
                    };
                    stats.maps += 1;
                    if cache.insert(gref, m, writable) {
                        io.page = m.addr;
                        io.backing = Backing::Persistent;
                        continue;
                    }
                    if made == bound {
                        // Past the bound (a mapping the cache refused for
                        // its address): keep the quota, fail the request.
                        unmap(grants, stats, m);
                        result = Err(Reject::Grant);
                        break;
                    }
                    made += 1;
                    *request_maps += 1;
                    slot.holds = true;
                    io.page = m.addr;
                    io.backing = Backing::Mapped(m.handle);
                }
                stats.persistent_hits += hits;
                result?;
            }
            PathState::Copy { free, .. } => {
                let mut segs = slot.segs.as_mut_slice().iter_mut();
                let taken = free.take(segs.len(), |page, i| {
                    if let Some(io) = segs.next() {
                        io.page = page;
                        // no overflow: positions of pages of the domain's
                        // memory, far fewer than 2^32
                        io.backing = Backing::Bounce(i as u32);
                    }
                });
                if !taken {
                    return Ok(false);
                }
                slot.holds = true;
                if slot.kind == Kind::Write {
                    let list = slot.segs.as_slice().iter().map(|io| CopyOp {
                        src: CopyPtr {
                            gref_or_page: u64::from(io.seg.gref),
                            domid: frontend,
                            offset: io.seg.offset() as u16,
                        },
                        dst: CopyPtr {
                            gref_or_page: io.page / PAGE_SIZE,
                            domid: DOMID_SELF,
                            offset: io.seg.offset() as u16,
                        },
                        len: io.seg.bytes() as u16,
                        flags: copy_flags::SRC_GREF,
                        status: 0,
                    });
                    run_copies(grants, stats, &mut self.ops, list)?;
                }
            }
        }
        slot.acquired = true;
        Ok(true)
    }

    /// Copy slot `s`'s finished READ from the bounce pages to the granted
    /// pages.
    fn copy_out<G: Grants>(&mut self, s: usize, grants: &mut G) -> Result<(), Reject> {
        let frontend = self.frontend;
        let list = self.slots[s].segs.as_slice().iter().map(|io| CopyOp {
            src: CopyPtr {
                gref_or_page: io.page / PAGE_SIZE,
                domid: DOMID_SELF,
                offset: io.seg.offset() as u16,
            },
            dst: CopyPtr {
                gref_or_page: u64::from(io.seg.gref),
                domid: frontend,
                offset: io.seg.offset() as u16,
            },
            len: io.seg.bytes() as u16,
            flags: copy_flags::DST_GREF,
            status: 0,
        });
        run_copies(grants, &mut self.stats, &mut self.ops, list)
    }

    /// Give back what `acquire` took for slot `s` (persistent mappings
    /// stay).
    fn release<G: Grants>(&mut self, s: usize, grants: &mut G) {
        let slot = &mut self.slots[s];
        slot.acquired = false;
        if !core::mem::take(&mut slot.holds) {
            return;
        }
        for io in slot.segs.as_mut_slice().iter_mut() {
            match core::mem::replace(&mut io.backing, Backing::None) {
                Backing::None | Backing::Persistent => {}
                Backing::Mapped(handle) => {
                    // Counted back even if the unmap fails (counted in
                    // `unmap_failures`): a quota that shrank for good
                    // could hold a request back for ever.
                    self.request_maps = self.request_maps.saturating_sub(1);
                    unmap(
                        grants,
                        &mut self.stats,
                        Mapping {
                            handle,
                            addr: io.page,
                        },
                    )
                }
                Backing::Bounce(i) => {
                    if let PathState::Copy { free, .. } = &mut self.path {
                        free.give(i as usize);
                    }
                }
            }
        }
    }

    /// Acquire pages for slot `s`'s validated request and hand it to the
    /// device. false: it had to wait (bounce pages, the mapping quota or a
    /// busy device) and is kept as `stalled`; every `poll` and `complete`
    /// tries it again before taking new requests.
    fn start<P, G, D>(&mut self, s: usize, page: &mut P, grants: &mut G, dev: &mut D) -> bool
    where
        P: RingPage + ?Sized,
        G: Grants,
        D: BlockDevice,
    {
        if !self.slots[s].acquired {
            match self.acquire(s, grants) {
                Ok(true) => {}
                Ok(false) => {
                    self.stats.stalls += 1;
                    self.stalled = Some(s);
                    return false;
                }
                Err(r) => {
                    self.answer(s, page, grants, Err(r));
                    return true;
                }
            }
        }
        let gen = self.gen.wrapping_add(1);
        let token = u64::from(gen) << 32 | s as u64;
        let slot = &self.slots[s];
        let res = match slot.kind {
            Kind::Flush => dev.flush(token),
            Kind::Read | Kind::Write => {
                // One buffer per run of segments that follow each other in
                // memory (no overflow: at most 256 pages), written in
                // place: `bufs` has room for one per segment.
                let buf = |io: &SegIo| Buf {
                    addr: io.page + io.seg.offset() as u64,
                    len: io.seg.bytes() as u32,
                };
                let mut n = 0;
                if let Some((first, rest)) = slot.segs.as_slice().split_first() {
                    let mut run = buf(first);
                    for io in rest {
                        let b = buf(io);
                        if run.addr + u64::from(run.len) == b.addr {
                            run.len += b.len;
                        } else {
                            self.bufs[n] = run;
                            n += 1;
                            run = b;
                        }
                    }
                    self.bufs[n] = run;
                    n += 1;
                }
                let dir = if slot.kind == Kind::Read {
                    Direction::Read
                } else {
                    Direction::Write
                };
                dev.submit(token, slot.sector, dir, &self.bufs[..n])
            }
        };
        match res {
            Ok(()) => {
                self.gen = gen;
                let slot = &mut self.slots[s];
                slot.state = SlotState::InDevice;
                slot.gen = gen;
                self.in_device += 1;
                true
            }
            Err(DeviceError::Busy) => {
                self.stats.stalls += 1;
                self.stalled = Some(s);
                false
            }
            Err(DeviceError::Failed) => {
                self.answer(s, page, grants, Err(Reject::Device));
                true
            }
        }
    }

    /// Answer slot `s`'s request with `result` (counting it), give back
    /// what it holds and free the slot.
    fn answer<P, G>(&mut self, s: usize, page: &mut P, grants: &mut G, result: Result<(), Reject>)
    where
        P: RingPage + ?Sized,
        G: Grants,
    {
        self.release(s, grants);
        let slot = &mut self.slots[s];
        slot.state = SlotState::Free;
        self.free_slots |= 1 << s;
        let (id, operation, kind, bytes) = (slot.id, slot.operation, slot.kind, slot.bytes);
        match result {
            Ok(()) => {
                match kind {
                    Kind::Read => {
                        self.stats.reads += 1;
                        self.stats.bytes_read += bytes;
                    }
                    Kind::Write => {
                        self.stats.writes += 1;
                        self.stats.bytes_written += bytes;
                    }
                    Kind::Flush => self.stats.flushes += 1,
                }
                self.respond(page, id, operation, status::OKAY);
            }
            Err(r) => self.refuse(page, id, operation, r),
        }
    }

    fn refuse<P: RingPage + ?Sized>(&mut self, page: &mut P, id: u64, operation: u8, r: Reject) {
        self.stats.errors[r as usize] += 1;
        self.respond(page, id, operation, r.status());
    }

    fn respond<P: RingPage + ?Sized>(&mut self, page: &mut P, id: u64, operation: u8, st: i16) {
        if self.hostile.is_some() {
            return; // the ring is the frontend's garbage now
        }
        if let Some(r) = self.ring.as_mut() {
            let rsp = Response {
                id,
                operation,
                status: st,
            };
            if r.put_response(page, &rsp.encode()).is_ok() {
                self.dirty = true;
            }
        }
    }

    fn begin_close<P, G>(
        &mut self,
        page: &mut P,
        grants: &mut G,
        hostile: Option<ring::Error>,
        out: &mut Poll,
    ) where
        P: RingPage + ?Sized,
        G: Grants,
    {
        if let Some(err) = hostile {
            self.hostile = Some(err);
            self.stats.hostile += 1;
            out.hostile = true;
        }
        if let Some(s) = self.stalled.take() {
            self.answer(s, page, grants, Err(Reject::Device));
        }
        self.conn = Conn::Closing;
        if let Some(r) = self.ring.as_ref() {
            r.set_state(page, State::Closing);
            out.notify = true;
        }
    }

    /// Once the device holds nothing of ours: unmap everything, Closed.
    fn finish<P, G>(&mut self, page: &mut P, grants: &mut G, out: &mut Poll)
    where
        P: RingPage + ?Sized,
        G: Grants,
    {
        if self.conn != Conn::Closing || self.in_device > 0 {
            return;
        }
        if self.dirty {
            self.dirty = false;
            if let Some(r) = self.ring.as_mut() {
                out.notify |= r.push_responses(page);
            }
        }
        if let PathState::Map(cache) = &mut self.path {
            for m in cache.take_all() {
                unmap(grants, &mut self.stats, m);
            }
        }
        if let Some(r) = self.ring.as_ref() {
            r.set_state(page, State::Closed);
            out.notify = true;
        }
        self.conn = Conn::Closed;
        out.closed = true;
    }
}

fn unmap<G: Grants>(grants: &mut G, stats: &mut Stats, m: Mapping) {
    stats.unmaps += 1;
    if grants.unmap(m).is_err() {
        stats.unmap_failures += 1;
    }
}

/// Issue the copies `list` yields, in batches of at most
/// [`abi::grant::MAX_BATCH`] built in `ops` (scratch); any failed
/// operation fails them all.
fn run_copies<G: Grants>(
    grants: &mut G,
    stats: &mut Stats,
    ops: &mut Vec<CopyOp>,
    mut list: impl Iterator<Item = CopyOp>,
) -> Result<(), Reject> {
    loop {
        ops.clear();
        ops.extend(list.by_ref().take(MAX_BATCH as usize).map(|op| CopyOp {
            // an implementation that leaves a status unwritten fails
            status: GrantStatus::General as i16,
            ..op
        }));
        if ops.is_empty() {
            return Ok(());
        }
        stats.copies += ops.len() as u64;
        grants.copy(ops).map_err(|_| Reject::Grant)?;
        if ops.iter().any(|op| op.status != GrantStatus::Okay as i16) {
            return Err(Reject::Grant);
        }
    }
}
