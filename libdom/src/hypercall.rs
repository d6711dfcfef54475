//! Typed hypercall wrappers (the table is in `abi::hypercall`).
//!
//! Each wrapper passes its arguments in the registers the ABI names and
//! decodes RAX with [`abi::hypercall::decode`]: `Ok` with the call's success
//! value or `Err` with the hypervisor's [`Error`]. Ports and domain ids are
//! `u16`, as in the start info.

use abi::hypercall::{decode, Call, Error, PORT_WORDS};

/// Executes `syscall` with call number `nr` and six arguments; returns RAX
/// as the hypervisor left it (negative: an error code).
///
/// # Safety
///
/// The hypervisor may write through pointer arguments (`wait`'s output):
/// whatever they point at must be writable memory the caller owns and
/// expects to change. Calls that take no pointer, or only pointers the
/// hypervisor reads, are always sound; a call with bad pointers is refused
/// with an error, never a fault.
#[cfg(target_os = "none")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn raw_hypercall(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64 {
    let ret: i64;
    // SAFETY: `syscall` enters the hypervisor, which checks every argument
    // and preserves every register but RAX (the result) and RCX/R11 (which
    // the instruction itself overwrites); it does not touch our stack. What
    // it may write through pointers is the caller's promise above.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a0,
            in("rsi") a1,
            in("rdx") a2,
            in("r10") a3,
            in("r8") a4,
            in("r9") a5,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// On the host there is no hypervisor: every hypercall panics.
///
/// # Safety
///
/// None needed on the host; the signature matches the domain's.
#[cfg(not(target_os = "none"))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn raw_hypercall(
    nr: u64,
    _a0: u64,
    _a1: u64,
    _a2: u64,
    _a3: u64,
    _a4: u64,
    _a5: u64,
) -> i64 {
    panic!("hypercall {nr} outside a domain: libdom's hypercalls work only under airlock")
}

/// A call whose arguments are plain numbers or pointers the hypervisor
/// only reads.
fn call(c: Call, a: [u64; 3]) -> Result<u64, Error> {
    // SAFETY: every caller passes numbers, or pointers to memory it lends
    // for reading only (console_write, event): nothing is written.
    decode(unsafe { raw_hypercall(c as u64, a[0], a[1], a[2], 0, 0, 0) })
}

/// Writes bytes to the console (at most `CONSOLE_MAX` of them); the
/// hypervisor prefixes each line with `[NAME] `. Returns the bytes taken.
pub fn console_write(bytes: &[u8]) -> Result<u64, Error> {
    call(
        Call::ConsoleWrite,
        [bytes.as_ptr() as u64, bytes.len() as u64, 0],
    )
}

/// Asks the hypervisor to print one event object (see [`crate::event`],
/// which builds it from a typed event).
pub fn event_raw(json: &[u8]) -> Result<(), Error> {
    call(Call::Event, [json.as_ptr() as u64, json.len() as u64, 0]).map(drop)
}

/// Ends the domain with `status`; never returns.
pub fn exit(status: i64) -> ! {
    let _ = call(Call::Exit, [status as u64, 0, 0]);
    // The hypervisor never returns from exit; if it did, fault loudly
    // rather than run on.
    #[cfg(target_os = "none")]
    // SAFETY: `ud2` only raises an invalid-opcode exception.
    unsafe {
        core::arch::asm!("ud2", options(noreturn));
    }
    #[cfg(not(target_os = "none"))]
    unreachable!("exit returned")
}

/// Gives up the rest of the time slice.
pub fn yield_now() -> Result<(), Error> {
    call(Call::Yield, [0; 3]).map(drop)
}

/// Blocks until one of the domain's ports is pending (or returns 0 at once
/// with [`abi::hypercall::WAIT_NONBLOCK`]), writes the pending set into
/// `out` and clears it in the hypervisor. Returns how many ports it
/// delivered.
pub fn wait(out: &mut [u64; PORT_WORDS], flags: u64) -> Result<u64, Error> {
    // SAFETY: `out` is ours, writable and exactly PORT_WORDS words, which
    // is what the hypervisor writes.
    decode(unsafe {
        raw_hypercall(
            Call::Wait as u64,
            out.as_mut_ptr() as u64,
            PORT_WORDS as u64,
            flags,
            0,
            0,
            0,
        )
    })
}

/// Nanoseconds since the hypervisor's entry.
pub fn time_ns() -> u64 {
    // The call cannot fail; a hypervisor that says otherwise reads as 0.
    call(Call::Time, [0; 3]).unwrap_or(0)
}

