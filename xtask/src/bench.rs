//! `cargo xtask bench`: what isolation costs, measured, and regressions
//! caught.
//!
//! ```text
//! cargo xtask bench [--quick] [--baseline FILE] [--out DIR] [--plot]
//!                   [--repeats N] [--only NAME]
//! cargo xtask bench compare NEW.json BASELINE.json
//! cargo xtask bench plot [--out DIR]
//! ```
//!
//! Each configuration is a manifest in `bench/` (`bench/quick-*.toml` are
//! the quick matrix, the others the full one) with a `[test]` table that
//! says what a good run prints. Each runs
//!
//! - twice under `-icount shift=0,sleep=on` ([`ICOUNT`]): the guest's TSC
//!   then counts instructions (1 ns each, `tsc_khz` ~1,000,000), so the
//!   hypervisor's per-domain CPU time, and every figure made of it, depends
//!   on the code and not on the host's load; the two runs' agreement is
//!   printed. (`sleep=off` would be exactly repeatable but breaks I/O: an
//!   idle CPU jumps virtual time to the next timer, so every 5 s request
//!   timeout fires before the host's disk thread answers.)
//! - `--repeats` times (default 3, quick 1) without icount, for wall-clock
//!   throughput: median and spread, marked noisy. These runs go in rounds
//!   over the whole matrix (after every configuration's icount runs), so a
//!   configuration's repeats, and the two sides of a ratio, are spread over
//!   the bench's whole time rather than taken back to back while the host's
//!   load happens to be high or low.
//!
//! Figures, schema, thresholds: `bench/README.md`; options: `cargo xtask
//! help`. Results accumulate in
//! `target/airlock/bench/` (or `--out`): `STAMP-COMMIT.json`, the same
//! table as `.txt`, `plots/FIGURE.svg` with `--plot`, and the console of a
//! failed run in `logs/`.

pub mod compare;
pub mod extract;
pub mod plot;
pub mod report;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::manifest::System;
use crate::qemu::{self, Accel, Iommu};
use crate::Paths;

use extract::Sample;
use report::{ConfigResult, Report};

/// The icount setting of the cost runs.
pub const ICOUNT: &str = "shift=0,sleep=on";

/// What `cargo xtask bench` was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BenchCmd {
    Run(BenchArgs),
    Compare { new: PathBuf, base: PathBuf },
    Plot { out: Option<PathBuf> },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BenchArgs {
    pub quick: bool,
    pub baseline: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub plot: bool,
    /// Wall-clock runs per configuration.
    pub repeats: Option<u32>,
    pub only: Vec<String>,
}

/// Parses what follows `cargo xtask bench`.
pub fn parse_args(mut it: impl Iterator<Item = String>) -> Result<BenchCmd, String> {
    let mut a = BenchArgs::default();
    let mut words: Vec<String> = Vec::new();
    let mut plot_only = false;
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if arg.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let value = |it: &mut dyn Iterator<Item = String>| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("cargo xtask bench: {flag} needs a value"))
        };
        match flag.as_str() {
            "--quick" => a.quick = true,
            "--plot" => a.plot = true,
            "--baseline" => a.baseline = Some(value(&mut it)?.into()),
            "--out" => a.out = Some(value(&mut it)?.into()),
            "--only" => a.only.push(value(&mut it)?),
            "--repeats" => {
                let v = value(&mut it)?;
                a.repeats = Some(
                    v.parse()
                        .ok()
                        .filter(|&n: &u32| (1..=20).contains(&n))
                        .ok_or_else(|| {
                            format!("cargo xtask bench: --repeats {v:?}: expected 1 to 20")
                        })?,
                );
            }
            "compare" if words.is_empty() && !plot_only => words.push(arg),
            "plot" if words.is_empty() => plot_only = true,
            f if f.starts_with('-') => {
                return Err(format!(
                    "cargo xtask bench: unknown option {f:?} (cargo xtask help lists them)"
                ))
            }
            _ if !words.is_empty() => words.push(arg),
            _ => return Err(format!("cargo xtask bench: unexpected {arg:?}")),
        }
    }
    if !words.is_empty() {
        return match &words[1..] {
            [new, base] => Ok(BenchCmd::Compare {
                new: new.into(),
                base: base.into(),
            }),
            _ => Err("cargo xtask bench compare: give NEW.json BASELINE.json".into()),
        };
    }
    if plot_only {
        return Ok(BenchCmd::Plot { out: a.out });
    }
    Ok(BenchCmd::Run(a))
}

