//! blkfront: a virtual disk served by a blk driver domain's blkback, over a
//! blkif ring ([`crate::ring::FrontConn`]), grants and the vbd's event
//! channel.
//!
//! A connection is sized when it comes up ([`Shape`]): how many requests
//! it keeps in flight (slots, at most the ring's 32) and how many pages one
//! request moves at most. That is 11 (44 KiB, a plain request's segments)
//! unless the backend takes INDIRECT requests (it writes its limit into the
//! ring header before it says Connected, `abi::ring::off::BACK_MAX_INDIRECT`)
//! and the caller asked for larger transfers: then a transfer of up to the
//! smaller of the two limits is one INDIRECT request, whose segment list
//! is in a page of its slot. Requests of at most 11 segments stay plain.
//!
//! The frontend keeps its pages for the life of the connection (so that
//! blkback's persistent grants stay valid): a pool of `slots` x
//! pages-per-request pages granted read-write to the backend for READs,
//! as many granted read-only for WRITEs (the backend only reads what is
//! written), and with INDIRECT one read-only page per slot for its segment
//! lists. Every page is granted once, when the connection comes up, and
//! revoked when it closes; a request only names their grant references.
//! A data segment covers one page from its start.
//!
//! The data pages are shared by the slots, not owned by them: a request
//! takes as many pages as it has segments, the lowest run of adjacent free
//! pages of its pool (else the lowest free ones), and gives them back when
//! it completes. So the pages a workload ever hands the backend are as few
//! as it has in flight at once, the same ones again and again, in the same
//! order: a backend that keeps grants mapped (persistent grants) maps each
//! of them once, and a request's pages keep being adjacent in the
//! backend's mapping too. Since a pool holds a full request's pages for
//! every slot, a free slot always finds its pages.
//!
//! Requests carry a 64-bit id that the frontend never reuses; a response is
//! matched to its slot by id, and one that matches none is counted as a
//! stray (a broken or hostile backend) and otherwise ignored. Notifications
//! follow the ring's rule both ways: the backend is signalled only when it
//! asked to be, and the frontend sleeps only after
//! `final_check_for_responses`.
//!
//! The disk is the vbd's sectors `0..sectors`; the frontend does not check
//! requests against it (the backend must, and the workload runner tests
//! that it does).

use alloc::vec;
use alloc::vec::Vec;
use core::alloc::Layout;

use abi::blkif::{
    self, op, status, IndirectRequest, Request, Response, Segment, ENTRY_SIZE, MAX_INDIRECT_PAGES,
    MAX_SEGMENTS, RESPONSE_SIZE, SECTORS_PER_PAGE, SECTOR_SIZE,
};
use abi::domain::VbdInfo;
use abi::hypercall::Error;
use abi::ring::{off, RingPage, State};

use crate::grant::{self, GrantError};
use crate::ring::{ConnError, FrontConn, SharedPage, Waiter};

/// Bytes of a page.
const PAGE: usize = 4096;
/// Sectors one plain request moves at most (11 segments).
pub const MAX_DIRECT_SECTORS: u32 = MAX_SEGMENTS as u32 * SECTORS_PER_PAGE as u32;
/// Pages of each data pool at most (1 MiB each way).
pub const POOL_PAGES: usize = 256;
/// Most segments of one INDIRECT request blkfront makes: one pool's worth,
/// within blkif's limit (so a segment list fits one page).
pub const MAX_INDIRECT_SEGMENTS: usize = POOL_PAGES;
/// Most requests in flight: a pool holds at least 11 pages per slot.
pub const MAX_SLOTS: usize = POOL_PAGES / MAX_SEGMENTS;
const _: () = assert!(MAX_SLOTS == 23 && MAX_SLOTS <= blkif::RING_SIZE as usize);
const _: () = assert!(MAX_INDIRECT_SEGMENTS <= blkif::MAX_INDIRECT_SEGMENTS as usize);
const _: () = assert!(MAX_INDIRECT_SEGMENTS <= blkif::SEGMENTS_PER_INDIRECT_PAGE);
// Both pools and a segment-list page per slot fit the grant table.
const _: () =
    assert!(2 * POOL_PAGES + MAX_SLOTS <= grant::TABLE_ENTRIES - grant::FIRST_FREE_REF as usize);

/// Why a blkfront call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    Conn(ConnError),
    /// Every slot has a request in flight.
    Busy,
    /// 0 sectors, more than [`Blkfront::max_request_sectors`], or data
    /// that is not a whole number of sectors.
    BadLength,
    /// No such slot.
    BadSlot,
}

impl core::fmt::Display for BlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BlkError::Conn(e) => e.fmt(f),
            BlkError::Busy => f.write_str("every request slot is in flight"),
            BlkError::BadLength => {
                f.write_str("a request of 0 sectors, or more than the connection takes")
            }
            BlkError::BadSlot => f.write_str("no such request slot"),
        }
    }
}

impl From<ConnError> for BlkError {
    fn from(e: ConnError) -> Self {
        BlkError::Conn(e)
    }
}

impl From<Error> for BlkError {
    fn from(e: Error) -> Self {
        BlkError::Conn(ConnError::Hypercall(e))
    }
}

impl From<GrantError> for BlkError {
    fn from(e: GrantError) -> Self {
        BlkError::Conn(ConnError::Grant(e))
    }
}

impl From<abi::ring::Error> for BlkError {
    fn from(e: abi::ring::Error) -> Self {
        BlkError::Conn(ConnError::Ring(e))
    }
}

/// What a connection is sized for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Requests in flight at most (1..=[`MAX_SLOTS`]).
    pub slots: usize,
    /// Pages (segments) of one request at most, 11..=[`POOL_PAGES`]; more
    /// than 11 only over INDIRECT. A pool holds `slots * pages`.
    pub pages: usize,
}

impl Shape {
    /// `slots` plain requests in flight.
    pub fn plain(slots: usize) -> Shape {
        Shape {
            slots: slots.clamp(1, MAX_SLOTS),
            pages: MAX_SEGMENTS,
        }
    }

