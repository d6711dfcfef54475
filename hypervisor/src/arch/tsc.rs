//! Time from the TSC, calibrated once against the PIT.

use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::instructions::port::Port;

static ENTRY_TSC: AtomicU64 = AtomicU64::new(0);
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

pub fn read() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// PIT input clock (Hz).
const PIT_HZ: u64 = 1_193_182;
/// Calibration interval: 10 ms of PIT ticks.
const PIT_TICKS: u64 = PIT_HZ / 100;

/// Remembers the TSC value taken at the PVH entry and measures the TSC's
/// frequency with PIT channel 2 (one-shot, gate through port 0x61).
pub fn init(entry_tsc: u64) {
    ENTRY_TSC.store(entry_tsc, Ordering::Relaxed);
    let mut gate = Port::<u8>::new(0x61);
    let mut mode = Port::<u8>::new(0x43);
    let mut ch2 = Port::<u8>::new(0x42);
    // SAFETY: the PIT and the port-0x61 gate are legacy timer I/O that
    // nothing else in the system uses; the speaker output stays off.
    let ticks = unsafe {
        let g = gate.read();
        gate.write((g & !0x02) | 0x01); // gate on, speaker off
        mode.write(0b1011_0000); // channel 2, lo/hi byte, mode 0, binary
        ch2.write(PIT_TICKS as u8);
        ch2.write((PIT_TICKS >> 8) as u8);
        let start = read();
        while gate.read() & 0x20 == 0 {
            core::hint::spin_loop();
        }
        read() - start
    };
    TSC_KHZ.store((ticks * 100 / 1000).max(1), Ordering::Relaxed);
}

pub fn khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Milliseconds since the hypervisor's entry.
pub fn ms_since_entry() -> u64 {
    read().saturating_sub(ENTRY_TSC.load(Ordering::Relaxed)) / khz().max(1)
}

/// Nanoseconds since the hypervisor's entry.
pub fn ns_since_entry() -> u64 {
    let delta = read().saturating_sub(ENTRY_TSC.load(Ordering::Relaxed));
    (u128::from(delta) * 1_000_000 / u128::from(khz().max(1))) as u64
}

/// The TSC value `ns` nanoseconds after the hypervisor's entry.
pub fn tsc_at_ns(ns: u64) -> u64 {
    let ticks = (u128::from(ns) * u128::from(khz()) / 1_000_000) as u64;
    ENTRY_TSC.load(Ordering::Relaxed).saturating_add(ticks)
}
