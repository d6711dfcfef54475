//! The block interface carried on a shared ring, Xen's `io/blkif.h` layouts
//! (x86_64 sizes; all fields little-endian).
//!
//! ```text
//! request   0 u8 operation  1 u8 nr_segments  2 u16 handle  8 u64 id
//!          16 u64 sector_number  24 segment[11]                     = 112
//! segment   0 u32 gref  4 u8 first_sect  5 u8 last_sect  6 pad      =   8
//! response  0 u64 id  8 u8 operation  10 i16 status  12 pad (zero)  =  16
//! discard   0 u8 operation  1 u8 flag  2 u16 handle  8 u64 id
//!          16 u64 sector_number  24 u64 nr_sectors                  =  32
//! indirect  0 u8 operation (6)  1 u8 indirect_op  2 u16 nr_segments
//!           8 u64 id  16 u64 sector_number  24 u16 handle
//!          28 u32 indirect_grefs[8]  60 pad                         =  64
//! ```
//!
//! A ring slot is the union of these, [`ENTRY_SIZE`] = 112 bytes, so one
//! page holds [`RING_SIZE`] = 32 slots. A segment names sectors
//! `first_sect..=last_sect` of one granted 4 KiB page (8 sectors of 512
//! bytes); a request's segments are consecutive on the disk from
//! `sector_number`. An indirect request's pages each hold
//! [`SEGMENTS_PER_INDIRECT_PAGE`] segments in the same 8-byte layout.
//!
//! Without xenstore there is one feature to negotiate: airlock's blkback
//! supports READ, WRITE, FLUSH_DISKCACHE and INDIRECT (READ or WRITE, at
//! most [`MAX_INDIRECT_SEGMENTS`] segments, or as many as it is configured
//! for, which it writes into the ring header: `ring::off::BACK_MAX_INDIRECT`)
//! and answers WRITE_BARRIER and DISCARD with [`status::EOPNOTSUPP`].

use crate::ring;

/// Bytes of a sector.
pub const SECTOR_SIZE: u64 = 512;
/// Sectors in one granted page.
pub const SECTORS_PER_PAGE: u8 = 8;
/// Most segments in a direct request (44 KiB).
pub const MAX_SEGMENTS: usize = 11;
/// Most indirect pages one indirect request names.
pub const MAX_INDIRECT_PAGES: usize = 8;
/// Segments in one indirect page.
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = 4096 / SEGMENT_SIZE;
/// The most segments airlock's blkback takes in one indirect request (what
/// Xen's backend would advertise as `feature-max-indirect-segments`; 1 MiB).
pub const MAX_INDIRECT_SEGMENTS: u16 = 256;

pub const SEGMENT_SIZE: usize = 8;
pub const REQUEST_SIZE: usize = 112;
pub const RESPONSE_SIZE: usize = 16;
pub const DISCARD_SIZE: usize = 32;
pub const INDIRECT_SIZE: usize = 64;
/// Bytes of a ring slot (the union of request and response).
pub const ENTRY_SIZE: usize = REQUEST_SIZE;
/// Slots in a blkif ring page.
pub const RING_SIZE: u32 = ring::entries(ENTRY_SIZE);

const _: () = assert!(24 + MAX_SEGMENTS * SEGMENT_SIZE == REQUEST_SIZE);
const _: () = assert!(28 + MAX_INDIRECT_PAGES * 4 <= INDIRECT_SIZE);
const _: () = assert!(DISCARD_SIZE <= ENTRY_SIZE && INDIRECT_SIZE <= ENTRY_SIZE);
const _: () = assert!(RESPONSE_SIZE <= ENTRY_SIZE);
const _: () = assert!(RING_SIZE == 32);
const _: () = assert!(SEGMENTS_PER_INDIRECT_PAGE == 512);
const _: () =
    assert!(MAX_INDIRECT_SEGMENTS as usize <= MAX_INDIRECT_PAGES * SEGMENTS_PER_INDIRECT_PAGE);

