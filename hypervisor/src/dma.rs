//! Strict-mode DMA: what a `dma_batch` asks for, checked whole and turned
//! into IOMMU changes before anything is touched.
//!
//! A driver domain in the strict DMA mode makes a page reachable by its
//! devices only while a request that uses it is in the device. Its I/O
//! address space mirrors its virtual one (I/O address = virtual address),
//! and it may map two kinds of page there:
//!
//! - its own memory (the permission the device gets is at most the page's
//!   own: read-only pages are never writable by the device);
//! - a page it mapped from a grant with `DEVICE_MAP` (writable only if the
//!   grant mapping is). In strict mode such a grant is not in the IOMMU
//!   until a `dma_batch` maps it, and unmapping the grant unmaps it.
//!
//! [`plan`] checks the operations against a [`DmaSpace`] (the kernel's view
//! of the caller: its memory, its IOMMU domain) in the order
//! `abi::hypercall` documents and returns the changes for
//! `iommu::Iommu::apply_frames`: one `UnmapMapped` per unmap operation (the
//! IOMMU checks that every page of it is mapped, for the whole batch before
//! it changes anything, in the walk that finds the entries it clears), one `Map`
//! per run of own pages whose physical pages are contiguous (an own-memory
//! range is usually one), and one `MapFrames` per grant operation, whatever
//! its length. A grant operation's pages are checked where they are read:
//! the caller hands the IOMMU the grant mappings' device-frame index
//! (`grant::DeviceIndex`) as its `iommu::FrameSource`, whose
//! `required` bits make the unit's check of the frames (every page listed,
//! and writable for a writable map) the check of the grants, before the
//! batch changes anything; [`refusal`] turns its refusals into the
//! hypercall's errors. Nothing is changed on a refusal.
//!
//! Cost: per grant page, the IOMMU reads one index entry to check it and
//! once more to write its page-table entry; nothing is allocated and
//! nothing searched. A batch in ascending order (as callers make them) is
//! checked for overlaps in the pass that checks each operation.

use abi::domain::USER_LIMIT;
use abi::grant::{GRANT_WINDOW, GRANT_WINDOW_SIZE};
use abi::hypercall::{dma_flags, DmaOp, Error};
use alloc::vec::Vec;
use iommu::{Change, Perm};

const PAGE_SIZE: u64 = 4096;

/// The caller as `dma_batch` sees it.
pub trait DmaSpace {
    /// The piece of the caller's own memory holding `va`: its first virtual
    /// address, its first physical address, its length in bytes (a run of
    /// contiguous frames) and whether the caller may write it.
    fn own_region(&self, va: u64) -> Option<(u64, u64, u64, bool)>;
    /// How many bytes of `va..va + len` its IOMMU domain maps now (`None`:
    /// the range cuts a large page, which strict mode never makes). Asked
    /// only when a map is refused here, so that a batch refused for an
    /// unmap too gets the unmap's refusal.
    fn mapped_bytes(&self, va: u64, len: u64) -> Option<u64>;
}

/// How `dma_batch` (and `dma_unmap`) report a refused or failed IOMMU
/// batch: an unmap of a page that is not mapped is `Invalid`, a grant page
/// the index does not list for the map (no grant mapped there for the
/// devices, or read-only for a writable map) `BadAddress` (nothing changed
/// either way: the unit checks both before it changes anything); anything
/// else (the unit ran out of table frames, or is missing) `NoSpace`.
pub fn refusal(e: iommu::Error) -> Error {
    match e {
        iommu::Error::NotMapped { .. } => Error::Invalid,
        iommu::Error::MissingFrame { .. } => Error::BadAddress,
        _ => Error::NoSpace,
    }
}

/// Appends a map of `iova..iova + len` to `pa..`, onto the last change when
/// it continues it (same permission, both addresses contiguous).
#[inline]
fn push_map(out: &mut Vec<Change>, iova: u64, pa: u64, len: u64, perm: Perm) {
    if let Some(Change::Map {
        iova: i,
        pa: p,
        len: l,
        perm: q,
    }) = out.last_mut()
    {
        if *q == perm && *i + *l == iova && *p + *l == pa {
            *l += len;
            return;
        }
    }
    out.push(Change::Map {
        iova,
        pa,
        len,
        perm,
    });
}

