//! Everything that touches the x86-64 CPU directly.

pub mod cpu;
pub mod entry;
pub mod exceptions;
pub mod lapic;
pub mod paging;
pub mod trap;
pub mod tsc;

use x86_64::instructions::port::Port;

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
