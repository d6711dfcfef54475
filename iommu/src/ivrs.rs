//! The ACPI I/O Virtualization Reporting Structure (IVRS): AMD-Vi's inventory of IOMMUs.
//!
//! ```text
//!  byte  size  field
//!     0    36  ACPI header: "IVRS", length, revision, checksum, OEM ids
//!    36     4  IVinfo: bit 0 EFRSup, 1 DMA remap, 7:5 GVAsize, 14:8 PAsize, 21:15 VAsize
//!    40     8  reserved
//!    48     …  blocks, back to back, each: u8 type, u8 flags, u16 length (whole block), …
//!
//! IVHD (type 0x10: 24-byte header; 0x11 and 0x40: 40-byte header), then device entries:
//!     0 type  1 flags  2 u16 length  4 u16 DeviceID (the IOMMU's own BDF)
//!     6 u16 capability offset  8 u64 register base  16 u16 PCI segment  18 u16 IOMMU info
//!    20 u32 feature reporting (0x10) / IOMMU attributes (0x11, 0x40)
//!    24 u64 EFR register image  32 u64 EFR2 register image       (0x11, 0x40 only)
//! IVMD (types 0x20, 0x21, 0x22): memory definitions, 32 bytes; yielded undecoded.
//!
//! device entry length: type 0x00-0x3f 4 bytes, 0x40-0x7f 8 bytes,
//!                      0xf0 (ACPI HID) 22 + the UID length at byte 21, others unknown.
//! ```
//!
//! [`Ivrs::parse`] checks the header and walks every block and every IVHD device entry once,
//! so a malformed table is refused up front with an [`IvrsError`] naming the byte offset, and
//! the iterators afterwards cannot fail. Nothing here panics or indexes out of range.

use core::fmt;

use crate::bytes::{array, u16_at, u32_at, u64_at, u8_at};
use crate::sdt::{self, HeaderError, SdtHeader};
use crate::Bdf;

/// Size of the IVRS fixed part (ACPI header, IVinfo, reserved), in bytes. The first block
/// starts here.
pub const IVRS_HEADER_LEN: usize = 48;

/// Size of a block's type, flags and length fields, in bytes.
const BLOCK_HEADER_LEN: u16 = 4;

/// Size of an IVMD block, in bytes.
const IVMD_LEN: u16 = 32;

/// Fixed part of an ACPI HID device entry (type 0xf0) before its UID, in bytes.
const ACPI_HID_FIXED_LEN: usize = 22;

/// The IVinfo field (bytes 36-39): features common to every IOMMU in the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IvInfo(pub u32);

impl IvInfo {
    /// Bit 0 (EFRSup): the IVHD type 0x11/0x40 EFR images are valid.
    pub const fn efr_sup(self) -> bool {
        self.0 & 1 != 0
    }

    /// Bit 1 (DMA remap): firmware used the IOMMU for pre-boot DMA protection and asks the OS
    /// to keep DMA remapped.
    pub const fn dma_remap(self) -> bool {
        self.0 & 1 << 1 != 0
    }

    /// Bits 7:5 (GVAsize) as stored: the guest virtual address size code (2 = 48 bits).
    pub const fn gva_size_raw(self) -> u8 {
        (self.0 >> 5 & 0x7) as u8
    }

    /// Bits 14:8 (PAsize): maximum physical address size, in bits (40 under QEMU 7.2).
    pub const fn pa_size_bits(self) -> u8 {
        (self.0 >> 8 & 0x7f) as u8
    }

    /// Bits 21:15 (VAsize): maximum virtual address size, in bits (0 under QEMU 7.2).
    pub const fn va_size_bits(self) -> u8 {
        (self.0 >> 15 & 0x7f) as u8
    }
}

/// What is wrong with an IVRS table. Offsets are in bytes from the start of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvrsError {
    /// The ACPI header is wrong (signature, length or checksum).
    Header(HeaderError),
    /// Fewer than the 4 bytes of a block's type, flags and length are left at `offset`.
    BlockHeaderTruncated {
        /// Where the block would start.
        offset: usize,
        /// Bytes left in the table from there.
        remaining: usize,
    },
    /// A block's length field is below the size of its fixed header (a length of 0 is
    /// refused here, so the walk always advances).
    BlockTooShort {
        /// Where the block starts.
        offset: usize,
        /// Its type byte.
        kind: u8,
        /// Its length field, in bytes.
        length: u16,
        /// The smallest valid length for its type, in bytes.
        minimum: u16,
    },
    /// A block's length runs past the end of the table.
    BlockOverrun {
        /// Where the block starts.
        offset: usize,
        /// Its length field, in bytes.
        length: u16,
        /// The table's length, in bytes.
        table_length: usize,
    },
    /// A device entry runs past the end of its IVHD block.
    EntryTruncated {
        /// Where the entry starts.
        offset: usize,
        /// Its type byte.
        kind: u8,
        /// The bytes it needs (for type 0xf0 before its UID length is readable, 22).
        length: usize,
        /// Where the IVHD block ends.
        block_end: usize,
    },
    /// A device entry of type 0x80 or above other than 0xf0, whose length cannot be known.
    EntryUnknownLength {
        /// Where the entry starts.
        offset: usize,
        /// Its type byte.
        kind: u8,
    },
}

