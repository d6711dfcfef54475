//! PCI enumeration through ECAM (from the MCFG), with `pci_types`.

use crate::mm::{self, Cache};
use abi::ev::Bdf;
use alloc::vec::Vec;
use hypervisor::pcicfg::{Capability, CAP_MSI, CAP_MSIX, CAP_PCIE, CAP_VENDOR};
use pci_types::{
    Bar, ConfigRegionAccess, EndpointHeader, HeaderType, PciAddress, PciHeader, PciPciBridgeHeader,
};

/// One ECAM window, mapped uncached.
pub struct Ecam {
    base: *mut u8,
    segment: u16,
    first_bus: u8,
    last_bus: u8,
}

impl Ecam {
    /// Maps the window of buses `first..=last` at physical `pa`.
    pub fn map(pa: u64, segment: u16, first_bus: u8, last_bus: u8) -> Ecam {
        let len = (u64::from(last_bus - first_bus) + 1) << 20;
        let base = mm::map_device(pa + (u64::from(first_bus) << 20), len, Cache::Uncached);
        Ecam {
            base,
            segment,
            first_bus,
            last_bus,
        }
    }

    fn addr(&self, a: PciAddress, offset: u16) -> Option<*mut u32> {
        let ok = a.segment() == self.segment
            && (self.first_bus..=self.last_bus).contains(&a.bus())
            && a.device() < 32
            && a.function() < 8
            && offset < 4096
            && offset.is_multiple_of(4);
        let off = (usize::from(a.bus() - self.first_bus) << 20)
            | usize::from(a.device()) << 15
            | usize::from(a.function()) << 12
            | usize::from(offset);
        // SAFETY: with the checks above, `off` lies inside the mapped window.
        ok.then(|| unsafe { self.base.add(off) }.cast())
    }
}

// SAFETY: the window is MMIO of the whole machine's config space, mapped
// for ever; every access goes through the `Lock` of whoever holds the Ecam.
unsafe impl Send for Ecam {}

impl ConfigRegionAccess for &Ecam {
    unsafe fn read(&self, a: PciAddress, offset: u16) -> u32 {
        match self.addr(a, offset) {
            // SAFETY: an aligned register inside the uncached ECAM window.
            Some(p) => unsafe { p.read_volatile() },
            None => u32::MAX,
        }
    }

    unsafe fn write(&self, a: PciAddress, offset: u16, value: u32) {
        if let Some(p) = self.addr(a, offset) {
            // SAFETY: as for `read`; config writes change only the device.
            unsafe { p.write_volatile(value) }
        }
    }
}

/// One base address register.
#[derive(Clone, Copy, Debug)]
pub struct BarInfo {
    pub index: u8,
    /// "mem32", "mem64" or "io".
    pub kind: &'static str,
    pub addr: u64,
    pub size: u64,
    pub prefetchable: bool,
}

impl BarInfo {
    fn new(ecam: &Ecam, addr: PciAddress, index: u8, bar: Bar) -> BarInfo {
        match bar {
            Bar::Memory32 {
                address,
                size,
                prefetchable,
            } => BarInfo {
                index,
                kind: "mem32",
                addr: u64::from(address),
                size: u64::from(size),
                prefetchable,
            },
            Bar::Memory64 {
                address,
                size,
                prefetchable,
            } => BarInfo {
                index,
                kind: "mem64",
                addr: address,
                size,
                prefetchable,
            },
            Bar::Io { port } => BarInfo {
                index,
                kind: "io",
                addr: u64::from(port),
                size: u64::from(io_bar_size(ecam, addr, index)),
                prefetchable: false,
            },
        }
    }
}

/// The size of I/O BAR `slot` in bytes (pci_types sizes only memory BARs):
/// write all ones, read back the writable bits, restore.
fn io_bar_size(ecam: &Ecam, addr: PciAddress, slot: u8) -> u32 {
    let off = 0x10 + 4 * u16::from(slot);
    // SAFETY: a BAR register of a present endpoint; the original value is
    // put back before anything can use the device (nothing does DMA or I/O
    // while ring 0 enumerates).
    let mask = unsafe {
        let orig = ecam.read(addr, off);
        ecam.write(addr, off, u32::MAX);
        let mask = ecam.read(addr, off);
        ecam.write(addr, off, orig);
        mask
    };
    if mask & !3 == 0 {
        return 0;
    }
    (!(mask & !3) & 0xffff) + 1
}

