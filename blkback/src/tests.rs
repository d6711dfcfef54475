//! Host tests: a fake hypervisor (grant table, mappings, copies, memory),
//! a fake disk that checks every access against what is mapped, and a
//! frontend built on `abi::ring::FrontRing`.

use super::*;
use abi::blkif::{DiscardRequest, MAX_INDIRECT_SEGMENTS};
use abi::ring::{off, FrontRing, PAGE_SIZE as RING_PAGE};
use std::collections::BTreeMap;
use std::format;
use std::string::String;
use std::vec;
use std::vec::Vec;

const BACK: u16 = 1;
const FRONT: u16 = 3;
const OTHER: u16 = 5;
const DISK_SECTORS: u64 = 256;
const FIRST: u64 = 64;
const COUNT: u64 = 128;
const PG: usize = 4096;
const BOUNCE_BASE: u64 = 0x1000_0000;
const MAP_BASE: u64 = 0x8000_0000;

struct Grant {
    to: u16,
    readonly: bool,
    page: usize,
}

#[derive(Clone, Copy)]
struct Mapped {
    gref: u32,
    writable: bool,
    handle: u32,
}

/// The hypervisor and the memory of both domains.
#[derive(Default)]
struct World {
    grants: BTreeMap<u32, Grant>,
    front: Vec<Vec<u8>>,
    maps: BTreeMap<u64, Mapped>,
    next_addr: u64,
    next_handle: u32,
    bounce: BTreeMap<u64, Vec<u8>>,
    violations: Vec<String>,
    map_calls: u64,
    /// Most mappings held at once.
    max_live: usize,
}

impl World {
    fn new(bounce_pages: usize) -> World {
        let mut w = World {
            next_addr: MAP_BASE,
            ..World::default()
        };
        for i in 0..bounce_pages {
            w.bounce
                .insert(BOUNCE_BASE + (i * PG) as u64, vec![0u8; PG]);
        }
        w
    }

    fn grant(&mut self, to: u16, readonly: bool) -> u32 {
        let gref = 8 + self.grants.len() as u32;
        self.front.push(vec![0u8; PG]);
        let page = self.front.len() - 1;
        self.grants.insert(gref, Grant { to, readonly, page });
        gref
    }

    fn front_page(&mut self, gref: u32) -> &mut Vec<u8> {
        let p = self.grants[&gref].page;
        &mut self.front[p]
    }

    /// Memory at `addr` in the driver domain, as its device or CPU sees it;
    /// anything else is a violation.
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
            let p = self.grants[&m.gref].page;
            return Some(&mut self.front[p][o..o + len]);
        }
        if self.bounce.contains_key(&base) {
            return self.bounce.get_mut(&base).map(|b| &mut b[o..o + len]);
        }
        self.violations
            .push(format!("access {addr:#x}+{len}: not mapped"));
        None
    }

    fn copy_one(&mut self, op: &CopyOp) -> GrantStatus {
        if usize::from(op.src.offset) + usize::from(op.len) > PG
            || usize::from(op.dst.offset) + usize::from(op.len) > PG
        {
            return GrantStatus::BadCopyArg;
        }
        let n = usize::from(op.len);
        let mut data = vec![0u8; n];
        // source
        if op.flags & copy_flags::SRC_GREF != 0 {
            let Some(g) = self.grants.get(&(op.src.gref_or_page as u32)) else {
                return GrantStatus::BadGntref;
            };
            if op.src.domid != FRONT {
                return GrantStatus::BadDomain;
            }
            if g.to != BACK {
                return GrantStatus::PermissionDenied;
            }
            let o = usize::from(op.src.offset);
            data.copy_from_slice(&self.front[g.page][o..o + n]);
        } else {
            let Some(b) = self.bounce.get(&(op.src.gref_or_page * 4096)) else {
                return GrantStatus::BadVirtAddr;
            };
            let o = usize::from(op.src.offset);
            data.copy_from_slice(&b[o..o + n]);
        }
        // destination
        if op.flags & copy_flags::DST_GREF != 0 {
            let Some(g) = self.grants.get(&(op.dst.gref_or_page as u32)) else {
                return GrantStatus::BadGntref;
            };
            if op.dst.domid != FRONT {
                return GrantStatus::BadDomain;
            }
            if g.to != BACK || g.readonly {
                return GrantStatus::PermissionDenied;
            }
            let o = usize::from(op.dst.offset);
            let p = g.page;
            self.front[p][o..o + data.len()].copy_from_slice(&data);
        } else {
            let Some(b) = self.bounce.get_mut(&(op.dst.gref_or_page * 4096)) else {
                return GrantStatus::BadVirtAddr;
            };
            let o = usize::from(op.dst.offset);
            b[o..o + data.len()].copy_from_slice(&data);
        }
        GrantStatus::Okay
    }
}

impl Grants for World {
    fn map(&mut self, dom: u16, gref: u32, readonly: bool) -> Result<Mapping, GrantStatus> {
        self.map_calls += 1;
        if dom != FRONT {
            return Err(GrantStatus::BadDomain);
        }
        let g = self.grants.get(&gref).ok_or(GrantStatus::BadGntref)?;
        if g.to != BACK || (!readonly && g.readonly) {
            return Err(GrantStatus::PermissionDenied);
        }
        let addr = self.next_addr;
        self.next_addr += PG as u64;
        self.next_handle += 1;
        self.maps.insert(
            addr,
            Mapped {
                gref,
                writable: !readonly,
                handle: self.next_handle,
            },
        );
        self.max_live = self.max_live.max(self.maps.len());
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
        if ops.len() > MAX_BATCH as usize {
            self.violations.push(format!("copy batch of {}", ops.len()));
            return Err(GrantStatus::General);
        }
        for op in ops.iter_mut() {
            op.status = self.copy_one(op) as i16;
        }
        Ok(())
    }

    fn read(&self, addr: u64, buf: &mut [u8]) {
        let base = addr & !0xfff;
        let o = (addr & 0xfff) as usize;
        assert!(o + buf.len() <= PG, "read crosses a page");
        if let Some(m) = self.maps.get(&base) {
            let p = self.grants[&m.gref].page;
            buf.copy_from_slice(&self.front[p][o..o + buf.len()]);
        } else if let Some(b) = self.bounce.get(&base) {
            buf.copy_from_slice(&b[o..o + buf.len()]);
        } else {
            panic!("backend read unmapped memory at {addr:#x}");
        }
    }
}

enum DevOp {
    Rw {
        sector: u64,
        dir: Direction,
        bufs: Vec<Buf>,
    },
    Flush,
}

/// The real disk: transfers happen when the test runs it.
struct Dev {
    disk: Vec<u8>,
    queue: Vec<(u64, DevOp)>,
    busy: bool,
    fail: bool,
    submits: u64,
    flushes: u64,
}

impl Dev {
    fn new() -> Dev {
        Dev {
            disk: vec![0xdd; (DISK_SECTORS * 512) as usize],
            queue: Vec::new(),
            busy: false,
            fail: false,
            submits: 0,
            flushes: 0,
        }
    }

