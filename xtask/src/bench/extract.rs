//! What one bench run did, read from its console log: pure, host-tested.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One domain's counters, as the hypervisor printed them when it ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainCounts {
    /// `domain_cpu`: CPU time charged by the scheduler (under icount with
    /// `shift=0`: instructions).
    pub cpu_ns: u64,
    pub dispatches: u64,
    /// `hypercalls`.
    pub hypercalls: u64,
    pub refused: u64,
    /// `grant_stats` (the domain's own grant operations).
    pub grant_maps: u64,
    pub grant_unmaps: u64,
    pub grant_copies: u64,
    pub copied_bytes: u64,
    pub grant_failed: u64,
    /// `iommu_stats`, when the hypervisor prints it (domains with devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_maps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_unmaps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iotlb_invalidations: Option<u64>,
}

/// The workload's own measurement and every domain's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// `throughput.what` ("blk-seq-read", "blk-seq-write", "tcp-rx"), or "blk-direct-read"
    /// for the blk driver domain's direct mode.
    pub what: String,
    pub bytes: u64,
    /// Requests (block) or frames (TCP).
    pub requests: u64,
    /// Guest time the workload took (the domain's `time`, from the TSC).
    pub ns: u64,
    pub block: u64,
    pub depth: u64,
    /// `ready.tsc_khz`: about 1,000,000 under `-icount shift=0`.
    pub tsc_khz: u64,
    pub domains: BTreeMap<String, DomainCounts>,
    /// The host TCP peer's side (`[host_tcp]`), when the run had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerSample>,
}

/// What the host TCP peer moved, in host wall-clock time, and the CRC-32
/// of each direction (checked against the streams' patterns by
/// `harness::tcppeer::failures` before a run counts).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSample {
    pub sent: u64,
    pub sent_crc: u32,
    pub send_ns: u64,
    pub received: u64,
    pub received_crc: u32,
    pub recv_ns: u64,
}

impl PeerSample {
    pub fn of(r: &harness::tcppeer::TcpReport) -> Self {
        PeerSample {
            sent: r.sent,
            sent_crc: r.sent_crc,
            send_ns: r.send_time.as_nanos() as u64,
            received: r.received,
            received_crc: r.received_crc,
            recv_ns: r.recv_time.as_nanos() as u64,
        }
    }

    /// The bytes of the direction that carried more, and the peer's time
    /// for them.
    pub fn main_direction(&self) -> (u64, u64) {
        if self.received >= self.sent {
            (self.received, self.recv_ns)
        } else {
            (self.sent, self.send_ns)
        }
    }
}

fn u(fields: &Map<String, Value>, key: &str) -> u64 {
    fields.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// The `EV` objects of a log, in order (lines that are not JSON are left out).
pub fn events(log: &str) -> Vec<Map<String, Value>> {
    log.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(abi::ev::PREFIX))
        .filter_map(|j| match serde_json::from_str::<Value>(j) {
            Ok(Value::Object(m)) => Some(m),
            _ => None,
        })
        .collect()
}

/// The blk driver domain's direct-mode summary:
/// `[blk] blk: 512 requests, 16384 sectors in 53301 us (104 us per request,
/// depth 4, 32 sectors each); ...` as (requests, sectors, us, depth, sectors
/// per request).
pub fn direct_summary(log: &str) -> Option<(u64, u64, u64, u64, u64)> {
    for line in log.lines() {
        let Some((_, rest)) = line.split_once("] blk: ") else {
            continue;
        };
        let words: Vec<&str> = rest
            .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')' || c == ';')
            .filter(|w| !w.is_empty())
            .collect();
        // 512 requests 16384 sectors in 53301 us 104 us per request depth 4 32 sectors each
        // 0   1        2     3       4  5     6  7   8  9   10      11    12 13
        if words.len() < 14 || words[1] != "requests" || words[3] != "sectors" || words[4] != "in" {
            continue;
        }
        let n = |i: usize| words[i].parse::<u64>().ok();
        return Some((n(0)?, n(2)?, n(5)?, n(12)?, n(13)?));
    }
    None
}

/// The workloads a bench manifest may run, in the order they are looked for.
/// `tcp-rx` before `tcp-tx`: with two guests the receiver's count is the
/// stream's; a guest that only sends (to the host peer) has only `tcp-tx`.
const WORKLOADS: &[&str] = &[
    "blk-seq-read",
    "blk-rand-read",
    "blk-seq-write",
    "tcp-rx",
    "tcp-tx",
];