/// An operation's own checks; its end.
#[inline]
fn range(op: &DmaOp) -> Result<u64, Error> {
    // Unknown bits, or WRITE without MAP.
    const _: () = assert!(dma_flags::ALL == 3 && dma_flags::MAP == 1);
    if op.flags > dma_flags::ALL || op.flags == dma_flags::WRITE {
        return Err(Error::Invalid);
    }
    if op.pages == 0 {
        return Err(Error::BadLength);
    }
    if !op.addr.is_multiple_of(PAGE_SIZE) {
        return Err(Error::BadAddress);
    }
    // `pages` < 2^32, so the length fits 44 bits and cannot overflow.
    let len = u64::from(op.pages) * PAGE_SIZE;
    op.addr
        .checked_add(len)
        .filter(|&end| end <= USER_LIMIT)
        .ok_or(Error::BadAddress)
}

/// The length of an operation that passed [`range`].
#[inline]
fn len(op: &DmaOp) -> u64 {
    u64::from(op.pages) * PAGE_SIZE
}

/// Checks `ops` (already copied in; the caller checked their count) and
/// puts the IOMMU changes that carry them out in `out` (cleared first).
/// Every unmap comes before every map (they never overlap, so that is the
/// order `Iommu::apply` uses anyway). On an error `out` means nothing. The
/// unmaps' own check (every page mapped) and the grant maps' (every page
/// granted for the devices, writable for a writable map) are the IOMMU's,
/// when it applies the changes, before it changes anything: the caller
/// turns its refusals into errors with [`refusal`].
pub fn plan(space: &impl DmaSpace, ops: &[DmaOp], out: &mut Vec<Change>) -> Result<(), Error> {
    out.clear();
    const MAX: usize = abi::hypercall::DMA_BATCH_MAX as usize;
    if ops.len() > MAX {
        return Err(Error::BadLength);
    }
    // Each operation's own checks, in order, before any look at the others.
    // Ascending and disjoint (each starts at or after the previous end), the
    // usual batch, needs no other overlap check. Unmaps: every page must be
    // mapped, which the IOMMU checks for the whole batch before it changes
    // anything (`Change::UnmapMapped`, refused as `Error::Invalid`), walking
    // its tables once for the check and the unmap; listed in this pass (on a
    // refusal `out` means nothing).
    let mut ascending = true;
    let mut prev_end = 0;
    for op in ops {
        let end = range(op)?;
        ascending &= op.addr >= prev_end;
        prev_end = end;
        if !op.is_map() {
            out.push(Change::UnmapMapped {
                iova: op.addr,
                len: end - op.addr,
            });
        }
    }
    if !ascending {
        check_overlaps(ops)?;
    }
    if let Err(e) = maps(space, ops, out) {
        // The unmaps' check comes before the maps': a batch refused for both is refused
        // for the unmap (the refusal's path only).
        let unmapped = ops.iter().filter(|op| !op.is_map()).any(|op| {
            let len = len(op);
            space.mapped_bytes(op.addr, len) != Some(len)
        });
        return Err(if unmapped { Error::Invalid } else { e });
    }
    Ok(())
}

/// Refuses operations (each passed [`range`]) that overlap: sorted by start
/// (an insertion sort), each must end before the next starts.
#[cold]
fn check_overlaps(ops: &[DmaOp]) -> Result<(), Error> {
    const MAX: usize = abi::hypercall::DMA_BATCH_MAX as usize;
    let mut order = [0u8; MAX];
    for (i, op) in ops.iter().enumerate().take(MAX) {
        let mut j = i;
        while j > 0 && ops[usize::from(order[j - 1])].addr > op.addr {
            order[j] = order[j - 1];
            j -= 1;
        }
        order[j] = i as u8;
    }
    for w in order[..ops.len().min(MAX)].windows(2) {
        let (a, b) = (&ops[usize::from(w[0])], &ops[usize::from(w[1])]);
        if a.addr + len(a) > b.addr {
            return Err(Error::Invalid);
        }
    }
    Ok(())
}

/// Whether `va` lies in the grant window (where the caller's own memory never is).
#[inline]
fn in_grant_window(va: u64) -> bool {
    va.wrapping_sub(GRANT_WINDOW) < GRANT_WINDOW_SIZE
}

