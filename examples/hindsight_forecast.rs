//! How much of the hindsight headroom can a bidder *learn* to reach, and
//! does TAR's plan help? (issue 7, fourteenth session's diagnostic)
//!
//! OnlineLP re-solved every tick on the day's actual remaining PVs
//! (`nann::tar::sim::HindsightLpPolicy`) scores far above OnlineLP, which
//! solves the same problem on a forecast made from the prices seen so far
//! (`sim_baselines --replay --hindsight`). So the gap is the forecast. This
//! example fits that forecast from past days: a least-squares model of the
//! hindsight LP's threshold (in log CPA units) at each tick from what a
//! bidder knows then (the thresholds of a recent and a whole-day
//! `PriceMemory`, time and budget left, budget / CPA, the CPA level), on
//! training days (seeds 10,000+) replayed offline, with DAgger rounds (round
//! `r` collects the states the round `r - 1` bidder visits). The fitted
//! bidder then plays the validation days (seeds 2,000,000+), replayed and
//! live, beside OnlineLP.
//!
//! With `--tar DIR` the TAR policy of `DIR/tar-sparse.safetensors`
//! (`tar_eval`'s default reading: its plan's rest-of-day spend priced with
//! the day's prices under OnlineLP's CPA guard) runs beside the bidder every
//! tick and its bid is two more features: if the plan knew something about
//! the rest of the day that the prices seen do not, the fit would use them.
//!
//! With `--history N` (fifteenth session) each advertiser's mean of N past
//! days (`nann::tar::sim::PriceHistory`, seeds 3,000,000+) gives two more
//! features, `HistoryLpPolicy`'s spend and CPA thresholds, and the table
//! adds `history_lp` itself: what the prices seen *today* add to a
//! forecast that already has the past days is the headroom a learned
//! bidder has over `history_lp`.
//!
//! ```sh
//! cargo run --release --example hindsight_forecast
//! cargo run --release --example hindsight_forecast -- --history 10
//! cargo run --release --features train --example tar_eval -- --presets sparse --variants tar --save target/tar-weights2
//! cargo run --release --example hindsight_forecast -- --tar target/tar-weights2
//! ```

use std::error::Error;
use std::sync::Arc;

use nann::tar::data::{DataConfig, Dataset};
use nann::tar::model::{GenerateOptions, TarModel};
use nann::tar::sim::{
    run_episode, run_replay, DayContext, HindsightLpPolicy, HistoryLpPolicy, MarketLog,
    Observation, OnlineLpPolicy, Policy, PriceHistory, PriceMemory, SimConfig,
};
use nann::tar::{MarketReading, TarPolicy};

/// Features: 12 from the prices seen and the day, 2 from TAR's bid, 2
/// from the past days' prices (zero when absent).
const FEATURES: usize = 16;
const CAP: f64 = 1.3;

/// The bidder: OnlineLP until it has weights, then `exp(w . features) x CPA`.
struct Forecaster<'a> {
    weights: Option<[f64; FEATURES]>,
    recent: PriceMemory,
    whole_day: PriceMemory,
    lp: OnlineLpPolicy,
    tar: Option<TarPolicy>,
    /// Past days' prices per advertiser (`--history`), and today's.
    histories: &'a [Arc<PriceHistory>],
    history: Option<Arc<PriceHistory>>,
    share: Vec<f64>,
    pvs_per_tick: f64,
    budget: f64,
    alpha: f64,
    /// With a log: record (features, log of the hindsight LP's threshold).
    label_from: Option<(&'a MarketLog, HindsightLpPolicy)>,
    rows: Vec<([f64; FEATURES], f64)>,
}

impl<'a> Forecaster<'a> {
    fn new(
        weights: Option<[f64; FEATURES]>,
        tar: Option<TarPolicy>,
        histories: &'a [Arc<PriceHistory>],
        sim: &SimConfig,
    ) -> Self {
        let ticks = sim.ticks;
        Self {
            weights,
            recent: PriceMemory::new(ticks),
            whole_day: PriceMemory::with_rates(ticks, 1.0, 0.8),
            lp: OnlineLpPolicy::default(),
            tar,
            histories,
            history: None,
            share: Vec::new(),
            pvs_per_tick: sim.pvs_per_day as f64 / ticks.max(1) as f64,
            budget: 0.0,
            alpha: 0.0,
            label_from: None,
            rows: Vec::new(),
        }
    }