pub fn bench(cmd: BenchCmd) -> Result<ExitCode, String> {
    let p = Paths::new();
    match cmd {
        BenchCmd::Compare { new, base } => {
            let n = read_report(&new)?;
            let b = read_report(&base)?;
            Ok(judge(&n, &b, &base))
        }
        BenchCmd::Plot { out } => {
            let dir = out.unwrap_or_else(|| p.airlock.join("bench"));
            plot_dir(&dir, None)?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Run(a) => {
            let dir = a.out.clone().unwrap_or_else(|| p.airlock.join("bench"));
            let (r, file) = run_matrix(&p, &a, &dir)?;
            if a.plot {
                plot_dir(&dir, Some(r.quick))?;
            }
            match &a.baseline {
                Some(b) => {
                    let base = read_report(b)?;
                    eprintln!("bench: {} against {}", p.show(&file), b.display());
                    Ok(judge(&r, &base, b))
                }
                None => Ok(ExitCode::SUCCESS),
            }
        }
    }
}

fn read_report(file: &Path) -> Result<Report, String> {
    let shown = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| format!("{shown}: cannot read: {e}"))?;
    report::from_json(&text, &shown)
}

fn judge(new: &Report, base: &Report, base_file: &Path) -> ExitCode {
    let c = compare::compare(new, base);
    print!(
        "compared with {} ({}):\n{}",
        base_file.display(),
        base.commit,
        c.text()
    );
    if c.regressions().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Every report in `dir`, oldest first (only quick ones or only full ones
/// when `quick` says which).
fn reports_in(dir: &Path, quick: Option<bool>) -> Result<Vec<Report>, String> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for e in rd.flatten() {
        let f = e.path();
        if f.extension().is_some_and(|x| x == "json") {
            match read_report(&f) {
                Ok(r) if quick.is_none_or(|q| q == r.quick) => out.push(r),
                Ok(_) => {}
                Err(e) => eprintln!("bench: skipping {e}"),
            }
        }
    }
    out.sort_by_key(|r| r.created);
    Ok(out)
}

fn plot_dir(dir: &Path, quick: Option<bool>) -> Result<(), String> {
    let reports = reports_in(dir, quick)?;
    if reports.is_empty() {
        return Err(format!("no bench results in {} to plot", dir.display()));
    }
    let plots = dir.join("plots");
    let names = plot::figure_names(&reports);
    for f in &names {
        crate::write_file(
            &plots.join(format!("{f}.svg")),
            plot::svg(f, &reports).as_bytes(),
        )?;
    }
    eprintln!(
        "bench: {} charts of {} results in {}",
        names.len(),
        reports.len(),
        plots.display()
    );
    Ok(())
}

/// The matrix: `bench/*.toml`, quick ones or the others, sorted.
fn matrix(p: &Paths, quick: bool, only: &[String]) -> Result<Vec<PathBuf>, String> {
    let dir = p.root.join("bench");
    let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.extension().is_some_and(|x| x == "toml"))
        .collect();
    all.sort();
    let stem = |f: &Path| {
        f.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    if !only.is_empty() {
        for o in only {
            if !all.iter().any(|f| stem(f) == *o) {
                return Err(format!("cargo xtask bench: no bench/{o}.toml"));
            }
        }
        return Ok(all
            .into_iter()
            .filter(|f| only.contains(&stem(f)))
            .collect());
    }
    Ok(all
        .into_iter()
        .filter(|f| stem(f).starts_with("quick-") == quick)
        .collect())
}

/// What `git` says the tree is: short commit, "-dirty" if changed.
fn commit(p: &Paths) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(&p.root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let c = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(s) if !s.is_empty() => format!("{c}-dirty"),
        _ => c,
    }
}

