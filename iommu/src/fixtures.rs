//! Byte builders for ACPI tables, and the DMAR and IVRS tables QEMU 7.2 emits, for host tests
//! (this crate's, and other crates' through the `test-utils` feature). No heap: a table is
//! built in a fixed [`TABLE_CAPACITY`]-byte buffer.
//!
//! The QEMU tables were checked byte for byte against what `qemu-system-x86_64` 7.2.22
//! (Debian 1:7.2+dfsg-7+deb12u18) installs in guest memory; the tests in `dmar` and `ivrs`
//! hold those dumps.

// Test helpers: a builder used wrongly (a table over capacity, a patch past the end) panics.
#![allow(clippy::indexing_slicing, clippy::panic)]

use crate::Bdf;

/// Largest table a [`TableBuilder`] holds, in bytes.
pub const TABLE_CAPACITY: usize = 1024;

/// Physical address of QEMU's VT-d register set (`Q35_HOST_BRIDGE_IOMMU_ADDR`).
pub const QEMU_VTD_BASE: u64 = 0xfed9_0000;

/// Physical address of QEMU's AMD-Vi register set.
pub const QEMU_AMDVI_BASE: u64 = 0xfed8_0000;

const fn bdf(bus: u8, device: u8, function: u8) -> Bdf {
    Bdf::from_rid((bus as u16) << 8 | (device as u16) << 3 | function as u16)
}

/// The PCI functions on bus 0 of `-machine q35` with the default VGA, virtio-blk at 00:03.0
/// and virtio-net at 00:04.0 (a `-netdev` suppresses the default NIC), in devfn order:
/// host bridge, VGA, virtio-blk, virtio-net, ICH9 LPC, AHCI, SMBus. The VT-d unit is not a PCI
/// function, so it is not among them.
pub const QEMU_Q35_DEVICES: [Bdf; 7] = [
    bdf(0, 0, 0),
    bdf(0, 1, 0),
    bdf(0, 3, 0),
    bdf(0, 4, 0),
    bdf(0, 0x1f, 0),
    bdf(0, 0x1f, 2),
    bdf(0, 0x1f, 3),
];

/// Where `-device amd-iommu` lands on that machine: the first free slot after the VGA.
pub const QEMU_AMDVI_BDF: Bdf = bdf(0, 2, 0);

/// The same bus with `-device amd-iommu` added, as its IVHD lists it: the IOMMU itself at
/// 00:02.0 is a PCI function and appears among the devices.
pub const QEMU_Q35_AMD_DEVICES: [Bdf; 8] = [
    bdf(0, 0, 0),
    bdf(0, 1, 0),
    bdf(0, 2, 0),
    bdf(0, 3, 0),
    bdf(0, 4, 0),
    bdf(0, 0x1f, 0),
    bdf(0, 0x1f, 2),
    bdf(0, 0x1f, 3),
];

/// A little-endian byte builder for one ACPI table.
#[derive(Clone)]
pub struct TableBuilder {
    buf: [u8; TABLE_CAPACITY],
    len: usize,
}

impl TableBuilder {
    /// A table starting with the 36-byte ACPI header QEMU writes (OEM id `"BOCHS "`, OEM
    /// table id `"BXPC    "`, OEM revision 1, creator `"BXPC"` revision 1), with the length
    /// and checksum left 0 until [`TableBuilder::finish`].
    pub fn new(signature: &[u8; 4], revision: u8) -> Self {
        let mut t = Self {
            buf: [0; TABLE_CAPACITY],
            len: 0,
        };
        t.bytes(signature).u32(0).u8(revision).u8(0);
        t.bytes(b"BOCHS ").bytes(b"BXPC    ").u32(1);
        t.bytes(b"BXPC").u32(1);
        t
    }

