//! A fake VT-d unit for host tests, behaving like QEMU 7.2's `intel-iommu` at the register
//! level, plus the memory it shares with the CPU.
//!
//! - [`FakeRegs`] is the register page ([`Regs`]): GSTS follows GCMD commands (one command
//!   per write), CCMD and the IOTLB register invalidate and clear their busy bit, but are
//!   refused (busy bit left set) once queued invalidation is on; a 64-bit write to a 32-bit
//!   register panics, as QEMU aborts; faults land in the fault recording registers with
//!   QEMU's rules (overflow, same-source compression, one interrupt while PPF is set).
//! - [`FakePlatform`] is memory ([`TableMemory`]) with a non-coherent unit when ECAP.C = 0:
//!   the CPU writes into its cache, [`TableMemory::flush`] writes lines back, and the unit
//!   reads memory only, where a fresh frame holds garbage until flushed. It also plays the
//!   unit's bus side: it consumes queued descriptors (at the next memory access after an IQT
//!   write, as a unit does asynchronously) and writes the wait status, and [`FakePlatform::dma`]
//!   translates a request through a context cache and an IOTLB (which, in caching mode, also
//!   keep faults), so a missing invalidation shows as a stale translation.
//!
//! Misuse QEMU would refuse or the spec forbids is logged in [`FakeUnit::violations`]; tests
//! assert it stays empty.

// Test helpers: misuse of the fake itself panics.
#![allow(clippy::indexing_slicing, clippy::panic, clippy::expect_used)]

use super::fault::FaultReason;
use super::inv::Invalidation;
use super::regs::{self, ccmd, fectl, frcd, fsts, gcmd, gsts, iotlb, iqa, Cap, Ecap};
use super::walk::{Context, Translation, UnitMemory, UnitModel};
use super::Regs;
use crate::api::{Access, TableMemory, PAGE_SIZE};
use crate::Bdf;
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{Ref, RefCell, RefMut};

/// QEMU 7.2's default CAP (3-level tables, CM = 0).
pub const QEMU_CAP: u64 = 0x00d2_008c_2226_0206;
/// QEMU 7.2's CAP with `aw-bits=48` (3- and 4-level tables).
pub const QEMU_CAP_AW48: u64 = 0x00d2_008c_222f_0606;
/// CAP.CM, set by `caching-mode=on`.
pub const CAP_CM: u64 = 1 << 7;
/// QEMU 7.2's ECAP under TCG with `intremap=on` (QI, IR, PT; C = 0).
pub const QEMU_ECAP: u64 = 0x00f0_0f4a;

/// What memory a fresh frame holds before the CPU's zeroes are flushed to it.
pub const GARBAGE: u64 = 0xdead_beef_dead_beef;

const REG_WORDS: usize = 1024;

/// The registers QEMU aborts on (or that are 32-bit) when written 64 bits wide.
const REGS32: [usize; 16] = [
    regs::VER.0,
    regs::GCMD.0,
    regs::GSTS.0,
    regs::FSTS.0,
    regs::FECTL.0,
    regs::FEDATA.0,
    regs::FEADDR.0,
    regs::FEUADDR.0,
    regs::PMEN.0,
    regs::PLMBASE.0,
    regs::PLMLIMIT.0,
    regs::ICS.0,
    regs::IECTL.0,
    regs::IEDATA.0,
    regs::IEADDR.0,
    regs::IEUADDR.0,
];

/// The unit's state, shared by [`FakeRegs`] and [`FakePlatform`].
pub struct FakeUnit {
    pub cap: Cap,
    pub ecap: Ecap,
    regs: [u32; REG_WORDS],
    /// The root table latched by the last GCMD.SRTP.
    pub root: Option<u64>,
    /// Queued invalidation: the queue latched at GCMD.QIE, its size and head.
    iq_base: u64,
    iq_entries: u16,
    pub iq_head: u16,
    iq_pending: bool,
    /// The interrupt-remapping table latched by the last GCMD.SIRTP.
    pub irta: Option<u64>,
    next_record: u16,
    context_cache: BTreeMap<u16, Result<Context, FaultReason>>,
    iotlb: BTreeMap<(u16, u64, Access), Result<Translation, FaultReason>>,
    /// Every invalidation the unit carried out, in order (register and queued alike).
    pub invalidations: Vec<Invalidation>,
    /// Wait descriptors completed.
    pub waits: u32,
    /// Every GCMD write.
    pub gcmd_writes: Vec<u32>,
    /// Every fault event message sent: (FEADDR, FEDATA).
    pub fault_interrupts: Vec<(u32, u32)>,
    /// Misuse: things QEMU refuses or the specification forbids.
    pub violations: Vec<String>,
}

