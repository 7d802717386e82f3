//! Recall against brute force. The ground truth comes from
//! `examples/support` (plain scalar loops), not from the index's own kernels,
//! so a kernel bug cannot hide itself.

#[path = "../examples/support/mod.rs"]
mod support;

use nann::{Index, IndexParams, Metric};
use support::Vectors;

fn recall_at(
    base: &Vectors,
    queries: &Vectors,
    metric: Metric,
    metric_name: &str,
    k: usize,
    ef: usize,
) -> f64 {
    let index = Index::new(
        IndexParams::new(base.dim, metric)
            .m(16)
            .ef_construction(200)
            .capacity(base.len()),
    )
    .unwrap();
    let keys: Vec<u64> = (0..base.len() as u64).collect();
    index.insert_many(&keys, &base.rows(), 2, |_| {}).unwrap();
    index.check_invariants().unwrap();
    let truth = support::ground_truth(base, queries, k, metric_name, 2);
    let found = support::search_keys(&index, queries, k, ef).unwrap();
    // The graph alone must produce these results: an exact-scan fallback
    // would hide a broken search behind a perfect score.
    assert_eq!(
        index.stats().exact_scans,
        0,
        "a search fell back to an exact scan"
    );
    support::recall(&found, &truth, k, k)
}

#[test]
fn uniform_20k_x_16_reaches_095_at_ef_64() {
    let base = support::uniform(20_000, 16, 1);
    let queries = support::uniform(300, 16, 2);
    let r = recall_at(&base, &queries, Metric::L2, "l2", 10, 64);
    assert!(r >= 0.95, "R@10 = {r}");
}

/// Uniform 32-d data has intrinsic dimension 32, the hard case for any graph
/// index: hnswlib 0.8 itself measures R@10 = 0.942 at ef 64 on this shape
/// (20k x 32, M 16, ef_construction 200; 2026-11-24, this machine). The bar
/// here is 0.95 at ef 96, and no worse than hnswlib minus 0.01 at ef 64.
#[test]
fn uniform_20k_x_32_reaches_095_at_ef_96() {
    let base = support::uniform(20_000, 32, 1);
    let queries = support::uniform(300, 32, 2);
    let r96 = recall_at(&base, &queries, Metric::L2, "l2", 10, 96);
    assert!(r96 >= 0.95, "R@10 at ef 96 = {r96}");
    let r64 = recall_at(&base, &queries, Metric::L2, "l2", 10, 64);
    assert!(r64 >= 0.932, "R@10 at ef 64 = {r64}");
}

#[test]
fn clustered_20k_x_128_reaches_095_at_ef_64() {
    let all = support::clustered(20_300, 128, 64, 0.5, 3);
    let base = Vectors {
        dim: 128,
        data: all.data[..20_000 * 128].to_vec(),
    };
    let queries = Vectors {
        dim: 128,
        data: all.data[20_000 * 128..].to_vec(),
    };
    let r = recall_at(&base, &queries, Metric::L2, "l2", 10, 64);
    assert!(r >= 0.95, "R@10 = {r}");
}

#[test]
fn inner_product_and_cosine_reach_095_at_ef_64() {
    let all = support::clustered(10_200, 48, 32, 0.6, 4);
    let base = Vectors {
        dim: 48,
        data: all.data[..10_000 * 48].to_vec(),
    };
    let queries = Vectors {
        dim: 48,
        data: all.data[10_000 * 48..].to_vec(),
    };
    for (metric, name) in [(Metric::InnerProduct, "ip"), (Metric::Cosine, "cos")] {
        let r = recall_at(&base, &queries, metric, name, 10, 64);
        assert!(r >= 0.95, "{metric:?}: R@10 = {r}");
    }
}

#[test]
fn every_simd_level_gives_the_same_recall_as_scalar() {
    let base = support::uniform(3_000, 37, 5); // odd dimension: exercises kernel tails
    let queries = support::uniform(100, 37, 6);
    let truth = support::ground_truth(&base, &queries, 10, "l2", 2);
    for isa in nann::Isa::all_supported() {
        let index = Index::new(IndexParams::new(37, Metric::L2).isa(isa).seed(9)).unwrap();
        let keys: Vec<u64> = (0..base.len() as u64).collect();
        index.insert_many(&keys, &base.rows(), 1, |_| {}).unwrap();
        let found = support::search_keys(&index, &queries, 10, 128).unwrap();
        assert_eq!(index.stats().exact_scans, 0, "{isa:?}: exact-scan fallback");
        let r = support::recall(&found, &truth, 10, 10);
        assert!(r >= 0.98, "{isa:?}: R@10 = {r}");
    }
}

/// In-place updates relink the neighbourhood, so recall after many updates
/// (every vector redrawn about four times) stays near a fresh build over the
/// same final vectors. (The 1M-update churn suite is a later issue.)
#[test]
fn recall_does_not_decay_under_repeated_updates() {
    let (n, dim) = (5_000usize, 16usize);
    let mut rng = support::Rng::new(77);
    let mut current: Vec<Vec<f32>> = (0..n)
        .map(|_| (0..dim).map(|_| rng.uniform()).collect())
        .collect();
    let params = IndexParams::new(dim, Metric::L2)
        .m(16)
        .ef_construction(100)
        .capacity(n);
    let churned = Index::new(params.clone()).unwrap();
    for (key, v) in current.iter().enumerate() {
        churned.insert(key as u64, v).unwrap();
    }
    for _ in 0..4 * n {
        let key = (rng.next_u64() % n as u64) as usize;
        current[key] = (0..dim).map(|_| rng.uniform()).collect();
        churned.update(key as u64, &current[key]).unwrap();
    }
    churned.check_invariants().unwrap();
    let fresh = Index::new(params).unwrap();
    for (key, v) in current.iter().enumerate() {
        fresh.insert(key as u64, v).unwrap();
    }
    let base = Vectors {
        dim,
        data: current.concat(),
    };
    let queries = support::uniform(500, dim, 78);
    let truth = support::ground_truth(&base, &queries, 10, "l2", 2);
    let recall_of = |index: &Index| {
        let found = support::search_keys(index, &queries, 10, 32).unwrap();
        assert_eq!(index.stats().exact_scans, 0, "exact-scan fallback");
        support::recall(&found, &truth, 10, 10)
    };
    let (after_churn, fresh_build) = (recall_of(&churned), recall_of(&fresh));
    println!("R@10 after churn {after_churn}, fresh build {fresh_build}");
    assert!(
        after_churn >= fresh_build - 0.02,
        "after 20k updates R@10 {after_churn} vs fresh build {fresh_build}"
    );
}
