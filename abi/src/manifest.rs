//! The compiled manifest: what the host's TOML manifest says, in a fixed
//! binary form the hypervisor reads without a parser (it never sees TOML).
//!
//! `cargo xtask` checks `manifests/*.toml`, then [`encode`]s the result; the
//! bundle carries it as its entry of kind manifest, and the bundle's CRC
//! protects it, so it has no checksum of its own.
//!
//! ```text
//!  0      header (80 bytes)
//!  80     device records   (device count  x  8 bytes)
//!  ..     domain records   (domain count  x 256 bytes)
//!  ..     channel records  (channel count x 32 bytes)
//!  ..     watch records    (watch count   x 48 bytes)
//!  ..     vbd records      (vbd count     x 40 bytes)
//!  ..     allow records    (allow count   x 72 bytes)
//!  ..     vif records      (vif count     x 40 bytes)
//!         <- total size: nothing follows
//! ```
//!
//! Header (version 5), little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0  | 8  | magic `b"AIRLOCKM"` |
//! | 8  | 2  | format version, 5 |
//! | 10 | 2  | header size, 80 |
//! | 12 | 2  | device record size, 8 |
//! | 14 | 2  | device count, at most [`MAX_DEVICES`] |
//! | 16 | 2  | domain count, at most [`MAX_DOMAINS`] |
//! | 18 | 2  | exit rule ([`ExitRule::code`]) |
//! | 20 | 4  | total size: header + every record |
//! | 24 | 1  | system name length, 1..=32 |
//! | 25 | 32 | system name, UTF-8, zero-padded |
//! | 57 | 1  | reserved, zero |
//! | 58 | 2  | domain record size, 256 |
//! | 60 | 2  | channel record size, 32 |
//! | 62 | 2  | channel count, at most [`MAX_CHANNELS`] |
//! | 64 | 2  | watch record size, 48 |
//! | 66 | 2  | watch count, at most [`MAX_WATCHES`] |
//! | 68 | 2  | vbd record size, 40 |
//! | 70 | 2  | vbd count, at most [`MAX_VBDS`] |
//! | 72 | 2  | allow record size, 72 |
//! | 74 | 2  | allow count, at most [`MAX_ALLOWS`] |
//! | 76 | 2  | vif record size, 40 |
//! | 78 | 2  | vif count, at most [`MAX_VIFS`] |
//!
//! Device record (8 bytes), `device count` of them from offset 80; a
//! device's index is its position (0-based), which domain records use:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 2 | kind ([`DeviceKind::code`]) |
//! | 2 | 2 | PCI address as a requester id (bus 15:8, device 7:3, function 2:0) |
//! | 4 | 2 | PCI vendor id the device must show |
//! | 6 | 2 | PCI device id the device must show |
//!
//! Domain record (256 bytes), `domain count` of them after the devices; a
//! domain's index is its position (0-based), which channel and watch
//! records use:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0   | 8   | memory in bytes: image, heap, stack and start info; 1 MiB..=64 MiB, a multiple of 4 KiB |
//! | 8   | 2   | scheduling weight, 1..=1000 |
//! | 10  | 2   | how it is expected to end ([`Expect::code`]) |
//! | 12  | 1   | name length, 1..=32 |
//! | 13  | 1   | image length, 1..=32 |
//! | 14  | 1   | label length, 1..=32 |
//! | 15  | 1   | args length, 0..=128 |
//! | 16  | 32  | name: `[a-z0-9_-]`, unique among the domains, zero-padded |
//! | 48  | 32  | image: the name of the bundle's image entry, `[a-z0-9_-]`, zero-padded |
//! | 80  | 32  | security label, `[a-z0-9_-]`, zero-padded |
//! | 112 | 128 | args: printable ASCII (0x20..=0x7e), zero-padded |
//! | 240 | 1   | DMA mode: 1 static, 2 strict ([`dma_mode_code`]) |
//! | 241 | 1   | on a DMA fault of its devices ([`DmaFault::code`]): 1 stop the domain, 2 report only |
//! | 242 | 1   | device count, 0..=[`MAX_DOMAIN_DEVICES`] |
//! | 243 | 1   | reserved, zero |
//! | 244 | 8   | 4 device indices (`u16`, into the device records); unused slots zero |
//! | 252 | 4   | reserved, zero |
//!
//! A device index is below the device count, listed once per domain, and
//! assigned to at most one domain.
//!
//! Channel record (32 bytes), `channel count` of them after the domains:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 2  | index of one end's domain |
//! | 2 | 2  | index of the other end's domain (not the same) |
//! | 4 | 1  | name length, 1..=24 |
//! | 5 | 3  | reserved, zero |
//! | 8 | 24 | name: `[a-z0-9_-]`, unique among the channels, zero-padded |
//!
//! Watch record (48 bytes), `watch count` of them after the channels: a
//! range whose CRC-32 the hypervisor prints before the domains run and
//! after they have all ended.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0  | 1  | target kind: 1 a physical address, 2 a domain's memory |
//! | 1  | 1  | name length, 1..=24 |
//! | 2  | 2  | kind 2: the domain's index; kind 1: zero |
//! | 4  | 4  | reserved, zero |
//! | 8  | 8  | kind 1: the physical address; kind 2: zero |
//! | 16 | 8  | length in bytes, 1..=[`WATCH_LEN_MAX`]; kind 1: the range stays below [`WATCH_PHYS_LIMIT`]; kind 2: at most the domain's memory (the watch covers its first `len` bytes) |
//! | 24 | 24 | name: `[a-z0-9_-]`, unique among the watches, zero-padded |
//!
//! Vbd record (40 bytes), `vbd count` of them after the watches: a virtual
//! block device, a range of the backend's disk that the frontend uses
//! through blkfront and blkback. The disk is the backend's first device of
//! kind virtio-blk (in its device list's order). The hypervisor binds an
//! event channel between the two ends and tells each of them in its start
//! info (`abi::domain::VbdInfo`).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0  | 2  | frontend: index of the domain that uses the disk |
//! | 2  | 2  | backend: index of the domain that serves it (not the frontend); it owns a virtio-blk |
//! | 4  | 1  | name length, 1..=[`VBD_NAME_MAX`] |
//! | 5  | 1  | mode ([`vbd_mode_code`]): 1 grant map, 2 grant copy |
//! | 6  | 1  | read-only: 0 or 1 |
//! | 7  | 1  | reserved, zero |
//! | 8  | 8  | first sector of the range on the backend's disk |
//! | 16 | 8  | sectors in the range, at least 1; `first + sectors` does not wrap |
//! | 24 | 16 | name (`xvda`): `[a-z0-9_-]`, unique among the frontend's vbds, zero-padded |
//!
//! Two vbds of one backend (one disk) have ranges that do not overlap,
//! unless both are read-only. No domain is an end (front or back) of more
//! than [`abi::domain::MAX_VBDS`](crate::domain::MAX_VBDS) vbds: each is an
//! entry of its start info.
//!
//! Allow record (72 bytes), `allow count` of them after the vbds: the
//! security policy. Grant maps and copies are refused unless a rule allows
//! the acting domain's label (`subject`) the permission towards the other
//! domain's label (`object`); event channels the manifest itself declares
//! (channels, vbds) need no rule.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1  | subject length, 1..=32 |
//! | 1 | 1  | object length, 1..=32 |
//! | 2 | 1  | permissions: a non-empty set of the [`perm`] bits |
//! | 3 | 5  | reserved, zero |
//! | 8 | 32 | subject: a label some domain has, `[a-z0-9_-]`, zero-padded |
//! | 40 | 32 | object: a label some domain has, likewise |
//!
//! No two allow records have the same subject and object.
//!
//! Vif record (40 bytes), `vif count` of them after the allow records: a
//! virtual network interface, which the frontend uses through netfront and
//! the backend serves through netback, switched onto the backend's first
//! device of kind virtio-net (in its device list's order). As for vbds, the
//! hypervisor binds an event channel between the two ends and tells each of
//! them in its start info (`abi::domain::VifInfo`); the MAC and IPv4
//! address are the frontend's, and netback lets it send only as them.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0  | 2  | frontend: index of the domain that uses the interface |
//! | 2  | 2  | backend: index of the domain that serves it (not the frontend); it owns a virtio-net |
//! | 4  | 1  | name length, 1..=[`VIF_NAME_MAX`] |
//! | 5  | 3  | reserved, zero |
//! | 8  | 6  | the frontend's MAC: unicast (bit 0 of the first byte clear), not all zero |
//! | 14 | 2  | reserved, zero |
//! | 16 | 4  | the frontend's IPv4 address, network order: not 0.0.0.0/8, 127.0.0.0/8, 224.0.0.0/4 (multicast) or 240.0.0.0/4 (reserved, broadcast) |
//! | 20 | 4  | reserved, zero |
//! | 24 | 16 | name (`eth0`): `[a-z0-9_-]`, unique among the frontend's vifs, zero-padded |
//!
//! No two vifs have one MAC or one IPv4 address. No domain is an end (front
//! or back) of more than [`abi::domain::MAX_VIFS`](crate::domain::MAX_VIFS)
//! vifs: each is an entry of its start info.
//!
//! Every rule above is checked by [`Manifest::parse`], one
//! [`ManifestError`] variant per check; besides them: no domain is an end
//! of more than [`MAX_PORTS`] channels (each end is a port in its start
//! info), and the exit rule `all-exited` needs at least one domain.
//! [`encode`] refuses whatever `parse` would refuse.
//!
//! Version 1 had no domain or channel records (its domain count had to be
//! 0); version 2 had a 64-byte header, 240-byte domain records (no devices,
//! DMA mode or fault rule) and no watches; version 3 had a 72-byte header
//! and no vbd or allow records; version 4 had no vif records (header bytes
//! 76..80 were reserved). A reader refuses a manifest of another
//! version by its version.

use core::fmt;

use crate::bundle::{le, NAME_MAX};
use crate::domain::{
    DmaMode, VbdMode, ARGS_MAX, MAX_PEERS, MAX_PORTS, MAX_VBDS as DOMAIN_VBDS_MAX,
    MAX_VIFS as DOMAIN_VIFS_MAX, PORT_NAME_MAX, VBD_NAME_MAX as START_INFO_VBD_NAME_MAX,
    VIF_NAME_MAX as START_INFO_VIF_NAME_MAX,
};
use crate::pci::Bdf;

/// The first eight bytes of a compiled manifest.
pub const MAGIC: [u8; 8] = *b"AIRLOCKM";
/// The format version this crate reads and writes.
pub const VERSION: u16 = 5;
/// Size of the header in bytes.
pub const HEADER_SIZE: usize = 80;
/// Size of one device record in bytes.
pub const DEVICE_SIZE: usize = 8;
/// Size of one domain record in bytes.
pub const DOMAIN_SIZE: usize = 256;
/// Size of one channel record in bytes.
pub const CHANNEL_SIZE: usize = 32;
/// Size of one watch record in bytes.
pub const WATCH_SIZE: usize = 48;
/// Size of one vbd record in bytes.
pub const VBD_SIZE: usize = 40;
/// Size of one allow record in bytes.
pub const ALLOW_SIZE: usize = 72;
/// Longest vbd name in bytes (as the start info holds it).
pub const VBD_NAME_MAX: usize = START_INFO_VBD_NAME_MAX;
/// Most vbds one domain may be an end of (front or back): each is an entry
/// of its start info.
pub const MAX_DOMAIN_VBDS: usize = DOMAIN_VBDS_MAX;
/// Most vbds a manifest may list: every domain an end of
/// [`MAX_DOMAIN_VBDS`] of them.
pub const MAX_VBDS: usize = MAX_DOMAINS * MAX_DOMAIN_VBDS / 2;
/// Size of one vif record in bytes.
pub const VIF_SIZE: usize = 40;
/// Longest vif name in bytes (as the start info holds it).
pub const VIF_NAME_MAX: usize = START_INFO_VIF_NAME_MAX;
/// Most vifs one domain may be an end of (front or back): each is an entry
/// of its start info.
pub const MAX_DOMAIN_VIFS: usize = DOMAIN_VIFS_MAX;
/// Most vifs a manifest may list: every domain an end of
/// [`MAX_DOMAIN_VIFS`] of them.
pub const MAX_VIFS: usize = MAX_DOMAINS * MAX_DOMAIN_VIFS / 2;
/// Most allow records: one per ordered pair of labels, and there are at
/// most as many labels as domains.
pub const MAX_ALLOWS: usize = MAX_DOMAINS * MAX_DOMAINS;
/// Most watches a manifest may list.
pub const MAX_WATCHES: usize = 16;
/// Longest watch name in bytes.
pub const WATCH_NAME_MAX: usize = 24;
/// Most bytes one watch covers.
pub const WATCH_LEN_MAX: u64 = 16 << 20;
/// A physical watch ends at or below this address (52 bits, the most
/// x86-64 page tables can name).
pub const WATCH_PHYS_LIMIT: u64 = 1 << 52;
/// Most devices one domain may own (as many as its start info holds).
pub const MAX_DOMAIN_DEVICES: usize = crate::domain::MAX_DEVICES;
/// Most devices a manifest may list (one per slot of bus 0 would be 32).
pub const MAX_DEVICES: usize = 256;
/// Most domains: each domain's start info lists every other as a peer.
pub const MAX_DOMAINS: usize = MAX_PEERS + 1;
/// Most channels: every domain an end of [`MAX_PORTS`] of them.
pub const MAX_CHANNELS: usize = MAX_DOMAINS * MAX_PORTS / 2;
/// Longest domain name, image name and label in bytes.
pub const DOMAIN_NAME_MAX: usize = crate::domain::NAME_MAX;
/// Longest channel name in bytes (it names a port in the start info).
pub const CHANNEL_NAME_MAX: usize = PORT_NAME_MAX;
/// Least memory a domain may be given.
pub const DOMAIN_MEMORY_MIN: u64 = 1 << 20;
/// Most memory a domain may be given.
pub const DOMAIN_MEMORY_MAX: u64 = 64 << 20;
/// A domain's memory is a whole number of these.
pub const PAGE_SIZE: u64 = 4096;
/// Highest scheduling weight.
pub const WEIGHT_MAX: u16 = 1000;

const _: () = assert!(HEADER_SIZE == 80 && DOMAIN_SIZE == 16 + 3 * 32 + ARGS_MAX + 16);
const _: () = assert!(MAX_DOMAIN_DEVICES == 4);
const _: () = assert!(WATCH_SIZE == 24 + WATCH_NAME_MAX);
const _: () = assert!(CHANNEL_SIZE == 8 + PORT_NAME_MAX);
const _: () = assert!(DOMAIN_NAME_MAX <= NAME_MAX);
const _: () = assert!(MAX_CHANNELS <= u16::MAX as usize);
const _: () = assert!(VBD_SIZE == 24 + VBD_NAME_MAX);
const _: () = assert!(ALLOW_SIZE == 8 + 2 * DOMAIN_NAME_MAX);
const _: () = assert!(VIF_SIZE == 24 + VIF_NAME_MAX);
const _: () = assert!(MAX_ALLOWS <= u16::MAX as usize);

/// A device QEMU emulates and the manifest places at a fixed PCI address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKind {
    VirtioBlk,
    VirtioNet,
    /// QEMU's `edu` test device: a DMA engine aimed at any bus address.
    Edu,
    VirtioGpu,
    VirtioKeyboard,
    VirtioTablet,
}

/// PCI vendor id of virtio devices.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// A modern (non-transitional) virtio device's PCI id is this plus its
/// virtio device id.
pub const VIRTIO_MODERN_BASE: u16 = 0x1040;

impl DeviceKind {
    /// Every kind, in code order.
    pub const ALL: [DeviceKind; 6] = [
        DeviceKind::VirtioBlk,
        DeviceKind::VirtioNet,
        DeviceKind::Edu,
        DeviceKind::VirtioGpu,
        DeviceKind::VirtioKeyboard,
        DeviceKind::VirtioTablet,
    ];

    /// The on-disk code.
    pub const fn code(self) -> u16 {
        match self {
            DeviceKind::VirtioBlk => 1,
            DeviceKind::VirtioNet => 2,
            DeviceKind::Edu => 3,
            DeviceKind::VirtioGpu => 4,
            DeviceKind::VirtioKeyboard => 5,
            DeviceKind::VirtioTablet => 6,
        }
    }

    pub const fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(DeviceKind::VirtioBlk),
            2 => Some(DeviceKind::VirtioNet),
            3 => Some(DeviceKind::Edu),
            4 => Some(DeviceKind::VirtioGpu),
            5 => Some(DeviceKind::VirtioKeyboard),
            6 => Some(DeviceKind::VirtioTablet),
            _ => None,
        }
    }

    /// The manifest's spelling (`kind = "virtio-blk"`).
    pub const fn name(self) -> &'static str {
        match self {
            DeviceKind::VirtioBlk => "virtio-blk",
            DeviceKind::VirtioNet => "virtio-net",
            DeviceKind::Edu => "edu",
            DeviceKind::VirtioGpu => "virtio-gpu",
            DeviceKind::VirtioKeyboard => "virtio-keyboard",
            DeviceKind::VirtioTablet => "virtio-tablet",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// QEMU's `-device` driver for it.
    pub const fn qemu_device(self) -> &'static str {
        match self {
            DeviceKind::VirtioBlk => "virtio-blk-pci",
            DeviceKind::VirtioNet => "virtio-net-pci",
            DeviceKind::Edu => "edu",
            DeviceKind::VirtioGpu => "virtio-gpu-pci",
            DeviceKind::VirtioKeyboard => "virtio-keyboard-pci",
            DeviceKind::VirtioTablet => "virtio-tablet-pci",
        }
    }

    pub const fn is_virtio(self) -> bool {
        !matches!(self, DeviceKind::Edu)
    }

    /// The (vendor, device) PCI ids QEMU 7.2 gives it; for virtio with
    /// `disable-legacy=on`, the modern ids (0x1040 + virtio device id).
    pub const fn pci_ids(self) -> (u16, u16) {
        match self {
            DeviceKind::VirtioBlk => (VIRTIO_VENDOR, VIRTIO_MODERN_BASE + 2),
            DeviceKind::VirtioNet => (VIRTIO_VENDOR, VIRTIO_MODERN_BASE + 1),
            DeviceKind::Edu => (0x1234, 0x11e8),
            DeviceKind::VirtioGpu => (VIRTIO_VENDOR, VIRTIO_MODERN_BASE + 16),
            DeviceKind::VirtioKeyboard | DeviceKind::VirtioTablet => {
                (VIRTIO_VENDOR, VIRTIO_MODERN_BASE + 18)
            }
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// When the system stops by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitRule {
    /// Shut down with success once boot is done (`ready` was printed).
    /// What a system without domains does.
    AfterReady,
    /// Keep running until QEMU is stopped from outside.
    Never,
    /// Shut down when every domain has ended: with success if and only if
    /// each ended as its [`Expect`] says. Needs at least one domain.
    AllExited,
}

impl ExitRule {
    pub const ALL: [ExitRule; 3] = [ExitRule::AfterReady, ExitRule::Never, ExitRule::AllExited];

    pub const fn code(self) -> u16 {
        match self {
            ExitRule::AfterReady => 1,
            ExitRule::Never => 2,
            ExitRule::AllExited => 3,
        }
    }

    pub const fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(ExitRule::AfterReady),
            2 => Some(ExitRule::Never),
            3 => Some(ExitRule::AllExited),
            _ => None,
        }
    }

    /// The manifest's spelling (`exit = "after-ready"`).
    pub const fn name(self) -> &'static str {
        match self {
            ExitRule::AfterReady => "after-ready",
            ExitRule::Never => "never",
            ExitRule::AllExited => "all-exited",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// How a domain is expected to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Expect {
    /// By the `exit` hypercall with status 0.
    Exit,
    /// By a CPU exception (`domain_fault`): an attacker that must be stopped.
    Fault,
}

