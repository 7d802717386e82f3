//! Bidding-aware retrieval, end to end, on built-in defaults: the README's
//! first command.
//!
//! ```text
//! cargo run --release --example retrieval -- [--weights weights/bar-small.safetensors]
//!     [--ads 100000] [--users 20000] [--seed 1] [--seconds 10] [--events-per-second 2000]
//!     [--beam 20x2,40x2,200x100] [--top 200] [--coverage-queries 50] [--targets 1000]
//!     [--json]
//! ```
//!
//! 1. loads the small pretrained BAR model shipped in `weights/` (remake it
//!    with `cargo run --release --features train --example bar_eval --
//!    --variants bar --save-weights weights/bar-small.safetensors`);
//! 2. generates the synthetic ad market it was trained on (100k ads), after
//!    every advertiser set its budget (`Market::with_operated_budgets`, the
//!    market `bar_eval` evaluates on);
//! 3. computes every ad's side (`z_a`, the index vector, and its tokens, the
//!    payload) and builds the index;
//! 4. serves requests for `--seconds` on one thread with `Index::search_with`
//!    (NANN beam retrieval, the model as scorer) while a second thread
//!    streams bid events into the near-line updater, which re-embeds each
//!    changed ad and updates the index in place;
//! 5. prints: recall (the share of each request's 5 impressions among the
//!    `--top` retrieved), coverage (overlap with the model's exact top over
//!    all ads, on `--coverage-queries` requests), QPS and p99 latency,
//!    event-to-searchable latency p50/p99 (freshness), and the RIR-style
//!    responsiveness: how much more often `--targets` ads are retrieved
//!    after a positive operation (budget refilled, constraint relaxed) is
//!    pushed through the near-line updater, against the same requests
//!    before it (with the updater off the index never changes, so the
//!    ratio is exactly 1 by construction).
//!
//! The default beam, `20x2,40x2,200x100` (ef x rounds per layer, top
//! layer first; layer 0 in effect runs until its frontier is empty), is
//! tuned on this market: the paper's `100x1,200x1,400x3` scores 4.3% of
//! 100k ads for 0.92 coverage here, three rounds being too few for this
//! graph; see BENCHMARKS.md.
//!
//! With `--json` the summary is one JSON object on stdout; progress always
//! goes to stderr.

#[path = "support/bar.rs"]
mod bar_support;
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nann::bar::market::{BidEvent, Market, MarketConfig};
use nann::bar::metrics::{coverage, recall_at_m};
use nann::bar::nearline::{NearlineOptions, NearlineUpdater};
use nann::bar::{AdFeatures, BarModel, BarScorer, BidFeatures};
use nann::BeamParams;

const DEFAULT_WEIGHTS: &str = "weights/bar-small.safetensors";

struct Args {
    weights: String,
    ads: usize,
    users: usize,
    seed: u64,
    seconds: f64,
    events_per_second: f64,
    beam: Vec<(usize, usize)>,
    top: usize,
    coverage_queries: usize,
    targets: usize,
    json: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        weights: DEFAULT_WEIGHTS.into(),
        ads: 100_000,
        users: 20_000,
        seed: 1,
        seconds: 10.0,
        events_per_second: 2000.0,
        beam: vec![(20, 2), (40, 2), (200, 100)],
        top: 200,
        coverage_queries: 50,
        targets: 1000,
        json: false,
    };
    a.json = support::parse_flags(|flag, v| {
        use support::number;
        match flag {
            "--weights" => a.weights = v.to_string(),
            "--ads" => a.ads = number(flag, v)?,
            "--users" => a.users = number(flag, v)?,
            "--seed" => a.seed = number(flag, v)?,
            "--seconds" => a.seconds = number(flag, v)?,
            "--events-per-second" => a.events_per_second = number(flag, v)?,
            "--beam" => a.beam = bar_support::parse_layers(v)?,
            "--top" => a.top = number(flag, v)?,
            "--coverage-queries" => a.coverage_queries = number(flag, v)?,
            "--targets" => a.targets = number(flag, v)?,
            _ => return Err(format!("unknown flag {flag}")),
        }
        Ok(())
    })?;
    Ok(a)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("retrieval: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("retrieval: {e}");
        std::process::exit(1);
    }
}

fn step(n: usize, total: usize, what: &str) {
    eprintln!("[{n}/{total}] {what}");
}

