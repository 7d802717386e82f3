#![cfg(feature = "train")]
//! The candle trainer (feature `train`): its forward pass equals the CPU
//! inference model's, training lowers the paper's loss, and the exported
//! weights file scores exactly as the trained candle model.

use nann::bar::market::{Market, MarketConfig};
use nann::bar::model::BarModel;
use nann::bar::train::{
    evaluate, CandleBar, Losses, PairHeads, TrainConfig, TrainError, Trainer, EVAL_SESSION_START,
};
use nann::bar::{AdTokens, BarConfig, UserFeatures};

/// Small dimensions over the tiny market's vocabularies, with a sequence
/// window shorter than the market's sequences (truncation is exercised).
fn small_config(market: &Market, bid_features: bool) -> BarConfig {
    BarConfig {
        emb_dim: 8,
        user_hidden: 24,
        ad_hidden: 24,
        d_model: 16,
        d_attn: 8,
        head_hidden: 16,
        max_seq_len: 12,
        bid_features,
        ..market.model_config()
    }
}

fn tiny_market() -> Market {
    Market::generate(&MarketConfig::tiny()).unwrap()
}

/// Users of the market plus the edge cases of the sequence mask: an empty
/// sequence (every position masked), padding ids inside a sequence, a
/// sequence of padding only.
fn parity_users(market: &Market) -> Vec<UserFeatures> {
    let mut users: Vec<UserFeatures> = market
        .users()
        .iter()
        .step_by(37)
        .take(10)
        .map(|u| u.features.clone())
        .collect();
    let base = users[0].clone();
    users.push(UserFeatures {
        seq_items: vec![],
        seq_cates: vec![],
        ..base.clone()
    });
    let mut holes = base.clone();
    for i in (0..holes.seq_items.len()).step_by(3) {
        holes.seq_items[i] = 0;
    }
    users.push(holes);
    users.push(UserFeatures {
        seq_items: vec![0; 4],
        seq_cates: vec![1; 4],
        ..base
    });
    users
}

fn parity_ads(market: &Market, config: &BarConfig) -> Vec<AdTokens> {
    market
        .ads()
        .iter()
        .step_by(53)
        .take(24)
        .map(|a| a.features.tokens(config).unwrap())
        .collect()
}

fn rel(a: f32, b: f32) -> f32 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-3)
}

/// The largest relative difference, over every (user, ad) and head, between
/// the candle forward and `BarModel::heads`.
fn max_rel_error(
    candle: &CandleBar,
    model: &BarModel,
    users: &[UserFeatures],
    ads: &[AdTokens],
) -> f32 {
    let refs: Vec<&UserFeatures> = users.iter().collect();
    let got = candle.score_all(&refs, ads).unwrap();
    let z_a = model.ad_vectors(ads).unwrap();
    let mut worst = 0f32;
    for (user, row) in users.iter().zip(&got) {
        let state = model.user_side(user).unwrap();
        let want = model.heads(&state, &z_a, ads).unwrap();
        assert_eq!(want.len(), row.len());
        for (w, g) in want.iter().zip(row) {
            for (x, y) in [
                (w.score, g.score),
                (w.pctr, g.pctr),
                (w.pbid_ratio, g.pbid_ratio),
            ] {
                assert!(x.is_finite() && y.is_finite());
                worst = worst.max(rel(x, y));
            }
        }
    }
    worst
}

/// Adds `delta` to element 0 of the candle variable `name`.
fn nudge(candle: &CandleBar, name: &str, delta: f32) {
    let data = candle.varmap().data().lock().unwrap();
    let var = data.get(name).unwrap();
    let mut values = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    values[0] += delta;
    let t = candle_core::Tensor::from_vec(values, var.dims(), &candle_core::Device::Cpu).unwrap();
    var.set(&t).unwrap();
}

#[test]
fn candle_forward_matches_the_inference_model() {
    let market = tiny_market();
    // Small dimensions with and without bid features, and the default ones.
    let configs = [
        small_config(&market, true),
        small_config(&market, false),
        market.model_config(),
    ];
    for config in configs {
        let bid_features = config.bid_features;
        let model = BarModel::random(config.clone(), 7).unwrap();
        let candle = CandleBar::from_model(&model).unwrap();
        let users = parity_users(&market);
        let ads = parity_ads(&market, &config);
        let err = max_rel_error(&candle, &model, &users, &ads);
        assert!(err < 1e-4, "bid_features {bid_features}: {err}");

        eprintln!(
            "parity, d_model {}, bid_features {bid_features}: max relative error {err:e}",
            config.d_model
        );

        // The check can fail: a small change to one weight of the sequence
        // attention's values (z_seq feeds every head) is detected, and
        // undoing it passes again.
        nudge(&candle, "seq_attn.v.bias", 0.05);
        let broken = max_rel_error(&candle, &model, &users, &ads);
        eprintln!("parity with seq_attn.v.bias[0] + 0.05: {broken:e}");
        assert!(broken > 1e-4, "a perturbed weight went unnoticed: {broken}");
        nudge(&candle, "seq_attn.v.bias", -0.05);
        let restored = max_rel_error(&candle, &model, &users, &ads);
        assert!(restored < 1e-4, "restored: {restored}");
    }
}

#[test]
fn variables_are_named_and_shaped_as_the_weights_file() {
    let market = tiny_market();
    let model = BarModel::random(small_config(&market, true), 3).unwrap();
    let candle = CandleBar::from_model(&model).unwrap();
    let data = candle.varmap().data().lock().unwrap();
    let tensors = model.tensors();
    assert_eq!(data.len(), tensors.len());
    for (name, shape, values) in tensors {
        let var = data
            .get(&name)
            .unwrap_or_else(|| panic!("no variable {name}"));
        assert_eq!(var.dims(), shape.as_slice(), "{name}");
        let got = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, values, "{name}");
    }
}

