//! The update log and checkpoints: round trips, simulated power loss at
//! every storage call, forgotten-fsync mutants, injected I/O errors, and
//! real `kill -9` of a child process.
//!
//! The property every crash test checks: reopening succeeds, and the state
//! equals the model after every acknowledged operation, plus possibly the
//! one that was in flight when the power went: never anything else.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use nann::persist::{
    SimStorage, Storage, SYNC_LOG_DIR, SYNC_LOG_FILE, SYNC_SNAPSHOT_DIR, SYNC_SNAPSHOT_FILE,
};
use nann::{Durability, DurableIndex, DurableOptions, Error, Index, IndexParams, Metric};

const DIM: usize = 4;
const KEYS: u64 = 12;

#[derive(Debug, Clone)]
enum Op {
    Insert(u64, Vec<f32>),
    Update(u64, Vec<f32>),
    Remove(u64),
    Checkpoint,
}

type Model = BTreeMap<u64, Vec<f32>>;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn vector(&mut self) -> Vec<f32> {
        (0..DIM)
            .map(|_| (self.next() % 1000) as f32 / 100.0)
            .collect()
    }
}

/// A valid operation sequence (inserts of absent keys, updates and removes
/// of present ones), with a checkpoint every `every` operations.
fn script(seed: u64, len: usize, every: usize) -> Vec<Op> {
    let mut rng = Rng(seed);
    let mut model = Model::new();
    let mut ops = Vec::new();
    for i in 1..=len {
        if every > 0 && i % every == 0 {
            ops.push(Op::Checkpoint);
            continue;
        }
        let key = rng.next() % KEYS;
        let op = match (model.contains_key(&key), rng.next() % 3) {
            (false, _) => Op::Insert(key, rng.vector()),
            (true, 0) => Op::Remove(key),
            (true, _) => Op::Update(key, rng.vector()),
        };
        apply(&mut model, &op);
        ops.push(op);
    }
    ops
}

fn apply(model: &mut Model, op: &Op) {
    match op {
        Op::Insert(k, v) | Op::Update(k, v) => {
            model.insert(*k, v.clone());
        }
        Op::Remove(k) => {
            model.remove(k);
        }
        Op::Checkpoint => {}
    }
}

fn run(index: &DurableIndex, op: &Op) -> nann::Result<()> {
    match op {
        Op::Insert(k, v) => index.insert(*k, v),
        Op::Update(k, v) => index.update(*k, v),
        Op::Remove(k) => index.remove(*k),
        Op::Checkpoint => index.checkpoint(),
    }
}

fn model_after(ops: &[Op]) -> Model {
    let mut model = Model::new();
    for op in ops {
        apply(&mut model, op);
    }
    model
}

/// The index's content as a model (for the keys a script can use).
fn state(index: &Index) -> Model {
    (0..KEYS)
        .filter_map(|k| index.get(k).ok().map(|v| (k, v)))
        .collect()
}

fn params() -> IndexParams {
    IndexParams::new(DIM, Metric::L2).m(4).seed(7)
}

fn sim_options(storage: &SimStorage) -> DurableOptions {
    DurableOptions::new(Durability::PerOp).storage(Arc::new(storage.clone()) as Arc<dyn Storage>)
}

#[test]
fn operations_survive_a_reopen_with_and_without_checkpoints() {
    let storage = SimStorage::new(1);
    let dir = Path::new("/db");
    let ops = script(11, 120, 25);
    {
        let index = DurableIndex::create(dir, params(), sim_options(&storage)).unwrap();
        for op in &ops {
            run(&index, op).unwrap();
        }
        assert!(matches!(
            index.insert(999, &[1.0; 3]),
            Err(Error::DimensionMismatch { .. })
        ));
    }
    let reopened = DurableIndex::open(dir, sim_options(&storage)).unwrap();
    assert_eq!(state(reopened.index()), model_after(&ops));
    reopened.index().check_invariants().unwrap();
    let report = reopened.replay_report();
    assert!(report.snapshot_lsn > 0, "{report:?}");
    assert_eq!(report.skipped, 0);
    assert_eq!(report.torn_tails, 0);
    // Only records after the last checkpoint were replayed.
    let after_last_checkpoint = ops
        .iter()
        .rev()
        .take_while(|o| !matches!(o, Op::Checkpoint))
        .count();
    assert_eq!(report.applied as usize, after_last_checkpoint);
    // Sequence numbers continue after a reopen.
    let lsn = reopened.last_lsn();
    reopened.insert(500, &[1.0; DIM]).unwrap();
    assert_eq!(reopened.last_lsn(), lsn + 1);
}

