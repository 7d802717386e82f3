//! Training the BAR model with candle on CPU (feature `train`).
//!
//! [`CandleBar`] is the forward pass of the [module docs](super) written in
//! batched candle tensors, with one variable per tensor of the weights file
//! (same names, same shapes), so a trained model exports to a [`BarModel`]
//! without any renaming. [`train`] (or, step by step, [`Trainer`]) optimises
//! it on sessions of the synthetic [`Market`] with the paper's objective
//! (§3.2-3.3, eq. 14):
//!
//! * `L_LTR` (eq. 9): `softplus(-(f(u,a+) - f(u,a-)))` averaged over the hard
//!   pairs (impression vs ranking-set ad, [`Market::hard_pairs`]) and the easy
//!   pairs (each impression or ranking-set ad vs `easy_per_positive` random
//!   corpus ads outside the session, [`Market::easy_negatives`]; Appendix A.1).
//! * `L_BAO` (eq. 10, Table 2): `softplus(-I (f(u,ã) - f(u,a)))` over the
//!   session's labeled ads, `ã` from [`Market::perturb`]. Pairs whose
//!   perturbation leaves every token unchanged (the bid feature stays in its
//!   bucket) are skipped: the model cannot tell them apart, so they would add
//!   the constant `ln 2` and no gradient. Absent without bid features.
//! * `L_DAO` (eq. 11-13): `mean (pctr - pCTR)^2 + mean (pbid_ratio - pBid /
//!   aBid)^2` over the labeled ads, `aBid` = the ad's `default_bid_value`.
//! * `L = L_LTR + λ1 L_BAO + λ2 L_DAO`.
//!
//! The ablations of the paper are configurations: `lambda_bao = 0` is "w/o
//! BAO", `BarConfig::bid_features = false` is "w/o BF" (which has no BAO).
//!
//! Sessions: training reads `market.session(i)` for `i` in
//! `0..TrainConfig::train_sessions` (cycling); evaluation must use indices at
//! or above [`EVAL_SESSION_START`], a range training never reads.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{Init, Linear, Module, Optimizer, VarBuilder, VarMap};

use super::config::BarConfig;
use super::error::ModelError;
use super::features::{AdFeatures, AdTokens, UserFeatures};
use super::market::{Market, Session};
use super::model::BarModel;

/// First session index of the evaluation range: training reads only
/// `0..TrainConfig::train_sessions`, which [`TrainConfig::validate`] keeps
/// below this, so evaluation on `EVAL_SESSION_START..` never sees a training
/// session.
pub const EVAL_SESSION_START: u64 = 1 << 40;

/// Added to the attention logit of a masked (padding) sequence position: its
/// softmax weight underflows to exactly zero.
const MASKED_LOGIT: f64 = -1e9;

/// Everything training can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A candle operation failed (a shape or dtype bug, or out of memory);
    /// the message is candle's.
    #[error("candle: {0}")]
    Candle(String),
    /// The model rejected its weights, configuration or an input feature.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A [`TrainConfig`] field is out of range.
    #[error("training configuration `{key}`: {message}")]
    Config {
        /// The field.
        key: &'static str,
        /// What is wrong and what is accepted.
        message: String,
    },
    /// The inputs do not fit together (for example a model configuration
    /// that does not cover the market's vocabularies, or a batch without any
    /// pair to learn from).
    #[error("invalid input: {0}")]
    Input(String),
    /// The loss became NaN or infinite (diverged: lower the learning rate).
    #[error("the loss became non-finite ({loss}) at step {step}")]
    NonFinite {
        /// The step (0-based) whose loss was non-finite.
        step: usize,
        /// The value.
        loss: f32,
    },
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Candle(e.to_string())
    }
}

/// The three outputs of the model for one (user, ad) pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairHeads {
    /// The eCPM head: the retrieval score, higher is better.
    pub score: f32,
    /// The pCTR head, in `(0, 1)`.
    pub pctr: f32,
    /// The pBid head: pBid / aBid.
    pub pbid_ratio: f32,
}

/// The model's parameters as candle tensors (each backed by a variable of
/// the [`VarMap`]).
struct Params {
    /// `emb.user.{i}`.
    emb_user: Vec<Tensor>,
    /// The tables of the ad token positions, in token order: `emb.item`,
    /// `emb.cate`, `emb.brand` and, with bid features, `emb.bid_type`,
    /// `emb.bid_constraint`, `emb.budget_left`, `emb.time_left`,
    /// `emb.default_bid`. The first two also embed the behaviour sequence.
    emb_ad: Vec<Tensor>,
    user_net: [Linear; 2],
    ad_net: [Linear; 2],
    seq_q: Linear,
    seq_k: Linear,
    seq_v: Linear,
    ctr_q: Linear,
    ctr_k: Linear,
    ctr_v: Linear,
    ctr_mlp: [Linear; 2],
    bid_q: Linear,
    bid_k: Linear,
    bid_v: Linear,
    bid_mlp: [Linear; 2],
    ecpm_proj: Linear,
    ecpm_mlp: [Linear; 2],
}

