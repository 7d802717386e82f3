//! The TAR model's CPU inference against a straight f64 implementation of
//! the equations in the module docs of `nann::tar::model` (the generator
//! over all `L` tokens at once with an explicit block-causal mask),
//! quantisation against brute force, generation, file round trips, typed
//! errors, hostile weight files and input validation.

#![cfg(feature = "tar")]

use std::collections::HashMap;

use nann::tar::data::SplitMix;
use nann::tar::model::{GenerateOptions, TarConfig, TarError, TarModel, STEP_FEATURES};

// ---------------------------------------------------------------------------
// The f64 reference, written from the module docs.

type Mat = Vec<Vec<f64>>;

struct Reference {
    cfg: TarConfig,
    w: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn add(a: &Mat, b: &Mat) -> Mat {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p + q).collect())
        .collect()
}

/// `LN(x)` with eps 1e-5 and biased variance, then `* (1 + s) + b`.
fn modulate(x: &Mat, s: &[f64], b: &[f64]) -> Mat {
    ln(x, None)
        .iter()
        .map(|r| {
            r.iter()
                .zip(s)
                .zip(b)
                .map(|((v, s), b)| v * (1.0 + s) + b)
                .collect()
        })
        .collect()
}

fn ln(x: &Mat, affine: Option<(&[f64], &[f64])>) -> Mat {
    x.iter()
        .map(|r| {
            let n = r.len() as f64;
            let mean = r.iter().sum::<f64>() / n;
            let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            r.iter()
                .enumerate()
                .map(|(i, v)| {
                    let z = (v - mean) / (var + 1e-5).sqrt();
                    match affine {
                        Some((w, b)) => z * w[i] + b[i],
                        None => z,
                    }
                })
                .collect()
        })
        .collect()
}

/// Bin `i` of `n`: rows `floor(i T / n) .. ceil((i + 1) T / n)`.
fn down(u: &Mat, n: usize) -> Mat {
    let t = u.len();
    (0..n)
        .map(|i| {
            let a = (i * t) as f64 / n as f64;
            let b = ((i + 1) * t) as f64 / n as f64;
            let (a, b) = (a.floor() as usize, b.ceil() as usize);
            let c = u[0].len();
            (0..c)
                .map(|j| (a..b).map(|r| u[r][j]).sum::<f64>() / (b - a) as f64)
                .collect()
        })
        .collect()
}

fn up(u: &Mat, t: usize) -> Mat {
    let n = u.len();
    (0..t)
        .map(|i| {
            let src = ((i as f64 + 0.5) * n as f64 / t as f64 - 0.5).max(0.0);
            let i0 = src.floor() as usize;
            let i1 = (i0 + 1).min(n - 1);
            let w = src - i0 as f64;
            u[i0]
                .iter()
                .zip(&u[i1])
                .map(|(a, b)| (1.0 - w) * a + w * b)
                .collect()
        })
        .collect()
}

impl Reference {
    fn new(model: &TarModel) -> Self {
        Self {
            cfg: model.config().clone(),
            w: model
                .tensors()
                .into_iter()
                .map(|(name, shape, data)| {
                    (name, (shape, data.iter().map(|&v| v as f64).collect()))
                })
                .collect(),
        }
    }

    fn t(&self, name: &str) -> &[f64] {
        &self.w[name].1
    }

    fn rows(&self, name: &str) -> Mat {
        let (shape, data) = &self.w[name];
        data.chunks(shape[1]).map(|r| r.to_vec()).collect()
    }

    fn lin(&self, name: &str, x: &Mat) -> Mat {
        let (shape, w) = &self.w[&format!("{name}.weight")];
        let b = self.t(&format!("{name}.bias"));
        let (o, i) = (shape[0], shape[1]);
        x.iter()
            .map(|row| {
                assert_eq!(row.len(), i, "{name}");
                (0..o)
                    .map(|r| b[r] + (0..i).map(|c| w[r * i + c] * row[c]).sum::<f64>())
                    .collect()
            })
            .collect()
    }

    fn ln_p(&self, name: &str, x: &Mat) -> Mat {
        ln(
            x,
            Some((
                self.t(&format!("{name}.weight")),
                self.t(&format!("{name}.bias")),
            )),
        )
    }

