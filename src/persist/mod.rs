//! Saving and opening index files (format versions 1 and 2).
//!
//! # File layout
//!
//! ```text
//!  offset 0   ┌────────────────────────────────────────────────┐
//!             │ fixed header (128 bytes), little-endian,        │
//!             │ decoded by hand: magic "NANNIDX\0", version     │
//!             │ (1, or 2 with payloads), rkyv controls          │
//!             │ (endianness, alignment, pointer width), metric, │
//!             │ dim, M, ef_construction, section count, level   │
//!             │ seed + position, slots, live, upper blocks,     │
//!             │ file length, entry, log lsn; v2 only: payload   │
//!             │ length u32 at offset 96 (1..=65536); zeros      │
//!             │ section table: kind, align, offset, len, CRC32C │
//!             │ (6 entries in v1, 7 in v2)                      │
//!             │ CRC32C of everything above                      │
//!  64-aligned ├────────────────────────────────────────────────┤
//!             │ level0   rkyv Vec<u32>  slots x (2 + M0)        │
//!             │ cells    rkyv Vec<u32>  slot | tombstone bit    │
//!             │ anchors  rkyv Vec<u32>  per slot                │
//!             │ upper    rkyv Vec<u32>  [level, lists] / block  │
//!             │ vectors  rkyv Vec<f32>  slots x dim             │
//!             │ keys     rkyv Vec<u64>  per slot                │
//!             │ payloads rkyv Vec<u32>  slots x ceil(len / 4)   │ v2 only
//!             └────────────────────────────────────────────────┘
//! ```
//!
//! # Storage backends
//!
//! Every byte goes through a [`Storage`]: [`FsStorage`] is the disk, and
//! [`SimStorage`] keeps files in memory and can simulate a power loss, so
//! a test can check what survives one:
//!
//! ```
//! use std::path::Path;
//! use nann::persist::SimStorage;
//! use nann::{Index, IndexParams, Metric};
//! let storage = SimStorage::new(42);
//! let index = Index::new(IndexParams::new(2, Metric::L2))?;
//! index.insert(1, &[0.5, 0.5])?;
//! let path = Path::new("/data/index.nann");
//! # use nann::persist::Storage;
//! # storage.create_dir_all(Path::new("/data")).unwrap();
//! index.save_to(&storage, path)?; // temp file, fsync, rename, directory fsync
//! storage.crash(); // everything not fsynced is lost
//! let reopened = Index::open_from(&storage, path)?;
//! assert_eq!(reopened.get(1)?, vec![0.5, 0.5]);
//! # Ok::<(), nann::Error>(())
//! ```
//!
//! A saved file holds exactly one vector per slot (cell ids are renumbered to
//! slot ids), so the garbage cells of past updates are never written.
//!
//! An index without payloads is written as version 1, byte for byte as
//! before version 2 existed; an index with payloads
//! ([`IndexParams::payload_len`]) as version 2: the same sections plus
//! `payloads`, one run of `ceil(payload_len / 4)` little-endian words per
//! slot (the payload's bytes in order, the last word zero-padded; zeros for
//! a slot without an entry), laid out like the vectors so that `open`
//! serves them from the file too. This build reads both versions.
//!
//! # Validation order
//!
//! 1. The header, by hand (`format.rs`): magic, version, header checksum, the
//!    rkyv format controls of the writer against this build's, metric, and a
//!    section table whose sections lie inside the file (checked arithmetic),
//!    64-byte aligned, in order, without overlap. The file length in the
//!    header must match.
//! 2. Section checksums (CRC32C): by [`Index::open_untrusted`] and
//!    [`Index::from_bytes`]; [`Index::open`] leaves them to
//!    [`Index::verify_checksums`] (below).
//! 3. `rkyv::access` (bytecheck) on each section.
//! 4. Structure: every array length against the header's counts (checked
//!    multiplication; the payload section against slots x words of the
//!    header's payload length), lock words, degrees, upper-block table, cell words,
//!    entry point, live count: all before anything is allocated from a count.
//! 5. The index is built and [`Index::check_invariants`] runs on it (rkyv
//!    does not know what a neighbour id or an anchor is); only an index that
//!    passes is returned.
//! 6. Every stored vector finite ([`Index::check_vectors`]) and the padding
//!    after every payload zero: with step 2, by [`Index::open_untrusted`]
//!    and [`Index::from_bytes`] (content checks: neither can make the index
//!    unsafe; padding is never returned).
//!
//! A damaged or hostile file gives an [`Error::Format`], never a panic.
//! Checksums are not authentication: validation does not rely on them
//! (a forged file with correct checksums still meets steps 4 and 5).
//! `unsafe` [`Index::open_unchecked`] runs step 1 only.
//!
//! # Serving from the file (zero-copy)
//!
//! ```text
//!   file on disk ──mmap MAP_PRIVATE──► mapping (copy-on-write, owned by an Arc)
//!                                        │ level0 │ cells │ anchors │ vectors │ keys │ payloads │
//!                                        └───┬────┴───┬───┴────┬────┴────┬────┴──┬───┴────┬─────┘
//!   Index ── Graph ── chunk 0 of each array ─┘        └────────┴─────────┴───────┴────────┘
//!                 └── chunks 1.. (heap, grown by later inserts, 1/32 of the file each)
//!   upper-layer blocks, key map: rebuilt on the heap (about 1/16 of the nodes;
//!   n small entries); `open_unchecked` fills the key map on first use
//! ```
//!
//! The per-slot arrays of the file *are* the index's arrays: the archived
//! `u32`/`u64`/`f32` little-endian values are the native ones on little-endian
//! targets, so chunk 0 of every array borrows the mapping (big-endian targets
//! copy). Writes to the opened index (inserts, updates, removes) write those
//! pages, and the private mapping turns each first write into a private copy
//! of that page: the file never changes, and memory grows only with the pages
//! actually written. `open_untrusted` does the same over an aligned heap copy.
//!
//! Why checksums and finite vectors are not part of [`Index::open`]: they are
//! the checks that read the vectors (most of the file: 256 of 394 MiB for
//! 1M x 64, and page faults, not arithmetic, are most of a mapped open's
//! cost), and they are about the data, not the structure: a flipped bit in
//! a vector or a NaN cannot make a search unsafe, panic or loop, while
//! steps 3-5 rule out everything that could. A service that wants the
//! guarantee calls [`Index::verify_checksums`] (one CRC32C pass over a
//! read-only view of the file, ~38 ms for a 394 MiB file on the benchmark
//! machine) and [`Index::check_vectors`] when it can afford them;
//! [`Index::open_untrusted`] always runs both.
//!
//! # Where a validated open spends its time
//!
//! For a 1M x 64 file (394 MiB, page cache warm, 2 cores) a validated open
//! takes ~45-60 ms, ~0.08x hnswlib's `load_index` of the same data
//! (BENCHMARKS.md). It reads the level-0 records once: one structure pass,
//! on every core, checks each record (lock word, degree, upper-block
//! reference, cell word) and, while the record is in cache, runs the
//! invariant check's per-list test on its layer-0 list (`save` writes
//! every list sorted, so range, self-loop and duplicates cost one
//! vectorised comparison per id) and gathers the per-slot facts the
//! invariant check would otherwise re-read (`invariants::SlotSummary`).
//! Upper-layer lists are tested block by block in the same way. Then the
//! key map is filled (16 shards, each filled by one worker, foldhash), and
//! the invariant check adds only what needs the whole graph: the entry
//! point, the key-map count, and the anchor tree (one random read of each
//! node's anchor list, then the anchor paths). The vectors are not read at
//! all (see above). The durable update log and `checkpoint` are
//! [`DurableIndex`](crate::DurableIndex); every byte of a save goes through
//! the [`Storage`] seam (a mapped open reads the real file system only).
//!
//! # Saving
//!
//! [`Index::save`] takes a snapshot while writers are paused (searches keep
//! running), then writes a temporary file in the target's directory, fsyncs
//! it, renames it over the target and fsyncs the directory. It never writes
//! to an existing file, so a file another process has mapped is never
//! modified under it, and a failed save leaves the previous file intact.

