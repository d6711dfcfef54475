//! The ACPI DMA Remapping Reporting table (DMAR): Intel VT-d's inventory of remapping units.
//!
//! ```text
//!  byte  size  field
//!     0    36  ACPI header: "DMAR", length, revision, checksum, OEM ids
//!    36     1  host address width: value + 1 = width in bits
//!    37     1  flags: bit 0 INTR_REMAP, 1 X2APIC_OPT_OUT, 2 DMA_CTRL_PLATFORM_OPT_IN
//!    38    10  reserved
//!    48     …  remapping structures, back to back, each:
//!                 0  u16 type (0 DRHD, 1 RMRR, 2 ATSR, 3 RHSA, 4 ANDD, 5 SATC)
//!                 2  u16 length of the whole structure, in bytes
//!                 4  type-specific fields, then (DRHD, RMRR, ATSR) device scopes
//! device scope:   0  u8 type   1  u8 length (6 + 2n)   2  u8 flags   3  reserved
//!                 4  u8 enumeration id   5  u8 start bus   6  n × (u8 device, u8 function)
//! ```
//!
//! [`Dmar::parse`] checks the header and walks every structure and every device scope once, so
//! a malformed table is refused up front with a [`DmarError`] naming the byte offset, and the
//! iterators afterwards cannot fail. Nothing here panics or indexes out of range, whatever the
//! bytes say.

use core::fmt;

use crate::bytes::{u16_at, u64_at, u8_at};
use crate::sdt::{self, HeaderError, SdtHeader};
use crate::Bdf;

/// Size of the DMAR's fixed part (ACPI header plus width, flags, reserved), in bytes. The first
/// remapping structure starts here.
pub const DMAR_HEADER_LEN: usize = 48;

/// Size of a remapping structure's type and length fields, in bytes.
const STRUCTURE_HEADER_LEN: usize = 4;

/// Size of a device scope's fixed part, before its path, in bytes.
const SCOPE_HEADER_LEN: usize = 6;

/// The DMAR flags byte (byte 37).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmarFlags(pub u8);

impl DmarFlags {
    /// Bit 0: the platform supports interrupt remapping.
    pub const INTR_REMAP: u8 = 1 << 0;
    /// Bit 1: firmware asks the OS not to enable x2APIC mode.
    pub const X2APIC_OPT_OUT: u8 = 1 << 1;
    /// Bit 2: firmware set up DMA protection and asks the OS to keep it.
    pub const DMA_CTRL_PLATFORM_OPT_IN: u8 = 1 << 2;

    /// Interrupt remapping is supported.
    pub const fn intr_remap(self) -> bool {
        self.0 & Self::INTR_REMAP != 0
    }

    /// Firmware requests that x2APIC stays off.
    pub const fn x2apic_opt_out(self) -> bool {
        self.0 & Self::X2APIC_OPT_OUT != 0
    }

    /// Firmware opted in to platform DMA protection.
    pub const fn dma_ctrl_platform_opt_in(self) -> bool {
        self.0 & Self::DMA_CTRL_PLATFORM_OPT_IN != 0
    }
}

/// The type of a remapping structure (its `u16` type field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StructureKind {
    /// 0: DMA remapping hardware unit definition.
    Drhd,
    /// 1: reserved memory region (firmware DMA that must stay mapped).
    Rmrr,
    /// 2: root port ATS capability.
    Atsr,
    /// 3: remapping hardware static affinity (NUMA node of a unit).
    Rhsa,
    /// 4: ACPI name-space device declaration.
    Andd,
    /// 5: SoC integrated address translation cache.
    Satc,
    /// Any other type; the spec tells software to skip it.
    Unknown(u16),
}

impl StructureKind {
    /// The kind for a type field value.
    pub const fn from_code(code: u16) -> Self {
        match code {
            0 => Self::Drhd,
            1 => Self::Rmrr,
            2 => Self::Atsr,
            3 => Self::Rhsa,
            4 => Self::Andd,
            5 => Self::Satc,
            other => Self::Unknown(other),
        }
    }

    /// The type field value.
    pub const fn code(self) -> u16 {
        match self {
            Self::Drhd => 0,
            Self::Rmrr => 1,
            Self::Atsr => 2,
            Self::Rhsa => 3,
            Self::Andd => 4,
            Self::Satc => 5,
            Self::Unknown(code) => code,
        }
    }

    /// Short lower-case name, e.g. `"drhd"`, or `"unknown"`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Drhd => "drhd",
            Self::Rmrr => "rmrr",
            Self::Atsr => "atsr",
            Self::Rhsa => "rhsa",
            Self::Andd => "andd",
            Self::Satc => "satc",
            Self::Unknown(_) => "unknown",
        }
    }

    /// Smallest valid length of this kind of structure, in bytes (its fixed fields).
    pub const fn min_len(self) -> u16 {
        match self {
            Self::Drhd => 16,
            Self::Rmrr => 24,
            Self::Rhsa => 20,
            Self::Atsr | Self::Andd | Self::Satc => 8,
            Self::Unknown(_) => STRUCTURE_HEADER_LEN as u16,
        }
    }

    /// Where this kind's device scopes start, in bytes from the structure's start, for the
    /// kinds this parser decodes with scopes.
    const fn scopes_at(self) -> Option<usize> {
        match self {
            Self::Drhd => Some(16),
            Self::Rmrr => Some(24),
            Self::Atsr => Some(8),
            _ => None,
        }
    }
}

