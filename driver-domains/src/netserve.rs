//! The net driver domain's serve mode: netback for every vif the start info
//! says this domain serves, switched onto its one virtio-net.
//!
//! ```text
//!  frontend A ──TX/RX rings A──┐                                 ┌─ Vif A ─┐
//!  frontend B ──TX/RX rings B──┼─ wait(ports) ─ netback (switch) ┼─ Vif B ─┼─ Nic ─ VirtIONetRaw
//!  virtio-net MSI-X ───────────┘                                 └─ ...   ─┘  (TX/RX buffers)
//! ```
//!
//! One event loop, one thread: `wait` on every vif's port and the NIC's
//! MSI-X port. A vif port that fires before its rings are mapped maps them
//! (the frontend grants its TX and RX ring pages at the refs its start info
//! names, marks both Connected, then notifies); after that its TX ring is
//! drained through the switch: to another frontend's RX ring, or to the
//! NIC. The NIC's port takes every received frame through the switch to
//! the frontends, reposts the buffers, and collects finished
//! transmissions. An event goes to a frontend when a ring's producer rule
//! says so. The domain exits 0 once every frontend has closed (or its rings
//! could never be mapped).
//!
//! The NIC side ([`crate::nic::Nic`]) keeps `rx` receive buffers posted at
//! all times (a frame taken is switched from its buffer, which is posted
//! again at once) and copies each outgoing frame into one of its own
//! transmit buffers, so a frontend's TX slot is answered as soon as its
//! frame is switched, whatever the NIC does with it.
//!
//! At the end each vif's counters are printed and reported as `work_done`
//! events named [`counter_work`]: `netback-<domid>-<counter>`.
//!
//! Everything that needs no hypervisor ([`ServeArgs`], [`served`],
//! [`counter_work`]) is tested on the host.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use abi::domain::{VifInfo, VifRole};
use libdom::args::ArgError;
use libdom::Args;

/// The keys serve mode takes.
pub const KEYS: &[&str] = &["serve", "rx", "tx", "path"];
/// Receive buffers kept posted on the NIC unless `rx` says otherwise.
pub const DEFAULT_RX: usize = 64;
/// Transmit buffers unless `tx` says otherwise.
pub const DEFAULT_TX: usize = 64;
/// Most buffers either way: the virtqueues have [`QUEUE_SIZE`] descriptors.
pub const QUEUE_SIZE: usize = 128;

/// Bounce pages per vif on the grant-copy path (netback's advice: bigger
/// batches of copies).
pub const BOUNCE_PAGES: usize = 32;

/// Serve mode's options, from the args:
/// `serve=1 [rx=N] [tx=N] [path=copy|map]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeArgs {
    /// Receive buffers posted on the NIC.
    pub rx: usize,
    /// Transmit buffers (frames on their way to the NIC at once).
    pub tx: usize,
    /// How frames move between the frontends' pages and netback: grant
    /// copy (default) or grant map per slot.
    pub map: bool,
}

/// Why serve mode's args were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeArgError<'a> {
    Args(ArgError<'a>),
    Buffers(&'static str, u64),
    Path,
}

impl fmt::Display for ServeArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeArgError::Args(e) => e.fmt(f),
            ServeArgError::Buffers(k, n) => write!(f, "{k}={n}: expected 1..={QUEUE_SIZE}"),
            ServeArgError::Path => f.write_str("path: expected copy or map"),
        }
    }
}

impl ServeArgs {
    pub fn parse(s: &str) -> Result<Self, ServeArgError<'_>> {
        let args = Args::parse(s).map_err(ServeArgError::Args)?;
        args.only(KEYS).map_err(ServeArgError::Args)?;
        let n = |k: &'static str, d: usize| {
            let v = args.u64_or(k, d as u64).map_err(ServeArgError::Args)?;
            if !(1..=QUEUE_SIZE as u64).contains(&v) {
                return Err(ServeArgError::Buffers(k, v));
            }
            Ok(v as usize)
        };
        let rx = n("rx", DEFAULT_RX)?;
        let tx = n("tx", DEFAULT_TX)?;
        let map = match args.get("path") {
            None | Some("copy") => false,
            Some("map") => true,
            Some(_) => return Err(ServeArgError::Path),
        };
        Ok(ServeArgs { rx, tx, map })
    }
}

