//! The TCP stream workload: one connection over smoltcp that moves a
//! checked byte stream each way. One definition for both ends of a
//! split/direct ratio: the guests' `tcp-send`, `tcp-recv` and `tcp-serve`
//! roles run it over netfront (`guests::tcp`), the net driver domain's
//! direct TCP mode over its own virtio-net (`crate::nettcp`); only the
//! [`Link`] differs.
//!
//! ```text
//! role=tcp-send to=IP port=P bytes=N [pattern=A] [recv=N] [rpattern=B] [COMMON]
//! role=tcp-recv port=P bytes=N [pattern=A] [send=N] [spattern=B] [COMMON]
//! role=tcp-serve port=P [recv=N] [recv_pattern=A] [send=N] [send_pattern=B] [COMMON]
//! COMMON: [gw=IP] [timeout_s=120] [linger_ms=300], and the caller's own keys
//! ```
//!
//! `tcp-send` connects to `to:port` (again and again while it is refused:
//! the receiver may not listen yet) and sends `bytes` of stream `pattern`;
//! `tcp-recv` listens on `port` and expects `bytes` of stream `pattern`.
//! Either may also move a stream the other way (`recv=`/`send=`; the host
//! peer sends and receives at once; `tcp-serve` is a listener that names
//! both directions alike). Sizes take `K`, `M`, `G`. The streams are
//! [`crate::stream_pattern`]: any piece can be checked on its own, so every
//! received byte is checked as it arrives.
//!
//! Once connected, an idle connection sends a keep-alive every 200 ms (the
//! probe of a closed window that smoltcp lacks). An end closes its sending
//! half once it has sent everything and received
//! everything it expects (or the peer closed); the exchange is over when
//! the connection is Closed or in TimeWait, after which [`run`] keeps
//! polling for `linger_ms` (so the peer gets the last ACK).
//!
//! Events: `stream {what: "tcp-tx", bytes, crc32, ns}` for what it sent (if
//! anything) and `stream {what: "tcp-rx", ...}` for what it received, each
//! with a `throughput` of the same `what` (`requests`: frames the link
//! moved that way; `block`: the MSS; `depth`: the socket buffer in bytes).
//! The time of both runs from the connection's establishment to the end of
//! that direction.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Display;

use abi::crc32::Crc32;
use abi::ev::{Hex, Stream, Throughput};
use libdom::args::ArgError;
use libdom::smoltcp::iface::{Interface, SocketSet};
use libdom::smoltcp::socket::tcp;
use libdom::smoltcp::time::Duration;
use libdom::smoltcp::wire::{IpAddress, Ipv4Address};
use libdom::{event, println, time_ns, Args};

use crate::stream_pattern;

/// Bytes of each socket buffer (more than 64 KiB: window scaling).
pub const SOCKET_BUF: usize = 128 * 1024;
/// The MSS smoltcp uses over a 1500-byte MTU.
pub const MSS: u64 = 1460;
/// How long a connection attempt may go unanswered.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(2000);
/// An established connection idle this long sends a keep-alive, which the
/// peer answers with an ACK carrying its window. smoltcp 0.12 has no
/// zero-window probe: a sender whose peer closed its window and then
/// opened it without saying so (QEMU's user network sends no window update
/// of its own accord, as far as the stalls seen here tell) would wait
/// forever; the keep-alive is its probe. Seen before it: a guest's stream
/// to the host stuck until the timeout after 64 KiB, or 8 MiB, twice in
/// about seven runs.
const KEEP_ALIVE: Duration = Duration::from_millis(200);

/// How the connection is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Connect { to: [u8; 4], port: u16 },
    Listen { port: u16 },
}

/// A stream one way: its length and its pattern's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow<'a> {
    pub bytes: u64,
    pub pattern: &'a str,
}

/// What a TCP role does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan<'a> {
    pub mode: Mode,
    pub send: Flow<'a>,
    pub recv: Flow<'a>,
    pub gw: Option<[u8; 4]>,
    pub timeout_s: u64,
    pub linger_ms: u64,
}

const COMMON: &[&str] = &["role", "port", "gw", "timeout_s", "linger_ms"];
const KEYS_SEND: &[&str] = &["to", "bytes", "pattern", "recv", "rpattern"];
const KEYS_SERVE: &[&str] = &["recv", "recv_pattern", "send", "send_pattern"];
const KEYS_RECV: &[&str] = &["bytes", "pattern", "send", "spattern"];

