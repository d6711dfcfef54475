//! netback: serves frontends' virtual network interfaces over netif rings
//! and joins them and the NIC with a switch.
//!
//! The net driver domain makes one [`Netback`] (from a [`Config`]) and
//! adds one vif per frontend ([`VifConfig`]: the frontend's domain id, its
//! MAC and IPv4 address from the manifest, and the data path):
//!
//! - [`DataPath::Copy`] (the default to choose): the hypervisor copies
//!   between the frontend's granted pages and bounce pages of the driver
//!   domain, in batches of up to [`abi::grant::MAX_BATCH`] operations.
//! - [`DataPath::Map`]: each slot's granted page is mapped into the driver
//!   domain, read or written, and unmapped.
//!
//! Everything from outside is a trait: the ring pages
//! ([`abi::ring::RingPage`]; each vif has a TX and an RX ring, both the
//! frontend's pages), the grant operations and the driver domain's memory
//! ([`Grants`]), and the NIC ([`Nic`]). The driver domain:
//!
//! - calls [`Netback::poll`] for a vif when its event channel fires, when
//!   another call's [`Poll::wake`] names it, and again while
//!   [`Poll::more`]; it sends the frontend an event when [`Poll::notify`];
//! - hands every frame the NIC received to [`Netback::nic_input`], then
//!   polls the vifs its result names.
//!
//! **TX** (frontend to switch): each slot is copied out of the ring once
//! ([`abi::ring::BackRing::take_request`]) and only that private copy is
//! looked at. Slots chain into packets ([`tx`]); a packet is refused when
//! its later slots add up to more than the first slot's size
//! ([`Reason::SlotsExceedSize`]) or the first slot cannot hold the rest
//! ([`Reason::SlotsShortOfSize`]), a slot reaches past its page
//! ([`Reason::SlotBounds`]), it has more than
//! [`abi::netif::MAX_SLOTS_PER_PACKET`] request slots, one of its ids is
//! still in flight, it carries extra-info slots, it is shorter than an
//! Ethernet header or longer than `max_frame`, or asks for checksum offload
//! (`CSUM_BLANK`; there is no offload). A refused packet's request slots
//! are answered `ERROR` (extra-info slots `NULL`). A good packet is copied
//! into private memory, then checked against its sender ([`frame`]: its
//! Ethernet source, and for IPv4 and ARP its sender, must be the vif's own
//! MAC and IPv4; only IPv4 and ARP pass) and switched ([`switch`]); a frame
//! the check or the switch refuses is answered `DROPPED`, every other
//! `OKAY`. Every slot gets exactly one response, in ring order.
//!
//! **RX** (switch to frontend): frames for a vif wait in its queue (at most
//! [`Config::rx_queue`]; past that they are dropped as
//! [`Reason::RxNoBuffer`]; a frame from the NIC waits in the NIC's receive
//! buffer only while netback holds fewer than [`Config::held_max`] of them,
//! and the vif fewer than [`Config::held_per_vif`], else in a copy) until
//! the frontend has posted enough RX requests:
//! one per page of the frame. Each request's page gets the next page of the
//! frame at offset 0; its response, written in the request's own slot,
//! carries the byte count (`MORE_DATA` on every slot of the frame but the
//! last), or `ERROR` on every slot of a frame that could not be copied in
//! (a bad grant).
//!
//! **Hostile rings.** A `req_prod` more than a ring's size past what the
//! backend has answered, or moving backwards
//! ([`abi::ring::Error::Overrun`]), ends the connection at once: nothing
//! more is read or written in its rings, both backend state words say
//! Closed ([`Conn::Closed`], [`Poll::hostile`], [`Vif::hostile`]). A
//! frontend whose state word leaves Connected is closed cleanly: the packet
//! it was in the middle of is answered `ERROR`.
//!
//! Counters per vif ([`Stats`]): frames and bytes each way, slots, drops by
//! [`Reason`], grant operations; the NIC port has its own ([`NicStats`]).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use abi::domain::VifInfo;
use abi::grant::{copy_flags, CopyOp, CopyPtr, Status as GrantStatus, DOMID_SELF, MAX_BATCH};
use abi::netif::{
    is_group, rxf, status, Mac, RxRequest, RxResponse, MAX_FRAME, MIN_FRAME, PAGE_SIZE,
    RX_ENTRY_SIZE, RX_RING_SIZE, TX_ENTRY_SIZE, TX_RING_SIZE,
};
use abi::ring::{self, off, BackRing, RingPage, State};

pub mod frame;
pub mod switch;
pub mod tx;

#[cfg(test)]
mod tests;

pub use switch::{Forward, Port, Switch, MAX_VIFS};

/// A vif's index in its [`Netback`].
pub type VifId = usize;

/// A grant ref mapped into the driver domain: its address there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub handle: u32,
    pub addr: u64,
}

/// Grant operations, carried out by the hypervisor on the driver domain's
/// behalf (`abi::grant`), and access to the driver domain's own memory
/// (bounce pages and live mappings). The same shape as blkback's.
pub trait Grants {
    /// Map grant `gref` of domain `dom` into the driver domain; read-only if
    /// `readonly`.
    fn map(&mut self, dom: u16, gref: u32, readonly: bool) -> Result<Mapping, GrantStatus>;
    /// Undo a [`Grants::map`]; the page is unreachable when it returns.
    fn unmap(&mut self, m: Mapping) -> Result<(), GrantStatus>;
    /// Carry out `ops` (at most [`abi::grant::MAX_BATCH`]), writing each
    /// operation's status in place; `Err` if the call as a whole failed.
    fn copy(&mut self, ops: &mut [CopyOp]) -> Result<(), GrantStatus>;
    /// Copy `buf.len()` bytes of the driver domain's memory at `addr` into
    /// `buf`. netback only asks within one page it mapped with
    /// [`Grants::map`] and has not unmapped, one of its bounce pages, or a
    /// NIC buffer it was lent ([`TxBuf`]) or holds ([`RxBuf`]).
    fn read(&self, addr: u64, buf: &mut [u8]);
    /// Copy `buf` into the driver domain's memory at `addr` (same rule,
    /// writable mappings only).
    fn write(&mut self, addr: u64, buf: &[u8]);
}

/// The NIC could not take a frame now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NicBusy;

/// A transmit buffer the NIC lends netback for one frame, in the driver
/// domain's memory: netback copies a frame to `addr` (grant copies straight
/// from the frontend's pages) and then either sends it ([`Nic::submit`]) or
/// gives it back ([`Nic::release`]). Until then the NIC leaves it alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxBuf {
    /// The NIC's name for it.
    pub id: u16,
    /// Where a frame's first byte goes.
    pub addr: u64,
    /// The longest frame it holds.
    pub room: usize,
}

/// A NIC receive buffer holding a received frame at `addr` (driver domain
/// memory), which netback may keep until it has copied the frame into a
/// frontend's page ([`Netback::nic_input_held`]); the NIC leaves it alone
/// until [`Netback::take_nic_done`] hands its id back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxBuf {
    pub id: u16,
    pub addr: u64,
}

