//! Throughput of durable (logged) writes: group commit against one fsync per
//! operation, and logged against unlogged updates.
//!
//! ```text
//! cargo run --release --example durable_bench -- [--dir DIR] [--n 20000] [--dim 64]
//!     [--threads 8] [--seconds 3] [--group-ms 1] [--json]
//! ```
//!
//! Phases, each `--seconds` long on `--threads` writer threads:
//! * `remove`: removes of distinct keys (applying one is nearly free), so the
//!   rate is what the log sustains; with `PerOp` and with `GroupCommit`.
//! * `update`: in-place updates with fresh random vectors (each re-links the
//!   entry's neighbourhood), logged with `GroupCommit` and with `PerOp`, and
//!   the same on a plain in-memory `Index` for the ratio.
//!
//! `DIR` (default: a fresh directory under the system temp dir) should be on
//! the disk whose fsync you want to measure.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nann::{Durability, DurableIndex, DurableOptions, Index, IndexParams, Metric};

struct Args {
    dir: PathBuf,
    n: usize,
    dim: usize,
    threads: usize,
    seconds: f64,
    group_ms: f64,
    json: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        dir: std::env::temp_dir().join(format!("nann-durable-bench-{}", std::process::id())),
        n: 20_000,
        dim: 64,
        threads: 8,
        seconds: 3.0,
        group_ms: 1.0,
        json: false,
    };
    args.json = support::parse_flags(|flag, value| {
        match flag {
            "--dir" => args.dir = PathBuf::from(value),
            "--n" => args.n = support::number(flag, value)?,
            "--dim" => args.dim = support::number(flag, value)?,
            "--threads" => args.threads = support::number(flag, value)?,
            "--seconds" => args.seconds = support::number(flag, value)?,
            "--group-ms" => args.group_ms = support::number(flag, value)?,
            other => return Err(format!("unknown flag {other}")),
        }
        Ok(())
    })?;
    Ok(args)
}

/// A deterministic pseudo-random vector for (key, round).
fn vector(key: u64, round: u64, dim: usize) -> Vec<f32> {
    let mut x = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..dim)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// Runs `op(thread, i)` on `threads` threads for `seconds`; returns ops/s.
fn timed(threads: usize, seconds: f64, op: impl Fn(usize, u64) -> bool + Sync) -> f64 {
    let done = AtomicU64::new(0);
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (done, op) = (&done, &op);
            s.spawn(move || {
                let mut i = 0u64;
                while start.elapsed() < limit {
                    if !op(t, i) {
                        break;
                    }
                    i += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn fill(index: &DurableIndex, n: usize, dim: usize, threads: usize) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n {
                    break;
                }
                index
                    .insert(k as u64, &vector(k as u64, 0, dim))
                    .expect("insert");
            });
        }
    });
}

fn run(args: &Args) -> Result<Vec<(String, f64)>, String> {
    let params = IndexParams::new(args.dim, Metric::L2).capacity(args.n);
    let group = Durability::GroupCommit(Duration::from_secs_f64(args.group_ms / 1000.0));
    let mut results = Vec::new();
    for (name, durability) in [
        ("remove_per_op", Durability::PerOp),
        ("remove_group", group),
    ] {
        let dir = args.dir.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let index = DurableIndex::create(&dir, params.clone(), DurableOptions::new(group))
            .map_err(|e| e.to_string())?;
        fill(&index, args.n, args.dim, args.threads);
        drop(index);
        let index =
            DurableIndex::open(&dir, DurableOptions::new(durability)).map_err(|e| e.to_string())?;
        let next = AtomicUsize::new(0);
        let rate = timed(args.threads, args.seconds, |_, _| {
            let k = next.fetch_add(1, Ordering::Relaxed);
            k < args.n && index.remove(k as u64).is_ok()
        });
        results.push((name.to_string(), rate));
        let _ = std::fs::remove_dir_all(&dir);
    }

    let n = args.n as u64;
    let threads = args.threads as u64;
    for (name, durability) in [
        ("update_group", group),
        ("update_per_op", Durability::PerOp),
    ] {
        let dir = args.dir.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let index = DurableIndex::create(&dir, params.clone(), DurableOptions::new(durability))
            .map_err(|e| e.to_string())?;
        fill(&index, args.n, args.dim, args.threads);
        let logged = timed(args.threads, args.seconds, |t, i| {
            let key = (i * threads + t as u64) % n;
            index.update(key, &vector(key, i + 1, args.dim)).is_ok()
        });
        results.push((name.to_string(), logged));
        drop(index);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let memory = Index::new(params).map_err(|e| e.to_string())?;
    for k in 0..n {
        memory
            .insert(k, &vector(k, 0, args.dim))
            .map_err(|e| e.to_string())?;
    }
    let unlogged = timed(args.threads, args.seconds, |t, i| {
        let key = (i * threads + t as u64) % n;
        memory.update(key, &vector(key, i + 1, args.dim)).is_ok()
    });
    results.push(("update_unlogged".into(), unlogged));
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(results)
}

fn main() -> std::process::ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("durable_bench: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(results) => {
            for (name, rate) in &results {
                if args.json {
                    println!("{{\"phase\":\"{name}\",\"ops_per_s\":{rate:.0},\"threads\":{},\"dim\":{},\"n\":{}}}", args.threads, args.dim, args.n);
                } else {
                    println!(
                        "{name:>16}: {rate:>10.0} ops/s ({} threads, dim {}, n {})",
                        args.threads, args.dim, args.n
                    );
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("durable_bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
