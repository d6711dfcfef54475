//! The local APIC, through its MMIO page (xAPIC mode), and its timer.
//!
//! The timer is one-shot: the scheduler arms it for the earliest of the
//! running domain's slice end and the next domain timer. TSC-deadline mode
//! is used where CPUID offers it; otherwise the count-down mode, with the
//! APIC timer's rate measured against the TSC at boot.

use super::{trap, tsc};
use crate::sync::Once;
use core::ptr::NonNull;
use volatile::VolatilePtr;
use x86_64::registers::model_specific::Msr;

const ID: usize = 0x20;
const VERSION: usize = 0x30;
const EOI: usize = 0xb0;
const SPURIOUS: usize = 0xf0;
const LVT_TIMER: usize = 0x320;
const LVT_LINT0: usize = 0x350;
const LVT_LINT1: usize = 0x360;
const LVT_ERROR: usize = 0x380;
const MASKED: u32 = 1 << 16;
const TIMER_TSC_DEADLINE: u32 = 0b10 << 17;
const IA32_TSC_DEADLINE: u32 = 0x6e0;

// Count-down timer registers.
const TIMER_INITIAL_COUNT: usize = 0x380;
const TIMER_CURRENT_COUNT: usize = 0x390;
const TIMER_DIVIDE: usize = 0x3e0;
const DIVIDE_BY_16: u32 = 0b0011;

pub struct Lapic {
    base: NonNull<u32>,
    /// TSC-deadline mode; else count-down at `ticks_per_ms` (divided by 16).
    tsc_deadline: bool,
    ticks_per_ms: u64,
}

// SAFETY: the register page is this CPU's own local APIC; it is only
// touched with interrupts off, by the CPU it belongs to.
unsafe impl Send for Lapic {}
// SAFETY: as above.
unsafe impl Sync for Lapic {}

static LAPIC: Once<Lapic> = Once::new();

impl Lapic {
    fn reg(&self, off: usize) -> VolatilePtr<'_, u32> {
        // SAFETY: `off` is one of the register offsets above, inside the
        // 4 KiB page that `init`'s caller promised is mapped.
        unsafe { VolatilePtr::new(self.base.byte_add(off)) }
    }

    pub fn id(&self) -> u32 {
        self.reg(ID).read() >> 24
    }

    pub fn version(&self) -> u32 {
        self.reg(VERSION).read()
    }
}

/// Enables the local APIC at `base` with LINT0/1 and error masked and the
/// timer set up on [`trap::TIMER_VECTOR`] (disarmed).
///
/// # Safety
/// `base` must be the local APIC's page, mapped uncached, for ever.
pub unsafe fn init(base: *mut u8) -> &'static Lapic {
    // CPUID.01H:ECX bit 24: TSC-deadline timer.
    let tsc_deadline = core::arch::x86_64::__cpuid(1).ecx & (1 << 24) != 0;
    let mut l = Lapic {
        base: NonNull::new(base.cast()).expect("LAPIC mapping"),
        tsc_deadline,
        ticks_per_ms: 0,
    };
    for lvt in [LVT_TIMER, LVT_LINT0, LVT_LINT1, LVT_ERROR] {
        l.reg(lvt).write(MASKED);
    }
    l.reg(SPURIOUS)
        .write(0x100 | u32::from(trap::SPURIOUS_VECTOR));
    if tsc_deadline {
        l.reg(LVT_TIMER)
            .write(TIMER_TSC_DEADLINE | u32::from(trap::TIMER_VECTOR));
    } else {
        // Measure the count-down rate over 10 ms of TSC time, masked.
        l.reg(TIMER_DIVIDE).write(DIVIDE_BY_16);
        l.reg(LVT_TIMER)
            .write(MASKED | u32::from(trap::TIMER_VECTOR));
        l.reg(TIMER_INITIAL_COUNT).write(u32::MAX);
        let end = tsc::read() + tsc::khz() * 10;
        while tsc::read() < end {
            core::hint::spin_loop();
        }
        let used = u64::from(u32::MAX - l.reg(TIMER_CURRENT_COUNT).read());
        l.reg(TIMER_INITIAL_COUNT).write(0);
        l.ticks_per_ms = (used / 10).max(1);
        l.reg(LVT_TIMER).write(u32::from(trap::TIMER_VECTOR));
    }
    LAPIC.init(l)
}

fn lapic() -> &'static Lapic {
    LAPIC.get().expect("LAPIC initialised")
}

/// Whether the timer runs in TSC-deadline mode.
pub fn uses_tsc_deadline() -> bool {
    lapic().tsc_deadline
}

/// Signals the end of the interrupt being handled.
pub fn eoi() {
    lapic().reg(EOI).write(0);
}

/// Arms the one-shot timer to fire at TSC value `deadline` (at once if it
/// has passed).
pub fn arm(deadline: u64) {
    let l = lapic();
    if l.tsc_deadline {
        let mut msr = Msr::new(IA32_TSC_DEADLINE);
        // SAFETY: writing IA32_TSC_DEADLINE only arms the local timer.
        unsafe { msr.write(deadline.max(1)) };
    } else {
        let now = tsc::read();
        // Microseconds to go, at most 10 s so the product cannot overflow.
        let us = (deadline.saturating_sub(now) * 1000 / tsc::khz().max(1)).min(10_000_000);
        let ticks = (us * l.ticks_per_ms / 1000).clamp(1, u64::from(u32::MAX));
        l.reg(TIMER_INITIAL_COUNT).write(ticks as u32);
    }
}

/// Masks the legacy 8259 PICs: interrupts come through the APICs only.
pub fn mask_legacy_pic() {
    use x86_64::instructions::port::Port;
    // SAFETY: writing the 8259 interrupt-mask registers only masks lines.
    unsafe {
        Port::<u8>::new(0x21).write(0xff);
        Port::<u8>::new(0xa1).write(0xff);
    }
}
