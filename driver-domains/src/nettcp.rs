//! The net driver domain's direct TCP mode: the domain itself runs a TCP
//! role ([`crate::tcp_stream`], the very code the guests run over netfront)
//! with smoltcp over its own virtio-net ([`crate::nic::Nic`]), no netback and
//! no grant in the way. It is the direct twin of a guest's TCP stream
//! through netback: same peer, addresses, streams and events, so their
//! throughputs make the split/direct ratio (`cargo xtask bench`).
//!
//! ```text
//! role=tcp-serve ip=10.0.2.15 port=5001 [send=4M send_pattern=G] [recv=N recv_pattern=H] ...
//! ```
//!
//! The args are a TCP role's (`tcp-send`, `tcp-recv` or `tcp-serve`, see
//! [`crate::tcp_stream`]) and `ip`, the domain's IPv4 address (a /24; the
//! NIC's own MAC). The NIC keeps serve mode's buffers
//! ([`crate::netserve::DEFAULT_RX`] receive, [`crate::netserve::DEFAULT_TX`]
//! transmit). Exit 0 iff the exchange succeeded.

use alloc::format;
use alloc::string::String;

use libdom::Args;

use crate::tcp_stream::{self, Plan};

/// The keys besides the TCP role's.
pub const EXTRA_KEYS: &[&str] = &["ip"];

/// What the direct TCP mode does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpArgs<'a> {
    pub plan: Plan<'a>,
    /// This domain's IPv4 address.
    pub ip: [u8; 4],
}

impl<'a> TcpArgs<'a> {
    pub fn parse(args: &'a str) -> Result<Self, String> {
        let plan = Plan::parse(args, EXTRA_KEYS)?;
        let a = Args::parse(args).map_err(|e| format!("{e}"))?;
        let ip = tcp_stream::parse_ip(&a, "ip")?.ok_or("argument \"ip\" is missing")?;
        Ok(TcpArgs { plan, ip })
    }
}

pub use domain::run;

mod domain {
    use abi::hypercall::PORT_WORDS;
    use libdom::netfront::now;
    use libdom::smoltcp::iface::{Config, Interface, SocketSet};
    use libdom::smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
    use libdom::{println, set_timer, time_ns, wait};
    use virtio_drivers::device::net::VirtIONetRaw;
    use virtio_drivers::transport::Transport;
    use virtio_drivers::Hal;

    use super::TcpArgs;
    use crate::netframe::ShowMac;
    use crate::netserve::{DEFAULT_RX, DEFAULT_TX, QUEUE_SIZE};
    use crate::nic::Nic;
    use crate::tcp_stream::{self, Frames, Link};

    /// The NIC under smoltcp, woken by its interrupt port or the timer.
    struct NicLink<H: Hal, T: Transport> {
        nic: Nic<H, T>,
        ip: [u8; 4],
        /// Waits that ended.
        waits: u64,
    }

    impl<H: Hal, T: Transport> Link for NicLink<H, T> {
        type Error = &'static str;

        fn interface(&mut self, random_seed: u64) -> Interface {
            let mut cfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(self.nic.mac())));
            cfg.random_seed = random_seed;
            let mut iface = Interface::new(cfg, &mut self.nic, now());
            let [a, b, c, d] = self.ip;
            iface.update_ip_addrs(|addrs| {
                addrs.clear();
                let _ = addrs.push(IpCidr::new(IpAddress::v4(a, b, c, d), 24));
            });
            iface
        }

        fn poll(&mut self, iface: &mut Interface, sockets: &mut SocketSet<'_>) {
            iface.poll(now(), &mut self.nic, sockets);
        }

        fn frames(&self) -> Frames {
            Frames {
                rx: self.nic.stats.rx_frames,
                tx: self.nic.stats.tx_frames,
            }
        }

        /// Any port wakes it: the NIC's interrupt (a frame in or a
        /// transmission done; always enabled, so one that came after the
        /// last poll is pending already) or the timer.
        fn wait(&mut self, until_ns: u64) -> Result<(), &'static str> {
            self.nic.repost();
            set_timer(until_ns).map_err(|_| "set_timer failed")?;
            let mut words = [0u64; PORT_WORDS];
            wait(&mut words, 0).map_err(|_| "wait failed")?;
            self.waits += 1;
            Ok(())
        }
    }

    /// Runs `args` on `net`. The exit status: 0 iff the exchange succeeded.
    pub fn run<H: Hal, T: Transport>(
        si: &libdom::StartInfo<'_>,
        args: &TcpArgs<'_>,
        net: VirtIONetRaw<H, T, QUEUE_SIZE>,
    ) -> i64 {
        let nic = match Nic::new(net, DEFAULT_RX, DEFAULT_TX) {
            Ok(n) => n,
            Err(e) => {
                println!("net: posting receive buffers: {e:?}");
                return 1;
            }
        };
        let [a, b, c, d] = args.ip;
        println!(
            "net: TCP over the NIC itself as {a}.{b}.{c}.{d}, MAC {} ({} receive buffers posted, {DEFAULT_TX} transmit buffers)",
            ShowMac(nic.mac()),
            nic.rx_posted(),
        );
        let mut link = NicLink {
            nic,
            ip: args.ip,
            waits: 0,
        };
        let seed = time_ns() ^ (u64::from(si.domid) << 48);
        let out = tcp_stream::run(&mut link, &args.plan, "net", seed);
        let _ = set_timer(0);
        let s = &link.nic.stats;
        println!(
            "net: NIC: RX {} frames {} bytes ({} errors), TX {} frames {} bytes ({} busy, {} errors); {} waits",
            s.rx_frames,
            s.rx_bytes,
            s.rx_errors,
            s.tx_frames,
            s.tx_bytes,
            s.tx_busy,
            s.tx_errors,
            link.waits
        );
        i64::from(!out.ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp_stream::{Flow, Mode};

    #[test]
    fn args() {
        let a =
            TcpArgs::parse("role=tcp-serve ip=10.0.2.15 port=5001 send=4M send_pattern=G").unwrap();
        assert_eq!(a.ip, [10, 0, 2, 15]);
        assert_eq!(a.plan.mode, Mode::Listen { port: 5001 });
        assert_eq!(
            a.plan.send,
            Flow {
                bytes: 4 << 20,
                pattern: "G"
            }
        );
        assert_eq!(a.plan.recv.bytes, 0);
        let e = |s| TcpArgs::parse(s).unwrap_err();
        assert!(e("role=tcp-serve port=5001").contains("\"ip\" is missing"));
        assert!(e("role=tcp-serve ip=10.0.2 port=5001").contains("not an IPv4"));
        assert!(e("role=tcp-serve ip=10.0.2.15 port=5001 vif=eth0").contains("unknown"));
    }
}