/// Whether `args` name one of the TCP roles.
pub fn is_tcp_role(args: &str) -> bool {
    Args::parse(args)
        .is_ok_and(|a| matches!(a.get("role"), Some("tcp-send" | "tcp-recv" | "tcp-serve")))
}

/// `a.b.c.d`.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut ip {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *b = p.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

/// A byte count: decimal, with an optional `K`, `M` or `G` (binary
/// multiples): `16M` is 16 MiB.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mul) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

/// MB/s (10^6 bytes per second) with two decimals, as hundredths.
pub fn mb_per_s_x100(bytes: u64, ns: u64) -> u64 {
    if ns == 0 {
        return 0;
    }
    (u128::from(bytes) * 100_000 / u128::from(ns)) as u64
}

fn arg_err(e: ArgError<'_>) -> String {
    format!("{e}")
}

impl<'a> Plan<'a> {
    /// Reads `role=tcp-send ...`, `role=tcp-recv ...` or `role=tcp-serve
    /// ...`; `extra` are the keys the caller reads itself (a guest's `vif`,
    /// the driver domain's `ip`), allowed besides the role's.
    pub fn parse(args: &'a str, extra: &[&str]) -> Result<Self, String> {
        let a = Args::parse(args).map_err(arg_err)?;
        let role = a.get("role");
        let own = match role {
            Some("tcp-send") => KEYS_SEND,
            Some("tcp-recv") => KEYS_RECV,
            Some("tcp-serve") => KEYS_SERVE,
            r => return Err(format!("not a TCP role: {r:?}")),
        };
        let keys: Vec<&str> = COMMON.iter().chain(own).chain(extra).copied().collect();
        a.only(&keys).map_err(arg_err)?;
        let size = |key: &str, required: bool| -> Result<u64, String> {
            match a.get(key) {
                None if required => Err(format!("argument \"{key}\" is missing")),
                None => Ok(0),
                Some(v) => parse_size(v)
                    .ok_or_else(|| format!("argument {key}=\"{v}\" is not a size (such as 16M)")),
            }
        };
        let pattern = |key: &str| -> Result<&'a str, String> {
            let p = a.get(key).unwrap_or("A");
            if stream_pattern::valid_name(p) {
                Ok(p)
            } else {
                Err(format!("argument {key}=\"{p}\" is not a pattern name"))
            }
        };
        let flow = |bytes: &str, required: bool, pat: &str| -> Result<Flow<'a>, String> {
            Ok(Flow {
                bytes: size(bytes, required)?,
                pattern: pattern(pat)?,
            })
        };
        let port = a.u64("port").map_err(arg_err)?;
        if !(1..=65535).contains(&port) {
            return Err(format!("argument port={port} is outside 1..=65535"));
        }
        let port = port as u16;
        let (mode, send, recv) = match role {
            Some("tcp-serve") => (
                Mode::Listen { port },
                flow("send", false, "send_pattern")?,
                flow("recv", false, "recv_pattern")?,
            ),
            Some("tcp-send") => {
                let main = flow("bytes", true, "pattern")?;
                let to = parse_ip(&a, "to")?.ok_or("argument \"to\" is missing")?;
                (
                    Mode::Connect { to, port },
                    main,
                    flow("recv", false, "rpattern")?,
                )
            }
            _ => {
                let main = flow("bytes", true, "pattern")?;
                (
                    Mode::Listen { port },
                    flow("send", false, "spattern")?,
                    main,
                )
            }
        };
        Ok(Plan {
            mode,
            send,
            recv,
            gw: parse_ip(&a, "gw")?,
            timeout_s: a.u64_or("timeout_s", 120).map_err(arg_err)?,
            linger_ms: a.u64_or("linger_ms", 300).map_err(arg_err)?,
        })
    }
}

/// The IPv4 address `key` names, if given.
pub fn parse_ip(a: &Args<'_>, key: &str) -> Result<Option<[u8; 4]>, String> {
    a.get(key)
        .map(|v| {
            parse_ipv4(v).ok_or_else(|| format!("argument {key}=\"{v}\" is not an IPv4 address"))
        })
        .transpose()
}

/// Frames a link moved, each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frames {
    pub rx: u64,
    pub tx: u64,
}

