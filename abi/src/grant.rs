//! Grant tables, Xen version 1 semantics (`grant_table.h`).
//!
//! A domain grants a page of its memory to one other domain by filling an
//! entry of its grant table: `{u16 flags; u16 domid; u32 frame}`. airlock's
//! grant table lives in the granting domain's own memory, at the pages it
//! names with `grant_table_set`; the `frame` field holds the granted page's
//! *virtual page number* in the granter (its address >> 12), since a
//! domain never learns its physical frames. The hypervisor translates it
//! through the granter's own mappings and refuses anything the granter has
//! not mapped writable (for a read-write grant) or at all.
//!
//! Granting: write `domid` and `frame`, then (after a write barrier) `flags`.
//! Revoking: compare-and-swap `flags` to 0; it fails while the hypervisor has
//! set `READING` or `WRITING` because the page is mapped.
//!
//! Map, unmap and copy take arrays of the operations below (batched, like
//! Xen's `GNTTABOP_*`), each with its own status; the call itself returns
//! the number of operations processed, or an `abi::hypercall::Error` when
//! the array itself is unusable.

/// The domain id that names the caller itself in a copy (Xen's DOMID_SELF).
pub const DOMID_SELF: u16 = 0x7ff0;

/// Bytes of one grant entry.
pub const ENTRY_SIZE: usize = 8;
/// Entries in one 4 KiB page.
pub const ENTRIES_PER_PAGE: usize = 4096 / ENTRY_SIZE;
/// Most pages of a domain's grant table.
pub const MAX_TABLE_PAGES: u64 = 4;
/// Most operations in one map, unmap or copy call.
pub const MAX_BATCH: u64 = 64;

/// Grant entry flags.
pub mod flags {
    /// Type (bits 1:0): invalid.
    pub const INVALID: u16 = 0;
    /// Type: the page may be mapped or copied by `domid`.
    pub const PERMIT_ACCESS: u16 = 1;
    /// Type: transfer (not supported).
    pub const ACCEPT_TRANSFER: u16 = 2;
    /// Type: transitive (not supported).
    pub const TRANSITIVE: u16 = 3;
    pub const TYPE_MASK: u16 = 3;
    /// The grantee may only read.
    pub const READONLY: u16 = 1 << 2;
    /// Set by the hypervisor while the page is mapped for reading.
    pub const READING: u16 = 1 << 3;
    /// Set by the hypervisor while the page is mapped for writing.
    pub const WRITING: u16 = 1 << 4;
}

/// Per-operation status, as Xen numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i16)]
pub enum Status {
    Okay = 0,
    General = -1,
    BadDomain = -2,
    BadGntref = -3,
    BadHandle = -4,
    BadVirtAddr = -5,
    BadDevAddr = -6,
    NoDeviceSpace = -7,
    PermissionDenied = -8,
    BadPage = -9,
    BadCopyArg = -10,
    AddressTooBig = -11,
    Eagain = -12,
}

impl Status {
    pub const ALL: [Status; 13] = [
        Status::Okay,
        Status::General,
        Status::BadDomain,
        Status::BadGntref,
        Status::BadHandle,
        Status::BadVirtAddr,
        Status::BadDevAddr,
        Status::NoDeviceSpace,
        Status::PermissionDenied,
        Status::BadPage,
        Status::BadCopyArg,
        Status::AddressTooBig,
        Status::Eagain,
    ];

    pub fn from_raw(v: i16) -> Option<Status> {
        Status::ALL.iter().copied().find(|s| *s as i16 == v)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Status::Okay => "okay",
            Status::General => "general",
            Status::BadDomain => "bad-domain",
            Status::BadGntref => "bad-gntref",
            Status::BadHandle => "bad-handle",
            Status::BadVirtAddr => "bad-virt-addr",
            Status::BadDevAddr => "bad-dev-addr",
            Status::NoDeviceSpace => "no-device-space",
            Status::PermissionDenied => "permission-denied",
            Status::BadPage => "bad-page",
            Status::BadCopyArg => "bad-copy-arg",
            Status::AddressTooBig => "address-too-big",
            Status::Eagain => "eagain",
        }
    }
}

/// `map_grant_ref` flags.
pub mod map_flags {
    /// Also map the page for the mapper's devices (I/O address = `host_addr`).
    pub const DEVICE_MAP: u32 = 1;
    /// Map into the mapper's address space at `host_addr` (always required).
    pub const HOST_MAP: u32 = 2;
    /// Map read-only.
    pub const READONLY: u32 = 4;
}

/// Where in a domain's address space grant mappings may go: the grant
/// window, one page per mapping, below the device window.
pub const GRANT_WINDOW: u64 = 0x8000_0000;
pub const GRANT_WINDOW_SIZE: u64 = 0x1000_0000;

/// One map operation, 32 bytes: `{u64 host_addr; u32 flags; u32 ref; u16
/// dom; i16 status (out); u32 handle (out); u64 dev_bus_addr (out)}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapOp {
    pub host_addr: u64,
    pub flags: u32,
    pub gref: u32,
    pub dom: u16,
    pub status: i16,
    pub handle: u32,
    pub dev_bus_addr: u64,
}

/// One unmap operation, 24 bytes: `{u64 host_addr; u64 dev_bus_addr; u32
/// handle; i16 status (out); u16 pad}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnmapOp {
    pub host_addr: u64,
    pub dev_bus_addr: u64,
    pub handle: u32,
    pub status: i16,
}

/// One side of a copy: a grant reference of `domid`, or (with the
/// operation's `*_GREF` flag clear) the caller's own virtual page number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyPtr {
    /// A grant reference, or a virtual page number of the caller's.
    pub gref_or_page: u64,
    pub domid: u16,
    pub offset: u16,
}

