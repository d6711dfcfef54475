//! The hypervisor's virtual address space.
//!
//! ```text
//! 0x0000_0000_0000_0000 .. 0x0000_7fff_ffff_ffff   lower half: domains (none at boot)
//! 0xffff_8000_0000_0000 .. +RAM                    direct map of RAM (WB, NX)
//! 0xffff_c000_0000_0000 .. +1 TiB                  device window: MMIO and firmware tables
//! 0xffff_ffff_8000_0000 .. (-2 GiB)                the hypervisor image
//! ```

/// Where physical address 0 appears in the direct map.
pub const DIRECT_MAP: u64 = 0xffff_8000_0000_0000;
/// Largest physical address the direct map may cover (bytes).
pub const DIRECT_MAP_MAX: u64 = 1 << 45;
/// Start of the window where MMIO and firmware tables are mapped on demand.
pub const DEVICE_WINDOW: u64 = 0xffff_c000_0000_0000;
/// Size of the device window (bytes).
pub const DEVICE_WINDOW_SIZE: u64 = 1 << 40;
/// The image's link address minus its load address.
pub const KERNEL_BASE: u64 = 0xffff_ffff_8000_0000;

pub const PAGE_SIZE: u64 = 4096;
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;

pub const fn align_down(x: u64, a: u64) -> u64 {
    x & !(a - 1)
}

/// `None` if rounding up overflows.
pub const fn align_up(x: u64, a: u64) -> Option<u64> {
    match x.checked_add(a - 1) {
        Some(v) => Some(v & !(a - 1)),
        None => None,
    }
}
