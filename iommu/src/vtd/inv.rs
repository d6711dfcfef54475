//! VT-d invalidation requests, as queued-invalidation descriptors (128-bit, legacy mode) and
//! as register commands.
//!
//! Descriptor layouts (low quadword; the high one is 0 unless said):
//!
//! | type | what | fields |
//! |---|---|---|
//! | 1 | context cache | G 5:4 (1 global, 2 domain, 3 device), DID 31:16, SID 47:32, FM 49:48 |
//! | 2 | IOTLB | G 5:4 (1 global, 2 domain, 3 page), DW 6, DR 7, DID 31:16; high: ADDR 63:12, IH 6, AM 5:0 |
//! | 4 | interrupt entry cache | G 4 (0 global, 1 index), IM 31:27, IIDX 47:32 |
//! | 5 | invalidation wait | IF 4, SW 5, FN 6, status data 63:32; high: status address 63:2 |

use super::regs::{ccmd, iotlb};
use crate::api::PAGE_SIZE;
use crate::Bdf;

/// One invalidation request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// Every context-cache entry.
    ContextGlobal,
    /// The context-cache entries tagged with domain `did`.
    ContextDomain { did: u16 },
    /// The context-cache entry of one function (`did`: the domain id it was cached with).
    ContextDevice { did: u16, source: Bdf },
    /// Every IOTLB entry (and paging-structure cache entry).
    IotlbGlobal,
    /// Every IOTLB entry of domain `did`.
    IotlbDomain { did: u16 },
    /// The IOTLB entries of domain `did` for the 2^`am` pages at `addr` (aligned to their
    /// size), paging-structure caches included (IH = 0).
    IotlbPages { did: u16, addr: u64, am: u8 },
    /// Every interrupt-entry-cache entry.
    IecGlobal,
    /// The interrupt-entry-cache entries for the 2^`im` indexes at `index`.
    IecIndex { index: u16, im: u8 },
}

/// How many invalidations of each kind a unit was asked for, so that a
/// mode's real cost shows (e.g. the IOTLB invalidations of strict DMA).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InvalidationCounts {
    pub context: u64,
    pub iotlb_global: u64,
    pub iotlb_domain: u64,
    pub iotlb_pages: u64,
    pub iec: u64,
}

impl InvalidationCounts {
    /// Counts one request.
    pub fn count(&mut self, r: &Invalidation) {
        let n = match r {
            Invalidation::ContextGlobal
            | Invalidation::ContextDomain { .. }
            | Invalidation::ContextDevice { .. } => &mut self.context,
            Invalidation::IotlbGlobal => &mut self.iotlb_global,
            Invalidation::IotlbDomain { .. } => &mut self.iotlb_domain,
            Invalidation::IotlbPages { .. } => &mut self.iotlb_pages,
            Invalidation::IecGlobal | Invalidation::IecIndex { .. } => &mut self.iec,
        };
        *n += 1;
    }

    /// Every IOTLB invalidation, whatever its granularity.
    pub fn iotlb(&self) -> u64 {
        self.iotlb_global + self.iotlb_domain + self.iotlb_pages
    }
}

/// Descriptor type codes.
pub mod kind {
    pub const CONTEXT: u64 = 1;
    pub const IOTLB: u64 = 2;
    pub const IEC: u64 = 4;
    pub const WAIT: u64 = 5;
}

/// Invalidation wait descriptor: status write (SW).
pub const WAIT_SW: u64 = 1 << 5;
/// Invalidation wait descriptor: interrupt flag (IF).
pub const WAIT_IF: u64 = 1 << 4;

impl Invalidation {
    /// The queued-invalidation descriptor. `drain` adds DR/DW to IOTLB descriptors (set them
    /// where CAP.DRD/DWD).
    pub const fn descriptor(self, drain_reads: bool, drain_writes: bool) -> [u64; 2] {
        let drain = (drain_writes as u64) << 6 | (drain_reads as u64) << 7;
        match self {
            Invalidation::ContextGlobal => [kind::CONTEXT | 1 << 4, 0],
            Invalidation::ContextDomain { did } => [kind::CONTEXT | 2 << 4 | (did as u64) << 16, 0],
            Invalidation::ContextDevice { did, source } => [
                kind::CONTEXT | 3 << 4 | (did as u64) << 16 | (source.rid() as u64) << 32,
                0,
            ],
            Invalidation::IotlbGlobal => [kind::IOTLB | 1 << 4 | drain, 0],
            Invalidation::IotlbDomain { did } => {
                [kind::IOTLB | 2 << 4 | drain | (did as u64) << 16, 0]
            }
            Invalidation::IotlbPages { did, addr, am } => [
                kind::IOTLB | 3 << 4 | drain | (did as u64) << 16,
                (addr & !(PAGE_SIZE - 1)) | (am as u64 & 0x3f),
            ],
            Invalidation::IecGlobal => [kind::IEC, 0],
            Invalidation::IecIndex { index, im } => [
                kind::IEC | 1 << 4 | (im as u64 & 0x1f) << 27 | (index as u64) << 32,
                0,
            ],
        }
    }

