//! The running system: the domains, the scheduler and the event channels,
//! and what happens on every entry into ring 0.
//!
//! Each entry from a domain (hypercall, timer, exception) lands in
//! [`on_user_entry`] with the domain's registers saved. It handles the
//! entry, then either resumes the same domain at once (a hypercall that
//! neither blocks nor yields, within its slice) or asks the scheduler for
//! the next one. With nothing runnable the CPU idles in HLT until the timer
//! fires; when every domain has ended the system stops as the manifest says.

use crate::arch::{self, lapic, trap, tsc};
use crate::domain::{self, Domain, State};
use crate::hypercall::{self, Outcome};
use crate::iommu_hw;
use crate::passthrough::{self, Passthrough};
use crate::pci::Function;
use crate::sync::Lock;
use crate::{boot, console, log};
use abi::bundle::{Bundle, EntryKind};
use abi::domain::{
    vif_ring_grefs, DeviceInfo, DmaMode, PeerInfo, PortInfo, PortKind, VbdInfo, VbdRole, VifInfo,
    VifRole,
};
use abi::ev;
use abi::manifest::{DmaFault, ExitRule, Manifest, WatchTarget};
use alloc::vec::Vec;
use hypervisor::evtchn::EventChannels;
use hypervisor::grant::GrantTables;
use hypervisor::policy::{Perms, Policy, Rule};
use hypervisor::sched::Scheduler;

pub struct System {
    pub domains: Vec<Domain>,
    /// Assigned PCI functions and config access, when there is ECAM.
    pub pt: Option<Passthrough>,
    /// Interrupts on vectors nobody owns, per vector.
    stray: [u64; 256],
    pub grants: GrantTables,
    pub policy: Policy,
    /// Watched ranges: name, physical address, bytes, CRC-32 before.
    watches: Vec<(alloc::string::String, u64, u64, u32)>,
    pub sched: Scheduler,
    pub evtchn: EventChannels,
    /// Index of the domain on the CPU, if any.
    current: Option<usize>,
    /// TSC when `current` was put on the CPU.
    dispatched_at: u64,
    /// TSC when `current`'s slice ends.
    slice_end: u64,
    exit_rule: ExitRule,
    /// `dma_batch`'s list of IOMMU changes, kept so that a call allocates
    /// nothing once it has grown.
    pub dma_changes: Vec<iommu::Change>,
}

static SYSTEM: Lock<Option<System>> = Lock::new(None);

impl System {
    /// The index of domain `domid` (domids are index + 1).
    pub fn index_of(&self, domid: u16) -> Option<usize> {
        let i = usize::from(domid).checked_sub(1)?;
        (i < self.domains.len()).then_some(i)
    }

    /// Makes a domain that waits for a port runnable again.
    pub fn wake(&mut self, domid: Option<u16>) {
        let Some(i) = domid.and_then(|d| self.index_of(d)) else {
            return;
        };
        if matches!(self.domains[i].state, State::Waiting { .. })
            && self.evtchn.has_pending(domid.unwrap_or(0))
        {
            self.sched.set_runnable(i, true);
        }
    }
}

