//! The VT-d unit driver: [`Vtd`] programs one remapping unit through [`Regs`], keeps its
//! [`Tables`], invalidates (queued where ECAP.QI, else by register), reads the fault log and
//! sets up interrupt remapping.
//!
//! Enable sequence ([`Vtd::enable`]):
//!
//! 1. allocate the root table (every bus not present: all DMA faults);
//! 2. program the fault event: FEDATA = vector, FEADDR = 0xFEE00000 | APIC id << 12,
//!    FEUADDR = 0, FECTL = 0 (unmasked);
//! 3. queued invalidation, when offered and wanted: IQT = 0, IQA = queue page (one page, 256
//!    descriptors of 128 bits), GCMD.QIE, wait GSTS.QIES;
//! 4. write-buffer flush if CAP.RWBF (GCMD.WBF, wait GSTS.WBFS clear);
//! 5. RTADDR = root table (legacy mode), GCMD.SRTP, wait GSTS.RTPS;
//! 6. global context-cache invalidation, then global IOTLB invalidation;
//! 7. GCMD.TE, wait GSTS.TES.
//!
//! GCMD keeps no state: each write is one command, made of the persistent enables read back
//! from GSTS ([`gsts::PERSISTENT`]) plus or minus the one bit that changes.

use super::fault::decode_record;
use super::inv::{covering_block, page_blocks, wait_descriptor, Invalidation, RegisterCommand};
use super::regs::{self, frcd, fsts, gcmd, gsts, iotlb, iqa, irta, Cap, Ecap, Version};
use super::tables::Tables;
use crate::api::{
    Attachment, Change, DomainId, Error, FaultRecord, FaultSummary, FrameSource, Iommu, Perm,
    TableMemory, PAGE_SIZE,
};
use crate::Bdf;

/// One remapping unit's register page, implemented by the hypervisor over the unit's MMIO
/// page (mapped uncached) and by `vtd::fake::FakeRegs` in host tests. `offset` is a
/// byte offset from the register base, aligned to the access width.
///
/// Width matters. These registers are 32-bit and must only be written with
/// [`Regs::write32`] (QEMU 7.2 aborts on a 64-bit write to several of them): VER, GCMD, GSTS,
/// FSTS, FECTL, FEDATA, FEADDR, FEUADDR, PMEN, PLMBASE, PLMLIMIT, ICS, IECTL, IEDATA, IEADDR,
/// IEUADDR, and each dword of a fault recording register (F is cleared by a 32-bit write to
/// the record's last dword). These are 64-bit and written with [`Regs::write64`]: RTADDR,
/// CCMD, IVA and the IOTLB register, IQH, IQT, IQA, IRTA (QEMU acts on a command register
/// on a 64-bit write or on a write of its high dword).
pub trait Regs {
    fn read32(&mut self, offset: usize) -> u32;
    fn write32(&mut self, offset: usize, value: u32);
    fn read64(&mut self, offset: usize) -> u64;
    fn write64(&mut self, offset: usize, value: u64);

    /// Called between two polls of a status the unit has not set yet.
    fn relax(&mut self) {
        core::hint::spin_loop();
    }
}

/// Polls of a status before [`Error::Timeout`]. QEMU completes every command during the
/// register write; real units within microseconds.
pub const POLL_LIMIT: u32 = 1 << 22;

/// Descriptors in the invalidation queue (one page of 128-bit descriptors, IQA.QS = 0).
pub const QUEUE_ENTRIES: u16 = 256;

/// Most descriptors submitted before a wait; larger batches are split.
const BATCH: usize = 64;

/// More page-selective blocks than this become one domain-selective invalidation.
const MAX_PAGE_BLOCKS: usize = 16;

/// How the fault event interrupt is delivered, and which invalidation interface to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// The vector the fault event MSI raises.
    pub fault_vector: u8,
    /// The xAPIC id of the CPU it goes to.
    pub fault_apic_id: u8,
    /// Use queued invalidation when ECAP.QI offers it (needed for interrupt remapping).
    pub queued: bool,
}

/// The invalidation interface in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidationMode {
    /// CCMD and the IOTLB register.
    Register,
    /// The invalidation queue.
    Queued,
}

