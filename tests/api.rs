//! Behaviour of the public API: errors, edge cases, determinism, filters.

#[path = "../examples/support/mod.rs"]
mod support;

use nann::{Error, Index, IndexParams, Metric, Upserted};

fn params(dim: usize) -> IndexParams {
    IndexParams::new(dim, Metric::L2)
}

#[test]
fn bad_input_is_a_typed_error() {
    let index = Index::new(params(3)).unwrap();
    assert_eq!(
        index.insert(1, &[1.0, 2.0]),
        Err(Error::DimensionMismatch {
            expected: 3,
            actual: 2
        })
    );
    assert!(matches!(
        index.insert(1, &[1.0, f32::INFINITY, 0.0]),
        Err(Error::NonFiniteValue { position: 1, .. })
    ));
    assert!(matches!(
        index.search(&[f32::NAN, 0.0, 0.0], 1, 10),
        Err(Error::NonFiniteValue { position: 0, .. })
    ));
    assert!(matches!(
        index.search(&[0.0; 4], 1, 10),
        Err(Error::DimensionMismatch { .. })
    ));
    assert_eq!(index.update(5, &[0.0; 3]), Err(Error::KeyNotFound(5)));
    assert_eq!(index.remove(5), Err(Error::KeyNotFound(5)));
    assert_eq!(index.get(5), Err(Error::KeyNotFound(5)));
    index.insert(1, &[0.0; 3]).unwrap();
    assert_eq!(index.insert(1, &[1.0; 3]), Err(Error::DuplicateKey(1)));
    let cosine = Index::new(IndexParams::new(2, Metric::Cosine)).unwrap();
    assert_eq!(cosine.insert(1, &[0.0, 0.0]), Err(Error::ZeroVector));
    for bad in [params(0), params(3).m(1), params(3).ef_construction(0)] {
        assert!(matches!(
            Index::new(bad),
            Err(Error::InvalidParameter { .. })
        ));
    }
    let message = Error::DimensionMismatch {
        expected: 3,
        actual: 2,
    }
    .to_string();
    assert!(message.contains('3') && message.contains('2'), "{message}");
}

#[test]
fn empty_index_and_k_zero() {
    let index = Index::new(params(2)).unwrap();
    assert!(index.search(&[0.0, 0.0], 5, 10).unwrap().is_empty());
    index.insert(1, &[0.0, 0.0]).unwrap();
    assert!(index.search(&[0.0, 0.0], 0, 10).unwrap().is_empty());
    assert_eq!(index.search(&[0.0, 0.0], 5, 10).unwrap().len(), 1);
    index.remove(1).unwrap();
    assert!(index.search(&[0.0, 0.0], 5, 10).unwrap().is_empty());
    assert!(index.is_empty());
    index.check_invariants().unwrap();
}

