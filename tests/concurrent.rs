//! Concurrency smoke tests: searches run during inserts, in-place updates and
//! removes. (The full stress, loom and churn suites are a later issue.)

#[path = "../examples/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nann::{Index, IndexParams, Metric};

const DIM: usize = 16;

fn vector(key: u64, version: u64) -> Vec<f32> {
    let mut rng = support::Rng::new(key.wrapping_mul(1_000_003) ^ version);
    (0..DIM).map(|_| rng.uniform()).collect()
}

fn assert_sorted_unique(hits: &[nann::Hit]) {
    assert!(
        hits.windows(2).all(|w| w[0].distance <= w[1].distance),
        "unsorted: {hits:?}"
    );
    let keys: HashSet<u64> = hits.iter().map(|h| h.key).collect();
    assert_eq!(keys.len(), hits.len(), "duplicate keys: {hits:?}");
}

#[test]
fn searches_during_inserts_updates_and_removes() {
    // Small initial capacity: the index grows (adds chunks) under the readers.
    let index = Arc::new(
        Index::new(
            IndexParams::new(DIM, Metric::L2)
                .m(8)
                .ef_construction(64)
                .capacity(64),
        )
        .unwrap(),
    );
    for key in 0..3_000u64 {
        index.insert(key, &vector(key, 0)).unwrap();
    }
    // Keys 0..1000 are removed one by one and never come back; a key enters
    // `gone` only after its remove returned, so a search that starts later
    // must not return it.
    let gone = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut threads = Vec::new();

    for t in 0..2u64 {
        let (index, gone, stop) = (index.clone(), gone.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut searches = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let before: HashSet<u64> = gone.lock().unwrap().clone();
                let q = vector(searches * 2 + t, 99);
                let hits = if searches.is_multiple_of(3) {
                    index.search_filtered(&q, 10, 32, |k| k % 2 == 0).unwrap()
                } else {
                    index.search(&q, 10, 32).unwrap()
                };
                assert_eq!(hits.len(), 10);
                assert_sorted_unique(&hits);
                for h in &hits {
                    assert!(!before.contains(&h.key), "removed key {} returned", h.key);
                }
                searches += 1;
            }
            searches
        }));
    }
    {
        let (index, stop) = (index.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut version = 1;
            while !stop.load(Ordering::Relaxed) {
                for key in (1_000..3_000u64).step_by(7) {
                    index.update(key, &vector(key, version)).unwrap();
                }
                version += 1;
            }
            version
        }));
    }
    {
        let (index, gone, stop) = (index.clone(), gone.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut next_new = 10_000u64;
            for key in 0..1_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                index.remove(key).unwrap();
                gone.lock().unwrap().insert(key);
                // A new key reuses the removed slot.
                index.insert(next_new, &vector(next_new, 0)).unwrap();
                next_new += 1;
            }
            next_new
        }));
    }
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("no thread panicked");
    }
    index.check_invariants().unwrap();
    let gone = gone.lock().unwrap();
    for key in gone.iter() {
        assert!(!index.contains(*key));
    }
    assert_eq!(index.len(), 3_000);
}

#[test]
fn parallel_bulk_build_while_searching() {
    let index = Arc::new(Index::new(IndexParams::new(DIM, Metric::Cosine).capacity(16)).unwrap());
    let keys: Vec<u64> = (0..8_000).collect();
    let vectors: Vec<Vec<f32>> = keys.iter().map(|&k| vector(k, 0)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let searcher = {
        let (index, stop) = (index.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let hits = index.search(&vector(1, 5), 5, 16).unwrap();
                assert_sorted_unique(&hits);
                assert!(hits.iter().all(|h| h.key < 8_000));
            }
        })
    };
    let progress = Mutex::new(Vec::new());
    index
        .insert_many(&keys, &vectors, 2, |p| {
            progress.lock().unwrap().push(p.done)
        })
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    searcher.join().unwrap();
    let progress = progress.into_inner().unwrap();
    assert_eq!(
        progress.iter().max(),
        Some(&8_000),
        "progress reaches the total"
    );
    assert_eq!(index.len(), 8_000);
    index.check_invariants().unwrap();
}

#[test]
fn a_panicking_filter_leaves_the_index_consistent() {
    let index = Index::new(IndexParams::new(DIM, Metric::L2)).unwrap();
    for key in 0..500u64 {
        index.insert(key, &vector(key, 0)).unwrap();
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        index.search_filtered(&vector(3, 1), 5, 32, |key| {
            if key % 17 == 3 {
                panic!("caller bug");
            }
            true
        })
    }));
    assert!(outcome.is_err());
    index.check_invariants().unwrap();
    index.update(3, &vector(3, 2)).unwrap();
    index.remove(4).unwrap();
    assert_eq!(index.search(&vector(3, 2), 1, 32).unwrap()[0].key, 3);
}