impl IvrsError {
    /// The byte offset in the table where the problem is, if it is in one place.
    pub const fn offset(&self) -> Option<usize> {
        match *self {
            Self::Header(_) => None,
            Self::BlockHeaderTruncated { offset, .. }
            | Self::BlockTooShort { offset, .. }
            | Self::BlockOverrun { offset, .. }
            | Self::EntryTruncated { offset, .. }
            | Self::EntryUnknownLength { offset, .. } => Some(offset),
        }
    }
}

impl From<HeaderError> for IvrsError {
    fn from(e: HeaderError) -> Self {
        Self::Header(e)
    }
}

impl fmt::Display for IvrsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Header(e) => write!(f, "IVRS: {e}"),
            Self::BlockHeaderTruncated { offset, remaining } => write!(
                f,
                "IVRS: block at byte {offset:#x}: only {remaining} bytes left, its type, \
                 flags and length take 4"
            ),
            Self::BlockTooShort {
                offset,
                kind,
                length,
                minimum,
            } => write!(
                f,
                "IVRS: block type {kind:#04x} at byte {offset:#x}: length {length} bytes is \
                 less than its minimum {minimum}"
            ),
            Self::BlockOverrun {
                offset,
                length,
                table_length,
            } => write!(
                f,
                "IVRS: block at byte {offset:#x}: length {length} bytes runs past the \
                 table's end at byte {table_length:#x}"
            ),
            Self::EntryTruncated {
                offset,
                kind,
                length,
                block_end,
            } => write!(
                f,
                "IVRS: device entry type {kind:#04x} at byte {offset:#x}: needs {length} \
                 bytes, runs past its IVHD's end at byte {block_end:#x}"
            ),
            Self::EntryUnknownLength { offset, kind } => write!(
                f,
                "IVRS: device entry type {kind:#04x} at byte {offset:#x}: unknown type of \
                 unknown length"
            ),
        }
    }
}

/// A checked IVRS table, borrowed from its bytes.
#[derive(Clone, Copy, Debug)]
pub struct Ivrs<'a> {
    header: SdtHeader,
    table: &'a [u8],
}

impl<'a> Ivrs<'a> {
    /// Checks an IVRS table given as its full bytes, starting with the ACPI header.
    ///
    /// Refuses a wrong signature, a length field below 48 bytes or beyond `bytes`, a bad
    /// checksum, and any block or IVHD device entry that is truncated, too short or runs past
    /// its container. Bytes after the table's length are ignored.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, IvrsError> {
        let (header, table) = sdt::check(bytes, b"IVRS", IVRS_HEADER_LEN)?;
        validate(table)?;
        Ok(Self { header, table })
    }

    /// The ACPI header.
    pub const fn header(&self) -> &SdtHeader {
        &self.header
    }

    /// The table's bytes, `header().length` long.
    pub const fn bytes(&self) -> &'a [u8] {
        self.table
    }

    /// The IVinfo field.
    pub fn ivinfo(&self) -> IvInfo {
        IvInfo(u32_at(self.table, 36).unwrap_or(0))
    }

    /// Every block, in table order.
    pub fn blocks(&self) -> Blocks<'a> {
        Blocks {
            table: self.table,
            offset: IVRS_HEADER_LEN,
        }
    }

    /// The IOMMU definitions (IVHD blocks of every type), in table order. A machine may list
    /// one IOMMU several times, once per IVHD type it supports: pick the newest type the
    /// driver knows for each (segment, DeviceID).
    pub fn ivhds(&self) -> impl Iterator<Item = Ivhd<'a>> + 'a {
        self.blocks().filter_map(|b| match b {
            Block::Ivhd(h) => Some(h),
            _ => None,
        })
    }
}

/// The length of an IVHD block's header for its type, in bytes.
const fn ivhd_header_len(kind: u8) -> Option<u16> {
    match kind {
        0x10 => Some(24),
        0x11 | 0x40 => Some(40),
        _ => None,
    }
}

const fn is_ivmd(kind: u8) -> bool {
    matches!(kind, 0x20..=0x22)
}

/// Walks every block and IVHD device entry of `table` (already trimmed to its length).
fn validate(table: &[u8]) -> Result<(), IvrsError> {
    let mut offset = IVRS_HEADER_LEN;
    while offset < table.len() {
        let remaining = table.len() - offset;
        let (Some(kind), Some(length)) = (u8_at(table, offset), u16_at(table, offset + 2)) else {
            return Err(IvrsError::BlockHeaderTruncated { offset, remaining });
        };
        let header_len = ivhd_header_len(kind);
        let minimum = match header_len {
            Some(h) => h,
            None if is_ivmd(kind) => IVMD_LEN,
            None => BLOCK_HEADER_LEN,
        };
        if length < minimum {
            return Err(IvrsError::BlockTooShort {
                offset,
                kind,
                length,
                minimum,
            });
        }
        let end = offset + usize::from(length);
        if end > table.len() {
            return Err(IvrsError::BlockOverrun {
                offset,
                length,
                table_length: table.len(),
            });
        }
        if let Some(h) = header_len {
            validate_entries(table, offset + usize::from(h), end)?;
        }
        offset = end;
    }
    Ok(())
}