impl Expect {
    pub const ALL: [Expect; 2] = [Expect::Exit, Expect::Fault];

    pub const fn code(self) -> u16 {
        match self {
            Expect::Exit => 1,
            Expect::Fault => 2,
        }
    }

    pub const fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(Expect::Exit),
            2 => Some(Expect::Fault),
            _ => None,
        }
    }

    /// The manifest's spelling (`expect = "exit"`).
    pub const fn name(self) -> &'static str {
        match self {
            Expect::Exit => "exit",
            Expect::Fault => "fault",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// What the hypervisor does when a domain's device makes a DMA the IOMMU
/// refuses (it reports every such fault as `iommu_fault` either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DmaFault {
    /// End the domain (`domain_exit` with reason "dma-fault").
    Stop,
    /// Report the fault and let the domain run on.
    Report,
}

impl DmaFault {
    pub const ALL: [DmaFault; 2] = [DmaFault::Stop, DmaFault::Report];

    pub const fn code(self) -> u8 {
        match self {
            DmaFault::Stop => 1,
            DmaFault::Report => 2,
        }
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(DmaFault::Stop),
            2 => Some(DmaFault::Report),
            _ => None,
        }
    }

    /// The manifest's spelling (`on_dma_fault = "stop"`).
    pub const fn name(self) -> &'static str {
        match self {
            DmaFault::Stop => "stop",
            DmaFault::Report => "report",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Every DMA mode, in code order.
pub const DMA_MODES: [DmaMode; 2] = [DmaMode::Static, DmaMode::Strict];

/// A DMA mode's code in the domain record.
pub const fn dma_mode_code(m: DmaMode) -> u8 {
    match m {
        DmaMode::Static => 1,
        DmaMode::Strict => 2,
    }
}

pub const fn dma_mode_from_code(code: u8) -> Option<DmaMode> {
    match code {
        1 => Some(DmaMode::Static),
        2 => Some(DmaMode::Strict),
        _ => None,
    }
}

/// The manifest's spelling of a DMA mode (`dma = "static"`).
pub const fn dma_mode_name(m: DmaMode) -> &'static str {
    match m {
        DmaMode::Static => "static",
        DmaMode::Strict => "strict",
    }
}

pub fn dma_mode_from_name(name: &str) -> Option<DmaMode> {
    DMA_MODES.into_iter().find(|&m| dma_mode_name(m) == name)
}

/// Every vbd mode, in code order.
pub const VBD_MODES: [VbdMode; 2] = [VbdMode::Map, VbdMode::Copy];

/// A vbd mode's code in the vbd record (the start info's codes too).
pub const fn vbd_mode_code(m: VbdMode) -> u8 {
    match m {
        VbdMode::Map => 1,
        VbdMode::Copy => 2,
    }
}

pub const fn vbd_mode_from_code(code: u8) -> Option<VbdMode> {
    match code {
        1 => Some(VbdMode::Map),
        2 => Some(VbdMode::Copy),
        _ => None,
    }
}

/// The manifest's spelling of a vbd mode (`mode = "copy"`).
pub const fn vbd_mode_name(m: VbdMode) -> &'static str {
    match m {
        VbdMode::Map => "map",
        VbdMode::Copy => "copy",
    }
}

pub fn vbd_mode_from_name(name: &str) -> Option<VbdMode> {
    VBD_MODES.into_iter().find(|&m| vbd_mode_name(m) == name)
}

/// The permissions an allow rule grants, one bit each; a rule's `perms` is
/// a set of them. The names are the manifest's spelling and the `perm`
/// field of `EV grant_denied`.
pub mod perm {
    /// Map a page the object granted, for reading.
    pub const GRANT_MAP_READ: u8 = 1 << 0;
    /// Map a page the object granted, for writing (a writable map needs
    /// both this and [`GRANT_MAP_READ`], as in FLASK).
    pub const GRANT_MAP_WRITE: u8 = 1 << 1;
    /// Copy to or from a page the object granted.
    pub const GRANT_COPY: u8 = 1 << 2;
    /// Bind an event channel the object offered (channels the manifest
    /// declares need no rule).
    pub const EVENT_BIND: u8 = 1 << 3;
    /// Every defined bit.
    pub const ALL: u8 = GRANT_MAP_READ | GRANT_MAP_WRITE | GRANT_COPY | EVENT_BIND;

    /// Each permission's bit and name, in bit order.
    pub const NAMES: [(u8, &str); 4] = [
        (GRANT_MAP_READ, "grant_map_read"),
        (GRANT_MAP_WRITE, "grant_map_write"),
        (GRANT_COPY, "grant_copy"),
        (EVENT_BIND, "event_bind"),
    ];

    /// The bit of the permission called `name`.
    pub fn from_name(name: &str) -> Option<u8> {
        NAMES.iter().find(|(_, n)| *n == name).map(|(b, _)| *b)
    }

    /// The name of a single permission bit.
    pub fn name(bit: u8) -> Option<&'static str> {
        NAMES.iter().find(|(b, _)| *b == bit).map(|(_, n)| *n)
    }
}

/// The devices a domain owns: indices into the manifest's device records,
/// at most [`MAX_DOMAIN_DEVICES`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeviceList {
    len: u8,
    /// `indices[len..]` are zero, so equality is equality of the lists.
    indices: [u16; MAX_DOMAIN_DEVICES],
}

impl DeviceList {
    /// No devices.
    pub const EMPTY: DeviceList = DeviceList {
        len: 0,
        indices: [0; MAX_DOMAIN_DEVICES],
    };

    /// The list of `indices`; `None` if there are more than
    /// [`MAX_DOMAIN_DEVICES`].
    pub fn new(indices: &[u16]) -> Option<Self> {
        if indices.len() > MAX_DOMAIN_DEVICES {
            return None;
        }
        let mut l = DeviceList::EMPTY;
        l.indices[..indices.len()].copy_from_slice(indices);
        l.len = indices.len() as u8;
        Some(l)
    }

    pub fn as_slice(&self) -> &[u16] {
        &self.indices[..usize::from(self.len)]
    }

    /// The device indices, in the manifest's order.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.as_slice().iter().copied()
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, device: u16) -> bool {
        self.as_slice().contains(&device)
    }
}

/// One device record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Device {
    pub kind: DeviceKind,
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
}

impl Device {
    /// A device of `kind` at `bdf` with the ids QEMU gives that kind.
    pub const fn new(kind: DeviceKind, bdf: Bdf) -> Self {
        let (vendor, device) = kind.pci_ids();
        Device {
            kind,
            bdf,
            vendor,
            device,
        }
    }
}

/// One domain record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Domain<'a> {
    /// Its position among the domains; channels name domains by it.
    pub index: u16,
    pub name: &'a str,
    /// The bundle's image entry to build it from.
    pub image: &'a str,
    /// Its security label.
    pub label: &'a str,
    /// The manifest's `args`, handed over in the start info.
    pub args: &'a str,
    /// Bytes of memory: image, heap, stack and start info.
    pub memory: u64,
    pub weight: u16,
    pub expect: Expect,
    /// The devices it owns (indices into [`Manifest::devices`]).
    pub devices: DeviceList,
    /// How its devices reach its memory.
    pub dma: DmaMode,
    /// What a DMA fault of one of its devices does to it.
    pub on_dma_fault: DmaFault,
}

/// What a watch covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchTarget {
    /// `len` bytes from this physical address.
    Phys(u64),
    /// The first `len` bytes of the memory of the domain with this index
    /// (its first frame is its start-info page).
    Domain(u16),
}

/// One watch record: a range whose CRC-32 the hypervisor prints (`EV
/// watch`) before the domains run and after they have all ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watch<'a> {
    pub name: &'a str,
    pub target: WatchTarget,
    pub len: u64,
}

/// One vbd record: a virtual block device, `sectors` sectors of the
/// backend's disk from `first_sector`, which the frontend sees as sectors
/// `0..sectors`. The disk is the backend's first virtio-blk (in the order
/// of its device list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vbd<'a> {
    /// The frontend's name for it (`xvda`).
    pub name: &'a str,
    /// Domain index of the domain that uses it (blkfront).
    pub frontend: u16,
    /// Domain index of the domain that serves it (blkback).
    pub backend: u16,
    pub first_sector: u64,
    pub sectors: u64,
    pub readonly: bool,
    /// How blkback moves the data: grant map or grant copy.
    pub mode: VbdMode,
}

impl Vbd<'_> {
    /// The range on the backend's disk, end exclusive (records that passed
    /// `parse` never wrap).
    pub fn disk_range(&self) -> core::ops::Range<u64> {
        self.first_sector..self.first_sector.saturating_add(self.sectors)
    }
}

/// One vif record: a virtual network interface. The frontend uses it
/// (netfront) as `mac` and `ip`; the backend serves it (netback) on its
/// first virtio-net (in the order of its device list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vif<'a> {
    /// The frontend's name for it (`eth0`).
    pub name: &'a str,
    /// Domain index of the domain that uses it (netfront).
    pub frontend: u16,
    /// Domain index of the domain that serves it (netback).
    pub backend: u16,
    /// The frontend's MAC: unicast and not all zero.
    pub mac: [u8; 6],
    /// The frontend's IPv4 address, in network order.
    pub ip: [u8; 4],
}

/// Whether `mac` may be a vif's: unicast (the group bit, bit 0 of the first
/// byte, clear) and not all zero. Locally administered addresses
/// (`02:...`) are fine.
pub const fn vif_mac_ok(mac: [u8; 6]) -> bool {
    mac[0] & 1 == 0 && (mac[0] | mac[1] | mac[2] | mac[3] | mac[4] | mac[5]) != 0
}

/// Whether `ip` may be a vif's: a unicast host address, not in 0.0.0.0/8
/// ("this network"), 127.0.0.0/8 (loopback), 224.0.0.0/4 (multicast) or
/// 240.0.0.0/4 (reserved, with the limited broadcast address).
pub const fn vif_ip_ok(ip: [u8; 4]) -> bool {
    ip[0] != 0 && ip[0] != 127 && ip[0] < 224
}

/// One allow record: `subject` (the acting domain's label) may do `perms`
/// ([`perm`] bits) towards `object` (the other domain's label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allow<'a> {
    pub subject: &'a str,
    pub object: &'a str,
    pub perms: u8,
}

/// One channel record: an interdomain event channel bound before the two
/// domains start, each end a port named after the channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Channel<'a> {
    pub name: &'a str,
    /// Domain indices of the two ends.
    pub a: u16,
    pub b: u16,
}

/// Which record a [`ManifestError::BadString`] is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    Domain(u16),
    Channel(u16),
    Watch(u16),
    Vbd(u16),
    Allow(u16),
    Vif(u16),
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Record::Domain(i) => write!(f, "domain {i}"),
            Record::Channel(i) => write!(f, "channel {i}"),
            Record::Watch(i) => write!(f, "watch {i}"),
            Record::Vbd(i) => write!(f, "vbd {i}"),
            Record::Allow(i) => write!(f, "allow {i}"),
            Record::Vif(i) => write!(f, "vif {i}"),
        }
    }
}

/// What is wrong with a string field of a domain or channel record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrProblem {
    /// Length 0 where a name is needed.
    Empty,
    /// The length byte is over the field's size.
    TooLong {
        len: u8,
        max: usize,
    },
    NotUtf8,
    /// A byte outside the field's alphabet, at this offset in the string.
    BadChar {
        at: u8,
    },
    /// Bytes after the string are not zero.
    PaddingNotZero,
}

impl fmt::Display for StrProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StrProblem::Empty => f.write_str("empty"),
            StrProblem::TooLong { len, max } => write!(f, "length {len} is over {max}"),
            StrProblem::NotUtf8 => f.write_str("not UTF-8"),
            StrProblem::BadChar { at } => write!(f, "a character outside its alphabet at {at}"),
            StrProblem::PaddingNotZero => f.write_str("padding after it is not zero"),
        }
    }
}

/// Why a compiled manifest was refused: one variant per check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestError {
    /// Fewer bytes than a header.
    TruncatedHeader {
        len: usize,
    },
    BadMagic {
        found: [u8; 8],
    },
    UnknownVersion {
        found: u16,
    },
    BadHeaderSize {
        found: u16,
    },
    BadDeviceSize {
        found: u16,
    },
    BadDomainSize {
        found: u16,
    },
    BadChannelSize {
        found: u16,
    },
    BadWatchSize {
        found: u16,
    },
    /// The device count is over [`MAX_DEVICES`].
    TooManyDevices {
        count: u16,
    },
    /// The domain count is over [`MAX_DOMAINS`].
    TooManyDomains {
        count: u16,
    },
    /// The channel count is over [`MAX_CHANNELS`].
    TooManyChannels {
        count: u16,
    },
    /// The watch count is over [`MAX_WATCHES`].
    TooManyWatches {
        count: u16,
    },
    /// The total size field disagrees with the header and record counts, or
    /// with the bytes given.
    SizeMismatch {
        declared: u32,
        expected: usize,
        len: usize,
    },
    UnknownExitRule {
        code: u16,
    },
    /// `all-exited` with no domain to wait for.
    AllExitedWithoutDomains,
    EmptyName,
    NameTooLong {
        len: u8,
    },
    NameNotUtf8,
    /// The reserved header bytes (and the system name's padding) are not zero.
    ReservedNotZero,
    UnknownDeviceKind {
        index: u16,
        code: u16,
    },
    /// The ids disagree with what QEMU gives the kind.
    IdsDoNotMatchKind {
        index: u16,
        kind: DeviceKind,
        vendor: u16,
        device: u16,
    },
    /// Two devices at one PCI address.
    DuplicateAddress {
        first: u16,
        index: u16,
        bdf: Bdf,
    },
    /// A string field of a domain or channel record breaks its rules.
    BadString {
        record: Record,
        field: &'static str,
        problem: StrProblem,
    },
    /// Memory outside [`DOMAIN_MEMORY_MIN`]..=[`DOMAIN_MEMORY_MAX`].
    MemoryOutOfRange {
        index: u16,
        bytes: u64,
    },
    /// Memory that is not a whole number of [`PAGE_SIZE`] pages.
    MemoryNotPages {
        index: u16,
        bytes: u64,
    },
    /// A weight outside 1..=[`WEIGHT_MAX`].
    BadWeight {
        index: u16,
        weight: u16,
    },
    UnknownExpect {
        index: u16,
        code: u16,
    },
    /// Two domains with one name.
    DuplicateDomain {
        first: u16,
        index: u16,
    },
    /// Two channels with one name.
    DuplicateChannel {
        first: u16,
        index: u16,
    },
    /// The reserved bytes of a channel record are not zero.
    ChannelReservedNotZero {
        index: u16,
    },
    /// A channel end names a domain index that does not exist.
    ChannelEndOutOfRange {
        index: u16,
        domain: u16,
        count: u16,
    },
    /// Both ends of a channel are one domain.
    ChannelToItself {
        index: u16,
        domain: u16,
    },
    /// A domain is an end of more than [`MAX_PORTS`] channels; `channel` is
    /// the first one too many.
    TooManyPorts {
        domain: u16,
        channel: u16,
    },
    /// A DMA mode code that is neither static nor strict.
    UnknownDmaMode {
        index: u16,
        code: u8,
    },
    /// An `on_dma_fault` code that is neither stop nor report.
    UnknownDmaFault {
        index: u16,
        code: u8,
    },
    /// A domain's device count is over [`MAX_DOMAIN_DEVICES`].
    TooManyDomainDevices {
        index: u16,
        count: u8,
    },
    /// A domain names a device index that does not exist.
    DomainDeviceOutOfRange {
        index: u16,
        device: u16,
        count: u16,
    },
    /// A domain lists one device twice.
    DomainDeviceListedTwice {
        index: u16,
        device: u16,
    },
    /// Two domains own one device: `first` and `index` are their indices.
    DeviceAssignedTwice {
        device: u16,
        first: u16,
        index: u16,
    },
    /// A domain record's reserved bytes or unused device slots are not zero.
    DomainReservedNotZero {
        index: u16,
    },
    UnknownWatchKind {
        index: u16,
        code: u8,
    },
    /// A watch record's reserved bytes, or the field its kind does not
    /// use, are not zero.
    WatchReservedNotZero {
        index: u16,
    },
    /// A watch names a domain index that does not exist.
    WatchDomainOutOfRange {
        index: u16,
        domain: u16,
        count: u16,
    },
    /// A watch length of 0 or over [`WATCH_LEN_MAX`].
    BadWatchLen {
        index: u16,
        len: u64,
    },
    /// A physical watch that wraps or reaches [`WATCH_PHYS_LIMIT`].
    WatchPastPhysLimit {
        index: u16,
        addr: u64,
        len: u64,
    },
    /// A domain watch longer than the domain's memory.
    WatchPastDomain {
        index: u16,
        domain: u16,
        len: u64,
        memory: u64,
    },
    /// Two watches with one name.
    DuplicateWatch {
        first: u16,
        index: u16,
    },
    BadVbdSize {
        found: u16,
    },
    BadAllowSize {
        found: u16,
    },
    /// The vbd count is over [`MAX_VBDS`].
    TooManyVbds {
        count: u16,
    },
    /// The allow count is over [`MAX_ALLOWS`].
    TooManyAllows {
        count: u16,
    },
    /// A vbd end names a domain index that does not exist.
    VbdEndOutOfRange {
        index: u16,
        domain: u16,
        count: u16,
    },
    /// A vbd whose frontend is its backend.
    VbdToItself {
        index: u16,
        domain: u16,
    },
    /// A vbd mode code that is neither map nor copy.
    UnknownVbdMode {
        index: u16,
        code: u8,
    },
    /// A read-only byte other than 0 or 1.
    BadVbdReadonly {
        index: u16,
        value: u8,
    },
    /// A vbd record's reserved byte is not zero.
    VbdReservedNotZero {
        index: u16,
    },
    /// A vbd of no sectors.
    EmptyVbd {
        index: u16,
    },
    /// `first_sector + sectors` wraps.
    VbdRangeWraps {
        index: u16,
        first_sector: u64,
        sectors: u64,
    },
    /// The backend owns no virtio-blk.
    VbdBackendHasNoDisk {
        index: u16,
        backend: u16,
    },
    /// Two vbds of one frontend with one name.
    DuplicateVbd {
        first: u16,
        index: u16,
    },
    /// A domain is an end of more than [`MAX_DOMAIN_VBDS`] vbds; `vbd` is
    /// the first one too many.
    TooManyDomainVbds {
        domain: u16,
        vbd: u16,
    },
    /// Two vbds of one disk whose ranges overlap, not both read-only.
    VbdsOverlap {
        first: u16,
        index: u16,
    },
    /// An allow record with no permission.
    NoPerms {
        index: u16,
    },
    /// An allow record with bits outside [`perm::ALL`].
    UnknownPerms {
        index: u16,
        perms: u8,
    },
    /// An allow record's reserved bytes are not zero.
    AllowReservedNotZero {
        index: u16,
    },
    /// An allow record's `field` ("subject" or "object") is a label no
    /// domain has.
    AllowUnknownLabel {
        index: u16,
        field: &'static str,
    },
    /// Two allow records with the same subject and object.
    DuplicateAllow {
        first: u16,
        index: u16,
    },
    BadVifSize {
        found: u16,
    },
    /// The vif count is over [`MAX_VIFS`].
    TooManyVifs {
        count: u16,
    },
    /// A vif end names a domain index that does not exist.
    VifEndOutOfRange {
        index: u16,
        domain: u16,
        count: u16,
    },
    /// A vif whose frontend is its backend.
    VifToItself {
        index: u16,
        domain: u16,
    },
    /// A vif record's reserved bytes are not zero.
    VifReservedNotZero {
        index: u16,
    },
    /// The backend owns no virtio-net.
    VifBackendHasNoNic {
        index: u16,
        backend: u16,
    },
    /// Two vifs of one frontend with one name.
    DuplicateVif {
        first: u16,
        index: u16,
    },
    /// A MAC that is multicast (group bit set) or all zero.
    BadVifMac {
        index: u16,
        mac: [u8; 6],
    },
    /// An IPv4 address that is not a unicast host address ([`vif_ip_ok`]).
    BadVifIp {
        index: u16,
        ip: [u8; 4],
    },
    /// Two vifs with one MAC.
    DuplicateVifMac {
        first: u16,
        index: u16,
    },
    /// Two vifs with one IPv4 address.
    DuplicateVifIp {
        first: u16,
        index: u16,
    },
    /// A domain is an end of more than [`MAX_DOMAIN_VIFS`] vifs; `vif` is
    /// the first one too many.
    TooManyDomainVifs {
        domain: u16,
        vif: u16,
    },
}