/// Builds every domain of the manifest, gives them their devices and
/// starts running them. Returns only if the manifest has no domains.
pub fn start(
    manifest: &Manifest<'_>,
    bundle: &Bundle<'_>,
    functions: &[Function],
    pt: Option<Passthrough>,
) {
    let specs: Vec<_> = manifest.domains().collect();
    if specs.is_empty() {
        return;
    }
    let mut sys = System {
        pt,
        stray: [0; 256],
        grants: GrantTables::new(),
        policy: Policy::deny_all(),
        watches: Vec::new(),
        domains: Vec::new(),
        sched: Scheduler::new(),
        evtchn: EventChannels::new(),
        current: None,
        dispatched_at: 0,
        slice_end: 0,
        exit_rule: manifest.exit_rule(),
        dma_changes: Vec::new(),
    };
    let mut ends = Vec::new();
    for (i, d) in specs.iter().enumerate() {
        let Some(entry) = bundle.find(EntryKind::Image, d.image) else {
            boot::fail(
                "domain",
                format_args!("{}: image {:?} is not in the bundle", d.name, d.image),
            )
        };
        let domid = i as u16 + 1;
        let spec = domain::Spec {
            domid,
            name: d.name,
            label: d.label,
            image_name: d.image,
            memory: d.memory,
            weight: d.weight,
            expect: d.expect,
            image: entry.data,
            dma: d.dma,
            stop_on_dma_fault: d.on_dma_fault == DmaFault::Stop,
        };
        let dom = domain::build(&spec)
            .unwrap_or_else(|e| boot::fail("domain", format_args!("{}: {e}", d.name)));
        ends.push(domain::image_end(entry.data).unwrap_or(0));
        if let Err(e) = sys.evtchn.add_domain(domid) {
            boot::fail(
                "domain",
                format_args!("{}: event channels: {}", d.name, e.name()),
            );
        }
        if let Err(e) = sys.sched.add(i, d.weight) {
            boot::fail("domain", format_args!("{}: scheduler: {e}", d.name));
        }
        sys.domains.push(dom);
    }
    assign_devices(&mut sys, manifest, &specs, functions);
    for f in functions {
        let did = iommu_hw::context(f.bdf);
        console::event(&ev::IommuContext {
            unit: 0,
            bdf: f.bdf,
            present: did.is_some(),
            did: did.map_or(0, u32::from),
        });
    }
    // Channels the manifest declares are bound before anyone runs.
    let mut ports: Vec<Vec<(u16, u16, &str)>> = specs.iter().map(|_| Vec::new()).collect();
    for c in manifest.channels() {
        let (a, b) = (usize::from(c.a), usize::from(c.b));
        let (da, db) = (sys.domains[a].domid, sys.domains[b].domid);
        let (pa, pb) = sys
            .evtchn
            .bind_interdomain_at_build(da, db)
            .unwrap_or_else(|e| {
                boot::fail("domain", format_args!("channel {}: {}", c.name, e.name()))
            });
        ports[a].push((pa, db, c.name));
        ports[b].push((pb, da, c.name));
    }
    // Virtual block devices: an event channel per vbd, bound now; the ring
    // is the frontend's page, granted at its reserved reference (the n-th
    // vbd of a frontend uses ref n).
    let mut vbds: Vec<Vec<VbdInfo<'_>>> = specs.iter().map(|_| Vec::new()).collect();
    for v in manifest.vbds() {
        let (f, b) = (usize::from(v.frontend), usize::from(v.backend));
        let (df, db) = (sys.domains[f].domid, sys.domains[b].domid);
        let (pf, pb) = sys
            .evtchn
            .bind_interdomain_at_build(df, db)
            .unwrap_or_else(|e| boot::fail("domain", format_args!("vbd {}: {}", v.name, e.name())));
        let ring_gref = vbds[f].iter().filter(|v| v.role == VbdRole::Front).count() as u32;
        let end = |role, peer, port| VbdInfo {
            name: v.name,
            role,
            peer,
            port,
            ring_gref,
            first_sector: v.first_sector,
            sectors: v.sectors,
            readonly: v.readonly,
            mode: v.mode,
        };
        vbds[f].push(end(VbdRole::Front, db, pf));
        vbds[b].push(end(VbdRole::Back, df, pb));
    }
    // Virtual network interfaces likewise: the frontend's n-th vif grants
    // its TX and RX rings at `vif_ring_grefs(n)`.
    let mut vifs: Vec<Vec<VifInfo<'_>>> = specs.iter().map(|_| Vec::new()).collect();
    for v in manifest.vifs() {
        let (f, b) = (usize::from(v.frontend), usize::from(v.backend));
        let (df, db) = (sys.domains[f].domid, sys.domains[b].domid);
        let (pf, pb) = sys
            .evtchn
            .bind_interdomain_at_build(df, db)
            .unwrap_or_else(|e| boot::fail("domain", format_args!("vif {}: {}", v.name, e.name())));
        let n = vifs[f].iter().filter(|x| x.role == VifRole::Front).count();
        let (tx, rx) = vif_ring_grefs(n);
        let end = |role, peer, port| VifInfo {
            name: v.name,
            role,
            peer,
            port,
            tx_ring_gref: tx,
            rx_ring_gref: rx,
            mac: v.mac,
            ip: v.ip,
        };
        vifs[f].push(end(VifRole::Front, db, pf));
        vifs[b].push(end(VifRole::Back, df, pb));
    }
    sys.policy = Policy::new(
        manifest
            .allows()
            .map(|a| {
                Rule::new(
                    a.subject,
                    a.object,
                    Perms::from_bits(a.perms).unwrap_or(Perms::NONE),
                )
            })
            .collect(),
    );
    for (i, d) in sys.domains.iter().enumerate() {
        let my_ports: Vec<PortInfo<'_>> = ports[i]
            .iter()
            .map(|&(port, peer_domid, name)| PortInfo {
                port,
                peer_domid,
                kind: PortKind::Interdomain,
                name,
            })
            .collect();
        let peers: Vec<PeerInfo<'_>> = sys
            .domains
            .iter()
            .filter(|p| p.domid != d.domid)
            .map(|p| PeerInfo {
                domid: p.domid,
                name: &p.name,
                mem_phys: p.mem_phys,
                mem_bytes: p.mem_pages * 4096,
            })
            .collect();
        domain::write_start_info(
            d,
            specs[i].args,
            ends[i],
            &my_ports,
            &peers,
            &vbds[i],
            &vifs[i],
        )
        .unwrap_or_else(|e| boot::fail("domain", format_args!("{}: {e}", d.name)));
        console::event(&ev::DomainStart {
            domain: &d.name,
            domid: d.domid,
            label: &d.label,
            image: &d.image,
            mem_bytes: d.mem_pages * 4096,
            mem_phys: ev::Hex(d.mem_phys),
            weight: d.weight,
        });
    }
    log!(
        "{} domains built; timer: {}",
        sys.domains.len(),
        if lapic::uses_tsc_deadline() {
            "TSC deadline"
        } else {
            "APIC count-down"
        }
    );
    for w in manifest.watches() {
        let addr = match w.target {
            WatchTarget::Phys(pa) => pa,
            WatchTarget::Domain(i) => sys.domains.get(usize::from(i)).map_or(0, |d| d.mem_phys),
        };
        let crc = watch_crc(addr, w.len);
        console::event(&ev::Watch {
            name: w.name,
            addr: ev::Hex(addr),
            len: w.len,
            crc32: ev::Hex(u64::from(crc)),
            when: "before",
        });
        sys.watches
            .push((alloc::string::String::from(w.name), addr, w.len, crc));
    }
    for i in 0..sys.domains.len() {
        sys.sched.set_runnable(i, true);
    }
    *SYSTEM.lock() = Some(sys);
    schedule()
}

