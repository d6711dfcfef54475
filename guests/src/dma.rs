//! `role=dma-attack`: a hostile driver domain aims its `edu` device's DMA
//! engine where it must not reach.
//!
//! QEMU's `edu` (hw/misc/edu.c) has a 4 KiB buffer at device address
//! [`EDU_BUF`] and a DMA engine programmed through BAR0: source
//! ([`REG_SRC`]), destination ([`REG_DST`]), count ([`REG_CNT`]) and
//! command ([`REG_CMD`]: bit 0 start and busy, bit 1 direction, 1 = from
//! the buffer to RAM, bit 2 interrupt when done). A transfer starts 100 ms
//! of virtual time after the command write; the engine keeps working after
//! a fault (unlike virtio devices). Bus addresses are masked to 28 bits.
//!
//! Sequence (each step waits for the busy bit to clear, with a time limit):
//!
//! 1. **Control**: fill a page of its own with a pattern, DMA it into the
//!    device buffer, DMA the buffer back into a second page, compare:
//!    `data_check {what: "dma-control", bytes, ok}`. In strict mode both
//!    pages are then unmapped, so no later target can alias them.
//! 2. For each target given, `attack {case}`, then a device-to-RAM write
//!    of [`ATTACK_BYTES`] bytes there, then a pause so the hypervisor can
//!    take the fault record before the next one (VT-d under QEMU has a
//!    single fault record and collapses repeats from one source):
//!    - `hv=ADDR`: a physical address of hypervisor memory,
//!    - `peer=NAME`: that peer's `mem_phys` (its start-info page),
//!    - `unmapped=ADDR`: an I/O address it never mapped,
//!    - `stale=1` (strict mode): the I/O address of the control's
//!      destination page after `dma_unmap`.
//!
//! With `on_dma_fault = "report"` the domain sees every case through and
//! exits 0 (1 if the control failed); with `stop` the hypervisor ends it
//! at the first fault. Whether the attacks were refused is for the
//! hypervisor's `iommu_fault` and `watch` events to say, not the attacker.

use abi::domain::{DmaMode, StartInfo, START_INFO_VA};
use abi::ev::{Attack, DataCheck};
use abi::manifest::DeviceKind;
use libdom::device::{self, DmaBuf, Mmio};
use libdom::{event, println, time_ns, yield_now};

/// Device address of the edu's DMA buffer, and its size.
pub const EDU_BUF: u64 = 0x4_0000;
pub const EDU_BUF_SIZE: u64 = 4096;
/// Bytes moved by the control transfers: less than the whole buffer,
/// because QEMU 7.2's edu refuses (with a hardware error that stops QEMU) a
/// transfer that ends exactly at the buffer's end (an off-by-one in its
/// range check).
pub const XFER_LEN: u64 = 2048;
/// Identification register: `0x010000ed` (version 1.0, magic 0xed).
pub const REG_ID: u64 = 0x00;
pub const REG_SRC: u64 = 0x80;
pub const REG_DST: u64 = 0x88;
pub const REG_CNT: u64 = 0x90;
pub const REG_CMD: u64 = 0x98;
pub const CMD_RUN: u64 = 1;
pub const CMD_TO_RAM: u64 = 2;
/// The edu's default DMA mask: bus addresses above it are cut.
pub const DMA_MASK: u64 = (1 << 28) - 1;
/// Bytes each attack writes.
pub const ATTACK_BYTES: u64 = 256;
/// How long one transfer may take (it starts 100 ms after the command).
pub const DMA_TIMEOUT_NS: u64 = 3_000_000_000;
/// Pause after each attack, for the hypervisor to report the fault.
pub const PAUSE_MS: u64 = 20;

/// The targets, from args.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Targets<'a> {
    pub hv: Option<u64>,
    pub peer: Option<&'a str>,
    pub unmapped: Option<u64>,
    pub stale: bool,
}

/// A number as `0x...` hex or decimal.
pub fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The control pattern: byte `i` of the page.
pub fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(0x5a) ^ ((i >> 8) as u8)
}