    /// `Attn_p(qin, kvin, mask)`; `sees(i, j)`: query `i` may see key `j`.
    fn attn(
        &self,
        p: &str,
        qin: &Mat,
        kvin: &Mat,
        heads: usize,
        sees: &dyn Fn(usize, usize) -> bool,
    ) -> Mat {
        let q = self.lin(&format!("{p}.q"), qin);
        let k = self.lin(&format!("{p}.k"), kvin);
        let v = self.lin(&format!("{p}.v"), kvin);
        let width = q[0].len();
        let h = width / heads;
        let mut out = vec![vec![0.0; width]; q.len()];
        for (i, qi) in q.iter().enumerate() {
            for hd in 0..heads {
                let cols = hd * h..(hd + 1) * h;
                let scores: Vec<f64> = k
                    .iter()
                    .enumerate()
                    .map(|(j, kj)| {
                        if sees(i, j) {
                            cols.clone().map(|c| qi[c] * kj[c]).sum::<f64>() / (h as f64).sqrt()
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in cols.clone() {
                    out[i][c] = e.iter().zip(&v).map(|(p, vj)| p / z * vj[c]).sum();
                }
            }
        }
        self.lin(&format!("{p}.o"), &out)
    }

    fn coder(&self, side: &str, x: &Mat) -> Mat {
        let heads = self.cfg.vae_heads;
        let pos = self.rows(&format!("{side}.pos"));
        let mut u = add(&self.lin(&format!("{side}.in"), x), &pos);
        let a = self.ln_p(&format!("{side}.block.ln1"), &u);
        u = add(
            &u,
            &self.attn(&format!("{side}.block.attn"), &a, &a, heads, &|_, _| true),
        );
        let a = self.ln_p(&format!("{side}.block.ln2"), &u);
        let mut hdn = self.lin(&format!("{side}.block.mlp.fc1"), &a);
        hdn.iter_mut().flatten().for_each(|v| *v = gelu(*v));
        u = add(&u, &self.lin(&format!("{side}.block.mlp.fc2"), &hdn));
        self.lin(
            &format!("{side}.out"),
            &self.ln_p(&format!("{side}.ln"), &u),
        )
    }

    fn phi(&self, u: &Mat) -> Mat {
        let a = self.attn("quant.phi", u, u, 1, &|_, _| true);
        u.iter()
            .zip(&a)
            .map(|(x, y)| x.iter().zip(y).map(|(p, q)| 0.5 * p + 0.5 * q).collect())
            .collect()
    }

    /// `sum_k phi(up(h_k, T))` over the first `scales` scales of `h`.
    fn fhat(&self, h: &Mat, scales: usize) -> Mat {
        let t = self.cfg.steps;
        let mut fhat = vec![vec![0.0; self.cfg.code_dim]; t];
        let offsets = self.cfg.scale_offsets();
        for k in 0..scales {
            let r = self.phi(&up(&h[offsets[k]..offsets[k + 1]].to_vec(), t));
            fhat = add(&fhat, &r);
        }
        fhat
    }

    /// The generator over all `L` tokens at once, block-causal mask
    /// explicit: `L x head_outputs`.
    fn generator(&self, y: &[f64], hist: &Mat, h: &Mat) -> Mat {
        let cfg = &self.cfg;
        let d = cfg.d_model;
        let yv = vec![y.to_vec()];
        let c = self.lin(
            "gen.cond.fc2",
            &vec![self.lin("gen.cond.fc1", &yv)[0]
                .iter()
                .map(|&v| silu(v))
                .collect()],
        )[0]
        .clone();
        let sc: Mat = vec![c.iter().map(|&v| silu(v)).collect()];
        // Memory.
        let attr = self.lin("gen.attr", &yv)[0].clone();
        let mut mem: Mat = attr.chunks(d).map(|r| r.to_vec()).collect();
        let hist_pos = self.rows("gen.hist_pos");
        if !hist.is_empty() {
            let ht = self.lin("gen.hist", hist);
            mem.extend(add(&ht, &hist_pos[..hist.len()].to_vec()));
        }
        // Token inputs.
        let start = self.t("gen.start");
        let pos = self.rows("gen.pos");
        let level = self.rows("gen.level");
        let mut scale_of = Vec::new();
        let mut u: Mat = Vec::new();
        for (k, &n) in cfg.scales.iter().enumerate() {
            let rows: Mat = if k == 0 {
                vec![c.iter().zip(start).map(|(a, b)| a + b).collect(); n]
            } else {
                self.lin("gen.word", &down(&self.fhat(h, k), n))
            };
            for r in rows {
                let i = u.len();
                u.push((0..d).map(|j| r[j] + pos[i][j] + level[k][j]).collect());
                scale_of.push(k);
            }
        }
        let sees = |i: usize, j: usize| scale_of[j] <= scale_of[i];
        for b in 0..cfg.blocks {
            let p = format!("gen.blocks.{b}");
            let ada = self.lin(&format!("{p}.ada"), &sc)[0].clone();
            let ch = |i: usize| ada[i * d..(i + 1) * d].to_vec();
            let (g1, g2, s1, s2, b1, b2) = (ch(0), ch(1), ch(2), ch(3), ch(4), ch(5));
            let a = modulate(&u, &s1, &b1);
            let r = self.attn(&format!("{p}.attn"), &a, &a, cfg.heads, &sees);
            for (ui, ri) in u.iter_mut().zip(&r) {
                for j in 0..d {
                    ui[j] += g1[j] * ri[j];
                }
            }
            let a = self.ln_p(&format!("{p}.cross_ln"), &u);
            u = add(
                &u,
                &self.attn(&format!("{p}.cross"), &a, &mem, cfg.heads, &|_, _| true),
            );
            let a = modulate(&u, &s2, &b2);
            let mut hdn = self.lin(&format!("{p}.mlp.fc1"), &a);
            hdn.iter_mut().flatten().for_each(|v| *v = gelu(*v));
            let r = self.lin(&format!("{p}.mlp.fc2"), &hdn);
            for (ui, ri) in u.iter_mut().zip(&r) {
                for j in 0..d {
                    ui[j] += g2[j] * ri[j];
                }
            }
        }
        let ha = self.lin("gen.head_ada", &sc)[0].clone();
        self.lin("gen.head", &modulate(&u, &ha[..d], &ha[d..]))
    }
}

// ---------------------------------------------------------------------------
// Helpers.

fn to_mat(x: &[f32], width: usize) -> Mat {
    x.chunks(width)
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect()
}

/// Every element within `rel` of the reference, relative to `max(|want|, 1)`;
/// returns the worst such ratio.
fn assert_close(what: &str, got: &[f32], want: &Mat, rel: f64) -> f64 {
    let want: Vec<f64> = want.iter().flatten().copied().collect();
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let err = (g as f64 - w).abs() / w.abs().max(1.0);
        assert!(
            err <= rel,
            "{what}[{i}]: {g} vs {w} (relative error {err:e})"
        );
        worst = worst.max(err);
    }
    worst
}

fn normals(n: usize, rng: &mut SplitMix, std: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

fn odd_config() -> TarConfig {
    TarConfig {
        steps: 5,
        scales: vec![2, 3, 5],
        vae_dim: 8,
        vae_heads: 2,
        code_dim: 3,
        codebook_size: 7,
        d_model: 12,
        heads: 3,
        blocks: 3,
        attr_tokens: 1,
        ..TarConfig::default()
    }
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
        ("odd", odd_config()),
        (
            "odd_no_vq",
            TarConfig {
                quantize: false,
                ..odd_config()
            },
        ),
    ]
}

/// An `h` the model could produce: codebook rows of random codes, or
/// random latents without quantisation.
fn random_h(model: &TarModel, rng: &mut SplitMix) -> Vec<f32> {
    let cfg = model.config();
    if cfg.quantize {
        let codes: Vec<Vec<u32>> = cfg
            .scales
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| (rng.next_u64() % cfg.codebook_size as u64) as u32)
                    .collect()
            })
            .collect();
        model.h_from_codes(&codes).unwrap()
    } else {
        normals(cfg.tokens() * cfg.code_dim, rng, 1.0)
    }
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (j, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = j;
        }
    }
    best as u32
}

