//! Host tests: the tables against the walk model, and the driver against the fake unit.

use super::fake::{FakePlatform, FakeRegs, CAP_CM, QEMU_CAP, QEMU_CAP_AW48, QEMU_ECAP};
use super::regs::{self, fsts, gcmd, gsts, Cap, Ecap};
use super::tables::{MapFailed, Tables};
use super::walk::{UnitMemory, UnitModel};
use super::*;
use crate::api::{Access, Attachment, Error, Iommu, Perm, TableMemory};
use crate::Bdf;
use std::collections::BTreeMap;
use std::vec::Vec;

const MIB: u64 = 1 << 20;
const BLK: Bdf = Bdf::new(0, 3, 0);
const NET: Bdf = Bdf::new(0, 4, 0);
const EDU: Bdf = Bdf::new(0, 5, 0);
const OTHER_BUS: Bdf = Bdf::new(2, 0, 0);

fn model(cap: u64) -> UnitModel {
    UnitModel {
        cap: Cap(cap),
        ecap: Ecap(QEMU_ECAP),
    }
}

/// Tables on non-coherent fake memory (the unit sees only flushed lines).
fn tables(cap: u64) -> (FakePlatform, Tables) {
    let (mut mem, _regs) = FakePlatform::new(cap, QEMU_ECAP);
    let tables = Tables::new(&mut mem, Cap(cap), Ecap(QEMU_ECAP)).unwrap();
    (mem, tables)
}

fn translate(
    mem: &FakePlatform,
    tables: &Tables,
    cap: u64,
    source: Bdf,
    iova: u64,
    access: Access,
) -> Result<u64, FaultReason> {
    model(cap)
        .translate(&mem.unit_memory(), tables.root(), source, iova, access)
        .map(|t| t.pa)
}

// ---------------------------------------------------------------- tables against the model

#[test]
fn default_deny_every_function_without_a_context_entry_faults() {
    let (mut mem, mut t) = tables(QEMU_CAP);
    for bdf in [BLK, NET, EDU, OTHER_BUS] {
        assert_eq!(
            translate(&mem, &t, QEMU_CAP, bdf, 0x1000, Access::Read),
            Err(FaultReason::ROOT_NOT_PRESENT)
        );
        assert_eq!(t.context_entry(&mut mem, bdf), None);
    }
    t.add_domain(&mut mem, 1, 3).unwrap();
    t.map(&mut mem, 1, 0, 0x80_0000, 16 * MIB, Perm::READ_WRITE)
        .unwrap();
    t.attach(&mut mem, BLK, 1).unwrap();
    assert_eq!(
        translate(&mem, &t, QEMU_CAP, BLK, 0x1234, Access::Write),
        Ok(0x80_1234)
    );
    // Same bus, not attached: the reason QEMU records (2).
    for bdf in [NET, EDU, Bdf::new(0, 3, 1)] {
        for access in [Access::Read, Access::Write] {
            assert_eq!(
                translate(&mem, &t, QEMU_CAP, bdf, 0x1234, access),
                Err(FaultReason::CONTEXT_NOT_PRESENT)
            );
        }
        assert_eq!(t.context_entry(&mut mem, bdf), None);
    }
    assert_eq!(
        translate(&mem, &t, QEMU_CAP, OTHER_BUS, 0, Access::Read),
        Err(FaultReason::ROOT_NOT_PRESENT)
    );
}

#[test]
fn context_entry_reads_back() {
    let (mut mem, mut t) = tables(QEMU_CAP_AW48);
    t.add_domain(&mut mem, 7, 4).unwrap();
    t.add_domain(&mut mem, 8, 3).unwrap();
    assert!(t.attach(&mut mem, NET, 7).unwrap());
    assert!(!t.attach(&mut mem, NET, 7).unwrap(), "again: no change");
    assert_eq!(
        t.attach(&mut mem, NET, 8),
        Err(Error::AttachedElsewhere { bdf: NET, did: 7 })
    );
    t.attach(&mut mem, OTHER_BUS, 8).unwrap();
    let d7 = t.domain(7).unwrap();
    assert_eq!(
        t.context_entry(&mut mem, NET),
        Some(Attachment {
            did: 7,
            levels: 4,
            table: d7.table
        })
    );
    assert_eq!(t.context_entry(&mut mem, OTHER_BUS).unwrap().levels, 3);
    assert_eq!(d7.attached, 1);
    // The model agrees: present, DID 7, 4 levels, FPD clear, TT 0.
    let ctx = model(QEMU_CAP_AW48)
        .context(&mem.unit_memory(), t.root(), NET)
        .unwrap();
    assert_eq!((ctx.did, ctx.levels, ctx.table), (7, 4, d7.table));
    assert!(!ctx.fpd && !ctx.pass_through);
    assert_eq!(t.detach(&mut mem, NET), Ok(7));
    assert_eq!(t.detach(&mut mem, NET), Err(Error::NotAttached(NET)));
    assert_eq!(t.context_entry(&mut mem, NET), None);
    assert_eq!(
        translate(&mem, &t, QEMU_CAP_AW48, NET, 0, Access::Read),
        Err(FaultReason::CONTEXT_NOT_PRESENT)
    );
    assert_eq!(t.domain(7).unwrap().attached, 0);
}

/// Maps a mix of ranges into a domain, then checks every 4 KiB page of the first 10 MiB
/// (plus probes far away) against a reference map, for reads and writes.
fn check_against_reference(cap: u64, levels: u8) {
    let (mut mem, mut t) = tables(cap);
    t.add_domain(&mut mem, 3, levels).unwrap();
    t.attach(&mut mem, EDU, 3).unwrap();
    let ranges = [
        // (iova, pa, len, perm)
        (0x0, 0x4000_0000, 0x3000, Perm::READ_WRITE),
        (0x5000, 0x7000, 0x1000, Perm::READ),
        (0x6000, 0x9000, 0x1000, Perm::WRITE),
        (0x20_0000, 0x60_0000, 4 * MIB, Perm::READ_WRITE), // 2 MiB pages
        (0x70_0000, 0x1_2345_6000, 0x2_0000, Perm::READ),  // unaligned pa: 4 KiB pages
        (0x80_0000, 0xa0_0000, 2 * MIB + 0x1000, Perm::READ_WRITE), // 2 MiB + one 4 KiB
    ];
    let mut reference = BTreeMap::new();
    for (iova, pa, len, perm) in ranges {
        t.map(&mut mem, 3, iova, pa, len, perm).unwrap();
        for off in (0..len).step_by(4096) {
            reference.insert(iova + off, (pa + off, perm));
        }
    }
    let far = [1u64 << 30, (1 << 39) - 4096];
    for page in (0..10 * MIB).step_by(4096).chain(far) {
        for access in [Access::Read, Access::Write] {
            let got = translate(&mem, &t, cap, EDU, page + 0x18, access);
            let want = match reference.get(&page) {
                Some(&(pa, perm)) if perm.allows(access) => Ok(pa + 0x18),
                _ if access == Access::Read => Err(FaultReason::READ_DENIED),
                _ => Err(FaultReason::WRITE_DENIED),
            };
            assert_eq!(got, want, "{page:#x} {access:?}");
        }
    }
    // Large pages where both sides are 2 MiB-aligned, small ones elsewhere.
    let m = model(cap);
    let ctx = m.context(&mem.unit_memory(), t.root(), EDU).unwrap();
    let size = |iova| {
        m.walk(&mem.unit_memory(), &ctx, iova, Access::Read)
            .unwrap()
            .page_bytes
    };
    assert_eq!(size(0x20_0000), 2 * MIB);
    assert_eq!(size(0x40_0000), 2 * MIB);
    assert_eq!(size(0x70_0000), 4096);
    assert_eq!(size(0x80_0000), 2 * MIB);
    assert_eq!(size(0xa0_0000), 4096);
    // Beyond the width: faults as such, and cannot be mapped.
    let width = levels * 9 + 12;
    for access in [Access::Read, Access::Write] {
        assert_eq!(
            translate(&mem, &t, cap, EDU, 1 << width, access),
            Err(FaultReason::ADDRESS_BEYOND_WIDTH)
        );
    }
    assert_eq!(
        t.map(&mut mem, 3, (1 << width) - 4096, 0, 8192, Perm::READ)
            .map_err(|f| f.error),
        Err(Error::BeyondWidth {
            iova: (1 << width) - 4096,
            width_bits: width
        })
    );
}

#[test]
fn three_level_translations_match_the_reference() {
    check_against_reference(QEMU_CAP, 3);
}