impl InvalidationMode {
    /// "register" or "queued", as the `iommu_enabled` event prints it.
    pub const fn name(self) -> &'static str {
        match self {
            InvalidationMode::Register => "register",
            InvalidationMode::Queued => "queued",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Queue {
    base: u64,
    /// The status word wait descriptors write.
    status: u64,
    tail: u16,
    seq: u32,
}

#[derive(Clone, Copy, Debug)]
struct Irt {
    base: u64,
    entries: u32,
}

/// An interrupt-remapping table entry (remapped, not posted): fixed delivery, edge trigger,
/// physical destination in xAPIC form, and source validation: only requests whose
/// requester id is `source` may use it (SVT = 1, SQ = 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Irte {
    pub vector: u8,
    pub dest_apic_id: u8,
    pub source: Bdf,
}

/// IRTE low quadword: present.
pub const IRTE_P: u64 = 1;
/// IRTE high quadword: source validation type 1 (verify the full requester id), bits 19:18.
pub const IRTE_SVT_RID: u64 = 1 << 18;

impl Irte {
    /// The 128-bit entry, low and high quadwords: P (bit 0), FPD = 0, DM = 0 (physical),
    /// RH = 0, TM = 0 (edge), DLM = 0 (fixed), IM = 0 (remapped), V (bits 23:16), DST (bits
    /// 63:32, the xAPIC id in DST bits 15:8); high: SID (bits 15:0), SQ = 0, SVT = 1.
    pub const fn encode(self) -> [u64; 2] {
        [
            IRTE_P | (self.vector as u64) << 16 | (self.dest_apic_id as u64) << 40,
            self.source.rid() as u64 | IRTE_SVT_RID,
        ]
    }

    /// Decodes a present entry written by [`Irte::encode`].
    pub const fn decode(raw: [u64; 2]) -> Option<Irte> {
        if raw[0] & IRTE_P == 0 {
            return None;
        }
        Some(Irte {
            vector: (raw[0] >> 16) as u8,
            dest_apic_id: (raw[0] >> 40) as u8,
            source: Bdf::from_rid(raw[1] as u16),
        })
    }
}

/// An MSI address/data pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msi {
    pub address: u32,
    pub data: u32,
}

/// The remappable-format MSI that names interrupt-remapping entry `index`: address
/// `0xFEE00000 | handle[14:0] << 5 | 1 << 4 (remappable) | 1 << 3 (SHV) | handle[15] << 2`,
/// data 0 (the subhandle, added to the handle because SHV is set).
pub const fn remappable_msi(index: u16) -> Msi {
    let handle = index as u32;
    Msi {
        address: 0xfee0_0000 | (handle & 0x7fff) << 5 | 1 << 4 | 1 << 3 | (handle >> 15) << 2,
        data: 0,
    }
}

/// One VT-d remapping unit.
pub struct Vtd<R: Regs> {
    regs: R,
    version: Version,
    cap: Cap,
    ecap: Ecap,
    tables: Option<Tables>,
    queue: Option<Queue>,
    irt: Option<Irt>,
    counts: super::inv::InvalidationCounts,
}

impl<R: Regs> Vtd<R> {
    /// The invalidations asked of the unit so far, by kind.
    pub fn invalidation_counts(&self) -> super::inv::InvalidationCounts {
        self.counts
    }

    /// Reads the unit's VER, CAP and ECAP; changes nothing.
    pub fn new(mut regs: R) -> Self {
        let version = Version(regs.read32(regs::VER.offset()));
        let cap = Cap(regs.read64(regs::CAP.offset()));
        let ecap = Ecap(regs.read64(regs::ECAP.offset()));
        Vtd {
            regs,
            version,
            cap,
            ecap,
            tables: None,
            queue: None,
            irt: None,
            counts: super::inv::InvalidationCounts::default(),
        }
    }

    pub const fn version(&self) -> Version {
        self.version
    }

    pub const fn cap(&self) -> Cap {
        self.cap
    }

    pub const fn ecap(&self) -> Ecap {
        self.ecap
    }

    /// The register window (for the hypervisor's own diagnostics, and for tests).
    pub fn regs(&mut self) -> &mut R {
        &mut self.regs
    }

    /// The global status register, read now.
    pub fn gsts(&mut self) -> u32 {
        self.regs.read32(regs::GSTS.offset())
    }