// ---------------------------------------------------------------------------
// (2) The KV-cached generator against the full masked forward.

#[test]
fn teacher_forced_matches_the_full_block_causal_forward() {
    let mut rng = SplitMix::new(2024);
    let mut worst = 0.0f64;
    for (label, cfg) in configs() {
        for seed in [1u64, 2] {
            let model = TarModel::random(cfg.clone(), seed).unwrap();
            let reference = Reference::new(&model);
            let f = cfg.step_features;
            for (case, n_hist) in [0, 1, cfg.steps / 3, cfg.steps].into_iter().enumerate() {
                let y = if case == 1 {
                    model.condition(None)
                } else {
                    let a = [
                        rng.normal() as f32,
                        rng.normal() as f32,
                        rng.normal() as f32,
                        rng.normal() as f32,
                    ];
                    model.condition(Some(&a))
                };
                let history = normals(n_hist * f, &mut rng, 1.0);
                let h = random_h(&model, &mut rng);
                let got = model.teacher_forced(&y, &history, &h).unwrap();
                let want = reference.generator(
                    &y.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                    &to_mat(&history, f),
                    &to_mat(&h, cfg.code_dim),
                );
                assert_eq!(want.len(), cfg.tokens());
                assert_eq!(want[0].len(), cfg.head_outputs());
                let what = format!("{label} seed {seed} n_hist {n_hist}");
                worst = worst.max(assert_close(&what, &got, &want, 1e-4));
            }
        }
    }
    println!("worst relative error of teacher_forced vs the f64 reference: {worst:e}");
    assert!(worst > 0.0); // f32 vs f64: never bit-identical; checked something
}

#[test]
fn vq_vae_matches_the_reference() {
    let mut rng = SplitMix::new(7);
    for (label, cfg) in configs() {
        let model = TarModel::random(cfg.clone(), 3).unwrap();
        let reference = Reference::new(&model);
        let (t, f, c) = (cfg.steps, cfg.step_features, cfg.code_dim);
        let x = normals(t * f, &mut rng, 1.0);
        let enc = model.encode(&x).unwrap();
        assert_close(label, &enc, &reference.coder("enc", &to_mat(&x, f)), 1e-4);
        let fhat = normals(t * c, &mut rng, 1.0);
        let dec = model.decode(&fhat).unwrap();
        assert_close(
            label,
            &dec,
            &reference.coder("dec", &to_mat(&fhat, c)),
            1e-4,
        );
        let h = random_h(&model, &mut rng);
        let got = model.fhat_from_h(&h).unwrap();
        let want = reference.fhat(&to_mat(&h, c), cfg.scales.len());
        assert_close(label, &got, &want, 1e-4);
    }
}

// ---------------------------------------------------------------------------
// (3) Quantisation.

#[test]
fn quantize_picks_the_nearest_codebook_rows_scale_by_scale() {
    let mut rng = SplitMix::new(11);
    for (label, cfg) in configs().into_iter().filter(|(_, c)| c.quantize) {
        let model = TarModel::random(cfg.clone(), 5).unwrap();
        let reference = Reference::new(&model);
        let (t, c) = (cfg.steps, cfg.code_dim);
        let codebook = reference.rows("quant.codebook");
        for trial in 0..3 {
            let x = normals(t * cfg.step_features, &mut rng, 1.0);
            // The encoder's output, and a larger one that crosses cells.
            let mut f = model.encode(&x).unwrap();
            if trial == 2 {
                f.iter_mut().for_each(|v| *v *= 3.0);
            }
            let q = model.quantize(&f).unwrap();
            assert_eq!(q.codes.len(), cfg.scales.len());
            assert_eq!(q.h.len(), cfg.tokens() * c);
            assert_eq!(q.fhat.len(), t * c);
            assert_eq!(model.h_from_codes(&q.codes).unwrap(), q.h);
            assert_eq!(model.fhat_from_h(&q.h).unwrap(), q.fhat);
            // Replay the residual in f64 from the chosen h.
            let h = to_mat(&q.h, c);
            let offsets = cfg.scale_offsets();
            let mut rest = to_mat(&f, c);
            for (k, &n) in cfg.scales.iter().enumerate() {
                let z = down(&rest, n);
                for (i, zi) in z.iter().enumerate() {
                    let dist =
                        |e: &Vec<f64>| zi.iter().zip(e).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
                    let best = codebook.iter().map(dist).fold(f64::INFINITY, f64::min);
                    let code = q.codes[k][i] as usize;
                    assert_eq!(q.codes[k].len(), n);
                    let chosen = dist(&codebook[code]);
                    assert!(
                        chosen <= best + 1e-4 * (1.0 + best),
                        "{label} scale {k} token {i}: code {code} at {chosen}, nearest {best}"
                    );
                }
                let r = reference.phi(&up(&h[offsets[k]..offsets[k + 1]].to_vec(), t));
                rest = rest
                    .iter()
                    .zip(&r)
                    .map(|(a, b)| a.iter().zip(b).map(|(p, q)| p - q).collect())
                    .collect();
            }
            // fhat + final rest = f.
            let sum: Vec<f32> = q
                .fhat
                .iter()
                .zip(rest.iter().flatten())
                .map(|(a, b)| (*a as f64 + b) as f32)
                .collect();
            assert_close(label, &sum, &to_mat(&f, c), 1e-4);
        }
    }
}

