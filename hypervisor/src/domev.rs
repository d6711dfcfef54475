//! Checking an event a domain asks the hypervisor to print (the `event`
//! hypercall).
//!
//! The domain passes the bytes of one JSON object; the hypervisor prints
//! them as `EV {...,"from":"NAME"}`, so what it accepts must be one
//! well-formed JSON object on one line that tests and tools can trust to
//! follow the schema in `abi::ev`. [`validate`] accepts exactly:
//!
//! - UTF-8 with no raw control character anywhere (C0, DEL, C1): the
//!   object cannot break the console line or the terminal;
//! - one JSON object that starts at the first byte and ends at the last
//!   (no whitespace around it; spaces between tokens are fine), so the
//!   hypervisor can print `bytes[..len - 1]` followed by
//!   `,"from":"NAME"}`;
//! - JSON syntax: strings with the escapes JSON defines (`\uXXXX` surrogates
//!   in pairs), numbers, `true`/`false`/`null`, arrays and objects nested at
//!   most [`MAX_DEPTH`] deep (the event object itself is depth 1), keys
//!   unique within each object, at most [`MAX_KEYS`] keys in the open
//!   objects at once;
//! - a first key `"ev"` whose value names an event of `abi::ev`, and every
//!   other key one of that event's fields (or `NAME_raw` beside a
//!   [`Kind::Code`] field `NAME`) with a value of the field's kind; every
//!   field that is not optional present; no `"from"`.
//!
//! Keys and names are compared after their escapes are decoded, so
//! `"fr\u006fm"` is `"from"`.
//!
//! Errors follow `abi::hypercall` ("Which error, when"): anything
//! malformed or outside the schema is [`Error::Invalid`]; a well-formed
//! object naming an event only ring 0 may print is [`Error::Denied`],
//! whatever its fields. The syntax is checked first, then the name, then
//! the fields. Nothing recurses and nothing allocates.

use abi::ev::{self, EventSchema, Kind};
use abi::hypercall::{Error, EVENT_MAX};

/// The deepest nesting accepted; the event object itself is depth 1.
pub const MAX_DEPTH: usize = 4;
/// The most keys the objects open at one time may hold together.
pub const MAX_KEYS: usize = 64;
/// The most hex digits after `0x` in a [`Kind::Hex`] value (a `u64`).
const MAX_HEX_DIGITS: usize = 16;

/// Bits in the set of fields seen: two per field (the value, `NAME_raw`).
const SEEN_BITS: usize = 256;

const fn most_fields() -> usize {
    let mut most = 0;
    let mut i = 0;
    while i < ev::ALL.len() {
        if ev::ALL[i].fields.len() > most {
            most = ev::ALL[i].fields.len();
        }
        i += 1;
    }
    most
}
const _: () = assert!(2 * most_fields() <= SEEN_BITS);

/// Checks `bytes` as an event a domain may print and returns its schema.
pub fn validate(bytes: &[u8]) -> Result<&'static EventSchema, Error> {
    check_in(bytes, ev::ALL)
}

