//! Saving and opening index files (format version 1).
//!
//! # File layout
//!
//! ```text
//!  offset 0   ┌───────────────────────────────────────────────┐
//!             │ fixed header, little-endian, decoded by hand:  │
//!             │ magic "NANNIDX\0", version 1, rkyv controls    │
//!             │ (endianness, alignment, pointer width), metric,│
//!             │ dim, M, ef_construction, level seed + position,│
//!             │ slots, live, upper blocks, entry, file length  │
//!             │ section table: kind, align, offset, len, CRC32C│
//!             │ CRC32C of everything above                     │
//!  64-aligned ├───────────────────────────────────────────────┤
//!             │ level0   rkyv Vec<u32>  slots x (2 + M0)       │
//!             │ cells    rkyv Vec<u32>  slot | tombstone bit   │
//!             │ anchors  rkyv Vec<u32>  per slot               │
//!             │ upper    rkyv Vec<u32>  [level, lists] / block │
//!             │ vectors  rkyv Vec<f32>  slots x dim            │
//!             │ keys     rkyv Vec<u64>  per slot               │
//!             └───────────────────────────────────────────────┘
//! ```
//!
//! A saved file holds exactly one vector per slot (cell ids are renumbered to
//! slot ids), so the garbage cells of past updates are never written.
//!
//! # Validation order (every open path)
//!
//! 1. The header, by hand (`format.rs`): magic, version, header checksum, the
//!    rkyv format controls of the writer against this build's, metric, and a
//!    section table whose sections lie inside the file (checked arithmetic),
//!    64-byte aligned, in order, without overlap. The file length in the
//!    header must match.
//! 2. Section checksums (CRC32C).
//! 3. `rkyv::access` (bytecheck) on each section.
//! 4. Structure: every array length against the header's counts (checked
//!    multiplication), degrees, upper-block table, cell words, entry point,
//!    live count: all before anything is allocated from a count.
//! 5. The index is rebuilt and [`Index::check_invariants`] runs on it (rkyv
//!    does not know what a neighbour id or an anchor is); only an index that
//!    passes is returned.
//!
//! A damaged or hostile file gives an [`Error::Format`], never a panic.
//! Checksums are not authentication: validation does not rely on them
//! (a forged file with correct checksums still meets steps 4 and 5).
//!
//! # What this version does not do yet
//!
//! Opening copies the sections into a freshly allocated index (the file is
//! memory-mapped only while it is read and validated); zero-copy serving from
//! the mapping and `open_unchecked` come next. The durable update log and
//! `checkpoint` are [`DurableIndex`](crate::DurableIndex); every byte goes
//! through the [`Storage`] seam.
//!
//! # Saving
//!
//! [`Index::save`] takes a snapshot while writers are paused (searches keep
//! running), then writes a temporary file in the target's directory, fsyncs
//! it, renames it over the target and fsyncs the directory. It never writes
//! to an existing file, so a file another process has mapped is never
//! modified under it, and a failed save leaves the previous file intact.

mod format;
mod io;
pub(crate) mod log;
mod sim;
mod storage;

pub(crate) use io::error as io_error;
pub use io::{SYNC_SNAPSHOT_DIR, SYNC_SNAPSHOT_FILE};
pub use log::{Durability, SYNC_LOG_DIR, SYNC_LOG_FILE};
pub use sim::SimStorage;
pub use storage::{FsStorage, Storage, StorageFile};

use std::path::Path;

use rkyv::rancor;

use crate::error::{Error, InvariantViolation, Result};
use crate::graph::{GraphImport, MAX_LEVEL, NO_CELL, TOMBSTONE};
use crate::index::Index;
use crate::params::IndexParams;
use crate::sync::Ordering;

use format::{header_len, Section, SECTION_ALIGN, SECTION_KINDS, VERSION};
pub(crate) use format::{Header, RkyvFormat, SectionKind};

