//! An AuctionNet-like auto-bidding simulator (issue 7, section 1).
//!
//! A day of ad auctions in which advertisers with budgets and CPA targets
//! bid for page views (PVs), as in AuctionNet's online environment (Su et
//! al., NeurIPS 2024; `models.md` §4). A [`Policy`] bids for one advertiser
//! (the *agent*); the others run a built-in [`PopulationPolicy`], or every
//! advertiser runs a policy of your choice ([`run_episode_with`]). Each day
//! logs the 16-feature step records ([`StepRecord`]) that trajectory models
//! (DT, TAR) train on, and scores the agent by AuctionNet's CPA-penalised
//! conversions ([`score`]).
//!
//! ```
//! use nann::tar::sim::{evaluate, run_episode, OnlineLpPolicy, SimConfig};
//!
//! let config = SimConfig::sparse().with_pvs_per_day(5_000).with_budget_ratio(0.75);
//! let log = run_episode(&config, 7, &mut OnlineLpPolicy::default())?;
//! let agent = log.agent_outcome();
//! assert!(agent.cost <= agent.budget + 1e-9);
//! assert_eq!(log.records_of(0).count(), 48);
//! let eval = evaluate(&config, &mut OnlineLpPolicy::default(), 0..3)?;
//! assert_eq!(eval.scores.len(), 3);
//! # Ok::<(), nann::tar::sim::SimError>(())
//! ```
//!
//! # Data flow of one tick
//!
//! ```text
//!  Market (seed)                         per advertiser i
//!  ─────────────                         ────────────────
//!  PVs of tick t ──► pValue[i][j] ──► state_i (16 features) ──► Policy_i ──► alpha_i
//!                                                                             │
//!  bid[i][j] = alpha_i x pValue[i][j] ◄────────────────────────────────────────┘
//!        │
//!        ▼  per PV j: GSP over 3 slots (price = next bid), exposure (1, 0.8, 0.6)
//!  cost_i = sum of prices of shown slots ──► over-spend? withdraw PVs, re-auction
//!        │
//!        ▼  per shown slot: conversion ~ Bernoulli(clip(N(p, p x sigma_ratio)))
//!  conversions ──► delay d ~ Exp(mean) ──► revealed at tick t + floor(d / tick)
//!        │                                         │
//!        ▼                                         ▼
//!  true totals ──► score            observed totals ──► next tick's state, feedback
//! ```
//!
//! # The generative story of a day
//!
//! All draws come from counter-based streams keyed by `(seed, kind, index)`
//! (e.g. the pValues of advertiser `i` at tick `t`, the exposure and
//! conversion noise of PV `j` at tick `t`), so a day is a pure function of
//! the seed and the policies, and a draw never depends on the draws before
//! it: re-auctioning a tick reuses its noise, and the conversions of a day
//! are the same with or without delays when the bids are.
//!
//! * **Advertisers.** `C x K` advertisers (default 6 x 8 = 48); advertiser
//!   `i` is in category `i / K`. Budget `~ U(2000, 4850)` (the agent's
//!   times the budget ratio), CPA target uniform on `{60, 70, ..., 130}`,
//!   relative pValue spread `r_i = clip(N(0.5, 0.1), 0.1, 1)`, sigma ratio
//!   mean `m_i = |N(0.15, 0.06)|`.
//! * **Traffic.** `P` PVs a day (default 50,000: AuctionNet's 500k scaled
//!   10x down, pValues 10x up). A fixed 48-value half-hour profile (trough
//!   at ticks 5–9, peak 16–22, max/min ≈ 12.7) times `U(0.6, 1.4)` per
//!   2-hour window, renormalised to `P`. With 288 ticks each half-hour is
//!   split evenly into 6 ticks: all rates are per unit time.
//! * **pValues.** Mean `mu_{i,t} = base x c_{cat(i),w} x a_{i,w}` over
//!   4-hour windows `w`, with category factor `c ~ U(0.3, 1.7)`, agent
//!   factor `a ~ U(0.5, 1.5)` (1 for the first advertiser of a category)
//!   and `base = 0.005`; standard deviation `mu x r_i x U(0.8, 1.2)` (jitter
//!   per half-hour). Each PV's pValue for each advertiser is an independent
//!   `clip(N(mu, sd), 0, 1)`. The tick's sigma ratio of advertiser `i` is
//!   `min(0.3, |N(m_i, m_i / 2)|)` (AuctionNet draws it per PV).
//! * **Bids and auction.** Advertiser `i` bids `alpha_i x pValue` (0 once
//!   its budget left is below 0.1). Per PV the three highest positive bids
//!   win slots 1–3 and pay the next-highest bid (GSP), floored at the
//!   reserve 1e-4; a slot priced at the reserve is unsold.
//! * **Exposure and cost.** Slot `k` is shown with probability (1, 0.8, 0.6),
//!   nested (slot 3 only if slot 2); cost is charged only if shown.
//! * **Over-spend rule.** If a tick's cost exceeds an advertiser's budget
//!   left, a random fraction `(cost - left) / cost` of its charged PVs is
//!   withdrawn and the tick re-auctioned, until nobody overspends: total
//!   cost never exceeds the budget.
//! * **Conversions.** A shown slot converts with probability `clip(p + p x
//!   sigma_ratio x N(0, 1), 0, 1)` (the true value around the prediction `p`).
//! * **Recurring market** (preset `recurring`, [`RecurringMarket`]). The
//!   advertisers and every level above (traffic per 2-hour window, category
//!   and agent factors per 4-hour window) are drawn once from a population
//!   seed, and each day multiplies each level by its own `U(1 - n, 1 + n)`
//!   (`n = 0.25`): past days show the shape of today, as AuctionNet's
//!   periods of one population do. [`HistoryLpPolicy`] is OnlineLP given
//!   that shape by hand. With `fresh_levels` only the advertisers recur and
//!   every level is the day's own draw, as in `sparse`.
//! * **Delays** (preset `delayed`). A conversion at tick `t` is revealed at
//!   tick `t + floor(d / tick_hours)`, `d ~ Exponential(2 h)`; those revealed
//!   after the day's end are never observed within it. The policy's state
//!   and feedback see observed conversions; the score counts true ones.
//!
//! # Offline replay
//!
//! Most auto-bidding papers (AuctionNet's offline evaluation, GAS, GAVE,
//! DBM-Bid; `models.md` §4.5) score a policy against *logged* days rather
//! than a live market. [`MarketLog::record`] logs what one advertiser saw
//! of a live day (per tick and PV: pValue, pValueSigma and least winning
//! cost; its budget, CPA target and category), and [`run_replay`] plays a
//! policy against the log: a PV is won iff the bid is positive and at least
//! its least winning cost, the winner pays that cost, every win is shown,
//! and the over-spend rule, conversion model, delays and score are the live
//! day's. The market is exogenous: prices do not react to the policy, so
//! policies replayed on the same logs are compared on the same prices.
//!
//! ```text
//!  live day of seed s ──► advertiser a's view, tick by tick ──► MarketLog
//!  (all population)        pValue, pValueSigma, lwc per PV        │
//!                                                                  ▼
//!  Policy ──► alpha ──► win PV j iff alpha x pValue_j >= lwc_j, pay lwc_j
//!    ▲                         │  over-spend? withdraw won PVs, redo
//!    │                         ▼
//!    │   conversion ~ Bernoulli(clip(N(pValue, pValueSigma), 0, 1)), delay
//!    └──── state (16 features), feedback ◄── observed │ true ──► score
//! ```
//!
//! The budget of the replay is the logged one times the configuration's
//! budget ratio (the log is recorded at ratio 1), so one log serves every
//! ratio; [`evaluate_replay`] averages a policy over many logs.
//!
//! ```
//! use nann::tar::sim::{run_replay, MarketLog, OnlineLpPolicy, SimConfig};
//!
//! let config = SimConfig::sparse().with_pvs_per_day(5_000);
//! let log = MarketLog::record(&config, 7)?;
//! let half = config.with_budget_ratio(0.5);
//! let replay = run_replay(&half, &log, 1, &mut OnlineLpPolicy::default())?;
//! assert_eq!(replay.outcome.budget, 0.5 * log.budget());
//! assert!(replay.outcome.cost <= replay.outcome.budget);
//! assert_eq!(replay.records.len(), 48);
//! # Ok::<(), nann::tar::sim::SimError>(())
//! ```
//!
//! # Departures from AuctionNet
//!
//! The population is one noisy pacing controller ([`PopulationPolicy`])
//! instead of a mix of pre-trained agents; the conversion value is a clipped
//! normal instead of a truncated one; the sigma ratio is per advertiser and
//! tick; exposure marginals are exactly (1, 0.8, 0.6); the RNG is not
//! re-seeded per call (AuctionNet's quirk).

mod auction;
mod config;
mod episode;
mod eval;
mod hindsight;
mod history;
mod ledger;
mod market;
mod policy;
mod prices;
mod records;
mod replay;
mod rng;
mod score_lp;

pub use auction::{exposed, Gsp, SlotWin, SLOTS};
pub use config::{DelayConfig, Preset, RecurringMarket, SimConfig, SimError};
pub use episode::{run_episode, run_episode_with, AdvertiserOutcome, EpisodeLog, MIN_BUDGET};
pub use eval::{evaluate, mean_ci95, Evaluation};
pub use hindsight::HindsightLpPolicy;
pub use history::{HistoryLpPolicy, PriceHistory};
pub use market::{Advertiser, Market, TickTraffic};
pub use policy::{
    ConstantPolicy, DayContext, Observation, OnlineLpPolicy, PidPolicy, Policy, PopulationPolicy,
    TickFeedback,
};
pub use prices::PriceMemory;
pub use records::{score, StepRecord, StepState, TickStats};
pub use replay::{evaluate_replay, run_replay, LoggedTick, MarketLog, ReplayLog};
pub use score_lp::ScoreLpPolicy;
