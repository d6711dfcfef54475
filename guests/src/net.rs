//! What the network roles share: argument values (IPv4 addresses, sizes),
//! finding and connecting the vif, raw frames (ARP and IPv4/UDP, marked so
//! that a receiver can tell a test's frames from anything else), and a
//! smoltcp device wrapper that counts marked frames on their way in.
//!
//! The marks: a frame carrying [`SPOOF_MARK`] was sent by `net-spoof` with
//! another domain's MAC or IPv4 address, and must never arrive; one
//! carrying [`CONTROL_MARK`] was sent by it honestly, and must (it shows
//! the path works, so that seeing no spoofed frame means something).

use alloc::vec::Vec;

use abi::domain::{VifInfo, VifRole};
use libdom::netfront::{Config, NetError, Netfront};
use libdom::ring::Waiter;
use libdom::smoltcp::{self, phy};
use libdom::{println, time_ns, StartInfo};

/// How long the backend may take to say Connected.
pub const CONNECT_NS: u64 = 10_000_000_000;

/// The payload a spoofed frame carries.
pub const SPOOF_MARK: &[u8; 16] = b"AIRLOCK-SPOOFED!";
/// The payload an honest control frame of `net-spoof` carries.
pub const CONTROL_MARK: &[u8; 16] = b"AIRLOCK-CONTROL!";

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const IPPROTO_UDP: u8 = 17;
/// The UDP port marked frames go to (nobody listens there).
pub const MARK_PORT: u16 = 9;

/// The argument values the TCP workload reads too (one definition, in
/// `driver_domains::tcp_stream`).
pub use driver_domains::tcp_stream::{parse_ipv4, parse_size};

/// Displays an IPv4 address.
pub struct Ip(pub [u8; 4]);

impl core::fmt::Display for Ip {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// Displays a MAC.
pub struct Mac(pub [u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The vif called `name`, or the first this domain uses.
pub fn find_vif<'a>(si: &StartInfo<'a>, name: Option<&str>) -> Option<VifInfo<'a>> {
    si.vifs
        .iter()
        .flatten()
        .find(|v| v.role == VifRole::Front && name.is_none_or(|n| v.name == n))
        .copied()
}

/// Finds the vif, binds the timer and connects; prints why not.
pub fn connect(
    si: &StartInfo<'_>,
    who: &str,
    vif: Option<&str>,
    cfg: Config,
) -> Option<(Netfront, Waiter)> {
    let Some(v) = find_vif(si, vif) else {
        println!("{who}: no vif {} to use", vif.unwrap_or("at all"));
        return None;
    };
    let mut w = match Waiter::new() {
        Ok(w) => w,
        Err(e) => {
            println!("{who}: timer: {}", e.name());
            return None;
        }
    };
    match Netfront::connect(&v, cfg, &mut w, time_ns() + CONNECT_NS) {
        Ok(nf) => {
            println!(
                "{who}: {} connected to domain {}: {} {}",
                v.name,
                v.peer,
                Mac(nf.mac()),
                Ip(nf.ip())
            );
            Some((nf, w))
        }
        Err(e) => {
            println!("{who}: {}: {e}", v.name);
            None
        }
    }
}

/// Closes the vif (until 5 s from now); prints a failure.
pub fn close(nf: Netfront, w: &mut Waiter, who: &str) {
    if let Err(e) = nf.close(w, time_ns() + 5_000_000_000) {
        println!("{who}: closing the vif: {e}");
    }
}

// ---- frames ----

/// An Ethernet header.
fn eth(out: &mut Vec<u8>, dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(&ethertype.to_be_bytes());
}

/// Pads to the 60-byte minimum (before FCS).
fn pad(out: &mut Vec<u8>) {
    if out.len() < 60 {
        out.resize(60, 0);
    }
}

/// An ARP packet (IPv4 over Ethernet) in an Ethernet frame: `op` 1
/// request, 2 reply; `mark` follows it (in what would be padding).
#[allow(clippy::too_many_arguments)]
pub fn arp_frame(
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    op: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
    mark: Option<&[u8]>,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    eth(&mut f, eth_dst, eth_src, ETHERTYPE_ARP);
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    if let Some(m) = mark {
        f.extend_from_slice(m);
    }
    pad(&mut f);
    f
}

/// The Internet checksum of `data`.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4/UDP datagram carrying `payload` to port [`MARK_PORT`] (UDP
/// checksum 0: none), in an Ethernet frame.
pub fn udp_frame(
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(64 + payload.len());
    eth(&mut f, eth_dst, eth_src, ETHERTYPE_IPV4);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let sum = inet_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&MARK_PORT.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    pad(&mut f);
    f
}

/// What a marked frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marked {
    Spoofed,
    Control,
}