    fn features(&self, obs: &Observation<'_>, tar_alpha: Option<f64>) -> [f64; FEATURES] {
        let cpa = obs.cpa_target.max(1e-9);
        let rest: f64 = self.share.get(obs.tick..).map_or(0.0, |s| s.iter().sum());
        let rest_pvs = (rest * self.pvs_per_tick * self.share.len() as f64).round() as usize;
        let log_cpa = |x: Option<f64>| (x.unwrap_or(CAP * cpa) / cpa).clamp(0.01, 3.0).ln();
        let spend_recent = log_cpa(self.recent.bid_for_spend(obs.remaining, rest_pvs));
        let guard_recent = log_cpa(self.recent.cpa_threshold(cpa));
        let spend_day = log_cpa(self.whole_day.bid_for_spend(obs.remaining, rest_pvs));
        let guard_day = log_cpa(self.whole_day.cpa_threshold(cpa));
        let time_left = (obs.ticks - obs.tick) as f64 / obs.ticks.max(1) as f64;
        let budget_left = obs.remaining / self.budget.max(1e-9);
        let tar = tar_alpha.map_or(0.0, |a| log_cpa(Some(a)));
        // The history LP's two thresholds, costs projected as it does.
        let (spend_past, guard_past) = match &self.history {
            Some(h) => {
                let k = self.recent.markup() * self.recent.exposure_rate();
                (
                    log_cpa(h.threshold(obs.tick, obs.remaining, f64::INFINITY, k)),
                    log_cpa(h.threshold(obs.tick, f64::INFINITY, cpa, k)),
                )
            }
            None => (0.0, 0.0),
        };
        [
            1.0,
            spend_recent,
            guard_recent,
            spend_day,
            guard_day,
            spend_recent.min(guard_recent),
            spend_day.min(guard_day),
            time_left,
            budget_left,
            (self.budget / cpa).ln(),
            cpa / 100.0,
            budget_left - rest,
            tar,
            if tar_alpha.is_some() {
                tar.min(guard_recent)
            } else {
                0.0
            },
            spend_past,
            guard_past,
        ]
    }
}

impl Policy for Forecaster<'_> {
    fn name(&self) -> &str {
        "forecaster"
    }
    fn begin_day(&mut self, day: &DayContext<'_>) {
        self.recent.clear();
        self.whole_day.clear();
        self.lp.begin_day(day);
        if let Some(tar) = &mut self.tar {
            tar.begin_day(day);
        }
        self.share = day.traffic_share.to_vec();
        self.budget = day.budget;
        self.alpha = day.cpa_target;
        self.history = self
            .histories
            .iter()
            .find(|h| h.advertiser() == day.advertiser)
            .cloned();
        if let Some((_, label)) = &mut self.label_from {
            label.begin_day(day);
        }
    }
    fn act(&mut self, obs: &Observation<'_>) -> f64 {
        if let Some(last) = &obs.last {
            self.recent.observe(last, self.alpha);
            self.whole_day.observe(last, self.alpha);
        }
        // OnlineLP and TAR decide beside the bidder without bidding; their
        // markups are calibrated on their own alphas against the cost the
        // bidder was charged (close while the bids are close).
        let lp = self.lp.act(obs);
        let tar = self.tar.as_mut().map(|t| t.act(obs));
        if obs.last.is_none() {
            self.alpha = obs.cpa_target;
            return self.alpha;
        }
        let x = self.features(obs, tar);
        if let Some((_, label)) = &mut self.label_from {
            let target = label.act(obs) / obs.cpa_target.max(1e-9);
            self.rows.push((x, target.max(0.01).ln()));
        }
        self.alpha = match &self.weights {
            Some(w) => {
                let log_alpha: f64 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
                log_alpha.exp().min(CAP) * obs.cpa_target
            }
            None => lp,
        };
        self.alpha
    }
}

