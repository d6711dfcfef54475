//! The blk driver domain's plan, from its `args`; pure, tested on the host.
//!
//! `verify=0..64 pattern=A write=64..128 pattern2=B batch=8 depth=4`:
//!
//! - `verify=R pattern=P`: read sectors `R` and check each against sector
//!   of pattern `P` ([`crate::blk_pattern`]); `data_check {what:
//!   "blk-read"}`.
//! - `write=R pattern2=P`: write pattern `P` to sectors `R`, flush, read
//!   them back and check; `data_check {what: "blk-write"}`.
//! - `batch=N`: sectors per request (default [`DEFAULT_BATCH`], at most
//!   [`MAX_BATCH`]).
//! - `depth=N`: requests in flight at once (default [`DEFAULT_DEPTH`], at
//!   most [`MAX_DEPTH`]).
//!
//! Either step may be left out; at least one must be given.

use core::fmt;
use core::ops::Range;

use libdom::args::ArgError;
use libdom::Args;

use crate::blk_pattern::{self, RangeError};

/// The keys the domain takes.
pub const KEYS: &[&str] = &["verify", "pattern", "write", "pattern2", "batch", "depth"];
/// Sectors per request unless `batch` says otherwise.
pub const DEFAULT_BATCH: u64 = 8;
/// Most sectors per request (16 KiB).
pub const MAX_BATCH: u64 = 32;
/// Requests in flight unless `depth` says otherwise.
pub const DEFAULT_DEPTH: u64 = 4;
/// Most requests in flight: virtio-drivers' blk queue has 16 descriptors,
/// and a request takes 3 of them when indirect descriptors are off.
pub const MAX_DEPTH: u64 = 5;

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
    Nothing,
    /// The write range overlaps the verify range.
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
            PlanError::Nothing => f.write_str("nothing to do: give verify= and/or write="),
            PlanError::Overlap => f.write_str("the write range overlaps the verify range"),
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
        if verify.is_none() && write.is_none() {
            return Err(PlanError::Nothing);
        }
        if let (Some(v), Some(w)) = (&verify, &write) {
            if v.sectors.start < w.sectors.end && w.sectors.start < v.sectors.end {
                return Err(PlanError::Overlap);
            }
        }
        Ok(Plan {
            verify,
            write,
            batch,
            depth,
        })
    }

    /// The last sector any step touches, plus one.
    pub fn end(&self) -> u64 {
        [&self.verify, &self.write]
            .into_iter()
            .flatten()
            .map(|s| s.sectors.end)
            .max()
            .unwrap_or(0)
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
            }
        );
        assert_eq!(p.end(), 128);
        let w = Plan::parse("write=8..9 pattern2=x batch=1 depth=1").unwrap();
        assert!(w.verify.is_none() && w.batch == 1 && w.depth == 1 && w.end() == 9);
    }

    #[test]
    fn refusals() {
        let e = |s| Plan::parse(s).unwrap_err();
        assert_eq!(e(""), PlanError::Nothing);
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
        assert_eq!(e("verify=0..4 pattern=A batch=33"), PlanError::BadBatch(33));
        assert_eq!(e("verify=0..4 pattern=A depth=6"), PlanError::BadDepth(6));
        assert_eq!(
            e("verify=0..64 pattern=A write=63..65 pattern2=B"),
            PlanError::Overlap
        );
        assert!(matches!(
            e("verify=0..4 pattern=A colour=red"),
            PlanError::Args(ArgError::Unknown { key: "colour" })
        ));
        assert_eq!(
            e("write=0..1 pattern2=B batch=0").to_string(),
            "batch=0: expected 1..=32"
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
}
