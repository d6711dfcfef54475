//! The manifest checker: TOML in, a checked system (or errors that name the
//! file, the line and the field) out, and the compiled form for the bundle.
//!
//! ```toml
//! [system]
//! name = "default"          # 1-32 of A-Z a-z 0-9 - _; names the bundle file
//! exit = "after-ready"      # or "never"; default "after-ready"
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
//! netdev = "user"           # virtio-net only; QEMU's user network, restrict=on
//!
//! [test]                    # scenarios only (tests/scenarios/); `run` ignores it
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

use abi::manifest::{self as compiled, Device, DeviceKind, ExitRule};
use abi::pci::Bdf;
use harness::{Corruption, Expect, ExpectedExit, Pattern, Scenario};
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

// ---- the TOML schema ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    system: SystemToml,
    machine: Option<MachineToml>,
    #[serde(default)]
    device: Vec<DeviceToml>,
    test: Option<TestToml>,
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
    /// QEMU's user network, restricted (no traffic leaves the machine).
    UserNet,
}

/// One device, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedDevice {
    pub kind: DeviceKind,
    pub bdf: Bdf,
    pub backend: Backend,
}

/// A manifest that passed every check.
#[derive(Clone, Debug)]
pub struct System {
    pub name: String,
    pub memory: u64,
    pub exit: ExitRule,
    pub devices: Vec<PlannedDevice>,
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
        let mut out = vec![0; compiled::encoded_size(devices.len())];
        let n = compiled::encode(&self.name, exit.unwrap_or(self.exit), &devices, &mut out)
            .map_err(|e| format!("compiling the manifest: {e}"))?;
        out.truncate(n);
        Ok(out)
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
    let exit = match &doc.system.exit {
        None => ExitRule::AfterReady,
        Some(e) => ExitRule::from_name(e.get_ref()).unwrap_or_else(|| {
            let all = one_of(&ExitRule::ALL, ExitRule::name);
            c.err(
                e.span(),
                "system.exit",
                format!(
                    "unknown exit rule \"{}\" (expected one of {all})",
                    e.get_ref()
                ),
            );
            ExitRule::AfterReady
        }),
    };
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
                match &d.netdev {
                    Some(n) if n.get_ref() != "user" => {
                        c.err(
                            n.span(),
                            at("netdev"),
                            format!("unknown netdev \"{}\" (expected \"user\")", n.get_ref()),
                        );
                    }
                    _ => {}
                }
                Backend::UserNet
            }
            _ => {
                not_for(&mut c, &d.disk, "disk");
                not_for(&mut c, &d.size, "size");
                not_for(&mut c, &d.netdev, "netdev");
                Backend::None
            }
        };
        if let Some(bdf) = bdf {
            devices.push(PlannedDevice { kind, bdf, backend });
        }
    }

    let stem = Path::new(file)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let test = doc.test.as_ref().map(|t| check_test(&mut c, &stem, t));

    if c.diags.is_empty() {
        Ok(System {
            name,
            memory,
            exit,
            devices,
            test,
        })
    } else {
        c.diags.sort_by_key(|d| d.line);
        Err(errors(c.diags))
    }
}

fn check_pattern(
    c: &mut Checker<'_>,
    path: &str,
    ev: &Spanned<String>,
    fields: &FieldsToml,
) -> Pattern {
    match abi::ev::schema(ev.get_ref()) {
        None => {
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
        Some(schema) => {
            for key in fields.keys() {
                let k = key.get_ref();
                if k != "from" && !harness::check::is_schema_key(schema, k) {
                    let all: Vec<&str> = schema.fields.iter().map(|f| f.name).collect();
                    c.err(
                        key.span(),
                        format!("{path}.fields.{k}"),
                        format!(
                            "event \"{}\" has no field \"{k}\" (its fields: {})",
                            schema.name,
                            all.join(", ")
                        ),
                    );
                }
            }
        }
    }
    Pattern {
        ev: ev.get_ref().clone(),
        fields: fields
            .iter()
            .map(|(k, v)| (k.get_ref().clone(), v.clone()))
            .collect(),
    }
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
    Scenario {
        name: name.to_owned(),
        timeout: Duration::from_secs(timeout),
        exit,
        corrupt,
        expect,
        forbid,
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
        let s = check("manifests/default.toml", DEFAULT).unwrap();
        assert_eq!(s.name, "default");
        assert_eq!(s.memory, 256 << 20);
        assert_eq!(s.exit, ExitRule::AfterReady);
        assert_eq!(
            s.devices,
            [
                PlannedDevice {
                    kind: DeviceKind::VirtioBlk,
                    bdf: Bdf::new(0, 3, 0),
                    backend: Backend::Disk {
                        path: "default-blk.img".into(),
                        size: Some(64 << 20)
                    }
                },
                PlannedDevice {
                    kind: DeviceKind::VirtioNet,
                    bdf: Bdf::new(0, 4, 0),
                    backend: Backend::UserNet
                },
            ]
        );
        assert!(s.test.is_none());
        let bytes = s.compile(None).unwrap();
        let m = abi::manifest::Manifest::parse(&bytes).unwrap();
        assert_eq!(m.name(), "default");
        assert_eq!(m.device_count(), 2);
        let blk = m.device_at(Bdf::new(0, 3, 0)).unwrap();
        assert_eq!((blk.vendor, blk.device), (0x1af4, 0x1042));
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
            "manifests/x.toml:13: device[1].speed: unknown field (expected one of: kind, addr, disk, size, netdev)"
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
            "manifests/x.toml:7: device[0].netdev: unknown netdev \"tap\" (expected \"user\")"
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
        assert_eq!(e, "manifests/x.toml:3: system.exit: unknown exit rule \"sometimes\" (expected one of after-ready, never)");
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
}
