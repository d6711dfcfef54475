//! Descriptor tables: the GDT with its TSS, and the IDT.
//!
//! The IDT is our own 16-byte gate format because the `x86_64` crate's IDT
//! is typed around the nightly-only `x86-interrupt` ABI; our entry stubs are
//! plain assembly (see `trap.rs`).

use crate::sync::Once;
use core::cell::UnsafeCell;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::{lidt, load_tss};
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::structures::DescriptorTablePointer;
use x86_64::{PrivilegeLevel, VirtAddr};

/// IST slot (1-based in the gate, 0-based in the TSS) of the stack for
/// exceptions that may arrive on a bad stack: NMI, double fault, machine
/// check. Each is fatal here, so they share one.
pub const FATAL_IST: u16 = 1;
const IST_STACK_SIZE: usize = 16 * 1024;

static FATAL_STACK: super::Stack<IST_STACK_SIZE> = super::Stack::new();

/// The TSS: the CPU reads RSP0 from it on every entry from ring 3, and the
/// hypervisor points RSP0 at the running domain's saved-register area.
struct Tss(UnsafeCell<TaskStateSegment>);

// SAFETY: written only by `set_rsp0` on this CPU with interrupts off, and
// read by the CPU only on an entry from ring 3, which cannot happen while
// ring 0 runs.
unsafe impl Sync for Tss {}
// SAFETY: as above; the TSS holds only addresses.
unsafe impl Send for Tss {}

static TSS: Once<Tss> = Once::new();
static GDT: Once<(GlobalDescriptorTable, Selectors)> = Once::new();
static IDT: Once<Idt> = Once::new();

/// The GDT's selectors. The order kernel code, kernel data, user data,
/// user code is the one SYSCALL and SYSRET require (see `trap::init`).
#[derive(Clone, Copy)]
pub struct Selectors {
    pub kernel_code: SegmentSelector,
    pub kernel_data: SegmentSelector,
    pub user_data: SegmentSelector,
    pub user_code: SegmentSelector,
    pub tss: SegmentSelector,
}

pub fn selectors() -> Selectors {
    GDT.get().expect("GDT loaded").1
}

/// Sets the stack the CPU switches to on an entry from ring 3.
pub fn set_rsp0(top: u64) {
    let tss = TSS.get().expect("TSS loaded");
    // SAFETY: see `Tss`: one writer, interrupts off, and the CPU reads the
    // field only on the next entry from ring 3.
    unsafe { (*tss.0.get()).privilege_stack_table[0] = VirtAddr::new(top) };
}

/// Loads the GDT and TSS, and reloads the segment registers.
pub fn init_gdt() {
    let mut tss = TaskStateSegment::new();
    let fatal_stack = VirtAddr::new(FATAL_STACK.top());
    tss.interrupt_stack_table[usize::from(FATAL_IST - 1)] = fatal_stack;
    let tss = TSS.init(Tss(UnsafeCell::new(tss)));
    // SAFETY: the TSS lives in a static for ever; the descriptor needs only
    // its address and size, and only `set_rsp0` writes it afterwards.
    let tss_ref: &'static TaskStateSegment = unsafe { &*tss.0.get() };

    let mut gdt = GlobalDescriptorTable::new();
    let kernel_code = gdt.append(Descriptor::kernel_code_segment());
    let kernel_data = gdt.append(Descriptor::kernel_data_segment());
    let user_data = gdt.append(Descriptor::user_data_segment());
    let user_code = gdt.append(Descriptor::user_code_segment());
    let tss_sel = gdt.append(Descriptor::tss_segment(tss_ref));
    let sel = Selectors {
        kernel_code,
        kernel_data,
        user_data,
        user_code,
        tss: tss_sel,
    };
    let (gdt, sel) = GDT.init((gdt, sel));
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, which lives in a
    // static for ever; the TSS descriptor is a valid, unused TSS.
    unsafe {
        CS::set_reg(sel.kernel_code);
        DS::set_reg(sel.kernel_data);
        ES::set_reg(sel.kernel_data);
        SS::set_reg(sel.kernel_data);
        load_tss(sel.tss);
    }
}

/// One 16-byte interrupt gate.
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const MISSING: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    /// A present interrupt gate (interrupts stay off in the handler).
    fn interrupt(handler: u64, selector: SegmentSelector, ist: u16, dpl: PrivilegeLevel) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: selector.0,
            ist: ist as u8,
            type_attr: 0x80 | (dpl as u8) << 5 | 0xe,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

/// Loads an IDT with a gate for each `(vector, stub)` (see `trap.rs`).
pub fn init_idt(stubs: &[(u8, u64)]) {
    let sel = GDT.get().expect("GDT before IDT").1;
    let mut idt = Idt([Gate::MISSING; 256]);
    for &(vector, stub) in stubs {
        let ist = if matches!(vector, 2 | 8 | 18) {
            FATAL_IST
        } else {
            0
        };
        idt.0[usize::from(vector)] =
            Gate::interrupt(stub, sel.kernel_code, ist, PrivilegeLevel::Ring0);
    }
    let idt = IDT.init(idt);
    let ptr = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::from_ptr(idt as *const Idt),
    };
    // SAFETY: the IDT lives in a static for ever and every present gate
    // points at an entry stub in this image.
    unsafe { lidt(&ptr) };
}
