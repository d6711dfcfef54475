//! TX slot parsing: private copies of ring slots in, packets out.
//!
//! The parser sees each slot once, in ring order, as the backend takes it
//! off the ring, and keeps one pending response per slot until it is
//! answered. A packet is a chain of requests linked by `MORE_DATA`; a
//! request with `EXTRA_INFO` is followed by extra-info slots (chained by
//! their own `MORE` flag). The first request's `size` is the packet's
//! length; its own bytes are that minus the later requests' sizes.
//!
//! A packet found bad is answered `ERROR` on every request slot (`NULL` on
//! extra-info slots) as soon as it is known bad, so a hostile chain never
//! holds more than [`MAX_SLOTS_PER_PACKET`] unanswered slots of a good
//! packet. A good packet comes out as a [`Packet`]; the backend answers it
//! with [`TxParser::resolve`] once it has copied and switched it.
//!
//! An id is *in flight* from the slot that carries it being taken until its
//! response is written. A request reusing an in-flight id makes its packet
//! bad ([`Reason::IdInFlight`]); its response carries the id again (the
//! frontend broke the rule, so the frontend sorts out the two answers).

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use abi::netif::{
    status, ExtraInfo, TxRequest, TxResponse, EXTRA_INFO_SIZE, MAX_SLOTS_PER_PACKET, MIN_FRAME,
    PAGE_SIZE, TX_ENTRY_SIZE,
};

use crate::Reason;

/// `len` bytes at `offset` of the frontend's granted page `gref`; never
/// past the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    pub gref: u32,
    pub offset: u16,
    pub len: u16,
}

impl Seg {
    const EMPTY: Seg = Seg {
        gref: 0,
        offset: 0,
        len: 0,
    };
}

/// A packet's segments, in place: at most [`MAX_SLOTS_PER_PACKET`] (the
/// parser refuses a longer chain before it would add one more). The
/// parser keeps one and reuses it for every packet, so taking a packet off
/// the ring allocates (and clears) nothing.
#[derive(Debug)]
struct Segs {
    /// `s[..n]` are the segments; the rest is unused.
    n: u8,
    s: [Seg; MAX_SLOTS_PER_PACKET],
}

const _: () = assert!(MAX_SLOTS_PER_PACKET <= u8::MAX as usize);

impl Segs {
    const fn new() -> Segs {
        Segs {
            n: 0,
            s: [Seg::EMPTY; MAX_SLOTS_PER_PACKET],
        }
    }

    /// Adds `s`; false (nothing added) when full.
    fn push(&mut self, s: Seg) -> bool {
        let Some(slot) = self.s.get_mut(usize::from(self.n)) else {
            return false;
        };
        *slot = s;
        self.n += 1;
        true
    }

    fn clear(&mut self) {
        self.n = 0;
    }

    fn as_slice(&self) -> &[Seg] {
        &self.s[..usize::from(self.n)]
    }
}

/// A validated packet: its segments ([`TxParser::segs`], right after the
/// push that completed it) in order add up to `len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Sequence number of its first slot (see [`TxParser::resolve`]).
    pub first_seq: u64,
    /// Slots it took on the ring.
    pub slots: u32,
    pub len: usize,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    id: u16,
    /// `None` until decided.
    status: Option<i16>,
    /// This slot set the id's in-flight bit (clear it when answered).
    tracked: bool,
}

#[derive(Debug)]
struct Cur {
    first_seq: u64,
    slots: u32,
    /// Requests seen (extra-info slots not counted).
    reqs: usize,
    first: TxRequest,
    /// Sum of the later requests' sizes.
    rest: u32,
    bad: Option<Reason>,
    /// The next slot is an extra-info slot.
    expect_extra: bool,
    /// Another request follows (once the extra-info slots are done).
    more: bool,
}

/// One frontend's TX parser.
#[derive(Debug)]
pub struct TxParser {
    max_frame: usize,
    pending: VecDeque<Pending>,
    /// Sequence number of the next slot.
    next_seq: u64,
    in_flight: Vec<u64>,
    cur: Option<Cur>,
    /// The segments of the packet being read (while it is good): the first
    /// request's (its length set when the packet is complete), then the
    /// later requests'. Once a push returns a packet they are its
    /// segments, until the next push.
    segs: Segs,
}