/// The edu's DMA engine behind its BAR0.
pub struct Edu {
    regs: Mmio,
}

/// Why a transfer did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaError {
    /// The busy bit was still set at the time limit.
    Timeout,
    /// The busy bit was set before we started (a transfer never ended).
    Busy,
}

impl Edu {
    pub fn new(regs: Mmio) -> Self {
        Edu { regs }
    }

    pub fn id(&self) -> u32 {
        self.regs.read32(REG_ID)
    }

    fn run(&self, src: u64, dst: u64, cnt: u64, cmd: u64) -> Result<(), DmaError> {
        if self.regs.read64(REG_CMD) & CMD_RUN != 0 {
            return Err(DmaError::Busy);
        }
        self.regs.write64(REG_SRC, src);
        self.regs.write64(REG_DST, dst);
        self.regs.write64(REG_CNT, cnt);
        self.regs.write64(REG_CMD, cmd | CMD_RUN);
        self.wait()
    }

    /// Polls the busy bit until it clears or [`DMA_TIMEOUT_NS`] passes.
    pub fn wait(&self) -> Result<(), DmaError> {
        let deadline = time_ns().saturating_add(DMA_TIMEOUT_NS);
        while self.regs.read64(REG_CMD) & CMD_RUN != 0 {
            if time_ns() > deadline {
                return Err(DmaError::Timeout);
            }
            let _ = yield_now();
        }
        Ok(())
    }

    /// RAM at bus address `iova` into the device buffer.
    pub fn to_device(&self, iova: u64, cnt: u64) -> Result<(), DmaError> {
        self.run(iova, EDU_BUF, cnt, 0)
    }

    /// The device buffer out to bus address `iova`.
    pub fn to_ram(&self, iova: u64, cnt: u64) -> Result<(), DmaError> {
        self.run(EDU_BUF, iova, cnt, CMD_TO_RAM)
    }
}

/// Whether bus address `iova` would reach the attacker's own memory in its
/// DMA mode (then a write there proves nothing and no fault comes).
pub fn aliases_own(si: &StartInfo<'_>, iova: u64) -> bool {
    si.dma == DmaMode::Static
        && ((START_INFO_VA..START_INFO_VA + 4096).contains(&iova)
            || (si.stack_bottom..si.stack_top).contains(&iova)
            || (si.image_start..si.heap_end.max(si.image_end)).contains(&iova))
}

fn control(edu: &Edu) -> Result<(DmaBuf, DmaBuf, bool), &'static str> {
    let mut src = DmaBuf::new(1).map_err(|_| "dma_map of the source page failed")?;
    let dst = DmaBuf::new(1).map_err(|_| "dma_map of the destination page failed")?;
    let mut page = [0u8; XFER_LEN as usize];
    for (i, b) in page.iter_mut().enumerate() {
        *b = pattern(i);
    }
    src.write(0, &page);
    println!(
        "dma-attack: control: page at va {:#x} (iova {:#x}) -> edu -> va {:#x} (iova {:#x})",
        src.va(),
        src.iova(),
        dst.va(),
        dst.iova()
    );
    edu.to_device(src.iova(), XFER_LEN)
        .map_err(|_| "control: RAM-to-device transfer did not finish")?;
    edu.to_ram(dst.iova(), XFER_LEN)
        .map_err(|_| "control: device-to-RAM transfer did not finish")?;
    let mut back = [0u8; XFER_LEN as usize];
    dst.read(0, &mut back);
    let ok = back == page;
    if !ok {
        let first = back
            .iter()
            .zip(&page)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        println!(
            "dma-attack: control: byte {first} is {:#x}, expected {:#x}",
            back[first], page[first]
        );
    }
    let _ = event(&DataCheck {
        what: "dma-control",
        bytes: XFER_LEN,
        ok,
    });
    Ok((src, dst, ok))
}

