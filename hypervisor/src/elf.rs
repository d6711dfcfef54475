//! A domain's ELF image: checked and described, never trusted.
//!
//! The boot bundle is trusted, but the hypervisor checks each image as if
//! it were not: a static x86-64 executable (`ET_EXEC`, ELF64, little-endian)
//! whose `PT_LOAD` segments all lie in `[IMAGE_BASE, USER_LIMIT)`, each with
//! its file bytes inside the file, none both writable and executable, no two
//! sharing a page (so each page gets exactly one segment's permissions), and
//! an entry point inside an executable segment.
//!
//! Alignment: a segment's `p_vaddr` and `p_offset` must be congruent modulo
//! the page size (the ELF rule, which the linkers' default layouts keep);
//! the vaddr itself need not be page-aligned. The loader copies `filesz`
//! bytes from `file_offset` to `vaddr` in fresh zeroed pages covering
//! `[page_start, page_end)`, so the bytes around the segment in its first
//! and last page are zero.
//!
//! Program headers other than `PT_LOAD` (notes, `PT_GNU_STACK`, ...) are
//! ignored, and so are `PT_LOAD`s with a `memsz` of zero (they map nothing).

use crate::layout::{align_down, align_up, PAGE_SIZE};
use abi::domain::{IMAGE_BASE, USER_LIMIT};
use core::fmt;

/// The most `PT_LOAD` segments an image may have.
pub const MAX_SEGMENTS: usize = 8;

/// Bytes of the ELF64 file header.
pub const EHDR_SIZE: usize = 64;
/// Bytes of one ELF64 program header.
pub const PHDR_SIZE: usize = 56;

const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;

/// One loadable segment, as the loader maps it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Where its first byte goes.
    pub vaddr: u64,
    /// Bytes in memory (`filesz` from the file, the rest zero).
    pub memsz: u64,
    /// Where its bytes start in the file.
    pub file_offset: u64,
    /// Bytes taken from the file.
    pub filesz: u64,
    /// `PF_R`.
    pub read: bool,
    /// `PF_W`.
    pub write: bool,
    /// `PF_X`.
    pub exec: bool,
}

impl Segment {
    /// The first page the segment touches.
    pub const fn page_start(&self) -> u64 {
        align_down(self.vaddr, PAGE_SIZE)
    }

    /// One past the last page the segment touches. Checked images keep
    /// `vaddr + memsz` below `USER_LIMIT`, so this cannot overflow.
    pub fn page_end(&self) -> u64 {
        let end = self.vaddr.saturating_add(self.memsz);
        align_up(end, PAGE_SIZE).unwrap_or(align_down(u64::MAX, PAGE_SIZE))
    }

    /// The segment's file bytes within `elf` (the bytes it was checked
    /// against); empty if they are not there.
    pub fn data<'a>(&self, elf: &'a [u8]) -> &'a [u8] {
        let start = usize::try_from(self.file_offset).unwrap_or(usize::MAX);
        let len = usize::try_from(self.filesz).unwrap_or(usize::MAX);
        start
            .checked_add(len)
            .and_then(|end| elf.get(start..end))
            .unwrap_or_default()
    }

    fn contains(&self, addr: u64) -> bool {
        addr >= self.vaddr && addr - self.vaddr < self.memsz
    }
}

/// A checked image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Image {
    /// The entry point (inside an executable segment).
    pub entry: u64,
    /// The first page of the lowest segment.
    pub start: u64,
    /// One past the last page of the highest segment.
    pub end: u64,
    segs: [Segment; MAX_SEGMENTS],
    count: usize,
}

impl Image {
    /// The `PT_LOAD` segments, lowest address first.
    pub fn segments(&self) -> &[Segment] {
        self.segs.get(..self.count).unwrap_or_default()
    }

