//! Figures from samples, the JSON report (schema in `bench/README.md`),
//! the table, the ratios and the icount agreement: pure, host-tested.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::extract::{DomainCounts, PeerSample, Sample};

/// The `schema` value of every report this code writes.
pub const SCHEMA: &str = "airlock-bench/1";
/// Two icount runs of one build must agree this closely on cost figures.
pub const AGREEMENT: f64 = 0.02;

/// Which way a figure is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
}

/// What each figure means and when a change is a regression.
pub struct Def {
    pub name: &'static str,
    pub unit: &'static str,
    pub better: Better,
    /// Relative change (0.05 = 5%) beyond which it regressed.
    pub threshold: f64,
    /// From host wall-clock time: depends on the machine's load.
    pub noisy: bool,
    pub what: &'static str,
}

const fn def(
    name: &'static str,
    unit: &'static str,
    better: Better,
    threshold: f64,
    noisy: bool,
    what: &'static str,
) -> Def {
    Def {
        name,
        unit,
        better,
        threshold,
        noisy,
        what,
    }
}

/// Every figure, in table order.
pub const DEFS: &[Def] = &[
    def(
        "mb_s",
        "MB/s",
        Better::Higher,
        0.30,
        true,
        "throughput in host wall-clock time, median of the repeats",
    ),
    def(
        "iops",
        "req/s",
        Better::Higher,
        0.30,
        true,
        "requests (frames for TCP) per wall-clock second, median",
    ),
    def(
        "host_mb_s",
        "MB/s",
        Better::Higher,
        0.30,
        true,
        "the host TCP peer's throughput (the direction that carried the stream), wall clock, median",
    ),
    def(
        "mb_s_icount",
        "MB/s",
        Better::Higher,
        0.30,
        true,
        "throughput in icount guest time (instructions at 1 ns each, plus idle time, which follows \
         the host's I/O threads under sleep=on: noisy)",
    ),
    def(
        "drv_ns_per_kib",
        "ns/KiB",
        Better::Lower,
        0.05,
        false,
        "driver domains' CPU per KiB under icount (ns = instructions)",
    ),
    def(
        "drv_ns_per_req",
        "ns/req",
        Better::Lower,
        0.05,
        false,
        "driver domains' CPU per request under icount",
    ),
    def(
        "guest_ns_per_kib",
        "ns/KiB",
        Better::Lower,
        0.05,
        false,
        "guests' CPU per KiB under icount",
    ),
    def(
        "guest_ns_per_req",
        "ns/req",
        Better::Lower,
        0.05,
        false,
        "guests' CPU per request under icount",
    ),
    def(
        "drv_hypercalls_per_req",
        "calls/req",
        Better::Lower,
        0.10,
        false,
        "driver domains' hypercalls per request",
    ),
    def(
        "guest_hypercalls_per_req",
        "calls/req",
        Better::Lower,
        0.10,
        false,
        "guests' hypercalls per request",
    ),
    def(
        "grant_maps_per_req",
        "maps/req",
        Better::Lower,
        0.02,
        false,
        "grant maps per request (all domains)",
    ),
    def(
        "grant_copies_per_req",
        "copies/req",
        Better::Lower,
        0.02,
        false,
        "grant copy operations per request",
    ),
    def(
        "copied_bytes_per_req",
        "B/req",
        Better::Lower,
        0.02,
        false,
        "bytes moved by grant copy per request",
    ),
    def(
        "iommu_maps_per_req",
        "maps/req",
        Better::Lower,
        0.02,
        false,
        "IOMMU mappings made per request (dma_map, device grant maps)",
    ),
    def(
        "iotlb_inv_per_req",
        "inv/req",
        Better::Lower,
        0.02,
        false,
        "IOTLB invalidations per request",
    ),
];

pub fn def_of(name: &str) -> Option<&'static Def> {
    DEFS.iter().find(|d| d.name == name)
}