/// Creates (zero-initialised) the variable `name` of shape `shape`.
fn var(vb: &VarBuilder, shape: &[usize], name: &str) -> candle_core::Result<Tensor> {
    vb.get_with_hints(shape, name, Init::Const(0.0))
}

/// Creates `{prefix}.weight` `[out, in]` and `{prefix}.bias` `[out]`.
fn linear(vb: &VarBuilder, inp: usize, out: usize, prefix: &str) -> candle_core::Result<Linear> {
    let weight = var(vb, &[out, inp], &format!("{prefix}.weight"))?;
    let bias = var(vb, &[out], &format!("{prefix}.bias"))?;
    Ok(Linear::new(weight, Some(bias)))
}

impl Params {
    /// Creates every variable of `config` in `vb`'s map, named and shaped as
    /// in the weights file.
    fn new(config: &BarConfig, vb: &VarBuilder) -> candle_core::Result<Self> {
        let e = config.emb_dim;
        let f = config.user_field_vocab.len();
        let t = config.ad_tokens();
        let (d, a, h) = (config.d_model, config.d_attn, config.head_hidden);
        let emb_user = config
            .user_field_vocab
            .iter()
            .enumerate()
            .map(|(i, &v)| var(vb, &[v, e], &format!("emb.user.{i}")))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut tables = vec![
            ("emb.item", config.item_vocab),
            ("emb.cate", config.cate_vocab),
            ("emb.brand", config.brand_vocab),
        ];
        if config.bid_features {
            tables.extend([
                ("emb.bid_type", config.bid_type_vocab),
                ("emb.bid_constraint", config.buckets),
                ("emb.budget_left", config.buckets),
                ("emb.time_left", config.buckets),
                ("emb.default_bid", config.buckets),
            ]);
        }
        let emb_ad = tables
            .iter()
            .map(|&(name, v)| var(vb, &[v, e], name))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            emb_user,
            emb_ad,
            user_net: [
                linear(vb, f * e, config.user_hidden, "user_net.0")?,
                linear(vb, config.user_hidden, d, "user_net.1")?,
            ],
            ad_net: [
                linear(vb, t * e, config.ad_hidden, "ad_net.0")?,
                linear(vb, config.ad_hidden, d, "ad_net.1")?,
            ],
            seq_q: linear(vb, d, a, "seq_attn.q")?,
            seq_k: linear(vb, 2 * e, a, "seq_attn.k")?,
            seq_v: linear(vb, 2 * e, d, "seq_attn.v")?,
            ctr_q: linear(vb, 3 * d, a, "ctr_attn.q")?,
            ctr_k: linear(vb, 2 * e, a, "ctr_attn.k")?,
            ctr_v: linear(vb, 2 * e, a, "ctr_attn.v")?,
            ctr_mlp: [
                linear(vb, 2 * a, h, "ctr_mlp.0")?,
                linear(vb, h, 1, "ctr_mlp.1")?,
            ],
            bid_q: linear(vb, 3 * d, a, "bid_attn.q")?,
            bid_k: linear(vb, e, a, "bid_attn.k")?,
            bid_v: linear(vb, e, a, "bid_attn.v")?,
            bid_mlp: [
                linear(vb, 2 * a, h, "bid_mlp.0")?,
                linear(vb, h, 1, "bid_mlp.1")?,
            ],
            ecpm_proj: linear(vb, 3 * d, h, "ecpm.proj")?,
            ecpm_mlp: [
                linear(vb, 3 * h, h, "ecpm_mlp.0")?,
                linear(vb, h, 1, "ecpm_mlp.1")?,
            ],
        })
    }
}

/// Softmax over the last dimension, differentiable (candle's fused
/// `softmax_last_dim` has no backward pass). The max is a constant shift, so
/// it is detached.
fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let num = x.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// `log(1 + e^x)` without overflow: `relu(x) + log(1 + e^-|x|)`.
fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    x.relu()? + tail
}

/// A batch of (user, ad) pairs laid out per user: `users` users, each with
/// `slots` pair slots, each slot naming one of the batch's distinct ads.
/// Built by [`PairBatch::new`]; scored by [`CandleBar::forward`].
#[derive(Debug, Clone)]
pub struct PairBatch {
    /// The configuration the ids were checked against.
    config: BarConfig,
    users: usize,
    slots: usize,
    /// `[S, F]` u32.
    fields: Tensor,
    /// `[S * L]` u32, 0 = padding.
    seq_items: Tensor,
    /// `[S * L]` u32.
    seq_cates: Tensor,
    /// `[S, 1, L]` f32: 0 for a sequence position, [`MASKED_LOGIT`] for padding.
    seq_bias: Tensor,
    /// `[S, 1, 1]` f32: 1 when the user has at least one sequence position.
    seq_any: Tensor,
    /// `[T]` tensors of `[Na]` u32: the distinct ads' token ids by position.
    ad_tokens: Vec<Tensor>,
    /// `[S * slots]` u32: the ad of each slot.
    pair_ad: Tensor,
}

