//! The offline replay mode of the TAR simulator (`nann::tar::sim::run_replay`):
//! the logged market, win and pay rules, the over-spend rule, determinism,
//! conversions, delays, the baselines, and typed errors.
#![cfg(feature = "tar")]

use std::sync::Arc;

use nann::tar::sim::{
    evaluate_replay, mean_ci95, run_episode, run_replay, score, ConstantPolicy, DayContext,
    EpisodeLog, HindsightLpPolicy, MarketLog, Observation, OnlineLpPolicy, PidPolicy, Policy,
    PopulationPolicy, ReplayLog, SimConfig, SimError,
};

/// The sparse market at its full 50k PVs a day (a live day to log takes
/// well under 0.1 s in release; with fewer PVs for the same budgets the
/// market is so expensive that a CPA-target bid rarely wins).
fn market() -> SimConfig {
    SimConfig::sparse()
}

fn record(config: &SimConfig, seed: u64) -> MarketLog {
    MarketLog::record(config, seed).unwrap()
}

/// Bids so high that every PV with a positive pValue beats its least
/// winning cost.
fn always_win() -> ConstantPolicy {
    ConstantPolicy { factor: 1e6 }
}

/// The PVs of tick `t` that a bid coefficient `alpha` wins in replay
/// (bid positive and at least the least winning cost), from the log alone.
fn won_by(log: &MarketLog, t: usize, alpha: f64) -> Vec<usize> {
    let tick = &log.ticks()[t];
    (0..tick.len())
        .filter(|&j| {
            let bid = alpha * tick.pvalues()[j] as f64;
            bid > 0.0 && bid >= tick.least_winning_costs()[j] as f64
        })
        .collect()
}

fn lwc_sum(log: &MarketLog, t: usize, pvs: &[usize]) -> f64 {
    pvs.iter()
        .map(|&j| log.ticks()[t].least_winning_costs()[j] as f64)
        .sum()
}

#[test]
fn the_log_is_the_live_day_as_the_advertiser_saw_it() {
    let config = market();
    let mut first_tick_wins = 0;
    for seed in [5, 12, 22] {
        let log = record(&config, seed);
        // The logging policy is the population policy: the log's day is the
        // live day with every advertiser on the population policy.
        let live = run_episode(&config, seed, &mut PopulationPolicy::new(seed)).unwrap();
        check_log_against_live_day(&config, &log, &live);
        first_tick_wins += live.records_of(0).next().unwrap().wins;
    }
    assert!(first_tick_wins > 0, "the first-tick check compared no win");
    // The budget ratio of the configuration does not change the log.
    assert_eq!(
        record(&config.clone().with_budget_ratio(0.5), 5),
        record(&config, 5)
    );
}

fn check_log_against_live_day(config: &SimConfig, log: &MarketLog, live: &EpisodeLog) {
    assert_eq!(log.ticks().len(), 48);
    let per_tick: Vec<usize> = log.ticks().iter().map(|t| t.len()).collect();
    assert_eq!(per_tick, live.pvs_per_tick);
    assert_eq!(log.pvs(), 50_000);
    let me = live.agent_outcome();
    let logged = (log.category(), log.budget(), log.cpa_target());
    assert_eq!(log.advertiser(), 0);
    assert_eq!(logged, (me.category, me.budget, me.cpa_target));
    assert!((log.traffic_share().iter().sum::<f64>() - 1.0).abs() < 1e-9);
    for tick in log.ticks() {
        assert_eq!(tick.sigmas().len(), tick.len());
        assert_eq!(tick.least_winning_costs().len(), tick.len());
        let pvs = tick.pvalues().iter().zip(tick.sigmas());
        for ((&p, &s), &c) in pvs.zip(tick.least_winning_costs()) {
            assert!((0.0..=1.0).contains(&p) && s >= 0.0 && s <= 0.3 * p + 1e-9 && c >= 0.0);
        }
    }
    // Replaying the logging policy: its first decision sees the same state
    // and bids the same coefficient as in the live day, and it wins exactly
    // the slots it won live (bid >= third-highest other bid <=> top 3).
    let seed = log.seed();
    let replay = run_replay(config, log, seed, &mut PopulationPolicy::new(seed)).unwrap();
    let live0 = live.records_of(0).next().unwrap();
    let replay0 = &replay.records[0];
    assert_eq!(replay0.state, live0.state);
    assert_eq!(replay0.action, live0.action);
    assert_eq!(replay0.wins, live0.wins);
}

