//! ACPI through the `acpi` crate: the RSDT (QEMU's RSDP is revision 0) or
//! XSDT, MADT, MCFG, and the DMAR and IVRS tables as table types of our own
//! whose bodies the `iommu` crate decodes.
//!
//! Firmware tables may sit in memory the PVH map calls RAM, so before the
//! frame allocator exists [`table_ranges`] walks them on the boot identity
//! map and reports every byte they occupy, to be reserved.

use crate::mm;
use crate::sync::Lock;
use acpi::sdt::{SdtHeader, Signature};
use acpi::{AcpiHandler, AcpiTable, AcpiTables, PhysicalMapping};
use alloc::vec::Vec;
use core::ptr::NonNull;
use hypervisor::frames::Range;

/// Physical ranges the early walk mapped.
struct Seen {
    ranges: [Range; 64],
    len: usize,
    /// More mappings than `ranges` holds: the walk cannot vouch for them all.
    overflow: bool,
    last: u64,
}

static SEEN: Lock<Seen> = Lock::new(Seen {
    ranges: [Range::new(0, 0); 64],
    len: 0,
    overflow: false,
    last: 0,
});

/// Maps through the boot identity map and remembers what was mapped.
#[derive(Clone)]
struct EarlyHandler;

impl AcpiHandler for EarlyHandler {
    unsafe fn map_physical_region<T>(&self, pa: usize, size: usize) -> PhysicalMapping<Self, T> {
        let mut s = SEEN.lock();
        s.last = pa as u64;
        if s.len < s.ranges.len() {
            let i = s.len;
            s.ranges[i] = Range::new(pa as u64, (pa + size) as u64);
            s.len += 1;
        } else {
            s.overflow = true;
        }
        let ptr = NonNull::new(pa as *mut T).expect("ACPI table at address 0");
        // SAFETY: the boot tables identity-map the first 4 GiB, where QEMU
        // puts its ACPI tables, so `pa` is readable at `pa`.
        unsafe { PhysicalMapping::new(pa, ptr, size, size, self.clone()) }
    }

    fn unmap_physical_region<T>(_: &PhysicalMapping<Self, T>) {}
}

/// Every physical range the ACPI tables occupy: RSDP, root table, each
/// table it lists, and the DSDT and FACS the FADT points at.
pub fn table_ranges(rsdp: u64, mut reserve: impl FnMut(Range)) -> Result<(), TableWalkError> {
    // SAFETY: the RSDP address comes from start_info, where QEMU put it.
    let tables = unsafe {
        AcpiTables::from_rsdp(EarlyHandler, rsdp as usize).map_err(TableWalkError::Acpi)?
    };
    // Each step of the iterator maps the next table's header, so `last` is
    // that table's address when the header arrives.
    for h in tables.headers() {
        let at = SEEN.lock().last;
        reserve(Range::new(at, at + u64::from(h.length)));
    }
    if let Ok(fadt) = tables.find_table::<acpi::fadt::Fadt>() {
        if let Ok(dsdt) = fadt.dsdt_address() {
            // SAFETY: the FADT names the DSDT's address; read only its header.
            let len = unsafe { core::ptr::read_unaligned((dsdt + 4) as *const u32) };
            reserve(Range::new(dsdt as u64, dsdt as u64 + u64::from(len)));
        }
        if let Ok(facs) = fadt.facs_address() {
            reserve(Range::new(facs as u64, facs as u64 + 64));
        }
    }
    let s = SEEN.lock();
    if s.overflow {
        return Err(TableWalkError::TooManyMappings(s.ranges.len()));
    }
    s.ranges[..s.len].iter().for_each(|&r| reserve(r));
    Ok(())
}

#[derive(Debug)]
pub enum TableWalkError {
    Acpi(acpi::AcpiError),
    /// The walk mapped more ranges than it can remember to reserve.
    TooManyMappings(usize),
}

impl core::fmt::Display for TableWalkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TableWalkError::Acpi(e) => write!(f, "{e:?}"),
            TableWalkError::TooManyMappings(n) => {
                write!(f, "the tables span more than {n} mappings")
            }
        }
    }
}

/// Maps through the direct map, or write-back into the device window.
#[derive(Clone)]
struct Handler;