/// `aa:bb:cc:dd:ee:ff`.
struct MacFmt([u8; 6]);

impl fmt::Display for MacFmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ManifestError::*;
        match self {
            TruncatedHeader { len } => {
                write!(
                    f,
                    "truncated header: {len} bytes, a header is {HEADER_SIZE}"
                )
            }
            BadMagic { found } => write!(f, "bad magic {found:02x?}, expected \"AIRLOCKM\""),
            UnknownVersion { found } => {
                write!(
                    f,
                    "unknown format version {found}, this hypervisor reads {VERSION}"
                )
            }
            BadHeaderSize { found } => {
                write!(
                    f,
                    "header size {found} is not version {VERSION}'s {HEADER_SIZE}"
                )
            }
            BadDeviceSize { found } => {
                write!(
                    f,
                    "device record size {found} is not version {VERSION}'s {DEVICE_SIZE}"
                )
            }
            BadDomainSize { found } => {
                write!(
                    f,
                    "domain record size {found} is not version {VERSION}'s {DOMAIN_SIZE}"
                )
            }
            BadChannelSize { found } => {
                write!(
                    f,
                    "channel record size {found} is not version {VERSION}'s {CHANNEL_SIZE}"
                )
            }
            TooManyDevices { count } => write!(f, "{count} devices, at most {MAX_DEVICES}"),
            TooManyDomains { count } => write!(f, "{count} domains, at most {MAX_DOMAINS}"),
            TooManyChannels { count } => write!(f, "{count} channels, at most {MAX_CHANNELS}"),
            BadWatchSize { found } => {
                write!(
                    f,
                    "watch record size {found} is not version {VERSION}'s {WATCH_SIZE}"
                )
            }
            TooManyWatches { count } => write!(f, "{count} watches, at most {MAX_WATCHES}"),
            SizeMismatch {
                declared,
                expected,
                len,
            } => write!(
                f,
                "size mismatch: the header says {declared} bytes, its counts give {expected}, \
                 the entry has {len}"
            ),
            UnknownExitRule { code } => write!(f, "unknown exit rule {code}"),
            AllExitedWithoutDomains => {
                f.write_str("exit rule all-exited, but there are no domains")
            }
            EmptyName => f.write_str("empty system name"),
            NameTooLong { len } => write!(f, "system name length {len} is over {NAME_MAX}"),
            NameNotUtf8 => f.write_str("system name is not UTF-8"),
            ReservedNotZero => f.write_str("reserved header bytes are not zero"),
            UnknownDeviceKind { index, code } => {
                write!(f, "device {index}: unknown kind {code}")
            }
            IdsDoNotMatchKind {
                index,
                kind,
                vendor,
                device,
            } => {
                let (v, d) = kind.pci_ids();
                write!(
                    f,
                    "device {index} ({kind}): ids {vendor:04x}:{device:04x}, \
                     the kind has {v:04x}:{d:04x}"
                )
            }
            DuplicateAddress { first, index, bdf } => {
                write!(
                    f,
                    "device {index}: address {bdf} already used by device {first}"
                )
            }
            BadString {
                record,
                field,
                problem,
            } => write!(f, "{record}: {field}: {problem}"),
            MemoryOutOfRange { index, bytes } => write!(
                f,
                "domain {index}: memory of {bytes} bytes is outside {DOMAIN_MEMORY_MIN}..={DOMAIN_MEMORY_MAX}"
            ),
            MemoryNotPages { index, bytes } => write!(
                f,
                "domain {index}: memory of {bytes} bytes is not a whole number of {PAGE_SIZE}-byte pages"
            ),
            BadWeight { index, weight } => {
                write!(f, "domain {index}: weight {weight} is outside 1..={WEIGHT_MAX}")
            }
            UnknownExpect { index, code } => {
                write!(f, "domain {index}: unknown expected end {code}")
            }
            DuplicateDomain { first, index } => {
                write!(f, "domain {index}: name already used by domain {first}")
            }
            DuplicateChannel { first, index } => {
                write!(f, "channel {index}: name already used by channel {first}")
            }
            ChannelReservedNotZero { index } => {
                write!(f, "channel {index}: reserved bytes are not zero")
            }
            ChannelEndOutOfRange {
                index,
                domain,
                count,
            } => write!(
                f,
                "channel {index}: end domain {domain} does not exist ({count} domains)"
            ),
            ChannelToItself { index, domain } => {
                write!(f, "channel {index}: both ends are domain {domain}")
            }
            TooManyPorts { domain, channel } => write!(
                f,
                "channel {channel}: domain {domain} would be an end of more than {MAX_PORTS} channels"
            ),
            UnknownDmaMode { index, code } => {
                write!(f, "domain {index}: unknown DMA mode {code}")
            }
            UnknownDmaFault { index, code } => {
                write!(f, "domain {index}: unknown DMA fault rule {code}")
            }
            TooManyDomainDevices { index, count } => write!(
                f,
                "domain {index}: {count} devices, at most {MAX_DOMAIN_DEVICES}"
            ),
            DomainDeviceOutOfRange {
                index,
                device,
                count,
            } => write!(
                f,
                "domain {index}: device {device} does not exist ({count} devices)"
            ),
            DomainDeviceListedTwice { index, device } => {
                write!(f, "domain {index}: device {device} listed twice")
            }
            DeviceAssignedTwice {
                device,
                first,
                index,
            } => write!(
                f,
                "domain {index}: device {device} is already assigned to domain {first}"
            ),
            DomainReservedNotZero { index } => {
                write!(f, "domain {index}: reserved bytes or unused device slots are not zero")
            }
            UnknownWatchKind { index, code } => {
                write!(f, "watch {index}: unknown target kind {code}")
            }
            WatchReservedNotZero { index } => write!(
                f,
                "watch {index}: reserved bytes or the field its kind does not use are not zero"
            ),
            WatchDomainOutOfRange {
                index,
                domain,
                count,
            } => write!(
                f,
                "watch {index}: domain {domain} does not exist ({count} domains)"
            ),
            BadWatchLen { index, len } => write!(
                f,
                "watch {index}: length {len} is outside 1..={WATCH_LEN_MAX}"
            ),
            WatchPastPhysLimit { index, addr, len } => write!(
                f,
                "watch {index}: {len} bytes at {addr:#x} reach past {WATCH_PHYS_LIMIT:#x}"
            ),
            WatchPastDomain {
                index,
                domain,
                len,
                memory,
            } => write!(
                f,
                "watch {index}: {len} bytes, more than domain {domain}'s {memory} bytes of memory"
            ),
            DuplicateWatch { first, index } => {
                write!(f, "watch {index}: name already used by watch {first}")
            }
            BadVbdSize { found } => {
                write!(
                    f,
                    "vbd record size {found} is not version {VERSION}'s {VBD_SIZE}"
                )
            }
            BadAllowSize { found } => {
                write!(
                    f,
                    "allow record size {found} is not version {VERSION}'s {ALLOW_SIZE}"
                )
            }
            TooManyVbds { count } => write!(f, "{count} vbds, at most {MAX_VBDS}"),
            TooManyAllows { count } => write!(f, "{count} allow rules, at most {MAX_ALLOWS}"),
            VbdEndOutOfRange {
                index,
                domain,
                count,
            } => write!(
                f,
                "vbd {index}: end domain {domain} does not exist ({count} domains)"
            ),
            VbdToItself { index, domain } => {
                write!(f, "vbd {index}: domain {domain} is both its frontend and its backend")
            }
            UnknownVbdMode { index, code } => write!(f, "vbd {index}: unknown mode {code}"),
            BadVbdReadonly { index, value } => {
                write!(f, "vbd {index}: read-only byte {value} is neither 0 nor 1")
            }
            VbdReservedNotZero { index } => write!(f, "vbd {index}: reserved byte is not zero"),
            EmptyVbd { index } => write!(f, "vbd {index}: no sectors"),
            VbdRangeWraps {
                index,
                first_sector,
                sectors,
            } => write!(
                f,
                "vbd {index}: {sectors} sectors from {first_sector} wrap around"
            ),
            VbdBackendHasNoDisk { index, backend } => write!(
                f,
                "vbd {index}: backend domain {backend} owns no virtio-blk"
            ),
            DuplicateVbd { first, index } => write!(
                f,
                "vbd {index}: its frontend already has a vbd of that name (vbd {first})"
            ),
            TooManyDomainVbds { domain, vbd } => write!(
                f,
                "vbd {vbd}: domain {domain} would be an end of more than {MAX_DOMAIN_VBDS} vbds"
            ),
            VbdsOverlap { first, index } => write!(
                f,
                "vbd {index}: its sectors overlap vbd {first}'s on the same disk, and not both are read-only"
            ),
            NoPerms { index } => write!(f, "allow {index}: no permission"),
            UnknownPerms { index, perms } => write!(
                f,
                "allow {index}: permission bits {perms:#04x} outside {:#04x}",
                perm::ALL
            ),
            AllowReservedNotZero { index } => {
                write!(f, "allow {index}: reserved bytes are not zero")
            }
            AllowUnknownLabel { index, field } => {
                write!(f, "allow {index}: no domain has the {field} label")
            }
            DuplicateAllow { first, index } => write!(
                f,
                "allow {index}: the same subject and object as allow {first}"
            ),
            BadVifSize { found } => {
                write!(
                    f,
                    "vif record size {found} is not version {VERSION}'s {VIF_SIZE}"
                )
            }
            TooManyVifs { count } => write!(f, "{count} vifs, at most {MAX_VIFS}"),
            VifEndOutOfRange {
                index,
                domain,
                count,
            } => write!(
                f,
                "vif {index}: end domain {domain} does not exist ({count} domains)"
            ),
            VifToItself { index, domain } => {
                write!(f, "vif {index}: domain {domain} is both its frontend and its backend")
            }
            VifReservedNotZero { index } => {
                write!(f, "vif {index}: reserved bytes are not zero")
            }
            VifBackendHasNoNic { index, backend } => write!(
                f,
                "vif {index}: backend domain {backend} owns no virtio-net"
            ),
            DuplicateVif { first, index } => write!(
                f,
                "vif {index}: its frontend already has a vif of that name (vif {first})"
            ),
            BadVifMac { index, mac } => write!(
                f,
                "vif {index}: MAC {} is multicast or all zero",
                MacFmt(*mac)
            ),
            BadVifIp { index, ip } => write!(
                f,
                "vif {index}: IPv4 address {}.{}.{}.{} is not a unicast host address",
                ip[0], ip[1], ip[2], ip[3]
            ),
            DuplicateVifMac { first, index } => {
                write!(f, "vif {index}: the same MAC as vif {first}")
            }
            DuplicateVifIp { first, index } => {
                write!(f, "vif {index}: the same IPv4 address as vif {first}")
            }
            TooManyDomainVifs { domain, vif } => write!(
                f,
                "vif {vif}: domain {domain} would be an end of more than {MAX_DOMAIN_VIFS} vifs"
            ),
        }
    }
}

/// A name's alphabet: lower-case ASCII letters, digits, `_` and `-`.
pub fn is_name_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
}

/// The args alphabet: printable ASCII.
pub fn is_args_byte(b: u8) -> bool {
    (0x20..=0x7e).contains(&b)
}

/// One string field of a record: its length byte, its bytes, its rules.
struct StrField {
    name: &'static str,
    len_at: usize,
    at: usize,
    max: usize,
    min: usize,
    ok: fn(u8) -> bool,
}

const D_MEMORY: usize = 0;
const D_WEIGHT: usize = 8;
const D_EXPECT: usize = 10;
const D_NAME: StrField = StrField {
    name: "name",
    len_at: 12,
    at: 16,
    max: DOMAIN_NAME_MAX,
    min: 1,
    ok: is_name_byte,
};
const D_IMAGE: StrField = StrField {
    name: "image",
    len_at: 13,
    at: 48,
    max: DOMAIN_NAME_MAX,
    min: 1,
    ok: is_name_byte,
};
const D_LABEL: StrField = StrField {
    name: "label",
    len_at: 14,
    at: 80,
    max: DOMAIN_NAME_MAX,
    min: 1,
    ok: is_name_byte,
};
const D_ARGS: StrField = StrField {
    name: "args",
    len_at: 15,
    at: 112,
    max: ARGS_MAX,
    min: 0,
    ok: is_args_byte,
};
const C_A: usize = 0;
const C_B: usize = 2;
const C_NAME: StrField = StrField {
    name: "name",
    len_at: 4,
    at: 8,
    max: CHANNEL_NAME_MAX,
    min: 1,
    ok: is_name_byte,
};
const C_RESERVED: core::ops::Range<usize> = 5..8;
const D_DMA: usize = 240;
const D_ON_FAULT: usize = 241;
const D_NDEV: usize = 242;
const D_RESERVED: usize = 243;
const D_DEVICES: usize = 244;
const D_TAIL: core::ops::Range<usize> = 252..256;
const W_KIND: usize = 0;
const W_DOMAIN: usize = 2;
const W_RESERVED: core::ops::Range<usize> = 4..8;
const W_ADDR: usize = 8;
const W_LEN: usize = 16;
const W_NAME: StrField = StrField {
    name: "name",
    len_at: 1,
    at: 24,
    max: WATCH_NAME_MAX,
    min: 1,
    ok: is_name_byte,
};
const W_KIND_PHYS: u8 = 1;
const W_KIND_DOMAIN: u8 = 2;
const V_FRONT: usize = 0;
const V_BACK: usize = 2;
const V_MODE: usize = 5;
const V_READONLY: usize = 6;
const V_RESERVED: usize = 7;
const V_FIRST: usize = 8;
const V_SECTORS: usize = 16;
const V_NAME: StrField = StrField {
    name: "name",
    len_at: 4,
    at: 24,
    max: VBD_NAME_MAX,
    min: 1,
    ok: is_name_byte,
};
const A_PERMS: usize = 2;
const A_RESERVED: core::ops::Range<usize> = 3..8;
const A_SUBJECT: StrField = StrField {
    name: "subject",
    len_at: 0,
    at: 8,
    max: DOMAIN_NAME_MAX,
    min: 1,
    ok: is_name_byte,
};
const A_OBJECT: StrField = StrField {
    name: "object",
    len_at: 1,
    at: 40,
    max: DOMAIN_NAME_MAX,
    min: 1,
    ok: is_name_byte,
};

const _: () = assert!(D_ARGS.at + D_ARGS.max == D_DMA);
const _: () = assert!(D_DEVICES + 2 * MAX_DOMAIN_DEVICES == D_TAIL.start);
const _: () = assert!(D_TAIL.end == DOMAIN_SIZE);
const _: () = assert!(W_NAME.at + W_NAME.max == WATCH_SIZE);
const _: () = assert!(C_NAME.at + C_NAME.max == CHANNEL_SIZE);
const _: () = assert!(V_NAME.at + V_NAME.max == VBD_SIZE);
const _: () = assert!(A_OBJECT.at + A_OBJECT.max == ALLOW_SIZE);
const F_FRONT: usize = 0;
const F_BACK: usize = 2;
const F_MAC: usize = 8;
const F_IP: usize = 16;
/// Every byte of a vif record that is reserved.
const F_RESERVED: [core::ops::Range<usize>; 3] = [5..8, 14..16, 20..24];
const F_NAME: StrField = StrField {
    name: "name",
    len_at: 4,
    at: 24,
    max: VIF_NAME_MAX,
    min: 1,
    ok: is_name_byte,
};
const _: () = assert!(F_NAME.at + F_NAME.max == VIF_SIZE);
const _: () = assert!(F_MAC + 6 == F_RESERVED[1].start && F_IP + 4 == F_RESERVED[2].start);

