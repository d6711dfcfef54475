//! VT-d translation tables in legacy (non-scalable) mode: the root table, context tables and
//! second-level page tables, built in frames from [`TableMemory`]. Pure table logic: the
//! invalidations a change needs are the caller's ([`super::Vtd`] does them).
//!
//! - Root table: one frame, 256 entries of 16 bytes, one per bus: P (bit 0) and the context
//!   table's address (CTP, bits 63:12); the high quadword is reserved.
//! - Context table: one frame per bus, 256 entries of 16 bytes, one per device and function:
//!   low quadword P (bit 0), FPD (bit 1, left 0 so faults are recorded), TT (bits 3:2, 0:
//!   untranslated requests through the second-level tables), SLPTPTR (bits 63:12); high
//!   quadword AW (bits 2:0: 1 3-level, 2 4-level, 3 5-level) and DID (bits 23:8).
//! - Second-level tables: 512 8-byte entries: R (bit 0), W (bit 1), PS (bit 7: a 2 MiB page
//!   at level 2, 1 GiB at level 3), the address (bits 51:12). A non-leaf entry carries R and
//!   W, so the leaf alone decides the permission.
//!
//! Only functions attached get a context entry (default deny). Page tables emptied by unmap
//! stay allocated until their domain is removed, so a frame is never freed while the unit may
//! still walk it.

use super::regs::{level_address_bits, Cap, Ecap};
use crate::api::{
    Attachment, Change, DomainId, Error, FrameSource, Perm, TableMemory, FRAME_BLOCK, PAGE_SIZE,
};
use crate::Bdf;

/// Root entry fields.
pub mod root {
    pub const P: u64 = 1;
    pub const CTP: u64 = super::pte::ADDR;
    pub const RESERVED_LO: u64 = 0xffe;
}

/// Context entry fields.
pub mod ctx {
    /// Low quadword: present.
    pub const P: u64 = 1;
    /// Low quadword: fault processing disable.
    pub const FPD: u64 = 1 << 1;
    /// Low quadword: translation type, bits 3:2.
    pub const TT_SHIFT: u32 = 2;
    /// Low quadword: second-level page-table pointer.
    pub const SLPTPTR: u64 = super::pte::ADDR;
    pub const RESERVED_LO: u64 = 0xff0;
    /// High quadword: address width, bits 2:0 (levels - 2).
    pub const AW_MASK: u64 = 7;
    /// High quadword: domain id, bits 23:8.
    pub const DID_SHIFT: u32 = 8;
    pub const RESERVED_HI: u64 = 0xffff_ffff_ff00_0080;
}

/// Second-level paging entry fields.
pub mod pte {
    pub const R: u64 = 1 << 0;
    pub const W: u64 = 1 << 1;
    /// Page size: the entry maps a large page (levels 2 and 3).
    pub const PS: u64 = 1 << 7;
    /// Snoop (reserved without ECAP.SC; airlock leaves it 0).
    pub const SNP: u64 = 1 << 11;
    /// Address bits 51:12.
    pub const ADDR: u64 = 0x000f_ffff_ffff_f000;
    /// Bits 63:52, ignored by the unit.
    pub const IGNORED_HIGH: u64 = 0xfff0_0000_0000_0000;

    /// Index of `iova`'s entry in a level-`level` table (level 1 maps 4 KiB pages).
    pub const fn index(iova: u64, level: u8) -> usize {
        ((iova >> (12 + 9 * (level as u32 - 1))) & 511) as usize
    }

    /// Bytes one entry of a level-`level` table covers.
    pub const fn level_bytes(level: u8) -> u64 {
        1 << (12 + 9 * (level as u32 - 1))
    }
}

/// Most domains a [`Tables`] holds at once.
pub const MAX_DOMAINS: usize = 32;

const LARGE_2M: u64 = 2 << 20;

/// One domain's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Domain {
    pub did: DomainId,
    pub levels: u8,
    /// The top-level table.
    pub table: u64,
    /// Functions attached.
    pub attached: u32,
    /// A large page was mapped in it at some time (unmaps then check first that they split
    /// none).
    pub large: bool,
}

/// What [`Tables::map`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mapped {
    /// Bytes mapped, from the start of the range.
    pub bytes: u64,
    /// A present mapping was replaced (needs invalidation even without caching mode).
    pub replaced: bool,
}

/// The level-1 table a run of 4 KiB entries is being written in (the 2 MiB region it maps,
/// its address) and the entries written there, not flushed yet.
#[derive(Clone, Copy, Debug, Default)]
struct LeafRun {
    table: Option<(u64, u64)>,
    dirty: Option<(usize, usize)>,
}

impl LeafRun {
    /// Notes that entries `first..first + n` of the run's table were written.
    fn wrote(&mut self, first: usize, n: usize) {
        if n == 0 {
            return;
        }
        let last = first + n - 1;
        self.dirty = Some(
            self.dirty
                .map_or((first, last), |(lo, hi)| (lo.min(first), hi.max(last))),
        );
    }
}

