//! The blk driver domain's serve mode: blkback for every vbd the start info
//! says this domain serves, over its one virtio-blk.
//!
//! ```text
//!  frontend A ──ring A──┐                              ┌── Backend A ──┐
//!  frontend B ──ring B──┼─ wait(ports) ─ poll/complete ┼── Backend B ──┼─ Dispatch ─ vblk
//!  virtio-blk MSI-X ────┘                              └── ...         ┘  (queue)
//! ```
//!
//! One event loop, one thread: `wait` on every vbd's port and the device's
//! MSI-X port. A vbd port that fires before its ring is mapped maps it (the
//! frontend grants the ring at `ring_gref`, then notifies); after that it
//! calls that vbd's [`Backend::poll`]. The device's port collects every
//! completion from the used ring and hands it to the backend that submitted
//! it ([`Backend::retire`]), then polls each of those backends once. An
//! event goes to a frontend whenever a call says
//! [`blkback::Poll::notify`]. The domain exits once every frontend's
//! connection is Closed (or its ring could never be mapped).
//!
//! The backends share the disk through [`Dispatch`]: a backend's request
//! becomes one virtio request whose data descriptors are its buffers
//! (those contiguous in memory merged; the segments of a blkif request are
//! consecutive on the disk), cut into several only when it has more runs
//! than the device takes in one request; requests are queued in order and
//! started as the virtqueue has room. A flush is a barrier: it starts only
//! when the device holds nothing, and nothing queued after it starts
//! before it ends; it is submitted and completed like a read
//! ([`crate::vblk`]), so the loop never spins on the device. `kick` adds a
//! batch of requests and tells the device of them with one notification.
//!
//! Data paths (the manifest's `mode` per vbd):
//!
//! - **map**: each segment's page is mapped with `HOST_MAP | DEVICE_MAP` at a
//!   grant-window address this module hands out ([`Window`]); the
//!   hypervisor maps it for the domain's devices at I/O address = that
//!   address, so virtio-blk DMAs straight into the frontend's page. In the
//!   static DMA mode the page is in the IOMMU while the grant is mapped; in
//!   the strict mode only while a request that uses it is in the device
//!   (a turn of the loop: `reap` takes the completions and holds their
//!   unmaps back, the frontends are polled, `kick` claims the buffers of
//!   every request it starts and maps them with one `dma_batch` that also
//!   unmaps the reaped requests' pages, and only then `respond` writes the
//!   responses, after unmapping what `kick` did not take along; a page a
//!   new request uses again stays mapped). Up to [`persistent_budget`] grants per frontend
//!   stay mapped (persistent grants), INDIRECT segment-list pages among
//!   them.
//! - **copy**: the device works on page-aligned bounce pages from the heap,
//!   and the hypervisor copies between them and the frontend's pages
//!   (batched `grant_copy`, up to 64 operations per call).
//!
//! Everything that needs no hypervisor ([`ServeArgs`], [`config`],
//! [`Window`], [`Dispatch`]) is tested on the host; [`run`] is the domain's
//! loop.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;

use abi::blkif::{self, RING_SIZE};
use abi::domain::{VbdInfo, VbdMode, VbdRole};
use abi::grant::{Status as GrantStatus, GRANT_WINDOW, GRANT_WINDOW_SIZE};
use blkback::{Buf, Config, DataPath, DeviceError, Direction, PAGE_SIZE};
use libdom::args::ArgError;
use libdom::Args;

/// The keys serve mode takes.
pub const KEYS: &[&str] = &["serve", "indirect", "persistent"];

/// Grant mappings the hypervisor lets one domain hold at once
/// (`hypervisor::grant::MAX_MAPS_PER_DOMAIN`, which this crate cannot
/// name); past it a map fails with `NoDeviceSpace`.
pub const MAX_MAPS: usize = 4096;

/// Grant mappings this domain keeps for persistent grants, over all its
/// frontends, of [`MAX_MAPS`]; the rest is for the rings and the
/// per-request mappings past the persistent ones ([`map_quota`]).
pub const PERSISTENT_TOTAL: usize = 3584;
/// Persistent grants one frontend can use at most (data pages and INDIRECT
/// segment-list pages alike): room for [`blkif::MAX_SEGMENTS`] pages per
/// request slot for reads and as many for writes, a ring's worth of slots.
pub const PERSISTENT_PER_FRONTEND: usize = 2 * blkif::MAX_SEGMENTS * RING_SIZE as usize;

/// Serve mode's options, from the args:
/// `serve=1 [indirect=N] [persistent=N]`.
///
/// - `indirect`: most segments of one INDIRECT request (0 refuses
///   INDIRECT; default and most [`blkif::MAX_INDIRECT_SEGMENTS`]). A copy
///   vbd holds `max(11, indirect) + 1` bounce pages.
/// - `persistent`: persistent grants per map vbd (default
///   [`persistent_budget`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeArgs {
    pub indirect: u16,
    pub persistent: Option<usize>,
}

/// Why serve mode's args were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeArgError<'a> {
    Args(ArgError<'a>),
    Indirect(u64),
    Persistent(u64),
}

impl fmt::Display for ServeArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeArgError::Args(e) => e.fmt(f),
            ServeArgError::Indirect(n) => write!(
                f,
                "indirect={n}: expected 0..={}",
                blkif::MAX_INDIRECT_SEGMENTS
            ),
            ServeArgError::Persistent(n) => {
                write!(f, "persistent={n}: expected 0..={PERSISTENT_TOTAL}")
            }
        }
    }
}

/// Whether `args` ask for serve mode (`serve=1`). Malformed args are not
/// serve mode; the direct mode's parser reports them.
pub fn is_serve(args: &str) -> bool {
    Args::parse(args).is_ok_and(|a| a.get("serve") == Some("1"))
}

impl ServeArgs {
    pub fn parse(s: &str) -> Result<Self, ServeArgError<'_>> {
        let args = Args::parse(s).map_err(ServeArgError::Args)?;
        args.only(KEYS).map_err(ServeArgError::Args)?;
        let indirect = args
            .u64_or("indirect", blkif::MAX_INDIRECT_SEGMENTS.into())
            .map_err(ServeArgError::Args)?;
        if indirect > blkif::MAX_INDIRECT_SEGMENTS.into() {
            return Err(ServeArgError::Indirect(indirect));
        }
        let persistent = match args.get("persistent") {
            None => None,
            Some(_) => {
                let n = args.u64("persistent").map_err(ServeArgError::Args)?;
                if n > PERSISTENT_TOTAL as u64 {
                    return Err(ServeArgError::Persistent(n));
                }
                Some(n as usize)
            }
        };
        Ok(ServeArgs {
            indirect: indirect as u16,
            persistent,
        })
    }
}

/// Persistent grants per map vbd when `map_vbds` of them share
/// [`PERSISTENT_TOTAL`].
pub fn persistent_budget(map_vbds: usize) -> usize {
    PERSISTENT_PER_FRONTEND.min(PERSISTENT_TOTAL / map_vbds.max(1))
}

/// Per-request grant mappings one map vbd's backend may hold at once
/// ([`blkback::Config::map_quota`]) when the domain serves `vbds` vbds,
/// `map_vbds` of them by grant map with `persistent` persistent grants
/// each: what [`MAX_MAPS`] leaves after the rings (one per vbd), the
/// persistent grants and one segment-list page being read per map vbd,
/// split evenly among the map vbds. So however one frontend behaves (fresh
/// refs in every INDIRECT request, say), the others' maps and a new ring's
/// map still find room. [`config`] keeps a map vbd's INDIRECT limit within
/// it, which makes it a hard bound. With the default budget and at most
/// [`abi::domain::MAX_VBDS`] vbds it is at least 62.
pub fn map_quota(vbds: usize, map_vbds: usize, persistent: usize) -> usize {
    let fixed = vbds.saturating_add(map_vbds.saturating_mul(persistent.saturating_add(1)));
    MAX_MAPS.saturating_sub(fixed) / map_vbds.max(1)
}

/// The vbds of the start info this domain serves.
pub fn served<'a>(vbds: &[Option<VbdInfo<'a>>]) -> Vec<VbdInfo<'a>> {
    vbds.iter()
        .flatten()
        .filter(|v| v.role == VbdRole::Back)
        .copied()
        .collect()
}

/// Bounce pages a copy vbd needs with `indirect` segments per INDIRECT
/// request.
pub fn bounce_pages(indirect: u16) -> usize {
    blkif::MAX_SEGMENTS.max(usize::from(indirect)) + 1
}

/// The backend's configuration for `vbd`: `persistent` grants and at most
/// `quota` per-request mappings ([`map_quota`]) if it is a map vbd, its
/// INDIRECT limit `indirect` lowered to `quota` so that no request needs
/// more than the quota; `bounce` (page-aligned, at least
/// [`bounce_pages`]) if it is a copy vbd.
pub fn config(
    vbd: &VbdInfo<'_>,
    indirect: u16,
    persistent: usize,
    quota: usize,
    bounce: Vec<u64>,
) -> Config {
    let indirect = match vbd.mode {
        VbdMode::Map => indirect.min(u16::try_from(quota).unwrap_or(u16::MAX)),
        VbdMode::Copy => indirect,
    };
    Config {
        frontend: vbd.peer,
        first_sector: vbd.first_sector,
        sectors: vbd.sectors,
        read_only: vbd.readonly,
        path: match vbd.mode {
            VbdMode::Map => DataPath::Map { persistent },
            VbdMode::Copy => DataPath::Copy { bounce },
        },
        max_indirect_segments: indirect,
        map_quota: quota,
    }
}

