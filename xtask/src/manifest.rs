//! The manifest checker: TOML in, a checked system (or errors that name the
//! file, the line and the field) out, and the compiled form for the bundle.
//!
//! ```toml
//! [system]
//! name = "default"          # 1-32 of A-Z a-z 0-9 - _; names the bundle file
//! exit = "all-exited"       # "all-exited" (default with domains): stop when every domain
//!                           # has ended, success iff each ended as its `expect` says;
//!                           # "after-ready" (default without domains); "never"
//!
//! [machine]
//! memory = "256M"           # QEMU -m; default "256M"
//!
//! [[device]]
//! kind = "virtio-blk"       # virtio-blk, virtio-net, edu, virtio-gpu, virtio-keyboard, virtio-tablet
//! addr = "03.0"             # fixed PCI address on bus 0, "DD.F"
//! disk = "default-blk.img"  # virtio-blk only: raw image; relative paths are under target/airlock/
//! size = "64M"              # virtio-blk only: creates the image if it is missing
//!
//! [[device]]
//! kind = "virtio-net"
//! addr = "04.0"
//! netdev = "user"           # virtio-net only; "user" (default): QEMU's user network,
//!                           # restrict=on; "udp": raw frames as UDP datagrams on 127.0.0.1
//!                           # to the harness's test peer ([test.peer]; at most one "udp")
//! hostfwd = ["10.0.2.15:5001"]  # "user" only: TCP connections to a port on 127.0.0.1 go to
//!                           # this guest address and port in the user network (10.0.2.0/24,
//!                           # gateway 10.0.2.2); the host port is the harness's choice in a
//!                           # scenario ([test.tcp]), the guest's port for `run`
//!
//! [[domain]]                # at most 17 (each domain's start info lists the others)
//! name = "ping"             # unique, 1-32 of a-z 0-9 _ -
//! image = "testdom"         # a bin of `guests` or `driver-domains` (IMAGES)
//! memory = "4M"             # image + heap + stack + start info; 1M..=64M, a multiple of 4K
//! weight = 1                # scheduling weight 1..=1000; default 1
//! label = "guest_a"         # security label, 1-32 of a-z 0-9 _ -
//! args = "role=ping"        # up to 128 printable ASCII bytes, in the start info; default ""
//! expect = "exit"           # "exit" (status 0, default) or "fault"
//! devices = ["05.0"]        # PCI functions it owns: addresses of [[device]]s, at most 4;
//!                           # each device is owned by at most one domain; default none
//! dma = "static"            # "static" (default): all its memory at I/O address = virtual
//!                           # address; "strict": only what it maps (dma_map, dma_batch),
//!                           # until it unmaps it (IOTLB invalidated before the call returns)
//! on_dma_fault = "stop"     # "stop" (default): a DMA fault of its device ends it;
//!                           # "report": the fault is reported and it runs on
//!
//! [[channel]]               # an interdomain event channel bound before the domains start
//! name = "pp"               # unique, 1-24 of a-z 0-9 _ -; names the port in each start info
//! between = ["ping", "pong"]  # two distinct domains, each an end of at most 16 channels
//!
//! [[watch]]                 # a range whose CRC-32 the hypervisor prints (EV watch) before
//! name = "hv"               # the domains run and after they end; unique, 1-24 of a-z 0-9 _ -
//! addr = "0x100000"         # a physical address (hex), the range inside the machine's RAM
//! len = "4K"                # 1 byte..=16M
//!
//! [[watch]]
//! name = "bystander"
//! domain = "bystander"      # instead of addr: the first `len` bytes of that domain's memory
//! len = "4K"                # (its first page is its start info), at most its memory
//!
//! [[vbd]]                   # a virtual block device: a range of the backend's disk that
//! name = "xvda"             # the frontend uses through blkfront/blkback; 1-16 of a-z 0-9 _ -,
//!                           # unique among the frontend's vbds
//! frontend = "guest1"       # the domain that uses it
//! backend = "blk"           # the domain that serves it: it owns a virtio-blk (its first
//!                           # one in `devices` is the disk)
//! sectors = "0..4096"       # the range of the backend's disk, end exclusive, inside the
//!                           # disk's size; ranges of one disk must not overlap unless
//!                           # both are read-only
//! readonly = false          # default false
//! mode = "copy"             # "copy" (default): grant copy; "map": grant map (zero-copy)
//!                           # each domain is an end of at most 8 vbds
//!
//! [[vif]]                   # a virtual network interface: the frontend's netfront, served
//! name = "eth0"             # by netback in the backend; 1-16 of a-z 0-9 _ -, unique among
//!                           # the frontend's vifs
//! frontend = "guest1"       # the domain that uses it
//! backend = "net"           # the domain that serves it: it owns a virtio-net (its first one
//!                           # in `devices` is the NIC the switch joins)
//! mac = "02:00:00:00:00:01" # the frontend's MAC: unicast, not all zero, unique among vifs
//! ip = "10.0.0.1"           # the frontend's IPv4 address: a unicast host address, unique;
//!                           # netback lets the frontend send only as this MAC and IP
//!                           # each domain is an end of at most 8 vifs; the backend maps and
//!                           # copies the frontend's pages: it needs [[allow]] rules
//!
//! [[allow]]                 # the security policy: grant maps and copies are refused
//! from = "blk_driver"       # unless a rule allows the acting domain's label (from) the
//! to = "guest_a"            # permission towards the other domain's label (to); labels
//! perms = ["grant_copy"]    # some domain has; grant_map_read, grant_map_write, grant_copy,
//!                           # event_bind; event channels the manifest declares need no rule
//!
//! [host_tcp]                # a TCP peer on the host (harness::tcppeer), for `run` and
//! connect = "10.0.2.15:5001" # scenarios alike: once QEMU listens, it connects to the
//! send = "4M"               # hostfwd rule of this guest address, sends `send` bytes of
//! send_pattern = "H"        # stream `send_pattern` and receives until the guest closes:
//! recv = "4M"               # exactly `recv` bytes of stream `recv_pattern`, every byte and
//! recv_pattern = "G"        # the CRC-32 checked; `run` prints its result after QEMU exits
//!                           # and fails if the check does (the fields of [test.tcp])
//!
//! [test]                    # scenarios only (tests/scenarios/); `run` ignores it
//! ```
//!
//! A scenario's `[test]` table: `timeout_s`, `exit` ("success", "failure",
//! "timeout"), `corrupt`, and
//!
//! ```toml
//! [[test.expect]]           # an event that must appear (count: exactly; default at least once)
//! ev = "pingpong"
//! fields = { role = "ping", from = "ping" }
//! count = 1
//!
//! [[test.forbid]]           # an event that must not appear
//! ev = "domain_fault"
//!
//! [[test.ratio]]            # num's field / den's field = expect, within a relative tolerance;
//! ev = "domain_cpu"         # each of num and den matches exactly one event
//! field = "cpu_ns"
//! num = { domain = "heavy" }
//! den = { domain = "light" }
//! expect = 2.0
//! tolerance = 0.10
//!
//! [[test.equal]]            # two fields of two events (each matched exactly once) are equal
//! a = { ev = "hypercalls", fields = { domain = "hostile" }, field = "refused" }
//! b = { ev = "hypercall_table", fields = { from = "hostile" }, field = "expected_refusals" }
//! any = false                # true: `a` may match several events; one of them must equal `b`
//!
//! [test.peer]               # the harness answers the frames of the virtio-net whose netdev
//! frames = 64               # is "udp" (harness::peer); exactly `frames` requests of `size`
//! size = 600                # bytes (60..=1514), each answered, none bad
//!
//! [test.tcp]                # the harness's TCP peer (harness::tcppeer) connects through the
//!                           # (or [host_tcp], which a scenario runs the same way; not both)
//! connect = "10.0.2.15:5001" # hostfwd rule of this guest address, sends `send` bytes of
//! send = "16M"              # stream `send_pattern` (driver_domains::stream_pattern) and
//! send_pattern = "H"        # receives until the guest closes: exactly `recv` bytes of
//! recv = "16M"              # stream `recv_pattern`, every byte and the CRC-32 checked
//! recv_pattern = "H"        # (an echoing guest: the same pattern)
//!
//! [test.disk]               # the image of a virtio-blk (which must give `size`): made again
//! device = "03.0"           # before boot (zeros, then `fill`), checked after QEMU exits
//! fill = [{ sectors = "0..64", pattern = "A" }]      # harness::disk; sectors end-exclusive
//! expect = [{ sectors = "64..128", pattern = "B" }, { sectors = "128..2048", pattern = "zero" }]
//! # base: the pattern's sector number at the region's first sector (default: the
//! # region's start): a vbd's sector 0 at disk sector 4096 is { sectors = "4096..4352",
//! # pattern = "A", base = 0 }
//! ```
//!
//! Structure errors (unknown fields and tables, wrong types, missing fields,
//! TOML syntax) come from serde, with the field path tracked by
//! `serde_path_to_error` and the line from the error's span; value errors
//! are checked here with `toml::Spanned` positions, all reported at once.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use abi::domain::{DmaMode, VbdMode};
use abi::manifest::{self as compiled, Device, DeviceKind, DmaFault, ExitRule};
use abi::pci::Bdf;
use harness::tcppeer::{Forward, TcpSpec};
use harness::{
    Corruption, Equal, Expect, ExpectedExit, Pattern, PeerSpec, Ratio, Scenario, Selector,
};
use serde::Deserialize;
use toml::Spanned;

/// QEMU's default `-m` when `[machine] memory` is left out.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// A scenario's time limit when `[test] timeout_s` is left out.
pub const DEFAULT_TIMEOUT_S: u64 = 60;

const MIB: u64 = 1 << 20;
const MIN_MEMORY: u64 = 32 * MIB;
const MAX_MEMORY: u64 = 1 << 40;
const MAX_DISK: u64 = 1 << 41;
/// Machine memory the checker keeps back for the hypervisor when it adds up
/// the domains' memory.
pub const HYPERVISOR_RESERVE: u64 = 32 * MIB;

/// The domain images there are: the bins of the `guests` and
/// `driver-domains` crates ([`IMAGE_CRATES`]).
pub const IMAGES: &[&str] = &["testdom", "blk", "net"];

/// The crates whose bins are domain images.
pub const IMAGE_CRATES: &[&str] = &["guests", "driver-domains"];

// ---- the TOML schema ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    system: SystemToml,
    machine: Option<MachineToml>,
    #[serde(default)]
    device: Vec<DeviceToml>,
    #[serde(default)]
    domain: Vec<DomainToml>,
    #[serde(default)]
    channel: Vec<ChannelToml>,
    #[serde(default)]
    watch: Vec<WatchToml>,
    #[serde(default)]
    vbd: Vec<VbdToml>,
    #[serde(default)]
    allow: Vec<AllowToml>,
    #[serde(default)]
    vif: Vec<VifToml>,
    host_tcp: Option<TcpToml>,
    test: Option<TestToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VifToml {
    name: Spanned<String>,
    frontend: Spanned<String>,
    backend: Spanned<String>,
    mac: Spanned<String>,
    ip: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VbdToml {
    name: Spanned<String>,
    frontend: Spanned<String>,
    backend: Spanned<String>,
    sectors: Spanned<String>,
    readonly: Option<Spanned<bool>>,
    mode: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowToml {
    from: Spanned<String>,
    to: Spanned<String>,
    perms: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchToml {
    name: Spanned<String>,
    addr: Option<Spanned<String>>,
    domain: Option<Spanned<String>>,
    len: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SystemToml {
    name: Spanned<String>,
    exit: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineToml {
    memory: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceToml {
    kind: Spanned<String>,
    addr: Spanned<String>,
    disk: Option<Spanned<String>>,
    size: Option<Spanned<String>>,
    netdev: Option<Spanned<String>>,
    hostfwd: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainToml {
    name: Spanned<String>,
    image: Spanned<String>,
    memory: Spanned<String>,
    weight: Option<Spanned<i64>>,
    label: Spanned<String>,
    args: Option<Spanned<String>>,
    expect: Option<Spanned<String>>,
    devices: Option<Spanned<Vec<Spanned<String>>>>,
    dma: Option<Spanned<String>>,
    on_dma_fault: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelToml {
    name: Spanned<String>,
    between: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestToml {
    timeout_s: Option<Spanned<u64>>,
    exit: Spanned<String>,
    corrupt: Option<Spanned<String>>,
    #[serde(default)]
    expect: Vec<ExpectToml>,
    #[serde(default)]
    forbid: Vec<ForbidToml>,
    #[serde(default)]
    ratio: Vec<RatioToml>,
    #[serde(default)]
    equal: Vec<EqualToml>,
    peer: Option<PeerToml>,
    disk: Option<DiskToml>,
    tcp: Option<TcpToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpToml {
    connect: Spanned<String>,
    send: Spanned<String>,
    send_pattern: Spanned<String>,
    recv: Spanned<String>,
    recv_pattern: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskToml {
    device: Spanned<String>,
    #[serde(default)]
    fill: Vec<RegionToml>,
    #[serde(default)]
    expect: Vec<RegionToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionToml {
    sectors: Spanned<String>,
    pattern: Spanned<String>,
    base: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerToml {
    frames: Spanned<u32>,
    size: Spanned<u64>,
}

type FieldsToml = BTreeMap<Spanned<String>, serde_json::Value>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectToml {
    ev: Spanned<String>,
    #[serde(default)]
    fields: FieldsToml,
    count: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForbidToml {
    ev: Spanned<String>,
    #[serde(default)]
    fields: FieldsToml,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RatioToml {
    ev: Spanned<String>,
    field: Spanned<String>,
    num: FieldsToml,
    den: FieldsToml,
    expect: Spanned<f64>,
    tolerance: Spanned<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorToml {
    ev: Spanned<String>,
    #[serde(default)]
    fields: FieldsToml,
    field: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EqualToml {
    a: SelectorToml,
    b: SelectorToml,
    any: Option<bool>,
}

// ---- what a checked manifest says ----

/// What backs a device on the QEMU side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    None,
    /// A raw disk image: the path as written, and the size to create it with.
    Disk {
        path: String,
        size: Option<u64>,
    },
    /// QEMU's user network, restricted (no traffic leaves the machine),
    /// with its `hostfwd` rules (TCP from 127.0.0.1 to the guest).
    UserNet {
        hostfwd: Vec<Forward>,
    },
    /// Raw frames as UDP datagrams on 127.0.0.1, to and from the
    /// harness's test peer (`-netdev dgram`).
    UdpNet,
}

/// One device, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedDevice {
    pub kind: DeviceKind,
    pub bdf: Bdf,
    pub backend: Backend,
}

/// One domain, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedDomain {
    pub name: String,
    pub image: String,
    pub memory: u64,
    pub weight: u16,
    pub label: String,
    pub args: String,
    pub expect: compiled::Expect,
    /// The devices it owns: indices into `System::devices`.
    pub devices: Vec<usize>,
    pub dma: DmaMode,
    pub on_dma_fault: DmaFault,
}

/// One watch, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedWatch {
    pub name: String,
    pub target: PlannedWatchTarget,
    pub len: u64,
}

/// What a watch covers: a physical address, or a domain (an index into
/// `System::domains`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlannedWatchTarget {
    Phys(u64),
    Domain(usize),
}

/// One channel, checked: `a` and `b` index `System::domains`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedChannel {
    pub name: String,
    pub a: usize,
    pub b: usize,
}

/// One vbd, checked: `frontend` and `backend` index `System::domains`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedVbd {
    pub name: String,
    pub frontend: usize,
    pub backend: usize,
    pub first_sector: u64,
    pub sectors: u64,
    pub readonly: bool,
    pub mode: VbdMode,
}

/// One vif, checked: `frontend` and `backend` index `System::domains`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedVif {
    pub name: String,
    pub frontend: usize,
    pub backend: usize,
    pub mac: [u8; 6],
    pub ip: [u8; 4],
}

/// One allow rule, checked: `perms` is a set of `abi::manifest::perm` bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedAllow {
    pub subject: String,
    pub object: String,
    pub perms: u8,
}

/// A manifest that passed every check.
#[derive(Clone, Debug)]
pub struct System {
    pub name: String,
    pub memory: u64,
    pub exit: ExitRule,
    pub devices: Vec<PlannedDevice>,
    pub domains: Vec<PlannedDomain>,
    pub channels: Vec<PlannedChannel>,
    pub watches: Vec<PlannedWatch>,
    pub vbds: Vec<PlannedVbd>,
    pub allows: Vec<PlannedAllow>,
    pub vifs: Vec<PlannedVif>,
    /// `[host_tcp]`: the host's TCP peer, which `run` starts (and a
    /// scenario's harness, as its `[test.tcp]`).
    pub host_tcp: Option<TcpSpec>,
    /// The scenario, when the file has a `[test]` table (named after the file).
    pub test: Option<Scenario>,
}

impl System {
    /// The compiled manifest, as the bundle carries it. `exit` overrides the
    /// manifest's exit rule (`run --keep-running`).
    pub fn compile(&self, exit: Option<ExitRule>) -> Result<Vec<u8>, String> {
        let devices: Vec<Device> = self
            .devices
            .iter()
            .map(|d| Device::new(d.kind, d.bdf))
            .collect();
        let domains: Vec<compiled::Domain<'_>> = self
            .domains
            .iter()
            .enumerate()
            .map(|(i, d)| compiled::Domain {
                index: i as u16,
                name: &d.name,
                image: &d.image,
                label: &d.label,
                args: &d.args,
                memory: d.memory,
                weight: d.weight,
                expect: d.expect,
                devices: compiled::DeviceList::new(
                    &d.devices.iter().map(|&i| i as u16).collect::<Vec<_>>(),
                )
                .unwrap_or_default(),
                dma: d.dma,
                on_dma_fault: d.on_dma_fault,
            })
            .collect();
        let channels: Vec<compiled::Channel<'_>> = self
            .channels
            .iter()
            .map(|c| compiled::Channel {
                name: &c.name,
                a: c.a as u16,
                b: c.b as u16,
            })
            .collect();
        let watches: Vec<compiled::Watch<'_>> = self
            .watches
            .iter()
            .map(|w| compiled::Watch {
                name: &w.name,
                target: match w.target {
                    PlannedWatchTarget::Phys(a) => compiled::WatchTarget::Phys(a),
                    PlannedWatchTarget::Domain(i) => compiled::WatchTarget::Domain(i as u16),
                },
                len: w.len,
            })
            .collect();
        let vbds: Vec<compiled::Vbd<'_>> = self
            .vbds
            .iter()
            .map(|v| compiled::Vbd {
                name: &v.name,
                frontend: v.frontend as u16,
                backend: v.backend as u16,
                first_sector: v.first_sector,
                sectors: v.sectors,
                readonly: v.readonly,
                mode: v.mode,
            })
            .collect();
        let allows: Vec<compiled::Allow<'_>> = self
            .allows
            .iter()
            .map(|a| compiled::Allow {
                subject: &a.subject,
                object: &a.object,
                perms: a.perms,
            })
            .collect();
        let vifs: Vec<compiled::Vif<'_>> = self
            .vifs
            .iter()
            .map(|v| compiled::Vif {
                name: &v.name,
                frontend: v.frontend as u16,
                backend: v.backend as u16,
                mac: v.mac,
                ip: v.ip,
            })
            .collect();
        let contents = compiled::Contents {
            name: &self.name,
            exit: exit.unwrap_or(self.exit),
            devices: &devices,
            domains: &domains,
            channels: &channels,
            watches: &watches,
            vbds: &vbds,
            allows: &allows,
            vifs: &vifs,
        };
        let mut out = vec![0; contents.size()];
        let n = compiled::encode(&contents, &mut out)
            .map_err(|e| format!("compiling the manifest: {e}"))?;
        out.truncate(n);
        Ok(out)
    }

    /// The distinct images the domains name, in first-use order.
    pub fn images(&self) -> Vec<&str> {
        let mut v: Vec<&str> = Vec::new();
        for d in &self.domains {
            if !v.contains(&d.image.as_str()) {
                v.push(&d.image);
            }
        }
        v
    }
}

// ---- errors ----

/// One problem in a manifest: where, which field, what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diag {
    /// 1-based; 0 when the parser gave no position.
    pub line: usize,
    /// Field path such as `device[1].kind`; empty for a TOML syntax error.
    pub path: String,
    pub msg: String,
}

/// Every problem found in one file, one per line of Display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Errors {
    pub file: String,
    pub diags: Vec<Diag>,
}

impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diags.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file)?;
            if d.line > 0 {
                write!(f, ":{}", d.line)?;
            }
            if !d.path.is_empty() {
                write!(f, ": {}", d.path)?;
            }
            write!(f, ": {}", d.msg)?;
        }
        Ok(())
    }
}

fn line_of(src: &str, offset: usize) -> usize {
    src.get(..offset)
        .unwrap_or(src)
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

struct Checker<'s> {
    src: &'s str,
    diags: Vec<Diag>,
}

impl Checker<'_> {
    fn err(&mut self, span: Range<usize>, path: impl Into<String>, msg: impl Into<String>) {
        self.diags.push(Diag {
            line: line_of(self.src, span.start),
            path: path.into(),
            msg: msg.into(),
        });
    }
}

/// Turns a serde/TOML error into one diagnostic with a clean path.
fn structure_error(src: &str, e: serde_path_to_error::Error<toml::de::Error>) -> Diag {
    let line = e.inner().span().map_or(0, |s| line_of(src, s.start));
    let mut segs: Vec<String> = Vec::new();
    for seg in e.path().iter() {
        let s = seg.to_string();
        if s.contains("$__serde") || s == "?" {
            continue;
        }
        match seg {
            serde_path_to_error::Segment::Seq { index } => match segs.last_mut() {
                Some(last) => last.push_str(&format!("[{index}]")),
                None => segs.push(format!("[{index}]")),
            },
            _ => segs.push(s),
        }
    }
    let raw = e.inner().message().trim().to_owned();
    let msg = if let Some(rest) = raw.strip_prefix("missing field ") {
        segs.push(rest.trim_matches('`').to_owned());
        "missing field".to_owned()
    } else if let Some(rest) = raw.strip_prefix("unknown field ") {
        match rest.split_once(", expected ") {
            Some((_, expected)) => format!(
                "unknown field (expected {})",
                expected.replace('`', "").replace("one of ", "one of: ")
            ),
            None => "unknown field (this table takes none)".to_owned(),
        }
    } else {
        raw.replace('`', "\"")
    };
    Diag {
        line,
        path: segs.join("."),
        msg,
    }
}

/// Parses a size: digits with an optional K, M, G or T (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || {
        format!("bad size \"{s}\" (expected a number with an optional K, M, G or T suffix, e.g. \"64M\")")
    };
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size \"{s}\" is too large"))
}

