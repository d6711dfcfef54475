//! The blk driver domain: drives the virtio-blk function the manifest
//! assigns to it (1af4:1042) with `driver_domains::vblk`, in ring 3, its DMA
//! confined by the IOMMU. What it does comes from its args
//! (`driver_domains::blk`): verify a pattern the harness wrote, write a
//! second one, flush, read it back (`data_check` for each); then the
//! measured steps, unchecked: sequential reads, random 4 KiB reads,
//! sequential writes, each reported as a `throughput` event as the guests'
//! blkfront runner reports its own (the bench's *direct* baseline); exit 0
//! if all matched and no request failed, 1 otherwise.
//!
//! Interrupts: `dev_irq_bind(0)` gives the port the hypervisor raises for
//! any MSI-X entry of the function; the transport sets MSI-X entry 0 as
//! the queue's and the configuration vector (`pci_transport_msix`;
//! `driver_domains::device` sets the function up).
//! Both modes drive the device with `driver_domains::vblk`. In direct
//! mode requests go in up to `depth`
//! (from the args) at a time, each with its own buffer of up to 64 KiB as
//! one data descriptor between its header and status descriptors, and the
//! device hears of each batch with one notification; the domain then
//! blocks in `wait` until the port is pending and takes what the used ring
//! holds, every completion checked. A timer VIRQ bounds each wait: an
//! interrupt that never comes is a failure, not a hang. The flush is a
//! request like the others, waited for the same way (nothing spins).
//!
//! With `serve=1` in its args it serves instead the vbds its start info
//! lists with role Back, through blkback, until every frontend has closed
//! (`driver_domains::serve`); the device is set up the same way.
#![cfg_attr(target_os = "none", no_std, no_main)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

use abi::ev::{DataCheck, Throughput};
use blkback::Buf;
use driver_domains::blk::{chunks, random, sequential, Plan};
use driver_domains::blk_pattern::{self, SECTOR};
use driver_domains::device::{self, DomTransport, VECTOR};
use driver_domains::serve;
use driver_domains::vblk::{Op, Status, SubmitError, VirtioBlk, QUEUE_SIZE};
use libdom::virtio::DomHal;
use libdom::{event, println, time_ns};

/// virtio-blk, modern (virtio 1.x) PCI ids; one queue.
static KIND: device::Kind = device::Kind {
    log: "blk",
    name: "virtio-blk",
    vendor: 0x1af4,
    device: 0x1042,
    queues: 1,
};
type Blk = VirtioBlk<DomHal, DomTransport, QUEUE_SIZE>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

/// One request's data buffer: the device reads or writes it until its
/// completion, so it is neither touched nor moved while the request is out
/// (the slot vector never grows).
struct Slot {
    buf: Vec<u8>,
    /// (first sector, sectors) while in flight.
    out: Option<(u64, u64)>,
}

/// The flush's tag (I/O requests' tags are slot indices).
const FLUSH_TAG: u64 = u64::MAX;

#[derive(Default)]
struct Stats {
    requests: u64,
    sectors: u64,
    /// Waits that ended with the device's port pending.
    interrupts: u64,
    /// Of those, how many found nothing new in the used ring.
    spurious: u64,
    ns: u64,
    /// The most requests that were in flight at once.
    most_in_flight: u64,
}

struct Disk {
    blk: Blk,
    port: u16,
    timer: u16,
    slots: Vec<Slot>,
    stats: Stats,
}

