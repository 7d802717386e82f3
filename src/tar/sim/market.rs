//! The market of one day: advertisers, the daily traffic profile, and the
//! pValue model.

use super::config::{SimConfig, SimError};
use super::rng::{kind, Rng};

/// The 48 half-hour weights of the daily traffic profile (relative; the
/// shape of AuctionNet's `NeurIPSPvGen` profile: night trough at ticks 5–9,
/// the minimum at tick 7, the peak around ticks 16–22, max/min ≈ 12.7).
const PROFILE_48: [f64; 48] = [
    1.6, 1.3, 1.0, 0.8, 0.6, 0.45, 0.35, 0.30, 0.35, 0.45, // 00:00–04:59
    0.7, 1.0, 1.4, 1.9, 2.4, 2.9, // 05:00–07:59
    3.3, 3.6, 3.8, 3.7, 3.5, 3.3, 3.1, // 08:00–11:29 (peak)
    2.9, 2.7, 2.6, 2.5, 2.5, 2.4, 2.4, 2.3, 2.3, 2.3, 2.2, 2.2, 2.2, // afternoon
    2.3, 2.4, 2.5, 2.6, 2.6, 2.5, 2.4, 2.3, 2.2, 2.1, 1.9, 1.8, // evening
];

/// One advertiser of the day.
#[derive(Debug, Clone, PartialEq)]
pub struct Advertiser {
    /// Industry category.
    pub category: usize,
    /// The day's budget (the agent's already scaled by the budget ratio).
    pub budget: f64,
    /// CPA target: the cost per conversion the advertiser accepts.
    pub cpa_target: f64,
    /// Relative standard deviation of its pValues around their mean.
    pub rel_std: f64,
    /// Mean of its pValueSigma / pValue ratio.
    pub sigma_ratio: f64,
}

/// The traffic of one tick: every PV's pValue for every advertiser.
#[derive(Debug, Clone, Default)]
pub struct TickTraffic {
    /// Number of PVs.
    pub n: usize,
    /// `pvalue[i * n + j]`: advertiser `i`'s predicted conversion
    /// probability for PV `j`.
    pub pvalue: Vec<f32>,
    /// Per advertiser: the tick's pValueSigma / pValue ratio (the
    /// uncertainty of the predictions).
    pub sigma_ratio: Vec<f32>,
}

impl TickTraffic {
    /// Advertiser `i`'s pValues.
    pub fn pvalues(&self, i: usize) -> &[f32] {
        &self.pvalue[i * self.n..(i + 1) * self.n]
    }
}

/// A generated day: advertisers, PVs per tick, and the pValue curves.
#[derive(Debug, Clone)]
pub struct Market {
    seed: u64,
    ticks: usize,
    advertisers: Vec<Advertiser>,
    share: Vec<f64>,
    pvs: Vec<usize>,
    /// `mean[i * ticks + t]`: mean pValue of advertiser `i` at tick `t`.
    mean: Vec<f64>,
    /// `std[i * ticks + t]`: its standard deviation.
    std: Vec<f64>,
}

