//! `role=msi-spoof`: a driver domain that tries to raise interrupts it does
//! not own, and `role=irq-victim`, whose device's interrupt it aims at.
//!
//! The spoofer owns an `edu`. It tries, in order:
//!
//! | case | what | what stops it |
//! |---|---|---|
//! | `msi-config` | write its MSI capability's address register | the hypervisor refuses the config write (`Denied`, `config_refused`) |
//! | `msi-remap` | DMA a remappable-format MSI naming interrupt-remapping entry `irte` (the victim's) into the interrupt window | VT-d source-id validation (the entry names the victim's requester id); QEMU 7.2 skips it for DMA without a requester id, so the victim is woken |
//! | `msi-compat` | DMA a compatibility-format MSI for vector `vector` (one nobody owns) | VT-d with compatibility format blocked; QEMU 7.2 lets it through, and the hypervisor counts a `stray_interrupt` |
//! | `msi-compat-hv` | the same for the hypervisor's own IOMMU fault vector | as above; the hypervisor finds no fault record and carries on |
//!
//! The victim binds its device's interrupt and sleeps on its timer; every
//! wake-up on the device port it did not ask for is counted and must do no
//! harm.

use crate::dma::Edu;
use abi::domain::StartInfo;
use abi::ev::{Attack, DataCheck, WorkDone};
use abi::hypercall::{virq, Error};
use abi::manifest::DeviceKind;
use libdom::device::{self, DmaBuf, Mmio};
use libdom::{
    dev_config_read, dev_config_write, event, evtchn_bind_virq, println, set_timer, time_ns,
    EventLoop,
};

/// The interrupt window's base: a DMA write here is an interrupt request.
const MSI_WINDOW: u64 = 0xfee0_0000;
const CAP_MSI: u32 = 0x05;

/// The address of a remappable-format MSI naming interrupt-remapping entry
/// `handle` (VT-d: handle[14:0] in bits 19:5, the format bit 4, SHV bit 3,
/// handle[15] in bit 2); its data is the subhandle, 0.
pub fn remappable_address(handle: u16) -> u64 {
    MSI_WINDOW | u64::from(handle & 0x7fff) << 5 | 1 << 4 | 1 << 3 | u64::from(handle >> 15) << 2
}

/// A compatibility-format MSI to APIC 0: the address names the
/// destination, the data the vector (fixed delivery, edge).
pub fn compat_message(vector: u8) -> (u64, u32) {
    (MSI_WINDOW, u32::from(vector))
}

/// What the spoofer aims at.
pub struct Targets {
    pub irte: u16,
    pub vector: u8,
    pub hv_vector: u8,
}

fn sleep_ms(ms: u64) {
    let end = time_ns() + ms * 1_000_000;
    while time_ns() < end {
        let _ = libdom::yield_now();
    }
}

/// The offset of the function's MSI capability, if it has one.
fn msi_cap(dev: usize) -> Option<u16> {
    let mut ptr = dev_config_read(dev, 0x34, 1).ok()? & 0xfc;
    for _ in 0..48 {
        if ptr < 0x40 {
            return None;
        }
        let head = dev_config_read(dev, ptr as u16, 4).ok()?;
        if head & 0xff == CAP_MSI {
            return Some(ptr as u16);
        }
        ptr = (head >> 8) & 0xfc;
    }
    None
}

/// Has the device write `data` (4 bytes) at bus address `addr`.
fn device_write(edu: &Edu, page: &mut DmaBuf, addr: u64, data: u32) -> bool {
    page.write(0, &data.to_le_bytes());
    edu.to_device(page.iova(), 4).is_ok() && edu.to_ram(addr, 4).is_ok()
}

pub fn spoof(si: &StartInfo<'_>, t: Targets) -> i64 {
    let (vendor, id) = DeviceKind::Edu.pci_ids();
    let Some((dev, info)) = device::find(si, vendor, id) else {
        println!("msi-spoof: no edu device in my start info");
        return 1;
    };
    let Some(bar0) = device::bar(&info, 0) else {
        println!("msi-spoof: the edu's BAR0 is not mapped");
        return 1;
    };
    let edu = Edu::new(Mmio::from_bar(&bar0));

    let _ = event(&Attack { case: "msi-config" });
    let refused = match msi_cap(dev) {
        Some(cap) => {
            let r = dev_config_write(dev, cap + 4, 4, MSI_WINDOW as u32 | 0x99 << 12);
            println!(
                "msi-spoof: write to the MSI address register at {:#x}: {:?}",
                cap + 4,
                r.map_err(Error::name)
            );
            r == Err(Error::Denied)
        }
        None => {
            println!("msi-spoof: the edu shows no MSI capability");
            false
        }
    };
    let _ = event(&DataCheck {
        what: "msi-config-refused",
        bytes: 4,
        ok: refused,
    });

    let Ok(mut page) = DmaBuf::new(1) else {
        println!("msi-spoof: no DMA page");
        return 1;
    };
    let _ = event(&Attack { case: "msi-remap" });
    let sent = device_write(&edu, &mut page, remappable_address(t.irte), 0);
    println!(
        "msi-spoof: remappable MSI naming IRTE {} sent: {sent}",
        t.irte
    );
    sleep_ms(20);

    let _ = event(&Attack { case: "msi-compat" });
    let (addr, data) = compat_message(t.vector);
    let sent = device_write(&edu, &mut page, addr, data);
    println!(
        "msi-spoof: compatibility MSI for vector {:#x} sent: {sent}",
        t.vector
    );
    sleep_ms(20);

    let _ = event(&Attack {
        case: "msi-compat-hv",
    });
    let (addr, data) = compat_message(t.hv_vector);
    let sent = device_write(&edu, &mut page, addr, data);
    println!(
        "msi-spoof: compatibility MSI for vector {:#x} sent: {sent}",
        t.hv_vector
    );
    sleep_ms(20);
    if refused {
        0
    } else {
        1
    }
}

/// Binds its device's interrupt and its timer, sleeps `ms`, and counts the
/// device notifications it got (it asked for none).
pub fn victim(si: &StartInfo<'_>, ms: u64) -> i64 {
    if si.devices.iter().flatten().next().is_none() {
        println!("irq-victim: no device in my start info");
        return 1;
    }
    let Ok(dev_port) = libdom::dev_irq_bind(0) else {
        println!("irq-victim: cannot bind the device interrupt");
        return 1;
    };
    let Ok(timer) = evtchn_bind_virq(virq::TIMER) else {
        println!("irq-victim: no timer");
        return 1;
    };
    let deadline = time_ns() + ms * 1_000_000;
    let mut spurious = 0;
    let mut lp = EventLoop::new();
    while time_ns() < deadline {
        if set_timer(deadline).is_err() {
            return 1;
        }
        match lp.next_port() {
            Ok(p) if p == dev_port => spurious += 1,
            Ok(p) if p == timer => {}
            Ok(p) => println!("irq-victim: notification on unexpected port {p}"),
            Err(e) => {
                println!("irq-victim: wait failed: {}", e.name());
                return 1;
            }
        }
    }
    println!(
        "irq-victim: {spurious} device notifications I did not ask for; nothing to do for them"
    );
    let _ = event(&WorkDone {
        work: "irq-victim",
        units: spurious,
    });
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_formats() {
        assert_eq!(remappable_address(0), 0xfee0_0018);
        assert_eq!(remappable_address(1), 0xfee0_0038);
        assert_eq!(remappable_address(0x8001), 0xfee0_003c);
        assert_eq!(compat_message(0x99), (0xfee0_0000, 0x99));
    }
}
