//! The near-line updater: the last features sent for an ad are what the
//! index holds after `flush`, whatever the interleaving, and searches with
//! the BAR scorer run throughout.
#![cfg(feature = "bar")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nann::bar::market::{Market, MarketConfig};
use nann::bar::nearline::{NearlineOptions, NearlineUpdater};
use nann::bar::{AdFeatures, BarModel, BarScorer, BidFeatures};
use nann::{BeamParams, Index, IndexParams, Metric};

#[test]
fn the_last_event_per_ad_wins_while_searches_run() {
    let market = Market::generate(&MarketConfig::tiny()).unwrap();
    let model = Arc::new(BarModel::random(market.model_config(), 5).unwrap());
    let config = model.config().clone();
    let index = Arc::new(
        Index::new(
            IndexParams::new(config.d_model, Metric::L2)
                .m(8)
                .payload_len(config.payload_bytes()),
        )
        .unwrap(),
    );
    for ad in market.ads() {
        let side = model.ad_side(&ad.features).unwrap();
        index
            .insert_with_payload(ad.key, &side.vector, &side.tokens.to_payload())
            .unwrap();
    }
    let updater = NearlineUpdater::spawn(
        Arc::clone(&index),
        Arc::clone(&model),
        NearlineOptions {
            workers: 2,
            ..NearlineOptions::default()
        },
    )
    .unwrap();
    let stop = AtomicBool::new(false);
    let mut last: Vec<Option<AdFeatures>> = vec![None; market.ads().len()];
    std::thread::scope(|s| {
        let searcher = s.spawn(|| {
            let scorer = BarScorer::new(Arc::clone(&model));
            let params = BeamParams::default().layers(&[(10, 1), (40, 3)]).top(20);
            let mut searches = 0;
            while !stop.load(Ordering::Relaxed) || searches == 0 {
                let user = &market.users()[searches % market.users().len()];
                let state = model.user_side(&user.features).unwrap();
                let hits = index.search_with(&scorer, &state, &params).unwrap();
                assert_eq!(hits.len(), 20);
                searches += 1;
            }
            searches
        });
        // Many events for few ads, so merging and re-queueing both happen.
        for i in 0..5_000u64 {
            let event = market.bid_event(i);
            let ad = event.ad % 50;
            let features = AdFeatures {
                bid: BidFeatures {
                    budget_left_ratio: (i % 97) as f32 / 96.0,
                    ..event.bid
                },
                ..market.ads()[ad].features
            };
            updater.send(ad as u64, features).unwrap();
            last[ad] = Some(features);
        }
        updater.flush();
        stop.store(true, Ordering::Relaxed);
        assert!(searcher.join().unwrap() > 0);
    });
    let report = updater.shutdown();
    assert_eq!(report.failed, 0, "{:?}", report.last_error);
    assert_eq!(report.received, 5_000);
    assert_eq!(report.applied + report.coalesced, 5_000);
    assert_eq!(report.latencies.len() as u64, report.applied);
    for (ad, features) in last.iter().enumerate() {
        let Some(features) = features else { continue };
        let side = model.ad_side(features).unwrap();
        let (vector, payload) = index.get_with_payload(ad as u64).unwrap();
        assert_eq!(
            payload,
            side.tokens.to_payload(),
            "ad {ad}: not its last event's tokens"
        );
        assert_eq!(
            vector, side.vector,
            "ad {ad}: not its last event's embedding"
        );
    }
    index.check_invariants().unwrap();
}

#[test]
fn events_for_unknown_ads_insert_them_and_bad_features_fail_without_panics() {
    let market = Market::generate(&MarketConfig::tiny()).unwrap();
    let model = Arc::new(BarModel::random(market.model_config(), 6).unwrap());
    let config = model.config().clone();
    let index = Arc::new(
        Index::new(
            IndexParams::new(config.d_model, Metric::L2).payload_len(config.payload_bytes()),
        )
        .unwrap(),
    );
    let updater = NearlineUpdater::spawn(
        Arc::clone(&index),
        Arc::clone(&model),
        NearlineOptions::default(),
    )
    .unwrap();
    let ad = market.ads()[3].features;
    updater.send(77, ad).unwrap();
    let bad = AdFeatures {
        bid: BidFeatures {
            budget_left_ratio: f32::NAN,
            ..ad.bid
        },
        ..ad
    };
    updater.send(78, bad).unwrap();
    updater.flush();
    assert!(index.contains(77) && !index.contains(78));
    let report = updater.shutdown();
    assert_eq!((report.applied, report.failed), (1, 1));
    assert!(report.last_error.unwrap().contains("budget_left_ratio"));
}
