//! Trajectory data for the learned bidders (TAR, DT): days played in the
//! simulator by diverse behaviour policies, cut into per-advertiser
//! trajectories of augmented steps.
//!
//! The learned bidders are trained offline, as in AuctionNet: a log of many
//! advertisers' days under many bidding policies, each day summarised by
//! attributes (how well it went, the budget, the CPA target) that the
//! models are conditioned on. At decision time a model is asked for a day
//! that goes *well*; what "well" means is read from the same data
//! ([`Dataset::attribute_quantile`]).
//!
//! ```text
//!  seed ─► Market ─► run_episode (agent: a random Behaviour, others: population)
//!                        │
//!                        ▼ records_of(agent), records_of(a few others)
//!             Trajectory { steps x_t = [features(s_t) ; a_{t-1}/CPA], actions, rewards,
//!                          score, attributes }
//! ```
//!
//! Features are made scale-free before the models' own normalisation: bids
//! and least winning costs are divided by the CPA target, pValues and
//! conversion rates multiplied by 100, PV counts divided by the expected
//! PVs per tick.

use super::model::{ATTRIBUTES, STEP_FEATURES};
use std::sync::Arc;

use super::sim::{
    run_episode, ConstantPolicy, DayContext, HindsightLpPolicy, MarketLog, Observation,
    OnlineLpPolicy, PidPolicy, Policy, SimConfig, SimError, StepState,
};

/// One advertiser's day.
#[derive(Debug, Clone, PartialEq)]
pub struct Trajectory {
    /// The advertiser (index in the day's market).
    pub advertiser: usize,
    /// Its budget that day.
    pub budget: f64,
    /// Its CPA target.
    pub cpa_target: f64,
    /// Augmented steps `x_t = [features(s_t) ; a_{t-1} / CPA]`, raw (not
    /// normalised); `a_{-1} = 0`.
    pub steps: Vec<[f32; STEP_FEATURES]>,
    /// `alpha_t / CPA target` per tick: the action the policy took.
    pub actions: Vec<f32>,
    /// True conversions per tick (the reward).
    pub rewards: Vec<f32>,
    /// Cost per tick.
    pub costs: Vec<f32>,
    /// The day's score (`min(1, (CPA_target / CPA)^2) x conversions`).
    pub score: f64,
    /// [`attributes`] of the day.
    pub attributes: [f32; ATTRIBUTES],
}

/// The scale-free step features of `state` with the previous action
/// (`alpha_{t-1} / CPA target`; 0 before the first tick).
///
/// `pvs_per_tick` is the day's expected PVs per tick (PVs a day / ticks):
/// PV counts are divided by it so 48- and 288-tick days look alike.
pub fn step_features(
    state: &StepState,
    prev_action: f64,
    cpa_target: f64,
    pvs_per_tick: f64,
) -> [f32; STEP_FEATURES] {
    let s = state.to_array();
    let cpa = cpa_target.max(1e-9);
    let pvs = pvs_per_tick.max(1e-9);
    let mut x = [0f32; STEP_FEATURES];
    // time_left, budget_left: already in [0, 1].
    x[0] = s[0] as f32;
    x[1] = s[1] as f32;
    // Bids and least winning costs in CPA units.
    for i in [2, 3, 4, 8] {
        x[i] = (s[i] / cpa) as f32;
    }
    // pValues and conversion rates, per 100 PVs.
    for i in [5, 6, 9, 10, 12] {
        x[i] = (s[i] * 100.0) as f32;
    }
    // Win rates.
    x[7] = s[7] as f32;
    x[11] = s[11] as f32;
    // PV counts in expected ticks' worth.
    x[13] = (s[13] / pvs) as f32;
    x[14] = (s[14] / pvs) as f32;
    x[15] = (s[15] / pvs) as f32;
    x[16] = prev_action as f32;
    x
}

