//! CPU exceptions in ring 0. Each is fatal: the handler prints the vector,
//! error code, RIP and CR2 (as a log line and an `exception` event) and stops
//! QEMU with the failure status.

use abi::ev::{Code, Exception, Hex};
use core::arch::global_asm;

/// Registers as the entry stubs leave them on the stack.
#[repr(C)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// An entry stub: vectors where the CPU pushes no error code push a zero so
/// every frame has the same shape.
macro_rules! stub {
    ($n:literal) => {
        concat!(
            ".global exc_",
            $n,
            "\nexc_",
            $n,
            ":\n  push $0\n  push $",
            $n,
            "\n  jmp exc_common\n"
        )
    };
    ($n:literal, err) => {
        concat!(
            ".global exc_",
            $n,
            "\nexc_",
            $n,
            ":\n  push $",
            $n,
            "\n  jmp exc_common\n"
        )
    };
}

global_asm!(
    ".section .text.exceptions, \"ax\"",
    stub!(0),
    stub!(1),
    stub!(2),
    stub!(3),
    stub!(4),
    stub!(5),
    stub!(6),
    stub!(7),
    stub!(8, err),
    stub!(9),
    stub!(10, err),
    stub!(11, err),
    stub!(12, err),
    stub!(13, err),
    stub!(14, err),
    stub!(15),
    stub!(16),
    stub!(17, err),
    stub!(18),
    stub!(19),
    stub!(20),
    stub!(21, err),
    stub!(22),
    stub!(23),
    stub!(24),
    stub!(25),
    stub!(26),
    stub!(27),
    stub!(28),
    stub!(29, err),
    stub!(30, err),
    stub!(31),
    r#"
exc_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    and $-16, %rsp
    call exception_handler
    ud2

    .section .rodata.exceptions, "a"
    .balign 8
    .global exception_stubs
exception_stubs:
    .quad exc_0, exc_1, exc_2, exc_3, exc_4, exc_5, exc_6, exc_7
    .quad exc_8, exc_9, exc_10, exc_11, exc_12, exc_13, exc_14, exc_15
    .quad exc_16, exc_17, exc_18, exc_19, exc_20, exc_21, exc_22, exc_23
    .quad exc_24, exc_25, exc_26, exc_27, exc_28, exc_29, exc_30, exc_31
    "#,
    options(att_syntax)
);

extern "C" {
    static exception_stubs: [u64; 32];
}

/// The addresses of the 32 entry stubs, for the IDT.
pub fn stubs() -> &'static [u64; 32] {
    // SAFETY: `exception_stubs` is a read-only table of 32 addresses defined
    // in the assembly above.
    unsafe { &exception_stubs }
}

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

#[no_mangle]
extern "C" fn exception_handler(frame: &Frame) -> ! {
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
