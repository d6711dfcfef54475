//! The net driver domain: drives the virtio-net function the manifest
//! assigns to it (1af4:1041) with virtio-drivers' `VirtIONetRaw`, in ring
//! 3, its DMA confined by the IOMMU. Its args (`driver_domains::net`) say
//! how many test frames ([`driver_domains::netframe`]) of what size to
//! send; the harness's test peer answers each. The domain checks every
//! answer, emits `data_check {what: "net-tx"}` (every request went out and
//! was answered: the peer answers only requests it verified) and
//! `data_check {what: "net-rx"}` (every answer arrived once and intact,
//! nothing else came), and exits 0 if both hold, 1 otherwise.
//!
//! Interrupts: `dev_irq_bind(0)` gives the port the hypervisor raises for
//! any MSI-X entry of the function; the transport sets MSI-X entry 0 as
//! both queues' and the configuration vector (`pci_transport_msix`;
//! `driver_domains::device` sets the function up). The
//! domain keeps [`RX_SLOTS`] receive buffers posted, sends while the
//! exchange's window allows, takes whatever the used rings hold, and
//! blocks in `wait` only when a round found nothing to do. A timer VIRQ
//! bounds each wait: an interrupt that never comes is a failure, not a
//! hang.
//!
//! With `serve=1` in its args it serves instead the vifs its start info
//! lists with role Back: netback's switch between the frontends and this
//! NIC, until every frontend has closed (`driver_domains::netserve`); the
//! device is set up the same way, with larger queues.
//!
//! With a TCP role in its args (`role=tcp-serve ip=10.0.2.15 port=5001
//! ...`) it runs that role itself, smoltcp over the NIC
//! (`driver_domains::nettcp`): the direct twin of a guest's TCP stream
//! through netback. The device is set up as in serve mode.
#![cfg_attr(target_os = "none", no_std, no_main)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;

use abi::ev::DataCheck;
use driver_domains::device::{self, DomTransport, VECTOR};
use driver_domains::net::{Exchange, Plan, MAX_WINDOW};
use driver_domains::netframe::{self, ShowMac};
use driver_domains::nettcp::TcpArgs;
use driver_domains::{netserve, nettcp, serve, tcp_stream};
use libdom::virtio::DomHal;
use libdom::{event, println, time_ns};
use virtio_drivers::device::net::VirtIONetRaw;

/// virtio-net, modern (virtio 1.x) PCI ids; two queues (receive, transmit).
static KIND: device::Kind = device::Kind {
    log: "net",
    name: "virtio-net",
    vendor: 0x1af4,
    device: 0x1041,
    queues: 2,
};
/// Descriptors per virtqueue.
const QUEUE_SIZE: usize = 32;
/// Receive buffers kept posted: one per request in flight, so an answer
/// always finds one.
const RX_SLOTS: usize = MAX_WINDOW as usize;
/// Bytes of a receive buffer: virtio-drivers asks for at least 1526 (the
/// 12-byte virtio-net header and a 1514-byte frame).
const RX_BUF: usize = 1536;
/// Transmit buffers: as many as requests in flight.
const TX_SLOTS: usize = MAX_WINDOW as usize;
/// The virtio-net header (VIRTIO_F_VERSION_1: 12 bytes) and a frame.
const TX_BUF: usize = 12 + netframe::MAX_LEN;
/// How long one wait for an interrupt may take.
/// Bad frames printed, at most.
const REPORT_BAD: u32 = 4;

type Net = VirtIONetRaw<DomHal, DomTransport, QUEUE_SIZE>;
/// Serve mode's: deeper queues, for the switch's traffic.
type NetServe = VirtIONetRaw<DomHal, DomTransport, { netserve::QUEUE_SIZE }>;

/// A buffer the device owns while `token` is set; it does not move then
/// (the slot vectors never grow, and a `Vec`'s bytes stay where they are).
struct Slot {
    buf: Vec<u8>,
    /// The queue token and the bytes handed over, while in flight.
    out: Option<(u16, usize)>,
}

impl Slot {
    fn new(len: usize) -> Self {
        Slot {
            buf: vec![0; len],
            out: None,
        }
    }
}

#[derive(Default)]
struct Stats {
    transmitted: u32,
    tx_errors: u32,
    received: u32,
    /// Waits that ended with the device's port pending.
    interrupts: u64,
    /// Of those, how many found nothing new in either used ring.
    spurious: u64,
}

struct Driver {
    net: Net,
    port: u16,
    timer: u16,
    rx: Vec<Slot>,
    tx: Vec<Slot>,
    stats: Stats,
}