#[test]
fn zero_alpha_spends_nothing() {
    let config = market();
    let log = record(&config, 1);
    let r = run_replay(&config, &log, 1, &mut ConstantPolicy { factor: 0.0 }).unwrap();
    let a = &r.outcome;
    assert_eq!((a.cost, a.wins, a.conversions, a.score), (0.0, 0, 0, 0.0));
    assert!(r.records.iter().all(|s| s.action == 0.0 && s.cost == 0.0));
    assert_eq!(r.records.len(), 48);
}

#[test]
fn a_huge_bid_wins_every_pv_and_pays_the_logged_costs() {
    // Budget ratio 100: the budget cannot bind, so nothing is withdrawn.
    let config = market().with_budget_ratio(100.0);
    for seed in [2, 3] {
        let log = record(&config, seed);
        let r = run_replay(&config, &log, seed, &mut always_win()).unwrap();
        assert!(r.auction_rounds.iter().all(|&k| k == 1));
        let (mut wins, mut priced, mut cost) = (0u64, 0u64, 0.0);
        for (t, tick) in log.ticks().iter().enumerate() {
            // Every PV with a positive pValue (a positive bid) is won...
            let bidding: Vec<usize> = (0..tick.len())
                .filter(|&j| tick.pvalues()[j] > 0.0)
                .collect();
            let tick_cost = lwc_sum(&log, t, &bidding);
            assert_eq!(r.records[t].wins as usize, bidding.len(), "tick {t}");
            assert_eq!(r.records[t].exposures, r.records[t].wins);
            assert!((r.records[t].cost - tick_cost).abs() <= 1e-9 * tick_cost.max(1.0));
            wins += bidding.len() as u64;
            priced += bidding
                .iter()
                .filter(|&&j| tick.least_winning_costs()[j] > 0.0)
                .count() as u64;
            cost += tick_cost;
        }
        // ... in particular every one with a positive price, and the day
        // costs exactly the sum of their least winning costs.
        assert_eq!(r.outcome.wins, wins);
        assert!(
            priced as f64 > 0.9 * log.pvs() as f64,
            "{priced} priced PVs of {}",
            log.pvs()
        );
        assert!((r.outcome.cost - cost).abs() <= 1e-9 * cost);
        assert!(r.outcome.cost < r.outcome.budget);
    }
}

#[test]
fn cost_is_the_sum_of_least_winning_costs_of_the_pvs_won() {
    // For each tick the over-spend rule left alone, the PVs won and their
    // cost are recomputed from the log and the coefficient the policy bid.
    let (mut checked, mut withdrawn) = (0, 0);
    for (seed, ratio) in [(4, 1.0), (5, 0.5), (6, 1.5)] {
        let config = market().with_budget_ratio(ratio);
        let log = record(&config, seed);
        let policies: [Box<dyn Policy>; 3] = [
            Box::new(PidPolicy::default()),
            Box::new(OnlineLpPolicy::default()),
            Box::new(ConstantPolicy { factor: 0.8 }),
        ];
        for mut policy in policies {
            let r = run_replay(&config, &log, seed, policy.as_mut()).unwrap();
            for (t, rec) in r.records.iter().enumerate() {
                let won = won_by(&log, t, rec.action);
                let cost = lwc_sum(&log, t, &won);
                if r.auction_rounds[t] == 1 {
                    assert_eq!(rec.wins as usize, won.len(), "{} tick {t}", policy.name());
                    assert!(
                        (rec.cost - cost).abs() <= 1e-9 * cost.max(1.0),
                        "{} tick {t}: charged {} for PVs whose least winning costs sum to {cost}",
                        policy.name(),
                        rec.cost
                    );
                    checked += (rec.wins > 0) as u32;
                } else {
                    // Withdrawn PVs are neither won nor paid.
                    assert!((rec.wins as usize) < won.len());
                    assert!(rec.cost < cost);
                    withdrawn += 1;
                }
            }
        }
    }
    assert!(checked > 150, "only {checked} ticks with wins checked");
    assert!(withdrawn > 0, "the over-spend rule never fired");
}