    /// Checks `elf` and describes what to load.
    pub fn parse(elf: &[u8]) -> Result<Image, ElfError> {
        if elf.len() < EHDR_SIZE {
            return Err(ElfError::TooShort { len: elf.len() });
        }
        if elf[0..4] != *b"\x7fELF" {
            return Err(ElfError::BadMagic);
        }
        if elf[4] != 2 {
            return Err(ElfError::NotElf64 { class: elf[4] });
        }
        if elf[5] != 1 {
            return Err(ElfError::NotLittleEndian { data: elf[5] });
        }
        if elf[6] != 1 {
            return Err(ElfError::BadVersion {
                version: u32::from(elf[6]),
            });
        }
        let e_type = u16_at(elf, 16);
        if e_type != ET_EXEC {
            return Err(ElfError::NotExecutable { e_type });
        }
        let machine = u16_at(elf, 18);
        if machine != EM_X86_64 {
            return Err(ElfError::NotX86_64 { machine });
        }
        let version = u32_at(elf, 20);
        if version != 1 {
            return Err(ElfError::BadVersion { version });
        }
        let entry = u64_at(elf, 24);
        let phoff = u64_at(elf, 32);
        let ehsize = u16_at(elf, 52);
        if usize::from(ehsize) != EHDR_SIZE {
            return Err(ElfError::BadHeaderSize { size: ehsize });
        }
        let phentsize = u16_at(elf, 54);
        let phnum = u16_at(elf, 56);
        if usize::from(phentsize) != PHDR_SIZE {
            return Err(ElfError::BadPhdrSize { size: phentsize });
        }
        let table = usize::try_from(phoff)
            .ok()
            .and_then(|start| Some((start, start.checked_add(usize::from(phnum) * PHDR_SIZE)?)))
            .and_then(|(start, end)| elf.get(start..end))
            .ok_or(ElfError::PhdrsOutsideFile {
                phoff,
                phnum,
                len: elf.len(),
            })?;

        let mut segs = [Segment::default(); MAX_SEGMENTS];
        // The program header index of each segment, for error messages.
        let mut index = [0usize; MAX_SEGMENTS];
        let mut count = 0;
        for (phdr, ph) in table.chunks_exact(PHDR_SIZE).enumerate() {
            let memsz = u64_at(ph, 40);
            if u32_at(ph, 0) != PT_LOAD || memsz == 0 {
                continue;
            }
            let seg = load_segment(elf, phdr, ph)?;
            if count == MAX_SEGMENTS {
                return Err(ElfError::TooManySegments { phdr });
            }
            for (i, other) in segs[..count].iter().enumerate() {
                if seg.page_start() < other.page_end() && other.page_start() < seg.page_end() {
                    return Err(ElfError::SharedPage {
                        phdr,
                        other: index[i],
                    });
                }
            }
            // Keep them sorted by address (insertion; there are at most 8).
            let at = segs[..count]
                .iter()
                .position(|s| s.vaddr > seg.vaddr)
                .unwrap_or(count);
            segs.copy_within(at..count, at + 1);
            index.copy_within(at..count, at + 1);
            segs[at] = seg;
            index[at] = phdr;
            count += 1;
        }
        let segments = &segs[..count];
        let (Some(first), Some(last)) = (segments.first(), segments.last()) else {
            return Err(ElfError::NoSegments);
        };
        if !segments.iter().any(|s| s.exec && s.contains(entry)) {
            return Err(ElfError::EntryNotExecutable { entry });
        }
        Ok(Image {
            entry,
            start: first.page_start(),
            end: last.page_end(),
            segs,
            count,
        })
    }
}

