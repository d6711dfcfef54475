//! The ACPI system description table header shared by DMAR and IVRS, and its checks.

use core::fmt;

use crate::bytes::{array, u32_at, u8_at};

/// Length of the ACPI system description table header, in bytes.
pub const SDT_HEADER_LEN: usize = 36;

/// The decoded 36-byte ACPI table header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SdtHeader {
    /// Four-byte signature, e.g. `*b"DMAR"`.
    pub signature: [u8; 4],
    /// Length of the whole table including this header, in bytes.
    pub length: u32,
    /// Table revision (QEMU 7.2 writes 1 for both DMAR and IVRS).
    pub revision: u8,
    /// The checksum byte (all bytes of the table sum to 0 modulo 256).
    pub checksum: u8,
    /// OEM id, six ASCII bytes (`"BOCHS "` under QEMU).
    pub oem_id: [u8; 6],
    /// OEM table id, eight ASCII bytes (`"BXPC    "` under QEMU).
    pub oem_table_id: [u8; 8],
    /// OEM revision number.
    pub oem_revision: u32,
    /// Id of the tool that made the table, four ASCII bytes.
    pub creator_id: [u8; 4],
    /// Revision of that tool.
    pub creator_revision: u32,
}

/// What is wrong with a table's header: its signature, length or checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// The slice is shorter than the table's fixed header (`needed` bytes).
    TooShort {
        /// Bytes given.
        available: usize,
        /// Bytes the fixed header takes (SDT header plus the table's own fixed fields).
        needed: usize,
    },
    /// The first four bytes are not the expected signature.
    Signature {
        /// The signature the parser wanted.
        expected: [u8; 4],
        /// The bytes found at offset 0.
        found: [u8; 4],
    },
    /// The length field (bytes 4-7) is smaller than the table's fixed header.
    LengthTooSmall {
        /// The length field, in bytes.
        length: u32,
        /// The fixed header's size, in bytes.
        needed: usize,
    },
    /// The length field says the table is longer than the bytes given.
    Truncated {
        /// The length field, in bytes.
        length: u32,
        /// Bytes given.
        available: usize,
    },
    /// The table's bytes do not sum to 0 modulo 256.
    Checksum {
        /// The sum of all `length` bytes, modulo 256 (0 for a valid table).
        sum: u8,
    },
}

struct Ascii<'a>(&'a [u8]);

impl fmt::Display for Ascii<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            write!(f, "{}", core::ascii::escape_default(b))?;
        }
        Ok(())
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TooShort { available, needed } => write!(
                f,
                "table is {available} bytes, shorter than its {needed}-byte fixed header"
            ),
            Self::Signature { expected, found } => write!(
                f,
                "signature at byte 0 is \"{}\", expected \"{}\"",
                Ascii(&found),
                Ascii(&expected)
            ),
            Self::LengthTooSmall { length, needed } => write!(
                f,
                "length field at byte 4 is {length} bytes, less than the {needed}-byte fixed header"
            ),
            Self::Truncated { length, available } => write!(
                f,
                "length field at byte 4 is {length} bytes but only {available} bytes are available"
            ),
            Self::Checksum { sum } => write!(
                f,
                "checksum byte at byte 9 is wrong: the table sums to {sum:#04x}, not 0"
            ),
        }
    }
}

/// Checks `bytes` as an ACPI table with `signature` whose fixed part (SDT header plus the
/// table's own fields) is `fixed_len` bytes. Returns the header and the table's bytes,
/// trimmed to its length field: bytes past the table's end are ignored, so a caller may hand
/// in a whole mapped page.
pub(crate) fn check<'a>(
    bytes: &'a [u8],
    signature: &[u8; 4],
    fixed_len: usize,
) -> Result<(SdtHeader, &'a [u8]), HeaderError> {
    let too_short = HeaderError::TooShort {
        available: bytes.len(),
        needed: fixed_len,
    };
    if bytes.len() < fixed_len.max(SDT_HEADER_LEN) {
        return Err(too_short);
    }
    let header = decode(bytes).ok_or(too_short)?;
    if &header.signature != signature {
        return Err(HeaderError::Signature {
            expected: *signature,
            found: header.signature,
        });
    }
    let length = header.length;
    let len = usize::try_from(length).map_err(|_| HeaderError::Truncated {
        length,
        available: bytes.len(),
    })?;
    if len < fixed_len {
        return Err(HeaderError::LengthTooSmall {
            length,
            needed: fixed_len,
        });
    }
    let table = bytes.get(..len).ok_or(HeaderError::Truncated {
        length,
        available: bytes.len(),
    })?;
    let sum = table.iter().fold(0u8, |acc, &b| acc.wrapping_add(b));
    if sum != 0 {
        return Err(HeaderError::Checksum { sum });
    }
    Ok((header, table))
}

fn decode(b: &[u8]) -> Option<SdtHeader> {
    Some(SdtHeader {
        signature: array(b, 0)?,
        length: u32_at(b, 4)?,
        revision: u8_at(b, 8)?,
        checksum: u8_at(b, 9)?,
        oem_id: array(b, 10)?,
        oem_table_id: array(b, 16)?,
        oem_revision: u32_at(b, 24)?,
        creator_id: array(b, 28)?,
        creator_revision: u32_at(b, 32)?,
    })
}