/// Why a file is not a valid index.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The magic bytes are wrong.
    #[error("not a nann index file (wrong magic bytes)")]
    NotAnIndex,
    /// Written by another format version.
    #[error("index format version {found} is not supported by this build (it reads version 1)")]
    UnsupportedVersion {
        /// The file's version.
        found: u32,
    },
    /// Written under other rkyv format controls (endianness, alignment,
    /// pointer width).
    #[error("incompatible index file: {0}")]
    IncompatibleFormat(String),
    /// The file is shorter than its header says.
    #[error("the index file is truncated: {needed} bytes needed, {found} present")]
    Truncated {
        /// Bytes the header or table requires.
        needed: u64,
        /// Bytes present.
        found: u64,
    },
    /// The header's checksum does not match.
    #[error("the index file header is damaged (checksum mismatch)")]
    HeaderChecksum,
    /// A section's checksum does not match.
    #[error("section `{section}` of the index file is damaged (checksum mismatch)")]
    SectionChecksum {
        /// The section's name.
        section: &'static str,
    },
    /// A section is not a valid rkyv archive.
    #[error("section `{section}` is not a valid archive: {message}")]
    Archive {
        /// The section's name.
        section: &'static str,
        /// rkyv's explanation.
        message: String,
    },
    /// A field or array is inconsistent with the rest of the file.
    #[error("the index file is corrupt: {0}")]
    Corrupt(String),
    /// The rebuilt graph breaks an invariant of [`Index::check_invariants`].
    #[error("the index file holds an inconsistent graph: {0}")]
    Invariant(InvariantViolation),
}

impl From<FormatError> for Error {
    fn from(e: FormatError) -> Self {
        Error::Format(e)
    }
}

/// rkyv archives of the six sections, in file order.
/// A consistent copy of an index, ready to be written.
pub(crate) struct Snapshot {
    header: Header,
    parts: Vec<rkyv::util::AlignedVec>,
}

impl Snapshot {
    /// Writes the snapshot to `path` atomically (temporary file, fsync,
    /// rename, directory fsync).
    pub(crate) fn write(&self, storage: &dyn Storage, path: &Path) -> Result<()> {
        let head = self.header.encode();
        let mut parts: Vec<&[u8]> = vec![&head];
        let mut at = head.len() as u64;
        let zeros = [0u8; SECTION_ALIGN as usize];
        for (section, bytes) in self.header.sections.iter().zip(&self.parts) {
            let pad = (section.offset - at) as usize;
            parts.push(&zeros[..pad]);
            parts.push(bytes);
            at = section.offset + section.len;
        }
        io::write_atomically(storage, path, &parts)
    }
}

fn archive<T>(value: &Vec<T>) -> Result<rkyv::util::AlignedVec>
where
    Vec<T>: for<'a> rkyv::Serialize<
        rancor::Strategy<
            rkyv::ser::Serializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rkyv::ser::sharing::Share,
            >,
            rancor::Error,
        >,
    >,
{
    rkyv::to_bytes::<rancor::Error>(value).map_err(|e| Error::InvalidParameter {
        name: "index",
        reason: format!("cannot serialise a section: {e}"),
    })
}

