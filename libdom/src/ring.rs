//! Shared rings over real pages, and the frontend's side of a connection.
//!
//! [`SharedPage`] implements `abi::ring::RingPage` over one 4 KiB page of
//! memory that another domain may read and write at any time: every access
//! is volatile and `fence` is a real full barrier (`mfence`). It is the only
//! `unsafe` of the ring code. [`OwnedPage`] is such a page taken from our
//! own heap (the frontend's ring page); a backend wraps the page it mapped
//! from a grant with [`SharedPage::new`].
//!
//! # The connection (no xenstore)
//!
//! The hypervisor gives both ends of a vbd (or any split device) the ring's
//! grant reference and the event channel in their start info. The two state
//! words in the ring header (`abi::ring::State`, Xen's `XenbusState`
//! numbers) carry the handshake. As blkback reads them, the frontend's
//! Connected means "the ring is ready" (Xen's Initialised) and the
//! backend's Connected means "attached and serving":
//!
//! ```text
//!  frontend                                   backend
//!  allocate the page, init the ring
//!    (front state Initialising)
//!  grant it at ring_gref to the backend
//!  front state Connected, notify -------------> map ring_gref; front Connected?
//!                                               attach, back state Connected
//!  back state Connected? <--------------------- notify
//!  (requests flow)
//!  ...
//!  close: front state Closing, notify --------> stop taking requests, finish
//!                                               those in flight, unmap all,
//!                                               back state Closed
//!  back state Closed? <------------------------ notify
//!  front state Closed, revoke the grant, free the page
//! ```
//!
//! Either side may close: a backend that ends the connection (a hostile
//! frontend, its own exit) sets Closing, then Closed; the frontend then
//! stops producing, sets Closed, and takes its page back once the backend
//! has unmapped it (the revoke fails until then, and the page is leaked
//! rather than reused while it could still be mapped).

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};

use abi::domain::VbdInfo;
use abi::hypercall::{virq, Error, PORT_WORDS};
use abi::ring::{self, FrontRing, RingPage, State, PAGE_SIZE};

use crate::grant::{self, GrantError};
use crate::ports::Pending;

/// One page shared with another domain.
#[derive(Debug)]
pub struct SharedPage {
    base: NonNull<u8>,
}

impl SharedPage {
    /// The page at `va`.
    ///
    /// # Safety
    ///
    /// `va` is page-aligned and the page is mapped readable and writable in
    /// this domain for as long as the `SharedPage` lives (our own memory, or
    /// a grant mapping that is unmapped only after it is dropped). Other
    /// domains may change it at any time; nothing of ours but this
    /// `SharedPage` uses it.
    pub unsafe fn new(va: u64) -> Self {
        assert!(
            va.is_multiple_of(PAGE_SIZE as u64) && va != 0,
            "not a page: {va:#x}"
        );
        SharedPage {
            // va != 0 was just checked.
            base: NonNull::new(va as *mut u8).unwrap_or(NonNull::dangling()),
        }
    }

    /// The page's address.
    pub fn va(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// The address of `len` bytes at `off`, inside the page; a violation is
    /// a bug of the ring code (the `RingPage` contract), so it panics.
    fn at(&self, off: usize, len: usize, align: usize) -> *mut u8 {
        assert!(
            off.is_multiple_of(align) && off.checked_add(len).is_some_and(|e| e <= PAGE_SIZE),
            "ring page access of {len} bytes at {off:#x}"
        );
        self.base.as_ptr().wrapping_add(off)
    }
}

impl RingPage for SharedPage {
    fn load_u32(&self, off: usize) -> u32 {
        let p = self.at(off, 4, 4) as *const u32;
        // SAFETY: `p` is 4-aligned and inside the page (checked by `at`),
        // which is mapped readable while `self` lives (`new`'s contract);
        // volatile because the peer writes it behind the compiler's back.
        u32::from_le(unsafe { p.read_volatile() })
    }

    fn store_u32(&mut self, off: usize, v: u32) {
        let p = self.at(off, 4, 4) as *mut u32;
        // SAFETY: as for `load_u32`; the page is mapped writable.
        unsafe { p.write_volatile(v.to_le()) }
    }

    fn read(&self, off: usize, buf: &mut [u8]) {
        let p = self.at(off, buf.len(), 1);
        // Whole words where the range is 8-aligned (ring entries are), the
        // rest byte by byte.
        let words = if off.is_multiple_of(8) {
            buf.len() / 8
        } else {
            0
        };
        for (i, w) in buf.chunks_exact_mut(8).take(words).enumerate() {
            // SAFETY: `p + 8i` is 8-aligned (the page is page-aligned and
            // `off` a multiple of 8) and its 8 bytes are inside the page
            // (`at` checked the whole range), mapped readable; each byte
            // is read exactly once.
            let v = unsafe { (p as *const u64).add(i).read_volatile() };
            w.copy_from_slice(&v.to_ne_bytes());
        }
        for (i, b) in buf.iter_mut().enumerate().skip(words * 8) {
            // SAFETY: `p + i` is inside the page, as above.
            *b = unsafe { p.add(i).read_volatile() };
        }
    }

