//! The TCP host peer of a scenario with `[test.tcp]`: a program on the host
//! that talks TCP to a guest through QEMU's user network.
//!
//! The guest's virtio-net (or the net driver domain's, with the guest behind
//! netback) has `netdev = "user"` with a `hostfwd` rule: QEMU listens on
//! 127.0.0.1 at a port the harness picked ([`free_port`]) and forwards each
//! connection to the guest's address in slirp's network (10.0.2.0/24, the
//! gateway 10.0.2.2). The peer connects there and, at once in both
//! directions,
//!
//! - sends `send` bytes of stream `send_pattern`
//!   (`driver_domains::stream_pattern`), then closes its sending half;
//! - receives until the guest closes, checking every byte against stream
//!   `recv_pattern` (for a guest that echoes, the same as `send_pattern`)
//!   and the CRC-32 of the whole against the pattern's.
//!
//! [`failures`] judges the counts: exactly `send` bytes sent, exactly
//! `recv` bytes received, every one as the pattern says. The guest's own
//! `stream` events say what it saw; the scenario checks their `crc32`.
//!
//! Before the guest listens, slirp accepts the host's connection and then
//! drops it (the guest answers its SYN with a reset): the peer sees the
//! connection end with nothing received. Such an attempt is tried again,
//! up to [`MAX_ATTEMPTS`] times, [`RETRY`] apart; a connection that ends
//! after the guest sent something is never retried.
//!
//! [`Receiver`] and [`Sender`] are the pure parts; [`start`] runs them on a
//! socket in a thread that stops by itself: when told to
//! ([`Running::finish`], after QEMU exits), at its time limit, or when the
//! exchange is over. Everything stays on 127.0.0.1.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use driver_domains::stream_pattern;

/// Most bytes one direction may carry.
pub const MAX_BYTES: u64 = 1 << 30;
/// Connection attempts before the peer gives up on the guest listening.
pub const MAX_ATTEMPTS: u32 = 600;
/// Pause between attempts.
pub const RETRY: Duration = Duration::from_millis(100);
/// Bytes per write.
const CHUNK: usize = 64 * 1024;
/// How long one blocking read or write may take before the loop looks at
/// the stop flag and the time limit again.
const POLL: Duration = Duration::from_millis(100);

/// slirp's network: the guest's addresses are in 10.0.2.0/24.
pub const SLIRP_NET: [u8; 3] = [10, 0, 2];
/// slirp's gateway and DNS addresses, which a guest cannot have.
pub const SLIRP_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const SLIRP_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

/// A `hostfwd` rule of a `user` netdev: TCP connections to a host port on
/// 127.0.0.1 go to `guest` (an address and port in slirp's network).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    pub guest: SocketAddrV4,
}

impl Forward {
    /// `"10.0.2.15:5001"`: a guest address in 10.0.2.0/24 (not the network,
    /// broadcast, gateway or DNS address) and a port 1..=65535.
    pub fn parse(s: &str) -> Result<Forward, String> {
        let guest: SocketAddrV4 = s.parse().map_err(|_| {
            format!("\"{s}\" is not an IPv4 address and port (e.g. \"10.0.2.15:5001\")")
        })?;
        let ip = *guest.ip();
        let o = ip.octets();
        if o[..3] != SLIRP_NET {
            return Err(format!(
                "{ip} is outside QEMU's user network 10.0.2.0/24, where the guest must be"
            ));
        }
        if o[3] == 0 || o[3] == 255 || ip == SLIRP_GATEWAY || ip == SLIRP_DNS {
            return Err(format!(
                "{ip} is the user network's own address (network, broadcast, gateway 10.0.2.2 or DNS 10.0.2.3)"
            ));
        }
        if guest.port() == 0 {
            return Err("port 0".into());
        }
        Ok(Forward { guest })
    }

    /// QEMU's `hostfwd=` value for host port `host_port` on 127.0.0.1.
    pub fn qemu_option(&self, host_port: u16) -> String {
        format!(
            "tcp:127.0.0.1:{host_port}-{}:{}",
            self.guest.ip(),
            self.guest.port()
        )
    }
}

/// `[test.tcp]`: what the peer moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSpec {
    /// The `hostfwd` rule it connects through.
    pub connect: Forward,
    /// Bytes the peer sends, of stream `send_pattern`.
    pub send: u64,
    pub send_pattern: String,
    /// Bytes the guest must send back, of stream `recv_pattern`.
    pub recv: u64,
    pub recv_pattern: String,
}

