//! The shared ring page, Xen's `io/ring.h` rules.
//!
//! One 4 KiB page, granted by the frontend and mapped by the backend:
//!
//! ```text
//!  0  u32 req_prod    written by the frontend: requests published so far
//!  4  u32 req_event   written by the backend: notify me when req_prod passes this
//!  8  u32 rsp_prod    written by the backend: responses published so far
//! 12  u32 rsp_event   written by the frontend: notify me when rsp_prod passes this
//! 16  u32 front state (airlock; Xen's `pvt` bytes, which blkif leaves unused)
//! 20  u32 back state  (airlock; the first word of Xen's `pad[44]`)
//! 24  u32 back max indirect segments (airlock, blkif; 0 for other rings)
//! 28  ... pad, zero, up to 64
//! 64  ring[entries]   each slot a request or, once consumed, its response
//! ```
//!
//! Indices are free-running `u32`s: slot `i` is at `64 + (i & (entries - 1)) *
//! entry_size`, and every comparison is a wrapping difference, so the ring
//! works across the wrap from `0xffff_ffff` to 0.
//!
//! airlock has no xenstore; the two state words carry Xen's `XenbusState`
//! numbers ([`State`]) so that either side can close the connection cleanly,
//! and a blkif backend writes the most segments it takes in one INDIRECT
//! request (Xen's `feature-max-indirect-segments`; 0: no INDIRECT) before
//! its state says Connected. The frontend zeroed the page, so a backend that
//! writes nothing offers no INDIRECT.
//!
//! Nothing here touches memory directly: the page is reached through
//! [`RingPage`], which the domain implements with volatile accesses and real
//! fences over the mapped page, and tests with a byte array. [`FrontRing`]
//! and [`BackRing`] hold each side's private indices and copy whole entries
//! in or out once, so a consumer validates its private copy and never reads
//! the shared slot twice (the double-fetch class, XSA-155). A consumer also
//! refuses a producer index that claims more than the ring can hold
//! ([`Error::Overrun`]): the peer is hostile, and the connection should end.

/// Bytes of the ring page.
pub const PAGE_SIZE: usize = 4096;
/// Bytes of the header before the first slot.
pub const HEADER_SIZE: usize = 64;

/// Byte offsets of the header's words.
pub mod off {
    pub const REQ_PROD: usize = 0;
    pub const REQ_EVENT: usize = 4;
    pub const RSP_PROD: usize = 8;
    pub const RSP_EVENT: usize = 12;
    /// The frontend's [`super::State`] (airlock).
    pub const FRONT_STATE: usize = 16;
    /// The backend's [`super::State`] (airlock).
    pub const BACK_STATE: usize = 20;
    /// blkif: the most segments of an INDIRECT request the backend takes,
    /// written before its state says Connected (airlock).
    pub const BACK_MAX_INDIRECT: usize = 24;
}

/// Slots in a ring whose entries (the union of request and response) are
/// `entry_size` bytes: the largest power of two that fits after the header.
/// 0 when not even one entry fits (or `entry_size` is 0).
pub const fn entries(entry_size: usize) -> u32 {
    if entry_size == 0 || entry_size > PAGE_SIZE - HEADER_SIZE {
        return 0;
    }
    let n = (PAGE_SIZE - HEADER_SIZE) / entry_size;
    // round down to a power of two
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// Xen's notify rule: after moving a producer index from `old` to `new`,
/// the peer asked to be told iff its `event` index lies in `(old, new]`.
pub const fn need_notify(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// A side's connection state, in Xen's `XenbusState` numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum State {
    /// Nothing written yet (a zeroed page).
    Unknown = 0,
    Initialising = 1,
    Connected = 4,
    Closing = 5,
    Closed = 6,
}

impl State {
    pub const ALL: [State; 5] = [
        State::Unknown,
        State::Initialising,
        State::Connected,
        State::Closing,
        State::Closed,
    ];

    /// `None` for a number that is not one of ours (a hostile or broken
    /// peer; treat it as closing).
    pub fn from_raw(v: u32) -> Option<State> {
        State::ALL.iter().copied().find(|s| *s as u32 == v)
    }

    pub const fn name(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Initialising => "initialising",
            State::Connected => "connected",
            State::Closing => "closing",
            State::Closed => "closed",
        }
    }
}