/// The type of a device scope (its first byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeKind {
    /// 1: a PCI endpoint device.
    PciEndpoint,
    /// 2: a PCI-PCI bridge and every device below it.
    PciSubhierarchy,
    /// 3: an I/O APIC; the enumeration id is its APIC id.
    Ioapic,
    /// 4: an HPET (MSI-capable); the enumeration id is its HPET number.
    Hpet,
    /// 5: an ACPI name-space device; the enumeration id is its ANDD device number.
    AcpiNamespace,
    /// Any other value.
    Unknown(u8),
}

impl ScopeKind {
    /// The kind for a scope type byte.
    pub const fn from_code(code: u8) -> Self {
        match code {
            1 => Self::PciEndpoint,
            2 => Self::PciSubhierarchy,
            3 => Self::Ioapic,
            4 => Self::Hpet,
            5 => Self::AcpiNamespace,
            other => Self::Unknown(other),
        }
    }

    /// Short lower-case name: `"pci-endpoint"`, `"pci-subhierarchy"`, `"ioapic"`, `"hpet"`,
    /// `"acpi-namespace"` or `"unknown"`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PciEndpoint => "pci-endpoint",
            Self::PciSubhierarchy => "pci-subhierarchy",
            Self::Ioapic => "ioapic",
            Self::Hpet => "hpet",
            Self::AcpiNamespace => "acpi-namespace",
            Self::Unknown(_) => "unknown",
        }
    }
}

/// The name of a device scope type byte, e.g. `scope_kind_name(3) == "ioapic"`.
pub const fn scope_kind_name(code: u8) -> &'static str {
    ScopeKind::from_code(code).name()
}

/// What is wrong with a DMAR table. Offsets are in bytes from the start of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmarError {
    /// The ACPI header is wrong (signature, length or checksum).
    Header(HeaderError),
    /// Fewer than the 4 bytes of a structure's type and length are left at `offset`.
    StructureHeaderTruncated {
        /// Where the structure would start.
        offset: usize,
        /// Bytes left in the table from there.
        remaining: usize,
    },
    /// A structure's length field is below the size of its fixed fields (a length of 0 is
    /// refused here, so the walk always advances).
    StructureTooShort {
        /// Where the structure starts.
        offset: usize,
        /// Its type.
        kind: StructureKind,
        /// Its length field, in bytes.
        length: u16,
        /// The smallest valid length for its type, in bytes.
        minimum: u16,
    },
    /// A structure's length runs past the end of the table.
    StructureOverrun {
        /// Where the structure starts.
        offset: usize,
        /// Its length field, in bytes.
        length: u16,
        /// The table's length, in bytes.
        table_length: usize,
    },
    /// Fewer than the 2 bytes of a device scope's type and length are left in its structure.
    ScopeHeaderTruncated {
        /// Where the scope would start.
        offset: usize,
        /// Bytes left in the enclosing structure from there.
        remaining: usize,
    },
    /// A device scope's length is not 6 + 2n bytes (n path entries).
    ScopeLength {
        /// Where the scope starts.
        offset: usize,
        /// Its length field, in bytes.
        length: u8,
    },
    /// A device scope runs past the end of its enclosing structure.
    ScopeOverrun {
        /// Where the scope starts.
        offset: usize,
        /// Its length field, in bytes.
        length: u8,
        /// Where the enclosing structure ends.
        structure_end: usize,
    },
}

impl DmarError {
    /// The byte offset in the table where the problem is, if it is in one place.
    pub const fn offset(&self) -> Option<usize> {
        match *self {
            Self::Header(_) => None,
            Self::StructureHeaderTruncated { offset, .. }
            | Self::StructureTooShort { offset, .. }
            | Self::StructureOverrun { offset, .. }
            | Self::ScopeHeaderTruncated { offset, .. }
            | Self::ScopeLength { offset, .. }
            | Self::ScopeOverrun { offset, .. } => Some(offset),
        }
    }
}

impl From<HeaderError> for DmarError {
    fn from(e: HeaderError) -> Self {
        Self::Header(e)
    }
}

impl fmt::Display for DmarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Header(e) => write!(f, "DMAR: {e}"),
            Self::StructureHeaderTruncated { offset, remaining } => write!(
                f,
                "DMAR: structure at byte {offset:#x}: only {remaining} bytes left, \
                 its type and length take 4"
            ),
            Self::StructureTooShort {
                offset,
                kind,
                length,
                minimum,
            } => write!(
                f,
                "DMAR: {} structure (type {}) at byte {offset:#x}: length {length} bytes \
                 is less than its minimum {minimum}",
                kind.name(),
                kind.code()
            ),
            Self::StructureOverrun {
                offset,
                length,
                table_length,
            } => write!(
                f,
                "DMAR: structure at byte {offset:#x}: length {length} bytes runs past \
                 the table's end at byte {table_length:#x}"
            ),
            Self::ScopeHeaderTruncated { offset, remaining } => write!(
                f,
                "DMAR: device scope at byte {offset:#x}: only {remaining} bytes left in \
                 its structure, its type and length take 2"
            ),
            Self::ScopeLength { offset, length } => write!(
                f,
                "DMAR: device scope at byte {offset:#x}: length {length} bytes is not \
                 6 + 2n (n path entries)"
            ),
            Self::ScopeOverrun {
                offset,
                length,
                structure_end,
            } => write!(
                f,
                "DMAR: device scope at byte {offset:#x}: length {length} bytes runs past \
                 its structure's end at byte {structure_end:#x}"
            ),
        }
    }
}

