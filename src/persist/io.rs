//! The atomic write of a whole file: temporary file in the target's
//! directory, fsync, rename over the target, fsync of the directory.
//!
//! Each step matters for durability after a power loss: without the file
//! fsync the rename can reach the disk before the data (an empty or partial
//! file under the final name); without the directory fsync the rename itself
//! can be lost (the old file comes back). An fsync error is a failed save:
//! it is reported, never retried into a success.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::storage::Storage;
use crate::error::{Error, Result};

/// A typed I/O error naming the operation and the path.
pub(crate) fn error(operation: &'static str, path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        operation,
        path: path.display().to_string(),
        kind: e.kind(),
        message: e.to_string(),
    }
}

/// Writes the concatenation of `parts` to `path` atomically through
/// `storage`.
pub(crate) fn write_atomically(storage: &dyn Storage, path: &Path, parts: &[&[u8]]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidParameter {
            name: "path",
            reason: format!("{} does not name a file", path.display()),
        })?
        .to_string_lossy()
        .into_owned();
    // The temporary name: pid and a process-wide counter, so saves in this
    // process never collide. A file of that name left by a crashed run of
    // an earlier process (in a container the pid often repeats) is not
    // ours: the name is retried with the clock's nanoseconds added.
    let mut attempt = 0u32;
    let (tmp, mut file) = loop {
        // Relaxed: only distinctness of the suffix matters.
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = format!(".{name}.tmp.{}.{unique}", std::process::id());
        if attempt > 0 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            tmp_name.push_str(&format!(".{nanos:08x}"));
        }
        let tmp = dir.join(tmp_name);
        match storage.create(&tmp) {
            Ok(file) => break (tmp, file),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => {
                attempt += 1;
            }
            Err(e) => return Err(error("create", &tmp, e)),
        }
    };

    let mut created = true;
    let result = (|| {
        for part in parts {
            file.append(part).map_err(|e| error("write", &tmp, e))?;
        }
        file.sync(SYNC_SNAPSHOT_FILE)
            .map_err(|e| error("fsync", &tmp, e))?;
        drop(file);
        storage
            .rename(&tmp, path)
            .map_err(|e| error("rename", path, e))?;
        created = false;
        storage
            .sync_dir(&dir, SYNC_SNAPSHOT_DIR)
            .map_err(|e| error("fsync directory", &dir, e))
    })();
    if result.is_err() && created {
        // Best effort: the temporary file is not the index; leaving it
        // behind is harmless, removing it keeps the directory clean.
        let _ = storage.remove(&tmp);
    }
    result
}

/// Call site of the fsync of a snapshot's temporary file.
pub const SYNC_SNAPSHOT_FILE: &str = "snapshot file";
/// Call site of the directory fsync after a snapshot's rename.
pub const SYNC_SNAPSHOT_DIR: &str = "snapshot directory";
