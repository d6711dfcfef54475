//! The net driver domain's plan and bookkeeping; pure, tested on the host.
//!
//! `frames=64 size=600 window=8`: send `frames` requests of `size` bytes
//! ([`crate::netframe`]) to the test peer, at most `window` of them not yet
//! answered at any time, and check that each comes back as its reply,
//! exactly once. [`Exchange`] numbers the requests and judges the replies.

use core::fmt;

use libdom::args::ArgError;
use libdom::Args;

use crate::netframe::{self, FrameError, Kind, Mac, ShowMac, PEER_MAC};

/// The keys the domain takes.
pub const KEYS: &[&str] = &["frames", "size", "window"];
/// Requests not yet answered, unless `window` says otherwise.
pub const DEFAULT_WINDOW: u32 = 8;
/// Most requests in flight: each needs a receive buffer posted for its
/// reply, and the driver posts [`MAX_WINDOW`] of them.
pub const MAX_WINDOW: u32 = 16;

/// What the domain does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub frames: u32,
    pub size: usize,
    pub window: u32,
}

/// Why the args were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanError<'a> {
    Args(ArgError<'a>),
    Frames(u64),
    Size(u64),
    Window(u64),
}

impl fmt::Display for PlanError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PlanError::Args(e) => write!(f, "{e}"),
            PlanError::Frames(n) => {
                write!(f, "frames={n}: expected 1..={}", netframe::MAX_FRAMES)
            }
            PlanError::Size(n) => write!(
                f,
                "size={n}: expected {}..={}",
                netframe::MIN_LEN,
                netframe::MAX_LEN
            ),
            PlanError::Window(n) => write!(f, "window={n}: expected 1..={MAX_WINDOW}"),
        }
    }
}

impl Plan {
    pub fn parse(s: &str) -> Result<Plan, PlanError<'_>> {
        let args = Args::parse(s).map_err(PlanError::Args)?;
        args.only(KEYS).map_err(PlanError::Args)?;
        let frames = args.u64("frames").map_err(PlanError::Args)?;
        let size = args.u64("size").map_err(PlanError::Args)?;
        let window = args
            .u64_or("window", DEFAULT_WINDOW.into())
            .map_err(PlanError::Args)?;
        if !(1..=u64::from(netframe::MAX_FRAMES)).contains(&frames) {
            return Err(PlanError::Frames(frames));
        }
        if !(netframe::MIN_LEN as u64..=netframe::MAX_LEN as u64).contains(&size) {
            return Err(PlanError::Size(size));
        }
        if !(1..=u64::from(MAX_WINDOW)).contains(&window) {
            return Err(PlanError::Window(window));
        }
        Ok(Plan {
            frames: frames as u32,
            size: size as usize,
            window: window as u32,
        })
    }

    /// Bytes of all the requests (and of all the replies).
    pub fn bytes(&self) -> u64 {
        u64::from(self.frames) * self.size as u64
    }
}

/// Why a received frame is not the reply it should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyError {
    Frame(FrameError),
    /// Addressed to someone else.
    NotForMe(Mac),
    NotFromPeer(Mac),
    WrongSize(usize),
    /// A reply to a request not sent (yet).
    NeverSent(u32),
    Twice(u32),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ReplyError::Frame(e) => write!(f, "{e}"),
            ReplyError::NotForMe(m) => write!(f, "addressed to {}", ShowMac(m)),
            ReplyError::NotFromPeer(m) => write!(f, "from {}, not the peer", ShowMac(m)),
            ReplyError::WrongSize(n) => write!(f, "{n} bytes"),
            ReplyError::NeverSent(s) => write!(f, "a reply to {s}, which was not sent"),
            ReplyError::Twice(s) => write!(f, "a second reply to {s}"),
        }
    }
}

/// Words of the answered-set bitmap.
const WORDS: usize = netframe::MAX_FRAMES as usize / 64;

