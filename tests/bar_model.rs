//! The BAR model's CPU inference against a straight per-candidate
//! implementation of the spec (the module docs of `nann::bar`), file round
//! trips, typed errors, and hostile weight files.

#![cfg(feature = "bar")]

use std::collections::HashMap;

use nann::bar::model::{BarModel, Heads, UserState};
use nann::bar::{AdFeatures, AdTokens, BarConfig, ModelError, UserFeatures};

#[path = "support/bar_reference.rs"]
mod bar_reference;
use bar_reference::*;

#[test]
fn batched_heads_match_the_reference_forward() {
    let mut rng = Lcg(2024);
    let mut checked = 0;
    let mut worst = 0.0f64;
    for (label, config) in configs() {
        for (seed, factor) in [(1u64, 1.0f32), (2, 3.0)] {
            let model = scaled(&BarModel::random(config.clone(), seed).unwrap(), factor);
            let reference = Reference::new(&model);
            let max_len = config.max_seq_len + 10;
            // Lengths: empty, all padding, random 0..=max_len (truncation
            // included), and a long one with padding at the end.
            let (len3, len4) = (rng.below(max_len + 1), rng.below(max_len + 1));
            let users = [
                random_user(&config, &mut rng, 0, 0.0),
                random_user(&config, &mut rng, 12, 1.0),
                random_user(&config, &mut rng, max_len, 0.0),
                random_user(&config, &mut rng, len3, 0.3),
                random_user(&config, &mut rng, len4, 0.0),
            ];
            for (ui, user) in users.iter().enumerate() {
                let state = model.user_side(user).unwrap();
                let batch = [1usize, 7, 64, 300][ui % 4] + if ui == 4 { 1 } else { 0 };
                let ads: Vec<AdTokens> = (0..batch)
                    .map(|_| random_ad(&config, &mut rng).tokens(&config).unwrap())
                    .collect();
                let z_a = model.ad_vectors(&ads).unwrap();
                let heads = model.heads(&state, &z_a, &ads).unwrap();
                let mut scores = vec![0.0; batch];
                model.score_into(&state, &z_a, &ads, &mut scores).unwrap();
                assert_eq!(heads.len(), batch);
                // Check every candidate of small batches, a sample of big ones.
                let step = if batch > 64 { 7 } else { 1 };
                for i in (0..batch).step_by(step) {
                    let za_ref = reference.z_a(&ads[i]);
                    let scale = za_ref.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                    for (x, y) in z_a[i * config.d_model..].iter().zip(&za_ref) {
                        assert!(
                            (*x as f64 - y).abs() <= 1e-5 * scale.max(1e-3),
                            "{label}: z_a {x} vs {y}"
                        );
                    }
                    let (want, mags) = reference.forward(user, &ads[i]);
                    let Heads {
                        pctr,
                        pbid_ratio,
                        score,
                    } = heads[i];
                    let got = [pctr as f64, pbid_ratio as f64, score as f64];
                    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                        // Relative error (floor 1e-3), or (for a head whose value
                        // cancels to far below its terms) the error relative to
                        // the last layer's magnitude, i.e. f32 rounding.
                        let err = rel_err(*g, *w);
                        let conditioned = (g - w).abs() / mags[k];
                        assert!(
                            err <= 1e-4 || conditioned <= 1e-5,
                            "{label} (seed {seed}, x{factor}), user {ui} (seq {} / {} unmasked), \
                             candidate {i} of {batch}, head {k}: {g} vs reference {w} \
                             (rel {err:e}, vs magnitude {conditioned:e})",
                            user.seq_items.len(),
                            state.seq_len()
                        );
                        worst = worst.max(err.min(conditioned));
                    }
                    assert_eq!(scores[i], score, "score_into and heads disagree");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 500, "{checked}");
    eprintln!("{checked} candidates checked; worst error {worst:e}");
}

#[test]
fn padding_and_truncation_define_the_attended_positions() {
    let config = BarConfig::default();
    let model = BarModel::random(config.clone(), 3).unwrap();
    let mut rng = Lcg(5);
    let mut user = random_user(&config, &mut rng, 80, 0.0);
    assert_eq!(model.user_side(&user).unwrap().seq_len(), 50);
    user.seq_items[79] = 0;
    user.seq_items[10] = 0; // truncated away anyway
    assert_eq!(model.user_side(&user).unwrap().seq_len(), 49);
    let empty = UserFeatures {
        fields: user.fields.clone(),
        ..Default::default()
    };
    let all_padding = UserFeatures {
        seq_items: vec![0; 9],
        seq_cates: vec![3; 9],
        ..empty.clone()
    };
    // No unmasked position: both give z_seq = 0 and the same scores.
    let (a, b) = (
        model.user_side(&empty).unwrap(),
        model.user_side(&all_padding).unwrap(),
    );
    assert_eq!(b.seq_len(), 0);
    let ads: Vec<AdTokens> = (0..5)
        .map(|_| random_ad(&config, &mut rng).tokens(&config).unwrap())
        .collect();
    let z = model.ad_vectors(&ads).unwrap();
    assert_eq!(
        model.heads(&a, &z, &ads).unwrap(),
        model.heads(&b, &z, &ads).unwrap()
    );
    assert_eq!(a.z_u(), b.z_u());
}

#[test]
fn ad_side_matches_batched_vectors() {
    let config = BarConfig::default();
    let model = BarModel::random(config.clone(), 8).unwrap();
    let mut rng = Lcg(9);
    let ads: Vec<AdFeatures> = (0..130).map(|_| random_ad(&config, &mut rng)).collect();
    let sides: Vec<_> = ads.iter().map(|a| model.ad_side(a).unwrap()).collect();
    let tokens: Vec<AdTokens> = sides.iter().map(|s| s.tokens).collect();
    let batched = model.ad_vectors(&tokens).unwrap();
    for (i, side) in sides.iter().enumerate() {
        assert_eq!(side.vector.len(), config.d_model);
        assert_eq!(side.tokens, ads[i].tokens(&config).unwrap());
        assert_eq!(&batched[i * 64..(i + 1) * 64], &side.vector[..]);
    }
}

// ---------------------------------------------------------------------------
// Files.

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("nann-bar-model-{}-{name}", std::process::id()))
}

