//! The hypervisor's logic that needs no hardware: it is built into the
//! kernel and tested on the host. Hardware access lives in the binary
//! (`src/main.rs` and `src/arch/`), behind `SAFETY:` comments.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod dma;
pub mod domev;
pub mod elf;
pub mod evtchn;
pub mod frames;
pub mod grant;
pub mod layout;
pub mod pci_class;
pub mod pcicfg;
pub mod policy;
pub mod pvh;
pub mod sched;
pub mod uaccess;

/// A domain's id: its index in the hypervisor's domain table (the same
/// `u16` that `abi::domain::StartInfo::domid` carries).
pub type DomId = u16;

/// The most domains the scheduler and the event-channel table track; ids
/// run from 0 to `MAX_DOMAINS - 1`.
pub const MAX_DOMAINS: usize = 64;