/// A checked DMAR table, borrowed from its bytes.
#[derive(Clone, Copy, Debug)]
pub struct Dmar<'a> {
    header: SdtHeader,
    table: &'a [u8],
}

impl<'a> Dmar<'a> {
    /// Checks a DMAR table given as its full bytes, starting with the ACPI header.
    ///
    /// Refuses a wrong signature, a length field below 48 bytes or beyond `bytes`, a bad
    /// checksum, and any structure or device scope that is truncated, too short or runs past
    /// its container. Bytes after the table's length are ignored.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DmarError> {
        let (header, table) = sdt::check(bytes, b"DMAR", DMAR_HEADER_LEN)?;
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

    /// The host address width field as stored (byte 36): the width in bits, minus one.
    pub fn host_address_width_raw(&self) -> u8 {
        u8_at(self.table, 36).unwrap_or(0)
    }

    /// The maximum DMA physical address width the platform supports, in bits (field + 1).
    pub fn host_address_width_bits(&self) -> u16 {
        u16::from(self.host_address_width_raw()) + 1
    }

    /// The flags byte (byte 37).
    pub fn flags(&self) -> DmarFlags {
        DmarFlags(u8_at(self.table, 37).unwrap_or(0))
    }

    /// Every remapping structure, in table order.
    pub fn structures(&self) -> Structures<'a> {
        Structures {
            table: self.table,
            offset: DMAR_HEADER_LEN,
        }
    }

    /// The hardware units (DRHD structures), in table order.
    pub fn drhds(&self) -> impl Iterator<Item = Drhd<'a>> + 'a {
        self.structures().filter_map(|s| match s {
            Structure::Drhd(d) => Some(d),
            _ => None,
        })
    }

    /// The reserved memory regions (RMRR structures), in table order.
    pub fn rmrrs(&self) -> impl Iterator<Item = Rmrr<'a>> + 'a {
        self.structures().filter_map(|s| match s {
            Structure::Rmrr(r) => Some(r),
            _ => None,
        })
    }
}

/// Walks every structure and every scope of `table` (already trimmed to its length).
fn validate(table: &[u8]) -> Result<(), DmarError> {
    let mut offset = DMAR_HEADER_LEN;
    while offset < table.len() {
        let remaining = table.len() - offset;
        let (Some(code), Some(length)) = (u16_at(table, offset), u16_at(table, offset + 2)) else {
            return Err(DmarError::StructureHeaderTruncated { offset, remaining });
        };
        let kind = StructureKind::from_code(code);
        if length < kind.min_len() {
            return Err(DmarError::StructureTooShort {
                offset,
                kind,
                length,
                minimum: kind.min_len(),
            });
        }
        let end = offset + usize::from(length);
        if end > table.len() {
            return Err(DmarError::StructureOverrun {
                offset,
                length,
                table_length: table.len(),
            });
        }
        if let Some(at) = kind.scopes_at() {
            validate_scopes(table, offset + at, end)?;
        }
        offset = end;
    }
    Ok(())
}

/// Checks the device scopes in `table[start..end]`.
fn validate_scopes(table: &[u8], start: usize, end: usize) -> Result<(), DmarError> {
    let mut offset = start;
    while offset < end {
        let remaining = end - offset;
        let length = match u8_at(table, offset + 1) {
            Some(length) if remaining >= 2 => length,
            _ => return Err(DmarError::ScopeHeaderTruncated { offset, remaining }),
        };
        if usize::from(length) < SCOPE_HEADER_LEN || length % 2 != 0 {
            return Err(DmarError::ScopeLength { offset, length });
        }
        if usize::from(length) > remaining {
            return Err(DmarError::ScopeOverrun {
                offset,
                length,
                structure_end: end,
            });
        }
        offset += usize::from(length);
    }
    Ok(())
}

/// One remapping structure.
#[derive(Clone, Copy, Debug)]
pub enum Structure<'a> {
    /// A hardware unit.
    Drhd(Drhd<'a>),
    /// A reserved memory region.
    Rmrr(Rmrr<'a>),
    /// Root ports that support ATS.
    Atsr(Atsr<'a>),
    /// RHSA, ANDD, SATC or an unknown type, undecoded.
    Other(RawStructure<'a>),
}

impl Structure<'_> {
    /// Where the structure starts, in bytes from the start of the table.
    pub fn offset(&self) -> usize {
        match self {
            Self::Drhd(s) => s.offset,
            Self::Rmrr(s) => s.offset,
            Self::Atsr(s) => s.offset,
            Self::Other(s) => s.offset,
        }
    }

    /// The structure's type.
    pub fn kind(&self) -> StructureKind {
        match self {
            Self::Drhd(_) => StructureKind::Drhd,
            Self::Rmrr(_) => StructureKind::Rmrr,
            Self::Atsr(_) => StructureKind::Atsr,
            Self::Other(s) => s.kind,
        }
    }
}

/// A structure this parser does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawStructure<'a> {
    /// Where it starts, in bytes from the start of the table.
    pub offset: usize,
    /// Its type.
    pub kind: StructureKind,
    /// All its bytes, from the type field to its length.
    pub bytes: &'a [u8],
}

/// DMA remapping hardware unit definition: one VT-d unit and the devices it translates.
#[derive(Clone, Copy, Debug)]
pub struct Drhd<'a> {
    /// Where the structure starts, in bytes from the start of the table.
    pub offset: usize,
    /// Flags byte; see [`Drhd::include_pci_all`].
    pub flags: u8,
    /// Register set size field: bits 3:0 = N, the unit's registers span 2^N 4 KiB pages.
    pub size: u8,
    /// PCI segment number of the devices this unit covers.
    pub segment: u16,
    /// Physical address of the unit's register set (4 KiB aligned).
    pub register_base: u64,
    scopes: DeviceScopes<'a>,
}

