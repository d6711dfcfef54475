//! Intel VT-d: the register map and capability decoders ([`regs`]), the legacy-mode
//! translation tables ([`tables`]), invalidation requests ([`inv`]), fault records
//! ([`fault`]), the unit driver behind the crate's [`crate::Iommu`] trait ([`Vtd`]), and a
//! model of the hardware's translation ([`walk`]) that the host tests check the tables
//! against. With the `test-utils` feature, `fake` is a register-level model of QEMU's unit.

#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
pub mod fault;
pub mod inv;
pub mod regs;
pub mod tables;
mod unit;
pub mod walk;

pub use fault::FaultReason;
pub use inv::{Invalidation, InvalidationCounts};
pub use unit::{
    remappable_msi, Config, InvalidationMode, Irte, Msi, Regs, Vtd, POLL_LIMIT, QUEUE_ENTRIES,
};

#[cfg(test)]
mod tests;
