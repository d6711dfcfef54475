//! A domain's address space and the start-info page the hypervisor gives it.
//!
//! ```text
//! 0x0000_0000_0000_0000 .. START_INFO_VA        unmapped (null guard)
//! START_INFO_VA (1 MiB)                         start info, one page, read-only
//! STACK_TOP - STACK_SIZE .. STACK_TOP           stack, RW NX; the pages below and above are unmapped
//! IMAGE_BASE (4 MiB) ..                         the ELF's PT_LOADs: text RX, rodata R, data/bss RW NX
//! image end + one unmapped page .. heap_end     heap, RW NX (what is left of the domain's memory)
//! DEVICE_VA (3 GiB) ..                          assigned devices' BARs, uncached, RW NX; the pages
//!                                               holding an MSI-X table or PBA stay unmapped
//! ... 0x0000_7fff_ffff_ffff                     (user half ends)
//! 0xffff_8000_0000_0000 ..                      the hypervisor's, supervisor-only
//! ```
//!
//! Everything below `USER_TOP` that is not listed is unmapped. The layout
//! stays clear of the interrupt window 0xFEE00000-0xFEEFFFFF, so a driver
//! domain's I/O addresses can equal its virtual addresses.

/// Where the start-info page is mapped, read-only.
pub const START_INFO_VA: u64 = 0x10_0000;
/// Where domain images are linked (the lowest PT_LOAD address allowed).
pub const IMAGE_BASE: u64 = 0x40_0000;
/// One past the highest stack byte; the page at `STACK_TOP` is unmapped.
pub const STACK_TOP: u64 = IMAGE_BASE - 0x1000;
/// Bytes of stack (the net driver domain's setup path alone uses about
/// 44 KiB; keep room).
pub const STACK_SIZE: u64 = 128 * 1024;
/// Highest address (exclusive) a domain's memory may use.
pub const USER_LIMIT: u64 = 0xfee0_0000;
/// The start of the kernel half; nothing at or above is a domain's.
pub const USER_TOP: u64 = 0x0000_8000_0000_0000;

/// Where assigned devices' BARs are mapped, each aligned to its size.
pub const DEVICE_VA: u64 = 0xc000_0000;
/// Most PCI functions one domain may be assigned.
pub const MAX_DEVICES: usize = 4;
/// Most virtual block devices one domain may serve or use.
pub const MAX_VBDS: usize = 8;
/// Most virtual network interfaces one domain may serve or use.
pub const MAX_VIFS: usize = 8;

/// `StartInfo` magic.
pub const MAGIC: [u8; 8] = *b"AIRLKDOM";
pub const VERSION: u16 = 4;
/// Bytes `StartInfo::encode` writes.
pub const START_INFO_SIZE: usize = 2296 + 8 + MAX_VBDS * VBD_SIZE + 8 + MAX_VIFS * VIF_SIZE;
pub const NAME_MAX: usize = 32;
pub const ARGS_MAX: usize = 128;
pub const PORT_NAME_MAX: usize = 24;
pub const MAX_PORTS: usize = 16;
pub const MAX_PEERS: usize = 16;

const _: () = assert!(START_INFO_SIZE <= 4096);
const _: () = assert!(STACK_TOP - STACK_SIZE > START_INFO_VA + 0x1000);
const _: () = assert!(DEVICE_VA < USER_LIMIT);

/// What a port given at build time is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortKind {
    /// Bound to a port of `peer` (a manifest `[[channel]]`).
    Interdomain,
}

/// A port the hypervisor bound for the domain before it started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortInfo<'a> {
    pub port: u16,
    pub peer_domid: u16,
    pub kind: PortKind,
    /// The manifest's name for the channel.
    pub name: &'a str,
}

/// How a domain's devices reach its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaMode {
    /// All of the domain's memory at I/O address = virtual address, from
    /// the start.
    Static,
    /// Nothing until `dma_map` or `dma_batch` maps it (the domain's own
    /// pages, or grants it mapped with `DEVICE_MAP`); `dma_unmap` and
    /// `dma_batch` remove it with IOTLB invalidation before they return.
    Strict,
}

/// One BAR of an assigned device, as mapped in the domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMap {
    /// BAR number, 0..=5.
    pub index: u8,
    /// Where the BAR starts in the domain (pages holding an MSI-X table or
    /// PBA inside it are not mapped).
    pub va: u64,
    pub len: u64,
}

