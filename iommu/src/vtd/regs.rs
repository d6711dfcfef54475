//! VT-d remapping unit registers: offsets from the unit's register base (the DRHD's
//! `register_base`), and pure decoders of the version and capability registers.
//!
//! Each offset is typed with its width. Access a [`Reg32`] only with 32-bit loads and stores:
//! QEMU 7.2 aborts on a 64-bit write to several 32-bit registers (fault status, fault event
//! control, ...). QEMU acts on a [`Reg64`] command register (CCMD, IOTLB) on a 64-bit write or
//! on the write of its high dword.
//!
//! Two register blocks have no fixed offset: the IOTLB invalidation pair sits at
//! `ECAP.IRO × 16` ([`Ecap::iva_offset`], [`Ecap::iotlb_offset`]) and the fault recording
//! registers at `CAP.FRO × 16` ([`Cap::fault_record_offset`]).

/// A 32-bit register at a byte offset from the register base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reg32(pub usize);

/// A 64-bit register at a byte offset from the register base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reg64(pub usize);

impl Reg32 {
    /// Byte offset from the register base.
    pub const fn offset(self) -> usize {
        self.0
    }
}

impl Reg64 {
    /// Byte offset from the register base.
    pub const fn offset(self) -> usize {
        self.0
    }
}

/// Version register (read-only).
pub const VER: Reg32 = Reg32(0x00);
/// Capability register (read-only); see [`Cap`].
pub const CAP: Reg64 = Reg64(0x08);
/// Extended capability register (read-only); see [`Ecap`].
pub const ECAP: Reg64 = Reg64(0x10);
/// Global command register (write-only); see [`gcmd`].
pub const GCMD: Reg32 = Reg32(0x18);
/// Global status register (read-only); see [`gsts`].
pub const GSTS: Reg32 = Reg32(0x1c);
/// Root table address register.
pub const RTADDR: Reg64 = Reg64(0x20);
/// Context command register (register-based context-cache invalidation).
pub const CCMD: Reg64 = Reg64(0x28);
/// Fault status register.
pub const FSTS: Reg32 = Reg32(0x34);
/// Fault event control register.
pub const FECTL: Reg32 = Reg32(0x38);
/// Fault event (MSI) data register.
pub const FEDATA: Reg32 = Reg32(0x3c);
/// Fault event (MSI) address register.
pub const FEADDR: Reg32 = Reg32(0x40);
/// Fault event (MSI) upper address register.
pub const FEUADDR: Reg32 = Reg32(0x44);
/// Advanced fault log register.
pub const AFLOG: Reg64 = Reg64(0x58);
/// Protected memory enable register.
pub const PMEN: Reg32 = Reg32(0x64);
/// Protected low-memory base register.
pub const PLMBASE: Reg32 = Reg32(0x68);
/// Protected low-memory limit register.
pub const PLMLIMIT: Reg32 = Reg32(0x6c);
/// Protected high-memory base register.
pub const PHMBASE: Reg64 = Reg64(0x70);
/// Protected high-memory limit register.
pub const PHMLIMIT: Reg64 = Reg64(0x78);
/// Invalidation queue head register.
pub const IQH: Reg64 = Reg64(0x80);
/// Invalidation queue tail register.
pub const IQT: Reg64 = Reg64(0x88);
/// Invalidation queue address register.
pub const IQA: Reg64 = Reg64(0x90);
/// Invalidation completion status register.
pub const ICS: Reg32 = Reg32(0x9c);
/// Invalidation event control register.
pub const IECTL: Reg32 = Reg32(0xa0);
/// Invalidation event data register.
pub const IEDATA: Reg32 = Reg32(0xa4);
/// Invalidation event address register.
pub const IEADDR: Reg32 = Reg32(0xa8);
/// Invalidation event upper address register.
pub const IEUADDR: Reg32 = Reg32(0xac);
/// Interrupt remapping table address register.
pub const IRTA: Reg64 = Reg64(0xb8);

/// Size of one fault recording register, in bytes (128 bits: the faulting page address in the
/// low quadword; source-id, reason, type and the F bit in the high quadword).
pub const FAULT_RECORD_BYTES: usize = 16;