/// Ridge least squares (`lambda` x rows on the diagonal, intercept free);
/// returns the weights and R^2 on the rows.
fn fit(rows: &[([f64; FEATURES], f64)], lambda: f64) -> ([f64; FEATURES], f64) {
    let mut a = [[0.0f64; FEATURES + 1]; FEATURES];
    for (x, y) in rows {
        for r in 0..FEATURES {
            for c in 0..FEATURES {
                a[r][c] += x[r] * x[c];
            }
            a[r][FEATURES] += x[r] * y;
        }
    }
    for (r, row) in a.iter_mut().enumerate().skip(1) {
        row[r] += lambda * rows.len() as f64;
    }
    // Gauss-Jordan (the matrix is symmetric positive definite).
    for i in 0..FEATURES {
        let pivot = a[i][i];
        a[i].iter_mut().for_each(|v| *v /= pivot);
        let pivot_row = a[i];
        for (r, row) in a.iter_mut().enumerate() {
            if r != i {
                let f = row[i];
                row.iter_mut()
                    .zip(&pivot_row)
                    .for_each(|(v, p)| *v -= f * p);
            }
        }
    }
    let w: [f64; FEATURES] = std::array::from_fn(|i| a[i][FEATURES]);
    let mean = rows.iter().map(|r| r.1).sum::<f64>() / rows.len().max(1) as f64;
    let (mut total, mut residual) = (0.0, 0.0);
    for (x, y) in rows {
        let p: f64 = w.iter().zip(x).map(|(a, b)| a * b).sum();
        total += (y - mean).powi(2);
        residual += (y - p).powi(2);
    }
    (w, 1.0 - residual / total.max(1e-12))
}

