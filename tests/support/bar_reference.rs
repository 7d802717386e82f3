//! The BAR model's spec written out loop by loop in f64 (the reference
//! every BAR implementation is checked against: the CPU model in
//! `tests/bar_model.rs`, the CUDA scorer in `tests/cuda_parity.rs`), random
//! inputs and the configurations under test. Included with `#[path]`.
#![allow(dead_code)]

use std::collections::HashMap;

use nann::bar::model::BarModel;
use nann::bar::{AdFeatures, AdTokens, BarConfig, BidFeatures, UserFeatures};

/// A deterministic generator for test inputs.
pub struct Lcg(pub u64);

impl Lcg {
    /// Seeded from the clock once per call unless `NANN_TEST_SEED` is set,
    /// so every run sees fresh inputs; the seed is printed to reproduce a
    /// failure.
    pub fn fresh(salt: u64) -> Self {
        let seed = std::env::var("NANN_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("seed {seed} (salt {salt}); NANN_TEST_SEED={seed} reproduces");
        Lcg(seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn unit(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32
    }
    pub fn sym(&mut self) -> f32 {
        self.unit() * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.sym() * scale).collect()
    }
}

// ---------------------------------------------------------------------------
// The reference: the spec, written out loop by loop in f64.

pub struct Reference {
    pub c: BarConfig,
    pub t: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

pub const AD_TABLES: [&str; 8] = [
    "emb.item",
    "emb.cate",
    "emb.brand",
    "emb.bid_type",
    "emb.bid_constraint",
    "emb.budget_left",
    "emb.time_left",
    "emb.default_bid",
];

impl Reference {
    pub fn new(model: &BarModel) -> Self {
        let t = model
            .tensors()
            .into_iter()
            .map(|(name, shape, data)| (name, (shape, data.iter().map(|&v| v as f64).collect())))
            .collect();
        Self {
            c: model.config().clone(),
            t,
        }
    }

    pub fn emb(&self, table: &str, id: u32) -> Vec<f64> {
        let (shape, data) = &self.t[table];
        let e = shape[1];
        data[id as usize * e..(id as usize + 1) * e].to_vec()
    }

    /// `W x + b` with `W` stored `[out, in]`.
    pub fn linear(&self, layer: &str, x: &[f64]) -> Vec<f64> {
        let (shape, w) = &self.t[&format!("{layer}.weight")];
        let (_, b) = &self.t[&format!("{layer}.bias")];
        let (out, inp) = (shape[0], shape[1]);
        assert_eq!(x.len(), inp, "{layer}");
        (0..out)
            .map(|o| {
                let mut acc = b[o];
                for i in 0..inp {
                    acc += w[o * inp + i] * x[i];
                }
                acc
            })
            .collect()
    }

    /// `sum_i |W_0i x_i| + |b_0|` of a one-output layer.
    pub fn magnitude(&self, layer: &str, x: &[f64]) -> f64 {
        let (_, w) = &self.t[&format!("{layer}.weight")];
        let (_, b) = &self.t[&format!("{layer}.bias")];
        w.iter().zip(x).map(|(w, x)| (w * x).abs()).sum::<f64>() + b[0].abs()
    }

    pub fn relu(x: Vec<f64>) -> Vec<f64> {
        x.into_iter().map(|v| v.max(0.0)).collect()
    }

    /// `sum_t softmax_t(q . K_t / sqrt(A)) V_t` over unmasked `t`; zero
    /// when every position is masked.
    pub fn attend(
        &self,
        q: &[f64],
        k: &[Vec<f64>],
        v: &[Vec<f64>],
        mask: &[bool],
        dv: usize,
    ) -> Vec<f64> {
        let a = self.c.d_attn as f64;
        let logits: Vec<Option<f64>> = k
            .iter()
            .zip(mask)
            .map(|(kt, &keep)| {
                keep.then(|| q.iter().zip(kt).map(|(x, y)| x * y).sum::<f64>() / a.sqrt())
            })
            .collect();
        let mut out = vec![0.0; dv];
        let Some(max) = logits.iter().flatten().copied().reduce(f64::max) else {
            return out;
        };
        let z: f64 = logits.iter().flatten().map(|l| (l - max).exp()).sum();
        for (l, vt) in logits.iter().zip(v) {
            if let Some(l) = l {
                let p = (l - max).exp() / z;
                for (o, x) in out.iter_mut().zip(vt) {
                    *o += p * x;
                }
            }
        }
        out
    }

    pub fn z_a(&self, tokens: &AdTokens) -> Vec<f64> {
        let x: Vec<f64> = tokens
            .ids()
            .iter()
            .zip(AD_TABLES)
            .flat_map(|(&id, table)| self.emb(table, id))
            .collect();
        self.linear("ad_net.1", &Self::relu(self.linear("ad_net.0", &x)))
    }

    /// `[pctr, pbid_ratio, score]`, and the scale of each head's last
    /// layer: `sum_i |w_i x_i| + |b|` (times `pctr (1 - pctr)` for the
    /// sigmoid), the size of the rounding error any f32 evaluation makes.
    pub fn forward(&self, user: &UserFeatures, tokens: &AdTokens) -> ([f64; 3], [f64; 3]) {
        self.forward_with_z_a(user, &self.z_a(tokens), tokens)
    }

    /// [`forward`](Self::forward) with the candidate's `z_a` given (as the
    /// index stores it, in f32) instead of computed from its tokens.
    pub fn forward_with_z_a(
        &self,
        user: &UserFeatures,
        z_a: &[f64],
        tokens: &AdTokens,
    ) -> ([f64; 3], [f64; 3]) {
        let c = &self.c;
        let x: Vec<f64> = user
            .fields
            .iter()
            .enumerate()
            .flat_map(|(i, &id)| self.emb(&format!("emb.user.{i}"), id))
            .collect();
        let z_u = self.linear("user_net.1", &Self::relu(self.linear("user_net.0", &x)));

        let start = user.seq_items.len().saturating_sub(c.max_seq_len);
        let (mut k1, mut v1, mut k2, mut v2, mut mask) = (vec![], vec![], vec![], vec![], vec![]);
        for t in start..user.seq_items.len() {
            let mut s = self.emb("emb.item", user.seq_items[t]);
            s.extend(self.emb("emb.cate", user.seq_cates[t]));
            k1.push(self.linear("seq_attn.k", &s));
            v1.push(self.linear("seq_attn.v", &s));
            k2.push(self.linear("ctr_attn.k", &s));
            v2.push(self.linear("ctr_attn.v", &s));
            mask.push(user.seq_items[t] != 0);
        }

        let z_seq = self.attend(&self.linear("seq_attn.q", z_a), &k1, &v1, &mask, c.d_model);
        let z_ua: Vec<f64> = z_u.iter().chain(&z_seq).chain(z_a).copied().collect();

        let q2 = self.linear("ctr_attn.q", &z_ua);
        let cv = self.attend(&q2, &k2, &v2, &mask, c.d_attn);
        let h_ctr = Self::relu(self.linear("ctr_mlp.0", &[cv, q2].concat()));
        let pctr = 1.0 / (1.0 + (-self.linear("ctr_mlp.1", &h_ctr)[0]).exp());
        let ctr_scale = self.magnitude("ctr_mlp.1", &h_ctr) * pctr * (1.0 - pctr);

        let q3 = self.linear("bid_attn.q", &z_ua);
        let toks: Vec<Vec<f64>> = tokens
            .ids()
            .iter()
            .zip(AD_TABLES)
            .map(|(&id, table)| self.emb(table, id))
            .collect();
        let k3: Vec<_> = toks.iter().map(|t| self.linear("bid_attn.k", t)).collect();
        let v3: Vec<_> = toks.iter().map(|t| self.linear("bid_attn.v", t)).collect();
        let b = self.attend(&q3, &k3, &v3, &vec![true; toks.len()], c.d_attn);
        let h_bid = Self::relu(self.linear("bid_mlp.0", &[b, q3].concat()));
        let pbid = self.linear("bid_mlp.1", &h_bid)[0];
        let bid_scale = self.magnitude("bid_mlp.1", &h_bid);

        let p = self.linear("ecpm.proj", &z_ua);
        let hidden = Self::relu(self.linear("ecpm_mlp.0", &[h_ctr, h_bid, p].concat()));
        let score = self.linear("ecpm_mlp.1", &hidden)[0];
        let score_scale = self.magnitude("ecpm_mlp.1", &hidden);
        ([pctr, pbid, score], [ctr_scale, bid_scale, score_scale])
    }
}

// ---------------------------------------------------------------------------
// Inputs.

pub fn random_user(c: &BarConfig, rng: &mut Lcg, len: usize, padding: f32) -> UserFeatures {
    let fields = c
        .user_field_vocab
        .iter()
        .map(|&v| rng.below(v) as u32)
        .collect();
    let mut seq_items = Vec::with_capacity(len);
    let mut seq_cates = Vec::with_capacity(len);
    for _ in 0..len {
        if rng.unit() < padding {
            seq_items.push(0);
            seq_cates.push(0);
        } else {
            seq_items.push(1 + rng.below(c.item_vocab - 1) as u32);
            seq_cates.push(rng.below(c.cate_vocab) as u32);
        }
    }
    UserFeatures {
        fields,
        seq_items,
        seq_cates,
    }
}

pub fn random_ad(c: &BarConfig, rng: &mut Lcg) -> AdFeatures {
    AdFeatures {
        item: 1 + rng.below(c.item_vocab - 1) as u32,
        cate: 1 + rng.below(c.cate_vocab - 1) as u32,
        brand: rng.below(c.brand_vocab) as u32,
        bid: BidFeatures {
            bid_type: rng.below(c.bid_type_vocab) as u32,
            bid_constraint: rng.unit() * 200.0,
            budget_left_ratio: rng.unit(),
            time_left_ratio: rng.unit(),
            default_bid_value: rng.unit() * 50.0,
        },
    }
}

/// The same model with every tensor multiplied by `factor`: sharper
/// attention and larger activations than a fresh initialisation.
pub fn scaled(model: &BarModel, factor: f32) -> BarModel {
    let tensors: HashMap<String, (Vec<usize>, Vec<f32>)> = model
        .tensors()
        .into_iter()
        .map(|(name, shape, data)| (name, (shape, data.iter().map(|v| v * factor).collect())))
        .collect();
    BarModel::from_tensors(model.config().clone(), &tensors).unwrap()
}

pub fn rel_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-3)
}

/// The configurations under test: the default (every fold taken), without
/// bid features, and shapes that make the model take each unfolded path.
pub fn configs() -> Vec<(&'static str, BarConfig)> {
    let small = BarConfig {
        item_vocab: 300,
        brand_vocab: 40,
        ..BarConfig::default()
    };
    vec![
        ("default", small.clone()),
        (
            "no bid features",
            BarConfig {
                bid_features: false,
                ..small.clone()
            },
        ),
        (
            // Long sequences: the sequence folds stop paying off.
            "long sequences",
            BarConfig {
                max_seq_len: 200,
                ..small.clone()
            },
        ),
        (
            // A narrow: direct sequence logits, direct pCTR values, direct
            // pBid token path.
            "narrow attention",
            BarConfig {
                d_attn: 4,
                ..small.clone()
            },
        ),
        (
            // D narrow, H wide: direct sequence values.
            "narrow model",
            BarConfig {
                d_model: 4,
                head_hidden: 96,
                bid_features: false,
                ..small
            },
        ),
    ]
}
