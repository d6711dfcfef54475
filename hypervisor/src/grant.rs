//! Grant tables, Xen version 1 semantics (`abi::grant`): the logic behind
//! `grant_table_set`, `grant_map`, `grant_unmap` and `grant_copy`, and the
//! teardown when a domain dies or the policy changes.
//!
//! The kernel implements [`GrantEnv`] (page tables, the IOMMU, the direct
//! map, the `grant_denied` event) and decodes and encodes the operation
//! arrays; nothing here sees a pointer from ring 3. The state kept here:
//!
//! ```text
//!   GrantTables
//!   ├── doms[d]: table location (va, pages) as grant_table_set named it
//!   │            maps[handle] = Mapping { granter, gref, host_addr,
//!   │                                     writable, device, phys }
//!   │            by_addr[host_addr] = handle   (one mapping per page)
//!   │            device[block][page] = phys | PRESENT | WRITABLE
//!   │                 (DEVICE_MAP mappings by grant-window page, in 2 MiB
//!   │                 blocks made on demand: what dma_batch maps, in place)
//!   └── pins[(granter, gref)] = Pin { readers, writers, entry_phys,
//!                                     page_phys, page_writable }
//!
//!   granter's entry flags      what holds them
//!   ─────────────────────      ───────────────────────────────────────────
//!   READING                    pin.readers > 0 (every mapping, every copy
//!                              in progress)
//!   WRITING                    pin.writers > 0 (writable mappings, a copy
//!                              into the grant in progress)
//! ```
//!
//! As in Xen, the bits are set with a compare-and-swap of the entry's
//! `{flags, domid}` word, so the granter's revoke (a CAS of flags to 0)
//! fails while they are set, and the word checked is the word pinned; the
//! frame is read after the pin, and every later use of a pinned grant gets
//! the page the first pin found. The bits are cleared (atomically) only
//! after the last mapping's TLB and IOTLB entries are gone. A granter that
//! clears them by hand and reuses the entry fools only itself: the page
//! stays mapped until it is unmapped or one of the two domains dies, and a
//! domain's memory is not reused before [`GrantTables::domain_died`].
//!
//! ## Statuses, checked in this order
//!
//! Map ([`GrantTables::map_one`]):
//!
//! | check | status |
//! |---|---|
//! | flags without `HOST_MAP`, or unknown bits | `General` |
//! | `host_addr` not page-aligned, outside `GRANT_WINDOW`, or already mapped by the caller | `BadVirtAddr` |
//! | the caller holds [`MAX_MAPS_PER_DOMAIN`] mappings | `NoDeviceSpace` (Xen: no maptrack handle) |
//! | `dom` is the caller, `DOMID_SELF` or no live domain | `BadDomain` |
//! | the policy refuses `grant:map_read` (or `map_write` for a writable map) | `PermissionDenied`, and [`GrantEnv::denied`] |
//! | `dom` has no table, `ref` is past it | `BadGntref` |
//! | the entry's type is not `PERMIT_ACCESS`, or it is granted to another domain | `BadGntref` |
//! | a `READONLY` entry mapped writable | `PermissionDenied` (no `denied` call: not a policy decision) |
//! | the entry changed under four CAS attempts in a row | `General` (Xen: "unstable") |
//! | the frame is not the granter's own page (writable, for a writable map) | `BadPage` |
//! | the page tables refuse the mapping | `General` |
//! | the IOMMU refuses the device mapping | `NoDeviceSpace` |
//!
//! A grant given to another domain answers `BadGntref`, like one never
//! given: the mapper cannot tell whether the granter uses that entry for
//! someone else. Xen answers `General` for both and for the read-only case.
//! `DEVICE_MAP` by a domain without devices maps for the host only and
//! returns `dev_bus_addr` 0; with devices, the page is at I/O address
//! `host_addr` too: at once in the static DMA mode, and in the strict mode
//! only while the mapper's `dma_batch` has it mapped (the mapping records
//! that it may be; [`GrantTables::device_mapping_at`]). A failed map returns
//! [`NO_HANDLE`] and `dev_bus_addr` 0.
//!
//! Unmap ([`GrantTables::unmap_one`]): an unknown handle, or a `host_addr`
//! that is not the mapping's: `BadHandle`; a non-zero `dev_bus_addr` that
//! is not the mapping's: `BadDevAddr`. An unmap removes the host and the
//! device mapping together.
//!
//! Copy ([`GrantTables::copy_one`]): unknown flag bits, or `offset + len`
//! past 4096 on either side: `BadCopyArg`; then the source side, then the
//! destination side. A grant side: its `domid` is the caller, `DOMID_SELF`
//! or no live domain: `BadDomain`; the policy refuses `grant:copy`:
//! `PermissionDenied` and `denied`; then the entry as for a map (a
//! `READONLY` grant as the destination: `PermissionDenied`), `ref` past
//! 2^32 is `BadGntref`. A side that is the caller's own page: its `domid`
//! is neither `DOMID_SELF` nor the caller: `PermissionDenied` (as Xen);
//! the page not the caller's own (writable, for the destination):
//! `BadPage`. A grant side holds the entry's `READING` (and `WRITING` for
//! the destination) while the hypervisor copies. `len` 0 checks everything
//! and copies nothing.
//!
//! Per copy the cost is kept small: within one call the policy is asked
//! once per granter it allows (it cannot change during the call; a refusal
//! is asked and reported again), a grant table's pages are translated once
//! when it is set, and an entry nothing has pinned is checked and flagged
//! for the one copy without recording a pin.

use crate::policy::{Perms, Policy};
use crate::DomId;
use abi::grant::{
    copy_flags, flags, map_flags, CopyOp, CopyPtr, Entry, MapOp, Status, UnmapOp, DOMID_SELF,
    ENTRIES_PER_PAGE, ENTRY_SIZE, GRANT_WINDOW, GRANT_WINDOW_SIZE, MAX_TABLE_PAGES,
};
use abi::hypercall::Error;
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

const PAGE_SIZE: u64 = 4096;
const PAGE_SHIFT: u32 = 12;

/// The handle a failed map returns.
pub const NO_HANDLE: u32 = u32::MAX;

/// Most live mappings one domain may hold (its handles are below this).
/// Bounds the hypervisor memory a mapper can make it spend.
pub const MAX_MAPS_PER_DOMAIN: usize = 4096;

/// Times a map or copy retries the CAS that pins an entry before it gives
/// up with `General` (Xen's bound).
pub const PIN_RETRIES: usize = 4;

/// What the hypervisor lends this logic. Every call is about a live domain
/// unless it says otherwise; the kernel implements it over its page
/// tables, the direct map and the IOMMU driver.
pub trait GrantEnv {
    /// Whether `d` is a live domain.
    fn domain_exists(&self, d: DomId) -> bool;
    /// `d`'s security label (the manifest's).
    fn label(&self, d: DomId) -> &str;
    /// Whether `d` owns devices (has an IOMMU domain to map grants into).
    fn has_devices(&self, d: DomId) -> bool;
    /// Whether `d`'s DMA is strict: its device grant mappings enter its
    /// IOMMU domain only through `dma_batch`, not when they are made.
    fn strict_dma(&self, d: DomId) -> bool;
    /// The physical address of `d`'s own page at virtual page number `vpn`,
    /// if `d` has it mapped (writable, when `write`). Only the domain's own
    /// memory counts: never a grant-window page or a device BAR, so nobody
    /// can grant what was granted to it or what is not RAM.
    fn translate(&self, d: DomId, vpn: u64, write: bool) -> Option<u64>;
    /// Atomically loads the 8-byte grant entry at `phys` (8-aligned, in a
    /// page `translate` gave).
    fn entry_load(&self, phys: u64) -> u64;
    /// Atomically compares the entry's first 4 bytes (`flags | domid << 16`)
    /// with `old` and, if equal, writes `new`; whether it did.
    fn entry_cas(&mut self, phys: u64, old: u32, new: u32) -> bool;
    /// Atomically clears `bits` of the entry's flags (a `fetch_and`).
    fn entry_clear_flags(&mut self, phys: u64, bits: u16);
    /// Maps `phys` at `va` (in the grant window) in `d`'s page tables,
    /// user-accessible, writable or not, never executable; false if it
    /// could not (no memory for a table).
    fn map_page(&mut self, d: DomId, va: u64, phys: u64, writable: bool) -> bool;
    /// Removes `d`'s mapping at `va` and flushes it from every TLB before
    /// it returns.
    fn unmap_page(&mut self, d: DomId, va: u64);
    /// Maps `phys` at I/O address `iova` in `d`'s IOMMU domain; false if
    /// it could not.
    fn iommu_map(&mut self, d: DomId, iova: u64, phys: u64, writable: bool) -> bool;
    /// Removes `d`'s I/O mapping at `iova` (if there is one: a strict
    /// domain's grant may not be mapped for the device right now) and
    /// invalidates the IOTLB before it returns.
    fn iommu_unmap(&mut self, d: DomId, iova: u64);
    /// Copies `len` bytes from physical `src` to physical `dst`; neither
    /// range crosses a page, and they may overlap (a `memmove`).
    fn copy(&mut self, src: u64, dst: u64, len: usize);
    /// The policy refused `perm` of `subject` on `object`: the kernel
    /// prints `grant_denied`.
    fn denied(&mut self, subject: DomId, object: DomId, perm: Perms);
    /// A frame of a dead granter that no mapping holds any more: the
    /// kernel may free it now (it kept it when the granter died).
    fn release_frame(&mut self, phys: u64);
}

/// Where a domain's grant table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableLoc {
    /// Its first byte in the domain, page-aligned.
    pub va: u64,
    /// Its pages, 1..=`MAX_TABLE_PAGES`.
    pub pages: u64,
}

impl TableLoc {
    /// How many entries it holds.
    pub fn entries(&self) -> u64 {
        self.pages * ENTRIES_PER_PAGE as u64
    }
}

/// One live grant mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub granter: DomId,
    pub gref: u32,
    /// Where the mapper sees the page (and its devices, when `device`).
    pub host_addr: u64,
    pub writable: bool,
    /// For the mapper's devices at I/O address `host_addr`: mapped in its
    /// IOMMU domain now (static DMA), or allowed to be by `dma_batch`
    /// (strict DMA).
    pub device: bool,
    /// The granted page.
    pub phys: u64,
}

/// A grant entry in use: mapped, or being copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pin {
    /// Uses of any kind (each sets `READING`).
    readers: u32,
    /// Uses that write (each sets `WRITING` too).
    writers: u32,
    /// The entry itself.
    entry_phys: u64,
    /// The granted page, found at the first use.
    page_phys: u64,
    /// Whether the granter has the page writable.
    page_writable: bool,
}

/// A mapping removed by a teardown (a domain's death, a policy change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Teardown {
    pub mapper: DomId,
    pub handle: u32,
    pub mapping: Mapping,
}

/// The bits of a device-frame entry ([`GrantTables::device_frames`]):
/// the granted page's physical address with these in its low 12 bits, or 0
/// where no mapping made for the devices is.
pub mod device_frame {
    /// A mapping made for the mapper's devices is at this page.
    pub const PRESENT: u64 = 1;
    /// It is writable.
    pub const WRITABLE: u64 = 2;
}

/// Grant-window pages per block of the device-frame index: 2 MiB, one
/// level-1 IOMMU table's worth (`iommu::FRAME_BLOCK`).
const BLOCK_PAGES: usize = 512;
/// Blocks in the grant window.
const WINDOW_BLOCKS: usize = (GRANT_WINDOW_SIZE / (BLOCK_PAGES as u64 * PAGE_SIZE)) as usize;

/// 2 MiB of the grant window: a device-frame entry per page, and how many
/// are non-zero (the block is freed when none is).
#[derive(Clone, Debug)]
struct DeviceBlock {
    entries: [u64; BLOCK_PAGES],
    live: u16,
}

