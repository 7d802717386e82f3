//! Offline replay: one advertiser's logged day played against a policy, in
//! an exogenous market (AuctionNet's offline evaluation, `models.md` §4.5).
//!
//! A [`MarketLog`] is what one advertiser saw of a live day: per tick, per
//! PV, its pValue, pValueSigma and least winning cost (the price it had to
//! beat). [`run_replay`] then plays a policy against the log: the policy
//! wins a PV iff its bid is positive and at least the logged least winning
//! cost, pays that cost, and every win is shown. The market does not react
//! to the policy, which is the point: scores of different policies on the
//! same logs are paired, and nothing the policy does can move the prices.
//!
//! ```text
//!  live day (seed, logging policy) ──► MarketLog: per tick t, per PV j:
//!                                      pValue, pValueSigma, lwc; budget, CPA
//!                                                  │
//!  state (16 features) ──► Policy ──► alpha        │
//!        ▲                               │         ▼
//!        │            bid_j = alpha x pValue_j ≥ lwc_j (> 0 bid) ⇒ won, pay lwc_j
//!        │                               │
//!        │               over-spend? withdraw won PVs, redo
//!        │                               ▼
//!        │        conversion ~ Bernoulli(clip(N(pValue, pValueSigma), 0, 1))
//!        │                               │ delay (as live)
//!        └── observed conversions ◄──────┘──► true conversions ──► score
//! ```

use super::config::{SimConfig, SimError};
use super::episode::{converts, overspend_withdrawals, run_agent_observed, AdvertiserOutcome};
use super::eval::{summarise, Evaluation};
use super::ledger::{Ledger, TickOutcome};
use super::market::Market;
use super::policy::{Policy, PopulationPolicy};
use super::records::StepRecord;
use super::rng::{kind, Rng};

/// One tick of a [`MarketLog`]: the advertiser's view of every PV of the
/// tick. The three slices have one entry per PV, in the same order.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedTick {
    pvalue: Vec<f32>,
    sigma: Vec<f32>,
    least_winning_cost: Vec<f32>,
}

impl LoggedTick {
    /// Number of PVs in the tick.
    pub fn len(&self) -> usize {
        self.pvalue.len()
    }

    /// Whether the tick had no PV.
    pub fn is_empty(&self) -> bool {
        self.pvalue.is_empty()
    }

    /// The predicted conversion probability of each PV (the bid is `alpha x
    /// pValue`).
    pub fn pvalues(&self) -> &[f32] {
        &self.pvalue
    }

    /// The standard deviation of each PV's true value around its pValue
    /// (AuctionNet's `pValueSigma`; the conversion draw uses it).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigma
    }

    /// The price each PV had to beat (AuctionNet's `leastWinningCost`: the
    /// third-highest bid of the other advertisers in the live day; 0 when
    /// fewer than three bid). A replayed bid at or above it wins the PV and
    /// pays it.
    pub fn least_winning_costs(&self) -> &[f32] {
        &self.least_winning_cost
    }
}

/// What one advertiser saw of one live day: the input of [`run_replay`].
///
/// Recorded from the simulator ([`MarketLog::record`]) at budget ratio 1
/// (the day as it happened, every advertiser with its drawn budget); the
/// replay applies its own configuration's budget ratio to the logged
/// budget, so one log serves every ratio.
#[derive(Debug, Clone, PartialEq)]
pub struct MarketLog {
    seed: u64,
    advertiser: usize,
    category: usize,
    budget: f64,
    cpa_target: f64,
    traffic_share: Vec<f64>,
    ticks: Vec<LoggedTick>,
}

impl MarketLog {
    /// Records advertiser [`config.agent`](SimConfig::agent)'s view of the
    /// day of `seed`, with every advertiser (the logged one included)
    /// bidding as the built-in [`PopulationPolicy`]: the market as it was,
    /// not as any policy under test would have made it.
    ///
    /// # Errors
    ///
    /// [`SimError::Config`] if `config` is invalid.
    pub fn record(config: &SimConfig, seed: u64) -> Result<Self, SimError> {
        Self::record_with(config, seed, &mut PopulationPolicy::new(seed))
    }