/// Runs `ops` on a fresh durable index whose storage loses power at its
/// `cut`-th call after creation; returns the number of acknowledged ops,
/// whether the power cut was reached, and the storage.
fn run_until_power_loss(
    ops: &[Op],
    cut: u64,
    seed: u64,
    skipped: Option<&'static str>,
) -> (usize, bool, SimStorage) {
    let storage = SimStorage::new(seed);
    if let Some(site) = skipped {
        storage.skip_sync(site);
    }
    let index = DurableIndex::create("/db", params(), sim_options(&storage)).unwrap();
    storage.cut_power_at(cut);
    let mut acked = 0;
    let mut cut_reached = false;
    for op in ops {
        if run(&index, op).is_err() {
            cut_reached = true;
            break;
        }
        acked += 1;
    }
    drop(index);
    storage.crash();
    (acked, cut_reached, storage)
}

/// Checks the crash property; `Err` describes the violation.
fn recovered_correctly(ops: &[Op], acked: usize, storage: &SimStorage) -> Result<(), String> {
    let reopened = DurableIndex::open("/db", sim_options(storage))
        .map_err(|e| format!("reopen failed: {e}"))?;
    reopened
        .index()
        .check_invariants()
        .map_err(|e| format!("invariants: {e}"))?;
    let found = state(reopened.index());
    let acknowledged = model_after(&ops[..acked]);
    let with_in_flight = model_after(&ops[..(acked + 1).min(ops.len())]);
    if found == acknowledged || found == with_in_flight {
        Ok(())
    } else {
        Err(format!(
            "after {acked} acknowledged ops: found {found:?}, expected {acknowledged:?}"
        ))
    }
}

#[test]
fn power_loss_at_every_storage_call_loses_no_acknowledged_operation() {
    let ops = script(21, 60, 15);
    let mut cut = 1;
    let mut crashes = 0;
    loop {
        let mut reached = false;
        for seed in 0..4u64 {
            let (acked, cut_reached, storage) =
                run_until_power_loss(&ops, cut, cut * 31 + seed, None);
            reached |= cut_reached;
            if let Err(violation) = recovered_correctly(&ops, acked, &storage) {
                panic!("power loss at call {cut} (seed {seed}): {violation}");
            }
            crashes += 1;
        }
        if !reached {
            break;
        }
        cut += 1;
    }
    assert!(cut > 60, "the script made only {cut} storage calls");
    eprintln!("{crashes} simulated power losses over {cut} storage calls, all recovered");
}

/// Removing any one fsync call site must make the crash test fail: each
/// fsync is needed, and the crash test can see it missing.
#[test]
fn every_fsync_is_needed_the_crash_test_catches_each_one_missing() {
    let ops = script(21, 60, 15);
    for site in [
        SYNC_SNAPSHOT_FILE,
        SYNC_SNAPSHOT_DIR,
        SYNC_LOG_FILE,
        SYNC_LOG_DIR,
    ] {
        let mut caught = None;
        'search: for cut in 1..400u64 {
            for seed in 0..8u64 {
                let (acked, cut_reached, storage) =
                    run_until_power_loss(&ops, cut, cut * 131 + seed, Some(site));
                if let Err(violation) = recovered_correctly(&ops, acked, &storage) {
                    caught = Some((cut, violation));
                    break 'search;
                }
                if !cut_reached {
                    break 'search;
                }
            }
        }
        let (cut, violation) =
            caught.unwrap_or_else(|| panic!("without the '{site}' fsync no crash lost data"));
        eprintln!("without '{site}': power loss at call {cut}: {violation}");
    }
}

