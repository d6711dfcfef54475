//! Hypercalls: how a ring-3 domain asks the hypervisor for anything.
//!
//! A domain executes `syscall` with the call number in RAX and up to six
//! arguments in RDI, RSI, RDX, R10, R8, R9 (RCX and R11 are clobbered by the
//! instruction itself). The result comes back in RAX as an `i64`: zero or a
//! positive value on success, the negated [`Error`] code on failure. Every
//! other register is preserved.
//!
//! | nr | call | arguments | success value |
//! |---:|---|---|---|
//! | 1 | `console_write` | `ptr, len` (len ≤ [`CONSOLE_MAX`]) | bytes taken |
//! | 2 | `event` | `ptr, len`: one JSON object `{"ev":NAME,...}` (len ≤ [`EVENT_MAX`]) | 0 |
//! | 3 | `exit` | `status` | does not return |
//! | 4 | `yield` | – | 0 |
//! | 5 | `wait` | `out_ptr, words, flags` | number of ports delivered |
//! | 6 | `time` | – | nanoseconds since the hypervisor's entry |
//! | 7 | `set_timer` | `deadline_ns` (0 cancels) | 0 |
//! | 8 | `evtchn_alloc_unbound` | `remote_domid` | local port |
//! | 9 | `evtchn_bind_interdomain` | `remote_domid, remote_port` | local port |
//! | 10 | `evtchn_bind_virq` | `virq` | local port |
//! | 11 | `evtchn_send` | `port` | 0 |
//! | 12 | `evtchn_close` | `port` | 0 |
//! | 13 | `dev_config_read` | `dev, offset, size` | the value |
//! | 14 | `dev_config_write` | `dev, offset, size, value` | 0 |
//! | 15 | `dev_irq_bind` | `dev` | local port |
//! | 16 | `dma_map` | `va, len` | I/O address |
//! | 17 | `dma_unmap` | `iova, len` | 0 |
//! | 18 | `grant_table_set` | `va, pages` | 0 |
//! | 19 | `grant_map` | `ops, count` | operations processed |
//! | 20 | `grant_unmap` | `ops, count` | operations processed |
//! | 21 | `grant_copy` | `ops, count` | operations processed |
//! | 22 | `dma_batch` | `ops, count` | operations processed |
//!
//! Grants are `abi::grant`'s: `grant_table_set` names the caller's own
//! page-aligned, writable pages (at most `grant::MAX_TABLE_PAGES`) as its
//! grant table; the map, unmap and copy calls take an array of `count`
//! (1..=`grant::MAX_BATCH`) operations in the caller's memory, which must be
//! readable and writable as a whole (`BadAddress`, `BadLength` otherwise);
//! each operation gets its own `grant::Status`, written back in place.
//!
//! `dev` is an index into the caller's start-info device list (the PCI
//! functions the manifest assigns it). Config space is mediated: `size` is
//! 1, 2 or 4 and `offset` a multiple of it below 4096. Reads are allowed.
//! Writes to the BARs and expansion ROM (0x10..0x34), to any MSI or MSI-X
//! capability register, or to anything past the standard header that is
//! not a capability the hypervisor knows to be harmless are refused with
//! [`Error::Denied`]; in the command register (0x04) the memory-space,
//! I/O-space and bus-master bits stay as the hypervisor set them and the
//! rest of the write applies. `dev_irq_bind` returns a port that becomes
//! pending whenever the device raises any of its MSI-X vectors (the
//! hypervisor programs the MSI-X table, through interrupt remapping).
//! `dma_map` makes `[va, va + len)` (page-aligned, the caller's own
//! writable or readable memory) reachable by the caller's devices and
//! returns its I/O address; in the "static" DMA mode all of the domain's
//! memory is reachable at I/O address = virtual address from the start and
//! `dma_map` only checks and returns `va`. `dma_unmap` removes a strict
//! mapping and invalidates the IOTLB before it returns; in static mode it
//! is [`Error::Invalid`].
//!
//! `dma_batch` (strict mode only: [`Error::Invalid`] in static mode,
//! [`Error::BadDevice`] without devices) carries out `count`
//! (1..=[`DMA_BATCH_MAX`]) [`DmaOp`]s read from `ops` (readable,
//! [`DMA_OP_SIZE`] bytes each) as one change of the caller's I/O address
//! space, at I/O address = virtual address: every unmap, then every map,
//! then one IOTLB invalidation, all before it returns. A map makes the
//! pages reachable (writable by the device only with [`dma_flags::WRITE`])
//! and may replace a mapping already there (to change its permission); an
//! unmap needs every page of its range mapped. A page may be the caller's
//! own memory (writable for `WRITE`) or a grant it mapped with `DEVICE_MAP`
//! (writable for `WRITE`): in strict mode a grant mapped for the device is
//! reachable only while `dma_batch` has it mapped, and unmapping the grant
//! unmaps it. Checked whole before anything changes, in this order: the
//! count ([`Error::BadLength`]), the array ([`Error::BadAddress`]); per
//! operation, unknown flags or `WRITE` on an unmap ([`Error::Invalid`]),
//! `pages` 0 ([`Error::BadLength`]), an address not page-aligned or a range
//! that wraps or reaches the interrupt window (`domain::USER_LIMIT`):
//! [`Error::BadAddress`]; then ranges
//! that overlap another operation's ([`Error::Invalid`]); then each page: a
//! map of a page that is neither (or read-only for `WRITE`):
//! [`Error::BadAddress`]; an unmap of a page not mapped: [`Error::Invalid`].
//! A batch the IOMMU cannot complete (no memory for a table) is
//! [`Error::NoSpace`]: its unmaps are done, some maps may be.
//!
//! `wait` blocks until at least one of the caller's ports is pending (or
//! returns 0 at once with [`WAIT_NONBLOCK`]), then writes the pending set as
//! a bitmap of [`PORT_WORDS`] `u64`s to `out_ptr` (`words` must be at least
//! that) and clears those pending bits. Ports are numbered from 1; port 0 is
//! never valid.
//!
//! ## Which error, when (checked in this order)
//!
//! - An unknown number: [`Error::UnknownCall`].
//! - Flags other than the defined ones, an unknown VIRQ: [`Error::Invalid`].
//! - Lengths: `console_write` with `len == 0` succeeds with 0 and reads
//!   nothing; `len > CONSOLE_MAX`, `event` with `len == 0` or
//!   `len > EVENT_MAX`, `wait` with `words < PORT_WORDS`: [`Error::BadLength`].
//! - Pointers: a range `[ptr, ptr + len)` (for `wait`, `len = words * 8`) that
//!   wraps, reaches `USER_TOP` or above, touches a page the caller has not
//!   mapped, or (for `wait`'s output) a page it cannot write:
//!   [`Error::BadAddress`]. A pointer is never dereferenced before this check.
//! - `event`: not one JSON object on one line, not an event of the schema,
//!   a field missing, unknown or of the wrong kind, or a `"from"` field (the
//!   hypervisor stamps that): [`Error::Invalid`]; an event that only ring 0
//!   may print: [`Error::Denied`].
//! - Domain ids: none such, or the caller itself: [`Error::BadDomain`].
//! - Ports: 0, `>= NR_PORTS`, or not allocated to the caller:
//!   [`Error::BadPort`]; `evtchn_send` on a port that is unbound or bound
//!   to a VIRQ, `evtchn_bind_interdomain` to a remote port that is not
//!   unbound and offered to the caller: [`Error::PortState`]; no free port:
//!   [`Error::NoSpace`].
//! - `evtchn_close` on an interdomain port leaves the peer's end unbound
//!   (offered back to the closer), as in Xen.