/// Addresses in the grant window, one page per mapping: the lowest never
/// used, or one given back. Pages whose unmap failed are never given back,
/// so an address is never mapped twice.
#[derive(Clone, Debug)]
pub struct Window {
    next: u64,
    end: u64,
    free: Vec<u64>,
}

impl Default for Window {
    fn default() -> Self {
        Self::new(GRANT_WINDOW, GRANT_WINDOW_SIZE)
    }
}

impl Window {
    /// A window of `len` bytes at `base` (page-aligned).
    pub fn new(base: u64, len: u64) -> Self {
        Window {
            next: base,
            end: base + len,
            free: Vec::new(),
        }
    }

    pub fn alloc(&mut self) -> Option<u64> {
        if let Some(a) = self.free.pop() {
            return Some(a);
        }
        if self.next >= self.end {
            return None;
        }
        let a = self.next;
        self.next += PAGE_SIZE;
        Some(a)
    }

    /// Gives back an address that is no longer mapped.
    pub fn free(&mut self, addr: u64) {
        self.free.push(addr);
    }

    /// Maps `dom`'s grant `gref` at a free address of the window (and, with
    /// `device`, for this domain's devices at the same I/O address);
    /// returns the handle and the address. The one place blkback's and
    /// netback's grant maps go through.
    pub fn map_grant(
        &mut self,
        dom: u16,
        gref: u32,
        readonly: bool,
        device: bool,
    ) -> Result<(u32, u64), GrantStatus> {
        use abi::grant::{map_flags, MapOp};
        let addr = self.alloc().ok_or(GrantStatus::NoDeviceSpace)?;
        let mut flags = map_flags::HOST_MAP;
        if device {
            flags |= map_flags::DEVICE_MAP;
        }
        if readonly {
            flags |= map_flags::READONLY;
        }
        let mut op = [MapOp {
            host_addr: addr,
            flags,
            gref,
            dom,
            status: GrantStatus::General as i16,
            ..MapOp::default()
        }];
        let r = libdom::grant::map(&mut op);
        let [op] = op;
        if !matches!(r, Ok(1)) || op.status != GrantStatus::Okay as i16 {
            self.free(addr);
            return Err(GrantStatus::from_raw(op.status)
                .filter(|s| *s != GrantStatus::Okay)
                .unwrap_or(GrantStatus::General));
        }
        if device && op.dev_bus_addr != addr {
            // The device could not reach the page at its address.
            let _ = self.unmap_grant(op.handle, addr);
            return Err(GrantStatus::NoDeviceSpace);
        }
        Ok((op.handle, addr))
    }

    /// Unmaps a mapping `map_grant` made. An address whose unmap failed is
    /// never reused: it may still be mapped.
    pub fn unmap_grant(&mut self, handle: u32, addr: u64) -> Result<(), GrantStatus> {
        let mut op = [abi::grant::UnmapOp {
            host_addr: addr,
            dev_bus_addr: 0,
            handle,
            status: GrantStatus::General as i16,
        }];
        let r = libdom::grant::unmap(&mut op);
        if matches!(r, Ok(1)) && op[0].status == GrantStatus::Okay as i16 {
            self.free(addr);
            Ok(())
        } else {
            Err(GrantStatus::from_raw(op[0].status).unwrap_or(GrantStatus::General))
        }
    }
}

/// What one virtio request does (its buffers come with it, [`Queued`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubOp {
    /// The buffers from or to the disk at `sector`, one after another.
    Io {
        sector: u64,
        dir: Direction,
    },
    Flush,
}

/// A backend's request that has ended on the device: hand `token` and `ok`
/// to backend `backend`'s `complete`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub backend: usize,
    pub token: u64,
    pub ok: bool,
}

/// The virtio request [`Dispatch::next`] offers: start it with `tag` as
/// its tag, then call [`Dispatch::started`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queued<'a> {
    pub tag: u64,
    pub op: SubOp,
    /// The data buffers (none for a flush), each a run of the backend's
    /// buffers that are contiguous in memory.
    pub bufs: &'a [Buf],
}

#[derive(Clone, Copy, Debug)]
struct Parent {
    backend: usize,
    token: u64,
    /// virtio requests not ended yet.
    left: u32,
    ok: bool,
}

#[derive(Debug)]
struct Sub {
    parent: usize,
    op: SubOp,
    bufs: Vec<Buf>,
}

/// Counters of the device side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DispatchStats {
    /// Backend requests taken (I/O and flushes).
    pub requests: u64,
    /// virtio requests made of them (more than one for a request with more
    /// runs than the device takes buffers).
    pub subs: u64,
    /// Buffers folded into the one before (contiguous in memory).
    pub merged: u64,
    pub flushes: u64,
    /// Most virtio requests in the device at once.
    pub max_in_device: usize,
    /// Submissions refused with `Busy`.
    pub busy: u64,
}

/// The backends' requests on their way through the one virtqueue.
///
/// A backend's I/O request becomes one virtio request whose data buffers
/// are its buffers, those contiguous in memory merged into one (blkif
/// segments are consecutive on the disk, so each buffer starts where the
/// last ended); only a request with more such runs than the device takes
/// in one request (`max_segs`) becomes several, of consecutive runs, and
/// ends, towards its backend, when all of them have (one failed part
/// fails it). Requests start in order as the device has room. A flush is a
/// barrier: it starts only when the device holds nothing, and nothing
/// queued after it starts before it ends.
///
/// A virtio request's tag is its backend request's index here ([`Done`]
/// comes back from it). After the first requests nothing here allocates:
/// parents are reused through a free list, buffer lists through a spare
/// list, and the queue is reserved for `max_queued`.
#[derive(Debug)]
pub struct Dispatch {
    parents: Vec<Option<Parent>>,
    free_parents: Vec<usize>,
    queue: VecDeque<Sub>,
    /// Buffer lists of started requests, kept for new ones.
    spare: Vec<Vec<Buf>>,
    max_segs: usize,
    max_queued: usize,
    in_device: usize,
    /// A flush is in the device (and so nothing else).
    flushing: bool,
    busy: Vec<usize>,
    stats: DispatchStats,
}

impl Dispatch {
    /// Data buffers per virtio request at most `max_segs` (at least 1);
    /// more than `max_queued` virtio requests waiting refuses new requests
    /// with `Busy` (a request that finds the queue empty is always taken,
    /// however many parts it has).
    pub fn new(max_segs: usize, max_queued: usize) -> Self {
        Dispatch {
            parents: Vec::new(),
            free_parents: Vec::new(),
            queue: VecDeque::with_capacity(max_queued),
            spare: Vec::new(),
            max_segs: max_segs.max(1),
            max_queued,
            in_device: 0,
            flushing: false,
            busy: Vec::new(),
            stats: DispatchStats::default(),
        }
    }

    pub fn stats(&self) -> &DispatchStats {
        &self.stats
    }

    /// virtio requests in the device.
    pub fn in_device(&self) -> usize {
        self.in_device
    }

