//! Building a domain: its memory, page tables, image and start info.
//!
//! A domain's memory is one contiguous run of frames, laid out as
//! `abi::domain` describes (start info, stack, image, heap). Its page
//! tables map only that memory in the user half, with the permissions of
//! each ELF segment, and share the hypervisor's half (supervisor-only).
//! `UserRegions` records exactly what was mapped, and every hypercall
//! pointer is checked against it.

use crate::arch::paging;
use crate::arch::trap::UserContext;
use crate::mm;
use abi::domain::{
    PeerInfo, PortInfo, StartInfo, IMAGE_BASE, MAX_PEERS, MAX_PORTS, STACK_SIZE, STACK_TOP,
    START_INFO_VA, USER_LIMIT,
};
use abi::manifest::Expect;
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use hypervisor::elf::{ElfError, Image};
use hypervisor::layout::{align_up, DIRECT_MAP, PAGE_SIZE};
use hypervisor::uaccess::UserRegions;
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::{
    FrameAllocator, Mapper, Page, PageTable, PageTableFlags as F, PhysFrame, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// Where a domain is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Runnable,
    /// In `wait`, with nothing pending; the output goes to `ptr` when it wakes.
    Waiting {
        ptr: u64,
    },
    Dead,
}

pub struct Domain {
    pub domid: u16,
    pub name: String,
    pub label: String,
    pub image: String,
    pub weight: u16,
    pub expect: Expect,
    /// Saved registers; boxed so that their address stays put (RSP0 points
    /// into them while the domain runs).
    pub ctx: Box<UserContext>,
    pub pml4: u64,
    pub regions: UserRegions,
    pub mem_phys: u64,
    pub mem_pages: u64,
    /// Page-table frames, freed with the domain.
    pub table_frames: Vec<u64>,
    pub state: State,
    /// Hypercalls made, and how many were answered with an error.
    pub calls: u64,
    pub refused: u64,
    /// Console text not yet ended by a newline.
    pub console: Vec<u8>,
    /// When VIRQ_TIMER fires (ns since the hypervisor's entry).
    pub timer_ns: Option<u64>,
    /// How the domain ended: status and "exit" or "fault".
    pub ended: Option<(i64, &'static str)>,
    /// CPU time and dispatches the scheduler charged, kept when it ends.
    pub cpu_ns: u64,
    pub dispatches: u64,
    /// Its memory as mapped: (virtual, physical, bytes, writable), which the
    /// static DMA mode mirrors into its IOMMU domain.
    pub memory_map: Vec<(u64, u64, u64, bool)>,
    pub dma: abi::domain::DmaMode,
    /// End the domain when one of its devices faults (else only report).
    pub stop_on_dma_fault: bool,
    /// Its devices as its start info lists them (records in `Passthrough`).
    pub devices: Vec<abi::domain::DeviceInfo>,
    /// Grant operations it made, for its `grant_stats` at the end.
    pub grant_stats: [u64; 5],
}

#[derive(Debug)]
pub enum BuildError {
    Elf(ElfError),
    /// The manifest's memory cannot hold the image, stack and start info.
    TooSmall {
        need_pages: u64,
        have_pages: u64,
    },
    /// The image and heap would reach the interrupt window.
    TooLarge,
    OutOfMemory {
        pages: u64,
    },
    StartInfo(abi::domain::StartInfoError),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Elf(e) => write!(f, "image: {e}"),
            BuildError::TooSmall {
                need_pages,
                have_pages,
            } => write!(
                f,
                "memory of {} KiB cannot hold image, stack and start info ({} KiB)",
                have_pages * 4,
                need_pages * 4
            ),
            BuildError::TooLarge => write!(f, "image and heap would reach {USER_LIMIT:#x}"),
            BuildError::OutOfMemory { pages } => write!(f, "no {pages} contiguous free frames"),
            BuildError::StartInfo(e) => write!(f, "{e}"),
        }
    }
}

/// Page-table frames for one domain, remembered so they can be freed.
struct TrackedFrames<'a>(&'a mut Vec<u64>);

// SAFETY: frames come zeroed from the hypervisor's allocator, each once.
unsafe impl FrameAllocator<Size4KiB> for TrackedFrames<'_> {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let pa = mm::alloc_zeroed_frame()?;
        self.0.push(pa);
        Some(PhysFrame::containing_address(PhysAddr::new(pa)))
    }
}

/// What the builder needs to know about the rest of the system.
pub struct Spec<'a> {
    pub domid: u16,
    pub name: &'a str,
    pub label: &'a str,
    pub image_name: &'a str,
    pub memory: u64,
    pub weight: u16,
    pub expect: Expect,
    pub image: &'a [u8],
    pub dma: abi::domain::DmaMode,
    pub stop_on_dma_fault: bool,
}

