//! netfront: a virtual network interface served by the net driver domain's
//! netback, over two netif rings (`abi::netif`), grants and the vif's event
//! channel; and a [`smoltcp::phy::Device`] over it.
//!
//! ```text
//!  frontend (this domain)                          backend (netback)
//!  TX ring page, granted at tx_ring_gref ───────>  maps it, takes requests
//!  RX ring page, granted at rx_ring_gref ───────>  maps it, fills posted pages
//!  TX pages: granted read-only, 2 frames a page    copies (or maps) the frame out
//!  RX pages: granted read-write, 1 frame a page    copies the frame in
//!  one event channel (the vif's port) for both rings, both ways
//! ```
//!
//! **Connecting.** Both ring pages are initialised and granted at the refs
//! the start info names; the RX ring is filled with every receive page
//! first, then each page's front state says Connected and the backend is
//! notified. The connection is up once the backend has written Connected
//! into *both* pages' back state; either page saying Closing or Closed (or
//! a number that is no state) means the backend has ended it.
//!
//! **Buffers** are fixed for the life of the connection, so the backend may
//! keep its mappings: `tx_pages` pages granted read-only hold two transmit
//! buffers of [`TX_BUF_SIZE`] bytes each (a frame is at most 1514); each of
//! `rx_bufs` pages granted read-write is one receive buffer. A buffer's
//! index is its request id: a TX request `{gref, offset, id = buffer, size
//! = frame length}` (one slot a frame, no extra info), an RX request `{id =
//! buffer, gref}`. A response whose id names no request in flight is
//! counted as a stray (a broken or hostile backend) and otherwise ignored.
//! An RX response's bytes are copied out of the page once (volatile) before
//! anyone looks at them, and the page is posted again at once; a frame
//! spread over several responses (`MORE_DATA`) is put back together, up to
//! [`MAX_RX_FRAME`] bytes.
//!
//! **Notifications** follow the ring rule both ways: the backend is told
//! only when its `req_event` asks, and [`Netfront::wait`] sleeps only after
//! asking for the next TX and RX response (`final_check_for_responses` on
//! both rings).
//!
//! **smoltcp.** `Netfront` is a [`smoltcp::phy::Device`] with medium
//! Ethernet and an MTU of 1514 bytes: `transmit` hands out a token while a
//! TX buffer is free (after reaping TX responses), and the token's buffer
//! is the granted page itself; `receive` hands out the next received frame
//! (from a private copy) with a TX token, only while a TX buffer is free.
//! [`Netfront::interface_config`] and [`Netfront::addresses`] give the
//! start info's MAC and IPv4 address (a /24).
//!
//! Tests that break the rules on purpose use the raw calls:
//! [`Netfront::put_tx_raw`], [`Netfront::push_tx_then`],
//! [`Netfront::set_tx_req_prod`], [`Netfront::take_tx_responses`].

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::alloc::Layout;

use abi::domain::{VifInfo, VifRole};
use abi::hypercall::Error;
use abi::netif::{
    self, status, RxRequest, RxResponse, TxRequest, TxResponse, MAX_FRAME, RX_ENTRY_SIZE,
    RX_RESPONSE_SIZE, TX_ENTRY_SIZE, TX_RESPONSE_SIZE,
};
use abi::ring::{off, FrontRing, RingPage, State};
use smoltcp::phy::{self, DeviceCapabilities, Medium};

use crate::grant::{self, GrantError};
use crate::ring::{ConnError, FrontConn, SharedPage, Waiter};

/// Bytes of a page.
const PAGE: usize = 4096;
/// Bytes of one transmit buffer: two to a granted page.
pub const TX_BUF_SIZE: usize = 2048;
/// Transmit buffers per granted page.
pub const TX_PER_PAGE: usize = PAGE / TX_BUF_SIZE;
/// The largest frame put back together from several RX responses.
pub const MAX_RX_FRAME: usize = 65535;
/// Most TX buffers (and RX buffers): each is a request in flight, and a
/// ring holds 256.
pub const MAX_BUFS: usize = netif::TX_RING_SIZE as usize;
const _: () = assert!(MAX_FRAME <= TX_BUF_SIZE);
const _: () = assert!(netif::RX_RING_SIZE as usize == MAX_BUFS);

/// How many buffers a connection keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Pages of transmit buffers (two buffers each); 1..=128.
    pub tx_pages: usize,
    /// Receive buffers (one page each), all posted; 1..=256.
    pub rx_bufs: usize,
}

impl Default for Config {
    /// 64 TX buffers and 128 RX buffers: 96 grants, 768 KiB.
    fn default() -> Self {
        Config {
            tx_pages: 32,
            rx_bufs: 128,
        }
    }
}

/// Why a netfront call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetError {
    Conn(ConnError),
    /// The vif is not this domain's to use (its role is Back).
    NotFrontend,
    /// A [`Config`] outside its ranges.
    BadConfig,
    /// Every TX buffer is in flight.
    Busy,
    /// A frame longer than [`TX_BUF_SIZE`], or empty.
    BadLength,
}

