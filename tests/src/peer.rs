//! The test peer of a scenario with `[test.peer]`: the other end of the
//! guest's virtio-net, on 127.0.0.1.
//!
//! QEMU's `-netdev dgram` carries each Ethernet frame as one UDP datagram
//! between its local address and ours ([`Ports`]). The peer checks every
//! frame from the guest against `driver_domains::netframe` (a request of
//! the scenario's size, a sequence number below `frames` and not seen
//! before, the payload the number calls for) and answers each good one with
//! its reply. What it counts ([`PeerReport`]) is judged by [`failures`]:
//! exactly `frames` good requests, as many replies sent, nothing bad.
//!
//! [`Peer`] is the pure part (a datagram in, maybe a reply out); [`start`]
//! runs it on a socket in a thread that ends by itself: when told to
//! ([`Running::finish`], after QEMU exits), at its time limit, after
//! [`MAX_EXTRA`] datagrams more than expected, or once every frame was
//! answered and [`QUIET`] passed without another.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use driver_domains::netframe::{self, FrameError, PEER_MAC};

/// `[test.peer]`: how many frames of what size the guest sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub frames: u32,
    /// Bytes per frame, Ethernet header included.
    pub size: usize,
}

/// Most frames a scenario may ask for.
pub const MAX_FRAMES: u32 = netframe::MAX_FRAMES;
/// Datagrams beyond `frames` the peer still reads (each one bad) before it
/// stops reading.
pub const MAX_EXTRA: u32 = 64;
/// How long the peer waits after the last expected frame for stray ones.
pub const QUIET: Duration = Duration::from_secs(2);

impl PeerSpec {
    /// The spec's own errors (the manifest checker reports them with a line).
    pub fn check(&self) -> Result<(), String> {
        if !(1..=MAX_FRAMES).contains(&self.frames) {
            return Err(format!(
                "frames = {} is outside 1..={MAX_FRAMES}",
                self.frames
            ));
        }
        if !(netframe::MIN_LEN..=netframe::MAX_LEN).contains(&self.size) {
            return Err(format!(
                "size = {} is outside {}..={} (bytes of an Ethernet frame without FCS)",
                self.size,
                netframe::MIN_LEN,
                netframe::MAX_LEN
            ));
        }
        Ok(())
    }
}

/// What the peer saw and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerReport {
    /// Good requests (each answered unless sending failed).
    pub received: u32,
    /// Replies sent.
    pub sent: u32,
    /// Datagrams from QEMU that were not a good, new request.
    pub bad: u32,
    /// Datagrams from anyone but QEMU (not read as frames).
    pub foreign: u32,
    /// What was wrong with the first bad one.
    pub first_bad: Option<String>,
    /// A socket error that stopped the peer early.
    pub error: Option<String>,
    pub elapsed: Duration,
}

impl PeerReport {
    /// One line for the scenario's result.
    pub fn summary(&self) -> String {
        format!(
            "peer: {} received, {} sent, {} bad in {:.1} s",
            self.received,
            self.sent,
            self.bad,
            self.elapsed.as_secs_f64()
        )
    }
}

/// The rules a peer's counts must meet; one line per broken rule.
pub fn failures(spec: &PeerSpec, r: &PeerReport) -> Vec<String> {
    let mut f = Vec::new();
    if r.received != spec.frames {
        f.push(format!(
            "peer: received {} good frames of {} bytes, expected {}",
            r.received, spec.size, spec.frames
        ));
    }
    if r.sent != r.received || r.sent != spec.frames {
        f.push(format!(
            "peer: sent {} replies, expected {}",
            r.sent, spec.frames
        ));
    }
    if r.bad > 0 {
        f.push(format!(
            "peer: {} bad frames (the first: {})",
            r.bad,
            r.first_bad.as_deref().unwrap_or("?")
        ));
    }
    if let Some(e) = &r.error {
        f.push(format!("peer: {e}"));
    }
    f
}

/// The peer's state: pure, fed one datagram at a time.
#[derive(Clone, Debug)]
pub struct Peer {
    spec: PeerSpec,
    seen: Vec<bool>,
    report: PeerReport,
    reply: Vec<u8>,
}

impl Peer {
    pub fn new(spec: PeerSpec) -> Self {
        Peer {
            spec,
            seen: vec![false; spec.frames as usize],
            report: PeerReport::default(),
            reply: vec![0; netframe::MAX_LEN],
        }
    }

    fn bad(&mut self, why: String) {
        self.report.bad += 1;
        if self.report.first_bad.is_none() {
            self.report.first_bad = Some(why);
        }
    }