/// The physical (or virtio) NIC, shared by every vif.
pub trait Nic {
    /// Send one Ethernet frame (no FCS). `Err(NicBusy)`: it is dropped and
    /// counted ([`Reason::NicBusy`]).
    fn send(&mut self, frame: &[u8]) -> Result<(), NicBusy>;
    /// Lend a free transmit buffer; `None` if none is free now (netback
    /// then copies through its bounce pages and [`Nic::send`]s).
    fn tx_buffer(&mut self) -> Option<TxBuf>;
    /// Send the `len`-byte frame netback wrote into lent buffer `id`.
    /// `Err(NicBusy)`: dropped and counted; the buffer is free again either
    /// way once the NIC is done with it.
    fn submit(&mut self, id: u16, len: usize) -> Result<(), NicBusy>;
    /// Give back lent buffer `id` unsent.
    fn release(&mut self, id: u16);
}

/// What [`Netback::nic_input_held`] did with a frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicInput {
    /// Vifs (bit `i` for vif `i`) that got the frame queued: poll them.
    pub wake: u64,
    /// netback keeps the receive buffer: it comes back through
    /// [`Netback::take_nic_done`]; otherwise the NIC may reuse it at once.
    pub held: bool,
}

/// How data moves between a frontend's granted pages and netback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataPath {
    /// Grant copy through these page-aligned bounce pages of the driver
    /// domain (at least [`Config::pages_per_frame`]; more pages, bigger
    /// batches: 32 is a good number).
    Copy { bounce: Vec<u64> },
    /// Grant map and unmap per slot.
    Map,
}

/// One frontend's vif, as the manifest describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VifConfig {
    /// The frontend's domain id (its grant refs are looked up there).
    pub frontend: u16,
    /// The frontend's MAC: the only source it may use; frames to it are
    /// switched to it.
    pub mac: Mac,
    /// The frontend's IPv4 address: the only IPv4/ARP sender it may use.
    pub ip: [u8; 4],
    pub path: DataPath,
}

impl VifConfig {
    /// From the backend's view of a manifest vif (`peer` is the frontend).
    pub fn from_info(info: &VifInfo<'_>, path: DataPath) -> VifConfig {
        VifConfig {
            frontend: info.peer,
            mac: info.mac,
            ip: info.ip,
            path,
        }
    }
}

/// Settings of the whole switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Largest frame switched, without FCS: [`MIN_FRAME`]..=65535
    /// ([`MAX_FRAME`] = 1514 by default). A larger TX packet is refused; a
    /// larger frame from the NIC is dropped.
    pub max_frame: usize,
    /// Frames waiting per vif for RX requests.
    pub rx_queue: usize,
    /// MACs learned on the NIC port.
    pub learn: usize,
    /// Receive buffers the NIC keeps posted. netback holds at most
    /// [`Config::held_max`] of them (a quarter) in all, and one vif at most
    /// [`Config::held_per_vif`] (half of that); a frame past either is
    /// copied, so the NIC always has most of its buffers to receive into,
    /// whichever frontends stall. 0 (the default): nothing is held.
    pub nic_rx: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame: MAX_FRAME,
            rx_queue: 64,
            learn: 256,
            nic_rx: 0,
        }
    }
}

impl Config {
    /// Pages one frame can take (bounce pages, RX requests).
    pub fn pages_per_frame(&self) -> usize {
        pages_for(self.max_frame)
    }

    /// NIC receive buffers netback holds at most, over all vifs: a quarter
    /// of [`Config::nic_rx`].
    pub fn held_max(&self) -> usize {
        self.nic_rx / 4
    }

    /// NIC receive buffers one vif's queue holds at most: half of
    /// [`Config::held_max`], rounded up.
    pub fn held_per_vif(&self) -> usize {
        self.held_max().div_ceil(2)
    }
}

fn pages_for(len: usize) -> usize {
    len.div_ceil(PAGE_SIZE).max(1)
}

/// A configuration that cannot work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `max_frame` outside `MIN_FRAME..=65535`.
    MaxFrame(usize),
    /// [`MAX_VIFS`] vifs exist already.
    TooManyVifs,
    /// A vif MAC that is a group address or all zero.
    BadMac(Mac),
    /// Two vifs with one MAC.
    DuplicateMac(Mac),
    /// Two vifs with one IPv4 address.
    DuplicateIp([u8; 4]),
    BounceUnaligned(u64),
    TooFewBouncePages {
        have: usize,
        need: usize,
    },
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ConfigError::MaxFrame(n) => write!(f, "max_frame {n} outside {MIN_FRAME}..=65535"),
            ConfigError::TooManyVifs => write!(f, "more than {MAX_VIFS} vifs"),
            ConfigError::BadMac(m) => write!(f, "vif MAC {m:02x?} is a group or zero address"),
            ConfigError::DuplicateMac(m) => write!(f, "two vifs with MAC {m:02x?}"),
            ConfigError::DuplicateIp(i) => write!(f, "two vifs with IPv4 {i:?}"),
            ConfigError::BounceUnaligned(a) => write!(f, "bounce page {a:#x} not page-aligned"),
            ConfigError::TooFewBouncePages { have, need } => {
                write!(f, "{have} bounce pages, {need} needed")
            }
        }
    }
}

/// Why a frame or packet was dropped (each has its counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(usize)]
pub enum Reason {
    // TX slots; the packet's request slots are answered ERROR.
    /// The later slots' sizes add up to more than the first slot's size.
    SlotsExceedSize,
    /// The slots carry less than the first slot declares: what is left for
    /// the first slot does not fit in its page.
    SlotsShortOfSize,
    /// A slot's offset + size reaches past its page.
    SlotBounds,
    /// More request slots than `MAX_SLOTS_PER_PACKET`.
    TooManySlots,
    /// A request reuses an id whose response is not written yet.
    IdInFlight,
    /// Extra-info slots (GSO, multicast control): not supported.
    ExtraInfo,
    /// Shorter than an Ethernet header.
    Runt,
    /// Longer than `max_frame`.
    Oversize,
    /// `CSUM_BLANK`: checksum offload is not supported.
    CsumBlank,
    /// A grant copy or map of the packet failed.
    Grant,
    // The sender check and the switch; answered DROPPED.
    /// Ethernet source (or ARP sender hardware address) not the vif's.
    SpoofMac,
    /// IPv4 source (or ARP sender protocol address) not the vif's.
    SpoofIp,
    /// Neither IPv4 nor ARP.
    Ethertype,
    /// An IPv4 or ARP header too short or not IPv4-over-Ethernet.
    Malformed,
    /// A route forbids it.
    Forbidden,
    /// Nowhere to go (to the sender itself; unknown unicast from the NIC).
    NoRoute,
    // After the switch took it; the TX slots are answered OKAY.
    /// The NIC could not take it.
    NicBusy,
    // RX, counted on the receiving vif.
    /// The vif's queue was full: its frontend posts RX requests too slowly.
    RxNoBuffer,
    /// The vif is not connected.
    RxDown,
    /// Copying (or mapping) into a posted page failed; its slots answered
    /// ERROR.
    RxGrant,
}

