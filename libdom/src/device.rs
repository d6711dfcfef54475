//! Devices the manifest assigns to the domain: their BARs, their config
//! space, and memory they may reach by DMA.
//!
//! The hypervisor maps each memory BAR uncached at the `va` the start info
//! gives ([`abi::domain::DEVICE_VA`] and up; the pages of an MSI-X table or
//! PBA stay unmapped), mediates config space through `dev_config_read` and
//! `dev_config_write`, and sets bus mastering itself.
//!
//! DMA: in static mode all of the domain's memory is reachable at I/O
//! address = virtual address from the start; in strict mode only what
//! `dma_map` mapped, until `dma_unmap`. [`DmaBuf`] hides the difference:
//! page-aligned, zeroed memory from the heap, mapped on creation (strict)
//! and unmapped before it is freed.

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU8, Ordering};

use abi::domain::{BarMap, DeviceInfo, DmaMode, StartInfo};
use abi::hypercall::Error;

use crate::hypercall;

/// The DMA granule: a page.
pub const PAGE: usize = 4096;

static DMA_MODE: AtomicU8 = AtomicU8::new(0);

/// Records the domain's DMA mode (libdom's entry does, from the start
/// info, before main runs).
pub fn set_dma_mode(m: DmaMode) {
    DMA_MODE.store(
        match m {
            DmaMode::Static => 0,
            DmaMode::Strict => 1,
        },
        Ordering::Relaxed,
    );
}

/// The domain's DMA mode, as its start info says.
pub fn dma_mode() -> DmaMode {
    match DMA_MODE.load(Ordering::Relaxed) {
        0 => DmaMode::Static,
        _ => DmaMode::Strict,
    }
}

/// Pages needed for `len` bytes (at least one).
pub fn pages_for(len: usize) -> usize {
    len.div_ceil(PAGE).max(1)
}

/// The first assigned device with these PCI ids: its index (what the
/// device hypercalls take) and its description.
pub fn find(si: &StartInfo<'_>, vendor: u16, device: u16) -> Option<(usize, DeviceInfo)> {
    si.devices.iter().enumerate().find_map(|(i, d)| {
        d.filter(|d| d.vendor == vendor && d.device == device)
            .map(|d| (i, d))
    })
}

/// The mapping of BAR `index` of `dev`, if it is a mapped memory BAR.
pub fn bar(dev: &DeviceInfo, index: u8) -> Option<BarMap> {
    dev.bars
        .iter()
        .flatten()
        .find(|b| b.index == index)
        .copied()
}

/// A device register window: uncached MMIO the hypervisor mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mmio {
    base: u64,
    len: u64,
}

impl Mmio {
    /// The window of a BAR mapping from the start info.
    pub fn from_bar(b: &BarMap) -> Self {
        Mmio {
            base: b.va,
            len: b.len,
        }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The part `[offset, offset + len)` of this window, if it lies inside.
    pub fn sub(&self, offset: u64, len: u64) -> Option<Mmio> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then_some(Mmio {
            base: self.base + offset,
            len,
        })
    }

    /// The address of `size` bytes at `offset`, naturally aligned and
    /// inside the window; panics otherwise (a driver bug, not the device's).
    fn at(&self, offset: u64, size: u64) -> u64 {
        assert!(
            offset.is_multiple_of(size) && offset.checked_add(size).is_some_and(|e| e <= self.len),
            "MMIO access of {size} bytes at {offset:#x} outside a window of {:#x}",
            self.len
        );
        self.base + offset
    }

    pub fn read8(&self, offset: u64) -> u8 {
        let a = self.at(offset, 1);
        // SAFETY: as for `read32`.
        unsafe { core::ptr::read_volatile(a as *const u8) }
    }

    pub fn write8(&self, offset: u64, v: u8) {
        let a = self.at(offset, 1);
        // SAFETY: as for `write32`.
        unsafe { core::ptr::write_volatile(a as *mut u8, v) }
    }

    pub fn read16(&self, offset: u64) -> u16 {
        let a = self.at(offset, 2);
        // SAFETY: as for `read32`.
        unsafe { core::ptr::read_volatile(a as *const u16) }
    }

    pub fn write16(&self, offset: u64, v: u16) {
        let a = self.at(offset, 2);
        // SAFETY: as for `write32`.
        unsafe { core::ptr::write_volatile(a as *mut u16, v) }
    }

    pub fn read32(&self, offset: u64) -> u32 {
        let a = self.at(offset, 4);
        // SAFETY: `a` is an aligned address inside a BAR the hypervisor
        // mapped for this domain (the start info says so); MMIO is read
        // volatile, and a register read has no effect on our memory.
        unsafe { core::ptr::read_volatile(a as *const u32) }
    }

    pub fn write32(&self, offset: u64, v: u32) {
        let a = self.at(offset, 4);
        // SAFETY: as for `read32`; the write reaches the device only.
        unsafe { core::ptr::write_volatile(a as *mut u32, v) }
    }

    pub fn read64(&self, offset: u64) -> u64 {
        let a = self.at(offset, 8);
        // SAFETY: as for `read32`.
        unsafe { core::ptr::read_volatile(a as *const u64) }
    }

    pub fn write64(&self, offset: u64, v: u64) {
        let a = self.at(offset, 8);
        // SAFETY: as for `write32`.
        unsafe { core::ptr::write_volatile(a as *mut u64, v) }
    }
}

