//! Judging a console log: pure, so every rule is tested on fixtures.
//!
//! Every line that starts with `EV ` must be a JSON object that obeys its
//! event's schema in `abi::ev` (known name, every non-optional field present,
//! every field of its promised JSON kind, no field the schema lacks). Then
//! each expectation is counted over the valid events, each forbidden pattern
//! must match none, each ratio and equality between two events' fields must
//! hold, and QEMU's exit must be the one the scenario names.

use std::fmt::Write as _;

use abi::ev::{self, EventSchema, Kind};
use serde_json::{Map, Value};

use crate::qemu::Outcome;
use crate::scenario::{ExpectedExit, Pattern, Scenario, Selector};

/// One `EV` line that passed the schema.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// 1-based line number in the console log.
    pub line: usize,
    pub name: String,
    pub fields: Map<String, Value>,
}

/// What a scenario's run came to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    /// Valid events, in console order.
    pub events: Vec<Event>,
    /// One line per broken rule; empty means the scenario passed.
    pub failures: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Parses every `EV` line of `log`; schema violations go to `failures`.
pub fn parse_events(log: &str, failures: &mut Vec<String>) -> Vec<Event> {
    let mut events = Vec::new();
    for (i, raw) in log.lines().enumerate() {
        let line = raw.trim_end_matches('\r');
        let Some(json) = line.strip_prefix(ev::PREFIX) else {
            continue;
        };
        let n = i + 1;
        match check_event(json) {
            Ok((name, fields)) => events.push(Event {
                line: n,
                name,
                fields,
            }),
            Err(why) => failures.push(format!("console line {n}: {why}: {}", clip(line))),
        }
    }
    events
}

/// Checks one event's JSON against the schema.
pub fn check_event(json: &str) -> Result<(String, Map<String, Value>), String> {
    let value: Value =
        serde_json::from_str(json).map_err(|e| format!("unparsable EV line ({e})"))?;
    let Value::Object(fields) = value else {
        return Err("EV line is not a JSON object".into());
    };
    let name = match fields.get("ev") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("\"ev\" is not a string".into()),
        None => return Err("EV line has no \"ev\" field".into()),
    };
    let schema = ev::schema(&name).ok_or_else(|| format!("unknown event \"{name}\""))?;
    check_fields(schema, &fields)?;
    Ok((name, fields))
}

fn check_fields(schema: &EventSchema, fields: &Map<String, Value>) -> Result<(), String> {
    let name = schema.name;
    for f in schema.fields {
        let Some(v) = fields.get(f.name) else {
            if f.optional {
                continue;
            }
            return Err(format!("event \"{name}\" lacks field \"{}\"", f.name));
        };
        if !kind_matches(f.kind, v) {
            return Err(format!(
                "event \"{name}\" field \"{}\" should be {}, got {v}",
                f.name,
                kind_name(f.kind)
            ));
        }
        if f.kind == Kind::Code {
            let raw = format!("{}_raw", f.name);
            match fields.get(&raw) {
                Some(r) if kind_matches(Kind::Hex, r) => {}
                Some(r) => {
                    return Err(format!(
                        "event \"{name}\" field \"{raw}\" should be {}, got {r}",
                        kind_name(Kind::Hex)
                    ))
                }
                None => return Err(format!("event \"{name}\" lacks field \"{raw}\"")),
            }
        }
    }
    for (key, v) in fields {
        if key == "ev" {
            continue;
        }
        if key == "from" {
            if !v.is_string() {
                return Err(format!(
                    "event \"{name}\" field \"from\" should be a string"
                ));
            }
            continue;
        }
        if !is_schema_key(schema, key) {
            return Err(format!(
                "event \"{name}\" has field \"{key}\", which its schema lacks"
            ));
        }
    }
    Ok(())
}

/// Whether `key` may appear in an event of `schema` (besides `ev`, `from`).
pub fn is_schema_key(schema: &EventSchema, key: &str) -> bool {
    schema.fields.iter().any(|f| {
        f.name == key
            || (f.kind == Kind::Code && key.strip_suffix("_raw").is_some_and(|k| k == f.name))
    })
}

