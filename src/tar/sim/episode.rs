//! One simulated day, and evaluation over many.

use super::auction::{exposed, Gsp, SLOTS};
use super::config::{SimConfig, SimError};
use super::ledger::{Ledger, TickOutcome};
use super::market::{Market, TickTraffic};
use super::policy::{Policy, PopulationPolicy};
use super::records::StepRecord;
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
    run_agent_observed(config, seed, agent, &mut |_, _, _| {})
}

/// Runs the day of `seed` with one policy per advertiser (`policies[i]`
/// bids for advertiser `i`).
pub fn run_episode_with(
    config: &SimConfig,
    seed: u64,
    policies: &mut [&mut dyn Policy],
) -> Result<EpisodeLog, SimError> {
    run_observed(config, seed, policies, &mut |_, _, _| {})
}

/// Reads each tick's market once its auctions are final: `(tick, traffic,
/// least winning costs)`, with `lwc[i * traffic.n + j]` advertiser `i`'s
/// least winning cost of PV `j`. The offline replay's log
/// ([`MarketLog`](super::MarketLog)) is recorded through it; it only
/// reads, so an observed day is the same day.
pub(super) type TickObserver<'o> = dyn FnMut(usize, &TickTraffic, &[f32]) + 'o;

/// [`run_episode`] with a [`TickObserver`].
pub(super) fn run_agent_observed(
    config: &SimConfig,
    seed: u64,
    agent: &mut dyn Policy,
    observe: &mut TickObserver<'_>,
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
    run_observed(config, seed, &mut policies, observe)
}

/// [`run_episode_with`] with a [`TickObserver`].
fn run_observed(
    config: &SimConfig,
    seed: u64,
    policies: &mut [&mut dyn Policy],
    observe: &mut TickObserver<'_>,
) -> Result<EpisodeLog, SimError> {
    let market = Market::generate(config, seed)?;
    let n_adv = config.advertisers();
    if policies.len() != n_adv {
        return Err(SimError::Policies {
            expected: n_adv,
            found: policies.len(),
        });
    }
    Day::new(config, &market, seed).run(policies, observe)
}

/// The over-spend rule's withdrawal (AuctionNet), shared by the live day
/// and the replay: when an advertiser's tick cost `cost` exceeds its budget
/// left `remaining`, a random `ceil(f x w)` (at least one) of its `w`
/// `charged` PVs, `f = (cost - remaining) / cost`, are withdrawn from it
/// and the tick is run again. Shuffles the chosen PVs to the front of
/// `charged` (a partial Fisher-Yates with `rng`) and returns them.
pub(super) fn overspend_withdrawals<'c>(
    rng: &mut Rng,
    cost: f64,
    remaining: f64,
    charged: &'c mut [usize],
) -> &'c [usize] {
    let frac = (cost - remaining.max(0.0)) / cost;
    let k = ((frac * charged.len() as f64).ceil() as usize).clamp(1, charged.len().max(1));
    let k = k.min(charged.len());
    for c in 0..k {
        let pick = c + rng.below(charged.len() - c);
        charged.swap(c, pick);
    }
    &charged[..k]
}

/// The conversion model, shared by the live day and the replay: a shown
/// impression with pValue `p` and pValueSigma `sigma` has the true value
/// `clip(p + sigma x z, 0, 1)` and converts iff `u` is below it (`z`
/// standard normal, `u` uniform on `[0, 1)`).
pub(super) fn converts(p: f64, sigma: f64, z: f64, u: f64) -> bool {
    u < (p + sigma * z).clamp(0.0, 1.0)
}

/// The mutable state of a day in progress.
struct Day<'a> {
    config: &'a SimConfig,
    market: &'a Market,
    seed: u64,
    n_adv: usize,
    ticks: usize,
    /// One per advertiser.
    ledgers: Vec<Ledger>,
}

