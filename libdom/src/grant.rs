//! Grant tables, the granter's side, and the grant hypercalls.
//!
//! A domain's grant table is [`TABLE_PAGES`] pages of its own heap that it
//! names with `grant_table_set` the first time it grants anything (1024
//! entries: a blkfront's data pools and INDIRECT pages alone may take 544). An entry is Xen's v1 `{u16 flags; u16 domid; u32 frame}` with
//! `frame` the granted page's *virtual* page number in this domain
//! (`abi::grant`).
//!
//! ```text
//!  ref 0 .. MAX_VBDS          reserved: the ring of the domain's n-th vbd is ref n
//!  ref MAX_VBDS .. RESERVED_GREFS  reserved: the TX and RX rings of its vifs
//!                             (grant_at, with the ref its start info names)
//!  ref RESERVED_GREFS .. 1024 handed out by grant(), lowest free first
//! ```
//!
//! Granting writes `domid` and `frame`, then (after a barrier) `flags`;
//! revoking compares-and-swaps `flags` to 0 and fails while the hypervisor
//! has `READING` or `WRITING` set (the page is mapped): the caller keeps the
//! page until the grantee unmaps it. Entries are read and written as whole
//! 64-bit atomics, so the hypervisor never sees a torn entry.
//!
//! [`Table`] is the logic over any array of entries (host-tested);
//! [`grant`], [`grant_at`] and [`revoke`] use the domain's own table. [`map`],
//! [`unmap`] and [`copy`] carry arrays of `abi::grant` operations to the
//! hypervisor and bring each operation's status back.

use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU64, Ordering};

use abi::domain::RESERVED_GREFS;
use abi::grant::{
    flags, CopyOp, Entry, MapOp, UnmapOp, COPY_OP_SIZE, ENTRIES_PER_PAGE, MAP_OP_SIZE, MAX_BATCH,
    UNMAP_OP_SIZE,
};
use abi::hypercall::{decode, Call, Error};

use crate::hypercall::raw_hypercall;

/// Bytes of a page.
pub const PAGE: u64 = 4096;
/// Pages of the domain's table (at most `abi::grant::MAX_TABLE_PAGES`).
pub const TABLE_PAGES: usize = 2;
/// Entries in the domain's table.
pub const TABLE_ENTRIES: usize = TABLE_PAGES * ENTRIES_PER_PAGE;
const _: () = assert!(TABLE_PAGES as u64 <= abi::grant::MAX_TABLE_PAGES);
/// The first reference [`grant`] hands out; the ones below are the vbd
/// rings'.
pub const FIRST_FREE_REF: u32 = RESERVED_GREFS;

/// Why a grant could not be made or revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantError {
    /// The hypervisor refused `grant_table_set` (or a grant call).
    Hypercall(Error),
    /// Every reference of the table is in use.
    NoFreeRef,
    /// A reference outside the table.
    BadRef(u32),
    /// [`grant`] does not hand out the reserved ring references; `grant_at`
    /// with one below [`FIRST_FREE_REF`] is how a ring is granted.
    Reserved(u32),
    /// The reference is already granted.
    InUse(u32),
    /// The reference is not granted.
    NotGranted(u32),
    /// The grantee still has the page mapped: revoke again after it unmaps.
    Mapped(u32),
    /// The address is not page-aligned or not a user page number.
    BadAddress(u64),
}

impl core::fmt::Display for GrantError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            GrantError::Hypercall(e) => write!(f, "hypercall refused: {}", e.name()),
            GrantError::NoFreeRef => f.write_str("no free grant reference"),
            GrantError::BadRef(r) => write!(f, "grant reference {r} is outside the table"),
            GrantError::Reserved(r) => write!(f, "grant reference {r} is reserved for a vbd ring"),
            GrantError::InUse(r) => write!(f, "grant reference {r} is already granted"),
            GrantError::NotGranted(r) => write!(f, "grant reference {r} is not granted"),
            GrantError::Mapped(r) => write!(f, "grant reference {r} is still mapped"),
            GrantError::BadAddress(a) => write!(f, "{a:#x} is not a grantable page address"),
        }
    }
}

/// A grant table: `entries` as the hypervisor reads them, and which
/// references this domain has handed out (`used`, one bit each).
pub struct Table<'a> {
    entries: &'a [AtomicU64],
    used: &'a [AtomicU64],
}