#[test]
fn an_io_error_at_each_step_of_save_leaves_the_previous_file_and_the_index_intact() {
    let storage = SimStorage::new(3);
    storage.create_dir_all(Path::new("/db")).unwrap();
    let path = Path::new("/db/index.nann");
    let older = Index::new(params()).unwrap();
    for k in 0..KEYS {
        older.insert(k, &[k as f32; DIM]).unwrap();
    }
    let saved = state(&older);
    older.save_to(&storage, path).unwrap();
    let index = Index::open_from(&storage, path).unwrap();
    index.update(3, &[9.0; DIM]).unwrap();
    index.remove(4).unwrap();
    let changed = state(&index);

    let before = storage.calls();
    index.save_to(&storage, path).unwrap();
    let steps = storage.calls() - before;
    // create, write x (header + padding + sections), fsync, rename, fsync dir
    assert!(steps >= 5, "a save makes {steps} storage calls");
    for step in 1..=steps {
        for errno in [28 /* ENOSPC */, 5 /* EIO */] {
            older.save_to(&storage, path).unwrap();
            storage.fail_at(step, errno);
            let err = index.save_to(&storage, path).unwrap_err();
            assert!(matches!(err, Error::Io { .. }), "step {step}: {err:?}");
            let on_disk = state(&Index::open_from(&storage, path).unwrap());
            if step < steps {
                assert_eq!(on_disk, saved, "step {step}: the previous file changed");
            } else {
                // The directory fsync failed after the rename: the file is
                // one complete snapshot or the other, never a mixture.
                assert!(on_disk == saved || on_disk == changed);
            }
            assert_eq!(state(&index), changed, "step {step}: the index changed");
            index.save_to(&storage, path).unwrap();
            assert_eq!(state(&Index::open_from(&storage, path).unwrap()), changed);
            // No temporary file is left behind.
            assert_eq!(
                storage.list(Path::new("/db")).unwrap(),
                vec!["index.nann".to_string()]
            );
        }
    }
}

#[test]
fn an_io_error_in_the_log_or_a_checkpoint_fails_the_operation_and_changes_nothing() {
    let ops = script(5, 40, 0);
    for step in 1..=4u64 {
        for errno in [28, 5] {
            let storage = SimStorage::new(step);
            let index = DurableIndex::create("/db", params(), sim_options(&storage)).unwrap();
            for op in &ops[..20] {
                run(&index, op).unwrap();
            }
            let before = state(index.index());

            storage.fail_at(step, errno);
            let failed = run(&index, &ops[20]);
            if failed.is_ok() {
                // The op needed fewer storage calls than `step`.
                continue;
            }
            assert!(matches!(failed, Err(Error::Io { .. })), "{failed:?}");
            assert_eq!(state(index.index()), before, "the failed op was applied");
            // Retried, the same op succeeds, so do the rest; a failed
            // checkpoint changes nothing; reopening shows every
            // acknowledged op.
            for op in &ops[20..] {
                run(&index, op).unwrap();
            }
            storage.fail_at(1, errno);
            assert!(index.checkpoint().is_err());
            assert_eq!(state(index.index()), model_after(&ops));
            index.checkpoint().unwrap();
            let expected = state(index.index());
            drop(index);
            let reopened = DurableIndex::open("/db", sim_options(&storage)).unwrap();
            assert_eq!(
                state(reopened.index()),
                expected,
                "step {step} errno {errno}"
            );
        }
    }
}