impl Index {
    /// Saves the index to `path` atomically:
    /// a temporary file in the same directory, fsync, rename over `path`,
    /// fsync of the directory. Writers wait while the snapshot is taken in
    /// memory; searches do not. On error the previous file at `path` is
    /// untouched and the index is unchanged.
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric};
    /// let dir = std::env::temp_dir().join(format!("nann-doc-save-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir).unwrap();
    /// let path = dir.join("index.nann");
    ///
    /// let index = Index::new(IndexParams::new(2, Metric::L2))?;
    /// index.insert(7, &[1.0, 2.0])?;
    /// index.save(&path)?;
    ///
    /// let reopened = Index::open(&path)?;
    /// assert_eq!(reopened.search(&[1.0, 2.0], 1, 16)?[0].key, 7);
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.save_to(&FsStorage, path.as_ref())
    }

    /// [`save`](Self::save) through any [`Storage`] backend (the real file
    /// system is [`FsStorage`]; [`SimStorage`] simulates crashes and faults).
    pub fn save_to(&self, storage: &dyn Storage, path: &Path) -> Result<()> {
        let snapshot = self.snapshot(0)?;
        snapshot.write(storage, path)
    }

    /// Opens an index file from any [`Storage`] backend, validating all of
    /// it (as [`open_untrusted`](Self::open_untrusted)).
    pub fn open_from(storage: &dyn Storage, path: &Path) -> Result<Self> {
        let bytes = storage.read(path).map_err(|e| io::error("read", path, e))?;
        Self::from_bytes(&bytes)
    }

    /// The header and section archives of the current state, stamped with
    /// the update-log sequence number `log_lsn` it contains.
    pub(crate) fn snapshot(&self, log_lsn: u64) -> Result<Snapshot> {
        let (export, vectors, keys, live, level_counter) = {
            // Writers pause (searches do not) while the arrays are copied.
            let _quiescent = self.writer_gate.write();
            let slots = self.next_slot.load(Ordering::Acquire);
            let export = self.graph.export(slots);
            let guard = self.pin();
            let dim = self.params.dim;
            let mut vectors = Vec::with_capacity(slots * dim);
            let mut keys = Vec::with_capacity(slots);
            for slot in 0..slots as u32 {
                match self.graph.vector(slot, &guard) {
                    Some(v) => {
                        vectors.extend_from_slice(v.vector);
                        keys.push(self.graph.vectors.key(v.cell));
                    }
                    None => {
                        vectors.extend(std::iter::repeat_n(0.0f32, dim));
                        keys.push(0);
                    }
                }
            }
            (export, vectors, keys, self.len(), self.levels.position())
        };
        let parts = vec![
            archive(&export.level0)?,
            archive(&export.cells)?,
            archive(&export.anchors)?,
            archive(&export.upper)?,
            archive(&vectors)?,
            archive(&keys)?,
        ];
        let mut offset = header_len(SECTION_KINDS.len());
        let mut sections = Vec::with_capacity(parts.len());
        for (kind, bytes) in SECTION_KINDS.iter().zip(&parts) {
            offset = offset.next_multiple_of(SECTION_ALIGN);
            sections.push(Section {
                kind: *kind as u32,
                align: SECTION_ALIGN as u32,
                offset,
                len: bytes.len() as u64,
                crc: crc32c::crc32c(bytes),
            });
            offset += bytes.len() as u64;
        }
        let (entry_slot, entry_level) = export
            .entry
            .map_or((u32::MAX, u32::MAX), |(s, l)| (s, l as u32));
        let header = Header {
            version: VERSION,
            rkyv: RkyvFormat::current(),
            metric: self.params.metric,
            dim: self.params.dim as u32,
            m: self.params.m as u32,
            ef_construction: self.params.ef_construction as u32,
            seed: self.params.seed,
            level_counter,
            slots: export.cells.len() as u64,
            live: live as u64,
            upper_count: export.upper_count as u64,
            entry_slot,
            entry_level,
            log_lsn,
            file_len: offset,
            sections,
        };
        Ok(Snapshot { header, parts })
    }

    /// Opens an index saved by [`Index::save`], validating all of it first
    /// (header and its checksum, section bounds and checksums, rkyv's
    /// bytecheck, array structure, then every invariant of
    /// [`Index::check_invariants`]): a damaged or hostile file gives
    /// [`Error::Format`], never a panic.
    ///
    /// The file is memory-mapped while it is read. **Contract:** no process
    /// may modify or truncate the file during the call (nann's own `save`
    /// never does: it renames a new file over the old one). This version
    /// copies the data into the returned index, so the file is not used
    /// afterwards.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| io::error("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| io::error("stat", path, e))?
            .len();
        if len == 0 {
            return Err(FormatError::Truncated {
                needed: header_len(SECTION_KINDS.len()),
                found: 0,
            }
            .into());
        }
        // SAFETY: the mapping is read-only and private to this call; the
        // function's documented contract is that no one modifies or truncates
        // the file while it runs. memmap2 cannot enforce that, which is why it
        // marks `map` unsafe; within the contract the bytes stay valid for the
        // lifetime of `map`, which ends before this function returns.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io::error("mmap", path, e))?;
        Self::from_bytes(&map)
    }

    /// Opens an index from a file that may come from anywhere: it is read
    /// into an aligned heap buffer (never mapped, so a concurrent truncation
    /// cannot crash the process) and validated completely.
    pub fn open_untrusted(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| io::error("read", path, e))?;
        Self::from_bytes(&bytes)
    }

    /// Builds an index from the bytes of a saved file, validating all of it.
    /// `bytes` need not be aligned (a misaligned buffer is copied first).
    ///
    /// ```
    /// use nann::{Error, Index, IndexParams, Metric};
    /// assert!(matches!(Index::from_bytes(b"not an index"), Err(Error::Format(_))));
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if !(bytes.as_ptr() as usize).is_multiple_of(SECTION_ALIGN as usize) {
            let mut aligned = rkyv::util::AlignedVec::<64>::with_capacity(bytes.len());
            aligned.extend_from_slice(bytes);
            return Self::from_aligned_bytes(&aligned);
        }
        Self::from_aligned_bytes(bytes)
    }

    fn from_aligned_bytes(file: &[u8]) -> Result<Self> {
        let header = Header::decode(file)?;
        for (kind, section) in SECTION_KINDS.iter().zip(&header.sections) {
            let bytes = header.section(file, *kind);
            if crc32c::crc32c(bytes) != section.crc {
                return Err(FormatError::SectionChecksum {
                    section: kind.name(),
                }
                .into());
            }
        }
        let level0 = access_u32(&header, file, SectionKind::Level0)?;
        let cells = access_u32(&header, file, SectionKind::Cells)?;
        let anchors = access_u32(&header, file, SectionKind::Anchors)?;
        let upper = access_u32(&header, file, SectionKind::Upper)?;
        let vectors = access_f32(&header, file)?;
        let keys = access_u64(&header, file)?;
        restore(&header, &level0, &cells, &anchors, &upper, &vectors, &keys)
    }
}

