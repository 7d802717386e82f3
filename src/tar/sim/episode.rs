//! One simulated day, and evaluation over many.

use super::auction::{exposed, Gsp, SLOTS};
use super::config::{SimConfig, SimError};
use super::market::{Market, TickTraffic};
use super::policy::{DayContext, Observation, Policy, PopulationPolicy, TickFeedback};
use super::records::{score, StepRecord, StepState, TickStats};
use super::rng::{kind, Rng};

/// Below this budget left an advertiser stops bidding (AuctionNet: 0.1).
pub const MIN_BUDGET: f64 = 0.1;

/// One advertiser's day.
#[derive(Debug, Clone, PartialEq)]
pub struct AdvertiserOutcome {
    /// Industry category.
    pub category: usize,
    /// The day's budget (the agent's scaled by the budget ratio).
    pub budget: f64,
    /// CPA target.
    pub cpa_target: f64,
    /// Total cost.
    pub cost: f64,
    /// Slots won.
    pub wins: u64,
    /// Won slots shown.
    pub exposures: u64,
    /// True conversions (what the score counts).
    pub conversions: u64,
    /// Conversions observed within the day (fewer than `conversions` when
    /// some delays run past the day's end).
    pub observed_conversions: u64,
    /// AuctionNet's score: [`score`](super::score) of the true conversions.
    pub score: f64,
}

/// Everything one day produced.
#[derive(Debug, Clone, PartialEq)]
pub struct EpisodeLog {
    /// The day's seed.
    pub seed: u64,
    /// The advertiser under test (the configuration's
    /// [`agent`](SimConfig::agent)).
    pub agent: usize,
    /// Ticks in the day.
    pub ticks: usize,
    /// PVs per tick.
    pub pvs_per_tick: Vec<usize>,
    /// Per advertiser.
    pub advertisers: Vec<AdvertiserOutcome>,
    /// Step records, tick-major: `records[t * advertisers + i]`.
    pub records: Vec<StepRecord>,
    /// Auction rounds per tick (1 = nobody overspent).
    pub auction_rounds: Vec<u32>,
}

impl EpisodeLog {
    /// The agent's outcome.
    pub fn agent_outcome(&self) -> &AdvertiserOutcome {
        &self.advertisers[self.agent]
    }

    /// Advertiser `i`'s step records, in tick order.
    pub fn records_of(&self, i: usize) -> impl Iterator<Item = &StepRecord> + '_ {
        let n = self.advertisers.len();
        self.records.iter().skip(i).step_by(n.max(1))
    }
}

/// Runs the day of `seed` with `agent` bidding for advertiser
/// [`config.agent`](SimConfig::agent) and a [`PopulationPolicy`] for every
/// other advertiser.
pub fn run_episode(
    config: &SimConfig,
    seed: u64,
    agent: &mut dyn Policy,
) -> Result<EpisodeLog, SimError> {
    config.validate()?;
    let mut population: Vec<PopulationPolicy> = (0..config.advertisers())
        .map(|_| PopulationPolicy::new(seed))
        .collect();
    let mut agent = Some(agent);
    let mut policies: Vec<&mut dyn Policy> = Vec::with_capacity(population.len());
    for (i, p) in population.iter_mut().enumerate() {
        if i == config.agent {
            if let Some(a) = agent.take() {
                policies.push(a);
                continue;
            }
        }
        policies.push(p);
    }
    run_episode_with(config, seed, &mut policies)
}

/// Runs the day of `seed` with one policy per advertiser (`policies[i]`
/// bids for advertiser `i`).
pub fn run_episode_with(
    config: &SimConfig,
    seed: u64,
    policies: &mut [&mut dyn Policy],
) -> Result<EpisodeLog, SimError> {
    let market = Market::generate(config, seed)?;
    let n_adv = config.advertisers();
    if policies.len() != n_adv {
        return Err(SimError::Policies {
            expected: n_adv,
            found: policies.len(),
        });
    }
    Day::new(config, &market, seed).run(policies)
}

/// The mutable state of a day in progress.
struct Day<'a> {
    config: &'a SimConfig,
    market: &'a Market,
    seed: u64,
    n_adv: usize,
    ticks: usize,
    remaining: Vec<f64>,
    history: Vec<Vec<TickStats>>,
    /// `reveal[i * ticks + r]`: conversions of advertiser `i` revealed at
    /// tick `r`.
    reveal: Vec<u32>,
    totals: Vec<AdvertiserOutcome>,
}

/// Per-tick results of the final auction round, per advertiser.
#[derive(Debug, Clone, Copy, Default)]
struct TickOutcome {
    cost: f64,
    wins: u32,
    exposures: u32,
    conversions: u32,
    reward_continuous: f64,
}