/// Why an image was refused. `phdr` is the index of the program header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// Fewer bytes than the ELF header.
    TooShort { len: usize },
    /// The first four bytes are not `\x7fELF`.
    BadMagic,
    /// `EI_CLASS` is not ELFCLASS64 (2).
    NotElf64 { class: u8 },
    /// `EI_DATA` is not ELFDATA2LSB (1).
    NotLittleEndian { data: u8 },
    /// `EI_VERSION` or `e_version` is not 1.
    BadVersion { version: u32 },
    /// `e_type` is not ET_EXEC (2): not a static executable.
    NotExecutable { e_type: u16 },
    /// `e_machine` is not EM_X86_64 (62).
    NotX86_64 { machine: u16 },
    /// `e_ehsize` is not 64.
    BadHeaderSize { size: u16 },
    /// `e_phentsize` is not 56.
    BadPhdrSize { size: u16 },
    /// The program header table runs past the end of the file.
    PhdrsOutsideFile { phoff: u64, phnum: u16, len: usize },
    /// No `PT_LOAD` segment with any bytes.
    NoSegments,
    /// More than [`MAX_SEGMENTS`] `PT_LOAD` segments.
    TooManySegments { phdr: usize },
    /// The segment starts below `IMAGE_BASE`.
    BelowImageBase { phdr: usize, vaddr: u64 },
    /// `vaddr + memsz` passes `USER_LIMIT` (or overflows).
    PastUserLimit { phdr: usize, vaddr: u64, memsz: u64 },
    /// `filesz > memsz`.
    FileLargerThanMemory {
        phdr: usize,
        filesz: u64,
        memsz: u64,
    },
    /// `[offset, offset + filesz)` is not inside the file (checked only
    /// when `filesz` is not zero).
    OutsideFile {
        phdr: usize,
        offset: u64,
        filesz: u64,
    },
    /// `vaddr` and `offset` differ modulo the page size.
    Misaligned {
        phdr: usize,
        vaddr: u64,
        offset: u64,
    },
    /// The segment shares a page with another.
    SharedPage { phdr: usize, other: usize },
    /// The segment is both writable and executable.
    WriteAndExecute { phdr: usize },
    /// The entry point is in no executable segment.
    EntryNotExecutable { entry: u64 },
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ElfError::*;
        match *self {
            TooShort { len } => write!(f, "elf: {len} bytes, shorter than the {EHDR_SIZE}-byte header"),
            BadMagic => write!(f, "elf: bad magic (not an ELF file)"),
            NotElf64 { class } => write!(f, "elf: class {class}, expected 2 (64-bit)"),
            NotLittleEndian { data } => {
                write!(f, "elf: data encoding {data}, expected 1 (little-endian)")
            }
            BadVersion { version } => write!(f, "elf: version {version}, expected 1"),
            NotExecutable { e_type } => {
                write!(f, "elf: type {e_type}, expected 2 (static executable)")
            }
            NotX86_64 { machine } => write!(f, "elf: machine {machine}, expected 62 (x86-64)"),
            BadHeaderSize { size } => write!(f, "elf: header size {size}, expected {EHDR_SIZE}"),
            BadPhdrSize { size } => {
                write!(f, "elf: program header size {size}, expected {PHDR_SIZE}")
            }
            PhdrsOutsideFile { phoff, phnum, len } => write!(
                f,
                "elf: {phnum} program headers at {phoff:#x} run past the end of the {len}-byte file"
            ),
            NoSegments => write!(f, "elf: no loadable segment"),
            TooManySegments { phdr } => write!(
                f,
                "elf: program header {phdr}: more than {MAX_SEGMENTS} loadable segments"
            ),
            BelowImageBase { phdr, vaddr } => write!(
                f,
                "elf: segment {phdr}: vaddr {vaddr:#x} is below the image base {IMAGE_BASE:#x}"
            ),
            PastUserLimit { phdr, vaddr, memsz } => write!(
                f,
                "elf: segment {phdr}: {vaddr:#x} + {memsz:#x} bytes passes {USER_LIMIT:#x}"
            ),
            FileLargerThanMemory { phdr, filesz, memsz } => write!(
                f,
                "elf: segment {phdr}: file size {filesz:#x} is over memory size {memsz:#x}"
            ),
            OutsideFile {
                phdr,
                offset,
                filesz,
            } => write!(
                f,
                "elf: segment {phdr}: file bytes {offset:#x} + {filesz:#x} are outside the file"
            ),
            Misaligned {
                phdr,
                vaddr,
                offset,
            } => write!(
                f,
                "elf: segment {phdr}: vaddr {vaddr:#x} and offset {offset:#x} differ modulo the page size"
            ),
            SharedPage { phdr, other } => {
                write!(f, "elf: segment {phdr} shares a page with segment {other}")
            }
            WriteAndExecute { phdr } => {
                write!(f, "elf: segment {phdr} is both writable and executable")
            }
            EntryNotExecutable { entry } => {
                write!(f, "elf: entry {entry:#x} is in no executable segment")
            }
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut w = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        w.copy_from_slice(s);
    }
    u16::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