fn scores_for(model: &BarModel, seed: u64) -> Vec<f32> {
    let config = model.config();
    let mut rng = Lcg(seed);
    let user = random_user(config, &mut rng, 40, 0.2);
    let state: UserState = model.user_side(&user).unwrap();
    let ads: Vec<AdTokens> = (0..100)
        .map(|_| random_ad(config, &mut rng).tokens(config).unwrap())
        .collect();
    let z = model.ad_vectors(&ads).unwrap();
    let mut out = vec![0.0; ads.len()];
    model.score_into(&state, &z, &ads, &mut out).unwrap();
    out
}

#[test]
fn save_and_load_round_trip_bit_identically() {
    for bid_features in [true, false] {
        let config = BarConfig {
            bid_features,
            ..BarConfig::default()
        };
        let model = BarModel::random(config.clone(), 77).unwrap();
        let path = temp_path(&format!("round-trip-{bid_features}.safetensors"));
        model.save(&path).unwrap();
        let back = BarModel::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back.config(), &config);
        assert_eq!(back.parameter_count(), model.parameter_count());
        for ((n1, s1, d1), (n2, s2, d2)) in model.tensors().iter().zip(back.tensors().iter()) {
            assert_eq!((n1, s1), (n2, s2));
            assert!(d1
                .iter()
                .zip(d2.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let (a, b) = (scores_for(&model, 4), scores_for(&back, 4));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
    // Saving over an existing file replaces it; no temporary file is left.
    let path = temp_path("overwrite.safetensors");
    let first = BarModel::random(BarConfig::default(), 1).unwrap();
    let second = BarModel::random(BarConfig::default(), 2).unwrap();
    first.save(&path).unwrap();
    second.save(&path).unwrap();
    assert_eq!(
        scores_for(&BarModel::load(&path).unwrap(), 3),
        scores_for(&second, 3)
    );
    let leftovers = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.contains(&format!("nann-bar-model-{}-overwrite", std::process::id()))
                && name.contains(".tmp-")
        })
        .count();
    assert_eq!(leftovers, 0);
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        BarModel::load(temp_path("does-not-exist")),
        Err(ModelError::Io { .. })
    ));
}

/// A safetensors file of `model`'s tensors with `edit` applied to the
/// list first (`(name, dtype, shape, bytes)`), and `metadata`.
fn file_with(
    model: &BarModel,
    metadata: Option<HashMap<String, String>>,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> Vec<u8> {
    let mut tensors: Vec<_> = model
        .tensors()
        .into_iter()
        .map(|(name, shape, data)| {
            let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, safetensors::Dtype::F32, shape, bytes)
        })
        .collect();
    edit(&mut tensors);
    let views: Vec<_> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, metadata).unwrap()
}