impl<'a> Drhd<'a> {
    /// Flags bit 0: this unit covers every PCI device of its segment not claimed by another
    /// unit (its scopes then list only IOAPICs and HPETs). QEMU 7.2 leaves it clear.
    pub const INCLUDE_PCI_ALL: u8 = 1 << 0;

    /// Whether INCLUDE_PCI_ALL is set.
    pub const fn include_pci_all(&self) -> bool {
        self.flags & Self::INCLUDE_PCI_ALL != 0
    }

    /// Size of the register set, in bytes (4 KiB << N).
    pub const fn register_set_bytes(&self) -> u64 {
        4096u64 << (self.size & 0xf)
    }

    /// The device scopes, in table order.
    pub const fn scopes(&self) -> DeviceScopes<'a> {
        self.scopes
    }
}

/// Reserved memory region: memory that devices in its scopes use for DMA set up by firmware
/// (e.g. USB legacy emulation), which must stay identity-mapped for them.
#[derive(Clone, Copy, Debug)]
pub struct Rmrr<'a> {
    /// Where the structure starts, in bytes from the start of the table.
    pub offset: usize,
    /// PCI segment number.
    pub segment: u16,
    /// First byte of the region, a physical address (4 KiB aligned).
    pub base: u64,
    /// Last byte of the region, a physical address (inclusive; the region ends on a 4 KiB
    /// boundary at `limit + 1`).
    pub limit: u64,
    scopes: DeviceScopes<'a>,
}

impl<'a> Rmrr<'a> {
    /// Size of the region in bytes, or `None` if `limit` is below `base` or the size
    /// overflows 64 bits.
    pub const fn len_bytes(&self) -> Option<u64> {
        match self.limit.checked_sub(self.base) {
            Some(span) => span.checked_add(1),
            None => None,
        }
    }

    /// The devices that use the region, in table order.
    pub const fn scopes(&self) -> DeviceScopes<'a> {
        self.scopes
    }
}

/// Root port ATS capability reporting: which root ports support Address Translation Services.
#[derive(Clone, Copy, Debug)]
pub struct Atsr<'a> {
    /// Where the structure starts, in bytes from the start of the table.
    pub offset: usize,
    /// Flags byte; see [`Atsr::all_ports`].
    pub flags: u8,
    /// PCI segment number.
    pub segment: u16,
    scopes: DeviceScopes<'a>,
}

impl<'a> Atsr<'a> {
    /// Flags bit 0: every root port of the segment supports ATS (scopes then empty).
    pub const ALL_PORTS: u8 = 1 << 0;

    /// Whether ALL_PORTS is set.
    pub const fn all_ports(&self) -> bool {
        self.flags & Self::ALL_PORTS != 0
    }

    /// The root ports listed, in table order.
    pub const fn scopes(&self) -> DeviceScopes<'a> {
        self.scopes
    }
}

/// Iterator over a checked table's remapping structures.
#[derive(Clone, Debug)]
pub struct Structures<'a> {
    table: &'a [u8],
    offset: usize,
}

impl<'a> Iterator for Structures<'a> {
    type Item = Structure<'a>;

    fn next(&mut self) -> Option<Structure<'a>> {
        let offset = self.offset;
        let code = u16_at(self.table, offset)?;
        let length = usize::from(u16_at(self.table, offset + 2)?);
        let end = offset + length;
        // `Dmar::parse` has checked every length; stop rather than loop if one were bad.
        let Some(bytes) = self.table.get(offset..end).filter(|_| length >= 4) else {
            self.offset = self.table.len();
            return None;
        };
        self.offset = end;
        let kind = StructureKind::from_code(code);
        Some(
            decode_structure(kind, offset, bytes).unwrap_or(Structure::Other(RawStructure {
                offset,
                kind,
                bytes,
            })),
        )
    }
}

/// Decodes one structure (`bytes` is exactly the structure) of the kinds with fields.
fn decode_structure(kind: StructureKind, offset: usize, bytes: &[u8]) -> Option<Structure<'_>> {
    let scopes = |at: usize| -> Option<DeviceScopes<'_>> {
        Some(DeviceScopes {
            bytes: bytes.get(at..)?,
            base: offset + at,
            offset: 0,
        })
    };
    Some(match kind {
        StructureKind::Drhd => Structure::Drhd(Drhd {
            offset,
            flags: u8_at(bytes, 4)?,
            size: u8_at(bytes, 5)?,
            segment: u16_at(bytes, 6)?,
            register_base: u64_at(bytes, 8)?,
            scopes: scopes(16)?,
        }),
        StructureKind::Rmrr => Structure::Rmrr(Rmrr {
            offset,
            segment: u16_at(bytes, 6)?,
            base: u64_at(bytes, 8)?,
            limit: u64_at(bytes, 16)?,
            scopes: scopes(24)?,
        }),
        StructureKind::Atsr => Structure::Atsr(Atsr {
            offset,
            flags: u8_at(bytes, 4)?,
            segment: u16_at(bytes, 6)?,
            scopes: scopes(8)?,
        }),
        _ => return None,
    })
}