mod format;
pub(crate) mod io;
pub(crate) mod log;
mod sim;
mod storage;

pub(crate) use io::error as io_error;
pub use io::{SYNC_SNAPSHOT_DIR, SYNC_SNAPSHOT_FILE};
pub use log::{Durability, SYNC_LOG_DIR, SYNC_LOG_FILE};
pub use sim::SimStorage;
pub use storage::{FsStorage, Storage, StorageFile, StorageLock, LOCK_FILE};

use std::path::Path;

use rkyv::rancor;

use crate::error::{Error, InvariantViolation, Result};
use std::borrow::Cow;
use std::ptr::NonNull;

use crate::graph::{BorrowedArrays, Graph, GraphImport, MAX_LEVEL, NO_CELL, TOMBSTONE};
use crate::index::Index;
use crate::invariants::SlotSummary;
use crate::keymap::KeyMap;
use crate::params::IndexParams;
use crate::sync::Ordering;

use format::{
    header_len, section_kinds, Section, SECTION_ALIGN, SECTION_KINDS, VERSION_PAYLOADS,
    VERSION_PLAIN,
};
pub(crate) use format::{Header, RkyvFormat, SectionKind};

/// Why a file is not a valid index.
///
/// Opening never trusts a file: a damaged or hostile one is one of these,
/// wrapped in [`Error::Format`], never a panic.
///
/// ```
/// use nann::{Error, FormatError, Index};
/// let opened = Index::from_bytes(b"certainly not an index, but long enough to have a header ......................................................................................................");
/// assert!(matches!(opened, Err(Error::Format(FormatError::NotAnIndex))), "{opened:?}");
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The magic bytes are wrong.
    #[error("not a nann index file (wrong magic bytes)")]
    NotAnIndex,
    /// Written by another format version.
    #[error(
        "index format version {found} is not supported by this build (it reads versions 1 and 2)"
    )]
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

/// A consistent copy of an index, ready to be written: the header and the
/// rkyv archives of its sections, in file order.
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

/// A payload (at most `words * 4` bytes) as the little-endian words of the
/// `payloads` section, the last one zero-padded.
fn payload_to_words(payload: &[u8], words: usize) -> impl Iterator<Item = u32> + '_ {
    (0..words).map(move |i| {
        let mut bytes = [0u8; 4];
        let from = payload.get(i * 4..).unwrap_or(&[]);
        let n = from.len().min(4);
        bytes[..n].copy_from_slice(&from[..n]);
        u32::from_le_bytes(bytes)
    })
}