/// The cost figures two icount runs must agree on.
pub const COST: &[&str] = &[
    "drv_ns_per_kib",
    "drv_ns_per_req",
    "guest_ns_per_kib",
    "guest_ns_per_req",
];

/// One figure of one configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub value: f64,
    pub unit: String,
    /// From host wall-clock time: compare with care.
    pub noisy: bool,
    /// Noisy figures: the smallest and largest of the `n` repeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    pub n: u32,
}

/// One configuration's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigResult {
    pub name: String,
    /// The manifest, relative to the repository.
    pub manifest: String,
    /// "split" (a guest through a backend) or "direct" (the driver domain alone).
    pub mode: String,
    /// The driver domain's DMA mode: "static" or "strict".
    pub dma: String,
    /// "copy", "map" or "-" (no vbd).
    pub grant: String,
    /// The sample's `what`, block size and depth.
    pub workload: String,
    pub block: u64,
    pub depth: u64,
    pub bytes: u64,
    pub requests: u64,
    pub figures: BTreeMap<String, Figure>,
    /// The first icount run's counters, per domain.
    pub counts: BTreeMap<String, DomainCounts>,
    /// Relative difference between two icount runs, per cost figure (only
    /// when the configuration ran twice under icount).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub agreement: BTreeMap<String, f64>,
    /// The host TCP peer's side of the first wall-clock run (`[host_tcp]`
    /// configurations): bytes, host time and CRC-32 each way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerSample>,
}

/// A ratio between two configurations' figure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    /// e.g. "split/direct 16k d4 copy".
    pub name: String,
    pub figure: String,
    pub num: String,
    pub den: String,
    pub value: f64,
}

/// A whole bench run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    /// Unix seconds when it finished.
    pub created: u64,
    /// `git describe`-like: short commit, "-dirty" with uncommitted changes.
    pub commit: String,
    pub quick: bool,
    /// The `-icount` option of the cost runs.
    pub icount: String,
    /// Wall-clock runs per configuration.
    pub wall_repeats: u32,
    pub configs: Vec<ConfigResult>,
    pub ratios: Vec<Ratio>,
}

fn per(x: u64, by: f64) -> f64 {
    if by > 0.0 {
        x as f64 / by
    } else {
        0.0
    }
}

fn sum(s: &Sample, drivers: &[String], driver: bool, f: impl Fn(&DomainCounts) -> u64) -> u64 {
    s.domains
        .iter()
        .filter(|(n, _)| drivers.contains(n) == driver)
        .map(|(_, d)| f(d))
        .sum()
}