/// Global command register bits (GCMD, write-only). GCMD has no memory of its own: to change
/// one command, write the persistent enables read back from GSTS ([`gsts::PERSISTENT`]) plus
/// the one bit, then poll GSTS for its status bit.
pub mod gcmd {
    /// Bit 31: translation enable.
    pub const TE: u32 = 1 << 31;
    /// Bit 30: set root table pointer (one-shot).
    pub const SRTP: u32 = 1 << 30;
    /// Bit 29: set fault log (one-shot).
    pub const SFL: u32 = 1 << 29;
    /// Bit 28: enable advanced fault logging.
    pub const EAFL: u32 = 1 << 28;
    /// Bit 27: write buffer flush (one-shot; needed only if CAP.RWBF).
    pub const WBF: u32 = 1 << 27;
    /// Bit 26: queued invalidation enable.
    pub const QIE: u32 = 1 << 26;
    /// Bit 25: interrupt remapping enable.
    pub const IRE: u32 = 1 << 25;
    /// Bit 24: set interrupt remap table pointer (one-shot).
    pub const SIRTP: u32 = 1 << 24;
    /// Bit 23: compatibility format interrupt (1 lets compatibility-format MSIs bypass
    /// interrupt remapping).
    pub const CFI: u32 = 1 << 23;
}

/// Global status register bits (GSTS), each the status of the GCMD bit at the same position.
pub mod gsts {
    /// Bit 31: translation enabled.
    pub const TES: u32 = 1 << 31;
    /// Bit 30: root table pointer set.
    pub const RTPS: u32 = 1 << 30;
    /// Bit 29: fault log pointer set.
    pub const FLS: u32 = 1 << 29;
    /// Bit 28: advanced fault logging enabled.
    pub const AFLS: u32 = 1 << 28;
    /// Bit 27: write buffer flush still in progress.
    pub const WBFS: u32 = 1 << 27;
    /// Bit 26: queued invalidation enabled.
    pub const QIES: u32 = 1 << 26;
    /// Bit 25: interrupt remapping enabled.
    pub const IRES: u32 = 1 << 25;
    /// Bit 24: interrupt remap table pointer set.
    pub const IRTPS: u32 = 1 << 24;
    /// Bit 23: compatibility format interrupts pass through.
    pub const CFIS: u32 = 1 << 23;
    /// The status bits of persistent enables, to carry into the next GCMD write; the
    /// one-shot statuses (RTPS, FLS, WBFS, IRTPS) must be left out of it.
    pub const PERSISTENT: u32 = TES | AFLS | QIES | IRES | CFIS;
}

/// Context command register bits (CCMD, 64-bit; register-based context-cache invalidation,
/// refused by QEMU once queued invalidation is on).
pub mod ccmd {
    /// Bit 63 ICC: invalidate; hardware clears it when the invalidation is done.
    pub const ICC: u64 = 1 << 63;
    /// Bits 62:61 CIRG: requested granularity, 1 global.
    pub const GLOBAL: u64 = 1 << 61;
    /// CIRG 2: domain-selective (DID in bits 15:0).
    pub const DOMAIN: u64 = 2 << 61;
    /// CIRG 3: device-selective (DID in bits 15:0, SID in bits 31:16, FM in bits 33:32).
    pub const DEVICE: u64 = 3 << 61;
    /// Bits 60:59 CAIG: the granularity hardware actually used.
    pub const CAIG_SHIFT: u32 = 59;
    /// Shift of the source-id field.
    pub const SID_SHIFT: u32 = 16;
    /// Shift of the function-mask field.
    pub const FM_SHIFT: u32 = 32;
}