    /// The interrupt-remapping table address register, read now: the table's address | S.
    pub fn irta(&mut self) -> u64 {
        self.regs.read64(regs::IRTA.offset())
    }

    /// Entries in the interrupt-remapping table (0 before
    /// [`Vtd::enable_interrupt_remapping`]).
    pub fn ir_entries(&self) -> u32 {
        self.irt.map_or(0, |irt| irt.entries)
    }

    /// The invalidation interface in use, once enabled.
    pub fn invalidation(&self) -> Option<InvalidationMode> {
        self.tables.as_ref()?;
        Some(if self.queue.is_some() {
            InvalidationMode::Queued
        } else {
            InvalidationMode::Register
        })
    }

    /// The tables, once enabled.
    pub fn tables(&self) -> Option<&Tables> {
        self.tables.as_ref()
    }

    /// One GCMD command: the persistent enables from GSTS, with `set` added and `clear`
    /// removed; then waits until GSTS's `status` bit is `want`.
    fn command(&mut self, set: u32, clear: u32, status: u32, want: bool) -> Result<(), Error> {
        let persistent = self.gsts() & gsts::PERSISTENT;
        self.regs
            .write32(regs::GCMD.offset(), (persistent & !clear) | set);
        self.poll(status, want)
    }

    fn poll(&mut self, status: u32, want: bool) -> Result<(), Error> {
        for _ in 0..POLL_LIMIT {
            if (self.gsts() & status != 0) == want {
                return Ok(());
            }
            self.regs.relax();
        }
        Err(Error::Timeout(match status {
            gsts::TES => "translation enable",
            gsts::RTPS => "set root table pointer",
            gsts::WBFS => "write-buffer flush",
            gsts::QIES => "queued invalidation enable",
            gsts::IRES => "interrupt remapping enable",
            gsts::IRTPS => "set interrupt remap table pointer",
            gsts::CFIS => "compatibility format interrupt",
            _ => "global command",
        }))
    }

    /// The enable sequence of the module doc. Afterwards translation is on and every function
    /// faults until attached.
    pub fn enable<M: TableMemory>(&mut self, mem: &mut M, config: &Config) -> Result<(), Error> {
        if self.tables.is_some() {
            return Err(Error::AlreadyEnabled);
        }
        if self.cap.supported_levels().max().is_none() {
            return Err(Error::Unsupported("any second-level table depth"));
        }
        let tables = Tables::new(mem, self.cap, self.ecap)?;
        let root = tables.root();

        self.regs
            .write32(regs::FEDATA.offset(), u32::from(config.fault_vector));
        self.regs.write32(
            regs::FEADDR.offset(),
            0xfee0_0000 | u32::from(config.fault_apic_id) << 12,
        );
        self.regs.write32(regs::FEUADDR.offset(), 0);
        self.regs.write32(regs::FECTL.offset(), 0);

        if config.queued && self.ecap.qi() {
            self.enable_queue(mem)?;
        }
        self.write_buffer_flush()?;
        self.regs.write64(regs::RTADDR.offset(), root);
        self.command(gcmd::SRTP, 0, gsts::RTPS, true)?;
        self.tables = Some(tables);
        self.invalidate(
            mem,
            &[Invalidation::ContextGlobal, Invalidation::IotlbGlobal],
        )?;
        self.command(gcmd::TE, 0, gsts::TES, true)
    }

    fn enable_queue<M: TableMemory>(&mut self, mem: &mut M) -> Result<(), Error> {
        if self.gsts() & gsts::QIES != 0 {
            // Left on by firmware: turn it off before moving the queue.
            self.command(0, gcmd::QIE, gsts::QIES, false)?;
        }
        let base = mem.alloc_frame().ok_or(Error::OutOfFrames)?;
        let status = mem.alloc_frame().ok_or(Error::OutOfFrames)?;
        self.regs.write64(regs::IQT.offset(), 0);
        self.regs.write64(regs::IQA.offset(), base); // QS = 0, DW = 0 (128-bit)
        self.command(gcmd::QIE, 0, gsts::QIES, true)?;
        self.queue = Some(Queue {
            base,
            status,
            tail: 0,
            seq: 0,
        });
        Ok(())
    }

