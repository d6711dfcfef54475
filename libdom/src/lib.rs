//! libdom: the ring-3 runtime every airlock domain links.
//!
//! A domain is a `#![no_std]` binary for `x86_64-unknown-none`, linked with
//! `libdom/domain.ld` at [`abi::domain::IMAGE_BASE`]. It names its main
//! function with [`entry!`]; libdom does the rest:
//!
//! - **Entry.** The hypervisor starts the domain in ring 3 at `_start` with
//!   RSP = [`abi::domain::STACK_TOP`], RDI = [`abi::domain::START_INFO_VA`],
//!   the other registers 0 and interrupts on. `_start` aligns the stack and
//!   calls the Rust entry, which decodes the start-info page
//!   ([`StartInfo::decode`]), gives the heap (`heap_start..heap_end`) to the
//!   global allocator, calls the domain's main and passes its return value
//!   to [`exit`].
//! - **Exit statuses.** What main returns; [`EXIT_PANIC`] (-2) after a
//!   panic, whose message and location go to the console first;
//!   [`EXIT_BAD_START_INFO`] (-3) when the start info does not decode. The
//!   hypervisor reports a domain ended by a fault with status -1.
//! - **Hypercalls** ([`hypercall`]): typed wrappers around `syscall`, each
//!   result decoded with [`abi::hypercall::decode`], plus
//!   [`raw_hypercall`] for tests that must pass what no wrapper would.
//! - **Console and events**: [`print!`], [`println!`], [`event`].
//! - **Waiting**: [`EventLoop`] hands out pending ports one by one around a
//!   blocking `wait`.
//! - **Arguments**: [`Args`] reads the manifest's `args` (`key=value` words).
//! - **Devices** ([`device`]): the devices the manifest assigns, their
//!   mapped BARs as [`device::Mmio`], config space through the mediating
//!   hypercalls, and page-aligned DMA buffers ([`device::DmaBuf`]) whose I/O
//!   address is the virtual one (static mode) or what `dma_map` returned
//!   (strict mode).
//! - **virtio** ([`virtio`]): virtio-drivers' `Hal` over those calls, a PCI
//!   transport over the mediated config space, and the wrapper that accepts
//!   VIRTIO_F_ACCESS_PLATFORM.
//!
//! On the host the crate builds too, so that a domain's logic can be tested
//! there: [`entry!`] then makes a `main` that says the binary runs only under
//! airlock, and every hypercall panics. `args`, `buf`, `ports` and the event
//! encoding are pure and host-tested.
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]

extern crate alloc;
#[cfg(not(target_os = "none"))]
extern crate std;

pub mod args;
pub mod blkfront;
pub mod buf;
pub mod console;
pub mod device;
pub mod grant;
pub mod hypercall;
pub mod netfront;
pub mod ports;
pub mod ring;
#[cfg(target_os = "none")]
mod rt;
pub mod virtio;

pub use abi::domain::StartInfo;
pub use abi::hypercall::Error;
pub use args::Args;
pub use console::event;
pub use hypercall::{
    console_write, dev_config_read, dev_config_write, dev_irq_bind, dma_map, dma_unmap,
    evtchn_alloc_unbound, evtchn_bind_interdomain, evtchn_bind_virq, evtchn_close, evtchn_send,
    exit, raw_hypercall, set_timer, time_ns, wait, yield_now,
};
pub use ports::{EventLoop, Pending};
/// The TCP/IP stack netfront plugs into, for domains to use the same version.
pub use smoltcp;

/// Exit status after a panic (the message was printed first).
pub const EXIT_PANIC: i64 = -2;
/// Exit status when the start-info page does not decode (or RDI did not
/// point at it).
pub const EXIT_BAD_START_INFO: i64 = -3;

/// Declares the domain's main function: `fn(&StartInfo) -> i64`, whose
/// return value becomes the exit status (0 is success).
///
/// ```text
/// #![cfg_attr(target_os = "none", no_std, no_main)]
/// fn run(si: &libdom::StartInfo) -> i64 { 0 }
/// libdom::entry!(run);
/// ```
///
/// Name the function anything but `main`: on the host the macro defines a
/// stub `main` of its own.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// Called by libdom's entry once the heap is ready.
        #[cfg(target_os = "none")]
        #[no_mangle]
        pub fn __libdom_main(si: &$crate::StartInfo<'static>) -> i64 {
            let main: fn(&$crate::StartInfo<'_>) -> i64 = $main;
            main(si)
        }

        #[cfg(not(target_os = "none"))]
        fn main() {
            let _main: fn(&$crate::StartInfo<'_>) -> i64 = $main;
            $crate::host_stub(env!("CARGO_BIN_NAME"))
        }
    };
}

/// What a domain binary does when run on the host: says so and fails.
#[cfg(not(target_os = "none"))]
pub fn host_stub(name: &str) -> ! {
    std::eprintln!(
        "{name} is an airlock domain: it runs in ring 3 under the hypervisor \
         (name it in a manifest and use `cargo xtask run`)"
    );
    std::process::exit(2)
}