/// A hypercall number (RAX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Call {
    ConsoleWrite = 1,
    Event = 2,
    Exit = 3,
    Yield = 4,
    Wait = 5,
    Time = 6,
    SetTimer = 7,
    EvtchnAllocUnbound = 8,
    EvtchnBindInterdomain = 9,
    EvtchnBindVirq = 10,
    EvtchnSend = 11,
    EvtchnClose = 12,
    DevConfigRead = 13,
    DevConfigWrite = 14,
    DevIrqBind = 15,
    DmaMap = 16,
    DmaUnmap = 17,
    GrantTableSet = 18,
    GrantMap = 19,
    GrantUnmap = 20,
    GrantCopy = 21,
    DmaBatch = 22,
}

impl Call {
    pub const ALL: [Call; 22] = [
        Call::ConsoleWrite,
        Call::Event,
        Call::Exit,
        Call::Yield,
        Call::Wait,
        Call::Time,
        Call::SetTimer,
        Call::EvtchnAllocUnbound,
        Call::EvtchnBindInterdomain,
        Call::EvtchnBindVirq,
        Call::EvtchnSend,
        Call::EvtchnClose,
        Call::DevConfigRead,
        Call::DevConfigWrite,
        Call::DevIrqBind,
        Call::DmaMap,
        Call::DmaUnmap,
        Call::GrantTableSet,
        Call::GrantMap,
        Call::GrantUnmap,
        Call::GrantCopy,
        Call::DmaBatch,
    ];

