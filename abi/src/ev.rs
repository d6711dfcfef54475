//! `EV` events: one JSON object per line on the serial console.
//!
//! ```text
//! EV {"ev":"pci","bdf":"00:03.0","vendor":"0x1af4","device":"0x1042",...}
//! ```
//!
//! Tests and tools read these lines, so every event is declared once, in the
//! [`events!`] block below: the macro produces the Rust struct that ring 0
//! fills in and the [`EventSchema`] that the host harness checks each line
//! against. An event marked `ring0` may only be printed by the hypervisor
//! about itself; a domain that asks to print one is refused.
//!
//! A field that carries a hardware code is a [`Code`]: it is written as the
//! code's name under the field's own name plus the raw value under
//! `NAME_raw`, so a reader gets both without a table of its own.

use core::fmt::{self, Write};

pub use crate::pci::Bdf;

/// What starts every event line on the console.
pub const PREFIX: &str = "EV ";

/// The JSON shape of one field, as the schema promises it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A JSON string.
    Str,
    /// A JSON string holding `0x` and lower-case hex digits.
    Hex,
    /// A JSON integer.
    Int,
    /// `true` or `false`.
    Bool,
    /// A JSON array.
    Array,
    /// A JSON object.
    Object,
    /// A hardware code: a string name, plus `NAME_raw` as a [`Kind::Hex`].
    Code,
}

/// One field of an event.
#[derive(Debug)]
pub struct FieldSchema {
    pub name: &'static str,
    pub kind: Kind,
    /// The field may be left out (it is an `Option` that was `None`).
    pub optional: bool,
}

/// One event: its name, who may print it, and its fields.
#[derive(Debug)]
pub struct EventSchema {
    pub name: &'static str,
    /// Only ring 0 may print it; a domain's request to print it is refused.
    pub ring0: bool,
    pub fields: &'static [FieldSchema],
}

/// Every event airlock prints.
pub fn schema(name: &str) -> Option<&'static EventSchema> {
    ALL.iter().copied().find(|s| s.name == name)
}

/// A value that can be written as one JSON value.
pub trait Value {
    const KIND: Kind;
    /// Whether `None` may stand for it (only `Option` says yes).
    const OPTIONAL: bool = false;
    /// Writes the value itself.
    fn write_json(&self, w: &mut dyn Write) -> fmt::Result;
    /// Writes `"name":value` (and, for codes, the raw sibling) into an object.
    fn write_field(&self, name: &str, obj: &mut Obj<'_>) -> fmt::Result {
        obj.key(name)?;
        self.write_json(obj.w)
    }
}

/// A JSON object being written: `{`, then fields, then [`Obj::end`].
pub struct Obj<'w> {
    w: &'w mut dyn Write,
    first: bool,
}

impl<'w> Obj<'w> {
    pub fn begin(w: &'w mut dyn Write) -> Result<Self, fmt::Error> {
        w.write_char('{')?;
        Ok(Obj { w, first: true })
    }

    fn key(&mut self, name: &str) -> fmt::Result {
        if !self.first {
            self.w.write_char(',')?;
        }
        self.first = false;
        write_str(self.w, name)?;
        self.w.write_char(':')
    }

    /// Writes one field.
    pub fn field<V: Value + ?Sized>(&mut self, name: &str, value: &V) -> fmt::Result {
        value.write_field(name, self)
    }

    pub fn end(self) -> fmt::Result {
        self.w.write_char('}')
    }
}

/// Writes `s` as a JSON string, escaping what JSON requires.
pub fn write_str(w: &mut dyn Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => w.write_str("\\\"")?,
            '\\' => w.write_str("\\\\")?,
            '\n' => w.write_str("\\n")?,
            '\r' => w.write_str("\\r")?,
            '\t' => w.write_str("\\t")?,
            c if (c as u32) < 0x20 || c as u32 == 0x7f => write!(w, "\\u{:04x}", c as u32)?,
            c => w.write_char(c)?,
        }
    }
    w.write_char('"')
}

impl Value for str {
    const KIND: Kind = Kind::Str;
    fn write_json(&self, w: &mut dyn Write) -> fmt::Result {
        write_str(w, self)
    }
}