/// A PCI function the manifest assigns to the domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub bdf: crate::pci::Bdf,
    pub vendor: u16,
    pub device: u16,
    /// Memory BARs, in BAR order.
    pub bars: [Option<BarMap>; 6],
}

/// Which end of a virtual block device a domain is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VbdRole {
    /// It uses the disk (blkfront): it grants the ring page at `ring_gref`
    /// of its own grant table to `peer`.
    Front,
    /// It serves the disk (blkback): it maps `peer`'s `ring_gref`.
    Back,
}

/// How blkback moves a vbd's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VbdMode {
    /// Grant map: the frontend's pages mapped for the backend and its
    /// device (zero-copy), kept mapped (persistent grants).
    Map,
    /// Grant copy: the hypervisor copies between the frontend's pages and
    /// the backend's buffers.
    Copy,
}

/// A virtual block device the manifest connects, as one end sees it. The
/// hypervisor binds the event channel before either side runs; the ring
/// page is the frontend's, granted at `ring_gref` (the frontend's `n`-th
/// vbd uses grant reference `n`, so refs 0..MAX_VBDS are reserved for rings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VbdInfo<'a> {
    pub name: &'a str,
    pub role: VbdRole,
    /// The other end's domain id.
    pub peer: u16,
    /// This end's port of the vbd's event channel.
    pub port: u16,
    /// The frontend's grant reference of the ring page.
    pub ring_gref: u32,
    /// The frontend's disk: `sectors` sectors of the real disk from
    /// `first_sector` (the frontend sees them as 0..sectors).
    pub first_sector: u64,
    pub sectors: u64,
    pub readonly: bool,
    pub mode: VbdMode,
}

/// Which end of a virtual network interface a domain is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VifRole {
    /// It uses the interface (netfront): it grants the TX ring page at
    /// `tx_ring_gref` and the RX ring page at `rx_ring_gref` to `peer`.
    Front,
    /// It serves the interface (netback, in the net driver domain).
    Back,
}

/// A virtual network interface the manifest connects, as one end sees it.
/// As for vbds, the hypervisor binds the event channel before either side
/// runs; the rings are the frontend's pages, granted at reserved refs: its
/// n-th vif's TX ring is ref `MAX_VBDS + 2n`, its RX ring `MAX_VBDS + 2n + 1`.
/// The MAC and IPv4 address are the frontend's, from the manifest: netback
/// lets a frontend send only as itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VifInfo<'a> {
    pub name: &'a str,
    pub role: VifRole,
    pub peer: u16,
    pub port: u16,
    pub tx_ring_gref: u32,
    pub rx_ring_gref: u32,
    pub mac: [u8; 6],
    pub ip: [u8; 4],
}

/// The grant references a frontend's `n`-th vif uses for its TX and RX rings.
pub const fn vif_ring_grefs(n: usize) -> (u32, u32) {
    let base = (MAX_VBDS + 2 * n) as u32;
    (base, base + 1)
}

/// Grant references below this are reserved for vbd and vif rings.
pub const RESERVED_GREFS: u32 = (MAX_VBDS + 2 * MAX_VIFS) as u32;

/// Another domain of the system, as its peers may know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerInfo<'a> {
    pub domid: u16,
    pub name: &'a str,
    /// Physical address and size of the peer's memory (as Xen domains know
    /// machine frame numbers): knowing it grants nothing.
    pub mem_phys: u64,
    pub mem_bytes: u64,
}