#[test]
fn four_level_translations_match_the_reference() {
    check_against_reference(QEMU_CAP_AW48, 4);
    // 4-level reaches above 2^39; 3-level on the same unit does not.
    let (mut mem, mut t) = tables(QEMU_CAP_AW48);
    t.add_domain(&mut mem, 1, 4).unwrap();
    t.add_domain(&mut mem, 2, 3).unwrap();
    t.attach(&mut mem, BLK, 1).unwrap();
    t.attach(&mut mem, NET, 2).unwrap();
    t.map(&mut mem, 1, 1 << 40, 0x1000, 4096, Perm::READ)
        .unwrap();
    assert_eq!(
        translate(&mem, &t, QEMU_CAP_AW48, BLK, (1 << 40) + 8, Access::Read),
        Ok(0x1008)
    );
    assert_eq!(
        translate(&mem, &t, QEMU_CAP_AW48, NET, 1 << 40, Access::Read),
        Err(FaultReason::ADDRESS_BEYOND_WIDTH)
    );
    assert_eq!(
        t.add_domain(&mut mem, 3, 5),
        Err(Error::LevelsUnsupported(5))
    );
    let (mut mem, mut t) = tables(QEMU_CAP);
    assert_eq!(
        t.add_domain(&mut mem, 1, 4),
        Err(Error::LevelsUnsupported(4))
    );
}

#[test]
fn unmap_faults_and_refuses_to_split_large_pages() {
    let (mut mem, mut t) = tables(QEMU_CAP);
    t.add_domain(&mut mem, 1, 3).unwrap();
    t.attach(&mut mem, BLK, 1).unwrap();
    t.map(&mut mem, 1, 0x20_0000, 0x40_0000, 2 * MIB, Perm::READ_WRITE)
        .unwrap();
    t.map(&mut mem, 1, 0x1000, 0x5000, 0x3000, Perm::READ_WRITE)
        .unwrap();
    // Part of a large page: refused, nothing changed.
    assert_eq!(
        t.unmap(&mut mem, 1, 0x20_0000, 0x1000),
        Err(Error::SplitsLargePage { iova: 0x20_0000 })
    );
    assert_eq!(
        t.unmap(&mut mem, 1, 0x1000, 0x20_0000),
        Err(Error::SplitsLargePage { iova: 0x20_0000 })
    );
    assert_eq!(
        translate(&mem, &t, QEMU_CAP, BLK, 0x1000, Access::Read),
        Ok(0x5000)
    );
    assert_eq!(
        t.map(&mut mem, 1, 0x30_0000, 0, 4096, Perm::READ)
            .map_err(|f| f.error),
        Err(Error::SplitsLargePage { iova: 0x30_0000 })
    );
    // A 4 KiB page in the middle; the range may include unmapped space.
    let u = t.unmap(&mut mem, 1, 0, 0x3000).unwrap();
    assert_eq!((u.did, u.iova, u.len, u.bytes), (1, 0, 0x3000, 0x2000));
    for (iova, want) in [
        (0x1000, Err(FaultReason::READ_DENIED)),
        (0x2000, Err(FaultReason::READ_DENIED)),
        (0x3000, Ok(0x7000)),
        (0x20_0000, Ok(0x40_0000)),
    ] {
        assert_eq!(translate(&mem, &t, QEMU_CAP, BLK, iova, Access::Read), want);
    }
    assert_eq!(
        t.unmap(&mut mem, 1, 0, 4 * MIB).unwrap().bytes,
        2 * MIB + 0x1000
    );
    for iova in [0x3000, 0x20_0000, 0x3f_f000] {
        assert_eq!(
            translate(&mem, &t, QEMU_CAP, BLK, iova, Access::Write),
            Err(FaultReason::WRITE_DENIED)
        );
    }
    assert_eq!(t.unmap(&mut mem, 1, 0, 4 * MIB).unwrap().bytes, 0);
}

#[test]
fn remapping_reports_replacement_and_large_pages_fall_back() {
    let (mut mem, mut t) = tables(QEMU_CAP);
    t.add_domain(&mut mem, 1, 3).unwrap();
    let first = t
        .map(&mut mem, 1, 0x1000, 0x1000, 0x1000, Perm::READ)
        .unwrap();
    assert!(!first.replaced);
    let again = t
        .map(&mut mem, 1, 0x1000, 0x9000, 0x1000, Perm::READ_WRITE)
        .unwrap();
    assert!(again.replaced);
    // A page table already sits where a 2 MiB page would go: 4 KiB pages instead.
    let big = t
        .map(&mut mem, 1, 0, 0x40_0000, 2 * MIB, Perm::READ)
        .unwrap();
    assert!(big.replaced && big.bytes == 2 * MIB);
    t.attach(&mut mem, BLK, 1).unwrap();
    let m = model(QEMU_CAP);
    let ctx = m.context(&mem.unit_memory(), t.root(), BLK).unwrap();
    let walk = m
        .walk(&mem.unit_memory(), &ctx, 0x1_f000, Access::Read)
        .unwrap();
    assert_eq!((walk.pa, walk.page_bytes), (0x41_f000, 4096));
}

#[test]
fn bad_arguments_are_refused() {
    let (mut mem, mut t) = tables(QEMU_CAP);
    assert_eq!(t.add_domain(&mut mem, 0, 3), Err(Error::BadDomainId(0)));
    t.add_domain(&mut mem, 1, 3).unwrap();
    assert_eq!(t.add_domain(&mut mem, 1, 3), Err(Error::DomainExists(1)));
    let err = |r: Result<_, MapFailed>| r.map_err(|f| f.error);
    assert_eq!(
        err(t.map(&mut mem, 1, 0x800, 0, 4096, Perm::READ)),
        Err(Error::Unaligned)
    );
    assert_eq!(
        err(t.map(&mut mem, 1, 0, 0x800, 4096, Perm::READ)),
        Err(Error::Unaligned)
    );
    assert_eq!(
        err(t.map(&mut mem, 1, 0, 0, 0, Perm::READ)),
        Err(Error::Unaligned)
    );
    assert_eq!(
        err(t.map(&mut mem, 1, 0, 1 << 39, 4096, Perm::READ)),
        Err(Error::BeyondHostWidth { pa: 1 << 39 })
    );
    assert_eq!(
        err(t.map(&mut mem, 2, 0, 0, 4096, Perm::READ)),
        Err(Error::NoDomain(2))
    );
    assert_eq!(t.attach(&mut mem, BLK, 2), Err(Error::NoDomain(2)));
    t.attach(&mut mem, BLK, 1).unwrap();
    assert_eq!(t.remove_domain(&mut mem, 1), Err(Error::DomainInUse(1)));
}

#[test]
fn running_out_of_frames_reports_what_was_mapped() {
    let (mut mem, mut t) = tables(QEMU_CAP);
    t.add_domain(&mut mem, 1, 3).unwrap();
    mem.frame_limit = Some(mem.frames_in_use() + 2); // L2 + one L1 table
    let failed = t
        .map(&mut mem, 1, 0x1f_e000, 0, 0x4000, Perm::READ)
        .unwrap_err();
    assert_eq!(failed.error, Error::OutOfFrames);
    assert_eq!(failed.done.bytes, 0x2000, "the pages before the next 2 MiB");
}

#[test]
fn removing_a_domain_frees_every_table() {
    let (mut mem, mut t) = tables(QEMU_CAP_AW48);
    let before = mem.frames_in_use();
    t.add_domain(&mut mem, 9, 4).unwrap();
    t.map(&mut mem, 9, 0, 0, 8 * MIB, Perm::READ_WRITE).unwrap();
    t.map(&mut mem, 9, 1 << 40, 0x1000, 0x5000, Perm::READ)
        .unwrap();
    assert!(mem.frames_in_use() > before + 4);
    t.remove_domain(&mut mem, 9).unwrap();
    assert_eq!(mem.frames_in_use(), before);
    assert_eq!(t.domain(9), None);
}

#[test]
fn the_unit_sees_only_flushed_writes() {
    // The fake itself: an unflushed table write is invisible to the unit.
    let (mut mem, _regs) = FakePlatform::new(QEMU_CAP, QEMU_ECAP);
    let frame = mem.alloc_frame().unwrap();
    assert_eq!(mem.unit_memory().read_u64(frame), fake::GARBAGE);
    mem.frame(frame)[3] = 42;
    assert_eq!(mem.unit_memory().read_u64(frame + 24), fake::GARBAGE);
    mem.flush(frame + 24, 8);
    assert_eq!(mem.unit_memory().read_u64(frame + 24), 42);
    assert_eq!(mem.unit_memory().read_u64(frame), 0, "the whole line went");
    // A coherent unit reads what the CPU wrote.
    let (mut mem, _regs) = FakePlatform::new(QEMU_CAP, QEMU_ECAP | 1);
    let frame = mem.alloc_frame().unwrap();
    mem.frame(frame)[0] = 7;
    assert_eq!(mem.unit_memory().read_u64(frame), 7);
}