#[test]
fn spend_never_exceeds_the_budget() {
    let mut overspend_rounds = 0;
    for (seed, ratio) in [(7, 0.5), (8, 1.0), (9, 0.25)] {
        let config = market().with_budget_ratio(ratio);
        let log = record(&config, seed);
        let mut pid = PidPolicy::default();
        pid.max_factor = 20.0;
        let policies: [Box<dyn Policy>; 3] = [
            Box::new(pid),
            Box::new(ConstantPolicy { factor: 3.0 }),
            Box::new(always_win()),
        ];
        for mut policy in policies {
            let r = run_replay(&config, &log, seed, policy.as_mut()).unwrap();
            overspend_rounds += r.auction_rounds.iter().filter(|&&k| k > 1).count();
            let budget = r.outcome.budget;
            assert_eq!(budget, log.budget() * ratio);
            let mut spent = 0.0;
            for rec in &r.records {
                spent += rec.cost;
                assert!(rec.cost >= 0.0);
                assert!(spent <= budget + 1e-9, "{} > {budget}", spent);
            }
            assert!((spent - r.outcome.cost).abs() < 1e-6);
            assert!(r.outcome.cost <= budget + 1e-9);
        }
    }
    assert!(
        overspend_rounds > 0,
        "the over-spend rule never fired: the test checks nothing"
    );
}

#[test]
fn same_seed_same_result_other_seed_other_conversions_same_costs() {
    let config = market().with_budget_ratio(0.5);
    let log = record(&config, 10);
    let a = run_replay(&config, &log, 1, &mut PidPolicy::default()).unwrap();
    let b = run_replay(&config, &log, 1, &mut PidPolicy::default()).unwrap();
    assert_eq!(a, b);
    // Neither PID nor a constant bid reads conversions, and the over-spend
    // draws are keyed by the logged day: other conversion seeds, same bids,
    // wins and costs.
    let costs = |r: &ReplayLog| -> Vec<(f64, f64, u32)> {
        r.records
            .iter()
            .map(|s| (s.action, s.cost, s.wins))
            .collect()
    };
    let conversions =
        |r: &ReplayLog| -> Vec<u32> { r.records.iter().map(|s| s.conversions).collect() };
    let mut overspend = 0;
    for factor in [None, Some(2.0)] {
        let policy = || -> Box<dyn Policy> {
            match factor {
                None => Box::new(PidPolicy::default()),
                Some(factor) => Box::new(ConstantPolicy { factor }),
            }
        };
        let a = run_replay(&config, &log, 1, policy().as_mut()).unwrap();
        overspend += a.auction_rounds.iter().filter(|&&k| k > 1).count();
        let mut totals = vec![a.outcome.conversions];
        for seed in 2..6 {
            let c = run_replay(&config, &log, seed, policy().as_mut()).unwrap();
            assert_eq!(costs(&c), costs(&a));
            assert_eq!(c.auction_rounds, a.auction_rounds);
            assert_eq!(c.outcome.cost, a.outcome.cost);
            assert_ne!(conversions(&c), conversions(&a), "seed {seed}");
            totals.push(c.outcome.conversions);
        }
        totals.dedup();
        assert!(
            totals.len() > 1,
            "the same total conversions for every seed"
        );
    }
    assert!(
        overspend > 0,
        "the budget never bound: equal costs prove little"
    );
}

