//! `cargo xtask`: airlock's build, run and test tool.
//!
//! - `run`: check and compile a manifest, build the hypervisor and the
//!   domain images it names, pack the boot bundle, create missing disk
//!   images, start the manifest's host TCP peer (`[host_tcp]`), print and
//!   run the QEMU command line, stream the console, exit 0 exactly when the
//!   system reports success and the peer's check passes.
//! - `test`: the host tests, then every QEMU scenario in `tests/scenarios/`,
//!   then `N passed, N failed`.
//! - `check`: check manifests without booting anything.
//! - `profile`: `run` under a QEMU plugin that counts executed
//!   instructions; prints them per domain and function.
//!
//! Every user mistake (a bad flag, a bad manifest, a missing QEMU) is one
//! clear message and a non-zero exit, never a panic.

mod args;
mod bench;
mod manifest;
mod profile;
mod qemu;
mod test;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use abi::bundle::{Builder, EntryKind, Item};
use abi::manifest::ExitRule;

use crate::args::{Cmd, RunArgs};
use crate::manifest::{Backend, System};

fn main() -> ExitCode {
    let result = args::parse(std::env::args().skip(1)).and_then(|cmd| match cmd {
        Cmd::Run(r) => run(r),
        Cmd::Test(t) => test::test(t),
        Cmd::Check(files) => check(files),
        Cmd::Bench(b) => bench::bench(b),
        Cmd::Profile(r, top) => profile::profile(r, top),
        Cmd::Help => {
            println!("{}", args::USAGE);
            Ok(ExitCode::SUCCESS)
        }
    });
    match result {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

/// Where things are.
pub struct Paths {
    /// The workspace root.
    pub root: PathBuf,
    /// Cargo's target directory.
    pub target: PathBuf,
    /// `target/airlock/`: bundles, disk images, logs.
    pub airlock: PathBuf,
}

impl Paths {
    fn new() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."))
            .to_owned();
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(t) => root.join(t),
            None => root.join("target"),
        };
        let airlock = target.join("airlock");
        Paths {
            root,
            target,
            airlock,
        }
    }

    /// `p` relative to the root when it is under it (for messages).
    pub fn show(&self, p: &Path) -> String {
        p.strip_prefix(&self.root)
            .unwrap_or(p)
            .display()
            .to_string()
    }
}

/// Reads and checks a manifest; `shown` is how messages name it.
pub fn load(file: &Path, shown: &str) -> Result<System, String> {
    let src = std::fs::read_to_string(file).map_err(|e| format!("{shown}: cannot read: {e}"))?;
    manifest::check(shown, &src).map_err(|e| e.to_string())
}

/// `cargo build --release -p hypervisor --target x86_64-unknown-none`.
pub fn build_hypervisor(p: &Paths) -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let args = [
        "build",
        "--release",
        "-p",
        "hypervisor",
        "--target",
        "x86_64-unknown-none",
    ];
    eprintln!("airlock: cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(&p.root)
        .status()
        .map_err(|e| format!("could not run cargo to build the hypervisor: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the hypervisor failed (cargo {}: {status})",
            args.join(" ")
        ));
    }
    let kernel = p.target.join("x86_64-unknown-none/release/hypervisor");
    if !kernel.is_file() {
        return Err(format!(
            "the hypervisor built, but {} is missing",
            kernel.display()
        ));
    }
    Ok(kernel)
}

/// The target domain images are built for.
pub const DOMAIN_TARGET: &str = "x86_64-unknown-none";

/// The cargo arguments that build `images` (bins of the crates in
/// [`manifest::IMAGE_CRATES`]).
pub fn image_build_args(images: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["build".into(), "--release".into()];
    for krate in manifest::IMAGE_CRATES {
        args.push("-p".into());
        args.push((*krate).to_owned());
    }
    args.push("--target".into());
    args.push(DOMAIN_TARGET.into());
    for i in images {
        args.push("--bin".into());
        args.push((*i).to_owned());
    }
    args
}