impl Reason {
    pub const COUNT: usize = 20;
    pub const ALL: [Reason; Reason::COUNT] = [
        Reason::SlotsExceedSize,
        Reason::SlotsShortOfSize,
        Reason::SlotBounds,
        Reason::TooManySlots,
        Reason::IdInFlight,
        Reason::ExtraInfo,
        Reason::Runt,
        Reason::Oversize,
        Reason::CsumBlank,
        Reason::Grant,
        Reason::SpoofMac,
        Reason::SpoofIp,
        Reason::Ethertype,
        Reason::Malformed,
        Reason::Forbidden,
        Reason::NoRoute,
        Reason::NicBusy,
        Reason::RxNoBuffer,
        Reason::RxDown,
        Reason::RxGrant,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Reason::SlotsExceedSize => "slots-exceed-size",
            Reason::SlotsShortOfSize => "slots-short-of-size",
            Reason::SlotBounds => "slot-bounds",
            Reason::TooManySlots => "too-many-slots",
            Reason::IdInFlight => "id-in-flight",
            Reason::ExtraInfo => "extra-info",
            Reason::Runt => "runt",
            Reason::Oversize => "oversize",
            Reason::CsumBlank => "csum-blank",
            Reason::Grant => "grant",
            Reason::SpoofMac => "spoof-mac",
            Reason::SpoofIp => "spoof-ip",
            Reason::Ethertype => "ethertype",
            Reason::Malformed => "malformed",
            Reason::Forbidden => "forbidden",
            Reason::NoRoute => "no-route",
            Reason::NicBusy => "nic-busy",
            Reason::RxNoBuffer => "rx-no-buffer",
            Reason::RxDown => "rx-down",
            Reason::RxGrant => "rx-grant",
        }
    }

    /// The TX status of a packet dropped for this reason.
    pub const fn tx_status(self) -> i16 {
        match self {
            Reason::SpoofMac
            | Reason::SpoofIp
            | Reason::Ethertype
            | Reason::Malformed
            | Reason::Forbidden
            | Reason::NoRoute => status::DROPPED,
            Reason::NicBusy | Reason::RxNoBuffer | Reason::RxDown => status::OKAY,
            _ => status::ERROR,
        }
    }
}

/// Counters for one vif.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames the frontend sent that the switch took, and their bytes.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames delivered into the frontend's RX ring, and their bytes.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// TX slots taken off the ring; RX requests used.
    pub tx_slots: u64,
    pub rx_slots: u64,
    /// Drops, indexed by `Reason as usize`.
    pub drops: [u64; Reason::COUNT],
    /// Grant copy operations issued; maps and unmaps.
    pub copies: u64,
    pub maps: u64,
    pub unmaps: u64,
    pub unmap_failures: u64,
    /// Connections ended because the frontend was hostile.
    pub hostile: u64,
}

impl Stats {
    pub fn drops(&self, r: Reason) -> u64 {
        self.drops[r as usize]
    }
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// Counters for the NIC port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicStats {
    /// Frames received from the NIC ([`Netback::nic_input`]).
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames sent to the NIC.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames from the NIC dropped: `Runt`, `Oversize`, `SpoofMac` (a
    /// vif's MAC or a group address as source), `NoRoute`, `Forbidden`.
    pub drops: [u64; Reason::COUNT],
}

impl NicStats {
    pub fn drops(&self, r: Reason) -> u64 {
        self.drops[r as usize]
    }
}

/// A vif's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conn {
    /// The frontend has not set both rings' state to Connected yet.
    Waiting,
    Connected,
    /// Final: both backend state words say Closed.
    Closed,
}

/// Which ring a hostile frontend broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hostile {
    Tx(ring::Error),
    Rx(ring::Error),
}

/// What a call did that the driver domain must act on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Poll {
    /// Send the polled vif's frontend an event.
    pub notify: bool,
    /// A budget ran out with work left: poll this vif again.
    pub more: bool,
    pub connected: bool,
    /// The frontend was found hostile in this call; its connection ended.
    pub hostile: bool,
    /// The connection reached [`Conn::Closed`] in this call.
    pub closed: bool,
    /// Vifs (bit `i` for vif `i`) that got frames queued: poll them.
    pub wake: u64,
}

#[derive(Debug)]
enum PathState {
    Copy { bounce: Vec<u64> },
    Map,
}

/// One frontend's vif.
#[derive(Debug)]
pub struct Vif {
    frontend: u16,
    mac: Mac,
    ip: [u8; 4],
    path: PathState,
    conn: Conn,
    tx_ring: Option<BackRing>,
    rx_ring: Option<BackRing>,
    parser: tx::TxParser,
    queue: VecDeque<Queued>,
    /// Entries of `queue` that are [`Queued::Nic`].
    held: usize,
    hostile: Option<Hostile>,
    stats: Stats,
}

/// A frame waiting for a vif's RX requests.
#[derive(Debug)]
enum Queued {
    /// A copy of ours.
    Owned(Vec<u8>),
    /// Still in the NIC's receive buffer, which netback holds.
    Nic { buf: RxBuf, len: usize },
}

impl Queued {
    fn len(&self) -> usize {
        match self {
            Queued::Owned(f) => f.len(),
            Queued::Nic { len, .. } => *len,
        }
    }
}

/// Where a TX frame was copied to in the driver domain.
#[derive(Clone, Copy, Debug)]
enum Region {
    /// A transmit buffer the NIC lent.
    Nic(TxBuf),
    /// Consecutive bounce pages of the vif from this index on.
    Bounce(usize),
}

/// A TX frame to check and switch: bytes in hand (the map path), or in
/// the driver domain's memory.
#[derive(Clone, Copy)]
enum Src<'a> {
    Bytes(&'a [u8]),
    Local(Region),
}

impl Vif {
    pub fn frontend(&self) -> u16 {
        self.frontend
    }
    pub fn mac(&self) -> Mac {
        self.mac
    }
    pub fn ip(&self) -> [u8; 4] {
        self.ip
    }
    pub fn conn(&self) -> Conn {
        self.conn
    }
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    /// Why the connection was ended as hostile, if it was.
    pub fn hostile(&self) -> Option<Hostile> {
        self.hostile
    }
    /// Frames waiting for RX requests.
    pub fn rx_queued(&self) -> usize {
        self.queue.len()
    }
    /// Of those, frames still in a NIC receive buffer netback holds.
    pub fn rx_held(&self) -> usize {
        self.held
    }
    /// TX slots taken and not answered yet (a packet whose chain is not
    /// complete on the ring).
    pub fn tx_unanswered(&self) -> usize {
        self.parser.unanswered()
    }

    fn drop(&mut self, r: Reason) {
        self.stats.drops[r as usize] += 1;
    }
}

/// Packets whose copies (into lent NIC buffers or bounce pages) wait to
/// run. One lives in [`Netback`] and is reused by every poll (empty
/// between polls), so its vectors grow to the largest batch once and a
/// poll allocates nothing.
#[derive(Debug, Default)]
struct TxBatch {
    pkts: Vec<tx::Packet>,
    /// Per packet: where it goes and its op range.
    spans: Vec<(Region, usize, usize)>,
    ops: Vec<CopyOp>,
    pages: usize,
}

impl TxBatch {
    fn clear(&mut self) {
        self.pkts.clear();
        self.spans.clear();
        self.ops.clear();
        self.pages = 0;
    }
}

/// A frame whose copies into a frontend's pages wait to run: its RX
/// requests and copy operations are ranges of [`RxBatch::reqs`] and
/// [`RxBatch::ops`].
#[derive(Debug)]
struct RxPlan {
    reqs: (usize, usize),
    len: usize,
    ops: (usize, usize),
    /// The NIC receive buffer it is copied from, given back afterwards.
    held: Option<u16>,
}