impl core::fmt::Display for NetError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NetError::Conn(e) => e.fmt(f),
            NetError::NotFrontend => f.write_str("the vif is served here, not used"),
            NetError::BadConfig => {
                f.write_str("buffer counts outside 1..=128 TX pages, 1..=256 RX")
            }
            NetError::Busy => f.write_str("every TX buffer is in flight"),
            NetError::BadLength => f.write_str("a frame of 0 bytes or more than a TX buffer"),
        }
    }
}

impl From<ConnError> for NetError {
    fn from(e: ConnError) -> Self {
        NetError::Conn(e)
    }
}

impl From<Error> for NetError {
    fn from(e: Error) -> Self {
        NetError::Conn(ConnError::Hypercall(e))
    }
}

impl From<GrantError> for NetError {
    fn from(e: GrantError) -> Self {
        NetError::Conn(ConnError::Grant(e))
    }
}

impl From<abi::ring::Error> for NetError {
    fn from(e: abi::ring::Error) -> Self {
        NetError::Conn(ConnError::Ring(e))
    }
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// TX responses with a status other than OKAY.
    pub tx_errors: u64,
    /// TX responses whose id named no request in flight.
    pub tx_strays: u64,
    /// Times `transmit` (or `receive`) found no TX buffer free.
    pub tx_full: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// RX responses with an error status, or bytes outside the page, or
    /// frames too short or too long: dropped.
    pub rx_errors: u64,
    /// RX responses whose id named no posted buffer.
    pub rx_strays: u64,
    /// Notifications sent to the backend.
    pub notifies: u64,
    /// Times [`Netfront::wait`] slept.
    pub waits: u64,
    /// TX responses taken inside the netfront while a caller watched them
    /// (see [`Netfront::take_tx_responses`]) that were not kept for it:
    /// more than [`MAX_KEPT`] were waiting.
    pub tx_unseen: u64,
}

/// Copies `out.len()` bytes from `src` with volatile reads, for memory
/// another domain may write meanwhile (each byte is read once): 8-byte
/// words where `src` is aligned, single bytes at the ends. (A byte at a time
/// took ~3 instructions a byte: most of a frame's cost in netfront's RX and
/// netback's copies.)
///
/// # Safety
///
/// `src..src + out.len()` must be readable for that long.
pub unsafe fn read_shared(src: *const u8, out: &mut [u8]) {
    let len = out.len();
    let head = src.align_offset(8).min(len);
    let (pre, rest) = out.split_at_mut(head);
    for (i, b) in pre.iter_mut().enumerate() {
        // SAFETY: within the range the caller vouches for.
        *b = unsafe { src.add(i).read_volatile() };
    }
    // SAFETY: as above; `src + head` is 8-aligned (or `rest` is empty).
    let words = unsafe { src.add(head) } as *const u64;
    let mut chunks = rest.chunks_exact_mut(8);
    for (k, w) in (&mut chunks).enumerate() {
        // SAFETY: aligned, and within the range.
        let v = unsafe { words.add(k).read_volatile() };
        w.copy_from_slice(&v.to_ne_bytes());
    }
    let tail = chunks.into_remainder();
    let at = len - tail.len();
    for (i, b) in tail.iter_mut().enumerate() {
        // SAFETY: within the range.
        *b = unsafe { src.add(at + i).read_volatile() };
    }
}

/// Copies `data` to `dst` with volatile writes, for memory another domain
/// may read meanwhile: 8-byte words where `dst` is aligned, single bytes
/// at the ends.
///
/// # Safety
///
/// `dst..dst + data.len()` must be writable, and no reference of ours may
/// point into it.
pub unsafe fn write_shared(dst: *mut u8, data: &[u8]) {
    let head = dst.align_offset(8).min(data.len());
    let (pre, rest) = data.split_at(head);
    for (i, &b) in pre.iter().enumerate() {
        // SAFETY: within the range the caller vouches for.
        unsafe { dst.add(i).write_volatile(b) };
    }
    // SAFETY: as above; `dst + head` is 8-aligned (or `rest` is empty).
    let words = unsafe { dst.add(head) } as *mut u64;
    let mut chunks = rest.chunks_exact(8);
    for (k, w) in (&mut chunks).enumerate() {
        let mut v = [0u8; 8];
        v.copy_from_slice(w);
        // SAFETY: aligned, and within the range.
        unsafe { words.add(k).write_volatile(u64::from_ne_bytes(v)) };
    }
    let tail = chunks.remainder();
    let at = data.len() - tail.len();
    for (i, &b) in tail.iter().enumerate() {
        // SAFETY: within the range.
        unsafe { dst.add(at + i).write_volatile(b) };
    }
}

/// `count` pages of our heap, each granted to the backend.
#[derive(Debug)]
struct Pages {
    va: u64,
    grefs: Vec<u32>,
}

impl Pages {
    fn layout(count: usize) -> Layout {
        Layout::from_size_align(count * PAGE, PAGE).unwrap_or(Layout::new::<u8>())
    }

