//! The live DMA remapping unit: the `iommu` crate's VT-d driver over this
//! machine's registers and memory.
//!
//! `init` turns translation on with an empty root table before any domain
//! exists, so every PCI function's DMA faults until the manifest assigns
//! it; interrupt remapping is on as well, with compatibility-format
//! interrupts blocked. Everything else here is a thin, locked front for
//! the rest of the hypervisor. Only the first VT-d unit is driven (QEMU
//! has one); AMD-Vi units are listed but not driven yet.

use crate::iommu_units::{Kind, Unit};
use crate::mm::{self, Cache};
use crate::passthrough::FAULT_VECTOR;
use crate::sync::{Guard, Lock};
use crate::{console, log};
use abi::ev::{self, Bdf};
use hypervisor::layout::{DIRECT_MAP, PAGE_SIZE};
use iommu::vtd::{remappable_msi, Config, Irte, Regs, Vtd};
use iommu::{Change, FaultRecord, FrameSource, Iommu, NoFrames, Perm, TableMemory};

/// Entries in the interrupt-remapping table.
const IR_ENTRIES: u32 = 256;

/// A unit's register page, mapped uncached.
struct Mmio(*mut u8);

// SAFETY: the register page is MMIO mapped for ever; all access goes
// through the `UNIT` lock.
unsafe impl Send for Mmio {}

impl Regs for Mmio {
    fn read32(&mut self, off: usize) -> u32 {
        // SAFETY: `off` is a register offset inside the unit's 4 KiB page,
        // aligned to the register's width (the driver guarantees both).
        unsafe { self.0.add(off).cast::<u32>().read_volatile() }
    }
    fn write32(&mut self, off: usize, v: u32) {
        // SAFETY: as for `read32`.
        unsafe { self.0.add(off).cast::<u32>().write_volatile(v) }
    }
    fn read64(&mut self, off: usize) -> u64 {
        // SAFETY: as for `read32`.
        unsafe { self.0.add(off).cast::<u64>().read_volatile() }
    }
    fn write64(&mut self, off: usize, v: u64) {
        // SAFETY: as for `read32`.
        unsafe { self.0.add(off).cast::<u64>().write_volatile(v) }
    }
    fn relax(&mut self) {
        core::hint::spin_loop();
    }
}

/// Table frames from the frame allocator, reached through the direct map.
struct Frames;

impl TableMemory for Frames {
    fn alloc_frame(&mut self) -> Option<u64> {
        mm::alloc_zeroed_frame()
    }

    fn frame(&mut self, phys: u64) -> &mut [u64; 512] {
        // SAFETY: `phys` is a table frame this driver allocated (direct-
        // mapped RAM, page-aligned); the `UNIT` lock makes this the only
        // reference to it.
        unsafe { &mut *((phys + DIRECT_MAP) as *mut [u64; 512]) }
    }

    fn flush(&mut self, phys: u64, len: usize) {
        // The unit does not snoop the CPU's caches (ECAP.C = 0): write the
        // lines back before it reads them.
        let start = (phys + DIRECT_MAP) & !63;
        let end = phys + DIRECT_MAP + len as u64;
        let mut line = start;
        // The instructions themselves (`asm!`): the `core::arch` wrappers need
        // SSE2 enabled, which the kernel's target is not, so each would be a
        // call.
        while line < end {
            // SAFETY: CLFLUSH of direct-mapped table memory only writes the
            // line back; it changes no data.
            unsafe {
                core::arch::asm!("clflush [{}]", in(reg) line, options(nostack, preserves_flags))
            };
            line += 64;
        }
        // SAFETY: MFENCE orders the flushes before the register write that
        // tells the unit to look.
        unsafe { core::arch::asm!("mfence", options(nostack, preserves_flags)) };
    }

    fn free_frame(&mut self, phys: u64) {
        mm::free_frame(phys);
    }

    fn load(&mut self, phys: u64) -> u64 {
        // SAFETY: an aligned u64 of a direct-mapped table frame.
        unsafe { ((phys + DIRECT_MAP) as *const u64).read_volatile() }
    }
}

struct Hw {
    unit: u32,
    vtd: Vtd<Mmio>,
    mem: Frames,
    levels: u8,
    next_irte: u16,
    /// Per IOMMU domain: (maps, unmaps, IOTLB invalidations they caused).
    per_domain: alloc::collections::BTreeMap<u16, (u64, u64, u64)>,
}

