//! Re-solving for the day's *score*, not the LP's CPA guard, on past days'
//! prices: one scenario (the mean past day) or many (each past day).
//!
//! [`HistoryLpPolicy`](super::HistoryLpPolicy) re-solves OnlineLP's linear
//! programme every tick: buy the cheapest PVs of the mean past day's rest
//! until the budget left is spent or the rest's CPA reaches the target.
//! Two things in it are not the day's objective:
//!
//! * the guard is on the *rest* of the day's CPA, not the day's: a day
//!   that has bought cheaply so far may buy dearer PVs now, and the score
//!   `min(1, (target / CPA)^2) x conversions` keeps rising past CPA =
//!   target while the marginal cost per conversion is under 1.5 CPA;
//! * the mean past day is one forecast of the rest; the score is not
//!   linear in it (the budget and the CPA penalty clip), so the bid that
//!   is best on the mean need not be best on average over the days the
//!   mean is made of.
//!
//! [`ScoreLpPolicy`] drops both: each tick it bids the threshold whose
//! expected day score, averaged over its scenarios, is highest. Given one
//! history (the mean of N past days) it is the certainty-equivalent score
//! maximiser (`score_lp`); given one history per past day it is the
//! sample-average approximation (`saa_lp`), the usual stochastic-programming
//! answer to "an adaptive policy better than re-solving on the mean".
//!
//! ```text
//!  today so far: spent S0 (= budget - budget left), expected conversions E0
//!                (pValues of the PVs won, x the share of wins shown)
//!  scenario h, tick t: rest cost c_h[b], rest pValue v_h[b] per cost-per-value bin
//!  threshold bin j (up to the cap's, 1.3 CPA targets; the cap's bin bought
//!  in the share below the cap):
//!     C = k x sum_{b<=j} c_h[b]        k = markup x 0.8 (as OnlineLP)
//!     V = e x sum_{b<=j} v_h[b]        e = today's share of wins shown
//!     C > budget left: V x= left / C, C = left   (the money runs out part-way)
//!     score_h(j) = score(E0 + V, S0 + C, target)
//!  bid = upper edge (or the cap) of argmax_j  mean_h score_h(j)
//! ```
//!
//! Conversions are counted as pValues (their expectation), as the hindsight
//! bounds count them, so the choice does not chase one draw's luck. Cost
//! is projected as OnlineLP projects it: the least winning cost x 0.8 (the
//! expected share of wins shown, on which cost is charged) x the markup
//! today's charges calibrate, so `k` is the cost charged per unit of least
//! winning cost *won*, whatever the true share shown. Value needs that true
//! share: `e` is today's exposures over wins (with a prior of 10 wins at
//! 0.8). OnlineLP's own guard counts every win's pValue as converting
//! (`e = 1`), so where 80% of wins are shown (live) it lets the CPA reach
//! about 1.25 targets, and where all are (replay) 1 target.

use std::collections::HashMap;
use std::sync::Arc;

use super::history::PriceHistory;
use super::policy::{DayContext, Observation, OnlineLpPolicy, Policy};
use super::prices::{bin_share_below, bin_upper, PriceMemory};
use super::records::score;

/// Each tick, the bid whose expected day score over its scenarios is
/// highest (see the module docs).
///
/// Advertisers without a history are bid for by a plain
/// [`OnlineLpPolicy`], so the policy runs on any day.
///
/// ```
/// use nann::tar::sim::{evaluate, MarketLog, PriceHistory, ScoreLpPolicy, SimConfig};
///
/// let config = SimConfig::sparse().with_pvs_per_day(5_000);
/// let past = (100..104)
///     .map(|seed| MarketLog::record(&config, seed))
///     .collect::<Result<Vec<_>, _>>()?;
/// // One scenario per past day: the sample-average approximation.
/// let scenarios = past
///     .iter()
///     .map(|day| PriceHistory::from_logs(std::slice::from_ref(day)))
///     .collect::<Result<Vec<_>, _>>()?;
/// let mut policy = ScoreLpPolicy::new(scenarios);
/// let eval = evaluate(&config.with_budget_ratio(0.5), &mut policy, 0..2)?;
/// assert_eq!(eval.scores.len(), 2);
/// # Ok::<(), nann::tar::sim::SimError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ScoreLpPolicy {
    scenarios: HashMap<usize, Vec<Arc<PriceHistory>>>,
    /// Cap on alpha as a multiple of the CPA target (1.3, as OnlineLP).
    pub cap: f64,
    today: Vec<Arc<PriceHistory>>,
    fallback: OnlineLpPolicy,
    prices: PriceMemory,
    /// Expected conversions bought so far today.
    conversions: f64,
    /// Slots won and shown so far today.
    wins: f64,
    exposures: f64,
    alpha: f64,
}

