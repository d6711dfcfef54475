//! Names for PCI class codes, for the inventory.

/// The name of a PCI base class (the class code's top byte).
pub fn class_name(class: u8) -> &'static str {
    match class {
        0x00 => "unclassified",
        0x01 => "mass-storage",
        0x02 => "network",
        0x03 => "display",
        0x04 => "multimedia",
        0x05 => "memory",
        0x06 => "bridge",
        0x07 => "communication",
        0x08 => "system-peripheral",
        0x09 => "input",
        0x0a => "docking-station",
        0x0b => "processor",
        0x0c => "serial-bus",
        0x0d => "wireless",
        0x0e => "intelligent-io",
        0x0f => "satellite",
        0x10 => "encryption",
        0x11 => "signal-processing",
        0x12 => "processing-accelerator",
        0x13 => "non-essential-instrumentation",
        0xff => "vendor-specific",
        _ => "reserved",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert_eq!(super::class_name(0x01), "mass-storage");
        assert_eq!(super::class_name(0x02), "network");
        assert_eq!(super::class_name(0x42), "reserved");
    }
}
