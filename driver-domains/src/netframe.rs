//! The test frames of `net-direct`: what the net driver domain sends and the
//! harness's test peer (`tests/src/peer.rs`) answers. Both sides build and
//! check frames with this module alone, so the format is written once.
//!
//! A frame is an Ethernet II frame of [`MIN_LEN`]..=[`MAX_LEN`] bytes (no
//! FCS; big-endian numbers):
//!
//! ```text
//! offset  bytes  field
//!      0      6  destination MAC
//!      6      6  source MAC
//!     12      2  EtherType 0x88b5 (IEEE 802 local experimental)
//!     14      4  magic "ALNT"
//!     18      1  kind: 1 request (driver -> peer), 2 reply (peer -> driver)
//!     19      1  0
//!     20      2  frame length (all of it, header included)
//!     22      4  sequence number
//!     26    ...  payload: byte i is pattern(seq, i) in a request and its
//!                complement in a reply
//! ```
//!
//! The peer answers a request with a reply of the same length and sequence
//! number, addressed to the request's source, every payload byte inverted:
//! a device that echoed a frame unchanged (or a stale buffer) cannot pass
//! for an answer.

use core::fmt;

/// An Ethernet address.
pub type Mac = [u8; 6];

/// The frames' EtherType (IEEE 802 local experimental EtherType 1).
pub const ETHERTYPE: u16 = 0x88b5;
pub const MAGIC: [u8; 4] = *b"ALNT";
/// Bytes before the payload.
pub const HEADER_LEN: usize = 26;
/// The shortest frame: Ethernet's minimum without the FCS (shorter ones
/// may be padded on the way).
pub const MIN_LEN: usize = 60;
/// The longest: a 1500-byte MTU plus the Ethernet header.
pub const MAX_LEN: usize = 1514;
/// Most frames one exchange may number (what the driver's and the peer's
/// bookkeeping is sized for).
pub const MAX_FRAMES: u32 = 4096;
/// The peer's address (locally administered, unicast).
pub const PEER_MAC: Mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

const O_ETHERTYPE: usize = 12;
const O_MAGIC: usize = 14;
const O_KIND: usize = 18;
const O_LEN: usize = 20;
const O_SEQ: usize = 22;

/// An Ethernet address written the usual way (`52:54:00:12:34:56`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShowMac(pub Mac);

impl fmt::Display for ShowMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Which way a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Request = 1,
    Reply = 2,
}

impl Kind {
    fn from_raw(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Request),
            2 => Some(Kind::Reply),
            _ => None,
        }
    }

    /// What the payload bytes are XORed with.
    fn mask(self) -> u8 {
        match self {
            Kind::Request => 0,
            Kind::Reply => 0xff,
        }
    }
}

/// Payload byte `i` of request `seq`: a cheap hash of both, so that a byte
/// out of place, a frame of another number or a zeroed buffer all differ.
pub fn pattern(seq: u32, i: usize) -> u8 {
    let x = seq.wrapping_mul(0x9e37_79b9) ^ (i as u32).wrapping_mul(0x85eb_ca6b);
    let x = x ^ (x >> 15);
    (x.wrapping_mul(0x2c1b_3c6d) >> 24) as u8
}

/// What a frame's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub dst: Mac,
    pub src: Mac,
    pub kind: Kind,
    pub seq: u32,
    pub len: usize,
}

/// Why a frame is not a good one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Outside `MIN_LEN..=MAX_LEN` (or a buffer too small to build into).
    BadSize(usize),
    /// Not our EtherType: not a test frame at all.
    NotOurs(u16),
    BadMagic,
    BadKind(u8),
    /// The kind is valid but not the one expected.
    WrongKind(Kind),
    /// The header's length is not the frame's.
    LengthMismatch {
        header: usize,
        actual: usize,
    },
    /// The first payload byte that differs from what it must be.
    BadPayload {
        offset: usize,
        got: u8,
        want: u8,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FrameError::BadSize(n) => {
                write!(f, "{n} bytes, outside {MIN_LEN}..={MAX_LEN}")
            }
            FrameError::NotOurs(t) => write!(f, "EtherType {t:#06x}, not {ETHERTYPE:#06x}"),
            FrameError::BadMagic => f.write_str("bad magic"),
            FrameError::BadKind(k) => write!(f, "unknown kind {k}"),
            FrameError::WrongKind(k) => write!(f, "a {k:?} where the other kind was due"),
            FrameError::LengthMismatch { header, actual } => {
                write!(f, "header says {header} bytes, frame has {actual}")
            }
            FrameError::BadPayload { offset, got, want } => {
                write!(f, "byte {offset} is {got:#04x}, expected {want:#04x}")
            }
        }
    }
}

