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
//! of the caller: its memory, its grant mappings, its IOMMU domain) in the
//! order `abi::hypercall` documents and returns the changes for
//! `iommu::Iommu::apply_frames`: one `UnmapMapped` per unmap operation (the
//! IOMMU checks that every page of it is mapped, for the whole batch before
//! it changes anything, in the walk that finds the entries it clears), one `Map`
//! per run of own pages whose physical pages are contiguous (an own-memory
//! range is usually one), and one `MapFrames` per grant operation, whatever
//! its length: its pages' frames are not copied out but read in place from
//! the grant mappings' index ([`DmaSpace::device_frames`]; the caller hands
//! the IOMMU the same index as its `iommu::FrameSource`), which `plan` has
//! checked page by page. Nothing is changed on a refusal.
//!
//! Cost: per grant page, `plan` reads one index entry and the IOMMU writes
//! one page-table entry from it; nothing is allocated and nothing searched.

use crate::grant::device_frame;
use abi::domain::USER_LIMIT;
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
    /// The pages the caller mapped from grants with `DEVICE_MAP`, from `va`
    /// to the end of its 2 MiB block (`iommu::FRAME_BLOCK`): one
    /// `grant::device_frame` entry per page, 0 where there is none
    /// (`GrantTables::device_frames`). Empty where the block holds none.
    fn device_frames(&self, va: u64) -> &[u64];
    /// How many bytes of `va..va + len` its IOMMU domain maps now (`None`:
    /// the range cuts a large page, which strict mode never makes). Asked
    /// only when a map is refused, so that a batch refused for an unmap too
    /// gets the unmap's refusal.
    fn mapped_bytes(&self, va: u64, len: u64) -> Option<u64>;
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
    out.push(map(iova, pa, len, perm));
}

/// A checked operation: its byte range.
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    end: u64,
}

#[inline]
fn range(op: &DmaOp) -> Result<Range, Error> {
    if op.flags & !dma_flags::ALL != 0 || (op.is_write() && !op.is_map()) {
        return Err(Error::Invalid);
    }
    if op.pages == 0 {
        return Err(Error::BadLength);
    }
    if !op.addr.is_multiple_of(PAGE_SIZE) {
        return Err(Error::BadAddress);
    }
    let end = u64::from(op.pages)
        .checked_mul(PAGE_SIZE)
        .and_then(|len| op.addr.checked_add(len))
        .filter(|&end| end <= USER_LIMIT)
        .ok_or(Error::BadAddress)?;
    Ok(Range {
        start: op.addr,
        end,
    })
}

/// Checks `ops` (already copied in; the caller checked their count) and
/// puts the IOMMU changes that carry them out in `out` (cleared first).
/// Every unmap comes before every map (they never overlap, so that is the
/// order `Iommu::apply` uses anyway). On an error `out` means nothing. The
/// unmaps' own check (every page mapped) is the IOMMU's, when it applies
/// the changes: the caller turns its `iommu::Error::NotMapped` into
/// `Error::Invalid`.
pub fn plan(space: &impl DmaSpace, ops: &[DmaOp], out: &mut Vec<Change>) -> Result<(), Error> {
    out.clear();
    // Each operation's own checks, in order, before any look at the others
    // (a batch is at most DMA_BATCH_MAX operations).
    const MAX: usize = abi::hypercall::DMA_BATCH_MAX as usize;
    if ops.len() > MAX {
        return Err(Error::BadLength);
    }
    for op in ops {
        range(op)?;
    }
    // Overlaps: sorted by start (an insertion sort: linear for the ascending
    // batches callers make), each range must end before the next starts.
    let mut order = [0u8; MAX];
    for (i, op) in ops.iter().enumerate() {
        let mut j = i;
        while j > 0 && ops[usize::from(order[j - 1])].addr > op.addr {
            order[j] = order[j - 1];
            j -= 1;
        }
        order[j] = i as u8;
    }
    for w in order[..ops.len()].windows(2) {
        if checked(&ops[usize::from(w[0])]).end > ops[usize::from(w[1])].addr {
            return Err(Error::Invalid);
        }
    }
    // Unmaps: every page must be mapped, which the IOMMU checks for the whole batch before
    // it changes anything (`Change::UnmapMapped`, refused as `Error::Invalid`), walking its
    // tables once for the check and the unmap.
    for op in ops.iter().filter(|op| !op.is_map()) {
        let r = checked(op);
        out.push(Change::UnmapMapped {
            iova: r.start,
            len: r.end - r.start,
        });
    }
    if let Err(e) = maps(space, ops, out) {
        // The unmaps' check comes before the maps': a batch refused for both is refused
        // for the unmap (the refusal's path only).
        let unmapped = ops.iter().filter(|op| !op.is_map()).any(|op| {
            let r = checked(op);
            space.mapped_bytes(r.start, r.end - r.start) != Some(r.end - r.start)
        });
        return Err(if unmapped { Error::Invalid } else { e });
    }
    Ok(())
}