    fn write(&mut self, off: usize, buf: &[u8]) {
        let p = self.at(off, buf.len(), 1);
        let words = if off.is_multiple_of(8) {
            buf.len() / 8
        } else {
            0
        };
        for (i, w) in buf.chunks_exact(8).take(words).enumerate() {
            let v = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            // SAFETY: as for `read`; the page is mapped writable.
            unsafe { (p as *mut u64).add(i).write_volatile(v) }
        }
        for (i, &b) in buf.iter().enumerate().skip(words * 8) {
            // SAFETY: as for `read`; the page is mapped writable.
            unsafe { p.add(i).write_volatile(b) }
        }
    }

    fn fence(&self) {
        // A full barrier: `mfence` on x86-64, which orders the volatile
        // accesses on both sides of it for the peer's CPU too.
        fence(Ordering::SeqCst);
    }
}

/// A page of our own heap, zeroed, used as a shared page.
#[derive(Debug)]
pub struct OwnedPage {
    page: SharedPage,
}

impl OwnedPage {
    fn layout() -> Layout {
        // 4096 is a power of two and non-zero.
        Layout::from_size_align(PAGE_SIZE, PAGE_SIZE).unwrap_or(Layout::new::<u8>())
    }

    /// A fresh zeroed page.
    pub fn new() -> Result<Self, Error> {
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc::alloc_zeroed(Self::layout()) };
        if raw.is_null() {
            return Err(Error::NoSpace);
        }
        // SAFETY: a page-aligned page of our heap, RW, ours until `free`.
        let page = unsafe { SharedPage::new(raw as u64) };
        Ok(OwnedPage { page })
    }

    pub fn va(&self) -> u64 {
        self.page.va()
    }

    pub fn page(&self) -> &SharedPage {
        &self.page
    }

    pub fn page_mut(&mut self) -> &mut SharedPage {
        &mut self.page
    }

    /// Gives the page back to the heap. Only once no grant of it remains
    /// (whoever could have mapped it has unmapped it); otherwise drop the
    /// `OwnedPage` without calling this, which leaks it.
    pub fn free(self) {
        // SAFETY: allocated in `new` with this layout, freed once (`self`
        // is consumed); the caller promises nobody else maps it now.
        unsafe { alloc::alloc::dealloc(self.page.base.as_ptr(), Self::layout()) }
    }
}

/// Why a frontend connection failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnError {
    /// A hypercall failed (allocation, event channel, timer).
    Hypercall(Error),
    Grant(GrantError),
    /// The backend did not answer in time; `state` is where it was.
    Timeout {
        state: Option<State>,
    },
    /// The backend closed the connection (or wrote a state that is not one).
    Closed {
        state: Option<State>,
    },
    /// The backend broke the ring's rules (a response index past what we
    /// asked for).
    Ring(ring::Error),
}

impl core::fmt::Display for ConnError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let name = |s: &Option<State>| s.map_or("not a state", State::name);
        match self {
            ConnError::Hypercall(e) => write!(f, "hypercall failed: {}", e.name()),
            ConnError::Grant(e) => write!(f, "grant: {e}"),
            ConnError::Timeout { state } => {
                write!(f, "the backend did not answer (its state: {})", name(state))
            }
            ConnError::Closed { state } => {
                write!(
                    f,
                    "the backend closed the connection (its state: {})",
                    name(state)
                )
            }
            ConnError::Ring(e) => write!(f, "the backend broke the ring: {e}"),
        }
    }
}

impl From<Error> for ConnError {
    fn from(e: Error) -> Self {
        ConnError::Hypercall(e)
    }
}

impl From<GrantError> for ConnError {
    fn from(e: GrantError) -> Self {
        ConnError::Grant(e)
    }
}

impl From<ring::Error> for ConnError {
    fn from(e: ring::Error) -> Self {
        ConnError::Ring(e)
    }
}

/// Blocks on a port with a time limit: the timer VIRQ, bound once per
/// domain and kept here. Ports that become pending and are not ours are
/// kept in [`Waiter::others`].
#[derive(Debug)]
pub struct Waiter {
    timer: u16,
    /// Ports that were pending and not asked for.
    pub others: Pending,
}

