//! The byte-stream test pattern: the one definition that TCP senders and
//! receivers share (the guests' `tcp-send` / `tcp-recv` roles and the
//! harness's host peer, `harness::tcppeer`), so that either end can check
//! every byte it receives without having seen what was sent.
//!
//! A stream is named (`A`, `B`, ...: the same names as
//! [`crate::blk_pattern`], whose FNV-1a [`seed`] it uses). Its bytes are
//! 8-byte little-endian words, word `k` (bytes `8k..8k+8`) being
//!
//! ```text
//!   splitmix64(seed + (k + 1) * 0x9e3779b97f4a7c15)
//! ```
//!
//! (the splitmix64 sequence from `seed`). A stream of any length is the
//! first bytes of that sequence; any piece can be made or checked on its own
//! from its offset ([`fill`], [`mismatch`]), so a receiver checks each
//! segment as it arrives, whatever the segment sizes. The checksum both ends
//! report (`stream` events, `crc32`) is `abi::crc32` of all the bytes;
//! [`crc32`] computes it for a whole stream.

pub use crate::blk_pattern::{seed, valid_name};

const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Word `k` of the stream with seed `seed`.
pub fn word(seed: u64, k: u64) -> u64 {
    mix(seed.wrapping_add(k.wrapping_add(1).wrapping_mul(GAMMA)))
}

/// Byte `offset` of the stream with seed `seed`.
pub fn byte(seed: u64, offset: u64) -> u8 {
    word(seed, offset / 8).to_le_bytes()[(offset % 8) as usize]
}

/// Fills `out` with bytes `offset..offset + out.len()` of the stream.
pub fn fill(seed: u64, offset: u64, out: &mut [u8]) {
    let mut at = offset;
    let mut rest = out;
    // Up to the next word boundary, byte by byte.
    while !at.is_multiple_of(8) {
        let Some((b, tail)) = rest.split_first_mut() else {
            return;
        };
        *b = byte(seed, at);
        at += 1;
        rest = tail;
    }
    let mut words = rest.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&word(seed, at / 8).to_le_bytes());
        at += 8;
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b = byte(seed, at + i as u64);
    }
}

/// The first index of `data` (bytes `offset..` of the stream) that differs
/// from the stream, if any.
pub fn mismatch(seed: u64, offset: u64, data: &[u8]) -> Option<usize> {
    let mut want = [0u8; 256];
    let mut done = 0;
    for chunk in data.chunks(want.len()) {
        let w = &mut want[..chunk.len()];
        fill(seed, offset + done as u64, w);
        if let Some(i) = chunk.iter().zip(w.iter()).position(|(a, b)| a != b) {
            return Some(done + i);
        }
        done += chunk.len();
    }
    None
}

/// The CRC-32 (`abi::crc32`) of the stream's first `len` bytes.
pub fn crc32(seed: u64, len: u64) -> u32 {
    let mut c = abi::crc32::Crc32::new();
    let mut buf = [0u8; 4096];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        fill(seed, at, &mut buf[..n]);
        c.update(&buf[..n]);
        at += n as u64;
    }
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_little_endian_splitmix64() {
        // splitmix64's published first output from seed 0.
        assert_eq!(word(0, 0), 0xe220_a839_7b1d_cdaf);
        let s = seed("A");
        let mut b = [0u8; 16];
        fill(s, 0, &mut b);
        assert_eq!(&b[..8], &word(s, 0).to_le_bytes());
        assert_eq!(&b[8..], &word(s, 1).to_le_bytes());
        assert_eq!(byte(s, 9), word(s, 1).to_le_bytes()[1]);
    }

    #[test]
    fn any_piece_equals_the_whole_stream() {
        let s = seed("B");
        let mut whole = [0u8; 1000];
        fill(s, 0, &mut whole);
        for (start, len) in [(0, 1000), (1, 7), (3, 500), (8, 8), (997, 3), (5, 0)] {
            let mut piece = std::vec![0u8; len];
            fill(s, start as u64, &mut piece);
            assert_eq!(&piece[..], &whole[start..start + len], "{start}+{len}");
            assert_eq!(mismatch(s, start as u64, &piece), None);
        }
    }

    #[test]
    fn damage_and_misplacement_are_found() {
        let s = seed("A");
        let mut d = [0u8; 700];
        fill(s, 100, &mut d);
        assert_eq!(mismatch(s, 100, &d), None);
        assert_eq!(mismatch(s, 101, &d), Some(0));
        assert_eq!(mismatch(seed("B"), 100, &d), Some(0));
        d[600] ^= 0x10;
        assert_eq!(mismatch(s, 100, &d), Some(600));
        assert_eq!(mismatch(s, 0, &[0u8; 64]), Some(0));
    }

    #[test]
    fn the_crc_is_of_the_bytes() {
        let s = seed("A");
        let mut d = std::vec![0u8; 10_000];
        fill(s, 0, &mut d);
        assert_eq!(crc32(s, 10_000), abi::crc32::crc32(&d));
        assert_eq!(crc32(s, 0), 0);
    }
}
