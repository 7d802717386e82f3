//! [`SimStorage`]: an in-memory [`Storage`] that simulates power loss and
//! I/O errors, for crash tests (redb's crash tests are the model).
//!
//! # Crash model
//!
//! ```text
//!   file data:  durable bytes │ appended, not yet synced ──► crash keeps a
//!                             │                              random prefix
//!   names:      durable table + pending ops (create, rename, remove) since
//!               the directory's last sync_dir ──► crash keeps a random
//!               subset, applied in order
//! ```
//!
//! That is the weakest promise POSIX makes: data reaches the disk only
//! through `fsync` of the file, and a name change only through `fsync` of
//! its directory, in no guaranteed order. Code that is correct here is
//! correct on any file system that keeps those two promises.
//!
//! # Faults
//!
//! [`SimStorage::fail_at`] makes the n-th mutating call (create, append,
//! sync, truncate, rename, remove, sync_dir) fail once with a chosen error;
//! [`SimStorage::cut_power_at`] makes it and every later call fail, as
//! a machine that lost power would, until [`SimStorage::crash`] reboots.
//! [`SimStorage::skip_sync`] turns one named fsync call site into a no-op
//! (a "forgotten fsync" mutant for the crash tests to catch).
//!
//! Directory locks ([`Storage::lock_dir`]) live in memory, like the OS's:
//! a crash releases them all, and a guard from before it releases nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::storage::{Storage, StorageFile, StorageLock};

/// See the module docs.
#[derive(Debug, Clone, Default)]
pub struct SimStorage {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct FileData {
    current: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Debug, Clone)]
enum NameOp {
    Create(PathBuf, u64),
    Rename(PathBuf, PathBuf, u64),
    Remove(PathBuf),
}

impl NameOp {
    fn dir(&self) -> PathBuf {
        let path = match self {
            NameOp::Create(p, _) | NameOp::Rename(_, p, _) | NameOp::Remove(p) => p,
        };
        parent(path)
    }
}

#[derive(Debug, Default)]
struct State {
    files: HashMap<u64, FileData>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    pending: Vec<NameOp>,
    dirs: HashSet<PathBuf>,
    next_id: u64,
    /// Bumped by every crash: handles from before it stop working.
    boot: u64,
    /// Locked directories, each with the token of its guard.
    locks: HashMap<PathBuf, u64>,
    next_lock: u64,
    calls: u64,
    fail_at: Option<(u64, i32)>,
    power_cut_at: Option<u64>,
    skipped_syncs: HashSet<&'static str>,
    rng: u64,
}