    /// Allocates `count` (>= 1) zeroed pages and grants them to `peer`; on
    /// failure what was granted is revoked and the memory freed.
    fn new(peer: u16, count: usize, readonly: bool) -> Result<Self, NetError> {
        // SAFETY: count >= 1, so the layout has a non-zero size.
        let raw = unsafe { alloc::alloc::alloc_zeroed(Self::layout(count)) };
        if raw.is_null() {
            return Err(Error::NoSpace.into());
        }
        let mut grefs = Vec::with_capacity(count);
        for i in 0..count {
            match grant::grant(peer, raw as u64 + (i * PAGE) as u64, readonly) {
                Ok(r) => grefs.push(r),
                Err(e) => {
                    for &r in &grefs {
                        let _ = grant::revoke(r);
                    }
                    // SAFETY: allocated above with this layout; its grants
                    // were just revoked (never used: nobody knew them).
                    unsafe { alloc::alloc::dealloc(raw, Self::layout(count)) };
                    return Err(e.into());
                }
            }
        }
        Ok(Pages {
            va: raw as u64,
            grefs,
        })
    }

    fn count(&self) -> usize {
        self.grefs.len()
    }

    /// Copies `out.len()` bytes at `off` of page `page` out (volatile: the
    /// backend writes these pages).
    fn read(&self, page: usize, off: usize, out: &mut [u8]) {
        assert!(page < self.count() && off + out.len() <= PAGE);
        let p = (self.va + (page * PAGE + off) as u64) as *const u8;
        // SAFETY: inside page `page` of our allocation (checked above).
        unsafe { read_shared(p, out) };
    }

    /// Copies `data` in at `off` of page `page` (volatile: the backend
    /// reads these pages).
    fn write(&mut self, page: usize, off: usize, data: &[u8]) {
        assert!(page < self.count() && off + data.len() <= PAGE);
        let p = (self.va + (page * PAGE + off) as u64) as *mut u8;
        // SAFETY: inside page `page` of our allocation (checked above).
        unsafe { write_shared(p, data) };
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
            unsafe { alloc::alloc::dealloc(self.va as *mut u8, Self::layout(self.count())) };
        }
        result
    }
}

/// TX responses kept for [`Netfront::take_tx_responses`] at most: the
/// responses to four rings' worth of requests.
pub const MAX_KEPT: usize = 4 * netif::TX_RING_SIZE as usize;

/// TX responses the netfront took for itself (to free buffers: in
/// [`Netfront::wait`], [`Netfront::reap_tx`], [`Netfront::send_frame`],
/// smoltcp's tokens) while a caller of [`Netfront::take_tx_responses`]
/// watches them: kept until that caller takes them, so it sees every
/// response exactly once, whoever took it off the ring. Nobody watches
/// until the first [`Netfront::take_tx_responses`] or
/// [`Netfront::put_tx_raw`]; then nothing is kept.
#[derive(Debug, Default)]
struct Seen {
    watching: bool,
    kept: VecDeque<TxResponse>,
}

impl Seen {
    /// A response taken off the ring inside the netfront.
    fn keep(&mut self, r: TxResponse, stats: &mut Stats) {
        if !self.watching {
            return;
        }
        if self.kept.len() >= MAX_KEPT {
            self.kept.pop_front();
            stats.tx_unseen += 1;
        }
        self.kept.push_back(r);
    }
}

/// Takes every TX response on `ring`: frees the buffers they name (a
/// response naming none is a stray) and passes each to `f`; how many.
fn reap_ring<P: RingPage + ?Sized>(
    ring: &mut FrontRing,
    page: &P,
    busy: &mut [bool],
    free: &mut Vec<u16>,
    stats: &mut Stats,
    mut f: impl FnMut(TxResponse, &mut Stats),
) -> Result<usize, NetError> {
    let mut n = 0;
    loop {
        let mut raw = [0u8; TX_RESPONSE_SIZE];
        if !ring.take_response(page, &mut raw)? {
            break;
        }
        let rsp = TxResponse::decode(&raw);
        n += 1;
        match busy.get_mut(usize::from(rsp.id)) {
            Some(b) if *b => {
                *b = false;
                free.push(rsp.id);
                if rsp.status != status::OKAY {
                    stats.tx_errors += 1;
                }
            }
            _ => stats.tx_strays += 1,
        }
        f(rsp, stats);
    }
    Ok(n)
}

/// The netfront's own reap ([`Tx::reap`]): every response there is, kept
/// in `seen` if someone watches.
fn reap_keep<P: RingPage + ?Sized>(
    ring: &mut FrontRing,
    page: &P,
    busy: &mut [bool],
    free: &mut Vec<u16>,
    stats: &mut Stats,
    seen: &mut Seen,
) -> Result<usize, NetError> {
    reap_ring(ring, page, busy, free, stats, |r, st| seen.keep(r, st))
}

/// [`Netfront::take_tx_responses`]: from now on `seen` watches; the kept
/// responses, then those on the ring, in ring order, each to `f`; how many.
fn take_seen<P: RingPage + ?Sized>(
    ring: &mut FrontRing,
    page: &P,
    busy: &mut [bool],
    free: &mut Vec<u16>,
    stats: &mut Stats,
    seen: &mut Seen,
    mut f: impl FnMut(TxResponse),
) -> Result<usize, NetError> {
    seen.watching = true;
    let kept = seen.kept.len();
    for r in seen.kept.drain(..) {
        f(r);
    }
    Ok(kept + reap_ring(ring, page, busy, free, stats, |r, _| f(r))?)
}

