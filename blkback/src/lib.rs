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
//!   and unmapped when it completes.
//! - [`DataPath::Copy`]: the device works on bounce pages of the driver
//!   domain and the hypervisor copies between them and the granted pages.
//!
//! Everything the backend needs from outside is a trait: the ring page
//! ([`abi::ring::RingPage`]), the grant operations ([`Grants`]) and the
//! disk ([`BlockDevice`]). The driver domain calls [`Backend::poll`] when
//! the frontend's event channel fires (and again while [`Poll::more`]),
//! [`Backend::complete`] when the device finishes a request, and sends the
//! frontend an event whenever a call returns [`Poll::notify`].
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

use alloc::collections::BTreeMap;
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
/// is its devices' I/O address space). Never crosses a page.
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
    /// Segments served by an already mapped persistent grant.
    pub persistent_hits: u64,
    pub maps: u64,
    pub unmaps: u64,
    pub unmap_failures: u64,
    /// Grant copy operations issued.
    pub copies: u64,
    /// Times a request waited for bounce pages or a busy device.
    pub stalls: u64,
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
    /// A persistent mapping, kept until the connection closes.
    Persistent,
    /// Mapped for this request; unmapped when it ends.
    Mapped(Mapping),
    /// One of our bounce pages.
    Bounce,
}

/// Where one segment's page is in the driver domain.
#[derive(Clone, Copy, Debug)]
struct SegIo {
    seg: Segment,
    page: u64,
    backing: Backing,
}

/// A validated request, private to the backend.
#[derive(Debug)]
struct Work {
    id: u64,
    operation: u8,
    kind: Kind,
    /// On the real disk.
    sector: u64,
    segs: Vec<Segment>,
    io: Vec<SegIo>,
    acquired: bool,
    bytes: u64,
}

#[derive(Debug)]
struct InFlight {
    gen: u32,
    work: Work,
}

#[derive(Clone, Copy, Debug)]
struct Persistent {
    map: Mapping,
    writable: bool,
}

/// Persistent grants (map path) or bounce pages (copy path).
#[derive(Debug)]
enum PathState {
    Map {
        max: usize,
        cache: BTreeMap<u32, Persistent>,
    },
    Copy {
        free: FreePages,
        /// Reserved for reading indirect segment lists.
        indirect_page: u64,
    },
}

/// The free bounce pages, in ascending address order. A request takes the
/// lowest run of adjacent pages that holds all its segments, in order, so
/// the device gets one buffer per run of full-page segments (the driver
/// domain merges buffers that are contiguous) rather than one per page:
///
/// ```text
///   free:  0x1000 0x2000 0x3000 | 0x5000 0x6000 0x7000 0x8000
///   take(4) -> 0x5000..=0x8000 (first run of 4); take(2) -> 0x1000, 0x2000
/// ```
///
/// With no such run it takes the lowest pages, still ascending.
#[derive(Debug)]
struct FreePages(Vec<u64>);

impl FreePages {
    fn new(mut pages: Vec<u64>) -> FreePages {
        pages.sort_unstable();
        FreePages(pages)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// `n` pages, ascending; `None` (and nothing taken) if fewer are free.
    fn take(&mut self, n: usize) -> Option<alloc::vec::Drain<'_, u64>> {
        if self.0.len() < n {
            return None;
        }
        let mut start = 0;
        let mut run = 0;
        for (i, page) in self.0.iter().enumerate() {
            if run > 0 && self.0[i - 1].checked_add(PAGE_SIZE) == Some(*page) {
                run += 1;
            } else {
                start = i;
                run = 1;
            }
            if run >= n {
                break;
            }
        }
        if run < n {
            start = 0;
        }
        Some(self.0.drain(start..start + n))
    }

    fn give(&mut self, page: u64) {
        let at = self.0.partition_point(|p| *p < page);
        self.0.insert(at, page);
    }
}

