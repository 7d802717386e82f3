//! A bidder's memory of the prices it has seen within the day: what a bid
//! coefficient would spend, and where the CPA constraint binds.
//! [`OnlineLpPolicy`](super::OnlineLpPolicy) solves its LP on it, and
//! [`TarPolicy`](crate::tar::TarPolicy) can turn a plan's spend into a bid
//! with it instead of a learned inverse-dynamics model.
//!
//! Every PV a bidder has seen carries its *cost per value*
//! `leastWinningCost / pValue`: bidding `alpha x pValue` wins it exactly
//! when `alpha >= cost per value`. The model keeps a histogram of the
//! PVs seen so far by cost per value (log-spaced bins, summing their
//! costs), forgetting old ticks geometrically (the market's pValue levels
//! shift every few hours), and answers "which `alpha` spends `s` in a tick
//! of `n` PVs" by accumulating bins from the cheapest up:
//!
//! ```text
//!  tick feedback (pValue_j, lwc_j) ─► bin(lwc_j / pValue_j) += lwc_j     (after decaying all bins)
//!  spend(alpha, n) = n / PVs_seen x exposure x markup x sum { cost_b : upper(b) <= alpha }
//!  bid_for_spend(s, n) = the smallest upper(b) with spend >= s
//! ```
//!
//! `markup` is the ratio of the cost actually charged to the cost the
//! model predicted for the bids actually made (GSP charges the next bid,
//! above the least winning cost for the top two slots). The same
//! statistics serve OnlineLP, which asks for the threshold that spends the
//! whole remaining budget over the rest of the day, and a planner, which
//! asks what a planned spend costs in bid.

use super::policy::TickFeedback;

pub(crate) const BINS: usize = 600;
const LOG_MIN: f64 = -1.0;
const LOG_MAX: f64 = 5.0;

pub(crate) fn bin_of(cost_per_value: f64) -> usize {
    let x = (cost_per_value.log10() - LOG_MIN) / (LOG_MAX - LOG_MIN) * BINS as f64;
    if x.is_nan() || x < 0.0 {
        0
    } else {
        (x as usize).min(BINS - 1)
    }
}

/// The bin of `cost_per_value` and the share of that bin (in log cost per
/// value, clamped to `0..=1`) that lies below it.
pub(crate) fn bin_share_below(cost_per_value: f64) -> (usize, f64) {
    let x = (cost_per_value.log10() - LOG_MIN) / (LOG_MAX - LOG_MIN) * BINS as f64;
    let b = bin_of(cost_per_value);
    let share = if x.is_nan() {
        0.0
    } else {
        (x - b as f64).clamp(0.0, 1.0)
    };
    (b, share)
}

/// The upper edge (cost per value) of bin `b`.
pub(crate) fn bin_upper(b: usize) -> f64 {
    10f64.powf(LOG_MIN + (b + 1) as f64 * (LOG_MAX - LOG_MIN) / BINS as f64)
}

/// OnlineLP's threshold over cost-per-value bins `(cost, pValue)`, cheapest
/// bin first (bin `b` holds costs per value up to [`bin_upper`]`(b)`): the
/// upper edge of the last bin bought before either the projected spend
/// (cost x `spend_factor`) reaches `spend` or the running CPA (cost x
/// `cpa_factor` over pValue) would pass `cpa_target`; `None` when neither
/// binds (the caller bids its cap). [`OnlineLpPolicy`](super::OnlineLpPolicy)
/// asks it of today's [`PriceMemory`], [`PriceHistory`](super::PriceHistory)
/// of the mean past day.
pub(crate) fn lp_threshold(
    bins: impl IntoIterator<Item = (f64, f64)>,
    (spend, spend_factor): (f64, f64),
    (cpa_target, cpa_factor): (f64, f64),
) -> Option<f64> {
    let (mut bought, mut value) = (0.0, 0.0);
    for (b, (cost, v)) in bins.into_iter().enumerate() {
        if v > 0.0 && (bought + cost) * cpa_factor > cpa_target * (value + v) {
            // Buying this bin would push the running CPA over the target.
            return Some(bin_upper(b.saturating_sub(1)));
        }
        bought += cost;
        value += v;
        if bought * spend_factor >= spend {
            return Some(bin_upper(b));
        }
    }
    None
}

/// The decayed cost-per-value histogram of one bidder's day (see the
/// module docs).
#[derive(Debug, Clone)]
pub struct PriceMemory {
    /// Forgetting factor per tick.
    decay: f64,
    /// Expected share of won slots that are shown (cost is charged on
    /// exposure only).
    exposure_rate: f64,
    /// Cost per bin.
    cost: Vec<f64>,
    /// pValue per bin.
    value: Vec<f64>,
    /// PVs the decayed histogram stands for.
    pvs: f64,
    charged: f64,
    predicted: f64,
}

