//! The command line: `cargo xtask run|test|check ...`, parsed by hand (a
//! handful of flags do not need a parser crate), every mistake an error.

use std::path::PathBuf;

use crate::qemu::{Accel, Iommu};

pub const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  run    check and compile the manifest, build the hypervisor, pack the boot
         bundle, boot it under QEMU, stream the console, exit with the
         system's status
         --manifest FILE          manifest to boot (default manifests/default.toml)
         --accel tcg|kvm          QEMU accelerator (default tcg)
         --iommu intel|amd|none   emulated IOMMU (default intel)
         --timeout S              kill QEMU after S seconds, 0 for never (default 60)
         --qemu-arg ARG           append ARG to QEMU's command line (repeatable)
         --keep-running           compile the exit rule as \"never\" (and no
                                  time limit unless --timeout is given)
  test   run the host tests (cargo test --workspace), then every scenario in
         tests/scenarios/; ends with a line \"N passed, N failed\"
         --scenario NAME          run only tests/scenarios/NAME.toml (no host tests)
         --accel tcg|kvm          QEMU accelerator for the scenarios (default tcg)
         --verbose                echo each scenario's console as it runs
  check  check manifests and print what they compile to
         FILE...                  (default manifests/default.toml)
  bench  run the bench matrix (bench/*.toml) under QEMU: cost figures under
         -icount (two runs each, their agreement printed), wall-clock
         throughput over repeats; writes JSON and a table to
         target/airlock/bench/ (bench/README.md has the schema)
         --quick                  the quick matrix (bench/quick-*.toml)
         --baseline FILE          compare with FILE afterwards; exit 1 on a regression
         --out DIR                where results accumulate
         --plot                   write DIR/plots/FIGURE.svg across the results
         --repeats N              wall-clock runs per configuration (default 3, quick 1)
         --only NAME              run only bench/NAME.toml (repeatable)
  bench compare NEW.json BASELINE.json
                                  compare two results figure by figure
  bench plot [--out DIR]          plot the accumulated results
  profile
         run (same options) with a QEMU plugin that counts every executed
         instruction, then print the instructions per domain and the
         functions that ran most in each (needs a C compiler and addr2line)
         --top N                  functions shown per domain (default 15)
  help   print this";

/// Functions `profile` shows per domain unless `--top` says otherwise.
pub const DEFAULT_TOP: usize = 15;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunArgs {
    pub manifest: Option<PathBuf>,
    pub accel: Accel,
    pub iommu: Iommu,
    /// `None`: not given.
    pub timeout: Option<u64>,
    pub qemu_args: Vec<String>,
    pub keep_running: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestArgs {
    pub scenario: Option<String>,
    pub accel: Accel,
    pub verbose: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cmd {
    Run(RunArgs),
    Test(TestArgs),
    Check(Vec<PathBuf>),
    Bench(crate::bench::BenchCmd),
    /// `run` under the instruction-counting plugin; the functions shown
    /// per domain.
    Profile(RunArgs, usize),
    Help,
}

/// Splits `--flag=value` and takes the value of `--flag value`.
struct Args<I: Iterator<Item = String>> {
    it: I,
    pending: Option<String>,
}

impl<I: Iterator<Item = String>> Args<I> {
    /// The next flag (or word), with an inline `=value` set aside.
    fn next(&mut self) -> Option<String> {
        let a = self.it.next()?;
        if a.starts_with("--") {
            if let Some((flag, value)) = a.split_once('=') {
                self.pending = Some(value.to_owned());
                return Some(flag.to_owned());
            }
        }
        self.pending = None;
        Some(a)
    }

    fn value(&mut self, flag: &str) -> Result<String, String> {
        match self.pending.take() {
            Some(v) => Ok(v),
            // A `--qemu-arg` value may itself start with "-".
            None => self
                .it
                .next()
                .ok_or_else(|| format!("cargo xtask: {flag} needs a value")),
        }
    }

    fn no_value(&mut self, flag: &str) -> Result<(), String> {
        match self.pending.take() {
            Some(_) => Err(format!("cargo xtask: {flag} takes no value")),
            None => Ok(()),
        }
    }
}

fn accel(v: &str) -> Result<Accel, String> {
    match v {
        "tcg" => Ok(Accel::Tcg),
        "kvm" => Ok(Accel::Kvm),
        _ => Err(format!("cargo xtask: --accel {v:?}: expected tcg or kvm")),
    }
}

fn iommu(v: &str) -> Result<Iommu, String> {
    match v {
        "intel" => Ok(Iommu::Intel),
        "amd" => Ok(Iommu::Amd),
        "none" => Ok(Iommu::None),
        _ => Err(format!(
            "cargo xtask: --iommu {v:?}: expected intel, amd or none"
        )),
    }
}

fn unknown(cmd: &str, a: &str) -> String {
    format!("cargo xtask {cmd}: unknown option {a:?} (cargo xtask help lists them)")
}

/// Parses everything after `cargo xtask`.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Cmd, String> {
    let mut it = args.into_iter();
    let Some(cmd) = it.next() else {
        return Err("cargo xtask: no command given; try cargo xtask run, test or help".into());
    };
    let mut a = Args { it, pending: None };
    match cmd.as_str() {
        "run" | "profile" => {
            let profile = cmd == "profile";
            let mut top = DEFAULT_TOP;
            let mut r = RunArgs {
                manifest: None,
                accel: Accel::Tcg,
                iommu: Iommu::Intel,
                timeout: None,
                qemu_args: Vec::new(),
                keep_running: false,
            };
            while let Some(f) = a.next() {
                match f.as_str() {
                    "--manifest" => r.manifest = Some(a.value(&f)?.into()),
                    "--accel" => r.accel = accel(&a.value(&f)?)?,
                    "--iommu" => r.iommu = iommu(&a.value(&f)?)?,
                    "--timeout" => {
                        let v = a.value(&f)?;
                        let s = v.parse::<u64>().map_err(|_| {
                            format!("cargo xtask: --timeout {v:?}: expected whole seconds (0 for no limit)")
                        })?;
                        r.timeout = Some(s);
                    }
                    "--qemu-arg" => r.qemu_args.push(a.value(&f)?),
                    "--keep-running" => {
                        a.no_value(&f)?;
                        r.keep_running = true;
                    }
                    "--top" if profile => {
                        let v = a.value(&f)?;
                        top = v.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
                            format!("cargo xtask: --top {v:?}: expected a whole number above 0")
                        })?;
                    }
                    _ => return Err(unknown(&cmd, &f)),
                }
            }
            Ok(if profile {
                Cmd::Profile(r, top)
            } else {
                Cmd::Run(r)
            })
        }
        "test" => {
            let mut t = TestArgs {
                scenario: None,
                accel: Accel::Tcg,
                verbose: false,
            };
            while let Some(f) = a.next() {
                match f.as_str() {
                    "--scenario" => t.scenario = Some(a.value(&f)?),
                    "--accel" => t.accel = accel(&a.value(&f)?)?,
                    "--verbose" => {
                        a.no_value(&f)?;
                        t.verbose = true;
                    }
                    _ => return Err(unknown("test", &f)),
                }
            }
            Ok(Cmd::Test(t))
        }
        "check" => {
            let mut files = Vec::new();
            while let Some(f) = a.next() {
                if f.starts_with('-') {
                    return Err(unknown("check", &f));
                }
                files.push(f.into());
            }
            Ok(Cmd::Check(files))
        }
        "bench" => crate::bench::parse_args(a.it).map(Cmd::Bench),
        "help" | "--help" | "-h" => Ok(Cmd::Help),
        other => Err(format!(
            "cargo xtask: unknown command {other:?}; try cargo xtask run, test, check or help"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Cmd, String> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn run_flags() {
        let Cmd::Run(r) = p(&["run"]).unwrap() else {
            panic!()
        };
        assert_eq!(
            (r.accel, r.iommu, r.timeout, r.keep_running),
            (Accel::Tcg, Iommu::Intel, None, false)
        );
        let Cmd::Run(r) = p(&[
            "run",
            "--manifest",
            "m.toml",
            "--accel=kvm",
            "--iommu",
            "amd",
            "--timeout",
            "5",
            "--qemu-arg",
            "-d",
            "--qemu-arg=int,cpu_reset",
            "--keep-running",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(r.manifest, Some("m.toml".into()));
        assert_eq!(
            (r.accel, r.iommu, r.timeout, r.keep_running),
            (Accel::Kvm, Iommu::Amd, Some(5), true)
        );
        assert_eq!(r.qemu_args, ["-d", "int,cpu_reset"]);
    }

    #[test]
    fn test_flags() {
        assert_eq!(
            p(&["test"]).unwrap(),
            Cmd::Test(TestArgs {
                scenario: None,
                accel: Accel::Tcg,
                verbose: false
            })
        );
        assert_eq!(
            p(&["test", "--scenario", "boot", "--verbose", "--accel", "kvm"]).unwrap(),
            Cmd::Test(TestArgs {
                scenario: Some("boot".into()),
                accel: Accel::Kvm,
                verbose: true
            })
        );
        assert_eq!(
            p(&["check", "a.toml", "b.toml"]).unwrap(),
            Cmd::Check(vec!["a.toml".into(), "b.toml".into()])
        );
        assert_eq!(p(&["--help"]).unwrap(), Cmd::Help);
    }

    #[test]
    fn mistakes_are_errors_not_panics() {
        for (args, msg) in [
            (&[][..], "no command given"),
            (&["build"][..], "unknown command \"build\""),
            (&["run", "--fast"][..], "unknown option \"--fast\""),
            (
                &["run", "--accel", "hvf"][..],
                "--accel \"hvf\": expected tcg or kvm",
            ),
            (
                &["run", "--iommu=arm"][..],
                "--iommu \"arm\": expected intel, amd or none",
            ),
            (
                &["run", "--timeout", "soon"][..],
                "--timeout \"soon\": expected whole seconds",
            ),
            (&["run", "--timeout", "-1"][..], "--timeout \"-1\""),
            (&["run", "--manifest"][..], "--manifest needs a value"),
            (
                &["run", "--keep-running=yes"][..],
                "--keep-running takes no value",
            ),
            (&["test", "--scenario"][..], "--scenario needs a value"),
            (&["test", "boot"][..], "unknown option \"boot\""),
            (&["check", "--all"][..], "unknown option \"--all\""),
        ] {
            let e = p(args).unwrap_err();
            assert!(e.contains(msg), "{args:?}: {e}");
        }
    }
}
