//! One conformance suite for every [`Storage`] backend (tantivy's
//! `directory/tests.rs` is the model): the trait's contract, written once
//! against `&dyn Storage` and run on the real file system and on the
//! simulation the crash tests use. A backend that passes it behaves, for
//! nann's persistence, like the other one; the crash model itself is
//! `SimStorage`'s own business (`tests/durable.rs`).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use nann::persist::{FsStorage, SimStorage, Storage, LOCK_FILE};

/// The names `list` gives in `dir`, sorted, without the lock file a
/// backend may keep there.
fn names(storage: &dyn Storage, dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = storage
        .list(dir)
        .unwrap()
        .into_iter()
        .filter(|n| n != LOCK_FILE)
        .collect();
    names.sort();
    names
}

fn kind<T>(result: std::io::Result<T>) -> ErrorKind {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.kind(),
    }
}

/// The whole contract; `root` is an empty directory's path, not created yet.
fn conformance(storage: &dyn Storage, root: &Path) {
    let dir = root.join("a").join("b");

    // Directories: created with their parents, idempotently.
    assert_eq!(kind(storage.list(&dir)), ErrorKind::NotFound);
    storage.create_dir_all(&dir).unwrap();
    storage.create_dir_all(&dir).unwrap();
    assert!(names(storage, &dir).is_empty());
    storage.sync_dir(&dir, "conformance").unwrap();

    // Files: read of a missing one, create, append, read back (unsynced
    // bytes are visible to this process), create refuses an existing name
    // and a missing directory.
    let file = dir.join("f");
    assert_eq!(kind(storage.read(&file)), ErrorKind::NotFound);
    assert_eq!(kind(storage.open_append(&file)), ErrorKind::NotFound);
    let mut handle = storage.create(&file).unwrap();
    assert_eq!(storage.read(&file).unwrap(), b"");
    handle.append(b"hello ").unwrap();
    handle.append(b"world").unwrap();
    assert_eq!(storage.read(&file).unwrap(), b"hello world");
    handle.sync("conformance").unwrap();
    assert_eq!(kind(storage.create(&file)), ErrorKind::AlreadyExists);
    assert_eq!(
        kind(storage.create(&root.join("missing").join("f"))),
        ErrorKind::NotFound
    );

    // Truncate, then append: the next bytes land at the new end, with no
    // gap (the bug a log's cut after a failed batch once hit).
    handle.truncate(5).unwrap();
    handle.append(b"!").unwrap();
    assert_eq!(storage.read(&file).unwrap(), b"hello!");
    drop(handle);

    // open_append continues at the end.
    let mut again = storage.open_append(&file).unwrap();
    again.append(b"?").unwrap();
    again.sync("conformance").unwrap();
    drop(again);
    assert_eq!(storage.read(&file).unwrap(), b"hello!?");

    // list: the files directly in the directory, not those below it.
    let other = dir.join("g");
    storage.create(&other).unwrap().append(b"other").unwrap();
    storage.create_dir_all(&dir.join("sub")).unwrap();
    storage
        .create(&dir.join("sub").join("deeper"))
        .unwrap()
        .append(b"x")
        .unwrap();
    assert_eq!(names(storage, &dir), ["f", "g"]);

    // A directory is not a file, and a file is not a directory.
    assert_eq!(
        kind(storage.create(&dir.join("sub"))),
        ErrorKind::AlreadyExists
    );
    assert!(storage.read(&dir.join("sub")).is_err());
    assert!(storage.create_dir_all(&other).is_err());
    assert!(storage.create_dir_all(&other.join("below")).is_err());
    assert_eq!(storage.read(&other).unwrap(), b"other");

    // rename replaces the target; the source name is gone.
    storage.rename(&other, &file).unwrap();
    assert_eq!(storage.read(&file).unwrap(), b"other");
    assert_eq!(kind(storage.read(&other)), ErrorKind::NotFound);
    assert_eq!(kind(storage.rename(&other, &file)), ErrorKind::NotFound);
    storage.sync_dir(&dir, "conformance").unwrap();
    assert_eq!(names(storage, &dir), ["f"]);

    // remove, and remove of a missing file.
    storage.remove(&file).unwrap();
    assert_eq!(kind(storage.read(&file)), ErrorKind::NotFound);
    assert_eq!(kind(storage.remove(&file)), ErrorKind::NotFound);
    assert!(names(storage, &dir).is_empty());

    // The directory lock: one holder at a time, per directory, released
    // on drop; a missing directory cannot be locked.
    let lock = storage.lock_dir(&dir).unwrap();
    assert_eq!(kind(storage.lock_dir(&dir)), ErrorKind::WouldBlock);
    let sub_lock = storage.lock_dir(&dir.join("sub")).unwrap();
    drop(lock);
    let relocked = storage.lock_dir(&dir).unwrap();
    drop((relocked, sub_lock));
    assert_eq!(
        kind(storage.lock_dir(&root.join("missing"))),
        ErrorKind::NotFound
    );
    // Locking leaves no name a reader must know about besides LOCK_FILE.
    assert!(names(storage, &dir).is_empty());
}

#[test]
fn fs_storage_conforms() {
    let root: PathBuf =
        std::env::temp_dir().join(format!("nann-conformance-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    conformance(&FsStorage, &root);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn sim_storage_conforms() {
    conformance(&SimStorage::new(1), Path::new("/root"));
}