    /// Appends bytes.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        let end = self.len + bytes.len();
        assert!(end <= TABLE_CAPACITY, "table over {TABLE_CAPACITY} bytes");
        self.buf[self.len..end].copy_from_slice(bytes);
        self.len = end;
        self
    }

    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes(&[v])
    }

    /// Appends a little-endian `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a little-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a little-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Overwrites the byte at offset `at` (which must be below [`TableBuilder::len`]).
    pub fn set_u8(&mut self, at: usize, v: u8) -> &mut Self {
        self.set(at, &[v])
    }

    /// Overwrites a little-endian `u16` at offset `at`.
    pub fn set_u16(&mut self, at: usize, v: u16) -> &mut Self {
        self.set(at, &v.to_le_bytes())
    }

    /// Overwrites a little-endian `u32` at offset `at`.
    pub fn set_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.set(at, &v.to_le_bytes())
    }

    fn set(&mut self, at: usize, bytes: &[u8]) -> &mut Self {
        assert!(at + bytes.len() <= self.len, "patch past the table's end");
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
        self
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops everything after the first `len` bytes.
    pub fn truncate(&mut self, len: usize) -> &mut Self {
        self.len = self.len.min(len);
        self
    }

    /// Sets the length field to the bytes written and fixes the checksum.
    pub fn finish(&mut self) -> &mut Self {
        let len = u32::try_from(self.len).unwrap_or(u32::MAX);
        self.set_u32(4, len).fix_checksum()
    }

    /// Sets the checksum byte (byte 9) so that all bytes written sum to 0, leaving the length
    /// field alone (for corrupt variants).
    pub fn fix_checksum(&mut self) -> &mut Self {
        self.buf[9] = 0;
        let sum = self.as_bytes().iter().fold(0u8, |a, &b| a.wrapping_add(b));
        self.buf[9] = sum.wrapping_neg();
        self
    }

    /// The bytes written.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The DMAR QEMU 7.2's `build_dmar_q35` writes for `-machine q35 -device intel-iommu` with
/// `aw-bits=aw_bits` (39 by default, or 48), `intremap=on` if `intremap`, device-iotlb off, and
/// the PCI endpoints `endpoints` on bus 0:
///
/// - host address width `aw_bits - 1`; flags INTR_REMAP (bit 0) if `intremap`, nothing else;
/// - one DRHD: flags 0 (no INCLUDE_PCI_ALL), segment 0, registers at 0xfed90000;
/// - its scopes: first the IOAPIC (type 3, enumeration id 0, start bus 0xff, path 00.0: QEMU's
///   pseudo requester id ff:00.0 for the IOAPIC, not the f0:1f.0 of Intel boards), then one
///   single-hop scope per PCI function in devfn order (type 1; QEMU writes type 2 for a
///   bridge, which these fixtures leave out);
/// - no RMRR, and no ATSR (QEMU adds one, flags ALL_PORTS, only with `device-iotlb=on`).
pub fn dmar_q35(aw_bits: u8, intremap: bool, endpoints: &[Bdf]) -> TableBuilder {
    let mut t = TableBuilder::new(b"DMAR", 1);
    t.u8(aw_bits - 1).u8(u8::from(intremap)).bytes(&[0; 10]);
    let drhd_len = 16 + 8 + 8 * endpoints.len();
    t.u16(0).u16(drhd_len as u16).u8(0).u8(0).u16(0);
    t.u64(QEMU_VTD_BASE);
    // IOAPIC: type, length, flags, reserved, enumeration id, start bus, device, function.
    t.bytes(&[3, 8, 0, 0, 0, 0xff, 0, 0]);
    for ep in endpoints {
        t.bytes(&[1, 8, 0, 0, 0, ep.bus(), ep.device(), ep.function()]);
    }
    t.finish();
    t
}

/// The DMAR of `-machine q35 -device intel-iommu,intremap=on` with virtio-blk at 00:03.0 and
/// virtio-net at 00:04.0 (128 bytes).
pub fn qemu72_q35_dmar() -> TableBuilder {
    dmar_q35(39, true, &QEMU_Q35_DEVICES)
}

/// The IVRS QEMU 7.2's `build_amd_iommu` writes for `-machine q35 -device amd-iommu` with the
/// IOMMU at `iommu` and the PCI functions `devices` on bus 0 (no bridges):
///
/// - IVinfo 0x00002800 (PASize 40 bits; VASize, GVASize and EFRSup 0), revision 1;
/// - one IVHD type 0x10, flags 0xd1 (HtTunEn, IotlbSup, PrefSup, PPRSup), DeviceID = the
///   IOMMU's own BDF, capability offset 0x40, base 0xfed80000, segment 0, IOMMU info 0,
///   feature reporting 0x44 (GTSup, GASup; QEMU's HATS/GATS values overflow the field);
/// - one Select entry (type 2, DTE setting 0) per function in devfn order, the IOMMU
///   included; then a Special entry (type 0x48): IOAPIC (variety 1), handle 0, source 00:14.0.
///   QEMU 7.2 writes that IOAPIC entry with and without `intremap=on`.
pub fn ivrs_q35(iommu: Bdf, devices: &[Bdf]) -> TableBuilder {
    let mut t = TableBuilder::new(b"IVRS", 1);
    t.u32(40 << 8).u64(0);
    let ivhd_len = 24 + 4 * devices.len() + 8;
    t.u8(0x10).u8(0xd1).u16(ivhd_len as u16).u16(iommu.rid());
    t.u16(0x40).u64(QEMU_AMDVI_BASE).u16(0).u16(0).u32(0x44);
    for d in devices {
        t.u8(2).u16(d.rid()).u8(0);
    }
    t.u8(0x48)
        .u16(0)
        .u8(0)
        .u8(0)
        .u16(bdf(0, 0x14, 0).rid())
        .u8(1);
    t.finish();
    t
}

/// The IVRS of `-machine q35 -device amd-iommu` with virtio-blk at 00:03.0 and virtio-net at
/// 00:04.0 (112 bytes).
pub fn qemu72_q35_ivrs() -> TableBuilder {
    ivrs_q35(QEMU_AMDVI_BDF, &QEMU_Q35_AMD_DEVICES)
}
