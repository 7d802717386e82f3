//! Search throughput while in-place updates run, and update latency.
//!
//! ```text
//! cargo run --release --example update_under_load -- [--n 50000] [--dim 64] [--m 16]
//!     [--readers CORES-1] [--writers 1] [--seconds 5] [--rates 1000,10000] [--ef 64] [--json]
//! ```
//!
//! One process, one run: builds an index of `--n` uniform random vectors,
//! then for each writer rate measures, back to back on the same index,
//! `--seconds` of searches alone (`read_only_qps`, `--readers` threads, k 10;
//! the mean of one window before and one after the loaded window, so drift
//! in the machine's speed does not land on one side of the ratio) and
//! `--seconds` of the same searches while `--writers` threads update random
//! keys with fresh vectors at the given total rate (open loop: each writer
//! keeps a fixed schedule and catches up when late; `updates_per_s` is what
//! it achieved). By default the readers take the cores the writers leave,
//! so the ratio measures interference (locks, cache lines, epoch), not a
//! writer taking a reader's core. With `--json` it prints one object per
//! rate:
//!
//! `{"read_only_qps":..,"qps_with_updates":..,"updates_per_s":..,"ratio":..,"update_p50_us":..,"update_p99_us":..}`
//!
//! (`ratio` = `qps_with_updates / read_only_qps`; the latencies are of the
//! `update` calls themselves.) Without `--json`, the same as a table line.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nann::{Index, IndexParams, Metric};

struct Args {
    n: usize,
    dim: usize,
    m: usize,
    readers: usize,
    writers: usize,
    seconds: f64,
    rates: Vec<f64>,
    ef: usize,
    json: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        n: 50_000,
        dim: 64,
        m: 16,
        readers: 0, // default: the cores left over by the writers (at least 1)
        writers: 1,
        seconds: 5.0,
        rates: vec![1_000.0, 10_000.0],
        ef: 64,
        json: false,
    };
    args.json = support::parse_flags(|flag, value| {
        let number = |v: &str| support::number::<f64>(flag, v);
        match flag {
            "--n" => args.n = number(value)? as usize,
            "--dim" => args.dim = number(value)? as usize,
            "--m" => args.m = number(value)? as usize,
            "--readers" => args.readers = number(value)? as usize,
            "--writers" => args.writers = number(value)? as usize,
            "--seconds" => args.seconds = number(value)?,
            "--ef" => args.ef = number(value)? as usize,
            "--rates" => {
                args.rates = value
                    .split(',')
                    .map(number)
                    .collect::<Result<Vec<f64>, String>>()?
            }
            other => return Err(format!("unknown flag {other}")),
        }
        Ok(())
    })?;
    if args.readers == 0 {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        args.readers = cores.saturating_sub(args.writers).max(1);
    }
    if args.writers == 0 || args.n == 0 {
        return Err("--n and --writers must be at least 1".into());
    }
    Ok(args)
}

/// Searches on `readers` threads until `stop`; returns queries per second.
fn search_load(
    index: &Index,
    queries: &support::Vectors,
    readers: usize,
    ef: usize,
    stop: &AtomicBool,
) -> f64 {
    let done = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for r in 0..readers {
            let done = &done;
            s.spawn(move || {
                let rows = queries.rows();
                let mut i = r;
                let mut count = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let hits = index.search(rows[i % rows.len()], 10, ef).expect("search");
                    std::hint::black_box(hits);
                    i += readers;
                    count += 1;
                }
                done.fetch_add(count, Ordering::Relaxed);
            });
        }
    });
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn run(args: &Args) -> Result<(), String> {
    let base = support::uniform(args.n, args.dim, 1);
    let queries = support::uniform(1_000, args.dim, 2);
    let index = Index::new(
        IndexParams::new(args.dim, Metric::L2)
            .m(args.m)
            .capacity(args.n),
    )
    .map_err(|e| e.to_string())?;
    let keys: Vec<u64> = (0..args.n as u64).collect();
    index
        .insert_many(&keys, &base.rows(), 2, |_| {})
        .map_err(|e| e.to_string())?;
    let window = Duration::from_secs_f64(args.seconds);

    for &rate in &args.rates {
        let read_only = || {
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                s.spawn(|| {
                    std::thread::sleep(window);
                    stop.store(true, Ordering::Relaxed);
                });
                search_load(&index, &queries, args.readers, args.ef, &stop)
            })
        };
        let before = read_only();

        let stop = AtomicBool::new(false);
        let start = Instant::now();
        let (qps, latencies) = std::thread::scope(|s| {
            let writers: Vec<_> = (0..args.writers)
                .map(|w| {
                    let (index, stop) = (&index, &stop);
                    let per_writer = rate / args.writers as f64;
                    s.spawn(move || {
                        let mut latencies = Vec::new();
                        let mut rng = support::Rng::new(77 + w as u64);
                        let begin = Instant::now();
                        let mut next = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            let due = begin + Duration::from_secs_f64(next as f64 / per_writer);
                            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                                continue;
                            }
                            let key = rng.next_u64() % args.n as u64;
                            let v: Vec<f32> = (0..args.dim).map(|_| rng.uniform()).collect();
                            let t = Instant::now();
                            index.update(key, &v).expect("update");
                            latencies.push(t.elapsed().as_secs_f64() * 1e6);
                            next += 1;
                        }
                        latencies
                    })
                })
                .collect();
            s.spawn(|| {
                std::thread::sleep(window);
                stop.store(true, Ordering::Relaxed);
            });
            let qps = search_load(&index, &queries, args.readers, args.ef, &stop);
            let mut all: Vec<f64> = writers
                .into_iter()
                .flat_map(|h| h.join().expect("writer"))
                .collect();
            all.sort_by(f64::total_cmp);
            (qps, all)
        });
        let updates_per_s = latencies.len() as f64 / start.elapsed().as_secs_f64();
        let read_only_qps = (before + read_only()) / 2.0;
        let ratio = qps / read_only_qps;
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        if args.json {
            println!(
                "{{\"read_only_qps\":{read_only_qps:.1},\"qps_with_updates\":{qps:.1},\"updates_per_s\":{updates_per_s:.1},\"ratio\":{ratio:.4},\"update_p50_us\":{p50:.1},\"update_p99_us\":{p99:.1}}}"
            );
        } else {
            println!(
                "target {rate:>7.0} updates/s: read-only {read_only_qps:>9.0} qps, with updates {qps:>9.0} qps (ratio {ratio:.3}), {updates_per_s:>7.0} updates/s, p50 {p50:.0} us, p99 {p99:.0} us"
            );
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("update_under_load: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("update_under_load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
