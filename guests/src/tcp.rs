//! `role=tcp-send`, `role=tcp-recv` and `role=tcp-serve`: one TCP
//! connection over netfront and smoltcp that moves a checked byte stream.
//!
//! ```text
//! role=tcp-send to=IP port=P bytes=N [pattern=A] [recv=N] [rpattern=B] [COMMON]
//! role=tcp-recv port=P bytes=N [pattern=A] [send=N] [spattern=B] [COMMON]
//! role=tcp-serve port=P [recv=N] [recv_pattern=A] [send=N] [send_pattern=B] [COMMON]
//! COMMON: [gw=IP] [vif=NAME] [timeout_s=120] [linger_ms=300]
//! ```
//!
//! The workload, its arguments and its `stream` and `throughput` events are
//! `driver_domains::tcp_stream`'s, which the net driver domain's direct TCP
//! mode runs too; here it runs over the vif `vif` names (or the first),
//! which is closed at the end.
//!
//! Events besides the workload's: `work_done {work: "spoofed-frames-seen",
//! units}` (marked spoofed frames that reached it: must be 0). Exit 0 iff
//! every byte was sent and acknowledged, every expected byte arrived
//! intact, nothing more, and no spoofed frame came.

use abi::ev::WorkDone;
use driver_domains::tcp_stream::{self, Frames, Link};
use libdom::netfront::{self, NetError, Netfront};
use libdom::ring::Waiter;
use libdom::smoltcp::iface::{Interface, SocketSet};
use libdom::{event, println, time_ns, Args, StartInfo};

use crate::net::{self, Ip, Seen, Tap};

pub use driver_domains::tcp_stream::{Flow, Mode, SOCKET_BUF};

/// What a TCP role does: the workload and the vif it runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan<'a> {
    pub stream: tcp_stream::Plan<'a>,
    pub vif: Option<&'a str>,
}

impl<'a> Plan<'a> {
    /// Reads `role=tcp-send ...`, `role=tcp-recv ...` or `role=tcp-serve ...`.
    pub fn parse(args: &'a str) -> Result<Self, alloc::string::String> {
        let stream = tcp_stream::Plan::parse(args, &["vif"])?;
        let vif = Args::parse(args)
            .map_err(|e| alloc::format!("{e}"))?
            .get("vif");
        Ok(Plan { stream, vif })
    }
}

/// netfront under smoltcp, counting marked frames on the way in.
struct GuestLink {
    nf: Netfront,
    w: Waiter,
    seen: Seen,
}

impl Link for GuestLink {
    type Error = NetError;

    fn interface(&mut self, random_seed: u64) -> Interface {
        let cfg = self.nf.interface_config(random_seed);
        let mut iface = Interface::new(cfg, &mut self.nf, netfront::now());
        self.nf.addresses(&mut iface);
        iface
    }

    fn poll(&mut self, iface: &mut Interface, sockets: &mut SocketSet<'_>) {
        let mut tap = Tap {
            nf: &mut self.nf,
            seen: &mut self.seen,
        };
        iface.poll(netfront::now(), &mut tap, sockets);
    }

    fn frames(&self) -> Frames {
        let s = self.nf.stats();
        Frames {
            rx: s.rx_frames,
            tx: s.tx_frames,
        }
    }

    fn wait(&mut self, until_ns: u64) -> Result<(), NetError> {
        self.nf.wait(&mut self.w, until_ns).map(drop)
    }
}

/// Runs a TCP role.
pub fn run(si: &StartInfo<'_>, plan: &Plan<'_>) -> i64 {
    let who = match plan.stream.mode {
        Mode::Connect { .. } => "tcp-send",
        Mode::Listen { .. } => "tcp-recv",
    };
    let Some((nf, w)) = net::connect(si, who, plan.vif, net::config()) else {
        return 1;
    };
    let mut link = GuestLink {
        nf,
        w,
        seen: Seen::default(),
    };
    let seed = time_ns() ^ (u64::from(si.domid) << 48);
    let out = tcp_stream::run(&mut link, &plan.stream, who, seed);
    let GuestLink { nf, mut w, seen } = link;
    let _ = event(&WorkDone {
        work: "spoofed-frames-seen",
        units: seen.spoofed,
    });
    let st = nf.stats();
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
    let mut ok = out.ok;
    if seen.spoofed > 0 {
        println!("{who}: {} spoofed frames reached me", seen.spoofed);
        ok = false;
    }
    if let Mode::Connect { to, port } = plan.stream.mode {
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
        let p = Plan::parse("role=tcp-recv port=5001 bytes=1M gw=10.0.2.2 vif=eth1").unwrap();
        assert_eq!(p.stream.mode, Mode::Listen { port: 5001 });
        assert_eq!(p.stream.recv.bytes, 1 << 20);
        assert_eq!((p.stream.gw, p.vif), (Some([10, 0, 2, 2]), Some("eth1")));
        assert_eq!(Plan::parse("role=tcp-serve port=5001").unwrap().vif, None);
        // The driver domain's key is not a guest's.
        let e = Plan::parse("role=tcp-serve port=5001 ip=10.0.2.15").unwrap_err();
        assert!(e.contains("unknown argument \"ip\""), "{e}");
    }
}
