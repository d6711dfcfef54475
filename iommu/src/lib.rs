//! airlock's IOMMU crate.
//!
//! The hypervisor drives every remapping unit through one trait, [`Iommu`]: create an I/O
//! address space (a domain), map and unmap pages in it with the invalidations the hardware
//! needs, attach PCI functions to it, detach them, and read and clear the fault log, without
//! knowing which vendor's unit is underneath. Intel VT-d ([`vtd::Vtd`]) implements it; AMD-Vi
//! will be the second implementation. Default deny: a function nobody attached has no entry,
//! and all its DMA faults.
//!
//! The drivers touch neither memory nor registers themselves: table frames come through
//! [`TableMemory`] and registers through [`vtd::Regs`], both implemented by the hypervisor. So
//! the crate has no `unsafe` and allocates nothing, and it is tested on the host against
//! models of the hardware: [`vtd::walk`] translates a request exactly as a VT-d unit walks
//! the tables (the tables are checked page by page against it), and `vtd::fake` (feature
//! `test-utils`) behaves like QEMU 7.2's unit at the register level.
//!
//! Also here, the boot inventory:
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
//! With the `test-utils` feature, `fixtures` builds the DMAR and IVRS tables QEMU 7.2 emits,
//! and `vtd::fake` provides the fake unit, for other crates' host tests.

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

// Only the fake unit (tests and `test-utils`) keeps state on the heap; the drivers and
// tables allocate nothing.
#[cfg(any(test, feature = "test-utils"))]
extern crate alloc;

pub mod api;
mod bytes;
pub mod dmar;
#[cfg(any(test, feature = "test-utils"))]
pub mod fixtures;
pub mod ivrs;
pub mod sdt;
pub mod vtd;

pub use abi::pci::Bdf;
pub use api::{
    Access, Attachment, Change, DomainId, Error, FaultRecord, FaultSummary, FrameSource, Iommu,
    NoFrames, Perm, TableMemory, FRAME_BLOCK, PAGE_SIZE,
};