/// Iterator over the device scopes of one structure.
#[derive(Clone, Copy, Debug)]
pub struct DeviceScopes<'a> {
    /// The structure's bytes from its first scope to its end.
    bytes: &'a [u8],
    /// Offset of `bytes[0]` in the table.
    base: usize,
    /// Next scope, in bytes from `bytes[0]`.
    offset: usize,
}

impl<'a> Iterator for DeviceScopes<'a> {
    type Item = DeviceScope<'a>;

    fn next(&mut self) -> Option<DeviceScope<'a>> {
        let at = self.offset;
        let length = usize::from(u8_at(self.bytes, at + 1)?);
        let scope = self
            .bytes
            .get(at..at + length)
            .filter(|_| length >= SCOPE_HEADER_LEN);
        // `Dmar::parse` has checked every scope; stop rather than loop if one were bad.
        let (Some(scope), Some(path)) = (scope, scope.and_then(|s| s.get(SCOPE_HEADER_LEN..)))
        else {
            self.offset = self.bytes.len();
            return None;
        };
        self.offset = at + length;
        Some(DeviceScope {
            offset: self.base + at,
            kind: u8_at(scope, 0)?,
            flags: u8_at(scope, 2)?,
            enumeration_id: u8_at(scope, 4)?,
            start_bus: u8_at(scope, 5)?,
            path,
        })
    }
}

/// One device scope: a device (or bridge, IOAPIC, HPET, ACPI device) a structure applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceScope<'a> {
    /// Where the scope starts, in bytes from the start of the table.
    pub offset: usize,
    /// The type byte; see [`ScopeKind`] and [`scope_kind_name`].
    pub kind: u8,
    /// Flags byte (VT-d 4.x: bit 0 REQ_WO_PASID_NESTED_NOTALLOWED, bit 1 REQ_WO_PASID_PWSNP
    /// _NOTALLOWED, bit 2 REQ_WO_PASID_PGSNP_NOTALLOWED, bit 3 ATC_HARDENED, bit 4
    /// ATC_REQUIRED); reserved and 0 in older tables and under QEMU.
    pub flags: u8,
    /// For an IOAPIC its IOAPIC id, for an HPET its number, for an ACPI device its ANDD
    /// device number; 0 for PCI scopes.
    pub enumeration_id: u8,
    /// The bus number the path starts on.
    pub start_bus: u8,
    path: &'a [u8],
}

/// One hop of a device scope's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathEntry {
    /// PCI device number (0-31 if valid).
    pub device: u8,
    /// PCI function number (0-7 if valid).
    pub function: u8,
}

impl<'a> DeviceScope<'a> {
    /// The scope's type.
    pub const fn scope_kind(&self) -> ScopeKind {
        ScopeKind::from_code(self.kind)
    }