/// [`validate`] against the events `schemas`.
fn check_in(bytes: &[u8], schemas: &[&'static EventSchema]) -> Result<&'static EventSchema, Error> {
    if bytes.is_empty() || bytes.len() as u64 > EVENT_MAX {
        return Err(Error::Invalid);
    }
    let text = core::str::from_utf8(bytes).map_err(|_| Error::Invalid)?;
    if text.chars().any(is_control) {
        return Err(Error::Invalid);
    }
    let mut lx = Lexer { s: text, i: 0 };
    check_syntax(&mut lx)?;
    if lx.i != bytes.len() {
        return Err(Error::Invalid);
    }
    check_schema(&mut Lexer { s: text, i: 0 }, schemas)
}

/// C0 controls (which include tab, CR and LF), DEL and C1 controls.
fn is_control(c: char) -> bool {
    c < ' ' || ('\u{7f}'..='\u{9f}').contains(&c)
}

/// Byte offsets of a token (for a string: its contents, without quotes).
#[derive(Clone, Copy, Debug, Default)]
struct Span {
    start: usize,
    end: usize,
}

/// A value, as far as the schema cares.
#[derive(Clone, Copy, Debug)]
enum Value {
    Str(Span),
    Num(Span),
    Bool,
    Null,
    Array,
    Object,
}

/// A cursor over text already known to be UTF-8 without controls.
struct Lexer<'a> {
    s: &'a str,
    i: usize,
}

const BAD: Error = Error::Invalid;

impl<'a> Lexer<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Result<(), Error> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(BAD)
        }
    }

    /// JSON allows tab, CR and LF too, but they are controls: refused
    /// before the lexer runs.
    fn spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.i += 1;
        }
    }

    fn text(&self, span: Span) -> &'a str {
        self.s.get(span.start..span.end).unwrap_or_default()
    }

    /// A string token; returns its contents.
    fn string(&mut self) -> Result<Span, Error> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            match self.peek().ok_or(BAD)? {
                b'"' => {
                    let end = self.i;
                    self.i += 1;
                    return Ok(Span { start, end });
                }
                b'\\' => {
                    self.i += 1;
                    match self.peek().ok_or(BAD)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                        b'u' => {
                            self.i += 1;
                            let unit = self.hex4()?;
                            if (0xd800..0xdc00).contains(&unit) {
                                self.eat(b'\\')?;
                                self.eat(b'u')?;
                                if !(0xdc00..0xe000).contains(&self.hex4()?) {
                                    return Err(BAD);
                                }
                            } else if (0xdc00..0xe000).contains(&unit) {
                                return Err(BAD);
                            }
                        }
                        _ => return Err(BAD),
                    }
                }
                c if c < 0x20 => return Err(BAD),
                _ => self.i += 1,
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, Error> {
        let digits = self.s.get(self.i..self.i + 4).ok_or(BAD)?;
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BAD);
        }
        self.i += 4;
        u32::from_str_radix(digits, 16).map_err(|_| BAD)
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
        self.i - start
    }

    /// A number token: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number(&mut self) -> Result<Span, Error> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(BAD),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(BAD);
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(BAD);
            }
        }
        Ok(Span { start, end: self.i })
    }

    fn literal(&mut self, word: &str) -> Result<(), Error> {
        if self.s.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(BAD)
        }
    }

    /// A string, number or literal.
    fn scalar(&mut self) -> Result<Value, Error> {
        match self.peek().ok_or(BAD)? {
            b'"' => self.string().map(Value::Str),
            b'-' | b'0'..=b'9' => self.number().map(Value::Num),
            b't' => self.literal("true").map(|_| Value::Bool),
            b'f' => self.literal("false").map(|_| Value::Bool),
            b'n' => self.literal("null").map(|_| Value::Null),
            _ => Err(BAD),
        }
    }

    /// Any value of a document whose syntax was checked: containers are
    /// skipped by counting brackets outside strings.
    fn value(&mut self) -> Result<Value, Error> {
        let v = match self.peek().ok_or(BAD)? {
            b'[' => Value::Array,
            b'{' => Value::Object,
            _ => return self.scalar(),
        };
        let mut depth = 0usize;
        loop {
            match self.peek().ok_or(BAD)? {
                b'"' => {
                    self.string()?;
                }
                b'[' | b'{' => {
                    depth += 1;
                    self.i += 1;
                }
                b']' | b'}' => {
                    depth = depth.checked_sub(1).ok_or(BAD)?;
                    self.i += 1;
                    if depth == 0 {
                        return Ok(v);
                    }
                }
                _ => self.i += 1,
            }
        }
    }

    /// Whether string contents `span` decode to the concatenation of
    /// `parts`.
    fn is(&self, span: Span, parts: &[&str]) -> bool {
        Unescape(self.text(span).chars()).eq(parts.iter().flat_map(|p| p.chars()))
    }

    /// Whether two string contents decode to the same text.
    fn same(&self, a: Span, b: Span) -> bool {
        Unescape(self.text(a).chars()).eq(Unescape(self.text(b).chars()))
    }
}

/// The characters a JSON string's contents stand for. Given contents the
/// lexer accepted it cannot fail; on anything else it stops early with a
/// replacement character, so a comparison fails rather than panics.
struct Unescape<'a>(core::str::Chars<'a>);

impl Unescape<'_> {
    fn hex4(&mut self) -> Option<u32> {
        let mut v = 0;
        for _ in 0..4 {
            v = v * 16 + self.0.next()?.to_digit(16)?;
        }
        Some(v)
    }

    fn escape(&mut self) -> Option<char> {
        Some(match self.0.next()? {
            'b' => '\u{8}',
            'f' => '\u{c}',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'u' => {
                let unit = self.hex4()?;
                if (0xd800..0xdc00).contains(&unit) {
                    self.0.next()?; // '\'
                    self.0.next()?; // 'u'
                    let low = self.hex4()?.checked_sub(0xdc00)?;
                    char::from_u32(0x10000 + ((unit - 0xd800) << 10) + low)?
                } else {
                    char::from_u32(unit)?
                }
            }
            c => c, // '"', '\\', '/'
        })
    }
}