impl<'a> Day<'a> {
    fn new(config: &'a SimConfig, market: &'a Market, seed: u64) -> Self {
        let ticks = config.ticks;
        let ledgers = market
            .advertisers()
            .iter()
            .enumerate()
            .map(|(i, a)| Ledger::new(i, a.category, a.budget, a.cpa_target, ticks))
            .collect();
        Self {
            config,
            market,
            seed,
            n_adv: config.advertisers(),
            ticks,
            ledgers,
        }
    }

    fn run(
        mut self,
        policies: &mut [&mut dyn Policy],
        observe: &mut TickObserver<'_>,
    ) -> Result<EpisodeLog, SimError> {
        let (n_adv, ticks) = (self.n_adv, self.ticks);
        for (ledger, p) in self.ledgers.iter().zip(policies.iter_mut()) {
            ledger.begin_day(&mut **p, self.market.traffic_share());
        }
        let mut cur = TickTraffic::default();
        let mut prev = TickTraffic::default();
        let mut lwc: Vec<f32> = Vec::new();
        let mut prev_lwc: Vec<f32> = Vec::new();
        let mut records = Vec::with_capacity(n_adv * ticks);
        let mut rounds = Vec::with_capacity(ticks);
        let mut alpha = vec![0.0; n_adv];
        let mut decisions = Vec::with_capacity(n_adv);
        for t in 0..ticks {
            self.market.draw_tick(t, &mut cur);
            decisions.clear();
            for (i, policy) in policies.iter_mut().enumerate() {
                let previous =
                    (t > 0).then(|| (prev.pvalues(i), &prev_lwc[i * prev.n..(i + 1) * prev.n]));
                let d = self.ledgers[i].act(&mut **policy, t, cur.pvalues(i), previous)?;
                alpha[i] = d.alpha;
                decisions.push(d);
            }
            let (out, r) = self.auction(t, &cur, &alpha, &mut lwc);
            rounds.push(r);
            let n = cur.n;
            for (i, ledger) in self.ledgers.iter_mut().enumerate() {
                records.push(ledger.settle(
                    t,
                    cur.pvalues(i),
                    &lwc[i * n..(i + 1) * n],
                    decisions[i],
                    out[i],
                ));
            }
            observe(t, &cur, &lwc);
            std::mem::swap(&mut prev, &mut cur);
            std::mem::swap(&mut prev_lwc, &mut lwc);
        }
        Ok(EpisodeLog {
            seed: self.seed,
            agent: self.config.agent,
            ticks,
            pvs_per_tick: self.market.pvs_per_tick().to_vec(),
            advertisers: self.ledgers.into_iter().map(Ledger::finish).collect(),
            records,
            auction_rounds: rounds,
        })
    }

    /// The tick's auctions with the over-spend rule
    /// ([`overspend_withdrawals`]: the whole tick is auctioned again until
    /// nobody overspends; each round withdraws at least one PV, so it
    /// ends); fills `lwc` and returns the per-advertiser outcome and the
    /// number of rounds.
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
                let rem = self.ledgers[i].remaining();
                if cost[i] <= rem {
                    continue;
                }
                any = true;
                let mut charged: Vec<usize> = (0..n)
                    .filter(|&j| {
                        results[j]
                            .slots
                            .iter()
                            .zip(&shown[j])
                            .any(|(s, &sh)| sh && s.is_some_and(|w| w.advertiser as usize == i))
                    })
                    .collect();
                let mut rng = Rng::new(
                    self.seed,
                    kind::OVERSPEND,
                    (t as u64) << 40 | (round as u64) << 20 | i as u64,
                );
                for &j in overspend_withdrawals(&mut rng, cost[i], rem, &mut charged) {
                    withdrawn[i * n + j] = true;
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
                if converts(p, p * traffic.sigma_ratio[i] as f64, z, u) {
                    out[i].conversions += 1;
                    self.ledgers[i].convert(t, delay_hours, tick_hours);
                }
            }
        }
        (out, round)
    }
}
