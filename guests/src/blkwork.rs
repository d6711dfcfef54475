//! `role=blkfront`: a disk workload over blkfront.
//!
//! ```text
//! role=blkfront vbd=xvda [write=S..E] [verify=S..E] [pattern=A] [outside=1]
//!               [seq_mb=8] [bs=64k] [depth=4] [rand=N] [write_mb=N] [expect=denied]
//!               [wait_ms=10000]
//! ```
//!
//! In this order, each step optional:
//!
//! 1. connect to the vbd named `vbd` in the start info (the backend has
//!    `wait_ms` to come up);
//! 2. `write`: sectors S..E of the vbd get `pattern` (`driver_domains::
//!    blk_pattern`, numbered by the vbd's own sectors), `depth` requests in
//!    flight, then a flush; `data_check {what: "blkfront-write"}`;
//! 3. `verify`: sectors S..E are read back and compared with `pattern`;
//!    `data_check {what: "blkfront-verify"}`;
//! 4. `outside=1`: a read that straddles the end of the vbd and one wholly
//!    past it must both get an error response; `data_check {what:
//!    "blkfront-outside"}`;
//! 5. `seq_mb`: that many MiB read sequentially from sector 0 (wrapping at
//!    the vbd's end) in blocks of `bs` (one request each if the backend
//!    takes INDIRECT requests that large, else split into requests of at
//!    most 44 KiB: `libdom::blkfront::Shape`), `depth` blocks in flight; `throughput {what: "blk-seq-read"}`,
//!    `work_done {work: "blk-seq-read-64k", units: bytes}` and a console
//!    line with MB/s;
//! 6. `rand`: that many 4 KiB reads at pseudo-random places, `depth` in
//!    flight; `throughput {what: "blk-rand-read"}`;
//! 7. `write_mb`: that many MiB written sequentially from sector 0 (wrapping
//!    like `seq_mb`) in blocks of `bs`, `depth` blocks in flight, then a
//!    flush, all timed; the data is not a pattern (the blk driver domain's
//!    `write_mb` twin writes whatever its buffers hold, and this writes
//!    whatever blkfront's pages hold: writes are filled in place, with
//!    `Blkfront::submit_write_with`); `throughput {what: "blk-seq-write"}`;
//! 8. the connection is closed cleanly.
//!
//! With `expect=denied` the connection must *not* come up (the policy
//! refuses the backend the ring): `data_check {what: "blkfront-denied",
//! ok}` and nothing else is tried.
//!
//! Exit 0 iff every check passed.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

use abi::blkif::SECTOR_SIZE;
use abi::ev::{DataCheck, Throughput, WorkDone};
use driver_domains::blk_pattern::{self, SECTOR};
use libdom::args::ArgError;
use libdom::blkfront::{BlkError, Blkfront, Done};
use libdom::ring::Waiter;
use libdom::{event, println, time_ns, Args, StartInfo};

/// How long a request may take before the workload gives up.
const REQUEST_TIMEOUT_NS: u64 = 5_000_000_000;
/// Most MiB `seq_mb` takes.
pub const SEQ_MB_MAX: u64 = 1024;

/// What `role=blkfront` does, from its args.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan<'a> {
    pub vbd: &'a str,
    pub write: Option<Range<u64>>,
    pub verify: Option<Range<u64>>,
    pub pattern: &'a str,
    pub outside: bool,
    /// Bytes of sequential reads (0: none).
    pub seq_bytes: u64,
    /// Bytes per block (a multiple of 512).
    pub bs: u64,
    /// Blocks in flight.
    pub depth: u32,
    /// Random 4 KiB reads.
    pub rand: u64,
    /// Bytes of timed sequential writes (0: none).
    pub write_bytes: u64,
    pub expect_denied: bool,
    pub wait_ms: u64,
}

/// `64k`, `4K`, `1m`, `512`: bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1024),
        b'm' | b'M' => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

fn arg_err(e: ArgError<'_>) -> String {
    format!("{e}")
}

