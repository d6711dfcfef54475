//! `role=net-spoof victim=IP [count=16] [vif=NAME]`: a frontend that sends
//! frames as another domain, and `role=net-listen [ms=20000] [vif=NAME]`: a
//! victim that counts what reaches it.
//!
//! The spoofer first finds the victim's MAC by ARP (honestly: its own MAC
//! and IPv4 address), which also shows the victim is up and receiving. Then
//! it sends `count` frames of each kind, every one marked
//! ([`net::SPOOF_MARK`]) and addressed so that the victim would get it if
//! netback let it through:
//!
//! | kind | Ethernet source | sender address | what |
//! |---|---|---|---|
//! | `mac-arp` | the victim's MAC | the victim's MAC and IPv4 | broadcast ARP request |
//! | `mac-ipv4` | the victim's MAC | the victim's IPv4 | UDP to the victim |
//! | `ip-arp` | its own MAC | its own MAC, the victim's IPv4 | broadcast ARP reply (cache poisoning) |
//! | `ip-ipv4` | its own MAC | the victim's IPv4 | UDP to the victim |
//!
//! and last a few honest control frames ([`net::CONTROL_MARK`], UDP to the
//! victim from its own addresses), which must arrive: netback keeps a
//! vif's frames in order, so once a control frame is seen, the spoofed ones
//! before it were dropped, not late. For each kind it reports `work_done
//! {work: "spoof-sent-KIND", units: count}` and `data_check {what:
//! "spoof-refused-KIND", bytes: frames answered other than OKAY, ok: all
//! were}`; `work_done {work: "spoof-sent", units}` for all kinds. Exit 0
//! iff netback refused every spoofed frame and took every control frame.
//!
//! The listener runs smoltcp with no socket (it answers ARP), counts marked
//! frames, and ends `linger` after the first control frame (or at `ms`):
//! `work_done {work: "spoofed-frames-seen", units}` and `work_done {work:
//! "control-frames-seen", units}`. Exit 0 iff it saw no spoofed frame and
//! at least one control frame. (`tcp-recv` counts spoofed frames too.)

use alloc::vec::Vec;

use abi::ev::{DataCheck, WorkDone};
use abi::netif::{status, TxResponse};
use libdom::netfront::{NetError, Netfront};
use libdom::ring::Waiter;
use libdom::smoltcp::iface::{Interface, SocketSet};
use libdom::{event, netfront, println, time_ns, StartInfo};

use crate::net::{self, Ip, Mac, Seen, Tap, CONTROL_MARK, SPOOF_MARK};

/// The kinds of spoofed frames, in the order they are sent.
pub const KINDS: [&str; 4] = ["mac-arp", "mac-ipv4", "ip-arp", "ip-ipv4"];
/// Control frames sent after the spoofed ones.
pub const CONTROLS: u64 = 3;
/// How long the victim may take to answer ARP.
const RESOLVE_NS: u64 = 30_000_000_000;
/// How long the TX responses of a batch may take.
const RESPONSE_NS: u64 = 5_000_000_000;
/// How long the listener keeps counting after the first control frame.
const LINGER_NS: u64 = 500_000_000;

/// The frame of kind `kind` (an index into [`KINDS`]).
pub fn spoofed_frame(kind: usize, me: ([u8; 6], [u8; 4]), victim: ([u8; 6], [u8; 4])) -> Vec<u8> {
    let (my_mac, _) = me;
    let (v_mac, v_ip) = victim;
    let bcast = [0xff; 6];
    match kind {
        0 => net::arp_frame(
            bcast,
            v_mac,
            1,
            v_mac,
            v_ip,
            [0; 6],
            [v_ip[0], v_ip[1], v_ip[2], 254],
            Some(SPOOF_MARK),
        ),
        1 => net::udp_frame(v_mac, v_mac, v_ip, v_ip, SPOOF_MARK),
        2 => net::arp_frame(
            bcast,
            my_mac,
            2,
            my_mac,
            v_ip,
            bcast,
            v_ip,
            Some(SPOOF_MARK),
        ),
        _ => net::udp_frame(v_mac, my_mac, v_ip, v_ip, SPOOF_MARK),
    }
}

