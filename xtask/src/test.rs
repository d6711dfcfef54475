//! `cargo xtask test`: the host tests, then the QEMU scenarios.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use harness::qemu::Options;

use crate::args::TestArgs;
use crate::qemu::{self, Iommu};
use crate::Paths;

/// Passed and failed counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
}

/// The counts in a libtest summary line:
/// `test result: ok. 34 passed; 0 failed; 0 ignored; 0 measured; ...`.
pub fn parse_test_result(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_, counts) = rest.split_once(". ")?;
    let mut c = Counts::default();
    let mut seen = 0;
    for part in counts.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => {
                c.passed = n;
                seen += 1;
            }
            "failed" => {
                c.failed = n;
                seen += 1;
            }
            _ => {}
        }
    }
    (seen == 2).then_some(c)
}

/// Runs `cargo test --workspace`, streaming its output, and adds up the
/// summary lines. A failure with no failing test (a build error) counts as
/// one failure.
fn host_tests(p: &Paths) -> Result<Counts, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let args = ["test", "--workspace", "--no-fail-fast"];
    println!("airlock: cargo {}", args.join(" "));
    let mut child = Command::new(&cargo)
        .args(args)
        .current_dir(&p.root)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not run cargo test: {e}"))?;
    let mut total = Counts::default();
    if let Some(out) = child.stdout.take() {
        let mut stdout = std::io::stdout();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(stdout, "{line}");
            if let Some(c) = parse_test_result(&line) {
                total.passed += c.passed;
                total.failed += c.failed;
            }
        }
    }
    let status = child.wait().map_err(|e| format!("cargo test: {e}"))?;
    if !status.success() && total.failed == 0 {
        println!(
            "airlock: cargo test failed ({status}) with no failing test: counted as one failure"
        );
        total.failed += 1;
    }
    Ok(total)
}

/// The scenario files to run, sorted by name.
fn scenarios(dir: &Path, only: Option<&str>) -> Result<Vec<PathBuf>, String> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    all.sort();
    let Some(name) = only else { return Ok(all) };
    let names: Vec<String> = all
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    match all
        .iter()
        .position(|p| p.file_stem().is_some_and(|s| s == name))
    {
        Some(i) => Ok(vec![all.swap_remove(i)]),
        None => Err(format!(
            "cargo xtask test: no scenario \"{name}\" (tests/scenarios/{name}.toml); there are: {}",
            names.join(", ")
        )),
    }
}

/// Boots one scenario and judges it; prints its result. `Ok(())` if it passed.
fn run_scenario(
    p: &Paths,
    qemu_bin: &Path,
    kernel: &Result<PathBuf, String>,
    images: &Result<PathBuf, String>,
    file: &Path,
    t: &TestArgs,
) -> Result<(), Vec<String>> {
    let one = |e: String| vec![e];
    let shown = p.show(file);
    let system = crate::load(file, &shown).map_err(one)?;
    let Some(spec) = system.test.clone() else {
        return Err(one(format!("{shown} has no [test] table")));
    };
    let kernel = kernel.as_ref().map_err(|e| one(e.clone()))?;
    let image_dir = match images {
        Ok(dir) => dir.as_path(),
        Err(e) if !system.domains.is_empty() => return Err(one(e.clone())),
        Err(_) => Path::new(""),
    };
    let bundle = p
        .airlock
        .join("scenarios")
        .join(format!("{}.bundle", spec.name));
    let mut bytes = crate::pack(&system, None, image_dir, &bundle).map_err(one)?;
    if let Some(c) = &spec.corrupt {
        let what = harness::corrupt::apply(c, &mut bytes)
            .map_err(|e| one(format!("corrupt = \"{c}\": {e}")))?;
        crate::write_file(&bundle, &bytes).map_err(one)?;
        println!("scenario {}: corrupt = \"{c}\": {what}", spec.name);
    }
    crate::create_disks(&system, p).map_err(one)?;
    // [test.disk]: the image made again (zeros, then the fill patterns).
    let disk = spec
        .disk
        .as_ref()
        .map(|d| (qemu::disk_path(&p.airlock, &d.path), d));
    if let Some((file, d)) = &disk {
        harness::disk::prepare_file(file, d).map_err(one)?;
    }
    // The test peer listens before QEMU starts, and stops by itself a little
    // after QEMU's own time limit at the latest.
    let peer = match &spec.peer {
        Some(ps) => Some(
            harness::peer::start(*ps, spec.timeout + Duration::from_secs(5))
                .map_err(|e| one(format!("could not start the test peer: {e}")))?,
        ),
        None => None,
    };
    // Host ports for the hostfwd rules, free right now; QEMU binds them.
    let hostfwd = crate::hostfwd_ports(&system).map_err(one)?;
    // The TCP peer ([test.tcp] or [host_tcp]) connects once QEMU listens
    // and the guest answers (it retries until then), and stops by itself
    // after QEMU's time limit.
    let tcp = match &spec.tcp {
        Some(ts) => Some(
            crate::start_tcp_peer(&system, ts, &hostfwd, spec.timeout + Duration::from_secs(5))
                .map_err(one)?,
        ),
        None => None,
    };
    let args = qemu::args(&qemu::Config {
        system: &system,
        accel: t.accel,
        iommu: Iommu::Intel,
        kernel,
        bundle: &bundle,
        disk_dir: &p.airlock,
        extra: &[],
        udp: peer.as_ref().map(|r| r.ports),
        hostfwd: &hostfwd,
    });
    let line = qemu::command_line(qemu_bin, &args);
    if t.verbose {
        println!("{line}");
    }
    let mut cmd = Command::new(qemu_bin);
    cmd.args(&args);
    let run = harness::qemu::run(
        cmd,
        Options {
            timeout: Some(spec.timeout),
            echo: t.verbose,
            own_group: true,
        },
    )
    .map_err(|e| one(format!("could not run {}: {e}", qemu_bin.display())))?;
    let mut verdict = harness::check_log(&spec, &run.log, &run.outcome);
    if let Some((file, d)) = &disk {
        verdict.failures.extend(harness::disk::check_file(file, d));
    }
    let mut peer_line = String::new();
    if let (Some(ps), Some(r)) = (&spec.peer, peer) {
        let report = r.finish();
        peer_line = format!("; {}", report.summary());
        verdict
            .failures
            .extend(harness::peer::failures(ps, &report));
    }
    if let (Some(ts), Some(r)) = (&spec.tcp, tcp) {
        let report = r.finish();
        peer_line.push_str(&format!("; {}", report.summary()));
        verdict
            .failures
            .extend(harness::tcppeer::failures(ts, &report));
    }
    let log = p.airlock.join("logs").join(format!("{}.log", spec.name));
    if verdict.passed() {
        let _ = std::fs::remove_file(&log);
        println!(
            "scenario {}: passed ({:.1} s, {} events; {}{peer_line})",
            spec.name,
            run.elapsed.as_secs_f64(),
            verdict.events.len(),
            run.outcome
        );
        return Ok(());
    }
    let mut failures = verdict.failures;
    if let Some(line) = peer_line.strip_prefix("; ") {
        failures.push(line.to_owned());
    }
    match crate::write_file(&log, run.log.as_bytes()) {
        Ok(()) => failures.push(format!("console log: {}", p.show(&log))),
        Err(e) => failures.push(format!("console log not kept: {e}")),
    }
    failures.push(format!("QEMU command line: {line}"));
    Err(failures)
}

