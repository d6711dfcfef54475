//! The physical frame allocator.
//!
//! It starts from the firmware's RAM regions, takes out everything that is
//! already in use (the hypervisor image, start_info, the memory map, the boot
//! bundle, firmware tables, low memory) and hands out 4 KiB frames from what
//! is left. Free memory is a sorted array of disjoint page-aligned ranges, so
//! the allocator needs no memory of its own.

use crate::layout::{align_down, align_up, PAGE_SIZE};
use core::fmt;

/// A half-open physical range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub const fn new(start: u64, end: u64) -> Self {
        Range { start, end }
    }

    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Free memory is split into more pieces than the allocator can track.
    TooManyRanges { capacity: usize },
    /// A frame given back was not page-aligned.
    Unaligned(u64),
    /// A frame given back is already free.
    DoubleFree(u64),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooManyRanges { capacity } => {
                write!(f, "free memory is split into more than {capacity} ranges")
            }
            FrameError::Unaligned(a) => write!(f, "frame {a:#x} is not 4 KiB aligned"),
            FrameError::DoubleFree(a) => write!(f, "frame {a:#x} is already free"),
        }
    }
}

/// Frames free for use, as at most `N` disjoint sorted ranges.
pub struct FrameAllocator<const N: usize> {
    free: [Range; N],
    len: usize,
}

impl<const N: usize> Default for FrameAllocator<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> FrameAllocator<N> {
    pub const fn new() -> Self {
        FrameAllocator {
            free: [Range::new(0, 0); N],
            len: 0,
        }
    }

    /// Builds the allocator from RAM regions (any order, may overlap) less
    /// the reserved ranges (any order). RAM is rounded inward and
    /// reservations outward to whole pages, so a partly reserved page is never
    /// handed out.
    pub fn build(
        ram: impl IntoIterator<Item = Range>,
        reserved: impl IntoIterator<Item = Range> + Clone,
    ) -> Result<Self, FrameError> {
        let mut a = Self::new();
        for r in ram {
            let start = match align_up(r.start, PAGE_SIZE) {
                Some(s) => s,
                None => continue,
            };
            let end = align_down(r.end, PAGE_SIZE);
            if start < end {
                a.insert(Range::new(start, end))?;
            }
        }
        for r in reserved {
            let start = align_down(r.start, PAGE_SIZE);
            let end = align_up(r.end, PAGE_SIZE).unwrap_or(u64::MAX);
            a.remove(Range::new(start, end))?;
        }
        Ok(a)
    }

    /// The free ranges, lowest first.
    pub fn ranges(&self) -> &[Range] {
        &self.free[..self.len]
    }

    pub fn free_bytes(&self) -> u64 {
        self.ranges().iter().map(Range::len).sum()
    }

    /// One frame, the lowest free.
    pub fn alloc(&mut self) -> Option<u64> {
        self.alloc_contiguous(1, PAGE_SIZE)
    }

    /// `pages` contiguous frames whose first address is a multiple of
    /// `align` (a power of two, at least a page).
    pub fn alloc_contiguous(&mut self, pages: u64, align: u64) -> Option<u64> {
        debug_assert!(align.is_power_of_two() && align >= PAGE_SIZE);
        let bytes = pages.checked_mul(PAGE_SIZE)?;
        let full = self.len == N;
        let (i, start) = self.ranges().iter().enumerate().find_map(|(i, r)| {
            let start = align_up(r.start, align)?;
            let end = start.checked_add(bytes)?;
            // Cutting from the middle needs one more slot.
            let splits = start > r.start && end < r.end;
            (end <= r.end && !(splits && full)).then_some((i, start))
        })?;
        let r = self.free[i];
        let head = Range::new(r.start, start);
        let tail = Range::new(start + bytes, r.end);
        // The pieces lie inside range i, so they stay sorted and disjoint.
        match (head.is_empty(), tail.is_empty()) {
            (true, true) => self.remove_at(i),
            (false, true) => self.free[i] = head,
            (true, false) => self.free[i] = tail,
            (false, false) => {
                self.free[i] = head;
                self.free.copy_within(i + 1..self.len, i + 2);
                self.free[i + 1] = tail;
                self.len += 1;
            }
        }
        Some(start)
    }

    /// Gives one frame back.
    pub fn free(&mut self, frame: u64) -> Result<(), FrameError> {
        if !frame.is_multiple_of(PAGE_SIZE) {
            return Err(FrameError::Unaligned(frame));
        }
        let r = Range::new(frame, frame + PAGE_SIZE);
        if self
            .ranges()
            .iter()
            .any(|f| f.start < r.end && r.start < f.end)
        {
            return Err(FrameError::DoubleFree(frame));
        }
        self.insert(r)
    }

    /// Adds `r` to the free set, merging with neighbours and overlaps.
    fn insert(&mut self, mut r: Range) -> Result<(), FrameError> {
        // Absorb every range that touches or overlaps r.
        let mut i = 0;
        while i < self.len {
            let f = self.free[i];
            if f.start <= r.end && r.start <= f.end {
                r = Range::new(r.start.min(f.start), r.end.max(f.end));
                self.remove_at(i);
            } else {
                i += 1;
            }
        }
        if self.len == N {
            return Err(FrameError::TooManyRanges { capacity: N });
        }
        let at = self
            .ranges()
            .iter()
            .position(|f| f.start > r.start)
            .unwrap_or(self.len);
        self.free.copy_within(at..self.len, at + 1);
        self.free[at] = r;
        self.len += 1;
        Ok(())
    }

