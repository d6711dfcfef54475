//! Mediation of an assigned function's configuration space.
//!
//! A driver domain may read all of its function's config space, but the
//! registers that decide where the device decodes, whether it may master
//! the bus and where its interrupts go belong to the hypervisor: a domain
//! that could move a BAR over another device, or aim an MSI at a vector it
//! does not own, would escape its confinement. [`classify_write`] says what
//! becomes of one write.

use abi::hypercall::Error;

/// Standard header registers (type 0).
pub const COMMAND: u16 = 0x04;
/// Command register bits the hypervisor keeps: I/O space, memory space,
/// bus master.
pub const COMMAND_KEPT: u32 = 0b111;
const BARS: core::ops::Range<u16> = 0x10..0x28;
const ROM: core::ops::Range<u16> = 0x30..0x34;
/// Where a type-0 header ends and capabilities may start.
pub const HEADER_END: u16 = 0x40;

pub const CAP_MSI: u8 = 0x05;
pub const CAP_VENDOR: u8 = 0x09;
pub const CAP_PCIE: u8 = 0x10;
pub const CAP_MSIX: u8 = 0x11;

/// One capability in the function's list: its id, offset and length in
/// bytes (the part a write could change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub id: u8,
    pub offset: u16,
    pub len: u16,
}

/// What becomes of a config write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Write it as it is.
    Allow,
    /// Write it, but keep the bits of `keep` as they are now.
    Masked { keep: u32 },
    /// Refuse it; `what` names the register for the audit event.
    Deny { what: &'static str },
}

/// Checks the shape of an access: `size` 1, 2 or 4 and `offset` a multiple
/// of it below 4096.
pub fn check_access(offset: u64, size: u64) -> Result<(u16, u8), Error> {
    if !matches!(size, 1 | 2 | 4) || offset >= 4096 || !offset.is_multiple_of(size) {
        return Err(Error::Invalid);
    }
    Ok((offset as u16, size as u8))
}

/// What becomes of writing `size` bytes at `offset` of a function with
/// these capabilities.
pub fn classify_write(caps: &[Capability], offset: u16, size: u8) -> Verdict {
    let end = offset + u16::from(size);
    let overlaps = |r: core::ops::Range<u16>| offset < r.end && r.start < end;
    if overlaps(BARS) {
        return Verdict::Deny { what: "bar" };
    }
    if overlaps(ROM) {
        return Verdict::Deny { what: "rom" };
    }
    if offset < HEADER_END {
        // The command register's low byte holds the I/O, memory and
        // bus-master enables: keep them (aligned accesses that touch that
        // byte all start at 0x04).
        if offset == COMMAND {
            return Verdict::Masked { keep: COMMAND_KEPT };
        }
        // Capabilities pointer, interrupt line/pin, header type, ids: read-only
        // in hardware or harmless; latency timer, cache line size, status
        // (write-1-to-clear) are the driver's.
        return Verdict::Allow;
    }
    for c in caps {
        if !overlaps(c.offset..c.offset + c.len) {
            continue;
        }
        return match c.id {
            CAP_MSI => Verdict::Deny { what: "msi" },
            CAP_MSIX => Verdict::Deny { what: "msix" },
            // Virtio's capabilities describe where its structures live in the
            // BARs: rewriting them changes nothing the device does.
            CAP_VENDOR => Verdict::Allow,
            // Device control and friends: the driver's, except nothing here
            // can move decoding or interrupts.
            CAP_PCIE => Verdict::Allow,
            _ => Verdict::Deny { what: "capability" },
        };
    }
    Verdict::Deny { what: "unknown" }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: [Capability; 3] = [
        Capability {
            id: CAP_MSIX,
            offset: 0x98,
            len: 12,
        },
        Capability {
            id: CAP_VENDOR,
            offset: 0x84,
            len: 20,
        },
        Capability {
            id: CAP_MSI,
            offset: 0x50,
            len: 24,
        },
    ];

    #[test]
    fn access_shape() {
        assert_eq!(check_access(0x10, 4), Ok((0x10, 4)));
        assert_eq!(check_access(0x11, 2), Err(Error::Invalid));
        assert_eq!(check_access(0x10, 3), Err(Error::Invalid));
        assert_eq!(check_access(4096, 1), Err(Error::Invalid));
        assert_eq!(check_access(u64::MAX, 1), Err(Error::Invalid));
    }

    #[test]
    fn bars_rom_and_interrupt_capabilities_are_the_hypervisors() {
        for off in (0x10..0x28).step_by(4) {
            assert_eq!(classify_write(&CAPS, off, 4), Verdict::Deny { what: "bar" });
        }
        assert_eq!(
            classify_write(&CAPS, 0x27, 1),
            Verdict::Deny { what: "bar" }
        );
        assert_eq!(
            classify_write(&CAPS, 0x30, 4),
            Verdict::Deny { what: "rom" }
        );
        assert_eq!(
            classify_write(&CAPS, 0x98, 2),
            Verdict::Deny { what: "msix" }
        );
        assert_eq!(
            classify_write(&CAPS, 0xa0, 4),
            Verdict::Deny { what: "msix" }
        );
        assert_eq!(
            classify_write(&CAPS, 0x54, 4),
            Verdict::Deny { what: "msi" }
        );
        assert_eq!(
            classify_write(&CAPS, 0xf0, 4),
            Verdict::Deny { what: "unknown" }
        );
    }

    #[test]
    fn command_keeps_the_enables() {
        assert_eq!(
            classify_write(&CAPS, 0x04, 2),
            Verdict::Masked { keep: 0b111 }
        );
        assert_eq!(
            classify_write(&CAPS, 0x04, 4),
            Verdict::Masked { keep: 0b111 }
        );
        assert_eq!(
            classify_write(&CAPS, 0x04, 1),
            Verdict::Masked { keep: 0b111 }
        );
        // The command register's high byte (INTx disable...) is the driver's.
        assert_eq!(classify_write(&CAPS, 0x05, 1), Verdict::Allow);
        // The status register half of a dword write at 0x04 is the driver's.
        assert_eq!(classify_write(&CAPS, 0x06, 2), Verdict::Allow);
        assert_eq!(classify_write(&CAPS, 0x0c, 1), Verdict::Allow);
    }

    #[test]
    fn vendor_capabilities_are_the_drivers() {
        assert_eq!(classify_write(&CAPS, 0x84, 4), Verdict::Allow);
    }
}