#[test]
fn quantize_without_vq_keeps_the_pooled_residual() {
    let mut rng = SplitMix::new(13);
    // One scale of length T: h is f itself, fhat = phi(f).
    let cfg = TarConfig {
        quantize: false,
        scales: vec![48],
        ..TarConfig::default()
    };
    let model = TarModel::random(cfg.clone(), 1).unwrap();
    let f = normals(48 * cfg.code_dim, &mut rng, 1.0);
    let q = model.quantize(&f).unwrap();
    assert_eq!(q.codes, vec![Vec::<u32>::new()]);
    assert_eq!(q.h, f);
    let reference = Reference::new(&model);
    assert_close(
        "phi(f)",
        &q.fhat,
        &reference.phi(&to_mat(&f, cfg.code_dim)),
        1e-4,
    );
    // Several scales: h_0 is the mean of f over the day.
    let cfg = TarConfig {
        quantize: false,
        ..TarConfig::default()
    };
    let model = TarModel::random(cfg.clone(), 1).unwrap();
    let q = model.quantize(&f).unwrap();
    let c = cfg.code_dim;
    let mean: Vec<f64> = (0..c)
        .map(|j| (0..48).map(|i| f[i * c + j] as f64).sum::<f64>() / 48.0)
        .collect();
    assert_close("h_0", &q.h[..c], &vec![mean], 1e-5);
    assert_eq!(model.fhat_from_h(&q.h).unwrap(), q.fhat);
    assert!(model.h_from_codes(&q.codes).is_err());
}

// ---------------------------------------------------------------------------
// (4, 5) Generation.

fn inputs(model: &TarModel, n_hist: usize, rng: &mut SplitMix) -> (Vec<f32>, Vec<f32>) {
    let y = model.condition(Some(&[0.7, -0.2, 1.3, 0.4]));
    let history = normals(n_hist * STEP_FEATURES, rng, 1.0);
    (y, history)
}

#[test]
fn generate_is_deterministic_in_the_seed_and_samples() {
    let model = TarModel::random(TarConfig::default(), 9).unwrap();
    let cfg = model.config().clone();
    let (y, history) = inputs(&model, 10, &mut SplitMix::new(1));
    let opts = GenerateOptions::default();
    let run = |seed: u64| {
        model
            .generate(&y, &history, &opts, &mut SplitMix::new(seed))
            .unwrap()
    };
    let a = run(5);
    assert_eq!(a, run(5));
    let b = run(6);
    assert_ne!(a.codes, b.codes);
    for g in [&a, &b] {
        assert_eq!(g.codes.len(), cfg.scales.len());
        for (codes, &n) in g.codes.iter().zip(&cfg.scales) {
            assert_eq!(codes.len(), n);
            assert!(codes.iter().all(|&j| (j as usize) < cfg.codebook_size));
        }
        assert_eq!(g.h.len(), cfg.tokens() * cfg.code_dim);
        assert_eq!(g.x_hat.len(), cfg.steps * STEP_FEATURES);
        assert!(g.x_hat.iter().all(|v| v.is_finite()));
        // h is the codebook rows, x_hat the decoded fhat.
        assert_eq!(model.h_from_codes(&g.codes).unwrap(), g.h);
        let fhat = model.fhat_from_h(&g.h).unwrap();
        assert_eq!(model.decode(&fhat).unwrap(), g.x_hat);
    }
    // Sampling really samples: many distinct codes at the finest scale.
    let mut distinct = a.codes[3].clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() > 10, "{distinct:?}");
    // One uniform per token.
    let mut rng = SplitMix::new(5);
    model.generate(&y, &history, &opts, &mut rng).unwrap();
    let mut expected = SplitMix::new(5);
    for _ in 0..cfg.tokens() {
        expected.uniform();
    }
    assert_eq!(rng.next_u64(), expected.next_u64());
    // The condition and the history matter.
    let g = model
        .generate(
            &model.condition(None),
            &history,
            &opts,
            &mut SplitMix::new(5),
        )
        .unwrap();
    assert_ne!(g.x_hat, a.x_hat);
    let g = model
        .generate(
            &y,
            &history[..3 * STEP_FEATURES],
            &opts,
            &mut SplitMix::new(5),
        )
        .unwrap();
    assert_ne!(g.x_hat, a.x_hat);
}

#[test]
fn greedy_generation_is_the_teacher_forced_argmax() {
    let mut rng = SplitMix::new(21);
    for (label, cfg) in configs().into_iter().filter(|(_, c)| c.quantize) {
        let model = TarModel::random(cfg.clone(), 4).unwrap();
        for n_hist in [0, 7.min(cfg.steps), cfg.steps] {
            let (y, history) = inputs(&model, n_hist, &mut rng);
            let opts = GenerateOptions {
                top_p: 1e-7,
                temperature: 0.7,
                ..GenerateOptions::default()
            };
            let g = model
                .generate(&y, &history, &opts, &mut SplitMix::new(n_hist as u64))
                .unwrap();
            let g2 = model
                .generate(&y, &history, &opts, &mut SplitMix::new(99))
                .unwrap();
            assert_eq!(g, g2, "{label}: greedy does not depend on the draws");
            let logits = model.teacher_forced(&y, &history, &g.h).unwrap();
            let v = cfg.codebook_size;
            let greedy: Vec<u32> = logits.chunks(v).map(argmax).collect();
            let generated: Vec<u32> = g.codes.iter().flatten().copied().collect();
            assert_eq!(greedy, generated, "{label} n_hist {n_hist}");
        }
    }
}

