//! `kernel_main`: from the PVH entry to `ready`.
//!
//! The order matters: start_info and the firmware tables are read on the
//! boot identity map, everything they occupy is reserved, and only then does
//! the frame allocator exist and the hypervisor move to its own tables.

use crate::arch::{self, tsc};
use crate::mm::{self, Cache};
use crate::{acpi, iommu_units, log, pci};
use abi::bundle::Bundle;
use abi::ev::{self, Hex, List};
use abi::manifest::{ExitRule, Manifest};
use alloc::vec::Vec;
use core::fmt::Write;
use hypervisor::frames::{FrameAllocator, Range};
use hypervisor::layout::KERNEL_BASE;
use hypervisor::pci_class::class_name;
use hypervisor::pvh::{self, MemoryKind, MemoryRegion, Module, StartInfo};

/// Memory-map entries we look at; QEMU gives about six.
const MAX_REGIONS: usize = 64;
/// Ranges reserved before the allocator exists.
const MAX_RESERVED: usize = 128;

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// Stops the system because a boot check failed.
pub fn fail(stage: &str, error: core::fmt::Arguments<'_>) -> ! {
    let mut msg = FixedBuf::<256>::new();
    let _ = msg.write_fmt(error);
    log!("boot failed in {}: {}", stage, msg.as_str());
    crate::console::event(&ev::BootError {
        stage,
        error: msg.as_str(),
    });
    crate::console::event(&ev::Shutdown {
        status: 1,
        reason: "boot check failed",
    });
    arch::exit_qemu(abi::exit::FAILURE)
}

/// Reads `len` bytes of physical memory on the boot identity map.
fn early_bytes(pa: u64, len: usize) -> &'static [u8] {
    if pa == 0 || pa.saturating_add(len as u64) > 1 << 32 {
        fail(
            "pvh",
            format_args!("boot data at {pa:#x}+{len:#x} lies outside the first 4 GiB"),
        );
    }
    // SAFETY: the boot tables identity-map the first 4 GiB (checked above),
    // and QEMU wrote these boot structures there; nothing writes them while
    // we read.
    unsafe { core::slice::from_raw_parts(pa as *const u8, len) }
}

