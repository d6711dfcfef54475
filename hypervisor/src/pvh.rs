//! Xen's PVH boot protocol as QEMU speaks it: the `hvm_start_info` block
//! whose physical address arrives in EBX, its module list and memory map.
//!
//! Decoders take the bytes the boot code copied and check every size; they
//! never follow a pointer themselves.

use core::fmt;

/// `hvm_start_info.magic`.
pub const MAGIC: u32 = 0x336e_c578;
/// Bytes of `hvm_start_info` up to and including the version-1 fields.
pub const START_INFO_SIZE: usize = 56;
/// Bytes of one `hvm_modlist_entry`.
pub const MODULE_ENTRY_SIZE: usize = 32;
/// Bytes of one `hvm_memmap_table_entry`.
pub const MEMMAP_ENTRY_SIZE: usize = 24;

/// The fields of `hvm_start_info` (version 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartInfo {
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvhError {
    /// The magic at offset 0 is not [`MAGIC`].
    BadMagic(u32),
    /// Version 0 has no memory map, and airlock needs one.
    NoMemoryMap { version: u32 },
    /// Fewer bytes than a structure needs.
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
}

impl fmt::Display for PvhError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PvhError::BadMagic(m) => write!(f, "start_info magic is {m:#x}, expected {MAGIC:#x}"),
            PvhError::NoMemoryMap { version } => {
                write!(
                    f,
                    "start_info version {version} has no memory map (need version 1)"
                )
            }
            PvhError::Truncated { what, need, have } => {
                write!(f, "{what}: need {need} bytes, have {have}")
            }
        }
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | u64::from(u32_at(b, off + 4)) << 32
}

fn need(what: &'static str, b: &[u8], need: usize) -> Result<(), PvhError> {
    if b.len() < need {
        return Err(PvhError::Truncated {
            what,
            need,
            have: b.len(),
        });
    }
    Ok(())
}

impl StartInfo {
    pub fn parse(b: &[u8]) -> Result<Self, PvhError> {
        need("start_info", b, START_INFO_SIZE)?;
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return Err(PvhError::BadMagic(magic));
        }
        let version = u32_at(b, 4);
        if version < 1 {
            return Err(PvhError::NoMemoryMap { version });
        }
        Ok(StartInfo {
            version,
            flags: u32_at(b, 8),
            nr_modules: u32_at(b, 12),
            modlist_paddr: u64_at(b, 16),
            cmdline_paddr: u64_at(b, 24),
            rsdp_paddr: u64_at(b, 32),
            memmap_paddr: u64_at(b, 40),
            memmap_entries: u32_at(b, 48),
        })
    }
}

/// One module (QEMU's `-initrd` is module 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module {
    pub paddr: u64,
    pub size: u64,
    pub cmdline_paddr: u64,
}

impl Module {
    /// Decodes entry `index` of a module list.
    pub fn parse(list: &[u8], index: usize) -> Result<Self, PvhError> {
        let off = index * MODULE_ENTRY_SIZE;
        need("module list", list, off + MODULE_ENTRY_SIZE)?;
        Ok(Module {
            paddr: u64_at(list, off),
            size: u64_at(list, off + 8),
            cmdline_paddr: u64_at(list, off + 16),
        })
    }
}

/// The E820 type of a memory-map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    Ram,
    Reserved,
    AcpiReclaimable,
    AcpiNvs,
    Unusable,
    Other(u32),
}

impl MemoryKind {
    pub fn from_raw(t: u32) -> Self {
        match t {
            1 => MemoryKind::Ram,
            2 => MemoryKind::Reserved,
            3 => MemoryKind::AcpiReclaimable,
            4 => MemoryKind::AcpiNvs,
            5 => MemoryKind::Unusable,
            t => MemoryKind::Other(t),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MemoryKind::Ram => "ram",
            MemoryKind::Reserved => "reserved",
            MemoryKind::AcpiReclaimable => "acpi",
            MemoryKind::AcpiNvs => "acpi-nvs",
            MemoryKind::Unusable => "unusable",
            MemoryKind::Other(_) => "other",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

impl MemoryRegion {
    /// Decodes entry `index` of a memory map.
    pub fn parse(map: &[u8], index: usize) -> Result<Self, PvhError> {
        let off = index * MEMMAP_ENTRY_SIZE;
        need("memory map", map, off + MEMMAP_ENTRY_SIZE)?;
        Ok(MemoryRegion {
            addr: u64_at(map, off),
            size: u64_at(map, off + 8),
            kind: MemoryKind::from_raw(u32_at(map, off + 16)),
        })
    }

    /// One past the last byte, saturating on a hostile size.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start_info(magic: u32, version: u32) -> [u8; START_INFO_SIZE] {
        let mut b = [0u8; START_INFO_SIZE];
        b[0..4].copy_from_slice(&magic.to_le_bytes());
        b[4..8].copy_from_slice(&version.to_le_bytes());
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        b[16..24].copy_from_slice(&0x6000u64.to_le_bytes());
        b[32..40].copy_from_slice(&0xf52e0u64.to_le_bytes());
        b[40..48].copy_from_slice(&0x6040u64.to_le_bytes());
        b[48..52].copy_from_slice(&5u32.to_le_bytes());
        b
    }

    #[test]
    fn parses_version_1() {
        let si = StartInfo::parse(&start_info(MAGIC, 1)).unwrap();
        assert_eq!(
            (si.nr_modules, si.modlist_paddr, si.rsdp_paddr),
            (1, 0x6000, 0xf52e0)
        );
        assert_eq!((si.memmap_paddr, si.memmap_entries), (0x6040, 5));
    }

    #[test]
    fn rejects_bad_magic_old_version_and_short_input() {
        assert_eq!(
            StartInfo::parse(&start_info(0x1234, 1)),
            Err(PvhError::BadMagic(0x1234))
        );
        assert_eq!(
            StartInfo::parse(&start_info(MAGIC, 0)),
            Err(PvhError::NoMemoryMap { version: 0 })
        );
        assert!(matches!(
            StartInfo::parse(&[0u8; 20]),
            Err(PvhError::Truncated {
                need: 56,
                have: 20,
                ..
            })
        ));
    }

    #[test]
    fn memory_map_entries() {
        let mut map = [0u8; 48];
        map[0..8].copy_from_slice(&0x100000u64.to_le_bytes());
        map[8..16].copy_from_slice(&0x7f00000u64.to_le_bytes());
        map[16..20].copy_from_slice(&1u32.to_le_bytes());
        map[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        map[32..40].copy_from_slice(&0x1000u64.to_le_bytes());
        map[40..44].copy_from_slice(&2u32.to_le_bytes());
        let r = MemoryRegion::parse(&map, 0).unwrap();
        assert_eq!(
            (r.addr, r.end(), r.kind),
            (0x100000, 0x8000000, MemoryKind::Ram)
        );
        let r = MemoryRegion::parse(&map, 1).unwrap();
        assert_eq!((r.end(), r.kind), (u64::MAX, MemoryKind::Reserved));
        assert!(MemoryRegion::parse(&map, 2).is_err());
    }
}
