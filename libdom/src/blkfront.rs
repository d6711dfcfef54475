//! blkfront: a virtual disk served by a blk driver domain's blkback, over a
//! blkif ring ([`crate::ring::FrontConn`]), grants and the vbd's event
//! channel.
//!
//! The frontend keeps a fixed pool of data pages for the life of the
//! connection (so that blkback's persistent grants stay valid): for its
//! `slots` (requests in flight, at most the ring's 32) it grants
//! `slots` x [`MAX_SEGMENTS`] pages read-write to the backend for READs,
//! and as many read-only for WRITEs (the backend only reads what is
//! written). A request moves at most 11 pages (44 KiB), one segment per
//! page from the start of each page.
//!
//! The pages are shared by the slots, not owned by them: a request takes
//! as many pages as it has segments, the lowest run of adjacent free pages
//! of its pool (else the lowest free ones), and gives them back when it
//! completes. So the pages a workload ever hands the backend are as few as
//! it has in flight at once, the same ones again and again, in the same
//! order: a backend that keeps grants mapped (persistent grants) maps each
//! of them once, and a request's pages keep being adjacent in the
//! backend's mapping too. (Owned pages made the backend map every page of
//! every slot that ever carried a full request: how many depended on the
//! timing of completions.)
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

use alloc::vec::Vec;
use core::alloc::Layout;

use abi::blkif::{
    self, op, status, Request, Response, Segment, ENTRY_SIZE, MAX_SEGMENTS, RESPONSE_SIZE,
    SECTORS_PER_PAGE, SECTOR_SIZE,
};
use abi::domain::VbdInfo;
use abi::hypercall::Error;
use abi::ring::State;

use crate::grant::{self, GrantError};
use crate::ring::{ConnError, FrontConn, SharedPage, Waiter};

/// Bytes of a page.
const PAGE: usize = 4096;
/// Sectors one request moves at most.
pub const MAX_REQUEST_SECTORS: u32 = MAX_SEGMENTS as u32 * SECTORS_PER_PAGE as u32;
/// Bytes one request moves at most (44 KiB).
pub const MAX_REQUEST_BYTES: usize = MAX_SEGMENTS * PAGE;
/// Most requests in flight: each slot holds 2 x 11 grants, and the grant
/// table has 512 - 8 references to hand out (22 slots), within the ring's
/// 32.
pub const MAX_SLOTS: usize = {
    let by_grants = (grant::TABLE_ENTRIES - grant::FIRST_FREE_REF as usize) / (2 * MAX_SEGMENTS);
    if by_grants < blkif::RING_SIZE as usize {
        by_grants
    } else {
        blkif::RING_SIZE as usize
    }
};
const _: () = assert!(MAX_SLOTS == 22);

/// Why a blkfront call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    Conn(ConnError),
    /// Every slot has a request in flight.
    Busy,
    /// 0 sectors, more than [`MAX_REQUEST_SECTORS`], or data that is not a
    /// whole number of sectors.
    BadLength,
    /// No such slot.
    BadSlot,
}

impl core::fmt::Display for BlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BlkError::Conn(e) => e.fmt(f),
            BlkError::Busy => f.write_str("every request slot is in flight"),
            BlkError::BadLength => f.write_str("a request of 0 sectors, or more than 88"),
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

/// [`MAX_SEGMENTS`] pages of our heap, granted to the backend.
#[derive(Debug)]
struct Pages {
    va: u64,
    grefs: [u32; MAX_SEGMENTS],
}

impl Pages {
    fn layout() -> Layout {
        Layout::from_size_align(MAX_REQUEST_BYTES, PAGE).unwrap_or(Layout::new::<u8>())
    }

    /// Allocates and grants them (read-only or not) to `peer`; on failure
    /// what was granted is revoked and the memory freed.
    fn new(peer: u16, readonly: bool) -> Result<Self, BlkError> {
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc::alloc_zeroed(Self::layout()) };
        if raw.is_null() {
            return Err(Error::NoSpace.into());
        }
        let mut p = Pages {
            va: raw as u64,
            grefs: [0; MAX_SEGMENTS],
        };
        for i in 0..MAX_SEGMENTS {
            match grant::grant(peer, p.page(i), readonly) {
                Ok(r) => p.grefs[i] = r,
                Err(e) => {
                    for &r in &p.grefs[..i] {
                        let _ = grant::revoke(r);
                    }
                    // SAFETY: allocated above with this layout; its grants
                    // were just revoked (never mapped: nobody knew them).
                    unsafe { alloc::alloc::dealloc(raw, Self::layout()) };
                    return Err(e.into());
                }
            }
        }
        Ok(p)
    }

    fn page(&self, i: usize) -> u64 {
        self.va + (i * PAGE) as u64
    }

    /// Copies `data` in at the start of page `i` (volatile: the backend
    /// reads it).
    fn write_page(&mut self, i: usize, data: &[u8]) {
        assert!(i < MAX_SEGMENTS && data.len() <= PAGE);
        let p = self.page(i) as *mut u8;
        for (k, &b) in data.iter().enumerate() {
            // SAFETY: inside page `i` of our allocation (both checked).
            unsafe { p.add(k).write_volatile(b) };
        }
    }

    /// Copies out from the start of page `i` (volatile: the backend wrote
    /// it).
    fn read_page(&self, i: usize, out: &mut [u8]) {
        assert!(i < MAX_SEGMENTS && out.len() <= PAGE);
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
            unsafe { alloc::alloc::dealloc(self.va as *mut u8, Self::layout()) };
        }
        result
    }
}

