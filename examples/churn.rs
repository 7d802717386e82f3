//! Recall under churn: a million in-place updates plus removes and
//! re-inserts, with recall checked against a fresh build at checkpoints.
//!
//! ```text
//! cargo run --release --example churn -- [--data uniform|clustered] [--n 100000] [--dim 32]
//!     [--updates 1000000] [--reinserts 200000] [--checkpoint 250000] [--moves redraw|small]
//!     [--queries 1000] [--ef 64] [--threads 2] [--json]
//! ```
//!
//! Builds `--n` vectors (uniform in [0, 1)^dim, or a 256-centre Gaussian
//! mixture), then runs `--updates` in-place updates on `--threads` threads:
//! each picks a random key and either redraws its vector from the same
//! distribution (`redraw`) or nudges it by at most 1% of its norm (`small`,
//! the near-line re-embedding case); interleaved with them, `--reinserts`
//! remove + re-insert pairs (same key, a redrawn vector). Every
//! `--checkpoint` updates it measures, on the current vectors:
//! * `recall`: R@10 of 1,000 fresh queries at `--ef`, against brute force;
//! * `fresh_recall`: the same for an index built from scratch over the same
//!   vectors (same parameters), the baseline the churned index must stay
//!   within 0.01 of;
//! * `self_recall`: the share of entries a k = 1 query with their own vector
//!   finds first (ties with an identical vector count as found);
//! * whether every query returned exactly k hits (they must: all keys are
//!   live at a checkpoint); a short query is reported on stderr and makes
//!   the run exit 1.
//!
//! With `--json` it prints one object per checkpoint:
//! `{"ops":..,"recall":..,"fresh_recall":..,"self_recall":..}`
//! (`ops` counts updates plus remove/re-insert pairs so far; the first line,
//! `ops` 0, is the initial build). The search cost (QPS of the queries on
//! one thread, churned / fresh), the distances computed per query
//! (`search_with_stats`), the fresh build's recall at the churned index's
//! distances per query (interpolated over ef = 1/2 .. 2x `--ef`: the
//! comparison at equal work, since a churned graph can be denser; QPS on a
//! shared machine is too noisy for it) and the memory
//! (`memory_usage().total()` against the initial
//! build and against the fresh build) go to stderr, so the JSON keys stay
//! exactly as specified.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use nann::{Index, IndexParams, Metric};
use support::{Rng, Vectors};

struct Args {
    data: String,
    n: usize,
    dim: usize,
    updates: u64,
    reinserts: u64,
    checkpoint: u64,
    small: bool,
    queries: usize,
    ef: usize,
    threads: usize,
    json: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        data: "uniform".into(),
        n: 100_000,
        dim: 32,
        updates: 1_000_000,
        reinserts: 200_000,
        checkpoint: 250_000,
        small: false,
        queries: 1_000,
        ef: 64,
        threads: 2,
        json: false,
    };
    args.json = support::parse_flags(|flag, value| {
        let number = |v: &str| support::number::<u64>(flag, v);
        match flag {
            "--data" if value == "uniform" || value == "clustered" => args.data = value.into(),
            "--moves" if value == "redraw" || value == "small" => args.small = value == "small",
            "--n" => args.n = number(value)? as usize,
            "--dim" => args.dim = number(value)? as usize,
            "--updates" => args.updates = number(value)?,
            "--reinserts" => args.reinserts = number(value)?,
            "--checkpoint" => args.checkpoint = number(value)?.max(1),
            "--queries" => args.queries = number(value)? as usize,
            "--ef" => args.ef = number(value)? as usize,
            "--threads" => args.threads = number(value)?.max(1) as usize,
            other => return Err(format!("unknown flag or value: {other} {value}")),
        }
        Ok(())
    })?;
    if args.n < 10 {
        return Err("--n must be at least 10".into());
    }
    Ok(args)
}

/// Draws vectors from the run's distribution.
struct Source {
    clustered: bool,
    dim: usize,
    centres: Vec<f32>,
}

