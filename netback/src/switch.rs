//! The switch: where a frame goes, given the port it came in on and its
//! destination MAC. Pure bookkeeping; [`crate::Netback`] moves the bytes.
//!
//! Ports are the NIC and one per vif. Each vif's MAC is fixed from the
//! manifest and is never learned or moved; MACs seen as sources on the NIC
//! port are learned (a bounded table, least recently seen evicted).
//!
//! | from | destination | goes to |
//! |---|---|---|
//! | vif | broadcast/multicast | every other vif it may reach, and the NIC if it may |
//! | vif | another vif's MAC | that vif, if it may reach it (else `forbidden`) |
//! | vif | its own MAC | nowhere (`no-route`) |
//! | vif | anything else (learned on the NIC or unknown) | the NIC, if it may |
//! | NIC | broadcast/multicast | every vif the NIC may reach |
//! | NIC | a vif's MAC | that vif, if the NIC may reach it |
//! | NIC | anything else | nowhere (`no-route`): unknown unicast is never flooded to frontends |
//!
//! A frontend therefore receives only frames addressed to it or to a group,
//! from ports allowed to reach it ([`Switch::set_route`]; everything may
//! reach everything by default).

use alloc::vec::Vec;

use abi::netif::{is_group, Mac};

use crate::Reason;

/// Most vifs on one switch (vif sets are `u64` masks).
pub const MAX_VIFS: usize = 64;

/// A switch port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    Nic,
    Vif(usize),
}