impl<'a> Table<'a> {
    /// A table over `entries`, with `used` as its allocation bitmap (at
    /// least one bit per entry; all zero at the start).
    pub fn new(entries: &'a [AtomicU64], used: &'a [AtomicU64]) -> Self {
        assert!(used.len() * 64 >= entries.len());
        Table { entries, used }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry at `gref` as it is now.
    pub fn entry(&self, gref: u32) -> Option<Entry> {
        let e = self.entries.get(gref as usize)?;
        Some(Entry::decode(e.load(Ordering::Acquire)))
    }

    /// Marks `gref` used; false if it already was.
    fn claim(&self, gref: u32) -> bool {
        let (w, bit) = (gref as usize / 64, 1u64 << (gref % 64));
        self.used[w].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    fn release(&self, gref: u32) {
        let (w, bit) = (gref as usize / 64, 1u64 << (gref % 64));
        self.used[w].fetch_and(!bit, Ordering::AcqRel);
    }

    fn is_used(&self, gref: u32) -> bool {
        let (w, bit) = (gref as usize / 64, 1u64 << (gref % 64));
        self.used[w].load(Ordering::Acquire) & bit != 0
    }

    /// Grants the page at `va` to `domid` at the lowest free reference at
    /// or above [`FIRST_FREE_REF`].
    pub fn grant(&self, domid: u16, va: u64, readonly: bool) -> Result<u32, GrantError> {
        let frame = frame_of(va)?;
        let gref = self.lowest_free().ok_or(GrantError::NoFreeRef)?;
        self.write(gref, domid, frame, readonly);
        Ok(gref)
    }

    /// Claims the lowest free reference at or above [`FIRST_FREE_REF`],
    /// a bitmap word at a time (a blkfront grants hundreds of pages in a
    /// row: one reference at a time made that quadratic).
    fn lowest_free(&self) -> Option<u32> {
        let len = self.entries.len();
        let first = FIRST_FREE_REF as usize;
        for w in first / 64..len.div_ceil(64) {
            let mut word = self.used[w].load(Ordering::Acquire);
            // Refs below FIRST_FREE_REF (and past the table) count as used.
            if w == first / 64 {
                word |= (1u64 << (first % 64)) - 1;
            }
            while word != u64::MAX {
                let gref = w * 64 + word.trailing_ones() as usize;
                if gref >= len {
                    break;
                }
                if self.claim(gref as u32) {
                    return Some(gref as u32);
                }
                // Taken since the load: look again.
                word = self.used[w].load(Ordering::Acquire);
            }
        }
        None
    }

    /// Grants the page at `va` to `domid` at reference `gref` (a reserved
    /// ring reference, or any free one).
    pub fn grant_at(
        &self,
        gref: u32,
        domid: u16,
        va: u64,
        readonly: bool,
    ) -> Result<(), GrantError> {
        let frame = frame_of(va)?;
        if gref as usize >= self.entries.len() {
            return Err(GrantError::BadRef(gref));
        }
        if !self.claim(gref) {
            return Err(GrantError::InUse(gref));
        }
        self.write(gref, domid, frame, readonly);
        Ok(())
    }

    fn write(&self, gref: u32, domid: u16, frame: u32, readonly: bool) {
        let e = &self.entries[gref as usize];
        // domid and frame first, flags invalid...
        e.store(
            Entry {
                flags: flags::INVALID,
                domid,
                frame,
            }
            .encode(),
            Ordering::Release,
        );
        core::sync::atomic::fence(Ordering::SeqCst);
        // ...then the flags that make it valid.
        let f = flags::PERMIT_ACCESS | if readonly { flags::READONLY } else { 0 };
        e.store(
            Entry {
                flags: f,
                domid,
                frame,
            }
            .encode(),
            Ordering::Release,
        );
    }

    /// Revokes `gref`: the flags go to 0 unless the hypervisor has the page
    /// mapped ([`GrantError::Mapped`]; the reference stays granted).
    pub fn revoke(&self, gref: u32) -> Result<(), GrantError> {
        let e = self
            .entries
            .get(gref as usize)
            .ok_or(GrantError::BadRef(gref))?;
        if !self.is_used(gref) {
            return Err(GrantError::NotGranted(gref));
        }
        let mut cur = e.load(Ordering::Acquire);
        loop {
            let entry = Entry::decode(cur);
            if entry.flags & (flags::READING | flags::WRITING) != 0 {
                return Err(GrantError::Mapped(gref));
            }
            let revoked = Entry { flags: 0, ..entry };
            match e.compare_exchange(cur, revoked.encode(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                // The hypervisor changed the flags (a map began): look again.
                Err(now) => cur = now,
            }
        }
        self.release(gref);
        Ok(())
    }
}

/// The page number of a page-aligned user address.
fn frame_of(va: u64) -> Result<u32, GrantError> {
    if !va.is_multiple_of(PAGE) || va == 0 || va >= abi::domain::USER_TOP {
        return Err(GrantError::BadAddress(va));
    }
    u32::try_from(va / PAGE).map_err(|_| GrantError::BadAddress(va))
}

// ---- the domain's own table ----

#[cfg(target_os = "none")]
mod own {
    use core::sync::atomic::{AtomicU64, Ordering};

    use super::{GrantError, Table, PAGE, TABLE_ENTRIES, TABLE_PAGES};
    use crate::hypercall::raw_hypercall;
    use abi::hypercall::{decode, Call};

    /// The table page's address once `grant_table_set` took it; 0 before.
    static TABLE_VA: AtomicU64 = AtomicU64::new(0);
    static USED: [AtomicU64; TABLE_ENTRIES / 64] =
        [const { AtomicU64::new(0) }; TABLE_ENTRIES / 64];

    /// The domain's table, set up on first use.
    pub fn table() -> Result<Table<'static>, GrantError> {
        let mut va = TABLE_VA.load(Ordering::Acquire);
        if va == 0 {
            let bytes = TABLE_PAGES * PAGE as usize;
            let layout = core::alloc::Layout::from_size_align(bytes, PAGE as usize)
                .map_err(|_| GrantError::NoFreeRef)?;
            // SAFETY: the layout has a non-zero size.
            let page = unsafe { alloc::alloc::alloc_zeroed(layout) };
            if page.is_null() {
                return Err(GrantError::NoFreeRef);
            }
            // SAFETY: only numbers are passed; the hypervisor reads and
            // writes the page (ours, allocated above) from now on.
            let r = decode(unsafe {
                raw_hypercall(
                    Call::GrantTableSet as u64,
                    page as u64,
                    TABLE_PAGES as u64,
                    0,
                    0,
                    0,
                    0,
                )
            });
            if let Err(e) = r {
                // SAFETY: allocated above with this layout; nobody has it.
                unsafe { alloc::alloc::dealloc(page, layout) };
                return Err(GrantError::Hypercall(e));
            }
            // Domains are single-threaded: nobody raced us here.
            TABLE_VA.store(page as u64, Ordering::Release);
            va = page as u64;
        }
        // SAFETY: `va` is TABLE_PAGES pages of our heap that are never freed
        // (the grant table for the domain's life), page-aligned, zeroed at the
        // start; `AtomicU64` has `u64`'s size and alignment, and every
        // access to the page (ours here, the hypervisor's on map, unmap
        // and copy) is an atomic one, so shared references are sound.
        let entries = unsafe { core::slice::from_raw_parts(va as *const AtomicU64, TABLE_ENTRIES) };
        Ok(Table::new(entries, &USED))
    }
}

#[cfg(not(target_os = "none"))]
mod own {
    use super::{GrantError, Table};
    use abi::hypercall::Error;

    /// On the host there is no hypervisor to take a table.
    pub fn table() -> Result<Table<'static>, GrantError> {
        Err(GrantError::Hypercall(Error::UnknownCall))
    }
}

/// Grants our page at `va` (page-aligned) to `domid`, read-only or not;
/// the reference is at or above [`FIRST_FREE_REF`].
pub fn grant(domid: u16, va: u64, readonly: bool) -> Result<u32, GrantError> {
    own::table()?.grant(domid, va, readonly)
}

/// Grants our page at `va` to `domid` at reference `gref` (a vbd's
/// reserved ring reference).
pub fn grant_at(gref: u32, domid: u16, va: u64, readonly: bool) -> Result<(), GrantError> {
    own::table()?.grant_at(gref, domid, va, readonly)
}

/// Ends grant `gref`; [`GrantError::Mapped`] while the grantee has it
/// mapped.
pub fn revoke(gref: u32) -> Result<(), GrantError> {
    own::table()?.revoke(gref)
}

/// Our table's entry `gref`, as the hypervisor sees it.
pub fn entry(gref: u32) -> Option<Entry> {
    own::table().ok()?.entry(gref)
}

// ---- the map, unmap and copy hypercalls ----

/// Runs one batched grant call over `ops`, at most [`MAX_BATCH`] at a
/// time: each op encoded into a buffer, the buffer handed over, each
/// status decoded back into its op. Returns how many ops the hypervisor
/// processed (all of them unless it stopped early).
fn batch<T: Copy, const N: usize>(
    call: Call,
    ops: &mut [T],
    enc: impl Fn(&T) -> [u8; N],
    dec: impl Fn(&[u8; N]) -> T,
) -> Result<usize, Error> {
    let mut done = 0;
    for chunk in ops.chunks_mut(MAX_BATCH as usize) {
        // Not zeroed: only the first `chunk.len()` ops are written, handed
        // over and read back (zeroing the whole buffer cost more than
        // encoding a small batch).
        let mut buf = [const { MaybeUninit::<[u8; N]>::uninit() }; MAX_BATCH as usize];
        for (slot, op) in buf.iter_mut().zip(chunk.iter()) {
            slot.write(enc(op));
        }
        let used = &mut buf[..chunk.len()];
        // SAFETY: `used` is ours, writable, and holds `chunk.len()` ops of
        // N bytes, each written above, laid out back to back
        // (`MaybeUninit<[u8; N]>` is `[u8; N]`: size N, alignment 1), which
        // is what the hypervisor reads and writes back (each op's status).
        let n = decode(unsafe {
            raw_hypercall(
                call as u64,
                used.as_mut_ptr() as u64,
                chunk.len() as u64,
                0,
                0,
                0,
                0,
            )
        })? as usize;
        for (op, raw) in chunk.iter_mut().zip(used.iter()).take(n) {
            // SAFETY: written before the call (and only rewritten by the
            // hypervisor since, with bytes).
            *op = dec(unsafe { raw.assume_init_ref() });
        }
        done += n.min(chunk.len());
        if n < chunk.len() {
            break;
        }
    }
    Ok(done)
}

/// Maps grants (`grant_map`): each op's `status`, `handle` and
/// `dev_bus_addr` are filled in. Returns the ops processed.
pub fn map(ops: &mut [MapOp]) -> Result<usize, Error> {
    batch::<MapOp, MAP_OP_SIZE>(Call::GrantMap, ops, MapOp::encode, MapOp::decode)
}

/// Unmaps grants (`grant_unmap`); the TLB and IOTLB are clean when it
/// returns. Returns the ops processed.
pub fn unmap(ops: &mut [UnmapOp]) -> Result<usize, Error> {
    batch::<UnmapOp, UNMAP_OP_SIZE>(Call::GrantUnmap, ops, UnmapOp::encode, UnmapOp::decode)
}

/// Copies between granted pages and our own (`grant_copy`). Returns the
/// ops processed.
pub fn copy(ops: &mut [CopyOp]) -> Result<usize, Error> {
    batch::<CopyOp, COPY_OP_SIZE>(Call::GrantCopy, ops, CopyOp::encode, CopyOp::decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    fn table_of(n: usize) -> (Vec<AtomicU64>, Vec<AtomicU64>) {
        (
            (0..n).map(|_| AtomicU64::new(0)).collect(),
            (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        )
    }

    #[test]
    fn grants_skip_the_ring_refs_and_revoke() {
        let (e, u) = table_of(TABLE_ENTRIES);
        let t = Table::new(&e, &u);
        let r = t.grant(3, 0x50_0000, false).unwrap();
        assert_eq!(r, FIRST_FREE_REF);
        assert_eq!(
            t.entry(r),
            Some(Entry {
                flags: flags::PERMIT_ACCESS,
                domid: 3,
                frame: 0x500
            })
        );
        let r2 = t.grant(4, 0x50_1000, true).unwrap();
        assert_eq!(r2, FIRST_FREE_REF + 1);
        assert_eq!(
            t.entry(r2).unwrap().flags,
            flags::PERMIT_ACCESS | flags::READONLY
        );
        // The ring of vbd 0 at ref 0.
        t.grant_at(0, 2, 0x60_0000, false).unwrap();
        assert_eq!(t.entry(0).unwrap().frame, 0x600);
        assert_eq!(
            t.grant_at(0, 2, 0x60_0000, false),
            Err(GrantError::InUse(0))
        );
        assert_eq!(
            t.grant_at(TABLE_ENTRIES as u32, 2, 0x60_0000, false),
            Err(GrantError::BadRef(TABLE_ENTRIES as u32))
        );
        // Revoked refs come back, lowest first.
        t.revoke(r).unwrap();
        assert_eq!(t.entry(r).unwrap().flags, 0);
        assert_eq!(t.revoke(r), Err(GrantError::NotGranted(r)));
        assert_eq!(t.grant(5, 0x50_2000, false), Ok(r));
        t.revoke(0).unwrap();
        assert_eq!(t.revoke(9999), Err(GrantError::BadRef(9999)));
    }

    #[test]
    fn grants_fill_the_table_lowest_first_across_words() {
        let (e, u) = table_of(TABLE_ENTRIES);
        let t = Table::new(&e, &u);
        let free = TABLE_ENTRIES - FIRST_FREE_REF as usize;
        for i in 0..free {
            let va = 0x10_0000 + (i as u64) * PAGE;
            assert_eq!(t.grant(1, va, false), Ok(FIRST_FREE_REF + i as u32));
        }
        assert_eq!(t.grant(1, 0x1000, false), Err(GrantError::NoFreeRef));
        // Holes in two different words come back lowest first.
        t.revoke(700).unwrap();
        t.revoke(130).unwrap();
        assert_eq!(t.grant(2, 0x1000, true), Ok(130));
        assert_eq!(t.grant(2, 0x2000, true), Ok(700));
        assert_eq!(t.entry(700).unwrap().domid, 2);
        // A reserved ref granted with grant_at is never handed out.
        let (e, u) = table_of(TABLE_ENTRIES);
        let t = Table::new(&e, &u);
        t.grant_at(FIRST_FREE_REF, 1, 0x1000, false).unwrap();
        assert_eq!(t.grant(1, 0x2000, false), Ok(FIRST_FREE_REF + 1));
    }

    #[test]
    fn a_mapped_grant_cannot_be_revoked() {
        let (e, u) = table_of(64);
        let t = Table::new(&e, &u);
        let r = t.grant(3, 0x50_0000, false).unwrap();
        // The hypervisor maps it.
        let mapped = Entry {
            flags: flags::PERMIT_ACCESS | flags::WRITING | flags::READING,
            domid: 3,
            frame: 0x500,
        };
        e[r as usize].store(mapped.encode(), Ordering::SeqCst);
        assert_eq!(t.revoke(r), Err(GrantError::Mapped(r)));
        assert_eq!(t.entry(r), Some(mapped));
        // ...and unmaps it.
        e[r as usize].store(
            Entry {
                flags: flags::PERMIT_ACCESS,
                ..mapped
            }
            .encode(),
            Ordering::SeqCst,
        );
        assert_eq!(t.revoke(r), Ok(()));
    }

    #[test]
    fn the_table_fills_up_and_addresses_are_checked() {
        let (e, u) = table_of(FIRST_FREE_REF as usize + 2);
        let t = Table::new(&e, &u);
        t.grant(1, 0x1000, false).unwrap();
        t.grant(1, 0x2000, false).unwrap();
        assert_eq!(t.grant(1, 0x3000, false), Err(GrantError::NoFreeRef));
        assert_eq!(
            t.grant(1, 0x3001, false),
            Err(GrantError::BadAddress(0x3001))
        );
        assert_eq!(t.grant(1, 0, false), Err(GrantError::BadAddress(0)));
        assert_eq!(
            t.grant_at(0, 1, abi::domain::USER_TOP, false),
            Err(GrantError::BadAddress(abi::domain::USER_TOP))
        );
    }

    #[test]
    fn without_a_hypervisor_there_is_no_table() {
        assert_eq!(
            grant(1, 0x1000, false),
            Err(GrantError::Hypercall(Error::UnknownCall))
        );
        assert_eq!(entry(0), None);
    }
}