impl Iterator for Unescape<'_> {
    type Item = char;

    fn next(&mut self) -> Option<char> {
        match self.0.next()? {
            '\\' => match self.escape() {
                Some(c) => Some(c),
                None => {
                    // Stop after this one.
                    self.0 = "".chars();
                    Some(char::REPLACEMENT_CHARACTER)
                }
            },
            c => Some(c),
        }
    }
}

/// An open array or object during the syntax check.
#[derive(Clone, Copy, Default)]
struct Frame {
    object: bool,
    /// Where this object's keys start in the key list.
    keys_from: usize,
}

impl Frame {
    fn closer(self) -> u8 {
        if self.object {
            b'}'
        } else {
            b']'
        }
    }
}

/// Checks that the text is one JSON object within the bounds above; leaves
/// the lexer after its closing brace.
fn check_syntax(lx: &mut Lexer<'_>) -> Result<(), Error> {
    let mut stack = [Frame::default(); MAX_DEPTH];
    let mut keys = [Span::default(); MAX_KEYS];
    let mut nkeys = 0;
    lx.eat(b'{')?;
    stack[0] = Frame {
        object: true,
        keys_from: 0,
    };
    let mut depth = 1;
    // Just after `[` or `{`: the container may close at once.
    let mut first = true;
    loop {
        // Here an element of the innermost container is due.
        lx.spaces();
        let top = stack[depth - 1];
        if first && lx.peek() == Some(top.closer()) {
            lx.i += 1;
            depth -= 1;
            nkeys = top.keys_from;
        } else {
            if top.object {
                let key = lx.string()?;
                let earlier = keys.get(top.keys_from..nkeys).ok_or(BAD)?;
                if earlier.iter().any(|&k| lx.same(k, key)) {
                    return Err(BAD);
                }
                *keys.get_mut(nkeys).ok_or(BAD)? = key;
                nkeys += 1;
                lx.spaces();
                lx.eat(b':')?;
                lx.spaces();
            }
            if let Some(c @ (b'[' | b'{')) = lx.peek() {
                let frame = stack.get_mut(depth).ok_or(BAD)?;
                *frame = Frame {
                    object: c == b'{',
                    keys_from: nkeys,
                };
                lx.i += 1;
                depth += 1;
                first = true;
                continue;
            }
            lx.scalar()?;
        }
        // After a value: a comma, or closers until one.
        loop {
            if depth == 0 {
                return Ok(());
            }
            lx.spaces();
            let top = stack[depth - 1];
            match lx.peek() {
                Some(b',') => {
                    lx.i += 1;
                    first = false;
                    break;
                }
                Some(c) if c == top.closer() => {
                    lx.i += 1;
                    depth -= 1;
                    nkeys = top.keys_from;
                }
                _ => return Err(BAD),
            }
        }
    }
}

/// Checks the (syntactically valid) object against the schema.
fn check_schema(
    lx: &mut Lexer<'_>,
    schemas: &[&'static EventSchema],
) -> Result<&'static EventSchema, Error> {
    lx.eat(b'{')?;
    lx.spaces();
    let key = lx.string()?;
    if !lx.is(key, &["ev"]) {
        return Err(BAD);
    }
    lx.spaces();
    lx.eat(b':')?;
    lx.spaces();
    let Value::Str(name) = lx.value()? else {
        return Err(BAD);
    };
    let schema = schemas
        .iter()
        .copied()
        .find(|s| lx.is(name, &[s.name]))
        .ok_or(BAD)?;
    if schema.ring0 {
        return Err(Error::Denied);
    }
    let fields = schema.fields;
    let mut seen = [false; SEEN_BITS];
    loop {
        lx.spaces();
        match lx.peek() {
            Some(b'}') => break,
            Some(b',') => lx.i += 1,
            _ => return Err(BAD),
        }
        lx.spaces();
        let key = lx.string()?;
        lx.spaces();
        lx.eat(b':')?;
        lx.spaces();
        let value = lx.value()?;
        // "ev" again, "from" and anything else outside the schema match
        // no field.
        let (i, raw) = fields
            .iter()
            .enumerate()
            .find_map(|(i, f)| {
                if lx.is(key, &[f.name]) {
                    Some((i, false))
                } else if f.kind == Kind::Code && lx.is(key, &[f.name, "_raw"]) {
                    Some((i, true))
                } else {
                    None
                }
            })
            .ok_or(BAD)?;
        let fits = if raw {
            is_hex(lx, value)
        } else {
            fits(lx, fields[i].kind, value)
        };
        let slot = seen.get_mut(2 * i + usize::from(raw)).ok_or(BAD)?;
        if !fits || *slot {
            return Err(BAD);
        }
        *slot = true;
    }
    for (i, f) in fields.iter().enumerate() {
        let value = seen.get(2 * i).copied().unwrap_or(false);
        let raw = seen.get(2 * i + 1).copied().unwrap_or(false);
        if (f.kind == Kind::Code && value != raw) || (!f.optional && !value) {
            return Err(BAD);
        }
    }
    Ok(schema)
}

