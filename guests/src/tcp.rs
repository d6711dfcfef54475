//! `role=tcp-send` and `role=tcp-recv`: one TCP connection over netfront
//! and smoltcp that moves a checked byte stream.
//!
//! ```text
//! role=tcp-send to=IP port=P bytes=N [pattern=A] [recv=N] [rpattern=B] [COMMON]
//! role=tcp-recv port=P bytes=N [pattern=A] [send=N] [spattern=B] [COMMON]
//! role=tcp-serve port=P [recv=N] [recv_pattern=A] [send=N] [send_pattern=B] [COMMON]
//! COMMON: [gw=IP] [vif=NAME] [timeout_s=120] [linger_ms=300]
//! ```
//!
//! `tcp-send` connects to `to:port` (again and again while it is refused:
//! the receiver may not listen yet) and sends `bytes` of stream `pattern`;
//! `tcp-recv` listens on `port` and expects `bytes` of stream `pattern`.
//! Either may also move a stream the other way (`recv=`/`send=`; the host
//! peer of `net-host` sends and receives at once; `tcp-serve` is a
//! listener that names both directions alike). Sizes take `K`, `M`,
//! `G`. The streams are `driver_domains::stream_pattern`: any piece can be
//! checked on its own, so every received byte is checked as it arrives.
//!
//! An end closes its sending half once it has sent everything and received
//! everything it expects (or the peer closed); the exchange is over when
//! the connection is Closed or in TimeWait, after which the role keeps
//! polling for `linger_ms` (so the peer gets the last ACK) and closes the
//! vif.
//!
//! Events: `stream {what: "tcp-tx", bytes, crc32, ns}` for what it sent (if
//! anything) and `stream {what: "tcp-rx", ...}` for what it received, each
//! with a `throughput` of the same `what` (`requests`: frames; `block`:
//! the MSS; `depth`: the receive window in bytes); `work_done {work:
//! "spoofed-frames-seen", units}` (marked spoofed frames that reached it:
//! must be 0). Exit 0 iff every byte was sent and acknowledged, every
//! expected byte arrived intact, nothing more, and no spoofed frame came.

use alloc::vec;

use abi::crc32::Crc32;
use abi::ev::{Hex, Stream, Throughput, WorkDone};
use driver_domains::stream_pattern;
use libdom::args::ArgError;
use libdom::smoltcp::iface::{Interface, SocketSet};
use libdom::smoltcp::socket::tcp;
use libdom::smoltcp::wire::{IpAddress, Ipv4Address};
use libdom::{event, netfront, println, time_ns, Args, StartInfo};

use crate::net::{self, Ip, Seen, Tap};

/// Bytes of each socket buffer (more than 64 KiB: window scaling).
pub const SOCKET_BUF: usize = 128 * 1024;
/// The MSS smoltcp uses over a 1500-byte MTU.
const MSS: u64 = 1460;
/// How long a connection attempt may go unanswered.
const CONNECT_TIMEOUT: libdom::smoltcp::time::Duration =
    libdom::smoltcp::time::Duration::from_millis(2000);

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
    pub vif: Option<&'a str>,
    pub timeout_s: u64,
    pub linger_ms: u64,
}

const KEYS_SEND: &[&str] = &[
    "role",
    "to",
    "port",
    "bytes",
    "pattern",
    "recv",
    "rpattern",
    "gw",
    "vif",
    "timeout_s",
    "linger_ms",
];
const KEYS_SERVE: &[&str] = &[
    "role",
    "port",
    "recv",
    "recv_pattern",
    "send",
    "send_pattern",
    "gw",
    "vif",
    "timeout_s",
    "linger_ms",
];
const KEYS_RECV: &[&str] = &[
    "role",
    "port",
    "bytes",
    "pattern",
    "send",
    "spattern",
    "gw",
    "vif",
    "timeout_s",
    "linger_ms",
];

fn arg_err(e: ArgError<'_>) -> alloc::string::String {
    alloc::format!("{e}")
}