/// Builds the domain images in one cargo call; returns the directory that
/// holds them (each file named after its image). Nothing to build: no call.
pub fn build_images(p: &Paths, images: &[&str]) -> Result<PathBuf, String> {
    let dir = p.target.join(DOMAIN_TARGET).join("release");
    if images.is_empty() {
        return Ok(dir);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let args = image_build_args(images);
    eprintln!("airlock: cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(&args)
        .current_dir(&p.root)
        .status()
        .map_err(|e| format!("could not run cargo to build the domain images: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the domain images failed (cargo {}: {status})",
            args.join(" ")
        ));
    }
    for i in images {
        if !dir.join(i).is_file() {
            return Err(format!(
                "the domain images built, but {} is missing",
                dir.join(i).display()
            ));
        }
    }
    Ok(dir)
}

/// Packs the boot bundle (the compiled manifest and each distinct domain
/// image once, as an image entry named after it, read from `image_dir`) and
/// writes it to `out`.
pub fn pack(
    system: &System,
    exit: Option<ExitRule>,
    image_dir: &Path,
    out: &Path,
) -> Result<Vec<u8>, String> {
    let manifest = system.compile(exit)?;
    let names = system.images();
    let mut images = Vec::new();
    for name in &names {
        let file = image_dir.join(name);
        let data = std::fs::read(&file)
            .map_err(|e| format!("image \"{name}\": cannot read {}: {e}", file.display()))?;
        images.push(data);
    }
    let mut items = vec![Item {
        kind: EntryKind::Manifest,
        name: "manifest",
        data: &manifest,
    }];
    for (name, data) in names.iter().zip(&images) {
        items.push(Item {
            kind: EntryKind::Image,
            name,
            data,
        });
    }
    let builder = Builder::new(&items);
    let size = builder
        .size()
        .map_err(|e| format!("packing the bundle: {e}"))?;
    let mut bytes = vec![0; size];
    builder
        .write(&mut bytes)
        .map_err(|e| format!("packing the bundle: {e}"))?;
    write_file(out, &bytes)?;
    Ok(bytes)
}

pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Creates each missing disk image as a sparse file of its `size`.
pub fn create_disks(system: &System, p: &Paths) -> Result<(), String> {
    for (i, d) in system.devices.iter().enumerate() {
        let Backend::Disk { path, size } = &d.backend else {
            continue;
        };
        let file = qemu::disk_path(&p.airlock, path);
        if file.exists() {
            continue;
        }
        let Some(size) = size else {
            return Err(format!(
                "device[{i}]: disk {} does not exist, and the manifest gives no size to create it with",
                file.display()
            ));
        };
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let f = std::fs::File::create(&file)
            .map_err(|e| format!("cannot create disk {}: {e}", file.display()))?;
        f.set_len(*size)
            .map_err(|e| format!("cannot size disk {}: {e}", file.display()))?;
        eprintln!(
            "airlock: created {} ({} MiB, sparse)",
            p.show(&file),
            size >> 20
        );
    }
    Ok(())
}

/// Host ports on 127.0.0.1 for the `hostfwd` rules, in
/// `manifest::forwards` order: free right now, for QEMU to bind a moment
/// later.
pub fn hostfwd_ports(system: &System) -> Result<Vec<u16>, String> {
    manifest::forwards(&system.devices)
        .map(|_| harness::tcppeer::free_port())
        .collect::<Result<Vec<u16>, _>>()
        .map_err(|e| format!("could not pick a host port for hostfwd: {e}"))
}

/// Starts the TCP peer `spec` towards the host port (of `ports`, in
/// `manifest::forwards` order) of the `hostfwd` rule it connects through.
/// It retries until QEMU listens and the guest answers, and stops by
/// itself after `limit`.
pub fn start_tcp_peer(
    system: &System,
    spec: &harness::tcppeer::TcpSpec,
    ports: &[u16],
    limit: Duration,
) -> Result<harness::tcppeer::Running, String> {
    let port = manifest::forwards(&system.devices)
        .find(|(_, f)| *f == spec.connect)
        .and_then(|(k, _)| ports.get(k).copied())
        .ok_or_else(|| format!("no hostfwd rule for {}", spec.connect.guest))?;
    harness::tcppeer::start(spec.clone(), port, limit)
        .map_err(|e| format!("could not start the TCP peer: {e}"))
}

fn run(r: RunArgs) -> Result<ExitCode, String> {
    boot(&r)?.verdict()
}

/// A system that ran: what `run` and `profile` report on.
pub struct Booted {
    pub system: System,
    /// Where the domain images are (one ELF per image name).
    pub image_dir: PathBuf,
    /// The hypervisor's ELF.
    pub kernel: PathBuf,
    pub run: harness::qemu::Run,
    /// Why the host peer's check failed (empty: it passed, or no peer).
    pub peer_failures: Vec<String>,
}

impl Booted {
    /// Exit 0 exactly when the system reported success and the peer's
    /// check passed; otherwise an error that says why.
    pub fn verdict(&self) -> Result<ExitCode, String> {
        let run = &self.run;
        let verdict = match run.outcome {
            harness::Outcome::TimedOut(_) => run.outcome.to_string(),
            o => format!("{o} after {:.1} s", run.elapsed.as_secs_f64()),
        };
        if run.outcome.is_success() && self.peer_failures.is_empty() {
            eprintln!("airlock: {verdict}");
            return Ok(ExitCode::SUCCESS);
        }
        let mut msg = format!("airlock: {verdict}");
        if !self.peer_failures.is_empty() {
            msg.push_str("\nairlock: the host peer's check failed:");
            for f in &self.peer_failures {
                msg.push_str(&format!("\n  - {f}"));
            }
        }
        Err(msg)
    }
}

/// `run`'s work up to QEMU's exit: build, pack, start the peer, boot,
/// stream the console.
pub fn boot(r: &RunArgs) -> Result<Booted, String> {
    let p = Paths::new();
    let (file, shown) = match &r.manifest {
        Some(m) => (m.clone(), m.display().to_string()),
        None => (
            p.root.join("manifests/default.toml"),
            "manifests/default.toml".to_owned(),
        ),
    };
    let system = load(&file, &shown)?;
    let qemu_bin = qemu::ensure()?;
    let kernel = build_hypervisor(&p)?;
    let image_dir = build_images(&p, &system.images())?;
    let bundle = p.airlock.join(format!("{}.bundle", system.name));
    let exit = r.keep_running.then_some(ExitRule::Never);
    let bytes = pack(&system, exit, &image_dir, &bundle)?;
    let images = system.images();
    eprintln!(
        "airlock: {} ({} bytes: the compiled manifest of \"{}\"{}{})",
        p.show(&bundle),
        bytes.len(),
        system.name,
        if images.is_empty() {
            ""
        } else {
            " and images "
        },
        images.join(", ")
    );
    create_disks(&system, &p)?;
    if system.devices.iter().any(|d| d.backend == Backend::UdpNet) {
        let ports = qemu::DEFAULT_UDP_PORTS;
        eprintln!(
            "airlock: netdev udp: QEMU at 127.0.0.1:{} sends frames to 127.0.0.1:{}, where \
             nothing answers under `run` (`cargo xtask test` runs the test peer)",
            ports.qemu, ports.peer
        );
    }
    let timeout = match (r.timeout, r.keep_running) {
        (Some(0), _) | (None, true) => None,
        (Some(s), _) => Some(s),
        (None, false) => Some(manifest::DEFAULT_TIMEOUT_S),
    };
    // With a host peer, every hostfwd rule gets a free host port (as in a
    // scenario); without one, its guest port.
    let hostfwd = match &system.host_tcp {
        Some(_) => hostfwd_ports(&system)?,
        None => Vec::new(),
    };
    for (k, f) in manifest::forwards(&system.devices) {
        eprintln!(
            "airlock: hostfwd: TCP to 127.0.0.1:{} goes to the guest at {}",
            hostfwd.get(k).copied().unwrap_or(f.guest.port()),
            f.guest
        );
    }
    // The peer stops by itself a little after QEMU's time limit at the
    // latest (or the default limit's, with none).
    let peer = match &system.host_tcp {
        Some(spec) => {
            let limit = timeout.unwrap_or(manifest::DEFAULT_TIMEOUT_S) + 5;
            eprintln!(
                "airlock: host peer: connects to {} and sends {} B of stream {}, expects {} B of \
                 stream {} back (at most {limit} s)",
                spec.connect.guest, spec.send, spec.send_pattern, spec.recv, spec.recv_pattern
            );
            Some((
                spec,
                start_tcp_peer(&system, spec, &hostfwd, Duration::from_secs(limit))?,
            ))
        }
        None => None,
    };
    let args = qemu::args(&qemu::Config {
        system: &system,
        accel: r.accel,
        iommu: r.iommu,
        kernel: &kernel,
        bundle: &bundle,
        disk_dir: &p.airlock,
        extra: &r.qemu_args,
        udp: None,
        hostfwd: &hostfwd,
    });
    eprintln!("airlock: QEMU command line:");
    eprintln!("{}", qemu::command_line(&qemu_bin, &args));
    let mut cmd = Command::new(&qemu_bin);
    cmd.args(&args);
    let run = harness::qemu::run(
        cmd,
        harness::qemu::Options {
            timeout: timeout.map(Duration::from_secs),
            echo: true,
            own_group: false,
        },
    )
    .map_err(|e| format!("could not run {}: {e}", qemu_bin.display()));
    // QEMU has exited (or never ran): the peer stops now, and says what it
    // saw.
    let mut peer_failures = Vec::new();
    if let Some((spec, running)) = peer {
        let report = running.finish();
        eprintln!("airlock: {}", report.summary());
        peer_failures = harness::tcppeer::failures(spec, &report);
    }
    Ok(Booted {
        system,
        image_dir,
        kernel,
        run: run?,
        peer_failures,
    })
}

fn check(files: Vec<PathBuf>) -> Result<ExitCode, String> {
    let p = Paths::new();
    let files: Vec<(PathBuf, String)> = if files.is_empty() {
        vec![(
            p.root.join("manifests/default.toml"),
            "manifests/default.toml".to_owned(),
        )]
    } else {
        files
            .into_iter()
            .map(|f| (f.clone(), f.display().to_string()))
            .collect()
    };
    let mut failed = 0;
    for (file, shown) in files {
        match load(&file, &shown).and_then(|s| s.compile(None).map(|c| (s, c))) {
            Ok((s, compiled)) => {
                let devices: Vec<String> = s
                    .devices
                    .iter()
                    .map(|d| {
                        let (v, id) = d.kind.pci_ids();
                        format!("{} at {} ({v:04x}:{id:04x})", d.kind, d.bdf)
                    })
                    .collect();
                let domains: Vec<String> = s
                    .domains
                    .iter()
                    .map(|d| {
                        let devs = if d.devices.is_empty() {
                            String::new()
                        } else {
                            let bdfs: Vec<String> = d
                                .devices
                                .iter()
                                .map(|&i| s.devices[i].bdf.to_string())
                                .collect();
                            format!(
                                ", devices {}, dma {}, on_dma_fault {}",
                                bdfs.join(" "),
                                abi::manifest::dma_mode_name(d.dma),
                                d.on_dma_fault.name()
                            )
                        };
                        format!(
                            "{} ({}, {} KiB, weight {}, label {}, expect {}{devs})",
                            d.name,
                            d.image,
                            d.memory >> 10,
                            d.weight,
                            d.label,
                            d.expect.name()
                        )
                    })
                    .collect();
                let channels: Vec<String> = s
                    .channels
                    .iter()
                    .map(|c| {
                        format!(
                            "{} ({} <-> {})",
                            c.name, s.domains[c.a].name, s.domains[c.b].name
                        )
                    })
                    .collect();
                let list = |v: &[String]| {
                    if v.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", v.join(", "))
                    }
                };
                let watches: Vec<String> = s.watches.iter().map(|w| w.name.clone()).collect();
                let vbds: Vec<String> = s
                    .vbds
                    .iter()
                    .map(|v| {
                        format!(
                            "{} of {} (sectors {}..{} of {}, {}{})",
                            v.name,
                            s.domains[v.frontend].name,
                            v.first_sector,
                            v.first_sector + v.sectors,
                            s.domains[v.backend].name,
                            abi::manifest::vbd_mode_name(v.mode),
                            if v.readonly { ", read-only" } else { "" }
                        )
                    })
                    .collect();
                let vifs: Vec<String> = s
                    .vifs
                    .iter()
                    .map(|v| {
                        let m = v.mac;
                        format!(
                            "{} of {} ({:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} {}, served by {})",
                            v.name,
                            s.domains[v.frontend].name,
                            m[0],
                            m[1],
                            m[2],
                            m[3],
                            m[4],
                            m[5],
                            std::net::Ipv4Addr::from(v.ip),
                            s.domains[v.backend].name,
                        )
                    })
                    .collect();
                let allows: Vec<String> = s
                    .allows
                    .iter()
                    .map(|a| {
                        let perms: Vec<&str> = abi::manifest::perm::NAMES
                            .iter()
                            .filter(|(bit, _)| a.perms & bit != 0)
                            .map(|(_, n)| *n)
                            .collect();
                        format!("{} -> {} {}", a.subject, a.object, perms.join("+"))
                    })
                    .collect();
                println!(
                    "{shown}: ok: system \"{}\", {} MiB, exit {}, {} device(s){}; {} domain(s){}; \
                     {} channel(s){}; {} watch(es){}; {} vbd(s){}; {} vif(s){}; {} allow rule(s){}; \
                     compiled manifest {} bytes{}{}",
                    s.name,
                    s.memory >> 20,
                    s.exit.name(),
                    devices.len(),
                    list(&devices),
                    domains.len(),
                    list(&domains),
                    channels.len(),
                    list(&channels),
                    watches.len(),
                    list(&watches),
                    vbds.len(),
                    list(&vbds),
                    vifs.len(),
                    list(&vifs),
                    allows.len(),
                    list(&allows),
                    compiled.len(),
                    match &s.host_tcp {
                        Some(t) => format!(
                            "; host peer: {} B of {} to {}, {} B of {} back",
                            t.send, t.send_pattern, t.connect.guest, t.recv, t.recv_pattern
                        ),
                        None => String::new(),
                    },
                    if s.test.is_some() {
                        "; has a [test] table"
                    } else {
                        ""
                    }
                );
            }
            Err(e) => {
                eprintln!("{e}");
                failed += 1;
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::bundle::Bundle;
    use abi::manifest::Manifest;

    #[test]
    fn one_cargo_call_builds_every_image() {
        assert_eq!(
            image_build_args(&["testdom", "other"]).join(" "),
            "build --release -p guests -p driver-domains --target x86_64-unknown-none --bin testdom --bin other"
        );
    }

    #[test]
    fn the_bundle_carries_each_image_once() {
        let src = "[system]\nname = \"packed\"\n\n\
            [[domain]]\nname = \"a\"\nimage = \"testdom\"\nmemory = \"1M\"\nlabel = \"l\"\n\n\
            [[domain]]\nname = \"b\"\nimage = \"testdom\"\nmemory = \"1M\"\nlabel = \"l\"\n";
        let system = manifest::check("packed.toml", src).unwrap();
        let dir = Paths::new().airlock.join("test-pack");
        let elf = b"\x7fELF stand-in for the testdom image".to_vec();
        write_file(&dir.join("testdom"), &elf).unwrap();
        let out = dir.join("packed.bundle");
        let bytes = pack(&system, None, &dir, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), bytes);
        let b = Bundle::parse(&bytes).unwrap();
        let kinds: Vec<(EntryKind, &str)> = b.entries().map(|e| (e.kind, e.name)).collect();
        assert_eq!(
            kinds,
            [
                (EntryKind::Manifest, "manifest"),
                (EntryKind::Image, "testdom")
            ]
        );
        assert_eq!(b.find(EntryKind::Image, "testdom").unwrap().data, elf);
        let m = Manifest::parse(b.manifest().unwrap()).unwrap();
        assert_eq!(m.exit_rule(), ExitRule::AllExited);
        assert!(m.domains().all(|d| d.image == "testdom"));
        // A missing image is an error that names it.
        let e = pack(&system, None, &dir.join("nowhere"), &out).unwrap_err();
        assert!(e.starts_with("image \"testdom\": cannot read "), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