    /// The scope type's name, e.g. `"pci-endpoint"`.
    pub const fn kind_name(&self) -> &'static str {
        scope_kind_name(self.kind)
    }

    /// Number of (device, function) hops in the path.
    pub const fn path_len(&self) -> usize {
        self.path.len() / 2
    }

    /// The path from `start_bus` down to the device: the first hop is a device on
    /// `start_bus`, each later hop a device on the secondary bus of the bridge before it.
    pub fn path(&self) -> impl Iterator<Item = PathEntry> + 'a {
        self.path.chunks_exact(2).filter_map(|hop| match *hop {
            [device, function] => Some(PathEntry { device, function }),
            _ => None,
        })
    }

    /// The device's bus/device/function when the path has exactly one hop
    /// (bus = `start_bus`), which is the case for every scope QEMU emits.
    ///
    /// Returns `None` for a longer path: the device then sits behind bridges, and the bus of
    /// each later hop is the secondary bus number of the bridge named by the hop before, which
    /// only PCI configuration space can tell. Walk [`DeviceScope::path`] from
    /// [`DeviceScope::start_bus`] through the bridges' config space for those. Also `None` for
    /// an empty path or a hop with device > 31 or function > 7.
    pub fn bdf(&self) -> Option<Bdf> {
        match *self.path {
            [device, function] => Bdf::checked(self.start_bus, device, function),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self, TableBuilder};
    use std::string::ToString;
    use std::vec::Vec;

    /// The DMAR that `qemu-system-x86_64` 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18) put in guest
    /// memory for `-m 128M -machine q35 -device intel-iommu,intremap=on -drive if=none,id=d0,...
    /// -device virtio-blk-pci,addr=03.0,drive=d0,iommu_platform=on,disable-legacy=on -netdev
    /// hubport,id=n0,hubid=0 -device virtio-net-pci,addr=04.0,netdev=n0,iommu_platform=on,
    /// disable-legacy=on -display none`, dumped with the monitor's `pmemsave` after SeaBIOS
    /// had installed the tables.
    const QEMU72_DMAR_HEX: &str =
        "444d41528000000001ef424f434853204258504320202020010000004258504301000000\
        26010000000000000000000000005000000000000000d9fe000000000308000000ff0000\
        010800000000000001080000000001000108000000000300010800000000040001080000\
        00001f000108000000001f020108000000001f03";

    /// Same machine with `intel-iommu,intremap=on,aw-bits=48`: only byte 36 (47) and the
    /// checksum differ.
    const QEMU72_DMAR_AW48_HEX: &str =
        "444d41528000000001e6424f434853204258504320202020010000004258504301000000\
        2f010000000000000000000000005000000000000000d9fe000000000308000000ff0000\
        010800000000000001080000000001000108000000000300010800000000040001080000\
        00001f000108000000001f020108000000001f03";

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

    #[test]
    fn builder_reproduces_qemu_bytes() {
        assert_eq!(
            fixtures::qemu72_q35_dmar().as_bytes(),
            &unhex(QEMU72_DMAR_HEX)[..]
        );
        assert_eq!(
            fixtures::dmar_q35(48, true, &fixtures::QEMU_Q35_DEVICES).as_bytes(),
            &unhex(QEMU72_DMAR_AW48_HEX)[..]
        );
    }

    #[test]
    fn decodes_qemu_q35_table() {
        let bytes = unhex(QEMU72_DMAR_HEX);
        let dmar = Dmar::parse(&bytes).unwrap();
        assert_eq!(dmar.header().length, 128);
        assert_eq!(dmar.header().revision, 1);
        assert_eq!(&dmar.header().oem_id, b"BOCHS ");
        assert_eq!(dmar.host_address_width_raw(), 38);
        assert_eq!(dmar.host_address_width_bits(), 39);
        assert_eq!(dmar.flags(), DmarFlags(DmarFlags::INTR_REMAP));
        assert!(dmar.flags().intr_remap());
        assert!(!dmar.flags().x2apic_opt_out());
        assert!(!dmar.flags().dma_ctrl_platform_opt_in());

        // One DRHD, nothing else: no RMRR and no ATSR (device-iotlb is off by default).
        let kinds: Vec<StructureKind> = dmar.structures().map(|s| s.kind()).collect();
        assert_eq!(kinds, [StructureKind::Drhd]);
        assert_eq!(dmar.rmrrs().count(), 0);

        let drhd = dmar.drhds().next().unwrap();
        assert_eq!(drhd.offset, 48);
        assert_eq!(drhd.register_base, 0xfed9_0000);
        assert_eq!(drhd.segment, 0);
        assert_eq!(drhd.flags, 0);
        assert!(!drhd.include_pci_all());
        assert_eq!(drhd.register_set_bytes(), 4096);

        // The IOAPIC comes first, then every PCI function on bus 0 in devfn order.
        let mut scopes = drhd.scopes();
        let ioapic = scopes.next().unwrap();
        assert_eq!(ioapic.offset, 64);
        assert_eq!(ioapic.scope_kind(), ScopeKind::Ioapic);
        assert_eq!(ioapic.kind_name(), "ioapic");
        assert_eq!(ioapic.enumeration_id, 0);
        // QEMU's IOAPIC requester id is ff:00.0 (Q35_PSEUDO_BUS_PLATFORM 0xff, devfn 0),
        // not the f0:1f.0 of Intel boards.
        assert_eq!(ioapic.start_bus, 0xff);
        assert_eq!(
            ioapic.path().collect::<Vec<_>>(),
            [PathEntry {
                device: 0,
                function: 0
            }]
        );
        assert_eq!(ioapic.bdf(), Some(bdf(0xff, 0, 0)));

        let endpoints: Vec<(ScopeKind, Bdf)> =
            scopes.map(|s| (s.scope_kind(), s.bdf().unwrap())).collect();
        let expected: Vec<(ScopeKind, Bdf)> = [
            bdf(0, 0, 0),    // q35 host bridge
            bdf(0, 1, 0),    // default VGA
            bdf(0, 3, 0),    // virtio-blk
            bdf(0, 4, 0),    // virtio-net
            bdf(0, 0x1f, 0), // ICH9 LPC
            bdf(0, 0x1f, 2), // ICH9 AHCI
            bdf(0, 0x1f, 3), // ICH9 SMBus
        ]
        .into_iter()
        .map(|b| (ScopeKind::PciEndpoint, b))
        .collect();
        assert_eq!(endpoints, expected);
    }

    #[test]
    fn aw_bits_48_changes_only_the_host_address_width() {
        let bytes = unhex(QEMU72_DMAR_AW48_HEX);
        let dmar = Dmar::parse(&bytes).unwrap();
        assert_eq!(dmar.host_address_width_bits(), 48);
        assert_eq!(dmar.drhds().next().unwrap().scopes().count(), 8);
    }

    #[test]
    fn ignores_bytes_past_the_length_field() {
        let mut bytes = unhex(QEMU72_DMAR_HEX);
        bytes.extend_from_slice(&[0xff; 64]);
        let dmar = Dmar::parse(&bytes).unwrap();
        assert_eq!(dmar.bytes().len(), 128);
        assert_eq!(dmar.structures().count(), 1);
    }

    #[test]
    fn refuses_bad_header() {
        let good = fixtures::qemu72_q35_dmar();

        let mut t = good.clone();
        t.set_u8(9, t.as_bytes()[9].wrapping_add(1));
        assert_eq!(
            Dmar::parse(t.as_bytes()).unwrap_err(),
            DmarError::Header(HeaderError::Checksum { sum: 1 })
        );

        assert_eq!(
            Dmar::parse(&good.as_bytes()[..100]).unwrap_err(),
            DmarError::Header(HeaderError::Truncated {
                length: 128,
                available: 100
            })
        );
        assert_eq!(
            Dmar::parse(&good.as_bytes()[..40]).unwrap_err(),
            DmarError::Header(HeaderError::TooShort {
                available: 40,
                needed: 48
            })
        );

        let mut t = good.clone();
        t.set_u32(0, u32::from_le_bytes(*b"DMAX")).fix_checksum();
        let err = Dmar::parse(t.as_bytes()).unwrap_err();
        assert_eq!(
            err,
            DmarError::Header(HeaderError::Signature {
                expected: *b"DMAR",
                found: *b"DMAX"
            })
        );
        assert_eq!(
            err.to_string(),
            "DMAR: signature at byte 0 is \"DMAX\", expected \"DMAR\""
        );

        let mut t = good.clone();
        t.set_u32(4, 40).fix_checksum();
        assert_eq!(
            Dmar::parse(t.as_bytes()).unwrap_err(),
            DmarError::Header(HeaderError::LengthTooSmall {
                length: 40,
                needed: 48
            })
        );
    }

    #[test]
    fn refuses_structure_of_length_zero() {
        let mut t = fixtures::qemu72_q35_dmar();
        t.set_u16(50, 0).fix_checksum();
        let err = Dmar::parse(t.as_bytes()).unwrap_err();
        assert_eq!(
            err,
            DmarError::StructureTooShort {
                offset: 48,
                kind: StructureKind::Drhd,
                length: 0,
                minimum: 16
            }
        );
        assert_eq!(err.offset(), Some(48));
        assert_eq!(
            err.to_string(),
            "DMAR: drhd structure (type 0) at byte 0x30: length 0 bytes is less than its minimum 16"
        );
        // An unknown type of length 0 is refused too: it would never advance.
        let mut t = fixtures::qemu72_q35_dmar();
        t.set_u16(48, 0x99).set_u16(50, 0).fix_checksum();
        assert_eq!(
            Dmar::parse(t.as_bytes()).unwrap_err(),
            DmarError::StructureTooShort {
                offset: 48,
                kind: StructureKind::Unknown(0x99),
                length: 0,
                minimum: 4
            }
        );
    }

    #[test]
    fn refuses_structure_past_the_end() {
        let mut t = fixtures::qemu72_q35_dmar();
        t.set_u16(50, 82).fix_checksum();
        let err = Dmar::parse(t.as_bytes()).unwrap_err();
        assert_eq!(
            err,
            DmarError::StructureOverrun {
                offset: 48,
                length: 82,
                table_length: 128
            }
        );
        assert_eq!(
            err.to_string(),
            "DMAR: structure at byte 0x30: length 82 bytes runs past the table's end at byte 0x80"
        );
    }

    #[test]
    fn refuses_truncated_structure_header() {
        let mut t = fixtures::qemu72_q35_dmar();
        t.u16(1).finish();
        assert_eq!(
            Dmar::parse(t.as_bytes()).unwrap_err(),
            DmarError::StructureHeaderTruncated {
                offset: 128,
                remaining: 2
            }
        );
    }

    #[test]
    fn refuses_bad_scope_lengths() {
        // The first scope (IOAPIC) is at byte 64; its length byte at 65.
        for (length, expected) in [
            (
                7,
                DmarError::ScopeLength {
                    offset: 64,
                    length: 7,
                },
            ),
            (
                4,
                DmarError::ScopeLength {
                    offset: 64,
                    length: 4,
                },
            ),
            (
                0,
                DmarError::ScopeLength {
                    offset: 64,
                    length: 0,
                },
            ),
            (
                66,
                DmarError::ScopeOverrun {
                    offset: 64,
                    length: 66,
                    structure_end: 128,
                },
            ),
        ] {
            let mut t = fixtures::qemu72_q35_dmar();
            t.set_u8(65, length).fix_checksum();
            assert_eq!(Dmar::parse(t.as_bytes()).unwrap_err(), expected);
        }
        let mut t = fixtures::qemu72_q35_dmar();
        t.set_u8(65, 7).fix_checksum();
        assert_eq!(
            Dmar::parse(t.as_bytes()).unwrap_err().to_string(),
            "DMAR: device scope at byte 0x40: length 7 bytes is not 6 + 2n (n path entries)"
        );
    }

    #[test]
    fn refuses_scope_header_cut_by_structure_end() {
        // A DRHD whose last byte is a lone scope type byte.
        let mut t = TableBuilder::new(b"DMAR", 1);
        t.u8(38).u8(0).bytes(&[0; 10]);
        t.u16(0).u16(17).u8(0).u8(0).u16(0).u64(0xfed9_0000).u8(1);
        t.finish();
        assert_eq!(
            Dmar::parse(t.as_bytes()).unwrap_err(),
            DmarError::ScopeHeaderTruncated {
                offset: 64,
                remaining: 1
            }
        );
    }

    #[test]
    fn decodes_rmrr_atsr_and_raw_structures() {
        let mut t = TableBuilder::new(b"DMAR", 1);
        t.u8(45).u8(0b111).bytes(&[0; 10]);
        // DRHD with INCLUDE_PCI_ALL, 2^1 pages of registers, segment 1, one HPET scope.
        t.u16(0).u16(24).u8(1).u8(1).u16(1).u64(0xfed9_1000);
        t.u8(4).u8(8).u8(0).u8(0).u8(2).u8(0).u8(0x1f).u8(7);
        // RMRR for USB at 00:14.0, and a scope two bridges deep.
        t.u16(1).u16(24 + 8 + 12).u16(0).u16(0);
        t.u64(0x7d00_0000).u64(0x7d01_ffff);
        t.u8(1).u8(8).u8(0).u8(0).u8(0).u8(0).u8(0x14).u8(0);
        t.u8(1)
            .u8(12)
            .u8(0)
            .u8(0)
            .u8(0)
            .u8(0)
            .bytes(&[0x1c, 0, 0, 0, 3, 1]);
        // ATSR for all ports.
        t.u16(2).u16(8).u8(1).u8(0).u16(0);
        // RHSA, and an unknown type 0x77 with a body.
        t.u16(3).u16(20).u32(0).u64(0xfed9_0000).u32(1);
        t.u16(0x77).u16(6).u16(0xabcd);
        t.finish();

        let dmar = Dmar::parse(t.as_bytes()).unwrap();
        assert_eq!(dmar.host_address_width_bits(), 46);
        assert!(dmar.flags().x2apic_opt_out());
        assert!(dmar.flags().dma_ctrl_platform_opt_in());
        let all: Vec<Structure<'_>> = dmar.structures().collect();
        assert_eq!(all.len(), 5);

        let Structure::Drhd(drhd) = all[0] else {
            panic!("want DRHD, got {:?}", all[0])
        };
        assert!(drhd.include_pci_all());
        assert_eq!(drhd.segment, 1);
        assert_eq!(drhd.register_set_bytes(), 8192);
        let hpet = drhd.scopes().next().unwrap();
        assert_eq!(hpet.kind_name(), "hpet");
        assert_eq!(hpet.enumeration_id, 2);
        assert_eq!(hpet.bdf(), Some(bdf(0, 0x1f, 7)));

        let rmrr = dmar.rmrrs().next().unwrap();
        assert_eq!(rmrr.offset, 72);
        assert_eq!(rmrr.base, 0x7d00_0000);
        assert_eq!(rmrr.limit, 0x7d01_ffff);
        assert_eq!(rmrr.len_bytes(), Some(0x2_0000));
        let scopes: Vec<DeviceScope<'_>> = rmrr.scopes().collect();
        assert_eq!(scopes[0].bdf(), Some(bdf(0, 0x14, 0)));
        assert_eq!(scopes[1].path_len(), 3);
        assert_eq!(scopes[1].bdf(), None, "bus of a deeper hop is unknown");
        assert_eq!(
            scopes[1].path().collect::<Vec<_>>(),
            [
                PathEntry {
                    device: 0x1c,
                    function: 0
                },
                PathEntry {
                    device: 0,
                    function: 0
                },
                PathEntry {
                    device: 3,
                    function: 1
                },
            ]
        );

        let Structure::Atsr(atsr) = all[2] else {
            panic!("want ATSR, got {:?}", all[2])
        };
        assert!(atsr.all_ports());
        assert_eq!(atsr.scopes().count(), 0);

        let Structure::Other(rhsa) = all[3] else {
            panic!("want raw RHSA, got {:?}", all[3])
        };
        assert_eq!(rhsa.kind, StructureKind::Rhsa);
        assert_eq!(rhsa.bytes.len(), 20);
        let Structure::Other(unknown) = all[4] else {
            panic!("want raw unknown, got {:?}", all[4])
        };
        assert_eq!(unknown.kind, StructureKind::Unknown(0x77));
        assert_eq!(unknown.offset, all[3].offset() + 20);
        assert_eq!(unknown.bytes, &[0x77, 0, 6, 0, 0xcd, 0xab]);
    }

    #[test]
    fn rmrr_len_handles_hostile_limits() {
        let r = |base, limit| Rmrr {
            offset: 0,
            segment: 0,
            base,
            limit,
            scopes: DeviceScopes {
                bytes: &[],
                base: 0,
                offset: 0,
            },
        };
        assert_eq!(r(0x2000, 0x1fff).len_bytes(), None);
        assert_eq!(r(0, u64::MAX).len_bytes(), None);
        assert_eq!(r(0x1000, 0x1fff).len_bytes(), Some(0x1000));
    }

    #[test]
    fn names_scope_kinds() {
        let names: Vec<&str> = (0..=6).map(scope_kind_name).collect();
        assert_eq!(
            names,
            [
                "unknown",
                "pci-endpoint",
                "pci-subhierarchy",
                "ioapic",
                "hpet",
                "acpi-namespace",
                "unknown"
            ]
        );
    }

    /// Parses and walks everything; returns whether the table was accepted.
    fn walk(bytes: &[u8]) -> bool {
        let Ok(dmar) = Dmar::parse(bytes) else {
            return false;
        };
        let _ = (dmar.host_address_width_bits(), dmar.flags());
        for s in dmar.structures() {
            let scopes = match s {
                Structure::Drhd(d) => d.scopes(),
                Structure::Rmrr(r) => r.scopes(),
                Structure::Atsr(a) => a.scopes(),
                Structure::Other(_) => continue,
            };
            for scope in scopes {
                let _ = (scope.bdf(), scope.path().count(), scope.kind_name());
            }
        }
        true
    }

    #[test]
    fn survives_every_truncation_and_corruption() {
        let good = fixtures::qemu72_q35_dmar();
        // Every shorter table, with length and checksum made consistent, so the structure
        // walk itself meets the cut.
        for len in 0..good.len() {
            let mut t = good.clone();
            t.truncate(len);
            if len >= 36 {
                t.finish();
            }
            // The DRHD still claims 80 bytes, so every cut is refused except the one that
            // leaves no structure at all (a 48-byte DMAR is valid, if useless).
            assert_eq!(walk(t.as_bytes()), len == 48, "{len}-byte cut");
        }
        // Every single byte set to every interesting value, checksum fixed.
        for at in 0..good.len() {
            for value in [0x00, 0x01, 0x02, 0x05, 0x06, 0x07, 0x08, 0x7f, 0x80, 0xff] {
                let mut t = good.clone();
                t.set_u8(at, value).fix_checksum();
                walk(t.as_bytes());
            }
        }
        // Pseudo-random multi-byte corruption (xorshift, fixed seed).
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
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