fn fixed(value: f64, d: &Def) -> (String, Figure) {
    (
        d.name.to_owned(),
        Figure {
            value,
            unit: d.unit.to_owned(),
            noisy: d.noisy,
            min: None,
            max: None,
            n: 1,
        },
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn spread(d: &Def, mut v: Vec<f64>) -> (String, Figure) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let n = v.len() as u32;
    (
        d.name.to_owned(),
        Figure {
            value: median(&mut v),
            unit: d.unit.to_owned(),
            noisy: d.noisy,
            min: Some(min),
            max: Some(max),
            n,
        },
    )
}

fn mb_s(s: &Sample) -> f64 {
    per(s.bytes, s.ns as f64) * 1000.0
}

/// The deterministic figures of one icount sample; `drivers` names the
/// domains that own devices.
pub fn cost_figures(s: &Sample, drivers: &[String]) -> BTreeMap<String, Figure> {
    let kib = s.bytes as f64 / 1024.0;
    let req = s.requests as f64;
    let d = |n: &str| def_of(n).expect("a figure in DEFS");
    let mut m = BTreeMap::new();
    let mut put = |name: &str, v: f64| {
        let (k, f) = fixed(v, d(name));
        m.insert(k, f);
    };
    put("mb_s_icount", mb_s(s));
    let drv_cpu = sum(s, drivers, true, |c| c.cpu_ns);
    let guest_cpu = sum(s, drivers, false, |c| c.cpu_ns);
    put("drv_ns_per_kib", per(drv_cpu, kib));
    put("drv_ns_per_req", per(drv_cpu, req));
    let guests = s.domains.keys().any(|n| !drivers.contains(n));
    if guests {
        put("guest_ns_per_kib", per(guest_cpu, kib));
        put("guest_ns_per_req", per(guest_cpu, req));
        put(
            "guest_hypercalls_per_req",
            per(sum(s, drivers, false, |c| c.hypercalls), req),
        );
    }
    put(
        "drv_hypercalls_per_req",
        per(sum(s, drivers, true, |c| c.hypercalls), req),
    );
    let all = |f: &dyn Fn(&DomainCounts) -> u64| -> u64 { s.domains.values().map(f).sum() };
    put("grant_maps_per_req", per(all(&|c| c.grant_maps), req));
    put("grant_copies_per_req", per(all(&|c| c.grant_copies), req));
    put("copied_bytes_per_req", per(all(&|c| c.copied_bytes), req));
    if s.domains.values().any(|c| c.iommu_maps.is_some()) {
        put(
            "iommu_maps_per_req",
            per(all(&|c| c.iommu_maps.unwrap_or(0)), req),
        );
        put(
            "iotlb_inv_per_req",
            per(all(&|c| c.iotlb_invalidations.unwrap_or(0)), req),
        );
    }
    m
}

/// The noisy figures of the wall-clock samples.
pub fn wall_figures(samples: &[Sample]) -> BTreeMap<String, Figure> {
    let mut m = BTreeMap::new();
    if samples.is_empty() {
        return m;
    }
    let d = |n: &str| def_of(n).expect("a figure in DEFS");
    let (k, f) = spread(d("mb_s"), samples.iter().map(mb_s).collect());
    m.insert(k, f);
    let (k, f) = spread(
        d("iops"),
        samples
            .iter()
            .map(|s| per(s.requests, s.ns as f64) * 1e9)
            .collect(),
    );
    m.insert(k, f);
    let host: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.peer.as_ref())
        .map(|p| {
            let (bytes, ns) = p.main_direction();
            per(bytes, ns as f64) * 1000.0
        })
        .collect();
    if host.len() == samples.len() {
        let (k, f) = spread(d("host_mb_s"), host);
        m.insert(k, f);
    }
    m
}

/// Relative difference of each cost figure between two icount samples.
pub fn agreement(a: &Sample, b: &Sample, drivers: &[String]) -> BTreeMap<String, f64> {
    let (fa, fb) = (cost_figures(a, drivers), cost_figures(b, drivers));
    COST.iter()
        .filter_map(|&n| {
            let (x, y) = (fa.get(n)?.value, fb.get(n)?.value);
            let mean = (x + y) / 2.0;
            let diff = if mean > 0.0 {
                (x - y).abs() / mean
            } else {
                0.0
            };
            Some((n.to_owned(), diff))
        })
        .collect()
}

