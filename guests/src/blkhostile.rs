//! `role=hostile-blkfront vbd=xvda [other=NAME]`: a frontend that breaks
//! blkif's rules on its own ring, one case at a time, and checks that the
//! backend answers each with an error response (or, for the ring jump,
//! ends the connection) and that nothing else happens.
//!
//! | case | what is sent | expected |
//! |---|---|---|
//! | `control` | a valid 8-sector READ at sector 0 | OKAY (the cases below mean something) |
//! | `nsegs-12` | READ with nr_segments 12 | an error |
//! | `first-gt-last` | a segment with first_sect 4 > last_sect 2 | an error |
//! | `last-sect-8` | a segment with last_sect 8 | an error |
//! | `past-range` | READ of 8 sectors straddling the vbd's end | an error |
//! | `unknown-op` | operation 0x7f | an error (EOPNOTSUPP) |
//! | `never-granted` | a ref this domain never granted | an error |
//! | `other-domain` | a ref granted to another domain (`other`, default the first peer that is not the backend) | an error |
//! | `ro-for-read` | a READ into a page granted read-only | an error |
//! | `rewrite` | a valid READ published, then its slot rewritten to nr_segments 12 before the notification | exactly one response (which version the backend copied is printed) |
//! | `ring-jump` | req_prod moved 1000 past the ring | the backend ends the connection (Closing or Closed), last |
//!
//! Each case is a `data_check {what: "hostile-CASE", ok}`; the summary is
//! `work_done {work: "hostile-blkfront", units: cases that passed}` and a
//! console line. Exit 0 iff every case passed.

use abi::blkif::{op, Request, Segment, ENTRY_SIZE, RING_SIZE};
use abi::ev::{DataCheck, WorkDone};
use abi::ring::{off, RingPage, State, HEADER_SIZE};
use libdom::blkfront::{data_request, BlkError, Blkfront, Done};
use libdom::ring::Waiter;
use libdom::{event, grant, println, time_ns, StartInfo};

const TIMEOUT_NS: u64 = 5_000_000_000;

/// Every case, in the order they run.
pub const CASES: [&str; 11] = [
    "control",
    "nsegs-12",
    "first-gt-last",
    "last-sect-8",
    "past-range",
    "unknown-op",
    "never-granted",
    "other-domain",
    "ro-for-read",
    "rewrite",
    "ring-jump",
];

/// A reference this domain never grants (the top of its one-page table).
pub const NEVER_GRANTED: u32 = grant::TABLE_ENTRIES as u32 - 1;

fn report(case: &str, ok: bool, how: &str) -> bool {
    println!(
        "hostile-blkfront: {case}: {} ({how})",
        if ok { "ok" } else { "FAILED" }
    );
    let _ = event(&DataCheck {
        what: &alloc::format!("hostile-{case}"),
        bytes: 0,
        ok,
    });
    ok
}

/// Sends `req` on slot 0 and waits for its answer.
fn answer(bf: &mut Blkfront, w: &mut Waiter, req: &Request) -> Result<Done, BlkError> {
    bf.submit_raw(0, req, 8)?;
    bf.complete_slot(0, w, time_ns() + TIMEOUT_NS, |_| {})
}

/// A case that must be refused: an error status.
fn refused(bf: &mut Blkfront, w: &mut Waiter, case: &str, req: Request) -> bool {
    match answer(bf, w, &req) {
        Ok(d) => report(case, !d.ok(), &alloc::format!("status {}", d.status)),
        Err(e) => report(case, false, &alloc::format!("{e}")),
    }
}

