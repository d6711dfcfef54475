//! Grant tables in the running system: the kernel's side of
//! `hypervisor::grant::GrantEnv` (page tables, the IOMMU, the direct map,
//! the console) and the four grant hypercalls, which copy their operation
//! arrays in once, hand them to `GrantTables`, and write the statuses back.

use crate::domain::Domain;
use crate::run::System;
use crate::{console, iommu_hw};
use abi::ev;
use abi::grant::{self, CopyOp, MapOp, UnmapOp, COPY_OP_SIZE, MAP_OP_SIZE, UNMAP_OP_SIZE};
use abi::hypercall::Error;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use hypervisor::grant::GrantEnv;
use hypervisor::layout::{DIRECT_MAP, PAGE_SIZE};
use hypervisor::policy::Perms;
use hypervisor::uaccess::Access;
use hypervisor::DomId;

/// The domains, as the grant logic sees them.
pub struct Env<'a> {
    pub domains: &'a mut [Domain],
}

impl Env<'_> {
    fn get(&self, d: DomId) -> Option<&Domain> {
        let i = usize::from(d).checked_sub(1)?;
        self.domains.get(i).filter(|dom| !dom.is_dead())
    }

    fn get_mut(&mut self, d: DomId) -> Option<&mut Domain> {
        let i = usize::from(d).checked_sub(1)?;
        self.domains.get_mut(i)
    }
}

/// The entry's bytes through the direct map. Every physical address the
/// grant logic passes lies in a granter's grant-table page, which is that
/// domain's own RAM and so direct-mapped.
fn entry_ptr(phys: u64) -> *mut u8 {
    (phys + DIRECT_MAP) as *mut u8
}

impl GrantEnv for Env<'_> {
    fn domain_exists(&self, d: DomId) -> bool {
        self.get(d).is_some()
    }

    fn label(&self, d: DomId) -> &str {
        self.get(d).map_or("", |dom| dom.label.as_str())
    }

    fn has_devices(&self, d: DomId) -> bool {
        self.get(d).is_some_and(|dom| !dom.devices.is_empty())
    }

    fn strict_dma(&self, d: DomId) -> bool {
        self.get(d)
            .is_some_and(|dom| dom.dma == abi::domain::DmaMode::Strict)
    }

    fn translate(&self, d: DomId, vpn: u64, write: bool) -> Option<u64> {
        self.get(d)?.translate(vpn, write)
    }

    fn entry_load(&self, phys: u64) -> u64 {
        // SAFETY: an 8-byte-aligned entry of a grant-table page (see
        // `entry_ptr`); the granter may write it from ring 3 at any time,
        // hence the atomic access.
        unsafe { AtomicU64::from_ptr(entry_ptr(phys).cast()) }.load(Ordering::SeqCst)
    }

    fn entry_cas(&mut self, phys: u64, old: u32, new: u32) -> bool {
        // SAFETY: as for `entry_load`; the first 4 bytes are flags and domid.
        let a = unsafe { AtomicU32::from_ptr(entry_ptr(phys).cast()) };
        a.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    fn entry_clear_flags(&mut self, phys: u64, bits: u16) {
        // SAFETY: as for `entry_load`; the first 2 bytes are the flags.
        unsafe { AtomicU16::from_ptr(entry_ptr(phys).cast()) }.fetch_and(!bits, Ordering::SeqCst);
    }

    fn map_page(&mut self, d: DomId, va: u64, phys: u64, writable: bool) -> bool {
        self.get_mut(d)
            .is_some_and(|dom| dom.map_grant_page(va, phys, writable))
    }

    fn unmap_page(&mut self, d: DomId, va: u64) {
        if let Some(dom) = self.get_mut(d) {
            dom.unmap_grant_page(va);
        }
    }

    fn iommu_map(&mut self, d: DomId, iova: u64, phys: u64, writable: bool) -> bool {
        iommu_hw::map(d, iova, phys, PAGE_SIZE, writable).is_ok()
    }

    fn iommu_unmap(&mut self, d: DomId, iova: u64) {
        iommu_hw::unmap(d, iova, PAGE_SIZE);
    }

    fn copy(&mut self, src: u64, dst: u64, len: usize) {
        // SAFETY: both ranges lie inside one page each of domains' own RAM
        // (checked by the grant logic), direct-mapped; `copy` allows overlap.
        unsafe { core::ptr::copy(entry_ptr(src), entry_ptr(dst), len) };
    }

    fn release_frame(&mut self, phys: u64) {
        crate::mm::free_frame(phys);
    }

    fn denied(&mut self, subject: DomId, object: DomId, perm: Perms) {
        let name = |d: DomId| self.get(d).map_or("?", |dom| dom.name.as_str());
        let label = |d: DomId| self.get(d).map_or("?", |dom| dom.label.as_str());
        console::event(&ev::GrantDenied {
            domain: name(subject),
            subject: label(subject),
            object: label(object),
            // The manifest's spelling, which `[[allow]]` rules use.
            perm: abi::manifest::perm::NAMES
                .iter()
                .find(|(bit, _)| *bit == perm.bits())
                .map_or("several", |(_, name)| name),
        });
    }
}

/// Counters in `Domain::grant_stats`.
pub const MAPS: usize = 0;
pub const UNMAPS: usize = 1;
pub const COPIES: usize = 2;
pub const COPIED_BYTES: usize = 3;
pub const FAILED: usize = 4;

