//! OnlineLP as AuctionNet runs it: the LP solved on *past days'* prices.
//!
//! [`OnlineLpPolicy`](super::OnlineLpPolicy) forecasts the rest of the day
//! from the prices seen today, which is all a bidder can do when every
//! day's market is drawn afresh (the `sparse` and `delayed` presets). In a
//! [recurring market](super::RecurringMarket) the day has a shape that past
//! days show, and AuctionNet's OnlineLP baseline reads it from its training
//! logs. [`HistoryLpPolicy`] is that baseline: the hand-written bidder given
//! the structure a learned bidder could learn, so that a learned bidder's
//! gain is measured against it and not against a bidder blind to it.
//!
//! ```text
//!  past days' MarketLogs of advertiser a (same population)
//!     └─► PriceHistory: per tick t, per cost-per-value bin b:
//!         mean cost[t][b], mean value[t][b]; suffix sums over t..
//!  tick t: rest[b] = suffix[t][b] (x today's level^w, see below)
//!     └─► cheapest bins first while spend <= budget left and CPA <= target
//!         bid = the last bin's upper edge (cap 1.3 CPA targets)
//! ```
//!
//! Costs are projected with the markup of charged over predicted cost that
//! today's feedback calibrates ([`PriceMemory::markup`]), as OnlineLP does.
//! With `level_weight = w > 0` the history's prices are also multiplied by
//! `level^w`, `level` being today's cost per value over the history's on
//! the ticks seen so far (a day-wide correction; `w = 0`, the default, is
//! the pure history). With a window reading
//! ([`HistoryLpPolicy::with_window_reading`]) the rest of the current
//! window of constant price levels is priced on today's PVs seen in it
//! instead, and only the later windows on the history.

use std::collections::HashMap;
use std::sync::Arc;

use super::config::SimError;
use super::policy::{DayContext, Observation, OnlineLpPolicy, Policy};
use super::prices::{bin_of, lp_threshold, PriceMemory, BINS};
use super::replay::MarketLog;

/// One advertiser's mean prices per tick over past days: what
/// [`HistoryLpPolicy`] plans with.
#[derive(Debug, Clone)]
pub struct PriceHistory {
    advertiser: usize,
    days: usize,
    /// `rest_cost[t * BINS + b]`: mean cost of bin `b` over ticks `t..`.
    rest_cost: Vec<f64>,
    /// The same for pValue.
    rest_value: Vec<f64>,
    /// `seen_cost[t]`, `seen_value[t]`: mean total cost and pValue of
    /// ticks `..t` (for today's level).
    seen_cost: Vec<f64>,
    seen_value: Vec<f64>,
}

impl PriceHistory {
    /// The mean prices of `logs`, which must all be of one advertiser and
    /// have the same number of ticks.
    ///
    /// # Errors
    ///
    /// [`SimError::NoEpisodes`] for no logs; [`SimError::Config`] (field
    /// `history`) if the logs are of different advertisers or day lengths.
    pub fn from_logs(logs: &[MarketLog]) -> Result<Self, SimError> {
        let first = logs.first().ok_or(SimError::NoEpisodes)?;
        let (advertiser, ticks) = (first.advertiser(), first.ticks().len());
        if let Some(other) = logs
            .iter()
            .find(|l| l.advertiser() != advertiser || l.ticks().len() != ticks)
        {
            return Err(SimError::Config {
                field: "history",
                message: format!(
                    "a log of advertiser {} with {} ticks among logs of advertiser {advertiser} with {ticks}",
                    other.advertiser(),
                    other.ticks().len()
                ),
            });
        }
        let days = logs.len();
        let mut cost = vec![0.0; (ticks + 1) * BINS];
        let mut value = vec![0.0; (ticks + 1) * BINS];
        for log in logs {
            for (t, tick) in log.ticks().iter().enumerate() {
                for (&p, &c) in tick.pvalues().iter().zip(tick.least_winning_costs()) {
                    let (p, c) = (p as f64, c as f64);
                    if p > 0.0 && c > 0.0 {
                        let b = bin_of(c / p);
                        cost[t * BINS + b] += c / days as f64;
                        value[t * BINS + b] += p / days as f64;
                    }
                }
            }
        }
        let (mut seen_cost, mut seen_value) = (vec![0.0; ticks + 1], vec![0.0; ticks + 1]);
        for t in 0..ticks {
            let row = t * BINS..(t + 1) * BINS;
            seen_cost[t + 1] = seen_cost[t] + cost[row.clone()].iter().sum::<f64>();
            seen_value[t + 1] = seen_value[t] + value[row].iter().sum::<f64>();
        }
        // Suffix sums: row t holds ticks t.., row `ticks` stays zero.
        for t in (0..ticks).rev() {
            for b in 0..BINS {
                cost[t * BINS + b] += cost[(t + 1) * BINS + b];
                value[t * BINS + b] += value[(t + 1) * BINS + b];
            }
        }
        Ok(Self {
            advertiser,
            days,
            rest_cost: cost,
            rest_value: value,
            seen_cost,
            seen_value,
        })
    }

