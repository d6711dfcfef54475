//! Host tests: a fake hypervisor (grant tables of several frontends,
//! mappings, copies, the driver domain's bounce pages) that records every
//! access outside what was granted or mapped, a fake NIC, and frontends
//! built on `abi::ring::FrontRing`.

use super::*;
use crate::frame::build::{arp, eth, ipv4};
use abi::netif::{txf, TxRequest, TxResponse, BROADCAST, MAX_SLOTS_PER_PACKET, TX_RESPONSE_SIZE};
use abi::ring::{FrontRing, PAGE_SIZE as RING_PAGE};
use std::boxed::Box;
use std::collections::BTreeMap;
use std::format;
use std::string::String;
use std::vec;
use std::vec::Vec;

const BACK: u16 = 1;
const PG: usize = 4096;
const BOUNCE_BASE: u64 = 0x1000_0000;
const MAP_BASE: u64 = 0x8000_0000;
const HOST: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const HOST_IP: [u8; 4] = [10, 0, 0, 1];

fn mac(i: usize) -> Mac {
    [0x02, 0, 0, 0, 0, 0x10 + i as u8]
}
fn ip(i: usize) -> [u8; 4] {
    [10, 0, 0, 10 + i as u8]
}
fn dom(i: usize) -> u16 {
    3 + i as u16
}

struct Grant {
    to: u16,
    readonly: bool,
    page: usize,
}

#[derive(Clone, Copy)]
struct Mapped {
    dom: u16,
    gref: u32,
    writable: bool,
    handle: u32,
}

/// The hypervisor and the memory of every domain.
#[derive(Default)]
struct World {
    grants: BTreeMap<(u16, u32), Grant>,
    pages: Vec<Vec<u8>>,
    next_gref: BTreeMap<u16, u32>,
    maps: BTreeMap<u64, Mapped>,
    next_addr: u64,
    next_handle: u32,
    bounce: BTreeMap<u64, Vec<u8>>,
    violations: Vec<String>,
    copy_calls: u64,
    fail_copy_calls: bool,
}

impl World {
    fn new() -> World {
        World {
            next_addr: MAP_BASE,
            ..World::default()
        }
    }

    fn bounce_pages(&mut self, n: usize) -> Vec<u64> {
        let base = BOUNCE_BASE + (self.bounce.len() * PG) as u64;
        (0..n)
            .map(|i| {
                let a = base + (i * PG) as u64;
                self.bounce.insert(a, vec![0u8; PG]);
                a
            })
            .collect()
    }

    /// Domain `dom` grants a fresh page to `to`.
    fn grant(&mut self, dom: u16, to: u16, readonly: bool) -> u32 {
        let n = self.next_gref.entry(dom).or_insert(100);
        let gref = *n;
        *n += 1;
        self.pages.push(vec![0u8; PG]);
        let page = self.pages.len() - 1;
        self.grants
            .insert((dom, gref), Grant { to, readonly, page });
        gref
    }

    fn page(&mut self, dom: u16, gref: u32) -> &mut Vec<u8> {
        let p = self.grants[&(dom, gref)].page;
        &mut self.pages[p]
    }

    fn local(&mut self, addr: u64, len: usize, write: bool) -> Option<&mut [u8]> {
        let base = addr & !0xfff;
        let o = (addr & 0xfff) as usize;
        if o + len > PG {
            self.violations
                .push(format!("access {addr:#x}+{len} crosses a page"));
            return None;
        }
        if let Some(m) = self.maps.get(&base).copied() {
            if write && !m.writable {
                self.violations
                    .push(format!("write to read-only mapping {addr:#x}"));
                return None;
            }
            let p = self.grants[&(m.dom, m.gref)].page;
            return Some(&mut self.pages[p][o..o + len]);
        }
        if self.bounce.contains_key(&base) {
            return self.bounce.get_mut(&base).map(|b| &mut b[o..o + len]);
        }
        self.violations
            .push(format!("access {addr:#x}+{len}: not mapped"));
        None
    }

    fn granted(&self, p: &CopyPtr, write: bool) -> Result<usize, GrantStatus> {
        let g = self
            .grants
            .get(&(p.domid, p.gref_or_page as u32))
            .ok_or(GrantStatus::BadGntref)?;
        if p.gref_or_page > u64::from(u32::MAX) {
            return Err(GrantStatus::BadGntref);
        }
        if g.to != BACK || (write && g.readonly) {
            return Err(GrantStatus::PermissionDenied);
        }
        Ok(g.page)
    }

    fn copy_one(&mut self, op: &CopyOp) -> GrantStatus {
        if usize::from(op.src.offset) + usize::from(op.len) > PG
            || usize::from(op.dst.offset) + usize::from(op.len) > PG
        {
            self.violations.push(format!("copy crosses a page: {op:?}"));
            return GrantStatus::BadCopyArg;
        }
        let n = usize::from(op.len);
        let so = usize::from(op.src.offset);
        let data: Vec<u8> = if op.flags & copy_flags::SRC_GREF != 0 {
            match self.granted(&op.src, false) {
                Ok(p) => self.pages[p][so..so + n].to_vec(),
                Err(e) => return e,
            }
        } else {
            if op.src.domid != DOMID_SELF {
                self.violations
                    .push(format!("copy from a foreign frame {op:?}"));
                return GrantStatus::BadDomain;
            }
            match self.bounce.get(&(op.src.gref_or_page * PG as u64)) {
                Some(b) => b[so..so + n].to_vec(),
                None => {
                    self.violations.push(format!("copy from {op:?}: not ours"));
                    return GrantStatus::BadVirtAddr;
                }
            }
        };
        let d = usize::from(op.dst.offset);
        if op.flags & copy_flags::DST_GREF != 0 {
            match self.granted(&op.dst, true) {
                Ok(p) => self.pages[p][d..d + n].copy_from_slice(&data),
                Err(e) => return e,
            }
        } else {
            if op.dst.domid != DOMID_SELF {
                self.violations
                    .push(format!("copy to a foreign frame {op:?}"));
                return GrantStatus::BadDomain;
            }
            match self.bounce.get_mut(&(op.dst.gref_or_page * PG as u64)) {
                Some(b) => b[d..d + n].copy_from_slice(&data),
                None => {
                    self.violations.push(format!("copy to {op:?}: not ours"));
                    return GrantStatus::BadVirtAddr;
                }
            }
        }
        GrantStatus::Okay
    }
}

impl Grants for World {
    fn map(&mut self, dom: u16, gref: u32, readonly: bool) -> Result<Mapping, GrantStatus> {
        let g = self
            .grants
            .get(&(dom, gref))
            .ok_or(GrantStatus::BadGntref)?;
        if g.to != BACK || (!readonly && g.readonly) {
            return Err(GrantStatus::PermissionDenied);
        }
        let addr = self.next_addr;
        self.next_addr += PG as u64;
        self.next_handle += 1;
        self.maps.insert(
            addr,
            Mapped {
                dom,
                gref,
                writable: !readonly,
                handle: self.next_handle,
            },
        );
        Ok(Mapping {
            handle: self.next_handle,
            addr,
        })
    }

    fn unmap(&mut self, m: Mapping) -> Result<(), GrantStatus> {
        match self.maps.get(&m.addr) {
            Some(x) if x.handle == m.handle => {
                self.maps.remove(&m.addr);
                Ok(())
            }
            _ => {
                self.violations.push(format!("bad unmap {m:?}"));
                Err(GrantStatus::BadHandle)
            }
        }
    }

    fn copy(&mut self, ops: &mut [CopyOp]) -> Result<(), GrantStatus> {
        self.copy_calls += 1;
        if ops.len() > MAX_BATCH as usize {
            self.violations.push(format!("copy batch of {}", ops.len()));
            return Err(GrantStatus::General);
        }
        if self.fail_copy_calls {
            return Err(GrantStatus::General);
        }
        for op in ops.iter_mut() {
            op.status = self.copy_one(op) as i16;
        }
        Ok(())
    }

    fn read(&self, addr: u64, buf: &mut [u8]) {
        // `local` records violations, which needs `&mut`; reads go through
        // a shared lookup of the same rules.
        let base = addr & !0xfff;
        let o = (addr & 0xfff) as usize;
        assert!(
            o + buf.len() <= PG,
            "read {addr:#x}+{} crosses a page",
            buf.len()
        );
        if let Some(m) = self.maps.get(&base) {
            let p = self.grants[&(m.dom, m.gref)].page;
            buf.copy_from_slice(&self.pages[p][o..o + buf.len()]);
        } else if let Some(b) = self.bounce.get(&base) {
            buf.copy_from_slice(&b[o..o + buf.len()]);
        } else {
            panic!("read {addr:#x}: not mapped");
        }
    }

    fn write(&mut self, addr: u64, buf: &[u8]) {
        if let Some(m) = self.local(addr, buf.len(), true) {
            m.copy_from_slice(buf);
        }
    }
}

/// Bytes of a fake NIC transmit buffer (two to a page of the world).
const NIC_BUF: usize = 2048;
/// Offset of a frame in its buffer (a virtio-net header before it), so a
/// frame may cross no page (1514 + 12 < 2048).
const NIC_HDR: usize = 12;