/// The transmit side: its ring and its buffers.
#[derive(Debug)]
struct Tx {
    conn: FrontConn,
    pages: Pages,
    /// Free buffer ids (a stack).
    free: Vec<u16>,
    busy: Vec<bool>,
    /// Responses taken here for a caller who watches them.
    seen: Seen,
}

impl Tx {
    fn buffers(&self) -> usize {
        self.busy.len()
    }

    /// Where buffer `id` is: its page's grant, the page index, the offset.
    fn place(&self, id: u16) -> (u32, usize, usize) {
        let page = usize::from(id) / TX_PER_PAGE;
        (
            self.pages.grefs[page],
            page,
            (usize::from(id) % TX_PER_PAGE) * TX_BUF_SIZE,
        )
    }

    /// Takes every TX response there is, freeing the buffers they name;
    /// each is kept for [`Netfront::take_tx_responses`] if someone watches.
    fn reap(&mut self, stats: &mut Stats) -> Result<usize, NetError> {
        let (ring, page) = self.conn.parts();
        reap_keep(
            ring,
            page,
            &mut self.busy,
            &mut self.free,
            stats,
            &mut self.seen,
        )
    }

    /// Puts the request for buffer `id` (holding `len` bytes) on the ring,
    /// publishes it and notifies the backend if it asked.
    fn send(&mut self, id: u16, len: usize, stats: &mut Stats) -> Result<(), NetError> {
        let (gref, _, offset) = self.place(id);
        let req = TxRequest {
            gref,
            offset: offset as u16,
            flags: 0,
            id,
            size: len as u16,
        };
        let (ring, page) = self.conn.parts();
        if let Err(e) = ring.put_request(page, &req.encode()) {
            self.free.push(id);
            return Err(e.into());
        }
        self.busy[usize::from(id)] = true;
        stats.tx_frames += 1;
        stats.tx_bytes += len as u64;
        if ring.push_requests(page) {
            stats.notifies += 1;
            self.conn.notify()?;
        }
        Ok(())
    }
}

/// The receive side: its ring, its buffers and the frame being put
/// together.
#[derive(Debug)]
struct Rx {
    conn: FrontConn,
    pages: Pages,
    posted: Vec<bool>,
    /// The frame being received, a private copy.
    frame: Vec<u8>,
    /// Bytes of `frame` filled so far.
    len: usize,
    /// The frame being put together is already bad (dropped at its end).
    bad: bool,
}

impl Rx {
    /// Posts buffer `id` (not yet published).
    fn post(&mut self, id: u16) -> Result<(), NetError> {
        let req = RxRequest {
            id,
            gref: self.pages.grefs[usize::from(id)],
        };
        let (ring, page) = self.conn.parts();
        ring.put_request(page, &req.encode())?;
        self.posted[usize::from(id)] = true;
        Ok(())
    }

    /// Publishes what was posted, notifying the backend if it asked.
    fn publish(&mut self, stats: &mut Stats) -> Result<(), NetError> {
        let (ring, page) = self.conn.parts();
        if ring.push_requests(page) {
            stats.notifies += 1;
            self.conn.notify()?;
        }
        Ok(())
    }

    /// Takes responses until a whole frame is in `frame`; its length, or
    /// `None` when the ring holds no (more) whole frame. Every buffer whose
    /// response was taken is posted again.
    fn next_frame(&mut self, stats: &mut Stats) -> Result<Option<usize>, NetError> {
        let mut reposted = false;
        let result = loop {
            let mut raw = [0u8; RX_RESPONSE_SIZE];
            let (ring, page) = self.conn.parts();
            if !ring.take_response(page, &mut raw)? {
                break None;
            }
            let rsp = RxResponse::decode(&raw);
            let id = usize::from(rsp.id);
            if !self.posted.get(id).copied().unwrap_or(false) {
                stats.rx_strays += 1;
                continue;
            }
            self.posted[id] = false;
            let (off, n) = (usize::from(rsp.offset), rsp.len());
            if rsp.status <= 0 || off + n > PAGE || self.len + n > MAX_RX_FRAME {
                self.bad = true;
            } else {
                if self.frame.len() < self.len + n {
                    self.frame.resize(self.len + n, 0);
                }
                self.pages
                    .read(id, off, &mut self.frame[self.len..self.len + n]);
                self.len += n;
            }
            self.post(rsp.id)?;
            reposted = true;
            if rsp.more_data() {
                continue;
            }
            let (len, bad) = (self.len, self.bad);
            self.len = 0;
            self.bad = false;
            if bad || len < netif::MIN_FRAME {
                stats.rx_errors += 1;
                continue;
            }
            stats.rx_frames += 1;
            stats.rx_bytes += len as u64;
            break Some(len);
        };
        if reposted {
            self.publish(stats)?;
        }
        Ok(result)
    }
}

