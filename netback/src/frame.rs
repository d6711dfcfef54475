//! Ethernet frames as the switch reads them, and the anti-spoofing check.
//!
//! ```text
//! Ethernet  0 dst[6]  6 src[6]  12 u16 ethertype (big-endian)  14 payload
//! IPv4     14 version/IHL .. 26 src[4]  30 dst[4]               (>= 34)
//! ARP      14 u16 htype (1)  16 u16 ptype (0x0800)  18 u8 hlen (6)
//!          19 u8 plen (4)  20 u16 oper  22 sha[6]  28 spa[4]
//!          32 tha[6]  38 tpa[4]                                  (>= 42)
//! ```
//!
//! A frontend may send only IPv4 and ARP, and only as itself: the Ethernet
//! source must be its MAC; an IPv4 source and an ARP sender (hardware and
//! protocol address) must be its MAC and IPv4 address. Everything else
//! (IPv6, VLAN tags that could hide an IPv4 header, other ethertypes) is
//! refused, so nothing reaches another frontend or the wire under a name
//! that is not the sender's.

use abi::netif::{Mac, ETH_HEADER_SIZE};

use crate::Reason;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Bytes of an Ethernet header plus a minimal IPv4 header.
pub const IPV4_MIN: usize = ETH_HEADER_SIZE + 20;
/// Bytes of an Ethernet header plus an ARP packet for IPv4 over Ethernet.
pub const ARP_MIN: usize = ETH_HEADER_SIZE + 28;

fn mac_at(f: &[u8], o: usize) -> Mac {
    let mut m = [0u8; 6];
    m.copy_from_slice(&f[o..o + 6]);
    m
}

fn be16(f: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([f[o], f[o + 1]])
}

/// Destination MAC (the frame is at least an Ethernet header).
pub fn dst(f: &[u8]) -> Mac {
    mac_at(f, 0)
}

/// Source MAC (the frame is at least an Ethernet header).
pub fn src(f: &[u8]) -> Mac {
    mac_at(f, 6)
}

pub fn ethertype(f: &[u8]) -> u16 {
    be16(f, 12)
}

/// Bytes at the start of a frame that [`check_head`] looks at: more are
/// never needed to check a sender.
pub const HEAD: usize = ARP_MIN;

/// May a frontend whose address is `mac`/`ip` send `f`?
pub fn check_source(f: &[u8], mac: &Mac, ip: &[u8; 4]) -> Result<(), Reason> {
    check_head(&f[..f.len().min(HEAD)], f.len(), mac, ip)
}

/// [`check_source`] of a `len`-byte frame from its first bytes alone:
/// `f` is the frame's first `len.min(HEAD)` bytes.
pub fn check_head(f: &[u8], len: usize, mac: &Mac, ip: &[u8; 4]) -> Result<(), Reason> {
    debug_assert_eq!(f.len(), len.min(HEAD));
    if len < ETH_HEADER_SIZE {
        return Err(Reason::Malformed);
    }
    if src(f) != *mac {
        return Err(Reason::SpoofMac);
    }
    match ethertype(f) {
        ETHERTYPE_IPV4 => {
            if len < IPV4_MIN || f[14] >> 4 != 4 || f[14] & 0xf < 5 {
                return Err(Reason::Malformed);
            }
            if f[26..30] != ip[..] {
                return Err(Reason::SpoofIp);
            }
            Ok(())
        }
        ETHERTYPE_ARP => {
            if len < ARP_MIN
                || be16(f, 14) != 1
                || be16(f, 16) != ETHERTYPE_IPV4
                || f[18] != 6
                || f[19] != 4
            {
                return Err(Reason::Malformed);
            }
            if mac_at(f, 22) != *mac {
                return Err(Reason::SpoofMac);
            }
            if f[28..32] != ip[..] {
                return Err(Reason::SpoofIp);
            }
            Ok(())
        }
        _ => Err(Reason::Ethertype),
    }
}

/// Frame builders shared by the tests.
#[cfg(test)]
pub mod build {
    use super::*;
    use alloc::vec::Vec;

