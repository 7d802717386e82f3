//! Simulator parameters, the two presets, and the typed errors.

/// Everything the simulator can fail with. No call panics on caller input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A configuration field is out of its domain.
    #[error("simulator configuration `{field}`: {message}")]
    Config {
        /// The field of [`SimConfig`].
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A policy returned a bid coefficient that is not a finite number.
    #[error("policy of advertiser {advertiser} returned alpha {value} at tick {tick}")]
    Action {
        /// The advertiser the policy bids for.
        advertiser: usize,
        /// The tick.
        tick: usize,
        /// The value returned.
        value: f64,
    },
    /// [`run_episode_with`](super::run_episode_with) got the wrong number of
    /// policies.
    #[error("{found} policies for {expected} advertisers")]
    Policies {
        /// One per advertiser.
        expected: usize,
        /// What was passed.
        found: usize,
    },
    /// An evaluation over zero episodes.
    #[error("an evaluation needs at least one episode")]
    NoEpisodes,
}

/// The delayed-feedback option (DelaySim-like): a conversion generated at
/// tick `t` is observed `floor(d / tick_hours)` ticks later, with the delay
/// `d ~ Exponential(mean_hours)` in hours. Observations past the end of the
/// day are never made within the day; the score still counts them (the score
/// uses true conversions, the state features observed ones).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DelayConfig {
    /// Mean delay in hours (rates are per unit time, so the same delay spans
    /// 6x more ticks in a 288-tick day).
    pub mean_hours: f64,
}

/// A market whose population recurs from day to day, as AuctionNet's
/// periods do: the same advertisers (budgets, CPA targets, pValue spreads)
/// every day, and the same daily shape of every category's and advertiser's
/// pValue curve and of the traffic, drawn once from `population_seed`. Each
/// day multiplies every 4-hour pValue level and every 2-hour traffic level
/// by its own `U(1 - day_noise, 1 + day_noise)`.
///
/// Without it (the field `SimConfig::recurring` is `None`: the `sparse` and
/// `delayed` presets) every level is a fresh draw per day, so past days
/// show only the average day; with it they show the shape of today itself,
/// up to the day's noise. [`HistoryLpPolicy`](super::HistoryLpPolicy) is
/// the baseline that reads past days (it beats OnlineLP in both markets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecurringMarket {
    /// Seed of the population and of the daily shapes.
    pub population_seed: u64,
    /// Day-to-day noise of each level, in `[0, 1)`.
    pub day_noise: f64,
    /// Draw every level afresh each day from the day's seed, as the
    /// `sparse` market does, and keep only the population: the same
    /// advertisers every day, in days that share no shape (`day_noise` is
    /// then unused). Past days of such a market show what today's
    /// advertisers do to prices, and nothing of today's levels.
    pub fresh_levels: bool,
}

/// Which preset a configuration started from (for tables and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// AuctionNet-Sparse-like: tens of conversions per advertiser-day,
    /// conversions observed in the tick they happen.
    Sparse,
    /// The sparse market with DelaySim-like delayed conversions.
    Delayed,
    /// The sparse market with a population and daily shapes that recur
    /// across days ([`RecurringMarket`]).
    Recurring,
}

impl Preset {
    /// `"sparse"` or `"delayed"`.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Sparse => "sparse",
            Preset::Delayed => "delayed",
            Preset::Recurring => "recurring",
        }
    }
}