#[test]
fn an_always_win_bidder_converts_the_sum_of_its_pvalues() {
    // A won PV converts with probability E[clip(p + sigma Z, 0, 1)]. With
    // sigma <= 0.3 p (the market's cap) the clip at 0 moves that mean by at
    // most sigma x (phi(3.33) - 3.33 x (1 - Phi(3.33))) ~ 1e-4 sigma, and the
    // clip at 1 never binds (p ~ 0.005), so the expected conversions of a
    // day are the sum of its pValues, to a relative 3e-5. Conversions are
    // independent Bernoulli draws, so their total over all replays has
    // variance <= its mean m; we accept |total - m| < 5 sqrt(m) (a 5-sigma
    // band: about 8% of the total here, much wider than the bias; the draws
    // are seeded, so the test is deterministic anyway).
    let config = market().with_budget_ratio(100.0);
    let (mut total, mut expected) = (0u64, 0.0);
    for day in 30..33 {
        let log = record(&config, day);
        let pvalues: f64 = log
            .ticks()
            .iter()
            .flat_map(|t| t.pvalues())
            .map(|&p| p as f64)
            .sum();
        for seed in 0..25 {
            let r = run_replay(&config, &log, seed, &mut always_win()).unwrap();
            assert!(r.outcome.conversions <= r.outcome.wins);
            total += r.outcome.conversions;
            expected += pvalues;
        }
    }
    let band = 5.0 * expected.sqrt();
    assert!(expected > 1_000.0, "expected {expected}: too few to test");
    assert!(
        (total as f64 - expected).abs() < band,
        "{total} conversions, expected {expected:.1} ± {band:.1}"
    );
}

#[test]
fn delayed_conversions_are_observed_later_and_scored_true() {
    let base = market();
    let delayed = SimConfig::delayed();
    let (mut true_total, mut observed_total) = (0u64, 0u64);
    for seed in [11, 12, 13] {
        // The population does not read conversions: the delayed day's
        // market is the undelayed one.
        let log = record(&delayed, seed);
        assert_eq!(log, record(&base, seed));
        let a = run_replay(&base, &log, seed, &mut ConstantPolicy::default()).unwrap();
        let b = run_replay(&delayed, &log, seed, &mut ConstantPolicy::default()).unwrap();
        let (mut cum_true, mut cum_obs) = (0u64, 0u64);
        for (ra, rb) in a.records.iter().zip(&b.records) {
            // Same bids, same draws: the same true conversions.
            assert_eq!(ra.conversions, rb.conversions);
            assert_eq!(ra.cost, rb.cost);
            assert_eq!(ra.observed_conversions, ra.conversions);
            cum_true += rb.conversions as u64;
            cum_obs += rb.observed_conversions as u64;
            assert!(cum_obs <= cum_true, "revealed before it happened");
        }
        let o = &b.outcome;
        assert_eq!(o.observed_conversions, cum_obs);
        assert!(o.observed_conversions <= o.conversions);
        assert_eq!(o.conversions, a.outcome.conversions);
        // The score counts true conversions.
        assert_eq!(o.score, score(o.conversions as f64, o.cost, o.cpa_target));
        assert_eq!(o.score, a.outcome.score);
        true_total += cum_true;
        observed_total += cum_obs;
    }
    // Some delays run past midnight.
    assert!(observed_total < true_total);
    assert!(observed_total as f64 > 0.8 * true_total as f64);
}

