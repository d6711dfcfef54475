//! PCI passthrough: the functions the manifest assigns to driver domains.
//!
//! For each assigned function the hypervisor attaches it to its owner's
//! IOMMU domain, maps its memory BARs into the owner (uncached, less the
//! pages holding the MSI-X table and PBA), routes each MSI-X vector through
//! an interrupt-remapping entry to a hypervisor vector that raises the
//! owner's device VIRQ, enables bus mastering, and from then on mediates
//! every config write (`hypervisor::pcicfg`).

use crate::pci::{BarInfo, Ecam, Function, Msix};
use crate::{console, iommu_hw};
use abi::ev::{self, Bdf};
use abi::hypercall::Error;
use alloc::vec::Vec;
use hypervisor::pcicfg::{self, Capability, Verdict};
use pci_types::{ConfigRegionAccess, PciAddress};

/// The IOMMU fault-event interrupt.
pub const FAULT_VECTOR: u8 = 0x2f;
/// Vectors handed to devices' MSI-X entries.
pub const DEVICE_VECTORS: core::ops::Range<u8> = 0x30..0x50;
/// Most MSI-X vectors routed per function.
pub const MAX_VECTORS_PER_FUNCTION: usize = 8;

pub struct Assigned {
    pub bdf: Bdf,
    /// The owning domain's index, and the function's index in its list.
    pub owner: usize,
    pub dev: usize,
    pub caps: Vec<Capability>,
    pub msix: Option<Msix>,
    pub bars: Vec<BarInfo>,
    pub vectors: Vec<u8>,
}

pub struct Passthrough {
    pub ecam: Ecam,
    pub assigned: Vec<Assigned>,
    /// Which assigned function owns each vector.
    owner_of: [Option<usize>; 256],
    next_vector: u8,
}

impl Passthrough {
    pub fn new(ecam: Ecam) -> Self {
        Passthrough {
            ecam,
            assigned: Vec::new(),
            owner_of: [None; 256],
            next_vector: DEVICE_VECTORS.start,
        }
    }

    fn addr(bdf: Bdf) -> PciAddress {
        PciAddress::new(0, bdf.bus(), bdf.device(), bdf.function())
    }

    fn read(&self, bdf: Bdf, off: u16) -> u32 {
        // SAFETY: an aligned dword of an enumerated function's config space.
        unsafe { (&self.ecam).read(Self::addr(bdf), off & !3) }
    }

    fn write(&self, bdf: Bdf, off: u16, v: u32) {
        // SAFETY: as for `read`; the caller decided the write is allowed.
        unsafe { (&self.ecam).write(Self::addr(bdf), off & !3, v) }
    }