#[test]
fn index_is_send_and_sync_without_lifetimes() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Index>();
}

/// Several writers at once with a small M, so lists are pruned constantly:
/// the anchor tree must keep every node reachable (I9, I12) throughout.
#[test]
fn concurrent_writers_with_small_m_keep_the_graph_connected() {
    let index = Arc::new(
        Index::new(
            IndexParams::new(DIM, Metric::L2)
                .m(3)
                .ef_construction(32)
                .capacity(16),
        )
        .unwrap(),
    );
    for key in 0..1_000u64 {
        index.insert(key, &vector(key, 0)).unwrap();
    }
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let index = index.clone();
            std::thread::spawn(move || {
                let mut rng = support::Rng::new(t);
                for round in 0..4_000u64 {
                    match t {
                        // Fresh inserts on disjoint key ranges.
                        0 | 1 => index
                            .insert(100_000 * (t + 1) + round, &vector(t, round))
                            .unwrap(),
                        // In-place updates of keys 0..500.
                        2 => index
                            .update(rng.next_u64() % 500, &vector(7, round))
                            .unwrap(),
                        // Remove and re-insert (slot reuse) on keys 500..1000.
                        _ => {
                            let key = 500 + rng.next_u64() % 500;
                            if index.remove(key).is_ok() {
                                index.insert(key, &vector(key, round + 1)).unwrap();
                            }
                        }
                    }
                    if round % 1_000 == 0 && t == 0 {
                        index.check_invariants().unwrap();
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("no writer panicked");
    }
    index.check_invariants().unwrap();
    assert_eq!(index.len(), 9_000);
    // Exactness with ef >= n is the observable face of reachability.
    let q = vector(3, 3);
    let exact = index.search_exact(&q, 10).unwrap();
    let graph = index.search(&q, 10, 10_000).unwrap();
    assert_eq!(exact, graph);
}

#[test]
fn concurrent_upserts_and_removes_of_two_keys_never_fail() {
    // Writers upsert two keys while another removes them, so each key
    // flips between absent and present all the time. An upsert made of
    // `update`, then `insert` on KeyNotFound, loses that race (another
    // writer inserts between its two calls: DuplicateKey); `upsert` must
    // never fail, and the index must stay sound.
    let index = Arc::new(Index::new(IndexParams::new(DIM, Metric::L2).m(4)).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let remover = {
        let (index, stop) = (Arc::clone(&index), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut key = 0;
            while !stop.load(Ordering::Relaxed) {
                let _ = index.remove(key % 2);
                key += 1;
            }
        })
    };
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let index = Arc::clone(&index);
            std::thread::spawn(move || {
                for i in 0..20_000u64 {
                    let key = (i + t) % 2;
                    index
                        .upsert(key, &vector(key, i))
                        .unwrap_or_else(|e| panic!("upsert of {key} failed: {e}"));
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    remover.join().unwrap();
    assert!(index.len() <= 2);
    index.check_invariants().unwrap();
}

#[test]
fn keys_lists_the_stable_entries_exactly_once_while_others_churn() {
    // Keys 0..200 stay present (their vectors are updated in place all
    // the time); keys from 1000 on are inserted and removed. Every scan
    // must list each stable key exactly once and nothing but keys that
    // exist at some point.
    let index = Arc::new(Index::new(IndexParams::new(DIM, Metric::L2).m(8)).unwrap());
    for key in 0..200u64 {
        index.insert(key, &vector(key, 0)).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let (index, stop) = (Arc::clone(&index), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let churn = 1000 + t * 100_000 + i % 300;
                    let _ = index.upsert(churn, &vector(churn, i));
                    if i.is_multiple_of(2) {
                        let _ = index.remove(1000 + t * 100_000 + (i * 7) % 300);
                    }
                    index.update(i % 200, &vector(i % 200, i)).unwrap();
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_millis(700);
    let mut scans = 0;
    while Instant::now() < deadline {
        let keys = index.keys();
        let mut stable: Vec<u64> = keys.iter().copied().filter(|&k| k < 200).collect();
        stable.sort_unstable();
        assert_eq!(stable, (0..200).collect::<Vec<u64>>(), "scan {scans}");
        assert!(keys
            .iter()
            .all(|&k| k < 200 || (1000..1000 + 100_300).contains(&k)));
        scans += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(scans > 10);
    index.check_invariants().unwrap();
}
