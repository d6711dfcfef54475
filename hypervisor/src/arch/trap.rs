//! Entries into ring 0 and the way back to ring 3.
//!
//! One kernel stack, no kernel threads (as in seL4): every entry from a
//! domain saves its registers into that domain's [`UserContext`], switches
//! to the top of the kernel stack and calls Rust, which never returns; it
//! ends by resuming some domain with [`return_to_user`] or by idling.
//!
//! The saving is done by the hardware and the stubs together: the TSS's
//! RSP0 points at the end of the running domain's `UserContext`, so an
//! interrupt or exception from ring 3 pushes its iret frame straight into
//! it; the stub pushes the error code (or 0), the vector and the general
//! registers below that. `syscall` does not switch stacks, so its stub
//! builds the same frame by hand, with the vector [`SYSCALL_VECTOR`].
//! Entries from ring 0 (only possible while idling in HLT, or a
//! hypervisor bug) keep the kernel stack and return with IRETQ.
//!
//! GS: while ring 0 runs, GS.base points at [`PerCpu`]; ring 3 runs with
//! GS.base 0 and the per-CPU pointer parked in KERNEL_GS_BASE. Every entry
//! from ring 3 starts with SWAPGS and every exit to it ends with one.

use super::cpu;
use core::arch::global_asm;
use core::cell::UnsafeCell;
use x86_64::registers::model_specific::{
    Efer, EferFlags, GsBase, KernelGsBase, LStar, SFMask, Star,
};
use x86_64::registers::rflags::RFlags;
use x86_64::VirtAddr;

/// The `vector` of a context saved by `syscall`; not a CPU vector.
pub const SYSCALL_VECTOR: u64 = 0x100;
/// The local APIC timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// The local APIC's spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// A domain's registers while it is not running, laid out as the entry
/// stubs push them (lowest address first).
#[repr(C, align(16))]
#[derive(Clone, Debug, Default)]
pub struct UserContext {
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

// The stubs below depend on this size (22 quadwords) and on the end being
// 16-byte aligned, since the CPU aligns RSP0 down to 16 before pushing.
const _: () = assert!(core::mem::size_of::<UserContext>() == 176);

impl UserContext {
    /// A fresh ring-3 context entering at `rip` with `rsp` and `rdi`.
    pub fn new(rip: u64, rsp: u64, rdi: u64) -> Self {
        let sel = cpu::selectors();
        UserContext {
            rip,
            rsp,
            rdi,
            cs: u64::from(sel.user_code.0),
            ss: u64::from(sel.user_data.0),
            rflags: RFlags::INTERRUPT_FLAG.bits() | 0x2,
            ..Default::default()
        }
    }