impl<'a> Plan<'a> {
    /// The keys `role=blkfront` takes.
    pub const KEYS: [&'static str; 13] = [
        "role", "vbd", "write", "verify", "pattern", "outside", "seq_mb", "bs", "depth", "rand",
        "write_mb", "expect", "wait_ms",
    ];

    pub fn parse(args: &'a str) -> Result<Self, String> {
        let a = Args::parse(args).map_err(arg_err)?;
        a.only(&Self::KEYS).map_err(arg_err)?;
        let range = |key: &str| -> Result<Option<Range<u64>>, String> {
            a.get(key)
                .map(|v| {
                    blk_pattern::parse_range(v).map_err(|e| format!("argument {key}=\"{v}\": {e}"))
                })
                .transpose()
        };
        let pattern = a.get("pattern").unwrap_or("A");
        if !blk_pattern::valid_name(pattern) {
            return Err(format!(
                "argument pattern=\"{pattern}\" is not a pattern name (1-8 of A-Z a-z 0-9 _ -)"
            ));
        }
        let bs = match a.get("bs") {
            None => 64 * 1024,
            Some(v) => parse_bytes(v)
                .filter(|&n| n > 0 && n % SECTOR_SIZE == 0 && n <= 1 << 20)
                .ok_or_else(|| {
                    format!("argument bs=\"{v}\" is not a size of whole sectors up to 1m")
                })?,
        };
        let depth = a.u64_or("depth", 4).map_err(arg_err)?;
        if !(1..=32).contains(&depth) {
            return Err(format!("argument depth={depth} is outside 1..=32"));
        }
        let mb = |key: &str| -> Result<u64, String> {
            let mb = a.u64_or(key, 0).map_err(arg_err)?;
            if mb > SEQ_MB_MAX {
                return Err(format!("argument {key}={mb} is over {SEQ_MB_MAX}"));
            }
            Ok(mb << 20)
        };
        let seq_bytes = mb("seq_mb")?;
        let write_bytes = mb("write_mb")?;
        let expect_denied = match a.get("expect") {
            None => false,
            Some("denied") => true,
            Some(v) => return Err(format!("argument expect=\"{v}\": only \"denied\"")),
        };
        Ok(Plan {
            vbd: a.get("vbd").unwrap_or("xvda"),
            write: range("write")?,
            verify: range("verify")?,
            pattern,
            outside: a.u64_or("outside", 0).map_err(arg_err)? != 0,
            seq_bytes,
            bs,
            depth: depth as u32,
            rand: a.u64_or("rand", 0).map_err(arg_err)?,
            write_bytes,
            expect_denied,
            wait_ms: a.u64_or("wait_ms", 10_000).map_err(arg_err)?,
        })
    }

    /// Sectors of a block.
    pub fn block_sectors(&self) -> u32 {
        (self.bs / SECTOR_SIZE) as u32
    }
}

/// Splits `sectors` into requests of at most `max` sectors that never
/// cross a multiple of `block` (so each block's requests are its own).
pub fn split(sectors: Range<u64>, block: u64, max: u64) -> impl Iterator<Item = (u64, u32)> {
    let mut at = sectors.start;
    core::iter::from_fn(move || {
        if at >= sectors.end {
            return None;
        }
        let block_end = (at / block + 1) * block;
        let n = (sectors.end.min(block_end) - at).min(max);
        let r = (at, n as u32);
        at += n;
        Some(r)
    })
}

/// `total` sectors in whole blocks of `block` from sector 0, wrapping at
/// the last whole block of a disk of `disk` sectors, as requests of at
/// most `max` sectors.
pub fn sequential(disk: u64, block: u64, total: u64, max: u64) -> impl Iterator<Item = (u64, u32)> {
    let blocks_on_disk = (disk / block).max(1);
    (0..total.div_ceil(block)).flat_map(move |b| {
        let start = (b % blocks_on_disk) * block;
        split(start..(start + block).min(disk), block, max)
    })
}

