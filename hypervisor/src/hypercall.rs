//! Hypercall dispatch. The table and the error rules are `abi::hypercall`'s;
//! this file only carries them out. Every pointer is checked against the
//! caller's `UserRegions` before it is touched, and what it points at is
//! copied once into ring 0 before it is looked at.

use crate::arch::tsc;
use crate::console;
use crate::run::System;
use abi::hypercall::{Call, Error, CONSOLE_MAX, EVENT_MAX, PORT_WORDS, WAIT_NONBLOCK};
use hypervisor::uaccess::Access;

/// What the caller gets.
pub enum Outcome {
    /// Resume it with this value in RAX.
    Return(i64),
    /// It waits for a port; resume it when one is pending.
    Block,
    /// It gives up the CPU and stays runnable (RAX = 0).
    Yield,
    /// It ends with this status.
    Exit(i64),
}

/// Carries out the hypercall the domain at `idx` made; its registers are
/// in its saved context and its address space is the current one.
pub fn dispatch(sys: &mut System, idx: usize) -> Outcome {
    let ctx = &sys.domains[idx].ctx;
    let (nr, args) = (ctx.rax, [ctx.rdi, ctx.rsi, ctx.rdx, ctx.r10]);
    let out = match Call::from_raw(nr) {
        None => Outcome::Return(Error::UnknownCall.to_raw()),
        Some(call) => match handle(sys, idx, call, args) {
            Ok(o) => o,
            Err(e) => Outcome::Return(e.to_raw()),
        },
    };
    let d = &mut sys.domains[idx];
    d.calls += 1;
    if matches!(out, Outcome::Return(v) if v < 0) {
        d.refused += 1;
    }
    out
}