impl Source {
    const CLUSTERS: usize = 256;
    const SPREAD: f32 = 0.5;

    fn new(clustered: bool, dim: usize) -> Self {
        let mut rng = Rng::new(0xC0FFEE);
        let centres = (0..Self::CLUSTERS * dim).map(|_| rng.normal()).collect();
        Self {
            clustered,
            dim,
            centres,
        }
    }

    fn draw(&self, rng: &mut Rng) -> Vec<f32> {
        if !self.clustered {
            return (0..self.dim).map(|_| rng.uniform()).collect();
        }
        let c = (rng.next_u64() % Self::CLUSTERS as u64) as usize;
        (0..self.dim)
            .map(|j| self.centres[c * self.dim + j] + Self::SPREAD * rng.normal())
            .collect()
    }

    fn draw_many(&self, n: usize, seed: u64) -> Vectors {
        let mut rng = Rng::new(seed);
        Vectors {
            dim: self.dim,
            data: (0..n).flat_map(|_| self.draw(&mut rng)).collect(),
        }
    }
}

/// `v` moved by a random vector of norm at most 1% of `|v|`.
fn nudge(v: &[f32], rng: &mut Rng) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let dir: Vec<f32> = v.iter().map(|_| rng.normal()).collect();
    let dir_norm = dir.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    let scale = 0.01 * norm * rng.uniform() / dir_norm;
    v.iter().zip(&dir).map(|(x, d)| x + scale * d).collect()
}

struct Checkpoint {
    recall: f64,
    fresh_recall: f64,
    /// Queries per second of the 1,000 queries, one thread, churned / fresh:
    /// recall at equal ef is only a fair comparison at similar cost.
    qps: f64,
    fresh_qps: f64,
    /// Distances computed per query, churned and fresh (at `--ef`).
    distances: f64,
    fresh_distances: f64,
    /// The fresh build's recall at the churned index's distances per query,
    /// interpolated over a sweep of ef: the comparison at equal work.
    fresh_recall_at_cost: f64,
    self_recall: f64,
    short_queries: usize,
    /// `memory_usage().total()` of the churned index and of the fresh build.
    memory: usize,
    fresh_memory: usize,
}