/// The first `len` bytes of a slot's payload words (the inverse of
/// [`payload_to_words`]).
fn payload_from_words(words: &[u32], len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    out.truncate(len);
    out
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
    /// memory; searches do not. The index is unchanged on error. An error
    /// before the rename leaves the previous file at `path` untouched; one
    /// from the directory fsync after it (the last step) means `path` holds
    /// the new file, which a power loss may still undo. A symlink at `path`
    /// is replaced by the file, not written through.
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
        let payload_len = self.params.payload_len;
        // Version 1 (byte for byte what it always was) without payloads,
        // version 2 with them.
        let version = if payload_len > 0 {
            VERSION_PAYLOADS
        } else {
            VERSION_PLAIN
        };
        let payload_words = payload_len.div_ceil(4);
        let (export, vectors, keys, payloads, live, level_counter) = {
            // Writers pause (searches do not) while the arrays are copied.
            let _quiescent = self.writer_gate.write();
            let slots = self.next_slot.load(Ordering::Acquire);
            let export = self.graph.export(slots);
            let guard = self.pin();
            let dim = self.params.dim;
            let mut vectors = Vec::with_capacity(slots * dim);
            let mut keys = Vec::with_capacity(slots);
            let mut payloads: Vec<u32> = Vec::with_capacity(slots * payload_words);
            let mut payload = Vec::with_capacity(payload_len);
            for slot in 0..slots as u32 {
                match self.graph.vector(slot, &guard) {
                    Some(v) => {
                        vectors.extend_from_slice(v.vector);
                        keys.push(self.graph.vectors.key(v.cell));
                        if payload_len > 0 {
                            payload.clear();
                            self.graph
                                .vectors
                                .payload_into(v.cell, &guard, &mut payload);
                            payloads.extend(payload_to_words(&payload, payload_words));
                        }
                    }
                    None => {
                        vectors.extend(std::iter::repeat_n(0.0f32, dim));
                        keys.push(0);
                        payloads.extend(std::iter::repeat_n(0u32, payload_words));
                    }
                }
            }
            (
                export,
                vectors,
                keys,
                payloads,
                self.len(),
                self.levels.position(),
            )
        };
        let mut parts = vec![
            archive(&export.level0)?,
            archive(&export.cells)?,
            archive(&export.anchors)?,
            archive(&export.upper)?,
            archive(&vectors)?,
            archive(&keys)?,
        ];
        if version == VERSION_PAYLOADS {
            parts.push(archive(&payloads)?);
        }
        let kinds = section_kinds(version).unwrap_or(&SECTION_KINDS);
        let mut offset = header_len(kinds.len());
        let mut sections = Vec::with_capacity(parts.len());
        for (kind, bytes) in kinds.iter().zip(&parts) {
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
            version,
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
            payload_len: payload_len as u32,
            sections,
        };
        Ok(Snapshot { header, parts })
    }

    /// Opens an index saved by [`Index::save`] **without copying it**: the
    /// file is memory-mapped copy-on-write (`MAP_PRIVATE`) and the index
    /// serves searches straight from the mapping. Writes to the opened index
    /// (inserts, updates, removes) land in private copies of the touched
    /// pages; the file itself is never modified.
    ///
    /// Validation, in order, none of it skipped: the header and its checksum,
    /// section bounds, rkyv's bytecheck of every section, the array structure
    /// (counts, degrees, lock words, cell words, upper blocks, entry point),
    /// then every invariant of [`Index::check_invariants`]. A damaged or
    /// hostile file gives [`Error::Format`], never a panic.
    ///
    /// Two *content* checks are not made here, because they are the two that
    /// read the vectors, most of the file's bytes, and the checks above
    /// already make any file safe to serve: the section checksums
    /// ([`verify_checksums`](Self::verify_checksums): silent media damage;
    /// a flipped bit in a vector is structurally valid) and the finiteness of
    /// every stored vector ([`check_vectors`](Self::check_vectors): a NaN
    /// written by a hostile or buggy writer only ranks its own entry
    /// wrongly). Call them when the file may be damaged or hostile, or use
    /// [`open_untrusted`](Self::open_untrusted), which runs both.
    ///
    /// # The mapping contract
    ///
    /// While the index is alive, no process may modify or truncate the file
    /// (truncation makes the process crash with `SIGBUS` on its next access
    /// to a lost page; a modification may show through pages the index has
    /// not written). nann's own [`save`](Self::save) never does either: it
    /// writes a new file and renames it over the old one, which leaves the
    /// mapped inode intact. Files that other programs may rewrite in place
    /// belong in [`open_untrusted`](Self::open_untrusted).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let (map, view) = map_file(path.as_ref())?;
        load(Backing::Map(map), Check::Structure, view)
    }

    /// [`open`](Self::open) without validation: the header is decoded and
    /// bounds-checked, nothing else (no checksums, no bytecheck, no structure
    /// or invariant checks), and the key map is filled on the first key
    /// operation instead of during the call. For files this program has just
    /// written or validated before, where the open must take milliseconds.
    ///
    /// # Safety
    ///
    /// The file must be an unmodified file written by [`Index::save`] (or
    /// [`DurableIndex`](crate::DurableIndex)) of this format version with
    /// this build's rkyv format controls, and the mapping contract of
    /// [`open`](Self::open) must hold. A file that would fail
    /// [`open`](Self::open)'s validation can make searches read out of bounds
    /// or loop forever.
    pub unsafe fn open_unchecked(path: impl AsRef<Path>) -> Result<Self> {
        let (map, view) = map_file(path.as_ref())?;
        load(Backing::Map(map), Check::Nothing, view)
    }

    /// Opens an index from a file that may come from anywhere: it is read
    /// into an aligned heap buffer (never mapped, so a concurrent truncation
    /// cannot crash the process) and validated completely, section checksums
    /// included. The index then serves from that buffer (no second copy).
    pub fn open_untrusted(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = std::fs::File::open(path).map_err(|e| io::error("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| io::error("stat", path, e))?
            .len();
        let mut buffer = rkyv::util::AlignedVec::<64>::new();
        // Grow as the file is read, never from its claimed length alone.
        use std::io::Read;
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut chunk)
                .map_err(|e| io::error("read", path, e))?;
            if n == 0 {
                break;
            }
            if buffer.is_empty() {
                buffer.reserve(usize::try_from(len).unwrap_or(0).min(1 << 34));
            }
            buffer.extend_from_slice(&chunk[..n]);
        }
        load(Backing::Heap(buffer), Check::All, None)
    }

    /// Builds an index from the bytes of a saved file, validating all of it
    /// (checksums included). The bytes are copied once into an aligned
    /// buffer that the index then serves from.
    ///
    /// ```
    /// use nann::{Error, Index, IndexParams, Metric};
    /// assert!(matches!(Index::from_bytes(b"not an index"), Err(Error::Format(_))));
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut aligned = rkyv::util::AlignedVec::<64>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        load(Backing::Heap(aligned), Check::All, None)
    }

    /// Checks the section checksums of the file this index was opened from
    /// with [`open`](Self::open) or [`open_unchecked`](Self::open_unchecked)
    /// (a read-only view of the file, so the index's own writes do not
    /// count). `Ok` for an index that was built in memory or read with
    /// [`open_untrusted`](Self::open_untrusted) / [`from_bytes`](Self::from_bytes),
    /// whose checksums were checked when it was read.
    ///
    /// Cost: one pass over the file at CRC32C speed (several GB/s).
    pub fn verify_checksums(&self) -> Result<()> {
        match &self.origin {
            Some(origin) => {
                let header = Header::decode(&origin[..])?;
                check_checksums(&header, &origin[..])
            }
            None => Ok(()),
        }
    }
}