impl PairBatch {
    /// Lays out `users[s]` against the ads `pairs[s]` (indices into `ads`,
    /// the batch's distinct ads). Users with fewer pairs than the longest
    /// list get padding slots (scored against `ads[0]`, to be ignored).
    /// Checks every feature against `config`.
    pub fn new(
        config: &BarConfig,
        users: &[&UserFeatures],
        ads: &[AdTokens],
        pairs: &[Vec<u32>],
    ) -> Result<Self, TrainError> {
        if users.is_empty() || users.len() != pairs.len() {
            return Err(TrainError::Input(format!(
                "{} users and {} pair lists; one non-empty list per user needed",
                users.len(),
                pairs.len()
            )));
        }
        if ads.is_empty() {
            return Err(TrainError::Input("a batch needs at least one ad".into()));
        }
        let slots = pairs.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let s = users.len();
        let l = config.max_seq_len;
        let device = Device::Cpu;
        let mut fields = Vec::with_capacity(s * config.user_field_vocab.len());
        let mut items = vec![0u32; s * l];
        let mut cates = vec![0u32; s * l];
        let mut bias = vec![MASKED_LOGIT as f32; s * l];
        let mut any = vec![0f32; s];
        for (i, user) in users.iter().enumerate() {
            user.check(config)?;
            fields.extend_from_slice(&user.fields);
            // The last `L` behaviours, left-aligned; the rest stays padding.
            let skip = user.seq_items.len().saturating_sub(l);
            for (t, (&item, &cate)) in user.seq_items[skip..]
                .iter()
                .zip(&user.seq_cates[skip..])
                .enumerate()
            {
                items[i * l + t] = item;
                cates[i * l + t] = cate;
                if item != 0 {
                    bias[i * l + t] = 0.0;
                    any[i] = 1.0;
                }
            }
        }
        let t = config.ad_tokens();
        let mut by_position = vec![Vec::with_capacity(ads.len()); t];
        for ad in ads {
            // Re-checked: tokens built under another configuration (say with
            // bid features for a model without) must not reach the tables.
            let ad = AdTokens::from_ids(config, ad.ids())?;
            for (column, &id) in by_position.iter_mut().zip(ad.ids()) {
                column.push(id);
            }
        }
        let mut pair_ad = Vec::with_capacity(s * slots);
        for list in pairs {
            if let Some(&bad) = list.iter().find(|&&a| a as usize >= ads.len()) {
                return Err(TrainError::Input(format!(
                    "pair names ad {bad}; the batch has {}",
                    ads.len()
                )));
            }
            pair_ad.extend_from_slice(list);
            pair_ad.resize(pair_ad.len() + slots - list.len(), 0);
        }
        let f = config.user_field_vocab.len();
        Ok(Self {
            config: config.clone(),
            users: s,
            slots,
            fields: Tensor::from_vec(fields, (s, f), &device)?,
            seq_items: Tensor::from_vec(items, s * l, &device)?,
            seq_cates: Tensor::from_vec(cates, s * l, &device)?,
            seq_bias: Tensor::from_vec(bias, (s, 1, l), &device)?,
            seq_any: Tensor::from_vec(any, (s, 1, 1), &device)?,
            ad_tokens: by_position
                .into_iter()
                .map(|c| {
                    let n = c.len();
                    Tensor::from_vec(c, n, &device)
                })
                .collect::<candle_core::Result<Vec<_>>>()?,
            pair_ad: Tensor::from_vec(pair_ad, s * slots, &device)?,
        })
    }

    /// Number of users (`S`).
    pub fn users(&self) -> usize {
        self.users
    }

    /// Pair slots per user (`M`); outputs are `[S, M]`.
    pub fn slots(&self) -> usize {
        self.slots
    }
}

/// The model's outputs for a [`PairBatch`], each `[S, M]` (user, slot).
#[derive(Debug, Clone)]
pub struct PairOutputs {
    /// The eCPM head (the retrieval score).
    pub score: Tensor,
    /// The pCTR head, after the sigmoid.
    pub pctr: Tensor,
    /// The pBid head (pBid / aBid).
    pub pbid_ratio: Tensor,
}

/// The BAR model as candle variables: the forward pass of the [module
/// docs](super), batched, differentiable, and initialised from / exported to
/// a [`BarModel`] so that training starts from and ends in the inference
/// model's weights file.
pub struct CandleBar {
    config: BarConfig,
    varmap: VarMap,
    params: Params,
}