/// Access to the shared page. Offsets are below [`PAGE_SIZE`], `u32`
/// offsets are 4-aligned, and `off + buf.len() <= PAGE_SIZE`: the ring code
/// never asks for anything else, so an implementation may treat a violation
/// as a bug. The page is shared with a peer that may change it at any time;
/// implementations read and write it with volatile accesses.
pub trait RingPage {
    /// Read the little-endian `u32` at `off`.
    fn load_u32(&self, off: usize) -> u32;
    /// Write the little-endian `u32` at `off`.
    fn store_u32(&mut self, off: usize, v: u32);
    /// Copy `buf.len()` bytes out of the page from `off`.
    fn read(&self, off: usize, buf: &mut [u8]);
    /// Copy `buf` into the page at `off`.
    fn write(&mut self, off: usize, buf: &[u8]);
    /// A full memory barrier (orders earlier loads and stores before later
    /// ones; also serves as Xen's read and write barriers).
    fn fence(&self);
}

/// A plain array is a ring page, for tests: nobody else can touch it while
/// it is borrowed, so `fence` has nothing to order.
impl RingPage for [u8; PAGE_SIZE] {
    fn load_u32(&self, off: usize) -> u32 {
        u32::from_le_bytes([self[off], self[off + 1], self[off + 2], self[off + 3]])
    }
    fn store_u32(&mut self, off: usize, v: u32) {
        self[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self[off..off + buf.len()]);
    }
    fn write(&mut self, off: usize, buf: &[u8]) {
        self[off..off + buf.len()].copy_from_slice(buf);
    }
    fn fence(&self) {
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    }
}

/// What a ring operation can refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The peer's producer index claims entries that cannot exist: more than
    /// the ring holds past what we have answered (backend), or more responses
    /// than requests outstanding (frontend), or it moved backwards. The peer
    /// is hostile or broken; end the connection.
    Overrun { prod: u32, base: u32 },
    /// No free slot to produce into (frontend: the ring is full; backend: no
    /// consumed request is waiting for a response).
    Full,
    /// The entry passed in is longer than the ring's entry size.
    EntrySize,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Overrun { prod, base } => {
                write!(f, "producer index {prod} overruns the ring (base {base})")
            }
            Error::Full => f.write_str("no free slot"),
            Error::EntrySize => f.write_str("entry longer than the ring's entry size"),
        }
    }
}

/// Size and slot arithmetic shared by both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    entry_size: usize,
    size: u32,
}

impl Geometry {
    const fn new(entry_size: usize) -> Self {
        let size = entries(entry_size);
        assert!(size > 0, "ring entry does not fit in a page");
        Geometry { entry_size, size }
    }

    fn slot_off(&self, idx: u32) -> usize {
        HEADER_SIZE + (idx & (self.size - 1)) as usize * self.entry_size
    }
}

/// Set up a fresh shared page (Xen's `SHARED_RING_INIT`) starting at index
/// `start` (Xen always uses 0; tests start near the wrap): the whole page
/// zeroed, both producers at `start`, both events at `start + 1`, the front
/// state Initialising.
fn init_shared<P: RingPage + ?Sized>(page: &mut P, start: u32) {
    let zero = [0u8; 256];
    let mut o = 0;
    while o < PAGE_SIZE {
        page.write(o, &zero);
        o += zero.len();
    }
    page.store_u32(off::REQ_PROD, start);
    page.store_u32(off::RSP_PROD, start);
    page.store_u32(off::REQ_EVENT, start.wrapping_add(1));
    page.store_u32(off::RSP_EVENT, start.wrapping_add(1));
    page.store_u32(off::FRONT_STATE, State::Initialising as u32);
    page.fence();
}