fn count(r: TxResponse, okay: &mut u64, other: &mut u64) {
    if r.status == status::OKAY {
        *okay += 1;
    } else {
        *other += 1;
    }
}

/// Sends `frames` and waits for every TX response; how many were answered
/// OKAY and how many otherwise. Received frames are passed to `rx`.
fn send_all(
    nf: &mut Netfront,
    w: &mut Waiter,
    frames: &[Vec<u8>],
    rx: &mut impl FnMut(&[u8]),
) -> Result<(u64, u64), NetError> {
    let (mut okay, mut other) = (0u64, 0u64);
    let deadline = time_ns() + RESPONSE_NS;
    let mut next = 0;
    while next < frames.len() || nf.tx_buffers().1 < nf.tx_buffers().0 {
        if time_ns() >= deadline {
            break;
        }
        while next < frames.len() {
            match nf.send_frame(&frames[next]) {
                Ok(()) => next += 1,
                Err(NetError::Busy) => break,
                Err(e) => return Err(e),
            }
        }
        nf.take_tx_responses(|r| count(r, &mut okay, &mut other))?;
        while nf.recv_frame(|f| rx(f))?.is_some() {}
        if next < frames.len() || nf.tx_buffers().1 < nf.tx_buffers().0 {
            nf.wait(w, deadline)?;
        }
    }
    // What `wait` took last (it frees the buffers, ending the loop) is
    // kept for take_tx_responses.
    nf.take_tx_responses(|r| count(r, &mut okay, &mut other))?;
    Ok((okay, other))
}

/// Finds the victim's MAC by ARP.
fn resolve(
    nf: &mut Netfront,
    w: &mut Waiter,
    victim: [u8; 4],
) -> Result<Option<[u8; 6]>, NetError> {
    let me = (nf.mac(), nf.ip());
    let ask = net::arp_frame([0xff; 6], me.0, 1, me.0, me.1, [0; 6], victim, None);
    let deadline = time_ns() + RESOLVE_NS;
    while time_ns() < deadline {
        nf.reap_tx()?;
        match nf.send_frame(&ask) {
            Ok(()) | Err(NetError::Busy) => {}
            Err(e) => return Err(e),
        }
        let step = (time_ns() + 200_000_000).min(deadline);
        while time_ns() < step {
            let mut found = None;
            while let Some(()) = nf.recv_frame(|f| {
                if let Some((mac, ip)) = net::arp_reply_sender(f) {
                    if ip == victim {
                        found = Some(mac);
                    }
                }
            })? {}
            if found.is_some() {
                return Ok(found);
            }
            nf.wait(w, step)?;
        }
    }
    Ok(None)
}

/// The spoofer.
pub fn spoof(si: &StartInfo<'_>, victim_ip: [u8; 4], count: u64, vif: Option<&str>) -> i64 {
    let who = "net-spoof";
    let Some((mut nf, mut w)) = net::connect(si, who, vif, net::config()) else {
        return 1;
    };
    let v_mac = match resolve(&mut nf, &mut w, victim_ip) {
        Ok(Some(m)) => m,
        Ok(None) => {
            println!("{who}: {} never answered ARP", Ip(victim_ip));
            net::close(nf, &mut w, who);
            return 1;
        }
        Err(e) => {
            println!("{who}: {e}");
            return 1;
        }
    };
    println!("{who}: victim {} is at {}", Ip(victim_ip), Mac(v_mac));
    // The ARP requests' answers, before the counting starts.
    let _ = send_all(&mut nf, &mut w, &[], &mut |_: &[u8]| {});
    let me = (nf.mac(), nf.ip());
    let mut ok = true;
    let mut sent = 0;
    let mut ignore = |_: &[u8]| {};
    for (k, kind) in KINDS.iter().enumerate() {
        let frames: Vec<Vec<u8>> = (0..count)
            .map(|_| spoofed_frame(k, me, (v_mac, victim_ip)))
            .collect();
        let (okay, refused) = match send_all(&mut nf, &mut w, &frames, &mut ignore) {
            Ok(r) => r,
            Err(e) => {
                println!("{who}: {kind}: {e}");
                (0, 0)
            }
        };
        sent += count;
        let all = refused == count;
        ok &= all;
        println!(
            "{who}: {kind}: {count} sent, {refused} refused, {okay} accepted{}",
            if all { "" } else { " (FAILED)" }
        );
        let _ = event(&WorkDone {
            work: &alloc::format!("spoof-sent-{kind}"),
            units: count,
        });
        let _ = event(&DataCheck {
            what: &alloc::format!("spoof-refused-{kind}"),
            bytes: refused,
            ok: all,
        });
    }
    let _ = event(&WorkDone {
        work: "spoof-sent",
        units: sent,
    });
    let control: Vec<Vec<u8>> = (0..CONTROLS)
        .map(|_| net::udp_frame(v_mac, me.0, me.1, victim_ip, CONTROL_MARK))
        .collect();
    match send_all(&mut nf, &mut w, &control, &mut ignore) {
        Ok((okay, _)) if okay == CONTROLS => {}
        Ok((okay, other)) => {
            println!("{who}: control frames: {okay} accepted, {other} refused (FAILED)");
            ok = false;
        }
        Err(e) => {
            println!("{who}: control frames: {e}");
            ok = false;
        }
    }
    net::close(nf, &mut w, who);
    i64::from(!ok)
}

