//! Training the TAR model with candle on CPU, in two stages as in VAR:
//!
//! 1. **VQ-VAE**: encoder, multi-scale residual quantiser (codebook and the
//!    refinement `phi`) and decoder on the trajectories' augmented steps:
//!    `L = mse(decoder(f + sg(fhat - f)), x) + (1/K) sum_k [beta
//!    mse(sg(fhat_k), f) + mse(fhat_k, sg(f))]` with `fhat_k` the partial
//!    sum after scale `k` (straight-through estimator; `beta` = 0.25).
//!    Codebook entries unused for a while are restarted at random latents of
//!    the batch (the usual cure for codebook collapse).
//! 2. **Generator** (VQ-VAE frozen): cross-entropy of the code indices of
//!    every scale under teacher forcing (scale `k`'s inputs are built from
//!    the true codes of scales `< k`), conditioned on the day's attributes
//!    (dropped with probability `cond_dropout`) and on a random observed
//!    prefix of the day (so the model can act mid-day). The no-VQ ablation
//!    regresses `h_k` with a squared error instead.
//!
//! [`CandleTar`] writes the equations of [`crate::tar::model`] in batched
//! candle tensors, one variable per tensor of the weights file; its
//! forward pass matches [`TarModel`]'s within 1e-4 (`tests/tar_train.rs`).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::Optimizer;

use super::TrainError;
use crate::tar::data::{Dataset, SplitMix};
use crate::tar::model::{TarConfig, TarModel, ACTION_SLOT, ATTRIBUTES};

/// Additive mask value for positions that must not be attended to (exactly
/// 0 after the softmax in f32, without the NaN risk of `-inf` in gradients).
const MASKED: f32 = -1e9;

/// LayerNorm epsilon of the model.
const LN_EPS: f64 = 1e-5;

/// Options of [`train_tar`].
#[derive(Debug, Clone, PartialEq)]
pub struct TarTrainConfig {
    /// AdamW steps of the VQ-VAE stage.
    pub vae_steps: usize,
    /// AdamW steps of the generator stage.
    pub gen_steps: usize,
    /// Trajectories per step.
    pub batch: usize,
    /// Learning rate of the VQ-VAE stage.
    pub vae_lr: f64,
    /// Learning rate of the generator stage (cosine decay to 10%).
    pub gen_lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Commitment weight `beta`.
    pub beta: f64,
    /// Probability of dropping the condition (attributes) of a sample.
    pub cond_dropout: f64,
    /// Restart codebook entries unused over this many VQ-VAE steps (0 = never).
    pub restart_every: usize,
    /// Weight of the action slot in the reconstruction loss (the other
    /// features weigh 1; the weights are normalised to mean 1). The action
    /// is what a bidder reads from a generated trajectory, but it is one
    /// feature of 17 and the noisiest: with weight 1 the VQ-VAE spends its
    /// codes on the smooth state features and decodes actions no better
    /// than the day's mean.
    pub action_weight: f64,
    /// Seed of the initial weights and the batches.
    pub seed: u64,
}

impl Default for TarTrainConfig {
    fn default() -> Self {
        Self {
            vae_steps: 1200,
            gen_steps: 1500,
            batch: 64,
            vae_lr: 2e-3,
            gen_lr: 1e-3,
            weight_decay: 1e-4,
            beta: 0.25,
            cond_dropout: 0.1,
            restart_every: 100,
            action_weight: 8.0,
            seed: 1,
        }
    }
}

impl TarTrainConfig {
    fn validate(&self) -> Result<(), TrainError> {
        let bad = |field: &'static str, message: String| Err(TrainError::Config { field, message });
        if self.batch == 0 {
            return bad("batch", "must be positive".into());
        }
        for (field, v) in [("vae_lr", self.vae_lr), ("gen_lr", self.gen_lr)] {
            if !(v.is_finite() && v > 0.0) {
                return bad(field, format!("{v} must be a positive number"));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight_decay",
                format!("{} must be >= 0", self.weight_decay),
            );
        }
        if !(self.action_weight.is_finite() && self.action_weight > 0.0) {
            return bad(
                "action_weight",
                format!("{} must be a positive number", self.action_weight),
            );
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad("beta", format!("{} must be >= 0", self.beta));
        }
        if !(0.0..1.0).contains(&self.cond_dropout) {
            return bad(
                "cond_dropout",
                format!("{} must be in [0, 1)", self.cond_dropout),
            );
        }
        Ok(())
    }
}