/// A domain's memory and tables, before its start info is written.
pub fn build(spec: &Spec<'_>) -> Result<Domain, BuildError> {
    let elf = Image::parse(spec.image).map_err(BuildError::Elf)?;
    let span_pages = (elf.end - IMAGE_BASE) / PAGE_SIZE;
    let stack_pages = STACK_SIZE / PAGE_SIZE;
    let need = 1 + stack_pages + span_pages;
    let have = spec.memory / PAGE_SIZE;
    if have < need {
        return Err(BuildError::TooSmall {
            need_pages: need,
            have_pages: have,
        });
    }
    let heap_pages = have - need;
    let heap_start = elf.end + PAGE_SIZE; // one unmapped guard page after the image
    let heap_end = heap_start + heap_pages * PAGE_SIZE;
    if heap_end > abi::domain::DEVICE_VA.min(USER_LIMIT) {
        return Err(BuildError::TooLarge);
    }
    let mem_phys = mm::alloc_contiguous(have).ok_or(BuildError::OutOfMemory { pages: have })?;
    // SAFETY: the frames were free and are now this domain's alone; they are
    // direct-mapped RAM.
    unsafe {
        core::ptr::write_bytes(
            (mem_phys + DIRECT_MAP) as *mut u8,
            0,
            (have * PAGE_SIZE) as usize,
        )
    };

    let start_info_pa = mem_phys;
    let stack_pa = mem_phys + PAGE_SIZE;
    let image_pa = stack_pa + stack_pages * PAGE_SIZE;
    let heap_pa = image_pa + span_pages * PAGE_SIZE;

    let mut frames = Vec::new();
    let pml4 = {
        let mut t = TrackedFrames(&mut frames);
        t.allocate_frame()
            .ok_or(BuildError::OutOfMemory { pages: 1 })?
            .start_address()
            .as_u64()
    };
    // Share the hypervisor's half: its PML4 entries never change after boot.
    // SAFETY: both tables are page-table frames visible in the direct map;
    // the new one is ours alone.
    unsafe {
        let kernel = &*((mm::kernel_pml4() + DIRECT_MAP) as *const PageTable);
        let table = &mut *((pml4 + DIRECT_MAP) as *mut PageTable);
        for i in 256..512 {
            table[i] = kernel[i].clone();
        }
    }

    let mut regions = UserRegions::new();
    let mut memory_map = Vec::new();
    let mut map = |va: u64, pa: u64, pages: u64, flags: F, frames: &mut Vec<u64>| {
        memory_map.push((va, pa, pages * PAGE_SIZE, flags.contains(F::WRITABLE)));
        // SAFETY: `pml4` is this domain's new table, edited only here.
        let mut m = unsafe { paging::mapper(pml4) };
        for i in 0..pages {
            let page = Page::<Size4KiB>::containing_address(VirtAddr::new(va + i * PAGE_SIZE));
            let frame = PhysFrame::containing_address(PhysAddr::new(pa + i * PAGE_SIZE));
            let parents = F::PRESENT | F::WRITABLE | F::USER_ACCESSIBLE;
            // SAFETY: the page is in the user half of a fresh address space
            // and the frame is this domain's memory.
            unsafe {
                m.map_to_with_table_flags(
                    page,
                    frame,
                    flags | F::USER_ACCESSIBLE,
                    parents,
                    &mut TrackedFrames(frames),
                )
            }
            .expect("fresh user mapping")
            .ignore();
        }
        regions
            .push_mapped(va, va + pages * PAGE_SIZE, flags.contains(F::WRITABLE), pa)
            .expect("regions are disjoint");
    };

    map(
        START_INFO_VA,
        start_info_pa,
        1,
        F::PRESENT | F::NO_EXECUTE,
        &mut frames,
    );
    map(
        STACK_TOP - STACK_SIZE,
        stack_pa,
        stack_pages,
        F::PRESENT | F::WRITABLE | F::NO_EXECUTE,
        &mut frames,
    );
    for s in elf.segments() {
        let first = s.vaddr & !(PAGE_SIZE - 1);
        let last = align_up(s.vaddr + s.memsz, PAGE_SIZE).expect("checked by the ELF parser");
        let mut flags = F::PRESENT;
        if s.write {
            flags |= F::WRITABLE;
        }
        if !s.exec {
            flags |= F::NO_EXECUTE;
        }
        map(
            first,
            image_pa + (first - IMAGE_BASE),
            (last - first) / PAGE_SIZE,
            flags,
            &mut frames,
        );
        let dst = image_pa + (s.vaddr - IMAGE_BASE) + DIRECT_MAP;
        let src = &spec.image[s.file_offset as usize..(s.file_offset + s.filesz) as usize];
        // SAFETY: `dst..dst+filesz` lies inside this domain's image frames
        // (the ELF parser checked the segment lies in the image span), which
        // nothing else uses yet.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
    }
    if heap_pages > 0 {
        map(
            heap_start,
            heap_pa,
            heap_pages,
            F::PRESENT | F::WRITABLE | F::NO_EXECUTE,
            &mut frames,
        );
    }

    let mut d = Domain {
        domid: spec.domid,
        name: String::from(spec.name),
        label: String::from(spec.label),
        image: String::from(spec.image_name),
        weight: spec.weight,
        expect: spec.expect,
        ctx: Box::new(UserContext::new(elf.entry, STACK_TOP, START_INFO_VA)),
        pml4,
        regions,
        mem_phys,
        mem_pages: have,
        table_frames: frames,
        state: State::Runnable,
        calls: 0,
        refused: 0,
        console: Vec::new(),
        timer_ns: None,
        ended: None,
        cpu_ns: 0,
        dispatches: 0,
        memory_map,
        dma: spec.dma,
        stop_on_dma_fault: spec.stop_on_dma_fault,
        devices: Vec::new(),
        grant_stats: [0; 5],
    };
    d.ctx.rdi = START_INFO_VA;
    Ok(d)
}

