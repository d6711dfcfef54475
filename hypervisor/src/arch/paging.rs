//! The hypervisor's own page tables: the image at `KERNEL_BASE` with W^X
//! section permissions, a direct map of RAM at `DIRECT_MAP`, and a device
//! window for MMIO and firmware tables. The lower half stays empty for the
//! domains.

use crate::mm;
use hypervisor::layout::{
    align_down, align_up, DIRECT_MAP, KERNEL_BASE, LARGE_PAGE_SIZE, PAGE_SIZE,
};
use x86_64::registers::control::{Cr3, Cr3Flags, Cr4, Cr4Flags};
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageSize, PageTable, PageTableFlags as F,
    PhysFrame, Size2MiB, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// Page-table frames come from the hypervisor's frame allocator, zeroed.
pub struct TableFrames;

// SAFETY: `mm::alloc_frame` hands out each free frame once, and only frames
// that no one else uses (the allocator excludes the image, boot data and
// firmware tables).
unsafe impl FrameAllocator<Size4KiB> for TableFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let pa = mm::alloc_zeroed_frame()?;
        Some(PhysFrame::containing_address(PhysAddr::new(pa)))
    }
}

/// A mapper over the page table at `pml4` (physical), through the current
/// physical-memory view (`mm::phys_offset`).
///
/// # Safety
/// `pml4` must be a page table that nothing else is editing, and every
/// table it reaches must be visible through `mm::phys_offset()`.
pub unsafe fn mapper(pml4: u64) -> OffsetPageTable<'static> {
    let offset = mm::phys_offset();
    // SAFETY: the caller promises the table is ours and reachable at
    // `offset`; the reference lives as long as the hypervisor's tables do.
    unsafe {
        let table = &mut *((pml4 + offset) as *mut PageTable);
        OffsetPageTable::new(table, VirtAddr::new(offset))
    }
}

/// Maps `[virt, virt + len)` to `[phys, ...)`, with 2 MiB pages wherever both
/// sides are aligned and 4 KiB pages elsewhere.
pub fn map_range(m: &mut OffsetPageTable<'_>, virt: u64, phys: u64, len: u64, flags: F) {
    let mut off = 0;
    while off < len {
        let (v, p) = (virt + off, phys + off);
        // The mappings we make never overlap; a failure here is a bug.
        if v % LARGE_PAGE_SIZE == 0 && p % LARGE_PAGE_SIZE == 0 && len - off >= LARGE_PAGE_SIZE {
            let page = Page::<Size2MiB>::containing_address(VirtAddr::new(v));
            let frame = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(p));
            // SAFETY: the range is fresh address space of ours (asserted by
            // the mapper, which refuses an existing mapping) onto memory the
            // caller owns.
            unsafe { m.map_to(page, frame, flags, &mut TableFrames) }
                .expect("map 2 MiB page")
                .ignore();
            off += Size2MiB::SIZE;
        } else {
            let page = Page::<Size4KiB>::containing_address(VirtAddr::new(v));
            let frame = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(p));
            // SAFETY: as above.
            unsafe { m.map_to(page, frame, flags, &mut TableFrames) }
                .expect("map 4 KiB page")
                .ignore();
            off += Size4KiB::SIZE;
        }
    }
}

extern "C" {
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __data_end: u8;
}

fn sym(s: &u8) -> u64 {
    s as *const u8 as u64
}

/// Builds the hypervisor's tables and switches to them. `direct` lists the
/// physical ranges to direct-map. Runs on the boot tables, which identity-map
/// the first 4 GiB: every frame it allocates must lie there.
pub fn switch_to_kernel_tables(direct: &[(u64, u64)]) -> u64 {
    let pml4 = mm::alloc_zeroed_frame().expect("a frame for the PML4");
    // SAFETY: the new PML4 is a fresh frame; the frame allocator's frames
    // are below 4 GiB here and so visible through the boot identity map.
    let mut m = unsafe { mapper(pml4) };
    let g = F::PRESENT | F::GLOBAL;
    // SAFETY: taking the addresses of linker-script symbols; nothing is read.
    let sections = unsafe {
        [
            (sym(&__text_start), sym(&__text_end), g),
            (sym(&__rodata_start), sym(&__rodata_end), g | F::NO_EXECUTE),
            (
                sym(&__data_start),
                sym(&__data_end),
                g | F::WRITABLE | F::NO_EXECUTE,
            ),
        ]
    };
    for (start, end, flags) in sections {
        map_range(&mut m, start, start - KERNEL_BASE, end - start, flags);
    }
    for &(start, end) in direct {
        let (s, e) = (
            align_down(start, PAGE_SIZE),
            align_up(end, PAGE_SIZE).expect("region end"),
        );
        map_range(
            &mut m,
            DIRECT_MAP + s,
            s,
            e - s,
            g | F::WRITABLE | F::NO_EXECUTE,
        );
    }
    // SAFETY: the new tables map this code, its stack (.bss) and data with
    // the same virtual addresses as the boot tables, and the direct map that
    // `mm` switches to below.
    unsafe {
        Cr4::update(|f| f.insert(Cr4Flags::PAGE_GLOBAL));
        Cr3::write(
            PhysFrame::containing_address(PhysAddr::new(pml4)),
            Cr3Flags::empty(),
        );
    }
    pml4
}

/// Gives every PML4 entry of the hypervisor's half a table, so that domains
/// can copy the half once and still see every later hypervisor mapping.
pub fn fill_kernel_half(pml4: u64) {
    // SAFETY: the hypervisor's PML4 is visible through the direct map and
    // edited only at boot, before any domain exists.
    let table = unsafe { &mut *((pml4 + mm::phys_offset()) as *mut PageTable) };
    for i in 256..512 {
        if table[i].is_unused() {
            let pa = mm::alloc_zeroed_frame().expect("a frame for the hypervisor's tables");
            table[i].set_addr(PhysAddr::new(pa), F::PRESENT | F::WRITABLE);
        }
    }
}

/// Switches to the hypervisor's own tables (no domain's user half).
pub fn activate_kernel() {
    // SAFETY: the hypervisor's table maps all of ring 0; its user half is empty.
    unsafe {
        Cr3::write(
            PhysFrame::containing_address(PhysAddr::new(mm::kernel_pml4())),
            Cr3Flags::empty(),
        )
    };
}