/// What [`run`] needs of the interface under smoltcp: a guest's netfront
/// or the driver domain's own virtio-net.
pub trait Link {
    /// Why a wait failed.
    type Error: Display;
    /// A smoltcp interface with this link's MAC and IPv4 address.
    fn interface(&mut self, random_seed: u64) -> Interface;
    /// One `iface.poll` over this link's device.
    fn poll(&mut self, iface: &mut Interface, sockets: &mut SocketSet<'_>);
    /// Frames moved so far.
    fn frames(&self) -> Frames;
    /// Sleeps until the link may have something (a frame in, a buffer
    /// free) or `until_ns`.
    fn wait(&mut self, until_ns: u64) -> Result<(), Self::Error>;
}

/// One direction's progress.
#[derive(Clone, Debug)]
pub struct Progress {
    seed: u64,
    pub want: u64,
    pub done: u64,
    crc: Crc32,
    /// First byte that differed from the pattern (receive side).
    pub bad_at: Option<u64>,
    start_ns: u64,
    end_ns: u64,
}

impl Progress {
    fn new(f: Flow<'_>) -> Self {
        Progress {
            seed: stream_pattern::seed(f.pattern),
            want: f.bytes,
            done: 0,
            crc: Crc32::new(),
            bad_at: None,
            start_ns: 0,
            end_ns: 0,
        }
    }

    /// Makes the next `out.len()` bytes of the stream.
    fn produce(&mut self, out: &mut [u8]) {
        stream_pattern::fill(self.seed, self.done, out);
        self.crc.update(out);
        self.done += out.len() as u64;
    }

    /// Checks and counts the next `data.len()` bytes of the stream.
    fn consume(&mut self, data: &[u8]) {
        if self.bad_at.is_none() {
            if let Some(i) = stream_pattern::mismatch(self.seed, self.done, data) {
                self.bad_at = Some(self.done + i as u64);
            }
        }
        self.crc.update(data);
        self.done += data.len() as u64;
    }

    /// Nanoseconds from the connection to the end of this direction.
    pub fn ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }

    pub fn crc32(&self) -> u32 {
        self.crc.finish()
    }

    fn report(&self, what: &str, frames: u64) {
        let ns = self.ns();
        let crc = self.crc32();
        let _ = event(&Stream {
            what,
            bytes: self.done,
            crc32: Hex(u64::from(crc)),
            ns,
        });
        let _ = event(&Throughput {
            what,
            bytes: self.done,
            requests: frames,
            ns,
            block: MSS,
            depth: SOCKET_BUF as u64,
        });
        let x100 = mb_per_s_x100(self.done, ns);
        println!(
            "{what}: {} bytes in {} us, {}.{:02} MB/s, crc32 {crc:08x}",
            self.done,
            ns / 1000,
            x100 / 100,
            x100 % 100
        );
    }
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub tx: Progress,
    pub rx: Progress,
    /// Every byte was sent and acknowledged, every expected byte arrived
    /// intact and nothing more, with no error and in time.
    pub ok: bool,
}