impl FakeUnit {
    fn new(cap: u64, ecap: u64) -> Self {
        let mut unit = FakeUnit {
            cap: Cap(cap),
            ecap: Ecap(ecap),
            regs: [0; REG_WORDS],
            root: None,
            iq_base: 0,
            iq_entries: 0,
            iq_head: 0,
            iq_pending: false,
            irta: None,
            next_record: 0,
            context_cache: BTreeMap::new(),
            iotlb: BTreeMap::new(),
            invalidations: Vec::new(),
            waits: 0,
            gcmd_writes: Vec::new(),
            fault_interrupts: Vec::new(),
            violations: Vec::new(),
        };
        unit.set32(regs::VER.0, 0x10);
        unit.set64(regs::CAP.0, cap);
        unit.set64(regs::ECAP.0, ecap);
        unit.set32(regs::FECTL.0, fectl::IM);
        unit
    }

    fn get32(&self, offset: usize) -> u32 {
        self.regs[offset / 4]
    }

    fn set32(&mut self, offset: usize, value: u32) {
        self.regs[offset / 4] = value;
    }

    fn get64(&self, offset: usize) -> u64 {
        u64::from(self.get32(offset)) | u64::from(self.get32(offset + 4)) << 32
    }

    fn set64(&mut self, offset: usize, value: u64) {
        self.set32(offset, value as u32);
        self.set32(offset + 4, (value >> 32) as u32);
    }

    /// The global status register.
    pub fn gsts(&self) -> u32 {
        self.get32(regs::GSTS.0)
    }

    /// Translation enabled (GSTS.TES).
    pub fn translating(&self) -> bool {
        self.gsts() & gsts::TES != 0
    }

    /// Queued invalidation enabled (GSTS.QIES).
    pub fn queued(&self) -> bool {
        self.gsts() & gsts::QIES != 0
    }

    fn status(&mut self, bit: u32, on: bool) {
        let value = self.gsts();
        self.set32(regs::GSTS.0, if on { value | bit } else { value & !bit });
    }

    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    fn record_range(&self, offset: usize) -> Option<(u16, usize)> {
        let first = self.cap.fault_record_offset();
        let count = usize::from(self.cap.fault_record_count());
        if offset >= first && offset < first + count * regs::FAULT_RECORD_BYTES {
            let rel = offset - first;
            Some(((rel / 16) as u16, rel % 16))
        } else {
            None
        }
    }

    fn write32(&mut self, offset: usize, value: u32) {
        if let Some((index, within)) = self.record_range(offset) {
            if within == frcd::F_DWORD_OFFSET && value & frcd::F_DWORD != 0 {
                self.clear_record(index);
            }
            return;
        }
        match offset {
            o if o == regs::GCMD.0 => self.gcmd(value),
            o if o == regs::VER.0 || o == regs::GSTS.0 || (8..0x18).contains(&o) => {}
            o if o == regs::FSTS.0 => {
                let clear = value & (fsts::PFO | fsts::IQE | fsts::ICE | fsts::ITE);
                let now = self.get32(o) & !clear;
                self.set32(o, now);
            }
            o if o == regs::FECTL.0 => {
                let pending = self.get32(o) & fectl::IP;
                self.set32(o, (value & fectl::IM) | pending);
                if value & fectl::IM == 0 && pending != 0 {
                    self.send_fault_event();
                }
            }
            o if o == regs::CCMD.0 + 4 => {
                self.set32(o, value);
                self.ccmd();
            }
            o if o == self.ecap.iotlb_offset() + 4 => {
                self.set32(o, value);
                self.iotlb_command();
            }
            o if o == regs::IQT.0 => {
                self.set32(o, value);
                self.iqt();
            }
            o => self.set32(o, value),
        }
    }