/// One frontend's backend.
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
    slots: Vec<Option<InFlight>>,
    gen: u32,
    stalled: Option<Work>,
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
            DataPath::Map { persistent } => PathState::Map {
                max: persistent,
                cache: BTreeMap::new(),
            },
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
        let mut slots = Vec::new();
        slots.resize_with(RING_SIZE as usize, || None);
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
            gen: 0,
            stalled: None,
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
        self.slots.iter().filter(|s| s.is_some()).count()
    }
    /// Grant refs mapped persistently now.
    pub fn persistent_grants(&self) -> usize {
        match &self.path {
            PathState::Map { cache, .. } => cache.len(),
            PathState::Copy { .. } => 0,
        }
    }
    /// Bounce pages not in use (copy path).
    pub fn free_bounce_pages(&self) -> usize {
        match &self.path {
            PathState::Map { .. } => 0,
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

    /// The device finished the request `token` (`ok`: without error).
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
        let slot = (token & 0xffff_ffff) as usize;
        let gen = (token >> 32) as u32;
        let taken = match self.slots.get_mut(slot) {
            Some(s) if s.as_ref().is_some_and(|f| f.gen == gen) => s.take(),
            _ => None,
        };
        let Some(InFlight { mut work, .. }) = taken else {
            self.stats.stale_completions += 1;
            return out;
        };
        let mut result = if ok { Ok(()) } else { Err(Reject::Device) };
        if ok && work.kind == Kind::Read && matches!(self.path, PathState::Copy { .. }) {
            result = self.copy_out(&work, grants);
        }
        self.release(&mut work, grants);
        match result {
            Ok(()) => {
                match work.kind {
                    Kind::Read => {
                        self.stats.reads += 1;
                        self.stats.bytes_read += work.bytes;
                    }
                    Kind::Write => {
                        self.stats.writes += 1;
                        self.stats.bytes_written += work.bytes;
                    }
                    Kind::Flush => self.stats.flushes += 1,
                }
                self.respond(page, work.id, work.operation, status::OKAY);
            }
            Err(r) => self.refuse(page, work.id, work.operation, r),
        }
        self.step(page, grants, dev, &mut out);
        out
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
            if let Some(w) = self.stalled.take() {
                if !self.start(w, page, grants, dev) {
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
            match self.parse(&e, grants) {
                Ok(w) => {
                    self.start(w, page, grants, dev);
                }
                Err(reason) => self.refuse(page, blkif::entry_id(&e), e[0], reason),
            }
        }
    }

    /// Decode and validate a request; read an indirect request's segments.
    fn parse<G: Grants>(&mut self, e: &[u8; ENTRY_SIZE], grants: &mut G) -> Result<Work, Reject> {
        let operation = e[0];
        let (kind, sector, segs) = match operation {
            op::READ | op::WRITE => {
                let r = Request::decode(e);
                let segs = r
                    .segments()
                    .filter(|s| !s.is_empty())
                    .ok_or(Reject::SegmentCount)?;
                let kind = if operation == op::READ {
                    Kind::Read
                } else {
                    Kind::Write
                };
                (kind, r.sector, segs.to_vec())
            }
            op::FLUSH_DISKCACHE => {
                if e[1] != 0 {
                    return Err(Reject::SegmentCount);
                }
                (Kind::Flush, 0, Vec::new())
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
                let segs = self.read_indirect(&r, grants)?;
                (kind, r.sector, segs)
            }
            op::WRITE_BARRIER | op::DISCARD => return Err(Reject::Unsupported),
            _ => return Err(Reject::UnknownOp),
        };
        if kind == Kind::Write && self.read_only {
            return Err(Reject::ReadOnly);
        }
        if !segs.iter().all(Segment::is_valid) {
            return Err(Reject::Segment);
        }
        let total: u64 = segs.iter().map(Segment::sectors).sum();
        if kind != Kind::Flush {
            match sector.checked_add(total) {
                Some(end) if end <= self.sectors => {}
                _ => return Err(Reject::OutOfRange),
            }
        }
        Ok(Work {
            id: blkif::entry_id(e),
            operation,
            kind,
            // no overflow: sector + total <= sectors, and first_sector +
            // sectors was checked in `new`
            sector: self.first_sector + sector,
            segs,
            io: Vec::new(),
            acquired: false,
            bytes: total * SECTOR_SIZE,
        })
    }

    /// Copy an indirect request's segment list out of its granted pages,
    /// once, into private memory.
    fn read_indirect<G: Grants>(
        &mut self,
        r: &IndirectRequest,
        grants: &mut G,
    ) -> Result<Vec<Segment>, Reject> {
        let n = usize::from(r.nr_segments);
        let mut segs = Vec::with_capacity(n);
        let mut buf = [0u8; PAGE_SIZE as usize];
        for (p, gref) in r.indirect_grefs.iter().take(r.pages()).enumerate() {
            let count = (n - p * SEGMENTS_PER_INDIRECT_PAGE).min(SEGMENTS_PER_INDIRECT_PAGE);
            let bytes = &mut buf[..count * SEGMENT_SIZE];
            match &self.path {
                PathState::Map { .. } => {
                    let m = grants
                        .map(self.frontend, *gref, true)
                        .map_err(|_| Reject::Grant)?;
                    self.stats.maps += 1;
                    grants.read(m.addr, bytes);
                    self.unmap(grants, m);
                }
                PathState::Copy { indirect_page, .. } => {
                    let page = *indirect_page;
                    let mut op = [CopyOp {
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
                        len: bytes.len() as u16,
                        flags: copy_flags::SRC_GREF,
                        status: 0,
                    }];
                    self.run_copies(grants, &mut op)?;
                    grants.read(page, bytes);
                }
            }
            for i in 0..count {
                if let Some(s) = Segment::decode_at(bytes, i) {
                    segs.push(s);
                }
            }
        }
        Ok(segs)
    }

    /// Get the pages for a request's segments: map them, or take bounce
    /// pages (and copy a WRITE's data in). `Ok(false)`: not enough bounce
    /// pages free now.
    fn acquire<G: Grants>(&mut self, w: &mut Work, grants: &mut G) -> Result<bool, Reject> {
        let frontend = self.frontend;
        match &mut self.path {
            PathState::Map { max, cache } => {
                w.acquired = true;
                let writable = w.kind == Kind::Read;
                for seg in &w.segs {
                    if let Some(p) = cache.get(&seg.gref) {
                        if p.writable || !writable {
                            self.stats.persistent_hits += 1;
                            w.io.push(SegIo {
                                seg: *seg,
                                page: p.map.addr,
                                backing: Backing::Persistent,
                            });
                            continue;
                        }
                    }
                    let m = grants
                        .map(frontend, seg.gref, !writable)
                        .map_err(|_| Reject::Grant)?;
                    self.stats.maps += 1;
                    let backing = if cache.len() < *max && !cache.contains_key(&seg.gref) {
                        cache.insert(seg.gref, Persistent { map: m, writable });
                        Backing::Persistent
                    } else {
                        Backing::Mapped(m)
                    };
                    w.io.push(SegIo {
                        seg: *seg,
                        page: m.addr,
                        backing,
                    });
                }
                Ok(true)
            }
            PathState::Copy { free, .. } => {
                let Some(pages) = free.take(w.segs.len()) else {
                    return Ok(false);
                };
                w.acquired = true;
                for (seg, page) in w.segs.iter().zip(pages) {
                    w.io.push(SegIo {
                        seg: *seg,
                        page,
                        backing: Backing::Bounce,
                    });
                }
                if w.kind == Kind::Write {
                    let mut ops: Vec<CopyOp> =
                        w.io.iter()
                            .map(|io| CopyOp {
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
                            })
                            .collect();
                    self.run_copies(grants, &mut ops)?;
                }
                Ok(true)
            }
        }
    }

    /// Copy a finished READ from the bounce pages to the granted pages.
    fn copy_out<G: Grants>(&mut self, w: &Work, grants: &mut G) -> Result<(), Reject> {
        let mut ops: Vec<CopyOp> =
            w.io.iter()
                .map(|io| CopyOp {
                    src: CopyPtr {
                        gref_or_page: io.page / PAGE_SIZE,
                        domid: DOMID_SELF,
                        offset: io.seg.offset() as u16,
                    },
                    dst: CopyPtr {
                        gref_or_page: u64::from(io.seg.gref),
                        domid: self.frontend,
                        offset: io.seg.offset() as u16,
                    },
                    len: io.seg.bytes() as u16,
                    flags: copy_flags::DST_GREF,
                    status: 0,
                })
                .collect();
        self.run_copies(grants, &mut ops)
    }

    /// Issue copies in batches; any failed operation fails them all.
    fn run_copies<G: Grants>(&mut self, grants: &mut G, ops: &mut [CopyOp]) -> Result<(), Reject> {
        for chunk in ops.chunks_mut(MAX_BATCH as usize) {
            for op in chunk.iter_mut() {
                // an implementation that leaves a status unwritten fails
                op.status = GrantStatus::General as i16;
            }
            self.stats.copies += chunk.len() as u64;
            grants.copy(chunk).map_err(|_| Reject::Grant)?;
            if chunk.iter().any(|op| op.status != GrantStatus::Okay as i16) {
                return Err(Reject::Grant);
            }
        }
        Ok(())
    }

    fn unmap<G: Grants>(&mut self, grants: &mut G, m: Mapping) {
        self.stats.unmaps += 1;
        if grants.unmap(m).is_err() {
            self.stats.unmap_failures += 1;
        }
    }

    /// Give back what `acquire` took (persistent mappings stay).
    fn release<G: Grants>(&mut self, w: &mut Work, grants: &mut G) {
        for io in core::mem::take(&mut w.io) {
            match io.backing {
                Backing::Persistent => {}
                Backing::Mapped(m) => self.unmap(grants, m),
                Backing::Bounce => {
                    if let PathState::Copy { free, .. } = &mut self.path {
                        free.give(io.page);
                    }
                }
            }
        }
        w.acquired = false;
    }

    /// Acquire pages for a validated request and hand it to the device.
    /// false: it had to wait (bounce pages or a busy device) and is kept.
    fn start<P, G, D>(&mut self, mut w: Work, page: &mut P, grants: &mut G, dev: &mut D) -> bool
    where
        P: RingPage + ?Sized,
        G: Grants,
        D: BlockDevice,
    {
        if !w.acquired {
            match self.acquire(&mut w, grants) {
                Ok(true) => {}
                Ok(false) => {
                    self.stats.stalls += 1;
                    self.stalled = Some(w);
                    return false;
                }
                Err(r) => {
                    self.release(&mut w, grants);
                    self.refuse(page, w.id, w.operation, r);
                    return true;
                }
            }
        }
        // At most RING_SIZE requests are unanswered, so a slot is free.
        let Some(slot) = self.slots.iter().position(Option::is_none) else {
            self.release(&mut w, grants);
            self.refuse(page, w.id, w.operation, Reject::Device);
            return true;
        };
        self.gen = self.gen.wrapping_add(1);
        let token = u64::from(self.gen) << 32 | slot as u64;
        let res = match w.kind {
            Kind::Flush => dev.flush(token),
            Kind::Read | Kind::Write => {
                let bufs: Vec<Buf> =
                    w.io.iter()
                        .map(|io| Buf {
                            addr: io.page + io.seg.offset() as u64,
                            len: io.seg.bytes() as u32,
                        })
                        .collect();
                let dir = if w.kind == Kind::Read {
                    Direction::Read
                } else {
                    Direction::Write
                };
                dev.submit(token, w.sector, dir, &bufs)
            }
        };
        match res {
            Ok(()) => {
                self.slots[slot] = Some(InFlight {
                    gen: self.gen,
                    work: w,
                });
                true
            }
            Err(DeviceError::Busy) => {
                self.stats.stalls += 1;
                self.stalled = Some(w);
                false
            }
            Err(DeviceError::Failed) => {
                self.release(&mut w, grants);
                self.refuse(page, w.id, w.operation, Reject::Device);
                true
            }
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
        if let Some(mut w) = self.stalled.take() {
            self.release(&mut w, grants);
            self.refuse(page, w.id, w.operation, Reject::Device);
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
        if self.conn != Conn::Closing || self.in_flight() > 0 {
            return;
        }
        if self.dirty {
            self.dirty = false;
            if let Some(r) = self.ring.as_mut() {
                out.notify |= r.push_responses(page);
            }
        }
        if let PathState::Map { cache, .. } = &mut self.path {
            let maps: Vec<Mapping> = core::mem::take(cache)
                .into_values()
                .map(|p| p.map)
                .collect();
            for m in maps {
                self.unmap(grants, m);
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