impl std::fmt::Debug for CandleBar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleBar")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CandleBar {
    /// A candle copy of `model`'s weights (every tensor of the file becomes a
    /// variable of the same name).
    pub fn from_model(model: &BarModel) -> Result<Self, TrainError> {
        let config = model.config().clone();
        config.validate()?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let params = Params::new(&config, &vb)?;
        let this = Self {
            config,
            varmap,
            params,
        };
        this.load(model)?;
        Ok(this)
    }

    /// Overwrites every variable with `model`'s tensor of the same name.
    pub fn load(&self, model: &BarModel) -> Result<(), TrainError> {
        if model.config() != &self.config {
            return Err(TrainError::Input(
                "the model's configuration differs from this one's".into(),
            ));
        }
        let vars = self.vars()?;
        let mut set = 0usize;
        for (name, shape, data) in model.tensors() {
            let Some(var) = vars.get(&name) else {
                return Err(TrainError::Input(format!(
                    "tensor `{name}` is not a parameter of the model"
                )));
            };
            if var.dims() != shape.as_slice() {
                return Err(ModelError::Shape {
                    name,
                    expected: var.dims().to_vec(),
                    found: shape,
                }
                .into());
            }
            var.set(&Tensor::from_slice(data, shape.as_slice(), &Device::Cpu)?)?;
            set += 1;
        }
        if set != vars.len() {
            let given: std::collections::HashSet<String> =
                model.tensors().into_iter().map(|(n, _, _)| n).collect();
            let missing = vars
                .keys()
                .find(|n| !given.contains(*n))
                .cloned()
                .unwrap_or_default();
            return Err(ModelError::MissingTensor { name: missing }.into());
        }
        Ok(())
    }

    /// The variables by name (a snapshot of the map; each `Var` shares its
    /// storage with the model).
    fn vars(&self) -> Result<HashMap<String, Var>, TrainError> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| TrainError::Input("the variable map's lock is poisoned".into()))?;
        Ok(data.clone())
    }

    /// The current weights as an inference model (then `save` it).
    pub fn to_model(&self) -> Result<BarModel, TrainError> {
        let mut tensors = HashMap::new();
        for (name, var) in self.vars()? {
            let shape = var.dims().to_vec();
            let data = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            tensors.insert(name, (shape, data));
        }
        Ok(BarModel::from_tensors(self.config.clone(), &tensors)?)
    }

    /// The model's configuration.
    pub fn config(&self) -> &BarConfig {
        &self.config
    }

    /// The variables, named as in the weights file (for an optimiser).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The forward pass of the [module docs](super) for every pair of
    /// `batch`, in batched tensors (differentiable).
    pub fn forward(&self, batch: &PairBatch) -> Result<PairOutputs, TrainError> {
        if batch.config != self.config {
            return Err(TrainError::Input(
                "the batch was built for another model configuration".into(),
            ));
        }
        Ok(self.forward_inner(batch)?)
    }

    fn forward_inner(&self, b: &PairBatch) -> candle_core::Result<PairOutputs> {
        let p = &self.params;
        let c = &self.config;
        let (s, m) = (b.users, b.slots);
        let (e, l, d, a) = (c.emb_dim, c.max_seq_len, c.d_model, c.d_attn);
        let scale = 1.0 / (a as f64).sqrt();

        // User side: z_u [S, D].
        let mut field_embs = Vec::with_capacity(p.emb_user.len());
        for (i, table) in p.emb_user.iter().enumerate() {
            let ids = b.fields.narrow(1, i, 1)?.squeeze(1)?.contiguous()?;
            field_embs.push(table.index_select(&ids, 0)?);
        }
        let x_u = Tensor::cat(&field_embs, 1)?;
        let z_u = p.user_net[1].forward(&p.user_net[0].forward(&x_u)?.relu()?)?;

        // Sequence tokens [S, L, 2E] and their projections.
        let seq = Tensor::cat(
            &[
                p.emb_ad[0].index_select(&b.seq_items, 0)?,
                p.emb_ad[1].index_select(&b.seq_cates, 0)?,
            ],
            1,
        )?
        .reshape((s, l, 2 * e))?;
        let k1 = p.seq_k.forward(&seq)?;
        let v1 = p.seq_v.forward(&seq)?;
        let k2 = p.ctr_k.forward(&seq)?;
        let v2 = p.ctr_v.forward(&seq)?;

        // Ad side, once per distinct ad: tokens [Na, T, E], z_a [Na, D].
        let tok = Tensor::stack(
            &p.emb_ad
                .iter()
                .zip(&b.ad_tokens)
                .map(|(table, ids)| table.index_select(ids, 0))
                .collect::<candle_core::Result<Vec<_>>>()?,
            1,
        )?;
        let n_ads = tok.dim(0)?;
        let x_a = tok.reshape((n_ads, ()))?;
        let z_a_all = p.ad_net[1].forward(&p.ad_net[0].forward(&x_a)?.relu()?)?;
        let k3_all = p.bid_k.forward(&tok)?;
        let v3_all = p.bid_v.forward(&tok)?;
        // seq_attn.q reads only z_a: once per ad too.
        let q1_all = p.seq_q.forward(&z_a_all)?;

        // Per pair (P = S * M).
        let z_a = z_a_all.index_select(&b.pair_ad, 0)?;
        let q1 = q1_all.index_select(&b.pair_ad, 0)?.reshape((s, m, a))?;
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
            let logits = (q.matmul(&k.transpose(1, 2)?)? * scale)?.broadcast_add(&b.seq_bias)?;
            softmax_last(&logits)?.matmul(v)?.broadcast_mul(&b.seq_any)
        };
        let z_seq = attend(&q1, &k1, &v1)?;
        let z_ua = Tensor::cat(
            &[
                z_u.unsqueeze(1)?.broadcast_as((s, m, d))?,
                z_seq,
                z_a.reshape((s, m, d))?,
            ],
            2,
        )?;

        // pCTR head.
        let q2 = p.ctr_q.forward(&z_ua)?;
        let c2 = attend(&q2, &k2, &v2)?;
        let h_ctr = p.ctr_mlp[0]
            .forward(&Tensor::cat(&[&c2, &q2], 2)?)?
            .relu()?;
        let pctr = candle_nn::ops::sigmoid(&p.ctr_mlp[1].forward(&h_ctr)?)?;

        // pBid head: attention over the pair's T ad tokens, as [P, T].
        let z_ua = z_ua.reshape((s * m, 3 * d))?;
        let q3 = p.bid_q.forward(&z_ua)?;
        let k3 = k3_all.index_select(&b.pair_ad, 0)?;
        let v3 = v3_all.index_select(&b.pair_ad, 0)?;
        let logits3 = (k3.broadcast_mul(&q3.unsqueeze(1)?)?.sum(2)? * scale)?;
        let w3 = softmax_last(&logits3)?;
        let b3 = v3.broadcast_mul(&w3.unsqueeze(2)?)?.sum(1)?;
        let h_bid = p.bid_mlp[0]
            .forward(&Tensor::cat(&[&b3, &q3], 1)?)?
            .relu()?;
        let pbid = p.bid_mlp[1].forward(&h_bid)?;

        // eCPM head.
        let proj = p.ecpm_proj.forward(&z_ua)?;
        let h_ctr = h_ctr.reshape((s * m, ()))?;
        let hidden = p.ecpm_mlp[0]
            .forward(&Tensor::cat(&[&h_ctr, &h_bid, &proj], 1)?)?
            .relu()?;
        let score = p.ecpm_mlp[1].forward(&hidden)?;

        Ok(PairOutputs {
            score: score.reshape((s, m))?,
            pctr: pctr.reshape((s, m))?,
            pbid_ratio: pbid.reshape((s, m))?,
        })
    }

    /// Scores every user against every ad (`result[u][a]`), without
    /// gradients: evaluation, and the parity check against
    /// [`BarModel::heads`].
    pub fn score_all(
        &self,
        users: &[&UserFeatures],
        ads: &[AdTokens],
    ) -> Result<Vec<Vec<PairHeads>>, TrainError> {
        if users.is_empty() || ads.is_empty() {
            return Ok(vec![Vec::new(); users.len()]);
        }
        let all: Vec<u32> = (0..ads.len() as u32).collect();
        let pairs = vec![all; users.len()];
        let batch = PairBatch::new(&self.config, users, ads, &pairs)?;
        let out = self.forward(&batch)?;
        let score = out.score.detach().to_vec2::<f32>()?;
        let pctr = out.pctr.detach().to_vec2::<f32>()?;
        let pbid = out.pbid_ratio.detach().to_vec2::<f32>()?;
        Ok(score
            .into_iter()
            .zip(pctr)
            .zip(pbid)
            .map(|((s, c), b)| {
                s.into_iter()
                    .zip(c)
                    .zip(b)
                    .map(|((score, pctr), pbid_ratio)| PairHeads {
                        score,
                        pctr,
                        pbid_ratio,
                    })
                    .collect()
            })
            .collect())
    }
}

