//! Checking a pointer and length from ring 3 against the caller's own
//! mappings, before the hypervisor reads or writes a byte of it.
//!
//! The hypervisor fills a domain's [`UserRegions`] from the same list of
//! ranges it maps into the domain's page tables (start info, stack, each
//! `PT_LOAD`, heap), so a range that passes [`UserRegions::check`] is mapped
//! with the access asked for. Nothing here dereferences anything.
//!
//! ```text
//!   ptr                      ptr + len
//!    │▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓│            every byte in some region,
//!  ┌─┴──────────┐┌───────────┴──┐         regions may be adjacent,
//!  │ region  RW ││ region   RW  │         a write needs every one writable
//!  └────────────┘└──────────────┘
//! ```

use crate::layout::PAGE_SIZE;
use abi::domain::USER_TOP;
use abi::hypercall::Error;
use alloc::vec::Vec;
use core::fmt;

/// What the hypervisor will do with the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read them (any mapped user page will do).
    Read,
    /// Write them (every page must be writable).
    Write,
}

/// A page-aligned range `[start, end)` mapped into a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte, page-aligned.
    pub start: u64,
    /// One past the last byte, page-aligned.
    pub end: u64,
    /// Whether the domain may write it (every region is readable).
    pub writable: bool,
    /// Where `start` is in physical memory, if recorded: the region is
    /// physically contiguous ([`UserRegions::translate`]).
    pub phys: Option<u64>,
}

/// Why a region could not be added: each is a bug in the domain builder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionError {
    /// `start` or `end` is not a multiple of the page size.
    Unaligned { start: u64, end: u64 },
    /// `end <= start`.
    Empty { start: u64, end: u64 },
    /// The range reaches `USER_TOP` or beyond.
    NotUser { start: u64, end: u64 },
    /// The range overlaps one already added.
    Overlaps { start: u64, end: u64, other: Region },
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionError::Unaligned { start, end } => {
                write!(f, "region {start:#x}..{end:#x} is not page-aligned")
            }
            RegionError::Empty { start, end } => write!(f, "region {start:#x}..{end:#x} is empty"),
            RegionError::NotUser { start, end } => {
                write!(f, "region {start:#x}..{end:#x} reaches {USER_TOP:#x}")
            }
            RegionError::Overlaps { start, end, other } => write!(
                f,
                "region {start:#x}..{end:#x} overlaps {:#x}..{:#x}",
                other.start, other.end
            ),
        }
    }
}

/// The user ranges mapped into one domain, sorted and disjoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserRegions {
    regions: Vec<Region>,
}

impl UserRegions {
    /// No mappings: every non-empty range is refused.
    pub const fn new() -> Self {
        UserRegions {
            regions: Vec::new(),
        }
    }

    /// Records that `[start, end)` is mapped, writable or read-only; it
    /// may come in any order relative to the others (they are kept sorted).
    pub fn push(&mut self, start: u64, end: u64, writable: bool) -> Result<(), RegionError> {
        self.insert(start, end, writable, None)
    }

    /// [`UserRegions::push`] of a range mapped onto physically contiguous
    /// memory from `phys` on, which [`UserRegions::translate`] then finds.
    pub fn push_mapped(
        &mut self,
        start: u64,
        end: u64,
        writable: bool,
        phys: u64,
    ) -> Result<(), RegionError> {
        self.insert(start, end, writable, Some(phys))
    }

    fn insert(
        &mut self,
        start: u64,
        end: u64,
        writable: bool,
        phys: Option<u64>,
    ) -> Result<(), RegionError> {
        if !start.is_multiple_of(PAGE_SIZE) || !end.is_multiple_of(PAGE_SIZE) {
            return Err(RegionError::Unaligned { start, end });
        }
        if end <= start {
            return Err(RegionError::Empty { start, end });
        }
        if end > USER_TOP {
            return Err(RegionError::NotUser { start, end });
        }
        let at = self.regions.partition_point(|r| r.end <= start);
        if let Some(&other) = self.regions.get(at).filter(|r| r.start < end) {
            return Err(RegionError::Overlaps { start, end, other });
        }
        self.regions.insert(
            at,
            Region {
                start,
                end,
                writable,
                phys,
            },
        );
        Ok(())
    }