#[test]
fn model_checks_reserved_bits_and_bad_contexts() {
    let (mut mem, mut t) = tables(QEMU_CAP);
    t.add_domain(&mut mem, 1, 3).unwrap();
    t.map(&mut mem, 1, 0, 0x1000, 0x1000, Perm::READ).unwrap();
    t.attach(&mut mem, BLK, 1).unwrap();
    let ctx_addr = {
        let root = mem.frame(t.root())[0];
        (root & !0xfff) + u64::from(BLK.devfn()) * 16
    };
    let poke = |mem: &mut FakePlatform, addr: u64, value: u64| {
        mem.frame(addr & !0xfff)[((addr & 0xfff) / 8) as usize] = value;
        mem.flush(addr, 8);
    };
    let lo = mem.frame(ctx_addr & !0xfff)[((ctx_addr & 0xfff) / 8) as usize];
    let hi = mem.frame(ctx_addr & !0xfff)[((ctx_addr & 0xfff) / 8 + 1) as usize];
    // AW 2 (4-level) on a 3-level-only unit.
    poke(&mut mem, ctx_addr + 8, (hi & !7) | 2);
    assert_eq!(
        translate(&mem, &t, QEMU_CAP, BLK, 0, Access::Read),
        Err(FaultReason::CONTEXT_INVALID)
    );
    // A reserved bit in the context entry.
    poke(&mut mem, ctx_addr + 8, hi | 1 << 40);
    assert_eq!(
        translate(&mem, &t, QEMU_CAP, BLK, 0, Access::Read),
        Err(FaultReason::CONTEXT_RESERVED)
    );
    // Pass-through (ECAP.PT) translates 1:1.
    poke(&mut mem, ctx_addr + 8, hi);
    poke(&mut mem, ctx_addr, lo | 2 << 2);
    assert_eq!(
        translate(&mem, &t, QEMU_CAP, BLK, 0x1234_5000, Access::Write),
        Ok(0x1234_5000)
    );
    // A reserved bit in the root entry.
    poke(&mut mem, ctx_addr, lo);
    let root_lo = mem.frame(t.root())[0];
    poke(&mut mem, t.root(), root_lo | 0x10);
    assert_eq!(
        translate(&mem, &t, QEMU_CAP, BLK, 0, Access::Read),
        Err(FaultReason::ROOT_RESERVED)
    );
}

// ---------------------------------------------------------------- the driver on the fake unit

const CONFIG: Config = Config {
    fault_vector: 0x40,
    fault_apic_id: 1,
    queued: true,
};

fn enabled(cap: u64, ecap: u64, config: &Config) -> (FakePlatform, Vtd<FakeRegs>) {
    let (mut mem, regs) = FakePlatform::new(cap, ecap);
    let mut vtd = Vtd::new(regs);
    vtd.enable(&mut mem, config).unwrap();
    (mem, vtd)
}

fn qemu() -> (FakePlatform, Vtd<FakeRegs>) {
    enabled(QEMU_CAP | CAP_CM, QEMU_ECAP, &CONFIG)
}

fn assert_clean(mem: &FakePlatform) {
    assert_eq!(mem.unit().violations, Vec::<std::string::String>::new());
}

#[test]
fn enable_sequence_queued() {
    let (mem, mut vtd) = qemu();
    assert_eq!(vtd.version().major(), 1);
    let unit = mem.unit();
    // One command per GCMD write, the persistent enables carried from GSTS.
    assert_eq!(
        unit.gcmd_writes,
        [gcmd::QIE, gcmd::QIE | gcmd::SRTP, gcmd::QIE | gcmd::TE]
    );
    assert_eq!(
        unit.invalidations,
        [Invalidation::ContextGlobal, Invalidation::IotlbGlobal]
    );
    assert_eq!(unit.waits, 1);
    assert_eq!(unit.root, vtd.tables().map(|t| t.root()));
    drop(unit);
    let status = vtd.gsts();
    assert_eq!(
        status & (gsts::TES | gsts::QIES | gsts::RTPS | gsts::IRES | gsts::CFIS),
        gsts::TES | gsts::QIES | gsts::RTPS
    );
    assert_eq!(vtd.invalidation(), Some(InvalidationMode::Queued));
    // The fault event: vector 0x40 to APIC 1, unmasked.
    let regs = vtd.regs();
    assert_eq!(regs.read32(regs::FEDATA.0), 0x40);
    assert_eq!(regs.read32(regs::FEADDR.0), 0xfee0_1000);
    assert_eq!(regs.read32(regs::FECTL.0), 0);
    assert_clean(&mem);
    assert_eq!(
        vtd.enable(&mut FakePlatform::qemu(false).0, &CONFIG),
        Err(Error::AlreadyEnabled)
    );
}

#[test]
fn enable_sequence_register_based() {
    let config = Config {
        queued: false,
        ..CONFIG
    };
    let (mem, mut vtd) = enabled(QEMU_CAP, QEMU_ECAP, &config);
    let unit = mem.unit();
    assert_eq!(unit.gcmd_writes, [gcmd::SRTP, gcmd::TE]);
    assert_eq!(
        unit.invalidations,
        [Invalidation::ContextGlobal, Invalidation::IotlbGlobal]
    );
    assert_eq!(unit.waits, 0);
    drop(unit);
    assert_eq!(vtd.invalidation(), Some(InvalidationMode::Register));
    assert_eq!(vtd.gsts() & gsts::QIES, 0);
    // CCMD and the IOTLB register report done with the granularity used.
    let ecap = vtd.ecap();
    let regs = vtd.regs();
    assert_eq!(regs.read64(regs::CCMD.0) >> 59 & 3, 1);
    assert_eq!(regs.read64(ecap.iotlb_offset()) >> 57 & 3, 1);
    assert_clean(&mem);
}

#[test]
fn write_buffer_flush_where_cap_asks() {
    let rwbf = 1 << 4;
    let (mem, _vtd) = enabled(QEMU_CAP | rwbf, QEMU_ECAP, &CONFIG);
    assert_eq!(
        mem.unit().gcmd_writes,
        [
            gcmd::QIE,
            gcmd::QIE | gcmd::WBF,
            gcmd::QIE | gcmd::SRTP,
            gcmd::QIE | gcmd::TE
        ]
    );
    assert_clean(&mem);
}

#[test]
fn fake_refuses_register_commands_once_queued_invalidation_is_on() {
    let (mem, mut vtd) = qemu();
    let regs = vtd.regs();
    regs.write64(regs::CCMD.0, regs::ccmd::ICC | regs::ccmd::GLOBAL);
    assert_ne!(regs.read64(regs::CCMD.0) & regs::ccmd::ICC, 0, "still busy");
    assert_eq!(mem.unit().violations.len(), 1);
}

#[test]
#[should_panic(expected = "QEMU aborts")]
fn fake_aborts_on_a_64_bit_write_to_a_32_bit_register() {
    let (_mem, mut vtd) = qemu();
    vtd.regs().write64(regs::FSTS.0, 1);
}

#[test]
fn levels_for_widths() {
    let (_mem, vtd) = qemu();
    let levels = |bits| Iommu::<FakePlatform>::levels_for(&vtd, bits);
    assert_eq!(levels(32), Some(3));
    assert_eq!(levels(39), Some(3));
    assert_eq!(levels(48), None);
    let (_mem, vtd) = enabled(QEMU_CAP_AW48, QEMU_ECAP, &CONFIG);
    assert_eq!(Iommu::<FakePlatform>::levels_for(&vtd, 48), Some(4));
}

/// Drives any [`Iommu`]: what the hypervisor will do.
fn give_device<I: Iommu<FakePlatform>>(
    iommu: &mut I,
    mem: &mut FakePlatform,
    bdf: Bdf,
    did: u16,
    base: u64,
) {
    let levels = iommu.levels_for(32).unwrap();
    iommu.add_domain(mem, did, levels).unwrap();
    iommu
        .map(mem, did, 0x40_0000, base, 4 * MIB, Perm::READ_WRITE)
        .unwrap();
    iommu.attach(mem, bdf, did).unwrap();
}