/// Operation numbers (`BLKIF_OP_*`).
pub mod op {
    pub const READ: u8 = 0;
    pub const WRITE: u8 = 1;
    /// Not supported by airlock (EOPNOTSUPP).
    pub const WRITE_BARRIER: u8 = 2;
    pub const FLUSH_DISKCACHE: u8 = 3;
    /// Not supported by airlock (EOPNOTSUPP).
    pub const DISCARD: u8 = 5;
    pub const INDIRECT: u8 = 6;
}

/// Response status (`BLKIF_RSP_*`).
pub mod status {
    pub const OKAY: i16 = 0;
    pub const ERROR: i16 = -1;
    pub const EOPNOTSUPP: i16 = -2;
}

/// Discard request flags.
pub mod discard_flags {
    pub const SECURE: u8 = 1;
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | u64::from(u32_at(b, o + 4)) << 32
}

/// Copy the first `N` bytes of a slot.
fn prefix<const N: usize>(e: &[u8; ENTRY_SIZE]) -> [u8; N] {
    let mut b = [0u8; N];
    b.copy_from_slice(&e[..N]);
    b
}

/// One segment: sectors `first_sect..=last_sect` of granted page `gref`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub gref: u32,
    pub first_sect: u8,
    pub last_sect: u8,
}

impl Segment {
    #[inline]
    pub fn decode(b: &[u8; SEGMENT_SIZE]) -> Self {
        Segment {
            gref: u32_at(b, 0),
            first_sect: b[4],
            last_sect: b[5],
        }
    }

    /// Decode segment `i` of an indirect page (`None` past its end).
    pub fn decode_at(page: &[u8], i: usize) -> Option<Self> {
        let o = i.checked_mul(SEGMENT_SIZE)?;
        let b = page.get(o..o.checked_add(SEGMENT_SIZE)?)?;
        Some(Segment {
            gref: u32_at(b, 0),
            first_sect: b[4],
            last_sect: b[5],
        })
    }

    pub fn encode(&self) -> [u8; SEGMENT_SIZE] {
        let mut b = [0u8; SEGMENT_SIZE];
        b[0..4].copy_from_slice(&self.gref.to_le_bytes());
        b[4] = self.first_sect;
        b[5] = self.last_sect;
        b
    }

    /// `first_sect <= last_sect <= 7`.
    pub fn is_valid(&self) -> bool {
        self.first_sect <= self.last_sect && self.last_sect < SECTORS_PER_PAGE
    }

    /// Sectors it covers (meaningful when valid).
    pub fn sectors(&self) -> u64 {
        u64::from(self.last_sect.wrapping_sub(self.first_sect)) + 1
    }

    /// Byte offset of its first sector in the page.
    pub fn offset(&self) -> usize {
        usize::from(self.first_sect) * SECTOR_SIZE as usize
    }

    /// Bytes it covers (meaningful when valid).
    pub fn bytes(&self) -> usize {
        self.sectors() as usize * SECTOR_SIZE as usize
    }
}

/// A READ, WRITE, WRITE_BARRIER or FLUSH_DISKCACHE request. Decoding takes
/// every byte as it is; whether it makes sense is the backend's question.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub operation: u8,
    pub nr_segments: u8,
    pub handle: u16,
    pub id: u64,
    pub sector: u64,
    pub seg: [Segment; MAX_SEGMENTS],
}

impl Request {
    pub fn decode(b: &[u8; REQUEST_SIZE]) -> Self {
        let mut seg = [Segment::default(); MAX_SEGMENTS];
        for (i, s) in seg.iter_mut().enumerate() {
            let o = 24 + i * SEGMENT_SIZE;
            *s = Segment {
                gref: u32_at(b, o),
                first_sect: b[o + 4],
                last_sect: b[o + 5],
            };
        }
        Request {
            operation: b[0],
            nr_segments: b[1],
            handle: u16_at(b, 2),
            id: u64_at(b, 8),
            sector: u64_at(b, 16),
            seg,
        }
    }

    pub fn encode(&self) -> [u8; REQUEST_SIZE] {
        let mut b = [0u8; REQUEST_SIZE];
        b[0] = self.operation;
        b[1] = self.nr_segments;
        b[2..4].copy_from_slice(&self.handle.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.sector.to_le_bytes());
        for (i, s) in self.seg.iter().enumerate() {
            let o = 24 + i * SEGMENT_SIZE;
            b[o..o + SEGMENT_SIZE].copy_from_slice(&s.encode());
        }
        b
    }