/// The frontend's side: it produces requests and consumes responses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontRing {
    geo: Geometry,
    req_prod_pvt: u32,
    rsp_cons: u32,
}

impl FrontRing {
    /// Initialise `page` as a fresh ring of `entry_size`-byte entries and
    /// return the frontend's side of it (front state Initialising).
    pub fn init<P: RingPage + ?Sized>(page: &mut P, entry_size: usize) -> Self {
        Self::init_at(page, entry_size, 0)
    }

    /// As [`FrontRing::init`], with every index starting at `start`.
    pub fn init_at<P: RingPage + ?Sized>(page: &mut P, entry_size: usize, start: u32) -> Self {
        let geo = Geometry::new(entry_size);
        init_shared(page, start);
        FrontRing {
            geo,
            req_prod_pvt: start,
            rsp_cons: start,
        }
    }

    /// Slots in the ring.
    pub fn size(&self) -> u32 {
        self.geo.size
    }
    pub fn entry_size(&self) -> usize {
        self.geo.entry_size
    }
    /// Requests produced so far (published or not).
    pub fn req_prod_pvt(&self) -> u32 {
        self.req_prod_pvt
    }
    /// Responses consumed so far.
    pub fn rsp_cons(&self) -> u32 {
        self.rsp_cons
    }
    /// Requests produced and not yet answered.
    pub fn outstanding(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }
    /// Slots free for new requests.
    pub fn free_requests(&self) -> u32 {
        self.geo.size - self.outstanding()
    }
    pub fn is_full(&self) -> bool {
        self.free_requests() == 0
    }

    /// Write `entry` into the next request slot (not yet visible to the
    /// backend: call [`FrontRing::push_requests`]).
    pub fn put_request<P: RingPage + ?Sized>(
        &mut self,
        page: &mut P,
        entry: &[u8],
    ) -> Result<(), Error> {
        if entry.len() > self.geo.entry_size {
            return Err(Error::EntrySize);
        }
        if self.is_full() {
            return Err(Error::Full);
        }
        page.write(self.geo.slot_off(self.req_prod_pvt), entry);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publish the requests put so far; true if the backend must be notified.
    pub fn push_requests<P: RingPage + ?Sized>(&mut self, page: &mut P) -> bool {
        let old = page.load_u32(off::REQ_PROD);
        page.fence(); // entries before the index
        page.store_u32(off::REQ_PROD, self.req_prod_pvt);
        page.fence(); // index before reading the event
        need_notify(old, self.req_prod_pvt, page.load_u32(off::REQ_EVENT))
    }

    /// Responses published and not yet consumed. A backend that publishes
    /// more responses than requests are outstanding is refused.
    pub fn unconsumed_responses<P: RingPage + ?Sized>(&self, page: &P) -> Result<u32, Error> {
        let prod = page.load_u32(off::RSP_PROD);
        let n = prod.wrapping_sub(self.rsp_cons);
        if n > self.outstanding() {
            return Err(Error::Overrun {
                prod,
                base: self.rsp_cons,
            });
        }
        Ok(n)
    }

    /// Copy the next response into `buf` (its first `buf.len()` bytes of
    /// the slot) and consume it; `Ok(false)` if there is none.
    pub fn take_response<P: RingPage + ?Sized>(
        &mut self,
        page: &P,
        buf: &mut [u8],
    ) -> Result<bool, Error> {
        if buf.len() > self.geo.entry_size {
            return Err(Error::EntrySize);
        }
        if self.unconsumed_responses(page)? == 0 {
            return Ok(false);
        }
        page.fence(); // index before the entry
        page.read(self.geo.slot_off(self.rsp_cons), buf);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(true)
    }

    /// Before sleeping: true if responses are waiting; otherwise ask to be
    /// notified of the next one (`rsp_event = rsp_cons + 1`), then check
    /// again (Xen's `RING_FINAL_CHECK_FOR_RESPONSES`).
    pub fn final_check_for_responses<P: RingPage + ?Sized>(
        &mut self,
        page: &mut P,
    ) -> Result<bool, Error> {
        if self.unconsumed_responses(page)? > 0 {
            return Ok(true);
        }
        page.store_u32(off::RSP_EVENT, self.rsp_cons.wrapping_add(1));
        page.fence();
        Ok(self.unconsumed_responses(page)? > 0)
    }

    /// Write the frontend's state word.
    pub fn set_state<P: RingPage + ?Sized>(&self, page: &mut P, s: State) {
        page.fence();
        page.store_u32(off::FRONT_STATE, s as u32);
        page.fence();
    }

    /// The backend's state word (`None`: a number that is not a state).
    pub fn peer_state<P: RingPage + ?Sized>(&self, page: &P) -> Option<State> {
        State::from_raw(page.load_u32(off::BACK_STATE))
    }
}

/// The backend's side: it consumes requests and produces responses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackRing {
    geo: Geometry,
    req_cons: u32,
    rsp_prod_pvt: u32,
}

