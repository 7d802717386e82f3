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
//! ```

use std::time::{Duration, Instant};

use nann::tar::sim::{
    evaluate, evaluate_replay, ConstantPolicy, DayContext, MarketLog, Observation, OnlineLpPolicy,
    PidPolicy, Policy, Preset, SimConfig, SimError,
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
            "{:<9} {:<8} {:>5}  {:>15}  {:>6}  {:>9}",
            "policy", "preset", "ratio", "score ± ci95", "spend", "µs/decision"
        );
    }
    let mode = if replay { "\"mode\":\"replay\"," } else { "" };
    for preset in [Preset::Sparse, Preset::Delayed] {
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
        let logs = logs.as_deref();
        for &ratio in &ratios {
            let config = SimConfig::preset(preset)
                .with_ticks(t)
                .with_budget_ratio(ratio);
            let rows = [
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
            for (name, (score, ci, spend, us)) in rows {
                if json {
                    println!(
                        "{{\"policy\":\"{name}\",\"preset\":\"{}\",{mode}\"budget_ratio\":{ratio},\"score\":{score:.4},\"ci95\":{ci:.4}}}",
                        preset.name()
                    );
                } else {
                    println!(
                        "{:<9} {:<8} {:>5.2}  {:>7.2} ± {:<6.2}  {:>6.2}  {:>9.2}",
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
