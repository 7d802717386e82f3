//! TAR as a bidder: at every tick, generate the day's augmented trajectory
//! conditioned on the attributes asked for and on the steps observed so
//! far, and read the next action from it.
//!
//! ```text
//!  tick t: Observation ─► x_t = [features(s_t) ; a_{t-1}/CPA] ─► history x_0..x_t
//!          attributes [target efficiency, spend, CPA ratio, ln(budget/CPA)] ─► condition y
//!          TarModel::generate(y, history) ─► x_hat (T x F)
//!          with inverse dynamics (tar_eval's setting):
//!            pace = (x_hat[t].budget_left - x_hat[t+1].budget_left) / x_hat[t].budget_left
//!            a_t  = InverseDynamics(x_t, pace x budget_left_t, ln(budget/CPA))
//!          with a market reading (PriceMemory of the day's prices):
//!            NextTick:  a_t = the bid that spends pace x budget left in this tick's PVs
//!            RestOfDay: a_t = the one threshold that spends the plan's rest-of-day
//!                       share over the traffic to come (optionally <= OnlineLP's CPA threshold);
//!                       with price histories, solved on the mean past day instead
//!          without either: a_t = x_hat[t+1][ACTION_SLOT] (the paper's reading)
//!          alpha_t = a_t x CPA  (median over `samples` draws, clamped to [0, 1.3 CPA])
//! ```
//!
//! Because `x_{t+1}` carries `a_t` (state-action fusion), the action is part
//! of the generated plan, and without an inverse-dynamics model the policy
//! bids it; the last tick of the day, which has no `x_T`, reuses the plan's
//! last action. The VQ-VAE reconstructs that slot poorly (see
//! [`inverse`](super::inverse)), so the inverse-dynamics reading keeps the
//! plan's *pacing* and leaves the bid to a model of the market.

use std::collections::HashMap;
use std::sync::Arc;

use super::data::{step_features, SplitMix};
use super::inverse::InverseDynamics;
use super::model::{GenerateOptions, Matched, PlanGenerator, TarModel, ACTION_SLOT, STEP_FEATURES};
use super::sim::{DayContext, Observation, Policy, PriceHistory, PriceMemory};

/// Default bid cap, in CPA targets: [`OnlineLpPolicy`](super::sim::OnlineLpPolicy)'s,
/// chosen the same way (60 validation days): 13.9 / 19.3 without a cap
/// (10 x CPA) against 15.6 / 20.7 with it at budget ratios 0.5 / 0.75.
const DEFAULT_MAX_ACTION: f32 = 1.3;

/// How a [`TarPolicy`] with a [`PriceMemory`] turns a plan into a bid.
///
/// Both read only the plan's budget trajectory and ask the market model
/// for the price of that spend; neither needs a trained inverse-dynamics
/// model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarketReading {
    /// Bid what spends, in this tick's PVs, the share of the budget left
    /// the plan spends before its next step (the learned inverse
    /// dynamics' question, answered from the prices seen).
    NextTick,
    /// Bid the one threshold that spends, over the traffic still to come,
    /// the share of the budget left the plan spends by the end of the day
    /// (the LP view: one price for the rest of the day); with `cpa_guard`,
    /// never above OnlineLP's CPA-constraint threshold
    /// ([`PriceMemory::cpa_threshold`]).
    RestOfDay {
        /// Cap the bid at the threshold where the expected CPA of the PVs
        /// bought reaches the target.
        cpa_guard: bool,
    },
}

/// A [`Policy`] that bids with a [`TarModel`].
#[derive(Debug, Clone)]
pub struct TarPolicy {
    name: String,
    model: Arc<TarModel>,
    /// Generates the plans: `model` itself unless
    /// [`with_generator`](Self::with_generator) replaced it.
    generator: Arc<dyn PlanGenerator>,
    inverse: Option<Arc<InverseDynamics>>,
    market: Option<(PriceMemory, MarketReading)>,
    /// Past days' prices per advertiser, for the rest-of-day reading.
    histories: Arc<HashMap<usize, Arc<PriceHistory>>>,
    /// Today's advertiser's history, if any.
    day_history: Option<Arc<PriceHistory>>,
    share: Vec<f64>,
    target_efficiency: f32,
    target_spend: f32,
    target_cpa_ratio: f32,
    max_action: f32,
    options: GenerateOptions,
    samples: usize,
    pvs_per_tick: f64,
    seed: u64,
    days: u64,
    rng: SplitMix,
    budget: f64,
    cpa_target: f64,
    history: Vec<f32>,
    prev_action: f64,
    prev_alpha: f64,
    errors: u64,
}

