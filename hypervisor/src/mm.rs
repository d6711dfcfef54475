//! Physical memory: the frame allocator, the view of physical memory (the
//! boot identity map, then the direct map), the device window and the heap.

use crate::arch::paging;
use crate::sync::Lock;
use core::sync::atomic::{AtomicU64, Ordering};
use hypervisor::frames::FrameAllocator;
use hypervisor::layout::{
    align_down, align_up, DEVICE_WINDOW, DEVICE_WINDOW_SIZE, DIRECT_MAP, PAGE_SIZE,
};
use linked_list_allocator::LockedHeap;
use x86_64::structures::paging::PageTableFlags as F;

/// How many disjoint free ranges the allocator tracks.
const FREE_RANGES: usize = 128;
/// How many device-window mappings are remembered for reuse.
const DEVICE_MAPPINGS: usize = 64;
/// The hypervisor's heap (bytes).
pub const HEAP_SIZE: u64 = 4 << 20;

static FRAMES: Lock<FrameAllocator<FREE_RANGES>> = Lock::new(FrameAllocator::new());
/// Added to a physical address to reach it: 0 on the boot identity map,
/// `DIRECT_MAP` once the hypervisor's tables are live.
static PHYS_OFFSET: AtomicU64 = AtomicU64::new(0);
static KERNEL_PML4: AtomicU64 = AtomicU64::new(0);

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

struct DeviceMap {
    next: u64,
    /// (physical start, physical end, virtual start, cacheable)
    maps: [(u64, u64, u64, bool); DEVICE_MAPPINGS],
    len: usize,
    /// Direct-mapped physical ranges.
    direct: [(u64, u64); DEVICE_MAPPINGS],
    direct_len: usize,
}

static DEVICES: Lock<DeviceMap> = Lock::new(DeviceMap {
    next: DEVICE_WINDOW,
    maps: [(0, 0, 0, false); DEVICE_MAPPINGS],
    len: 0,
    direct: [(0, 0); DEVICE_MAPPINGS],
    direct_len: 0,
});

pub fn phys_offset() -> u64 {
    PHYS_OFFSET.load(Ordering::Relaxed)
}

/// Installs the frame allocator built from the memory map.
pub fn init_frames(frames: FrameAllocator<FREE_RANGES>) {
    *FRAMES.lock() = frames;
}

pub fn free_bytes() -> u64 {
    FRAMES.lock().free_bytes()
}

/// One zeroed 4 KiB frame.
pub fn alloc_zeroed_frame() -> Option<u64> {
    let pa = FRAMES.lock().alloc()?;
    // Before the switch, frames must be reachable through the identity map.
    assert!(
        phys_offset() != 0 || pa < 1 << 32,
        "boot frame {pa:#x} above 4 GiB"
    );
    // SAFETY: the frame was free, so nothing else refers to it, and it is
    // mapped at `pa + phys_offset()` (identity map or direct map).
    unsafe { core::ptr::write_bytes((pa + phys_offset()) as *mut u8, 0, PAGE_SIZE as usize) };
    Some(pa)
}

/// `pages` contiguous zeroed-or-not frames (the caller clears them).
pub fn alloc_contiguous(pages: u64) -> Option<u64> {
    FRAMES.lock().alloc_contiguous(pages, PAGE_SIZE)
}

/// Gives a frame back. A frame the allocator already holds is a bug in
/// the caller; it is reported, not hidden.
pub fn free_frame(pa: u64) {
    if let Err(e) = FRAMES.lock().free(pa) {
        crate::log!("frame allocator: {e}");
    }
}

/// The hypervisor's own PML4 (physical address).
pub fn kernel_pml4() -> u64 {
    KERNEL_PML4.load(Ordering::Relaxed)
}

/// Switches to the hypervisor's page tables with `direct` direct-mapped,
/// then gives the heap its memory.
pub fn enable_kernel_tables(direct: &[(u64, u64)]) {
    {
        let mut d = DEVICES.lock();
        for &(s, e) in direct.iter().take(DEVICE_MAPPINGS) {
            let i = d.direct_len;
            d.direct[i] = (s, e);
            d.direct_len += 1;
        }
    }
    let pml4 = paging::switch_to_kernel_tables(direct);
    KERNEL_PML4.store(pml4, Ordering::Relaxed);
    PHYS_OFFSET.store(DIRECT_MAP, Ordering::Relaxed);
    paging::fill_kernel_half(pml4);

    let heap = FRAMES
        .lock()
        .alloc_contiguous(HEAP_SIZE / PAGE_SIZE, PAGE_SIZE)
        .expect("memory for the heap");
    // SAFETY: the range was free RAM, now ours alone, and direct-mapped
    // writable; the heap gets it for the rest of the hypervisor's life.
    unsafe {
        HEAP.lock()
            .init((heap + DIRECT_MAP) as *mut u8, HEAP_SIZE as usize)
    };
}

/// Is `[pa, pa + len)` inside the direct map?
pub fn is_direct(pa: u64, len: u64) -> bool {
    let d = DEVICES.lock();
    d.direct[..d.direct_len]
        .iter()
        .any(|&(s, e)| pa >= s && pa.saturating_add(len) <= e)
}

/// How to cache a device-window mapping.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    /// Registers: uncached (PCD | PWT).
    Uncached,
    /// Firmware tables in memory: write-back.
    WriteBack,
}

/// Maps `[pa, pa + len)` into the device window (read-write, no execute) and
/// returns the virtual address of `pa`. A range already mapped with the
/// same caching is reused.
pub fn map_device(pa: u64, len: u64, cache: Cache) -> *mut u8 {
    let cached = cache == Cache::WriteBack;
    let start = align_down(pa, PAGE_SIZE);
    let end = align_up(pa + len.max(1), PAGE_SIZE).expect("device range end");
    let mut d = DEVICES.lock();
    if let Some(&(ps, _, va, _)) = d.maps[..d.len]
        .iter()
        .find(|&&(s, e, _, c)| start >= s && end <= e && c == cached)
    {
        return (va + (pa - ps)) as *mut u8;
    }
    // Keep 2 MiB alignment between virtual and physical for big ranges.
    let size = end - start;
    let align = if size >= 2 << 20 { 2 << 20 } else { PAGE_SIZE };
    let va = align_up(d.next, align).expect("device window") + (start % align);
    assert!(
        va + size <= DEVICE_WINDOW + DEVICE_WINDOW_SIZE,
        "device window full"
    );
    d.next = va + size;
    let mut flags = F::PRESENT | F::WRITABLE | F::NO_EXECUTE | F::GLOBAL;
    if !cached {
        flags |= F::NO_CACHE | F::WRITE_THROUGH;
    }
    // SAFETY: the kernel tables are ours, visible through the direct map,
    // and nothing else edits them while we hold the DEVICES lock.
    let mut m = unsafe { paging::mapper(KERNEL_PML4.load(Ordering::Relaxed)) };
    paging::map_range(&mut m, va, start, size, flags);
    if d.len < DEVICE_MAPPINGS {
        let i = d.len;
        d.maps[i] = (start, end, va, cached);
        d.len += 1;
    }
    (va + (pa - start)) as *mut u8
}

/// A pointer to physical memory that is either direct-mapped or mapped
/// write-back into the device window for the purpose.
pub fn phys_to_ptr(pa: u64, len: u64) -> *mut u8 {
    if is_direct(pa, len) {
        (pa + DIRECT_MAP) as *mut u8
    } else {
        map_device(pa, len, Cache::WriteBack)
    }
}
