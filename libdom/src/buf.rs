//! A `fmt::Write` into a fixed byte buffer, for formatting without a heap
//! (events, panic messages).

use core::fmt;

/// Writes into `buf`; what does not fit is cut at a character boundary and
/// remembered as an overflow (and the write reports `fmt::Error`).
pub struct FixedBuf<'b> {
    buf: &'b mut [u8],
    len: usize,
    overflow: bool,
}

impl<'b> FixedBuf<'b> {
    pub fn new(buf: &'b mut [u8]) -> Self {
        FixedBuf {
            buf,
            len: 0,
            overflow: false,
        }
    }

    /// The bytes written so far (always whole UTF-8 characters).
    pub fn as_str(&self) -> &str {
        // Only whole `&str` prefixes cut at char boundaries were copied in.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    /// The bytes written, for as long as the buffer lives.
    pub fn into_str(self) -> &'b str {
        let FixedBuf { buf, len, .. } = self;
        let buf: &'b [u8] = buf;
        core::str::from_utf8(&buf[..len]).unwrap_or("")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether something did not fit.
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// Replaces the last byte with `b` if the buffer is full, else appends
    /// it: how a cut line still ends with a newline.
    pub fn end_with(&mut self, b: u8) {
        if self.buf.is_empty() || !b.is_ascii() {
            return;
        }
        if self.len == self.buf.len() {
            // Drop the last whole character to make room.
            let mut n = self.len - 1;
            while n > 0 && (self.buf[n] & 0xc0) == 0x80 {
                n -= 1;
            }
            self.len = n;
        }
        self.buf[self.len] = b;
        self.len += 1;
    }
}

impl fmt::Write for FixedBuf<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            self.overflow = true;
            return Err(fmt::Error);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn fits_and_overflows() {
        let mut b = [0u8; 8];
        let mut w = FixedBuf::new(&mut b);
        assert!(w.is_empty());
        write!(w, "ab{}", 12).unwrap();
        assert_eq!((w.as_str(), w.len(), w.overflowed()), ("ab12", 4, false));
        assert!(write!(w, "cdefgh").is_err());
        assert_eq!((w.as_str(), w.overflowed()), ("ab12cdef", true));
    }

    #[test]
    fn cuts_at_character_boundaries() {
        let mut b = [0u8; 5];
        let mut w = FixedBuf::new(&mut b);
        assert!(w.write_str("abcé!").is_err()); // é is two bytes: 3 + 2 = 5 fits
        assert_eq!(w.as_str(), "abcé");
        let mut b = [0u8; 4];
        let mut w = FixedBuf::new(&mut b);
        assert!(w.write_str("abcé").is_err());
        assert_eq!(w.as_str(), "abc");
    }

    #[test]
    fn end_with_makes_room() {
        let mut b = [0u8; 4];
        let mut w = FixedBuf::new(&mut b);
        let _ = w.write_str("abcdef");
        w.end_with(b'\n');
        assert_eq!(w.as_str(), "abc\n");
        let mut b = [0u8; 5];
        let mut w = FixedBuf::new(&mut b);
        let _ = w.write_str("abcé");
        w.end_with(b'\n');
        assert_eq!(w.as_str(), "abc\n");
        let mut b = [0u8; 8];
        let mut w = FixedBuf::new(&mut b);
        w.write_str("ok").unwrap();
        w.end_with(b'\n');
        assert_eq!(w.as_str(), "ok\n");
        let mut w = FixedBuf::new(&mut []);
        w.end_with(b'\n');
        assert_eq!(w.as_str(), "");
    }
}
