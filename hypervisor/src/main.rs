//! The airlock hypervisor image.
//!
//! Built for `x86_64-unknown-none` by `cargo xtask`; QEMU boots it through
//! its Xen PVH note. On the host this file builds to a stub so that the
//! workspace's default members build and test there; the testable logic is
//! in the library half of this crate (`src/lib.rs`).
#![cfg_attr(target_os = "none", no_std, no_main)]
#![forbid(unsafe_op_in_unsafe_fn)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod acpi;
#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
mod console;
#[cfg(target_os = "none")]
mod domain;
#[cfg(target_os = "none")]
mod grants_hw;
#[cfg(target_os = "none")]
mod hypercall;
#[cfg(target_os = "none")]
mod iommu_hw;
#[cfg(target_os = "none")]
mod iommu_units;
#[cfg(target_os = "none")]
mod mm;
#[cfg(target_os = "none")]
mod passthrough;
#[cfg(target_os = "none")]
mod pci;
#[cfg(target_os = "none")]
mod run;
#[cfg(target_os = "none")]
mod sync;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the hypervisor runs under QEMU: build and boot it with `cargo xtask run`");
    std::process::exit(2);
}