/// The attributes a day is summarised by and a model is conditioned on:
/// `[efficiency, spend ratio, CPA ratio, ln(budget / CPA)]`.
///
/// * efficiency = score x CPA target / budget: conversions won per
///   conversion the budget could buy at the target, with AuctionNet's
///   penalty: what a bidder wants;
/// * spend ratio = cost / budget and CPA ratio = realised CPA / target
///   (capped at 2; 2 for a day without conversions): the day's constraints,
///   so a bidder can ask for "the whole budget at the target CPA" (DiffBid
///   conditions on constraints the same way). Efficiency alone mixes the
///   bidder's skill with the market's luck; the constraints say what the
///   plan must do;
/// * ln(budget / CPA): how many conversions the budget buys, i.e. how
///   tightly the day must be rationed.
pub fn attributes(
    score: f64,
    budget: f64,
    cpa_target: f64,
    cost: f64,
    conversions: f64,
) -> [f32; ATTRIBUTES] {
    let cpa = cpa_target.max(1e-9);
    let budget = budget.max(1e-9);
    let cpa_ratio = if conversions > 0.0 {
        (cost / conversions / cpa).min(2.0)
    } else {
        2.0
    };
    [
        (score * cpa / budget) as f32,
        (cost / budget) as f32,
        cpa_ratio as f32,
        (budget / cpa).ln() as f32,
    ]
}

/// How a dataset is collected.
#[derive(Debug, Clone, PartialEq)]
pub struct DataConfig {
    /// Days played; day `i` uses seed `first_seed + i`.
    pub episodes: u64,
    /// Seed of the first day (keep training, validation and test days
    /// apart: the evaluations use seeds from 1,000,000).
    pub first_seed: u64,
    /// Trajectories of population advertisers (the built-in competitors)
    /// taken per day besides the agent's.
    pub population_per_episode: usize,
    /// The agent's budget ratio is drawn uniformly in this range.
    pub budget_ratio_range: (f64, f64),
    /// Worker threads (1 = run in the calling thread).
    pub threads: usize,
    /// Share of days (0..=1) on which the agent bids as
    /// [`HindsightLpPolicy`] on the day as
    /// the population played it (OnlineLP re-solved each tick on the day's
    /// actual remaining PVs), with the behaviour's log-normal noise, instead
    /// of a random behaviour: expert days in the log (hindsight
    /// relabelling), as AuctionNet's logs hold days of strong policies. The
    /// models still see only each day's observations; what the expert knew
    /// shows only in what it did. Default 0.
    pub hindsight_share: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            episodes: 400,
            first_seed: 0,
            population_per_episode: 4,
            budget_ratio_range: (0.4, 1.6),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            hindsight_share: 0.0,
        }
    }
}

/// A collection of trajectories.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    /// The trajectories, in day order (agent first within a day).
    pub trajectories: Vec<Trajectory>,
}

