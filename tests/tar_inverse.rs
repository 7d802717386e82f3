//! The inverse-dynamics model (`nann::tar::inverse`): its forward pass
//! against an independent f64 reference, its weights file and typed
//! errors, TAR bidding through it; with feature `train`, that training
//! learns a bid that rises with the spend asked for.
#![cfg(feature = "tar")]

#[path = "support/recording.rs"]
mod recording;
use recording::Recording;

use std::sync::Arc;

use nann::tar::inverse::{tensor_shapes, InverseDynamics, INVERSE_INPUTS};
use nann::tar::model::{TarConfig, TarError, TarModel, STEP_FEATURES};
use nann::tar::sim::{run_episode, SimConfig};
use nann::tar::TarPolicy;

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
}

/// A model with every tensor random (normalisation included).
fn scrambled(hidden: usize, seed: u64) -> InverseDynamics {
    let mut rng = Lcg(seed);
    let tensors = tensor_shapes(hidden)
        .iter()
        .map(|(name, shape)| {
            let len: usize = shape.iter().product();
            (0..len)
                .map(|_| match name.as_str() {
                    "norm.std" => 0.5 + rng.unit().abs(),
                    _ => 0.5 * rng.unit(),
                })
                .collect()
        })
        .collect();
    InverseDynamics::from_tensors(hidden, tensors).unwrap()
}

/// The model's function written out in f64 from the named tensors.
fn reference(model: &InverseDynamics, x: &[f32; INVERSE_INPUTS]) -> f64 {
    let t: std::collections::HashMap<String, Vec<f64>> = model
        .tensors()
        .into_iter()
        .map(|(n, _, d)| (n, d.iter().map(|&v| v as f64).collect()))
        .collect();
    let h = model.hidden();
    let z: Vec<f64> = (0..INVERSE_INPUTS)
        .map(|i| (x[i] as f64 - t["norm.mean"][i]) / t["norm.std"][i])
        .collect();
    let dense = |w: &str, b: &str, x: &[f64], out: usize, relu: bool| -> Vec<f64> {
        (0..out)
            .map(|o| {
                let y = t[b][o]
                    + (0..x.len())
                        .map(|i| t[w][o * x.len() + i] * x[i])
                        .sum::<f64>();
                if relu {
                    y.max(0.0)
                } else {
                    y
                }
            })
            .collect()
    };
    let h1 = dense("fc1.weight", "fc1.bias", &z, h, true);
    let h2 = dense("fc2.weight", "fc2.bias", &h1, h, true);
    dense("out.weight", "out.bias", &h2, 1, false)[0]
}

fn random_inputs(rng: &mut Lcg) -> [f32; INVERSE_INPUTS] {
    let mut x_t = [0f32; STEP_FEATURES];
    for v in x_t.iter_mut() {
        *v = 2.0 * rng.unit();
    }
    InverseDynamics::inputs(&x_t, rng.unit().abs() * 0.1, 48, 3.0 + rng.unit())
}