    /// Takes `f` for domain `owner` (its `dev`-th device): IOMMU context,
    /// interrupt routing, bus mastering. Returns the index of the record.
    pub fn assign(
        &mut self,
        f: &Function,
        owner: usize,
        dev: usize,
        did: u16,
    ) -> Result<usize, &'static str> {
        iommu_hw::attach(f.bdf, did)?;
        let idx = self.assigned.len();
        let mut a = Assigned {
            bdf: f.bdf,
            owner,
            dev,
            caps: f.caps.clone(),
            msix: f.msix,
            bars: f.bars.clone(),
            vectors: Vec::new(),
        };
        if let Some(m) = f.msix {
            self.route_msix(&mut a, idx, &m)?;
        }
        // Memory decoding and bus mastering on, INTx off: the device is
        // now confined by the IOMMU and its interrupts are remapped.
        let cmd = self.read(f.bdf, pcicfg::COMMAND);
        self.write(f.bdf, pcicfg::COMMAND, (cmd & 0xffff) | 0b110 | 1 << 10);
        self.assigned.push(a);
        Ok(idx)
    }

    /// Programs every MSI-X entry (up to the limit) with a remappable-format
    /// message whose IRTE names a vector of ours and the function as the only
    /// valid source, then enables MSI-X.
    fn route_msix(&mut self, a: &mut Assigned, idx: usize, m: &Msix) -> Result<(), &'static str> {
        let bar = a
            .bars
            .iter()
            .find(|b| b.index == m.table_bar && b.kind != "io")
            .ok_or("MSI-X table BAR missing")?;
        let table = crate::mm::map_device(
            bar.addr + u64::from(m.table_offset),
            u64::from(m.entries) * 16,
            crate::mm::Cache::Uncached,
        );
        for i in 0..usize::from(m.entries).min(MAX_VECTORS_PER_FUNCTION) {
            if self.next_vector >= DEVICE_VECTORS.end {
                return Err("out of device interrupt vectors");
            }
            let vector = self.next_vector;
            self.next_vector += 1;
            let (addr, data) = iommu_hw::route_interrupt(vector, a.bdf)?;
            // SAFETY: entry `i` (16 bytes) of the MSI-X table, mapped uncached
            // in the hypervisor's device window; the domain cannot reach it.
            unsafe {
                let e = table.add(i * 16).cast::<u32>();
                e.write_volatile(addr as u32);
                e.add(1).write_volatile((addr >> 32) as u32);
                e.add(2).write_volatile(data);
                e.add(3).write_volatile(0); // unmasked
            }
            self.owner_of[usize::from(vector)] = Some(idx);
            a.vectors.push(vector);
        }
        // Message control: MSI-X enable (bit 15), function mask clear (bit 14).
        let ctl = self.read(a.bdf, m.cap);
        self.write(a.bdf, m.cap, (ctl & !(1 << 30)) | 1 << 31);
        Ok(())
    }

    /// `dev_config_read` of the domain's `dev`-th function.
    pub fn config_read(&self, rec: usize, offset: u64, size: u64) -> Result<u64, Error> {
        let (off, size) = pcicfg::check_access(offset, size)?;
        let v = self.read(self.assigned[rec].bdf, off) >> (8 * (off & 3));
        let mask = if size == 4 {
            u32::MAX
        } else {
            (1u32 << (8 * size)) - 1
        };
        Ok(u64::from(v & mask))
    }

    /// `dev_config_write`: applied, masked or refused as `pcicfg` says; a
    /// refusal is an audit event.
    pub fn config_write(
        &self,
        rec: usize,
        offset: u64,
        size: u64,
        value: u64,
        domain: &str,
    ) -> Result<(), Error> {
        let (off, size) = pcicfg::check_access(offset, size)?;
        let a = &self.assigned[rec];
        let shift = 8 * u32::from(off & 3);
        let mask = if size == 4 {
            u32::MAX
        } else {
            ((1u32 << (8 * size)) - 1) << shift
        };
        let new = ((value as u32) << shift) & mask;
        match pcicfg::classify_write(&a.caps, off, size) {
            Verdict::Deny { what } => {
                console::event(&ev::ConfigRefused {
                    domain,
                    bdf: a.bdf,
                    offset: ev::Hex(u64::from(off)),
                    what,
                });
                Err(Error::Denied)
            }
            verdict => {
                let keep = match verdict {
                    Verdict::Masked { keep } => keep << shift,
                    _ => 0,
                };
                let old = self.read(a.bdf, off);
                let merged = (old & !(mask & !keep)) | (new & !keep);
                self.write(a.bdf, off, merged);
                Ok(())
            }
        }
    }

    /// The assigned function that owns `vector`, if any.
    pub fn owner_of(&self, vector: u8) -> Option<&Assigned> {
        self.owner_of[usize::from(vector)].map(|i| &self.assigned[i])
    }

    /// The record of domain `owner`'s `dev`-th function.
    pub fn record(&self, owner: usize, dev: usize) -> Option<usize> {
        self.assigned
            .iter()
            .position(|a| a.owner == owner && a.dev == dev)
    }

    /// The domain that owns `bdf`.
    pub fn owner_of_bdf(&self, bdf: Bdf) -> Option<usize> {
        self.assigned.iter().find(|a| a.bdf == bdf).map(|a| a.owner)
    }

    /// Takes back every function of domain `owner`: bus mastering and MSI-X
    /// off, out of its IOMMU domain (with invalidation), vectors freed.
    pub fn release(&mut self, owner: usize) {
        for i in 0..self.assigned.len() {
            if self.assigned[i].owner != owner {
                continue;
            }
            let bdf = self.assigned[i].bdf;
            let cmd = self.read(bdf, pcicfg::COMMAND);
            self.write(bdf, pcicfg::COMMAND, (cmd & 0xffff) & !0b110);
            if let Some(m) = self.assigned[i].msix {
                let ctl = self.read(bdf, m.cap);
                self.write(bdf, m.cap, ctl & !(1 << 31));
            }
            iommu_hw::detach(bdf);
            for v in core::mem::take(&mut self.assigned[i].vectors) {
                self.owner_of[usize::from(v)] = None;
            }
        }
    }
}

/// Where one BAR goes in its owner's address space.
pub struct BarPlacement {
    pub bar: BarInfo,
    pub va: u64,
    /// Byte ranges of the BAR left unmapped (MSI-X table and PBA pages).
    pub holes: Vec<(u64, u64)>,
}

/// Where a function's BARs go in its owner's address space from `va` on
/// (each aligned to its size), and the next free address.
pub fn bar_layout(f: &Function, mut va: u64) -> (Vec<BarPlacement>, u64) {
    let mut out = Vec::new();
    for b in f.bars.iter().filter(|b| b.kind != "io" && b.size > 0) {
        let align = b.size.next_power_of_two().max(4096);
        va = (va + align - 1) & !(align - 1);
        let mut holes = Vec::new();
        if let Some(m) = f.msix {
            let table_len = u64::from(m.entries) * 16;
            if m.table_bar == b.index {
                holes.push((
                    u64::from(m.table_offset) & !0xfff,
                    (u64::from(m.table_offset) + table_len + 0xfff) & !0xfff,
                ));
            }
            if m.pba_bar == b.index {
                let pba_len = u64::from(m.entries).div_ceil(64) * 8;
                holes.push((
                    u64::from(m.pba_offset) & !0xfff,
                    (u64::from(m.pba_offset) + pba_len + 0xfff) & !0xfff,
                ));
            }
        }
        out.push(BarPlacement { bar: *b, va, holes });
        va += align;
    }
    (out, va)
}
