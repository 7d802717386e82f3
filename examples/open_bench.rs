//! Times each way of opening a saved index, and the heap each one needs.
//!
//! ```sh
//! cargo run --release --example open_bench -- PATH [--query Q.fvecs --gt G.ivecs] [--json]
//! ```
//!
//! Modes, each on a fresh open of the same file:
//! `open` (mapped, validated), `open_unchecked` (mapped, header only),
//! `open_untrusted` (read into memory, everything validated, checksums
//! included, and finite vectors), and `verify_checksums` and `check_vectors`
//! on an index from `open` (the two content checks `open` leaves out). For the two
//! mapped modes, given `--query` and `--gt`, it also times the first pass of
//! searches right after the open (k 10, ef 64), which pays for the pages the
//! open did not touch. Peak extra heap comes from a counting global allocator.
//! `benches/open_vs_hnswlib.py` runs this beside hnswlib's `load_index`.

mod support;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use nann::Index;

#[global_allocator]
static ALLOCATOR: support::heap::Counting = support::heap::Counting;

use support::heap::measured;

struct Args {
    path: PathBuf,
    query: Option<PathBuf>,
    gt: Option<PathBuf>,
    json: bool,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        path: PathBuf::new(),
        query: None,
        gt: None,
        json: false,
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--query" => args.query = it.next().map(PathBuf::from),
            "--gt" => args.gt = it.next().map(PathBuf::from),
            "--json" => args.json = true,
            path if !path.starts_with("--") => args.path = PathBuf::from(path),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.path.as_os_str().is_empty() {
        return Err("usage: open_bench PATH [--query Q.fvecs --gt G.ivecs] [--json]".into());
    }
    Ok(args)
}

fn run() -> Result<(), String> {
    let args = parse()?;
    let queries = match (&args.query, &args.gt) {
        (Some(q), Some(g)) => Some((
            support::read_fvecs(q).map_err(|e| e.to_string())?,
            support::read_ivecs(g).map_err(|e| e.to_string())?,
        )),
        _ => None,
    };
    let report = |mode: &str, ms: f64, heap: usize, index: Option<&Index>| -> Result<(), String> {
        let mut extra = String::new();
        if let (Some(index), Some((q, gt))) = (index, &queries) {
            let rows = q.rows();
            let start = Instant::now();
            let mut found = Vec::with_capacity(rows.len());
            for row in &rows {
                let hits = index.search(row, 10, 64).map_err(|e| e.to_string())?;
                found.push(hits.iter().map(|h| h.key).collect::<Vec<_>>());
            }
            let first_ms = start.elapsed().as_secs_f64() * 1e3;
            let recall = support::recall(&found, &gt.1, gt.0, 10);
            extra = format!(",\"first_searches_ms\":{first_ms:.3},\"recall\":{recall:.4}");
        }
        if args.json {
            println!(
                "{{\"mode\":\"{mode}\",\"ms\":{ms:.3},\"peak_extra_heap_bytes\":{heap}{extra}}}"
            );
        } else {
            println!(
                "{mode:<16} {ms:>9.3} ms  peak extra heap {:>8.1} MiB{extra}",
                heap as f64 / (1 << 20) as f64
            );
        }
        Ok(())
    };

    let (index, ms, heap) = measured(|| Index::open(&args.path));
    let index = index.map_err(|e| e.to_string())?;
    report("open", ms, heap, Some(&index))?;
    let (verified, ms, heap) = measured(|| index.verify_checksums());
    verified.map_err(|e| e.to_string())?;
    report("verify_checksums", ms, heap, None)?;
    let (checked, ms, heap) = measured(|| index.check_vectors());
    checked.map_err(|e| e.to_string())?;
    report("check_vectors", ms, heap, None)?;
    drop(index);

    // SAFETY: the file was validated by `open` just above, and the benchmark
    // does not modify it.
    let (index, ms, heap) = measured(|| unsafe { Index::open_unchecked(&args.path) });
    let index = index.map_err(|e| e.to_string())?;
    report("open_unchecked", ms, heap, Some(&index))?;
    drop(index);

    let (index, ms, heap) = measured(|| Index::open_untrusted(&args.path));
    index.map_err(|e| e.to_string())?;
    report("open_untrusted", ms, heap, None)?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("open_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