impl PriceMemory {
    /// An empty memory for days of `ticks` ticks with OnlineLP's defaults:
    /// it forgets 0.85 per half-hour and expects 80% of won slots shown.
    pub fn new(ticks: usize) -> Self {
        Self::with_rates(ticks, 0.85, 0.8)
    }

    /// An empty memory for days of `ticks` ticks that forgets `decay` per
    /// half-hour (`decay^(48 / ticks)` per tick) and expects a share
    /// `exposure_rate` of won slots to be shown.
    pub fn with_rates(ticks: usize, decay: f64, exposure_rate: f64) -> Self {
        Self {
            decay: decay.powf(48.0 / ticks.max(1) as f64),
            exposure_rate,
            cost: vec![0.0; BINS],
            value: vec![0.0; BINS],
            pvs: 0.0,
            charged: 0.0,
            predicted: 0.0,
        }
    }

    /// Forgets everything (a new day).
    pub fn clear(&mut self) {
        self.cost.iter_mut().for_each(|c| *c = 0.0);
        self.value.iter_mut().for_each(|c| *c = 0.0);
        self.pvs = 0.0;
        self.charged = 0.0;
        self.predicted = 0.0;
    }

    /// Adds a tick's feedback; `alpha` is the coefficient the bidder bid in
    /// that tick (calibrates the markup).
    pub fn observe(&mut self, last: &TickFeedback<'_>, alpha: f64) {
        self.cost.iter_mut().for_each(|c| *c *= self.decay);
        self.value.iter_mut().for_each(|c| *c *= self.decay);
        self.pvs *= self.decay;
        let mut predicted = 0.0;
        for (&p, &c) in last.pvalues.iter().zip(last.least_winning_cost) {
            let (p, c) = (p as f64, c as f64);
            if alpha * p >= c {
                predicted += c * self.exposure_rate;
            }
            if p > 0.0 && c > 0.0 {
                let b = bin_of(c / p);
                self.cost[b] += c;
                self.value[b] += p;
            }
        }
        self.pvs += last.pvalues.len() as f64;
        if last.cost > 0.0 {
            self.charged += last.cost;
            self.predicted += predicted;
        }
    }

    /// The expected share of won slots that are shown.
    pub fn exposure_rate(&self) -> f64 {
        self.exposure_rate
    }

    /// The decayed cost and pValue per bin, cheapest bin first (bin `b`
    /// holds costs per value up to [`bin_upper`]`(b)`).
    pub(crate) fn bins(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.cost.iter().copied().zip(self.value.iter().copied())
    }

    /// The ratio of cost charged to cost predicted so far, with a prior of
    /// 10 units of cost at 1.
    pub fn markup(&self) -> f64 {
        (self.charged + 10.0) / (self.predicted + 10.0)
    }

    /// The smallest coefficient (money per unit of pValue) whose expected
    /// cost over a tick of `pvs` PVs reaches `spend`; `None` before any
    /// feedback, or when even the most expensive PVs seen would not spend
    /// that much.
    pub fn bid_for_spend(&self, spend: f64, pvs: usize) -> Option<f64> {
        if self.pvs <= 0.0 || !spend.is_finite() {
            return None;
        }
        if spend <= 0.0 {
            return Some(0.0);
        }
        let scale = pvs as f64 / self.pvs * self.exposure_rate * self.markup();
        let mut acc = 0.0;
        for (b, &c) in self.cost.iter().enumerate() {
            acc += c * scale;
            if acc >= spend {
                return Some(bin_upper(b));
            }
        }
        None
    }

    /// The largest coefficient at which buying every PV seen cheaper than
    /// it keeps the expected cost per conversion at `cpa_target`
    /// (OnlineLP's CPA constraint); `None` before any feedback.
    pub fn cpa_threshold(&self, cpa_target: f64) -> Option<f64> {
        if self.pvs <= 0.0 {
            return None;
        }
        let k = self.markup() * self.exposure_rate;
        let (mut bought, mut value) = (0.0, 0.0);
        for (b, (&c, &v)) in self.cost.iter().zip(&self.value).enumerate() {
            if v > 0.0 && (bought + c) * k > cpa_target * (value + v) {
                return Some(bin_upper(b.saturating_sub(1)));
            }
            bought += c;
            value += v;
        }
        Some(bin_upper(BINS - 1))
    }
}