/// The requests sent and the replies that came.
#[derive(Clone, Debug)]
pub struct Exchange {
    plan: Plan,
    mac: Mac,
    /// The next sequence number to send (= requests sent).
    next: u32,
    answered: [u64; WORDS],
    good: u32,
    bad: u32,
    first_bad: Option<(u32, ReplyError)>,
}

impl Exchange {
    /// For a driver whose own address is `mac`.
    pub fn new(plan: Plan, mac: Mac) -> Self {
        Exchange {
            plan,
            mac,
            next: 0,
            answered: [0; WORDS],
            good: 0,
            bad: 0,
            first_bad: None,
        }
    }

    /// Whether another request may go out now.
    pub fn may_send(&self) -> bool {
        self.next < self.plan.frames
            && self.next.saturating_sub(self.good + self.bad) < self.plan.window
    }

    /// Builds the next request into `buf[..size]`; returns its number.
    /// Call only when [`Exchange::may_send`].
    pub fn next_request(&mut self, buf: &mut [u8]) -> Result<u32, FrameError> {
        let frame = buf
            .get_mut(..self.plan.size)
            .ok_or(FrameError::BadSize(self.plan.size))?;
        let seq = self.next;
        netframe::build(frame, Kind::Request, PEER_MAC, self.mac, seq)?;
        self.next += 1;
        Ok(seq)
    }

    fn judge(&mut self, frame: &[u8]) -> Result<u32, ReplyError> {
        let h = netframe::verify(frame, Kind::Reply).map_err(ReplyError::Frame)?;
        if h.dst != self.mac {
            return Err(ReplyError::NotForMe(h.dst));
        }
        if h.src != PEER_MAC {
            return Err(ReplyError::NotFromPeer(h.src));
        }
        if h.len != self.plan.size {
            return Err(ReplyError::WrongSize(h.len));
        }
        if h.seq >= self.next {
            return Err(ReplyError::NeverSent(h.seq));
        }
        let (w, bit) = (h.seq as usize / 64, 1u64 << (h.seq % 64));
        if self.answered[w] & bit != 0 {
            return Err(ReplyError::Twice(h.seq));
        }
        self.answered[w] |= bit;
        Ok(h.seq)
    }

    /// Judges one received frame.
    pub fn on_frame(&mut self, frame: &[u8]) -> Result<u32, ReplyError> {
        let r = self.judge(frame);
        match r {
            Ok(_) => self.good += 1,
            Err(e) => {
                self.bad += 1;
                if self.first_bad.is_none() {
                    self.first_bad = Some((self.good + self.bad, e));
                }
            }
        }
        r
    }

    /// Every request went out and as many frames came back.
    pub fn finished(&self) -> bool {
        self.next == self.plan.frames && self.good + self.bad >= self.plan.frames
    }

    /// Every request was answered, once, correctly, and nothing else came.
    pub fn all_good(&self) -> bool {
        self.good == self.plan.frames && self.bad == 0
    }

    pub fn plan(&self) -> Plan {
        self.plan
    }

    pub fn sent(&self) -> u32 {
        self.next
    }

    pub fn good(&self) -> u32 {
        self.good
    }

    pub fn bad(&self) -> u32 {
        self.bad
    }