/// What to check before an index is built over a file's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Everything, section checksums and finite vectors included.
    All,
    /// Everything but the content checks, section checksums and finite
    /// vectors (see [`Index::open`]).
    Structure,
    /// The header only (see [`Index::open_unchecked`]).
    Nothing,
}

/// The memory an opened index serves from.
enum Backing {
    /// A private copy-on-write mapping of the file.
    Map(memmap2::MmapMut),
    /// An aligned heap copy of the file.
    Heap(rkyv::util::AlignedVec<64>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Map(map) => map,
            Backing::Heap(buffer) => buffer,
        }
    }

    fn base_mut(&mut self) -> *mut u8 {
        match self {
            Backing::Map(map) => map.as_mut_ptr(),
            Backing::Heap(buffer) => buffer.as_mut_ptr(),
        }
    }
}

/// Maps `path` privately (copy-on-write) for the index, and read-only for
/// [`Index::verify_checksums`].
fn map_file(path: &Path) -> Result<(memmap2::MmapMut, Option<memmap2::Mmap>)> {
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
    // SAFETY: memmap2 marks mapping unsafe because another process could
    // modify or truncate the file while it is mapped. `Index::open`'s
    // documented contract excludes that for the index's lifetime, which is
    // as long as either mapping lives (both are owned by the index). Within
    // the contract the bytes are plain initialised memory; the private
    // mapping is written only by this process, through the index's arrays.
    let private = unsafe { memmap2::MmapOptions::new().map_copy(&file) }
        .map_err(|e| io::error("mmap", path, e))?;
    // SAFETY: as above; this mapping is never written.
    let view = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io::error("mmap", path, e))?;
    Ok((private, Some(view)))
}

fn check_checksums(header: &Header, file: &[u8]) -> Result<()> {
    for (kind, section) in header.kinds().iter().zip(&header.sections) {
        let bytes = header.section(file, *kind);
        if crc32c::crc32c(bytes) != section.crc {
            return Err(FormatError::SectionChecksum {
                section: kind.name(),
            }
            .into());
        }
    }
    Ok(())
}

/// Validates `backing` as far as `check` says and builds an index over it:
/// in place on little-endian targets (the index borrows the per-slot arrays
/// and vectors; see `Graph::from_borrowed`), by copying elsewhere.
fn load(mut backing: Backing, check: Check, origin: Option<memmap2::Mmap>) -> Result<Index> {
    let file = backing.bytes();
    let header = Header::decode(file)?;
    if check == Check::All {
        check_checksums(&header, file)?;
    }
    let sections = if check == Check::Nothing {
        // SAFETY: `open_unchecked`'s contract: the file is an unmodified
        // save of this format, so every section is a valid archive.
        unsafe { Sections::access_unchecked(&header, file) }
    } else {
        Sections::access(&header, file)?
    };
    let mut layout = check_structure(&header, &sections, check != Check::Nothing)?;
    if check == Check::All {
        check_payload_padding(layout.params.payload_len, &sections.payloads)?;
    }
    let Some(offsets) = sections.borrowable(file) else {
        let index = restore_by_copy(&header, &layout, &sections)?;
        return finish(index, check, origin, None);
    };
    let summary = layout.summary.take();
    // Upper blocks: used in place (byte offset and word count of each) when
    // the section is a native view of the file, else copied now.
    let upper_in_place = sections.upper_in_place(file, &layout.upper_blocks);
    let upper_copied = upper_in_place
        .is_none()
        .then(|| crate::graph::PreparedUpper::new(&layout.upper_blocks));
    let (params, slots, live, entry) = (layout.params, layout.slots, layout.live, layout.entry);
    drop(sections);
    let base = backing.base_mut();
    let keepalive: crate::storage::Keepalive = std::sync::Arc::new(backing);
    // SAFETY: `borrowable` returned byte offsets of the five arrays (six
    // with payloads) inside the backing, each in bounds for `slots` records
    // of its array (`payload_len.div_ceil(4) >= 1` words per slot for
    // payloads, which are present only when non-empty; lengths checked
    // against the header by `check_structure`, or guaranteed by
    // `open_unchecked`'s contract) and aligned for its element type. The
    // backing is owned by `keepalive` (moving it into the Arc moved neither
    // the mapping nor the heap buffer), and from here on it is accessed only
    // through the graph's arrays: `base` came from `&mut` access, and the
    // shared borrows used for validation ended with `drop(sections)`.
    let graph = unsafe {
        Graph::from_borrowed(
            params.dim,
            params.m,
            BorrowedArrays {
                slots,
                level0: NonNull::new_unchecked(base.add(offsets.level0).cast()),
                cells: NonNull::new_unchecked(base.add(offsets.cells).cast()),
                anchors: NonNull::new_unchecked(base.add(offsets.anchors).cast()),
                vectors: NonNull::new_unchecked(base.add(offsets.vectors).cast()),
                keys: NonNull::new_unchecked(base.add(offsets.keys).cast()),
                payloads: offsets.payloads.map(|at| {
                    (
                        NonNull::new_unchecked(base.add(at).cast()),
                        params.payload_len,
                    )
                }),
                keepalive,
            },
        )?
    };
    let upper = match (upper_in_place, upper_copied) {
        (Some(blocks), _) => {
            let blocks = blocks
                .into_iter()
                .map(|(level, start, len)| {
                    // SAFETY: `upper_in_place` checked that `start..start +
                    // 4 * len` lies inside the backing and is 4-aligned.
                    let first = unsafe { NonNull::new_unchecked(base.add(start).cast()) };
                    (level, NonNull::slice_from_raw_parts(first, len))
                })
                .collect();
            // SAFETY: each block's words are in bounds and aligned (above),
            // disjoint from every other array the graph borrows (they are
            // the upper section's, and sections do not overlap: checked by
            // `Header::decode`), and live in the backing that `keepalive`,
            // now the graph's, holds for the graph's whole life. The shared
            // borrows used for validation ended with `drop(sections)`.
            unsafe { crate::graph::PreparedUpper::borrowed(blocks) }
        }
        (None, Some(copied)) => copied,
        (None, None) => crate::graph::PreparedUpper::new(&[]),
    };
    graph.import_upper(upper, entry)?;
    let index = Index::from_graph(params, graph, KeyMap::deferred())?;
    let (summary, free) = match summary {
        Some((summary, free)) => (Some(summary), free),
        None => {
            let free = (0..slots as u32)
                .filter(|&slot| {
                    let word = index.graph.cell_word(slot);
                    word == NO_CELL || word & TOMBSTONE != 0
                })
                .collect();
            (None, free)
        }
    };
    *index.free_slots.lock() = free;
    // Relaxed: the index is not shared yet.
    index.next_slot.store(slots, Ordering::Relaxed);
    index.live.store(live, Ordering::Relaxed);
    index.levels.set_position(header.level_counter);
    let mut index = index;
    if check != Check::Nothing {
        index.keys = key_map_rejecting_duplicates(&index)?;
    }
    finish(index, check, origin, summary)
}