/// One connected virtual network interface.
#[derive(Debug)]
pub struct Netfront {
    tx: Tx,
    rx: Rx,
    port: u16,
    mac: [u8; 6],
    ip: [u8; 4],
    stats: Stats,
}

/// Whether a back state means the backend has ended the connection.
fn ended(s: Option<State>) -> bool {
    !matches!(
        s,
        Some(State::Unknown | State::Initialising | State::Connected)
    )
}

impl Netfront {
    /// Connects to the vif's backend with `cfg`'s buffers, waiting until
    /// `deadline_ns` for it to say Connected on both rings.
    pub fn connect(
        vif: &VifInfo<'_>,
        cfg: Config,
        w: &mut Waiter,
        deadline_ns: u64,
    ) -> Result<Self, NetError> {
        if vif.role != VifRole::Front {
            return Err(NetError::NotFrontend);
        }
        if !(1..=MAX_BUFS / TX_PER_PAGE).contains(&cfg.tx_pages)
            || !(1..=MAX_BUFS).contains(&cfg.rx_bufs)
        {
            return Err(NetError::BadConfig);
        }
        let tx_pages = Pages::new(vif.peer, cfg.tx_pages, true)?;
        let rx_pages = Pages::new(vif.peer, cfg.rx_bufs, false)?;
        let ntx = cfg.tx_pages * TX_PER_PAGE;
        let rx_conn = FrontConn::start_at(vif.rx_ring_gref, vif.peer, vif.port, RX_ENTRY_SIZE)?;
        let mut rx = Rx {
            conn: rx_conn,
            pages: rx_pages,
            posted: vec![false; cfg.rx_bufs],
            frame: vec![0; MAX_FRAME],
            len: 0,
            bad: false,
        };
        let mut stats = Stats::default();
        for id in 0..cfg.rx_bufs {
            rx.post(id as u16)?;
        }
        rx.publish(&mut stats)?;
        let tx_conn = FrontConn::start_at(vif.tx_ring_gref, vif.peer, vif.port, TX_ENTRY_SIZE)?;
        let mut nf = Netfront {
            tx: Tx {
                conn: tx_conn,
                pages: tx_pages,
                free: (0..ntx as u16).rev().collect(),
                busy: vec![false; ntx],
                seen: Seen::default(),
            },
            rx,
            port: vif.port,
            mac: vif.mac,
            ip: vif.ip,
            stats,
        };
        nf.tx.conn.wait_connected(w, deadline_ns)?;
        nf.rx.conn.wait_connected(w, deadline_ns)?;
        Ok(nf)
    }

    /// This interface's MAC (the start info's).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// This interface's IPv4 address (the start info's).
    pub fn ip(&self) -> [u8; 4] {
        self.ip
    }

    /// The vif's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// TX buffers in all, and free now.
    pub fn tx_buffers(&self) -> (usize, usize) {
        (self.tx.buffers(), self.tx.free.len())
    }

    /// The backend's state words (TX ring, RX ring).
    pub fn back_states(&self) -> (Option<State>, Option<State>) {
        (self.tx.conn.back_state(), self.rx.conn.back_state())
    }

    /// Whether the connection is up: the backend said Connected on both
    /// rings and neither says otherwise now.
    pub fn is_connected(&self) -> bool {
        self.tx.conn.is_connected() && self.rx.conn.is_connected()
    }

    /// Whether the backend has ended the connection (either ring's back
    /// state is Closing, Closed or not a state).
    pub fn backend_ended(&self) -> bool {
        let (t, r) = self.back_states();
        ended(t) || ended(r)
    }

    fn closed_error(&self) -> NetError {
        let (t, r) = self.back_states();
        NetError::Conn(ConnError::Closed {
            state: if ended(t) { t } else { r },
        })
    }

    /// Takes every TX response there is (freeing their buffers); how many.
    /// Once someone watches TX responses ([`Netfront::take_tx_responses`])
    /// they are kept for [`Netfront::take_tx_responses`].
    pub fn reap_tx(&mut self) -> Result<usize, NetError> {
        self.tx.reap(&mut self.stats)
    }

    /// Sends one frame (copied into a free TX buffer); `Err(Busy)` if every
    /// buffer is in flight (after reaping), `Err(BadLength)` for an empty
    /// or too long frame.
    pub fn send_frame(&mut self, frame: &[u8]) -> Result<(), NetError> {
        if frame.is_empty() || frame.len() > TX_BUF_SIZE {
            return Err(NetError::BadLength);
        }
        if self.backend_ended() {
            return Err(self.closed_error());
        }
        if self.tx.free.is_empty() {
            self.reap_tx()?;
        }
        let Some(id) = self.tx.free.pop() else {
            self.stats.tx_full += 1;
            return Err(NetError::Busy);
        };
        let (_, page, offset) = self.tx.place(id);
        self.tx.pages.write(page, offset, frame);
        self.tx.send(id, frame.len(), &mut self.stats)
    }

