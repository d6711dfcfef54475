//! CPU exceptions. In ring 0 each is fatal: [`fatal`] prints the vector,
//! error code, RIP and CR2 (as a log line and an `exception` event) and
//! stops QEMU with the failure status. In ring 3 one ends the domain (see
//! `run.rs`). The entry stubs are in `trap.rs`.

use abi::ev::{Code, Exception, Hex};

/// The architectural name of an exception vector.
pub fn vector_name(v: u64) -> &'static str {
    match v {
        0 => "divide-error",
        1 => "debug",
        2 => "nmi",
        3 => "breakpoint",
        4 => "overflow",
        5 => "bound-range",
        6 => "invalid-opcode",
        7 => "device-not-available",
        8 => "double-fault",
        10 => "invalid-tss",
        11 => "segment-not-present",
        12 => "stack-fault",
        13 => "general-protection",
        14 => "page-fault",
        16 => "x87-floating-point",
        17 => "alignment-check",
        18 => "machine-check",
        19 => "simd-floating-point",
        20 => "virtualization",
        21 => "control-protection",
        28 => "hypervisor-injection",
        29 => "vmm-communication",
        30 => "security",
        _ => "reserved",
    }
}

/// A CPU exception in ring 0: print what is known and stop.
pub fn fatal(frame: &super::trap::KernelFrame) -> ! {
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let name = vector_name(frame.vector);
    crate::console::emergency_write(format_args!(
        "[airlock] exception {} ({}) error {:#x} at rip {:#x} cr2 {:#x} rsp {:#x}\n",
        frame.vector, name, frame.error_code, frame.rip, cr2, frame.rsp
    ));
    crate::console::emergency_event(&Exception {
        vector: Code {
            raw: frame.vector,
            name,
        },
        error_code: Hex(frame.error_code),
        rip: Hex(frame.rip),
        cr2: Hex(cr2),
    });
    super::exit_qemu(abi::exit::FAILURE)
}
