//! QEMU: finding (or installing) it, and the command line for a system.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::manifest::{Backend, System};

/// The emulator airlock runs on.
pub const QEMU: &str = "qemu-system-x86_64";
/// The one error for a missing QEMU when we may not install it.
pub const MISSING: &str =
    "qemu-system-x86_64 not found: install it with: sudo apt-get install qemu-system-x86";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Iommu {
    Intel,
    Amd,
    None,
}

/// What to do about QEMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Use(PathBuf),
    /// Not on PATH, and we are root: install Debian's package.
    Install,
    /// Not on PATH, and we are not root: say how to install it.
    Missing,
}

/// The first `name` on `path` (a PATH value) that `is_exec` accepts.
pub fn find_in_path(
    path: Option<&OsStr>,
    name: &str,
    is_exec: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|p| is_exec(p))
}

/// Decides what to do, given PATH and our user id.
pub fn plan(path: Option<&OsStr>, uid: u32, is_exec: impl Fn(&Path) -> bool) -> Plan {
    match find_in_path(path, QEMU, is_exec) {
        Some(p) => Plan::Use(p),
        None if uid == 0 => Plan::Install,
        None => Plan::Missing,
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Our effective user id, read without libc: the owner of `/proc/self`.
fn uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

/// QEMU's path: found on PATH, or installed with apt-get when we are root.
pub fn ensure() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH");
    match plan(path.as_deref(), uid(), is_executable) {
        Plan::Use(p) => Ok(p),
        Plan::Missing => Err(MISSING.to_owned()),
        Plan::Install => {
            eprintln!(
                "airlock: {QEMU} not found; running as root, so installing Debian's qemu-system-x86: \
                 apt-get update && apt-get install -y qemu-system-x86"
            );
            for args in [&["update"][..], &["install", "-y", "qemu-system-x86"][..]] {
                let status = Command::new("apt-get")
                    .args(args)
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .stdin(Stdio::null())
                    .status()
                    .map_err(|e| format!("{QEMU} not found, and apt-get could not be run ({e}): install QEMU for x86_64 with your package manager"))?;
                if !status.success() {
                    return Err(format!(
                        "{QEMU} not found, and `apt-get {}` failed ({status})",
                        args.join(" ")
                    ));
                }
            }
            find_in_path(path.as_deref(), QEMU, is_executable).ok_or_else(|| {
                format!("{QEMU} still not found on PATH after installing qemu-system-x86")
            })
        }
    }
}

/// Everything the command line depends on.
pub struct Config<'a> {
    pub system: &'a System,
    pub accel: Accel,
    pub iommu: Iommu,
    pub kernel: &'a Path,
    pub bundle: &'a Path,
    /// Where relative disk paths live (`target/airlock/`).
    pub disk_dir: &'a Path,
    /// `--qemu-arg`s, appended last.
    pub extra: &'a [String],
    /// The UDP ports of a `udp` netdev (the test peer's and QEMU's, on
    /// 127.0.0.1); [`DEFAULT_UDP_PORTS`] when `None`.
    pub udp: Option<harness::peer::Ports>,
    /// The host ports (on 127.0.0.1) of the `hostfwd` rules, in
    /// `manifest::forwards` order; a rule past the end gets its guest port.
    pub hostfwd: &'a [u16],
}

/// A `udp` netdev's ports when no test peer chose them (`cargo xtask run`).
pub const DEFAULT_UDP_PORTS: harness::peer::Ports = harness::peer::Ports {
    peer: 47_800,
    qemu: 47_801,
};

/// A disk path as the manifest wrote it, made absolute.
pub fn disk_path(disk_dir: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_owned()
    } else {
        disk_dir.join(p)
    }
}