/// Where a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    To(Port),
    /// To each vif whose bit is set, and to the NIC if `nic`.
    Flood {
        vifs: u64,
        nic: bool,
    },
    Drop(Reason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Route {
    vifs: u64,
    nic: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Learned {
    mac: Mac,
    seen: u64,
}

#[derive(Clone, Debug)]
pub struct Switch {
    macs: Vec<Mac>,
    /// Where each vif may send.
    routes: Vec<Route>,
    /// Vifs the NIC may reach.
    from_nic: u64,
    learned: Vec<Learned>,
    capacity: usize,
    clock: u64,
}

impl Switch {
    /// A switch that learns up to `capacity` MACs on the NIC port.
    pub fn new(capacity: usize) -> Switch {
        Switch {
            macs: Vec::new(),
            routes: Vec::new(),
            from_nic: 0,
            learned: Vec::new(),
            capacity,
            clock: 0,
        }
    }

    fn all_vifs(&self) -> u64 {
        match self.macs.len() {
            0 => 0,
            n if n >= 64 => u64::MAX,
            n => (1u64 << n) - 1,
        }
    }

    /// Add a vif port with its fixed MAC; it may reach and be reached by
    /// every port. `None` when [`MAX_VIFS`] ports exist. (Unicity and
    /// validity of the MAC are the caller's checks.)
    pub fn add_vif(&mut self, mac: Mac) -> Option<usize> {
        let i = self.macs.len();
        if i >= MAX_VIFS {
            return None;
        }
        self.macs.push(mac);
        // a MAC learned on the NIC that is now a vif's is forgotten
        self.learned.retain(|l| l.mac != mac);
        let all = self.all_vifs();
        for r in self.routes.iter_mut() {
            r.vifs |= 1 << i;
        }
        self.routes.push(Route {
            vifs: all & !(1 << i),
            nic: true,
        });
        self.from_nic |= 1 << i;
        Some(i)
    }

    pub fn vifs(&self) -> usize {
        self.macs.len()
    }

    /// The vif whose fixed MAC is `mac`.
    pub fn vif_of(&self, mac: &Mac) -> Option<usize> {
        self.macs.iter().position(|m| m == mac)
    }

    /// Allow or forbid frames from `from` to `to` (a vif never reaches
    /// itself; NIC to NIC is never switched).
    pub fn set_route(&mut self, from: Port, to: Port, allowed: bool) {
        let set = |mask: &mut u64, i: usize| {
            if i < MAX_VIFS {
                if allowed {
                    *mask |= 1 << i;
                } else {
                    *mask &= !(1 << i);
                }
            }
        };
        match (from, to) {
            (Port::Vif(a), Port::Vif(b)) if a != b => {
                if let Some(r) = self.routes.get_mut(a) {
                    if b < self.macs.len() {
                        set(&mut r.vifs, b);
                    }
                }
            }
            (Port::Vif(a), Port::Nic) => {
                if let Some(r) = self.routes.get_mut(a) {
                    r.nic = allowed;
                }
            }
            (Port::Nic, Port::Vif(b)) if b < self.macs.len() => set(&mut self.from_nic, b),
            _ => {}
        }
    }

    /// May `from` send to `to`?
    pub fn may_reach(&self, from: Port, to: Port) -> bool {
        match (from, to) {
            (Port::Vif(a), Port::Vif(b)) => {
                a != b && self.routes.get(a).is_some_and(|r| r.vifs & (1 << b) != 0)
            }
            (Port::Vif(a), Port::Nic) => self.routes.get(a).is_some_and(|r| r.nic),
            (Port::Nic, Port::Vif(b)) => b < self.macs.len() && self.from_nic & (1 << b) != 0,
            (Port::Nic, Port::Nic) => false,
        }
    }

    /// Learn `mac` as a source seen on the NIC port. Group MACs and the
    /// vifs' own MACs are never learned (false).
    pub fn learn(&mut self, mac: Mac) -> bool {
        if is_group(&mac) || self.vif_of(&mac).is_some() {
            return false;
        }
        self.clock += 1;
        if let Some(l) = self.learned.iter_mut().find(|l| l.mac == mac) {
            l.seen = self.clock;
            return true;
        }
        if self.capacity == 0 {
            return false;
        }
        if self.learned.len() >= self.capacity {
            if let Some(i) = (0..self.learned.len()).min_by_key(|i| self.learned[*i].seen) {
                self.learned.swap_remove(i);
            }
        }
        self.learned.push(Learned {
            mac,
            seen: self.clock,
        });
        true
    }

    /// MACs learned on the NIC port now.
    pub fn learned(&self) -> usize {
        self.learned.len()
    }

    /// The port `mac` is known on (a vif's fixed MAC, or learned on the
    /// NIC).
    pub fn lookup(&self, mac: &Mac) -> Option<Port> {
        if let Some(i) = self.vif_of(mac) {
            return Some(Port::Vif(i));
        }
        self.learned
            .iter()
            .any(|l| l.mac == *mac)
            .then_some(Port::Nic)
    }

    /// Where a frame for `dst` that came in on `from` goes.
    pub fn forward(&self, from: Port, dst: &Mac) -> Forward {
        match from {
            Port::Vif(a) => {
                let Some(r) = self.routes.get(a) else {
                    return Forward::Drop(Reason::NoRoute);
                };
                if is_group(dst) {
                    let vifs = r.vifs & self.all_vifs() & !(1 << a);
                    if vifs == 0 && !r.nic {
                        return Forward::Drop(Reason::Forbidden);
                    }
                    return Forward::Flood { vifs, nic: r.nic };
                }
                match self.vif_of(dst) {
                    Some(b) if b == a => Forward::Drop(Reason::NoRoute),
                    Some(b) if self.may_reach(from, Port::Vif(b)) => Forward::To(Port::Vif(b)),
                    Some(_) => Forward::Drop(Reason::Forbidden),
                    None if r.nic => Forward::To(Port::Nic),
                    None => Forward::Drop(Reason::Forbidden),
                }
            }
            Port::Nic => {
                if is_group(dst) {
                    return Forward::Flood {
                        vifs: self.from_nic & self.all_vifs(),
                        nic: false,
                    };
                }
                match self.vif_of(dst) {
                    Some(b) if self.may_reach(from, Port::Vif(b)) => Forward::To(Port::Vif(b)),
                    Some(_) => Forward::Drop(Reason::Forbidden),
                    None => Forward::Drop(Reason::NoRoute),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::netif::BROADCAST;

    const A: Mac = [0x02, 0, 0, 0, 0, 0xa];
    const B: Mac = [0x02, 0, 0, 0, 0, 0xb];
    const C: Mac = [0x02, 0, 0, 0, 0, 0xc];
    const H: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const MCAST: Mac = [0x01, 0, 0x5e, 0, 0, 1];

    fn three() -> Switch {
        let mut s = Switch::new(4);
        assert_eq!(s.add_vif(A), Some(0));
        assert_eq!(s.add_vif(B), Some(1));
        assert_eq!(s.add_vif(C), Some(2));
        s
    }

    #[test]
    fn unicast_between_vifs_and_to_the_nic() {
        let s = three();
        assert_eq!(s.forward(Port::Vif(0), &B), Forward::To(Port::Vif(1)));
        assert_eq!(s.forward(Port::Vif(2), &A), Forward::To(Port::Vif(0)));
        assert_eq!(s.forward(Port::Vif(0), &A), Forward::Drop(Reason::NoRoute));
        // unknown unicast from a vif goes to the NIC, never to other vifs
        assert_eq!(s.forward(Port::Vif(0), &H), Forward::To(Port::Nic));
        // from the NIC: only to the vif it names
        assert_eq!(s.forward(Port::Nic, &C), Forward::To(Port::Vif(2)));
        assert_eq!(s.forward(Port::Nic, &H), Forward::Drop(Reason::NoRoute));
    }

    #[test]
    fn flooding() {
        let s = three();
        assert_eq!(
            s.forward(Port::Vif(1), &BROADCAST),
            Forward::Flood {
                vifs: 0b101,
                nic: true
            }
        );
        assert_eq!(
            s.forward(Port::Vif(0), &MCAST),
            Forward::Flood {
                vifs: 0b110,
                nic: true
            }
        );
        assert_eq!(
            s.forward(Port::Nic, &BROADCAST),
            Forward::Flood {
                vifs: 0b111,
                nic: false
            }
        );
    }

    #[test]
    fn learning_on_the_nic_port() {
        let mut s = three();
        assert_eq!(s.lookup(&H), None);
        assert!(s.learn(H));
        assert_eq!(s.lookup(&H), Some(Port::Nic));
        assert_eq!(s.lookup(&B), Some(Port::Vif(1)));
        // a vif's MAC or a group MAC is never learned
        assert!(!s.learn(A));
        assert!(!s.learn(BROADCAST));
        assert_eq!(s.lookup(&A), Some(Port::Vif(0)));
        assert_eq!(s.learned(), 1);
        // a frame to a learned MAC goes to the NIC
        assert_eq!(s.forward(Port::Vif(1), &H), Forward::To(Port::Nic));
        // bounded: the least recently seen is evicted
        let m = |i: u8| [0x02, 0xee, 0, 0, 0, i];
        for i in 0..3 {
            assert!(s.learn(m(i)));
        }
        assert!(s.learn(H)); // H seen again: m(0) is now the oldest
        assert!(s.learn(m(9)));
        assert_eq!(s.learned(), 4);
        assert_eq!(s.lookup(&m(0)), None);
        assert_eq!(s.lookup(&H), Some(Port::Nic));
        assert!(!Switch::new(0).learn(H));
    }

    #[test]
    fn learned_mac_taken_by_a_new_vif() {
        let mut s = Switch::new(4);
        assert!(s.learn(A));
        s.add_vif(A);
        assert_eq!(s.learned(), 0);
        assert_eq!(s.lookup(&A), Some(Port::Vif(0)));
    }

    #[test]
    fn routes_isolate() {
        let mut s = three();
        s.set_route(Port::Vif(0), Port::Vif(1), false);
        assert_eq!(
            s.forward(Port::Vif(0), &B),
            Forward::Drop(Reason::Forbidden)
        );
        assert_eq!(s.forward(Port::Vif(1), &A), Forward::To(Port::Vif(0)));
        assert_eq!(
            s.forward(Port::Vif(0), &BROADCAST),
            Forward::Flood {
                vifs: 0b100,
                nic: true
            }
        );
        s.set_route(Port::Vif(0), Port::Nic, false);
        assert_eq!(
            s.forward(Port::Vif(0), &H),
            Forward::Drop(Reason::Forbidden)
        );
        s.set_route(Port::Vif(0), Port::Vif(2), false);
        assert_eq!(
            s.forward(Port::Vif(0), &BROADCAST),
            Forward::Drop(Reason::Forbidden)
        );
        s.set_route(Port::Nic, Port::Vif(1), false);
        assert_eq!(s.forward(Port::Nic, &B), Forward::Drop(Reason::Forbidden));
        assert_eq!(
            s.forward(Port::Nic, &BROADCAST),
            Forward::Flood {
                vifs: 0b101,
                nic: false
            }
        );
        // a vif added later is reachable by the others
        let d = s.add_vif([0x02, 0, 0, 0, 0, 0xd]).unwrap();
        assert!(s.may_reach(Port::Vif(1), Port::Vif(d)));
        assert!(s.may_reach(Port::Vif(d), Port::Vif(1)));
        assert!(!s.may_reach(Port::Vif(d), Port::Vif(d)));
        // nonsense is ignored
        s.set_route(Port::Vif(0), Port::Vif(0), true);
        s.set_route(Port::Vif(99), Port::Vif(0), true);
        assert!(!s.may_reach(Port::Vif(0), Port::Vif(0)));
    }

    #[test]
    fn at_most_64_vifs() {
        let mut s = Switch::new(0);
        for i in 0..MAX_VIFS {
            assert_eq!(s.add_vif([2, 0, 0, 0, 1, i as u8]), Some(i));
        }
        assert_eq!(s.add_vif([2, 0, 0, 0, 2, 0]), None);
        assert_eq!(
            s.forward(Port::Vif(63), &BROADCAST),
            Forward::Flood {
                vifs: u64::MAX >> 1,
                nic: true
            }
        );
    }
}
