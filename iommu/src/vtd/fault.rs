//! VT-d fault reasons and the decoding of a fault recording register.
//!
//! A record is 128 bits: the low quadword holds the faulting page address (bits 63:12); the
//! high quadword the source-id (bits 15:0), the fault reason (bits 39:32), the type T (bit 62:
//! 1 read, 0 write) and F (bit 63: the record is valid).

use super::regs::frcd;
use crate::api::{Access, FaultRecord};
use crate::Bdf;

/// A VT-d fault reason code (the FR field of a fault record), with the names of the
/// legacy-mode (non-scalable) DMA-remapping and interrupt-remapping conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FaultReason(pub u8);

impl FaultReason {
    /// The root entry for the request's bus has P = 0.
    pub const ROOT_NOT_PRESENT: Self = Self(0x1);
    /// The context entry for the request's device and function has P = 0: the function was
    /// never attached (default deny).
    pub const CONTEXT_NOT_PRESENT: Self = Self(0x2);
    /// A present context entry is programmed wrongly (unsupported AW or translation type).
    pub const CONTEXT_INVALID: Self = Self(0x3);
    /// The input address is above what the domain's tables (or the unit's MGAW) translate.
    pub const ADDRESS_BEYOND_WIDTH: Self = Self(0x4);
    /// A write to a page without W (including a not-present page).
    pub const WRITE_DENIED: Self = Self(0x5);
    /// A read from a page without R (including a not-present page).
    pub const READ_DENIED: Self = Self(0x6);
    /// The unit could not read a second-level paging entry.
    pub const PAGING_ENTRY_ACCESS: Self = Self(0x7);
    /// The unit could not read the root entry.
    pub const ROOT_TABLE_ACCESS: Self = Self(0x8);
    /// The unit could not read the context entry.
    pub const CONTEXT_TABLE_ACCESS: Self = Self(0x9);
    /// Reserved bits set in a present root entry.
    pub const ROOT_RESERVED: Self = Self(0xa);
    /// Reserved bits set in a present context entry.
    pub const CONTEXT_RESERVED: Self = Self(0xb);
    /// Reserved bits set in a second-level paging entry with R or W set.
    pub const PAGING_RESERVED: Self = Self(0xc);
    /// The context entry's translation type blocks this kind of request.
    pub const TRANSLATION_BLOCKED: Self = Self(0xd);
    /// Reserved bits set in a remappable interrupt request.
    pub const IR_REQUEST_RESERVED: Self = Self(0x20);
    /// The interrupt index is beyond the interrupt-remapping table.
    pub const IR_INDEX_BEYOND: Self = Self(0x21);
    /// The interrupt-remapping entry has P = 0.
    pub const IR_NOT_PRESENT: Self = Self(0x22);
    /// The unit could not read the interrupt-remapping entry.
    pub const IR_TABLE_ACCESS: Self = Self(0x23);
    /// Reserved bits set in a present interrupt-remapping entry.
    pub const IR_ENTRY_RESERVED: Self = Self(0x24);
    /// A compatibility-format interrupt while those are blocked (GSTS.CFIS clear).
    pub const IR_COMPAT_BLOCKED: Self = Self(0x25);
    /// The request's source-id fails the entry's source validation.
    pub const IR_SOURCE_INVALID: Self = Self(0x26);
    /// The unit could not read a posted-interrupt descriptor.
    pub const IR_POSTED_DESCRIPTOR_ACCESS: Self = Self(0x27);

    /// A short name for the `iommu_fault` event; "reserved" for codes the spec does not
    /// define, "scalable-mode" for the scalable-mode conditions (0x30 and up), which
    /// airlock's legacy-mode tables never produce.
    pub const fn name(self) -> &'static str {
        match self.0 {
            0x1 => "root-not-present",
            0x2 => "context-not-present",
            0x3 => "context-invalid",
            0x4 => "address-beyond-width",
            0x5 => "write-denied",
            0x6 => "read-denied",
            0x7 => "paging-entry-access",
            0x8 => "root-table-access",
            0x9 => "context-table-access",
            0xa => "root-reserved-bits",
            0xb => "context-reserved-bits",
            0xc => "paging-reserved-bits",
            0xd => "translation-blocked",
            0x20 => "ir-request-reserved-bits",
            0x21 => "ir-index-beyond-table",
            0x22 => "ir-entry-not-present",
            0x23 => "ir-table-access",
            0x24 => "ir-entry-reserved-bits",
            0x25 => "ir-compat-blocked",
            0x26 => "ir-source-invalid",
            0x27 => "ir-posted-descriptor-access",
            0x30..=0xff => "scalable-mode",
            _ => "reserved",
        }
    }

    /// Whether this is an interrupt-remapping fault (the record's address then holds the
    /// interrupt index in bits 63:48).
    pub const fn is_interrupt(self) -> bool {
        matches!(self.0, 0x20..=0x2f)
    }
}

/// Decodes fault recording register `index` from its low and high quadwords.
pub fn decode_record(index: u16, lo: u64, hi: u64) -> FaultRecord {
    let reason = FaultReason((hi >> frcd::FR_SHIFT) as u8);
    FaultRecord {
        index,
        source: Bdf::from_rid(hi as u16),
        addr: lo & !0xfff,
        access: if hi & frcd::T != 0 {
            Access::Read
        } else {
            Access::Write
        },
        reason: reason.0,
        reason_name: reason.name(),
        raw: [lo, hi],
    }
}

/// The high quadword of a valid record (F set) with these fields, as a unit writes it.
pub const fn record_hi(source: Bdf, reason: FaultReason, access: Access) -> u64 {
    let t = match access {
        Access::Read => frcd::T,
        Access::Write => 0,
    };
    frcd::F | t | (reason.0 as u64) << frcd::FR_SHIFT | source.rid() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_qemu_context_fault() {
        // What QEMU 7.2 records for a DMA write from 00:03.0 to 0x7f123 with no context
        // entry: F, T = 0 (write), FR = 2, SID 0x18; FI = the page.
        let hi = record_hi(
            Bdf::new(0, 3, 0),
            FaultReason::CONTEXT_NOT_PRESENT,
            Access::Write,
        );
        assert_eq!(hi, 0x8000_0002_0000_0018);
        let r = decode_record(0, 0x7f000, hi);
        assert_eq!(r.source, Bdf::new(0, 3, 0));
        assert_eq!(r.addr, 0x7f000);
        assert_eq!(r.access, Access::Write);
        assert_eq!((r.reason, r.reason_name), (2, "context-not-present"));
        assert_eq!(r.raw, [0x7f000, hi]);
    }

    #[test]
    fn read_type_and_every_reason_has_a_name() {
        let hi = record_hi(Bdf::new(1, 2, 3), FaultReason::READ_DENIED, Access::Read);
        let r = decode_record(3, 0xdead_b000, hi);
        assert_eq!(r.access, Access::Read);
        assert_eq!(r.source, Bdf::new(1, 2, 3));
        assert_eq!(r.reason_name, "read-denied");
        assert_eq!(r.index, 3);
        for code in (0x1..=0xd).chain(0x20..=0x27) {
            let name = FaultReason(code).name();
            assert!(name != "reserved" && name != "scalable-mode", "{code:#x}");
        }
        assert_eq!(FaultReason(0).name(), "reserved");
        assert_eq!(FaultReason(0xe).name(), "reserved");
        assert_eq!(FaultReason(0x31).name(), "scalable-mode");
        assert!(FaultReason::IR_SOURCE_INVALID.is_interrupt());
        assert!(!FaultReason::WRITE_DENIED.is_interrupt());
    }
}