/// A NIC that lends transmit buffers in the world's memory (if `lend` has
/// any) and keeps what it sends; `submitted` frames are read out of the
/// world by [`FakeNic::collect`].
#[derive(Default)]
struct FakeNic {
    sent: Vec<Vec<u8>>,
    busy: bool,
    /// Free lendable buffers (their addresses).
    lend: Vec<u64>,
    /// Lent and not back.
    lent: BTreeMap<u16, u64>,
    /// Submitted, not read out of the world yet: address and length.
    submitted: Vec<(u64, usize)>,
    /// Lent buffers given back unsent.
    released: u64,
}

impl FakeNic {
    /// With `pages` pages of transmit buffers in `w`'s memory.
    fn lending(w: &mut World, pages: usize) -> FakeNic {
        let lend = w
            .bounce_pages(pages)
            .into_iter()
            .flat_map(|p| [p, p + NIC_BUF as u64])
            .rev()
            .collect();
        FakeNic {
            lend,
            ..FakeNic::default()
        }
    }

    /// Reads the submitted frames out of the world into `sent` and frees
    /// their buffers (the device is done with them).
    fn collect(&mut self, w: &World) {
        for (addr, len) in core::mem::take(&mut self.submitted) {
            let mut f = vec![0u8; len];
            w.read(addr + NIC_HDR as u64, &mut f);
            self.sent.push(f);
            self.lend.push(addr);
        }
    }
}

impl Nic for FakeNic {
    fn send(&mut self, frame: &[u8]) -> Result<(), NicBusy> {
        if self.busy {
            return Err(NicBusy);
        }
        self.sent.push(frame.to_vec());
        Ok(())
    }

    fn tx_buffer(&mut self) -> Option<TxBuf> {
        let addr = self.lend.pop()?;
        let id = (0..=u16::MAX).find(|i| !self.lent.contains_key(i))?;
        self.lent.insert(id, addr);
        Some(TxBuf {
            id,
            addr: addr + NIC_HDR as u64,
            room: NIC_BUF - NIC_HDR,
        })
    }

    fn submit(&mut self, id: u16, len: usize) -> Result<(), NicBusy> {
        let addr = self.lent.remove(&id).expect("submit of a buffer not lent");
        assert!(len <= NIC_BUF - NIC_HDR);
        if self.busy {
            self.lend.push(addr);
            return Err(NicBusy);
        }
        self.submitted.push((addr, len));
        Ok(())
    }

    fn release(&mut self, id: u16) {
        let addr = self.lent.remove(&id).expect("release of a buffer not lent");
        self.lend.push(addr);
        self.released += 1;
    }
}

type Page = Box<[u8; RING_PAGE]>;

/// A frontend: its two ring pages and its side of them.
struct Front {
    dom: u16,
    tx: Page,
    rx: Page,
    txr: FrontRing,
    rxr: FrontRing,
    next_id: u16,
    /// Posted RX requests by id: the page's gref.
    posted: BTreeMap<u16, u32>,
    /// TX requests sent and not answered, by id.
    sent: BTreeMap<u16, u32>,
    /// Frames received (reassembled).
    frames: Vec<Vec<u8>>,
    partial: Vec<u8>,
    tx_rsp: Vec<TxResponse>,
    rx_errors: u64,
}

impl Front {
    fn new(i: usize, start: u32) -> Front {
        let mut tx: Page = Box::new([0u8; RING_PAGE]);
        let mut rx: Page = Box::new([0u8; RING_PAGE]);
        let txr = FrontRing::init_at(&mut *tx, TX_ENTRY_SIZE, start);
        let rxr = FrontRing::init_at(&mut *rx, RX_ENTRY_SIZE, start);
        Front {
            dom: dom(i),
            tx,
            rx,
            txr,
            rxr,
            next_id: 0,
            posted: BTreeMap::new(),
            sent: BTreeMap::new(),
            frames: Vec::new(),
            partial: Vec::new(),
            tx_rsp: Vec::new(),
            rx_errors: 0,
        }
    }

    fn connect(&mut self) {
        self.txr.set_state(&mut *self.tx, State::Connected);
        self.rxr.set_state(&mut *self.rx, State::Connected);
    }

    fn id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }
}

/// The driver domain: netback, the world, the NIC, and the frontends.
struct H {
    nb: Netback,
    w: World,
    nic: FakeNic,
    f: Vec<Front>,
}

impl H {
    fn new(n: usize, copy: bool) -> H {
        H::with(n, copy, Config::default(), 0)
    }

    fn with(n: usize, copy: bool, cfg: Config, start: u32) -> H {
        let mut h = H {
            nb: Netback::new(cfg).unwrap(),
            w: World::new(),
            nic: FakeNic::default(),
            f: Vec::new(),
        };
        h.nic = FakeNic::lending(&mut h.w, 4);
        for i in 0..n {
            let path = if copy {
                DataPath::Copy {
                    bounce: h.w.bounce_pages(8 * cfg.pages_per_frame()),
                }
            } else {
                DataPath::Map
            };
            let id =
                h.nb.add_vif(VifConfig {
                    frontend: dom(i),
                    mac: mac(i),
                    ip: ip(i),
                    path,
                })
                .unwrap();
            assert_eq!(id, i);
            let mut fr = Front::new(i, start);
            fr.connect();
            h.f.push(fr);
        }
        for i in 0..n {
            let p = h.poll(i);
            assert!(p.connected);
        }
        h
    }

    fn poll(&mut self, i: usize) -> Poll {
        let f = &mut self.f[i];
        let p = self
            .nb
            .poll(i, &mut *f.tx, &mut *f.rx, &mut self.w, &mut self.nic);
        assert!(self.nic.lent.is_empty(), "a lent buffer kept past a poll");
        self.nic.collect(&self.w);
        p
    }

    /// Poll every vif until nothing is left to do; collect responses.
    fn settle(&mut self) {
        for _ in 0..64 {
            let mut again = false;
            for i in 0..self.f.len() {
                let p = self.poll(i);
                again |= p.more || p.wake != 0;
            }
            for i in 0..self.f.len() {
                self.collect(i);
            }
            if !again {
                return;
            }
        }
        panic!("never settled");
    }

    fn collect(&mut self, i: usize) {
        let f = &mut self.f[i];
        let mut b = [0u8; TX_RESPONSE_SIZE];
        while let Ok(true) = f.txr.take_response(&*f.tx, &mut b) {
            let r = TxResponse::decode(&b);
            f.sent.remove(&r.id);
            f.tx_rsp.push(r);
        }
        let mut b = [0u8; RX_ENTRY_SIZE];
        while let Ok(true) = f.rxr.take_response(&*f.rx, &mut b) {
            let r = RxResponse::decode(&b);
            let Some(gref) = f.posted.remove(&r.id) else {
                panic!("RX response for id {} never posted", r.id);
            };
            if r.status < 0 {
                f.rx_errors += 1;
                f.partial.clear();
                continue;
            }
            let o = usize::from(r.offset);
            let data = self.w.page(f.dom, gref)[o..o + r.len()].to_vec();
            f.partial.extend_from_slice(&data);
            if !r.more_data() {
                f.frames.push(core::mem::take(&mut f.partial));
            }
        }
    }

    /// Post `n` RX pages granted writable to the backend.
    fn post(&mut self, i: usize, n: usize) {
        for _ in 0..n {
            let d = self.f[i].dom;
            let gref = self.w.grant(d, BACK, false);
            self.post_gref(i, gref);
        }
    }

    fn post_gref(&mut self, i: usize, gref: u32) {
        let f = &mut self.f[i];
        let id = f.id();
        f.posted.insert(id, gref);
        let q = RxRequest { id, gref };
        f.rxr.put_request(&mut *f.rx, &q.encode()).unwrap();
        f.rxr.push_requests(&mut *f.rx);
    }

    /// Put raw TX requests on vif `i`'s ring and publish them.
    fn put(&mut self, i: usize, reqs: &[TxRequest]) {
        let f = &mut self.f[i];
        for r in reqs {
            f.sent.insert(r.id, r.gref);
            f.txr.put_request(&mut *f.tx, &r.encode()).unwrap();
        }
        f.txr.push_requests(&mut *f.tx);
    }

    /// Put a frame in a granted page at `offset`; one TX request for it.
    fn frame_req(&mut self, i: usize, frame: &[u8], offset: u16) -> TxRequest {
        let d = self.f[i].dom;
        let gref = self.w.grant(d, BACK, true);
        let o = usize::from(offset);
        self.w.page(d, gref)[o..o + frame.len()].copy_from_slice(frame);
        let id = self.f[i].id();
        TxRequest {
            gref,
            offset,
            flags: 0,
            id,
            size: frame.len() as u16,
        }
    }

    /// Send a frame from vif `i` in one slot and settle; its TX status.
    fn send(&mut self, i: usize, frame: &[u8]) -> i16 {
        let r = self.frame_req(i, frame, 64);
        self.put(i, &[r]);
        self.settle();
        let rsp = self.f[i].tx_rsp.pop().expect("no TX response");
        assert_eq!(rsp.id, r.id);
        rsp.status
    }

    /// Send a frame from vif `i` split into slots of these sizes, each in
    /// its own page at `offset`.
    fn send_split(&mut self, i: usize, frame: &[u8], sizes: &[usize], offset: u16) -> Vec<i16> {
        assert_eq!(sizes.iter().sum::<usize>(), frame.len());
        let mut reqs = Vec::new();
        let mut pos = 0;
        for (k, n) in sizes.iter().enumerate() {
            let mut r = self.frame_req(i, &frame[pos..pos + n], offset);
            pos += n;
            if k == 0 {
                r.size = frame.len() as u16;
            }
            if k + 1 < sizes.len() {
                r.flags |= txf::MORE_DATA;
            }
            reqs.push(r);
        }
        self.put(i, &reqs);
        self.settle();
        let n = self.f[i].tx_rsp.len();
        self.f[i]
            .tx_rsp
            .split_off(n - sizes.len())
            .iter()
            .map(|r| r.status)
            .collect()
    }

