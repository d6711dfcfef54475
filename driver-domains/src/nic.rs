//! The net driver domain's virtio-net with its own buffers: the NIC port of
//! netback's switch in serve mode (`crate::netserve`), and a
//! [`smoltcp::phy::Device`] for the direct TCP mode (`crate::nettcp`).
//!
//! It keeps `rx` receive buffers posted at all times and `tx` transmit
//! buffers, each a `Vec` made once (the vectors never grow, so a buffer the
//! device holds never moves). A received frame is looked at in its buffer
//! and the buffer posted again at once ([`Nic::recv`]) or, under smoltcp,
//! when the stack is done with it (at the next `receive` or `transmit`, or
//! [`Nic::repost`]). An outgoing frame is copied into a free transmit
//! buffer ([`Nic::send`]) or built there by smoltcp.

use alloc::vec;
use alloc::vec::Vec;

use libdom::println;
use libdom::smoltcp::phy::{self, DeviceCapabilities, Medium};
use netback::NicBusy;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::Transport;
use virtio_drivers::{Error as VirtioError, Hal};

use crate::netserve::QUEUE_SIZE;

/// Bytes of a NIC buffer: the 12-byte virtio-net header and a 1514-byte
/// frame, rounded up (virtio-drivers asks for at least 1526 to receive).
const NIC_BUF: usize = 1536;
/// The largest Ethernet frame without its FCS.
const MTU: usize = 1514;

/// A buffer the device owns while `token` is set; it never moves (the
/// buffer vectors are made once and never grow).
struct NicBuf {
    buf: Vec<u8>,
    token: Option<u16>,
    len: usize,
}

/// Counters of the NIC side.
#[derive(Clone, Copy, Debug, Default)]
pub struct NicStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames for the NIC dropped because every transmit buffer was out.
    pub tx_busy: u64,
    pub tx_errors: u64,
    /// Receive completions that were not a frame (shorter than the
    /// header, or too long).
    pub rx_errors: u64,
}

/// The virtio-net and its buffers.
pub struct Nic<H: Hal, T: Transport> {
    net: VirtIONetRaw<H, T, QUEUE_SIZE>,
    rx: Vec<NicBuf>,
    tx: Vec<NicBuf>,
    tx_free: Vec<usize>,
    /// A receive buffer whose frame smoltcp was given: posted again at the
    /// next call.
    rx_held: Option<usize>,
    pub stats: NicStats,
}

impl<H: Hal, T: Transport> Nic<H, T> {
    /// `rx` receive buffers (all posted at once) and `tx` transmit ones.
    pub fn new(
        net: VirtIONetRaw<H, T, QUEUE_SIZE>,
        rx: usize,
        tx: usize,
    ) -> Result<Self, VirtioError> {
        let mk = |n| {
            (0..n)
                .map(|_| NicBuf {
                    buf: vec![0; NIC_BUF],
                    token: None,
                    len: 0,
                })
                .collect::<Vec<_>>()
        };
        let mut nic = Nic {
            net,
            rx: mk(rx),
            tx: mk(tx),
            tx_free: (0..tx).rev().collect(),
            rx_held: None,
            stats: NicStats::default(),
        };
        for i in 0..rx {
            nic.post_rx(i)?;
        }
        Ok(nic)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.net.mac_address()
    }

    fn post_rx(&mut self, i: usize) -> Result<(), VirtioError> {
        let b = &mut self.rx[i];
        // SAFETY: buffer `i` is neither touched, moved nor freed until
        // its token comes back through `poll_receive` and
        // `receive_complete` (in `take_rx`).
        let token = unsafe { self.net.receive_begin(&mut b.buf) }?;
        b.token = Some(token);
        Ok(())
    }

    fn repost_rx(&mut self, i: usize) {
        if let Err(e) = self.post_rx(i) {
            println!("net: reposting a receive buffer: {e:?}");
        }
    }

    /// Posts again the receive buffer smoltcp was last given, if any.
    pub fn repost(&mut self) {
        if let Some(i) = self.rx_held.take() {
            self.repost_rx(i);
        }
    }

