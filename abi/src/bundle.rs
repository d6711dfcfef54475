//! The boot bundle: the one file QEMU hands the hypervisor with `-initrd`.
//!
//! It carries the compiled manifest, later the compiled policy and every
//! domain's ELF. The host packs it with [`Builder`]; the hypervisor checks it
//! with [`Bundle::parse`] before it trusts a byte of it.
//!
//! ```text
//!  offset                                   (all integers little-endian)
//!  0x00 ┌──────────────────────────────┐
//!       │ header (32 bytes)            │ magic "AIRLOCKB", version, sizes,
//!  0x20 ├──────────────────────────────┤ entry count, total size, header CRC
//!       │ entry 0 (56 bytes)           │ kind, name, offset, size, data CRC
//!       │ entry 1                      │
//!       │ ...                          │
//!       ├──────────────────────────────┤ <- 8-byte aligned
//!       │ data of entry 0              │
//!       │ zero padding to 8 bytes      │
//!       │ data of entry 1 ...          │
//!       └──────────────────────────────┘ <- total size
//! ```
//!
//! Header (version 1):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0  | 8 | magic `b"AIRLOCKB"` |
//! | 8  | 2 | format version, 1 |
//! | 10 | 2 | header size, 32 |
//! | 12 | 2 | entry size, 56 |
//! | 14 | 2 | reserved, 0 (not checked) |
//! | 16 | 8 | total size of the bundle in bytes |
//! | 24 | 4 | entry count, at least 1 |
//! | 28 | 4 | header CRC: CRC-32 of bytes 0..28 followed by the whole entry table |
//!
//! Entry:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0  | 2  | kind: 1 manifest, 2 policy, 3 image |
//! | 2  | 2  | name length, 1..=32 |
//! | 4  | 4  | CRC-32 of the data |
//! | 8  | 8  | offset of the data from the start of the bundle, a multiple of 8 |
//! | 16 | 8  | size of the data in bytes |
//! | 24 | 32 | name, UTF-8, zero-padded |
//!
//! Rules [`Bundle::parse`] enforces, one [`BundleError`] variant each: the
//! header is complete, the magic and version are known, the header and entry
//! sizes are version 1's, the file holds `total size` bytes (bytes past it are
//! ignored: a loader may round the module up), the table lies inside the
//! bundle, there is at least one entry (a bundle without a manifest can boot
//! nothing, so an empty one is always a packing mistake), the header CRC
//! matches, every entry has a known kind and a non-empty UTF-8 name of at
//! most 32 bytes, names are unique, there is at most one manifest, every
//! entry's data is 8-byte aligned, starts after the table, ends inside the
//! bundle without overflow and overlaps no other entry's, and every entry's
//! CRC matches its data.

use core::fmt;

use crate::crc32::{crc32, Crc32};

/// The first eight bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"AIRLOCKB";
/// The format version this crate reads and writes.
pub const VERSION: u16 = 1;
/// Size of the header in bytes.
pub const HEADER_SIZE: usize = 32;
/// Size of one entry-table record in bytes.
pub const ENTRY_SIZE: usize = 56;
/// Longest entry name in bytes.
pub const NAME_MAX: usize = 32;
/// Alignment of every entry's data.
pub const ALIGN: usize = 8;
/// Offset of the header CRC in the header; the CRC covers the bytes before it.
pub const HEADER_CRC_OFFSET: usize = 28;

/// Little-endian reads and writes at fixed offsets.
///
/// Callers check lengths first; a read out of bounds yields 0 and a write
/// out of bounds is dropped, so nothing here can panic.
pub(crate) mod le {
    pub fn u16_at(b: &[u8], off: usize) -> u16 {
        let mut a = [0u8; 2];
        if let Some(s) = b.get(off..off + 2) {
            a.copy_from_slice(s);
        }
        u16::from_le_bytes(a)
    }

    pub fn u32_at(b: &[u8], off: usize) -> u32 {
        let mut a = [0u8; 4];
        if let Some(s) = b.get(off..off + 4) {
            a.copy_from_slice(s);
        }
        u32::from_le_bytes(a)
    }

    pub fn u64_at(b: &[u8], off: usize) -> u64 {
        let mut a = [0u8; 8];
        if let Some(s) = b.get(off..off + 8) {
            a.copy_from_slice(s);
        }
        u64::from_le_bytes(a)
    }

    pub fn put(b: &mut [u8], off: usize, bytes: &[u8]) {
        if let Some(d) = b.get_mut(off..off + bytes.len()) {
            d.copy_from_slice(bytes);
        }
    }
}

/// What an entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// The compiled manifest ([`crate::manifest`]).
    Manifest,
    /// The compiled security policy.
    Policy,
    /// A domain's ELF image.
    Image,
}

impl EntryKind {
    /// Every kind, in code order.
    pub const ALL: [EntryKind; 3] = [EntryKind::Manifest, EntryKind::Policy, EntryKind::Image];

