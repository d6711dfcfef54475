//! `[test.disk]`: the disk image of a scenario's virtio-blk, written
//! before boot and checked after QEMU exits.
//!
//! Before boot the image is made again from nothing: `size` bytes of
//! zeros, then each `fill` region written with its pattern. After QEMU
//! exits each `expect` region must hold its pattern (or zeros). The
//! patterns are `driver_domains::blk_pattern`, the same function the blk
//! driver domain verifies and writes with, so a sector in the wrong place
//! or from the wrong pattern is caught.
//!
//! Everything but the two `*_file` functions works on any `Read`/`Write` +
//! `Seek`, and is tested on in-memory images.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::Path;

pub use driver_domains::blk_pattern;
use driver_domains::blk_pattern::SECTOR;

/// What a region holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// `blk_pattern` of this name.
    Pattern(String),
    /// Zeros (spelled `pattern = "zero"`).
    Zero,
}

impl Content {
    /// The spelling that means zeros.
    pub const ZERO: &'static str = "zero";

    /// `"zero"` or a pattern name; `None` if the name is not one
    /// `blk_pattern` takes.
    pub fn parse(s: &str) -> Option<Self> {
        if s == Self::ZERO {
            Some(Content::Zero)
        } else {
            blk_pattern::valid_name(s).then(|| Content::Pattern(s.to_owned()))
        }
    }

    /// Sector `sector` of this content.
    pub fn sector(&self, sector: u64) -> [u8; SECTOR] {
        match self {
            Content::Pattern(p) => blk_pattern::sector(p, sector),
            Content::Zero => [0; SECTOR],
        }
    }
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Content::Pattern(p) => write!(f, "pattern {p}"),
            Content::Zero => f.write_str("zeros"),
        }
    }
}

/// Sectors `sectors` (end exclusive) hold `content`: disk sector
/// `sectors.start + k` holds the content's sector `base + k`. `base` is
/// `sectors.start` unless the pattern was written through a vbd, whose
/// sector 0 sits elsewhere on the disk (`base = 0`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub sectors: Range<u64>,
    pub content: Content,
    pub base: u64,
}

impl Region {
    /// `content` at its own sector numbers.
    pub fn new(sectors: Range<u64>, content: Content) -> Self {
        Region {
            base: sectors.start,
            sectors,
            content,
        }
    }

    /// What disk sector `s` (inside `sectors`) should hold.
    pub fn sector(&self, s: u64) -> [u8; SECTOR] {
        self.content
            .sector(self.base.wrapping_add(s.wrapping_sub(self.sectors.start)))
    }

    fn describe(&self) -> String {
        if self.base == self.sectors.start || self.content == Content::Zero {
            self.content.to_string()
        } else {
            format!("{} from its sector {}", self.content, self.base)
        }
    }
}

/// A scenario's `[test.disk]`, checked by xtask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// The virtio-blk's PCI address ("03.0"), for messages.
    pub device: String,
    /// Its image, as the manifest spells it (xtask makes it absolute).
    pub path: String,
    /// The image's size in bytes (its `[[device]] size`).
    pub size: u64,
    pub fill: Vec<Region>,
    pub expect: Vec<Region>,
}

/// Writes each region of `fill` into `image` (which the caller has zeroed).
pub fn write_regions(image: &mut (impl Write + Seek), fill: &[Region]) -> io::Result<()> {
    for r in fill {
        image.seek(SeekFrom::Start(r.sectors.start * SECTOR as u64))?;
        let mut w = io::BufWriter::new(&mut *image);
        for s in r.sectors.clone() {
            w.write_all(&r.sector(s))?;
        }
        w.flush()?;
    }
    Ok(())
}

/// Most wrong sectors listed per region.
const LISTED: usize = 4;