/// One copy operation, 40 bytes: `{src: {u64; u16 domid; u16 offset; u32
/// pad}, dst: {the same}, u16 len, u16 flags, i16 status (out), u16 pad}`.
/// A copy may not cross a page (`BadCopyArg`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyOp {
    pub src: CopyPtr,
    pub dst: CopyPtr,
    pub len: u16,
    pub flags: u16,
    pub status: i16,
}

/// `CopyOp::flags`.
pub mod copy_flags {
    /// `src.gref_or_page` is a grant reference of `src.domid`.
    pub const SRC_GREF: u16 = 1;
    /// `dst.gref_or_page` is a grant reference of `dst.domid`.
    pub const DST_GREF: u16 = 2;
}

pub const MAP_OP_SIZE: usize = 32;
pub const UNMAP_OP_SIZE: usize = 24;
pub const COPY_OP_SIZE: usize = 40;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | u64::from(u32_at(b, o + 4)) << 32
}

impl MapOp {
    pub fn decode(b: &[u8; MAP_OP_SIZE]) -> Self {
        MapOp {
            host_addr: u64_at(b, 0),
            flags: u32_at(b, 8),
            gref: u32_at(b, 12),
            dom: u16_at(b, 16),
            status: u16_at(b, 18) as i16,
            handle: u32_at(b, 20),
            dev_bus_addr: u64_at(b, 24),
        }
    }

    pub fn encode(&self) -> [u8; MAP_OP_SIZE] {
        let mut b = [0u8; MAP_OP_SIZE];
        b[0..8].copy_from_slice(&self.host_addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.gref.to_le_bytes());
        b[16..18].copy_from_slice(&self.dom.to_le_bytes());
        b[18..20].copy_from_slice(&self.status.to_le_bytes());
        b[20..24].copy_from_slice(&self.handle.to_le_bytes());
        b[24..32].copy_from_slice(&self.dev_bus_addr.to_le_bytes());
        b
    }
}

impl UnmapOp {
    pub fn decode(b: &[u8; UNMAP_OP_SIZE]) -> Self {
        UnmapOp {
            host_addr: u64_at(b, 0),
            dev_bus_addr: u64_at(b, 8),
            handle: u32_at(b, 16),
            status: u16_at(b, 20) as i16,
        }
    }

    pub fn encode(&self) -> [u8; UNMAP_OP_SIZE] {
        let mut b = [0u8; UNMAP_OP_SIZE];
        b[0..8].copy_from_slice(&self.host_addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.dev_bus_addr.to_le_bytes());
        b[16..20].copy_from_slice(&self.handle.to_le_bytes());
        b[20..22].copy_from_slice(&self.status.to_le_bytes());
        b
    }
}

impl CopyPtr {
    fn decode(b: &[u8]) -> Self {
        CopyPtr {
            gref_or_page: u64_at(b, 0),
            domid: u16_at(b, 8),
            offset: u16_at(b, 10),
        }
    }

    fn encode(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.gref_or_page.to_le_bytes());
        b[8..10].copy_from_slice(&self.domid.to_le_bytes());
        b[10..12].copy_from_slice(&self.offset.to_le_bytes());
    }
}

impl CopyOp {
    pub fn decode(b: &[u8; COPY_OP_SIZE]) -> Self {
        CopyOp {
            src: CopyPtr::decode(&b[0..16]),
            dst: CopyPtr::decode(&b[16..32]),
            len: u16_at(b, 32),
            flags: u16_at(b, 34),
            status: u16_at(b, 36) as i16,
        }
    }

    pub fn encode(&self) -> [u8; COPY_OP_SIZE] {
        let mut b = [0u8; COPY_OP_SIZE];
        self.src.encode(&mut b[0..16]);
        self.dst.encode(&mut b[16..32]);
        b[32..34].copy_from_slice(&self.len.to_le_bytes());
        b[34..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..38].copy_from_slice(&self.status.to_le_bytes());
        b
    }
}

/// A grant entry as it sits in the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub flags: u16,
    pub domid: u16,
    /// The granted page's virtual page number in the granter.
    pub frame: u32,
}

impl Entry {
    pub fn decode(raw: u64) -> Self {
        Entry {
            flags: raw as u16,
            domid: (raw >> 16) as u16,
            frame: (raw >> 32) as u32,
        }
    }

    pub fn encode(&self) -> u64 {
        u64::from(self.flags) | u64::from(self.domid) << 16 | u64::from(self.frame) << 32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip() {
        let m = MapOp {
            host_addr: GRANT_WINDOW,
            flags: 7,
            gref: 3,
            dom: 2,
            status: -8,
            handle: 9,
            dev_bus_addr: 0x1000,
        };
        assert_eq!(MapOp::decode(&m.encode()), m);
        let u = UnmapOp {
            host_addr: 1,
            dev_bus_addr: 2,
            handle: 3,
            status: -4,
        };
        assert_eq!(UnmapOp::decode(&u.encode()), u);
        let c = CopyOp {
            src: CopyPtr {
                gref_or_page: 5,
                domid: 1,
                offset: 512,
            },
            dst: CopyPtr {
                gref_or_page: 0x400,
                domid: 0x7ff0,
                offset: 0,
            },
            len: 4096,
            flags: copy_flags::SRC_GREF,
            status: -10,
        };
        assert_eq!(CopyOp::decode(&c.encode()), c);
        let e = Entry {
            flags: flags::PERMIT_ACCESS | flags::READONLY,
            domid: 3,
            frame: 0x456,
        };
        assert_eq!(Entry::decode(e.encode()), e);
        for s in Status::ALL {
            assert_eq!(Status::from_raw(s as i16), Some(s));
        }
    }
}