/// xorshift64: the random reads' offsets.
pub fn next_rand(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Fills a write's data in place (a page of blkfront's at a time): the
/// sector it starts at, its bytes.
type Fill<'a> = &'a dyn Fn(u64, &mut [u8]);

fn data_check(what: &str, bytes: u64, ok: bool) {
    let _ = event(&DataCheck { what, bytes, ok });
}

/// Runs `reqs` (sector, sectors; reads or, with `fill`, writes) with at
/// most `in_flight` outstanding; `done` sees each completion (with the
/// frontend, to copy a read's data out). Returns (requests, failed).
fn stream(
    bf: &mut Blkfront,
    w: &mut Waiter,
    reqs: &mut dyn Iterator<Item = (u64, u32)>,
    in_flight: usize,
    fill: Option<Fill<'_>>,
    done: &mut dyn FnMut(&Blkfront, Done) -> bool,
) -> Result<(u64, u64), BlkError> {
    let (mut count, mut failed) = (0u64, 0u64);
    let mut batch: Vec<Done> = Vec::with_capacity(abi::blkif::RING_SIZE as usize);
    let mut more = true;
    let mut deadline = time_ns() + REQUEST_TIMEOUT_NS;
    loop {
        while more && bf.in_flight() < in_flight {
            let Some((sector, n)) = reqs.next() else {
                more = false;
                break;
            };
            match fill {
                Some(f) => {
                    // Straight into blkfront's granted pages.
                    bf.submit_write_with(sector, n, &mut |s, page| f(s, page))?;
                }
                None => {
                    bf.submit_read(sector, n)?;
                }
            }
            count += 1;
        }
        if bf.in_flight() == 0 {
            return Ok((count, failed));
        }
        batch.clear();
        bf.poll(|d| batch.push(d))?;
        let got = batch.len();
        for d in batch.drain(..) {
            if !done(bf, d) {
                failed += 1;
            }
        }
        if got > 0 {
            deadline = time_ns() + REQUEST_TIMEOUT_NS;
        } else if !bf.wait(w, deadline)? && time_ns() >= deadline {
            return Err(BlkError::Conn(libdom::ring::ConnError::Timeout {
                state: bf.back_state(),
            }));
        }
    }
}

/// Checks a read's sectors against the pattern (first sector `first`, the
/// vbd's numbering); returns the sectors that differ, printing the first
/// few.
fn check_pattern(pattern: &str, first: u64, data: &[u8], reported: &mut u32) -> u64 {
    let mut bad = 0;
    for (k, got) in data.chunks_exact(SECTOR).enumerate() {
        let s = first + k as u64;
        if let Some(at) = blk_pattern::mismatch(pattern, s, got) {
            bad += 1;
            if *reported < 4 {
                *reported += 1;
                println!(
                    "blkfront: sector {s} differs from pattern {pattern} at byte {at} ({:#04x}, expected {:#04x})",
                    got[at],
                    blk_pattern::sector(pattern, s)[at]
                );
            }
        }
    }
    bad
}

fn fill_pattern(pattern: &str) -> impl Fn(u64, &mut [u8]) + '_ {
    move |first, data| {
        for (k, s) in data.chunks_exact_mut(SECTOR).enumerate() {
            if let Ok(s) = <&mut [u8; SECTOR]>::try_from(s) {
                blk_pattern::fill(pattern, first + k as u64, s);
            }
        }
    }
}

/// MB/s (10^6 bytes per second) with two decimals, as hundredths.
pub fn mb_per_s_x100(bytes: u64, ns: u64) -> u64 {
    if ns == 0 {
        return 0;
    }
    (u128::from(bytes) * 100_000 / u128::from(ns)) as u64
}