    /// The segments `nr_segments` names, if it is at most 11.
    pub fn segments(&self) -> Option<&[Segment]> {
        self.seg.get(..usize::from(self.nr_segments))
    }
}

/// A response; the padding is always written as zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Response {
    pub id: u64,
    pub operation: u8,
    pub status: i16,
}

impl Response {
    pub fn decode(b: &[u8; RESPONSE_SIZE]) -> Self {
        Response {
            id: u64_at(b, 0),
            operation: b[8],
            status: u16_at(b, 10) as i16,
        }
    }

    pub fn encode(&self) -> [u8; RESPONSE_SIZE] {
        let mut b = [0u8; RESPONSE_SIZE];
        b[0..8].copy_from_slice(&self.id.to_le_bytes());
        b[8] = self.operation;
        b[10..12].copy_from_slice(&self.status.to_le_bytes());
        b
    }
}

/// A DISCARD request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscardRequest {
    pub operation: u8,
    pub flag: u8,
    pub handle: u16,
    pub id: u64,
    pub sector: u64,
    pub nr_sectors: u64,
}

impl DiscardRequest {
    pub fn decode(b: &[u8; DISCARD_SIZE]) -> Self {
        DiscardRequest {
            operation: b[0],
            flag: b[1],
            handle: u16_at(b, 2),
            id: u64_at(b, 8),
            sector: u64_at(b, 16),
            nr_sectors: u64_at(b, 24),
        }
    }

    pub fn from_entry(e: &[u8; ENTRY_SIZE]) -> Self {
        Self::decode(&prefix(e))
    }

    pub fn encode(&self) -> [u8; DISCARD_SIZE] {
        let mut b = [0u8; DISCARD_SIZE];
        b[0] = self.operation;
        b[1] = self.flag;
        b[2..4].copy_from_slice(&self.handle.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.sector.to_le_bytes());
        b[24..32].copy_from_slice(&self.nr_sectors.to_le_bytes());
        b
    }
}

/// An INDIRECT request: its segments are in the pages `indirect_grefs`
/// names, [`SEGMENTS_PER_INDIRECT_PAGE`] per page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndirectRequest {
    pub operation: u8,
    /// READ or WRITE.
    pub indirect_op: u8,
    pub nr_segments: u16,
    pub id: u64,
    pub sector: u64,
    pub handle: u16,
    pub indirect_grefs: [u32; MAX_INDIRECT_PAGES],
}

impl IndirectRequest {
    pub fn decode(b: &[u8; INDIRECT_SIZE]) -> Self {
        let mut indirect_grefs = [0u32; MAX_INDIRECT_PAGES];
        for (i, g) in indirect_grefs.iter_mut().enumerate() {
            *g = u32_at(b, 28 + 4 * i);
        }
        IndirectRequest {
            operation: b[0],
            indirect_op: b[1],
            nr_segments: u16_at(b, 2),
            id: u64_at(b, 8),
            sector: u64_at(b, 16),
            handle: u16_at(b, 24),
            indirect_grefs,
        }
    }

    pub fn from_entry(e: &[u8; ENTRY_SIZE]) -> Self {
        Self::decode(&prefix(e))
    }

    pub fn encode(&self) -> [u8; INDIRECT_SIZE] {
        let mut b = [0u8; INDIRECT_SIZE];
        b[0] = self.operation;
        b[1] = self.indirect_op;
        b[2..4].copy_from_slice(&self.nr_segments.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.sector.to_le_bytes());
        b[24..26].copy_from_slice(&self.handle.to_le_bytes());
        for (i, g) in self.indirect_grefs.iter().enumerate() {
            b[28 + 4 * i..32 + 4 * i].copy_from_slice(&g.to_le_bytes());
        }
        b
    }

    /// Indirect pages `nr_segments` segments occupy.
    pub fn pages(&self) -> usize {
        usize::from(self.nr_segments).div_ceil(SEGMENTS_PER_INDIRECT_PAGE)
    }
}