    /// The on-disk code.
    pub const fn code(self) -> u16 {
        match self {
            EntryKind::Manifest => 1,
            EntryKind::Policy => 2,
            EntryKind::Image => 3,
        }
    }

    pub const fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(EntryKind::Manifest),
            2 => Some(EntryKind::Policy),
            3 => Some(EntryKind::Image),
            _ => None,
        }
    }

    /// The name printed in `bundle_entry` events.
    pub const fn name(self) -> &'static str {
        match self {
            EntryKind::Manifest => "manifest",
            EntryKind::Policy => "policy",
            EntryKind::Image => "image",
        }
    }
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Names an entry in an error: its index and (up to 32 bytes of) its name,
/// which may not be UTF-8. Displays as `entry 1 ("blk")`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct EntryRef {
    pub index: u32,
    name: [u8; NAME_MAX],
    name_len: u8,
}

impl EntryRef {
    fn new(index: u32, name: &[u8]) -> Self {
        let n = name.len().min(NAME_MAX);
        let mut buf = [0u8; NAME_MAX];
        buf[..n].copy_from_slice(&name[..n]);
        EntryRef {
            index,
            name: buf,
            name_len: n as u8,
        }
    }

    /// The name's bytes as stored (at most 32 of them).
    pub fn name_bytes(&self) -> &[u8] {
        &self.name[..self.name_len as usize]
    }
}

impl fmt::Display for EntryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "entry {} (\"", self.index)?;
        for chunk in self.name_bytes().utf8_chunks() {
            for c in chunk.valid().chars() {
                write!(f, "{}", c.escape_debug())?;
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        f.write_str("\")")
    }
}

impl fmt::Debug for EntryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a bundle was refused: one variant per check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BundleError {
    /// Fewer bytes than a header.
    TruncatedHeader { len: usize },
    /// The first eight bytes are not [`MAGIC`].
    BadMagic { found: [u8; 8] },
    /// A format version this hypervisor does not know.
    UnknownVersion { found: u16 },
    /// The header size field is not [`HEADER_SIZE`].
    BadHeaderSize { found: u16 },
    /// The entry size field is not [`ENTRY_SIZE`].
    BadEntrySize { found: u16 },
    /// The header promises more bytes than the file has.
    Truncated { total: u64, len: usize },
    /// The entry table does not fit inside the bundle.
    TruncatedTable {
        count: u32,
        table_end: u64,
        total: u64,
    },
    /// The entry count is zero.
    NoEntries,
    /// The header CRC does not match the header and table.
    HeaderCrc { stored: u32, computed: u32 },
    /// An entry kind this hypervisor does not know.
    UnknownKind { entry: EntryRef, kind: u16 },
    /// A name length of 0.
    EmptyName { entry: EntryRef },
    /// A name length over [`NAME_MAX`].
    NameTooLong { entry: EntryRef, len: u16 },
    /// A name that is not UTF-8.
    NameNotUtf8 { entry: EntryRef },
    /// Two entries with the same name.
    DuplicateName { first: u32, entry: EntryRef },
    /// A second manifest entry.
    SecondManifest { first: u32, entry: EntryRef },
    /// Data not aligned to [`ALIGN`].
    Misaligned { entry: EntryRef, offset: u64 },
    /// Data that starts inside the header or the entry table.
    InsideTable {
        entry: EntryRef,
        offset: u64,
        table_end: u64,
    },
    /// Data that ends past the bundle (or whose end overflows).
    PastEnd {
        entry: EntryRef,
        offset: u64,
        size: u64,
        total: u64,
    },
    /// The data of two entries overlap.
    Overlap { first: EntryRef, second: EntryRef },
    /// An entry's CRC does not match its data.
    EntryCrc {
        entry: EntryRef,
        stored: u32,
        computed: u32,
    },
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use BundleError::*;
        match self {
            TruncatedHeader { len } => {
                write!(f, "truncated header: {len} bytes, a header is {HEADER_SIZE}")
            }
            BadMagic { found } => {
                write!(f, "bad magic {:02x?}, expected \"AIRLOCKB\"", found)
            }
            UnknownVersion { found } => {
                write!(f, "unknown format version {found}, this hypervisor reads {VERSION}")
            }
            BadHeaderSize { found } => {
                write!(f, "header size {found} is not version {VERSION}'s {HEADER_SIZE}")
            }
            BadEntrySize { found } => {
                write!(f, "entry size {found} is not version {VERSION}'s {ENTRY_SIZE}")
            }
            Truncated { total, len } => {
                write!(f, "truncated: the header says {total} bytes, the module has {len}")
            }
            TruncatedTable { count, table_end, total } => write!(
                f,
                "truncated entry table: {count} entries end at byte {table_end}, \
                 past the bundle's {total}"
            ),
            NoEntries => f.write_str("no entries: a bundle needs at least its manifest"),
            HeaderCrc { stored, computed } => write!(
                f,
                "header CRC-32 {stored:#010x} does not match the header and table's {computed:#010x}"
            ),
            UnknownKind { entry, kind } => write!(f, "{entry}: unknown kind {kind}"),
            EmptyName { entry } => write!(f, "{entry}: empty name"),
            NameTooLong { entry, len } => {
                write!(f, "{entry}: name length {len} is over {NAME_MAX} bytes")
            }
            NameNotUtf8 { entry } => write!(f, "{entry}: name is not UTF-8"),
            DuplicateName { first, entry } => {
                write!(f, "{entry}: name already used by entry {first}")
            }
            SecondManifest { first, entry } => {
                write!(f, "{entry}: a second manifest (the first is entry {first})")
            }
            Misaligned { entry, offset } => {
                write!(f, "{entry}: data offset {offset:#x} is not {ALIGN}-byte aligned")
            }
            InsideTable { entry, offset, table_end } => write!(
                f,
                "{entry}: data offset {offset:#x} is inside the header or entry table \
                 (which end at {table_end:#x})"
            ),
            PastEnd { entry, offset, size, total } => write!(
                f,
                "{entry}: data at {offset:#x} of {size:#x} bytes ends past the bundle's \
                 end {total:#x}"
            ),
            Overlap { first, second } => write!(f, "{second}: data overlaps {first}'s"),
            EntryCrc { entry, stored, computed } => write!(
                f,
                "{entry}: CRC-32 {stored:#010x} does not match the data's {computed:#010x}"
            ),
        }
    }
}