/// Runs `plan` over `link`, reports it (events and a summary) and says how
/// it went. `who` prefixes the messages; `seed` seeds smoltcp (its initial
/// sequence numbers) and the local port.
pub fn run<L: Link>(link: &mut L, plan: &Plan<'_>, who: &str, seed: u64) -> Outcome {
    let deadline = time_ns().saturating_add(plan.timeout_s.saturating_mul(1_000_000_000));
    let mut iface = link.interface(seed);
    if let Some([a, b, c, d]) = plan.gw {
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
    }
    let mut sockets = SocketSet::new(vec![]);
    let h = sockets.add(tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; SOCKET_BUF]),
        tcp::SocketBuffer::new(vec![0; SOCKET_BUF]),
    ));
    let mut tx = Progress::new(plan.send);
    let mut rx = Progress::new(plan.recv);
    let mut local_port = 49152 + (seed % 8192) as u16;
    let mut started = false;
    let mut closing = false;
    let mut peer_closed = false;
    let mut retry_at = 0u64;
    let mut attempts = 0u32;
    let mut ok = true;
    let mut finished_at: Option<u64> = None;
    let start = |sockets: &mut SocketSet<'_>, iface: &mut Interface, port: u16| {
        let s = sockets.get_mut::<tcp::Socket>(h);
        match plan.mode {
            Mode::Listen { port } => s.listen(port).is_ok(),
            Mode::Connect { to, port: dport } => {
                // A SYN that finds nobody (the receiver's vif not up yet)
                // gives up after CONNECT_TIMEOUT and is tried again.
                s.set_timeout(Some(CONNECT_TIMEOUT));
                let [a, b, c, d] = to;
                s.connect(iface.context(), (IpAddress::v4(a, b, c, d), dport), port)
                    .is_ok()
            }
        }
    };
    if !start(&mut sockets, &mut iface, local_port) {
        println!("{who}: could not open the socket");
        return Outcome { tx, rx, ok: false };
    }
    loop {
        let now = time_ns();
        if now >= deadline {
            println!(
                "{who}: timed out: sent {}/{}, received {}/{}, state {}",
                tx.done,
                tx.want,
                rx.done,
                rx.want,
                sockets.get::<tcp::Socket>(h).state()
            );
            ok = false;
            break;
        }
        let frames_before = link.frames();
        link.poll(&mut iface, &mut sockets);
        let mut moved = false;
        let s = sockets.get_mut::<tcp::Socket>(h);
        let state = s.state();
        // CloseWait too: a peer that sends nothing (the host peer of a
        // guest-to-host stream) may close its half before the first look.
        if !started
            && s.is_active()
            && matches!(state, tcp::State::Established | tcp::State::CloseWait)
        {
            started = true;
            s.set_timeout(None);
            s.set_keep_alive(Some(KEEP_ALIVE));
            tx.start_ns = now;
            rx.start_ns = now;
            println!("{who}: connected ({} attempt(s))", attempts + 1);
        }
        // A refused or reset connection before it was established: the
        // receiver did not listen yet; try again a little later.
        if !started && state == tcp::State::Closed && matches!(plan.mode, Mode::Connect { .. }) {
            if retry_at == 0 {
                retry_at = now + 100_000_000;
            } else if now >= retry_at {
                retry_at = 0;
                attempts += 1;
                local_port = 49152 + ((u64::from(local_port) - 49152 + 1) % 8192) as u16;
                if !start(&mut sockets, &mut iface, local_port) {
                    println!("{who}: could not reconnect");
                    ok = false;
                    break;
                }
            }
        }
        let s = sockets.get_mut::<tcp::Socket>(h);
        while s.can_recv() {
            let r = s.recv(|buf| {
                rx.consume(buf);
                (buf.len(), buf.len())
            });
            match r {
                Ok(n) if n > 0 => moved = true,
                _ => break,
            }
        }
        if started && !s.may_recv() && !peer_closed {
            peer_closed = true;
            rx.end_ns = now;
        }
        while tx.done < tx.want && s.can_send() {
            let r = s.send(|buf| {
                let n = ((tx.want - tx.done) as usize).min(buf.len());
                tx.produce(&mut buf[..n]);
                (n, n)
            });
            match r {
                Ok(n) if n > 0 => moved = true,
                _ => break,
            }
        }
        if started && !closing && tx.done == tx.want && (peer_closed || rx.done >= rx.want) {
            s.close();
            closing = true;
        }
        if started && tx.end_ns == 0 && tx.done == tx.want && s.send_queue() == 0 && closing {
            tx.end_ns = now;
        }
        let state = s.state();
        if started && matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
            let at = *finished_at.get_or_insert(now);
            if rx.end_ns == 0 {
                rx.end_ns = now;
            }
            if tx.end_ns == 0 {
                tx.end_ns = now;
            }
            if now >= at + plan.linger_ms * 1_000_000 {
                break;
            }
        }
        if moved || link.frames() != frames_before {
            continue;
        }
        // smoltcp says 0 when it has something to send: with nothing moved,
        // that is a full TX queue, and the link's completion wakes us.
        let delay_ns = iface
            .poll_delay(libdom::netfront::now(), &sockets)
            .map_or(100_000_000, |d| d.total_micros().saturating_mul(1000));
        let delay_ns = if delay_ns == 0 { 10_000_000 } else { delay_ns };
        let mut until = now.saturating_add(delay_ns.min(100_000_000)).min(deadline);
        if finished_at.is_some() {
            until = until.min(now + 10_000_000);
        }
        if retry_at != 0 {
            until = until.min(retry_at);
        }
        if let Err(e) = link.wait(until) {
            println!("{who}: {e}");
            ok = false;
            break;
        }
    }
    let frames = link.frames();
    if tx.want > 0 {
        tx.report("tcp-tx", frames.tx);
    }
    if rx.want > 0 || rx.done > 0 {
        rx.report("tcp-rx", frames.rx);
    }
    if tx.done != tx.want {
        println!("{who}: sent {} of {} bytes", tx.done, tx.want);
        ok = false;
    }
    if rx.done != rx.want {
        println!("{who}: received {} bytes, expected {}", rx.done, rx.want);
        ok = false;
    }
    if let Some(at) = rx.bad_at {
        println!("{who}: received byte {at} differs from the pattern");
        ok = false;
    }
    Outcome { tx, rx, ok }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        assert_eq!(parse_ipv4("10.0.2.15"), Some([10, 0, 2, 15]));
        assert_eq!(parse_ipv4("10.0.2"), None);
        assert_eq!(parse_ipv4("10.0.2.256"), None);
        assert_eq!(parse_ipv4("10.0..1"), None);
        assert_eq!(parse_ipv4("10.0.0.1.2"), None);
        assert_eq!(parse_size("16M"), Some(16 << 20));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("99999999999G"), None);
        assert_eq!(mb_per_s_x100(8 << 20, 1_000_000_000), 838);
        assert_eq!(mb_per_s_x100(1, 0), 0);
    }

    #[test]
    fn plans_from_args() {
        let p = Plan::parse("role=tcp-send to=10.0.0.2 port=5001 bytes=16M", &[]).unwrap();
        assert_eq!(
            p,
            Plan {
                mode: Mode::Connect {
                    to: [10, 0, 0, 2],
                    port: 5001
                },
                send: Flow {
                    bytes: 16 << 20,
                    pattern: "A"
                },
                recv: Flow {
                    bytes: 0,
                    pattern: "A"
                },
                gw: None,
                timeout_s: 120,
                linger_ms: 300,
            }
        );
        let p = Plan::parse(
            "role=tcp-recv port=5001 bytes=1M pattern=B send=2K spattern=C gw=10.0.2.2 vif=eth1",
            &["vif"],
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Listen { port: 5001 });
        assert_eq!(
            (p.recv, p.send),
            (
                Flow {
                    bytes: 1 << 20,
                    pattern: "B"
                },
                Flow {
                    bytes: 2048,
                    pattern: "C"
                }
            )
        );
        assert_eq!(p.gw, Some([10, 0, 2, 2]));
        let p = Plan::parse(
            "role=tcp-serve ip=10.0.2.15 port=5001 recv=16M recv_pattern=H send=16M send_pattern=G",
            &["ip"],
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Listen { port: 5001 });
        assert_eq!(
            (p.recv, p.send),
            (
                Flow {
                    bytes: 16 << 20,
                    pattern: "H"
                },
                Flow {
                    bytes: 16 << 20,
                    pattern: "G"
                }
            )
        );
        for (args, msg) in [
            ("role=tcp-send port=1 bytes=1", "\"to\" is missing"),
            ("role=tcp-send to=10.0.0.300 port=1 bytes=1", "not an IPv4"),
            ("role=tcp-recv port=0 bytes=1", "outside 1..=65535"),
            ("role=tcp-recv port=1", "\"bytes\" is missing"),
            ("role=tcp-recv port=1 bytes=lots", "not a size"),
            (
                "role=tcp-serve port=1 send=1 send_pattern=?",
                "not a pattern",
            ),
            (
                "role=tcp-recv port=1 bytes=1 to=10.0.0.1",
                "unknown argument \"to\"",
            ),
            (
                "role=tcp-send to=10.0.0.1 port=1 bytes=1 send=5",
                "unknown argument \"send\"",
            ),
            // A key only some caller takes is refused unless it says so.
            ("role=tcp-serve port=1 vif=eth0", "unknown argument \"vif\""),
            ("role=pong", "not a TCP role"),
        ] {
            let e = Plan::parse(args, &[]).unwrap_err();
            assert!(e.contains(msg), "{args}: {e}");
        }
        assert!(is_tcp_role("role=tcp-serve port=1"));
        assert!(!is_tcp_role("serve=1"));
        assert!(!is_tcp_role("frames=64 size=600"));
    }

    #[test]
    fn progress_checks_and_sums_the_stream() {
        let flow = Flow {
            bytes: 3000,
            pattern: "G",
        };
        let mut tx = Progress::new(flow);
        let mut rx = Progress::new(flow);
        let mut buf = [0u8; 1000];
        for _ in 0..3 {
            tx.produce(&mut buf);
            rx.consume(&buf);
        }
        let s = stream_pattern::seed("G");
        assert_eq!(tx.crc32(), stream_pattern::crc32(s, 3000));
        assert_eq!((rx.crc32(), rx.done, rx.bad_at), (tx.crc32(), 3000, None));
        // A damaged byte is found where it is, and only the first.
        let mut rx = Progress::new(flow);
        let mut piece = [0u8; 1500];
        stream_pattern::fill(s, 0, &mut piece);
        piece[1234] ^= 1;
        rx.consume(&piece[..1000]);
        rx.consume(&piece[1000..]);
        piece[1300] ^= 1;
        rx.consume(&piece[..10]);
        assert_eq!(rx.bad_at, Some(1234));
    }
}