impl Hw {
    /// Runs `f` and charges the IOTLB invalidations it caused to `did`.
    fn charged<T>(&mut self, did: u16, map: bool, f: impl FnOnce(&mut Self) -> T) -> T {
        let before = self.vtd.invalidation_counts().iotlb();
        let r = f(self);
        let after = self.vtd.invalidation_counts().iotlb();
        let e = self.per_domain.entry(did).or_default();
        if map {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
        e.2 += after - before;
        r
    }
}

/// What domain `did`'s DMA mappings cost: (maps, unmaps, IOTLB
/// invalidations), counted since boot.
pub fn domain_stats(did: u16) -> (u64, u64, u64) {
    UNIT.lock()
        .as_ref()
        .and_then(|h| h.per_domain.get(&did).copied())
        .unwrap_or_default()
}

static UNIT: Lock<Option<Hw>> = Lock::new(None);

/// Turns on the first VT-d unit: translation with every function blocked,
/// the fault event on `FAULT_VECTOR`, interrupt remapping. Reports what
/// the unit's registers say afterwards.
pub fn init(units: &[Unit]) -> Result<(), &'static str> {
    let Some((i, unit)) = units
        .iter()
        .enumerate()
        .find(|(_, u)| matches!(u.kind, Kind::VtD { .. }))
    else {
        if !units.is_empty() {
            log!("no VT-d unit: AMD-Vi is listed but not driven yet; devices cannot be assigned");
        }
        return Ok(());
    };
    let regs = Mmio(mm::map_device(unit.base, PAGE_SIZE, Cache::Uncached));
    let mut vtd = Vtd::new(regs);
    let mut mem = Frames;
    // Domain memory lies below 4 GiB: 3 levels (39 bits) where offered.
    let depth = |v: &Vtd<Mmio>, bits| <Vtd<Mmio> as Iommu<Frames>>::levels_for(v, bits);
    let levels = depth(&vtd, 39)
        .or_else(|| depth(&vtd, 48))
        .ok_or("no usable page-table depth")?;
    let cfg = Config {
        fault_vector: FAULT_VECTOR,
        fault_apic_id: 0,
        queued: true,
    };
    vtd.enable(&mut mem, &cfg)
        .map_err(|_| "VT-d enable failed")?;
    vtd.enable_interrupt_remapping(&mut mem, IR_ENTRIES)
        .map_err(|_| "interrupt remapping failed")?;
    let gsts = vtd.gsts();
    use iommu::vtd::regs::gsts as g;
    console::event(&ev::IommuEnabled {
        unit: i as u32,
        gsts: ev::Hex(u64::from(gsts)),
        translation: gsts & g::TES != 0,
        qi: gsts & g::QIES != 0,
        interrupt_remapping: gsts & g::IRES != 0,
        compat_blocked: gsts & g::CFIS == 0,
        levels,
        irta: ev::Hex(vtd.irta()),
        ir_entries: vtd.ir_entries(),
        invalidation: vtd.invalidation().map_or("none", |m| m.name()),
    });
    *UNIT.lock() = Some(Hw {
        unit: i as u32,
        vtd,
        mem,
        levels,
        next_irte: 0,
        per_domain: alloc::collections::BTreeMap::new(),
    });
    Ok(())
}

/// Page-table levels of every IOMMU domain (0 without a unit).
pub fn levels() -> u8 {
    UNIT.lock().as_ref().map_or(0, |h| h.levels)
}

/// Puts `bdf` into IOMMU domain `did` (created on first use).
pub fn attach(bdf: Bdf, did: u16) -> Result<(), &'static str> {
    let mut g = UNIT.lock();
    let h = g
        .as_mut()
        .ok_or("no DMA remapping unit: a device cannot be confined")?;
    let Hw {
        vtd, mem, levels, ..
    } = h;
    match vtd.add_domain(mem, did, *levels) {
        Ok(()) | Err(iommu::Error::DomainExists(_)) => {}
        Err(_) => return Err("cannot create the IOMMU domain"),
    }
    vtd.attach(mem, bdf, did)
        .map_err(|_| "cannot attach the function")
}

/// Takes `bdf` out of its IOMMU domain; its DMA faults from now on.
pub fn detach(bdf: Bdf) {
    if let Some(h) = UNIT.lock().as_mut() {
        let _ = h.vtd.detach(&mut h.mem, bdf);
    }
}

/// Maps `[iova, iova + len)` to `pa` in IOMMU domain `did`.
pub fn map(did: u16, iova: u64, pa: u64, len: u64, writable: bool) -> Result<(), &'static str> {
    let mut g = UNIT.lock();
    let h = g.as_mut().ok_or("no DMA remapping unit")?;
    let perm = if writable {
        Perm::READ_WRITE
    } else {
        Perm::READ
    };
    h.charged(did, true, |h| {
        h.vtd.map(&mut h.mem, did, iova, pa, len, perm)
    })
    .map_err(|_| "IOMMU mapping failed")
}

/// Carries out `changes` in IOMMU domain `did` as one batch (unmaps, then
/// maps, then one IOTLB invalidation: `Iommu::apply`); the invalidation has
/// completed when this returns, also when it fails part-way (then every
/// unmap is done, some maps may be). A `Change::UnmapMapped` of a page not
/// mapped is refused (`iommu::Error::NotMapped`) before anything changes.
pub fn apply(did: u16, changes: &[Change]) -> Result<(), iommu::Error> {
    batch(did)
        .ok_or(iommu::Error::NotEnabled)?
        .apply(changes, &NoFrames)
}

