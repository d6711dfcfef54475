//! Descriptor tables: the GDT with its TSS, and the IDT.
//!
//! The IDT is our own 16-byte gate format because the `x86_64` crate's IDT
//! is typed around the nightly-only `x86-interrupt` ABI; our entry stubs are
//! plain assembly (see `exceptions.rs`).

use crate::sync::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::{lidt, load_tss};
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::structures::DescriptorTablePointer;
use x86_64::{PrivilegeLevel, VirtAddr};

/// IST slot (1-based in the gate, 0-based in the TSS) of the double-fault stack.
pub const DOUBLE_FAULT_IST: u16 = 1;
const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(align(16))]
struct Stack([u8; IST_STACK_SIZE]);
static DOUBLE_FAULT_STACK: Stack = Stack([0; IST_STACK_SIZE]);

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(GlobalDescriptorTable, Selectors)> = Once::new();
static IDT: Once<Idt> = Once::new();

#[derive(Clone, Copy)]
pub struct Selectors {
    pub kernel_code: SegmentSelector,
    pub kernel_data: SegmentSelector,
    pub tss: SegmentSelector,
}

/// Loads the GDT and TSS, and reloads the segment registers.
pub fn init_gdt() {
    let mut tss = TaskStateSegment::new();
    let df_stack = VirtAddr::from_ptr(DOUBLE_FAULT_STACK.0.as_ptr()) + IST_STACK_SIZE as u64;
    tss.interrupt_stack_table[usize::from(DOUBLE_FAULT_IST - 1)] = df_stack;
    let tss = TSS.init(tss);

    let mut gdt = GlobalDescriptorTable::new();
    let kernel_code = gdt.append(Descriptor::kernel_code_segment());
    let kernel_data = gdt.append(Descriptor::kernel_data_segment());
    let tss_sel = gdt.append(Descriptor::tss_segment(tss));
    let (gdt, sel) = GDT.init((
        gdt,
        Selectors {
            kernel_code,
            kernel_data,
            tss: tss_sel,
        },
    ));
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

/// Loads an IDT whose first 32 gates go to `stubs` (see `exceptions.rs`).
pub fn init_idt(stubs: &[u64; 32]) {
    let sel = GDT.get().expect("GDT before IDT").1;
    let mut idt = Idt([Gate::MISSING; 256]);
    for (vector, &stub) in stubs.iter().enumerate() {
        let ist = if vector == 8 { DOUBLE_FAULT_IST } else { 0 };
        idt.0[vector] = Gate::interrupt(stub, sel.kernel_code, ist, PrivilegeLevel::Ring0);
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
