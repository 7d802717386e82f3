//! Training the TAR model with candle (`nann::tar::train`): the trainer's
//! forward pass against the CPU inference (the contract of
//! `nann::tar::model`), and a short training run that must learn.
#![cfg(feature = "train")]

use std::sync::Arc;

use candle_core::{Device, Tensor};
use nann::tar::data::{DataConfig, Dataset, SplitMix};
use nann::tar::model::{GenerateOptions, TarConfig, TarModel};
use nann::tar::sim::{run_episode, SimConfig};
use nann::tar::train::{train_tar, CandleTar, TarTrainConfig};
use nann::tar::TarPolicy;

/// `max |a - b| / max(1e-3, max |b|)`.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

fn configs() -> Vec<(&'static str, TarConfig)> {
    vec![
        ("default", TarConfig::default()),
        (
            "k1",
            TarConfig {
                scales: vec![48],
                ..TarConfig::default()
            },
        ),
        (
            "no_vq",
            TarConfig {
                quantize: false,
                ..TarConfig::default()
            },
        ),
        (
            "odd",
            TarConfig {
                steps: 10,
                scales: vec![1, 3, 7, 10],
                vae_dim: 12,
                vae_heads: 3,
                code_dim: 5,
                codebook_size: 17,
                d_model: 24,
                heads: 2,
                blocks: 3,
                attr_tokens: 3,
                ..TarConfig::default()
            },
        ),
    ]
}

fn random_rows(rng: &mut SplitMix, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

#[test]
fn candle_forward_matches_the_cpu_model() {
    let dev = Device::Cpu;
    for (name, config) in configs() {
        let model = TarModel::random(config.clone(), 7).unwrap();
        let net = CandleTar::from_model(&model).unwrap();
        // The export is the same model, bit for bit.
        let back = net.to_model().unwrap();
        for ((n1, s1, d1), (n2, s2, d2)) in model.tensors().into_iter().zip(back.tensors()) {
            assert_eq!((n1.as_str(), &s1), (n2.as_str(), &s2));
            assert_eq!(d1, d2, "{name}: tensor {n1}");
        }
        let (t, f, c) = (config.steps, config.step_features, config.code_dim);
        let l = config.tokens();
        let mut rng = SplitMix::new(11);
        let b = 3;
        let x = random_rows(&mut rng, b * t * f);
        let xt = Tensor::from_slice(&x, (b, t, f), &dev).unwrap();
        let f_c = net
            .encode(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let q_c = net.quantize(&net.encode(&xt).unwrap()).unwrap();
        let mut hs = Vec::new();
        for s in 0..b {
            let xs = &x[s * t * f..(s + 1) * t * f];
            let f_cpu = model.encode(xs).unwrap();
            let e = rel_err(&f_c[s * t * c..(s + 1) * t * c], &f_cpu);
            assert!(e <= 1e-4, "{name}: encoder rel err {e}");
            let q = model.quantize(&f_cpu).unwrap();
            if config.quantize {
                for (k, codes) in q.codes.iter().enumerate() {
                    let cand = q_c.codes[k].get(s).unwrap().to_vec1::<u32>().unwrap();
                    assert_eq!(&cand, codes, "{name}: codes of scale {k}");
                }
            }
            let fhat_c = q_c.partial.last().unwrap().get(s).unwrap();
            let fhat_c = fhat_c.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let e = rel_err(&fhat_c, &q.fhat);
            assert!(e <= 1e-4, "{name}: fhat rel err {e}");
            let dec_c = net
                .decode(&Tensor::from_slice(&q.fhat, (1, t, c), &dev).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let e = rel_err(&dec_c, &model.decode(&q.fhat).unwrap());
            assert!(e <= 1e-4, "{name}: decoder rel err {e}");
            hs.push(q.h);
        }
        // Teacher-forced generator with histories of 0, some and all steps,
        // with and without a condition.
        let ad = config.attr_dim();
        let hist_len = [0, t / 2 + 1, t];
        let mut y = Vec::new();
        let mut hist = vec![0f32; b * t * f];
        for s in 0..b {
            let attrs = [
                rng.normal() as f32,
                rng.normal() as f32,
                rng.normal() as f32,
                rng.normal() as f32,
            ];
            y.extend(model.condition(if s == 1 { None } else { Some(&attrs) }));
            let n = hist_len[s];
            hist[s * t * f..s * t * f + n * f].copy_from_slice(&x[s * t * f..s * t * f + n * f]);
        }
        let h: Vec<f32> = hs.concat();
        let out = net
            .generator(
                &Tensor::from_slice(&y, (b, ad), &dev).unwrap(),
                &Tensor::from_slice(&hist, (b, t, f), &dev).unwrap(),
                &hist_len,
                &Tensor::from_slice(&h, (b, l, c), &dev).unwrap(),
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let o = config.head_outputs();
        for s in 0..b {
            let n = hist_len[s];
            let cpu = model
                .teacher_forced(
                    &y[s * ad..(s + 1) * ad],
                    &x[s * t * f..s * t * f + n * f],
                    &hs[s],
                )
                .unwrap();
            let e = rel_err(&out[s * l * o..(s + 1) * l * o], &cpu);
            assert!(e <= 1e-4, "{name}: generator rel err {e} (history {n})");
        }
    }
}

#[test]
fn a_short_training_run_learns_and_bids() {
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
    let train = TarTrainConfig {
        vae_steps: 150,
        gen_steps: 150,
        batch: 32,
        ..TarTrainConfig::default()
    };
    let (model, report) = train_tar(&data, &TarConfig::default(), &train).unwrap();
    assert!(
        report.recon_last < 0.5 * report.recon_first,
        "reconstruction did not fall: {report:?}"
    );
    assert!(
        report.gen_last < 0.9 * report.gen_first,
        "generator loss did not fall: {report:?}"
    );
    assert!(report.codebook_usage > 0.05, "{report:?}");
    // The exported model survives a file round trip and bids a whole day.
    let bytes = model.to_safetensors().unwrap();
    let model = Arc::new(TarModel::from_safetensors(&bytes).unwrap());
    let target = data.attribute_quantile(0, 0.9);
    let ppt = sim.pvs_per_day as f64 / sim.ticks as f64;
    let mut policy = TarPolicy::new(model.clone(), target, ppt)
        .with_options(GenerateOptions::default())
        .with_seed(3);
    let log = run_episode(&sim, 999_999, &mut policy).unwrap();
    assert_eq!(policy.errors(), 0);
    let actions: Vec<f64> = log.records_of(0).map(|r| r.action).collect();
    assert!(actions.iter().all(|a| a.is_finite() && *a >= 0.0));
    // It bids something, and not a constant.
    assert!(actions.iter().any(|&a| a > 0.0));
}