impl ScoreLpPolicy {
    /// The policy with the given histories as scenarios: every history of
    /// an advertiser is one scenario of equal weight for that advertiser.
    /// Histories may be shared (`Arc<PriceHistory>`).
    pub fn new<H: Into<Arc<PriceHistory>>>(histories: impl IntoIterator<Item = H>) -> Self {
        let mut scenarios: HashMap<usize, Vec<Arc<PriceHistory>>> = HashMap::new();
        for h in histories {
            let h = h.into();
            scenarios.entry(h.advertiser()).or_default().push(h);
        }
        Self {
            scenarios,
            cap: 1.3,
            today: Vec::new(),
            fallback: OnlineLpPolicy::default(),
            prices: PriceMemory::new(48),
            conversions: 0.0,
            wins: 0.0,
            exposures: 0.0,
            alpha: 0.0,
        }
    }
}

impl Policy for ScoreLpPolicy {
    fn name(&self) -> &str {
        "score_lp"
    }

    fn begin_day(&mut self, day: &DayContext<'_>) {
        self.today = self
            .scenarios
            .get(&day.advertiser)
            .map(|all| {
                all.iter()
                    .filter(|h| h.ticks() == day.ticks)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        self.fallback.begin_day(day);
        self.prices = PriceMemory::new(day.ticks);
        self.conversions = 0.0;
        self.wins = 0.0;
        self.exposures = 0.0;
        self.alpha = day.cpa_target;
    }

    fn act(&mut self, obs: &Observation<'_>) -> f64 {
        if self.today.is_empty() {
            return self.fallback.act(obs);
        }
        if let Some(last) = obs.last {
            self.prices.observe(&last, self.alpha);
            // The PVs won at last tick's bid, each shown with the share of
            // wins that were.
            self.wins += f64::from(last.wins);
            self.exposures += f64::from(last.exposures);
            if last.wins > 0 {
                let shown = f64::from(last.exposures) / f64::from(last.wins);
                let won: f64 = last
                    .pvalues
                    .iter()
                    .zip(last.least_winning_cost)
                    .filter(|(&p, &c)| p > 0.0 && self.alpha * p as f64 >= c as f64)
                    .map(|(&p, _)| p as f64)
                    .sum();
                self.conversions += won * shown;
            }
        }
        // The share of wins shown, with a prior of 10 wins at the expected
        // rate.
        let expected = self.prices.exposure_rate();
        let shown = (self.exposures + 10.0 * expected) / (self.wins + 10.0);
        let today = Today {
            spent: (obs.budget - obs.remaining).max(0.0),
            conversions: self.conversions,
            remaining: obs.remaining.max(0.0),
            cpa_target: obs.cpa_target,
        };
        let cap = self.cap * obs.cpa_target;
        self.alpha = best_threshold(
            self.today.iter().map(|h| h.rest(obs.tick)),
            &today,
            (self.prices.markup() * expected, shown),
            cap,
        );
        self.alpha
    }
}

/// What the day has bought so far, and what it has left.
struct Today {
    spent: f64,
    conversions: f64,
    remaining: f64,
    cpa_target: f64,
}

/// The coefficient (a bin's upper edge, at most `cap`; 0 to buy nothing)
/// whose mean expected day score over `scenarios` (each the rest of a day:
/// cost and pValue per cost-per-value bin) is highest. Costs are projected
/// x `cost_factor`, pValues x `value_factor`.
fn best_threshold<'h>(
    scenarios: impl Iterator<Item = (&'h [f64], &'h [f64])>,
    today: &Today,
    (cost_factor, value_factor): (f64, f64),
    cap: f64,
) -> f64 {
    // Candidate j bids the upper edge of bin j and buys bins 0..=j, up to
    // the cap's own bin; if the cap falls inside that bin, its candidate
    // bids the cap and buys the share of the bin below it (log-uniform
    // within the bin, 2.3% wide).
    let (cap_bin, below_cap) = bin_share_below(cap);
    let mut total = vec![0.0; cap_bin + 1];
    let mut nothing = 0.0;
    for (cost, value) in scenarios {
        nothing += score(today.conversions, today.spent, today.cpa_target);
        let (mut cost_up_to, mut value_up_to) = (0.0, 0.0);
        for (j, slot) in total.iter_mut().enumerate() {
            let share = if j == cap_bin { below_cap } else { 1.0 };
            let (c, v) = (
                cost_up_to + share * cost[j] * cost_factor,
                value_up_to + share * value[j] * value_factor,
            );
            cost_up_to += cost[j] * cost_factor;
            value_up_to += value[j] * value_factor;
            // The money runs out part-way: the same mix, less of it.
            let (c, v) = if c > today.remaining {
                (today.remaining, v * today.remaining / c)
            } else {
                (c, v)
            };
            *slot += score(today.conversions + v, today.spent + c, today.cpa_target);
        }
    }
    // The first (cheapest) of the best: a flat stretch adds no PVs.
    let (mut best, mut best_score) = (None, nothing);
    for (j, &s) in total.iter().enumerate() {
        if s > best_score {
            best = Some(j);
            best_score = s;
        }
    }
    best.map_or(0.0, |j| bin_upper(j).min(cap))
}
