//! A model of how a VT-d unit translates a DMA request in legacy (non-scalable) mode: root
//! entry → context entry → second-level page walk, with the permission, large-page,
//! reserved-bit and address-width checks, returning the physical address or the fault reason
//! the unit would record. It reads memory as the unit does ([`UnitMemory`]), so the host tests
//! check what the hardware would see, cache flushes included. It follows the VT-d
//! specification and what QEMU 7.2 checks (a not-present paging entry faults as a read or
//! write denial, reasons 6 and 5).
//!
//! Not modelled: requests into the interrupt window 0xFEE00000-0xFEEFFFFF (those go to
//! interrupt remapping), device-TLB translation requests, fault-processing disable, and
//! scalable mode.
//!
//! ```text
//!  root table (RTADDR)      context table (per bus)        second-level tables
//!  [bus] P | CTP ────────►  [devfn] lo: P FPD TT SLPTPTR ─► L4 ─► L3 ─► L2 ─► L1 ─► page
//!                                 hi: AW DID                      (PS: 1 GiB) (PS: 2 MiB)
//! ```

use super::fault::FaultReason;
use super::regs::{level_address_bits, Cap, Ecap};
use super::tables::{ctx, pte, root};
use crate::api::{Access, PAGE_SIZE};
use crate::Bdf;

/// Memory as the unit reads it (not through the CPU's cache).
pub trait UnitMemory {
    /// The 64-bit word at `phys` (8-byte aligned); memory nothing was written to reads as
    /// anything the implementation likes.
    fn read_u64(&self, phys: u64) -> u64;
}

/// A function's context entry as the unit interprets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub did: u16,
    pub levels: u8,
    pub table: u64,
    /// Translation type 2 (pass-through): no page walk.
    pub pass_through: bool,
    /// Fault processing disabled: faults are not recorded.
    pub fpd: bool,
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub pa: u64,
    /// Size of the page the leaf entry maps (4 KiB, 2 MiB or 1 GiB).
    pub page_bytes: u64,
    /// The permissions along the whole walk.
    pub read: bool,
    pub write: bool,
    pub did: u16,
}

/// The unit's properties that decide a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnitModel {
    pub cap: Cap,
    pub ecap: Ecap,
}

impl UnitModel {
    /// Host address width: the bits a table pointer or page address may use (QEMU 7.2 uses
    /// its MGAW, 39 or 48).
    pub const fn host_address_bits(self) -> u8 {
        self.cap.mgaw_bits()
    }

    const fn above_host(self) -> u64 {
        !((1u64 << self.host_address_bits()) - 1)
    }

    /// Root and context lookup for `source`, with the root table at `root_table`.
    pub fn context(
        self,
        mem: &impl UnitMemory,
        root_table: u64,
        source: Bdf,
    ) -> Result<Context, FaultReason> {
        let root_addr = root_table + u64::from(source.bus()) * 16;
        let (root_lo, root_hi) = (mem.read_u64(root_addr), mem.read_u64(root_addr + 8));
        if root_lo & root::P == 0 {
            return Err(FaultReason::ROOT_NOT_PRESENT);
        }
        if root_lo & (root::RESERVED_LO | self.above_host()) != 0 || root_hi != 0 {
            return Err(FaultReason::ROOT_RESERVED);
        }
        let ctx_addr = (root_lo & root::CTP) + u64::from(source.devfn()) * 16;
        let (lo, hi) = (mem.read_u64(ctx_addr), mem.read_u64(ctx_addr + 8));
        if lo & ctx::P == 0 {
            return Err(FaultReason::CONTEXT_NOT_PRESENT);
        }
        if lo & (ctx::RESERVED_LO | self.above_host()) != 0 || hi & ctx::RESERVED_HI != 0 {
            return Err(FaultReason::CONTEXT_RESERVED);
        }
        let tt = (lo >> ctx::TT_SHIFT) & 3;
        let pass_through = match tt {
            0 => false,
            1 if self.ecap.dt() => false,
            2 if self.ecap.pt() => true,
            _ => return Err(FaultReason::CONTEXT_INVALID),
        };
        let levels = (hi & ctx::AW_MASK) as u8 + 2;
        if !pass_through && !self.cap.supported_levels().supports(levels) {
            return Err(FaultReason::CONTEXT_INVALID);
        }
        Ok(Context {
            did: ((hi >> ctx::DID_SHIFT) & 0xffff) as u16,
            levels,
            table: lo & ctx::SLPTPTR,
            pass_through,
            fpd: lo & ctx::FPD != 0,
        })
    }

    /// The second-level walk of `iova` in `context`'s tables.
    pub fn walk(
        self,
        mem: &impl UnitMemory,
        context: &Context,
        iova: u64,
        access: Access,
    ) -> Result<Translation, FaultReason> {
        if context.pass_through {
            return Ok(Translation {
                pa: iova,
                page_bytes: PAGE_SIZE,
                read: true,
                write: true,
                did: context.did,
            });
        }
        let width = level_address_bits(context.levels).min(self.cap.mgaw_bits());
        if width < 64 && iova >> width != 0 {
            return Err(FaultReason::ADDRESS_BEYOND_WIDTH);
        }
        let denied = match access {
            Access::Read => FaultReason::READ_DENIED,
            Access::Write => FaultReason::WRITE_DENIED,
        };
        let need = match access {
            Access::Read => pte::R,
            Access::Write => pte::W,
        };
        let (mut read, mut write) = (true, true);
        let mut table = context.table;
        let mut level = context.levels;
        loop {
            let entry = mem.read_u64(table + pte::index(iova, level) as u64 * 8);
            read &= entry & pte::R != 0;
            write &= entry & pte::W != 0;
            if entry & need == 0 {
                return Err(denied);
            }
            let large = entry & pte::PS != 0;
            let large_ok = match level {
                2 => self.cap.sllps() & 1 != 0,
                3 => self.cap.sllps() & 2 != 0,
                _ => false,
            };
            let mut reserved = pte::SNP | (self.above_host() & !pte::IGNORED_HIGH);
            if level >= 2 && large {
                if !large_ok {
                    return Err(FaultReason::PAGING_RESERVED);
                }
                // Address bits below the large page's size are reserved.
                reserved |= (pte::level_bytes(level) - 1) & !(PAGE_SIZE - 1);
            }
            if entry & reserved != 0 {
                return Err(FaultReason::PAGING_RESERVED);
            }
            if level == 1 || large {
                let page_bytes = pte::level_bytes(level);
                let base = entry & pte::ADDR & !(page_bytes - 1);
                return Ok(Translation {
                    pa: base | (iova & (page_bytes - 1)),
                    page_bytes,
                    read,
                    write,
                    did: context.did,
                });
            }
            table = entry & pte::ADDR;
            level -= 1;
        }
    }

    /// The whole translation: [`UnitModel::context`] then [`UnitModel::walk`].
    pub fn translate(
        self,
        mem: &impl UnitMemory,
        root_table: u64,
        source: Bdf,
        iova: u64,
        access: Access,
    ) -> Result<Translation, FaultReason> {
        let context = self.context(mem, root_table, source)?;
        self.walk(mem, &context, iova, access)
    }
}