fn parent(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

impl State {
    /// Counts a mutating call and returns the injected error, if any.
    fn check(&mut self) -> io::Result<()> {
        self.calls += 1;
        if self.power_cut_at.is_some_and(|at| self.calls >= at) {
            return Err(io::Error::other("simulated power loss"));
        }
        if let Some((at, errno)) = self.fail_at {
            if self.calls == at {
                self.fail_at = None;
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        Ok(())
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic per seed, good enough to pick prefixes.
        let mut x = self.rng.max(1);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn apply(names: &mut BTreeMap<PathBuf, u64>, op: &NameOp) {
        match op {
            NameOp::Create(path, id) => {
                names.insert(path.clone(), *id);
            }
            NameOp::Rename(from, to, id) => {
                names.remove(from);
                names.insert(to.clone(), *id);
            }
            NameOp::Remove(path) => {
                names.remove(path);
            }
        }
    }
}

struct SimFile {
    state: Arc<Mutex<State>>,
    id: u64,
    boot: u64,
}

impl SimFile {
    fn lock(&self) -> io::Result<MutexGuard<'_, State>> {
        let state = lock(&self.state);
        if state.boot != self.boot {
            return Err(io::Error::other("file handle from before a crash"));
        }
        Ok(state)
    }
}

/// A held [`Storage::lock_dir`] of a [`SimStorage`].
#[derive(Debug)]
struct SimLock {
    state: Arc<Mutex<State>>,
    dir: PathBuf,
    token: u64,
}

impl StorageLock for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        // After a crash (or a crash and a new holder) this guard's lock is
        // gone: release only our own.
        if state.locks.get(&self.dir) == Some(&self.token) {
            state.locks.remove(&self.dir);
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic in a test thread must not hide the storage from the others.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl StorageFile for SimFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.lock()?;
        state.check()?;
        let file = state
            .files
            .get_mut(&self.id)
            .ok_or_else(|| io::Error::other("file was removed"))?;
        file.current.extend_from_slice(bytes);
        Ok(())
    }
    fn sync(&mut self, what: &'static str) -> io::Result<()> {
        let mut state = self.lock()?;
        state.check()?;
        if state.skipped_syncs.contains(what) {
            return Ok(());
        }
        if let Some(file) = state.files.get_mut(&self.id) {
            file.durable = file.current.clone();
        }
        Ok(())
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        let mut state = self.lock()?;
        state.check()?;
        if let Some(file) = state.files.get_mut(&self.id) {
            file.current.truncate(len as usize);
        }
        Ok(())
    }
}

impl SimStorage {
    /// An empty storage; `seed` drives the choices a crash makes.
    pub fn new(seed: u64) -> Self {
        let storage = Self::default();
        lock(&storage.state).rng = seed | 1;
        storage
    }

    /// Makes the `n`-th mutating call from now fail once with the OS error
    /// `errno` (e.g. `libc::ENOSPC` = 28, `libc::EIO` = 5).
    pub fn fail_at(&self, n: u64, errno: i32) {
        let mut state = lock(&self.state);
        let at = state.calls + n;
        state.fail_at = Some((at, errno));
    }

    /// Makes the `n`-th mutating call from now and every later one fail,
    /// until [`crash`](Self::crash).
    pub fn cut_power_at(&self, n: u64) {
        let mut state = lock(&self.state);
        let at = state.calls + n;
        state.power_cut_at = Some(at);
    }

    /// Mutating calls made so far.
    pub fn calls(&self) -> u64 {
        lock(&self.state).calls
    }

    /// Turns every `sync` / `sync_dir` whose call site is `what` into a no-op.
    pub fn skip_sync(&self, what: &'static str) {
        lock(&self.state).skipped_syncs.insert(what);
    }

    /// Simulates a power loss and reboot: unsynced data is cut to a random
    /// prefix, a random subset of unsynced name changes survives, open
    /// handles stop working, directory locks are released, and injected
    /// faults are cleared.
    pub fn crash(&self) {
        let mut state = lock(&self.state);
        let pending = std::mem::take(&mut state.pending);
        let mut names = state.durable_names.clone();
        for op in &pending {
            if state.next_random() & 1 == 1 {
                State::apply(&mut names, op);
            }
        }
        let ids: Vec<u64> = state.files.keys().copied().collect();
        for id in ids {
            let roll = state.next_random();
            let file = state.files.get_mut(&id).expect("listed above");
            let extends = file.current.starts_with(&file.durable);
            let kept = if extends {
                let extra = file.current.len() - file.durable.len();
                let keep = if extra == 0 {
                    0
                } else {
                    (roll % (extra as u64 + 1)) as usize
                };
                file.current[..file.durable.len() + keep].to_vec()
            } else {
                file.durable.clone()
            };
            file.current = kept.clone();
            file.durable = kept;
        }
        state.durable_names = names.clone();
        state.names = names;
        state.boot += 1;
        // The process that held them is gone.
        state.locks.clear();
        state.fail_at = None;
        state.power_cut_at = None;
    }
}

impl Storage for SimStorage {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = lock(&self.state);
        let id = state.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(state
            .files
            .get(id)
            .map(|f| f.current.clone())
            .unwrap_or_default())
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let mut state = lock(&self.state);
        state.check()?;
        if state.names.contains_key(path) || state.dirs.contains(path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        if !state.dirs.contains(&parent(path)) {
            return Err(not_found(&parent(path)));
        }
        let id = state.next_id;
        state.next_id += 1;
        state.files.insert(id, FileData::default());
        state.names.insert(path.to_path_buf(), id);
        state.pending.push(NameOp::Create(path.to_path_buf(), id));
        Ok(Box::new(SimFile {
            state: Arc::clone(&self.state),
            id,
            boot: state.boot,
        }))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let state = lock(&self.state);
        let id = *state.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(Box::new(SimFile {
            state: Arc::clone(&self.state),
            id,
            boot: state.boot,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = lock(&self.state);
        state.check()?;
        let id = state.names.remove(from).ok_or_else(|| not_found(from))?;
        state.names.insert(to.to_path_buf(), id);
        state
            .pending
            .push(NameOp::Rename(from.to_path_buf(), to.to_path_buf(), id));
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = lock(&self.state);
        state.check()?;
        state.names.remove(path).ok_or_else(|| not_found(path))?;
        state.pending.push(NameOp::Remove(path.to_path_buf()));
        Ok(())
    }

    fn sync_dir(&self, dir: &Path, what: &'static str) -> io::Result<()> {
        let mut state = lock(&self.state);
        state.check()?;
        if state.skipped_syncs.contains(what) {
            return Ok(());
        }
        let pending = std::mem::take(&mut state.pending);
        let mut rest = Vec::new();
        for op in pending {
            if op.dir() == dir {
                let mut names = std::mem::take(&mut state.durable_names);
                State::apply(&mut names, &op);
                state.durable_names = names;
            } else {
                rest.push(op);
            }
        }
        state.pending = rest;
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = lock(&self.state);
        if !state.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        Ok(state
            .names
            .keys()
            .filter(|p| parent(p) == dir)
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        // Directories are durable at once: the crash model is about files.
        let mut state = lock(&self.state);
        // As on a disk, a file's name cannot become a directory.
        if let Some(file) = dir.ancestors().find(|d| state.names.contains_key(*d)) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is a file", file.display()),
            ));
        }
        let mut at = Some(dir);
        while let Some(d) = at {
            state.dirs.insert(d.to_path_buf());
            at = d.parent();
        }
        Ok(())
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn StorageLock>> {
        // Not a counted call: a lock holds no data, so faults and power
        // cuts are injected into the writes it guards, not into it.
        let mut state = lock(&self.state);
        if !state.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        if state.locks.contains_key(dir) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is locked by another writer", dir.display()),
            ));
        }
        let token = state.next_lock;
        state.next_lock += 1;
        state.locks.insert(dir.to_path_buf(), token);
        Ok(Box::new(SimLock {
            state: Arc::clone(&self.state),
            dir: dir.to_path_buf(),
            token,
        }))
    }
}