/// One domain's device-frame index ([`GrantTables::device_index`]).
#[derive(Clone, Copy)]
pub struct DeviceIndex<'a>(&'a [Option<Box<DeviceBlock>>]);

impl<'a> DeviceIndex<'a> {
    /// [`GrantTables::device_frames`]: the entries from grant-window page
    /// `host_addr` to the end of its 2 MiB block.
    pub fn frames(self, host_addr: u64) -> &'a [u64] {
        if !host_addr.is_multiple_of(PAGE_SIZE) {
            return &[];
        }
        let Some((b, i)) = block_of(host_addr) else {
            return &[];
        };
        self.0
            .get(b)
            .and_then(|slot| slot.as_deref())
            .and_then(|block| block.entries.get(i..))
            .unwrap_or(&[])
    }
}

/// What the IOMMU writes a `Change::MapFrames` from, and checks first: a
/// page is listed for a read-only mapping when its entry is `PRESENT`, for
/// a writable one when it is `WRITABLE` too (the grant mapping is), so the
/// unit's check of the frames is `dma_batch`'s check of the grants.
impl iommu::FrameSource for DeviceIndex<'_> {
    fn frames(&self, iova: u64) -> &[u64] {
        DeviceIndex::frames(*self, iova)
    }

    fn required(&self, perm: iommu::Perm) -> u64 {
        device_frame::PRESENT
            | if perm.write {
                device_frame::WRITABLE
            } else {
                0
            }
    }
}

/// A grant-window page's block and its index there.
fn block_of(host_addr: u64) -> Option<(usize, usize)> {
    if !in_window(host_addr) {
        return None;
    }
    let page = ((host_addr - GRANT_WINDOW) >> PAGE_SHIFT) as usize;
    Some((page / BLOCK_PAGES, page % BLOCK_PAGES))
}

/// One domain's state.
#[derive(Clone, Debug, Default)]
struct Dom {
    table: Option<TableLoc>,
    /// The table's pages, translated when it was set (a domain's own
    /// memory stays mapped where it is while it lives).
    table_phys: Vec<u64>,
    /// Its mappings by handle.
    maps: Vec<Option<Mapping>>,
    /// Handles below `maps.len()` that are free.
    free: Vec<u32>,
    /// Its mappings by host address.
    by_addr: BTreeMap<u64, u32>,
    /// Its mappings made for its devices, by grant-window page
    /// ([`device_frame`] entries): `WINDOW_BLOCKS` slots once any is made,
    /// a block allocated while it holds an entry. Invariant: entry `i` of
    /// block `b` is non-zero exactly when a mapping with `device` set is at
    /// `GRANT_WINDOW + (b * 512 + i) * 4096`, and it is that mapping's
    /// `phys | PRESENT` (`| WRITABLE` when writable).
    device: Vec<Option<Box<DeviceBlock>>>,
}

impl Dom {
    fn live(&self) -> usize {
        self.by_addr.len()
    }

    fn insert(&mut self, m: Mapping) -> u32 {
        let handle = match self.free.pop() {
            Some(h) => h,
            None => {
                self.maps.push(None);
                // `live() < MAX_MAPS_PER_DOMAIN` was checked, so it fits.
                (self.maps.len() - 1) as u32
            }
        };
        if let Some(slot) = self.maps.get_mut(handle as usize) {
            *slot = Some(m);
        }
        self.by_addr.insert(m.host_addr, handle);
        if m.device {
            let writable = if m.writable {
                device_frame::WRITABLE
            } else {
                0
            };
            self.set_device_frame(m.host_addr, m.phys | device_frame::PRESENT | writable);
        }
        handle
    }

    /// Writes the device-frame entry of `host_addr` (a grant-window page),
    /// allocating its block for a non-zero entry and freeing it once empty.
    fn set_device_frame(&mut self, host_addr: u64, entry: u64) {
        let Some((b, i)) = block_of(host_addr) else {
            return;
        };
        if self.device.is_empty() {
            if entry == 0 {
                return;
            }
            self.device.resize_with(WINDOW_BLOCKS, || None);
        }
        let Some(slot) = self.device.get_mut(b) else {
            return;
        };
        let block = slot.get_or_insert_with(|| {
            Box::new(DeviceBlock {
                entries: [0; BLOCK_PAGES],
                live: 0,
            })
        });
        let Some(e) = block.entries.get_mut(i) else {
            return;
        };
        match (*e != 0, entry != 0) {
            (false, true) => block.live += 1,
            (true, false) => block.live -= 1,
            _ => {}
        }
        *e = entry;
        if block.live == 0 {
            *slot = None;
        }
    }

    fn get(&self, handle: u32) -> Option<Mapping> {
        self.maps.get(handle as usize).copied().flatten()
    }

    fn remove(&mut self, handle: u32) -> Option<Mapping> {
        let m = self.maps.get_mut(handle as usize)?.take()?;
        self.by_addr.remove(&m.host_addr);
        if m.device {
            self.set_device_frame(m.host_addr, 0);
        }
        self.free.push(handle);
        Some(m)
    }
}

/// A grant in use by one operation: the key of its pin and the page.
#[derive(Clone, Copy, Debug)]
struct Held {
    granter: DomId,
    gref: u32,
    write: bool,
    phys: u64,
    /// Held by a copy alone, with no pin recorded (nothing else used the
    /// entry): `release` just clears the entry's bits at `entry_phys`.
    transient: Option<u64>,
}

/// Every domain's grant table and every grant mapping.
#[derive(Debug, Default)]
pub struct GrantTables {
    doms: BTreeMap<DomId, Dom>,
    pins: BTreeMap<(DomId, u32), Pin>,
    /// Granters that died while others still mapped their pages: their
    /// tables are never written again, and their mapped frames stay the
    /// mappers' until unmapped (`frames_held`, `release_frame`).
    dead: BTreeSet<DomId>,
}

fn in_window(va: u64) -> bool {
    (GRANT_WINDOW..GRANT_WINDOW + GRANT_WINDOW_SIZE).contains(&va)
}

impl GrantTables {
    pub const fn new() -> Self {
        GrantTables {
            doms: BTreeMap::new(),
            pins: BTreeMap::new(),
            dead: BTreeSet::new(),
        }
    }

    /// `grant_table_set`: `d`'s `pages` pages at `va` become its grant
    /// table. `pages` 0 or above `MAX_TABLE_PAGES`: [`Error::BadLength`];
    /// `va` unaligned, in the grant window, or any page not `d`'s own and
    /// writable: [`Error::BadAddress`]; while any of `d`'s grants is in use
    /// (the hypervisor's READING/WRITING bits live in the old table):
    /// [`Error::Denied`]. Setting it again otherwise replaces it.
    pub fn set_table(
        &mut self,
        env: &impl GrantEnv,
        d: DomId,
        va: u64,
        pages: u64,
    ) -> Result<(), Error> {
        if pages == 0 || pages > MAX_TABLE_PAGES {
            return Err(Error::BadLength);
        }
        if !va.is_multiple_of(PAGE_SIZE) {
            return Err(Error::BadAddress);
        }
        let first = va >> PAGE_SHIFT;
        let mut phys = Vec::new();
        for vpn in first..first + pages {
            let addr = vpn << PAGE_SHIFT;
            match env.translate(d, vpn, true) {
                Some(p) if !in_window(addr) => phys.push(p),
                _ => return Err(Error::BadAddress),
            }
        }
        if self.pins_of(d).next().is_some() {
            return Err(Error::Denied);
        }
        let s = self.doms.entry(d).or_default();
        s.table = Some(TableLoc { va, pages });
        s.table_phys = phys;
        Ok(())
    }

    /// `d`'s grant table, if it set one.
    pub fn table(&self, d: DomId) -> Option<TableLoc> {
        self.doms.get(&d).and_then(|s| s.table)
    }

    /// The live mapping `handle` of `mapper`.
    pub fn mapping(&self, mapper: DomId, handle: u32) -> Option<Mapping> {
        self.doms.get(&mapper).and_then(|s| s.get(handle))
    }

    /// `mapper`'s mapping at `host_addr` if it was made for its devices
    /// (`DEVICE_MAP`, and it has devices): what strict DMA may map.
    pub fn device_mapping_at(&self, mapper: DomId, host_addr: u64) -> Option<Mapping> {
        let s = self.doms.get(&mapper)?;
        let handle = *s.by_addr.get(&host_addr)?;
        s.get(handle).filter(|m| m.device)
    }

    /// `mapper`'s mappings made for its devices from grant-window page
    /// `host_addr` to the end of its 2 MiB block (`iommu::FRAME_BLOCK`), one
    /// [`device_frame`] entry per page (0: none there), read in place: what
    /// `dma_batch` checks and has the IOMMU write from. Empty outside the
    /// window, for an unaligned address, or where the block holds none.
    pub fn device_frames(&self, mapper: DomId, host_addr: u64) -> &[u64] {
        self.device_index(mapper).frames(host_addr)
    }