    /// Carry out everything queued against `w`'s memory.
    fn run(&mut self, w: &mut World) -> Vec<(u64, bool)> {
        let mut done = Vec::new();
        for (token, op) in core::mem::take(&mut self.queue) {
            if let DevOp::Rw { sector, dir, bufs } = op {
                let total: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
                if sector < FIRST || sector * 512 + total > (FIRST + COUNT) * 512 {
                    w.violations
                        .push(format!("disk access {sector}+{total} outside the range"));
                    done.push((token, false));
                    continue;
                }
                let mut at = (sector * 512) as usize;
                for b in bufs {
                    // A buffer may span pages; each must be ours.
                    let mut addr = b.addr;
                    let end = b.addr + u64::from(b.len);
                    while addr < end {
                        let len = ((addr | 0xfff) + 1).min(end) - addr;
                        let len = len as usize;
                        if let Some(mem) = w.local(addr, len, dir == Direction::Read) {
                            match dir {
                                Direction::Read => mem.copy_from_slice(&self.disk[at..at + len]),
                                Direction::Write => self.disk[at..at + len].copy_from_slice(mem),
                            }
                        }
                        at += len;
                        addr += len as u64;
                    }
                }
            }
            done.push((token, !self.fail));
        }
        done
    }
}

impl BlockDevice for Dev {
    fn submit(
        &mut self,
        token: u64,
        sector: u64,
        dir: Direction,
        bufs: &[Buf],
    ) -> Result<(), DeviceError> {
        if self.busy {
            return Err(DeviceError::Busy);
        }
        self.submits += 1;
        self.queue.push((
            token,
            DevOp::Rw {
                sector,
                dir,
                bufs: bufs.to_vec(),
            },
        ));
        Ok(())
    }

    fn flush(&mut self, token: u64) -> Result<(), DeviceError> {
        if self.busy {
            return Err(DeviceError::Busy);
        }
        self.flushes += 1;
        self.queue.push((token, DevOp::Flush));
        Ok(())
    }
}

fn map_path(persistent: usize) -> DataPath {
    DataPath::Map { persistent }
}

const BOUNCE_PAGES: usize = MAX_INDIRECT_SEGMENTS as usize + 1;

fn copy_path() -> DataPath {
    DataPath::Copy {
        bounce: (0..BOUNCE_PAGES)
            .map(|i| BOUNCE_BASE + (i * PG) as u64)
            .collect(),
    }
}

fn config(path: DataPath, read_only: bool) -> Config {
    Config {
        frontend: FRONT,
        first_sector: FIRST,
        sectors: COUNT,
        read_only,
        path,
        max_indirect_segments: MAX_INDIRECT_SEGMENTS,
        map_quota: usize::MAX,
    }
}

struct H<P: RingPage = [u8; RING_PAGE]> {
    page: P,
    front: FrontRing,
    world: World,
    dev: Dev,
    be: Backend,
    notifies: u32,
}

impl H {
    fn new(path: DataPath, read_only: bool) -> H {
        H::new_at(path, read_only, 0)
    }

    fn new_at(path: DataPath, read_only: bool, start: u32) -> H {
        let mut page = [0u8; RING_PAGE];
        let front = FrontRing::init_at(&mut page, ENTRY_SIZE, start);
        H::with_page(page, front, path, read_only)
    }
}

impl<P: RingPage> H<P> {
    fn with_page(mut page: P, front: FrontRing, path: DataPath, read_only: bool) -> H<P> {
        let mut h = H {
            world: World::new(BOUNCE_PAGES),
            dev: Dev::new(),
            be: Backend::new(config(path, read_only)).unwrap(),
            front,
            page: {
                page.store_u32(off::FRONT_STATE, State::Connected as u32);
                page
            },
            notifies: 0,
        };
        let p = h.poll();
        assert!(p.connected);
        assert_eq!(ring::back_state(&h.page), Some(State::Connected));
        assert_eq!(
            h.page.load_u32(off::BACK_MAX_INDIRECT),
            u32::from(MAX_INDIRECT_SEGMENTS)
        );
        h
    }

    fn poll(&mut self) -> Poll {
        let p = self.be.poll(&mut self.page, &mut self.world, &mut self.dev);
        self.notifies += u32::from(p.notify);
        p
    }

    /// Run the device until nothing is queued, completing each request.
    fn drain(&mut self) -> Poll {
        let mut acc = self.poll();
        for _ in 0..10_000 {
            if self.dev.queue.is_empty() && !acc.more {
                break;
            }
            acc.more = false;
            if !self.dev.queue.is_empty() {
                for (t, ok) in self.dev.run(&mut self.world) {
                    let p = self
                        .be
                        .complete(t, ok, &mut self.page, &mut self.world, &mut self.dev);
                    self.notifies += u32::from(p.notify);
                    acc.more |= p.more;
                    acc.closed |= p.closed;
                    acc.hostile |= p.hostile;
                }
            } else {
                let p = self.poll();
                acc.more |= p.more;
                acc.closed |= p.closed;
                acc.hostile |= p.hostile;
            }
        }
        acc
    }

    fn send(&mut self, entry: &[u8]) {
        self.front.put_request(&mut self.page, entry).unwrap();
        self.front.push_requests(&mut self.page);
    }

    fn responses(&mut self) -> Vec<Response> {
        let mut out = Vec::new();
        let mut b = [0u8; blkif::RESPONSE_SIZE];
        while self.front.take_response(&self.page, &mut b).unwrap() {
            out.push(Response::decode(&b));
        }
        out
    }

    /// Send one request, run everything, return its one response.
    fn one(&mut self, entry: &[u8]) -> Response {
        self.send(entry);
        self.drain();
        let r = self.responses();
        assert_eq!(r.len(), 1, "{r:?}");
        r[0]
    }

    fn assert_clean(&self) {
        assert!(
            self.world.violations.is_empty(),
            "{:?}",
            self.world.violations
        );
    }
}

fn seg(gref: u32, first: u8, last: u8) -> Segment {
    Segment {
        gref,
        first_sect: first,
        last_sect: last,
    }
}

fn rw(operation: u8, id: u64, sector: u64, segs: &[Segment]) -> [u8; ENTRY_SIZE] {
    let mut r = Request {
        operation,
        nr_segments: segs.len() as u8,
        handle: 0,
        id,
        sector,
        ..Request::default()
    };
    r.seg[..segs.len()].copy_from_slice(segs);
    r.encode()
}

fn indirect(indirect_op: u8, id: u64, sector: u64, n: u16, pages: &[u32]) -> [u8; ENTRY_SIZE] {
    let mut grefs = [0u32; 8];
    grefs[..pages.len()].copy_from_slice(pages);
    let r = IndirectRequest {
        operation: op::INDIRECT,
        indirect_op,
        nr_segments: n,
        id,
        sector,
        handle: 0,
        indirect_grefs: grefs,
    };
    let mut e = [0u8; ENTRY_SIZE];
    e[..blkif::INDIRECT_SIZE].copy_from_slice(&r.encode());
    e
}

fn paths() -> [DataPath; 3] {
    [map_path(64), map_path(0), copy_path()]
}

fn disk_at(h: &H, sector: u64, len: usize) -> &[u8] {
    let o = ((FIRST + sector) * 512) as usize;
    &h.dev.disk[o..o + len]
}