#[test]
fn bad_files_give_typed_errors() {
    let model = BarModel::random(BarConfig::default(), 5).unwrap();
    let meta = Some(model.config().to_metadata());

    // A missing tensor, named in the message.
    let bytes = file_with(&model, meta.clone(), |t| {
        t.retain(|x| x.0 != "bid_attn.v.weight")
    });
    let err = BarModel::from_safetensors(&bytes).unwrap_err();
    assert_eq!(
        err,
        ModelError::MissingTensor {
            name: "bid_attn.v.weight".into()
        }
    );
    assert!(err.to_string().contains("bid_attn.v.weight"));

    // A wrong shape.
    let bytes = file_with(&model, meta.clone(), |t| {
        let x = t.iter_mut().find(|x| x.0 == "seq_attn.v.weight").unwrap();
        x.2 = vec![x.2[1], x.2[0]];
    });
    assert_eq!(
        BarModel::from_safetensors(&bytes).unwrap_err(),
        ModelError::Shape {
            name: "seq_attn.v.weight".into(),
            expected: vec![64, 32],
            found: vec![32, 64]
        }
    );

    // F64 data.
    let bytes = file_with(&model, meta.clone(), |t| {
        let x = t.iter_mut().find(|x| x.0 == "emb.brand").unwrap();
        x.1 = safetensors::Dtype::F64;
        x.3 =
            x.3.chunks_exact(4)
                .flat_map(|b| (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64).to_le_bytes())
                .collect();
    });
    assert!(matches!(
        BarModel::from_safetensors(&bytes),
        Err(ModelError::DType { ref name, ref dtype }) if name == "emb.brand" && dtype == "F64"
    ));

    // A missing metadata key, and no metadata at all.
    let mut partial = model.config().to_metadata();
    partial.remove("nann.bar.d_attn");
    let bytes = file_with(&model, Some(partial), |_| {});
    assert!(matches!(
        BarModel::from_safetensors(&bytes),
        Err(ModelError::Config { ref key, .. }) if key == "nann.bar.d_attn"
    ));
    let bytes = file_with(&model, None, |_| {});
    assert!(matches!(
        BarModel::from_safetensors(&bytes),
        Err(ModelError::Config { .. })
    ));

    // A NaN weight, with its position.
    let bytes = file_with(&model, meta.clone(), |t| {
        let x = t.iter_mut().find(|x| x.0 == "ecpm.proj.bias").unwrap();
        x.3[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert_eq!(
        BarModel::from_safetensors(&bytes).unwrap_err(),
        ModelError::NonFinite {
            name: "ecpm.proj.bias".into(),
            position: 3
        }
    );

    // Extra tensors are ignored.
    let bytes = file_with(&model, meta, |t| {
        t.push((
            "optimizer.step".into(),
            safetensors::Dtype::F64,
            vec![1],
            vec![0; 8],
        ));
    });
    assert!(BarModel::from_safetensors(&bytes).is_ok());

    // Not a safetensors file.
    assert!(matches!(
        BarModel::from_safetensors(b"hello"),
        Err(ModelError::Format(_))
    ));

    // from_tensors: a data length that does not match the shape.
    let mut tensors: HashMap<String, (Vec<usize>, Vec<f32>)> = model
        .tensors()
        .into_iter()
        .map(|(n, s, d)| (n, (s, d.to_vec())))
        .collect();
    tensors.get_mut("emb.cate").unwrap().1.pop();
    assert!(matches!(
        BarModel::from_tensors(model.config().clone(), &tensors),
        Err(ModelError::Shape { ref name, .. }) if name == "emb.cate"
    ));
}

#[test]
fn bad_inputs_give_typed_errors() {
    let config = BarConfig::default();
    let model = BarModel::random(config.clone(), 6).unwrap();
    let mut rng = Lcg(1);
    let user = random_user(&config, &mut rng, 10, 0.0);
    let state = model.user_side(&user).unwrap();

    // A bad bid feature.
    let mut ad = random_ad(&config, &mut rng);
    ad.bid.budget_left_ratio = f32::NAN;
    assert!(matches!(
        model.ad_side(&ad),
        Err(ModelError::Feature {
            feature: "budget_left_ratio",
            ..
        })
    ));
    ad.bid.budget_left_ratio = 0.5;
    ad.bid.bid_type = 3;
    assert!(matches!(
        model.ad_side(&ad),
        Err(ModelError::Feature {
            feature: "bid_type",
            ..
        })
    ));
    ad.bid.bid_type = 0;
    let side = model.ad_side(&ad).unwrap();

    // Bad user features.
    let mut bad_user = user.clone();
    bad_user.fields[0] = 10_000;
    assert!(matches!(
        model.user_side(&bad_user),
        Err(ModelError::Feature { .. })
    ));
    let mut bad_user = user.clone();
    bad_user.seq_cates.pop();
    assert!(model.user_side(&bad_user).is_err());

    // Dimensions that do not match.
    let mut out = vec![0.0; 2];
    let tokens = [side.tokens, side.tokens];
    assert!(model
        .score_into(&state, &side.vector, &tokens, &mut out)
        .is_err());
    let z2 = [side.vector.clone(), side.vector.clone()].concat();
    assert!(model
        .score_into(&state, &z2, &tokens, &mut out[..1])
        .is_err());
    assert!(model.score_into(&state, &z2, &tokens, &mut out).is_ok());

    // Tokens of another configuration (3 ids, or ids beyond this model's
    // vocabulary) are errors, never panics.
    let other = BarConfig {
        bid_features: false,
        item_vocab: 1 << 20,
        ..config.clone()
    };
    let foreign = AdTokens::from_ids(&other, &[1 << 19, 1, 1]).unwrap();
    assert!(model
        .score_into(&state, &side.vector, &[foreign], &mut out[..1])
        .is_err());
    assert!(model.ad_vector(&foreign).is_err());
    let big = BarConfig {
        item_vocab: 1 << 20,
        ..config
    };
    let foreign = AdTokens::from_ids(&big, &[1 << 19, 1, 1, 0, 0, 0, 0, 0]).unwrap();
    assert!(model.heads(&state, &side.vector, &[foreign]).is_err());
    assert!(model.ad_vectors(&[side.tokens, foreign]).is_err());

    // A NaN in z_a gives a NaN score, not a panic.
    let mut nan = side.vector.clone();
    nan[3] = f32::NAN;
    model
        .score_into(&state, &nan, &[side.tokens], &mut out[..1])
        .unwrap();
    assert!(out[0].is_nan());

    // Invalid configurations.
    assert!(matches!(
        BarModel::random(
            BarConfig {
                d_model: 0,
                ..BarConfig::default()
            },
            1
        ),
        Err(ModelError::Config { .. })
    ));
}

// ---------------------------------------------------------------------------
// Hostile bytes.

#[test]
fn hostile_weight_files_never_panic() {
    let config = BarConfig {
        emb_dim: 4,
        user_field_vocab: vec![3, 2],
        item_vocab: 6,
        cate_vocab: 3,
        brand_vocab: 3,
        max_seq_len: 4,
        buckets: 3,
        user_hidden: 5,
        ad_hidden: 5,
        d_model: 4,
        d_attn: 3,
        head_hidden: 4,
        ..BarConfig::default()
    };
    let model = BarModel::random(config, 1).unwrap();
    let valid = model.to_safetensors().unwrap();
    let header_len = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let mut rng = Lcg(99);
    let (mut ok, mut err) = (0, 0);
    let mut tally = |r: Result<BarModel, ModelError>| match r {
        Ok(m) => {
            // A model that loads must also run.
            let user = UserFeatures {
                fields: vec![0; m.config().user_field_vocab.len()],
                seq_items: vec![1, 0, 2],
                seq_cates: vec![1, 0, 2],
            };
            if let Ok(state) = m.user_side(&user) {
                let ids = vec![1; m.config().ad_tokens()];
                if let Ok(t) = AdTokens::from_ids(m.config(), &ids) {
                    if let Ok(z) = m.ad_vector(&t) {
                        let _ = m.heads(&state, &z, &[t]);
                    }
                }
            }
            ok += 1
        }
        Err(_) => err += 1,
    };
    // Every truncation length.
    for len in 0..valid.len() {
        tally(BarModel::from_safetensors(&valid[..len]));
    }
    for round in 0..4000 {
        let mut bytes = valid.clone();
        match round % 6 {
            // Flip bits in the header (JSON, shapes, offsets, metadata).
            0 | 1 => {
                for _ in 0..1 + rng.below(4) {
                    let i = 8 + rng.below(header_len);
                    bytes[i] ^= 1 << rng.below(8);
                }
            }
            // Replace a header byte by a digit, a quote or a bracket.
            2 => {
                let i = 8 + rng.below(header_len);
                bytes[i] = b"0123456789\"[]{},:-e"[rng.below(19)];
            }
            // The header length field.
            3 => {
                let i = rng.below(8);
                bytes[i] = rng.below(256) as u8;
            }
            // Data bytes (NaNs, infinities, huge values).
            4 => {
                for _ in 0..1 + rng.below(8) {
                    let i = 8 + header_len + rng.below(valid.len() - 8 - header_len);
                    bytes[i] = rng.below(256) as u8;
                }
            }
            // Splice: drop or duplicate a range.
            _ => {
                let a = rng.below(bytes.len());
                let b = (a + rng.below(64)).min(bytes.len());
                if rng.below(2) == 0 {
                    bytes.drain(a..b);
                } else {
                    let dup: Vec<u8> = bytes[a..b].to_vec();
                    bytes.splice(a..a, dup);
                }
            }
        }
        tally(BarModel::from_safetensors(&bytes));
    }
    // Shapes in the header rewritten to huge values.
    let text = String::from_utf8_lossy(&valid[8..8 + header_len]).to_string();
    for huge in ["18446744073709551615", "4294967296", "1000000000000"] {
        let edited = text.replacen("\"shape\":[5,", &format!("\"shape\":[{huge},"), 1);
        let mut bytes = (edited.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(edited.as_bytes());
        bytes.extend_from_slice(&valid[8 + header_len..]);
        tally(BarModel::from_safetensors(&bytes));
    }
    assert!(ok > 0 && err > 0, "ok {ok}, err {err}");
}

// ---------------------------------------------------------------------------
// Throughput (run with `cargo test --release --test bar_model -- --ignored --nocapture`).

#[test]
#[ignore]
fn throughput() {
    let config = BarConfig::default();
    let model = BarModel::random(config.clone(), 1).unwrap();
    let mut rng = Lcg(3);
    let user = random_user(&config, &mut rng, 50, 0.0);
    let n = 2000;
    let ads: Vec<AdTokens> = (0..n)
        .map(|_| random_ad(&config, &mut rng).tokens(&config).unwrap())
        .collect();
    let t = std::time::Instant::now();
    let z = model.ad_vectors(&ads).unwrap();
    let ad_rate = n as f64 / t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let mut users = 0;
    while t.elapsed().as_secs_f64() < 1.0 {
        std::hint::black_box(model.user_side(&user).unwrap());
        users += 1;
    }
    let user_us = t.elapsed().as_secs_f64() * 1e6 / users as f64;
    let state = model.user_side(&user).unwrap();
    println!(
        "BAR default config, one thread: user_side {user_us:.1} us; ad_vectors {ad_rate:.0} ads/s"
    );
    for batch in [16, 64, n] {
        let mut out = vec![0.0; batch];
        let t = std::time::Instant::now();
        let mut scored = 0;
        while t.elapsed().as_secs_f64() < 1.5 {
            for (z, tok) in z.chunks(batch * config.d_model).zip(ads.chunks(batch)) {
                model
                    .score_into(&state, z, tok, &mut out[..tok.len()])
                    .unwrap();
                std::hint::black_box(&out);
                scored += tok.len();
            }
        }
        let rate = scored as f64 / t.elapsed().as_secs_f64();
        println!("  score_into, batch {batch}, sequence 50: {rate:.0} candidates/s");
    }
}

#[test]
fn dimensions_too_large_to_allocate_are_a_config_error_not_an_abort() {
    // Each dimension is in range (<= 2^24); the head's [h, 3d] layer alone
    // is 3 * 2^32 weights, 48 GiB: allocating it would abort the process.
    let config = BarConfig {
        d_model: 1 << 16,
        head_hidden: 1 << 16,
        ..BarConfig::default()
    };
    let refused = config.validate();
    assert!(
        matches!(refused, Err(ModelError::Config { ref message, .. }) if message.contains("MAX_MODEL_PARAMETERS")),
        "{refused:?}"
    );
    assert!(matches!(
        BarModel::random(config, 1),
        Err(ModelError::Config { .. })
    ));
    // The default model is far below the limit.
    let model = BarModel::random(BarConfig::default(), 1).unwrap();
    assert!(model.parameter_count() * 1000 <= nann::MAX_MODEL_PARAMETERS * 2);
}
