//! The compiled manifest: what the host's TOML manifest says, in a fixed
//! binary form the hypervisor reads without a parser (it never sees TOML).
//!
//! `cargo xtask` checks `manifests/*.toml`, then [`encode`]s the result; the
//! bundle carries it as its entry of kind manifest, and the bundle's CRC
//! protects it, so it has no checksum of its own.
//!
//! Header (version 1), little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0  | 8  | magic `b"AIRLOCKM"` |
//! | 8  | 2  | format version, 1 |
//! | 10 | 2  | header size, 64 |
//! | 12 | 2  | device record size, 8 |
//! | 14 | 2  | device count |
//! | 16 | 2  | domain count: 0 in version 1 (see below) |
//! | 18 | 2  | exit rule ([`ExitRule`]) |
//! | 20 | 4  | total size: header + device records (+ domain records later) |
//! | 24 | 1  | name length, 1..=32 |
//! | 25 | 32 | system name, UTF-8, zero-padded |
//! | 57 | 7  | reserved, zero |
//!
//! Then `device count` device records from offset 64:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 2 | kind ([`DeviceKind::code`]) |
//! | 2 | 2 | PCI address as a requester id (bus 15:8, device 7:3, function 2:0) |
//! | 4 | 2 | PCI vendor id the device must show |
//! | 6 | 2 | PCI device id the device must show |
//!
//! Domains arrive with the next format version: their records will follow
//! the device records, with a record size of their own in today's reserved
//! bytes. Version 1 requires a domain count of 0, so a version-1 reader never
//! misreads a manifest that has domains: it refuses it by version first.

use core::fmt;

use crate::bundle::{le, NAME_MAX};
use crate::pci::Bdf;

/// The first eight bytes of a compiled manifest.
pub const MAGIC: [u8; 8] = *b"AIRLOCKM";
/// The format version this crate reads and writes.
pub const VERSION: u16 = 1;
/// Size of the header in bytes.
pub const HEADER_SIZE: usize = 64;
/// Size of one device record in bytes.
pub const DEVICE_SIZE: usize = 8;
/// Most devices a manifest may list (one per slot of bus 0 would be 32).
pub const MAX_DEVICES: usize = 256;

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
    /// While there are no domains, this is what "runs its workloads and
    /// shuts down" means.
    AfterReady,
    /// Keep running until QEMU is stopped from outside.
    Never,
}

impl ExitRule {
    pub const ALL: [ExitRule; 2] = [ExitRule::AfterReady, ExitRule::Never];

    pub const fn code(self) -> u16 {
        match self {
            ExitRule::AfterReady => 1,
            ExitRule::Never => 2,
        }
    }

    pub const fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(ExitRule::AfterReady),
            2 => Some(ExitRule::Never),
            _ => None,
        }
    }

    /// The manifest's spelling (`exit = "after-ready"`).
    pub const fn name(self) -> &'static str {
        match self {
            ExitRule::AfterReady => "after-ready",
            ExitRule::Never => "never",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
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
    /// Version 1 has no domain records.
    DomainsUnsupported {
        count: u16,
    },
    /// The device count is over [`MAX_DEVICES`].
    TooManyDevices {
        count: u16,
    },
    /// The total size field disagrees with the header and record count, or
    /// with the bytes given.
    SizeMismatch {
        declared: u32,
        expected: usize,
        len: usize,
    },
    UnknownExitRule {
        code: u16,
    },
    EmptyName,
    NameTooLong {
        len: u8,
    },
    NameNotUtf8,
    /// The reserved header bytes are not zero.
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
            DomainsUnsupported { count } => {
                write!(f, "{count} domain records, version {VERSION} has none")
            }
            TooManyDevices { count } => write!(f, "{count} devices, at most {MAX_DEVICES}"),
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
        }
    }
}

