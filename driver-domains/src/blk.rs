//! The blk driver domain's plan, from its `args`; pure, tested on the host.
//!
//! `verify=0..64 pattern=A write=64..128 pattern2=B batch=8 depth=4`,
//! `seq_mb=8 bs=64k depth=16 span=0..16384`, `rand=4096 depth=16`:
//!
//! - `verify=R pattern=P`: read sectors `R` and check each against sector
//!   of pattern `P` ([`crate::blk_pattern`]); `data_check {what:
//!   "blk-read"}`.
//! - `write=R pattern2=P`: write pattern `P` to sectors `R`, flush, read
//!   them back and check; `data_check {what: "blk-write"}`.
//! - `batch=N`: sectors per request of those two steps (default
//!   [`DEFAULT_BATCH`], at most [`MAX_BATCH`]).
//! - `seq_mb=N`: N MiB read sequentially from the start of `span`
//!   (wrapping at its last whole block) in requests of `bs` bytes (default
//!   64k, at most [`MAX_BATCH`] sectors), not checked; `throughput {what:
//!   "blk-seq-read"}`, as the guests' blkfront runner reports it
//!   (`guests/src/blkwork.rs`).
//! - `rand=N`: N reads of 4 KiB at pseudo-random 4 KiB-aligned places of
//!   `span` (the blkfront runner's generator and seed); `throughput {what:
//!   "blk-rand-read"}`.
//! - `write_mb=N`: N MiB written sequentially from the start of `span` in
//!   requests of `bs`, then a flush; `throughput {what: "blk-seq-write"}`.
//!   It runs last and overwrites `span`: it may not overlap `verify` or
//!   `write`.
//! - `span=S..E`: the sectors `seq_mb`, `rand` and `write_mb` use (default:
//!   the whole disk), e.g. a split configuration's vbd.
//! - `depth=N`: requests in flight at once, for every step (default
//!   [`DEFAULT_DEPTH`], at most [`MAX_DEPTH`]).
//!
//! Steps may be left out; at least one must be given. They run in the
//! order above.

use core::fmt;
use core::ops::Range;

use libdom::args::ArgError;
use libdom::Args;

use crate::blk_pattern::{self, RangeError, SECTOR};

/// The keys the domain takes.
pub const KEYS: &[&str] = &[
    "verify", "pattern", "write", "pattern2", "batch", "depth", "seq_mb", "bs", "rand", "write_mb",
    "span",
];
/// Sectors per request unless `batch` says otherwise.
pub const DEFAULT_BATCH: u64 = 8;
/// Most sectors per request (64 KiB). A request's data is one descriptor
/// (`vblk` hands the device each buffer whole; the heap is contiguous in
/// I/O addresses in both modes: strict mode maps the buffer's own pages),
/// so the limit is the bench's, not the queue's.
pub const MAX_BATCH: u64 = 128;
/// Requests in flight unless `depth` says otherwise.
pub const DEFAULT_DEPTH: u64 = 4;
/// Most requests in flight: `vblk`'s queue has [`crate::vblk::QUEUE_SIZE`]
/// (256) direct descriptors and a request takes three (header, its one
/// buffer, status), so 85 fit; 64 keeps each slot's buffer (up to 64 KiB)
/// within a few MiB of the domain's heap. Should the queue be full
/// anyway, the domain keeps fewer in flight rather than failing.
pub const MAX_DEPTH: u64 = 64;
const _: () = assert!(MAX_DEPTH as usize * 3 <= crate::vblk::QUEUE_SIZE);
/// Bytes per sequential request unless `bs` says otherwise.
pub const DEFAULT_BS: u64 = 64 * 1024;
/// The random reads' size (and alignment), in sectors: 4 KiB.
pub const RAND_SECTORS: u64 = 8;
/// Most MiB `seq_mb` and `write_mb` take.
pub const MB_MAX: u64 = 1024;

/// A range of sectors and the pattern it holds (or gets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step<'a> {
    pub sectors: Range<u64>,
    pub pattern: &'a str,
}