/// One boot of `system` (its bundle at `bundle`); the sample, or why not.
fn boot(
    p: &Paths,
    qemu_bin: &Path,
    kernel: &Path,
    bundle: &Path,
    system: &System,
    icount: bool,
    log_name: &str,
) -> Result<Sample, String> {
    let spec = system
        .test
        .as_ref()
        .ok_or_else(|| format!("{}: a bench manifest needs a [test] table", system.name))?;
    if spec.peer.is_some() {
        return Err(format!(
            "{}: the bench runs no UDP test peer ([test.peer])",
            system.name
        ));
    }
    if let Some(d) = &spec.disk {
        harness::disk::prepare_file(&qemu::disk_path(&p.airlock, &d.path), d)?;
    }
    let extra: Vec<String> = if icount {
        vec!["-icount".into(), ICOUNT.into()]
    } else {
        Vec::new()
    };
    // The host TCP peer (`[host_tcp]`, or `[test.tcp]`), started as
    // `cargo xtask run` starts it: every hostfwd rule gets a free host port.
    let hostfwd = match &spec.tcp {
        Some(_) => crate::hostfwd_ports(system)?,
        None => Vec::new(),
    };
    let peer = match &spec.tcp {
        Some(t) => Some((
            t,
            crate::start_tcp_peer(system, t, &hostfwd, spec.timeout + Duration::from_secs(5))?,
        )),
        None => None,
    };
    let args = qemu::args(&qemu::Config {
        system,
        accel: Accel::Tcg,
        iommu: Iommu::Intel,
        kernel,
        bundle,
        disk_dir: &p.airlock,
        extra: &extra,
        udp: None,
        hostfwd: &hostfwd,
    });
    let mut cmd = Command::new(qemu_bin);
    cmd.args(&args);
    let run = harness::qemu::run(
        cmd,
        harness::qemu::Options {
            timeout: Some(spec.timeout),
            echo: false,
            own_group: true,
        },
    );
    // QEMU has exited: the peer stops now and says what it saw.
    let peer = peer.map(|(t, running)| {
        let r = running.finish();
        (harness::tcppeer::failures(t, &r), r)
    });
    let run = run.map_err(|e| format!("could not run {}: {e}", qemu_bin.display()))?;
    let verdict = harness::check_log(spec, &run.log, &run.outcome);
    let mut failures = verdict.failures.clone();
    if let Some((f, _)) = &peer {
        failures.extend(f.iter().cloned());
    }
    let result = if failures.is_empty() {
        extract::sample(&run.log).map(|mut s| {
            s.peer = peer.map(|(_, r)| extract::PeerSample::of(&r));
            s
        })
    } else {
        Err(failures.join("; "))
    };
    result.map_err(|e| {
        let log = p.airlock.join("bench/logs").join(format!("{log_name}.log"));
        let kept = crate::write_file(&log, run.log.as_bytes())
            .map(|()| format!("console log: {}", p.show(&log)))
            .unwrap_or_else(|e| format!("console log not kept: {e}"));
        format!(
            "{log_name}: {e}\n  {kept}\n  QEMU command line: {}",
            qemu::command_line(qemu_bin, &args)
        )
    })
}

/// Runs the matrix, writes the report and table; returns them.
/// One configuration's runs so far.
struct Runs {
    /// Its index in the matrix.
    system: usize,
    bundle: PathBuf,
    ic: Vec<Sample>,
    wall: Vec<Sample>,
}