#[test]
fn caching_mode_attach_map_unmap_detach() {
    let (mut mem, mut vtd) = qemu();
    // Before attach: nothing on bus 0 has an entry yet, and (caching mode) the fault is
    // cached.
    assert_eq!(
        mem.dma(BLK, 0x40_0000, Access::Read),
        Err(FaultReason::ROOT_NOT_PRESENT)
    );
    mem.unit_mut().invalidations.clear();
    give_device(&mut vtd, &mut mem, BLK, 1, 0x100_0000);
    let unit = mem.unit();
    assert_eq!(
        unit.invalidations,
        [
            // The map (not-present to present, caching mode): two 2 MiB pages.
            Invalidation::IotlbPages {
                did: 1,
                addr: 0x40_0000,
                am: 10
            },
            // The attach: the not-present entry cached under domain 0.
            Invalidation::ContextDevice {
                did: 0,
                source: BLK
            },
            Invalidation::IotlbDomain { did: 0 },
        ]
    );
    drop(unit);
    // The driver's own counts agree with what the unit saw (enable added a
    // global context and a global IOTLB invalidation).
    let counts = vtd.invalidation_counts();
    assert_eq!(
        (counts.iotlb_pages, counts.iotlb_domain, counts.context),
        (1, 1, 2)
    );
    assert_eq!(counts.iotlb_global, 1);
    assert_eq!(
        counts.iotlb(),
        counts.iotlb_pages + counts.iotlb_domain + counts.iotlb_global
    );
    assert_eq!(mem.dma(BLK, 0x40_0010, Access::Write), Ok(0x100_0010));
    assert_eq!(mem.dma(BLK, 0x7f_f000, Access::Read), Ok(0x13f_f000));
    assert_eq!(
        vtd.attachment(&mut mem, BLK),
        Some(Attachment {
            did: 1,
            levels: 3,
            table: vtd.tables().unwrap().domain(1).unwrap().table
        })
    );
    // Caching mode: a fault on a not-yet-mapped page is cached; map invalidates it.
    assert_eq!(
        mem.dma(BLK, 0x80_0000, Access::Read),
        Err(FaultReason::READ_DENIED)
    );
    vtd.map(&mut mem, 1, 0x80_0000, 0x200_0000, 4096, Perm::READ)
        .unwrap();
    assert_eq!(mem.dma(BLK, 0x80_0000, Access::Read), Ok(0x200_0000));
    assert_eq!(
        mem.dma(BLK, 0x80_0000, Access::Write),
        Err(FaultReason::WRITE_DENIED)
    );
    // Unmap: page-selective invalidation, then faults.
    mem.unit_mut().invalidations.clear();
    assert_eq!(vtd.unmap(&mut mem, 1, 0x40_0000, 2 * MIB), Ok(2 * MIB));
    assert_eq!(
        mem.unit().invalidations,
        [Invalidation::IotlbPages {
            did: 1,
            addr: 0x40_0000,
            am: 9
        }]
    );
    assert_eq!(
        mem.dma(BLK, 0x40_0010, Access::Write),
        Err(FaultReason::WRITE_DENIED)
    );
    assert_eq!(mem.dma(BLK, 0x60_0000, Access::Write), Ok(0x120_0000));
    // Detach: device-selective context and domain-selective IOTLB invalidation.
    mem.unit_mut().invalidations.clear();
    assert_eq!(vtd.detach(&mut mem, BLK), Ok(1));
    assert_eq!(
        mem.unit().invalidations,
        [
            Invalidation::ContextDevice {
                did: 1,
                source: BLK
            },
            Invalidation::IotlbDomain { did: 1 },
        ]
    );
    assert_eq!(
        mem.dma(BLK, 0x60_0000, Access::Write),
        Err(FaultReason::CONTEXT_NOT_PRESENT)
    );
    assert_eq!(vtd.attachment(&mut mem, BLK), None);
    // Remove the domain: its tables go back.
    let frames = mem.frames_in_use();
    vtd.remove_domain(&mut mem, 1).unwrap();
    assert!(mem.frames_in_use() < frames);
    assert_clean(&mem);
}

#[test]
fn without_invalidation_the_unit_would_keep_a_stale_translation() {
    // The control that shows the fake's IOTLB is real: clear a PTE behind the driver's back
    // and the device still reaches the page; the driver's unmap makes it fault.
    let (mut mem, mut vtd) = qemu();
    give_device(&mut vtd, &mut mem, NET, 2, 0x100_0000);
    vtd.map(&mut mem, 2, 0x1000, 0x5000, 4096, Perm::READ_WRITE)
        .unwrap();
    assert_eq!(mem.dma(NET, 0x1000, Access::Read), Ok(0x5000));
    let walk = vtd.tables().unwrap().domain(2).map(|d| d.table).unwrap();
    // Find the L1 entry by hand: L3[0] -> L2[0] -> L1[1].
    let l2 = mem.frame(walk)[0] & tables::pte::ADDR;
    let l1 = mem.frame(l2)[0] & tables::pte::ADDR;
    mem.frame(l1)[1] = 0;
    mem.flush(l1 + 8, 8);
    assert_eq!(mem.dma(NET, 0x1000, Access::Read), Ok(0x5000), "stale");
    vtd.unmap(&mut mem, 2, 0x1000, 4096).unwrap_or(0);
    // Nothing was mapped any more, so unmap had nothing to invalidate: do it as a remap.
    vtd.map(&mut mem, 2, 0x1000, 0x5000, 4096, Perm::READ)
        .unwrap();
    vtd.unmap(&mut mem, 2, 0x1000, 4096).unwrap();
    assert_eq!(
        mem.dma(NET, 0x1000, Access::Read),
        Err(FaultReason::READ_DENIED)
    );
    assert_clean(&mem);
}

#[test]
fn without_caching_mode_a_new_mapping_needs_no_invalidation_but_a_change_does() {
    let (mut mem, mut vtd) = enabled(QEMU_CAP, QEMU_ECAP, &CONFIG);
    give_device(&mut vtd, &mut mem, BLK, 1, 0x100_0000);
    assert_eq!(mem.unit().invalidations.len(), 2, "only the enable's");
    assert_eq!(mem.dma(BLK, 0x40_0000, Access::Read), Ok(0x100_0000));
    // Change a present mapping: page-selective invalidation.
    vtd.map(&mut mem, 1, 0x40_0000, 0x300_0000, 2 * MIB, Perm::READ)
        .unwrap();
    assert_eq!(
        mem.unit().invalidations.last(),
        Some(&Invalidation::IotlbPages {
            did: 1,
            addr: 0x40_0000,
            am: 9
        })
    );
    assert_eq!(mem.dma(BLK, 0x40_0000, Access::Read), Ok(0x300_0000));
    assert_clean(&mem);
}

#[test]
fn large_unmaps_become_domain_selective_and_register_mode_works_too() {
    let config = Config {
        queued: false,
        ..CONFIG
    };
    let (mut mem, mut vtd) = enabled(QEMU_CAP | CAP_CM, QEMU_ECAP, &config);
    give_device(&mut vtd, &mut mem, EDU, 4, 0x100_0000);
    for i in 0..33u64 {
        vtd.map(
            &mut mem,
            4,
            0x100_0000 + i * 0x2000,
            0x800_0000,
            4096,
            Perm::READ,
        )
        .unwrap();
    }
    assert_eq!(mem.dma(EDU, 0x100_0000, Access::Read), Ok(0x800_0000));
    // An aligned range is a few page-selective blocks.
    mem.unit_mut().invalidations.clear();
    assert_eq!(vtd.unmap(&mut mem, 4, 0x100_0000, 64 * 4096), Ok(32 * 4096));
    assert_eq!(
        mem.unit().invalidations,
        [Invalidation::IotlbPages {
            did: 4,
            addr: 0x100_0000,
            am: 6
        }]
    );
    // 0x1000..0x2000_0000 needs 17 blocks (1, 2, 4, ... 2^16 pages): domain-selective.
    mem.unit_mut().invalidations.clear();
    let bytes = vtd.unmap(&mut mem, 4, 0x1000, 0x1fff_f000).unwrap();
    assert_eq!(bytes, 4 * MIB + 4096);
    assert_eq!(
        mem.unit().invalidations,
        [Invalidation::IotlbDomain { did: 4 }]
    );
    for iova in [0x40_0000, 0x100_0000, 0x104_0000] {
        assert_eq!(
            mem.dma(EDU, iova, Access::Read),
            Err(FaultReason::READ_DENIED)
        );
    }
    assert_eq!(
        vtd.enable_interrupt_remapping(&mut mem, 64),
        Err(Error::Unsupported(
            "interrupt remapping without queued invalidation"
        ))
    );
    assert_clean(&mem);
}

/// Small pages across a 2 MiB boundary (two level-1 tables): map, then unmap a part that
/// crosses it, each checked page by page against the walk model, flushes included.
#[test]
fn runs_of_small_pages_across_level_1_tables_match_the_model() {
    let (mut mem, mut t) = tables(QEMU_CAP);
    t.add_domain(&mut mem, 1, 3).unwrap();
    t.attach(&mut mem, BLK, 1).unwrap();
    let (iova, pa, len) = (0x1f_c000u64, 0x123_4000u64, 0x9000u64);
    let done = t.map(&mut mem, 1, iova, pa, len, Perm::READ).unwrap();
    assert_eq!((done.bytes, done.replaced), (len, false));
    assert_eq!(t.mapped_bytes(&mut mem, 1, 0x1f_0000, 0x2_0000), Ok(len));
    let u = t.unmap(&mut mem, 1, 0x1f_e000, 0x4000).unwrap();
    assert_eq!(u.bytes, 0x4000);
    assert_eq!(t.mapped_bytes(&mut mem, 1, iova, len), Ok(len - 0x4000));
    for page in (0x1f_0000..0x21_0000u64).step_by(4096) {
        let want = if (iova..iova + len).contains(&page) && !(0x1f_e000..0x20_2000).contains(&page)
        {
            Ok(pa + (page - iova) + 8)
        } else {
            Err(FaultReason::READ_DENIED)
        };
        assert_eq!(
            translate(&mem, &t, QEMU_CAP, BLK, page + 8, Access::Read),
            want,
            "{page:#x}"
        );
    }
    // A query that cuts a large page says so; one past the domain's width is refused.
    t.map(&mut mem, 1, 0x40_0000, 0x40_0000, 2 * MIB, Perm::READ)
        .unwrap();
    assert_eq!(
        t.mapped_bytes(&mut mem, 1, 0x40_0000, 0x1000),
        Err(Error::SplitsLargePage { iova: 0x40_0000 })
    );
    assert_eq!(t.mapped_bytes(&mut mem, 1, 0x40_0000, 2 * MIB), Ok(2 * MIB));
    assert!(t.mapped_bytes(&mut mem, 1, 1 << 39, 0x1000).is_err());
}