/// One entry of a checked bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub index: u32,
    pub kind: EntryKind,
    pub name: &'a str,
    pub data: &'a [u8],
    /// The data's CRC-32, as stored and verified.
    pub crc32: u32,
    /// Where the data starts, from the start of the bundle.
    pub offset: u64,
}

/// An entry-table record as stored, before any check.
struct Raw<'a> {
    kind: u16,
    name_len: u16,
    crc32: u32,
    offset: u64,
    size: u64,
    name: &'a [u8],
}

impl<'a> Raw<'a> {
    /// Reads record `index`; the caller has checked that the table fits.
    fn read(bytes: &'a [u8], index: u32) -> Self {
        let at = HEADER_SIZE + index as usize * ENTRY_SIZE;
        let name_len = le::u16_at(bytes, at + 2);
        let name_field = bytes.get(at + 24..at + 24 + NAME_MAX).unwrap_or(&[]);
        let name = name_field.get(..name_len as usize).unwrap_or(name_field);
        Raw {
            kind: le::u16_at(bytes, at),
            name_len,
            crc32: le::u32_at(bytes, at + 4),
            offset: le::u64_at(bytes, at + 8),
            size: le::u64_at(bytes, at + 16),
            name,
        }
    }

    fn entry_ref(&self, index: u32) -> EntryRef {
        EntryRef::new(index, self.name)
    }

    /// The data's byte range; meaningful once the bounds were checked.
    fn range(&self) -> core::ops::Range<u64> {
        self.offset..self.offset.saturating_add(self.size)
    }
}

/// A bundle whose every check passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bundle<'a> {
    /// Exactly `total size` bytes.
    bytes: &'a [u8],
    count: u32,
}