/// Whether `value` has the JSON shape `kind` promises.
fn fits(lx: &Lexer<'_>, kind: Kind, value: Value) -> bool {
    match kind {
        Kind::Str | Kind::Code => matches!(value, Value::Str(_)),
        Kind::Hex => is_hex(lx, value),
        Kind::Int => is_int(lx, value),
        Kind::Bool => matches!(value, Value::Bool),
        Kind::Array => matches!(value, Value::Array),
        Kind::Object => matches!(value, Value::Object),
    }
}

/// A string `0x` plus 1 to 16 lower-case hex digits.
fn is_hex(lx: &Lexer<'_>, value: Value) -> bool {
    let Value::Str(span) = value else {
        return false;
    };
    let mut chars = Unescape(lx.text(span).chars());
    if chars.next() != Some('0') || chars.next() != Some('x') {
        return false;
    }
    let mut digits = 0;
    for c in chars {
        if !matches!(c, '0'..='9' | 'a'..='f') {
            return false;
        }
        digits += 1;
    }
    (1..=MAX_HEX_DIGITS).contains(&digits)
}

/// A number with no fraction or exponent that fits an `i64` or a `u64`.
fn is_int(lx: &Lexer<'_>, value: Value) -> bool {
    let Value::Num(span) = value else {
        return false;
    };
    let text = lx.text(span);
    let (negative, digits) = match text.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let magnitude = digits.bytes().try_fold(0u64, |v, b| {
        v.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    });
    match magnitude {
        Some(m) if negative => m <= 1 << 63,
        Some(_) => true,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::ev::{
        Attack, DataCheck, DomainFault, Event, FieldSchema, Hex, HypercallMismatch, HypercallTable,
        Pingpong, Ready, Stream, Throughput, WorkDone,
    };
    use std::format;
    use std::string::String;
    use std::vec::Vec;

    fn ok(line: &str) -> &'static str {
        match validate(line.as_bytes()) {
            Ok(s) => s.name,
            Err(e) => panic!("{line}: {e:?}"),
        }
    }

    fn refused(line: &str) -> Error {
        match validate(line.as_bytes()) {
            Ok(s) => panic!("{line}: accepted as {}", s.name),
            Err(e) => e,
        }
    }

    fn invalid(line: &str) {
        assert_eq!(refused(line), Error::Invalid, "{line}");
    }

    /// The object `abi::ev` writes for `e`, without `EV ` in front.
    fn written<E: Event>(e: &E) -> String {
        let mut s = String::new();
        ev::write_line(&mut s, e, None).unwrap();
        s.strip_prefix(ev::PREFIX).unwrap().into()
    }

    const PING: &str = r#"{"ev":"pingpong","role":"ping","sent":10000,"received":10000}"#;

    #[test]
    fn every_domain_event_as_abi_writes_it() {
        let lines = [
            written(&Pingpong {
                role: "pong",
                sent: 10_000,
                received: 9_999,
            }),
            written(&WorkDone {
                work: "spin",
                units: u64::MAX,
            }),
            written(&Attack {
                case: "write-own-code",
            }),
            written(&HypercallMismatch {
                case: "console_write kernel pointer",
                expected: -2,
                got: i64::MIN,
            }),
            written(&HypercallTable {
                cases: 40,
                expected_refusals: 38,
                mismatches: 0,
            }),
            written(&DataCheck {
                what: "dma-control",
                bytes: 2048,
                ok: false,
            }),
            written(&Stream {
                what: "tcp-rx",
                bytes: 16 << 20,
                crc32: Hex(0xdead_beef),
                ns: 1,
            }),
            written(&Throughput {
                what: "blk-seq-read",
                bytes: 8 << 20,
                requests: 128,
                ns: 100_000_000,
                block: 65536,
                depth: 4,
            }),
        ];
        let names = [
            "pingpong",
            "work_done",
            "attack",
            "hypercall_mismatch",
            "hypercall_table",
            "data_check",
            "stream",
            "throughput",
        ];
        for (line, name) in lines.iter().zip(names) {
            assert_eq!(ok(line), name);
        }
        // Every domain event of the schema is reachable.
        for s in ev::ALL.iter().filter(|s| !s.ring0) {
            assert!(names.contains(&s.name), "{} has no test", s.name);
        }
    }

    #[test]
    fn spaces_escapes_and_unicode_are_json() {
        ok(r#"{ "ev" : "pingpong" , "role" : "ping" , "sent" : 1 , "received" : 0 }"#);
        ok(r#"{"ev":"attack","case":"a \"q\" \\ \/ \b\f\n\r\t \u00e9 \ud83d\ude00 é 😀"}"#);
        ok(r#"{"\u0065v":"\u0061ttack","c\u0061se":""}"#);
        ok("{\"ev\":\"attack\",\"case\":\"line\u{2028}separator\"}");
        ok(
            r#"{"ev":"hypercall_mismatch","case":"x","expected":-9223372036854775808,"got":18446744073709551615}"#,
        );
        ok(r#"{"ev":"hypercall_mismatch","case":"x","expected":-0,"got":0}"#);
        // Fields in any order after "ev".
        ok(r#"{"ev":"pingpong","received":1,"sent":2,"role":"pong"}"#);
    }

    #[test]
    fn ring0_events_are_denied() {
        let fault = written(&DomainFault {
            domain: "guest",
            vector: 14,
            vector_name: "page-fault",
            error_code: Hex(4),
            rip: Hex(0x40_1000),
            addr: Hex(0xffff_8000_0000_0000),
        });
        assert_eq!(refused(&fault), Error::Denied);
        let ready = written(&Ready {
            t_ms: 1,
            tsc_khz: 2,
        });
        assert_eq!(refused(&ready), Error::Denied);
        // Whatever the fields say, the name decides.
        assert_eq!(refused(r#"{"ev":"pci"}"#), Error::Denied);
        assert_eq!(refused(r#"{"ev":"domain_exit","from":"x"}"#), Error::Denied);
        assert_eq!(
            refused(r#"{"ev":"r\u0065ady","t_ms":1,"tsc_khz":2}"#),
            Error::Denied
        );
        for s in ev::ALL.iter().filter(|s| s.ring0) {
            assert_eq!(refused(&format!(r#"{{"ev":"{}"}}"#, s.name)), Error::Denied);
        }
        // But a malformed one is just malformed.
        invalid(r#"{"ev":"ready","t_ms":1,}"#);
        invalid(r#"{"ev":"ready""#);
    }

    #[test]
    fn the_name_must_come_first_and_exist() {
        invalid(r#"{"role":"ping","ev":"pingpong","sent":1,"received":1}"#);
        invalid(r#"{"ev":"no_such_event"}"#);
        invalid(r#"{"ev":"Pingpong","role":"ping","sent":1,"received":1}"#);
        invalid(r#"{"ev":5}"#);
        invalid(r#"{"ev":null}"#);
        invalid(r#"{"ev":["pingpong"]}"#);
        invalid(r#"{"EV":"attack","case":"x"}"#);
        invalid("{}");
    }

    #[test]
    fn a_forged_from_is_refused() {
        invalid(r#"{"ev":"attack","case":"x","from":"trusted-path"}"#);
        invalid(r#"{"ev":"attack","from":"blk","case":"x"}"#);
        invalid(r#"{"ev":"attack","case":"x","fr\u006fm":"blk"}"#);
        invalid(r#"{"ev":"attack","case":"x","from":null}"#);
    }

    #[test]
    fn fields_missing_extra_or_twice() {
        invalid(r#"{"ev":"pingpong","role":"ping","sent":1}"#);
        invalid(r#"{"ev":"attack"}"#);
        invalid(r#"{"ev":"attack","case":"x","extra":1}"#);
        invalid(r#"{"ev":"attack","case":"x","Case":"y"}"#);
        invalid(r#"{"ev":"attack","case":"x","case":"y"}"#);
        invalid(r#"{"ev":"attack","case":"x","c\u0061se":"y"}"#);
        invalid(r#"{"ev":"attack","ev":"attack","case":"x"}"#);
        invalid(r#"{"ev":"attack","case":"x","case_raw":"0x1"}"#);
    }

    #[test]
    fn fields_of_the_wrong_kind() {
        let base =
            |sent: &str| format!(r#"{{"ev":"pingpong","role":"ping","sent":{sent},"received":1}}"#);
        assert_eq!(ok(&base("0")), "pingpong");
        for bad in [
            r#""10""#,
            "1.5",
            "1.0",
            "1e3",
            "-1E2",
            "true",
            "null",
            "[1]",
            r#"{"n":1}"#,
            "18446744073709551616",
            "-9223372036854775809",
            "99999999999999999999999999",
        ] {
            invalid(&base(bad));
        }
        invalid(r#"{"ev":"attack","case":5}"#);
        invalid(r#"{"ev":"attack","case":null}"#);
        invalid(r#"{"ev":"attack","case":false}"#);
        invalid(r#"{"ev":"attack","case":["x"]}"#);
    }

    #[test]
    fn raw_controls_and_line_breaks_are_refused() {
        let good = PING;
        ok(good);
        for (at, c) in [
            (1, "\n"),
            (7, "\r"),
            (6, "\t"),
            (14, "\u{0}"),
            (20, "\u{7f}"),
        ] {
            let mut line = String::from(good);
            line.insert_str(at, c);
            invalid(&line);
        }
        invalid("{\"ev\":\"attack\",\"case\":\"a\nb\"}");
        invalid("{\"ev\":\"attack\",\"case\":\"a\u{85}b\"}");
        invalid("{\"ev\":\"attack\",\"case\":\"a\u{9b}b\"}");
        invalid("{\"ev\":\"attack\",\"case\":\"x\"}\n");
        invalid("{\"ev\":\"attack\",\"case\":\"x\"}\r\n");
    }

    #[test]
    fn one_object_and_nothing_else() {
        invalid(&format!("{PING}x"));
        invalid(&format!("{PING} "));
        invalid(&format!(" {PING}"));
        invalid(&format!("{PING}{PING}"));
        invalid(&format!("{PING},{PING}"));
        invalid(&format!("[{PING}]"));
        invalid(r#""pingpong""#);
        invalid("5");
        invalid("");
        invalid(&"x".repeat(EVENT_MAX as usize + 1));
        let long = format!(
            r#"{{"ev":"attack","case":"{}"}}"#,
            "y".repeat(EVENT_MAX as usize - 25)
        );
        assert_eq!(long.len() as u64, EVENT_MAX);
        ok(&long);
        invalid(&format!(
            r#"{{"ev":"attack","case":"{}"}}"#,
            "y".repeat(EVENT_MAX as usize - 24)
        ));
    }

    #[test]
    fn every_truncation_is_refused() {
        for line in [
            PING,
            r#"{"ev":"attack","case":"\ud83d\ude00 \u00e9 é"}"#,
            r#"{"ev":"hypercall_mismatch","case":"x","expected":-12,"got":-3}"#,
        ] {
            ok(line);
            for cut in 0..line.len() {
                if let Some(prefix) = line.get(..cut) {
                    invalid(prefix);
                }
                // Cut mid-character too (not UTF-8 any more).
                assert_eq!(
                    validate(&line.as_bytes()[..cut]).err(),
                    Some(Error::Invalid)
                );
            }
        }
    }

    #[test]
    fn bad_escapes_are_refused() {
        for esc in [
            r"\x",
            r"\u12",
            r"\u12G4",
            r"\U0041",
            r"\ud800",
            r"\udc00",
            r"\ud800\u0041",
            r"\ud800x",
            r"\ud800\n",
            r"\'",
            r"\0",
            r"\",
        ] {
            invalid(&format!(r#"{{"ev":"attack","case":"{esc}"}}"#));
        }
        invalid(r#"{"ev":"attack","case\q":"x"}"#);
    }

    #[test]
    fn not_utf8_is_refused() {
        let mut b = PING.as_bytes().to_vec();
        b[22] = 0xff;
        assert_eq!(validate(&b).err(), Some(Error::Invalid));
        let mut b = Vec::from(&br#"{"ev":"attack","case":""}"#[..]);
        for bad in [
            &[0xc0u8, 0xaf][..],
            &[0xed, 0xa0, 0x80],
            &[0xe2, 0x82],
            &[0x80],
        ] {
            let mut line = b.clone();
            line.splice(23..23, bad.iter().copied());
            assert_eq!(validate(&line).err(), Some(Error::Invalid), "{bad:x?}");
        }
        b.splice(23..23, "é".bytes());
        assert!(validate(&b).is_ok());
    }

    #[test]
    fn json_syntax_errors() {
        for line in [
            r#"{"ev":"attack","case":"x",}"#,
            r#"{"ev":"attack" "case":"x"}"#,
            r#"{"ev":"attack","case" "x"}"#,
            r#"{"ev":"attack","case":}"#,
            r#"{"ev":"attack",,"case":"x"}"#,
            r#"{"ev":"attack","case":'x'}"#,
            r#"{'ev':"attack","case":"x"}"#,
            r#"{ev:"attack","case":"x"}"#,
            r#"{"ev":"attack","case":"x"]"#,
            r#"{"ev":"attack","case":"x"}}"#,
            r#"{"ev":"pingpong","role":"p","sent":01,"received":1}"#,
            r#"{"ev":"pingpong","role":"p","sent":-,"received":1}"#,
            r#"{"ev":"pingpong","role":"p","sent":1.,"received":1}"#,
            r#"{"ev":"pingpong","role":"p","sent":.5,"received":1}"#,
            r#"{"ev":"pingpong","role":"p","sent":+1,"received":1}"#,
            r#"{"ev":"pingpong","role":"p","sent":1e,"received":1}"#,
            r#"{"ev":"pingpong","role":"p","sent":0x10,"received":1}"#,
            r#"{"ev":"pingpong","role":"p","sent":1 2,"received":1}"#,
            r#"{"ev":"attack","case":"x","b":tru}"#,
            r#"{"ev":"attack","case":"x","b":truex}"#,
            r#"{"ev":"attack","case":"x","b":nul}"#,
            r#"{"ev":"attack","case":"x","b":[1,]}"#,
            r#"{"ev":"attack","case":"x","b":[,1]}"#,
            r#"{"ev":"attack","case":"x","b":{"a"}}"#,
        ] {
            invalid(line);
        }
    }

    // A schema with every kind, to test what the domain events do not use.
    static TEST: EventSchema = EventSchema {
        name: "test",
        ring0: false,
        fields: &[
            FieldSchema {
                name: "s",
                kind: Kind::Str,
                optional: false,
            },
            FieldSchema {
                name: "h",
                kind: Kind::Hex,
                optional: false,
            },
            FieldSchema {
                name: "code",
                kind: Kind::Code,
                optional: true,
            },
            FieldSchema {
                name: "b",
                kind: Kind::Bool,
                optional: true,
            },
            FieldSchema {
                name: "a",
                kind: Kind::Array,
                optional: true,
            },
            FieldSchema {
                name: "o",
                kind: Kind::Object,
                optional: true,
            },
            FieldSchema {
                name: "n",
                kind: Kind::Int,
                optional: true,
            },
        ],
    };
    static SECRET: EventSchema = EventSchema {
        name: "secret",
        ring0: true,
        fields: &[],
    };
    const SCHEMAS: &[&EventSchema] = &[&TEST, &SECRET];

    fn test(rest: &str) -> Result<&'static str, Error> {
        let line = format!(r#"{{"ev":"test","s":"x"{rest}}}"#);
        check_in(line.as_bytes(), SCHEMAS).map(|s| s.name)
    }

    #[test]
    fn hex_fields() {
        for good in [
            "0x0",
            "0x1f",
            "0xffffffffffffffff",
            "0x0000000000000001",
            r"\u0030x1",
        ] {
            assert_eq!(test(&format!(r#","h":"{good}""#)), Ok("test"), "{good}");
        }
        for bad in [
            r#""0X1f""#,
            r#""0x1F""#,
            r#""0x""#,
            r#""1f""#,
            r#""0x1g""#,
            r#""0x 1""#,
            r#"" 0x1""#,
            r#""0x00000000000000001""#,
            "31",
            "true",
            "null",
            r#"["0x1"]"#,
        ] {
            assert_eq!(
                test(&format!(r#","h":{bad}"#)),
                Err(Error::Invalid),
                "{bad}"
            );
        }
        assert_eq!(test(""), Err(Error::Invalid), "h is not optional");
    }

    #[test]
    fn code_fields_come_with_their_raw_value() {
        let h = r#","h":"0x1""#;
        assert_eq!(
            test(&format!(r#"{h},"code":"page-fault","code_raw":"0xe""#)),
            Ok("test")
        );
        assert_eq!(
            test(&format!(r#"{h},"code_raw":"0xe","code":"page-fault""#)),
            Ok("test")
        );
        assert_eq!(test(h), Ok("test"), "an optional code may be left out");
        for bad in [
            r#","code":"page-fault""#,
            r#","code_raw":"0xe""#,
            r#","code":"page-fault","code_raw":14"#,
            r#","code":"page-fault","code_raw":"0xE""#,
            r#","code":14,"code_raw":"0xe""#,
            r#","code":"a","code_raw":"0x1","code_raw":"0x1""#,
            r#","code":"a","code_raw":"0x1","s_raw":"0x1""#,
        ] {
            assert_eq!(test(&format!("{h}{bad}")), Err(Error::Invalid), "{bad}");
        }
    }

    #[test]
    fn bool_array_object_and_optional_fields() {
        let h = r#","h":"0x1""#;
        for good in [
            r#","b":true"#,
            r#","b":false"#,
            r#","a":[]"#,
            r#","a":[1,"x",null,true,{"k":[]}]"#,
            r#","o":{}"#,
            r#","o":{"from":1,"ev":2,"k":{"k":[0.5e-3]}}"#,
            r#","n":-5"#,
        ] {
            assert_eq!(test(&format!("{h}{good}")), Ok("test"), "{good}");
        }
        for bad in [
            r#","b":1"#,
            r#","b":"true""#,
            r#","b":null"#,
            r#","a":{}"#,
            r#","a":"[]""#,
            r#","o":[]"#,
            r#","o":null"#,
            r#","n":null"#,
            r#","o":{"k":1,"k":2}"#,
            r#","o":{"k":1,"\u006b":2}"#,
            r#","a":[{"k":1,"k":2}]"#,
        ] {
            assert_eq!(test(&format!("{h}{bad}")), Err(Error::Invalid), "{bad}");
        }
        // The same key in sibling or nested objects is fine.
        let sib = r#","a":[{"k":1},{"k":2}],"o":{"k":{"k":3}}"#;
        assert_eq!(test(&format!("{h}{sib}")), Ok("test"));
        let line = br#"{"ev":"secret","x":1}"#;
        assert_eq!(check_in(line, SCHEMAS).err(), Some(Error::Denied));
    }

    #[test]
    fn nesting_is_bounded() {
        let h = r#","h":"0x1""#;
        // The event is depth 1, so three more levels fit.
        assert_eq!(test(&format!(r#"{h},"a":[[[1]]]"#)), Ok("test"));
        assert_eq!(
            test(&format!(r#"{h},"o":{{"k":{{"k":{{}}}}}}"#)),
            Ok("test")
        );
        assert_eq!(test(&format!(r#"{h},"a":[[[[1]]]]"#)), Err(Error::Invalid));
        assert_eq!(test(&format!(r#"{h},"a":[[[{{}}]]]"#)), Err(Error::Invalid));
        assert_eq!(
            test(&format!(r#"{h},"o":{{"k":{{"k":{{"k":{{}}}}}}}}"#)),
            Err(Error::Invalid)
        );
        // Very deep input is refused, not a stack overflow.
        let deep = format!(
            r#"{{"ev":"attack","case":"x","a":{}1{}}}"#,
            "[".repeat(500),
            "]".repeat(500)
        );
        invalid(&deep);
    }

    #[test]
    fn too_many_keys_at_once_is_refused() {
        let h = r#","h":"0x1""#;
        let keys = |n: usize| {
            let body: Vec<String> = (0..n).map(|i| format!(r#""k{i}":0"#)).collect();
            format!(r#"{h},"o":{{{}}}"#, body.join(","))
        };
        // The event's own keys ("ev", "s", "h", "o") count too.
        assert_eq!(test(&keys(MAX_KEYS - 4)), Ok("test"));
        assert_eq!(test(&keys(MAX_KEYS - 3)), Err(Error::Invalid));
    }

    #[test]
    fn hostile_bytes_never_panic() {
        // Every single-byte change of a valid event is answered.
        let line =
            br#"{"ev":"hypercall_mismatch","case":"\ud83d\ude00","expected":-1,"got":[{"a":1}]}"#;
        for at in 0..line.len() {
            for v in [
                0u8, b' ', b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b'u', b'0', 0xc3, 0xff,
            ] {
                let mut b = line.to_vec();
                b[at] = v;
                let _ = validate(&b);
                let _ = check_in(&b, SCHEMAS);
            }
        }
    }
}