/// One direction's pages: [`Pages`] chunks, page `i` of the pool being
/// page `i % MAX_SEGMENTS` of chunk `i / MAX_SEGMENTS`, and which are free.
#[derive(Debug)]
struct Pool {
    chunks: Vec<Pages>,
    /// Free page numbers, ascending.
    free: Vec<u16>,
}

impl Pool {
    /// The READ pool (granted read-write) and the WRITE pool (read-only) of
    /// `chunks` x [`MAX_SEGMENTS`] pages each, allocated in turn (as the
    /// heap was laid out when each slot owned its pages).
    fn pair(peer: u16, chunks: usize) -> Result<(Pool, Pool), BlkError> {
        let empty = || Pool {
            chunks: Vec::with_capacity(chunks),
            free: (0..(chunks * MAX_SEGMENTS) as u16).collect(),
        };
        let (mut read, mut write) = (empty(), empty());
        for _ in 0..chunks {
            let r = Pages::new(peer, false).and_then(|r| match Pages::new(peer, true) {
                Ok(w) => Ok((r, w)),
                Err(e) => {
                    let _ = r.release();
                    Err(e)
                }
            });
            match r {
                Ok((r, w)) => {
                    read.chunks.push(r);
                    write.chunks.push(w);
                }
                Err(e) => {
                    let _ = read.release();
                    let _ = write.release();
                    return Err(e);
                }
            }
        }
        Ok((read, write))
    }

    fn chunk(&self, page: u16) -> (&Pages, usize) {
        let i = usize::from(page);
        (&self.chunks[i / MAX_SEGMENTS], i % MAX_SEGMENTS)
    }

    fn gref(&self, page: u16) -> u32 {
        let (c, i) = self.chunk(page);
        c.grefs[i]
    }