/// The child side of the kill -9 test: runs the script on a real directory
/// and prints `ack <n>` after each acknowledged operation.
#[test]
fn sigkill_child() {
    let Ok(dir) = std::env::var("NANN_SIGKILL_DIR") else {
        return;
    };
    let ops = script(77, 100_000, 25);
    let index =
        DurableIndex::create(&dir, params(), DurableOptions::new(Durability::PerOp)).unwrap();
    use std::io::Write;
    let stdout = std::io::stdout();
    for (i, op) in ops.iter().enumerate() {
        run(&index, op).unwrap();
        let mut out = stdout.lock();
        writeln!(out, "ack {}", i + 1).unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn kill_9_at_random_points_loses_no_acknowledged_operation() {
    let rounds: usize = std::env::var("NANN_SIGKILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let ops = script(77, 100_000, 25);
    let root = std::env::temp_dir().join(format!("nann-sigkill-{}", std::process::id()));
    let mut rng = Rng(4242);
    for round in 0..rounds {
        let dir: PathBuf = root.join(format!("round-{round}"));
        let _ = std::fs::remove_dir_all(&dir);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sigkill_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("NANN_SIGKILL_DIR", &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let kill_after = (rng.next() % 120) as usize;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked = 0;
        while acked < kill_after {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(n) = line.strip_prefix("ack ") {
                        acked = n.parse().unwrap();
                    }
                }
                _ => break,
            }
        }
        child.kill().unwrap();
        // Acks printed between our last read and the kill count too.
        for line in lines.map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("ack ") {
                acked = n.parse().unwrap();
            }
        }
        child.wait().unwrap();
        if !dir.join(nann::SNAPSHOT_FILE).exists() {
            // Killed before `create` finished: nothing was acknowledged.
            assert_eq!(acked, 0);
            continue;
        }
        let reopened = DurableIndex::open(&dir, DurableOptions::new(Durability::PerOp))
            .unwrap_or_else(|e| {
                panic!("round {round}: reopen failed after kill at ack {acked}: {e}")
            });
        reopened.index().check_invariants().unwrap();
        let found = state(reopened.index());
        if std::env::var_os("NANN_SHOW").is_some() {
            eprintln!(
                "round {round}: killed after ack {acked}, replayed {:?}",
                reopened.replay_report()
            );
        }
        assert!(
            found == model_after(&ops[..acked]) || found == model_after(&ops[..acked + 1]),
            "round {round}: state after kill at ack {acked} is neither the acknowledged state nor it plus the in-flight op"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_failed_first_batch_of_a_log_keeps_its_header_and_later_writes() {
    // The first record batch of a new log generation fails (and the
    // operation with it); the writes after it are acknowledged and must
    // all be there after a reopen. A cut back past the log's header would
    // make the whole generation unreadable and lose them.
    let ops = script(9, 30, 0);
    for errno in [28, 5] {
        let storage = SimStorage::new(errno as u64);
        let index = DurableIndex::create("/db", params(), sim_options(&storage)).unwrap();
        storage.fail_at(1, errno);
        assert!(run(&index, &ops[0]).is_err(), "the injected failure");
        for op in &ops {
            run(&index, op).unwrap();
        }
        drop(index);
        storage.crash();
        let reopened = DurableIndex::open("/db", sim_options(&storage)).unwrap();
        assert_eq!(state(reopened.index()), model_after(&ops), "errno {errno}");
    }
}

#[test]
fn create_never_replaces_an_index_or_its_logs() {
    let storage = SimStorage::new(3);
    let ops = script(4, 10, 0);
    let index = DurableIndex::create("/db", params(), sim_options(&storage)).unwrap();
    for op in &ops {
        run(&index, op).unwrap();
    }
    drop(index);
    let again = DurableIndex::create("/db", params(), sim_options(&storage));
    assert!(matches!(
        again,
        Err(Error::InvalidParameter { name: "dir", .. })
    ));
    // Without its snapshot the logs are still someone's writes.
    storage.remove(Path::new("/db/index.nann")).unwrap();
    let again = DurableIndex::create("/db", params(), sim_options(&storage));
    assert!(
        matches!(again, Err(Error::InvalidParameter { name: "dir", .. })),
        "{again:?}"
    );
}

#[test]
fn a_log_name_at_the_last_generation_is_a_typed_error() {
    // A forged file name: the next generation would overflow.
    let storage = SimStorage::new(5);
    let index = DurableIndex::create("/db", params(), sim_options(&storage)).unwrap();
    drop(index);
    drop(
        storage
            .create(Path::new("/db/log-ffffffffffffffff.wal"))
            .unwrap(),
    );
    let opened = DurableIndex::open("/db", sim_options(&storage));
    assert!(matches!(opened, Err(Error::Format(_))), "{opened:?}");
}

#[test]
fn a_file_truncated_after_a_failed_write_takes_the_next_append_at_its_end() {
    // FsStorage's log files: `truncate` (set_len) does not move a plain
    // write position, so without append mode the next batch would land
    // past the end behind a gap of zeros, ending the log there on recovery.
    let dir = std::env::temp_dir().join(format!("nann-fs-append-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("log");
    let _ = std::fs::remove_file(&path);
    let storage = nann::persist::FsStorage;
    let mut file = storage.create(&path).unwrap();
    file.append(b"header--batch-one").unwrap();
    file.truncate(8).unwrap();
    file.append(b"batch-two").unwrap();
    file.sync("test").unwrap();
    drop(file);
    assert_eq!(std::fs::read(&path).unwrap(), b"header--batch-two");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_second_writer_on_one_directory_is_refused_until_the_first_drops() {
    let storage = SimStorage::new(11);
    let first = DurableIndex::create("/db", params(), sim_options(&storage)).unwrap();
    first.insert(1, &[1.0; DIM]).unwrap();
    let second = DurableIndex::open("/db", sim_options(&storage));
    assert!(
        matches!(second, Err(Error::DirectoryInUse { ref path }) if path == "/db"),
        "{second:?}"
    );
    let again = DurableIndex::create("/db", params(), sim_options(&storage));
    assert!(
        matches!(again, Err(Error::DirectoryInUse { .. })),
        "{again:?}"
    );
    let either = DurableIndex::open_or_create("/db", params(), sim_options(&storage));
    assert!(
        matches!(either, Err(Error::DirectoryInUse { .. })),
        "{either:?}"
    );
    // The refused opens changed nothing: the first writer goes on.
    first.insert(2, &[2.0; DIM]).unwrap();
    first.checkpoint().unwrap();
    drop(first);
    let reopened = DurableIndex::open("/db", sim_options(&storage)).unwrap();
    assert_eq!(reopened.index().len(), 2);
    // Another directory is another lock.
    DurableIndex::create("/other", params(), sim_options(&storage)).unwrap();
}

#[test]
fn a_crash_releases_the_lock_and_a_stale_guard_releases_nothing() {
    let storage = SimStorage::new(12);
    let before_crash = DurableIndex::create("/db", params(), sim_options(&storage)).unwrap();
    before_crash.insert(1, &[1.0; DIM]).unwrap();
    storage.crash();
    let after_crash = DurableIndex::open("/db", sim_options(&storage)).unwrap();
    assert_eq!(after_crash.index().len(), 1);
    // The dead process's value goes away; the new holder keeps its lock.
    drop(before_crash);
    let third = DurableIndex::open("/db", sim_options(&storage));
    assert!(
        matches!(third, Err(Error::DirectoryInUse { .. })),
        "{third:?}"
    );
}

/// The child side of the cross-process lock test: opens the directory,
/// prints `locked`, and holds it until killed.
#[test]
fn lock_holder_child() {
    let Ok(dir) = std::env::var("NANN_LOCK_HOLDER_DIR") else {
        return;
    };
    let _index = DurableIndex::open(&dir, DurableOptions::new(Durability::PerOp)).unwrap();
    println!("locked");
    std::thread::sleep(std::time::Duration::from_secs(600));
}

#[test]
fn another_process_holding_the_directory_is_refused_and_its_death_frees_it() {
    let dir = std::env::temp_dir().join(format!("nann-lock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = DurableOptions::new(Durability::PerOp);
    {
        let index = DurableIndex::create(&dir, params(), options.clone()).unwrap();
        index.insert(1, &[1.0; DIM]).unwrap();
        // In this process: a second open of the same directory.
        let second = DurableIndex::open(&dir, options.clone());
        assert!(
            matches!(second, Err(Error::DirectoryInUse { .. })),
            "{second:?}"
        );
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lock_holder_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("NANN_LOCK_HOLDER_DIR", &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let locked = lines.any(|line| line.is_ok_and(|l| l.contains("locked")));
    assert!(locked, "the child did not open the directory");
    let refused = DurableIndex::open(&dir, options.clone());
    assert!(
        matches!(refused, Err(Error::DirectoryInUse { .. })),
        "{refused:?}"
    );
    // kill -9: the OS releases the lock with the process.
    child.kill().unwrap();
    child.wait().unwrap();
    let reopened = DurableIndex::open(&dir, options).unwrap();
    assert_eq!(reopened.index().len(), 1);
    drop(reopened);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Recomputes the checksum of every record frame it can walk (the frame is
/// `body_len u32 | crc32c u32 | body`), so damage inside a body passes the
/// checksum: a crafted log rather than a torn one.
fn reseal_records(bytes: &mut [u8]) {
    let mut at = 32; // the log header
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|&e| e <= bytes.len()) else {
            break;
        };
        let crc = crc32c::crc32c(&bytes[at + 8..end]);
        bytes[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

#[test]
fn damaged_or_crafted_logs_replay_a_prefix_or_fail_typed_never_panic() {
    // One index's snapshot and log (40 records, no checkpoint), then many
    // damaged copies of the log: bit flips, overwrites and cuts as is
    // (torn: replay must stop at the damage, so the state is the model
    // after some prefix of the ops), and resealed, or a stretch of the log
    // repeated elsewhere (crafted: a stretch of whole records passes their
    // checksums, and a record moved forward past others is a valid
    // record; any typed outcome, but no panic and a sound index).
    let cases: usize = std::env::var("NANN_LOG_DAMAGE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let ops = script(21, 40, 0);
    let original = SimStorage::new(21);
    let index = DurableIndex::create("/db", params(), sim_options(&original)).unwrap();
    for op in &ops {
        run(&index, op).unwrap();
    }
    drop(index);
    let log_name = original
        .list(Path::new("/db"))
        .unwrap()
        .into_iter()
        .find(|n| n.starts_with("log-"))
        .unwrap();
    let snapshot = original.read(Path::new("/db/index.nann")).unwrap();
    let log = original.read(&Path::new("/db").join(&log_name)).unwrap();
    let prefixes: Vec<Model> = (0..=ops.len()).map(|n| model_after(&ops[..n])).collect();

    let mut rng = Rng(99);
    let (mut opened, mut refused) = (0, 0);
    for case in 0..cases {
        let mut bytes = log.clone();
        let at = (rng.next() as usize) % bytes.len();
        match case % 4 {
            0 => bytes[at] ^= 1 << (rng.next() % 8),
            1 => {
                let end = (at + 1 + (rng.next() as usize) % 16).min(bytes.len());
                for b in &mut bytes[at..end] {
                    *b = rng.next() as u8;
                }
            }
            2 => bytes.truncate(at),
            _ => {
                // Repeat a stretch of the log (a record replayed twice).
                let len = 1 + (rng.next() as usize) % 64;
                let stretch = bytes[at..(at + len).min(bytes.len())].to_vec();
                let to = (rng.next() as usize) % bytes.len();
                bytes.splice(to..to, stretch);
            }
        }
        let crafted = case % 8 >= 4 || case % 4 == 3;
        if crafted {
            reseal_records(&mut bytes);
            if bytes.len() >= 32 {
                // And the (version 1) header: its damage becomes content.
                let crc = crc32c::crc32c(&bytes[..24]);
                bytes[24..28].copy_from_slice(&crc.to_le_bytes());
            }
        }
        let storage = SimStorage::new(case as u64);
        storage.create_dir_all(Path::new("/db")).unwrap();
        let mut file = storage.create(Path::new("/db/index.nann")).unwrap();
        file.append(&snapshot).unwrap();
        let mut file = storage.create(&Path::new("/db").join(&log_name)).unwrap();
        file.append(&bytes).unwrap();
        drop(file);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            DurableIndex::open("/db", sim_options(&storage))
        }));
        match outcome {
            Err(_) => panic!("case {case}: open panicked"),
            Ok(Err(e)) => {
                refused += 1;
                assert!(
                    matches!(e, Error::Format(_)),
                    "case {case}: not a format error: {e}"
                );
            }
            Ok(Ok(reopened)) => {
                opened += 1;
                reopened
                    .index()
                    .check_invariants()
                    .unwrap_or_else(|e| panic!("case {case}: {e}"));
                if !crafted {
                    let found = state(reopened.index());
                    assert!(
                        prefixes.contains(&found),
                        "case {case}: the state is not that after any prefix of the ops"
                    );
                }
                // It still takes writes.
                reopened.insert(1000, &[0.5; DIM]).unwrap();
            }
        }
    }
    // Both outcomes were reached (a crafted header is refused, damage to
    // the records cuts the replay).
    assert!(
        opened > 0 && refused > 0,
        "{opened} opened, {refused} refused"
    );
    if std::env::var_os("NANN_SHOW").is_some() {
        eprintln!("{opened} opened, {refused} refused");
    }
}

#[test]
fn upserts_are_logged_as_what_they_did_and_replayed() {
    let storage = SimStorage::new(31);
    let index = DurableIndex::create("/db", params(), sim_options(&storage)).unwrap();
    let mut model = Model::new();
    let mut rng = Rng(31);
    let mut inserted = 0;
    for i in 0..200u64 {
        let key = rng.next() % KEYS;
        if i % 7 == 6 {
            let _ = index.remove(key);
            model.remove(&key);
            continue;
        }
        let v = rng.vector();
        let did = index.upsert(key, &v).unwrap();
        assert_eq!(
            did == nann::Upserted::Inserted,
            !model.contains_key(&key),
            "op {i}"
        );
        inserted += usize::from(did == nann::Upserted::Inserted);
        model.insert(key, v);
    }
    assert!(
        inserted > KEYS as usize,
        "keys were removed and inserted again"
    );
    // Bad input is refused before it is logged.
    let lsn = index.last_lsn();
    assert!(index.upsert(1, &[1.0]).is_err());
    assert_eq!(index.last_lsn(), lsn);
    drop(index);
    storage.crash();
    let reopened = DurableIndex::open("/db", sim_options(&storage)).unwrap();
    assert_eq!(state(reopened.index()), model);
    reopened.index().check_invariants().unwrap();
}