    /// The advertiser the history is of.
    pub fn advertiser(&self) -> usize {
        self.advertiser
    }

    /// Days averaged.
    pub fn days(&self) -> usize {
        self.days
    }

    /// Ticks per day.
    pub fn ticks(&self) -> usize {
        self.seen_cost.len() - 1
    }

    /// OnlineLP's threshold over the mean past day's ticks `tick..`: the
    /// upper edge of the last cost-per-value bin bought, cheapest first,
    /// before the projected cost (mean cost x `cost_factor`) reaches
    /// `spend` or the running CPA (projected cost over mean pValue) would
    /// pass `cpa_target`; `None` when neither binds (bid the cap).
    ///
    /// `cost_factor` turns the logged least winning costs into the cost
    /// charged: [`PriceMemory::markup`] x [`PriceMemory::exposure_rate`] as
    /// OnlineLP projects them. Pass `f64::INFINITY` as `cpa_target` for no
    /// CPA guard.
    ///
    /// ```
    /// use nann::tar::sim::{MarketLog, PriceHistory, SimConfig};
    ///
    /// let log = MarketLog::record(&SimConfig::sparse().with_pvs_per_day(5_000), 1)?;
    /// let history = PriceHistory::from_logs(&[log])?;
    /// let cheap = history.threshold(0, 10.0, f64::INFINITY, 1.0).unwrap();
    /// let dear = history.threshold(0, 1_000.0, f64::INFINITY, 1.0).unwrap();
    /// assert!(cheap < dear);
    /// # Ok::<(), nann::tar::sim::SimError>(())
    /// ```
    pub fn threshold(
        &self,
        tick: usize,
        spend: f64,
        cpa_target: f64,
        cost_factor: f64,
    ) -> Option<f64> {
        let (rest_cost, rest_value) = self.rest(tick);
        lp_threshold(
            rest_cost.iter().copied().zip(rest_value.iter().copied()),
            (spend, cost_factor),
            (cpa_target, cost_factor),
        )
    }

    /// The history with this one's prices on ticks `..from` and `later`'s
    /// from `from` on (`from` past the end keeps this one whole): e.g. what
    /// is known of today's market so far, followed by what past days say
    /// of the rest.
    ///
    /// ```
    /// use nann::tar::sim::{MarketLog, PriceHistory, SimConfig};
    ///
    /// let config = SimConfig::sparse().with_pvs_per_day(5_000);
    /// let a = PriceHistory::from_logs(&[MarketLog::record(&config, 1)?])?;
    /// let b = PriceHistory::from_logs(&[MarketLog::record(&config, 2)?])?;
    /// let ab = a.splice(&b, 24)?;
    /// // From tick 24 on, the spliced history prices as `b` does.
    /// assert_eq!(ab.threshold(30, 50.0, f64::INFINITY, 1.0), b.threshold(30, 50.0, f64::INFINITY, 1.0));
    /// # Ok::<(), nann::tar::sim::SimError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`SimError::Config`] (field `history`) if the two are of different
    /// advertisers or day lengths.
    pub fn splice(&self, later: &PriceHistory, from: usize) -> Result<Self, SimError> {
        if later.advertiser != self.advertiser || later.ticks() != self.ticks() {
            return Err(SimError::Config {
                field: "history",
                message: format!(
                    "cannot splice the history of advertiser {} with {} ticks onto that of advertiser {} with {}",
                    later.advertiser,
                    later.ticks(),
                    self.advertiser,
                    self.ticks()
                ),
            });
        }
        let ticks = self.ticks();
        let from = from.min(ticks);
        let mut out = self.clone();
        out.days = self.days.min(later.days);
        // Suffix sums: rows `from..` are `later`'s; a row t < from is this
        // history's ticks t..from plus `later`'s from.. .
        for t in 0..=ticks {
            for b in 0..BINS {
                let i = t * BINS + b;
                let j = from * BINS + b;
                if t >= from {
                    out.rest_cost[i] = later.rest_cost[i];
                    out.rest_value[i] = later.rest_value[i];
                } else {
                    out.rest_cost[i] = self.rest_cost[i] - self.rest_cost[j] + later.rest_cost[j];
                    out.rest_value[i] =
                        self.rest_value[i] - self.rest_value[j] + later.rest_value[j];
                }
            }
        }
        // Prefix sums: ticks ..from are this history's.
        for t in from + 1..=ticks {
            out.seen_cost[t] = self.seen_cost[from] + later.seen_cost[t] - later.seen_cost[from];
            out.seen_value[t] =
                self.seen_value[from] + later.seen_value[t] - later.seen_value[from];
        }
        Ok(out)
    }