/// What [`Tables::apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Bytes the unmaps removed.
    pub unmapped: u64,
    /// The smallest range covering everything that needs invalidating: what was unmapped,
    /// what replaced a present entry, and (`all_maps`) everything mapped.
    pub span: Option<(u64, u64)>,
    /// Something was mapped.
    pub mapped: bool,
    /// Where it stopped, if it did; what came before stays done.
    pub error: Option<Error>,
}

impl Applied {
    fn widen(&mut self, iova: u64, len: u64) {
        let (lo, hi) = (iova, iova.saturating_add(len));
        self.span = Some(self.span.map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
    }
}

/// Most runs of level-1 entries [`Found`] notes (a strict driver's batch carries a few
/// requests' unmaps, each usually one run); past that the unmaps walk again.
const FOUND_RUNS: usize = 32;

/// What the checks of a batch's [`Change::UnmapMapped`] changes found: the runs of level-1
/// entries to clear (table, first entry, entries), the bytes they map, the range they span.
#[derive(Clone, Copy, Debug)]
struct Found {
    runs: [(u64, u16, u16); FOUND_RUNS],
    len: usize,
    /// Some run was not noted (no room, or found by the general walk).
    overflow: bool,
    bytes: u64,
    span: Option<(u64, u64)>,
}

impl Default for Found {
    fn default() -> Self {
        Found {
            runs: [(0, 0, 0); FOUND_RUNS],
            len: 0,
            overflow: false,
            bytes: 0,
            span: None,
        }
    }
}

impl Found {
    /// Notes entries `first..first + n` of level-1 table `table` (joined to the last run
    /// where they continue it).
    fn push(&mut self, table: u64, first: usize, n: usize) {
        if let Some(last) = self.len.checked_sub(1).and_then(|i| self.runs.get_mut(i)) {
            if last.0 == table && usize::from(last.1) + usize::from(last.2) == first {
                last.2 += n as u16;
                return;
            }
        }
        match self.runs.get_mut(self.len) {
            Some(slot) => {
                *slot = (table, first as u16, n as u16);
                self.len += 1;
            }
            None => self.overflow = true,
        }
    }

    /// Counts a whole checked range.
    fn note(&mut self, lo: u64, hi: u64) {
        self.bytes += hi - lo;
        self.span = Some(self.span.map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
    }

    /// Whether every run is noted.
    fn complete(&self) -> bool {
        !self.overflow
    }
}

/// A [`Tables::map`] that stopped part-way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFailed {
    pub error: Error,
    /// What was done before it stopped.
    pub done: Mapped,
}

/// What [`Tables::unmap`] did: the range to invalidate in domain `did`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unmapped {
    pub did: DomainId,
    pub iova: u64,
    pub len: u64,
    /// Bytes of the range that were mapped.
    pub bytes: u64,
}

/// The root table, the context tables and every domain's page tables of one unit.
#[derive(Debug)]
pub struct Tables {
    root: u64,
    coherent: bool,
    sllps: u8,
    mgaw_bits: u8,
    cap: Cap,
    domains: [Option<Domain>; MAX_DOMAINS],
}

fn read<M: TableMemory>(mem: &mut M, phys: u64) -> u64 {
    let index = ((phys & (PAGE_SIZE - 1)) >> 3) as usize;
    mem.frame(phys & !(PAGE_SIZE - 1))
        .get(index)
        .copied()
        .unwrap_or(0)
}

fn write<M: TableMemory>(mem: &mut M, phys: u64, value: u64) {
    let index = ((phys & (PAGE_SIZE - 1)) >> 3) as usize;
    if let Some(slot) = mem.frame(phys & !(PAGE_SIZE - 1)).get_mut(index) {
        *slot = value;
    }
}

impl Tables {
    /// An empty root table (every bus not present) for a unit with these capabilities.
    pub fn new<M: TableMemory>(mem: &mut M, cap: Cap, ecap: Ecap) -> Result<Self, Error> {
        let mut tables = Tables {
            root: 0,
            coherent: ecap.c(),
            sllps: cap.sllps(),
            mgaw_bits: cap.mgaw_bits(),
            cap,
            domains: [None; MAX_DOMAINS],
        };
        tables.root = tables.new_frame(mem)?;
        Ok(tables)
    }

    /// Physical address of the root table (for RTADDR).
    pub const fn root(&self) -> u64 {
        self.root
    }

    /// Whether 2 MiB pages are used where both addresses are aligned.
    pub const fn large_pages(&self) -> bool {
        self.sllps & 1 != 0
    }

    /// The domain `did`, if it exists.
    pub fn domain(&self, did: DomainId) -> Option<Domain> {
        self.domains
            .iter()
            .flatten()
            .find(|d| d.did == did)
            .copied()
    }