/// The range of an operation that passed [`range`] (so nothing overflows).
#[inline]
fn checked(op: &DmaOp) -> Range {
    Range {
        start: op.addr,
        end: op.addr + u64::from(op.pages) * PAGE_SIZE,
    }
}

/// The maps of a batch whose operations passed their own checks.
fn maps(space: &impl DmaSpace, ops: &[DmaOp], out: &mut Vec<Change>) -> Result<(), Error> {
    for op in ops.iter().filter(|op| op.is_map()) {
        let r = checked(op);
        let write = op.is_write();
        let perm = if write { Perm::READ_WRITE } else { Perm::READ };
        if space.own_region(r.start).is_some() {
            // Own memory: a piece at a time.
            let mut at = r.start;
            while at < r.end {
                let (rva, rpa, rlen, writable) = space.own_region(at).ok_or(Error::BadAddress)?;
                if write && !writable {
                    return Err(Error::BadAddress);
                }
                let n = (rva + rlen).min(r.end) - at;
                push_map(out, at, rpa + (at - rva), n, perm);
                at += n;
            }
            continue;
        }
        // Grants: every page of the range mapped for the devices (and
        // writable, for WRITE), a block of the index at a time; the IOMMU
        // reads the same entries when it writes the page tables.
        let want = device_frame::PRESENT | if write { device_frame::WRITABLE } else { 0 };
        let mut at = r.start;
        while at < r.end {
            let frames = space.device_frames(at);
            let n = frames.len().min(((r.end - at) / PAGE_SIZE) as usize);
            let all = frames.iter().take(n).fold(want, |all, &e| all & e);
            if n == 0 || all != want {
                return Err(Error::BadAddress);
            }
            at += n as u64 * PAGE_SIZE;
        }
        out.push(Change::MapFrames {
            iova: r.start,
            len: r.end - r.start,
            perm,
        });
    }
    Ok(())
}

