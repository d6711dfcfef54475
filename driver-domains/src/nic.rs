//! The net driver domain's virtio-net with its own buffers: the NIC port of
//! netback's switch in serve mode (`crate::netserve`), and a
//! [`smoltcp::phy::Device`] for the direct TCP mode (`crate::nettcp`).
//!
//! It keeps `rx` receive buffers posted at all times and `tx` transmit
//! buffers, slots of [`SLOT`] bytes of one arena made once (it never grows,
//! so a buffer the device holds never moves; a slot is 2 KiB-aligned, so a
//! buffer never crosses a page). Device tokens are descriptor indices below
//! [`QUEUE_SIZE`]: a table per queue maps each to its buffer. A received
//! frame is looked at in its buffer and the buffer posted again at once
//! ([`Nic::recv`]), or later when its taker is done: netback holding it
//! ([`Nic::rx_done`]), smoltcp at the next `receive` or `transmit`
//! ([`Nic::repost`]). An outgoing frame is copied into a free transmit
//! buffer ([`Nic::send`]), grant-copied there by the hypervisor for netback
//! (`netback::Nic::tx_buffer`), or built there by smoltcp.

use alloc::vec;
use alloc::vec::Vec;

use libdom::println;
use libdom::smoltcp::phy::{self, DeviceCapabilities, Medium};
use netback::{NicBusy, RxBuf, TxBuf};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::Transport;
use virtio_drivers::{Error as VirtioError, Hal};

use crate::netserve::QUEUE_SIZE;

/// Bytes of a NIC buffer: the 12-byte virtio-net header and a 1514-byte
/// frame, rounded up (virtio-drivers asks for at least 1526 to receive).
const NIC_BUF: usize = 1536;
/// Bytes (and alignment) of a buffer's slot in the arena.
pub const SLOT: usize = 2048;
/// The largest Ethernet frame without its FCS.
const MTU: usize = 1514;
const _: () = assert!(NIC_BUF <= SLOT && 4096 % SLOT == 0);

/// A buffer's state; its bytes are slot `i` of the arena. The device owns
/// it while `token` is set; a transmit buffer lent to netback is `lent`.
#[derive(Clone, Copy, Default)]
struct NicBuf {
    token: Option<u16>,
    len: usize,
    lent: bool,
}

/// The arena: `count` slots of [`SLOT`] bytes, the first at a 2 KiB
/// boundary. Never resized after `new`.
struct Arena {
    mem: Vec<u8>,
    base: usize,
}

impl Arena {
    fn new(count: usize) -> Arena {
        let mem = vec![0u8; (count + 1) * SLOT];
        let base = (SLOT - mem.as_ptr() as usize % SLOT) % SLOT;
        Arena { mem, base }
    }

    fn buf(&self, i: usize) -> &[u8] {
        &self.mem[self.base + i * SLOT..][..NIC_BUF]
    }

    fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.mem[self.base + i * SLOT..][..NIC_BUF]
    }

    /// Slot `i`'s address in this domain.
    fn addr(&self, i: usize) -> u64 {
        self.buf(i).as_ptr() as u64
    }
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

/// Which buffer a device token names: `slots[token]` (tokens are
/// descriptor indices, below [`QUEUE_SIZE`]).
struct Tokens {
    slots: [Option<u16>; QUEUE_SIZE],
}

impl Tokens {
    const fn new() -> Tokens {
        Tokens {
            slots: [None; QUEUE_SIZE],
        }
    }

    fn set(&mut self, token: u16, i: usize) {
        if let Some(s) = self.slots.get_mut(usize::from(token)) {
            *s = Some(i as u16);
        }
    }

    fn take(&mut self, token: u16) -> Option<usize> {
        self.slots
            .get_mut(usize::from(token))?
            .take()
            .map(usize::from)
    }
}

/// The transmit buffers: buffer `i` is slot `i` of their arena.
struct TxBufs {
    arena: Arena,
    bufs: Vec<NicBuf>,
    tokens: Tokens,
    /// Neither the device's nor lent.
    free: Vec<usize>,
}

