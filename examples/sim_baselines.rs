//! Baselines of the TAR simulator (`nann::tar::sim`, issue 7): PID pacing,
//! OnlineLP and a constant bid (alpha = CPA target) on the `sparse` and
//! `delayed` presets, over the budget ratios 0.5..1.5, as the mean score of
//! the agent over several days with a 95% confidence interval, and the
//! policy's latency per decision.
//!
//! With `--replay` the same cells run in offline replay mode
//! (`nann::tar::sim::run_replay`, AuctionNet's offline evaluation): each
//! day's market is logged once as advertiser 0 saw it in the live day, and
//! every policy and budget ratio is replayed against those logs (win iff
//! bid >= least winning cost, pay it, every win shown); JSON lines then
//! carry `"mode":"replay"`.
//!
//! ```sh
//! cargo run --release --example sim_baselines            # table
//! cargo run --release --example sim_baselines -- --json  # one object per line
//! cargo run --release --example sim_baselines -- --days 20 --delayed-ticks 48
//! cargo run --release --example sim_baselines -- --replay --json
//! # with two hindsight bounds beside them (replay only; not policies: they
//! # know each day's prices in advance): `hindsight`, the best constant bid
//! # of the day, and `hindsight_lp`, OnlineLP re-solved each tick on the
//! # day's actual remaining PVs
//! cargo run --release --example sim_baselines -- --replay --hindsight --days 60
//! # the recurring market (same population every day) and `history_lp`,
//! # OnlineLP solved on 20 past days' prices (seeds 2000..2020), beside them
//! cargo run --release --example sim_baselines -- --presets sparse,recurring --history 20
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use nann::tar::sim::{
    evaluate, evaluate_replay, mean_ci95, run_replay, ConstantPolicy, DayContext,
    HindsightLpPolicy, HistoryLpPolicy, MarketLog, Observation, OnlineLpPolicy, PidPolicy, Policy,
    Preset, PriceHistory, SimConfig, SimError,
};

/// Wraps a policy and times its decisions.
struct Timed<P> {
    inner: P,
    elapsed: Duration,
    decisions: u64,
}

impl<P: Policy> Policy for Timed<P> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn begin_day(&mut self, day: &DayContext<'_>) {
        self.inner.begin_day(day);
    }
    fn act(&mut self, obs: &Observation<'_>) -> f64 {
        let start = Instant::now();
        let alpha = self.inner.act(obs);
        self.elapsed += start.elapsed();
        self.decisions += 1;
        alpha
    }
}

/// `--hindsight`: bids each replayed day's hindsight constant
/// (`MarketLog::best_constant`), chosen knowing the whole day's prices: not
/// a policy anyone can run, the bound pacing is measured against.
struct Hindsight {
    /// One factor (in CPA targets) per log, in log order.
    factors: Vec<f64>,
    day: usize,
    alpha: f64,
}

impl Policy for Hindsight {
    fn name(&self) -> &str {
        "hindsight"
    }
    fn begin_day(&mut self, day: &DayContext<'_>) {
        let factor = self.factors.get(self.day).copied().unwrap_or(1.0);
        self.alpha = factor * day.cpa_target;
        self.day += 1;
    }
    fn act(&mut self, _: &Observation<'_>) -> f64 {
        self.alpha
    }
}

/// Scores `policy` on the live days `1000..1000 + days`, or, given `logs`,
/// replayed on them.
fn run<P: Policy>(
    config: &SimConfig,
    policy: P,
    days: u64,
    logs: Option<&[MarketLog]>,
) -> Result<(f64, f64, f64, f64), SimError> {
    let mut timed = Timed {
        inner: policy,
        elapsed: Duration::ZERO,
        decisions: 0,
    };
    let eval = match logs {
        Some(logs) => evaluate_replay(config, logs, &mut timed)?,
        // Seeds from 1000: days the tests do not use.
        None => evaluate(config, &mut timed, 1000..1000 + days)?,
    };
    let us = timed.elapsed.as_secs_f64() * 1e6 / timed.decisions.max(1) as f64;
    Ok((eval.mean, eval.ci95, eval.mean_spend_ratio, us))
}

