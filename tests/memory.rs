//! Removal, compaction and memory: tombstones are unlinked by `compact`,
//! removed slots and replaced vectors are reused, memory stays near the live
//! set under churn, and epoch garbage drains once a long-held reader lets go.
//!
//! Memory is `Index::memory_usage().total()`: every byte the index allocated
//! (spare capacity included), the same measure for the churned index and
//! for the fresh build it is compared with.

#[path = "../examples/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nann::{Index, IndexParams, Metric};
use support::{Rng, Vectors};

const DIM: usize = 16;

/// Taken by the tests that measure memory or hold a reader pinned: every
/// index in the process shares crossbeam-epoch's global collector, so a
/// reader pinned by one test holds back the recycling of all of them, and
/// the memory tests would measure that instead of their own churn.
static EPOCH_SENSITIVE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    EPOCH_SENSITIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn params(capacity: usize) -> IndexParams {
    IndexParams::new(DIM, Metric::L2)
        .m(12)
        .ef_construction(100)
        .capacity(capacity)
}

fn random_vector(rng: &mut Rng) -> Vec<f32> {
    (0..DIM).map(|_| rng.uniform()).collect()
}

/// Keys `0..n` with random vectors, and the generator, to draw more.
fn random_entries(n: u64, seed: u64) -> (Vec<(u64, Vec<f32>)>, Rng) {
    let mut rng = Rng::new(seed);
    let entries = (0..n).map(|k| (k, random_vector(&mut rng))).collect();
    (entries, rng)
}

/// R@10 of `index` over `live` (key, vector) pairs, at ef 64, against brute
/// force over exactly those vectors.
fn recall_over(index: &Index, live: &[(u64, Vec<f32>)], queries: &Vectors) -> f64 {
    let base = Vectors {
        dim: DIM,
        data: live.iter().flat_map(|(_, v)| v.iter().copied()).collect(),
    };
    let position: HashMap<u64, u64> = live
        .iter()
        .enumerate()
        .map(|(i, (key, _))| (*key, i as u64))
        .collect();
    let truth = support::ground_truth(&base, queries, 10, "l2", 2);
    let found: Vec<Vec<u64>> = support::search_keys(index, queries, 10, 64)
        .unwrap()
        .into_iter()
        .map(|keys| keys.iter().map(|k| position[k]).collect())
        .collect();
    support::recall(&found, &truth, 10, 10)
}

fn fresh_build(live: &[(u64, Vec<f32>)]) -> Index {
    let index = Index::new(params(live.len())).unwrap();
    let keys: Vec<u64> = live.iter().map(|(k, _)| *k).collect();
    let vectors: Vec<&[f32]> = live.iter().map(|(_, v)| v.as_slice()).collect();
    index.insert_many(&keys, &vectors, 2, |_| {}).unwrap();
    index
}