/// Parses a PCI address on bus 0, `"DD.F"` in hex, and checks it is free.
pub fn parse_addr(s: &str) -> Result<Bdf, String> {
    let malformed = || {
        format!("malformed address \"{s}\" (expected a PCI slot \"DD.F\" in hex, e.g. \"03.0\")")
    };
    let (dev, func) = s.split_once('.').ok_or_else(malformed)?;
    let hex = |t: &str, max_len| {
        (!t.is_empty() && t.len() <= max_len && t.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u8::from_str_radix(t, 16).ok())
            .flatten()
    };
    let (Some(dev), Some(func)) = (hex(dev, 2), hex(func, 1)) else {
        return Err(malformed());
    };
    if dev > 0x1f {
        return Err(format!("device number {dev:#04x} in \"{s}\" is over 0x1f"));
    }
    if func > 7 {
        return Err(format!("function {func} in \"{s}\" is over 7"));
    }
    if func != 0 {
        return Err(format!(
            "function {func} in \"{s}\": only function 0 is supported (a function above 0 is \
             invisible without a multifunction device at function 0)"
        ));
    }
    match dev {
        0x00 => Err(format!("slot \"{s}\" is taken by q35's host bridge (00:00.0)")),
        0x01 => Err(format!(
            "slot \"{s}\" is reserved for the AMD IOMMU, which takes 00:01.0 under --iommu amd"
        )),
        0x1f => Err(format!(
            "slot \"{s}\" is taken by q35's LPC bridge, SATA and SMBus controllers (00:1f.0, .2, .3)"
        )),
        _ => Ok(Bdf::new(0, dev, func)),
    }
}

fn check_name(s: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if s.is_empty()
        || s.len() > abi::bundle::NAME_MAX
        || !s.chars().all(ok_char)
        || s.starts_with('-')
    {
        return Err(format!(
            "bad system name \"{s}\" (expected 1 to {} of A-Z a-z 0-9 - _, not starting with -)",
            abi::bundle::NAME_MAX
        ));
    }
    Ok(())
}

fn one_of<T: Copy>(all: &[T], name: fn(T) -> &'static str) -> String {
    all.iter().map(|&k| name(k)).collect::<Vec<_>>().join(", ")
}

/// Checks a manifest; `file` is how errors name it, and (its stem) the
/// scenario if it has a `[test]` table.
pub fn check(file: &str, src: &str) -> Result<System, Errors> {
    let errors = |diags| Errors {
        file: file.to_owned(),
        diags,
    };
    let doc: Doc = serde_path_to_error::deserialize(toml::Deserializer::new(src))
        .map_err(|e| errors(vec![structure_error(src, e)]))?;
    let mut c = Checker {
        src,
        diags: Vec::new(),
    };

    let name = doc.system.name.get_ref().clone();
    if let Err(m) = check_name(&name) {
        c.err(doc.system.name.span(), "system.name", m);
    }
    let exit = doc.system.exit.as_ref().and_then(|e| {
        let rule = ExitRule::from_name(e.get_ref());
        if rule.is_none() {
            let all = one_of(&ExitRule::ALL, ExitRule::name);
            c.err(
                e.span(),
                "system.exit",
                format!(
                    "unknown exit rule \"{}\" (expected one of {all})",
                    e.get_ref()
                ),
            );
        }
        rule
    });
    let mut memory = DEFAULT_MEMORY;
    if let Some(m) = doc.machine.as_ref().and_then(|m| m.memory.as_ref()) {
        match parse_size(m.get_ref()) {
            Ok(n) if n < MIN_MEMORY => c.err(
                m.span(),
                "machine.memory",
                format!("{} is less than the 32M airlock needs", m.get_ref()),
            ),
            Ok(n) if n > MAX_MEMORY => c.err(
                m.span(),
                "machine.memory",
                format!("{} is more than 1T", m.get_ref()),
            ),
            Ok(n) if n % MIB != 0 => c.err(
                m.span(),
                "machine.memory",
                format!("{} is not a whole number of MiB", m.get_ref()),
            ),
            Ok(n) => memory = n,
            Err(e) => c.err(m.span(), "machine.memory", e),
        }
    }

    let mut devices = Vec::new();
    let mut addrs: Vec<(Bdf, usize)> = Vec::new();
    let mut disks: Vec<(String, usize)> = Vec::new();
    for (i, d) in doc.device.iter().enumerate() {
        let at = |field: &str| format!("device[{i}].{field}");
        let kind = DeviceKind::from_name(d.kind.get_ref());
        if kind.is_none() {
            let all = one_of(&DeviceKind::ALL, DeviceKind::name);
            c.err(
                d.kind.span(),
                at("kind"),
                format!(
                    "unknown device kind \"{}\" (expected one of {all})",
                    d.kind.get_ref()
                ),
            );
        }
        let bdf = match parse_addr(d.addr.get_ref()) {
            Ok(b) => {
                if let Some(&(_, first)) = addrs.iter().find(|(a, _)| *a == b) {
                    c.err(
                        d.addr.span(),
                        at("addr"),
                        format!(
                            "address \"{}\" already used by device[{first}]",
                            d.addr.get_ref()
                        ),
                    );
                }
                addrs.push((b, i));
                Some(b)
            }
            Err(m) => {
                c.err(d.addr.span(), at("addr"), m);
                None
            }
        };
        let Some(kind) = kind else { continue };
        let not_for = |c: &mut Checker<'_>, field: &Option<Spanned<String>>, name: &str| {
            if let Some(f) = field {
                c.err(
                    f.span(),
                    at(name),
                    format!("{} devices take no {name}", kind.name()),
                );
            }
        };
        let backend = match kind {
            DeviceKind::VirtioBlk => {
                not_for(&mut c, &d.netdev, "netdev");
                let size = d.size.as_ref().and_then(|s| match parse_size(s.get_ref()) {
                    Ok(0) => {
                        c.err(s.span(), at("size"), "a disk of 0 bytes");
                        None
                    }
                    Ok(n) if n % 512 != 0 => {
                        c.err(
                            s.span(),
                            at("size"),
                            format!("{} is not a whole number of 512-byte sectors", s.get_ref()),
                        );
                        None
                    }
                    Ok(n) if n > MAX_DISK => {
                        c.err(
                            s.span(),
                            at("size"),
                            format!("{} is more than 2T", s.get_ref()),
                        );
                        None
                    }
                    Ok(n) => Some(n),
                    Err(e) => {
                        c.err(s.span(), at("size"), e);
                        None
                    }
                });
                match &d.disk {
                    None => {
                        c.err(d.kind.span(), at("disk"), "a virtio-blk device needs a disk (e.g. disk = \"blk.img\" and size = \"64M\")");
                        Backend::None
                    }
                    Some(p) if p.get_ref().is_empty() => {
                        c.err(p.span(), at("disk"), "empty disk path");
                        Backend::None
                    }
                    Some(p) => {
                        if let Some((_, first)) = disks.iter().find(|(q, _)| q == p.get_ref()) {
                            c.err(
                                p.span(),
                                at("disk"),
                                format!("disk \"{}\" already used by device[{first}]", p.get_ref()),
                            );
                        }
                        disks.push((p.get_ref().clone(), i));
                        Backend::Disk {
                            path: p.get_ref().clone(),
                            size,
                        }
                    }
                }
            }
            DeviceKind::VirtioNet => {
                not_for(&mut c, &d.disk, "disk");
                not_for(&mut c, &d.size, "size");
                let mut hostfwd = Vec::new();
                for (k, f) in d.hostfwd.iter().flat_map(|l| l.get_ref()).enumerate() {
                    match Forward::parse(f.get_ref()) {
                        Ok(fw) => hostfwd.push(fw),
                        Err(e) => c.err(f.span(), format!("device[{i}].hostfwd[{k}]"), e),
                    }
                }
                match d.netdev.as_ref().map(|n| (n, n.get_ref().as_str())) {
                    None | Some((_, "user")) => Backend::UserNet { hostfwd },
                    Some((_, "udp")) => {
                        if let Some(h) = &d.hostfwd {
                            c.err(h.span(), at("hostfwd"), "hostfwd is for netdev = \"user\"");
                        }
                        Backend::UdpNet
                    }
                    Some((n, other)) => {
                        c.err(
                            n.span(),
                            at("netdev"),
                            format!("unknown netdev \"{other}\" (expected \"user\" or \"udp\")"),
                        );
                        Backend::UserNet { hostfwd }
                    }
                }
            }
            _ => {
                not_for(&mut c, &d.disk, "disk");
                not_for(&mut c, &d.size, "size");
                not_for(&mut c, &d.netdev, "netdev");
                if let Some(h) = &d.hostfwd {
                    c.err(
                        h.span(),
                        at("hostfwd"),
                        format!("{} devices take no hostfwd", kind.name()),
                    );
                }
                Backend::None
            }
        };
        if let Some(bdf) = bdf {
            devices.push(PlannedDevice { kind, bdf, backend });
        }
    }

    let (domains, channels) = check_domains(&mut c, &doc, memory, &devices);
    let watches = check_watches(&mut c, &doc, memory);
    let vbds = check_vbds(&mut c, &doc, &devices, &domains);
    let allows = check_allows(&mut c, &doc);
    let vifs = check_vifs(&mut c, &doc, &devices, &domains);
    let exit = match (exit, &doc.system.exit) {
        (Some(ExitRule::AllExited), Some(e)) if domains.is_empty() && doc.domain.is_empty() => {
            c.err(
                e.span(),
                "system.exit",
                "exit rule all-exited, but the manifest has no [[domain]] to wait for",
            );
            ExitRule::AllExited
        }
        (Some(ExitRule::AfterReady), Some(e)) if !doc.domain.is_empty() => {
            c.err(
                e.span(),
                "system.exit",
                "exit rule after-ready ends the system before its domains run \
                 (use all-exited, or leave exit out)",
            );
            ExitRule::AfterReady
        }
        (Some(rule), _) => rule,
        (None, _) if doc.domain.is_empty() => ExitRule::AfterReady,
        (None, _) => ExitRule::AllExited,
    };

    let stem = Path::new(file)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let host_tcp = doc
        .host_tcp
        .as_ref()
        .and_then(|t| check_tcp_spec(&mut c, t, "host_tcp"));
    let test = doc.test.as_ref().map(|t| check_test(&mut c, &stem, t));
    check_udp_peer(&mut c, &doc, &devices);
    check_tcp_peer(&mut c, &doc, &devices);
    let disk = check_test_disk(&mut c, &doc, &devices);
    // A scenario runs the system's host peer as its own.
    let test = test.map(|s| Scenario {
        disk,
        tcp: s.tcp.or_else(|| host_tcp.clone()),
        ..s
    });

    if c.diags.is_empty() {
        Ok(System {
            name,
            memory,
            exit,
            devices,
            domains,
            channels,
            watches,
            vbds,
            allows,
            vifs,
            host_tcp,
            test,
        })
    } else {
        c.diags.sort_by_key(|d| d.line);
        Err(errors(c.diags))
    }
}

/// Checks a domain, image, label or channel name: 1..=`max` of a-z 0-9 _ -.
fn check_ident(s: &str, what: &str, max: usize) -> Result<(), String> {
    if s.is_empty() || s.len() > max || !s.bytes().all(compiled::is_name_byte) {
        return Err(format!(
            "bad {what} \"{s}\" (expected 1 to {max} of a-z 0-9 _ -)"
        ));
    }
    Ok(())
}