    /// For `depth` transfers of `sectors` sectors each in flight, with a
    /// backend that takes INDIRECT requests of up to `backend_max`
    /// segments (11 or fewer: none). A transfer is one request if the
    /// backend and the pools allow (`depth` requests of its pages fit
    /// [`POOL_PAGES`]), else it is split into requests of as many pages as
    /// do, at least 11; the slots are as many as the transfers' requests,
    /// within the ring and the pools.
    pub fn for_transfers(depth: usize, sectors: u32, backend_max: u32) -> Shape {
        let depth = depth.max(1);
        let want = sectors.div_ceil(u32::from(SECTORS_PER_PAGE)).max(1) as usize;
        let limit = (backend_max as usize).min(MAX_INDIRECT_SEGMENTS);
        let fit = POOL_PAGES / depth;
        let pages = want.min(limit).min(fit).max(MAX_SEGMENTS);
        Shape {
            slots: (depth * want.div_ceil(pages)).clamp(1, POOL_PAGES / pages),
            pages,
        }
    }

    fn indirect(&self) -> bool {
        self.pages > MAX_SEGMENTS
    }
}

/// `n` pages of our heap in one allocation, each granted to the backend.
#[derive(Debug)]
struct Pages {
    va: u64,
    grefs: Vec<u32>,
}

impl Pages {
    fn layout(n: usize) -> Layout {
        Layout::from_size_align(n.max(1) * PAGE, PAGE).unwrap_or(Layout::new::<u8>())
    }

    /// Allocates `n` pages and grants them (read-only or not) to `peer`; on
    /// failure what was granted is revoked and the memory freed.
    fn new(peer: u16, n: usize, readonly: bool) -> Result<Self, BlkError> {
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc::alloc_zeroed(Self::layout(n)) };
        if raw.is_null() {
            return Err(Error::NoSpace.into());
        }
        let mut p = Pages {
            va: raw as u64,
            grefs: Vec::with_capacity(n),
        };
        for i in 0..n {
            match grant::grant(peer, p.page(i), readonly) {
                Ok(r) => p.grefs.push(r),
                Err(e) => {
                    for &r in &p.grefs {
                        let _ = grant::revoke(r);
                    }
                    // SAFETY: allocated above with this layout; its grants
                    // were just revoked (never mapped: nobody knew them).
                    unsafe { alloc::alloc::dealloc(raw, Self::layout(n)) };
                    return Err(e.into());
                }
            }
        }
        Ok(p)
    }

    fn page(&self, i: usize) -> u64 {
        self.va + (i * PAGE) as u64
    }

    /// The first `len` bytes of page `i`, to write. Only for pages of a
    /// read-only grant (the backend cannot write them) that no request in
    /// flight holds: nobody else writes them while the slice lives.
    fn page_mut(&mut self, i: usize, len: usize) -> &mut [u8] {
        assert!(i < self.grefs.len() && len <= PAGE);
        // SAFETY: inside page `i` of our allocation (both checked), which
        // lives as long as `self`; nothing else of ours refers to it while
        // `self` is borrowed mutably, and no other domain writes it (see
        // above). Plain writes: the ring's full barrier orders them before
        // the request that names the page is published.
        unsafe { core::slice::from_raw_parts_mut(self.page(i) as *mut u8, len) }
    }

    /// Copies out from the start of page `i` (volatile: the backend may
    /// write it at any time).
    fn read_page(&self, i: usize, out: &mut [u8]) {
        assert!(i < self.grefs.len() && out.len() <= PAGE);
        let p = self.page(i) as *const u8;
        let tail_at = out.len() - out.len() % 8;
        for (k, w) in out.chunks_exact_mut(8).enumerate() {
            // SAFETY: 8-aligned (pages are page-aligned) and inside page
            // `i` (`out` is no longer than a page).
            let v = unsafe { (p as *const u64).add(k).read_volatile() };
            w.copy_from_slice(&v.to_ne_bytes());
        }
        for (k, b) in out[tail_at..].iter_mut().enumerate() {
            // SAFETY: inside the page, as above.
            *b = unsafe { p.add(tail_at + k).read_volatile() };
        }
    }

    /// Writes the segment list of a transfer of `sectors` sectors over
    /// `pages` of `pool` (whole pages, the last one partial) at the start
    /// of page `i` (volatile: the backend reads it).
    fn write_list(&mut self, i: usize, pool: &Pool, pages: &[u16], sectors: u32) {
        assert!(i < self.grefs.len() && pages.len() <= blkif::SEGMENTS_PER_INDIRECT_PAGE);
        let p = self.page(i) as *mut u64;
        let per_page = u32::from(SECTORS_PER_PAGE);
        let grefs = pool.pages.grefs.as_slice();
        let put = |k: usize, page: u16, n: u32| {
            // SAFETY: 8-aligned and inside page `i` (`k` is below
            // `pages.len()`: at most 512 segments of 8 bytes).
            unsafe {
                p.add(k)
                    .write_volatile(segment_word(grefs[usize::from(page)], n).to_le())
            };
        };
        // Every page whole but the last, then the last as it is.
        if let Some((&last, whole)) = pages.split_last() {
            for (k, &page) in whole.iter().enumerate() {
                put(k, page, per_page);
            }
            put(whole.len(), last, sectors - whole.len() as u32 * per_page);
        }
    }

    /// Revokes every grant; frees the pages if all were revoked (else they
    /// stay allocated: the backend may still have them mapped).
    fn release(self) -> Result<(), GrantError> {
        let mut result = Ok(());
        for &r in &self.grefs {
            if let Err(e) = grant::revoke(r) {
                result = Err(e);
            }
        }
        if result.is_ok() {
            // SAFETY: allocated in `new` with this layout; every grant of
            // it is revoked, so nobody else can reach it.
            unsafe { alloc::alloc::dealloc(self.va as *mut u8, Self::layout(self.grefs.len())) };
        }
        result
    }
}

/// Which of `len` pages are free: one bit each, set = free.
#[derive(Debug)]
struct FreeSet {
    bits: Vec<u64>,
    len: usize,
    count: usize,
}