/// The length in bytes of the device entry at `at` in `bytes`, from its type: `Ok(None)` if
/// the type is 0xf0 and its UID length byte is not inside `bytes`, `Err(())` for a type of
/// unknown length.
fn entry_len(bytes: &[u8], at: usize, kind: u8) -> Result<Option<usize>, ()> {
    match kind {
        0x00..=0x3f => Ok(Some(4)),
        0x40..=0x7f => Ok(Some(8)),
        0xf0 => Ok(u8_at(bytes, at + ACPI_HID_FIXED_LEN - 1)
            .map(|uid_len| ACPI_HID_FIXED_LEN + usize::from(uid_len))),
        _ => Err(()),
    }
}

/// Checks the device entries in `table[start..end]`.
fn validate_entries(table: &[u8], start: usize, end: usize) -> Result<(), IvrsError> {
    let entries = table.get(..end).unwrap_or_default();
    let mut offset = start;
    while let Some(kind) = u8_at(entries, offset) {
        let length = match entry_len(entries, offset, kind) {
            Err(()) => return Err(IvrsError::EntryUnknownLength { offset, kind }),
            Ok(Some(length)) => length,
            Ok(None) => ACPI_HID_FIXED_LEN,
        };
        if length > end - offset {
            return Err(IvrsError::EntryTruncated {
                offset,
                kind,
                length,
                block_end: end,
            });
        }
        offset += length;
    }
    Ok(())
}

/// One block of the IVRS.
#[derive(Clone, Copy, Debug)]
pub enum Block<'a> {
    /// An I/O virtualization hardware definition: one IOMMU and its devices.
    Ivhd(Ivhd<'a>),
    /// An I/O virtualization memory definition (type 0x20 all devices, 0x21 one device, 0x22
    /// a range of devices), undecoded.
    Ivmd(RawBlock<'a>),
    /// Any other type, undecoded; the spec tells software to skip it.
    Other(RawBlock<'a>),
}

impl Block<'_> {
    /// Where the block starts, in bytes from the start of the table.
    pub fn offset(&self) -> usize {
        match self {
            Self::Ivhd(b) => b.offset,
            Self::Ivmd(b) | Self::Other(b) => b.offset,
        }
    }

    /// The block's type byte.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Ivhd(b) => b.kind,
            Self::Ivmd(b) | Self::Other(b) => b.kind,
        }
    }
}

/// A block this parser does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawBlock<'a> {
    /// Where it starts, in bytes from the start of the table.
    pub offset: usize,
    /// Its type byte.
    pub kind: u8,
    /// Its flags byte.
    pub flags: u8,
    /// All its bytes, from the type byte to its length.
    pub bytes: &'a [u8],
}

/// An I/O virtualization hardware definition: one AMD IOMMU and the devices it translates.
#[derive(Clone, Copy, Debug)]
pub struct Ivhd<'a> {
    /// Where the block starts, in bytes from the start of the table.
    pub offset: usize,
    /// The block type: 0x10, 0x11 or 0x40.
    pub kind: u8,
    /// Flags byte; see the `Ivhd::*` flag constants.
    pub flags: u8,
    /// The IOMMU's own PCI function (it is a PCI device; 00:02.0 under QEMU with the default
    /// VGA, 00:01.0 without).
    pub device: Bdf,
    /// Offset of the IOMMU's capability block in its PCI configuration space, in bytes.
    pub capability_offset: u16,
    /// Physical address of the IOMMU's register set.
    pub base_address: u64,
    /// PCI segment group of the IOMMU and its devices.
    pub segment: u16,
    /// IOMMU info: bits 4:0 the MSI number for event log interrupts, bits 12:8 the UnitID.
    pub iommu_info: u16,
    /// Bytes 20-23: IOMMU feature reporting for type 0x10, IOMMU attributes for 0x11/0x40.
    pub feature_info: u32,
    /// The Extended Feature Register image (types 0x11/0x40; valid if IVinfo EFRSup).
    pub efr_image: Option<u64>,
    /// The second Extended Feature Register image (types 0x11/0x40).
    pub efr2_image: Option<u64>,
    entries: DeviceEntries<'a>,
}

impl<'a> Ivhd<'a> {
    /// Flags bit 0: HyperTransport tunnel translation.
    pub const HT_TUN_EN: u8 = 1 << 0;
    /// Flags bit 1: PassPW.
    pub const PASS_PW: u8 = 1 << 1;
    /// Flags bit 2: ResPassPW.
    pub const RES_PASS_PW: u8 = 1 << 2;
    /// Flags bit 3: isochronous control.
    pub const ISOC: u8 = 1 << 3;
    /// Flags bit 4: IOTLB (device ATS) support.
    pub const IOTLB_SUP: u8 = 1 << 4;
    /// Flags bit 5: coherent: the IOMMU snoops its table reads.
    pub const COHERENT: u8 = 1 << 5;
    /// Flags bit 6: prefetch support.
    pub const PREF_SUP: u8 = 1 << 6;
    /// Flags bit 7: peripheral page request support.
    pub const PPR_SUP: u8 = 1 << 7;