#[test]
fn single_threaded_builds_with_one_seed_are_identical() {
    let data = support::uniform(2_000, 8, 11);
    let build = |seed| {
        let index = Index::new(params(8).seed(seed)).unwrap();
        let keys: Vec<u64> = (0..2_000).collect();
        index.insert_many(&keys, &data.rows(), 1, |_| {}).unwrap();
        let queries = support::uniform(50, 8, 12);
        queries
            .rows()
            .iter()
            .map(|q| index.search(q, 10, 20).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(build(7), build(7));
}

#[test]
fn removed_slots_are_reused_so_memory_stays_flat() {
    let index = Index::new(params(8).capacity(1_000)).unwrap();
    let data = support::uniform(1_000, 8, 1);
    for (key, row) in data.rows().iter().enumerate() {
        index.insert(key as u64, row).unwrap();
    }
    let before = index.memory_usage();
    for round in 0..5u64 {
        for key in 0..500u64 {
            index.remove(key + round * 1_000_000).unwrap();
            index
                .insert(key + (round + 1) * 1_000_000, data.row(key as usize))
                .unwrap();
        }
    }
    let after = index.memory_usage();
    assert_eq!(before.links, after.links, "no new slots");
    assert_eq!(index.len(), 1_000);
    index.check_invariants().unwrap();
}

#[test]
fn queries_return_k_hits_even_after_heavy_removal() {
    let index = Index::new(params(8).m(4)).unwrap();
    let data = support::uniform(3_000, 8, 2);
    for (key, row) in data.rows().iter().enumerate() {
        index.insert(key as u64, row).unwrap();
    }
    for key in 0..2_950u64 {
        index.remove(key).unwrap();
    }
    for q in support::uniform(100, 8, 3).rows() {
        let hits = index.search(q, 10, 10).unwrap();
        assert_eq!(hits.len(), 10);
        assert!(hits.iter().all(|h| h.key >= 2_950));
    }
}

#[test]
fn filtered_search_is_exact_for_selective_filters_and_good_for_broad_ones() {
    let data = support::uniform(20_000, 16, 4);
    let index = Index::new(params(16)).unwrap();
    let keys: Vec<u64> = (0..20_000).collect();
    index.insert_many(&keys, &data.rows(), 2, |_| {}).unwrap();
    let queries = support::uniform(50, 16, 5);
    for (modulus, min_recall) in [(1_000u64, 1.0), (10, 0.9), (2, 0.9)] {
        let mut hits_total = 0usize;
        let mut found_total = 0usize;
        for q in queries.rows() {
            let got = index
                .search_filtered(q, 10, 64, |k| k % modulus == 0)
                .unwrap();
            assert!(got.iter().all(|h| h.key % modulus == 0));
            // Brute-force reference over the passing keys.
            let mut want: Vec<(f32, u64)> = (0..20_000u64)
                .filter(|k| k % modulus == 0)
                .map(|k| {
                    (
                        data.row(k as usize)
                            .iter()
                            .zip(q)
                            .map(|(a, b)| (a - b) * (a - b))
                            .sum(),
                        k,
                    )
                })
                .collect();
            want.sort_by(|a, b| a.0.total_cmp(&b.0));
            let want: Vec<u64> = want.iter().take(10).map(|w| w.1).collect();
            assert_eq!(got.len(), want.len());
            found_total += got.iter().filter(|h| want.contains(&h.key)).count();
            hits_total += want.len();
        }
        let recall = found_total as f64 / hits_total as f64;
        assert!(recall >= min_recall, "filter 1/{modulus}: recall {recall}");
    }
}

#[test]
fn batch_search_matches_single_searches() {
    let data = support::uniform(5_000, 12, 6);
    let index = Index::new(params(12)).unwrap();
    let keys: Vec<u64> = (0..5_000).collect();
    index.insert_many(&keys, &data.rows(), 2, |_| {}).unwrap();
    let queries = support::uniform(64, 12, 7);
    let batch = index.search_batch(&queries.rows(), 5, 32, 2);
    for (q, result) in queries.rows().iter().zip(batch) {
        assert_eq!(result.unwrap(), index.search(q, 5, 32).unwrap());
    }
}

#[test]
fn update_moves_an_entry_and_get_returns_the_new_vector() {
    let index = Index::new(params(2)).unwrap();
    for key in 0..200u64 {
        index.insert(key, &[key as f32, 0.0]).unwrap();
    }
    index.update(5, &[1_000.0, 3.0]).unwrap();
    assert_eq!(index.get(5).unwrap(), vec![1_000.0, 3.0]);
    assert_eq!(index.search(&[999.0, 3.0], 1, 16).unwrap()[0].key, 5);
    assert_ne!(index.search(&[5.0, 0.0], 1, 16).unwrap()[0].key, 5);
    index.check_invariants().unwrap();
}

#[test]
fn growth_far_past_the_initial_capacity() {
    let index = Index::new(params(4).capacity(1)).unwrap();
    let data = support::uniform(10_000, 4, 8);
    for (key, row) in data.rows().iter().enumerate() {
        index.insert(key as u64, row).unwrap();
    }
    assert_eq!(index.len(), 10_000);
    index.check_invariants().unwrap();
}

#[test]
fn memory_per_entry_is_vector_plus_links_plus_fixed_state() {
    let n = 20_000;
    let data = support::uniform(n, 32, 9);
    let index = Index::new(params(32).capacity(n)).unwrap();
    let keys: Vec<u64> = (0..n as u64).collect();
    index.insert_many(&keys, &data.rows(), 2, |_| {}).unwrap();
    let usage = index.memory_usage();
    let per_entry = |bytes: usize| bytes as f64 / n as f64;
    // The mission's budget: vector + links + at most 32 bytes of fixed state.
    assert!(
        per_entry(usage.vectors) <= 32.0 * 4.0 * 1.03,
        "vectors {}",
        per_entry(usage.vectors)
    );
    assert!(
        per_entry(usage.fixed) <= 32.0,
        "fixed state {} bytes per entry",
        per_entry(usage.fixed)
    );
    // Links: M0 ids + a degree word on layer 0, ~1/M of nodes with upper layers.
    assert!(
        per_entry(usage.links) <= (2.0 * 16.0 + 1.0) * 4.0 * 1.1,
        "links {}",
        per_entry(usage.links)
    );
    println!(
        "per entry: vectors {:.1} B, links {:.1} B, fixed {:.1} B",
        per_entry(usage.vectors),
        per_entry(usage.links),
        per_entry(usage.fixed)
    );
}

/// `search_with_stats` returns exactly `search`'s hits, and its distance
/// count follows the work: a wider beam computes more distances, a beam as
/// wide as the index computes at least one per entry, and a search through
/// the graph never counts a fallback scan.
#[test]
fn search_stats_count_the_work() {
    let index = Index::new(params(4)).unwrap();
    let n = 2000u64;
    for key in 0..n {
        let x = key as f32;
        index
            .insert(key, &[x.sin(), x.cos(), (x * 0.37).sin(), (x * 0.11).cos()])
            .unwrap();
    }
    let query = [0.3, -0.2, 0.9, 0.1];
    let (hits, narrow) = index.search_with_stats(&query, 10, 16).unwrap();
    assert_eq!(hits, index.search(&query, 10, 16).unwrap());
    assert!(!narrow.exact_scan);
    let (_, wide) = index.search_with_stats(&query, 10, 256).unwrap();
    assert!(narrow.distances < wide.distances, "{narrow:?} vs {wide:?}");
    assert!(narrow.distances >= 16, "{narrow:?}");
    let (_, all) = index.search_with_stats(&query, 10, n as usize).unwrap();
    assert!(all.distances >= n as usize, "{all:?}");
}

#[test]
fn any_k_and_ef_return_at_most_the_index_and_never_panic() {
    // "Give me everything": k and ef far past the index's size, up to
    // usize::MAX, through every search entry point. Each returns every
    // live entry, nearest first, as a k of exactly the index's size does.
    let index = Index::new(params(2)).unwrap();
    for key in 0..50u64 {
        index.insert(key, &[key as f32, 0.0]).unwrap();
    }
    index.remove(7).unwrap();
    let q = [10.2f32, 0.0];
    let all = index.search_exact(&q, 49).unwrap();
    assert_eq!(all.len(), 49);
    for (k, ef) in [
        (usize::MAX, 16),
        (10, usize::MAX),
        (usize::MAX, usize::MAX),
        (1 << 40, 1 << 40),
    ] {
        let keys = |hits: Vec<nann::Hit>| hits.iter().map(|h| h.key).collect::<Vec<_>>();
        let want = keys(all.clone());
        let want_k = &want[..k.min(want.len())];
        assert_eq!(
            keys(index.search(&q, k, ef).unwrap()),
            want_k,
            "k {k} ef {ef}"
        );
        assert_eq!(keys(index.search_exact(&q, k).unwrap()), want_k, "k {k}");
        let (hits, _) = index.search_with_stats(&q, k, ef).unwrap();
        assert_eq!(keys(hits), want_k, "k {k} ef {ef}");
        let hits = index
            .search_filtered(&q, k, ef, |key| key % 2 == 0)
            .unwrap();
        assert_eq!(hits.len(), k.min(25), "k {k} ef {ef}");
        let batch = index.search_batch(&[q, q], k, ef, 2);
        assert_eq!(keys(batch[1].clone().unwrap()), want_k, "k {k} ef {ef}");
    }
}

#[test]
fn upsert_inserts_absent_keys_and_updates_present_ones() {
    let index = Index::new(IndexParams::new(2, Metric::L2).payload_len(2)).unwrap();
    assert_eq!(index.upsert(1, &[1.0, 0.0]), Ok(Upserted::Inserted));
    // A plain insert stores a zero payload, as `insert` does.
    assert_eq!(index.get_payload(1).unwrap(), [0, 0]);
    assert_eq!(
        index.upsert_with_payload(1, &[2.0, 0.0], &[7, 7]),
        Ok(Upserted::Updated)
    );
    // A plain update keeps the payload, as `update` does.
    assert_eq!(index.upsert(1, &[3.0, 0.0]), Ok(Upserted::Updated));
    assert_eq!(
        index.get_with_payload(1).unwrap(),
        (vec![3.0, 0.0], vec![7, 7])
    );
    assert_eq!(
        index.upsert_with_payload(2, &[4.0, 0.0], &[9, 9]),
        Ok(Upserted::Inserted)
    );
    assert_eq!(index.len(), 2);
    assert_eq!(index.search(&[4.0, 0.0], 1, 16).unwrap()[0].key, 2);
    // A removed key is absent again.
    index.remove(1).unwrap();
    assert_eq!(index.upsert(1, &[5.0, 0.0]), Ok(Upserted::Inserted));
    // Bad input changes nothing, whether the key is present or not.
    for key in [1, 3] {
        assert!(matches!(
            index.upsert(key, &[1.0]),
            Err(Error::DimensionMismatch { .. })
        ));
        assert!(matches!(
            index.upsert(key, &[f32::NAN, 0.0]),
            Err(Error::NonFiniteValue { .. })
        ));
        assert!(matches!(
            index.upsert_with_payload(key, &[1.0, 1.0], &[1]),
            Err(Error::PayloadLength { .. })
        ));
    }
    assert_eq!(index.get(1).unwrap(), [5.0, 0.0]);
    assert!(!index.contains(3));
    assert_eq!(index.len(), 3 - 1);
    index.check_invariants().unwrap();
}

#[test]
fn upsert_normalises_cosine_vectors_on_both_paths() {
    let index = Index::new(IndexParams::new(2, Metric::Cosine)).unwrap();
    index.upsert(1, &[3.0, 4.0]).unwrap();
    assert_eq!(index.get(1).unwrap(), [0.6, 0.8]);
    index.upsert(1, &[0.0, 2.0]).unwrap();
    assert_eq!(index.get(1).unwrap(), [0.0, 1.0]);
}

#[test]
fn keys_lists_exactly_the_live_entries_through_reuse_compaction_and_reopen() {
    let index = Index::new(params(3)).unwrap();
    let mut model = std::collections::BTreeSet::new();
    for key in 0..300u64 {
        index.insert(key * 7, &[key as f32, 1.0, 2.0]).unwrap();
        model.insert(key * 7);
    }
    for key in (0..300u64).step_by(3) {
        index.remove(key * 7).unwrap();
        model.remove(&(key * 7));
    }
    // Reused slots, in-place updates.
    for key in 100_000..100_050u64 {
        index.insert(key, &[1.0, key as f32, 0.0]).unwrap();
        model.insert(key);
    }
    index.update(7, &[9.0, 9.0, 9.0]).unwrap();
    let sorted = |mut keys: Vec<u64>| {
        keys.sort_unstable();
        keys
    };
    let expected: Vec<u64> = model.iter().copied().collect();
    assert_eq!(sorted(index.keys()), expected);
    assert_eq!(index.keys().len(), index.len());
    index.compact();
    assert_eq!(sorted(index.keys()), expected);
    // An opened index, with and without its key map filled.
    let bytes = {
        let path = std::env::temp_dir().join(format!("nann-keys-{}.nann", std::process::id()));
        index.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let opened = Index::open(&path).unwrap();
        assert_eq!(sorted(opened.keys()), expected);
        std::fs::remove_file(&path).unwrap();
        bytes
    };
    assert_eq!(sorted(Index::from_bytes(&bytes).unwrap().keys()), expected);
    assert!(Index::new(params(3)).unwrap().keys().is_empty());
}