/// Checks every `[[domain]]` and `[[channel]]`; `machine` is the machine's
/// memory, which the domains' must fit in.
fn check_domains(
    c: &mut Checker<'_>,
    doc: &Doc,
    machine: u64,
    devices: &[PlannedDevice],
) -> (Vec<PlannedDomain>, Vec<PlannedChannel>) {
    let mut domains = Vec::new();
    // Which domain (by position in the file) owns each device so far.
    let mut owner: Vec<Option<usize>> = vec![None; devices.len()];
    let mut total: u64 = 0;
    let mut over_memory = false;
    for (i, d) in doc.domain.iter().enumerate() {
        let at = |field: &str| format!("domain[{i}].{field}");
        let mut ok = true;
        let name = d.name.get_ref();
        if let Err(m) = check_ident(name, "domain name", compiled::DOMAIN_NAME_MAX) {
            c.err(d.name.span(), at("name"), m);
            ok = false;
        } else if let Some(first) = doc.domain[..i]
            .iter()
            .position(|o| o.name.get_ref() == name)
        {
            c.err(
                d.name.span(),
                at("name"),
                format!("domain name \"{name}\" already used by domain[{first}]"),
            );
            ok = false;
        }
        if i == compiled::MAX_DOMAINS {
            c.err(
                d.name.span(),
                at("name"),
                format!(
                    "more than {} domains (each domain's start info lists every other one)",
                    compiled::MAX_DOMAINS
                ),
            );
        }
        let image = d.image.get_ref();
        if !IMAGES.contains(&image.as_str()) {
            c.err(
                d.image.span(),
                at("image"),
                format!(
                    "unknown image \"{image}\" (expected one of {}: the bins of the guests and driver-domains crates)",
                    IMAGES.join(", ")
                ),
            );
            ok = false;
        }
        let mem = d.memory.get_ref();
        let memory = match parse_size(mem) {
            Ok(n) if !(compiled::DOMAIN_MEMORY_MIN..=compiled::DOMAIN_MEMORY_MAX).contains(&n) => {
                c.err(
                    d.memory.span(),
                    at("memory"),
                    format!("{mem} is outside 1M..=64M"),
                );
                None
            }
            Ok(n) if !n.is_multiple_of(compiled::PAGE_SIZE) => {
                c.err(
                    d.memory.span(),
                    at("memory"),
                    format!("{mem} is not a whole number of 4K pages"),
                );
                None
            }
            Ok(n) => Some(n),
            Err(e) => {
                c.err(d.memory.span(), at("memory"), e);
                None
            }
        };
        if let Some(n) = memory {
            total += n;
            if !over_memory && total + HYPERVISOR_RESERVE > machine {
                over_memory = true;
                c.err(
                    d.memory.span(),
                    at("memory"),
                    format!(
                        "the domains so far need {} MiB, more than the machine's {} MiB \
                         less the {} MiB kept for the hypervisor",
                        total.div_ceil(MIB),
                        machine >> 20,
                        HYPERVISOR_RESERVE >> 20
                    ),
                );
            }
        }
        let weight = match &d.weight {
            None => Some(1),
            Some(w) => match u16::try_from(*w.get_ref()) {
                Ok(v) if (1..=compiled::WEIGHT_MAX).contains(&v) => Some(v),
                _ => {
                    c.err(
                        w.span(),
                        at("weight"),
                        format!(
                            "weight {} is outside 1..={}",
                            w.get_ref(),
                            compiled::WEIGHT_MAX
                        ),
                    );
                    None
                }
            },
        };
        let label = d.label.get_ref();
        if let Err(m) = check_ident(label, "label", compiled::DOMAIN_NAME_MAX) {
            c.err(d.label.span(), at("label"), m);
            ok = false;
        }
        let args = d.args.as_ref().map_or("", |a| a.get_ref().as_str());
        if let Some(a) = &d.args {
            if args.len() > abi::domain::ARGS_MAX {
                c.err(
                    a.span(),
                    at("args"),
                    format!(
                        "args of {} bytes, at most {}",
                        args.len(),
                        abi::domain::ARGS_MAX
                    ),
                );
                ok = false;
            } else if !args.bytes().all(compiled::is_args_byte) {
                c.err(
                    a.span(),
                    at("args"),
                    "args must be printable ASCII (no tabs, newlines or other characters)",
                );
                ok = false;
            }
        }
        let expect = match &d.expect {
            None => Some(compiled::Expect::Exit),
            Some(e) => {
                let x = compiled::Expect::from_name(e.get_ref());
                if x.is_none() {
                    c.err(
                        e.span(),
                        at("expect"),
                        format!(
                            "unknown expected end \"{}\" (expected one of {})",
                            e.get_ref(),
                            one_of(&compiled::Expect::ALL, compiled::Expect::name)
                        ),
                    );
                }
                x
            }
        };
        let owned = check_domain_devices(c, doc, i, devices, &mut owner);
        let dma = match &d.dma {
            None => Some(DmaMode::Static),
            Some(m) => {
                let x = compiled::dma_mode_from_name(m.get_ref());
                if x.is_none() {
                    c.err(
                        m.span(),
                        at("dma"),
                        format!(
                            "unknown DMA mode \"{}\" (expected one of {})",
                            m.get_ref(),
                            one_of(&compiled::DMA_MODES, compiled::dma_mode_name)
                        ),
                    );
                }
                x
            }
        };
        let on_dma_fault = match &d.on_dma_fault {
            None => Some(DmaFault::Stop),
            Some(f) => {
                let x = DmaFault::from_name(f.get_ref());
                if x.is_none() {
                    c.err(
                        f.span(),
                        at("on_dma_fault"),
                        format!(
                            "unknown DMA fault rule \"{}\" (expected one of {})",
                            f.get_ref(),
                            one_of(&DmaFault::ALL, DmaFault::name)
                        ),
                    );
                }
                x
            }
        };
        if let (
            true,
            Some(memory),
            Some(weight),
            Some(expect),
            Some(owned),
            Some(dma),
            Some(on_dma_fault),
        ) = (ok, memory, weight, expect, owned, dma, on_dma_fault)
        {
            domains.push(PlannedDomain {
                name: name.clone(),
                image: image.clone(),
                memory,
                weight,
                label: label.clone(),
                args: args.to_owned(),
                expect,
                devices: owned,
                dma,
                on_dma_fault,
            });
        }
    }

    let index_of = |n: &str| doc.domain.iter().position(|d| d.name.get_ref() == n);
    let mut channels = Vec::new();
    let mut ports = vec![0usize; doc.domain.len()];
    for (i, ch) in doc.channel.iter().enumerate() {
        let at = |field: &str| format!("channel[{i}].{field}");
        let mut ok = true;
        let name = ch.name.get_ref();
        if let Err(m) = check_ident(name, "channel name", compiled::CHANNEL_NAME_MAX) {
            c.err(ch.name.span(), at("name"), m);
            ok = false;
        } else if let Some(first) = doc.channel[..i]
            .iter()
            .position(|o| o.name.get_ref() == name)
        {
            c.err(
                ch.name.span(),
                at("name"),
                format!("channel name \"{name}\" already used by channel[{first}]"),
            );
            ok = false;
        }
        let ends = ch.between.get_ref();
        if ends.len() != 2 {
            c.err(
                ch.between.span(),
                at("between"),
                format!(
                    "{} domain(s) given, a channel joins exactly two",
                    ends.len()
                ),
            );
            continue;
        }
        let mut idx = [0usize; 2];
        for (k, e) in ends.iter().enumerate() {
            match index_of(e.get_ref()) {
                Some(j) => idx[k] = j,
                None => {
                    c.err(
                        e.span(),
                        format!("channel[{i}].between[{k}]"),
                        format!("no domain is called \"{}\"", e.get_ref()),
                    );
                    ok = false;
                }
            }
        }
        if !ok {
            continue;
        }
        if idx[0] == idx[1] {
            c.err(
                ch.between.span(),
                at("between"),
                format!(
                    "both ends are domain \"{}\": a channel joins two distinct domains",
                    ends[0].get_ref()
                ),
            );
            continue;
        }
        for (k, &j) in idx.iter().enumerate() {
            ports[j] += 1;
            if ports[j] == abi::domain::MAX_PORTS + 1 {
                c.err(
                    ends[k].span(),
                    format!("channel[{i}].between[{k}]"),
                    format!(
                        "domain \"{}\" would be an end of more than {} channels",
                        ends[k].get_ref(),
                        abi::domain::MAX_PORTS
                    ),
                );
            }
        }
        channels.push(PlannedChannel {
            name: name.clone(),
            a: idx[0],
            b: idx[1],
        });
    }
    (domains, channels)
}

/// Checks domain `i`'s `devices`: each the address of a `[[device]]`, at
/// most [`compiled::MAX_DOMAIN_DEVICES`], none listed twice or owned by an
/// earlier domain (`owner` records who owns what). The indices into
/// `devices`, or `None` after an error.
fn check_domain_devices(
    c: &mut Checker<'_>,
    doc: &Doc,
    i: usize,
    devices: &[PlannedDevice],
    owner: &mut [Option<usize>],
) -> Option<Vec<usize>> {
    let Some(list) = &doc.domain[i].devices else {
        return Some(Vec::new());
    };
    let mut ok = true;
    if list.get_ref().len() > compiled::MAX_DOMAIN_DEVICES {
        c.err(
            list.span(),
            format!("domain[{i}].devices"),
            format!(
                "{} devices, at most {} per domain (its start info holds no more)",
                list.get_ref().len(),
                compiled::MAX_DOMAIN_DEVICES
            ),
        );
        ok = false;
    }
    let name = doc.domain[i].name.get_ref();
    let mut owned: Vec<usize> = Vec::new();
    for (k, a) in list.get_ref().iter().enumerate() {
        let path = format!("domain[{i}].devices[{k}]");
        let bdf = match parse_addr(a.get_ref()) {
            Ok(b) => b,
            Err(m) => {
                c.err(a.span(), path, m);
                ok = false;
                continue;
            }
        };
        let Some(j) = devices.iter().position(|d| d.bdf == bdf) else {
            c.err(
                a.span(),
                path,
                format!("no [[device]] is at \"{}\"", a.get_ref()),
            );
            ok = false;
            continue;
        };
        if owned.contains(&j) {
            c.err(
                a.span(),
                path,
                format!("device \"{}\" is listed twice", a.get_ref()),
            );
            ok = false;
            continue;
        }
        if let Some(first) = owner[j] {
            c.err(
                a.span(),
                path,
                format!(
                    "device \"{}\" ({}) is assigned twice: to domain \"{}\" (domain[{first}]) and to \"{name}\"",
                    a.get_ref(),
                    devices[j].kind,
                    doc.domain[first].name.get_ref()
                ),
            );
            ok = false;
            continue;
        }
        owner[j] = Some(i);
        owned.push(j);
    }
    ok.then_some(owned)
}

/// Parses a physical address: `0x` and hex digits.
pub fn parse_phys(s: &str) -> Result<u64, String> {
    let bad = || format!("bad address \"{s}\" (expected 0x and hex digits, e.g. \"0x100000\")");
    let digits = s.strip_prefix("0x").ok_or_else(bad)?;
    if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    u64::from_str_radix(digits, 16).map_err(|_| bad())
}

/// Physical watches must lie in RAM below this (QEMU's q35 keeps RAM below
/// 2 GiB contiguous from 0 whatever the machine's size).
const WATCH_LOW_RAM: u64 = 2 << 30;

/// Checks every `[[watch]]`; `machine` is the machine's memory.
fn check_watches(c: &mut Checker<'_>, doc: &Doc, machine: u64) -> Vec<PlannedWatch> {
    let mut watches = Vec::new();
    if doc.watch.len() > compiled::MAX_WATCHES {
        let w = &doc.watch[compiled::MAX_WATCHES];
        c.err(
            w.name.span(),
            format!("watch[{}]", compiled::MAX_WATCHES),
            format!("more than {} watches", compiled::MAX_WATCHES),
        );
    }
    for (i, w) in doc.watch.iter().enumerate() {
        let at = |field: &str| format!("watch[{i}].{field}");
        let mut ok = true;
        let name = w.name.get_ref();
        if let Err(m) = check_ident(name, "watch name", compiled::WATCH_NAME_MAX) {
            c.err(w.name.span(), at("name"), m);
            ok = false;
        } else if let Some(first) = doc.watch[..i].iter().position(|o| o.name.get_ref() == name) {
            c.err(
                w.name.span(),
                at("name"),
                format!("watch name \"{name}\" already used by watch[{first}]"),
            );
            ok = false;
        }
        let len = match parse_size(w.len.get_ref()) {
            Ok(n) if n == 0 || n > compiled::WATCH_LEN_MAX => {
                c.err(
                    w.len.span(),
                    at("len"),
                    format!("{} is outside 1..=16M", w.len.get_ref()),
                );
                None
            }
            Ok(n) => Some(n),
            Err(e) => {
                c.err(w.len.span(), at("len"), e);
                None
            }
        };
        let target = match (&w.addr, &w.domain) {
            (Some(_), Some(d)) => {
                c.err(
                    d.span(),
                    at("domain"),
                    "a watch takes addr or domain, not both",
                );
                None
            }
            (None, None) => {
                c.err(
                    w.name.span(),
                    at("addr"),
                    "a watch needs addr (a physical address) or domain (a domain's memory)",
                );
                None
            }
            (Some(a), None) => match parse_phys(a.get_ref()) {
                Ok(addr) => {
                    let limit = machine.min(WATCH_LOW_RAM);
                    match len {
                        Some(n) if addr.checked_add(n).is_none_or(|end| end > limit) => {
                            c.err(
                                a.span(),
                                at("addr"),
                                format!(
                                    "{n} bytes at {} reach past the machine's RAM below {} MiB",
                                    a.get_ref(),
                                    limit >> 20
                                ),
                            );
                            None
                        }
                        _ => Some(PlannedWatchTarget::Phys(addr)),
                    }
                }
                Err(m) => {
                    c.err(a.span(), at("addr"), m);
                    None
                }
            },
            (None, Some(d)) => {
                match doc
                    .domain
                    .iter()
                    .position(|x| x.name.get_ref() == d.get_ref())
                {
                    None => {
                        c.err(
                            d.span(),
                            at("domain"),
                            format!("no domain is called \"{}\"", d.get_ref()),
                        );
                        None
                    }
                    Some(j) => {
                        let mem = parse_size(doc.domain[j].memory.get_ref()).ok();
                        match (len, mem) {
                            (Some(n), Some(m)) if n > m => {
                                c.err(
                                    w.len.span(),
                                    at("len"),
                                    format!(
                                        "{} is more than domain \"{}\"'s {} of memory",
                                        w.len.get_ref(),
                                        d.get_ref(),
                                        doc.domain[j].memory.get_ref()
                                    ),
                                );
                                None
                            }
                            _ => Some(PlannedWatchTarget::Domain(j)),
                        }
                    }
                }
            }
        };
        if let (true, Some(target), Some(len)) = (ok, target, len) {
            watches.push(PlannedWatch {
                name: name.clone(),
                target,
                len,
            });
        }
    }
    watches
}

/// Checks every `[[vbd]]`. `domains` are the domains that passed their
/// checks (a vbd naming one that did not is not checked further).
fn check_vbds(
    c: &mut Checker<'_>,
    doc: &Doc,
    devices: &[PlannedDevice],
    domains: &[PlannedDomain],
) -> Vec<PlannedVbd> {
    use harness::disk::blk_pattern::{parse_range, SECTOR};
    let mut vbds: Vec<PlannedVbd> = Vec::new();
    let mut ends = vec![0usize; doc.domain.len()];
    if doc.vbd.len() > compiled::MAX_VBDS {
        let v = &doc.vbd[compiled::MAX_VBDS];
        c.err(
            v.name.span(),
            format!("vbd[{}]", compiled::MAX_VBDS),
            format!("more than {} vbds", compiled::MAX_VBDS),
        );
    }
    for (i, v) in doc.vbd.iter().enumerate() {
        let at = |field: &str| format!("vbd[{i}].{field}");
        let mut ok = true;
        let name = v.name.get_ref();
        if let Err(m) = check_ident(name, "vbd name", compiled::VBD_NAME_MAX) {
            c.err(v.name.span(), at("name"), m);
            ok = false;
        } else if let Some(first) = doc.vbd[..i]
            .iter()
            .position(|o| o.name.get_ref() == name && o.frontend.get_ref() == v.frontend.get_ref())
        {
            c.err(
                v.name.span(),
                at("name"),
                format!(
                    "domain \"{}\" already has a vbd called \"{name}\" (vbd[{first}])",
                    v.frontend.get_ref()
                ),
            );
            ok = false;
        }
        let end = |c: &mut Checker<'_>, field: &str, s: &Spanned<String>| {
            let j = doc
                .domain
                .iter()
                .position(|d| d.name.get_ref() == s.get_ref());
            if j.is_none() {
                c.err(
                    s.span(),
                    at(field),
                    format!("no domain is called \"{}\"", s.get_ref()),
                );
            }
            j
        };
        let front = end(c, "frontend", &v.frontend);
        let back = end(c, "backend", &v.backend);
        if front.is_some() && front == back {
            c.err(
                v.backend.span(),
                at("backend"),
                format!(
                    "domain \"{}\" is both the frontend and the backend",
                    v.backend.get_ref()
                ),
            );
            ok = false;
        }
        // The backend's disk: its first virtio-blk.
        let disk = back.and_then(|j| {
            let planned = domains
                .iter()
                .find(|d| d.name == *doc.domain[j].name.get_ref())?;
            let disk = planned
                .devices
                .iter()
                .map(|&k| &devices[k])
                .find(|d| d.kind == DeviceKind::VirtioBlk);
            if disk.is_none() {
                c.err(
                    v.backend.span(),
                    at("backend"),
                    format!(
                        "domain \"{}\" owns no virtio-blk to serve the vbd from",
                        v.backend.get_ref()
                    ),
                );
            }
            disk
        });
        let range = match parse_range(v.sectors.get_ref()) {
            Ok(r) => Some(r),
            Err(e) => {
                c.err(
                    v.sectors.span(),
                    at("sectors"),
                    format!("bad sector range \"{}\": {e}", v.sectors.get_ref()),
                );
                None
            }
        };
        if let (
            Some(r),
            Some(PlannedDevice {
                backend: Backend::Disk {
                    size: Some(size), ..
                },
                bdf,
                ..
            }),
        ) = (&range, disk)
        {
            let disk_sectors = size / SECTOR as u64;
            if r.end > disk_sectors {
                c.err(
                    v.sectors.span(),
                    at("sectors"),
                    format!(
                        "sectors {}..{} reach past the end of the disk at {bdf} ({disk_sectors} sectors)",
                        r.start, r.end
                    ),
                );
                ok = false;
            }
        }
        let readonly = v.readonly.as_ref().is_some_and(|r| *r.get_ref());
        let mode = match &v.mode {
            None => Some(VbdMode::Copy),
            Some(m) => {
                let x = compiled::vbd_mode_from_name(m.get_ref());
                if x.is_none() {
                    c.err(
                        m.span(),
                        at("mode"),
                        format!(
                            "unknown vbd mode \"{}\" (expected one of {})",
                            m.get_ref(),
                            one_of(&compiled::VBD_MODES, compiled::vbd_mode_name)
                        ),
                    );
                }
                x
            }
        };
        let (Some(front), Some(back), Some(range), Some(mode), true) =
            (front, back, range, mode, ok && disk.is_some())
        else {
            continue;
        };
        if let Some((first, _)) = vbds.iter().enumerate().find(|(_, o)| {
            o.backend == back
                && o.first_sector < range.end
                && range.start < o.first_sector + o.sectors
                && !(o.readonly && readonly)
        }) {
            c.err(
                v.sectors.span(),
                at("sectors"),
                format!(
                    "sectors {}..{} overlap those of vbd \"{}\" of domain \"{}\" on the same disk \
                     (only read-only vbds may share sectors)",
                    range.start,
                    range.end,
                    vbds[first].name,
                    doc.domain[vbds[first].frontend].name.get_ref()
                ),
            );
            continue;
        }
        for (j, s) in [(front, &v.frontend), (back, &v.backend)] {
            ends[j] += 1;
            if ends[j] == compiled::MAX_DOMAIN_VBDS + 1 {
                c.err(
                    s.span(),
                    at(if j == front { "frontend" } else { "backend" }),
                    format!(
                        "domain \"{}\" would be an end of more than {} vbds (its start info holds no more)",
                        s.get_ref(),
                        compiled::MAX_DOMAIN_VBDS
                    ),
                );
            }
        }
        vbds.push(PlannedVbd {
            name: name.clone(),
            frontend: front,
            backend: back,
            first_sector: range.start,
            sectors: range.end - range.start,
            readonly,
            mode,
        });
    }
    vbds
}

/// `aa:bb:cc:dd:ee:ff` (hex digits either case) as six bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A dotted-quad IPv4 address.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    s.parse::<std::net::Ipv4Addr>().ok().map(|a| a.octets())
}

