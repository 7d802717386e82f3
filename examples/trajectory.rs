//! The two papers' loop in one run: a day of budget pacing (TAR against
//! PID in the auction simulator, `nann::tar::sim`) whose every decision is
//! also a bid change of the campaign's ad, pushed through the BAR
//! near-line updater into a live index (`nann::bar`), so retrieval follows
//! the bid tick by tick.
//!
//! ```sh
//! cargo run --release --example trajectory
//! cargo run --release --example trajectory -- --seed 1000003 --advertiser 5 --budget-ratio 1.0
//! cargo run --release --example trajectory -- --no-plot      # no PNG (CI)
//! ```
//!
//! Flags: `--weights PATH` (TAR, default `weights/tar-small.safetensors`),
//! `--inverse PATH` (the inverse-dynamics model TAR reads its bids through,
//! default `weights/tar-inverse-small.safetensors`; `none` bids the plan's
//! own action slot),
//! `--bar-weights PATH` (default `weights/bar-small.safetensors`),
//! `--seed N` (the simulated day, default 1000000: a test day, never in
//! the training log), `--advertiser I` (the campaign, 0..48, default 0),
//! `--budget-ratio R` (default 0.75), `--preset sparse|delayed` (the
//! shipped weights are the sparse preset's), `--out PATH` (default
//! `target/trajectory.png`), `--no-plot`, `--ad A` (the market ad whose
//! profile the campaign's ad copies), `--requests N` (fixed requests the
//! ad's reach is counted on, default 32), `--ads N` (BAR market size,
//! default 100000), `--target-quantile Q` and `--target-days N` (TAR asks
//! for a day as efficient as the `Q`-quantile of `N` logged days, as
//! `tar_eval` does with its 600 training days; defaults 0.9 and 100, which
//! lands within 1% of the 600-day value in a sixth of the time),
//! `--target-efficiency E` (skip the log, ask for `E`), `--top-p P`
//! (default 0.9), `--tar-seed S` (TAR's sampling, default 1 as in
//! `tar_eval`), `--every K` (a BAR line every `K` ticks, default 6).
//!
//! What it does:
//!
//! 1. loads the small pretrained TAR model shipped in `weights/` (remake
//!    it: `cargo run --release --features train --example tar_eval --
//!    --json --save target/tar-weights`, then copy
//!    `target/tar-weights/tar-sparse.safetensors` to
//!    `weights/tar-small.safetensors` and `inverse-sparse.safetensors` to
//!    `weights/tar-inverse-small.safetensors`) and the BAR model (see
//!    `examples/retrieval.rs`);
//! 2. generates the BAR ad market (as `retrieval` does) and indexes it; the
//!    campaign gets a new ad there, with the profile of a market ad, and a
//!    fixed set of requests (users whose top interest is the ad's
//!    category) on which its retrieval is tracked;
//! 3. plays the day twice, once with TAR and once with PID bidding for the
//!    campaign. At every tick the policy's bid coefficient `alpha` becomes
//!    the ad's bid features: `bid_constraint` = the market ad's constraint
//!    x `alpha / CPA target`, `budget_left_ratio` = budget left / budget,
//!    `time_left_ratio` = time left; they are sent to
//!    `nann::bar::nearline::NearlineUpdater`, flushed, and the ad's vector
//!    and payload in the index are checked against the model's ad side of
//!    those features, then the fixed requests are searched
//!    (`Index::search_with`, the BAR scorer) for the ad's reach and rank;
//! 4. prints the per-tick table (alpha, spend, cumulative spend against
//!    the budget curve, conversions, reach) and the day's score for both
//!    policies, a BAR line every few ticks, the near-line summary
//!    (event-to-searchable latency), and writes the PNG.

mod support;
#[path = "support/trajectory.rs"]
mod trajectory;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use nann::bar::market::{Market, MarketConfig};
use nann::bar::BarModel;
use nann::tar::data::{DataConfig, Dataset};
use nann::tar::inverse::InverseDynamics;
use nann::tar::model::{GenerateOptions, TarModel};
use nann::tar::sim::{PidPolicy, Preset, SimConfig};
use nann::tar::TarPolicy;
use trajectory::{BarWorld, Campaign, Day};