    fn write_buffer_flush(&mut self) -> Result<(), Error> {
        if self.cap.rwbf() {
            self.command(gcmd::WBF, 0, gsts::WBFS, false)?;
        }
        Ok(())
    }

    /// Carries out `requests` in order and returns when the unit has completed them: through
    /// the queue (followed by a wait descriptor whose status write is polled), or by register.
    pub fn invalidate<M: TableMemory>(
        &mut self,
        mem: &mut M,
        requests: &[Invalidation],
    ) -> Result<(), Error> {
        requests.iter().for_each(|r| self.counts.count(r));
        if self.queue.is_some() {
            for batch in requests.chunks(BATCH) {
                self.submit(mem, batch)?;
            }
            Ok(())
        } else {
            requests
                .iter()
                .try_for_each(|request| self.register_invalidate(*request))
        }
    }

    fn submit<M: TableMemory>(&mut self, mem: &mut M, batch: &[Invalidation]) -> Result<(), Error> {
        let mut queue = self.queue.ok_or(Error::NotEnabled)?;
        let (dr, dw) = (self.cap.drd(), self.cap.dwd());
        queue.seq = queue.seq.wrapping_add(1);
        let wait = wait_descriptor(queue.status, queue.seq);
        let descriptors = batch.iter().map(|r| r.descriptor(dr, dw)).chain([wait]);
        for descriptor in descriptors {
            let slot = queue.base + u64::from(queue.tail) * 16;
            let frame = mem.frame(queue.base);
            let index = usize::from(queue.tail) * 2;
            if let Some(words) = frame.get_mut(index..index + 2) {
                words.copy_from_slice(&descriptor);
            }
            if !self.ecap.c() {
                mem.flush(slot, 16);
            }
            queue.tail = (queue.tail + 1) % QUEUE_ENTRIES;
        }
        self.queue = Some(queue);
        self.regs.write64(
            regs::IQT.offset(),
            u64::from(queue.tail) << iqa::INDEX_SHIFT,
        );
        for _ in 0..POLL_LIMIT {
            if mem.load(queue.status) as u32 == queue.seq {
                return Ok(());
            }
            let status = self.regs.read32(regs::FSTS.offset());
            if status & fsts::IQE != 0 {
                // The unit stopped at a descriptor it refused: drop the rest of the batch.
                let head = (self.regs.read64(regs::IQH.offset()) >> iqa::INDEX_SHIFT) as u16
                    % QUEUE_ENTRIES;
                self.regs
                    .write64(regs::IQT.offset(), u64::from(head) << iqa::INDEX_SHIFT);
                self.regs.write32(regs::FSTS.offset(), fsts::IQE);
                if let Some(q) = self.queue.as_mut() {
                    q.tail = head;
                }
                return Err(Error::QueueError { head });
            }
            self.regs.relax();
        }
        Err(Error::Timeout("invalidation wait"))
    }

    fn register_invalidate(&mut self, request: Invalidation) -> Result<(), Error> {
        let command = request
            .register_command(self.cap.drd(), self.cap.dwd())
            .ok_or(Error::Unsupported(
                "interrupt entry cache invalidation without queued invalidation",
            ))?;
        let (offset, busy) = match command {
            RegisterCommand::Context(value) => {
                self.regs.write64(regs::CCMD.offset(), value);
                (regs::CCMD.offset(), regs::ccmd::ICC)
            }
            RegisterCommand::Iotlb { iva, command } => {
                if let Some(iva) = iva {
                    self.regs.write64(self.ecap.iva_offset(), iva);
                }
                self.regs.write64(self.ecap.iotlb_offset(), command);
                (self.ecap.iotlb_offset(), iotlb::IVT)
            }
        };
        for _ in 0..POLL_LIMIT {
            if self.regs.read64(offset) & busy == 0 {
                return Ok(());
            }
            self.regs.relax();
        }
        Err(Error::Timeout("register-based invalidation"))
    }

