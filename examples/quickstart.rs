//! Quick start on built-in defaults: build an index over a generated data set
//! on all cores, search it, update and remove entries while it serves, and
//! measure recall against brute force.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

#[path = "support/mod.rs"]
mod support;

use std::time::Instant;

use nann::{Index, IndexParams, Metric};

fn main() -> Result<(), nann::Error> {
    let (n, dim, k, ef) = (20_000, 64, 10, 64);
    println!(
        "nann quickstart: {n} vectors x {dim} dims (Gaussian mixture), M 16, ef_construction 200"
    );

    let all = support::clustered(n + 200, dim, 128, 0.5, 42);
    let base = support::Vectors {
        dim,
        data: all.data[..n * dim].to_vec(),
    };
    let queries = support::Vectors {
        dim,
        data: all.data[n * dim..].to_vec(),
    };

    let index = Index::new(IndexParams::new(dim, Metric::L2).capacity(n))?;
    let keys: Vec<u64> = (0..n as u64).collect();
    let start = Instant::now();
    index.insert_many(&keys, &base.rows(), 0, |p| {
        if p.done % (p.total / 4) == 0 {
            println!("  built {:>6} / {}", p.done, p.total);
        }
    })?;
    println!(
        "build: {:.2} s, kernel {:?}",
        start.elapsed().as_secs_f64(),
        index.distance().isa()
    );

    let truth = support::ground_truth(&base, &queries, k, "l2", 2);
    let start = Instant::now();
    let found = support::search_keys(&index, &queries, k, ef)?;
    let per_query = start.elapsed().as_secs_f64() / queries.len() as f64;
    println!(
        "search: R@{k} = {:.3} at ef {ef}, {:.1} us per query",
        support::recall(&found, &truth, k, k),
        per_query * 1e6
    );

    // In-place update: entry 7 moves next to the first query.
    let q0 = queries.row(0);
    let moved: Vec<f32> = q0.iter().map(|x| x + 1e-3).collect();
    index.update(7, &moved)?;
    println!(
        "after update, nearest to query 0: key {}",
        index.search(q0, 1, ef)?[0].key
    );
    index.remove(7)?;
    println!(
        "after remove, nearest to query 0: key {}",
        index.search(q0, 1, ef)?[0].key
    );

    let even = index.search_filtered(q0, 3, ef, |key| key % 2 == 0)?;
    println!(
        "filtered (even keys): {:?}",
        even.iter().map(|h| h.key).collect::<Vec<_>>()
    );

    index.check_invariants().expect("the graph is consistent");
    let usage = index.memory_usage();
    println!(
        "memory per entry: vector {:.0} B, links {:.0} B, fixed state {:.1} B; invariants hold",
        usage.vectors as f64 / n as f64,
        usage.links as f64 / n as f64,
        usage.fixed as f64 / n as f64
    );
    Ok(())
}