/// Checks every `[[vif]]`. `domains` are the domains that passed their
/// checks (a vif naming one that did not is not checked further).
fn check_vifs(
    c: &mut Checker<'_>,
    doc: &Doc,
    devices: &[PlannedDevice],
    domains: &[PlannedDomain],
) -> Vec<PlannedVif> {
    let mut vifs: Vec<PlannedVif> = Vec::new();
    let mut ends = vec![0usize; doc.domain.len()];
    if doc.vif.len() > compiled::MAX_VIFS {
        let v = &doc.vif[compiled::MAX_VIFS];
        c.err(
            v.name.span(),
            format!("vif[{}]", compiled::MAX_VIFS),
            format!("more than {} vifs", compiled::MAX_VIFS),
        );
    }
    for (i, v) in doc.vif.iter().enumerate() {
        let at = |field: &str| format!("vif[{i}].{field}");
        let mut ok = true;
        let name = v.name.get_ref();
        if let Err(m) = check_ident(name, "vif name", compiled::VIF_NAME_MAX) {
            c.err(v.name.span(), at("name"), m);
            ok = false;
        } else if let Some(first) = doc.vif[..i]
            .iter()
            .position(|o| o.name.get_ref() == name && o.frontend.get_ref() == v.frontend.get_ref())
        {
            c.err(
                v.name.span(),
                at("name"),
                format!(
                    "domain \"{}\" already has a vif called \"{name}\" (vif[{first}])",
                    v.frontend.get_ref()
                ),
            );
            ok = false;
        }
        let end = |c: &mut Checker<'_>, field: &str, s: &Spanned<String>| {
            let j = doc
                .domain
                .iter()
                .position(|d| d.name.get_ref() == s.get_ref());
            if j.is_none() {
                c.err(
                    s.span(),
                    at(field),
                    format!("no domain is called \"{}\"", s.get_ref()),
                );
            }
            j
        };
        let front = end(c, "frontend", &v.frontend);
        let back = end(c, "backend", &v.backend);
        if front.is_some() && front == back {
            c.err(
                v.backend.span(),
                at("backend"),
                format!(
                    "domain \"{}\" is both the frontend and the backend",
                    v.backend.get_ref()
                ),
            );
            ok = false;
        }
        // The backend's NIC: its first virtio-net.
        let nic = back.and_then(|j| {
            let planned = domains
                .iter()
                .find(|d| d.name == *doc.domain[j].name.get_ref())?;
            let nic = planned
                .devices
                .iter()
                .map(|&k| &devices[k])
                .find(|d| d.kind == DeviceKind::VirtioNet);
            if nic.is_none() {
                c.err(
                    v.backend.span(),
                    at("backend"),
                    format!(
                        "domain \"{}\" owns no virtio-net to serve the vif from",
                        v.backend.get_ref()
                    ),
                );
            }
            nic
        });
        let mac = match parse_mac(v.mac.get_ref()) {
            None => {
                c.err(
                    v.mac.span(),
                    at("mac"),
                    format!(
                        "bad MAC \"{}\" (expected six two-digit hex bytes, aa:bb:cc:dd:ee:ff)",
                        v.mac.get_ref()
                    ),
                );
                None
            }
            Some(m) if !compiled::vif_mac_ok(m) => {
                c.err(
                    v.mac.span(),
                    at("mac"),
                    format!(
                        "MAC {} is {} (a vif's MAC is a unicast address: the low bit of the first byte clear)",
                        v.mac.get_ref(),
                        if m == [0; 6] { "all zero" } else { "multicast" }
                    ),
                );
                None
            }
            Some(m) => {
                if let Some(first) = vifs.iter().position(|o| o.mac == m) {
                    c.err(
                        v.mac.span(),
                        at("mac"),
                        format!(
                            "MAC {} is already vif \"{}\"'s of domain \"{}\"",
                            v.mac.get_ref(),
                            vifs[first].name,
                            doc.domain[vifs[first].frontend].name.get_ref()
                        ),
                    );
                    ok = false;
                }
                Some(m)
            }
        };
        let ip = match parse_ipv4(v.ip.get_ref()) {
            None => {
                c.err(
                    v.ip.span(),
                    at("ip"),
                    format!(
                        "bad IPv4 address \"{}\" (expected a dotted quad such as 10.0.0.1)",
                        v.ip.get_ref()
                    ),
                );
                None
            }
            Some(a) if !compiled::vif_ip_ok(a) => {
                c.err(
                    v.ip.span(),
                    at("ip"),
                    format!(
                        "{} is not a unicast host address (0/8, 127/8, multicast and 240/4 are refused)",
                        v.ip.get_ref()
                    ),
                );
                None
            }
            Some(a) => {
                if let Some(first) = vifs.iter().position(|o| o.ip == a) {
                    c.err(
                        v.ip.span(),
                        at("ip"),
                        format!(
                            "{} is already vif \"{}\"'s of domain \"{}\"",
                            v.ip.get_ref(),
                            vifs[first].name,
                            doc.domain[vifs[first].frontend].name.get_ref()
                        ),
                    );
                    ok = false;
                }
                Some(a)
            }
        };
        let (Some(front), Some(back), Some(mac), Some(ip), true) =
            (front, back, mac, ip, ok && nic.is_some())
        else {
            continue;
        };
        for (j, s) in [(front, &v.frontend), (back, &v.backend)] {
            ends[j] += 1;
            if ends[j] == compiled::MAX_DOMAIN_VIFS + 1 {
                c.err(
                    s.span(),
                    at(if j == front { "frontend" } else { "backend" }),
                    format!(
                        "domain \"{}\" would be an end of more than {} vifs (its start info holds no more)",
                        s.get_ref(),
                        compiled::MAX_DOMAIN_VIFS
                    ),
                );
            }
        }
        vifs.push(PlannedVif {
            name: name.clone(),
            frontend: front,
            backend: back,
            mac,
            ip,
        });
    }
    vifs
}

/// Checks every `[[allow]]`: labels some domain has, known permissions,
/// one rule per (from, to).
fn check_allows(c: &mut Checker<'_>, doc: &Doc) -> Vec<PlannedAllow> {
    let mut labels: Vec<&str> = doc
        .domain
        .iter()
        .map(|d| d.label.get_ref().as_str())
        .collect();
    labels.sort_unstable();
    labels.dedup();
    let mut allows = Vec::new();
    for (i, a) in doc.allow.iter().enumerate() {
        let at = |field: &str| format!("allow[{i}].{field}");
        let mut ok = true;
        for (field, l) in [("from", &a.from), ("to", &a.to)] {
            if !labels.contains(&l.get_ref().as_str()) {
                c.err(
                    l.span(),
                    at(field),
                    format!(
                        "no domain has the label \"{}\" (labels: {})",
                        l.get_ref(),
                        labels.join(", ")
                    ),
                );
                ok = false;
            }
        }
        if let Some(first) = doc.allow[..i]
            .iter()
            .position(|o| o.from.get_ref() == a.from.get_ref() && o.to.get_ref() == a.to.get_ref())
        {
            c.err(
                a.to.span(),
                at("to"),
                format!(
                    "allow[{first}] is already the rule from \"{}\" to \"{}\" (put every permission in one rule)",
                    a.from.get_ref(),
                    a.to.get_ref()
                ),
            );
            ok = false;
        }
        let list = a.perms.get_ref();
        if list.is_empty() {
            c.err(
                a.perms.span(),
                at("perms"),
                "no permission (a rule allows at least one)",
            );
            ok = false;
        }
        let mut perms = 0u8;
        for (k, p) in list.iter().enumerate() {
            match compiled::perm::from_name(p.get_ref()) {
                Some(bit) if perms & bit != 0 => {
                    c.err(
                        p.span(),
                        format!("allow[{i}].perms[{k}]"),
                        format!("permission \"{}\" is listed twice", p.get_ref()),
                    );
                    ok = false;
                }
                Some(bit) => perms |= bit,
                None => {
                    let all: Vec<&str> = compiled::perm::NAMES.iter().map(|(_, n)| *n).collect();
                    c.err(
                        p.span(),
                        format!("allow[{i}].perms[{k}]"),
                        format!(
                            "unknown permission \"{}\" (expected one of {})",
                            p.get_ref(),
                            all.join(", ")
                        ),
                    );
                    ok = false;
                }
            }
        }
        if ok {
            allows.push(PlannedAllow {
                subject: a.from.get_ref().clone(),
                object: a.to.get_ref().clone(),
                perms,
            });
        }
    }
    allows
}

fn check_pattern(
    c: &mut Checker<'_>,
    path: &str,
    ev: &Spanned<String>,
    fields: &FieldsToml,
) -> Pattern {
    let schema = check_ev(c, path, ev);
    check_keys(c, schema, fields, &format!("{path}.fields"))
}

/// The schema of event `ev`, or an error at `{path}.ev`.
fn check_ev(
    c: &mut Checker<'_>,
    path: &str,
    ev: &Spanned<String>,
) -> Option<&'static abi::ev::EventSchema> {
    let schema = abi::ev::schema(ev.get_ref());
    if schema.is_none() {
        let all: Vec<&str> = abi::ev::ALL.iter().map(|s| s.name).collect();
        c.err(
            ev.span(),
            format!("{path}.ev"),
            format!(
                "unknown event \"{}\" (expected one of {})",
                ev.get_ref(),
                all.join(", ")
            ),
        );
    }
    schema
}

/// A pattern of `fields` for an event of `schema` (each key checked, errors
/// at `{fields_path}.KEY`); `ev` names the event.
fn check_keys(
    c: &mut Checker<'_>,
    schema: Option<&'static abi::ev::EventSchema>,
    fields: &FieldsToml,
    fields_path: &str,
) -> Pattern {
    if let Some(schema) = schema {
        for key in fields.keys() {
            let k = key.get_ref();
            if k != "from" && !harness::check::is_schema_key(schema, k) {
                let all: Vec<&str> = schema.fields.iter().map(|f| f.name).collect();
                c.err(
                    key.span(),
                    format!("{fields_path}.{k}"),
                    format!(
                        "event \"{}\" has no field \"{k}\" (its fields: {})",
                        schema.name,
                        all.join(", ")
                    ),
                );
            }
        }
    }
    Pattern {
        ev: schema.map_or_else(String::new, |s| s.name.to_owned()),
        fields: fields
            .iter()
            .map(|(k, v)| (k.get_ref().clone(), v.clone()))
            .collect(),
    }
}

/// A `udp` netdev has one test peer: at most one such device, and in a
/// scenario it comes with `[test.peer]` (and `[test.peer]` with it).
fn check_udp_peer(c: &mut Checker<'_>, doc: &Doc, devices: &[PlannedDevice]) {
    let udp: Vec<usize> = doc
        .device
        .iter()
        .enumerate()
        .filter(|(_, d)| d.netdev.as_ref().is_some_and(|n| n.get_ref() == "udp"))
        .map(|(i, _)| i)
        .collect();
    for &i in udp.iter().skip(1) {
        if let Some(n) = &doc.device[i].netdev {
            c.err(
                n.span(),
                format!("device[{i}].netdev"),
                format!(
                    "a second \"udp\" netdev (device[{}] has one): the test peer answers one",
                    udp[0]
                ),
            );
        }
    }
    let has_udp = devices.iter().any(|d| d.backend == Backend::UdpNet);
    let Some(t) = &doc.test else { return };
    match (&t.peer, has_udp) {
        (Some(p), false) => c.err(
            p.frames.span(),
            "test.peer",
            "[test.peer] answers a virtio-net device with netdev = \"udp\", and there is none",
        ),
        (None, true) => c.err(
            t.exit.span(),
            "test.peer",
            "a virtio-net device has netdev = \"udp\": the scenario needs [test.peer] to answer it",
        ),
        _ => {}
    }
}

/// `hostfwd` rules name distinct guest addresses; `[test.tcp]` and
/// `[host_tcp]` (at most one of them) connect through one of them.
fn check_tcp_peer(c: &mut Checker<'_>, doc: &Doc, devices: &[PlannedDevice]) {
    let all: Vec<Forward> = forwards(devices).map(|(_, f)| f).collect();
    let mut seen: Vec<Forward> = Vec::new();
    for (i, d) in doc.device.iter().enumerate() {
        for (k, f) in d.hostfwd.iter().flat_map(|l| l.get_ref()).enumerate() {
            let Ok(fw) = Forward::parse(f.get_ref()) else {
                continue;
            };
            if seen.contains(&fw) {
                c.err(
                    f.span(),
                    format!("device[{i}].hostfwd[{k}]"),
                    format!("{} is forwarded twice", fw.guest),
                );
            }
            seen.push(fw);
        }
    }
    let test_tcp = doc.test.as_ref().and_then(|t| t.tcp.as_ref());
    if let (Some(t), Some(h)) = (test_tcp, &doc.host_tcp) {
        c.err(
            t.connect.span(),
            "test.tcp",
            format!(
                "the manifest has [host_tcp] (line {}), which the scenario runs too: \
                 declare the host peer once",
                line_of(c.src, h.connect.span().start)
            ),
        );
    }
    for (t, table) in [(test_tcp, "test.tcp"), (doc.host_tcp.as_ref(), "host_tcp")] {
        let Some(t) = t else { continue };
        if let Ok(fw) = Forward::parse(t.connect.get_ref()) {
            if !all.contains(&fw) {
                c.err(
                    t.connect.span(),
                    format!("{table}.connect"),
                    format!(
                        "no virtio-net with netdev = \"user\" has hostfwd = [\"{}\"]",
                        fw.guest
                    ),
                );
            }
        }
    }
}

/// Every `hostfwd` rule of the system, in device order: (its index in
/// that order, the rule). QEMU's host ports are given in this order.
pub fn forwards(devices: &[PlannedDevice]) -> impl Iterator<Item = (usize, Forward)> + '_ {
    devices
        .iter()
        .flat_map(|d| match &d.backend {
            Backend::UserNet { hostfwd } => hostfwd.as_slice(),
            _ => &[],
        })
        .copied()
        .enumerate()
}

fn check_test(c: &mut Checker<'_>, name: &str, t: &TestToml) -> Scenario {
    let mut timeout = DEFAULT_TIMEOUT_S;
    if let Some(s) = &t.timeout_s {
        match *s.get_ref() {
            0 => c.err(s.span(), "test.timeout_s", "a time limit of 0 s"),
            n if n > 3600 => c.err(s.span(), "test.timeout_s", format!("{n} s is over an hour")),
            n => timeout = n,
        }
    }
    let exit = ExpectedExit::from_name(t.exit.get_ref()).unwrap_or_else(|| {
        let all = one_of(&ExpectedExit::ALL, ExpectedExit::name);
        c.err(
            t.exit.span(),
            "test.exit",
            format!(
                "unknown exit \"{}\" (expected one of {all})",
                t.exit.get_ref()
            ),
        );
        ExpectedExit::Success
    });
    let corrupt = t.corrupt.as_ref().and_then(|s| {
        let parsed = Corruption::parse(s.get_ref());
        if parsed.is_none() {
            c.err(
                s.span(),
                "test.corrupt",
                format!(
                    "unknown corruption \"{}\" (expected one of {}; entry-data also takes :NAME)",
                    s.get_ref(),
                    Corruption::NAMES.join(", ")
                ),
            );
        }
        parsed
    });
    let expect = t
        .expect
        .iter()
        .enumerate()
        .map(|(i, e)| Expect {
            pattern: check_pattern(c, &format!("test.expect[{i}]"), &e.ev, &e.fields),
            count: e.count.as_ref().map(|n| *n.get_ref()),
        })
        .collect();
    let forbid = t
        .forbid
        .iter()
        .enumerate()
        .map(|(i, f)| check_pattern(c, &format!("test.forbid[{i}]"), &f.ev, &f.fields))
        .collect();
    let ratios = t
        .ratio
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let path = format!("test.ratio[{i}]");
            let schema = check_ev(c, &path, &r.ev);
            let num = check_keys(c, schema, &r.num, &format!("{path}.num"));
            let den = check_keys(c, schema, &r.den, &format!("{path}.den"));
            check_field(c, &path, &r.ev, &r.field, true);
            let expect = *r.expect.get_ref();
            if !(expect.is_finite() && expect > 0.0) {
                c.err(
                    r.expect.span(),
                    format!("{path}.expect"),
                    format!("expected ratio {expect} is not a positive number"),
                );
            }
            let tolerance = *r.tolerance.get_ref();
            if !(tolerance > 0.0 && tolerance < 1.0) {
                c.err(
                    r.tolerance.span(),
                    format!("{path}.tolerance"),
                    format!("tolerance {tolerance} is not between 0 and 1 (0.10 is 10 %)"),
                );
            }
            let field = r.field.get_ref().clone();
            Ratio {
                num: Selector {
                    pattern: num,
                    field: field.clone(),
                },
                den: Selector {
                    pattern: den,
                    field,
                },
                expect,
                tolerance,
            }
        })
        .collect();
    let equals = t
        .equal
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut sel = |side: &str, s: &SelectorToml| {
                let path = format!("test.equal[{i}].{side}");
                let pattern = check_pattern(c, &path, &s.ev, &s.fields);
                check_field(c, &path, &s.ev, &s.field, false);
                Selector {
                    pattern,
                    field: s.field.get_ref().clone(),
                }
            };
            let a = sel("a", &e.a);
            let b = sel("b", &e.b);
            Equal {
                a,
                b,
                any: e.any.unwrap_or(false),
            }
        })
        .collect();
    let peer = t.peer.as_ref().map(|p| {
        let spec = PeerSpec {
            frames: *p.frames.get_ref(),
            size: usize::try_from(*p.size.get_ref()).unwrap_or(usize::MAX),
        };
        if let Err(e) = spec.check() {
            let (span, path) = if e.starts_with("frames") {
                (p.frames.span(), "test.peer.frames")
            } else {
                (p.size.span(), "test.peer.size")
            };
            c.err(span, path, e);
        }
        spec
    });
    Scenario {
        name: name.to_owned(),
        timeout: Duration::from_secs(timeout),
        exit,
        corrupt,
        expect,
        forbid,
        ratios,
        equals,
        peer,
        disk: None,
        tcp: t
            .tcp
            .as_ref()
            .and_then(|t| check_tcp_spec(c, t, "test.tcp")),
    }
}

/// `[test.tcp]` or `[host_tcp]` (`table`, for messages): a peer's spec.
fn check_tcp_spec(c: &mut Checker<'_>, t: &TcpToml, table: &str) -> Option<TcpSpec> {
    let at = |field: &str| format!("{table}.{field}");
    let connect = match Forward::parse(t.connect.get_ref()) {
        Ok(f) => Some(f),
        Err(e) => {
            c.err(t.connect.span(), at("connect"), e);
            None
        }
    };
    let mut size = |v: &Spanned<String>, path: &str| match parse_size(v.get_ref()) {
        Ok(n) => Some(n),
        Err(e) => {
            c.err(v.span(), path, e);
            None
        }
    };
    let send = size(&t.send, &at("send"));
    let recv = size(&t.recv, &at("recv"));
    let spec = TcpSpec {
        connect: connect?,
        send: send?,
        send_pattern: t.send_pattern.get_ref().clone(),
        recv: recv?,
        recv_pattern: t.recv_pattern.get_ref().clone(),
    };
    if let Err(e) = spec.check() {
        let (span, field) = if e.starts_with("send_pattern") {
            (t.send_pattern.span(), "send_pattern")
        } else if e.starts_with("recv_pattern") {
            (t.recv_pattern.span(), "recv_pattern")
        } else if e.starts_with("send") {
            (t.send.span(), "send")
        } else {
            (t.recv.span(), "recv")
        };
        c.err(span, at(field), e);
    }
    Some(spec)
}

