//! `role=hostile-netfront [cases=a,b,...] [vif=NAME]`: a frontend that
//! breaks netif's rules on its own TX ring, one case at a time, and checks
//! that netback answers every slot of each bad packet with an error (or
//! ends the connection), and that nothing else happens.
//!
//! | case | what is published | expected |
//! |---|---|---|
//! | `control` | a valid 60-byte frame (a broadcast ARP request, from its own addresses) | one OKAY (the cases below mean something) |
//! | `bad-gref` | one slot naming a ref this domain never granted | ERROR or DROPPED |
//! | `slots-over` | two slots; the second's size (100) is more than the first declares for the whole packet (60) | each slot not OKAY |
//! | `slots-under` | two slots; the first declares 4000 bytes at offset 2048, so what is left for it reaches past its page | each slot not OKAY |
//! | `too-many-slots` | 19 slots (netif's limit is 18) of 60 bytes each | each slot not OKAY |
//! | `past-page` | one slot of 200 bytes at offset 4000 | not OKAY |
//! | `id-reuse` | two slots of one packet with the same id (the first still in flight) | each slot not OKAY |
//! | `rewrite` | a valid slot published, then rewritten (a never-granted ref, 5000 bytes) before the notification | exactly one response (which version netback read is printed) |
//! | `control-after` | the `control` frame again | one OKAY: the ring still works |
//! | `ring-jump` | req_prod moved 1000 past the ring | netback ends the connection (both back states leave Connected), last |
//!
//! "Not OKAY" is also met if netback ends the connection instead. Each case
//! is a `data_check {what: "hostile-net-CASE", bytes: slots, ok}`; the
//! summary is `work_done {work: "hostile-netfront", units: cases that
//! passed}` and a console line. Exit 0 iff every case run passed. Received
//! frames are drained and dropped throughout.

use alloc::vec::Vec;

use abi::ev::{DataCheck, WorkDone};
use abi::netif::{status, txf, TxRequest, TxResponse, TX_RING_SIZE};
use abi::ring::{RingPage, HEADER_SIZE};
use libdom::netfront::{NetError, Netfront};
use libdom::ring::Waiter;
use libdom::{event, grant, println, time_ns, StartInfo};

use crate::net;

/// Every case, in the order they run.
pub const CASES: [&str; 10] = [
    "control",
    "bad-gref",
    "slots-over",
    "slots-under",
    "too-many-slots",
    "past-page",
    "id-reuse",
    "rewrite",
    "control-after",
    "ring-jump",
];

/// A reference this domain never grants (the top of its one-page table).
pub const NEVER_GRANTED: u32 = grant::TABLE_ENTRIES as u32 - 1;
/// Ids the raw requests use: above any buffer's, so netfront never takes
/// their responses for its own.
const RAW_ID: u16 = 0x8000;
const WAIT_NS: u64 = 5_000_000_000;

/// The cases named in `cases=` (comma-separated), in [`CASES`]'s order.
pub fn pick(list: Option<&str>) -> Result<Vec<&'static str>, alloc::string::String> {
    let Some(list) = list else {
        return Ok(CASES.to_vec());
    };
    for c in list.split(',') {
        if !CASES.contains(&c) {
            return Err(alloc::format!(
                "unknown case \"{c}\" (one of {})",
                CASES.join(", ")
            ));
        }
    }
    Ok(CASES
        .iter()
        .copied()
        .filter(|c| list.split(',').any(|x| x == *c))
        .collect())
}

/// The requests of case `case` (not `ring-jump`), with ids from `id`;
/// `good` is the grant ref and offset of a page holding a valid frame of
/// [`FRAME_LEN`] bytes at offset 0, and at offsets `FRAME_LEN * k` for the
/// multi-slot cases.
pub fn requests(case: &str, good: u32, id: u16) -> Vec<TxRequest> {
    let one = |gref, offset, size, flags, id| TxRequest {
        gref,
        offset,
        flags,
        id,
        size,
    };
    let more = txf::MORE_DATA;
    let n = FRAME_LEN as u16;
    match case {
        "control" | "control-after" | "rewrite" => alloc::vec![one(good, 0, n, 0, id)],
        "bad-gref" => alloc::vec![one(NEVER_GRANTED, 0, n, 0, id)],
        "slots-over" => alloc::vec![one(good, 0, n, more, id), one(good, n, 100, 0, id + 1)],
        "slots-under" => alloc::vec![
            one(good, 2048, 4000, more, id),
            one(good, 0, 100, 0, id + 1)
        ],
        "too-many-slots" => {
            let slots = 19u16;
            (0..slots)
                .map(|k| {
                    let flags = if k + 1 < slots { more } else { 0 };
                    let size = if k == 0 { n * slots } else { n };
                    one(good, k * n, size, flags, id + k)
                })
                .collect()
        }
        "past-page" => alloc::vec![one(good, 4000, 200, 0, id)],
        "id-reuse" => alloc::vec![one(good, 0, 2 * n, more, id), one(good, n, n, 0, id)],
        _ => Vec::new(),
    }
}

