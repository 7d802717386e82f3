//! [`DurableIndex`]: an [`Index`] whose every write is logged before it is
//! applied, so no acknowledged insert, update or remove is lost in a crash.
//!
//! # Directory layout and recovery
//!
//! ```text
//!   dir/index.nann            snapshot (format v1; v2 with payloads), stamped with log_lsn = S
//!   dir/log-<gen>.wal ...     update logs (v1; v2 with payloads), records numbered by lsn
//!
//!   open:  snapshot ──► replay every log in generation order, records with
//!          lsn > S, each log up to its torn tail ──► start a new generation
//! ```
//!
//! # One operation
//!
//! ```text
//!   gate (read) ─► key stripe lock ─► validate ─► log.append ─► wait durable
//!               ─► apply to the index ─► unlock ─► Ok
//! ```
//!
//! * Logged **before** applied: if the log write or fsync fails, the
//!   operation returns the error and the index is unchanged.
//! * Operations on one key are serialised by a stripe lock held from
//!   validation to apply, so the log orders them as the index applied them;
//!   operations on different keys commute, so their order in the log is
//!   free. Writers on different stripes share fsyncs (group commit).
//! * Validation (dimension, finiteness, payload length, duplicate or
//!   unknown key) runs before logging, so a logged operation succeeds on
//!   replay.
//! * Payloads ([`IndexParams::payload_len`]) are logged with the
//!   operations that set them ([`insert_with_payload`](DurableIndex::insert_with_payload),
//!   [`update_with_payload`](DurableIndex::update_with_payload)); a plain
//!   [`update`](DurableIndex::update) keeps the entry's payload on replay
//!   as it does when first applied, and a plain insert stores zeros. One that
//!   still fails when applied (out of memory) is reported to the caller;
//!   on replay it is applied again, which may then succeed
//!   ([`ReplayReport::skipped`] counts those that fail again).
//! * A failed log write or fsync fails exactly the operations of its batch
//!   (a later batch's success never reports them durable); the log is cut
//!   back and the cut fsynced, so they do not come back after a crash.
//!
//! # One writer at a time
//!
//! Two `DurableIndex`es on one directory would delete each other's logs at
//! checkpoints, so each holds the directory's lock ([`Storage::lock_dir`]:
//! an OS file lock on `dir/nann.lock` on disk) from `create` or `open` until
//! it drops. A second `create` or `open` of the directory, in this process
//! or another, fails with [`Error::DirectoryInUse`]. The OS releases the
//! lock when the holding process dies, so a crash never leaves it stuck.
//! (A file lock is advisory: code that writes the files without nann, or a
//! network file system without working locks, is not kept out.)
//!
//! # Checkpoint
//!
//! [`DurableIndex::checkpoint`] closes the gate (in-flight operations finish,
//! new ones wait), copies the index in memory, notes the last lsn `S`,
//! switches the log to a new generation and reopens the gate; then it writes
//! the snapshot (temporary file, fsync, rename, directory fsync) and only
//! then deletes the older logs. A crash at any point leaves either the old
//! snapshot with every log, or the new snapshot with logs whose records at
//! or below `S` are skipped: replay is the same either way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::error::{Error, Result};
use crate::index::Index;
use crate::params::IndexParams;
use crate::persist::log::{
    create_log_file, decode_header, decode_records, log_file_name, parse_log_file_name, LogHeader,
    LogOp, LogOpRef, LogWriter, SYNC_LOG_DIR,
};
use crate::persist::{io_error, Durability, FileInfo, FsStorage, Storage, StorageLock};
use crate::update::Upserted;

/// Name of the snapshot file in a durable index's directory.
pub const SNAPSHOT_FILE: &str = "index.nann";

const STRIPES: usize = 1024;

/// How a [`DurableIndex`] persists: when records are durable, and where.
#[derive(Debug, Clone)]
pub struct DurableOptions {
    durability: Durability,
    storage: Arc<dyn Storage>,
}

