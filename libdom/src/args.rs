//! The manifest's `args` for a domain: `key=value` words separated by
//! spaces (`role=ping count=10000`).

use core::fmt;

/// Why an argument string was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgError<'a> {
    /// A word without `=`, or with an empty key.
    Malformed { word: &'a str },
    /// A key the domain does not take.
    Unknown { key: &'a str },
    /// A key given twice.
    Duplicate { key: &'a str },
    /// A key the domain needs is missing.
    Missing { key: &'a str },
    /// A value that should be a number is not one.
    NotANumber { key: &'a str, value: &'a str },
}

impl fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Malformed { word } => {
                write!(f, "argument \"{word}\" is not key=value")
            }
            ArgError::Unknown { key } => write!(f, "unknown argument \"{key}\""),
            ArgError::Duplicate { key } => write!(f, "argument \"{key}\" given twice"),
            ArgError::Missing { key } => write!(f, "argument \"{key}\" is missing"),
            ArgError::NotANumber { key, value } => {
                write!(f, "argument {key}=\"{value}\" is not a number")
            }
        }
    }
}

/// A domain's arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Args<'a> {
    s: &'a str,
}

impl<'a> Args<'a> {
    /// Checks the syntax: every word is `key=value` with a non-empty key,
    /// and no key comes twice.
    pub fn parse(s: &'a str) -> Result<Self, ArgError<'a>> {
        let args = Args { s };
        for (i, word) in s.split_ascii_whitespace().enumerate() {
            let Some((key, _)) = word.split_once('=').filter(|(k, _)| !k.is_empty()) else {
                return Err(ArgError::Malformed { word });
            };
            if args.pairs().take(i).any(|(k, _)| k == key) {
                return Err(ArgError::Duplicate { key });
            }
        }
        Ok(args)
    }

    /// Every `(key, value)`, in order.
    pub fn pairs(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.s
            .split_ascii_whitespace()
            .filter_map(|w| w.split_once('='))
    }

    /// Refuses any key not in `known`.
    pub fn only(&self, known: &[&str]) -> Result<(), ArgError<'a>> {
        match self.pairs().find(|(k, _)| !known.contains(k)) {
            Some((key, _)) => Err(ArgError::Unknown { key }),
            None => Ok(()),
        }
    }

    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub fn require(&self, key: &'a str) -> Result<&'a str, ArgError<'a>> {
        self.get(key).ok_or(ArgError::Missing { key })
    }

    /// A decimal number, or `default` if the key is absent.
    pub fn u64_or(&self, key: &'a str, default: u64) -> Result<u64, ArgError<'a>> {
        match self.get(key) {
            None => Ok(default),
            Some(value) => value
                .parse()
                .map_err(|_| ArgError::NotANumber { key, value }),
        }
    }

    /// A decimal number that must be given.
    pub fn u64(&self, key: &'a str) -> Result<u64, ArgError<'a>> {
        let value = self.require(key)?;
        value
            .parse()
            .map_err(|_| ArgError::NotANumber { key, value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;
    use std::vec::Vec;

    #[test]
    fn key_value_words() {
        let a = Args::parse("  role=ping count=10000 target= ").unwrap();
        assert_eq!(
            a.pairs().collect::<Vec<_>>(),
            [("role", "ping"), ("count", "10000"), ("target", "")]
        );
        assert_eq!(a.get("role"), Some("ping"));
        assert_eq!(a.get("nope"), None);
        assert_eq!(a.u64("count"), Ok(10000));
        assert_eq!(a.u64_or("until_ms", 7), Ok(7));
        assert_eq!(
            a.u64("role"),
            Err(ArgError::NotANumber {
                key: "role",
                value: "ping"
            })
        );
        assert_eq!(a.require("x"), Err(ArgError::Missing { key: "x" }));
        assert_eq!(a.only(&["role", "count", "target"]), Ok(()));
        assert_eq!(
            a.only(&["role", "count"]),
            Err(ArgError::Unknown { key: "target" })
        );
        let e = Args::parse("").unwrap();
        assert_eq!(e.pairs().count(), 0);
        assert_eq!(e.only(&[]), Ok(()));
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(
            Args::parse("role=ping count"),
            Err(ArgError::Malformed { word: "count" })
        );
        assert_eq!(Args::parse("=3"), Err(ArgError::Malformed { word: "=3" }));
        assert_eq!(
            Args::parse("a=1 b=2 a=3"),
            Err(ArgError::Duplicate { key: "a" })
        );
        assert_eq!(
            Args::parse("count=x1")
                .unwrap()
                .u64("count")
                .unwrap_err()
                .to_string(),
            "argument count=\"x1\" is not a number"
        );
        // A value may hold '='.
        assert_eq!(Args::parse("k=a=b").unwrap().get("k"), Some("a=b"));
    }
}
