//! What the hypervisor sees of an IOMMU, whichever vendor's: the [`Iommu`] trait, the
//! [`TableMemory`] it implements for the drivers, and the types both share.
//!
//! The drivers never touch memory or registers themselves. Table frames come from
//! [`TableMemory`] (the hypervisor's frame allocator and direct map); registers are reached
//! through a vendor's register trait (VT-d: [`crate::vtd::Regs`]). So this crate has no
//! `unsafe`, and its host tests run the drivers against a model of the hardware.

use crate::Bdf;
use core::fmt;

/// A domain id: the tag the unit keeps in its caches for one I/O address space. 0 is never
/// used (VT-d reserves it in caching mode).
pub type DomainId = u16;

/// Bytes in a table frame and in the smallest I/O page.
pub const PAGE_SIZE: u64 = 4096;

/// Memory for translation tables, provided by the hypervisor.
///
/// Frames are 4 KiB, 4 KiB-aligned, addressed by their physical address. A driver reads and
/// writes them only through [`TableMemory::frame`], and calls [`TableMemory::flush`] after
/// each change when the unit does not snoop CPU caches (VT-d ECAP.C = 0, as under QEMU): the
/// unit reads memory, not the CPU's cache.
pub trait TableMemory {
    /// A zeroed frame, or `None` when memory is exhausted. The zeroes may still sit in the
    /// CPU's cache: the driver flushes a new frame before the unit can reach it.
    fn alloc_frame(&mut self) -> Option<u64>;

    /// The frame at `phys` (an address [`TableMemory::alloc_frame`] returned) as 512
    /// little-endian 64-bit words.
    fn frame(&mut self, phys: u64) -> &mut [u64; 512];

    /// Writes the CPU cache lines covering `phys..phys + len` back to memory, and returns only
    /// when they are there (on x86: CLFLUSH each 64-byte line, then MFENCE). Called only for
    /// units that do not snoop.
    fn flush(&mut self, phys: u64, len: usize);

    /// Gives a frame back. The driver frees a frame only once no unit can reach it (after the
    /// invalidation that follows its last use).
    fn free_frame(&mut self, phys: u64);

    /// Reads the 64-bit word at `phys` (8-byte aligned, inside a frame of this memory) that
    /// the unit may have written behind the CPU's back (the status word of a VT-d
    /// invalidation wait). The hypervisor's implementation must be a volatile read; unit
    /// writes are snooped, so no cache maintenance is needed.
    fn load(&mut self, phys: u64) -> u64 {
        let index = ((phys & (PAGE_SIZE - 1)) >> 3) as usize;
        self.frame(phys & !(PAGE_SIZE - 1))
            .get(index)
            .copied()
            .unwrap_or(0)
    }
}

/// The direction of a DMA request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    /// "read" or "write", as the `iommu_fault` event prints it.
    pub const fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// What a device may do to a mapped page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm {
    pub read: bool,
    pub write: bool,
}

impl Perm {
    /// Device reads only (it may not write the page).
    pub const READ: Perm = Perm {
        read: true,
        write: false,
    };
    /// Device writes only.
    pub const WRITE: Perm = Perm {
        read: false,
        write: true,
    };
    /// Reads and writes.
    pub const READ_WRITE: Perm = Perm {
        read: true,
        write: true,
    };

    /// Whether `access` is allowed.
    pub const fn allows(self, access: Access) -> bool {
        match access {
            Access::Read => self.read,
            Access::Write => self.write,
        }
    }
}

/// One change of a batch ([`Iommu::apply`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Map `iova..iova + len` to `pa..pa + len` with `perm` (replacing what is there).
    Map {
        iova: u64,
        pa: u64,
        len: u64,
        perm: Perm,
    },
    /// Unmap `iova..iova + len` (what of it is mapped).
    Unmap { iova: u64, len: u64 },
    /// Unmap `iova..iova + len`, every page of which must be mapped now (a large page only
    /// whole): checked for the whole batch before anything changes, so a batch with a page
    /// not mapped changes nothing ([`Error::NotMapped`]). The check walks the tables once and
    /// the unmap clears the level-1 entries it found.
    UnmapMapped { iova: u64, len: u64 },
    /// Map each 4 KiB page of `iova..iova + len` to the frame the batch's [`FrameSource`]
    /// lists for it, with `perm` (replacing what is there): a run of scattered frames (a
    /// grant window's pages) as one change, its entries written straight from the caller's
    /// list. A page the source does not list is [`Error::MissingFrame`], checked for the
    /// whole run before any of it is written.
    MapFrames { iova: u64, len: u64, perm: Perm },
}

/// Bytes of I/O space one slice of a [`FrameSource`] covers at most: 2 MiB, what one
/// level-1 page table maps (on VT-d and AMD-Vi alike), so a slice is written into one table.
pub const FRAME_BLOCK: u64 = 2 << 20;