/// The key map of a freshly loaded index, filled from its live slots; a key
/// live in two slots makes the file corrupt.
fn key_map_rejecting_duplicates(index: &Index) -> Result<KeyMap> {
    let map = KeyMap::default();
    // Relaxed: the index is not shared yet.
    let slots = index.next_slot.load(Ordering::Relaxed) as u32;
    map.fill_unique(slots, |s| index.live_key(s), |s| index.key_at(s))
        .map_err(|key| corrupt(format!("key {key} is live in two slots")))?;
    Ok(map)
}

/// Runs the invariant checker (unless unchecked), the vector check (with
/// the checksums: `Check::All`) and records the file's
/// read-only view for [`Index::verify_checksums`]. The key map was filled
/// from the slots just before, rejecting duplicates, so its lookups are
/// trusted (the set of mapped slots is still checked).
fn finish(
    mut index: Index,
    check: Check,
    origin: Option<memmap2::Mmap>,
    summary: Option<SlotSummary>,
) -> Result<Index> {
    if check != Check::Nothing {
        index
            .check_invariants_with(crate::invariants::KeyLookups::TrustFreshMap, summary)
            .map_err(|e| Error::Format(FormatError::Invariant(e)))?;
    }
    if check == Check::All {
        index
            .check_vectors()
            .map_err(|e| Error::Format(FormatError::Invariant(e)))?;
    }
    index.origin = origin;
    Ok(index)
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
    /// Payload bytes per entry (0: none; format version 2 only).
    pub payload_len: u32,
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
            payload_len: h.payload_len,
            rkyv_format: (
                h.rkyv.big_endian != 0,
                h.rkyv.unaligned != 0,
                h.rkyv.pointer_width,
            ),
            sections: h
                .kinds()
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

/// The sections of a file as typed slices of the file's own bytes.
/// Borrowed where the archived layout is the native one (little-endian
/// targets), converted copies otherwise.
struct Sections<'f> {
    level0: Cow<'f, [u32]>,
    cells: Cow<'f, [u32]>,
    anchors: Cow<'f, [u32]>,
    upper: Cow<'f, [u32]>,
    vectors: Cow<'f, [f32]>,
    keys: Cow<'f, [u64]>,
    /// Empty in a version-1 file (no payloads).
    payloads: Cow<'f, [u32]>,
}

/// Byte offsets, inside the file, of the arrays an index can borrow.
struct Offsets {
    level0: usize,
    cells: usize,
    anchors: usize,
    vectors: usize,
    keys: usize,
    /// `None` when the file holds no payloads.
    payloads: Option<usize>,
}

/// Archived element types whose bytes, on a little-endian target, are the
/// native type's bytes: `rend`'s `u32_le` and friends are `repr(C)` wrappers
/// of the primitive with the same size and alignment, holding it
/// little-endian.
trait LeScalar: Sized {
    type Native: Copy + 'static;
    #[cfg_attr(target_endian = "little", allow(dead_code))]
    fn to_native(&self) -> Self::Native;
}

macro_rules! le_scalar {
    ($($archived:ty => $native:ty),*) => {$(
        impl LeScalar for $archived {
            type Native = $native;
            fn to_native(&self) -> $native {
                <$archived>::to_native(*self)
            }
        }
    )*};
}
le_scalar!(rkyv::rend::u32_le => u32, rkyv::rend::u64_le => u64, rkyv::rend::f32_le => f32);