#[test]
fn the_baselines_run_on_replay() {
    for config in [market(), SimConfig::delayed()] {
        let config = config.with_budget_ratio(0.75);
        let logs: Vec<MarketLog> = (40..43).map(|s| record(&config, s)).collect();
        for mut policy in [
            Box::new(PidPolicy::default()) as Box<dyn Policy>,
            Box::new(OnlineLpPolicy::default()),
        ] {
            let eval = evaluate_replay(&config, &logs, policy.as_mut()).unwrap();
            assert_eq!(eval.scores.len(), 3);
            assert!(eval.scores.iter().all(|s| s.is_finite() && *s >= 0.0));
            assert!(eval.mean > 0.0, "{} scored nothing", policy.name());
            assert!(eval.mean_spend_ratio <= 1.0 + 1e-9);
        }
    }
}

#[test]
fn onlinelp_beats_pid_on_replay_at_half_budget() {
    // Paired over the same 20 logged days (the full 50k-PV market): the
    // same prices and, for PVs both win, the same conversion draws.
    let config = SimConfig::sparse().with_budget_ratio(0.5);
    let logs: Vec<MarketLog> = (500..520).map(|s| record(&config, s)).collect();
    let lp = evaluate_replay(&config, &logs, &mut OnlineLpPolicy::default()).unwrap();
    let pid = evaluate_replay(&config, &logs, &mut PidPolicy::default()).unwrap();
    let diffs: Vec<f64> = lp
        .scores
        .iter()
        .zip(&pid.scores)
        .map(|(a, b)| a - b)
        .collect();
    let (mean, ci) = mean_ci95(&diffs);
    assert!(
        mean > 0.0,
        "OnlineLP {} vs PID {} (diff {mean} ± {ci})",
        lp.mean,
        pid.mean
    );
}