    pub fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// An IPv4/UDP-ish frame with `body` after a 20-byte header.
    pub fn ipv4(dst: Mac, src: Mac, sip: [u8; 4], dip: [u8; 4], body: &[u8]) -> Vec<u8> {
        let mut h = [0u8; 20];
        h[0] = 0x45;
        let total = (20 + body.len()) as u16;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[8] = 64;
        h[9] = 17;
        h[12..16].copy_from_slice(&sip);
        h[16..20].copy_from_slice(&dip);
        let mut p = Vec::from(&h[..]);
        p.extend_from_slice(body);
        eth(dst, src, ETHERTYPE_IPV4, &p)
    }

    /// An ARP request (`oper` 1) or reply (2) for IPv4 over Ethernet.
    pub fn arp(dst: Mac, src: Mac, oper: u16, sha: Mac, spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&1u16.to_be_bytes());
        p.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        p.push(6);
        p.push(4);
        p.extend_from_slice(&oper.to_be_bytes());
        p.extend_from_slice(&sha);
        p.extend_from_slice(&spa);
        p.extend_from_slice(&[0; 6]);
        p.extend_from_slice(&tpa);
        eth(dst, src, ETHERTYPE_ARP, &p)
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use abi::netif::BROADCAST;

    const A: Mac = [0x02, 0, 0, 0, 0, 0xa];
    const B: Mac = [0x02, 0, 0, 0, 0, 0xb];
    const IA: [u8; 4] = [10, 0, 0, 10];
    const IB: [u8; 4] = [10, 0, 0, 11];

    #[test]
    fn own_frames_pass() {
        assert_eq!(check_source(&ipv4(B, A, IA, IB, b"hi"), &A, &IA), Ok(()));
        let a = arp(BROADCAST, A, 1, A, IA, IB);
        assert_eq!(a.len(), ARP_MIN);
        assert_eq!(check_source(&a, &A, &IA), Ok(()));
        assert_eq!(dst(&a), BROADCAST);
        assert_eq!(src(&a), A);
        assert_eq!(ethertype(&a), ETHERTYPE_ARP);
    }

    #[test]
    fn spoofs_refused() {
        let f = ipv4(B, B, IA, IB, b"");
        assert_eq!(check_source(&f, &A, &IA), Err(Reason::SpoofMac));
        let f = ipv4(B, A, IB, IB, b"");
        assert_eq!(check_source(&f, &A, &IA), Err(Reason::SpoofIp));
        // ARP poisoning: own Ethernet source, someone else's sender
        let f = arp(BROADCAST, A, 2, B, IA, IB);
        assert_eq!(check_source(&f, &A, &IA), Err(Reason::SpoofMac));
        let f = arp(BROADCAST, A, 2, A, IB, IB);
        assert_eq!(check_source(&f, &A, &IA), Err(Reason::SpoofIp));
    }

    #[test]
    fn malformed_and_other_ethertypes_refused() {
        assert_eq!(check_source(&A[..], &A, &IA), Err(Reason::Malformed));
        let mut f = ipv4(B, A, IA, IB, b"");
        f.truncate(IPV4_MIN - 1);
        assert_eq!(check_source(&f, &A, &IA), Err(Reason::Malformed));
        let mut f = ipv4(B, A, IA, IB, b"");
        f[14] = 0x65;
        assert_eq!(check_source(&f, &A, &IA), Err(Reason::Malformed));
        f[14] = 0x44;
        assert_eq!(check_source(&f, &A, &IA), Err(Reason::Malformed));
        let mut f = arp(BROADCAST, A, 1, A, IA, IB);
        f[18] = 8;
        assert_eq!(check_source(&f, &A, &IA), Err(Reason::Malformed));
        let mut f = arp(BROADCAST, A, 1, A, IA, IB);
        f.pop();
        assert_eq!(check_source(&f, &A, &IA), Err(Reason::Malformed));
        // IPv6, and an 802.1Q tag in front of IPv4
        let f = eth(B, A, 0x86dd, &[0; 40]);
        assert_eq!(check_source(&f, &A, &IA), Err(Reason::Ethertype));
        let f = eth(B, A, 0x8100, &[0; 40]);
        assert_eq!(check_source(&f, &A, &IA), Err(Reason::Ethertype));
    }
}