impl Dataset {
    /// Plays `data.episodes` days of `sim` and collects the trajectories.
    ///
    /// Day `seed`: the agent is advertiser `seed % advertisers` with budget
    /// ratio drawn from `data.budget_ratio_range` and a random
    /// [`Behaviour`]; the other advertisers run the population policy;
    /// `population_per_episode` of them (evenly spaced after the agent) are
    /// kept too. Deterministic in `data` and `sim` (not in `threads`).
    pub fn collect(sim: &SimConfig, data: &DataConfig) -> Result<Self, SimError> {
        sim.validate()?;
        let seeds: Vec<u64> = (0..data.episodes)
            .map(|i| data.first_seed.wrapping_add(i))
            .collect();
        let threads = data.threads.clamp(1, 64);
        let chunk = seeds.len().div_ceil(threads).max(1);
        let parts: Vec<Result<Vec<Trajectory>, SimError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = seeds
                .chunks(chunk)
                .map(|part| scope.spawn(move || collect_days(sim, data, part)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SimError::Config {
                            field: "threads",
                            message: "a collection thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        let mut trajectories = Vec::new();
        for part in parts {
            trajectories.extend(part?);
        }
        Ok(Self { trajectories })
    }

    /// The `q`-quantile (`0..=1`) of attribute `i` over the trajectories
    /// (0 for an empty set).
    pub fn attribute_quantile(&self, i: usize, q: f64) -> f32 {
        let mut v: Vec<f32> = self
            .trajectories
            .iter()
            .filter_map(|t| t.attributes.get(i).copied())
            .collect();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f32::total_cmp);
        let at = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        v[at]
    }
}

fn collect_days(
    sim: &SimConfig,
    data: &DataConfig,
    seeds: &[u64],
) -> Result<Vec<Trajectory>, SimError> {
    let n_adv = sim.advertisers();
    let pvs_per_tick = sim.pvs_per_day as f64 / sim.ticks as f64;
    let mut out = Vec::new();
    for &seed in seeds {
        let agent = (seed % n_adv as u64) as usize;
        let mut rng = SplitMix::new(seed ^ 0x7a12_0000_0000_0001);
        let (lo, hi) = data.budget_ratio_range;
        let ratio = lo + (hi - lo) * rng.uniform();
        let config = sim.clone().with_agent(agent).with_budget_ratio(ratio);
        let mut behaviour = Behaviour::random(&mut rng);
        // A stream of its own, so the days without it are those of a log
        // collected without hindsight days.
        let expert = SplitMix::new(seed ^ 0x41d5_0000_0000_0002).uniform() < data.hindsight_share;
        if expert {
            let log = MarketLog::record(&config, seed)?;
            behaviour.inner = Box::new(HindsightLpPolicy::new(Arc::new(log)));
        }
        let log = run_episode(&config, seed, &mut behaviour)?;
        let mut keep = vec![agent];
        let extra = data.population_per_episode.min(n_adv - 1);
        for j in 0..extra {
            keep.push((agent + 1 + j * (n_adv - 1) / extra.max(1)) % n_adv);
        }
        for i in keep {
            let outcome = &log.advertisers[i];
            let mut steps = Vec::with_capacity(sim.ticks);
            let mut actions = Vec::with_capacity(sim.ticks);
            let mut rewards = Vec::with_capacity(sim.ticks);
            let mut costs = Vec::with_capacity(sim.ticks);
            let mut prev = 0.0;
            for r in log.records_of(i) {
                steps.push(step_features(
                    &r.state,
                    prev,
                    outcome.cpa_target,
                    pvs_per_tick,
                ));
                prev = r.action / outcome.cpa_target;
                actions.push(prev as f32);
                rewards.push(r.conversions as f32);
                costs.push(r.cost as f32);
            }
            out.push(Trajectory {
                advertiser: i,
                budget: outcome.budget,
                cpa_target: outcome.cpa_target,
                steps,
                actions,
                rewards,
                costs,
                score: outcome.score,
                attributes: attributes(
                    outcome.score,
                    outcome.budget,
                    outcome.cpa_target,
                    outcome.cost,
                    outcome.conversions as f64,
                ),
            });
        }
    }
    Ok(out)
}

/// A randomly drawn behaviour policy for data collection: a constant bid
/// at 0.5–2.2 x CPA, PID pacing with a random gain and start, or OnlineLP
/// with a random cap, each with multiplicative log-normal noise per tick
/// (sigma 0–0.25), so the log covers good and bad days of many kinds.
#[allow(missing_debug_implementations)]
pub struct Behaviour {
    inner: Box<dyn Policy + Send>,
    noise: f64,
    rng: SplitMix,
}

impl Behaviour {
    fn random(rng: &mut SplitMix) -> Self {
        let kind = (rng.uniform() * 3.0) as usize;
        let inner: Box<dyn Policy + Send> = match kind {
            0 => Box::new(ConstantPolicy {
                factor: 0.5 + 1.7 * rng.uniform(),
            }),
            1 => {
                let mut pid = PidPolicy::default();
                pid.gain = 0.2 + 0.6 * rng.uniform();
                pid.max_factor = 1.0 + 2.0 * rng.uniform();
                Box::new(pid)
            }
            _ => {
                let mut lp = OnlineLpPolicy::default();
                lp.cap = 0.8 + 1.2 * rng.uniform();
                Box::new(lp)
            }
        };
        Self {
            inner,
            noise: 0.25 * rng.uniform(),
            rng: SplitMix::new(rng.next_u64()),
        }
    }
}

impl Policy for Behaviour {
    fn name(&self) -> &str {
        "behaviour"
    }
    fn begin_day(&mut self, day: &DayContext<'_>) {
        self.inner.begin_day(day);
    }
    fn act(&mut self, obs: &Observation<'_>) -> f64 {
        self.inner.act(obs) * (self.noise * self.rng.normal()).exp()
    }
}

/// A small deterministic generator (SplitMix64) for the data collection and
/// the models' sampling.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}