fn is_hex(s: &str) -> bool {
    s.strip_prefix("0x").is_some_and(|d| {
        !d.is_empty()
            && d.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn kind_matches(kind: Kind, v: &Value) -> bool {
    match kind {
        Kind::Str | Kind::Code => v.is_string(),
        Kind::Hex => v.as_str().is_some_and(is_hex),
        Kind::Int => v.is_i64() || v.is_u64(),
        Kind::Bool => v.is_boolean(),
        Kind::Array => v.is_array(),
        Kind::Object => v.is_object(),
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Str => "a string",
        Kind::Code => "a string (a code's name)",
        Kind::Hex => "a hex string \"0x...\" (lower-case)",
        Kind::Int => "an integer",
        Kind::Bool => "true or false",
        Kind::Array => "an array",
        Kind::Object => "an object",
    }
}

/// Whether an expected value matches an event's value (see [`Pattern`]).
pub fn value_matches(want: &Value, got: &Value) -> bool {
    match (want, got) {
        (Value::String(w), Value::String(g)) => {
            w == g || matches!((parse_hex(w), parse_hex(g)), (Some(a), Some(b)) if a == b)
        }
        (Value::Number(w), Value::Number(g)) => match (w.as_i128(), g.as_i128()) {
            (Some(a), Some(b)) => a == b,
            _ => w.as_f64() == g.as_f64(),
        },
        (Value::Object(w), Value::Object(g)) => object_matches(w, g),
        (Value::Array(w), Value::Array(g)) => {
            w.iter().all(|we| g.iter().any(|ge| value_matches(we, ge)))
        }
        (w, g) => w == g,
    }
}

fn parse_hex(s: &str) -> Option<u128> {
    let d = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    u128::from_str_radix(d, 16).ok()
}

fn object_matches(want: &Map<String, Value>, got: &Map<String, Value>) -> bool {
    want.iter()
        .all(|(k, w)| got.get(k).is_some_and(|g| value_matches(w, g)))
}

/// Whether `event` is one `pattern` describes.
pub fn pattern_matches(pattern: &Pattern, event: &Event) -> bool {
    event.name == pattern.ev && object_matches(&pattern.fields, &event.fields)
}

/// Judges one run: the console log and how QEMU ended.
pub fn check_log(scenario: &Scenario, log: &str, outcome: &Outcome) -> Verdict {
    let mut failures = Vec::new();
    let events = parse_events(log, &mut failures);

    for (i, e) in scenario.expect.iter().enumerate() {
        let seen: Vec<usize> = events
            .iter()
            .filter(|ev| pattern_matches(&e.pattern, ev))
            .map(|ev| ev.line)
            .collect();
        let ok = match e.count {
            Some(n) => seen.len() == n as usize,
            None => !seen.is_empty(),
        };
        if !ok {
            let want = match e.count {
                Some(n) => format!("exactly {n}"),
                None => "at least 1".to_owned(),
            };
            let mut msg = format!(
                "expect[{i}] ({}): seen {} times, expected {want}",
                e.pattern,
                seen.len()
            );
            if !seen.is_empty() {
                let _ = write!(msg, " (console lines {})", lines(&seen));
            } else if let Some(near) = events.iter().find(|ev| ev.name == e.pattern.ev) {
                let _ = write!(
                    msg,
                    "; the first \"{}\" event, line {}, was {}",
                    near.name,
                    near.line,
                    Value::Object(near.fields.clone())
                );
            }
            failures.push(msg);
        }
    }
    for (i, p) in scenario.forbid.iter().enumerate() {
        let seen: Vec<usize> = events
            .iter()
            .filter(|ev| pattern_matches(p, ev))
            .map(|ev| ev.line)
            .collect();
        if !seen.is_empty() {
            failures.push(format!(
                "forbid[{i}] ({p}): seen {} times (console lines {})",
                seen.len(),
                lines(&seen)
            ));
        }
    }
    for (i, r) in scenario.ratios.iter().enumerate() {
        if let Err(why) = check_ratio(&events, r) {
            failures.push(format!("ratio[{i}]: {why}"));
        }
    }
    for (i, e) in scenario.equals.iter().enumerate() {
        if e.any {
            if let Err(why) = check_equal_any(&events, e) {
                failures.push(format!("equal[{i}]: {why}"));
            }
            continue;
        }
        let (a, b) = match (select(&events, &e.a), select(&events, &e.b)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(why), _) | (_, Err(why)) => {
                failures.push(format!("equal[{i}]: {why}"));
                continue;
            }
        };
        if !value_matches(a, b) {
            failures.push(format!("equal[{i}]: {} = {a}, but {} = {b}", e.a, e.b));
        }
    }
    let exit_ok = match scenario.exit {
        ExpectedExit::Success => *outcome == Outcome::Exited(abi::exit::QEMU_SUCCESS),
        ExpectedExit::Failure => *outcome == Outcome::Exited(abi::exit::QEMU_FAILURE),
        ExpectedExit::Timeout => matches!(outcome, Outcome::TimedOut(_)),
    };
    if !exit_ok {
        failures.push(format!(
            "exit: expected {}, but {outcome}",
            scenario.exit.name()
        ));
    }
    Verdict { events, failures }
}

/// The value `sel` names: its field in the one event its pattern matches.
pub fn select<'e>(events: &'e [Event], sel: &Selector) -> Result<&'e Value, String> {
    let matching: Vec<&Event> = events
        .iter()
        .filter(|ev| pattern_matches(&sel.pattern, ev))
        .collect();
    let [one] = matching[..] else {
        let at: Vec<usize> = matching.iter().map(|e| e.line).collect();
        let mut msg = format!("{sel}: {} events match, expected exactly 1", matching.len());
        if !at.is_empty() {
            let _ = write!(msg, " (console lines {})", lines(&at));
        }
        return Err(msg);
    };
    one.fields.get(&sel.field).ok_or_else(|| {
        format!(
            "{sel}: the event on console line {} has no field \"{}\"",
            one.line, sel.field
        )
    })
}