/// What a file's header says, from [`FileInfo::read`]: for tools such as the
/// `inspect` example. Reading it checks the header (magic, version, checksum,
/// format controls, section table) but not the sections.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct FileInfo {
    /// Format version.
    pub version: u32,
    /// Metric of the index.
    pub metric: crate::Metric,
    /// Vector dimension.
    pub dim: u32,
    /// M (M0 = 2M on layer 0).
    pub m: u32,
    /// ef_construction the index was built with.
    pub ef_construction: u32,
    /// Slots saved (live, removed and never published).
    pub slots: u64,
    /// Live entries.
    pub live: u64,
    /// Nodes with upper layers.
    pub upper_blocks: u64,
    /// Entry point slot and max level, if the graph is not empty.
    pub entry: Option<(u32, u32)>,
    /// The last update-log sequence number the snapshot contains (0 for a
    /// plain [`Index::save`]; see [`DurableIndex`](crate::DurableIndex)).
    pub log_lsn: u64,
    /// File length in bytes.
    pub file_len: u64,
    /// rkyv format controls of the writer: (big-endian, unaligned, pointer width in bytes).
    pub rkyv_format: (bool, bool, u8),
    /// Sections: (name, offset, length, CRC32C).
    pub sections: Vec<(&'static str, u64, u64, u32)>,
}

impl FileInfo {
    /// Decodes and checks the header of a saved index.
    ///
    /// ```
    /// assert!(nann::FileInfo::read(b"NANNIDX\0 but short").is_err());
    /// ```
    pub fn read(file: &[u8]) -> Result<Self> {
        let h = Header::decode(file)?;
        Ok(Self {
            version: h.version,
            metric: h.metric,
            dim: h.dim,
            m: h.m,
            ef_construction: h.ef_construction,
            slots: h.slots,
            live: h.live,
            upper_blocks: h.upper_count,
            entry: (h.entry_slot != u32::MAX).then_some((h.entry_slot, h.entry_level)),
            log_lsn: h.log_lsn,
            file_len: h.file_len,
            rkyv_format: (
                h.rkyv.big_endian != 0,
                h.rkyv.unaligned != 0,
                h.rkyv.pointer_width,
            ),
            sections: SECTION_KINDS
                .iter()
                .zip(&h.sections)
                .map(|(k, s)| (k.name(), s.offset, s.len, s.crc))
                .collect(),
        })
    }
}