    /// One past the last byte: what RSP0 must be while this context's
    /// domain runs.
    pub fn end(&self) -> u64 {
        self as *const Self as u64 + core::mem::size_of::<Self>() as u64
    }
}

/// Per-CPU data the stubs reach through GS. Offsets are fixed: the
/// assembly uses them.
#[repr(C)]
struct PerCpu {
    /// 0: the domain's RSP while a `syscall` entry saves it.
    user_rsp: u64,
    /// 8: the end of the running domain's `UserContext`.
    ctx_end: u64,
    /// 16: the top of the kernel stack.
    kstack_top: u64,
}

struct PerCpuCell(UnsafeCell<PerCpu>);

// SAFETY: one CPU; written by Rust only with interrupts off and read by
// the entry stubs of the same CPU.
unsafe impl Sync for PerCpuCell {}

static PERCPU: PerCpuCell = PerCpuCell(UnsafeCell::new(PerCpu {
    user_rsp: 0,
    ctx_end: 0,
    kstack_top: 0,
}));

const KSTACK_SIZE: usize = 64 * 1024;
static KSTACK: super::Stack<KSTACK_SIZE> = super::Stack::new();

/// A stub that pushes a zero where the CPU pushes no error code.
macro_rules! stub {
    ($n:literal) => {
        concat!(
            ".global trap_",
            $n,
            "\ntrap_",
            $n,
            ":\n  push $0\n  push $",
            $n,
            "\n  jmp trap_common\n"
        )
    };
    ($n:literal, err) => {
        concat!(
            ".global trap_",
            $n,
            "\ntrap_",
            $n,
            ":\n  push $",
            $n,
            "\n  jmp trap_common\n"
        )
    };
}

global_asm!(
    ".section .text.trap, \"ax\"",
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
    /* Stack: vector, error, rip, cs, rflags, rsp, ss. */
trap_common:
    testb $3, 24(%rsp)
    jnz 1f
    /* From ring 0: save on the kernel stack and return with IRETQ. */
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
    mov %rsp, %rbp
    and $-16, %rsp
    call kernel_trap
    mov %rbp, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq
1:
    /* From ring 3: RSP is inside the domain's UserContext; fill it in. */
    swapgs
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
    mov %gs:16, %rsp
    xor %ebp, %ebp
    call user_trap
    ud2

    .global syscall_entry
syscall_entry:
    /* RCX = user RIP, R11 = user RFLAGS, interrupts off (SFMASK). */
    swapgs
    mov %rsp, %gs:0
    mov %gs:8, %rsp
    push $0x1b                  /* ss: placeholder, fixed up in Rust */
    push %gs:0                  /* rsp */
    push %r11                   /* rflags */
    push $0x23                  /* cs: placeholder, fixed up in Rust */
    push %rcx                   /* rip */
    push $0                     /* error code */
    push $0x100                 /* SYSCALL_VECTOR */
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
    mov %gs:16, %rsp
    xor %ebp, %ebp
    call user_trap
    ud2

    /* return_to_user(ctx: *const UserContext) -> ! */
    .global return_to_user_asm
return_to_user_asm:
    mov %rdi, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    cmpq $0x100, (%rsp)
    je 2f
    add $16, %rsp
    swapgs
    iretq
2:
    /* A context saved by syscall goes back by SYSRET: RIP from RCX, RFLAGS from R11. */
    add $16, %rsp
    mov 0(%rsp), %rcx
    mov 16(%rsp), %r11
    mov 24(%rsp), %rsp
    swapgs
    sysretq

    .section .rodata.trap, "a"
    .balign 8
    .global trap_stubs
trap_stubs:
    .quad trap_0, trap_1, trap_2, trap_3, trap_4, trap_5, trap_6, trap_7
    .quad trap_8, trap_9, trap_10, trap_11, trap_12, trap_13, trap_14, trap_15
    .quad trap_16, trap_17, trap_18, trap_19, trap_20, trap_21, trap_22, trap_23
    .quad trap_24, trap_25, trap_26, trap_27, trap_28, trap_29, trap_30, trap_31

    /* Vectors 32-255: one 16-byte stub each, so vector v's stub is at
       irq_stubs + (v - 32) * 16. Every vector has one: an interrupt
       nobody asked for is counted, never a fault in ring 0. */
    .section .text.trap, "ax"
    .balign 16
    .global irq_stubs
irq_stubs:
    .set irq_vector, 32
    .rept 224
    .balign 16
    push $0
    push $irq_vector
    jmp trap_common
    .set irq_vector, irq_vector + 1
    .endr
    "#,
    options(att_syntax)
);

extern "C" {
    static trap_stubs: [u64; 32];
    static irq_stubs: [u8; 224 * 16];
    fn syscall_entry();
    fn return_to_user_asm(ctx: *const UserContext) -> !;
}

/// The IDT's gates: exceptions 0-31 and every interrupt vector 32-255.
pub fn idt_gates() -> [(u8, u64); 256] {
    // SAFETY: `trap_stubs` is a read-only table of 32 addresses defined in
    // the assembly above; `irq_stubs` is only used for its address.
    let (exceptions, irqs) = unsafe { (&trap_stubs, irq_stubs.as_ptr() as u64) };
    let mut gates = [(0u8, 0u64); 256];
    for (v, g) in gates.iter_mut().enumerate() {
        let stub = if v < 32 {
            exceptions[v]
        } else {
            irqs + (v as u64 - 32) * 16
        };
        *g = (v as u8, stub);
    }
    gates
}

/// Turns on SYSCALL/SYSRET and the per-CPU pointer.
pub fn init() {
    let sel = cpu::selectors();
    // SAFETY: the per-CPU block and the kernel stack are statics of this
    // image; the MSRs below only take effect on the next SYSCALL, which
    // lands on `syscall_entry`, and the selectors satisfy SYSRET's layout
    // (checked by `Star::write`).
    unsafe {
        let p = &mut *PERCPU.0.get();
        p.kstack_top = KSTACK.top();
        GsBase::write(VirtAddr::new(PERCPU.0.get() as u64));
        KernelGsBase::write(VirtAddr::new(0));
        Star::write(
            sel.user_code,
            sel.user_data,
            sel.kernel_code,
            sel.kernel_data,
        )
        .expect("GDT order suits SYSRET");
        LStar::write(VirtAddr::new(syscall_entry as *const () as u64));
        SFMask::write(
            RFlags::INTERRUPT_FLAG
                | RFlags::TRAP_FLAG
                | RFlags::DIRECTION_FLAG
                | RFlags::ALIGNMENT_CHECK
                | RFlags::NESTED_TASK,
        );
        Efer::update(|f| f.insert(EferFlags::SYSTEM_CALL_EXTENSIONS));
    }
}

/// RFLAGS bits a domain may keep: arithmetic flags, TF, DF, AC. IF is
/// always set; IOPL, NT, RF, VM and the rest are always clear.
const USER_RFLAGS: u64 = 0x0000_0cd5 | 1 << 8 | 1 << 18;

/// Resumes the domain whose context is `ctx`: sets RSP0 and the per-CPU
/// pointer to it and restores its registers. The caller has loaded the
/// domain's page tables.
pub fn return_to_user(ctx: &mut UserContext) -> ! {
    let sel = cpu::selectors();
    ctx.cs = u64::from(sel.user_code.0);
    ctx.ss = u64::from(sel.user_data.0);
    ctx.rflags = (ctx.rflags & USER_RFLAGS) | RFlags::INTERRUPT_FLAG.bits() | 0x2;
    // SYSRET to a non-canonical RIP would fault in ring 0 on Intel CPUs;
    // domains cannot map that high, but never let it happen.
    if ctx.vector == SYSCALL_VECTOR && ctx.rip >= abi::domain::USER_TOP {
        ctx.vector = 0;
    }
    let end = ctx.end();
    cpu::set_rsp0(end);
    // SAFETY: one CPU, interrupts off: nothing else reads the per-CPU block
    // until the next entry from ring 3, which is what it is set up for.
    unsafe { (*PERCPU.0.get()).ctx_end = end };
    // SAFETY: `ctx` is a complete ring-3 context with user selectors and
    // sanitised RFLAGS; it lives in the domain's record, which outlives its
    // running (a domain's record is freed only after it stops running).
    unsafe { return_to_user_asm(ctx) }
}

/// Registers of an entry from ring 0, as `trap_common` leaves them.
#[repr(C)]
pub struct KernelFrame {
    pub gprs: [u64; 15],
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[no_mangle]
extern "C" fn kernel_trap(frame: &mut KernelFrame) {
    match frame.vector {
        v if v == u64::from(SPURIOUS_VECTOR) => {}
        v if (32..256).contains(&v) => crate::run::on_idle_interrupt(v as u8),
        _ => super::exceptions::fatal(frame),
    }
}

#[no_mangle]
extern "C" fn user_trap() -> ! {
    crate::run::on_user_entry()
}
