//! Event channels, with Xen's semantics.
//!
//! Every domain has a table of [`NR_PORTS`] ports (port 0 is never valid)
//! and one pending bit per port. A port is in one of four states, and
//! moves between them so:
//!
//! ```text
//!   port of d         event                                   becomes
//!   ───────────────   ─────────────────────────────────────   ─────────────────────────────────
//!   Free              d: alloc_unbound(r)                     Unbound { remote: r }
//!   Free              d: bind_interdomain(r, rp)              Interdomain { r, rp }
//!   Free              bind_interdomain_at_build(d, r)         Interdomain { r, rp }
//!   Free              d: bind_virq(v)                         Virq(v)
//!   Unbound { r }     r: bind_interdomain(d, this port)       Interdomain { r, r's new port }
//!   Interdomain       d: close                                Free (the peer's end: Unbound { d })
//!   Interdomain       the peer closes, or is destroyed        Unbound { remote: peer }
//!   Unbound, Virq     d: close                                Free
//!   any               d is destroyed                          (the table is gone)
//! ```
//!
//! `send` on an interdomain port sets the pending bit of the peer's port and
//! names the peer to wake; `raise_virq` sets the pending bit of the port a
//! domain bound to that VIRQ. `take_pending` hands a domain its pending set
//! as the bitmap `wait` writes and clears it.
//!
//! Ports and VIRQ numbers from ring 3 are taken as `u32`s and checked here
//! (the caller turns a register value that does not fit into the same
//! error: [`Error::BadPort`] for a port, [`Error::Invalid`] for a VIRQ); a
//! remote domain id is a `u16` (a register value above `u16::MAX` names no
//! domain: [`Error::BadDomain`]). Every answer is the error `abi::hypercall`
//! gives ("Which error, when"). The caller's own id `d` comes from the
//! hypervisor; an unknown one is answered with [`Error::BadDomain`] all the
//! same.
//!
//! Domain ids are not reused: a port of another domain left `Unbound`
//! with a destroyed domain as its remote stays so until its owner closes it.

use crate::{DomId, MAX_DOMAINS};
use abi::hypercall::{virq, Error, NR_PORTS, PORT_WORDS};
use alloc::boxed::Box;
use alloc::vec::Vec;

/// A port number, 1 to `NR_PORTS - 1`.
pub type Port = u16;

/// How many VIRQs there are.
const VIRQS: usize = virq::COUNT as usize;

// Port numbers and VIRQ numbers fit the `u16`s that hold them.
const _: () = assert!(NR_PORTS <= 1 << 16 && VIRQS <= 1 << 16);

/// What a port is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortState {
    /// Not allocated.
    Free,
    /// Allocated and offered to `remote`, which may bind to it.
    Unbound {
        /// The only domain that may bind to the port.
        remote: DomId,
    },
    /// Connected to `remote_port` of `remote`.
    Interdomain {
        /// The peer domain.
        remote: DomId,
        /// The peer's end of the channel.
        remote_port: Port,
    },
    /// Bound to a virtual interrupt (`abi::hypercall::virq`).
    Virq(u16),
}

/// One domain's ports.
#[derive(Clone, Debug)]
struct Table {
    ports: [PortState; NR_PORTS],
    pending: [u64; PORT_WORDS],
    /// The port bound to each VIRQ, or 0.
    virq_port: [Port; VIRQS],
}

impl Table {
    fn new() -> Self {
        Table {
            ports: [PortState::Free; NR_PORTS],
            pending: [0; PORT_WORDS],
            virq_port: [0; VIRQS],
        }
    }

    /// The lowest free port.
    fn free_port(&self) -> Result<Port, Error> {
        (1..NR_PORTS)
            .find(|&p| self.ports[p] == PortState::Free)
            .and_then(|p| Port::try_from(p).ok())
            .ok_or(Error::NoSpace)
    }

    fn set_pending(&mut self, port: Port) {
        let p = usize::from(port);
        if let Some(w) = self.pending.get_mut(p / 64) {
            *w |= 1 << (p % 64);
        }
    }

    fn clear_pending(&mut self, port: Port) {
        let p = usize::from(port);
        if let Some(w) = self.pending.get_mut(p / 64) {
            *w &= !(1 << (p % 64));
        }
    }

    /// The state of `port`, if it is in range.
    fn get(&self, port: Port) -> Option<PortState> {
        self.ports.get(usize::from(port)).copied()
    }