fn corrupt(message: impl Into<String>) -> Error {
    FormatError::Corrupt(message.into()).into()
}

fn archive_error(kind: SectionKind, e: rancor::Error) -> Error {
    FormatError::Archive {
        section: kind.name(),
        message: e.to_string(),
    }
    .into()
}

fn access_u32(header: &Header, file: &[u8], kind: SectionKind) -> Result<Vec<u32>> {
    let bytes = header.section(file, kind);
    let archived = rkyv::access::<rkyv::Archived<Vec<u32>>, rancor::Error>(bytes)
        .map_err(|e| archive_error(kind, e))?;
    Ok(archived.iter().map(|w| w.to_native()).collect())
}

fn access_f32(header: &Header, file: &[u8]) -> Result<Vec<f32>> {
    let kind = SectionKind::Vectors;
    let bytes = header.section(file, kind);
    let archived = rkyv::access::<rkyv::Archived<Vec<f32>>, rancor::Error>(bytes)
        .map_err(|e| archive_error(kind, e))?;
    Ok(archived.iter().map(|w| w.to_native()).collect())
}

fn access_u64(header: &Header, file: &[u8]) -> Result<Vec<u64>> {
    let kind = SectionKind::Keys;
    let bytes = header.section(file, kind);
    let archived = rkyv::access::<rkyv::Archived<Vec<u64>>, rancor::Error>(bytes)
        .map_err(|e| archive_error(kind, e))?;
    Ok(archived.iter().map(|w| w.to_native()).collect())
}