impl FreeSet {
    fn all(len: usize) -> Self {
        let mut bits = vec![u64::MAX; len.div_ceil(64)];
        if !len.is_multiple_of(64) {
            if let Some(last) = bits.last_mut() {
                *last = (1 << (len % 64)) - 1;
            }
        }
        FreeSet {
            bits,
            len,
            count: len,
        }
    }

    /// The first page at or after `from` that is free (`free`) or not;
    /// `len` if none.
    fn next(&self, from: usize, free: bool) -> usize {
        let flip = if free { 0 } else { u64::MAX };
        let mut w = from / 64;
        let Some(&first) = self.bits.get(w) else {
            return self.len;
        };
        let mut word = (first ^ flip) & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                return (w * 64 + word.trailing_zeros() as usize).min(self.len);
            }
            w += 1;
            match self.bits.get(w) {
                Some(&b) => word = b ^ flip,
                None => return self.len,
            }
        }
    }

    /// Marks pages `start..start + n` free (`free`) or taken, a word at a
    /// time; how many changed.
    fn set_range(&mut self, start: usize, n: usize, free: bool) -> usize {
        let end = (start + n).min(self.len);
        let mut changed = 0;
        let mut p = start;
        while p < end {
            let w = p / 64;
            let hi = end.min((w + 1) * 64);
            let mask = (u64::MAX >> (64 - (hi - p))) << (p % 64);
            let old = self.bits[w];
            let new = if free { old | mask } else { old & !mask };
            changed += (old ^ new).count_ones() as usize;
            self.bits[w] = new;
            p = hi;
        }
        changed
    }

    /// Fills `out` with free pages, ascending: the lowest run of adjacent
    /// ones that holds them all (`Some(true)`), else the lowest
    /// (`Some(false)`); `None` (nothing taken) if fewer are free. (No
    /// allocation: it runs for every request.)
    fn take(&mut self, out: &mut [u16]) -> Option<bool> {
        let n = out.len();
        if n == 0 || self.count < n {
            return None;
        }
        let mut at = self.next(0, true);
        while at < self.len {
            let end = self.next(at, false);
            if end - at >= n {
                for (k, o) in out.iter_mut().enumerate() {
                    *o = (at + k) as u16;
                }
                self.count -= self.set_range(at, n, false);
                return Some(true);
            }
            at = self.next(end, true);
        }
        let mut at = 0;
        for o in out.iter_mut() {
            at = self.next(at, true);
            *o = at as u16;
            self.count -= self.set_range(at, 1, false);
        }
        Some(false)
    }

    /// Frees the run `start..start + n` (as [`FreeSet::give`]).
    fn give_run(&mut self, start: u16, n: usize) {
        self.count += self.set_range(usize::from(start), n, true);
    }

    /// Frees `pages` (again: a page already free stays free once).
    fn give(&mut self, pages: &[u16]) {
        for &p in pages {
            let p = usize::from(p);
            if p >= self.len {
                continue;
            }
            let (w, bit) = (p / 64, 1u64 << (p % 64));
            if self.bits[w] & bit == 0 {
                self.bits[w] |= bit;
                self.count += 1;
            }
        }
    }
}

/// One direction's pages and which of them are free.
#[derive(Debug)]
struct Pool {
    pages: Pages,
    free: FreeSet,
}

impl Pool {
    fn new(peer: u16, n: usize, readonly: bool) -> Result<Self, BlkError> {
        Ok(Pool {
            pages: Pages::new(peer, n, readonly)?,
            free: FreeSet::all(n),
        })
    }

    fn gref(&self, page: u16) -> u32 {
        self.pages.grefs[usize::from(page)]
    }

    /// Has `fill` write `sectors` sectors from `sector` into `pages` (of
    /// the WRITE pool, none in flight): page by page, with the sector each
    /// starts at, the last one partial.
    fn fill(&mut self, pages: &[u16], sector: u64, sectors: u32, fill: Fill<'_>) {
        let mut left = sectors as usize * SECTOR_SIZE as usize;
        for (k, &page) in pages.iter().enumerate() {
            let len = left.min(PAGE);
            left -= len;
            let first = sector + (k * usize::from(SECTORS_PER_PAGE)) as u64;
            fill(first, self.pages.page_mut(usize::from(page), len));
        }
    }

    /// Copies `pages` out into `out`, a page's worth each.
    fn read(&self, pages: &[u16], out: &mut [u8]) {
        for (&page, part) in pages.iter().zip(out.chunks_mut(PAGE)) {
            self.pages.read_page(usize::from(page), part);
        }
    }
}

/// The segment of `sectors` (1..=8) sectors from the start of page `gref`,
/// as blkif lays it out (a little-endian word).
fn segment_word(gref: u32, sectors: u32) -> u64 {
    u64::from(gref) | u64::from(sectors.clamp(1, 8) - 1) << 40
}

/// The data segments of `sectors` sectors over pages `grefs`, one per page
/// from the start of each, the last one partial.
fn data_segments(grefs: impl Iterator<Item = u32>, sectors: u32) -> impl Iterator<Item = Segment> {
    let mut left = sectors;
    grefs.map_while(move |gref| {
        if left == 0 {
            return None;
        }
        let n = left.min(u32::from(SECTORS_PER_PAGE));
        left -= n;
        Some(Segment {
            gref,
            first_sect: 0,
            last_sect: (n - 1) as u8,
        })
    })
}

/// A READ or WRITE of `sectors` (1..=88) sectors at `sector`, one segment
/// per page of `grefs` from the start of each page, the last one partial.
pub fn data_request(
    grefs: &[u32; MAX_SEGMENTS],
    operation: u8,
    sector: u64,
    sectors: u32,
    id: u64,
) -> Request {
    let sectors = sectors.clamp(1, MAX_DIRECT_SECTORS);
    let mut r = Request {
        operation,
        nr_segments: sectors.div_ceil(u32::from(SECTORS_PER_PAGE)) as u8,
        handle: 0,
        id,
        sector,
        ..Request::default()
    };
    for (seg, s) in r
        .seg
        .iter_mut()
        .zip(data_segments(grefs.iter().copied(), sectors))
    {
        *seg = s;
    }
    r
}