/// Page-aligned, zeroed memory a device may reach: mapped for DMA while it
/// lives (strict mode), unmapped and freed when dropped.
#[derive(Debug)]
pub struct DmaBuf {
    ptr: NonNull<u8>,
    pages: usize,
    iova: u64,
    mapped: bool,
}

impl DmaBuf {
    /// `pages` pages from the heap, mapped for the domain's devices.
    pub fn new(pages: usize) -> Result<Self, Error> {
        let pages = pages.max(1);
        let layout = Self::layout(pages).ok_or(Error::BadLength)?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(Error::NoSpace)?;
        let va = ptr.as_ptr() as u64;
        let len = (pages * PAGE) as u64;
        match hypercall::dma_map(va, len) {
            Ok(iova) => Ok(DmaBuf {
                ptr,
                pages,
                iova,
                mapped: dma_mode() == DmaMode::Strict,
            }),
            Err(e) => {
                // SAFETY: allocated just above with this layout, unused.
                unsafe { alloc::alloc::dealloc(raw, layout) };
                Err(e)
            }
        }
    }

    fn layout(pages: usize) -> Option<Layout> {
        Layout::from_size_align(pages.checked_mul(PAGE)?, PAGE).ok()
    }

    /// The address the device uses.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    pub fn va(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.pages * PAGE
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Removes the device's access now (strict mode); the memory stays
    /// ours until dropped. What is left is the stale I/O address a
    /// `dma-strict` attack aims at.
    pub fn unmap(&mut self) -> Result<(), Error> {
        if self.mapped {
            hypercall::dma_unmap(self.iova, self.len() as u64)?;
            self.mapped = false;
        }
        Ok(())
    }

    /// Copies `src` in at `offset` (volatile: a device reads it next).
    pub fn write(&mut self, offset: usize, src: &[u8]) {
        assert!(offset
            .checked_add(src.len())
            .is_some_and(|e| e <= self.len()));
        for (i, &b) in src.iter().enumerate() {
            // SAFETY: inside our own allocation (checked above).
            unsafe { core::ptr::write_volatile(self.ptr.as_ptr().add(offset + i), b) };
        }
    }

    /// Copies out to `dst` from `offset` (volatile: a device wrote it).
    pub fn read(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset
            .checked_add(dst.len())
            .is_some_and(|e| e <= self.len()));
        for (i, b) in dst.iter_mut().enumerate() {
            // SAFETY: inside our own allocation (checked above).
            *b = unsafe { core::ptr::read_volatile(self.ptr.as_ptr().add(offset + i)) };
        }
    }
}

// SAFETY: a DmaBuf owns its pages alone (nothing else points into them
// but the device), so moving it to another thread moves that ownership.
unsafe impl Send for DmaBuf {}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // Unmap before freeing: a device must never reach memory the heap
        // hands to someone else. If the hypervisor refuses, leak it.
        if self.unmap().is_err() {
            return;
        }
        if let Some(layout) = Self::layout(self.pages) {
            // SAFETY: allocated in `new` with this layout, freed once.
            unsafe { alloc::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::pci::Bdf;

    #[test]
    fn pages_and_modes() {
        assert_eq!(
            (pages_for(0), pages_for(1), pages_for(4096), pages_for(4097)),
            (1, 1, 1, 2)
        );
        assert_eq!(dma_mode(), DmaMode::Static);
    }

    #[test]
    fn devices_and_bars_are_found() {
        let edu = DeviceInfo {
            bdf: Bdf::new(0, 5, 0),
            vendor: 0x1234,
            device: 0x11e8,
            bars: [
                None,
                Some(BarMap {
                    index: 0,
                    va: 0xc000_0000,
                    len: 1 << 20,
                }),
                None,
                None,
                None,
                None,
            ],
        };
        let si = StartInfo {
            domid: 1,
            name: "d",
            label: "l",
            args: "",
            image_start: 0,
            image_end: 0,
            heap_start: 0,
            heap_end: 0,
            stack_bottom: 0,
            stack_top: 0,
            mem_bytes: 0,
            ports: [None; abi::domain::MAX_PORTS],
            peers: [None; abi::domain::MAX_PEERS],
            dma: DmaMode::Static,
            devices: [None, Some(edu), None, None],
            vbds: [None; abi::domain::MAX_VBDS],
            vifs: [None; abi::domain::MAX_VIFS],
        };
        let (i, d) = find(&si, 0x1234, 0x11e8).unwrap();
        assert_eq!((i, d.bdf), (1, Bdf::new(0, 5, 0)));
        assert!(find(&si, 0x1af4, 0x1042).is_none());
        let b = bar(&d, 0).unwrap();
        assert_eq!(b.va, 0xc000_0000);
        assert!(bar(&d, 1).is_none());
        let m = Mmio::from_bar(&b);
        assert_eq!(m.at(0x98, 8), 0xc000_0098);
        let common = m.sub(0x3000, 0x38).unwrap();
        assert_eq!((common.base(), common.len()), (0xc000_3000, 0x38));
        assert_eq!(common.at(0x1a, 2), 0xc000_301a);
        assert!(m.sub(0xf_fff0, 0x20).is_none() && m.sub(u64::MAX, 2).is_none());
    }

    #[test]
    #[should_panic(expected = "outside a window")]
    fn mmio_outside_the_window_panics() {
        Mmio {
            base: 0x1000,
            len: 0x100,
        }
        .at(0xfc, 8);
    }
}