    fn assert_clean(&self) {
        assert!(self.w.violations.is_empty(), "{:?}", self.w.violations);
        assert!(
            self.w.maps.is_empty(),
            "mappings left: {}",
            self.w.maps.len()
        );
    }
}

fn both() -> [bool; 2] {
    [true, false]
}

fn udp(from: usize, to: usize, body: &[u8]) -> Vec<u8> {
    ipv4(mac(to), mac(from), ip(from), ip(to), body)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn waits_for_both_rings_to_connect() {
    let mut nb = Netback::new(Config::default()).unwrap();
    let mut w = World::new();
    let mut nic = FakeNic::default();
    let bounce = w.bounce_pages(4);
    nb.add_vif(VifConfig {
        frontend: 3,
        mac: mac(0),
        ip: ip(0),
        path: DataPath::Copy { bounce },
    })
    .unwrap();
    let mut f = Front::new(0, 0);
    assert_eq!(
        nb.poll(0, &mut *f.tx, &mut *f.rx, &mut w, &mut nic),
        Poll::default()
    );
    f.txr.set_state(&mut *f.tx, State::Connected);
    assert_eq!(
        nb.poll(0, &mut *f.tx, &mut *f.rx, &mut w, &mut nic),
        Poll::default()
    );
    assert_eq!(nb.vif(0).unwrap().conn(), Conn::Waiting);
    f.rxr.set_state(&mut *f.rx, State::Connected);
    let p = nb.poll(0, &mut *f.tx, &mut *f.rx, &mut w, &mut nic);
    assert!(p.connected && p.notify);
    assert_eq!(f.txr.peer_state(&*f.tx), Some(State::Connected));
    assert_eq!(f.rxr.peer_state(&*f.rx), Some(State::Connected));
    assert_eq!(nb.vif(0).unwrap().conn(), Conn::Connected);
    // frames for a vif that is not connected are dropped
    let mut nb2 = Netback::new(Config::default()).unwrap();
    nb2.add_vif(VifConfig {
        frontend: 4,
        mac: mac(1),
        ip: ip(1),
        path: DataPath::Map,
    })
    .unwrap();
    assert_eq!(nb2.nic_input(&udp(0, 1, b"x")), 0);
    assert_eq!(nb2.vif(0).unwrap().stats().drops(Reason::RxDown), 1);
}

#[test]
fn guest_to_guest_unicast() {
    for copy in both() {
        let mut h = H::new(3, copy);
        h.post(1, 4);
        h.post(2, 4);
        let f = udp(0, 1, &pattern(1000, 7));
        assert_eq!(h.send(0, &f), status::OKAY);
        assert_eq!(h.f[1].frames, vec![f.clone()]);
        assert!(h.f[2].frames.is_empty(), "isolation");
        assert!(h.nic.sent.is_empty());
        let s0 = *h.nb.vif(0).unwrap().stats();
        let s1 = *h.nb.vif(1).unwrap().stats();
        assert_eq!((s0.tx_frames, s0.tx_bytes), (1, f.len() as u64));
        assert_eq!(
            (s1.rx_frames, s1.rx_bytes, s1.rx_slots),
            (1, f.len() as u64, 1)
        );
        assert_eq!(s0.total_drops() + s1.total_drops(), 0);
        if copy {
            assert!(s0.copies >= 1 && s1.copies >= 1);
        } else {
            assert_eq!((s0.maps, s0.unmaps, s1.maps, s1.unmaps), (1, 1, 1, 1));
        }
        h.assert_clean();
    }
}

#[test]
fn arp_broadcast_floods_and_the_reply_is_unicast() {
    for copy in both() {
        let mut h = H::new(3, copy);
        for i in 0..3 {
            h.post(i, 4);
        }
        let req = arp(BROADCAST, mac(0), 1, mac(0), ip(0), ip(1));
        assert_eq!(h.send(0, &req), status::OKAY);
        assert_eq!(h.f[1].frames, vec![req.clone()]);
        assert_eq!(h.f[2].frames, vec![req.clone()]);
        assert!(h.f[0].frames.is_empty(), "no echo to the sender");
        assert_eq!(h.nic.sent, vec![req.clone()]);
        let rep = arp(mac(0), mac(1), 2, mac(1), ip(1), ip(0));
        assert_eq!(h.send(1, &rep), status::OKAY);
        assert_eq!(h.f[0].frames, [rep]);
        assert_eq!(h.f[2].frames.len(), 1);
        assert_eq!(h.nic.sent.len(), 1);
        // multicast floods too
        let m = ipv4(
            [0x01, 0, 0x5e, 0, 0, 9],
            mac(2),
            ip(2),
            [224, 0, 0, 9],
            b"m",
        );
        assert_eq!(h.send(2, &m), status::OKAY);
        assert_eq!(h.f[0].frames.len(), 2);
        assert_eq!(h.f[1].frames.len(), 2);
        assert_eq!(h.nic.sent.len(), 2);
        h.assert_clean();
    }
}

#[test]
fn nic_port_learning_and_unknown_unicast() {
    let mut h = H::new(2, true);
    h.post(0, 4);
    h.post(1, 4);
    // unknown unicast from a frontend goes to the NIC only
    let out = ipv4(HOST, mac(0), ip(0), HOST_IP, b"to the host");
    assert_eq!(h.send(0, &out), status::OKAY);
    assert_eq!(h.nic.sent, [out]);
    assert!(h.f[1].frames.is_empty());
    assert_eq!(h.nb.switch().lookup(&HOST), None);
    // a frame from the host: learned, delivered to the vif it names only
    let back = ipv4(mac(1), HOST, HOST_IP, ip(1), b"from the host");
    assert_eq!(h.nb.nic_input(&back), 0b10);
    h.settle();
    assert_eq!(h.f[1].frames, [back]);
    assert!(h.f[0].frames.is_empty());
    assert_eq!(h.nb.switch().lookup(&HOST), Some(Port::Nic));
    // unknown unicast from the NIC is not flooded to the frontends
    let stray = ipv4([0x02, 9, 9, 9, 9, 9], HOST, HOST_IP, [10, 0, 0, 99], b"");
    assert_eq!(h.nb.nic_input(&stray), 0);
    assert_eq!(h.nb.nic_stats().drops(Reason::NoRoute), 1);
    // broadcast from the NIC reaches every vif
    let b = arp(BROADCAST, HOST, 1, HOST, HOST_IP, ip(0));
    assert_eq!(h.nb.nic_input(&b), 0b11);
    h.settle();
    assert_eq!(h.f[0].frames.len(), 1);
    assert_eq!(h.f[1].frames.len(), 2);
    // the wire cannot pose as a frontend, and a vif MAC is never learned
    let fake = ipv4(mac(1), mac(0), ip(0), ip(1), b"");
    assert_eq!(h.nb.nic_input(&fake), 0);
    assert_eq!(h.nb.nic_stats().drops(Reason::SpoofMac), 1);
    assert_eq!(h.nb.switch().lookup(&mac(0)), Some(Port::Vif(0)));
    let group_src = eth(mac(1), BROADCAST, 0x0800, &[0; 40]);
    assert_eq!(h.nb.nic_input(&group_src), 0);
    assert_eq!(h.nb.nic_stats().drops(Reason::SpoofMac), 2);
    // runts and giants from the NIC
    assert_eq!(h.nb.nic_input(&[0u8; 13]), 0);
    assert_eq!(h.nb.nic_input(&vec![0u8; MAX_FRAME + 1]), 0);
    let n = h.nb.nic_stats();
    assert_eq!((n.drops(Reason::Runt), n.drops(Reason::Oversize)), (1, 1));
    assert_eq!(n.rx_frames, 7);
    assert_eq!(n.tx_frames, 1);
    h.assert_clean();
}

#[test]
fn anti_spoofing() {
    for copy in both() {
        let mut h = H::new(3, copy);
        for i in 0..3 {
            h.post(i, 8);
        }
        let cases: [(Vec<u8>, Reason); 7] = [
            // B's MAC as source
            (ipv4(mac(2), mac(1), ip(0), ip(2), b"x"), Reason::SpoofMac),
            // B's IP as source
            (ipv4(mac(2), mac(0), ip(1), ip(2), b"x"), Reason::SpoofIp),
            // ARP claiming B's IP (cache poisoning)
            (
                arp(BROADCAST, mac(0), 2, mac(0), ip(1), ip(2)),
                Reason::SpoofIp,
            ),
            // ARP with B's hardware address inside
            (
                arp(mac(2), mac(0), 2, mac(1), ip(0), ip(2)),
                Reason::SpoofMac,
            ),
            // IPv6 and a VLAN tag are not allowed through
            (eth(mac(2), mac(0), 0x86dd, &[0x60; 40]), Reason::Ethertype),
            (eth(mac(2), mac(0), 0x8100, &[0; 40]), Reason::Ethertype),
            (eth(mac(2), mac(0), 0x0800, &[0x45; 10]), Reason::Malformed),
        ];
        for (f, why) in &cases {
            assert_eq!(h.send(0, f), status::DROPPED, "{why:?}");
        }
        let s = h.nb.vif(0).unwrap().stats();
        assert_eq!(s.drops(Reason::SpoofMac), 2);
        assert_eq!(s.drops(Reason::SpoofIp), 2);
        assert_eq!(s.drops(Reason::Ethertype), 2);
        assert_eq!(s.drops(Reason::Malformed), 1);
        assert_eq!(s.tx_frames, 0);
        assert!(h.f[1].frames.is_empty() && h.f[2].frames.is_empty());
        assert!(h.nic.sent.is_empty());
        // the victim still talks normally
        let ok = udp(1, 2, b"genuine");
        assert_eq!(h.send(1, &ok), status::OKAY);
        assert_eq!(h.f[2].frames, [ok]);
        // sending to oneself goes nowhere
        assert_eq!(h.send(0, &udp(0, 0, b"me")), status::DROPPED);
        assert_eq!(h.nb.vif(0).unwrap().stats().drops(Reason::NoRoute), 1);
        h.assert_clean();
    }
}

#[test]
fn routes_isolate_frontends() {
    let mut h = H::new(3, true);
    for i in 0..3 {
        h.post(i, 8);
    }
    h.nb.set_route(Port::Vif(0), Port::Vif(1), false);
    assert_eq!(h.send(0, &udp(0, 1, b"no")), status::DROPPED);
    assert_eq!(h.nb.vif(0).unwrap().stats().drops(Reason::Forbidden), 1);
    let b = arp(BROADCAST, mac(0), 1, mac(0), ip(0), ip(2));
    assert_eq!(h.send(0, &b), status::OKAY);
    assert!(h.f[1].frames.is_empty());
    assert_eq!(h.f[2].frames, [b]);
    // the other way is still open
    assert_eq!(h.send(1, &udp(1, 0, b"yes")), status::OKAY);
    assert_eq!(h.f[0].frames.len(), 1);
    // the NIC cut off from vif 2
    h.nb.set_route(Port::Nic, Port::Vif(2), false);
    assert_eq!(h.nb.nic_input(&ipv4(mac(2), HOST, HOST_IP, ip(2), b"")), 0);
    assert_eq!(h.nb.nic_stats().drops(Reason::Forbidden), 1);
}

#[test]
fn multi_slot_tx_reassembled() {
    for copy in both() {
        let mut h = H::new(2, copy);
        h.post(1, 4);
        let f = udp(0, 1, &pattern(1400, 3));
        // slots straddling the end of their pages and of bounce pages
        let st = h.send_split(0, &f, &[100, 700, 1, 0, 633], 3000);
        assert_eq!(st, [0; 5]);
        assert_eq!(h.f[1].frames, vec![f.clone()]);
        // the limit: 18 slots
        let mut sizes = vec![1usize; MAX_SLOTS_PER_PACKET];
        sizes[0] = f.len() - (MAX_SLOTS_PER_PACKET - 1);
        let st = h.send_split(0, &f, &sizes, 2000);
        assert!(st.iter().all(|s| *s == status::OKAY));
        assert_eq!(h.f[1].frames.len(), 2);
        assert_eq!(h.f[1].frames[1], f);
        assert_eq!(h.nb.vif(0).unwrap().stats().tx_slots, 5 + 18);
        h.assert_clean();
    }
}

fn req(gref: u32, offset: u16, flags: u16, id: u16, size: u16) -> TxRequest {
    TxRequest {
        gref,
        offset,
        flags,
        id,
        size,
    }
}

#[test]
fn bad_tx_packets_answered_error_per_slot() {
    for copy in both() {
        let mut h = H::new(2, copy);
        h.post(1, 32);
        let good = udp(0, 1, &pattern(200, 1));
        let g = h.frame_req(0, &good, 0).gref;
        let m = txf::MORE_DATA;
        let n = good.len() as u16;
        let cases: Vec<(Vec<TxRequest>, Reason)> = vec![
            (
                vec![req(g, 0, m, 1, 100), req(g, 0, 0, 2, 101)],
                Reason::SlotsExceedSize,
            ),
            (
                vec![req(g, 3000, m, 3, 1500), req(g, 0, 0, 4, 100)],
                Reason::SlotsShortOfSize,
            ),
            (
                vec![req(g, 0, m, 5, n), req(g, 4090, 0, 6, 7)],
                Reason::SlotBounds,
            ),
            (vec![req(g, 4095, 0, 7, n)], Reason::SlotBounds),
            (vec![req(g, 4000, 0, 8, 1515)], Reason::SlotBounds),
            (
                (0..MAX_SLOTS_PER_PACKET as u16 + 1)
                    .map(|k| {
                        req(
                            g,
                            0,
                            if k < 18 { m } else { 0 },
                            10 + k,
                            if k == 0 { 100 } else { 1 },
                        )
                    })
                    .collect(),
                Reason::TooManySlots,
            ),
            (
                vec![req(g, 0, m, 40, n), req(g, 0, 0, 40, 0)],
                Reason::IdInFlight,
            ),
            (
                vec![req(g, 0, txf::EXTRA_INFO, 41, n), TxRequest::default()],
                Reason::ExtraInfo,
            ),
            (vec![req(g, 0, 0, 42, 13)], Reason::Runt),
            (vec![req(g, 0, 0, 43, 1515)], Reason::Oversize),
            (vec![req(g, 0, txf::CSUM_BLANK, 44, n)], Reason::CsumBlank),
            (vec![req(9999, 0, 0, 45, n)], Reason::Grant),
        ];
        for (reqs, why) in &cases {
            let count = h.nb.vif(0).unwrap().stats().drops(*why);
            let before = h.f[0].tx_rsp.len();
            h.put(0, reqs);
            h.settle();
            let rsp = &h.f[0].tx_rsp[before..];
            assert_eq!(rsp.len(), reqs.len(), "{why:?}: one response per slot");
            for (q, r) in reqs.iter().zip(rsp) {
                if *why == Reason::ExtraInfo && q.gref == 0 {
                    assert_eq!(r.status, status::NULL);
                } else {
                    assert_eq!((r.id, r.status), (q.id, status::ERROR), "{why:?}");
                }
            }
            assert_eq!(
                h.nb.vif(0).unwrap().stats().drops(*why),
                count + 1,
                "{why:?}"
            );
            assert_eq!(h.nb.vif(0).unwrap().conn(), Conn::Connected);
        }
        assert!(h.f[1].frames.is_empty());
        // still alive: a good frame goes through
        let r = req(g, 0, 0, 99, n);
        h.put(0, &[r]);
        h.settle();
        assert_eq!(
            h.f[0].tx_rsp.last(),
            Some(&TxResponse { id: 99, status: 0 })
        );
        assert_eq!(h.f[1].frames, [good]);
        h.assert_clean();
    }
}

#[test]
fn id_in_flight_across_packets_of_one_batch() {
    let mut h = H::new(2, true);
    h.post(1, 4);
    let f = udp(0, 1, b"one");
    let a = h.frame_req(0, &f, 0);
    let b = TxRequest { id: a.id, ..a };
    h.put(0, &[a, b]);
    h.settle();
    let st: Vec<(u16, i16)> = h.f[0].tx_rsp.iter().map(|r| (r.id, r.status)).collect();
    assert_eq!(st, [(a.id, status::OKAY), (a.id, status::ERROR)]);
    assert_eq!(h.nb.vif(0).unwrap().stats().drops(Reason::IdInFlight), 1);
    assert_eq!(h.f[1].frames, [f]);
}

#[test]
fn bad_grants() {
    for copy in both() {
        let mut h = H::new(2, copy);
        // a TX page granted to someone else
        let f = udp(0, 1, b"x");
        let mut r = h.frame_req(0, &f, 0);
        r.gref = h.w.grant(dom(0), 77, true);
        h.put(0, &[r]);
        h.settle();
        assert_eq!(h.f[0].tx_rsp.pop().unwrap().status, status::ERROR);
        assert_eq!(h.nb.vif(0).unwrap().stats().drops(Reason::Grant), 1);
        // RX: a bad ref, a read-only page, then a good one
        h.post_gref(1, 4242);
        let ro = h.w.grant(dom(1), BACK, true);
        h.post_gref(1, ro);
        h.post(1, 1);
        for _ in 0..3 {
            assert_eq!(h.send(0, &f), status::OKAY);
        }
        assert_eq!(h.f[1].rx_errors, 2);
        assert_eq!(h.f[1].frames, vec![f.clone()]);
        let s = h.nb.vif(1).unwrap().stats();
        assert_eq!((s.drops(Reason::RxGrant), s.rx_frames), (2, 1));
        h.assert_clean();
    }
    // a copy call that fails as a whole
    let mut h = H::new(2, true);
    h.post(1, 2);
    h.w.fail_copy_calls = true;
    assert_eq!(h.send(0, &udp(0, 1, b"x")), status::ERROR);
    h.w.fail_copy_calls = false;
    assert_eq!(h.send(0, &udp(0, 1, b"y")), status::OKAY);
    assert_eq!(h.f[1].frames.len(), 1);
}

#[test]
fn rx_waits_for_buffers_then_drops() {
    let cfg = Config {
        rx_queue: 4,
        ..Config::default()
    };
    let mut h = H::with(2, true, cfg, 0);
    let frames: Vec<Vec<u8>> = (0..6).map(|k| udp(0, 1, &pattern(60, k))).collect();
    for f in &frames {
        assert_eq!(h.send(0, f), status::OKAY);
    }
    let s = h.nb.vif(1).unwrap().stats();
    assert_eq!(s.drops(Reason::RxNoBuffer), 2);
    assert_eq!(h.nb.vif(1).unwrap().rx_queued(), 4);
    // the backend asked to be told when a buffer is posted
    let gref = h.w.grant(dom(1), BACK, false);
    let f = &mut h.f[1];
    f.posted.insert(500, gref);
    f.rxr
        .put_request(&mut *f.rx, &RxRequest { id: 500, gref }.encode())
        .unwrap();
    assert!(f.rxr.push_requests(&mut *f.rx), "frontend must notify");
    h.settle();
    assert_eq!(h.f[1].frames, [frames[0].clone()]);
    h.post(1, 8);
    h.settle();
    assert_eq!(h.f[1].frames, frames[..4].to_vec());
    assert_eq!(h.nb.vif(1).unwrap().rx_queued(), 0);
}

#[test]
fn jumbo_frames_take_several_rx_slots() {
    let cfg = Config {
        max_frame: 9014,
        ..Config::default()
    };
    for copy in both() {
        let mut h = H::with(2, copy, cfg, 0);
        h.post(1, 2);
        let f = udp(0, 1, &pattern(9000 - 34, 5));
        assert_eq!(f.len(), 9000);
        let st = h.send_split(0, &f, &[4000, 4096, 904], 0);
        assert_eq!(st, [0, 0, 0]);
        assert!(h.f[1].frames.is_empty(), "needs 3 RX requests");
        h.post(1, 1);
        h.settle();
        assert_eq!(h.f[1].frames, [f]);
        assert_eq!(h.nb.vif(1).unwrap().stats().rx_slots, 3);
        h.assert_clean();
    }
}

#[test]
fn rx_responses_carry_length_and_more_data() {
    let cfg = Config {
        max_frame: 9014,
        ..Config::default()
    };
    let mut h = H::with(2, true, cfg, 0);
    h.post(1, 3);
    let f = udp(0, 1, &pattern(9000 - 34, 5));
    let st = h.send_split(0, &f, &[4000, 4096, 904], 0);
    assert_eq!(st, [0, 0, 0]);
    // read the three responses raw
    let fr = &mut h.f[1];
    let mut got = Vec::new();
    let mut b = [0u8; RX_ENTRY_SIZE];
    // they were consumed by settle(); look at the slots themselves
    let start = fr.rxr.rsp_cons().wrapping_sub(3);
    for k in 0..3u32 {
        let o = 64 + ((start.wrapping_add(k)) & 255) as usize * RX_ENTRY_SIZE;
        b.copy_from_slice(&fr.rx[o..o + RX_ENTRY_SIZE]);
        got.push(RxResponse::decode(&b));
    }
    let lens: Vec<i16> = got.iter().map(|r| r.status).collect();
    assert_eq!(lens, [4096, 4096, 808]);
    let more: Vec<bool> = got.iter().map(RxResponse::more_data).collect();
    assert_eq!(more, [true, true, false]);
}

#[test]
fn req_prod_past_the_ring_ends_the_connection() {
    for rx_ring in [false, true] {
        let mut h = H::new(3, true);
        h.post(2, 4);
        let f = &mut h.f[0];
        let (page, r) = if rx_ring {
            (&mut f.rx, &f.rxr)
        } else {
            (&mut f.tx, &f.txr)
        };
        page.store_u32(off::REQ_PROD, r.req_prod_pvt().wrapping_add(257));
        let p = h.poll(0);
        assert!(p.hostile && p.closed);
        let v = h.nb.vif(0).unwrap();
        assert_eq!(v.conn(), Conn::Closed);
        assert!(matches!(
            (rx_ring, v.hostile()),
            (false, Some(Hostile::Tx(ring::Error::Overrun { .. })))
                | (true, Some(Hostile::Rx(ring::Error::Overrun { .. })))
        ));
        assert_eq!(v.stats().hostile, 1);
        assert_eq!(h.f[0].txr.peer_state(&*h.f[0].tx), Some(State::Closed));
        assert_eq!(h.f[0].rxr.peer_state(&*h.f[0].rx), Some(State::Closed));
        // nothing was answered on the broken ring
        assert_eq!(h.f[0].tx.load_u32(off::RSP_PROD), 0);
        // the others go on
        let ok = udp(1, 2, b"fine");
        assert_eq!(h.send(1, &ok), status::OKAY);
        assert_eq!(h.f[2].frames, [ok]);
        // frames for the closed vif are dropped
        assert_eq!(h.send(1, &udp(1, 0, b"gone")), status::OKAY);
        assert!(h.nb.vif(0).unwrap().stats().drops(Reason::RxDown) >= 1);
    }
}

#[test]
fn hostile_reported_in_the_poll_that_found_it() {
    let mut h = H::new(1, true);
    let f = &mut h.f[0];
    f.tx.store_u32(off::REQ_PROD, 1000);
    let p = h.poll(0);
    assert!(p.hostile && p.closed && p.notify);
    assert_eq!(h.poll(0), Poll::default());
}

#[test]
fn frontend_closes_with_a_partial_packet() {
    let mut h = H::new(2, true);
    let f = udp(0, 1, b"half");
    let mut r = h.frame_req(0, &f, 0);
    r.flags = txf::MORE_DATA;
    h.put(0, &[r]);
    h.settle();
    assert!(h.f[0].tx_rsp.is_empty(), "held until the chain completes");
    assert_eq!(h.nb.vif(0).unwrap().tx_unanswered(), 1);
    let fr = &mut h.f[0];
    fr.txr.set_state(&mut *fr.tx, State::Closing);
    let p = h.poll(0);
    assert!(p.closed && !p.hostile);
    h.collect(0);
    assert_eq!(
        h.f[0].tx_rsp,
        [TxResponse {
            id: r.id,
            status: status::ERROR
        }]
    );
    assert_eq!(h.f[0].rxr.peer_state(&*h.f[0].rx), Some(State::Closed));
    // the driver domain's own close
    let fr = &mut h.f[1];
    let p = h.nb.close(1, &mut *fr.tx, &mut *fr.rx);
    assert!(p.closed);
    assert_eq!(h.nb.vif(1).unwrap().conn(), Conn::Closed);
}

#[test]
fn nic_busy_counted() {
    let mut h = H::new(1, true);
    h.nic.busy = true;
    let f = ipv4(HOST, mac(0), ip(0), HOST_IP, b"x");
    assert_eq!(h.send(0, &f), status::OKAY);
    assert_eq!(h.nb.vif(0).unwrap().stats().drops(Reason::NicBusy), 1);
    assert_eq!(h.nb.nic_stats().tx_frames, 0);
}

#[test]
fn rings_across_the_u32_wrap() {
    for copy in both() {
        let mut h = H::with(2, copy, Config::default(), u32::MAX - 100);
        let mut expect = Vec::new();
        for k in 0..300u32 {
            h.post(1, 1);
            let f = udp(0, 1, &pattern(40 + (k as usize % 900), k as u8));
            assert_eq!(h.send(0, &f), status::OKAY);
            expect.push(f);
        }
        assert_eq!(h.f[1].frames, expect);
        assert!(h.f[1].rxr.rsp_cons() < 1000, "wrapped");
        assert!(h.f[0].txr.rsp_cons() < 1000, "wrapped");
        h.assert_clean();
    }
}

#[test]
fn batches_fill_bounce_pages_and_copy_calls() {
    let cfg = Config {
        rx_queue: 128,
        ..Config::default()
    };
    let mut h = H::with(2, true, cfg, 0);
    h.post(1, 200);
    let frames: Vec<Vec<u8>> = (0..100).map(|k| udp(0, 1, &pattern(1000, k))).collect();
    let reqs: Vec<TxRequest> = frames.iter().map(|f| h.frame_req(0, f, 0)).collect();
    h.put(0, &reqs);
    let calls = h.w.copy_calls;
    h.settle();
    assert_eq!(h.nb.vif(1).unwrap().stats().total_drops(), 0);
    assert!(h.f[1].frames == frames, "frames differ");
    assert!(h.f[0].tx_rsp.iter().all(|r| r.status == 0));
    // 8 bounce pages per vif: a TX call per 8 packets, an RX call per 8
    let n = h.w.copy_calls - calls;
    assert!(n <= 2 * 100 / 8 + 4, "{n} copy calls");
    h.assert_clean();
}

/// A TX page that rewrites a slot after its first read (a frontend
/// racing the backend): the backend must act on what it read first.
struct Rewriting {
    page: core::cell::RefCell<[u8; RING_PAGE]>,
    reads: core::cell::RefCell<BTreeMap<usize, u32>>,
    evil: TxRequest,
}

impl RingPage for Rewriting {
    fn load_u32(&self, off: usize) -> u32 {
        self.page.borrow().load_u32(off)
    }
    fn store_u32(&mut self, off: usize, v: u32) {
        self.page.get_mut().store_u32(off, v);
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        self.page.borrow().read(off, buf);
        *self.reads.borrow_mut().entry(off).or_default() += 1;
        if off >= 64 {
            let e = self.evil.encode();
            self.page.borrow_mut()[off..off + e.len()].copy_from_slice(&e);
        }
    }
    fn write(&mut self, off: usize, buf: &[u8]) {
        self.page.get_mut().write(off, buf);
    }
    fn fence(&self) {}
}

#[test]
fn request_rewritten_after_publishing() {
    let mut h = H::new(2, true);
    h.post(1, 4);
    let f = udp(0, 1, &pattern(300, 9));
    let good = h.frame_req(0, &f, 0);
    let fr = &mut h.f[0];
    fr.txr.put_request(&mut *fr.tx, &good.encode()).unwrap();
    fr.txr.push_requests(&mut *fr.tx);
    let mut page = Rewriting {
        page: core::cell::RefCell::new(*fr.tx),
        reads: core::cell::RefCell::new(BTreeMap::new()),
        // after the read: a huge size, more data, a page it never granted
        evil: req(4242, 4000, txf::MORE_DATA, good.id, 60000),
    };
    let p = h.nb.poll(0, &mut page, &mut *fr.rx, &mut h.w, &mut h.nic);
    assert!(p.wake & 0b10 != 0);
    assert!(
        page.reads.borrow().values().all(|n| *n == 1),
        "each slot read once"
    );
    *fr.tx = *page.page.borrow();
    h.settle();
    assert_eq!(
        h.f[0].tx_rsp,
        [TxResponse {
            id: good.id,
            status: 0
        }]
    );
    assert_eq!(h.f[1].frames, [f]);
    h.assert_clean();
}

#[test]
fn config_checked() {
    assert_eq!(
        Netback::new(Config {
            max_frame: 13,
            ..Config::default()
        })
        .err(),
        Some(ConfigError::MaxFrame(13))
    );
    assert!(Netback::new(Config {
        max_frame: 65536,
        ..Config::default()
    })
    .is_err());
    let mut nb = Netback::new(Config {
        max_frame: 9014,
        ..Config::default()
    })
    .unwrap();
    let v = |m: Mac, i: [u8; 4], path| VifConfig {
        frontend: 3,
        mac: m,
        ip: i,
        path,
    };
    assert_eq!(
        nb.add_vif(v(
            mac(0),
            ip(0),
            DataPath::Copy {
                bounce: vec![0, 4096]
            }
        )),
        Err(ConfigError::TooFewBouncePages { have: 2, need: 3 })
    );
    assert_eq!(
        nb.add_vif(v(
            mac(0),
            ip(0),
            DataPath::Copy {
                bounce: vec![0, 4096, 5]
            }
        )),
        Err(ConfigError::BounceUnaligned(5))
    );
    assert_eq!(
        nb.add_vif(v(BROADCAST, ip(0), DataPath::Map)),
        Err(ConfigError::BadMac(BROADCAST))
    );
    assert_eq!(
        nb.add_vif(v([0; 6], ip(0), DataPath::Map)),
        Err(ConfigError::BadMac([0; 6]))
    );
    assert_eq!(nb.add_vif(v(mac(0), ip(0), DataPath::Map)), Ok(0));
    assert_eq!(
        nb.add_vif(v(mac(0), ip(1), DataPath::Map)),
        Err(ConfigError::DuplicateMac(mac(0)))
    );
    assert_eq!(
        nb.add_vif(v(mac(1), ip(0), DataPath::Map)),
        Err(ConfigError::DuplicateIp(ip(0)))
    );
    for i in 1..MAX_VIFS {
        let m = [2, 0, 0, 1, 0, i as u8];
        assert_eq!(nb.add_vif(v(m, [10, 1, 0, i as u8], DataPath::Map)), Ok(i));
    }
    assert_eq!(
        nb.add_vif(v(mac(200), [10, 2, 0, 0], DataPath::Map)),
        Err(ConfigError::TooManyVifs)
    );
    assert_eq!(nb.vif_of_domain(3), Some(0));
    let info = VifInfo {
        name: "eth0",
        role: abi::domain::VifRole::Back,
        peer: 7,
        port: 3,
        tx_ring_gref: 8,
        rx_ring_gref: 9,
        mac: mac(5),
        ip: ip(5),
    };
    let c = VifConfig::from_info(&info, DataPath::Map);
    assert_eq!((c.frontend, c.mac, c.ip), (7, mac(5), ip(5)));
    for r in Reason::ALL {
        assert!(!r.name().is_empty());
        assert_eq!(Reason::ALL[r as usize], r);
    }
}

// ---------------------------------------------------------------------------
// Property test: random hostile rings.

/// xorshift64*
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

/// A frame from vif `i`: mostly genuine, sometimes spoofed or garbage.
fn random_frame(rng: &mut Rng, i: usize, n: usize) -> Vec<u8> {
    let to = rng.below(n as u64 + 1) as usize;
    let dst = match rng.below(4) {
        0 => BROADCAST,
        1 => HOST,
        _ => mac(to),
    };
    let body = pattern(rng.below(1400) as usize, rng.next() as u8);
    match rng.below(8) {
        0 => ipv4(dst, mac(rng.below(n as u64) as usize), ip(i), ip(to), &body),
        1 => ipv4(dst, mac(i), ip(rng.below(n as u64) as usize), ip(to), &body),
        2 => arp(
            dst,
            mac(i),
            1,
            mac(rng.below(n as u64) as usize),
            ip(i),
            ip(to),
        ),
        3 => {
            let len = rng.below(1600) as usize;
            (0..len).map(|_| rng.next() as u8).collect()
        }
        _ => ipv4(dst, mac(i), ip(i), ip(to), &body),
    }
}

/// Random TX slots: well-formed packets, or chains that lie.
fn random_tx(rng: &mut Rng, h: &mut H, i: usize, grefs: &[u32]) -> Vec<TxRequest> {
    let n = h.f.len();
    let d = h.f[i].dom;
    let mut out = Vec::new();
    if rng.chance(3) {
        // garbage slots
        for _ in 0..=rng.below(20) {
            out.push(TxRequest {
                gref: if rng.chance(2) {
                    grefs[rng.below(grefs.len() as u64) as usize]
                } else {
                    rng.next() as u32
                },
                offset: rng.below(4200) as u16,
                flags: rng.below(16) as u16,
                id: rng.below(64) as u16,
                size: if rng.chance(2) {
                    rng.below(2000) as u16
                } else {
                    rng.next() as u16
                },
            });
        }
        return out;
    }
    if rng.chance(6) {
        // a long chain, maybe past the slot limit
        let len = 15 + rng.below(10) as usize;
        let g = grefs[0];
        for k in 0..len {
            let id = h.f[i].id();
            out.push(TxRequest {
                gref: g,
                offset: 0,
                flags: if k + 1 < len { txf::MORE_DATA } else { 0 },
                id,
                size: if k == 0 { 1000 } else { 10 },
            });
        }
        return out;
    }
    let f = random_frame(rng, i, n);
    if f.is_empty() {
        return out;
    }
    let slots = 1 + rng.below(4) as usize;
    let mut pos = 0;
    for k in 0..slots {
        let left = f.len() - pos;
        let take = if k + 1 == slots {
            left
        } else {
            rng.below(left as u64 + 1) as usize
        };
        let gref = h.w.grant(d, BACK, true);
        let off = rng.below((PG - take) as u64 + 1) as usize;
        h.w.page(d, gref)[off..off + take].copy_from_slice(&f[pos..pos + take]);
        pos += take;
        let id = h.f[i].id();
        out.push(TxRequest {
            gref,
            offset: off as u16,
            flags: if k + 1 < slots { txf::MORE_DATA } else { 0 },
            id,
            size: if k == 0 { f.len() as u16 } else { take as u16 },
        });
    }
    out
}

#[test]
fn random_hostile_rings() {
    let iters = std::env::var("NETBACK_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40u64);
    for it in 0..iters {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (it + 1).wrapping_mul(0x1234_5678_9abc_def1));
        let copy = it % 2 == 0;
        let start = if it % 3 == 0 { u32::MAX - 50 } else { 0 };
        let cfg = Config {
            max_frame: if it % 4 == 1 { 9014 } else { MAX_FRAME },
            rx_queue: 1 + rng.below(16) as usize,
            learn: 4,
            nic_rx: NIC_RX,
        };
        let n = 2 + rng.below(3) as usize;
        let mut h = H::with(n, copy, cfg, start);
        // some grefs each frontend granted us, some it did not
        let grefs: Vec<Vec<u32>> = (0..n)
            .map(|i| {
                (0..4)
                    .map(|k| h.w.grant(dom(i), if k == 3 { 99 } else { BACK }, k == 2))
                    .collect()
            })
            .collect();
        let hostile_vif = rng.below(n as u64) as usize;
        // NIC receive buffers (three pages each: room for 9014 bytes) that
        // netback may hold; `free` are the ids the NIC may fill
        const NIC_RX: usize = 24;
        let rx_bufs: Vec<u64> = (0..NIC_RX).map(|_| h.w.bounce_pages(3)[0]).collect();
        let mut free: Vec<u16> = (0..NIC_RX as u16).collect();
        for _step in 0..300 {
            let i = rng.below(n as u64) as usize;
            if h.nb.vif(i).unwrap().conn() != Conn::Connected {
                continue;
            }
            match rng.below(10) {
                0..=4 => {
                    let reqs = random_tx(&mut rng, &mut h, i, &grefs[i]);
                    let room = h.f[i].txr.free_requests() as usize;
                    let reqs = &reqs[..reqs.len().min(room)];
                    h.put(i, reqs);
                }
                5 | 6 => {
                    let room = h.f[i].rxr.free_requests() as usize;
                    let k = (rng.below(8) as usize).min(room);
                    for _ in 0..k {
                        if rng.chance(5) {
                            let g = grefs[i][rng.below(4) as usize];
                            h.post_gref(i, g);
                        } else {
                            h.post(i, 1);
                        }
                    }
                }
                7 => {
                    let f = random_frame(&mut rng, n, n);
                    let mut f = f;
                    if f.len() >= 12 && rng.chance(2) {
                        f[6..12].copy_from_slice(&HOST);
                    }
                    match free.pop() {
                        Some(id) if rng.chance(2) => {
                            let addr = rx_bufs[usize::from(id)];
                            for (k, c) in f.chunks(PG).enumerate() {
                                h.w.write(addr + (k * PG) as u64, c);
                            }
                            if !h.nb.nic_input_held(&f, RxBuf { id, addr }).held {
                                free.push(id);
                            }
                        }
                        other => {
                            free.extend(other);
                            h.nb.nic_input(&f);
                        }
                    }
                }
                8 if i == hostile_vif && rng.chance(8) => {
                    let fr = &mut h.f[i];
                    let page = if rng.chance(2) {
                        &mut fr.tx
                    } else {
                        &mut fr.rx
                    };
                    let p = page.load_u32(off::REQ_PROD);
                    let jump = [257u32, 1000, u32::MAX, u32::MAX - 5][rng.below(4) as usize];
                    page.store_u32(off::REQ_PROD, p.wrapping_add(jump));
                }
                _ => {
                    // scribble over a published but maybe unread TX slot
                    let fr = &mut h.f[i];
                    let slot = rng.below(256) as usize;
                    let o = 64 + slot * TX_ENTRY_SIZE;
                    for b in &mut fr.tx[o..o + TX_ENTRY_SIZE] {
                        *b = rng.next() as u8;
                    }
                }
            }
            h.settle();
            while let Some(id) = h.nb.take_nic_done() {
                assert!(!free.contains(&id), "it {it}: buffer {id} given back twice");
                free.push(id);
            }
            assert_eq!(
                free.len() + h.nb.nic_held(),
                NIC_RX,
                "it {it}: a buffer lost"
            );
            assert!(h.nb.nic_held() <= cfg.held_max(), "it {it}: too many held");
            for k in 0..n {
                assert!(h.nb.vif(k).unwrap().rx_held() <= cfg.held_per_vif());
            }
            assert!(h.w.violations.is_empty(), "it {it}: {:?}", h.w.violations);
            assert!(h.w.maps.is_empty(), "it {it}: mappings left");
        }
        for i in 0..n {
            let v = h.nb.vif(i).unwrap();
            if std::env::var("NETBACK_COVERAGE").is_ok() {
                let d: Vec<String> = Reason::ALL
                    .iter()
                    .filter(|r| v.stats().drops(**r) > 0)
                    .map(|r| format!("{}={}", r.name(), v.stats().drops(*r)))
                    .collect();
                std::println!(
                    "it {it} vif {i} {:?} tx {} rx {} {}",
                    v.conn(),
                    v.stats().tx_frames,
                    v.stats().rx_frames,
                    d.join(" ")
                );
            }
            let fr = &h.f[i];
            if v.conn() == Conn::Connected {
                // every TX slot answered, except a chain still open
                let answered = fr.txr.rsp_cons().wrapping_sub(start);
                let published = fr.txr.req_prod_pvt().wrapping_sub(start);
                assert_eq!(
                    u64::from(published - answered),
                    v.tx_unanswered() as u64,
                    "it {it} vif {i}"
                );
                assert!(v.tx_unanswered() <= MAX_SLOTS_PER_PACKET + 1);
                assert_eq!(v.stats().tx_slots, u64::from(published), "it {it} vif {i}");
            } else {
                assert_eq!(v.conn(), Conn::Closed);
                assert!(v.hostile().is_some());
                assert_eq!(i, hostile_vif);
            }
            // what a frontend received is genuine: from a vif as itself,
            // or from the wire
            for f in &fr.frames {
                assert!(f.len() >= MIN_FRAME);
                let src = frame::src(f);
                // a source that is not a frontend's MAC came from the wire
                if let Some(k) = h.nb.switch().vif_of(&src) {
                    assert_ne!(k, i, "it {it}: echo");
                    assert_eq!(frame::check_source(f, &mac(k), &ip(k)), Ok(()));
                    let d = frame::dst(f);
                    assert!(is_group(&d) || d == mac(i), "it {it}: not for vif {i}");
                }
            }
        }
    }
}

#[test]
fn frames_to_the_nic_are_copied_into_lent_buffers_once() {
    let mut h = H::new(1, true);
    let out = ipv4(HOST, mac(0), ip(0), HOST_IP, &pattern(1400, 3));
    // two slots, so two copy operations, both into the one lent buffer
    let st = h.send_split(0, &out, &[600, 834], 100);
    assert_eq!(st, [status::OKAY, status::OKAY]);
    assert_eq!(h.nic.sent, [out]);
    assert_eq!(h.nb.vif(0).unwrap().stats().copies, 2);
    assert_eq!(h.nic.released, 0);
    // a spoofed frame copied into a lent buffer gives it back unsent
    let spoof = ipv4(HOST, mac(0), ip(1), HOST_IP, b"not mine");
    assert_eq!(h.send(0, &spoof), status::DROPPED);
    assert_eq!(h.nic.sent.len(), 1);
    assert_eq!(h.nic.released, 1);
    assert_eq!(h.nb.vif(0).unwrap().stats().drops(Reason::SpoofIp), 1);
    // no buffer to lend: through a bounce page, then sent as bytes
    let lend = core::mem::take(&mut h.nic.lend);
    let again = ipv4(HOST, mac(0), ip(0), HOST_IP, &pattern(900, 5));
    assert_eq!(h.send(0, &again), status::OKAY);
    assert_eq!(h.nic.sent.last(), Some(&again));
    h.nic.lend = lend;
    h.assert_clean();
}

#[test]
fn held_nic_frames_are_copied_straight_and_given_back() {
    let cfg = Config {
        nic_rx: 64,
        ..Config::default()
    };
    let mut h = H::with(2, true, cfg, 0);
    let rxbuf = h.w.bounce_pages(2);
    // a frame placed to cross a page of the NIC's memory
    let at = rxbuf[0] + 3000;
    let put = |h: &mut H, f: &[u8]| {
        let n = f.len().min(PG - 3000);
        h.w.write(at, &f[..n]);
        h.w.write(rxbuf[1], &f[n..]);
    };
    let back = ipv4(mac(1), HOST, HOST_IP, ip(1), &pattern(1400, 9));
    put(&mut h, &back);
    let r = h.nb.nic_input_held(&back, RxBuf { id: 7, addr: at });
    assert_eq!(
        r,
        NicInput {
            wake: 0b10,
            held: true
        }
    );
    assert_eq!(h.nb.nic_held(), 1);
    // nothing posted yet: it waits, held
    h.settle();
    assert_eq!(h.nb.take_nic_done(), None);
    h.post(1, 2);
    h.settle();
    assert_eq!(h.f[1].frames, [back]);
    assert_eq!(h.nb.take_nic_done(), Some(7));
    assert_eq!((h.nb.take_nic_done(), h.nb.nic_held()), (None, 0));
    // two copies (the source page ends), no bounce page written
    assert_eq!(h.nb.vif(1).unwrap().stats().copies, 2);
    // a broadcast is copied for every vif, not held
    let b = arp(BROADCAST, HOST, 1, HOST, HOST_IP, ip(0));
    let r = h.nb.nic_input_held(&b, RxBuf { id: 8, addr: at });
    assert_eq!(
        r,
        NicInput {
            wake: 0b11,
            held: false
        }
    );
    // a vif that closes with held frames gives them back
    let f = ipv4(mac(0), HOST, HOST_IP, ip(0), b"never read");
    put(&mut h, &f);
    assert!(h.nb.nic_input_held(&f, RxBuf { id: 9, addr: at }).held);
    let fr = &mut h.f[0];
    h.nb.close(0, &mut *fr.tx, &mut *fr.rx);
    assert_eq!(h.nb.take_nic_done(), Some(9));
    assert_eq!(h.nb.nic_held(), 0);
    // and a closed vif holds nothing
    assert!(!h.nb.nic_input_held(&f, RxBuf { id: 10, addr: at }).held);
    h.assert_clean();
}

/// Fills NIC receive buffer `id` (of `bufs`) with `f` and hands it to
/// netback; true if netback holds it.
fn nic_frame(h: &mut H, bufs: &[u64], id: u16, f: &[u8]) -> bool {
    let addr = bufs[usize::from(id)];
    h.w.write(addr, f);
    h.nb.nic_input_held(f, RxBuf { id, addr }).held
}

#[test]
fn a_stalled_vif_cannot_hold_every_nic_receive_buffer() {
    // The NIC keeps 16 receive buffers posted; vif 0 is connected but
    // never posts an RX request, while replies to it keep coming.
    const NIC_RX: usize = 16;
    let cfg = Config {
        rx_queue: 256,
        nic_rx: NIC_RX,
        ..Config::default()
    };
    let mut h = H::with(3, true, cfg, 0);
    let bufs: Vec<u64> = (0..NIC_RX).map(|_| h.w.bounce_pages(1)[0]).collect();
    let mut free: Vec<u16> = (0..NIC_RX as u16).rev().collect();
    let mut expect = Vec::new();
    for k in 0..100u8 {
        let id = free.pop().expect("every NIC receive buffer held");
        let f = ipv4(mac(0), HOST, HOST_IP, ip(0), &pattern(200, k));
        if !nic_frame(&mut h, &bufs, id, &f) {
            free.push(id);
        }
        expect.push(f);
        h.settle();
        while let Some(id) = h.nb.take_nic_done() {
            free.push(id);
        }
        assert!(
            free.len() >= NIC_RX - cfg.held_max(),
            "frame {k}: a stalled vif holds {} of {NIC_RX} NIC receive buffers",
            NIC_RX - free.len()
        );
        assert!(h.nb.nic_held() <= cfg.held_max());
    }
    assert_eq!(h.nb.vif(0).unwrap().rx_held(), cfg.held_per_vif());
    // the NIC still has most of its buffers, and the frames all wait
    assert!(free.len() >= NIC_RX - cfg.held_max(), "{} free", free.len());
    assert_eq!(h.nb.vif(0).unwrap().rx_queued(), 100);
    // another stalled vif takes no more than its own share
    for k in 0..50u8 {
        let id = free.pop().expect("every NIC receive buffer held");
        let f = ipv4(mac(1), HOST, HOST_IP, ip(1), &pattern(100, k));
        if !nic_frame(&mut h, &bufs, id, &f) {
            free.push(id);
        }
    }
    assert_eq!(h.nb.nic_held(), cfg.held_max());
    assert!(free.len() >= NIC_RX - cfg.held_max());
    // a vif that does post RX requests still receives from the NIC
    h.post(2, 1);
    let id = free.pop().unwrap();
    let f = ipv4(mac(2), HOST, HOST_IP, ip(2), b"still served");
    let held = nic_frame(&mut h, &bufs, id, &f);
    assert!(!held, "nothing left to hold: copied");
    free.push(id);
    h.settle();
    assert_eq!(h.f[2].frames, [f]);
    // vif 0 wakes up and gets everything, in order (held and copied)
    h.post(0, 100);
    h.settle();
    assert!(h.f[0].frames == expect, "frames differ");
    while let Some(id) = h.nb.take_nic_done() {
        free.push(id);
    }
    assert_eq!(free.len() + h.nb.nic_held(), NIC_RX);
    assert_eq!(h.nb.nic_held(), h.nb.vif(1).unwrap().rx_held());
    h.assert_clean();
}

/// A ring page whose frontend moves `req_prod` past the ring once the
/// backend has read `after` slots: hostile in the middle of a batch.
struct TurnsHostile {
    page: core::cell::RefCell<[u8; RING_PAGE]>,
    reads: core::cell::Cell<usize>,
    after: usize,
}

impl TurnsHostile {
    fn new(page: &[u8; RING_PAGE], after: usize) -> TurnsHostile {
        TurnsHostile {
            page: core::cell::RefCell::new(*page),
            reads: core::cell::Cell::new(0),
            after,
        }
    }
}

impl RingPage for TurnsHostile {
    fn load_u32(&self, off: usize) -> u32 {
        self.page.borrow().load_u32(off)
    }
    fn store_u32(&mut self, off: usize, v: u32) {
        self.page.get_mut().store_u32(off, v);
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        self.page.borrow().read(off, buf);
        if off >= 64 {
            self.reads.set(self.reads.get() + 1);
            if self.reads.get() == self.after {
                let mut p = self.page.borrow_mut();
                let prod = p.load_u32(off::REQ_PROD);
                p.store_u32(off::REQ_PROD, prod.wrapping_add(1000));
            }
        }
    }
    fn write(&mut self, off: usize, buf: &[u8]) {
        self.page.get_mut().write(off, buf);
    }
    fn fence(&self) {}
}

#[test]
fn hostile_mid_tx_batch_gives_lent_buffers_back() {
    let mut h = H::new(1, true);
    let lendable = h.nic.lend.len();
    // five frames to the wire, each copied into a lent buffer; the ring
    // turns hostile after the fourth slot is read
    let reqs: Vec<TxRequest> = (0..5u8)
        .map(|k| {
            let f = ipv4(HOST, mac(0), ip(0), HOST_IP, &pattern(300, k));
            h.frame_req(0, &f, 0)
        })
        .collect();
    h.put(0, &reqs);
    let fr = &mut h.f[0];
    let mut page = TurnsHostile::new(&fr.tx, 4);
    let p = h.nb.poll(0, &mut page, &mut *fr.rx, &mut h.w, &mut h.nic);
    assert!(p.hostile && p.closed);
    assert!(matches!(
        h.nb.vif(0).unwrap().hostile(),
        Some(Hostile::Tx(ring::Error::Overrun { .. }))
    ));
    assert!(h.nic.lent.is_empty(), "lent buffers lost: {:?}", h.nic.lent);
    assert_eq!(h.nic.lend.len(), lendable);
    assert!(h.nic.submitted.is_empty() && h.nic.sent.is_empty());
    // nothing answered on the broken ring
    assert_eq!(page.load_u32(off::RSP_PROD), 0);
    h.assert_clean();
}

#[test]
fn hostile_mid_rx_batch_gives_held_buffers_back() {
    let cfg = Config {
        nic_rx: 64,
        ..Config::default()
    };
    let mut h = H::with(1, true, cfg, 0);
    let bufs: Vec<u64> = (0..8).map(|_| h.w.bounce_pages(1)[0]).collect();
    // four held frames and one of ours, waiting for RX requests
    for k in 0..4u16 {
        let f = ipv4(mac(0), HOST, HOST_IP, ip(0), &pattern(500, k as u8));
        assert!(nic_frame(&mut h, &bufs, k, &f));
    }
    h.nb.nic_input(&ipv4(mac(0), HOST, HOST_IP, ip(0), b"copied"));
    assert_eq!(h.nb.nic_held(), 4);
    h.post(0, 5);
    // the ring turns hostile once three requests are taken
    let fr = &mut h.f[0];
    let mut page = TurnsHostile::new(&fr.rx, 3);
    let p = h.nb.poll(0, &mut *fr.tx, &mut page, &mut h.w, &mut h.nic);
    assert!(p.hostile && p.closed);
    assert!(matches!(
        h.nb.vif(0).unwrap().hostile(),
        Some(Hostile::Rx(ring::Error::Overrun { .. }))
    ));
    let mut back: Vec<u16> = core::iter::from_fn(|| h.nb.take_nic_done()).collect();
    back.sort_unstable();
    assert_eq!(back, [0, 1, 2, 3], "held buffers lost");
    assert_eq!(h.nb.nic_held(), 0);
    // every frame counted as dropped, none answered
    assert_eq!(h.nb.vif(0).unwrap().stats().drops(Reason::RxDown), 5);
    assert_eq!(page.load_u32(off::RSP_PROD), 0);
    h.assert_clean();
}

/// The hostile-netfront flake, replayed on netback's side: two vifs move
/// frames both ways (lent NIC buffers, batches kept across polls) and
/// close; then the third sends a good frame, one slot naming a ref it
/// never granted, and a good frame again, each published alone and polled
/// once. Every slot is answered in the poll that took it, published
/// (rsp_prod), and the frontend, which asked for the next response, is
/// notified. (The scenario's failure was its netfront discarding the
/// response; this shows netback answered.)
#[test]
fn a_never_granted_ref_after_other_vifs_close_is_answered_at_once() {
    let cfg = Config {
        rx_queue: 128,
        ..Config::default()
    };
    let mut h = H::with(3, true, cfg, 0);
    h.post(0, 100);
    h.post(1, 100);
    for round in 0..4u8 {
        let a: Vec<Vec<u8>> = (0..40)
            .map(|k| udp(0, 1, &pattern(1400, k ^ round)))
            .collect();
        let b: Vec<Vec<u8>> = (0..10).map(|k| udp(1, 0, &pattern(60, k))).collect();
        let ra: Vec<TxRequest> = a.iter().map(|f| h.frame_req(0, f, 0)).collect();
        let rb: Vec<TxRequest> = b.iter().map(|f| h.frame_req(1, f, 0)).collect();
        h.put(0, &ra);
        h.put(1, &rb);
        h.settle();
        h.post(0, 10);
        h.post(1, 40);
    }
    for i in 0..2 {
        let fr = &mut h.f[i];
        fr.txr.set_state(&mut *fr.tx, State::Closing);
        assert!(h.poll(i).closed);
    }
    let never = 4095;
    let good = arp(BROADCAST, mac(2), 1, mac(2), ip(2), [10, 0, 0, 253]);
    for (k, bad) in [false, true, false].into_iter().enumerate() {
        let mut r = h.frame_req(2, &good, 0);
        if bad {
            r.gref = never;
        }
        h.put(2, &[r]);
        let fr = &mut h.f[2];
        // what the frontend does before it sleeps: ask for the next response
        assert!(!fr.txr.final_check_for_responses(&mut *fr.tx).unwrap());
        let p = h.poll(2);
        assert!(p.notify, "case {k}: answered without an event");
        let fr = &mut h.f[2];
        assert_eq!(fr.txr.unconsumed_responses(&*fr.tx), Ok(1), "case {k}");
        h.collect(2);
        let rsp = h.f[2].tx_rsp.pop().expect("no response");
        assert_eq!(rsp.id, r.id);
        let want = if bad { status::ERROR } else { status::OKAY };
        assert_eq!(rsp.status, want, "case {k}");
        assert_eq!(h.nb.vif(2).unwrap().tx_unanswered(), 0);
    }
    assert_eq!(h.nb.vif(2).unwrap().stats().drops(Reason::Grant), 1);
    h.assert_clean();
}