/// The vifs of the start info this domain serves.
pub fn served<'a>(vifs: &[Option<VifInfo<'a>>]) -> Vec<VifInfo<'a>> {
    vifs.iter()
        .flatten()
        .filter(|v| v.role == VifRole::Back)
        .copied()
        .collect()
}

/// The `work_done` name of a vif's counter: `netback-<domid>-<counter>`
/// (`domid` is the frontend's).
pub fn counter_work(domid: u16, counter: &str) -> String {
    format!("netback-{domid}-{counter}")
}

pub use crate::nic::Nic;
/// The domain's side: grants over the hypercalls, the loop.
pub use domain::run;

mod domain {
    use alloc::format;
    use alloc::vec::Vec;
    use core::alloc::Layout;

    use abi::domain::VifInfo;
    use abi::ev::{DataCheck, WorkDone};
    use abi::grant::{CopyOp, Status as GrantStatus};
    use abi::hypercall::PORT_WORDS;
    use libdom::netfront::{read_shared, write_shared};
    use libdom::ports::Pending;
    use libdom::ring::SharedPage;
    use libdom::{event, evtchn_send, grant, println, set_timer, time_ns, wait};
    use netback::{Conn, DataPath, Grants, Mapping, Netback, Reason, VifConfig};
    use virtio_drivers::device::net::VirtIONetRaw;
    use virtio_drivers::transport::Transport;
    use virtio_drivers::Hal;

    use super::{counter_work, served, ServeArgs, BOUNCE_PAGES, QUEUE_SIZE};
    use crate::nic::Nic;
    use crate::serve::Window;

    /// Without an event, look at the NIC and the rings at least this often
    /// (a lost interrupt is a delay, not a hang).
    const SAFETY_POLL_NS: u64 = 50_000_000;

    /// [`Grants`] over the grant hypercalls, mapping into the grant window
    /// (for the CPU only: nothing of a frontend's is handed to the NIC).
    #[derive(Default)]
    struct NetGrants {
        window: Window,
        calls: u64,
    }

    impl Grants for NetGrants {
        fn map(&mut self, dom: u16, gref: u32, readonly: bool) -> Result<Mapping, GrantStatus> {
            self.calls += 1;
            let (handle, addr) = self.window.map_grant(dom, gref, readonly, false)?;
            Ok(Mapping { handle, addr })
        }

        fn unmap(&mut self, m: Mapping) -> Result<(), GrantStatus> {
            self.calls += 1;
            self.window.unmap_grant(m.handle, m.addr)
        }

        fn copy(&mut self, ops: &mut [CopyOp]) -> Result<(), GrantStatus> {
            self.calls += 1;
            match grant::copy(ops) {
                Ok(n) if n == ops.len() => Ok(()),
                _ => Err(GrantStatus::General),
            }
        }

        fn read(&self, addr: u64, buf: &mut [u8]) {
            // SAFETY: netback reads only within one page it mapped through
            // `map` and has not unmapped, one of its bounce pages, or a NIC
            // buffer the NIC lent it or it holds (its contract: the arenas
            // in `crate::nic` never move); volatile, because a frontend may
            // write its mapped page at any time.
            unsafe { read_shared(addr as *const u8, buf) };
        }

        fn write(&mut self, addr: u64, buf: &[u8]) {
            // SAFETY: as for `read`, within a writable mapping, a bounce
            // page or a lent NIC buffer, which nothing of ours references.
            unsafe { write_shared(addr as *mut u8, buf) };
        }
    }