/// What training did, for logs and `BENCHMARKS.md`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TarTrainReport {
    /// Reconstruction MSE (normalised units, action slot weighted) over the
    /// first and last 50 VQ-VAE steps.
    pub recon_first: f32,
    /// See `recon_first`.
    pub recon_last: f32,
    /// Mean absolute error of the decoded action (`alpha / CPA`) of the
    /// training trajectories after the VQ-VAE stage.
    pub action_mae: f32,
    /// Fraction of the codebook the training trajectories use at the end.
    pub codebook_usage: f32,
    /// Codebook restarts performed.
    pub restarts: usize,
    /// Generator loss (cross-entropy, or MSE without VQ) over the first and
    /// last 50 steps.
    pub gen_first: f32,
    /// See `gen_first`.
    pub gen_last: f32,
    /// Wall time of both stages in seconds.
    pub seconds: f64,
}

/// The TAR model as candle variables (see the module docs).
#[derive(Debug)]
pub struct CandleTar {
    config: TarConfig,
    vars: HashMap<String, Var>,
    /// Per scale, `down(., l_k)` as an `[l_k, T]` matrix.
    down: Vec<Tensor>,
    /// Per scale, `up(., T)` from `l_k` rows as a `[T, l_k]` matrix.
    up: Vec<Tensor>,
    /// The block-causal additive mask `[L, L]`.
    causal: Tensor,
    /// Scale index of every token `[L]`.
    levels: Tensor,
}

/// The `[n, T]` matrix of `down(., n)` (adaptive average pooling).
fn down_matrix(t: usize, n: usize) -> Vec<f32> {
    let mut m = vec![0f32; n * t];
    for i in 0..n {
        let lo = i * t / n;
        let hi = ((i + 1) * t).div_ceil(n);
        let w = 1.0 / (hi - lo) as f32;
        for j in lo..hi {
            m[i * t + j] = w;
        }
    }
    m
}

/// The `[T, n]` matrix of `up(., T)` (linear, align_corners false).
fn up_matrix(t: usize, n: usize) -> Vec<f32> {
    let mut m = vec![0f32; t * n];
    for i in 0..t {
        let src = ((i as f64 + 0.5) * n as f64 / t as f64 - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n - 1);
        let i1 = (i0 + 1).min(n - 1);
        let w = (src - i0 as f64) as f32;
        m[i * n + i0] += 1.0 - w;
        m[i * n + i1] += w;
    }
    m
}

/// Softmax over the last dimension, differentiable (candle's fused
/// `softmax_last_dim` has no backward pass). The max is a constant shift.
fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let num = x.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// LayerNorm over the last dimension without affine parameters.
fn ln0(x: &Tensor) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + LN_EPS)?.sqrt()?)
}

/// The tanh approximation of GELU, with `tanh(u) = 1 - 2 / (exp(2u) + 1)`:
/// candle's `gelu` calls the C library's `tanhf` and `powf` per element
/// forward and backward, which made it a quarter of a training step.
fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    let inner = ((x.sqr()? * 0.044715)? + 1.0)?.mul(x)?;
    let u = (inner * (2.0 * (2.0 / std::f64::consts::PI).sqrt()))?;
    let tanh = (1.0 - ((u.exp()? + 1.0)?.recip()? * 2.0)?)?;
    (x * 0.5)?.mul(&(tanh + 1.0)?)
}

fn mse(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    (a - b)?.sqr()?.mean_all()
}