    fn write64(&mut self, offset: usize, value: u64) {
        if REGS32.contains(&offset) {
            panic!("64-bit write of {value:#x} to 32-bit register {offset:#x}: QEMU aborts");
        }
        if let Some((index, within)) = self.record_range(offset) {
            if within == 8 && value & frcd::F != 0 {
                self.clear_record(index);
            }
            return;
        }
        match offset {
            o if o == regs::CCMD.0 => {
                self.set64(o, value);
                self.ccmd();
            }
            o if o == self.ecap.iotlb_offset() => {
                self.set64(o, value);
                self.iotlb_command();
            }
            o if o == regs::IQT.0 => {
                self.set64(o, value);
                self.iqt();
            }
            o if o < 0x18 => {}
            o => self.set64(o, value),
        }
    }

    fn read32(&self, offset: usize) -> u32 {
        if offset == regs::GCMD.0 {
            return 0; // write-only
        }
        self.get32(offset)
    }

    fn gcmd(&mut self, value: u32) {
        self.gcmd_writes.push(value);
        let status = self.gsts();
        let persistent = gcmd::TE | gcmd::EAFL | gcmd::QIE | gcmd::IRE | gcmd::CFI;
        let changed = (value ^ status) & persistent;
        let one_shots = value & (gcmd::SRTP | gcmd::SFL | gcmd::WBF | gcmd::SIRTP);
        if changed.count_ones() + one_shots.count_ones() > 1 {
            self.violation(format!(
                "GCMD {value:#010x} with GSTS {status:#010x}: more than one command"
            ));
        }
        if changed & gcmd::TE != 0 {
            let on = value & gcmd::TE != 0;
            if on && self.root.is_none() {
                self.violation("translation enabled without a root table".into());
            }
            self.status(gsts::TES, on);
        }
        if value & gcmd::SRTP != 0 {
            let rtaddr = self.get64(regs::RTADDR.0);
            if rtaddr & 0xc00 != 0 {
                self.violation(format!("RTADDR {rtaddr:#x}: not legacy mode"));
            }
            self.root = Some(rtaddr & !0xfff);
            self.status(gsts::RTPS, true);
        }
        if changed & gcmd::QIE != 0 {
            if value & gcmd::QIE != 0 {
                if self.get64(regs::IQT.0) != 0 {
                    self.violation("queued invalidation enabled with IQT != 0".into());
                }
                let iqa_value = self.get64(regs::IQA.0);
                if iqa_value & iqa::DW != 0 {
                    self.violation("256-bit descriptors in legacy mode".into());
                }
                self.iq_base = iqa_value & !0xfff;
                self.iq_entries = 256 << (iqa_value & iqa::QS_MASK);
                self.iq_head = 0;
                self.set64(regs::IQH.0, 0);
            }
            self.status(gsts::QIES, value & gcmd::QIE != 0);
        }
        if value & gcmd::SIRTP != 0 {
            self.irta = Some(self.get64(regs::IRTA.0));
            self.status(gsts::IRTPS, true);
        }
        if changed & gcmd::IRE != 0 {
            let on = value & gcmd::IRE != 0;
            if on && self.irta.is_none() {
                self.violation("interrupt remapping enabled without a table".into());
            }
            self.status(gsts::IRES, on);
        }
        if changed & gcmd::CFI != 0 {
            self.status(gsts::CFIS, value & gcmd::CFI != 0);
        }
    }

    fn ccmd(&mut self) {
        let value = self.get64(regs::CCMD.0);
        if value & ccmd::ICC == 0 {
            return;
        }
        if self.queued() {
            self.violation("context command while queued invalidation is on (refused)".into());
            return;
        }
        let granularity = (value >> 61) & 3;
        let did = value as u16;
        let source = Bdf::from_rid((value >> ccmd::SID_SHIFT) as u16);
        let request = match granularity {
            1 => Invalidation::ContextGlobal,
            2 => Invalidation::ContextDomain { did },
            3 => Invalidation::ContextDevice { did, source },
            _ => {
                self.violation(format!("CCMD {value:#x}: bad granularity"));
                return;
            }
        };
        self.apply(request);
        let done =
            (value & !ccmd::ICC & !(3 << ccmd::CAIG_SHIFT)) | granularity << ccmd::CAIG_SHIFT;
        self.set64(regs::CCMD.0, done);
    }