/// Checks and copies in an array of `count` operations of `size` bytes.
fn ops_in(sys: &System, idx: usize, ptr: u64, count: u64, size: usize) -> Result<Vec<u8>, Error> {
    if count == 0 || count > grant::MAX_BATCH {
        return Err(Error::BadLength);
    }
    let len = count * size as u64;
    let regions = &sys.domains[idx].regions;
    regions.check(ptr, len, Access::Write)?;
    let mut buf = alloc::vec![0u8; len as usize];
    // SAFETY: the range lies wholly in pages the caller has mapped writable
    // (so readable) in the current address space; copied once.
    unsafe { core::ptr::copy_nonoverlapping(ptr as *const u8, buf.as_mut_ptr(), buf.len()) };
    Ok(buf)
}

/// Writes the operations back (their statuses and outputs).
fn ops_out(ptr: u64, buf: &[u8]) {
    // SAFETY: checked writable by `ops_in` for the same call; mappings of
    // the caller's own memory never shrink while it lives.
    unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), ptr as *mut u8, buf.len()) };
}

pub fn table_set(sys: &mut System, idx: usize, va: u64, pages: u64) -> Result<u64, Error> {
    let d = sys.domains[idx].domid;
    let System {
        domains, grants, ..
    } = sys;
    grants.set_table(&Env { domains }, d, va, pages).map(|()| 0)
}

/// Runs one batch: copies the `count` operations in, decodes them, lets
/// `run` carry them out, and writes them back with their statuses.
fn run_batch<T, const N: usize>(
    sys: &mut System,
    idx: usize,
    ptr: u64,
    count: u64,
    decode: fn(&[u8; N]) -> T,
    encode: fn(&T) -> [u8; N],
    run: impl FnOnce(&mut System, DomId, &mut [T]),
) -> Result<Vec<T>, Error> {
    let mut buf = ops_in(sys, idx, ptr, count, N)?;
    let mut ops: Vec<T> = buf
        .chunks_exact(N)
        .map(|c| decode(c.try_into().expect("exact chunks")))
        .collect();
    let d = sys.domains[idx].domid;
    run(sys, d, &mut ops);
    for (c, op) in buf.chunks_exact_mut(N).zip(&ops) {
        c.copy_from_slice(&encode(op));
    }
    ops_out(ptr, &buf);
    Ok(ops)
}

pub fn map(sys: &mut System, idx: usize, ptr: u64, count: u64) -> Result<u64, Error> {
    let ops = run_batch::<MapOp, MAP_OP_SIZE>(
        sys,
        idx,
        ptr,
        count,
        MapOp::decode,
        MapOp::encode,
        |sys, d, ops| {
            let System {
                domains,
                grants,
                policy,
                ..
            } = sys;
            grants.map(&mut Env { domains }, policy, d, ops);
        },
    )?;
    let failed = ops.iter().filter(|o| o.status != 0).count() as u64;
    let stats = &mut sys.domains[idx].grant_stats;
    stats[MAPS] += count - failed;
    stats[FAILED] += failed;
    Ok(count)
}

pub fn unmap(sys: &mut System, idx: usize, ptr: u64, count: u64) -> Result<u64, Error> {
    let ops = run_batch::<UnmapOp, UNMAP_OP_SIZE>(
        sys,
        idx,
        ptr,
        count,
        UnmapOp::decode,
        UnmapOp::encode,
        |sys, d, ops| {
            let System {
                domains, grants, ..
            } = sys;
            grants.unmap(&mut Env { domains }, d, ops);
        },
    )?;
    let failed = ops.iter().filter(|o| o.status != 0).count() as u64;
    let stats = &mut sys.domains[idx].grant_stats;
    stats[UNMAPS] += count - failed;
    stats[FAILED] += failed;
    Ok(count)
}

pub fn copy(sys: &mut System, idx: usize, ptr: u64, count: u64) -> Result<u64, Error> {
    let ops = run_batch::<CopyOp, COPY_OP_SIZE>(
        sys,
        idx,
        ptr,
        count,
        CopyOp::decode,
        CopyOp::encode,
        |sys, d, ops| {
            let System {
                domains,
                grants,
                policy,
                ..
            } = sys;
            grants.copy(&mut Env { domains }, policy, d, ops);
        },
    )?;
    let done = ops.iter().filter(|o| o.status == 0);
    let (copies, bytes) = done.fold((0u64, 0u64), |(n, b), o| (n + 1, b + u64::from(o.len)));
    let stats = &mut sys.domains[idx].grant_stats;
    stats[COPIES] += copies;
    stats[COPIED_BYTES] += bytes;
    stats[FAILED] += count - copies;
    Ok(count)
}

/// Tears down every grant mapping domain `i` holds or gave, before its
/// memory is freed; prints its grant statistics if it used grants.
pub fn domain_died(sys: &mut System, i: usize) {
    let d = sys.domains[i].domid;
    let System {
        domains, grants, ..
    } = sys;
    grants.domain_died(&mut Env { domains }, d);
    let dom = &sys.domains[i];
    let s = dom.grant_stats;
    if s.iter().any(|&n| n > 0) {
        console::event(&ev::GrantStats {
            domain: &dom.name,
            maps: s[MAPS],
            unmaps: s[UNMAPS],
            copies: s[COPIES],
            copied_bytes: s[COPIED_BYTES],
            failed: s[FAILED],
        });
    }
}