impl TarPolicy {
    /// A bidder asking `model` for days of efficiency `target_efficiency`
    /// (the first [data attribute](super::data::attributes): score x CPA /
    /// budget; e.g. a high quantile of the training days') that spend 95%
    /// of the budget at 95% of the CPA target (see
    /// [`with_constraints`](Self::with_constraints)), in a simulator with
    /// `pvs_per_tick` expected PVs per tick (PVs a day / ticks).
    pub fn new(model: Arc<TarModel>, target_efficiency: f32, pvs_per_tick: f64) -> Self {
        Self {
            name: "tar".into(),
            generator: model.clone(),
            model,
            inverse: None,
            market: None,
            histories: Arc::new(HashMap::new()),
            day_history: None,
            share: Vec::new(),
            target_efficiency,
            target_spend: 0.95,
            target_cpa_ratio: 0.95,
            max_action: DEFAULT_MAX_ACTION,
            options: GenerateOptions::default(),
            samples: 1,
            pvs_per_tick,
            seed: 0,
            days: 0,
            rng: SplitMix::new(0),
            budget: 0.0,
            cpa_target: 0.0,
            history: Vec::new(),
            prev_action: 0.0,
            prev_alpha: 0.0,
            errors: 0,
        }
    }

    /// Sets the name shown in tables (e.g. `tar_k1`).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the constraint attributes asked for: the share of the budget to
    /// spend and the realised CPA as a share of the target.
    pub fn with_constraints(mut self, spend: f32, cpa_ratio: f32) -> Self {
        self.target_spend = spend;
        self.target_cpa_ratio = cpa_ratio;
        self
    }

    /// Reads actions through `inverse` (see [`InverseDynamics`]): the bid
    /// that spends, this tick, the budget between the observed budget left
    /// and the plan's next step, instead of the plan's own action slot.
    pub fn with_inverse_dynamics(mut self, inverse: Arc<InverseDynamics>) -> Self {
        self.inverse = Some(inverse);
        self
    }

    /// Reads actions through a within-day [`PriceMemory`] of the prices
    /// seen so far instead of a learned inverse-dynamics model (see
    /// [`MarketReading`]); takes precedence over
    /// [`with_inverse_dynamics`](Self::with_inverse_dynamics).
    pub fn with_market_reading(mut self, reading: MarketReading, ticks: usize) -> Self {
        self.market = Some((PriceMemory::new(ticks), reading));
        self
    }

    /// Prices the [`MarketReading::RestOfDay`] reading on past days' prices
    /// (one [`PriceHistory`] per advertiser, as
    /// [`HistoryLpPolicy`](super::sim::HistoryLpPolicy) bids) instead of
    /// the prices seen today: the plan's rest-of-day spend, and the CPA
    /// guard, are solved on the history's mean remaining day. Days of an
    /// advertiser without a history, and the other readings, are
    /// unchanged.
    pub fn with_price_histories<H: Into<Arc<PriceHistory>>>(
        mut self,
        histories: impl IntoIterator<Item = H>,
    ) -> Self {
        self.histories = Arc::new(
            histories
                .into_iter()
                .map(|h| {
                    let h = h.into();
                    (h.advertiser(), h)
                })
                .collect(),
        );
        self
    }

    /// Caps the bid coefficient at `max_action` CPA targets (default 1.3;
    /// a non-finite or negative value leaves the default).
    pub fn with_max_action(mut self, max_action: f32) -> Self {
        if max_action.is_finite() && max_action >= 0.0 {
            self.max_action = max_action;
        }
        self
    }