fn attack(si: &StartInfo<'_>, edu: &Edu, case: &str, iova: u64) {
    let _ = event(&Attack { case });
    if iova > DMA_MASK {
        println!("dma-attack {case}: {iova:#x} is over the edu's 28-bit DMA mask: it will be cut");
    }
    if aliases_own(si, iova) {
        println!("dma-attack {case}: {iova:#x} is one of my own I/O addresses: no fault expected");
    }
    println!("dma-attack {case}: device writes {ATTACK_BYTES} bytes at {iova:#x}");
    if edu.to_ram(iova, ATTACK_BYTES).is_err() {
        println!("dma-attack {case}: the transfer did not finish in time");
    }
    crate::work::idle(PAUSE_MS);
}

/// `role=dma-attack`: the control, then each target in turn.
pub fn run(si: &StartInfo<'_>, t: Targets<'_>) -> i64 {
    let (vendor, id) = DeviceKind::Edu.pci_ids();
    let Some((_, dev)) = device::find(si, vendor, id) else {
        println!("dma-attack: no edu device in my start info");
        return 1;
    };
    let Some(bar0) = device::bar(&dev, 0) else {
        println!("dma-attack: the edu's BAR0 is not mapped");
        return 1;
    };
    let edu = Edu::new(Mmio::from_bar(&bar0));
    println!(
        "dma-attack: edu {} id {:#010x}, BAR0 at {:#x}, DMA mode {:?}",
        dev.bdf,
        edu.id(),
        bar0.va,
        si.dma
    );
    let (src, mut dst, ok) = match control(&edu) {
        Ok(r) => r,
        Err(why) => {
            println!("dma-attack: {why}");
            let _ = event(&DataCheck {
                what: "dma-control",
                bytes: 0,
                ok: false,
            });
            return 1;
        }
    };
    // Strict mode: nothing of ours stays reachable (the stale case aims at
    // the destination page's old address).
    let stale_iova = dst.iova();
    let unmapped = si.dma == DmaMode::Strict && dst.unmap().is_ok();
    drop(src);
    if let Some(hv) = t.hv {
        attack(si, &edu, "dma-hv", hv);
    }
    if let Some(name) = t.peer {
        match si.peer(name) {
            Some(p) => attack(si, &edu, "dma-peer", p.mem_phys),
            None => println!("dma-attack: no peer called \"{name}\""),
        }
    }
    if let Some(a) = t.unmapped {
        attack(si, &edu, "dma-unmapped", a);
    }
    if t.stale {
        if unmapped {
            attack(si, &edu, "dma-stale", stale_iova);
        } else {
            println!("dma-attack: stale=1 needs strict DMA mode; skipped");
        }
    }
    drop(dst);
    i64::from(!ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::domain::{MAX_DEVICES, MAX_PEERS, MAX_PORTS, STACK_SIZE, STACK_TOP};

    #[test]
    fn numbers_and_pattern() {
        assert_eq!(parse_num("0x100000"), Some(0x10_0000));
        assert_eq!(parse_num("4096"), Some(4096));
        assert_eq!(parse_num("0x"), None);
        assert_eq!(parse_num("0xg"), None);
        // The pattern is not constant and not periodic in 256.
        assert_ne!(pattern(0), pattern(1));
        assert_ne!(pattern(3), pattern(259));
    }

    #[test]
    fn own_addresses_alias_only_in_static_mode() {
        let mut si = StartInfo {
            domid: 1,
            name: "attacker",
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
            dma: DmaMode::Static,
            devices: [None; MAX_DEVICES],
            vbds: [None; abi::domain::MAX_VBDS],
            vifs: [None; abi::domain::MAX_VIFS],
        };
        assert!(aliases_own(&si, 0x10_0000));
        assert!(aliases_own(&si, 0x50_0000));
        assert!(!aliases_own(&si, 0x20_0000));
        assert!(!aliases_own(&si, 0x0800_0000));
        si.dma = DmaMode::Strict;
        assert!(!aliases_own(&si, 0x10_0000));
    }
}