/// IOTLB invalidate register bits (at [`Ecap::iotlb_offset`], 64-bit; refused by QEMU once
/// queued invalidation is on). Page-selective requests take the address and mask from the
/// invalidate address register ([`Ecap::iva_offset`]) written first.
pub mod iotlb {
    /// Bit 63 IVT: invalidate; hardware clears it when the invalidation is done.
    pub const IVT: u64 = 1 << 63;
    /// Bits 61:60 IIRG 1: global.
    pub const GLOBAL: u64 = 1 << 60;
    /// IIRG 2: domain-selective.
    pub const DOMAIN: u64 = 2 << 60;
    /// IIRG 3: page-selective within a domain.
    pub const PAGE: u64 = 3 << 60;
    /// Bits 58:57 IAIG: the granularity hardware actually used.
    pub const IAIG_SHIFT: u32 = 57;
    /// Bit 49 DR: drain reads.
    pub const DR: u64 = 1 << 49;
    /// Bit 48 DW: drain writes.
    pub const DW: u64 = 1 << 48;
    /// Shift of the domain-id field (bits 47:32).
    pub const DID_SHIFT: u32 = 32;
    /// Invalidate address register: bit 6 IH (leaf entries only changed); bits 5:0 AM
    /// (2^AM pages); bits 63:12 the address.
    pub const IVA_IH: u64 = 1 << 6;
}

/// Fault status register bits (FSTS, 32-bit: write it only with 32-bit stores).
pub mod fsts {
    /// Bit 0 PFO: primary fault overflow (write 1 to clear).
    pub const PFO: u32 = 1 << 0;
    /// Bit 1 PPF: primary fault pending (the OR of every record's F bit; read-only).
    pub const PPF: u32 = 1 << 1;
    /// Bit 4 IQE: invalidation queue error (write 1 to clear).
    pub const IQE: u32 = 1 << 4;
    /// Bit 5 ICE: invalidation completion error (write 1 to clear).
    pub const ICE: u32 = 1 << 5;
    /// Bit 6 ITE: invalidation time-out error (write 1 to clear).
    pub const ITE: u32 = 1 << 6;
    /// Bits 15:8 FRI: index of the first pending fault record.
    pub const fn fri(fsts: u32) -> u16 {
        ((fsts >> 8) & 0xff) as u16
    }
}

/// Fault event control register bits (FECTL, 32-bit).
pub mod fectl {
    /// Bit 31 IM: interrupt mask.
    pub const IM: u32 = 1 << 31;
    /// Bit 30 IP: interrupt pending.
    pub const IP: u32 = 1 << 30;
}

/// Fault recording register fields (128 bits; low quadword at +0, high at +8).
pub mod frcd {
    /// High quadword bit 63 F: a fault is recorded (write 1 to clear; clear it with a 32-bit
    /// store of bit 31 to the record's last dword, [`F_DWORD_OFFSET`]).
    pub const F: u64 = 1 << 63;
    /// High quadword bit 62 T: 1 read, 0 write (DMA faults only).
    pub const T: u64 = 1 << 62;
    /// Byte offset within a record of the dword that holds F (as its bit 31).
    pub const F_DWORD_OFFSET: usize = 12;
    /// F as seen in that dword.
    pub const F_DWORD: u32 = 1 << 31;
    /// Shift of the fault reason (high quadword bits 39:32).
    pub const FR_SHIFT: u32 = 32;
}

/// Invalidation queue address register (IQA) fields.
pub mod iqa {
    /// Bits 2:0 QS: the queue is 2^QS 4 KiB pages.
    pub const QS_MASK: u64 = 0x7;
    /// Bit 11 DW: 256-bit descriptors (scalable mode); airlock uses 128-bit ones (DW = 0).
    pub const DW: u64 = 1 << 11;
    /// Shift of the queue index in IQH and IQT for 128-bit descriptors (bits 18:4).
    pub const INDEX_SHIFT: u32 = 4;
}

/// Interrupt remapping table address register (IRTA) fields.
pub mod irta {
    /// Bits 3:0 S: the table has 2^(S + 1) entries.
    pub const S_MASK: u64 = 0xf;
    /// Bit 11 EIME: extended (x2APIC) interrupt mode; airlock uses xAPIC mode (0).
    pub const EIME: u64 = 1 << 11;
    /// The table address bits.
    pub const ADDR_MASK: u64 = !0xfff;
}

