//! IEEE 802.3 CRC-32 (the one zlib, PNG and Ethernet use): reflected,
//! polynomial 0xEDB88320, initial value and final XOR 0xFFFFFFFF.
//!
//! The 256-entry table is built at compile time by a `const fn`, so the
//! hypervisor carries it in `.rodata` and never computes it at boot.
//!
//! ```
//! use abi::crc32::{crc32, Crc32};
//! assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
//! let mut c = Crc32::new();
//! c.update(b"1234");
//! c.update(b"56789");
//! assert_eq!(c.finish(), 0xcbf4_3926);
//! ```

/// The reflected IEEE polynomial.
pub const POLY: u32 = 0xedb8_8320;

/// `TABLE[b]` is the CRC register after shifting the byte `b` through it.
pub const TABLE: [u32; 256] = make_table();

const fn make_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            bit += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// A CRC-32 computed piece by piece: [`Crc32::update`] with each part in
/// order, then [`Crc32::finish`]. The result equals [`crc32`] of the parts
/// concatenated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crc32 {
    /// The register, before the final XOR.
    state: u32,
}

impl Crc32 {
    pub const fn new() -> Self {
        Crc32 { state: !0 }
    }

    /// Feeds `data` through the register.
    pub fn update(&mut self, data: &[u8]) {
        let mut c = self.state;
        for &b in data {
            c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
        }
        self.state = c;
    }

    /// The CRC of everything fed so far (the state is kept: more may follow).
    pub const fn finish(&self) -> u32 {
        !self.state
    }
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

/// The CRC-32 of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(data);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn known_vectors() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"a"), 0xe8b7_be43);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414f_a339
        );
        assert_eq!(crc32(&[0u8; 32]), 0x190a_55ad);
    }

    #[test]
    fn table_spot_checks() {
        assert_eq!(TABLE[0], 0);
        assert_eq!(TABLE[1], 0x7707_3096);
        assert_eq!(TABLE[255], 0x2d02_ef8d);
    }

    #[test]
    fn incremental_equals_one_shot() {
        let data: [u8; 300] = core::array::from_fn(|i| (i * 7 + 3) as u8);
        for split in [0, 1, 2, 150, 299, 300] {
            let mut c = Crc32::new();
            c.update(&data[..split]);
            c.update(&data[split..]);
            assert_eq!(c.finish(), crc32(&data), "split at {split}");
        }
    }
}