    /// Takes `r` out of the free set, splitting ranges it cuts.
    fn remove(&mut self, r: Range) -> Result<(), FrameError> {
        let mut i = 0;
        while i < self.len {
            let f = self.free[i];
            if f.start < r.end && r.start < f.end {
                self.remove_at(i);
                let head = Range::new(f.start, r.start.max(f.start));
                let tail = Range::new(r.end.min(f.end), f.end);
                for piece in [head, tail] {
                    if !piece.is_empty() {
                        self.insert(piece)?;
                    }
                }
                // Pieces lie outside r, so scanning on from i cannot loop.
            }
            i += 1;
        }
        Ok(())
    }

    fn remove_at(&mut self, i: usize) {
        self.free.copy_within(i + 1..self.len, i);
        self.len -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    const MIB: u64 = 1 << 20;

    fn overlaps(a: u64, r: &Range) -> bool {
        a < r.end && r.start < a + PAGE_SIZE
    }

    #[test]
    fn reserved_ranges_are_never_handed_out() {
        // As QEMU reports 256 MiB (unsorted), with an unaligned reservation.
        let ram = [Range::new(MIB, 256 * MIB), Range::new(0, 0x9fc00)];
        let reserved = [
            Range::new(0, MIB),                         // low memory
            Range::new(MIB, MIB + 0x5_3123),            // the image, unaligned end
            Range::new(0xff_f000 - 10, 0xff_f000 + 10), // start_info straddles a page
            Range::new(200 * MIB, 200 * MIB + 3 * MIB), // the bundle
        ];
        let mut a = FrameAllocator::<16>::build(ram, reserved).unwrap();
        let expected = a.free_bytes() / PAGE_SIZE;
        let mut got = Vec::new();
        while let Some(f) = a.alloc() {
            assert!(f % PAGE_SIZE == 0);
            assert!(
                ram.iter().any(|r| f >= r.start && f + PAGE_SIZE <= r.end),
                "{f:#x} not RAM"
            );
            assert!(
                !reserved.iter().any(|r| overlaps(f, r)),
                "{f:#x} is reserved"
            );
            got.push(f);
        }
        assert_eq!(got.len() as u64, expected);
        got.sort();
        got.dedup();
        assert_eq!(got.len() as u64, expected, "a frame was handed out twice");
        // 255 MiB of RAM above 1 MiB, less the image (0x54000), two pages
        // around start_info and 3 MiB of bundle.
        assert_eq!(
            expected * PAGE_SIZE,
            255 * MIB - 0x54000 - 2 * PAGE_SIZE - 3 * MIB
        );
    }

    #[test]
    fn overlapping_ram_merges_and_reservations_split() {
        let a = FrameAllocator::<8>::build(
            [
                Range::new(0x10_0000, 0x30_0000),
                Range::new(0x20_0000, 0x40_0000),
            ],
            [Range::new(0x28_0000, 0x29_0000)],
        )
        .unwrap();
        assert_eq!(
            a.ranges(),
            &[
                Range::new(0x10_0000, 0x28_0000),
                Range::new(0x29_0000, 0x40_0000)
            ]
        );
    }

    #[test]
    fn contiguous_aligned_allocation() {
        let mut a = FrameAllocator::<8>::build([Range::new(0x10_1000, 0x80_0000)], []).unwrap();
        let big = a.alloc_contiguous(512, 2 * MIB).unwrap();
        assert_eq!(big, 0x20_0000);
        assert_eq!(
            a.ranges(),
            &[
                Range::new(0x10_1000, 0x20_0000),
                Range::new(0x40_0000, 0x80_0000)
            ]
        );
        assert_eq!(a.alloc_contiguous(1024, 2 * MIB), Some(0x40_0000));
        assert_eq!(a.alloc_contiguous(1, 2 * MIB), None);
        assert_eq!(a.alloc(), Some(0x10_1000));
    }

    #[test]
    fn free_merges_and_refuses_double_free() {
        let mut a = FrameAllocator::<4>::build([Range::new(0, 4 * PAGE_SIZE)], []).unwrap();
        let f: Vec<u64> = (0..4).map(|_| a.alloc().unwrap()).collect();
        assert!(a.alloc().is_none());
        a.free(f[1]).unwrap();
        a.free(f[3]).unwrap();
        assert_eq!(a.free(f[3]), Err(FrameError::DoubleFree(f[3])));
        assert_eq!(a.free(5), Err(FrameError::Unaligned(5)));
        a.free(f[2]).unwrap();
        assert_eq!(a.ranges(), &[Range::new(PAGE_SIZE, 4 * PAGE_SIZE)]);
    }

    #[test]
    fn too_many_pieces_is_an_error_not_a_loss() {
        let reserved: Vec<Range> = (0..8)
            .map(|i| Range::new(i * 2 * PAGE_SIZE, i * 2 * PAGE_SIZE + 1))
            .collect();
        let r = FrameAllocator::<4>::build([Range::new(0, 16 * PAGE_SIZE)], reserved);
        assert_eq!(r.err(), Some(FrameError::TooManyRanges { capacity: 4 }));
    }
}