impl Waiter {
    /// Binds the timer VIRQ (a domain may bind it once: make one `Waiter`
    /// and share it).
    pub fn new() -> Result<Self, Error> {
        Ok(Waiter {
            timer: crate::evtchn_bind_virq(virq::TIMER)?,
            others: Pending::default(),
        })
    }

    /// The timer's port.
    pub fn timer_port(&self) -> u16 {
        self.timer
    }

    /// Blocks until `port` is pending (true) or `deadline_ns` has passed
    /// (false).
    pub fn wait(&mut self, port: u16, deadline_ns: u64) -> Result<bool, Error> {
        if self.others.contains(port) {
            self.others = remove(self.others, port);
            return Ok(true);
        }
        loop {
            if crate::time_ns() >= deadline_ns {
                return Ok(false);
            }
            crate::set_timer(deadline_ns)?;
            let mut words = [0u64; PORT_WORDS];
            crate::wait(&mut words, 0)?;
            let mut got = Pending(words);
            let fired = got.contains(port);
            got = remove(remove(got, port), self.timer);
            for p in got.iter() {
                self.others.insert(p);
            }
            if fired {
                return Ok(true);
            }
        }
    }
}

fn remove(mut p: Pending, port: u16) -> Pending {
    let i = usize::from(port);
    if let Some(w) = p.0.get_mut(i / 64) {
        *w &= !(1u64 << (i % 64));
    }
    p
}

/// The frontend's end of a ring connection: the ring page (ours, granted
/// to the backend at the vbd's ring reference), its `FrontRing`, and the
/// event channel.
#[derive(Debug)]
pub struct FrontConn {
    page: Option<OwnedPage>,
    ring: FrontRing,
    gref: u32,
    port: u16,
    peer: u16,
    /// Set once the backend said Connected.
    connected: bool,
}

impl FrontConn {
    /// Allocates and initialises the ring page (front state Initialising),
    /// grants it to the backend at the vbd's ring reference, says the ring
    /// is ready (front state Connected) and notifies the backend. Then call
    /// [`FrontConn::wait_connected`].
    pub fn start(vbd: &VbdInfo<'_>, entry_size: usize) -> Result<Self, ConnError> {
        Self::start_at(vbd.ring_gref, vbd.peer, vbd.port, entry_size)
    }

    /// As [`FrontConn::start`] for any ring: the page granted to `peer` at
    /// `gref`, signalled on `port` (a vif has two rings, TX and RX, on one
    /// port).
    pub fn start_at(gref: u32, peer: u16, port: u16, entry_size: usize) -> Result<Self, ConnError> {
        let mut page = OwnedPage::new()?;
        let ring = FrontRing::init(page.page_mut(), entry_size);
        if let Err(e) = grant::grant_at(gref, peer, page.va(), false) {
            page.free();
            return Err(e.into());
        }
        ring.set_state(page.page_mut(), State::Connected);
        let c = FrontConn {
            page: Some(page),
            ring,
            gref,
            port,
            peer,
            connected: false,
        };
        c.notify()?;
        Ok(c)
    }

    /// Waits (at most until `deadline_ns`) for the backend to say
    /// Connected.
    pub fn wait_connected(&mut self, w: &mut Waiter, deadline_ns: u64) -> Result<(), ConnError> {
        loop {
            match self.back_state() {
                Some(State::Connected) => break,
                Some(State::Unknown | State::Initialising) => {}
                state => return Err(ConnError::Closed { state }),
            }
            if !w.wait(self.port, deadline_ns)? {
                // One last look: the notification may have raced the timer.
                if self.back_state() == Some(State::Connected) {
                    break;
                }
                return Err(ConnError::Timeout {
                    state: self.back_state(),
                });
            }
        }
        self.connected = true;
        Ok(())
    }

    /// The backend's state word.
    pub fn back_state(&self) -> Option<State> {
        self.page.as_ref().and_then(|p| ring::back_state(p.page()))
    }

    /// Whether the connection is up: the backend said Connected and still
    /// says so.
    pub fn is_connected(&self) -> bool {
        self.connected && self.back_state() == Some(State::Connected)
    }

