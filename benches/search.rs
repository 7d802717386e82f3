//! Search latency at fixed recall (criterion). Uses TEXMEX siftsmall from
//! `../shared/data/siftsmall` when present, else a generated clustered set;
//! the `ef` benchmarked is the smallest reaching R@10 >= 0.95 (and >= 0.99).
//!
//! `cargo bench --bench search`

#[path = "../examples/support/mod.rs"]
mod support;

use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use nann::{Index, IndexParams, Metric};

fn data() -> (String, support::Vectors, support::Vectors, Vec<u32>, usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/siftsmall");
    if let (Ok(base), Ok(query), Ok((gt_k, gt))) = (
        support::read_fvecs(&dir.join("siftsmall_base.fvecs")),
        support::read_fvecs(&dir.join("siftsmall_query.fvecs")),
        support::read_ivecs(&dir.join("siftsmall_groundtruth.ivecs")),
    ) {
        return ("siftsmall".into(), base, query, gt, gt_k);
    }
    let all = support::clustered(20_200, 64, 128, 0.5, 1);
    let base = support::Vectors {
        dim: 64,
        data: all.data[..20_000 * 64].to_vec(),
    };
    let query = support::Vectors {
        dim: 64,
        data: all.data[20_000 * 64..].to_vec(),
    };
    let gt = support::ground_truth(&base, &query, 10, "l2", 2);
    ("clustered-20k-64".into(), base, query, gt, 10)
}

fn search(c: &mut Criterion) {
    let (name, base, queries, gt, gt_k) = data();
    let index = Index::new(IndexParams::new(base.dim, Metric::L2).capacity(base.len())).unwrap();
    let keys: Vec<u64> = (0..base.len() as u64).collect();
    index.insert_many(&keys, &base.rows(), 0, |_| {}).unwrap();
    let rows = queries.rows();
    let recall_at = |ef| {
        let found = support::search_keys(&index, &queries, 10, ef).unwrap();
        support::recall(&found, &gt, gt_k, 10)
    };
    let mut group = c.benchmark_group(format!("search/{name}"));
    for target in [0.95, 0.99] {
        let Some(ef) = [10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256]
            .into_iter()
            .find(|&ef| recall_at(ef) >= target)
        else {
            continue;
        };
        group.bench_with_input(
            BenchmarkId::new(format!("R@10>={target}"), ef),
            &ef,
            |b, &ef| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % rows.len();
                    index.search(rows[i], 10, ef).unwrap()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, search);
criterion_main!(benches);