/// Whether `frame` is an ARP or UDP frame carrying one of the marks. Only
/// those are looked into (a TCP stream's bytes are not searched).
pub fn marked(frame: &[u8]) -> Option<Marked> {
    if frame.len() < 14 {
        return None;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let udp = ethertype == ETHERTYPE_IPV4 && frame.len() > 23 && frame[23] == IPPROTO_UDP;
    if ethertype != ETHERTYPE_ARP && !udp {
        return None;
    }
    let body = &frame[14..];
    let has = |m: &[u8; 16]| body.windows(m.len()).any(|w| w == m);
    if has(SPOOF_MARK) {
        Some(Marked::Spoofed)
    } else if has(CONTROL_MARK) {
        Some(Marked::Control)
    } else {
        None
    }
}

/// The sender (hardware, protocol address) of an ARP reply.
pub fn arp_reply_sender(frame: &[u8]) -> Option<([u8; 6], [u8; 4])> {
    if frame.len() < 42 || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_ARP {
        return None;
    }
    if u16::from_be_bytes([frame[20], frame[21]]) != 2 {
        return None;
    }
    let mut sha = [0u8; 6];
    sha.copy_from_slice(&frame[22..28]);
    let mut spa = [0u8; 4];
    spa.copy_from_slice(&frame[28..32]);
    Some((sha, spa))
}

// ---- a counting device ----

/// Marked frames that arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub spoofed: u64,
    pub control: u64,
}

/// A smoltcp device that is `Netfront` and counts marked frames on the way
/// in.
pub struct Tap<'a> {
    pub nf: &'a mut Netfront,
    pub seen: &'a mut Seen,
}

pub struct TapRx<'a> {
    inner: libdom::netfront::RxToken<'a>,
    seen: &'a mut Seen,
}

impl phy::RxToken for TapRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let seen = self.seen;
        phy::RxToken::consume(self.inner, |frame| {
            match marked(frame) {
                Some(Marked::Spoofed) => seen.spoofed += 1,
                Some(Marked::Control) => seen.control += 1,
                None => {}
            }
            f(frame)
        })
    }
}

impl phy::Device for Tap<'_> {
    type RxToken<'b>
        = TapRx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = libdom::netfront::TxToken<'b>
    where
        Self: 'b;

    fn receive(
        &mut self,
        t: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let (rx, tx) = self.nf.receive(t)?;
        Some((
            TapRx {
                inner: rx,
                seen: self.seen,
            },
            tx,
        ))
    }

    fn transmit(&mut self, t: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        self.nf.transmit(t)
    }

    fn capabilities(&self) -> phy::DeviceCapabilities {
        phy::Device::capabilities(&*self.nf)
    }
}

/// The buffers the network roles use.
pub fn config() -> Config {
    Config::default()
}

/// Why a role's network setup failed, for messages.
pub fn net_err(e: NetError) -> alloc::string::String {
    alloc::format!("{e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    // parse_ipv4 and parse_size are tested where they live
    // (driver_domains::tcp_stream).
    #[test]
    fn display() {
        assert_eq!(
            std::format!("{} {}", Ip([10, 0, 0, 1]), Mac([2, 0, 0, 0, 0, 0xab])),
            "10.0.0.1 02:00:00:00:00:ab"
        );
    }

    #[test]
    fn frames_are_marked_and_well_formed() {
        let me = [2, 0, 0, 0, 0, 1];
        let f = arp_frame(
            [0xff; 6],
            me,
            1,
            me,
            [10, 0, 0, 1],
            [0; 6],
            [10, 0, 0, 2],
            Some(SPOOF_MARK),
        );
        assert_eq!(f.len(), 60);
        assert_eq!(&f[12..14], &[8, 6]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(marked(&f), Some(Marked::Spoofed));
        let mut reply = f.clone();
        reply[21] = 2;
        assert_eq!(arp_reply_sender(&reply), Some((me, [10, 0, 0, 1])));
        assert_eq!(arp_reply_sender(&f), None);
        let u = udp_frame([0xff; 6], me, [10, 0, 0, 1], [10, 0, 0, 2], CONTROL_MARK);
        assert_eq!(u.len(), 60, "58 bytes, padded");
        assert_eq!(
            inet_checksum(&u[14..34]),
            0,
            "a header with its checksum sums to 0"
        );
        assert_eq!(u16::from_be_bytes([u[16], u[17]]), 44);
        assert_eq!(marked(&u), Some(Marked::Control));
        let plain = arp_frame(
            [0xff; 6],
            me,
            1,
            me,
            [10, 0, 0, 1],
            [0; 6],
            [10, 0, 0, 2],
            None,
        );
        assert_eq!(marked(&plain), None);
        // A TCP frame is never searched.
        let mut tcp = udp_frame([0xff; 6], me, [10, 0, 0, 1], [10, 0, 0, 2], SPOOF_MARK);
        tcp[23] = 6;
        assert_eq!(marked(&tcp), None);
    }
}