/// Writes the start-info page once every domain and channel exists.
pub fn write_start_info(
    d: &Domain,
    args: &str,
    elf_end: u64,
    ports: &[PortInfo<'_>],
    peers: &[PeerInfo<'_>],
    vbds: &[abi::domain::VbdInfo<'_>],
    vifs: &[abi::domain::VifInfo<'_>],
) -> Result<(), BuildError> {
    let mut p = [None; MAX_PORTS];
    for (slot, port) in p.iter_mut().zip(ports) {
        *slot = Some(*port);
    }
    let mut q = [None; MAX_PEERS];
    for (slot, peer) in q.iter_mut().zip(peers) {
        *slot = Some(*peer);
    }
    let stack_pages = STACK_SIZE / PAGE_SIZE;
    let used = 1 + stack_pages + (elf_end - IMAGE_BASE) / PAGE_SIZE;
    let heap_start = elf_end + PAGE_SIZE;
    let si = StartInfo {
        domid: d.domid,
        name: &d.name,
        label: &d.label,
        args,
        image_start: IMAGE_BASE,
        image_end: elf_end,
        heap_start,
        heap_end: heap_start + (d.mem_pages - used) * PAGE_SIZE,
        stack_bottom: STACK_TOP - STACK_SIZE,
        stack_top: STACK_TOP,
        mem_bytes: d.mem_pages * PAGE_SIZE,
        ports: p,
        peers: q,
        dma: d.dma,
        devices: {
            let mut devs = [None; abi::domain::MAX_DEVICES];
            for (slot, dev) in devs.iter_mut().zip(&d.devices) {
                *slot = Some(*dev);
            }
            devs
        },
        vbds: {
            let mut v = [None; abi::domain::MAX_VBDS];
            for (slot, vbd) in v.iter_mut().zip(vbds) {
                *slot = Some(*vbd);
            }
            v
        },
        vifs: {
            let mut v = [None; abi::domain::MAX_VIFS];
            for (slot, vif) in v.iter_mut().zip(vifs) {
                *slot = Some(*vif);
            }
            v
        },
    };
    // SAFETY: the first frame of the domain's memory is its start-info page,
    // mapped read-only for the domain and writable only here.
    let page = unsafe {
        core::slice::from_raw_parts_mut((d.mem_phys + DIRECT_MAP) as *mut u8, PAGE_SIZE as usize)
    };
    si.encode(page).map_err(BuildError::StartInfo)
}

/// The end of the image span of `image` (for `write_start_info`).
pub fn image_end(image: &[u8]) -> Result<u64, BuildError> {
    Image::parse(image).map(|e| e.end).map_err(BuildError::Elf)
}

impl Domain {
    /// Maps a device's BARs (as `passthrough::bar_layout` placed them) into
    /// the domain, uncached, leaving the holes unmapped; returns what its
    /// start info says about them.
    pub fn map_bars(
        &mut self,
        layout: &[crate::passthrough::BarPlacement],
    ) -> [Option<abi::domain::BarMap>; 6] {
        let mut out = [None; 6];
        let flags = F::PRESENT
            | F::WRITABLE
            | F::NO_EXECUTE
            | F::NO_CACHE
            | F::WRITE_THROUGH
            | F::USER_ACCESSIBLE;
        let parents = F::PRESENT | F::WRITABLE | F::USER_ACCESSIBLE;
        for (slot, p) in out.iter_mut().zip(layout) {
            let (bar, va, holes) = (&p.bar, &p.va, &p.holes);
            let len = bar.size.max(PAGE_SIZE);
            // SAFETY: this domain's table, edited only while it is built.
            let mut m = unsafe { paging::mapper(self.pml4) };
            let mut off = 0;
            while off < len {
                if !holes.iter().any(|&(s, e)| off >= s && off < e) {
                    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(va + off));
                    let frame = PhysFrame::containing_address(PhysAddr::new(bar.addr + off));
                    // SAFETY: the device window of a fresh address space, onto
                    // the BAR of a device this domain owns.
                    unsafe {
                        m.map_to_with_table_flags(
                            page,
                            frame,
                            flags,
                            parents,
                            &mut TrackedFrames(&mut self.table_frames),
                        )
                    }
                    .expect("fresh device mapping")
                    .ignore();
                }
                off += PAGE_SIZE;
            }
            *slot = Some(abi::domain::BarMap {
                index: bar.index,
                va: *va,
                len,
            });
        }
        out
    }

    /// Switches the CPU to this domain's address space.
    pub fn activate(&self) {
        // SAFETY: the table maps the hypervisor's half exactly as the
        // hypervisor's own table does, so ring 0 keeps running unchanged.
        unsafe {
            Cr3::write(
                PhysFrame::containing_address(PhysAddr::new(self.pml4)),
                Cr3Flags::empty(),
            )
        };
    }

    /// Gives the domain's memory and page tables back, less the frames in
    /// `keep` (its pages that other domains still have mapped through
    /// grants; they are freed when the last of those mappings goes). The
    /// caller has switched away from its address space.
    pub fn free_memory(&mut self, keep: &[u64]) {
        for f in self.table_frames.drain(..) {
            mm::free_frame(f);
        }
        for i in 0..self.mem_pages {
            let frame = self.mem_phys + i * PAGE_SIZE;
            if keep.binary_search(&frame).is_err() {
                mm::free_frame(frame);
            }
        }
        self.mem_pages = 0;
    }

    /// The physical page behind virtual page `vpn` of the domain's own
    /// memory (not pages mapped from others), if it is mapped, and
    /// writable when `write` is asked.
    pub fn translate(&self, vpn: u64, write: bool) -> Option<u64> {
        // `regions` holds exactly what `build` mapped, each range with its
        // physical address (the same list as `memory_map`), sorted.
        self.regions.translate(vpn, write)
    }

    /// Maps `pa` at `va` (in the grant window) for the domain, read-only
    /// or writable, never executable.
    pub fn map_grant_page(&mut self, va: u64, pa: u64, writable: bool) -> bool {
        let mut flags = F::PRESENT | F::NO_EXECUTE | F::USER_ACCESSIBLE;
        if writable {
            flags |= F::WRITABLE;
        }
        let parents = F::PRESENT | F::WRITABLE | F::USER_ACCESSIBLE;
        // SAFETY: this domain's table; the caller checked `va` lies in the
        // grant window, where nothing else of the domain is mapped.
        let mut m = unsafe { paging::mapper(self.pml4) };
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(va));
        let frame = PhysFrame::containing_address(PhysAddr::new(pa));
        // SAFETY: a fresh page of the grant window onto a page the granter
        // granted; the TLB cannot hold a stale entry for an unmapped page.
        let r = unsafe {
            m.map_to_with_table_flags(
                page,
                frame,
                flags,
                parents,
                &mut TrackedFrames(&mut self.table_frames),
            )
        };
        match r {
            Ok(flush) => {
                flush.ignore();
                true
            }
            Err(_) => false,
        }
    }

    /// Removes a grant-window mapping; its TLB entry is gone before this
    /// returns (flushed now if the domain's tables are live; otherwise the
    /// next load of its CR3 flushes them, as its pages are not global).
    pub fn unmap_grant_page(&mut self, va: u64) {
        // SAFETY: this domain's table, edited only with the system lock held.
        let mut m = unsafe { paging::mapper(self.pml4) };
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(va));
        if let Ok((_, flush)) = m.unmap(page) {
            if Cr3::read().0.start_address().as_u64() == self.pml4 {
                flush.flush();
            } else {
                flush.ignore();
            }
        }
    }

    /// Whether ending with `status` for `reason` ("exit" or "fault") is
    /// what the manifest says this domain should do.
    pub fn ends_as_expected(&self, status: i64, reason: &str) -> bool {
        match self.expect {
            Expect::Exit => reason == "exit" && status == 0,
            Expect::Fault => reason == "fault" || reason == "dma-fault",
        }
    }

    pub fn is_dead(&self) -> bool {
        self.state == State::Dead
    }
}