impl Value for &str {
    const KIND: Kind = Kind::Str;
    fn write_json(&self, w: &mut dyn Write) -> fmt::Result {
        write_str(w, self)
    }
}

impl Value for bool {
    const KIND: Kind = Kind::Bool;
    fn write_json(&self, w: &mut dyn Write) -> fmt::Result {
        w.write_str(if *self { "true" } else { "false" })
    }
}

macro_rules! int_value {
    ($($t:ty),*) => {$(
        impl Value for $t {
            const KIND: Kind = Kind::Int;
            fn write_json(&self, w: &mut dyn Write) -> fmt::Result {
                write!(w, "{}", self)
            }
        }
    )*};
}
int_value!(u8, u16, u32, u64, usize, i8, i16, i32, i64);

impl<T: Value> Value for Option<T> {
    const KIND: Kind = T::KIND;
    const OPTIONAL: bool = true;
    fn write_json(&self, w: &mut dyn Write) -> fmt::Result {
        match self {
            Some(v) => v.write_json(w),
            None => w.write_str("null"),
        }
    }
    fn write_field(&self, name: &str, obj: &mut Obj<'_>) -> fmt::Result {
        match self {
            Some(v) => v.write_field(name, obj),
            None => Ok(()),
        }
    }
}

/// A number written as a `"0x..."` string with at least `DIGITS` hex digits
/// (`Hex::<4>(0x1af4)` is `"0x1af4"`, `Hex::<6>(0x10000)` is `"0x010000"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hex<const DIGITS: usize = 1>(pub u64);

impl<const DIGITS: usize> Value for Hex<DIGITS> {
    const KIND: Kind = Kind::Hex;
    fn write_json(&self, w: &mut dyn Write) -> fmt::Result {
        write!(w, "\"0x{:0width$x}\"", self.0, width = DIGITS)
    }
}

/// A hardware code: its raw value and the name the specification gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Code {
    pub raw: u64,
    pub name: &'static str,
}

impl Value for Code {
    const KIND: Kind = Kind::Code;
    fn write_json(&self, w: &mut dyn Write) -> fmt::Result {
        write_str(w, self.name)
    }
    fn write_field(&self, name: &str, obj: &mut Obj<'_>) -> fmt::Result {
        obj.key(name)?;
        write_str(obj.w, self.name)?;
        // `NAME_raw` without a buffer: write the key by hand.
        obj.w.write_str(",\"")?;
        obj.w.write_str(name)?;
        write!(obj.w, "_raw\":\"0x{:x}\"", self.raw)
    }
}

impl Value for Bdf {
    const KIND: Kind = Kind::Str;
    fn write_json(&self, w: &mut dyn Write) -> fmt::Result {
        write!(w, "\"{}\"", self)
    }
}

/// A JSON array of values.
#[derive(Clone, Copy, Debug)]
pub struct List<'a, T>(pub &'a [T]);

impl<T: Value> Value for List<'_, T> {
    const KIND: Kind = Kind::Array;
    fn write_json(&self, w: &mut dyn Write) -> fmt::Result {
        w.write_char('[')?;
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                w.write_char(',')?;
            }
            v.write_json(w)?;
        }
        w.write_char(']')
    }
}

