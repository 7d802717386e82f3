//! The within-day price memory (`nann::tar::sim::PriceMemory`) against a direct
//! per-PV computation, and `TarPolicy`'s market readings in the simulator.
//!
//! The reference sorts the PVs by cost per value and accumulates them one
//! by one; the model bins them (log-spaced, 600 bins over 6 decades, so a
//! bin's upper edge is at most 2.33% above any cost per value in it). PVs
//! are placed in distinct bins so the two must agree up to that edge.
#![cfg(feature = "tar")]

use std::sync::Arc;

use nann::tar::model::TarModel;
use nann::tar::sim::{run_episode, Policy, PriceMemory, SimConfig, TickFeedback};
use nann::tar::{MarketReading, TarPolicy};

/// A bin's width as a ratio.
const BIN_RATIO: f64 = 1.0233;

struct Tick {
    pvalues: Vec<f32>,
    lwc: Vec<f32>,
}

impl Tick {
    /// `n` PVs whose costs per value are `10^(0.05 k + shift)`, k = 0..n,
    /// shuffled, with pValues in [1e-3, 2e-3).
    fn new(n: usize, shift: f64, seed: u64) -> Self {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (next() * (i + 1) as f64) as usize;
            order.swap(i, j);
        }
        let mut pvalues = Vec::with_capacity(n);
        let mut lwc = Vec::with_capacity(n);
        for &k in &order {
            let p = 1e-3 * (1.0 + next());
            let cpv = 10f64.powf(0.05 * k as f64 + shift + 0.01);
            pvalues.push(p as f32);
            lwc.push((cpv * p) as f32);
        }
        Self { pvalues, lwc }
    }

    fn feedback(&self) -> TickFeedback<'_> {
        TickFeedback {
            pvalues: &self.pvalues,
            least_winning_cost: &self.lwc,
            // Nothing charged: the markup stays at its prior of 1.
            cost: 0.0,
            wins: 0,
            exposures: 0,
            observed_conversions: 0,
        }
    }

    /// (cost per value, cost, value, weight) of every PV.
    fn pvs(&self, weight: f64) -> Vec<(f64, f64, f64, f64)> {
        self.pvalues
            .iter()
            .zip(&self.lwc)
            .map(|(&p, &c)| (c as f64 / p as f64, c as f64, p as f64, weight))
            .collect()
    }
}

/// The smallest cost per value at which the weighted PVs cheaper than it
/// spend `spend` in a tick of `n` PVs (exposure rate 0.8, markup 1).
fn reference_bid(pvs: &[(f64, f64, f64, f64)], spend: f64, n: usize) -> Option<f64> {
    let mut sorted = pvs.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count: f64 = pvs.iter().map(|p| p.3).sum();
    let mut acc = 0.0;
    for &(cpv, c, _, w) in &sorted {
        acc += c * w * n as f64 / count * 0.8;
        if acc >= spend {
            return Some(cpv);
        }
    }
    None
}

/// The cost per value of the last PV that keeps `0.8 x cost <= cpa x
/// value` over the PVs bought cheapest first (OnlineLP's CPA constraint,
/// per PV), and of the first that breaks it: any threshold in between buys
/// the same PVs.
fn reference_cpa(pvs: &[(f64, f64, f64, f64)], cpa: f64) -> (f64, f64) {
    let mut sorted = pvs.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut cost, mut value) = (0.0, 0.0);
    let mut last = 0.0;
    for &(cpv, c, v, w) in &sorted {
        if (cost + c * w) * 0.8 > cpa * (value + v * w) {
            return (last, cpv);
        }
        cost += c * w;
        value += v * w;
        last = cpv;
    }
    (last, f64::INFINITY)
}

fn within_bin(found: f64, expected: f64) -> bool {
    found >= expected * (1.0 - 1e-6) && found <= expected * BIN_RATIO
}

#[test]
fn bid_for_spend_matches_the_per_pv_computation() {
    let tick = Tick::new(80, 0.5, 7);
    let mut memory = PriceMemory::new(48);
    assert_eq!(memory.bid_for_spend(1.0, 100), None, "no feedback yet");
    memory.observe(&tick.feedback(), 0.0);
    let pvs = tick.pvs(1.0);
    let total: f64 = pvs.iter().map(|p| p.1).sum::<f64>() * 0.8 * 120.0 / 80.0;
    for frac in [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999] {
        let spend = frac * total;
        let expected = reference_bid(&pvs, spend, 120).unwrap();
        let found = memory.bid_for_spend(spend, 120).unwrap();
        assert!(
            within_bin(found, expected),
            "spend {spend}: {found} against {expected}"
        );
    }
    assert_eq!(
        memory.bid_for_spend(total * 1.01, 120),
        None,
        "more than everything"
    );
    assert_eq!(memory.bid_for_spend(0.0, 120), Some(0.0));
    assert_eq!(memory.bid_for_spend(f64::NAN, 120), None);
}