    fn iotlb_command(&mut self) {
        let offset = self.ecap.iotlb_offset();
        let value = self.get64(offset);
        if value & iotlb::IVT == 0 {
            return;
        }
        if self.queued() {
            self.violation("IOTLB command while queued invalidation is on (refused)".into());
            return;
        }
        let granularity = (value >> 60) & 3;
        let did = (value >> iotlb::DID_SHIFT) as u16;
        let iva = self.get64(self.ecap.iva_offset());
        let request = match granularity {
            1 => Invalidation::IotlbGlobal,
            2 => Invalidation::IotlbDomain { did },
            3 => Invalidation::IotlbPages {
                did,
                addr: iva & !0xfff,
                am: (iva & 0x3f) as u8,
            },
            _ => {
                self.violation(format!("IOTLB command {value:#x}: bad granularity"));
                return;
            }
        };
        if !self.check_pages(request) {
            return;
        }
        self.apply(request);
        let done =
            (value & !iotlb::IVT & !(3 << iotlb::IAIG_SHIFT)) | granularity << iotlb::IAIG_SHIFT;
        self.set64(offset, done);
    }

    fn check_pages(&mut self, request: Invalidation) -> bool {
        if let Invalidation::IotlbPages { addr, am, .. } = request {
            if !self.cap.psi() || am > self.cap.mamv() {
                self.violation(format!("page-selective invalidation with AM {am}"));
                return false;
            }
            if (addr >> 12) % (1 << am) != 0 {
                self.violation(format!(
                    "page-selective address {addr:#x} not aligned to AM {am}"
                ));
            }
        }
        true
    }

    fn iqt(&mut self) {
        let tail = self.get64(regs::IQT.0);
        if tail & 0xf != 0 {
            self.violation(format!("IQT {tail:#x}: reserved bits"));
        }
        if self.queued() {
            self.iq_pending = true;
        }
    }

    /// Drops what `request` covers from the caches, and logs it.
    fn apply(&mut self, request: Invalidation) {
        match request {
            Invalidation::ContextGlobal => self.context_cache.clear(),
            Invalidation::ContextDomain { did } => self
                .context_cache
                .retain(|_, c| c.map_or(did != 0, |c| c.did != did)),
            Invalidation::ContextDevice { source, .. } => {
                self.context_cache.remove(&source.rid());
            }
            Invalidation::IotlbGlobal => self.iotlb.clear(),
            Invalidation::IotlbDomain { did } => self.iotlb.retain(|key, _| key.0 != did),
            Invalidation::IotlbPages { did, addr, am } => {
                let first = addr >> 12;
                let last = first + (1 << am);
                self.iotlb
                    .retain(|key, _| key.0 != did || key.1 < first || key.1 >= last);
            }
            Invalidation::IecGlobal | Invalidation::IecIndex { .. } => {}
        }
        self.invalidations.push(request);
    }

    fn clear_record(&mut self, index: u16) {
        let Some(offset) = self.cap.fault_record(index) else {
            return;
        };
        let hi = self.get64(offset + 8) & !frcd::F;
        self.set64(offset + 8, hi);
        self.update_ppf();
    }

    fn any_record(&self) -> bool {
        (0..self.cap.fault_record_count()).any(|i| {
            self.cap
                .fault_record(i)
                .is_some_and(|o| self.get64(o + 8) & frcd::F != 0)
        })
    }

    fn update_ppf(&mut self) {
        let status = self.get32(regs::FSTS.0);
        let status = if self.any_record() {
            status | fsts::PPF
        } else {
            status & !fsts::PPF
        };
        self.set32(regs::FSTS.0, status);
    }

    fn send_fault_event(&mut self) {
        let message = (self.get32(regs::FEADDR.0), self.get32(regs::FEDATA.0));
        self.fault_interrupts.push(message);
        let control = self.get32(regs::FECTL.0) & !fectl::IP;
        self.set32(regs::FECTL.0, control);
    }