    fn domain_mut(&mut self, did: DomainId) -> Option<&mut Domain> {
        self.domains.iter_mut().flatten().find(|d| d.did == did)
    }

    /// The I/O address width of a `levels`-deep domain on this unit, in bits.
    pub fn width_bits(&self, levels: u8) -> u8 {
        level_address_bits(levels).min(self.mgaw_bits)
    }

    fn sync<M: TableMemory>(&self, mem: &mut M, phys: u64, len: usize) {
        if !self.coherent {
            mem.flush(phys, len);
        }
    }

    fn new_frame<M: TableMemory>(&self, mem: &mut M) -> Result<u64, Error> {
        let frame = mem.alloc_frame().ok_or(Error::OutOfFrames)?;
        // The zeroes may still be in the CPU's cache only.
        self.sync(mem, frame, PAGE_SIZE as usize);
        Ok(frame)
    }

    /// Creates domain `did` with an empty `levels`-deep address space.
    pub fn add_domain<M: TableMemory>(
        &mut self,
        mem: &mut M,
        did: DomainId,
        levels: u8,
    ) -> Result<(), Error> {
        if did == 0 || u32::from(did) >= self.cap.domains_supported() {
            return Err(Error::BadDomainId(did));
        }
        if !self.cap.supported_levels().supports(levels) {
            return Err(Error::LevelsUnsupported(levels));
        }
        if self.domain(did).is_some() {
            return Err(Error::DomainExists(did));
        }
        let slot = self
            .domains
            .iter()
            .position(Option::is_none)
            .ok_or(Error::TooManyDomains)?;
        let table = self.new_frame(mem)?;
        if let Some(free) = self.domains.get_mut(slot) {
            *free = Some(Domain {
                did,
                levels,
                table,
                attached: 0,
                large: false,
            });
        }
        Ok(())
    }

    /// Frees domain `did` and all its page tables. Its functions must be detached, and the
    /// caller must have invalidated the domain's IOTLB entries since the last detach.
    pub fn remove_domain<M: TableMemory>(
        &mut self,
        mem: &mut M,
        did: DomainId,
    ) -> Result<(), Error> {
        let domain = self.domain(did).ok_or(Error::NoDomain(did))?;
        if domain.attached != 0 {
            return Err(Error::DomainInUse(did));
        }
        free_table(mem, domain.table, domain.levels);
        for slot in self.domains.iter_mut() {
            if slot.is_some_and(|d| d.did == did) {
                *slot = None;
            }
        }
        Ok(())
    }

    fn context_addr<M: TableMemory>(&self, mem: &mut M, bdf: Bdf) -> Option<u64> {
        let root = read(mem, self.root + u64::from(bdf.bus()) * 16);
        (root & root::P != 0).then_some((root & root::CTP) + u64::from(bdf.devfn()) * 16)
    }

    /// `bdf`'s context entry read back from the live tables: `None` if not present.
    pub fn context_entry<M: TableMemory>(&self, mem: &mut M, bdf: Bdf) -> Option<Attachment> {
        let addr = self.context_addr(mem, bdf)?;
        let (lo, hi) = (read(mem, addr), read(mem, addr + 8));
        (lo & ctx::P != 0).then_some(Attachment {
            did: ((hi >> ctx::DID_SHIFT) & 0xffff) as u16,
            levels: (hi & ctx::AW_MASK) as u8 + 2,
            table: lo & ctx::SLPTPTR,
        })
    }

    /// Points `bdf` at domain `did`. Returns `false` if it already was (nothing changed).
    pub fn attach<M: TableMemory>(
        &mut self,
        mem: &mut M,
        bdf: Bdf,
        did: DomainId,
    ) -> Result<bool, Error> {
        let domain = self.domain(did).ok_or(Error::NoDomain(did))?;
        if let Some(current) = self.context_entry(mem, bdf) {
            return if current.did == did {
                Ok(false)
            } else {
                Err(Error::AttachedElsewhere {
                    bdf,
                    did: current.did,
                })
            };
        }
        let root_addr = self.root + u64::from(bdf.bus()) * 16;
        let mut root_lo = read(mem, root_addr);
        if root_lo & root::P == 0 {
            let table = self.new_frame(mem)?;
            root_lo = table | root::P;
            write(mem, root_addr, root_lo);
            self.sync(mem, root_addr, 16);
        }
        let addr = (root_lo & root::CTP) + u64::from(bdf.devfn()) * 16;
        // High quadword first, present bit last.
        write(
            mem,
            addr + 8,
            u64::from(did) << ctx::DID_SHIFT | u64::from(domain.levels - 2),
        );
        write(mem, addr, domain.table | ctx::P);
        self.sync(mem, addr, 16);
        if let Some(d) = self.domain_mut(did) {
            d.attached += 1;
        }
        Ok(true)
    }