/// The loss of a batch and its parts (each a mean over its pairs; 0 when a
/// part has no pair).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Losses {
    /// `L_LTR + λ1 L_BAO + λ2 (L_pCTR + L_pBid)`: what is minimised.
    pub total: f32,
    /// `L_LTR` (eq. 9) over hard and easy pairs.
    pub ltr: f32,
    /// `L_BAO` (eq. 10); 0 without bid features.
    pub bao: f32,
    /// `L_pCTR` (eq. 12).
    pub pctr: f32,
    /// `L_pBid` (eq. 13).
    pub pbid: f32,
    /// Pairs in `ltr` (hard + easy).
    pub ltr_pairs: usize,
    /// Pairs in `bao` (perturbations that changed a token).
    pub bao_pairs: usize,
    /// Labeled ads in `pctr` and `pbid`.
    pub labeled: usize,
}

/// What [`train`] reports after each step (instead of printing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainProgress {
    /// Steps done so far (1 after the first).
    pub step: usize,
    /// The batch's losses, computed before that step's update.
    pub losses: Losses,
    /// Wall time of the step: batch assembly, forward, backward and update.
    pub seconds: f64,
}

/// Hyper-parameters of [`train`]. The defaults: the paper's learning rate
/// (4.8e-3, which also converges fastest of those tried on the synthetic
/// market) and easy negatives per positive (5); λ1 = 0.5, λ2 = 1 and weight
/// decay 1e-4 are ours (the paper only says λ1, λ2 > 0); 32 sessions per
/// step keep a step near 0.15 s on two CPU cores at the default sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Optimiser steps.
    pub steps: usize,
    /// Sessions (user requests) per step.
    pub sessions_per_step: usize,
    /// Training reads sessions `0..train_sessions` of the market, cycling;
    /// at most [`EVAL_SESSION_START`] so evaluation sessions stay unseen.
    pub train_sessions: u64,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// λ1, the weight of `L_BAO` (0: the "w/o BAO" ablation).
    pub lambda_bao: f32,
    /// λ2, the weight of `L_DAO`.
    pub lambda_dao: f32,
    /// Easy negatives per positive (the paper's 5).
    pub easy_per_positive: usize,
    /// Seeds the initial weights ([`BarModel::random`]) and the sampling of
    /// easy negatives and perturbations.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            sessions_per_step: 32,
            train_sessions: 1 << 20,
            lr: 4.8e-3,
            weight_decay: 1e-4,
            lambda_bao: 0.5,
            lambda_dao: 1.0,
            easy_per_positive: 5,
            seed: 1,
        }
    }
}