    /// Records a fault as QEMU 7.2 does: compressed if a pending record has the same
    /// source, dropped with PFO if the next record is still full; the first pending fault
    /// sets PPF and FRI and raises the fault event (or sets FECTL.IP while masked).
    pub fn record_fault(&mut self, source: Bdf, addr: u64, access: Access, reason: FaultReason) {
        let count = self.cap.fault_record_count();
        let same_source = (0..count).any(|i| {
            self.cap.fault_record(i).is_some_and(|o| {
                let hi = self.get64(o + 8);
                hi & frcd::F != 0 && hi as u16 == source.rid()
            })
        });
        if same_source {
            return;
        }
        let index = self.next_record;
        let offset = self.cap.fault_record(index).expect("record index in range");
        if self.get64(offset + 8) & frcd::F != 0 {
            let status = self.get32(regs::FSTS.0) | fsts::PFO;
            self.set32(regs::FSTS.0, status);
            return;
        }
        self.set64(offset, addr & !0xfff);
        self.set64(offset + 8, super::fault::record_hi(source, reason, access));
        self.next_record = (index + 1) % count;
        let status = self.get32(regs::FSTS.0);
        if status & fsts::PPF == 0 {
            let status = (status & !0xff00) | fsts::PPF | u32::from(index) << 8;
            self.set32(regs::FSTS.0, status);
            if self.get32(regs::FECTL.0) & fectl::IM == 0 {
                self.send_fault_event();
            } else {
                let control = self.get32(regs::FECTL.0) | fectl::IP;
                self.set32(regs::FECTL.0, control);
            }
        }
    }
}

/// The register page of a [`FakeUnit`].
pub struct FakeRegs {
    unit: Rc<RefCell<FakeUnit>>,
}

impl Regs for FakeRegs {
    fn read32(&mut self, offset: usize) -> u32 {
        self.unit.borrow().read32(offset)
    }

    fn write32(&mut self, offset: usize, value: u32) {
        self.unit.borrow_mut().write32(offset, value);
    }

    fn read64(&mut self, offset: usize) -> u64 {
        let unit = self.unit.borrow();
        u64::from(unit.read32(offset)) | u64::from(unit.read32(offset + 4)) << 32
    }

    fn write64(&mut self, offset: usize, value: u64) {
        self.unit.borrow_mut().write64(offset, value);
    }
}

struct FakeFrame {
    /// What the CPU sees (its cache).
    cpu: Box<[u64; 512]>,
    /// What memory holds (what a non-coherent unit reads).
    ram: Box<[u64; 512]>,
}

/// Memory shared by the CPU and a [`FakeUnit`], and the unit's DMA side.
pub struct FakePlatform {
    unit: Rc<RefCell<FakeUnit>>,
    frames: BTreeMap<u64, FakeFrame>,
    next_frame: u64,
    coherent: bool,
    /// Allocation fails once this many frames are in use.
    pub frame_limit: Option<usize>,
    pub flushes: u64,
}

struct UnitView<'a> {
    frames: &'a BTreeMap<u64, FakeFrame>,
    coherent: bool,
}

impl UnitMemory for UnitView<'_> {
    fn read_u64(&self, phys: u64) -> u64 {
        let Some(frame) = self.frames.get(&(phys & !(PAGE_SIZE - 1))) else {
            return 0;
        };
        let index = ((phys & (PAGE_SIZE - 1)) >> 3) as usize;
        if self.coherent {
            frame.cpu[index]
        } else {
            frame.ram[index]
        }
    }
}

impl FakePlatform {
    /// A unit with these CAP and ECAP values, and its register page.
    pub fn new(cap: u64, ecap: u64) -> (FakePlatform, FakeRegs) {
        let unit = Rc::new(RefCell::new(FakeUnit::new(cap, ecap)));
        let platform = FakePlatform {
            unit: Rc::clone(&unit),
            frames: BTreeMap::new(),
            next_frame: 0x10_0000,
            coherent: Ecap(ecap).c(),
            frame_limit: None,
            flushes: 0,
        };
        (platform, FakeRegs { unit })
    }

    /// QEMU 7.2's unit as airlock runs it: `intremap=on,caching-mode=on`, with `aw-bits=48`
    /// if `aw48`.
    pub fn qemu(aw48: bool) -> (FakePlatform, FakeRegs) {
        let cap = if aw48 { QEMU_CAP_AW48 } else { QEMU_CAP };
        FakePlatform::new(cap | CAP_CM, QEMU_ECAP)
    }