    fn judge(&mut self, frame: &[u8]) -> Result<usize, String> {
        let show = |e: FrameError| format!("datagram of {} bytes: {e}", frame.len());
        let h = netframe::answer(frame, PEER_MAC, &mut self.reply).map_err(show)?;
        if h.len != self.spec.size {
            return Err(format!(
                "frame {} has {} bytes, expected {}",
                h.seq, h.len, self.spec.size
            ));
        }
        match self.seen.get_mut(h.seq as usize) {
            None => Err(format!(
                "frame {} is beyond the {} expected",
                h.seq, self.spec.frames
            )),
            Some(true) => Err(format!("frame {} came twice", h.seq)),
            Some(seen) => {
                *seen = true;
                Ok(h.len)
            }
        }
    }

    /// Judges one datagram from QEMU; a good request gives the reply to
    /// send (then call [`Peer::sent`] once it is sent).
    pub fn take(&mut self, frame: &[u8]) -> Option<&[u8]> {
        match self.judge(frame) {
            Ok(len) => {
                self.report.received += 1;
                Some(&self.reply[..len])
            }
            Err(why) => {
                self.bad(why);
                None
            }
        }
    }

    /// A reply went out.
    pub fn sent(&mut self) {
        self.report.sent += 1;
    }

    /// A datagram from someone else.
    pub fn foreign(&mut self) {
        self.report.foreign += 1;
    }

    /// Every expected frame came.
    pub fn complete(&self) -> bool {
        self.report.received == self.spec.frames
    }

    /// Whether it may read another datagram.
    pub fn may_read(&self) -> bool {
        self.report.received + self.report.bad < self.spec.frames + MAX_EXTRA
    }

    pub fn report(&self) -> &PeerReport {
        &self.report
    }
}

/// The two UDP ports on 127.0.0.1: the peer's, and the one QEMU binds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub peer: u16,
    pub qemu: u16,
}

impl Ports {
    pub fn qemu_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.qemu))
    }
}

/// A peer running in its thread.
pub struct Running {
    pub ports: Ports,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<PeerReport>,
}

/// Binds the peer's socket on 127.0.0.1 (a free port), picks a free port
/// for QEMU, and starts answering; the thread stops by itself after
/// `limit` at the latest.
pub fn start(spec: PeerSpec, limit: Duration) -> io::Result<Running> {
    spec.check()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    // A port nobody holds right now, for QEMU to bind a moment later.
    let qemu = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let ports = Ports {
        peer: socket.local_addr()?.port(),
        qemu,
    };
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let thread = thread::Builder::new()
        .name("net-peer".into())
        .spawn(move || serve(socket, ports.qemu_addr(), spec, limit, &flag))?;
    Ok(Running {
        ports,
        stop,
        thread,
    })
}

impl Running {
    /// Tells the peer to stop (once what is queued is read) and returns
    /// its report.
    pub fn finish(self) -> PeerReport {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or_else(|_| PeerReport {
            error: Some("the peer thread panicked".into()),
            ..PeerReport::default()
        })
    }
}