impl<'a> Bundle<'a> {
    /// Checks everything the module comment lists, in that order, and
    /// returns the first failure.
    pub fn parse(bytes: &'a [u8]) -> Result<Bundle<'a>, BundleError> {
        use BundleError::*;
        if bytes.len() < HEADER_SIZE {
            return Err(TruncatedHeader { len: bytes.len() });
        }
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&bytes[..8]);
        if magic != MAGIC {
            return Err(BadMagic { found: magic });
        }
        let version = le::u16_at(bytes, 8);
        if version != VERSION {
            return Err(UnknownVersion { found: version });
        }
        let header_size = le::u16_at(bytes, 10);
        if header_size as usize != HEADER_SIZE {
            return Err(BadHeaderSize { found: header_size });
        }
        let entry_size = le::u16_at(bytes, 12);
        if entry_size as usize != ENTRY_SIZE {
            return Err(BadEntrySize { found: entry_size });
        }
        let total = le::u64_at(bytes, 16);
        if total > bytes.len() as u64 {
            return Err(Truncated {
                total,
                len: bytes.len(),
            });
        }
        // `total <= bytes.len()`, so it fits a usize.
        let bytes = &bytes[..total as usize];
        let count = le::u32_at(bytes, 24);
        let table_end = HEADER_SIZE as u64 + count as u64 * ENTRY_SIZE as u64;
        if table_end > total {
            return Err(TruncatedTable {
                count,
                table_end,
                total,
            });
        }
        if count == 0 {
            return Err(NoEntries);
        }
        let stored = le::u32_at(bytes, HEADER_CRC_OFFSET);
        let computed = header_crc(bytes, table_end as usize);
        if stored != computed {
            return Err(HeaderCrc { stored, computed });
        }

        for i in 0..count {
            let raw = Raw::read(bytes, i);
            let entry = raw.entry_ref(i);
            let Some(kind) = EntryKind::from_code(raw.kind) else {
                return Err(UnknownKind {
                    entry,
                    kind: raw.kind,
                });
            };
            if raw.name_len == 0 {
                return Err(EmptyName { entry });
            }
            if raw.name_len as usize > NAME_MAX {
                return Err(NameTooLong {
                    entry,
                    len: raw.name_len,
                });
            }
            if core::str::from_utf8(raw.name).is_err() {
                return Err(NameNotUtf8 { entry });
            }
            if !raw.offset.is_multiple_of(ALIGN as u64) {
                return Err(Misaligned {
                    entry,
                    offset: raw.offset,
                });
            }
            if raw.offset < table_end {
                return Err(InsideTable {
                    entry,
                    offset: raw.offset,
                    table_end,
                });
            }
            match raw.offset.checked_add(raw.size) {
                Some(end) if end <= total => {}
                _ => {
                    return Err(PastEnd {
                        entry,
                        offset: raw.offset,
                        size: raw.size,
                        total,
                    })
                }
            }
            for j in 0..i {
                let other = Raw::read(bytes, j);
                if other.name == raw.name {
                    return Err(DuplicateName { first: j, entry });
                }
                if kind == EntryKind::Manifest && other.kind == raw.kind {
                    return Err(SecondManifest { first: j, entry });
                }
                let (a, b) = (other.range(), raw.range());
                if a.start < b.end && b.start < a.end {
                    return Err(Overlap {
                        first: other.entry_ref(j),
                        second: entry,
                    });
                }
            }
        }
        for i in 0..count {
            let raw = Raw::read(bytes, i);
            let data = &bytes[raw.offset as usize..(raw.offset + raw.size) as usize];
            let computed = crc32(data);
            if computed != raw.crc32 {
                return Err(EntryCrc {
                    entry: raw.entry_ref(i),
                    stored: raw.crc32,
                    computed,
                });
            }
        }
        Ok(Bundle { bytes, count })
    }

    /// The number of entries (at least 1).
    pub fn entry_count(&self) -> u32 {
        self.count
    }

    /// The bundle's size as its header gives it.
    pub fn total_size(&self) -> usize {
        self.bytes.len()
    }

    /// Entry `index`, if there is one.
    pub fn entry(&self, index: u32) -> Option<Entry<'a>> {
        if index >= self.count {
            return None;
        }
        let raw = Raw::read(self.bytes, index);
        let start = usize::try_from(raw.offset).ok()?;
        let end = start.checked_add(usize::try_from(raw.size).ok()?)?;
        Some(Entry {
            index,
            kind: EntryKind::from_code(raw.kind)?,
            name: core::str::from_utf8(raw.name).ok()?,
            data: self.bytes.get(start..end)?,
            crc32: raw.crc32,
            offset: raw.offset,
        })
    }

    /// Every entry, in table order.
    pub fn entries(&self) -> Entries<'a> {
        Entries {
            bundle: *self,
            next: 0,
        }
    }

    /// The entry of `kind` named `name`.
    pub fn find(&self, kind: EntryKind, name: &str) -> Option<Entry<'a>> {
        self.entries().find(|e| e.kind == kind && e.name == name)
    }

    /// The compiled manifest's bytes (the one entry of kind manifest).
    pub fn manifest(&self) -> Option<&'a [u8]> {
        self.entries()
            .find(|e| e.kind == EntryKind::Manifest)
            .map(|e| e.data)
    }
}

/// The header CRC: bytes `0..28` of the header, then the entry table.
fn header_crc(bytes: &[u8], table_end: usize) -> u32 {
    let mut c = Crc32::new();
    c.update(bytes.get(..HEADER_CRC_OFFSET).unwrap_or(&[]));
    c.update(bytes.get(HEADER_SIZE..table_end).unwrap_or(&[]));
    c.finish()
}

/// Iterator over a bundle's entries.
#[derive(Clone, Debug)]
pub struct Entries<'a> {
    bundle: Bundle<'a>,
    next: u32,
}

impl<'a> Iterator for Entries<'a> {
    type Item = Entry<'a>;

    fn next(&mut self) -> Option<Entry<'a>> {
        while self.next < self.bundle.count {
            let i = self.next;
            self.next += 1;
            // Every entry passed `parse`, so this is always `Some`.
            if let Some(e) = self.bundle.entry(i) {
                return Some(e);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some((self.bundle.count - self.next) as usize))
    }
}

/// One entry to pack.
#[derive(Clone, Copy, Debug)]
pub struct Item<'a> {
    pub kind: EntryKind,
    pub name: &'a str,
    pub data: &'a [u8],
}