    /// Takes the next whole received frame and passes it to `f` (a private
    /// copy); `Ok(None)` when none is waiting.
    pub fn recv_frame<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>, NetError> {
        Ok(self
            .rx
            .next_frame(&mut self.stats)?
            .map(|n| f(&self.rx.frame[..n])))
    }

    /// Sleeps until the backend may have answered or sent (or
    /// `deadline_ns`); true if a response is waiting on either ring. Takes
    /// the TX responses there are, then asks for the next response of both
    /// rings, so nothing is missed.
    pub fn wait(&mut self, w: &mut Waiter, deadline_ns: u64) -> Result<bool, NetError> {
        // TX responses only free buffers: take them now rather than wake
        // for them.
        self.reap_tx()?;
        let (ring, page) = self.rx.conn.parts();
        let rx_ready = ring.final_check_for_responses(page)?;
        let (ring, page) = self.tx.conn.parts();
        let tx_ready = ring.final_check_for_responses(page)?;
        if rx_ready || tx_ready {
            return Ok(true);
        }
        if self.backend_ended() {
            return Err(self.closed_error());
        }
        self.stats.waits += 1;
        w.wait(self.port, deadline_ns)?;
        let (ring, page) = self.rx.conn.parts();
        let rx = ring.unconsumed_responses(page)?;
        let (ring, page) = self.tx.conn.parts();
        let tx = ring.unconsumed_responses(page)?;
        Ok(rx + tx > 0)
    }

    // ---- raw access, for tests that break the rules ----

    /// Where TX buffer `id` is: the grant reference of its page and its
    /// offset in the page.
    pub fn tx_buffer(&self, id: u16) -> Option<(u32, u16)> {
        (usize::from(id) < self.tx.buffers()).then(|| {
            let (gref, _, off) = self.tx.place(id);
            (gref, off as u16)
        })
    }

    /// Writes `data` at `offset` of the page that holds TX buffer `id`
    /// (`offset + data.len()` within the page).
    pub fn fill_tx_page(&mut self, id: u16, offset: usize, data: &[u8]) -> Result<(), NetError> {
        if usize::from(id) >= self.tx.buffers() || offset + data.len() > PAGE {
            return Err(NetError::BadLength);
        }
        let (_, page, _) = self.tx.place(id);
        self.tx.pages.write(page, offset, data);
        Ok(())
    }

    /// Puts `req` on the TX ring as it is (not published): its id is not
    /// tracked, so its response reaches [`Netfront::take_tx_responses`]
    /// as a stray (from now on TX responses are watched: one taken inside
    /// the netfront, e.g. by [`Netfront::wait`], is kept for it). The ring
    /// index it went to.
    pub fn put_tx_raw(&mut self, req: &TxRequest) -> Result<u32, NetError> {
        self.tx.seen.watching = true;
        let (ring, page) = self.tx.conn.parts();
        let idx = ring.req_prod_pvt();
        ring.put_request(page, &req.encode())?;
        Ok(idx)
    }

    /// Publishes the TX requests put so far; then `tamper` gets the page
    /// (to rewrite what was published), and the backend is notified
    /// (always).
    pub fn push_tx_then(&mut self, tamper: impl FnOnce(&mut SharedPage)) -> Result<(), NetError> {
        let (ring, page) = self.tx.conn.parts();
        ring.push_requests(page);
        tamper(page);
        self.stats.notifies += 1;
        self.tx.conn.notify()?;
        Ok(())
    }

    /// Writes `req_prod` of the TX ring page directly (a producer index the
    /// frontend never produced) and notifies the backend.
    pub fn set_tx_req_prod(&mut self, v: u32) -> Result<(), NetError> {
        let (_, page) = self.tx.conn.parts();
        page.fence();
        page.store_u32(off::REQ_PROD, v);
        page.fence();
        self.stats.notifies += 1;
        self.tx.conn.notify()?;
        Ok(())
    }

    /// The TX ring's private producer index (the next request's index).
    pub fn tx_req_prod_pvt(&self) -> u32 {
        self.tx.conn.ring().req_prod_pvt()
    }

    /// Takes every TX response there is, passing each to `f` (tracked ones
    /// free their buffers as usual); how many. Every response is passed
    /// once, in ring order: from the first call (or [`Netfront::put_tx_raw`])
    /// on, the responses the netfront takes for itself in between (in
    /// [`Netfront::wait`], [`Netfront::reap_tx`], [`Netfront::send_frame`],
    /// smoltcp's tokens) are kept for the next call.
    pub fn take_tx_responses(&mut self, f: impl FnMut(TxResponse)) -> Result<usize, NetError> {
        let tx = &mut self.tx;
        let (ring, page) = tx.conn.parts();
        take_seen(
            ring,
            page,
            &mut tx.busy,
            &mut tx.free,
            &mut self.stats,
            &mut tx.seen,
            f,
        )
    }