#[test]
fn a_batch_is_one_invalidation_and_leaves_nothing_stale() {
    use crate::api::Change;
    let (mut mem, mut vtd) = qemu();
    give_device(&mut vtd, &mut mem, BLK, 1, 0x100_0000);
    // Strict DMA: a request's pages come and go. Map a header page and a 16-page buffer of
    // scattered frames (a grant window's pages), in one batch.
    let frames: Vec<u64> = (0..16u64).map(|i| 0x300_0000 + i * 0x3000).collect();
    let mut changes = std::vec![Change::Map {
        iova: 0x90_1000,
        pa: 0x200_1000,
        len: 4096,
        perm: Perm::READ,
    }];
    changes.extend(frames.iter().enumerate().map(|(i, &pa)| Change::Map {
        iova: 0x8000_0000 + i as u64 * 4096,
        pa,
        len: 4096,
        perm: Perm::READ_WRITE,
    }));
    mem.unit_mut().invalidations.clear();
    assert_eq!(vtd.apply(&mut mem, 1, &changes), Ok(0));
    // Caching mode: the new mappings are invalidated too, once, over the covering block
    // (0x90_1000 and 0x8000_0000 differ in bit 31: 2^20 pages, beyond MAMV 18: the domain).
    assert_eq!(
        mem.unit().invalidations,
        [Invalidation::IotlbDomain { did: 1 }]
    );
    for (i, &pa) in frames.iter().enumerate() {
        let iova = 0x8000_0000 + i as u64 * 4096;
        assert_eq!(mem.dma(BLK, iova + 4, Access::Write), Ok(pa + 4));
    }
    assert_eq!(mem.dma(BLK, 0x90_1000, Access::Read), Ok(0x200_1000));
    assert_eq!(
        mem.dma(BLK, 0x90_1000, Access::Write),
        Err(FaultReason::WRITE_DENIED)
    );
    // The request completes: unmap its buffer and map the next one's in one batch. The old
    // pages were just used by the device (their translations are cached); after the batch
    // none of them translates, and the new ones do.
    let next: Vec<u64> = (0..16u64).map(|i| 0x500_0000 + i * 0x1000).collect();
    let mut changes = std::vec![Change::Unmap {
        iova: 0x8000_0000,
        len: 16 * 4096,
    }];
    changes.push(Change::Map {
        iova: 0x8001_0000,
        pa: next[0],
        len: 16 * 4096,
        perm: Perm::WRITE,
    });
    mem.unit_mut().invalidations.clear();
    assert_eq!(vtd.apply(&mut mem, 1, &changes), Ok(16 * 4096));
    assert_eq!(
        mem.unit().invalidations,
        [Invalidation::IotlbPages {
            did: 1,
            addr: 0x8000_0000,
            am: 5
        }]
    );
    for i in 0..16u64 {
        assert_eq!(
            mem.dma(BLK, 0x8000_0000 + i * 4096, Access::Write),
            Err(FaultReason::WRITE_DENIED),
            "stale page {i}"
        );
        assert_eq!(
            mem.dma(BLK, 0x8001_0000 + i * 4096, Access::Write),
            Ok(next[0] + i * 4096)
        );
    }
    // A permission change of a present page needs the invalidation even without caching mode.
    let (mut mem, mut vtd) = enabled(QEMU_CAP, QEMU_ECAP, &CONFIG);
    give_device(&mut vtd, &mut mem, BLK, 1, 0x100_0000);
    let before = mem.unit().invalidations.len();
    let only_new = [Change::Map {
        iova: 0x90_0000,
        pa: 0x200_0000,
        len: 4096,
        perm: Perm::READ,
    }];
    assert_eq!(vtd.apply(&mut mem, 1, &only_new), Ok(0));
    assert_eq!(
        mem.unit().invalidations.len(),
        before,
        "not-present to present"
    );
    assert_eq!(
        mem.dma(BLK, 0x90_0000, Access::Write),
        Err(FaultReason::WRITE_DENIED)
    );
    let upgrade = [Change::Map {
        iova: 0x90_0000,
        pa: 0x200_0000,
        len: 4096,
        perm: Perm::READ_WRITE,
    }];
    assert_eq!(vtd.apply(&mut mem, 1, &upgrade), Ok(0));
    assert_eq!(
        mem.unit().invalidations.last(),
        Some(&Invalidation::IotlbPages {
            did: 1,
            addr: 0x90_0000,
            am: 0
        })
    );
    assert_eq!(mem.dma(BLK, 0x90_0000, Access::Write), Ok(0x200_0000));
    // An unmap of nothing mapped changes nothing and invalidates nothing.
    let before = mem.unit().invalidations.len();
    let nothing = [Change::Unmap {
        iova: 0xa0_0000,
        len: 4096,
    }];
    assert_eq!(vtd.apply(&mut mem, 1, &nothing), Ok(0));
    assert_eq!(mem.unit().invalidations.len(), before);
    assert_clean(&mem);
}

#[test]
fn a_failed_batch_still_invalidates_its_unmaps() {
    use crate::api::Change;
    let (mut mem, mut vtd) = qemu();
    give_device(&mut vtd, &mut mem, BLK, 1, 0x100_0000);
    vtd.map(&mut mem, 1, 0x90_0000, 0x200_0000, 4096, Perm::READ_WRITE)
        .unwrap();
    assert_eq!(mem.dma(BLK, 0x90_0000, Access::Write), Ok(0x200_0000));
    // The map needs new tables (far away) and there are no frames left.
    mem.frame_limit = Some(mem.frames_in_use());
    let changes = [
        Change::Map {
            iova: 0x40_0000_0000 - 0x1000,
            pa: 0x300_0000,
            len: 4096,
            perm: Perm::READ,
        },
        Change::Unmap {
            iova: 0x90_0000,
            len: 4096,
        },
    ];
    assert_eq!(vtd.apply(&mut mem, 1, &changes), Err(Error::OutOfFrames));
    assert_eq!(
        mem.dma(BLK, 0x90_0000, Access::Write),
        Err(FaultReason::WRITE_DENIED),
        "the unmap went first and was invalidated"
    );
    assert_clean(&mem);
}

/// A grant window's index for [`crate::api::FrameSource`]: 1024 entries from 0x8000_0000
/// (two 2 MiB blocks), each a frame with caller bits in its low 12 (ignored by the unit).
struct Window(Vec<u64>);

const WIN: u64 = 0x8000_0000;

impl crate::api::FrameSource for Window {
    fn frames(&self, iova: u64) -> &[u64] {
        if !(WIN..WIN + 4 * MIB).contains(&iova) {
            return &[];
        }
        let i = ((iova - WIN) / 4096) as usize;
        &self.0[i..(i / 512 + 1) * 512]
    }
}