fn measure(
    index: &Index,
    current: &Vectors,
    queries: &Vectors,
    args: &Args,
) -> Result<Checkpoint, String> {
    let k = 10;
    let truth = support::ground_truth(current, queries, k, "l2", args.threads);
    let churned = run_queries(index, queries, k, args.ef)?;
    let short_queries = churned.found.iter().filter(|hits| hits.len() != k).count();
    let recall = support::recall(&churned.found, &truth, k, k);

    let fresh = build(current, args)?;
    // The fresh build over a sweep of ef: (distances per query, recall).
    let mut sweep = Vec::new();
    let (mut fresh_recall, mut fresh_qps) = (0.0, 0.0);
    for ef in [
        args.ef / 2,
        args.ef * 3 / 4,
        args.ef,
        args.ef * 5 / 4,
        args.ef * 3 / 2,
        args.ef * 2,
    ] {
        let run = run_queries(&fresh, queries, k, ef.max(k))?;
        let r = support::recall(&run.found, &truth, k, k);
        if ef == args.ef {
            (fresh_recall, fresh_qps) = (r, run.qps);
        }
        sweep.push((run.distances, r));
    }
    let fresh_recall_at_cost = recall_at_cost(&sweep, churned.distances);
    let fresh_memory = fresh.memory_usage().total();
    drop(fresh);

    // Self-queries on every entry, spread over the threads.
    let found_self = AtomicU64::new(0);
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..args.threads {
            s.spawn(|| loop {
                let key = next.fetch_add(1, Ordering::Relaxed) as usize;
                if key >= current.len() {
                    break;
                }
                let own = current.row(key);
                if let Ok(hits) = index.search(own, 1, args.ef) {
                    // An identical vector at distance 0 is as good a match.
                    if hits
                        .first()
                        .is_some_and(|h| h.key == key as u64 || h.distance == 0.0)
                    {
                        found_self.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    Ok(Checkpoint {
        recall,
        fresh_recall,
        qps: churned.qps,
        fresh_qps,
        distances: churned.distances,
        fresh_distances: sweep[2].0,
        fresh_recall_at_cost,
        self_recall: found_self.load(Ordering::Relaxed) as f64 / current.len() as f64,
        short_queries,
        memory: index.memory_usage().total(),
        fresh_memory,
    })
}

/// One pass of the queries on one thread.
struct QueryRun {
    found: Vec<Vec<u64>>,
    /// Queries per second (noisy: cache warmth, the machine's other load).
    qps: f64,
    /// Mean distances computed per query (exact: the cost to compare).
    distances: f64,
}

fn run_queries(index: &Index, queries: &Vectors, k: usize, ef: usize) -> Result<QueryRun, String> {
    let timer = std::time::Instant::now();
    let mut distances = 0usize;
    let mut found = Vec::with_capacity(queries.len());
    for query in queries.rows() {
        let (hits, stats) = index
            .search_with_stats(query, k, ef)
            .map_err(|e| e.to_string())?;
        distances += stats.distances;
        found.push(hits.iter().map(|h| h.key).collect());
    }
    let n = queries.len() as f64;
    Ok(QueryRun {
        found,
        qps: n / timer.elapsed().as_secs_f64(),
        distances: distances as f64 / n,
    })
}

/// Recall at `cost` distances per query on a curve of (distances, recall)
/// points measured at growing ef: linear between the two points around
/// `cost`, clamped at the ends.
fn recall_at_cost(sweep: &[(f64, f64)], cost: f64) -> f64 {
    match sweep.iter().position(|&(d, _)| d >= cost) {
        None => sweep.last().map_or(0.0, |p| p.1),
        Some(0) => sweep[0].1,
        Some(i) => {
            let ((d0, r0), (d1, r1)) = (sweep[i - 1], sweep[i]);
            r0 + (r1 - r0) * (cost - d0) / (d1 - d0)
        }
    }
}

fn build(vectors: &Vectors, args: &Args) -> Result<Index, String> {
    let index = Index::new(IndexParams::new(args.dim, Metric::L2).capacity(vectors.len()))
        .map_err(|e| e.to_string())?;
    let keys: Vec<u64> = (0..vectors.len() as u64).collect();
    index
        .insert_many(&keys, &vectors.rows(), args.threads, |_| {})
        .map_err(|e| e.to_string())?;
    Ok(index)
}

fn report(args: &Args, ops: u64, c: &Checkpoint, initial_memory: usize) {
    let memory = format!(
        "memory {:.1} MiB ({:.3}x the initial build, {:.3}x a fresh build)",
        c.memory as f64 / (1 << 20) as f64,
        c.memory as f64 / initial_memory as f64,
        c.memory as f64 / c.fresh_memory as f64
    );
    if args.json {
        println!(
            "{{\"ops\":{ops},\"recall\":{:.4},\"fresh_recall\":{:.4},\"self_recall\":{:.5}}}",
            c.recall, c.fresh_recall, c.self_recall
        );
        // The contract's keys stay exactly as specified; the cost goes to stderr.
        eprintln!(
            "ops {ops}: qps {:.0} vs fresh {:.0} ({:.2}x), distances/query {:.0} vs fresh {:.0} ({:.2}x), fresh recall at equal distances {:.4} (gap {:+.4}), {memory}",
            c.qps,
            c.fresh_qps,
            c.qps / c.fresh_qps,
            c.distances,
            c.fresh_distances,
            c.distances / c.fresh_distances,
            c.fresh_recall_at_cost,
            c.recall - c.fresh_recall_at_cost
        );
    } else {
        println!(
            "ops {ops:>9}: recall {:.4} (fresh build {:.4}, gap {:+.4}; at equal distances {:.4}, gap {:+.4}), self-recall {:.5}, distances/query {:.2}x fresh, qps {:.0} vs fresh {:.0} ({:.2}x), {memory}",
            c.recall,
            c.fresh_recall,
            c.recall - c.fresh_recall,
            c.fresh_recall_at_cost,
            c.recall - c.fresh_recall_at_cost,
            c.self_recall,
            c.distances / c.fresh_distances,
            c.qps,
            c.fresh_qps,
            c.qps / c.fresh_qps
        );
    }
    if c.short_queries > 0 {
        eprintln!(
            "churn: {} queries returned fewer than k hits at ops {ops}",
            c.short_queries
        );
    }
}

fn run(args: &Args) -> Result<bool, String> {
    let source = Source::new(args.data == "clustered", args.dim);
    let mut current = source.draw_many(args.n, 1);
    let queries = source.draw_many(args.queries, 2);
    let index = build(&current, args)?;
    let mut all_full = true;
    let first = measure(&index, &current, &queries, args)?;
    all_full &= first.short_queries == 0;
    report(args, 0, &first, first.memory);

    let mut done_updates = 0u64;
    let mut done_reinserts = 0u64;
    let mut round = 0u64;
    while done_updates < args.updates {
        // This checkpoint's updates and its share of the remove/re-insert
        // pairs, spread evenly through the batch (op i is a pair when
        // floor(i * pairs / ops) steps up).
        let updates = args.checkpoint.min(args.updates - done_updates);
        // `args.updates` > `done_updates` >= 0 inside this loop.
        let pairs = (done_updates + updates) * args.reinserts / args.updates - done_reinserts;
        let batch = updates + pairs;
        let is_pair = |i: u64| (i + 1) * pairs / batch != i * pairs / batch;
        // The copy of the vectors sits behind one mutex, taken briefly; a
        // key's stripe lock is held across its whole operation (copy read,
        // index write, copy write) so two threads never interleave on one
        // key and the copy always matches the index. The index itself is
        // written concurrently.
        let shared = Mutex::new(std::mem::take(&mut current.data));
        let stripes: Vec<Mutex<()>> = (0..4096).map(|_| Mutex::new(())).collect();
        let next = AtomicU64::new(0);
        let failed = Mutex::new(None);
        std::thread::scope(|s| {
            for t in 0..args.threads {
                let (shared, stripes, next, failed, source, index, is_pair) =
                    (&shared, &stripes, &next, &failed, &source, &index, &is_pair);
                s.spawn(move || {
                    let mut rng = Rng::new(1000 + round * 64 + t as u64);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= batch {
                            break;
                        }
                        let key = (rng.next_u64() % args.n as u64) as usize;
                        let reinsert = is_pair(i);
                        let _key_lock = stripes[key % stripes.len()].lock().unwrap();
                        let mut data = shared.lock().unwrap();
                        let row = &mut data[key * args.dim..(key + 1) * args.dim];
                        let fresh = if args.small && !reinsert {
                            nudge(row, &mut rng)
                        } else {
                            source.draw(&mut rng)
                        };
                        drop(data);
                        let outcome = if reinsert {
                            index
                                .remove(key as u64)
                                .and_then(|()| index.insert(key as u64, &fresh))
                        } else {
                            index.update(key as u64, &fresh)
                        };
                        if let Err(e) = outcome {
                            *failed.lock().unwrap() = Some(e.to_string());
                            break;
                        }
                        let mut data = shared.lock().unwrap();
                        data[key * args.dim..(key + 1) * args.dim].copy_from_slice(&fresh);
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap() {
            return Err(e);
        }
        current.data = shared.into_inner().unwrap();
        done_updates += updates;
        done_reinserts += pairs;
        round += 1;
        index
            .check_invariants()
            .map_err(|e| format!("invariants after {done_updates} updates: {e}"))?;
        let c = measure(&index, &current, &queries, args)?;
        all_full &= c.short_queries == 0;
        report(args, done_updates + done_reinserts, &c, first.memory);
    }
    Ok(all_full)
}

fn main() -> std::process::ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("churn: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("churn: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