/// Frames whose copies into a frontend's pages wait to run. Like
/// [`TxBatch`], one is reused by every poll and empty between polls.
#[derive(Debug, Default)]
struct RxBatch {
    plans: Vec<RxPlan>,
    reqs: Vec<RxRequest>,
    ops: Vec<CopyOp>,
    /// Bounce pages the plans use (from the first on).
    pages: usize,
}

impl RxBatch {
    fn clear(&mut self) {
        self.plans.clear();
        self.reqs.clear();
        self.ops.clear();
        self.pages = 0;
    }
}

/// Adds copy operations moving `len` bytes between the driver domain's
/// memory (`local(pos)`: the address of byte `pos`; consecutive within a
/// page) and a grant (`dom`'s `gref` from `offset`, which does not cross
/// its page), split wherever a local page ends. `to_grant`: the grant is
/// the destination.
fn push_copies(
    ops: &mut Vec<CopyOp>,
    local: impl Fn(usize) -> u64,
    start: usize,
    (dom, gref, offset): (u16, u32, usize),
    len: usize,
    to_grant: bool,
) {
    let mut done = 0usize;
    while done < len {
        let at = local(start + done);
        let po = (at % PAGE_SIZE as u64) as usize;
        let n = (len - done).min(PAGE_SIZE - po);
        let own = CopyPtr {
            gref_or_page: at / PAGE_SIZE as u64,
            domid: DOMID_SELF,
            offset: po as u16,
        };
        let grant = CopyPtr {
            gref_or_page: u64::from(gref),
            domid: dom,
            offset: (offset + done) as u16,
        };
        let (src, dst, flags) = if to_grant {
            (own, grant, copy_flags::DST_GREF)
        } else {
            (grant, own, copy_flags::SRC_GREF)
        };
        ops.push(CopyOp {
            src,
            dst,
            len: n as u16,
            flags,
            status: 0,
        });
        done += n;
    }
}

/// The switch, its vifs and the NIC port.
#[derive(Debug)]
pub struct Netback {
    cfg: Config,
    switch: Switch,
    vifs: Vec<Vif>,
    nic: NicStats,
    /// NIC receive buffers held and now done with ([`Netback::take_nic_done`]).
    nic_done: Vec<u16>,
    /// Receive buffers held now.
    nic_held: usize,
    /// The batches a poll fills, kept for the next poll.
    tx_batch: TxBatch,
    rx_batch: RxBatch,
}

impl Netback {
    /// TX slots one `poll` takes at most.
    pub const TX_BUDGET: u32 = 2 * TX_RING_SIZE;
    /// Frames one `poll` delivers at most.
    pub const RX_BUDGET: u32 = RX_RING_SIZE;