#[test]
fn write_then_read_round_trip() {
    for path in paths() {
        let mut h = H::new(path.clone(), false);
        let a = h.world.grant(BACK, true);
        let b = h.world.grant(BACK, false);
        for (i, x) in h.world.front_page(a).iter_mut().enumerate() {
            *x = i as u8;
        }
        for x in h.world.front_page(b).iter_mut() {
            *x = 0x5a;
        }
        // sectors 10..=12 from a[1..=3], 13..=20 from b[0..=7]
        let r = h.one(&rw(op::WRITE, 77, 10, &[seg(a, 1, 3), seg(b, 0, 7)]));
        assert_eq!(
            r,
            Response {
                id: 77,
                operation: op::WRITE,
                status: status::OKAY
            },
            "{path:?}"
        );
        let expect: Vec<u8> = (512..2048).map(|i| i as u8).collect();
        assert_eq!(disk_at(&h, 10, 1536), &expect[..]);
        assert!(disk_at(&h, 13, 4096).iter().all(|x| *x == 0x5a));
        assert_eq!(disk_at(&h, 9, 512), &[0xdd; 512][..]);
        assert_eq!(disk_at(&h, 21, 512), &[0xdd; 512][..]);
        // read it back into a fresh writable page
        let c = h.world.grant(BACK, false);
        let r = h.one(&rw(op::READ, 78, 10, &[seg(c, 4, 6)]));
        assert_eq!(r.status, status::OKAY);
        assert_eq!(r.id, 78);
        assert_eq!(&h.world.front_page(c)[2048..3584], &expect[..]);
        assert!(h.world.front_page(c)[..2048].iter().all(|x| *x == 0));
        let s = *h.be.stats();
        assert_eq!((s.reads, s.writes, s.requests), (1, 1, 2));
        assert_eq!((s.bytes_read, s.bytes_written), (1536, 1536 + 4096));
        assert_eq!(s.total_errors(), 0);
        h.assert_clean();
    }
}

#[test]
fn flush_round_trip() {
    for path in paths() {
        let mut h = H::new(path, true);
        let r = h.one(&rw(op::FLUSH_DISKCACHE, 5, 0, &[]));
        assert_eq!(r.status, status::OKAY);
        assert_eq!(r.operation, op::FLUSH_DISKCACHE);
        assert_eq!(h.dev.flushes, 1);
        assert_eq!(h.be.stats().flushes, 1);
    }
}

#[test]
fn indirect_round_trip() {
    for path in paths() {
        let mut h = H::new(path.clone(), false);
        let n = MAX_INDIRECT_SEGMENTS;
        let list = h.world.grant(BACK, true);
        // 256 segments of one sector each, over 8 data pages: 128 sectors
        // covering the whole virtual disk.
        let data: Vec<u32> = (0..8).map(|_| h.world.grant(BACK, false)).collect();
        for (i, d) in data.iter().enumerate() {
            let pg = h.world.front_page(*d);
            for (j, x) in pg.iter_mut().enumerate() {
                *x = (i * 31 + j / 512) as u8;
            }
        }
        for i in 0..n as usize {
            let d = data[i % 8];
            let sect = ((i / 8) % 8) as u8;
            let s = seg(d, sect, sect);
            h.world.front_page(list)[i * 8..i * 8 + 8].copy_from_slice(&s.encode());
        }
        // 256 sectors would overrun the 128-sector disk
        let r = h.one(&indirect(op::WRITE, 1, 0, n, &[list]));
        assert_eq!(r.status, status::ERROR, "{path:?}");
        assert_eq!(h.be.stats().errors(Reject::OutOfRange), 1);
        // use the first 128 segments
        let r = h.one(&indirect(op::WRITE, 2, 0, 128, &[list]));
        assert_eq!(r.status, status::OKAY);
        assert_eq!(r.operation, op::INDIRECT);
        for i in 0..128usize {
            let want = ((i % 8) * 31 + (i / 8) % 8) as u8;
            assert!(disk_at(&h, i as u64, 512).iter().all(|x| *x == want), "{i}");
        }
        // read sectors 0..128 back into 16 fresh pages, one segment per
        // sector: page k sector j is disk sector 8k + j
        let back: Vec<u32> = (0..16).map(|_| h.world.grant(BACK, false)).collect();
        let list2 = h.world.grant(BACK, true);
        for i in 0..128usize {
            let s = seg(back[i / 8], (i % 8) as u8, (i % 8) as u8);
            h.world.front_page(list2)[i * 8..i * 8 + 8].copy_from_slice(&s.encode());
        }
        let r = h.one(&indirect(op::READ, 3, 0, 128, &[list2]));
        assert_eq!(r.status, status::OKAY);
        for (k, g) in back.iter().enumerate() {
            let pg = h.world.front_page(*g).clone();
            for j in 0..8usize {
                let i = 8 * k + j;
                let want = ((i % 8) * 31 + (i / 8) % 8) as u8;
                assert!(pg[j * 512..j * 512 + 512].iter().all(|x| *x == want));
            }
        }
        let s = h.be.stats();
        assert_eq!(s.indirect, 3);
        assert_eq!(s.bytes_read, 128 * 512);
        h.assert_clean();
    }
}

/// In the map path an indirect page is a persistent grant like a data
/// page: mapped once, yet its segment list is read afresh (and checked
/// again) for every request that names it.
#[test]
fn indirect_pages_are_persistent_and_read_afresh() {
    let mut h = H::new(map_path(64), false);
    for (i, x) in h.dev.disk.iter_mut().enumerate() {
        *x = (i / 512) as u8;
    }
    let list = h.world.grant(BACK, true);
    let a = h.world.grant(BACK, false);
    let b = h.world.grant(BACK, false);
    let put = |h: &mut H, segs: &[Segment]| {
        for (i, s) in segs.iter().enumerate() {
            h.world.front_page(list)[i * 8..i * 8 + 8].copy_from_slice(&s.encode());
        }
    };
    put(&mut h, &[seg(a, 0, 7), seg(b, 0, 7)]);
    let r = h.one(&indirect(op::READ, 1, 0, 2, &[list]));
    assert_eq!(r.status, status::OKAY);
    assert_eq!(h.world.front_page(b)[0], (FIRST + 8) as u8);
    let s = *h.be.stats();
    assert_eq!((s.maps, s.unmaps, s.persistent_hits), (3, 0, 0));
    assert_eq!(h.be.persistent_grants(), 3);
    // The same list page with other contents: read again, no new maps.
    put(&mut h, &[seg(b, 0, 3), seg(a, 4, 7)]);
    let r = h.one(&indirect(op::READ, 2, 16, 2, &[list]));
    assert_eq!(r.status, status::OKAY);
    assert_eq!(h.world.front_page(b)[0], (FIRST + 16) as u8);
    assert_eq!(h.world.front_page(b)[2047], (FIRST + 19) as u8);
    assert_eq!(h.world.front_page(a)[2048], (FIRST + 20) as u8);
    assert_eq!(h.world.front_page(a)[4095], (FIRST + 23) as u8);
    let s = *h.be.stats();
    assert_eq!((s.maps, s.unmaps, s.persistent_hits), (3, 0, 3));
    // A list that turned bad is refused like any other.
    put(&mut h, &[seg(a, 0, 9)]);
    let r = h.one(&indirect(op::READ, 3, 0, 1, &[list]));
    assert_eq!(r.status, status::ERROR);
    assert_eq!(h.be.stats().errors(Reject::Segment), 1);
    h.assert_clean();
    h.be.close(&mut h.page, &mut h.world);
    assert!(h.world.maps.is_empty());
    assert_eq!(h.be.stats().unmaps, 3);
    // Without room for persistent grants the list is mapped and unmapped
    // for each request.
    let mut h = H::new(map_path(0), false);
    let list = h.world.grant(BACK, true);
    let a = h.world.grant(BACK, false);
    h.world.front_page(list)[..8].copy_from_slice(&seg(a, 0, 7).encode());
    for id in 0..2 {
        assert_eq!(h.one(&indirect(op::READ, id, 0, 1, &[list])).status, 0);
    }
    let s = *h.be.stats();
    assert_eq!((s.maps, s.unmaps), (4, 4));
    assert!(h.world.maps.is_empty());
    h.assert_clean();
}