/// Sequential or random reads, or (with `fill`) sequential writes and a
/// flush: reports `throughput`; false if a request failed.
#[allow(clippy::too_many_arguments)] // the workload's parts, each used once
fn measure(
    bf: &mut Blkfront,
    w: &mut Waiter,
    plan: &Plan<'_>,
    what: &str,
    reqs: &mut dyn Iterator<Item = (u64, u32)>,
    block: u64,
    in_flight: usize,
    fill: Option<Fill<'_>>,
) -> bool {
    let t0 = time_ns();
    let mut bytes = 0u64;
    let r = stream(bf, w, reqs, in_flight, fill, &mut |_, d| {
        bytes += u64::from(d.req.sectors) * SECTOR_SIZE;
        d.ok()
    });
    let (requests, failed) = match r {
        Ok(x) => x,
        Err(e) => {
            println!("blkfront: {what}: {e}");
            return false;
        }
    };
    // Writes end with a flush, timed like the blk driver domain's.
    if fill.is_some() {
        match bf.flush_sync(w, time_ns() + REQUEST_TIMEOUT_NS) {
            Ok(0) => {}
            r => {
                println!("blkfront: {what}: flush {r:?}");
                return false;
            }
        }
    }
    let ns = time_ns() - t0;
    let _ = event(&Throughput {
        what,
        bytes,
        requests,
        ns,
        block,
        depth: u64::from(plan.depth),
    });
    let mbs = mb_per_s_x100(bytes, ns);
    println!(
        "blkfront: {what}: {bytes} bytes in {requests} requests, {} us, {}.{:02} MB/s (block {block}, depth {}){}",
        ns / 1000,
        mbs / 100,
        mbs % 100,
        plan.depth,
        if failed > 0 { " -- some requests FAILED" } else { "" }
    );
    failed == 0
}

