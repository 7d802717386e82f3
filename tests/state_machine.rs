//! Property test: random sequences of insert / update / remove / search
//! against a brute-force model. With `ef` >= the number of entries, HNSW's
//! beam never prunes, so every search must be exact; the invariants must hold
//! after every step.

use std::collections::BTreeMap;

use nann::{Error, Index, IndexParams, Metric};
use proptest::prelude::*;

const DIM: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    Insert(u64, Vec<f32>),
    Update(u64, Vec<f32>),
    Remove(u64),
    Search(Vec<f32>, usize),
}

fn vector() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-10.0f32..10.0, DIM)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..48u64, vector()).prop_map(|(k, v)| Op::Insert(k, v)),
        2 => (0..48u64, vector()).prop_map(|(k, v)| Op::Update(k, v)),
        2 => (0..48u64).prop_map(Op::Remove),
        3 => (vector(), 1..12usize).prop_map(|(v, k)| Op::Search(v, k)),
    ]
}

fn metric() -> impl Strategy<Value = Metric> {
    prop_oneof![
        Just(Metric::L2),
        Just(Metric::InnerProduct),
        Just(Metric::Cosine)
    ]
}

/// The model's stored form of a vector (normalised for cosine), or `None`
/// if the index must reject it.
fn stored(metric: Metric, v: &[f32]) -> Option<Vec<f32>> {
    if metric != Metric::Cosine {
        return Some(v.to_vec());
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    (norm > 1e-12).then(|| v.iter().map(|x| x / norm).collect())
}

fn distance(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    match metric {
        Metric::L2 => a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum(),
        _ => 1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>(),
    }
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-3 * (1.0 + a.abs().max(b.abs()))
}

proptest! {
    // PROPTEST_CASES overrides the default of 256 (e.g. for a longer hunt).
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256), ..ProptestConfig::default() })]

    #[test]
    fn index_matches_a_brute_force_model(ops in prop::collection::vec(op(), 1..150), metric in metric(), m in 2usize..6) {
        let index = Index::new(IndexParams::new(DIM, metric).m(m).ef_construction(16).capacity(8)).unwrap();
        let mut model: BTreeMap<u64, Vec<f32>> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Insert(key, v) => {
                    let result = index.insert(key, &v);
                    match (stored(metric, &v), model.contains_key(&key)) {
                        (None, _) => prop_assert_eq!(result, Err(Error::ZeroVector)),
                        (Some(_), true) => prop_assert_eq!(result, Err(Error::DuplicateKey(key))),
                        (Some(s), false) => { prop_assert_eq!(result, Ok(())); model.insert(key, s); }
                    }
                }
                Op::Update(key, v) => {
                    let result = index.update(key, &v);
                    match (stored(metric, &v), model.contains_key(&key)) {
                        (None, _) => prop_assert_eq!(result, Err(Error::ZeroVector)),
                        (Some(_), false) => prop_assert_eq!(result, Err(Error::KeyNotFound(key))),
                        (Some(s), true) => { prop_assert_eq!(result, Ok(())); model.insert(key, s); }
                    }
                }
                Op::Remove(key) => {
                    let result = index.remove(key);
                    if model.remove(&key).is_some() {
                        prop_assert_eq!(result, Ok(()));
                    } else {
                        prop_assert_eq!(result, Err(Error::KeyNotFound(key)));
                    }
                }
                Op::Search(q, k) => {
                    let Some(q) = stored(metric, &q) else { continue };
                    let hits = index.search(&q, k, 1000).unwrap();
                    let mut expected: Vec<f32> = model.values().map(|v| distance(metric, &q, v)).collect();
                    expected.sort_by(f32::total_cmp);
                    expected.truncate(k);
                    prop_assert_eq!(hits.len(), expected.len(), "result count");
                    for (hit, want) in hits.iter().zip(&expected) {
                        let v = model.get(&hit.key);
                        prop_assert!(v.is_some(), "returned key {} is not live", hit.key);
                        prop_assert!(close(hit.distance, distance(metric, &q, v.unwrap())), "distance of key {}", hit.key);
                        prop_assert!(close(hit.distance, *want), "got {} want {}", hit.distance, want);
                    }
                    let mut keys: Vec<u64> = hits.iter().map(|h| h.key).collect();
                    keys.sort_unstable();
                    keys.dedup();
                    prop_assert_eq!(keys.len(), hits.len(), "duplicate keys in results");
                }
            }
            prop_assert_eq!(index.len(), model.len());
            if let Err(violation) = index.check_invariants() {
                prop_assert!(false, "invariant broken: {}", violation);
            }
        }
        for (key, v) in &model {
            prop_assert!(index.contains(*key));
            let got = index.get(*key).unwrap();
            prop_assert!(got.iter().zip(v).all(|(a, b)| close(*a, *b)));
        }
    }
}