    /// Mean cost and pValue per bin over ticks `tick..` (empty past the
    /// end).
    pub(crate) fn rest(&self, tick: usize) -> (&[f64], &[f64]) {
        let t = tick.min(self.ticks());
        (
            &self.rest_cost[t * BINS..(t + 1) * BINS],
            &self.rest_value[t * BINS..(t + 1) * BINS],
        )
    }
}

/// OnlineLP on past days' prices (see the module docs): each tick, the
/// cheapest-first threshold over the history's mean remaining PVs that
/// spends the budget left without pushing the CPA past the target.
///
/// Advertisers without a history are bid for by a plain
/// [`OnlineLpPolicy`], so the policy runs on any day.
///
/// ```
/// use nann::tar::sim::{evaluate, HistoryLpPolicy, MarketLog, PriceHistory, SimConfig};
///
/// let config = SimConfig::recurring().with_pvs_per_day(5_000);
/// let past = (100..104)
///     .map(|seed| MarketLog::record(&config, seed))
///     .collect::<Result<Vec<_>, _>>()?;
/// let mut policy = HistoryLpPolicy::new([PriceHistory::from_logs(&past)?]);
/// let eval = evaluate(&config.with_budget_ratio(0.5), &mut policy, 0..2)?;
/// assert_eq!(eval.scores.len(), 2);
/// # Ok::<(), nann::tar::sim::SimError>(())
/// ```
#[derive(Debug, Clone)]
pub struct HistoryLpPolicy {
    histories: HashMap<usize, Arc<PriceHistory>>,
    /// Cap on alpha as a multiple of the CPA target.
    pub cap: f64,
    /// Exponent of today's price level over the history's (0 = the pure
    /// history).
    pub level_weight: f64,
    /// The CPA the guard allows, in CPA targets (1, the default), as
    /// [`OnlineLpPolicy::cpa_factor`].
    pub cpa_factor: f64,
    /// Windows of constant price levels per day (0, the default: none);
    /// see [`with_window_reading`](Self::with_window_reading).
    pub windows: usize,
    /// Today's cost and pValue per bin in the window of `window_index`.
    window_cost: Vec<f64>,
    window_value: Vec<f64>,
    window_index: Option<usize>,
    today: Option<Arc<PriceHistory>>,
    fallback: OnlineLpPolicy,
    prices: PriceMemory,
    today_cost: f64,
    today_value: f64,
    alpha: f64,
}

impl HistoryLpPolicy {
    /// The policy with one history per advertiser (a later history of the
    /// same advertiser replaces an earlier one); histories may be shared
    /// (`Arc<PriceHistory>`).
    pub fn new<H: Into<Arc<PriceHistory>>>(histories: impl IntoIterator<Item = H>) -> Self {
        Self {
            histories: histories
                .into_iter()
                .map(|h| {
                    let h = h.into();
                    (h.advertiser, h)
                })
                .collect(),
            cap: 1.3,
            level_weight: 0.0,
            cpa_factor: 1.0,
            windows: 0,
            window_cost: Vec::new(),
            window_value: Vec::new(),
            window_index: None,
            today: None,
            fallback: OnlineLpPolicy::default(),
            prices: PriceMemory::new(48),
            today_cost: 0.0,
            today_value: 0.0,
            alpha: 0.0,
        }
    }

    /// Reads the rest of the current window from today's prices: the day
    /// is `windows` equal windows whose price levels hold within a window
    /// and are drawn afresh between them (the simulator's pValue levels
    /// hold 4 hours: 6 windows). From the second tick of a window on, the
    /// ticks left in it are priced on the PVs seen in it today (their
    /// cost-per-value histogram, scaled to the window's remaining traffic
    /// by the history's ratio of remaining to seen), and the later windows
    /// on the history, as before. Takes precedence over
    /// [`level_weight`](Self::level_weight). 0 turns it off.
    pub fn with_window_reading(mut self, windows: usize) -> Self {
        self.windows = windows;
        self
    }

    /// Sets [`cpa_factor`](Self::cpa_factor) (a non-finite or non-positive
    /// value leaves it).
    pub fn with_cpa_factor(mut self, factor: f64) -> Self {
        if factor.is_finite() && factor > 0.0 {
            self.cpa_factor = factor;
        }
        self
    }