impl StrField {
    /// The checked string of `rec`.
    fn read<'a>(&self, rec: &'a [u8], record: Record) -> Result<&'a str, ManifestError> {
        let bad = |problem| ManifestError::BadString {
            record,
            field: self.name,
            problem,
        };
        let len_byte = rec[self.len_at];
        let len = len_byte as usize;
        if len > self.max {
            return Err(bad(StrProblem::TooLong {
                len: len_byte,
                max: self.max,
            }));
        }
        if len < self.min {
            return Err(bad(StrProblem::Empty));
        }
        let raw = &rec[self.at..self.at + len];
        let s = core::str::from_utf8(raw).map_err(|_| bad(StrProblem::NotUtf8))?;
        if let Some(at) = raw.iter().position(|&b| !(self.ok)(b)) {
            return Err(bad(StrProblem::BadChar { at: at as u8 }));
        }
        if rec[self.at + len..self.at + self.max]
            .iter()
            .any(|&b| b != 0)
        {
            return Err(bad(StrProblem::PaddingNotZero));
        }
        Ok(s)
    }

    /// The string of a record that passed [`StrField::read`].
    fn get<'a>(&self, rec: &'a [u8]) -> &'a str {
        let len = (rec[self.len_at] as usize).min(self.max);
        core::str::from_utf8(&rec[self.at..self.at + len]).unwrap_or("")
    }

    fn put(&self, rec: &mut [u8], s: &str) {
        rec[self.len_at] = s.len() as u8;
        le::put(rec, self.at, s.as_bytes());
    }
}

/// A compiled manifest whose every check passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Manifest<'a> {
    name: &'a str,
    exit: ExitRule,
    /// Exactly `count` records of each kind.
    devices: &'a [u8],
    domains: &'a [u8],
    channels: &'a [u8],
    watches: &'a [u8],
    vbds: &'a [u8],
    allows: &'a [u8],
    vifs: &'a [u8],
}

fn read_device(records: &[u8], i: usize) -> (u16, Bdf, u16, u16) {
    let at = i * DEVICE_SIZE;
    (
        le::u16_at(records, at),
        Bdf::from_rid(le::u16_at(records, at + 2)),
        le::u16_at(records, at + 4),
        le::u16_at(records, at + 6),
    )
}

fn domain_record(records: &[u8], i: usize) -> &[u8] {
    &records[i * DOMAIN_SIZE..(i + 1) * DOMAIN_SIZE]
}

fn channel_record(records: &[u8], i: usize) -> &[u8] {
    &records[i * CHANNEL_SIZE..(i + 1) * CHANNEL_SIZE]
}

fn watch_record(records: &[u8], i: usize) -> &[u8] {
    &records[i * WATCH_SIZE..(i + 1) * WATCH_SIZE]
}

fn vbd_record(records: &[u8], i: usize) -> &[u8] {
    &records[i * VBD_SIZE..(i + 1) * VBD_SIZE]
}

fn allow_record(records: &[u8], i: usize) -> &[u8] {
    &records[i * ALLOW_SIZE..(i + 1) * ALLOW_SIZE]
}

/// Decodes the vbd record `i` of records that passed `parse`.
fn decode_vbd(records: &[u8], i: usize) -> Vbd<'_> {
    let rec = vbd_record(records, i);
    Vbd {
        name: V_NAME.get(rec),
        frontend: le::u16_at(rec, V_FRONT),
        backend: le::u16_at(rec, V_BACK),
        first_sector: le::u64_at(rec, V_FIRST),
        sectors: le::u64_at(rec, V_SECTORS),
        readonly: rec[V_READONLY] != 0,
        mode: vbd_mode_from_code(rec[V_MODE]).unwrap_or(VbdMode::Copy),
    }
}

fn vif_record(records: &[u8], i: usize) -> &[u8] {
    &records[i * VIF_SIZE..(i + 1) * VIF_SIZE]
}

/// Decodes the vif record `i` of records that passed `parse`.
fn decode_vif(records: &[u8], i: usize) -> Vif<'_> {
    let rec = vif_record(records, i);
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&rec[F_MAC..F_MAC + 6]);
    let mut ip = [0u8; 4];
    ip.copy_from_slice(&rec[F_IP..F_IP + 4]);
    Vif {
        name: F_NAME.get(rec),
        frontend: le::u16_at(rec, F_FRONT),
        backend: le::u16_at(rec, F_BACK),
        mac,
        ip,
    }
}

/// Decodes the allow record `i` of records that passed `parse`.
fn decode_allow(records: &[u8], i: usize) -> Allow<'_> {
    let rec = allow_record(records, i);
    Allow {
        subject: A_SUBJECT.get(rec),
        object: A_OBJECT.get(rec),
        perms: rec[A_PERMS],
    }
}

/// The device list of a domain record (whatever its count byte says, cut
/// to the slots there are).
fn domain_devices(rec: &[u8]) -> DeviceList {
    let n = usize::from(rec[D_NDEV]).min(MAX_DOMAIN_DEVICES);
    let mut idx = [0u16; MAX_DOMAIN_DEVICES];
    for (k, slot) in idx.iter_mut().enumerate().take(n) {
        *slot = le::u16_at(rec, D_DEVICES + 2 * k);
    }
    DeviceList::new(&idx[..n]).unwrap_or_default()
}

/// Decodes the domain record `i` of records that passed `parse`.
fn decode_domain(records: &[u8], i: usize) -> Domain<'_> {
    let rec = domain_record(records, i);
    Domain {
        index: i as u16,
        name: D_NAME.get(rec),
        image: D_IMAGE.get(rec),
        label: D_LABEL.get(rec),
        args: D_ARGS.get(rec),
        memory: le::u64_at(rec, D_MEMORY),
        weight: le::u16_at(rec, D_WEIGHT),
        expect: Expect::from_code(le::u16_at(rec, D_EXPECT)).unwrap_or(Expect::Exit),
        devices: domain_devices(rec),
        dma: dma_mode_from_code(rec[D_DMA]).unwrap_or(DmaMode::Static),
        on_dma_fault: DmaFault::from_code(rec[D_ON_FAULT]).unwrap_or(DmaFault::Stop),
    }
}

/// Decodes the watch record `i` of records that passed `parse`.
fn decode_watch(records: &[u8], i: usize) -> Watch<'_> {
    let rec = watch_record(records, i);
    Watch {
        name: W_NAME.get(rec),
        target: if rec[W_KIND] == W_KIND_DOMAIN {
            WatchTarget::Domain(le::u16_at(rec, W_DOMAIN))
        } else {
            WatchTarget::Phys(le::u64_at(rec, W_ADDR))
        },
        len: le::u64_at(rec, W_LEN),
    }
}

fn decode_channel(records: &[u8], i: usize) -> Channel<'_> {
    let rec = channel_record(records, i);
    Channel {
        name: C_NAME.get(rec),
        a: le::u16_at(rec, C_A),
        b: le::u16_at(rec, C_B),
    }
}

/// Checks every vbd record against the (already checked) devices and
/// domains.
fn check_vbds(devices: &[u8], domains: &[u8], vbds: &[u8]) -> Result<(), ManifestError> {
    use ManifestError::*;
    let n_domains = (domains.len() / DOMAIN_SIZE) as u16;
    let mut ends = [0u8; MAX_DOMAINS];
    for i in 0..vbds.len() / VBD_SIZE {
        let index = i as u16;
        let rec = vbd_record(vbds, i);
        let name = V_NAME.read(rec, Record::Vbd(index))?;
        let (front, back) = (le::u16_at(rec, V_FRONT), le::u16_at(rec, V_BACK));
        for domain in [front, back] {
            if domain >= n_domains {
                return Err(VbdEndOutOfRange {
                    index,
                    domain,
                    count: n_domains,
                });
            }
        }
        if front == back {
            return Err(VbdToItself {
                index,
                domain: front,
            });
        }
        let code = rec[V_MODE];
        if vbd_mode_from_code(code).is_none() {
            return Err(UnknownVbdMode { index, code });
        }
        let value = rec[V_READONLY];
        if value > 1 {
            return Err(BadVbdReadonly { index, value });
        }
        if rec[V_RESERVED] != 0 {
            return Err(VbdReservedNotZero { index });
        }
        let (first_sector, sectors) = (le::u64_at(rec, V_FIRST), le::u64_at(rec, V_SECTORS));
        if sectors == 0 {
            return Err(EmptyVbd { index });
        }
        if first_sector.checked_add(sectors).is_none() {
            return Err(VbdRangeWraps {
                index,
                first_sector,
                sectors,
            });
        }
        let owns_disk = domain_devices(domain_record(domains, back.into()))
            .iter()
            .any(|d| read_device(devices, d.into()).0 == DeviceKind::VirtioBlk.code());
        if !owns_disk {
            return Err(VbdBackendHasNoDisk {
                index,
                backend: back,
            });
        }
        let earlier = || (0..i).map(|j| (j as u16, decode_vbd(vbds, j)));
        if let Some((first, _)) = earlier().find(|(_, v)| v.frontend == front && v.name == name) {
            return Err(DuplicateVbd { first, index });
        }
        let this = decode_vbd(vbds, i);
        let overlaps = |v: &Vbd<'_>| {
            v.backend == back
                && v.first_sector < this.disk_range().end
                && this.first_sector < v.disk_range().end
                && !(v.readonly && this.readonly)
        };
        if let Some((first, _)) = earlier().find(|(_, v)| overlaps(v)) {
            return Err(VbdsOverlap { first, index });
        }
        for domain in [front, back] {
            let n = &mut ends[usize::from(domain)];
            *n += 1;
            if usize::from(*n) > MAX_DOMAIN_VBDS {
                return Err(TooManyDomainVbds { domain, vbd: index });
            }
        }
    }
    Ok(())
}

/// Checks every vif record against the (already checked) devices and
/// domains.
fn check_vifs(devices: &[u8], domains: &[u8], vifs: &[u8]) -> Result<(), ManifestError> {
    use ManifestError::*;
    let n_domains = (domains.len() / DOMAIN_SIZE) as u16;
    let mut ends = [0u8; MAX_DOMAINS];
    for i in 0..vifs.len() / VIF_SIZE {
        let index = i as u16;
        let rec = vif_record(vifs, i);
        let name = F_NAME.read(rec, Record::Vif(index))?;
        let (front, back) = (le::u16_at(rec, F_FRONT), le::u16_at(rec, F_BACK));
        for domain in [front, back] {
            if domain >= n_domains {
                return Err(VifEndOutOfRange {
                    index,
                    domain,
                    count: n_domains,
                });
            }
        }
        if front == back {
            return Err(VifToItself {
                index,
                domain: front,
            });
        }
        if F_RESERVED
            .iter()
            .any(|r| rec[r.clone()].iter().any(|&b| b != 0))
        {
            return Err(VifReservedNotZero { index });
        }
        let owns_nic = domain_devices(domain_record(domains, back.into()))
            .iter()
            .any(|d| read_device(devices, d.into()).0 == DeviceKind::VirtioNet.code());
        if !owns_nic {
            return Err(VifBackendHasNoNic {
                index,
                backend: back,
            });
        }
        let this = decode_vif(vifs, i);
        if !vif_mac_ok(this.mac) {
            return Err(BadVifMac {
                index,
                mac: this.mac,
            });
        }
        if !vif_ip_ok(this.ip) {
            return Err(BadVifIp { index, ip: this.ip });
        }
        let earlier = || (0..i).map(|j| (j as u16, decode_vif(vifs, j)));
        if let Some((first, _)) = earlier().find(|(_, v)| v.frontend == front && v.name == name) {
            return Err(DuplicateVif { first, index });
        }
        if let Some((first, _)) = earlier().find(|(_, v)| v.mac == this.mac) {
            return Err(DuplicateVifMac { first, index });
        }
        if let Some((first, _)) = earlier().find(|(_, v)| v.ip == this.ip) {
            return Err(DuplicateVifIp { first, index });
        }
        for domain in [front, back] {
            let n = &mut ends[usize::from(domain)];
            *n += 1;
            if usize::from(*n) > MAX_DOMAIN_VIFS {
                return Err(TooManyDomainVifs { domain, vif: index });
            }
        }
    }
    Ok(())
}

/// Checks every allow record against the (already checked) domains'
/// labels.
fn check_allows(domains: &[u8], allows: &[u8]) -> Result<(), ManifestError> {
    use ManifestError::*;
    let n_domains = domains.len() / DOMAIN_SIZE;
    let is_label = |l: &str| (0..n_domains).any(|j| D_LABEL.get(domain_record(domains, j)) == l);
    for i in 0..allows.len() / ALLOW_SIZE {
        let index = i as u16;
        let rec = allow_record(allows, i);
        let subject = A_SUBJECT.read(rec, Record::Allow(index))?;
        let object = A_OBJECT.read(rec, Record::Allow(index))?;
        let perms = rec[A_PERMS];
        if perms == 0 {
            return Err(NoPerms { index });
        }
        if perms & !perm::ALL != 0 {
            return Err(UnknownPerms { index, perms });
        }
        if rec[A_RESERVED].iter().any(|&b| b != 0) {
            return Err(AllowReservedNotZero { index });
        }
        for (field, label) in [("subject", subject), ("object", object)] {
            if !is_label(label) {
                return Err(AllowUnknownLabel { index, field });
            }
        }
        if let Some(first) = (0..i).find(|&j| {
            let a = decode_allow(allows, j);
            a.subject == subject && a.object == object
        }) {
            return Err(DuplicateAllow {
                first: first as u16,
                index,
            });
        }
    }
    Ok(())
}

