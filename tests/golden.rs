//! Format-v1 golden files under `tests/data`, opened by every future build.
//!
//! The files were written once by this test with `NANN_WRITE_GOLDEN=1`; from
//! then on they are never rewritten. Their contents are defined by the
//! deterministic recipe below, so the check does not trust the reader: every
//! expected key and vector comes from the recipe, and an exhaustive search
//! (ef >= n) must agree with brute force over the recipe's vectors.
#![cfg(not(loom))]

use std::collections::BTreeMap;
use std::path::PathBuf;

use nann::{Index, IndexParams, Metric};

fn vector(key: u64, version: u64, dim: usize) -> Vec<f32> {
    (0..dim as u64)
        .map(|i| {
            let mut z = key
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(version.wrapping_mul(0xbf58_476d_1ce4_e5b9))
                .wrapping_add(i);
            z = (z ^ (z >> 31)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 29;
            (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// (file name, metric, dim, entries, removed every nth (0: none), update rounds)
const RECIPES: [(&str, Metric, usize, u64, u64, u64); 4] = [
    ("v1-empty.nann", Metric::L2, 4, 0, 0, 0),
    ("v1-one.nann", Metric::L2, 4, 1, 0, 0),
    ("v1-layers-removals.nann", Metric::L2, 8, 600, 7, 0),
    ("v1-many-updates.nann", Metric::InnerProduct, 8, 300, 0, 10),
];

/// The live entries a recipe leaves: key -> vector.
fn expected(dim: usize, n: u64, remove_every: u64, rounds: u64) -> BTreeMap<u64, Vec<f32>> {
    let mut live = BTreeMap::new();
    for key in 0..n {
        live.insert(key, vector(key, 0, dim));
    }
    if remove_every > 0 {
        for key in (0..n).step_by(remove_every as usize) {
            live.remove(&key);
        }
    }
    for round in 1..=rounds {
        for key in 0..n {
            live.insert(key, vector(key, round, dim));
        }
    }
    live
}

fn build(metric: Metric, dim: usize, n: u64, remove_every: u64, rounds: u64) -> Index {
    let index = Index::new(
        IndexParams::new(dim, metric)
            .m(4)
            .ef_construction(32)
            .seed(1),
    )
    .unwrap();
    for key in 0..n {
        index.insert(key, &vector(key, 0, dim)).unwrap();
    }
    if remove_every > 0 {
        for key in (0..n).step_by(remove_every as usize) {
            index.remove(key).unwrap();
        }
    }
    for round in 1..=rounds {
        for key in 0..n {
            index.update(key, &vector(key, round, dim)).unwrap();
        }
    }
    index
}

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn distance(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    match metric {
        Metric::L2 => a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum(),
        _ => 1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>(),
    }
}

#[test]
fn golden_files_of_format_v1_open_with_their_recipe_contents() {
    for (name, metric, dim, n, remove_every, rounds) in RECIPES {
        let path = data_dir().join(name);
        if std::env::var("NANN_WRITE_GOLDEN").is_ok() {
            build(metric, dim, n, remove_every, rounds)
                .save(&path)
                .unwrap();
        }
        let index = Index::open(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let live = expected(dim, n, remove_every, rounds);
        assert_eq!(index.len(), live.len(), "{name}");
        assert_eq!(index.metric(), metric, "{name}");
        for (key, v) in &live {
            assert_eq!(&index.get(*key).unwrap(), v, "{name} key {key}");
        }
        for q in 0..5 {
            let query = vector(10_000 + q, 0, dim);
            let mut want: Vec<(f32, u64)> = live
                .iter()
                .map(|(k, v)| (distance(metric, &query, v), *k))
                .collect();
            want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let k = 5.min(want.len());
            let got: Vec<u64> = index
                .search(&query, k, live.len().max(1) + 10)
                .unwrap()
                .iter()
                .map(|h| h.key)
                .collect();
            let want: Vec<u64> = want.iter().take(k).map(|w| w.1).collect();
            assert_eq!(got, want, "{name} query {q}");
        }
        index.check_invariants().unwrap();
    }
}
