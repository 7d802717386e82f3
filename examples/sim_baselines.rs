//! Baselines of the TAR simulator (`nann::tar::sim`, issue 7): PID pacing,
//! OnlineLP and a constant bid (alpha = CPA target) on the `sparse` and
//! `delayed` presets, over the budget ratios 0.5..1.5, as the mean score of
//! the agent over several days with a 95% confidence interval, and the
//! policy's latency per decision.
//!
//! With `--replay` the same cells run in offline replay mode
//! (`nann::tar::sim::run_replay`, AuctionNet's offline evaluation): each
//! day's market is logged once as the agent (advertiser 0, or `--agent A`)
//! saw it in the live day, and every policy and budget ratio is replayed
//! against those logs (win iff bid >= least winning cost, pay it, every win
//! shown); JSON lines then carry `"mode":"replay"`.
//!
//! ```sh
//! cargo run --release --example sim_baselines            # table
//! cargo run --release --example sim_baselines -- --json  # one object per line
//! cargo run --release --example sim_baselines -- --days 20 --delayed-ticks 48 --ratios 0.5,0.75
//! cargo run --release --example sim_baselines -- --replay --json
//! # with two hindsight bounds beside them (replay only; not policies: they
//! # know each day's prices in advance): `hindsight`, the best constant bid
//! # of the day, and `hindsight_lp`, OnlineLP re-solved each tick on the
//! # day's actual remaining PVs
//! cargo run --release --example sim_baselines -- --replay --hindsight --days 60
//! # the recurring market (same population every day) and `history_lp`,
//! # OnlineLP solved on 20 past days' prices (seeds 2000..2020), beside them
//! cargo run --release --example sim_baselines -- --presets sparse,recurring --history 20
//! # `structure_lp`, a bound beside them (not a policy: it knows the day's
//! # market): OnlineLP solved on N other draws of each scored day's own
//! # market (same advertisers, budgets, CPA targets, traffic and pValue
//! # levels; other PVs, other competitor bid draws), the most a forecast of
//! # the day's structure can give an LP bidder
//! # `--window 6` adds `window_lp`: history_lp reading the rest of the
//! # current 4-hour window from today's prices (a runnable policy);
//! # `--score` adds `score_lp` and `saa_lp`: each tick the bid of highest
//! # expected day score (not OnlineLP's CPA guard) on the mean past day,
//! # and averaged over each past day (runnable policies)
//! # Beside it `population_lp`, OnlineLP on N days of the day's advertisers
//! # with fresh levels (what knowing today's competitors is worth), and
//! # `prefix_lp` (needs `--history`): OnlineLP that knows the day's market
//! # on the 4-hour windows begun so far and reads the rest from the history
//! # (what a bidder could at best infer today, since later windows' levels
//! # are fresh draws); `prefix_pop_lp` reads the rest from the population's
//! # days instead (and so knows today's competitors as well)
//! cargo run --release --example sim_baselines -- --presets sparse --history 20 --structure 10 --days 60
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nann::tar::sim::{
    mean_ci95, run_episode, run_replay, ConstantPolicy, DayContext, HindsightLpPolicy,
    HistoryLpPolicy, MarketLog, Observation, OnlineLpPolicy, PidPolicy, Policy, Preset,
    PriceHistory, PriceMemory, RecurringMarket, ScoreLpPolicy, SimConfig, SimError,
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

/// `--structure N`: bids each scored day with a [`HistoryLpPolicy`] whose
/// history is N other draws of that day's own market (see the module
/// docs); one policy per day, in day order.
struct PerDay {
    name: &'static str,
    days: Vec<HistoryLpPolicy>,
    day: usize,
}

impl Policy for PerDay {
    fn name(&self) -> &str {
        self.name
    }
    fn begin_day(&mut self, day: &DayContext<'_>) {
        let i = self.day.min(self.days.len().saturating_sub(1));
        if let Some(policy) = self.days.get_mut(i) {
            policy.begin_day(day);
        }
        self.day += 1;
    }
    fn act(&mut self, obs: &Observation<'_>) -> f64 {
        let i = self
            .day
            .saturating_sub(1)
            .min(self.days.len().saturating_sub(1));
        self.days.get_mut(i).map_or(obs.cpa_target, |p| p.act(obs))
    }
}

/// `--structure N` (`prefix_lp`, `prefix_pop_lp`): OnlineLP (as
/// [`HistoryLpPolicy`] bids it) priced, at tick t, on the day's own market
/// up to the end of the 4-hour window t is in and on another history after
/// it (past days', or the day's population's). One spliced history per day
/// and window.
struct PrefixLp {
    name: &'static str,
    /// `days[d][w]`: day d's market up to the end of window w, then the
    /// history.
    days: Vec<Vec<PriceHistory>>,
    /// Ticks per 4-hour window.
    window: usize,
    day: usize,
    prices: PriceMemory,
    alpha: f64,
    /// The CPA guard's stop, in CPA targets.
    cpa_factor: f64,
}

impl Policy for PrefixLp {
    fn name(&self) -> &str {
        self.name
    }
    fn begin_day(&mut self, day: &DayContext<'_>) {
        self.day += 1;
        self.prices = PriceMemory::new(day.ticks);
        self.window = (day.ticks / 6).max(1);
        self.alpha = day.cpa_target;
    }
    fn act(&mut self, obs: &Observation<'_>) -> f64 {
        let cap = 1.3 * obs.cpa_target;
        if let Some(last) = obs.last {
            self.prices.observe(&last, self.alpha);
        }
        let Some(windows) = self.days.get(self.day.saturating_sub(1)) else {
            return obs.cpa_target;
        };
        let w = (obs.tick / self.window).min(windows.len().saturating_sub(1));
        let k = self.prices.markup() * self.prices.exposure_rate();
        self.alpha = windows
            .get(w)
            .and_then(|h| h.threshold(obs.tick, obs.remaining, obs.cpa_target * self.cpa_factor, k))
            .map_or(cap, |a| a.min(cap));
        self.alpha
    }
}

/// N draws of day `seed`'s market other than the day itself: the same
/// advertisers and levels (a recurring market whose population is the day,
/// without day noise, which is the day's own market), other PV draws; with
/// `fresh_levels`, only the same advertisers (every level drawn afresh).
fn structure_history(
    day: &SimConfig,
    seed: u64,
    n: u64,
    fresh_levels: bool,
) -> Result<PriceHistory, SimError> {
    let same = day.clone().with_recurring(Some(RecurringMarket {
        population_seed: seed,
        day_noise: 0.0,
        fresh_levels,
    }));
    let first = if fresh_levels { 9_500_000 } else { 9_000_000 };
    let draws = (0..n)
        .map(|k| MarketLog::record(&same, first + seed * 100 + k))
        .collect::<Result<Vec<_>, _>>()?;
    PriceHistory::from_logs(&draws)
}

/// The [`PrefixLp`] of `structure` (one history per day) spliced, at the
/// end of every 4-hour window of a `ticks`-tick day, onto `later(d)`.
fn prefix_lp<'h>(
    name: &'static str,
    structure: &[Arc<PriceHistory>],
    later: impl Fn(usize) -> &'h PriceHistory,
    ticks: usize,
    cpa_factor: f64,
) -> Result<PrefixLp, SimError> {
    let window = (ticks / 6).max(1);
    Ok(PrefixLp {
        name,
        days: structure
            .iter()
            .enumerate()
            .map(|(d, day)| {
                (1..=6)
                    .map(|w| day.splice(later(d), w * window))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?,
        window,
        day: 0,
        prices: PriceMemory::new(ticks),
        alpha: 0.0,
        cpa_factor,
    })
}

/// [`HistoryLpPolicy`] on one history per day, in day order.
fn per_day(name: &'static str, histories: &[Arc<PriceHistory>], cpa_factor: f64) -> PerDay {
    PerDay {
        name,
        days: histories
            .iter()
            .map(|h| HistoryLpPolicy::new([h.clone()]).with_cpa_factor(cpa_factor))
            .collect(),
        day: 0,
    }
}

/// OnlineLP with its CPA guard at `cpa_factor` targets.
fn onlinelp(cpa_factor: f64) -> OnlineLpPolicy {
    let mut policy = OnlineLpPolicy::default();
    policy.cpa_factor = cpa_factor;
    policy
}

/// One row of the table: mean score, its 95% CI, mean spend ratio, µs per
/// decision, and each day's score (for paired differences).
struct Cell {
    score: f64,
    ci: f64,
    spend: f64,
    us: f64,
    scores: Vec<f64>,
}

/// Scores `policy` on the live days `1000..1000 + days`, or, given `logs`,
/// replayed on them; day `i` bids for advertiser `agents[i]`.
fn run<P: Policy>(
    config: &SimConfig,
    agents: &[usize],
    policy: P,
    logs: Option<&[MarketLog]>,
) -> Result<Cell, SimError> {
    let mut timed = Timed {
        inner: policy,
        elapsed: Duration::ZERO,
        decisions: 0,
    };
    let mut outcomes = Vec::with_capacity(agents.len());
    for (i, &agent) in agents.iter().enumerate() {
        let day = config.clone().with_agent(agent);
        outcomes.push(match logs.and_then(|logs| logs.get(i)) {
            Some(log) => run_replay(&day, log, log.seed(), &mut timed)?.outcome,
            // Seeds from 1000: days the tests do not use.
            None => run_episode(&day, 1000 + i as u64, &mut timed)?
                .agent_outcome()
                .clone(),
        });
    }
    let scores: Vec<f64> = outcomes.iter().map(|o| o.score).collect();
    let (score, ci) = mean_ci95(&scores);
    let spend =
        outcomes.iter().map(|o| o.cost / o.budget).sum::<f64>() / agents.len().max(1) as f64;
    let us = timed.elapsed.as_secs_f64() * 1e6 / timed.decisions.max(1) as f64;
    Ok(Cell {
        score,
        ci,
        spend,
        us,
        scores,
    })
}

fn main() -> Result<(), SimError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let replay = args.iter().any(|a| a == "--replay");
    let hindsight = replay && args.iter().any(|a| a == "--hindsight");
    // The word after flag `name`, if any.
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    let value = |name: &str| arg(name).and_then(|v| v.parse::<u64>().ok());
    let float = |name: &str| arg(name).and_then(|v| v.parse::<f64>().ok());
    let days = value("--days").unwrap_or(8);
    // `--agent A`: the advertiser bid for (0, the first of category 0, by
    // default; the first of each category has no pValue factor of its own);
    // `--agent cycle`: day i bids for advertiser 7i mod 48, as tar_eval's
    // test cells do.
    let agent_arg = arg("--agent");
    let agents: Vec<usize> = (0..days)
        .map(|i| match agent_arg {
            Some("cycle") => ((i * 7) % 48) as usize,
            Some(a) => a.parse().unwrap_or(usize::MAX),
            None => 0,
        })
        .collect();
    let agent_name = match agent_arg {
        Some("cycle") => "7i mod 48 on day i".to_string(),
        _ => agents.first().copied().unwrap_or(0).to_string(),
    };
    // The baselines never read conversions, so at equal ticks the delayed
    // preset would reproduce the sparse rows exactly; by default it runs at
    // 288 ticks a day (5-minute decisions), the DelaySim setting.
    let ticks = value("--ticks").unwrap_or(48) as usize;
    let delayed_ticks = value("--delayed-ticks").unwrap_or(288) as usize;
    // `--history N`: a `history_lp` row, OnlineLP on N past days' prices.
    let history_days = value("--history").unwrap_or(0);
    // `--window W` (with `--history`): a `window_lp` row, history_lp that
    // reads the rest of the current window (one of W a day) from today's
    // prices.
    let windows = value("--window").unwrap_or(0) as usize;
    // `--score` (with `--history`): `score_lp` and `saa_lp` rows, the bid
    // of highest expected day score on the mean past day and averaged over
    // each past day (see `ScoreLpPolicy`).
    let score_rows = args.iter().any(|a| a == "--score");
    // `--structure N`: a `structure_lp` row, OnlineLP on N other draws of
    // each scored day's own market (a bound, see the module docs).
    let structure_draws = value("--structure").unwrap_or(0);
    // `--level W`: history_lp scales the history's prices by today's level
    // over the history's to the power W (0: the pure history).
    let level = float("--level").unwrap_or(0.0);
    // `--cpa-factor K`: the LP bidders' CPA guard stops at K CPA targets
    // (onlinelp, history_lp, structure_lp, prefix_lp, hindsight_lp; 1 = the
    // target).
    let cpa_factor = float("--cpa-factor")
        .filter(|k| k.is_finite() && *k > 0.0)
        .unwrap_or(1.0);
    let presets: Vec<Preset> = match args.iter().position(|a| a == "--presets") {
        Some(_) => arg("--presets")
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
    // `--ratios a,b,..`: the budget ratios (default 0.5, 0.75, 1.0, 1.25, 1.5).
    let ratios: Vec<f64> = match args.iter().position(|a| a == "--ratios") {
        Some(_) => arg("--ratios")
            .unwrap_or("")
            .split(',')
            .map(|r| {
                r.parse::<f64>().map_err(|_| SimError::Config {
                    field: "budget_ratio",
                    message: format!("`{r}` is not a number"),
                })
            })
            .collect::<Result<_, _>>()?,
        None => vec![0.5, 0.75, 1.0, 1.25, 1.5],
    };
    let start = Instant::now();
    if !json {
        println!(
            "agent = advertiser {agent_name} of 48, {days} days per cell, 50k PVs a day, \
             {ticks} ticks a day (sparse), {delayed_ticks} (delayed, mean delay 2 h)"
        );
        if replay {
            println!(
                "offline replay: each day's market as advertiser {agent_name} saw it live, \
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
        let day = SimConfig::preset(preset).with_ticks(t);
        let logs = if replay {
            Some(
                (1000..1000 + days)
                    .zip(&agents)
                    .map(|(seed, &a)| MarketLog::record(&day.clone().with_agent(a), seed))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        } else {
            None
        };
        // `--history N`: each agent's past days (seeds 2000.., apart from
        // the days scored).
        // With `--score`, also one history per past day (the scenarios).
        type Histories = (Arc<PriceHistory>, Vec<Arc<PriceHistory>>);
        let histories: HashMap<usize, Histories> = if history_days > 0 {
            let mut distinct = agents.clone();
            distinct.sort_unstable();
            distinct.dedup();
            distinct
                .into_iter()
                .map(|a| {
                    let past = (2000..2000 + history_days)
                        .map(|seed| MarketLog::record(&day.clone().with_agent(a), seed))
                        .collect::<Result<Vec<_>, _>>()?;
                    let singles = if score_rows {
                        past.iter()
                            .map(|d| PriceHistory::from_logs(std::slice::from_ref(d)).map(Arc::new))
                            .collect::<Result<Vec<_>, _>>()?
                    } else {
                        Vec::new()
                    };
                    Ok((a, (Arc::new(PriceHistory::from_logs(&past)?), singles)))
                })
                .collect::<Result<_, SimError>>()?
        } else {
            HashMap::new()
        };
        let history: HashMap<usize, Arc<PriceHistory>> = histories
            .iter()
            .map(|(&a, (mean, _))| (a, mean.clone()))
            .collect();
        // `--structure N`: per scored day, N draws of its own market, and N
        // of its population with fresh levels.
        let (structure, population) = if structure_draws > 0 {
            let draws = |fresh: bool| {
                (1000..1000 + days)
                    .zip(&agents)
                    .map(|(seed, &a)| {
                        let day = day.clone().with_agent(a);
                        structure_history(&day, seed, structure_draws, fresh).map(Arc::new)
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            (Some(draws(false)?), Some(draws(true)?))
        } else {
            (None, None)
        };
        // `--hindsight`: the logs shared once with the bidders that know them.
        let shared: Vec<Arc<MarketLog>> = match (&logs, hindsight) {
            (Some(logs), true) => logs.iter().cloned().map(Arc::new).collect(),
            _ => Vec::new(),
        };
        let logs = logs.as_deref();
        for &ratio in &ratios {
            let config = day.clone().with_budget_ratio(ratio);
            let mut rows = vec![
                ("pid", run(&config, &agents, PidPolicy::default(), logs)?),
                (
                    "onlinelp",
                    run(&config, &agents, onlinelp(cpa_factor), logs)?,
                ),
                (
                    "constant",
                    run(&config, &agents, ConstantPolicy::default(), logs)?,
                ),
            ];
            if !history.is_empty() {
                let policy = HistoryLpPolicy::new(history.values().cloned())
                    .with_level_weight(level)
                    .with_cpa_factor(cpa_factor);
                rows.push(("history_lp", run(&config, &agents, policy, logs)?));
                if windows > 0 {
                    let policy = HistoryLpPolicy::new(history.values().cloned())
                        .with_window_reading(windows)
                        .with_cpa_factor(cpa_factor);
                    rows.push(("window_lp", run(&config, &agents, policy, logs)?));
                }
                if score_rows {
                    let policy = ScoreLpPolicy::new(history.values().cloned());
                    rows.push(("score_lp", run(&config, &agents, policy, logs)?));
                    let scenarios = histories
                        .values()
                        .flat_map(|(_, days)| days.iter().cloned());
                    let policy = ScoreLpPolicy::new(scenarios);
                    rows.push(("saa_lp", run(&config, &agents, policy, logs)?));
                }
            }
            if let (Some(structure), Some(population)) = (&structure, &population) {
                let policy = per_day("structure_lp", structure, cpa_factor);
                rows.push(("structure_lp", run(&config, &agents, policy, logs)?));
                let policy = per_day("population_lp", population, cpa_factor);
                rows.push(("population_lp", run(&config, &agents, policy, logs)?));
                if !history.is_empty() {
                    let policy = prefix_lp(
                        "prefix_lp",
                        structure,
                        |d| &history[&agents[d]],
                        t,
                        cpa_factor,
                    )?;
                    rows.push(("prefix_lp", run(&config, &agents, policy, logs)?));
                }
                let policy = prefix_lp(
                    "prefix_pop_lp",
                    structure,
                    |d| &population[d],
                    t,
                    cpa_factor,
                )?;
                rows.push(("prefix_pop_lp", run(&config, &agents, policy, logs)?));
            }
            if let (true, Some(logs)) = (hindsight, logs) {
                let bound = Hindsight {
                    factors: logs.iter().map(|l| l.best_constant(ratio).0).collect(),
                    day: 0,
                    alpha: 0.0,
                };
                rows.push(("hindsight", run(&config, &agents, bound, Some(logs))?));
                // One replay per log, each with the bidder that knows it.
                let mut scores = Vec::with_capacity(logs.len());
                let (mut spend, mut elapsed) = (0.0, Duration::ZERO);
                for (log, &a) in shared.iter().zip(&agents) {
                    let mut bound = HindsightLpPolicy::new(log.clone()).with_cpa_factor(cpa_factor);
                    let start = Instant::now();
                    let day =
                        run_replay(&config.clone().with_agent(a), log, log.seed(), &mut bound)?;
                    elapsed += start.elapsed();
                    spend += day.outcome.cost / day.outcome.budget.max(1e-9);
                    scores.push(day.outcome.score);
                }
                let (mean, ci) = mean_ci95(&scores);
                let us = elapsed.as_secs_f64() * 1e6 / (logs.len() * config.ticks).max(1) as f64;
                let cell = Cell {
                    score: mean,
                    ci,
                    spend: spend / logs.len() as f64,
                    us,
                    scores,
                };
                rows.push(("hindsight_lp", cell));
            }
            let history_scores = rows
                .iter()
                .find(|(name, _)| *name == "history_lp")
                .map(|(_, cell)| cell.scores.clone());
            for (name, cell) in rows {
                let Cell {
                    score,
                    ci,
                    spend,
                    us,
                    ..
                } = cell;
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
                    // The bounds' paired difference from history_lp.
                    if let (
                        Some(base),
                        "window_lp" | "score_lp" | "saa_lp" | "structure_lp" | "population_lp"
                        | "prefix_lp" | "prefix_pop_lp" | "hindsight_lp",
                    ) = (&history_scores, name)
                    {
                        let diff: Vec<f64> =
                            cell.scores.iter().zip(base).map(|(a, b)| a - b).collect();
                        let (d, dci) = mean_ci95(&diff);
                        let base_mean = base.iter().sum::<f64>() / base.len().max(1) as f64;
                        println!(
                            "{:<12} {:>+7.2} ± {:.2} ({:+.1}%) paired against history_lp",
                            "",
                            d,
                            dci,
                            100.0 * d / base_mean.max(1e-9)
                        );
                    }
                }
            }
        }
    }
    if !json {
        println!("wall time {:.1} s", start.elapsed().as_secs_f64());
    }
    Ok(())
}