    /// Generates the plans with `generator` instead of the CPU model, e.g.
    /// `nann::cuda::GpuTarModel` (feature `cuda`) for issue 7's latency;
    /// everything else (normalisation, the condition, the configuration)
    /// stays the model's. Contract: `generator` holds the policy's own
    /// model (built from it, e.g. `GpuTarModel::new(&model, device)`), so it
    /// plans as the CPU would, up to its rounding. One built from a model
    /// of another configuration is not refused here: every decision then
    /// fails with [`TarError::Backend`](super::model::TarError::Backend)
    /// and bids the fallback, counted by [`errors`](Self::errors), as does
    /// a decision whose generation fails (a device error).
    pub fn with_generator(mut self, generator: Arc<dyn PlanGenerator>) -> Self {
        self.generator = Arc::new(Matched::new(generator, self.model.config()));
        self
    }

    /// Sets the sampling options.
    pub fn with_options(mut self, options: GenerateOptions) -> Self {
        self.options = options;
        self
    }

    /// Draws `samples` trajectories per decision and bids the median of
    /// their actions (at least 1).
    pub fn with_samples(mut self, samples: usize) -> Self {
        self.samples = samples.max(1);
        self
    }

    /// Seeds the sampling; day `i` of the policy's life uses a stream of
    /// `(seed, i)`.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Decisions that failed (an input the model rejected) and fell back
    /// to bidding the CPA target; 0 in normal operation.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// A market bid (money per unit of pValue) in CPA targets; the cap when
    /// the market model has no answer (no feedback yet, or no price seen
    /// would spend that much).
    fn bid_in_cpa(&self, alpha: Option<f64>) -> f32 {
        alpha.map_or(self.max_action, |a| (a / self.cpa_target.max(1e-9)) as f32)
    }