    /// Invalidates the IOTLB for `iova..iova + len` of `did`: page-selective where CAP.PSI
    /// allows and the range needs few blocks, else domain-selective.
    fn invalidate_range<M: TableMemory>(
        &mut self,
        mem: &mut M,
        did: DomainId,
        iova: u64,
        len: u64,
    ) -> Result<(), Error> {
        let mut requests = [Invalidation::IotlbGlobal; MAX_PAGE_BLOCKS];
        let mut count = 0;
        let mut fits = self.cap.psi();
        if fits {
            for (addr, am) in page_blocks(iova, len, self.cap.mamv()) {
                match requests.get_mut(count) {
                    Some(slot) => *slot = Invalidation::IotlbPages { did, addr, am },
                    None => {
                        fits = false;
                        break;
                    }
                }
                count += 1;
            }
        }
        if fits {
            let used = requests.get(..count).unwrap_or(&[]);
            self.invalidate(mem, used)
        } else {
            self.invalidate(mem, &[Invalidation::IotlbDomain { did }])
        }
    }

    /// Invalidates the IOTLB for `lo..hi` of `did` with one request: the smallest aligned
    /// power-of-two block of pages that covers the range, page-selective (address mask AM)
    /// where CAP.PSI offers it and AM fits CAP.MAMV, else domain-selective. Either is correct
    /// on VT-d (a wider invalidation only drops more cached translations); under QEMU 7.2 both
    /// cost one pass over its IOTLB hash table, so one request per batch is what counts.
    fn invalidate_covering<M: TableMemory>(
        &mut self,
        mem: &mut M,
        did: DomainId,
        lo: u64,
        hi: u64,
    ) -> Result<(), Error> {
        let request = covering_block(lo, hi)
            .filter(|&(_, am)| self.cap.psi() && am <= self.cap.mamv())
            .map_or(Invalidation::IotlbDomain { did }, |(addr, am)| {
                Invalidation::IotlbPages { did, addr, am }
            });
        self.invalidate(mem, &[request])
    }

    /// `bdf`'s context entry read back from the live tables: (domain id, levels, SLPTPTR).
    pub fn context_entry<M: TableMemory>(&self, mem: &mut M, bdf: Bdf) -> Option<Attachment> {
        self.tables.as_ref()?.context_entry(mem, bdf)
    }

    /// Sets up interrupt remapping with a table of `entries` (a power of two, 2 to 256: one
    /// frame) entries, all not present: IRTA (xAPIC mode), GCMD.SIRTP, wait GSTS.IRTPS, a
    /// global interrupt-entry-cache invalidation, compatibility-format interrupts blocked
    /// (GCMD.CFI clear, GSTS.CFIS clear), then GCMD.IRE, wait GSTS.IRES. Needs queued
    /// invalidation (the interrupt entry cache has no register interface).
    pub fn enable_interrupt_remapping<M: TableMemory>(
        &mut self,
        mem: &mut M,
        entries: u32,
    ) -> Result<(), Error> {
        if self.tables.is_none() {
            return Err(Error::NotEnabled);
        }
        if !self.ecap.ir() {
            return Err(Error::Unsupported("interrupt remapping"));
        }
        if self.queue.is_none() {
            return Err(Error::Unsupported(
                "interrupt remapping without queued invalidation",
            ));
        }
        if !entries.is_power_of_two() || !(2..=256).contains(&entries) {
            return Err(Error::BadTableSize(entries));
        }
        if self.irt.is_some() {
            return Err(Error::AlreadyEnabled);
        }
        let base = mem.alloc_frame().ok_or(Error::OutOfFrames)?;
        if !self.ecap.c() {
            mem.flush(base, PAGE_SIZE as usize);
        }
        let size = u64::from(entries.trailing_zeros() - 1);
        self.regs
            .write64(regs::IRTA.offset(), (base & irta::ADDR_MASK) | size);
        self.command(gcmd::SIRTP, 0, gsts::IRTPS, true)?;
        self.irt = Some(Irt { base, entries });
        self.invalidate(mem, &[Invalidation::IecGlobal])?;
        if self.gsts() & gsts::CFIS != 0 {
            self.command(0, gcmd::CFI, gsts::CFIS, false)?;
        }
        self.command(gcmd::IRE, 0, gsts::IRES, true)
    }

    fn irte_slot(&self, index: u16) -> Result<(u64, usize), Error> {
        let irt = self.irt.ok_or(Error::NotEnabled)?;
        if u32::from(index) >= irt.entries {
            return Err(Error::BadIndex(u32::from(index)));
        }
        Ok((irt.base, usize::from(index) * 2))
    }