    /// Clears `bdf`'s context entry; returns the domain it was in.
    pub fn detach<M: TableMemory>(&mut self, mem: &mut M, bdf: Bdf) -> Result<DomainId, Error> {
        let current = self
            .context_entry(mem, bdf)
            .ok_or(Error::NotAttached(bdf))?;
        let addr = self.context_addr(mem, bdf).ok_or(Error::NotAttached(bdf))?;
        write(mem, addr, 0);
        write(mem, addr + 8, 0);
        self.sync(mem, addr, 16);
        if let Some(d) = self.domain_mut(current.did) {
            d.attached = d.attached.saturating_sub(1);
        }
        Ok(current.did)
    }

    fn check_range(&self, domain: &Domain, iova: u64, len: u64) -> Result<(), Error> {
        if len == 0 || !iova.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Unaligned);
        }
        let end = iova.checked_add(len).ok_or(Error::Unaligned)?;
        let width_bits = self.width_bits(domain.levels);
        if end > 1u64 << width_bits {
            return Err(Error::BeyondWidth { iova, width_bits });
        }
        Ok(())
    }

    /// Maps `iova..iova + len` of domain `did` to `pa..pa + len` with `perm`, in 2 MiB pages
    /// where both sides are aligned (and the unit has them), else 4 KiB pages. Existing
    /// mappings are replaced (a 4 KiB page inside a present 2 MiB page is refused).
    pub fn map<M: TableMemory>(
        &mut self,
        mem: &mut M,
        did: DomainId,
        iova: u64,
        pa: u64,
        len: u64,
        perm: Perm,
    ) -> Result<Mapped, MapFailed> {
        let domain = self.domain(did).ok_or(MapFailed {
            error: Error::NoDomain(did),
            done: Mapped::default(),
        })?;
        let mut run = LeafRun::default();
        let r = self.map_in(mem, &domain, iova, pa, len, perm, &mut run);
        self.end_run(mem, &mut run);
        r
    }

    /// [`Tables::map`] in `domain`, writing 4 KiB entries through `run`: the level-1 table
    /// last used is reused while the pages stay in its 2 MiB (no walk), and the entries written
    /// there are flushed together when the run moves on ([`Tables::end_run`]).
    #[allow(clippy::too_many_arguments)]
    fn map_in<M: TableMemory>(
        &mut self,
        mem: &mut M,
        domain: &Domain,
        iova: u64,
        pa: u64,
        len: u64,
        perm: Perm,
        run: &mut LeafRun,
    ) -> Result<Mapped, MapFailed> {
        let fail = |error| MapFailed {
            error,
            done: Mapped::default(),
        };
        self.check_range(domain, iova, len).map_err(fail)?;
        if !pa.is_multiple_of(PAGE_SIZE) {
            return Err(fail(Error::Unaligned));
        }
        match pa.checked_add(len) {
            Some(end) if end <= 1u64 << self.mgaw_bits => {}
            _ => return Err(fail(Error::BeyondHostWidth { pa })),
        }
        let bits = if perm.read { pte::R } else { 0 } | if perm.write { pte::W } else { 0 };
        let mut done = Mapped::default();
        while done.bytes < len {
            let (va, to, rest) = (iova + done.bytes, pa + done.bytes, len - done.bytes);
            if self.large_pages()
                && va.is_multiple_of(LARGE_2M)
                && to.is_multiple_of(LARGE_2M)
                && rest >= LARGE_2M
            {
                self.end_run(mem, run);
                let placed = self
                    .set_leaf(mem, domain, va, to | bits | pte::PS, 2)
                    .map_err(|error| MapFailed { error, done })?;
                if let Some(replaced) = placed {
                    if let Some(d) = self.domain_mut(domain.did) {
                        d.large = true;
                    }
                    done.replaced |= replaced;
                    done.bytes += LARGE_2M;
                    continue;
                }
            }
            // 4 KiB pages: every entry of this level-1 table the range covers.
            let table = self.leaf_table(mem, domain, va, run, done)?;
            let first = pte::index(va, 1);
            let n = (512 - first).min(((len - done.bytes) / PAGE_SIZE) as usize);
            let mut present = 0;
            let mut next = to | bits;
            // `first + n <= 512`: the slice is whole, so the loop has no bounds to test.
            for slot in mem
                .frame(table)
                .get_mut(first..first + n)
                .unwrap_or(&mut [])
            {
                present |= *slot;
                *slot = next;
                next += PAGE_SIZE;
            }
            done.replaced |= present & (pte::R | pte::W) != 0;
            run.wrote(first, n);
            done.bytes += n as u64 * PAGE_SIZE;
        }
        Ok(done)
    }

    /// The level-1 table that maps `va` (made if missing): `run`'s, when it
    /// covers the same 2 MiB, else found (and `run` ended and moved to it).
    /// `done` is what the failing map had done, for its error.
    fn leaf_table<M: TableMemory>(
        &mut self,
        mem: &mut M,
        domain: &Domain,
        va: u64,
        run: &mut LeafRun,
        done: Mapped,
    ) -> Result<u64, MapFailed> {
        let region = va & !(LARGE_2M - 1);
        if let Some((r, t)) = run.table {
            if r == region {
                return Ok(t);
            }
        }
        self.end_run(mem, run);
        let t = self
            .table_at(mem, domain, va, 1, true)
            .map_err(|error| MapFailed { error, done })?
            .ok_or(MapFailed {
                error: Error::OutOfFrames,
                done,
            })?;
        run.table = Some((region, t));
        Ok(t)
    }

    /// Checks a [`Change::MapFrames`] whole: the range, and every frame listed (with the
    /// bits [`FrameSource::required`] names for `perm`) and addressable.
    fn check_frames(
        &self,
        domain: &Domain,
        frames: &dyn FrameSource,
        iova: u64,
        len: u64,
        perm: Perm,
    ) -> Result<(), Error> {
        self.check_range(domain, iova, len)?;
        let need = frames.required(perm) & (PAGE_SIZE - 1);
        let end = iova + len;
        let mut va = iova;
        while va < end {
            let n = self.frame_run(frames, va, end, need)?;
            va += n as u64 * PAGE_SIZE;
        }
        Ok(())
    }

    /// A [`Change::MapFrames`] in `domain`, checked already ([`Tables::check_frames`]):
    /// each page of `iova..iova + len` to the frame `frames` lists for it, through `run` as
    /// in [`Tables::map_in`], each level-1 table's share in one pass.
    #[allow(clippy::too_many_arguments)]
    fn map_frames_in<M: TableMemory>(
        &mut self,
        mem: &mut M,
        domain: &Domain,
        iova: u64,
        len: u64,
        perm: Perm,
        frames: &dyn FrameSource,
        run: &mut LeafRun,
    ) -> Result<Mapped, MapFailed> {
        let bits = if perm.read { pte::R } else { 0 } | if perm.write { pte::W } else { 0 };
        let mut done = Mapped::default();
        while done.bytes < len {
            let va = iova + done.bytes;
            let table = self.leaf_table(mem, domain, va, run, done)?;
            let first = pte::index(va, 1);
            let n = (512 - first).min(((len - done.bytes) / PAGE_SIZE) as usize);
            let (Some(listed), Some(slots)) = (
                frames.frames(va).get(..n),
                mem.frame(table).get_mut(first..first + n),
            ) else {
                // The source changed since `check_frames` (it may not): stop there.
                return Err(MapFailed {
                    error: Error::MissingFrame { iova: va },
                    done,
                });
            };
            let mut present = 0;
            for (slot, &frame) in slots.iter_mut().zip(listed) {
                present |= *slot;
                *slot = (frame & !(PAGE_SIZE - 1)) | bits;
            }
            done.replaced |= present & (pte::R | pte::W) != 0;
            run.wrote(first, n);
            done.bytes += n as u64 * PAGE_SIZE;
        }
        Ok(done)
    }

    /// Checks the frames `frames` lists from `va` to the end of its block or `end`, whichever
    /// comes first: each listed (non-zero, with every bit of `need`) and below the host
    /// address width. Returns how many pages that was.
    fn frame_run(
        &self,
        frames: &dyn FrameSource,
        va: u64,
        end: u64,
        need: u64,
    ) -> Result<usize, Error> {
        let block_end = (va | (FRAME_BLOCK - 1)) + 1;
        let n = ((block_end.min(end) - va) / PAGE_SIZE) as usize;
        let listed = frames.frames(va);
        let limit = 1u64 << self.mgaw_bits;
        // Bits gathered over the run, no test per page: an address at or beyond the limit
        // has a bit at or above it, and so has one less than a page address of 0 (it wraps
        // to the top); a bit of `need` that some entry lacks shows in the entries' `!f`.
        let bad = listed.get(..n).is_none_or(|run| {
            let (high, lacking) = run.iter().fold((0, 0), |(high, lacking), &f| {
                (
                    high | f | (f & !(PAGE_SIZE - 1)).wrapping_sub(1),
                    lacking | !f,
                )
            });
            high & !(limit - 1) != 0 || lacking & need != 0
        });
        if bad {
            // Find which page, for the error (the refusal's path only).
            let unlisted = |f: u64| f & !(PAGE_SIZE - 1) == 0 || !f & need != 0;
            let at = listed
                .iter()
                .take(n)
                .position(|&f| unlisted(f) || f & !(PAGE_SIZE - 1) >= limit)
                .unwrap_or(listed.len().min(n));
            let page = va + at as u64 * PAGE_SIZE;
            return Err(match listed.get(at) {
                Some(&f) if !unlisted(f) => Error::BeyondHostWidth {
                    pa: f & !(PAGE_SIZE - 1),
                },
                _ => Error::MissingFrame { iova: page },
            });
        }
        Ok(n)
    }

    /// Flushes the entries `run` wrote in its level-1 table and forgets the table.
    fn end_run<M: TableMemory>(&self, mem: &mut M, run: &mut LeafRun) {
        if let (Some((_, table)), Some((lo, hi))) = (run.table, run.dirty) {
            self.sync(mem, table + lo as u64 * 8, (hi - lo + 1) * 8);
        }
        *run = LeafRun::default();
    }

    /// Carries out `changes` in domain `did`: every unmap, then every map (the caller's
    /// ranges do not overlap), the domain looked up once and runs of 4 KiB entries written
    /// without walking from the top for each change. Every [`Change::UnmapMapped`] (each page
    /// mapped) and every [`Change::MapFrames`] ([`FrameSource`]) is checked before anything
    /// changes; after that it stops at the first error, keeping what was done. The checks of
    /// the `UnmapMapped` changes note the level-1 entries they found, and the unmap clears
    /// those without walking again. `all_maps`: every range mapped needs invalidating
    /// (caching mode), not only those that replaced a present entry. The invalidations are
    /// the caller's.
    pub fn apply<M: TableMemory>(
        &mut self,
        mem: &mut M,
        did: DomainId,
        changes: &[Change],
        frames: &dyn FrameSource,
        all_maps: bool,
    ) -> Applied {
        let mut out = Applied::default();
        let Some(domain) = self.domain(did) else {
            out.error = Some(Error::NoDomain(did));
            return out;
        };
        // The checks, before anything changes: the pages every `UnmapMapped` clears, then
        // every listed frame.
        // One pass: an `UnmapMapped` refused is the answer at once; the first `MapFrames`
        // refused is the answer unless an `UnmapMapped` after it is refused too.
        let mut found = Found::default();
        let mut last = None;
        let mut refused = None;
        let mut plain_unmaps = false;
        for change in changes {
            match *change {
                Change::UnmapMapped { iova, len } => {
                    let checked = self.check_mapped(mem, &domain, iova, len, &mut last, &mut found);
                    if let Err(e) = checked {
                        out.error = Some(e);
                        return out;
                    }
                }
                Change::MapFrames { iova, len, perm } if refused.is_none() => {
                    refused = self.check_frames(&domain, frames, iova, len, perm).err();
                }
                Change::Unmap { .. } => plain_unmaps = true,
                _ => {}
            }
        }
        if refused.is_some() {
            out.error = refused;
            return out;
        }
        // The checked unmaps: the level-1 entries found, each table's flushed once.
        if found.bytes != 0 {
            if found.complete() {
                self.clear_found(mem, &found);
            } else {
                for change in changes {
                    if let Change::UnmapMapped { iova, len } = *change {
                        // Checked: this cannot refuse, and clears what the check saw.
                        if let Err(e) = self.unmap_in(mem, &domain, iova, len) {
                            out.error = Some(e);
                            return out;
                        }
                    }
                }
            }
            out.unmapped += found.bytes;
            if let Some((lo, hi)) = found.span {
                out.widen(lo, hi - lo);
            }
        }
        // Plain unmaps (what of each range is mapped), if the batch has any.
        let plain = if plain_unmaps { changes } else { &[] };
        for change in plain {
            let Change::Unmap { iova, len } = *change else {
                continue;
            };
            match self.unmap_in(mem, &domain, iova, len) {
                Ok(0) => {}
                Ok(bytes) => {
                    out.unmapped += bytes;
                    out.widen(iova, len);
                }
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            }
        }
        // The maps start from the last level-1 table the checks found (often the one they
        // write next).
        let mut run = LeafRun {
            table: last,
            dirty: None,
        };
        for change in changes {
            let (iova, mapped) = match *change {
                Change::Unmap { .. } | Change::UnmapMapped { .. } => continue,
                Change::Map {
                    iova,
                    pa,
                    len,
                    perm,
                } => (
                    iova,
                    self.map_in(mem, &domain, iova, pa, len, perm, &mut run),
                ),
                Change::MapFrames { iova, len, perm } => (
                    iova,
                    self.map_frames_in(mem, &domain, iova, len, perm, frames, &mut run),
                ),
            };
            let (done, error) = match mapped {
                Ok(done) => (done, None),
                Err(f) => (f.done, Some(f.error)),
            };
            if done.bytes != 0 {
                out.mapped = true;
                if done.replaced || all_maps {
                    out.widen(iova, done.bytes);
                }
            }
            if error.is_some() {
                out.error = error;
                break;
            }
        }
        self.end_run(mem, &mut run);
        out
    }

    /// Checks a [`Change::UnmapMapped`]: the range, and every page of it mapped. Notes in
    /// `found` the level-1 entries that map them (while it has room), and in `last` the
    /// level-1 table last found (its 2 MiB region, its address), which the next check reuses
    /// while it stays in that region. Changes nothing.
    fn check_mapped<M: TableMemory>(
        &self,
        mem: &mut M,
        domain: &Domain,
        iova: u64,
        len: u64,
        last: &mut Option<(u64, u64)>,
        found: &mut Found,
    ) -> Result<(), Error> {
        // Beyond the domain's width nothing is mapped.
        self.check_range(domain, iova, len).map_err(|e| match e {
            Error::BeyondWidth { .. } => Error::NotMapped { iova },
            e => e,
        })?;
        let end = iova + len;
        if domain.large {
            // Large pages may be on the way: the general walk, and the general unmap after it.
            found.overflow = true;
            let mapped = self
                .unmap_pass(mem, domain, iova, len, false)
                .map_err(|_| Error::NotMapped { iova })?;
            if mapped != len {
                return Err(Error::NotMapped { iova });
            }
            found.note(iova, end);
            return Ok(());
        }
        let mut va = iova;
        while va < end {
            let region = va & !(LARGE_2M - 1);
            let table = match *last {
                Some((r, t)) if r == region => t,
                _ => {
                    let t = self
                        .table_at(mem, domain, va, 1, false)
                        .ok()
                        .flatten()
                        .ok_or(Error::NotMapped { iova: va })?;
                    *last = Some((region, t));
                    t
                }
            };
            let first = pte::index(va, 1);
            let n = (512 - first).min(((end - va) / PAGE_SIZE) as usize);
            let entries = mem.frame(table).get(first..first + n).unwrap_or(&[]);
            // One test per page; the page that failed is looked for on the refusal's path only.
            let missing = entries
                .iter()
                .fold(entries.len() != n, |m, &e| m | (e & (pte::R | pte::W) == 0));
            if missing {
                let at = entries
                    .iter()
                    .position(|&e| e & (pte::R | pte::W) == 0)
                    .unwrap_or(0);
                return Err(Error::NotMapped {
                    iova: va + at as u64 * PAGE_SIZE,
                });
            }
            found.push(table, first, n);
            va += n as u64 * PAGE_SIZE;
        }
        found.note(iova, end);
        Ok(())
    }

    /// Clears the level-1 entries `found` lists, flushing each table's share once.
    fn clear_found<M: TableMemory>(&self, mem: &mut M, found: &Found) {
        let mut dirty: Option<(u64, usize, usize)> = None;
        for &(table, first, n) in found.runs.get(..found.len).unwrap_or(&[]) {
            let (first, n) = (usize::from(first), usize::from(n));
            if let Some(slots) = mem.frame(table).get_mut(first..first + n) {
                slots.fill(0);
            }
            dirty = match dirty {
                Some((t, lo, hi)) if t == table => Some((t, lo.min(first), hi.max(first + n))),
                other => {
                    if let Some((t, lo, hi)) = other {
                        self.sync(mem, t + lo as u64 * 8, (hi - lo) * 8);
                    }
                    Some((table, first, first + n))
                }
            };
        }
        if let Some((t, lo, hi)) = dirty {
            self.sync(mem, t + lo as u64 * 8, (hi - lo) * 8);
        }
    }

    /// The level-`level` table that holds `va`'s entry, walking down from the top and, with
    /// `create`, making the tables missing on the way. `Ok(None)`: a table is missing and
    /// `create` is off. A large page on the way is [`Error::SplitsLargePage`].
    fn table_at<M: TableMemory>(
        &self,
        mem: &mut M,
        domain: &Domain,
        va: u64,
        level: u8,
        create: bool,
    ) -> Result<Option<u64>, Error> {
        let mut table = domain.table;
        let mut at = domain.levels;
        while at > level {
            let addr = table + pte::index(va, at) as u64 * 8;
            let current = read(mem, addr);
            if current & (pte::R | pte::W) == 0 {
                if !create {
                    return Ok(None);
                }
                let next = self.new_frame(mem)?;
                write(mem, addr, next | pte::R | pte::W);
                self.sync(mem, addr, 8);
                table = next;
            } else if current & pte::PS != 0 {
                return Err(Error::SplitsLargePage { iova: va });
            } else {
                table = current & pte::ADDR;
            }
            at -= 1;
        }
        Ok(Some(table))
    }

    /// Writes leaf `entry` for `va` at `level`, creating the tables above it. Returns
    /// `Some(whether a present entry was replaced)`, or `None` if `level` is 2 and a page
    /// table already sits there (the caller maps 4 KiB pages instead).
    fn set_leaf<M: TableMemory>(
        &self,
        mem: &mut M,
        domain: &Domain,
        va: u64,
        entry: u64,
        level: u8,
    ) -> Result<Option<bool>, Error> {
        let Some(table) = self.table_at(mem, domain, va, level, true)? else {
            return Err(Error::OutOfFrames);
        };
        let addr = table + pte::index(va, level) as u64 * 8;
        let current = read(mem, addr);
        let present = current & (pte::R | pte::W) != 0;
        if level > 1 && present && current & pte::PS == 0 {
            return Ok(None);
        }
        write(mem, addr, entry);
        self.sync(mem, addr, 8);
        Ok(Some(present))
    }

    /// Unmaps `iova..iova + len` of domain `did` (a large page only whole). Returns the range
    /// to invalidate.
    pub fn unmap<M: TableMemory>(
        &mut self,
        mem: &mut M,
        did: DomainId,
        iova: u64,
        len: u64,
    ) -> Result<Unmapped, Error> {
        let domain = self.domain(did).ok_or(Error::NoDomain(did))?;
        let bytes = self.unmap_in(mem, &domain, iova, len)?;
        Ok(Unmapped {
            did,
            iova,
            len,
            bytes,
        })
    }

    /// [`Tables::unmap`] in `domain`: the bytes that were mapped.
    fn unmap_in<M: TableMemory>(
        &mut self,
        mem: &mut M,
        domain: &Domain,
        iova: u64,
        len: u64,
    ) -> Result<u64, Error> {
        self.check_range(domain, iova, len)?;
        // A dry run first, so a refused unmap changes nothing. Only a large page can refuse,
        // so a domain that never had one needs none.
        if domain.large {
            self.unmap_pass(mem, domain, iova, len, false)?;
        }
        self.unmap_pass(mem, domain, iova, len, true)
    }

    /// How many bytes of `iova..iova + len` of domain `did` are mapped (a large page counts
    /// only whole: one the range cuts is [`Error::SplitsLargePage`]). Changes nothing.
    pub fn mapped_bytes<M: TableMemory>(
        &self,
        mem: &mut M,
        did: DomainId,
        iova: u64,
        len: u64,
    ) -> Result<u64, Error> {
        let domain = self.domain(did).ok_or(Error::NoDomain(did))?;
        self.check_range(&domain, iova, len)?;
        self.unmap_pass(mem, &domain, iova, len, false)
    }

    fn unmap_pass<M: TableMemory>(
        &self,
        mem: &mut M,
        domain: &Domain,
        iova: u64,
        len: u64,
        clear: bool,
    ) -> Result<u64, Error> {
        let end = iova + len;
        let mut bytes = 0;
        let mut va = iova;
        'range: while va < end {
            let mut table = domain.table;
            let mut level = domain.levels;
            loop {
                let addr = table + pte::index(va, level) as u64 * 8;
                let entry = read(mem, addr);
                let size = pte::level_bytes(level);
                if entry & (pte::R | pte::W) == 0 {
                    // Nothing mapped up to the end of this entry's span.
                    va = ((va | (size - 1)) + 1).min(end);
                    continue 'range;
                }
                if level == 1 {
                    // Every entry of this table up to the range's end, in one pass, with one
                    // flush of the entries cleared.
                    let first = pte::index(va, 1);
                    let n = (512 - first).min(((end - va) / PAGE_SIZE) as usize);
                    let entries = mem
                        .frame(table)
                        .get_mut(first..first + n)
                        .unwrap_or(&mut []);
                    let present = entries
                        .iter()
                        .filter(|&&e| e & (pte::R | pte::W) != 0)
                        .count() as u64;
                    if clear && present != 0 {
                        entries.fill(0);
                        // Clearing a not-present entry changes nothing the unit sees, so
                        // the flush covers the whole stretch.
                        self.sync(mem, table + first as u64 * 8, n * 8);
                    }
                    bytes += present * PAGE_SIZE;
                    va += n as u64 * PAGE_SIZE;
                    continue 'range;
                }
                if entry & pte::PS != 0 {
                    if !va.is_multiple_of(size) || end - va < size {
                        return Err(Error::SplitsLargePage { iova: va });
                    }
                    if clear {
                        write(mem, addr, 0);
                        self.sync(mem, addr, 8);
                    }
                    bytes += size;
                    va += size;
                    continue 'range;
                }
                table = entry & pte::ADDR;
                level -= 1;
            }
        }
        Ok(bytes)
    }
}

/// Frees a `level` table and every table below it.
fn free_table<M: TableMemory>(mem: &mut M, table: u64, level: u8) {
    if level > 1 {
        for index in 0..512u64 {
            let entry = read(mem, table + index * 8);
            if entry & (pte::R | pte::W) != 0 && entry & pte::PS == 0 {
                free_table(mem, entry & pte::ADDR, level - 1);
            }
        }
    }
    mem.free_frame(table);
}