/// Refs past the largest grant table are never cached (their map fails),
/// and the cache holds no more than its budget.
#[test]
fn persistent_cache_bounds() {
    let mut c = Cache::new(2);
    let m = |addr| Mapping { handle: 1, addr };
    assert!(c.insert(5, m(0x1000), true));
    assert!(!c.insert(5, m(0x2000), true), "a ref is cached once");
    assert!(!c.insert(GREFS as u32, m(0x3000), true));
    assert!(!c.insert(u32::MAX, m(0x3000), true));
    assert!(!c.insert(6, m(0x3004), true), "not a page");
    assert!(c.insert(GREFS as u32 - 1, m(0x4000), false));
    assert!(!c.insert(7, m(0x5000), true), "full");
    let p = c.get(5).unwrap();
    assert_eq!((p.addr, p.writable), (0x1000, true));
    let p = c.get(GREFS as u32 - 1).unwrap();
    assert_eq!((p.addr, p.writable), (0x4000, false));
    assert!(c.get(7).is_none() && c.get(u32::MAX).is_none());
    assert_eq!(c.take_all().len(), 2);
    assert!(c.get(5).is_none());
    assert!(!Cache::new(0).insert(1, m(0x1000), true));
}

/// Every request the hostile guest of the `hostile-blkfront` scenario
/// sends, and a few more: each answered with its id and the right status,
/// none reaching the device.
#[test]
fn hostile_requests_rejected() {
    for path in paths() {
        let mut h = H::new(path.clone(), false);
        let rw_page = h.world.grant(BACK, false);
        let ro_page = h.world.grant(BACK, true);
        let others = h.world.grant(OTHER, false);
        let ungranted = 999;
        let mut twelve = Request {
            operation: op::READ,
            nr_segments: 12,
            id: 1,
            ..Request::default()
        };
        for s in twelve.seg.iter_mut() {
            *s = seg(rw_page, 0, 7);
        }
        let bad_list = h.world.grant(BACK, true);
        h.world.front_page(bad_list)[8..16].copy_from_slice(&seg(rw_page, 0, 8).encode());
        let mut discard = [0u8; ENTRY_SIZE];
        discard[..32].copy_from_slice(
            &DiscardRequest {
                operation: op::DISCARD,
                id: 14,
                sector: 0,
                nr_sectors: 8,
                ..DiscardRequest::default()
            }
            .encode(),
        );
        let cases: Vec<([u8; ENTRY_SIZE], i16, Option<Reject>)> = vec![
            (twelve.encode(), status::ERROR, Some(Reject::SegmentCount)),
            (
                rw(op::READ, 2, 0, &[seg(rw_page, 3, 2)]),
                status::ERROR,
                Some(Reject::Segment),
            ),
            (
                rw(op::READ, 3, 0, &[seg(rw_page, 0, 8)]),
                status::ERROR,
                Some(Reject::Segment),
            ),
            (
                rw(op::WRITE, 4, COUNT - 1, &[seg(rw_page, 0, 1)]),
                status::ERROR,
                Some(Reject::OutOfRange),
            ),
            (
                rw(op::READ, 5, u64::MAX - 1, &[seg(rw_page, 0, 7)]),
                status::ERROR,
                Some(Reject::OutOfRange),
            ),
            (
                rw(7, 6, 0, &[seg(rw_page, 0, 0)]),
                status::EOPNOTSUPP,
                Some(Reject::UnknownOp),
            ),
            (
                rw(0xff, 7, 0, &[]),
                status::EOPNOTSUPP,
                Some(Reject::UnknownOp),
            ),
            (
                rw(op::READ, 8, 0, &[seg(ungranted, 0, 7)]),
                status::ERROR,
                Some(Reject::Grant),
            ),
            (
                rw(op::WRITE, 9, 0, &[seg(others, 0, 7)]),
                status::ERROR,
                Some(Reject::Grant),
            ),
            (
                rw(op::READ, 10, 0, &[seg(ro_page, 0, 7)]),
                status::ERROR,
                Some(Reject::Grant),
            ),
            (
                rw(op::READ, 11, 0, &[]),
                status::ERROR,
                Some(Reject::SegmentCount),
            ),
            (
                rw(op::FLUSH_DISKCACHE, 12, 0, &[seg(rw_page, 0, 0)]),
                status::ERROR,
                Some(Reject::SegmentCount),
            ),
            (
                rw(op::WRITE_BARRIER, 13, 0, &[seg(rw_page, 0, 0)]),
                status::EOPNOTSUPP,
                Some(Reject::Unsupported),
            ),
            (discard, status::EOPNOTSUPP, Some(Reject::Unsupported)),
            (
                indirect(op::FLUSH_DISKCACHE, 15, 0, 1, &[bad_list]),
                status::ERROR,
                Some(Reject::IndirectOp),
            ),
            (
                indirect(op::READ, 16, 0, MAX_INDIRECT_SEGMENTS + 1, &[bad_list]),
                status::ERROR,
                Some(Reject::SegmentCount),
            ),
            (
                indirect(op::READ, 17, 0, 0, &[bad_list]),
                status::ERROR,
                Some(Reject::SegmentCount),
            ),
            (
                indirect(op::READ, 18, 0, 2, &[bad_list]),
                status::ERROR,
                Some(Reject::Segment),
            ),
            (
                indirect(op::READ, 19, 0, 1, &[ungranted]),
                status::ERROR,
                Some(Reject::Grant),
            ),
            (
                indirect(op::READ, 20, 0, 1, &[others]),
                status::ERROR,
                Some(Reject::Grant),
            ),
        ];
        let copy = matches!(path, DataPath::Copy { .. });
        for (entry, st, reason) in &cases {
            let before = *h.be.stats();
            let submits = h.dev.submits;
            let ro_before = h.world.front_page(ro_page).clone();
            let r = h.one(entry);
            assert_eq!(r.id, blkif::entry_id(entry), "{path:?}");
            assert_eq!(r.operation, entry[0]);
            assert_eq!(r.status, *st, "id {} {path:?}", r.id);
            if let Some(reason) = reason {
                assert_eq!(
                    h.be.stats().errors(*reason),
                    before.errors(*reason) + 1,
                    "id {}",
                    r.id
                );
            }
            // On the copy path a READ's refs are first used by the copy
            // back, so a READ into an ungranted or read-only ref reaches
            // the device (which only writes a bounce page); the copy back
            // is refused.
            if !(copy && (r.id == 8 || r.id == 10)) {
                assert_eq!(h.dev.submits, submits, "id {} reached the device", r.id);
            }
            assert_eq!(h.world.front_page(ro_page), &ro_before);
        }
        // a WRITE on a read-only disk
        let mut h2 = H::new(path.clone(), true);
        let p = h2.world.grant(BACK, false);
        let r = h2.one(&rw(op::WRITE, 21, 0, &[seg(p, 0, 7)]));
        assert_eq!(r.status, status::ERROR);
        assert_eq!(h2.be.stats().errors(Reject::ReadOnly), 1);
        let r = h2.one(&indirect(op::WRITE, 22, 0, 1, &[p]));
        assert_eq!(r.status, status::ERROR);
        assert_eq!(h2.be.stats().errors(Reject::ReadOnly), 2);
        assert_eq!(h2.dev.submits, 0);
        // the connection still serves honest requests
        let r = h.one(&rw(op::WRITE, 23, 0, &[seg(rw_page, 0, 7)]));
        assert_eq!(r.status, status::OKAY);
        assert_eq!(h.be.conn(), Conn::Connected);
        h.assert_clean();
        h2.assert_clean();
        // nothing stays mapped but persistent grants
        h.be.close(&mut h.page, &mut h.world);
        assert!(h.world.maps.is_empty());
        assert_eq!(
            h.be.free_bounce_pages(),
            if copy { BOUNCE_PAGES - 1 } else { 0 }
        );
    }
}