#[test]
fn compact_after_removing_90_percent_restores_a_graph_as_good_as_a_fresh_build() {
    let n = 20_000u64;
    let (all, mut rng) = random_entries(n, 1);
    let index = fresh_build(&all);
    let mut live = Vec::new();
    for (key, v) in all {
        if rng.next_u64().is_multiple_of(10) {
            live.push((key, v));
        } else {
            index.remove(key).unwrap();
        }
    }
    let queries = support::uniform(300, DIM, 9);
    let before = index.stats();
    assert_eq!(before.tombstones, n as usize - live.len());
    let scans_before = before.exact_scans;
    let timer = Instant::now();
    let recall_tombstoned = recall_over(&index, &live, &queries);
    let tombstoned_time = timer.elapsed();

    let done = index.compact();
    assert_eq!(done.unlinked, n as usize - live.len());
    index.check_invariants().unwrap();
    let after = index.stats();
    assert_eq!(after.tombstones, 0);
    assert_eq!(
        after.removed,
        n as usize - live.len(),
        "slots stay for reuse"
    );
    let scans_mid = after.exact_scans;
    let timer = Instant::now();
    let recall_compacted = recall_over(&index, &live, &queries);
    let compacted_time = timer.elapsed();
    let fresh_recall = recall_over(&fresh_build(&live), &live, &queries);
    eprintln!(
        "R@10 ef 64 over the live 10%: tombstoned {recall_tombstoned:.4} ({} of 300 \
         queries fell back to an exact scan), compacted {recall_compacted:.4}, fresh build \
         {fresh_recall:.4}; {done:?}; queries + ground truth took {tombstoned_time:?} \
         tombstoned, {compacted_time:?} compacted",
        scans_mid - scans_before
    );
    // The graph alone answers after compaction: no exact-scan fallback.
    assert_eq!(index.stats().exact_scans, scans_mid);
    assert!(
        recall_compacted >= fresh_recall - 0.01,
        "compacted {recall_compacted} vs fresh {fresh_recall}"
    );

    // A compacted index saves and opens (detached slots are free slots in
    // the file) and answers the same.
    let path = std::env::temp_dir().join(format!("nann-compact-{}.nann", std::process::id()));
    index.save(&path).unwrap();
    let reopened = Index::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    reopened.check_invariants().unwrap();
    assert_eq!(reopened.stats().removed, after.removed);
    assert_eq!(reopened.stats().tombstones, 0);
    assert_eq!(
        support::search_keys(&reopened, &queries, 10, 64).unwrap(),
        support::search_keys(&index, &queries, 10, 64).unwrap()
    );

    // Detached slots are reused by inserts, which link them again.
    for key in n..n + 5_000 {
        let v = random_vector(&mut rng);
        index.insert(key, &v).unwrap();
        live.push((key, v));
    }
    index.check_invariants().unwrap();
    assert_eq!(index.stats().slots, n as usize, "inserts reused the slots");
    let recall_refilled = recall_over(&index, &live, &queries);
    assert!(recall_refilled >= fresh_recall - 0.02, "{recall_refilled}");
    // Compacting with nothing removed changes nothing.
    assert_eq!(index.compact().unlinked, 0);
}

#[test]
fn compact_runs_while_searches_and_is_serialised_with_writers() {
    let n = 6_000u64;
    let (all, _) = random_entries(n, 2);
    let index = Arc::new(fresh_build(&all));
    for key in (0..n).filter(|k| k % 3 != 0) {
        index.remove(key).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for t in 0..2u64 {
        let (index, stop) = (index.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng::new(100 + t);
            let mut searches = 0;
            while !stop.load(Ordering::Relaxed) || searches < 100 {
                let hits = index.search(&random_vector(&mut rng), 10, 32).unwrap();
                assert_eq!(hits.len(), 10);
                // Removed before the search started: never returned.
                assert!(hits.iter().all(|h| h.key % 3 == 0), "{hits:?}");
                searches += 1;
            }
        }));
    }
    // A writer racing the compaction: it waits at the writer gate.
    let writer = {
        let index = index.clone();
        std::thread::spawn(move || {
            let mut rng = Rng::new(7);
            for key in (0..n).step_by(3).take(500) {
                index.update(key, &random_vector(&mut rng)).unwrap();
            }
        })
    };
    let done = index.compact();
    writer.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(done.unlinked, (n - n.div_ceil(3)) as usize);
    index.check_invariants().unwrap();
}

#[test]
fn removal_churn_of_ten_times_capacity_keeps_memory_near_the_live_set() {
    let _serial = serial();
    let n = 10_000u64;
    let (mut live, _) = random_entries(n, 3);
    let index = Arc::new(fresh_build(&live));
    // 10 x capacity removes, each followed by an insert of a new key, on two
    // threads (each owns half of the live set).
    let halves: Vec<Vec<(u64, Vec<f32>)>> = vec![
        live.iter().filter(|(k, _)| k % 2 == 0).cloned().collect(),
        live.iter().filter(|(k, _)| k % 2 == 1).cloned().collect(),
    ];
    let workers: Vec<_> = halves
        .into_iter()
        .enumerate()
        .map(|(t, mut mine)| {
            let index = index.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(50 + t as u64);
                let mut next_key = n + t as u64;
                for _ in 0..5 * n {
                    let i = (rng.next_u64() % mine.len() as u64) as usize;
                    index.remove(mine[i].0).unwrap();
                    let v = random_vector(&mut rng);
                    index.insert(next_key, &v).unwrap();
                    mine[i] = (next_key, v);
                    next_key += 2;
                }
                mine
            })
        })
        .collect();
    live = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    index.check_invariants().unwrap();
    assert_eq!(index.len(), n as usize);
    let (churned, fresh) = (index.memory_usage(), fresh_build(&live).memory_usage());
    let ratio = churned.total() as f64 / fresh.total() as f64;
    eprintln!(
        "after 10x removal churn: {ratio:.3}x a fresh build of the live set \
         ({churned:?} vs {fresh:?}), {:?}",
        index.stats()
    );
    assert!(ratio <= 1.2, "{ratio}");
    let queries = support::uniform(300, DIM, 11);
    let recall = recall_over(&index, &live, &queries);
    let fresh_recall = recall_over(&fresh_build(&live), &live, &queries);
    assert!(recall >= fresh_recall - 0.02, "{recall} vs {fresh_recall}");
}

