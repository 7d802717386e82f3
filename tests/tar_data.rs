//! The trajectory data the learned bidders train on (`nann::tar::data`).
#![cfg(feature = "tar")]

use nann::tar::data::{attributes, step_features, DataConfig, Dataset};
use nann::tar::model::{ACTION_SLOT, STEP_FEATURES};
use nann::tar::sim::{run_episode, score, ConstantPolicy, MarketLog, SimConfig, StepState};

fn small() -> SimConfig {
    SimConfig::sparse().with_pvs_per_day(10_000)
}

fn config(episodes: u64, threads: usize) -> DataConfig {
    DataConfig {
        episodes,
        first_seed: 100,
        population_per_episode: 2,
        threads,
        ..DataConfig::default()
    }
}

#[test]
fn collection_is_deterministic_and_independent_of_threads() {
    let one = Dataset::collect(&small(), &config(6, 1)).unwrap();
    let two = Dataset::collect(&small(), &config(6, 2)).unwrap();
    assert_eq!(one, two);
    // Agent plus two population advertisers per day.
    assert_eq!(one.trajectories.len(), 18);
}

#[test]
fn trajectories_are_consistent_with_the_day_they_came_from() {
    let sim = small();
    let data = Dataset::collect(&sim, &config(4, 1)).unwrap();
    for tr in &data.trajectories {
        assert_eq!(tr.steps.len(), sim.ticks);
        assert_eq!(tr.actions.len(), sim.ticks);
        assert_eq!(tr.rewards.len(), sim.ticks);
        // x_t carries a_{t-1}: state-action fusion.
        assert_eq!(tr.steps[0][ACTION_SLOT], 0.0);
        for t in 1..sim.ticks {
            assert_eq!(tr.steps[t][ACTION_SLOT], tr.actions[t - 1]);
        }
        for s in &tr.steps {
            assert!(s.iter().all(|v| v.is_finite()));
        }
        // time_left falls from 1 by 1/T per tick.
        assert!((tr.steps[0][0] - 1.0).abs() < 1e-6);
        assert!((tr.steps[1][0] - (1.0 - 1.0 / sim.ticks as f32)).abs() < 1e-6);
        let conversions: f32 = tr.rewards.iter().sum();
        let cost: f32 = tr.costs.iter().sum();
        let expect = score(conversions as f64, cost as f64, tr.cpa_target);
        assert!(
            (tr.score - expect).abs() <= 1e-3 * expect.max(1.0),
            "{} vs {expect}",
            tr.score
        );
        assert!(cost as f64 <= tr.budget * (1.0 + 1e-5));
        let expect = attributes(
            tr.score,
            tr.budget,
            tr.cpa_target,
            cost as f64,
            conversions as f64,
        );
        for (a, b) in tr.attributes.iter().zip(&expect) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        // Spend ratio and CPA ratio are what they say.
        assert!((tr.attributes[1] as f64 - cost as f64 / tr.budget).abs() < 1e-4);
        assert!(tr.attributes[2] <= 2.0);
    }
}

#[test]
fn step_features_are_scale_free() {
    // The same state with every price doubled and CPA doubled gives the
    // same features.
    let s = StepState {
        time_left: 0.5,
        budget_left: 0.3,
        bid_mean_all: 0.4,
        bid_mean_3: 0.5,
        lwc_mean_all: 0.2,
        pvalue_mean_all: 0.004,
        conversion_mean_all: 0.001,
        win_rate_all: 0.2,
        lwc_mean_3: 0.25,
        pvalue_mean_3: 0.005,
        conversion_mean_3: 0.002,
        win_rate_3: 0.3,
        pvalue_now: 0.006,
        pvs_now: 1000.0,
        pvs_3: 3000.0,
        pvs_all: 20000.0,
    };
    let mut doubled = s;
    for v in [
        &mut doubled.bid_mean_all,
        &mut doubled.bid_mean_3,
        &mut doubled.lwc_mean_all,
        &mut doubled.lwc_mean_3,
    ] {
        *v *= 2.0;
    }
    let a = step_features(&s, 1.1, 80.0, 1000.0);
    let b = step_features(&doubled, 1.1, 160.0, 1000.0);
    assert_eq!(a.len(), STEP_FEATURES);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0));
    }
    assert_eq!(a[ACTION_SLOT], 1.1);
    assert_eq!(a[13], 1.0);
}

#[test]
fn the_log_covers_good_and_bad_days() {
    // Behaviour policies differ: the efficiencies of the agents' days must
    // spread, or a conditional model has nothing to learn from.
    let data = Dataset::collect(&small(), &config(24, 2)).unwrap();
    let lo = data.attribute_quantile(0, 0.1);
    let hi = data.attribute_quantile(0, 0.9);
    assert!(hi > lo * 1.5 + 1e-3, "efficiency quantiles {lo} .. {hi}");
    // A constant truthful bidder's day agrees with the features' scale.
    let log = run_episode(&small(), 100, &mut ConstantPolicy::default()).unwrap();
    assert_eq!(log.records_of(0).count(), 48);
}

#[test]
fn hindsight_days_bid_onlinelp_re_solved_on_the_days_actual_pvs() {
    // With every day a hindsight day, the agent's action at each tick is,
    // up to the behaviour's log-normal noise (sigma <= 0.25, median 1), the
    // threshold that spends its budget left over the logged day's actual
    // remaining PVs cheapest first without passing the CPA target, capped
    // at 1.3 CPA: recomputed here from the log and the trajectory alone.
    let sim = small();
    let data = DataConfig {
        hindsight_share: 1.0,
        ..config(6, 1)
    };
    let set = Dataset::collect(&sim, &data).unwrap();
    // Agent first, then two population advertisers, per day.
    let agents: Vec<_> = set.trajectories.iter().step_by(3).collect();
    assert_eq!(agents.len(), 6);
    for (day, tr) in agents.iter().enumerate() {
        let seed = 100 + day as u64;
        let log = MarketLog::record(&sim.clone().with_agent(tr.advertiser), seed).unwrap();
        let cpa = tr.cpa_target;
        let mut ratios = Vec::new();
        for t in 0..sim.ticks {
            let remaining = tr.steps[t][1] as f64 * tr.budget;
            if remaining < 1.0 {
                break;
            }
            let mut rest: Vec<(f64, f64, f64)> = Vec::new();
            for tick in &log.ticks()[t..] {
                for (&p, &c) in tick.pvalues().iter().zip(tick.least_winning_costs()) {
                    if p > 0.0 {
                        rest.push((c as f64 / p as f64, c as f64, p as f64));
                    }
                }
            }
            rest.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (mut cost, mut value, mut bid) = (0.0, 0.0, 1.3 * cpa);
            for (cpv, c, v) in rest {
                if cost + c > cpa * (value + v) || cost + c >= remaining {
                    bid = cpv.min(1.3 * cpa);
                    break;
                }
                cost += c;
                value += v;
            }
            ratios.push(tr.actions[t] as f64 * cpa / bid);
        }
        assert!(
            ratios.len() > 10,
            "day {day}: budget gone by tick {}",
            ratios.len()
        );
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        assert!(
            (median - 1.0).abs() < 0.15,
            "day {day}: median action / hindsight bid {median}"
        );
    }
    // Share 0 is the log collected before hindsight days existed.
    let plain = Dataset::collect(&sim, &config(6, 1)).unwrap();
    let zero = Dataset::collect(
        &sim,
        &DataConfig {
            hindsight_share: 0.0,
            ..config(6, 1)
        },
    )
    .unwrap();
    assert_eq!(plain, zero);
}