impl Disk {
    /// Blocks until the device's port is pending; a timeout is an error.
    fn wait_irq(&mut self) -> Result<(), &'static str> {
        device::wait_irq(self.port, self.timer)?;
        self.stats.interrupts += 1;
        if !self.blk.has_used() {
            self.stats.spurious += 1;
        }
        Ok(())
    }

    /// Runs the requests `reqs` gives ((first sector, sectors) each), up
    /// to one per slot in flight, the device told of each batch once;
    /// `fill` prepares each write buffer, `check` looks at each completed
    /// read and returns how many of its sectors are wrong. A full queue
    /// takes the request again once one completes.
    fn transfer(
        &mut self,
        dir: Dir,
        reqs: impl Iterator<Item = (u64, u64)>,
        fill: impl Fn(u64, &mut [u8]),
        mut check: impl FnMut(u64, &[u8]) -> u64,
    ) -> Result<Run, &'static str> {
        let t0 = time_ns();
        let mut todo = reqs.peekable();
        let mut run = Run::default();
        let mut in_flight = 0;
        let op = match dir {
            Dir::Read => Op::Read,
            Dir::Write => Op::Write,
        };
        loop {
            // Submit into every free slot.
            while let Some(&(first, n)) = todo.peek() {
                let Some(i) = self.slots.iter().position(|s| s.out.is_none()) else {
                    break;
                };
                let s = &mut self.slots[i];
                let len = n as usize * SECTOR;
                if dir == Dir::Write {
                    fill(first, &mut s.buf[..len]);
                }
                let b = Buf {
                    addr: s.buf.as_mut_ptr() as u64,
                    len: len as u32,
                };
                // SAFETY: `buf[..len]` belongs to slot `i`, which is
                // neither touched nor moved (the slot vector never grows,
                // the buffer is never reallocated) until `pop` returns its
                // completion below.
                match unsafe { self.blk.submit(op, first, &[b], i as u64) } {
                    Ok(()) => {}
                    Err(SubmitError::Full) if in_flight > 0 => break,
                    Err(_) => return Err("the queue refused a request"),
                }
                todo.next();
                s.out = Some((first, n));
                in_flight += 1;
                run.most_in_flight = run.most_in_flight.max(in_flight);
            }
            self.blk.notify();
            if in_flight == 0 {
                break;
            }
            // Take every completion there is; wait if there is none.
            let mut got = 0;
            while let Some(c) = self.blk.pop().map_err(|_| BROKEN)? {
                let s = usize::try_from(c.tag)
                    .ok()
                    .and_then(|i| self.slots.get_mut(i))
                    .ok_or("a completion for no request")?;
                let (first, n) = s.out.take().ok_or("a completion for no request")?;
                let len = n as usize * SECTOR;
                in_flight -= 1;
                got += 1;
                run.requests += 1;
                run.sectors += n;
                match c.status {
                    Status::Ok if dir == Dir::Read => run.bad += check(first, &s.buf[..len]),
                    Status::Ok => {}
                    st => {
                        println!("blk: request at sector {first} ({n} sectors) failed: {st:?}");
                        run.bad += n;
                    }
                }
            }
            if got == 0 {
                self.wait_irq()?;
            }
        }
        run.ns = time_ns() - t0;
        self.stats.requests += run.requests;
        self.stats.sectors += run.sectors;
        self.stats.ns += run.ns;
        self.stats.most_in_flight = self.stats.most_in_flight.max(run.most_in_flight);
        Ok(run)
    }

    /// Flushes the device's write cache: a request like the others, waited
    /// for with the device's interrupt (nothing spins). Only with nothing
    /// else in flight (after a `transfer`). Without FLUSH the device
    /// writes through: nothing to do.
    fn flush(&mut self) -> Result<(), &'static str> {
        if !self.blk.has_flush() {
            return Ok(());
        }
        // SAFETY: a flush has no buffers.
        unsafe { self.blk.submit(Op::Flush, 0, &[], FLUSH_TAG) }
            .map_err(|_| "the queue refused the flush")?;
        self.blk.notify();
        loop {
            match self.blk.pop().map_err(|_| BROKEN)? {
                Some(c) if c.tag == FLUSH_TAG && c.status.is_ok() => return Ok(()),
                Some(c) if c.tag == FLUSH_TAG => {
                    println!("blk: flush failed: {:?}", c.status);
                    return Err("the flush failed");
                }
                Some(_) => return Err("a completion for no request"),
                None => self.wait_irq()?,
            }
        }
    }
}

/// What a broken queue is reported as.
const BROKEN: &str = "the device completed a request we did not make";

/// What one [`Disk::transfer`] did.
#[derive(Default)]
struct Run {
    requests: u64,
    sectors: u64,
    /// Sectors `check` or the device found wrong.
    bad: u64,
    ns: u64,
    most_in_flight: u64,
}

/// Sectors of `buf` (starting at sector `first`) that differ from pattern
/// `name`; the first few are printed.
fn check_pattern(name: &str, first: u64, buf: &[u8], reported: &mut u32) -> u64 {
    let mut bad = 0;
    for (k, got) in buf.chunks_exact(SECTOR).enumerate() {
        let s = first + k as u64;
        if let Some(at) = blk_pattern::mismatch(name, s, got) {
            bad += 1;
            if *reported < 4 {
                *reported += 1;
                println!(
                    "blk: sector {s} differs from pattern {name} at byte {at} ({:#04x}, expected {:#04x})",
                    got[at],
                    blk_pattern::sector(name, s)[at]
                );
            }
        }
    }
    bad
}

