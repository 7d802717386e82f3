//! Hindsight bounds: bidders that know the whole logged day in advance.
//!
//! No online policy can run these; they measure what a policy leaves on
//! the table and, as behaviour policies, put expert days into the offline
//! log the learned bidders train on (hindsight relabelling:
//! [`DataConfig::hindsight_share`](crate::tar::data::DataConfig::hindsight_share)).
//!
//! ```text
//!  MarketLog (every PV of the day: pValue, least winning cost)
//!     ├─► best_constant(ratio): one bid for the whole day, the grid point of
//!     │   highest expected score (conversions = pValues bought)
//!     └─► HindsightLpPolicy: each tick, OnlineLP's problem re-solved on the
//!         day's *actual* remaining PVs instead of a forecast from the prices
//!         seen: the cheapest-first threshold that spends the budget left,
//!         stopped where the rest of the day's CPA would pass the target
//! ```
//!
//! OnlineLP ([`OnlineLpPolicy`](super::OnlineLpPolicy)) solves the same
//! problem as `HindsightLpPolicy` with a forecast of the rest of the day
//! made from the prices seen so far; the gap between the two is what that
//! forecast costs (BENCHMARKS.md, fourteenth session).
//! [`HistoryLpPolicy`](super::HistoryLpPolicy), the same problem solved on
//! past days' mean prices, closes about half of that gap (fifteenth
//! session).

use std::sync::Arc;

use super::policy::{DayContext, Observation, Policy};
use super::records::score;
use super::replay::MarketLog;

impl MarketLog {
    /// The hindsight bid: the constant coefficient, in CPA targets (on the
    /// grid 0.05, 0.06, ..., 2.00), whose replay of this day at
    /// `budget_ratio` has the highest *expected* score, and that score.
    ///
    /// It knows the whole day's prices in advance, so no online policy can
    /// count on matching it; it bounds what pacing can gain on the day.
    /// Expected, not realised: conversions count as the pValues bought
    /// (so the choice does not chase one draw's luck), every win is shown
    /// and pays its least winning cost (the replay's rules), and the day
    /// stops at the first PV the budget cannot pay for. No budget ratio
    /// panics (a negative one buys nothing: expected score 0).
    ///
    /// ```
    /// use nann::tar::sim::{MarketLog, SimConfig};
    ///
    /// let log = MarketLog::record(&SimConfig::sparse().with_pvs_per_day(5_000), 3)?;
    /// let (factor, expected) = log.best_constant(0.5);
    /// assert!((0.05..=2.0).contains(&factor) && expected >= 0.0);
    /// # Ok::<(), nann::tar::sim::SimError>(())
    /// ```
    pub fn best_constant(&self, budget_ratio: f64) -> (f64, f64) {
        let budget = self.budget() * budget_ratio;
        let cpa = self.cpa_target().max(1e-9);
        let expected = |factor: f64| -> f64 {
            let alpha = factor * cpa;
            let (mut cost, mut conversions) = (0.0, 0.0);
            'day: for tick in self.ticks() {
                for (&p, &lwc) in tick.pvalues().iter().zip(tick.least_winning_costs()) {
                    let (p, lwc) = (p as f64, lwc as f64);
                    if p > 0.0 && alpha * p >= lwc {
                        if cost + lwc > budget {
                            break 'day;
                        }
                        cost += lwc;
                        conversions += p;
                    }
                }
            }
            score(conversions, cost, cpa)
        };
        (5..=200)
            .map(|k| {
                let factor = k as f64 / 100.0;
                (factor, expected(factor))
            })
            .fold((1.0, f64::NEG_INFINITY), |best, x| {
                if x.1 > best.1 {
                    x
                } else {
                    best
                }
            })
    }
}

/// OnlineLP with foresight: every tick it solves OnlineLP's problem on the
/// logged day's actual remaining PVs instead of a forecast.
///
/// Bid (money per unit of pValue) at tick `t`: sort the log's PVs of ticks
/// `t..` by cost per value (`leastWinningCost / pValue`) and take them
/// cheapest first until the next one would exceed the budget left or push
/// their CPA past the target; bid that PV's cost per value, capped at `cap`
/// CPA targets (OnlineLP's 1.3 by default). In a replay of its own log it
/// knows the future exactly; in the live day the log came from, the other
/// advertisers react to its bids, so it knows the future closely.
///
/// ```
/// use std::sync::Arc;
/// use nann::tar::sim::{run_replay, HindsightLpPolicy, MarketLog, OnlineLpPolicy, SimConfig};
///
/// let config = SimConfig::sparse().with_pvs_per_day(5_000);
/// let log = Arc::new(MarketLog::record(&config, 3)?);
/// let mut bound = HindsightLpPolicy::new(log.clone());
/// let replay = run_replay(&config.clone().with_budget_ratio(0.5), &log, 1, &mut bound)?;
/// assert!(replay.outcome.cost <= replay.outcome.budget);
/// # Ok::<(), nann::tar::sim::SimError>(())
/// ```
#[derive(Debug, Clone)]
pub struct HindsightLpPolicy {
    log: Arc<MarketLog>,
    cap: f64,
    cpa_factor: f64,
}

impl HindsightLpPolicy {
    /// The bidder that knows `log`'s day, with OnlineLP's cap of 1.3 CPA
    /// targets.
    pub fn new(log: Arc<MarketLog>) -> Self {
        Self {
            log,
            cap: 1.3,
            cpa_factor: 1.0,
        }
    }

    /// Lets the CPA guard stop at `factor` CPA targets instead of the
    /// target, as [`OnlineLpPolicy::cpa_factor`](super::OnlineLpPolicy::cpa_factor)
    /// (a non-finite or non-positive value leaves the default, 1).
    pub fn with_cpa_factor(mut self, factor: f64) -> Self {
        if factor.is_finite() && factor > 0.0 {
            self.cpa_factor = factor;
        }
        self
    }

    /// Caps the bid at `cap` CPA targets (a non-finite or negative value
    /// leaves the default).
    pub fn with_cap(mut self, cap: f64) -> Self {
        if cap.is_finite() && cap >= 0.0 {
            self.cap = cap;
        }
        self
    }
}

impl Policy for HindsightLpPolicy {
    fn name(&self) -> &str {
        "hindsight_lp"
    }

    fn begin_day(&mut self, _: &DayContext<'_>) {}

    fn act(&mut self, obs: &Observation<'_>) -> f64 {
        let cap = self.cap * obs.cpa_target;
        let ticks = self.log.ticks();
        // The rest of the day's PVs: (cost per value, cost, value).
        let mut rest: Vec<(f64, f64, f64)> = ticks[obs.tick.min(ticks.len())..]
            .iter()
            .flat_map(|t| t.pvalues().iter().zip(t.least_winning_costs()))
            .filter(|(&p, _)| p > 0.0)
            .map(|(&p, &c)| (c as f64 / p as f64, c as f64, p as f64))
            .collect();
        rest.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (mut cost, mut value) = (0.0, 0.0);
        let cpa = obs.cpa_target * self.cpa_factor;
        for (cost_per_value, c, v) in rest {
            if cost + c > cpa * (value + v) || cost + c >= obs.remaining {
                return cost_per_value.min(cap);
            }
            cost += c;
            value += v;
        }
        cap
    }
}