    fn set(&mut self, port: Port, state: PortState) {
        if let Some(s) = self.ports.get_mut(usize::from(port)) {
            *s = state;
        }
    }
}

/// A port number from ring 3, checked for range: 0 and `>= NR_PORTS` are
/// [`Error::BadPort`].
fn port_arg(port: u32) -> Result<Port, Error> {
    match Port::try_from(port) {
        Ok(p) if p != 0 && usize::from(p) < NR_PORTS => Ok(p),
        _ => Err(Error::BadPort),
    }
}

/// The event channels of every domain.
#[derive(Debug, Default)]
pub struct EventChannels {
    doms: Vec<Option<Box<Table>>>,
}

impl EventChannels {
    /// No domains yet.
    pub const fn new() -> Self {
        EventChannels { doms: Vec::new() }
    }

    /// Gives domain `d` an empty port table. [`Error::BadDomain`] if `d`
    /// is `MAX_DOMAINS` or more or already has one.
    pub fn add_domain(&mut self, d: DomId) -> Result<(), Error> {
        let i = usize::from(d);
        if i >= MAX_DOMAINS {
            return Err(Error::BadDomain);
        }
        if self.doms.len() <= i {
            self.doms.resize_with(i + 1, || None);
        }
        match &mut self.doms[i] {
            Some(_) => Err(Error::BadDomain),
            slot => {
                *slot = Some(Box::new(Table::new()));
                Ok(())
            }
        }
    }

    /// Whether domain `d` has a port table.
    pub fn contains(&self, d: DomId) -> bool {
        self.table(d).is_some()
    }

    /// `evtchn_alloc_unbound`: a new port of `d`, offered to `remote`.
    pub fn alloc_unbound(&mut self, d: DomId, remote: DomId) -> Result<Port, Error> {
        let remote = self.other_domain(d, remote)?;
        let t = self.table_mut(d)?;
        let port = t.free_port()?;
        t.set(port, PortState::Unbound { remote });
        Ok(port)
    }

    /// `evtchn_bind_interdomain`: connects a new port of `d` to
    /// `remote_port` of `remote`, which must be unbound and offered to `d`.
    pub fn bind_interdomain(
        &mut self,
        d: DomId,
        remote: DomId,
        remote_port: u32,
    ) -> Result<Port, Error> {
        let remote = self.other_domain(d, remote)?;
        let remote_port = port_arg(remote_port)?;
        let offered = self.table(remote).and_then(|t| t.get(remote_port));
        if offered != Some(PortState::Unbound { remote: d }) {
            return Err(Error::PortState);
        }
        let local = self.table_mut(d)?;
        let port = local.free_port()?;
        local.set(
            port,
            PortState::Interdomain {
                remote,
                remote_port,
            },
        );
        self.table_mut(remote)?.set(
            remote_port,
            PortState::Interdomain {
                remote: d,
                remote_port: port,
            },
        );
        Ok(port)
    }

    /// Connects a new port of `a` to a new port of `b`, for a channel the
    /// manifest declares; returns `(port of a, port of b)`.
    pub fn bind_interdomain_at_build(&mut self, a: DomId, b: DomId) -> Result<(Port, Port), Error> {
        if a == b {
            return Err(Error::BadDomain);
        }
        let pa = self.table(a).ok_or(Error::BadDomain)?.free_port();
        let pb = self.table(b).ok_or(Error::BadDomain)?.free_port();
        let (pa, pb) = (pa?, pb?);
        self.table_mut(a)?.set(
            pa,
            PortState::Interdomain {
                remote: b,
                remote_port: pb,
            },
        );
        self.table_mut(b)?.set(
            pb,
            PortState::Interdomain {
                remote: a,
                remote_port: pa,
            },
        );
        Ok((pa, pb))
    }

    /// `evtchn_bind_virq`: a new port of `d` bound to `virq`. A domain binds
    /// each VIRQ at most once: a second bind is [`Error::PortState`].
    pub fn bind_virq(&mut self, d: DomId, virq: u32) -> Result<Port, Error> {
        let v = usize::try_from(virq)
            .ok()
            .filter(|&v| v < VIRQS)
            .ok_or(Error::Invalid)?;
        let t = self.table_mut(d)?;
        if t.virq_port[v] != 0 {
            return Err(Error::PortState);
        }
        let port = t.free_port()?;
        // `v < VIRQS`, which is small.
        t.set(port, PortState::Virq(v as u16));
        t.virq_port[v] = port;
        Ok(port)
    }

