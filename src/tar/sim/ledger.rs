//! One advertiser's account of a day in progress: its budget left, its
//! history of tick statistics, the conversions waiting to be revealed, and
//! its running totals.
//!
//! The live day ([`run_episode`](super::run_episode)) keeps one ledger per
//! advertiser and the offline replay ([`run_replay`](super::run_replay))
//! keeps one for its advertiser, so both build the 16 state features, ask
//! the policy, apply the minimum-budget rule and log the step records in
//! exactly the same way; they differ only in how a tick's bids turn into
//! wins, costs and conversions.
//!
//! ```text
//!  history, budget left ──► act ──► alpha ──► (auction or replay) ──► TickOutcome
//!        ▲                                                                │
//!        └──────────────── settle: TickStats, StepRecord ◄────────────────┘
//! ```

use super::config::SimError;
use super::episode::{AdvertiserOutcome, MIN_BUDGET};
use super::policy::{DayContext, Observation, Policy, TickFeedback};
use super::records::{score, StepRecord, StepState, TickStats};

/// One advertiser's results in one tick (after the over-spend rule).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct TickOutcome {
    /// Cost charged.
    pub(super) cost: f64,
    /// Slots (or, in the replay, PVs) won.
    pub(super) wins: u32,
    /// Won slots shown.
    pub(super) exposures: u32,
    /// True conversions generated in the tick.
    pub(super) conversions: u32,
    /// Sum of the pValues of the shown slots.
    pub(super) reward_continuous: f64,
}

/// What the policy decided in a tick, with the state it saw.
#[derive(Debug, Clone, Copy)]
pub(super) struct Decision {
    /// The bid coefficient in force: the policy's, clipped at 0, and 0 once
    /// the budget left is below [`MIN_BUDGET`].
    pub(super) alpha: f64,
    /// The 16 features the policy saw.
    pub(super) state: StepState,
}

/// One advertiser's running account of the day (see the module docs).
#[derive(Debug, Clone)]
pub(super) struct Ledger {
    advertiser: usize,
    ticks: usize,
    remaining: f64,
    history: Vec<TickStats>,
    /// `reveal[r]`: conversions revealed at tick `r`.
    reveal: Vec<u32>,
    /// The previous tick's outcome (the policy's feedback).
    last: TickOutcome,
    totals: AdvertiserOutcome,
}

impl Ledger {
    /// A fresh day for `advertiser` with the given budget (already scaled
    /// by the budget ratio for the agent).
    pub(super) fn new(
        advertiser: usize,
        category: usize,
        budget: f64,
        cpa_target: f64,
        ticks: usize,
    ) -> Self {
        Self {
            advertiser,
            ticks,
            remaining: budget,
            history: Vec::with_capacity(ticks),
            reveal: vec![0; ticks],
            last: TickOutcome::default(),
            totals: AdvertiserOutcome {
                category,
                budget,
                cpa_target,
                cost: 0.0,
                wins: 0,
                exposures: 0,
                conversions: 0,
                observed_conversions: 0,
                score: 0.0,
            },
        }
    }

    /// Budget left.
    pub(super) fn remaining(&self) -> f64 {
        self.remaining
    }

    /// Tells `policy` about the day before its first tick.
    pub(super) fn begin_day(&self, policy: &mut dyn Policy, traffic_share: &[f64]) {
        policy.begin_day(&DayContext {
            advertiser: self.advertiser,
            category: self.totals.category,
            budget: self.totals.budget,
            cpa_target: self.totals.cpa_target,
            ticks: self.ticks,
            traffic_share,
        });
    }

    /// Asks `policy` for tick `t`'s bid coefficient. `pvalues` are the
    /// tick's PVs' pValues; `previous` the previous tick's pValues and least
    /// winning costs (`None` at tick 0).
    ///
    /// # Errors
    ///
    /// [`SimError::Action`] if the policy returns a non-finite value.
    pub(super) fn act(
        &self,
        policy: &mut dyn Policy,
        t: usize,
        pvalues: &[f32],
        previous: Option<(&[f32], &[f32])>,
    ) -> Result<Decision, SimError> {
        let budget = self.totals.budget;
        let state = StepState::from_history(
            &self.history,
            self.ticks,
            self.remaining / budget,
            mean_f32(pvalues),
            pvalues.len(),
        );
        let last = previous.map(|(pvalues, least_winning_cost)| TickFeedback {
            pvalues,
            least_winning_cost,
            cost: self.last.cost,
            wins: self.last.wins,
            exposures: self.last.exposures,
            observed_conversions: self.reveal[t.saturating_sub(1)],
        });
        let a = policy.act(&Observation {
            tick: t,
            ticks: self.ticks,
            budget,
            remaining: self.remaining,
            cpa_target: self.totals.cpa_target,
            state: &state,
            pvalues,
            last,
        });
        if !a.is_finite() {
            return Err(SimError::Action {
                advertiser: self.advertiser,
                tick: t,
                value: a,
            });
        }
        let alpha = if self.remaining < MIN_BUDGET {
            0.0
        } else {
            a.max(0.0)
        };
        Ok(Decision { alpha, state })
    }

    /// Schedules a conversion generated at tick `t` with a delay of
    /// `delay_hours`: it is revealed at tick `t + floor(delay / tick)`, or
    /// never within the day if that is past its end.
    pub(super) fn convert(&mut self, t: usize, delay_hours: f64, tick_hours: f64) {
        // `as` saturates a huge or infinite delay; the add must too.
        let r = t.saturating_add((delay_hours / tick_hours).floor() as usize);
        if r < self.ticks {
            self.reveal[r] += 1;
        }
    }

    /// Books tick `t`'s outcome (after every conversion of the tick went
    /// through [`convert`](Self::convert)) and returns its step record.
    /// `pvalues` and `least_winning_cost` are the tick's, as the advertiser
    /// saw them.
    pub(super) fn settle(
        &mut self,
        t: usize,
        pvalues: &[f32],
        least_winning_cost: &[f32],
        decision: Decision,
        o: TickOutcome,
    ) -> StepRecord {
        self.remaining -= o.cost;
        let tot = &mut self.totals;
        tot.cost += o.cost;
        tot.wins += o.wins as u64;
        tot.exposures += o.exposures as u64;
        tot.conversions += o.conversions as u64;
        let observed = self.reveal[t];
        tot.observed_conversions += observed as u64;
        let n = pvalues.len();
        let nf = n.max(1) as f64;
        let mean_pv = mean_f32(pvalues);
        self.history.push(TickStats {
            pvs: n,
            mean_bid: decision.alpha * mean_pv,
            mean_lwc: least_winning_cost.iter().map(|&x| x as f64).sum::<f64>() / nf,
            mean_pvalue: mean_pv,
            conversion_rate: observed as f64 / nf,
            win_rate: o.wins as f64 / nf,
        });
        self.last = o;
        StepRecord {
            advertiser: self.advertiser,
            tick: t,
            state: decision.state,
            action: decision.alpha,
            cost: o.cost,
            wins: o.wins,
            exposures: o.exposures,
            conversions: o.conversions,
            observed_conversions: observed,
            reward_continuous: o.reward_continuous,
            done: t + 1 == self.ticks || self.remaining < MIN_BUDGET,
        }
    }

    /// The day's totals, scored.
    pub(super) fn finish(self) -> AdvertiserOutcome {
        let mut tot = self.totals;
        tot.score = score(tot.conversions as f64, tot.cost, tot.cpa_target);
        tot
    }
}

fn mean_f32(xs: &[f32]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64
    }
}
