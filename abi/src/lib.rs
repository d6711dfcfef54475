//! airlock's one contract between ring 0, ring 3 and the host tools.
//!
//! Everything that crosses a boundary is defined here and nowhere else:
//! the `EV` console events ([`ev`]), the boot bundle that QEMU hands the
//! hypervisor as its initrd ([`bundle`]), and the compiled form of the
//! manifest ([`manifest`]). Hypercall numbers, grant and ring layouts join
//! them as the hypervisor grows.
//!
//! The crate is `no_std`, allocation-free and has no `unsafe`: every decoder
//! works on a byte slice and names the first thing that is wrong.
#![no_std]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;

pub mod blkif;
pub mod bundle;
pub mod crc32;
pub mod domain;
pub mod ev;
pub mod grant;
pub mod hypercall;
pub mod manifest;
pub mod netif;
pub mod pci;
pub mod ring;

/// What the hypervisor writes to QEMU's `isa-debug-exit` port.
///
/// QEMU exits with `(value << 1) | 1`, so a status of 0 is impossible; the
/// host tools map [`exit::QEMU_SUCCESS`] back to 0.
pub mod exit {
    /// I/O port of `-device isa-debug-exit,iobase=0xf4,iosize=0x04`.
    pub const PORT: u16 = 0xf4;
    /// Written when the system ends as its manifest says it should.
    pub const SUCCESS: u32 = 0x10;
    /// Written on a panic, an exception in ring 0, or a failed boot check.
    pub const FAILURE: u32 = 0x11;
    /// QEMU's exit status after [`SUCCESS`].
    pub const QEMU_SUCCESS: i32 = ((SUCCESS << 1) | 1) as i32;
    /// QEMU's exit status after [`FAILURE`].
    pub const QEMU_FAILURE: i32 = ((FAILURE << 1) | 1) as i32;
}