#[test]
fn guided_greedy_generation_is_the_argmax_of_the_guided_logits() {
    // Classifier-free guidance: each scale's codes are the argmax of
    // u + g (c - u), c and u the teacher-forced logits of the same codes
    // with and without the attributes (same history).
    let mut rng = SplitMix::new(31);
    for (label, cfg) in configs().into_iter().filter(|(_, c)| c.quantize) {
        let model = TarModel::random(cfg.clone(), 6).unwrap();
        let (y, history) = inputs(&model, 5.min(cfg.steps), &mut rng);
        let unconditioned = model.condition(None);
        for guidance in [0.0f32, 2.5] {
            let opts = GenerateOptions {
                top_p: 1e-7,
                guidance,
                ..GenerateOptions::default()
            };
            let g = model
                .generate(&y, &history, &opts, &mut SplitMix::new(1))
                .unwrap();
            let c = model.teacher_forced(&y, &history, &g.h).unwrap();
            let u = model
                .teacher_forced(&unconditioned, &history, &g.h)
                .unwrap();
            let guided: Vec<f32> = c
                .iter()
                .zip(&u)
                .map(|(c, u)| u + guidance * (c - u))
                .collect();
            let want: Vec<u32> = guided.chunks(cfg.codebook_size).map(argmax).collect();
            let got: Vec<u32> = g.codes.iter().flatten().copied().collect();
            assert_eq!(got, want, "{label} guidance {guidance}");
        }
        // Guidance 0 is the unconditional model.
        let opts = GenerateOptions {
            top_p: 1e-7,
            guidance: 0.0,
            ..GenerateOptions::default()
        };
        let plain = GenerateOptions {
            top_p: 1e-7,
            ..GenerateOptions::default()
        };
        let a = model
            .generate(&y, &history, &opts, &mut SplitMix::new(1))
            .unwrap();
        let b = model
            .generate(&unconditioned, &history, &plain, &mut SplitMix::new(1))
            .unwrap();
        assert_eq!(a.codes, b.codes, "{label}");
    }
    let model = TarModel::random(TarConfig::default(), 1).unwrap();
    let (y, history) = inputs(&model, 0, &mut rng);
    for bad in [-1.0, f32::NAN, f32::INFINITY] {
        let opts = GenerateOptions {
            guidance: bad,
            ..GenerateOptions::default()
        };
        assert!(matches!(
            model.generate(&y, &history, &opts, &mut SplitMix::new(1)),
            Err(TarError::Input { .. })
        ));
    }
}

#[test]
fn top_p_one_samples_every_code_in_proportion() {
    // A tiny codebook: frequencies of the first token's code over many
    // seeds follow softmax(teacher-forced logits / temperature).
    let cfg = TarConfig {
        codebook_size: 3,
        ..odd_config()
    };
    let model = TarModel::random(cfg.clone(), 8).unwrap();
    let (y, history) = inputs(&model, 2, &mut SplitMix::new(2));
    let h = model
        .generate(
            &y,
            &history,
            &GenerateOptions::default(),
            &mut SplitMix::new(0),
        )
        .unwrap()
        .h;
    let logits = model.teacher_forced(&y, &history, &h).unwrap();
    let temperature = 0.5f64;
    let e: Vec<f64> = logits[..3]
        .iter()
        .map(|&l| (l as f64 / temperature).exp())
        .collect();
    let z: f64 = e.iter().sum();
    let opts = GenerateOptions {
        top_p: 1.0,
        temperature: temperature as f32,
        ..GenerateOptions::default()
    };
    let mut counts = [0usize; 3];
    let draws = 20_000;
    for seed in 0..draws {
        let g = model
            .generate(&y, &history, &opts, &mut SplitMix::new(seed))
            .unwrap();
        counts[g.codes[0][0] as usize] += 1;
    }
    for j in 0..3 {
        let p = e[j] / z;
        let freq = counts[j] as f64 / draws as f64;
        assert!(
            (freq - p).abs() < 0.015,
            "code {j}: {freq} vs {p} ({counts:?})"
        );
    }
}

#[test]
fn generate_without_vq_regresses_h_deterministically() {
    for (label, cfg) in configs().into_iter().filter(|(_, c)| !c.quantize) {
        let model = TarModel::random(cfg.clone(), 2).unwrap();
        let (y, history) = inputs(&model, 4, &mut SplitMix::new(3));
        let opts = GenerateOptions::default();
        let a = model
            .generate(&y, &history, &opts, &mut SplitMix::new(1))
            .unwrap();
        let b = model
            .generate(&y, &history, &opts, &mut SplitMix::new(2))
            .unwrap();
        assert_eq!(a, b, "{label}");
        assert!(a.codes.iter().all(Vec::is_empty));
        // h is the head's output on the path it generated.
        assert_eq!(model.teacher_forced(&y, &history, &a.h).unwrap(), a.h);
        assert!(a.x_hat.iter().all(|v| v.is_finite()));
    }
}

// ---------------------------------------------------------------------------
// Construction.

#[test]
fn random_is_deterministic_and_complete() {
    let cfg = TarConfig::default();
    let a = TarModel::random(cfg.clone(), 1).unwrap();
    let b = TarModel::random(cfg.clone(), 1).unwrap();
    let c = TarModel::random(cfg.clone(), 2).unwrap();
    let names: Vec<_> = a.tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
    assert_eq!(names, cfg.tensor_shapes());
    for ((_, _, x), (_, _, y)) in a.tensors().iter().zip(b.tensors()) {
        assert_eq!(*x, y);
    }
    assert_ne!(a.tensors()[10].2, c.tensors()[10].2);
    let total: usize = cfg
        .tensor_shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(a.parameter_count(), total);
    // Under 1 MB of f32.
    assert!(total * 4 < 1 << 20, "{total}");
    // The AdaLN gates are not trivially zero.
    let ada = a
        .tensors()
        .into_iter()
        .find(|(n, _, _)| n == "gen.blocks.0.ada.weight")
        .unwrap();
    assert!(ada.2.iter().map(|v| v.abs()).sum::<f32>() > 1.0);
    assert!(format!("{a:?}").len() < 1000);
    fn shareable<T: Send + Sync + Clone + std::fmt::Debug>() {}
    shareable::<TarModel>();
}