#[test]
fn forward_matches_an_f64_reference() {
    let mut rng = Lcg(1);
    for (hidden, seed) in [(64, 1), (7, 2), (1, 3)] {
        let model = scrambled(hidden, seed);
        for _ in 0..50 {
            let x = random_inputs(&mut rng);
            let (got, want) = (model.predict(&x) as f64, reference(&model, &x));
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "hidden {hidden}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn inputs_scale_the_spend_share_by_the_ticks() {
    let x_t = [0.25f32; STEP_FEATURES];
    let v = InverseDynamics::inputs(&x_t, 0.05, 48, 2.5);
    assert_eq!(&v[..STEP_FEATURES], &x_t);
    assert!((v[STEP_FEATURES] - 2.4).abs() < 1e-6);
    assert_eq!(v[STEP_FEATURES + 1], 2.5);
}

#[test]
fn weights_files_round_trip_and_bad_ones_give_typed_errors() {
    let model = scrambled(16, 9);
    let bytes = model.to_safetensors().unwrap();
    let back = InverseDynamics::from_safetensors(&bytes).unwrap();
    let mut rng = Lcg(5);
    for _ in 0..20 {
        let x = random_inputs(&mut rng);
        assert_eq!(model.predict(&x).to_bits(), back.predict(&x).to_bits());
    }
    let path =
        std::env::temp_dir().join(format!("nann-inverse-{}.safetensors", std::process::id()));
    model.save(&path).unwrap();
    let loaded = InverseDynamics::load(&path).unwrap();
    assert_eq!(loaded.hidden(), 16);
    std::fs::remove_file(&path).ok();
    assert!(matches!(
        InverseDynamics::load(path.with_extension("missing")),
        Err(TarError::Io { .. })
    ));
    // A TAR file is not an inverse-dynamics file.
    let tar = TarModel::random(TarConfig::default(), 1).unwrap();
    assert!(matches!(
        InverseDynamics::from_safetensors(&tar.to_safetensors().unwrap()),
        Err(TarError::Config { .. })
    ));
    // Wrong tensor lists, shapes, values.
    let good: Vec<Vec<f32>> = model.tensors().iter().map(|(_, _, d)| d.to_vec()).collect();
    assert!(matches!(
        InverseDynamics::from_tensors(16, good[..7].to_vec()),
        Err(TarError::Format(_))
    ));
    let mut short = good.clone();
    short[2].pop();
    assert!(matches!(
        InverseDynamics::from_tensors(16, short),
        Err(TarError::Shape { .. })
    ));
    let mut nan = good.clone();
    nan[4][3] = f32::NAN;
    assert!(matches!(
        InverseDynamics::from_tensors(16, nan),
        Err(TarError::Format(_))
    ));
    let mut zero_std = good.clone();
    zero_std[1][0] = 0.0;
    assert!(matches!(
        InverseDynamics::from_tensors(16, zero_std),
        Err(TarError::Format(_))
    ));
    assert!(matches!(
        InverseDynamics::random(0, 1),
        Err(TarError::Config { .. })
    ));
    // Truncations and byte flips: an error or a model, never a panic.
    for cut in (0..bytes.len()).step_by(97) {
        assert!(InverseDynamics::from_safetensors(&bytes[..cut]).is_err());
    }
    let mut rng = Lcg(77);
    for _ in 0..300 {
        let mut bad = bytes.clone();
        let i = (rng.next() as usize) % bad.len();
        bad[i] ^= 1 << (rng.next() % 8);
        // A flipped exponent bit can leave a finite but huge weight, and
        // the prediction may overflow: the policy treats that as a failed
        // decision. What matters here is that nothing panics.
        if let Ok(m) = InverseDynamics::from_safetensors(&bad) {
            let _ = m.predict(&random_inputs(&mut rng));
        }
    }
}

#[test]
fn tar_bids_through_the_inverse_model_within_its_cap() {
    let sim = SimConfig::sparse().with_pvs_per_day(10_000);
    let ppt = sim.pvs_per_day as f64 / sim.ticks as f64;
    let tar = Arc::new(TarModel::random(TarConfig::default(), 3).unwrap());
    let inverse = Arc::new(scrambled(16, 4));
    let mut policy = Recording {
        inner: TarPolicy::new(tar, 1.0, ppt)
            .with_inverse_dynamics(inverse)
            .with_max_action(0.8),
        alphas: Vec::new(),
        cpa: 0.0,
    };
    run_episode(&sim, 2, &mut policy).unwrap();
    assert_eq!(policy.alphas.len(), sim.ticks);
    assert!(policy
        .alphas
        .iter()
        .all(|&a| a.is_finite() && (0.0..=0.8 * policy.cpa * (1.0 + 1e-6)).contains(&a)));
    assert_eq!(policy.inner.errors(), 0);
}

#[cfg(feature = "train")]
mod train {
    use super::*;
    use nann::tar::data::{DataConfig, Dataset};
    use nann::tar::train::inverse::{inverse_samples, train_inverse_dynamics, InverseTrainConfig};

    #[test]
    fn training_learns_a_bid_that_rises_with_the_spend_asked_for() {
        let sim = SimConfig::sparse().with_pvs_per_day(10_000);
        let data = Dataset::collect(
            &sim,
            &DataConfig {
                episodes: 40,
                population_per_episode: 3,
                ..DataConfig::default()
            },
        )
        .unwrap();
        let config = InverseTrainConfig {
            steps: 1500,
            ..InverseTrainConfig::default()
        };
        let (model, report) = train_inverse_dynamics(&data, &config).unwrap();
        assert!(report.samples > 1000, "{report:?}");
        // Better than predicting the mean by a wide margin.
        assert!(report.mse_last < 0.5 * report.target_variance, "{report:?}");
        // The logged ticks: asking for 4x the spend of half as much must
        // raise the bid for most of them (the market is monotone in the
        // bid; a model blind to the spend share fails this).
        let (xs, _) = inverse_samples(&data);
        let (mut higher, mut total) = (0, 0);
        for x in xs.iter().step_by(37) {
            let share = x[STEP_FEATURES] / 48.0;
            let x_t: [f32; STEP_FEATURES] = x[..STEP_FEATURES].try_into().unwrap();
            let base = (share * 0.5).max(0.002);
            let lo = model.predict(&InverseDynamics::inputs(
                &x_t,
                base,
                48,
                x[STEP_FEATURES + 1],
            ));
            let hi = model.predict(&InverseDynamics::inputs(
                &x_t,
                base * 4.0,
                48,
                x[STEP_FEATURES + 1],
            ));
            total += 1;
            higher += usize::from(hi > lo);
        }
        assert!(
            higher as f64 >= 0.8 * total as f64,
            "the bid rose with the spend share on {higher} of {total} ticks"
        );
    }
}
