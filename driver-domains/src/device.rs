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
//! [`open`] does 1-4 and [`Function::ready`] does 6. [`batched`] wraps a
//! transport so that a driver can tell the device of several new requests
//! with one notification. The driver is made
//! between them, in the caller, because it is large (virtio-drivers keeps
//! each queue's descriptor shadow inline: some KiB) and a domain has a
//! 64 KiB stack: passing it through a generic function here added that
//! function's copies of it to the caller's (and overflowed the net domain's
//! stack in serve mode).
//!
//! A step that fails is printed with the domain's prefix.

use abi::domain::DeviceInfo;
use abi::hypercall::virq;
use alloc::rc::Rc;
use core::cell::{Cell, RefCell};
use libdom::virtio::{self, AccessPlatform};
use libdom::{dev_irq_bind, evtchn_bind_virq, println, time_ns, StartInfo};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::PhysAddr;
use zerocopy::{FromBytes, Immutable, IntoBytes};

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

/// A transport whose queue notifications can be held back while the driver
/// adds a batch of requests, then sent as one ([`NotifyBatch::release`]).
/// virtio-drivers notifies the device for every request it adds; under
/// QEMU each notification is a trap into the device model, which then
/// finds just that one request.
pub struct Batched<T> {
    shared: Rc<Shared<T>>,
}

struct Shared<T> {
    transport: RefCell<T>,
    holding: Cell<bool>,
    /// Bit q: queue q was to be notified while holding.
    held: Cell<u64>,
}

/// The driver's handle on a [`Batched`] transport's notifications.
pub struct NotifyBatch<T> {
    shared: Rc<Shared<T>>,
}

/// `transport` as a [`Batched`] one, and the handle that holds and
/// releases its notifications.
pub fn batched<T: Transport>(transport: T) -> (Batched<T>, NotifyBatch<T>) {
    let shared = Rc::new(Shared {
        transport: RefCell::new(transport),
        holding: Cell::new(false),
        held: Cell::new(0),
    });
    (
        Batched {
            shared: shared.clone(),
        },
        NotifyBatch { shared },
    )
}

impl<T: Transport> NotifyBatch<T> {
    /// From now on, notifications wait for [`NotifyBatch::release`].
    pub fn hold(&self) {
        self.shared.holding.set(true);
    }

    /// Sends the notifications held since [`NotifyBatch::hold`], one per
    /// queue, and stops holding. Not while the driver is in a call into
    /// its transport (the domain is single-threaded: never).
    pub fn release(&self) {
        self.shared.holding.set(false);
        let mut held = self.shared.held.take();
        while held != 0 {
            let q = held.trailing_zeros() as u16;
            held &= held - 1;
            self.shared.transport.borrow_mut().notify(q);
        }
    }
}

impl<T: Transport> Transport for Batched<T> {
    fn device_type(&self) -> DeviceType {
        self.shared.transport.borrow().device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.shared.transport.borrow_mut().read_device_features()
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        self.shared
            .transport
            .borrow_mut()
            .write_driver_features(driver_features)
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.shared.transport.borrow_mut().max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        if self.shared.holding.get() && queue < 64 {
            self.shared.held.set(self.shared.held.get() | 1 << queue);
        } else {
            self.shared.transport.borrow_mut().notify(queue)
        }
    }
    fn get_status(&self) -> DeviceStatus {
        self.shared.transport.borrow().get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.shared.transport.borrow_mut().set_status(status)
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.shared
            .transport
            .borrow_mut()
            .set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.shared.transport.borrow().requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.shared.transport.borrow_mut().queue_set(
            queue,
            size,
            descriptors,
            driver_area,
            device_area,
        )
    }
    fn queue_unset(&mut self, queue: u16) {
        self.shared.transport.borrow_mut().queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.shared.transport.borrow_mut().queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.shared.transport.borrow_mut().ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.shared.transport.borrow().read_config_generation()
    }
    fn read_config_space<V: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<V> {
        self.shared.transport.borrow().read_config_space(offset)
    }
    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> virtio_drivers::Result<()> {
        self.shared
            .transport
            .borrow_mut()
            .write_config_space(offset, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport that only counts notifications, per queue.
    #[derive(Default)]
    struct Counting {
        notified: [u32; 2],
    }

    impl Transport for Counting {
        fn device_type(&self) -> DeviceType {
            DeviceType::Block
        }
        fn read_device_features(&mut self) -> u64 {
            0
        }
        fn write_driver_features(&mut self, _: u64) {}
        fn max_queue_size(&mut self, _: u16) -> u32 {
            16
        }
        fn notify(&mut self, queue: u16) {
            self.notified[usize::from(queue)] += 1;
        }
        fn get_status(&self) -> DeviceStatus {
            DeviceStatus::empty()
        }
        fn set_status(&mut self, _: DeviceStatus) {}
        fn set_guest_page_size(&mut self, _: u32) {}
        fn requires_legacy_layout(&self) -> bool {
            false
        }
        fn queue_set(&mut self, _: u16, _: u32, _: PhysAddr, _: PhysAddr, _: PhysAddr) {}
        fn queue_unset(&mut self, _: u16) {}
        fn queue_used(&mut self, _: u16) -> bool {
            false
        }
        fn ack_interrupt(&mut self) -> InterruptStatus {
            InterruptStatus::empty()
        }
        fn read_config_generation(&self) -> u32 {
            0
        }
        fn read_config_space<V: FromBytes + IntoBytes>(
            &self,
            _: usize,
        ) -> virtio_drivers::Result<V> {
            Err(virtio_drivers::Error::ConfigSpaceMissing)
        }
        fn write_config_space<V: IntoBytes + Immutable>(
            &mut self,
            _: usize,
            _: V,
        ) -> virtio_drivers::Result<()> {
            Err(virtio_drivers::Error::ConfigSpaceMissing)
        }
    }

    fn notified(b: &NotifyBatch<Counting>) -> [u32; 2] {
        b.shared.transport.borrow().notified
    }

    #[test]
    fn held_notifications_go_out_once_per_queue() {
        let (mut t, batch) = batched(Counting::default());
        // Not holding: straight through.
        t.notify(0);
        assert_eq!(notified(&batch), [1, 0]);
        batch.hold();
        for _ in 0..5 {
            t.notify(0);
        }
        t.notify(1);
        assert_eq!(notified(&batch), [1, 0], "held");
        batch.release();
        assert_eq!(notified(&batch), [2, 1]);
        // Nothing held: a release sends nothing.
        batch.hold();
        batch.release();
        assert_eq!(notified(&batch), [2, 1]);
        t.notify(0);
        assert_eq!(notified(&batch), [3, 1]);
        // The rest goes to the inner transport.
        assert_eq!(t.max_queue_size(0), 16);
        assert_eq!(t.device_type(), DeviceType::Block);
    }
}