fn map(iova: u64, pa: u64, len: u64, perm: Perm) -> Change {
    Change::Map {
        iova,
        pa,
        len,
        perm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    }

    impl DmaSpace for Space {
        fn own_region(&self, va: u64) -> Option<(u64, u64, u64, bool)> {
            match va {
                0x40_0000..0x40_6000 => Some((0x40_0000, 0x100_0000, 0x6000, true)),
                0x40_6000..0x40_8000 => Some((0x40_6000, 0x100_6000, 0x2000, false)),
                _ => None,
            }
        }
        fn device_frames(&self, va: u64) -> &[u64] {
            match va {
                0x8000_0000..0x8040_0000 => {
                    let i = ((va - 0x8000_0000) >> 12) as usize;
                    &self.grants[i..(i / 512 + 1) * 512]
                }
                _ => &[],
            }
        }
        fn mapped_bytes(&self, va: u64, len: u64) -> Option<u64> {
            Some(self.mapped.range(va..va + len).count() as u64 * PAGE_SIZE)
        }
    }

    fn op(addr: u64, pages: u32, flags: u32) -> DmaOp {
        DmaOp { addr, pages, flags }
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
        let mut changes = Vec::new();
        plan(&s, &ops, &mut changes).unwrap();
        // Own memory in its pieces (writable or not), each merged where the
        // frames continue; a grant range is one change, whatever its length.
        assert_eq!(
            changes,
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
        plan(&s, &[op(0x8000_0000, 2, MAP_W)], &mut changes).unwrap();
        assert_eq!(
            changes,
            [Change::MapFrames {
                iova: 0x8000_0000,
                len: 0x2000,
                perm: Perm::READ_WRITE
            }]
        );
        // The IOMMU reads the frames from the same index.
        assert_eq!(
            s.device_frames(0x8000_1000)[..2],
            [0x900_0000 | RW, 0x900_1000 | RO]
        );
    }

    /// A grant range across two 2 MiB blocks of the index: each block's
    /// slice read in turn, one change for the whole range.
    #[test]
    fn grant_ranges_are_checked_block_by_block() {
        let mut s = Space::new();
        for (i, e) in s.grants[510..514].iter_mut().enumerate() {
            *e = (0xa00_0000 + i as u64 * 0x5000) | RW;
        }
        let end_of_block = 0x8000_0000 + 510 * 0x1000;
        assert_eq!(s.device_frames(end_of_block).len(), 2, "to the block's end");
        let mut changes = Vec::new();
        plan(&s, &[op(end_of_block, 4, MAP_W)], &mut changes).unwrap();
        assert_eq!(
            changes,
            [Change::MapFrames {
                iova: end_of_block,
                len: 0x4000,
                perm: Perm::READ_WRITE
            }]
        );
        assert_eq!(
            plan(&s, &[op(end_of_block, 5, MAP)], &mut changes),
            Err(Error::BadAddress),
            "the fifth page has no grant"
        );
        assert_eq!(
            plan(&s, &[op(0x8040_0000 - 0x1000, 2, MAP)], &mut changes),
            Err(Error::BadAddress),
            "nothing in the third block"
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
        let mut changes = Vec::new();
        plan(&s, &ops, &mut changes).unwrap();
        assert_eq!(changes.len(), 64);
        // ops[0] unmaps the last page; ops[63] (the first page before) now
        // ends inside it.
        // (Every page mapped: the overlap alone refuses it.)
        ops[63] = op(0x40_0000 + 63 * 0x2000 - 0x1000, 2, 0);
        s.mapped.insert(0x40_0000 + 63 * 0x2000 - 0x1000);
        assert!(plan(&s, &ops[1..], &mut changes).is_ok());
        assert_eq!(plan(&s, &ops, &mut changes), Err(Error::Invalid));
        // More than a batch holds.
        let many = std::vec![unmap(0); 65];
        assert_eq!(plan(&s, &many, &mut changes), Err(Error::BadLength));
    }

    #[test]
    fn hostile_operations_are_refused_in_order() {
        let mut s = Space::new();
        s.mapped.insert(0x40_0000);
        let refused = |ops: &[DmaOp]| plan(&s, ops, &mut Vec::new()).unwrap_err();
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
        // (`Change::UnmapMapped`), but before a map's refusal.
        for unmap in [op(0x40_0000, 2, 0), op(0x8000_0000, 1, 0)] {
            assert!(plan(&s, &[unmap], &mut Vec::new()).is_ok());
            assert_eq!(refused(&[unmap, op(0x30_0000, 1, MAP)]), Error::Invalid);
            assert_eq!(refused(&[op(0x30_0000, 1, MAP), unmap]), Error::Invalid);
        }
        assert_eq!(
            refused(&[op(0x40_0000, 1, 0), op(0x30_0000, 1, MAP)]),
            Error::BadAddress,
            "a mapped page's unmap, an own page that is not"
        );
        // A read-only page may be mapped for reading, and a page mapped already may be
        // mapped again (its permission changes).
        assert!(plan(
            &s,
            &[op(0x40_6000, 2, MAP), op(0x40_0000, 1, MAP_W)],
            &mut Vec::new()
        )
        .is_ok());
        // A grant range with a hole (0x8000_3000 is not granted).
        assert_eq!(refused(&[op(0x8000_2000, 2, MAP)]), Error::BadAddress);
    }
}
