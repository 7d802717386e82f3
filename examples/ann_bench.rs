//! ANN benchmark over TEXMEX fvecs/ivecs files. Other tools parse its output:
//! keep the interface exactly as it is.
//!
//! ```text
//! cargo run --release --example ann_bench -- --base B.fvecs --query Q.fvecs --gt G.ivecs \
//!     --metric l2|ip|cos --k 10 --m 16 --ef-construction 200 \
//!     --ef 10,16,24,32,48,64,96,128 --threads 1 [--json] [--save PATH | --open PATH] \
//!     [--seed N] [--min-seconds S]
//! ```
//!
//! `--seed N` sets the level generator's seed (default: `IndexParams`'
//! default), so repeated runs can measure independent builds.
//!
//! `--save PATH` writes the built index to PATH (`Index::save`); `--open PATH`
//! opens a saved index instead of building one (`--base` is then not read)
//! and runs the same sweep. The first JSON line keeps its shape: `build_s` is
//! 0 when the index was opened, and `open_s` / `save_s` are added when used.
//!
//! `--threads` sets the build threads; search is single-threaded, one query at
//! a time. Each ef runs a warm-up pass, then repeats the query set until at
//! least `--min-seconds` (default 1) have elapsed; QPS counts every query of
//! the timed passes, p50/p99 are per-query latencies.
//!
//! With `--json`: one object per line, first `{"build_s":..,"threads":..}`,
//! then per ef `{"ef":..,"recall":..,"qps":..,"p50_us":..,"p99_us":..}`.

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use nann::{Index, IndexParams, Metric};

struct Args {
    base: PathBuf,
    query: PathBuf,
    gt: PathBuf,
    metric: Metric,
    k: usize,
    m: usize,
    ef_construction: usize,
    efs: Vec<usize>,
    threads: usize,
    json: bool,
    min_seconds: f64,
    save: Option<PathBuf>,
    open: Option<PathBuf>,
    seed: Option<u64>,
}