impl TrainConfig {
    /// Every field in range: positive sizes, finite non-negative rates and
    /// weights, a training range that does not reach the evaluation range.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |key, message: String| Err(TrainError::Config { key, message });
        if self.sessions_per_step == 0 || self.sessions_per_step > 1 << 16 {
            return bad(
                "sessions_per_step",
                format!("{} is not in 1..=65536", self.sessions_per_step),
            );
        }
        if self.train_sessions == 0 || self.train_sessions > EVAL_SESSION_START {
            return bad(
                "train_sessions",
                format!(
                    "{} is not in 1..={EVAL_SESSION_START} (evaluation sessions start there)",
                    self.train_sessions
                ),
            );
        }
        if self.easy_per_positive > 1024 {
            return bad(
                "easy_per_positive",
                format!("{} is not in 0..=1024", self.easy_per_positive),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("{} is not finite and positive", self.lr));
        }
        for (key, value) in [
            ("weight_decay", self.weight_decay),
            ("lambda_bao", f64::from(self.lambda_bao)),
            ("lambda_dao", f64::from(self.lambda_dao)),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return bad(key, format!("{value} is not finite and non-negative"));
            }
        }
        Ok(())
    }
}

/// SplitMix64: decorrelates the salts derived from (seed, step, session).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d4_9bb4_9133_11eb);
    x ^ (x >> 31)
}

/// The key that identifies an ad version in a batch.
fn token_key(tokens: &AdTokens) -> [u32; 8] {
    let mut key = [u32::MAX; 8];
    key[..tokens.ids().len()].copy_from_slice(tokens.ids());
    key
}

/// A training batch: the pairs to score and which outputs each loss reads
/// (flat indices into the `[S, M]` outputs).
struct SessionBatch {
    pairs: PairBatch,
    ltr_pos: Vec<u32>,
    ltr_neg: Vec<u32>,
    bao_new: Vec<u32>,
    bao_old: Vec<u32>,
    bao_sign: Vec<f32>,
    dao_ctr: Vec<u32>,
    dao_ctr_truth: Vec<f32>,
    dao_bid: Vec<u32>,
    dao_bid_truth: Vec<f32>,
}

/// Per-session layout before the slot count `M` is known.
#[derive(Default)]
struct SessionPairs {
    ads: Vec<u32>,
    ltr: Vec<(u32, u32)>,
    bao: Vec<(u32, u32, f32)>,
    ctr: Vec<(u32, f32)>,
    bid: Vec<(u32, f32)>,
}

/// The batch's distinct ad versions.
struct AdTable {
    tokens: Vec<AdTokens>,
    index: HashMap<[u32; 8], u32>,
}

impl AdTable {
    fn add(&mut self, config: &BarConfig, features: &AdFeatures) -> Result<u32, TrainError> {
        let tokens = features.tokens(config)?;
        Ok(self.add_tokens(tokens))
    }

    fn add_tokens(&mut self, tokens: AdTokens) -> u32 {
        let next = self.tokens.len() as u32;
        *self.index.entry(token_key(&tokens)).or_insert_with(|| {
            self.tokens.push(tokens);
            next
        })
    }
}