impl AcpiHandler for Handler {
    unsafe fn map_physical_region<T>(&self, pa: usize, size: usize) -> PhysicalMapping<Self, T> {
        let va = mm::phys_to_ptr(pa as u64, size as u64);
        let ptr = NonNull::new(va.cast::<T>()).expect("mapped");
        // SAFETY: `va` maps `size` bytes from `pa`, for ever (the device
        // window is never unmapped).
        unsafe { PhysicalMapping::new(pa, ptr, size, size, self.clone()) }
    }

    fn unmap_physical_region<T>(_: &PhysicalMapping<Self, T>) {}
}

/// A whole table whose body we decode ourselves.
#[repr(C, packed)]
struct RawTable<const SIG: u32> {
    header: SdtHeader,
}

type DmarTable = RawTable<{ u32::from_le_bytes(*b"DMAR") }>;
type IvrsTable = RawTable<{ u32::from_le_bytes(*b"IVRS") }>;

// SAFETY: the struct is exactly an SDT header, and `SIGNATURE` is the
// signature the header carries; the body is decoded by the `iommu` crate
// from the bytes the header's length covers.
unsafe impl AcpiTable for DmarTable {
    const SIGNATURE: Signature = Signature::DMAR;
    fn header(&self) -> &SdtHeader {
        &self.header
    }
}

// SAFETY: as for `DmarTable`.
unsafe impl AcpiTable for IvrsTable {
    const SIGNATURE: Signature = Signature::IVRS;
    fn header(&self) -> &SdtHeader {
        &self.header
    }
}

/// What the hypervisor learns from ACPI.
pub struct Platform {
    pub lapic_base: u64,
    pub cpus: Vec<u8>,
    pub ioapics: Vec<(u8, u64)>,
    /// ECAM windows: (base, segment, first bus, last bus).
    pub ecam: Vec<(u64, u16, u8, u8)>,
    /// The DMAR table's bytes, if there is one.
    pub dmar: Option<&'static [u8]>,
    /// The IVRS table's bytes, if there is one.
    pub ivrs: Option<&'static [u8]>,
}

fn table_bytes<T: AcpiTable>(tables: &AcpiTables<Handler>) -> Option<&'static [u8]> {
    let map = tables.find_table::<T>().ok()?;
    let len = map.region_length().min(map.get().header().length as usize);
    let ptr = map.virtual_start().as_ptr().cast::<u8>();
    // SAFETY: the mapping covers the whole table (the acpi crate mapped
    // `length` bytes to check its checksum) and is never unmapped; the table
    // is reserved memory that nothing writes.
    Some(unsafe { core::slice::from_raw_parts(ptr, len) })
}

pub fn discover(rsdp: u64) -> Result<Platform, acpi::AcpiError> {
    // SAFETY: the RSDP address comes from start_info, where QEMU put it.
    let tables = unsafe { AcpiTables::from_rsdp(Handler, rsdp as usize)? };
    let madt = tables.find_table::<acpi::madt::Madt>()?;
    let mut p = Platform {
        lapic_base: u64::from(madt.get().local_apic_address),
        cpus: Vec::new(),
        ioapics: Vec::new(),
        ecam: Vec::new(),
        dmar: table_bytes::<DmarTable>(&tables),
        ivrs: table_bytes::<IvrsTable>(&tables),
    };
    for e in madt.get().entries() {
        match e {
            acpi::madt::MadtEntry::LocalApic(l) if l.flags & 1 != 0 => p.cpus.push(l.apic_id),
            acpi::madt::MadtEntry::IoApic(io) => p
                .ioapics
                .push((io.io_apic_id, u64::from(io.io_apic_address))),
            acpi::madt::MadtEntry::LocalApicAddressOverride(o) => {
                p.lapic_base = o.local_apic_address
            }
            _ => {}
        }
    }
    if let Ok(mcfg) = tables.find_table::<acpi::mcfg::Mcfg>() {
        for e in mcfg.entries() {
            p.ecam.push((
                { e.base_address },
                { e.pci_segment_group },
                e.bus_number_start,
                e.bus_number_end,
            ));
        }
    }
    Ok(p)
}