    /// `mapper`'s device-frame index, looked up once: what
    /// [`GrantTables::device_frames`] reads, for the many reads of one
    /// `dma_batch`.
    pub fn device_index(&self, mapper: DomId) -> DeviceIndex<'_> {
        DeviceIndex(self.doms.get(&mapper).map_or(&[], |s| &s.device[..]))
    }

    /// How many mappings `mapper` holds.
    pub fn mapping_count(&self, mapper: DomId) -> usize {
        self.doms.get(&mapper).map_or(0, Dom::live)
    }

    /// How many uses (all, writing) hold `granter`'s entry `gref`.
    pub fn pin_counts(&self, granter: DomId, gref: u32) -> (u32, u32) {
        self.pins
            .get(&(granter, gref))
            .map_or((0, 0), |p| (p.readers, p.writers))
    }

    fn pins_of(&self, granter: DomId) -> impl Iterator<Item = (&(DomId, u32), &Pin)> {
        self.pins.range((granter, 0)..=(granter, u32::MAX))
    }

    /// `grant_map`: each operation of `ops` by `mapper`, its status,
    /// handle and device address written back.
    pub fn map(
        &mut self,
        env: &mut impl GrantEnv,
        policy: &mut Policy,
        mapper: DomId,
        ops: &mut [MapOp],
    ) {
        for op in ops {
            match self.map_one(env, policy, mapper, op) {
                Ok((handle, dev_bus_addr)) => {
                    op.status = Status::Okay as i16;
                    op.handle = handle;
                    op.dev_bus_addr = dev_bus_addr;
                }
                Err(s) => {
                    op.status = s as i16;
                    op.handle = NO_HANDLE;
                    op.dev_bus_addr = 0;
                }
            }
        }
    }

    /// One map: its handle and device address (0 without a device mapping).
    pub fn map_one(
        &mut self,
        env: &mut impl GrantEnv,
        policy: &mut Policy,
        mapper: DomId,
        op: &MapOp,
    ) -> Result<(u32, u64), Status> {
        let known = map_flags::DEVICE_MAP | map_flags::HOST_MAP | map_flags::READONLY;
        if op.flags & !known != 0 || op.flags & map_flags::HOST_MAP == 0 {
            return Err(Status::General);
        }
        let writable = op.flags & map_flags::READONLY == 0;
        let host_addr = op.host_addr;
        if !host_addr.is_multiple_of(PAGE_SIZE) || !in_window(host_addr) {
            return Err(Status::BadVirtAddr);
        }
        if let Some(s) = self.doms.get(&mapper) {
            if s.by_addr.contains_key(&host_addr) {
                return Err(Status::BadVirtAddr);
            }
            if s.live() >= MAX_MAPS_PER_DOMAIN {
                return Err(Status::NoDeviceSpace);
            }
        }
        let granter = op.dom;
        if granter == mapper || granter == DOMID_SELF || !env.domain_exists(granter) {
            return Err(Status::BadDomain);
        }
        let mut asked = Perms::GRANT_MAP_READ;
        if writable {
            asked = asked | Perms::GRANT_MAP_WRITE;
        }
        check(env, policy, mapper, granter, asked)?;

        let held = self.acquire(env, mapper, granter, op.gref, writable)?;
        if !env.map_page(mapper, host_addr, held.phys, writable) {
            self.release(env, held, true);
            return Err(Status::General);
        }
        let device = op.flags & map_flags::DEVICE_MAP != 0 && env.has_devices(mapper);
        if device
            && !env.strict_dma(mapper)
            && !env.iommu_map(mapper, host_addr, held.phys, writable)
        {
            env.unmap_page(mapper, host_addr);
            self.release(env, held, true);
            return Err(Status::NoDeviceSpace);
        }
        let handle = self.doms.entry(mapper).or_default().insert(Mapping {
            granter,
            gref: op.gref,
            host_addr,
            writable,
            device,
            phys: held.phys,
        });
        Ok((handle, if device { host_addr } else { 0 }))
    }

    /// `grant_unmap`: each operation of `ops` by `mapper`, its status
    /// written back.
    pub fn unmap(&mut self, env: &mut impl GrantEnv, mapper: DomId, ops: &mut [UnmapOp]) {
        for op in ops {
            op.status = match self.unmap_one(env, mapper, op) {
                Ok(()) => Status::Okay,
                Err(s) => s,
            } as i16;
        }
    }

    /// One unmap: when it returns, neither the mapper's TLBs nor its
    /// devices' IOTLB hold the page, and the granter's entry has lost its
    /// READING/WRITING if this was the last use.
    pub fn unmap_one(
        &mut self,
        env: &mut impl GrantEnv,
        mapper: DomId,
        op: &UnmapOp,
    ) -> Result<(), Status> {
        let m = self
            .mapping(mapper, op.handle)
            .filter(|m| m.host_addr == op.host_addr)
            .ok_or(Status::BadHandle)?;
        let dev_addr = if m.device { m.host_addr } else { 0 };
        if op.dev_bus_addr != 0 && op.dev_bus_addr != dev_addr {
            return Err(Status::BadDevAddr);
        }
        self.teardown(env, mapper, op.handle, true);
        Ok(())
    }

    /// Removes mapping `handle` of `mapper`: page tables (TLB flushed),
    /// IOMMU (IOTLB invalidated), then the pin, touching the granter's
    /// table only if `touch_table`.
    fn teardown(
        &mut self,
        env: &mut impl GrantEnv,
        mapper: DomId,
        handle: u32,
        touch_table: bool,
    ) -> Option<Teardown> {
        let mapping = self.doms.get_mut(&mapper)?.remove(handle)?;
        env.unmap_page(mapper, mapping.host_addr);
        if mapping.device {
            env.iommu_unmap(mapper, mapping.host_addr);
        }
        self.release(
            env,
            Held {
                granter: mapping.granter,
                gref: mapping.gref,
                write: mapping.writable,
                phys: mapping.phys,
                transient: None,
            },
            touch_table,
        );
        Some(Teardown {
            mapper,
            handle,
            mapping,
        })
    }

    /// `grant_copy`: each operation of `ops` by `caller`, its status
    /// written back.
    pub fn copy(
        &mut self,
        env: &mut impl GrantEnv,
        policy: &mut Policy,
        caller: DomId,
        ops: &mut [CopyOp],
    ) {
        // The policy cannot change within one call: a granter it allowed
        // once stays allowed for the rest of the batch.
        let mut allowed = None;
        for op in ops {
            op.status = match self.copy_op(env, policy, caller, op, &mut allowed) {
                Ok(()) => Status::Okay,
                Err(s) => s,
            } as i16;
        }
    }

    /// One copy.
    pub fn copy_one(
        &mut self,
        env: &mut impl GrantEnv,
        policy: &mut Policy,
        caller: DomId,
        op: &CopyOp,
    ) -> Result<(), Status> {
        self.copy_op(env, policy, caller, op, &mut None)
    }

    /// One copy; `allowed` is a granter the policy allowed `grant:copy`
    /// earlier in the same call (asked again for any other).
    fn copy_op(
        &mut self,
        env: &mut impl GrantEnv,
        policy: &mut Policy,
        caller: DomId,
        op: &CopyOp,
        allowed: &mut Option<DomId>,
    ) -> Result<(), Status> {
        if op.flags & !(copy_flags::SRC_GREF | copy_flags::DST_GREF) != 0 {
            return Err(Status::BadCopyArg);
        }
        let len = u64::from(op.len);
        if u64::from(op.src.offset) + len > PAGE_SIZE || u64::from(op.dst.offset) + len > PAGE_SIZE
        {
            return Err(Status::BadCopyArg);
        }
        let src_gref = op.flags & copy_flags::SRC_GREF != 0;
        let dst_gref = op.flags & copy_flags::DST_GREF != 0;
        let (src, src_held) =
            self.copy_side(env, policy, caller, &op.src, src_gref, false, allowed)?;
        let (dst, dst_held) =
            match self.copy_side(env, policy, caller, &op.dst, dst_gref, true, allowed) {
                Ok(d) => d,
                Err(s) => {
                    if let Some(h) = src_held {
                        self.release(env, h, true);
                    }
                    return Err(s);
                }
            };
        if len > 0 {
            env.copy(
                src + u64::from(op.src.offset),
                dst + u64::from(op.dst.offset),
                usize::from(op.len),
            );
        }
        if let Some(h) = src_held {
            self.release(env, h, true);
        }
        if let Some(h) = dst_held {
            self.release(env, h, true);
        }
        Ok(())
    }

    /// One side of a copy: the page, and the grant held while copying.
    #[allow(clippy::too_many_arguments)]
    fn copy_side(
        &mut self,
        env: &mut impl GrantEnv,
        policy: &mut Policy,
        caller: DomId,
        ptr: &CopyPtr,
        is_gref: bool,
        write: bool,
        allowed: &mut Option<DomId>,
    ) -> Result<(u64, Option<Held>), Status> {
        if !is_gref {
            if ptr.domid != DOMID_SELF && ptr.domid != caller {
                return Err(Status::PermissionDenied);
            }
            let vpn = ptr.gref_or_page;
            let own = vpn
                .checked_mul(PAGE_SIZE)
                .filter(|&va| !in_window(va))
                .and_then(|_| env.translate(caller, vpn, write))
                .ok_or(Status::BadPage)?;
            return Ok((own, None));
        }
        let granter = ptr.domid;
        if granter == caller || granter == DOMID_SELF || !env.domain_exists(granter) {
            return Err(Status::BadDomain);
        }
        if *allowed != Some(granter) {
            check(env, policy, caller, granter, Perms::GRANT_COPY)?;
            *allowed = Some(granter);
        }
        let gref = u32::try_from(ptr.gref_or_page).map_err(|_| Status::BadGntref)?;
        let held = if self.pins.contains_key(&(granter, gref)) {
            self.acquire(env, caller, granter, gref, write)?
        } else {
            self.acquire_transient(env, caller, granter, gref, write)?
        };
        Ok((held.phys, Some(held)))
    }

    /// Where `granter`'s entry `gref` is (`BadGntref`: no table, or past
    /// it).
    fn entry_phys(&self, granter: DomId, gref: u32) -> Result<u64, Status> {
        let s = self.doms.get(&granter).ok_or(Status::BadGntref)?;
        let per_page = ENTRIES_PER_PAGE as u64;
        let page = s
            .table_phys
            .get(usize::try_from(u64::from(gref) / per_page).map_err(|_| Status::BadGntref)?)
            .ok_or(Status::BadGntref)?;
        Ok(page + (u64::from(gref) % per_page) * ENTRY_SIZE as u64)
    }

    /// Checks `granter`'s entry at `entry_phys` for a use by `user`
    /// (writing, when `write`) and sets READING (and WRITING) in it with a
    /// CAS of the word checked.
    fn pin_entry(
        env: &mut impl GrantEnv,
        entry_phys: u64,
        user: DomId,
        write: bool,
    ) -> Result<(), Status> {
        for _ in 0..PIN_RETRIES {
            let raw = env.entry_load(entry_phys);
            let e = Entry::decode(raw);
            if e.flags & flags::TYPE_MASK != flags::PERMIT_ACCESS || e.domid != user {
                return Err(Status::BadGntref);
            }
            if write && e.flags & flags::READONLY != 0 {
                return Err(Status::PermissionDenied);
            }
            let bits = flags::READING | if write { flags::WRITING } else { 0 };
            let old = raw as u32;
            if env.entry_cas(entry_phys, old, old | u32::from(bits)) {
                return Ok(());
            }
        }
        Err(Status::General)
    }

    /// [`GrantTables::acquire`] for a copy of an entry nothing else uses
    /// (no pin): the same checks and bits, and the page found for this
    /// access alone, with no pin recorded; [`GrantTables::release`] clears
    /// the bits again.
    fn acquire_transient(
        &mut self,
        env: &mut impl GrantEnv,
        user: DomId,
        granter: DomId,
        gref: u32,
        write: bool,
    ) -> Result<Held, Status> {
        let entry_phys = self.entry_phys(granter, gref)?;
        Self::pin_entry(env, entry_phys, user, write)?;
        let frame = u64::from(Entry::decode(env.entry_load(entry_phys)).frame);
        let page = if in_window(frame << PAGE_SHIFT) {
            None
        } else {
            env.translate(granter, frame, write)
        };
        let Some(phys) = page else {
            env.entry_clear_flags(entry_phys, flags::READING | flags::WRITING);
            return Err(Status::BadPage);
        };
        Ok(Held {
            granter,
            gref,
            write,
            phys,
            transient: Some(entry_phys),
        })
    }

    /// Pins `granter`'s entry `gref` for a use by `user` (writing, when
    /// `write`): checks the entry, sets READING (and WRITING) in it with a
    /// CAS, and finds the page. Undone by [`GrantTables::release`].
    fn acquire(
        &mut self,
        env: &mut impl GrantEnv,
        user: DomId,
        granter: DomId,
        gref: u32,
        write: bool,
    ) -> Result<Held, Status> {
        let entry_phys = self.entry_phys(granter, gref)?;
        Self::pin_entry(env, entry_phys, user, write)?;

        let key = (granter, gref);
        let pin = match self.pins.get(&key) {
            Some(p) => *p,
            None => {
                let frame = u64::from(Entry::decode(env.entry_load(entry_phys)).frame);
                let page = if in_window(frame << PAGE_SHIFT) {
                    None
                } else {
                    env.translate(granter, frame, true)
                        .map(|p| (p, true))
                        .or_else(|| env.translate(granter, frame, false).map(|p| (p, false)))
                };
                match page {
                    Some((page_phys, page_writable)) => Pin {
                        readers: 0,
                        writers: 0,
                        entry_phys,
                        page_phys,
                        page_writable,
                    },
                    None => {
                        env.entry_clear_flags(entry_phys, flags::READING | flags::WRITING);
                        return Err(Status::BadPage);
                    }
                }
            }
        };
        if write && !pin.page_writable {
            let unheld = if pin.readers == 0 {
                flags::READING | flags::WRITING
            } else if pin.writers == 0 {
                flags::WRITING
            } else {
                0
            };
            if unheld != 0 {
                env.entry_clear_flags(entry_phys, unheld);
            }
            return Err(Status::BadPage);
        }
        self.pins.insert(
            key,
            Pin {
                readers: pin.readers + 1,
                writers: pin.writers + u32::from(write),
                ..pin
            },
        );
        Ok(Held {
            granter,
            gref,
            write,
            phys: pin.page_phys,
            transient: None,
        })
    }

    /// Ends one use of a pinned entry; clears WRITING after the last
    /// writer and READING after the last use, in the granter's table if
    /// `touch_table` (not when the granter is dying).
    fn release(&mut self, env: &mut impl GrantEnv, held: Held, touch_table: bool) {
        if let Some(entry_phys) = held.transient {
            // Nothing else held it: as the last use of a pin.
            env.entry_clear_flags(entry_phys, flags::READING | flags::WRITING);
            return;
        }
        let key = (held.granter, held.gref);
        let Some(pin) = self.pins.get_mut(&key) else {
            return;
        };
        pin.readers = pin.readers.saturating_sub(1);
        if held.write {
            pin.writers = pin.writers.saturating_sub(1);
        }
        let (readers, writers, entry_phys) = (pin.readers, pin.writers, pin.entry_phys);
        let clear = if readers == 0 {
            self.pins.remove(&key);
            flags::READING | flags::WRITING
        } else if held.write && writers == 0 {
            flags::WRITING
        } else {
            0
        };
        let granter_dead = self.dead.contains(&held.granter);
        if clear != 0 && touch_table && !granter_dead {
            env.entry_clear_flags(entry_phys, clear);
        }
        if granter_dead && !self.maps_phys(held.phys) {
            env.release_frame(held.phys);
        }
    }

    /// Whether any live mapping holds physical page `phys`.
    fn maps_phys(&self, phys: u64) -> bool {
        self.doms.values().any(|s| {
            s.by_addr
                .values()
                .any(|&h| s.get(h).is_some_and(|m| m.phys == phys))
        })
    }

    /// The frames of (dead) granter `d` that mappings still hold: the
    /// kernel must not free them with the rest of `d`'s memory.
    pub fn frames_held(&self, d: DomId) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .doms
            .values()
            .flat_map(|s| {
                s.by_addr
                    .values()
                    .filter_map(move |&h| s.get(h))
                    .filter(|m| m.granter == d)
                    .map(|m| m.phys)
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Domain `d` is dying. Every mapping it holds goes (the granters'
    /// entries lose READING/WRITING). Mappings *of* its grants by others
    /// stay, as in Xen: a mapper keeps the page until it unmaps it, so a
    /// dying frontend cannot pull memory from under its backend's feet or
    /// its device's DMA; `d`'s table is never written again, and
    /// [`GrantTables::frames_held`] names the frames the kernel must keep
    /// until their last mapping goes ([`GrantEnv::release_frame`]). Call it
    /// before `d`'s memory or page tables are freed. Returns what it
    /// removed.
    pub fn domain_died(&mut self, env: &mut impl GrantEnv, d: DomId) -> Vec<Teardown> {
        let mut done = Vec::new();
        let its_own: Vec<u32> = self
            .doms
            .get(&d)
            .map(|s| s.by_addr.values().copied().collect())
            .unwrap_or_default();
        for h in its_own {
            done.extend(self.teardown(env, d, h, true));
        }
        self.doms.remove(&d);
        if self.frames_held(d).is_empty() {
            let stale: Vec<(DomId, u32)> = self.pins_of(d).map(|(k, _)| *k).collect();
            for k in stale {
                self.pins.remove(&k);
            }
        } else {
            self.dead.insert(d);
        }
        done
    }

    /// After a policy change: removes every mapping the policy no longer
    /// allows (`grant:map_read`, and `map_write` for a writable one), as
    /// an unmap would. Returns what it removed.
    pub fn revoke_disallowed(
        &mut self,
        env: &mut impl GrantEnv,
        policy: &mut Policy,
    ) -> Vec<Teardown> {
        let mut gone = Vec::new();
        for (&m, s) in &self.doms {
            for &h in s.by_addr.values() {
                let Some(x) = s.get(h) else { continue };
                let mut asked = Perms::GRANT_MAP_READ;
                if x.writable {
                    asked = asked | Perms::GRANT_MAP_WRITE;
                }
                let alive = env.domain_exists(m) && env.domain_exists(x.granter);
                if !alive || !policy.check(env.label(m), env.label(x.granter), asked) {
                    gone.push((m, h));
                }
            }
        }
        gone.into_iter()
            .filter_map(|(m, h)| self.teardown(env, m, h, true))
            .collect()
    }
}

/// Asks the policy whether `subject` may do each permission of `asked` to
/// `object`; the first refused one is reported to the kernel.
fn check(
    env: &mut impl GrantEnv,
    policy: &mut Policy,
    subject: DomId,
    object: DomId,
    asked: Perms,
) -> Result<(), Status> {
    let allowed = policy.allowed(env.label(subject), env.label(object));
    match Perms::NAMED
        .iter()
        .map(|(p, _)| *p)
        .find(|&p| asked.contains(p) && !allowed.contains(p))
    {
        Some(p) => {
            env.denied(subject, object, p);
            Err(Status::PermissionDenied)
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Rule;
    use std::string::String;
    use std::vec;
    use std::vec::Vec;

    /// The granter (a guest).
    const G: DomId = 1;
    /// The mapper (the blk driver domain, with devices).
    const M: DomId = 2;
    /// Another guest.
    const O: DomId = 3;
    /// A backend without devices.
    const N: DomId = 4;
    /// No such domain.
    const NONE: DomId = 9;

    const TABLE_VPN: u64 = 0x500;
    const DATA_VPN: u64 = 0x600;
    const RO_VPN: u64 = 0x700;
    const W: u64 = GRANT_WINDOW;
    const PA: u16 = flags::PERMIT_ACCESS;
    const RW: u32 = map_flags::HOST_MAP;
    const RO: u32 = map_flags::HOST_MAP | map_flags::READONLY;
    const DEV: u32 = map_flags::HOST_MAP | map_flags::DEVICE_MAP;

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Ev {
        Release(u64),
        Map(DomId, u64, u64, bool),
        Unmap(DomId, u64),
        IoMap(DomId, u64, u64, bool),
        IoUnmap(DomId, u64),
        Clear(u64, u16),
        Copy(u64, u64, usize),
        Denied(DomId, DomId, Perms),
    }

    struct FakeDom {
        label: String,
        devices: bool,
        pages: BTreeMap<u64, (u64, bool)>,
    }

    #[derive(Default)]
    struct Fake {
        doms: BTreeMap<DomId, FakeDom>,
        mem: BTreeMap<u64, Vec<u8>>,
        next_phys: u64,
        host: BTreeMap<(DomId, u64), (u64, bool)>,
        io: BTreeMap<(DomId, u64), (u64, bool)>,
        log: Vec<Ev>,
        cas_failures: usize,
        /// Written (phys, raw entry) just before the next CAS compares:
        /// the granter racing the hypervisor.
        race: Option<(u64, u64)>,
        fail_map: bool,
        fail_iommu: bool,
        /// Domains whose DMA is strict.
        strict: Vec<DomId>,
    }

    impl Fake {
        fn add(&mut self, d: DomId, label: &str, devices: bool) {
            self.doms.insert(
                d,
                FakeDom {
                    label: String::from(label),
                    devices,
                    pages: BTreeMap::new(),
                },
            );
        }

        /// Gives `d` a fresh page at `vpn`; its physical address.
        fn page(&mut self, d: DomId, vpn: u64, writable: bool) -> u64 {
            self.next_phys += PAGE_SIZE;
            let phys = 0x1000_0000 + self.next_phys;
            self.mem.insert(phys, vec![0; PAGE_SIZE as usize]);
            self.doms
                .get_mut(&d)
                .unwrap()
                .pages
                .insert(vpn, (phys, writable));
            phys
        }

        fn bytes(&mut self, phys: u64, len: usize) -> &mut [u8] {
            let page = self.mem.get_mut(&(phys & !(PAGE_SIZE - 1))).unwrap();
            let o = (phys % PAGE_SIZE) as usize;
            &mut page[o..o + len]
        }

        fn phys_of(&self, d: DomId, vpn: u64) -> u64 {
            self.doms[&d].pages[&vpn].0
        }

        fn entry_phys(&self, d: DomId, gref: u32) -> u64 {
            self.phys_of(d, TABLE_VPN) + u64::from(gref) * ENTRY_SIZE as u64
        }

        /// `d` grants: domid and frame, then flags.
        fn grant(&mut self, d: DomId, gref: u32, to: DomId, frame: u64, f: u16) {
            let e = Entry {
                flags: f,
                domid: to,
                frame: frame as u32,
            };
            let p = self.entry_phys(d, gref);
            self.bytes(p, 8).copy_from_slice(&e.encode().to_le_bytes());
        }

        fn entry(&self, d: DomId, gref: u32) -> Entry {
            Entry::decode(self.entry_load(self.entry_phys(d, gref)))
        }

        /// The granter's revoke (Xen's `gnttab_end_foreign_access_ref`).
        fn revoke(&mut self, d: DomId, gref: u32) -> bool {
            let p = self.entry_phys(d, gref);
            let raw = self.entry_load(p) as u32;
            let f = raw as u16;
            if f & (flags::READING | flags::WRITING) != 0 {
                return false;
            }
            self.entry_cas(p, raw, raw & 0xffff_0000)
        }

        fn denials(&self) -> Vec<Ev> {
            self.log
                .iter()
                .filter(|e| matches!(e, Ev::Denied(..)))
                .cloned()
                .collect()
        }

        fn clears(&self) -> usize {
            self.log
                .iter()
                .filter(|e| matches!(e, Ev::Clear(..)))
                .count()
        }
    }

    impl GrantEnv for Fake {
        fn domain_exists(&self, d: DomId) -> bool {
            self.doms.contains_key(&d)
        }
        fn label(&self, d: DomId) -> &str {
            &self.doms[&d].label
        }
        fn has_devices(&self, d: DomId) -> bool {
            self.doms[&d].devices
        }
        fn strict_dma(&self, d: DomId) -> bool {
            self.strict.contains(&d)
        }
        fn translate(&self, d: DomId, vpn: u64, write: bool) -> Option<u64> {
            let (phys, w) = *self.doms.get(&d)?.pages.get(&vpn)?;
            (w || !write).then_some(phys)
        }
        fn entry_load(&self, phys: u64) -> u64 {
            assert_eq!(phys % 8, 0);
            let page = &self.mem[&(phys & !(PAGE_SIZE - 1))];
            let o = (phys % PAGE_SIZE) as usize;
            u64::from_le_bytes(page[o..o + 8].try_into().unwrap())
        }
        fn entry_cas(&mut self, phys: u64, old: u32, new: u32) -> bool {
            if self.cas_failures > 0 {
                self.cas_failures -= 1;
                return false;
            }
            if let Some((p, raw)) = self.race.take() {
                self.bytes(p, 8).copy_from_slice(&raw.to_le_bytes());
            }
            let b = self.bytes(phys, 4);
            if u32::from_le_bytes((&*b).try_into().unwrap()) != old {
                return false;
            }
            b.copy_from_slice(&new.to_le_bytes());
            true
        }
        fn entry_clear_flags(&mut self, phys: u64, bits: u16) {
            self.log.push(Ev::Clear(phys, bits));
            let b = self.bytes(phys, 2);
            let f = u16::from_le_bytes([b[0], b[1]]) & !bits;
            b.copy_from_slice(&f.to_le_bytes());
        }
        fn map_page(&mut self, d: DomId, va: u64, phys: u64, writable: bool) -> bool {
            if self.fail_map {
                return false;
            }
            assert!(self.host.insert((d, va), (phys, writable)).is_none());
            self.log.push(Ev::Map(d, va, phys, writable));
            true
        }
        fn unmap_page(&mut self, d: DomId, va: u64) {
            assert!(self.host.remove(&(d, va)).is_some());
            self.log.push(Ev::Unmap(d, va));
        }
        fn iommu_map(&mut self, d: DomId, iova: u64, phys: u64, writable: bool) -> bool {
            assert!(self.doms[&d].devices);
            if self.fail_iommu {
                return false;
            }
            assert!(self.io.insert((d, iova), (phys, writable)).is_none());
            self.log.push(Ev::IoMap(d, iova, phys, writable));
            true
        }
        fn iommu_unmap(&mut self, d: DomId, iova: u64) {
            // Only a strict domain's device grant may be absent (not mapped by dma_batch).
            assert!(self.io.remove(&(d, iova)).is_some() || self.strict.contains(&d));
            self.log.push(Ev::IoUnmap(d, iova));
        }
        fn copy(&mut self, src: u64, dst: u64, len: usize) {
            assert!(src % PAGE_SIZE + len as u64 <= PAGE_SIZE);
            assert!(dst % PAGE_SIZE + len as u64 <= PAGE_SIZE);
            let data: Vec<u8> = self.bytes(src, len).to_vec();
            self.bytes(dst, len).copy_from_slice(&data);
            self.log.push(Ev::Copy(src, dst, len));
        }
        fn denied(&mut self, subject: DomId, object: DomId, perm: Perms) {
            self.log.push(Ev::Denied(subject, object, perm));
        }
        fn release_frame(&mut self, phys: u64) {
            self.log.push(Ev::Release(phys));
        }
    }

    fn policy() -> Policy {
        let rwc = Perms::GRANT_MAP_READ | Perms::GRANT_MAP_WRITE | Perms::GRANT_COPY;
        Policy::new(vec![
            Rule::new("blk_driver", "guest_a", rwc),
            Rule::new("blk_driver", "guest_b", Perms::GRANT_MAP_READ),
            Rule::new("blk_nodev", "guest_a", rwc),
        ])
    }

    /// G with a one-page table and 16 data pages, one read-only page; M
    /// (devices), O and N with 16 own pages each; G's grefs 0..16 are
    /// granted read-write to M, frame DATA_VPN + gref.
    fn setup() -> (Fake, GrantTables, Policy) {
        let mut f = Fake::default();
        f.add(G, "guest_a", false);
        f.add(M, "blk_driver", true);
        f.add(O, "guest_b", false);
        f.add(N, "blk_nodev", false);
        for d in [G, M, O, N] {
            f.page(d, TABLE_VPN, true);
            for i in 0..16 {
                f.page(d, DATA_VPN + i, true);
            }
            f.page(d, RO_VPN, false);
        }
        let mut gt = GrantTables::new();
        gt.set_table(&f, G, TABLE_VPN << 12, 1).unwrap();
        for r in 0..16 {
            f.grant(G, r, M, DATA_VPN + u64::from(r), PA);
        }
        (f, gt, policy())
    }

    fn mop(host_addr: u64, flags: u32, gref: u32, dom: DomId) -> MapOp {
        MapOp {
            host_addr,
            flags,
            gref,
            dom,
            ..MapOp::default()
        }
    }

    fn uop(host_addr: u64, handle: u32) -> UnmapOp {
        UnmapOp {
            host_addr,
            handle,
            ..UnmapOp::default()
        }
    }

    fn gref_ptr(dom: DomId, gref: u64, offset: u16) -> CopyPtr {
        CopyPtr {
            gref_or_page: gref,
            domid: dom,
            offset,
        }
    }

    fn own_ptr(vpn: u64, offset: u16) -> CopyPtr {
        gref_ptr(DOMID_SELF, vpn, offset)
    }

    fn map(
        f: &mut Fake,
        gt: &mut GrantTables,
        p: &mut Policy,
        d: DomId,
        op: MapOp,
    ) -> Result<(u32, u64), Status> {
        gt.map_one(f, p, d, &op)
    }

    fn flags_of(f: &Fake, gref: u32) -> u16 {
        f.entry(G, gref).flags
    }

    #[test]
    fn set_table_checks() {
        let (f, mut gt, _) = setup();
        let va = TABLE_VPN << 12;
        assert_eq!(gt.set_table(&f, O, va, 0), Err(Error::BadLength));
        assert_eq!(
            gt.set_table(&f, O, va, MAX_TABLE_PAGES + 1),
            Err(Error::BadLength)
        );
        assert_eq!(gt.set_table(&f, O, va + 8, 1), Err(Error::BadAddress));
        // Reaches an unmapped page, a read-only page, the grant window.
        assert_eq!(gt.set_table(&f, O, va, 2), Err(Error::BadAddress));
        assert_eq!(gt.set_table(&f, O, RO_VPN << 12, 1), Err(Error::BadAddress));
        assert_eq!(gt.set_table(&f, O, W, 1), Err(Error::BadAddress));
        assert_eq!(gt.set_table(&f, NONE, va, 1), Err(Error::BadAddress));
        assert_eq!(gt.table(O), None);
        gt.set_table(&f, O, DATA_VPN << 12, 4).unwrap();
        let t = gt.table(O).unwrap();
        assert_eq!((t.va, t.pages, t.entries()), (DATA_VPN << 12, 4, 2048));
        // Again, elsewhere.
        gt.set_table(&f, O, va, 1).unwrap();
        assert_eq!(gt.table(O).unwrap().entries(), 512);
    }

    #[test]
    fn table_cannot_move_while_its_grants_are_mapped() {
        let (mut f, mut gt, mut p) = setup();
        let (h, _) = map(&mut f, &mut gt, &mut p, M, mop(W, RW, 0, G)).unwrap();
        let va = TABLE_VPN << 12;
        assert_eq!(gt.set_table(&f, G, DATA_VPN << 12, 1), Err(Error::Denied));
        // The mapper's own table is its business.
        gt.set_table(&f, M, va, 1).unwrap();
        gt.unmap_one(&mut f, M, &uop(W, h)).unwrap();
        gt.set_table(&f, G, va, 1).unwrap();
    }

    #[test]
    fn map_sets_reading_and_writing_and_unmap_clears_them() {
        let (mut f, mut gt, mut p) = setup();
        let (h, dev) = map(&mut f, &mut gt, &mut p, M, mop(W, RW, 3, G)).unwrap();
        assert_eq!(dev, 0);
        let phys = f.phys_of(G, DATA_VPN + 3);
        assert_eq!(f.host[&(M, W)], (phys, true));
        assert!(f.io.is_empty());
        assert_eq!(flags_of(&f, 3), PA | flags::READING | flags::WRITING);
        assert_eq!(gt.pin_counts(G, 3), (1, 1));
        assert_eq!(
            gt.mapping(M, h),
            Some(Mapping {
                granter: G,
                gref: 3,
                host_addr: W,
                writable: true,
                device: false,
                phys,
            })
        );
        assert_eq!(gt.mapping_count(M), 1);
        // The mapper writes through its mapping; the granter sees it.
        f.bytes(f.host[&(M, W)].0, 4).copy_from_slice(b"blk!");
        assert_eq!(f.bytes(phys, 4), b"blk!");
        gt.unmap_one(&mut f, M, &uop(W, h)).unwrap();
        assert!(f.host.is_empty());
        assert_eq!(flags_of(&f, 3), PA);
        assert_eq!(gt.pin_counts(G, 3), (0, 0));
        assert_eq!(gt.mapping(M, h), None);
        assert_eq!(gt.mapping_count(M), 0);
        assert!(f.denials().is_empty());
    }

    #[test]
    fn readonly_map_sets_reading_only() {
        let (mut f, mut gt, mut p) = setup();
        let (h, _) = map(&mut f, &mut gt, &mut p, M, mop(W, RO, 2, G)).unwrap();
        assert!(!f.host[&(M, W)].1);
        assert_eq!(flags_of(&f, 2), PA | flags::READING);
        assert_eq!(gt.pin_counts(G, 2), (1, 0));
        gt.unmap_one(&mut f, M, &uop(W, h)).unwrap();
        assert_eq!(flags_of(&f, 2), PA);
    }

    #[test]
    fn map_flags_must_be_host_map_and_known() {
        let (mut f, mut gt, mut p) = setup();
        for fl in [
            0,
            map_flags::DEVICE_MAP,
            map_flags::READONLY,
            RW | 8,
            RW | 1 << 31,
        ] {
            assert_eq!(
                map(&mut f, &mut gt, &mut p, M, mop(W, fl, 0, G)),
                Err(Status::General),
                "{fl:#x}"
            );
        }
        assert!(f.log.is_empty());
    }

    #[test]
    fn host_addr_must_be_a_free_window_page() {
        let (mut f, mut gt, mut p) = setup();
        for a in [
            W + 8,
            W - PAGE_SIZE,
            0,
            DATA_VPN << 12,
            W + GRANT_WINDOW_SIZE,
            !0xfff,
        ] {
            assert_eq!(
                map(&mut f, &mut gt, &mut p, M, mop(a, RW, 0, G)),
                Err(Status::BadVirtAddr),
                "{a:#x}"
            );
        }
        let last = W + GRANT_WINDOW_SIZE - PAGE_SIZE;
        map(&mut f, &mut gt, &mut p, M, mop(last, RW, 0, G)).unwrap();
        // Already used by this mapper, even for another grant.
        assert_eq!(
            map(&mut f, &mut gt, &mut p, M, mop(last, RO, 1, G)),
            Err(Status::BadVirtAddr)
        );
        // Another mapper may use the same address.
        f.grant(G, 1, N, DATA_VPN + 1, PA);
        map(&mut f, &mut gt, &mut p, N, mop(last, RW, 1, G)).unwrap();
    }

    #[test]
    fn map_needs_another_live_domain() {
        let (mut f, mut gt, mut p) = setup();
        gt.set_table(&f, M, TABLE_VPN << 12, 1).unwrap();
        f.grant(M, 0, M, DATA_VPN, PA);
        for dom in [M, DOMID_SELF, NONE] {
            assert_eq!(
                map(&mut f, &mut gt, &mut p, M, mop(W, RW, 0, dom)),
                Err(Status::BadDomain),
                "{dom}"
            );
        }
        assert!(f.denials().is_empty());
    }

    #[test]
    fn policy_denials_are_permission_denied_and_reported() {
        let (mut f, mut gt, mut p) = setup();
        gt.set_table(&f, O, TABLE_VPN << 12, 1).unwrap();
        f.grant(O, 0, M, DATA_VPN, PA);
        // blk_driver may map guest_b's grants read-only only.
        assert_eq!(
            map(&mut f, &mut gt, &mut p, M, mop(W, RW, 0, O)),
            Err(Status::PermissionDenied)
        );
        assert_eq!(f.denials(), vec![Ev::Denied(M, O, Perms::GRANT_MAP_WRITE)]);
        assert_eq!(f.entry(O, 0).flags, PA);
        map(&mut f, &mut gt, &mut p, M, mop(W, RO, 0, O)).unwrap();
        // guest_b may not map guest_a's grants at all, even granted to it.
        f.grant(G, 5, O, DATA_VPN + 5, PA);
        assert_eq!(
            map(&mut f, &mut gt, &mut p, O, mop(W, RO, 5, G)),
            Err(Status::PermissionDenied)
        );
        assert_eq!(f.denials()[1..], [Ev::Denied(O, G, Perms::GRANT_MAP_READ)]);
        assert_eq!(flags_of(&f, 5), PA);
        // The policy is asked before the grant reference is looked at.
        assert_eq!(
            map(&mut f, &mut gt, &mut p, O, mop(W, RO, 100_000, G)),
            Err(Status::PermissionDenied)
        );
        assert_eq!(f.denials().len(), 3);
        assert!(!f.host.contains_key(&(O, W)));
    }

    #[test]
    fn grant_refs_must_name_a_grant_to_the_mapper() {
        let (mut f, mut gt, mut p) = setup();
        // No table.
        gt.set_table(&f, O, TABLE_VPN << 12, 1).unwrap();
        gt.domain_died(&mut f, O);
        let mut no_table = policy();
        no_table.set_rules(vec![Rule::new("blk_driver", "guest_b", Perms::ALL)]);
        assert_eq!(
            map(&mut f, &mut gt, &mut no_table, M, mop(W, RW, 0, O)),
            Err(Status::BadGntref)
        );
        // Past the table.
        for r in [512, u32::MAX] {
            assert_eq!(
                map(&mut f, &mut gt, &mut p, M, mop(W, RW, r, G)),
                Err(Status::BadGntref)
            );
        }
        // Never granted, a transfer, a transitive grant, granted to another.
        f.grant(G, 4, M, DATA_VPN + 4, flags::ACCEPT_TRANSFER);
        f.grant(G, 5, M, DATA_VPN + 5, flags::TRANSITIVE);
        f.grant(G, 6, O, DATA_VPN + 6, PA);
        for r in [20, 4, 5, 6] {
            assert_eq!(
                map(&mut f, &mut gt, &mut p, M, mop(W, RO, r, G)),
                Err(Status::BadGntref),
                "{r}"
            );
        }
        assert_eq!(f.entry(G, 6).flags, PA);
        assert!(f.host.is_empty());
        assert!(f.denials().is_empty());
    }

    #[test]
    fn readonly_grant_mapped_writable_is_permission_denied() {
        let (mut f, mut gt, mut p) = setup();
        f.grant(G, 7, M, DATA_VPN + 7, PA | flags::READONLY);
        assert_eq!(
            map(&mut f, &mut gt, &mut p, M, mop(W, RW, 7, G)),
            Err(Status::PermissionDenied)
        );
        assert!(f.denials().is_empty());
        assert_eq!(flags_of(&f, 7), PA | flags::READONLY);
        let (h, _) = map(&mut f, &mut gt, &mut p, M, mop(W, RO, 7, G)).unwrap();
        assert_eq!(flags_of(&f, 7), PA | flags::READONLY | flags::READING);
        // Mapped read-only already: still no writable mapping.
        assert_eq!(
            map(&mut f, &mut gt, &mut p, M, mop(W + PAGE_SIZE, RW, 7, G)),
            Err(Status::PermissionDenied)
        );
        gt.unmap_one(&mut f, M, &uop(W, h)).unwrap();
        assert_eq!(flags_of(&f, 7), PA | flags::READONLY);
    }

    #[test]
    fn frame_must_be_the_granters_own_page() {
        let (mut f, mut gt, mut p) = setup();
        // Not mapped, in the grant window, past any address.
        f.grant(G, 8, M, 0x9999, PA);
        f.grant(G, 9, M, W >> 12, PA);
        f.grant(G, 10, M, u64::from(u32::MAX), PA);
        for r in [8, 9, 10] {
            assert_eq!(
                map(&mut f, &mut gt, &mut p, M, mop(W, RO, r, G)),
                Err(Status::BadPage),
                "{r}"
            );
            assert_eq!(flags_of(&f, r), PA);
        }
        // A page the granter has read-only: readable, never writable.
        f.grant(G, 11, M, RO_VPN, PA);
        assert_eq!(
            map(&mut f, &mut gt, &mut p, M, mop(W, RW, 11, G)),
            Err(Status::BadPage)
        );
        assert_eq!(flags_of(&f, 11), PA);
        let (h, _) = map(&mut f, &mut gt, &mut p, M, mop(W, RO, 11, G)).unwrap();
        assert_eq!(f.host[&(M, W)], (f.phys_of(G, RO_VPN), false));
        // Pinned read-only: a writable use fails and leaves READING held.
        assert_eq!(
            map(&mut f, &mut gt, &mut p, M, mop(W + PAGE_SIZE, RW, 11, G)),
            Err(Status::BadPage)
        );
        assert_eq!(flags_of(&f, 11), PA | flags::READING);
        assert_eq!(gt.pin_counts(G, 11), (1, 0));
        gt.unmap_one(&mut f, M, &uop(W, h)).unwrap();
        assert_eq!(flags_of(&f, 11), PA);
    }

    #[test]
    fn revoke_fails_while_mapped() {
        let (mut f, mut gt, mut p) = setup();
        let (h1, _) = map(&mut f, &mut gt, &mut p, M, mop(W, RW, 0, G)).unwrap();
        assert!(!f.revoke(G, 0));
        let (h2, _) = map(&mut f, &mut gt, &mut p, M, mop(W + PAGE_SIZE, RO, 0, G)).unwrap();
        assert_eq!(gt.pin_counts(G, 0), (2, 1));
        // One page, mapped twice.
        assert_eq!(f.host[&(M, W)].0, f.host[&(M, W + PAGE_SIZE)].0);
        gt.unmap_one(&mut f, M, &uop(W, h1)).unwrap();
        assert_eq!(flags_of(&f, 0), PA | flags::READING);
        assert!(!f.revoke(G, 0));
        gt.unmap_one(&mut f, M, &uop(W + PAGE_SIZE, h2)).unwrap();
        assert_eq!(flags_of(&f, 0), PA);
        assert!(f.revoke(G, 0));
        assert_eq!(flags_of(&f, 0), 0);
        assert_eq!(
            map(&mut f, &mut gt, &mut p, M, mop(W, RW, 0, G)),
            Err(Status::BadGntref)
        );
    }

    #[test]
    fn granter_rewriting_the_entry_while_pinned_is_harmless() {
        let (mut f, mut gt, mut p) = setup();
        let (h, _) = map(&mut f, &mut gt, &mut p, M, mop(W, RW, 0, G)).unwrap();
        let page = f.phys_of(G, DATA_VPN);
        // The granter writes the frame under the pin; later uses get the
        // pinned page, as in Xen.
        let mut e = f.entry(G, 0);
        e.frame = (DATA_VPN + 9) as u32;
        let ep = f.entry_phys(G, 0);
        f.bytes(ep, 8).copy_from_slice(&e.encode().to_le_bytes());
        let (h2, _) = map(&mut f, &mut gt, &mut p, M, mop(W + PAGE_SIZE, RW, 0, G)).unwrap();
        assert_eq!(f.host[&(M, W + PAGE_SIZE)].0, page);
        gt.unmap_one(&mut f, M, &uop(W + PAGE_SIZE, h2)).unwrap();
        // It clears the hypervisor's bits by hand and revokes: the mapping
        // stays until it is unmapped, then the bookkeeping is clean.
        f.entry_clear_flags(ep, flags::READING | flags::WRITING);
        assert!(f.revoke(G, 0));
        assert_eq!(f.host[&(M, W)].0, page);
        gt.unmap_one(&mut f, M, &uop(W, h)).unwrap();
        assert_eq!(gt.pin_counts(G, 0), (0, 0));
        assert_eq!(flags_of(&f, 0), 0);
    }

    #[test]
    fn unmap_checks_handle_and_addresses() {
        let (mut f, mut gt, mut p) = setup();
        let (h, dev) = map(&mut f, &mut gt, &mut p, M, mop(W, DEV, 0, G)).unwrap();
        assert_eq!(dev, W);
        let bad = [
            uop(W, h + 1),
            uop(W, NO_HANDLE),
            uop(W + PAGE_SIZE, h),
            uop(0, h),
        ];
        for op in bad {
            assert_eq!(
                gt.unmap_one(&mut f, M, &op),
                Err(Status::BadHandle),
                "{op:?}"
            );
        }
        // Someone else's handle.
        assert_eq!(gt.unmap_one(&mut f, N, &uop(W, h)), Err(Status::BadHandle));
        let wrong_dev = UnmapOp {
            dev_bus_addr: W + PAGE_SIZE,
            ..uop(W, h)
        };
        assert_eq!(gt.unmap_one(&mut f, M, &wrong_dev), Err(Status::BadDevAddr));
        assert_eq!(gt.mapping_count(M), 1);
        let right_dev = UnmapOp {
            dev_bus_addr: W,
            ..uop(W, h)
        };
        gt.unmap_one(&mut f, M, &right_dev).unwrap();
        assert_eq!(gt.unmap_one(&mut f, M, &uop(W, h)), Err(Status::BadHandle));
        // A host-only mapping has no device address.
        let (h, _) = map(&mut f, &mut gt, &mut p, M, mop(W, RW, 0, G)).unwrap();
        let dev_of_host_only = UnmapOp {
            dev_bus_addr: W,
            ..uop(W, h)
        };
        assert_eq!(
            gt.unmap_one(&mut f, M, &dev_of_host_only),
            Err(Status::BadDevAddr)
        );
    }

    #[test]
    fn unmap_invalidates_before_the_flags_clear() {
        let (mut f, mut gt, mut p) = setup();
        let (h, _) = map(&mut f, &mut gt, &mut p, M, mop(W, DEV, 1, G)).unwrap();
        f.log.clear();
        gt.unmap_one(&mut f, M, &uop(W, h)).unwrap();
        assert_eq!(
            f.log,
            vec![
                Ev::Unmap(M, W),
                Ev::IoUnmap(M, W),
                Ev::Clear(f.entry_phys(G, 1), flags::READING | flags::WRITING),
            ]
        );
        assert!(f.io.is_empty() && f.host.is_empty());
    }

    #[test]
    fn device_map_only_for_domains_with_devices() {
        let (mut f, mut gt, mut p) = setup();
        let phys = f.phys_of(G, DATA_VPN + 2);
        let (_, dev) = map(&mut f, &mut gt, &mut p, M, mop(W, DEV, 2, G)).unwrap();
        assert_eq!(dev, W);
        assert_eq!(f.io[&(M, W)], (phys, true));
        let ro = DEV | map_flags::READONLY;
        let (h, dev) = map(&mut f, &mut gt, &mut p, M, mop(W + PAGE_SIZE, ro, 2, G)).unwrap();
        assert_eq!(dev, W + PAGE_SIZE);
        assert_eq!(f.io[&(M, W + PAGE_SIZE)], (phys, false));
        assert!(gt.mapping(M, h).unwrap().device);
        // N has no devices: host mapping only, device address 0.
        f.grant(G, 2, N, DATA_VPN + 2, PA);
        let (h, dev) = map(&mut f, &mut gt, &mut p, N, mop(W, DEV, 2, G)).unwrap();
        assert_eq!(dev, 0);
        assert!(!gt.mapping(N, h).unwrap().device);
        assert!(f.io.keys().all(|&(d, _)| d == M));
        assert_eq!(f.host[&(N, W)], (phys, true));
        gt.unmap_one(&mut f, N, &uop(W, h)).unwrap();
    }

    #[test]
    fn strict_device_maps_reach_the_iommu_only_through_dma_batch() {
        let (mut f, mut gt, mut p) = setup();
        f.strict.push(M);
        let phys = f.phys_of(G, DATA_VPN + 2);
        let (h, dev) = map(&mut f, &mut gt, &mut p, M, mop(W, DEV, 2, G)).unwrap();
        // The device address it will have, but nothing in the IOMMU yet.
        assert_eq!(dev, W);
        assert!(f.io.is_empty());
        let m = gt.device_mapping_at(M, W).unwrap();
        assert_eq!((m.phys, m.writable, m.host_addr), (phys, true, W));
        assert_eq!(gt.device_mapping_at(M, W + PAGE_SIZE), None);
        assert_eq!(gt.device_mapping_at(N, W), None);
        let rw = device_frame::PRESENT | device_frame::WRITABLE;
        let frames = gt.device_frames(M, W);
        assert_eq!(frames.len(), 512, "to the end of the 2 MiB block");
        assert_eq!(frames[..2], [phys | rw, 0]);
        assert_eq!(gt.device_frames(M, W - PAGE_SIZE), [], "outside the window");
        assert_eq!(gt.device_frames(M, W + 1), [], "unaligned");
        assert_eq!(gt.device_frames(N, W), [], "another mapper's");
        assert_eq!(gt.device_frames(M, W + 511 * PAGE_SIZE), [0]);
        assert_eq!(
            gt.device_frames(M, W + 512 * PAGE_SIZE),
            [],
            "no block there"
        );
        // A host-only mapping is not for the device.
        let (h2, _) = map(&mut f, &mut gt, &mut p, M, mop(W + PAGE_SIZE, RW, 0, G)).unwrap();
        assert_eq!(gt.device_mapping_at(M, W + PAGE_SIZE), None);
        assert_eq!(gt.device_frames(M, W)[..2], [phys | rw, 0]);
        gt.unmap_one(&mut f, M, &uop(W + PAGE_SIZE, h2)).unwrap();
        // A read-only one, in the next block: its own block, without WRITABLE.
        let far = W + 512 * PAGE_SIZE;
        let ro = DEV | map_flags::READONLY;
        let (h3, _) = map(&mut f, &mut gt, &mut p, M, mop(far, ro, 2, G)).unwrap();
        assert_eq!(gt.device_frames(M, far)[0], phys | device_frame::PRESENT);
        // The IOMMU reads the same index, and maps a page writable only when its entry
        // says WRITABLE.
        {
            use iommu::{FrameSource, Perm};
            let index = gt.device_index(M);
            assert_eq!(FrameSource::frames(&index, far), gt.device_frames(M, far));
            assert_eq!(index.required(Perm::READ), device_frame::PRESENT);
            assert_eq!(index.required(Perm::READ_WRITE), rw);
        }
        gt.unmap_one(&mut f, M, &uop(far, h3)).unwrap();
        assert_eq!(gt.device_frames(M, far), [], "an empty block is freed");
        // dma_batch mapped it; unmapping the grant takes it out of the IOMMU too, before
        // the granter's flags clear.
        f.io.insert((M, W), (phys, true));
        f.log.clear();
        gt.unmap_one(&mut f, M, &uop(W, h)).unwrap();
        assert_eq!(
            f.log,
            vec![
                Ev::Unmap(M, W),
                Ev::IoUnmap(M, W),
                Ev::Clear(f.entry_phys(G, 2), flags::READING | flags::WRITING),
            ]
        );
        assert!(f.io.is_empty());
        assert_eq!(gt.device_mapping_at(M, W), None);
        assert_eq!(gt.device_frames(M, W), []);
        // Not mapped by dma_batch at the time: the unmap still asks (and finds nothing).
        let (h, _) = map(&mut f, &mut gt, &mut p, M, mop(W, DEV, 2, G)).unwrap();
        gt.unmap_one(&mut f, M, &uop(W, h)).unwrap();
        assert!(f.io.is_empty() && f.host.is_empty());
    }

    #[test]
    fn failed_mappings_are_rolled_back() {
        let (mut f, mut gt, mut p) = setup();
        f.fail_iommu = true;
        assert_eq!(
            map(&mut f, &mut gt, &mut p, M, mop(W, DEV, 0, G)),
            Err(Status::NoDeviceSpace)
        );
        assert!(f.host.is_empty());
        assert_eq!(flags_of(&f, 0), PA);
        assert_eq!(gt.pin_counts(G, 0), (0, 0));
        // The address is free again.
        f.fail_iommu = false;
        f.fail_map = true;
        assert_eq!(
            map(&mut f, &mut gt, &mut p, M, mop(W, DEV, 0, G)),
            Err(Status::General)
        );
        assert_eq!(flags_of(&f, 0), PA);
        assert!(f.io.is_empty());
        f.fail_map = false;
        let (h, _) = map(&mut f, &mut gt, &mut p, M, mop(W, DEV, 0, G)).unwrap();
        // A failure beside a live pin keeps its bits.
        f.fail_map = true;
        assert_eq!(
            map(&mut f, &mut gt, &mut p, M, mop(W + PAGE_SIZE, RO, 0, G)),
            Err(Status::General)
        );
        assert_eq!(flags_of(&f, 0), PA | flags::READING | flags::WRITING);
        assert_eq!(gt.pin_counts(G, 0), (1, 1));
        assert_eq!(h, 0);
    }

    #[test]
    fn mappings_per_domain_are_bounded() {
        let (mut f, mut gt, mut p) = setup();
        let mut handles = Vec::new();
        for i in 0..MAX_MAPS_PER_DOMAIN as u64 {
            let a = W + i * PAGE_SIZE;
            let (h, _) = map(&mut f, &mut gt, &mut p, M, mop(a, RO, (i % 16) as u32, G)).unwrap();
            assert_eq!(u64::from(h), i);
            handles.push((a, h));
        }
        let next = W + MAX_MAPS_PER_DOMAIN as u64 * PAGE_SIZE;
        assert_eq!(
            map(&mut f, &mut gt, &mut p, M, mop(next, RO, 0, G)),
            Err(Status::NoDeviceSpace)
        );
        assert_eq!(gt.pin_counts(G, 0), (MAX_MAPS_PER_DOMAIN as u32 / 16, 0));
        for (a, h) in handles {
            gt.unmap_one(&mut f, M, &uop(a, h)).unwrap();
        }
        assert!((0..16).all(|r| flags_of(&f, r) == PA));
        map(&mut f, &mut gt, &mut p, M, mop(next, RO, 0, G)).unwrap();
    }

    #[test]
    fn persistent_map_unmap_cycles() {
        let (mut f, mut gt, mut p) = setup();
        for cycle in 0..1000u64 {
            let mut live = Vec::new();
            for r in 0..8u32 {
                let a = W + (u64::from(r) + cycle % 3 * 8) * PAGE_SIZE;
                let fl = if (cycle + u64::from(r)) % 2 == 0 {
                    RW
                } else {
                    DEV | map_flags::READONLY
                };
                let (h, _) = map(&mut f, &mut gt, &mut p, M, mop(a, fl, r, G)).unwrap();
                assert!(h < 8, "handles are reused");
                live.push((a, h));
            }
            for (a, h) in live.into_iter().rev() {
                gt.unmap_one(&mut f, M, &uop(a, h)).unwrap();
            }
            assert!((0..8).all(|r| flags_of(&f, r) == PA));
        }
        assert!(f.host.is_empty() && f.io.is_empty());
        assert_eq!(gt.mapping_count(M), 0);
        assert!(gt.pins.is_empty());
        assert!(f.revoke(G, 0));
    }

    #[test]
    fn pin_retries_a_changing_entry() {
        let (mut f, mut gt, mut p) = setup();
        f.cas_failures = PIN_RETRIES - 1;
        let (h, _) = map(&mut f, &mut gt, &mut p, M, mop(W, RW, 0, G)).unwrap();
        gt.unmap_one(&mut f, M, &uop(W, h)).unwrap();
        f.cas_failures = PIN_RETRIES;
        assert_eq!(
            map(&mut f, &mut gt, &mut p, M, mop(W, RW, 0, G)),
            Err(Status::General)
        );
        assert_eq!(flags_of(&f, 0), PA);
        assert!(f.host.is_empty());
        // The granter revokes and regrants the entry to O, same flags,
        // between the hypervisor's load and its CAS: the CAS covers domid,
        // so it fails and the retry sees a grant to someone else.
        let ep = f.entry_phys(G, 2);
        let to_o = Entry {
            flags: PA,
            domid: O,
            frame: (DATA_VPN + 2) as u32,
        };
        f.race = Some((ep, to_o.encode()));
        assert_eq!(
            map(&mut f, &mut gt, &mut p, M, mop(W, RW, 2, G)),
            Err(Status::BadGntref)
        );
        assert_eq!(f.entry(G, 2), to_o);
        assert!(f.host.is_empty());
        // Only the frame changes before the CAS: the page is the one the
        // entry names once pinned.
        let ep = f.entry_phys(G, 3);
        let moved = Entry {
            flags: PA,
            domid: M,
            frame: (DATA_VPN + 12) as u32,
        };
        f.race = Some((ep, moved.encode()));
        let (h, _) = map(&mut f, &mut gt, &mut p, M, mop(W, RW, 3, G)).unwrap();
        assert_eq!(f.host[&(M, W)].0, f.phys_of(G, DATA_VPN + 12));
        gt.unmap_one(&mut f, M, &uop(W, h)).unwrap();
        // A revoked entry is no grant.
        let mut gt2 = GrantTables::new();
        gt2.set_table(&f, G, TABLE_VPN << 12, 1).unwrap();
        assert!(f.revoke(G, 1));
        assert_eq!(
            map(&mut f, &mut gt2, &mut p, M, mop(W, RW, 1, G)),
            Err(Status::BadGntref)
        );
    }

    fn cop(src: CopyPtr, dst: CopyPtr, len: u16, flags: u16) -> CopyOp {
        CopyOp {
            src,
            dst,
            len,
            flags,
            status: 0,
        }
    }

    #[test]
    fn copy_both_ways() {
        let (mut f, mut gt, mut p) = setup();
        let g3 = f.phys_of(G, DATA_VPN + 3);
        f.bytes(g3 + 100, 5).copy_from_slice(b"hello");
        // From G's grant 3 into M's own page.
        let op = cop(
            gref_ptr(G, 3, 100),
            own_ptr(DATA_VPN, 4000),
            5,
            copy_flags::SRC_GREF,
        );
        gt.copy_one(&mut f, &mut p, M, &op).unwrap();
        let m0 = f.phys_of(M, DATA_VPN);
        assert_eq!(f.bytes(m0 + 4000, 5), b"hello");
        // From M's own page (named by its own id) into G's grant 4.
        let src = gref_ptr(M, DATA_VPN, 4000);
        let op = cop(src, gref_ptr(G, 4, 0), 5, copy_flags::DST_GREF);
        gt.copy_one(&mut f, &mut p, M, &op).unwrap();
        assert_eq!(f.bytes(f.phys_of(G, DATA_VPN + 4), 5), b"hello");
        // Grant to grant, a whole page.
        let op = cop(
            gref_ptr(G, 3, 0),
            gref_ptr(G, 5, 0),
            4096,
            copy_flags::SRC_GREF | copy_flags::DST_GREF,
        );
        gt.copy_one(&mut f, &mut p, M, &op).unwrap();
        assert_eq!(f.bytes(f.phys_of(G, DATA_VPN + 5) + 100, 5), b"hello");
        // Nothing stays pinned, and nobody was denied.
        assert!((0..16).all(|r| flags_of(&f, r) == PA));
        assert!(gt.pins.is_empty());
        assert!(f.denials().is_empty());
        // The pins were held during the copy: set, copy, clear.
        let n = f.log.len();
        assert!(matches!(f.log[n - 3], Ev::Copy(..)));
        assert!(matches!(f.log[n - 2..], [Ev::Clear(..), Ev::Clear(..)]));
        // len 0 checks and copies nothing.
        let op = cop(
            gref_ptr(G, 3, 4096),
            own_ptr(DATA_VPN, 4096),
            0,
            copy_flags::SRC_GREF,
        );
        gt.copy_one(&mut f, &mut p, M, &op).unwrap();
        assert!(!matches!(f.log.last(), Some(Ev::Copy(..))));
    }

    #[test]
    fn a_copy_batch_asks_the_policy_once_per_granter() {
        let (mut f, mut gt, mut p) = setup();
        let asked = |p: &Policy| p.stats().hits + p.stats().misses;
        let before = asked(&p);
        let mut ops: Vec<CopyOp> = (0..3)
            .map(|r| {
                cop(
                    gref_ptr(G, r, 0),
                    own_ptr(DATA_VPN, 8 * r as u16),
                    8,
                    copy_flags::SRC_GREF,
                )
            })
            .collect();
        gt.copy(&mut f, &mut p, M, &mut ops);
        assert!(ops.iter().all(|o| o.status == 0));
        assert_eq!(asked(&p) - before, 1);
        assert!(gt.pins.is_empty() && (0..3).all(|r| flags_of(&f, r) == PA));
        // a refusal is not remembered: each operation is refused and
        // reported
        let mut ops: Vec<CopyOp> = (0..2)
            .map(|_| {
                cop(
                    gref_ptr(G, 1, 0),
                    own_ptr(DATA_VPN, 0),
                    8,
                    copy_flags::SRC_GREF,
                )
            })
            .collect();
        gt.copy(&mut f, &mut p, O, &mut ops);
        let denied = Status::PermissionDenied as i16;
        assert!(ops.iter().all(|o| o.status == denied), "{ops:?}");
        assert_eq!(f.denials().len(), 2);
    }

    #[test]
    fn copy_while_mapped_keeps_the_mapping_pin() {
        let (mut f, mut gt, mut p) = setup();
        map(&mut f, &mut gt, &mut p, M, mop(W, RO, 3, G)).unwrap();
        let op = cop(
            own_ptr(DATA_VPN, 0),
            gref_ptr(G, 3, 0),
            8,
            copy_flags::DST_GREF,
        );
        gt.copy_one(&mut f, &mut p, M, &op).unwrap();
        assert_eq!(flags_of(&f, 3), PA | flags::READING);
        assert_eq!(gt.pin_counts(G, 3), (1, 0));
    }

    #[test]
    fn copy_statuses() {
        let (mut f, mut gt, mut p) = setup();
        gt.set_table(&f, O, TABLE_VPN << 12, 1).unwrap();
        f.grant(O, 0, M, DATA_VPN, PA);
        f.grant(G, 7, M, DATA_VPN + 7, PA | flags::READONLY);
        f.grant(G, 8, O, DATA_VPN + 8, PA);
        let s = copy_flags::SRC_GREF;
        let d = copy_flags::DST_GREF;
        let own = own_ptr(DATA_VPN, 0);
        let cases = [
            // Bounds and flags.
            (cop(gref_ptr(G, 0, 4000), own, 97, s), Status::BadCopyArg),
            (cop(own, gref_ptr(G, 0, 1), 4096, d), Status::BadCopyArg),
            (cop(own, own_ptr(DATA_VPN + 1, 0), 8, 4), Status::BadCopyArg),
            (cop(gref_ptr(G, 0, 0), own, 8, s | 0x80), Status::BadCopyArg),
            // Domains.
            (cop(gref_ptr(M, 0, 0), own, 8, s), Status::BadDomain),
            (
                cop(gref_ptr(DOMID_SELF, 0, 0), own, 8, s),
                Status::BadDomain,
            ),
            (cop(own, gref_ptr(NONE, 0, 0), 8, d), Status::BadDomain),
            // Policy: blk_driver may not copy guest_b's grants.
            (cop(gref_ptr(O, 0, 0), own, 8, s), Status::PermissionDenied),
            // Someone else's page named as one's own.
            (
                cop(gref_ptr(G, DATA_VPN, 0), own, 8, 0),
                Status::PermissionDenied,
            ),
            (
                cop(own, gref_ptr(O, DATA_VPN, 0), 8, 0),
                Status::PermissionDenied,
            ),
            // The entry.
            (cop(gref_ptr(G, 512, 0), own, 8, s), Status::BadGntref),
            (cop(gref_ptr(G, 1 << 32, 0), own, 8, s), Status::BadGntref),
            (cop(gref_ptr(G, 8, 0), own, 8, s), Status::BadGntref),
            (cop(gref_ptr(G, 30, 0), own, 8, s), Status::BadGntref),
            (cop(own, gref_ptr(G, 7, 0), 8, d), Status::PermissionDenied),
            // Own pages.
            (cop(own_ptr(0x9999, 0), own, 8, 0), Status::BadPage),
            (cop(own_ptr(W >> 12, 0), own, 8, 0), Status::BadPage),
            (cop(own_ptr(u64::MAX, 0), own, 8, 0), Status::BadPage),
            (
                cop(gref_ptr(G, 0, 0), own_ptr(RO_VPN, 0), 8, s),
                Status::BadPage,
            ),
        ];
        for (op, want) in cases {
            assert_eq!(gt.copy_one(&mut f, &mut p, M, &op), Err(want), "{op:?}");
        }
        assert_eq!(f.denials(), vec![Ev::Denied(M, O, Perms::GRANT_COPY)]);
        assert!(!f.log.iter().any(|e| matches!(e, Ev::Copy(..))));
        // The read-only grant is a fine source; own page to own page too.
        let ok = [
            cop(gref_ptr(G, 7, 0), own, 8, s),
            cop(own_ptr(RO_VPN, 0), own, 8, 0),
        ];
        for op in ok {
            gt.copy_one(&mut f, &mut p, M, &op).unwrap();
        }
        // Whatever failed, no bit stays set.
        assert!(gt.pins.is_empty());
        assert!((0..16).all(|r| flags_of(&f, r) & (flags::READING | flags::WRITING) == 0));
    }

    #[test]
    fn copy_releases_its_source_when_the_destination_fails() {
        let (mut f, mut gt, mut p) = setup();
        let op = cop(
            gref_ptr(G, 0, 0),
            gref_ptr(G, 200, 0),
            8,
            copy_flags::SRC_GREF | copy_flags::DST_GREF,
        );
        assert_eq!(gt.copy_one(&mut f, &mut p, M, &op), Err(Status::BadGntref));
        assert_eq!(flags_of(&f, 0), PA);
        assert_eq!(f.clears(), 1);
        assert!(gt.pins.is_empty());
    }

    #[test]
    fn batches_get_a_status_each() {
        let (mut f, mut gt, mut p) = setup();
        let mut ops = [
            mop(W, RW, 0, G),
            mop(W, RW, 1, G),
            mop(W + PAGE_SIZE, DEV, 1, G),
            mop(W + 2 * PAGE_SIZE, RW, 0, NONE),
        ];
        gt.map(&mut f, &mut p, M, &mut ops);
        let st: Vec<i16> = ops.iter().map(|o| o.status).collect();
        assert_eq!(
            st,
            [0, Status::BadVirtAddr as i16, 0, Status::BadDomain as i16]
        );
        assert_eq!((ops[0].handle, ops[0].dev_bus_addr), (0, 0));
        assert_eq!((ops[1].handle, ops[1].dev_bus_addr), (NO_HANDLE, 0));
        assert_eq!((ops[2].handle, ops[2].dev_bus_addr), (1, W + PAGE_SIZE));
        assert_eq!(ops[3].handle, NO_HANDLE);
        let mut uops = [uop(W, 0), uop(W, 0), uop(W + PAGE_SIZE, 1)];
        gt.unmap(&mut f, M, &mut uops);
        let st: Vec<i16> = uops.iter().map(|o| o.status).collect();
        assert_eq!(st, [0, Status::BadHandle as i16, 0]);
        let own = own_ptr(DATA_VPN, 0);
        let mut cops = [
            cop(gref_ptr(G, 0, 0), own, 8, copy_flags::SRC_GREF),
            cop(gref_ptr(G, 0, 4095), own, 8, copy_flags::SRC_GREF),
        ];
        gt.copy(&mut f, &mut p, M, &mut cops);
        assert_eq!(cops[0].status, 0);
        assert_eq!(cops[1].status, Status::BadCopyArg as i16);
        assert!(f.host.is_empty() && f.io.is_empty() && gt.pins.is_empty());
    }

    #[test]
    fn granter_death_leaves_mappers_their_pages() {
        let (mut f, mut gt, mut p) = setup();
        f.grant(G, 1, N, DATA_VPN + 1, PA);
        let (hm, _) = map(&mut f, &mut gt, &mut p, M, mop(W, DEV, 0, G)).unwrap();
        let (hn, _) = map(&mut f, &mut gt, &mut p, N, mop(W, RO, 1, G)).unwrap();
        let phys_m = gt.mapping(M, hm).unwrap().phys;
        let phys_n = gt.mapping(N, hn).unwrap().phys;
        f.log.clear();
        let done = gt.domain_died(&mut f, G);
        // Nothing of the mappers' goes: their pages and devices keep the frames.
        assert!(done.is_empty());
        assert!(f.host.contains_key(&(M, W)) && f.host.contains_key(&(N, W)));
        assert!(f.io.contains_key(&(M, W)));
        assert_eq!(gt.table(G), None);
        let mut held = [phys_m, phys_n];
        held.sort_unstable();
        assert_eq!(gt.frames_held(G), held);
        // The dead granter cannot be mapped from again.
        f.doms.remove(&G);
        assert_eq!(
            map(&mut f, &mut gt, &mut p, M, mop(W + PAGE_SIZE, RO, 0, G)),
            Err(Status::BadDomain)
        );
        // Unmapping releases each frame once its last mapping goes, and never
        // writes the dead granter's table.
        f.log.clear();
        gt.unmap_one(&mut f, M, &uop(W, hm)).unwrap();
        assert!(f.log.contains(&Ev::IoUnmap(M, W)));
        assert!(f.log.contains(&Ev::Release(phys_m)));
        assert!(!f.log.contains(&Ev::Release(phys_n)));
        assert_eq!(f.clears(), 0);
        assert_eq!(gt.frames_held(G), [phys_n]);
        // The other mapper's death releases its frame too.
        gt.domain_died(&mut f, N);
        assert!(f.log.contains(&Ev::Release(phys_n)));
        assert!(gt.frames_held(G).is_empty());
    }

    #[test]
    fn mapper_death_releases_the_granters_entries() {
        let (mut f, mut gt, mut p) = setup();
        let (_, _) = map(&mut f, &mut gt, &mut p, M, mop(W, DEV, 0, G)).unwrap();
        let (_, _) = map(&mut f, &mut gt, &mut p, M, mop(W + PAGE_SIZE, RO, 1, G)).unwrap();
        f.grant(G, 2, N, DATA_VPN + 2, PA);
        map(&mut f, &mut gt, &mut p, N, mop(W, RW, 2, G)).unwrap();
        assert!(!f.revoke(G, 0));
        let done = gt.domain_died(&mut f, M);
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|t| t.mapper == M));
        assert_eq!(flags_of(&f, 0), PA);
        assert_eq!(flags_of(&f, 1), PA);
        assert!(f.revoke(G, 0) && f.revoke(G, 1));
        // N's mapping is untouched.
        assert_eq!(flags_of(&f, 2), PA | flags::READING | flags::WRITING);
        assert_eq!(f.host.keys().copied().collect::<Vec<_>>(), [(N, W)]);
        assert!(f.io.is_empty());
        assert_eq!(gt.mapping_count(M), 0);
        // Death of a domain with nothing is nothing.
        assert!(gt.domain_died(&mut f, O).is_empty());
        assert!(gt.domain_died(&mut f, NONE).is_empty());
    }

    #[test]
    fn policy_change_revokes_what_it_no_longer_allows() {
        let (mut f, mut gt, mut p) = setup();
        f.grant(G, 1, N, DATA_VPN + 1, PA);
        map(&mut f, &mut gt, &mut p, M, mop(W, DEV, 0, G)).unwrap();
        map(&mut f, &mut gt, &mut p, M, mop(W + PAGE_SIZE, RO, 2, G)).unwrap();
        map(&mut f, &mut gt, &mut p, N, mop(W, RW, 1, G)).unwrap();
        assert!(gt.revoke_disallowed(&mut f, &mut p).is_empty());
        // blk_driver keeps read access only; blk_nodev keeps everything.
        p.set_rules(vec![
            Rule::new("blk_driver", "guest_a", Perms::GRANT_MAP_READ),
            Rule::new("blk_nodev", "guest_a", Perms::ALL),
        ]);
        let gone = gt.revoke_disallowed(&mut f, &mut p);
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].mapper, gone[0].mapping.gref), (M, 0));
        assert!(f.io.is_empty());
        assert_eq!(flags_of(&f, 0), PA);
        assert_eq!(flags_of(&f, 2), PA | flags::READING);
        p.set_rules(Vec::new());
        assert_eq!(gt.revoke_disallowed(&mut f, &mut p).len(), 2);
        assert!(f.host.is_empty());
        assert!((0..16).all(|r| flags_of(&f, r) == PA));
    }
}