/// Bytes of the valid frame.
pub const FRAME_LEN: usize = 60;

fn report(case: &str, slots: usize, ok: bool, how: &str) -> bool {
    println!(
        "hostile-netfront: {case}: {} ({how})",
        if ok { "ok" } else { "FAILED" }
    );
    let _ = event(&DataCheck {
        what: &alloc::format!("hostile-net-{case}"),
        bytes: slots as u64,
        ok,
    });
    ok
}

/// Waits until `want` responses arrived (or the backend ended the
/// connection, or the time is up); the responses.
fn collect(
    nf: &mut Netfront,
    w: &mut Waiter,
    want: usize,
    extra_ns: u64,
) -> Result<Vec<TxResponse>, NetError> {
    let mut got = Vec::new();
    let deadline = time_ns() + WAIT_NS;
    loop {
        nf.take_tx_responses(|r| got.push(r))?;
        while nf.recv_frame(|_| ())?.is_some() {}
        if nf.backend_ended() || time_ns() >= deadline {
            break;
        }
        if got.len() >= want {
            // A little longer: a second response to one slot would show.
            let until = time_ns() + extra_ns;
            while time_ns() < until {
                nf.take_tx_responses(|r| got.push(r))?;
                let _ = nf.wait(w, until);
            }
            nf.take_tx_responses(|r| got.push(r))?;
            break;
        }
        match nf.wait(w, deadline) {
            Ok(_) => {}
            Err(NetError::Conn(_)) if nf.backend_ended() => break,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn statuses(rs: &[TxResponse]) -> alloc::string::String {
    let v: Vec<alloc::string::String> = rs
        .iter()
        .map(|r| alloc::format!("{:#x}:{}", r.id, r.status))
        .collect();
    v.join(" ")
}

/// Runs the cases.
pub fn run(si: &StartInfo<'_>, cases: &[&str], vif: Option<&str>) -> i64 {
    let who = "hostile-netfront";
    let Some((mut nf, mut w)) = net::connect(si, who, vif, net::config()) else {
        return 1;
    };
    // A valid frame (a broadcast ARP request from our own addresses for an
    // address nobody has) at every FRAME_LEN of the page of TX buffer 0.
    let (mac, ip) = (nf.mac(), nf.ip());
    let frame = net::arp_frame(
        [0xff; 6],
        mac,
        1,
        mac,
        ip,
        [0; 6],
        [ip[0], ip[1], ip[2], 253],
        None,
    );
    let Some((good, 0)) = nf.tx_buffer(0) else {
        println!("{who}: no TX buffer 0");
        return 1;
    };
    let mut page = alloc::vec![0u8; 4096];
    for chunk in page.chunks_exact_mut(FRAME_LEN) {
        chunk.copy_from_slice(&frame);
    }
    if nf.fill_tx_page(0, 0, &page).is_err() {
        return 1;
    }
    let mut passed = 0u64;
    let mut ran = 0u64;
    let mut id = RAW_ID;
    for &case in cases {
        if nf.backend_ended() {
            println!("{who}: {case}: not run: the backend ended the connection");
            report(case, 0, false, "not run");
            ran += 1;
            continue;
        }
        ran += 1;
        let ok = if case == "ring-jump" {
            let prod = nf.tx_req_prod_pvt().wrapping_add(TX_RING_SIZE + 1000);
            if let Err(e) = nf.set_tx_req_prod(prod) {
                println!("{who}: {case}: {e}");
            }
            let deadline = time_ns() + WAIT_NS;
            while !nf.backend_ended() && time_ns() < deadline {
                while matches!(nf.recv_frame(|_| ()), Ok(Some(_))) {}
                let _ = nf.wait(&mut w, deadline);
            }
            let (t, r) = nf.back_states();
            report(
                case,
                0,
                nf.backend_ended(),
                &alloc::format!("back states {t:?} {r:?}"),
            )
        } else {
            let reqs = requests(case, good, id);
            id = id.wrapping_add(reqs.len() as u16 + 1) | RAW_ID;
            let mut put = Ok(0);
            for r in &reqs {
                put = put.and(nf.put_tx_raw(r));
            }
            let idx = match put {
                Ok(_) => nf.tx_req_prod_pvt().wrapping_sub(reqs.len() as u32),
                Err(e) => {
                    report(case, reqs.len(), false, &alloc::format!("{e}"));
                    continue;
                }
            };
            let pushed = if case == "rewrite" {
                let bad = TxRequest {
                    gref: NEVER_GRANTED,
                    size: 5000,
                    ..reqs[0]
                };
                let slot =
                    HEADER_SIZE + (idx & (TX_RING_SIZE - 1)) as usize * abi::netif::TX_ENTRY_SIZE;
                nf.push_tx_then(|p| p.write(slot, &bad.encode()))
            } else {
                nf.push_tx_then(|_| {})
            };
            if let Err(e) = pushed {
                report(case, reqs.len(), false, &alloc::format!("{e}"));
                continue;
            }
            let extra = if case == "rewrite" {
                500_000_000
            } else {
                50_000_000
            };
            let got = match collect(&mut nf, &mut w, reqs.len(), extra) {
                Ok(g) => g,
                Err(e) => {
                    report(case, reqs.len(), false, &alloc::format!("{e}"));
                    continue;
                }
            };
            let ended = nf.backend_ended();
            let how = alloc::format!(
                "{} slots, responses [{}]{}",
                reqs.len(),
                statuses(&got),
                if ended { ", connection ended" } else { "" }
            );
            let ok = match case {
                "control" | "control-after" => {
                    got.len() == 1 && got[0].status == status::OKAY && got[0].id == reqs[0].id
                }
                "rewrite" => ended || got.len() == 1,
                _ => {
                    (ended && got.iter().all(|r| r.status != status::OKAY))
                        || (got.len() == reqs.len()
                            && got.iter().all(|r| r.status != status::OKAY)
                            && got.iter().zip(&reqs).all(|(r, q)| r.id == q.id))
                }
            };
            report(case, reqs.len(), ok, &how)
        };
        if ok {
            passed += 1;
        }
    }
    let _ = event(&WorkDone {
        work: "hostile-netfront",
        units: passed,
    });
    let st = nf.stats();
    println!(
        "hostile-netfront: {passed} of {ran} cases passed ({} TX responses to raw requests, {} not kept)",
        st.tx_strays, st.tx_unseen
    );
    net::close(nf, &mut w, who);
    i64::from(passed != ran)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_are_picked_in_order() {
        assert_eq!(pick(None).unwrap(), CASES.to_vec());
        assert_eq!(
            pick(Some("ring-jump,control")).unwrap(),
            ["control", "ring-jump"]
        );
        assert!(pick(Some("control,nope")).unwrap_err().contains("\"nope\""));
    }

    #[test]
    fn each_case_breaks_one_rule() {
        let page = 4096u32;
        let sum_later = |r: &[TxRequest]| r[1..].iter().map(|q| u32::from(q.size)).sum::<u32>();
        let r = requests("control", 30, RAW_ID);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].gref, r[0].offset, r[0].size, r[0].flags),
            (30, 0, 60, 0)
        );
        assert_eq!(requests("bad-gref", 30, RAW_ID)[0].gref, NEVER_GRANTED);
        let r = requests("slots-over", 30, RAW_ID);
        assert!(r[0].more_data() && !r[1].more_data());
        assert!(sum_later(&r) > u32::from(r[0].size));
        let r = requests("slots-under", 30, RAW_ID);
        let first_own = u32::from(r[0].size) - sum_later(&r);
        assert!(u32::from(r[0].offset) + first_own > page);
        let r = requests("too-many-slots", 30, RAW_ID);
        assert_eq!(r.len(), abi::netif::MAX_SLOTS_PER_PACKET + 1);
        assert_eq!(u32::from(r[0].size) - sum_later(&r), 60);
        assert!(r.iter().all(|q| u32::from(q.offset) + 60 <= page));
        assert!(r[..18].iter().all(|q| q.more_data()) && !r[18].more_data());
        let r = requests("past-page", 30, RAW_ID);
        assert!(u32::from(r[0].offset) + u32::from(r[0].size) > page);
        let r = requests("id-reuse", 30, RAW_ID);
        assert_eq!(r[0].id, r[1].id);
        assert_eq!(u32::from(r[0].size) - sum_later(&r), 60);
        assert!(requests("ring-jump", 30, RAW_ID).is_empty());
    }
}
