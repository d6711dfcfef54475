//! The network interface carried on two shared rings, Xen's `io/netif.h`
//! layouts (x86_64 sizes; all fields little-endian).
//!
//! ```text
//! TX request   0 u32 gref  4 u16 offset  6 u16 flags  8 u16 id  10 u16 size  = 12
//! TX response  0 u16 id    2 i16 status                                      =  4
//! extra info   0 u8 type   1 u8 flags    2 u8 data[6]                        =  8
//! RX request   0 u16 id    2 u16 pad (zero)  4 u32 gref                      =  8
//! RX response  0 u16 id    2 u16 offset  4 u16 flags  6 i16 status           =  8
//! ```
//!
//! A frontend has two rings, each one granted page: the TX ring (frontend to
//! backend frames; slots of [`TX_ENTRY_SIZE`] = 12 bytes) and the RX ring
//! (backend to frontend; slots of [`RX_ENTRY_SIZE`] = 8 bytes). Both hold
//! [`TX_RING_SIZE`] = [`RX_RING_SIZE`] = 256 slots.
//!
//! **TX.** A packet is a chain of requests linked by [`txf::MORE_DATA`]:
//! each names `size` bytes at `offset` of granted page `gref` (never past
//! the page), and the *first* request's `size` is the whole packet's length,
//! so its own bytes are that minus the later slots' sizes. A request with
//! [`txf::EXTRA_INFO`] is followed by one extra-info slot ([`ExtraInfo`],
//! chained further by [`extra_flags::MORE`]); airlock's netback does not
//! support them and drops the packet. Each request slot is answered with a
//! [`TxResponse`] carrying its id (an extra-info slot with
//! [`status::NULL`]).
//!
//! **RX.** The frontend posts empty granted pages as [`RxRequest`]s. The
//! backend copies a frame into them and answers *in the slot of the request
//! it used* with an [`RxResponse`] whose `status` is the byte count in that
//! page (or a negative status). A frame larger than one page takes several
//! requests; every response but the last has [`rxf::MORE_DATA`].
//!
//! Without xenstore there is no feature negotiation: no GSO, no multicast
//! control, no split event channels. Backends accept at least
//! [`MAX_SLOTS_PER_PACKET`] slots per packet.

use crate::ring;

pub const TX_REQUEST_SIZE: usize = 12;
pub const TX_RESPONSE_SIZE: usize = 4;
pub const EXTRA_INFO_SIZE: usize = 8;
pub const RX_REQUEST_SIZE: usize = 8;
pub const RX_RESPONSE_SIZE: usize = 8;
/// Bytes of a TX ring slot (the union of request, response, extra info).
pub const TX_ENTRY_SIZE: usize = TX_REQUEST_SIZE;
/// Bytes of an RX ring slot (the union of request and response).
pub const RX_ENTRY_SIZE: usize = RX_REQUEST_SIZE;
/// Slots in a TX ring page.
pub const TX_RING_SIZE: u32 = ring::entries(TX_ENTRY_SIZE);
/// Slots in an RX ring page.
pub const RX_RING_SIZE: u32 = ring::entries(RX_ENTRY_SIZE);

/// Most slots a backend accepts in one TX packet (Xen's
/// `XEN_NETBK_LEGACY_SLOTS_MAX`); more is dropped.
pub const MAX_SLOTS_PER_PACKET: usize = 18;
/// Bytes of a granted page; no slot reaches past it.
pub const PAGE_SIZE: usize = 4096;
/// Ethernet payload bytes.
pub const MTU: usize = 1500;
/// Ethernet header bytes (destination, source, ethertype; no VLAN tag).
pub const ETH_HEADER_SIZE: usize = 14;
/// The largest frame, without FCS.
pub const MAX_FRAME: usize = MTU + ETH_HEADER_SIZE;
/// The smallest frame worth looking at: an Ethernet header.
pub const MIN_FRAME: usize = ETH_HEADER_SIZE;

const _: () = assert!(TX_RESPONSE_SIZE <= TX_ENTRY_SIZE && EXTRA_INFO_SIZE <= TX_ENTRY_SIZE);
const _: () = assert!(RX_RESPONSE_SIZE <= RX_ENTRY_SIZE);
const _: () = assert!(TX_RING_SIZE == 256);
const _: () = assert!(RX_RING_SIZE == 256);
const _: () = assert!(MAX_FRAME == 1514);
const _: () = assert!(MAX_SLOTS_PER_PACKET <= TX_RING_SIZE as usize);
const _: () = assert!(MAX_FRAME <= PAGE_SIZE && PAGE_SIZE <= i16::MAX as usize);