/// An `[[test.equal]]` with `any`: some event `a` matches has the value
/// `b` selects.
pub fn check_equal_any(events: &[Event], e: &crate::Equal) -> Result<(), String> {
    let want = select(events, &e.b)?;
    let candidates: Vec<&Event> = events
        .iter()
        .filter(|ev| pattern_matches(&e.a.pattern, ev))
        .collect();
    if candidates.is_empty() {
        return Err(format!("{}: no event matches", e.a));
    }
    if candidates.iter().any(|ev| {
        ev.fields
            .get(&e.a.field)
            .is_some_and(|v| value_matches(v, want))
    }) {
        return Ok(());
    }
    let seen: Vec<String> = candidates
        .iter()
        .map(|ev| {
            ev.fields
                .get(&e.a.field)
                .map_or_else(|| "(none)".to_owned(), Value::to_string)
        })
        .collect();
    Err(format!(
        "none of the {} events {} (values {}) equals {} = {want}",
        candidates.len(),
        e.a,
        seen.join(", "),
        e.b
    ))
}

fn number(sel: &Selector, v: &Value) -> Result<f64, String> {
    v.as_f64()
        .ok_or_else(|| format!("{sel} = {v}, which is not a number"))
}

/// Checks one `[[test.ratio]]`; the error says both values and the ratio.
pub fn check_ratio(events: &[Event], r: &crate::scenario::Ratio) -> Result<(), String> {
    let n = number(&r.num, select(events, &r.num)?)?;
    let d = number(&r.den, select(events, &r.den)?)?;
    let (lo, hi) = (
        r.expect * (1.0 - r.tolerance),
        r.expect * (1.0 + r.tolerance),
    );
    let want = format!(
        "expected {} within {}% ({lo:.3}..={hi:.3})",
        r.expect,
        r.tolerance * 100.0
    );
    if d == 0.0 {
        return Err(format!(
            "{} / {} = {n} / 0: the denominator is 0; {want}",
            r.num, r.den
        ));
    }
    let ratio = n / d;
    if ratio < lo || ratio > hi || ratio.is_nan() {
        return Err(format!(
            "{} / {} = {n} / {d} = {ratio:.3}; {want}",
            r.num, r.den
        ));
    }
    Ok(())
}

fn lines(seen: &[usize]) -> String {
    let shown: Vec<String> = seen.iter().take(8).map(|n| n.to_string()).collect();
    let more = if seen.len() > 8 { ", ..." } else { "" };
    format!("{}{more}", shown.join(", "))
}