/// Agent of day `i`: cycles through all 48 advertisers (as `tar_eval`).
fn agent_of(i: u64) -> usize {
    ((i * 7) % 48) as usize
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let days: u64 = value("--days").map_or(Ok(60), |v| v.parse())?;
    let train_days: u64 = value("--train-days").map_or(Ok(300), |v| v.parse())?;
    let rounds: usize = value("--rounds").map_or(Ok(3), |v| v.parse())?;
    let sim = SimConfig::sparse().with_ticks(48);
    let pvs_per_tick = sim.pvs_per_day as f64 / sim.ticks as f64;

    // TAR as tar_eval builds it by default (target: the 0.9 quantile of the
    // efficiency of tar_eval's 600-day log).
    let tar = match value("--tar") {
        Some(dir) => {
            let data = Dataset::collect(
                &sim,
                &DataConfig {
                    episodes: 600,
                    ..DataConfig::default()
                },
            )?;
            let target = data.attribute_quantile(0, 0.9);
            let model = Arc::new(TarModel::load(format!("{dir}/tar-sparse.safetensors"))?);
            let options = GenerateOptions {
                top_p: 0.9,
                guidance: 2.0,
                ..GenerateOptions::default()
            };
            Some(
                TarPolicy::new(model, target, pvs_per_tick)
                    .with_constraints(1.0, 1.0)
                    .with_options(options)
                    .with_seed(1)
                    .with_market_reading(MarketReading::RestOfDay { cpa_guard: true }, sim.ticks),
            )
        }
        None => None,
    };
    // `--history N`: N past days of every advertiser (seeds 3,000,000 +
    // 10,000 a + k, as tar_eval's).
    let history_days: u64 = value("--history").map_or(Ok(0), |v| v.parse())?;
    let histories: Vec<Arc<PriceHistory>> = if history_days > 0 {
        (0..48usize)
            .map(|a| {
                let day = sim.clone().with_agent(a);
                let past = (0..history_days)
                    .map(|k| MarketLog::record(&day, 3_000_000 + a as u64 * 10_000 + k))
                    .collect::<Result<Vec<_>, _>>()?;
                PriceHistory::from_logs(&past).map(Arc::new)
            })
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let ratios = [0.5, 0.75];
    // Shared with the labelling bidders (no copy of a day per replay).
    let train: Vec<Arc<MarketLog>> = (0..train_days)
        .map(|i| MarketLog::record(&sim.clone().with_agent(agent_of(i)), 10_000 + i).map(Arc::new))
        .collect::<Result<_, _>>()?;
    let valid: Vec<MarketLog> = (0..days)
        .map(|i| MarketLog::record(&sim.clone().with_agent(agent_of(i)), 2_000_000 + i))
        .collect::<Result<_, _>>()?;
    println!(
        "sparse, {train_days} training days x ratios {ratios:?}, {days} validation days, TAR feature: {}, history days: {history_days}",
        tar.is_some()
    );

    let mut rows = Vec::new();
    let mut weights = None;
    for round in 0..rounds {
        for (i, log) in train.iter().enumerate() {
            for &ratio in &ratios {
                let config = sim
                    .clone()
                    .with_agent(agent_of(i as u64))
                    .with_budget_ratio(ratio);
                let mut bidder = Forecaster::new(weights, tar.clone(), &histories, &sim);
                let label = HindsightLpPolicy::new(log.clone());
                bidder.label_from = Some((log, label));
                run_replay(&config, log, log.seed(), &mut bidder)?;
                rows.extend(bidder.rows);
            }
        }
        let (w, r2) = fit(&rows, 1e-3);
        weights = Some(w);
        println!(
            "round {round}: {} rows, R^2 {r2:.3}, TAR weights {:.3} {:.3}, history weights {:.3} {:.3}",
            rows.len(),
            w[12],
            w[13],
            w[14],
            w[15]
        );
    }
    for &ratio in &ratios {
        let (mut replay, mut replay_lp, mut live, mut live_lp) = (0.0, 0.0, 0.0, 0.0);
        let (mut replay_h, mut live_h) = (0.0, 0.0);
        for (i, log) in valid.iter().enumerate() {
            let config = sim
                .clone()
                .with_agent(agent_of(i as u64))
                .with_budget_ratio(ratio);
            let mut bidder = Forecaster::new(weights, tar.clone(), &histories, &sim);
            replay += run_replay(&config, log, log.seed(), &mut bidder)?
                .outcome
                .score;
            let mut lp = OnlineLpPolicy::default();
            replay_lp += run_replay(&config, log, log.seed(), &mut lp)?.outcome.score;
            let mut bidder = Forecaster::new(weights, tar.clone(), &histories, &sim);
            live += run_episode(&config, log.seed(), &mut bidder)?
                .agent_outcome()
                .score;
            let mut lp = OnlineLpPolicy::default();
            live_lp += run_episode(&config, log.seed(), &mut lp)?
                .agent_outcome()
                .score;
            if !histories.is_empty() {
                let mut h = HistoryLpPolicy::new(histories.iter().cloned());
                replay_h += run_replay(&config, log, log.seed(), &mut h)?.outcome.score;
                let mut h = HistoryLpPolicy::new(histories.iter().cloned());
                live_h += run_episode(&config, log.seed(), &mut h)?
                    .agent_outcome()
                    .score;
            }
        }
        let n = days.max(1) as f64;
        println!(
            "ratio {ratio}: replay forecaster {:.2} vs onlinelp {:.2} ({:+.1}%), live {:.2} vs {:.2} ({:+.1}%)",
            replay / n,
            replay_lp / n,
            100.0 * (replay / replay_lp - 1.0),
            live / n,
            live_lp / n,
            100.0 * (live / live_lp - 1.0)
        );
        if !histories.is_empty() {
            println!(
                "ratio {ratio}: history_lp replay {:.2}, live {:.2}; forecaster / history_lp {:+.1}% replay, {:+.1}% live",
                replay_h / n,
                live_h / n,
                100.0 * (replay / replay_h - 1.0),
                100.0 * (live / live_h - 1.0)
            );
        }
    }
    Ok(())
}