/// `[test.disk]`: a virtio-blk of the manifest with a `size` (the image is
/// made again from it), regions inside the disk, known patterns, and
/// `fill` regions that do not overlap.
fn check_test_disk(
    c: &mut Checker<'_>,
    doc: &Doc,
    devices: &[PlannedDevice],
) -> Option<harness::disk::DiskSpec> {
    use harness::disk::blk_pattern::{self, SECTOR};
    use harness::disk::{Content, DiskSpec, Region};
    let d = doc.test.as_ref()?.disk.as_ref()?;
    let dev = parse_addr(d.device.get_ref())
        .ok()
        .and_then(|b| devices.iter().find(|p| p.bdf == b));
    let (path, size) = match dev.map(|p| &p.backend) {
        Some(Backend::Disk {
            path,
            size: Some(size),
        }) => (path.clone(), *size),
        Some(Backend::Disk { size: None, .. }) => {
            c.err(
                d.device.span(),
                "test.disk.device",
                "the harness makes this disk's image again before boot: its [[device]] needs a size",
            );
            (String::new(), 0)
        }
        _ => {
            c.err(
                d.device.span(),
                "test.disk.device",
                format!("no virtio-blk [[device]] at \"{}\"", d.device.get_ref()),
            );
            (String::new(), 0)
        }
    };
    let sectors = size / SECTOR as u64;
    let mut regions = |list: &[RegionToml], what: &str| -> Vec<Region> {
        let mut out: Vec<Region> = Vec::new();
        for (i, r) in list.iter().enumerate() {
            let at = |f: &str| format!("test.disk.{what}[{i}].{f}");
            let range = match blk_pattern::parse_range(r.sectors.get_ref()) {
                Ok(range) if size > 0 && range.end > sectors => {
                    c.err(
                        r.sectors.span(),
                        at("sectors"),
                        format!("{range:?} reaches past the disk's {sectors} sectors"),
                    );
                    None
                }
                Ok(range) => Some(range),
                Err(e) => {
                    c.err(r.sectors.span(), at("sectors"), e.to_string());
                    None
                }
            };
            let content = Content::parse(r.pattern.get_ref());
            if content.is_none() {
                c.err(
                    r.pattern.span(),
                    at("pattern"),
                    format!(
                        "\"{}\" is neither \"{}\" nor a pattern name (1-{} of A-Z a-z 0-9 _ -)",
                        r.pattern.get_ref(),
                        Content::ZERO,
                        blk_pattern::NAME_MAX
                    ),
                );
            }
            let (Some(sectors), Some(content)) = (range, content) else {
                continue;
            };
            if what == "fill" {
                if let Some(j) = out
                    .iter()
                    .position(|o| o.sectors.start < sectors.end && sectors.start < o.sectors.end)
                {
                    c.err(
                        r.sectors.span(),
                        at("sectors"),
                        format!("overlaps test.disk.fill[{j}]"),
                    );
                }
            }
            let mut region = Region::new(sectors, content);
            if let Some(b) = &r.base {
                if what == "fill" {
                    c.err(
                        b.span(),
                        at("base"),
                        "base is for expect regions (what a vbd wrote); fill writes each sector's own",
                    );
                }
                region.base = *b.get_ref();
            }
            out.push(region);
        }
        out
    };
    let fill = regions(&d.fill, "fill");
    let expect = regions(&d.expect, "expect");
    Some(DiskSpec {
        device: d.device.get_ref().clone(),
        path,
        size,
        fill,
        expect,
    })
}

