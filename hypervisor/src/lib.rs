//! The hypervisor's logic that needs no hardware: it is built into the
//! kernel and tested on the host. Hardware access lives in the binary
//! (`src/main.rs` and `src/arch/`), behind `SAFETY:` comments.
#![no_std]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;

pub mod frames;
pub mod layout;
pub mod pci_class;
pub mod pvh;