    /// Like [`record`](Self::record), with `logging` bidding for the logged
    /// advertiser instead (a logging policy: its bids shape the other
    /// advertisers' spending, hence the prices they set, but its own least
    /// winning costs never include its bid).
    ///
    /// The day runs at budget ratio 1 whatever `config.budget_ratio` is;
    /// `config.delay` applies (it matters only if `logging` reads
    /// conversions).
    ///
    /// # Errors
    ///
    /// [`SimError::Config`] if `config` is invalid; [`SimError::Action`] if
    /// `logging` returns a non-finite bid coefficient.
    pub fn record_with(
        config: &SimConfig,
        seed: u64,
        logging: &mut dyn Policy,
    ) -> Result<Self, SimError> {
        config.validate()?;
        let config = config.clone().with_budget_ratio(1.0);
        let i = config.agent;
        let mut ticks = Vec::with_capacity(config.ticks);
        let day = run_agent_observed(&config, seed, logging, &mut |_, traffic, lwc| {
            let n = traffic.n;
            let pvalue = traffic.pvalues(i).to_vec();
            let ratio = traffic.sigma_ratio[i] as f64;
            let sigma = pvalue.iter().map(|&p| (p as f64 * ratio) as f32).collect();
            ticks.push(LoggedTick {
                pvalue,
                sigma,
                least_winning_cost: lwc[i * n..(i + 1) * n].to_vec(),
            });
        })?;
        let me = day.agent_outcome();
        let market = Market::generate(&config, seed)?;
        Ok(Self {
            seed,
            advertiser: i,
            category: me.category,
            budget: me.budget,
            cpa_target: me.cpa_target,
            traffic_share: market.traffic_share().to_vec(),
            ticks,
        })
    }

    /// The seed of the logged day (the replay keys its over-spend draws by
    /// it).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The advertiser the log is of.
    pub fn advertiser(&self) -> usize {
        self.advertiser
    }

    /// Its industry category.
    pub fn category(&self) -> usize {
        self.category
    }

    /// Its budget, unscaled (the replay multiplies it by the budget ratio).
    pub fn budget(&self) -> f64 {
        self.budget
    }

    /// Its CPA target.
    pub fn cpa_target(&self) -> f64 {
        self.cpa_target
    }

    /// The expected share of the day's PVs per tick (the known daily
    /// profile, handed to the policy as in the live day).
    pub fn traffic_share(&self) -> &[f64] {
        &self.traffic_share
    }

    /// The logged ticks, in order.
    pub fn ticks(&self) -> &[LoggedTick] {
        &self.ticks
    }

    /// PVs in the day.
    pub fn pvs(&self) -> usize {
        self.ticks.iter().map(LoggedTick::len).sum()
    }
}

/// The result of one replayed day: the replayed advertiser's outcome and
/// step records (the same types as the live day's, so the same scoring and
/// training code reads both).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayLog {
    /// The seed of the conversion and delay draws.
    pub seed: u64,
    /// The seed of the logged day.
    pub day_seed: u64,
    /// The advertiser replayed.
    pub advertiser: usize,
    /// Its day: every win is shown, so `exposures == wins`.
    pub outcome: AdvertiserOutcome,
    /// Its step records, in tick order.
    pub records: Vec<StepRecord>,
    /// Over-spend rounds per tick (1 = within budget at once).
    pub auction_rounds: Vec<u32>,
}

/// Replays `log` with `policy` bidding (see the module docs).
///
/// The configuration supplies the budget ratio (applied to the logged
/// budget), the delay model and the tick count (which must be the log's);
/// its market parameters are not used. The policy sees the same
/// [`DayContext`](super::DayContext), [`Observation`](super::Observation)
/// and [`TickFeedback`](super::TickFeedback) as in the live day, with the
/// 16 features computed the same way; the feedback's least winning costs
/// are the logged ones.
///
/// Randomness: the conversion and delay draws of PV `j` at tick `t` come
/// from streams keyed by `(seed, t, j)`, so they do not depend on the bids
/// (two policies that win the same PV see the same conversion); the
/// over-spend rule's draws are keyed by the logged day's seed, so a policy
/// that does not read conversions pays the same whatever `seed` is.
///
/// # Errors
///
/// [`SimError::Config`] if `config` is invalid, or its `ticks` or `agent`
/// disagree with the log; [`SimError::Action`] if the policy returns a
/// non-finite bid coefficient.
pub fn run_replay(
    config: &SimConfig,
    log: &MarketLog,
    seed: u64,
    policy: &mut dyn Policy,
) -> Result<ReplayLog, SimError> {
    config.validate()?;
    if log.ticks.len() != config.ticks {
        return Err(SimError::Config {
            field: "ticks",
            message: format!(
                "the log has {} ticks, the configuration {}",
                log.ticks.len(),
                config.ticks
            ),
        });
    }
    if log.advertiser != config.agent {
        return Err(SimError::Config {
            field: "agent",
            message: format!(
                "the log is of advertiser {}, the configuration's agent is {}",
                log.advertiser, config.agent
            ),
        });
    }
    let mut ledger = Ledger::new(
        log.advertiser,
        log.category,
        log.budget * config.budget_ratio,
        log.cpa_target,
        config.ticks,
    );
    ledger.begin_day(policy, &log.traffic_share);
    let mut records = Vec::with_capacity(config.ticks);
    let mut rounds = Vec::with_capacity(config.ticks);
    let mut previous: Option<&LoggedTick> = None;
    for (t, tick) in log.ticks.iter().enumerate() {
        let last = previous.map(|p| (p.pvalues(), p.least_winning_costs()));
        let decision = ledger.act(policy, t, tick.pvalues(), last)?;
        let (out, r) = replay_tick(config, log, seed, t, tick, decision.alpha, &mut ledger);
        rounds.push(r);
        records.push(ledger.settle(t, tick.pvalues(), tick.least_winning_costs(), decision, out));
        previous = Some(tick);
    }
    Ok(ReplayLog {
        seed,
        day_seed: log.seed,
        advertiser: log.advertiser,
        outcome: ledger.finish(),
        records,
        auction_rounds: rounds,
    })
}