/// A compiled manifest whose every check passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Manifest<'a> {
    name: &'a str,
    exit: ExitRule,
    /// Exactly `count` device records.
    records: &'a [u8],
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
        let count = le::u16_at(bytes, 14);
        let domains = le::u16_at(bytes, 16);
        if domains != 0 {
            return Err(DomainsUnsupported { count: domains });
        }
        if count as usize > MAX_DEVICES {
            return Err(TooManyDevices { count });
        }
        let declared = le::u32_at(bytes, 20);
        let expected = HEADER_SIZE + count as usize * DEVICE_SIZE;
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
        if bytes[25 + name_len as usize..HEADER_SIZE]
            .iter()
            .any(|&b| b != 0)
        {
            return Err(ReservedNotZero);
        }
        let records = &bytes[HEADER_SIZE..];
        for i in 0..count as usize {
            let (code, bdf, vendor, device) = read_device(records, i);
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
            if let Some(first) = (0..i).find(|&j| read_device(records, j).1 == bdf) {
                return Err(DuplicateAddress {
                    first: first as u16,
                    index,
                    bdf,
                });
            }
        }
        Ok(Manifest {
            name,
            exit,
            records,
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
        self.records.len() / DEVICE_SIZE
    }

    /// Every device, in manifest order.
    pub fn devices(&self) -> Devices<'a> {
        Devices {
            records: self.records,
            next: 0,
        }
    }

    /// The device the manifest places at `bdf`.
    pub fn device_at(&self, bdf: Bdf) -> Option<Device> {
        self.devices().find(|d| d.bdf == bdf)
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

/// Why a manifest could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    EmptyName,
    NameTooLong { len: usize },
    TooManyDevices { count: usize },
    IdsDoNotMatchKind { index: usize },
    DuplicateAddress { first: usize, index: usize },
    BufferTooSmall { need: usize, have: usize },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use EncodeError::*;
        match self {
            EmptyName => f.write_str("empty system name"),
            NameTooLong { len } => write!(f, "system name of {len} bytes is over {NAME_MAX}"),
            TooManyDevices { count } => write!(f, "{count} devices, at most {MAX_DEVICES}"),
            IdsDoNotMatchKind { index } => {
                write!(f, "device {index}: ids differ from its kind's")
            }
            DuplicateAddress { first, index } => {
                write!(f, "device {index}: address already used by device {first}")
            }
            BufferTooSmall { need, have } => {
                write!(
                    f,
                    "output buffer of {have} bytes, the manifest needs {need}"
                )
            }
        }
    }
}

/// The size [`encode`] writes for `devices` devices.
pub const fn encoded_size(devices: usize) -> usize {
    HEADER_SIZE + devices * DEVICE_SIZE
}