/// Checks the arrays against the header and each other, rebuilds the index,
/// and runs the invariant checker on it.
fn restore(
    header: &Header,
    level0: &[u32],
    cells: &[u32],
    anchors: &[u32],
    upper: &[u32],
    vectors: &[f32],
    keys: &[u64],
) -> Result<Index> {
    let params = IndexParams::new(header.dim as usize, header.metric)
        .m(header.m as usize)
        .ef_construction(header.ef_construction as usize)
        .seed(header.seed);
    params
        .validate()
        .map_err(|e| corrupt(format!("parameters: {e}")))?;
    let (dim, m) = (params.dim, params.m);
    let m0 = params.m0();
    let stride = 2 + m0;

    // Counts against array lengths (the arrays exist, so every count checked
    // here is bounded by the file length).
    let slots = cells.len();
    if header.slots != slots as u64 || slots > TOMBSTONE as usize {
        return Err(corrupt(format!(
            "the header says {} slots, the cells section holds {slots}",
            header.slots
        )));
    }
    let expect = |name: &str, got: usize, want: Option<usize>| -> Result<()> {
        if want != Some(got) {
            return Err(corrupt(format!(
                "section {name} holds {got} values, {slots} slots need {want:?}"
            )));
        }
        Ok(())
    };
    expect("level0", level0.len(), slots.checked_mul(stride))?;
    expect("anchors", anchors.len(), Some(slots))?;
    expect("keys", keys.len(), Some(slots))?;
    expect("vectors", vectors.len(), slots.checked_mul(dim))?;

    // Upper blocks: walk the section; every block needs >= 1 word, so the
    // count is bounded by the section's length before the table is built.
    let upper_count = usize::try_from(header.upper_count).unwrap_or(usize::MAX);
    if upper_count > upper.len() || upper_count >= 1 << (32 - crate::graph::DEGREE_BITS) {
        return Err(corrupt(format!(
            "{upper_count} upper blocks cannot fit in {} words",
            upper.len()
        )));
    }
    let mut upper_blocks = Vec::with_capacity(upper_count);
    let mut at = 0usize;
    for index in 0..upper_count {
        let level = upper[at] as usize;
        if !(1..=MAX_LEVEL).contains(&level) {
            return Err(corrupt(format!("upper block {index} has level {level}")));
        }
        let words = level * (1 + m);
        let block = upper
            .get(at + 1..at + 1 + words)
            .ok_or_else(|| corrupt(format!("upper block {index} runs past its section")))?;
        upper_blocks.push((level, block));
        at += 1 + words;
        if index + 1 < upper_count && at >= upper.len() {
            return Err(corrupt("the upper section ends before its last block"));
        }
    }
    if at != upper.len() {
        return Err(corrupt("the upper section has trailing words"));
    }

    // Level-0 records: degree bounds and the upper-block references (each
    // block owned by at most one slot).
    let mut owner = vec![false; upper_count];
    for (slot, record) in level0.chunks_exact(stride).enumerate() {
        let meta = record[1];
        let degree = (meta & ((1 << crate::graph::DEGREE_BITS) - 1)) as usize;
        if degree > m0 {
            return Err(corrupt(format!(
                "slot {slot}: layer-0 degree {degree} exceeds M0 = {m0}"
            )));
        }
        let index = (meta >> crate::graph::DEGREE_BITS) as usize;
        if index > 0 {
            let taken = owner.get_mut(index - 1).ok_or_else(|| {
                corrupt(format!("slot {slot}: upper block {index} does not exist"))
            })?;
            if std::mem::replace(taken, true) {
                return Err(corrupt(format!(
                    "slot {slot}: upper block {index} belongs to two slots"
                )));
            }
        }
    }
    if owner.iter().any(|&o| !o) {
        return Err(corrupt("an upper block belongs to no slot"));
    }

    // Cell words: the slot itself (saved files renumber cells), maybe with
    // the tombstone bit, or never published.
    let mut live = 0usize;
    for (slot, &word) in cells.iter().enumerate() {
        if word == NO_CELL {
            continue;
        }
        if word & !TOMBSTONE != slot as u32 {
            return Err(corrupt(format!("slot {slot}: cell word {word:#x}")));
        }
        live += usize::from(word & TOMBSTONE == 0);
    }
    if header.live != live as u64 {
        return Err(corrupt(format!(
            "the header says {} live entries, the cells section has {live}",
            header.live
        )));
    }
    let entry = match (header.entry_slot, header.entry_level) {
        (u32::MAX, u32::MAX) => None,
        (slot, level) if (slot as usize) < slots && (level as usize) <= MAX_LEVEL => {
            Some((slot, level as usize))
        }
        (slot, level) => {
            return Err(corrupt(format!(
                "entry point slot {slot} at level {level} is out of range"
            )))
        }
    };
    if entry.is_none() && slots > 0 && cells.iter().any(|&w| w != NO_CELL) {
        return Err(corrupt("a non-empty graph has no entry point"));
    }

    // Rebuild. Vectors go through the arena's allocator in slot order, so
    // cell i is slot i's.
    let index = Index::new(params.capacity(slots.max(1)))?;
    for slot in 0..slots {
        let v = &vectors[slot * dim..(slot + 1) * dim];
        let cell = index.graph.vectors.allocate(keys[slot], v)?;
        if cell as usize != slot {
            return Err(corrupt("internal: cell numbering"));
        }
    }
    index.graph.reserve_slots(slots)?;
    index.graph.import(&GraphImport {
        level0,
        cells,
        anchors,
        upper_blocks,
        entry,
    })?;
    {
        let mut free = index.free_slots.lock();
        for (slot, &word) in cells.iter().enumerate() {
            if word == NO_CELL || word & TOMBSTONE != 0 {
                free.push(slot as u32);
            } else if !index
                .keys
                .insert(keys[slot], slot as u32, |s| index.key_at(s))
            {
                return Err(corrupt(format!("key {} is live in two slots", keys[slot])));
            }
        }
    }
    // Relaxed: the index is not shared yet.
    index.next_slot.store(slots, Ordering::Relaxed);
    index.live.store(live, Ordering::Relaxed);
    index.levels.set_position(header.level_counter);
    index
        .check_invariants()
        .map_err(|e| Error::Format(FormatError::Invariant(e)))?;
    Ok(index)
}