/// The id of any request slot (every layout keeps it at offset 8), so a
/// request that cannot be decoded can still be answered.
pub fn entry_id(e: &[u8; ENTRY_SIZE]) -> u64 {
    u64_at(e, 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let mut r = Request {
            operation: op::WRITE,
            nr_segments: 11,
            handle: 0x1234,
            id: 0x1122_3344_5566_7788,
            sector: 0x0102_0304_0506_0708,
            ..Request::default()
        };
        for (i, s) in r.seg.iter_mut().enumerate() {
            *s = Segment {
                gref: 0xa000 + i as u32,
                first_sect: i as u8 % 8,
                last_sect: 7,
            };
        }
        let b = r.encode();
        assert_eq!(b[0], 1);
        assert_eq!(b[1], 11);
        assert_eq!(&b[2..4], &[0x34, 0x12]);
        assert_eq!(&b[4..8], &[0; 4]);
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[24..28], &0xa000u32.to_le_bytes());
        assert_eq!(b[28], 0);
        assert_eq!(b[29], 7);
        assert_eq!(&b[104..108], &0xa00au32.to_le_bytes());
        assert_eq!(Request::decode(&b), r);
        assert_eq!(entry_id(&b), r.id);
        assert_eq!(r.segments().unwrap().len(), 11);
        r.nr_segments = 12;
        assert!(r.segments().is_none());
    }

    #[test]
    fn response_layout_zeroes_padding() {
        let r = Response {
            id: 7,
            operation: op::READ,
            status: status::EOPNOTSUPP,
        };
        let b = r.encode();
        assert_eq!(b, [7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe, 0xff, 0, 0, 0, 0]);
        assert_eq!(Response::decode(&b), r);
    }

    #[test]
    fn discard_and_indirect_layouts() {
        let d = DiscardRequest {
            operation: op::DISCARD,
            flag: discard_flags::SECURE,
            handle: 3,
            id: 9,
            sector: 100,
            nr_sectors: 8,
        };
        let b = d.encode();
        assert_eq!(&b[24..32], &8u64.to_le_bytes());
        assert_eq!(DiscardRequest::decode(&b), d);
        let mut e = [0u8; ENTRY_SIZE];
        e[..DISCARD_SIZE].copy_from_slice(&b);
        assert_eq!(DiscardRequest::from_entry(&e), d);
        assert_eq!(entry_id(&e), 9);

        let i = IndirectRequest {
            operation: op::INDIRECT,
            indirect_op: op::WRITE,
            nr_segments: 513,
            id: 0xdead,
            sector: 64,
            handle: 0x0506,
            indirect_grefs: [1, 2, 3, 4, 5, 6, 7, 8],
        };
        let b = i.encode();
        assert_eq!(&b[2..4], &513u16.to_le_bytes());
        assert_eq!(&b[24..26], &[6, 5]);
        assert_eq!(&b[28..32], &1u32.to_le_bytes());
        assert_eq!(&b[56..60], &8u32.to_le_bytes());
        assert_eq!(&b[60..64], &[0; 4]);
        assert_eq!(IndirectRequest::decode(&b), i);
        assert_eq!(i.pages(), 2);
        let mut e = [0u8; ENTRY_SIZE];
        e[..INDIRECT_SIZE].copy_from_slice(&b);
        assert_eq!(IndirectRequest::from_entry(&e), i);
    }

    #[test]
    fn segments() {
        let s = Segment {
            gref: 5,
            first_sect: 2,
            last_sect: 7,
        };
        assert!(s.is_valid());
        assert_eq!(s.sectors(), 6);
        assert_eq!(s.offset(), 1024);
        assert_eq!(s.bytes(), 3072);
        assert_eq!(Segment::decode(&s.encode()), s);
        assert!(!Segment { last_sect: 8, ..s }.is_valid());
        assert!(!Segment {
            first_sect: 3,
            last_sect: 2,
            ..s
        }
        .is_valid());
        let mut page = [0u8; 4096];
        page[4088..4096].copy_from_slice(&s.encode());
        assert_eq!(Segment::decode_at(&page, 511), Some(s));
        assert_eq!(Segment::decode_at(&page, 512), None);
        assert_eq!(Segment::decode_at(&page, usize::MAX), None);
    }
}