impl Driver {
    /// Blocks until the device's port is pending; a timeout is an error.
    fn wait_irq(&mut self) -> Result<(), &'static str> {
        device::wait_irq(self.port, self.timer)?;
        self.stats.interrupts += 1;
        Ok(())
    }

    /// Hands receive slot `i` to the device.
    fn post_rx(&mut self, i: usize) -> Result<(), &'static str> {
        let s = &mut self.rx[i];
        // SAFETY: slot `i`'s buffer is not touched (nor moved, nor freed)
        // until its token comes back through `poll_receive` and
        // `receive_complete` below.
        let token = unsafe { self.net.receive_begin(&mut s.buf) }
            .map_err(|_| "the receive queue refused a buffer")?;
        s.out = Some((token, s.buf.len()));
        Ok(())
    }

    /// Sends requests while the window and the free slots allow; returns
    /// how many went out.
    fn send(&mut self, x: &mut Exchange) -> Result<u32, &'static str> {
        let mut n = 0;
        while x.may_send() && self.net.can_send() {
            let Some(i) = self.tx.iter().position(|s| s.out.is_none()) else {
                break;
            };
            let s = &mut self.tx[i];
            let hdr = self
                .net
                .fill_buffer_header(&mut s.buf)
                .map_err(|_| "no room for the virtio-net header")?;
            x.next_request(&mut s.buf[hdr..])
                .map_err(|_| "the frame does not fit the buffer")?;
            let len = hdr + x.plan().size;
            // SAFETY: as for `post_rx`: the slot is left alone until
            // `poll_transmit` returns its token.
            let token = unsafe { self.net.transmit_begin(&s.buf[..len]) }
                .map_err(|_| "the transmit queue refused a frame")?;
            s.out = Some((token, len));
            n += 1;
        }
        Ok(n)
    }

    /// Takes every completed transmission; returns how many.
    fn reap_tx(&mut self) -> Result<u32, &'static str> {
        let mut n = 0;
        while let Some(token) = self.net.poll_transmit() {
            let i = self
                .tx
                .iter()
                .position(|s| s.out.is_some_and(|(t, _)| t == token))
                .ok_or("the device completed a transmission we did not make")?;
            let s = &mut self.tx[i];
            let len = s.out.take().map_or(0, |(_, l)| l);
            // SAFETY: the buffer of the `transmit_begin` that gave `token`.
            match unsafe { self.net.transmit_complete(token, &s.buf[..len]) } {
                Ok(_) => self.stats.transmitted += 1,
                Err(_) => self.stats.tx_errors += 1,
            }
            n += 1;
        }
        Ok(n)
    }

    /// Takes every received frame, judges it and posts its buffer again;
    /// returns how many.
    fn reap_rx(&mut self, x: &mut Exchange) -> Result<u32, &'static str> {
        let mut n = 0;
        while let Some(token) = self.net.poll_receive() {
            let i = self
                .rx
                .iter()
                .position(|s| s.out.is_some_and(|(t, _)| t == token))
                .ok_or("the device filled a receive buffer we did not post")?;
            let s = &mut self.rx[i];
            s.out = None;
            // SAFETY: the buffer of the `receive_begin` that gave `token`.
            let (hdr, len) = unsafe { self.net.receive_complete(token, &mut s.buf) }
                .map_err(|_| "a receive completion is shorter than its header")?;
            self.stats.received += 1;
            let frame = s
                .buf
                .get(hdr..hdr + len)
                .ok_or("a frame overran its buffer")?;
            if let Err(e) = x.on_frame(frame) {
                if x.bad() <= REPORT_BAD {
                    println!(
                        "net: frame {} ({len} bytes) is not a good reply: {e}",
                        self.stats.received
                    );
                }
            }
            self.post_rx(i)?;
            n += 1;
        }
        Ok(n)
    }

    /// Runs the exchange until every request is answered (or as many
    /// frames came back) and every transmission completed.
    fn exchange(&mut self, x: &mut Exchange) -> Result<(), &'static str> {
        loop {
            let sent = self.send(x)?;
            let done = self.reap_tx()? + self.reap_rx(x)?;
            let in_flight = self.tx.iter().any(|s| s.out.is_some());
            if x.finished() && !in_flight {
                return Ok(());
            }
            if sent + done == 0 {
                self.wait_irq()?;
                if self.net.poll_transmit().is_none() && self.net.poll_receive().is_none() {
                    self.stats.spurious += 1;
                }
            }
        }
    }
}

fn data_check(what: &str, bytes: u64, ok: bool) {
    let _ = event(&DataCheck { what, bytes, ok });
}

/// What the domain does, from its args.
enum Mode<'a> {
    /// Frames to and from the test peer.
    Frames(Plan),
    /// netback for the start info's vifs.
    Serve,
    /// A TCP role over the NIC itself.
    Tcp(TcpArgs<'a>),
}