fn serve(
    socket: UdpSocket,
    qemu: SocketAddr,
    spec: PeerSpec,
    limit: Duration,
    stop: &AtomicBool,
) -> PeerReport {
    let start = Instant::now();
    let mut peer = Peer::new(spec);
    let mut buf = vec![0u8; 65536];
    let mut last = start;
    let mut error = None;
    let mut stopping = false;
    while peer.may_read() && start.elapsed() < limit {
        if peer.complete() && last.elapsed() >= QUIET {
            break;
        }
        // Told to stop: read what is already queued, then end.
        if !stopping && stop.load(Ordering::Acquire) {
            stopping = true;
            if socket.set_nonblocking(true).is_err() {
                break;
            }
        }
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if stopping {
                    break;
                }
                continue;
            }
            // An ICMP "port unreachable" from QEMU's port before it bound
            // it comes back as a refused receive: not fatal.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => {
                error = Some(format!("receiving: {e}"));
                break;
            }
        };
        if from != qemu {
            peer.foreign();
            continue;
        }
        last = Instant::now();
        if let Some(reply) = peer.take(&buf[..n]) {
            match socket.send_to(reply, qemu) {
                Ok(_) => peer.sent(),
                Err(e) => {
                    error = Some(format!("sending a reply: {e}"));
                    break;
                }
            }
        }
    }
    let mut report = peer.report().clone();
    report.error = report.error.or(error);
    report.elapsed = start.elapsed();
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use driver_domains::netframe::{build, verify, Kind, Mac};

    const GUEST: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const SPEC: PeerSpec = PeerSpec {
        frames: 3,
        size: 100,
    };

    fn request(seq: u32, len: usize) -> Vec<u8> {
        let mut f = vec![0; len];
        build(&mut f, Kind::Request, PEER_MAC, GUEST, seq).unwrap();
        f
    }

    #[test]
    fn good_requests_are_answered_and_counted() {
        let mut p = Peer::new(SPEC);
        for seq in [2, 0, 1] {
            let reply = p.take(&request(seq, 100)).unwrap().to_vec();
            let h = verify(&reply, Kind::Reply).unwrap();
            assert_eq!((h.seq, h.dst, h.src), (seq, GUEST, PEER_MAC));
            p.sent();
        }
        assert!(p.complete());
        let r = p.report().clone();
        assert_eq!((r.received, r.sent, r.bad), (3, 3, 0));
        assert!(failures(&SPEC, &r).is_empty());
        assert!(r.summary().starts_with("peer: 3 received, 3 sent, 0 bad"));
    }

    #[test]
    fn bad_frames_are_counted_and_the_first_is_named() {
        let mut p = Peer::new(SPEC);
        let mut damaged = request(0, 100);
        damaged[50] ^= 0x40;
        assert!(p.take(&damaged).is_none());
        assert!(p.take(&request(1, 200)).is_none());
        assert!(p.take(&request(3, 100)).is_none());
        assert!(p.take(&request(1, 100)).is_some());
        p.sent();
        assert!(p.take(&request(1, 100)).is_none());
        assert!(p.take(&[0u8; 64]).is_none());
        p.foreign();
        let r = p.report().clone();
        assert_eq!((r.received, r.sent, r.bad, r.foreign), (1, 1, 5, 1));
        assert!(
            r.first_bad.as_deref().unwrap().contains("byte 50 is"),
            "{:?}",
            r.first_bad
        );
        let f = failures(&SPEC, &r);
        assert_eq!(f.len(), 3, "{f:?}");
        assert!(f[0].contains("received 1 good frames of 100 bytes, expected 3"));
        assert!(f[1].contains("sent 1 replies, expected 3"));
        assert!(f[2].contains("5 bad frames (the first: datagram of 100 bytes: byte 50"));
    }

    #[test]
    fn replies_never_answered_are_a_failure() {
        let r = PeerReport {
            received: 3,
            sent: 2,
            ..PeerReport::default()
        };
        assert_eq!(failures(&SPEC, &r), ["peer: sent 2 replies, expected 3"]);
    }

    #[test]
    fn reading_is_bounded() {
        let mut p = Peer::new(SPEC);
        let mut n = 0;
        while p.may_read() {
            p.take(&[0u8; 10]);
            n += 1;
        }
        assert_eq!(n, SPEC.frames + MAX_EXTRA);
    }

    #[test]
    fn specs_are_checked() {
        assert!(SPEC.check().is_ok());
        assert!(PeerSpec {
            frames: 0,
            size: 100
        }
        .check()
        .is_err());
        assert!(PeerSpec {
            frames: 1,
            size: 59
        }
        .check()
        .unwrap_err()
        .contains("outside 60..=1514"));
        assert!(PeerSpec {
            frames: 1,
            size: 1515
        }
        .check()
        .is_err());
    }

    /// The socket loop against a stand-in for QEMU on 127.0.0.1.
    #[test]
    fn the_socket_peer_answers_a_local_sender() {
        let spec = PeerSpec {
            frames: 4,
            size: 64,
        };
        let running = start(spec, Duration::from_secs(20)).unwrap();
        let qemu = UdpSocket::bind(running.ports.qemu_addr()).unwrap();
        qemu.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, running.ports.peer));
        // Someone else writing to the peer is ignored.
        let other = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        other.send_to(&request(0, 64), peer).unwrap();
        let mut buf = [0u8; 2048];
        for seq in 0..4 {
            qemu.send_to(&request(seq, 64), peer).unwrap();
            let (n, from) = qemu.recv_from(&mut buf).unwrap();
            assert_eq!(from, peer);
            assert_eq!(verify(&buf[..n], Kind::Reply).unwrap().seq, seq);
        }
        qemu.send_to(&request(9, 64), peer).unwrap();
        // The stray datagram is read before the peer stops.
        thread::sleep(Duration::from_millis(100));
        let r = running.finish();
        assert_eq!(
            (r.received, r.sent, r.bad, r.foreign),
            (4, 4, 1, 1),
            "{r:?}"
        );
        assert!(r.error.is_none(), "{r:?}");
    }

    #[test]
    fn a_peer_nobody_talks_to_stops_at_its_limit() {
        let running = start(SPEC, Duration::from_millis(300)).unwrap();
        let t = Instant::now();
        thread::sleep(Duration::from_millis(400));
        let r = running.finish();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(r.received, 0);
        assert_eq!(failures(&SPEC, &r).len(), 2);
    }
}