/// The ratios the bench reports: (name, numerator, denominator, figures).
pub const RATIOS: &[(&str, &str, &str)] = &[
    (
        "split/direct 64k d16 copy",
        "split-copy-64k-d16",
        "direct-64k-d16",
    ),
    (
        "split/direct 64k d16 map",
        "split-map-64k-d16",
        "direct-64k-d16",
    ),
    (
        "split/direct write 64k d16 copy",
        "split-copy-write-64k-d16",
        "direct-write-64k-d16",
    ),
    (
        "split/direct write 64k d16 map",
        "split-map-write-64k-d16",
        "direct-write-64k-d16",
    ),
    (
        "split/direct 64k d1 copy",
        "split-copy-64k-d1",
        "direct-64k-d1",
    ),
    (
        "split/direct 4k d16 copy",
        "split-copy-4k-d16",
        "direct-4k-d16",
    ),
    (
        "split/direct 4k d16 map",
        "split-map-4k-d16",
        "direct-4k-d16",
    ),
    (
        "split/direct rand4k d16 copy",
        "split-copy-rand4k-d16",
        "direct-rand4k-d16",
    ),
    (
        "split/direct rand4k d16 map",
        "split-map-rand4k-d16",
        "direct-rand4k-d16",
    ),
    (
        "split/direct 4k d1 copy",
        "split-copy-4k-d1",
        "direct-4k-d1",
    ),
    (
        "split/direct 16k d4 copy",
        "split-copy-16k-d4",
        "direct-16k-d4",
    ),
    (
        "split/direct 16k d4 map",
        "split-map-16k-d4",
        "direct-16k-d4",
    ),
    (
        "split/direct tcp to host",
        "tcp-guest-to-host",
        "tcp-direct-to-host",
    ),
    (
        "split/direct tcp from host",
        "tcp-host-to-guest",
        "tcp-direct-from-host",
    ),
    (
        "strict/static split 64k d16 copy",
        "split-copy-64k-d16-strict",
        "split-copy-64k-d16",
    ),
    (
        "strict/static split 64k d16 map",
        "split-map-64k-d16-strict",
        "split-map-64k-d16",
    ),
    (
        "strict/static direct 16k d4",
        "direct-16k-d4-strict",
        "direct-16k-d4",
    ),
    (
        "map/copy split 64k d16",
        "split-map-64k-d16",
        "split-copy-64k-d16",
    ),
];

/// The figures each ratio is taken of (throughput: 1.0 is no loss).
pub const RATIO_FIGURES: &[&str] = &["mb_s_icount", "mb_s"];

pub fn ratios(configs: &[ConfigResult]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for &(name, num, den) in RATIOS {
        let (Some(a), Some(b)) = (
            configs.iter().find(|c| c.name == num),
            configs.iter().find(|c| c.name == den),
        ) else {
            continue;
        };
        for &fig in RATIO_FIGURES {
            if let (Some(x), Some(y)) = (a.figures.get(fig), b.figures.get(fig)) {
                if y.value > 0.0 {
                    out.push(Ratio {
                        name: name.to_owned(),
                        figure: fig.to_owned(),
                        num: num.to_owned(),
                        den: den.to_owned(),
                        value: x.value / y.value,
                    });
                }
            }
        }
    }
    out
}