fn data_check(what: &str, sectors: &Range<u64>, ok: bool) {
    let _ = event(&DataCheck {
        what,
        bytes: (sectors.end - sectors.start) * SECTOR as u64,
        ok,
    });
}

/// The driver on `transport`, once the device took its vectors (printed).
fn make(f: &device::Function, transport: DomTransport, si: &libdom::StartInfo<'_>) -> Option<Blk> {
    let blk = Blk::new(transport)
        .inspect_err(|e| println!("blk: virtio-blk init: {e:?}"))
        .ok()?;
    let init_us = f.ready()?;
    println!(
        "blk: {} {} sectors{}, init {init_us} us, {QUEUE_SIZE} descriptors, {} buffers per request, MSI-X vector {VECTOR} -> port {}, DMA {:?}",
        f.info.bdf,
        blk.capacity(),
        if blk.readonly() { " (read-only)" } else { "" },
        blk.max_segs(),
        f.port,
        si.dma
    );
    Some(blk)
}

fn run(si: &libdom::StartInfo<'_>) -> i64 {
    // `serve=1`: blkback for the vbds the start info names
    // (`driver_domains::serve`); anything else is the direct mode's plan.
    let serve = serve::is_serve(si.args);
    let plan = if serve {
        None
    } else {
        match Plan::parse(si.args) {
            Ok(p) => Some(p),
            Err(e) => {
                println!("blk: args: {e}");
                return 1;
            }
        }
    };
    let Some((f, transport)) = device::open(si, &KIND) else {
        return 1;
    };
    let Some(blk) = make(&f, transport, si) else {
        return 1;
    };
    let Some(plan) = plan else {
        return serve::run(si, blk, f.port, f.timer);
    };
    if plan.end() > blk.capacity() {
        println!(
            "blk: the args reach sector {}, past the disk's {}",
            plan.end(),
            blk.capacity()
        );
        return 1;
    }
    let span = plan.span_on(blk.capacity());
    if plan.measures() {
        if let Err(e) = plan.check_span(span.clone()) {
            println!("blk: args: {e}");
            return 1;
        }
    }
    let slots = (0..plan.depth)
        .map(|_| Slot {
            buf: vec![0; plan.buf_bytes()],
            out: None,
        })
        .collect();
    let mut disk = Disk {
        blk,
        port: f.port,
        timer: f.timer,
        slots,
        stats: Stats::default(),
    };
    let mut all_ok = true;
    let mut reported = 0;
    if let Some(v) = &plan.verify {
        let r = disk.transfer(
            Dir::Read,
            chunks(v.sectors.clone(), plan.batch),
            |_, _| {},
            |first, buf| check_pattern(v.pattern, first, buf, &mut reported),
        );
        let ok = matches!(r, Ok(Run { bad: 0, .. }));
        match r {
            Ok(Run { bad: 0, .. }) => {}
            Ok(r) => println!("blk: {} sectors of {:?} are wrong", r.bad, v.sectors),
            Err(why) => println!("blk: reading {:?}: {why}", v.sectors),
        }
        data_check("blk-read", &v.sectors, ok);
        all_ok &= ok;
    }
    if let Some(w) = &plan.write {
        let wrote = disk
            .transfer(
                Dir::Write,
                chunks(w.sectors.clone(), plan.batch),
                |first, buf| {
                    for (k, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
                        if let Ok(s) = <&mut [u8; SECTOR]>::try_from(s) {
                            blk_pattern::fill(w.pattern, first + k as u64, s);
                        }
                    }
                },
                |_, _| 0,
            )
            .map(|r| r.bad);
        let flushed = disk.flush();
        let r = match (wrote, flushed) {
            (Ok(0), Ok(())) => disk
                .transfer(
                    Dir::Read,
                    chunks(w.sectors.clone(), plan.batch),
                    |_, _| {},
                    |first, buf| check_pattern(w.pattern, first, buf, &mut reported),
                )
                .map(|r| r.bad),
            (Ok(0), Err(why)) => {
                println!("blk: flush: {why}");
                Ok(1)
            }
            (r, _) => r,
        };
        let ok = matches!(r, Ok(0));
        match r {
            Ok(0) => {}
            Ok(bad) => println!("blk: {bad} sectors of {:?} are wrong", w.sectors),
            Err(why) => println!("blk: writing {:?}: {why}", w.sectors),
        }
        data_check("blk-write", &w.sectors, ok);
        all_ok &= ok;
    }
    let block = plan.bs / SECTOR as u64;
    if plan.seq_bytes > 0 {
        let r = disk.transfer(
            Dir::Read,
            sequential(span.clone(), block, plan.seq_bytes),
            |_, _| {},
            |_, _| 0,
        );
        all_ok &= measured("blk-seq-read", r, plan.bs, plan.depth, false, &mut disk);
    }
    if plan.rand > 0 {
        let r = disk.transfer(
            Dir::Read,
            random(span.clone(), plan.rand),
            |_, _| {},
            |_, _| 0,
        );
        all_ok &= measured("blk-rand-read", r, RAND_BYTES, plan.depth, false, &mut disk);
    }
    if plan.write_bytes > 0 {
        let r = disk.transfer(
            Dir::Write,
            sequential(span.clone(), block, plan.write_bytes),
            |_, _| {},
            |_, _| 0,
        );
        all_ok &= measured("blk-seq-write", r, plan.bs, plan.depth, true, &mut disk);
    }
    let s = &disk.stats;
    println!(
        "blk: {} requests, {} sectors in {} us ({} us per request, depth {}, {} sectors each); {} interrupts, {} with nothing new; at most {} in flight; {} notifications, {} full, bad from the device: {:?}",
        s.requests,
        s.sectors,
        s.ns / 1000,
        s.ns / 1000 / s.requests.max(1),
        plan.depth,
        summary_sectors(&plan),
        s.interrupts,
        s.spurious,
        s.most_in_flight,
        disk.blk.stats().notifies,
        disk.blk.stats().full,
        disk.blk.stats().bad
    );
    i64::from(!all_ok)
}