    /// virtio requests waiting for the device.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Nothing queued and nothing in the device.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.in_device == 0
    }

    /// Backend requests not ended yet.
    pub fn pending(&self) -> usize {
        self.parents.len() - self.free_parents.len()
    }

    fn new_parent(&mut self, backend: usize, token: u64, left: u32) -> usize {
        let p = Parent {
            backend,
            token,
            left,
            ok: true,
        };
        self.stats.requests += 1;
        if let Some(i) = self.free_parents.pop() {
            self.parents[i] = Some(p);
            i
        } else {
            self.parents.push(Some(p));
            self.parents.len() - 1
        }
    }

    /// `Busy` if `subs` more would overfill a queue that is not empty.
    fn refuse_busy(&mut self, backend: usize, subs: usize) -> Result<(), DeviceError> {
        let queued = self.queue.len();
        if queued > 0 && queued + subs > self.max_queued {
            self.stats.busy += 1;
            if !self.busy.contains(&backend) {
                self.busy.push(backend);
            }
            return Err(DeviceError::Busy);
        }
        Ok(())
    }

    /// The runs of `bufs`: how many, and how many buffers merge into the
    /// one before; `Failed` for an empty list or a buffer that is empty or
    /// not whole sectors.
    fn runs(bufs: &[Buf]) -> Result<(usize, u64), DeviceError> {
        let mut runs = 0;
        let mut end: Option<(u64, u32)> = None; // the run's end address, length
        for b in bufs {
            if b.len == 0 || b.len % blkif::SECTOR_SIZE as u32 != 0 {
                return Err(DeviceError::Failed);
            }
            end = match end {
                Some((e, len)) if e == b.addr && len.checked_add(b.len).is_some() => {
                    Some((e + u64::from(b.len), len + b.len))
                }
                _ => {
                    runs += 1;
                    b.addr.checked_add(u64::from(b.len)).map(|e| (e, b.len))
                }
            };
        }
        if runs == 0 {
            return Err(DeviceError::Failed);
        }
        Ok((runs, (bufs.len() - runs) as u64))
    }

    /// Backend `backend`'s request `token`: `bufs` in order, consecutive
    /// on the disk from `sector`.
    pub fn submit(
        &mut self,
        backend: usize,
        token: u64,
        sector: u64,
        dir: Direction,
        bufs: &[Buf],
    ) -> Result<(), DeviceError> {
        if bufs.len() <= self.max_segs {
            return self.submit_one(backend, token, sector, dir, bufs);
        }
        let (runs, merged) = Self::runs(bufs)?;
        let subs = runs.div_ceil(self.max_segs);
        self.refuse_busy(backend, subs)?;
        self.stats.merged += merged;
        self.stats.subs += subs as u64;
        let parent = self.new_parent(backend, token, subs as u32);
        // The same runs as `runs` found, cut every `max_segs`.
        let mut at = sector;
        let mut cur: Option<Sub> = None;
        for b in bufs {
            let c = cur.get_or_insert_with(|| {
                let mut v = self.spare.pop().unwrap_or_default();
                v.clear();
                Sub {
                    parent,
                    op: SubOp::Io { sector: at, dir },
                    bufs: v,
                }
            });
            let full = c.bufs.len() == self.max_segs;
            match c.bufs.last_mut() {
                Some(last)
                    if last.addr.checked_add(u64::from(last.len)) == Some(b.addr)
                        && last.len.checked_add(b.len).is_some() =>
                {
                    last.len += b.len
                }
                _ if full => {
                    // A new run, and this request holds all it may: the
                    // next virtio request begins with it.
                    let mut v = self.spare.pop().unwrap_or_default();
                    v.clear();
                    v.push(*b);
                    let done = cur.replace(Sub {
                        parent,
                        op: SubOp::Io { sector: at, dir },
                        bufs: v,
                    });
                    self.queue.extend(done);
                }
                _ => c.bufs.push(*b),
            }
            at += u64::from(b.len) / blkif::SECTOR_SIZE;
        }
        self.queue.extend(cur);
        Ok(())
    }

    /// [`Dispatch::submit`] of at most `max_segs` buffers, so of at most
    /// that many runs: one virtio request, its runs merged and its buffers
    /// checked in one pass (the same checks and answers as `runs`).
    fn submit_one(
        &mut self,
        backend: usize,
        token: u64,
        sector: u64,
        dir: Direction,
        bufs: &[Buf],
    ) -> Result<(), DeviceError> {
        let mut v = self.spare.pop().unwrap_or_default();
        v.clear();
        let mut ok = !bufs.is_empty();
        for b in bufs {
            ok &= b.len != 0 && b.len % blkif::SECTOR_SIZE as u32 == 0;
            if let Some(last) = v.last_mut() {
                if last.addr.checked_add(u64::from(last.len)) == Some(b.addr) {
                    if let Some(len) = last.len.checked_add(b.len) {
                        last.len = len;
                        continue;
                    }
                }
            }
            v.push(*b);
        }
        let checked = if ok {
            self.refuse_busy(backend, 1)
        } else {
            Err(DeviceError::Failed)
        };
        if let Err(e) = checked {
            self.spare.push(v);
            return Err(e);
        }
        self.stats.merged += (bufs.len() - v.len()) as u64;
        self.stats.subs += 1;
        let parent = self.new_parent(backend, token, 1);
        self.queue.push_back(Sub {
            parent,
            op: SubOp::Io { sector, dir },
            bufs: v,
        });
        Ok(())
    }

    /// Backend `backend`'s flush `token`.
    pub fn flush(&mut self, backend: usize, token: u64) -> Result<(), DeviceError> {
        self.refuse_busy(backend, 1)?;
        let parent = self.new_parent(backend, token, 1);
        self.stats.subs += 1;
        self.stats.flushes += 1;
        self.queue.push_back(Sub {
            parent,
            op: SubOp::Flush,
            bufs: Vec::new(),
        });
        Ok(())
    }

    /// Backends refused with `Busy` since the last call: poll them again
    /// once the device has taken something.
    pub fn take_busy(&mut self) -> Vec<usize> {
        core::mem::take(&mut self.busy)
    }

    /// The next virtio request to start, if it may start now: not while a
    /// flush is in the device, and a flush only when nothing is.
    pub fn next(&self) -> Option<Queued<'_>> {
        let sub = self.queue.front()?;
        if self.flushing || (sub.op == SubOp::Flush && self.in_device > 0) {
            return None;
        }
        Some(Queued {
            tag: sub.parent as u64,
            op: sub.op,
            bufs: &sub.bufs,
        })
    }

    /// The buffer list of the request [`Dispatch::next`] offers, to hand
    /// over to the device (an empty one, or one the device gave back, may
    /// be left in its place: [`Dispatch::started`] keeps it for later
    /// requests).
    pub fn next_bufs(&mut self) -> Option<&mut Vec<Buf>> {
        self.queue.front_mut().map(|sub| &mut sub.bufs)
    }

    /// The I/O requests [`Dispatch::next`] would offer one after another
    /// if each were started: those at the front of the queue up to the
    /// first flush (none while a flush is in the device).
    pub fn upcoming(&self) -> impl Iterator<Item = Queued<'_>> + '_ {
        self.queue
            .iter()
            .take(if self.flushing { 0 } else { usize::MAX })
            .take_while(|sub| sub.op != SubOp::Flush)
            .map(|sub| Queued {
                tag: sub.parent as u64,
                op: sub.op,
                bufs: &sub.bufs,
            })
    }

    /// The request [`Dispatch::next`] gave is in the device.
    pub fn started(&mut self) {
        let Some(sub) = self.queue.pop_front() else {
            return;
        };
        self.flushing = sub.op == SubOp::Flush;
        if sub.bufs.capacity() > 0 {
            self.spare.push(sub.bufs);
        }
        self.in_device += 1;
        self.stats.max_in_device = self.stats.max_in_device.max(self.in_device);
    }

    /// The request [`Dispatch::next`] gave ended without going into the
    /// device (a device without flushes, or the device refused it).
    pub fn ended_now(&mut self, ok: bool) -> Option<Done> {
        let sub = self.queue.pop_front()?;
        let parent = sub.parent;
        if sub.bufs.capacity() > 0 {
            self.spare.push(sub.bufs);
        }
        self.end(parent, ok)
    }

    /// The request started with `tag` ended (`ok`: without error). `Some`
    /// when that was the last part of a backend's request.
    pub fn finish(&mut self, tag: u64, ok: bool) -> Option<Done> {
        let parent = usize::try_from(tag).ok()?;
        if self.in_device == 0 || self.parents.get(parent)?.is_none() {
            return None;
        }
        self.in_device -= 1;
        if self.in_device == 0 {
            self.flushing = false;
        }
        self.end(parent, ok)
    }

    fn end(&mut self, parent: usize, ok: bool) -> Option<Done> {
        let p = self.parents.get_mut(parent)?.as_mut()?;
        p.ok &= ok;
        p.left = p.left.saturating_sub(1);
        if p.left > 0 {
            return None;
        }
        let done = Done {
            backend: p.backend,
            token: p.token,
            ok: p.ok,
        };
        self.parents[parent] = None;
        self.free_parents.push(parent);
        Some(done)
    }
}

/// A [`blkback::BlockDevice`] for one backend: its requests go into the
/// shared [`Dispatch`], tagged with the backend's index.
pub struct Dev<'a> {
    pub dispatch: &'a mut Dispatch,
    pub backend: usize,
}

impl blkback::BlockDevice for Dev<'_> {
    fn submit(
        &mut self,
        token: u64,
        sector: u64,
        dir: Direction,
        bufs: &[Buf],
    ) -> Result<(), DeviceError> {
        self.dispatch.submit(self.backend, token, sector, dir, bufs)
    }

    fn flush(&mut self, token: u64) -> Result<(), DeviceError> {
        self.dispatch.flush(self.backend, token)
    }
}

pub use domain::run;

/// The domain's side: grants over the hypercalls, the virtqueue, the loop.
mod domain {
    use alloc::format;
    use alloc::vec::Vec;
    use core::alloc::Layout;

    use abi::domain::{VbdInfo, VbdMode};
    use abi::ev::{DataCheck, WorkDone};
    use abi::grant::{copy_flags, CopyOp, CopyPtr, Status as GrantStatus, DOMID_SELF};
    use abi::hypercall::PORT_WORDS;
    use blkback::{Backend, Conn, Direction, Grants, Mapping, Poll, Reject, Stats, PAGE_SIZE};
    use libdom::ports::Pending;
    use libdom::ring::SharedPage;
    use libdom::{event, evtchn_send, grant, println, set_timer, time_ns, wait};
    use virtio_drivers::transport::Transport;
    use virtio_drivers::Hal;

    use crate::vblk::{Broken, Op, SubmitError, VirtioBlk, QUEUE_SIZE};

    use abi::blkif::{self, RING_SIZE};

    use super::{
        bounce_pages, config, map_quota, persistent_budget, served, Dev, Dispatch, Done, ServeArgs,
        SubOp, Window,
    };

