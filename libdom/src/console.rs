//! Console output and events, both through hypercalls.

use core::fmt::{self, Write};

use abi::ev::{Event, Obj};
use abi::hypercall::{Error, CONSOLE_MAX, EVENT_MAX};

use crate::buf::FixedBuf;
use crate::hypercall;

/// Collects text into chunks of at most `N` bytes and hands each full chunk
/// (and the rest, on [`Chunker::flush`]) to `sink`.
pub struct Chunker<const N: usize, F: FnMut(&[u8])> {
    buf: [u8; N],
    len: usize,
    sink: F,
}

impl<const N: usize, F: FnMut(&[u8])> Chunker<N, F> {
    pub fn new(sink: F) -> Self {
        Chunker {
            buf: [0; N],
            len: 0,
            sink,
        }
    }

    pub fn flush(&mut self) {
        if self.len > 0 {
            (self.sink)(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl<const N: usize, F: FnMut(&[u8])> Write for Chunker<N, F> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s.as_bytes();
        while !rest.is_empty() {
            let n = rest.len().min(N - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&rest[..n]);
            self.len += n;
            rest = &rest[n..];
            if self.len == N {
                self.flush();
            }
        }
        Ok(())
    }
}

/// Bytes [`print!`](crate::print) gathers before a `console_write`.
pub const PRINT_CHUNK: usize = 256;
const _: () = assert!(PRINT_CHUNK as u64 <= CONSOLE_MAX);

/// What `print!` and `println!` call: formats `args` and writes it in
/// chunks of [`PRINT_CHUNK`] bytes, so one short call is one
/// `console_write`. Console errors are dropped (there is nowhere to report
/// them).
pub fn print_fmt(args: fmt::Arguments<'_>) {
    let mut out = Chunker::<PRINT_CHUNK, _>::new(|b| {
        let _ = hypercall::console_write(b);
    });
    let _ = out.write_fmt(args);
    out.flush();
}

/// Prints to the console through `console_write`.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::console::print_fmt(format_args!($($arg)*))
    };
}

/// Prints a line to the console through `console_write`.
#[macro_export]
macro_rules! println {
    () => {
        $crate::console::print_fmt(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::console::print_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Writes `event` as the JSON object the `event` hypercall takes,
/// `{"ev":NAME,fields...}` (no `"from"`: the hypervisor stamps that), into
/// `buf`. `Err(BadLength)` if it does not fit.
pub fn encode_event<'b, E: Event>(event: &E, buf: &'b mut [u8]) -> Result<&'b str, Error> {
    let mut w = FixedBuf::new(buf);
    let written = (|| {
        let mut obj = Obj::begin(&mut w)?;
        obj.field("ev", E::SCHEMA.name)?;
        event.write_fields(&mut obj)?;
        obj.end()
    })();
    if written.is_err() || w.overflowed() {
        return Err(Error::BadLength);
    }
    Ok(w.into_str())
}

/// Asks the hypervisor to print `event` as `EV {...,"from":"NAME"}`.
/// Events only ring 0 may print are refused with `Denied`; one longer than
/// `EVENT_MAX` is `BadLength` before any call.
pub fn event<E: Event>(event: &E) -> Result<(), Error> {
    let mut buf = [0u8; EVENT_MAX as usize];
    let json = encode_event(event, &mut buf)?;
    hypercall::event_raw(json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::ev::{Attack, HypercallTable, Pingpong};
    use std::string::String;
    use std::vec::Vec;

    #[test]
    fn events_are_one_object_without_from() {
        let mut buf = [0u8; 256];
        let e = Pingpong {
            role: "ping",
            sent: 10000,
            received: 9999,
        };
        assert_eq!(
            encode_event(&e, &mut buf),
            Ok(r#"{"ev":"pingpong","role":"ping","sent":10000,"received":9999}"#)
        );
        let e = HypercallTable {
            cases: 3,
            expected_refusals: 2,
            mismatches: 0,
        };
        assert_eq!(
            encode_event(&e, &mut buf),
            Ok(r#"{"ev":"hypercall_table","cases":3,"expected_refusals":2,"mismatches":0}"#)
        );
        // Escaping is abi's.
        let e = Attack { case: "a\"b" };
        assert_eq!(
            encode_event(&e, &mut buf),
            Ok(r#"{"ev":"attack","case":"a\"b"}"#)
        );
    }

    #[test]
    fn an_event_that_does_not_fit_is_bad_length() {
        let mut buf = [0u8; 20];
        let e = Attack { case: "hvmem" };
        assert_eq!(encode_event(&e, &mut buf), Err(Error::BadLength));
        let mut buf = [0u8; 29];
        assert_eq!(encode_event(&e, &mut buf), Err(Error::BadLength));
        let mut buf = [0u8; 30];
        assert_eq!(
            encode_event(&e, &mut buf),
            Ok(r#"{"ev":"attack","case":"hvmem"}"#)
        );
    }

    #[test]
    fn chunks_are_at_most_n_bytes() {
        let mut got: Vec<String> = Vec::new();
        {
            let mut c =
                Chunker::<4, _>::new(|b: &[u8]| got.push(String::from_utf8(b.to_vec()).unwrap()));
            write!(c, "abcdefghij{}", 12).unwrap();
            c.flush();
            c.flush();
        }
        assert_eq!(got, ["abcd", "efgh", "ij12"]);
        let mut got: Vec<usize> = Vec::new();
        {
            let mut c = Chunker::<4, _>::new(|b: &[u8]| got.push(b.len()));
            write!(c, "abcdefghi").unwrap();
            c.flush();
        }
        assert_eq!(got, [4, 4, 1]);
    }
}