impl SessionBatch {
    /// Lays out the sessions' labeled ads, easy negatives and perturbed
    /// ads, and the pairs of each loss. `salt` varies the sampling (easy
    /// negatives, perturbations) between steps.
    fn new(
        market: &Market,
        config: &BarConfig,
        sessions: &[Session],
        train: &TrainConfig,
        salt: u64,
    ) -> Result<Self, TrainError> {
        let ads = market.ads();
        let users = market.users();
        let ad_at = |a: usize| {
            ads.get(a).ok_or_else(|| {
                TrainError::Input(format!(
                    "session names ad {a}; the market has {}",
                    ads.len()
                ))
            })
        };
        let with_bao = config.bid_features && train.lambda_bao > 0.0;
        let mut table = AdTable {
            tokens: Vec::new(),
            index: HashMap::new(),
        };
        let mut user_refs = Vec::with_capacity(sessions.len());
        let mut layouts = Vec::with_capacity(sessions.len());
        for session in sessions {
            let user = users.get(session.user).ok_or_else(|| {
                TrainError::Input(format!(
                    "session names user {}; the market has {}",
                    session.user,
                    users.len()
                ))
            })?;
            user_refs.push(&user.features);
            let mut lay = SessionPairs::default();
            // Slot of each market ad (unperturbed) in this session.
            let mut slot_of: HashMap<usize, u32> = HashMap::new();
            let mut slot = |lay: &mut SessionPairs,
                            table: &mut AdTable,
                            a: usize|
             -> Result<u32, TrainError> {
                if let Some(&s) = slot_of.get(&a) {
                    return Ok(s);
                }
                let s = lay.ads.len() as u32;
                lay.ads.push(table.add(config, &ad_at(a)?.features)?);
                slot_of.insert(a, s);
                Ok(s)
            };
            for labeled in session.impressions.iter().chain(&session.ranking) {
                let s = slot(&mut lay, &mut table, labeled.ad)?;
                lay.ctr.push((s, labeled.pctr));
                let abid = ad_at(labeled.ad)?.features.bid.default_bid_value;
                let ratio = labeled.pbid / abid;
                if abid > 0.0 && ratio.is_finite() {
                    lay.bid.push((s, ratio));
                }
            }
            for (pos, neg) in market.hard_pairs(session) {
                let p = slot(&mut lay, &mut table, pos)?;
                let n = slot(&mut lay, &mut table, neg)?;
                lay.ltr.push((p, n));
            }
            let session_salt = mix(salt ^ mix(session.index));
            if train.easy_per_positive > 0 {
                for (pos, neg) in
                    market.easy_negatives(session, train.easy_per_positive, session_salt)
                {
                    let p = slot(&mut lay, &mut table, pos)?;
                    let n = slot(&mut lay, &mut table, neg)?;
                    lay.ltr.push((p, n));
                }
            }
            if with_bao {
                let labeled: Vec<(usize, u32)> = session
                    .ads()
                    .map(|a| (a, slot_of.get(&a).copied().unwrap_or(0)))
                    .collect();
                for (k, (a, s)) in labeled.into_iter().enumerate() {
                    let features = ad_at(a)?.features;
                    let (bid, sign) = market.perturb(&features.bid, mix(session_salt ^ k as u64));
                    if sign == 0.0 {
                        continue;
                    }
                    let moved = AdFeatures { bid, ..features }.tokens(config)?;
                    if token_key(&moved) == token_key(&features.tokens(config)?) {
                        continue;
                    }
                    let p = lay.ads.len() as u32;
                    lay.ads.push(table.add_tokens(moved));
                    lay.bao.push((p, s, sign));
                }
            }
            layouts.push(lay);
        }
        let slots = layouts
            .iter()
            .map(|l| l.ads.len())
            .max()
            .unwrap_or(0)
            .max(1) as u32;
        let pairs: Vec<Vec<u32>> = layouts.iter().map(|l| l.ads.clone()).collect();
        let pairs = PairBatch::new(config, &user_refs, &table.tokens, &pairs)?;
        let mut b = SessionBatch {
            pairs,
            ltr_pos: Vec::new(),
            ltr_neg: Vec::new(),
            bao_new: Vec::new(),
            bao_old: Vec::new(),
            bao_sign: Vec::new(),
            dao_ctr: Vec::new(),
            dao_ctr_truth: Vec::new(),
            dao_bid: Vec::new(),
            dao_bid_truth: Vec::new(),
        };
        for (i, lay) in layouts.iter().enumerate() {
            let base = i as u32 * slots;
            for &(p, n) in &lay.ltr {
                b.ltr_pos.push(base + p);
                b.ltr_neg.push(base + n);
            }
            for &(p, o, sign) in &lay.bao {
                b.bao_new.push(base + p);
                b.bao_old.push(base + o);
                b.bao_sign.push(sign);
            }
            for &(s, t) in &lay.ctr {
                b.dao_ctr.push(base + s);
                b.dao_ctr_truth.push(t);
            }
            for &(s, t) in &lay.bid {
                b.dao_bid.push(base + s);
                b.dao_bid_truth.push(t);
            }
        }
        Ok(b)
    }

    /// The weighted total (a scalar tensor to differentiate) and its parts.
    fn losses(
        &self,
        model: &CandleBar,
        train: &TrainConfig,
    ) -> Result<(Tensor, Losses), TrainError> {
        let out = model.forward(&self.pairs)?;
        let dev = Device::Cpu;
        let score = out.score.flatten_all()?;
        let pctr = out.pctr.flatten_all()?;
        let pbid = out.pbid_ratio.flatten_all()?;
        let idx = |v: &[u32]| Tensor::from_slice(v, v.len(), &dev);
        let zero = || Tensor::zeros((), DType::F32, &dev);
        let ltr = if self.ltr_pos.is_empty() {
            zero()?
        } else {
            let diff = (score.index_select(&idx(&self.ltr_pos)?, 0)?
                - score.index_select(&idx(&self.ltr_neg)?, 0)?)?;
            softplus(&diff.neg()?)?.mean_all()?
        };
        let bao = if self.bao_new.is_empty() {
            zero()?
        } else {
            let diff = (score.index_select(&idx(&self.bao_new)?, 0)?
                - score.index_select(&idx(&self.bao_old)?, 0)?)?;
            let sign = Tensor::from_slice(&self.bao_sign, self.bao_sign.len(), &dev)?;
            softplus(&(diff * sign)?.neg()?)?.mean_all()?
        };
        let mse = |pred: &Tensor, at: &[u32], truth: &[f32]| -> candle_core::Result<Tensor> {
            if at.is_empty() {
                return zero();
            }
            let t = Tensor::from_slice(truth, truth.len(), &dev)?;
            (pred.index_select(&idx(at)?, 0)? - t)?.sqr()?.mean_all()
        };
        let l_ctr = mse(&pctr, &self.dao_ctr, &self.dao_ctr_truth)?;
        let l_bid = mse(&pbid, &self.dao_bid, &self.dao_bid_truth)?;
        let total = ((&ltr + (&bao * f64::from(train.lambda_bao))?)?
            + ((&l_ctr + &l_bid)? * f64::from(train.lambda_dao))?)?;
        let scalar = |t: &Tensor| t.to_scalar::<f32>();
        let losses = Losses {
            total: scalar(&total)?,
            ltr: scalar(&ltr)?,
            bao: scalar(&bao)?,
            pctr: scalar(&l_ctr)?,
            pbid: scalar(&l_bid)?,
            ltr_pairs: self.ltr_pos.len(),
            bao_pairs: self.bao_new.len(),
            labeled: self.dao_ctr.len(),
        };
        Ok((total, losses))
    }
}