    /// The MSI number the IOMMU uses for event log interrupts (IOMMU info bits 4:0).
    pub const fn msi_number(&self) -> u8 {
        (self.iommu_info & 0x1f) as u8
    }

    /// The device entries, in table order.
    pub const fn entries(&self) -> DeviceEntries<'a> {
        self.entries
    }
}

/// Iterator over a checked table's blocks.
#[derive(Clone, Debug)]
pub struct Blocks<'a> {
    table: &'a [u8],
    offset: usize,
}

impl<'a> Iterator for Blocks<'a> {
    type Item = Block<'a>;

    fn next(&mut self) -> Option<Block<'a>> {
        let offset = self.offset;
        let kind = u8_at(self.table, offset)?;
        let length = usize::from(u16_at(self.table, offset + 2)?);
        let end = offset + length;
        // `Ivrs::parse` has checked every length; stop rather than loop if one were bad.
        let Some(bytes) = self.table.get(offset..end).filter(|_| length >= 4) else {
            self.offset = self.table.len();
            return None;
        };
        self.offset = end;
        let raw = RawBlock {
            offset,
            kind,
            flags: u8_at(bytes, 1)?,
            bytes,
        };
        Some(match ivhd_header_len(kind) {
            Some(h) => decode_ivhd(raw, usize::from(h)).map_or(Block::Other(raw), Block::Ivhd),
            None if is_ivmd(kind) => Block::Ivmd(raw),
            None => Block::Other(raw),
        })
    }
}

fn decode_ivhd(raw: RawBlock<'_>, header_len: usize) -> Option<Ivhd<'_>> {
    let b = raw.bytes;
    let long = header_len >= 40;
    Some(Ivhd {
        offset: raw.offset,
        kind: raw.kind,
        flags: raw.flags,
        device: Bdf::from_rid(u16_at(b, 4)?),
        capability_offset: u16_at(b, 6)?,
        base_address: u64_at(b, 8)?,
        segment: u16_at(b, 16)?,
        iommu_info: u16_at(b, 18)?,
        feature_info: u32_at(b, 20)?,
        efr_image: if long { Some(u64_at(b, 24)?) } else { None },
        efr2_image: if long { Some(u64_at(b, 32)?) } else { None },
        entries: DeviceEntries {
            bytes: b.get(header_len..)?,
            offset: 0,
        },
    })
}

/// What a Special device entry (type 0x48) names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecialVariety {
    /// 1: an IOAPIC; the handle is its IOAPIC id.
    Ioapic,
    /// 2: an HPET; the handle is its HPET number.
    Hpet,
    /// Any other value.
    Unknown(u8),
}

impl SpecialVariety {
    /// The variety for its byte.
    pub const fn from_code(code: u8) -> Self {
        match code {
            1 => Self::Ioapic,
            2 => Self::Hpet,
            other => Self::Unknown(other),
        }
    }
}

/// One IVHD device entry. `dte` is the DTE setting byte applied to the devices named (bit 0
/// INITPass, 1 EIntPass, 2 NMIPass, 5:4 SysMgt, 6 Lint0Pass, 7 Lint1Pass). A range runs from
/// a `*RangeStart` entry to the next [`DeviceEntry::RangeEnd`], inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEntry<'a> {
    /// Type 0: padding.
    Pad,
    /// Type 1: every device of the segment.
    All {
        /// DTE setting.
        dte: u8,
    },
    /// Type 2: one device.
    Select {
        /// The device.
        device: Bdf,
        /// DTE setting.
        dte: u8,
    },
    /// Type 3: first device of a range.
    RangeStart {
        /// First device.
        device: Bdf,
        /// DTE setting for the range.
        dte: u8,
    },
    /// Type 4: last device of a range (inclusive).
    RangeEnd {
        /// Last device.
        device: Bdf,
    },
    /// Type 0x42 (66): one device whose requests arrive with another requester id.
    AliasSelect {
        /// The device.
        device: Bdf,
        /// DTE setting.
        dte: u8,
        /// The requester id its DMA carries (e.g. a PCIe-to-PCI bridge's).
        alias: Bdf,
    },
    /// Type 0x43 (67): first device of a range that shares one requester id.
    AliasRangeStart {
        /// First device.
        device: Bdf,
        /// DTE setting for the range.
        dte: u8,
        /// The requester id their DMA carries.
        alias: Bdf,
    },
    /// Type 0x46 (70): one device with an extended DTE setting.
    ExtSelect {
        /// The device.
        device: Bdf,
        /// DTE setting.
        dte: u8,
        /// Extended DTE setting (bit 31: ATS disabled).
        ext: u32,
    },
    /// Type 0x47 (71): first device of a range with an extended DTE setting.
    ExtRangeStart {
        /// First device.
        device: Bdf,
        /// DTE setting for the range.
        dte: u8,
        /// Extended DTE setting.
        ext: u32,
    },
    /// Type 0x48 (72): an IOAPIC or HPET and the requester id its interrupts carry.
    Special {
        /// IOAPIC id or HPET number.
        handle: u8,
        /// The requester id of its interrupt messages.
        source: Bdf,
        /// IOAPIC or HPET.
        variety: SpecialVariety,
        /// DTE setting.
        dte: u8,
    },
    /// Type 0xf0 (240): an ACPI device named by hardware id.
    AcpiHid {
        /// The requester id its DMA carries.
        device: Bdf,
        /// DTE setting.
        dte: u8,
        /// ACPI _HID, 8 ASCII bytes.
        hid: [u8; 8],
        /// ACPI _CID, 8 bytes (0 if none).
        cid: [u8; 8],
        /// UID format: 0 none, 1 integer, 2 string.
        uid_format: u8,
        /// The UID bytes.
        uid: &'a [u8],
    },
    /// A reserved 4- or 8-byte type, undecoded.
    Reserved {
        /// Its type byte.
        kind: u8,
        /// Its bytes.
        bytes: &'a [u8],
    },
}

