//! Setting up the one virtio function a driver domain drives, the same way
//! for every kind:
//!
//! 1. the function is found in the start info by its PCI ids;
//! 2. `dev_irq_bind` gives the port its MSI-X entries raise;
//! 3. the timer VIRQ gets a port, so that a wait for an interrupt that
//!    never comes can end;
//! 4. a PCI transport that accepts VIRTIO_F_ACCESS_PLATFORM and points every
//!    queue and configuration changes at MSI-X entry [`VECTOR`]
//!    (`libdom::virtio::pci_transport_msix`);
//! 5. the caller makes its driver on the transport;
//! 6. the vectors are read back from the common configuration: NO_VECTOR
//!    means the device refused them (e.g. MSI-X disabled in config space),
//!    and then no interrupt would ever come.
//!
//! [`open`] does 1-4 and [`Function::ready`] does 6. The driver is made
//! between them, in the caller, because it is large (virtio-drivers keeps
//! each queue's descriptor shadow inline: some KiB) and a domain has a
//! 64 KiB stack: passing it through a generic function here added that
//! function's copies of it to the caller's (and overflowed the net domain's
//! stack in serve mode).
//!
//! A step that fails is printed with the domain's prefix.

use abi::domain::DeviceInfo;
use abi::hypercall::virq;
use libdom::virtio::{self, AccessPlatform};
use libdom::{dev_irq_bind, evtchn_bind_virq, println, time_ns, StartInfo};
use virtio_drivers::transport::pci::PciTransport;

/// The MSI-X entry every queue and configuration changes use.
pub const VECTOR: u16 = 0;
/// How long a driver waits for its device's interrupt before calling it an
/// error (generous: QEMU's disk thread may be slow on a loaded host).
pub const IRQ_TIMEOUT_NS: u64 = 5_000_000_000;

/// Blocks until `port` (the device's interrupt) is pending. `timer` is the
/// domain's timer VIRQ port: if the timeout passes first, that is an error.
pub fn wait_irq(port: u16, timer: u16) -> Result<(), &'static str> {
    use abi::hypercall::PORT_WORDS;
    let deadline = time_ns().saturating_add(IRQ_TIMEOUT_NS);
    libdom::set_timer(deadline).map_err(|_| "set_timer failed")?;
    loop {
        let mut words = [0u64; PORT_WORDS];
        libdom::wait(&mut words, 0).map_err(|_| "wait failed")?;
        let p = libdom::ports::Pending(words);
        if p.contains(port) {
            return Ok(());
        }
        if p.contains(timer) && time_ns() >= deadline {
            return Err("no interrupt from the device within 5 s");
        }
    }
}

/// The transport drivers are made on.
pub type DomTransport = AccessPlatform<PciTransport>;

/// Which function a driver domain drives, and how its messages name it.
pub struct Kind {
    /// The prefix of the domain's console lines (`blk`).
    pub log: &'static str,
    /// The device in messages (`virtio-blk`).
    pub name: &'static str,
    /// PCI vendor and device ids.
    pub vendor: u16,
    pub device: u16,
    /// Virtqueues the driver sets up (0 to `queues - 1`): each one's vector
    /// is checked.
    pub queues: u16,
}

/// A function whose ports are bound and whose transport was made.
pub struct Function {
    pub kind: &'static Kind,
    /// Its index among the start info's devices (what the device
    /// hypercalls take).
    pub dev: usize,
    /// What the start info says of it.
    pub info: DeviceInfo,
    /// The port its MSI-X entries raise.
    pub port: u16,
    /// The port of the domain's timer VIRQ.
    pub timer: u16,
    /// When the transport was begun (ns).
    t0: u64,
}

/// Steps 1-4 for the function `kind` names: it, its ports and the
/// transport to make its driver on. `None` once a step failed (printed).
pub fn open(si: &StartInfo<'_>, kind: &'static Kind) -> Option<(Function, DomTransport)> {
    let log = kind.log;
    let Some((dev, info)) = libdom::device::find(si, kind.vendor, kind.device) else {
        println!(
            "{log}: no {} ({:04x}:{:04x}) in my start info",
            kind.name, kind.vendor, kind.device
        );
        return None;
    };
    let port = dev_irq_bind(dev)
        .inspect_err(|e| println!("{log}: dev_irq_bind: {}", e.name()))
        .ok()?;
    let timer = evtchn_bind_virq(virq::TIMER)
        .inspect_err(|e| println!("{log}: evtchn_bind_virq(timer): {}", e.name()))
        .ok()?;
    let t0 = time_ns();
    let transport = virtio::pci_transport_msix(dev, &info, VECTOR)
        .inspect_err(|e| println!("{log}: virtio transport: {e:?}"))
        .ok()?;
    let f = Function {
        kind,
        dev,
        info,
        port,
        timer,
        t0,
    };
    Some((f, transport))
}

impl Function {
    /// Step 6, once the driver is made: `None` if the device did not take
    /// the vectors (printed), else the microseconds from the transport's
    /// beginning to now (the device's initialisation).
    pub fn ready(&self) -> Option<u64> {
        let init_us = (time_ns() - self.t0) / 1000;
        if let Some(common) = virtio::common_cfg(self.dev, &self.info) {
            for queue in 0..self.kind.queues {
                let (config, q) = virtio::msix_vectors(&common, queue);
                if (config, q) != (VECTOR, VECTOR) {
                    println!(
                        "{}: the device holds MSI-X vectors config {config:#x}, queue {queue} {q:#x}; expected {VECTOR}",
                        self.kind.log
                    );
                    return None;
                }
            }
        }
        Some(init_us)
    }
}