/// Reads one run's log. An error says what is missing.
pub fn sample(log: &str) -> Result<Sample, String> {
    let evs = events(log);
    let mut s = Sample::default();
    let name = |e: &Map<String, Value>| e.get("ev").and_then(Value::as_str).map(str::to_owned);
    for e in &evs {
        let ev = name(e).unwrap_or_default();
        let dom = e
            .get("domain")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        match ev.as_str() {
            "ready" => s.tsc_khz = u(e, "tsc_khz"),
            "domain_cpu" => {
                let d = s.domains.entry(dom).or_default();
                d.cpu_ns = u(e, "cpu_ns");
                d.dispatches = u(e, "dispatches");
            }
            "hypercalls" => {
                let d = s.domains.entry(dom).or_default();
                d.hypercalls = u(e, "calls");
                d.refused = u(e, "refused");
            }
            "grant_stats" => {
                let d = s.domains.entry(dom).or_default();
                d.grant_maps = u(e, "maps");
                d.grant_unmaps = u(e, "unmaps");
                d.grant_copies = u(e, "copies");
                d.copied_bytes = u(e, "copied_bytes");
                d.grant_failed = u(e, "failed");
            }
            "iommu_stats" => {
                let d = s.domains.entry(dom).or_default();
                d.iommu_maps = Some(u(e, "maps"));
                d.iommu_unmaps = Some(u(e, "unmaps"));
                d.iotlb_invalidations = Some(u(e, "iotlb_invalidations"));
            }
            _ => {}
        }
    }
    let tp = WORKLOADS.iter().find_map(|w| {
        evs.iter().find(|e| {
            name(e).as_deref() == Some("throughput")
                && e.get("what").and_then(Value::as_str) == Some(w)
        })
    });
    if let Some(t) = tp {
        s.what = t
            .get("what")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        s.bytes = u(t, "bytes");
        s.requests = u(t, "requests");
        s.ns = u(t, "ns");
        s.block = u(t, "block");
        s.depth = u(t, "depth");
    } else if let Some((requests, sectors, us, depth, per)) = direct_summary(log) {
        s.what = "blk-direct-read".into();
        s.bytes = sectors * 512;
        s.requests = requests;
        s.ns = us * 1000;
        s.block = per * 512;
        s.depth = depth;
    } else {
        return Err(format!(
            "no workload measurement in the log (a throughput event of {} or the blk direct \
             mode's summary line)",
            WORKLOADS.join(", ")
        ));
    }
    if s.domains.values().all(|d| d.cpu_ns == 0) {
        return Err("no domain_cpu events in the log".into());
    }
    if s.bytes == 0 || s.requests == 0 || s.ns == 0 {
        return Err(format!(
            "the workload moved nothing ({} bytes, {} requests, {} ns)",
            s.bytes, s.requests, s.ns
        ));
    }
    Ok(s)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A split run's console, trimmed.
    pub const SPLIT_LOG: &str = r#"[airlock] airlock 0.1.0 starting
EV {"ev":"ready","t_ms":23,"tsc_khz":999931}
[guest] blkfront: xvda connected: 16384 sectors (read-only), backend domain 1, 22 slots
EV {"ev":"throughput","what":"blk-seq-read","bytes":8388608,"requests":256,"ns":8930707,"block":65536,"depth":16,"from":"guest"}
EV {"ev":"work_done","work":"blkback-2","units":256,"from":"blk"}
EV {"ev":"grant_stats","domain":"blk","maps":1,"unmaps":1,"copies":2048,"copied_bytes":8388608,"failed":1}
EV {"ev":"hypercalls","domain":"blk","calls":520,"refused":0}
EV {"ev":"iommu_stats","domain":"blk","maps":0,"unmaps":0,"iotlb_invalidations":0}
EV {"ev":"hypercalls","domain":"guest","calls":355,"refused":1}
EV {"ev":"domain_cpu","domain":"blk","weight":1,"cpu_ns":8732318,"dispatches":87}
EV {"ev":"domain_cpu","domain":"guest","weight":1,"cpu_ns":2194144,"dispatches":82}
EV {"ev":"shutdown","status":0,"reason":"every domain ended as the manifest expects"}
"#;

    pub const DIRECT_LOG: &str = r#"EV {"ev":"ready","t_ms":23,"tsc_khz":999931}
[blk] blk: 00:03.0 32768 sectors, init 34 us, MSI-X vector 0 -> port 1, DMA Strict
EV {"ev":"data_check","what":"blk-read","bytes":8388608,"ok":true,"from":"blk"}
[blk] blk: 512 requests, 16384 sectors in 53301 us (104 us per request, depth 4, 32 sectors each); 7 interrupts, 3 with nothing new
EV {"ev":"hypercalls","domain":"blk","calls":4219,"refused":0}
EV {"ev":"iommu_stats","domain":"blk","maps":2050,"unmaps":2050,"iotlb_invalidations":5376}
EV {"ev":"domain_cpu","domain":"blk","weight":1,"cpu_ns":49626210,"dispatches":130}
"#;

    #[test]
    fn a_split_run() {
        let s = sample(SPLIT_LOG).unwrap();
        assert_eq!(
            (s.what.as_str(), s.bytes, s.requests, s.ns, s.block, s.depth),
            ("blk-seq-read", 8388608, 256, 8930707, 65536, 16)
        );
        assert_eq!(s.tsc_khz, 999931);
        let blk = &s.domains["blk"];
        assert_eq!(
            (
                blk.cpu_ns,
                blk.hypercalls,
                blk.grant_copies,
                blk.copied_bytes
            ),
            (8732318, 520, 2048, 8388608)
        );
        assert_eq!(blk.iotlb_invalidations, Some(0));
        let g = &s.domains["guest"];
        assert_eq!((g.cpu_ns, g.hypercalls, g.refused), (2194144, 355, 1));
        assert_eq!(g.iommu_maps, None);
    }

    #[test]
    fn a_direct_run() {
        assert_eq!(direct_summary(DIRECT_LOG), Some((512, 16384, 53301, 4, 32)));
        let s = sample(DIRECT_LOG).unwrap();
        assert_eq!(
            (s.what.as_str(), s.bytes, s.requests, s.ns, s.block, s.depth),
            ("blk-direct-read", 8388608, 512, 53_301_000, 16384, 4)
        );
        assert_eq!(s.domains["blk"].iotlb_invalidations, Some(5376));
    }

    #[test]
    fn a_write_run() {
        let log = SPLIT_LOG.replace("blk-seq-read", "blk-seq-write");
        let s = sample(&log).unwrap();
        assert_eq!(
            (s.what.as_str(), s.bytes, s.requests),
            ("blk-seq-write", 8388608, 256)
        );
    }

    #[test]
    fn a_guest_that_only_sends() {
        let log = SPLIT_LOG.replace("blk-seq-read", "tcp-tx");
        assert_eq!(sample(&log).unwrap().what, "tcp-tx");
        // With both, the receiver's measurement is the workload's.
        let both = log.replace(
            "EV {\"ev\":\"work_done\"",
            "EV {\"ev\":\"throughput\",\"what\":\"tcp-rx\",\"bytes\":5,\"requests\":1,\"ns\":9}\nEV {\"ev\":\"work_done\"",
        );
        let s = sample(&both).unwrap();
        assert_eq!((s.what.as_str(), s.bytes), ("tcp-rx", 5));
        let p = PeerSample {
            sent: 10,
            send_ns: 1,
            received: 4 << 20,
            recv_ns: 2,
            ..PeerSample::default()
        };
        assert_eq!(p.main_direction(), (4 << 20, 2));
        let p = PeerSample {
            sent: 4 << 20,
            send_ns: 3,
            ..PeerSample::default()
        };
        assert_eq!(p.main_direction(), (4 << 20, 3));
    }

    #[test]
    fn missing_pieces_are_named() {
        let e = sample("EV {\"ev\":\"ready\",\"tsc_khz\":1}\n").unwrap_err();
        assert!(e.contains("no workload measurement"), "{e}");
        let no_cpu: String = SPLIT_LOG
            .lines()
            .filter(|l| !l.contains("domain_cpu"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(sample(&no_cpu).unwrap_err().contains("domain_cpu"));
        // Garbage and half lines are skipped, not fatal.
        let noisy = format!("EV {{broken\nEV [1,2]\n{SPLIT_LOG}");
        assert!(sample(&noisy).is_ok());
    }
}