impl TxParser {
    pub fn new(max_frame: usize) -> TxParser {
        TxParser {
            max_frame,
            pending: VecDeque::new(),
            next_seq: 0,
            in_flight: vec![0u64; 65536 / 64],
            cur: None,
            segs: Segs::new(),
        }
    }

    /// Slots taken and not yet answered.
    pub fn unanswered(&self) -> usize {
        self.pending.len()
    }

    /// Slots of the packet still being read (its chain not yet complete).
    pub fn partial_slots(&self) -> u32 {
        self.cur.as_ref().map_or(0, |c| c.slots)
    }

    pub fn id_in_flight(&self, id: u16) -> bool {
        self.in_flight[usize::from(id / 64)] & (1 << (id % 64)) != 0
    }

    fn set_in_flight(&mut self, id: u16, on: bool) {
        let w = &mut self.in_flight[usize::from(id / 64)];
        if on {
            *w |= 1 << (id % 64);
        } else {
            *w &= !(1 << (id % 64));
        }
    }

    fn front_seq(&self) -> u64 {
        self.next_seq - self.pending.len() as u64
    }

    /// Decide the slots `first_seq..first_seq + slots` not decided yet
    /// (those already answered are gone and left alone).
    pub fn resolve(&mut self, first_seq: u64, slots: u32, st: i16) {
        let front = self.front_seq();
        let end = first_seq
            .saturating_add(u64::from(slots))
            .min(self.next_seq);
        for seq in first_seq.max(front)..end {
            if let Some(p) = usize::try_from(seq - front)
                .ok()
                .and_then(|k| self.pending.get_mut(k))
            {
                p.status.get_or_insert(st);
            }
        }
    }

    /// Take one slot (the backend's private copy).
    pub fn push(&mut self, raw: &[u8; TX_ENTRY_SIZE]) -> Option<Result<Packet, Reason>> {
        let seq = self.next_seq;
        self.next_seq += 1;

        if let Some(c) = self.cur.as_mut().filter(|c| c.expect_extra) {
            let mut b = [0u8; EXTRA_INFO_SIZE];
            b.copy_from_slice(&raw[..EXTRA_INFO_SIZE]);
            let x = ExtraInfo::decode(&b);
            c.slots += 1;
            c.expect_extra = x.more();
            // Extra-info slots are answered NULL and carry no id of theirs.
            self.pending.push_back(Pending {
                id: 0,
                status: Some(status::NULL),
                tracked: false,
            });
            return self.maybe_finish();
        }

        let r = TxRequest::decode(raw);
        let dup = self.id_in_flight(r.id);
        if !dup {
            self.set_in_flight(r.id, true);
        }
        self.pending.push_back(Pending {
            id: r.id,
            status: None,
            tracked: !dup,
        });
        let max_frame = self.max_frame;
        let c = self.cur.get_or_insert(Cur {
            first_seq: seq,
            slots: 0,
            reqs: 0,
            first: r,
            rest: 0,
            bad: None,
            expect_extra: false,
            more: false,
        });
        c.slots += 1;
        c.reqs += 1;
        let mut bad = None;
        if dup {
            bad = Some(Reason::IdInFlight);
        }
        if c.reqs == 1 {
            // Its length is known once the chain is complete.
            self.segs.clear();
            self.segs.push(Seg {
                gref: r.gref,
                offset: r.offset,
                len: 0,
            });
            let size = usize::from(r.size);
            // The first slot's own bytes: all of `size` if it is the only
            // one, else what the later slots leave (checked at the end).
            let own = if r.more_data() { 0 } else { size };
            if usize::from(r.offset) + own > PAGE_SIZE {
                bad = bad.or(Some(Reason::SlotBounds));
            }
            if size < MIN_FRAME {
                bad = bad.or(Some(Reason::Runt));
            }
            if size > max_frame {
                bad = bad.or(Some(Reason::Oversize));
            }
            if r.flags & abi::netif::txf::CSUM_BLANK != 0 {
                bad = bad.or(Some(Reason::CsumBlank));
            }
        } else {
            if usize::from(r.offset) + usize::from(r.size) > PAGE_SIZE {
                bad = bad.or(Some(Reason::SlotBounds));
            }
            c.rest += u32::from(r.size);
            if c.rest > u32::from(c.first.size) {
                bad = bad.or(Some(Reason::SlotsExceedSize));
            }
            if c.reqs > MAX_SLOTS_PER_PACKET {
                bad = bad.or(Some(Reason::TooManySlots));
            }
            // A good packet has at most MAX_SLOTS_PER_PACKET requests
            // (checked just above), so this always fits.
            if c.bad.is_none() && bad.is_none() {
                self.segs.push(Seg {
                    gref: r.gref,
                    offset: r.offset,
                    len: r.size,
                });
            }
        }
        if r.extra_info() {
            bad = bad.or(Some(Reason::ExtraInfo));
            c.expect_extra = true;
        }
        c.more = r.more_data();
        if let Some(b) = bad {
            self.mark_bad(b);
        } else if let Some(c) = self.cur.as_ref().filter(|c| c.bad.is_some()) {
            // the packet is already refused: answer this slot now
            let (s, n) = (c.first_seq, c.slots);
            self.resolve(s, n, status::ERROR);
        }
        self.maybe_finish()
    }