/// Checks that `field` is one event `ev` has (and, for a ratio, a number).
/// An unknown event was already reported by `check_pattern`.
fn check_field(
    c: &mut Checker<'_>,
    path: &str,
    ev: &Spanned<String>,
    field: &Spanned<String>,
    numeric: bool,
) {
    let Some(schema) = abi::ev::schema(ev.get_ref()) else {
        return;
    };
    let f = field.get_ref();
    let known = f == "from" || harness::check::is_schema_key(schema, f);
    let all = || {
        schema
            .fields
            .iter()
            .map(|f| f.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !known {
        c.err(
            field.span(),
            format!("{path}.field"),
            format!(
                "event \"{}\" has no field \"{f}\" (its fields: {})",
                schema.name,
                all()
            ),
        );
    } else if numeric
        && !schema
            .fields
            .iter()
            .any(|s| s.name == f && s.kind == abi::ev::Kind::Int)
    {
        c.err(
            field.span(),
            format!("{path}.field"),
            format!("field \"{f}\" of event \"{}\" is not a number", schema.name),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = include_str!("../../manifests/default.toml");

    /// Checks `src` (as `manifests/x.toml`) and returns its one error line.
    fn error(src: &str) -> String {
        match check("manifests/x.toml", src) {
            Ok(_) => panic!("accepted:\n{src}"),
            Err(e) => {
                assert_eq!(e.diags.len(), 1, "{e}");
                e.to_string()
            }
        }
    }

    const HEAD: &str = "[system]\nname = \"x\"\n\n";

    fn with_devices(devices: &str) -> String {
        format!("{HEAD}{devices}")
    }

    const BLK: &str =
        "[[device]]\nkind = \"virtio-blk\"\naddr = \"03.0\"\ndisk = \"x.img\"\nsize = \"64M\"\n\n";

    #[test]
    fn the_default_manifest_passes() {
        // What the default system must show, not a copy of the file: a blk
        // driver domain that owns the virtio-blk and serves every other
        // disk user through blkback, guests with distinct labels, and a
        // policy that lets the driver reach each of its frontends.
        let s = check("manifests/default.toml", DEFAULT).unwrap();
        assert_eq!(s.name, "default");
        assert_eq!(s.exit, ExitRule::AllExited);
        assert!(s.test.is_none());
        let bytes = s.compile(None).unwrap();
        let m = abi::manifest::Manifest::parse(&bytes).unwrap();
        assert_eq!(m.name(), "default");
        assert_eq!(m.exit_rule(), ExitRule::AllExited);
        let blk_dev = m.device_at(Bdf::new(0, 3, 0)).unwrap();
        assert_eq!((blk_dev.vendor, blk_dev.device), (0x1af4, 0x1042));
        let doms: Vec<_> = m.domains().collect();
        let blk = doms
            .iter()
            .find(|d| d.image == "blk")
            .expect("a blk driver domain");
        assert!(blk.args.contains("serve=1"));
        assert_eq!(blk.devices.iter().count(), 1);
        let vbds: Vec<_> = m.vbds().collect();
        assert!(vbds.len() >= 2, "guests use disks through blkback");
        for v in &vbds {
            assert_eq!(v.backend, blk.index);
            let front = doms[usize::from(v.frontend)];
            assert_ne!(front.label, blk.label);
            assert!(m.allowed(blk.label, front.label, abi::manifest::perm::GRANT_MAP_READ));
        }
        // A net driver domain that owns the virtio-net at 04.0 and serves
        // every vif through netback, on a user netdev with a hostfwd rule.
        let net_at = Bdf::new(0, 4, 0);
        let net_dev = m.device_at(net_at).unwrap();
        assert_eq!((net_dev.vendor, net_dev.device), (0x1af4, 0x1041));
        let net_index = m.devices().position(|d| d.bdf == net_at).unwrap() as u16;
        let net = m
            .device_owner(net_index)
            .expect("the virtio-net has an owner");
        assert_eq!(net.image, "net");
        assert!(net.args.contains("serve=1"));
        assert_eq!(net.devices.len(), 1);
        let vifs: Vec<_> = m.vifs().collect();
        assert!(vifs.len() >= 3, "guests reach the network through netback");
        for v in &vifs {
            assert_eq!(v.backend, net.index);
            let front = doms[usize::from(v.frontend)];
            assert_ne!(front.label, net.label);
            assert!(front.devices.is_empty(), "a vif's guest owns no device");
            use abi::manifest::perm::{GRANT_COPY, GRANT_MAP_READ, GRANT_MAP_WRITE};
            assert!(m.allowed(
                net.label,
                front.label,
                GRANT_MAP_READ | GRANT_MAP_WRITE | GRANT_COPY
            ));
        }
        let mut macs: Vec<[u8; 6]> = vifs.iter().map(|v| v.mac).collect();
        let mut ips: Vec<[u8; 4]> = vifs.iter().map(|v| v.ip).collect();
        macs.sort_unstable();
        macs.dedup();
        ips.sort_unstable();
        ips.dedup();
        assert_eq!((macs.len(), ips.len()), (vifs.len(), vifs.len()));
        let vif_of = |ip: std::net::Ipv4Addr| vifs.iter().find(|v| v.ip == ip.octets());
        let arg = |d: &abi::manifest::Domain<'_>, key: &str| {
            d.args
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        // Guest to guest: a TCP sender whose destination is another
        // guest's vif, and a receiver there on the same port.
        let pair = doms.iter().find_map(|d| {
            (arg(d, "role")? == "tcp-send").then_some(())?;
            let to = vif_of(arg(d, "to")?.parse().ok()?)?;
            let rx = doms[usize::from(to.frontend)];
            (vifs.iter().any(|v| v.frontend == d.index)
                && rx.index != d.index
                && arg(&rx, "role")? == "tcp-recv"
                && arg(&rx, "port") == arg(d, "port")
                && arg(&rx, "bytes") == arg(d, "bytes")
                && arg(&rx, "pattern") == arg(d, "pattern"))
            .then_some((d.name, rx.name))
        });
        assert!(pair.is_some(), "two guests move data over TCP");
        // Guest to host: [host_tcp] connects through the user netdev's
        // hostfwd rule to a guest's vif, whose role serves it both ways.
        let host = s.host_tcp.as_ref().expect("a host peer for `run`");
        assert!(forwards(&s.devices).any(|(_, f)| f == host.connect));
        let dev = s.devices.iter().find(|d| d.bdf == net_at).unwrap();
        assert!(
            matches!(&dev.backend, Backend::UserNet { hostfwd } if hostfwd.contains(&host.connect))
        );
        let v = vif_of(*host.connect.guest.ip()).expect("the peer reaches a vif");
        let g = doms[usize::from(v.frontend)];
        assert_eq!(arg(&g, "role").as_deref(), Some("tcp-serve"));
        assert_eq!(arg(&g, "port"), Some(host.connect.guest.port().to_string()));
        assert_eq!(arg(&g, "recv_pattern"), Some(host.send_pattern.clone()));
        assert_eq!(arg(&g, "send_pattern"), Some(host.recv_pattern.clone()));
        let size = |key: &str| arg(&g, key).and_then(|n| parse_size(&n).ok());
        assert_eq!(
            (size("recv"), size("send")),
            (Some(host.send), Some(host.recv))
        );
        assert!(host.send > 0 && host.recv > 0, "data moves each way");
        let mut labels: Vec<&str> = doms.iter().map(|d| d.label).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(
            labels.len(),
            doms.len(),
            "every domain has a label of its own"
        );
        let m2 = s.compile(Some(ExitRule::Never)).unwrap();
        assert_eq!(
            abi::manifest::Manifest::parse(&m2).unwrap().exit_rule(),
            ExitRule::Never
        );
    }

    #[test]
    fn every_scenario_passes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let src = std::fs::read_to_string(&p).unwrap();
                let s = check(&p.display().to_string(), &src).unwrap_or_else(|e| panic!("{e}"));
                assert!(s.test.is_some(), "{} has no [test]", p.display());
                n += 1;
            }
        }
        assert!(n >= 2);
    }

    #[test]
    fn unknown_device_kind() {
        let src = with_devices(&format!(
            "{BLK}[[device]]\nkind = \"virtio-foo\"\naddr = \"04.0\"\n"
        ));
        assert_eq!(
            error(&src),
            "manifests/x.toml:11: device[1].kind: unknown device kind \"virtio-foo\" (expected one of \
             virtio-blk, virtio-net, edu, virtio-gpu, virtio-keyboard, virtio-tablet)"
        );
    }

    #[test]
    fn unknown_field() {
        let src = with_devices(&format!(
            "{BLK}[[device]]\nkind = \"virtio-net\"\naddr = \"04.0\"\nspeed = 10\n"
        ));
        assert_eq!(
            error(&src),
            "manifests/x.toml:13: device[1].speed: unknown field (expected one of: kind, addr, disk, size, netdev, hostfwd)"
        );
        let e = error("[system]\nname = \"x\"\ncolour = \"red\"\n");
        assert_eq!(
            e,
            "manifests/x.toml:3: system.colour: unknown field (expected `name` or `exit`)"
                .replace('`', "")
        );
    }

    #[test]
    fn unknown_table() {
        let e = error("[system]\nname = \"x\"\n\n[network]\nmode = 1\n");
        assert!(
            e.starts_with("manifests/x.toml:4: network: unknown field"),
            "{e}"
        );
        let e = error("[system]\nname = \"x\"\n[[devices]]\nkind = \"edu\"\n");
        assert!(
            e.starts_with("manifests/x.toml:3: devices: unknown field"),
            "{e}"
        );
    }

    /// `HEAD`, a virtio-net at 04.0 with `hostfwd` (lines 4-8), then
    /// `rest` from line 10.
    fn with_hostfwd(hostfwd: &str, rest: &str) -> String {
        format!("{HEAD}[[device]]\nkind = \"virtio-net\"\naddr = \"04.0\"\nnetdev = \"user\"\nhostfwd = [{hostfwd}]\n\n{rest}")
    }

    /// A peer table of six lines: `[table]`, connect, send, send_pattern,
    /// recv, recv_pattern.
    fn peer_table(table: &str, connect: &str, send: &str, pattern: &str) -> String {
        format!("[{table}]\nconnect = \"{connect}\"\nsend = \"{send}\"\nsend_pattern = \"{pattern}\"\nrecv = \"1M\"\nrecv_pattern = \"G\"\n\n")
    }

    #[test]
    fn a_host_tcp_peer() {
        let fw = "\"10.0.2.15:5001\", \"10.0.2.16:7\"";
        let host = peer_table("host_tcp", "10.0.2.16:7", "4M", "H");
        let s = check("manifests/x.toml", &with_hostfwd(fw, &host)).unwrap();
        let spec = TcpSpec {
            connect: Forward::parse("10.0.2.16:7").unwrap(),
            send: 4 << 20,
            send_pattern: "H".into(),
            recv: 1 << 20,
            recv_pattern: "G".into(),
        };
        assert_eq!(s.host_tcp.as_ref(), Some(&spec));
        assert!(s.test.is_none());
        assert_eq!(
            forwards(&s.devices)
                .find(|(_, f)| *f == spec.connect)
                .map(|(k, _)| k),
            Some(1)
        );
        // A scenario runs the host peer as its [test.tcp].
        let src = with_hostfwd(fw, &format!("{host}[test]\nexit = \"success\"\n"));
        let t = check("tests/scenarios/h.toml", &src).unwrap().test.unwrap();
        assert_eq!(t.tcp, Some(spec));
        // Without one, no peer at all.
        let s = check("manifests/x.toml", &with_hostfwd(fw, "")).unwrap();
        assert!(s.host_tcp.is_none());

        // Errors name the line and the field.
        let e = error(&with_hostfwd(
            fw,
            &peer_table("host_tcp", "10.0.2.17:7", "4M", "H"),
        ));
        assert_eq!(e, "manifests/x.toml:11: host_tcp.connect: no virtio-net with netdev = \"user\" has hostfwd = [\"10.0.2.17:7\"]");
        let e = error(&with_hostfwd(
            fw,
            &peer_table("host_tcp", "10.0.3.1:7", "4M", "H"),
        ));
        assert!(
            e.starts_with(
                "manifests/x.toml:11: host_tcp.connect: 10.0.3.1 is outside QEMU's user network"
            ),
            "{e}"
        );
        let e = error(&with_hostfwd(
            fw,
            &peer_table("host_tcp", "10.0.2.16:7", "4Q", "H"),
        ));
        assert!(e.starts_with("manifests/x.toml:12: host_tcp.send: "), "{e}");
        let e = error(&with_hostfwd(
            fw,
            &peer_table("host_tcp", "10.0.2.16:7", "2G", "H"),
        ));
        assert!(
            e.starts_with("manifests/x.toml:12: host_tcp.send: send = 2147483648 is more than"),
            "{e}"
        );
        let e = error(&with_hostfwd(
            fw,
            &peer_table("host_tcp", "10.0.2.16:7", "4M", "a b"),
        ));
        assert!(
            e.starts_with("manifests/x.toml:13: host_tcp.send_pattern: send_pattern = \"a b\""),
            "{e}"
        );
        let e = error(&with_hostfwd(
            fw,
            "[host_tcp]\nconnect = \"10.0.2.16:7\"\nsend = \"1M\"\n",
        ));
        assert!(
            e.starts_with("manifests/x.toml:10: host_tcp.send_pattern: missing field"),
            "{e}"
        );
        let e = error(&with_hostfwd(fw, &format!("{host}speed = 1\n")));
        assert!(
            e.starts_with("manifests/x.toml:17: host_tcp.speed: unknown field"),
            "{e}"
        );
        // One host peer: [host_tcp] and [test.tcp] together are refused.
        let both = format!(
            "{host}[test]\nexit = \"success\"\n\n{}",
            peer_table("test.tcp", "10.0.2.15:5001", "1M", "H")
        );
        let e = error(&with_hostfwd(fw, &both));
        assert_eq!(e, "manifests/x.toml:21: test.tcp: the manifest has [host_tcp] (line 11), which the scenario runs too: declare the host peer once");
    }

    #[test]
    fn missing_and_mistyped_fields() {
        let e = error(&with_devices("[[device]]\nkind = \"edu\"\n"));
        assert_eq!(e, "manifests/x.toml:4: device[0].addr: missing field");
        let e = error(&with_devices("[[device]]\nkind = \"edu\"\naddr = 3\n"));
        assert_eq!(
            e,
            "manifests/x.toml:6: device[0].addr: invalid type: integer \"3\", expected a string"
        );
        let e = error("[machine]\nmemory = \"1G\"\n");
        assert!(
            e.starts_with("manifests/x.toml:1: system: missing field"),
            "{e}"
        );
    }

    #[test]
    fn toml_syntax_errors_have_a_line() {
        let e = error("[system]\nname = \"x\"\n\n[[device]]\nkind = virtio-blk\n");
        assert!(e.starts_with("manifests/x.toml:5: "), "{e}");
    }

    #[test]
    fn malformed_addresses() {
        for (addr, msg) in [
            ("3", "malformed address \"3\""),
            ("03:0", "malformed address \"03:0\""),
            ("0x3.0", "malformed address \"0x3.0\""),
            ("", "malformed address \"\""),
            ("20.0", "device number 0x20 in \"20.0\" is over 0x1f"),
            ("03.8", "function 8 in \"03.8\" is over 7"),
            (
                "03.1",
                "function 1 in \"03.1\": only function 0 is supported",
            ),
        ] {
            let e = error(&with_devices(&format!(
                "[[device]]\nkind = \"edu\"\naddr = \"{addr}\"\n"
            )));
            assert!(
                e.starts_with(&format!("manifests/x.toml:6: device[0].addr: {msg}")),
                "{e}"
            );
        }
    }

    #[test]
    fn slots_q35_takes() {
        for (addr, what) in [
            ("00.0", "host bridge"),
            ("01.0", "AMD IOMMU"),
            ("1f.0", "LPC bridge"),
            ("1F.0", "LPC bridge"),
        ] {
            let e = error(&with_devices(&format!(
                "[[device]]\nkind = \"edu\"\naddr = \"{addr}\"\n"
            )));
            assert!(
                e.starts_with("manifests/x.toml:6: device[0].addr: slot"),
                "{e}"
            );
            assert!(e.contains(what), "{e}");
        }
        check(
            "x.toml",
            &with_devices("[[device]]\nkind = \"edu\"\naddr = \"1e.0\"\n"),
        )
        .unwrap();
        check(
            "x.toml",
            &with_devices("[[device]]\nkind = \"edu\"\naddr = \"2.0\"\n"),
        )
        .unwrap();
    }

    #[test]
    fn two_devices_at_one_address() {
        let src = with_devices(&format!(
            "{BLK}[[device]]\nkind = \"virtio-net\"\naddr = \"3.0\"\n"
        ));
        assert_eq!(
            error(&src),
            "manifests/x.toml:12: device[1].addr: address \"3.0\" already used by device[0]"
        );
    }

    #[test]
    fn bad_sizes() {
        for (size, msg) in [
            ("64MB", "bad size \"64MB\""),
            ("M", "bad size \"M\""),
            ("-1M", "bad size \"-1M\""),
            ("0", "a disk of 0 bytes"),
            ("1000", "1000 is not a whole number of 512-byte sectors"),
            ("99999999999999999999", "bad size"),
            ("16777216T", "size \"16777216T\" is too large"),
            ("4T", "4T is more than 2T"),
        ] {
            let src = with_devices(&BLK.replace("\"64M\"", &format!("\"{size}\"")));
            let e = error(&src);
            assert!(
                e.starts_with(&format!("manifests/x.toml:8: device[0].size: {msg}")),
                "{e}"
            );
        }
        for (mem, msg) in [
            ("lots", "bad size \"lots\""),
            ("16M", "16M is less than the 32M"),
            ("1000000K", "1000000K is not a whole number of MiB"),
            ("2T", "2T is more than 1T"),
        ] {
            let e = error(&format!("{HEAD}[machine]\nmemory = \"{mem}\"\n"));
            assert!(
                e.starts_with(&format!("manifests/x.toml:5: machine.memory: {msg}")),
                "{e}"
            );
        }
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("3k"), Ok(3072));
    }

    #[test]
    fn blk_without_a_disk() {
        let src = with_devices("[[device]]\nkind = \"virtio-blk\"\naddr = \"03.0\"\n");
        assert!(error(&src)
            .starts_with("manifests/x.toml:5: device[0].disk: a virtio-blk device needs a disk"));
        let src = with_devices(&BLK.replace("\"x.img\"", "\"\""));
        assert_eq!(
            error(&src),
            "manifests/x.toml:7: device[0].disk: empty disk path"
        );
        let src = with_devices(&format!("{BLK}{}", BLK.replace("03.0", "05.0")));
        assert_eq!(
            error(&src),
            "manifests/x.toml:13: device[1].disk: disk \"x.img\" already used by device[0]"
        );
    }

    #[test]
    fn fields_of_other_kinds() {
        let src =
            with_devices("[[device]]\nkind = \"virtio-net\"\naddr = \"04.0\"\ndisk = \"n.img\"\n");
        assert_eq!(
            error(&src),
            "manifests/x.toml:7: device[0].disk: virtio-net devices take no disk"
        );
        let src = with_devices("[[device]]\nkind = \"edu\"\naddr = \"04.0\"\nnetdev = \"user\"\n");
        assert_eq!(
            error(&src),
            "manifests/x.toml:7: device[0].netdev: edu devices take no netdev"
        );
        let src =
            with_devices("[[device]]\nkind = \"virtio-net\"\naddr = \"04.0\"\nnetdev = \"tap\"\n");
        assert_eq!(
            error(&src),
            "manifests/x.toml:7: device[0].netdev: unknown netdev \"tap\" (expected \"user\" or \"udp\")"
        );
    }

    const NET_UDP: &str =
        "[[device]]\nkind = \"virtio-net\"\naddr = \"04.0\"\nnetdev = \"udp\"\n\n";

    #[test]
    fn a_udp_netdev_and_its_peer() {
        let s = check("x.toml", &with_devices(NET_UDP)).unwrap();
        assert_eq!(s.devices[0].backend, Backend::UdpNet);
        let src = format!(
            "{HEAD}{NET_UDP}[test]\nexit = \"success\"\n\n[test.peer]\nframes = 64\nsize = 600\n"
        );
        let t = check("tests/scenarios/n.toml", &src).unwrap().test.unwrap();
        assert_eq!(
            t.peer,
            Some(PeerSpec {
                frames: 64,
                size: 600
            })
        );
        // Lines: [test] is 9, exit 10, [test.peer] 12, frames 13, size 14.
        let peer = |frames: u32, size: u64| {
            format!("{HEAD}{NET_UDP}[test]\nexit = \"success\"\n\n[test.peer]\nframes = {frames}\nsize = {size}\n")
        };
        assert_eq!(
            error(&peer(0, 600)),
            "manifests/x.toml:13: test.peer.frames: frames = 0 is outside 1..=4096"
        );
        assert!(error(&peer(1, 59))
            .starts_with("manifests/x.toml:14: test.peer.size: size = 59 is outside 60..=1514"));
        assert!(error(&format!("{peer}speed = 1\n", peer = peer(1, 60)))
            .starts_with("manifests/x.toml:15: test.peer.speed: unknown field"));
        // A udp netdev in a scenario needs the peer, and the peer a udp netdev.
        assert_eq!(
            error(&format!("{HEAD}{NET_UDP}[test]\nexit = \"success\"\n")),
            "manifests/x.toml:10: test.peer: a virtio-net device has netdev = \"udp\": the scenario needs [test.peer] to answer it"
        );
        assert_eq!(
            error(&format!("{HEAD}[test]\nexit = \"success\"\n\n[test.peer]\nframes = 1\nsize = 60\n")),
            "manifests/x.toml:8: test.peer: [test.peer] answers a virtio-net device with netdev = \"udp\", and there is none"
        );
        // One peer, one udp netdev.
        let two = format!("{HEAD}{NET_UDP}{}", NET_UDP.replace("04.0", "05.0"));
        assert_eq!(
            error(&two),
            "manifests/x.toml:12: device[1].netdev: a second \"udp\" netdev (device[0] has one): the test peer answers one"
        );
    }

    #[test]
    fn bad_system_fields() {
        let e = error("[system]\nname = \"my system\"\n");
        assert!(
            e.starts_with("manifests/x.toml:2: system.name: bad system name \"my system\""),
            "{e}"
        );
        let e = error(&format!("[system]\nname = \"{}\"\n", "n".repeat(33)));
        assert!(
            e.starts_with("manifests/x.toml:2: system.name: bad system name"),
            "{e}"
        );
        let e = error("[system]\nname = \"x\"\nexit = \"sometimes\"\n");
        assert_eq!(e, "manifests/x.toml:3: system.exit: unknown exit rule \"sometimes\" (expected one of after-ready, never, all-exited)");
    }

    #[test]
    fn every_error_is_reported_in_line_order() {
        let src = with_devices(
            "[[device]]\nkind = \"virtio-foo\"\naddr = \"00.0\"\n\n[[device]]\nkind = \"edu\"\naddr = \"zz\"\n",
        );
        let e = check("m.toml", &src).unwrap_err();
        let lines: Vec<String> = e.to_string().lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), 3, "{e}");
        assert!(lines[0].starts_with("m.toml:5: device[0].kind: "));
        assert!(lines[1].starts_with("m.toml:6: device[0].addr: "));
        assert!(lines[2].starts_with("m.toml:10: device[1].addr: "));
    }

    const TEST_HEAD: &str = "[system]\nname = \"x\"\n\n[test]\nexit = \"success\"\n";

    /// A 1 MiB virtio-blk at 03.0 (lines 1-8), then `[test]` (line 10) and
    /// `[test.disk]` (line 13) with `body` from line 14.
    fn disk_src(size: &str, body: &str) -> String {
        format!(
            "[system]\nname = \"x\"\n\n[[device]]\nkind = \"virtio-blk\"\naddr = \"03.0\"\ndisk = \"x.img\"\n{size}\n\n[test]\nexit = \"success\"\n\n[test.disk]\n{body}\n"
        )
    }

    #[test]
    fn the_test_disk_table() {
        use harness::disk::{Content, Region};
        let s = check(
            "x.toml",
            &disk_src(
                "size = \"1M\"",
                "device = \"03.0\"\nfill = [{ sectors = \"0..64\", pattern = \"A\" }]\nexpect = [{ sectors = \"64..128\", pattern = \"B\" }, { sectors = \"128..2048\", pattern = \"zero\" }]",
            ),
        )
        .unwrap();
        let d = s.test.unwrap().disk.unwrap();
        assert_eq!(
            (d.device.as_str(), d.path.as_str(), d.size),
            ("03.0", "x.img", 1 << 20)
        );
        assert_eq!(d.fill, [Region::new(0..64, Content::Pattern("A".into()))]);
        assert_eq!(d.expect[1].content, Content::Zero);
        assert_eq!(d.expect[1].sectors, 128..2048);
        assert_eq!(d.expect[1].base, 128);
        let s = check(
            "x.toml",
            &disk_src(
                "size = \"1M\"",
                "device = \"03.0\"\nexpect = [{ sectors = \"64..128\", pattern = \"B\", base = 0 }]",
            ),
        )
        .unwrap();
        let r = &s.test.unwrap().disk.unwrap().expect[0];
        assert_eq!((r.sectors.clone(), r.base), (64..128, 0));
        let disk = |size: &str, body: &str| error(&disk_src(size, body));
        assert_eq!(
            disk("size = \"1M\"", "device = \"04.0\""),
            "manifests/x.toml:14: test.disk.device: no virtio-blk [[device]] at \"04.0\""
        );
        assert_eq!(
            disk("", "device = \"03.0\""),
            "manifests/x.toml:14: test.disk.device: the harness makes this disk's image again before boot: its [[device]] needs a size"
        );
        assert_eq!(
            disk("size = \"1M\"", "device = \"03.0\"\nexpect = [{ sectors = \"2000..2049\", pattern = \"zero\" }]"),
            "manifests/x.toml:15: test.disk.expect[0].sectors: 2000..2049 reaches past the disk's 2048 sectors"
        );
        assert_eq!(
            disk("size = \"1M\"", "device = \"03.0\"\nfill = [{ sectors = \"0..8\", pattern = \"a b\" }]"),
            "manifests/x.toml:15: test.disk.fill[0].pattern: \"a b\" is neither \"zero\" nor a pattern name (1-8 of A-Z a-z 0-9 _ -)"
        );
        assert_eq!(
            disk("size = \"1M\"", "device = \"03.0\"\nfill = [{ sectors = \"0..8\", pattern = \"A\", base = 0 }]"),
            "manifests/x.toml:15: test.disk.fill[0].base: base is for expect regions (what a vbd wrote); fill writes each sector's own"
        );
        assert_eq!(
            disk("size = \"1M\"", "device = \"03.0\"\nfill = [{ sectors = \"8..0\", pattern = \"A\" }]"),
            "manifests/x.toml:15: test.disk.fill[0].sectors: an empty range (END must be above START)"
        );
        assert_eq!(
            disk("size = \"1M\"", "device = \"03.0\"\nfill = [\n  { sectors = \"0..8\", pattern = \"A\" },\n  { sectors = \"7..9\", pattern = \"B\" },\n]"),
            "manifests/x.toml:17: test.disk.fill[1].sectors: overlaps test.disk.fill[0]"
        );
    }

    #[test]
    fn the_test_table() {
        let src = format!(
            "{TEST_HEAD}timeout_s = 30\ncorrupt = \"entry-data:manifest\"\n\n[[test.expect]]\nev = \"pci\"\nfields = {{ bdf = \"00:03.0\", vendor = \"0x1af4\" }}\ncount = 1\n\n[[test.forbid]]\nev = \"ready\"\n"
        );
        let s = check("tests/scenarios/bad.toml", &src).unwrap();
        let t = s.test.unwrap();
        assert_eq!(t.name, "bad");
        assert_eq!(t.timeout, Duration::from_secs(30));
        assert_eq!(t.exit, ExpectedExit::Success);
        assert_eq!(
            t.corrupt,
            Some(Corruption::EntryData(Some("manifest".into())))
        );
        assert_eq!(t.expect.len(), 1);
        assert_eq!(t.expect[0].count, Some(1));
        assert_eq!(
            t.expect[0].pattern.fields["vendor"],
            serde_json::json!("0x1af4")
        );
        assert_eq!(t.forbid[0].ev, "ready");
    }

    #[test]
    fn bad_test_fields() {
        let e = error(&format!("{TEST_HEAD}[[test.expect]]\nev = \"reddy\"\n"));
        assert!(e.starts_with("manifests/x.toml:7: test.expect[0].ev: unknown event \"reddy\" (expected one of memory, "), "{e}");
        let e = error(&format!("{TEST_HEAD}[[test.expect]]\nev = \"pci\"\nfields = {{ bdf = \"00:03.0\", vendr = \"0x1af4\" }}\n"));
        assert!(e.starts_with("manifests/x.toml:8: test.expect[0].fields.vendr: event \"pci\" has no field \"vendr\""), "{e}");
        let e = error(&format!(
            "{TEST_HEAD}[[test.forbid]]\nev = \"ready\"\ncount = 1\n"
        ));
        assert!(
            e.starts_with("manifests/x.toml:8: test.forbid[0].count: unknown field"),
            "{e}"
        );
        let e = error(&format!(
            "{TEST_HEAD}[[test.expect]]\nev = \"ready\"\ncount = -1\n"
        ));
        assert!(
            e.starts_with("manifests/x.toml:8: test.expect[0].count: "),
            "{e}"
        );
        let e = error("[system]\nname = \"x\"\n[test]\nexit = \"maybe\"\n");
        assert_eq!(e, "manifests/x.toml:4: test.exit: unknown exit \"maybe\" (expected one of success, failure, timeout)");
        let e = error(&format!("{TEST_HEAD}corrupt = \"shred\"\n"));
        assert!(
            e.starts_with("manifests/x.toml:6: test.corrupt: unknown corruption \"shred\""),
            "{e}"
        );
        let e = error(&format!("{TEST_HEAD}timeout_s = 0\n"));
        assert_eq!(e, "manifests/x.toml:6: test.timeout_s: a time limit of 0 s");
        let e = error("[system]\nname = \"x\"\n[test]\ntimeout_s = 5\n");
        assert_eq!(e, "manifests/x.toml:3: test.exit: missing field");
        // A code's raw sibling and `from` are fields one may match on.
        check("x.toml", &format!("{TEST_HEAD}[[test.forbid]]\nev = \"exception\"\nfields = {{ vector_raw = \"0xe\", from = \"blk\" }}\n")).unwrap();
    }

    const DOM_PING: &str = "[[domain]]\nname = \"ping\"\nimage = \"testdom\"\nmemory = \"4M\"\nlabel = \"guest_a\"\n\n";
    const DOM_PONG: &str = "[[domain]]\nname = \"pong\"\nimage = \"testdom\"\nmemory = \"4M\"\nlabel = \"guest_b\"\n\n";

    /// `HEAD`, the ping and pong domains (lines 4-8 and 10-14), then `rest`
    /// from line 16.
    fn with_domains(rest: &str) -> String {
        format!("{HEAD}{DOM_PING}{DOM_PONG}{rest}")
    }

    #[test]
    fn domains_and_channels() {
        let src = with_domains(
            "[[domain]]\nname = \"att_1\"\nimage = \"testdom\"\nmemory = \"1M\"\nweight = 1000\nlabel = \"attacker\"\nargs = \"attack=hvmem x=~!\"\nexpect = \"fault\"\n\n[[channel]]\nname = \"pp\"\nbetween = [\"ping\", \"pong\"]\n\n[[channel]]\nname = \"side-2\"\nbetween = [\"att_1\", \"ping\"]\n",
        );
        let s = check("m.toml", &src).unwrap();
        // Domains default to exit all-exited, weight 1, expect exit, no args.
        assert_eq!(s.exit, ExitRule::AllExited);
        assert_eq!(s.domains.len(), 3);
        assert_eq!(
            (
                s.domains[0].weight,
                s.domains[0].expect,
                s.domains[0].args.as_str()
            ),
            (1, compiled::Expect::Exit, "")
        );
        assert_eq!(
            s.domains[2],
            PlannedDomain {
                name: "att_1".into(),
                image: "testdom".into(),
                memory: 1 << 20,
                weight: 1000,
                label: "attacker".into(),
                args: "attack=hvmem x=~!".into(),
                expect: compiled::Expect::Fault,
                devices: vec![],
                dma: DmaMode::Static,
                on_dma_fault: DmaFault::Stop,
            }
        );
        assert_eq!(
            s.channels,
            [
                PlannedChannel {
                    name: "pp".into(),
                    a: 0,
                    b: 1
                },
                PlannedChannel {
                    name: "side-2".into(),
                    a: 2,
                    b: 0
                }
            ]
        );
        // One image, however many domains use it.
        assert_eq!(s.images(), ["testdom"]);
        let bytes = s.compile(None).unwrap();
        let m = abi::manifest::Manifest::parse(&bytes).unwrap();
        let d: Vec<_> = m.domains().collect();
        assert_eq!(d.len(), 3);
        assert_eq!(
            (d[2].index, d[2].name, d[2].label, d[2].args, d[2].memory),
            (2, "att_1", "attacker", "attack=hvmem x=~!", 1 << 20)
        );
        assert_eq!(d[2].expect, compiled::Expect::Fault);
        let c: Vec<_> = m.channels().map(|c| (c.name, c.a, c.b)).collect();
        assert_eq!(c, [("pp", 0, 1), ("side-2", 2, 0)]);
        // run --keep-running still overrides the rule.
        let b = s.compile(Some(ExitRule::Never)).unwrap();
        assert_eq!(
            abi::manifest::Manifest::parse(&b).unwrap().exit_rule(),
            ExitRule::Never
        );
    }

    #[test]
    fn bad_domain_fields() {
        for (field, value, msg) in [
            ("name", "\"Ping\"", "domain[0].name: bad domain name \"Ping\" (expected 1 to 32 of a-z 0-9 _ -)"),
            ("name", "\"\"", "domain[0].name: bad domain name \"\""),
            ("name", &format!("\"{}\"", "a".repeat(33)), "domain[0].name: bad domain name"),
            ("image", "\"hypervisor\"", "domain[0].image: unknown image \"hypervisor\" (expected one of testdom, blk, net: the bins of the guests and driver-domains crates)"),
            ("memory", "\"512K\"", "domain[0].memory: 512K is outside 1M..=64M"),
            ("memory", "\"65M\"", "domain[0].memory: 65M is outside 1M..=64M"),
            ("memory", "\"4098K\"", "domain[0].memory: 4098K is not a whole number of 4K pages"),
            ("memory", "\"lots\"", "domain[0].memory: bad size \"lots\""),
            ("label", "\"guest a\"", "domain[0].label: bad label \"guest a\""),
            ("label", &format!("\"{}\"", "l".repeat(33)), "domain[0].label: bad label"),
        ] {
            let dom: String = DOM_PING
                .lines()
                .map(|l| {
                    if l.starts_with(&format!("{field} = ")) {
                        format!("{field} = {value}\n")
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            let e = error(&format!("{HEAD}{dom}"));
            assert!(e.starts_with("manifests/x.toml:"), "{e}");
            assert!(e.contains(msg), "{field} = {value}: {e}");
        }
        for (extra, msg) in [
            ("weight = 0", "manifests/x.toml:10: domain[0].weight: weight 0 is outside 1..=1000"),
            ("weight = 1001", "manifests/x.toml:10: domain[0].weight: weight 1001 is outside 1..=1000"),
            ("weight = -3", "manifests/x.toml:10: domain[0].weight: weight -3 is outside 1..=1000"),
            ("expect = \"crash\"", "manifests/x.toml:10: domain[0].expect: unknown expected end \"crash\" (expected one of exit, fault)"),
            ("args = \"a\\tb\"", "manifests/x.toml:10: domain[0].args: args must be printable ASCII"),
            ("args = \"é\"", "manifests/x.toml:10: domain[0].args: args must be printable ASCII"),
        ] {
            let e = error(&format!("{HEAD}{DOM_PING}{extra}\n"));
            assert!(e.starts_with(msg), "{extra}: {e}");
        }
        let e = error(&format!("{HEAD}{DOM_PING}args = \"{}\"\n", "a".repeat(129)));
        assert_eq!(
            e,
            "manifests/x.toml:10: domain[0].args: args of 129 bytes, at most 128"
        );
        let e = error(&format!("{HEAD}{DOM_PING}colour = \"red\"\n"));
        assert!(e.starts_with("manifests/x.toml:10: domain[0].colour: unknown field (expected one of: name, image, memory, weight, label, args, expect, devices, dma, on_dma_fault)"), "{e}");
        let e = error(&format!(
            "{HEAD}[[domain]]\nname = \"x\"\nimage = \"testdom\"\nmemory = \"1M\"\n"
        ));
        assert_eq!(e, "manifests/x.toml:4: domain[0].label: missing field");
    }

    #[test]
    fn duplicate_and_too_many_domains() {
        let e = error(&format!("{HEAD}{DOM_PING}{DOM_PING}"));
        assert_eq!(
            e,
            "manifests/x.toml:11: domain[1].name: domain name \"ping\" already used by domain[0]"
        );
        let mut src = format!("{HEAD}[machine]\nmemory = \"1G\"\n\n");
        for i in 0..18 {
            src.push_str(&DOM_PING.replace("\"ping\"", &format!("\"d{i}\"")));
        }
        let e = error(&src);
        assert!(
            e.starts_with("manifests/x.toml:")
                && e.contains(": domain[17].name: more than 17 domains"),
            "{e}"
        );
        // Seventeen fit.
        let src: String = src
            .lines()
            .take(6 + 17 * 6)
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(check("x.toml", &src).unwrap().domains.len(), 17);
    }

    #[test]
    fn domains_must_fit_the_machine() {
        // 48M machine: 32M for the hypervisor, 16M for domains.
        let big = |n: &str, m: &str| {
            format!("[[domain]]\nname = \"{n}\"\nimage = \"testdom\"\nmemory = \"{m}\"\nlabel = \"l\"\n\n")
        };
        let src = format!(
            "{HEAD}[machine]\nmemory = \"48M\"\n\n{}{}",
            big("a", "8M"),
            big("b", "8M")
        );
        check("x.toml", &src).unwrap();
        let src = format!("{src}{}", big("c", "4K"));
        let e = check("x.toml", &src).unwrap_err().to_string();
        assert!(e.contains("domain[2].memory: 4K is outside"), "{e}");
        let src = format!(
            "{HEAD}[machine]\nmemory = \"48M\"\n\n{}{}",
            big("a", "8M"),
            big("b", "12M")
        );
        assert_eq!(
            error(&src),
            "manifests/x.toml:16: domain[1].memory: the domains so far need 20 MiB, more than \
             the machine's 48 MiB less the 32 MiB kept for the hypervisor"
        );
    }

    #[test]
    fn bad_channels() {
        for (chan, msg) in [
            (
                "name = \"pp\"\nbetween = [\"ping\", \"pang\"]",
                "manifests/x.toml:18: channel[0].between[1]: no domain is called \"pang\"",
            ),
            (
                "name = \"pp\"\nbetween = [\"ping\", \"ping\"]",
                "manifests/x.toml:18: channel[0].between: both ends are domain \"ping\": a channel joins two distinct domains",
            ),
            (
                "name = \"pp\"\nbetween = [\"ping\"]",
                "manifests/x.toml:18: channel[0].between: 1 domain(s) given, a channel joins exactly two",
            ),
            (
                "name = \"pp\"\nbetween = [\"ping\", \"pong\", \"ping\"]",
                "manifests/x.toml:18: channel[0].between: 3 domain(s) given",
            ),
            (
                "name = \"a-channel-name-over-24-bytes\"\nbetween = [\"ping\", \"pong\"]",
                "manifests/x.toml:17: channel[0].name: bad channel name \"a-channel-name-over-24-bytes\" (expected 1 to 24 of a-z 0-9 _ -)",
            ),
            (
                "name = \"p p\"\nbetween = [\"ping\", \"pong\"]",
                "manifests/x.toml:17: channel[0].name: bad channel name \"p p\"",
            ),
            (
                "name = \"pp\"",
                "manifests/x.toml:16: channel[0].between: missing field",
            ),
            (
                "name = \"pp\"\nbetween = \"ping\"",
                "manifests/x.toml:18: channel[0].between: invalid type",
            ),
        ] {
            let e = error(&with_domains(&format!("[[channel]]\n{chan}\n")));
            assert!(e.starts_with(msg), "{chan}: {e}");
        }
        let two = "[[channel]]\nname = \"pp\"\nbetween = [\"ping\", \"pong\"]\n\n";
        assert_eq!(
            error(&with_domains(&format!("{two}{two}"))),
            "manifests/x.toml:21: channel[1].name: channel name \"pp\" already used by channel[0]"
        );
    }

    #[test]
    fn a_domain_with_too_many_channels() {
        let mut rest = String::new();
        for i in 0..17 {
            rest.push_str(&format!(
                "[[channel]]\nname = \"c{i}\"\nbetween = [\"ping\", \"pong\"]\n\n"
            ));
        }
        let e = check("x.toml", &with_domains(&rest)).unwrap_err();
        // Both ends go over, on the seventeenth channel.
        assert_eq!(
            e.to_string(),
            "x.toml:82: channel[16].between[0]: domain \"ping\" would be an end of more than 16 channels\n\
             x.toml:82: channel[16].between[1]: domain \"pong\" would be an end of more than 16 channels"
        );
        let sixteen: String = rest
            .lines()
            .take(16 * 4)
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            check("x.toml", &with_domains(&sixteen))
                .unwrap()
                .channels
                .len(),
            16
        );
    }

    #[test]
    fn exit_rules_and_domains() {
        // Without domains the default stays after-ready; all-exited is refused.
        assert_eq!(check("x.toml", HEAD).unwrap().exit, ExitRule::AfterReady);
        assert_eq!(
            error("[system]\nname = \"x\"\nexit = \"all-exited\"\n"),
            "manifests/x.toml:3: system.exit: exit rule all-exited, but the manifest has no [[domain]] to wait for"
        );
        // With domains, after-ready would never run them.
        let src = format!("[system]\nname = \"x\"\nexit = \"after-ready\"\n\n{DOM_PING}");
        assert_eq!(
            error(&src),
            "manifests/x.toml:3: system.exit: exit rule after-ready ends the system before its \
             domains run (use all-exited, or leave exit out)"
        );
        let src = format!("[system]\nname = \"x\"\nexit = \"never\"\n\n{DOM_PING}");
        assert_eq!(check("x.toml", &src).unwrap().exit, ExitRule::Never);
    }

    #[test]
    fn every_domain_image_is_a_bin_of_an_image_crate() {
        let mut bins: Vec<String> = Vec::new();
        for krate in IMAGE_CRATES {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(krate)
                .join("src/bin");
            bins.extend(std::fs::read_dir(&dir).unwrap().filter_map(|e| {
                let p = e.unwrap().path();
                (p.extension()? == "rs")
                    .then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
            }));
        }
        bins.sort();
        let mut images: Vec<&str> = IMAGES.to_vec();
        images.sort();
        assert_eq!(
            bins, images,
            "IMAGES must list the bins of guests/src/bin and driver-domains/src/bin"
        );
        for i in IMAGES {
            check_ident(i, "image", compiled::DOMAIN_NAME_MAX).unwrap();
        }
    }

    const EDU_NET: &str = "[[device]]\nkind = \"edu\"\naddr = \"05.0\"\n\n[[device]]\nkind = \"virtio-net\"\naddr = \"04.0\"\n\n";

    /// `HEAD`, an edu at 05.0 and a net at 04.0 (lines 4-10), then two
    /// domains "a" and "b" (from line 11, six lines each) with `a_extra`
    /// and `b_extra` as their last lines, then `rest`.
    fn with_owners(a_extra: &str, b_extra: &str, rest: &str) -> String {
        let dom = |n: &str, extra: &str| {
            format!("[[domain]]\nname = \"{n}\"\nimage = \"testdom\"\nmemory = \"2M\"\nlabel = \"l\"\n{extra}\n")
        };
        format!(
            "{HEAD}{EDU_NET}{}{}{rest}",
            dom("a", a_extra),
            dom("b", b_extra)
        )
    }

    #[test]
    fn devices_dma_and_fault_rules() {
        let src = with_owners(
            "devices = [\"05.0\", \"04.0\"]\ndma = \"strict\"\non_dma_fault = \"report\"",
            "",
            "",
        );
        let s = check("x.toml", &src).unwrap();
        assert_eq!(s.domains[0].devices, [0, 1]);
        assert_eq!(
            (s.domains[0].dma, s.domains[0].on_dma_fault),
            (DmaMode::Strict, DmaFault::Report)
        );
        // Defaults: no devices, static, stop.
        assert_eq!(
            (
                &s.domains[1].devices[..],
                s.domains[1].dma,
                s.domains[1].on_dma_fault
            ),
            (&[][..], DmaMode::Static, DmaFault::Stop)
        );
        let bytes = s.compile(None).unwrap();
        let m = abi::manifest::Manifest::parse(&bytes)
            .unwrap()
            .domains()
            .collect::<Vec<_>>();
        assert_eq!(m[0].devices.as_slice(), [0, 1]);
        assert_eq!(
            (m[0].dma, m[0].on_dma_fault),
            (DmaMode::Strict, DmaFault::Report)
        );
        assert!(m[1].devices.is_empty());
    }

    #[test]
    fn bad_device_assignments() {
        for (a, b, msg) in [
            (
                "devices = [\"05.0\"]",
                "devices = [\"05.0\"]",
                "x.toml:23: domain[1].devices[0]: device \"05.0\" (edu) is assigned twice: to domain \"a\" (domain[0]) and to \"b\"",
            ),
            (
                "devices = [\"06.0\"]",
                "",
                "x.toml:17: domain[0].devices[0]: no [[device]] is at \"06.0\"",
            ),
            (
                "devices = [\"5.0\", \"05.0\"]",
                "",
                "x.toml:17: domain[0].devices[1]: device \"05.0\" is listed twice",
            ),
            (
                "devices = [\"zz\"]",
                "",
                "x.toml:17: domain[0].devices[0]: malformed address \"zz\"",
            ),
            (
                "devices = [\"05.0\", \"04.0\", \"07.0\", \"08.0\", \"09.0\"]",
                "",
                "x.toml:17: domain[0].devices: 5 devices, at most 4 per domain",
            ),
            (
                "dma = \"lazy\"",
                "",
                "x.toml:17: domain[0].dma: unknown DMA mode \"lazy\" (expected one of static, strict)",
            ),
            (
                "on_dma_fault = \"panic\"",
                "",
                "x.toml:17: domain[0].on_dma_fault: unknown DMA fault rule \"panic\" (expected one of stop, report)",
            ),
        ] {
            let e = check("x.toml", &with_owners(a, b, "")).unwrap_err().to_string();
            assert!(e.starts_with(msg), "{a} / {b}: {e}");
        }
    }

    #[test]
    fn watches() {
        let src = with_owners(
            "",
            "",
            "[[watch]]\nname = \"hv\"\naddr = \"0x100000\"\nlen = \"4K\"\n\n[[watch]]\nname = \"b-first\"\ndomain = \"b\"\nlen = \"4K\"\n",
        );
        let s = check("x.toml", &src).unwrap();
        assert_eq!(
            s.watches,
            [
                PlannedWatch {
                    name: "hv".into(),
                    target: PlannedWatchTarget::Phys(0x10_0000),
                    len: 4096
                },
                PlannedWatch {
                    name: "b-first".into(),
                    target: PlannedWatchTarget::Domain(1),
                    len: 4096
                }
            ]
        );
        let bytes = s.compile(None).unwrap();
        let m = abi::manifest::Manifest::parse(&bytes).unwrap();
        let w: Vec<_> = m.watches().collect();
        assert_eq!(w[0].target, compiled::WatchTarget::Phys(0x10_0000));
        assert_eq!(
            (w[1].name, w[1].target, w[1].len),
            ("b-first", compiled::WatchTarget::Domain(1), 4096)
        );
        for (body, msg) in [
            ("name = \"w\"\nlen = \"4K\"", "x.toml:25: watch[0].addr: a watch needs addr"),
            ("name = \"w\"\naddr = \"0x0\"\ndomain = \"a\"\nlen = \"4K\"", "x.toml:27: watch[0].domain: a watch takes addr or domain, not both"),
            ("name = \"w\"\naddr = \"100000\"\nlen = \"4K\"", "x.toml:26: watch[0].addr: bad address \"100000\""),
            ("name = \"w\"\naddr = \"0xfffff000\"\nlen = \"8K\"", "x.toml:26: watch[0].addr: 8192 bytes at 0xfffff000 reach past the machine's RAM below 256 MiB"),
            ("name = \"w\"\naddr = \"0x0\"\nlen = \"0\"", "x.toml:27: watch[0].len: 0 is outside 1..=16M"),
            ("name = \"w\"\naddr = \"0x0\"\nlen = \"17M\"", "x.toml:27: watch[0].len: 17M is outside 1..=16M"),
            ("name = \"w\"\ndomain = \"c\"\nlen = \"4K\"", "x.toml:26: watch[0].domain: no domain is called \"c\""),
            ("name = \"w\"\ndomain = \"a\"\nlen = \"3M\"", "x.toml:27: watch[0].len: 3M is more than domain \"a\"'s 2M of memory"),
            ("name = \"W\"\naddr = \"0x0\"\nlen = \"4K\"", "x.toml:25: watch[0].name: bad watch name \"W\""),
            ("name = \"w\"\naddr = \"0x0\"\nlen = \"4K\"\n\n[[watch]]\nname = \"w\"\naddr = \"0x0\"\nlen = \"4K\"", "x.toml:30: watch[1].name: watch name \"w\" already used by watch[0]"),
        ] {
            let e = check("x.toml", &with_owners("", "", &format!("[[watch]]\n{body}\n")))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(msg), "{body}: {e}");
        }
    }

    /// `HEAD`, a 64M virtio-blk at 03.0 and an edu at 05.0 (lines 4-12),
    /// the domains blk (owns 03.0, label blk_driver), g1 (guest_a), g2
    /// (guest_b) and e (owns the edu; label guest_b), six lines each from
    /// line 14, then `rest` from line 38.
    fn with_vbds(rest: &str) -> String {
        let dom = |n: &str, label: &str, extra: &str| {
            format!("[[domain]]\nname = \"{n}\"\nimage = \"testdom\"\nmemory = \"2M\"\nlabel = \"{label}\"\n{extra}\n")
        };
        format!(
            "{HEAD}{BLK}[[device]]\nkind = \"edu\"\naddr = \"05.0\"\n\n{}{}{}{}{rest}",
            dom("blk", "blk_driver", "devices = [\"03.0\"]"),
            dom("g1", "guest_a", ""),
            dom("g2", "guest_b", ""),
            dom("e", "guest_b", "devices = [\"05.0\"]"),
        )
    }

    fn vbd(name: &str, front: &str, sectors: &str, extra: &str) -> String {
        format!("[[vbd]]\nname = \"{name}\"\nfrontend = \"{front}\"\nbackend = \"blk\"\nsectors = \"{sectors}\"\n{extra}\n")
    }

    #[test]
    fn vbds_and_allow_rules() {
        let src = with_vbds(&format!(
            "{}{}{}[[allow]]\nfrom = \"blk_driver\"\nto = \"guest_a\"\nperms = [\"grant_map_read\", \"grant_map_write\"]\n\n[[allow]]\nfrom = \"blk_driver\"\nto = \"guest_b\"\nperms = [\"grant_copy\", \"event_bind\"]\n",
            vbd("xvda", "g1", "0..4096", "mode = \"map\""),
            vbd("xvda", "g2", "4096..8192", ""),
            vbd("xvdb", "g2", "0..8192", "readonly = true\nmode = \"copy\""),
        ));
        // xvdb overlaps both, and xvda of g1 is writable: refused.
        assert_eq!(
            check("x.toml", &src).unwrap_err().to_string(),
            "x.toml:54: vbd[2].sectors: sectors 0..8192 overlap those of vbd \"xvda\" of domain \"g1\" on the same disk (only read-only vbds may share sectors)"
        );
        let src = src.replace("\"0..4096\"\n", "\"0..4096\"\nreadonly = true\n");
        let src = src.replace("\"4096..8192\"\n", "\"4096..8192\"\nreadonly = true\n");
        let s = check("x.toml", &src).unwrap();
        assert_eq!(
            s.vbds,
            [
                PlannedVbd {
                    name: "xvda".into(),
                    frontend: 1,
                    backend: 0,
                    first_sector: 0,
                    sectors: 4096,
                    readonly: true,
                    mode: VbdMode::Map
                },
                PlannedVbd {
                    name: "xvda".into(),
                    frontend: 2,
                    backend: 0,
                    first_sector: 4096,
                    sectors: 4096,
                    readonly: true,
                    mode: VbdMode::Copy
                },
                PlannedVbd {
                    name: "xvdb".into(),
                    frontend: 2,
                    backend: 0,
                    first_sector: 0,
                    sectors: 8192,
                    readonly: true,
                    mode: VbdMode::Copy
                },
            ]
        );
        use compiled::perm;
        assert_eq!(
            s.allows,
            [
                PlannedAllow {
                    subject: "blk_driver".into(),
                    object: "guest_a".into(),
                    perms: perm::GRANT_MAP_READ | perm::GRANT_MAP_WRITE
                },
                PlannedAllow {
                    subject: "blk_driver".into(),
                    object: "guest_b".into(),
                    perms: perm::GRANT_COPY | perm::EVENT_BIND
                },
            ]
        );
        let bytes = s.compile(None).unwrap();
        let m = abi::manifest::Manifest::parse(&bytes).unwrap();
        let v: Vec<_> = m.vbds().collect();
        assert_eq!(v.len(), 3);
        assert_eq!(
            (
                v[1].name,
                v[1].frontend,
                v[1].backend,
                v[1].first_sector,
                v[1].sectors
            ),
            ("xvda", 2, 0, 4096, 4096)
        );
        assert_eq!(m.vbds_of(0).count(), 3);
        assert!(m.allowed("blk_driver", "guest_a", perm::GRANT_MAP_WRITE));
        assert!(!m.allowed("blk_driver", "guest_a", perm::GRANT_COPY));
        assert!(!m.allowed("guest_a", "blk_driver", perm::GRANT_MAP_READ));
    }

    #[test]
    fn bad_vbds() {
        for (body, msg) in [
            (
                vbd("xvda", "g3", "0..8", ""),
                "x.toml:40: vbd[0].frontend: no domain is called \"g3\"",
            ),
            (
                vbd("xvda", "blk", "0..8", ""),
                "x.toml:41: vbd[0].backend: domain \"blk\" is both the frontend and the backend",
            ),
            (
                vbd("xvda", "g1", "0..8", "").replace("backend = \"blk\"", "backend = \"e\""),
                "x.toml:41: vbd[0].backend: domain \"e\" owns no virtio-blk to serve the vbd from",
            ),
            (
                vbd("xvda", "g1", "8..8", ""),
                "x.toml:42: vbd[0].sectors: bad sector range \"8..8\": an empty range",
            ),
            (
                vbd("xvda", "g1", "0..131073", ""),
                "x.toml:42: vbd[0].sectors: sectors 0..131073 reach past the end of the disk at 00:03.0 (131072 sectors)",
            ),
            (
                vbd("XVDA", "g1", "0..8", ""),
                "x.toml:39: vbd[0].name: bad vbd name \"XVDA\" (expected 1 to 16 of a-z 0-9 _ -)",
            ),
            (
                vbd("a-very-long-vbd-name", "g1", "0..8", ""),
                "x.toml:39: vbd[0].name: bad vbd name",
            ),
            (
                vbd("xvda", "g1", "0..8", "mode = \"dma\""),
                "x.toml:43: vbd[0].mode: unknown vbd mode \"dma\" (expected one of map, copy)",
            ),
            (
                format!("{}{}", vbd("xvda", "g1", "0..8", ""), vbd("xvda", "g1", "8..16", "")),
                "x.toml:45: vbd[1].name: domain \"g1\" already has a vbd called \"xvda\" (vbd[0])",
            ),
            (
                format!("{}{}", vbd("xvda", "g1", "0..8", ""), vbd("xvda", "g2", "4..16", "readonly = true")),
                "x.toml:48: vbd[1].sectors: sectors 4..16 overlap those of vbd \"xvda\" of domain \"g1\"",
            ),
            (
                "[[vbd]]\nname = \"xvda\"\nfrontend = \"g1\"\nbackend = \"blk\"\n".to_string(),
                "x.toml:38: vbd[0].sectors: missing field",
            ),
        ] {
            let e = check("x.toml", &with_vbds(&body)).unwrap_err().to_string();
            assert!(e.starts_with(msg), "{body}: {e}");
        }
        // Touching ranges do not overlap; a domain may be an end of 8 vbds.
        let eight: String = (0..8)
            .map(|i| {
                vbd(
                    &format!("xvd{i}"),
                    "g1",
                    &format!("{}..{}", i * 8, i * 8 + 8),
                    "",
                )
            })
            .collect();
        assert_eq!(check("x.toml", &with_vbds(&eight)).unwrap().vbds.len(), 8);
        let nine = format!("{eight}{}", vbd("xvd8", "g2", "64..72", ""));
        assert_eq!(
            check("x.toml", &with_vbds(&nine)).unwrap_err().to_string(),
            "x.toml:89: vbd[8].backend: domain \"blk\" would be an end of more than 8 vbds (its start info holds no more)"
        );
    }

    /// `HEAD`, a virtio-net at 04.0 and an edu at 05.0 (lines 4-11), the
    /// domains net (owns 04.0, label net_driver), g1 (guest_a), g2
    /// (guest_b) and e (owns the edu; label guest_b), six lines each from
    /// line 12, then `rest` from line 36.
    fn with_vifs(rest: &str) -> String {
        let dom = |n: &str, label: &str, extra: &str| {
            format!("[[domain]]\nname = \"{n}\"\nimage = \"testdom\"\nmemory = \"2M\"\nlabel = \"{label}\"\n{extra}\n")
        };
        format!(
            "{HEAD}[[device]]\nkind = \"virtio-net\"\naddr = \"04.0\"\n\n[[device]]\nkind = \"edu\"\naddr = \"05.0\"\n\n{}{}{}{}{rest}",
            dom("net", "net_driver", "devices = [\"04.0\"]"),
            dom("g1", "guest_a", ""),
            dom("g2", "guest_b", ""),
            dom("e", "guest_b", "devices = [\"05.0\"]"),
        )
    }

    /// A `[[vif]]` of seven lines whose backend is net.
    fn vif(name: &str, front: &str, mac: &str, ip: &str) -> String {
        format!("[[vif]]\nname = \"{name}\"\nfrontend = \"{front}\"\nbackend = \"net\"\nmac = \"{mac}\"\nip = \"{ip}\"\n\n")
    }

    #[test]
    fn vifs() {
        let src = with_vifs(&format!(
            "{}{}{}",
            vif("eth0", "g1", "02:00:00:00:00:01", "10.0.0.1"),
            vif("eth0", "g2", "02:00:00:00:00:02", "10.0.0.2"),
            vif("eth1", "g2", "52:54:00:AB:cd:ef", "192.168.7.20"),
        ));
        let s = check("x.toml", &src).unwrap();
        assert_eq!(
            s.vifs,
            [
                PlannedVif {
                    name: "eth0".into(),
                    frontend: 1,
                    backend: 0,
                    mac: [2, 0, 0, 0, 0, 1],
                    ip: [10, 0, 0, 1]
                },
                PlannedVif {
                    name: "eth0".into(),
                    frontend: 2,
                    backend: 0,
                    mac: [2, 0, 0, 0, 0, 2],
                    ip: [10, 0, 0, 2]
                },
                PlannedVif {
                    name: "eth1".into(),
                    frontend: 2,
                    backend: 0,
                    mac: [0x52, 0x54, 0, 0xab, 0xcd, 0xef],
                    ip: [192, 168, 7, 20]
                },
            ]
        );
        let bytes = s.compile(None).unwrap();
        let m = compiled::Manifest::parse(&bytes).unwrap();
        let v: Vec<_> = m.vifs().collect();
        assert_eq!(v.len(), 3);
        assert_eq!(
            (v[2].name, v[2].frontend, v[2].backend, v[2].mac, v[2].ip),
            (
                "eth1",
                2,
                0,
                [0x52, 0x54, 0, 0xab, 0xcd, 0xef],
                [192, 168, 7, 20]
            )
        );
        assert_eq!(m.vifs_of(0).count(), 3);
        assert_eq!(m.vifs_of(2).count(), 2);
        assert_eq!(parse_mac("02:00:00:00:00:0"), None);
        assert_eq!(parse_mac("02:00:00:00:00:00:00"), None);
        assert_eq!(parse_mac("02-00-00-00-00-01"), None);
        assert_eq!(parse_ipv4("10.0.0.256"), None);
    }

    #[test]
    fn bad_vifs() {
        let ok1 = vif("eth0", "g1", "02:00:00:00:00:01", "10.0.0.1");
        for (body, msg) in [
            (
                vif("eth0", "g3", "02:00:00:00:00:01", "10.0.0.1"),
                "x.toml:38: vif[0].frontend: no domain is called \"g3\"",
            ),
            (
                vif("eth0", "net", "02:00:00:00:00:01", "10.0.0.1"),
                "x.toml:39: vif[0].backend: domain \"net\" is both the frontend and the backend",
            ),
            (
                vif("eth0", "g1", "02:00:00:00:00:01", "10.0.0.1")
                    .replace("backend = \"net\"", "backend = \"e\""),
                "x.toml:39: vif[0].backend: domain \"e\" owns no virtio-net to serve the vif from",
            ),
            (
                vif("ETH0", "g1", "02:00:00:00:00:01", "10.0.0.1"),
                "x.toml:37: vif[0].name: bad vif name \"ETH0\" (expected 1 to 16 of a-z 0-9 _ -)",
            ),
            (
                vif("eth0", "g1", "02:00:00:00:01", "10.0.0.1"),
                "x.toml:40: vif[0].mac: bad MAC \"02:00:00:00:01\" (expected six two-digit hex bytes, aa:bb:cc:dd:ee:ff)",
            ),
            (
                vif("eth0", "g1", "03:00:00:00:00:01", "10.0.0.1"),
                "x.toml:40: vif[0].mac: MAC 03:00:00:00:00:01 is multicast",
            ),
            (
                vif("eth0", "g1", "00:00:00:00:00:00", "10.0.0.1"),
                "x.toml:40: vif[0].mac: MAC 00:00:00:00:00:00 is all zero",
            ),
            (
                vif("eth0", "g1", "02:00:00:00:00:01", "10.0.0"),
                "x.toml:41: vif[0].ip: bad IPv4 address \"10.0.0\"",
            ),
            (
                vif("eth0", "g1", "02:00:00:00:00:01", "255.255.255.255"),
                "x.toml:41: vif[0].ip: 255.255.255.255 is not a unicast host address",
            ),
            (
                format!("{ok1}{}", vif("eth0", "g1", "02:00:00:00:00:02", "10.0.0.2")),
                "x.toml:44: vif[1].name: domain \"g1\" already has a vif called \"eth0\" (vif[0])",
            ),
            (
                format!("{ok1}{}", vif("eth0", "g2", "02:00:00:00:00:01", "10.0.0.2")),
                "x.toml:47: vif[1].mac: MAC 02:00:00:00:00:01 is already vif \"eth0\"'s of domain \"g1\"",
            ),
            (
                format!("{ok1}{}", vif("eth0", "g2", "02:00:00:00:00:02", "10.0.0.1")),
                "x.toml:48: vif[1].ip: 10.0.0.1 is already vif \"eth0\"'s of domain \"g1\"",
            ),
            (
                "[[vif]]\nname = \"eth0\"\nfrontend = \"g1\"\nbackend = \"net\"\nip = \"10.0.0.1\"\n".to_string(),
                "x.toml:36: vif[0].mac: missing field",
            ),
        ] {
            let e = check("x.toml", &with_vifs(&body)).unwrap_err().to_string();
            assert!(e.starts_with(msg), "{body}: {e}");
        }
        // A domain may be an end of 8 vifs, not 9.
        let eight: String = (0..8)
            .map(|k| {
                vif(
                    &format!("eth{k}"),
                    "g1",
                    &format!("02:00:00:00:00:{:02x}", k + 1),
                    &format!("10.0.0.{}", k + 1),
                )
            })
            .collect();
        assert_eq!(check("x.toml", &with_vifs(&eight)).unwrap().vifs.len(), 8);
        let nine = format!(
            "{eight}{}",
            vif("eth8", "g1", "02:00:00:00:00:09", "10.0.0.9")
        );
        assert_eq!(
            check("x.toml", &with_vifs(&nine)).unwrap_err().to_string(),
            "x.toml:94: vif[8].frontend: domain \"g1\" would be an end of more than 8 vifs (its start info holds no more)\n\
             x.toml:95: vif[8].backend: domain \"net\" would be an end of more than 8 vifs (its start info holds no more)"
        );
    }

    #[test]
    fn bad_allow_rules() {
        let allow = |from: &str, to: &str, perms: &str| {
            format!("[[allow]]\nfrom = \"{from}\"\nto = \"{to}\"\nperms = {perms}\n\n")
        };
        for (body, msg) in [
            (
                allow("blk", "guest_a", "[\"grant_copy\"]"),
                "x.toml:39: allow[0].from: no domain has the label \"blk\" (labels: blk_driver, guest_a, guest_b)",
            ),
            (
                allow("blk_driver", "guest_c", "[\"grant_copy\"]"),
                "x.toml:40: allow[0].to: no domain has the label \"guest_c\"",
            ),
            (
                allow("blk_driver", "guest_a", "[]"),
                "x.toml:41: allow[0].perms: no permission (a rule allows at least one)",
            ),
            (
                allow("blk_driver", "guest_a", "[\"grant_map\"]"),
                "x.toml:41: allow[0].perms[0]: unknown permission \"grant_map\" (expected one of grant_map_read, grant_map_write, grant_copy, event_bind)",
            ),
            (
                allow("blk_driver", "guest_a", "[\"grant_copy\", \"grant_copy\"]"),
                "x.toml:41: allow[0].perms[1]: permission \"grant_copy\" is listed twice",
            ),
            (
                format!(
                    "{}{}",
                    allow("blk_driver", "guest_a", "[\"grant_copy\"]"),
                    allow("blk_driver", "guest_a", "[\"event_bind\"]")
                ),
                "x.toml:45: allow[1].to: allow[0] is already the rule from \"blk_driver\" to \"guest_a\" (put every permission in one rule)",
            ),
            (
                allow("blk_driver", "guest_a", "\"grant_copy\""),
                "x.toml:41: allow[0].perms: invalid type",
            ),
        ] {
            let e = check("x.toml", &with_vbds(&body)).unwrap_err().to_string();
            assert!(e.starts_with(msg), "{body}: {e}");
        }
    }

    #[test]
    fn ratio_and_equal_tables() {
        let src = format!(
            "{TEST_HEAD}[[test.ratio]]\nev = \"domain_cpu\"\nfield = \"cpu_ns\"\nnum = {{ domain = \"heavy\" }}\nden = {{ domain = \"light\" }}\nexpect = 2.0\ntolerance = 0.1\n\n[[test.equal]]\na = {{ ev = \"hypercalls\", fields = {{ domain = \"h\" }}, field = \"refused\" }}\nb = {{ ev = \"hypercall_table\", fields = {{ from = \"h\" }}, field = \"expected_refusals\" }}\n"
        );
        let t = check("tests/scenarios/r.toml", &src).unwrap().test.unwrap();
        assert_eq!(t.ratios.len(), 1);
        let r = &t.ratios[0];
        assert_eq!((r.expect, r.tolerance), (2.0, 0.1));
        assert_eq!(r.num.to_string(), "domain_cpu{\"domain\":\"heavy\"}.cpu_ns");
        assert_eq!(r.den.to_string(), "domain_cpu{\"domain\":\"light\"}.cpu_ns");
        assert_eq!(t.equals.len(), 1);
        assert_eq!(
            t.equals[0].a.to_string(),
            "hypercalls{\"domain\":\"h\"}.refused"
        );
        assert_eq!(
            t.equals[0].b.to_string(),
            "hypercall_table{\"from\":\"h\"}.expected_refusals"
        );
        // `from` may be compared too.
        let src = format!(
            "{TEST_HEAD}[[test.equal]]\na = {{ ev = \"pingpong\", field = \"from\" }}\nb = {{ ev = \"attack\", field = \"case\" }}\n"
        );
        check("x.toml", &src).unwrap();
    }

    #[test]
    fn bad_ratio_and_equal_tables() {
        let ratio = |body: &str| error(&format!("{TEST_HEAD}[[test.ratio]]\n{body}\n"));
        const OK: &str = "ev = \"domain_cpu\"\nfield = \"cpu_ns\"\nnum = { domain = \"a\" }\nden = { domain = \"b\" }\nexpect = 2.0\ntolerance = 0.1";
        let e = ratio(&OK.replace("\"domain_cpu\"", "\"domain_cpus\""));
        assert!(
            e.starts_with("manifests/x.toml:7: test.ratio[0].ev: unknown event \"domain_cpus\""),
            "{e}"
        );
        let e = ratio(&OK.replace("\"cpu_ns\"", "\"cpu_ms\""));
        assert!(e.starts_with("manifests/x.toml:8: test.ratio[0].field: event \"domain_cpu\" has no field \"cpu_ms\""), "{e}");
        let e = ratio(&OK.replace("\"cpu_ns\"", "\"domain\""));
        assert_eq!(e, "manifests/x.toml:8: test.ratio[0].field: field \"domain\" of event \"domain_cpu\" is not a number");
        let e = ratio(&OK.replace("den = { domain", "den = { domian"));
        assert!(e.starts_with("manifests/x.toml:10: test.ratio[0].den.domian: event \"domain_cpu\" has no field \"domian\""), "{e}");
        let e = ratio(&OK.replace("tolerance = 0.1", "tolerance = 1.5"));
        assert_eq!(e, "manifests/x.toml:12: test.ratio[0].tolerance: tolerance 1.5 is not between 0 and 1 (0.10 is 10 %)");
        let e = ratio(&OK.replace("expect = 2.0", "expect = -2.0"));
        assert_eq!(
            e,
            "manifests/x.toml:11: test.ratio[0].expect: expected ratio -2 is not a positive number"
        );
        let e = ratio(&OK.replace("\nexpect = 2.0", ""));
        assert!(
            e.starts_with("manifests/x.toml:6: test.ratio[0].expect: missing field"),
            "{e}"
        );
        let e = error(&format!(
            "{TEST_HEAD}[[test.equal]]\na = {{ ev = \"hypercalls\", field = \"refusd\" }}\nb = {{ ev = \"hypercall_table\", field = \"cases\" }}\n"
        ));
        assert!(e.starts_with("manifests/x.toml:7: test.equal[0].a.field: event \"hypercalls\" has no field \"refusd\""), "{e}");
        let e = error(&format!(
            "{TEST_HEAD}[[test.equal]]\na = {{ ev = \"hypercalls\", field = \"refused\" }}\n"
        ));
        assert!(e.contains("test.equal[0].b: missing field"), "{e}");
    }
}