impl<'a> Day<'a> {
    fn new(config: &'a SimConfig, market: &'a Market, seed: u64) -> Self {
        let n_adv = config.advertisers();
        let ticks = config.ticks;
        let totals = market
            .advertisers()
            .iter()
            .map(|a| AdvertiserOutcome {
                category: a.category,
                budget: a.budget,
                cpa_target: a.cpa_target,
                cost: 0.0,
                wins: 0,
                exposures: 0,
                conversions: 0,
                observed_conversions: 0,
                score: 0.0,
            })
            .collect();
        Self {
            config,
            market,
            seed,
            n_adv,
            ticks,
            remaining: market.advertisers().iter().map(|a| a.budget).collect(),
            history: vec![Vec::with_capacity(ticks); n_adv],
            reveal: vec![0; n_adv * ticks],
            totals,
        }
    }

    fn run(mut self, policies: &mut [&mut dyn Policy]) -> Result<EpisodeLog, SimError> {
        let (n_adv, ticks) = (self.n_adv, self.ticks);
        for (i, p) in policies.iter_mut().enumerate() {
            let a = &self.market.advertisers()[i];
            p.begin_day(&DayContext {
                advertiser: i,
                category: a.category,
                budget: a.budget,
                cpa_target: a.cpa_target,
                ticks,
                traffic_share: self.market.traffic_share(),
            });
        }
        let mut cur = TickTraffic::default();
        let mut prev = TickTraffic::default();
        let mut lwc: Vec<f32> = Vec::new();
        let mut prev_lwc: Vec<f32> = Vec::new();
        let mut prev_out = vec![TickOutcome::default(); n_adv];
        let mut records = Vec::with_capacity(n_adv * ticks);
        let mut rounds = Vec::with_capacity(ticks);
        let mut alpha = vec![0.0; n_adv];
        let mut states = vec![StepState::default(); n_adv];
        for t in 0..ticks {
            self.market.draw_tick(t, &mut cur);
            let n = cur.n;
            for (i, policy) in policies.iter_mut().enumerate() {
                let pvs = cur.pvalues(i);
                let pvalue_now = mean_f32(pvs);
                let budget = self.totals[i].budget;
                let state = StepState::from_history(
                    &self.history[i],
                    ticks,
                    self.remaining[i] / budget,
                    pvalue_now,
                    n,
                );
                let last = (t > 0).then(|| TickFeedback {
                    pvalues: prev.pvalues(i),
                    least_winning_cost: &prev_lwc[i * prev.n..(i + 1) * prev.n],
                    cost: prev_out[i].cost,
                    wins: prev_out[i].wins,
                    exposures: prev_out[i].exposures,
                    observed_conversions: self.reveal[i * ticks + t - 1],
                });
                let a = policy.act(&Observation {
                    tick: t,
                    ticks,
                    budget,
                    remaining: self.remaining[i],
                    cpa_target: self.totals[i].cpa_target,
                    state: &state,
                    pvalues: pvs,
                    last,
                });
                if !a.is_finite() {
                    return Err(SimError::Action {
                        advertiser: i,
                        tick: t,
                        value: a,
                    });
                }
                alpha[i] = if self.remaining[i] < MIN_BUDGET {
                    0.0
                } else {
                    a.max(0.0)
                };
                states[i] = state;
            }
            let (out, r) = self.auction(t, &cur, &alpha, &mut lwc);
            rounds.push(r);
            for i in 0..n_adv {
                let o = out[i];
                self.remaining[i] -= o.cost;
                let tot = &mut self.totals[i];
                tot.cost += o.cost;
                tot.wins += o.wins as u64;
                tot.exposures += o.exposures as u64;
                tot.conversions += o.conversions as u64;
                let observed = self.reveal[i * ticks + t];
                tot.observed_conversions += observed as u64;
                let nf = n.max(1) as f64;
                let pvs = cur.pvalues(i);
                let mean_pv = mean_f32(pvs);
                self.history[i].push(TickStats {
                    pvs: n,
                    mean_bid: alpha[i] * mean_pv,
                    mean_lwc: lwc[i * n..(i + 1) * n]
                        .iter()
                        .map(|&x| x as f64)
                        .sum::<f64>()
                        / nf,
                    mean_pvalue: mean_pv,
                    conversion_rate: observed as f64 / nf,
                    win_rate: o.wins as f64 / nf,
                });
                records.push(StepRecord {
                    advertiser: i,
                    tick: t,
                    state: states[i],
                    action: alpha[i],
                    cost: o.cost,
                    wins: o.wins,
                    exposures: o.exposures,
                    conversions: o.conversions,
                    observed_conversions: observed,
                    reward_continuous: o.reward_continuous,
                    done: t + 1 == ticks || self.remaining[i] < MIN_BUDGET,
                });
            }
            prev_out = out;
            std::mem::swap(&mut prev, &mut cur);
            std::mem::swap(&mut prev_lwc, &mut lwc);
        }
        for tot in &mut self.totals {
            tot.score = score(tot.conversions as f64, tot.cost, tot.cpa_target);
        }
        Ok(EpisodeLog {
            seed: self.seed,
            agent: self.config.agent,
            ticks,
            pvs_per_tick: self.market.pvs_per_tick().to_vec(),
            advertisers: self.totals,
            records,
            auction_rounds: rounds,
        })
    }