    pub fn new(cfg: Config) -> Result<Netback, ConfigError> {
        if cfg.max_frame < MIN_FRAME || cfg.max_frame > usize::from(u16::MAX) {
            return Err(ConfigError::MaxFrame(cfg.max_frame));
        }
        Ok(Netback {
            cfg,
            switch: Switch::new(cfg.learn),
            vifs: Vec::new(),
            nic: NicStats::default(),
            nic_done: Vec::new(),
            nic_held: 0,
            tx_batch: TxBatch::default(),
            rx_batch: RxBatch::default(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Add a frontend's vif: its port on the switch.
    pub fn add_vif(&mut self, v: VifConfig) -> Result<VifId, ConfigError> {
        if self.vifs.len() >= MAX_VIFS {
            return Err(ConfigError::TooManyVifs);
        }
        if is_group(&v.mac) || v.mac == [0; 6] {
            return Err(ConfigError::BadMac(v.mac));
        }
        if self.vifs.iter().any(|x| x.mac == v.mac) {
            return Err(ConfigError::DuplicateMac(v.mac));
        }
        if self.vifs.iter().any(|x| x.ip == v.ip) {
            return Err(ConfigError::DuplicateIp(v.ip));
        }
        let path = match v.path {
            DataPath::Map => PathState::Map,
            DataPath::Copy { bounce } => {
                if let Some(a) = bounce.iter().find(|a| *a % PAGE_SIZE as u64 != 0) {
                    return Err(ConfigError::BounceUnaligned(*a));
                }
                let need = self.cfg.pages_per_frame();
                if bounce.len() < need {
                    return Err(ConfigError::TooFewBouncePages {
                        have: bounce.len(),
                        need,
                    });
                }
                PathState::Copy { bounce }
            }
        };
        let id = self.switch.add_vif(v.mac).ok_or(ConfigError::TooManyVifs)?;
        self.vifs.push(Vif {
            frontend: v.frontend,
            mac: v.mac,
            ip: v.ip,
            path,
            conn: Conn::Waiting,
            tx_ring: None,
            rx_ring: None,
            parser: tx::TxParser::new(self.cfg.max_frame),
            queue: VecDeque::new(),
            held: 0,
            hostile: None,
            stats: Stats::default(),
        });
        Ok(id)
    }

    pub fn vifs(&self) -> usize {
        self.vifs.len()
    }
    pub fn vif(&self, id: VifId) -> Option<&Vif> {
        self.vifs.get(id)
    }
    /// The vif whose frontend is domain `dom` (the first, if several).
    pub fn vif_of_domain(&self, dom: u16) -> Option<VifId> {
        self.vifs.iter().position(|v| v.frontend == dom)
    }
    pub fn switch(&self) -> &Switch {
        &self.switch
    }
    pub fn nic_stats(&self) -> &NicStats {
        &self.nic
    }
    /// Allow or forbid frames from one port to another (see [`switch`]).
    pub fn set_route(&mut self, from: Port, to: Port, allowed: bool) {
        self.switch.set_route(from, to, allowed);
    }

    /// Look at vif `id`'s rings: connect, take and switch TX packets,
    /// deliver queued frames into RX, close. `tx` and `rx` are its
    /// frontend's TX and RX ring pages.
    pub fn poll<T, R, G, N>(
        &mut self,
        id: VifId,
        tx: &mut T,
        rx: &mut R,
        grants: &mut G,
        nic: &mut N,
    ) -> Poll
    where
        T: RingPage + ?Sized,
        R: RingPage + ?Sized,
        G: Grants,
        N: Nic,
    {
        let mut out = Poll::default();
        let Some(v) = self.vifs.get_mut(id) else {
            return out;
        };
        if v.conn == Conn::Waiting {
            if ring::front_state(tx) != Some(State::Connected)
                || ring::front_state(rx) != Some(State::Connected)
            {
                return out;
            }
            let t = BackRing::attach(tx, TX_ENTRY_SIZE);
            let r = BackRing::attach(rx, RX_ENTRY_SIZE);
            t.set_state(tx, State::Connected);
            r.set_state(rx, State::Connected);
            v.tx_ring = Some(t);
            v.rx_ring = Some(r);
            v.conn = Conn::Connected;
            out.connected = true;
            out.notify = true;
        }
        if v.conn != Conn::Connected {
            return out;
        }
        if ring::front_state(tx) != Some(State::Connected)
            || ring::front_state(rx) != Some(State::Connected)
        {
            self.close_vif(id, tx, rx, &mut out);
            return out;
        }
        self.run_tx(id, tx, rx, grants, nic, &mut out);
        if self.vifs[id].conn == Conn::Connected {
            self.run_rx(id, tx, rx, grants, &mut out);
        }
        out
    }

    /// End vif `id`'s connection from the driver domain's side: the packet
    /// it was reading is answered ERROR, queued frames dropped, both state
    /// words Closed.
    pub fn close<T, R>(&mut self, id: VifId, tx: &mut T, rx: &mut R) -> Poll
    where
        T: RingPage + ?Sized,
        R: RingPage + ?Sized,
    {
        let mut out = Poll::default();
        if self.vifs.get(id).is_some_and(|v| v.conn != Conn::Closed) {
            self.close_vif(id, tx, rx, &mut out);
        }
        out
    }

    /// A frame the NIC received: learn its source, switch it. Returns the
    /// vifs that got it queued (poll them). The frame is copied.
    pub fn nic_input(&mut self, f: &[u8]) -> u64 {
        self.input_from_nic(f, None).wake
    }

    /// [`Netback::nic_input`] of a frame still in the NIC's receive buffer
    /// `buf`: a frame for one vif on the copy path is kept there (`held`;
    /// within the limits of [`Config::nic_rx`], else copied) and copied
    /// straight into the frontend's page; netback gives the
    /// buffer back through [`Netback::take_nic_done`] once it has been
    /// copied or dropped.
    pub fn nic_input_held(&mut self, f: &[u8], buf: RxBuf) -> NicInput {
        self.input_from_nic(f, Some(buf))
    }

    /// The next NIC receive buffer netback held and is done with.
    pub fn take_nic_done(&mut self) -> Option<u16> {
        let id = self.nic_done.pop()?;
        self.nic_held -= 1;
        Some(id)
    }

    /// NIC receive buffers netback holds (not yet handed back).
    pub fn nic_held(&self) -> usize {
        self.nic_held
    }

    fn input_from_nic(&mut self, f: &[u8], buf: Option<RxBuf>) -> NicInput {
        self.nic.rx_frames += 1;
        self.nic.rx_bytes += f.len() as u64;
        let bad = if f.len() < MIN_FRAME {
            Some(Reason::Runt)
        } else if f.len() > self.cfg.max_frame {
            Some(Reason::Oversize)
        } else {
            let src = frame::src(f);
            // A group source, or one of our vifs' MACs, is not a station
            // on the wire: someone there is impersonating a frontend.
            if is_group(&src) || self.switch.vif_of(&src).is_some() {
                Some(Reason::SpoofMac)
            } else {
                None
            }
        };
        let mut out = NicInput::default();
        if let Some(r) = bad {
            self.nic.drops[r as usize] += 1;
            return out;
        }
        self.switch.learn(frame::src(f));
        let wake = &mut out.wake;
        match self.switch.forward(Port::Nic, &frame::dst(f)) {
            Forward::To(Port::Vif(j)) => match buf {
                Some(b) if self.can_hold(j) => {
                    let v = &mut self.vifs[j];
                    v.queue.push_back(Queued::Nic {
                        buf: b,
                        len: f.len(),
                    });
                    v.held += 1;
                    self.nic_held += 1;
                    *wake |= 1 << j;
                    out.held = true;
                }
                _ => self.enqueue(j, f, wake),
            },
            Forward::Flood { vifs, .. } => {
                for j in 0..self.vifs.len() {
                    if vifs & (1 << j) != 0 {
                        self.enqueue(j, f, wake);
                    }
                }
            }
            Forward::Drop(r) => self.nic.drops[r as usize] += 1,
            Forward::To(Port::Nic) => self.nic.drops[Reason::NoRoute as usize] += 1,
        }
        out
    }

    /// Whether a frame for vif `j` may wait in a NIC receive buffer: the
    /// vif copies (the map path writes from our own copy), is connected and
    /// has room in its queue, and neither netback as a whole nor this vif
    /// holds its share of the NIC's receive buffers already (a frontend
    /// that posts no RX requests must not starve the NIC, and with it every
    /// other vif). Otherwise the frame is copied and the buffer goes back
    /// at once.
    fn can_hold(&self, j: VifId) -> bool {
        self.nic_held < self.cfg.held_max()
            && self.vifs.get(j).is_some_and(|v| {
                matches!(v.path, PathState::Copy { .. })
                    && v.conn == Conn::Connected
                    && v.queue.len() < self.cfg.rx_queue
                    && v.held < self.cfg.held_per_vif()
            })
    }

    fn enqueue(&mut self, j: VifId, f: &[u8], wake: &mut u64) {
        let Some(v) = self.vifs.get_mut(j) else {
            return;
        };
        if v.conn != Conn::Connected {
            v.drop(Reason::RxDown);
        } else if v.queue.len() >= self.cfg.rx_queue {
            v.drop(Reason::RxNoBuffer);
        } else {
            v.queue.push_back(Queued::Owned(f.to_vec()));
            *wake |= 1 << j;
        }
    }

    /// Reads `buf.len()` bytes from byte `pos` on of a frame in the driver
    /// domain's memory, a page at a time.
    fn read_local<G: Grants>(&self, id: VifId, r: Region, pos: usize, buf: &mut [u8], grants: &G) {
        let mut done = 0;
        while done < buf.len() {
            let at = self.local_addr(id, r, pos + done);
            let n = (buf.len() - done).min(PAGE_SIZE - (at % PAGE_SIZE as u64) as usize);
            grants.read(at, &mut buf[done..done + n]);
            done += n;
        }
    }

    /// The address of byte `pos` of a frame in region `r` of vif `id`.
    fn local_addr(&self, id: VifId, r: Region, pos: usize) -> u64 {
        match r {
            Region::Nic(b) => b.addr + pos as u64,
            Region::Bounce(first) => match &self.vifs[id].path {
                PathState::Copy { bounce } => {
                    bounce[first + pos / PAGE_SIZE] + (pos % PAGE_SIZE) as u64
                }
                // only copy-path vifs have bounce regions
                PathState::Map => 0,
            },
        }
    }

    /// A frame's bytes, in a new vector (for a frontend's RX queue, or the
    /// NIC when it lent no buffer).
    fn frame_bytes<G: Grants>(&self, id: VifId, src: Src<'_>, len: usize, grants: &G) -> Vec<u8> {
        match src {
            Src::Bytes(f) => f.to_vec(),
            Src::Local(r) => {
                let mut f = vec![0u8; len];
                self.read_local(id, r, 0, &mut f, grants);
                f
            }
        }
    }

    /// Sends vif `id`'s frame to the NIC: a lent buffer is submitted,
    /// anything else sent as bytes.
    fn send_nic<G: Grants, N: Nic>(
        &mut self,
        id: VifId,
        src: Src<'_>,
        len: usize,
        grants: &G,
        nic: &mut N,
    ) {
        let sent = match src {
            Src::Local(Region::Nic(b)) => nic.submit(b.id, len),
            Src::Bytes(f) => nic.send(f),
            Src::Local(r @ Region::Bounce(_)) => {
                let f = self.frame_bytes(id, Src::Local(r), len, grants);
                nic.send(&f)
            }
        };
        match sent {
            Ok(()) => {
                self.nic.tx_frames += 1;
                self.nic.tx_bytes += len as u64;
            }
            Err(NicBusy) => self.vifs[id].drop(Reason::NicBusy),
        }
    }

    /// Check a `len`-byte frame vif `id` sent and switch it; the TX status
    /// for it. A lent NIC buffer is submitted or released.
    fn switch_from<G: Grants, N: Nic>(
        &mut self,
        id: VifId,
        src: Src<'_>,
        len: usize,
        grants: &G,
        nic: &mut N,
        out: &mut Poll,
    ) -> i16 {
        let mut head = [0u8; frame::HEAD];
        let head = &mut head[..len.min(frame::HEAD)];
        match src {
            Src::Bytes(f) => head.copy_from_slice(&f[..head.len()]),
            Src::Local(r) => self.read_local(id, r, 0, head, grants),
        }
        let v = &mut self.vifs[id];
        let fwd = match frame::check_head(head, len, &v.mac, &v.ip) {
            Err(r) => Forward::Drop(r),
            Ok(()) => self.switch.forward(Port::Vif(id), &frame::dst(head)),
        };
        let mut submitted = false;
        match fwd {
            Forward::Drop(r) => {
                self.vifs[id].drop(r);
                if let Src::Local(Region::Nic(b)) = src {
                    nic.release(b.id);
                }
                return r.tx_status();
            }
            Forward::To(Port::Nic) => {
                self.send_nic(id, src, len, grants, nic);
                submitted = true;
            }
            Forward::To(Port::Vif(j)) => {
                let f = self.frame_bytes(id, src, len, grants);
                self.enqueue(j, &f, &mut out.wake);
            }
            Forward::Flood { vifs, nic: to_nic } => {
                let f = self.frame_bytes(id, src, len, grants);
                for j in 0..self.vifs.len() {
                    if vifs & (1 << j) != 0 {
                        self.enqueue(j, &f, &mut out.wake);
                    }
                }
                if to_nic {
                    self.send_nic(id, src, len, grants, nic);
                    submitted = true;
                }
            }
        }
        if let (false, Src::Local(Region::Nic(b))) = (submitted, src) {
            nic.release(b.id);
        }
        let v = &mut self.vifs[id];
        v.stats.tx_frames += 1;
        v.stats.tx_bytes += len as u64;
        status::OKAY
    }

    fn run_tx<T, R, G, N>(
        &mut self,
        id: VifId,
        tx: &mut T,
        rx: &mut R,
        grants: &mut G,
        nic: &mut N,
        out: &mut Poll,
    ) where
        T: RingPage + ?Sized,
        R: RingPage + ?Sized,
        G: Grants,
        N: Nic,
    {
        let mut batch = core::mem::take(&mut self.tx_batch);
        self.fill_tx(id, tx, rx, grants, nic, out, &mut batch);
        batch.clear();
        self.tx_batch = batch;
    }

    /// [`Netback::run_tx`] with its batch: takes slots off the TX ring,
    /// runs each full batch, answers.
    #[allow(clippy::too_many_arguments)]
    fn fill_tx<T, R, G, N>(
        &mut self,
        id: VifId,
        tx: &mut T,
        rx: &mut R,
        grants: &mut G,
        nic: &mut N,
        out: &mut Poll,
        batch: &mut TxBatch,
    ) where
        T: RingPage + ?Sized,
        R: RingPage + ?Sized,
        G: Grants,
        N: Nic,
    {
        let mut budget = Self::TX_BUDGET;
        loop {
            if budget == 0 {
                out.more = true;
                break;
            }
            let v = &mut self.vifs[id];
            let Some(r) = v.tx_ring.as_mut() else { break };
            let mut e = [0u8; TX_ENTRY_SIZE];
            let err = match r.take_request(tx, &mut e) {
                Ok(true) => None,
                // Nothing left: ask to be notified, then look once more.
                Ok(false) => match r.final_check_for_requests(tx) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(err) => Some(err),
                },
                Err(err) => Some(err),
            };
            if let Some(err) = err {
                // The batch is never copied or answered: its lent NIC
                // buffers go back.
                Self::abandon_tx(batch, nic);
                self.hostile(id, Hostile::Tx(err), tx, rx, out);
                return;
            }
            budget -= 1;
            v.stats.tx_slots += 1;
            // From here on only `e`, our private copy, is looked at.
            match v.parser.push(&e) {
                None => {}
                Some(Err(reason)) => v.drop(reason),
                Some(Ok(pkt)) => match &v.path {
                    PathState::Map => self.tx_mapped(id, pkt, grants, nic, out),
                    PathState::Copy { bounce } => {
                        let bounce_pages = bounce.len();
                        let mut lent = nic.tx_buffer();
                        if lent.is_none() && !batch.pkts.is_empty() {
                            // Sending what we have may free one.
                            self.flush_tx(id, batch, grants, nic, out);
                            lent = nic.tx_buffer();
                        }
                        let region = match lent {
                            Some(b) if pkt.len <= b.room => Region::Nic(b),
                            _ => {
                                if let Some(b) = lent {
                                    nic.release(b.id);
                                }
                                if batch.pages + pages_for(pkt.len) > bounce_pages {
                                    self.flush_tx(id, batch, grants, nic, out);
                                }
                                Region::Bounce(batch.pages)
                            }
                        };
                        self.plan_tx(id, pkt, region, batch);
                    }
                },
            }
        }
        self.flush_tx(id, batch, grants, nic, out);
        self.respond_tx(id, tx, out);
    }

    /// Drop a TX batch unrun (the ring turned hostile): every lent NIC
    /// buffer in it is given back.
    fn abandon_tx<N: Nic>(b: &mut TxBatch, nic: &mut N) {
        for (region, _, _) in b.spans.drain(..) {
            if let Region::Nic(buf) = region {
                nic.release(buf.id);
            }
        }
        b.clear();
    }

    /// Add a packet's copies (frontend slots to consecutive bytes of
    /// `region`: a lent NIC buffer, or bounce pages, split where a page
    /// ends) to the batch. `pkt` is what the vif's parser returned last:
    /// its segments are the parser's until the next push.
    fn plan_tx(&mut self, id: VifId, pkt: tx::Packet, region: Region, b: &mut TxBatch) {
        let op_start = b.ops.len();
        let frontend = self.vifs[id].frontend;
        let mut pos = 0usize;
        for s in self.vifs[id].parser.segs() {
            let n = usize::from(s.len);
            push_copies(
                &mut b.ops,
                |p| self.local_addr(id, region, p),
                pos,
                (frontend, s.gref, usize::from(s.offset)),
                n,
                false,
            );
            pos += n;
        }
        if let Region::Bounce(_) = region {
            b.pages += pages_for(pkt.len);
        }
        b.spans.push((region, op_start, b.ops.len()));
        b.pkts.push(pkt);
    }

    /// Run a TX batch's copies, then check and switch each packet.
    fn flush_tx<G: Grants, N: Nic>(
        &mut self,
        id: VifId,
        b: &mut TxBatch,
        grants: &mut G,
        nic: &mut N,
        out: &mut Poll,
    ) {
        if b.pkts.is_empty() {
            return;
        }
        self.run_copies(id, grants, &mut b.ops);
        b.pages = 0;
        for (k, (region, o0, o1)) in b.spans.iter().copied().enumerate() {
            let (first_seq, slots, len) = {
                let p = &b.pkts[k];
                (p.first_seq, p.slots, p.len)
            };
            let st = if b.ops[o0..o1]
                .iter()
                .all(|op| op.status == GrantStatus::Okay as i16)
            {
                self.switch_from(id, Src::Local(region), len, grants, nic, out)
            } else {
                if let Region::Nic(buf) = region {
                    nic.release(buf.id);
                }
                self.vifs[id].drop(Reason::Grant);
                status::ERROR
            };
            self.vifs[id].parser.resolve(first_seq, slots, st);
        }
        b.clear();
    }

    /// Map path: map each slot's page read-only, read, unmap; switch.
    fn tx_mapped<G: Grants, N: Nic>(
        &mut self,
        id: VifId,
        pkt: tx::Packet,
        grants: &mut G,
        nic: &mut N,
        out: &mut Poll,
    ) {
        let mut f = vec![0u8; pkt.len];
        let mut pos = 0usize;
        let mut ok = true;
        let segs = self.vifs[id].parser.segs().to_vec();
        for s in &segs {
            let n = usize::from(s.len);
            if n == 0 {
                continue;
            }
            let v = &mut self.vifs[id];
            v.stats.maps += 1;
            match grants.map(v.frontend, s.gref, true) {
                Ok(m) => {
                    grants.read(m.addr + u64::from(s.offset), &mut f[pos..pos + n]);
                    self.unmap(id, grants, m);
                }
                Err(_) => {
                    ok = false;
                    break;
                }
            }
            pos += n;
        }
        let st = if ok {
            self.switch_from(id, Src::Bytes(&f), f.len(), grants, nic, out)
        } else {
            self.vifs[id].drop(Reason::Grant);
            status::ERROR
        };
        self.vifs[id].parser.resolve(pkt.first_seq, pkt.slots, st);
    }

    fn unmap<G: Grants>(&mut self, id: VifId, grants: &mut G, m: Mapping) {
        let v = &mut self.vifs[id];
        v.stats.unmaps += 1;
        if grants.unmap(m).is_err() {
            v.stats.unmap_failures += 1;
        }
    }

    /// Issue copies in batches; a failed call fails its whole batch.
    fn run_copies<G: Grants>(&mut self, id: VifId, grants: &mut G, ops: &mut [CopyOp]) {
        for chunk in ops.chunks_mut(MAX_BATCH as usize) {
            for op in chunk.iter_mut() {
                // an implementation that leaves a status unwritten fails
                op.status = GrantStatus::General as i16;
            }
            self.vifs[id].stats.copies += chunk.len() as u64;
            if grants.copy(chunk).is_err() {
                for op in chunk.iter_mut() {
                    op.status = GrantStatus::General as i16;
                }
            }
        }
    }

    /// Write the decided TX responses, in ring order, and publish them.
    fn respond_tx<T: RingPage + ?Sized>(&mut self, id: VifId, tx: &mut T, out: &mut Poll) {
        let v = &mut self.vifs[id];
        let Some(r) = v.tx_ring.as_mut() else { return };
        let mut any = false;
        while let Some(rsp) = v.parser.take_ready() {
            // one pending response per slot taken, so this cannot be Full
            if r.put_response(tx, &rsp.encode()).is_ok() {
                any = true;
            }
        }
        if any {
            out.notify |= r.push_responses(tx);
        }
    }

    fn run_rx<T, R, G>(&mut self, id: VifId, tx: &mut T, rx: &mut R, grants: &mut G, out: &mut Poll)
    where
        T: RingPage + ?Sized,
        R: RingPage + ?Sized,
        G: Grants,
    {
        // A hostile RX producer index is caught even with nothing to send.
        if let Some(Err(err)) = self.vifs[id]
            .rx_ring
            .as_ref()
            .map(|r| r.unconsumed_requests(rx))
        {
            self.hostile(id, Hostile::Rx(err), tx, rx, out);
            return;
        }
        let mut batch = core::mem::take(&mut self.rx_batch);
        self.fill_rx(id, tx, rx, grants, out, &mut batch);
        batch.clear();
        self.rx_batch = batch;
    }

    /// [`Netback::run_rx`] with its batch: takes RX requests for the
    /// queued frames, runs each full batch, answers.
    fn fill_rx<T, R, G>(
        &mut self,
        id: VifId,
        tx: &mut T,
        rx: &mut R,
        grants: &mut G,
        out: &mut Poll,
        b: &mut RxBatch,
    ) where
        T: RingPage + ?Sized,
        R: RingPage + ?Sized,
        G: Grants,
    {
        let mut budget = Self::RX_BUDGET;
        loop {
            let v = &mut self.vifs[id];
            let Some(len) = v.queue.front().map(Queued::len) else {
                break;
            };
            if budget == 0 {
                out.more = true;
                break;
            }
            let need = pages_for(len);
            let Some(r) = v.rx_ring.as_mut() else { break };
            let avail = match r.unconsumed_requests(rx) {
                Ok(n) => n as usize,
                Err(err) => {
                    self.abandon_rx(id, b);
                    self.hostile(id, Hostile::Rx(err), tx, rx, out);
                    return;
                }
            };
            if avail < need {
                // Ask to be told when the frontend has posted enough, then
                // look again (it may have posted in between).
                rx.store_u32(off::REQ_EVENT, r.req_cons().wrapping_add(need as u32));
                rx.fence();
                match r.unconsumed_requests(rx) {
                    Ok(n) if n as usize >= need => continue,
                    Ok(_) => break,
                    Err(err) => {
                        self.abandon_rx(id, b);
                        self.hostile(id, Hostile::Rx(err), tx, rx, out);
                        return;
                    }
                }
            }
            let owned = matches!(v.queue.front(), Some(Queued::Owned(_)));
            if let (PathState::Copy { bounce }, true) = (&v.path, owned) {
                if b.pages + need > bounce.len() {
                    self.flush_rx(id, rx, grants, b, out);
                    continue;
                }
            }
            let v = &mut self.vifs[id];
            let Some(r) = v.rx_ring.as_mut() else { break };
            let r0 = b.reqs.len();
            for _ in 0..need {
                let mut e = [0u8; RX_ENTRY_SIZE];
                match r.take_request(rx, &mut e) {
                    Ok(true) => b.reqs.push(RxRequest::decode(&e)),
                    // cannot happen: `need` were available and only we
                    // consume; answer what was taken as an error
                    Ok(false) | Err(_) => break,
                }
            }
            let r1 = b.reqs.len();
            let Some(q) = v.queue.pop_front() else { break };
            if let Queued::Nic { .. } = q {
                v.held -= 1;
            }
            budget -= 1;
            v.stats.rx_slots += (r1 - r0) as u64;
            if r1 - r0 < need {
                v.drop(Reason::RxGrant);
                self.release_queued(q);
                self.respond_rx_error(id, rx, &b.reqs[r0..r1]);
                b.reqs.truncate(r0);
                continue;
            }
            let f = match q {
                Queued::Nic { buf, len } => {
                    // Straight from the NIC's receive buffer into the
                    // posted pages (a held frame's vif copies).
                    let o0 = b.ops.len();
                    let frontend = v.frontend;
                    for (k, q) in b.reqs[r0..r1].iter().enumerate() {
                        let at = k * PAGE_SIZE;
                        push_copies(
                            &mut b.ops,
                            |p| buf.addr + p as u64,
                            at,
                            (frontend, q.gref, 0),
                            (len - at).min(PAGE_SIZE),
                            true,
                        );
                    }
                    b.plans.push(RxPlan {
                        reqs: (r0, r1),
                        len,
                        ops: (o0, b.ops.len()),
                        held: Some(buf.id),
                    });
                    continue;
                }
                Queued::Owned(f) => f,
            };
            let v = &mut self.vifs[id];
            match &v.path {
                PathState::Map => {
                    self.rx_mapped(id, rx, grants, &f, &b.reqs[r0..r1]);
                    b.reqs.truncate(r0);
                }
                PathState::Copy { bounce } => {
                    let o0 = b.ops.len();
                    for (k, (chunk, q)) in f.chunks(PAGE_SIZE).zip(&b.reqs[r0..r1]).enumerate() {
                        let page = bounce[b.pages + k];
                        grants.write(page, chunk);
                        b.ops.push(CopyOp {
                            src: CopyPtr {
                                gref_or_page: page / PAGE_SIZE as u64,
                                domid: DOMID_SELF,
                                offset: 0,
                            },
                            dst: CopyPtr {
                                gref_or_page: u64::from(q.gref),
                                domid: v.frontend,
                                offset: 0,
                            },
                            len: chunk.len() as u16,
                            flags: copy_flags::DST_GREF,
                            status: 0,
                        });
                    }
                    b.pages += need;
                    b.plans.push(RxPlan {
                        reqs: (r0, r1),
                        len: f.len(),
                        ops: (o0, b.ops.len()),
                        held: None,
                    });
                }
            }
        }
        self.flush_rx(id, rx, grants, b, out);
        if let Some(r) = self.vifs[id].rx_ring.as_mut() {
            out.notify |= r.push_responses(rx);
        }
    }

    /// Drop RX frames taken off the queue but not copied yet (the ring
    /// turned hostile; their requests are never answered): counted as
    /// [`Reason::RxDown`], held NIC buffers given back.
    fn abandon_rx(&mut self, id: VifId, b: &mut RxBatch) {
        for p in &b.plans {
            self.vifs[id].drop(Reason::RxDown);
            if let Some(h) = p.held {
                self.nic_done.push(h);
            }
        }
        b.clear();
    }

    /// Runs the batch's copies, answers each frame's requests (its byte
    /// counts, or ERROR if a copy failed), gives held NIC buffers back,
    /// and empties the batch.
    fn flush_rx<R: RingPage + ?Sized, G: Grants>(
        &mut self,
        id: VifId,
        rx: &mut R,
        grants: &mut G,
        b: &mut RxBatch,
        out: &mut Poll,
    ) {
        if b.plans.is_empty() {
            return;
        }
        self.run_copies(id, grants, &mut b.ops);
        for p in &b.plans {
            let ok = b.ops[p.ops.0..p.ops.1]
                .iter()
                .all(|op| op.status == GrantStatus::Okay as i16);
            if let Some(h) = p.held {
                self.nic_done.push(h);
            }
            let reqs = &b.reqs[p.reqs.0..p.reqs.1];
            if ok {
                self.respond_rx_frame(id, rx, reqs, p.len);
            } else {
                self.vifs[id].drop(Reason::RxGrant);
                self.respond_rx_error(id, rx, reqs);
            }
        }
        b.clear();
        if let Some(r) = self.vifs[id].rx_ring.as_mut() {
            out.notify |= r.push_responses(rx);
        }
    }

    /// Map path: map each posted page writable, write, unmap.
    fn rx_mapped<R: RingPage + ?Sized, G: Grants>(
        &mut self,
        id: VifId,
        rx: &mut R,
        grants: &mut G,
        f: &[u8],
        reqs: &[RxRequest],
    ) {
        let mut ok = true;
        for (chunk, q) in f.chunks(PAGE_SIZE).zip(reqs) {
            let v = &mut self.vifs[id];
            v.stats.maps += 1;
            match grants.map(v.frontend, q.gref, false) {
                Ok(m) => {
                    grants.write(m.addr, chunk);
                    self.unmap(id, grants, m);
                }
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            self.respond_rx_frame(id, rx, reqs, f.len());
        } else {
            self.vifs[id].drop(Reason::RxGrant);
            self.respond_rx_error(id, rx, reqs);
        }
    }

    /// Answer a delivered frame: each request in its own slot (they were
    /// taken in order and are answered in order), its byte count.
    fn respond_rx_frame<R: RingPage + ?Sized>(
        &mut self,
        id: VifId,
        rx: &mut R,
        reqs: &[RxRequest],
        len: usize,
    ) {
        let v = &mut self.vifs[id];
        let Some(r) = v.rx_ring.as_mut() else { return };
        let n = reqs.len();
        for (k, q) in reqs.iter().enumerate() {
            let bytes = (len - k * PAGE_SIZE).min(PAGE_SIZE);
            let rsp = RxResponse {
                id: q.id,
                offset: 0,
                flags: if k + 1 < n { rxf::MORE_DATA } else { 0 },
                status: bytes as i16,
            };
            let _ = r.put_response(rx, &rsp.encode());
        }
        v.stats.rx_frames += 1;
        v.stats.rx_bytes += len as u64;
    }

    fn respond_rx_error<R: RingPage + ?Sized>(
        &mut self,
        id: VifId,
        rx: &mut R,
        reqs: &[RxRequest],
    ) {
        let v = &mut self.vifs[id];
        let Some(r) = v.rx_ring.as_mut() else { return };
        for q in reqs {
            let rsp = RxResponse {
                id: q.id,
                offset: 0,
                flags: 0,
                status: status::ERROR,
            };
            let _ = r.put_response(rx, &rsp.encode());
        }
    }

    /// A queued frame that will not be delivered: a held NIC buffer goes
    /// back.
    fn release_queued(&mut self, q: Queued) {
        if let Queued::Nic { buf, .. } = q {
            self.nic_done.push(buf.id);
        }
    }

    /// A hostile ring: stop, answer nothing more, Closed on both rings.
    fn hostile<T, R>(&mut self, id: VifId, why: Hostile, tx: &mut T, rx: &mut R, out: &mut Poll)
    where
        T: RingPage + ?Sized,
        R: RingPage + ?Sized,
    {
        let v = &mut self.vifs[id];
        v.hostile = Some(why);
        v.stats.hostile += 1;
        v.parser.reset();
        out.hostile = true;
        self.end(id, tx, rx, out);
    }

    /// A clean close: answer the partial packet, then Closed.
    fn close_vif<T, R>(&mut self, id: VifId, tx: &mut T, rx: &mut R, out: &mut Poll)
    where
        T: RingPage + ?Sized,
        R: RingPage + ?Sized,
    {
        self.vifs[id].parser.abort();
        self.respond_tx(id, tx, out);
        self.end(id, tx, rx, out);
    }

    fn end<T, R>(&mut self, id: VifId, tx: &mut T, rx: &mut R, out: &mut Poll)
    where
        T: RingPage + ?Sized,
        R: RingPage + ?Sized,
    {
        let v = &mut self.vifs[id];
        let dropped = v.queue.len() as u64;
        let queue = core::mem::take(&mut v.queue);
        v.held = 0;
        v.stats.drops[Reason::RxDown as usize] += dropped;
        for q in queue {
            self.release_queued(q);
        }
        let v = &mut self.vifs[id];
        if let Some(r) = v.tx_ring.as_ref() {
            r.set_state(tx, State::Closed);
        }
        if let Some(r) = v.rx_ring.as_ref() {
            r.set_state(rx, State::Closed);
        }
        v.conn = Conn::Closed;
        out.closed = true;
        out.notify = true;
    }
}