/// 4 KiB: the random reads' size.
const RAND_BYTES: u64 = driver_domains::blk::RAND_SECTORS * SECTOR as u64;

/// The summary line's "sectors each": the verify and write steps' batch,
/// else the measured steps' request size (`xtask bench` reads the line
/// when no `throughput` event came).
fn summary_sectors(plan: &Plan<'_>) -> u64 {
    if plan.verify.is_some() || plan.write.is_some() {
        plan.batch
    } else if plan.seq_bytes > 0 || plan.write_bytes > 0 {
        plan.bs / SECTOR as u64
    } else {
        driver_domains::blk::RAND_SECTORS
    }
}

/// Reports a measured step as blkfront's runner does (`throughput` and a
/// console line with MB/s and IOPS); with `flush`, a flush is part of it
/// (writes). False if a request failed.
fn measured(
    what: &str,
    r: Result<Run, &'static str>,
    block: u64,
    depth: u64,
    flush: bool,
    disk: &mut Disk,
) -> bool {
    let mut r = match r {
        Ok(r) => r,
        Err(why) => {
            println!("blk: {what}: {why}");
            return false;
        }
    };
    if flush {
        let t0 = time_ns();
        if let Err(why) = disk.flush() {
            println!("blk: {what}: flush: {why}");
            return false;
        }
        r.ns += time_ns() - t0;
    }
    let bytes = r.sectors * SECTOR as u64;
    let _ = event(&Throughput {
        what,
        bytes,
        requests: r.requests,
        ns: r.ns,
        block,
        depth,
    });
    let ns = r.ns.max(1);
    let mbs = (u128::from(bytes) * 100_000 / u128::from(ns)) as u64;
    let iops = u128::from(r.requests) * 1_000_000_000 / u128::from(ns);
    println!(
        "blk: {what}: {bytes} bytes in {} requests, {} us, {}.{:02} MB/s, {iops} IOPS (block {block}, depth {depth}, at most {} in flight){}",
        r.requests,
        r.ns / 1000,
        mbs / 100,
        mbs % 100,
        r.most_in_flight,
        if r.bad > 0 { " -- some requests FAILED" } else { "" }
    );
    r.bad == 0
}

libdom::entry!(run);