/// Checks one `PT_LOAD` header on its own.
fn load_segment(elf: &[u8], phdr: usize, ph: &[u8]) -> Result<Segment, ElfError> {
    let flags = u32_at(ph, 4);
    let offset = u64_at(ph, 8);
    let vaddr = u64_at(ph, 16);
    let filesz = u64_at(ph, 32);
    let memsz = u64_at(ph, 40);
    if vaddr < IMAGE_BASE {
        return Err(ElfError::BelowImageBase { phdr, vaddr });
    }
    if vaddr.checked_add(memsz).is_none_or(|end| end > USER_LIMIT) {
        return Err(ElfError::PastUserLimit { phdr, vaddr, memsz });
    }
    if filesz > memsz {
        return Err(ElfError::FileLargerThanMemory {
            phdr,
            filesz,
            memsz,
        });
    }
    // A segment with no file bytes (all bss) reads nothing from the file.
    let in_file = filesz == 0
        || offset
            .checked_add(filesz)
            .and_then(|end| usize::try_from(end).ok())
            .is_some_and(|end| end <= elf.len());
    if !in_file {
        return Err(ElfError::OutsideFile {
            phdr,
            offset,
            filesz,
        });
    }
    if vaddr % PAGE_SIZE != offset % PAGE_SIZE {
        return Err(ElfError::Misaligned {
            phdr,
            vaddr,
            offset,
        });
    }
    let seg = Segment {
        vaddr,
        memsz,
        file_offset: offset,
        filesz,
        read: flags & PF_R != 0,
        write: flags & PF_W != 0,
        exec: flags & PF_X != 0,
    };
    if seg.write && seg.exec {
        return Err(ElfError::WriteAndExecute { phdr });
    }
    Ok(seg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;
    use std::vec;
    use std::vec::Vec;

    /// One program header for the builder.
    #[derive(Clone, Copy)]
    struct Ph {
        p_type: u32,
        flags: u32,
        offset: u64,
        vaddr: u64,
        filesz: u64,
        memsz: u64,
    }

    fn load(flags: u32, offset: u64, vaddr: u64, filesz: u64, memsz: u64) -> Ph {
        Ph {
            p_type: PT_LOAD,
            flags,
            offset,
            vaddr,
            filesz,
            memsz,
        }
    }

    const RX: u32 = PF_R | PF_X;
    const RW: u32 = PF_R | PF_W;
    const TEXT: u64 = IMAGE_BASE + 0x1000;

    /// An ELF64 executable: header, program headers right after it, and
    /// `size` bytes in all (each byte its offset, truncated).
    struct Builder {
        entry: u64,
        phs: Vec<Ph>,
        size: usize,
    }

    impl Builder {
        /// The usual shape: rodata (R), text (RX) with the entry, data+bss
        /// (RW), laid out as lld does with vaddr congruent to offset.
        fn new() -> Self {
            Builder {
                entry: TEXT + 0x523,
                phs: vec![
                    load(PF_R, 0, IMAGE_BASE, 0x400, 0x400),
                    load(RX, 0x400, TEXT + 0x400, 0x800, 0x800),
                    load(RW, 0xc00, IMAGE_BASE + 0x2c00, 0x100, 0x3000),
                ],
                size: 0xd00,
            }
        }

        fn build(&self) -> Vec<u8> {
            let mut b: Vec<u8> = (0..self.size).map(|i| i as u8).collect();
            let mut h = [0u8; EHDR_SIZE];
            h[0..4].copy_from_slice(b"\x7fELF");
            h[4] = 2;
            h[5] = 1;
            h[6] = 1;
            h[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
            h[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
            h[20..24].copy_from_slice(&1u32.to_le_bytes());
            h[24..32].copy_from_slice(&self.entry.to_le_bytes());
            h[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
            h[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
            h[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
            h[56..58].copy_from_slice(&(self.phs.len() as u16).to_le_bytes());
            let need = EHDR_SIZE + self.phs.len() * PHDR_SIZE;
            if b.len() < need {
                b.resize(need, 0);
            }
            b[..EHDR_SIZE].copy_from_slice(&h);
            for (i, ph) in self.phs.iter().enumerate() {
                let at = EHDR_SIZE + i * PHDR_SIZE;
                let p = &mut b[at..at + PHDR_SIZE];
                p.fill(0);
                p[0..4].copy_from_slice(&ph.p_type.to_le_bytes());
                p[4..8].copy_from_slice(&ph.flags.to_le_bytes());
                p[8..16].copy_from_slice(&ph.offset.to_le_bytes());
                p[16..24].copy_from_slice(&ph.vaddr.to_le_bytes());
                p[24..32].copy_from_slice(&ph.vaddr.to_le_bytes());
                p[32..40].copy_from_slice(&ph.filesz.to_le_bytes());
                p[40..48].copy_from_slice(&ph.memsz.to_le_bytes());
                p[48..56].copy_from_slice(&PAGE_SIZE.to_le_bytes());
            }
            b
        }

        fn parse(&self) -> Result<Image, ElfError> {
            Image::parse(&self.build())
        }

        fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
            f(&mut self);
            self
        }
    }

    /// The bytes of a valid image with one header byte changed.
    fn poked(at: usize, bytes: &[u8]) -> Result<Image, ElfError> {
        let mut b = Builder::new().build();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        Image::parse(&b)
    }

    #[test]
    fn a_good_image_is_described() {
        let b = Builder::new();
        let bytes = b.build();
        let img = Image::parse(&bytes).unwrap();
        assert_eq!(img.entry, TEXT + 0x523);
        assert_eq!(img.start, IMAGE_BASE);
        assert_eq!(img.end, IMAGE_BASE + 0x6000);
        let s = img.segments();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[1],
            Segment {
                vaddr: TEXT + 0x400,
                memsz: 0x800,
                file_offset: 0x400,
                filesz: 0x800,
                read: true,
                write: false,
                exec: true,
            }
        );
        assert!(s[0].read && !s[0].write && !s[0].exec);
        assert!(s[2].write && !s[2].exec);
        assert_eq!(s[2].page_start(), IMAGE_BASE + 0x2000);
        assert_eq!(s[2].page_end(), IMAGE_BASE + 0x6000);
        assert_eq!(s[1].data(&bytes), &bytes[0x400..0xc00]);
        assert_eq!(s[2].data(&bytes).len(), 0x100);
    }

    #[test]
    fn segments_come_out_sorted_and_other_headers_are_ignored() {
        let img = Builder::new()
            .with(|b| {
                b.phs.reverse();
                b.phs.insert(
                    1,
                    Ph {
                        p_type: 4,
                        ..b.phs[0]
                    },
                ); // PT_NOTE
                b.phs.push(Ph {
                    p_type: 0x6474_e551,
                    ..b.phs[0]
                }); // GNU_STACK
                b.phs.push(load(RW, 0, IMAGE_BASE + 0x9000, 0, 0)); // empty
            })
            .parse()
            .unwrap();
        let s = img.segments();
        assert_eq!(s.len(), 3);
        assert!(s.windows(2).all(|w| w[0].vaddr < w[1].vaddr));
    }

    #[test]
    fn page_aligned_and_bss_only_segments_are_fine() {
        let img = Builder::new()
            .with(|b| {
                b.phs = vec![
                    load(RX, 0x1000, TEXT, 0x10, 0x10),
                    load(RW, 0x2000, TEXT + 0x1000, 0, 0x5000),
                ];
                b.entry = TEXT;
                b.size = 0x1010;
            })
            .parse()
            .unwrap();
        assert_eq!(img.start, TEXT);
        assert_eq!(img.end, TEXT + 0x6000);
        assert_eq!(img.segments()[1].data(&[]), &[] as &[u8]);
    }

    #[test]
    fn header_rejections() {
        assert_eq!(Image::parse(&[]), Err(ElfError::TooShort { len: 0 }));
        assert_eq!(
            Image::parse(&Builder::new().build()[..63]),
            Err(ElfError::TooShort { len: 63 })
        );
        assert_eq!(poked(0, b"\x7fELG"), Err(ElfError::BadMagic));
        assert_eq!(poked(4, &[1]), Err(ElfError::NotElf64 { class: 1 }));
        assert_eq!(poked(5, &[2]), Err(ElfError::NotLittleEndian { data: 2 }));
        assert_eq!(poked(6, &[0]), Err(ElfError::BadVersion { version: 0 }));
        assert_eq!(
            poked(16, &[3, 0]),
            Err(ElfError::NotExecutable { e_type: 3 })
        );
        assert_eq!(poked(18, &[3, 0]), Err(ElfError::NotX86_64 { machine: 3 }));
        assert_eq!(
            poked(20, &[2, 0, 0, 0]),
            Err(ElfError::BadVersion { version: 2 })
        );
        assert_eq!(
            poked(52, &[63, 0]),
            Err(ElfError::BadHeaderSize { size: 63 })
        );
        assert_eq!(poked(54, &[32, 0]), Err(ElfError::BadPhdrSize { size: 32 }));
    }

    #[test]
    fn program_headers_outside_the_file() {
        let len = Builder::new().build().len();
        assert_eq!(
            poked(32, &(len as u64 - 100).to_le_bytes()),
            Err(ElfError::PhdrsOutsideFile {
                phoff: len as u64 - 100,
                phnum: 3,
                len
            })
        );
        assert!(matches!(
            poked(32, &u64::MAX.to_le_bytes()),
            Err(ElfError::PhdrsOutsideFile { .. })
        ));
        assert!(matches!(
            poked(56, &u16::MAX.to_le_bytes()),
            Err(ElfError::PhdrsOutsideFile {
                phnum: u16::MAX,
                ..
            })
        ));
    }

    #[test]
    fn no_loadable_segment() {
        let r = Builder::new().with(|b| b.phs.clear()).parse();
        assert_eq!(r, Err(ElfError::NoSegments));
        let r = Builder::new()
            .with(|b| b.phs.iter_mut().for_each(|p| p.p_type = 4))
            .parse();
        assert_eq!(r, Err(ElfError::NoSegments));
    }

    #[test]
    fn too_many_segments() {
        let r = Builder::new()
            .with(|b| {
                b.phs = (0..9)
                    .map(|i| load(RX, 0, IMAGE_BASE + i * 0x1000, 0x10, 0x10))
                    .collect();
                b.entry = IMAGE_BASE;
            })
            .parse();
        assert_eq!(r, Err(ElfError::TooManySegments { phdr: 8 }));
        let eight = Builder::new()
            .with(|b| {
                b.phs = (0..8)
                    .map(|i| load(RX, 0, IMAGE_BASE + i * 0x1000, 0x10, 0x10))
                    .collect();
                b.entry = IMAGE_BASE;
            })
            .parse();
        assert_eq!(eight.unwrap().segments().len(), 8);
    }

    #[test]
    fn below_the_image_base() {
        let r = Builder::new()
            .with(|b| b.phs[0].vaddr = IMAGE_BASE - 0x1000)
            .parse();
        assert_eq!(
            r,
            Err(ElfError::BelowImageBase {
                phdr: 0,
                vaddr: IMAGE_BASE - 0x1000
            })
        );
        let r = Builder::new().with(|b| b.phs[2].vaddr = 0xc00).parse();
        assert!(matches!(r, Err(ElfError::BelowImageBase { phdr: 2, .. })));
    }

    #[test]
    fn past_the_user_limit() {
        let r = Builder::new()
            .with(|b| b.phs[2].memsz = USER_LIMIT - b.phs[2].vaddr + 1)
            .parse();
        assert!(matches!(r, Err(ElfError::PastUserLimit { phdr: 2, .. })));
        let r = Builder::new().with(|b| b.phs[2].memsz = u64::MAX).parse();
        assert!(matches!(r, Err(ElfError::PastUserLimit { phdr: 2, .. })));
        let r = Builder::new()
            .with(|b| b.phs[0].vaddr = 0xffff_8000_0000_0000)
            .parse();
        assert!(matches!(r, Err(ElfError::PastUserLimit { phdr: 0, .. })));
        // Up to the limit exactly is fine.
        let r = Builder::new()
            .with(|b| b.phs[2].memsz = USER_LIMIT - b.phs[2].vaddr)
            .parse();
        assert_eq!(r.unwrap().end, USER_LIMIT);
    }

    #[test]
    fn file_size_over_memory_size() {
        let r = Builder::new().with(|b| b.phs[1].filesz = 0x801).parse();
        assert_eq!(
            r,
            Err(ElfError::FileLargerThanMemory {
                phdr: 1,
                filesz: 0x801,
                memsz: 0x800
            })
        );
    }

    #[test]
    fn file_bytes_outside_the_file() {
        let r = Builder::new().with(|b| b.phs[2].filesz = 0x101).parse();
        assert!(matches!(r, Err(ElfError::OutsideFile { phdr: 2, .. })));
        let r = Builder::new()
            .with(|b| {
                b.phs[2].offset = u64::MAX - 0x3ff;
                b.phs[2].vaddr = IMAGE_BASE + 0x2c00;
            })
            .parse();
        assert!(matches!(r, Err(ElfError::OutsideFile { phdr: 2, .. })));
    }

    #[test]
    fn vaddr_and_offset_must_agree_modulo_a_page() {
        let r = Builder::new().with(|b| b.phs[1].vaddr += 8).parse();
        assert_eq!(
            r,
            Err(ElfError::Misaligned {
                phdr: 1,
                vaddr: TEXT + 0x408,
                offset: 0x400
            })
        );
    }

    #[test]
    fn segments_may_not_share_a_page() {
        // Data moved down into the text's last page.
        let r = Builder::new()
            .with(|b| b.phs[2].vaddr = TEXT + 0xc00)
            .parse();
        assert_eq!(r, Err(ElfError::SharedPage { phdr: 2, other: 1 }));
        // Overlapping outright, listed first.
        let r = Builder::new()
            .with(|b| b.phs.insert(0, load(PF_R, 0x400, TEXT + 0x400, 4, 4)))
            .parse();
        assert_eq!(r, Err(ElfError::SharedPage { phdr: 2, other: 0 }));
        // One segment's bss running into the next page that another uses.
        let r = Builder::new().with(|b| b.phs[0].memsz = 0x1001).parse();
        assert_eq!(r, Err(ElfError::SharedPage { phdr: 1, other: 0 }));
    }

    #[test]
    fn writable_and_executable_is_refused() {
        let r = Builder::new()
            .with(|b| b.phs[1].flags = PF_R | PF_W | PF_X)
            .parse();
        assert_eq!(r, Err(ElfError::WriteAndExecute { phdr: 1 }));
        let r = Builder::new()
            .with(|b| b.phs[2].flags = PF_W | PF_X)
            .parse();
        assert_eq!(r, Err(ElfError::WriteAndExecute { phdr: 2 }));
    }

    #[test]
    fn entry_must_be_executable() {
        for entry in [
            0,
            IMAGE_BASE,          // rodata
            IMAGE_BASE + 0x2c00, // data
            TEXT + 0x3ff,        // in text's first page, before the segment
            TEXT + 0xc00,        // one past text
            u64::MAX,
        ] {
            let r = Builder::new().with(|b| b.entry = entry).parse();
            assert_eq!(r, Err(ElfError::EntryNotExecutable { entry }), "{entry:#x}");
        }
        let r = Builder::new().with(|b| b.entry = TEXT + 0xbff).parse();
        assert!(r.is_ok());
    }

    #[test]
    fn every_error_says_what_and_where() {
        let errors = [
            ElfError::TooShort { len: 3 },
            ElfError::BadMagic,
            ElfError::NotElf64 { class: 1 },
            ElfError::NotLittleEndian { data: 2 },
            ElfError::BadVersion { version: 0 },
            ElfError::NotExecutable { e_type: 3 },
            ElfError::NotX86_64 { machine: 3 },
            ElfError::BadHeaderSize { size: 1 },
            ElfError::BadPhdrSize { size: 1 },
            ElfError::PhdrsOutsideFile {
                phoff: 1,
                phnum: 2,
                len: 3,
            },
            ElfError::NoSegments,
            ElfError::TooManySegments { phdr: 9 },
            ElfError::BelowImageBase { phdr: 4, vaddr: 0 },
            ElfError::PastUserLimit {
                phdr: 4,
                vaddr: 0,
                memsz: 0,
            },
            ElfError::FileLargerThanMemory {
                phdr: 4,
                filesz: 2,
                memsz: 1,
            },
            ElfError::OutsideFile {
                phdr: 4,
                offset: 0,
                filesz: 0,
            },
            ElfError::Misaligned {
                phdr: 4,
                vaddr: 0,
                offset: 0,
            },
            ElfError::SharedPage { phdr: 4, other: 5 },
            ElfError::WriteAndExecute { phdr: 4 },
            ElfError::EntryNotExecutable { entry: 0 },
        ];
        for e in errors {
            let s = e.to_string();
            assert!(s.starts_with("elf: "), "{s}");
        }
        // Errors about one segment name it.
        let named = errors
            .iter()
            .filter(|e| e.to_string().starts_with("elf: segment 4"))
            .count();
        assert_eq!(named, 7);
        assert!(ElfError::TooManySegments { phdr: 9 }
            .to_string()
            .contains("program header 9"));
    }

    #[test]
    fn hostile_bytes_never_panic() {
        // Every single-byte corruption of the headers of a good image is
        // either still accepted or refused with an error.
        let good = Builder::new().build();
        let headers = EHDR_SIZE + 3 * PHDR_SIZE;
        for at in 0..headers {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = good.clone();
                b[at] = v;
                let _ = Image::parse(&b);
            }
        }
        for len in 0..good.len() {
            let _ = Image::parse(&good[..len]);
        }
    }
}