/// `archived` as native values: borrowed on little-endian targets, where
/// the layouts agree (see [`LeScalar`]), copied otherwise.
fn native<A: LeScalar>(archived: &[A]) -> Cow<'_, [A::Native]> {
    #[cfg(target_endian = "little")]
    {
        const {
            assert!(std::mem::size_of::<A>() == std::mem::size_of::<A::Native>());
            assert!(std::mem::align_of::<A>() >= std::mem::align_of::<A::Native>());
        }
        // SAFETY: on a little-endian target `A` (a rend `*_le` type) is a
        // `repr(C)` wrapper of exactly one `A::Native` holding its native
        // bits, with equal size and at least its alignment (asserted above
        // at compile time), so a slice of `A` is a valid slice of `A::Native`
        // of the same length; the borrow keeps the lifetime.
        Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(archived.as_ptr().cast::<A::Native>(), archived.len())
        })
    }
    #[cfg(not(target_endian = "little"))]
    {
        Cow::Owned(archived.iter().map(LeScalar::to_native).collect())
    }
}

type ArchivedVec<T> = rkyv::vec::ArchivedVec<T>;

impl<'f> Sections<'f> {
    /// Each section through `rkyv::access` (bytecheck).
    fn access(header: &Header, file: &'f [u8]) -> Result<Self> {
        fn one<'f, A: LeScalar + rkyv::Portable + 'f>(
            header: &Header,
            file: &'f [u8],
            kind: SectionKind,
        ) -> Result<Cow<'f, [A::Native]>>
        where
            ArchivedVec<A>: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rancor::Error>,
            >,
        {
            let archived =
                rkyv::access::<ArchivedVec<A>, rancor::Error>(header.section(file, kind))
                    .map_err(|e| archive_error(kind, e))?;
            Ok(native(archived.as_slice()))
        }
        Ok(Self {
            level0: one::<rkyv::rend::u32_le>(header, file, SectionKind::Level0)?,
            cells: one::<rkyv::rend::u32_le>(header, file, SectionKind::Cells)?,
            anchors: one::<rkyv::rend::u32_le>(header, file, SectionKind::Anchors)?,
            upper: one::<rkyv::rend::u32_le>(header, file, SectionKind::Upper)?,
            vectors: one::<rkyv::rend::f32_le>(header, file, SectionKind::Vectors)?,
            keys: one::<rkyv::rend::u64_le>(header, file, SectionKind::Keys)?,
            payloads: if header.kinds().contains(&SectionKind::Payloads) {
                one::<rkyv::rend::u32_le>(header, file, SectionKind::Payloads)?
            } else {
                Cow::Borrowed(&[])
            },
        })
    }

    /// Each section without bytecheck.
    ///
    /// # Safety
    /// Every section must be a valid archive of its vector (see
    /// [`Index::open_unchecked`]).
    unsafe fn access_unchecked(header: &Header, file: &'f [u8]) -> Self {
        /// # Safety
        /// As the caller's.
        unsafe fn one<'f, A: LeScalar + rkyv::Portable + 'f>(
            header: &Header,
            file: &'f [u8],
            kind: SectionKind,
        ) -> Cow<'f, [A::Native]> {
            let bytes = header.section(file, kind);
            if bytes.len() < std::mem::size_of::<ArchivedVec<A>>() {
                return Cow::Owned(Vec::new());
            }
            // SAFETY: the caller guarantees a valid archive of `Vec<A>`.
            native(unsafe { rkyv::access_unchecked::<ArchivedVec<A>>(bytes) }.as_slice())
        }
        // SAFETY (all seven): forwarded from this function's contract (a
        // version-1 file has no payload section: `section` gives no bytes,
        // and `one` an empty array without reading them).
        unsafe {
            Self {
                level0: one::<rkyv::rend::u32_le>(header, file, SectionKind::Level0),
                cells: one::<rkyv::rend::u32_le>(header, file, SectionKind::Cells),
                anchors: one::<rkyv::rend::u32_le>(header, file, SectionKind::Anchors),
                upper: one::<rkyv::rend::u32_le>(header, file, SectionKind::Upper),
                vectors: one::<rkyv::rend::f32_le>(header, file, SectionKind::Vectors),
                keys: one::<rkyv::rend::u64_le>(header, file, SectionKind::Keys),
                payloads: one::<rkyv::rend::u32_le>(header, file, SectionKind::Payloads),
            }
        }
    }

    /// Where the per-slot arrays lie in `file`, if an index can use them in
    /// place: all borrowed (not converted), non-empty, and aligned for the
    /// atomic types the graph views them as.
    /// Where each upper block's words lie in `file` (level, byte offset,
    /// word count), if the upper section is a native view of the file and
    /// every block is in bounds and 4-aligned; `None` means copy them.
    fn upper_in_place(
        &self,
        file: &[u8],
        blocks: &[(usize, &[u32])],
    ) -> Option<Vec<(usize, usize, usize)>> {
        let Cow::Borrowed(_) = self.upper else {
            return None;
        };
        blocks
            .iter()
            .map(|&(level, words)| {
                let start = (words.as_ptr() as usize).checked_sub(file.as_ptr() as usize)?;
                let end = start.checked_add(std::mem::size_of_val(words))?;
                (end <= file.len()
                    && (words.as_ptr() as usize)
                        .is_multiple_of(std::mem::align_of::<crate::sync::AtomicU32>()))
                .then_some((level, start, words.len()))
            })
            .collect()
    }

    fn borrowable(&self, file: &[u8]) -> Option<Offsets> {
        // A `&Cow`, not a slice: whether the array is borrowed is the point.
        #[allow(clippy::ptr_arg)]
        fn at<T: Clone>(array: &Cow<'_, [T]>, file: &[u8], align: usize) -> Option<usize> {
            let Cow::Borrowed(slice) = array else {
                return None;
            };
            let start = (slice.as_ptr() as usize).checked_sub(file.as_ptr() as usize)?;
            let end = start.checked_add(std::mem::size_of_val(*slice))?;
            (!slice.is_empty()
                && end <= file.len()
                && (slice.as_ptr() as usize).is_multiple_of(align))
            .then_some(start)
        }
        Some(Offsets {
            level0: at(
                &self.level0,
                file,
                std::mem::align_of::<crate::sync::AtomicU32>(),
            )?,
            cells: at(
                &self.cells,
                file,
                std::mem::align_of::<crate::sync::AtomicU32>(),
            )?,
            anchors: at(
                &self.anchors,
                file,
                std::mem::align_of::<crate::sync::AtomicU32>(),
            )?,
            vectors: at(&self.vectors, file, std::mem::align_of::<f32>())?,
            keys: at(
                &self.keys,
                file,
                std::mem::align_of::<crate::sync::AtomicU64>(),
            )?,
            payloads: if self.payloads.is_empty() {
                None
            } else {
                Some(at(
                    &self.payloads,
                    file,
                    std::mem::align_of::<crate::sync::AtomicU32>(),
                )?)
            },
        })
    }
}