    /// `evtchn_send`: marks the peer's end of `port` pending and returns
    /// the peer, which the caller wakes if it waits.
    pub fn send(&mut self, d: DomId, port: u32) -> Result<DomId, Error> {
        let port = port_arg(port)?;
        let state = self.table(d).ok_or(Error::BadDomain)?.get(port);
        match state {
            Some(PortState::Interdomain {
                remote,
                remote_port,
            }) => {
                // A missing peer would break the invariant that both ends
                // of a channel point at each other; refuse rather than panic.
                let peer = self.table_mut(remote).map_err(|_| Error::PortState)?;
                peer.set_pending(remote_port);
                Ok(remote)
            }
            Some(PortState::Unbound { .. } | PortState::Virq(_)) => Err(Error::PortState),
            Some(PortState::Free) | None => Err(Error::BadPort),
        }
    }

    /// Marks the port `d` bound to `virq` pending. `false` if `d` bound no
    /// port to it (or there is no such domain or VIRQ): nobody to wake.
    pub fn raise_virq(&mut self, d: DomId, virq: u32) -> bool {
        let Ok(t) = self.table_mut(d) else {
            return false;
        };
        let port = usize::try_from(virq)
            .ok()
            .and_then(|v| t.virq_port.get(v).copied())
            .unwrap_or(0);
        if port == 0 {
            return false;
        }
        t.set_pending(port);
        true
    }

    /// `evtchn_close`: frees `port` of `d` and clears its pending bit. The
    /// peer's end of an interdomain channel goes back to unbound, offered to
    /// `d`.
    pub fn close(&mut self, d: DomId, port: u32) -> Result<(), Error> {
        let port = port_arg(port)?;
        let t = self.table_mut(d)?;
        let state = t.get(port).ok_or(Error::BadPort)?;
        if state == PortState::Free {
            return Err(Error::BadPort);
        }
        if let PortState::Virq(v) = state {
            if let Some(slot) = t.virq_port.get_mut(usize::from(v)) {
                *slot = 0;
            }
        }
        t.set(port, PortState::Free);
        t.clear_pending(port);
        if let PortState::Interdomain {
            remote,
            remote_port,
        } = state
        {
            self.unbind_peer(d, port, remote, remote_port);
        }
        Ok(())
    }

    /// Copies `d`'s pending set into `out` and clears it; returns how many
    /// ports were pending. An unknown domain has none.
    pub fn take_pending(&mut self, d: DomId, out: &mut [u64; PORT_WORDS]) -> u32 {
        match self.table_mut(d) {
            Ok(t) => {
                *out = t.pending;
                t.pending = [0; PORT_WORDS];
                out.iter().map(|w| w.count_ones()).sum()
            }
            Err(_) => {
                *out = [0; PORT_WORDS];
                0
            }
        }
    }

    /// Whether any of `d`'s ports is pending.
    pub fn has_pending(&self, d: DomId) -> bool {
        self.table(d)
            .is_some_and(|t| t.pending.iter().any(|&w| w != 0))
    }

    /// Closes every port of `d` and forgets the domain; returns the peers
    /// whose ports went back to unbound (each once, lowest id first).
    pub fn destroy_domain(&mut self, d: DomId) -> Vec<DomId> {
        let Some(t) = self.doms.get_mut(usize::from(d)).and_then(Option::take) else {
            return Vec::new();
        };
        let mut peers = Vec::new();
        for (port, state) in t.ports.iter().enumerate() {
            if let PortState::Interdomain {
                remote,
                remote_port,
            } = *state
            {
                // `port < NR_PORTS`, which fits a `Port`.
                self.unbind_peer(d, port as Port, remote, remote_port);
                peers.push(remote);
            }
        }
        peers.sort_unstable();
        peers.dedup();
        peers
    }

    /// The state of `port` of `d` (`None` for no such domain or port).
    pub fn state(&self, d: DomId, port: u32) -> Option<PortState> {
        let port = port_arg(port).ok()?;
        self.table(d)?.get(port)
    }

    /// How many of `d`'s ports are allocated.
    pub fn ports_in_use(&self, d: DomId) -> usize {
        self.table(d).map_or(0, |t| {
            t.ports.iter().filter(|s| **s != PortState::Free).count()
        })
    }