/// One line per region of `expect` that `image` does not hold; each names
/// how many sectors are wrong and the first few, with what they hold.
pub fn check_regions(image: &mut (impl Read + Seek), expect: &[Region]) -> Vec<String> {
    let mut failures = Vec::new();
    for r in expect {
        let mut wrong: Vec<String> = Vec::new();
        let mut count = 0u64;
        let mut got = [0u8; SECTOR];
        let start = r.sectors.start * SECTOR as u64;
        if let Err(e) = image.seek(SeekFrom::Start(start)) {
            failures.push(format!("disk: sectors {:?}: cannot seek: {e}", r.sectors));
            continue;
        }
        let mut reader = io::BufReader::with_capacity(1 << 16, &mut *image);
        for s in r.sectors.clone() {
            if let Err(e) = reader.read_exact(&mut got) {
                failures.push(format!(
                    "disk: sectors {:?} should hold {}: sector {s} cannot be read ({e})",
                    r.sectors,
                    r.describe()
                ));
                count = 0;
                wrong.clear();
                break;
            }
            if got != r.sector(s) {
                count += 1;
                if wrong.len() < LISTED {
                    wrong.push(format!("{s} ({})", describe(&got)));
                }
            }
        }
        if count > 0 {
            failures.push(format!(
                "disk: sectors {:?} should hold {}, but {count} of them do not: {}{}",
                r.sectors,
                r.describe(),
                wrong.join(", "),
                if count as usize > wrong.len() {
                    ", ..."
                } else {
                    ""
                }
            ));
        }
    }
    failures
}

/// What a sector looks like: zeros, a pattern's sector, or other bytes.
pub fn describe(sector: &[u8; SECTOR]) -> String {
    if sector.iter().all(|&b| b == 0) {
        return "zeros".into();
    }
    if sector.starts_with(blk_pattern::MAGIC) {
        let name: String = sector[blk_pattern::MAGIC.len()..16]
            .iter()
            .take_while(|&&b| b != 0)
            .map(|&b| char::from(b))
            .collect();
        let mut no = [0u8; 8];
        no.copy_from_slice(&sector[16..24]);
        let no = u64::from_le_bytes(no);
        let exact =
            blk_pattern::valid_name(&name) && blk_pattern::mismatch(&name, no, sector).is_none();
        return format!(
            "pattern {name} sector {no}{}",
            if exact { "" } else { ", damaged" }
        );
    }
    format!("other data, starting {:02x?}", &sector[..8])
}

/// Makes the image again: `size` bytes of zeros, then the `fill` regions.
pub fn prepare_file(file: &Path, spec: &DiskSpec) -> Result<(), String> {
    let what = |e: io::Error| format!("disk {}: {e}", file.display());
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(what)?;
    }
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(file)
        .map_err(what)?;
    f.set_len(spec.size).map_err(what)?;
    write_regions(&mut f, &spec.fill).map_err(what)?;
    f.sync_all().map_err(what)
}

