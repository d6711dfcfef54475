//! Figure-by-figure comparison of two reports with each figure's own
//! threshold ([`super::report::DEFS`]): pure, host-tested.

use super::report::{def_of, num, Better, Report};

/// How one figure moved.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// `CONFIG/FIGURE`.
    pub key: String,
    pub base: f64,
    pub new: f64,
    /// Relative change, signed so that positive is worse.
    pub worse_by: f64,
    pub threshold: f64,
    pub noisy: bool,
    pub regressed: bool,
}

/// What [`compare`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Comparison {
    pub changes: Vec<Change>,
    /// Figures in the baseline that the new report lacks.
    pub missing: Vec<String>,
}

impl Comparison {
    pub fn regressions(&self) -> Vec<&Change> {
        self.changes.iter().filter(|c| c.regressed).collect()
    }

    /// One line per figure, then a verdict.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.changes {
            let mark = if c.regressed {
                "REGRESSED"
            } else if c.worse_by < -c.threshold {
                "better"
            } else {
                "ok"
            };
            out.push_str(&format!(
                "  {:<48} {:>10} -> {:>10}  {:+6.1}% worse (threshold {:.0}%{}): {mark}\n",
                c.key,
                num(c.base),
                num(c.new),
                c.worse_by * 100.0,
                c.threshold * 100.0,
                if c.noisy { ", noisy" } else { "" }
            ));
        }
        for m in &self.missing {
            out.push_str(&format!("  {m:<48} missing from the new report\n"));
        }
        let r = self.regressions();
        if r.is_empty() {
            out.push_str(&format!(
                "no regression ({} figures compared)\n",
                self.changes.len()
            ));
        } else {
            let names: Vec<&str> = r.iter().map(|c| c.key.as_str()).collect();
            out.push_str(&format!(
                "{} regression(s): {}\n",
                r.len(),
                names.join(", ")
            ));
        }
        out
    }
}

/// An absolute floor for figures whose baseline is 0 (a copy mode that
/// starts mapping, a static mode that starts invalidating).
const ZERO_FLOOR: f64 = 0.01;

/// Compares `new` with `base`: every figure both have, by its threshold.
pub fn compare(new: &Report, base: &Report) -> Comparison {
    let mut out = Comparison::default();
    for b in &base.configs {
        let n = new.configs.iter().find(|c| c.name == b.name);
        for (fig, bf) in &b.figures {
            let key = format!("{}/{fig}", b.name);
            let Some(nf) = n.and_then(|n| n.figures.get(fig)) else {
                out.missing.push(key);
                continue;
            };
            let Some(d) = def_of(fig) else { continue };
            let (bv, nv) = (bf.value, nf.value);
            let worse = match d.better {
                Better::Lower => nv - bv,
                Better::Higher => bv - nv,
            };
            let worse_by = if bv.abs() > 0.0 {
                worse / bv.abs()
            } else {
                worse
            };
            let regressed = if bv.abs() > 0.0 {
                worse_by > d.threshold
            } else {
                worse > ZERO_FLOOR
            };
            out.changes.push(Change {
                key,
                base: bv,
                new: nv,
                worse_by,
                threshold: d.threshold,
                noisy: d.noisy,
                regressed,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::report::tests::report;
    use super::*;

    #[test]
    fn the_same_report_does_not_regress() {
        let r = report();
        let c = compare(&r, &r);
        assert!(c.regressions().is_empty());
        assert!(c.missing.is_empty());
        assert!(c.text().contains("no regression"), "{}", c.text());
    }

    #[test]
    fn a_planted_regression_is_named() {
        let base = report();
        let mut new = base.clone();
        new.configs[0]
            .figures
            .get_mut("drv_ns_per_kib")
            .unwrap()
            .value *= 1.2;
        // Within its threshold: not a regression.
        new.configs[0].figures.get_mut("mb_s").unwrap().value *= 0.8;
        // Better: never a regression.
        new.configs[1]
            .figures
            .get_mut("drv_ns_per_req")
            .unwrap()
            .value *= 0.5;
        let c = compare(&new, &base);
        let r: Vec<&str> = c.regressions().iter().map(|c| c.key.as_str()).collect();
        assert_eq!(r, ["split-copy-16k-d4/drv_ns_per_kib"]);
        assert!(c
            .text()
            .contains("1 regression(s): split-copy-16k-d4/drv_ns_per_kib"));
    }

    #[test]
    fn from_zero_is_judged_absolutely_and_lost_figures_are_listed() {
        let base = report();
        let mut new = base.clone();
        // The split run did no IOTLB invalidation; now it does.
        new.configs[0]
            .figures
            .get_mut("iotlb_inv_per_req")
            .unwrap()
            .value = 2.0;
        new.configs[1].figures.remove("iops");
        let c = compare(&new, &base);
        let r: Vec<&str> = c.regressions().iter().map(|c| c.key.as_str()).collect();
        assert_eq!(r, ["split-copy-16k-d4/iotlb_inv_per_req"]);
        assert_eq!(c.missing, ["direct-16k-d4/iops"]);
    }
}