    /// The physical page behind virtual page `vpn`, if a region pushed with
    /// [`UserRegions::push_mapped`] holds it and, when `write` is asked, is
    /// writable. The regions are sorted and disjoint, so only the first one
    /// ending above the address can hold it: the last (a domain's heap,
    /// where its grants and buffers are) is tried first, then a binary
    /// search of the others.
    pub fn translate(&self, vpn: u64, write: bool) -> Option<u64> {
        let va = vpn.checked_mul(PAGE_SIZE)?;
        let r = match self.regions.last() {
            Some(last) if last.start <= va => last,
            _ => self
                .regions
                .get(self.regions.partition_point(|r| r.end <= va))?,
        };
        if r.start > va || r.end <= va || (write && !r.writable) {
            return None;
        }
        Some(r.phys? + (va - r.start))
    }

    /// The regions, lowest first.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Whether the domain may `access` every byte of `[ptr, ptr + len)`:
    /// [`Error::BadAddress`] if the range wraps, reaches `USER_TOP`, touches
    /// a byte no region covers, or (for a write) a read-only region. An
    /// empty range is always allowed: the caller decides what `len == 0`
    /// means before it asks.
    pub fn check(&self, ptr: u64, len: u64, access: Access) -> Result<(), Error> {
        if len == 0 {
            return Ok(());
        }
        let end = ptr.checked_add(len).ok_or(Error::BadAddress)?;
        if end > USER_TOP {
            return Err(Error::BadAddress);
        }
        // Walk the regions from the one holding `ptr`; each must start
        // where the last ended until `end` is covered.
        let mut at = ptr;
        let first = self.regions.partition_point(|r| r.end <= ptr);
        for r in self.regions.get(first..).unwrap_or_default() {
            if r.start > at || (access == Access::Write && !r.writable) {
                return Err(Error::BadAddress);
            }
            at = r.end;
            if at >= end {
                return Ok(());
            }
        }
        Err(Error::BadAddress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::domain::{IMAGE_BASE, STACK_SIZE, STACK_TOP, START_INFO_VA, USER_LIMIT};
    use std::string::ToString;

    const PAGE: u64 = PAGE_SIZE;
    const HEAP: u64 = IMAGE_BASE + 0x10_0000;

    /// A domain laid out as `abi::domain` says: start info (RO), stack
    /// (RW), text (RO), data (RW) right after it, a gap page, heap (RW).
    fn domain() -> UserRegions {
        let mut u = UserRegions::new();
        u.push(START_INFO_VA, START_INFO_VA + PAGE, false).unwrap();
        u.push(STACK_TOP - STACK_SIZE, STACK_TOP, true).unwrap();
        u.push(IMAGE_BASE, IMAGE_BASE + 4 * PAGE, false).unwrap();
        u.push(IMAGE_BASE + 4 * PAGE, IMAGE_BASE + 6 * PAGE, true)
            .unwrap();
        u.push(HEAP, HEAP + 16 * PAGE, true).unwrap();
        u
    }

    use Access::{Read, Write};
    const BAD: Result<(), Error> = Err(Error::BadAddress);

    #[test]
    fn mapped_ranges_pass() {
        let u = domain();
        assert_eq!(u.check(START_INFO_VA, PAGE, Read), Ok(()));
        assert_eq!(u.check(STACK_TOP - 8, 8, Write), Ok(()));
        assert_eq!(u.check(STACK_TOP - STACK_SIZE, STACK_SIZE, Write), Ok(()));
        assert_eq!(u.check(HEAP + 5, 1000, Write), Ok(()));
        assert_eq!(u.check(HEAP + 16 * PAGE - 1, 1, Write), Ok(()));
        assert_eq!(u.check(IMAGE_BASE + 17, 3, Read), Ok(()));
    }

    #[test]
    fn kernel_pointers_are_refused() {
        let u = domain();
        for ptr in [
            0xffff_8000_0000_0000,
            0xffff_ffff_8010_0000,
            USER_TOP,
            USER_TOP + PAGE,
            u64::MAX,
        ] {
            assert_eq!(u.check(ptr, 1, Read), BAD, "{ptr:#x}");
            assert_eq!(u.check(ptr, 8, Write), BAD, "{ptr:#x}");
        }
    }

    #[test]
    fn unmapped_pointers_are_refused() {
        let u = domain();
        for ptr in [
            0,
            8,
            START_INFO_VA - 1,
            START_INFO_VA + PAGE,
            STACK_TOP,                  // the guard page above the stack
            STACK_TOP - STACK_SIZE - 1, // the guard page below it
            IMAGE_BASE + 6 * PAGE,      // between data and heap
            HEAP + 16 * PAGE,           // just past the heap
            USER_LIMIT,
            USER_TOP - 1,
        ] {
            assert_eq!(u.check(ptr, 1, Read), BAD, "{ptr:#x}");
        }
    }

    #[test]
    fn wrapping_ranges_are_refused() {
        let u = domain();
        assert_eq!(u.check(HEAP, u64::MAX, Read), BAD);
        assert_eq!(u.check(u64::MAX, 2, Read), BAD);
        assert_eq!(u.check(HEAP, u64::MAX - HEAP + 1, Read), BAD);
        assert_eq!(u.check(0xffff_ffff_ffff_f000, 0x2000, Write), BAD);
    }

    #[test]
    fn ranges_crossing_user_top_are_refused() {
        let mut u = UserRegions::new();
        u.push(USER_TOP - 2 * PAGE, USER_TOP, true).unwrap();
        assert_eq!(u.check(USER_TOP - 8, 8, Write), Ok(()));
        assert_eq!(u.check(USER_TOP - 8, 9, Read), BAD);
        assert_eq!(u.check(USER_TOP - PAGE, 2 * PAGE, Read), BAD);
        assert_eq!(u.check(USER_TOP - 1, u64::MAX - USER_TOP + 1, Read), BAD);
    }

    #[test]
    fn ranges_running_off_a_mapping_are_refused() {
        let u = domain();
        // From the heap into the unmapped page after it.
        assert_eq!(u.check(HEAP + 16 * PAGE - 8, 9, Read), BAD);
        // From the page before the stack (a guard) into the stack.
        assert_eq!(u.check(STACK_TOP - STACK_SIZE - 8, 16, Read), BAD);
        // From data across the gap into the heap.
        assert_eq!(u.check(IMAGE_BASE + 5 * PAGE, 0x10_0000, Read), BAD);
        // Start info into the unmapped page after it.
        assert_eq!(u.check(START_INFO_VA + 8, PAGE, Read), BAD);
    }

    #[test]
    fn adjacent_regions_cover_a_range_together() {
        let u = domain();
        let text_into_data = u.check(IMAGE_BASE + 3 * PAGE, 2 * PAGE, Read);
        assert_eq!(text_into_data, Ok(()));
        assert_eq!(u.check(IMAGE_BASE, 6 * PAGE, Read), Ok(()));
        // But a write needs both writable.
        assert_eq!(u.check(IMAGE_BASE + 3 * PAGE, 2 * PAGE, Write), BAD);
        let mut v = UserRegions::new();
        for i in 0..4 {
            v.push(HEAP + i * PAGE, HEAP + (i + 1) * PAGE, true)
                .unwrap();
        }
        assert_eq!(v.check(HEAP + 10, 4 * PAGE - 10, Write), Ok(()));
        assert_eq!(v.check(HEAP + 10, 4 * PAGE - 9, Write), BAD);
    }

    #[test]
    fn read_only_regions_refuse_writes() {
        let u = domain();
        assert_eq!(u.check(START_INFO_VA, 8, Write), BAD);
        assert_eq!(u.check(IMAGE_BASE, 1, Write), BAD);
        assert_eq!(u.check(IMAGE_BASE + 4 * PAGE - 1, 1, Write), BAD);
        assert_eq!(u.check(IMAGE_BASE + 4 * PAGE, 1, Write), Ok(()));
        assert_eq!(u.check(IMAGE_BASE + 4 * PAGE - 1, 1, Read), Ok(()));
    }

    #[test]
    fn empty_ranges_are_the_callers_business() {
        let u = domain();
        for ptr in [0, 0xffff_8000_0000_0000, u64::MAX, HEAP] {
            assert_eq!(u.check(ptr, 0, Write), Ok(()));
        }
        assert_eq!(UserRegions::new().check(HEAP, 1, Read), BAD);
    }

    #[test]
    fn translate_finds_the_page_in_its_region() {
        let mut u = UserRegions::new();
        let base = 0x20_0000;
        // Pushed out of order, as the builder may.
        u.push_mapped(HEAP, HEAP + 16 * PAGE, true, base + 0x40 * PAGE)
            .unwrap();
        u.push_mapped(START_INFO_VA, START_INFO_VA + PAGE, false, base)
            .unwrap();
        u.push_mapped(IMAGE_BASE, IMAGE_BASE + 4 * PAGE, false, base + 0x10 * PAGE)
            .unwrap();
        u.push_mapped(
            IMAGE_BASE + 4 * PAGE,
            IMAGE_BASE + 6 * PAGE,
            true,
            base + 0x14 * PAGE,
        )
        .unwrap();
        u.push(STACK_TOP - STACK_SIZE, STACK_TOP, true).unwrap();
        let vpn = |va: u64| va / PAGE;
        assert_eq!(u.translate(vpn(START_INFO_VA), false), Some(base));
        assert_eq!(u.translate(vpn(START_INFO_VA), true), None);
        assert_eq!(
            u.translate(vpn(IMAGE_BASE + 3 * PAGE), false),
            Some(base + 0x13 * PAGE)
        );
        assert_eq!(u.translate(vpn(IMAGE_BASE + 3 * PAGE), true), None);
        assert_eq!(
            u.translate(vpn(IMAGE_BASE + 4 * PAGE), true),
            Some(base + 0x14 * PAGE)
        );
        assert_eq!(u.translate(vpn(HEAP), true), Some(base + 0x40 * PAGE));
        assert_eq!(
            u.translate(vpn(HEAP + 15 * PAGE), true),
            Some(base + 0x4f * PAGE)
        );
        // Past the heap, in gaps, below everything, past u64.
        for va in [
            HEAP + 16 * PAGE,
            IMAGE_BASE + 6 * PAGE,
            0,
            START_INFO_VA + PAGE,
            USER_TOP,
        ] {
            assert_eq!(u.translate(vpn(va), false), None, "{va:#x}");
        }
        assert_eq!(u.translate(u64::MAX, false), None);
        // A region with no physical address recorded translates nothing.
        assert_eq!(u.translate(vpn(STACK_TOP - PAGE), false), None);
        // The same answers as a walk of every region.
        for v in 0..vpn(HEAP) + 32 {
            for w in [false, true] {
                let walk = u.regions().iter().find_map(|r| {
                    let va = v * PAGE;
                    (va >= r.start && va < r.end && (r.writable || !w))
                        .then(|| r.phys.map(|p| p + (va - r.start)))
                        .flatten()
                });
                assert_eq!(u.translate(v, w), walk, "{v:#x} {w}");
            }
        }
    }

    #[test]
    fn bad_regions_are_refused() {
        let mut u = domain();
        assert_eq!(
            u.push(HEAP + 1, HEAP + PAGE, true),
            Err(RegionError::Unaligned {
                start: HEAP + 1,
                end: HEAP + PAGE
            })
        );
        assert!(matches!(
            u.push(HEAP, HEAP, true),
            Err(RegionError::Empty { .. })
        ));
        assert!(matches!(
            u.push(USER_TOP - PAGE, USER_TOP + PAGE, true),
            Err(RegionError::NotUser { .. })
        ));
        assert!(matches!(
            u.push(0xffff_8000_0000_0000, 0xffff_8000_0000_1000, true),
            Err(RegionError::NotUser { .. })
        ));
        let err = u.push(HEAP - PAGE, HEAP + PAGE, true).unwrap_err();
        assert!(matches!(err, RegionError::Overlaps { other, .. } if other.start == HEAP));
        assert!(err.to_string().contains("overlaps"));
        assert!(matches!(
            u.push(IMAGE_BASE + PAGE, IMAGE_BASE + 2 * PAGE, true),
            Err(RegionError::Overlaps { .. })
        ));
        // Adjacent is not overlapping, in any order of adding.
        u.push(HEAP - PAGE, HEAP, false).unwrap();
        u.push(0, PAGE, false).unwrap();
        let r = u.regions();
        assert!(r.windows(2).all(|w| w[0].end <= w[1].start));
        assert_eq!(r.len(), 7);
    }
}
