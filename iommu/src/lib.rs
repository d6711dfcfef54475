//! airlock's IOMMU crate.
//!
//! This crate will hold the Intel VT-d and AMD-Vi drivers behind one trait (issue 4): the
//! hypervisor asks it to block every device, give a device an address space, map and unmap
//! pages with invalidation, read faults and program interrupt remapping, without knowing which
//! vendor's unit is underneath.
//!
//! What is here so far is the boot inventory, all pure logic tested on the host:
//!
//! - [`dmar`]: the ACPI DMAR table (VT-d units, their device scopes, reserved regions);
//! - [`ivrs`]: the ACPI IVRS table (AMD-Vi units and their device entries);
//! - [`vtd::regs`]: VT-d register offsets and decoders for VER, CAP and ECAP;
//! - [`Bdf`]: a PCI bus/device/function.
//!
//! The parsers borrow the table's bytes and need no heap. They treat the bytes as hostile:
//! every table is checked whole before anything is handed out, every problem is an error value
//! naming the byte offset, and nothing panics or indexes out of range (the crate denies
//! `clippy::indexing_slicing`, `unwrap` and `expect` outside tests).
//!
//! With the `test-utils` feature, [`fixtures`] builds the DMAR and IVRS tables QEMU 7.2 emits,
//! for other crates' host tests.

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_op_in_unsafe_fn)]
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

mod bytes;
pub mod dmar;
#[cfg(any(test, feature = "test-utils"))]
pub mod fixtures;
pub mod ivrs;
pub mod sdt;
pub mod vtd;

pub use abi::pci::Bdf;
