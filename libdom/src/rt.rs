//! The domain's entry, heap and panic handler (built for the domain target
//! only; the host has its own).

use core::fmt::Write;
use core::panic::PanicInfo;

use abi::domain::{StartInfo, START_INFO_VA};
use linked_list_allocator::LockedHeap;

use crate::buf::FixedBuf;
use crate::hypercall::{console_write, exit};
use crate::{EXIT_BAD_START_INFO, EXIT_PANIC};

// The hypervisor enters here with RSP = STACK_TOP and RDI = START_INFO_VA.
// Clear the frame pointer (the end of any backtrace), align the stack to 16
// bytes as the ABI wants before a call, and call into Rust, which never
// returns; `ud2` would fault if it did.
core::arch::global_asm!(
    ".section .text._start, \"ax\", @progbits",
    ".global _start",
    ".type _start, @function",
    "_start:",
    "    xor ebp, ebp",
    "    and rsp, -16",
    "    call {start}",
    "    ud2",
    ".size _start, . - _start",
    ".text",
    start = sym start,
);

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

extern "Rust" {
    /// The domain's main, defined by `libdom::entry!`.
    fn __libdom_main(si: &StartInfo<'static>) -> i64;
}

extern "C" fn start(start_info: u64) -> ! {
    if start_info != START_INFO_VA {
        crate::println!("libdom: entered with RDI = {start_info:#x}, not the start info's address");
        exit(EXIT_BAD_START_INFO);
    }
    // SAFETY: the hypervisor maps the start-info page read-only at
    // START_INFO_VA for the domain's whole life (the entry protocol), and
    // nothing ever writes it, so a shared 'static view of it is sound.
    let page: &'static [u8] =
        unsafe { core::slice::from_raw_parts(START_INFO_VA as *const u8, 4096) };
    let si = match StartInfo::decode(page) {
        Ok(si) => si,
        Err(e) => {
            crate::println!("libdom: {e}");
            exit(EXIT_BAD_START_INFO)
        }
    };
    crate::device::set_dma_mode(si.dma);
    if si.heap_end > si.heap_start {
        // SAFETY: the start info says heap_start..heap_end is this domain's
        // own RW memory, which nothing else uses; it is handed over once,
        // before anything allocates.
        unsafe {
            HEAP.lock().init(
                si.heap_start as *mut u8,
                (si.heap_end - si.heap_start) as usize,
            );
        }
    }
    // SAFETY: `entry!` defines __libdom_main with exactly this signature.
    let status = unsafe { __libdom_main(&si) };
    exit(status)
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    let mut buf = [0u8; 512];
    let mut w = FixedBuf::new(&mut buf);
    let _ = w.write_str("panic");
    if let Some(l) = info.location() {
        let _ = write!(w, " at {}:{}:{}", l.file(), l.line(), l.column());
    }
    let _ = write!(w, ": {}", info.message());
    w.end_with(b'\n');
    let _ = console_write(w.as_str().as_bytes());
    exit(EXIT_PANIC)
}