/// The maps of a batch whose operations passed their own checks.
fn maps(space: &impl DmaSpace, ops: &[DmaOp], out: &mut Vec<Change>) -> Result<(), Error> {
    for op in ops.iter().filter(|op| op.is_map()) {
        let (start, end) = (op.addr, op.addr + len(op));
        let write = op.is_write();
        let perm = if write { Perm::READ_WRITE } else { Perm::READ };
        if in_grant_window(start) {
            // Grants: the IOMMU checks every page against the device-frame index (a page
            // past the window is listed by none) and writes the entries from it.
            out.push(Change::MapFrames {
                iova: start,
                len: end - start,
                perm,
            });
            continue;
        }
        // Own memory: a piece at a time.
        let mut at = start;
        while at < end {
            let (rva, rpa, rlen, writable) = space.own_region(at).ok_or(Error::BadAddress)?;
            if write && !writable {
                return Err(Error::BadAddress);
            }
            let n = (rva + rlen).min(end) - at;
            push_map(out, at, rpa + (at - rva), n, perm);
            at += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::device_frame;
    use iommu::FrameSource;
    use std::collections::BTreeSet;

    const RW: u64 = device_frame::PRESENT | device_frame::WRITABLE;
    const RO: u64 = device_frame::PRESENT;

    /// Own memory: 0x40_0000.. (8 pages, the last two read-only) at
    /// physical 0x100_0000; grants at 0x8000_0000.. on scattered frames
    /// (the first 2 MiB block of the window; nothing in the next).
    struct Space {
        grants: Vec<u64>,
        mapped: BTreeSet<u64>,
    }

    impl Space {
        fn new() -> Self {
            let mut grants = std::vec![0; 1024];
            grants[..3].copy_from_slice(&[0x700_0000 | RW, 0x900_0000 | RW, 0x900_1000 | RO]);
            Space {
                grants,
                mapped: BTreeSet::new(),
            }
        }

        /// `plan`, then the IOMMU's checks as `iommu::Iommu::apply_frames`
        /// makes them before it changes anything (every `UnmapMapped`
        /// page mapped, then every `MapFrames` page listed with the bits
        /// the source requires), refused through [`refusal`].
        fn batch(&self, ops: &[DmaOp]) -> Result<Vec<Change>, Error> {
            let mut changes = Vec::new();
            plan(self, ops, &mut changes)?;
            for c in &changes {
                if let Change::UnmapMapped { iova, len } = *c {
                    if let Some(iova) = (iova..iova + len)
                        .step_by(4096)
                        .find(|p| !self.mapped.contains(p))
                    {
                        return Err(refusal(iommu::Error::NotMapped { iova }));
                    }
                }
            }
            for c in &changes {
                if let Change::MapFrames { iova, len, perm } = *c {
                    let need = self.required(perm);
                    for page in (iova..iova + len).step_by(4096) {
                        let listed = self.frames(page).first().copied().unwrap_or(0);
                        if listed & !0xfff == 0 || listed & need != need {
                            return Err(refusal(iommu::Error::MissingFrame { iova: page }));
                        }
                    }
                }
            }
            Ok(changes)
        }
    }

    impl DmaSpace for Space {
        fn own_region(&self, va: u64) -> Option<(u64, u64, u64, bool)> {
            match va {
                0x40_0000..0x40_6000 => Some((0x40_0000, 0x100_0000, 0x6000, true)),
                0x40_6000..0x40_8000 => Some((0x40_6000, 0x100_6000, 0x2000, false)),
                _ => None,
            }
        }
        fn mapped_bytes(&self, va: u64, len: u64) -> Option<u64> {
            Some(self.mapped.range(va..va + len).count() as u64 * PAGE_SIZE)
        }
    }

    /// The grants as the device-frame index lists them (`grant::DeviceIndex`).
    impl FrameSource for Space {
        fn frames(&self, va: u64) -> &[u64] {
            match va {
                0x8000_0000..0x8040_0000 => {
                    let i = ((va - 0x8000_0000) >> 12) as usize;
                    &self.grants[i..(i / 512 + 1) * 512]
                }
                _ => &[],
            }
        }
        fn required(&self, perm: Perm) -> u64 {
            if perm.write {
                RW
            } else {
                RO
            }
        }
    }

    fn op(addr: u64, pages: u32, flags: u32) -> DmaOp {
        DmaOp { addr, pages, flags }
    }

    fn map(iova: u64, pa: u64, len: u64, perm: Perm) -> Change {
        Change::Map {
            iova,
            pa,
            len,
            perm,
        }
    }

    const MAP: u32 = dma_flags::MAP;
    const MAP_W: u32 = dma_flags::MAP | dma_flags::WRITE;

    #[test]
    fn maps_become_runs_of_contiguous_frames_after_the_unmaps() {
        let mut s = Space::new();
        s.mapped.extend([0x40_0000, 0x40_1000]);
        let ops = [
            op(0x8000_0000, 3, MAP),
            op(0x40_0000, 2, 0),
            op(0x40_2000, 6, MAP),
        ];
        // Own memory in its pieces (writable or not), each merged where the
        // frames continue; a grant range is one change, whatever its length.
        assert_eq!(
            s.batch(&ops).unwrap(),
            [
                Change::UnmapMapped {
                    iova: 0x40_0000,
                    len: 0x2000
                },
                Change::MapFrames {
                    iova: 0x8000_0000,
                    len: 0x3000,
                    perm: Perm::READ
                },
                map(0x40_2000, 0x100_2000, 0x6000, Perm::READ),
            ]
        );
        assert_eq!(
            s.batch(&[op(0x8000_0000, 2, MAP_W)]).unwrap(),
            [Change::MapFrames {
                iova: 0x8000_0000,
                len: 0x2000,
                perm: Perm::READ_WRITE
            }]
        );
        // The IOMMU reads the frames from the index.
        assert_eq!(
            s.frames(0x8000_1000)[..2],
            [0x900_0000 | RW, 0x900_1000 | RO]
        );
    }

    /// A grant range across two 2 MiB blocks of the index: one change for
    /// the whole range, each block's slice checked in turn.
    #[test]
    fn grant_ranges_are_checked_block_by_block() {
        let mut s = Space::new();
        for (i, e) in s.grants[510..514].iter_mut().enumerate() {
            *e = (0xa00_0000 + i as u64 * 0x5000) | RW;
        }
        let end_of_block = 0x8000_0000 + 510 * 0x1000;
        assert_eq!(s.frames(end_of_block).len(), 2, "to the block's end");
        assert_eq!(
            s.batch(&[op(end_of_block, 4, MAP_W)]).unwrap(),
            [Change::MapFrames {
                iova: end_of_block,
                len: 0x4000,
                perm: Perm::READ_WRITE
            }]
        );
        assert_eq!(
            s.batch(&[op(end_of_block, 5, MAP)]),
            Err(Error::BadAddress),
            "the fifth page has no grant"
        );
        assert_eq!(
            s.batch(&[op(0x8040_0000 - 0x1000, 2, MAP)]),
            Err(Error::BadAddress),
            "nothing in the third block"
        );
        assert_eq!(
            s.batch(&[op(GRANT_WINDOW + GRANT_WINDOW_SIZE - 0x1000, 2, MAP)]),
            Err(Error::BadAddress),
            "past the window"
        );
    }

    /// The overlap check sorts: 64 disjoint operations in any order pass,
    /// and two far apart in the array that overlap are refused.
    #[test]
    fn overlaps_are_found_in_any_order() {
        let mut s = Space::new();
        s.mapped.extend((0..64).map(|i| 0x40_0000 + i * 0x2000));
        let unmap = |i: u64| op(0x40_0000 + i * 0x2000, 1, 0);
        let mut ops: Vec<DmaOp> = (0..64).rev().map(unmap).collect();
        ops.swap(3, 40);
        assert_eq!(s.batch(&ops).unwrap().len(), 64);
        // ops[0] unmaps the last page; ops[63] (the first page before) now
        // ends inside it.
        // (Every page mapped: the overlap alone refuses it.)
        ops[63] = op(0x40_0000 + 63 * 0x2000 - 0x1000, 2, 0);
        s.mapped.insert(0x40_0000 + 63 * 0x2000 - 0x1000);
        assert!(s.batch(&ops[1..]).is_ok());
        assert_eq!(s.batch(&ops), Err(Error::Invalid));
        // Ascending, as callers make them (no sort): touching passes, one
        // page of overlap does not.
        let ascending: Vec<DmaOp> = (0..64).map(unmap).collect();
        assert!(s.batch(&ascending).is_ok());
        let touching = [op(0x40_0000, 1, 0), op(0x40_1000, 1, 0)];
        s.mapped.insert(0x40_1000);
        assert!(s.batch(&touching).is_ok());
        let overlapping = [op(0x40_0000, 2, 0), op(0x40_1000, 1, 0)];
        assert_eq!(s.batch(&overlapping), Err(Error::Invalid));
        let same = [op(0x40_0000, 1, 0), op(0x40_0000, 1, 0)];
        assert_eq!(s.batch(&same), Err(Error::Invalid));
        // More than a batch holds.
        let many = std::vec![unmap(0); 65];
        assert_eq!(s.batch(&many), Err(Error::BadLength));
    }

    #[test]
    fn hostile_operations_are_refused_in_order() {
        let mut s = Space::new();
        s.mapped.insert(0x40_0000);
        let s = s;
        let refused = |ops: &[DmaOp]| s.batch(ops).unwrap_err();
        // Flags first: unknown bits, WRITE on an unmap.
        assert_eq!(refused(&[op(0x40_0000, 1, 4 | MAP)]), Error::Invalid);
        assert_eq!(
            refused(&[op(0x40_0000, 1, dma_flags::WRITE)]),
            Error::Invalid
        );
        assert_eq!(refused(&[op(0x40_0001, 0, 8)]), Error::Invalid);
        // Then the length, then the address.
        assert_eq!(refused(&[op(0x40_0001, 0, MAP)]), Error::BadLength);
        assert_eq!(refused(&[op(0x40_0800, 1, MAP)]), Error::BadAddress);
        assert_eq!(refused(&[op(!0xfff, 2, MAP)]), Error::BadAddress, "wraps");
        assert_eq!(
            refused(&[op(USER_LIMIT - 0x1000, 2, MAP)]),
            Error::BadAddress,
            "reaches the interrupt window"
        );
        assert_eq!(
            refused(&[op(0, u32::MAX, MAP)]),
            Error::BadAddress,
            "too long"
        );
        // Each operation's own checks come before the overlaps.
        assert_eq!(
            refused(&[op(0x40_0000, 2, MAP), op(0x40_1000, 1, MAP), op(0, 0, MAP)]),
            Error::BadLength
        );
        // Overlapping operations, even a map and an unmap.
        assert_eq!(
            refused(&[op(0x40_0000, 2, MAP), op(0x40_1000, 1, MAP)]),
            Error::Invalid
        );
        assert_eq!(
            refused(&[op(0x40_1000, 1, MAP), op(0x40_0000, 2, 0)]),
            Error::Invalid
        );
        // Pages that are not the caller's, or not writable for WRITE.
        assert_eq!(refused(&[op(0x30_0000, 1, MAP)]), Error::BadAddress);
        assert_eq!(refused(&[op(0x40_7000, 2, MAP)]), Error::BadAddress);
        assert_eq!(refused(&[op(0x8000_3000, 1, MAP)]), Error::BadAddress);
        assert_eq!(refused(&[op(0x40_5000, 2, MAP_W)]), Error::BadAddress);
        assert_eq!(refused(&[op(0x8000_1000, 2, MAP_W)]), Error::BadAddress);
        // An unmap of a page that is not mapped: the IOMMU refuses it
        // (`Change::UnmapMapped`), but before a map's refusal, whether the
        // map is refused here (own memory) or by the IOMMU (a grant).
        for unmap in [op(0x40_0000, 2, 0), op(0x8000_0000, 1, 0)] {
            let mut changes = Vec::new();
            assert!(plan(&s, &[unmap], &mut changes).is_ok());
            assert_eq!(refused(&[unmap]), Error::Invalid);
            for map in [op(0x30_0000, 1, MAP), op(0x8000_3000, 1, MAP)] {
                assert_eq!(refused(&[unmap, map]), Error::Invalid);
                assert_eq!(refused(&[map, unmap]), Error::Invalid);
            }
        }
        assert_eq!(
            refused(&[op(0x40_0000, 1, 0), op(0x30_0000, 1, MAP)]),
            Error::BadAddress,
            "a mapped page's unmap, an own page that is not"
        );
        assert_eq!(
            refused(&[op(0x40_0000, 1, 0), op(0x8000_2000, 1, MAP_W)]),
            Error::BadAddress,
            "a mapped page's unmap, a read-only grant for writing"
        );
        // A read-only page may be mapped for reading, and a page mapped already may be
        // mapped again (its permission changes).
        assert!(s
            .batch(&[op(0x40_6000, 2, MAP), op(0x40_0000, 1, MAP_W)])
            .is_ok());
        // A grant range with a hole (0x8000_3000 is not granted).
        assert_eq!(refused(&[op(0x8000_2000, 2, MAP)]), Error::BadAddress);
    }

    /// The IOMMU's refusals as the hypercall reports them.
    #[test]
    fn iommu_refusals_become_the_hypercall_errors() {
        assert_eq!(refusal(iommu::Error::NotMapped { iova: 0 }), Error::Invalid);
        assert_eq!(
            refusal(iommu::Error::MissingFrame { iova: 0 }),
            Error::BadAddress
        );
        assert_eq!(refusal(iommu::Error::OutOfFrames), Error::NoSpace);
        assert_eq!(
            refusal(iommu::Error::BeyondHostWidth { pa: 1 << 52 }),
            Error::NoSpace
        );
    }
}