fn handle(sys: &mut System, idx: usize, call: Call, a: [u64; 4]) -> Result<Outcome, Error> {
    let domid = sys.domains[idx].domid;
    let ok = |v: u64| Ok(Outcome::Return(v as i64));
    match call {
        Call::ConsoleWrite => {
            let (ptr, len) = (a[0], a[1]);
            if len == 0 {
                return ok(0);
            }
            if len > CONSOLE_MAX {
                return Err(Error::BadLength);
            }
            let mut buf = [0u8; CONSOLE_MAX as usize];
            copy_in(sys, idx, ptr, &mut buf[..len as usize])?;
            console_text(sys, idx, &buf[..len as usize]);
            ok(len)
        }
        Call::Event => {
            let (ptr, len) = (a[0], a[1]);
            if len == 0 || len > EVENT_MAX {
                return Err(Error::BadLength);
            }
            let mut buf = [0u8; EVENT_MAX as usize];
            let bytes = &mut buf[..len as usize];
            copy_in(sys, idx, ptr, bytes)?;
            hypervisor::domev::validate(bytes)?;
            // Valid JSON object on one line, ending in '}': splice the stamp in.
            let text = core::str::from_utf8(bytes).map_err(|_| Error::Invalid)?;
            let body = text.trim_end().strip_suffix('}').ok_or(Error::Invalid)?;
            let mut line = alloc::string::String::with_capacity(text.len() + 64);
            line.push_str(abi::ev::PREFIX);
            line.push_str(body);
            line.push_str(if body.trim_end().ends_with('{') {
                "\"from\":"
            } else {
                ",\"from\":"
            });
            let _ = abi::ev::write_str(&mut line, &sys.domains[idx].name);
            line.push_str("}\n");
            console::write_fmt(format_args!("{line}"));
            ok(0)
        }
        Call::Exit => Ok(Outcome::Exit(a[0] as i64)),
        Call::Yield => Ok(Outcome::Yield),
        Call::Wait => {
            let (ptr, words, flags) = (a[0], a[1], a[2]);
            if flags & !WAIT_NONBLOCK != 0 {
                return Err(Error::Invalid);
            }
            if words < PORT_WORDS as u64 {
                return Err(Error::BadLength);
            }
            // The whole buffer the caller claims must be its own and
            // writable, though only the first PORT_WORDS words are written.
            let len = words.checked_mul(8).ok_or(Error::BadAddress)?;
            sys.domains[idx].regions.check(ptr, len, Access::Write)?;
            if sys.evtchn.has_pending(domid) {
                let n = deliver(sys, idx, ptr);
                return ok(u64::from(n));
            }
            if flags & WAIT_NONBLOCK != 0 {
                return ok(0);
            }
            sys.domains[idx].state = crate::domain::State::Waiting { ptr };
            Ok(Outcome::Block)
        }
        Call::Time => ok(tsc::ns_since_entry()),
        Call::SetTimer => {
            sys.domains[idx].timer_ns = if a[0] == 0 { None } else { Some(a[0]) };
            ok(0)
        }
        Call::EvtchnAllocUnbound => {
            let remote = domid_arg(sys, a[0])?;
            sys.evtchn
                .alloc_unbound(domid, remote)
                .map(|p| Outcome::Return(i64::from(p)))
        }
        Call::EvtchnBindInterdomain => {
            let remote = domid_arg(sys, a[0])?;
            let rport = port_arg(a[1])?;
            sys.evtchn
                .bind_interdomain(domid, remote, rport)
                .map(|p| Outcome::Return(i64::from(p)))
        }
        Call::EvtchnBindVirq => {
            if a[0] >= abi::hypercall::virq::BINDABLE {
                return Err(Error::Invalid);
            }
            sys.evtchn
                .bind_virq(domid, a[0] as u32)
                .map(|p| Outcome::Return(i64::from(p)))
        }
        Call::EvtchnSend => {
            let port = port_arg(a[0])?;
            let woken = sys.evtchn.send(domid, port)?;
            sys.wake(Some(woken));
            ok(0)
        }
        Call::EvtchnClose => {
            let port = port_arg(a[0])?;
            sys.evtchn.close(domid, port)?;
            ok(0)
        }
        Call::DevConfigRead => {
            let rec = device_arg(sys, idx, a[0])?;
            let pt = sys.pt.as_ref().ok_or(Error::BadDevice)?;
            pt.config_read(rec, a[1], a[2])
                .map(|v| Outcome::Return(v as i64))
        }
        Call::DevConfigWrite => {
            let rec = device_arg(sys, idx, a[0])?;
            let pt = sys.pt.as_ref().ok_or(Error::BadDevice)?;
            pt.config_write(rec, a[1], a[2], a[3], &sys.domains[idx].name)?;
            ok(0)
        }
        Call::DevIrqBind => {
            let dev = device_arg(sys, idx, a[0]).map(|_| a[0] as usize)?;
            let virq = abi::hypercall::virq::device(dev) as u32;
            sys.evtchn
                .bind_virq(domid, virq)
                .map(|p| Outcome::Return(i64::from(p)))
        }
        Call::DmaMap => dma_map(sys, idx, a[0], a[1]).map(|iova| Outcome::Return(iova as i64)),
        Call::GrantTableSet => {
            crate::grants_hw::table_set(sys, idx, a[0], a[1]).map(|v| Outcome::Return(v as i64))
        }
        Call::GrantMap => {
            crate::grants_hw::map(sys, idx, a[0], a[1]).map(|v| Outcome::Return(v as i64))
        }
        Call::GrantUnmap => {
            crate::grants_hw::unmap(sys, idx, a[0], a[1]).map(|v| Outcome::Return(v as i64))
        }
        Call::GrantCopy => {
            crate::grants_hw::copy(sys, idx, a[0], a[1]).map(|v| Outcome::Return(v as i64))
        }
        Call::DmaUnmap => {
            dma_unmap(sys, idx, a[0], a[1])?;
            ok(0)
        }
        Call::DmaBatch => dma_batch(sys, idx, a[0], a[1]).map(|n| Outcome::Return(n as i64)),
    }
}

/// The record in `Passthrough` of the caller's `dev`-th device.
fn device_arg(sys: &System, idx: usize, dev: u64) -> Result<usize, Error> {
    let dev = usize::try_from(dev).map_err(|_| Error::BadDevice)?;
    if dev >= sys.domains[idx].devices.len() {
        return Err(Error::BadDevice);
    }
    sys.pt
        .as_ref()
        .and_then(|pt| pt.record(idx, dev))
        .ok_or(Error::BadDevice)
}

const PAGE: u64 = 4096;

/// `dma_map`: the range must be page-aligned and the caller's own memory;
/// in strict mode none of it may be mapped already. Each piece gets the
/// permission its pages have.
fn dma_map(sys: &mut System, idx: usize, va: u64, len: u64) -> Result<u64, Error> {
    if len == 0 || !len.is_multiple_of(PAGE) {
        return Err(Error::BadLength);
    }
    if !va.is_multiple_of(PAGE) {
        return Err(Error::BadAddress);
    }
    let d = &sys.domains[idx];
    d.regions.check(va, len, Access::Read)?;
    if d.devices.is_empty() {
        return Err(Error::BadDevice);
    }
    if d.dma == abi::domain::DmaMode::Static {
        return Ok(va);
    }
    if crate::iommu_hw::mapped_bytes(d.domid, va, len) != Some(0) {
        return Err(Error::Invalid);
    }
    let mut changes = alloc::vec::Vec::new();
    let mut at = va;
    while at < va + len {
        let &(rva, rpa, rlen, writable) = d
            .memory_map
            .iter()
            .find(|&&(rva, _, rlen, _)| at >= rva && at < rva + rlen)
            .ok_or(Error::BadAddress)?;
        let n = (rva + rlen).min(va + len) - at;
        changes.push(iommu::Change::Map {
            iova: at,
            pa: rpa + (at - rva),
            len: n,
            perm: if writable {
                iommu::Perm::READ_WRITE
            } else {
                iommu::Perm::READ
            },
        });
        at += n;
    }
    crate::iommu_hw::apply(d.domid, &changes).map_err(|_| Error::NoSpace)?;
    Ok(va)
}