/// Where a function's MSI-X table and PBA live.
#[derive(Clone, Copy, Debug)]
pub struct Msix {
    /// Offset of the capability in config space.
    pub cap: u16,
    /// Number of table entries.
    pub entries: u16,
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

/// What enumeration found about one function.
pub struct Function {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// Base class, subclass, programming interface (24 bits).
    pub class: u32,
    pub header_type: u8,
    pub bars: Vec<BarInfo>,
    pub caps: Vec<Capability>,
    pub msix: Option<Msix>,
}

/// Walks the capability list (at most 48 entries, so a looping list ends).
fn capabilities(ecam: &Ecam, addr: PciAddress) -> (Vec<Capability>, Option<Msix>) {
    let rd = |off: u16| {
        // SAFETY: `off` is a dword-aligned offset below 256 of a present function.
        unsafe { ecam.read(addr, off & 0xfc) }
    };
    let mut caps = Vec::new();
    let mut msix = None;
    // Status bit 4: a capability list exists.
    if rd(0x04) >> 16 & 0x10 == 0 {
        return (caps, msix);
    }
    let mut ptr = (rd(0x34) & 0xfc) as u16;
    for _ in 0..48 {
        if ptr < 0x40 {
            break;
        }
        let head = rd(ptr);
        let id = head as u8;
        let len = match id {
            CAP_MSI => 24,
            CAP_MSIX => {
                let table = rd(ptr + 4);
                let pba = rd(ptr + 8);
                msix = Some(Msix {
                    cap: ptr,
                    entries: ((head >> 16) & 0x7ff) as u16 + 1,
                    table_bar: (table & 7) as u8,
                    table_offset: table & !7,
                    pba_bar: (pba & 7) as u8,
                    pba_offset: pba & !7,
                });
                12
            }
            CAP_VENDOR => ((head >> 16) & 0xff) as u16,
            CAP_PCIE => 0x3c,
            _ => 4,
        };
        caps.push(Capability {
            id,
            offset: ptr,
            len: len.max(4),
        });
        ptr = ((head >> 8) & 0xfc) as u16;
    }
    (caps, msix)
}

/// Walks the buses reachable from the first bus of `ecam`, following
/// PCI-PCI bridges.
pub fn enumerate(ecam: &Ecam) -> Vec<Function> {
    let mut found = Vec::new();
    let mut buses = alloc::vec![ecam.first_bus];
    let mut seen = [false; 256];
    while let Some(bus) = buses.pop() {
        if core::mem::replace(&mut seen[usize::from(bus)], true) {
            continue;
        }
        for dev in 0..32 {
            for func in 0..8 {
                let addr = PciAddress::new(ecam.segment, bus, dev, func);
                let header = PciHeader::new(addr);
                let (vendor, device) = header.id(ecam);
                if vendor == 0xffff {
                    if func == 0 {
                        break;
                    }
                    continue;
                }
                let (_, class, subclass, interface) = header.revision_and_class(ecam);
                let multi = func == 0 && header.has_multiple_functions(ecam);
                let raw_type = (header.header_type(ecam), {
                    // SAFETY: offset 0x0c is the header-type register of a present function.
                    (unsafe { ecam.read(addr, 0x0c) } >> 16) as u8
                });
                let mut f = Function {
                    bdf: Bdf::new(bus, dev, func),
                    vendor,
                    device,
                    class: u32::from(class) << 16 | u32::from(subclass) << 8 | u32::from(interface),
                    header_type: raw_type.1 & 0x7f,
                    bars: Vec::new(),
                    caps: Vec::new(),
                    msix: None,
                };
                match raw_type.0 {
                    HeaderType::Endpoint => {
                        if let Some(ep) = EndpointHeader::from_header(header, ecam) {
                            (f.caps, f.msix) = capabilities(ecam, addr);
                            let mut slot = 0;
                            while slot < 6 {
                                let bar = ep.bar(slot, ecam);
                                let wide = matches!(bar, Some(Bar::Memory64 { .. }));
                                if let Some(b) = bar {
                                    f.bars.push(BarInfo::new(ecam, addr, slot, b));
                                }
                                slot += if wide { 2 } else { 1 };
                            }
                        }
                    }
                    HeaderType::PciPciBridge => {
                        if let Some(br) = PciPciBridgeHeader::from_header(header, ecam) {
                            buses.push(br.secondary_bus_number(ecam));
                        }
                    }
                    _ => {}
                }
                found.push(f);
                if func == 0 && !multi {
                    break;
                }
            }
        }
    }
    found.sort_by_key(|f| f.bdf);
    found
}