#[no_mangle]
extern "C" fn kernel_main(start_info_pa: u64, entry_tsc: u64) -> ! {
    crate::console::init();
    log!("airlock {} starting", env!("CARGO_PKG_VERSION"));
    arch::cpu::init_gdt();
    arch::cpu::init_idt(&arch::trap::idt_gates());
    arch::trap::init();
    tsc::init(entry_tsc);

    // --- start_info, on the identity map ---------------------------------
    let si = StartInfo::parse(early_bytes(start_info_pa, pvh::START_INFO_SIZE))
        .unwrap_or_else(|e| fail("pvh", format_args!("{e}")));
    let n = (si.memmap_entries as usize).min(MAX_REGIONS);
    let map = early_bytes(si.memmap_paddr, n * pvh::MEMMAP_ENTRY_SIZE);
    let mut regions = [MemoryRegion {
        addr: 0,
        size: 0,
        kind: MemoryKind::Reserved,
    }; MAX_REGIONS];
    for (i, r) in regions.iter_mut().enumerate().take(n) {
        *r = MemoryRegion::parse(map, i).unwrap_or_else(|e| fail("pvh", format_args!("{e}")));
    }
    let regions = &regions[..n];
    let modules = early_bytes(
        si.modlist_paddr.max(1),
        si.nr_modules as usize * pvh::MODULE_ENTRY_SIZE,
    );

    let mut reserved = [Range::new(0, 0); MAX_RESERVED];
    let mut nres = 0;
    let mut reserve = |r: Range| {
        if nres == MAX_RESERVED {
            fail(
                "memory",
                format_args!("more than {MAX_RESERVED} reserved ranges"),
            );
        }
        reserved[nres] = r;
        nres += 1;
    };
    // SAFETY: taking the addresses of linker-script symbols.
    let (img_start, img_end) = unsafe {
        (
            &__image_start as *const u8 as u64,
            &__image_end as *const u8 as u64,
        )
    };
    reserve(Range::new(0, 1 << 20)); // real-mode memory, BIOS data, option ROMs
    reserve(Range::new(img_start - KERNEL_BASE, img_end - KERNEL_BASE));
    reserve(Range::new(
        start_info_pa,
        start_info_pa + pvh::START_INFO_SIZE as u64,
    ));
    reserve(Range::new(
        si.memmap_paddr,
        si.memmap_paddr + map.len() as u64,
    ));
    reserve(Range::new(
        si.modlist_paddr,
        si.modlist_paddr + modules.len() as u64,
    ));
    if si.cmdline_paddr != 0 {
        reserve(Range::new(si.cmdline_paddr, si.cmdline_paddr + 4096));
    }
    let mut bundle_module = None;
    for i in 0..si.nr_modules as usize {
        let m = Module::parse(modules, i).unwrap_or_else(|e| fail("pvh", format_args!("{e}")));
        reserve(Range::new(m.paddr, m.paddr.saturating_add(m.size)));
        bundle_module.get_or_insert(m);
    }
    acpi::table_ranges(si.rsdp_paddr, &mut reserve)
        .unwrap_or_else(|e| fail("acpi", format_args!("cannot walk the ACPI tables: {e}")));

    let ram = regions
        .iter()
        .filter(|r| r.kind == MemoryKind::Ram)
        .map(|r| Range::new(r.addr, r.end()));
    let frames = FrameAllocator::build(ram.clone(), reserved[..nres].iter().copied())
        .unwrap_or_else(|e| fail("memory", format_args!("{e}")));
    let ram_bytes: u64 = ram.clone().map(|r| r.len()).sum();
    let free_before = frames.free_bytes();
    mm::init_frames(frames);

    // --- the hypervisor's own tables --------------------------------------
    let mut direct = [(0u64, 0u64); MAX_REGIONS];
    let mut nd = 0;
    for r in regions {
        if matches!(
            r.kind,
            MemoryKind::Ram | MemoryKind::AcpiReclaimable | MemoryKind::AcpiNvs
        ) {
            direct[nd] = (r.addr, r.end());
            nd += 1;
        }
    }
    mm::enable_kernel_tables(&direct[..nd]);
    for r in regions {
        log!(
            "memory {:#012x}-{:#012x} {}",
            r.addr,
            r.end(),
            r.kind.name()
        );
    }
    crate::console::event(&ev::Memory {
        ram_bytes,
        free_bytes: mm::free_bytes(),
        reserved_bytes: ram_bytes - free_before,
        regions: n as u32,
    });

    // --- the boot bundle ----------------------------------------------------
    let Some(module) = bundle_module else {
        fail(
            "bundle",
            format_args!("no boot bundle: QEMU was started without -initrd"),
        )
    };
    let bytes = {
        let p = mm::phys_to_ptr(module.paddr, module.size);
        // SAFETY: the module is reserved memory that QEMU filled and nothing
        // else writes; `p` maps all of it.
        unsafe { core::slice::from_raw_parts(p, module.size as usize) }
    };
    let bundle = Bundle::parse(bytes).unwrap_or_else(|e| fail("bundle", format_args!("{e}")));
    for e in bundle.entries() {
        log!(
            "bundle entry {}: {} {:?}, {} bytes",
            e.index,
            e.kind.name(),
            e.name,
            e.data.len()
        );
        crate::console::event(&ev::BundleEntry {
            index: e.index,
            kind: e.kind.name(),
            name: e.name,
            size: e.data.len() as u64,
            crc32: Hex(u64::from(e.crc32)),
        });
    }
    let Some(manifest_bytes) = bundle.manifest() else {
        fail("bundle", format_args!("the bundle has no manifest entry"))
    };
    let manifest =
        Manifest::parse(manifest_bytes).unwrap_or_else(|e| fail("manifest", format_args!("{e}")));
    log!("manifest {:?}", manifest.name());

    // --- the platform -------------------------------------------------------
    let platform =
        acpi::discover(si.rsdp_paddr).unwrap_or_else(|e| fail("acpi", format_args!("{e:?}")));
    let lapic_va = mm::map_device(platform.lapic_base, 4096, Cache::Uncached);
    arch::lapic::mask_legacy_pic();
    // SAFETY: the MADT's local APIC page, mapped uncached just now, for ever.
    let lapic = unsafe { arch::lapic::init(lapic_va) };
    log!(
        "cpu: {} in the MADT, running on APIC id {} (version {:#x}); the others stay parked",
        platform.cpus.len(),
        lapic.id(),
        lapic.version()
    );
    for (id, base) in &platform.ioapics {
        log!("ioapic {} at {:#x}", id, base);
    }

    let units = iommu_units::discover(&platform);

    let Some(&(ecam_base, seg, first, last)) = platform.ecam.first() else {
        fail(
            "acpi",
            format_args!("no MCFG: PCI needs ECAM (use -machine q35)"),
        )
    };
    log!(
        "ecam {:#x} segment {} buses {}-{}",
        ecam_base,
        seg,
        first,
        last
    );
    let ecam = pci::Ecam::map(ecam_base, seg, first, last);
    let functions = pci::enumerate(&ecam);
    for f in &functions {
        let bars: Vec<ev::Bar<'_>> = f
            .bars
            .iter()
            .map(|b| ev::Bar {
                index: b.index,
                kind: b.kind,
                addr: Hex(b.addr),
                size: Hex(b.size),
                prefetchable: b.prefetchable,
            })
            .collect();
        crate::console::event(&ev::Pci {
            bdf: f.bdf,
            vendor: Hex(u64::from(f.vendor)),
            device: Hex(u64::from(f.device)),
            class: Hex(u64::from(f.class)),
            class_name: class_name((f.class >> 16) as u8),
            header_type: f.header_type,
            bars: List(&bars),
            iommu_unit: iommu_units::unit_for(&units, f.bdf),
        });
    }
    iommu_units::report(&units);
    // Translation on, every function blocked, before any domain exists.
    crate::iommu_hw::init(&units).unwrap_or_else(|e| fail("iommu", format_args!("{e}")));
    let pt = Some(crate::passthrough::Passthrough::new(ecam));

    // Every device the manifest says QEMU emulates must be where it says.
    for d in manifest.devices() {
        let found = functions.iter().find(|f| f.bdf == d.bdf);
        match found {
            Some(f) if f.vendor == d.vendor && f.device == d.device => {}
            Some(f) => fail(
                "manifest",
                format_args!(
                    "{} at {} is {:04x}:{:04x}, expected {:04x}:{:04x}",
                    d.kind.name(),
                    d.bdf,
                    f.vendor,
                    f.device,
                    d.vendor,
                    d.device
                ),
            ),
            None => fail(
                "manifest",
                format_args!("{} expected at {} is not there", d.kind.name(), d.bdf),
            ),
        }
    }

    crate::console::event(&ev::Ready {
        t_ms: tsc::ms_since_entry(),
        tsc_khz: tsc::khz(),
    });
    log!("ready");

    if manifest.exit_rule() != ExitRule::AfterReady {
        // Returns only when there is no domain to run.
        crate::run::start(&manifest, &bundle, &functions, pt);
    }
    match manifest.exit_rule() {
        ExitRule::Never => {
            log!("exit rule never: halting; stop QEMU to end the run");
            arch::halt_forever()
        }
        // after-ready, or all-exited with no domain to run: boot is the run.
        _ => {
            crate::console::event(&ev::Shutdown {
                status: 0,
                reason: "boot is done and there is no domain to run",
            });
            arch::exit_qemu(abi::exit::SUCCESS)
        }
    }
}

/// A `fmt::Write` into a fixed buffer that cuts what does not fit.
pub struct FixedBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> FixedBuf<N> {
    pub const fn new() -> Self {
        FixedBuf {
            buf: [0; N],
            len: 0,
        }
    }

    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 characters are ever appended.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl<const N: usize> Write for FixedBuf<N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for c in s.chars() {
            let mut tmp = [0u8; 4];
            let enc = c.encode_utf8(&mut tmp).as_bytes();
            if self.len + enc.len() > N {
                break;
            }
            self.buf[self.len..self.len + enc.len()].copy_from_slice(enc);
            self.len += enc.len();
        }
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut msg = FixedBuf::<256>::new();
    let _ = write!(msg, "{}", info.message());
    if let Some(l) = info.location() {
        let _ = write!(msg, " at {}:{}", l.file(), l.line());
    }
    crate::console::emergency_write(format_args!("[airlock] panic: {}\n", msg.as_str()));
    crate::console::emergency_event(&ev::Panic { msg: msg.as_str() });
    arch::exit_qemu(abi::exit::FAILURE)
}