/// The simulator's parameters. Build one from [`SimConfig::sparse`] or
/// [`SimConfig::delayed`] and adjust with the `with_*` methods; every run
/// validates it first ([`SimConfig::validate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// The preset this configuration started from.
    pub preset: Preset,
    /// Industry categories (AuctionNet: 6).
    pub categories: usize,
    /// Advertisers per category (AuctionNet: 8); advertiser `i` is in
    /// category `i / per_category`.
    pub per_category: usize,
    /// Ticks per day: a multiple of 48 (48 = AuctionNet, 288 = 5-minute
    /// ticks). All rates are per unit time: a 288-tick day has the same
    /// traffic and the same market as a 48-tick one, cut 6x finer.
    pub ticks: usize,
    /// Page views (impression opportunities) per day. AuctionNet has 500k;
    /// we scale traffic down 10x and pValues up 10x, which keeps expected
    /// conversions per advertiser-day (the quantity that defines "sparse").
    pub pvs_per_day: usize,
    /// Base mean pValue (AuctionNet: 5e-4 with 500k PVs).
    pub base_pvalue: f64,
    /// Budgets are drawn uniformly in this range (AuctionNet: 2000–4850).
    pub budget_range: (f64, f64),
    /// CPA targets are drawn uniformly from `{lo, lo + step, ..., hi}`
    /// (AuctionNet: 60, 70, ..., 130).
    pub cpa_targets: (f64, f64, f64),
    /// GSP reserve price; a slot whose price would be the reserve is unsold.
    pub reserve_price: f64,
    /// Probability that slot 1, 2, 3 is shown (non-increasing, nested: slot
    /// 3 is never shown without slot 2).
    pub exposure: [f64; 3],
    /// Delayed conversions; `None` = observed in the tick they happen.
    pub delay: Option<DelayConfig>,
    /// A population and daily shapes that recur across days; `None` = every
    /// day's market drawn afresh.
    pub recurring: Option<RecurringMarket>,
    /// The advertiser controlled by the policy under test in
    /// [`run_episode`](super::run_episode).
    pub agent: usize,
    /// The agent's budget is its drawn budget times this (the papers'
    /// 0.5, 0.75, 1.0, 1.25, 1.5).
    pub budget_ratio: f64,
}

impl SimConfig {
    /// AuctionNet-Sparse-like: 6 x 8 advertisers, 48 ticks, 50k PVs a day,
    /// budgets 2000–4850, CPA targets 60–130, exposure (1, 0.8, 0.6).
    pub fn sparse() -> Self {
        Self {
            preset: Preset::Sparse,
            categories: 6,
            per_category: 8,
            ticks: 48,
            pvs_per_day: 50_000,
            base_pvalue: 5e-3,
            budget_range: (2000.0, 4850.0),
            cpa_targets: (60.0, 130.0, 10.0),
            reserve_price: 1e-4,
            exposure: [1.0, 0.8, 0.6],
            delay: None,
            recurring: None,
            agent: 0,
            budget_ratio: 1.0,
        }
    }

    /// The sparse market with conversions observed after an exponential
    /// delay of mean 2 hours (4 ticks at 48 a day, 24 at 288).
    pub fn delayed() -> Self {
        Self {
            preset: Preset::Delayed,
            delay: Some(DelayConfig { mean_hours: 2.0 }),
            ..Self::sparse()
        }
    }

    /// The sparse market with a recurring population: population seed 7,
    /// day-to-day noise 0.25 on every level (the shapes themselves span
    /// the same ranges as the sparse preset's daily draws).
    pub fn recurring() -> Self {
        Self {
            preset: Preset::Recurring,
            recurring: Some(RecurringMarket {
                population_seed: 7,
                day_noise: 0.25,
                fresh_levels: false,
            }),
            ..Self::sparse()
        }
    }

    /// The preset by name.
    pub fn preset(preset: Preset) -> Self {
        match preset {
            Preset::Sparse => Self::sparse(),
            Preset::Delayed => Self::delayed(),
            Preset::Recurring => Self::recurring(),
        }
    }

    /// Sets [`ticks`](Self::ticks).
    pub fn with_ticks(mut self, ticks: usize) -> Self {
        self.ticks = ticks;
        self
    }

    /// Sets [`budget_ratio`](Self::budget_ratio).
    pub fn with_budget_ratio(mut self, ratio: f64) -> Self {
        self.budget_ratio = ratio;
        self
    }

    /// Sets [`agent`](Self::agent).
    pub fn with_agent(mut self, agent: usize) -> Self {
        self.agent = agent;
        self
    }

    /// Sets [`delay`](Self::delay).
    pub fn with_delay(mut self, delay: Option<DelayConfig>) -> Self {
        self.delay = delay;
        self
    }

    /// Sets [`recurring`](Self::recurring).
    pub fn with_recurring(mut self, recurring: Option<RecurringMarket>) -> Self {
        self.recurring = recurring;
        self
    }

    /// Sets [`pvs_per_day`](Self::pvs_per_day).
    pub fn with_pvs_per_day(mut self, pvs: usize) -> Self {
        self.pvs_per_day = pvs;
        self
    }

    /// Number of advertisers (saturating: `validate` rejects a product
    /// that large).
    pub fn advertisers(&self) -> usize {
        self.categories.saturating_mul(self.per_category)
    }

    /// Length of one tick in hours.
    pub fn tick_hours(&self) -> f64 {
        24.0 / self.ticks as f64
    }