/// What the domain does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan<'a> {
    pub verify: Option<Step<'a>>,
    pub write: Option<Step<'a>>,
    pub batch: u64,
    pub depth: u64,
    /// Bytes read sequentially, unchecked (0: none).
    pub seq_bytes: u64,
    /// Bytes per sequential request (a multiple of 512).
    pub bs: u64,
    /// Random 4 KiB reads.
    pub rand: u64,
    /// Bytes written sequentially (0: none).
    pub write_bytes: u64,
    /// The sectors the measured steps use; `None`: the whole disk.
    pub span: Option<Range<u64>>,
}

/// Why the args were refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanError<'a> {
    Args(ArgError<'a>),
    Range {
        key: &'a str,
        why: RangeError,
    },
    /// A range without its pattern, or a pattern without its range.
    Unpaired {
        key: &'a str,
        needs: &'static str,
    },
    BadPattern {
        key: &'a str,
        name: &'a str,
    },
    BadBatch(u64),
    BadDepth(u64),
    BadBs(&'a str),
    TooMuch {
        key: &'a str,
        mb: u64,
    },
    /// `span` holds less than one request of a step that uses it.
    SmallSpan {
        sectors: u64,
        needs: u64,
    },
    Nothing,
    /// The write range overlaps the verify range, or `write_mb`'s span
    /// either of them.
    Overlap,
}

impl fmt::Display for PlanError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::Args(e) => write!(f, "{e}"),
            PlanError::Range { key, why } => write!(f, "{key}: {why}"),
            PlanError::Unpaired { key, needs } => write!(f, "{key} needs {needs}"),
            PlanError::BadPattern { key, name } => write!(
                f,
                "{key}=\"{name}\": a pattern name is 1-{} of A-Z a-z 0-9 _ -",
                blk_pattern::NAME_MAX
            ),
            PlanError::BadBatch(n) => write!(f, "batch={n}: expected 1..={MAX_BATCH}"),
            PlanError::BadDepth(n) => write!(f, "depth={n}: expected 1..={MAX_DEPTH}"),
            PlanError::BadBs(s) => write!(
                f,
                "bs=\"{s}\": expected whole sectors up to {}k (e.g. 4k, 64k)",
                MAX_BATCH * SECTOR as u64 / 1024
            ),
            PlanError::TooMuch { key, mb } => write!(f, "{key}={mb}: expected at most {MB_MAX}"),
            PlanError::SmallSpan { sectors, needs } => write!(
                f,
                "span: {sectors} sectors, less than one request of {needs}"
            ),
            PlanError::Nothing => {
                f.write_str("nothing to do: give verify=, write=, seq_mb=, rand= and/or write_mb=")
            }
            PlanError::Overlap => f.write_str(
                "the write range overlaps the verify range, or write_mb's span one of them",
            ),
        }
    }
}

fn step<'a>(
    args: &Args<'a>,
    range_key: &'a str,
    pattern_key: &'a str,
) -> Result<Option<Step<'a>>, PlanError<'a>> {
    match (args.get(range_key), args.get(pattern_key)) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(PlanError::Unpaired {
            key: range_key,
            needs: if pattern_key == "pattern" {
                "pattern="
            } else {
                "pattern2="
            },
        }),
        (None, Some(_)) => Err(PlanError::Unpaired {
            key: pattern_key,
            needs: if range_key == "verify" {
                "verify="
            } else {
                "write="
            },
        }),
        (Some(r), Some(p)) => {
            let sectors = blk_pattern::parse_range(r).map_err(|why| PlanError::Range {
                key: range_key,
                why,
            })?;
            if !blk_pattern::valid_name(p) {
                return Err(PlanError::BadPattern {
                    key: pattern_key,
                    name: p,
                });
            }
            Ok(Some(Step {
                sectors,
                pattern: p,
            }))
        }
    }
}

/// `64k`, `4K`, `512`: bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1024),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