/// The losses of `model` on market sessions `sessions` (no update): for
/// evaluation, on indices at or above [`EVAL_SESSION_START`]. `train`
/// supplies the loss weights, `easy_per_positive` and the seed of the
/// sampling (fixed, so repeated calls see the same pairs).
pub fn evaluate(
    model: &CandleBar,
    market: &Market,
    sessions: std::ops::Range<u64>,
    train: &TrainConfig,
) -> Result<Losses, TrainError> {
    train.validate()?;
    let count = usize::try_from(sessions.end.saturating_sub(sessions.start))
        .map_err(|_| TrainError::Input("too many sessions".into()))?;
    if count == 0 {
        return Err(TrainError::Input("no session to evaluate on".into()));
    }
    let sessions = market.sessions(sessions.start, count);
    let batch = SessionBatch::new(market, model.config(), &sessions, train, mix(train.seed))?;
    Ok(batch.losses(model, train)?.1)
}

/// Training state, one [`step`](Trainer::step) at a time: the model, AdamW
/// and the position in the training sessions. [`train`] runs it to the end.
pub struct Trainer<'m> {
    market: &'m Market,
    model: CandleBar,
    optimizer: candle_nn::AdamW,
    config: TrainConfig,
    step: usize,
}

impl std::fmt::Debug for Trainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl<'m> Trainer<'m> {
    /// Starts training `model` (its current weights are the initialisation)
    /// on `market` with `config`.
    pub fn new(
        market: &'m Market,
        model: CandleBar,
        config: TrainConfig,
    ) -> Result<Self, TrainError> {
        config.validate()?;
        let optimizer = candle_nn::AdamW::new(
            model.varmap().all_vars(),
            candle_nn::ParamsAdamW {
                lr: config.lr,
                weight_decay: config.weight_decay,
                ..Default::default()
            },
        )?;
        Ok(Self {
            market,
            model,
            optimizer,
            config,
            step: 0,
        })
    }

    /// One AdamW step on the next `sessions_per_step` training sessions.
    /// Returns the batch's losses before the update; fails (without
    /// updating) if the loss is not finite.
    pub fn step(&mut self) -> Result<TrainProgress, TrainError> {
        let started = Instant::now();
        let c = &self.config;
        let per = c.sessions_per_step as u64;
        let first = (self.step as u64).wrapping_mul(per) % c.train_sessions;
        // Contiguous runs of indices, wrapping at the end of the range.
        let mut sessions = Vec::with_capacity(c.sessions_per_step);
        let mut next = first;
        while sessions.len() < c.sessions_per_step {
            let run =
                (c.sessions_per_step - sessions.len()).min((c.train_sessions - next) as usize);
            sessions.extend(self.market.sessions(next, run));
            next = (next + run as u64) % c.train_sessions;
        }
        let salt = mix(c.seed ^ mix(self.step as u64 ^ (1 << 63)));
        let batch = SessionBatch::new(self.market, self.model.config(), &sessions, c, salt)?;
        let (total, losses) = batch.losses(&self.model, c)?;
        if !losses.total.is_finite() {
            return Err(TrainError::NonFinite {
                step: self.step,
                loss: losses.total,
            });
        }
        self.optimizer.backward_step(&total)?;
        self.step += 1;
        Ok(TrainProgress {
            step: self.step,
            losses,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Steps done so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// The model being trained.
    pub fn model(&self) -> &CandleBar {
        &self.model
    }

    /// Ends training, returning the model.
    pub fn into_model(self) -> CandleBar {
        self.model
    }
}

/// Trains a model of `model_config` on `market` from
/// [`BarModel::random`]`(model_config, train.seed)` for `train.steps` steps,
/// reporting each step to `progress`, and returns the inference model (save
/// it with `BarModel::save`).
pub fn train(
    market: &Market,
    model_config: BarConfig,
    train: &TrainConfig,
    mut progress: impl FnMut(TrainProgress),
) -> Result<BarModel, TrainError> {
    train.validate()?;
    let init = BarModel::random(model_config, train.seed)?;
    let mut trainer = Trainer::new(market, CandleBar::from_model(&init)?, train.clone())?;
    for _ in 0..train.steps {
        progress(trainer.step()?);
    }
    trainer.into_model().to_model()
}