    /// Checks every field's domain.
    pub fn validate(&self) -> Result<(), SimError> {
        fn bad(field: &'static str, message: impl Into<String>) -> Result<(), SimError> {
            Err(SimError::Config {
                field,
                message: message.into(),
            })
        }
        let finite_pos = |x: f64| x.is_finite() && x > 0.0;
        if self.categories == 0 || self.per_category == 0 {
            return bad(
                "categories",
                "need at least one category and one advertiser in it",
            );
        }
        if self.advertisers() > u32::MAX as usize / 2 {
            return bad("per_category", "too many advertisers");
        }
        if self.ticks == 0 || !self.ticks.is_multiple_of(48) || self.ticks > 48 * 60 {
            return bad(
                "ticks",
                format!("{} is not a multiple of 48 in 48..=2880", self.ticks),
            );
        }
        if self.pvs_per_day == 0 || self.pvs_per_day > 100_000_000 {
            return bad(
                "pvs_per_day",
                format!("{} is not in 1..=1e8", self.pvs_per_day),
            );
        }
        // In range one by one, the sizes can still multiply past memory,
        // and an allocation that large aborts instead of failing. A tick
        // holds every advertiser's pValue of each of its PVs (a tick's
        // traffic is at most 4x the mean: the profile's peak over its mean,
        // 1.7, times the traffic level's 1.4 / 0.6); a day keeps a record
        // per advertiser and tick.
        let n_adv = self.advertisers();
        let tick_pvs = 4 * self.pvs_per_day / self.ticks + 1;
        if n_adv.saturating_mul(tick_pvs) > 1 << 30 || n_adv.saturating_mul(self.ticks) > 1 << 26 {
            return bad(
                "per_category",
                format!(
                    "{n_adv} advertisers x {tick_pvs} PVs a tick or x {} ticks exceed 2^30 / \
                     2^26 entries a tick / a day; use fewer advertisers, PVs or ticks",
                    self.ticks
                ),
            );
        }
        if !(finite_pos(self.base_pvalue) && self.base_pvalue <= 0.2) {
            return bad(
                "base_pvalue",
                format!("{} is not in (0, 0.2]", self.base_pvalue),
            );
        }
        let (lo, hi) = self.budget_range;
        if !(finite_pos(lo) && hi.is_finite() && hi >= lo) {
            return bad("budget_range", format!("({lo}, {hi}) is not 0 < lo <= hi"));
        }
        let (lo, hi, step) = self.cpa_targets;
        if !(finite_pos(lo) && hi.is_finite() && hi >= lo && finite_pos(step)) {
            return bad(
                "cpa_targets",
                format!("({lo}, {hi}, {step}) is not 0 < lo <= hi, step > 0"),
            );
        }
        if (hi - lo) / step > 1e6 {
            return bad(
                "cpa_targets",
                format!("({lo}, {hi}, {step}) has more than a million levels"),
            );
        }
        if !(self.reserve_price.is_finite() && self.reserve_price >= 0.0) {
            return bad(
                "reserve_price",
                format!("{} is negative or not finite", self.reserve_price),
            );
        }
        let e = self.exposure;
        if !(e.iter().all(|p| p.is_finite() && (0.0..=1.0).contains(p))
            && e[0] >= e[1]
            && e[1] >= e[2]
            && e[1] > 0.0)
        {
            return bad(
                "exposure",
                format!("{e:?} is not non-increasing in [0, 1] with slot 2 > 0"),
            );
        }
        if let Some(d) = self.delay {
            if !(d.mean_hours.is_finite() && d.mean_hours >= 0.0) {
                return bad(
                    "delay",
                    format!("mean {} h is negative or not finite", d.mean_hours),
                );
            }
        }
        if let Some(r) = self.recurring {
            if !(r.day_noise.is_finite() && (0.0..1.0).contains(&r.day_noise)) {
                return bad(
                    "recurring",
                    format!("day noise {} is not in [0, 1)", r.day_noise),
                );
            }
        }
        if self.agent >= self.advertisers() {
            return bad(
                "agent",
                format!(
                    "{} is not below {} advertisers",
                    self.agent,
                    self.advertisers()
                ),
            );
        }
        if !(finite_pos(self.budget_ratio) && self.budget_ratio <= 100.0) {
            return bad(
                "budget_ratio",
                format!("{} is not in (0, 100]", self.budget_ratio),
            );
        }
        Ok(())
    }
}