/// `MapFrames` writes each page's frame from the caller's index (across a level-1 table
/// boundary), with the one invalidation of the batch; the next batch's unmaps leave no stale
/// translation, though the device had just used every page.
#[test]
fn map_frames_writes_each_listed_frame_and_leaves_nothing_stale() {
    use crate::api::Change;
    let (mut mem, mut vtd) = qemu();
    give_device(&mut vtd, &mut mem, BLK, 1, 0x100_0000);
    let mut window = Window(std::vec![0; 1024]);
    // 16 pages from 8 before the block boundary, scattered, with caller bits set.
    let first = 504usize;
    for i in 0..16 {
        window.0[first + i] = (0x300_0000 + i as u64 * 0x7000) | 3;
    }
    let iova = WIN + first as u64 * 4096;
    let batch = [Change::MapFrames {
        iova,
        len: 16 * 4096,
        perm: Perm::READ_WRITE,
    }];
    mem.unit_mut().invalidations.clear();
    assert_eq!(vtd.apply_frames(&mut mem, 1, &batch, &window), Ok(0));
    assert_eq!(mem.unit().invalidations.len(), 1, "one per batch");
    for i in 0..16u64 {
        assert_eq!(
            mem.dma(BLK, iova + i * 4096 + 8, Access::Write),
            Ok(0x300_0000 + i * 0x7000 + 8),
            "page {i}"
        );
    }
    assert_eq!(
        mem.dma(BLK, iova - 4096, Access::Read),
        Err(FaultReason::READ_DENIED)
    );
    assert_eq!(
        mem.dma(BLK, iova + 16 * 4096, Access::Read),
        Err(FaultReason::READ_DENIED)
    );
    // Next turn: unmap those, map 4 others read-only, in one batch.
    for i in 0..4 {
        window.0[i] = 0x600_0000 + i as u64 * 0x1000;
    }
    let batch = [
        Change::Unmap {
            iova,
            len: 16 * 4096,
        },
        Change::MapFrames {
            iova: WIN,
            len: 4 * 4096,
            perm: Perm::READ,
        },
    ];
    assert_eq!(
        vtd.apply_frames(&mut mem, 1, &batch, &window),
        Ok(16 * 4096)
    );
    for i in 0..16u64 {
        assert_eq!(
            mem.dma(BLK, iova + i * 4096, Access::Read),
            Err(FaultReason::READ_DENIED),
            "stale page {i}"
        );
    }
    for i in 0..4u64 {
        assert_eq!(
            mem.dma(BLK, WIN + i * 4096, Access::Read),
            Ok(0x600_0000 + i * 0x1000)
        );
        assert_eq!(
            mem.dma(BLK, WIN + i * 4096, Access::Write),
            Err(FaultReason::WRITE_DENIED)
        );
    }
    // Every entry against the walk model, flushes included: only those four map.
    let t = vtd.tables().unwrap();
    assert_eq!(t.mapped_bytes(&mut mem, 1, WIN, 4 * MIB), Ok(4 * 4096));
    assert_clean(&mem);
}

/// A batch whose `MapFrames` names a page the index does not list (or a frame beyond the
/// unit's reach) changes nothing: not even the unmaps before it in the batch.
#[test]
fn a_batch_with_a_missing_frame_changes_nothing() {
    use crate::api::Change;
    let (mut mem, mut vtd) = qemu();
    give_device(&mut vtd, &mut mem, BLK, 1, 0x100_0000);
    let mut window = Window(std::vec![0; 1024]);
    for i in 0..8 {
        window.0[508 + i] = 0x300_0000 + i as u64 * 0x1000;
    }
    let mapped = Change::MapFrames {
        iova: WIN + 508 * 4096,
        len: 4 * 4096,
        perm: Perm::READ,
    };
    vtd.apply_frames(&mut mem, 1, &[mapped], &window).unwrap();
    let before = mem
        .frame(vtd.tables().unwrap().domain(1).unwrap().table)
        .to_vec();
    let invalidations = mem.unit().invalidations.len();
    window.0[514] = 0;
    let hole = [
        Change::Unmap {
            iova: WIN + 508 * 4096,
            len: 4 * 4096,
        },
        Change::MapFrames {
            iova: WIN + 512 * 4096,
            len: 4 * 4096,
            perm: Perm::READ,
        },
    ];
    assert_eq!(
        vtd.apply_frames(&mut mem, 1, &hole, &window),
        Err(Error::MissingFrame {
            iova: WIN + 514 * 4096
        })
    );
    // Past the end of what the source lists (the third block has no slice).
    let past = [Change::MapFrames {
        iova: WIN + 4 * MIB - 4096,
        len: 2 * 4096,
        perm: Perm::READ,
    }];
    window.0[1023] = 0x300_0000;
    assert_eq!(
        vtd.apply_frames(&mut mem, 1, &past, &window),
        Err(Error::MissingFrame {
            iova: WIN + 4 * MIB
        })
    );
    // A frame beyond the unit's 48-bit host width.
    window.0[514] = 1 << 48;
    assert_eq!(
        vtd.apply_frames(&mut mem, 1, &hole, &window),
        Err(Error::BeyondHostWidth { pa: 1 << 48 })
    );
    // Without a source, a `MapFrames` lists nothing.
    assert_eq!(
        vtd.apply(&mut mem, 1, &hole[1..]),
        Err(Error::MissingFrame {
            iova: WIN + 512 * 4096
        })
    );
    assert_eq!(
        mem.unit().invalidations.len(),
        invalidations,
        "nothing to invalidate"
    );
    assert_eq!(
        mem.frame(vtd.tables().unwrap().domain(1).unwrap().table)
            .to_vec(),
        before
    );
    for i in 0..4u64 {
        assert_eq!(
            mem.dma(BLK, WIN + (508 + i) * 4096, Access::Read),
            Ok(0x300_0000 + i * 0x1000),
            "still mapped"
        );
        assert_eq!(
            mem.dma(BLK, WIN + (512 + i) * 4096, Access::Read),
            Err(FaultReason::READ_DENIED),
            "never mapped"
        );
    }
    assert_eq!(
        vtd.tables()
            .unwrap()
            .mapped_bytes(&mut mem, 1, WIN, 4 * MIB),
        Ok(4 * 4096)
    );
    assert_clean(&mem);
}

/// A source that tags its entries (bit 0 listed, bit 1 writable) and requires the tags for
/// the permission asked: a page without them is missing, checked in the pass over the
/// frames, before anything changes; an `UnmapMapped` refused later in the batch still wins.
struct Tagged(Window);

impl crate::api::FrameSource for Tagged {
    fn frames(&self, iova: u64) -> &[u64] {
        self.0.frames(iova)
    }
    fn required(&self, perm: Perm) -> u64 {
        1 | if perm.write { 2 } else { 0 }
    }
}

#[test]
fn map_frames_needs_the_bits_the_source_requires() {
    use crate::api::Change;
    let (mut mem, mut vtd) = qemu();
    give_device(&mut vtd, &mut mem, BLK, 1, 0x100_0000);
    let mut window = Window(std::vec![0; 1024]);
    for i in 0..4 {
        window.0[i] = (0x300_0000 + i as u64 * 0x1000) | 3;
    }
    window.0[2] &= !2;
    let tagged = Tagged(window);
    let frames = |iova: u64, pages: u64, perm| Change::MapFrames {
        iova: WIN + iova * 4096,
        len: pages * 4096,
        perm,
    };
    let invalidations = mem.unit().invalidations.len();
    // Read-only pages are mapped for reading; not for writing.
    assert_eq!(
        vtd.apply_frames(&mut mem, 1, &[frames(0, 4, Perm::READ_WRITE)], &tagged),
        Err(Error::MissingFrame {
            iova: WIN + 2 * 4096
        })
    );
    assert_eq!(
        mem.unit().invalidations.len(),
        invalidations,
        "nothing changed"
    );
    assert_eq!(
        mem.dma(BLK, WIN, Access::Read),
        Err(FaultReason::READ_DENIED)
    );
    // The first map refused is the answer, but an `UnmapMapped` refused after it wins.
    let batch = [
        frames(1, 3, Perm::READ_WRITE),
        frames(8, 1, Perm::READ),
        Change::UnmapMapped {
            iova: WIN + 16 * 4096,
            len: 4096,
        },
    ];
    assert_eq!(
        vtd.apply_frames(&mut mem, 1, &batch[..2], &tagged),
        Err(Error::MissingFrame {
            iova: WIN + 2 * 4096
        })
    );
    assert_eq!(
        vtd.apply_frames(&mut mem, 1, &batch, &tagged),
        Err(Error::NotMapped {
            iova: WIN + 16 * 4096
        })
    );
    // Without the listed bit, a frame is not listed even for reading.
    let mut untagged = Tagged(Window(tagged.0 .0.clone()));
    untagged.0 .0[3] &= !3;
    assert_eq!(
        vtd.apply_frames(&mut mem, 1, &[frames(0, 4, Perm::READ)], &untagged),
        Err(Error::MissingFrame {
            iova: WIN + 3 * 4096
        })
    );
    assert_eq!(
        mem.unit().invalidations.len(),
        invalidations,
        "nothing changed"
    );
    vtd.apply_frames(&mut mem, 1, &[frames(0, 4, Perm::READ)], &tagged)
        .unwrap();
    assert_eq!(
        mem.dma(BLK, WIN + 2 * 4096 + 8, Access::Read),
        Ok(0x300_2008)
    );
    assert_eq!(
        mem.dma(BLK, WIN + 2 * 4096, Access::Write),
        Err(FaultReason::WRITE_DENIED)
    );
    assert_clean(&mem);
}

