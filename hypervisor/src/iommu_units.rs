//! The DMA remapping units: found in the DMAR (VT-d) or IVRS (AMD-Vi),
//! their registers read, and reported as `iommu_unit` events.

use crate::acpi::Platform;
use crate::mm::{self, Cache};
use crate::{boot, log};
use abi::ev::{self, Bdf, Code, Hex, List};
use alloc::vec::Vec;
use iommu::dmar::Dmar;
use iommu::ivrs::DeviceEntry;
use iommu::ivrs::Ivrs;
use iommu::vtd;
use iommu::vtd::regs::{Cap, Ecap};

pub enum Kind {
    VtD {
        ver: u32,
        cap: Cap,
        ecap: Ecap,
        include_all: bool,
    },
    AmdVi {
        ivhd_type: u8,
        features: u64,
    },
}

pub struct Unit {
    pub base: u64,
    pub kind: Kind,
    /// The unit's device scopes: (type code, type name, function, enumeration id).
    pub scopes: Vec<(u8, &'static str, Option<Bdf>, u8)>,
}

/// Reads one 32- or 64-bit register of a VT-d unit.
fn read_reg(regs: *mut u8, off: usize, wide: bool) -> u64 {
    // SAFETY: `regs` maps the unit's 4 KiB register page uncached and `off`
    // is an architectural register offset inside it, aligned to its width.
    unsafe {
        if wide {
            regs.add(off).cast::<u64>().read_volatile()
        } else {
            u64::from(regs.add(off).cast::<u32>().read_volatile())
        }
    }
}

pub fn discover(platform: &Platform) -> Vec<Unit> {
    let mut units = Vec::new();
    if let Some(bytes) = platform.dmar {
        let dmar =
            Dmar::parse(bytes).unwrap_or_else(|e| boot::fail("acpi", format_args!("DMAR: {e}")));
        log!(
            "dmar: host address width {} bits, interrupt remapping {}",
            dmar.host_address_width_bits(),
            if dmar.flags().intr_remap() {
                "supported"
            } else {
                "absent"
            }
        );
        for drhd in dmar.drhds() {
            let regs = mm::map_device(drhd.register_base, 4096, Cache::Uncached);
            let ver = read_reg(regs, vtd::regs::VER.0, false) as u32;
            let cap = Cap(read_reg(regs, vtd::regs::CAP.0, true));
            let ecap = Ecap(read_reg(regs, vtd::regs::ECAP.0, true));
            let scopes = drhd
                .scopes()
                .map(|s| (s.kind, s.kind_name(), s.bdf(), s.enumeration_id))
                .collect();
            units.push(Unit {
                base: drhd.register_base,
                kind: Kind::VtD {
                    ver,
                    cap,
                    ecap,
                    include_all: drhd.include_pci_all(),
                },
                scopes,
            });
        }
    }
    if let Some(bytes) = platform.ivrs {
        let ivrs =
            Ivrs::parse(bytes).unwrap_or_else(|e| boot::fail("acpi", format_args!("IVRS: {e}")));
        for ivhd in ivrs.ivhds() {
            let mut scopes = Vec::new();
            for e in ivhd.entries() {
                let (code, name, bdf, id) = match e {
                    DeviceEntry::Select { device, .. } => (2, "select", device, 0),
                    DeviceEntry::RangeStart { device, .. } => (3, "range-start", device, 0),
                    DeviceEntry::RangeEnd { device } => (4, "range-end", device, 0),
                    DeviceEntry::AliasSelect { device, .. } => (66, "alias-select", device, 0),
                    DeviceEntry::ExtSelect { device, .. } => (70, "ext-select", device, 0),
                    DeviceEntry::Special { handle, source, .. } => (72, "special", source, handle),
                    _ => continue,
                };
                scopes.push((code, name, Some(bdf), id));
            }
            units.push(Unit {
                base: ivhd.base_address,
                kind: Kind::AmdVi {
                    ivhd_type: ivhd.kind,
                    features: ivhd.efr_image.unwrap_or(u64::from(ivhd.feature_info)),
                },
                scopes,
            });
        }
    }
    if units.is_empty() {
        log!("no DMA remapping unit in ACPI: devices could not be confined");
    }
    units
}

/// The unit whose scope names `bdf`, or the one that includes every device.
pub fn unit_for(units: &[Unit], bdf: Bdf) -> Option<u32> {
    let named = units
        .iter()
        .position(|u| u.scopes.iter().any(|s| s.2 == Some(bdf)));
    let all = units.iter().position(|u| {
        matches!(
            u.kind,
            Kind::VtD {
                include_all: true,
                ..
            }
        )
    });
    named.or(all).map(|i| i as u32)
}

pub fn report(units: &[Unit]) {
    for (i, u) in units.iter().enumerate() {
        let scopes: Vec<ev::Scope> = u
            .scopes
            .iter()
            .map(|&(code, name, bdf, id)| ev::Scope {
                kind: Code {
                    raw: u64::from(code),
                    name,
                },
                bdf,
                enumeration_id: id,
            })
            .collect();
        match &u.kind {
            Kind::VtD {
                ver,
                cap,
                ecap,
                include_all,
            } => {
                let levels: Vec<u8> = cap.supported_levels().iter().collect();
                log!(
                    "vt-d unit {} at {:#x}: version {}.{}, {}-bit, {} domains, {} fault records",
                    i,
                    u.base,
                    vtd::regs::Version(*ver).major(),
                    vtd::regs::Version(*ver).minor(),
                    cap.mgaw_bits(),
                    cap.domains_supported(),
                    cap.fault_record_count()
                );
                crate::console::event(&ev::IommuUnit {
                    unit: i as u32,
                    kind: "vt-d",
                    base: Hex(u.base),
                    ver: Hex(u64::from(*ver)),
                    cap: Some(Hex(cap.0)),
                    ecap: Some(Hex(ecap.0)),
                    sagaw: Some(Hex(u64::from(cap.sagaw()))),
                    levels: Some(List(&levels)),
                    mgaw: Some(cap.mgaw_bits()),
                    nd: Some(cap.nd()),
                    domains: Some(cap.domains_supported()),
                    nfr: Some(cap.fault_record_count()),
                    fro: Some(Hex(cap.fault_record_offset() as u64)),
                    iotlb: Some(Hex(ecap.iotlb_offset() as u64)),
                    cm: Some(cap.cm()),
                    c: Some(ecap.c()),
                    qi: Some(ecap.qi()),
                    ir: Some(ecap.ir()),
                    pt: Some(ecap.pt()),
                    include_all: Some(*include_all),
                    efr: None,
                    scopes: List(&scopes),
                });
            }
            Kind::AmdVi {
                ivhd_type,
                features,
            } => {
                log!(
                    "amd-vi unit {} at {:#x}: IVHD type {:#x}",
                    i,
                    u.base,
                    ivhd_type
                );
                crate::console::event(&ev::IommuUnit {
                    unit: i as u32,
                    kind: "amd-vi",
                    base: Hex(u.base),
                    ver: Hex(u64::from(*ivhd_type)),
                    cap: None,
                    ecap: None,
                    sagaw: None,
                    levels: None,
                    mgaw: None,
                    nd: None,
                    domains: None,
                    nfr: None,
                    fro: None,
                    iotlb: None,
                    cm: None,
                    c: None,
                    qi: None,
                    ir: None,
                    pt: None,
                    include_all: None,
                    efr: Some(Hex(*features)),
                    scopes: List(&scopes),
                });
            }
        }
    }
}
