//! Write throughput (criterion): building 10k x 64 clustered vectors from
//! scratch on one thread and on all cores, and in-place updates (vector
//! redrawn, neighbourhood relinked) on one thread.
//!
//! `cargo bench --bench insert`

#[path = "../examples/support/mod.rs"]
mod support;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use nann::{Index, IndexParams, Metric};

fn insert(c: &mut Criterion) {
    let n = 10_000;
    let data = support::clustered(n, 64, 64, 0.5, 2);
    let rows = data.rows();
    let keys: Vec<u64> = (0..n as u64).collect();
    let mut group = c.benchmark_group("insert/clustered-10k-64");
    group.throughput(Throughput::Elements(n as u64));
    group.sample_size(10);
    for threads in [1, 0] {
        group.bench_with_input(
            BenchmarkId::new("threads", threads),
            &threads,
            |b, &threads| {
                b.iter_batched(
                    || Index::new(IndexParams::new(64, Metric::L2).capacity(n)).unwrap(),
                    |index| {
                        index.insert_many(&keys, &rows, threads, |_| {}).unwrap();
                        index
                    },
                    BatchSize::PerIteration,
                )
            },
        );
    }
    group.finish();
}

fn update(c: &mut Criterion) {
    let n = 10_000;
    let data = support::clustered(n, 64, 64, 0.5, 2);
    let index = Index::new(IndexParams::new(64, Metric::L2).capacity(n)).unwrap();
    let keys: Vec<u64> = (0..n as u64).collect();
    index.insert_many(&keys, &data.rows(), 0, |_| {}).unwrap();
    let fresh = support::clustered(n, 64, 64, 0.5, 3);
    let mut group = c.benchmark_group("update/clustered-10k-64");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("redrawn-vector", |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            index.update(i as u64, fresh.row(i)).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, insert, update);
criterion_main!(benches);