/// The virtio-net and its buffers: receive buffer `i` is slot `i` of
/// `arena`.
pub struct Nic<H: Hal, T: Transport> {
    net: VirtIONetRaw<H, T, QUEUE_SIZE>,
    arena: Arena,
    rx: Vec<NicBuf>,
    rx_tokens: Tokens,
    tx: TxBufs,
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
        let mut nic = Nic {
            net,
            arena: Arena::new(rx),
            rx: vec![NicBuf::default(); rx],
            rx_tokens: Tokens::new(),
            tx: TxBufs {
                arena: Arena::new(tx),
                bufs: vec![NicBuf::default(); tx],
                tokens: Tokens::new(),
                free: (0..tx).rev().collect(),
            },
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
        // SAFETY: slot `i` is neither touched, moved nor freed (the arena
        // never resizes) until its token comes back through `poll_receive`
        // and `receive_complete` (in `take_rx`).
        let token = unsafe { self.net.receive_begin(self.arena.buf_mut(i)) }?;
        self.rx[i].token = Some(token);
        self.rx_tokens.set(token, i);
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

    /// Posts again receive buffer `id`, which a [`Nic::recv`] callback
    /// kept; an id that is not such a buffer is ignored.
    pub fn rx_done(&mut self, id: u16) {
        let i = usize::from(id);
        if self.rx.get(i).is_some_and(|b| b.token.is_none() && b.lent) {
            self.rx[i].lent = false;
            self.repost_rx(i);
        }
    }

    /// Hands `frame` to the device (copied into a transmit buffer);
    /// false if every buffer is out (the frame is dropped and counted).
    pub fn send(&mut self, frame: &[u8]) -> bool {
        self.reap_tx();
        let Some(i) = self.tx.free.pop() else {
            self.stats.tx_busy += 1;
            return false;
        };
        let sent = transmit(
            &mut self.net,
            &mut self.tx,
            &mut self.stats,
            i,
            frame.len(),
            |b| b.copy_from_slice(frame),
        );
        let queued = matches!(sent, Ok(((), true)));
        if !queued {
            self.tx.free.push(i);
        }
        queued
    }

    /// Takes back every finished transmission; returns how many.
    pub fn reap_tx(&mut self) -> usize {
        let mut n = 0;
        while let Some(token) = self.net.poll_transmit() {
            let Some(i) = self.tx.tokens.take(token) else {
                println!("net: the NIC completed a transmission we did not make");
                return n;
            };
            let b = &mut self.tx.bufs[i];
            b.token = None;
            let buf = &self.tx.arena.buf(i)[..b.len];
            // SAFETY: the buffer of the `transmit_begin` that gave `token`.
            if unsafe { self.net.transmit_complete(token, buf) }.is_err() {
                self.stats.tx_errors += 1;
            }
            self.tx.free.push(i);
            n += 1;
        }
        n
    }

    /// The next completed receive buffer: its index and where its frame is
    /// (`None` for a completion that is not a frame, counted). The buffer
    /// is the caller's until it posts it again.
    fn take_rx(&mut self) -> Option<(usize, Option<(usize, usize)>)> {
        let token = self.net.poll_receive()?;
        let Some(i) = self.rx_tokens.take(token) else {
            println!("net: the NIC filled a buffer we did not post");
            return None;
        };
        self.rx[i].token = None;
        let buf = self.arena.buf_mut(i);
        let cap = buf.len();
        // SAFETY: the buffer of the `receive_begin` that gave `token`.
        let frame = match unsafe { self.net.receive_complete(token, buf) } {
            Ok((hdr, len)) if hdr + len <= cap => {
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

    /// Hands up to `max` received frames to `f` with where they lie,
    /// reposting each buffer unless `f` returns true: then the buffer stays
    /// out until [`Nic::rx_done`] names it. Returns how many frames (fewer
    /// than `max`: there are no more now).
    pub fn recv(&mut self, max: usize, mut f: impl FnMut(&[u8], RxBuf) -> bool) -> usize {
        self.repost();
        let mut n = 0;
        while n < max {
            let Some((i, frame)) = self.take_rx() else {
                break;
            };
            let mut kept = false;
            if let Some((hdr, len)) = frame {
                let at = RxBuf {
                    id: i as u16,
                    addr: self.arena.addr(i) + hdr as u64,
                };
                kept = f(&self.arena.buf(i)[hdr..hdr + len], at);
            }
            if kept {
                self.rx[i].lent = true;
            } else {
                self.repost_rx(i);
            }
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
        if self.tx.free.is_empty() {
            self.reap_tx();
        }
        let i = self.tx.free.pop();
        if i.is_none() {
            self.stats.tx_busy += 1;
        }
        i
    }
}

/// Fills transmit buffer `i` with the virtio-net header and a `len`-byte
/// frame that `fill` writes, and hands it to the device: `fill`'s result
/// and whether the queue took the buffer (if not, counted; the caller
/// frees it). `Err(fill)`, not called, if the frame does not fit.
fn transmit<H: Hal, T: Transport, R, F: FnOnce(&mut [u8]) -> R>(
    net: &mut VirtIONetRaw<H, T, QUEUE_SIZE>,
    tx: &mut TxBufs,
    stats: &mut NicStats,
    i: usize,
    len: usize,
    fill: F,
) -> Result<(R, bool), F> {
    let buf = tx.arena.buf_mut(i);
    let Ok(hdr) = net.fill_buffer_header(buf) else {
        stats.tx_errors += 1;
        return Err(fill);
    };
    let Some(dst) = buf.get_mut(hdr..hdr + len) else {
        stats.tx_errors += 1;
        return Err(fill);
    };
    let r = fill(dst);
    Ok((r, begin(net, tx, stats, i, hdr, len)))
}

/// Hands transmit buffer `i`, filled with a `hdr`-byte header and a
/// `len`-byte frame, to the device; false if the queue refused it
/// (counted).
fn begin<H: Hal, T: Transport>(
    net: &mut VirtIONetRaw<H, T, QUEUE_SIZE>,
    tx: &mut TxBufs,
    stats: &mut NicStats,
    i: usize,
    hdr: usize,
    len: usize,
) -> bool {
    let total = hdr + len;
    let buf = &tx.arena.buf(i)[..total];
    // SAFETY: the buffer is left alone (not touched, moved or freed: the
    // arena never resizes) until `poll_transmit` returns its token
    // (`Nic::reap_tx`).
    match unsafe { net.transmit_begin(buf) } {
        Ok(token) => {
            let b = &mut tx.bufs[i];
            b.token = Some(token);
            b.len = total;
            tx.tokens.set(token, i);
            stats.tx_frames += 1;
            stats.tx_bytes += len as u64;
            true
        }
        Err(_) => {
            stats.tx_busy += 1;
            false
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

    fn tx_buffer(&mut self) -> Option<TxBuf> {
        if self.tx.free.is_empty() {
            self.reap_tx();
        }
        let i = self.tx.free.pop()?;
        let Ok(hdr) = self.net.fill_buffer_header(self.tx.arena.buf_mut(i)) else {
            self.stats.tx_errors += 1;
            self.tx.free.push(i);
            return None;
        };
        self.tx.bufs[i].lent = true;
        self.tx.bufs[i].len = hdr;
        Some(TxBuf {
            id: i as u16,
            addr: self.tx.arena.addr(i) + hdr as u64,
            room: (NIC_BUF - hdr).min(MTU),
        })
    }

    fn submit(&mut self, id: u16, len: usize) -> Result<(), NicBusy> {
        let i = usize::from(id);
        if !self.tx.bufs.get(i).is_some_and(|b| b.lent) {
            self.stats.tx_errors += 1;
            return Err(NicBusy);
        }
        // the header's length, written when it was lent
        let hdr = self.tx.bufs[i].len;
        self.tx.bufs[i].lent = false;
        if hdr + len > NIC_BUF || !begin(&mut self.net, &mut self.tx, &mut self.stats, i, hdr, len)
        {
            self.tx.free.push(i);
            return Err(NicBusy);
        }
        Ok(())
    }

    fn release(&mut self, id: u16) {
        let i = usize::from(id);
        if let Some(b) = self.tx.bufs.get_mut(i).filter(|b| b.lent) {
            b.lent = false;
            self.tx.free.push(i);
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
    tx: &'a mut TxBufs,
    stats: &'a mut NicStats,
    i: usize,
    used: bool,
}

impl<H: Hal, T: Transport> Drop for TxToken<'_, H, T> {
    fn drop(&mut self) {
        if !self.used {
            self.tx.free.push(self.i);
        }
    }
}

impl<H: Hal, T: Transport> phy::TxToken for TxToken<'_, H, T> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(mut self, len: usize, f: F) -> R {
        self.used = true;
        let i = self.i;
        let f = if len <= MTU {
            match transmit(self.net, self.tx, self.stats, i, len, f) {
                Ok((r, queued)) => {
                    // A frame the queue refused is lost (TCP sends again).
                    if !queued {
                        self.tx.free.push(i);
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
        self.tx.free.push(i);
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
                    self.tx.free.push(ti);
                    return None;
                }
                Some((i, Some((hdr, len)))) => break (i, hdr, len),
                Some((i, None)) => self.repost_rx(i),
            }
        };
        self.rx_held = Some(i);
        let Nic {
            net,
            arena,
            tx,
            stats,
            ..
        } = self;
        Some((
            RxToken {
                frame: &arena.buf(i)[hdr..hdr + len],
            },
            TxToken {
                net,
                tx,
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