impl CandleTar {
    /// A candle copy of `model` (every tensor of the file becomes a variable
    /// of the same name).
    pub fn from_model(model: &TarModel) -> Result<Self, TrainError> {
        let config = model.config().clone();
        config.validate()?;
        let dev = Device::Cpu;
        let mut vars = HashMap::new();
        for (name, shape, data) in model.tensors() {
            let t = Tensor::from_slice(data, shape.as_slice(), &dev)?;
            vars.insert(name, Var::from_tensor(&t)?);
        }
        let t = config.steps;
        let mut down = Vec::new();
        let mut up = Vec::new();
        for &n in &config.scales {
            down.push(Tensor::from_vec(down_matrix(t, n), (n, t), &dev)?);
            up.push(Tensor::from_vec(up_matrix(t, n), (t, n), &dev)?);
        }
        let l = config.tokens();
        let mut level = Vec::with_capacity(l);
        for (k, &n) in config.scales.iter().enumerate() {
            level.extend(std::iter::repeat_n(k as u32, n));
        }
        let mut causal = vec![0f32; l * l];
        for i in 0..l {
            for j in 0..l {
                if level[j] > level[i] {
                    causal[i * l + j] = MASKED;
                }
            }
        }
        Ok(Self {
            causal: Tensor::from_vec(causal, (l, l), &dev)?,
            levels: Tensor::from_vec(level, l, &dev)?,
            config,
            vars,
            down,
            up,
        })
    }

    /// The current weights as an inference model.
    pub fn to_model(&self) -> Result<TarModel, TrainError> {
        let mut tensors = HashMap::new();
        for (name, var) in &self.vars {
            let shape = var.dims().to_vec();
            let data = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            tensors.insert(name.clone(), (shape, data));
        }
        Ok(TarModel::from_tensors(self.config.clone(), tensors)?)
    }

    /// The configuration.
    pub fn config(&self) -> &TarConfig {
        &self.config
    }