/// `dma_unmap`: every page of the range must be mapped (strict mode); the
/// IOTLB is invalidated before this returns.
fn dma_unmap(sys: &mut System, idx: usize, iova: u64, len: u64) -> Result<(), Error> {
    let d = &sys.domains[idx];
    if d.dma == abi::domain::DmaMode::Static || d.devices.is_empty() {
        return Err(Error::Invalid);
    }
    if len == 0 || !len.is_multiple_of(PAGE) || !iova.is_multiple_of(PAGE) {
        return Err(Error::Invalid);
    }
    // Every page must be mapped: the unit checks before it changes anything.
    crate::iommu_hw::apply(d.domid, &[iommu::Change::UnmapMapped { iova, len }])
        .map_err(hypervisor::dma::refusal)
}

/// Whether `va` lies in the grant window (where a domain's own memory never is).
fn in_grant_window(va: u64) -> bool {
    use abi::grant::{GRANT_WINDOW, GRANT_WINDOW_SIZE};
    (GRANT_WINDOW..GRANT_WINDOW + GRANT_WINDOW_SIZE).contains(&va)
}

/// The caller of a `dma_batch`, as `hypervisor::dma::plan` checks it: its
/// memory and its IOMMU domain (held locked for the whole call).
struct Space<'a> {
    sys: &'a System,
    idx: usize,
    unit: &'a crate::iommu_hw::Batch,
}

impl hypervisor::dma::DmaSpace for Space<'_> {
    fn own_region(&self, va: u64) -> Option<(u64, u64, u64, bool)> {
        // Never in the grant window (`plan` maps grants there).
        if in_grant_window(va) {
            return None;
        }
        self.sys.domains[self.idx]
            .memory_map
            .iter()
            .find(|&&(rva, _, rlen, _)| va >= rva && va - rva < rlen)
            .copied()
    }

    fn mapped_bytes(&self, va: u64, len: u64) -> Option<u64> {
        self.unit.mapped_bytes(va, len)
    }
}

/// `dma_batch`: `count` operations at `ptr`, checked whole
/// (`hypervisor::dma::plan`, then the IOMMU's checks of the unmaps and the
/// grant pages), then one IOMMU batch with one invalidation.
fn dma_batch(sys: &mut System, idx: usize, ptr: u64, count: u64) -> Result<u64, Error> {
    use abi::hypercall::{DmaOp, DMA_BATCH_MAX};
    use core::mem::MaybeUninit;
    /// Batches up to this many operations are copied to the stack (a blk
    /// serve loop's turn carries a few requests' maps and unmaps).
    const SMALL: usize = 16;
    if count == 0 || count > DMA_BATCH_MAX {
        return Err(Error::BadLength);
    }
    let n = count as usize;
    // Copied straight into their decoded form (`DmaOp` is the wire format),
    // nothing zeroed first.
    let mut small = [MaybeUninit::<DmaOp>::uninit(); SMALL];
    let mut large = alloc::vec::Vec::new();
    let buf = if n <= SMALL {
        &mut small[..n]
    } else {
        large.reserve_exact(n);
        &mut large.spare_capacity_mut()[..n]
    };
    let ops = copy_ops_in(sys, idx, ptr, buf)?;
    let d = &sys.domains[idx];
    if d.devices.is_empty() {
        return Err(Error::BadDevice);
    }
    if d.dma == abi::domain::DmaMode::Static {
        return Err(Error::Invalid);
    }
    // The change list's memory is kept from call to call. The unit stays
    // locked from the checks to the invalidation.
    let mut unit = crate::iommu_hw::batch(d.domid).ok_or(Error::NoSpace)?;
    let mut changes = core::mem::take(&mut sys.dma_changes);
    // The IOMMU checks each `MapFrames` against the grants' device-frame
    // index and writes it from there.
    let frames = sys.grants.device_index(d.domid);
    let space = Space {
        sys,
        idx,
        unit: &unit,
    };
    let planned = hypervisor::dma::plan(&space, ops, &mut changes);
    let applied = planned.and_then(|()| {
        unit.apply(&changes, &frames)
            .map_err(hypervisor::dma::refusal)
    });
    drop(unit);
    sys.dma_changes = changes;
    applied.map(|()| count)
}