/// The physical frames behind [`Change::MapFrames`], listed by I/O page: a table the caller
/// keeps anyway (the hypervisor's grant mappings, indexed by grant-window page), read in
/// place rather than copied into one change per page.
pub trait FrameSource {
    /// The entries for `iova` (4 KiB-aligned) and the pages after it, up to the end of its
    /// [`FRAME_BLOCK`]-aligned block: entry `i` is for `iova + i * 4096`. An entry's bits
    /// 11:0 belong to the caller and are ignored; the rest is the page's physical address
    /// (page-aligned, below the unit's host address width, else [`Error::BeyondHostWidth`]).
    /// An entry that is 0 once those bits are masked, or missing (a short slice), or without
    /// every bit [`FrameSource::required`] names for the change's permission, lists no frame
    /// ([`Error::MissingFrame`]).
    fn frames(&self, iova: u64) -> &[u64];

    /// The caller's bits (within 11:0) an entry must carry for its page to be mapped with
    /// `perm` (say, "the caller may let its devices write this page"): the unit's check of a
    /// [`Change::MapFrames`] tests them in the same pass as the frames, so the caller need not
    /// read its index first. Asked once per change. None by default.
    fn required(&self, perm: Perm) -> u64 {
        let _ = perm;
        0
    }
}

/// A [`FrameSource`] that lists nothing: for batches without [`Change::MapFrames`].
pub struct NoFrames;

impl FrameSource for NoFrames {
    fn frames(&self, _iova: u64) -> &[u64] {
        &[]
    }
}

/// A function's attachment as the live tables hold it (VT-d: its context entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub did: DomainId,
    /// Page-table depth.
    pub levels: u8,
    /// Physical address of the top page table.
    pub table: u64,
}

/// One fault the unit recorded, decoded (VT-d: one fault recording register).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// Which recording register held it.
    pub index: u16,
    /// The requester id of the faulting request.
    pub source: Bdf,
    /// The page address the request aimed at (for an interrupt-remapping fault, VT-d puts the
    /// interrupt index in bits 63:48 instead).
    pub addr: u64,
    pub access: Access,
    /// The vendor's fault reason code (VT-d: the FR field).
    pub reason: u8,
    /// A short name for `reason` (VT-d: [`crate::vtd::FaultReason::name`]).
    pub reason_name: &'static str,
    /// The record as the unit holds it: low and high quadwords.
    pub raw: [u64; 2],
}

/// What one [`Iommu::take_faults`] call found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultSummary {
    /// Records reported and cleared.
    pub taken: u32,
    /// The unit dropped faults because every record was full (VT-d FSTS.PFO), now cleared.
    pub overflowed: bool,
}

/// Everything an IOMMU driver can refuse or fail at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// [`TableMemory::alloc_frame`] returned `None`.
    OutOfFrames,
    /// An I/O address, physical address or length is not a multiple of 4 KiB, or the length
    /// is 0, or the range wraps.
    Unaligned,
    /// The I/O range reaches beyond the domain's address width.
    BeyondWidth {
        iova: u64,
        width_bits: u8,
    },
    /// The physical range reaches beyond what the unit can address.
    BeyondHostWidth {
        pa: u64,
    },
    /// Domain id 0, or at or above the number the unit supports.
    BadDomainId(DomainId),
    NoDomain(DomainId),
    DomainExists(DomainId),
    /// Every domain slot is taken.
    TooManyDomains,
    /// The domain still has functions attached.
    DomainInUse(DomainId),
    /// A [`Change::MapFrames`] page its [`FrameSource`] lists no frame for.
    MissingFrame {
        iova: u64,
    },
    /// A [`Change::UnmapMapped`] page that is not mapped (or a large page it cuts).
    NotMapped {
        iova: u64,
    },
    /// The unit does not support page tables of this depth.
    LevelsUnsupported(u8),
    /// The function is attached to another domain: detach it first.
    AttachedElsewhere {
        bdf: Bdf,
        did: DomainId,
    },
    NotAttached(Bdf),
    /// The change would split a large page (map a small page inside one, or unmap part of one).
    SplitsLargePage {
        iova: u64,
    },
    /// The unit lacks something this needs.
    Unsupported(&'static str),
    /// The unit did not finish a command in time.
    Timeout(&'static str),
    /// The unit rejected an invalidation descriptor (VT-d FSTS.IQE) at this queue index.
    QueueError {
        head: u16,
    },
    /// The unit is not enabled yet (or is already).
    NotEnabled,
    AlreadyEnabled,
    /// An interrupt-remapping table size that is not a power of two in range.
    BadTableSize(u32),
    /// An interrupt-remapping entry index outside the table.
    BadIndex(u32),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::OutOfFrames => write!(f, "out of table frames"),
            Error::Unaligned => write!(f, "address or length not 4 KiB-aligned, empty or wrapping"),
            Error::BeyondWidth { iova, width_bits } => {
                write!(
                    f,
                    "I/O address {iova:#x} beyond the domain's {width_bits}-bit width"
                )
            }
            Error::BeyondHostWidth { pa } => {
                write!(f, "physical address {pa:#x} beyond the unit's width")
            }
            Error::BadDomainId(did) => write!(f, "domain id {did} not usable"),
            Error::NoDomain(did) => write!(f, "no domain {did}"),
            Error::DomainExists(did) => write!(f, "domain {did} exists"),
            Error::TooManyDomains => write!(f, "too many domains"),
            Error::DomainInUse(did) => write!(f, "domain {did} still has functions attached"),
            Error::LevelsUnsupported(levels) => write!(f, "{levels}-level tables unsupported"),
            Error::AttachedElsewhere { bdf, did } => {
                write!(f, "{bdf} is attached to domain {did}")
            }
            Error::NotAttached(bdf) => write!(f, "{bdf} is not attached"),
            Error::SplitsLargePage { iova } => write!(f, "change at {iova:#x} splits a large page"),
            Error::MissingFrame { iova } => write!(f, "no frame listed for I/O page {iova:#x}"),
            Error::NotMapped { iova } => write!(f, "I/O page {iova:#x} is not mapped"),
            Error::Unsupported(what) => write!(f, "unit does not support {what}"),
            Error::Timeout(what) => write!(f, "unit timed out: {what}"),
            Error::QueueError { head } => write!(f, "invalidation queue error at index {head}"),
            Error::NotEnabled => write!(f, "unit not enabled"),
            Error::AlreadyEnabled => write!(f, "unit already enabled"),
            Error::BadTableSize(n) => write!(f, "bad interrupt-remapping table size {n}"),
            Error::BadIndex(i) => write!(f, "interrupt-remapping index {i} out of range"),
        }
    }
}