    /// The tick's auctions with the over-spend rule; fills `lwc` and returns
    /// the per-advertiser outcome and the number of rounds.
    ///
    /// Over-spend rule (AuctionNet): if an advertiser's tick cost exceeds its
    /// remaining budget, a random `ceil(f x w)` of its `w` charged PVs, `f =
    /// (cost - remaining) / cost`, are withdrawn from it (it bids 0 there),
    /// and the whole tick is auctioned again, until nobody overspends. Each
    /// round withdraws at least one PV, so it ends.
    fn auction(
        &mut self,
        t: usize,
        traffic: &TickTraffic,
        alpha: &[f64],
        lwc: &mut Vec<f32>,
    ) -> (Vec<TickOutcome>, u32) {
        let n = traffic.n;
        let n_adv = self.n_adv;
        let cfg = self.config;
        let mut withdrawn = vec![false; n_adv * n];
        let mut bids = vec![0.0; n_adv];
        let mut results: Vec<Gsp> = vec![Gsp::default(); n];
        let mut shown: Vec<[bool; SLOTS]> = vec![[false; SLOTS]; n];
        // Exposure uniforms per PV, the same in every round.
        let uniforms: Vec<[f64; 3]> = (0..n)
            .map(|j| {
                let mut rng = Rng::new(self.seed, kind::OUTCOME, (t as u64) << 32 | j as u64);
                [rng.uniform(), rng.uniform(), rng.uniform()]
            })
            .collect();
        let mut round = 0u32;
        let mut cost = vec![0.0; n_adv];
        loop {
            round += 1;
            cost.iter_mut().for_each(|c| *c = 0.0);
            for j in 0..n {
                for (i, b) in bids.iter_mut().enumerate() {
                    *b = if withdrawn[i * n + j] {
                        0.0
                    } else {
                        alpha[i] * traffic.pvalue[i * n + j] as f64
                    };
                }
                let g = Gsp::run(&bids, cfg.reserve_price);
                let [u1, u2, u3] = uniforms[j];
                for (k, slot) in g.slots.iter().enumerate() {
                    shown[j][k] = false;
                    if let Some(w) = slot {
                        if exposed(k, &cfg.exposure, u1, u2, u3) {
                            shown[j][k] = true;
                            cost[w.advertiser as usize] += w.price;
                        }
                    }
                }
                results[j] = g;
            }
            let mut any = false;
            for i in 0..n_adv {
                let rem = self.remaining[i];
                if cost[i] <= rem {
                    continue;
                }
                any = true;
                let charged: Vec<usize> = (0..n)
                    .filter(|&j| {
                        results[j]
                            .slots
                            .iter()
                            .zip(&shown[j])
                            .any(|(s, &sh)| sh && s.is_some_and(|w| w.advertiser as usize == i))
                    })
                    .collect();
                let frac = (cost[i] - rem.max(0.0)) / cost[i];
                let k =
                    ((frac * charged.len() as f64).ceil() as usize).clamp(1, charged.len().max(1));
                let mut rng = Rng::new(
                    self.seed,
                    kind::OVERSPEND,
                    (t as u64) << 40 | (round as u64) << 20 | i as u64,
                );
                let mut pool = charged;
                for c in 0..k.min(pool.len()) {
                    let pick = c + rng.below(pool.len() - c);
                    pool.swap(c, pick);
                    withdrawn[i * n + pool[c]] = true;
                }
            }
            if !any {
                break;
            }
        }

        // Final round: wins, conversions, delays, least winning costs.
        let mut out = vec![TickOutcome::default(); n_adv];
        for (i, o) in out.iter_mut().enumerate() {
            o.cost = cost[i];
        }
        lwc.clear();
        lwc.resize(n_adv * n, 0.0);
        let tick_hours = cfg.tick_hours();
        for j in 0..n {
            let g = &results[j];
            for i in 0..n_adv {
                lwc[i * n + j] = g.least_winning_cost(i as u32) as f32;
            }
            let mut rng = Rng::new(self.seed, kind::OUTCOME, (t as u64) << 32 | j as u64);
            for _ in 0..3 {
                rng.uniform();
            }
            let mut delay_rng = Rng::new(self.seed, kind::DELAY, (t as u64) << 32 | j as u64);
            for (k, slot) in g.slots.iter().enumerate() {
                let (z, u) = (rng.normal(), rng.uniform());
                let delay_hours = match cfg.delay {
                    Some(d) => delay_rng.exponential(d.mean_hours),
                    None => 0.0,
                };
                let Some(w) = slot else { continue };
                let i = w.advertiser as usize;
                out[i].wins += 1;
                if !shown[j][k] {
                    continue;
                }
                out[i].exposures += 1;
                let p = traffic.pvalue[i * n + j] as f64;
                out[i].reward_continuous += p;
                let sigma = p * traffic.sigma_ratio[i] as f64;
                let value = (p + sigma * z).clamp(0.0, 1.0);
                if u < value {
                    out[i].conversions += 1;
                    let r = t + (delay_hours / tick_hours).floor() as usize;
                    if r < self.ticks {
                        self.reveal[i * self.ticks + r] += 1;
                    }
                }
            }
        }
        (out, round)
    }
}

fn mean_f32(xs: &[f32]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64
    }
}