    /// Hands `frame` to the device (copied into a transmit buffer);
    /// false if every buffer is out (the frame is dropped and counted).
    pub fn send(&mut self, frame: &[u8]) -> bool {
        self.reap_tx();
        let Some(i) = self.tx_free.pop() else {
            self.stats.tx_busy += 1;
            return false;
        };
        let sent = transmit(
            &mut self.net,
            &mut self.tx[i],
            &mut self.stats,
            frame.len(),
            |b| b.copy_from_slice(frame),
        );
        let queued = matches!(sent, Ok(((), true)));
        if !queued {
            self.tx_free.push(i);
        }
        queued
    }

    /// Takes back every finished transmission; returns how many.
    pub fn reap_tx(&mut self) -> usize {
        let mut n = 0;
        while let Some(token) = self.net.poll_transmit() {
            let Some(i) = self.tx.iter().position(|b| b.token == Some(token)) else {
                println!("net: the NIC completed a transmission we did not make");
                return n;
            };
            let b = &mut self.tx[i];
            b.token = None;
            // SAFETY: the buffer of the `transmit_begin` that gave `token`.
            if unsafe { self.net.transmit_complete(token, &b.buf[..b.len]) }.is_err() {
                self.stats.tx_errors += 1;
            }
            self.tx_free.push(i);
            n += 1;
        }
        n
    }

    /// The next completed receive buffer: its index and where its frame is
    /// (`None` for a completion that is not a frame, counted). The buffer
    /// is the caller's until it posts it again.
    fn take_rx(&mut self) -> Option<(usize, Option<(usize, usize)>)> {
        let token = self.net.poll_receive()?;
        let Some(i) = self.rx.iter().position(|b| b.token == Some(token)) else {
            println!("net: the NIC filled a buffer we did not post");
            return None;
        };
        let b = &mut self.rx[i];
        b.token = None;
        // SAFETY: the buffer of the `receive_begin` that gave `token`.
        let frame = match unsafe { self.net.receive_complete(token, &mut b.buf) } {
            Ok((hdr, len)) if hdr + len <= b.buf.len() => {
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += len as u64;
                Some((hdr, len))
            }
            _ => {
                self.stats.rx_errors += 1;
                None
            }
        };
        Some((i, frame))
    }

    /// Hands every received frame to `f`, reposting each buffer; returns
    /// how many frames.
    pub fn recv(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        self.repost();
        let mut n = 0;
        while let Some((i, frame)) = self.take_rx() {
            if let Some((hdr, len)) = frame {
                f(&self.rx[i].buf[hdr..hdr + len]);
            }
            self.repost_rx(i);
            n += 1;
        }
        n
    }

    /// Receive buffers the device holds.
    pub fn rx_posted(&self) -> usize {
        self.rx.iter().filter(|b| b.token.is_some()).count()
    }

    /// A free transmit buffer's index (reaping finished transmissions if
    /// none is free).
    fn free_tx(&mut self) -> Option<usize> {
        if self.tx_free.is_empty() {
            self.reap_tx();
        }
        let i = self.tx_free.pop();
        if i.is_none() {
            self.stats.tx_busy += 1;
        }
        i
    }
}