fn assert_finite(losses: &Losses) {
    for (name, v) in [
        ("total", losses.total),
        ("ltr", losses.ltr),
        ("bao", losses.bao),
        ("pctr", losses.pctr),
        ("pbid", losses.pbid),
    ] {
        assert!(v.is_finite() && v >= 0.0, "{name} = {v}: {losses:?}");
    }
}

fn quick(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        sessions_per_step: 8,
        lr: 3e-3,
        seed: 11,
        ..TrainConfig::default()
    }
}

#[test]
fn training_lowers_the_loss_and_exports_a_matching_model() {
    let market = tiny_market();
    let config = small_config(&market, true);
    let train = quick(40);
    let eval = EVAL_SESSION_START..EVAL_SESSION_START + 16;
    let init =
        CandleBar::from_model(&BarModel::random(config.clone(), train.seed).unwrap()).unwrap();
    let before = evaluate(&init, &market, eval.clone(), &train).unwrap();
    assert_finite(&before);
    // 20 labeled ads, 15 x 5 hard pairs and 20 x 5 easy pairs per session.
    assert_eq!(before.labeled, 16 * 20);
    assert_eq!(before.ltr_pairs, 16 * (75 + 100));
    assert!(before.bao_pairs > 0);

    let mut trainer = Trainer::new(&market, init, train.clone()).unwrap();
    let mut first = None;
    for _ in 0..train.steps {
        let p = trainer.step().unwrap();
        assert_finite(&p.losses);
        first.get_or_insert(p.losses.total);
    }
    let candle = trainer.into_model();
    let after = evaluate(&candle, &market, eval, &train).unwrap();
    assert_finite(&after);
    assert!(
        after.total < 0.7 * before.total,
        "{before:?} -> {after:?} (first batch {first:?})"
    );
    assert!(after.ltr < before.ltr, "{before:?} -> {after:?}");

    // Export, through the file format, and score with the inference model.
    let bytes = candle.to_model().unwrap().to_safetensors().unwrap();
    let loaded = BarModel::from_safetensors(&bytes).unwrap();
    assert_eq!(loaded.config(), &config);
    let users = parity_users(&market);
    let ads = parity_ads(&market, &config);
    let err = max_rel_error(&candle, &loaded, &users, &ads);
    assert!(err < 1e-4, "exported model differs: {err}");
}

#[test]
fn ablations_train_with_finite_losses() {
    let market = tiny_market();
    let eval = EVAL_SESSION_START..EVAL_SESSION_START + 4;
    // w/o BF: no bid tokens, hence no BAO pairs.
    let config = small_config(&market, false);
    let train = quick(3);
    let model = nann::bar::train::train(&market, config.clone(), &train, |p| {
        assert_finite(&p.losses);
        assert_eq!(p.losses.bao_pairs, 0);
        assert_eq!(p.losses.bao, 0.0);
    })
    .unwrap();
    assert_eq!(model.config(), &config);
    let losses = evaluate(
        &CandleBar::from_model(&model).unwrap(),
        &market,
        eval.clone(),
        &train,
    )
    .unwrap();
    assert_finite(&losses);

    // w/o BAO: bid features, but λ1 = 0 (no perturbation is drawn).
    let train = TrainConfig {
        lambda_bao: 0.0,
        ..quick(3)
    };
    let mut steps = 0;
    nann::bar::train::train(&market, small_config(&market, true), &train, |p| {
        steps += 1;
        assert_finite(&p.losses);
        assert_eq!(p.losses.bao_pairs, 0);
        let dao = p.losses.pctr + p.losses.pbid;
        assert!((p.losses.total - (p.losses.ltr + dao)).abs() <= 1e-4 * p.losses.total.max(1.0));
    })
    .unwrap();
    assert_eq!(steps, 3);
}

#[test]
fn bad_inputs_are_errors() {
    let market = tiny_market();
    let config = small_config(&market, true);
    let bad = TrainConfig {
        lr: f64::NAN,
        ..quick(1)
    };
    assert!(matches!(
        nann::bar::train::train(&market, config.clone(), &bad, |_| {}),
        Err(TrainError::Config { key: "lr", .. })
    ));
    let bad = TrainConfig {
        train_sessions: EVAL_SESSION_START + 1,
        ..quick(1)
    };
    assert!(matches!(
        nann::bar::train::train(&market, config.clone(), &bad, |_| {}),
        Err(TrainError::Config {
            key: "train_sessions",
            ..
        })
    ));
    // A model whose item vocabulary does not cover the market.
    let small = BarConfig {
        item_vocab: 10,
        ..config.clone()
    };
    assert!(matches!(
        nann::bar::train::train(&market, small, &quick(1), |_| {}),
        Err(TrainError::Model(_))
    ));
    // Tokens of a model with bid features given to one without.
    let model = BarModel::random(small_config(&market, false), 1).unwrap();
    let candle = CandleBar::from_model(&model).unwrap();
    let users = parity_users(&market);
    let ads = parity_ads(&market, &config);
    assert!(candle.score_all(&[&users[0]], &ads).is_err());
    // Loading weights of another configuration.
    let other = BarModel::random(config, 1).unwrap();
    assert!(candle.load(&other).is_err());
    // Nothing to score is not an error.
    let none: Vec<Vec<PairHeads>> = candle.score_all(&[&users[0]], &[]).unwrap();
    assert_eq!(none, vec![Vec::<PairHeads>::new()]);
}