    /// Sets [`level_weight`](Self::level_weight) (a non-finite value leaves
    /// it).
    pub fn with_level_weight(mut self, weight: f64) -> Self {
        if weight.is_finite() {
            self.level_weight = weight;
        }
        self
    }
}

impl Policy for HistoryLpPolicy {
    fn name(&self) -> &str {
        "history_lp"
    }

    fn begin_day(&mut self, day: &DayContext<'_>) {
        self.today = self
            .histories
            .get(&day.advertiser)
            .filter(|h| h.ticks() == day.ticks)
            .cloned();
        self.fallback.begin_day(day);
        self.prices = PriceMemory::new(day.ticks);
        self.today_cost = 0.0;
        self.today_value = 0.0;
        self.window_index = None;
        self.alpha = day.cpa_target;
    }

    fn act(&mut self, obs: &Observation<'_>) -> f64 {
        let Some(history) = self.today.clone() else {
            return self.fallback.act(obs);
        };
        let cap = self.cap * obs.cpa_target;
        if self.windows > 0 {
            return self.act_windowed(obs, &history, cap);
        }
        if let Some(last) = obs.last {
            self.prices.observe(&last, self.alpha);
            // Today's level is read only with a level weight.
            if self.level_weight != 0.0 {
                for (&p, &c) in last.pvalues.iter().zip(last.least_winning_cost) {
                    if p > 0.0 && c > 0.0 {
                        self.today_cost += c as f64;
                        self.today_value += p as f64;
                    }
                }
            }
        }
        // Today's cost per value over the history's on the ticks seen.
        let t = obs.tick.min(history.ticks());
        let level = if self.level_weight != 0.0
            && self.today_value > 0.0
            && history.seen_value[t] > 0.0
            && history.seen_cost[t] > 0.0
        {
            let today = self.today_cost / self.today_value;
            let past = history.seen_cost[t] / history.seen_value[t];
            (today / past).powf(self.level_weight)
        } else {
            1.0
        };
        let k = self.prices.markup() * self.prices.exposure_rate() * level;
        let alpha = history
            .threshold(obs.tick, obs.remaining, obs.cpa_target * self.cpa_factor, k)
            .map_or(cap, |a| a * level);
        self.alpha = alpha.min(cap);
        self.alpha
    }
}

impl HistoryLpPolicy {
    /// [`act`](Policy::act) with the window reading (see
    /// [`with_window_reading`](Self::with_window_reading)).
    fn act_windowed(&mut self, obs: &Observation<'_>, history: &PriceHistory, cap: f64) -> f64 {
        let ticks = history.ticks();
        let len = (ticks / self.windows.max(1)).max(1);
        if let Some(last) = obs.last {
            self.prices.observe(&last, self.alpha);
            // The feedback is of tick t - 1: a new window starts afresh.
            let window = obs.tick.saturating_sub(1) / len;
            if self.window_index != Some(window) {
                self.window_index = Some(window);
                self.window_cost.clear();
                self.window_cost.resize(BINS, 0.0);
                self.window_value.clear();
                self.window_value.resize(BINS, 0.0);
            }
            for (&p, &c) in last.pvalues.iter().zip(last.least_winning_cost) {
                if p > 0.0 && c > 0.0 {
                    let b = bin_of(c as f64 / p as f64);
                    self.window_cost[b] += c as f64;
                    self.window_value[b] += p as f64;
                }
            }
        }
        let t = obs.tick.min(ticks);
        let start = t / len * len;
        let end = (start + len).min(ticks);
        // The history's expected pValue of the window's seen and remaining
        // ticks: today's seen PVs stand for the remaining ones in that ratio.
        let seen = history.seen_value[t] - history.seen_value[start];
        let remaining = history.seen_value[end] - history.seen_value[t];
        let k = self.prices.markup() * self.prices.exposure_rate();
        let cpa = obs.cpa_target * self.cpa_factor;
        let (later_cost, later_value) = history.rest(end);
        let alpha = if self.window_index == Some(t / len) && t > start && seen > 0.0 {
            let scale = remaining / seen;
            let bins = (0..BINS).map(|b| {
                (
                    self.window_cost[b] * scale + later_cost[b],
                    self.window_value[b] * scale + later_value[b],
                )
            });
            lp_threshold(bins, (obs.remaining, k), (cpa, k))
        } else {
            history.threshold(obs.tick, obs.remaining, cpa, k)
        };
        self.alpha = alpha.map_or(cap, |a| a.min(cap));
        self.alpha
    }
}