/// QEMU option values separate on commas; a literal comma is doubled.
fn opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// QEMU's arguments (without the program name).
pub fn args(c: &Config<'_>) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let mem = format!("{}M", c.system.memory >> 20);
    match c.accel {
        Accel::Tcg => push(&["-machine", "q35", "-accel", "tcg", "-cpu", "max"]),
        Accel::Kvm => push(&[
            "-machine",
            "q35,kernel-irqchip=split",
            "-accel",
            "kvm",
            "-cpu",
            "qemu64",
        ]),
    }
    push(&["-m", &mem, "-smp", "1"]);
    // No default VGA, NIC or drives: QEMU emulates what the manifest says,
    // and every slot it does not name stays empty.
    push(&[
        "-nodefaults",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]);
    // The IOMMU comes before every other device (intel-iommu must precede
    // the PCI devices it translates; amd-iommu then takes 00:01.0).
    match c.iommu {
        Iommu::Intel => push(&[
            "-device",
            "intel-iommu,intremap=on,caching-mode=on,aw-bits=48",
        ]),
        Iommu::Amd => push(&["-device", "amd-iommu"]),
        Iommu::None => {}
    }
    push(&["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    let mut rule = 0;
    for (i, d) in c.system.devices.iter().enumerate() {
        let addr = format!("addr={:02x}.{:x}", d.bdf.device(), d.bdf.function());
        let mut dev = format!("{},{addr}", d.kind.qemu_device());
        if d.kind == abi::manifest::DeviceKind::Edu {
            // The attacker's DMA engine must reach every bus address, the
            // interrupt window included (its default mask is 28 bits).
            dev.push_str(",dma_mask=0xffffffffffffffff");
        }
        match &d.backend {
            Backend::Disk { path, .. } => {
                let file = disk_path(c.disk_dir, path);
                let id = format!("disk{i}");
                push(&[
                    "-drive",
                    &format!(
                        "if=none,id={id},format=raw,file={}",
                        opt_escape(&file.to_string_lossy())
                    ),
                ]);
                dev.push_str(&format!(",drive={id}"));
            }
            Backend::UserNet { hostfwd } => {
                // restrict=on: the guest reaches neither the host nor the
                // outside; the forwarding rules still carry connections from
                // 127.0.0.1 in.
                let id = format!("net{i}");
                let mut netdev = format!("user,id={id},restrict=on");
                for f in hostfwd {
                    let port = c.hostfwd.get(rule).copied().unwrap_or(f.guest.port());
                    netdev.push_str(&format!(",hostfwd={}", f.qemu_option(port)));
                    rule += 1;
                }
                push(&["-netdev", &netdev]);
                dev.push_str(&format!(",netdev={id}"));
            }
            Backend::UdpNet => {
                // Each frame one datagram between QEMU's port and the peer's.
                let id = format!("net{i}");
                let ports = c.udp.unwrap_or(DEFAULT_UDP_PORTS);
                push(&[
                    "-netdev",
                    &format!(
                        "dgram,id={id},local.type=inet,local.host=127.0.0.1,local.port={},\
                         remote.type=inet,remote.host=127.0.0.1,remote.port={}",
                        ports.qemu, ports.peer
                    ),
                ]);
                dev.push_str(&format!(",netdev={id}"));
            }
            Backend::None => {}
        }
        if d.kind.is_virtio() {
            dev.push_str(",iommu_platform=on,disable-legacy=on");
        }
        push(&["-device", &dev]);
    }
    push(&[
        "-kernel",
        &c.kernel.to_string_lossy(),
        "-initrd",
        &c.bundle.to_string_lossy(),
    ]);
    a.extend(c.extra.iter().cloned());
    a
}

/// `s` as one POSIX shell word.
pub fn shell_quote(s: &str) -> String {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(&b);
    if !s.is_empty() && s.bytes().all(plain) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The command as one line a user can paste into a shell.
pub fn command_line(program: &Path, args: &[String]) -> String {
    std::iter::once(program.to_string_lossy().into_owned())
        .chain(args.iter().cloned())
        .map(|s| shell_quote(&s))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest;
    use std::ffi::OsString;

    #[test]
    fn plan_follows_path_and_uid() {
        let path = OsString::from("/opt/q/bin:/usr/bin::/bin");
        let has = |p: &Path| p == Path::new("/usr/bin/qemu-system-x86_64");
        let none = |_: &Path| false;
        assert_eq!(
            plan(Some(&path), 1000, has),
            Plan::Use("/usr/bin/qemu-system-x86_64".into())
        );
        assert_eq!(
            plan(Some(&path), 0, has),
            Plan::Use("/usr/bin/qemu-system-x86_64".into())
        );
        assert_eq!(plan(Some(&path), 0, none), Plan::Install);
        assert_eq!(plan(Some(&path), 1000, none), Plan::Missing);
        assert_eq!(plan(None, 1000, has), Plan::Missing);
        // The first match on PATH wins; empty entries are skipped.
        let both = |p: &Path| p.starts_with("/opt") || p.starts_with("/usr");
        assert_eq!(
            plan(Some(&path), 1000, both),
            Plan::Use("/opt/q/bin/qemu-system-x86_64".into())
        );
        assert_eq!(
            MISSING,
            "qemu-system-x86_64 not found: install it with: sudo apt-get install qemu-system-x86"
        );
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("-m"), "-m");
        assert_eq!(
            shell_quote("virtio-blk-pci,addr=03.0"),
            "virtio-blk-pci,addr=03.0"
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    fn default_system() -> System {
        manifest::check(
            "manifests/default.toml",
            include_str!("../../manifests/default.toml"),
        )
        .unwrap()
    }

    #[test]
    fn the_default_command_line() {
        let s = default_system();
        let c = Config {
            system: &s,
            accel: Accel::Tcg,
            iommu: Iommu::Intel,
            kernel: Path::new("/r/target/x86_64-unknown-none/release/hypervisor"),
            bundle: Path::new("/r/target/airlock/default.bundle"),
            disk_dir: Path::new("/r/target/airlock"),
            extra: &["-d".into(), "int".into()],
            udp: None,
            // `run` picks the host port of the hostfwd rule.
            hostfwd: &[40123],
        };
        assert_eq!(
            command_line(Path::new("qemu-system-x86_64"), &args(&c)),
            "qemu-system-x86_64 -machine q35 -accel tcg -cpu max -m 256M -smp 1 -nodefaults \
             -display none -monitor none -serial stdio -no-reboot \
             -device intel-iommu,intremap=on,caching-mode=on,aw-bits=48 \
             -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
             -drive if=none,id=disk0,format=raw,file=/r/target/airlock/default-blk.img \
             -device virtio-blk-pci,addr=03.0,drive=disk0,iommu_platform=on,disable-legacy=on \
             -netdev user,id=net1,restrict=on,hostfwd=tcp:127.0.0.1:40123-10.0.2.15:5001 \
             -device virtio-net-pci,addr=04.0,netdev=net1,iommu_platform=on,disable-legacy=on \
             -kernel /r/target/x86_64-unknown-none/release/hypervisor \
             -initrd /r/target/airlock/default.bundle -d int"
        );
    }

    #[test]
    fn a_udp_netdev_talks_to_the_peer_on_localhost() {
        let mut s = default_system();
        s.devices[1].backend = Backend::UdpNet;
        let mut c = Config {
            system: &s,
            accel: Accel::Tcg,
            iommu: Iommu::Intel,
            kernel: Path::new("/k"),
            bundle: Path::new("/b"),
            disk_dir: Path::new("/d"),
            extra: &[],
            udp: Some(harness::peer::Ports {
                peer: 40001,
                qemu: 40002,
            }),
            hostfwd: &[],
        };
        let want = " -netdev dgram,id=net1,local.type=inet,local.host=127.0.0.1,local.port=40002,\
                    remote.type=inet,remote.host=127.0.0.1,remote.port=40001 \
                    -device virtio-net-pci,addr=04.0,netdev=net1,iommu_platform=on,disable-legacy=on ";
        let line = command_line(Path::new("q"), &args(&c));
        assert!(line.contains(want), "{line}");
        c.udp = None;
        let line = command_line(Path::new("q"), &args(&c));
        assert!(line.contains("local.port=47801,"), "{line}");
        assert!(line.contains("remote.port=47800 "), "{line}");
    }

    #[test]
    fn a_user_netdev_forwards_tcp_from_localhost() {
        let mut s = default_system();
        let fw = |a: &str| harness::tcppeer::Forward::parse(a).unwrap();
        s.devices[1].backend = Backend::UserNet {
            hostfwd: vec![fw("10.0.2.15:5001"), fw("10.0.2.16:7")],
        };
        let mut c = Config {
            system: &s,
            accel: Accel::Tcg,
            iommu: Iommu::Intel,
            kernel: Path::new("/k"),
            bundle: Path::new("/b"),
            disk_dir: Path::new("/d"),
            extra: &[],
            udp: None,
            hostfwd: &[40123],
        };
        let line = command_line(Path::new("q"), &args(&c));
        assert!(
            line.contains(
                " -netdev user,id=net1,restrict=on,hostfwd=tcp:127.0.0.1:40123-10.0.2.15:5001,\
                 hostfwd=tcp:127.0.0.1:7-10.0.2.16:7 "
            ),
            "{line}"
        );
        c.hostfwd = &[];
        let line = command_line(Path::new("q"), &args(&c));
        assert!(
            line.contains("hostfwd=tcp:127.0.0.1:5001-10.0.2.15:5001,"),
            "{line}"
        );
    }

    #[test]
    fn kvm_amd_and_odd_paths() {
        let mut s = default_system();
        s.devices[0].backend = Backend::Disk {
            path: "/tmp/a,b c.img".into(),
            size: None,
        };
        let c = Config {
            system: &s,
            accel: Accel::Kvm,
            iommu: Iommu::Amd,
            kernel: Path::new("/k"),
            bundle: Path::new("/b"),
            disk_dir: Path::new("/d"),
            extra: &[],
            udp: None,
            hostfwd: &[],
        };
        let line = command_line(Path::new("/usr/bin/qemu-system-x86_64"), &args(&c));
        assert!(
            line.contains("-machine q35,kernel-irqchip=split -accel kvm -cpu qemu64 "),
            "{line}"
        );
        assert!(
            line.contains(" -device amd-iommu -device isa-debug-exit"),
            "{line}"
        );
        assert!(
            line.contains(" 'if=none,id=disk0,format=raw,file=/tmp/a,,b c.img' "),
            "{line}"
        );
        let c = Config {
            iommu: Iommu::None,
            ..c
        };
        assert!(!args(&c)
            .iter()
            .any(|a| a.contains("iommu,") || a == "amd-iommu"));
    }
}