    /// Signals the backend over the event channel.
    pub fn notify(&self) -> Result<(), Error> {
        crate::evtchn_send(self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The backend's domain id.
    pub fn peer(&self) -> u16 {
        self.peer
    }

    pub fn ring(&self) -> &FrontRing {
        &self.ring
    }

    /// The ring and the page, to produce and consume.
    pub fn parts(&mut self) -> (&mut FrontRing, &mut SharedPage) {
        let page = match &mut self.page {
            Some(p) => p.page_mut(),
            None => unreachable!("the page lives as long as the connection"),
        };
        (&mut self.ring, page)
    }

    fn page_mut(&mut self) -> &mut SharedPage {
        self.parts().1
    }

    /// Publishes the requests put so far and notifies the backend if the
    /// ring's rule says it asked to be.
    pub fn push(&mut self) -> Result<(), Error> {
        let (ring, page) = self.parts();
        if ring.push_requests(page) {
            self.notify()?;
        }
        Ok(())
    }

    /// Closes the connection: front state Closing, notify, wait (until
    /// `deadline_ns`) for the backend to say Closed, then Closed, the grant
    /// revoked and the page freed. If the backend never lets go of the page,
    /// it is leaked (never reused while it could still be mapped) and the
    /// error says so.
    pub fn close(mut self, w: &mut Waiter, deadline_ns: u64) -> Result<(), ConnError> {
        {
            let ring = self.ring.clone();
            ring.set_state(self.page_mut(), State::Closing);
        }
        // A notification that cannot be sent means the backend's end of
        // the channel is gone (its domain ended, which tore down its
        // mappings): there is nobody to wait for, and the revoke below
        // tells whether the page is free.
        let gone = self.notify().is_err();
        let mut result = Ok(());
        loop {
            if gone {
                break;
            }
            match self.back_state() {
                Some(State::Closed) | Some(State::Unknown) => break,
                _ => {}
            }
            if !w.wait(self.port, deadline_ns)? {
                if self.back_state() != Some(State::Closed) {
                    result = Err(ConnError::Timeout {
                        state: self.back_state(),
                    });
                }
                break;
            }
        }
        let ring = self.ring.clone();
        ring.set_state(self.page_mut(), State::Closed);
        let _ = self.notify();
        match grant::revoke(self.gref) {
            Ok(()) => {
                if let Some(p) = self.page.take() {
                    p.free();
                }
                result
            }
            Err(e) => {
                // Still mapped (or never ours): leak the page.
                self.page = None;
                result.and(Err(e.into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_page_is_a_ring_page() {
        // A heap page standing in for a shared one.
        let page = OwnedPage::new().unwrap();
        let va = page.va();
        assert_eq!(va % 4096, 0);
        let mut p = page;
        let pg = p.page_mut();
        let mut f = FrontRing::init(pg, abi::blkif::ENTRY_SIZE);
        assert_eq!(pg.load_u32(abi::ring::off::REQ_EVENT), 1);
        assert_eq!(ring::front_state(pg), Some(State::Initialising));
        let mut b = abi::ring::BackRing::attach(pg, abi::blkif::ENTRY_SIZE);
        let req = abi::blkif::Request {
            id: 42,
            nr_segments: 1,
            ..Default::default()
        };
        f.put_request(pg, &req.encode()).unwrap();
        assert!(f.push_requests(pg));
        let mut buf = [0u8; abi::blkif::REQUEST_SIZE];
        assert!(b.take_request(pg, &mut buf).unwrap());
        assert_eq!(abi::blkif::Request::decode(&buf).id, 42);
        let rsp = abi::blkif::Response {
            id: 42,
            operation: 0,
            status: -1,
        };
        b.put_response(pg, &rsp.encode()).unwrap();
        assert!(b.push_responses(pg));
        let mut r = [0u8; abi::blkif::RESPONSE_SIZE];
        assert!(f.take_response(pg, &mut r).unwrap());
        assert_eq!(abi::blkif::Response::decode(&r), rsp);
        // Bytes land where the layout says.
        let mut w = [0u8; 4];
        pg.read(abi::ring::off::REQ_PROD, &mut w);
        assert_eq!(u32::from_le_bytes(w), 1);
        p.free();
    }

    #[test]
    fn reads_and_writes_of_any_alignment_and_length() {
        let mut p = OwnedPage::new().unwrap();
        let pg = p.page_mut();
        let data: [u8; 23] = core::array::from_fn(|i| i as u8 + 1);
        for off in [0, 1, 7, 8, 64, 4070] {
            for len in [0, 1, 7, 8, 9, 16, 23] {
                pg.write(off, &data[..len]);
                let mut out = [0xaau8; 23];
                pg.read(off, &mut out[..len]);
                assert_eq!(&out[..len], &data[..len], "at {off}, {len} bytes");
                // Nothing past the range was touched.
                let mut after = [0u8; 1];
                pg.read(off + len, &mut after);
                assert_eq!(after[0], 0, "after {off} + {len}");
                pg.write(off, &[0; 23][..len]);
            }
        }
        p.free();
    }

    #[test]
    #[should_panic(expected = "ring page access")]
    fn out_of_page_accesses_panic() {
        let p = OwnedPage::new().unwrap();
        let _ = p.page().load_u32(4094);
    }

    #[test]
    fn removing_a_port() {
        let mut p = Pending::default();
        p.insert(3);
        p.insert(70);
        let p = remove(p, 3);
        assert!(!p.contains(3) && p.contains(70));
    }
}