#[test]
fn older_ticks_weigh_less() {
    // Two ticks of disjoint price ranges: the older one cheap, the newer
    // one expensive. The memory forgets 0.85 per half-hour: per tick at
    // 48 ticks a day, 0.85^(1/6) per tick at 288.
    let old = Tick::new(40, 0.0, 1);
    let new = Tick::new(40, 2.5, 2);
    for (ticks, weight) in [(48, 0.85f64), (288, 0.85f64.powf(1.0 / 6.0))] {
        let mut memory = PriceMemory::new(ticks);
        memory.observe(&old.feedback(), 0.0);
        memory.observe(&new.feedback(), 0.0);
        let mut pvs = old.pvs(weight);
        pvs.extend(new.pvs(1.0));
        let count = 40.0 * (1.0 + weight);
        let total: f64 = pvs.iter().map(|p| p.1 * p.3).sum::<f64>() * 0.8 * 50.0 / count;
        for frac in [0.0001, 0.001, 0.2, 0.6, 0.95] {
            let spend = frac * total;
            let expected = reference_bid(&pvs, spend, 50).unwrap();
            let found = memory.bid_for_spend(spend, 50).unwrap();
            assert!(
                within_bin(found, expected),
                "{ticks} ticks, spend {spend}: {found} against {expected}"
            );
        }
    }
}

#[test]
fn cpa_threshold_matches_the_per_pv_computation() {
    let tick = Tick::new(100, 0.0, 3);
    let mut memory = PriceMemory::new(48);
    assert_eq!(memory.cpa_threshold(100.0), None);
    memory.observe(&tick.feedback(), 0.0);
    let pvs = tick.pvs(1.0);
    for cpa in [2.0, 10.0, 40.0, 300.0] {
        // Every case must buy some PVs and refuse some.
        let (last, first_over) = reference_cpa(&pvs, cpa);
        assert!(last > 0.0 && first_over.is_finite(), "cpa {cpa}");
        let found = memory.cpa_threshold(cpa).unwrap();
        assert!(
            found >= last && found < first_over,
            "cpa {cpa}: {found} not in [{last}, {first_over})"
        );
    }
}

#[test]
fn the_markup_scales_the_spend_by_what_was_charged() {
    let tick = Tick::new(50, 0.0, 5);
    let mut memory = PriceMemory::new(48);
    // Bid above every price: the model predicts 0.8 x all costs; charge
    // 1.5 x that (plus the prior's 10 units at 1).
    let all: f64 = tick.lwc.iter().map(|&c| c as f64).sum();
    let predicted = 0.8 * all;
    let feedback = TickFeedback {
        cost: 1.5 * predicted,
        ..tick.feedback()
    };
    memory.observe(&feedback, 1e9);
    let markup = (1.5 * predicted + 10.0) / (predicted + 10.0);
    assert!((memory.markup() - markup).abs() < 1e-9 * markup);
    let mut plain = PriceMemory::new(48);
    plain.observe(&tick.feedback(), 1e9);
    // The same spend costs a lower threshold in a market that charges more.
    let spend = 0.3 * predicted;
    let expected = reference_bid(&tick.pvs(1.0), spend / markup, 50).unwrap();
    let found = memory.bid_for_spend(spend, 50).unwrap();
    assert!(within_bin(found, expected), "{found} against {expected}");
    assert!(found < plain.bid_for_spend(spend, 50).unwrap());
}

#[test]
fn market_readings_bid_within_the_cap_on_a_simulated_day() {
    let model = Arc::new(TarModel::load("weights/tar-small.safetensors").unwrap());
    let sim = SimConfig::sparse().with_ticks(48).with_budget_ratio(0.75);
    let pvs_per_tick = sim.pvs_per_day as f64 / sim.ticks as f64;
    struct Capped {
        inner: TarPolicy,
        bids: Vec<f64>,
        cpa: f64,
    }
    impl Policy for Capped {
        fn name(&self) -> &str {
            "capped"
        }
        fn begin_day(&mut self, day: &nann::tar::sim::DayContext<'_>) {
            self.cpa = day.cpa_target;
            self.inner.begin_day(day);
        }
        fn act(&mut self, obs: &nann::tar::sim::Observation<'_>) -> f64 {
            let a = self.inner.act(obs);
            self.bids.push(a / self.cpa);
            a
        }
    }
    for reading in [
        MarketReading::NextTick,
        MarketReading::RestOfDay { cpa_guard: false },
        MarketReading::RestOfDay { cpa_guard: true },
    ] {
        let mut policy = Capped {
            inner: TarPolicy::new(model.clone(), 1.0, pvs_per_tick)
                .with_market_reading(reading, sim.ticks)
                .with_max_action(1.3),
            bids: Vec::new(),
            cpa: 0.0,
        };
        let log = run_episode(&sim, 1_000_003, &mut policy).unwrap();
        assert_eq!(policy.inner.errors(), 0, "{reading:?}");
        assert_eq!(policy.bids.len(), 48);
        assert!(
            policy
                .bids
                .iter()
                .all(|b| b.is_finite() && (0.0..=1.3 + 1e-6).contains(b)),
            "{reading:?}: {:?}",
            policy.bids
        );
        // The bids follow the market, not a constant.
        let distinct = policy
            .bids
            .iter()
            .filter(|&&b| (b - policy.bids[1]).abs() > 1e-3)
            .count();
        assert!(distinct > 10, "{reading:?}: {:?}", policy.bids);
        assert!(log.agent_outcome().cost > 0.0);
    }
}