    fn decide(&mut self, obs: &Observation<'_>) -> Result<f32, super::model::TarError> {
        let config = self.model.config();
        let (t_len, f) = (config.steps, config.step_features);
        let rows = (self.history.len() / f).min(t_len);
        let history = self.model.normalize_step(&self.history[..rows * f])?;
        let attrs = [
            self.target_efficiency,
            self.target_spend,
            self.target_cpa_ratio,
            (self.budget.max(1e-9) / self.cpa_target.max(1e-9)).ln() as f32,
        ];
        let y = self.model.condition(Some(&attrs));
        let row = (obs.tick + 1).min(t_len - 1);
        let mut actions = Vec::with_capacity(self.samples);
        let plan_row =
            |x_hat: &[f32], r: usize| self.model.denormalize_step(&x_hat[r * f..(r + 1) * f]);
        for _ in 0..self.samples {
            let g = self
                .generator
                .generate(&y, &history, &self.options, &mut self.rng)?;
            let step = plan_row(&g.x_hat, row)?;
            let action = match rows.checked_sub(1) {
                Some(last) if self.inverse.is_some() || self.market.is_some() => {
                    let mut x_t = [0f32; STEP_FEATURES];
                    x_t.copy_from_slice(&self.history[last * f..(last + 1) * f]);
                    // The plan's budget left after this tick; on the last
                    // tick, extrapolated from its last two rows.
                    let planned_left = if obs.tick + 1 < t_len {
                        step[1]
                    } else {
                        let before = plan_row(&g.x_hat, t_len.saturating_sub(2))?;
                        (2.0 * step[1] - before[1]).max(0.0)
                    };
                    // The plan's pace, not its level: the share of *its*
                    // budget left that it spends this tick, applied to the
                    // budget actually left. (Spending down to the plan's
                    // level instead chases plans that disagree with the
                    // observed day: validation 12.1 / 16.0 against 13.9 /
                    // 19.3 at ratios 0.5 / 0.75, both at CPA 1.1-1.4x. The
                    // mean pace over the next 4 or 8 ticks instead of the
                    // next one: 14.6 / 21.1 and 14.2 / 21.0 against 15.6 /
                    // 20.7, within the noise.)
                    let now = plan_row(&g.x_hat, obs.tick.min(t_len - 1))?;
                    let left_now = x_t[1].max(0.0) as f64;
                    match (&self.market, &self.inverse) {
                        (Some((memory, MarketReading::NextTick)), _) => {
                            let rate = ((now[1] - planned_left) / now[1].max(1e-3)).clamp(0.0, 1.0);
                            let spend = rate as f64 * left_now * self.budget;
                            self.bid_in_cpa(memory.bid_for_spend(spend, obs.pvalues.len()))
                        }
                        (Some((memory, MarketReading::RestOfDay { cpa_guard })), _) => {
                            // The share of its budget left the plan spends
                            // by the end of the day, bought at one threshold
                            // over the traffic still to come.
                            let end = plan_row(&g.x_hat, t_len - 1)?;
                            let rate = ((now[1] - end[1]) / now[1].max(1e-3)).clamp(0.0, 1.0);
                            let rest: f64 =
                                self.share.get(obs.tick..).map_or(0.0, |s| s.iter().sum());
                            let rest_pvs = rest * self.pvs_per_tick * self.share.len() as f64;
                            let spend = rate as f64 * left_now * self.budget;
                            if let Some(history) = &self.day_history {
                                // OnlineLP's problem on the history, with
                                // the plan's spend as the budget.
                                let k = memory.markup() * memory.exposure_rate();
                                let cpa = if *cpa_guard {
                                    self.cpa_target
                                } else {
                                    f64::INFINITY
                                };
                                self.bid_in_cpa(history.threshold(obs.tick, spend, cpa, k))
                            } else {
                                let day = memory.bid_for_spend(spend, rest_pvs.round() as usize);
                                let guard = cpa_guard
                                    .then(|| memory.cpa_threshold(self.cpa_target))
                                    .flatten();
                                self.bid_in_cpa(match (day, guard) {
                                    (Some(d), Some(g)) => Some(d.min(g)),
                                    (d, g) => d.or(g),
                                })
                            }
                        }
                        (None, Some(inverse)) => {
                            let rate = ((now[1] - planned_left) / now[1].max(1e-3)).clamp(0.0, 1.0);
                            let share = rate * x_t[1].max(0.0);
                            inverse.predict(&InverseDynamics::inputs(&x_t, share, t_len, attrs[3]))
                        }
                        (None, None) => step[ACTION_SLOT],
                    }
                }
                _ => step[ACTION_SLOT],
            };
            actions.push(action);
        }
        actions.sort_by(f32::total_cmp);
        Ok(actions[actions.len() / 2])
    }
}

impl Policy for TarPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn begin_day(&mut self, day: &DayContext<'_>) {
        self.rng = SplitMix::new(self.seed ^ self.days.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        self.days += 1;
        self.budget = day.budget;
        self.cpa_target = day.cpa_target;
        self.share = day.traffic_share.to_vec();
        self.day_history = self
            .histories
            .get(&day.advertiser)
            .filter(|h| h.ticks() == day.ticks)
            .cloned();
        self.history.clear();
        self.prev_action = 0.0;
        self.prev_alpha = 0.0;
        if let Some((memory, _)) = &mut self.market {
            memory.clear();
        }
    }

    fn act(&mut self, obs: &Observation<'_>) -> f64 {
        if let (Some((memory, _)), Some(last)) = (&mut self.market, &obs.last) {
            memory.observe(last, self.prev_alpha);
        }
        let x = step_features(
            obs.state,
            self.prev_action,
            obs.cpa_target,
            self.pvs_per_tick,
        );
        self.history.extend_from_slice(&x);
        let ratio = match self.decide(obs) {
            Ok(a) if a.is_finite() => a.clamp(0.0, self.max_action),
            _ => {
                self.errors += 1;
                1.0
            }
        };
        let alpha = ratio as f64 * obs.cpa_target;
        self.prev_alpha = alpha;
        // The data's `a_{t-1}` is the executed coefficient: 0 once the
        // budget is spent.
        self.prev_action = if obs.remaining >= super::sim::MIN_BUDGET {
            ratio as f64
        } else {
            0.0
        };
        alpha
    }
}