/// TX request flags (`NETTXF_*`).
pub mod txf {
    /// The protocol checksum is blank (to be filled by offload).
    pub const CSUM_BLANK: u16 = 1;
    /// The protocol checksum is known good.
    pub const DATA_VALIDATED: u16 = 2;
    /// Another request of this packet follows.
    pub const MORE_DATA: u16 = 4;
    /// An extra-info slot follows this request.
    pub const EXTRA_INFO: u16 = 8;
}

/// RX response flags (`NETRXF_*`).
pub mod rxf {
    /// The protocol checksum is known good.
    pub const DATA_VALIDATED: u16 = 1;
    /// The protocol checksum is blank.
    pub const CSUM_BLANK: u16 = 2;
    /// Another response of this frame follows.
    pub const MORE_DATA: u16 = 4;
    /// An extra-info slot follows this response (airlock never sends one).
    pub const EXTRA_INFO: u16 = 8;
}

/// Extra-info types (`XEN_NETIF_EXTRA_TYPE_*`).
pub mod extra_type {
    pub const NONE: u8 = 0;
    pub const GSO: u8 = 1;
    pub const MCAST_ADD: u8 = 2;
    pub const MCAST_DEL: u8 = 3;
    pub const HASH: u8 = 4;
}

/// Extra-info flags (`XEN_NETIF_EXTRA_FLAG_*`).
pub mod extra_flags {
    /// Another extra-info slot follows.
    pub const MORE: u8 = 1;
}

/// Response status (`NETIF_RSP_*`); an RX status above 0 is a byte count.
pub mod status {
    pub const OKAY: i16 = 0;
    pub const ERROR: i16 = -1;
    pub const DROPPED: i16 = -2;
    /// The slot carried no request of its own (an extra-info slot).
    pub const NULL: i16 = 1;
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// One TX slot: `size` bytes at `offset` of granted page `gref` (the first
/// slot of a packet: `size` is the whole packet's length).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxRequest {
    pub gref: u32,
    pub offset: u16,
    pub flags: u16,
    pub id: u16,
    pub size: u16,
}

impl TxRequest {
    pub fn decode(b: &[u8; TX_REQUEST_SIZE]) -> Self {
        TxRequest {
            gref: u32_at(b, 0),
            offset: u16_at(b, 4),
            flags: u16_at(b, 6),
            id: u16_at(b, 8),
            size: u16_at(b, 10),
        }
    }

    pub fn encode(&self) -> [u8; TX_REQUEST_SIZE] {
        let mut b = [0u8; TX_REQUEST_SIZE];
        b[0..4].copy_from_slice(&self.gref.to_le_bytes());
        b[4..6].copy_from_slice(&self.offset.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..10].copy_from_slice(&self.id.to_le_bytes());
        b[10..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    pub fn more_data(&self) -> bool {
        self.flags & txf::MORE_DATA != 0
    }

    pub fn extra_info(&self) -> bool {
        self.flags & txf::EXTRA_INFO != 0
    }
}

/// The answer to one TX slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxResponse {
    pub id: u16,
    pub status: i16,
}

impl TxResponse {
    pub fn decode(b: &[u8; TX_RESPONSE_SIZE]) -> Self {
        TxResponse {
            id: u16_at(b, 0),
            status: u16_at(b, 2) as i16,
        }
    }

    pub fn encode(&self) -> [u8; TX_RESPONSE_SIZE] {
        let mut b = [0u8; TX_RESPONSE_SIZE];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.status.to_le_bytes());
        b
    }
}

/// An extra-info slot (follows a TX request with [`txf::EXTRA_INFO`]). Its
/// 6 data bytes depend on `ty` and are kept raw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtraInfo {
    pub ty: u8,
    pub flags: u8,
    pub data: [u8; 6],
}

impl ExtraInfo {
    pub fn decode(b: &[u8; EXTRA_INFO_SIZE]) -> Self {
        let mut data = [0u8; 6];
        data.copy_from_slice(&b[2..8]);
        ExtraInfo {
            ty: b[0],
            flags: b[1],
            data,
        }
    }

    pub fn encode(&self) -> [u8; EXTRA_INFO_SIZE] {
        let mut b = [0u8; EXTRA_INFO_SIZE];
        b[0] = self.ty;
        b[1] = self.flags;
        b[2..8].copy_from_slice(&self.data);
        b
    }

    pub fn more(&self) -> bool {
        self.flags & extra_flags::MORE != 0
    }
}

/// An empty page the frontend posts for the backend to fill.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxRequest {
    pub id: u16,
    pub gref: u32,
}

impl RxRequest {
    /// The padding is ignored.
    pub fn decode(b: &[u8; RX_REQUEST_SIZE]) -> Self {
        RxRequest {
            id: u16_at(b, 0),
            gref: u32_at(b, 4),
        }
    }