#[test]
fn device_failure_and_busy() {
    for path in paths() {
        let mut h = H::new(path, false);
        let p = h.world.grant(BACK, false);
        h.dev.fail = true;
        let r = h.one(&rw(op::READ, 1, 0, &[seg(p, 0, 7)]));
        assert_eq!(r.status, status::ERROR);
        assert_eq!(h.be.stats().errors(Reject::Device), 1);
        h.dev.fail = false;
        h.dev.busy = true;
        h.send(&rw(op::READ, 2, 0, &[seg(p, 0, 7)]));
        h.send(&rw(op::READ, 3, 8, &[seg(p, 0, 7)]));
        h.poll();
        assert!(h.be.stalled.is_some());
        assert!(h.responses().is_empty());
        h.dev.busy = false;
        h.drain();
        let ids: Vec<u64> = h.responses().iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![2, 3]);
        assert!(h.be.stats().stalls >= 1);
        h.assert_clean();
    }
}

#[test]
fn bounce_pages_run_out_and_come_back() {
    let mut h = H::new(copy_path(), false);
    let pages: Vec<u32> = (0..11).map(|_| h.world.grant(BACK, false)).collect();
    let segs: Vec<Segment> = pages.iter().map(|g| seg(*g, 0, 0)).collect();
    // 32 requests of 11 pages = 352 > 256 bounce pages
    for i in 0..32u64 {
        h.send(&rw(op::WRITE, i, 0, &segs));
    }
    h.poll();
    assert_eq!(h.be.in_flight(), (BOUNCE_PAGES - 1) / 11);
    assert!(h.be.stalled.is_some());
    h.drain();
    let r = h.responses();
    assert_eq!(r.len(), 32);
    assert!(r
        .iter()
        .enumerate()
        .all(|(i, r)| r.id == i as u64 && r.status == 0));
    assert_eq!(h.be.free_bounce_pages(), BOUNCE_PAGES - 1);
    h.assert_clean();
}

/// The buffers of every request the device holds now.
fn queued_bufs(h: &H) -> Vec<Vec<Buf>> {
    h.dev
        .queue
        .iter()
        .filter_map(|(_, op)| match op {
            DevOp::Rw { bufs, .. } => Some(bufs.clone()),
            DevOp::Flush => None,
        })
        .collect()
}

#[test]
fn bounce_pages_of_a_request_are_adjacent() {
    let mut h = H::new(copy_path(), false);
    let pages: Vec<u32> = (0..11).map(|_| h.world.grant(BACK, true)).collect();
    let segs: Vec<Segment> = pages.iter().map(|g| seg(*g, 0, 7)).collect();
    // Three rounds of three 11-page READs; from the second on, every page
    // taken was given back by an earlier request.
    for round in 0..3u64 {
        for i in 0..3 {
            h.send(&rw(op::READ, round * 3 + i, 0, &segs));
        }
        h.poll();
        let reqs = queued_bufs(&h);
        assert_eq!(reqs.len(), 3);
        for bufs in &reqs {
            // one buffer of 11 adjacent pages
            assert_eq!(bufs.len(), 1, "round {round}: {bufs:x?}");
            assert_eq!(bufs[0].len, 11 * 4096);
        }
        h.drain();
        assert_eq!(h.responses().len(), 3);
        assert_eq!(h.be.free_bounce_pages(), BOUNCE_PAGES - 1);
    }
    h.assert_clean();
}

/// Segments that follow each other in memory go to the device as one
/// buffer; a gap or a partial page starts a new one.
#[test]
fn adjacent_segments_are_one_buffer() {
    let mut h = H::new(map_path(64), false);
    // The fake hypervisor maps refs at consecutive addresses.
    let g: Vec<u32> = (0..4).map(|_| h.world.grant(BACK, false)).collect();
    h.send(&rw(
        op::READ,
        1,
        0,
        &[
            seg(g[0], 0, 7),
            seg(g[1], 0, 7),
            seg(g[2], 0, 3),
            seg(g[3], 0, 7),
        ],
    ));
    h.poll();
    let bufs = &queued_bufs(&h)[0];
    assert_eq!(bufs.len(), 2, "{bufs:x?}");
    assert_eq!(bufs[0].len, 2 * 4096 + 2048);
    assert_eq!(bufs[1].len, 4096);
    h.drain();
    assert_eq!(h.responses()[0].status, status::OKAY);
    assert_eq!(h.world.front_page(g[3])[0], 0xdd);
    h.assert_clean();
}

/// Completions retired one by one are published by one poll.
#[test]
fn retired_requests_are_answered_by_the_next_poll() {
    for path in paths() {
        let mut h = H::new(path.clone(), false);
        let p = h.world.grant(BACK, false);
        for id in 0..3 {
            h.send(&rw(op::READ, id, 8 * id, &[seg(p, 0, 7)]));
        }
        h.poll();
        let done = h.dev.run(&mut h.world);
        assert_eq!(done.len(), 3);
        for (t, ok) in &done {
            assert!(h.be.retire(*t, *ok, &mut h.page, &mut h.world));
        }
        assert!(!h.be.retire(done[0].0, true, &mut h.page, &mut h.world));
        assert_eq!(h.be.stats().stale_completions, 1);
        assert_eq!(h.be.in_flight(), 0);
        assert!(h.responses().is_empty(), "published before the poll");
        let before = h.notifies;
        h.poll();
        assert_eq!(h.notifies, before + 1, "{path:?}");
        let ids: Vec<u64> = h.responses().iter().map(|r| r.id).collect();
        assert_eq!(ids, [0, 1, 2]);
        h.assert_clean();
    }
}

#[test]
fn free_pages_take_the_lowest_run() {
    let pg = |i: u64| i * PAGE_SIZE;
    let mut f = FreePages::new([8, 1, 2, 3, 5, 6, 7].map(pg).to_vec());
    let take = |f: &mut FreePages, n| {
        let mut got = vec![];
        f.take(n, |page, i| got.push((page, i))).then_some(got)
    };
    // The first run of 4 is 5..=8 (positions 3..=6); of 2, 1..=2.
    assert_eq!(
        take(&mut f, 4).unwrap(),
        [(pg(5), 3), (pg(6), 4), (pg(7), 5), (pg(8), 6)]
    );
    assert_eq!(take(&mut f, 2).unwrap(), [(pg(1), 0), (pg(2), 1)]);
    f.give(5);
    f.give(3);
    // No run of 3 in {3, 5, 7}: the lowest pages, ascending.
    assert!(take(&mut f, 4).is_none());
    assert_eq!(f.len(), 3);
    assert_eq!(
        take(&mut f, 3).unwrap(),
        [(pg(3), 2), (pg(5), 3), (pg(7), 5)]
    );
    assert_eq!(f.len(), 0);
    assert_eq!(take(&mut f, 0).unwrap(), []);
    // Beyond one word of the bitmap: pages that are never adjacent...
    let mut f = FreePages::new((0..200).map(|i| pg(2 * i)).collect());
    for i in 0..200 {
        assert_eq!(take(&mut f, 1).unwrap(), [(pg(2 * i as u64), i)]);
    }
    f.give(130);
    f.give(70);
    assert_eq!(take(&mut f, 2).unwrap(), [(pg(140), 70), (pg(260), 130)]);
    // ...and a run across a word boundary.
    let mut f = FreePages::new((0..130).map(pg).collect());
    assert_eq!(take(&mut f, 60).unwrap().len(), 60);
    let got = take(&mut f, 70).unwrap();
    assert_eq!(got.first(), Some(&(pg(60), 60)));
    assert_eq!(got.last(), Some(&(pg(129), 129)));
    assert_eq!(f.len(), 0);
}