const DEFAULT_WEIGHTS: &str = "weights/tar-small.safetensors";
const DEFAULT_INVERSE: &str = "weights/tar-inverse-small.safetensors";
const DEFAULT_BAR_WEIGHTS: &str = "weights/bar-small.safetensors";
const REMAKE_TAR: &str = "cargo run --release --features train --example tar_eval -- --json \
     --save target/tar-weights && cp target/tar-weights/tar-sparse.safetensors \
     weights/tar-small.safetensors && cp target/tar-weights/inverse-sparse.safetensors \
     weights/tar-inverse-small.safetensors";
const REMAKE_BAR: &str = "cargo run --release --features train --example bar_eval -- \
     --variants bar --save-weights weights/bar-small.safetensors";
/// The BAR market of `retrieval` and `bar_eval`.
const MARKET_SEED: u64 = 1;
/// Beam layers (ef x rounds, top layer first) and depth of retrieval, as
/// in `retrieval`.
const BEAM: [(usize, usize); 3] = [(20, 2), (40, 2), (200, 100)];
const TOP: usize = 200;

struct Args {
    weights: String,
    inverse: Option<String>,
    bar_weights: String,
    seed: u64,
    tar_seed: u64,
    advertiser: usize,
    budget_ratio: f64,
    preset: Preset,
    out: PathBuf,
    plot: bool,
    ad: Option<usize>,
    requests: usize,
    ads: usize,
    target_quantile: f64,
    target_days: u64,
    target_efficiency: Option<f32>,
    top_p: f32,
    every: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        weights: DEFAULT_WEIGHTS.into(),
        inverse: Some(DEFAULT_INVERSE.into()),
        bar_weights: DEFAULT_BAR_WEIGHTS.into(),
        seed: 1_000_000,
        tar_seed: 1,
        advertiser: 0,
        budget_ratio: 0.75,
        preset: Preset::Sparse,
        out: PathBuf::from("target/trajectory.png"),
        plot: true,
        ad: None,
        requests: 32,
        ads: 100_000,
        target_quantile: 0.9,
        target_days: 100,
        target_efficiency: None,
        top_p: 0.9,
        every: 6,
    };
    let mut raw = std::env::args().skip(1);
    while let Some(flag) = raw.next() {
        if flag == "--no-plot" {
            a.plot = false;
            continue;
        }
        let v = raw.next().ok_or(format!("{flag} needs a value"))?;
        use support::number;
        let flag = flag.as_str();
        match flag {
            "--weights" => a.weights = v,
            "--inverse" => a.inverse = (v != "none").then_some(v),
            "--bar-weights" => a.bar_weights = v,
            "--seed" => a.seed = number(flag, &v)?,
            "--tar-seed" => a.tar_seed = number(flag, &v)?,
            "--advertiser" => a.advertiser = number(flag, &v)?,
            "--budget-ratio" => a.budget_ratio = number(flag, &v)?,
            "--preset" => {
                a.preset = match v.as_str() {
                    "sparse" => Preset::Sparse,
                    "delayed" => Preset::Delayed,
                    other => return Err(format!("--preset: `{other}` is not sparse or delayed")),
                }
            }
            "--out" => a.out = PathBuf::from(v),
            "--ad" => a.ad = Some(number(flag, &v)?),
            "--requests" => a.requests = number(flag, &v)?,
            "--ads" => a.ads = number(flag, &v)?,
            "--target-quantile" => a.target_quantile = number(flag, &v)?,
            "--target-days" => a.target_days = number(flag, &v)?,
            "--target-efficiency" => a.target_efficiency = Some(number(flag, &v)?),
            "--top-p" => a.top_p = number(flag, &v)?,
            "--every" => a.every = number::<usize>(flag, &v)?.max(1),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("trajectory: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("trajectory: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let start = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    // 1. The models.
    let tar = TarModel::load(&args.weights).map_err(|e| {
        format!(
            "cannot load the TAR weights {}: {e}\n  (remake them: {REMAKE_TAR}; or pass --weights PATH)",
            args.weights
        )
    })?;
    let bar = BarModel::load(&args.bar_weights).map_err(|e| {
        format!(
            "cannot load the BAR weights {}: {e}\n  (remake them: {REMAKE_BAR}; or pass --bar-weights PATH)",
            args.bar_weights
        )
    })?;
    let inverse = match &args.inverse {
        Some(path) => Some(Arc::new(InverseDynamics::load(path).map_err(|e| {
            format!(
                "cannot load the inverse-dynamics weights {path}: {e}\n  (remake them: {REMAKE_TAR}; or pass --inverse none)"
            )
        })?)),
        None => None,
    };
    let tar = Arc::new(tar);
    let bar = Arc::new(bar);
    println!(
        "TAR {} ({} parameters), BAR {} ({} parameters)",
        args.weights,
        tar.parameter_count(),
        args.bar_weights,
        bar.parameter_count()
    );

    // 2. The simulator day and TAR's target.
    let sim = SimConfig::preset(args.preset)
        .with_ticks(48)
        .with_agent(args.advertiser)
        .with_budget_ratio(args.budget_ratio);
    sim.validate().map_err(|e| e.to_string())?;
    let pvs_per_tick = sim.pvs_per_day as f64 / sim.ticks as f64;
    let target = match args.target_efficiency {
        Some(target) => {
            println!("TAR target efficiency {target:.3} (--target-efficiency)");
            target
        }
        None => {
            let t = Instant::now();
            let log = Dataset::collect(
                &sim.clone().with_agent(0).with_budget_ratio(1.0),
                &DataConfig {
                    episodes: args.target_days,
                    first_seed: 0,
                    threads,
                    ..DataConfig::default()
                },
            )
            .map_err(|e| e.to_string())?;
            let target = log.attribute_quantile(0, args.target_quantile);
            println!(
                "TAR target efficiency {target:.3} (the {:.2}-quantile of {} logged days, {:.1} s)",
                args.target_quantile,
                args.target_days,
                t.elapsed().as_secs_f64()
            );
            target
        }
    };

    // 3. The BAR market, the index and the campaign's ad.
    let t = Instant::now();
    let market = Market::generate(
        &MarketConfig::default()
            .with_ads(args.ads)
            .with_users(20_000)
            .with_seed(MARKET_SEED),
    )
    .map_err(|e| e.to_string())?
    .with_operated_budgets(1);
    let world = BarWorld::build(Arc::clone(&bar), market, threads, &BEAM, TOP)?;
    let base_ad = match args.ad {
        Some(ad) => ad,
        // An ad the ranking stage shows: the first impression of a
        // held-out session.
        None => world.market.session(1 << 41).impressions[0].ad,
    };
    let campaign = Campaign::new(&world, base_ad, args.requests)?;
    println!(
        "BAR market: {} ads indexed in {:.1} s; the campaign's ad is key {} (profile of ad {base_ad}, category {}, bid constraint {:.2} at alpha = CPA), tracked on {} requests (top {TOP} each)",
        world.index.len() - 1,
        t.elapsed().as_secs_f64(),
        campaign.key,
        campaign.base.cate,
        campaign.base.bid.bid_constraint,
        campaign.users.len()
    );

    // 4. The day, twice.
    let mut tar_policy = TarPolicy::new(Arc::clone(&tar), target, pvs_per_tick)
        .with_options(GenerateOptions {
            top_p: args.top_p,
            ..GenerateOptions::default()
        })
        .with_seed(args.tar_seed);
    if let Some(inverse) = &inverse {
        tar_policy = tar_policy.with_inverse_dynamics(Arc::clone(inverse));
    }
    let t = Instant::now();
    let tar_day = trajectory::play_day(&sim, args.seed, tar_policy, &world, &campaign)?;
    let tar_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let pid_day = trajectory::play_day(&sim, args.seed, PidPolicy::default(), &world, &campaign)?;
    let pid_seconds = t.elapsed().as_secs_f64();

    println!(
        "\n{} day {}, advertiser {} of {}: budget {:.0} (ratio {}), CPA target {:.0}, {} ticks",
        args.preset.name(),
        args.seed,
        args.advertiser,
        sim.advertisers(),
        tar_day.budget,
        args.budget_ratio,
        tar_day.cpa_target,
        tar_day.ticks.len()
    );
    print_table(&tar_day, &pid_day, campaign.users.len());
    for day in [&tar_day, &pid_day] {
        println!(
            "{:<4} score {:>6.2}: {} conversions, spend {:.0} of {:.0} ({:.1}%), CPA {:.1} (target {:.0})",
            day.policy.to_uppercase(),
            day.score,
            day.conversions,
            day.cost,
            day.budget,
            100.0 * day.cost / day.budget,
            day.cost / day.conversions.max(1) as f64,
            day.cpa_target
        );
    }

    println!("\nBAR near-line loop: each tick's bid -> NearlineUpdater::send -> flush -> index");
    println!(
        "{:<4} {:>4}  {:>10} {:>6} {:>5}  {:>13}  {:>6}  {:>7} {:>11}",
        "",
        "tick",
        "constraint",
        "budget",
        "time",
        "buckets c/b/t",
        "|dz_a|",
        "reach",
        "median rank"
    );
    for day in [&tar_day, &pid_day] {
        for (t, k) in day.ticks.iter().enumerate() {
            if t % args.every != 0 && t + 1 != day.ticks.len() {
                continue;
            }
            println!(
                "{:<4} {:>4}  {:>10.2} {:>6.2} {:>5.2}  {:>13}  {:>6.3}  {:>3}/{:<3} {:>11}",
                day.policy.to_uppercase(),
                t,
                k.bid.bid_constraint,
                k.bid.budget_left_ratio,
                k.bid.time_left_ratio,
                format!("{}/{}/{}", k.buckets[0], k.buckets[1], k.buckets[2]),
                k.moved,
                k.reach,
                campaign.users.len(),
                match k.median_rank {
                    Some(r) => r.to_string(),
                    None => format!(">{TOP}"),
                }
            );
        }
    }
    let mut all_ok = true;
    for (day, seconds) in [(&tar_day, tar_seconds), (&pid_day, pid_seconds)] {
        let mut lat: Vec<f64> = day
            .ticks
            .iter()
            .map(|k| k.latency.as_secs_f64() * 1e3)
            .collect();
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
        let changed = day.ticks.iter().filter(|k| k.moved > 0.0).count();
        let in_sync = day.ticks.iter().filter(|k| k.in_sync).count();
        let reach: Vec<usize> = day.ticks.iter().map(|k| k.reach).collect();
        all_ok &= in_sync == day.ticks.len() && day.failed == 0;
        println!(
            "{:<4} {} pushes applied ({} failed); the ad's vector changed on {} of {} ticks; index == model's ad side after {} of {} pushes; \
             event-to-searchable p50 {:.3} ms, max {:.3} ms; reach {}..{} of {} (start {}, end {}); day in {:.1} s",
            day.policy.to_uppercase(),
            day.applied,
            day.failed,
            changed,
            day.ticks.len(),
            in_sync,
            day.ticks.len(),
            pct(0.5),
            pct(1.0),
            reach.iter().min().copied().unwrap_or(0),
            reach.iter().max().copied().unwrap_or(0),
            campaign.users.len(),
            reach.first().copied().unwrap_or(0),
            reach.last().copied().unwrap_or(0),
            seconds
        );
    }

    if args.plot {
        if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let title = format!(
            "{} day {}, advertiser {}, budget ratio {}",
            args.preset.name(),
            args.seed,
            args.advertiser,
            args.budget_ratio
        );
        trajectory::plot(
            &args.out,
            &[&tar_day, &pid_day],
            campaign.users.len(),
            &title,
        )
        .map_err(|e| format!("plot {}: {e}", args.out.display()))?;
        println!(
            "\nwrote {} (top: cumulative spend, dashed = budget curve; middle: alpha / CPA; bottom: the ad's reach; red = TAR, blue = PID)",
            args.out.display()
        );
    }
    println!("total {:.1} s", start.elapsed().as_secs_f64());
    if !all_ok {
        return Err("the index did not follow every pushed bid".into());
    }
    Ok(())
}

fn print_table(tar: &Day, pid: &Day, requests: usize) {
    println!(
        "\n{:>4} {:>7} | {:>5} {:>6} {:>7} {:>4} {:>5} | {:>5} {:>6} {:>7} {:>4} {:>5}",
        "", "budget", "TAR", "", "", "", "", "PID", "", "", "", ""
    );
    println!(
        "{:>4} {:>7} | {:>5} {:>6} {:>7} {:>4} {:>5} | {:>5} {:>6} {:>7} {:>4} {:>5}",
        "tick",
        "curve",
        "a/CPA",
        "spend",
        "cum",
        "conv",
        "reach",
        "a/CPA",
        "spend",
        "cum",
        "conv",
        "reach"
    );
    for (t, (a, b)) in tar.ticks.iter().zip(&pid.ticks).enumerate() {
        println!(
            "{:>4} {:>7.0} | {:>5.2} {:>6.1} {:>7.0} {:>4} {:>5} | {:>5.2} {:>6.1} {:>7.0} {:>4} {:>5}",
            t,
            a.curve,
            a.alpha / tar.cpa_target,
            a.cost,
            a.cum_cost,
            a.conversions,
            a.reach,
            b.alpha / pid.cpa_target,
            b.cost,
            b.cum_cost,
            b.conversions,
            b.reach
        );
    }
    println!("(reach: of the {requests} fixed requests, how many retrieve the campaign's ad after the tick's push)");
}