/// An IOMMU unit as the hypervisor drives it, whatever the vendor (VT-d: [`crate::vtd::Vtd`];
/// AMD-Vi will be the second). Every change to the tables is followed by the invalidations
/// the hardware needs before the call returns, so the unit never acts on a stale entry.
///
/// Default deny: a function nobody attached has no entry, and all its DMA faults.
pub trait Iommu<M: TableMemory> {
    /// The shallowest page-table depth this unit supports that translates `address_bits`-bit
    /// I/O addresses.
    fn levels_for(&self, address_bits: u8) -> Option<u8>;

    /// Creates domain `did` with an empty `levels`-deep address space.
    fn add_domain(&mut self, mem: &mut M, did: DomainId, levels: u8) -> Result<(), Error>;

    /// Frees domain `did`'s tables; no function may be attached to it.
    fn remove_domain(&mut self, mem: &mut M, did: DomainId) -> Result<(), Error>;

    /// Points `bdf`'s DMA at domain `did`.
    fn attach(&mut self, mem: &mut M, bdf: Bdf, did: DomainId) -> Result<(), Error>;

    /// Removes `bdf`'s entry: all its DMA faults again. Returns the domain it was in.
    fn detach(&mut self, mem: &mut M, bdf: Bdf) -> Result<DomainId, Error>;

    /// Maps `iova..iova + len` of domain `did` to `pa..pa + len`. Existing mappings in the range
    /// are replaced. On an error part of the range may be mapped: unmap it.
    fn map(
        &mut self,
        mem: &mut M,
        did: DomainId,
        iova: u64,
        pa: u64,
        len: u64,
        perm: Perm,
    ) -> Result<(), Error>;

    /// Unmaps `iova..iova + len` of domain `did` and invalidates it; returns how many of those
    /// bytes were mapped.
    fn unmap(&mut self, mem: &mut M, did: DomainId, iova: u64, len: u64) -> Result<u64, Error>;

    /// Carries out `changes` in domain `did` as one batch: every unmap first, then every map
    /// (the caller gives ranges that do not overlap, so the order does not change the result),
    /// then one IOTLB invalidation covering everything that needs one, before it returns.
    /// Returns the bytes the unmaps removed. Every [`Change::UnmapMapped`] and then every
    /// [`Change::MapFrames`] is checked before anything changes (a refusal there changes
    /// nothing). On a later error the unmaps that were done are invalidated before it returns;
    /// some maps may be in place (unmap them).
    fn apply(&mut self, mem: &mut M, did: DomainId, changes: &[Change]) -> Result<u64, Error> {
        self.apply_frames(mem, did, changes, &NoFrames)
    }

    /// [`Iommu::apply`] with `frames` listing the pages of every [`Change::MapFrames`]. A
    /// `MapFrames` change is checked whole (every page listed, every frame addressable)
    /// before any of its entries is written.
    fn apply_frames(
        &mut self,
        mem: &mut M,
        did: DomainId,
        changes: &[Change],
        frames: &dyn FrameSource,
    ) -> Result<u64, Error>;

    /// How many bytes of `iova..iova + len` of domain `did` are mapped now.
    fn mapped_bytes(&self, mem: &mut M, did: DomainId, iova: u64, len: u64) -> Result<u64, Error>;

    /// `bdf`'s attachment read back from the live tables.
    fn attachment(&self, mem: &mut M, bdf: Bdf) -> Option<Attachment>;

    /// Reports every recorded fault to `f` and clears it.
    fn take_faults(&mut self, f: impl FnMut(FaultRecord)) -> FaultSummary;
}