    const _: () = assert!(abi::domain::MAX_VBDS <= 64);

    /// With requests in the device, look at the used ring at least this
    /// often even without an interrupt (a lost one is counted, not a hang).
    const SAFETY_POLL_NS: u64 = 100_000_000;

    fn status_name(s: i16) -> &'static str {
        GrantStatus::from_raw(s).map_or("unknown", GrantStatus::name)
    }

    /// [`Grants`] over the grant hypercalls, mapping into the grant window.
    #[derive(Default)]
    struct DomGrants {
        window: Window,
        /// Grant hypercalls made (map, unmap, copy), and copy operations.
        calls: u64,
        copy_ops: u64,
    }

    impl DomGrants {
        /// Maps `dom`'s `gref` at a fresh window address; `DEVICE_MAP` also
        /// for the devices (and then the I/O address must be that address).
        fn map_at(
            &mut self,
            dom: u16,
            gref: u32,
            readonly: bool,
            device: bool,
        ) -> Result<Mapping, GrantStatus> {
            self.calls += 1;
            let (handle, addr) = self.window.map_grant(dom, gref, readonly, device)?;
            Ok(Mapping { handle, addr })
        }
    }

    impl Grants for DomGrants {
        fn map(&mut self, dom: u16, gref: u32, readonly: bool) -> Result<Mapping, GrantStatus> {
            self.map_at(dom, gref, readonly, true)
        }

        /// Strict DMA relies on the loop's order here: a grant is unmapped
        /// only once no buffer on its page is shared with the device any
        /// more (requests are retired after `held.end()`, a connection
        /// finishes with nothing in the device, and `acquire`'s failure
        /// paths unmap only what was never shared). Unmapping a grant
        /// whose page the Hal still has mapped would turn the Hal's later
        /// unmap into a refusal, which stops the domain.
        fn unmap(&mut self, m: Mapping) -> Result<(), GrantStatus> {
            self.calls += 1;
            self.window.unmap_grant(m.handle, m.addr)
        }

        fn copy(&mut self, ops: &mut [CopyOp]) -> Result<(), GrantStatus> {
            self.calls += ops.len().div_ceil(abi::grant::MAX_BATCH as usize) as u64;
            self.copy_ops += ops.len() as u64;
            match grant::copy(ops) {
                Ok(n) if n == ops.len() => Ok(()),
                _ => Err(GrantStatus::General),
            }
        }

        fn read(&self, addr: u64, buf: &mut [u8]) {
            let p = addr as *const u8;
            // Whole words while the address is aligned (segment lists
            // are), then bytes.
            let words = if addr.is_multiple_of(8) {
                buf.len() / 8
            } else {
                0
            };
            let (head, tail) = buf.split_at_mut(words * 8);
            for (i, w) in head.chunks_exact_mut(8).enumerate() {
                // SAFETY: blkback reads only pages it mapped through `map`
                // and has not unmapped, or its own bounce pages (its
                // contract), within one page; `p + 8i` is 8-aligned and
                // its 8 bytes are inside `buf`'s extent there. Each byte
                // is read once, volatile because the frontend may write a
                // mapped page.
                let v = unsafe { p.add(8 * i).cast::<u64>().read_volatile() };
                w.copy_from_slice(&v.to_ne_bytes());
            }
            for (i, b) in tail.iter_mut().enumerate() {
                // SAFETY: as above, one byte at a time.
                *b = unsafe { p.add(words * 8 + i).read_volatile() };
            }
        }
    }

    /// A page-aligned page of the heap, never freed (bounce pages live as
    /// long as the domain).
    fn heap_page() -> Option<u64> {
        let layout = Layout::from_size_align(PAGE_SIZE as usize, PAGE_SIZE as usize).ok()?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        (!p.is_null()).then_some(p as u64)
    }

    /// How a frontend's connection ended, or that it has not.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Phase {
        /// The ring is not mapped yet (not granted yet).
        Unmapped,
        Serving,
        Closed,
        /// The ring could not be mapped.
        Refused(GrantStatus),
    }

    struct Frontend<'a> {
        vbd: VbdInfo<'a>,
        backend: Backend,
        ring: Option<(SharedPage, Mapping)>,
        phase: Phase,
        connected_ns: u64,
        closed_ns: u64,
        notifies: u64,
        polls: u64,
    }

    impl Frontend<'_> {
        fn ended(&self) -> bool {
            matches!(self.phase, Phase::Closed | Phase::Refused(_))
        }
    }

    #[derive(Default)]
    struct LoopStats {
        waits: u64,
        device_wakes: u64,
        /// Device wakes that found nothing in the used ring.
        spurious: u64,
        /// Completions found by the safety poll, not an interrupt.
        late: u64,
        completions: u64,
        failed_subs: u64,
    }

    struct Server<'a, H: Hal, T: Transport> {
        /// The device; it hears of the requests `kick` adds once, at its
        /// end. Request headers and statuses live in its slot pages.
        blk: VirtioBlk<H, T, QUEUE_SIZE>,
        dispatch: Dispatch,
        grants: DomGrants,
        fronts: Vec<Frontend<'a>>,
        stats: LoopStats,
        /// The device broke the queue's rules; stop.
        broken: Option<&'static str>,
        /// Ended requests, kept between calls (no allocation per
        /// interrupt once it has held a queue's worth): `reap`'s, and
        /// those `kick` ended without the device (a flush the device does
        /// not need, a request the virtqueue refused). Only `respond`
        /// retires them, after the held unmaps, so no response goes out
        /// while a piece of its request is still mapped for the device.
        reaped: Vec<Done>,
        /// Strict DMA: the unmaps of the reaped requests' pages, held back
        /// from `reap` to `respond` so that `kick`'s call in between takes
        /// them along with its maps.
        held: Option<libdom::virtio::UnmapBatch>,
        /// Strict DMA (`claim` does something).
        strict: bool,
    }

    /// What a backend call asks of the domain: report, unmap the ring
    /// once Closed, notify the frontend.
    fn act(f: &mut Frontend<'_>, grants: &mut DomGrants, p: Poll) {
        let name = f.vbd.name;
        let dom = f.vbd.peer;
        if p.connected {
            f.connected_ns = time_ns();
            println!(
                "blkback: {name} of domain {dom} connected ({} sectors from {}{}, {})",
                f.vbd.sectors,
                f.vbd.first_sector,
                if f.vbd.readonly { ", read-only" } else { "" },
                match f.vbd.mode {
                    VbdMode::Map => "grant map",
                    VbdMode::Copy => "grant copy",
                }
            );
        }
        if p.hostile {
            let why = f
                .backend
                .hostile()
                .map_or_else(|| "?".into(), |e| format!("{e}"));
            println!("blkback: {name} of domain {dom} is hostile ({why}): closing it");
            let _ = event(&DataCheck {
                what: "blkback-hostile",
                bytes: 0,
                ok: true,
            });
        }
        if p.closed {
            f.closed_ns = time_ns();
            if let Some((_, m)) = f.ring.take() {
                if let Err(s) = grants.unmap(m) {
                    println!("blkback: {name}: unmapping the ring: {}", s.name());
                }
            }
            f.phase = Phase::Closed;
            println!("blkback: {name} of domain {dom} closed");
        }
        if p.notify {
            f.notifies += 1;
            // A frontend that is gone has no port to signal: nothing to do.
            let _ = evtchn_send(f.vbd.port);
        }
    }

    impl<'a, H: Hal, T: Transport> Server<'a, H, T> {
        /// Maps frontend `i`'s ring if it is granted now.
        fn attach(&mut self, i: usize) {
            let f = &mut self.fronts[i];
            if f.phase != Phase::Unmapped {
                return;
            }
            match self
                .grants
                .map_at(f.vbd.peer, f.vbd.ring_gref, false, false)
            {
                Ok(m) => {
                    // SAFETY: a page of the grant window the hypervisor just
                    // mapped read-write for us; it is unmapped only after
                    // the `SharedPage` is dropped (`act`, on Closed), and
                    // nothing else of ours touches it.
                    let page = unsafe { SharedPage::new(m.addr) };
                    f.ring = Some((page, m));
                    f.phase = Phase::Serving;
                }
                // Not granted yet: the frontend notifies once it is.
                Err(GrantStatus::BadGntref) => {}
                Err(s) => {
                    let copy = probe_copy(&mut self.grants, &f.vbd);
                    println!(
                        "blkback: {} of domain {}: mapping its ring: {}; copying from it: {}; not serving it",
                        f.vbd.name,
                        f.vbd.peer,
                        s.name(),
                        status_name(copy)
                    );
                    f.phase = Phase::Refused(s);
                }
            }
        }

        /// Frontend `i`'s port fired (or it may have work): map its ring
        /// if need be, then poll its backend until it has no more.
        fn serve(&mut self, i: usize) {
            self.attach(i);
            loop {
                let f = &mut self.fronts[i];
                let Some((page, _)) = f.ring.as_mut() else {
                    return;
                };
                f.polls += 1;
                let mut dev = Dev {
                    dispatch: &mut self.dispatch,
                    backend: i,
                };
                let p = f.backend.poll(page, &mut self.grants, &mut dev);
                act(f, &mut self.grants, p);
                if !p.more {
                    return;
                }
            }
        }

        /// Strict DMA: claims the data buffers of the requests `kick` is
        /// about to start (as many as the queue has room for), then maps
        /// them all with one `dma_batch`, which also carries the unmaps
        /// `reap` held back. Headers and statuses need nothing: the
        /// driver's slot pages stay shared for its life.
        fn claim_upcoming(&mut self) {
            if !self.strict {
                return;
            }
            let (mut descs, mut slots) = self.blk.room();
            let mut any = false;
            for q in self.dispatch.upcoming() {
                let need = q.bufs.len() + 2;
                if slots == 0 || need > descs {
                    break;
                }
                (descs, slots) = (descs - need, slots - 1);
                let write = matches!(
                    q.op,
                    SubOp::Io {
                        dir: Direction::Read,
                        ..
                    }
                );
                for b in q.bufs {
                    libdom::virtio::claim(b.addr, b.len as usize, write);
                }
                any = true;
            }
            if any {
                libdom::virtio::commit();
            }
        }

        /// Starts queued virtio requests while the queue has room (a flush
        /// alone, as [`Dispatch`] offers it); in strict DMA mode their pages
        /// are mapped first, by one call. The device hears of them with one
        /// notification at the end.
        fn kick(&mut self) {
            self.claim_upcoming();
            while let Some(q) = self.dispatch.next() {
                let (op, sector) = match q.op {
                    SubOp::Flush => (Op::Flush, 0),
                    SubOp::Io {
                        sector,
                        dir: Direction::Read,
                    } => (Op::Read, sector),
                    SubOp::Io {
                        sector,
                        dir: Direction::Write,
                    } => (Op::Write, sector),
                };
                if op == Op::Flush && !self.blk.has_flush() {
                    // The device writes through: nothing to wait for.
                    // Answered by `respond`, like every ended request.
                    if let Some(d) = self.dispatch.ended_now(true) {
                        self.reaped.push(d);
                    }
                    continue;
                }
                let tag = q.tag;
                let Some(bufs) = self.dispatch.next_bufs() else {
                    break;
                };
                // The virtio request takes over the list (and gives back
                // one of an earlier request, which `started` keeps).
                // SAFETY: each buffer is what a backend handed to `submit`:
                // its grant mapping (writable for a READ) or its bounce
                // pages, kept until its `retire` of this request, which
                // comes only after this virtio request's completion has
                // been popped (`reap`, then `respond`).
                match unsafe { self.blk.submit_owned(op, sector, bufs, tag) } {
                    Ok(()) => self.dispatch.started(),
                    Err(SubmitError::Full) => break,
                    Err(SubmitError::Broken) => {
                        self.broken = Some("the device broke the queue");
                        break;
                    }
                    Err(SubmitError::Invalid) => {
                        println!("blkback: the virtqueue refused a request ({op:?} at {sector})");
                        self.stats.failed_subs += 1;
                        // Not answered here: earlier parts of the same
                        // request may have been reaped with their unmaps
                        // held back; `respond` does those unmaps first.
                        if let Some(d) = self.dispatch.ended_now(false) {
                            self.reaped.push(d);
                        }
                    }
                }
            }
            self.blk.notify();
            libdom::virtio::release_claims();
        }

        /// Takes every completion in the used ring; returns how many. The
        /// ended backend requests wait in `reaped` for `respond`.
        fn reap(&mut self) -> u64 {
            let mut n = 0;
            // Strict DMA: the pages of every completion found here stay
            // mapped until the next call (`kick`'s) or `respond`, whichever
            // comes first, and are unmapped before any request is retired
            // (its grants unmapped, its response written).
            if self.held.is_none() {
                self.held = Some(libdom::virtio::UnmapBatch::begin());
            }
            loop {
                match self.blk.pop() {
                    Ok(Some(c)) => {
                        let ok = c.status.is_ok();
                        if !ok {
                            self.stats.failed_subs += 1;
                        }
                        n += 1;
                        self.stats.completions += 1;
                        if let Some(d) = self.dispatch.finish(c.tag, ok) {
                            self.reaped.push(d);
                        }
                    }
                    Ok(None) => break,
                    Err(Broken::UnknownToken(_)) => {
                        self.broken = Some("the device completed a request we did not make");
                        break;
                    }
                    Err(Broken::Queue) => {
                        self.broken = Some("the used ring changed while it was read");
                        break;
                    }
                }
            }
            n
        }

        /// Strict DMA: unmaps what `reap` held back and `kick` did not take
        /// along (the IOTLB invalidated when this returns); then each
        /// backend retires its ended requests and is polled once.
        fn respond(&mut self) {
            if let Some(unmaps) = self.held.take() {
                unmaps.end();
            }
            if self.reaped.is_empty() {
                return;
            }
            let mut done = core::mem::take(&mut self.reaped);
            // Bit i: backend i retired a request (fronts <= MAX_VBDS).
            let mut retired = 0u64;
            for d in done.drain(..) {
                if let Some(f) = self.fronts.get_mut(d.backend) {
                    if let Some((page, _)) = f.ring.as_mut() {
                        if f.backend.retire(d.token, d.ok, page, &mut self.grants) {
                            retired |= 1 << d.backend;
                        }
                    }
                }
            }
            self.reaped = done;
            while retired != 0 {
                let i = retired.trailing_zeros() as usize;
                retired &= retired - 1;
                self.serve(i);
            }
        }

        fn retry_busy(&mut self) {
            for i in self.dispatch.take_busy() {
                self.serve(i);
            }
        }

        fn all_ended(&self) -> bool {
            self.fronts.iter().all(Frontend::ended) && self.dispatch.is_idle()
        }
    }

    /// After a refused map: does a grant copy of the ring get through?
    /// (The policy that refuses one should refuse the other.)
    fn probe_copy(grants: &mut DomGrants, vbd: &VbdInfo<'_>) -> i16 {
        let Some(page) = heap_page() else {
            return GrantStatus::General as i16;
        };
        let mut op = [CopyOp {
            src: CopyPtr {
                gref_or_page: u64::from(vbd.ring_gref),
                domid: vbd.peer,
                offset: 0,
            },
            dst: CopyPtr {
                gref_or_page: page / PAGE_SIZE,
                domid: DOMID_SELF,
                offset: 0,
            },
            len: 64,
            flags: copy_flags::SRC_GREF,
            status: GrantStatus::General as i16,
        }];
        let _ = grants.copy(&mut op);
        op[0].status
    }

    fn print_stats(f: &Frontend<'_>) {
        let s: &Stats = f.backend.stats();
        let ns = f.closed_ns.saturating_sub(f.connected_ns);
        let bytes = s.bytes_read + s.bytes_written;
        let phase = match f.phase {
            Phase::Closed => "closed",
            Phase::Refused(st) => st.name(),
            Phase::Serving => "serving",
            Phase::Unmapped => "never connected",
        };
        println!(
            "blkback: {} of domain {} ({phase}): {} requests ({} reads, {} writes, {} flushes, {} indirect), {} KiB read, {} KiB written in {} ms ({} KB/s)",
            f.vbd.name,
            f.vbd.peer,
            s.requests,
            s.reads,
            s.writes,
            s.flushes,
            s.indirect,
            s.bytes_read / 1024,
            s.bytes_written / 1024,
            ns / 1_000_000,
            bytes.saturating_mul(1_000_000) / ns.max(1)
        );
        let mut errs = alloc::string::String::new();
        for r in Reject::ALL {
            if s.errors(r) > 0 {
                errs.push_str(&format!(" {}={}", r.name(), s.errors(r)));
            }
        }
        println!(
            "blkback: {}: errors {}{errs}; grants: {} maps, {} unmaps ({} failed), {} persistent hits, {} copies; {} stalls ({} for the mapping quota), {} stale completions, {} hostile; {} polls, {} notifies",
            f.vbd.name,
            s.total_errors(),
            s.maps,
            s.unmaps,
            s.unmap_failures,
            s.persistent_hits,
            s.copies,
            s.stalls,
            s.map_waits,
            s.stale_completions,
            s.hostile,
            f.polls,
            f.notifies
        );
        let _ = event(&WorkDone {
            work: &format!("blkback-{}", f.vbd.peer),
            units: s.requests,
        });
    }

    /// Serves every vbd of `si` with role Back on `blk`, whose interrupts
    /// raise `dev_port`; `timer` is the domain's timer VIRQ port. Returns
    /// the exit status: 0 once every frontend has closed (or could never be
    /// reached), 1 on a broken device or bad args.
    pub fn run<H: Hal, T: Transport>(
        si: &libdom::StartInfo<'_>,
        blk: VirtioBlk<H, T, QUEUE_SIZE>,
        dev_port: u16,
        timer: u16,
    ) -> i64 {
        let args = match ServeArgs::parse(si.args) {
            Ok(a) => a,
            Err(e) => {
                println!("blkback: args: {e}");
                return 1;
            }
        };
        let vbds = served(&si.vbds);
        if vbds.is_empty() {
            println!("blkback: serve=1, but the start info names no vbd this domain serves");
            return 1;
        }
        let capacity = blk.capacity();
        let maps = vbds.iter().filter(|v| v.mode == VbdMode::Map).count();
        let persistent = args.persistent.unwrap_or(persistent_budget(maps));
        let quota = map_quota(vbds.len(), maps, persistent);
        if maps > 0 && quota < blkif::MAX_SEGMENTS {
            println!(
                "blkback: persistent={persistent} over {maps} map vbds leaves {quota} grant mappings each for requests, fewer than {}; lower persistent",
                blkif::MAX_SEGMENTS
            );
            return 1;
        }
        let mut fronts = Vec::new();
        for v in &vbds {
            if v.first_sector
                .checked_add(v.sectors)
                .is_none_or(|e| e > capacity)
            {
                println!(
                    "blkback: {}: sectors {}..+{} are not all on the disk ({capacity} sectors)",
                    v.name, v.first_sector, v.sectors
                );
                return 1;
            }
            let bounce = match v.mode {
                VbdMode::Map => Vec::new(),
                VbdMode::Copy => {
                    let n = bounce_pages(args.indirect);
                    let pages: Option<Vec<u64>> = (0..n).map(|_| heap_page()).collect();
                    let Some(pages) = pages else {
                        println!(
                            "blkback: {}: no memory for {n} bounce pages (try indirect=0)",
                            v.name
                        );
                        return 1;
                    };
                    pages
                }
            };
            let backend = match Backend::new(config(v, args.indirect, persistent, quota, bounce)) {
                Ok(b) => b,
                Err(e) => {
                    println!("blkback: {}: {e}", v.name);
                    return 1;
                }
            };
            fronts.push(Frontend {
                vbd: *v,
                backend,
                ring: None,
                phase: Phase::Unmapped,
                connected_ns: 0,
                closed_ns: 0,
                notifies: 0,
                polls: 0,
            });
        }
        let max_segs = blk.max_segs();
        // Room for every frontend's full ring of requests, each cut into
        // as many virtio requests as it needs (at most 11 counted: past
        // that the queue just says Busy sooner).
        let parts = usize::from(blkif::MAX_INDIRECT_SEGMENTS)
            .div_ceil(max_segs)
            .min(blkif::MAX_SEGMENTS);
        let mut srv = Server {
            blk,
            dispatch: Dispatch::new(max_segs, fronts.len() * RING_SIZE as usize * parts),
            grants: DomGrants::default(),
            fronts,
            stats: LoopStats::default(),
            broken: None,
            reaped: Vec::with_capacity(RING_SIZE as usize),
            held: None,
            strict: libdom::device::dma_mode() == abi::domain::DmaMode::Strict,
        };
        println!(
            "blkback: serving {} vbds ({} by grant map, {persistent} persistent grants and {quota} more mappings each; {} by grant copy), indirect up to {} segments (map vbds: {}), {QUEUE_SIZE} virtio descriptors, {max_segs} buffers per virtio request",
            srv.fronts.len(),
            maps,
            srv.fronts.len() - maps,
            args.indirect,
            args.indirect.min(u16::try_from(quota).unwrap_or(u16::MAX))
        );
        let t0 = time_ns();
        for i in 0..srv.fronts.len() {
            srv.serve(i);
        }
        let mut safety_armed = false;
        // A turn: the completions reaped and the frontends' new requests
        // polled after the last `wait`, then `kick` (strict DMA: one call
        // maps the new requests' pages and unmaps the reaped ones'), then
        // the responses.
        while srv.broken.is_none() {
            srv.kick();
            srv.respond();
            srv.retry_busy();
            srv.kick();
            if srv.all_ended() {
                break;
            }
            if !srv.reaped.is_empty() {
                // `kick` ended requests without the device (a flush, a
                // refused request): answer them before waiting.
                continue;
            }
            if srv.dispatch.in_device() > 0 && !safety_armed {
                let _ = set_timer(time_ns() + SAFETY_POLL_NS);
                safety_armed = true;
            }
            let mut words = [0u64; PORT_WORDS];
            if let Err(e) = wait(&mut words, 0) {
                println!("blkback: wait: {}", e.name());
                return 1;
            }
            srv.stats.waits += 1;
            let p = Pending(words);
            if p.contains(timer) {
                safety_armed = false;
            }
            if p.contains(dev_port) {
                srv.stats.device_wakes += 1;
                if srv.reap() == 0 {
                    srv.stats.spurious += 1;
                }
            } else if p.contains(timer) {
                srv.stats.late += srv.reap();
            }
            for i in 0..srv.fronts.len() {
                if p.contains(srv.fronts[i].vbd.port) {
                    srv.serve(i);
                }
            }
        }
        srv.respond();
        let _ = set_timer(0);
        let ns = time_ns() - t0;
        if let Some(why) = srv.broken {
            println!("blkback: stopping: {why}");
        }
        for f in &srv.fronts {
            print_stats(f);
        }
        let d = srv.dispatch.stats();
        let l = &srv.stats;
        println!(
            "blkback: device: {} requests as {} virtio requests ({} completed, {} buffers merged, {} flushes), at most {} in the device, {} busy refusals, {} failed, {} notifications, {} queue full, bad from the device {:?}; {} waits, {} device wakes ({} with nothing new), {} completions found without an interrupt; {} grant calls ({} copy ops); {} ms",
            d.requests,
            d.subs,
            l.completions,
            d.merged,
            d.flushes,
            d.max_in_device,
            d.busy,
            l.failed_subs,
            srv.blk.stats().notifies,
            srv.blk.stats().full,
            srv.blk.stats().bad,
            l.waits,
            l.device_wakes,
            l.spurious,
            l.late,
            srv.grants.calls,
            srv.grants.copy_ops,
            ns / 1_000_000
        );
        let unfinished = srv
            .fronts
            .iter()
            .filter(|f| f.backend.conn() != Conn::Closed && f.phase == Phase::Serving)
            .count();
        i64::from(srv.broken.is_some() || unfinished > 0)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use abi::domain::VbdInfo;
    use std::vec;

    fn io(sector: u64, dir: Direction) -> SubOp {
        SubOp::Io { sector, dir }
    }

    fn buf(addr: u64, len: u32) -> Buf {
        Buf { addr, len }
    }

    #[test]
    fn args() {
        assert!(is_serve("serve=1"));
        assert!(is_serve("indirect=0 serve=1"));
        assert!(!is_serve("serve=0"));
        assert!(!is_serve("verify=0..64 pattern=A"));
        assert!(!is_serve("serve=1 junk"));
        assert_eq!(
            ServeArgs::parse("serve=1").unwrap(),
            ServeArgs {
                indirect: blkif::MAX_INDIRECT_SEGMENTS,
                persistent: None
            }
        );
        assert_eq!(
            ServeArgs::parse("serve=1 indirect=0 persistent=16").unwrap(),
            ServeArgs {
                indirect: 0,
                persistent: Some(16)
            }
        );
        assert_eq!(
            ServeArgs::parse("serve=1 indirect=257").unwrap_err(),
            ServeArgError::Indirect(257)
        );
        assert_eq!(
            ServeArgs::parse("serve=1 persistent=5000").unwrap_err(),
            ServeArgError::Persistent(5000)
        );
        assert!(matches!(
            ServeArgs::parse("serve=1 verify=0..4"),
            Err(ServeArgError::Args(ArgError::Unknown { key: "verify" }))
        ));
    }

    fn vbd(mode: VbdMode, role: VbdRole) -> VbdInfo<'static> {
        VbdInfo {
            name: "xvda",
            role,
            peer: 3,
            port: 5,
            ring_gref: 1,
            first_sector: 4096,
            sectors: 2048,
            readonly: true,
            mode,
        }
    }

    #[test]
    fn configs_from_vbds() {
        let c = config(&vbd(VbdMode::Map, VbdRole::Back), 256, 704, 3000, vec![]);
        assert_eq!(
            c,
            Config {
                frontend: 3,
                first_sector: 4096,
                sectors: 2048,
                read_only: true,
                path: DataPath::Map { persistent: 704 },
                max_indirect_segments: 256,
                map_quota: 3000,
            }
        );
        // A map vbd's INDIRECT limit stays within its quota; a copy vbd's
        // does not depend on it.
        let c = config(&vbd(VbdMode::Map, VbdRole::Back), 256, 448, 62, vec![]);
        assert_eq!((c.max_indirect_segments, c.map_quota), (62, 62));
        let c = config(&vbd(VbdMode::Copy, VbdRole::Back), 256, 448, 62, vec![]);
        assert_eq!(c.max_indirect_segments, 256);
        let pages: Vec<u64> = (0..bounce_pages(0) as u64)
            .map(|i| 0x50_0000 + i * 4096)
            .collect();
        let c = config(&vbd(VbdMode::Copy, VbdRole::Back), 0, 704, 0, pages.clone());
        assert_eq!(c.path, DataPath::Copy { bounce: pages });
        assert_eq!(c.bounce_pages_needed(), bounce_pages(0));
        assert!(blkback::Backend::new(c).is_ok());
        assert_eq!(bounce_pages(256), 257);
        let c = config(
            &vbd(VbdMode::Copy, VbdRole::Back),
            256,
            0,
            0,
            vec![0x1000; 12],
        );
        assert!(blkback::Backend::new(c).is_err());
        // Only the vbds this domain serves.
        let mut list = [None; abi::domain::MAX_VBDS];
        list[0] = Some(vbd(VbdMode::Map, VbdRole::Front));
        list[2] = Some(vbd(VbdMode::Copy, VbdRole::Back));
        let s = served(&list);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].mode, VbdMode::Copy);
        // Persistent grants share the domain's mappings.
        assert_eq!(persistent_budget(0), PERSISTENT_PER_FRONTEND);
        assert_eq!(persistent_budget(2), PERSISTENT_PER_FRONTEND);
        assert_eq!(persistent_budget(8), PERSISTENT_TOTAL / 8);
        assert!(persistent_budget(8) * 8 <= PERSISTENT_TOTAL);
        // What is left is split among the map vbds, after the rings and
        // one segment-list page each; with the default budget every map
        // vbd can take a full request (11 segments) and then some.
        assert_eq!(map_quota(1, 1, 704), MAX_MAPS - 1 - 705);
        assert_eq!(
            map_quota(8, 8, persistent_budget(8)),
            (MAX_MAPS - 8 - 8 * 449) / 8
        );
        assert_eq!(map_quota(8, 8, persistent_budget(8)), 62);
        for vbds in 1..=abi::domain::MAX_VBDS {
            for maps in 1..=vbds {
                let p = persistent_budget(maps);
                let q = map_quota(vbds, maps, p);
                assert!(q >= 62, "{vbds} {maps}");
                assert!(vbds + maps * (p + 1 + q) <= MAX_MAPS, "{vbds} {maps}");
            }
        }
        // An overcommitted persistent= leaves nothing (run refuses it).
        assert_eq!(map_quota(2, 2, 3584), 0);
    }

    #[test]
    fn window_hands_out_pages_once() {
        let mut w = Window::new(GRANT_WINDOW, 3 * PAGE_SIZE);
        let a = w.alloc().unwrap();
        let b = w.alloc().unwrap();
        let c = w.alloc().unwrap();
        assert_eq!(
            (a, b, c),
            (GRANT_WINDOW, GRANT_WINDOW + 4096, GRANT_WINDOW + 8192)
        );
        assert_eq!(w.alloc(), None);
        w.free(b);
        assert_eq!(w.alloc(), Some(b));
        assert_eq!(w.alloc(), None);
        let mut d = Window::default();
        assert_eq!(d.alloc(), Some(GRANT_WINDOW));
    }

    /// Starts what `next` offers until it offers nothing; returns them
    /// (tag, op, buffers).
    fn start_all(d: &mut Dispatch) -> Vec<(u64, SubOp, Vec<Buf>)> {
        let mut out = vec![];
        while let Some(q) = d.next() {
            out.push((q.tag, q.op, q.bufs.to_vec()));
            d.started();
        }
        out
    }

    #[test]
    fn the_device_may_take_over_buffer_lists() {
        let mut d = Dispatch::new(16, 64);
        let bufs = [buf(0x1000, 4096), buf(0x2000, 4096), buf(0x8000, 512)];
        d.submit(0, 5, 0, Direction::Read, &bufs).unwrap();
        d.submit(0, 6, 9, Direction::Read, &bufs[2..]).unwrap();
        // The device takes the first list and leaves an empty one of its
        // own in its place, which `started` keeps for later requests.
        let taken = core::mem::replace(d.next_bufs().unwrap(), Vec::with_capacity(8));
        assert_eq!(taken, [buf(0x1000, 8192), buf(0x8000, 512)]);
        d.started();
        assert_eq!(d.next().unwrap().bufs, [buf(0x8000, 512)]);
        d.started();
        assert!(d.next_bufs().is_none());
        d.submit(0, 7, 10, Direction::Read, &bufs[..1]).unwrap();
        assert_eq!(d.next().unwrap().bufs, [buf(0x1000, 4096)]);
        assert_eq!(d.finish(0, true).map(|x| x.token), Some(5));
    }

    #[test]
    fn one_request_is_one_virtio_request_with_its_runs() {
        let mut d = Dispatch::new(16, 64);
        // Four segments: two contiguous full pages, then a gap, then two
        // more that do not follow each other.
        let bufs = [
            buf(0x8000_0000, 4096),
            buf(0x8000_1000, 4096),
            buf(0x8000_5200, 1024),
            buf(0x8000_3000, 512),
        ];
        d.submit(0, 77, 100, Direction::Read, &bufs).unwrap();
        assert_eq!(d.queued(), 1);
        assert_eq!(d.stats().merged, 1);
        let got = start_all(&mut d);
        assert_eq!(got.len(), 1);
        let (tag, op, runs) = &got[0];
        assert_eq!(*op, io(100, Direction::Read));
        assert_eq!(
            *runs,
            [
                buf(0x8000_0000, 8192),
                buf(0x8000_5200, 1024),
                buf(0x8000_3000, 512)
            ]
        );
        assert_eq!(d.in_device(), 1);
        assert_eq!(
            d.finish(*tag, true),
            Some(Done {
                backend: 0,
                token: 77,
                ok: true
            })
        );
        assert!(d.is_idle());
        assert_eq!(d.pending(), 0);
        // An ended request's tag finds nothing.
        assert_eq!(d.finish(*tag, true), None);
        assert_eq!(d.finish(999, true), None);
        assert_eq!(d.stats().subs, 1);
    }

    #[test]
    fn more_runs_than_the_device_takes_are_cut_and_end_together() {
        let mut d = Dispatch::new(2, 64);
        // Five runs (a gap between each), of 1 sector each, from sector 8.
        let bufs: Vec<Buf> = (0..5).map(|i| buf(0x10_0000 + i * 0x2000, 512)).collect();
        d.submit(2, 5, 8, Direction::Write, &bufs).unwrap();
        assert_eq!(d.queued(), 3);
        let got = start_all(&mut d);
        let ops: Vec<_> = got.iter().map(|g| (g.1, g.2.len())).collect();
        assert_eq!(
            ops,
            [
                (io(8, Direction::Write), 2),
                (io(10, Direction::Write), 2),
                (io(12, Direction::Write), 1)
            ]
        );
        assert_eq!(got[1].2[0], bufs[2]);
        // All three carry the one request's tag; one failed part fails it.
        assert!(got.iter().all(|g| g.0 == got[0].0));
        assert_eq!(d.finish(got[0].0, false), None);
        assert_eq!(d.finish(got[0].0, true), None);
        assert_eq!(
            d.finish(got[0].0, true),
            Some(Done {
                backend: 2,
                token: 5,
                ok: false
            })
        );
        assert!(d.is_idle());
        // Contiguous buffers still merge across what would be the cut.
        let mut d = Dispatch::new(1, 64);
        d.submit(
            0,
            1,
            0,
            Direction::Read,
            &[buf(0x1000, 4096), buf(0x2000, 4096)],
        )
        .unwrap();
        assert_eq!(d.queued(), 1);
    }

    #[test]
    fn tokens_go_back_to_their_backend() {
        let mut d = Dispatch::new(4, 64);
        for (be, tok) in [(0, 100u64), (1, 200), (0, 101), (2, 300)] {
            d.submit(be, tok, tok, Direction::Read, &[buf(tok << 12, 4096)])
                .unwrap();
        }
        let got = start_all(&mut d);
        assert_eq!(d.in_device(), 4);
        let mut ended = vec![];
        for i in [3, 0, 2, 1] {
            let (tag, op, _) = &got[i];
            let SubOp::Io { sector, .. } = op else {
                panic!()
            };
            let done = d.finish(*tag, true).unwrap();
            assert_eq!(done.token, *sector);
            ended.push((done.backend, done.token));
        }
        assert_eq!(ended, [(2, 300), (0, 100), (0, 101), (1, 200)]);
    }

    #[test]
    fn upcoming_is_what_next_offers_as_requests_start() {
        let mut d = Dispatch::new(16, 64);
        for t in 0..2u64 {
            d.submit(
                0,
                t,
                t * 8,
                Direction::Read,
                &[buf(0x10_0000 + t * 0x2000, 4096)],
            )
            .unwrap();
        }
        d.flush(0, 9).unwrap();
        d.submit(0, 3, 64, Direction::Read, &[buf(0x20_0000, 4096)])
            .unwrap();
        let ahead: Vec<_> = d.upcoming().collect();
        assert_eq!(ahead.len(), 2);
        assert_eq!(Some(ahead[0]), d.next());
        d.started();
        assert_eq!(d.upcoming().next(), d.next());
        d.started();
        // The flush stops it.
        assert_eq!(d.upcoming().count(), 0);
        assert_eq!(d.next(), None);
    }

    #[test]
    fn a_flush_is_a_barrier() {
        let mut d = Dispatch::new(8, 64);
        d.submit(0, 1, 0, Direction::Write, &[buf(0x1000, 4096)])
            .unwrap();
        d.flush(1, 2).unwrap();
        d.submit(0, 3, 8, Direction::Write, &[buf(0x3000, 4096)])
            .unwrap();
        let w = d.next().unwrap().tag;
        d.started();
        // The flush waits for the write before it...
        assert_eq!(d.next(), None);
        assert!(d.finish(w, true).is_some());
        // ...then runs alone, and what follows waits for it to end.
        let f = d.next().unwrap();
        assert_eq!((f.op, f.bufs.len()), (SubOp::Flush, 0));
        let f = f.tag;
        d.started();
        assert_eq!(d.next(), None);
        assert_eq!(d.upcoming().count(), 0);
        assert_eq!(
            d.finish(f, true),
            Some(Done {
                backend: 1,
                token: 2,
                ok: true
            })
        );
        let q = d.next().unwrap();
        assert_eq!(q.op, io(8, Direction::Write));
        assert_eq!(q.bufs, [buf(0x3000, 4096)]);
        assert_eq!(d.stats().flushes, 1);
        // A flush the device does not need ends at once.
        let mut d = Dispatch::new(8, 64);
        d.flush(4, 6).unwrap();
        assert_eq!(
            d.ended_now(true),
            Some(Done {
                backend: 4,
                token: 6,
                ok: true
            })
        );
        assert!(d.is_idle());
    }

    #[test]
    fn a_full_queue_says_busy_and_remembers_who() {
        let mut d = Dispatch::new(1, 2);
        // An empty queue takes any request, however many parts.
        let many: Vec<Buf> = (0..4).map(|i| buf(0x1000 + i * 0x2000, 512)).collect();
        d.submit(0, 1, 0, Direction::Read, &many).unwrap();
        assert_eq!(d.queued(), 4);
        assert_eq!(
            d.submit(1, 2, 0, Direction::Read, &[buf(0x9000, 512)]),
            Err(DeviceError::Busy)
        );
        assert_eq!(d.flush(1, 3), Err(DeviceError::Busy));
        assert_eq!(d.stats().busy, 2);
        // A refused request leaves nothing behind.
        assert_eq!(d.queued(), 4);
        assert_eq!(d.pending(), 1);
        assert_eq!(
            d.submit(
                0,
                4,
                0,
                Direction::Read,
                &[buf(0x9000, 512), buf(0xa000, 100)]
            ),
            Err(DeviceError::Failed)
        );
        assert_eq!(d.queued(), 4);
        assert_eq!(d.take_busy(), [1]);
        assert!(d.take_busy().is_empty());
        // Bad buffers fail at once.
        let mut e = Dispatch::new(1, 2);
        assert_eq!(
            e.submit(0, 1, 0, Direction::Read, &[]),
            Err(DeviceError::Failed)
        );
        assert_eq!(
            e.submit(0, 1, 0, Direction::Read, &[buf(0x1000, 100)]),
            Err(DeviceError::Failed)
        );
        assert_eq!(
            e.submit(0, 1, 0, Direction::Read, &[buf(0x1000, 0)]),
            Err(DeviceError::Failed)
        );
        assert!(e.is_idle());
        assert_eq!(e.pending(), 0);
    }

    #[test]
    fn requests_refused_by_the_queue_end_at_once() {
        let mut d = Dispatch::new(1, 64);
        d.submit(
            3,
            9,
            0,
            Direction::Read,
            &[buf(0x1000, 512), buf(0x4000, 512)],
        )
        .unwrap();
        assert_eq!(d.ended_now(false), None);
        assert_eq!(
            d.ended_now(true),
            Some(Done {
                backend: 3,
                token: 9,
                ok: false
            })
        );
        assert_eq!(d.ended_now(true), None);
        assert!(d.is_idle());
    }

    #[test]
    fn buffer_lists_are_reused() {
        let mut d = Dispatch::new(16, 64);
        let bufs: Vec<Buf> = (0..8).map(|i| buf(0x1000 + i * 0x2000, 512)).collect();
        for t in 0..100u64 {
            d.submit(0, t, 0, Direction::Read, &bufs).unwrap();
            let q = d.next().unwrap();
            assert_eq!(q.bufs, &bufs[..]);
            let tag = q.tag;
            d.started();
            assert!(d.finish(tag, true).is_some());
        }
        assert_eq!(d.spare.len(), 1);
        assert_eq!(d.parents.len(), 1);
    }

    /// blkback over the dispatcher, with a fake disk that completes what
    /// the dispatcher starts: tokens of several backends end up where
    /// they came from.
    #[test]
    fn two_backends_share_the_dispatcher() {
        use abi::blkif::{op, Request, Response, Segment, ENTRY_SIZE, RESPONSE_SIZE};
        use abi::grant::{CopyOp, Status as GrantStatus};
        use abi::ring::{FrontRing, State};
        use blkback::{Backend, Grants, Mapping};
        use std::collections::BTreeMap;

        /// Frontend pages by (domain, gref), mapped at their own address.
        #[derive(Default)]
        struct FakeGrants {
            next: u64,
            pages: BTreeMap<u64, [u8; 4096]>,
        }
        impl Grants for FakeGrants {
            fn map(&mut self, dom: u16, gref: u32, _ro: bool) -> Result<Mapping, GrantStatus> {
                self.next += 1;
                let addr = (u64::from(dom) << 32) | u64::from(gref) << 12;
                self.pages.entry(addr).or_insert([0; 4096]);
                Ok(Mapping {
                    handle: self.next as u32,
                    addr,
                })
            }
            fn unmap(&mut self, _m: Mapping) -> Result<(), GrantStatus> {
                Ok(())
            }
            fn copy(&mut self, _ops: &mut [CopyOp]) -> Result<(), GrantStatus> {
                Err(GrantStatus::General)
            }
            fn read(&self, addr: u64, buf: &mut [u8]) {
                let page = &self.pages[&(addr & !0xfff)];
                let o = (addr & 0xfff) as usize;
                buf.copy_from_slice(&page[o..o + buf.len()]);
            }
        }

        let mut grants = FakeGrants::default();
        let mut disk = vec![0u8; 64 * 512];
        for (i, b) in disk.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        let mut d = Dispatch::new(64, 64);
        let mut rings: Vec<([u8; 4096], FrontRing, Backend)> = (0..2u16)
            .map(|i| {
                let mut page = [0u8; 4096];
                let f = FrontRing::init(&mut page, ENTRY_SIZE);
                f.set_state(&mut page, State::Connected);
                let v = VbdInfo {
                    peer: 10 + i,
                    first_sector: 32 * u64::from(i),
                    sectors: 32,
                    readonly: false,
                    ..vbd(VbdMode::Map, VbdRole::Back)
                };
                let b = Backend::new(config(&v, 0, 8, usize::MAX, vec![])).unwrap();
                (page, f, b)
            })
            .collect();
        // Each frontend reads 4 requests of 2 segments (8 sectors: its
        // sectors 4k..4k+8).
        for (page, f, _) in rings.iter_mut() {
            for k in 0..4u64 {
                let mut r = Request {
                    operation: op::READ,
                    nr_segments: 2,
                    id: k,
                    sector: 8 * k,
                    ..Request::default()
                };
                r.seg[0] = Segment {
                    gref: (2 * k + 8) as u32,
                    first_sect: 0,
                    last_sect: 3,
                };
                r.seg[1] = Segment {
                    gref: (2 * k + 9) as u32,
                    first_sect: 4,
                    last_sect: 7,
                };
                f.put_request(page, &r.encode()).unwrap();
            }
            f.push_requests(page);
        }
        for (i, (page, _, b)) in rings.iter_mut().enumerate() {
            let mut dev = Dev {
                dispatch: &mut d,
                backend: i,
            };
            b.poll(page, &mut grants, &mut dev);
        }
        // The "device": start everything, complete the oldest, repeat.
        let mut out: std::collections::VecDeque<(u64, SubOp, Vec<Buf>)> = Default::default();
        loop {
            out.extend(start_all(&mut d));
            let Some((tag, op, bufs)) = out.pop_front() else {
                break;
            };
            if let SubOp::Io { sector, .. } = op {
                let mut s = sector as usize * 512;
                for b in bufs {
                    let page = grants.pages.get_mut(&(b.addr & !0xfff)).unwrap();
                    let o = (b.addr & 0xfff) as usize;
                    let len = b.len as usize;
                    page[o..o + len].copy_from_slice(&disk[s..s + len]);
                    s += len;
                }
            }
            if let Some(done) = d.finish(tag, true) {
                let (page, _, b) = &mut rings[done.backend];
                let mut dev = Dev {
                    dispatch: &mut d,
                    backend: done.backend,
                };
                b.complete(done.token, done.ok, page, &mut grants, &mut dev);
            }
        }
        assert!(d.is_idle());
        for (i, (page, f, b)) in rings.iter_mut().enumerate() {
            let mut seen = 0;
            let mut rsp = [0u8; RESPONSE_SIZE];
            while f.take_response(page, &mut rsp).unwrap() {
                let r = Response::decode(&rsp);
                assert_eq!(r.status, 0);
                seen += 1;
            }
            assert_eq!(seen, 4);
            assert_eq!(b.stats().reads, 4);
            // Frontend i's request k, segment 1 holds disk sectors
            // 32i + 8k + 4 .. +4 at offset 2048 of its page.
            for k in 0..4u64 {
                let addr = ((10 + i as u64) << 32) | (2 * k + 9) << 12;
                let p = &grants.pages[&addr];
                assert_eq!(p[2048], (32 * i as u64 + 8 * k + 4) as u8);
                assert_eq!(p[4095], (32 * i as u64 + 8 * k + 7) as u8);
            }
        }
    }
}