    /// A page-aligned page of the heap, never freed (bounce pages live as
    /// long as the domain).
    fn heap_page() -> Option<u64> {
        let layout = Layout::from_size_align(4096, 4096).ok()?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        (!p.is_null()).then_some(p as u64)
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Phase {
        /// The rings are not mapped yet (not granted yet).
        Unmapped,
        Serving,
        Closed,
        /// A ring could not be mapped.
        Refused(GrantStatus),
    }

    /// A frontend's two ring pages, mapped.
    struct Rings {
        tx: SharedPage,
        tx_map: Mapping,
        rx: SharedPage,
        rx_map: Mapping,
    }

    struct Frontend<'a> {
        vif: VifInfo<'a>,
        rings: Option<Rings>,
        phase: Phase,
        connected_ns: u64,
        closed_ns: u64,
        polls: u64,
        notifies: u64,
    }

    impl Frontend<'_> {
        fn ended(&self) -> bool {
            matches!(self.phase, Phase::Closed | Phase::Refused(_))
        }
    }

    #[derive(Default)]
    struct LoopStats {
        waits: u64,
        nic_wakes: u64,
        /// NIC wakes that found nothing.
        spurious: u64,
        /// Frames found by the safety poll, not an interrupt.
        late: u64,
    }

    struct Server<'a, H: Hal, T: Transport> {
        nb: Netback,
        nic: Nic<H, T>,
        grants: NetGrants,
        fronts: Vec<Frontend<'a>>,
        stats: LoopStats,
    }

    impl<H: Hal, T: Transport> Server<'_, H, T> {
        /// Maps frontend `i`'s rings if both are granted now.
        fn attach(&mut self, i: usize) {
            let f = &mut self.fronts[i];
            if f.phase != Phase::Unmapped {
                return;
            }
            let (dom, tg, rg) = (f.vif.peer, f.vif.tx_ring_gref, f.vif.rx_ring_gref);
            let tx = match self.grants.map(dom, tg, false) {
                Ok(m) => m,
                // Not granted yet: the frontend notifies once it is.
                Err(GrantStatus::BadGntref) => return,
                Err(s) => {
                    println!(
                        "netback: {} of domain {dom}: mapping its TX ring: {}; not serving it",
                        f.vif.name,
                        s.name()
                    );
                    f.phase = Phase::Refused(s);
                    return;
                }
            };
            let rx = match self.grants.map(dom, rg, false) {
                Ok(m) => m,
                Err(s) => {
                    let _ = self.grants.unmap(tx);
                    if s != GrantStatus::BadGntref {
                        println!(
                            "netback: {} of domain {dom}: mapping its RX ring: {}; not serving it",
                            f.vif.name,
                            s.name()
                        );
                        f.phase = Phase::Refused(s);
                    }
                    return;
                }
            };
            // SAFETY: pages of the grant window the hypervisor just mapped
            // read-write for us; they are unmapped only after the
            // `SharedPage`s are dropped (`act`, on Closed), and nothing else
            // of ours touches them.
            let (txp, rxp) = unsafe { (SharedPage::new(tx.addr), SharedPage::new(rx.addr)) };
            f.rings = Some(Rings {
                tx: txp,
                tx_map: tx,
                rx: rxp,
                rx_map: rx,
            });
            f.phase = Phase::Serving;
        }

        /// Vif `i`'s port fired (or it may have work): map its rings if need
        /// be, then poll it, and every vif its frames went to, until none
        /// has more.
        fn serve(&mut self, first: usize) {
            let mut todo: u64 = 1 << first;
            while todo != 0 {
                let i = todo.trailing_zeros() as usize;
                todo &= !(1 << i);
                if i >= self.fronts.len() {
                    continue;
                }
                self.attach(i);
                let f = &mut self.fronts[i];
                let Some(r) = f.rings.as_mut() else {
                    continue;
                };
                f.polls += 1;
                let p = self
                    .nb
                    .poll(i, &mut r.tx, &mut r.rx, &mut self.grants, &mut self.nic);
                todo |= p.wake;
                if p.more {
                    todo |= 1 << i;
                }
                self.act(i, p);
            }
            self.give_back();
        }

        /// What a netback call asks of the domain.
        fn act(&mut self, i: usize, p: netback::Poll) {
            let f = &mut self.fronts[i];
            let (name, dom) = (f.vif.name, f.vif.peer);
            if p.connected {
                f.connected_ns = time_ns();
                let m = f.vif.mac;
                let ip = f.vif.ip;
                println!(
                    "netback: {name} of domain {dom} connected: MAC {}, IPv4 {}.{}.{}.{}",
                    crate::netframe::ShowMac(m),
                    ip[0],
                    ip[1],
                    ip[2],
                    ip[3]
                );
            }
            if p.hostile {
                let why = self
                    .nb
                    .vif(i)
                    .and_then(|v| v.hostile())
                    .map_or_else(|| "?".into(), |h| format!("{h:?}"));
                println!("netback: {name} of domain {dom} is hostile ({why}): closed it");
                let _ = event(&DataCheck {
                    what: "netback-hostile",
                    bytes: 0,
                    ok: true,
                });
            }
            if p.notify {
                f.notifies += 1;
                // A frontend that is gone has no port to signal.
                let _ = evtchn_send(f.vif.port);
            }
            if p.closed {
                f.closed_ns = time_ns();
                if let Some(r) = f.rings.take() {
                    // The pages go (with `r`) before their mappings do.
                    let maps = [r.tx_map, r.rx_map];
                    let _ = (r.tx, r.rx);
                    for m in maps {
                        if let Err(s) = self.grants.unmap(m) {
                            println!("netback: {name}: unmapping a ring: {}", s.name());
                        }
                    }
                }
                f.phase = Phase::Closed;
                println!("netback: {name} of domain {dom} closed");
            }
        }

        /// Takes what the NIC has: finished transmissions, received frames
        /// (switched to the vifs, which are then polled). Returns the frames.
        ///
        /// Frames are taken in rounds of at most netback's per-vif hold
        /// limit ([`netback::Config::held_per_vif`]), the vifs they went to
        /// polled after each: a frontend that keeps RX requests posted gets
        /// every frame copied straight from its NIC buffer, which comes back
        /// in the same round; only a frontend that falls behind reaches the
        /// limit and has frames copied into netback's memory first.
        fn nic(&mut self) -> usize {
            self.nic.reap_tx();
            let round = self.nb.config().held_per_vif().max(1);
            let mut n = 0;
            loop {
                let nb = &mut self.nb;
                let mut wake = 0u64;
                let got = self.nic.recv(round, |f, at| {
                    let r = nb.nic_input_held(f, at);
                    wake |= r.wake;
                    r.held
                });
                n += got;
                while wake != 0 {
                    let i = wake.trailing_zeros() as usize;
                    wake &= !(1 << i);
                    self.serve(i);
                }
                self.give_back();
                if got < round {
                    return n;
                }
            }
        }

        /// Posts again the receive buffers netback has copied out (or
        /// dropped).
        fn give_back(&mut self) {
            while let Some(id) = self.nb.take_nic_done() {
                self.nic.rx_done(id);
            }
        }

        fn all_ended(&self) -> bool {
            self.fronts.iter().all(Frontend::ended)
        }
    }

    fn report(f: &Frontend<'_>, v: Option<&netback::Vif>) {
        let Some(v) = v else { return };
        let s = v.stats();
        let phase = match f.phase {
            Phase::Closed => "closed",
            Phase::Refused(st) => st.name(),
            Phase::Serving => "serving",
            Phase::Unmapped => "never connected",
        };
        let ns = f.closed_ns.saturating_sub(f.connected_ns).max(1);
        println!(
            "netback: {} of domain {} ({phase}{}): TX {} frames {} bytes ({} slots), RX {} frames {} bytes ({} slots) in {} ms ({} KB/s each way at most); {} copies, {} maps, {} unmaps ({} failed); {} polls, {} notifies",
            f.vif.name,
            f.vif.peer,
            if f.phase == Phase::Serving && v.conn() == Conn::Connected {
                ", still connected"
            } else {
                ""
            },
            s.tx_frames,
            s.tx_bytes,
            s.tx_slots,
            s.rx_frames,
            s.rx_bytes,
            s.rx_slots,
            ns / 1_000_000,
            s.tx_bytes.max(s.rx_bytes).saturating_mul(1_000_000) / ns,
            s.copies,
            s.maps,
            s.unmaps,
            s.unmap_failures,
            f.polls,
            f.notifies
        );
        let mut drops = alloc::string::String::new();
        for r in Reason::ALL {
            if s.drops(r) > 0 {
                drops.push_str(&format!(" {}={}", r.name(), s.drops(r)));
            }
        }
        println!(
            "netback: {}: {} drops{drops}; {} hostile",
            f.vif.name,
            s.total_drops(),
            s.hostile
        );
        let dom = f.vif.peer;
        let put = |counter: &str, units: u64| {
            let _ = event(&WorkDone {
                work: &counter_work(dom, counter),
                units,
            });
        };
        put("tx-frames", s.tx_frames);
        put("tx-bytes", s.tx_bytes);
        put("rx-frames", s.rx_frames);
        put("rx-bytes", s.rx_bytes);
        put("drops", s.total_drops());
        put("hostile", s.hostile);
        // The sender checks always, so a scenario can ask for 0; the other
        // reasons when they happened.
        for r in Reason::ALL {
            if matches!(r, Reason::SpoofMac | Reason::SpoofIp) || s.drops(r) > 0 {
                put(r.name(), s.drops(r));
            }
        }
    }

    /// Serves every vif of `si` with role Back on `net`, whose interrupts
    /// raise `dev_port`; `timer` is the domain's timer VIRQ port. Returns
    /// the exit status: 0 once every frontend has closed (or could never be
    /// reached), 1 on bad args or a NIC that cannot be set up.
    pub fn run<H: Hal, T: Transport>(
        si: &libdom::StartInfo<'_>,
        net: VirtIONetRaw<H, T, QUEUE_SIZE>,
        dev_port: u16,
        timer: u16,
    ) -> i64 {
        let args = match ServeArgs::parse(si.args) {
            Ok(a) => a,
            Err(e) => {
                println!("netback: args: {e}");
                return 1;
            }
        };
        let vifs = served(&si.vifs);
        if vifs.is_empty() {
            println!("netback: serve=1, but the start info names no vif this domain serves");
            return 1;
        }
        let cfg = netback::Config {
            rx_queue: 256,
            // netback holds at most a quarter of these for stalled vifs
            nic_rx: args.rx,
            ..netback::Config::default()
        };
        let mut nb = match Netback::new(cfg) {
            Ok(n) => n,
            Err(e) => {
                println!("netback: {e}");
                return 1;
            }
        };
        let mut fronts = Vec::new();
        for v in &vifs {
            let path = if args.map {
                DataPath::Map
            } else {
                let pages: Option<Vec<u64>> = (0..BOUNCE_PAGES).map(|_| heap_page()).collect();
                let Some(bounce) = pages else {
                    println!("netback: {}: no memory for bounce pages", v.name);
                    return 1;
                };
                DataPath::Copy { bounce }
            };
            match nb.add_vif(VifConfig::from_info(v, path)) {
                Ok(id) if id == fronts.len() => {}
                Ok(_) => {
                    println!("netback: {}: vif numbering is off", v.name);
                    return 1;
                }
                Err(e) => {
                    println!("netback: {}: {e}", v.name);
                    return 1;
                }
            }
            fronts.push(Frontend {
                vif: *v,
                rings: None,
                phase: Phase::Unmapped,
                connected_ns: 0,
                closed_ns: 0,
                polls: 0,
                notifies: 0,
            });
        }
        let nic = match Nic::new(net, args.rx, args.tx) {
            Ok(n) => n,
            Err(e) => {
                println!("netback: posting receive buffers: {e:?}");
                return 1;
            }
        };
        println!(
            "netback: serving {} vifs by grant {} on NIC {} ({} receive buffers posted, {} transmit buffers)",
            fronts.len(),
            if args.map { "map" } else { "copy" },
            crate::netframe::ShowMac(nic.mac()),
            nic.rx_posted(),
            args.tx
        );
        let mut srv = Server {
            nb,
            nic,
            grants: NetGrants::default(),
            fronts,
            stats: LoopStats::default(),
        };
        let t0 = time_ns();
        for i in 0..srv.fronts.len() {
            srv.serve(i);
        }
        let mut armed = false;
        while !srv.all_ended() {
            if !armed {
                let _ = set_timer(time_ns() + SAFETY_POLL_NS);
                armed = true;
            }
            let mut words = [0u64; PORT_WORDS];
            if let Err(e) = wait(&mut words, 0) {
                println!("netback: wait: {}", e.name());
                return 1;
            }
            srv.stats.waits += 1;
            let p = Pending(words);
            if p.contains(dev_port) {
                srv.stats.nic_wakes += 1;
                if srv.nic() == 0 {
                    srv.stats.spurious += 1;
                }
            }
            for i in 0..srv.fronts.len() {
                if p.contains(srv.fronts[i].vif.port) {
                    srv.serve(i);
                }
            }
            if p.contains(timer) {
                armed = false;
                if !p.contains(dev_port) {
                    srv.stats.late += srv.nic() as u64;
                }
                // Anything a lost event left behind.
                for i in 0..srv.fronts.len() {
                    if !srv.fronts[i].ended() {
                        srv.serve(i);
                    }
                }
            }
        }
        let _ = set_timer(0);
        let ns = time_ns() - t0;
        for (i, f) in srv.fronts.iter().enumerate() {
            report(f, srv.nb.vif(i));
        }
        let n = srv.nb.nic_stats();
        let d = &srv.nic.stats;
        let l = &srv.stats;
        let mut drops = alloc::string::String::new();
        for r in Reason::ALL {
            if n.drops(r) > 0 {
                drops.push_str(&format!(" {}={}", r.name(), n.drops(r)));
            }
        }
        println!(
            "netback: NIC: RX {} frames {} bytes, TX {} frames {} bytes ({} busy, {} errors, {} receive errors); switch drops from the NIC{}{}; {} waits, {} NIC wakes ({} with nothing new), {} frames found without an interrupt; {} grant calls; {} ms",
            d.rx_frames,
            d.rx_bytes,
            d.tx_frames,
            d.tx_bytes,
            d.tx_busy,
            d.tx_errors,
            d.rx_errors,
            if drops.is_empty() { " none" } else { ":" },
            drops,
            l.waits,
            l.nic_wakes,
            l.spurious,
            l.late,
            srv.grants.calls,
            ns / 1_000_000
        );
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args() {
        assert_eq!(
            ServeArgs::parse("serve=1").unwrap(),
            ServeArgs {
                rx: DEFAULT_RX,
                tx: DEFAULT_TX,
                map: false
            }
        );
        assert_eq!(
            ServeArgs::parse("serve=1 rx=128 tx=8 path=map").unwrap(),
            ServeArgs {
                rx: 128,
                tx: 8,
                map: true
            }
        );
        assert_eq!(
            ServeArgs::parse("serve=1 path=dma"),
            Err(ServeArgError::Path)
        );
        assert_eq!(
            ServeArgs::parse("serve=1 rx=0"),
            Err(ServeArgError::Buffers("rx", 0))
        );
        assert!(ServeArgs::parse("serve=1 tx=129")
            .unwrap_err()
            .to_string()
            .contains("expected 1..=128"));
        assert!(ServeArgs::parse("serve=1 frames=3").is_err());
    }

    #[test]
    fn only_back_vifs_are_served() {
        let v = |role, peer| VifInfo {
            name: "eth0",
            role,
            peer,
            port: 3,
            tx_ring_gref: 8,
            rx_ring_gref: 9,
            mac: [2, 0, 0, 0, 0, 1],
            ip: [10, 0, 2, 15],
        };
        let vifs = [Some(v(VifRole::Back, 2)), Some(v(VifRole::Front, 3)), None];
        let s = served(&vifs);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].peer, 2);
        assert_eq!(counter_work(2, "spoof-mac"), "netback-2-spoof-mac");
    }
}