    pub fn from_raw(nr: u64) -> Option<Call> {
        Call::ALL.iter().copied().find(|c| *c as u64 == nr)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Call::ConsoleWrite => "console_write",
            Call::Event => "event",
            Call::Exit => "exit",
            Call::Yield => "yield",
            Call::Wait => "wait",
            Call::Time => "time",
            Call::SetTimer => "set_timer",
            Call::EvtchnAllocUnbound => "evtchn_alloc_unbound",
            Call::EvtchnBindInterdomain => "evtchn_bind_interdomain",
            Call::EvtchnBindVirq => "evtchn_bind_virq",
            Call::EvtchnSend => "evtchn_send",
            Call::EvtchnClose => "evtchn_close",
            Call::DevConfigRead => "dev_config_read",
            Call::DevConfigWrite => "dev_config_write",
            Call::DevIrqBind => "dev_irq_bind",
            Call::DmaMap => "dma_map",
            Call::DmaUnmap => "dma_unmap",
            Call::GrantTableSet => "grant_table_set",
            Call::GrantMap => "grant_map",
            Call::GrantUnmap => "grant_unmap",
            Call::GrantCopy => "grant_copy",
            Call::DmaBatch => "dma_batch",
        }
    }
}

/// Why a hypercall failed; RAX holds the negated code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i64)]
pub enum Error {
    /// No hypercall has this number.
    UnknownCall = 1,
    /// A pointer and length are not wholly inside the caller's own user
    /// mappings with the access the call needs (unmapped, kernel half,
    /// read-only for an output, or `ptr + len` wraps).
    BadAddress = 2,
    /// A length is zero where data is needed, or larger than the call allows.
    BadLength = 3,
    /// A port number is out of range or not allocated to the caller.
    BadPort = 4,
    /// The port exists but is in the wrong state for the call (e.g. send on
    /// an unbound port, bind to a port not offered to the caller).
    PortState = 5,
    /// No such domain, or one that may not be named here (e.g. oneself).
    BadDomain = 6,
    /// The caller has no free port left.
    NoSpace = 7,
    /// The security policy or the hypervisor's rules forbid it (e.g. a
    /// domain asking to print an event that only ring 0 may print).
    Denied = 8,
    /// An argument is malformed (an event that is not a valid object of
    /// the schema, an unknown VIRQ, unknown flags).
    Invalid = 9,
    /// No device with this index is assigned to the caller.
    BadDevice = 10,
}

impl Error {
    pub const ALL: [Error; 10] = [
        Error::UnknownCall,
        Error::BadAddress,
        Error::BadLength,
        Error::BadPort,
        Error::PortState,
        Error::BadDomain,
        Error::NoSpace,
        Error::Denied,
        Error::Invalid,
        Error::BadDevice,
    ];

    /// The value RAX carries.
    pub const fn to_raw(self) -> i64 {
        -(self as i64)
    }

    /// Decodes a negative RAX value.
    pub fn from_raw(raw: i64) -> Option<Error> {
        Error::ALL.iter().copied().find(|e| e.to_raw() == raw)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Error::UnknownCall => "unknown-call",
            Error::BadAddress => "bad-address",
            Error::BadLength => "bad-length",
            Error::BadPort => "bad-port",
            Error::PortState => "port-state",
            Error::BadDomain => "bad-domain",
            Error::NoSpace => "no-space",
            Error::Denied => "denied",
            Error::Invalid => "invalid",
            Error::BadDevice => "bad-device",
        }
    }
}

/// Decodes RAX after a hypercall.
pub fn decode(raw: i64) -> Result<u64, Error> {
    if raw >= 0 {
        Ok(raw as u64)
    } else {
        // An unknown negative value cannot come from this hypervisor; treat
        // it as the most general failure rather than inventing a code.
        Err(Error::from_raw(raw).unwrap_or(Error::Invalid))
    }
}