    fn w(&self, name: &str) -> Result<Tensor, TrainError> {
        self.vars
            .get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| TrainError::Data(format!("no variable `{name}`")))
    }

    /// Overwrites the variable `name` (e.g. normalisation statistics).
    fn set(&self, name: &str, data: &[f32]) -> Result<(), TrainError> {
        let var = self
            .vars
            .get(name)
            .ok_or_else(|| TrainError::Data(format!("no variable `{name}`")))?;
        var.set(&Tensor::from_slice(data, var.dims(), &Device::Cpu)?)?;
        Ok(())
    }

    /// The variables whose names start with one of `prefixes`.
    fn vars_of(&self, prefixes: &[&str]) -> Vec<Var> {
        let mut names: Vec<&String> = self
            .vars
            .keys()
            .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
            .collect();
        names.sort();
        names.into_iter().map(|n| self.vars[n].clone()).collect()
    }

    fn linear(&self, x: &Tensor, prefix: &str) -> Result<Tensor, TrainError> {
        let w = self.w(&format!("{prefix}.weight"))?;
        let b = self.w(&format!("{prefix}.bias"))?;
        // One 2-D product over all leading dimensions: a broadcast product
        // would materialise `W` per batch element and sum its gradient back.
        let dims = x.dims().to_vec();
        let (inp, out) = (dims[dims.len() - 1], w.dim(0)?);
        let rows = x.elem_count() / inp.max(1);
        let y = x.reshape((rows, inp))?.matmul(&w.t()?)?.broadcast_add(&b)?;
        let mut shape = dims;
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        Ok(y.reshape(shape)?)
    }

    fn ln(&self, x: &Tensor, prefix: &str) -> Result<Tensor, TrainError> {
        let w = self.w(&format!("{prefix}.weight"))?;
        let b = self.w(&format!("{prefix}.bias"))?;
        Ok(ln0(x)?.broadcast_mul(&w)?.broadcast_add(&b)?)
    }

    /// Multi-head attention `[B, Lq, W]` over `[B, Lk, W]` with an additive
    /// mask broadcastable to `[B, H, Lq, Lk]`.
    fn attn(
        &self,
        prefix: &str,
        q_in: &Tensor,
        kv_in: &Tensor,
        heads: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor, TrainError> {
        let (b, lq, w) = q_in.dims3()?;
        let lk = kv_in.dim(1)?;
        let hd = w / heads;
        let split = |x: Tensor, l: usize| -> candle_core::Result<Tensor> {
            x.reshape((b, l, heads, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.linear(q_in, &format!("{prefix}.q"))?, lq)?;
        let k = split(self.linear(kv_in, &format!("{prefix}.k"))?, lk)?;
        let v = split(self.linear(kv_in, &format!("{prefix}.v"))?, lk)?;
        let mut scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let out = softmax_last(&scores)?
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, lq, w))?;
        self.linear(&out, &format!("{prefix}.o"))
    }

    fn plain_block(&self, prefix: &str, u: &Tensor) -> Result<Tensor, TrainError> {
        let heads = self.config.vae_heads;
        let n1 = self.ln(u, &format!("{prefix}.ln1"))?;
        let u = (u + self.attn(&format!("{prefix}.attn"), &n1, &n1, heads, None)?)?;
        let n2 = self.ln(&u, &format!("{prefix}.ln2"))?;
        let hidden = self.linear(&n2, &format!("{prefix}.mlp.fc1"))?;
        let hidden = gelu(&hidden)?;
        Ok((&u + self.linear(&hidden, &format!("{prefix}.mlp.fc2"))?)?)
    }

    /// Encoder: normalised steps `[B, T, F]` to latents `[B, T, C]`.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor, TrainError> {
        let u = self
            .linear(x, "enc.in")?
            .broadcast_add(&self.w("enc.pos")?)?;
        let u = self.plain_block("enc.block", &u)?;
        let u = self.ln(&u, "enc.ln")?;
        self.linear(&u, "enc.out")
    }

    /// Decoder: latents `[B, T, C]` to normalised steps `[B, T, F]`.
    pub fn decode(&self, fhat: &Tensor) -> Result<Tensor, TrainError> {
        let u = self
            .linear(fhat, "dec.in")?
            .broadcast_add(&self.w("dec.pos")?)?;
        let u = self.plain_block("dec.block", &u)?;
        let u = self.ln(&u, "dec.ln")?;
        self.linear(&u, "dec.out")
    }

    /// `phi(u) = 0.5 u + 0.5 SelfAttn(u)`.
    fn phi(&self, u: &Tensor) -> Result<Tensor, TrainError> {
        let a = self.attn("quant.phi", u, u, 1, None)?;
        Ok(((u * 0.5)? + (a * 0.5)?)?)
    }

    /// `phi(up(h_k, T))` for scale `k`.
    fn refine(&self, k: usize, h: &Tensor) -> Result<Tensor, TrainError> {
        let up = self.up[k].broadcast_matmul(h)?;
        self.phi(&up)
    }

    /// Residual quantisation of `f` `[B, T, C]`: per scale the codes
    /// `[B, l_k]` (none without VQ), `h_k` `[B, l_k, C]` and the partial sum
    /// `fhat_k` `[B, T, C]` after it.
    pub fn quantize(&self, f: &Tensor) -> Result<Quantization, TrainError> {
        let (b, t, c) = f.dims3()?;
        let mut rest = f.clone();
        let mut fhat = Tensor::zeros((b, t, c), DType::F32, f.device())?;
        let mut out = Quantization::default();
        for (k, down) in self.down.iter().enumerate() {
            let l = self.config.scales[k];
            let z = down.broadcast_matmul(&rest)?;
            let h = if self.config.quantize {
                let codebook = self.w("quant.codebook")?;
                let zf = z.reshape((b * l, 1, c))?.detach();
                let dist = zf
                    .broadcast_sub(&codebook.unsqueeze(0)?.detach())?
                    .sqr()?
                    .sum(D::Minus1)?;
                let idx = dist.argmin(D::Minus1)?;
                let h = codebook.index_select(&idx, 0)?.reshape((b, l, c))?;
                out.codes.push(idx.reshape((b, l))?);
                h
            } else {
                z.clone()
            };
            out.z.push(z.detach());
            let r = self.refine(k, &h)?;
            fhat = (fhat + &r)?;
            rest = (rest - &r)?;
            out.h.push(h);
            out.partial.push(fhat.clone());
        }
        Ok(out)
    }

    /// The VQ-VAE loss of a batch `[B, T, F]`: `(total, reconstruction,
    /// quantisation)` and the quantisation (for code statistics).
    fn vae_loss(
        &self,
        x: &Tensor,
        beta: f64,
        feature_weight: &Tensor,
    ) -> Result<(Tensor, f32, f32, Quantization), TrainError> {
        let f = self.encode(x)?;
        let q = self.quantize(&f.detach())?;
        let k = q.partial.len() as f64;
        let mut vq = Tensor::zeros((), DType::F32, x.device())?;
        for p in &q.partial {
            let commit = (mse(&p.detach(), &f)? * beta)?;
            let pull = mse(p, &f.detach())?;
            vq = (vq + commit + pull)?;
        }
        let vq = (vq / k)?;
        let fhat = q
            .partial
            .last()
            .ok_or_else(|| TrainError::Data("no scales".into()))?;
        let st = (&f + (fhat - &f)?.detach())?;
        let recon = (self.decode(&st)? - x)?
            .sqr()?
            .broadcast_mul(feature_weight)?
            .mean_all()?;
        let total = (&recon + &vq)?;
        let r = recon.to_scalar::<f32>()?;
        let v = vq.to_scalar::<f32>()?;
        Ok((total, r, v, q))
    }

    /// The generator's inputs for scales `>= 1` from `h` (`[B, L, C]`, all
    /// scales): row `i` of scale `k` is `down(fhat_{<k}, l_k)[i]`; scale
    /// 0's rows are unused (zeros).
    fn word_inputs(&self, h: &Tensor) -> Result<Tensor, TrainError> {
        let (b, _, c) = h.dims3()?;
        let t = self.config.steps;
        let offsets = self.config.scale_offsets();
        let mut fhat = Tensor::zeros((b, t, c), DType::F32, h.device())?;
        let mut parts = vec![Tensor::zeros(
            (b, self.config.scales[0], c),
            DType::F32,
            h.device(),
        )?];
        for k in 1..self.config.scales.len() {
            let hk = h.narrow(1, offsets[k - 1], self.config.scales[k - 1])?;
            fhat = (fhat + self.refine(k - 1, &hk)?)?;
            parts.push(self.down[k].broadcast_matmul(&fhat)?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// Teacher-forced generator outputs `[B, L, out]`.
    ///
    /// `y` `[B, attr_dim]` (normalised attributes and the present flag),
    /// `hist` `[B, T, F]` (normalised observed steps, rows at and after
    /// `hist_len[b]` ignored), `h` `[B, L, C]` the latents of every scale.
    pub fn generator(
        &self,
        y: &Tensor,
        hist: &Tensor,
        hist_len: &[usize],
        h: &Tensor,
    ) -> Result<Tensor, TrainError> {
        let cfg = &self.config;
        let (b, _) = y.dims2()?;
        let (d, t, a) = (cfg.d_model, cfg.steps, cfg.attr_tokens);
        let l = cfg.tokens();
        let dev = y.device();
        let c = self
            .linear(&self.linear(y, "gen.cond.fc1")?.silu()?, "gen.cond.fc2")?
            .reshape((b, 1, d))?;
        let attr = self.linear(y, "gen.attr")?.reshape((b, a, d))?;
        let hist_tok = self
            .linear(hist, "gen.hist")?
            .broadcast_add(&self.w("gen.hist_pos")?)?;
        let memory = Tensor::cat(&[&attr, &hist_tok], 1)?;
        let mut mask = vec![0f32; b * (a + t)];
        for (i, &n) in hist_len.iter().enumerate().take(b) {
            for j in n.min(t)..t {
                mask[i * (a + t) + a + j] = MASKED;
            }
        }
        let mem_mask = Tensor::from_vec(mask, (b, 1, 1, a + t), dev)?;
        // Token inputs.
        let l0 = cfg.scales[0];
        let start = c
            .broadcast_add(&self.w("gen.start")?)?
            .broadcast_as((b, l0, d))?;
        let mut u = if cfg.scales.len() > 1 {
            let words = self.word_inputs(h)?.narrow(1, l0, l - l0)?;
            let words = self.linear(&words, "gen.word")?;
            Tensor::cat(&[&start, &words], 1)?
        } else {
            start.contiguous()?
        };
        let level = self.w("gen.level")?.index_select(&self.levels, 0)?;
        u = u
            .broadcast_add(&self.w("gen.pos")?)?
            .broadcast_add(&level)?;
        let sc = c.silu()?;
        for blk in 0..cfg.blocks {
            let p = format!("gen.blocks.{blk}");
            let ada = self.linear(&sc, &format!("{p}.ada"))?;
            let chunk = |i: usize| ada.narrow(2, i * d, d);
            let (g1, g2, s1, s2, b1, b2) = (
                chunk(0)?,
                chunk(1)?,
                chunk(2)?,
                chunk(3)?,
                chunk(4)?,
                chunk(5)?,
            );
            let n1 = ln0(&u)?.broadcast_mul(&(s1 + 1.0)?)?.broadcast_add(&b1)?;
            let att = self.attn(
                &format!("{p}.attn"),
                &n1,
                &n1,
                cfg.heads,
                Some(&self.causal),
            )?;
            u = (u + att.broadcast_mul(&g1)?)?;
            let nc = self.ln(&u, &format!("{p}.cross_ln"))?;
            let cross = self.attn(
                &format!("{p}.cross"),
                &nc,
                &memory,
                cfg.heads,
                Some(&mem_mask),
            )?;
            u = (u + cross)?;
            let n2 = ln0(&u)?.broadcast_mul(&(s2 + 1.0)?)?.broadcast_add(&b2)?;
            let hidden = self.linear(&n2, &format!("{p}.mlp.fc1"))?;
            let hidden = gelu(&hidden)?;
            let mlp = self.linear(&hidden, &format!("{p}.mlp.fc2"))?;
            u = (u + mlp.broadcast_mul(&g2)?)?;
        }
        let ada = self.linear(&sc, "gen.head_ada")?;
        let s = ada.narrow(2, 0, d)?;
        let bb = ada.narrow(2, d, d)?;
        let n = ln0(&u)?.broadcast_mul(&(s + 1.0)?)?.broadcast_add(&bb)?;
        self.linear(&n, "gen.head")
    }
}

/// Per scale: codes, latents and partial sums (see [`CandleTar::quantize`]).
#[derive(Debug, Default)]
pub struct Quantization {
    /// `[B, l_k]` u32 code indices (empty without VQ).
    pub codes: Vec<Tensor>,
    /// `[B, l_k, C]`: the scale's input `z_k = down(rest, l_k)` (detached).
    pub z: Vec<Tensor>,
    /// `[B, l_k, C]`.
    pub h: Vec<Tensor>,
    /// `[B, T, C]` partial sums `fhat` after each scale.
    pub partial: Vec<Tensor>,
}

/// Mean and standard deviation (floored at 1e-3) of the columns of `rows`.
fn column_stats<'a>(rows: impl Iterator<Item = &'a [f32]>, width: usize) -> (Vec<f32>, Vec<f32>) {
    let mut n = 0f64;
    let mut sum = vec![0f64; width];
    let mut sq = vec![0f64; width];
    for r in rows {
        n += 1.0;
        for (i, &v) in r.iter().take(width).enumerate() {
            sum[i] += v as f64;
            sq[i] += v as f64 * v as f64;
        }
    }
    let n = n.max(1.0);
    let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
    let std = sum
        .iter()
        .zip(&sq)
        .map(|(s, q)| ((q / n - (s / n).powi(2)).max(0.0).sqrt().max(1e-3)) as f32)
        .collect();
    (mean, std)
}

/// Trains a TAR model of shape `model` on `data` (both stages) and returns
/// it with a report.
pub fn train_tar(
    data: &Dataset,
    model: &TarConfig,
    train: &TarTrainConfig,
) -> Result<(TarModel, TarTrainReport), TrainError> {
    train.validate()?;
    model.validate()?;
    let cfg = model;
    let (t, f) = (cfg.steps, cfg.step_features);
    let trajs: Vec<_> = data
        .trajectories
        .iter()
        .filter(|tr| tr.steps.len() == t)
        .collect();
    if trajs.is_empty() {
        return Err(TrainError::Data(format!(
            "no trajectory of {t} steps among {}",
            data.trajectories.len()
        )));
    }
    let started = Instant::now();
    let init = TarModel::random(cfg.clone(), train.seed)?;
    let net = CandleTar::from_model(&init)?;
    let (x_mean, x_std) = column_stats(
        trajs.iter().flat_map(|tr| tr.steps.iter().map(|s| &s[..])),
        f,
    );
    let (a_mean, a_std) = column_stats(trajs.iter().map(|tr| &tr.attributes[..]), ATTRIBUTES);
    net.set("norm.x_mean", &x_mean)?;
    net.set("norm.x_std", &x_std)?;
    net.set("norm.attr_mean", &a_mean)?;
    net.set("norm.attr_std", &a_std)?;
    // Normalised steps of every trajectory, `T x F` each.
    let xs: Vec<Vec<f32>> = trajs
        .iter()
        .map(|tr| {
            tr.steps
                .iter()
                .flat_map(|s| {
                    s.iter()
                        .enumerate()
                        .map(|(i, &v)| (v - x_mean[i]) / x_std[i])
                })
                .collect()
        })
        .collect();
    let ys: Vec<[f32; ATTRIBUTES]> = trajs
        .iter()
        .map(|tr| {
            let mut y = [0f32; ATTRIBUTES];
            for i in 0..ATTRIBUTES {
                y[i] = (tr.attributes[i] - a_mean[i]) / a_std[i];
            }
            y
        })
        .collect();
    let mut rng = SplitMix::new(train.seed ^ 0x5eed_7a12);
    let dev = Device::Cpu;
    let batch_x = |idx: &[usize]| -> candle_core::Result<Tensor> {
        let mut v = Vec::with_capacity(idx.len() * t * f);
        for &i in idx {
            v.extend_from_slice(&xs[i]);
        }
        Tensor::from_vec(v, (idx.len(), t, f), &dev)
    };
    let mut report = TarTrainReport::default();

    // Stage 1: VQ-VAE.
    let mut opt = candle_nn::AdamW::new(
        net.vars_of(&["enc.", "dec.", "quant."]),
        candle_nn::ParamsAdamW {
            lr: train.vae_lr,
            weight_decay: train.weight_decay,
            ..Default::default()
        },
    )?;
    let mut weights = vec![1f32; f];
    weights[ACTION_SLOT] = train.action_weight as f32;
    let mean_w = weights.iter().sum::<f32>() / f as f32;
    weights.iter_mut().for_each(|w| *w /= mean_w);
    let feature_weight = Tensor::from_vec(weights, f, &dev)?;
    let v_size = cfg.codebook_size;
    let mut usage = vec![0u64; v_size];
    let (mut first, mut last) = (Vec::new(), Vec::new());
    for step in 0..train.vae_steps {
        let idx: Vec<usize> = (0..train.batch)
            .map(|_| (rng.next_u64() % xs.len() as u64) as usize)
            .collect();
        let x = batch_x(&idx)?;
        let (loss, recon, _vq, q) = net.vae_loss(&x, train.beta, &feature_weight)?;
        if !recon.is_finite() {
            return Err(TrainError::Diverged { step, loss: recon });
        }
        opt.backward_step(&loss)?;
        if step < 50 {
            first.push(recon);
        }
        if step + 50 >= train.vae_steps {
            last.push(recon);
        }
        if cfg.quantize {
            for codes in &q.codes {
                for c in codes.flatten_all()?.to_vec1::<u32>()? {
                    usage[c as usize] += 1;
                }
            }
            if train.restart_every > 0
                && (step + 1) % train.restart_every == 0
                && step + train.restart_every < train.vae_steps
            {
                report.restarts += restart_dead_codes(&net, &q, &usage, &mut rng)?;
                usage.iter_mut().for_each(|u| *u = 0);
            }
        }
    }
    let avg = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
    report.recon_first = avg(&first);
    report.recon_last = avg(&last);

    // Codes and latents of every trajectory under the trained VQ-VAE.
    let vae = net.to_model()?;
    let mut hs: Vec<Vec<f32>> = Vec::with_capacity(xs.len());
    let mut codes: Vec<Vec<u32>> = Vec::with_capacity(xs.len());
    let mut used = vec![false; v_size];
    let mut action_err = 0f64;
    for x in &xs {
        let q = vae.quantize(&vae.encode(x)?)?;
        let x_hat = vae.decode(&q.fhat)?;
        for step in 0..t {
            let i = step * f + ACTION_SLOT;
            action_err += ((x_hat[i] - x[i]) * x_std[ACTION_SLOT]).abs() as f64;
        }
        let flat: Vec<u32> = q.codes.iter().flatten().copied().collect();
        for &c in &flat {
            if let Some(u) = used.get_mut(c as usize) {
                *u = true;
            }
        }
        codes.push(flat);
        hs.push(q.h);
    }
    report.action_mae = (action_err / (xs.len() * t) as f64) as f32;
    report.codebook_usage = if cfg.quantize {
        used.iter().filter(|&&u| u).count() as f32 / v_size as f32
    } else {
        0.0
    };

    // Stage 2: the generator.
    let mut opt = candle_nn::AdamW::new(
        net.vars_of(&["gen."]),
        candle_nn::ParamsAdamW {
            lr: train.gen_lr,
            weight_decay: train.weight_decay,
            ..Default::default()
        },
    )?;
    let (l, c, ad) = (cfg.tokens(), cfg.code_dim, cfg.attr_dim());
    let (mut first, mut last) = (Vec::new(), Vec::new());
    for step in 0..train.gen_steps {
        let progress = step as f64 / train.gen_steps.max(1) as f64;
        let lr = train.gen_lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()));
        opt.set_learning_rate(lr);
        let b = train.batch;
        let mut y = Vec::with_capacity(b * ad);
        let mut hist = vec![0f32; b * t * f];
        let mut hist_len = Vec::with_capacity(b);
        let mut h = Vec::with_capacity(b * l * c);
        let mut target = Vec::with_capacity(b * l);
        for j in 0..b {
            let i = (rng.next_u64() % xs.len() as u64) as usize;
            if rng.uniform() < train.cond_dropout {
                y.extend(std::iter::repeat_n(0f32, ad));
            } else {
                y.extend_from_slice(&ys[i]);
                y.push(1.0);
            }
            let n = (rng.next_u64() % (t as u64 + 1)) as usize;
            hist[j * t * f..j * t * f + n * f].copy_from_slice(&xs[i][..n * f]);
            hist_len.push(n);
            h.extend_from_slice(&hs[i]);
            target.extend_from_slice(&codes[i]);
        }
        let y = Tensor::from_vec(y, (b, ad), &dev)?;
        let hist = Tensor::from_vec(hist, (b, t, f), &dev)?;
        let h = Tensor::from_vec(h, (b, l, c), &dev)?;
        let out = net.generator(&y, &hist, &hist_len, &h)?;
        let loss = if cfg.quantize {
            let target = Tensor::from_vec(target, b * l, &dev)?;
            candle_nn::loss::cross_entropy(&out.reshape((b * l, cfg.codebook_size))?, &target)?
        } else {
            mse(&out, &h)?
        };
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(TrainError::Diverged { step, loss: value });
        }
        opt.backward_step(&loss)?;
        if step < 50 {
            first.push(value);
        }
        if step + 50 >= train.gen_steps {
            last.push(value);
        }
    }
    report.gen_first = avg(&first);
    report.gen_last = avg(&last);
    report.seconds = started.elapsed().as_secs_f64();
    Ok((net.to_model()?, report))
}