impl Market {
    /// Generates the day of `seed` (see the module docs of [`sim`](super)
    /// for the story).
    pub fn generate(config: &SimConfig, seed: u64) -> Result<Self, SimError> {
        config.validate()?;
        let n_adv = config.advertisers();
        let ticks = config.ticks;
        let fine = ticks / 48;

        // In a recurring market the advertisers and the levels' shapes come
        // from the population seed, and each day only scales the levels;
        // with fresh levels only the advertisers do.
        let population = config.recurring.map_or(seed, |r| r.population_seed);
        let shapes = match config.recurring {
            Some(r) if !r.fresh_levels => population,
            _ => seed,
        };
        let level = |stream: u64, index: u64, lo: f64, hi: f64| -> f64 {
            let shape = Rng::new(shapes, stream, index).range(lo, hi);
            match config.recurring {
                None => shape,
                Some(r) if r.fresh_levels => shape,
                Some(r) => {
                    let key = stream << 40 | index;
                    shape
                        * Rng::new(seed, kind::DAY_NOISE, key)
                            .range(1.0 - r.day_noise, 1.0 + r.day_noise)
                }
            }
        };

        // Advertisers.
        let (blo, bhi) = config.budget_range;
        let (clo, chi, cstep) = config.cpa_targets;
        let levels = ((chi - clo) / cstep + 1e-9).floor() as usize + 1;
        let advertisers: Vec<Advertiser> = (0..n_adv)
            .map(|i| {
                let mut rng = Rng::new(population, kind::ADVERTISER, i as u64);
                let mut budget = rng.range(blo, bhi);
                let cpa_target = clo + cstep * rng.below(levels) as f64;
                let rel_std = (0.5 + 0.1 * rng.normal()).clamp(0.1, 1.0);
                let sigma_ratio = (0.15 + 0.06 * rng.normal()).abs();
                if i == config.agent {
                    budget *= config.budget_ratio;
                }
                Advertiser {
                    category: i / config.per_category,
                    budget,
                    cpa_target,
                    rel_std,
                    sigma_ratio,
                }
            })
            .collect();

        // Traffic: profile x U(0.6, 1.4) per 2-hour window, renormalised.
        let total: f64 = PROFILE_48.iter().sum();
        let share: Vec<f64> = (0..ticks)
            .map(|t| PROFILE_48[t / fine] / total / fine as f64)
            .collect();
        let mut noisy: Vec<f64> = (0..ticks)
            .map(|t| {
                let window = (t / fine / 4) as u64;
                share[t] * level(kind::TRAFFIC, window, 0.6, 1.4)
            })
            .collect();
        let sum: f64 = noisy.iter().sum();
        noisy.iter_mut().for_each(|x| *x /= sum);
        // Cumulative rounding: the counts add up to pvs_per_day exactly.
        let mut pvs = Vec::with_capacity(ticks);
        let mut acc = 0.0;
        let mut given = 0usize;
        for x in &noisy {
            acc += x * config.pvs_per_day as f64;
            let upto = (acc.round() as usize).min(config.pvs_per_day);
            pvs.push(upto - given);
            given = upto;
        }

        // pValue curves: base x category factor x agent factor, piecewise
        // constant over 4-hour windows; the std jittered per half-hour.
        let mut mean = vec![0.0; n_adv * ticks];
        let mut std = vec![0.0; n_adv * ticks];
        for (i, adv) in advertisers.iter().enumerate() {
            let first = i % config.per_category == 0;
            for t in 0..ticks {
                let half_hour = t / fine;
                let window = (half_hour / 8) as u64;
                let cat = level(
                    kind::CATEGORY_CURVE,
                    (adv.category as u64) << 8 | window,
                    0.3,
                    1.7,
                );
                let own = if first {
                    1.0
                } else {
                    level(kind::AGENT_CURVE, (i as u64) << 8 | window, 0.5, 1.5)
                };
                let m = config.base_pvalue * cat * own;
                let jitter = Rng::new(seed, kind::JITTER, (i as u64) << 16 | half_hour as u64)
                    .range(0.8, 1.2);
                mean[i * ticks + t] = m;
                std[i * ticks + t] = m * adv.rel_std * jitter;
            }
        }
        Ok(Self {
            seed,
            ticks,
            advertisers,
            share,
            pvs,
            mean,
            std,
        })
    }

    /// The advertisers.
    pub fn advertisers(&self) -> &[Advertiser] {
        &self.advertisers
    }

    /// The expected share of the day's PVs in each tick (the profile,
    /// without the day's noise): what a bidder knows from past days.
    pub fn traffic_share(&self) -> &[f64] {
        &self.share
    }

    /// PVs in each tick (this day's, noise included).
    pub fn pvs_per_tick(&self) -> &[usize] {
        &self.pvs
    }

    /// Mean pValue of advertiser `i` at tick `t`.
    pub fn mean_pvalue(&self, i: usize, t: usize) -> f64 {
        self.mean[i * self.ticks + t]
    }

    /// Draws tick `t`'s pValues into `out` (reusing its buffers).
    pub fn draw_tick(&self, t: usize, out: &mut TickTraffic) {
        let n = self.pvs[t];
        let n_adv = self.advertisers.len();
        out.n = n;
        out.pvalue.clear();
        out.pvalue.reserve(n * n_adv);
        out.sigma_ratio.clear();
        for (i, adv) in self.advertisers.iter().enumerate() {
            let key = (t * n_adv + i) as u64;
            let (m, s) = (self.mean[i * self.ticks + t], self.std[i * self.ticks + t]);
            let mut rng = Rng::new(self.seed, kind::PVALUE, key);
            out.pvalue
                .extend((0..n).map(|_| (m + s * rng.normal()).clamp(0.0, 1.0) as f32));
            let mu = adv.sigma_ratio;
            let ratio = (mu + 0.5 * mu * Rng::new(self.seed, kind::SIGMA, key).normal()).abs();
            out.sigma_ratio.push(ratio.min(0.3) as f32);
        }
    }
}