/// Fires the timer VIRQ at `deadline_ns` (on [`time_ns`]'s clock); 0
/// cancels.
pub fn set_timer(deadline_ns: u64) -> Result<(), Error> {
    call(Call::SetTimer, [deadline_ns, 0, 0]).map(drop)
}

fn port(v: u64) -> u16 {
    v as u16
}

/// A new port, unbound, that domain `remote` may bind to.
pub fn evtchn_alloc_unbound(remote: u16) -> Result<u16, Error> {
    call(Call::EvtchnAllocUnbound, [remote.into(), 0, 0]).map(port)
}

/// Binds a new local port to `remote_port`, which domain `remote` offered
/// us with `evtchn_alloc_unbound`.
pub fn evtchn_bind_interdomain(remote: u16, remote_port: u16) -> Result<u16, Error> {
    call(
        Call::EvtchnBindInterdomain,
        [remote.into(), remote_port.into(), 0],
    )
    .map(port)
}

/// Binds a new port to a virtual interrupt (`abi::hypercall::virq`).
pub fn evtchn_bind_virq(virq: u64) -> Result<u16, Error> {
    call(Call::EvtchnBindVirq, [virq, 0, 0]).map(port)
}

/// Makes the other end of an interdomain port pending.
pub fn evtchn_send(port: u16) -> Result<(), Error> {
    call(Call::EvtchnSend, [port.into(), 0, 0]).map(drop)
}

/// Closes a port; an interdomain peer's end goes back to unbound.
pub fn evtchn_close(port: u16) -> Result<(), Error> {
    call(Call::EvtchnClose, [port.into(), 0, 0]).map(drop)
}

/// Reads `size` (1, 2 or 4) bytes of config space at `offset` of device
/// `dev` (an index into the start info's device list).
pub fn dev_config_read(dev: usize, offset: u16, size: u8) -> Result<u32, Error> {
    call(
        Call::DevConfigRead,
        [dev as u64, offset.into(), size.into()],
    )
    .map(|v| v as u32)
}

/// Writes `size` (1, 2 or 4) bytes of config space at `offset` of device
/// `dev`. The hypervisor keeps BARs, MSI/MSI-X and bus mastering to itself
/// ([`Error::Denied`]).
pub fn dev_config_write(dev: usize, offset: u16, size: u8, value: u32) -> Result<(), Error> {
    // SAFETY: only numbers are passed; the hypervisor writes no memory of
    // ours for this call.
    decode(unsafe {
        raw_hypercall(
            Call::DevConfigWrite as u64,
            dev as u64,
            offset.into(),
            size.into(),
            value.into(),
            0,
            0,
        )
    })
    .map(drop)
}

/// A port that becomes pending whenever device `dev` raises one of its
/// MSI-X vectors.
pub fn dev_irq_bind(dev: usize) -> Result<u16, Error> {
    call(Call::DevIrqBind, [dev as u64, 0, 0]).map(port)
}

/// Makes `[va, va + len)` (page-aligned, our own memory) reachable by our
/// devices; returns its I/O address (`va` itself in static mode).
pub fn dma_map(va: u64, len: u64) -> Result<u64, Error> {
    call(Call::DmaMap, [va, len, 0])
}

/// Removes a strict-mode mapping; the IOTLB is invalidated before it
/// returns. `Invalid` in static mode.
pub fn dma_unmap(iova: u64, len: u64) -> Result<(), Error> {
    call(Call::DmaUnmap, [iova, len, 0]).map(drop)
}

/// Carries out up to [`abi::hypercall::DMA_BATCH_MAX`] strict-mode DMA
/// operations as one change of our I/O address space (`dma_batch`): every
/// unmap, then every map, then one IOTLB invalidation, all done when it
/// returns. Checked whole: on an error nothing changed (but for `NoSpace`,
/// after which the unmaps are done). Returns the operations processed.
pub fn dma_batch(ops: &[abi::hypercall::DmaOp]) -> Result<usize, Error> {
    use abi::hypercall::DMA_BATCH_MAX;
    if ops.is_empty() || ops.len() as u64 > DMA_BATCH_MAX {
        return Err(Error::BadLength);
    }
    const _: () = assert!(cfg!(target_endian = "little"));
    // `DmaOp` is `repr(C)` and this machine little-endian: the slice is
    // the wire format. The hypervisor only reads it.
    call(Call::DmaBatch, [ops.as_ptr() as u64, ops.len() as u64, 0]).map(|n| n as usize)
}