/// The start-info page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartInfo<'a> {
    pub domid: u16,
    pub name: &'a str,
    pub label: &'a str,
    /// The manifest's `args` for the domain.
    pub args: &'a str,
    pub image_start: u64,
    pub image_end: u64,
    pub heap_start: u64,
    pub heap_end: u64,
    pub stack_bottom: u64,
    pub stack_top: u64,
    /// All the memory the domain was given (image, heap, stack, this page).
    pub mem_bytes: u64,
    pub ports: [Option<PortInfo<'a>>; MAX_PORTS],
    pub peers: [Option<PeerInfo<'a>>; MAX_PEERS],
    pub dma: DmaMode,
    pub devices: [Option<DeviceInfo>; MAX_DEVICES],
    pub vbds: [Option<VbdInfo<'a>>; MAX_VBDS],
    pub vifs: [Option<VifInfo<'a>>; MAX_VIFS],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartInfoError {
    Truncated {
        have: usize,
    },
    BadMagic,
    BadVersion(u16),
    /// A string field is not UTF-8 or not NUL-padded.
    BadString {
        field: &'static str,
    },
    /// A string does not fit its field.
    TooLong {
        field: &'static str,
        max: usize,
    },
    TooMany {
        field: &'static str,
        max: usize,
    },
    BadPortKind(u16),
    BadDmaMode(u8),
    BadVbd {
        index: usize,
    },
    BadVif {
        index: usize,
    },
    BadBar {
        device: usize,
        slot: usize,
    },
}

impl core::fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StartInfoError::Truncated { have } => {
                write!(f, "start info: {have} bytes, need {START_INFO_SIZE}")
            }
            StartInfoError::BadMagic => write!(f, "start info: bad magic"),
            StartInfoError::BadVersion(v) => {
                write!(f, "start info: version {v}, expected {VERSION}")
            }
            StartInfoError::BadString { field } => {
                write!(f, "start info: {field} is not a padded UTF-8 string")
            }
            StartInfoError::TooLong { field, max } => {
                write!(f, "start info: {field} is longer than {max} bytes")
            }
            StartInfoError::TooMany { field, max } => {
                write!(f, "start info: more than {max} {field}")
            }
            StartInfoError::BadPortKind(k) => write!(f, "start info: unknown port kind {k}"),
            StartInfoError::BadDmaMode(m) => write!(f, "start info: unknown DMA mode {m}"),
            StartInfoError::BadVbd { index } => write!(f, "start info: vbd {index} is malformed"),
            StartInfoError::BadVif { index } => write!(f, "start info: vif {index} is malformed"),
            StartInfoError::BadBar { device, slot } => {
                write!(
                    f,
                    "start info: device {device} BAR slot {slot} is malformed"
                )
            }
        }
    }
}

// Offsets inside the page.
const O_DOMID: usize = 10;
const O_NPORTS: usize = 12;
const O_NPEERS: usize = 14;
const O_NAME: usize = 16;
const O_LABEL: usize = 48;
const O_ARGS: usize = 80;
const O_LAYOUT: usize = 208;
const O_PORTS: usize = 272;
const PORT_SIZE: usize = 32;
const O_PEERS: usize = O_PORTS + MAX_PORTS * PORT_SIZE;
const PEER_SIZE: usize = 56;
const O_DEVS: usize = O_PEERS + MAX_PEERS * PEER_SIZE;
// At O_DEVS: u16 device count, u8 DMA mode (1 static, 2 strict), 5 reserved.
const O_DEV0: usize = O_DEVS + 8;
// A device: u16 rid, u16 vendor, u16 device, u16 reserved, then 6 BARs of
// {u8 present, u8 index, 6 reserved, u64 va, u64 len}.
const BAR_SIZE: usize = 24;
const DEV_SIZE: usize = 8 + 6 * BAR_SIZE;
const O_VBDS: usize = O_DEV0 + MAX_DEVICES * DEV_SIZE;
// At O_VBDS: u16 vbd count, 6 reserved; then each vbd: u8 role (1 front,
// 2 back), u8 mode (1 map, 2 copy), u8 readonly, u8 name length, u16 peer,
// u16 port, u32 ring_gref, 4 reserved, u64 first_sector, u64 sectors,
// name [u8; 16].
const O_VBD0: usize = O_VBDS + 8;
const VBD_SIZE: usize = 48;
pub const VBD_NAME_MAX: usize = 16;
const O_VIFS: usize = O_VBD0 + MAX_VBDS * VBD_SIZE;
// At O_VIFS: u16 vif count, 6 reserved; then each vif: u8 role (1 front,
// 2 back), u8 name length, u16 peer, u16 port, 2 reserved, u32 tx_ring_gref,
// u32 rx_ring_gref, mac [u8; 6], 2 reserved, ip [u8; 4], 4 reserved,
// name [u8; 16].
const O_VIF0: usize = O_VIFS + 8;
const VIF_SIZE: usize = 48;
pub const VIF_NAME_MAX: usize = 16;
const _: () = assert!(O_VIF0 + MAX_VIFS * VIF_SIZE == START_INFO_SIZE);
const _: () = assert!(START_INFO_SIZE <= 4096);