/// `UnmapMapped`: every page of every such change is checked (one walk per level-1 table)
/// before the batch changes anything; the unmaps then clear the entries the checks found,
/// across a level-1 table boundary, with the batch's one invalidation and nothing stale.
#[test]
fn unmap_mapped_checks_every_page_before_anything_changes() {
    use crate::api::Change;
    let (mut mem, mut vtd) = qemu();
    let levels = Iommu::<FakePlatform>::levels_for(&vtd, 32).unwrap();
    vtd.add_domain(&mut mem, 1, levels).unwrap();
    vtd.attach(&mut mem, BLK, 1).unwrap();
    let mut window = Window(std::vec![0; 1024]);
    let frame = |i: usize| 0x300_0000 + i as u64 * 0x2000;
    for i in (500..530).chain(600..610) {
        window.0[i] = frame(i) | 1;
    }
    let page = |i: usize| WIN + i as u64 * 4096;
    let pages = |n: u64| n * 4096;
    let map = |from: usize, n: u64| Change::MapFrames {
        iova: page(from),
        len: pages(n),
        perm: Perm::READ_WRITE,
    };
    let unmap = |from: usize, n: u64| Change::UnmapMapped {
        iova: page(from),
        len: pages(n),
    };
    vtd.apply_frames(&mut mem, 1, &[map(500, 30), map(600, 10)], &window)
        .unwrap();
    assert!(!vtd.tables().unwrap().domain(1).unwrap().large);
    let mapped = |mem: &mut FakePlatform, vtd: &Vtd<FakeRegs>| {
        vtd.tables()
            .unwrap()
            .mapped_bytes(mem, 1, WIN, 4 * MIB)
            .unwrap()
    };
    assert_eq!(mapped(&mut mem, &vtd), pages(40));
    for i in 700..704 {
        window.0[i] = frame(i);
    }
    // Refused: a page not mapped (530) in the second unmap, or a level-1 table that is not
    // there at all; the first unmap and the map are not done either, nothing is invalidated.
    let invalidations = mem.unit().invalidations.len();
    for (bad, at) in [(unmap(526, 8), 530), (unmap(1020, 2), 1020)] {
        let batch = [unmap(500, 8), bad, map(700, 4)];
        assert_eq!(
            vtd.apply_frames(&mut mem, 1, &batch, &window),
            Err(Error::NotMapped { iova: page(at) })
        );
    }
    assert_eq!(mem.unit().invalidations.len(), invalidations);
    assert_eq!(mapped(&mut mem, &vtd), pages(40));
    for i in (500..530).chain(600..610) {
        assert_eq!(mem.dma(BLK, page(i), Access::Write), Ok(frame(i)), "{i}");
    }
    assert_eq!(
        mem.dma(BLK, page(700), Access::Read),
        Err(FaultReason::READ_DENIED)
    );
    // Done: across the table boundary at 512, a run that continues the first, another
    // table's run, and a map, with one invalidation.
    let batch = [unmap(504, 16), unmap(600, 8), unmap(520, 2), map(700, 4)];
    mem.unit_mut().invalidations.clear();
    assert_eq!(
        vtd.apply_frames(&mut mem, 1, &batch, &window),
        Ok(pages(26))
    );
    assert_eq!(mem.unit().invalidations.len(), 1, "one per batch");
    for i in (504..522).chain(600..608) {
        assert_eq!(
            mem.dma(BLK, page(i), Access::Read),
            Err(FaultReason::READ_DENIED),
            "stale page {i}"
        );
    }
    for i in (500..504).chain(522..530).chain(608..610).chain(700..704) {
        assert_eq!(mem.dma(BLK, page(i), Access::Write), Ok(frame(i)), "{i}");
    }
    assert_eq!(mapped(&mut mem, &vtd), pages(18));
    // An unmap of a page unmapped already is refused.
    assert_eq!(
        vtd.apply_frames(&mut mem, 1, &[unmap(503, 2)], &window),
        Err(Error::NotMapped { iova: page(504) })
    );
    assert_clean(&mem);
}

/// More runs than the checks note (every other page, 70 changes), and a domain with large
/// pages: the unmaps walk again after the checks, with the same result.
#[test]
fn unmap_mapped_without_room_or_with_large_pages() {
    use crate::api::Change;
    let (mut mem, mut vtd) = qemu();
    let levels = Iommu::<FakePlatform>::levels_for(&vtd, 32).unwrap();
    vtd.add_domain(&mut mem, 1, levels).unwrap();
    vtd.attach(&mut mem, BLK, 1).unwrap();
    let mut window = Window(std::vec![0; 1024]);
    for (i, e) in window.0.iter_mut().enumerate().take(140) {
        *e = 0x300_0000 + i as u64 * 0x1000;
    }
    let map = [Change::MapFrames {
        iova: WIN,
        len: 140 * 4096,
        perm: Perm::READ,
    }];
    vtd.apply_frames(&mut mem, 1, &map, &window).unwrap();
    let every_other: Vec<Change> = (0..70u64)
        .map(|i| Change::UnmapMapped {
            iova: WIN + 2 * i * 4096,
            len: 4096,
        })
        .collect();
    mem.unit_mut().invalidations.clear();
    assert_eq!(
        vtd.apply_frames(&mut mem, 1, &every_other, &window),
        Ok(70 * 4096)
    );
    assert_eq!(mem.unit().invalidations.len(), 1);
    for i in 0..140u64 {
        let expect = if i % 2 == 0 {
            Err(FaultReason::READ_DENIED)
        } else {
            Ok(0x300_0000 + i * 0x1000)
        };
        assert_eq!(mem.dma(BLK, WIN + i * 4096, Access::Read), expect, "{i}");
    }
    // Large pages (give_device maps 4 MiB at 0x40_0000 in 2 MiB pages).
    let (mut mem, mut vtd) = qemu();
    give_device(&mut vtd, &mut mem, BLK, 1, 0x100_0000);
    vtd.map(&mut mem, 1, 0x90_0000, 0x200_0000, 4096, Perm::READ_WRITE)
        .unwrap();
    let invalidations = mem.unit().invalidations.len();
    let cuts = [
        Change::UnmapMapped {
            iova: 0x90_0000,
            len: 4096,
        },
        Change::UnmapMapped {
            iova: 0x60_0000,
            len: 4096,
        },
    ];
    assert_eq!(
        vtd.apply(&mut mem, 1, &cuts),
        Err(Error::NotMapped { iova: 0x60_0000 })
    );
    assert_eq!(mem.unit().invalidations.len(), invalidations);
    assert_eq!(mem.dma(BLK, 0x90_0000, Access::Write), Ok(0x200_0000));
    let whole = [
        Change::UnmapMapped {
            iova: 0x90_0000,
            len: 4096,
        },
        Change::UnmapMapped {
            iova: 0x60_0000,
            len: 2 * MIB,
        },
    ];
    assert_eq!(vtd.apply(&mut mem, 1, &whole), Ok(2 * MIB + 4096));
    assert_eq!(mem.unit().invalidations.len(), invalidations + 1);
    for iova in [0x90_0000, 0x60_0000, 0x7f_f000] {
        assert_eq!(
            mem.dma(BLK, iova, Access::Read),
            Err(FaultReason::READ_DENIED)
        );
    }
    assert_eq!(mem.dma(BLK, 0x40_0000, Access::Read), Ok(0x100_0000));
    assert_clean(&mem);
}

#[test]
fn the_queue_wraps() {
    let (mut mem, mut vtd) = qemu();
    vtd.add_domain(&mut mem, 1, 3).unwrap();
    for i in 0..300u64 {
        vtd.map(&mut mem, 1, i * 4096, 0x10_0000, 4096, Perm::READ)
            .unwrap();
    }
    // 1 enable batch + 300 map batches, each an invalidation and a wait.
    assert_eq!(mem.unit().waits, 301);
    assert_eq!(mem.unit().invalidations.len(), 302);
    assert_eq!(mem.unit().iq_head, (302 + 301) % 256);
    assert_clean(&mem);
}

#[test]
fn a_refused_descriptor_is_reported_and_the_queue_recovers() {
    let (mut mem, mut vtd) = qemu();
    let bad = Invalidation::IotlbPages {
        did: 1,
        addr: 0,
        am: 40,
    };
    let head = mem.unit().iq_head;
    assert_eq!(
        vtd.invalidate(&mut mem, &[bad]),
        Err(Error::QueueError { head })
    );
    assert_eq!(vtd.regs().read32(regs::FSTS.0) & fsts::IQE, 0, "cleared");
    mem.unit_mut().violations.clear();
    vtd.invalidate(&mut mem, &[Invalidation::IotlbGlobal])
        .unwrap();
    assert_clean(&mem);
}