    /// Closes both rings (see [`FrontConn::close`]: Closing, wait for the
    /// backend's Closed, revoke, free) and revokes the buffer grants; pages
    /// the backend still holds are leaked, not freed.
    pub fn close(self, w: &mut Waiter, deadline_ns: u64) -> Result<(), NetError> {
        let Netfront { tx, mut rx, .. } = self;
        // Both rings say Closing before the backend hears of either.
        let (ring, page) = rx.conn.parts();
        ring.set_state(page, State::Closing);
        let mut result = tx.conn.close(w, deadline_ns).map_err(NetError::from);
        result = result.and(rx.conn.close(w, deadline_ns).map_err(NetError::from));
        for p in [tx.pages, rx.pages] {
            if let Err(e) = p.release() {
                result = result.and(Err(e.into()));
            }
        }
        result
    }
}

// ---- smoltcp ----

impl Netfront {
    /// A smoltcp interface configuration with this interface's MAC.
    pub fn interface_config(&self, random_seed: u64) -> smoltcp::iface::Config {
        let mut c = smoltcp::iface::Config::new(smoltcp::wire::HardwareAddress::Ethernet(
            smoltcp::wire::EthernetAddress(self.mac),
        ));
        c.random_seed = random_seed;
        c
    }

    /// This interface's address as a smoltcp CIDR (a /24).
    pub fn address(&self) -> smoltcp::wire::IpCidr {
        let [a, b, c, d] = self.ip;
        smoltcp::wire::IpCidr::new(smoltcp::wire::IpAddress::v4(a, b, c, d), 24)
    }

    /// Gives `iface` this interface's address.
    pub fn addresses(&self, iface: &mut smoltcp::iface::Interface) {
        let cidr = self.address();
        iface.update_ip_addrs(|a| {
            a.clear();
            let _ = a.push(cidr);
        });
    }
}

/// A received frame, already copied out of the shared page.
pub struct RxToken<'a> {
    frame: &'a [u8],
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.frame)
    }
}

/// A free TX buffer (taken when the token is made; given back if the
/// token is dropped unused, as smoltcp does with `receive`'s).
pub struct TxToken<'a> {
    tx: &'a mut Tx,
    stats: &'a mut Stats,
    id: u16,
    used: bool,
}

impl Drop for TxToken<'_> {
    fn drop(&mut self) {
        if !self.used {
            self.tx.free.push(self.id);
        }
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(mut self, len: usize, f: F) -> R {
        self.used = true;
        if len == 0 || len > TX_BUF_SIZE {
            // smoltcp never asks for more than the MTU; build the frame
            // somewhere and drop it.
            self.tx.free.push(self.id);
            self.stats.tx_errors += 1;
            let mut scratch = vec![0u8; len];
            return f(&mut scratch);
        }
        let (_, page, offset) = self.tx.place(self.id);
        let va = self.tx.pages.va + (page * PAGE + offset) as u64;
        // SAFETY: `va..va + len` is inside TX buffer `id` (len <=
        // TX_BUF_SIZE, and the buffer lies within its page of our
        // allocation, which lives as long as the connection that `self.tx`
        // borrows). The buffer is free (its id came off the free stack and
        // is not on the ring), so nothing else of ours touches it; the
        // backend's grant is read-only, so no one else writes it.
        let buf = unsafe { core::slice::from_raw_parts_mut(va as *mut u8, len) };
        let r = f(buf);
        // A ring or notification failure drops the frame (TCP resends).
        if self.tx.send(self.id, len, &mut *self.stats).is_err() {
            self.stats.tx_errors += 1;
        }
        r
    }
}