    fn write_irte<M: TableMemory>(
        &mut self,
        mem: &mut M,
        index: u16,
        raw: [u64; 2],
    ) -> Result<(), Error> {
        let (base, word) = self.irte_slot(index)?;
        let frame = mem.frame(base);
        // The present bit goes in last and comes out first.
        let order = if raw[0] & IRTE_P != 0 { [1, 0] } else { [0, 1] };
        for half in order {
            if let (Some(slot), Some(value)) = (frame.get_mut(word + half), raw.get(half)) {
                *slot = *value;
            }
        }
        if !self.ecap.c() {
            mem.flush(base + word as u64 * 8, 16);
        }
        self.invalidate(mem, &[Invalidation::IecIndex { index, im: 0 }])
    }

    /// Writes interrupt-remapping entry `index` and invalidates its cached copy. Give the
    /// device [`remappable_msi`]`(index)`.
    pub fn set_irte<M: TableMemory>(
        &mut self,
        mem: &mut M,
        index: u16,
        irte: Irte,
    ) -> Result<(), Error> {
        self.write_irte(mem, index, irte.encode())
    }

    /// Makes entry `index` not present (interrupts naming it fault) and invalidates it.
    pub fn clear_irte<M: TableMemory>(&mut self, mem: &mut M, index: u16) -> Result<(), Error> {
        self.write_irte(mem, index, [0, 0])
    }

    /// Entry `index` read back from the table.
    pub fn irte<M: TableMemory>(&self, mem: &mut M, index: u16) -> Option<Irte> {
        let (base, word) = self.irte_slot(index).ok()?;
        let frame = mem.frame(base);
        let raw = [*frame.get(word)?, *frame.get(word + 1)?];
        Irte::decode(raw)
    }

    /// Reports every fault record with F set, starting at FSTS.FRI, clears each (a 32-bit
    /// write of F to the record's last dword), then clears FSTS.PFO (32-bit write-1-to-clear;
    /// PPF follows the records).
    pub fn take_faults(&mut self, mut f: impl FnMut(FaultRecord)) -> FaultSummary {
        let status = self.regs.read32(regs::FSTS.offset());
        let count = self.cap.fault_record_count();
        let mut summary = FaultSummary {
            taken: 0,
            overflowed: status & fsts::PFO != 0,
        };
        if status & fsts::PPF != 0 {
            let first = fsts::fri(status) % count;
            for k in 0..count {
                let index = (first + k) % count;
                let Some(offset) = self.cap.fault_record(index) else {
                    continue;
                };
                let hi = self.regs.read64(offset + 8);
                if hi & frcd::F == 0 {
                    continue;
                }
                let lo = self.regs.read64(offset);
                self.regs
                    .write32(offset + frcd::F_DWORD_OFFSET, frcd::F_DWORD);
                summary.taken += 1;
                f(decode_record(index, lo, hi));
            }
        }
        if status & (fsts::PFO | fsts::PPF) != 0 {
            self.regs
                .write32(regs::FSTS.offset(), fsts::PFO | fsts::PPF);
        }
        summary
    }

    fn tables_mut(&mut self) -> Result<&mut Tables, Error> {
        self.tables.as_mut().ok_or(Error::NotEnabled)
    }
}

impl<R: Regs, M: TableMemory> Iommu<M> for Vtd<R> {
    fn levels_for(&self, address_bits: u8) -> Option<u8> {
        self.cap
            .supported_levels()
            .iter()
            .find(|&levels| regs::level_address_bits(levels) >= address_bits)
    }

    fn add_domain(&mut self, mem: &mut M, did: DomainId, levels: u8) -> Result<(), Error> {
        self.tables_mut()?.add_domain(mem, did, levels)
    }

    fn remove_domain(&mut self, mem: &mut M, did: DomainId) -> Result<(), Error> {
        let tables = self.tables_mut()?;
        match tables.domain(did) {
            None => return Err(Error::NoDomain(did)),
            Some(domain) if domain.attached != 0 => return Err(Error::DomainInUse(did)),
            Some(_) => {}
        }
        // Nothing may still hold a walk through the tables about to be freed.
        self.invalidate(mem, &[Invalidation::IotlbDomain { did }])?;
        self.tables_mut()?.remove_domain(mem, did)
    }