/// What the structure checks established about a file.
struct Layout<'f> {
    params: IndexParams,
    slots: usize,
    live: usize,
    entry: Option<(u32, usize)>,
    /// (level, words) per upper block, in table order.
    upper_blocks: Vec<(usize, &'f [u32])>,
    /// What the thorough structure pass learnt per slot, for the invariant
    /// check (which then skips its own first pass and the layer-0 lists
    /// found sorted and in range), and the free slots (removed or never
    /// published), in slot order. `None` after an unchecked pass.
    summary: Option<(SlotSummary, Vec<u32>)>,
}

/// Checks the arrays against the header and each other. With `thorough`
/// false (unchecked opens) only what building the index needs is read:
/// parameters, the upper-block table and the header's counts.
fn check_structure<'f>(
    header: &Header,
    sections: &'f Sections<'_>,
    thorough: bool,
) -> Result<Layout<'f>> {
    let params = IndexParams::new(header.dim as usize, header.metric)
        .m(header.m as usize)
        .ef_construction(header.ef_construction as usize)
        .seed(header.seed)
        .payload_len(header.payload_len as usize);
    params
        .validate()
        .map_err(|e| corrupt(format!("parameters: {e}")))?;
    let (dim, m) = (params.dim, params.m);
    let m0 = params.m0();
    let stride = 2 + m0;
    let (level0, cells, upper) = (
        &sections.level0[..],
        &sections.cells[..],
        &sections.upper[..],
    );

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
    expect("anchors", sections.anchors.len(), Some(slots))?;
    expect("keys", sections.keys.len(), Some(slots))?;
    expect("vectors", sections.vectors.len(), slots.checked_mul(dim))?;
    // Payloads: one run of words per slot (none in a version-1 file).
    let payload_words = params.payload_len.div_ceil(4);
    let want = slots.checked_mul(payload_words);
    if want != Some(sections.payloads.len()) {
        return Err(corrupt(format!(
            "section payloads holds {} words, but {slots} slots of {}-byte payloads \
             ({payload_words} words each) need {}; the payload section or the header's \
             payload length is damaged",
            sections.payloads.len(),
            params.payload_len,
            want.map_or_else(|| "more than memory holds".to_string(), |w| w.to_string()),
        )));
    }

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
        let level = upper.get(at).copied().unwrap_or(0) as usize;
        if !(1..=MAX_LEVEL).contains(&level) {
            return Err(corrupt(format!("upper block {index} has level {level}")));
        }
        let words = level * (1 + m);
        let block = upper
            .get(at + 1..at + 1 + words)
            .ok_or_else(|| corrupt(format!("upper block {index} runs past its section")))?;
        upper_blocks.push((level, block));
        at += 1 + words;
    }
    if at != upper.len() {
        return Err(corrupt("the upper section has trailing words"));
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
    let live = usize::try_from(header.live).unwrap_or(usize::MAX);
    if !thorough {
        return Ok(Layout {
            params,
            slots,
            live,
            entry,
            upper_blocks,
            summary: None,
        });
    }

    // Level-0 records and cell words, slot by slot: an unlocked lock word (a
    // saved lock is always 0; any other value could leave a search spinning
    // on a writer that does not exist), degree bounds, the upper-block
    // reference (each block owned by exactly one slot), the cell word (the
    // slot itself, since saved files renumber cells, maybe with the
    // tombstone bit, or never published). While each record is in cache,
    // the pass also gathers what the invariant check's first pass would
    // (levels, allocated and live slots) and runs its layer-0 list test, so
    // the check does not read every record again.
    // The records are checked on every core (a 1M-slot file has 136 MB of
    // them); each worker lists the upper blocks its slots reference, and
    // ownership is settled over those lists, in slot order.
    let slots_u32 = slots as u32;
    let pieces = crate::invariants::split_slots(slots, |range| {
        let mut blocks: Vec<(usize, usize)> = Vec::new();
        let mut free = Vec::new();
        let mut piece = SlotSummary::new(range.len());
        for slot in range.clone() {
            let record = &level0[slot * stride..(slot + 1) * stride];
            if record[0] != 0 {
                return Err(corrupt(format!(
                    "slot {slot}: lock word {:#x} (saved locks are 0)",
                    record[0]
                )));
            }
            let meta = record[1];
            let degree = (meta & ((1 << crate::graph::DEGREE_BITS) - 1)) as usize;
            if degree > m0 {
                return Err(corrupt(format!(
                    "slot {slot}: layer-0 degree {degree} exceeds M0 = {m0}"
                )));
            }
            let index = (meta >> crate::graph::DEGREE_BITS) as usize;
            let level = if index > 0 {
                blocks.push((slot, index));
                let (level, _) = upper_blocks.get(index - 1).ok_or_else(|| {
                    corrupt(format!("slot {slot}: upper block {index} does not exist"))
                })?;
                *level
            } else {
                0
            };
            let word = cells[slot];
            if word == NO_CELL || word & TOMBSTONE != 0 {
                free.push(slot as u32);
            }
            if word == NO_CELL {
                continue;
            }
            if word & !TOMBSTONE != slot as u32 {
                return Err(corrupt(format!("slot {slot}: cell word {word:#x}")));
            }
            let i = slot - range.start;
            piece.note(i, word, level);
            let ids = &record[2..2 + degree];
            if crate::invariants::sorted_list_ok(ids, slot as u32, slots_u32) {
                piece.note_layer0_checked(i);
            }
        }
        Ok((blocks, free, piece))
    });
    const NO_OWNER: u32 = u32::MAX;
    let mut owner = vec![NO_OWNER; upper_count];
    let mut free = Vec::new();
    let mut summaries = Vec::with_capacity(pieces.len());
    for piece in pieces {
        let (blocks, piece_free, summary) = piece?;
        for (slot, index) in blocks {
            // In range: checked by the worker.
            let taken = &mut owner[index - 1];
            if std::mem::replace(taken, slot as u32) != NO_OWNER {
                return Err(corrupt(format!(
                    "slot {slot}: upper block {index} belongs to two slots"
                )));
            }
        }
        free.extend_from_slice(&piece_free);
        summaries.push(summary);
    }
    if owner.contains(&NO_OWNER) {
        return Err(corrupt("an upper block belongs to no slot"));
    }
    let mut summary = SlotSummary::join(summaries, slots);
    // Upper-layer lists, block by block (sequential in the section; going
    // through the slots would chase record -> block for each), by the fast
    // test; any list that fails leaves the invariant check's exact path to
    // name the fault.
    let upper_ok = upper_blocks
        .iter()
        .zip(&owner)
        .all(|(&(level, words), &slot)| {
            words
                .chunks_exact(1 + m)
                .take(level)
                .enumerate()
                .all(|(i, list)| {
                    let degree = (list[0] & ((1 << crate::graph::DEGREE_BITS) - 1)) as usize;
                    degree <= m
                        && crate::invariants::sorted_upper_list_ok(
                            &list[1..1 + degree],
                            slot,
                            slots_u32,
                            i + 1,
                            |n| summary.level(n as usize),
                        )
                })
        });
    if upper_ok {
        summary.note_upper_checked();
    }
    if live != summary.live_count() {
        return Err(corrupt(format!(
            "the header says {} live entries, the cells section has {}",
            header.live,
            summary.live_count()
        )));
    }
    if entry.is_none() && summary.any_allocated() {
        return Err(corrupt("a non-empty graph has no entry point"));
    }
    Ok(Layout {
        params,
        slots,
        live,
        entry,
        upper_blocks,
        summary: Some((summary, free)),
    })
}

