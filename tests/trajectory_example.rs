//! The core of `examples/trajectory.rs` at a small size: a day paced by
//! TAR (the shipped weights) and by PID, every tick's bid pushed through
//! the near-line updater into a live BAR index, and the PNG.
#![cfg(all(feature = "bar", feature = "tar"))]

#[path = "../examples/support/trajectory.rs"]
mod trajectory;

use std::sync::Arc;

use nann::bar::market::{Market, MarketConfig};
use nann::bar::BarModel;
use nann::tar::model::TarModel;
use nann::tar::sim::{PidPolicy, SimConfig};
use nann::tar::TarPolicy;
use trajectory::{BarWorld, Campaign, Day};

fn check_day(day: &Day, requests: usize) {
    assert_eq!(day.ticks.len(), 48, "{}", day.policy);
    assert!(day.cost <= day.budget + 1e-9, "{}", day.policy);
    let last = day.ticks.last().unwrap();
    assert!((last.cum_cost - day.cost).abs() < 1e-6 * day.budget.max(1.0));
    assert!((last.curve - day.budget).abs() < 1e-6 * day.budget);
    // The start-of-day reset and one push per tick, all applied.
    assert_eq!((day.applied, day.failed), (49, 0), "{}", day.policy);
    for (t, k) in day.ticks.iter().enumerate() {
        assert!(k.in_sync, "{} tick {t}: the index lags the bid", day.policy);
        assert!(k.reach <= requests);
        assert!(k.cost >= 0.0 && k.alpha >= 0.0);
        assert!((k.bid.time_left_ratio - (48 - t) as f32 / 48.0).abs() < 1e-6);
    }
    // The time bucket alone moves 19 times in a day.
    let moved = day.ticks.iter().filter(|k| k.moved > 0.0).count();
    assert!(
        moved >= 19,
        "{}: the ad's vector moved on {moved} ticks",
        day.policy
    );
}

#[test]
fn a_paced_day_moves_the_campaign_ad_in_the_live_index() {
    let root = env!("CARGO_MANIFEST_DIR");
    let tar = Arc::new(TarModel::load(format!("{root}/weights/tar-small.safetensors")).unwrap());
    let bar = Arc::new(BarModel::load(format!("{root}/weights/bar-small.safetensors")).unwrap());
    // The example's market (seed 1, default vocabularies), 20x smaller.
    let market = Market::generate(
        &MarketConfig::default()
            .with_ads(5_000)
            .with_users(2_000)
            .with_seed(1),
    )
    .unwrap()
    .with_operated_budgets(1);
    let world = BarWorld::build(bar, market, 2, &[(20, 2), (40, 2), (100, 100)], 50).unwrap();
    let base_ad = world.market.session(1 << 41).impressions[0].ad;
    let requests = 8;
    let campaign = Campaign::new(&world, base_ad, requests).unwrap();
    assert_eq!(campaign.users.len(), requests);
    assert_eq!(campaign.key, 5_000);

    let sim = SimConfig::sparse()
        .with_pvs_per_day(10_000)
        .with_budget_ratio(0.75);
    let pvs_per_tick = sim.pvs_per_day as f64 / sim.ticks as f64;
    let policy = TarPolicy::new(tar, 1.3, pvs_per_tick).with_seed(1);
    let tar_day = trajectory::play_day(&sim, 1_000_000, policy, &world, &campaign).unwrap();
    let pid_day =
        trajectory::play_day(&sim, 1_000_000, PidPolicy::default(), &world, &campaign).unwrap();
    check_day(&tar_day, requests);
    check_day(&pid_day, requests);
    assert_eq!(tar_day.budget, pid_day.budget);
    assert_eq!(tar_day.ticks[5].curve, pid_day.ticks[5].curve);
    // PID moves alpha every tick, and the bid constraint's bucket with it.
    let buckets: std::collections::HashSet<u32> =
        pid_day.ticks.iter().map(|k| k.buckets[0]).collect();
    assert!(buckets.len() > 1, "PID's constraint never left its bucket");
    assert!(tar_day.ticks.iter().any(|k| k.alpha > 0.0));

    let dir = std::env::temp_dir().join(format!("nann-trajectory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("day.png");
    trajectory::plot(&png, &[&tar_day, &pid_day], requests, "test day").unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000);
    std::fs::remove_dir_all(&dir).unwrap();
}
