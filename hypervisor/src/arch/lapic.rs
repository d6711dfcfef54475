//! The local APIC, through its MMIO page (xAPIC mode).
//!
//! Boot only enables it with every local interrupt masked; the scheduler's
//! timer arrives with the ring-3 domains.

use core::ptr::NonNull;
use volatile::VolatilePtr;

const ID: usize = 0x20;
const VERSION: usize = 0x30;
const SPURIOUS: usize = 0xf0;
const LVT_TIMER: usize = 0x320;
const LVT_LINT0: usize = 0x350;
const LVT_LINT1: usize = 0x360;
const LVT_ERROR: usize = 0x380;
const MASKED: u32 = 1 << 16;
/// Spurious-interrupt vector, with the APIC software-enable bit.
const SPURIOUS_VECTOR: u32 = 0xff;

pub struct Lapic {
    base: NonNull<u32>,
}

impl Lapic {
    /// # Safety
    /// `base` must be the local APIC's page, mapped uncached, for ever.
    pub unsafe fn new(base: *mut u8) -> Lapic {
        Lapic {
            base: NonNull::new(base.cast()).expect("LAPIC mapping"),
        }
    }

    fn reg(&self, off: usize) -> VolatilePtr<'_, u32> {
        // SAFETY: `off` is one of the register offsets above, inside the
        // 4 KiB page that `new`'s caller promised is mapped.
        unsafe { VolatilePtr::new(self.base.byte_add(off)) }
    }

    pub fn id(&self) -> u32 {
        self.reg(ID).read() >> 24
    }

    pub fn version(&self) -> u32 {
        self.reg(VERSION).read()
    }

    /// Software-enables the APIC with every local vector masked.
    pub fn enable_masked(&self) {
        for lvt in [LVT_TIMER, LVT_LINT0, LVT_LINT1, LVT_ERROR] {
            self.reg(lvt).write(MASKED);
        }
        self.reg(SPURIOUS).write(0x100 | SPURIOUS_VECTOR);
    }
}

/// Masks every line of the two legacy 8259 PICs: interrupts come through
/// the APICs only.
pub fn mask_legacy_pic() {
    use x86_64::instructions::port::Port;
    // SAFETY: writing the 8259 interrupt-mask registers only masks lines.
    unsafe {
        Port::<u8>::new(0x21).write(0xff);
        Port::<u8>::new(0xa1).write(0xff);
    }
}