fn main() -> Result<(), SimError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let replay = args.iter().any(|a| a == "--replay");
    let hindsight = replay && args.iter().any(|a| a == "--hindsight");
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let days = value("--days").unwrap_or(8);
    // The baselines never read conversions, so at equal ticks the delayed
    // preset would reproduce the sparse rows exactly; by default it runs at
    // 288 ticks a day (5-minute decisions), the DelaySim setting.
    let ticks = value("--ticks").unwrap_or(48) as usize;
    let delayed_ticks = value("--delayed-ticks").unwrap_or(288) as usize;
    // `--history N`: a `history_lp` row, OnlineLP on N past days' prices.
    let history_days = value("--history").unwrap_or(0);
    // `--level W`: history_lp scales the history's prices by today's level
    // over the history's to the power W (0: the pure history).
    let level = args
        .iter()
        .position(|a| a == "--level")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let presets: Vec<Preset> = match args.iter().position(|a| a == "--presets") {
        Some(i) => args
            .get(i + 1)
            .map(|v| v.as_str())
            .unwrap_or("")
            .split(',')
            .map(|name| match name {
                "sparse" => Ok(Preset::Sparse),
                "delayed" => Ok(Preset::Delayed),
                "recurring" => Ok(Preset::Recurring),
                other => Err(SimError::Config {
                    field: "preset",
                    message: format!("unknown preset `{other}` (sparse, delayed, recurring)"),
                }),
            })
            .collect::<Result<_, _>>()?,
        None => vec![Preset::Sparse, Preset::Delayed],
    };
    let ratios = [0.5, 0.75, 1.0, 1.25, 1.5];
    let start = Instant::now();
    if !json {
        println!(
            "agent = advertiser 0 of 48, {days} days per cell, 50k PVs a day, \
             {ticks} ticks a day (sparse), {delayed_ticks} (delayed, mean delay 2 h)"
        );
        if replay {
            println!(
                "offline replay: each day's market as advertiser 0 saw it live, \
                 win iff bid >= least winning cost, pay it, every win shown"
            );
        }
        println!(
            "{:<12} {:<8} {:>5}  {:>15}  {:>6}  {:>9}",
            "policy", "preset", "ratio", "score ± ci95", "spend", "µs/decision"
        );
    }
    let mode = if replay { "\"mode\":\"replay\"," } else { "" };
    for preset in presets {
        let t = if preset == Preset::Delayed {
            delayed_ticks
        } else {
            ticks
        };
        // Replay: the days' markets, logged once, serve every ratio and
        // policy (the log is of the day at budget ratio 1).
        let logs = if replay {
            let day = SimConfig::preset(preset).with_ticks(t);
            Some(
                (1000..1000 + days)
                    .map(|seed| MarketLog::record(&day, seed))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        } else {
            None
        };
        // `--history N`: advertiser 0's past days (seeds 2000.., apart from
        // the days scored).
        let history = if history_days > 0 {
            let day = SimConfig::preset(preset).with_ticks(t);
            let past = (2000..2000 + history_days)
                .map(|seed| MarketLog::record(&day, seed))
                .collect::<Result<Vec<_>, _>>()?;
            Some(PriceHistory::from_logs(&past)?)
        } else {
            None
        };
        // `--hindsight`: the logs shared once with the bidders that know them.
        let shared: Vec<Arc<MarketLog>> = match (&logs, hindsight) {
            (Some(logs), true) => logs.iter().cloned().map(Arc::new).collect(),
            _ => Vec::new(),
        };
        let logs = logs.as_deref();
        for &ratio in &ratios {
            let config = SimConfig::preset(preset)
                .with_ticks(t)
                .with_budget_ratio(ratio);
            let mut rows = vec![
                ("pid", run(&config, PidPolicy::default(), days, logs)?),
                (
                    "onlinelp",
                    run(&config, OnlineLpPolicy::default(), days, logs)?,
                ),
                (
                    "constant",
                    run(&config, ConstantPolicy::default(), days, logs)?,
                ),
            ];
            if let Some(history) = &history {
                let policy = HistoryLpPolicy::new([history.clone()]).with_level_weight(level);
                rows.push(("history_lp", run(&config, policy, days, logs)?));
            }
            if let (true, Some(logs)) = (hindsight, logs) {
                let bound = Hindsight {
                    factors: logs.iter().map(|l| l.best_constant(ratio).0).collect(),
                    day: 0,
                    alpha: 0.0,
                };
                rows.push(("hindsight", run(&config, bound, days, Some(logs))?));
                // One replay per log, each with the bidder that knows it.
                let mut scores = Vec::with_capacity(logs.len());
                let (mut spend, mut elapsed) = (0.0, Duration::ZERO);
                for log in &shared {
                    let mut bound = HindsightLpPolicy::new(log.clone());
                    let start = Instant::now();
                    let day = run_replay(&config, log, log.seed(), &mut bound)?;
                    elapsed += start.elapsed();
                    spend += day.outcome.cost / day.outcome.budget.max(1e-9);
                    scores.push(day.outcome.score);
                }
                let (mean, ci) = mean_ci95(&scores);
                let us = elapsed.as_secs_f64() * 1e6 / (logs.len() * config.ticks).max(1) as f64;
                rows.push(("hindsight_lp", (mean, ci, spend / logs.len() as f64, us)));
            }
            for (name, (score, ci, spend, us)) in rows {
                if json {
                    println!(
                        "{{\"policy\":\"{name}\",\"preset\":\"{}\",{mode}\"budget_ratio\":{ratio},\"score\":{score:.4},\"ci95\":{ci:.4}}}",
                        preset.name()
                    );
                } else {
                    println!(
                        "{:<12} {:<8} {:>5.2}  {:>7.2} ± {:<6.2}  {:>6.2}  {:>9.2}",
                        name,
                        preset.name(),
                        ratio,
                        score,
                        ci,
                        spend,
                        us
                    );
                }
            }
        }
    }
    if !json {
        println!("wall time {:.1} s", start.elapsed().as_secs_f64());
    }
    Ok(())
}