/// Checks that the padding after each slot's payload (the unused bytes of
/// its last word) is zero, as `save` writes it. A content check, made with
/// the checksums: the padding is never read otherwise.
fn check_payload_padding(payload_len: usize, payloads: &[u32]) -> Result<()> {
    let (words, used) = (payload_len.div_ceil(4), payload_len % 4);
    if words == 0 || used == 0 {
        return Ok(());
    }
    let padding = u32::MAX << (8 * used);
    match payloads
        .chunks_exact(words)
        .position(|run| run[words - 1] & padding != 0)
    {
        Some(slot) => Err(corrupt(format!(
            "slot {slot}: the padding after its {payload_len}-byte payload is not zero \
             (the payload section is damaged)"
        ))),
        None => Ok(()),
    }
}

/// Builds a fresh index by copying checked arrays (big-endian targets, and
/// files an index cannot borrow from, such as an empty one).
fn restore_by_copy(header: &Header, layout: &Layout<'_>, sections: &Sections<'_>) -> Result<Index> {
    let (params, slots, dim) = (layout.params.clone(), layout.slots, layout.params.dim);
    let (cells, keys) = (&sections.cells[..], &sections.keys[..]);
    // Vectors go through the arena's allocator in slot order, so cell i is
    // slot i's.
    let mut index = Index::new(params.capacity(slots.max(1)))?;
    let payload_len = index.params.payload_len;
    let payload_words = payload_len.div_ceil(4);
    for (slot, (v, &key)) in sections.vectors.chunks_exact(dim).zip(keys).enumerate() {
        let payload = match sections
            .payloads
            .get(slot * payload_words..(slot + 1) * payload_words)
        {
            Some(words) if payload_words > 0 => payload_from_words(words, payload_len),
            // No payloads (or none for this slot: lengths were checked).
            _ => Vec::new(),
        };
        let cell = index
            .graph
            .vectors
            .allocate_with_payload(key, v, &payload)?;
        if cell as usize != slot {
            return Err(corrupt("internal: cell numbering"));
        }
    }
    index.graph.reserve_slots(slots)?;
    index.graph.import(&GraphImport {
        level0: &sections.level0,
        cells,
        anchors: &sections.anchors,
        upper_blocks: layout.upper_blocks.clone(),
        entry: layout.entry,
    })?;
    *index.free_slots.lock() = cells
        .iter()
        .enumerate()
        .filter(|&(_, &word)| word == NO_CELL || word & TOMBSTONE != 0)
        .map(|(slot, _)| slot as u32)
        .collect();
    // Relaxed: the index is not shared yet.
    index.next_slot.store(slots, Ordering::Relaxed);
    index.live.store(layout.live, Ordering::Relaxed);
    index.keys = key_map_rejecting_duplicates(&index)?;
    index.levels.set_position(header.level_counter);
    Ok(index)
}