/// `role=hostile-blkfront`'s main.
pub fn run(si: &StartInfo<'_>, vbd_name: &str, other: Option<&str>) -> i64 {
    let Some(vbd) = si.vbd(vbd_name) else {
        println!("hostile-blkfront: no vbd \"{vbd_name}\" in my start info");
        return 1;
    };
    let other = match other {
        Some(n) => si.peer(n),
        None => si
            .peers
            .iter()
            .flatten()
            .find(|p| p.domid != vbd.peer)
            .copied(),
    };
    let Some(other) = other else {
        println!("hostile-blkfront: no other domain to grant a page to");
        return 1;
    };
    let mut w = match Waiter::new() {
        Ok(w) => w,
        Err(e) => {
            println!("hostile-blkfront: no timer: {}", e.name());
            return 1;
        }
    };
    let mut bf = match Blkfront::connect(&vbd, 2, &mut w, time_ns() + 10 * TIMEOUT_NS) {
        Ok(b) => b,
        Err(e) => {
            println!("hostile-blkfront: {vbd_name}: {e}");
            return 1;
        }
    };
    let grefs = |write: bool| -> [u32; 11] {
        core::array::from_fn(|i| bf.gref(0, i, write).unwrap_or(NEVER_GRANTED))
    };
    let (rw, ro) = (grefs(false), grefs(true));
    let read = |id: u64, sector: u64| data_request(&rw, op::READ, sector, 8, id);
    let mut passed = 0u64;
    let mut count = |ok: bool| passed += u64::from(ok);

    // control
    let id = bf.next_id();
    match answer(&mut bf, &mut w, &read(id, 0)) {
        Ok(d) => count(report(
            "control",
            d.ok(),
            &alloc::format!("status {}", d.status),
        )),
        Err(e) => count(report("control", false, &alloc::format!("{e}"))),
    }

    let mut req = read(bf.next_id(), 0);
    req.nr_segments = 12;
    count(refused(&mut bf, &mut w, "nsegs-12", req));

    let mut req = read(bf.next_id(), 0);
    req.seg[0] = Segment {
        gref: rw[0],
        first_sect: 4,
        last_sect: 2,
    };
    count(refused(&mut bf, &mut w, "first-gt-last", req));

    let mut req = read(bf.next_id(), 0);
    req.seg[0].last_sect = 8;
    count(refused(&mut bf, &mut w, "last-sect-8", req));

    let req = read(bf.next_id(), bf.sectors().saturating_sub(4));
    count(refused(&mut bf, &mut w, "past-range", req));

    let mut req = read(bf.next_id(), 0);
    req.operation = 0x7f;
    count(refused(&mut bf, &mut w, "unknown-op", req));

    let mut req = read(bf.next_id(), 0);
    req.seg[0].gref = NEVER_GRANTED;
    count(refused(&mut bf, &mut w, "never-granted", req));

    // A page of ours granted to someone else.
    let page = alloc::boxed::Box::new(Page([0; 4096]));
    let va = &*page as *const Page as u64;
    match grant::grant(other.domid, va, false) {
        Ok(g) => {
            let mut req = read(bf.next_id(), 0);
            req.seg[0].gref = g;
            count(refused(&mut bf, &mut w, "other-domain", req));
            if let Err(e) = grant::revoke(g) {
                println!(
                    "hostile-blkfront: revoking the grant to {}: {e}",
                    other.name
                );
                // Still granted: never give the page back to the heap.
                core::mem::forget(page);
            } else {
                drop(page);
            }
        }
        Err(e) => {
            drop(page);
            count(report(
                "other-domain",
                false,
                &alloc::format!("granting: {e}"),
            ));
        }
    }

    let mut req = read(bf.next_id(), 0);
    req.seg[0].gref = ro[0];
    count(refused(&mut bf, &mut w, "ro-for-read", req));

    // rewrite: publish, rewrite the slot, then notify.
    let id = bf.next_id();
    let good = read(id, 0);
    let mut bad = good;
    bad.nr_segments = 12;
    let rewritten = {
        let r = bf.submit_raw_then(0, &good, 8, |idx, page| {
            let at = HEADER_SIZE + (idx & (RING_SIZE - 1)) as usize * ENTRY_SIZE;
            page.write(at, &bad.encode());
        });
        r.and_then(|()| bf.complete_slot(0, &mut w, time_ns() + TIMEOUT_NS, |_| {}))
    };
    match rewritten {
        Ok(d) => {
            // One more look: a second response for the id would be a stray.
            let _ = bf.poll(|_| {});
            let one = bf.stats().strays == 0;
            let saw = if d.ok() {
                "the original"
            } else {
                "the rewrite"
            };
            count(report(
                "rewrite",
                one,
                &alloc::format!(
                    "one response, status {}: the backend copied {saw}",
                    d.status
                ),
            ));
        }
        Err(e) => count(report("rewrite", false, &alloc::format!("{e}"))),
    }

    // ring-jump, last: the backend must end the connection.
    {
        let conn = bf.conn_mut();
        let (ring, page) = conn.parts();
        let jump = ring.req_prod_pvt().wrapping_add(1000);
        page.fence();
        page.store_u32(off::REQ_PROD, jump);
        page.fence();
        let _ = conn.notify();
    }
    let deadline = time_ns() + TIMEOUT_NS;
    let mut state = bf.back_state();
    while !matches!(state, Some(State::Closing | State::Closed)) && time_ns() < deadline {
        let port = bf.conn_mut().port();
        if w.wait(port, deadline).is_err() {
            break;
        }
        state = bf.back_state();
    }
    count(report(
        "ring-jump",
        matches!(state, Some(State::Closing | State::Closed)),
        &alloc::format!("backend state {}", state.map_or("not a state", State::name)),
    ));

    let s = bf.stats();
    if let Err(e) = bf.close(&mut w, time_ns() + TIMEOUT_NS) {
        println!("hostile-blkfront: closing: {e}");
    }
    let total = CASES.len() as u64;
    println!(
        "hostile-blkfront: {passed} of {total} cases as expected; {} requests, {} error responses, {} strays",
        s.requests, s.errors, s.strays
    );
    let _ = event(&WorkDone {
        work: "hostile-blkfront",
        units: passed,
    });
    i64::from(passed != total)
}

/// A page-aligned page.
#[repr(C, align(4096))]
struct Page([u8; 4096]);