#[test]
fn persistent_grants_are_reused() {
    let mut h = H::new(map_path(2), false);
    let a = h.world.grant(BACK, false);
    let b = h.world.grant(BACK, false);
    let c = h.world.grant(BACK, false);
    for i in 0..5 {
        let r = h.one(&rw(
            op::READ,
            i,
            0,
            &[seg(a, 0, 7), seg(b, 0, 7), seg(c, 0, 7)],
        ));
        assert_eq!(r.status, status::OKAY);
    }
    let s = *h.be.stats();
    // a and b mapped once; c (past the cache) once per request
    assert_eq!(s.maps, 2 + 5);
    assert_eq!(s.persistent_hits, 2 * 4);
    assert_eq!(s.unmaps, 5);
    assert_eq!(h.be.persistent_grants(), 2);
    assert_eq!(h.world.maps.len(), 2);
    // a read-only persistent mapping is not used for a READ
    let mut h = H::new(map_path(8), false);
    let d = h.world.grant(BACK, false);
    assert_eq!(h.one(&rw(op::WRITE, 1, 0, &[seg(d, 0, 7)])).status, 0);
    assert_eq!(h.one(&rw(op::READ, 2, 0, &[seg(d, 0, 7)])).status, 0);
    assert_eq!(h.one(&rw(op::WRITE, 3, 0, &[seg(d, 0, 7)])).status, 0);
    let s = *h.be.stats();
    assert_eq!((s.maps, s.persistent_hits, s.unmaps), (2, 1, 1));
    h.assert_clean();
    // closing unmaps them all
    let p = h.be.close(&mut h.page, &mut h.world);
    assert!(p.closed);
    assert!(h.world.maps.is_empty());
    assert_eq!(ring::back_state(&h.page), Some(State::Closed));
}

#[test]
fn req_prod_past_the_ring_ends_the_connection() {
    for path in paths() {
        let mut h = H::new_at(path, false, u32::MAX - 3);
        let p = h.world.grant(BACK, false);
        // one honest request in flight
        h.send(&rw(op::READ, 1, 0, &[seg(p, 0, 7)]));
        h.poll();
        assert_eq!(h.be.in_flight(), 1);
        // then req_prod jumps 40 past rsp_prod
        let prod = h.page.load_u32(off::REQ_PROD);
        h.page.store_u32(off::REQ_PROD, prod.wrapping_add(40));
        let out = h.poll();
        assert!(out.hostile);
        assert!(!out.closed, "the device still holds a request");
        assert_eq!(h.be.conn(), Conn::Closing);
        assert_eq!(ring::back_state(&h.page), Some(State::Closing));
        assert!(matches!(h.be.hostile(), Some(ring::Error::Overrun { .. })));
        let rsp_prod = h.page.load_u32(off::RSP_PROD);
        let out = h.drain();
        assert!(out.closed);
        assert_eq!(h.be.conn(), Conn::Closed);
        assert_eq!(ring::back_state(&h.page), Some(State::Closed));
        // no responses written into the hostile ring, nothing left mapped
        assert_eq!(h.page.load_u32(off::RSP_PROD), rsp_prod);
        assert!(h.world.maps.is_empty());
        assert_eq!(h.be.stats().hostile, 1);
        assert_eq!(h.be.stats().requests, 1);
        // later polls do nothing
        let out = h.poll();
        assert_eq!(out, Poll::default());
        h.assert_clean();
    }
}

#[test]
fn req_prod_moving_backwards_is_hostile() {
    let mut h = H::new(map_path(4), false);
    let p = h.world.grant(BACK, false);
    h.one(&rw(op::READ, 1, 0, &[seg(p, 0, 7)]));
    h.page.store_u32(off::REQ_PROD, 0);
    let out = h.poll();
    assert!(out.hostile && out.closed);
    assert!(h.world.maps.is_empty());
}

#[test]
fn frontend_closes_cleanly() {
    for path in paths() {
        let mut h = H::new(path, false);
        let p = h.world.grant(BACK, false);
        h.send(&rw(op::READ, 1, 0, &[seg(p, 0, 7)]));
        h.poll();
        h.front.set_state(&mut h.page, State::Closing);
        let out = h.poll();
        assert!(!out.hostile && !out.closed);
        assert_eq!(ring::back_state(&h.page), Some(State::Closing));
        let out = h.drain();
        assert!(out.closed);
        // the request in flight was answered
        let r = h.responses();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].status, status::OKAY);
        assert_eq!(ring::back_state(&h.page), Some(State::Closed));
        assert!(h.world.maps.is_empty());
        assert_eq!(h.be.stats().hostile, 0);
    }
}

#[test]
fn waits_for_the_frontend_to_connect() {
    let mut page = [0u8; RING_PAGE];
    FrontRing::init(&mut page, ENTRY_SIZE);
    let mut world = World::new(0);
    let mut dev = Dev::new();
    let mut be = Backend::new(config(map_path(4), false)).unwrap();
    assert_eq!(be.poll(&mut page, &mut world, &mut dev), Poll::default());
    assert_eq!(be.conn(), Conn::Waiting);
    page.store_u32(off::FRONT_STATE, State::Connected as u32);
    let p = be.poll(&mut page, &mut world, &mut dev);
    assert!(p.connected && p.notify);
    assert_eq!(be.conn(), Conn::Connected);
}

/// A ring page whose frontend rewrites a slot right after the backend has
/// read it (the double-fetch attack): it counts the reads of that slot.
struct Rewriting {
    page: [u8; RING_PAGE],
    slot_off: usize,
    replacement: [u8; ENTRY_SIZE],
    reads: core::cell::Cell<u32>,
    pending: core::cell::Cell<bool>,
}

impl RingPage for Rewriting {
    fn load_u32(&self, off: usize) -> u32 {
        self.page.load_u32(off)
    }
    fn store_u32(&mut self, off: usize, v: u32) {
        self.apply();
        self.page.store_u32(off, v)
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        if off == self.slot_off {
            self.reads.set(self.reads.get() + 1);
            self.pending.set(true);
        }
        self.page.read(off, buf)
    }
    fn write(&mut self, off: usize, buf: &[u8]) {
        self.apply();
        self.page.write(off, buf)
    }
    fn fence(&self) {}
}

impl Rewriting {
    /// The "concurrent" rewrite lands at the backend's next store.
    fn apply(&mut self) {
        if self.pending.replace(false) {
            let o = self.slot_off;
            self.page[o..o + ENTRY_SIZE].copy_from_slice(&self.replacement);
        }
    }
}