/// Why a bundle could not be packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildError {
    NoEntries,
    TooManyEntries {
        count: usize,
    },
    EmptyName {
        index: usize,
    },
    NameTooLong {
        index: usize,
        len: usize,
    },
    DuplicateName {
        first: usize,
        index: usize,
    },
    SecondManifest {
        first: usize,
        index: usize,
    },
    /// The bundle would be larger than this machine's address space.
    TooLarge,
    /// The output buffer is smaller than [`Builder::size`].
    BufferTooSmall {
        need: usize,
        have: usize,
    },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use BuildError::*;
        match self {
            NoEntries => f.write_str("no entries: a bundle needs at least its manifest"),
            TooManyEntries { count } => write!(f, "{count} entries is too many"),
            EmptyName { index } => write!(f, "entry {index}: empty name"),
            NameTooLong { index, len } => {
                write!(f, "entry {index}: name of {len} bytes is over {NAME_MAX}")
            }
            DuplicateName { first, index } => {
                write!(f, "entry {index}: name already used by entry {first}")
            }
            SecondManifest { first, index } => {
                write!(
                    f,
                    "entry {index}: a second manifest (the first is entry {first})"
                )
            }
            TooLarge => f.write_str("the bundle would not fit in memory"),
            BufferTooSmall { need, have } => {
                write!(f, "output buffer of {have} bytes, the bundle needs {need}")
            }
        }
    }
}

/// Packs entries into a bundle without allocating: [`Builder::size`] says
/// how large a buffer to give [`Builder::write`].
///
/// ```
/// use abi::bundle::{Builder, Bundle, EntryKind, Item};
/// let items = [Item { kind: EntryKind::Manifest, name: "manifest", data: b"..." }];
/// let b = Builder::new(&items);
/// let mut buf = [0u8; 128];
/// let n = b.write(&mut buf).unwrap();
/// let bundle = Bundle::parse(&buf[..n]).unwrap();
/// assert_eq!(bundle.manifest(), Some(&b"..."[..]));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Builder<'i, 'a> {
    items: &'i [Item<'a>],
}

const fn align_up(x: usize) -> Option<usize> {
    match x.checked_add(ALIGN - 1) {
        Some(v) => Some(v & !(ALIGN - 1)),
        None => None,
    }
}

impl<'i, 'a> Builder<'i, 'a> {
    pub fn new(items: &'i [Item<'a>]) -> Self {
        Builder { items }
    }

    /// Checks the entries as [`Bundle::parse`] would and returns the data
    /// offset of each (through `each`) and the total size.
    fn layout(&self, mut each: impl FnMut(usize, usize)) -> Result<usize, BuildError> {
        use BuildError::*;
        let n = self.items.len();
        if n == 0 {
            return Err(NoEntries);
        }
        if n > u32::MAX as usize {
            return Err(TooManyEntries { count: n });
        }
        let table = n
            .checked_mul(ENTRY_SIZE)
            .and_then(|t| t.checked_add(HEADER_SIZE));
        let mut at = table.and_then(align_up).ok_or(TooLarge)?;
        for (i, item) in self.items.iter().enumerate() {
            if item.name.is_empty() {
                return Err(EmptyName { index: i });
            }
            if item.name.len() > NAME_MAX {
                return Err(NameTooLong {
                    index: i,
                    len: item.name.len(),
                });
            }
            for (j, other) in self.items[..i].iter().enumerate() {
                if other.name == item.name {
                    return Err(DuplicateName { first: j, index: i });
                }
                if item.kind == EntryKind::Manifest && other.kind == EntryKind::Manifest {
                    return Err(SecondManifest { first: j, index: i });
                }
            }
            each(i, at);
            at = at
                .checked_add(item.data.len())
                .and_then(align_up)
                .ok_or(TooLarge)?;
        }
        Ok(at)
    }

    /// The size of the packed bundle.
    pub fn size(&self) -> Result<usize, BuildError> {
        self.layout(|_, _| {})
    }

    /// Writes the bundle at the start of `out` and returns its size.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, BuildError> {
        let total = self.size()?;
        let have = out.len();
        let Some(out) = out.get_mut(..total) else {
            return Err(BuildError::BufferTooSmall { need: total, have });
        };
        out.fill(0);
        let items = self.items;
        self.layout(|i, offset| {
            let item = &items[i];
            let at = HEADER_SIZE + i * ENTRY_SIZE;
            le::put(out, at, &item.kind.code().to_le_bytes());
            le::put(out, at + 2, &(item.name.len() as u16).to_le_bytes());
            le::put(out, at + 4, &crc32(item.data).to_le_bytes());
            le::put(out, at + 8, &(offset as u64).to_le_bytes());
            le::put(out, at + 16, &(item.data.len() as u64).to_le_bytes());
            le::put(out, at + 24, item.name.as_bytes());
            le::put(out, offset, item.data);
        })?;
        le::put(out, 0, &MAGIC);
        le::put(out, 8, &VERSION.to_le_bytes());
        le::put(out, 10, &(HEADER_SIZE as u16).to_le_bytes());
        le::put(out, 12, &(ENTRY_SIZE as u16).to_le_bytes());
        le::put(out, 16, &(total as u64).to_le_bytes());
        le::put(out, 24, &(items.len() as u32).to_le_bytes());
        let crc = header_crc(out, HEADER_SIZE + items.len() * ENTRY_SIZE);
        le::put(out, HEADER_CRC_OFFSET, &crc.to_le_bytes());
        Ok(total)
    }
}