fn clip(line: &str) -> String {
    const MAX: usize = 200;
    match line.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &line[..at]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Expect;
    use serde_json::json;
    use std::time::Duration;

    const BOOT_LOG: &str = concat!(
        "airlock: booting\r\n",
        "EV {\"ev\":\"memory\",\"ram_bytes\":268435456,\"free_bytes\":200000000,\"reserved_bytes\":1000,\"regions\":3}\n",
        "EV {\"ev\":\"bundle_entry\",\"index\":0,\"kind\":\"manifest\",\"name\":\"manifest\",\"size\":88,\"crc32\":\"0x1234abcd\"}\n",
        "EV {\"ev\":\"pci\",\"bdf\":\"00:03.0\",\"vendor\":\"0x1af4\",\"device\":\"0x1042\",\"class\":\"0x010000\",\"class_name\":\"mass-storage\",\"header_type\":0,\"bars\":[{\"index\":1,\"kind\":\"mem32\",\"addr\":\"0xfebd1000\",\"size\":\"0x1000\",\"prefetchable\":false}],\"iommu_unit\":0}\r\n",
        "EV {\"ev\":\"pci\",\"bdf\":\"00:04.0\",\"vendor\":\"0x1af4\",\"device\":\"0x1041\",\"class\":\"0x020000\",\"class_name\":\"network\",\"header_type\":0,\"bars\":[]}\n",
        "some human text\n",
        "EV {\"ev\":\"iommu_unit\",\"unit\":0,\"kind\":\"vt-d\",\"base\":\"0xfed90000\",\"ver\":\"0x10\",\"scopes\":[{\"kind\":\"pci-endpoint\",\"kind_raw\":\"0x1\",\"bdf\":\"00:03.0\",\"enumeration_id\":0}]}\n",
        "EV {\"ev\":\"ready\",\"t_ms\":212,\"tsc_khz\":2000000}\n",
        "EV {\"ev\":\"shutdown\",\"status\":0,\"reason\":\"manifest says after-ready\"}\n",
    );

    fn pat(ev: &str, fields: Value) -> Pattern {
        let Value::Object(fields) = fields else {
            panic!("fixture")
        };
        Pattern {
            ev: ev.into(),
            fields,
        }
    }

    fn boot() -> Scenario {
        Scenario {
            name: "boot".into(),
            timeout: Duration::from_secs(60),
            exit: ExpectedExit::Success,
            corrupt: None,
            expect: vec![
                Expect {
                    pattern: pat("memory", json!({})),
                    count: None,
                },
                Expect {
                    pattern: pat("bundle_entry", json!({"kind": "manifest"})),
                    count: Some(1),
                },
                Expect {
                    pattern: pat(
                        "pci",
                        json!({"bdf": "00:03.0", "vendor": "0x1af4", "device": "0x1042"}),
                    ),
                    count: None,
                },
                Expect {
                    pattern: pat("pci", json!({"bdf": "00:04.0", "device": "0x1041"})),
                    count: None,
                },
                Expect {
                    pattern: pat("iommu_unit", json!({"kind": "vt-d", "base": "0xfed90000"})),
                    count: Some(1),
                },
                Expect {
                    pattern: pat("ready", json!({})),
                    count: Some(1),
                },
                Expect {
                    pattern: pat("shutdown", json!({"status": 0})),
                    count: None,
                },
            ],
            forbid: vec![pat("panic", json!({})), pat("exception", json!({}))],
            ratios: Vec::new(),
            equals: Vec::new(),
            peer: None,
            disk: None,
            tcp: None,
        }
    }

    const OK: Outcome = Outcome::Exited(abi::exit::QEMU_SUCCESS);

    #[test]
    fn a_good_boot_passes() {
        let v = check_log(&boot(), BOOT_LOG, &OK);
        assert_eq!(v.failures, Vec::<String>::new());
        assert_eq!(v.events.len(), 7);
        assert_eq!(v.events[2].line, 4);
    }

    #[test]
    fn an_expected_event_that_never_comes_fails() {
        let log: String = BOOT_LOG
            .lines()
            .filter(|l| !l.contains("\"ready\""))
            .collect::<Vec<_>>()
            .join("\n");
        let v = check_log(&boot(), &log, &OK);
        assert!(!v.passed());
        assert_eq!(
            v.failures,
            ["expect[5] (ev \"ready\"): seen 0 times, expected exactly 1"]
        );
        // Without a count, "at least once" fails the same way.
        let mut s = boot();
        s.expect[5].count = None;
        let v = check_log(&s, &log, &OK);
        assert_eq!(
            v.failures,
            ["expect[5] (ev \"ready\"): seen 0 times, expected at least 1"]
        );
        // And an empty console fails every expectation.
        let v = check_log(&boot(), "", &OK);
        assert_eq!(v.failures.len(), 7);
    }

    #[test]
    fn field_values_must_match() {
        let mut s = boot();
        s.expect[2]
            .pattern
            .fields
            .insert("device".into(), json!("0x1043"));
        let v = check_log(&s, BOOT_LOG, &OK);
        assert_eq!(v.failures.len(), 1);
        assert!(
            v.failures[0].starts_with("expect[2] (ev \"pci\" with "),
            "{}",
            v.failures[0]
        );
        assert!(
            v.failures[0].contains("the first \"pci\" event, line 4"),
            "{}",
            v.failures[0]
        );
    }

    #[test]
    fn counts_are_exact() {
        let mut s = boot();
        s.expect[0] = Expect {
            pattern: pat("pci", json!({"vendor": "0x1af4"})),
            count: Some(1),
        };
        let v = check_log(&s, BOOT_LOG, &OK);
        assert_eq!(
            v.failures,
            [
                "expect[0] (ev \"pci\" with {\"vendor\":\"0x1af4\"}): seen 2 times, expected exactly 1 (console lines 4, 5)"
            ]
        );
        s.expect[0].count = Some(2);
        assert!(check_log(&s, BOOT_LOG, &OK).passed());
        s.expect[0].count = Some(0);
        assert!(!check_log(&s, BOOT_LOG, &OK).passed());
    }

    #[test]
    fn a_forbidden_event_fails() {
        let mut s = boot();
        s.forbid.push(pat("ready", json!({})));
        let v = check_log(&s, BOOT_LOG, &OK);
        assert_eq!(
            v.failures,
            ["forbid[2] (ev \"ready\"): seen 1 times (console lines 8)"]
        );
        // A forbidden pattern with fields only catches matching events.
        let mut s = boot();
        s.forbid.push(pat("pci", json!({"bdf": "00:05.0"})));
        assert!(check_log(&s, BOOT_LOG, &OK).passed());
    }

    #[test]
    fn the_exit_status_must_match() {
        let v = check_log(&boot(), BOOT_LOG, &Outcome::Exited(abi::exit::QEMU_FAILURE));
        assert_eq!(v.failures.len(), 1);
        assert!(v.failures[0].starts_with("exit: expected success, but QEMU exited with status 35"));
        let v = check_log(
            &boot(),
            BOOT_LOG,
            &Outcome::TimedOut(Duration::from_secs(60)),
        );
        assert!(v.failures[0].contains("timed out"), "{}", v.failures[0]);
        let mut s = boot();
        s.exit = ExpectedExit::Failure;
        assert!(!check_log(&s, BOOT_LOG, &Outcome::Exited(1)).passed());
        assert!(!check_log(&s, BOOT_LOG, &Outcome::TimedOut(Duration::from_secs(1))).passed());
        assert!(check_log(&s, BOOT_LOG, &Outcome::Exited(abi::exit::QEMU_FAILURE)).passed());
        s.exit = ExpectedExit::Timeout;
        assert!(check_log(&s, BOOT_LOG, &Outcome::TimedOut(Duration::from_secs(1))).passed());
    }

    fn schema_failure(line: &str) -> String {
        let log = format!("{BOOT_LOG}{line}\n");
        let v = check_log(&boot(), &log, &OK);
        assert_eq!(v.failures.len(), 1, "{:?}", v.failures);
        assert!(
            v.failures[0].starts_with("console line 10: "),
            "{}",
            v.failures[0]
        );
        v.failures[0].clone()
    }

    #[test]
    fn schema_violations_fail_naming_the_line() {
        let f = schema_failure("EV {\"ev\":\"ready\",\"t_ms\":1");
        assert!(f.contains("unparsable EV line"), "{f}");
        let f = schema_failure("EV [1,2]");
        assert!(f.contains("not a JSON object"), "{f}");
        let f = schema_failure("EV {\"t_ms\":1}");
        assert!(f.contains("no \"ev\" field"), "{f}");
        let f = schema_failure("EV {\"ev\":\"reddy\",\"t_ms\":1}");
        assert!(f.contains("unknown event \"reddy\""), "{f}");
        let f = schema_failure("EV {\"ev\":\"ready\",\"t_ms\":1}");
        assert!(f.contains("event \"ready\" lacks field \"tsc_khz\""), "{f}");
        let f = schema_failure("EV {\"ev\":\"ready\",\"t_ms\":\"1\",\"tsc_khz\":1}");
        assert!(
            f.contains("field \"t_ms\" should be an integer, got \"1\""),
            "{f}"
        );
        let f = schema_failure("EV {\"ev\":\"ready\",\"t_ms\":1,\"tsc_khz\":1,\"extra\":2}");
        assert!(
            f.contains("has field \"extra\", which its schema lacks"),
            "{f}"
        );
        let f = schema_failure(
            "EV {\"ev\":\"bundle_entry\",\"index\":0,\"kind\":\"manifest\",\"name\":\"manifest\",\"size\":88,\"crc32\":305441741}",
        );
        assert!(f.contains("field \"crc32\" should be a hex string"), "{f}");
        let f = schema_failure(
            "EV {\"ev\":\"bundle_entry\",\"index\":0,\"kind\":\"manifest\",\"name\":\"manifest\",\"size\":88,\"crc32\":\"0x12AB\"}",
        );
        assert!(f.contains("field \"crc32\" should be a hex string"), "{f}");
        // A code needs its name and its raw value.
        let f = schema_failure(
            "EV {\"ev\":\"exception\",\"vector\":\"page-fault\",\"error_code\":\"0x2\",\"rip\":\"0x1\",\"cr2\":\"0x0\"}",
        );
        assert!(f.contains("lacks field \"vector_raw\""), "{f}");
        let f = schema_failure(
            "EV {\"ev\":\"exception\",\"vector\":14,\"vector_raw\":\"0xe\",\"error_code\":\"0x2\",\"rip\":\"0x1\",\"cr2\":\"0x0\"}",
        );
        assert!(f.contains("field \"vector\" should be a string"), "{f}");
        let f = schema_failure(
            "EV {\"ev\":\"exception\",\"vector\":\"page-fault\",\"vector_raw\":14,\"error_code\":\"0x2\",\"rip\":\"0x1\",\"cr2\":\"0x0\"}",
        );
        assert!(
            f.contains("field \"vector_raw\" should be a hex string"),
            "{f}"
        );
        // Optional fields may be left out; `from` is allowed on any event.
        let log = format!(
            "{BOOT_LOG}EV {{\"ev\":\"exception\",\"vector\":\"page-fault\",\"vector_raw\":\"0xe\",\"error_code\":\"0x2\",\"rip\":\"0x1\",\"cr2\":\"0x0\",\"from\":\"blk\"}}\n"
        );
        let mut s = boot();
        s.forbid.clear();
        assert_eq!(check_log(&s, &log, &OK).failures, Vec::<String>::new());
    }

    const DOMAINS_LOG: &str = concat!(
        "EV {\"ev\":\"domain_cpu\",\"domain\":\"heavy\",\"weight\":2,\"cpu_ns\":1000000000,\"dispatches\":50}\n",
        "EV {\"ev\":\"domain_cpu\",\"domain\":\"light\",\"weight\":1,\"cpu_ns\":520000000,\"dispatches\":40}\n",
        "EV {\"ev\":\"hypercalls\",\"domain\":\"hostile\",\"calls\":70,\"refused\":41}\n",
        "EV {\"ev\":\"hypercalls\",\"domain\":\"idle\",\"calls\":3,\"refused\":0}\n",
        "EV {\"ev\":\"hypercall_table\",\"cases\":60,\"expected_refusals\":41,\"mismatches\":0,\"from\":\"hostile\"}\n",
    );

    fn sel(ev: &str, fields: Value, field: &str) -> Selector {
        Selector {
            pattern: pat(ev, fields),
            field: field.into(),
        }
    }

    fn scenario_with(ratios: Vec<crate::scenario::Ratio>, equals: Vec<crate::Equal>) -> Scenario {
        Scenario {
            name: "x".into(),
            timeout: Duration::from_secs(1),
            exit: ExpectedExit::Success,
            corrupt: None,
            expect: Vec::new(),
            forbid: Vec::new(),
            ratios,
            equals,
            peer: None,
            disk: None,
            tcp: None,
        }
    }

    fn cpu_ratio(expect: f64, tolerance: f64) -> crate::scenario::Ratio {
        crate::scenario::Ratio {
            num: sel("domain_cpu", json!({"domain": "heavy"}), "cpu_ns"),
            den: sel("domain_cpu", json!({"domain": "light"}), "cpu_ns"),
            expect,
            tolerance,
        }
    }

    #[test]
    fn ratios_hold_within_their_tolerance() {
        // 1e9 / 5.2e8 = 1.923: inside 2.0 +- 10 %, outside 2.0 +- 3 %.
        let s = scenario_with(vec![cpu_ratio(2.0, 0.10)], Vec::new());
        assert_eq!(
            check_log(&s, DOMAINS_LOG, &OK).failures,
            Vec::<String>::new()
        );
        let s = scenario_with(vec![cpu_ratio(2.0, 0.03)], Vec::new());
        assert_eq!(
            check_log(&s, DOMAINS_LOG, &OK).failures,
            ["ratio[0]: domain_cpu{\"domain\":\"heavy\"}.cpu_ns / domain_cpu{\"domain\":\"light\"}.cpu_ns \
              = 1000000000 / 520000000 = 1.923; expected 2 within 3% (1.940..=2.060)"]
        );
        // Too high fails as well as too low.
        let s = scenario_with(vec![cpu_ratio(1.5, 0.10)], Vec::new());
        assert!(check_log(&s, DOMAINS_LOG, &OK).failures[0].contains("= 1.923; expected 1.5"));
    }

    #[test]
    fn a_ratio_needs_one_numeric_event_on_each_side() {
        let mut r = cpu_ratio(2.0, 0.1);
        r.den = sel("domain_cpu", json!({}), "cpu_ns");
        let f = check_log(&scenario_with(vec![r], Vec::new()), DOMAINS_LOG, &OK).failures;
        assert_eq!(
            f,
            ["ratio[0]: domain_cpu{}.cpu_ns: 2 events match, expected exactly 1 (console lines 1, 2)"]
        );
        let mut r = cpu_ratio(2.0, 0.1);
        r.num = sel("domain_cpu", json!({"domain": "nobody"}), "cpu_ns");
        let f = check_log(&scenario_with(vec![r], Vec::new()), DOMAINS_LOG, &OK).failures;
        assert_eq!(
            f,
            ["ratio[0]: domain_cpu{\"domain\":\"nobody\"}.cpu_ns: 0 events match, expected exactly 1"]
        );
        let mut r = cpu_ratio(2.0, 0.1);
        r.num.field = "domain".into();
        let f = check_log(&scenario_with(vec![r], Vec::new()), DOMAINS_LOG, &OK).failures;
        assert!(
            f[0].contains(".domain = \"heavy\", which is not a number"),
            "{f:?}"
        );
        let mut r = cpu_ratio(2.0, 0.1);
        r.den.field = "nothing".into();
        let f = check_log(&scenario_with(vec![r], Vec::new()), DOMAINS_LOG, &OK).failures;
        assert!(
            f[0].contains("console line 2 has no field \"nothing\""),
            "{f:?}"
        );
        let log = DOMAINS_LOG.replace("\"cpu_ns\":520000000", "\"cpu_ns\":0");
        let f = check_log(
            &scenario_with(vec![cpu_ratio(2.0, 0.1)], Vec::new()),
            &log,
            &OK,
        )
        .failures;
        assert!(f[0].contains("the denominator is 0"), "{f:?}");
    }

    #[test]
    fn equal_values_name_both_sides() {
        let refused = || crate::Equal {
            a: sel("hypercalls", json!({"domain": "hostile"}), "refused"),
            b: sel(
                "hypercall_table",
                json!({"from": "hostile"}),
                "expected_refusals",
            ),
            any: false,
        };
        let s = scenario_with(Vec::new(), vec![refused()]);
        assert_eq!(
            check_log(&s, DOMAINS_LOG, &OK).failures,
            Vec::<String>::new()
        );
        let log = DOMAINS_LOG.replace("\"refused\":41", "\"refused\":42");
        assert_eq!(
            check_log(&s, &log, &OK).failures,
            [
                "equal[0]: hypercalls{\"domain\":\"hostile\"}.refused = 42, \
              but hypercall_table{\"from\":\"hostile\"}.expected_refusals = 41"
            ]
        );
        let mut e = refused();
        e.a.pattern.fields.clear();
        let f = check_log(&scenario_with(Vec::new(), vec![e]), DOMAINS_LOG, &OK).failures;
        assert_eq!(
            f,
            ["equal[0]: hypercalls{}.refused: 2 events match, expected exactly 1 (console lines 3, 4)"]
        );
    }

    const DMA_LOG: &str = concat!(
        "EV {\"ev\":\"domain_start\",\"domain\":\"bystander\",\"domid\":2,\"label\":\"l\",\"image\":\"testdom\",\"mem_bytes\":4194304,\"mem_phys\":\"0x02a00000\",\"weight\":1}\n",
        "EV {\"ev\":\"iommu_fault\",\"unit\":0,\"source\":\"00:05.0\",\"addr\":\"0x0000000000100000\",\"reason\":\"not-present\",\"reason_raw\":\"0x6\",\"access\":\"write\",\"domain\":\"attacker\",\"record_lo\":\"0x100000\",\"record_hi\":\"0x1\"}\n",
        "EV {\"ev\":\"iommu_fault\",\"unit\":0,\"source\":\"00:05.0\",\"addr\":\"0x0000000002a00000\",\"reason\":\"not-present\",\"reason_raw\":\"0x6\",\"access\":\"write\",\"domain\":\"attacker\",\"record_lo\":\"0x2a00000\",\"record_hi\":\"0x1\"}\n",
    );

    #[test]
    fn an_any_equality_finds_one_of_several() {
        let peer = || crate::Equal {
            a: sel("iommu_fault", json!({"source": "00:05.0"}), "addr"),
            b: sel("domain_start", json!({"domain": "bystander"}), "mem_phys"),
            any: true,
        };
        let s = scenario_with(Vec::new(), vec![peer()]);
        assert_eq!(check_log(&s, DMA_LOG, &OK).failures, Vec::<String>::new());
        // Without `any`, two faults match and that is an error.
        let mut e = peer();
        e.any = false;
        let f = check_log(&scenario_with(Vec::new(), vec![e]), DMA_LOG, &OK).failures;
        assert!(f[0].contains("2 events match, expected exactly 1"), "{f:?}");
        // No fault at the bystander's address.
        let log = DMA_LOG.replace("0x0000000002a00000", "0x0000000002b00000");
        let f = check_log(&s, &log, &OK).failures;
        assert_eq!(
            f,
            [
                "equal[0]: none of the 2 events iommu_fault{\"source\":\"00:05.0\"}.addr \
              (values \"0x0000000000100000\", \"0x0000000002b00000\") equals \
              domain_start{\"domain\":\"bystander\"}.mem_phys = \"0x02a00000\""
            ]
        );
        let mut e = peer();
        e.a.pattern.fields.insert("source".into(), json!("00:06.0"));
        let f = check_log(&scenario_with(Vec::new(), vec![e]), DMA_LOG, &OK).failures;
        assert_eq!(
            f,
            ["equal[0]: iommu_fault{\"source\":\"00:06.0\"}.addr: no event matches"]
        );
    }

    #[test]
    fn lines_that_merely_mention_ev_are_not_events() {
        let log = format!("{BOOT_LOG}xEV {{broken\n  EV {{broken\nEVENT\n");
        assert!(check_log(&boot(), &log, &OK).passed());
    }

    #[test]
    fn value_matching_rules() {
        assert!(value_matches(
            &json!("0xfed90000"),
            &json!("0x00000000fed90000")
        ));
        assert!(value_matches(&json!("0x1AF4"), &json!("0x1af4")));
        assert!(!value_matches(&json!("0x1af4"), &json!("0x1af5")));
        assert!(!value_matches(&json!("00:03.0"), &json!("00:03.1")));
        assert!(value_matches(&json!(0), &json!(0)));
        assert!(!value_matches(&json!(0), &json!("0")));
        assert!(value_matches(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(!value_matches(
            &json!({"a": 1, "c": 3}),
            &json!({"a": 1, "b": 2})
        ));
        assert!(value_matches(
            &json!([{"bdf": "00:03.0"}]),
            &json!([{"bdf": "00:04.0"}, {"bdf": "00:03.0", "x": 1}])
        ));
        assert!(!value_matches(
            &json!([{"bdf": "00:05.0"}]),
            &json!([{"bdf": "00:04.0"}])
        ));
    }

    #[test]
    fn nested_patterns_reach_into_arrays() {
        let mut s = boot();
        s.expect.push(Expect {
            pattern: pat(
                "iommu_unit",
                json!({"scopes": [{"bdf": "00:03.0", "kind": "pci-endpoint"}]}),
            ),
            count: Some(1),
        });
        assert!(check_log(&s, BOOT_LOG, &OK).passed());
    }
}
