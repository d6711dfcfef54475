//! The disk test pattern: the one definition the blk driver domain and the
//! scenario harness (`harness::disk`) share.
//!
//! A pattern is named (`A`, `B`, ...: 1-8 of `A-Z a-z 0-9 _ -`); the name
//! gives a 64-bit seed (FNV-1a). Sector `s` of pattern `p` is 512 bytes:
//!
//! ```text
//!   0..16   "airlock" ' ' name, NUL-padded to 16 bytes (readable in a hexdump)
//!  16..24   s, little-endian
//!  24..512  61 words w[3..64]: w[k] = splitmix64(seed ^ s * 2^16 ^ k), LE
//! ```
//!
//! so every sector of every pattern differs from every other and from
//! zeros, and a sector written at the wrong offset or from the wrong
//! pattern is caught. Sector ranges are written `START..END` (end
//! exclusive), as in the blk domain's args and the `[test.disk]` table.

use core::ops::Range;

/// Bytes per sector (virtio-blk's unit).
pub const SECTOR: usize = 512;
/// Longest pattern name (it fits the sector's 16-byte label).
pub const NAME_MAX: usize = 8;
/// What every patterned sector starts with.
pub const MAGIC: &[u8; 8] = b"airlock ";

/// A pattern's name: 1-8 of `A-Z a-z 0-9 _ -`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The seed of pattern `name`: FNV-1a 64 of its bytes.
pub fn seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` with sector `sector` of pattern `name`.
pub fn fill(name: &str, sector: u64, out: &mut [u8; SECTOR]) {
    let s = seed(name);
    out[..16].fill(0);
    out[..MAGIC.len()].copy_from_slice(MAGIC);
    let n = name.len().min(NAME_MAX);
    out[MAGIC.len()..MAGIC.len() + n].copy_from_slice(&name.as_bytes()[..n]);
    out[16..24].copy_from_slice(&sector.to_le_bytes());
    for (k, w) in out[24..].chunks_exact_mut(8).enumerate() {
        let k = k as u64 + 3;
        w.copy_from_slice(&splitmix64(s ^ (sector << 16) ^ k).to_le_bytes());
    }
}

/// Sector `sector` of pattern `name`.
pub fn sector(name: &str, sector: u64) -> [u8; SECTOR] {
    let mut out = [0; SECTOR];
    fill(name, sector, &mut out);
    out
}

/// The first byte where `got` differs from sector `sector` of `name`.
pub fn mismatch(name: &str, sector_no: u64, got: &[u8]) -> Option<usize> {
    let want = sector(name, sector_no);
    if got.len() != SECTOR {
        return Some(got.len().min(SECTOR));
    }
    got.iter().zip(want.iter()).position(|(a, b)| a != b)
}

/// Why a sector range was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeError {
    /// Not `START..END` with two decimal numbers.
    Syntax,
    /// `END <= START`.
    Empty,
}

impl core::fmt::Display for RangeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            RangeError::Syntax => "not START..END (decimal sector numbers)",
            RangeError::Empty => "an empty range (END must be above START)",
        })
    }
}

/// `START..END` in sectors, end exclusive.
pub fn parse_range(s: &str) -> Result<Range<u64>, RangeError> {
    let (a, b) = s.split_once("..").ok_or(RangeError::Syntax)?;
    let num = |t: &str| {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RangeError::Syntax);
        }
        t.parse::<u64>().map_err(|_| RangeError::Syntax)
    };
    let (a, b) = (num(a)?, num(b)?);
    if b <= a {
        return Err(RangeError::Empty);
    }
    Ok(a..b)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn sectors_are_distinct_and_never_zero() {
        let mut seen = HashSet::new();
        for name in ["A", "B", "pattern-2"] {
            for s in 0..300 {
                let x = sector(name, s);
                assert!(x.iter().any(|&b| b != 0));
                assert!(seen.insert(x), "{name} sector {s} repeats another sector");
            }
        }
    }

    #[test]
    fn layout_is_as_documented() {
        let x = sector("A", 0x1234);
        assert_eq!(&x[..16], b"airlock A\0\0\0\0\0\0\0");
        assert_eq!(u64::from_le_bytes(x[16..24].try_into().unwrap()), 0x1234);
        // Fixed values: the harness and the domain must agree forever, so a
        // change to the function must show up here.
        // (Computed independently of this code.)
        assert_eq!(seed("A"), 0xaf63_fc4c_8602_22ec);
        assert_eq!(
            u64::from_le_bytes(x[24..32].try_into().unwrap()),
            0x6f9d_a9e4_e18d_caf7
        );
        assert_eq!(mismatch("A", 0x1234, &x), None);
        assert_eq!(mismatch("A", 0x1235, &x), Some(16));
        assert_eq!(mismatch("B", 0x1234, &x), Some(8));
        assert_eq!(mismatch("A", 0x1234, &x[..100]), Some(100));
    }

    #[test]
    fn names() {
        assert!(valid_name("A") && valid_name("pat_2-b") && valid_name("12345678"));
        assert!(!valid_name("") && !valid_name("123456789") && !valid_name("a b"));
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("0..64"), Ok(0..64));
        assert_eq!(parse_range("64..128"), Ok(64..128));
        assert_eq!(parse_range("5..5"), Err(RangeError::Empty));
        assert_eq!(parse_range("9..3"), Err(RangeError::Empty));
        for bad in ["", "..", "1..", "..2", "a..b", "1-2", "+1..2", "1..2..3"] {
            assert_eq!(parse_range(bad), Err(RangeError::Syntax), "{bad}");
        }
    }
}
