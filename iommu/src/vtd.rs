//! Intel VT-d. For now only the register map and pure decoders of its capability registers;
//! the driver (root and context tables, second-level page tables, invalidation, fault log,
//! interrupt remapping) will grow here behind the crate's IOMMU trait.

pub mod regs;
