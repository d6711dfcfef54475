//! Everything that touches the x86-64 CPU directly.

pub mod cpu;
pub mod entry;
pub mod exceptions;
pub mod lapic;
pub mod paging;
pub mod trap;
pub mod tsc;

use core::cell::UnsafeCell;
use x86_64::instructions::port::Port;

/// A stack the CPU switches to (kernel stack, IST stacks). Interior
/// mutability keeps it out of read-only memory.
#[repr(C, align(16))]
pub struct Stack<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: a stack is only ever used by the CPU that switches to it, through
// RSP; Rust code never reads or writes it as data.
unsafe impl<const N: usize> Sync for Stack<N> {}

impl<const N: usize> Stack<N> {
    pub const fn new() -> Self {
        Stack(UnsafeCell::new([0; N]))
    }

    /// One past the highest byte: the initial stack pointer.
    pub fn top(&self) -> u64 {
        self.0.get() as u64 + N as u64
    }
}

/// Stops QEMU through `isa-debug-exit` with `value` (see `abi::exit`); if
/// the device is missing, halts for ever.
pub fn exit_qemu(value: u32) -> ! {
    let mut port = Port::<u32>::new(abi::exit::PORT);
    // SAFETY: the port belongs to isa-debug-exit, which has no other effect
    // than ending QEMU; on a machine without it the write goes nowhere.
    unsafe { port.write(value) };
    halt_forever()
}

pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