impl<'a> Plan<'a> {
    /// Reads `role=tcp-send ...` or `role=tcp-recv ...`.
    pub fn parse(args: &'a str) -> Result<Self, alloc::string::String> {
        let a = Args::parse(args).map_err(arg_err)?;
        let role = a.get("role");
        let sender = match role {
            Some("tcp-send") => true,
            Some("tcp-recv" | "tcp-serve") => false,
            r => return Err(alloc::format!("not a TCP role: {r:?}")),
        };
        let serve = role == Some("tcp-serve");
        a.only(if sender {
            KEYS_SEND
        } else if serve {
            KEYS_SERVE
        } else {
            KEYS_RECV
        })
        .map_err(arg_err)?;
        let size = |key: &str, required: bool| -> Result<u64, alloc::string::String> {
            match a.get(key) {
                None if required => Err(alloc::format!("argument \"{key}\" is missing")),
                None => Ok(0),
                Some(v) => net::parse_size(v).ok_or_else(|| {
                    alloc::format!("argument {key}=\"{v}\" is not a size (such as 16M)")
                }),
            }
        };
        let pattern = |key: &str| -> Result<&'a str, alloc::string::String> {
            let p = a.get(key).unwrap_or("A");
            if stream_pattern::valid_name(p) {
                Ok(p)
            } else {
                Err(alloc::format!(
                    "argument {key}=\"{p}\" is not a pattern name"
                ))
            }
        };
        let ip = |key: &str| -> Result<Option<[u8; 4]>, alloc::string::String> {
            a.get(key)
                .map(|v| {
                    net::parse_ipv4(v).ok_or_else(|| {
                        alloc::format!("argument {key}=\"{v}\" is not an IPv4 address")
                    })
                })
                .transpose()
        };
        let port = a.u64("port").map_err(arg_err)?;
        if !(1..=65535).contains(&port) {
            return Err(alloc::format!("argument port={port} is outside 1..=65535"));
        }
        let port = port as u16;
        let (mode, send, recv) = if serve {
            let recv = Flow {
                bytes: size("recv", false)?,
                pattern: pattern("recv_pattern")?,
            };
            let send = Flow {
                bytes: size("send", false)?,
                pattern: pattern("send_pattern")?,
            };
            (Mode::Listen { port }, send, recv)
        } else if sender {
            let main = Flow {
                bytes: size("bytes", true)?,
                pattern: pattern("pattern")?,
            };
            let to = ip("to")?.ok_or("argument \"to\" is missing")?;
            let back = Flow {
                bytes: size("recv", false)?,
                pattern: pattern("rpattern")?,
            };
            (Mode::Connect { to, port }, main, back)
        } else {
            let main = Flow {
                bytes: size("bytes", true)?,
                pattern: pattern("pattern")?,
            };
            let back = Flow {
                bytes: size("send", false)?,
                pattern: pattern("spattern")?,
            };
            (Mode::Listen { port }, back, main)
        };
        Ok(Plan {
            mode,
            send,
            recv,
            gw: ip("gw")?,
            vif: a.get("vif"),
            timeout_s: a.u64_or("timeout_s", 120).map_err(arg_err)?,
            linger_ms: a.u64_or("linger_ms", 300).map_err(arg_err)?,
        })
    }
}

/// One direction's progress.
struct Progress {
    seed: u64,
    want: u64,
    done: u64,
    crc: Crc32,
    /// First byte that differed from the pattern (receive side).
    bad_at: Option<u64>,
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

    fn report(&self, what: &str, frames: u64) {
        let ns = self.end_ns.saturating_sub(self.start_ns);
        let crc = self.crc.finish();
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
        let x100 = crate::blkwork::mb_per_s_x100(self.done, ns);
        println!(
            "{what}: {} bytes in {} us, {}.{:02} MB/s, crc32 {crc:08x}",
            self.done,
            ns / 1000,
            x100 / 100,
            x100 % 100
        );
    }
}