/// `role=blkfront`'s main.
pub fn run(si: &StartInfo<'_>, plan: &Plan<'_>) -> i64 {
    let Some(vbd) = si.vbd(plan.vbd) else {
        println!("blkfront: no vbd \"{}\" in my start info", plan.vbd);
        return 1;
    };
    let mut w = match Waiter::new() {
        Ok(w) => w,
        Err(e) => {
            println!("blkfront: no timer: {}", e.name());
            return 1;
        }
    };
    let deadline = time_ns() + plan.wait_ms.saturating_mul(1_000_000);
    let bf = Blkfront::connect_for(
        &vbd,
        plan.depth as usize,
        plan.block_sectors(),
        &mut w,
        deadline,
    );
    if plan.expect_denied {
        let ok = bf.is_err();
        match &bf {
            Err(e) => println!("blkfront: {}: no connection, as expected: {e}", plan.vbd),
            Ok(_) => println!(
                "blkfront: {}: connected, but the policy should deny it",
                plan.vbd
            ),
        }
        data_check("blkfront-denied", 0, ok);
        return i64::from(!ok);
    }
    let mut bf = match bf {
        Ok(b) => b,
        Err(e) => {
            println!("blkfront: {}: {e}", plan.vbd);
            return 1;
        }
    };
    println!(
        "blkfront: {} connected: {} sectors{}, backend domain {} (INDIRECT up to {} segments), {} slots of up to {} KiB",
        plan.vbd,
        bf.sectors(),
        if bf.readonly() { " (read-only)" } else { "" },
        vbd.peer,
        bf.backend_indirect(),
        bf.slot_count(),
        bf.max_request_bytes() / 1024
    );
    let mut all_ok = true;
    let mut reported = 0;
    let max = u64::from(bf.max_request_sectors());
    let in_flight = bf.slot_count();

    if let Some(r) = &plan.write {
        let fill = fill_pattern(plan.pattern);
        let res = stream(
            &mut bf,
            &mut w,
            &mut split(r.clone(), max, max),
            in_flight,
            Some(&fill),
            &mut |_, d| d.ok(),
        );
        let flushed = bf.flush_sync(&mut w, time_ns() + REQUEST_TIMEOUT_NS);
        let ok = matches!(res, Ok((_, 0))) && matches!(flushed, Ok(0));
        if !ok {
            println!("blkfront: writing {r:?}: {res:?}, flush {flushed:?}");
        }
        data_check("blkfront-write", (r.end - r.start) * SECTOR_SIZE, ok);
        all_ok &= ok;
    }

    if let Some(r) = &plan.verify {
        let mut buf = vec![0u8; bf.max_request_bytes()];
        let mut bad = 0u64;
        let pattern = plan.pattern;
        let res = stream(
            &mut bf,
            &mut w,
            &mut split(r.clone(), max, max),
            in_flight,
            None,
            &mut |bf, d| {
                if !d.ok() {
                    bad += u64::from(d.req.sectors);
                    return false;
                }
                let data = &mut buf[..d.req.sectors as usize * SECTOR];
                if bf.read_data(d.slot, data).is_err() {
                    return false;
                }
                bad += check_pattern(pattern, d.req.sector, data, &mut reported);
                true
            },
        );
        let ok = matches!(res, Ok((_, 0))) && bad == 0;
        if !ok {
            println!("blkfront: verifying {r:?}: {res:?}, {bad} sectors wrong");
        }
        data_check("blkfront-verify", (r.end - r.start) * SECTOR_SIZE, ok);
        all_ok &= ok;
    }

    if plan.outside {
        let end = bf.sectors();
        let mut buf = [0u8; 4096];
        let deadline = time_ns() + REQUEST_TIMEOUT_NS;
        let straddle = bf.read_sync(&mut w, end.saturating_sub(4), &mut buf, deadline);
        let past = bf.read_sync(&mut w, end, &mut buf[..SECTOR], deadline);
        let refused = |r: &Result<i16, BlkError>| matches!(r, Ok(s) if *s != 0);
        let ok = refused(&straddle) && refused(&past);
        println!(
            "blkfront: reads past the end of the vbd ({end} sectors): straddling {straddle:?}, wholly past {past:?}"
        );
        data_check("blkfront-outside", 0, ok);
        all_ok &= ok;
    }

    if plan.seq_bytes > 0 {
        let disk = bf.sectors();
        let block = plan.bs / SECTOR_SIZE;
        let total = plan.seq_bytes / SECTOR_SIZE;
        let mut reqs = sequential(disk, block, total, max);
        let ok = measure(
            &mut bf,
            &mut w,
            plan,
            "blk-seq-read",
            &mut reqs,
            plan.bs,
            in_flight,
            None,
        );
        if ok {
            let _ = event(&WorkDone {
                work: &format!("blk-seq-read-{}k", plan.bs / 1024),
                units: plan.seq_bytes,
            });
        }
        all_ok &= ok;
    }

    if plan.rand > 0 {
        let pages = (bf.sectors() / 8).max(1);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut reqs = (0..plan.rand).map(move |_| {
            x = next_rand(x);
            ((x % pages) * 8, 8u32)
        });
        let depth = (plan.depth as usize).min(bf.slot_count());
        all_ok &= measure(
            &mut bf,
            &mut w,
            plan,
            "blk-rand-read",
            &mut reqs,
            4096,
            depth,
            None,
        );
    }

    if plan.write_bytes > 0 {
        let block = plan.bs / SECTOR_SIZE;
        let mut reqs = sequential(bf.sectors(), block, plan.write_bytes / SECTOR_SIZE, max);
        all_ok &= measure(
            &mut bf,
            &mut w,
            plan,
            "blk-seq-write",
            &mut reqs,
            plan.bs,
            in_flight,
            Some(&|_, _| {}),
        );
    }

    let s = bf.stats();
    println!(
        "blkfront: {} requests, {} errors, {} stray responses, {} notifications sent, {} waits",
        s.requests, s.errors, s.strays, s.notifies, s.waits
    );
    if s.strays > 0 {
        all_ok = false;
    }
    if let Err(e) = bf.close(&mut w, time_ns() + REQUEST_TIMEOUT_NS) {
        println!("blkfront: closing: {e}");
        all_ok = false;
    }
    i64::from(!all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn plans_from_args() {
        let p = Plan::parse(
            "role=blkfront vbd=xvdb write=0..256 pattern=B verify=0..256 seq_mb=8 bs=64k depth=4",
        )
        .unwrap();
        assert_eq!(p.vbd, "xvdb");
        assert_eq!(
            (p.write.clone(), p.verify.clone()),
            (Some(0..256), Some(0..256))
        );
        assert_eq!(
            (p.pattern, p.seq_bytes, p.bs, p.depth),
            ("B", 8 << 20, 65536, 4)
        );
        assert_eq!(p.block_sectors(), 128);
        let w = Plan::parse("role=blkfront write_mb=4 bs=64k depth=16").unwrap();
        assert_eq!((w.write_bytes, w.seq_bytes), (4 << 20, 0));
        let d = Plan::parse("role=blkfront").unwrap();
        assert_eq!(
            (
                d.vbd,
                d.pattern,
                d.depth,
                d.bs,
                d.outside,
                d.expect_denied,
                d.wait_ms
            ),
            ("xvda", "A", 4, 65536, false, false, 10_000)
        );
        let big = Plan::parse("role=blkfront bs=1m depth=32").unwrap();
        assert_eq!((big.block_sectors(), big.depth), (2048, 32));
        assert!(
            Plan::parse("role=blkfront expect=denied outside=1")
                .unwrap()
                .expect_denied
        );
        for (args, msg) in [
            ("role=blkfront bs=100", "argument bs=\"100\""),
            ("role=blkfront bs=2m", "argument bs=\"2m\""),
            ("role=blkfront depth=0", "depth=0 is outside"),
            ("role=blkfront depth=33", "depth=33 is outside"),
            ("role=blkfront write=5..5", "argument write=\"5..5\""),
            ("role=blkfront pattern=toolongname", "argument pattern="),
            ("role=blkfront expect=ok", "only \"denied\""),
            ("role=blkfront colour=red", "unknown argument \"colour\""),
            ("role=blkfront seq_mb=2000", "seq_mb=2000 is over"),
            ("role=blkfront write_mb=2000", "write_mb=2000 is over"),
        ] {
            let e = Plan::parse(args).unwrap_err();
            assert!(e.contains(msg), "{args}: {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("64k"), Some(65536));
        assert_eq!(parse_bytes("4K"), Some(4096));
        assert_eq!(parse_bytes("1m"), Some(1 << 20));
        assert_eq!(parse_bytes("512"), Some(512));
        assert_eq!(parse_bytes("k"), None);
        assert_eq!(parse_bytes("1.5k"), None);
        assert_eq!(parse_bytes(""), None);
    }

    #[test]
    fn requests_split_at_blocks_and_the_request_limit() {
        let r: Vec<_> = split(0..256, 128, 88).collect();
        assert_eq!(r, [(0, 88), (88, 40), (128, 88), (216, 40)]);
        let r: Vec<_> = split(100..130, 128, 88).collect();
        assert_eq!(r, [(100, 28), (128, 2)]);
        let r: Vec<_> = split(0..200, 88, 88).collect();
        assert_eq!(r, [(0, 88), (88, 88), (176, 24)]);
        assert_eq!(split(5..5, 8, 8).count(), 0);
        // Sequential blocks wrap at the disk's last whole block.
        let r: Vec<_> = sequential(300, 128, 512, 88).collect();
        assert_eq!(
            r,
            [
                (0, 88),
                (88, 40),
                (128, 88),
                (216, 40),
                (0, 88),
                (88, 40),
                (128, 88),
                (216, 40)
            ]
        );
        let total: u64 = split(3..1000, 64, 88).map(|(_, n)| u64::from(n)).sum();
        assert_eq!(total, 997);
    }

    #[test]
    fn throughput_arithmetic() {
        // 8 MiB in 1 s is 8.38 MB/s.
        assert_eq!(mb_per_s_x100(8 << 20, 1_000_000_000), 838);
        assert_eq!(mb_per_s_x100(1, 0), 0);
        let mut x = 1;
        for _ in 0..100 {
            x = next_rand(x);
            assert_ne!(x, 0);
        }
    }
}