/// Moves every codebook entry with no use since the last restart to a
/// random scale input `z_k` of the batch (plus a little noise, so two
/// restarted entries never coincide). Returns how many entries moved.
fn restart_dead_codes(
    net: &CandleTar,
    q: &Quantization,
    usage: &[u64],
    rng: &mut SplitMix,
) -> Result<usize, TrainError> {
    let dead: Vec<usize> = (0..usage.len()).filter(|&i| usage[i] == 0).collect();
    if dead.is_empty() {
        return Ok(0);
    }
    let codebook_var = net
        .vars
        .get("quant.codebook")
        .ok_or_else(|| TrainError::Data("no codebook".into()))?;
    let c = net.config.code_dim;
    let mut book = codebook_var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    // Candidate latents: the inputs of every scale.
    let mut pool: Vec<f32> = Vec::new();
    for h in &q.z {
        pool.extend(h.flatten_all()?.to_vec1::<f32>()?);
    }
    let rows = pool.len() / c;
    if rows == 0 {
        return Ok(0);
    }
    let scale = {
        let var: f32 = book.iter().map(|v| v * v).sum::<f32>() / book.len().max(1) as f32;
        0.1 * var.sqrt().max(1e-3)
    };
    for &d in &dead {
        let r = (rng.next_u64() % rows as u64) as usize;
        for j in 0..c {
            book[d * c + j] = pool[r * c + j] + scale * rng.normal() as f32;
        }
    }
    codebook_var.set(&Tensor::from_vec(book, codebook_var.dims(), &Device::Cpu)?)?;
    Ok(dead.len())
}