/// `dma_batch`'s operations from the current domain's `ptr` (checked
/// against its mappings first), copied once into `buf`.
fn copy_ops_in<'b>(
    sys: &System,
    idx: usize,
    ptr: u64,
    buf: &'b mut [core::mem::MaybeUninit<abi::hypercall::DmaOp>],
) -> Result<&'b [abi::hypercall::DmaOp], Error> {
    use abi::hypercall::{DmaOp, DMA_OP_SIZE};
    // An array of `DmaOp`s is the wire format: `repr(C)`, no padding, and
    // little-endian like the ABI.
    const _: () = assert!(core::mem::size_of::<DmaOp>() == DMA_OP_SIZE);
    const _: () = assert!(cfg!(target_endian = "little"));
    let len = buf.len() * DMA_OP_SIZE;
    sys.domains[idx]
        .regions
        .check(ptr, len as u64, Access::Read)?;
    // SAFETY: the range lies wholly in pages this domain has mapped
    // readable in the address space that is current now; it is copied once,
    // so the domain cannot change what ring 0 later looks at. `buf` holds
    // `len` bytes.
    unsafe { core::ptr::copy_nonoverlapping(ptr as *const u8, buf.as_mut_ptr().cast::<u8>(), len) };
    // SAFETY: every byte of `buf` was written just now, and any bytes are a
    // `DmaOp` (three integers, no padding).
    Ok(unsafe { &*(buf as *const [core::mem::MaybeUninit<DmaOp>] as *const [DmaOp]) })
}

/// A domain id argument: it must fit a `u16` (larger ones name no domain).
fn domid_arg(sys: &System, raw: u64) -> Result<u16, Error> {
    let id = u16::try_from(raw).map_err(|_| Error::BadDomain)?;
    match sys.index_of(id) {
        Some(i) if !sys.domains[i].is_dead() => Ok(id),
        _ => Err(Error::BadDomain),
    }
}

fn port_arg(raw: u64) -> Result<u32, Error> {
    u32::try_from(raw).map_err(|_| Error::BadPort)
}

/// Copies `buf.len()` bytes from the current domain's `ptr` after checking
/// the range against its mappings.
fn copy_in(sys: &System, idx: usize, ptr: u64, buf: &mut [u8]) -> Result<(), Error> {
    sys.domains[idx]
        .regions
        .check(ptr, buf.len() as u64, Access::Read)?;
    // SAFETY: the range lies wholly in pages this domain has mapped
    // readable in the address space that is current now; it is copied once,
    // so the domain cannot change what ring 0 later looks at.
    unsafe { core::ptr::copy_nonoverlapping(ptr as *const u8, buf.as_mut_ptr(), buf.len()) };
    Ok(())
}

/// Takes the domain's pending ports and writes them to `ptr`, which was
/// checked writable for `PORT_WORDS` words when `wait` was called (mappings
/// never shrink while a domain lives). The domain's address space must be
/// the current one.
pub fn deliver(sys: &mut System, idx: usize, ptr: u64) -> u32 {
    let mut bitmap = [0u64; PORT_WORDS];
    let n = sys.evtchn.take_pending(sys.domains[idx].domid, &mut bitmap);
    let mut bytes = [0u8; PORT_WORDS * 8];
    for (chunk, w) in bytes.chunks_exact_mut(8).zip(bitmap) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    // SAFETY: see above: checked writable, current address space.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr as *mut u8, bytes.len()) };
    n
}

/// Console text from a domain: each complete line is printed with the
/// domain's name in front. Control characters other than newline and tab
/// become `?`, so a domain cannot start a line of its own or fake one.
fn console_text(sys: &mut System, idx: usize, bytes: &[u8]) {
    const LINE_MAX: usize = 512;
    for &b in bytes {
        let d = &mut sys.domains[idx];
        if b == b'\n' || d.console.len() >= LINE_MAX {
            flush_console(sys, idx);
            if b == b'\n' {
                continue;
            }
        }
        let c = match b {
            b'\t' => b'\t',
            0x20..=0x7e | 0x80..=0xff => b,
            _ => b'?',
        };
        sys.domains[idx].console.push(c);
    }
}

/// Prints the domain's pending console text as one line.
pub fn flush_console(sys: &mut System, idx: usize) {
    let d = &mut sys.domains[idx];
    if d.console.is_empty() {
        return;
    }
    let text = alloc::string::String::from_utf8_lossy(&d.console);
    console::write_fmt(format_args!("[{}] {}\n", d.name, text));
    d.console.clear();
}