/// Writes the compiled manifest at the start of `out`; returns its size.
/// Refuses whatever [`Manifest::parse`] would refuse.
pub fn encode(
    name: &str,
    exit: ExitRule,
    devices: &[Device],
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    use EncodeError::*;
    if name.is_empty() {
        return Err(EmptyName);
    }
    if name.len() > NAME_MAX {
        return Err(NameTooLong { len: name.len() });
    }
    if devices.len() > MAX_DEVICES {
        return Err(TooManyDevices {
            count: devices.len(),
        });
    }
    for (i, d) in devices.iter().enumerate() {
        if d.kind.pci_ids() != (d.vendor, d.device) {
            return Err(IdsDoNotMatchKind { index: i });
        }
        if let Some(first) = devices[..i].iter().position(|o| o.bdf == d.bdf) {
            return Err(DuplicateAddress { first, index: i });
        }
    }
    let need = encoded_size(devices.len());
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
    le::put(out, 16, &0u16.to_le_bytes());
    le::put(out, 18, &exit.code().to_le_bytes());
    le::put(out, 20, &(need as u32).to_le_bytes());
    le::put(out, 24, &[name.len() as u8]);
    le::put(out, 25, name.as_bytes());
    for (i, d) in devices.iter().enumerate() {
        let at = HEADER_SIZE + i * DEVICE_SIZE;
        le::put(out, at, &d.kind.code().to_le_bytes());
        le::put(out, at + 2, &d.bdf.rid().to_le_bytes());
        le::put(out, at + 4, &d.vendor.to_le_bytes());
        le::put(out, at + 6, &d.device.to_le_bytes());
    }
    Ok(need)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;
    use std::vec;
    use std::vec::Vec;

    fn devices() -> [Device; 3] {
        [
            Device::new(DeviceKind::VirtioBlk, Bdf::new(0, 3, 0)),
            Device::new(DeviceKind::VirtioNet, Bdf::new(0, 4, 0)),
            Device::new(DeviceKind::Edu, Bdf::new(0, 5, 0)),
        ]
    }

    fn good() -> Vec<u8> {
        let mut buf = vec![0xa5; encoded_size(3)];
        assert_eq!(
            encode("default", ExitRule::AfterReady, &devices(), &mut buf),
            Ok(buf.len())
        );
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
        let m = Manifest::parse(&buf).unwrap();
        assert_eq!(m.name(), "default");
        assert_eq!(m.exit_rule(), ExitRule::AfterReady);
        assert_eq!(m.device_count(), 3);
        assert_eq!(m.devices().collect::<Vec<_>>(), devices());
        let blk = m.device_at(Bdf::new(0, 3, 0)).unwrap();
        assert_eq!(
            (blk.kind, blk.vendor, blk.device),
            (DeviceKind::VirtioBlk, 0x1af4, 0x1042)
        );
        assert!(m.device_at(Bdf::new(0, 6, 0)).is_none());
        // No devices at all is a valid (if dull) system.
        let mut buf = vec![0; encoded_size(0)];
        encode("x", ExitRule::Never, &[], &mut buf).unwrap();
        let m = Manifest::parse(&buf).unwrap();
        assert_eq!((m.device_count(), m.exit_rule()), (0, ExitRule::Never));
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
    }

    #[test]
    fn each_corruption_is_named() {
        use ManifestError::*;
        let g = good();
        assert_eq!(Manifest::parse(&g[..63]), Err(TruncatedHeader { len: 63 }));
        assert!(matches!(err(|b| b[1] = 0), BadMagic { .. }));
        assert_eq!(err(|b| b[8] = 2), UnknownVersion { found: 2 });
        assert_eq!(err(|b| b[10] = 32), BadHeaderSize { found: 32 });
        assert_eq!(err(|b| b[12] = 16), BadDeviceSize { found: 16 });
        assert_eq!(err(|b| b[16] = 1), DomainsUnsupported { count: 1 });
        assert_eq!(err(|b| b[15] = 2), TooManyDevices { count: 0x203 });
        assert_eq!(
            err(|b| b[14] = 4),
            SizeMismatch {
                declared: 88,
                expected: 96,
                len: 88
            }
        );
        assert_eq!(
            err(|b| b[20] = 90),
            SizeMismatch {
                declared: 90,
                expected: 88,
                len: 88
            }
        );
        assert_eq!(
            err(|b| b.push(0)),
            SizeMismatch {
                declared: 88,
                expected: 88,
                len: 89
            }
        );
        assert_eq!(err(|b| b[18] = 7), UnknownExitRule { code: 7 });
        assert_eq!(err(|b| b[24] = 0), EmptyName);
        assert_eq!(err(|b| b[24] = 33), NameTooLong { len: 33 });
        assert_eq!(err(|b| b[25] = 0xc3), NameNotUtf8);
        assert_eq!(err(|b| b[63] = 1), ReservedNotZero);
        assert_eq!(
            err(|b| b[64 + 8] = 9),
            UnknownDeviceKind { index: 1, code: 9 }
        );
        assert_eq!(
            err(|b| b[64 + 8 + 6] = 0x42),
            IdsDoNotMatchKind {
                index: 1,
                kind: DeviceKind::VirtioNet,
                vendor: 0x1af4,
                device: 0x1042
            }
        );
        assert_eq!(
            err(|b| b[64 + 16 + 2] = 0x18),
            DuplicateAddress {
                first: 0,
                index: 2,
                bdf: Bdf::new(0, 3, 0)
            }
        );
    }

    #[test]
    fn errors_display_their_check() {
        let e = err(|b| b[64 + 16 + 2] = 0x18);
        assert_eq!(
            e.to_string(),
            "device 2: address 00:03.0 already used by device 0"
        );
        let e = err(|b| b[64 + 8 + 6] = 0x42);
        assert_eq!(
            e.to_string(),
            "device 1 (virtio-net): ids 1af4:1042, the kind has 1af4:1041"
        );
    }

    #[test]
    fn encode_refuses_what_parse_would() {
        let mut buf = [0u8; 256];
        let d = devices();
        assert_eq!(
            encode("", ExitRule::Never, &d, &mut buf),
            Err(EncodeError::EmptyName)
        );
        let long = "n".repeat(33);
        assert_eq!(
            encode(&long, ExitRule::Never, &d, &mut buf),
            Err(EncodeError::NameTooLong { len: 33 })
        );
        let dup = [d[0], d[0]];
        assert_eq!(
            encode("x", ExitRule::Never, &dup, &mut buf),
            Err(EncodeError::DuplicateAddress { first: 0, index: 1 })
        );
        let bad = [Device { vendor: 1, ..d[0] }];
        assert_eq!(
            encode("x", ExitRule::Never, &bad, &mut buf),
            Err(EncodeError::IdsDoNotMatchKind { index: 0 })
        );
        assert_eq!(
            encode("x", ExitRule::Never, &d, &mut buf[..70]),
            Err(EncodeError::BufferTooSmall { need: 88, have: 70 })
        );
    }
}