    /// Writes the context entry. Without caching mode a not-present to present change needs
    /// no invalidation (only a write-buffer flush where CAP.RWBF); with CAP.CM the unit may
    /// have cached the not-present entry under domain id 0, so that is invalidated.
    fn attach(&mut self, mem: &mut M, bdf: Bdf, did: DomainId) -> Result<(), Error> {
        let changed = self.tables_mut()?.attach(mem, bdf, did)?;
        if !changed {
            return Ok(());
        }
        if self.cap.cm() {
            self.invalidate(
                mem,
                &[
                    Invalidation::ContextDevice {
                        did: 0,
                        source: bdf,
                    },
                    Invalidation::IotlbDomain { did: 0 },
                ],
            )
        } else {
            self.write_buffer_flush()
        }
    }

    /// Clears the context entry, then device-selective context-cache invalidation and
    /// domain-selective IOTLB invalidation for the domain it was in.
    fn detach(&mut self, mem: &mut M, bdf: Bdf) -> Result<DomainId, Error> {
        let did = self.tables_mut()?.detach(mem, bdf)?;
        self.invalidate(
            mem,
            &[
                Invalidation::ContextDevice { did, source: bdf },
                Invalidation::IotlbDomain { did },
            ],
        )?;
        Ok(did)
    }

    /// Maps, then invalidates the range page-selectively if a present mapping changed or the
    /// unit is in caching mode (which caches not-present entries too); otherwise only flushes
    /// the write buffer where CAP.RWBF.
    fn map(
        &mut self,
        mem: &mut M,
        did: DomainId,
        iova: u64,
        pa: u64,
        len: u64,
        perm: Perm,
    ) -> Result<(), Error> {
        let (done, error) = match self.tables_mut()?.map(mem, did, iova, pa, len, perm) {
            Ok(done) => (done, None),
            Err(failed) => (failed.done, Some(failed.error)),
        };
        if done.bytes != 0 {
            if done.replaced || self.cap.cm() {
                self.invalidate_range(mem, did, iova, done.bytes)?;
            } else {
                self.write_buffer_flush()?;
            }
        }
        error.map_or(Ok(()), Err)
    }

    fn unmap(&mut self, mem: &mut M, did: DomainId, iova: u64, len: u64) -> Result<u64, Error> {
        let unmapped = self.tables_mut()?.unmap(mem, did, iova, len)?;
        if unmapped.bytes != 0 {
            self.invalidate_range(mem, did, unmapped.iova, unmapped.len)?;
        }
        Ok(unmapped.bytes)
    }

    /// The unmaps, then the maps, each a pass over the tables (one walk per level-1 table,
    /// one cache flush per run of entries), then one invalidation covering every range that
    /// was unmapped, remapped, or (caching mode) newly mapped ([`Vtd::invalidate_covering`]).
    /// Without caching mode, a batch that only adds mappings needs no invalidation (only a
    /// write-buffer flush where CAP.RWBF).
    fn apply_frames(
        &mut self,
        mem: &mut M,
        did: DomainId,
        changes: &[Change],
        frames: &dyn FrameSource,
    ) -> Result<u64, Error> {
        let cm = self.cap.cm();
        let done = self.tables_mut()?.apply(mem, did, changes, frames, cm);
        match done.span {
            Some((lo, hi)) => self.invalidate_covering(mem, did, lo, hi)?,
            None if done.mapped => self.write_buffer_flush()?,
            None => {}
        }
        done.error.map_or(Ok(done.unmapped), Err)
    }

    fn mapped_bytes(&self, mem: &mut M, did: DomainId, iova: u64, len: u64) -> Result<u64, Error> {
        self.tables
            .as_ref()
            .ok_or(Error::NotEnabled)?
            .mapped_bytes(mem, did, iova, len)
    }

    fn attachment(&self, mem: &mut M, bdf: Bdf) -> Option<Attachment> {
        self.context_entry(mem, bdf)
    }

    fn take_faults(&mut self, f: impl FnMut(FaultRecord)) -> FaultSummary {
        Vtd::take_faults(self, f)
    }
}