/// One replayed tick: wins (bid > 0 and bid >= lwc), the over-spend rule,
/// then conversions of the PVs kept (scheduled on `ledger`). Returns the
/// tick's outcome and the number of rounds.
fn replay_tick(
    config: &SimConfig,
    log: &MarketLog,
    seed: u64,
    t: usize,
    tick: &LoggedTick,
    alpha: f64,
    ledger: &mut Ledger,
) -> (TickOutcome, u32) {
    let wins = |j: usize| {
        let bid = alpha * tick.pvalue[j] as f64;
        bid > 0.0 && bid >= tick.least_winning_cost[j] as f64
    };
    let remaining = ledger.remaining();
    let mut withdrawn = vec![false; tick.len()];
    let mut won: Vec<usize> = Vec::new();
    let mut round = 0u32;
    let cost = loop {
        round += 1;
        won.clear();
        let mut cost = 0.0;
        for j in (0..tick.len()).filter(|&j| !withdrawn[j] && wins(j)) {
            won.push(j);
            cost += tick.least_winning_cost[j] as f64;
        }
        if cost <= remaining {
            break cost;
        }
        // Only PVs that cost something are withdrawn (each round withdraws
        // at least one, and cost > remaining >= 0 means there is one).
        let mut charged: Vec<usize> = won
            .iter()
            .copied()
            .filter(|&j| tick.least_winning_cost[j] > 0.0)
            .collect();
        let mut rng = Rng::new(
            log.seed,
            kind::REPLAY_OVERSPEND,
            (t as u64) << 40 | (round as u64) << 20 | log.advertiser as u64,
        );
        for &j in overspend_withdrawals(&mut rng, cost, remaining, &mut charged) {
            withdrawn[j] = true;
        }
    };

    let mut out = TickOutcome {
        cost,
        ..TickOutcome::default()
    };
    let tick_hours = config.tick_hours();
    for &j in &won {
        let p = tick.pvalue[j] as f64;
        out.wins += 1;
        out.exposures += 1;
        out.reward_continuous += p;
        let key = (t as u64) << 32 | j as u64;
        let mut rng = Rng::new(seed, kind::REPLAY_OUTCOME, key);
        let (z, u) = (rng.normal(), rng.uniform());
        if converts(p, tick.sigma[j] as f64, z, u) {
            out.conversions += 1;
            let delay_hours = match config.delay {
                Some(d) => Rng::new(seed, kind::REPLAY_DELAY, key).exponential(d.mean_hours),
                None => 0.0,
            };
            ledger.convert(t, delay_hours, tick_hours);
        }
    }
    (out, round)
}

/// Replays `policy` on each of `logs` (the conversion draws of a log keyed
/// by its day's seed) and summarises its scores, as
/// [`evaluate`](super::evaluate) does for live days.
///
/// # Errors
///
/// [`SimError::NoEpisodes`] for no logs; otherwise as [`run_replay`].
pub fn evaluate_replay(
    config: &SimConfig,
    logs: &[MarketLog],
    policy: &mut dyn Policy,
) -> Result<Evaluation, SimError> {
    if logs.is_empty() {
        return Err(SimError::NoEpisodes);
    }
    let outcomes = logs
        .iter()
        .map(|log| Ok(run_replay(config, log, log.seed, policy)?.outcome))
        .collect::<Result<Vec<_>, SimError>>()?;
    Ok(summarise(&outcomes))
}