    /// The unit's state.
    pub fn unit(&self) -> Ref<'_, FakeUnit> {
        self.unit.borrow()
    }

    /// The unit's state, to change (inject faults).
    pub fn unit_mut(&self) -> RefMut<'_, FakeUnit> {
        self.unit.borrow_mut()
    }

    /// Frames allocated and not freed.
    pub fn frames_in_use(&self) -> usize {
        self.frames.len()
    }

    /// Memory as the unit reads it.
    pub fn unit_memory(&self) -> impl UnitMemory + '_ {
        UnitView {
            frames: &self.frames,
            coherent: self.coherent,
        }
    }

    /// The unit consumes queued descriptors up to IQT: invalidations act on its caches; a
    /// wait descriptor writes its status (a snooped write: the CPU sees it). A bad
    /// descriptor sets FSTS.IQE and stops the queue at it.
    fn run_queue(&mut self) {
        let mut unit = self.unit.borrow_mut();
        if !unit.iq_pending || !unit.queued() {
            return;
        }
        unit.iq_pending = false;
        let tail = ((unit.get64(regs::IQT.0) >> iqa::INDEX_SHIFT) & 0x7fff) as u16;
        if tail >= unit.iq_entries {
            let status = unit.get32(regs::FSTS.0) | fsts::IQE;
            unit.set32(regs::FSTS.0, status);
            return;
        }
        while unit.iq_head != tail {
            let addr = unit.iq_base + u64::from(unit.iq_head) * 16;
            let view = UnitView {
                frames: &self.frames,
                coherent: self.coherent,
            };
            let (lo, hi) = (view.read_u64(addr), view.read_u64(addr + 8));
            let request = match lo & 0xf {
                1 if lo & 0xfffc_0000_0000_ffc0 == 0 && hi == 0 => {
                    let did = (lo >> 16) as u16;
                    match (lo >> 4) & 3 {
                        1 => Some(Invalidation::ContextGlobal),
                        2 => Some(Invalidation::ContextDomain { did }),
                        3 => Some(Invalidation::ContextDevice {
                            did,
                            source: Bdf::from_rid((lo >> 32) as u16),
                        }),
                        _ => None,
                    }
                }
                2 if lo & 0xffff_ffff_0000_ff00 == 0 && hi & 0xf80 == 0 => {
                    let did = (lo >> 16) as u16;
                    match (lo >> 4) & 3 {
                        1 => Some(Invalidation::IotlbGlobal),
                        2 => Some(Invalidation::IotlbDomain { did }),
                        3 => Some(Invalidation::IotlbPages {
                            did,
                            addr: hi & !0xfff,
                            am: (hi & 0x3f) as u8,
                        }),
                        _ => None,
                    }
                }
                4 if lo & 0xffff_0000_07ff_f1e0 == 0 && hi == 0 => Some(if lo & 0x10 == 0 {
                    Invalidation::IecGlobal
                } else {
                    Invalidation::IecIndex {
                        index: (lo >> 32) as u16,
                        im: ((lo >> 27) & 0x1f) as u8,
                    }
                }),
                5 if lo & 0xffff_ff80 == 0 && hi & 3 == 0 => {
                    if lo & super::inv::WAIT_SW != 0 {
                        let status = hi & !3;
                        let frame = self
                            .frames
                            .get_mut(&(status & !(PAGE_SIZE - 1)))
                            .expect("wait status address in a frame");
                        let index = ((status & (PAGE_SIZE - 1)) >> 3) as usize;
                        let shift = (status & 4) * 8;
                        let word =
                            (frame.cpu[index] & !(0xffff_ffff << shift)) | (lo >> 32) << shift;
                        frame.cpu[index] = word;
                        frame.ram[index] = word;
                    }
                    if lo & super::inv::WAIT_IF != 0 {
                        let ics = unit.get32(regs::ICS.0) | regs::ICS_IWC;
                        unit.set32(regs::ICS.0, ics);
                    }
                    unit.waits += 1;
                    None
                }
                _ => {
                    unit.violation(format!("bad descriptor {lo:#x} {hi:#x}"));
                    let status = unit.get32(regs::FSTS.0) | fsts::IQE;
                    unit.set32(regs::FSTS.0, status);
                    return;
                }
            };
            if let Some(request) = request {
                if !unit.check_pages(request) {
                    let status = unit.get32(regs::FSTS.0) | fsts::IQE;
                    unit.set32(regs::FSTS.0, status);
                    return;
                }
                unit.apply(request);
            }
            unit.iq_head = (unit.iq_head + 1) % unit.iq_entries;
            let head = u64::from(unit.iq_head) << iqa::INDEX_SHIFT;
            unit.set64(regs::IQH.0, head);
        }
    }

    /// A DMA request from `source` to `iova`: the physical address it reaches, or the fault
    /// reason the unit records (in the fault recording registers, unless FPD). With
    /// translation off the address passes unchanged. Uses and fills the context cache and the
    /// IOTLB; in caching mode (CAP.CM) faults are cached too.
    pub fn dma(&mut self, source: Bdf, iova: u64, access: Access) -> Result<u64, FaultReason> {
        self.run_queue();
        let mut unit = self.unit.borrow_mut();
        if !unit.translating() {
            return Ok(iova);
        }
        let model = UnitModel {
            cap: unit.cap,
            ecap: unit.ecap,
        };
        let caching_mode = unit.cap.cm();
        let view = UnitView {
            frames: &self.frames,
            coherent: self.coherent,
        };
        let root = unit.root.unwrap_or(0);
        let context = match unit.context_cache.get(&source.rid()) {
            Some(cached) => *cached,
            None => {
                let context = model.context(&view, root, source);
                if context.is_ok() || caching_mode {
                    unit.context_cache.insert(source.rid(), context);
                }
                context
            }
        };
        let result = context.and_then(|context| {
            let key = (context.did, iova >> 12, access);
            match unit.iotlb.get(&key) {
                Some(cached) => *cached,
                None => {
                    let walk = model.walk(&view, &context, iova, access);
                    if walk.is_ok() || caching_mode {
                        unit.iotlb.insert(key, walk);
                    }
                    walk
                }
            }
        });
        match result {
            Ok(translation) => Ok(translation.pa),
            Err(reason) => {
                if !context.is_ok_and(|c| c.fpd) {
                    unit.record_fault(source, iova, access, reason);
                }
                Err(reason)
            }
        }
    }
}