fn run(args: &Args) -> Result<(), String> {
    let start = Instant::now();
    const STEPS: usize = 6;
    step(
        1,
        STEPS,
        &format!("loading the model from {}", args.weights),
    );
    let model = BarModel::load(&args.weights).map_err(|e| {
        format!(
            "{e}\n  (remake it: cargo run --release --features train --example bar_eval -- \
             --variants bar --save-weights {DEFAULT_WEIGHTS})"
        )
    })?;
    let model = Arc::new(model);
    eprintln!(
        "      {} parameters, z_a dimension {}, {} payload bytes per ad",
        model.parameter_count(),
        model.config().d_model,
        model.config().payload_bytes()
    );

    step(
        2,
        STEPS,
        &format!(
            "generating the ad market ({} ads, seed {})",
            args.ads, args.seed
        ),
    );
    // The market after every advertiser set its budget: the one `bar_eval`
    // evaluates on (the logs the model learned from confound budgets with
    // appeal; see `nann::bar::market`).
    let market = Market::generate(
        &MarketConfig::default()
            .with_ads(args.ads)
            .with_users(args.users)
            .with_seed(args.seed),
    )
    .map_err(|e| e.to_string())?
    .with_operated_budgets(1);
    if market.model_config() != *model.config() {
        return Err("the weights were trained on a market with other vocabularies; pass the same --ads/--users sizes' configuration or retrain".into());
    }

    step(3, STEPS, "ad side for every ad, then the index");
    let t = Instant::now();
    let (tokens, z) = bar_support::ad_sides(&model, &market, 2);
    let built = AtomicU64::new(0);
    let index = Arc::new(bar_support::build_index(
        &model,
        &tokens,
        &z,
        16,
        100,
        2,
        |i| {
            let done = built.fetch_max(i as u64, Ordering::Relaxed).max(i as u64);
            if done.is_multiple_of(20_000) {
                eprintln!("      {done} / {} ads indexed", tokens.len());
            }
        },
    ));
    eprintln!(
        "      {} ads in {:.1} s",
        index.len(),
        t.elapsed().as_secs_f64()
    );

    let scorer = BarScorer::new(Arc::clone(&model));
    let params = BeamParams::default().layers(&args.beam).top(args.top);
    let sessions_start = 1u64 << 40; // held out from training
    let user_of = |i: usize| market.session(sessions_start + i as u64);

    step(
        4,
        STEPS,
        &format!(
            "coverage against brute force on {} requests",
            args.coverage_queries
        ),
    );
    let mut cov = 0.0;
    let mut scores = Vec::new();
    for i in 0..args.coverage_queries {
        let session = user_of(i);
        let user = model
            .user_side(&market.users()[session.user].features)
            .map_err(|e| e.to_string())?;
        let exact = bar_support::exact_top(&model, &user, &tokens, &z, args.top, &mut scores);
        let hits = index
            .search_with(&scorer, &user, &params)
            .map_err(|e| e.to_string())?;
        let keys: Vec<u64> = hits.iter().map(|h| h.key).collect();
        cov += coverage(&keys, &exact);
    }
    let coverage = cov / args.coverage_queries.max(1) as f64;
    eprintln!("      coverage@{} {coverage:.4}", args.top);

    step(
        5,
        STEPS,
        &format!(
            "serving for {:.0} s while {:.0} bid events/s stream in",
            args.seconds, args.events_per_second
        ),
    );
    let updater = NearlineUpdater::spawn(
        Arc::clone(&index),
        Arc::clone(&model),
        NearlineOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let stop = AtomicBool::new(false);
    let mut latencies_ms = Vec::new();
    let mut recall_sum = 0.0;
    let mut queries = 0usize;
    let events_sent = AtomicU64::new(0);
    let serve_start = Instant::now();
    std::thread::scope(|s| -> Result<(), String> {
        s.spawn(|| {
            // Bid events at a steady rate, on their own thread.
            let mut salt = 0u64;
            let period = Duration::from_secs_f64(1.0 / args.events_per_second.max(1.0));
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let event: BidEvent = market.bid_event(salt);
                salt += 1;
                let ad = market.ads()[event.ad].features;
                let features = AdFeatures {
                    bid: event.bid,
                    ..ad
                };
                if updater.send(market.ads()[event.ad].key, features).is_ok() {
                    events_sent.fetch_add(1, Ordering::Relaxed);
                }
                next += period;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
        });
        let deadline = serve_start + Duration::from_secs_f64(args.seconds);
        let mut i = 0usize;
        let mut last_report = Instant::now();
        let result = (|| {
            while Instant::now() < deadline {
                let session = user_of(args.coverage_queries + i);
                i += 1;
                let t = Instant::now();
                let user = model
                    .user_side(&market.users()[session.user].features)
                    .map_err(|e| e.to_string())?;
                let hits = index
                    .search_with(&scorer, &user, &params)
                    .map_err(|e| e.to_string())?;
                latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
                let keys: Vec<u64> = hits.iter().map(|h| h.key).collect();
                let truth: Vec<u64> = session.impressions.iter().map(|l| l.ad as u64).collect();
                recall_sum += recall_at_m(&keys, &truth);
                queries += 1;
                if last_report.elapsed() > Duration::from_secs(2) {
                    last_report = Instant::now();
                    eprintln!(
                        "      {:>4.0} s: {queries} requests, {} bid events applied",
                        serve_start.elapsed().as_secs_f64(),
                        updater.report(false).applied
                    );
                }
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    let serve_seconds = serve_start.elapsed().as_secs_f64();
    updater.flush();
    let report = updater.report(true);
    let mut fresh: Vec<f64> = report
        .latencies
        .iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    fresh.sort_by(f64::total_cmp);
    latencies_ms.sort_by(f64::total_cmp);

    step(
        6,
        STEPS,
        &format!(
            "responsiveness: positive operations on {} ads",
            args.targets
        ),
    );
    let probe: Vec<_> = (0..200)
        .map(|i| {
            let session = user_of(1_000_000 + i);
            model.user_side(&market.users()[session.user].features)
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let targets: Vec<usize> = (0..args.targets.min(args.ads))
        .map(|i| (nann_hash(i as u64) % args.ads as u64) as usize)
        .collect();
    let is_target: std::collections::HashSet<u64> = targets.iter().map(|&a| a as u64).collect();
    let count_hits = || -> Result<usize, String> {
        let mut n = 0;
        for user in &probe {
            let hits = index
                .search_with(&scorer, user, &params)
                .map_err(|e| e.to_string())?;
            n += hits.iter().filter(|h| is_target.contains(&h.key)).count();
        }
        Ok(n)
    };
    // The events stream above changed some ads; start from the index's
    // current state for both counts.
    let before = count_hits()?;
    for &ad in &targets {
        let features = index_features(&market, ad);
        let positive = AdFeatures {
            bid: BidFeatures {
                budget_left_ratio: 1.0,
                bid_constraint: features.bid.bid_constraint * 2.0,
                ..features.bid
            },
            ..features
        };
        updater
            .send(market.ads()[ad].key, positive)
            .map_err(|e| e.to_string())?;
    }
    updater.flush();
    let after = count_hits()?;
    let final_report = updater.shutdown();
    let rir = after as f64 / before.max(1) as f64;

    // Request time only: generating a session (the market's ranking stage
    // over all ads, ~1 ms) is the simulator's work, not the server's.
    let busy: f64 = latencies_ms.iter().sum::<f64>() / 1e3;
    let qps = queries as f64 / busy.max(1e-9);
    eprintln!("      served {queries} requests in {serve_seconds:.1} s");
    let recall = recall_sum / queries.max(1) as f64;
    let p50 = bar_support::percentile(&latencies_ms, 50.0);
    let p99 = bar_support::percentile(&latencies_ms, 99.0);
    let f50 = bar_support::percentile(&fresh, 50.0);
    let f99 = bar_support::percentile(&fresh, 99.0);
    eprintln!();
    eprintln!(
        "recall@{}     {recall:.4}   (share of each request's 5 impressions retrieved)",
        args.top
    );
    eprintln!(
        "coverage@{}   {coverage:.4}   (overlap with the model's exact top over all ads)",
        args.top
    );
    eprintln!("QPS           {qps:.0}     (one serving thread; request latency p50 {p50:.2} ms, p99 {p99:.2} ms)");
    eprintln!(
        "freshness     p50 {f50:.3} ms, p99 {f99:.3} ms from bid event to searchable ({} events applied, {} merged, {} failed)",
        report.applied, report.coalesced, report.failed
    );
    eprintln!(
        "responsiveness {} -> {} retrievals of the {} operated ads over {} requests: {rir:.2}x with near-line updates (1.00x without)",
        before,
        after,
        targets.len(),
        probe.len()
    );
    eprintln!("total {:.1} s", start.elapsed().as_secs_f64());
    if final_report.failed > 0 {
        return Err(format!(
            "{} near-line updates failed: {}",
            final_report.failed,
            final_report.last_error.unwrap_or_default()
        ));
    }
    if args.json {
        println!(
            "{{\"recall\":{recall:.6},\"top\":{},\"coverage\":{coverage:.6},\"qps\":{qps:.1},\"p99_ms\":{p99:.4},\"fresh_p50_ms\":{f50:.4},\"fresh_p99_ms\":{f99:.4},\"events\":{},\"rir\":{rir:.4}}}",
            args.top,
            events_sent.load(Ordering::Relaxed)
        );
    }
    Ok(())
}

/// The ad's features as the market generated them.
fn index_features(market: &Market, ad: usize) -> AdFeatures {
    market.ads()[ad].features
}

fn nann_hash(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