fn size_ok(len: usize) -> Result<(), FrameError> {
    if (MIN_LEN..=MAX_LEN).contains(&len) {
        Ok(())
    } else {
        Err(FrameError::BadSize(len))
    }
}

/// Fills all of `frame` (its length is the frame's) with frame `seq`.
pub fn build(frame: &mut [u8], kind: Kind, dst: Mac, src: Mac, seq: u32) -> Result<(), FrameError> {
    let len = frame.len();
    size_ok(len)?;
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame[O_ETHERTYPE..O_ETHERTYPE + 2].copy_from_slice(&ETHERTYPE.to_be_bytes());
    frame[O_MAGIC..O_MAGIC + 4].copy_from_slice(&MAGIC);
    frame[O_KIND] = kind as u8;
    frame[O_KIND + 1] = 0;
    frame[O_LEN..O_LEN + 2].copy_from_slice(&(len as u16).to_be_bytes());
    frame[O_SEQ..O_SEQ + 4].copy_from_slice(&seq.to_be_bytes());
    let mask = kind.mask();
    for (i, b) in frame[HEADER_LEN..].iter_mut().enumerate() {
        *b = pattern(seq, i) ^ mask;
    }
    Ok(())
}

/// Reads the header of `frame` and checks it (EtherType, magic, kind,
/// length); the payload is not looked at.
pub fn header(frame: &[u8]) -> Result<Header, FrameError> {
    let len = frame.len();
    if len < HEADER_LEN {
        return Err(FrameError::BadSize(len));
    }
    let ethertype = u16::from_be_bytes([frame[O_ETHERTYPE], frame[O_ETHERTYPE + 1]]);
    if ethertype != ETHERTYPE {
        return Err(FrameError::NotOurs(ethertype));
    }
    size_ok(len)?;
    if frame[O_MAGIC..O_MAGIC + 4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let kind = Kind::from_raw(frame[O_KIND]).ok_or(FrameError::BadKind(frame[O_KIND]))?;
    let header_len = usize::from(u16::from_be_bytes([frame[O_LEN], frame[O_LEN + 1]]));
    if header_len != len {
        return Err(FrameError::LengthMismatch {
            header: header_len,
            actual: len,
        });
    }
    let mac = |at: usize| {
        let mut m = [0u8; 6];
        m.copy_from_slice(&frame[at..at + 6]);
        m
    };
    Ok(Header {
        dst: mac(0),
        src: mac(6),
        kind,
        seq: u32::from_be_bytes([
            frame[O_SEQ],
            frame[O_SEQ + 1],
            frame[O_SEQ + 2],
            frame[O_SEQ + 3],
        ]),
        len,
    })
}

/// Checks all of `frame`: a valid header of kind `want` and the payload
/// its sequence number calls for.
pub fn verify(frame: &[u8], want: Kind) -> Result<Header, FrameError> {
    let h = header(frame)?;
    if h.kind != want {
        return Err(FrameError::WrongKind(h.kind));
    }
    let mask = want.mask();
    for (i, &got) in frame[HEADER_LEN..].iter().enumerate() {
        let want = pattern(h.seq, i) ^ mask;
        if got != want {
            return Err(FrameError::BadPayload {
                offset: HEADER_LEN + i,
                got,
                want,
            });
        }
    }
    Ok(h)
}

/// The peer's answer to `request` (checked in full first), written to
/// `out[..request.len()]`: a reply from `own` to the request's source.
pub fn answer(request: &[u8], own: Mac, out: &mut [u8]) -> Result<Header, FrameError> {
    let h = verify(request, Kind::Request)?;
    let room = out.len();
    let out = out.get_mut(..h.len).ok_or(FrameError::BadSize(room))?;
    build(out, Kind::Reply, h.src, own, h.seq)?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRIVER: Mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    fn request(seq: u32, len: usize) -> std::vec::Vec<u8> {
        let mut f = std::vec![0u8; len];
        build(&mut f, Kind::Request, PEER_MAC, DRIVER, seq).unwrap();
        f
    }

    #[test]
    fn a_request_is_laid_out_as_documented() {
        let f = request(0x0102_0304, 60);
        assert_eq!(&f[0..6], &PEER_MAC);
        assert_eq!(&f[6..12], &DRIVER);
        assert_eq!(&f[12..26], b"\x88\xb5ALNT\x01\x00\x00\x3c\x01\x02\x03\x04");
        assert_eq!(f[26], pattern(0x0102_0304, 0));
        let h = verify(&f, Kind::Request).unwrap();
        assert_eq!(
            h,
            Header {
                dst: PEER_MAC,
                src: DRIVER,
                kind: Kind::Request,
                seq: 0x0102_0304,
                len: 60
            }
        );
    }

    #[test]
    fn the_answer_inverts_the_payload_and_swaps_the_addresses() {
        for (seq, len) in [(0, 60), (7, 600), (u32::MAX, MAX_LEN)] {
            let req = request(seq, len);
            let mut out = [0u8; MAX_LEN];
            let h = answer(&req, PEER_MAC, &mut out).unwrap();
            assert_eq!((h.seq, h.len), (seq, len));
            let reply = &out[..len];
            let r = verify(reply, Kind::Reply).unwrap();
            assert_eq!((r.dst, r.src, r.seq, r.len), (DRIVER, PEER_MAC, seq, len));
            for i in HEADER_LEN..len {
                assert_eq!(reply[i], !req[i]);
            }
            // A reply is not a request, and an echo is not a reply.
            assert_eq!(
                verify(reply, Kind::Request),
                Err(FrameError::WrongKind(Kind::Reply))
            );
            assert_eq!(
                verify(&req, Kind::Reply),
                Err(FrameError::WrongKind(Kind::Request))
            );
        }
    }

    #[test]
    fn addresses_are_shown_as_usual() {
        assert_eq!(ShowMac(DRIVER).to_string(), "52:54:00:12:34:56");
    }

    #[test]
    fn patterns_differ_between_frames() {
        let a = request(1, 600);
        let b = request(2, 600);
        let same = a[HEADER_LEN..]
            .iter()
            .zip(&b[HEADER_LEN..])
            .filter(|(x, y)| x == y)
            .count();
        assert!(same < 20, "{same} of 574 bytes agree");
        let zeros = a[HEADER_LEN..].iter().filter(|&&x| x == 0).count();
        assert!(zeros < 20, "{zeros} zero bytes");
    }

    #[test]
    fn damage_is_named() {
        let good = request(5, 100);
        let mut f = good.clone();
        f[70] ^= 1;
        assert_eq!(
            verify(&f, Kind::Request),
            Err(FrameError::BadPayload {
                offset: 70,
                got: good[70] ^ 1,
                want: good[70]
            })
        );
        let mut f = good.clone();
        f[12] = 0x08;
        f[13] = 0x00;
        assert_eq!(header(&f), Err(FrameError::NotOurs(0x0800)));
        let mut f = good.clone();
        f[15] = b'X';
        assert_eq!(header(&f), Err(FrameError::BadMagic));
        let mut f = good.clone();
        f[18] = 9;
        assert_eq!(header(&f), Err(FrameError::BadKind(9)));
        // Truncated, padded, too short to be one of ours at all.
        assert_eq!(
            header(&good[..99]),
            Err(FrameError::LengthMismatch {
                header: 100,
                actual: 99
            })
        );
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            header(&long),
            Err(FrameError::LengthMismatch { .. })
        ));
        assert_eq!(header(&good[..20]), Err(FrameError::BadSize(20)));
        assert_eq!(header(&good[..59]), Err(FrameError::BadSize(59)));
        let mut big = [0u8; MAX_LEN + 1];
        assert_eq!(
            build(&mut big, Kind::Request, PEER_MAC, DRIVER, 0),
            Err(FrameError::BadSize(MAX_LEN + 1))
        );
        let mut small = [0u8; 100];
        assert_eq!(
            answer(&request(1, 200), PEER_MAC, &mut small),
            Err(FrameError::BadSize(100))
        );
        assert!(FrameError::BadPayload {
            offset: 70,
            got: 1,
            want: 2
        }
        .to_string()
        .contains("byte 70 is 0x01, expected 0x02"));
    }
}