    /// The padding is written as zero.
    pub fn encode(&self) -> [u8; RX_REQUEST_SIZE] {
        let mut b = [0u8; RX_REQUEST_SIZE];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[4..8].copy_from_slice(&self.gref.to_le_bytes());
        b
    }
}

/// The answer to one RX request: `status` bytes at `offset` of its page
/// (when `status > 0`), or an error status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxResponse {
    pub id: u16,
    pub offset: u16,
    pub flags: u16,
    pub status: i16,
}

impl RxResponse {
    pub fn decode(b: &[u8; RX_RESPONSE_SIZE]) -> Self {
        RxResponse {
            id: u16_at(b, 0),
            offset: u16_at(b, 2),
            flags: u16_at(b, 4),
            status: u16_at(b, 6) as i16,
        }
    }

    pub fn encode(&self) -> [u8; RX_RESPONSE_SIZE] {
        let mut b = [0u8; RX_RESPONSE_SIZE];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.offset.to_le_bytes());
        b[4..6].copy_from_slice(&self.flags.to_le_bytes());
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b
    }

    pub fn more_data(&self) -> bool {
        self.flags & rxf::MORE_DATA != 0
    }

    /// Bytes delivered in this slot (0 for an error status).
    pub fn len(&self) -> usize {
        if self.status > 0 {
            self.status as usize
        } else {
            0
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A MAC address.
pub type Mac = [u8; 6];

/// The broadcast MAC.
pub const BROADCAST: Mac = [0xff; 6];

/// True for a group (broadcast or multicast) address: bit 0 of the first
/// byte.
pub const fn is_group(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes() {
        assert_eq!(TX_RING_SIZE, 256);
        assert_eq!(RX_RING_SIZE, 256);
        assert_eq!(ring::entries(TX_ENTRY_SIZE), 256);
        assert_eq!(ring::entries(RX_ENTRY_SIZE), 256);
    }

    #[test]
    fn tx_request_layout() {
        let r = TxRequest {
            gref: 0x1122_3344,
            offset: 0x0ff0,
            flags: txf::MORE_DATA | txf::CSUM_BLANK,
            id: 0xabcd,
            size: 1514,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[4..6], &[0xf0, 0x0f]);
        assert_eq!(&b[6..8], &[5, 0]);
        assert_eq!(&b[8..10], &[0xcd, 0xab]);
        assert_eq!(&b[10..12], &1514u16.to_le_bytes());
        assert_eq!(TxRequest::decode(&b), r);
        assert!(r.more_data());
        assert!(!r.extra_info());
    }

    #[test]
    fn tx_response_layout() {
        let r = TxResponse {
            id: 0x0102,
            status: status::DROPPED,
        };
        let b = r.encode();
        assert_eq!(b, [2, 1, 0xfe, 0xff]);
        assert_eq!(TxResponse::decode(&b), r);
        let n = TxResponse {
            id: 0,
            status: status::NULL,
        };
        assert_eq!(n.encode(), [0, 0, 1, 0]);
    }

    #[test]
    fn extra_info_layout() {
        let e = ExtraInfo {
            ty: extra_type::GSO,
            flags: extra_flags::MORE,
            data: [1, 2, 3, 4, 5, 6],
        };
        let b = e.encode();
        assert_eq!(b, [1, 1, 1, 2, 3, 4, 5, 6]);
        assert_eq!(ExtraInfo::decode(&b), e);
        assert!(e.more());
    }

    #[test]
    fn rx_layouts() {
        let q = RxRequest {
            id: 0x00ff,
            gref: 0xdead_beef,
        };
        let b = q.encode();
        assert_eq!(b, [0xff, 0, 0, 0, 0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(RxRequest::decode(&b), q);
        let mut dirty = b;
        dirty[2] = 0x55;
        assert_eq!(RxRequest::decode(&dirty), q);

        let r = RxResponse {
            id: 7,
            offset: 0,
            flags: rxf::MORE_DATA | rxf::DATA_VALIDATED,
            status: 4096,
        };
        let b = r.encode();
        assert_eq!(b, [7, 0, 0, 0, 5, 0, 0, 0x10]);
        assert_eq!(RxResponse::decode(&b), r);
        assert!(r.more_data());
        assert_eq!(r.len(), 4096);
        let e = RxResponse {
            status: status::ERROR,
            ..r
        };
        assert_eq!(e.len(), 0);
        assert!(e.is_empty());
    }

    #[test]
    fn group_addresses() {
        assert!(is_group(&BROADCAST));
        assert!(is_group(&[0x01, 0x00, 0x5e, 0, 0, 1]));
        assert!(is_group(&[0x33, 0x33, 0, 0, 0, 1]));
        assert!(!is_group(&[0x02, 0, 0, 0, 0, 1]));
    }
}