/// Gives each domain the functions the manifest assigns it: BARs mapped,
/// IOMMU context, its memory mirrored for DMA in static mode, interrupts
/// routed.
fn assign_devices(
    sys: &mut System,
    manifest: &Manifest<'_>,
    specs: &[abi::manifest::Domain<'_>],
    functions: &[Function],
) {
    let devices: Vec<_> = manifest.devices().collect();
    for (i, spec) in specs.iter().enumerate() {
        let mut va = abi::domain::DEVICE_VA;
        for (n, dev_index) in spec.devices.iter().enumerate() {
            let Some(md) = devices.get(usize::from(dev_index)) else {
                boot::fail(
                    "manifest",
                    format_args!("{}: device index {dev_index} out of range", spec.name),
                )
            };
            let Some(f) = functions.iter().find(|f| f.bdf == md.bdf) else {
                boot::fail(
                    "manifest",
                    format_args!("{}: {} is not present", spec.name, md.bdf),
                )
            };
            let Some(pt) = sys.pt.as_mut() else {
                boot::fail(
                    "iommu",
                    format_args!("{}: devices need a DMA remapping unit and ECAM", spec.name),
                )
            };
            let (layout, next) = passthrough::bar_layout(f, va);
            va = next;
            let d = &mut sys.domains[i];
            let bars = d.map_bars(&layout);
            d.devices.push(DeviceInfo {
                bdf: f.bdf,
                vendor: f.vendor,
                device: f.device,
                bars,
            });
            let rec = pt.assign(f, i, n, d.domid).unwrap_or_else(|e| {
                boot::fail("iommu", format_args!("{}: {}: {e}", d.name, f.bdf))
            });
            let mut mapped = 0;
            if d.dma == DmaMode::Static && n == 0 {
                for &(va, pa, len, w) in &d.memory_map {
                    iommu_hw::map(d.domid, va, pa, len, w)
                        .unwrap_or_else(|e| boot::fail("iommu", format_args!("{}: {e}", d.name)));
                    mapped += len;
                }
            }
            console::event(&ev::DeviceAssign {
                bdf: f.bdf,
                domain: &d.name,
                did: iommu_hw::context(f.bdf).map_or(0, u32::from),
                dma: if d.dma == DmaMode::Static {
                    "static"
                } else {
                    "strict"
                },
                levels: iommu_hw::levels(),
                mapped_bytes: mapped,
                irtes: pt.assigned[rec].vectors.len() as u32,
            });
        }
    }
}

/// The CRC-32 of a watched physical range (through the direct map or the
/// device window).
fn watch_crc(pa: u64, len: u64) -> u32 {
    let p = crate::mm::phys_to_ptr(pa, len);
    // SAFETY: `p` maps `len` bytes from `pa`; they are only read, and
    // nothing writes them while ring 0 runs.
    let bytes = unsafe { core::slice::from_raw_parts(p, len as usize) };
    abi::crc32::crc32(bytes)
}

/// A device interrupt (or the IOMMU's fault event), from ring 3 or idle.
fn interrupt(sys: &mut System, vector: u8) {
    lapic::eoi();
    if vector == passthrough::FAULT_VECTOR {
        iommu_faults(sys);
        return;
    }
    let Some(a) = sys.pt.as_ref().and_then(|pt| pt.owner_of(vector)) else {
        stray_interrupt(sys, vector);
        return;
    };
    let (owner, dev) = (a.owner, a.dev);
    let domid = sys.domains[owner].domid;
    if !sys.domains[owner].is_dead()
        && sys
            .evtchn
            .raise_virq(domid, abi::hypercall::virq::device(dev) as u32)
    {
        sys.wake(Some(domid));
    }
}

/// Counts an interrupt on a vector nobody owns; the first on each vector
/// is logged, the counts are printed at shutdown.
fn stray_interrupt(sys: &mut System, vector: u8) {
    let n = &mut sys.stray[usize::from(vector)];
    *n += 1;
    if *n == 1 {
        log!("interrupt on vector {vector:#x}, which nobody owns");
    }
}

/// Reports every recorded DMA fault and stops the owners whose manifest
/// says so.
fn iommu_faults(sys: &mut System) {
    let mut stop = Vec::new();
    let mut records = Vec::new();
    iommu_hw::take_faults(|rec, unit| records.push((*rec, unit)));
    for (rec, unit) in records {
        let owner = sys.pt.as_ref().and_then(|pt| pt.owner_of_bdf(rec.source));
        let name = owner.map_or("none", |i| sys.domains[i].name.as_str());
        console::event(&ev::IommuFault {
            unit,
            source: rec.source,
            addr: ev::Hex(rec.addr),
            reason: ev::Code {
                raw: u64::from(rec.reason),
                name: rec.reason_name,
            },
            access: rec.access.name(),
            domain: name,
            record_lo: ev::Hex(rec.raw[0]),
            record_hi: ev::Hex(rec.raw[1]),
        });
        if let Some(i) = owner {
            stop.push(i);
        }
    }
    for i in stop {
        if sys.domains[i].stop_on_dma_fault && !sys.domains[i].is_dead() {
            end_domain(sys, i, -1, "dma-fault");
        }
    }
}

/// An interrupt while the CPU idled.
pub fn on_idle_interrupt(vector: u8) {
    if vector == trap::TIMER_VECTOR {
        lapic::eoi();
        return;
    }
    let mut guard = SYSTEM.lock();
    match guard.as_mut() {
        Some(sys) => interrupt(sys, vector),
        None => lapic::eoi(),
    }
}

/// Every entry from ring 3 comes here (see `arch::trap`).
pub fn on_user_entry() -> ! {
    let mut guard = SYSTEM.lock();
    let sys = guard.as_mut().expect("a domain ran, so the system exists");
    let cur = sys
        .current
        .expect("an entry from ring 3 has a current domain");
    let vector = sys.domains[cur].ctx.vector;
    let now = tsc::read();
    let mut resume_now = false;
    if vector == trap::SYSCALL_VECTOR {
        match hypercall::dispatch(sys, cur) {
            Outcome::Return(v) => {
                sys.domains[cur].ctx.rax = v as u64;
                resume_now = now < sys.slice_end;
            }
            Outcome::Yield => {
                sys.domains[cur].ctx.rax = 0;
            }
            Outcome::Block => {
                sys.sched.set_runnable(cur, false);
            }
            Outcome::Exit(status) => end_domain(sys, cur, status, "exit"),
        }
    } else if vector == u64::from(trap::TIMER_VECTOR) {
        lapic::eoi();
    } else if vector == u64::from(trap::SPURIOUS_VECTOR) {
        // Needs no EOI and wakes nobody.
        resume_now = now < sys.slice_end;
    } else if (32..256).contains(&vector) {
        interrupt(sys, vector as u8);
    } else if vector < 32 {
        let d = &sys.domains[cur];
        let addr = if vector == 14 {
            x86_64::registers::control::Cr2::read_raw()
        } else {
            0
        };
        console::event(&ev::DomainFault {
            domain: &d.name,
            vector: vector as u8,
            vector_name: arch::exceptions::vector_name(vector),
            error_code: ev::Hex(d.ctx.error_code),
            rip: ev::Hex(d.ctx.rip),
            addr: ev::Hex(addr),
        });
        end_domain(sys, cur, -1, "fault");
    }
    if resume_now && !sys.domains[cur].is_dead() {
        let ctx: *mut trap::UserContext = &mut *sys.domains[cur].ctx;
        drop(guard);
        // SAFETY: the domain is alive and current; its context box outlives
        // this call, and nothing else touches it until its next entry.
        trap::return_to_user(unsafe { &mut *ctx });
    }
    // It leaves the CPU: charge what it used.
    let used = ns(now.saturating_sub(sys.dispatched_at));
    sys.sched.charge(cur, used);
    drop(guard);
    schedule()
}

fn ns(tsc_delta: u64) -> u64 {
    (u128::from(tsc_delta) * 1_000_000 / u128::from(tsc::khz().max(1))) as u64
}

/// Ends domain `i`: reports it, closes its ports, frees its memory.
fn end_domain(sys: &mut System, i: usize, status: i64, reason: &'static str) {
    hypercall::flush_console(sys, i);
    // Its devices stop mastering and leave its IOMMU domain, and every
    // grant mapping of or by it goes, before its memory can be reused.
    if let Some(pt) = sys.pt.as_mut() {
        pt.release(i);
    }
    crate::grants_hw::domain_died(sys, i);
    let held = sys.grants.frames_held(sys.domains[i].domid);
    // Leave its address space before its tables go.
    arch::paging::activate_kernel();
    if sys.current == Some(i) {
        let used = ns(tsc::read().saturating_sub(sys.dispatched_at));
        sys.sched.charge(i, used);
        sys.current = None;
    }
    let d = &mut sys.domains[i];
    let expected = d.ends_as_expected(status, reason);
    console::event(&ev::DomainExit {
        domain: &d.name,
        status,
        reason,
        expected,
    });
    console::event(&ev::Hypercalls {
        domain: &d.name,
        calls: d.calls,
        refused: d.refused,
    });
    if !d.devices.is_empty() {
        let (maps, unmaps, iotlb_invalidations) = iommu_hw::domain_stats(d.domid);
        console::event(&ev::IommuStats {
            domain: &d.name,
            maps,
            unmaps,
            iotlb_invalidations,
        });
    }
    d.state = State::Dead;
    d.ended = Some((status, reason));
    d.timer_ns = None;
    let domid = d.domid;
    d.free_memory(&held);
    d.cpu_ns = sys.sched.cpu_ns(i);
    d.dispatches = sys.sched.dispatches(i);
    sys.sched.remove(i);
    for peer in sys.evtchn.destroy_domain(domid) {
        sys.wake(Some(peer));
    }
}

/// Picks the next domain and runs it; idles while none can run; stops the
/// system when every domain has ended.
fn schedule() -> ! {
    loop {
        let mut guard = SYSTEM.lock();
        let sys = guard.as_mut().expect("system");
        let now_ns = tsc::ns_since_entry();
        // Domain timers that are due raise VIRQ_TIMER.
        for i in 0..sys.domains.len() {
            if let Some(t) = sys.domains[i].timer_ns {
                if t <= now_ns && !sys.domains[i].is_dead() {
                    sys.domains[i].timer_ns = None;
                    let domid = sys.domains[i].domid;
                    if sys
                        .evtchn
                        .raise_virq(domid, abi::hypercall::virq::TIMER as u32)
                    {
                        sys.wake(Some(domid));
                    }
                }
            }
        }
        let next_timer = sys.domains.iter().filter_map(|d| d.timer_ns).min();
        if let Some((next, slice)) = sys.sched.pick(now_ns) {
            let now = tsc::read();
            let d = &mut sys.domains[next];
            d.activate();
            if let State::Waiting { ptr } = d.state {
                d.state = State::Runnable;
                let n = hypercall::deliver(sys, next, ptr);
                sys.domains[next].ctx.rax = u64::from(n);
            }
            sys.current = Some(next);
            sys.dispatched_at = now;
            sys.slice_end = now + slice * tsc::khz() / 1_000_000;
            let deadline = match next_timer {
                Some(t) => sys.slice_end.min(tsc::tsc_at_ns(t)),
                None => sys.slice_end,
            };
            lapic::arm(deadline);
            let ctx: *mut trap::UserContext = &mut *sys.domains[next].ctx;
            drop(guard);
            // SAFETY: the domain is alive and now current; its context box
            // outlives its running.
            trap::return_to_user(unsafe { &mut *ctx });
        }
        if sys.domains.iter().all(Domain::is_dead) {
            finish(sys);
        }
        // Idle until the next domain timer (or for ever: only a timer can
        // wake anyone when no domain runs).
        sys.current = None;
        if let Some(t) = next_timer {
            lapic::arm(tsc::tsc_at_ns(t));
        } else {
            log!("every live domain waits and no timer is set: the system cannot make progress");
            finish(sys);
        }
        drop(guard);
        x86_64::instructions::interrupts::enable_and_hlt();
        x86_64::instructions::interrupts::disable();
    }
}

/// Every domain has ended: report CPU time and stop.
fn finish(sys: &mut System) -> ! {
    for (name, addr, len, _) in &sys.watches {
        let crc = watch_crc(*addr, *len);
        console::event(&ev::Watch {
            name,
            addr: ev::Hex(*addr),
            len: *len,
            crc32: ev::Hex(u64::from(crc)),
            when: "after",
        });
    }
    for (v, &count) in sys.stray.iter().enumerate() {
        if count > 0 {
            console::event(&ev::StrayInterrupt {
                vector: v as u8,
                count,
            });
        }
    }
    for d in &sys.domains {
        console::event(&ev::DomainCpu {
            domain: &d.name,
            weight: d.weight,
            cpu_ns: d.cpu_ns,
            dispatches: d.dispatches,
        });
    }
    let all_expected = sys.domains.iter().all(|d| {
        d.ended
            .is_some_and(|(status, reason)| d.ends_as_expected(status, reason))
    });
    match sys.exit_rule {
        ExitRule::Never => {
            log!("every domain has ended; exit rule never: halting");
            arch::halt_forever()
        }
        _ if all_expected => {
            console::event(&ev::Shutdown {
                status: 0,
                reason: "every domain ended as the manifest expects",
            });
            arch::exit_qemu(abi::exit::SUCCESS)
        }
        _ => {
            console::event(&ev::Shutdown {
                status: 1,
                reason: "a domain did not end as the manifest expects",
            });
            arch::exit_qemu(abi::exit::FAILURE)
        }
    }
}