fn put_str(
    buf: &mut [u8],
    at: usize,
    max: usize,
    s: &str,
    field: &'static str,
) -> Result<(), StartInfoError> {
    if s.len() > max {
        return Err(StartInfoError::TooLong { field, max });
    }
    buf[at..at + max].fill(0);
    buf[at..at + s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

fn get_str<'a>(
    buf: &'a [u8],
    at: usize,
    max: usize,
    field: &'static str,
) -> Result<&'a str, StartInfoError> {
    let raw = &buf[at..at + max];
    let len = raw.iter().position(|&b| b == 0).unwrap_or(max);
    if raw[len..].iter().any(|&b| b != 0) {
        return Err(StartInfoError::BadString { field });
    }
    core::str::from_utf8(&raw[..len]).map_err(|_| StartInfoError::BadString { field })
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

impl<'a> StartInfo<'a> {
    /// Writes the page's first [`START_INFO_SIZE`] bytes.
    pub fn encode(&self, buf: &mut [u8]) -> Result<(), StartInfoError> {
        if buf.len() < START_INFO_SIZE {
            return Err(StartInfoError::Truncated { have: buf.len() });
        }
        let buf = &mut buf[..START_INFO_SIZE];
        buf.fill(0);
        buf[0..8].copy_from_slice(&MAGIC);
        put_u16(buf, 8, VERSION);
        put_u16(buf, O_DOMID, self.domid);
        let nports = self.ports.iter().flatten().count();
        let npeers = self.peers.iter().flatten().count();
        put_u16(buf, O_NPORTS, nports as u16);
        put_u16(buf, O_NPEERS, npeers as u16);
        put_str(buf, O_NAME, NAME_MAX, self.name, "name")?;
        put_str(buf, O_LABEL, NAME_MAX, self.label, "label")?;
        put_str(buf, O_ARGS, ARGS_MAX, self.args, "args")?;
        let layout = [
            self.image_start,
            self.image_end,
            self.heap_start,
            self.heap_end,
            self.stack_bottom,
            self.stack_top,
            self.mem_bytes,
        ];
        for (i, v) in layout.iter().enumerate() {
            put_u64(buf, O_LAYOUT + 8 * i, *v);
        }
        for (i, p) in self.ports.iter().flatten().enumerate() {
            let at = O_PORTS + i * PORT_SIZE;
            put_u16(buf, at, p.port);
            put_u16(buf, at + 2, p.peer_domid);
            put_u16(
                buf,
                at + 4,
                match p.kind {
                    PortKind::Interdomain => 1,
                },
            );
            put_str(buf, at + 8, PORT_NAME_MAX, p.name, "port name")?;
        }
        for (i, p) in self.peers.iter().flatten().enumerate() {
            let at = O_PEERS + i * PEER_SIZE;
            put_u16(buf, at, p.domid);
            put_str(buf, at + 8, NAME_MAX, p.name, "peer name")?;
            put_u64(buf, at + 40, p.mem_phys);
            put_u64(buf, at + 48, p.mem_bytes);
        }
        put_u16(buf, O_DEVS, self.devices.iter().flatten().count() as u16);
        buf[O_DEVS + 2] = match self.dma {
            DmaMode::Static => 1,
            DmaMode::Strict => 2,
        };
        for (i, d) in self.devices.iter().flatten().enumerate() {
            let at = O_DEV0 + i * DEV_SIZE;
            put_u16(buf, at, d.bdf.rid());
            put_u16(buf, at + 2, d.vendor);
            put_u16(buf, at + 4, d.device);
            for (j, b) in d.bars.iter().enumerate() {
                if let Some(b) = b {
                    let bat = at + 8 + j * BAR_SIZE;
                    buf[bat] = 1;
                    buf[bat + 1] = b.index;
                    put_u64(buf, bat + 8, b.va);
                    put_u64(buf, bat + 16, b.len);
                }
            }
        }
        put_u16(buf, O_VBDS, self.vbds.iter().flatten().count() as u16);
        for (i, v) in self.vbds.iter().flatten().enumerate() {
            let at = O_VBD0 + i * VBD_SIZE;
            buf[at] = match v.role {
                VbdRole::Front => 1,
                VbdRole::Back => 2,
            };
            buf[at + 1] = match v.mode {
                VbdMode::Map => 1,
                VbdMode::Copy => 2,
            };
            buf[at + 2] = u8::from(v.readonly);
            if v.name.len() > VBD_NAME_MAX {
                return Err(StartInfoError::TooLong {
                    field: "vbd name",
                    max: VBD_NAME_MAX,
                });
            }
            buf[at + 3] = v.name.len() as u8;
            put_u16(buf, at + 4, v.peer);
            put_u16(buf, at + 6, v.port);
            buf[at + 8..at + 12].copy_from_slice(&v.ring_gref.to_le_bytes());
            put_u64(buf, at + 16, v.first_sector);
            put_u64(buf, at + 24, v.sectors);
            put_str(buf, at + 32, VBD_NAME_MAX, v.name, "vbd name")?;
        }
        put_u16(buf, O_VIFS, self.vifs.iter().flatten().count() as u16);
        for (i, v) in self.vifs.iter().flatten().enumerate() {
            let at = O_VIF0 + i * VIF_SIZE;
            buf[at] = match v.role {
                VifRole::Front => 1,
                VifRole::Back => 2,
            };
            if v.name.len() > VIF_NAME_MAX {
                return Err(StartInfoError::TooLong {
                    field: "vif name",
                    max: VIF_NAME_MAX,
                });
            }
            buf[at + 1] = v.name.len() as u8;
            put_u16(buf, at + 2, v.peer);
            put_u16(buf, at + 4, v.port);
            buf[at + 8..at + 12].copy_from_slice(&v.tx_ring_gref.to_le_bytes());
            buf[at + 12..at + 16].copy_from_slice(&v.rx_ring_gref.to_le_bytes());
            buf[at + 16..at + 22].copy_from_slice(&v.mac);
            buf[at + 24..at + 28].copy_from_slice(&v.ip);
            put_str(buf, at + 32, VIF_NAME_MAX, v.name, "vif name")?;
        }
        Ok(())
    }

    pub fn decode(buf: &'a [u8]) -> Result<Self, StartInfoError> {
        if buf.len() < START_INFO_SIZE {
            return Err(StartInfoError::Truncated { have: buf.len() });
        }
        if buf[0..8] != MAGIC {
            return Err(StartInfoError::BadMagic);
        }
        let version = get_u16(buf, 8);
        if version != VERSION {
            return Err(StartInfoError::BadVersion(version));
        }
        let nports = usize::from(get_u16(buf, O_NPORTS));
        let npeers = usize::from(get_u16(buf, O_NPEERS));
        if nports > MAX_PORTS {
            return Err(StartInfoError::TooMany {
                field: "ports",
                max: MAX_PORTS,
            });
        }
        if npeers > MAX_PEERS {
            return Err(StartInfoError::TooMany {
                field: "peers",
                max: MAX_PEERS,
            });
        }
        let mut ports = [None; MAX_PORTS];
        for (i, slot) in ports.iter_mut().enumerate().take(nports) {
            let at = O_PORTS + i * PORT_SIZE;
            let kind = match get_u16(buf, at + 4) {
                1 => PortKind::Interdomain,
                k => return Err(StartInfoError::BadPortKind(k)),
            };
            *slot = Some(PortInfo {
                port: get_u16(buf, at),
                peer_domid: get_u16(buf, at + 2),
                kind,
                name: get_str(buf, at + 8, PORT_NAME_MAX, "port name")?,
            });
        }
        let mut peers = [None; MAX_PEERS];
        for (i, slot) in peers.iter_mut().enumerate().take(npeers) {
            let at = O_PEERS + i * PEER_SIZE;
            *slot = Some(PeerInfo {
                domid: get_u16(buf, at),
                name: get_str(buf, at + 8, NAME_MAX, "peer name")?,
                mem_phys: get_u64(buf, at + 40),
                mem_bytes: get_u64(buf, at + 48),
            });
        }
        let ndev = usize::from(get_u16(buf, O_DEVS));
        if ndev > MAX_DEVICES {
            return Err(StartInfoError::TooMany {
                field: "devices",
                max: MAX_DEVICES,
            });
        }
        let dma = match buf[O_DEVS + 2] {
            1 => DmaMode::Static,
            2 => DmaMode::Strict,
            m => return Err(StartInfoError::BadDmaMode(m)),
        };
        let mut devices = [None; MAX_DEVICES];
        for (i, slot) in devices.iter_mut().enumerate().take(ndev) {
            let at = O_DEV0 + i * DEV_SIZE;
            let mut bars = [None; 6];
            for (j, bar) in bars.iter_mut().enumerate() {
                let bat = at + 8 + j * BAR_SIZE;
                match buf[bat] {
                    0 => {}
                    1 if buf[bat + 1] < 6 => {
                        *bar = Some(BarMap {
                            index: buf[bat + 1],
                            va: get_u64(buf, bat + 8),
                            len: get_u64(buf, bat + 16),
                        })
                    }
                    _ => return Err(StartInfoError::BadBar { device: i, slot: j }),
                }
            }
            *slot = Some(DeviceInfo {
                bdf: crate::pci::Bdf::from_rid(get_u16(buf, at)),
                vendor: get_u16(buf, at + 2),
                device: get_u16(buf, at + 4),
                bars,
            });
        }
        let nvbd = usize::from(get_u16(buf, O_VBDS));
        if nvbd > MAX_VBDS {
            return Err(StartInfoError::TooMany {
                field: "vbds",
                max: MAX_VBDS,
            });
        }
        let mut vbds = [None; MAX_VBDS];
        for (i, slot) in vbds.iter_mut().enumerate().take(nvbd) {
            let at = O_VBD0 + i * VBD_SIZE;
            let bad = StartInfoError::BadVbd { index: i };
            let role = match buf[at] {
                1 => VbdRole::Front,
                2 => VbdRole::Back,
                _ => return Err(bad),
            };
            let mode = match buf[at + 1] {
                1 => VbdMode::Map,
                2 => VbdMode::Copy,
                _ => return Err(bad),
            };
            if buf[at + 2] > 1 || usize::from(buf[at + 3]) > VBD_NAME_MAX {
                return Err(bad);
            }
            *slot = Some(VbdInfo {
                name: get_str(buf, at + 32, VBD_NAME_MAX, "vbd name")?,
                role,
                peer: get_u16(buf, at + 4),
                port: get_u16(buf, at + 6),
                ring_gref: u32::from_le_bytes([
                    buf[at + 8],
                    buf[at + 9],
                    buf[at + 10],
                    buf[at + 11],
                ]),
                first_sector: get_u64(buf, at + 16),
                sectors: get_u64(buf, at + 24),
                readonly: buf[at + 2] == 1,
                mode,
            });
        }
        let nvif = usize::from(get_u16(buf, O_VIFS));
        if nvif > MAX_VIFS {
            return Err(StartInfoError::TooMany {
                field: "vifs",
                max: MAX_VIFS,
            });
        }
        let mut vifs = [None; MAX_VIFS];
        for (i, slot) in vifs.iter_mut().enumerate().take(nvif) {
            let at = O_VIF0 + i * VIF_SIZE;
            let role = match buf[at] {
                1 => VifRole::Front,
                2 => VifRole::Back,
                _ => return Err(StartInfoError::BadVif { index: i }),
            };
            if usize::from(buf[at + 1]) > VIF_NAME_MAX {
                return Err(StartInfoError::BadVif { index: i });
            }
            let u32_at =
                |o: usize| u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&buf[at + 16..at + 22]);
            let mut ip = [0u8; 4];
            ip.copy_from_slice(&buf[at + 24..at + 28]);
            *slot = Some(VifInfo {
                name: get_str(buf, at + 32, VIF_NAME_MAX, "vif name")?,
                role,
                peer: get_u16(buf, at + 2),
                port: get_u16(buf, at + 4),
                tx_ring_gref: u32_at(at + 8),
                rx_ring_gref: u32_at(at + 12),
                mac,
                ip,
            });
        }
        let l = |i: usize| get_u64(buf, O_LAYOUT + 8 * i);
        Ok(StartInfo {
            domid: get_u16(buf, O_DOMID),
            name: get_str(buf, O_NAME, NAME_MAX, "name")?,
            label: get_str(buf, O_LABEL, NAME_MAX, "label")?,
            args: get_str(buf, O_ARGS, ARGS_MAX, "args")?,
            image_start: l(0),
            image_end: l(1),
            heap_start: l(2),
            heap_end: l(3),
            stack_bottom: l(4),
            stack_top: l(5),
            mem_bytes: l(6),
            ports,
            peers,
            dma,
            devices,
            vbds,
            vifs,
        })
    }

    /// The port the hypervisor bound for channel `name`.
    pub fn port(&self, name: &str) -> Option<PortInfo<'a>> {
        self.ports
            .iter()
            .flatten()
            .find(|p| p.name == name)
            .copied()
    }

    /// The vif called `name`.
    pub fn vif(&self, name: &str) -> Option<VifInfo<'a>> {
        self.vifs.iter().flatten().find(|v| v.name == name).copied()
    }

    /// The vbd called `name`.
    pub fn vbd(&self, name: &str) -> Option<VbdInfo<'a>> {
        self.vbds.iter().flatten().find(|v| v.name == name).copied()
    }

    /// The peer called `name`.
    pub fn peer(&self, name: &str) -> Option<PeerInfo<'a>> {
        self.peers
            .iter()
            .flatten()
            .find(|p| p.name == name)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StartInfo<'static> {
        let mut ports = [None; MAX_PORTS];
        ports[0] = Some(PortInfo {
            port: 1,
            peer_domid: 2,
            kind: PortKind::Interdomain,
            name: "ping",
        });
        let mut peers = [None; MAX_PEERS];
        peers[0] = Some(PeerInfo {
            domid: 2,
            name: "pong",
            mem_phys: 0x200_0000,
            mem_bytes: 1 << 22,
        });
        StartInfo {
            domid: 1,
            name: "ping",
            label: "guest_a",
            args: "role=ping count=10000",
            image_start: IMAGE_BASE,
            image_end: IMAGE_BASE + 0x5000,
            heap_start: IMAGE_BASE + 0x6000,
            heap_end: IMAGE_BASE + 0x30_0000,
            stack_bottom: STACK_TOP - STACK_SIZE,
            stack_top: STACK_TOP,
            mem_bytes: 4 << 20,
            ports,
            peers,
            dma: DmaMode::Strict,
            devices: [
                Some(DeviceInfo {
                    bdf: crate::pci::Bdf::new(0, 5, 0),
                    vendor: 0x1234,
                    device: 0x11e8,
                    bars: [
                        Some(BarMap {
                            index: 0,
                            va: DEVICE_VA,
                            len: 1 << 20,
                        }),
                        None,
                        None,
                        None,
                        None,
                        None,
                    ],
                }),
                None,
                None,
                None,
            ],
            vbds: {
                let mut v = [None; MAX_VBDS];
                v[0] = Some(VbdInfo {
                    name: "xvda",
                    role: VbdRole::Front,
                    peer: 3,
                    port: 2,
                    ring_gref: 0,
                    first_sector: 4096,
                    sectors: 2048,
                    readonly: true,
                    mode: VbdMode::Copy,
                });
                v
            },
            vifs: {
                let mut v = [None; MAX_VIFS];
                v[0] = Some(VifInfo {
                    name: "eth0",
                    role: VifRole::Back,
                    peer: 4,
                    port: 3,
                    tx_ring_gref: vif_ring_grefs(0).0,
                    rx_ring_gref: vif_ring_grefs(0).1,
                    mac: [2, 0, 0, 0, 0, 4],
                    ip: [10, 0, 0, 4],
                });
                v
            },
        }
    }

    #[test]
    fn round_trip() {
        let mut page = [0u8; 4096];
        let si = sample();
        si.encode(&mut page).unwrap();
        let back = StartInfo::decode(&page).unwrap();
        assert_eq!(back, si);
        assert_eq!(back.port("ping").unwrap().peer_domid, 2);
        assert_eq!(back.peer("pong").unwrap().mem_phys, 0x200_0000);
        assert!(back.port("nope").is_none());
    }

    #[test]
    fn rejects_corruption() {
        let mut page = [0u8; 4096];
        sample().encode(&mut page).unwrap();
        let mut bad = page;
        bad[0] = b'X';
        assert_eq!(StartInfo::decode(&bad), Err(StartInfoError::BadMagic));
        let mut bad = page;
        bad[O_NPORTS] = 17;
        assert!(matches!(
            StartInfo::decode(&bad),
            Err(StartInfoError::TooMany { .. })
        ));
        let mut bad = page;
        bad[O_NAME + 10] = b'x'; // text after the NUL padding
        assert_eq!(
            StartInfo::decode(&bad),
            Err(StartInfoError::BadString { field: "name" })
        );
        assert!(matches!(
            StartInfo::decode(&page[..100]),
            Err(StartInfoError::Truncated { .. })
        ));
        let mut long = sample();
        long.name = "a-name-that-is-much-longer-than-32-bytes";
        assert!(matches!(
            long.encode(&mut page),
            Err(StartInfoError::TooLong { field: "name", .. })
        ));
    }
}