/// An INDIRECT READ or WRITE of `sectors` sectors at `sector` whose
/// segment list is in the page granted at `list`.
pub fn indirect_request(
    list: u32,
    operation: u8,
    sector: u64,
    sectors: u32,
    id: u64,
) -> IndirectRequest {
    let mut indirect_grefs = [0; MAX_INDIRECT_PAGES];
    indirect_grefs[0] = list;
    IndirectRequest {
        operation: op::INDIRECT,
        indirect_op: operation,
        nr_segments: sectors.div_ceil(u32::from(SECTORS_PER_PAGE)) as u16,
        id,
        sector,
        handle: 0,
        indirect_grefs,
    }
}

/// Writes a WRITE's data into one of its pages: the sector the page starts
/// at, the page's bytes.
type Fill<'a> = &'a mut dyn FnMut(u64, &mut [u8]);

/// A request in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFlight {
    pub id: u64,
    pub operation: u8,
    pub sector: u64,
    pub sectors: u32,
}

#[derive(Debug)]
struct Slot {
    busy: Option<InFlight>,
    /// How many of its pages (its row of [`Blkfront::pages`]) its last
    /// request made by [`Blkfront::submit_read`] or
    /// [`Blkfront::submit_write`] took (0 for hand-made requests), and
    /// whether they are the WRITE pool's. Given back to the pool when the
    /// request completes; a READ's data stays readable in them until the
    /// next request is submitted.
    npages: usize,
    write: bool,
    /// Its pages are one run of adjacent ones.
    run: bool,
}

/// A completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// The slot it used: [`Blkfront::read_data`] copies a READ's data out
    /// of it until the next request is submitted.
    pub slot: usize,
    pub req: InFlight,
    /// `blkif::status`: OKAY, ERROR or EOPNOTSUPP.
    pub status: i16,
}

impl Done {
    pub fn ok(&self) -> bool {
        self.status == status::OKAY
    }
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    /// Of them, INDIRECT requests.
    pub indirect: u64,
    pub responses: u64,
    pub errors: u64,
    /// Responses whose id matched no request in flight.
    pub strays: u64,
    /// Notifications sent to the backend.
    pub notifies: u64,
    /// Times the frontend slept waiting for a response.
    pub waits: u64,
}

/// One connected virtual disk.
#[derive(Debug)]
pub struct Blkfront {
    conn: FrontConn,
    sectors: u64,
    readonly: bool,
    shape: Shape,
    /// What the backend advertised (0: no INDIRECT).
    backend_indirect: u32,
    slots: Vec<Slot>,
    /// Bit `i` set: slot `i` has a request in flight.
    busy: u32,
    /// The pool pages each slot's request took: slot `i`'s are
    /// `pages[i * shape.pages..][..slots[i].npages]`.
    pages: Vec<u16>,
    read_pool: Pool,
    write_pool: Pool,
    /// With INDIRECT, slot `i`'s segment-list page is page `i`.
    lists: Option<Pages>,
    next_id: u64,
    stats: Stats,
}

impl Blkfront {
    /// Connects to the vbd's backend with `slots` requests in flight at
    /// most (1..=[`MAX_SLOTS`]) of up to 11 pages each (plain requests),
    /// waiting until `deadline_ns` for the backend.
    pub fn connect(
        vbd: &VbdInfo<'_>,
        slots: usize,
        w: &mut Waiter,
        deadline_ns: u64,
    ) -> Result<Self, BlkError> {
        Self::connect_shaped(vbd, |_| Shape::plain(slots), w, deadline_ns)
    }

    /// Connects for `depth` transfers of `sectors` sectors each in flight
    /// ([`Shape::for_transfers`] with what the backend advertises).
    pub fn connect_for(
        vbd: &VbdInfo<'_>,
        depth: usize,
        sectors: u32,
        w: &mut Waiter,
        deadline_ns: u64,
    ) -> Result<Self, BlkError> {
        Self::connect_shaped(
            vbd,
            |max| Shape::for_transfers(depth, sectors, max),
            w,
            deadline_ns,
        )
    }

    /// Connects (until `deadline_ns`), then sizes the connection by
    /// `shape` of the backend's INDIRECT limit and grants its pages. The
    /// shape is clamped to the pools' limits, and to plain requests if the
    /// backend takes no INDIRECT.
    fn connect_shaped(
        vbd: &VbdInfo<'_>,
        shape: impl FnOnce(u32) -> Shape,
        w: &mut Waiter,
        deadline_ns: u64,
    ) -> Result<Self, BlkError> {
        let mut conn = FrontConn::start(vbd, ENTRY_SIZE)?;
        conn.wait_connected(w, deadline_ns)?;
        // The backend wrote its limit before it said Connected. Whatever
        // it wrote, the requests stay within ours.
        let (_, page) = conn.parts();
        page.fence();
        let backend_indirect = page.load_u32(off::BACK_MAX_INDIRECT);
        let mut shape = shape(backend_indirect);
        let limit = (backend_indirect as usize).clamp(MAX_SEGMENTS, MAX_INDIRECT_SEGMENTS);
        shape.pages = shape.pages.clamp(MAX_SEGMENTS, limit);
        shape.slots = shape.slots.clamp(1, POOL_PAGES / shape.pages);
        let n = shape.slots * shape.pages;
        let pages = (|| {
            let read = Pool::new(vbd.peer, n, false)?;
            let write = match Pool::new(vbd.peer, n, true) {
                Ok(p) => p,
                Err(e) => {
                    let _ = read.pages.release();
                    return Err(e);
                }
            };
            if !shape.indirect() {
                return Ok((read, write, None));
            }
            match Pages::new(vbd.peer, shape.slots, true) {
                Ok(l) => Ok((read, write, Some(l))),
                Err(e) => {
                    let _ = read.pages.release();
                    let _ = write.pages.release();
                    Err(e)
                }
            }
        })();
        let (read_pool, write_pool, lists) = match pages {
            Ok(p) => p,
            Err(e) => {
                let _ = conn.close(w, deadline_ns);
                return Err(e);
            }
        };
        Ok(Blkfront {
            conn,
            sectors: vbd.sectors,
            readonly: vbd.readonly,
            shape,
            backend_indirect,
            slots: (0..shape.slots)
                .map(|_| Slot {
                    busy: None,
                    npages: 0,
                    write: false,
                    run: false,
                })
                .collect(),
            busy: 0,
            pages: vec![0; n],
            read_pool,
            write_pool,
            lists,
            next_id: 1,
            stats: Stats::default(),
        })
    }

