//! `attack=...`: one attempt to reach memory the domain must not reach.
//! Each must end the domain with a page fault; a domain that survives says
//! so (`work_done {work: "CASE-survived"}`) and exits 1.
//!
//! | case | what | expected fault |
//! |---|---|---|
//! | `hvmem` | read at [`HV_IMAGE`], the hypervisor's image through its direct map | #PF, supervisor page (present) |
//! | `peer` | read at the target's `mem_phys` (from the start info), then at [`DIRECT_MAP`] + `mem_phys` | #PF, not present (then supervisor page) |
//! | `code` | write a byte of its own text | #PF, write to a read-only page |
//! | `stack` | copy a `ret` onto its stack and call it | #PF, fetch from a no-execute page |

use alloc::format;

use abi::domain::{StartInfo, START_INFO_VA};
use abi::ev::{self, WorkDone};
use libdom::{event, println};

use crate::Attack;

/// The hypervisor's image as its direct map shows it: the image loads at
/// 1 MiB physical, which is RAM and so always mapped, supervisor-only. (Its
/// link address, 0xffff_ffff_8010_0000, starts with the 32-bit boot code,
/// which is not mapped after boot: a fault there would prove less.)
pub const HV_IMAGE: u64 = DIRECT_MAP + 0x10_0000;
/// The hypervisor's direct map of physical memory.
pub const DIRECT_MAP: u64 = 0xffff_8000_0000_0000;

/// Whether `addr` lies in memory the start info says is this domain's own
/// (start info, stack, image and heap): reading there proves nothing.
pub fn is_own(si: &StartInfo<'_>, addr: u64) -> bool {
    (START_INFO_VA..START_INFO_VA + 4096).contains(&addr)
        || (si.stack_bottom..si.stack_top).contains(&addr)
        || (si.image_start..si.heap_end.max(si.image_end)).contains(&addr)
}

fn survived(case: &str, evidence: u64) -> i64 {
    println!("attack {case}: survived (read {evidence:#x}): isolation failed");
    let work = format!("{case}-survived");
    let _ = event(&WorkDone {
        work: &work,
        units: evidence,
    });
    1
}

/// Reads one byte at `addr`.
fn peek(addr: u64) -> u8 {
    // SAFETY: this is the attack. `addr` is not mapped for this domain (or
    // is the hypervisor's): the read must raise a page fault that ends the
    // domain. Should the hypervisor let it through, the value is only
    // reported; nothing relies on it.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn hvmem() -> i64 {
    survived("hvmem", peek(HV_IMAGE).into())
}

fn peer(si: &StartInfo<'_>, target: &str) -> i64 {
    let Some(p) = si.peer(target) else {
        println!("attack peer: no peer called \"{target}\" in my start info");
        return 1;
    };
    let phys = p.mem_phys;
    if is_own(si, phys) {
        println!(
            "attack peer: {target}'s memory at {phys:#x} overlaps my own addresses; \
             trying the direct-map alias only"
        );
    } else {
        println!("attack peer: reading {target}'s memory at {phys:#x}");
        let v = peek(phys);
        println!("attack peer: read {v:#x} at {phys:#x}; now the direct-map alias");
    }
    survived("peer", peek(DIRECT_MAP.wrapping_add(phys)).into())
}

fn code() -> i64 {
    let text = code as fn() -> i64 as usize as *mut u8;
    // SAFETY: this is the attack: writing our own text must raise a page
    // fault (it is mapped read-only and executable). Should it not, the
    // byte written is the one already there, so the code is unchanged.
    unsafe {
        let old = core::ptr::read_volatile(text);
        core::ptr::write_volatile(text, old);
    }
    survived("code", text as u64)
}

fn stack() -> i64 {
    // `ret`, many times over, on the stack.
    let mut code = [0xc3u8; 16];
    let entry = core::hint::black_box(code.as_mut_ptr());
    // SAFETY: this is the attack: the stack is mapped no-execute, so the
    // call must raise a page fault on the fetch. Should it not, the bytes
    // are `ret`, which returns at once with nothing changed.
    let f: extern "C" fn() = unsafe { core::mem::transmute(entry) };
    f();
    survived("stack", entry as u64)
}

/// Announces the attack (`attack {case}`), then makes it.
pub fn run(si: &StartInfo<'_>, a: Attack<'_>) -> i64 {
    let case = match a {
        Attack::HvMem => "hvmem",
        Attack::Peer { .. } => "peer",
        Attack::Code => "code",
        Attack::Stack => "stack",
    };
    let _ = event(&ev::Attack { case });
    match a {
        Attack::HvMem => hvmem(),
        Attack::Peer { target } => peer(si, target),
        Attack::Code => code(),
        Attack::Stack => stack(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::domain::{MAX_PEERS, MAX_PORTS, STACK_SIZE, STACK_TOP};

    #[test]
    fn own_memory_is_recognised() {
        let si = StartInfo {
            domid: 1,
            name: "peer",
            label: "attacker",
            args: "",
            image_start: 0x40_0000,
            image_end: 0x40_6000,
            heap_start: 0x40_7000,
            heap_end: 0x60_0000,
            stack_bottom: STACK_TOP - STACK_SIZE,
            stack_top: STACK_TOP,
            mem_bytes: 2 << 20,
            ports: [None; MAX_PORTS],
            peers: [None; MAX_PEERS],
            dma: abi::domain::DmaMode::Static,
            devices: [None; abi::domain::MAX_DEVICES],
            vbds: [None; abi::domain::MAX_VBDS],
            vifs: [None; abi::domain::MAX_VIFS],
        };
        for own in [
            START_INFO_VA,
            STACK_TOP - 1,
            0x40_0000,
            0x40_6800,
            0x5f_ffff,
        ] {
            assert!(is_own(&si, own), "{own:#x}");
        }
        for not in [0, 0x20_0000, STACK_TOP, 0x60_0000, 0x1_0000_0000] {
            assert!(!is_own(&si, not), "{not:#x}");
        }
    }
}