impl phy::Device for Netfront {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(
        &mut self,
        _timestamp: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if self.tx.free.is_empty() {
            let _ = self.reap_tx();
        }
        if self.tx.free.is_empty() {
            self.stats.tx_full += 1;
            return None;
        }
        let n = self.rx.next_frame(&mut self.stats).ok().flatten()?;
        let id = self.tx.free.pop()?;
        Some((
            RxToken {
                frame: &self.rx.frame[..n],
            },
            TxToken {
                tx: &mut self.tx,
                stats: &mut self.stats,
                id,
                used: false,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        if self.tx.free.is_empty() {
            let _ = self.reap_tx();
        }
        let Some(id) = self.tx.free.pop() else {
            self.stats.tx_full += 1;
            return None;
        };
        Some(TxToken {
            tx: &mut self.tx,
            stats: &mut self.stats,
            id,
            used: false,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = MAX_FRAME;
        c.max_burst_size = None;
        c
    }
}

/// smoltcp's clock from the hypervisor's.
pub fn now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros((crate::time_ns() / 1000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_states_that_end_the_connection() {
        assert!(!ended(Some(State::Unknown)));
        assert!(!ended(Some(State::Initialising)));
        assert!(!ended(Some(State::Connected)));
        assert!(ended(Some(State::Closing)));
        assert!(ended(Some(State::Closed)));
        assert!(ended(None));
    }

    #[test]
    fn shared_copies_are_exact_at_every_alignment() {
        let src: Vec<u8> = (0..64u8).map(|b| b.wrapping_mul(37) ^ 0x5a).collect();
        for start in 0..9 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 40, 55 - start] {
                let mut out = vec![0xeeu8; len + 2];
                // SAFETY: `start + len` <= 64, inside `src`.
                unsafe { read_shared(src.as_ptr().add(start), &mut out[1..len + 1]) };
                assert_eq!(&out[1..len + 1], &src[start..start + len], "{start}+{len}");
                assert_eq!((out[0], out[len + 1]), (0xee, 0xee), "{start}+{len}");
                let mut dst = vec![0xeeu8; 64];
                // SAFETY: as above, inside `dst`.
                unsafe { write_shared(dst.as_mut_ptr().add(start), &src[..len]) };
                assert_eq!(&dst[start..start + len], &src[..len], "{start}+{len}");
                assert!(dst[..start]
                    .iter()
                    .chain(&dst[start + len..])
                    .all(|&b| b == 0xee));
            }
        }
    }

    /// The hostile-netfront scenario's `collect`, one step at a time: it
    /// takes the responses there are (none yet), the backend answers, and
    /// then `wait` reaps before sleeping. The response must still reach
    /// the next `take_tx_responses` (it was thrown away: `bad-gref` saw no
    /// response in 5 s).
    #[test]
    fn a_response_reaped_by_wait_reaches_take_tx_responses() {
        use abi::ring::{BackRing, PAGE_SIZE};
        let mut page = [0u8; PAGE_SIZE];
        let mut front = FrontRing::init(&mut page, TX_ENTRY_SIZE);
        let mut back = BackRing::attach(&page, TX_ENTRY_SIZE);
        let (mut busy, mut free) = (vec![false; 4], vec![3u16, 2, 1, 0]);
        let mut stats = Stats::default();
        let mut seen = Seen::default();
        let raw = |id| TxRequest {
            gref: 4095,
            offset: 0,
            flags: 0,
            id,
            size: 60,
        };
        let mut answer = |page: &mut [u8; PAGE_SIZE], st: i16| {
            let mut e = [0u8; TX_ENTRY_SIZE];
            assert!(back.take_request(page, &mut e).unwrap());
            let q = TxRequest::decode(&e);
            let rsp = TxResponse {
                id: q.id,
                status: st,
            };
            back.put_response(page, &rsp.encode()).unwrap();
            back.push_responses(page);
        };
        // put_tx_raw (watching from here on), push
        seen.watching = true;
        front.put_request(&mut page, &raw(0x8002).encode()).unwrap();
        front.push_requests(&mut page);
        let mut got = Vec::new();
        let n = take_seen(
            &mut front,
            &page,
            &mut busy,
            &mut free,
            &mut stats,
            &mut seen,
            |r| got.push(r),
        )
        .unwrap();
        assert_eq!(n, 0);
        answer(&mut page, status::ERROR);
        // wait: reap before sleeping
        let reaped = reap_keep(
            &mut front, &page, &mut busy, &mut free, &mut stats, &mut seen,
        )
        .unwrap();
        assert_eq!(reaped, 1);
        let n = take_seen(
            &mut front,
            &page,
            &mut busy,
            &mut free,
            &mut stats,
            &mut seen,
            |r| got.push(r),
        )
        .unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            got,
            [TxResponse {
                id: 0x8002,
                status: status::ERROR
            }]
        );
        // taken once: not again
        let n = take_seen(
            &mut front,
            &page,
            &mut busy,
            &mut free,
            &mut stats,
            &mut seen,
            |r| got.push(r),
        )
        .unwrap();
        assert_eq!((n, got.len()), (0, 1));
        // kept and fresh responses come in ring order
        for id in [0x8004, 0x8005] {
            front.put_request(&mut page, &raw(id).encode()).unwrap();
        }
        front.push_requests(&mut page);
        answer(&mut page, status::ERROR);
        reap_keep(
            &mut front, &page, &mut busy, &mut free, &mut stats, &mut seen,
        )
        .unwrap();
        answer(&mut page, status::ERROR);
        got.clear();
        take_seen(
            &mut front,
            &page,
            &mut busy,
            &mut free,
            &mut stats,
            &mut seen,
            |r| got.push(r),
        )
        .unwrap();
        let ids: Vec<u16> = got.iter().map(|r| r.id).collect();
        assert_eq!(ids, [0x8004, 0x8005]);
        assert_eq!(stats.tx_unseen, 0);
    }

    /// A netfront nobody watches keeps nothing, and one that is watched
    /// keeps at most MAX_KEPT.
    #[test]
    fn kept_responses_are_bounded() {
        let mut stats = Stats::default();
        let mut seen = Seen::default();
        let r = TxResponse { id: 1, status: 0 };
        seen.keep(r, &mut stats);
        assert!(seen.kept.is_empty());
        seen.watching = true;
        for _ in 0..MAX_KEPT + 3 {
            seen.keep(r, &mut stats);
        }
        assert_eq!((seen.kept.len(), stats.tx_unseen), (MAX_KEPT, 3));
    }

    #[test]
    fn default_buffers_fit_the_grant_table() {
        let c = Config::default();
        assert!(c.tx_pages * TX_PER_PAGE <= MAX_BUFS && c.rx_bufs <= MAX_BUFS);
        assert!(c.tx_pages + c.rx_bufs <= grant::TABLE_ENTRIES - grant::FIRST_FREE_REF as usize);
    }
}
