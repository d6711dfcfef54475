//! One SVG chart per figure across accumulated reports, written by hand:
//! pure, host-tested.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::report::{def_of, num, stamp, Report};

const W: f64 = 760.0;
const H: f64 = 360.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 50.0;
const COLOURS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The figure names any report has, sorted.
pub fn figure_names(reports: &[Report]) -> Vec<String> {
    let mut names: Vec<String> = reports
        .iter()
        .flat_map(|r| r.configs.iter().flat_map(|c| c.figures.keys().cloned()))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The chart of `figure`: x is the report (oldest first), one line per
/// configuration.
pub fn svg(figure: &str, reports: &[Report]) -> String {
    let mut series: BTreeMap<&str, Vec<(usize, f64)>> = BTreeMap::new();
    for (i, r) in reports.iter().enumerate() {
        for c in &r.configs {
            if let Some(f) = c.figures.get(figure) {
                series.entry(&c.name).or_default().push((i, f.value));
            }
        }
    }
    let vals = series.values().flatten().map(|p| p.1);
    let hi = vals.clone().fold(0.0_f64, f64::max);
    let hi = if hi > 0.0 { hi * 1.1 } else { 1.0 };
    let n = reports.len().max(2);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |i: usize| LEFT + pw * i as f64 / (n - 1) as f64;
    let y = |v: f64| TOP + ph * (1.0 - v / hi);
    let (unit, what, noisy) = def_of(figure).map_or(("", "", false), |d| (d.unit, d.what, d.noisy));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let _ = writeln!(s, "<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{LEFT}\" y=\"16\" font-size=\"14\" font-weight=\"bold\">{} ({}){}</text>",
        esc(figure),
        esc(unit),
        if noisy { " - noisy, wall clock" } else { "" }
    );
    let _ = writeln!(
        s,
        "<text x=\"{LEFT}\" y=\"30\" fill=\"#555\">{}</text>",
        esc(what)
    );
    // Axes and a grid of five lines.
    for k in 0..=4 {
        let v = hi * k as f64 / 4.0;
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + pw,
            LEFT - 6.0,
            y(v) + 4.0,
            num(v),
            yy = y(v)
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{:.1}\" stroke=\"black\"/>",
        TOP + ph
    );
    for (i, r) in reports.iter().enumerate() {
        let label = format!("{} {}", r.commit, &stamp(r.created)[5..16]);
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{}</text>",
            x(i),
            TOP + ph + 16.0 + 11.0 * (i % 2) as f64,
            esc(&label)
        );
    }
    for (k, (name, pts)) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(i, v)| format!("{:.1},{:.1}", x(i), y(v)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
            path.join(" ")
        );
        for &(i, v) in pts {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{colour}\"><title>{} {}</title></circle>",
                x(i),
                y(v),
                esc(name),
                num(v)
            );
        }
        let ly = TOP + 12.0 * k as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"10\" height=\"3\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            W - RIGHT + 12.0,
            ly - 4.0,
            W - RIGHT + 26.0,
            ly,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::super::report::tests::report;
    use super::*;

    #[test]
    fn one_line_per_config_and_a_point_per_report() {
        let a = report();
        let mut b = report();
        b.created += 86_400;
        b.configs[0]
            .figures
            .get_mut("drv_ns_per_kib")
            .unwrap()
            .value *= 1.2;
        let s = svg("drv_ns_per_kib", &[a.clone(), b]);
        assert!(s.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2, "{s}");
        assert_eq!(s.matches("<circle").count(), 4, "{s}");
        assert!(s.contains(">split-copy-16k-d4</text>"));
        assert!(s.contains("drv_ns_per_kib (ns/KiB)"));
        // A figure only one config has; a noisy one says so.
        assert_eq!(
            svg("guest_ns_per_kib", std::slice::from_ref(&a))
                .matches("<polyline")
                .count(),
            1
        );
        assert!(svg("mb_s", std::slice::from_ref(&a)).contains("noisy"));
        assert!(figure_names(&[a]).contains(&"iotlb_inv_per_req".to_owned()));
        assert_eq!(esc("a<b&\"c\""), "a&lt;b&amp;&quot;c&quot;");
    }
}
