//! The storage seam: every byte nann persists goes through [`Storage`].
//!
//! ```text
//!   Index::save_to ──┐                        ┌── FsStorage   (std::fs: the real disk)
//!   DurableIndex   ──┼── dyn Storage ─────────┤
//!   (log, checkpoint)┘                        └── SimStorage  (memory: crashes that drop
//!                                                  unsynced writes, injected I/O errors)
//! ```
//!
//! The trait is small on purpose: whole-file reads, files written front to
//! back (append), `sync` of a file's data, atomic `rename`, `remove`, and
//! `sync_dir`, which makes name changes (create, rename, remove) durable.
//! These are exactly the guarantees a POSIX file system gives after a power
//! loss, and exactly the ones [`SimStorage`](super::SimStorage) takes away
//! when it simulates one, so every backend is tested against the same crash
//! model (tantivy's `Directory` is the model for the seam; redb's crash tests
//! for the simulation).
//!
//! Every `sync` names its call site (`what`), so an error says which step
//! failed and a test can remove one specific fsync to show that a crash test
//! notices (see `tests/durable.rs`).
//!
//! The contract is checked by one conformance suite written against
//! `&dyn Storage` (`tests/storage_conformance.rs`), run on every backend:
//! a new backend adds one test there.
//!
//! [`Storage::lock_dir`] keeps a second writer out of a directory: a
//! [`DurableIndex`](crate::DurableIndex) holds it for its whole life, so two
//! of them (in one process or two) cannot delete each other's logs.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// A file open for writing at its end.
pub trait StorageFile: Send {
    /// Appends `bytes` (all of them, or an error).
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes everything appended so far durable (`fdatasync`). `what` names
    /// the call site.
    fn sync(&mut self, what: &'static str) -> io::Result<()>;
    /// Cuts the file to `len` bytes (used to drop a batch whose write failed).
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

/// Name of the lock file [`FsStorage::lock_dir`] keeps in a directory it
/// locks. It holds no data: the lock is the OS's advisory lock on it, and a
/// leftover file from a crashed process locks nothing.
pub const LOCK_FILE: &str = "nann.lock";

/// A directory's exclusive writer lock: held while this value lives,
/// released when it drops (and by the OS when the process dies).
pub trait StorageLock: Send + Sync + std::fmt::Debug {}

/// A place to keep files: a directory on disk or a simulation of one.
///
/// Paths are passed through unchanged; a backend decides what they mean.
/// Implementations must be usable from many threads.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// The whole content of `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Creates `path`, which must not exist, for writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>>;
    /// Opens the existing `path` for appending at its end.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn StorageFile>>;
    /// Renames `from` to `to` atomically, replacing `to` if it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes `path`.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the name changes in `dir` durable (`fsync` of the directory).
    fn sync_dir(&self, dir: &Path, what: &'static str) -> io::Result<()>;
    /// The names of the files directly in `dir` (not its subdirectories; a
    /// backend's lock may add [`LOCK_FILE`]).
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates `dir` (and its parents) if missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Takes `dir`'s exclusive writer lock without waiting, or fails with
    /// [`io::ErrorKind::WouldBlock`] while another holder (a second lock
    /// taken in this process counts as another) has it. `dir` must exist.
    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn StorageLock>>;
}

/// The real file system (`std::fs`).
#[derive(Debug, Default, Clone, Copy)]
pub struct FsStorage;

/// The open lock file; closing it releases the OS lock.
#[derive(Debug)]
struct FsLock {
    _file: File,
}

impl StorageLock for FsLock {}

struct FsFile(File);

impl StorageFile for FsFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }
    fn sync(&mut self, _what: &'static str) -> io::Result<()> {
        self.0.sync_data()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl Storage for FsStorage {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        // Append mode, as `open_append`: after a `truncate` (`set_len`,
        // which leaves the write position where it was) the next append
        // must land at the new end, not past it with a gap of zeros that
        // would end the log early on recovery.
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(path)?;
        Ok(Box::new(FsFile(file)))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Box::new(FsFile(file)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path, _what: &'static str) -> io::Result<()> {
        #[cfg(unix)]
        {
            File::open(dir)?.sync_all()
        }
        #[cfg(not(unix))]
        {
            let _ = dir;
            Ok(())
        }
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            // Files only, as the contract says (and `SimStorage` does): a
            // subdirectory is not something to replay or remove.
            if entry.file_type()?.is_dir() {
                continue;
            }
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn StorageLock>> {
        // `File::try_lock` is `flock(LOCK_EX | LOCK_NB)` on Unix and
        // `LockFileEx` on Windows: it belongs to this open file, so a second
        // open of the same path (another DurableIndex, in this process or
        // another) is refused, and the OS drops it when the process dies.
        // The file is never truncated or removed: removing it while locked
        // would let a second writer lock a new file of the same name.
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Box::new(FsLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is locked by another writer", path.display()),
            )),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }
}