impl DurableOptions {
    /// The real file system, with the given durability.
    pub fn new(durability: Durability) -> Self {
        Self {
            durability,
            storage: Arc::new(FsStorage),
        }
    }

    /// Uses another storage backend (e.g. [`SimStorage`](crate::persist::SimStorage)
    /// for crash tests).
    pub fn storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.storage = storage;
        self
    }
}

/// What [`DurableIndex::open`] replayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayReport {
    /// The sequence number the snapshot contains.
    pub snapshot_lsn: u64,
    /// Log records applied on top of the snapshot.
    pub applied: u64,
    /// Records at or below the snapshot's sequence number (already in it).
    pub already_in_snapshot: u64,
    /// Records whose operation failed again (it failed when first applied).
    pub skipped: u64,
    /// Log files whose tail was torn (cut short by a crash).
    pub torn_tails: u64,
}

/// An [`Index`] with an update log: every write is durable when it returns.
///
/// Writes are logged before they are applied ([`Durability`] says when a
/// record is durable); [`open`](Self::open) replays the logs over the last
/// snapshot up to a crash's torn tail; [`checkpoint`](Self::checkpoint)
/// writes a new snapshot and retires the logs. The directory is locked for
/// the value's life: a second `DurableIndex` on it is
/// [`Error::DirectoryInUse`].
///
/// Search through [`index`](Self::index); write only through this type (a
/// write made on the inner index directly is not logged and is lost on
/// reopen).
///
/// ```
/// use nann::{DurableIndex, DurableOptions, Durability, IndexParams, Metric};
/// let dir = std::env::temp_dir().join(format!("nann-doc-durable-{}", std::process::id()));
/// # let _ = std::fs::remove_dir_all(&dir);
/// let options = DurableOptions::new(Durability::PerOp);
/// {
///     let index = DurableIndex::create(&dir, IndexParams::new(2, Metric::L2), options.clone())?;
///     index.insert(1, &[0.0, 1.0])?; // durable when it returns
///     index.update(1, &[2.0, 3.0])?;
///     // One writer per directory, in this process or another.
///     let second = DurableIndex::open(&dir, options.clone());
///     assert!(matches!(second, Err(nann::Error::DirectoryInUse { .. })));
/// } // no save: the log has it (and dropping the index frees the directory)
/// let reopened = DurableIndex::open(&dir, options)?;
/// assert_eq!(reopened.index().get(1)?, vec![2.0, 3.0]);
/// assert_eq!(reopened.replay_report().applied, 2);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), nann::Error>(())
/// ```
#[derive(Debug)]
pub struct DurableIndex {
    index: Index,
    log: LogWriter,
    /// Log generations older than the current one (deleted by checkpoint).
    old_generations: Mutex<Vec<u64>>,
    generation: Mutex<u64>,
    /// Operations hold it shared from validation to apply; checkpoint holds
    /// it exclusively while it copies the index and switches logs.
    gate: RwLock<()>,
    /// Serialises checkpoints, so snapshots are renamed in lsn order.
    checkpointing: Mutex<()>,
    stripes: Vec<Mutex<()>>,
    report: ReplayReport,
    /// Declared last so its lock is released last, after the log file is
    /// closed.
    dir: HeldDir,
}

/// A directory whose writer lock is held: the one a [`DurableIndex`] owns.
#[derive(Debug)]
struct HeldDir {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    /// Held for this value's life; dropping it releases the lock.
    _lock: Box<dyn StorageLock>,
}

impl HeldDir {
    /// Takes `path`'s writer lock; a held lock is [`Error::DirectoryInUse`].
    fn lock(storage: Arc<dyn Storage>, path: PathBuf) -> Result<Self> {
        let lock = storage.lock_dir(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                Error::DirectoryInUse {
                    path: path.display().to_string(),
                }
            } else {
                io_error("lock", &path, e)
            }
        })?;
        Ok(Self {
            path,
            storage,
            _lock: lock,
        })
    }
}