/// Iterator over one IVHD's device entries.
#[derive(Clone, Copy, Debug)]
pub struct DeviceEntries<'a> {
    /// The IVHD's bytes after its header.
    bytes: &'a [u8],
    /// Next entry, in bytes from `bytes[0]`.
    offset: usize,
}

impl<'a> Iterator for DeviceEntries<'a> {
    type Item = DeviceEntry<'a>;

    fn next(&mut self) -> Option<DeviceEntry<'a>> {
        let at = self.offset;
        let kind = u8_at(self.bytes, at)?;
        // `Ivrs::parse` has checked every entry; stop rather than loop if one were bad.
        let entry = match entry_len(self.bytes, at, kind) {
            Ok(Some(length)) => self.bytes.get(at..at + length),
            _ => None,
        };
        let Some(e) = entry else {
            self.offset = self.bytes.len();
            return None;
        };
        self.offset = at + e.len();
        let device = Bdf::from_rid(u16_at(e, 1)?);
        let dte = u8_at(e, 3)?;
        Some(match kind {
            0 => DeviceEntry::Pad,
            1 => DeviceEntry::All { dte },
            2 => DeviceEntry::Select { device, dte },
            3 => DeviceEntry::RangeStart { device, dte },
            4 => DeviceEntry::RangeEnd { device },
            0x42 | 0x43 => {
                let alias = Bdf::from_rid(u16_at(e, 5)?);
                if kind == 0x42 {
                    DeviceEntry::AliasSelect { device, dte, alias }
                } else {
                    DeviceEntry::AliasRangeStart { device, dte, alias }
                }
            }
            0x46 => DeviceEntry::ExtSelect {
                device,
                dte,
                ext: u32_at(e, 4)?,
            },
            0x47 => DeviceEntry::ExtRangeStart {
                device,
                dte,
                ext: u32_at(e, 4)?,
            },
            0x48 => DeviceEntry::Special {
                handle: u8_at(e, 4)?,
                source: Bdf::from_rid(u16_at(e, 5)?),
                variety: SpecialVariety::from_code(u8_at(e, 7)?),
                dte,
            },
            0xf0 => DeviceEntry::AcpiHid {
                device,
                dte,
                hid: array(e, 4)?,
                cid: array(e, 12)?,
                uid_format: u8_at(e, 20)?,
                uid: e.get(ACPI_HID_FIXED_LEN..)?,
            },
            _ => DeviceEntry::Reserved { kind, bytes: e },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self, TableBuilder};
    use std::string::ToString;
    use std::vec::Vec;

    /// The IVRS that `qemu-system-x86_64` 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18) put in guest
    /// memory for `-m 128M -machine q35 -device amd-iommu -drive if=none,id=d0,... -device
    /// virtio-blk-pci,addr=03.0,drive=d0,iommu_platform=on,disable-legacy=on -netdev
    /// hubport,id=n0,hubid=0 -device virtio-net-pci,addr=04.0,netdev=n0,iommu_platform=on,
    /// disable-legacy=on -display none` (identical with `amd-iommu,intremap=on`), dumped with
    /// the monitor's `pmemsave`.
    const QEMU72_IVRS_HEX: &str =
        "495652537000000001f7424f434853204258504320202020010000004258504301000000\
        00280000000000000000000010d14000100040000000d8fe000000000000000044000000\
        020000000208000002100000021800000220000002f8000002fa000002fb000048000000\
        00a00001";

    /// Same QEMU, `-machine q35 -device amd-iommu -vga none -nic none`: the IOMMU takes the
    /// first free slot, 00:01.0.
    const QEMU72_IVRS_NOVGA_HEX: &str =
        "49565253640000000165424f434853204258504320202020010000004258504301000000\
        00280000000000000000000010d13400080040000000d8fe000000000000000044000000\
        020000000208000002f8000002fa000002fb00004800000000a00001";

    fn unhex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|p| u8::from_str_radix(core::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    }

    fn bdf(bus: u8, dev: u8, func: u8) -> Bdf {
        Bdf::new(bus, dev, func)
    }

    /// Starts an IVRS with one IVHD type 0x10 whose length is patched by `end_ivhd`.
    fn ivrs_with_ivhd(kind: u8) -> TableBuilder {
        let mut t = TableBuilder::new(b"IVRS", 2);
        t.u32(0x0020_3043).u64(0);
        t.u8(kind).u8(0xb0).u16(0).u16(0x0002).u16(0x40);
        t.u64(0xfd20_0000).u16(0).u16(0x0301).u32(0x8004_8f6e);
        if kind != 0x10 {
            t.u64(0x0000_0000_58f7_7ef2).u64(0x1);
        }
        t
    }

    fn end_block(t: &mut TableBuilder, start: usize) {
        let len = (t.len() - start) as u16;
        t.set_u16(start + 2, len).finish();
    }

    #[test]
    fn builder_reproduces_qemu_bytes() {
        assert_eq!(
            fixtures::qemu72_q35_ivrs().as_bytes(),
            &unhex(QEMU72_IVRS_HEX)[..]
        );
        let novga = [bdf(0, 0, 0), bdf(0, 1, 0), bdf(0, 0x1f, 0)];
        let novga: Vec<Bdf> = novga
            .into_iter()
            .chain([bdf(0, 0x1f, 2), bdf(0, 0x1f, 3)])
            .collect();
        assert_eq!(
            fixtures::ivrs_q35(bdf(0, 1, 0), &novga).as_bytes(),
            &unhex(QEMU72_IVRS_NOVGA_HEX)[..]
        );
    }

    #[test]
    fn decodes_qemu_q35_table() {
        let bytes = unhex(QEMU72_IVRS_HEX);
        let ivrs = Ivrs::parse(&bytes).unwrap();
        assert_eq!(ivrs.header().length, 112);
        assert_eq!(ivrs.header().revision, 1);
        let info = ivrs.ivinfo();
        assert_eq!(info, IvInfo(0x2800));
        assert_eq!(info.pa_size_bits(), 40);
        assert_eq!(info.va_size_bits(), 0);
        assert_eq!(info.gva_size_raw(), 0);
        assert!(!info.efr_sup());
        assert!(!info.dma_remap());

        assert_eq!(ivrs.blocks().count(), 1);
        let ivhd = ivrs.ivhds().next().unwrap();
        assert_eq!(ivhd.offset, 48);
        assert_eq!(ivhd.kind, 0x10);
        assert_eq!(
            ivhd.flags,
            Ivhd::HT_TUN_EN | Ivhd::IOTLB_SUP | Ivhd::PREF_SUP | Ivhd::PPR_SUP
        );
        assert_eq!(ivhd.device, bdf(0, 2, 0));
        assert_eq!(ivhd.capability_offset, 0x40);
        assert_eq!(ivhd.base_address, 0xfed8_0000);
        assert_eq!(ivhd.segment, 0);
        assert_eq!(ivhd.iommu_info, 0);
        assert_eq!(ivhd.msi_number(), 0);
        assert_eq!(ivhd.feature_info, 0x44);
        assert_eq!(ivhd.efr_image, None);
        assert_eq!(ivhd.efr2_image, None);

        let entries: Vec<DeviceEntry<'_>> = ivhd.entries().collect();
        let mut expected: Vec<DeviceEntry<'_>> = fixtures::QEMU_Q35_AMD_DEVICES
            .iter()
            .map(|&device| DeviceEntry::Select { device, dte: 0 })
            .collect();
        expected.push(DeviceEntry::Special {
            handle: 0,
            source: bdf(0, 0x14, 0),
            variety: SpecialVariety::Ioapic,
            dte: 0,
        });
        assert_eq!(entries, expected);
    }

    #[test]
    fn decodes_every_entry_kind_and_long_headers() {
        let mut t = ivrs_with_ivhd(0x40);
        let start = 48;
        t.u8(0).u16(0).u8(0); // pad
        t.u8(1).u16(0).u8(0x01); // all
        t.u8(3).u16(0x0100).u8(0x02).u8(4).u16(0x01ff).u8(0); // 01:00.0 ..= 01:1f.7
        t.u8(0x42).u16(0x0208).u8(0).u8(0).u16(0x0200).u8(0); // 02:01.0 as 02:00.0
        t.u8(0x43).u16(0x0300).u8(0).u8(0).u16(0x0010).u8(0);
        t.u8(4).u16(0x03ff).u8(0);
        t.u8(0x46).u16(0x0400).u8(0).u32(0x8000_0000);
        t.u8(0x47).u16(0x0500).u8(0).u32(0x8000_0000);
        t.u8(4).u16(0x05ff).u8(0);
        t.u8(0x48).u16(0).u8(0xd7).u8(0).u16(0x00a5).u8(2); // HPET 0 at 00:14.5
        t.u8(0x05).u16(0x0600).u8(0); // reserved 4-byte type
        t.u8(0xf0)
            .u16(0x00a0)
            .u8(0x40)
            .bytes(b"AMDI0020")
            .bytes(&[0; 8]);
        t.u8(2).u8(3).bytes(b"ID0");
        end_block(&mut t, start);
        // An IVMD after the IVHD, and an unknown block type.
        t.u8(0x21).u8(0x05).u16(32).u16(0x0010).u16(0).u64(0);
        t.u64(0x7d00_0000).u64(0x1000);
        t.u8(0x99).u8(0).u16(6).u16(0xbeef);
        t.finish();

        let ivrs = Ivrs::parse(t.as_bytes()).unwrap();
        assert_eq!(ivrs.ivinfo().pa_size_bits(), 48);
        assert_eq!(ivrs.ivinfo().va_size_bits(), 64);
        assert_eq!(ivrs.ivinfo().gva_size_raw(), 2);
        assert!(ivrs.ivinfo().efr_sup());
        assert!(ivrs.ivinfo().dma_remap());

        let blocks: Vec<Block<'_>> = ivrs.blocks().collect();
        assert_eq!(blocks.len(), 3);
        let Block::Ivhd(ivhd) = blocks[0] else {
            panic!("want IVHD, got {:?}", blocks[0])
        };
        assert_eq!(ivhd.kind, 0x40);
        assert_eq!(ivhd.msi_number(), 1);
        assert_eq!(ivhd.efr_image, Some(0x58f7_7ef2));
        assert_eq!(ivhd.efr2_image, Some(1));
        let entries: Vec<DeviceEntry<'_>> = ivhd.entries().collect();
        assert_eq!(
            entries,
            [
                DeviceEntry::Pad,
                DeviceEntry::All { dte: 1 },
                DeviceEntry::RangeStart {
                    device: bdf(1, 0, 0),
                    dte: 2
                },
                DeviceEntry::RangeEnd {
                    device: bdf(1, 0x1f, 7)
                },
                DeviceEntry::AliasSelect {
                    device: bdf(2, 1, 0),
                    dte: 0,
                    alias: bdf(2, 0, 0)
                },
                DeviceEntry::AliasRangeStart {
                    device: bdf(3, 0, 0),
                    dte: 0,
                    alias: bdf(0, 2, 0)
                },
                DeviceEntry::RangeEnd {
                    device: bdf(3, 0x1f, 7)
                },
                DeviceEntry::ExtSelect {
                    device: bdf(4, 0, 0),
                    dte: 0,
                    ext: 0x8000_0000
                },
                DeviceEntry::ExtRangeStart {
                    device: bdf(5, 0, 0),
                    dte: 0,
                    ext: 0x8000_0000
                },
                DeviceEntry::RangeEnd {
                    device: bdf(5, 0x1f, 7)
                },
                DeviceEntry::Special {
                    handle: 0,
                    source: bdf(0, 0x14, 5),
                    variety: SpecialVariety::Hpet,
                    dte: 0xd7
                },
                DeviceEntry::Reserved {
                    kind: 5,
                    bytes: &[5, 0, 6, 0]
                },
                DeviceEntry::AcpiHid {
                    device: bdf(0, 0x14, 0),
                    dte: 0x40,
                    hid: *b"AMDI0020",
                    cid: [0; 8],
                    uid_format: 2,
                    uid: b"ID0"
                },
            ]
        );
        let Block::Ivmd(ivmd) = blocks[1] else {
            panic!("want IVMD, got {:?}", blocks[1])
        };
        assert_eq!((ivmd.kind, ivmd.flags, ivmd.bytes.len()), (0x21, 5, 32));
        let Block::Other(other) = blocks[2] else {
            panic!("want raw block, got {:?}", blocks[2])
        };
        assert_eq!(other.bytes, &[0x99, 0, 6, 0, 0xef, 0xbe]);
        assert_eq!(blocks[2].offset(), blocks[1].offset() + 32);
    }

    #[test]
    fn refuses_bad_header() {
        let good = fixtures::qemu72_q35_ivrs();
        let mut t = good.clone();
        t.set_u8(9, t.as_bytes()[9].wrapping_sub(1));
        let err = Ivrs::parse(t.as_bytes()).unwrap_err();
        assert_eq!(err, IvrsError::Header(HeaderError::Checksum { sum: 0xff }));
        assert_eq!(
            err.to_string(),
            "IVRS: checksum byte at byte 9 is wrong: the table sums to 0xff, not 0"
        );
        assert_eq!(
            Ivrs::parse(&good.as_bytes()[..111]).unwrap_err(),
            IvrsError::Header(HeaderError::Truncated {
                length: 112,
                available: 111
            })
        );
        assert!(matches!(
            Ivrs::parse(fixtures::qemu72_q35_dmar().as_bytes()),
            Err(IvrsError::Header(HeaderError::Signature { .. }))
        ));
    }

    #[test]
    fn refuses_blocks_of_bad_length() {
        let good = fixtures::qemu72_q35_ivrs();
        for (length, expected) in [
            (
                0,
                IvrsError::BlockTooShort {
                    offset: 48,
                    kind: 0x10,
                    length: 0,
                    minimum: 24,
                },
            ),
            (
                23,
                IvrsError::BlockTooShort {
                    offset: 48,
                    kind: 0x10,
                    length: 23,
                    minimum: 24,
                },
            ),
            (
                65,
                IvrsError::BlockOverrun {
                    offset: 48,
                    length: 65,
                    table_length: 112,
                },
            ),
        ] {
            let mut t = good.clone();
            t.set_u16(50, length).fix_checksum();
            let err = Ivrs::parse(t.as_bytes()).unwrap_err();
            assert_eq!(err, expected);
            assert_eq!(err.offset(), Some(48));
        }
        let mut t = good.clone();
        t.set_u16(50, 0).fix_checksum();
        assert_eq!(
            Ivrs::parse(t.as_bytes()).unwrap_err().to_string(),
            "IVRS: block type 0x10 at byte 0x30: length 0 bytes is less than its minimum 24"
        );
        // A type 0x11 block must hold its 40-byte header; an unknown type of length 0 is
        // refused too, or the walk would never advance.
        let mut t = good.clone();
        t.set_u8(48, 0x11).fix_checksum();
        assert!(Ivrs::parse(t.as_bytes()).is_ok(), "64 bytes hold 40");
        t.set_u16(50, 32).fix_checksum();
        assert!(matches!(
            Ivrs::parse(t.as_bytes()),
            Err(IvrsError::BlockTooShort { minimum: 40, .. })
        ));
        let mut t = good.clone();
        t.set_u8(48, 0x99).set_u16(50, 0).fix_checksum();
        assert_eq!(
            Ivrs::parse(t.as_bytes()).unwrap_err(),
            IvrsError::BlockTooShort {
                offset: 48,
                kind: 0x99,
                length: 0,
                minimum: 4
            }
        );
        let mut t = good.clone();
        t.u8(0x10).finish();
        assert_eq!(
            Ivrs::parse(t.as_bytes()).unwrap_err(),
            IvrsError::BlockHeaderTruncated {
                offset: 112,
                remaining: 1
            }
        );
    }

    #[test]
    fn refuses_bad_entries() {
        let good = fixtures::qemu72_q35_ivrs();
        // Cut the IVHD in the middle of its last (8-byte Special) entry at byte 104.
        let mut t = good.clone();
        t.truncate(108).set_u16(50, 60).finish();
        let err = Ivrs::parse(t.as_bytes()).unwrap_err();
        assert_eq!(
            err,
            IvrsError::EntryTruncated {
                offset: 104,
                kind: 0x48,
                length: 8,
                block_end: 108
            }
        );
        assert_eq!(
            err.to_string(),
            "IVRS: device entry type 0x48 at byte 0x68: needs 8 bytes, runs past its IVHD's \
             end at byte 0x6c"
        );
        // A variable-length type other than 0xf0.
        let mut t = good.clone();
        t.set_u8(72, 0x80).fix_checksum();
        assert_eq!(
            Ivrs::parse(t.as_bytes()).unwrap_err(),
            IvrsError::EntryUnknownLength {
                offset: 72,
                kind: 0x80
            }
        );
        // An ACPI HID entry too short to hold its UID length, and one whose UID overruns.
        let mut t = ivrs_with_ivhd(0x10);
        t.u8(0xf0).u16(0).u8(0).bytes(b"PNP0000");
        end_block(&mut t, 48);
        assert_eq!(
            Ivrs::parse(t.as_bytes()).unwrap_err(),
            IvrsError::EntryTruncated {
                offset: 72,
                kind: 0xf0,
                length: 22,
                block_end: 83
            }
        );
        let mut t = ivrs_with_ivhd(0x10);
        t.u8(0xf0).u16(0).u8(0).bytes(&[0; 16]).u8(1).u8(9).u8(7);
        end_block(&mut t, 48);
        assert_eq!(
            Ivrs::parse(t.as_bytes()).unwrap_err(),
            IvrsError::EntryTruncated {
                offset: 72,
                kind: 0xf0,
                length: 31,
                block_end: 95
            }
        );
    }

    /// Parses and walks everything; returns whether the table was accepted.
    fn walk(bytes: &[u8]) -> bool {
        let Ok(ivrs) = Ivrs::parse(bytes) else {
            return false;
        };
        let _ = ivrs.ivinfo();
        for block in ivrs.blocks() {
            if let Block::Ivhd(ivhd) = block {
                let _ = ivhd.entries().count();
            }
        }
        true
    }

    #[test]
    fn survives_every_truncation_and_corruption() {
        let good = fixtures::qemu72_q35_ivrs();
        for len in 0..good.len() {
            let mut t = good.clone();
            t.truncate(len);
            if len >= 36 {
                t.finish();
            }
            assert_eq!(walk(t.as_bytes()), len == 48, "{len}-byte cut");
        }
        for at in 0..good.len() {
            for value in [
                0x00, 0x01, 0x02, 0x04, 0x10, 0x11, 0x40, 0x48, 0x80, 0xf0, 0xff,
            ] {
                let mut t = good.clone();
                t.set_u8(at, value).fix_checksum();
                walk(t.as_bytes());
            }
        }
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..20_000 {
            let mut t = good.clone();
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = 36 + (state as usize % (good.len() - 36));
                t.set_u8(at, (state >> 32) as u8);
            }
            t.fix_checksum();
            walk(t.as_bytes());
        }
    }
}