/// The `expect` regions checked against the image QEMU left.
pub fn check_file(file: &Path, spec: &DiskSpec) -> Vec<String> {
    match std::fs::File::open(file) {
        Ok(mut f) => check_regions(&mut f, &spec.expect),
        Err(e) => vec![format!("disk {}: cannot open: {e}", file.display())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn region(sectors: Range<u64>, c: &str) -> Region {
        Region::new(sectors, Content::parse(c).unwrap())
    }

    #[test]
    fn contents() {
        assert_eq!(Content::parse("zero"), Some(Content::Zero));
        assert_eq!(Content::parse("A"), Some(Content::Pattern("A".into())));
        assert_eq!(Content::parse("no spaces"), None);
        assert_eq!(Content::parse(""), None);
        assert_eq!(Content::Zero.sector(7), [0; SECTOR]);
        assert_eq!(
            Content::Pattern("B".into()).sector(7),
            blk_pattern::sector("B", 7)
        );
    }

    /// The blk-direct scenario: A written at 0..64; the domain writes B at
    /// 64..128; the rest stays zero.
    #[test]
    fn a_good_run_passes() {
        let mut img = Cursor::new(vec![0u8; 256 * SECTOR]);
        write_regions(&mut img, &[region(0..64, "A")]).unwrap();
        assert_eq!(&img.get_ref()[..SECTOR], &blk_pattern::sector("A", 0));
        assert_eq!(
            &img.get_ref()[63 * SECTOR..64 * SECTOR],
            &blk_pattern::sector("A", 63)
        );
        assert!(img.get_ref()[64 * SECTOR..].iter().all(|&b| b == 0));
        // What the driver domain does.
        write_regions(&mut img, &[region(64..128, "B")]).unwrap();
        let expect = [
            region(0..64, "A"),
            region(64..128, "B"),
            region(128..256, "zero"),
        ];
        assert_eq!(check_regions(&mut img, &expect), Vec::<String>::new());
        // The image is not longer than written.
        assert_eq!(img.get_ref().len(), 256 * SECTOR);
    }

    #[test]
    fn wrong_sectors_are_named() {
        let mut img = Cursor::new(vec![0u8; 256 * SECTOR]);
        write_regions(&mut img, &[region(0..64, "A")]).unwrap();
        // A's sector 3 where sector 2 belongs.
        img.get_mut()[2 * SECTOR..3 * SECTOR].copy_from_slice(&blk_pattern::sector("A", 3));
        // B's sectors 64..128 written one sector too far, one byte damaged.
        for s in 64..128u64 {
            let at = (s as usize + 1) * SECTOR;
            img.get_mut()[at..at + SECTOR].copy_from_slice(&blk_pattern::sector("B", s));
        }
        img.get_mut()[66 * SECTOR + 100] ^= 1;
        let expect = [
            region(0..64, "A"),
            region(64..128, "B"),
            region(128..256, "zero"),
        ];
        let f = check_regions(&mut img, &expect);
        assert_eq!(f.len(), 3, "{f:#?}");
        assert_eq!(
            f[0],
            "disk: sectors 0..64 should hold pattern A, but 1 of them do not: 2 (pattern A sector 3)"
        );
        assert_eq!(
            f[1],
            "disk: sectors 64..128 should hold pattern B, but 64 of them do not: \
             64 (zeros), 65 (pattern B sector 64), 66 (pattern B sector 65, damaged), \
             67 (pattern B sector 66), ..."
        );
        assert_eq!(
            f[2],
            "disk: sectors 128..256 should hold zeros, but 1 of them do not: 128 (pattern B sector 127)"
        );
    }

    /// A vbd at disk sector 100: its sectors 0..8 hold A's sectors 0..8.
    #[test]
    fn regions_written_through_a_vbd() {
        let mut img = Cursor::new(vec![0u8; 200 * SECTOR]);
        let vbd = Region {
            base: 0,
            ..region(100..108, "A")
        };
        write_regions(&mut img, std::slice::from_ref(&vbd)).unwrap();
        assert_eq!(
            &img.get_ref()[100 * SECTOR..101 * SECTOR],
            &blk_pattern::sector("A", 0)
        );
        assert!(check_regions(&mut img, std::slice::from_ref(&vbd)).is_empty());
        let f = check_regions(&mut img, &[region(100..108, "A")]);
        assert_eq!(
            f,
            [
                "disk: sectors 100..108 should hold pattern A, but 8 of them do not: \
              100 (pattern A sector 0), 101 (pattern A sector 1), 102 (pattern A sector 2), \
              103 (pattern A sector 3), ..."
            ]
        );
        let f = check_regions(
            &mut img,
            &[Region {
                base: 1,
                ..region(100..101, "A")
            }],
        );
        assert_eq!(
            f,
            ["disk: sectors 100..101 should hold pattern A from its sector 1, but 1 of them do not: \
              100 (pattern A sector 0)"]
        );
    }

    #[test]
    fn a_short_image_fails() {
        let mut img = Cursor::new(vec![0u8; 10 * SECTOR]);
        let f = check_regions(&mut img, &[region(8..12, "zero")]);
        assert_eq!(f.len(), 1);
        assert!(
            f[0].starts_with("disk: sectors 8..12 should hold zeros: sector 10 cannot be read"),
            "{}",
            f[0]
        );
    }

    #[test]
    fn other_bytes_are_described() {
        let mut s = [0u8; SECTOR];
        s[0] = 0xeb;
        assert_eq!(
            describe(&s),
            "other data, starting [eb, 00, 00, 00, 00, 00, 00, 00]"
        );
    }

    #[test]
    fn files_are_made_again_and_checked() {
        let dir = std::env::temp_dir().join(format!("airlock-disk-test-{}", std::process::id()));
        let file = dir.join("d.img");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&file, vec![0xffu8; 300 * SECTOR]).unwrap();
        let spec = DiskSpec {
            device: "03.0".into(),
            path: "d.img".into(),
            size: 200 * SECTOR as u64,
            fill: vec![region(0..4, "A")],
            expect: vec![region(0..4, "A"), region(4..200, "zero")],
        };
        prepare_file(&file, &spec).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 200 * SECTOR as u64);
        assert!(check_file(&file, &spec).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