    /// The peer's end of the channel `d` had on `port`: unbound, offered
    /// back to `d`. Only an end that points back at `(d, port)` changes.
    fn unbind_peer(&mut self, d: DomId, port: Port, remote: DomId, remote_port: Port) {
        if let Ok(peer) = self.table_mut(remote) {
            let end = PortState::Interdomain {
                remote: d,
                remote_port: port,
            };
            if peer.get(remote_port) == Some(end) {
                peer.set(remote_port, PortState::Unbound { remote: d });
            }
        }
    }

    /// `remote`, if it is a domain other than `d` and both have tables.
    fn other_domain(&self, d: DomId, remote: DomId) -> Result<DomId, Error> {
        if remote == d || !self.contains(remote) || !self.contains(d) {
            return Err(Error::BadDomain);
        }
        Ok(remote)
    }

    fn table(&self, d: DomId) -> Option<&Table> {
        self.doms.get(usize::from(d))?.as_deref()
    }

    fn table_mut(&mut self, d: DomId) -> Result<&mut Table, Error> {
        self.doms
            .get_mut(usize::from(d))
            .and_then(|t| t.as_deref_mut())
            .ok_or(Error::BadDomain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    const TIMER: u32 = virq::TIMER as u32;
    const VIRQ_COUNT: u32 = virq::COUNT as u32;
    const A: DomId = 1;
    const B: DomId = 2;
    const C: DomId = 3;

    fn three() -> EventChannels {
        let mut ev = EventChannels::new();
        for d in [A, B, C] {
            ev.add_domain(d).unwrap();
        }
        ev
    }

    /// Both ends of every channel point at each other, the VIRQ map and
    /// the ports agree, and only allocated ports are pending.
    fn check_invariants(ev: &EventChannels) {
        for (d, t) in ev.doms.iter().enumerate() {
            let Some(t) = t else { continue };
            let d = d as DomId;
            assert_eq!(t.ports[0], PortState::Free, "port 0 of {d} in use");
            for (p, s) in t.ports.iter().enumerate() {
                let p = p as Port;
                match *s {
                    PortState::Interdomain {
                        remote,
                        remote_port,
                    } => {
                        assert_ne!(remote, d);
                        assert_eq!(
                            ev.state(remote, u32::from(remote_port)),
                            Some(PortState::Interdomain {
                                remote: d,
                                remote_port: p
                            }),
                            "{d}:{p} -> {remote}:{remote_port} is one-sided"
                        );
                    }
                    PortState::Virq(v) => assert_eq!(t.virq_port[usize::from(v)], p),
                    PortState::Free => {
                        let bit = t.pending[usize::from(p) / 64] >> (p % 64) & 1;
                        assert_eq!(bit, 0, "free port {d}:{p} is pending");
                    }
                    PortState::Unbound { remote } => assert_ne!(remote, d),
                }
            }
            for (v, &p) in t.virq_port.iter().enumerate() {
                if p != 0 {
                    assert_eq!(t.ports[usize::from(p)], PortState::Virq(v as u16));
                }
            }
        }
    }

    fn pending(ev: &mut EventChannels, d: DomId) -> Vec<Port> {
        let mut out = [0; PORT_WORDS];
        let n = ev.take_pending(d, &mut out);
        let ports: Vec<Port> = (0..NR_PORTS as Port)
            .filter(|&p| out[usize::from(p) / 64] >> (p % 64) & 1 == 1)
            .collect();
        assert_eq!(n as usize, ports.len());
        ports
    }

    /// A channel from A to B through alloc_unbound and bind_interdomain.
    fn channel(ev: &mut EventChannels) -> (Port, Port) {
        let pb = ev.alloc_unbound(B, A).unwrap();
        let pa = ev.bind_interdomain(A, B, pb.into()).unwrap();
        (pa, pb)
    }

    #[test]
    fn alloc_unbound_offers_a_port() {
        let mut ev = three();
        assert_eq!(ev.alloc_unbound(A, B), Ok(1));
        assert_eq!(ev.alloc_unbound(A, C), Ok(2));
        assert_eq!(ev.state(A, 1), Some(PortState::Unbound { remote: B }));
        assert_eq!(ev.state(A, 2), Some(PortState::Unbound { remote: C }));
        assert_eq!(ev.ports_in_use(A), 2);
        check_invariants(&ev);
    }

    #[test]
    fn alloc_unbound_refuses_bad_domains() {
        let mut ev = three();
        assert_eq!(ev.alloc_unbound(A, A), Err(Error::BadDomain));
        assert_eq!(ev.alloc_unbound(A, 9), Err(Error::BadDomain));
        assert_eq!(ev.alloc_unbound(A, 0), Err(Error::BadDomain));
        assert_eq!(ev.alloc_unbound(A, u16::MAX), Err(Error::BadDomain));
        assert_eq!(ev.alloc_unbound(40, A), Err(Error::BadDomain));
        assert_eq!(ev.alloc_unbound(u16::MAX, A), Err(Error::BadDomain));
        assert_eq!(ev.ports_in_use(A), 0);
    }

    #[test]
    fn ports_run_out_with_no_space() {
        let mut ev = three();
        for p in 1..NR_PORTS {
            assert_eq!(ev.alloc_unbound(A, B), Ok(p as Port));
        }
        assert_eq!(ev.alloc_unbound(A, B), Err(Error::NoSpace));
        assert_eq!(ev.bind_virq(A, TIMER), Err(Error::NoSpace));
        // Binding needs a local port too; the offer stays as it was.
        let pc = ev.alloc_unbound(C, A).unwrap();
        assert_eq!(ev.bind_interdomain(A, C, pc.into()), Err(Error::NoSpace));
        assert_eq!(
            ev.state(C, pc.into()),
            Some(PortState::Unbound { remote: A })
        );
        assert_eq!(ev.bind_interdomain_at_build(A, B), Err(Error::NoSpace));
        assert_eq!(ev.bind_interdomain_at_build(B, A), Err(Error::NoSpace));
        assert_eq!(ev.ports_in_use(B), 0);
        // One port freed is one port to allocate.
        ev.close(A, 77).unwrap();
        assert_eq!(ev.alloc_unbound(A, B), Ok(77));
        check_invariants(&ev);
    }

    #[test]
    fn bind_interdomain_connects_both_ends() {
        let mut ev = three();
        let (pa, pb) = channel(&mut ev);
        assert_eq!(
            ev.state(A, pa.into()),
            Some(PortState::Interdomain {
                remote: B,
                remote_port: pb
            })
        );
        assert_eq!(
            ev.state(B, pb.into()),
            Some(PortState::Interdomain {
                remote: A,
                remote_port: pa
            })
        );
        check_invariants(&ev);
    }

    #[test]
    fn bind_interdomain_refusals() {
        let mut ev = three();
        let to_c = ev.alloc_unbound(B, C).unwrap();
        let to_a = ev.alloc_unbound(B, A).unwrap();
        let virq = ev.bind_virq(B, TIMER).unwrap();
        // Domains first: none such, or oneself.
        assert_eq!(ev.bind_interdomain(A, A, 1), Err(Error::BadDomain));
        assert_eq!(ev.bind_interdomain(A, 30, 1), Err(Error::BadDomain));
        assert_eq!(ev.bind_interdomain(A, u16::MAX, 0), Err(Error::BadDomain));
        // Then the remote port's range.
        for bad in [0, NR_PORTS as u32, 1 << 16 | 1, u32::MAX] {
            assert_eq!(ev.bind_interdomain(A, B, bad), Err(Error::BadPort));
        }
        // Then its state: offered to someone else, free, a VIRQ.
        assert_eq!(
            ev.bind_interdomain(A, B, to_c.into()),
            Err(Error::PortState)
        );
        assert_eq!(ev.bind_interdomain(A, B, 200), Err(Error::PortState));
        assert_eq!(
            ev.bind_interdomain(A, B, virq.into()),
            Err(Error::PortState)
        );
        // Already connected: nobody can bind to it a second time.
        let pa = ev.bind_interdomain(A, B, to_a.into()).unwrap();
        assert_eq!(
            ev.bind_interdomain(A, B, to_a.into()),
            Err(Error::PortState)
        );
        assert_eq!(
            ev.bind_interdomain(C, B, to_a.into()),
            Err(Error::PortState)
        );
        // Nor to one's own end.
        assert_eq!(ev.bind_interdomain(B, A, pa.into()), Err(Error::PortState));
        // The refused calls left nothing behind.
        assert_eq!(ev.ports_in_use(A), 1);
        assert_eq!(ev.ports_in_use(C), 0);
        check_invariants(&ev);
    }

    #[test]
    fn send_marks_the_peer_pending() {
        let mut ev = three();
        let (pa, pb) = channel(&mut ev);
        assert!(!ev.has_pending(B));
        assert_eq!(ev.send(A, pa.into()), Ok(B));
        assert!(ev.has_pending(B));
        assert!(!ev.has_pending(A));
        // Sending twice before the peer looks is one pending port.
        assert_eq!(ev.send(A, pa.into()), Ok(B));
        assert_eq!(pending(&mut ev, B), [pb]);
        assert!(!ev.has_pending(B));
        assert_eq!(pending(&mut ev, B), []);
        assert_eq!(ev.send(B, pb.into()), Ok(A));
        assert_eq!(pending(&mut ev, A), [pa]);
    }

    #[test]
    fn send_refusals() {
        let mut ev = three();
        let unbound = ev.alloc_unbound(A, B).unwrap();
        let virq = ev.bind_virq(A, TIMER).unwrap();
        for _ in 0..5 {
            ev.alloc_unbound(B, C).unwrap();
        }
        let pb = ev.alloc_unbound(B, C).unwrap();
        assert_eq!(ev.state(A, pb.into()), Some(PortState::Free));
        ev.bind_interdomain(C, B, pb.into()).unwrap();
        for bad in [0, NR_PORTS as u32, 1 << 16 | 1, u32::MAX] {
            assert_eq!(ev.send(A, bad), Err(Error::BadPort));
        }
        // Free, and a port number that is allocated only to another domain.
        assert_eq!(ev.send(A, 100), Err(Error::BadPort));
        assert_eq!(ev.send(A, pb.into()), Err(Error::BadPort));
        assert_eq!(ev.send(A, unbound.into()), Err(Error::PortState));
        assert_eq!(ev.send(A, virq.into()), Err(Error::PortState));
        assert_eq!(ev.send(9, 1), Err(Error::BadDomain));
        assert!(!ev.has_pending(B));
        assert!(!ev.has_pending(C));
    }

    #[test]
    fn virqs() {
        let mut ev = three();
        assert!(!ev.raise_virq(A, TIMER));
        let p = ev.bind_virq(A, TIMER).unwrap();
        assert_eq!(ev.state(A, p.into()), Some(PortState::Virq(0)));
        assert_eq!(ev.bind_virq(A, TIMER), Err(Error::PortState));
        assert_eq!(ev.bind_virq(A, VIRQ_COUNT), Err(Error::Invalid));
        assert_eq!(ev.bind_virq(A, u32::MAX), Err(Error::Invalid));
        assert_eq!(ev.bind_virq(9, TIMER), Err(Error::BadDomain));
        // Each domain binds its own.
        assert_eq!(ev.bind_virq(B, TIMER), Ok(1));
        assert!(ev.raise_virq(A, TIMER));
        assert!(!ev.raise_virq(A, VIRQ_COUNT));
        assert!(!ev.raise_virq(A, u32::MAX));
        assert!(!ev.raise_virq(9, TIMER));
        assert_eq!(pending(&mut ev, A), [p]);
        assert!(!ev.has_pending(B));
        // Closed, it raises nothing and may be bound again.
        ev.close(A, p.into()).unwrap();
        assert!(!ev.raise_virq(A, TIMER));
        assert_eq!(ev.bind_virq(A, TIMER), Ok(p));
        check_invariants(&ev);
    }

    #[test]
    fn close_transitions() {
        let mut ev = three();
        // Unbound -> Free.
        let u = ev.alloc_unbound(A, B).unwrap();
        ev.close(A, u.into()).unwrap();
        assert_eq!(ev.state(A, u.into()), Some(PortState::Free));
        // Interdomain -> Free here, Unbound{remote: closer} there.
        let (pa, pb) = channel(&mut ev);
        ev.send(A, pa.into()).unwrap();
        ev.send(B, pb.into()).unwrap();
        ev.close(A, pa.into()).unwrap();
        assert_eq!(ev.state(A, pa.into()), Some(PortState::Free));
        assert_eq!(
            ev.state(B, pb.into()),
            Some(PortState::Unbound { remote: A })
        );
        // The closed port's pending bit went with it; the peer's stays.
        assert!(!ev.has_pending(A));
        assert_eq!(pending(&mut ev, B), [pb]);
        assert_eq!(ev.send(B, pb.into()), Err(Error::PortState));
        // The closer may connect to the offer again.
        let again = ev.bind_interdomain(A, B, pb.into()).unwrap();
        assert_eq!(ev.send(A, again.into()), Ok(B));
        check_invariants(&ev);
        // Closing the other end, then the last one.
        ev.close(B, pb.into()).unwrap();
        assert_eq!(
            ev.state(A, again.into()),
            Some(PortState::Unbound { remote: B })
        );
        ev.close(A, again.into()).unwrap();
        assert_eq!(ev.ports_in_use(A), 0);
        assert_eq!(ev.ports_in_use(B), 0);
        check_invariants(&ev);
    }

    #[test]
    fn close_refusals() {
        let mut ev = three();
        for bad in [0, 1, NR_PORTS as u32, u32::MAX] {
            assert_eq!(ev.close(A, bad), Err(Error::BadPort));
        }
        let p = ev.alloc_unbound(B, A).unwrap();
        // Another domain's port is not the caller's to close.
        assert_eq!(ev.close(A, p.into()), Err(Error::BadPort));
        ev.close(B, p.into()).unwrap();
        assert_eq!(ev.close(B, p.into()), Err(Error::BadPort));
        assert_eq!(ev.close(9, 1), Err(Error::BadDomain));
    }

    #[test]
    fn ten_thousand_round_trips_count_exactly() {
        let mut ev = three();
        let (pa, pb) = channel(&mut ev);
        let (mut got_a, mut got_b) = (0u32, 0u32);
        let mut out = [0; PORT_WORDS];
        for _ in 0..10_000 {
            assert_eq!(ev.send(A, pa.into()), Ok(B));
            assert_eq!(ev.take_pending(A, &mut out), 0);
            got_b += ev.take_pending(B, &mut out);
            assert_eq!(out[0], 1 << pb);
            assert_eq!(ev.send(B, pb.into()), Ok(A));
            got_a += ev.take_pending(A, &mut out);
            assert_eq!(out[0], 1 << pa);
        }
        assert_eq!((got_a, got_b), (10_000, 10_000));
    }

    #[test]
    fn pending_bits_map_to_ports_across_words() {
        let mut ev = three();
        let mut ports = vec![];
        for _ in 1..NR_PORTS {
            let pb = ev.alloc_unbound(B, A).unwrap();
            let pa = ev.bind_interdomain(A, B, pb.into()).unwrap();
            ports.push((pa, pb));
        }
        for &(pa, _) in ports.iter().filter(|(pa, _)| pa % 3 == 0) {
            ev.send(A, pa.into()).unwrap();
        }
        let want: Vec<Port> = ports
            .iter()
            .filter(|(pa, _)| pa % 3 == 0)
            .map(|&(_, pb)| pb)
            .collect();
        let mut got = pending(&mut ev, B);
        got.sort();
        assert_eq!(got, want);
        assert!(got.contains(&255) && got.contains(&192) && got.contains(&63));
    }

    #[test]
    fn ports_never_leak() {
        let mut ev = three();
        let keep = ev.bind_virq(A, TIMER).unwrap();
        for i in 0..10_000u32 {
            let (pa, pb) = channel(&mut ev);
            ev.send(A, pa.into()).unwrap();
            if i % 2 == 0 {
                ev.close(A, pa.into()).unwrap();
                ev.close(B, pb.into()).unwrap();
            } else {
                ev.close(B, pb.into()).unwrap();
                ev.close(A, pa.into()).unwrap();
            }
            let u = ev.alloc_unbound(C, A).unwrap();
            ev.close(C, u.into()).unwrap();
            let v = ev.bind_virq(B, TIMER).unwrap();
            ev.close(B, v.into()).unwrap();
        }
        assert_eq!(ev.ports_in_use(A), 1);
        assert_eq!(ev.ports_in_use(B), 0);
        assert_eq!(ev.ports_in_use(C), 0);
        assert_eq!(ev.state(A, keep.into()), Some(PortState::Virq(0)));
        // The lowest port is handed out again.
        assert_eq!(ev.alloc_unbound(B, A), Ok(1));
        assert_eq!(ev.alloc_unbound(A, B), Ok(2));
        check_invariants(&ev);
    }

    #[test]
    fn destroy_unbinds_peers() {
        let mut ev = three();
        let (pa, pb) = channel(&mut ev);
        let pc = ev.alloc_unbound(C, A).unwrap();
        let ac = ev.bind_interdomain(A, C, pc.into()).unwrap();
        let (a2, b2) = ev.bind_interdomain_at_build(A, B).unwrap();
        let offer = ev.alloc_unbound(B, A).unwrap();
        ev.bind_virq(A, TIMER).unwrap();
        ev.send(A, ac.into()).unwrap();
        assert_eq!(ev.destroy_domain(A), [B, C]);
        assert!(!ev.contains(A));
        assert_eq!(
            ev.state(B, pb.into()),
            Some(PortState::Unbound { remote: A })
        );
        assert_eq!(
            ev.state(B, b2.into()),
            Some(PortState::Unbound { remote: A })
        );
        assert_eq!(
            ev.state(C, pc.into()),
            Some(PortState::Unbound { remote: A })
        );
        // An offer to the dead domain stays its owner's to close.
        assert_eq!(
            ev.state(B, offer.into()),
            Some(PortState::Unbound { remote: A })
        );
        assert_eq!(ev.send(B, pb.into()), Err(Error::PortState));
        // A pending bit set before the end stays for the peer to see.
        assert_eq!(pending(&mut ev, C), [pc]);
        // The dead domain is no longer anyone's remote.
        assert_eq!(ev.alloc_unbound(B, A), Err(Error::BadDomain));
        assert_eq!(ev.send(A, pa.into()), Err(Error::BadDomain));
        assert_eq!(ev.close(A, a2.into()), Err(Error::BadDomain));
        assert!(!ev.raise_virq(A, TIMER));
        assert_eq!(ev.destroy_domain(A), []);
        assert_eq!(ev.destroy_domain(u16::MAX), []);
        check_invariants(&ev);
    }

    #[test]
    fn channels_at_build() {
        let mut ev = three();
        assert_eq!(ev.bind_interdomain_at_build(A, B), Ok((1, 1)));
        assert_eq!(ev.bind_interdomain_at_build(A, C), Ok((2, 1)));
        assert_eq!(ev.bind_interdomain_at_build(C, B), Ok((2, 2)));
        assert_eq!(ev.send(C, 2), Ok(B));
        assert_eq!(pending(&mut ev, B), [2]);
        assert_eq!(ev.bind_interdomain_at_build(A, A), Err(Error::BadDomain));
        assert_eq!(ev.bind_interdomain_at_build(A, 9), Err(Error::BadDomain));
        assert_eq!(ev.bind_interdomain_at_build(9, A), Err(Error::BadDomain));
        check_invariants(&ev);
    }

    #[test]
    fn domains_are_added_once_and_in_range() {
        let mut ev = EventChannels::new();
        ev.add_domain(0).unwrap();
        assert_eq!(ev.add_domain(0), Err(Error::BadDomain));
        assert_eq!(ev.add_domain(MAX_DOMAINS as DomId), Err(Error::BadDomain));
        ev.add_domain(MAX_DOMAINS as DomId - 1).unwrap();
        assert!(ev.contains(MAX_DOMAINS as DomId - 1));
        assert!(!ev.contains(5));
        let mut out = [7; PORT_WORDS];
        assert_eq!(ev.take_pending(5, &mut out), 0);
        assert_eq!(out, [0; PORT_WORDS]);
        assert!(!ev.has_pending(5));
        assert_eq!(ev.state(5, 1), None);
        assert_eq!(ev.state(0, 0), None);
    }

    #[test]
    fn random_calls_keep_the_tables_consistent() {
        // A fixed-seed generator: the same hostile sequence every run.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut ev = three();
        ev.add_domain(4).unwrap();
        for _ in 0..200_000 {
            let r = next();
            let d = (r % 5) as DomId;
            let a = ((r >> 8) % 6) as u32;
            let p = ((r >> 16) % 20) as u32;
            let _ = match (r >> 32) % 7 {
                0 => ev.alloc_unbound(d, a as DomId).map(drop),
                1 => ev.bind_interdomain(d, a as DomId, p).map(drop),
                2 => ev.send(d, p).map(drop),
                3 => ev.close(d, p),
                4 => ev.bind_virq(d, a % 2).map(drop),
                5 => {
                    ev.raise_virq(d, a % 2);
                    Ok(())
                }
                _ => {
                    let mut out = [0; PORT_WORDS];
                    ev.take_pending(d, &mut out);
                    Ok(())
                }
            };
        }
        check_invariants(&ev);
        let used: usize = (0..5).map(|d| ev.ports_in_use(d)).sum();
        assert!(used > 0);
        for d in 0..5 {
            ev.destroy_domain(d);
            check_invariants(&ev);
        }
    }
}