    /// Fills `out` with free pages, ascending: the lowest run of adjacent
    /// ones that holds them all, else the lowest; false (nothing taken) if
    /// fewer are free. (No allocation: it runs for every request.)
    fn take(&mut self, out: &mut [u16]) -> bool {
        let n = out.len();
        if n == 0 || self.free.len() < n {
            return false;
        }
        let mut start = 0;
        let mut run = 0;
        for (i, &page) in self.free.iter().enumerate() {
            if run > 0 && self.free[i - 1] + 1 == page {
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
        out.copy_from_slice(&self.free[start..start + n]);
        self.free.drain(start..start + n);
        true
    }

    fn give(&mut self, pages: &[u16]) {
        for &p in pages {
            let at = self.free.partition_point(|f| *f < p);
            if self.free.get(at) != Some(&p) {
                self.free.insert(at, p);
            }
        }
    }

    /// Copies `data` into `pages`, a page's worth each.
    fn write(&mut self, pages: &[u16], data: &[u8]) {
        for (&page, part) in pages.iter().zip(data.chunks(PAGE)) {
            let i = usize::from(page);
            self.chunks[i / MAX_SEGMENTS].write_page(i % MAX_SEGMENTS, part);
        }
    }

    /// Copies `pages` out into `out`, a page's worth each.
    fn read(&self, pages: &[u16], out: &mut [u8]) {
        for (&page, part) in pages.iter().zip(out.chunks_mut(PAGE)) {
            let (c, i) = self.chunk(page);
            c.read_page(i, part);
        }
    }

    /// Revokes every grant (see [`Pages::release`]).
    fn release(self) -> Result<(), GrantError> {
        let mut result = Ok(());
        for c in self.chunks {
            if let Err(e) = c.release() {
                result = Err(e);
            }
        }
        result
    }
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
    let sectors = sectors.clamp(1, MAX_REQUEST_SECTORS);
    let mut r = Request {
        operation,
        nr_segments: sectors.div_ceil(u32::from(SECTORS_PER_PAGE)) as u8,
        handle: 0,
        id,
        sector,
        ..Request::default()
    };
    let mut left = sectors;
    for (seg, &gref) in r.seg.iter_mut().zip(grefs).take(usize::from(r.nr_segments)) {
        let n = left.min(u32::from(SECTORS_PER_PAGE));
        *seg = Segment {
            gref,
            first_sect: 0,
            last_sect: (n - 1) as u8,
        };
        left -= n;
    }
    r
}

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
    /// The pool pages of its last request made by [`Blkfront::submit_read`]
    /// or [`Blkfront::submit_write`] (none for hand-made requests), and
    /// whether they are the WRITE pool's. Given back to the pool when the
    /// request completes; a READ's data stays readable in them until the
    /// next request is submitted.
    pages: [u16; MAX_SEGMENTS],
    npages: usize,
    write: bool,
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
    slots: Vec<Slot>,
    read_pool: Pool,
    write_pool: Pool,
    next_id: u64,
    stats: Stats,
}

impl Blkfront {
    /// Connects to the vbd's backend with `slots` requests in flight at
    /// most (1..=[`MAX_SLOTS`]), waiting until `deadline_ns` for the
    /// backend.
    pub fn connect(
        vbd: &VbdInfo<'_>,
        slots: usize,
        w: &mut Waiter,
        deadline_ns: u64,
    ) -> Result<Self, BlkError> {
        let slots = slots.clamp(1, MAX_SLOTS);
        let (read_pool, write_pool) = Pool::pair(vbd.peer, slots)?;
        let pools = |r: Pool, w: Pool| {
            let _ = r.release();
            let _ = w.release();
        };
        let mut conn = match FrontConn::start(vbd, ENTRY_SIZE) {
            Ok(c) => c,
            Err(e) => {
                pools(read_pool, write_pool);
                return Err(e.into());
            }
        };
        // (If the backend never answers, the pages stay granted: it may
        // have mapped them.)
        conn.wait_connected(w, deadline_ns)?;
        Ok(Blkfront {
            conn,
            sectors: vbd.sectors,
            readonly: vbd.readonly,
            slots: (0..slots)
                .map(|_| Slot {
                    busy: None,
                    pages: [0; MAX_SEGMENTS],
                    npages: 0,
                    write: false,
                })
                .collect(),
            read_pool,
            write_pool,
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

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.busy.is_some()).count()
    }

    pub fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(|s| s.busy.is_none())
    }

    /// The connection, for tests that break its rules on purpose.
    pub fn conn_mut(&mut self) -> &mut FrontConn {
        &mut self.conn
    }

    /// The grant reference of page `slot * 11 + page` of the READ pool
    /// (`write`: the WRITE pool; `page` below 11, `slot` below
    /// [`Blkfront::slot_count`]), for hand-made requests.
    pub fn gref(&self, slot: usize, page: usize, write: bool) -> Option<u32> {
        if slot >= self.slots.len() || page >= MAX_SEGMENTS {
            return None;
        }
        let p = if write {
            &self.write_pool
        } else {
            &self.read_pool
        };
        Some(p.gref((slot * MAX_SEGMENTS + page) as u16))
    }

    /// Pool pages (per direction) no request holds now.
    pub fn free_pages(&self, write: bool) -> usize {
        if write {
            self.write_pool.free.len()
        } else {
            self.read_pool.free.len()
        }
    }

    fn pool(&mut self, write: bool) -> &mut Pool {
        if write {
            &mut self.write_pool
        } else {
            &mut self.read_pool
        }
    }