pub fn test(t: TestArgs) -> Result<ExitCode, String> {
    let p = Paths::new();
    let files = scenarios(&p.root.join("tests/scenarios"), t.scenario.as_deref())?;
    let qemu_bin = qemu::ensure()?;

    let host = if t.scenario.is_none() {
        Some(host_tests(&p)?)
    } else {
        None
    };

    let kernel = crate::build_hypervisor(&p);
    if let Err(e) = &kernel {
        println!("airlock: {e}: every scenario fails");
    }
    // Every image any scenario names, built in one cargo call. A scenario
    // that does not check is left for run_scenario to report.
    let mut wanted: Vec<String> = Vec::new();
    for file in &files {
        if let Ok(s) = crate::load(file, &p.show(file)) {
            for i in s.images() {
                if !wanted.iter().any(|w| w == i) {
                    wanted.push(i.to_owned());
                }
            }
        }
    }
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let images = crate::build_images(&p, &wanted);
    if let Err(e) = &images {
        println!("airlock: {e}: every scenario with domains fails");
    }
    let mut sc = Counts::default();
    for file in &files {
        let name = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match run_scenario(&p, &qemu_bin, &kernel, &images, file, &t) {
            Ok(()) => sc.passed += 1,
            Err(failures) => {
                sc.failed += 1;
                println!("scenario {name}: FAILED");
                for f in failures {
                    for (i, l) in f.lines().enumerate() {
                        println!("{}{l}", if i == 0 { "  - " } else { "    " });
                    }
                }
            }
        }
    }

    // The bench pipeline (quick matrix, JSON, compare), once, as one more
    // scenario: it asserts nothing about speed.
    if t.scenario.is_none() {
        match crate::bench::self_test(&p) {
            Ok(what) => {
                sc.passed += 1;
                println!("scenario bench-quick: passed ({what})");
            }
            Err(e) => {
                sc.failed += 1;
                println!("scenario bench-quick: FAILED\n  - {e}");
            }
        }
    }
    let mut total = sc;
    match host {
        Some(h) => {
            total.passed += h.passed;
            total.failed += h.failed;
            println!(
                "host tests: {} passed, {} failed; scenarios: {} passed, {} failed",
                h.passed, h.failed, sc.passed, sc.failed
            );
        }
        None => println!(
            "scenarios only (--scenario): {} passed, {} failed",
            sc.passed, sc.failed
        ),
    }
    println!("{} passed, {} failed", total.passed, total.failed);
    let _ = std::io::stdout().flush();
    Ok(if total.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_summary_lines() {
        assert_eq!(
            parse_test_result("test result: ok. 34 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s"),
            Some(Counts { passed: 34, failed: 0 })
        );
        assert_eq!(
            parse_test_result("test result: FAILED. 16 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.31s"),
            Some(Counts { passed: 16, failed: 1 })
        );
        assert_eq!(parse_test_result("test foo ... ok"), None);
        assert_eq!(parse_test_result("running 3 tests"), None);
        assert_eq!(parse_test_result("test result: garbage"), None);
    }

    #[test]
    fn scenario_selection() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios");
        let all = scenarios(&dir, None).unwrap();
        assert!(all.iter().any(|p| p.ends_with("boot.toml")));
        assert!(all.iter().any(|p| p.ends_with("bad-bundle.toml")));
        let one = scenarios(&dir, Some("boot")).unwrap();
        assert_eq!(one.len(), 1);
        let e = scenarios(&dir, Some("nope")).unwrap_err();
        assert!(
            e.contains("no scenario \"nope\"") && e.contains("boot"),
            "{e}"
        );
    }
}
