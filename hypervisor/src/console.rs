//! The serial console (COM1). Only the hypervisor writes it: human log lines
//! and `EV` event lines (see `abi::ev`).

use crate::sync::Lock;
use core::fmt::{self, Write};
use x86_64::instructions::port::Port;

const COM1: u16 = 0x3f8;

struct Serial {
    ready: bool,
}

impl Serial {
    fn init(&mut self) {
        let regs = |off: u16| Port::<u8>::new(COM1 + off);
        // SAFETY: COM1's registers; programming the UART has no effect on
        // memory. 115200 baud (divisor 1), 8N1, FIFOs on, interrupts off.
        unsafe {
            regs(1).write(0x00);
            regs(3).write(0x80);
            regs(0).write(0x01);
            regs(1).write(0x00);
            regs(3).write(0x03);
            regs(2).write(0xc7);
            regs(4).write(0x03);
        }
        self.ready = true;
    }

    fn put(&mut self, byte: u8) {
        let mut lsr = Port::<u8>::new(COM1 + 5);
        let mut data = Port::<u8>::new(COM1);
        // SAFETY: reading the line status and writing the data register of
        // COM1 touch only the UART.
        unsafe {
            while lsr.read() & 0x20 == 0 {
                core::hint::spin_loop();
            }
            data.write(byte);
        }
    }
}

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

static SERIAL: Lock<Serial> = Lock::new(Serial { ready: false });

pub fn init() {
    SERIAL.lock().init();
}

/// Writes formatted text as it is.
pub fn write_fmt(args: fmt::Arguments<'_>) {
    let mut s = SERIAL.lock();
    if !s.ready {
        s.init();
    }
    let _ = s.write_fmt(args);
}

/// Writes one `EV {...}` line for an event of ring 0's own.
pub fn event<E: abi::ev::Event>(event: &E) {
    let mut s = SERIAL.lock();
    if !s.ready {
        s.init();
    }
    let _ = abi::ev::write_line(&mut *s, event, None);
    let _ = s.write_str("\n");
}

/// A human log line from the hypervisor: `[airlock] ...`.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::console::write_fmt(format_args!("[airlock] {}\n", format_args!($($arg)*)))
    };
}

/// Writes without taking the lock: for the panic and exception paths, which
/// may have interrupted a holder of it. Ring 0 is stopping either way.
pub fn emergency_write(args: fmt::Arguments<'_>) {
    let mut s = Serial { ready: true };
    let _ = s.write_fmt(args);
}

/// [`event`] for the panic and exception paths (see [`emergency_write`]).
pub fn emergency_event<E: abi::ev::Event>(event: &E) {
    let mut s = Serial { ready: true };
    let _ = abi::ev::write_line(&mut s, event, None);
    let _ = s.write_str("\n");
}
