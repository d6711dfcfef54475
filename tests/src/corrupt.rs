//! Damaging a packed bundle in a named way, so a scenario can prove that
//! the hypervisor's checks catch it.

use abi::bundle::{self, Bundle, EntryKind};
use abi::crc32::crc32;

use crate::scenario::Corruption;

/// Applies `c` to `bytes` (a valid bundle) and says what it did.
pub fn apply(c: &Corruption, bytes: &mut Vec<u8>) -> Result<String, String> {
    let b = Bundle::parse(bytes).map_err(|e| format!("the bundle to corrupt is invalid: {e}"))?;
    match c {
        Corruption::EntryData(name) => {
            let e = match name {
                Some(n) => b.entries().find(|e| e.name == n.as_str()),
                None => b.entries().find(|e| !e.data.is_empty()),
            };
            let e = e.ok_or_else(|| match name {
                Some(n) => format!("no entry named \"{n}\" to corrupt"),
                None => "no entry with data to corrupt".to_owned(),
            })?;
            if e.data.is_empty() {
                return Err(format!("entry \"{}\" has no data to corrupt", e.name));
            }
            let at = e.offset as usize + e.data.len() / 2;
            let what = format!(
                "flipped byte {at:#x} in entry {} (\"{}\")'s data",
                e.index, e.name
            );
            bytes[at] ^= 0xff;
            Ok(what)
        }
        Corruption::HeaderCrc => {
            bytes[bundle::HEADER_CRC_OFFSET] ^= 1;
            Ok("flipped a bit of the header CRC".into())
        }
        Corruption::BadMagic => {
            bytes[..8].copy_from_slice(b"NOTABNDL");
            Ok("overwrote the magic".into())
        }
        Corruption::BadVersion => {
            bytes[8..10].copy_from_slice(&0x7fffu16.to_le_bytes());
            Ok("set the format version to 0x7fff".into())
        }
        Corruption::Truncate => {
            let n = bytes.len().saturating_sub(8);
            bytes.truncate(n);
            Ok("cut the last 8 bytes".into())
        }
        Corruption::ManifestContent => {
            let e = b
                .entries()
                .find(|e| e.kind == EntryKind::Manifest)
                .ok_or("the bundle has no manifest to corrupt")?;
            let (index, start, len) = (e.index as usize, e.offset as usize, e.data.len());
            if len == 0 {
                return Err("the manifest entry is empty".into());
            }
            bytes[start] ^= 0xff;
            let crc = crc32(&bytes[start..start + len]);
            let rec = bundle::HEADER_SIZE + index * bundle::ENTRY_SIZE;
            bytes[rec + 4..rec + 8].copy_from_slice(&crc.to_le_bytes());
            bundle::reseal_header(bytes);
            Ok("damaged the compiled manifest's magic and resealed the bundle's CRCs".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::bundle::{Builder, BundleError, Item};

    fn good() -> Vec<u8> {
        let items = [
            Item {
                kind: EntryKind::Manifest,
                name: "manifest",
                data: b"AIRLOCKM and more",
            },
            Item {
                kind: EntryKind::Image,
                name: "blk",
                data: b"\x7fELF",
            },
        ];
        let b = Builder::new(&items);
        let mut v = vec![0; b.size().unwrap()];
        b.write(&mut v).unwrap();
        v
    }

    fn corrupted(c: &str) -> Result<Bundle<'static>, BundleError> {
        let mut v = good();
        apply(&Corruption::parse(c).unwrap(), &mut v).unwrap();
        Bundle::parse(Box::leak(v.into_boxed_slice()))
    }

    #[test]
    fn each_corruption_trips_its_check() {
        assert!(
            matches!(corrupted("entry-data"), Err(BundleError::EntryCrc { entry, .. }) if entry.index == 0)
        );
        assert!(
            matches!(corrupted("entry-data:blk"), Err(BundleError::EntryCrc { entry, .. }) if entry.index == 1)
        );
        assert!(matches!(
            corrupted("header-crc"),
            Err(BundleError::HeaderCrc { .. })
        ));
        assert!(matches!(
            corrupted("bad-magic"),
            Err(BundleError::BadMagic { .. })
        ));
        assert!(matches!(
            corrupted("bad-version"),
            Err(BundleError::UnknownVersion { found: 0x7fff })
        ));
        assert!(matches!(
            corrupted("truncate"),
            Err(BundleError::Truncated { .. })
        ));
        let b = corrupted("manifest-content").unwrap();
        assert!(b.manifest().unwrap().starts_with(b"\xbeIRLOCKM"));
    }

    #[test]
    fn a_missing_entry_is_an_error() {
        let mut v = good();
        let e = apply(&Corruption::EntryData(Some("net".into())), &mut v).unwrap_err();
        assert_eq!(e, "no entry named \"net\" to corrupt");
        let mut junk = vec![0u8; 10];
        assert!(apply(&Corruption::HeaderCrc, &mut junk)
            .unwrap_err()
            .contains("invalid"));
    }
}