impl TcpSpec {
    /// The spec's own errors (the manifest checker reports them with a line).
    pub fn check(&self) -> Result<(), String> {
        for (what, n) in [("send", self.send), ("recv", self.recv)] {
            if n > MAX_BYTES {
                return Err(format!("{what} = {n} is more than {MAX_BYTES} bytes"));
            }
        }
        if self.send == 0 && self.recv == 0 {
            return Err("send and recv are both 0: nothing to move".into());
        }
        for (what, p) in [
            ("send_pattern", &self.send_pattern),
            ("recv_pattern", &self.recv_pattern),
        ] {
            if !stream_pattern::valid_name(p) {
                return Err(format!("{what} = \"{p}\": expected 1-8 of A-Z a-z 0-9 _ -"));
            }
        }
        Ok(())
    }
}

/// What the peer saw and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpReport {
    /// Bytes the socket took, and their CRC-32.
    pub sent: u64,
    pub sent_crc: u32,
    /// Bytes received, and their CRC-32.
    pub received: u64,
    pub received_crc: u32,
    /// The stream offset of the first received byte that differs from the
    /// pattern.
    pub first_bad: Option<u64>,
    /// Connections made (the last one carried the exchange).
    pub attempts: u32,
    /// An error that ended the exchange early.
    pub error: Option<String>,
    /// From the connection that carried the exchange to the last byte each
    /// way.
    pub send_time: Duration,
    pub recv_time: Duration,
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

impl TcpReport {
    /// One line for the scenario's result.
    pub fn summary(&self) -> String {
        format!(
            "tcp peer: sent {} B (crc32 {:#010x}) in {:.1} s ({:.2} MiB/s), received {} B \
             (crc32 {:#010x}) in {:.1} s ({:.2} MiB/s), {} connection(s)",
            self.sent,
            self.sent_crc,
            self.send_time.as_secs_f64(),
            mib_s(self.sent, self.send_time),
            self.received,
            self.received_crc,
            self.recv_time.as_secs_f64(),
            mib_s(self.received, self.recv_time),
            self.attempts
        )
    }
}

/// The rules the peer's counts must meet; one line per broken rule.
pub fn failures(spec: &TcpSpec, r: &TcpReport) -> Vec<String> {
    let mut f = Vec::new();
    if r.sent != spec.send {
        f.push(format!(
            "tcp peer: sent {} bytes, expected {}",
            r.sent, spec.send
        ));
    }
    if r.received != spec.recv {
        f.push(format!(
            "tcp peer: received {} bytes, expected {}",
            r.received, spec.recv
        ));
    }
    if let Some(at) = r.first_bad {
        f.push(format!(
            "tcp peer: received byte {at} differs from stream {}",
            spec.recv_pattern
        ));
    }
    let seed = stream_pattern::seed(&spec.recv_pattern);
    if r.received == spec.recv && r.received_crc != stream_pattern::crc32(seed, spec.recv) {
        f.push(format!(
            "tcp peer: the received bytes' crc32 {:#010x} is not stream {}'s {:#010x}",
            r.received_crc,
            spec.recv_pattern,
            stream_pattern::crc32(seed, spec.recv)
        ));
    }
    if let Some(e) = &r.error {
        f.push(format!("tcp peer: {e}"));
    }
    f
}

/// The receiving half: bytes in, checked against the pattern as they come.
#[derive(Clone, Debug)]
pub struct Receiver {
    seed: u64,
    expect: u64,
    got: u64,
    crc: abi::crc32::Crc32,
    first_bad: Option<u64>,
}

impl Receiver {
    pub fn new(pattern: &str, expect: u64) -> Self {
        Receiver {
            seed: stream_pattern::seed(pattern),
            expect,
            got: 0,
            crc: abi::crc32::Crc32::new(),
            first_bad: None,
        }
    }

    /// The next bytes of the stream.
    pub fn take(&mut self, data: &[u8]) {
        if self.first_bad.is_none() {
            // Bytes past the expected end are wrong whatever they are.
            let inside = data
                .len()
                .min(self.expect.saturating_sub(self.got) as usize);
            let bad = stream_pattern::mismatch(self.seed, self.got, &data[..inside])
                .or((inside < data.len()).then_some(inside));
            self.first_bad = bad.map(|i| self.got + i as u64);
        }
        self.crc.update(data);
        self.got += data.len() as u64;
    }

    pub fn received(&self) -> u64 {
        self.got
    }

    /// Received more than expected: no reason to read on.
    pub fn overrun(&self) -> bool {
        self.got > self.expect
    }

    pub fn crc(&self) -> u32 {
        self.crc.finish()
    }

