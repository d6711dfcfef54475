//! PCI function addresses, as every part of airlock names them.

use core::fmt;

/// A PCI function within one segment: bus (0-255), device (0-31),
/// function (0-7). Its 16-bit form (`bus << 8 | device << 3 | function`) is
/// what VT-d calls a source-id and AMD-Vi a DeviceID. Displays as `bb:dd.f`
/// in hex, e.g. `00:03.0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    bus: u8,
    device: u8,
    function: u8,
}

impl Bdf {
    /// The function at `bus`, `device`, `function`; out-of-range device and
    /// function numbers are masked to 5 and 3 bits. Use [`Bdf::checked`] for
    /// numbers that come from outside.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Bdf {
            bus,
            device: device & 0x1f,
            function: function & 7,
        }
    }

    /// `None` if `device > 31` or `function > 7`.
    pub const fn checked(bus: u8, device: u8, function: u8) -> Option<Self> {
        if device > 31 || function > 7 {
            return None;
        }
        Some(Bdf {
            bus,
            device,
            function,
        })
    }

    /// Decodes a 16-bit requester id; every value is valid.
    pub const fn from_rid(rid: u16) -> Self {
        Bdf {
            bus: (rid >> 8) as u8,
            device: ((rid >> 3) & 0x1f) as u8,
            function: (rid & 7) as u8,
        }
    }

    /// The 16-bit requester id: `bus << 8 | device << 3 | function`.
    pub const fn rid(self) -> u16 {
        (self.bus as u16) << 8 | (self.device as u16) << 3 | self.function as u16
    }

    pub const fn bus(self) -> u8 {
        self.bus
    }

    pub const fn device(self) -> u8 {
        self.device
    }

    pub const fn function(self) -> u8 {
        self.function
    }

    /// Device and function packed as PCI `devfn` (`device << 3 | function`).
    pub const fn devfn(self) -> u8 {
        self.device << 3 | self.function
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn round_trips_and_displays() {
        let b = Bdf::new(0, 3, 0);
        assert_eq!(b.rid(), 0x18);
        assert_eq!(Bdf::from_rid(0xff00), Bdf::new(0xff, 0, 0));
        assert_eq!(Bdf::from_rid(0x00fb).to_string(), "00:1f.3");
        for rid in [0u16, 1, 0x18, 0xfa, 0xffff] {
            assert_eq!(Bdf::from_rid(rid).rid(), rid);
        }
        assert_eq!(Bdf::checked(0, 32, 0), None);
        assert_eq!(Bdf::checked(0, 31, 8), None);
        assert_eq!(Bdf::checked(1, 2, 3), Some(Bdf::new(1, 2, 3)));
        assert_eq!(Bdf::new(0, 0x1f, 7).devfn(), 0xff);
    }
}