impl<'a> Manifest<'a> {
    /// Checks the layout the module comment gives and every record.
    pub fn parse(bytes: &'a [u8]) -> Result<Manifest<'a>, ManifestError> {
        use ManifestError::*;
        if bytes.len() < HEADER_SIZE {
            return Err(TruncatedHeader { len: bytes.len() });
        }
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&bytes[..8]);
        if magic != MAGIC {
            return Err(BadMagic { found: magic });
        }
        let version = le::u16_at(bytes, 8);
        if version != VERSION {
            return Err(UnknownVersion { found: version });
        }
        let header_size = le::u16_at(bytes, 10);
        if header_size as usize != HEADER_SIZE {
            return Err(BadHeaderSize { found: header_size });
        }
        let device_size = le::u16_at(bytes, 12);
        if device_size as usize != DEVICE_SIZE {
            return Err(BadDeviceSize { found: device_size });
        }
        let domain_size = le::u16_at(bytes, 58);
        if domain_size as usize != DOMAIN_SIZE {
            return Err(BadDomainSize { found: domain_size });
        }
        let channel_size = le::u16_at(bytes, 60);
        if channel_size as usize != CHANNEL_SIZE {
            return Err(BadChannelSize {
                found: channel_size,
            });
        }
        let n_devices = le::u16_at(bytes, 14);
        if n_devices as usize > MAX_DEVICES {
            return Err(TooManyDevices { count: n_devices });
        }
        let n_domains = le::u16_at(bytes, 16);
        if n_domains as usize > MAX_DOMAINS {
            return Err(TooManyDomains { count: n_domains });
        }
        let watch_size = le::u16_at(bytes, 64);
        if watch_size as usize != WATCH_SIZE {
            return Err(BadWatchSize { found: watch_size });
        }
        let n_channels = le::u16_at(bytes, 62);
        if n_channels as usize > MAX_CHANNELS {
            return Err(TooManyChannels { count: n_channels });
        }
        let n_watches = le::u16_at(bytes, 66);
        if n_watches as usize > MAX_WATCHES {
            return Err(TooManyWatches { count: n_watches });
        }
        let vbd_size = le::u16_at(bytes, 68);
        if vbd_size as usize != VBD_SIZE {
            return Err(BadVbdSize { found: vbd_size });
        }
        let n_vbds = le::u16_at(bytes, 70);
        if n_vbds as usize > MAX_VBDS {
            return Err(TooManyVbds { count: n_vbds });
        }
        let allow_size = le::u16_at(bytes, 72);
        if allow_size as usize != ALLOW_SIZE {
            return Err(BadAllowSize { found: allow_size });
        }
        let n_allows = le::u16_at(bytes, 74);
        if n_allows as usize > MAX_ALLOWS {
            return Err(TooManyAllows { count: n_allows });
        }
        let vif_size = le::u16_at(bytes, 76);
        if vif_size as usize != VIF_SIZE {
            return Err(BadVifSize { found: vif_size });
        }
        let n_vifs = le::u16_at(bytes, 78);
        if n_vifs as usize > MAX_VIFS {
            return Err(TooManyVifs { count: n_vifs });
        }
        let declared = le::u32_at(bytes, 20);
        let expected = encoded_size(
            n_devices as usize,
            n_domains as usize,
            n_channels as usize,
            n_watches as usize,
            n_vbds as usize,
            n_allows as usize,
            n_vifs as usize,
        );
        if declared as usize != expected || bytes.len() != expected {
            return Err(SizeMismatch {
                declared,
                expected,
                len: bytes.len(),
            });
        }
        let exit_code = le::u16_at(bytes, 18);
        let Some(exit) = ExitRule::from_code(exit_code) else {
            return Err(UnknownExitRule { code: exit_code });
        };
        if exit == ExitRule::AllExited && n_domains == 0 {
            return Err(AllExitedWithoutDomains);
        }
        let name_len = bytes[24];
        if name_len == 0 {
            return Err(EmptyName);
        }
        if name_len as usize > NAME_MAX {
            return Err(NameTooLong { len: name_len });
        }
        let Ok(name) = core::str::from_utf8(&bytes[25..25 + name_len as usize]) else {
            return Err(NameNotUtf8);
        };
        if bytes[25 + name_len as usize..58].iter().any(|&b| b != 0) {
            return Err(ReservedNotZero);
        }

        let (devices, rest) = bytes[HEADER_SIZE..].split_at(n_devices as usize * DEVICE_SIZE);
        let (domains, rest) = rest.split_at(n_domains as usize * DOMAIN_SIZE);
        let (channels, rest) = rest.split_at(n_channels as usize * CHANNEL_SIZE);
        let (watches, rest) = rest.split_at(n_watches as usize * WATCH_SIZE);
        let (vbds, rest) = rest.split_at(n_vbds as usize * VBD_SIZE);
        let (allows, vifs) = rest.split_at(n_allows as usize * ALLOW_SIZE);
        for i in 0..n_devices as usize {
            let (code, bdf, vendor, device) = read_device(devices, i);
            let index = i as u16;
            let Some(kind) = DeviceKind::from_code(code) else {
                return Err(UnknownDeviceKind { index, code });
            };
            if kind.pci_ids() != (vendor, device) {
                return Err(IdsDoNotMatchKind {
                    index,
                    kind,
                    vendor,
                    device,
                });
            }
            if let Some(first) = (0..i).find(|&j| read_device(devices, j).1 == bdf) {
                return Err(DuplicateAddress {
                    first: first as u16,
                    index,
                    bdf,
                });
            }
        }

        for i in 0..n_domains as usize {
            let index = i as u16;
            let rec = domain_record(domains, i);
            let record = Record::Domain(index);
            let name = D_NAME.read(rec, record)?;
            D_IMAGE.read(rec, record)?;
            D_LABEL.read(rec, record)?;
            D_ARGS.read(rec, record)?;
            let bytes = le::u64_at(rec, D_MEMORY);
            if !(DOMAIN_MEMORY_MIN..=DOMAIN_MEMORY_MAX).contains(&bytes) {
                return Err(MemoryOutOfRange { index, bytes });
            }
            if !bytes.is_multiple_of(PAGE_SIZE) {
                return Err(MemoryNotPages { index, bytes });
            }
            let weight = le::u16_at(rec, D_WEIGHT);
            if !(1..=WEIGHT_MAX).contains(&weight) {
                return Err(BadWeight { index, weight });
            }
            let code = le::u16_at(rec, D_EXPECT);
            if Expect::from_code(code).is_none() {
                return Err(UnknownExpect { index, code });
            }
            if let Some(first) = (0..i).find(|&j| D_NAME.get(domain_record(domains, j)) == name) {
                return Err(DuplicateDomain {
                    first: first as u16,
                    index,
                });
            }
            let code = rec[D_DMA];
            if dma_mode_from_code(code).is_none() {
                return Err(UnknownDmaMode { index, code });
            }
            let code = rec[D_ON_FAULT];
            if DmaFault::from_code(code).is_none() {
                return Err(UnknownDmaFault { index, code });
            }
            let count = rec[D_NDEV];
            if usize::from(count) > MAX_DOMAIN_DEVICES {
                return Err(TooManyDomainDevices { index, count });
            }
            let unused = &rec[D_DEVICES + 2 * usize::from(count)..D_TAIL.start];
            if rec[D_RESERVED] != 0
                || unused.iter().any(|&b| b != 0)
                || rec[D_TAIL].iter().any(|&b| b != 0)
            {
                return Err(DomainReservedNotZero { index });
            }
            let list = domain_devices(rec);
            for (k, device) in list.iter().enumerate() {
                if device >= n_devices {
                    return Err(DomainDeviceOutOfRange {
                        index,
                        device,
                        count: n_devices,
                    });
                }
                if list.as_slice()[..k].contains(&device) {
                    return Err(DomainDeviceListedTwice { index, device });
                }
                if let Some(first) =
                    (0..i).find(|&j| domain_devices(domain_record(domains, j)).contains(device))
                {
                    return Err(DeviceAssignedTwice {
                        device,
                        first: first as u16,
                        index,
                    });
                }
            }
        }

        let mut ports = [0u8; MAX_DOMAINS];
        for i in 0..n_channels as usize {
            let index = i as u16;
            let rec = channel_record(channels, i);
            let name = C_NAME.read(rec, Record::Channel(index))?;
            if rec[C_RESERVED].iter().any(|&b| b != 0) {
                return Err(ChannelReservedNotZero { index });
            }
            let (a, b) = (le::u16_at(rec, C_A), le::u16_at(rec, C_B));
            for domain in [a, b] {
                if domain >= n_domains {
                    return Err(ChannelEndOutOfRange {
                        index,
                        domain,
                        count: n_domains,
                    });
                }
            }
            if a == b {
                return Err(ChannelToItself { index, domain: a });
            }
            if let Some(first) = (0..i).find(|&j| C_NAME.get(channel_record(channels, j)) == name) {
                return Err(DuplicateChannel {
                    first: first as u16,
                    index,
                });
            }
            for domain in [a, b] {
                let n = &mut ports[domain as usize];
                *n += 1;
                if *n as usize > MAX_PORTS {
                    return Err(TooManyPorts {
                        domain,
                        channel: index,
                    });
                }
            }
        }

        for i in 0..n_watches as usize {
            let index = i as u16;
            let rec = watch_record(watches, i);
            let name = W_NAME.read(rec, Record::Watch(index))?;
            let (domain, addr, len) = (
                le::u16_at(rec, W_DOMAIN),
                le::u64_at(rec, W_ADDR),
                le::u64_at(rec, W_LEN),
            );
            let unused_set = match rec[W_KIND] {
                W_KIND_PHYS => domain != 0,
                W_KIND_DOMAIN => addr != 0,
                code => return Err(UnknownWatchKind { index, code }),
            };
            if unused_set || rec[W_RESERVED].iter().any(|&b| b != 0) {
                return Err(WatchReservedNotZero { index });
            }
            if len == 0 || len > WATCH_LEN_MAX {
                return Err(BadWatchLen { index, len });
            }
            if rec[W_KIND] == W_KIND_PHYS {
                if addr
                    .checked_add(len)
                    .is_none_or(|end| end > WATCH_PHYS_LIMIT)
                {
                    return Err(WatchPastPhysLimit { index, addr, len });
                }
            } else {
                if domain >= n_domains {
                    return Err(WatchDomainOutOfRange {
                        index,
                        domain,
                        count: n_domains,
                    });
                }
                let memory = le::u64_at(domain_record(domains, domain.into()), D_MEMORY);
                if len > memory {
                    return Err(WatchPastDomain {
                        index,
                        domain,
                        len,
                        memory,
                    });
                }
            }
            if let Some(first) = (0..i).find(|&j| W_NAME.get(watch_record(watches, j)) == name) {
                return Err(DuplicateWatch {
                    first: first as u16,
                    index,
                });
            }
        }

        check_vbds(devices, domains, vbds)?;
        check_allows(domains, allows)?;
        check_vifs(devices, domains, vifs)?;

        Ok(Manifest {
            name,
            exit,
            devices,
            domains,
            channels,
            watches,
            vbds,
            allows,
            vifs,
        })
    }

    /// The system's name (`[system] name`).
    pub fn name(&self) -> &'a str {
        self.name
    }

    pub fn exit_rule(&self) -> ExitRule {
        self.exit
    }

    pub fn device_count(&self) -> usize {
        self.devices.len() / DEVICE_SIZE
    }

    /// Every device, in manifest order.
    pub fn devices(&self) -> Devices<'a> {
        Devices {
            records: self.devices,
            next: 0,
        }
    }

    /// The device the manifest places at `bdf`.
    pub fn device_at(&self, bdf: Bdf) -> Option<Device> {
        self.devices().find(|d| d.bdf == bdf)
    }

    pub fn domain_count(&self) -> usize {
        self.domains.len() / DOMAIN_SIZE
    }

    /// Every domain, in manifest order (`index` 0, 1, ...).
    pub fn domains(&self) -> Domains<'a> {
        Domains {
            records: self.domains,
            next: 0,
        }
    }

    /// The domain with this index.
    pub fn domain(&self, index: u16) -> Option<Domain<'a>> {
        (usize::from(index) < self.domain_count())
            .then(|| decode_domain(self.domains, index.into()))
    }

    /// The domain called `name`.
    pub fn domain_named(&self, name: &str) -> Option<Domain<'a>> {
        self.domains().find(|d| d.name == name)
    }

    pub fn channel_count(&self) -> usize {
        self.channels.len() / CHANNEL_SIZE
    }

    /// Every channel, in manifest order.
    pub fn channels(&self) -> Channels<'a> {
        Channels {
            records: self.channels,
            next: 0,
        }
    }

    /// The device with this index.
    pub fn device(&self, index: u16) -> Option<Device> {
        self.devices().nth(index.into())
    }

    /// The domain that owns the device with this index, if any.
    pub fn device_owner(&self, device: u16) -> Option<Domain<'a>> {
        self.domains().find(|d| d.devices.contains(device))
    }

    pub fn watch_count(&self) -> usize {
        self.watches.len() / WATCH_SIZE
    }

    /// Every watch, in manifest order.
    pub fn watches(&self) -> Watches<'a> {
        Watches {
            records: self.watches,
            next: 0,
        }
    }

    pub fn vbd_count(&self) -> usize {
        self.vbds.len() / VBD_SIZE
    }

    /// Every vbd, in manifest order.
    pub fn vbds(&self) -> Vbds<'a> {
        Vbds {
            records: self.vbds,
            next: 0,
        }
    }

    /// The vbds domain `index` is an end of (front or back), in manifest
    /// order: the order of its start info's vbd list.
    pub fn vbds_of(&self, index: u16) -> impl Iterator<Item = Vbd<'a>> + 'a {
        self.vbds()
            .filter(move |v| v.frontend == index || v.backend == index)
    }

    pub fn vif_count(&self) -> usize {
        self.vifs.len() / VIF_SIZE
    }

    /// Every vif, in manifest order.
    pub fn vifs(&self) -> Vifs<'a> {
        Vifs {
            records: self.vifs,
            next: 0,
        }
    }

    /// The vifs domain `index` is an end of (front or back), in manifest
    /// order: the order of its start info's vif list.
    pub fn vifs_of(&self, index: u16) -> impl Iterator<Item = Vif<'a>> + 'a {
        self.vifs()
            .filter(move |v| v.frontend == index || v.backend == index)
    }

    pub fn allow_count(&self) -> usize {
        self.allows.len() / ALLOW_SIZE
    }

    /// Every allow rule, in manifest order.
    pub fn allows(&self) -> Allows<'a> {
        Allows {
            records: self.allows,
            next: 0,
        }
    }

    /// The permissions ([`perm`] bits) the rules give `subject` towards
    /// `object`: 0 when no rule names the pair (default deny).
    pub fn perms(&self, subject: &str, object: &str) -> u8 {
        self.allows()
            .find(|a| a.subject == subject && a.object == object)
            .map_or(0, |a| a.perms)
    }

    /// Whether the rules give `subject` every bit of `perms` towards
    /// `object`.
    pub fn allowed(&self, subject: &str, object: &str, perms: u8) -> bool {
        self.perms(subject, object) & perms == perms
    }
}

/// Iterator over a manifest's vbds.
#[derive(Clone, Debug)]
pub struct Vbds<'a> {
    records: &'a [u8],
    next: usize,
}

impl<'a> Iterator for Vbds<'a> {
    type Item = Vbd<'a>;

    fn next(&mut self) -> Option<Vbd<'a>> {
        if (self.next + 1) * VBD_SIZE > self.records.len() {
            return None;
        }
        let v = decode_vbd(self.records, self.next);
        self.next += 1;
        Some(v)
    }
}

/// Iterator over a manifest's vifs.
#[derive(Clone, Debug)]
pub struct Vifs<'a> {
    records: &'a [u8],
    next: usize,
}

impl<'a> Iterator for Vifs<'a> {
    type Item = Vif<'a>;

    fn next(&mut self) -> Option<Vif<'a>> {
        if (self.next + 1) * VIF_SIZE > self.records.len() {
            return None;
        }
        let v = decode_vif(self.records, self.next);
        self.next += 1;
        Some(v)
    }
}

/// Iterator over a manifest's allow rules.
#[derive(Clone, Debug)]
pub struct Allows<'a> {
    records: &'a [u8],
    next: usize,
}

impl<'a> Iterator for Allows<'a> {
    type Item = Allow<'a>;

    fn next(&mut self) -> Option<Allow<'a>> {
        if (self.next + 1) * ALLOW_SIZE > self.records.len() {
            return None;
        }
        let a = decode_allow(self.records, self.next);
        self.next += 1;
        Some(a)
    }
}

/// Iterator over a manifest's watches.
#[derive(Clone, Debug)]
pub struct Watches<'a> {
    records: &'a [u8],
    next: usize,
}

impl<'a> Iterator for Watches<'a> {
    type Item = Watch<'a>;

    fn next(&mut self) -> Option<Watch<'a>> {
        if (self.next + 1) * WATCH_SIZE > self.records.len() {
            return None;
        }
        let w = decode_watch(self.records, self.next);
        self.next += 1;
        Some(w)
    }
}

/// Iterator over a manifest's devices.
#[derive(Clone, Debug)]
pub struct Devices<'a> {
    records: &'a [u8],
    next: usize,
}

impl Iterator for Devices<'_> {
    type Item = Device;

    fn next(&mut self) -> Option<Device> {
        while self.next * DEVICE_SIZE < self.records.len() {
            let (code, bdf, vendor, device) = read_device(self.records, self.next);
            self.next += 1;
            // Every record passed `parse`, so the kind is always known.
            if let Some(kind) = DeviceKind::from_code(code) {
                return Some(Device {
                    kind,
                    bdf,
                    vendor,
                    device,
                });
            }
        }
        None
    }
}

/// Iterator over a manifest's domains.
#[derive(Clone, Debug)]
pub struct Domains<'a> {
    records: &'a [u8],
    next: usize,
}

impl<'a> Iterator for Domains<'a> {
    type Item = Domain<'a>;

    fn next(&mut self) -> Option<Domain<'a>> {
        if (self.next + 1) * DOMAIN_SIZE > self.records.len() {
            return None;
        }
        let d = decode_domain(self.records, self.next);
        self.next += 1;
        Some(d)
    }
}

/// Iterator over a manifest's channels.
#[derive(Clone, Debug)]
pub struct Channels<'a> {
    records: &'a [u8],
    next: usize,
}

impl<'a> Iterator for Channels<'a> {
    type Item = Channel<'a>;

    fn next(&mut self) -> Option<Channel<'a>> {
        if (self.next + 1) * CHANNEL_SIZE > self.records.len() {
            return None;
        }
        let c = decode_channel(self.records, self.next);
        self.next += 1;
        Some(c)
    }
}

/// Why a manifest could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// More records of a kind than the format holds.
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    /// A string longer than its field (`index` is the record's, or 0 for
    /// the system name).
    TooLong {
        what: &'static str,
        index: usize,
        len: usize,
        max: usize,
    },
    /// `domains[position].index` is not `position`.
    WrongIndex {
        position: usize,
        index: u16,
    },
    BufferTooSmall {
        need: usize,
        have: usize,
    },
    /// The encoded bytes break a rule of the format: what `parse` says.
    Invalid(ManifestError),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use EncodeError::*;
        match self {
            TooMany { what, count, max } => write!(f, "{count} {what}, at most {max}"),
            TooLong {
                what,
                index,
                len,
                max,
            } => write!(f, "{what} {index}: {len} bytes, at most {max}"),
            WrongIndex { position, index } => {
                write!(f, "domain at position {position} says it has index {index}")
            }
            BufferTooSmall { need, have } => {
                write!(
                    f,
                    "output buffer of {have} bytes, the manifest needs {need}"
                )
            }
            Invalid(e) => e.fmt(f),
        }
    }
}

/// The size [`encode`] writes for these counts of records.
pub const fn encoded_size(
    devices: usize,
    domains: usize,
    channels: usize,
    watches: usize,
    vbds: usize,
    allows: usize,
    vifs: usize,
) -> usize {
    HEADER_SIZE
        + devices * DEVICE_SIZE
        + domains * DOMAIN_SIZE
        + channels * CHANNEL_SIZE
        + watches * WATCH_SIZE
        + vbds * VBD_SIZE
        + allows * ALLOW_SIZE
        + vifs * VIF_SIZE
}

/// Everything a compiled manifest says, as [`encode`] takes it. Domains,
/// channels, watches, vbds and vifs name domains by index; `domains[i].index`
/// must be `i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Contents<'a> {
    pub name: &'a str,
    pub exit: ExitRule,
    pub devices: &'a [Device],
    pub domains: &'a [Domain<'a>],
    pub channels: &'a [Channel<'a>],
    pub watches: &'a [Watch<'a>],
    pub vbds: &'a [Vbd<'a>],
    pub allows: &'a [Allow<'a>],
    pub vifs: &'a [Vif<'a>],
}

impl<'a> Contents<'a> {
    /// A system called `name` with nothing in it.
    pub const fn empty(name: &'a str, exit: ExitRule) -> Self {
        Contents {
            name,
            exit,
            devices: &[],
            domains: &[],
            channels: &[],
            watches: &[],
            vbds: &[],
            allows: &[],
            vifs: &[],
        }
    }

    /// The bytes [`encode`] writes for it.
    pub const fn size(&self) -> usize {
        encoded_size(
            self.devices.len(),
            self.domains.len(),
            self.channels.len(),
            self.watches.len(),
            self.vbds.len(),
            self.allows.len(),
            self.vifs.len(),
        )
    }
}