/// Invalidation completion status register (ICS, 32-bit) bit 0 IWC: a wait descriptor with
/// the interrupt flag completed.
pub const ICS_IWC: u32 = 1;

/// Implements single-bit accessors on a `u64` newtype.
macro_rules! flag_bits {
    ($( $(#[$doc:meta])* $name:ident = $bit:literal; )*) => {
        $( $(#[$doc])* pub const fn $name(self) -> bool { (self.0 >> $bit) & 1 != 0 } )*
    };
}

/// Implements multi-bit field accessors (`hi:lo`, inclusive) on a `u64` newtype.
macro_rules! field_bits {
    ($( $(#[$doc:meta])* $name:ident: $ty:ty = $hi:literal : $lo:literal; )*) => {
        $(
            $(#[$doc])*
            pub const fn $name(self) -> $ty {
                ((self.0 >> $lo) & ((1u64 << ($hi - $lo + 1)) - 1)) as $ty
            }
        )*
    };
}

/// The version register: architecture version major.minor (QEMU 7.2: 0x10, i.e. 1.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version(pub u32);

impl Version {
    /// Major version (bits 7:4).
    pub const fn major(self) -> u8 {
        ((self.0 >> 4) & 0xf) as u8
    }

    /// Minor version (bits 3:0).
    pub const fn minor(self) -> u8 {
        (self.0 & 0xf) as u8
    }
}

/// The capability register (CAP, offset 0x08). Accessors return fields as stored unless their
/// name gives a unit; the conversions are separate methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    field_bits! {
        /// Bits 2:0 ND: number of domain ids supported, encoded; see
        /// [`Cap::domains_supported`].
        nd: u8 = 2:0;
        /// Bits 12:8 SAGAW: supported second-level page-table depths, one bit each; see
        /// [`Cap::supported_levels`].
        sagaw: u8 = 12:8;
        /// Bits 21:16 MGAW: maximum guest address width, in bits, minus one; see
        /// [`Cap::mgaw_bits`].
        mgaw: u8 = 21:16;
        /// Bits 33:24 FRO: offset of the first fault recording register, in 16-byte units;
        /// see [`Cap::fault_record_offset`].
        fro: u16 = 33:24;
        /// Bits 37:34 SLLPS: second-level large pages supported: bit 0 2 MiB, bit 1 1 GiB,
        /// bit 2 512 GiB, bit 3 1 TiB.
        sllps: u8 = 37:34;
        /// Bits 47:40 NFR: number of fault recording registers, minus one; see
        /// [`Cap::fault_record_count`].
        nfr: u8 = 47:40;
        /// Bits 53:48 MAMV: largest address mask for a page-selective IOTLB invalidation: it
        /// can cover 2^MAMV 4 KiB pages at once.
        mamv: u8 = 53:48;
    }

    flag_bits! {
        /// Bit 3 AFL: advanced fault logging supported.
        afl = 3;
        /// Bit 4 RWBF: software must flush the write buffer (GCMD.WBF) after changing tables.
        rwbf = 4;
        /// Bit 5 PLMR: protected low-memory region supported.
        plmr = 5;
        /// Bit 6 PHMR: protected high-memory region supported.
        phmr = 6;
        /// Bit 7 CM: caching mode: not-present and erroneous entries may be cached, so making
        /// an entry present needs an invalidation too (QEMU `caching-mode=on`).
        cm = 7;
        /// Bit 22 ZLR: zero-length DMA reads to write-only pages are allowed.
        zlr = 22;
        /// Bit 39 PSI: page-selective IOTLB invalidation supported.
        psi = 39;
        /// Bit 54 DWD: write draining on IOTLB invalidation supported.
        dwd = 54;
        /// Bit 55 DRD: read draining on IOTLB invalidation supported.
        drd = 55;
        /// Bit 56 FL1GP: first-level 1 GiB pages supported.
        fl1gp = 56;
        /// Bit 59 PI: posted interrupts supported.
        pi = 59;
        /// Bit 60 FL5LP: first-level 5-level paging supported.
        fl5lp = 60;
        /// Bit 62 ESIRTPS: setting the interrupt remap table pointer also invalidates the
        /// interrupt entry cache.
        esirtps = 62;
        /// Bit 63 ESRTPS: setting the root table pointer also invalidates all translation
        /// caches.
        esrtps = 63;
    }

    /// Number of domain ids the unit supports: 2^(4 + 2 × ND) (ND = 6 gives 65536).
    pub const fn domains_supported(self) -> u32 {
        1 << (4 + 2 * self.nd() as u32)
    }

    /// Maximum guest address width, in bits (MGAW + 1).
    pub const fn mgaw_bits(self) -> u8 {
        self.mgaw() + 1
    }

    /// The second-level page-table depths the unit supports (from SAGAW).
    pub const fn supported_levels(self) -> SupportedLevels {
        SupportedLevels(self.sagaw())
    }

    /// Offset of the first fault recording register from the register base, in bytes
    /// (FRO × 16).
    pub const fn fault_record_offset(self) -> usize {
        self.fro() as usize * FAULT_RECORD_BYTES
    }

    /// Number of fault recording registers (NFR + 1).
    pub const fn fault_record_count(self) -> u16 {
        self.nfr() as u16 + 1
    }

    /// Offset of fault recording register `index` from the register base, in bytes, or
    /// `None` if the unit has no such register.
    pub const fn fault_record(self, index: u16) -> Option<usize> {
        if index < self.fault_record_count() {
            Some(self.fault_record_offset() + index as usize * FAULT_RECORD_BYTES)
        } else {
            None
        }
    }
}

/// The second-level page-table depths a unit supports, as the SAGAW bits: bit 1 3-level
/// (39-bit), bit 2 4-level (48-bit), bit 3 5-level (57-bit); bits 0 and 4 are reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SupportedLevels(pub u8);

impl SupportedLevels {
    /// Whether `levels`-deep tables (3, 4 or 5) are supported.
    pub const fn supports(self, levels: u8) -> bool {
        match levels {
            3..=5 => (self.0 >> (levels - 2)) & 1 != 0,
            _ => false,
        }
    }

    /// The deepest supported table, in levels, or `None` if SAGAW names none of 3, 4, 5.
    pub const fn max(self) -> Option<u8> {
        let mut levels = 5;
        while levels >= 3 {
            if self.supports(levels) {
                return Some(levels);
            }
            levels -= 1;
        }
        None
    }

    /// The supported depths in levels, shallowest first.
    pub fn iter(self) -> impl Iterator<Item = u8> {
        (3..=5).filter(move |&levels| self.supports(levels))
    }
}

/// Input address width a `levels`-deep second-level table translates, in bits:
/// 12 + 9 × levels (3 → 39, 4 → 48, 5 → 57).
pub const fn level_address_bits(levels: u8) -> u8 {
    12 + 9 * levels
}

/// The extended capability register (ECAP, offset 0x10). Accessors return fields as stored
/// unless their name gives a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ecap(pub u64);

impl Ecap {
    field_bits! {
        /// Bits 17:8 IRO: offset of the IOTLB register block, in 16-byte units; see
        /// [`Ecap::iva_offset`] and [`Ecap::iotlb_offset`].
        iro: u16 = 17:8;
        /// Bits 23:20 MHMV: largest handle mask for a selective interrupt entry cache
        /// invalidation.
        mhmv: u8 = 23:20;
        /// Bits 39:35 PSS: PASID size supported, in bits, minus one.
        pss: u8 = 39:35;
    }

    flag_bits! {
        /// Bit 0 C: coherent: the unit snoops its table reads. 0 under QEMU: flush CPU
        /// cache lines of table writes (or map tables uncached).
        c = 0;
        /// Bit 1 QI: queued invalidation supported.
        qi = 1;
        /// Bit 2 DT: device-TLB (ATS) supported.
        dt = 2;
        /// Bit 3 IR: interrupt remapping supported.
        ir = 3;
        /// Bit 4 EIM: extended (x2APIC) interrupt mode supported.
        eim = 4;
        /// Bit 6 PT: pass-through translation type supported.
        pt = 6;
        /// Bit 7 SC: snoop control supported.
        sc = 7;
        /// Bit 26 NEST: nested translation supported.
        nest = 26;
        /// Bit 29 PRS: page requests supported.
        prs = 29;
        /// Bit 30 ERS: execute requests supported.
        ers = 30;
        /// Bit 31 SRS: supervisor requests supported.
        srs = 31;
        /// Bit 33 NWFS: no write flag supported.
        nwfs = 33;
        /// Bit 34 EAFS: extended accessed flag supported.
        eafs = 34;
        /// Bit 40 PASID: process address space ids supported.
        pasid = 40;
        /// Bit 41 DIT: device-TLB invalidation throttling supported.
        dit = 41;
        /// Bit 42 PDS: page-request drain supported.
        pds = 42;
        /// Bit 43 SMTS: scalable-mode translation supported.
        smts = 43;
        /// Bit 44 VCS: virtual command supported.
        vcs = 44;
        /// Bit 45 SLADS: second-level accessed/dirty supported.
        slads = 45;
        /// Bit 46 SLTS: second-level translation supported (scalable mode).
        slts = 46;
        /// Bit 47 FLTS: first-level translation supported (scalable mode).
        flts = 47;
        /// Bit 48 SMPWCS: scalable-mode page-walk coherency supported.
        smpwcs = 48;
        /// Bit 49 RPS: RID_PASID supported.
        rps = 49;
    }

    /// Offset of the invalidate address register (IVA) from the register base, in bytes
    /// (IRO × 16).
    pub const fn iva_offset(self) -> usize {
        self.iro() as usize * 16
    }

    /// Offset of the IOTLB invalidate register from the register base, in bytes
    /// (IRO × 16 + 8; 0xf8 under QEMU).
    pub const fn iotlb_offset(self) -> usize {
        self.iva_offset() + 8
    }

    /// The invalidate address register.
    pub const fn iva(self) -> Reg64 {
        Reg64(self.iva_offset())
    }

    /// The IOTLB invalidate register.
    pub const fn iotlb(self) -> Reg64 {
        Reg64(self.iotlb_offset())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// CAP of QEMU 7.2's `intel-iommu` with default properties (read from 0xfed90008).
    const QEMU_CAP: u64 = 0x00d2_008c_2226_0206;

    /// CAP with `aw-bits=48`, derived from the layout: take QEMU_CAP, replace SAGAW (bits
    /// 12:8) 0b00010 with 0b00110 (3- and 4-level) and MGAW (bits 21:16) 38 (0x26) with 47
    /// (0x2f):
    ///   low 16 bits 0x0206 -> 0x0606 (bit 10 set);
    ///   bits 31:16 0x2226 -> (0x2226 & !0x3f) | 0x2f = 0x222f.
    /// So 0x00d2008c_222f0606, which is also what QEMU 7.2.22 reads back with
    /// `-device intel-iommu,intremap=on,aw-bits=48`.
    const QEMU_CAP_AW48: u64 = 0x00d2_008c_222f_0606;

    /// ECAP of QEMU 7.2's `intel-iommu,intremap=on` under TCG.
    const QEMU_ECAP: u64 = 0x00f0_0f4a;

    #[test]
    fn offsets_match_the_spec() {
        let r32 = [
            (VER, 0x00),
            (GCMD, 0x18),
            (GSTS, 0x1c),
            (FSTS, 0x34),
            (FECTL, 0x38),
            (FEDATA, 0x3c),
            (FEADDR, 0x40),
            (FEUADDR, 0x44),
            (PMEN, 0x64),
            (PLMBASE, 0x68),
            (PLMLIMIT, 0x6c),
            (ICS, 0x9c),
            (IECTL, 0xa0),
            (IEDATA, 0xa4),
            (IEADDR, 0xa8),
            (IEUADDR, 0xac),
        ];
        for (reg, offset) in r32 {
            assert_eq!(reg.offset(), offset);
        }
        let r64 = [
            (CAP, 0x08),
            (ECAP, 0x10),
            (RTADDR, 0x20),
            (CCMD, 0x28),
            (AFLOG, 0x58),
            (PHMBASE, 0x70),
            (PHMLIMIT, 0x78),
            (IQH, 0x80),
            (IQT, 0x88),
            (IQA, 0x90),
            (IRTA, 0xb8),
        ];
        for (reg, offset) in r64 {
            assert_eq!(reg.offset(), offset);
        }
    }

    #[test]
    fn decodes_qemu_version() {
        let v = Version(0x10);
        assert_eq!((v.major(), v.minor()), (1, 0));
    }

    #[test]
    fn decodes_qemu_default_cap() {
        let cap = Cap(QEMU_CAP);
        assert_eq!(cap.nd(), 6);
        assert_eq!(cap.domains_supported(), 65536);
        assert!(!cap.afl() && !cap.rwbf() && !cap.plmr() && !cap.phmr());
        assert!(!cap.cm());
        assert_eq!(cap.sagaw(), 0b00010);
        assert_eq!(cap.supported_levels().iter().collect::<Vec<_>>(), [3]);
        assert_eq!(cap.supported_levels().max(), Some(3));
        assert_eq!(cap.mgaw(), 38);
        assert_eq!(cap.mgaw_bits(), 39);
        assert!(!cap.zlr());
        assert_eq!(cap.fro(), 0x22);
        assert_eq!(cap.fault_record_offset(), 0x220);
        assert_eq!(cap.sllps(), 0b0011, "2 MiB and 1 GiB");
        assert!(cap.psi());
        assert_eq!(cap.nfr(), 0);
        assert_eq!(cap.fault_record_count(), 1);
        assert_eq!(cap.fault_record(0), Some(0x220));
        assert_eq!(cap.fault_record(1), None);
        assert_eq!(cap.mamv(), 18);
        assert!(cap.dwd() && cap.drd());
        assert!(!cap.fl1gp() && !cap.pi() && !cap.fl5lp());
        assert!(!cap.esirtps() && !cap.esrtps());
    }

    #[test]
    fn decodes_qemu_aw_bits_48_cap() {
        let derived = (QEMU_CAP & !(0x1f << 8) & !(0x3f << 16)) | (0b00110 << 8) | (47 << 16);
        assert_eq!(derived, QEMU_CAP_AW48);
        let cap = Cap(QEMU_CAP_AW48);
        assert_eq!(cap.sagaw(), 0b00110);
        assert_eq!(cap.mgaw(), 47);
        assert_eq!(cap.mgaw_bits(), 48);
        let levels = cap.supported_levels();
        assert_eq!(levels.iter().collect::<Vec<_>>(), [3, 4]);
        assert_eq!(levels.max(), Some(4));
        assert!(!levels.supports(5));
        assert_eq!(level_address_bits(4), 48);
        // Nothing else moved.
        assert_eq!(cap.fault_record_offset(), 0x220);
        assert_eq!(cap.nd(), 6);
        assert_eq!(cap.fault_record_count(), 1);
    }

    #[test]
    fn decodes_qemu_ecap() {
        let ecap = Ecap(QEMU_ECAP);
        assert!(!ecap.c());
        assert!(ecap.qi());
        assert!(!ecap.dt());
        assert!(ecap.ir());
        assert!(!ecap.eim());
        assert!(ecap.pt());
        assert!(!ecap.sc());
        assert_eq!(ecap.iro(), 0xf);
        assert_eq!(ecap.iva_offset(), 0xf0);
        assert_eq!(ecap.iotlb_offset(), 0xf8);
        assert_eq!(ecap.iotlb(), Reg64(0xf8));
        assert_eq!(ecap.iva(), Reg64(0xf0));
        assert_eq!(ecap.mhmv(), 0xf);
        assert_eq!(ecap.pss(), 0);
        assert!(!ecap.smts() && !ecap.pasid() && !ecap.nest() && !ecap.flts() && !ecap.slts());
    }

    #[test]
    fn each_flag_reads_its_own_bit() {
        type CapFlag = fn(Cap) -> bool;
        let cap_flags: [(CapFlag, u32); 14] = [
            (Cap::afl, 3),
            (Cap::rwbf, 4),
            (Cap::plmr, 5),
            (Cap::phmr, 6),
            (Cap::cm, 7),
            (Cap::zlr, 22),
            (Cap::psi, 39),
            (Cap::dwd, 54),
            (Cap::drd, 55),
            (Cap::fl1gp, 56),
            (Cap::pi, 59),
            (Cap::fl5lp, 60),
            (Cap::esirtps, 62),
            (Cap::esrtps, 63),
        ];
        for (flag, bit) in cap_flags {
            for other in 0..64 {
                assert_eq!(
                    flag(Cap(1 << other)),
                    other == bit,
                    "CAP bit {bit} vs {other}"
                );
            }
        }
        type EcapFlag = fn(Ecap) -> bool;
        let ecap_flags: [(EcapFlag, u32); 23] = [
            (Ecap::c, 0),
            (Ecap::qi, 1),
            (Ecap::dt, 2),
            (Ecap::ir, 3),
            (Ecap::eim, 4),
            (Ecap::pt, 6),
            (Ecap::sc, 7),
            (Ecap::nest, 26),
            (Ecap::prs, 29),
            (Ecap::ers, 30),
            (Ecap::srs, 31),
            (Ecap::nwfs, 33),
            (Ecap::eafs, 34),
            (Ecap::pasid, 40),
            (Ecap::dit, 41),
            (Ecap::pds, 42),
            (Ecap::smts, 43),
            (Ecap::vcs, 44),
            (Ecap::slads, 45),
            (Ecap::slts, 46),
            (Ecap::flts, 47),
            (Ecap::smpwcs, 48),
            (Ecap::rps, 49),
        ];
        for (flag, bit) in ecap_flags {
            for other in 0..64 {
                assert_eq!(
                    flag(Ecap(1 << other)),
                    other == bit,
                    "ECAP bit {bit} vs {other}"
                );
            }
        }
    }

    #[test]
    fn fields_take_their_whole_width() {
        let all = Cap(u64::MAX);
        assert_eq!(all.nd(), 7);
        assert_eq!(all.sagaw(), 0x1f);
        assert_eq!(all.mgaw(), 0x3f);
        assert_eq!(all.fro(), 0x3ff);
        assert_eq!(all.fault_record_offset(), 0x3ff0);
        assert_eq!(all.sllps(), 0xf);
        assert_eq!(all.nfr(), 0xff);
        assert_eq!(all.fault_record_count(), 256);
        assert_eq!(all.mamv(), 0x3f);
        assert_eq!(all.domains_supported(), 1 << 18);
        let all = Ecap(u64::MAX);
        assert_eq!(all.iro(), 0x3ff);
        assert_eq!(all.iotlb_offset(), 0x3ff8);
        assert_eq!(all.mhmv(), 0xf);
        assert_eq!(all.pss(), 0x1f);
    }

    #[test]
    fn levels_and_widths() {
        assert_eq!(
            SupportedLevels(0b01110).iter().collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert_eq!(SupportedLevels(0b01110).max(), Some(5));
        assert_eq!(SupportedLevels(0b10001).max(), None, "reserved bits only");
        assert!(!SupportedLevels(0xff).supports(2));
        assert!(!SupportedLevels(0xff).supports(6));
        assert_eq!(
            [3, 4, 5].map(level_address_bits),
            [39, 48, 57],
            "address bits per depth"
        );
    }

    #[test]
    fn status_bits() {
        assert_eq!(gsts::TES, 0x8000_0000);
        assert_eq!(gsts::RTPS, 0x4000_0000);
        assert_eq!(gsts::IRES, 0x0200_0000);
        assert_eq!(gsts::IRTPS, 0x0100_0000);
        assert_eq!(gsts::CFIS, 0x0080_0000);
        assert_eq!(gsts::PERSISTENT, 0x9680_0000);
        assert_eq!(gcmd::SRTP, gsts::RTPS);
        assert_eq!(gcmd::QIE, gsts::QIES);
    }
}
