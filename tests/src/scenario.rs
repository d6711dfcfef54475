//! A scenario's expectations, as the harness uses them (xtask turns the
//! `[test]` table into these after checking it).

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

/// How the run must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedExit {
    /// QEMU exits with `abi::exit::QEMU_SUCCESS`.
    Success,
    /// QEMU exits with `abi::exit::QEMU_FAILURE`: the hypervisor stopped
    /// the system on purpose (a hang or a QEMU error is not this).
    Failure,
    /// The system is still running when the time limit comes.
    Timeout,
}

impl ExpectedExit {
    pub const ALL: [ExpectedExit; 3] = [
        ExpectedExit::Success,
        ExpectedExit::Failure,
        ExpectedExit::Timeout,
    ];

    /// The `[test] exit` spelling.
    pub const fn name(self) -> &'static str {
        match self {
            ExpectedExit::Success => "success",
            ExpectedExit::Failure => "failure",
            ExpectedExit::Timeout => "timeout",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == name)
    }
}

/// Events of one name whose fields include the given ones.
#[derive(Clone, Debug, PartialEq)]
pub struct Pattern {
    pub ev: String,
    /// Each must be present in the event with a matching value: equal JSON,
    /// except that two `"0x..."` strings match when their numbers are equal,
    /// an object matches an object holding at least its fields, and an array
    /// matches an array holding, for each of its elements, one that matches.
    pub fields: Map<String, Value>,
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ev \"{}\"", self.ev)?;
        if !self.fields.is_empty() {
            write!(f, " with {}", Value::Object(self.fields.clone()))?;
        }
        Ok(())
    }
}

/// An event that must appear.
#[derive(Clone, Debug, PartialEq)]
pub struct Expect {
    pub pattern: Pattern,
    /// Exactly this many times; `None`: at least once.
    pub count: Option<u32>,
}

/// One value of one event: the single event a pattern matches, and a field.
#[derive(Clone, Debug, PartialEq)]
pub struct Selector {
    pub pattern: Pattern,
    pub field: String,
}

impl fmt::Display for Selector {
    /// `hypercalls{"domain":"hostile"}.refused`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}.{}",
            self.pattern.ev,
            Value::Object(self.pattern.fields.clone()),
            self.field
        )
    }
}

/// `[[test.ratio]]`: `num`'s value divided by `den`'s is `expect` within a
/// relative `tolerance` (0.10 is 10 %). Both are numbers; each selector must
/// match exactly one event.
#[derive(Clone, Debug, PartialEq)]
pub struct Ratio {
    pub num: Selector,
    pub den: Selector,
    pub expect: f64,
    pub tolerance: f64,
}

/// `[[test.equal]]`: two values that must be equal (numbers by value, hex
/// strings by number, anything else as JSON). Each selector must match
/// exactly one event, except that with `any` the `a` side may match
/// several, and one of them must hold a value equal to `b`'s (how a
/// scenario finds, among a domain's DMA faults, the one at an address it
/// only learns from another event).
#[derive(Clone, Debug, PartialEq)]
pub struct Equal {
    pub a: Selector,
    pub b: Selector,
    pub any: bool,
}

/// A way to damage the packed bundle before boot, to test the checks that
/// must catch it. Spelled as in `[test] corrupt = "..."`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// `entry-data` or `entry-data:NAME`: flip a byte of an entry's data (the
    /// first non-empty entry, or the one named) so its CRC-32 fails.
    EntryData(Option<String>),
    /// `header-crc`: flip a bit of the stored header CRC.
    HeaderCrc,
    /// `bad-magic`: overwrite the magic.
    BadMagic,
    /// `bad-version`: a format version no hypervisor knows.
    BadVersion,
    /// `truncate`: cut the last 8 bytes, as a short copy would.
    Truncate,
    /// `manifest-content`: damage the compiled manifest's magic and fix the
    /// bundle's CRCs, so that the bundle passes and the manifest fails.
    ManifestContent,
}

impl Corruption {
    /// The names `parse` accepts (`entry-data` also takes `:NAME`).
    pub const NAMES: [&'static str; 6] = [
        "entry-data",
        "header-crc",
        "bad-magic",
        "bad-version",
        "truncate",
        "manifest-content",
    ];

    pub fn parse(s: &str) -> Option<Self> {
        let (head, arg) = match s.split_once(':') {
            Some((h, a)) => (h, Some(a)),
            None => (s, None),
        };
        let c = match head {
            "entry-data" => {
                return match arg {
                    Some("") => None,
                    a => Some(Corruption::EntryData(a.map(str::to_owned))),
                }
            }
            "header-crc" => Corruption::HeaderCrc,
            "bad-magic" => Corruption::BadMagic,
            "bad-version" => Corruption::BadVersion,
            "truncate" => Corruption::Truncate,
            "manifest-content" => Corruption::ManifestContent,
            _ => return None,
        };
        arg.is_none().then_some(c)
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::EntryData(None) => f.write_str("entry-data"),
            Corruption::EntryData(Some(n)) => write!(f, "entry-data:{n}"),
            Corruption::HeaderCrc => f.write_str("header-crc"),
            Corruption::BadMagic => f.write_str("bad-magic"),
            Corruption::BadVersion => f.write_str("bad-version"),
            Corruption::Truncate => f.write_str("truncate"),
            Corruption::ManifestContent => f.write_str("manifest-content"),
        }
    }
}

/// Everything a scenario expects of one boot.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    pub name: String,
    pub timeout: Duration,
    pub exit: ExpectedExit,
    pub corrupt: Option<Corruption>,
    pub expect: Vec<Expect>,
    pub forbid: Vec<Pattern>,
    pub ratios: Vec<Ratio>,
    pub equals: Vec<Equal>,
    /// `[test.peer]`: the harness answers the guest's frames (see
    /// [`crate::peer`]) and its counts must be exact.
    pub peer: Option<crate::peer::PeerSpec>,
    /// `[test.disk]`: the disk image written before boot and checked after
    /// (see [`crate::disk`]).
    pub disk: Option<crate::disk::DiskSpec>,
    /// `[test.tcp]`: the harness's TCP peer talks to the guest through a
    /// `user` netdev's `hostfwd` (see [`crate::tcppeer`]).
    pub tcp: Option<crate::tcppeer::TcpSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corruption_names_round_trip() {
        for n in Corruption::NAMES {
            assert_eq!(Corruption::parse(n).unwrap().to_string(), n);
        }
        assert_eq!(
            Corruption::parse("entry-data:blk"),
            Some(Corruption::EntryData(Some("blk".into())))
        );
        assert_eq!(Corruption::parse("entry-data:"), None);
        assert_eq!(Corruption::parse("truncate:3"), None);
        assert_eq!(Corruption::parse("flip"), None);
    }

    #[test]
    fn exits_round_trip() {
        for e in ExpectedExit::ALL {
            assert_eq!(ExpectedExit::from_name(e.name()), Some(e));
        }
        assert_eq!(ExpectedExit::from_name("ok"), None);
    }
}