impl BackRing {
    /// Attach to a ring the frontend has initialised: both private indices
    /// start at the page's `rsp_prod` (Xen's `BACK_RING_ATTACH`; 0 on a
    /// fresh ring). Whatever the frontend wrote there, later indices are
    /// checked against it, so a hostile start gains nothing.
    pub fn attach<P: RingPage + ?Sized>(page: &P, entry_size: usize) -> Self {
        let start = page.load_u32(off::RSP_PROD);
        Self::attach_at(entry_size, start)
    }

    /// Attach with both private indices at `start` (Xen's `BACK_RING_INIT`
    /// with 0).
    pub const fn attach_at(entry_size: usize, start: u32) -> Self {
        BackRing {
            geo: Geometry::new(entry_size),
            req_cons: start,
            rsp_prod_pvt: start,
        }
    }

    pub fn size(&self) -> u32 {
        self.geo.size
    }
    pub fn entry_size(&self) -> usize {
        self.geo.entry_size
    }
    /// Requests consumed so far.
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }
    /// Responses produced so far (published or not).
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.rsp_prod_pvt
    }
    /// Requests consumed and not yet answered.
    pub fn unanswered(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// Requests the backend may consume now: `min(req_prod - req_cons,
    /// SIZE - (req_cons - rsp_prod_pvt))`. A `req_prod` more than SIZE past
    /// `rsp_prod_pvt`, or behind `req_cons`, is [`Error::Overrun`] (Xen
    /// checks the first; the second is a `req_prod` moved backwards, which
    /// Xen's arithmetic would read as a full ring of stale slots).
    pub fn unconsumed_requests<P: RingPage + ?Sized>(&self, page: &P) -> Result<u32, Error> {
        let prod = page.load_u32(off::REQ_PROD);
        let size = self.geo.size;
        if prod.wrapping_sub(self.rsp_prod_pvt) > size || prod.wrapping_sub(self.req_cons) > size {
            return Err(Error::Overrun {
                prod,
                base: self.rsp_prod_pvt,
            });
        }
        let req = prod.wrapping_sub(self.req_cons);
        let rsp = size - self.unanswered();
        Ok(req.min(rsp))
    }

    /// Copy the next request into `buf` (the first `buf.len()` bytes of its
    /// slot, read once) and consume it; `Ok(false)` if there is none.
    pub fn take_request<P: RingPage + ?Sized>(
        &mut self,
        page: &P,
        buf: &mut [u8],
    ) -> Result<bool, Error> {
        if buf.len() > self.geo.entry_size {
            return Err(Error::EntrySize);
        }
        if self.unconsumed_requests(page)? == 0 {
            return Ok(false);
        }
        page.fence(); // index before the entry
        page.read(self.geo.slot_off(self.req_cons), buf);
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(true)
    }

    /// Write `entry` as the next response (into the slot of the oldest
    /// unanswered request; not yet visible: call
    /// [`BackRing::push_responses`]). [`Error::Full`] if every consumed
    /// request is already answered.
    pub fn put_response<P: RingPage + ?Sized>(
        &mut self,
        page: &mut P,
        entry: &[u8],
    ) -> Result<(), Error> {
        if entry.len() > self.geo.entry_size {
            return Err(Error::EntrySize);
        }
        if self.unanswered() == 0 {
            return Err(Error::Full);
        }
        page.write(self.geo.slot_off(self.rsp_prod_pvt), entry);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publish the responses put so far; true if the frontend must be
    /// notified.
    pub fn push_responses<P: RingPage + ?Sized>(&mut self, page: &mut P) -> bool {
        let old = page.load_u32(off::RSP_PROD);
        page.fence();
        page.store_u32(off::RSP_PROD, self.rsp_prod_pvt);
        page.fence();
        need_notify(old, self.rsp_prod_pvt, page.load_u32(off::RSP_EVENT))
    }

    /// Before sleeping: true if requests are waiting; otherwise ask to be
    /// notified of the next one (`req_event = req_cons + 1`), then check
    /// again (Xen's `RING_FINAL_CHECK_FOR_REQUESTS`).
    pub fn final_check_for_requests<P: RingPage + ?Sized>(
        &mut self,
        page: &mut P,
    ) -> Result<bool, Error> {
        if self.unconsumed_requests(page)? > 0 {
            return Ok(true);
        }
        page.store_u32(off::REQ_EVENT, self.req_cons.wrapping_add(1));
        page.fence();
        Ok(self.unconsumed_requests(page)? > 0)
    }

    /// Write the backend's state word.
    pub fn set_state<P: RingPage + ?Sized>(&self, page: &mut P, s: State) {
        page.fence();
        page.store_u32(off::BACK_STATE, s as u32);
        page.fence();
    }

    /// The frontend's state word (`None`: a number that is not a state).
    pub fn peer_state<P: RingPage + ?Sized>(&self, page: &P) -> Option<State> {
        State::from_raw(page.load_u32(off::FRONT_STATE))
    }
}

/// Read the frontend's state word without a ring (a backend waiting to
/// attach).
pub fn front_state<P: RingPage + ?Sized>(page: &P) -> Option<State> {
    State::from_raw(page.load_u32(off::FRONT_STATE))
}

/// Read the backend's state word without a ring.
pub fn back_state<P: RingPage + ?Sized>(page: &P) -> Option<State> {
    State::from_raw(page.load_u32(off::BACK_STATE))
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: usize = 112;

    fn page() -> [u8; PAGE_SIZE] {
        [0xa5; PAGE_SIZE]
    }

    #[test]
    fn entries_round_down() {
        assert_eq!(entries(112), 32);
        assert_eq!(entries(16), 128);
        assert_eq!(entries(12), 256);
        assert_eq!(entries(8), 256);
        assert_eq!(entries(1), 2048);
        assert_eq!(entries(4032), 1);
        assert_eq!(entries(4033), 0);
        assert_eq!(entries(0), 0);
    }

    #[test]
    fn notify_rule() {
        // event in (old, new] -> notify
        assert!(need_notify(0, 1, 1));
        assert!(need_notify(0, 5, 3));
        assert!(!need_notify(0, 5, 6));
        assert!(!need_notify(3, 5, 3));
        // across the wrap
        assert!(need_notify(u32::MAX - 1, 2, 0));
        assert!(need_notify(u32::MAX - 1, 2, u32::MAX));
        assert!(!need_notify(u32::MAX - 1, 2, 3));
        assert!(!need_notify(u32::MAX - 1, 2, u32::MAX - 1));
    }

    #[test]
    fn init_layout_and_states() {
        let mut p = page();
        let f = FrontRing::init(&mut p, E);
        assert_eq!(f.size(), 32);
        assert_eq!(p.load_u32(off::REQ_PROD), 0);
        assert_eq!(p.load_u32(off::REQ_EVENT), 1);
        assert_eq!(p.load_u32(off::RSP_EVENT), 1);
        assert_eq!(front_state(&p), Some(State::Initialising));
        assert_eq!(back_state(&p), Some(State::Unknown));
        assert!(p[24..].iter().all(|b| *b == 0));
        let b = BackRing::attach(&p, E);
        b.set_state(&mut p, State::Connected);
        assert_eq!(f.peer_state(&p), Some(State::Connected));
        f.set_state(&mut p, State::Closing);
        assert_eq!(b.peer_state(&p), Some(State::Closing));
        p.store_u32(off::BACK_STATE, 3);
        assert_eq!(f.peer_state(&p), None);
        for s in State::ALL {
            assert_eq!(State::from_raw(s as u32), Some(s));
        }
    }

    fn round_trip(start: u32, rounds: u32) {
        let mut p = page();
        let mut f = FrontRing::init_at(&mut p, E, start);
        let mut b = BackRing::attach(&p, E);
        let mut next = 0u32;
        let mut seen = 0u32;
        for r in 0..rounds {
            // a varying batch, up to the ring size
            let batch = 1 + (r * 7) % f.size();
            for _ in 0..batch {
                let mut e = [0u8; E];
                e[..4].copy_from_slice(&next.to_le_bytes());
                f.put_request(&mut p, &e).unwrap();
                next += 1;
            }
            let notify = f.push_requests(&mut p);
            // the backend asked (event = req_cons + 1) before each batch
            assert!(notify, "round {r}");
            assert_eq!(b.unconsumed_requests(&p), Ok(batch));
            let mut buf = [0u8; E];
            while b.take_request(&p, &mut buf).unwrap() {
                let mut rsp = [0u8; 16];
                rsp[..4].copy_from_slice(&buf[..4]);
                b.put_response(&mut p, &rsp).unwrap();
            }
            assert!(!b.final_check_for_requests(&mut p).unwrap());
            assert!(b.push_responses(&mut p));
            let mut rsp = [0u8; 16];
            while f.take_response(&p, &mut rsp).unwrap() {
                assert_eq!(u32::from_le_bytes(rsp[..4].try_into().unwrap()), seen);
                seen += 1;
            }
            assert!(!f.final_check_for_responses(&mut p).unwrap());
        }
        assert_eq!(seen, next);
        assert_eq!(f.req_prod_pvt(), start.wrapping_add(next));
        assert_eq!(b.req_cons(), start.wrapping_add(next));
    }

    #[test]
    fn round_trip_from_zero() {
        round_trip(0, 50);
    }

    #[test]
    fn round_trip_across_the_wrap() {
        round_trip(u32::MAX - 40, 50);
        round_trip(u32::MAX, 10);
        round_trip(u32::MAX - 31, 10);
    }

    #[test]
    fn full_ring_and_backend_bound() {
        for start in [0, u32::MAX - 5] {
            let mut p = page();
            let mut f = FrontRing::init_at(&mut p, E, start);
            let mut b = BackRing::attach(&p, E);
            for _ in 0..32 {
                f.put_request(&mut p, &[1; E]).unwrap();
            }
            assert_eq!(f.put_request(&mut p, &[1; E]), Err(Error::Full));
            f.push_requests(&mut p);
            let mut buf = [0u8; E];
            for _ in 0..32 {
                assert!(b.take_request(&p, &mut buf).unwrap());
            }
            assert!(!b.take_request(&p, &mut buf).unwrap());
            // answer 3; the frontend consumes them and produces 3 more
            for _ in 0..3 {
                b.put_response(&mut p, &[0; 16]).unwrap();
            }
            b.push_responses(&mut p);
            let mut rsp = [0u8; 16];
            for _ in 0..3 {
                assert!(f.take_response(&p, &mut rsp).unwrap());
            }
            for _ in 0..3 {
                f.put_request(&mut p, &[2; E]).unwrap();
            }
            f.push_requests(&mut p);
            assert_eq!(b.unconsumed_requests(&p), Ok(3));
            // a response for a request never consumed is refused
            let mut b2 = BackRing::attach_at(E, start);
            assert_eq!(b2.put_response(&mut p, &[0; 16]), Err(Error::Full));
        }
    }

    #[test]
    fn unanswered_slots_bound_consumption() {
        // the frontend (hostile) publishes 32 more while the backend still
        // owes responses: the backend may only consume what it can answer.
        let mut p = page();
        FrontRing::init(&mut p, E);
        let mut b = BackRing::attach(&p, E);
        p.store_u32(off::REQ_PROD, 32);
        let mut buf = [0u8; E];
        for _ in 0..32 {
            assert!(b.take_request(&p, &mut buf).unwrap());
        }
        for _ in 0..4 {
            b.put_response(&mut p, &[0; 16]).unwrap();
        }
        // 36 - 4 = 32: legal, but only 4 slots are free
        p.store_u32(off::REQ_PROD, 36);
        assert_eq!(b.unconsumed_requests(&p), Ok(4));
    }

    #[test]
    fn hostile_producer_indices() {
        for start in [0u32, u32::MAX - 3, 0x8000_0000] {
            let mut p = page();
            FrontRing::init_at(&mut p, E, start);
            let b = BackRing::attach(&p, E);
            // exactly the ring size is fine
            p.store_u32(off::REQ_PROD, start.wrapping_add(32));
            assert_eq!(b.unconsumed_requests(&p), Ok(32));
            // one past it is hostile
            p.store_u32(off::REQ_PROD, start.wrapping_add(33));
            assert!(matches!(
                b.unconsumed_requests(&p),
                Err(Error::Overrun { .. })
            ));
            // so is a jump by half the index space, and moving backwards
            p.store_u32(off::REQ_PROD, start.wrapping_add(0x8000_0000));
            assert!(b.unconsumed_requests(&p).is_err());
            p.store_u32(off::REQ_PROD, start.wrapping_sub(1));
            assert!(b.unconsumed_requests(&p).is_err());
            let mut buf = [0u8; E];
            let mut b2 = b.clone();
            assert!(b2.take_request(&p, &mut buf).is_err());
            assert_eq!(b2.req_cons(), start);
        }
    }

    #[test]
    fn hostile_backend_responses() {
        let mut p = page();
        let mut f = FrontRing::init(&mut p, E);
        f.put_request(&mut p, &[0; E]).unwrap();
        f.put_request(&mut p, &[0; E]).unwrap();
        f.push_requests(&mut p);
        p.store_u32(off::RSP_PROD, 2);
        assert_eq!(f.unconsumed_responses(&p), Ok(2));
        p.store_u32(off::RSP_PROD, 3);
        let mut rsp = [0u8; 16];
        assert!(f.take_response(&p, &mut rsp).is_err());
        p.store_u32(off::RSP_PROD, u32::MAX);
        assert!(f.unconsumed_responses(&p).is_err());
    }

    #[test]
    fn final_check_sets_event() {
        let mut p = page();
        let mut f = FrontRing::init_at(&mut p, E, u32::MAX);
        let mut b = BackRing::attach(&p, E);
        assert!(!b.final_check_for_requests(&mut p).unwrap());
        assert_eq!(p.load_u32(off::REQ_EVENT), 0); // u32::MAX + 1
        f.put_request(&mut p, &[0; E]).unwrap();
        assert!(f.push_requests(&mut p));
        assert!(b.final_check_for_requests(&mut p).unwrap());
        // no new event asked for: a second push does not notify
        let mut buf = [0u8; E];
        b.take_request(&p, &mut buf).unwrap();
        f.put_request(&mut p, &[0; E]).unwrap();
        assert!(!f.push_requests(&mut p));
    }

    #[test]
    fn entry_size_checked() {
        let mut p = page();
        let mut f = FrontRing::init(&mut p, 16);
        assert_eq!(f.put_request(&mut p, &[0; 17]), Err(Error::EntrySize));
        let mut b = BackRing::attach(&p, 16);
        let mut big = [0u8; 17];
        assert_eq!(b.take_request(&p, &mut big), Err(Error::EntrySize));
    }
}