#[test]
fn request_rewritten_after_publishing() {
    for path in paths() {
        let mut raw = [0u8; RING_PAGE];
        let front = FrontRing::init(&mut raw, ENTRY_SIZE);
        let page = Rewriting {
            page: raw,
            slot_off: ring::HEADER_SIZE,
            replacement: [0; ENTRY_SIZE],
            reads: core::cell::Cell::new(0),
            pending: core::cell::Cell::new(false),
        };
        let mut h = H::with_page(page, front, path.clone(), false);
        let p = h.world.grant(BACK, false);
        let q = h.world.grant(BACK, false);
        // published: READ 8 sectors at 0 into p; rewritten to 12 segments
        // of q at a sector past the disk, with another id
        let mut evil = Request {
            operation: op::WRITE,
            nr_segments: 12,
            id: 666,
            sector: COUNT + 1000,
            ..Request::default()
        };
        for s in evil.seg.iter_mut() {
            *s = seg(q, 0, 9);
        }
        h.page.replacement = evil.encode();
        h.send(&rw(op::READ, 42, 0, &[seg(p, 0, 7)]));
        h.drain();
        assert_eq!(h.page.reads.get(), 1, "the backend read the slot once");
        let r = h.responses();
        assert_eq!(blkif::entry_id(&h.page.replacement), 666);
        // the slot now holds the response; the request that was acted on
        // is the one copied out
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].id, 42);
        assert_eq!(r[0].operation, op::READ);
        assert_eq!(r[0].status, status::OKAY, "{path:?}");
        assert_eq!(h.dev.submits, 1);
        assert!(h.world.front_page(p).iter().all(|x| *x == 0xdd));
        assert!(h.world.front_page(q).iter().all(|x| *x == 0));
        h.assert_clean();
    }
}

#[test]
fn indices_across_the_wrap() {
    for path in paths() {
        let mut h = H::new_at(path, false, u32::MAX - 50);
        let p = h.world.grant(BACK, false);
        let mut id = 0u64;
        for round in 0..8 {
            let n = 1 + (round * 5) % 32;
            for _ in 0..n {
                h.send(&rw(op::WRITE, id, id % COUNT, &[seg(p, 0, 0)]));
                id += 1;
            }
            h.drain();
            let r = h.responses();
            assert_eq!(r.len(), n as usize);
            assert!(r.iter().all(|r| r.status == 0));
        }
        assert!(h.be.ring.as_ref().unwrap().req_cons() < 200);
        assert_eq!(h.be.stats().writes, id);
        h.assert_clean();
    }
}

#[test]
fn notifications_follow_the_ring_rule() {
    let mut h = H::new(map_path(4), false);
    let p = h.world.grant(BACK, false);
    h.notifies = 0;
    // the frontend asked for a response event (rsp_event = 1 at init)
    h.one(&rw(op::READ, 1, 0, &[seg(p, 0, 0)]));
    assert_eq!(h.notifies, 1);
    // the frontend does not re-arm: no notification for the next one
    h.send(&rw(op::READ, 2, 0, &[seg(p, 0, 0)]));
    h.drain();
    assert_eq!(h.notifies, 1);
    assert_eq!(h.responses().len(), 1);
    // re-armed: notified again
    assert!(!h.front.final_check_for_responses(&mut h.page).unwrap());
    h.one(&rw(op::READ, 3, 0, &[seg(p, 0, 0)]));
    assert_eq!(h.notifies, 2);
    // and the backend left req_event at req_cons + 1
    assert_eq!(h.page.load_u32(off::REQ_EVENT), 4);
}

#[test]
fn config_checked() {
    let mut c = config(map_path(0), false);
    c.first_sector = u64::MAX;
    assert_eq!(Backend::new(c).unwrap_err(), ConfigError::RangeOverflow);
    let mut c = config(map_path(0), false);
    c.max_indirect_segments = MAX_INDIRECT_SEGMENTS + 1;
    assert!(matches!(
        Backend::new(c),
        Err(ConfigError::IndirectLimit(_))
    ));
    let c = config(
        DataPath::Copy {
            bounce: vec![0x1000; 11],
        },
        false,
    );
    assert!(matches!(
        Backend::new(c),
        Err(ConfigError::TooFewBouncePages {
            have: 11,
            need: 257
        })
    ));
    let mut c = config(
        DataPath::Copy {
            bounce: vec![0x1001; 12],
        },
        false,
    );
    c.max_indirect_segments = 0;
    assert_eq!(
        Backend::new(c).unwrap_err(),
        ConfigError::BounceUnaligned(0x1001)
    );
    // INDIRECT off: EOPNOTSUPP
    let mut h = H::new(map_path(0), false);
    h.be.max_indirect = 0;
    let r = h.one(&indirect(op::READ, 9, 0, 1, &[1]));
    assert_eq!(r.status, status::EOPNOTSUPP);
}

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
        self.next() % n
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

fn random_segment(rng: &mut Rng, grefs: &[u32]) -> Segment {
    let gref = if rng.chance(8) {
        rng.next() as u32
    } else {
        grefs[rng.below(grefs.len() as u64) as usize]
    };
    let (first, last) = if rng.chance(4) {
        (rng.below(10) as u8, rng.below(10) as u8)
    } else {
        let f = rng.below(8) as u8;
        (f, f + rng.below(8 - u64::from(f)) as u8)
    };
    seg(gref, first, last)
}

fn random_entry(rng: &mut Rng, h: &mut H, grefs: &[u32]) -> [u8; ENTRY_SIZE] {
    let id = rng.next();
    let sector = match rng.below(4) {
        0 => rng.next(),
        1 => COUNT - rng.below(16),
        _ => rng.below(COUNT),
    };
    match rng.below(10) {
        0 => {
            let mut e = [0u8; ENTRY_SIZE];
            for b in e.iter_mut() {
                *b = rng.next() as u8;
            }
            e
        }
        1 => rw(op::FLUSH_DISKCACHE, id, 0, &[]),
        2 | 3 => {
            let n = match rng.below(4) {
                0 => rng.next() as u16,
                _ => 1 + rng.below(40) as u16,
            };
            let pages: Vec<u32> = (0..8)
                .map(|_| grefs[rng.below(grefs.len() as u64) as usize])
                .collect();
            // fill the list pages with mostly sane segments
            for g in &pages {
                if let Some(gr) = h.world.grants.get(g) {
                    let pg = gr.page;
                    for i in 0..64 {
                        let s = random_segment(rng, grefs);
                        h.world.front[pg][i * 8..i * 8 + 8].copy_from_slice(&s.encode());
                    }
                }
            }
            let iop = [op::READ, op::WRITE, rng.next() as u8][rng.below(3) as usize];
            indirect(iop, id, sector % 64, n, &pages)
        }
        _ => {
            let opn = [op::READ, op::WRITE, op::READ, rng.next() as u8][rng.below(4) as usize];
            let n = if rng.chance(6) {
                rng.below(14) as usize
            } else {
                1 + rng.below(4) as usize
            };
            let segs: Vec<Segment> = (0..n.min(11)).map(|_| random_segment(rng, grefs)).collect();
            let mut e = rw(opn, id, sector, &segs);
            e[1] = n as u8;
            e
        }
    }
}