pub fn run_matrix(p: &Paths, a: &BenchArgs, dir: &Path) -> Result<(Report, PathBuf), String> {
    let files = matrix(p, a.quick, &a.only)?;
    if files.is_empty() {
        return Err("cargo xtask bench: the matrix is empty".into());
    }
    let repeats = a.repeats.unwrap_or(if a.quick { 1 } else { 3 });
    let mut systems = Vec::new();
    for f in &files {
        systems.push(crate::load(f, &p.show(f))?);
    }
    let qemu_bin = qemu::ensure()?;
    let kernel = crate::build_hypervisor(p)?;
    let mut images: Vec<&str> = systems.iter().flat_map(|s| s.images()).collect();
    images.sort_unstable();
    images.dedup();
    let image_dir = crate::build_images(p, &images)?;
    let total = systems.len() * (2 + repeats as usize);
    let mut done = 0;
    let t0 = Instant::now();
    let mut configs = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    // One line rewritten in place on a terminal, a line each in a log.
    let progress = |done: usize, name: &str, label: &str| {
        let line = format!(
            "bench: [{done}/{total}] {name} {label} ({:.0} s so far)",
            t0.elapsed().as_secs_f64()
        );
        if std::io::stderr().is_terminal() {
            eprint!("{line}\r");
        } else {
            eprintln!("{line}");
        }
    };
    // The icount runs of each configuration, then the wall-clock runs in
    // rounds over all of them, so that each configuration's repeats (and
    // the two sides of each ratio) sample the host's load across the whole
    // bench rather than one stretch of it.
    let mut runs: Vec<Runs> = Vec::new();
    for (i, system) in systems.iter().enumerate() {
        let bundle = p
            .airlock
            .join("bench/bundles")
            .join(format!("{}.bundle", system.name));
        crate::pack(system, None, &image_dir, &bundle)?;
        crate::create_disks(system, p)?;
        let mut r = Runs {
            system: i,
            bundle,
            ic: Vec::new(),
            wall: Vec::new(),
        };
        for k in 0..2 {
            done += 1;
            progress(done, &system.name, &format!("icount {}/2", k + 1));
            let name = format!("{}-icount", system.name);
            match boot(p, &qemu_bin, &kernel, &r.bundle, system, true, &name) {
                Ok(s) => r.ic.push(s),
                Err(e) => {
                    eprintln!("bench: {} FAILED: {e}", system.name);
                    failed.push(system.name.clone());
                    done += 1 - k + repeats as usize;
                    break;
                }
            }
        }
        if r.ic.len() == 2 {
            runs.push(r);
        }
    }
    for round in 0..repeats as usize {
        for r in &mut runs {
            let system = &systems[r.system];
            if r.wall.len() < round {
                continue; // an earlier round failed
            }
            done += 1;
            progress(done, &system.name, &format!("wall {}/{repeats}", round + 1));
            let name = format!("{}-wall", system.name);
            match boot(p, &qemu_bin, &kernel, &r.bundle, system, false, &name) {
                Ok(s) => r.wall.push(s),
                Err(e) => {
                    eprintln!("bench: {} FAILED: {e}", system.name);
                    failed.push(system.name.clone());
                    done += repeats as usize - round - 1;
                }
            }
        }
    }
    for r in &runs {
        let (f, system) = (&files[r.system], &systems[r.system]);
        let (ic, wall) = (&r.ic, &r.wall);
        if wall.len() < repeats as usize {
            continue;
        }
        let drivers: Vec<String> = system
            .domains
            .iter()
            .filter(|d| !d.devices.is_empty())
            .map(|d| d.name.clone())
            .collect();
        let mut figures = report::cost_figures(&ic[0], &drivers);
        figures.extend(report::wall_figures(wall));
        let c = ConfigResult {
            name: system.name.clone(),
            manifest: p.show(f),
            mode: if drivers.len() == system.domains.len() {
                "direct".into()
            } else {
                "split".into()
            },
            dma: system
                .domains
                .iter()
                .find(|d| !d.devices.is_empty())
                .map_or("-", |d| abi::manifest::dma_mode_name(d.dma))
                .to_owned(),
            grant: system
                .vbds
                .first()
                .map_or("-", |v| abi::manifest::vbd_mode_name(v.mode))
                .to_owned(),
            workload: ic[0].what.clone(),
            block: ic[0].block,
            depth: ic[0].depth,
            bytes: ic[0].bytes,
            requests: ic[0].requests,
            counts: ic[0].domains.clone(),
            agreement: report::agreement(&ic[0], &ic[1], &drivers),
            peer: wall[0].peer.clone(),
            figures,
        };
        eprintln!(
            "bench: {} done; {}                ",
            c.name,
            report::agreement_line(&c)
        );
        configs.push(c);
    }
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let r = Report {
        schema: report::SCHEMA.into(),
        created,
        commit: commit(p),
        quick: a.quick,
        icount: ICOUNT.into(),
        wall_repeats: repeats,
        ratios: report::ratios(&configs),
        configs,
    };
    let stamp = report::stamp(created).replace([':', '-'], "");
    let base = dir.join(format!(
        "{stamp}-{}{}",
        r.commit,
        if a.quick { "-quick" } else { "" }
    ));
    let json = base.with_extension("json");
    let table = report::table(&r);
    crate::write_file(&json, report::to_json(&r).as_bytes())?;
    crate::write_file(&base.with_extension("txt"), table.as_bytes())?;
    print!("{table}");
    eprintln!(
        "bench: {} in {:.0} s; results in {}",
        p.show(&json),
        t0.elapsed().as_secs_f64(),
        p.show(dir)
    );
    if !failed.is_empty() {
        return Err(format!(
            "bench: {} configuration(s) failed: {} (left out of {})",
            failed.len(),
            failed.join(", "),
            p.show(&json)
        ));
    }
    Ok((r, json))
}