fn overlap(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl<'a> Plan<'a> {
    pub fn parse(s: &'a str) -> Result<Self, PlanError<'a>> {
        let args = Args::parse(s).map_err(PlanError::Args)?;
        args.only(KEYS).map_err(PlanError::Args)?;
        let verify = step(&args, "verify", "pattern")?;
        let write = step(&args, "write", "pattern2")?;
        let batch = args
            .u64_or("batch", DEFAULT_BATCH)
            .map_err(PlanError::Args)?;
        if !(1..=MAX_BATCH).contains(&batch) {
            return Err(PlanError::BadBatch(batch));
        }
        let depth = args
            .u64_or("depth", DEFAULT_DEPTH)
            .map_err(PlanError::Args)?;
        if !(1..=MAX_DEPTH).contains(&depth) {
            return Err(PlanError::BadDepth(depth));
        }
        let bs = match args.get("bs") {
            None => DEFAULT_BS,
            Some(v) => parse_bytes(v)
                .filter(|&n| n > 0 && n % SECTOR as u64 == 0 && n <= MAX_BATCH * SECTOR as u64)
                .ok_or(PlanError::BadBs(v))?,
        };
        let mb = |key: &'a str| -> Result<u64, PlanError<'a>> {
            let mb = args.u64_or(key, 0).map_err(PlanError::Args)?;
            if mb > MB_MAX {
                return Err(PlanError::TooMuch { key, mb });
            }
            Ok(mb << 20)
        };
        let seq_bytes = mb("seq_mb")?;
        let write_bytes = mb("write_mb")?;
        let rand = args.u64_or("rand", 0).map_err(PlanError::Args)?;
        let span = args
            .get("span")
            .map(|r| {
                blk_pattern::parse_range(r).map_err(|why| PlanError::Range { key: "span", why })
            })
            .transpose()?;
        if verify.is_none() && write.is_none() && seq_bytes == 0 && rand == 0 && write_bytes == 0 {
            return Err(PlanError::Nothing);
        }
        if let (Some(v), Some(w)) = (&verify, &write) {
            if overlap(&v.sectors, &w.sectors) {
                return Err(PlanError::Overlap);
            }
        }
        if write_bytes > 0 {
            let whole = span.clone().unwrap_or(0..u64::MAX);
            if [&verify, &write]
                .into_iter()
                .flatten()
                .any(|s| overlap(&s.sectors, &whole))
            {
                return Err(PlanError::Overlap);
            }
        }
        let plan = Plan {
            verify,
            write,
            batch,
            depth,
            seq_bytes,
            bs,
            rand,
            write_bytes,
            span,
        };
        if let Some(s) = &plan.span {
            plan.check_span(s.clone())?;
        }
        Ok(plan)
    }

    /// `span` (or, without one, the disk) holds a request of every step
    /// that uses it.
    pub fn check_span(&self, span: Range<u64>) -> Result<(), PlanError<'a>> {
        let sectors = span.end.saturating_sub(span.start);
        let bs = self.bs / SECTOR as u64;
        let needs = [
            (self.seq_bytes > 0 || self.write_bytes > 0, bs),
            (self.rand > 0, RAND_SECTORS),
        ]
        .into_iter()
        .filter(|&(used, _)| used)
        .map(|(_, n)| n)
        .max()
        .unwrap_or(0);
        if sectors < needs {
            return Err(PlanError::SmallSpan { sectors, needs });
        }
        Ok(())
    }

    /// Whether a step uses `span` (or the whole disk).
    pub fn measures(&self) -> bool {
        self.seq_bytes > 0 || self.rand > 0 || self.write_bytes > 0
    }

    /// The sectors the measured steps use on a disk of `capacity` sectors.
    pub fn span_on(&self, capacity: u64) -> Range<u64> {
        self.span.clone().unwrap_or(0..capacity)
    }

    /// The last sector any step touches, plus one.
    pub fn end(&self) -> u64 {
        let span = self.span.as_ref().filter(|_| self.measures());
        [&self.verify, &self.write]
            .into_iter()
            .flatten()
            .map(|s| s.sectors.end)
            .chain(span.map(|s| s.end))
            .max()
            .unwrap_or(0)
    }

    /// Bytes a request buffer needs for every step.
    pub fn buf_bytes(&self) -> usize {
        let mut n = 0;
        if self.verify.is_some() || self.write.is_some() {
            n = self.batch * SECTOR as u64;
        }
        if self.seq_bytes > 0 || self.write_bytes > 0 {
            n = n.max(self.bs);
        }
        if self.rand > 0 {
            n = n.max(RAND_SECTORS * SECTOR as u64);
        }
        n as usize
    }
}

/// `range` cut into requests of at most `batch` sectors: (first, count).
pub fn chunks(range: Range<u64>, batch: u64) -> impl Iterator<Item = (u64, u64)> {
    let batch = batch.max(1);
    range
        .clone()
        .step_by(batch as usize)
        .map(move |s| (s, batch.min(range.end - s)))
}

/// `bytes` in requests of `block` sectors from the start of `span`,
/// wrapping at its last whole block, as blkfront's runner reads a vbd.
pub fn sequential(span: Range<u64>, block: u64, bytes: u64) -> impl Iterator<Item = (u64, u64)> {
    let block = block.max(1);
    let len = span.end.saturating_sub(span.start);
    let n = block.min(len);
    let blocks = (len / block).max(1);
    let total = (bytes / SECTOR as u64).div_ceil(block);
    (0..total).map(move |b| (span.start + (b % blocks) * block, n))
}

/// xorshift64: the random reads' places (blkfront's runner's `next_rand`).
pub fn next_rand(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// `count` requests of 4 KiB at pseudo-random 4 KiB-aligned places of
/// `span`; the same places blkfront's runner reads on a vbd of that size.
pub fn random(span: Range<u64>, count: u64) -> impl Iterator<Item = (u64, u64)> {
    let pages = (span.end.saturating_sub(span.start) / RAND_SECTORS).max(1);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..count).map(move |_| {
        x = next_rand(x);
        (span.start + (x % pages) * RAND_SECTORS, RAND_SECTORS)
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn the_scenario_args() {
        let p = Plan::parse("verify=0..64 pattern=A write=64..128 pattern2=B").unwrap();
        assert_eq!(
            p,
            Plan {
                verify: Some(Step {
                    sectors: 0..64,
                    pattern: "A"
                }),
                write: Some(Step {
                    sectors: 64..128,
                    pattern: "B"
                }),
                batch: DEFAULT_BATCH,
                depth: DEFAULT_DEPTH,
                seq_bytes: 0,
                bs: DEFAULT_BS,
                rand: 0,
                write_bytes: 0,
                span: None,
            }
        );
        assert_eq!(p.end(), 128);
        assert_eq!(p.buf_bytes(), 4096);
        assert!(!p.measures());
        let w = Plan::parse("write=8..9 pattern2=x batch=1 depth=1").unwrap();
        assert!(w.verify.is_none() && w.batch == 1 && w.depth == 1 && w.end() == 9);
    }

    #[test]
    fn the_bench_args() {
        let p = Plan::parse("seq_mb=8 bs=64k depth=16 span=0..16384").unwrap();
        assert_eq!(
            (p.seq_bytes, p.bs, p.depth, p.span.clone(), p.end()),
            (8 << 20, 65536, 16, Some(0..16384), 16384)
        );
        assert_eq!(p.buf_bytes(), 65536);
        let r = Plan::parse("rand=4096 depth=16").unwrap();
        assert_eq!((r.rand, r.span_on(32768), r.end()), (4096, 0..32768, 0));
        assert_eq!(r.buf_bytes(), 4096);
        let w = Plan::parse("write_mb=4 bs=4k span=16384..32768").unwrap();
        assert_eq!((w.write_bytes, w.bs, w.end()), (4 << 20, 4096, 32768));
        // A verify step beside a measured one, and the buffer both need.
        let b = Plan::parse("verify=0..64 pattern=A batch=32 seq_mb=1 bs=4k").unwrap();
        assert_eq!(b.buf_bytes(), 16384);
    }

    #[test]
    fn refusals() {
        let e = |s| Plan::parse(s).unwrap_err();
        assert_eq!(e(""), PlanError::Nothing);
        assert_eq!(e("bs=4k depth=2"), PlanError::Nothing);
        assert_eq!(
            e("verify=0..4"),
            PlanError::Unpaired {
                key: "verify",
                needs: "pattern="
            }
        );
        assert_eq!(
            e("pattern2=B"),
            PlanError::Unpaired {
                key: "pattern2",
                needs: "write="
            }
        );
        assert_eq!(
            e("verify=4..4 pattern=A"),
            PlanError::Range {
                key: "verify",
                why: RangeError::Empty
            }
        );
        assert_eq!(
            e("verify=0..4 pattern=a+b"),
            PlanError::BadPattern {
                key: "pattern",
                name: "a+b"
            }
        );
        assert_eq!(
            e("verify=0..4 pattern=A batch=129"),
            PlanError::BadBatch(129)
        );
        assert_eq!(e("verify=0..4 pattern=A depth=65"), PlanError::BadDepth(65));
        assert_eq!(
            e("verify=0..64 pattern=A write=63..65 pattern2=B"),
            PlanError::Overlap
        );
        assert_eq!(e("verify=0..64 pattern=A write_mb=1"), PlanError::Overlap);
        assert_eq!(
            e("write=0..64 pattern2=A write_mb=1 span=32..100"),
            PlanError::Overlap
        );
        assert!(Plan::parse("write=0..64 pattern2=A write_mb=1 span=64..1000").is_ok());
        assert!(matches!(
            e("verify=0..4 pattern=A colour=red"),
            PlanError::Args(ArgError::Unknown { key: "colour" })
        ));
        assert_eq!(
            e("write=0..1 pattern2=B batch=0").to_string(),
            "batch=0: expected 1..=128"
        );
        for bs in ["100", "128k", "0", "k", "1.5k", "4m"] {
            let args = std::format!("seq_mb=1 bs={bs}");
            assert!(
                matches!(Plan::parse(&args), Err(PlanError::BadBs(_))),
                "{args}"
            );
        }
        assert_eq!(
            e("seq_mb=2000"),
            PlanError::TooMuch {
                key: "seq_mb",
                mb: 2000
            }
        );
        assert_eq!(
            e("seq_mb=1 bs=64k span=0..64"),
            PlanError::SmallSpan {
                sectors: 64,
                needs: 128
            }
        );
        assert_eq!(
            e("rand=1 span=0..4"),
            PlanError::SmallSpan {
                sectors: 4,
                needs: 8
            }
        );
        assert_eq!(
            e("rand=1 span=x"),
            PlanError::Range {
                key: "span",
                why: RangeError::Syntax
            }
        );
    }

    #[test]
    fn requests_cover_the_range_once() {
        assert_eq!(
            chunks(0..20, 8).collect::<Vec<_>>(),
            [(0, 8), (8, 8), (16, 4)]
        );
        assert_eq!(chunks(64..128, 8).count(), 8);
        assert_eq!(chunks(5..6, 32).collect::<Vec<_>>(), [(5, 1)]);
    }

    #[test]
    fn sequential_reads_wrap_at_the_last_whole_block() {
        // 8 MiB of 64 KiB blocks on 16384 sectors (8 MiB): each block once.
        let r: Vec<_> = sequential(0..16384, 128, 8 << 20).collect();
        assert_eq!(r.len(), 128);
        assert!(r
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i as u64 * 128, 128)));
        // 300 sectors hold two blocks of 128; the third wraps.
        let r: Vec<_> = sequential(100..400, 128, 3 * 128 * 512).collect();
        assert_eq!(r, [(100, 128), (228, 128), (100, 128)]);
        // A partial last block is read whole, as blkfront's runner does.
        assert_eq!(sequential(0..1024, 8, 9 * 512).count(), 2);
    }

    #[test]
    fn random_reads_stay_in_the_span() {
        let r: Vec<_> = random(16384..32768, 1000).collect();
        assert_eq!(r.len(), 1000);
        assert!(r
            .iter()
            .all(|&(s, n)| n == 8 && s % 8 == 0 && (16384..32768 - 7).contains(&s)));
        // blkfront's runner: the first place on a 2048-page vbd.
        let first = next_rand(0x9e37_79b9_7f4a_7c15) % 2048 * 8;
        assert_eq!(random(0..16384, 1).next(), Some((first, 8)));
        assert_eq!(parse_bytes("64k"), Some(65536));
        assert_eq!(parse_bytes("512"), Some(512));
        assert_eq!(parse_bytes(""), None);
    }
}