/// Runs a TCP role.
pub fn run(si: &StartInfo<'_>, plan: &Plan<'_>) -> i64 {
    let who = match plan.mode {
        Mode::Connect { .. } => "tcp-send",
        Mode::Listen { .. } => "tcp-recv",
    };
    let Some((mut nf, mut w)) = net::connect(si, who, plan.vif, net::config()) else {
        return 1;
    };
    let deadline = time_ns().saturating_add(plan.timeout_s.saturating_mul(1_000_000_000));
    let mut seen = Seen::default();
    let seed = time_ns() ^ (u64::from(si.domid) << 48);
    let mut iface = {
        let cfg = nf.interface_config(seed);
        Interface::new(cfg, &mut nf, netfront::now())
    };
    nf.addresses(&mut iface);
    if let Some([a, b, c, d]) = plan.gw {
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
    }
    let mut sockets = SocketSet::new(vec![]);
    let new_socket = || {
        tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; SOCKET_BUF]),
            tcp::SocketBuffer::new(vec![0; SOCKET_BUF]),
        )
    };
    let h = sockets.add(new_socket());
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
        return 1;
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
        let frames_before = nf.stats().rx_frames + nf.stats().tx_frames;
        {
            let mut tap = Tap {
                nf: &mut nf,
                seen: &mut seen,
            };
            iface.poll(netfront::now(), &mut tap, &mut sockets);
        }
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
                if rx.bad_at.is_none() {
                    if let Some(i) = stream_pattern::mismatch(rx.seed, rx.done, buf) {
                        rx.bad_at = Some(rx.done + i as u64);
                    }
                }
                rx.crc.update(buf);
                rx.done += buf.len() as u64;
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
                stream_pattern::fill(tx.seed, tx.done, &mut buf[..n]);
                tx.crc.update(&buf[..n]);
                tx.done += n as u64;
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
        let frames_after = nf.stats().rx_frames + nf.stats().tx_frames;
        if moved || frames_after != frames_before {
            continue;
        }
        // smoltcp says 0 when it has something to send: with nothing moved,
        // that is a full TX ring, and the backend's answer wakes us.
        let delay_ns = iface
            .poll_delay(netfront::now(), &sockets)
            .map_or(100_000_000, |d| d.total_micros().saturating_mul(1000));
        let delay_ns = if delay_ns == 0 { 10_000_000 } else { delay_ns };
        let mut until = now.saturating_add(delay_ns.min(100_000_000)).min(deadline);
        if finished_at.is_some() {
            until = until.min(now + 10_000_000);
        }
        if retry_at != 0 {
            until = until.min(retry_at);
        }
        if let Err(e) = nf.wait(&mut w, until) {
            println!("{who}: {e}");
            ok = false;
            break;
        }
    }
    let st = nf.stats();
    if tx.want > 0 {
        tx.report("tcp-tx", st.tx_frames);
    }
    if rx.want > 0 || rx.done > 0 {
        rx.report("tcp-rx", st.rx_frames);
    }
    let _ = event(&WorkDone {
        work: "spoofed-frames-seen",
        units: seen.spoofed,
    });
    println!(
        "{who}: netfront: tx {} frames, rx {} frames, {} rx errors, {} strays, {} tx full, {} notifies, {} waits; spoofed seen {}, control seen {}",
        st.tx_frames,
        st.rx_frames,
        st.rx_errors,
        st.rx_strays + st.tx_strays,
        st.tx_full,
        st.notifies,
        st.waits,
        seen.spoofed,
        seen.control
    );
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
    if seen.spoofed > 0 {
        println!("{who}: {} spoofed frames reached me", seen.spoofed);
        ok = false;
    }
    if let Mode::Connect { to, port } = plan.mode {
        println!("{who}: peer {}:{port}", Ip(to));
    }
    net::close(nf, &mut w, who);
    i64::from(!ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_from_args() {
        let p = Plan::parse("role=tcp-send to=10.0.0.2 port=5001 bytes=16M").unwrap();
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
                vif: None,
                timeout_s: 120,
                linger_ms: 300,
            }
        );
        let p = Plan::parse(
            "role=tcp-recv port=5001 bytes=1M pattern=B send=2K spattern=C gw=10.0.2.2 vif=eth1",
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
        assert_eq!((p.gw, p.vif), (Some([10, 0, 2, 2]), Some("eth1")));
        let p = Plan::parse(
            "role=tcp-serve vif=eth0 port=5001 recv=16M recv_pattern=H send=16M send_pattern=G",
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
                "role=tcp-recv port=1 bytes=1 to=10.0.0.1",
                "unknown argument \"to\"",
            ),
            (
                "role=tcp-send to=10.0.0.1 port=1 bytes=1 send=5",
                "unknown argument \"send\"",
            ),
        ] {
            let e = Plan::parse(args).unwrap_err();
            assert!(e.contains(msg), "{args}: {e}");
        }
    }
}