/// Most bytes one `console_write` takes.
pub const CONSOLE_MAX: u64 = 1024;
/// Most bytes of one `event` object.
pub const EVENT_MAX: u64 = 1024;

/// Most operations one `dma_batch` takes.
pub const DMA_BATCH_MAX: u64 = 64;
/// Bytes of one [`DmaOp`] in memory.
pub const DMA_OP_SIZE: usize = 16;

/// [`DmaOp::flags`].
pub mod dma_flags {
    /// Map the range (else unmap it).
    pub const MAP: u32 = 1;
    /// The device may write the pages (maps only).
    pub const WRITE: u32 = 2;
    pub const ALL: u32 = MAP | WRITE;
}

/// One operation of `dma_batch`: `pages` pages from the page-aligned `addr`
/// (a virtual address of the caller, which is also the I/O address).
/// Layout, little-endian: `addr` u64 at 0, `pages` u32 at 8, `flags` u32 at
/// 12 (`repr(C)` on a little-endian machine, so an array of them is the
/// wire format as it stands).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DmaOp {
    pub addr: u64,
    pub pages: u32,
    pub flags: u32,
}

impl DmaOp {
    pub fn encode(&self) -> [u8; DMA_OP_SIZE] {
        let mut b = [0u8; DMA_OP_SIZE];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.pages.to_le_bytes());
        b[12..].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; DMA_OP_SIZE]) -> DmaOp {
        let [a0, a1, a2, a3, a4, a5, a6, a7, p0, p1, p2, p3, f0, f1, f2, f3] = *b;
        DmaOp {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            pages: u32::from_le_bytes([p0, p1, p2, p3]),
            flags: u32::from_le_bytes([f0, f1, f2, f3]),
        }
    }

    /// Whether it maps (else it unmaps).
    pub const fn is_map(&self) -> bool {
        self.flags & dma_flags::MAP != 0
    }

    /// Whether the device may write (a map's permission).
    pub const fn is_write(&self) -> bool {
        self.flags & dma_flags::WRITE != 0
    }
}

/// Event-channel ports per domain (numbered 1..NR_PORTS; 0 is invalid).
pub const NR_PORTS: usize = 256;
/// `u64` words in a pending-port bitmap.
pub const PORT_WORDS: usize = NR_PORTS / 64;
/// `wait` flag: return 0 at once instead of blocking.
pub const WAIT_NONBLOCK: u64 = 1;

/// Virtual interrupts: sources the hypervisor raises on a domain's port.
pub mod virq {
    /// Fires when the deadline given to `set_timer` passes. The only one
    /// `evtchn_bind_virq` accepts.
    pub const TIMER: u64 = 0;
    /// Device `i` of the start-info device list interrupted; bound only
    /// through `dev_irq_bind`.
    pub const fn device(i: usize) -> u64 {
        1 + i as u64
    }
    pub const COUNT: u64 = 1 + crate::domain::MAX_DEVICES as u64;
    /// VIRQs below this `evtchn_bind_virq` accepts.
    pub const BINDABLE: u64 = 1;
}

const _: () = assert!(NR_PORTS.is_multiple_of(64));
const _: () = assert!(core::mem::size_of::<DmaOp>() == DMA_OP_SIZE);
const _: () = assert!(PORT_WORDS == 4);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_codes_round_trip() {
        for c in Call::ALL {
            assert_eq!(Call::from_raw(c as u64), Some(c));
        }
        assert_eq!(Call::from_raw(0), None);
        assert_eq!(Call::from_raw(23), None);
        for e in Error::ALL {
            assert!(e.to_raw() < 0);
            assert_eq!(decode(e.to_raw()), Err(e));
        }
        assert_eq!(decode(5), Ok(5));
    }

    #[test]
    fn dma_ops_round_trip() {
        let op = DmaOp {
            addr: 0x8000_1000,
            pages: 16,
            flags: dma_flags::MAP | dma_flags::WRITE,
        };
        let b = op.encode();
        assert_eq!(&b[..8], &0x8000_1000u64.to_le_bytes());
        assert_eq!(DmaOp::decode(&b), op);
        assert!(op.is_map() && op.is_write());
        assert!(!DmaOp::default().is_map());
    }
}
