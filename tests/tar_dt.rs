//! The Decision-Transformer baseline (`nann::tar::dt`): weights files and
//! their typed errors, input checks, the causal mask, the policy in the
//! simulator and its latency; with feature `train`, parity of the candle
//! trainer's forward pass with the CPU model and a small training run.
#![cfg(feature = "tar")]

#[path = "support/recording.rs"]
mod recording;
use recording::Recording;

use std::collections::HashMap;
use std::time::Instant;

use nann::tar::dt::{
    day_return_quantile, returns_to_go, DtConfig, DtModel, DtPolicy, STATE_FEATURES,
};
use nann::tar::model::TarError;
use nann::tar::sim::{run_episode, DayContext, Observation, Policy, SimConfig, StepState};

/// A small deterministic generator for test inputs.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 11
    }
    /// Uniform in `[-1, 1)`.
    fn unit(&mut self) -> f32 {
        (self.next() as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A model whose every tensor is random (LayerNorm gains and biases and
/// the normalisation too), so parity and masking tests exercise them all.
fn scrambled(config: DtConfig, seed: u64) -> DtModel {
    let base = DtModel::random(config.clone(), seed).unwrap();
    let mut rng = Lcg(seed ^ 0x5eed);
    let tensors: HashMap<String, (Vec<usize>, Vec<f32>)> = base
        .tensors()
        .into_iter()
        .map(|(name, shape, data)| {
            let values: Vec<f32> = data
                .iter()
                .map(|&v| {
                    if name == "norm.s_std" || name == "norm.rtg_scale" {
                        0.5 + rng.unit().abs()
                    } else if name.ends_with("ln.weight")
                        || name.ends_with("ln1.weight")
                        || name.ends_with("ln2.weight")
                        || name == "ln_f.weight"
                    {
                        1.0 + 0.3 * rng.unit()
                    } else if name == "embed.time" {
                        0.3 * rng.unit()
                    } else if name.starts_with("norm.") || name.ends_with(".bias") {
                        0.2 * rng.unit()
                    } else {
                        v
                    }
                })
                .collect();
            (name, (shape, values))
        })
        .collect();
    DtModel::from_tensors(config, &tensors).unwrap()
}

/// A random window of `n` steps: (rtg, raw states, n actions).
fn window(rng: &mut Lcg, n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rtg: Vec<f32> = (0..n)
        .map(|i| 1.2 - 0.05 * i as f32 + 0.1 * rng.unit())
        .collect();
    let states: Vec<f32> = (0..n * STATE_FEATURES).map(|_| 2.0 * rng.unit()).collect();
    let actions: Vec<f32> = (0..n).map(|_| 1.0 + 0.5 * rng.unit()).collect();
    (rtg, states, actions)
}

fn small_config() -> DtConfig {
    DtConfig {
        context: 4,
        d_model: 8,
        blocks: 2,
        heads: 2,
        mlp: 12,
        max_steps: 16,
        ..DtConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Configuration, files.

#[test]
fn config_round_trips_through_metadata_and_is_validated() {
    let c = DtConfig::default();
    assert_eq!(
        (c.context, c.d_model, c.blocks, c.heads, c.max_steps),
        (10, 64, 3, 1, 288)
    );
    assert_eq!(c.tokens(), 30);
    let m = c.to_metadata();
    assert!(m.keys().all(|k| k.starts_with("nann.dt.")));
    assert_eq!(DtConfig::from_metadata(&m).unwrap(), c);
    for (bad, field) in [
        (
            DtConfig {
                heads: 3,
                ..c.clone()
            },
            "d_model",
        ),
        (
            DtConfig {
                context: 0,
                ..c.clone()
            },
            "context",
        ),
        (
            DtConfig {
                state_features: 17,
                ..c.clone()
            },
            "state_features",
        ),
        (
            DtConfig {
                max_steps: 0,
                ..c.clone()
            },
            "max_steps",
        ),
    ] {
        assert!(
            matches!(bad.validate(), Err(TarError::Config { field: f, .. }) if f == field),
            "{field}"
        );
        assert!(DtModel::random(bad, 1).is_err());
    }
    let mut m2 = m.clone();
    m2.insert("nann.dt.version".into(), "2".into());
    assert!(matches!(
        DtConfig::from_metadata(&m2),
        Err(TarError::Config {
            field: "version",
            ..
        })
    ));
    m2 = m;
    m2.insert("nann.dt.blocks".into(), "three".into());
    assert!(matches!(
        DtConfig::from_metadata(&m2),
        Err(TarError::Config {
            field: "blocks",
            ..
        })
    ));
}

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("nann-tar-dt-{}-{name}", std::process::id()))
}

#[test]
fn save_and_load_round_trip_bit_identically() {
    let model = scrambled(DtConfig::default(), 3);
    let path = temp_path("round-trip.safetensors");
    model.save(&path).unwrap();
    // Saving again over the file replaces it atomically.
    model.save(&path).unwrap();
    let back = DtModel::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(back.config(), model.config());
    assert_eq!(back.parameter_count(), model.parameter_count());
    for ((n1, s1, d1), (n2, s2, d2)) in model.tensors().iter().zip(back.tensors().iter()) {
        assert_eq!((n1, s1), (n2, s2));
        assert!(d1
            .iter()
            .zip(d2.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    let mut rng = Lcg(9);
    let (r, s, a) = window(&mut rng, 10);
    assert_eq!(
        model.predict(&r, &s, &a[..9], 30).unwrap().to_bits(),
        back.predict(&r, &s, &a[..9], 30).unwrap().to_bits()
    );
    let leftovers = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.contains(&format!("nann-tar-dt-{}-round-trip", std::process::id()))
                && name.contains(".tmp-")
        })
        .count();
    assert_eq!(leftovers, 0);
    assert!(matches!(
        DtModel::load(temp_path("does-not-exist")),
        Err(TarError::Io { .. })
    ));
    // The parameter count of the default model (for the record).
    assert!(model.parameter_count() > 100_000);
}

type Entry = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

fn file_with(
    model: &DtModel,
    metadata: Option<HashMap<String, String>>,
    edit: impl FnOnce(&mut Vec<Entry>),
) -> Vec<u8> {
    let mut tensors: Vec<Entry> = model
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
    let model = DtModel::random(DtConfig::default(), 5).unwrap();
    let meta = Some(model.config().to_metadata());

    // Missing tensor.
    let bytes = file_with(&model, meta.clone(), |t| {
        t.retain(|x| x.0 != "blocks.2.attn.v.weight")
    });
    assert_eq!(
        DtModel::from_safetensors(&bytes).unwrap_err(),
        TarError::MissingTensor {
            name: "blocks.2.attn.v.weight".into()
        }
    );

    // Wrong shape.
    let bytes = file_with(&model, meta.clone(), |t| {
        let x = t
            .iter_mut()
            .find(|x| x.0 == "blocks.0.mlp.fc1.weight")
            .unwrap();
        x.2 = vec![x.2[1], x.2[0]];
    });
    assert_eq!(
        DtModel::from_safetensors(&bytes).unwrap_err(),
        TarError::Shape {
            name: "blocks.0.mlp.fc1.weight".into(),
            expected: vec![256, 64],
            found: vec![64, 256]
        }
    );

    // NaN weight, with its position.
    let bytes = file_with(&model, meta.clone(), |t| {
        let x = t.iter_mut().find(|x| x.0 == "head.weight").unwrap();
        x.3[20..24].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert_eq!(
        DtModel::from_safetensors(&bytes).unwrap_err(),
        TarError::NonFinite {
            name: "head.weight".into(),
            position: 5
        }
    );

    // A zero standard deviation in the normalisation.
    let bytes = file_with(&model, meta.clone(), |t| {
        let x = t.iter_mut().find(|x| x.0 == "norm.s_std").unwrap();
        x.3[0..4].copy_from_slice(&0f32.to_le_bytes());
    });
    assert!(matches!(
        DtModel::from_safetensors(&bytes),
        Err(TarError::Config {
            field: "norm.s_std",
            ..
        })
    ));

    // F64 data.
    let bytes = file_with(&model, meta.clone(), |t| {
        let x = t.iter_mut().find(|x| x.0 == "embed.time").unwrap();
        x.1 = safetensors::Dtype::F64;
        x.3 =
            x.3.chunks_exact(4)
                .flat_map(|b| (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64).to_le_bytes())
                .collect();
    });
    assert!(matches!(
        DtModel::from_safetensors(&bytes),
        Err(TarError::DType { ref name, .. }) if name == "embed.time"
    ));

    // Metadata missing a key, or absent (e.g. a TAR or BAR file).
    let mut partial = model.config().to_metadata();
    partial.remove("nann.dt.mlp");
    assert!(matches!(
        DtModel::from_safetensors(&file_with(&model, Some(partial), |_| {})),
        Err(TarError::Config { field: "mlp", .. })
    ));
    assert!(matches!(
        DtModel::from_safetensors(&file_with(&model, None, |_| {})),
        Err(TarError::Config { .. })
    ));

    // Extra tensors are ignored.
    let bytes = file_with(&model, meta, |t| {
        t.push((
            "optimizer.step".into(),
            safetensors::Dtype::F64,
            vec![1],
            vec![0; 8],
        ))
    });
    assert!(DtModel::from_safetensors(&bytes).is_ok());

    // Not a safetensors file; truncated files.
    assert!(matches!(
        DtModel::from_safetensors(b"hello"),
        Err(TarError::Format(_))
    ));
    let valid = model.to_safetensors().unwrap();
    for len in [
        0,
        7,
        8,
        100,
        valid.len() / 2,
        valid.len() - 4,
        valid.len() - 1,
    ] {
        assert!(
            DtModel::from_safetensors(&valid[..len]).is_err(),
            "truncated at {len}"
        );
    }

    // from_tensors: a data length that does not match the shape.
    let mut tensors: HashMap<String, (Vec<usize>, Vec<f32>)> = model
        .tensors()
        .into_iter()
        .map(|(n, s, d)| (n, (s, d.to_vec())))
        .collect();
    tensors.get_mut("embed.state.bias").unwrap().1.pop();
    assert!(matches!(
        DtModel::from_tensors(model.config().clone(), &tensors),
        Err(TarError::Shape { ref name, .. }) if name == "embed.state.bias"
    ));

    // with_normalisation checks its inputs.
    let m = DtModel::random(small_config(), 1).unwrap();
    assert!(matches!(
        m.clone().with_normalisation(&[0.0; 3], &[1.0; 16], 1.0),
        Err(TarError::Input {
            input: "s_mean",
            ..
        })
    ));
    assert!(matches!(
        m.clone().with_normalisation(&[0.0; 16], &[1.0; 16], -1.0),
        Err(TarError::Config {
            field: "norm.rtg_scale",
            ..
        })
    ));
    assert!(matches!(
        m.with_normalisation(&[f32::NAN; 16], &[1.0; 16], 1.0),
        Err(TarError::NonFinite { .. })
    ));
}

#[test]
fn hostile_weight_files_never_panic() {
    let model = scrambled(small_config(), 2);
    let valid = model.to_safetensors().unwrap();
    let header_len = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let mut rng = Lcg(77);
    let (mut ok, mut err) = (0, 0);
    let mut tally = |r: Result<DtModel, TarError>| match r {
        Ok(m) => {
            // A model that loads must also run (or refuse its inputs).
            let c = m.config().clone();
            let n = c.context.min(c.max_steps);
            let r = vec![1.0; n];
            let s = vec![0.5; n * c.state_features];
            let _ = m.predict(&r, &s, &r[1..], 0);
            let _ = m.predict_all(&r, &s, &r, 0);
            ok += 1;
        }
        Err(_) => err += 1,
    };
    for len in 0..valid.len() {
        tally(DtModel::from_safetensors(&valid[..len]));
    }
    for round in 0..3000 {
        let mut bytes = valid.clone();
        match round % 5 {
            0 | 1 => {
                for _ in 0..1 + rng.below(4) {
                    let i = 8 + rng.below(header_len);
                    bytes[i] ^= 1 << rng.below(8);
                }
            }
            2 => {
                let i = 8 + rng.below(header_len);
                bytes[i] = b"0123456789\"[]{},:-e"[rng.below(19)];
            }
            3 => {
                for _ in 0..1 + rng.below(8) {
                    let i = 8 + header_len + rng.below(valid.len() - 8 - header_len);
                    bytes[i] = rng.below(256) as u8;
                }
            }
            _ => {
                let a = rng.below(bytes.len());
                let b = (a + rng.below(64)).min(bytes.len());
                bytes.drain(a..b);
            }
        }
        tally(DtModel::from_safetensors(&bytes));
    }
    assert!(ok > 0 && err > 0, "ok {ok}, err {err}");
}

// ---------------------------------------------------------------------------
// Inputs and the causal mask.

#[test]
fn bad_inputs_give_typed_errors() {
    let model = DtModel::random(DtConfig::default(), 1).unwrap();
    let mut rng = Lcg(1);
    let (r, s, a) = window(&mut rng, 10);
    let input = |res: Result<f32, TarError>| match res {
        Err(TarError::Input { input, .. }) => input,
        other => panic!("expected an input error, got {other:?}"),
    };
    assert!(model.predict(&r, &s, &a[..9], 0).is_ok());
    assert!(model.predict(&r, &s, &a, 0).is_ok());
    assert_eq!(input(model.predict(&[], &[], &[], 0)), "rtg");
    let (r11, s11, a11) = window(&mut rng, 11);
    assert_eq!(input(model.predict(&r11, &s11, &a11, 0)), "rtg");
    assert_eq!(input(model.predict(&r, &s[1..], &a, 0)), "states");
    assert_eq!(input(model.predict(&r, &s, &a[..8], 0)), "actions");
    assert_eq!(
        input(model.predict(&r, &s, &[a.clone(), a.clone()].concat(), 0)),
        "actions"
    );
    assert_eq!(input(model.predict(&r, &s, &a, 279)), "start_step");
    assert!(model.predict(&r, &s, &a, 278).is_ok());
    assert_eq!(input(model.predict(&r, &s, &a, usize::MAX)), "start_step");
    let mut bad = s.clone();
    bad[17] = f32::NAN;
    assert_eq!(input(model.predict(&r, &bad, &a, 0)), "states");
    let mut bad = r.clone();
    bad[3] = f32::INFINITY;
    assert_eq!(input(model.predict(&bad, &s, &a, 0)), "rtg");
    let mut bad = a.clone();
    bad[0] = f32::NAN;
    assert_eq!(input(model.predict(&r, &s, &bad, 0)), "actions");
    // The ignored last action is still checked.
    bad = a.clone();
    bad[9] = f32::NAN;
    assert_eq!(input(model.predict(&r, &s, &bad, 0)), "actions");
    assert!(matches!(
        model.predict_all(&r, &s[2..], &a, 0),
        Err(TarError::Input {
            input: "states",
            ..
        })
    ));
}

/// Changing step `j`'s inputs (return, state, action) never changes the
/// prediction of an earlier step, and step `i`'s own action never changes
/// its prediction; a shorter window predicts what the longer one predicts
/// at the same step.
#[test]
fn causal_mask_future_inputs_never_change_earlier_predictions() {
    for (config, seed) in [(DtConfig::default(), 4), (small_config(), 5)] {
        let model = scrambled(config.clone(), seed);
        let k = config.context;
        let mut rng = Lcg(seed);
        let (r, s, a) = window(&mut rng, k);
        let base = model.predict_all(&r, &s, &a, 2).unwrap();
        assert_eq!(base.len(), k);
        for j in 0..k {
            let (mut r2, mut s2, mut a2) = (r.clone(), s.clone(), a.clone());
            r2[j] += 3.0;
            for v in &mut s2[j * STATE_FEATURES..(j + 1) * STATE_FEATURES] {
                *v = -*v + 1.0;
            }
            a2[j] += 2.0;
            let out = model.predict_all(&r2, &s2, &a2, 2).unwrap();
            for i in 0..j {
                assert_eq!(
                    out[i].to_bits(),
                    base[i].to_bits(),
                    "step {j}'s inputs changed the prediction at step {i} ({} vs {})",
                    out[i],
                    base[i]
                );
            }
            assert_ne!(out[j], base[j], "step {j}'s state must matter");
            // Only the action of step j: no prediction up to j moves.
            let mut a3 = a.clone();
            a3[j] -= 1.5;
            let out = model.predict_all(&r, &s, &a3, 2).unwrap();
            for i in 0..=j {
                assert_eq!(
                    out[i].to_bits(),
                    base[i].to_bits(),
                    "a_{j} leaked into step {i}"
                );
            }
            if j + 1 < k {
                assert_ne!(
                    out[j + 1],
                    base[j + 1],
                    "a_{j} must matter to step {}",
                    j + 1
                );
            }
            // A window ending at step j predicts what the full window does.
            let short = model
                .predict(&r[..=j], &s[..(j + 1) * STATE_FEATURES], &a[..j], 2)
                .unwrap();
            assert!(
                (short - base[j]).abs() <= 1e-5 * (1.0 + base[j].abs()),
                "window of {} steps: {short} vs {}",
                j + 1,
                base[j]
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The policy.

fn small_sim() -> SimConfig {
    SimConfig::sparse().with_pvs_per_day(10_000)
}

#[test]
fn policy_runs_an_episode_and_falls_back_without_panicking() {
    let sim = small_sim();
    let pvs_per_tick = sim.pvs_per_day as f64 / sim.ticks as f64;
    let model = DtModel::random(DtConfig::default(), 8).unwrap();
    let mut policy = Recording {
        inner: DtPolicy::new(model, 1.0, pvs_per_tick),
        alphas: Vec::new(),
        cpa: 0.0,
    };
    assert_eq!(policy.name(), "dt");
    let log = run_episode(&sim, 3, &mut policy).unwrap();
    assert_eq!(policy.alphas.len(), sim.ticks);
    assert!(policy
        .alphas
        .iter()
        .all(|&a| a.is_finite() && (0.0..=10.0 * policy.cpa).contains(&a)));
    assert_eq!(policy.inner.fallbacks(), 0);
    assert_eq!(policy.inner.decisions(), sim.ticks as u64);
    // The return-to-go went down by the day's observed conversions.
    let agent = log.agent_outcome();
    let expected = 1.0 - agent.observed_conversions as f64 * agent.cpa_target / agent.budget;
    let last_tick_conv = log
        .records_of(log.agent)
        .last()
        .unwrap()
        .observed_conversions as f64;
    let seen = expected + last_tick_conv * agent.cpa_target / agent.budget;
    assert!((policy.inner.return_to_go() - seen).abs() < 1e-4);

    // A model whose timestep table is shorter than the day: the policy bids
    // the CPA target past it, counts the fallbacks, never panics.
    let short = DtModel::random(
        DtConfig {
            max_steps: 20,
            ..DtConfig::default()
        },
        8,
    )
    .unwrap();
    let mut policy = Recording {
        inner: DtPolicy::new(short, 1.0, pvs_per_tick),
        alphas: Vec::new(),
        cpa: 0.0,
    };
    run_episode(&sim, 4, &mut policy).unwrap();
    assert_eq!(policy.inner.fallbacks(), (sim.ticks - 20) as u64);
    assert!(policy.alphas[20..].iter().all(|&a| a == policy.cpa));
    // A second day starts afresh.
    run_episode(&sim, 5, &mut policy).unwrap();
    assert_eq!(policy.inner.fallbacks(), 2 * (sim.ticks - 20) as u64);
}

#[test]
fn returns_to_go_are_suffix_sums_in_efficiency_units() {
    let r = returns_to_go(&[1.0, 0.0, 2.0, 1.0], 400.0, 100.0);
    assert_eq!(r, vec![1.0, 0.75, 0.75, 0.25]);
    assert_eq!(returns_to_go(&[1.0], 0.0, 100.0), vec![0.0]);
    assert!(returns_to_go(&[], 1.0, 1.0).is_empty());
    assert_eq!(
        day_return_quantile(&nann::tar::data::Dataset::default(), 0.9),
        0.0
    );
}

/// Per-decision latency of [`DtPolicy::act`] with a full context (run with
/// `--release --nocapture` to see the figure).
#[test]
fn policy_latency_per_decision() {
    let model = DtModel::random(DtConfig::default(), 1).unwrap();
    let mut policy = DtPolicy::new(model, 1.0, 200.0);
    let traffic = vec![1.0 / 48.0; 48];
    let day = DayContext {
        advertiser: 0,
        category: 0,
        budget: 3000.0,
        cpa_target: 100.0,
        ticks: 48,
        traffic_share: &traffic,
    };
    let mut state = StepState {
        budget_left: 1.0,
        bid_mean_all: 0.4,
        pvalue_now: 0.005,
        pvs_now: 200.0,
        ..StepState::default()
    };
    let mut times = Vec::new();
    let mut sink = 0.0;
    for d in 0..60 {
        policy.begin_day(&day);
        for t in 0..48 {
            state.time_left = (48 - t) as f64 / 48.0;
            state.budget_left = 1.0 - t as f64 / 60.0;
            state.pvs_all = 200.0 * t as f64;
            let obs = Observation {
                tick: t,
                ticks: 48,
                budget: 3000.0,
                remaining: 3000.0 * state.budget_left,
                cpa_target: 100.0,
                state: &state,
                pvalues: &[],
                last: None,
            };
            let started = Instant::now();
            sink += policy.act(&obs);
            let dt = started.elapsed();
            if d > 0 && t >= 10 {
                times.push(dt.as_secs_f64());
            }
        }
    }
    assert!(sink.is_finite());
    assert_eq!(policy.fallbacks(), 0);
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let p50 = times[times.len() / 2];
    let p99 = times[times.len() * 99 / 100];
    eprintln!(
        "DtPolicy::act, full context (30 tokens), default model: mean {:.1} us, p50 {:.1} us, p99 {:.1} us over {} decisions",
        mean * 1e6,
        p50 * 1e6,
        p99 * 1e6,
        times.len()
    );
    if !cfg!(debug_assertions) {
        assert!(p50 < 5e-3, "p50 {p50} s per decision");
    }
}

// ---------------------------------------------------------------------------
// Training (feature `train`).

#[cfg(feature = "train")]
mod train {
    use super::*;
    use nann::tar::data::{DataConfig, Dataset};
    use nann::tar::sim::evaluate;
    use nann::tar::train::dt::{
        train_dt, train_dt_with, CandleDt, DtBatch, DtTrainConfig, DtTrainSet, DtWindow,
    };
    use nann::tar::train::TrainError;

    fn close(cpu: f32, candle: f32) -> bool {
        (cpu - candle).abs() <= 1e-4 * (1.0 + cpu.abs())
    }

    fn assert_parity(model: &DtModel, seed: u64) -> f32 {
        let candle = CandleDt::from_model(model).unwrap();
        let k = model.config().context;
        let max_steps = model.config().max_steps;
        let mut rng = Lcg(seed);
        let mut worst = 0f32;
        for n in 1..=k {
            let (r, s, a) = window(&mut rng, n);
            let start = rng.below(max_steps - n + 1);
            let cpu = model.predict(&r, &s, &a[..n - 1], start).unwrap();
            let gpu = candle.predict(&r, &s, &a[..n - 1], start).unwrap();
            assert!(close(cpu, gpu), "n {n}: cpu {cpu} candle {gpu}");
            worst = worst.max((cpu - gpu).abs());
            let cpu_all = model.predict_all(&r, &s, &a, start).unwrap();
            let gpu_all = candle.predict_all(&r, &s, &a, start).unwrap();
            assert_eq!(cpu_all.len(), n);
            for (x, y) in cpu_all.iter().zip(&gpu_all) {
                assert!(close(*x, *y), "n {n}: cpu {x} candle {y}");
                worst = worst.max((x - y).abs());
            }
        }
        worst
    }

    #[test]
    fn candle_forward_matches_cpu_on_random_weights() {
        let mut worst = 0f32;
        for (config, seed) in [
            (DtConfig::default(), 1),
            (
                DtConfig {
                    heads: 4,
                    ..DtConfig::default()
                },
                2,
            ),
            (small_config(), 3),
        ] {
            worst = worst.max(assert_parity(&scrambled(config.clone(), seed), seed));
            worst = worst.max(assert_parity(&DtModel::random(config, seed).unwrap(), seed));
        }
        eprintln!("parity on random weights: max |cpu - candle| = {worst:e}");
        // Export is exact.
        let model = scrambled(DtConfig::default(), 9);
        let back = CandleDt::from_model(&model).unwrap().to_model().unwrap();
        for ((n1, _, d1), (_, _, d2)) in model.tensors().iter().zip(back.tensors().iter()) {
            assert_eq!(d1, d2, "{n1}");
        }
    }

    #[test]
    fn batches_check_their_windows() {
        let c = small_config();
        let ok = DtWindow {
            rtg: vec![1.0; 2],
            states: vec![0.0; 2 * STATE_FEATURES],
            actions: vec![1.0; 2],
            start_step: 3,
        };
        let b = DtBatch::new(&c, std::slice::from_ref(&ok)).unwrap();
        assert_eq!((b.len(), b.real_steps()), (1, 2));
        let mut bad = ok.clone();
        bad.actions.pop();
        assert!(matches!(DtBatch::new(&c, &[bad]), Err(TrainError::Data(_))));
        let mut bad = ok.clone();
        bad.start_step = 15;
        assert!(matches!(DtBatch::new(&c, &[bad]), Err(TrainError::Data(_))));
        let mut bad = ok.clone();
        bad.rtg[0] = f32::NAN;
        assert!(matches!(DtBatch::new(&c, &[bad]), Err(TrainError::Data(_))));
        assert!(matches!(DtBatch::new(&c, &[]), Err(TrainError::Data(_))));
        let other = DtConfig {
            d_model: 16,
            ..c.clone()
        };
        let candle = CandleDt::from_model(&DtModel::random(other, 1).unwrap()).unwrap();
        assert!(matches!(candle.forward(&b), Err(TrainError::Config { .. })));
        // Bad data and settings.
        assert!(matches!(
            DtTrainSet::new(&Dataset::default(), &c),
            Err(TrainError::Data(_))
        ));
        let bad_train = DtTrainConfig {
            lr: f64::NAN,
            ..DtTrainConfig::default()
        };
        assert!(matches!(
            train_dt(&Dataset::default(), &c, &bad_train),
            Err(TrainError::Config { field: "lr", .. })
        ));
    }

    #[test]
    fn training_reduces_the_loss_and_the_policy_bids() {
        let sim = small_sim();
        let started = Instant::now();
        let data = Dataset::collect(
            &sim,
            &DataConfig {
                episodes: 60,
                ..DataConfig::default()
            },
        )
        .unwrap();
        let collect_s = started.elapsed().as_secs_f64();
        let config = DtConfig::default();
        let train = DtTrainConfig::default();

        // A fixed evaluation batch, and the loss of the initial model on it.
        let set = DtTrainSet::new(&data, &config).unwrap();
        let eval = set.batch(1024, 0xe7a1).unwrap();
        let (m, sd, r) = set.normalisation();
        let init = DtModel::random(config.clone(), train.seed)
            .unwrap()
            .with_normalisation(m, sd, r)
            .unwrap();
        let before = CandleDt::from_model(&init)
            .unwrap()
            .loss(&eval)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // The variance of the actions: the loss of the best constant.
        let acts: Vec<f32> = data
            .trajectories
            .iter()
            .flat_map(|t| t.actions.iter().copied())
            .collect();
        let mean = acts.iter().sum::<f32>() / acts.len() as f32;
        let var = acts.iter().map(|a| (a - mean).powi(2)).sum::<f32>() / acts.len() as f32;

        let started = Instant::now();
        let mut curve = Vec::new();
        let model = train_dt_with(&data, &config, &train, |p| curve.push(p.loss)).unwrap();
        let train_s = started.elapsed().as_secs_f64();
        assert_eq!(curve.len(), train.steps);
        let after = CandleDt::from_model(&model)
            .unwrap()
            .loss(&eval)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let first: f32 = curve[..20].iter().sum::<f32>() / 20.0;
        let last: f32 = curve[curve.len() - 20..].iter().sum::<f32>() / 20.0;
        eprintln!(
            "{} trajectories (collected in {collect_s:.1} s); training {} steps x {} windows in {train_s:.1} s; \
             eval MSE {before:.4} -> {after:.4} (action variance {var:.4}); batch loss first 20 {first:.4}, last 20 {last:.4}",
            data.trajectories.len(),
            train.steps,
            train.batch
        );
        assert!(after < 0.25 * before, "loss {before} -> {after}");
        assert!(after < 0.5 * var, "loss {after} vs variance {var}");
        assert!(last < 0.5 * first);

        // Parity on the trained model, on random and on real windows.
        let worst = assert_parity(&model, 11);
        let candle = CandleDt::from_model(&model).unwrap();
        let mut worst_real = 0f32;
        for (i, t) in data.trajectories.iter().enumerate().take(20) {
            for (start, n) in [(0, 1), (0, 10), (7, 10), (38, 10), (45, 3)] {
                let w = DtWindow::from_trajectory(t, start, n).unwrap();
                let cpu = model
                    .predict_all(&w.rtg, &w.states, &w.actions, start)
                    .unwrap();
                let gpu = candle
                    .predict_all(&w.rtg, &w.states, &w.actions, start)
                    .unwrap();
                for (x, y) in cpu.iter().zip(&gpu) {
                    assert!(
                        close(*x, *y),
                        "trajectory {i} window {start}+{n}: {x} vs {y}"
                    );
                    worst_real = worst_real.max((x - y).abs());
                }
            }
        }
        eprintln!(
            "parity on the trained model: random windows {worst:e}, data windows {worst_real:e}"
        );

        // Save, load, and bid.
        let path = temp_path("trained.safetensors");
        model.save(&path).unwrap();
        let model = DtModel::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let target = day_return_quantile(&data, 0.9);
        let pvs_per_tick = sim.pvs_per_day as f64 / sim.ticks as f64;
        let mut policy = Recording {
            inner: DtPolicy::new(model.clone(), target, pvs_per_tick),
            alphas: Vec::new(),
            cpa: 0.0,
        };
        let log = run_episode(&sim, 1_000_000, &mut policy).unwrap();
        assert_eq!(policy.alphas.len(), sim.ticks);
        assert!(policy.alphas.iter().all(|a| a.is_finite()));
        assert_eq!(policy.inner.fallbacks(), 0);
        let a = log.agent_outcome();
        let mut dt = DtPolicy::new(model, target, pvs_per_tick);
        let score = evaluate(&sim, &mut dt, 1_000_000..1_000_010).unwrap();
        let lp = evaluate(
            &sim,
            &mut nann::tar::sim::OnlineLpPolicy::default(),
            1_000_000..1_000_010,
        )
        .unwrap();
        eprintln!(
            "target return {target:.3}; day 1e6: spend {:.2} of budget, {} conversions, score {:.2}; \
             10 days: DT {:.2} +- {:.2} (spend {:.2}), OnlineLP {:.2} +- {:.2}; alphas/CPA day 1e6: {:?}",
            a.cost / a.budget,
            a.conversions,
            a.score,
            score.mean,
            score.ci95,
            score.mean_spend_ratio,
            lp.mean,
            lp.ci95,
            policy
                .alphas
                .iter()
                .map(|x| (x / policy.cpa * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn dimensions_too_large_to_allocate_are_a_config_error_not_an_abort() {
    // Every field in its range, but 64 blocks of width 4096 with a 16384
    // MLP are ~12.9G weights (51 GiB); allocating them would abort.
    let config = DtConfig {
        d_model: 4096,
        heads: 8,
        blocks: 64,
        mlp: 16_384,
        ..DtConfig::default()
    };
    let refused = config.validate();
    assert!(
        matches!(refused, Err(TarError::Config { ref message, .. }) if message.contains("MAX_MODEL_PARAMETERS")),
        "{refused:?}"
    );
    assert!(matches!(
        DtModel::random(config, 1),
        Err(TarError::Config { .. })
    ));
}