    pub fn first_bad(&self) -> Option<u64> {
        self.first_bad
    }
}

/// The sending half: the stream, chunk by chunk.
#[derive(Clone, Debug)]
pub struct Sender {
    seed: u64,
    total: u64,
    sent: u64,
    crc: abi::crc32::Crc32,
}

impl Sender {
    pub fn new(pattern: &str, total: u64) -> Self {
        Sender {
            seed: stream_pattern::seed(pattern),
            total,
            sent: 0,
            crc: abi::crc32::Crc32::new(),
        }
    }

    /// Fills `buf` with the next bytes (at most `buf.len()`); returns how
    /// many (0 at the end). They count as sent once [`Sender::sent`] says so.
    pub fn next(&self, buf: &mut [u8]) -> usize {
        let n = (self.total - self.sent).min(buf.len() as u64) as usize;
        stream_pattern::fill(self.seed, self.sent, &mut buf[..n]);
        n
    }

    /// The socket took `data` (the first bytes of the last [`Sender::next`]).
    pub fn sent(&mut self, data: &[u8]) {
        self.crc.update(data);
        self.sent += data.len() as u64;
    }

    pub fn done(&self) -> bool {
        self.sent == self.total
    }

    pub fn count(&self) -> u64 {
        self.sent
    }

    pub fn crc(&self) -> u32 {
        self.crc.finish()
    }
}

/// A port on 127.0.0.1 nobody holds right now, for QEMU to bind a moment
/// later.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// A peer running in its thread.
pub struct Running {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<TcpReport>,
}

/// Starts the peer towards 127.0.0.1:`host_port`; its thread stops by
/// itself after `limit` at the latest.
pub fn start(spec: TcpSpec, host_port: u16, limit: Duration) -> io::Result<Running> {
    spec.check()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, host_port);
    let thread = thread::Builder::new()
        .name("tcp-peer".into())
        .spawn(move || run(&spec, addr, limit, &flag))?;
    Ok(Running { stop, thread })
}