fn parse() -> Result<Args, String> {
    let mut raw = std::env::args().skip(1);
    let (mut base, mut query, mut gt) = (None, None, None);
    let mut args = Args {
        base: PathBuf::new(),
        query: PathBuf::new(),
        gt: PathBuf::new(),
        metric: Metric::L2,
        k: 10,
        m: 16,
        ef_construction: 200,
        efs: vec![10, 16, 24, 32, 48, 64, 96, 128],
        threads: 1,
        json: false,
        min_seconds: 1.0,
        save: None,
        open: None,
        seed: None,
    };
    while let Some(flag) = raw.next() {
        if flag == "--json" {
            args.json = true;
            continue;
        }
        let value = raw.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: '{v}' is not a number"))
        };
        match flag.as_str() {
            "--base" => base = Some(PathBuf::from(value)),
            "--query" => query = Some(PathBuf::from(value)),
            "--gt" => gt = Some(PathBuf::from(value)),
            "--metric" => {
                args.metric = Metric::parse(&value)
                    .ok_or(format!("--metric: unknown '{value}' (l2|ip|cos)"))?
            }
            "--k" => args.k = number(&value)?,
            "--m" => args.m = number(&value)?,
            "--ef-construction" => args.ef_construction = number(&value)?,
            "--ef" => args.efs = value.split(',').map(number).collect::<Result<_, _>>()?,
            "--threads" => args.threads = number(&value)?,
            "--save" => args.save = Some(PathBuf::from(value)),
            "--open" => args.open = Some(PathBuf::from(value)),
            "--seed" => args.seed = Some(number(&value)? as u64),
            "--min-seconds" => {
                args.min_seconds = value
                    .parse()
                    .map_err(|_| "--min-seconds: not a number".to_string())?
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    args.base = match (base, &args.open) {
        (Some(b), _) => b,
        (None, Some(_)) => PathBuf::new(),
        (None, None) => return Err("--base is required".into()),
    };
    if args.save.is_some() && args.open.is_some() {
        return Err("--save and --open exclude each other".into());
    }
    args.query = query.ok_or("--query is required")?;
    args.gt = gt.ok_or("--gt is required")?;
    Ok(args)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn run(args: Args) -> Result<(), String> {
    let queries = support::read_fvecs(&args.query).map_err(|e| e.to_string())?;
    let (gt_k, gt) = support::read_ivecs(&args.gt).map_err(|e| e.to_string())?;
    if gt_k < args.k || gt.len() / gt_k.max(1) < queries.len() {
        return Err(format!(
            "ground truth has {gt_k} ids per query for k = {}",
            args.k
        ));
    }
    let (index, build_s, mut extra) = match &args.open {
        Some(path) => {
            let start = Instant::now();
            let index = Index::open(path).map_err(|e| e.to_string())?;
            let open_s = start.elapsed().as_secs_f64();
            (index, 0.0, format!(",\"open_s\":{open_s:.4}"))
        }
        None => {
            let (index, build_s) = build(&args)?;
            (index, build_s, String::new())
        }
    };
    if queries.dim != index.dim() {
        return Err(format!(
            "query dim {} != index dim {}",
            queries.dim,
            index.dim()
        ));
    }
    if let Some(path) = &args.save {
        let start = Instant::now();
        index.save(path).map_err(|e| e.to_string())?;
        let save_s = start.elapsed().as_secs_f64();
        extra = format!(",\"save_s\":{save_s:.4}");
        if !args.json {
            println!("saved to {} in {save_s:.3} s", path.display());
        }
    }
    let base_len = index.len();
    if args.json {
        println!(
            "{{\"build_s\":{build_s:.4},\"threads\":{}{extra}}}",
            args.threads
        );
    } else {
        println!(
            "nann {} | n={} dim={} metric={:?} M={} efC={} | build {build_s:.3} s on {} thread(s) | kernel {:?}",
            env!("CARGO_PKG_VERSION"),
            base_len,
            index.dim(),
            args.metric,
            args.m,
            args.ef_construction,
            args.threads,
            index.distance().isa()
        );
        println!(
            "{:>6} {:>8} {:>12} {:>10} {:>10}",
            "ef", "recall", "qps", "p50_us", "p99_us"
        );
    }

    let query_rows = queries.rows();
    for &ef in &args.efs {
        let mut found = Vec::with_capacity(query_rows.len());
        for q in &query_rows {
            let hits = index.search(q, args.k, ef).map_err(|e| e.to_string())?;
            found.push(hits.iter().map(|h| h.key).collect::<Vec<_>>());
        }
        let recall = support::recall(&found, &gt, gt_k, args.k);
        let mut latencies = Vec::new();
        let timed = Instant::now();
        let mut queries_run = 0usize;
        while queries_run == 0 || timed.elapsed().as_secs_f64() < args.min_seconds {
            for q in &query_rows {
                let t = Instant::now();
                let hits = index.search(q, args.k, ef).map_err(|e| e.to_string())?;
                latencies.push(t.elapsed().as_secs_f64() * 1e6);
                std::hint::black_box(hits);
            }
            queries_run += query_rows.len();
        }
        let qps = queries_run as f64 / timed.elapsed().as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        let (p50, p99) = (percentile(&latencies, 50.0), percentile(&latencies, 99.0));
        if args.json {
            println!("{{\"ef\":{ef},\"recall\":{recall:.4},\"qps\":{qps:.1},\"p50_us\":{p50:.2},\"p99_us\":{p99:.2}}}");
        } else {
            println!("{ef:>6} {recall:>8.4} {qps:>12.1} {p50:>10.2} {p99:>10.2}");
        }
    }
    Ok(())
}

/// Builds the index from `--base` on `--threads` threads.
fn build(args: &Args) -> Result<(Index, f64), String> {
    let base = support::read_fvecs(&args.base).map_err(|e| e.to_string())?;
    let mut params = IndexParams::new(base.dim, args.metric)
        .m(args.m)
        .ef_construction(args.ef_construction)
        .capacity(base.len());
    if let Some(seed) = args.seed {
        params = params.seed(seed);
    }
    // NANN_ISA=scalar|avx2|avx512|neon forces a kernel level (to measure
    // where a wider one pays); the command-line contract is unchanged.
    if let Ok(isa) = std::env::var("NANN_ISA") {
        params = params.isa(match isa.as_str() {
            "scalar" => nann::Isa::Scalar,
            "avx2" => nann::Isa::Avx2,
            "avx512" => nann::Isa::Avx512,
            "neon" => nann::Isa::Neon,
            other => return Err(format!("NANN_ISA: unknown level '{other}'")),
        });
    }
    let index = Index::new(params).map_err(|e| e.to_string())?;
    let keys: Vec<u64> = (0..base.len() as u64).collect();
    let rows = base.rows();
    let start = Instant::now();
    index
        .insert_many(&keys, &rows, args.threads, |_| {})
        .map_err(|e| e.to_string())?;
    Ok((index, start.elapsed().as_secs_f64()))
}

fn main() -> ExitCode {
    match parse().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ann_bench: {message}");
            ExitCode::from(2)
        }
    }
}