/// A number in at most 4 significant places, without noise digits.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The readable table.
pub fn table(r: &Report) -> String {
    let cols: &[(&str, &str)] = &[
        ("mb_s", "MB/s wall (min-max)"),
        ("mb_s_icount", "MB/s ic"),
        ("host_mb_s", "host MB/s"),
        ("drv_ns_per_kib", "drv ns/KiB"),
        ("drv_ns_per_req", "drv ns/req"),
        ("guest_ns_per_kib", "gst ns/KiB"),
        ("guest_ns_per_req", "gst ns/req"),
        ("drv_hypercalls_per_req", "drv hc/req"),
        ("grant_maps_per_req", "gmap/req"),
        ("grant_copies_per_req", "gcopy/req"),
        ("copied_bytes_per_req", "copiedB/req"),
        ("iotlb_inv_per_req", "iotlb/req"),
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut head = vec!["config".to_owned(), "req".to_owned()];
    head.extend(cols.iter().map(|(_, h)| (*h).to_owned()));
    rows.push(head);
    for c in &r.configs {
        let mut row = vec![c.name.clone(), c.requests.to_string()];
        for (k, _) in cols {
            row.push(match c.figures.get(*k) {
                None => "-".into(),
                Some(f) => match (f.min, f.max) {
                    (Some(lo), Some(hi)) if f.n > 1 => {
                        format!("{} ({}-{})", num(f.value), num(lo), num(hi))
                    }
                    _ => num(f.value),
                },
            });
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "airlock bench {} ({}), {}; cost figures under -icount {} (ns = instructions), \
         wall-clock figures noisy (median of {})",
        r.commit,
        if r.quick { "quick" } else { "full matrix" },
        stamp(r.created),
        r.icount,
        r.wall_repeats
    );
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if i == 0 {
                    format!("{s:<w$}", w = widths[i])
                } else {
                    format!("{s:>w$}", w = widths[i])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    if !r.ratios.is_empty() {
        let _ = writeln!(out, "\nratios (throughput; 1.00 = no loss):");
        for x in &r.ratios {
            let _ = writeln!(
                out,
                "  {:<34} {:<12} {:.3}  ({} / {})",
                x.name, x.figure, x.value, x.num, x.den
            );
        }
    }
    let agreeing: Vec<&ConfigResult> = r
        .configs
        .iter()
        .filter(|c| !c.agreement.is_empty())
        .collect();
    if !agreeing.is_empty() {
        let _ = writeln!(
            out,
            "\nicount agreement between two runs (cost figures; target within {:.0}%):",
            AGREEMENT * 100.0
        );
        for c in agreeing {
            let _ = writeln!(out, "  {}", agreement_line(c));
        }
    }
    out
}

/// `NAME: worst 0.41% (drv_ns_per_kib 0.41%, ...): ok`.
pub fn agreement_line(c: &ConfigResult) -> String {
    let worst = c.agreement.values().copied().fold(0.0, f64::max);
    let parts: Vec<String> = c
        .agreement
        .iter()
        .map(|(k, v)| format!("{k} {:.2}%", v * 100.0))
        .collect();
    format!(
        "{}: worst {:.2}% ({}): {}",
        c.name,
        worst * 100.0,
        parts.join(", "),
        if worst <= AGREEMENT { "ok" } else { "DISAGREE" }
    )
}

/// Unix seconds as `2024-05-01T12:34:56Z`.
pub fn stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn to_json(r: &Report) -> String {
    serde_json::to_string_pretty(r).unwrap_or_default() + "\n"
}

/// Whether `a` and `b` hold the same configurations and figures (values
/// equal to 1e-9: JSON may round the last digit).
pub fn same(a: &Report, b: &Report) -> bool {
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0);
    a.schema == b.schema
        && a.configs.len() == b.configs.len()
        && a.configs.iter().zip(&b.configs).all(|(x, y)| {
            x.name == y.name
                && x.counts == y.counts
                && x.figures.len() == y.figures.len()
                && x.figures
                    .iter()
                    .zip(&y.figures)
                    .all(|((kx, fx), (ky, fy))| {
                        kx == ky && close(fx.value, fy.value) && fx.noisy == fy.noisy
                    })
        })
        && a.ratios.len() == b.ratios.len()
}

/// Reads a report, checking its schema.
pub fn from_json(text: &str, shown: &str) -> Result<Report, String> {
    let r: Report = serde_json::from_str(text)
        .map_err(|e| format!("{shown}: not an airlock bench report: {e}"))?;
    if r.schema != SCHEMA {
        return Err(format!(
            "{shown}: schema {:?}, this code reads {SCHEMA:?}",
            r.schema
        ));
    }
    Ok(r)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::extract::{sample, tests::DIRECT_LOG, tests::SPLIT_LOG};
    use super::*;

    pub fn report() -> Report {
        let drivers = vec!["blk".to_owned()];
        let s = sample(SPLIT_LOG).unwrap();
        let d = sample(DIRECT_LOG).unwrap();
        let mut s2 = s.clone();
        s2.domains.get_mut("blk").unwrap().cpu_ns += 8732; // 0.1%
        let mk = |name: &str, s: &Sample, agree: BTreeMap<String, f64>| {
            let mut figures = cost_figures(s, &drivers);
            figures.extend(wall_figures(&[s.clone(), s.clone(), s.clone()]));
            ConfigResult {
                name: name.into(),
                manifest: format!("bench/{name}.toml"),
                mode: "split".into(),
                dma: "static".into(),
                grant: "copy".into(),
                workload: s.what.clone(),
                block: s.block,
                depth: s.depth,
                bytes: s.bytes,
                requests: s.requests,
                figures,
                counts: s.domains.clone(),
                agreement: agree,
                peer: None,
            }
        };
        let configs = vec![
            mk("split-copy-16k-d4", &s, agreement(&s, &s2, &drivers)),
            mk("direct-16k-d4", &d, BTreeMap::new()),
        ];
        Report {
            schema: SCHEMA.into(),
            created: 1_700_000_000,
            commit: "abc1234".into(),
            quick: false,
            icount: "shift=0,sleep=on".into(),
            wall_repeats: 3,
            ratios: ratios(&configs),
            configs,
        }
    }

    #[test]
    fn figures_per_kib_and_request() {
        let s = sample(SPLIT_LOG).unwrap();
        let f = cost_figures(&s, &["blk".into()]);
        let v = |k: &str| f[k].value;
        assert!((v("drv_ns_per_kib") - 8732318.0 / 8192.0).abs() < 1e-6);
        assert!((v("guest_ns_per_req") - 2194144.0 / 256.0).abs() < 1e-6);
        assert_eq!(v("grant_copies_per_req"), 8.0);
        assert_eq!(v("copied_bytes_per_req"), 32768.0);
        assert_eq!(v("grant_maps_per_req"), 1.0 / 256.0);
        assert_eq!(v("iotlb_inv_per_req"), 0.0);
        assert!((v("mb_s_icount") - 8388608.0 / 8930707.0 * 1000.0).abs() < 1e-9);
        // The direct mode has no guest.
        let d = cost_figures(&sample(DIRECT_LOG).unwrap(), &["blk".into()]);
        assert!(!d.contains_key("guest_ns_per_kib"));
        assert_eq!(d["iotlb_inv_per_req"].value, 5376.0 / 512.0);
    }

    #[test]
    fn wall_figures_are_medians_with_spread() {
        let s = sample(SPLIT_LOG).unwrap();
        let mut slow = s.clone();
        slow.ns *= 2;
        let mut fast = s.clone();
        fast.ns /= 2;
        let f = wall_figures(&[slow, s.clone(), fast]);
        let m = &f["mb_s"];
        assert!((m.value - mb_s(&s)).abs() < 1e-9);
        assert!(m.min.unwrap() < m.value && m.max.unwrap() > m.value);
        assert_eq!((m.n, m.noisy), (3, true));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn agreement_and_ratios() {
        let r = report();
        let a = &r.configs[0].agreement;
        assert!((a["drv_ns_per_kib"] - 0.001).abs() < 1e-4, "{a:?}");
        assert_eq!(a["guest_ns_per_kib"], 0.0);
        assert!(agreement_line(&r.configs[0]).ends_with(": ok"));
        let x = r
            .ratios
            .iter()
            .find(|x| x.name == "split/direct 16k d4 copy" && x.figure == "mb_s_icount")
            .unwrap();
        let want = (8388608.0 / 8930707.0) / (8388608.0 / 53_301_000.0);
        assert!((x.value - want).abs() < 1e-9);
    }

    #[test]
    fn json_round_trips_and_the_schema_is_checked() {
        let r = report();
        let text = to_json(&r);
        assert!(same(&from_json(&text, "r.json").unwrap(), &r));
        let mut other = r.clone();
        other.configs[0].figures.get_mut("mb_s").unwrap().value += 1.0;
        assert!(!same(&other, &r));
        let other = text.replace(SCHEMA, "airlock-bench/0");
        assert!(from_json(&other, "o.json").unwrap_err().contains("schema"));
        assert!(from_json("{}", "e.json")
            .unwrap_err()
            .starts_with("e.json: not an airlock bench report"));
    }

    #[test]
    fn the_table_names_every_config() {
        let t = table(&report());
        assert!(
            t.contains("split-copy-16k-d4") && t.contains("direct-16k-d4"),
            "{t}"
        );
        assert!(t.contains("split/direct 16k d4 copy"), "{t}");
        assert!(t.contains("icount agreement"), "{t}");
        assert!(t.contains("2023-11-14T22:13:20Z"), "{t}");
    }

    #[test]
    fn stamps() {
        assert_eq!(stamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(stamp(951_782_400), "2000-02-29T00:00:00Z");
    }
}