struct Nan;
impl Policy for Nan {
    fn name(&self) -> &str {
        "nan"
    }
    fn begin_day(&mut self, _: &DayContext<'_>) {}
    fn act(&mut self, obs: &Observation<'_>) -> f64 {
        if obs.tick == 3 {
            f64::NAN
        } else {
            obs.cpa_target
        }
    }
}

#[test]
fn typed_errors() {
    let config = market();
    let log = record(&config, 0);
    let replay = |c: &SimConfig, p: &mut dyn Policy| run_replay(c, &log, 0, p).unwrap_err();
    let mut constant = ConstantPolicy::default();
    // A log of 48 ticks replayed in a 96-tick day.
    assert!(matches!(
        replay(&config.clone().with_ticks(96), &mut constant),
        SimError::Config { field: "ticks", .. }
    ));
    // A log of advertiser 0 replayed for advertiser 5.
    assert!(matches!(
        replay(&config.clone().with_agent(5), &mut constant),
        SimError::Config { field: "agent", .. }
    ));
    assert!(matches!(
        replay(&config.clone().with_budget_ratio(-1.0), &mut constant),
        SimError::Config {
            field: "budget_ratio",
            ..
        }
    ));
    assert!(matches!(
        replay(&config, &mut Nan),
        SimError::Action {
            advertiser: 0,
            tick: 3,
            ..
        }
    ));
    assert!(matches!(
        MarketLog::record(&config.clone().with_ticks(50), 0).unwrap_err(),
        SimError::Config { field: "ticks", .. }
    ));
    assert!(matches!(
        MarketLog::record_with(&config.clone().with_agent(2), 0, &mut Nan).unwrap_err(),
        SimError::Action {
            advertiser: 2,
            tick: 3,
            ..
        }
    ));
    assert_eq!(
        evaluate_replay(&config, &[], &mut constant).unwrap_err(),
        SimError::NoEpisodes
    );
}

#[test]
fn the_hindsight_constant_beats_every_fixed_bid_and_onlinelp() {
    // The day's hindsight constant knows the day's prices in advance: over
    // the same 20 logged days its realised score (one conversion draw, not
    // the expectation it was chosen on) beats every fixed bid and OnlineLP,
    // paired, at both low budget ratios.
    for ratio in [0.5, 0.75] {
        let config = SimConfig::sparse().with_budget_ratio(ratio);
        let logs: Vec<MarketLog> = (600..620).map(|s| record(&config, s)).collect();
        let hindsight: Vec<f64> = logs
            .iter()
            .map(|log| {
                let (factor, expected) = log.best_constant(ratio);
                assert!((0.05..=2.0).contains(&factor) && expected > 0.0);
                let mut bid = ConstantPolicy { factor };
                run_replay(&config, log, log.seed(), &mut bid)
                    .unwrap()
                    .outcome
                    .score
            })
            .collect();
        let mut rivals: Vec<(String, Vec<f64>)> = [0.6, 0.8, 1.0, 1.2, 1.4]
            .iter()
            .map(|&factor| {
                let eval = evaluate_replay(&config, &logs, &mut ConstantPolicy { factor }).unwrap();
                (format!("constant {factor}"), eval.scores)
            })
            .collect();
        let lp = evaluate_replay(&config, &logs, &mut OnlineLpPolicy::default()).unwrap();
        rivals.push(("onlinelp".into(), lp.scores));
        for (name, scores) in rivals {
            let diffs: Vec<f64> = hindsight.iter().zip(&scores).map(|(a, b)| a - b).collect();
            let (mean, ci) = mean_ci95(&diffs);
            assert!(
                mean > ci,
                "ratio {ratio}: hindsight vs {name}: diff {mean} ± {ci}"
            );
        }
    }
}

#[test]
fn the_hindsight_constant_is_the_grid_point_of_highest_expected_score() {
    // Recomputed from the log alone through the test's own helpers, for a
    // few grid points: none beats the factor returned, and the factor
    // returned scores what it says.
    let config = SimConfig::sparse();
    let log = record(&config, 77);
    for ratio in [0.5, 1.0] {
        let budget = log.budget() * ratio;
        let expected = |factor: f64| {
            let alpha = factor * log.cpa_target();
            let (mut cost, mut value) = (0.0, 0.0);
            'day: for t in 0..log.ticks().len() {
                for j in won_by(&log, t, alpha) {
                    let c = log.ticks()[t].least_winning_costs()[j] as f64;
                    if cost + c > budget {
                        break 'day;
                    }
                    cost += c;
                    value += log.ticks()[t].pvalues()[j] as f64;
                }
            }
            score(value, cost, log.cpa_target())
        };
        let (best, best_score) = log.best_constant(ratio);
        assert!((expected(best) - best_score).abs() <= 1e-9 * best_score.max(1.0));
        for k in (5..=200).step_by(5) {
            let factor = k as f64 / 100.0;
            assert!(
                expected(factor) <= best_score + 1e-9,
                "ratio {ratio}: factor {factor} scores {} > {best_score} at {best}",
                expected(factor)
            );
        }
    }
}

#[test]
fn onlinelp_re_solved_with_the_days_actual_prices_beats_onlinelp() {
    // The same problem OnlineLP solves, with the rest of the day known
    // instead of forecast from the prices seen: on the same 20 logged days
    // it scores higher, paired, at both low budget ratios, and never spends
    // past the budget.
    for ratio in [0.5, 0.75] {
        let config = SimConfig::sparse().with_budget_ratio(ratio);
        let logs: Vec<MarketLog> = (640..660).map(|s| record(&config, s)).collect();
        let lp = evaluate_replay(&config, &logs, &mut OnlineLpPolicy::default()).unwrap();
        let diffs: Vec<f64> = logs
            .iter()
            .zip(&lp.scores)
            .map(|(log, lp)| {
                let mut bound = HindsightLpPolicy::new(Arc::new(log.clone()));
                let day = run_replay(&config, log, log.seed(), &mut bound).unwrap();
                assert!(day.outcome.cost <= day.outcome.budget + 1e-9);
                day.outcome.score - lp
            })
            .collect();
        let (mean, ci) = mean_ci95(&diffs);
        assert!(
            mean > ci,
            "ratio {ratio}: hindsight LP - OnlineLP = {mean} ± {ci}"
        );
    }
}