fn mode(args: &str) -> Result<Mode<'_>, alloc::string::String> {
    if serve::is_serve(args) {
        Ok(Mode::Serve)
    } else if tcp_stream::is_tcp_role(args) {
        TcpArgs::parse(args).map(Mode::Tcp)
    } else {
        Plan::parse(args)
            .map(Mode::Frames)
            .map_err(|e| alloc::format!("{e}"))
    }
}

fn run(si: &libdom::StartInfo<'_>) -> i64 {
    let plan = match mode(si.args) {
        Ok(Mode::Frames(p)) => Some(p),
        Ok(Mode::Serve) => None,
        Ok(Mode::Tcp(t)) => return run_tcp(si, &t),
        Err(e) => {
            println!("net: args: {e}");
            return 1;
        }
    };
    let Some((f, transport)) = device::open(si, &KIND) else {
        return 1;
    };
    let Some(plan) = plan else {
        let Some((f, net)) = open_nic(si, f, transport, "serving") else {
            return 1;
        };
        return netserve::run(si, net, f.port, f.timer);
    };
    let net = match Net::new(transport) {
        Ok(n) => n,
        Err(e) => {
            println!("net: virtio-net init: {e:?}");
            return 1;
        }
    };
    let Some(init_us) = f.ready() else {
        return 1;
    };
    let port = f.port;
    let mac = net.mac_address();
    println!(
        "net: {} MAC {}, init {init_us} us, MSI-X vector {VECTOR} -> port {port}, DMA {:?}; \
         {} frames of {} bytes, window {}",
        f.info.bdf,
        ShowMac(mac),
        si.dma,
        plan.frames,
        plan.size,
        plan.window
    );
    let mut drv = Driver {
        net,
        port,
        timer: f.timer,
        rx: (0..RX_SLOTS).map(|_| Slot::new(RX_BUF)).collect(),
        tx: (0..TX_SLOTS).map(|_| Slot::new(TX_BUF)).collect(),
        stats: Stats::default(),
    };
    for i in 0..RX_SLOTS {
        if let Err(why) = drv.post_rx(i) {
            println!("net: {why}");
            return 1;
        }
    }
    let mut x = Exchange::new(plan, mac);
    let t1 = time_ns();
    let r = drv.exchange(&mut x);
    let ns = (time_ns() - t1).max(1);
    if let Err(why) = r {
        println!(
            "net: stopped after {} sent, {} answered, {} bad: {why}",
            x.sent(),
            x.good(),
            x.bad()
        );
    }
    if let Some((nth, e)) = x.first_bad() {
        println!("net: the first bad frame was the {nth}th received: {e}");
    }
    let s = &drv.stats;
    let tx_ok = r.is_ok() && s.transmitted == plan.frames && s.tx_errors == 0 && x.all_good();
    let rx_ok = r.is_ok() && x.all_good();
    data_check("net-tx", u64::from(s.transmitted) * plan.size as u64, tx_ok);
    data_check("net-rx", u64::from(x.good()) * plan.size as u64, rx_ok);
    println!(
        "net: {} sent, {} transmitted, {} received, {} answered, {} bad in {} us \
         ({} round trips/s, {} us each in a window of {}); {} interrupts, {} with nothing new",
        x.sent(),
        s.transmitted,
        s.received,
        x.good(),
        x.bad(),
        ns / 1000,
        u64::from(x.good()) * 1_000_000_000 / ns,
        ns / 1000 / u64::from(x.good().max(1)),
        plan.window,
        s.interrupts,
        s.spurious
    );
    i64::from(!(tx_ok && rx_ok))
}

/// The direct TCP mode: the device set up as for serve mode, then the
/// role over it (`driver_domains::nettcp`).
fn run_tcp(si: &libdom::StartInfo<'_>, args: &TcpArgs<'_>) -> i64 {
    let Some((f, transport)) = device::open(si, &KIND) else {
        return 1;
    };
    let Some((_, net)) = open_nic(si, f, transport, "TCP") else {
        return 1;
    };
    nettcp::run(si, args, net)
}

/// Serve mode's and the TCP mode's device: virtio-net with the NIC's
/// buffers ([`NetServe`]), up and said so (`what`: the mode).
fn open_nic(
    si: &libdom::StartInfo<'_>,
    f: device::Function,
    transport: DomTransport,
    what: &str,
) -> Option<(device::Function, NetServe)> {
    let net = NetServe::new(transport)
        .inspect_err(|e| println!("net: virtio-net init: {e:?}"))
        .ok()?;
    let init_us = f.ready()?;
    println!(
        "net: {} MAC {}, init {init_us} us, MSI-X vector {VECTOR} -> port {}, DMA {:?}; {what}",
        f.info.bdf,
        ShowMac(net.mac_address()),
        f.port,
        si.dma
    );
    Some((f, net))
}

libdom::entry!(run);