/// Recomputes the header CRC after a test (or a tool) edited the header or
/// table in place, so that a later check is the one that fails.
pub fn reseal_header(bytes: &mut [u8]) {
    let count = le::u32_at(bytes, 24) as usize;
    let table_end = HEADER_SIZE.saturating_add(count.saturating_mul(ENTRY_SIZE));
    let crc = header_crc(bytes, table_end.min(bytes.len()));
    le::put(bytes, HEADER_CRC_OFFSET, &crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;
    use std::string::ToString;
    use std::vec;
    use std::vec::Vec;

    fn items() -> [Item<'static>; 3] {
        [
            Item {
                kind: EntryKind::Manifest,
                name: "manifest",
                data: b"compiled manifest bytes",
            },
            Item {
                kind: EntryKind::Policy,
                name: "policy",
                data: b"",
            },
            Item {
                kind: EntryKind::Image,
                name: "blk",
                data: b"\x7fELF and the rest of it",
            },
        ]
    }

    fn build(items: &[Item<'_>]) -> Vec<u8> {
        let b = Builder::new(items);
        let mut buf = vec![0xa5; b.size().unwrap()];
        assert_eq!(b.write(&mut buf).unwrap(), buf.len());
        buf
    }

    fn good() -> Vec<u8> {
        build(&items())
    }

    /// Offset of entry `i`'s record.
    fn rec(i: usize) -> usize {
        HEADER_SIZE + i * ENTRY_SIZE
    }

    fn set_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Edits the table, reseals the header, and returns the error.
    fn parse_edited(edit: impl FnOnce(&mut Vec<u8>)) -> BundleError {
        let mut b = good();
        edit(&mut b);
        reseal_header(&mut b);
        Bundle::parse(&b).unwrap_err()
    }

    #[test]
    fn round_trip() {
        let buf = good();
        assert_eq!(buf.len() % ALIGN, 0);
        let bundle = Bundle::parse(&buf).unwrap();
        assert_eq!(bundle.entry_count(), 3);
        assert_eq!(bundle.total_size(), buf.len());
        let got: Vec<Entry<'_>> = bundle.entries().collect();
        assert_eq!(got.len(), 3);
        for (i, (e, item)) in got.iter().zip(items()).enumerate() {
            assert_eq!(e.index, i as u32);
            assert_eq!(e.kind, item.kind);
            assert_eq!(e.name, item.name);
            assert_eq!(e.data, item.data);
            assert_eq!(e.crc32, crc32(item.data));
            assert_eq!(e.offset % ALIGN as u64, 0);
        }
        assert_eq!(bundle.manifest(), Some(&b"compiled manifest bytes"[..]));
        assert_eq!(bundle.find(EntryKind::Image, "blk").unwrap().index, 2);
        assert!(bundle.find(EntryKind::Image, "net").is_none());
        assert!(bundle.entry(3).is_none());
    }

    #[test]
    fn bytes_past_total_size_are_ignored() {
        let mut buf = good();
        let n = buf.len();
        buf.extend_from_slice(&[0xff; 4096]);
        assert_eq!(Bundle::parse(&buf).unwrap().total_size(), n);
    }

    #[test]
    fn a_bundle_without_a_manifest_is_valid_but_has_none() {
        let buf = build(&[Item {
            kind: EntryKind::Image,
            name: "x",
            data: b"1",
        }]);
        assert_eq!(Bundle::parse(&buf).unwrap().manifest(), None);
    }

    #[test]
    fn truncated_header() {
        let buf = good();
        assert_eq!(
            Bundle::parse(&buf[..31]),
            Err(BundleError::TruncatedHeader { len: 31 })
        );
        assert_eq!(
            Bundle::parse(&[]),
            Err(BundleError::TruncatedHeader { len: 0 })
        );
    }

    #[test]
    fn bad_magic() {
        let mut buf = good();
        buf[0] = b'X';
        let e = Bundle::parse(&buf).unwrap_err();
        assert!(matches!(e, BundleError::BadMagic { found } if &found == b"XIRLOCKB"));
        assert!(e.to_string().starts_with("bad magic"), "{e}");
    }

    #[test]
    fn unknown_version() {
        let mut buf = good();
        buf[8] = 2;
        assert_eq!(
            Bundle::parse(&buf),
            Err(BundleError::UnknownVersion { found: 2 })
        );
    }

    #[test]
    fn bad_header_and_entry_sizes() {
        let mut buf = good();
        buf[10] = 16;
        assert_eq!(
            Bundle::parse(&buf),
            Err(BundleError::BadHeaderSize { found: 16 })
        );
        let mut buf = good();
        buf[12] = 48;
        assert_eq!(
            Bundle::parse(&buf),
            Err(BundleError::BadEntrySize { found: 48 })
        );
    }

    #[test]
    fn truncated_file() {
        let buf = good();
        let n = buf.len();
        assert_eq!(
            Bundle::parse(&buf[..n - 1]),
            Err(BundleError::Truncated {
                total: n as u64,
                len: n - 1
            })
        );
    }

    #[test]
    fn truncated_table() {
        let e = parse_edited(|b| b[24..28].copy_from_slice(&1000u32.to_le_bytes()));
        assert!(
            matches!(e, BundleError::TruncatedTable { count: 1000, .. }),
            "{e:?}"
        );
        // A file cut inside the table: the total size says where it ends.
        let mut b = good();
        b.truncate(HEADER_SIZE + ENTRY_SIZE + 5);
        let len = b.len() as u64;
        set_u64(&mut b, 16, len);
        assert!(matches!(
            Bundle::parse(&b),
            Err(BundleError::TruncatedTable { count: 3, .. })
        ));
    }

    #[test]
    fn zero_entries_are_refused() {
        assert_eq!(Builder::new(&[]).size(), Err(BuildError::NoEntries));
        let e = parse_edited(|b| b[24..28].copy_from_slice(&0u32.to_le_bytes()));
        assert_eq!(e, BundleError::NoEntries);
    }

    #[test]
    fn header_crc() {
        let mut buf = good();
        // A change to the table that the header CRC covers.
        buf[rec(2) + 24] = b'B';
        let e = Bundle::parse(&buf).unwrap_err();
        assert!(matches!(e, BundleError::HeaderCrc { .. }), "{e:?}");
        assert!(e.to_string().starts_with("header CRC-32 0x"), "{e}");
        let mut buf = good();
        buf[HEADER_CRC_OFFSET] ^= 1;
        assert!(matches!(
            Bundle::parse(&buf),
            Err(BundleError::HeaderCrc { .. })
        ));
    }

    #[test]
    fn unknown_kind() {
        let e = parse_edited(|b| b[rec(1)] = 9);
        assert!(matches!(e, BundleError::UnknownKind { kind: 9, entry } if entry.index == 1));
        assert_eq!(e.to_string(), "entry 1 (\"policy\"): unknown kind 9");
    }

    #[test]
    fn bad_names() {
        let e = parse_edited(|b| b[rec(1) + 2] = 0);
        assert!(
            matches!(e, BundleError::EmptyName { entry } if entry.index == 1),
            "{e:?}"
        );
        let e = parse_edited(|b| b[rec(1) + 2] = 33);
        assert!(
            matches!(e, BundleError::NameTooLong { len: 33, .. }),
            "{e:?}"
        );
        let e = parse_edited(|b| b[rec(2) + 24] = 0xff);
        assert!(matches!(e, BundleError::NameNotUtf8 { .. }), "{e:?}");
        assert_eq!(e.to_string(), "entry 2 (\"\\xfflk\"): name is not UTF-8");
        let mut b = good();
        b[rec(2) + 2] = 6;
        b[rec(2) + 24..rec(2) + 30].copy_from_slice(b"policy");
        reseal_header(&mut b);
        let e = Bundle::parse(&b).unwrap_err();
        assert!(matches!(e, BundleError::DuplicateName { first: 1, entry } if entry.index == 2));
    }

    #[test]
    fn second_manifest() {
        let e = parse_edited(|b| b[rec(2)] = EntryKind::Manifest.code() as u8);
        assert!(
            matches!(e, BundleError::SecondManifest { first: 0, .. }),
            "{e:?}"
        );
        let two = [
            Item {
                kind: EntryKind::Manifest,
                name: "a",
                data: b"",
            },
            Item {
                kind: EntryKind::Manifest,
                name: "b",
                data: b"",
            },
        ];
        assert_eq!(
            Builder::new(&two).size(),
            Err(BuildError::SecondManifest { first: 0, index: 1 })
        );
    }

    #[test]
    fn misaligned_entry() {
        let e = parse_edited(|b| {
            let off = le::u64_at(b, rec(0) + 8);
            set_u64(b, rec(0) + 8, off + 1);
        });
        assert!(matches!(e, BundleError::Misaligned { .. }), "{e:?}");
    }

    #[test]
    fn entry_inside_the_table() {
        let e = parse_edited(|b| set_u64(b, rec(0) + 8, HEADER_SIZE as u64));
        assert!(
            matches!(e, BundleError::InsideTable { offset: 32, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn entry_past_end() {
        let e = parse_edited(|b| set_u64(b, rec(2) + 16, 4096));
        assert!(
            matches!(e, BundleError::PastEnd { size: 4096, .. }),
            "{e:?}"
        );
        // offset + size overflows u64.
        let e = parse_edited(|b| set_u64(b, rec(2) + 16, u64::MAX - 8));
        assert!(matches!(e, BundleError::PastEnd { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with("entry 2 (\"blk\"): data at 0x"),
            "{e}"
        );
    }

    #[test]
    fn overlapping_entries() {
        let e = parse_edited(|b| {
            let off = le::u64_at(b, rec(0) + 8);
            set_u64(b, rec(2) + 8, off + 8);
        });
        assert!(
            matches!(e, BundleError::Overlap { first, second } if first.index == 0 && second.index == 2),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "entry 2 (\"blk\"): data overlaps entry 0 (\"manifest\")'s"
        );
        // Empty data at the same offset as another entry's overlaps nothing.
        let buf = build(&[
            Item {
                kind: EntryKind::Image,
                name: "a",
                data: b"",
            },
            Item {
                kind: EntryKind::Image,
                name: "b",
                data: b"12345678",
            },
        ]);
        Bundle::parse(&buf).unwrap();
    }

    #[test]
    fn entry_crc() {
        let mut buf = good();
        let off = le::u64_at(&buf, rec(2) + 8) as usize;
        buf[off] ^= 0x20;
        let e = Bundle::parse(&buf).unwrap_err();
        let computed = crc32(&buf[off..off + items()[2].data.len()]);
        let stored = crc32(items()[2].data);
        assert!(matches!(e, BundleError::EntryCrc { entry, .. } if entry.index == 2));
        assert_eq!(
            e.to_string(),
            format!(
                "entry 2 (\"blk\"): CRC-32 {stored:#010x} does not match the data's {computed:#010x}"
            )
        );
    }

    #[test]
    fn builder_rejects_bad_items() {
        let long = "x".repeat(33);
        let cases: [(&[Item<'_>], BuildError); 3] = [
            (
                &[Item {
                    kind: EntryKind::Image,
                    name: "",
                    data: b"",
                }],
                BuildError::EmptyName { index: 0 },
            ),
            (
                &[Item {
                    kind: EntryKind::Image,
                    name: &long,
                    data: b"",
                }],
                BuildError::NameTooLong { index: 0, len: 33 },
            ),
            (
                &[
                    Item {
                        kind: EntryKind::Image,
                        name: "a",
                        data: b"",
                    },
                    Item {
                        kind: EntryKind::Policy,
                        name: "a",
                        data: b"",
                    },
                ],
                BuildError::DuplicateName { first: 0, index: 1 },
            ),
        ];
        for (items, err) in cases {
            assert_eq!(Builder::new(items).size(), Err(err));
        }
        let b = Builder::new(&[Item {
            kind: EntryKind::Image,
            name: "a",
            data: b"",
        }]);
        let mut small = [0u8; 16];
        assert_eq!(
            b.write(&mut small),
            Err(BuildError::BufferTooSmall { need: 88, have: 16 })
        );
    }

    #[test]
    fn every_error_displays_its_check() {
        // Exhaustive on purpose: a new variant must get a message.
        let entry = EntryRef::new(1, b"blk");
        for e in [
            BundleError::TruncatedHeader { len: 3 },
            BundleError::BadMagic {
                found: *b"ELF\0\0\0\0\0",
            },
            BundleError::UnknownVersion { found: 9 },
            BundleError::BadHeaderSize { found: 9 },
            BundleError::BadEntrySize { found: 9 },
            BundleError::Truncated { total: 9, len: 3 },
            BundleError::TruncatedTable {
                count: 9,
                table_end: 9,
                total: 3,
            },
            BundleError::NoEntries,
            BundleError::HeaderCrc {
                stored: 1,
                computed: 2,
            },
            BundleError::UnknownKind { entry, kind: 9 },
            BundleError::EmptyName { entry },
            BundleError::NameTooLong { entry, len: 40 },
            BundleError::NameNotUtf8 { entry },
            BundleError::DuplicateName { first: 0, entry },
            BundleError::SecondManifest { first: 0, entry },
            BundleError::Misaligned { entry, offset: 3 },
            BundleError::InsideTable {
                entry,
                offset: 3,
                table_end: 9,
            },
            BundleError::PastEnd {
                entry,
                offset: 3,
                size: 9,
                total: 9,
            },
            BundleError::Overlap {
                first: entry,
                second: entry,
            },
            BundleError::EntryCrc {
                entry,
                stored: 1,
                computed: 2,
            },
        ] {
            let s = e.to_string();
            assert!(!s.is_empty() && !s.contains("Error"), "{s}");
        }
    }
}