    /// The register command: `(CCMD value, None)` for the context cache, `(IOTLB register
    /// value, IVA value to write first)` for the IOTLB; `None` for the interrupt entry cache,
    /// which only queued invalidation reaches.
    pub const fn register_command(
        self,
        drain_reads: bool,
        drain_writes: bool,
    ) -> Option<RegisterCommand> {
        let drain =
            if drain_reads { iotlb::DR } else { 0 } | if drain_writes { iotlb::DW } else { 0 };
        Some(match self {
            Invalidation::ContextGlobal => RegisterCommand::Context(ccmd::ICC | ccmd::GLOBAL),
            Invalidation::ContextDomain { did } => {
                RegisterCommand::Context(ccmd::ICC | ccmd::DOMAIN | did as u64)
            }
            Invalidation::ContextDevice { did, source } => RegisterCommand::Context(
                ccmd::ICC | ccmd::DEVICE | (source.rid() as u64) << ccmd::SID_SHIFT | did as u64,
            ),
            Invalidation::IotlbGlobal => RegisterCommand::Iotlb {
                iva: None,
                command: iotlb::IVT | iotlb::GLOBAL | drain,
            },
            Invalidation::IotlbDomain { did } => RegisterCommand::Iotlb {
                iva: None,
                command: iotlb::IVT | iotlb::DOMAIN | drain | (did as u64) << iotlb::DID_SHIFT,
            },
            Invalidation::IotlbPages { did, addr, am } => RegisterCommand::Iotlb {
                iva: Some((addr & !(PAGE_SIZE - 1)) | (am as u64 & 0x3f)),
                command: iotlb::IVT | iotlb::PAGE | drain | (did as u64) << iotlb::DID_SHIFT,
            },
            Invalidation::IecGlobal | Invalidation::IecIndex { .. } => return None,
        })
    }
}

/// A register-based invalidation command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterCommand {
    /// Write this to CCMD (64-bit), then poll CCMD.ICC clear.
    Context(u64),
    /// Write `iva` (if any) to IVA, then `command` to the IOTLB register (both 64-bit), then
    /// poll IVT clear.
    Iotlb { iva: Option<u64>, command: u64 },
}

/// An invalidation wait descriptor that writes `data` to the 4-byte-aligned `status_addr`
/// when every descriptor before it has completed.
pub const fn wait_descriptor(status_addr: u64, data: u32) -> [u64; 2] {
    [kind::WAIT | WAIT_SW | (data as u64) << 32, status_addr & !3]
}

/// The aligned power-of-two blocks `(address, AM)` that cover `iova..iova + len` for
/// page-selective IOTLB invalidation, each at most 2^`mamv` pages. `iova` and `len` are
/// multiples of 4 KiB.
pub fn page_blocks(iova: u64, len: u64, mamv: u8) -> impl Iterator<Item = (u64, u8)> {
    let mut page = iova / PAGE_SIZE;
    let end = page.saturating_add(len / PAGE_SIZE);
    core::iter::from_fn(move || {
        if page >= end {
            return None;
        }
        let align = if page == 0 { 63 } else { page.trailing_zeros() };
        let fit = 63 - (end - page).leading_zeros();
        let am = align.min(fit).min(u32::from(mamv));
        let block = (page * PAGE_SIZE, am as u8);
        page += 1 << am;
        Some(block)
    })
}