/// IOMMU domain `did` held for one `dma_batch`: the unit locked once for
/// the checks and the changes ([`Batch::apply`]; [`Batch::mapped_bytes`]
/// on a refusal's path), so nothing else changes the tables between them.
pub struct Batch {
    unit: Guard<'static, Option<Hw>>,
    did: u16,
}

/// Domain `did` of the unit, locked until the [`Batch`] is dropped (`None`
/// without a unit). Nothing else may use this module while it is held.
pub fn batch(did: u16) -> Option<Batch> {
    let unit = UNIT.lock();
    unit.is_some().then_some(Batch { unit, did })
}

impl Batch {
    /// How many bytes of `[iova, iova + len)` the domain maps now (`None`
    /// for a range that cuts a large page, or beyond the domain).
    pub fn mapped_bytes(&self, iova: u64, len: u64) -> Option<u64> {
        let h = self.unit.as_ref()?;
        // `Frames` has no state: a fresh one reaches the same memory.
        <Vtd<Mmio> as Iommu<Frames>>::mapped_bytes(&h.vtd, &mut Frames, self.did, iova, len).ok()
    }

    /// `Iommu::apply_frames`: `changes` as one batch, the pages of each
    /// `MapFrames` from `frames`, with one IOTLB invalidation that has
    /// completed when this returns (also on an error: then every unmap is
    /// done, some maps may be; but a refused `UnmapMapped` or `MapFrames`
    /// check changes nothing). Counted for `domain_stats`.
    pub fn apply(
        &mut self,
        changes: &[Change],
        frames: &dyn FrameSource,
    ) -> Result<(), iommu::Error> {
        let did = self.did;
        let h = self.unit.as_mut().ok_or(iommu::Error::NotEnabled)?;
        let before = h.vtd.invalidation_counts().iotlb();
        let r = h.vtd.apply_frames(&mut h.mem, did, changes, frames);
        let after = h.vtd.invalidation_counts().iotlb();
        let maps = changes
            .iter()
            .filter(|c| matches!(c, Change::Map { .. } | Change::MapFrames { .. }))
            .count() as u64;
        let e = h.per_domain.entry(did).or_default();
        e.0 += maps;
        e.1 += changes.len() as u64 - maps;
        e.2 += after - before;
        r.map(drop)
    }
}

/// How many bytes of `[iova, iova + len)` IOMMU domain `did` maps now
/// (`None` without a unit, or for a range that cuts a large page).
pub fn mapped_bytes(did: u16, iova: u64, len: u64) -> Option<u64> {
    let mut g = UNIT.lock();
    let h = g.as_mut()?;
    h.vtd.mapped_bytes(&mut h.mem, did, iova, len).ok()
}

/// Unmaps a range; the IOTLB is invalidated before this returns.
pub fn unmap(did: u16, iova: u64, len: u64) {
    if let Some(h) = UNIT.lock().as_mut() {
        if let Err(e) = h.charged(did, false, |h| h.vtd.unmap(&mut h.mem, did, iova, len)) {
            log!("iommu: unmap {iova:#x}+{len:#x} in domain {did}: {e}");
        }
    }
}

/// The IOMMU domain the live context entry of `bdf` names, if present.
pub fn context(bdf: Bdf) -> Option<u16> {
    let mut g = UNIT.lock();
    let h = g.as_mut()?;
    h.vtd.attachment(&mut h.mem, bdf).map(|a| a.did)
}

/// A new interrupt-remapping entry that delivers `vector` to this CPU and
/// accepts the request only from `source`; returns the remappable-format
/// MSI address and data that name it.
pub fn route_interrupt(vector: u8, source: Bdf) -> Result<(u64, u32), &'static str> {
    let mut g = UNIT.lock();
    let h = g.as_mut().ok_or("no interrupt remapping unit")?;
    if u32::from(h.next_irte) >= IR_ENTRIES {
        return Err("interrupt-remapping table full");
    }
    let index = h.next_irte;
    h.next_irte += 1;
    h.vtd
        .set_irte(
            &mut h.mem,
            index,
            Irte {
                vector,
                dest_apic_id: 0,
                source,
            },
        )
        .map_err(|_| "cannot write the interrupt-remapping entry")?;
    let msi = remappable_msi(index);
    Ok((u64::from(msi.address), msi.data))
}

/// Hands each recorded fault to `f` and clears it.
pub fn take_faults(mut f: impl FnMut(&FaultRecord, u32)) {
    if let Some(h) = UNIT.lock().as_mut() {
        let unit = h.unit;
        let summary = h.vtd.take_faults(|r| f(&r, unit));
        if summary.overflowed {
            log!("iommu: fault records overflowed; some faults were not recorded");
        }
    }
}