    /// The current packet is bad (the first reason found is kept): answer
    /// what it has taken so far.
    fn mark_bad(&mut self, reason: Reason) {
        let Some(c) = self.cur.as_mut() else { return };
        c.bad.get_or_insert(reason);
        self.segs.clear();
        let (s, n) = (c.first_seq, c.slots);
        self.resolve(s, n, status::ERROR);
    }

    fn maybe_finish(&mut self) -> Option<Result<Packet, Reason>> {
        let c = self.cur.as_ref()?;
        if c.expect_extra || c.more {
            return None;
        }
        let c = self.cur.take()?;
        if let Some(b) = c.bad {
            return Some(Err(b));
        }
        // rest <= first.size was checked at every later request
        let own = u32::from(c.first.size) - c.rest;
        if usize::from(c.first.offset) + own as usize > PAGE_SIZE {
            // The later slots carry less than the size declared, and the
            // first slot's page cannot hold the difference.
            self.resolve(c.first_seq, c.slots, status::ERROR);
            return Some(Err(Reason::SlotsShortOfSize));
        }
        // A good packet's list starts with its first request's segment.
        self.segs.s[0].len = own as u16;
        Some(Ok(Packet {
            first_seq: c.first_seq,
            slots: c.slots,
            len: usize::from(c.first.size),
        }))
    }

    /// The segments of the packet the last [`TxParser::push`] returned (in
    /// order; the first is the first request's). Meaningless after a push
    /// that returned anything else.
    pub fn segs(&self) -> &[Seg] {
        self.segs.as_slice()
    }

    /// The connection ends: the packet being read is answered `ERROR`.
    pub fn abort(&mut self) {
        if let Some(c) = self.cur.take() {
            self.resolve(c.first_seq, c.slots, status::ERROR);
        }
    }

    /// Forget everything (a hostile connection whose ring is not answered).
    pub fn reset(&mut self) {
        self.pending.clear();
        self.cur = None;
        self.in_flight.iter_mut().for_each(|w| *w = 0);
    }