    /// Sectors of the virtual disk.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// What the connection is sized for.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The most segments of an INDIRECT request the backend said it takes
    /// (0: it takes none).
    pub fn backend_indirect(&self) -> u32 {
        self.backend_indirect
    }

    /// Sectors one request moves at most.
    pub fn max_request_sectors(&self) -> u32 {
        (self.shape.pages * usize::from(SECTORS_PER_PAGE)) as u32
    }

    /// Bytes one request moves at most.
    pub fn max_request_bytes(&self) -> usize {
        self.shape.pages * PAGE
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn in_flight(&self) -> usize {
        self.busy.count_ones() as usize
    }

    pub fn free_slot(&self) -> Option<usize> {
        let i = (!self.busy).trailing_zeros() as usize;
        (i < self.slots.len()).then_some(i)
    }

    /// The connection, for tests that break its rules on purpose.
    pub fn conn_mut(&mut self) -> &mut FrontConn {
        &mut self.conn
    }

    /// The grant reference of page `slot * pages + page` of the READ pool
    /// (`write`: the WRITE pool; `page` below the shape's `pages`, `slot`
    /// below [`Blkfront::slot_count`]), for hand-made requests.
    pub fn gref(&self, slot: usize, page: usize, write: bool) -> Option<u32> {
        if slot >= self.slots.len() || page >= self.shape.pages {
            return None;
        }
        let p = if write {
            &self.write_pool
        } else {
            &self.read_pool
        };
        Some(p.gref((slot * self.shape.pages + page) as u16))
    }

    /// Pool pages (per direction) no request holds now.
    pub fn free_pages(&self, write: bool) -> usize {
        if write {
            self.write_pool.free.count
        } else {
            self.read_pool.free.count
        }
    }

    /// Puts `req` on the ring for slot `slot` (which must be free) and
    /// publishes it, notifying the backend if it asked. The request's id is
    /// the one it carries. For hand-made (even malformed) requests.
    pub fn submit_raw(&mut self, slot: usize, req: &Request, sectors: u32) -> Result<(), BlkError> {
        self.submit_inner(
            slot,
            &req.encode(),
            Self::in_flight_of(req, sectors),
            None::<&mut Option<fn(u32, &mut SharedPage)>>,
        )
    }

    /// As [`Blkfront::submit_raw`], but after the request is published and
    /// before the backend is notified (always, here), `tamper` gets the
    /// request's ring index and the page: how a test rewrites a request the
    /// backend may already be reading.
    pub fn submit_raw_then(
        &mut self,
        slot: usize,
        req: &Request,
        sectors: u32,
        tamper: impl FnOnce(u32, &mut SharedPage),
    ) -> Result<(), BlkError> {
        self.submit_inner(
            slot,
            &req.encode(),
            Self::in_flight_of(req, sectors),
            Some(&mut Some(tamper)),
        )
    }

    fn in_flight_of(req: &Request, sectors: u32) -> InFlight {
        InFlight {
            id: req.id,
            operation: req.operation,
            sector: req.sector,
            sectors,
        }
    }

    /// Puts the request `entry` on the ring for slot `slot` (which must be
    /// free) and publishes it.
    fn submit_inner<F: FnOnce(u32, &mut SharedPage)>(
        &mut self,
        slot: usize,
        entry: &[u8],
        req: InFlight,
        tamper: Option<&mut Option<F>>,
    ) -> Result<(), BlkError> {
        if !self.conn.is_connected() {
            return Err(ConnError::Closed {
                state: self.conn.back_state(),
            }
            .into());
        }
        let s = self.slots.get_mut(slot).ok_or(BlkError::BadSlot)?;
        if s.busy.is_some() {
            return Err(BlkError::Busy);
        }
        // What its last request used went back to the pool when it
        // completed; `submit` records this one's pages once it is out.
        s.npages = 0;
        let (ring, page) = self.conn.parts();
        let idx = ring.req_prod_pvt();
        ring.put_request(page, entry)?;
        s.busy = Some(req);
        self.busy |= 1 << slot;
        self.stats.requests += 1;
        let mut notify = ring.push_requests(page);
        if let Some(f) = tamper.and_then(Option::take) {
            f(idx, page);
            notify = true;
        }
        if notify {
            self.stats.notifies += 1;
            self.conn.notify()?;
        }
        Ok(())
    }

    /// A fresh request id.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Submits a READ or WRITE (`fill` writes the data) of `sectors`
    /// sectors over pages taken from the pool: a plain request for up to
    /// 11 pages, else an INDIRECT one.
    fn submit(
        &mut self,
        operation: u8,
        sector: u64,
        sectors: u32,
        fill: Option<Fill<'_>>,
    ) -> Result<usize, BlkError> {
        if sectors == 0 || sectors > self.max_request_sectors() {
            return Err(BlkError::BadLength);
        }
        let slot = self.free_slot().ok_or(BlkError::Busy)?;
        let write = operation == op::WRITE;
        let n = sectors.div_ceil(u32::from(SECTORS_PER_PAGE)) as usize;
        let row = slot * self.shape.pages;
        // Nothing of this slot's last request is to be read any more.
        self.slots[slot].npages = 0;
        let pages = &mut self.pages[row..row + n];
        let pool = if write {
            &mut self.write_pool
        } else {
            &mut self.read_pool
        };
        // A pool holds `shape.pages` pages per slot, so a free slot always
        // finds them.
        let run = pool.free.take(pages).ok_or(BlkError::Busy)?;
        if let Some(f) = fill {
            pool.fill(pages, sector, sectors, f);
        }
        let pages = &*pages;
        let pool = &*pool;
        let id = self.next_id;
        let req = InFlight {
            id,
            operation,
            sector,
            sectors,
        };
        let r = match &mut self.lists {
            Some(lists) if n > MAX_SEGMENTS => {
                lists.write_list(slot, pool, pages, sectors);
                let r = indirect_request(lists.grefs[slot], operation, sector, sectors, id);
                self.submit_inner(
                    slot,
                    &r.encode(),
                    req,
                    None::<&mut Option<fn(u32, &mut SharedPage)>>,
                )
                .inspect(|_| self.stats.indirect += 1)
            }
            _ => {
                let mut r = Request {
                    operation,
                    nr_segments: n as u8,
                    id,
                    sector,
                    ..Request::default()
                };
                let grefs = pages.iter().map(|&p| pool.gref(p));
                for (seg, s) in r.seg.iter_mut().zip(data_segments(grefs, sectors)) {
                    *seg = s;
                }
                self.submit_inner(
                    slot,
                    &r.encode(),
                    req,
                    None::<&mut Option<fn(u32, &mut SharedPage)>>,
                )
            }
        };
        if let Err(e) = r {
            let pool = if write {
                &mut self.write_pool
            } else {
                &mut self.read_pool
            };
            pool.free.give(&self.pages[row..row + n]);
            return Err(e);
        }
        self.next_id += 1;
        let s = &mut self.slots[slot];
        s.npages = n;
        s.write = write;
        s.run = run;
        Ok(slot)
    }

    /// Starts reading `sectors` sectors at `sector`; returns the slot.
    pub fn submit_read(&mut self, sector: u64, sectors: u32) -> Result<usize, BlkError> {
        self.submit(op::READ, sector, sectors, None)
    }

    /// Starts writing `data` (whole sectors, at most
    /// [`Blkfront::max_request_bytes`]) at `sector`; returns the slot.
    pub fn submit_write(&mut self, sector: u64, data: &[u8]) -> Result<usize, BlkError> {
        if data.is_empty()
            || !data.len().is_multiple_of(SECTOR_SIZE as usize)
            || data.len() > self.max_request_bytes()
        {
            return Err(BlkError::BadLength);
        }
        let sectors = (data.len() / SECTOR_SIZE as usize) as u32;
        let mut copy = |first: u64, page: &mut [u8]| {
            let at = (first - sector) as usize * SECTOR_SIZE as usize;
            page.copy_from_slice(&data[at..at + page.len()]);
        };
        self.submit(op::WRITE, sector, sectors, Some(&mut copy))
    }

    /// Starts writing `sectors` sectors at `sector` whose data `fill`
    /// writes straight into the granted pages (no copy): it is called for
    /// each page in turn with the sector the page starts at and the page's
    /// bytes (4 KiB, the last page as much as is left). Returns the slot.
    pub fn submit_write_with(
        &mut self,
        sector: u64,
        sectors: u32,
        fill: &mut dyn FnMut(u64, &mut [u8]),
    ) -> Result<usize, BlkError> {
        self.submit(op::WRITE, sector, sectors, Some(fill))
    }

    /// Starts a cache flush (no segments); returns the slot.
    pub fn submit_flush(&mut self) -> Result<usize, BlkError> {
        let slot = self.free_slot().ok_or(BlkError::Busy)?;
        let id = self.next_id();
        let req = Request {
            operation: op::FLUSH_DISKCACHE,
            id,
            ..Request::default()
        };
        self.submit_raw(slot, &req, 0)?;
        Ok(slot)
    }

    /// Copies the data of slot `slot`'s last READ into `out` (at most the
    /// sectors it read). Valid until the next request is submitted (its
    /// pages are free again once it completed).
    pub fn read_data(&self, slot: usize, out: &mut [u8]) -> Result<(), BlkError> {
        let s = self.slots.get(slot).ok_or(BlkError::BadSlot)?;
        if s.write || out.len() > s.npages * PAGE {
            return Err(BlkError::BadLength);
        }
        let row = slot * self.shape.pages;
        self.read_pool.read(&self.pages[row..row + s.npages], out);
        Ok(())
    }

    /// Takes every response there is, calling `f` for each that matches a
    /// request in flight; returns how many did. A backend that has closed
    /// the connection or overruns the ring is an error (what was in flight
    /// stays so).
    pub fn poll(&mut self, mut f: impl FnMut(Done)) -> Result<usize, BlkError> {
        let mut n = 0;
        loop {
            let mut raw = [0u8; RESPONSE_SIZE];
            let (ring, page) = self.conn.parts();
            if !ring.take_response(page, &mut raw)? {
                break;
            }
            let rsp = Response::decode(&raw);
            self.stats.responses += 1;
            let Some(slot) = self.slot_of(rsp.id) else {
                self.stats.strays += 1;
                continue;
            };
            let s = &mut self.slots[slot];
            let Some(req) = s.busy.take() else {
                continue;
            };
            self.busy &= !(1 << slot);
            // Its pages are free again; `pages` still names them for
            // `read_data` until the next submission takes any.
            let (npages, write, run) = (s.npages, s.write, s.run);
            let row = slot * self.shape.pages;
            let pool = if write {
                &mut self.write_pool
            } else {
                &mut self.read_pool
            };
            let pages = &self.pages[row..row + npages];
            match pages.first() {
                Some(&first) if run => pool.free.give_run(first, npages),
                _ => pool.free.give(pages),
            }
            if rsp.status != status::OKAY {
                self.stats.errors += 1;
            }
            n += 1;
            f(Done {
                slot,
                req,
                status: rsp.status,
            });
        }
        if n == 0 && !self.conn.is_connected() {
            return Err(ConnError::Closed {
                state: self.conn.back_state(),
            }
            .into());
        }
        Ok(n)
    }

    /// The slot whose request in flight has id `id`.
    fn slot_of(&self, id: u64) -> Option<usize> {
        let mut busy = self.busy;
        while busy != 0 {
            let i = busy.trailing_zeros() as usize;
            if self.slots[i].busy.is_some_and(|b| b.id == id) {
                return Some(i);
            }
            busy &= busy - 1;
        }
        None
    }

    /// Sleeps until the backend may have answered (or `deadline_ns`); true
    /// if a response is waiting. Asks to be notified first
    /// (`final_check_for_responses`), so no notification is missed.
    pub fn wait(&mut self, w: &mut Waiter, deadline_ns: u64) -> Result<bool, BlkError> {
        let (ring, page) = self.conn.parts();
        if ring.final_check_for_responses(page)? {
            return Ok(true);
        }
        if !self.conn.is_connected() {
            return Err(ConnError::Closed {
                state: self.conn.back_state(),
            }
            .into());
        }
        self.stats.waits += 1;
        w.wait(self.conn.port(), deadline_ns)?;
        let (ring, page) = self.conn.parts();
        Ok(ring.unconsumed_responses(page)? > 0)
    }

    /// Waits for the request in `slot` to complete (until `deadline_ns`);
    /// other completions are passed to `f` as they come.
    pub fn complete_slot(
        &mut self,
        slot: usize,
        w: &mut Waiter,
        deadline_ns: u64,
        mut f: impl FnMut(Done),
    ) -> Result<Done, BlkError> {
        loop {
            let mut mine = None;
            self.poll(|d| {
                if d.slot == slot {
                    mine = Some(d);
                } else {
                    f(d);
                }
            })?;
            if let Some(d) = mine {
                return Ok(d);
            }
            if !self.wait(w, deadline_ns)? && crate::time_ns() >= deadline_ns {
                return Err(ConnError::Timeout {
                    state: self.conn.back_state(),
                }
                .into());
            }
        }
    }

    /// Reads `out.len()` bytes (whole sectors, at most 44 KiB) at `sector`
    /// and waits for them; the response's status.
    pub fn read_sync(
        &mut self,
        w: &mut Waiter,
        sector: u64,
        out: &mut [u8],
        deadline_ns: u64,
    ) -> Result<i16, BlkError> {
        if out.is_empty() || !out.len().is_multiple_of(SECTOR_SIZE as usize) {
            return Err(BlkError::BadLength);
        }
        let slot = self.submit_read(sector, (out.len() / SECTOR_SIZE as usize) as u32)?;
        let d = self.complete_slot(slot, w, deadline_ns, |_| {})?;
        if d.ok() {
            self.read_data(slot, out)?;
        }
        Ok(d.status)
    }

    /// Writes `data` at `sector` and waits; the response's status.
    pub fn write_sync(
        &mut self,
        w: &mut Waiter,
        sector: u64,
        data: &[u8],
        deadline_ns: u64,
    ) -> Result<i16, BlkError> {
        let slot = self.submit_write(sector, data)?;
        Ok(self.complete_slot(slot, w, deadline_ns, |_| {})?.status)
    }

    /// Flushes and waits; the response's status.
    pub fn flush_sync(&mut self, w: &mut Waiter, deadline_ns: u64) -> Result<i16, BlkError> {
        let slot = self.submit_flush()?;
        Ok(self.complete_slot(slot, w, deadline_ns, |_| {})?.status)
    }

    /// The backend's state word.
    pub fn back_state(&self) -> Option<State> {
        self.conn.back_state()
    }

    /// Closes the connection (see [`FrontConn::close`]) and revokes the
    /// data grants; pages the backend still holds are leaked, not freed.
    pub fn close(self, w: &mut Waiter, deadline_ns: u64) -> Result<(), BlkError> {
        let Blkfront {
            conn,
            read_pool,
            write_pool,
            lists,
            ..
        } = self;
        let mut result = conn.close(w, deadline_ns).map_err(BlkError::from);
        for p in [Some(read_pool.pages), Some(write_pool.pages), lists]
            .into_iter()
            .flatten()
        {
            if let Err(e) = p.release() {
                result = result.and(Err(e.into()));
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A set of `len` pages of which `free` are free.
    fn set(len: usize, free: &[u16]) -> FreeSet {
        let mut f = FreeSet {
            bits: vec![0; len.div_ceil(64)],
            len,
            count: 0,
        };
        f.give(free);
        f
    }

    fn free_list(f: &FreeSet) -> Vec<u16> {
        (0..f.len as u16)
            .filter(|&p| f.bits[usize::from(p) / 64] & (1 << (p % 64)) != 0)
            .collect()
    }

    #[test]
    fn pool_takes_the_lowest_run_and_reuses_pages() {
        let mut p = FreeSet::all(44);
        // A steady 11 + 5 page pattern keeps to the same 16 pages.
        for _ in 0..4 {
            let (mut a, mut b) = ([0u16; 11], [0u16; 5]);
            assert!(p.take(&mut a).is_some() && p.take(&mut b).is_some());
            assert_eq!(a.to_vec(), (0..11).collect::<Vec<u16>>());
            assert_eq!(b.to_vec(), (11..16).collect::<Vec<u16>>());
            p.give(&a);
            p.give(&b);
        }
        assert_eq!(free_list(&p), (0..44).collect::<Vec<u16>>());
        assert_eq!(p.count, 44);
        // Out of order: the lowest run that fits, else the lowest pages.
        let mut p = set(10, &[0, 1, 3, 4, 5, 9]);
        let (mut three, mut two, mut one) = ([0u16; 3], [0u16; 2], [0u16; 1]);
        assert!(p.take(&mut three) == Some(true) && three == [3, 4, 5]);
        assert!(p.take(&mut two) == Some(true) && two == [0, 1]);
        p.give(&[0, 1]);
        assert!(p.take(&mut three) == Some(false) && three == [0, 1, 9]);
        assert_eq!(p.take(&mut one), None);
        p.give(&[4, 4, 3]);
        assert_eq!((free_list(&p), p.count), (vec![3, 4], 2));
        assert_eq!(p.take(&mut []), None);
        // Pages past the set are not given.
        p.give(&[10, 200]);
        assert_eq!(p.count, 2);
        // A run given back a word at a time, again or not.
        let mut p = FreeSet::all(200);
        let mut run = [0u16; 150];
        assert_eq!(p.take(&mut run), Some(true));
        assert_eq!(p.count, 50);
        p.give_run(60, 10);
        p.give_run(60, 70);
        assert_eq!(
            free_list(&p),
            (60..130).chain(150..200).collect::<Vec<u16>>()
        );
        assert_eq!(p.count, 120);
        p.give_run(190, 20);
        assert_eq!(p.count, 120);
    }

    #[test]
    fn pool_runs_cross_bitmap_words() {
        let mut p = FreeSet::all(POOL_PAGES);
        let mut a = [0u16; 60];
        let mut b = [0u16; 16];
        assert!(p.take(&mut a).is_some() && p.take(&mut b).is_some());
        assert_eq!(b.to_vec(), (60..76).collect::<Vec<u16>>());
        // Holes at 10..14 and 62..64: a run of 16 is found past them.
        p.give(&[10, 11, 12, 13, 62, 63]);
        let mut c = [0u16; 16];
        assert_eq!(p.take(&mut c), Some(true));
        assert_eq!(c.to_vec(), (76..92).collect::<Vec<u16>>());
        // 4 fit the first hole; the last page of the set can be taken.
        let mut d = [0u16; 4];
        assert!(p.take(&mut d) == Some(true) && d == [10, 11, 12, 13]);
        let mut rest = vec![0u16; p.count];
        assert_eq!(p.take(&mut rest), Some(false));
        assert_eq!((rest[0], rest[1], *rest.last().unwrap()), (62, 63, 255));
        assert_eq!(p.count, 0);
        assert_eq!(p.take(&mut [0u16; 1]), None);
    }

    #[test]
    fn shapes_fit_transfers_to_the_backend_and_the_pools() {
        let shape = |depth, sectors, backend| {
            let s = Shape::for_transfers(depth, sectors, backend);
            (s.slots, s.pages)
        };
        let max = u32::from(blkif::MAX_INDIRECT_SEGMENTS);
        // 64 KiB x 16: one INDIRECT request of 16 pages each.
        assert_eq!(shape(16, 128, max), (16, 16));
        // Without INDIRECT, 88 + 40 sectors, within the pools (23 x 11).
        assert_eq!(shape(16, 128, 0), (23, 11));
        assert_eq!(shape(4, 128, 0), (8, 11));
        assert_eq!(shape(4, 128, 11), (8, 11));
        // A backend limit below the transfer: requests of its size.
        assert_eq!(shape(4, 128, 12), (8, 12));
        // Small transfers are plain.
        assert_eq!(shape(16, 8, max), (16, 11));
        assert_eq!(shape(1, 8, max), (1, 11));
        assert_eq!(shape(4, 32, max), (4, 11));
        // 1 MiB: one request if alone; split when deep.
        assert_eq!(shape(1, 2048, max), (1, 256));
        assert_eq!(shape(32, 2048, max), (23, 11));
        // 128 KiB x 16: two requests of 16 pages each.
        assert_eq!(shape(16, 256, max), (16, 16));
        // Every shape fits the pools.
        for depth in 1..=32 {
            for sectors in [1, 8, 88, 89, 128, 256, 1000, 2048] {
                for backend in [0, 11, 16, 256, 1000] {
                    let s = Shape::for_transfers(depth, sectors, backend);
                    assert!(s.slots >= 1 && s.slots * s.pages <= POOL_PAGES);
                    assert!(s.pages >= MAX_SEGMENTS && s.pages <= MAX_INDIRECT_SEGMENTS);
                    assert!(s.pages <= MAX_SEGMENTS || s.pages <= backend as usize);
                }
            }
        }
        assert_eq!(
            Shape::plain(40),
            Shape {
                slots: 23,
                pages: 11
            }
        );
        assert_eq!(Shape::plain(0).slots, 1);
    }

    #[test]
    fn indirect_requests_name_their_segment_list() {
        let r = indirect_request(77, op::WRITE, 256, 128, 9);
        assert_eq!(
            (
                r.operation,
                r.indirect_op,
                r.nr_segments,
                r.id,
                r.sector,
                r.handle
            ),
            (op::INDIRECT, op::WRITE, 16, 9, 256, 0)
        );
        assert_eq!(r.indirect_grefs, [77, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.pages(), 1);
        assert_eq!(IndirectRequest::decode(&r.encode()), r);
        // 100 sectors: 12 whole pages and 4 sectors of a 13th.
        let segs: Vec<Segment> = data_segments(500..600, 100).collect();
        assert_eq!(segs.len(), 13);
        assert!(segs
            .iter()
            .take(12)
            .all(|s| s.first_sect == 0 && s.last_sect == 7));
        assert_eq!(
            segs[12],
            Segment {
                gref: 512,
                first_sect: 0,
                last_sect: 3
            }
        );
        assert_eq!(segs.iter().map(|s| s.sectors()).sum::<u64>(), 100);
        assert_eq!(indirect_request(1, op::READ, 0, 100, 1).nr_segments, 13);
        // The words of a segment list are the segments' layout.
        for s in segs {
            let word = segment_word(s.gref, s.last_sect as u32 + 1);
            assert_eq!(word.to_le_bytes(), s.encode());
        }
    }

    #[test]
    fn requests_cover_their_sectors() {
        let grefs: [u32; MAX_SEGMENTS] = core::array::from_fn(|i| 100 + i as u32);
        let r = data_request(&grefs, op::READ, 64, 20, 7);
        assert_eq!(
            (r.operation, r.nr_segments, r.id, r.sector),
            (op::READ, 3, 7, 64)
        );
        let segs = r.segments().unwrap();
        assert_eq!(
            segs,
            [
                Segment {
                    gref: 100,
                    first_sect: 0,
                    last_sect: 7
                },
                Segment {
                    gref: 101,
                    first_sect: 0,
                    last_sect: 7
                },
                Segment {
                    gref: 102,
                    first_sect: 0,
                    last_sect: 3
                },
            ]
        );
        assert_eq!(segs.iter().map(|s| s.sectors()).sum::<u64>(), 20);
        let r = data_request(&grefs, op::WRITE, 0, MAX_DIRECT_SECTORS, 8);
        assert_eq!(r.nr_segments, 11);
        assert!(r
            .segments()
            .unwrap()
            .iter()
            .all(|s| s.is_valid() && s.sectors() == 8));
        let r = data_request(&grefs, op::READ, 0, 1, 9);
        assert_eq!((r.nr_segments, r.seg[0].last_sect), (1, 0));
        // The rest of the slot stays zero (no stray refs in unused segments).
        assert_eq!(r.seg[1], Segment::default());
    }
}