// ---------------------------------------------------------------------------
// (6) Files.

fn tensor_map(model: &TarModel) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    model
        .tensors()
        .into_iter()
        .map(|(name, shape, data)| (name, (shape, data.to_vec())))
        .collect()
}

/// A safetensors file from `(name, dtype, shape, bytes)` entries.
fn file(
    entries: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
    metadata: Option<HashMap<String, String>>,
) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = entries
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

/// The model's file with `edit` applied to its entries.
fn edited(
    model: &TarModel,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> Vec<u8> {
    let mut entries: Vec<_> = model
        .tensors()
        .into_iter()
        .map(|(name, shape, data)| {
            let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, safetensors::Dtype::F32, shape, bytes)
        })
        .collect();
    edit(&mut entries);
    file(&entries, Some(model.config().to_metadata()))
}

fn set(
    entries: &mut [(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
    name: &str,
    at: usize,
    v: f32,
) {
    let e = entries.iter_mut().find(|e| e.0 == name).unwrap();
    e.3[at * 4..at * 4 + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn safetensors_round_trip_is_bit_exact() {
    for (label, cfg) in configs() {
        let model = TarModel::random(cfg.clone(), 17).unwrap();
        let bytes = model.to_safetensors().unwrap();
        let back = TarModel::from_safetensors(&bytes).unwrap();
        assert_eq!(back.config(), model.config(), "{label}");
        for ((n1, s1, d1), (n2, s2, d2)) in model.tensors().iter().zip(back.tensors()) {
            assert_eq!((n1, s1), (&n2, &s2));
            let bits = |d: &[f32]| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(d1), bits(d2), "{label} {n1}");
        }
        // Writing again gives the same file (up to the order of the
        // metadata keys, which the safetensors crate takes as a HashMap).
        let again = back.to_safetensors().unwrap();
        assert_eq!(again.len(), bytes.len());
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert!(
            again[header..] == bytes[header..],
            "{label}: tensor data differs"
        );
        // from_tensors too, and the models compute the same thing.
        let again = TarModel::from_tensors(cfg.clone(), tensor_map(&model)).unwrap();
        let (y, history) = inputs(&model, 3, &mut SplitMix::new(1));
        let opts = GenerateOptions::default();
        let g = |m: &TarModel| {
            m.generate(&y, &history, &opts, &mut SplitMix::new(4))
                .unwrap()
        };
        assert_eq!(g(&model), g(&back));
        assert_eq!(g(&model), g(&again));
    }
    // save / load through a file.
    let dir = std::env::temp_dir().join(format!("nann-tar-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tar.safetensors");
    let model = TarModel::random(TarConfig::default(), 3).unwrap();
    model.save(&path).unwrap();
    model.save(&path).unwrap(); // over an existing file
    let back = TarModel::load(&path).unwrap();
    for ((_, _, a), (_, _, b)) in back.tensors().iter().zip(model.tensors()) {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary files left");
    assert!(matches!(
        TarModel::load(dir.join("missing.safetensors")),
        Err(TarError::Io { .. })
    ));
    assert!(matches!(model.save(&dir), Err(TarError::Io { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn broken_files_give_typed_errors() {
    let model = TarModel::random(odd_config(), 1).unwrap();
    let valid = model.to_safetensors().unwrap();
    assert!(TarModel::from_safetensors(&valid).is_ok());
    // Truncated.
    for len in [0, 4, 8, 20, valid.len() - 1] {
        assert!(
            matches!(
                TarModel::from_safetensors(&valid[..len]),
                Err(TarError::Format(_))
            ),
            "{len}"
        );
    }
    // A missing tensor.
    let bytes = edited(&model, |e| e.retain(|x| x.0 != "gen.head.bias"));
    assert_eq!(
        TarModel::from_safetensors(&bytes).unwrap_err(),
        TarError::MissingTensor {
            name: "gen.head.bias".into()
        }
    );
    // A wrong shape.
    let bytes = edited(&model, |e| {
        let x = e.iter_mut().find(|x| x.0 == "gen.start").unwrap();
        x.2 = vec![3, 4];
    });
    assert_eq!(
        TarModel::from_safetensors(&bytes).unwrap_err(),
        TarError::Shape {
            name: "gen.start".into(),
            expected: vec![12],
            found: vec![3, 4]
        }
    );
    // Non-finite values.
    for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let bytes = edited(&model, |e| set(e, "quant.codebook", 5, v));
        assert_eq!(
            TarModel::from_safetensors(&bytes).unwrap_err(),
            TarError::NonFinite {
                name: "quant.codebook".into(),
                position: 5
            }
        );
    }
    // A wrong dtype.
    let bytes = edited(&model, |e| {
        let x = e.iter_mut().find(|x| x.0 == "gen.level").unwrap();
        x.1 = safetensors::Dtype::I32;
    });
    assert!(matches!(
        TarModel::from_safetensors(&bytes),
        Err(TarError::DType { name, .. }) if name == "gen.level"
    ));
    // A non-positive scale.
    for v in [0.0, -1.0] {
        let bytes = edited(&model, |e| set(e, "norm.x_std", 3, v));
        assert!(matches!(
            TarModel::from_safetensors(&bytes),
            Err(TarError::Config {
                field: "norm.x_std",
                ..
            })
        ));
        let bytes = edited(&model, |e| set(e, "norm.attr_std", 0, v));
        assert!(matches!(
            TarModel::from_safetensors(&bytes),
            Err(TarError::Config {
                field: "norm.attr_std",
                ..
            })
        ));
    }
    // Metadata: missing, a missing key, a wrong version, bad values, and a
    // configuration the tensors do not fit.
    let entries: Vec<_> = model
        .tensors()
        .into_iter()
        .map(|(n, s, d)| {
            let b: Vec<u8> = d.iter().flat_map(|v| v.to_le_bytes()).collect();
            (n, safetensors::Dtype::F32, s, b)
        })
        .collect();
    assert!(matches!(
        TarModel::from_safetensors(&file(&entries, None)),
        Err(TarError::Config { .. })
    ));
    let meta = model.config().to_metadata();
    let with = |key: &str, value: Option<&str>| {
        let mut m = meta.clone();
        match value {
            Some(v) => m.insert(format!("nann.tar.{key}"), v.into()),
            None => m.remove(&format!("nann.tar.{key}")),
        };
        TarModel::from_safetensors(&file(&entries, Some(m)))
    };
    assert!(matches!(
        with("heads", None),
        Err(TarError::Config { field: "heads", .. })
    ));
    assert!(matches!(
        with("version", Some("2")),
        Err(TarError::Config {
            field: "version",
            ..
        })
    ));
    assert!(matches!(
        with("scales", Some("2,3,4")),
        Err(TarError::Config {
            field: "scales",
            ..
        })
    ));
    assert!(matches!(
        with("quantize", Some("yes")),
        Err(TarError::Config {
            field: "quantize",
            ..
        })
    ));
    assert!(matches!(
        with("d_model", Some("x")),
        Err(TarError::Config {
            field: "d_model",
            ..
        })
    ));
    assert!(matches!(
        with("d_model", Some("16")),
        Err(TarError::Config {
            field: "d_model",
            ..
        })
    ));
    assert!(matches!(
        with("d_model", Some("24")),
        Err(TarError::Shape { .. })
    ));
    assert!(matches!(
        with("quantize", Some("false")),
        Err(TarError::Shape { name, .. }) if name == "gen.head.weight"
    ));
    // from_tensors: the same checks.
    let cfg = model.config().clone();
    let mut t = tensor_map(&model);
    t.remove("dec.out.weight");
    assert!(matches!(
        TarModel::from_tensors(cfg.clone(), t),
        Err(TarError::MissingTensor { name }) if name == "dec.out.weight"
    ));
    let mut t = tensor_map(&model);
    t.get_mut("enc.pos").unwrap().0 = vec![5, 7];
    assert!(matches!(
        TarModel::from_tensors(cfg.clone(), t),
        Err(TarError::Shape { .. })
    ));
    let mut t = tensor_map(&model);
    t.get_mut("enc.pos").unwrap().1.pop();
    assert!(matches!(
        TarModel::from_tensors(cfg.clone(), t),
        Err(TarError::Shape { .. })
    ));
    let mut t = tensor_map(&model);
    t.get_mut("gen.blocks.2.ada.bias").unwrap().1[1] = f32::NAN;
    assert_eq!(
        TarModel::from_tensors(cfg.clone(), t).unwrap_err(),
        TarError::NonFinite {
            name: "gen.blocks.2.ada.bias".into(),
            position: 1
        }
    );
    let mut t = tensor_map(&model);
    t.get_mut("norm.attr_std").unwrap().1[2] = 0.0;
    assert!(matches!(
        TarModel::from_tensors(cfg.clone(), t),
        Err(TarError::Config { .. })
    ));
    // Extra tensors are ignored.
    let mut t = tensor_map(&model);
    t.insert("optimizer.step".into(), (vec![1], vec![3.0]));
    assert!(TarModel::from_tensors(cfg.clone(), t).is_ok());
    // An invalid configuration.
    let bad = TarConfig {
        heads: 5,
        ..cfg.clone()
    };
    assert!(matches!(
        TarModel::from_tensors(bad.clone(), tensor_map(&model)),
        Err(TarError::Config { .. })
    ));
    assert!(matches!(
        TarModel::random(bad, 1),
        Err(TarError::Config { .. })
    ));
}

#[test]
fn hostile_files_never_panic() {
    let model = TarModel::random(odd_config(), 2).unwrap();
    let valid = model.to_safetensors().unwrap();
    let header_len = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let mut rng = SplitMix::new(77);
    let mut below = |n: usize| (rng.next_u64() % n.max(1) as u64) as usize;
    let (mut ok, mut err) = (0, 0);
    let mut tally = |r: Result<TarModel, TarError>| match r {
        Ok(m) => {
            // A file that loads must run.
            let y = m.condition(Some(&[0.1, 0.2, 0.3, 0.4]));
            let _ = m.generate(&y, &[], &GenerateOptions::default(), &mut SplitMix::new(1));
            ok += 1;
        }
        Err(_) => err += 1,
    };
    for len in (0..valid.len()).step_by(7) {
        tally(TarModel::from_safetensors(&valid[..len]));
    }
    for round in 0..600 {
        let mut bytes = valid.clone();
        match round % 5 {
            0 | 1 => {
                for _ in 0..1 + below(4) {
                    let i = 8 + below(header_len);
                    bytes[i] ^= 1 << below(8);
                }
            }
            2 => {
                let i = 8 + below(header_len);
                bytes[i] = b"0123456789\"[]{},:-e"[below(19)];
            }
            3 => {
                for _ in 0..1 + below(8) {
                    let i = 8 + header_len + below(valid.len() - 8 - header_len);
                    bytes[i] = below(256) as u8;
                }
            }
            _ => {
                let a = below(bytes.len());
                let b = (a + below(64)).min(bytes.len());
                bytes.drain(a..b);
            }
        }
        tally(TarModel::from_safetensors(&bytes));
    }
    assert!(ok > 0 && err > 0, "ok {ok}, err {err}");
}

// ---------------------------------------------------------------------------
// (7) Inputs.

#[test]
fn inputs_are_validated() {
    let model = TarModel::random(TarConfig::default(), 1).unwrap();
    let cfg = model.config().clone();
    let (t, f, c) = (cfg.steps, cfg.step_features, cfg.code_dim);
    let is_input = |r: Result<Vec<f32>, TarError>, name: &str| match r {
        Err(TarError::Input { input, .. }) => assert_eq!(input, name),
        other => panic!("{name}: {other:?}"),
    };
    let mut nan = vec![0.0; t * f];
    nan[7] = f32::NAN;
    is_input(model.encode(&vec![0.0; t * f - 1]), "x");
    is_input(model.encode(&nan), "x");
    is_input(model.decode(&vec![0.0; t * c + 1]), "fhat");
    is_input(model.decode(&[f32::INFINITY; 48 * 8]), "fhat");
    assert!(matches!(
        model.quantize(&[0.0; 3]),
        Err(TarError::Input { input: "f", .. })
    ));
    is_input(model.fhat_from_h(&vec![0.0; 64 * c]), "h");
    is_input(model.normalize_step(&[0.0; 18]), "raw");
    is_input(model.normalize_step(&nan), "raw");
    is_input(model.denormalize_step(&[0.0; 16]), "x");
    assert_eq!(model.normalize_step(&[]).unwrap(), Vec::<f32>::new());
    // Codes.
    let good: Vec<Vec<u32>> = cfg.scales.iter().map(|&n| vec![0; n]).collect();
    assert!(model.h_from_codes(&good).is_ok());
    is_input(model.h_from_codes(&good[..3]), "codes");
    let mut bad = good.clone();
    bad[2].push(0);
    is_input(model.h_from_codes(&bad), "codes");
    let mut bad = good.clone();
    bad[1][2] = 256;
    is_input(model.h_from_codes(&bad), "codes");
    // The generator's inputs.
    let y = model.condition(Some(&[1.0, 2.0, 3.0, 4.0]));
    assert_eq!(y[4], 1.0);
    assert_eq!(model.condition(None), vec![0.0; 5]);
    let h = vec![0.0; cfg.tokens() * c];
    assert!(model.teacher_forced(&y, &[], &h).is_ok());
    is_input(model.teacher_forced(&y[..4], &[], &h), "y");
    is_input(
        model.teacher_forced(&[f32::NAN, 0.0, 0.0, 0.0, 1.0], &[], &h),
        "y",
    );
    is_input(model.teacher_forced(&y, &[0.0; 18], &h), "history");
    is_input(
        model.teacher_forced(&y, &vec![0.0; (t + 1) * f], &h),
        "history",
    );
    is_input(model.teacher_forced(&y, &[f32::NAN; 17], &h), "history");
    is_input(model.teacher_forced(&y, &[], &h[1..]), "h");
    let mut rng = SplitMix::new(1);
    let gen = |y: &[f32], history: &[f32], top_p: f32, temperature: f32, rng: &mut SplitMix| {
        model
            .generate(
                y,
                history,
                &GenerateOptions {
                    top_p,
                    temperature,
                    ..GenerateOptions::default()
                },
                rng,
            )
            .map(|g| g.x_hat)
    };
    assert!(gen(&y, &vec![0.0; t * f], 1.0, 1.0, &mut rng).is_ok());
    for (top_p, temperature, name) in [
        (0.0, 1.0, "top_p"),
        (-0.5, 1.0, "top_p"),
        (1.01, 1.0, "top_p"),
        (f32::NAN, 1.0, "top_p"),
        (0.9, 0.0, "temperature"),
        (0.9, -1.0, "temperature"),
        (0.9, f32::NAN, "temperature"),
        (0.9, f32::INFINITY, "temperature"),
    ] {
        is_input(gen(&y, &[], top_p, temperature, &mut rng), name);
    }
    is_input(gen(&y[..2], &[], 0.9, 1.0, &mut rng), "y");
    is_input(gen(&y, &[0.0; 5], 0.9, 1.0, &mut rng), "history");
}

// ---------------------------------------------------------------------------
// Latency (run with `cargo test --release --test tar_model -- --ignored --nocapture`).

#[test]
#[ignore]
fn generate_latency() {
    let model = TarModel::random(TarConfig::default(), 1).unwrap();
    let (y, history) = inputs(&model, 48, &mut SplitMix::new(1));
    let opts = GenerateOptions::default();
    let mut rng = SplitMix::new(3);
    for _ in 0..50 {
        model.generate(&y, &history, &opts, &mut rng).unwrap();
    }
    let mut times = Vec::new();
    for _ in 0..20 {
        let n = 50;
        let start = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(model.generate(&y, &history, &opts, &mut rng).unwrap());
        }
        times.push(start.elapsed().as_secs_f64() / n as f64 * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "generate (default config, 65 tokens, 48 history rows): min {:.3} ms, median {:.3} ms",
        times[0],
        times[times.len() / 2]
    );
    let mut teacher = Vec::new();
    let h = model.generate(&y, &history, &opts, &mut rng).unwrap().h;
    for _ in 0..5 {
        let start = std::time::Instant::now();
        for _ in 0..50 {
            std::hint::black_box(model.teacher_forced(&y, &history, &h).unwrap());
        }
        teacher.push(start.elapsed().as_secs_f64() / 50.0 * 1e3);
    }
    teacher.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("teacher_forced: min {:.3} ms", teacher[0]);
}

#[test]
fn dimensions_too_large_to_allocate_are_a_config_error_not_an_abort() {
    // Every field in its range, but 64 blocks of width 4096 are ~4.3G
    // weights (17 GiB); allocating them would abort the process.
    let config = TarConfig {
        d_model: 4096,
        heads: 8,
        blocks: 64,
        ..TarConfig::default()
    };
    let refused = config.validate();
    assert!(
        matches!(refused, Err(TarError::Config { ref message, .. }) if message.contains("MAX_MODEL_PARAMETERS")),
        "{refused:?}"
    );
    assert!(matches!(
        TarModel::random(config, 1),
        Err(TarError::Config { .. })
    ));
}