/// Writes the compiled manifest at the start of `out`; returns its size.
/// Refuses whatever [`Manifest::parse`] would refuse (it parses what it
/// wrote), so a manifest that encodes is one the hypervisor accepts.
pub fn encode(c: &Contents<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
    use EncodeError::*;
    let Contents {
        name,
        exit,
        devices,
        domains,
        channels,
        watches,
        vbds,
        allows,
        vifs,
    } = *c;
    for (what, count, max) in [
        ("devices", devices.len(), MAX_DEVICES),
        ("domains", domains.len(), MAX_DOMAINS),
        ("channels", channels.len(), MAX_CHANNELS),
        ("watches", watches.len(), MAX_WATCHES),
        ("vbds", vbds.len(), MAX_VBDS),
        ("allow rules", allows.len(), MAX_ALLOWS),
        ("vifs", vifs.len(), MAX_VIFS),
    ] {
        if count > max {
            return Err(TooMany { what, count, max });
        }
    }
    let too_long = |what, index, s: &str, max| {
        (s.len() > max).then_some(TooLong {
            what,
            index,
            len: s.len(),
            max,
        })
    };
    if let Some(e) = too_long("system name", 0, name, NAME_MAX) {
        return Err(e);
    }
    for (i, d) in domains.iter().enumerate() {
        if usize::from(d.index) != i {
            return Err(WrongIndex {
                position: i,
                index: d.index,
            });
        }
        for (what, s, max) in [
            ("domain name", d.name, DOMAIN_NAME_MAX),
            ("domain image", d.image, DOMAIN_NAME_MAX),
            ("domain label", d.label, DOMAIN_NAME_MAX),
            ("domain args", d.args, ARGS_MAX),
        ] {
            if let Some(e) = too_long(what, i, s, max) {
                return Err(e);
            }
        }
    }
    for (i, c) in channels.iter().enumerate() {
        if let Some(e) = too_long("channel name", i, c.name, CHANNEL_NAME_MAX) {
            return Err(e);
        }
    }
    for (i, w) in watches.iter().enumerate() {
        if let Some(e) = too_long("watch name", i, w.name, WATCH_NAME_MAX) {
            return Err(e);
        }
    }
    for (i, v) in vbds.iter().enumerate() {
        if let Some(e) = too_long("vbd name", i, v.name, VBD_NAME_MAX) {
            return Err(e);
        }
    }
    for (i, a) in allows.iter().enumerate() {
        for (what, s) in [("allow subject", a.subject), ("allow object", a.object)] {
            if let Some(e) = too_long(what, i, s, DOMAIN_NAME_MAX) {
                return Err(e);
            }
        }
    }
    for (i, v) in vifs.iter().enumerate() {
        if let Some(e) = too_long("vif name", i, v.name, VIF_NAME_MAX) {
            return Err(e);
        }
    }
    let need = c.size();
    let have = out.len();
    let Some(out) = out.get_mut(..need) else {
        return Err(BufferTooSmall { need, have });
    };
    out.fill(0);
    le::put(out, 0, &MAGIC);
    le::put(out, 8, &VERSION.to_le_bytes());
    le::put(out, 10, &(HEADER_SIZE as u16).to_le_bytes());
    le::put(out, 12, &(DEVICE_SIZE as u16).to_le_bytes());
    le::put(out, 14, &(devices.len() as u16).to_le_bytes());
    le::put(out, 16, &(domains.len() as u16).to_le_bytes());
    le::put(out, 18, &exit.code().to_le_bytes());
    le::put(out, 20, &(need as u32).to_le_bytes());
    le::put(out, 24, &[name.len() as u8]);
    le::put(out, 25, name.as_bytes());
    le::put(out, 58, &(DOMAIN_SIZE as u16).to_le_bytes());
    le::put(out, 60, &(CHANNEL_SIZE as u16).to_le_bytes());
    le::put(out, 62, &(channels.len() as u16).to_le_bytes());
    le::put(out, 64, &(WATCH_SIZE as u16).to_le_bytes());
    le::put(out, 66, &(watches.len() as u16).to_le_bytes());
    le::put(out, 68, &(VBD_SIZE as u16).to_le_bytes());
    le::put(out, 70, &(vbds.len() as u16).to_le_bytes());
    le::put(out, 72, &(ALLOW_SIZE as u16).to_le_bytes());
    le::put(out, 74, &(allows.len() as u16).to_le_bytes());
    le::put(out, 76, &(VIF_SIZE as u16).to_le_bytes());
    le::put(out, 78, &(vifs.len() as u16).to_le_bytes());
    let mut at = HEADER_SIZE;
    for d in devices {
        le::put(out, at, &d.kind.code().to_le_bytes());
        le::put(out, at + 2, &d.bdf.rid().to_le_bytes());
        le::put(out, at + 4, &d.vendor.to_le_bytes());
        le::put(out, at + 6, &d.device.to_le_bytes());
        at += DEVICE_SIZE;
    }
    for d in domains {
        let rec = &mut out[at..at + DOMAIN_SIZE];
        le::put(rec, D_MEMORY, &d.memory.to_le_bytes());
        le::put(rec, D_WEIGHT, &d.weight.to_le_bytes());
        le::put(rec, D_EXPECT, &d.expect.code().to_le_bytes());
        D_NAME.put(rec, d.name);
        D_IMAGE.put(rec, d.image);
        D_LABEL.put(rec, d.label);
        D_ARGS.put(rec, d.args);
        rec[D_DMA] = dma_mode_code(d.dma);
        rec[D_ON_FAULT] = d.on_dma_fault.code();
        rec[D_NDEV] = d.devices.len() as u8;
        for (k, dev) in d.devices.iter().enumerate() {
            le::put(rec, D_DEVICES + 2 * k, &dev.to_le_bytes());
        }
        at += DOMAIN_SIZE;
    }
    for c in channels {
        let rec = &mut out[at..at + CHANNEL_SIZE];
        le::put(rec, C_A, &c.a.to_le_bytes());
        le::put(rec, C_B, &c.b.to_le_bytes());
        C_NAME.put(rec, c.name);
        at += CHANNEL_SIZE;
    }
    for w in watches {
        let rec = &mut out[at..at + WATCH_SIZE];
        match w.target {
            WatchTarget::Phys(addr) => {
                rec[W_KIND] = W_KIND_PHYS;
                le::put(rec, W_ADDR, &addr.to_le_bytes());
            }
            WatchTarget::Domain(d) => {
                rec[W_KIND] = W_KIND_DOMAIN;
                le::put(rec, W_DOMAIN, &d.to_le_bytes());
            }
        }
        le::put(rec, W_LEN, &w.len.to_le_bytes());
        W_NAME.put(rec, w.name);
        at += WATCH_SIZE;
    }
    for v in vbds {
        let rec = &mut out[at..at + VBD_SIZE];
        le::put(rec, V_FRONT, &v.frontend.to_le_bytes());
        le::put(rec, V_BACK, &v.backend.to_le_bytes());
        rec[V_MODE] = vbd_mode_code(v.mode);
        rec[V_READONLY] = u8::from(v.readonly);
        le::put(rec, V_FIRST, &v.first_sector.to_le_bytes());
        le::put(rec, V_SECTORS, &v.sectors.to_le_bytes());
        V_NAME.put(rec, v.name);
        at += VBD_SIZE;
    }
    for a in allows {
        let rec = &mut out[at..at + ALLOW_SIZE];
        rec[A_PERMS] = a.perms;
        A_SUBJECT.put(rec, a.subject);
        A_OBJECT.put(rec, a.object);
        at += ALLOW_SIZE;
    }
    for v in vifs {
        let rec = &mut out[at..at + VIF_SIZE];
        le::put(rec, F_FRONT, &v.frontend.to_le_bytes());
        le::put(rec, F_BACK, &v.backend.to_le_bytes());
        le::put(rec, F_MAC, &v.mac);
        le::put(rec, F_IP, &v.ip);
        F_NAME.put(rec, v.name);
        at += VIF_SIZE;
    }
    Manifest::parse(out).map_err(Invalid)?;
    Ok(need)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;
    use std::vec;
    use std::vec::Vec;

    /// `encode` of a system without vbds or allow rules.
    fn enc(
        name: &str,
        exit: ExitRule,
        devices: &[Device],
        domains: &[Domain<'_>],
        channels: &[Channel<'_>],
        watches: &[Watch<'_>],
        out: &mut [u8],
    ) -> Result<usize, EncodeError> {
        encode(
            &Contents {
                devices,
                domains,
                channels,
                watches,
                ..Contents::empty(name, exit)
            },
            out,
        )
    }

    fn devices() -> [Device; 3] {
        [
            Device::new(DeviceKind::VirtioBlk, Bdf::new(0, 3, 0)),
            Device::new(DeviceKind::VirtioNet, Bdf::new(0, 4, 0)),
            Device::new(DeviceKind::Edu, Bdf::new(0, 5, 0)),
        ]
    }

    fn domains() -> [Domain<'static>; 3] {
        [
            Domain {
                index: 0,
                name: "ping",
                image: "testdom",
                label: "guest_a",
                args: "role=ping count=10000",
                memory: 4 << 20,
                weight: 1,
                expect: Expect::Exit,
                devices: DeviceList::new(&[2]).unwrap(),
                dma: DmaMode::Strict,
                on_dma_fault: DmaFault::Report,
            },
            Domain {
                index: 1,
                name: "pong",
                image: "testdom",
                label: "guest_b",
                args: "role=pong count=10000",
                memory: 8 << 20,
                weight: 1000,
                expect: Expect::Exit,
                devices: DeviceList::new(&[1, 0]).unwrap(),
                dma: DmaMode::Static,
                on_dma_fault: DmaFault::Stop,
            },
            Domain {
                index: 2,
                name: "att-hvmem",
                image: "testdom",
                label: "attacker",
                args: "",
                memory: 1 << 20,
                weight: 2,
                expect: Expect::Fault,
                devices: DeviceList::EMPTY,
                dma: DmaMode::Static,
                on_dma_fault: DmaFault::Stop,
            },
        ]
    }

    fn channels() -> [Channel<'static>; 2] {
        [
            Channel {
                name: "pp",
                a: 0,
                b: 1,
            },
            Channel {
                name: "side_chan-2",
                a: 2,
                b: 0,
            },
        ]
    }

    fn watches() -> [Watch<'static>; 2] {
        [
            Watch {
                name: "hv",
                target: WatchTarget::Phys(0x10_0000),
                len: 4096,
            },
            Watch {
                name: "pong-mem",
                target: WatchTarget::Domain(1),
                len: 8 << 20,
            },
        ]
    }

    fn vbds() -> [Vbd<'static>; 2] {
        [
            Vbd {
                name: "xvda",
                frontend: 0,
                backend: 1,
                first_sector: 0,
                sectors: 4096,
                readonly: false,
                mode: VbdMode::Map,
            },
            Vbd {
                name: "xvda",
                frontend: 2,
                backend: 1,
                first_sector: 4096,
                sectors: 2048,
                readonly: true,
                mode: VbdMode::Copy,
            },
        ]
    }

    fn allows() -> [Allow<'static>; 2] {
        [
            Allow {
                subject: "guest_b",
                object: "guest_a",
                perms: perm::GRANT_MAP_READ | perm::GRANT_MAP_WRITE,
            },
            Allow {
                subject: "guest_b",
                object: "attacker",
                perms: perm::GRANT_COPY,
            },
        ]
    }

    const SIZE: usize = encoded_size(3, 3, 2, 2, 2, 2, 2);
    /// Where domain `i`'s, channel `i`'s, watch `i`'s, vbd `i`'s and allow
    /// `i`'s records start in `good()`.
    const fn dom(i: usize) -> usize {
        HEADER_SIZE + 3 * DEVICE_SIZE + i * DOMAIN_SIZE
    }
    const fn chan(i: usize) -> usize {
        dom(3) + i * CHANNEL_SIZE
    }
    const fn watch(i: usize) -> usize {
        chan(2) + i * WATCH_SIZE
    }
    const fn vbd(i: usize) -> usize {
        watch(2) + i * VBD_SIZE
    }
    const fn allow(i: usize) -> usize {
        vbd(2) + i * ALLOW_SIZE
    }
    const fn vif(i: usize) -> usize {
        allow(2) + i * VIF_SIZE
    }

    fn vifs() -> [Vif<'static>; 2] {
        [
            Vif {
                name: "eth0",
                frontend: 0,
                backend: 1,
                mac: [2, 0, 0, 0, 0, 1],
                ip: [10, 0, 0, 1],
            },
            Vif {
                name: "eth0",
                frontend: 2,
                backend: 1,
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                ip: [10, 0, 0, 2],
            },
        ]
    }

    fn good() -> Vec<u8> {
        let mut buf = vec![0xa5; SIZE];
        let (d, doms, ch, w, v, a, f) = (
            devices(),
            domains(),
            channels(),
            watches(),
            vbds(),
            allows(),
            vifs(),
        );
        let c = Contents {
            name: "default",
            exit: ExitRule::AllExited,
            devices: &d,
            domains: &doms,
            channels: &ch,
            watches: &w,
            vbds: &v,
            allows: &a,
            vifs: &f,
        };
        assert_eq!(c.size(), SIZE);
        assert_eq!(encode(&c, &mut buf), Ok(SIZE));
        buf
    }

    fn err(edit: impl FnOnce(&mut Vec<u8>)) -> ManifestError {
        let mut b = good();
        edit(&mut b);
        Manifest::parse(&b).unwrap_err()
    }

    #[test]
    fn round_trip() {
        let buf = good();
        assert_eq!(SIZE, 80 + 24 + 768 + 64 + 96 + 80 + 144 + 80);
        let m = Manifest::parse(&buf).unwrap();
        assert_eq!(m.name(), "default");
        assert_eq!(m.exit_rule(), ExitRule::AllExited);
        assert_eq!(m.device_count(), 3);
        assert_eq!(m.devices().collect::<Vec<_>>(), devices());
        let blk = m.device_at(Bdf::new(0, 3, 0)).unwrap();
        assert_eq!(
            (blk.kind, blk.vendor, blk.device),
            (DeviceKind::VirtioBlk, 0x1af4, 0x1042)
        );
        assert!(m.device_at(Bdf::new(0, 6, 0)).is_none());
        assert_eq!(m.domain_count(), 3);
        assert_eq!(m.domains().collect::<Vec<_>>(), domains());
        assert_eq!(m.domain(1), Some(domains()[1]));
        assert_eq!(m.domain(3), None);
        assert_eq!(m.domain_named("att-hvmem").unwrap().index, 2);
        assert_eq!(m.domain_named("nope"), None);
        assert_eq!(m.channel_count(), 2);
        assert_eq!(m.channels().collect::<Vec<_>>(), channels());
        // The layout the module doc gives, byte for byte.
        let d = &buf[dom(1)..dom(2)];
        assert_eq!(le::u64_at(d, 0), 8 << 20);
        assert_eq!(le::u16_at(d, 8), 1000);
        assert_eq!(le::u16_at(d, 10), Expect::Exit.code());
        assert_eq!(&d[12..16], &[4, 7, 7, 21]);
        assert_eq!(&d[16..20], b"pong");
        assert_eq!(&d[48..55], b"testdom");
        assert_eq!(&d[80..87], b"guest_b");
        assert_eq!(&d[112..133], b"role=pong count=10000");
        let c = &buf[chan(1)..];
        assert_eq!((le::u16_at(c, 0), le::u16_at(c, 2), c[4]), (2, 0, 11));
        assert_eq!(&c[8..19], b"side_chan-2");
        assert_eq!(
            (
                le::u16_at(&buf, 58),
                le::u16_at(&buf, 60),
                le::u16_at(&buf, 62)
            ),
            (256, 32, 2)
        );
        // No devices or domains at all is a valid (if dull) system.
        let mut buf = vec![0; encoded_size(0, 0, 0, 0, 0, 0, 0)];
        enc("x", ExitRule::Never, &[], &[], &[], &[], &mut buf).unwrap();
        let m = Manifest::parse(&buf).unwrap();
        assert_eq!((m.device_count(), m.exit_rule()), (0, ExitRule::Never));
        assert_eq!((m.domains().count(), m.channels().count()), (0, 0));
    }

    #[test]
    fn limits_round_trip() {
        // The most domains, each an end of the most channels, with the
        // longest strings and the extreme sizes and weights.
        let names: Vec<std::string::String> =
            (0..MAX_DOMAINS).map(|i| std::format!("{i:0>32}")).collect();
        let args = "~".repeat(ARGS_MAX);
        let doms: Vec<Domain<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Domain {
                index: i as u16,
                name: n,
                image: n,
                label: n,
                args: &args,
                memory: if i % 2 == 0 {
                    DOMAIN_MEMORY_MIN
                } else {
                    DOMAIN_MEMORY_MAX
                },
                weight: if i % 2 == 0 { 1 } else { WEIGHT_MAX },
                expect: Expect::Fault,
                devices: DeviceList::EMPTY,
                dma: DmaMode::Strict,
                on_dma_fault: DmaFault::Report,
            })
            .collect();
        let cnames: Vec<std::string::String> = (0..MAX_CHANNELS)
            .map(|i| std::format!("{i:0>24}"))
            .collect();
        // Channel k joins k % 17 and (k % 17 + 1 + k / 17) % 17: each
        // domain gets 8 as `a` and 8 as `b`.
        let n = MAX_DOMAINS;
        let chans: Vec<Channel<'_>> = cnames
            .iter()
            .enumerate()
            .map(|(k, name)| Channel {
                name,
                a: (k % n) as u16,
                b: ((k % n + 1 + k / n) % n) as u16,
            })
            .collect();
        let mut buf = vec![0; encoded_size(0, n, MAX_CHANNELS, 0, 0, 0, 0)];
        enc(
            "max",
            ExitRule::AllExited,
            &[],
            &doms,
            &chans,
            &[],
            &mut buf,
        )
        .unwrap();
        let m = Manifest::parse(&buf).unwrap();
        assert_eq!(m.domains().collect::<Vec<_>>(), doms);
        assert_eq!(m.channels().collect::<Vec<_>>(), chans);
    }

    #[test]
    fn kinds_round_trip_and_have_qemus_ids() {
        for k in DeviceKind::ALL {
            assert_eq!(DeviceKind::from_code(k.code()), Some(k));
            assert_eq!(DeviceKind::from_name(k.name()), Some(k));
        }
        assert_eq!(DeviceKind::VirtioBlk.pci_ids(), (0x1af4, 0x1042));
        assert_eq!(DeviceKind::VirtioNet.pci_ids(), (0x1af4, 0x1041));
        assert_eq!(DeviceKind::VirtioGpu.pci_ids(), (0x1af4, 0x1050));
        assert_eq!(DeviceKind::VirtioKeyboard.pci_ids(), (0x1af4, 0x1052));
        assert_eq!(DeviceKind::VirtioTablet.pci_ids(), (0x1af4, 0x1052));
        assert_eq!(DeviceKind::Edu.pci_ids(), (0x1234, 0x11e8));
        assert_eq!(DeviceKind::from_name("virtio-foo"), None);
        for r in ExitRule::ALL {
            assert_eq!(ExitRule::from_code(r.code()), Some(r));
            assert_eq!(ExitRule::from_name(r.name()), Some(r));
        }
        assert_eq!(ExitRule::from_name("all-exited"), Some(ExitRule::AllExited));
        for e in Expect::ALL {
            assert_eq!(Expect::from_code(e.code()), Some(e));
            assert_eq!(Expect::from_name(e.name()), Some(e));
        }
        assert_eq!(Expect::from_code(0), None);
    }

    #[test]
    fn each_header_corruption_is_named() {
        use ManifestError::*;
        let g = good();
        assert_eq!(Manifest::parse(&g[..63]), Err(TruncatedHeader { len: 63 }));
        assert!(matches!(err(|b| b[1] = 0), BadMagic { .. }));
        assert_eq!(err(|b| b[8] = 1), UnknownVersion { found: 1 });
        assert_eq!(err(|b| b[10] = 32), BadHeaderSize { found: 32 });
        assert_eq!(err(|b| b[12] = 16), BadDeviceSize { found: 16 });
        assert_eq!(err(|b| b[58] = 16), BadDomainSize { found: 272 });
        assert_eq!(err(|b| b[64] = 47), BadWatchSize { found: 47 });
        assert_eq!(err(|b| b[66] = 17), TooManyWatches { count: 17 });
        assert_eq!(err(|b| b[76] = 41), BadVifSize { found: 41 });
        assert_eq!(err(|b| b[79] = 1), TooManyVifs { count: 0x102 });
        assert_eq!(err(|b| b[60] = 33), BadChannelSize { found: 33 });
        assert_eq!(err(|b| b[15] = 2), TooManyDevices { count: 0x203 });
        assert_eq!(err(|b| b[16] = 18), TooManyDomains { count: 18 });
        assert_eq!(err(|b| b[62] = 137), TooManyChannels { count: 137 });
        let n = SIZE as u32;
        assert_eq!(
            err(|b| b[14] = 4),
            SizeMismatch {
                declared: n,
                expected: SIZE + 8,
                len: SIZE
            }
        );
        assert_eq!(
            err(|b| b[16] = 2),
            SizeMismatch {
                declared: n,
                expected: SIZE - 256,
                len: SIZE
            }
        );
        assert_eq!(
            err(|b| b[62] = 3),
            SizeMismatch {
                declared: n,
                expected: SIZE + 32,
                len: SIZE
            }
        );
        assert_eq!(
            err(|b| b[20] = b[20].wrapping_add(1)),
            SizeMismatch {
                declared: n + 1,
                expected: SIZE,
                len: SIZE
            }
        );
        assert_eq!(
            err(|b| b.push(0)),
            SizeMismatch {
                declared: n,
                expected: SIZE,
                len: SIZE + 1
            }
        );
        assert_eq!(err(|b| b[18] = 7), UnknownExitRule { code: 7 });
        assert_eq!(err(|b| b[24] = 0), EmptyName);
        assert_eq!(err(|b| b[24] = 33), NameTooLong { len: 33 });
        assert_eq!(err(|b| b[25] = 0xc3), NameNotUtf8);
        assert_eq!(err(|b| b[57] = 1), ReservedNotZero);
        assert_eq!(err(|b| b[56] = 1), ReservedNotZero);
        // all-exited with no domains.
        let mut buf = vec![0; encoded_size(0, 0, 0, 0, 0, 0, 0)];
        enc("x", ExitRule::Never, &[], &[], &[], &[], &mut buf).unwrap();
        buf[18] = ExitRule::AllExited.code() as u8;
        assert_eq!(Manifest::parse(&buf), Err(AllExitedWithoutDomains));
    }

    #[test]
    fn each_device_corruption_is_named() {
        use ManifestError::*;
        assert_eq!(
            err(|b| b[HEADER_SIZE + 8] = 9),
            UnknownDeviceKind { index: 1, code: 9 }
        );
        assert_eq!(
            err(|b| b[HEADER_SIZE + 8 + 6] = 0x42),
            IdsDoNotMatchKind {
                index: 1,
                kind: DeviceKind::VirtioNet,
                vendor: 0x1af4,
                device: 0x1042
            }
        );
        assert_eq!(
            err(|b| b[HEADER_SIZE + 16 + 2] = 0x18),
            DuplicateAddress {
                first: 0,
                index: 2,
                bdf: Bdf::new(0, 3, 0)
            }
        );
    }

    #[test]
    fn each_domain_corruption_is_named() {
        use ManifestError::*;
        let bad = |i: u16, field, problem| BadString {
            record: Record::Domain(i),
            field,
            problem,
        };
        let d = dom(1);
        // Memory: range and pages.
        let put64 = |b: &mut Vec<u8>, at: usize, v: u64| le::put(b, at, &v.to_le_bytes());
        assert_eq!(
            err(|b| put64(b, d, (1 << 20) - 4096)),
            MemoryOutOfRange {
                index: 1,
                bytes: (1 << 20) - 4096
            }
        );
        assert_eq!(
            err(|b| put64(b, d, (64 << 20) + 4096)),
            MemoryOutOfRange {
                index: 1,
                bytes: (64 << 20) + 4096
            }
        );
        assert_eq!(
            err(|b| put64(b, d, 0)),
            MemoryOutOfRange { index: 1, bytes: 0 }
        );
        assert_eq!(
            err(|b| put64(b, d, (4 << 20) + 512)),
            MemoryNotPages {
                index: 1,
                bytes: (4 << 20) + 512
            }
        );
        // Weight and expect.
        assert_eq!(
            err(|b| b[d + 8..d + 10].copy_from_slice(&0u16.to_le_bytes())),
            BadWeight {
                index: 1,
                weight: 0
            }
        );
        assert_eq!(
            err(|b| b[d + 8..d + 10].copy_from_slice(&1001u16.to_le_bytes())),
            BadWeight {
                index: 1,
                weight: 1001
            }
        );
        assert_eq!(err(|b| b[d + 10] = 3), UnknownExpect { index: 1, code: 3 });
        // Strings: each rule, on each field.
        assert_eq!(err(|b| b[d + 12] = 0), bad(1, "name", StrProblem::Empty));
        assert_eq!(
            err(|b| b[d + 12] = 33),
            bad(1, "name", StrProblem::TooLong { len: 33, max: 32 })
        );
        assert_eq!(
            err(|b| b[d + 16] = b'P'),
            bad(1, "name", StrProblem::BadChar { at: 0 })
        );
        assert_eq!(
            err(|b| b[d + 17] = 0xc3),
            bad(1, "name", StrProblem::NotUtf8)
        );
        assert_eq!(
            err(|b| b[d + 16 + 31] = b'x'),
            bad(1, "name", StrProblem::PaddingNotZero)
        );
        assert_eq!(err(|b| b[d + 13] = 0), bad(1, "image", StrProblem::Empty));
        assert_eq!(
            err(|b| b[d + 48 + 3] = b'.'),
            bad(1, "image", StrProblem::BadChar { at: 3 })
        );
        assert_eq!(
            err(|b| b[d + 14] = 40),
            bad(1, "label", StrProblem::TooLong { len: 40, max: 32 })
        );
        assert_eq!(
            err(|b| b[d + 80] = b' '),
            bad(1, "label", StrProblem::BadChar { at: 0 })
        );
        assert_eq!(
            err(|b| b[d + 15] = 129),
            bad(1, "args", StrProblem::TooLong { len: 129, max: 128 })
        );
        assert_eq!(
            err(|b| b[d + 112 + 4] = b'\n'),
            bad(1, "args", StrProblem::BadChar { at: 4 })
        );
        assert_eq!(
            err(|b| b[d + 112 + 127] = b'x'),
            bad(1, "args", StrProblem::PaddingNotZero)
        );
        // Empty args are fine (domain 2 has them).
        assert_eq!(
            Manifest::parse(&good()).unwrap().domain(2).unwrap().args,
            ""
        );
        // A duplicate name.
        assert_eq!(
            err(|b| {
                b.copy_within(dom(0) + 12..dom(0) + 13, dom(2) + 12);
                b.copy_within(dom(0) + 16..dom(0) + 48, dom(2) + 16);
            }),
            DuplicateDomain { first: 0, index: 2 }
        );
    }

    #[test]
    fn each_channel_corruption_is_named() {
        use ManifestError::*;
        let c = chan(1);
        assert_eq!(
            err(|b| b[c + 4] = 0),
            BadString {
                record: Record::Channel(1),
                field: "name",
                problem: StrProblem::Empty
            }
        );
        assert_eq!(
            err(|b| b[c + 4] = 25),
            BadString {
                record: Record::Channel(1),
                field: "name",
                problem: StrProblem::TooLong { len: 25, max: 24 }
            }
        );
        assert_eq!(
            err(|b| b[c + 8] = b'/'),
            BadString {
                record: Record::Channel(1),
                field: "name",
                problem: StrProblem::BadChar { at: 0 }
            }
        );
        assert_eq!(err(|b| b[c + 6] = 1), ChannelReservedNotZero { index: 1 });
        assert_eq!(
            err(|b| b[c] = 3),
            ChannelEndOutOfRange {
                index: 1,
                domain: 3,
                count: 3
            }
        );
        assert_eq!(
            err(|b| b[c + 3] = 1),
            ChannelEndOutOfRange {
                index: 1,
                domain: 256,
                count: 3
            }
        );
        assert_eq!(
            err(|b| b[c + 2] = 2),
            ChannelToItself {
                index: 1,
                domain: 2
            }
        );
        assert_eq!(
            err(|b| {
                b[c + 4] = 2;
                b[c + 8..c + 32].fill(0);
                b[c + 8..c + 10].copy_from_slice(b"pp");
            }),
            DuplicateChannel { first: 0, index: 1 }
        );
    }

    #[test]
    fn a_domain_with_too_many_ports() {
        // Domain 0 joined to domain 1 by 17 channels.
        let d = domains();
        let names: Vec<std::string::String> =
            (0..=MAX_PORTS).map(|i| std::format!("c{i}")).collect();
        let chans: Vec<Channel<'_>> = names
            .iter()
            .map(|name| Channel { name, a: 0, b: 1 })
            .collect();
        let mut buf = vec![0; encoded_size(3, 3, chans.len(), 0, 0, 0, 0)];
        assert_eq!(
            enc(
                "x",
                ExitRule::AllExited,
                &devices(),
                &d,
                &chans,
                &[],
                &mut buf
            ),
            Err(EncodeError::Invalid(ManifestError::TooManyPorts {
                domain: 0,
                channel: 16
            }))
        );
        assert!(enc(
            "x",
            ExitRule::AllExited,
            &devices(),
            &d,
            &chans[..16],
            &[],
            &mut buf
        )
        .is_ok());
    }

    #[test]
    fn devices_dma_and_watches_round_trip() {
        let buf = good();
        let m = Manifest::parse(&buf).unwrap();
        let ping = m.domain(0).unwrap();
        assert_eq!(ping.devices.as_slice(), [2]);
        assert_eq!(
            (ping.dma, ping.on_dma_fault),
            (DmaMode::Strict, DmaFault::Report)
        );
        let pong = m.domain(1).unwrap();
        assert_eq!(pong.devices.iter().collect::<Vec<_>>(), [1, 0]);
        assert_eq!(
            (pong.dma, pong.on_dma_fault),
            (DmaMode::Static, DmaFault::Stop)
        );
        assert!(m.domain(2).unwrap().devices.is_empty());
        assert_eq!(m.device_owner(0).unwrap().name, "pong");
        assert_eq!(m.device_owner(2).unwrap().name, "ping");
        assert_eq!(m.device(2).unwrap().kind, DeviceKind::Edu);
        assert_eq!(m.device(3), None);
        assert_eq!(m.watch_count(), 2);
        assert_eq!(m.watches().collect::<Vec<_>>(), watches());
        // The layout the module doc gives.
        let d = &buf[dom(1)..dom(2)];
        assert_eq!(
            &d[240..256],
            &[1, 1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let w = &buf[watch(0)..watch(1)];
        assert_eq!(
            (w[0], w[1], le::u64_at(w, 8), le::u64_at(w, 16)),
            (1, 2, 0x10_0000, 4096)
        );
        assert_eq!(&w[24..26], b"hv");
        let w = &buf[watch(1)..];
        assert_eq!((w[0], le::u16_at(w, 2), le::u64_at(w, 8)), (2, 1, 0));
        assert_eq!((le::u16_at(&buf, 64), le::u16_at(&buf, 66)), (48, 2));
        assert_eq!(DeviceList::new(&[0, 1, 2, 3, 4]), None);
        for m in DMA_MODES {
            assert_eq!(dma_mode_from_code(dma_mode_code(m)), Some(m));
            assert_eq!(dma_mode_from_name(dma_mode_name(m)), Some(m));
        }
        for f in DmaFault::ALL {
            assert_eq!(DmaFault::from_code(f.code()), Some(f));
            assert_eq!(DmaFault::from_name(f.name()), Some(f));
        }
    }

    #[test]
    fn each_device_assignment_corruption_is_named() {
        use ManifestError::*;
        let d = dom(1);
        assert_eq!(
            err(|b| b[dom(0) + 240] = 3),
            UnknownDmaMode { index: 0, code: 3 }
        );
        assert_eq!(
            err(|b| b[d + 241] = 0),
            UnknownDmaFault { index: 1, code: 0 }
        );
        assert_eq!(
            err(|b| b[d + 242] = 5),
            TooManyDomainDevices { index: 1, count: 5 }
        );
        assert_eq!(err(|b| b[d + 243] = 1), DomainReservedNotZero { index: 1 });
        assert_eq!(err(|b| b[d + 250] = 1), DomainReservedNotZero { index: 1 });
        assert_eq!(err(|b| b[d + 255] = 1), DomainReservedNotZero { index: 1 });
        assert_eq!(
            err(|b| b[d + 244] = 3),
            DomainDeviceOutOfRange {
                index: 1,
                device: 3,
                count: 3
            }
        );
        assert_eq!(
            err(|b| b[d + 244] = 0),
            DomainDeviceListedTwice {
                index: 1,
                device: 0
            }
        );
        // Domain 1 takes domain 0's edu too.
        assert_eq!(
            err(|b| {
                b[d + 242] = 3;
                b[d + 248] = 2;
            }),
            DeviceAssignedTwice {
                device: 2,
                first: 0,
                index: 1
            }
        );
        let e = err(|b| {
            b[d + 242] = 3;
            b[d + 248] = 2;
        });
        assert_eq!(
            e.to_string(),
            "domain 1: device 2 is already assigned to domain 0"
        );
    }

    #[test]
    fn each_watch_corruption_is_named() {
        use ManifestError::*;
        let (w0, w1) = (watch(0), watch(1));
        let put64 = |b: &mut Vec<u8>, at: usize, v: u64| le::put(b, at, &v.to_le_bytes());
        assert_eq!(err(|b| b[w0] = 3), UnknownWatchKind { index: 0, code: 3 });
        assert_eq!(
            err(|b| b[w0 + 1] = 0),
            BadString {
                record: Record::Watch(0),
                field: "name",
                problem: StrProblem::Empty
            }
        );
        assert_eq!(
            err(|b| b[w1 + 24] = b'P'),
            BadString {
                record: Record::Watch(1),
                field: "name",
                problem: StrProblem::BadChar { at: 0 }
            }
        );
        assert_eq!(err(|b| b[w0 + 2] = 1), WatchReservedNotZero { index: 0 });
        assert_eq!(err(|b| b[w1 + 8] = 1), WatchReservedNotZero { index: 1 });
        assert_eq!(err(|b| b[w1 + 5] = 1), WatchReservedNotZero { index: 1 });
        assert_eq!(
            err(|b| put64(b, w0 + 16, 0)),
            BadWatchLen { index: 0, len: 0 }
        );
        assert_eq!(
            err(|b| put64(b, w0 + 16, WATCH_LEN_MAX + 1)),
            BadWatchLen {
                index: 0,
                len: WATCH_LEN_MAX + 1
            }
        );
        assert_eq!(
            err(|b| put64(b, w0 + 8, WATCH_PHYS_LIMIT - 4095)),
            WatchPastPhysLimit {
                index: 0,
                addr: WATCH_PHYS_LIMIT - 4095,
                len: 4096
            }
        );
        assert_eq!(
            err(|b| put64(b, w0 + 8, u64::MAX)),
            WatchPastPhysLimit {
                index: 0,
                addr: u64::MAX,
                len: 4096
            }
        );
        assert_eq!(
            err(|b| b[w1 + 2] = 3),
            WatchDomainOutOfRange {
                index: 1,
                domain: 3,
                count: 3
            }
        );
        assert_eq!(
            err(|b| put64(b, w1 + 16, (8 << 20) + 1)),
            WatchPastDomain {
                index: 1,
                domain: 1,
                len: (8 << 20) + 1,
                memory: 8 << 20
            }
        );
        assert_eq!(
            err(|b| {
                b[w1 + 1] = 2;
                b[w1 + 24..w1 + 48].fill(0);
                b[w1 + 24..w1 + 26].copy_from_slice(b"hv");
            }),
            DuplicateWatch { first: 0, index: 1 }
        );
        let long = "w".repeat(25);
        let mut buf = [0u8; 4096];
        assert!(matches!(
            enc(
                "x",
                ExitRule::Never,
                &[],
                &[],
                &[],
                &[Watch {
                    name: &long,
                    target: WatchTarget::Phys(0),
                    len: 1
                }],
                &mut buf
            ),
            Err(EncodeError::TooLong {
                what: "watch name",
                ..
            })
        ));
    }

    #[test]
    fn vbds_and_allows_round_trip() {
        let buf = good();
        let m = Manifest::parse(&buf).unwrap();
        assert_eq!(m.vbd_count(), 2);
        assert_eq!(m.vbds().collect::<Vec<_>>(), vbds());
        assert_eq!(m.vbds_of(1).count(), 2);
        assert_eq!(m.vbds_of(0).collect::<Vec<_>>(), [vbds()[0]]);
        assert_eq!(m.vbds_of(2).collect::<Vec<_>>(), [vbds()[1]]);
        assert_eq!(vbds()[1].disk_range(), 4096..6144);
        assert_eq!(m.allow_count(), 2);
        assert_eq!(m.allows().collect::<Vec<_>>(), allows());
        assert_eq!(m.perms("guest_b", "guest_a"), 3);
        assert!(m.allowed("guest_b", "guest_a", perm::GRANT_MAP_READ));
        assert!(m.allowed(
            "guest_b",
            "guest_a",
            perm::GRANT_MAP_READ | perm::GRANT_MAP_WRITE
        ));
        assert!(!m.allowed("guest_b", "guest_a", perm::GRANT_COPY));
        // Default deny, and rules have a direction.
        assert_eq!(m.perms("guest_a", "guest_b"), 0);
        assert!(!m.allowed("guest_a", "guest_b", perm::GRANT_MAP_READ));
        assert!(m.allowed("guest_b", "attacker", perm::GRANT_COPY));
        // The layout the module doc gives.
        assert_eq!(
            (
                le::u16_at(&buf, 68),
                le::u16_at(&buf, 70),
                le::u16_at(&buf, 72),
                le::u16_at(&buf, 74)
            ),
            (40, 2, 72, 2)
        );
        let v = &buf[vbd(1)..vbd(2)];
        assert_eq!((le::u16_at(v, 0), le::u16_at(v, 2)), (2, 1));
        assert_eq!(&v[4..8], &[4, 2, 1, 0]);
        assert_eq!((le::u64_at(v, 8), le::u64_at(v, 16)), (4096, 2048));
        assert_eq!(&v[24..28], b"xvda");
        let a = &buf[allow(1)..];
        assert_eq!(&a[..8], &[7, 8, 4, 0, 0, 0, 0, 0]);
        assert_eq!(&a[8..15], b"guest_b");
        assert_eq!(&a[40..48], b"attacker");
        for m in VBD_MODES {
            assert_eq!(vbd_mode_from_code(vbd_mode_code(m)), Some(m));
            assert_eq!(vbd_mode_from_name(vbd_mode_name(m)), Some(m));
        }
        // The start info uses the same mode codes.
        assert_eq!(
            (vbd_mode_code(VbdMode::Map), vbd_mode_code(VbdMode::Copy)),
            (1, 2)
        );
        let mut all = 0;
        for (bit, name) in perm::NAMES {
            assert_eq!(bit.count_ones(), 1);
            assert_eq!(perm::from_name(name), Some(bit));
            assert_eq!(perm::name(bit), Some(name));
            all |= bit;
        }
        assert_eq!(all, perm::ALL);
        assert_eq!(perm::from_name("grant_map"), None);
        assert_eq!(perm::name(3), None);
    }

    #[test]
    fn each_vbd_corruption_is_named() {
        use ManifestError::*;
        let (v0, v1) = (vbd(0), vbd(1));
        let put64 = |b: &mut Vec<u8>, at: usize, v: u64| le::put(b, at, &v.to_le_bytes());
        assert_eq!(err(|b| b[68] = 41), BadVbdSize { found: 41 });
        assert_eq!(err(|b| b[72] = 71), BadAllowSize { found: 71 });
        assert_eq!(err(|b| b[70] = 69), TooManyVbds { count: 69 });
        assert_eq!(err(|b| b[75] = 2), TooManyAllows { count: 0x202 });
        assert_eq!(
            err(|b| b[70] = 3),
            SizeMismatch {
                declared: SIZE as u32,
                expected: SIZE + VBD_SIZE,
                len: SIZE
            }
        );
        assert_eq!(
            err(|b| b[v0 + 4] = 0),
            BadString {
                record: Record::Vbd(0),
                field: "name",
                problem: StrProblem::Empty
            }
        );
        assert_eq!(
            err(|b| b[v1 + 4] = 17),
            BadString {
                record: Record::Vbd(1),
                field: "name",
                problem: StrProblem::TooLong { len: 17, max: 16 }
            }
        );
        assert_eq!(
            err(|b| b[v1 + 24] = b'X'),
            BadString {
                record: Record::Vbd(1),
                field: "name",
                problem: StrProblem::BadChar { at: 0 }
            }
        );
        assert_eq!(
            err(|b| b[v0] = 3),
            VbdEndOutOfRange {
                index: 0,
                domain: 3,
                count: 3
            }
        );
        assert_eq!(
            err(|b| b[v0 + 3] = 1),
            VbdEndOutOfRange {
                index: 0,
                domain: 257,
                count: 3
            }
        );
        assert_eq!(
            err(|b| b[v0] = 1),
            VbdToItself {
                index: 0,
                domain: 1
            }
        );
        assert_eq!(err(|b| b[v0 + 5] = 0), UnknownVbdMode { index: 0, code: 0 });
        assert_eq!(err(|b| b[v1 + 5] = 3), UnknownVbdMode { index: 1, code: 3 });
        assert_eq!(
            err(|b| b[v0 + 6] = 2),
            BadVbdReadonly { index: 0, value: 2 }
        );
        assert_eq!(err(|b| b[v1 + 7] = 1), VbdReservedNotZero { index: 1 });
        assert_eq!(err(|b| put64(b, v1 + 16, 0)), EmptyVbd { index: 1 });
        assert_eq!(
            err(|b| put64(b, v1 + 8, u64::MAX - 100)),
            VbdRangeWraps {
                index: 1,
                first_sector: u64::MAX - 100,
                sectors: 2048
            }
        );
        // Domain 0 owns only an edu: it serves no disk.
        assert_eq!(
            err(|b| {
                b[v1] = 1;
                b[v1 + 2] = 0;
            }),
            VbdBackendHasNoDisk {
                index: 1,
                backend: 0
            }
        );
        // Both vbds of one frontend, with one name.
        assert_eq!(err(|b| b[v1] = 0), DuplicateVbd { first: 0, index: 1 });
        // Overlapping ranges of one disk, once one of them is writable...
        assert_eq!(
            err(|b| put64(b, v1 + 8, 4095)),
            VbdsOverlap { first: 0, index: 1 }
        );
        assert_eq!(
            err(|b| {
                put64(b, v1 + 8, 0);
                b[v1 + 6] = 0;
            }),
            VbdsOverlap { first: 0, index: 1 }
        );
        // ...but two read-only ranges may share sectors, and touching
        // ranges do not overlap.
        let mut b = good();
        put64(&mut b, v1 + 8, 0);
        b[v0 + 6] = 1;
        assert!(Manifest::parse(&b).is_ok());
        let mut b = good();
        b[v1 + 6] = 0;
        assert!(Manifest::parse(&b).is_ok());
        let mut b = good();
        put64(&mut b, v1 + 8, 4095);
        b[v0 + 6] = 1;
        assert!(Manifest::parse(&b).is_ok());
        assert_eq!(
            err(|b| put64(b, v1 + 8, 4095)).to_string(),
            "vbd 1: its sectors overlap vbd 0's on the same disk, and not both are read-only"
        );
    }

    #[test]
    fn too_many_vbds_for_one_domain() {
        let names: Vec<std::string::String> = (0..=MAX_DOMAIN_VBDS)
            .map(|i| std::format!("xvd{i}"))
            .collect();
        let vs: Vec<Vbd<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, name)| Vbd {
                name,
                frontend: 0,
                backend: 1,
                first_sector: 100 * i as u64,
                sectors: 100,
                readonly: false,
                mode: VbdMode::Copy,
            })
            .collect();
        let (d, doms) = (devices(), domains());
        let mut c = Contents {
            devices: &d,
            domains: &doms,
            vbds: &vs,
            ..Contents::empty("x", ExitRule::AllExited)
        };
        let mut buf = vec![0; c.size()];
        assert_eq!(
            encode(&c, &mut buf),
            Err(EncodeError::Invalid(ManifestError::TooManyDomainVbds {
                domain: 0,
                vbd: 8
            }))
        );
        c.vbds = &vs[..MAX_DOMAIN_VBDS];
        assert!(encode(&c, &mut buf).is_ok());
        let long = "v".repeat(17);
        let v = [Vbd {
            name: &long,
            ..vbds()[0]
        }];
        c.vbds = &v;
        assert!(matches!(
            encode(&c, &mut buf),
            Err(EncodeError::TooLong {
                what: "vbd name",
                ..
            })
        ));
    }

    #[test]
    fn vifs_round_trip() {
        let buf = good();
        let m = Manifest::parse(&buf).unwrap();
        assert_eq!(m.vif_count(), 2);
        assert_eq!(m.vifs().collect::<Vec<_>>(), vifs());
        assert_eq!(m.vifs_of(1).count(), 2);
        assert_eq!(m.vifs_of(0).collect::<Vec<_>>(), [vifs()[0]]);
        assert_eq!(m.vifs_of(2).collect::<Vec<_>>(), [vifs()[1]]);
        // The layout the module doc gives.
        assert_eq!((le::u16_at(&buf, 76), le::u16_at(&buf, 78)), (40, 2));
        let v = &buf[vif(1)..];
        assert_eq!(v.len(), VIF_SIZE);
        assert_eq!((le::u16_at(v, 0), le::u16_at(v, 2)), (2, 1));
        assert_eq!(&v[4..8], &[4, 0, 0, 0]);
        assert_eq!(&v[8..16], &[0x52, 0x54, 0, 0x12, 0x34, 0x56, 0, 0]);
        assert_eq!(&v[16..24], &[10, 0, 0, 2, 0, 0, 0, 0]);
        assert_eq!(&v[24..29], b"eth0\0");
        // What a vif may be.
        assert!(vif_mac_ok([2, 0, 0, 0, 0, 1]));
        assert!(!vif_mac_ok([1, 0, 0x5e, 0, 0, 1]));
        assert!(!vif_mac_ok([0xff; 6]));
        assert!(!vif_mac_ok([0; 6]));
        assert!(vif_ip_ok([10, 0, 0, 1]) && vif_ip_ok([192, 168, 1, 255]));
        for bad in [
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [224, 0, 0, 1],
            [255; 4],
            [240, 1, 2, 3],
        ] {
            assert!(!vif_ip_ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn each_vif_corruption_is_named() {
        use ManifestError::*;
        let (f0, f1) = (vif(0), vif(1));
        assert_eq!(
            err(|b| b[78] = 3),
            SizeMismatch {
                declared: SIZE as u32,
                expected: SIZE + VIF_SIZE,
                len: SIZE
            }
        );
        assert_eq!(
            err(|b| b[f0 + 4] = 0),
            BadString {
                record: Record::Vif(0),
                field: "name",
                problem: StrProblem::Empty
            }
        );
        assert_eq!(
            err(|b| b[f1 + 4] = 17),
            BadString {
                record: Record::Vif(1),
                field: "name",
                problem: StrProblem::TooLong { len: 17, max: 16 }
            }
        );
        assert_eq!(
            err(|b| b[f1 + 24] = b'E'),
            BadString {
                record: Record::Vif(1),
                field: "name",
                problem: StrProblem::BadChar { at: 0 }
            }
        );
        assert_eq!(
            err(|b| b[f0] = 3),
            VifEndOutOfRange {
                index: 0,
                domain: 3,
                count: 3
            }
        );
        assert_eq!(
            err(|b| b[f1 + 3] = 1),
            VifEndOutOfRange {
                index: 1,
                domain: 257,
                count: 3
            }
        );
        assert_eq!(
            err(|b| b[f0] = 1),
            VifToItself {
                index: 0,
                domain: 1
            }
        );
        for at in [5, 6, 7, 14, 15, 20, 23] {
            assert_eq!(
                err(|b| b[f1 + at] = 1),
                VifReservedNotZero { index: 1 },
                "byte {at}"
            );
        }
        // Domain 0 owns only an edu: it has no NIC to serve from.
        assert_eq!(
            err(|b| {
                b[f1] = 1;
                b[f1 + 2] = 0;
            }),
            VifBackendHasNoNic {
                index: 1,
                backend: 0
            }
        );
        assert_eq!(
            err(|b| b[f1 + 8] = 3),
            BadVifMac {
                index: 1,
                mac: [3, 0x54, 0, 0x12, 0x34, 0x56]
            }
        );
        assert_eq!(
            err(|b| {
                b[f0 + 8] = 0;
                b[f0 + 13] = 0;
            }),
            BadVifMac {
                index: 0,
                mac: [0; 6]
            }
        );
        assert_eq!(
            err(|b| b[f1 + 16] = 127),
            BadVifIp {
                index: 1,
                ip: [127, 0, 0, 2]
            }
        );
        assert_eq!(
            err(|b| b[f0 + 16] = 0),
            BadVifIp {
                index: 0,
                ip: [0, 0, 0, 1]
            }
        );
        // Both vifs of one frontend, with one name.
        assert_eq!(err(|b| b[f1] = 0), DuplicateVif { first: 0, index: 1 });
        assert_eq!(
            err(|b| b[f1 + 8..f1 + 14].copy_from_slice(&[2, 0, 0, 0, 0, 1])),
            DuplicateVifMac { first: 0, index: 1 }
        );
        assert_eq!(
            err(|b| b[f1 + 19] = 1),
            DuplicateVifIp { first: 0, index: 1 }
        );
        assert_eq!(
            err(|b| b[f1 + 8] = 3).to_string(),
            "vif 1: MAC 03:54:00:12:34:56 is multicast or all zero"
        );
        assert_eq!(
            err(|b| b[f1 + 16] = 224).to_string(),
            "vif 1: IPv4 address 224.0.0.2 is not a unicast host address"
        );
    }

    #[test]
    fn too_many_vifs_for_one_domain() {
        let names: Vec<std::string::String> = (0..=MAX_DOMAIN_VIFS)
            .map(|i| std::format!("eth{i}"))
            .collect();
        let vs: Vec<Vif<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, name)| Vif {
                name,
                frontend: 0,
                backend: 1,
                mac: [2, 0, 0, 0, 0, i as u8 + 1],
                ip: [10, 0, 0, i as u8 + 1],
            })
            .collect();
        let (d, doms) = (devices(), domains());
        let mut c = Contents {
            devices: &d,
            domains: &doms,
            vifs: &vs,
            ..Contents::empty("x", ExitRule::AllExited)
        };
        let mut buf = vec![0; c.size()];
        assert_eq!(
            encode(&c, &mut buf),
            Err(EncodeError::Invalid(ManifestError::TooManyDomainVifs {
                domain: 0,
                vif: 8
            }))
        );
        c.vifs = &vs[..MAX_DOMAIN_VIFS];
        assert!(encode(&c, &mut buf).is_ok());
        let long = "v".repeat(17);
        let v = [Vif {
            name: &long,
            ..vifs()[0]
        }];
        c.vifs = &v;
        assert!(matches!(
            encode(&c, &mut buf),
            Err(EncodeError::TooLong {
                what: "vif name",
                ..
            })
        ));
    }

    #[test]
    fn each_allow_corruption_is_named() {
        use ManifestError::*;
        let (a0, a1) = (allow(0), allow(1));
        assert_eq!(err(|b| b[a0 + 2] = 0), NoPerms { index: 0 });
        assert_eq!(
            err(|b| b[a1 + 2] = 0x14),
            UnknownPerms {
                index: 1,
                perms: 0x14
            }
        );
        assert_eq!(err(|b| b[a1 + 7] = 1), AllowReservedNotZero { index: 1 });
        assert_eq!(
            err(|b| b[a0] = 0),
            BadString {
                record: Record::Allow(0),
                field: "subject",
                problem: StrProblem::Empty
            }
        );
        assert_eq!(
            err(|b| b[a0 + 1] = 33),
            BadString {
                record: Record::Allow(0),
                field: "object",
                problem: StrProblem::TooLong { len: 33, max: 32 }
            }
        );
        assert_eq!(
            err(|b| b[a0 + 40 + 7] = b'x'),
            BadString {
                record: Record::Allow(0),
                field: "object",
                problem: StrProblem::PaddingNotZero
            }
        );
        // "guest_c" is nobody's label.
        assert_eq!(
            err(|b| b[a0 + 14] = b'c'),
            AllowUnknownLabel {
                index: 0,
                field: "subject"
            }
        );
        assert_eq!(
            err(|b| b[a1 + 40] = b'b'),
            AllowUnknownLabel {
                index: 1,
                field: "object"
            }
        );
        // Allow 1 made a second guest_b -> guest_a rule.
        assert_eq!(
            err(|b| {
                b[a1 + 1] = 7;
                b[a1 + 40..a1 + 72].fill(0);
                b[a1 + 40..a1 + 47].copy_from_slice(b"guest_a");
            }),
            DuplicateAllow { first: 0, index: 1 }
        );
        assert_eq!(
            err(|b| b[a0 + 2] = 0x14 | 1).to_string(),
            "allow 0: permission bits 0x15 outside 0x0f"
        );
        // A label may be its own object (two domains of one label).
        let a = [Allow {
            subject: "guest_a",
            object: "guest_a",
            perms: perm::ALL,
        }];
        let (d, doms) = (devices(), domains());
        let c = Contents {
            devices: &d,
            domains: &doms,
            allows: &a,
            ..Contents::empty("x", ExitRule::AllExited)
        };
        let mut buf = vec![0; c.size()];
        encode(&c, &mut buf).unwrap();
        assert!(Manifest::parse(&buf)
            .unwrap()
            .allowed("guest_a", "guest_a", perm::EVENT_BIND));
    }

    #[test]
    fn errors_display_their_check() {
        let e = err(|b| b[HEADER_SIZE + 16 + 2] = 0x18);
        assert_eq!(
            e.to_string(),
            "device 2: address 00:03.0 already used by device 0"
        );
        let e = err(|b| b[HEADER_SIZE + 8 + 6] = 0x42);
        assert_eq!(
            e.to_string(),
            "device 1 (virtio-net): ids 1af4:1042, the kind has 1af4:1041"
        );
        let e = err(|b| b[dom(1) + 80] = b' ');
        assert_eq!(
            e.to_string(),
            "domain 1: label: a character outside its alphabet at 0"
        );
        let e = err(|b| b[chan(0) + 2] = 0);
        assert_eq!(e.to_string(), "channel 0: both ends are domain 0");
        let e = err(|b| b[dom(0) + 8] = 0);
        assert_eq!(e.to_string(), "domain 0: weight 0 is outside 1..=1000");
    }

    #[test]
    fn encode_refuses_what_parse_would() {
        use EncodeError::*;
        use ManifestError as M;
        let mut buf = [0u8; 2048];
        let d = devices();
        let doms = domains();
        let ch = channels();
        assert_eq!(
            enc("", ExitRule::Never, &d, &[], &[], &[], &mut buf),
            Err(Invalid(M::EmptyName))
        );
        let long = "n".repeat(33);
        assert_eq!(
            enc(&long, ExitRule::Never, &d, &[], &[], &[], &mut buf),
            Err(TooLong {
                what: "system name",
                index: 0,
                len: 33,
                max: 32
            })
        );
        let dup = [d[0], d[0]];
        assert!(matches!(
            enc("x", ExitRule::Never, &dup, &[], &[], &[], &mut buf),
            Err(Invalid(M::DuplicateAddress {
                first: 0,
                index: 1,
                ..
            }))
        ));
        let bad = [Device { vendor: 1, ..d[0] }];
        assert!(matches!(
            enc("x", ExitRule::Never, &bad, &[], &[], &[], &mut buf),
            Err(Invalid(M::IdsDoNotMatchKind { index: 0, .. }))
        ));
        assert_eq!(
            enc("x", ExitRule::Never, &d, &[], &[], &[], &mut buf[..70]),
            Err(BufferTooSmall {
                need: 104,
                have: 70
            })
        );
        assert_eq!(
            enc("x", ExitRule::AllExited, &d, &[], &[], &[], &mut buf),
            Err(Invalid(M::AllExitedWithoutDomains))
        );
        let mut wrong = doms;
        wrong[1].index = 0;
        assert_eq!(
            enc("x", ExitRule::AllExited, &d, &wrong, &ch, &[], &mut buf),
            Err(WrongIndex {
                position: 1,
                index: 0
            })
        );
        let mut wrong = doms;
        let args = "a".repeat(129);
        wrong[2].args = &args;
        assert_eq!(
            enc("x", ExitRule::AllExited, &d, &wrong, &ch, &[], &mut buf),
            Err(TooLong {
                what: "domain args",
                index: 2,
                len: 129,
                max: 128
            })
        );
        let mut wrong = doms;
        wrong[2].name = "ping";
        assert_eq!(
            enc("x", ExitRule::AllExited, &d, &wrong, &ch, &[], &mut buf),
            Err(Invalid(M::DuplicateDomain { first: 0, index: 2 }))
        );
        let mut wrong = doms;
        wrong[0].memory = 3 << 30;
        assert!(matches!(
            enc("x", ExitRule::AllExited, &d, &wrong, &ch, &[], &mut buf),
            Err(Invalid(M::MemoryOutOfRange { index: 0, .. }))
        ));
        let mut wrong = ch;
        wrong[1].b = 7;
        assert!(matches!(
            enc("x", ExitRule::AllExited, &d, &doms, &wrong, &[], &mut buf),
            Err(Invalid(M::ChannelEndOutOfRange { index: 1, .. }))
        ));
        let long = "c".repeat(25);
        let wrong = [Channel {
            name: &long,
            a: 0,
            b: 1,
        }];
        assert!(matches!(
            enc("x", ExitRule::AllExited, &d, &doms, &wrong, &[], &mut buf),
            Err(TooLong {
                what: "channel name",
                ..
            })
        ));
    }
}