impl Running {
    /// Tells the peer to stop and returns its report.
    pub fn finish(self) -> TcpReport {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or_else(|_| TcpReport {
            error: Some("the peer thread panicked".into()),
            ..TcpReport::default()
        })
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// What one connection did.
struct Attempt {
    sender: Sender,
    receiver: Receiver,
    send_time: Duration,
    recv_time: Duration,
    /// Why it ended early (a reset, a time limit).
    error: Option<String>,
}

/// Sends the stream on `s` until done, the stop flag or the deadline.
fn send_all(
    mut s: TcpStream,
    mut tx: Sender,
    deadline: Instant,
    stop: &AtomicBool,
) -> (Sender, Option<String>) {
    let mut buf = vec![0u8; CHUNK];
    let mut pending = 0..0;
    while !tx.done() || !pending.is_empty() {
        if stop.load(Ordering::Acquire) || Instant::now() >= deadline {
            return (tx, Some("sending: stopped before the end".into()));
        }
        if pending.is_empty() {
            pending = 0..tx.next(&mut buf);
        }
        match s.write(&buf[pending.clone()]) {
            Ok(0) => return (tx, Some("sending: the connection closed".into())),
            Ok(n) => {
                tx.sent(&buf[pending.start..pending.start + n]);
                pending.start += n;
            }
            Err(e) if timed_out(&e) => {}
            Err(e) => return (tx, Some(format!("sending: {e}"))),
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    (tx, None)
}

fn attempt(spec: &TcpSpec, s: TcpStream, deadline: Instant, stop: &AtomicBool) -> Attempt {
    let t0 = Instant::now();
    let mut rx = Receiver::new(&spec.recv_pattern, spec.recv);
    let tx = Sender::new(&spec.send_pattern, spec.send);
    let setup = s
        .set_read_timeout(Some(POLL))
        .and_then(|()| s.set_write_timeout(Some(POLL)))
        .and_then(|()| s.set_nodelay(true))
        .and_then(|()| s.try_clone());
    let ws = match setup {
        Ok(w) => w,
        Err(e) => {
            return Attempt {
                sender: tx,
                receiver: rx,
                send_time: Duration::ZERO,
                recv_time: Duration::ZERO,
                error: Some(format!("socket setup: {e}")),
            }
        }
    };
    let (tx, send_error, send_time, recv_error, recv_time) = thread::scope(|sc| {
        let writer = sc.spawn(move || (send_all(ws, tx, deadline, stop), t0.elapsed()));
        let mut s = s;
        let mut buf = vec![0u8; CHUNK];
        let mut error = None;
        // The receive time runs from the first byte: QEMU's user network
        // accepts the connection while the guest may still be booting.
        let mut first_byte: Option<Instant> = None;
        loop {
            if stop.load(Ordering::Acquire) || Instant::now() >= deadline {
                error = Some("receiving: stopped before the guest closed".to_string());
                break;
            }
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    first_byte.get_or_insert_with(Instant::now);
                    rx.take(&buf[..n]);
                    if rx.overrun() {
                        break;
                    }
                }
                Err(e) if timed_out(&e) => {}
                Err(e) => {
                    error = Some(format!("receiving: {e}"));
                    break;
                }
            }
        }
        let recv_time = first_byte.map_or(Duration::ZERO, |f| f.elapsed());
        // The guest closed its half: the writer goes on to its end (or the
        // time limit). Anything else ends the connection, and a writer
        // blocked on it.
        if error.is_some() || rx.overrun() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let ((tx, send_error), send_time) = writer.join().unwrap_or_else(|_| {
            (
                (Sender::new("A", 0), Some("the writer panicked".into())),
                t0.elapsed(),
            )
        });
        (tx, send_error, send_time, error, recv_time)
    });
    Attempt {
        error: recv_error.or(send_error.filter(|_| !tx.done())),
        sender: tx,
        receiver: rx,
        send_time,
        recv_time,
    }
}

fn run(spec: &TcpSpec, addr: SocketAddrV4, limit: Duration, stop: &AtomicBool) -> TcpReport {
    let deadline = Instant::now() + limit;
    let mut report = TcpReport::default();
    loop {
        if stop.load(Ordering::Acquire) || Instant::now() >= deadline {
            report.error = Some(format!(
                "no exchange with the guest after {} connection attempts",
                report.attempts
            ));
            return report;
        }
        if report.attempts >= MAX_ATTEMPTS {
            report.error = Some(format!(
                "the guest never answered in {MAX_ATTEMPTS} connection attempts"
            ));
            return report;
        }
        report.attempts += 1;
        let s = match TcpStream::connect_timeout(&addr.into(), Duration::from_secs(1)) {
            Ok(s) => s,
            // QEMU not listening yet.
            Err(_) => {
                thread::sleep(RETRY);
                continue;
            }
        };
        let a = attempt(spec, s, deadline, stop);
        // Slirp took the connection but the guest was not listening: the
        // connection ends with nothing from the guest, before the peer's
        // stream is through (or with nothing to receive, before it began).
        let refused = a.receiver.received() == 0
            && (spec.recv > 0 || !a.sender.done())
            && !stop.load(Ordering::Acquire)
            && Instant::now() < deadline;
        if refused {
            thread::sleep(RETRY);
            continue;
        }
        report.sent = a.sender.count();
        report.sent_crc = a.sender.crc();
        report.received = a.receiver.received();
        report.received_crc = a.receiver.crc();
        report.first_bad = a.receiver.first_bad();
        report.error = a.error;
        report.send_time = a.send_time;
        report.recv_time = a.recv_time;
        return report;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(send: u64, recv: u64, recv_pattern: &str) -> TcpSpec {
        TcpSpec {
            connect: Forward::parse("10.0.2.15:5001").unwrap(),
            send,
            send_pattern: "H".into(),
            recv,
            recv_pattern: recv_pattern.into(),
        }
    }

    fn stream(p: &str, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        stream_pattern::fill(stream_pattern::seed(p), 0, &mut v);
        v
    }

    #[test]
    fn forwards_are_in_slirps_network() {
        let f = Forward::parse("10.0.2.15:5001").unwrap();
        assert_eq!(f.qemu_option(40000), "tcp:127.0.0.1:40000-10.0.2.15:5001");
        for bad in [
            "10.0.3.15:5001",
            "10.0.2.2:80",
            "10.0.2.3:53",
            "10.0.2.255:1",
            "10.0.2.15:0",
            "10.0.2.15",
            "guest:1",
        ] {
            assert!(Forward::parse(bad).is_err(), "{bad}");
        }
        assert!(Forward::parse("192.168.1.2:5")
            .unwrap_err()
            .contains("outside QEMU's user network"));
    }

    #[test]
    fn specs_are_checked() {
        assert!(spec(16 << 20, 16 << 20, "G").check().is_ok());
        assert!(spec(0, 0, "G").check().unwrap_err().contains("nothing"));
        assert!(spec(MAX_BYTES + 1, 0, "G").check().is_err());
        assert!(spec(1, 1, "").check().unwrap_err().contains("recv_pattern"));
    }

    #[test]
    fn the_receiver_checks_every_byte_in_any_pieces() {
        let data = stream("G", 10_000);
        let mut r = Receiver::new("G", 10_000);
        for piece in data.chunks(777) {
            r.take(piece);
        }
        assert_eq!(r.received(), 10_000);
        assert_eq!(r.first_bad(), None);
        assert_eq!(r.crc(), abi::crc32::crc32(&data));
        assert!(!r.overrun());
        let report = TcpReport {
            sent: 5,
            received: 10_000,
            received_crc: r.crc(),
            ..TcpReport::default()
        };
        assert!(failures(&spec(5, 10_000, "G"), &report).is_empty());

        let mut bad = data.clone();
        bad[4321] ^= 1;
        let mut r = Receiver::new("G", 10_000);
        r.take(&bad[..4000]);
        r.take(&bad[4000..]);
        assert_eq!(r.first_bad(), Some(4321));
        // Too much is wrong from the first byte past the end.
        let mut r = Receiver::new("G", 100);
        r.take(&data[..150]);
        assert_eq!(r.first_bad(), Some(100));
        assert!(r.overrun());
    }

    #[test]
    fn failures_name_what_is_wrong() {
        let s = spec(100, 200, "G");
        let r = TcpReport {
            sent: 50,
            received: 200,
            received_crc: 1,
            first_bad: Some(7),
            error: Some("receiving: reset".into()),
            ..TcpReport::default()
        };
        let f = failures(&s, &r);
        assert_eq!(f.len(), 4, "{f:?}");
        assert!(f[0].contains("sent 50 bytes, expected 100"));
        assert!(f[1].contains("byte 7 differs from stream G"));
        assert!(f[2].contains("crc32 0x00000001 is not stream G's"));
        assert!(f[3].contains("reset"));
        assert!(r.summary().starts_with("tcp peer: sent 50 B"));
    }

    #[test]
    fn the_sender_makes_the_stream() {
        let mut tx = Sender::new("H", 1000);
        let mut buf = [0u8; 300];
        let mut all = Vec::new();
        loop {
            let n = tx.next(&mut buf);
            if n == 0 {
                break;
            }
            // The socket takes a part of it.
            let took = n.min(170);
            tx.sent(&buf[..took]);
            all.extend_from_slice(&buf[..took]);
        }
        assert!(tx.done());
        assert_eq!(all, stream("H", 1000));
        assert_eq!(tx.crc(), abi::crc32::crc32(&all));
    }

    /// A stand-in guest on 127.0.0.1: it first refuses (closes at once)
    /// `refusals` connections, as slirp does before the guest listens, then
    /// reads everything and answers with stream `G`.
    fn guest(refusals: u32, answer: usize) -> (u16, thread::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let h = thread::spawn(move || {
            for _ in 0..refusals {
                drop(l.accept().unwrap());
            }
            let (mut s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let out = stream("G", answer);
            let writer = thread::spawn(move || {
                w.write_all(&out).unwrap();
                w.shutdown(Shutdown::Write).unwrap();
            });
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            writer.join().unwrap();
            got
        });
        (port, h)
    }

    #[test]
    fn the_socket_peer_moves_both_streams_after_refusals() {
        let (port, g) = guest(2, 300_000);
        let s = spec(500_000, 300_000, "G");
        let r = start(s.clone(), port, Duration::from_secs(30))
            .unwrap()
            .thread
            .join()
            .unwrap();
        let got = g.join().unwrap();
        assert!(
            got == stream("H", 500_000),
            "the guest got {} bytes",
            got.len()
        );
        assert!(failures(&s, &r).is_empty(), "{r:?}");
        assert_eq!(r.attempts, 3, "{r:?}");
        assert_eq!(r.sent_crc, abi::crc32::crc32(&got));
    }

    #[test]
    fn a_short_answer_is_a_failure_and_the_peer_stops_in_time() {
        let (port, g) = guest(0, 1000);
        let s = spec(1000, 2000, "G");
        let r = start(s.clone(), port, Duration::from_secs(30))
            .unwrap()
            .thread
            .join()
            .unwrap();
        g.join().unwrap();
        let f = failures(&s, &r);
        assert!(
            f.iter()
                .any(|l| l.contains("received 1000 bytes, expected 2000")),
            "{f:?}"
        );
        // Nobody listening at all: bounded by the time limit.
        let port = free_port().unwrap();
        let t = Instant::now();
        let r = start(s, port, Duration::from_millis(500))
            .unwrap()
            .thread
            .join()
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(r.error.is_some(), "{r:?}");
    }
}