#[test]
fn ten_updates_per_entry_keep_memory_within_ten_percent_of_the_build() {
    let _serial = serial();
    let n = 10_000u64;
    let (live, _) = random_entries(n, 4);
    let index = Arc::new(fresh_build(&live));
    let built = index.memory_usage().total();
    let workers: Vec<_> = (0..2u64)
        .map(|t| {
            let index = index.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(60 + t);
                for _ in 0..5 * n {
                    let key = (rng.next_u64() % (n / 2)) * 2 + t;
                    index.update(key, &random_vector(&mut rng)).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    index.check_invariants().unwrap();
    let after = index.memory_usage().total();
    let ratio = after as f64 / built as f64;
    eprintln!("after 10 updates per entry: {ratio:.4}x the initial build");
    assert!(ratio <= 1.10, "{ratio}");
}

#[test]
fn epoch_garbage_drains_within_a_second_after_a_long_held_reader_lets_go() {
    let _serial = serial();
    let n = 5_000u64;
    let (live, _) = random_entries(n, 5);
    let index = Arc::new(fresh_build(&live));
    let cell_bytes = DIM * 4 + 8;

    // The long-held reader: a filtered search whose filter blocks, so the
    // search stays pinned, until told to let go.
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let reader = {
        let index = index.clone();
        std::thread::spawn(move || {
            let first = std::cell::Cell::new(true);
            let release_rx = std::sync::Mutex::new(release_rx);
            index
                .search_filtered(&[0.5; DIM], 5, 32, |_key| {
                    if first.replace(false) {
                        held_tx.send(()).unwrap();
                        release_rx.lock().unwrap().recv().unwrap();
                    }
                    true
                })
                .unwrap();
        })
    };
    held_rx.recv().unwrap();

    // While it is pinned, nothing retired can be recycled.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (index, stop) = (index.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng::new(70);
            let mut updates = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = rng.next_u64() % n;
                index.update(key, &random_vector(&mut rng)).unwrap();
                updates += 1;
            }
            updates
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let pinned = index.stats().pending_garbage_bytes;
    assert!(
        pinned >= 200 * cell_bytes,
        "only {pinned} B pending while a reader is pinned"
    );

    // Let go; the writer keeps writing, as a live service would.
    release_tx.send(()).unwrap();
    reader.join().unwrap();
    let released = Instant::now();
    // Drained: at most what the writer retired in its last moments, a
    // bag's worth per thread (crossbeam-epoch defers up to 64 per thread).
    let drained = 4 * 64 * cell_bytes;
    while index.stats().pending_garbage_bytes > drained {
        assert!(
            released.elapsed() < Duration::from_secs(1),
            "{} B still pending 1 s after the reader let go (peak {pinned} B)",
            index.stats().pending_garbage_bytes
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = released.elapsed();
    stop.store(true, Ordering::Relaxed);
    let updates = writer.join().unwrap();
    eprintln!(
        "{updates} updates; {pinned} B pending while pinned, drained to <= {drained} B in {took:?}"
    );
    // Idle: explicit collection recycles the rest (retried: other tests in
    // this process pin too, and each pinned thread holds the epoch back).
    let idle = Instant::now();
    while index.collect_garbage() > 0 {
        assert!(
            idle.elapsed() < Duration::from_secs(1),
            "garbage left when idle"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    index.check_invariants().unwrap();
}