/// The smallest naturally aligned block of 2^AM pages that covers `lo..hi` (4 KiB-aligned,
/// `lo < hi`): `(address, AM)`, what one page-selective IOTLB invalidation names. `None` for
/// an empty range.
pub fn covering_block(lo: u64, hi: u64) -> Option<(u64, u8)> {
    if hi <= lo {
        return None;
    }
    let (first, last) = (lo / PAGE_SIZE, (hi - 1) / PAGE_SIZE);
    // The pages share every bit above the highest one in which they differ.
    let am = 64 - (first ^ last).leading_zeros();
    let base = if am >= 64 { 0 } else { first >> am << am };
    Some((base * PAGE_SIZE, am as u8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn descriptors() {
        assert_eq!(
            Invalidation::ContextGlobal.descriptor(false, false),
            [0x11, 0]
        );
        assert_eq!(Invalidation::IotlbGlobal.descriptor(true, true), [0xd2, 0]);
        assert_eq!(
            Invalidation::IotlbPages {
                did: 7,
                addr: 0x20_0000,
                am: 9
            }
            .descriptor(false, false),
            [0x0007_0032, 0x20_0009]
        );
        assert_eq!(
            Invalidation::ContextDevice {
                did: 3,
                source: Bdf::new(0, 3, 0)
            }
            .descriptor(false, false),
            [0x18_0003_0031, 0]
        );
        assert_eq!(Invalidation::IecGlobal.descriptor(true, true), [4, 0]);
        assert_eq!(
            Invalidation::IecIndex { index: 5, im: 0 }.descriptor(false, false),
            [0x5_0000_0014, 0]
        );
        assert_eq!(wait_descriptor(0x1000, 9), [0x9_0000_0025, 0x1000]);
    }

    #[test]
    fn register_commands() {
        assert_eq!(
            Invalidation::ContextGlobal.register_command(false, false),
            Some(RegisterCommand::Context(0xa000_0000_0000_0000))
        );
        assert_eq!(
            Invalidation::IotlbPages {
                did: 2,
                addr: 0x5000,
                am: 0
            }
            .register_command(true, false),
            Some(RegisterCommand::Iotlb {
                iva: Some(0x5000),
                command: 0xb002_0002_0000_0000
            })
        );
        assert_eq!(Invalidation::IecGlobal.register_command(false, false), None);
    }

    #[test]
    fn covering_blocks() {
        assert_eq!(covering_block(0x5000, 0x6000), Some((0x5000, 0)));
        assert_eq!(covering_block(0x4000, 0x6000), Some((0x4000, 1)));
        // Two pages astride a 16 KiB boundary: the 32 KiB block around them.
        assert_eq!(covering_block(0x3000, 0x5000), Some((0, 3)));
        assert_eq!(
            covering_block(0x8000_0000, 0x8001_0000),
            Some((0x8000_0000, 4))
        );
        assert_eq!(
            covering_block(0x8000_f000, 0x8001_1000),
            Some((0x8000_0000, 5))
        );
        assert_eq!(covering_block(0x40_0000, 0x8000_1000), Some((0, 20)));
        assert_eq!(covering_block(0x1000, 0x1000), None);
        // Every page of the range lies in the block, and the block is aligned to its size.
        for (lo, hi) in [(0x1000u64, 0x9000u64), (0x7f000, 0x81000), (0, 0x1000)] {
            let (addr, am) = covering_block(lo, hi).unwrap();
            let size = 4096u64 << am;
            assert_eq!(addr % size, 0);
            assert!(addr <= lo && hi <= addr + size);
        }
    }

    #[test]
    fn page_blocks_cover_exactly() {
        let blocks: Vec<_> = page_blocks(0x1000, 0x7000, 18).collect();
        assert_eq!(blocks, [(0x1000, 0), (0x2000, 1), (0x4000, 2)]);
        let blocks: Vec<_> = page_blocks(0x20_0000, 0x20_0000, 18).collect();
        assert_eq!(blocks, [(0x20_0000, 9)]);
        let blocks: Vec<_> = page_blocks(0, 0x4000, 1).collect();
        assert_eq!(blocks, [(0, 1), (0x2000, 1)]);
        // Every page of an odd range is covered once.
        for (start, pages) in [(3u64, 13u64), (0, 1), (511, 514), (1, 1)] {
            let mut covered = Vec::new();
            for (addr, am) in page_blocks(start * 4096, pages * 4096, 18) {
                assert_eq!(addr / 4096 % (1 << am), 0, "aligned");
                covered.extend((0..1u64 << am).map(|i| addr / 4096 + i));
            }
            assert_eq!(covered, (start..start + pages).collect::<Vec<_>>());
        }
    }
}