/// `cargo xtask test`'s check of the pipeline: the quick matrix once, its
/// JSON read back, and a copy with one cost figure 20% worse must be
/// flagged by `compare`, naming that figure. Nothing about speed.
pub fn self_test(p: &Paths) -> Result<String, String> {
    let dir = p.airlock.join("bench/selftest");
    let a = BenchArgs {
        quick: true,
        repeats: Some(1),
        ..BenchArgs::default()
    };
    let (r, file) = run_matrix(p, &a, &dir)?;
    let back = read_report(&file)?;
    if !report::same(&back, &r) {
        return Err(format!("{}: does not read back as written", p.show(&file)));
    }
    let c = back
        .configs
        .first()
        .ok_or("the quick report has no configuration")?;
    if !report::COST
        .iter()
        .take(2)
        .all(|k| c.figures.contains_key(*k))
    {
        return Err(format!("{}: no cost figures", c.name));
    }
    let same = compare::compare(&back, &back);
    if !same.regressions().is_empty() {
        return Err("a report regressed against itself".into());
    }
    let mut worse = back.clone();
    let key = "drv_ns_per_kib";
    if let Some(f) = worse.configs[0].figures.get_mut(key) {
        f.value *= 1.2;
    }
    let planted = format!("{}/{key}", c.name);
    let cmp = compare::compare(&worse, &back);
    let flagged: Vec<&str> = cmp.regressions().iter().map(|c| c.key.as_str()).collect();
    if flagged != [planted.as_str()] {
        return Err(format!(
            "compare flagged {flagged:?} for a planted 20% regression of {planted}"
        ));
    }
    Ok(format!(
        "{} configuration(s), valid JSON in {}, planted regression of {planted} flagged",
        r.configs.len(),
        p.show(&file)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<BenchCmd, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn bench_flags() {
        assert_eq!(p(&[]).unwrap(), BenchCmd::Run(BenchArgs::default()));
        let BenchCmd::Run(a) = p(&[
            "--quick",
            "--baseline",
            "b.json",
            "--out=o",
            "--plot",
            "--repeats",
            "5",
            "--only",
            "x",
        ])
        .unwrap() else {
            panic!()
        };
        assert!(a.quick && a.plot);
        assert_eq!(a.baseline, Some("b.json".into()));
        assert_eq!(a.out, Some("o".into()));
        assert_eq!((a.repeats, a.only), (Some(5), vec!["x".to_owned()]));
        assert_eq!(
            p(&["compare", "n.json", "b.json"]).unwrap(),
            BenchCmd::Compare {
                new: "n.json".into(),
                base: "b.json".into()
            }
        );
        assert_eq!(
            p(&["plot", "--out", "d"]).unwrap(),
            BenchCmd::Plot {
                out: Some("d".into())
            }
        );
        for (args, msg) in [
            (&["compare", "n.json"][..], "give NEW.json BASELINE.json"),
            (&["--fast"][..], "unknown option \"--fast\""),
            (&["--repeats", "0"][..], "expected 1 to 20"),
            (&["--out"][..], "--out needs a value"),
            (&["stuff"][..], "unexpected \"stuff\""),
        ] {
            let e = p(args).unwrap_err();
            assert!(e.contains(msg), "{args:?}: {e}");
        }
    }

    #[test]
    fn every_bench_manifest_checks_and_names_its_file() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench");
        let mut quick = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let f = e.path();
            if f.extension().is_none_or(|x| x != "toml") {
                continue;
            }
            let src = std::fs::read_to_string(&f).unwrap();
            let shown = f.display().to_string();
            let s = crate::manifest::check(&shown, &src).unwrap_or_else(|e| panic!("{e}"));
            let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
            assert_eq!(s.name, stem, "{shown}: system.name is the file's name");
            assert!(s.test.is_some(), "{shown}: needs a [test] table");
            quick += usize::from(stem.starts_with("quick-"));
        }
        assert!(quick >= 1);
        // Every ratio names configurations that exist; a split/direct one
        // divides a configuration with a guest by one without (what the
        // report calls "split" and "direct").
        let direct = |name: &str| {
            let f = dir.join(format!("{name}.toml"));
            let src = std::fs::read_to_string(&f).unwrap();
            let s = crate::manifest::check(&f.display().to_string(), &src).unwrap();
            s.domains.iter().all(|d| !d.devices.is_empty())
        };
        for (what, a, b) in report::RATIOS {
            assert!(dir.join(format!("{a}.toml")).is_file(), "{a}");
            assert!(dir.join(format!("{b}.toml")).is_file(), "{b}");
            if what.starts_with("split/direct") {
                assert!(!direct(a) && direct(b), "{what}: {a} / {b}");
            }
        }
    }
}
