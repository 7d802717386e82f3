//! The 16-feature step records of AuctionNet's trajectory data
//! (`models.md` §4.4), and the score.

/// Tick-level means of one advertiser's per-PV quantities: the raw material
/// of the history features.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TickStats {
    /// PVs in the tick.
    pub pvs: usize,
    /// Mean bid over the tick's PVs.
    pub mean_bid: f64,
    /// Mean least winning cost.
    pub mean_lwc: f64,
    /// Mean pValue.
    pub mean_pvalue: f64,
    /// Observed conversions per PV (conversions revealed in the tick / PVs).
    pub conversion_rate: f64,
    /// Slots won per PV.
    pub win_rate: f64,
}

/// The 16 state features of a step, in AuctionNet's order. History means
/// are means of tick means (expanding over all past ticks, or rolling over
/// the last 3); they are 0 before the first tick. Conversion features use
/// *observed* conversions (with delays, those revealed so far).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepState {
    /// `(T - t) / T`.
    pub time_left: f64,
    /// Remaining budget / budget.
    pub budget_left: f64,
    /// Mean bid, all past ticks.
    pub bid_mean_all: f64,
    /// Mean bid, last 3 ticks.
    pub bid_mean_3: f64,
    /// Mean least winning cost, all past ticks.
    pub lwc_mean_all: f64,
    /// Mean pValue, all past ticks.
    pub pvalue_mean_all: f64,
    /// Mean conversion per PV, all past ticks.
    pub conversion_mean_all: f64,
    /// Mean win rate, all past ticks.
    pub win_rate_all: f64,
    /// Mean least winning cost, last 3 ticks.
    pub lwc_mean_3: f64,
    /// Mean pValue, last 3 ticks.
    pub pvalue_mean_3: f64,
    /// Mean conversion per PV, last 3 ticks.
    pub conversion_mean_3: f64,
    /// Mean win rate, last 3 ticks.
    pub win_rate_3: f64,
    /// Mean pValue of the current tick's PVs.
    pub pvalue_now: f64,
    /// PVs in the current tick.
    pub pvs_now: f64,
    /// PVs in the last 3 ticks.
    pub pvs_3: f64,
    /// PVs so far (before this tick).
    pub pvs_all: f64,
}

impl StepState {
    /// Computes the state of tick `t` from the advertiser's past tick stats
    /// (`history.len() == t`).
    pub fn from_history(
        history: &[TickStats],
        ticks: usize,
        budget_left: f64,
        pvalue_now: f64,
        pvs_now: usize,
    ) -> Self {
        let t = history.len();
        let last3 = &history[t.saturating_sub(3)..];
        let mean = |h: &[TickStats], f: fn(&TickStats) -> f64| {
            if h.is_empty() {
                0.0
            } else {
                h.iter().map(f).sum::<f64>() / h.len() as f64
            }
        };
        Self {
            time_left: (ticks - t.min(ticks)) as f64 / ticks as f64,
            budget_left,
            bid_mean_all: mean(history, |s| s.mean_bid),
            bid_mean_3: mean(last3, |s| s.mean_bid),
            lwc_mean_all: mean(history, |s| s.mean_lwc),
            pvalue_mean_all: mean(history, |s| s.mean_pvalue),
            conversion_mean_all: mean(history, |s| s.conversion_rate),
            win_rate_all: mean(history, |s| s.win_rate),
            lwc_mean_3: mean(last3, |s| s.mean_lwc),
            pvalue_mean_3: mean(last3, |s| s.mean_pvalue),
            conversion_mean_3: mean(last3, |s| s.conversion_rate),
            win_rate_3: mean(last3, |s| s.win_rate),
            pvalue_now,
            pvs_now: pvs_now as f64,
            pvs_3: last3.iter().map(|s| s.pvs as f64).sum(),
            pvs_all: history.iter().map(|s| s.pvs as f64).sum(),
        }
    }

    /// The features as an array, in AuctionNet's order.
    pub fn to_array(&self) -> [f64; 16] {
        [
            self.time_left,
            self.budget_left,
            self.bid_mean_all,
            self.bid_mean_3,
            self.lwc_mean_all,
            self.pvalue_mean_all,
            self.conversion_mean_all,
            self.win_rate_all,
            self.lwc_mean_3,
            self.pvalue_mean_3,
            self.conversion_mean_3,
            self.win_rate_3,
            self.pvalue_now,
            self.pvs_now,
            self.pvs_3,
            self.pvs_all,
        ]
    }
}

/// One (advertiser, tick) step: state, action and what followed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRecord {
    /// The advertiser.
    pub advertiser: usize,
    /// The tick.
    pub tick: usize,
    /// The 16 features before acting.
    pub state: StepState,
    /// The bid coefficient returned by the policy (negative clipped to 0;
    /// 0 when the advertiser had less than 0.1 budget left).
    pub action: f64,
    /// Cost charged in the tick.
    pub cost: f64,
    /// Slots won.
    pub wins: u32,
    /// Won slots shown.
    pub exposures: u32,
    /// Conversions generated in the tick (true; AuctionNet's `reward`).
    pub conversions: u32,
    /// Conversions revealed in the tick (equal to `conversions` without
    /// delays).
    pub observed_conversions: u32,
    /// Sum of the pValues of the shown slots (`reward_continuous`).
    pub reward_continuous: f64,
    /// Last tick of the day, or budget below the minimum afterwards.
    pub done: bool,
}

/// AuctionNet's score of an advertiser-day: `min(1, (CPA_target / CPA)^2) x
/// conversions` with `CPA = cost / conversions`; 0 without conversions.
pub fn score(conversions: f64, cost: f64, cpa_target: f64) -> f64 {
    if conversions <= 0.0 {
        return 0.0;
    }
    let cpa = cost / conversions;
    let penalty = if cpa <= cpa_target {
        1.0
    } else {
        (cpa_target / cpa).powi(2)
    };
    penalty * conversions
}