    /// Puts `req` on the ring for slot `slot` (which must be free) and
    /// publishes it, notifying the backend if it asked. The request's id is
    /// the one it carries. For hand-made (even malformed) requests.
    pub fn submit_raw(&mut self, slot: usize, req: &Request, sectors: u32) -> Result<(), BlkError> {
        self.submit_inner(
            slot,
            req,
            sectors,
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
        self.submit_inner(slot, req, sectors, Some(&mut Some(tamper)))
    }

    fn submit_inner<F: FnOnce(u32, &mut SharedPage)>(
        &mut self,
        slot: usize,
        req: &Request,
        sectors: u32,
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
        ring.put_request(page, &req.encode())?;
        s.busy = Some(InFlight {
            id: req.id,
            operation: req.operation,
            sector: req.sector,
            sectors,
        });
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

    /// Submits a READ or WRITE (`data`: what to write) of `sectors`
    /// sectors over pages taken from the pool.
    fn submit(
        &mut self,
        operation: u8,
        sector: u64,
        sectors: u32,
        data: Option<&[u8]>,
    ) -> Result<usize, BlkError> {
        if sectors == 0 || sectors > MAX_REQUEST_SECTORS {
            return Err(BlkError::BadLength);
        }
        let slot = self.free_slot().ok_or(BlkError::Busy)?;
        let write = operation == op::WRITE;
        let n = sectors.div_ceil(u32::from(SECTORS_PER_PAGE)) as usize;
        // Each slot holds at most MAX_SEGMENTS pages and a pool has as many
        // per slot, so a free slot always finds them.
        let mut pages = [0u16; MAX_SEGMENTS];
        let pages = &mut pages[..n];
        if !self.pool(write).take(pages) {
            return Err(BlkError::Busy);
        }
        if let Some(d) = data {
            self.pool(write).write(pages, d);
        }
        let pool = if write {
            &self.write_pool
        } else {
            &self.read_pool
        };
        let mut grefs = [0u32; MAX_SEGMENTS];
        for (g, &p) in grefs.iter_mut().zip(pages.iter()) {
            *g = pool.gref(p);
        }
        let id = self.next_id();
        let req = data_request(&grefs, operation, sector, sectors, id);
        if let Err(e) = self.submit_raw(slot, &req, sectors) {
            self.pool(write).give(pages);
            return Err(e);
        }
        let s = &mut self.slots[slot];
        s.pages[..n].copy_from_slice(pages);
        s.npages = n;
        s.write = write;
        Ok(slot)
    }

    /// Starts reading `sectors` sectors at `sector`; returns the slot.
    pub fn submit_read(&mut self, sector: u64, sectors: u32) -> Result<usize, BlkError> {
        self.submit(op::READ, sector, sectors, None)
    }

    /// Starts writing `data` (whole sectors, at most 44 KiB) at `sector`;
    /// returns the slot.
    pub fn submit_write(&mut self, sector: u64, data: &[u8]) -> Result<usize, BlkError> {
        if data.is_empty()
            || !data.len().is_multiple_of(SECTOR_SIZE as usize)
            || data.len() > MAX_REQUEST_BYTES
        {
            return Err(BlkError::BadLength);
        }
        let sectors = (data.len() / SECTOR_SIZE as usize) as u32;
        self.submit(op::WRITE, sector, sectors, Some(data))
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
        self.read_pool.read(&s.pages[..s.npages], out);
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
            let Some(slot) = self
                .slots
                .iter()
                .position(|s| s.busy.is_some_and(|b| b.id == rsp.id))
            else {
                self.stats.strays += 1;
                continue;
            };
            let req = self.slots[slot].busy.take().unwrap_or(InFlight {
                id: rsp.id,
                operation: rsp.operation,
                sector: 0,
                sectors: 0,
            });
            // Its pages are free again; `pages` still names them for
            // `read_data` until the next submission takes any.
            let s = &self.slots[slot];
            let pool = if s.write {
                &mut self.write_pool
            } else {
                &mut self.read_pool
            };
            pool.give(&s.pages[..s.npages]);
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
            ..
        } = self;
        let mut result = conn.close(w, deadline_ns).map_err(BlkError::from);
        for p in [read_pool, write_pool] {
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

    fn pool(free: &[u16]) -> Pool {
        Pool {
            chunks: Vec::new(),
            free: free.to_vec(),
        }
    }

    #[test]
    fn pool_takes_the_lowest_run_and_reuses_pages() {
        let mut p = pool(&(0..44).collect::<Vec<u16>>());
        // A steady 11 + 5 page pattern keeps to the same 16 pages.
        for _ in 0..4 {
            let (mut a, mut b) = ([0u16; 11], [0u16; 5]);
            assert!(p.take(&mut a) && p.take(&mut b));
            assert_eq!(a.to_vec(), (0..11).collect::<Vec<u16>>());
            assert_eq!(b.to_vec(), (11..16).collect::<Vec<u16>>());
            p.give(&a);
            p.give(&b);
        }
        assert_eq!(p.free, (0..44).collect::<Vec<u16>>());
        // Out of order: the lowest run that fits, else the lowest pages.
        let mut p = pool(&[0, 1, 3, 4, 5, 9]);
        let (mut three, mut two, mut one) = ([0u16; 3], [0u16; 2], [0u16; 1]);
        assert!(p.take(&mut three) && three == [3, 4, 5]);
        assert!(p.take(&mut two) && two == [0, 1]);
        p.give(&[0, 1]);
        assert!(p.take(&mut three) && three == [0, 1, 9]);
        assert!(!p.take(&mut one));
        p.give(&[4, 4, 3]);
        assert_eq!(p.free, [3, 4]);
        assert!(!p.take(&mut []));
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
        let r = data_request(&grefs, op::WRITE, 0, MAX_REQUEST_SECTORS, 8);
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