/// The listener.
pub fn listen(si: &StartInfo<'_>, ms: u64, vif: Option<&str>) -> i64 {
    let who = "net-listen";
    let Some((mut nf, mut w)) = net::connect(si, who, vif, net::config()) else {
        return 1;
    };
    let deadline = time_ns().saturating_add(ms.saturating_mul(1_000_000));
    let mut seen = Seen::default();
    let mut iface = {
        let cfg = nf.interface_config(time_ns() ^ u64::from(si.domid));
        Interface::new(cfg, &mut nf, netfront::now())
    };
    nf.addresses(&mut iface);
    let mut sockets = SocketSet::new(alloc::vec![]);
    let mut first_control: Option<u64> = None;
    loop {
        let now = time_ns();
        if now >= deadline || first_control.is_some_and(|t| now >= t + LINGER_NS) {
            break;
        }
        let before = nf.stats().rx_frames;
        {
            let mut tap = Tap {
                nf: &mut nf,
                seen: &mut seen,
            };
            iface.poll(netfront::now(), &mut tap, &mut sockets);
        }
        if seen.control > 0 && first_control.is_none() {
            first_control = Some(now);
        }
        if nf.stats().rx_frames != before {
            continue;
        }
        let until = match first_control {
            Some(t) => deadline.min(t + LINGER_NS),
            None => deadline,
        }
        .min(now + 100_000_000);
        if let Err(e) = nf.wait(&mut w, until) {
            println!("{who}: {e}");
            break;
        }
    }
    let _ = event(&WorkDone {
        work: "spoofed-frames-seen",
        units: seen.spoofed,
    });
    let _ = event(&WorkDone {
        work: "control-frames-seen",
        units: seen.control,
    });
    println!(
        "{who}: {} spoofed frames seen, {} control frames seen",
        seen.spoofed, seen.control
    );
    net::close(nf, &mut w, who);
    i64::from(!(seen.spoofed == 0 && seen.control > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{marked, Marked};

    #[test]
    fn spoofed_frames_claim_the_victim() {
        let me = ([2, 0, 0, 0, 0, 3], [10, 0, 0, 3]);
        let v = ([2, 0, 0, 0, 0, 2], [10, 0, 0, 2]);
        for (k, kind) in KINDS.iter().enumerate() {
            let f = spoofed_frame(k, me, v);
            assert_eq!(marked(&f), Some(Marked::Spoofed), "{kind}");
            let src: [u8; 6] = f[6..12].try_into().unwrap();
            assert_eq!(src == v.0, k < 2, "{kind}: Ethernet source");
            let dst: [u8; 6] = f[0..6].try_into().unwrap();
            assert!(
                dst == v.0 || dst == [0xff; 6],
                "{}: reaches the victim",
                KINDS[k]
            );
            match k {
                0 | 2 => assert_eq!(&f[28..32], &v.1, "ARP sender IPv4"),
                _ => assert_eq!(&f[26..30], &v.1, "IPv4 source"),
            }
        }
        // ip-arp: our own MAC as the ARP sender.
        assert_eq!(&spoofed_frame(2, me, v)[22..28], &me.0);
    }
}