impl UnitMemory for FakePlatform {
    fn read_u64(&self, phys: u64) -> u64 {
        self.unit_memory().read_u64(phys)
    }
}

impl TableMemory for FakePlatform {
    fn alloc_frame(&mut self) -> Option<u64> {
        self.run_queue();
        if self
            .frame_limit
            .is_some_and(|limit| self.frames.len() >= limit)
        {
            return None;
        }
        let phys = self.next_frame;
        self.next_frame += PAGE_SIZE;
        let ram = if self.coherent { 0 } else { GARBAGE };
        self.frames.insert(
            phys,
            FakeFrame {
                cpu: Box::new([0; 512]),
                ram: Box::new([ram; 512]),
            },
        );
        Some(phys)
    }

    fn frame(&mut self, phys: u64) -> &mut [u64; 512] {
        self.run_queue();
        &mut self
            .frames
            .get_mut(&phys)
            .unwrap_or_else(|| panic!("{phys:#x} is not an allocated frame"))
            .cpu
    }

    fn flush(&mut self, phys: u64, len: usize) {
        self.run_queue();
        self.flushes += 1;
        let start = phys & !63;
        let end = (phys + len as u64 + 63) & !63;
        let mut line = start;
        while line < end {
            let frame = self
                .frames
                .get_mut(&(line & !(PAGE_SIZE - 1)))
                .unwrap_or_else(|| panic!("flush of {line:#x}: not a frame"));
            let first = ((line & (PAGE_SIZE - 1)) >> 3) as usize;
            let words = first..first + 8;
            frame.ram[words.clone()].copy_from_slice(&frame.cpu[words]);
            line += 64;
        }
    }

    fn free_frame(&mut self, phys: u64) {
        self.run_queue();
        if self.frames.remove(&phys).is_none() {
            panic!("free of {phys:#x}: not an allocated frame");
        }
    }

    fn load(&mut self, phys: u64) -> u64 {
        self.run_queue();
        let frame = &self.frames[&(phys & !(PAGE_SIZE - 1))];
        frame.cpu[((phys & (PAGE_SIZE - 1)) >> 3) as usize]
    }
}