#[test]
fn faults_are_signalled_decoded_and_cleared() {
    let (mut mem, mut vtd) = qemu();
    give_device(&mut vtd, &mut mem, BLK, 1, 0x100_0000);
    assert_eq!(mem.dma(EDU, 0x7f123, Access::Write), Err(FaultReason(2)));
    // Same source again: compressed, no second interrupt.
    assert_eq!(mem.dma(EDU, 0x8000, Access::Read), Err(FaultReason(2)));
    assert_eq!(mem.unit().fault_interrupts, [(0xfee0_1000, 0x40)]);
    assert_ne!(vtd.regs().read32(regs::FSTS.0) & fsts::PPF, 0);
    let mut seen = Vec::new();
    let summary = vtd.take_faults(|f| seen.push(f));
    assert_eq!(summary.taken, 1);
    assert!(!summary.overflowed);
    let f = seen[0];
    assert_eq!((f.source, f.addr, f.access), (EDU, 0x7f000, Access::Write));
    assert_eq!((f.reason, f.reason_name), (2, "context-not-present"));
    assert_eq!(f.raw, [0x7f000, 0x8000_0002_0000_0028]);
    assert_eq!(vtd.regs().read32(regs::FSTS.0), 0);
    assert_eq!(vtd.take_faults(|_| panic!("nothing left")).taken, 0);
    // A write to a read-only page of an attached function: reason 5, a new interrupt.
    vtd.map(&mut mem, 1, 0x1000, 0x2000, 4096, Perm::READ)
        .unwrap();
    assert_eq!(mem.dma(BLK, 0x1008, Access::Write), Err(FaultReason(5)));
    assert_eq!(mem.unit().fault_interrupts.len(), 2);
    let mut seen = Vec::new();
    vtd.take_faults(|f| seen.push(f));
    assert_eq!((seen[0].source, seen[0].reason_name), (BLK, "write-denied"));
    assert_eq!(seen[0].addr, 0x1000);
    assert_clean(&mem);
}

#[test]
fn a_second_fault_with_one_record_overflows() {
    let (mut mem, mut vtd) = qemu();
    assert!(mem.dma(EDU, 0x1000, Access::Read).is_err());
    assert!(mem.dma(NET, 0x2000, Access::Read).is_err());
    assert_ne!(vtd.regs().read32(regs::FSTS.0) & fsts::PFO, 0);
    let mut seen = Vec::new();
    let summary = vtd.take_faults(|f| seen.push(f));
    assert_eq!(summary.taken, 1);
    assert!(summary.overflowed);
    assert_eq!((seen[0].source, seen[0].access), (EDU, Access::Read));
    assert_eq!(vtd.regs().read32(regs::FSTS.0), 0, "PFO cleared");
}

#[test]
fn several_records_are_read_from_fri_on() {
    let nfr3 = (QEMU_CAP & !(0xff << 40)) | 3 << 40;
    let (mem, mut vtd) = enabled(nfr3 | CAP_CM, QEMU_ECAP, &CONFIG);
    let faults = [
        (BLK, 0x1000, Access::Read, FaultReason::READ_DENIED),
        (
            NET,
            0x2000,
            Access::Write,
            FaultReason::ADDRESS_BEYOND_WIDTH,
        ),
        (EDU, 0x3000, Access::Write, FaultReason::PAGING_RESERVED),
    ];
    {
        let mut unit = mem.unit_mut();
        for (source, addr, access, reason) in faults {
            unit.record_fault(source, addr, access, reason);
        }
        // Take the first out of order so FRI moves on.
    }
    let mut seen = Vec::new();
    assert_eq!(vtd.take_faults(|f| seen.push(f)).taken, 3);
    let got: Vec<_> = seen
        .iter()
        .map(|f| (f.source, f.addr, f.access, FaultReason(f.reason)))
        .collect();
    assert_eq!(got, faults);
    assert_eq!(
        seen.iter().map(|f| f.reason_name).collect::<Vec<_>>(),
        [
            "read-denied",
            "address-beyond-width",
            "paging-reserved-bits"
        ]
    );
    assert_eq!(seen.iter().map(|f| f.index).collect::<Vec<_>>(), [0, 1, 2]);
    // The next fault goes to record 3, and FRI points there.
    mem.unit_mut()
        .record_fault(BLK, 0x9000, Access::Read, FaultReason::IR_SOURCE_INVALID);
    let mut seen = Vec::new();
    vtd.take_faults(|f| seen.push(f));
    assert_eq!(seen[0].index, 3);
    assert_eq!(seen[0].reason_name, "ir-source-invalid");
}

#[test]
fn interrupt_remapping_setup() {
    let (mut mem, mut vtd) = qemu();
    vtd.enable_interrupt_remapping(&mut mem, 64).unwrap();
    let status = vtd.gsts();
    assert_eq!(
        status & (gsts::TES | gsts::QIES | gsts::IRES | gsts::IRTPS | gsts::CFIS),
        gsts::TES | gsts::QIES | gsts::IRES | gsts::IRTPS,
        "compatibility format blocked"
    );
    let irta = vtd.irta();
    assert_eq!(irta & 0xf, 5, "2^(5+1) = 64 entries");
    assert_eq!(irta & regs::irta::EIME, 0, "xAPIC mode");
    assert_eq!(mem.unit().irta, Some(irta));
    assert_eq!(vtd.ir_entries(), 64);
    assert_eq!(
        mem.unit().invalidations.last(),
        Some(&Invalidation::IecGlobal)
    );
    let gcmds = mem.unit().gcmd_writes.clone();
    assert_eq!(
        gcmds[gcmds.len() - 2..],
        [
            gcmd::QIE | gcmd::TE | gcmd::SIRTP,
            gcmd::QIE | gcmd::TE | gcmd::IRE
        ]
    );
    // An entry: vector 0x51 to APIC 0, only from 00:03.0.
    let irte = Irte {
        vector: 0x51,
        dest_apic_id: 0,
        source: BLK,
    };
    vtd.set_irte(&mut mem, 5, irte).unwrap();
    assert_eq!(
        mem.unit().invalidations.last(),
        Some(&Invalidation::IecIndex { index: 5, im: 0 })
    );
    assert_eq!(vtd.irte(&mut mem, 5), Some(irte));
    let base = irta & !0xfff;
    assert_eq!(mem.read_u64(base + 5 * 16), 0x0051_0001);
    assert_eq!(
        mem.read_u64(base + 5 * 16 + 8),
        0x4_0018,
        "SVT 1, SQ 0, SID"
    );
    let irte_apic3 = Irte {
        dest_apic_id: 3,
        ..irte
    };
    assert_eq!(irte_apic3.encode()[0], 0x0000_0300_0051_0001);
    vtd.clear_irte(&mut mem, 5).unwrap();
    assert_eq!(vtd.irte(&mut mem, 5), None);
    assert_eq!(vtd.set_irte(&mut mem, 64, irte), Err(Error::BadIndex(64)));
    assert_eq!(
        vtd.enable_interrupt_remapping(&mut mem, 64),
        Err(Error::AlreadyEnabled)
    );
    assert_clean(&mem);
}

#[test]
fn interrupt_remapping_turns_compatibility_format_off() {
    let (mut mem, mut vtd) = qemu();
    // Firmware left CFI on.
    let on = vtd.gsts() & gsts::PERSISTENT;
    vtd.regs().write32(regs::GCMD.0, on | gcmd::CFI);
    assert_ne!(vtd.gsts() & gsts::CFIS, 0);
    vtd.enable_interrupt_remapping(&mut mem, 2).unwrap();
    assert_eq!(vtd.gsts() & gsts::CFIS, 0);
    assert_ne!(vtd.gsts() & gsts::IRES, 0);
    assert_eq!(vtd.irta() & 0xf, 0);
    assert_eq!(
        vtd.enable_interrupt_remapping(&mut mem, 3),
        Err(Error::BadTableSize(3))
    );
    assert_clean(&mem);
}

#[test]
fn bad_table_sizes() {
    let (mut mem, mut vtd) = qemu();
    for n in [0, 1, 3, 512] {
        assert_eq!(
            vtd.enable_interrupt_remapping(&mut mem, n),
            Err(Error::BadTableSize(n))
        );
    }
}

#[test]
fn remappable_msi_format() {
    assert_eq!(
        remappable_msi(0),
        Msi {
            address: 0xfee0_0018,
            data: 0
        }
    );
    assert_eq!(remappable_msi(5).address, 0xfee0_00b8);
    assert_eq!(remappable_msi(0x7fff).address, 0xfeef_fff8);
    assert_eq!(
        remappable_msi(0x8000).address,
        0xfee0_001c,
        "handle bit 15 in bit 2"
    );
}

#[test]
fn coherent_units_get_no_flushes() {
    let (mut mem, mut vtd) = enabled(QEMU_CAP | CAP_CM, QEMU_ECAP | 1, &CONFIG);
    give_device(&mut vtd, &mut mem, BLK, 1, 0x100_0000);
    vtd.enable_interrupt_remapping(&mut mem, 16).unwrap();
    assert_eq!(mem.flushes, 0);
    assert_eq!(mem.dma(BLK, 0x40_0000, Access::Read), Ok(0x100_0000));
    assert_clean(&mem);
}

#[test]
fn not_enabled() {
    let (mut mem, regs) = FakePlatform::qemu(false);
    let mut vtd = Vtd::new(regs);
    assert_eq!(vtd.invalidation(), None);
    assert_eq!(vtd.add_domain(&mut mem, 1, 3), Err(Error::NotEnabled));
    assert_eq!(
        vtd.enable_interrupt_remapping(&mut mem, 2),
        Err(Error::NotEnabled)
    );
    assert_eq!(vtd.gsts(), 0);
    // Translation is off: DMA passes through untouched.
    assert_eq!(mem.dma(BLK, 0x1234, Access::Read), Ok(0x1234));
}