    /// Pop the decided responses at the front, in ring order.
    pub fn take_ready(&mut self) -> Option<TxResponse> {
        let p = *self.pending.front()?;
        let st = p.status?;
        self.pending.pop_front();
        if p.tracked {
            self.set_in_flight(p.id, false);
        }
        Some(TxResponse {
            id: p.id,
            status: st,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::netif::{extra_flags, txf, MAX_FRAME};

    fn req(gref: u32, offset: u16, flags: u16, id: u16, size: u16) -> [u8; TX_ENTRY_SIZE] {
        TxRequest {
            gref,
            offset,
            flags,
            id,
            size,
        }
        .encode()
    }

    fn extra(more: bool) -> [u8; TX_ENTRY_SIZE] {
        let mut b = [0u8; TX_ENTRY_SIZE];
        let x = ExtraInfo {
            ty: abi::netif::extra_type::GSO,
            flags: if more { extra_flags::MORE } else { 0 },
            data: [0; 6],
        };
        b[..EXTRA_INFO_SIZE].copy_from_slice(&x.encode());
        b
    }

    fn drain(p: &mut TxParser) -> Vec<TxResponse> {
        let mut v = Vec::new();
        while let Some(r) = p.take_ready() {
            v.push(r);
        }
        v
    }

    const M: u16 = txf::MORE_DATA;

    #[test]
    fn single_slot_packet() {
        let mut p = TxParser::new(MAX_FRAME);
        let pkt = p.push(&req(9, 100, 0, 1, 60)).unwrap().unwrap();
        assert_eq!(pkt.len, 60);
        assert_eq!(pkt.slots, 1);
        assert_eq!(
            p.segs(),
            [Seg {
                gref: 9,
                offset: 100,
                len: 60
            }]
        );
        assert!(p.id_in_flight(1));
        assert!(p.take_ready().is_none());
        p.resolve(pkt.first_seq, pkt.slots, status::OKAY);
        assert_eq!(drain(&mut p), [TxResponse { id: 1, status: 0 }]);
        assert!(!p.id_in_flight(1));
    }

    #[test]
    fn chain_sizes_add_up() {
        let mut p = TxParser::new(MAX_FRAME);
        assert!(p.push(&req(1, 4000, M, 1, 1000)).is_none());
        assert!(p.push(&req(2, 0, M, 2, 500)).is_none());
        assert_eq!(p.partial_slots(), 2);
        let pkt = p.push(&req(3, 10, 0, 3, 404)).unwrap().unwrap();
        assert_eq!(pkt.len, 1000);
        let lens: Vec<u16> = p.segs().iter().map(|s| s.len).collect();
        assert_eq!(lens, [96, 500, 404]);
        assert_eq!(pkt.slots, 3);
    }

    fn bad(chain: &[[u8; TX_ENTRY_SIZE]]) -> (Reason, Vec<TxResponse>) {
        let mut p = TxParser::new(MAX_FRAME);
        let mut out = None;
        for (i, e) in chain.iter().enumerate() {
            let r = p.push(e);
            if i + 1 < chain.len() {
                assert!(r.is_none(), "finished early at slot {i}");
            } else {
                out = r;
            }
        }
        let reason = out.expect("unfinished").expect_err("accepted");
        let rsp = drain(&mut p);
        assert_eq!(rsp.len(), chain.len(), "one response per slot");
        assert_eq!(p.unanswered(), 0);
        (reason, rsp)
    }

    #[test]
    fn bad_chains() {
        // later slots add up to more than declared
        let (r, rsp) = bad(&[req(1, 0, M, 1, 100), req(2, 0, 0, 2, 101)]);
        assert_eq!(r, Reason::SlotsExceedSize);
        assert!(rsp.iter().all(|r| r.status == status::ERROR));
        assert_eq!(rsp[1].id, 2);
        // ... to less than declared: the first page cannot hold the rest
        let (r, _) = bad(&[req(1, 3000, M, 1, 1500), req(2, 0, 0, 2, 100)]);
        assert_eq!(r, Reason::SlotsShortOfSize);
        // a later slot past its page
        let (r, _) = bad(&[req(1, 0, M, 1, 200), req(2, 4000, 0, 2, 100)]);
        assert_eq!(r, Reason::SlotBounds);
        // a single slot past its page: its offset, or its offset + size,
        // whatever its size (also when it is longer than max_frame)
        let (r, _) = bad(&[req(1, 5000, 0, 1, 60)]);
        assert_eq!(r, Reason::SlotBounds);
        let (r, _) = bad(&[req(1, 3000, 0, 1, 1200)]);
        assert_eq!(r, Reason::SlotBounds);
        let (r, _) = bad(&[req(1, 4000, 0, 1, 1515)]);
        assert_eq!(r, Reason::SlotBounds);
        let (r, _) = bad(&[req(1, 0, 0, 1, 5000)]);
        assert_eq!(r, Reason::SlotBounds);
        // runt, oversize, checksum offload
        assert_eq!(bad(&[req(1, 0, 0, 1, 13)]).0, Reason::Runt);
        assert_eq!(bad(&[req(1, 0, 0, 1, 1515)]).0, Reason::Oversize);
        assert_eq!(
            bad(&[req(1, 0, txf::CSUM_BLANK, 1, 60)]).0,
            Reason::CsumBlank
        );
        // an id twice in one packet
        let (r, rsp) = bad(&[req(1, 0, M, 7, 100), req(2, 0, 0, 7, 50)]);
        assert_eq!(r, Reason::IdInFlight);
        assert_eq!(rsp, [TxResponse { id: 7, status: -1 }; 2]);
    }

    #[test]
    fn too_many_slots_answered_as_they_come() {
        let mut p = TxParser::new(9000);
        let n = MAX_SLOTS_PER_PACKET + 5;
        let mut chain = Vec::new();
        chain.push(req(0, 0, M, 0, 8000));
        for i in 1..n {
            let f = if i + 1 < n { M } else { 0 };
            chain.push(req(i as u32, 0, f, i as u16, 100));
        }
        for (i, e) in chain.iter().enumerate() {
            let r = p.push(e);
            if i == MAX_SLOTS_PER_PACKET {
                // the 19th request: everything so far is answered
                assert_eq!(p.unanswered(), i + 1);
                assert_eq!(drain(&mut p).len(), i + 1);
            }
            if i + 1 == n {
                assert_eq!(r, Some(Err(Reason::TooManySlots)));
            }
        }
        assert_eq!(drain(&mut p).len(), n - MAX_SLOTS_PER_PACKET - 1);
        // exactly the limit is fine
        let mut p = TxParser::new(9000);
        p.push(&req(0, 0, M, 0, 17 * 100 + 60));
        for i in 1..MAX_SLOTS_PER_PACKET {
            let f = if i + 1 < MAX_SLOTS_PER_PACKET { M } else { 0 };
            let r = p.push(&req(i as u32, 0, f, i as u16, 100));
            if i + 1 == MAX_SLOTS_PER_PACKET {
                let pkt = r.unwrap().unwrap();
                assert_eq!(pkt.len, 17 * 100 + 60);
                assert_eq!(p.segs().len(), MAX_SLOTS_PER_PACKET);
                assert_eq!(p.segs()[0].len, 60);
            }
        }
    }

    #[test]
    fn extra_info_slots_answered_null() {
        let (r, rsp) = bad(&[
            req(1, 0, txf::EXTRA_INFO | M, 1, 200),
            extra(true),
            extra(false),
            req(2, 0, 0, 2, 100),
        ]);
        assert_eq!(r, Reason::ExtraInfo);
        let st: Vec<i16> = rsp.iter().map(|r| r.status).collect();
        assert_eq!(
            st,
            [status::ERROR, status::NULL, status::NULL, status::ERROR]
        );
        // extra info on the last request: one extra slot ends the packet
        let (r, rsp) = bad(&[req(1, 0, txf::EXTRA_INFO, 1, 60), extra(false)]);
        assert_eq!(r, Reason::ExtraInfo);
        assert_eq!(rsp[1].status, status::NULL);
    }

    #[test]
    fn id_in_flight_across_packets() {
        let mut p = TxParser::new(MAX_FRAME);
        let a = p.push(&req(1, 0, 0, 5, 60)).unwrap().unwrap();
        // the same id while the first packet is unanswered
        assert_eq!(p.push(&req(1, 0, 0, 5, 60)), Some(Err(Reason::IdInFlight)));
        assert!(p.take_ready().is_none(), "answers stay in ring order");
        p.resolve(a.first_seq, a.slots, status::OKAY);
        assert_eq!(
            drain(&mut p),
            [
                TxResponse { id: 5, status: 0 },
                TxResponse { id: 5, status: -1 }
            ]
        );
        assert!(!p.id_in_flight(5));
        // answered: the id may be used again
        assert!(p.push(&req(1, 0, 0, 5, 60)).unwrap().is_ok());
    }

    #[test]
    fn abort_answers_the_partial_packet() {
        let mut p = TxParser::new(MAX_FRAME);
        assert!(p.push(&req(1, 0, M, 1, 100)).is_none());
        assert!(p.take_ready().is_none());
        p.abort();
        assert_eq!(drain(&mut p), [TxResponse { id: 1, status: -1 }]);
    }
}