/// An event: a name from the schema and the fields that fill it.
pub trait Event {
    const SCHEMA: &'static EventSchema;
    fn write_fields(&self, obj: &mut Obj<'_>) -> fmt::Result;
}

/// Writes `EV {...}` (without a newline). `from` is the name of the domain
/// that asked for the event, stamped by the hypervisor; ring 0's own events
/// carry none.
pub fn write_line<E: Event>(w: &mut dyn Write, event: &E, from: Option<&str>) -> fmt::Result {
    w.write_str(PREFIX)?;
    let mut obj = Obj::begin(w)?;
    obj.field("ev", E::SCHEMA.name)?;
    event.write_fields(&mut obj)?;
    obj.field("from", &from)?;
    obj.end()
}

/// Declares events and nested objects: each gets a struct, a [`Value`] or
/// [`Event`] impl, and (for events) an entry in [`ALL`].
macro_rules! events {
    (
        events {
            $(
                $(#[$meta:meta])*
                $ring:ident $name:ident $(<$lt:lifetime>)? = $ev:literal {
                    $( $(#[$fmeta:meta])* $field:ident : $ty:ty ),* $(,)?
                }
            )*
        }
        objects {
            $(
                $(#[$ometa:meta])*
                $oname:ident $(<$olt:lifetime>)? {
                    $( $(#[$ofmeta:meta])* $ofield:ident : $oty:ty ),* $(,)?
                }
            )*
        }
    ) => {
        $(
            $(#[$meta])*
            #[derive(Clone, Debug)]
            pub struct $name $(<$lt>)? { $( $(#[$fmeta])* pub $field: $ty, )* }

            impl $(<$lt>)? Event for $name $(<$lt>)? {
                const SCHEMA: &'static EventSchema = &EventSchema {
                    name: $ev,
                    ring0: events!(@ring $ring),
                    fields: &[ $( FieldSchema {
                        name: stringify!($field),
                        kind: <$ty as Value>::KIND,
                        optional: <$ty as Value>::OPTIONAL,
                    }, )* ],
                };
                fn write_fields(&self, _obj: &mut Obj<'_>) -> fmt::Result {
                    $( _obj.field(stringify!($field), &self.$field)?; )*
                    Ok(())
                }
            }
        )*

        /// The schema of every event, in declaration order.
        pub const ALL: &[&EventSchema] = &[ $( <$name as Event>::SCHEMA, )* ];

        $(
            $(#[$ometa])*
            #[derive(Clone, Debug)]
            pub struct $oname $(<$olt>)? { $( $(#[$ofmeta])* pub $ofield: $oty, )* }

            impl $(<$olt>)? Value for $oname $(<$olt>)? {
                const KIND: Kind = Kind::Object;
                fn write_json(&self, w: &mut dyn Write) -> fmt::Result {
                    let mut _obj = Obj::begin(w)?;
                    $( _obj.field(stringify!($ofield), &self.$ofield)?; )*
                    _obj.end()
                }
            }
        )*
    };
    (@ring ring0) => { true };
    (@ring domain) => { false };
}

events! {
    events {
        /// A region of the PVH memory map and how much the frame allocator got.
        ring0 Memory = "memory" {
            /// Bytes of usable RAM the firmware reported.
            ram_bytes: u64,
            /// Bytes the frame allocator may hand out (RAM less the image,
            /// start_info and the bundle).
            free_bytes: u64,
            /// Bytes kept back: hypervisor image, start_info, modules, low memory.
            reserved_bytes: u64,
            regions: u32,
        }
        /// One entry of the boot bundle, after its checksum was verified.
        ring0 BundleEntry<'a> = "bundle_entry" {
            index: u32,
            kind: &'a str,
            name: &'a str,
            size: u64,
            crc32: Hex<8>,
        }
        /// One PCI function found by ECAM enumeration.
        ring0 Pci<'a> = "pci" {
            bdf: Bdf,
            vendor: Hex<4>,
            device: Hex<4>,
            /// Class code, subclass and programming interface.
            class: Hex<6>,
            /// What the class code means ("mass-storage", "network", ...).
            class_name: &'a str,
            header_type: u8,
            bars: List<'a, Bar<'a>>,
            /// The remapping unit whose scope holds this function, if any.
            iommu_unit: Option<u32>,
        }
        /// One DMA remapping unit, from ACPI and its own registers.
        ring0 IommuUnit<'a> = "iommu_unit" {
            unit: u32,
            /// "vt-d" or "amd-vi".
            kind: &'a str,
            base: Hex<8>,
            /// VT-d: the VER register. AMD-Vi: the IVHD block type, which
            /// says which revision of the IVHD format (and EFR image) applies.
            ver: Hex<2>,
            cap: Option<Hex<16>>,
            ecap: Option<Hex<16>>,
            /// Supported adjusted guest address widths (CAP.SAGAW), raw bits.
            sagaw: Option<Hex<2>>,
            /// Page-table levels SAGAW allows (3 = 39-bit, 4 = 48-bit, 5 = 57-bit).
            levels: Option<List<'a, u8>>,
            /// Maximum guest address width in bits (CAP.MGAW + 1).
            mgaw: Option<u8>,
            /// CAP.ND, raw; `domains` is what it means.
            nd: Option<u8>,
            domains: Option<u32>,
            /// Number of fault recording registers (CAP.NFR + 1).
            nfr: Option<u16>,
            /// Fault recording register offset in bytes (CAP.FRO * 16).
            fro: Option<Hex<3>>,
            /// IOTLB register offset in bytes (ECAP.IRO * 16).
            iotlb: Option<Hex<3>>,
            /// Caching mode: not-present entries may be cached.
            cm: Option<bool>,
            /// Page walks are coherent (ECAP.C); if false, flush table writes.
            c: Option<bool>,
            qi: Option<bool>,
            ir: Option<bool>,
            pt: Option<bool>,
            /// The unit covers every PCI device not named by another unit.
            include_all: Option<bool>,
            /// AMD-Vi: the IVHD's feature-reporting field (or EFR image).
            efr: Option<Hex<16>>,
            scopes: List<'a, Scope>,
        }
        /// Boot is done: every inventory line above was printed.
        ring0 Ready = "ready" {
            /// Milliseconds since the hypervisor's entry, from the TSC.
            t_ms: u64,
            tsc_khz: u64,
        }
        /// The system stops, and why.
        ring0 Shutdown<'a> = "shutdown" {
            /// What QEMU's exit status will say: 0 success, 1 failure.
            status: u32,
            reason: &'a str,
        }
        /// A check at boot failed; the system stops with a failure status.
        ring0 BootError<'a> = "boot_error" {
            /// What was being checked ("bundle", "manifest", "acpi", ...).
            stage: &'a str,
            error: &'a str,
        }
        /// A CPU exception in ring 0: always fatal.
        ring0 Exception = "exception" {
            vector: Code,
            error_code: Hex,
            rip: Hex<16>,
            cr2: Hex<16>,
        }
        /// A panic in ring 0: always fatal.
        ring0 Panic<'a> = "panic" {
            msg: &'a str,
        }
        /// A domain was built from its image and is about to run.
        ring0 DomainStart<'a> = "domain_start" {
            domain: &'a str,
            domid: u16,
            label: &'a str,
            image: &'a str,
            /// All the memory it was given (bytes).
            mem_bytes: u64,
            /// Physical address of its first frame (frames are contiguous).
            mem_phys: Hex<8>,
            weight: u16,
        }
        /// A CPU exception in ring 3 ended a domain.
        ring0 DomainFault<'a> = "domain_fault" {
            domain: &'a str,
            /// The exception vector (14 page fault, 13 general protection, 6 invalid opcode...).
            vector: u8,
            vector_name: &'a str,
            error_code: Hex,
            rip: Hex<16>,
            /// The faulting address (CR2) for a page fault, else 0.
            addr: Hex<16>,
        }
        /// A domain ended: by `exit` (status as given) or by a fault (status -1).
        ring0 DomainExit<'a> = "domain_exit" {
            domain: &'a str,
            status: i64,
            /// "exit" or "fault".
            reason: &'a str,
            /// Whether this is how the manifest expected it to end.
            expected: bool,
        }
        /// A domain's hypercalls, counted by the hypervisor when it ends.
        ring0 Hypercalls<'a> = "hypercalls" {
            domain: &'a str,
            calls: u64,
            /// Calls answered with an error code.
            refused: u64,
        }
        /// CPU time a domain used, charged by the scheduler, printed at shutdown.
        ring0 DomainCpu<'a> = "domain_cpu" {
            domain: &'a str,
            weight: u16,
            cpu_ns: u64,
            /// Times the domain was put on the CPU.
            dispatches: u64,
        }
        /// A remapping unit is translating: its settings read back from
        /// the unit's registers.
        ring0 IommuEnabled<'a> = "iommu_enabled" {
            unit: u32,
            /// The global status register, raw.
            gsts: Hex<8>,
            translation: bool,
            /// Queued invalidation in use (else register-based).
            qi: bool,
            interrupt_remapping: bool,
            /// Compatibility-format interrupts are blocked (GSTS.CFIS clear).
            compat_blocked: bool,
            /// Page-table levels of the second-level tables.
            levels: u8,
            /// The interrupt-remapping table: physical address and entries.
            irta: Hex<16>,
            ir_entries: u32,
            /// "register" or "queued".
            invalidation: &'a str,
        }
        /// A PCI function was given to a domain: its context entry, read back
        /// from the live tables.
        ring0 DeviceAssign<'a> = "device_assign" {
            bdf: Bdf,
            domain: &'a str,
            /// The IOMMU domain id in the context entry.
            did: u32,
            /// "static" or "strict".
            dma: &'a str,
            levels: u8,
            /// Bytes of the domain's memory reachable by DMA at boot.
            mapped_bytes: u64,
            /// The interrupt-remapping entries given to it (one per MSI-X vector).
            irtes: u32,
        }
        /// One function's context entry as the live tables hold it, for
        /// every enumerated function: present only for assigned ones.
        ring0 IommuContext = "iommu_context" {
            unit: u32,
            bdf: Bdf,
            present: bool,
            did: u32,
        }
        /// A DMA or interrupt request the remapping unit refused, from its
        /// fault recording registers.
        ring0 IommuFault<'a> = "iommu_fault" {
            unit: u32,
            /// The requester id of the faulting request.
            source: Bdf,
            /// The page address the request aimed at.
            addr: Hex<16>,
            /// The fault reason: its name and `reason_raw`.
            reason: Code,
            /// "read" or "write".
            access: &'a str,
            /// The domain that owns `source`, or "none".
            domain: &'a str,
            /// The fault recording register, both halves, raw.
            record_lo: Hex<16>,
            record_hi: Hex<16>,
        }
        /// A physical range the manifest asked the hypervisor to watch:
        /// its CRC-32 before the domains run and after they end.
        ring0 Watch<'a> = "watch" {
            name: &'a str,
            addr: Hex<16>,
            len: u64,
            crc32: Hex<8>,
            /// "before" or "after".
            when: &'a str,
        }
        /// An interrupt arrived on a vector nobody owns.
        ring0 StrayInterrupt = "stray_interrupt" {
            vector: u8,
            count: u64,
        }
        /// A domain asked for a config write the hypervisor keeps for itself.
        ring0 ConfigRefused<'a> = "config_refused" {
            domain: &'a str,
            bdf: Bdf,
            offset: Hex<3>,
            /// What the register is ("bar", "msix", "msi", "rom", "unknown").
            what: &'a str,
        }

        /// The security policy refused a grant map, grant copy or event
        /// bind: `subject` (the acting domain's label) may not do `perm` to
        /// `object` (the other domain's label).
        ring0 GrantDenied<'a> = "grant_denied" {
            /// The acting domain.
            domain: &'a str,
            subject: &'a str,
            object: &'a str,
            /// "grant_map_read", "grant_map_write", "grant_copy" or "event_bind".
            perm: &'a str,
        }
        /// A grant operation a domain asked for, refused for a reason other
        /// than the policy (summarised per domain at its end).
        ring0 GrantStats<'a> = "grant_stats" {
            domain: &'a str,
            maps: u64,
            unmaps: u64,
            copies: u64,
            copied_bytes: u64,
            /// Operations answered with a status other than okay.
            failed: u64,
        }

        /// What a domain's DMA mappings cost, when it ends (domains with
        /// devices): mappings made and removed in its IOMMU domain, and the
        /// IOTLB invalidations they needed (strict mode's real price).
        ring0 IommuStats<'a> = "iommu_stats" {
            domain: &'a str,
            maps: u64,
            unmaps: u64,
            iotlb_invalidations: u64,
        }

        /// A domain's result from an event-channel exchange.
        domain Pingpong<'a> = "pingpong" {
            role: &'a str,
            sent: u64,
            received: u64,
        }
        /// A domain finished a piece of work.
        domain WorkDone<'a> = "work_done" {
            work: &'a str,
            units: u64,
        }
        /// A domain is about to try an attack (so a log ties the fault that
        /// follows to its case).
        domain Attack<'a> = "attack" {
            case: &'a str,
        }
        /// A hypercall returned something other than what the test table says.
        domain HypercallMismatch<'a> = "hypercall_mismatch" {
            case: &'a str,
            expected: i64,
            got: i64,
        }
        /// A driver domain checked data that went through its device.
        domain DataCheck<'a> = "data_check" {
            /// What was checked ("blk-read", "blk-write", "dma-control", ...).
            what: &'a str,
            bytes: u64,
            ok: bool,
        }
        /// A throughput measurement a domain made of its own I/O.
        domain Throughput<'a> = "throughput" {
            /// What was measured ("blk-seq-read", "blk-seq-write", "blk-rand-read", "tcp-tx", ...).
            what: &'a str,
            bytes: u64,
            requests: u64,
            /// Guest time it took (from `time`).
            ns: u64,
            /// Request size in bytes and requests in flight.
            block: u64,
            depth: u64,
        }
        /// A byte stream a domain sent or received, with a checksum both
        /// ends compute the same way.
        domain Stream<'a> = "stream" {
            /// "tcp-tx", "tcp-rx", ...
            what: &'a str,
            bytes: u64,
            /// CRC-32 (IEEE) of every byte of the stream.
            crc32: Hex<8>,
            ns: u64,
        }
        /// The summary of a table of hostile hypercalls.
        domain HypercallTable = "hypercall_table" {
            cases: u64,
            /// Cases whose expected result is an error.
            expected_refusals: u64,
            mismatches: u64,
        }
    }
    objects {
        /// One base address register of a PCI function.
        Bar<'a> {
            index: u8,
            /// "mem32", "mem64" or "io".
            kind: &'a str,
            addr: Hex<8>,
            size: Hex,
            prefetchable: bool,
        }
        /// One device scope of a remapping unit.
        Scope {
            /// Scope type: pci-endpoint, pci-subhierarchy, ioapic, hpet, ...
            kind: Code,
            /// The function, when the path resolves to one.
            bdf: Option<Bdf>,
            enumeration_id: u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::String;

    fn line<E: Event>(e: &E, from: Option<&str>) -> String {
        let mut s = String::new();
        write_line(&mut s, e, from).unwrap();
        s
    }

    #[test]
    fn pci_line_has_the_fixed_names() {
        let bars = [Bar {
            index: 1,
            kind: "mem32",
            addr: Hex(0xfebd1000),
            size: Hex(0x1000),
            prefetchable: false,
        }];
        let e = Pci {
            bdf: Bdf::new(0, 3, 0),
            vendor: Hex(0x1af4),
            device: Hex(0x1042),
            class: Hex(0x010000),
            class_name: "mass-storage",
            header_type: 0,
            bars: List(&bars),
            iommu_unit: Some(0),
        };
        assert_eq!(
            line(&e, None),
            r#"EV {"ev":"pci","bdf":"00:03.0","vendor":"0x1af4","device":"0x1042","class":"0x010000","class_name":"mass-storage","header_type":0,"bars":[{"index":1,"kind":"mem32","addr":"0xfebd1000","size":"0x1000","prefetchable":false}],"iommu_unit":0}"#
        );
    }

    #[test]
    fn codes_carry_name_and_raw_value() {
        let e = Exception {
            vector: Code {
                raw: 14,
                name: "page-fault",
            },
            error_code: Hex(2),
            rip: Hex(0xffff_ffff_8000_1234),
            cr2: Hex(0),
        };
        assert_eq!(
            line(&e, None),
            r#"EV {"ev":"exception","vector":"page-fault","vector_raw":"0xe","error_code":"0x2","rip":"0xffffffff80001234","cr2":"0x0000000000000000"}"#
        );
    }

    #[test]
    fn strings_are_escaped_and_from_is_stamped() {
        let e = Panic {
            msg: "a \"quoted\"\nline\u{1}",
        };
        assert_eq!(
            line(&e, Some("blk")),
            r#"EV {"ev":"panic","msg":"a \"quoted\"\nline\u0001","from":"blk"}"#
        );
    }

    #[test]
    fn schema_lists_every_event_once() {
        for (i, a) in ALL.iter().enumerate() {
            assert!(
                ALL[i + 1..].iter().all(|b| b.name != a.name),
                "{} twice",
                a.name
            );
            assert!(
                a.fields.iter().all(|f| f.name != "ev" && f.name != "from"),
                "{} shadows ev/from",
                a.name
            );
        }
        let unit = schema("iommu_unit").unwrap();
        assert!(unit.ring0);
        assert_eq!(
            unit.fields.iter().find(|f| f.name == "cap").unwrap().kind,
            Kind::Hex
        );
        assert!(
            unit.fields
                .iter()
                .find(|f| f.name == "cap")
                .unwrap()
                .optional
        );
        assert!(schema("no-such-event").is_none());
    }
}