/// Fills transmit buffer `b` with the virtio-net header and a `len`-byte
/// frame that `fill` writes, and hands it to the device: `fill`'s result
/// and whether the queue took the buffer (if not, counted, and the buffer
/// stays free). `Err(fill)`, not called, if the frame does not fit.
fn transmit<H: Hal, T: Transport, R, F: FnOnce(&mut [u8]) -> R>(
    net: &mut VirtIONetRaw<H, T, QUEUE_SIZE>,
    b: &mut NicBuf,
    stats: &mut NicStats,
    len: usize,
    fill: F,
) -> Result<(R, bool), F> {
    let Ok(hdr) = net.fill_buffer_header(&mut b.buf) else {
        stats.tx_errors += 1;
        return Err(fill);
    };
    let Some(dst) = b.buf.get_mut(hdr..hdr + len) else {
        stats.tx_errors += 1;
        return Err(fill);
    };
    let r = fill(dst);
    b.len = hdr + len;
    // SAFETY: buffer `b` is left alone (not touched, moved or freed) until
    // `poll_transmit` returns its token (`Nic::reap_tx`).
    match unsafe { net.transmit_begin(&b.buf[..b.len]) } {
        Ok(token) => {
            b.token = Some(token);
            stats.tx_frames += 1;
            stats.tx_bytes += len as u64;
            Ok((r, true))
        }
        Err(_) => {
            stats.tx_busy += 1;
            Ok((r, false))
        }
    }
}

impl<H: Hal, T: Transport> netback::Nic for Nic<H, T> {
    fn send(&mut self, frame: &[u8]) -> Result<(), NicBusy> {
        if Nic::send(self, frame) {
            Ok(())
        } else {
            Err(NicBusy)
        }
    }
}

// ---- smoltcp ----

/// A received frame, in the receive buffer the device filled.
pub struct RxToken<'a> {
    frame: &'a [u8],
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.frame)
    }
}

/// A free transmit buffer (taken when the token is made; free again if
/// the token is dropped unused, as smoltcp does with `receive`'s).
pub struct TxToken<'a, H: Hal, T: Transport> {
    net: &'a mut VirtIONetRaw<H, T, QUEUE_SIZE>,
    tx: &'a mut [NicBuf],
    tx_free: &'a mut Vec<usize>,
    stats: &'a mut NicStats,
    i: usize,
    used: bool,
}

impl<H: Hal, T: Transport> Drop for TxToken<'_, H, T> {
    fn drop(&mut self) {
        if !self.used {
            self.tx_free.push(self.i);
        }
    }
}

impl<H: Hal, T: Transport> phy::TxToken for TxToken<'_, H, T> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(mut self, len: usize, f: F) -> R {
        self.used = true;
        let i = self.i;
        let f = if len <= MTU {
            match transmit(self.net, &mut self.tx[i], self.stats, len, f) {
                Ok((r, queued)) => {
                    // A frame the queue refused is lost (TCP sends again).
                    if !queued {
                        self.tx_free.push(i);
                    }
                    return r;
                }
                Err(f) => f,
            }
        } else {
            self.stats.tx_errors += 1;
            f
        };
        // smoltcp never asks for more than the MTU; build anything else
        // somewhere and drop it.
        self.tx_free.push(i);
        let mut scratch = vec![0u8; len];
        f(&mut scratch)
    }
}

impl<H: Hal, T: Transport> phy::Device for Nic<H, T> {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a, H, T>
    where
        Self: 'a;

    fn receive(
        &mut self,
        _timestamp: libdom::smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.repost();
        let ti = self.free_tx()?;
        let (i, hdr, len) = loop {
            match self.take_rx() {
                None => {
                    self.tx_free.push(ti);
                    return None;
                }
                Some((i, Some((hdr, len)))) => break (i, hdr, len),
                Some((i, None)) => self.repost_rx(i),
            }
        };
        self.rx_held = Some(i);
        let Nic {
            net,
            rx,
            tx,
            tx_free,
            stats,
            ..
        } = self;
        Some((
            RxToken {
                frame: &rx[i].buf[hdr..hdr + len],
            },
            TxToken {
                net,
                tx,
                tx_free,
                stats,
                i: ti,
                used: false,
            },
        ))
    }

    fn transmit(
        &mut self,
        _timestamp: libdom::smoltcp::time::Instant,
    ) -> Option<Self::TxToken<'_>> {
        self.repost();
        let i = self.free_tx()?;
        Some(TxToken {
            net: &mut self.net,
            tx: &mut self.tx,
            tx_free: &mut self.tx_free,
            stats: &mut self.stats,
            i,
            used: false,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = MTU;
        c.max_burst_size = None;
        c
    }
}