/// Random hostile rings: the backend never panics, the device and the
/// backend only touch granted memory (writable when written), and every
/// request is answered or the connection ends; at the end nothing stays
/// mapped and every bounce page is back.
#[test]
fn random_hostile_rings() {
    let iterations = 400;
    for it in 0..iterations {
        let mut rng =
            Rng(0x9e37_79b9_7f4a_7c15 ^ (it as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1));
        let path = match rng.below(3) {
            0 => map_path(rng.below(6) as usize),
            1 => map_path(64),
            _ => copy_path(),
        };
        let start = match rng.below(3) {
            0 => 0,
            1 => u32::MAX - rng.below(64) as u32,
            _ => rng.next() as u32,
        };
        let read_only = rng.chance(4);
        // most frontends produce no faster than the ring allows
        let paced = !rng.chance(3);
        let mut h = H::new_at(path.clone(), read_only, start);
        let mut grefs = Vec::new();
        for _ in 0..6 {
            grefs.push(h.world.grant(BACK, false));
        }
        for _ in 0..2 {
            grefs.push(h.world.grant(BACK, true));
        }
        grefs.push(h.world.grant(OTHER, false));
        grefs.push(4242); // never granted
        let mut hostile_expected = false;
        for _step in 0..150 {
            match rng.below(12) {
                0..=4 => {
                    // produce 1..4 entries straight into the page
                    for _ in 0..1 + rng.below(4) {
                        let e = random_entry(&mut rng, &mut h, &grefs);
                        let prod = h.page.load_u32(off::REQ_PROD);
                        let rsp = h.page.load_u32(off::RSP_PROD);
                        if paced && prod.wrapping_sub(rsp) >= 32 {
                            break;
                        }
                        let o = ring::HEADER_SIZE + (prod & 31) as usize * ENTRY_SIZE;
                        h.page[o..o + ENTRY_SIZE].copy_from_slice(&e);
                        h.page.store_u32(off::REQ_PROD, prod.wrapping_add(1));
                    }
                }
                5 => {
                    if rng.chance(if paced { 60 } else { 10 }) {
                        let prod = h.page.load_u32(off::REQ_PROD);
                        let v = match rng.below(3) {
                            0 => rng.next() as u32,
                            1 => prod.wrapping_add(33 + rng.below(100) as u32),
                            _ => prod.wrapping_sub(1 + rng.below(100) as u32),
                        };
                        h.page.store_u32(off::REQ_PROD, v);
                        hostile_expected = true;
                    }
                }
                6 => {
                    // scribble over the ring (slots or header)
                    let o = rng.below(RING_PAGE as u64 - 4) as usize & !3;
                    if o != off::REQ_PROD {
                        h.page.store_u32(o, rng.next() as u32);
                    }
                }
                7 => h.dev.busy = rng.chance(2),
                8 => h.dev.fail = rng.chance(3),
                9 => {
                    // the device completes a random subset, in random order
                    let mut done = h.dev.run(&mut h.world);
                    if rng.chance(2) {
                        done.reverse();
                    }
                    for (t, ok) in done {
                        h.be.complete(t, ok, &mut h.page, &mut h.world, &mut h.dev);
                    }
                }
                10 => {
                    // a stale or forged completion
                    h.be.complete(rng.next(), true, &mut h.page, &mut h.world, &mut h.dev);
                }
                _ => {
                    h.poll();
                }
            }
        }
        // settle: the device works again, everything completes
        h.dev.busy = false;
        h.dev.fail = false;
        h.drain();
        assert!(
            h.world.violations.is_empty(),
            "iteration {it} {path:?}: {:?}",
            h.world.violations
        );
        assert_eq!(h.be.in_flight(), 0, "iteration {it}");
        match h.be.conn() {
            Conn::Connected => {
                assert!(h.be.stalled.is_none(), "iteration {it}");
                let r = h.be.ring.as_ref().unwrap();
                assert_eq!(r.unanswered(), 0, "iteration {it}: a request unanswered");
                assert_eq!(r.unconsumed_requests(&h.page).unwrap_or(0), 0);
            }
            Conn::Closed => {}
            c => panic!("iteration {it}: left {c:?}"),
        }
        if hostile_expected && h.be.conn() == Conn::Connected {
            // the jump may have been undone by later productions; fine
        }
        let p = h.be.close(&mut h.page, &mut h.world);
        assert!(p.closed || h.be.conn() == Conn::Closed);
        assert!(h.world.maps.is_empty(), "iteration {it}: mappings left");
        if matches!(path, DataPath::Copy { .. }) {
            assert_eq!(h.be.free_bounce_pages(), BOUNCE_PAGES - 1, "iteration {it}");
        }
        let s = h.be.stats();
        assert!(s.unmap_failures == 0, "iteration {it}");
        if std::env::var("BLKBACK_FUZZ_STATS").is_ok() {
            std::eprintln!(
                "it {it} hostile {} req {} ok {} err {:?} hits {} stalls {} stale {}",
                s.hostile,
                s.requests,
                s.reads + s.writes + s.flushes,
                s.errors,
                s.persistent_hits,
                s.stalls,
                s.stale_completions
            );
        }
    }
}

/// Eight INDIRECT WRITEs of 16 one-sector segments, each in a fresh page
/// and with its own fresh segment-list page, all sent at once to a backend
/// with `persistent` persistent grants and `quota`; each request's pages
/// hold its number. Runs them to the end and checks every one succeeded
/// and the data is on the disk.
fn fresh_indirect_writes(persistent: usize, quota: usize) -> H {
    let mut h = H::new(map_path(persistent), false);
    h.be.map_quota = quota;
    for i in 0..8u64 {
        let list = h.world.grant(BACK, true);
        for j in 0..16usize {
            let g = h.world.grant(BACK, true);
            h.world.front_page(g).fill((16 * i as usize + j) as u8);
            h.world.front_page(list)[j * 8..j * 8 + 8].copy_from_slice(&seg(g, 0, 0).encode());
        }
        h.send(&indirect(op::WRITE, i, 16 * i, 16, &[list]));
    }
    h.drain();
    let r = h.responses();
    assert_eq!(r.len(), 8);
    assert!(r.iter().all(|r| r.status == status::OKAY), "{r:?}");
    for k in 0..128u64 {
        assert!(disk_at(&h, k, 512).iter().all(|x| *x == k as u8), "{k}");
    }
    assert_eq!(h.be.request_maps(), 0);
    assert_eq!(h.world.maps.len(), h.be.persistent_grants());
    h.assert_clean();
    h
}

/// A frontend whose persistent grants are used up and that keeps naming
/// fresh refs holds at most its quota of per-request mappings (plus one
/// segment-list page being read); the requests past it wait for mappings
/// to come back and all complete.
#[test]
fn map_quota_bounds_per_request_mappings() {
    const PERSISTENT: usize = 4;
    const QUOTA: usize = 40;
    // Without a quota the same frontend holds far more.
    let h = fresh_indirect_writes(PERSISTENT, usize::MAX);
    assert!(
        h.world.max_live > PERSISTENT + QUOTA + 1,
        "{}",
        h.world.max_live
    );
    assert_eq!(h.be.stats().map_waits, 0);
    let h = fresh_indirect_writes(PERSISTENT, QUOTA);
    assert!(
        h.world.max_live <= PERSISTENT + QUOTA + 1,
        "{}",
        h.world.max_live
    );
    let s = h.be.stats();
    assert!(s.map_waits > 0);
    assert_eq!(s.maps, s.unmaps + PERSISTENT as u64);
}

/// A request that alone needs more mappings than the whole quota is not
/// held back for ever: it starts once the backend holds no per-request
/// mapping.
#[test]
fn request_larger_than_the_quota_goes_alone() {
    let h = fresh_indirect_writes(0, 5);
    // one request's 16 data pages and its list page, never two requests'
    assert!(h.world.max_live <= 17, "{}", h.world.max_live);
    assert!(h.be.stats().map_waits > 0);
    // persistent grants count against nothing: an honest frontend that
    // reuses its pages never waits (a READ first: its pages are cached
    // writable and serve the WRITEs too)
    let mut h = H::new(map_path(64), false);
    h.be.map_quota = 0;
    let g: Vec<u32> = (0..11).map(|_| h.world.grant(BACK, false)).collect();
    let segs: Vec<Segment> = g.iter().map(|g| seg(*g, 0, 7)).collect();
    for i in 0..20 {
        h.send(&rw(
            if i % 2 == 0 { op::READ } else { op::WRITE },
            i,
            0,
            &segs,
        ));
    }
    h.drain();
    let r = h.responses();
    assert_eq!(r.len(), 20);
    assert!(r.iter().all(|r| r.status == status::OKAY));
    assert_eq!(h.be.stats().map_waits, 0);
    h.assert_clean();
}