impl DurableIndex {
    /// Creates a durable index in `dir` (created if missing). Fails if `dir`
    /// already holds one.
    pub fn create(
        dir: impl AsRef<Path>,
        params: IndexParams,
        options: DurableOptions,
    ) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let storage = options.storage;
        storage
            .create_dir_all(&dir)
            .map_err(|e| io_error("create directory", &dir, e))?;
        // The directory's own name must survive a power loss too.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            storage
                .sync_dir(parent, SYNC_LOG_DIR)
                .map_err(|e| io_error("fsync directory", parent, e))?;
        }
        let held = HeldDir::lock(Arc::clone(&storage), dir.clone())?;
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        // Never replace what is there: an index, or logs whose snapshot is
        // missing.
        let names = storage.list(&dir).map_err(|e| io_error("list", &dir, e))?;
        if names.iter().any(|n| n == SNAPSHOT_FILE)
            || names.iter().any(|n| parse_log_file_name(n).is_some())
        {
            return Err(Error::InvalidParameter {
                name: "dir",
                reason: format!(
                    "{} already holds an index or its update logs; open it instead",
                    dir.display()
                ),
            });
        }
        let index = Index::new(params)?;
        index.snapshot(0)?.write(storage.as_ref(), &snapshot_path)?;
        let (dim, payload_len) = index.log_shape();
        let (file, path, len) = create_log_file(storage.as_ref(), &dir, dim, payload_len, 1)?;
        let log = LogWriter::new(file, path, len, 1, options.durability);
        Ok(Self::assemble(
            index,
            held,
            log,
            1,
            Vec::new(),
            ReplayReport::default(),
        ))
    }

    /// Opens the durable index in `dir`: its snapshot, then every log
    /// record after it (see the module docs). Each log ends at its torn
    /// tail, if a crash left one.
    pub fn open(dir: impl AsRef<Path>, options: DurableOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let storage = options.storage;
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        if !holds_snapshot(storage.as_ref(), &dir)? {
            // Checked before taking the lock, which would create its file
            // in a directory that holds no index.
            return Err(io_error(
                "read",
                &snapshot_path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        let held = HeldDir::lock(Arc::clone(&storage), dir.clone())?;
        let bytes = storage
            .read(&snapshot_path)
            .map_err(|e| io_error("read", &snapshot_path, e))?;
        let snapshot_lsn = FileInfo::read(&bytes)?.log_lsn;
        let index = Index::from_bytes(&bytes)?;
        drop(bytes);
        let dim = index.params().dim;
        let payload_len = index.params().payload_len;

        let names = storage.list(&dir).map_err(|e| io_error("list", &dir, e))?;
        let mut generations: Vec<u64> = names
            .iter()
            .filter_map(|name| parse_log_file_name(name))
            .collect();
        generations.sort_unstable();
        // Temporary files of saves a crash interrupted are not the index.
        let temporary = format!(".{SNAPSHOT_FILE}.tmp.");
        for name in names.iter().filter(|n| n.starts_with(&temporary)) {
            let _ = storage.remove(&dir.join(name));
        }

        let mut report = ReplayReport {
            snapshot_lsn,
            ..ReplayReport::default()
        };
        let mut last_lsn = snapshot_lsn;
        for &generation in &generations {
            let path = dir.join(log_file_name(generation));
            let bytes = storage
                .read(&path)
                .map_err(|e| io_error("read", &path, e))?;
            match decode_header(&bytes, dim as u32, payload_len as u32)? {
                LogHeader::Torn => {
                    report.torn_tails += u64::from(!bytes.is_empty());
                    continue;
                }
                LogHeader::Valid { generation: g } if g != generation => {
                    return Err(crate::FormatError::Corrupt(format!(
                        "{} says it is log generation {g}",
                        path.display()
                    ))
                    .into());
                }
                LogHeader::Valid { .. } => {}
            }
            let (records, valid) = decode_records(&bytes, dim, payload_len);
            report.torn_tails += u64::from(valid < bytes.len());
            for record in records {
                if record.lsn <= last_lsn {
                    report.already_in_snapshot += 1;
                    continue;
                }
                last_lsn = record.lsn;
                let outcome = match &record.op {
                    LogOp::Insert(key, v) => index.insert(*key, v),
                    LogOp::Update(key, v) => index.update(*key, v),
                    LogOp::Remove(key) => index.remove(*key),
                    LogOp::InsertWithPayload(key, v, p) => index.insert_with_payload(*key, v, p),
                    LogOp::UpdateWithPayload(key, v, p) => index.update_with_payload(*key, v, p),
                };
                match outcome {
                    Ok(()) => report.applied += 1,
                    Err(_) => report.skipped += 1,
                }
            }
        }

        // Checked: both come from the files (a forged name or header must be
        // a typed error, not an overflow).
        let corrupt = |what: &str| -> Error {
            crate::FormatError::Corrupt(format!("{what} in {} is at its maximum", dir.display()))
                .into()
        };
        let generation = match generations.last() {
            None => 1,
            Some(g) => g
                .checked_add(1)
                .ok_or_else(|| corrupt("a log generation"))?,
        };
        let next_lsn = last_lsn
            .checked_add(1)
            .ok_or_else(|| corrupt("a log sequence number"))?;
        let (dim, payload_len) = index.log_shape();
        let (file, path, len) =
            create_log_file(storage.as_ref(), &dir, dim, payload_len, generation)?;
        let log = LogWriter::new(file, path, len, next_lsn, options.durability);
        Ok(Self::assemble(
            index,
            held,
            log,
            generation,
            generations,
            report,
        ))
    }

    /// Opens the durable index in `dir`, or creates it with `params` if the
    /// directory holds none.
    pub fn open_or_create(
        dir: impl AsRef<Path>,
        params: IndexParams,
        options: DurableOptions,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        if holds_snapshot(options.storage.as_ref(), dir)? {
            Self::open(dir, options)
        } else {
            Self::create(dir, params, options)
        }
    }

    fn assemble(
        index: Index,
        dir: HeldDir,
        log: LogWriter,
        generation: u64,
        old_generations: Vec<u64>,
        report: ReplayReport,
    ) -> Self {
        Self {
            index,
            log,
            old_generations: Mutex::new(old_generations),
            generation: Mutex::new(generation),
            gate: RwLock::new(()),
            checkpointing: Mutex::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            report,
            dir,
        }
    }

    /// The index, for searches and reads.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// What opening replayed (all zero for a created index).
    pub fn replay_report(&self) -> ReplayReport {
        self.report
    }

    /// The sequence number of the last logged operation.
    pub fn last_lsn(&self) -> u64 {
        self.log.last_lsn()
    }

    fn stripe(&self, key: u64) -> &Mutex<()> {
        // Fibonacci hashing spreads sequential keys over the stripes.
        let h = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54;
        &self.stripes[h as usize % STRIPES]
    }

    /// Logs `op`, waits until it is durable, then applies it.
    fn logged(
        &self,
        key: u64,
        validate: impl FnOnce() -> Result<()>,
        op: LogOpRef<'_>,
        apply: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        self.logged_with(key, || validate().map(|()| (op, ())), |()| apply())
    }

    /// The one sequence every logged write runs: under the gate (shared)
    /// and `key`'s stripe, `decide` validates and names the record to log
    /// (and what `apply` needs), the record is logged and made durable,
    /// then `apply` applies it. Every logged writer of `key` holds the
    /// stripe from `decide` to `apply`, so what `decide` saw of the key
    /// (present or not) still holds when it is applied.
    fn logged_with<'a, T>(
        &self,
        key: u64,
        decide: impl FnOnce() -> Result<(LogOpRef<'a>, T)>,
        apply: impl FnOnce(&T) -> Result<()>,
    ) -> Result<T> {
        let _gate = self.gate.read();
        let _stripe = self.stripe(key).lock();
        let (op, decided) = decide()?;
        let lsn = self.log.append(op)?;
        self.log.wait_durable(lsn)?;
        apply(&decided)?;
        Ok(decided)
    }

    /// [`Index::upsert`], durable when it returns: logged as the insert or
    /// the update it turned out to be (the key's stripe lock keeps the
    /// choice valid until it is applied).
    ///
    /// ```
    /// use nann::{DurableIndex, DurableOptions, Durability, IndexParams, Metric, Upserted};
    /// let dir = std::env::temp_dir().join(format!("nann-doc-upsert-{}", std::process::id()));
    /// # let _ = std::fs::remove_dir_all(&dir);
    /// let options = DurableOptions::new(Durability::PerOp);
    /// let index = DurableIndex::create(&dir, IndexParams::new(1, Metric::L2), options.clone())?;
    /// assert_eq!(index.upsert(3, &[1.0])?, Upserted::Inserted);
    /// assert_eq!(index.upsert(3, &[2.0])?, Upserted::Updated);
    /// drop(index);
    /// assert_eq!(DurableIndex::open(&dir, options)?.index().get(3)?, vec![2.0]);
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn upsert(&self, key: u64, vector: &[f32]) -> Result<Upserted> {
        self.upsert_inner(key, vector, None)
    }

    /// [`Index::upsert_with_payload`], durable when it returns (the payload
    /// is logged with the vector).
    pub fn upsert_with_payload(
        &self,
        key: u64,
        vector: &[f32],
        payload: &[u8],
    ) -> Result<Upserted> {
        self.upsert_inner(key, vector, Some(payload))
    }

    fn upsert_inner(&self, key: u64, vector: &[f32], payload: Option<&[u8]>) -> Result<Upserted> {
        let present = self.logged_with(
            key,
            || {
                if let Some(p) = payload {
                    self.index.check_payload(p)?;
                }
                self.index.prepare(vector)?;
                let present = self.index.contains(key);
                let op = match (present, payload) {
                    (false, None) => LogOpRef::Insert(key, vector),
                    (false, Some(p)) => LogOpRef::InsertWithPayload(key, vector, p),
                    (true, None) => LogOpRef::Update(key, vector),
                    (true, Some(p)) => LogOpRef::UpdateWithPayload(key, vector, p),
                };
                Ok((op, present))
            },
            |&present| match (present, payload) {
                (false, None) => self.index.insert(key, vector),
                (false, Some(p)) => self.index.insert_with_payload(key, vector, p),
                (true, None) => self.index.update(key, vector),
                (true, Some(p)) => self.index.update_with_payload(key, vector, p),
            },
        )?;
        Ok(if present {
            Upserted::Updated
        } else {
            Upserted::Inserted
        })
    }

    /// [`Index::insert`] (a zero payload, if the index stores payloads),
    /// durable when it returns.
    pub fn insert(&self, key: u64, vector: &[f32]) -> Result<()> {
        self.logged(
            key,
            || {
                self.index.prepare(vector)?;
                if self.index.contains(key) {
                    return Err(Error::DuplicateKey(key));
                }
                Ok(())
            },
            LogOpRef::Insert(key, vector),
            || self.index.insert(key, vector),
        )
    }

    /// [`Index::insert_with_payload`], durable when it returns (the payload
    /// is logged with the vector).
    pub fn insert_with_payload(&self, key: u64, vector: &[f32], payload: &[u8]) -> Result<()> {
        self.logged(
            key,
            || {
                self.index.check_payload(payload)?;
                self.index.prepare(vector)?;
                if self.index.contains(key) {
                    return Err(Error::DuplicateKey(key));
                }
                Ok(())
            },
            LogOpRef::InsertWithPayload(key, vector, payload),
            || self.index.insert_with_payload(key, vector, payload),
        )
    }

    /// [`Index::update_with_payload`], durable when it returns (the payload
    /// is logged with the vector).
    pub fn update_with_payload(&self, key: u64, vector: &[f32], payload: &[u8]) -> Result<()> {
        self.logged(
            key,
            || {
                self.index.check_payload(payload)?;
                self.index.prepare(vector)?;
                if !self.index.contains(key) {
                    return Err(Error::KeyNotFound(key));
                }
                Ok(())
            },
            LogOpRef::UpdateWithPayload(key, vector, payload),
            || self.index.update_with_payload(key, vector, payload),
        )
    }

    /// [`Index::update`] (the entry keeps its payload), durable when it
    /// returns.
    pub fn update(&self, key: u64, vector: &[f32]) -> Result<()> {
        self.logged(
            key,
            || {
                self.index.prepare(vector)?;
                if !self.index.contains(key) {
                    return Err(Error::KeyNotFound(key));
                }
                Ok(())
            },
            LogOpRef::Update(key, vector),
            || self.index.update(key, vector),
        )
    }

    /// [`Index::remove`], durable when it returns.
    pub fn remove(&self, key: u64) -> Result<()> {
        self.logged(
            key,
            || {
                if !self.index.contains(key) {
                    return Err(Error::KeyNotFound(key));
                }
                Ok(())
            },
            LogOpRef::Remove(key),
            || self.index.remove(key),
        )
    }

    /// Writes a new snapshot and drops the logs it makes redundant (see the
    /// module docs). Writers wait while the index is copied in memory;
    /// searches never wait. On error the previous snapshot and every log
    /// stay valid, and the index is unchanged.
    pub fn checkpoint(&self) -> Result<()> {
        let _one_at_a_time = self.checkpointing.lock();
        let snapshot_path = self.dir.path.join(SNAPSHOT_FILE);
        let (snapshot, retired) = {
            let _quiescent = self.gate.write();
            let lsn = self.log.last_lsn();
            let snapshot = self.index.snapshot(lsn)?;
            let mut generation = self.generation.lock();
            let next = *generation + 1;
            let (dim, payload_len) = self.index.log_shape();
            let (file, path, len) = create_log_file(
                self.dir.storage.as_ref(),
                &self.dir.path,
                dim,
                payload_len,
                next,
            )?;
            self.log.rotate(file, path, len);
            let mut old = self.old_generations.lock();
            old.push(*generation);
            *generation = next;
            (snapshot, old.clone())
        };
        snapshot.write(self.dir.storage.as_ref(), &snapshot_path)?;
        // The new snapshot is durable: the older logs are redundant. A
        // failed removal only leaves a file that replay skips.
        let mut old = self.old_generations.lock();
        for generation in retired {
            let path = self.dir.path.join(log_file_name(generation));
            if self.dir.storage.remove(&path).is_ok() {
                old.retain(|&g| g != generation);
            }
        }
        Ok(())
    }
}

impl Index {
    /// What a log file's header records of this index: dimension and
    /// payload length.
    fn log_shape(&self) -> (u32, u32) {
        (self.params.dim as u32, self.params.payload_len as u32)
    }
}

/// Whether `path` exists: `false` only for "not found"; any other error
/// (permissions, I/O) is returned, not taken for absence.
/// Whether `dir` holds a snapshot file, from its listing (reading the file
/// would cost as much as opening the index). A missing directory holds
/// none; any other error is not "none" and is returned.
fn holds_snapshot(storage: &dyn Storage, dir: &Path) -> Result<bool> {
    match storage.list(dir) {
        Ok(names) => Ok(names.iter().any(|n| n == SNAPSHOT_FILE)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error("list", dir, e)),
    }
}