    /// The first bad frame: its place among those received (from 1) and
    /// what was wrong.
    pub fn first_bad(&self) -> Option<(u32, ReplyError)> {
        self.first_bad
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    const ME: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    #[test]
    fn the_scenario_args() {
        assert_eq!(
            Plan::parse("frames=64 size=600").unwrap(),
            Plan {
                frames: 64,
                size: 600,
                window: DEFAULT_WINDOW
            }
        );
        let p = Plan::parse("size=60 frames=4096 window=16").unwrap();
        assert_eq!(
            (p.frames, p.size, p.window, p.bytes()),
            (4096, 60, 16, 4096 * 60)
        );
    }

    #[test]
    fn refusals() {
        let e = |s| Plan::parse(s).unwrap_err();
        assert_eq!(e("frames=0 size=600"), PlanError::Frames(0));
        assert_eq!(e("frames=4097 size=600"), PlanError::Frames(4097));
        assert_eq!(e("frames=1 size=59"), PlanError::Size(59));
        assert_eq!(e("frames=1 size=1515"), PlanError::Size(1515));
        assert_eq!(e("frames=1 size=60 window=17"), PlanError::Window(17));
        assert_eq!(
            e("frames=1"),
            PlanError::Args(ArgError::Missing { key: "size" })
        );
        assert_eq!(
            e("frames=1 size=60 mtu=9000"),
            PlanError::Args(ArgError::Unknown { key: "mtu" })
        );
        assert_eq!(
            e("frames=1 size=1515").to_string(),
            "size=1515: expected 60..=1514"
        );
    }

    fn reply_to(req: &[u8]) -> std::vec::Vec<u8> {
        let mut out = vec![0u8; req.len()];
        netframe::answer(req, PEER_MAC, &mut out).unwrap();
        out
    }

    #[test]
    fn a_window_of_requests_and_their_replies() {
        let plan = Plan::parse("frames=5 size=100 window=2").unwrap();
        let mut x = Exchange::new(plan, ME);
        let mut buf = [0u8; 1600];
        let mut out = vec![];
        while x.may_send() {
            let seq = x.next_request(&mut buf).unwrap();
            out.push((seq, buf[..100].to_vec()));
        }
        assert_eq!(out.len(), 2);
        // Replies may come in any order.
        assert_eq!(x.on_frame(&reply_to(&out[1].1)), Ok(1));
        assert!(x.may_send());
        assert_eq!(x.on_frame(&reply_to(&out[0].1)), Ok(0));
        while !x.finished() {
            while x.may_send() {
                let seq = x.next_request(&mut buf).unwrap();
                assert_eq!(x.on_frame(&reply_to(&buf[..100])), Ok(seq));
            }
        }
        assert!(x.all_good());
        assert_eq!((x.sent(), x.good(), x.bad()), (5, 5, 0));
        assert!(!x.may_send());
    }

    #[test]
    fn bad_replies_are_counted_and_named() {
        let plan = Plan::parse("frames=3 size=100 window=3").unwrap();
        let mut x = Exchange::new(plan, ME);
        let mut buf = [0u8; 100];
        x.next_request(&mut buf).unwrap();
        let req0 = buf;
        // The request itself echoed back is not a reply.
        assert_eq!(
            x.on_frame(&req0),
            Err(ReplyError::Frame(FrameError::WrongKind(Kind::Request)))
        );
        let good = reply_to(&req0);
        let mut damaged = good.clone();
        damaged[99] ^= 1;
        assert!(matches!(
            x.on_frame(&damaged),
            Err(ReplyError::Frame(FrameError::BadPayload { offset: 99, .. }))
        ));
        assert_eq!(x.on_frame(&good), Ok(0));
        assert_eq!(x.on_frame(&good), Err(ReplyError::Twice(0)));
        // To another address, from another sender, another size, ahead.
        let mut other = [0u8; 100];
        netframe::build(&mut other, Kind::Reply, [2; 6], PEER_MAC, 0).unwrap();
        assert_eq!(x.on_frame(&other), Err(ReplyError::NotForMe([2; 6])));
        netframe::build(&mut other, Kind::Reply, ME, [4; 6], 0).unwrap();
        assert_eq!(x.on_frame(&other), Err(ReplyError::NotFromPeer([4; 6])));
        let mut short = [0u8; 80];
        netframe::build(&mut short, Kind::Reply, ME, PEER_MAC, 0).unwrap();
        assert_eq!(x.on_frame(&short), Err(ReplyError::WrongSize(80)));
        netframe::build(&mut other, Kind::Reply, ME, PEER_MAC, 1).unwrap();
        assert_eq!(x.on_frame(&other), Err(ReplyError::NeverSent(1)));
        assert_eq!((x.good(), x.bad()), (1, 7));
        assert_eq!(
            x.first_bad(),
            Some((1, ReplyError::Frame(FrameError::WrongKind(Kind::Request))))
        );
        assert!(!x.all_good());
        assert!(ReplyError::Twice(4)
            .to_string()
            .contains("second reply to 4"));
    }
}
