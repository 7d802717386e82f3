//! Training the Decision-Transformer baseline with candle on CPU (feature
//! `train`).
//!
//! [`CandleDt`] is the forward pass of the [DT module docs](crate::tar::dt)
//! in batched candle tensors, with one variable per weight tensor of the
//! file (same names, same shapes); the normalisation tensors (`norm.*`) are
//! constants fitted on the data, not trained. [`train_dt`] (or, step by
//! step, [`DtTrainer`]) minimises the mean squared error between the
//! predicted and the logged action `alpha / CPA` over every real step of
//! random windows ([`DtTrainSet::batch`]) with AdamW, a linear warm-up then
//! a cosine decay to a tenth of the learning rate, and gradient-norm
//! clipping; it exports a [`DtModel`] whose [`DtModel::predict`] matches
//! [`CandleDt::forward`] within 1e-4 (tested).
//!
//! ```text
//!  Dataset ─► DtTrainSet (R_t, raw s_t, a_t per step; norm stats fitted)
//!                │  batch(size, seed): windows of <= K steps, left-padded to K
//!                ▼
//!  DtBatch [B, K] ─► CandleDt::forward ─► â [B, K] ─► masked MSE ─► AdamW
//!                                                          │
//!  DtModel (CPU) ◄── CandleDt::to_model ◄──────────────────┘
//! ```

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{Init, Optimizer, VarBuilder, VarMap};

use super::TrainError;
use crate::tar::data::{Dataset, SplitMix, Trajectory};
use crate::tar::dt::{returns_to_go, DtConfig, DtModel, GELU_SCALE, LN_EPS, STATE_FEATURES};
use crate::tar::model::TarError;

/// Added to the attention logit of a masked key (a later token or a padded
/// step): its softmax weight underflows to exactly zero.
const MASKED_LOGIT: f32 = -1e9;

/// A window of `n` consecutive steps of one day (`1 <= n <= K`): the unit
/// of a [`DtBatch`].
#[derive(Debug, Clone, PartialEq)]
pub struct DtWindow {
    /// Return-to-go per step (efficiency units, not yet divided by
    /// `norm.rtg_scale`).
    pub rtg: Vec<f32>,
    /// Raw state features, `n x STATE_FEATURES` row-major.
    pub states: Vec<f32>,
    /// `alpha / CPA` per step (`n` values): inputs of the action tokens
    /// and targets of the loss.
    pub actions: Vec<f32>,
    /// Tick of the first step.
    pub start_step: usize,
}

impl DtWindow {
    /// Steps `start_step .. start_step + n` of a trajectory (`None` if they
    /// are not all in the day, `n` is 0, or the lengths of its vectors
    /// disagree).
    pub fn from_trajectory(t: &Trajectory, start_step: usize, n: usize) -> Option<Self> {
        let end = start_step.checked_add(n)?;
        let len = t.steps.len();
        if n == 0 || end > len || t.actions.len() != len || t.rewards.len() != len {
            return None;
        }
        let rtg = returns_to_go(&t.rewards, t.budget, t.cpa_target);
        Some(Self {
            rtg: rtg[start_step..end].to_vec(),
            states: t.steps[start_step..end]
                .iter()
                .flat_map(|s| s[..STATE_FEATURES].iter().copied())
                .collect(),
            actions: t.actions[start_step..end].to_vec(),
            start_step,
        })
    }

    fn len(&self) -> usize {
        self.rtg.len()
    }
}

/// A batch of windows laid out for [`CandleDt`]: `B` rows of `K` step
/// slots, each window right-aligned (left padding), with the attention
/// bias (causal and padded-key mask) and the loss mask.
#[derive(Debug, Clone)]
pub struct DtBatch {
    config: DtConfig,
    size: usize,
    /// `[B, K, 1]`.
    rtg: Tensor,
    /// `[B, K, S]` raw.
    states: Tensor,
    /// `[B, K, 1]`.
    actions: Tensor,
    /// `[B * K]` u32 ticks (0 on padding).
    times: Tensor,
    /// `[B, K]`: 1 on real steps.
    mask: Tensor,
    /// `[B, 1, 3K, 3K]`: 0 or [`MASKED_LOGIT`].
    bias: Tensor,
    /// Real steps in the batch.
    real: usize,
}

impl DtBatch {
    /// Lays out `windows` (each `1..=K` steps with `n` actions, ticks below
    /// `max_steps`, finite values) for a model of `config`.
    pub fn new(config: &DtConfig, windows: &[DtWindow]) -> Result<Self, TrainError> {
        config.validate()?;
        if windows.is_empty() {
            return Err(TrainError::Data("a batch needs at least one window".into()));
        }
        let (k, s) = (config.context, config.state_features);
        let b = windows.len();
        let l = 3 * k;
        let mut rtg = vec![0f32; b * k];
        let mut states = vec![0f32; b * k * s];
        let mut actions = vec![0f32; b * k];
        let mut times = vec![0u32; b * k];
        let mut mask = vec![0f32; b * k];
        let mut bias = vec![MASKED_LOGIT; b * l * l];
        let mut real = 0;
        for (w, win) in windows.iter().enumerate() {
            let n = win.len();
            if n == 0
                || n > k
                || win.states.len() != n * s
                || win.actions.len() != n
                || win
                    .start_step
                    .checked_add(n)
                    .is_none_or(|e| e > config.max_steps)
            {
                return Err(TrainError::Data(format!(
                    "window {w}: {n} steps from tick {}, {} state values, {} actions; \
                     a window has 1..={k} steps, {s} state values and one action per step, \
                     ticks below {}",
                    win.start_step,
                    win.states.len(),
                    win.actions.len(),
                    config.max_steps
                )));
            }
            let finite = win
                .rtg
                .iter()
                .chain(&win.states)
                .chain(&win.actions)
                .all(|v| v.is_finite());
            if !finite {
                return Err(TrainError::Data(format!(
                    "window {w} holds a non-finite value"
                )));
            }
            let off = k - n;
            for i in 0..n {
                let slot = w * k + off + i;
                rtg[slot] = win.rtg[i];
                states[slot * s..(slot + 1) * s].copy_from_slice(&win.states[i * s..(i + 1) * s]);
                actions[slot] = win.actions[i];
                times[slot] = (win.start_step + i) as u32;
                mask[slot] = 1.0;
            }
            real += n;
            // Token i attends to token j iff j <= i and j is not padding.
            let bias = &mut bias[w * l * l..(w + 1) * l * l];
            for i in 0..l {
                for j in (3 * off)..=i {
                    bias[i * l + j] = 0.0;
                }
            }
        }
        let dev = Device::Cpu;
        Ok(Self {
            config: config.clone(),
            size: b,
            rtg: Tensor::from_vec(rtg, (b, k, 1), &dev)?,
            states: Tensor::from_vec(states, (b, k, s), &dev)?,
            actions: Tensor::from_vec(actions, (b, k, 1), &dev)?,
            times: Tensor::from_vec(times, b * k, &dev)?,
            mask: Tensor::from_vec(mask, (b, k), &dev)?,
            bias: Tensor::from_vec(bias, (b, 1, l, l), &dev)?,
            real,
        })
    }

    /// Windows in the batch (`B`).
    pub fn len(&self) -> usize {
        self.size
    }

    /// Whether the batch has no window (never: [`new`](Self::new) refuses).
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Real (not padded) steps, the loss's positions.
    pub fn real_steps(&self) -> usize {
        self.real
    }
}

/// One trajectory, checked and reduced to what the DT reads.
#[derive(Debug, Clone)]
struct Day {
    rtg: Vec<f32>,
    /// `T x S` raw.
    states: Vec<f32>,
    actions: Vec<f32>,
}

/// A [`Dataset`] checked and prepared for DT training: per step the
/// return-to-go, the 16 raw state features and the action, and the
/// normalisation fitted on them.
#[derive(Debug, Clone)]
pub struct DtTrainSet {
    config: DtConfig,
    days: Vec<Day>,
    s_mean: Vec<f32>,
    s_std: Vec<f32>,
    rtg_scale: f32,
}

impl DtTrainSet {
    /// Checks `data` against `config` (at least one trajectory; per
    /// trajectory 1..=`max_steps` steps with as many actions and rewards,
    /// positive finite budget and CPA, finite values) and fits the
    /// normalisation: per-feature mean and standard deviation over all
    /// steps (a deviation below 1e-6 becomes 1), and the mean day return
    /// `R_0` as the return scale (1 if it is below 1e-6).
    pub fn new(data: &Dataset, config: &DtConfig) -> Result<Self, TrainError> {
        config.validate()?;
        if data.trajectories.is_empty() {
            return Err(TrainError::Data("the dataset has no trajectory".into()));
        }
        let s = config.state_features;
        let mut days = Vec::with_capacity(data.trajectories.len());
        for (i, t) in data.trajectories.iter().enumerate() {
            let len = t.steps.len();
            if len == 0
                || len > config.max_steps
                || t.actions.len() != len
                || t.rewards.len() != len
            {
                return Err(TrainError::Data(format!(
                    "trajectory {i}: {len} steps, {} actions, {} rewards; \
                     1..={} steps with one action and one reward each are needed",
                    t.actions.len(),
                    t.rewards.len(),
                    config.max_steps
                )));
            }
            let positive = |v: f64| v.is_finite() && v > 0.0;
            if !positive(t.budget) || !positive(t.cpa_target) {
                return Err(TrainError::Data(format!(
                    "trajectory {i}: budget {} and CPA target {} must be positive",
                    t.budget, t.cpa_target
                )));
            }
            let day = Day {
                rtg: returns_to_go(&t.rewards, t.budget, t.cpa_target),
                states: t
                    .steps
                    .iter()
                    .flat_map(|x| x[..s].iter().copied())
                    .collect(),
                actions: t.actions.clone(),
            };
            let finite = day
                .rtg
                .iter()
                .chain(&day.states)
                .chain(&day.actions)
                .all(|v| v.is_finite());
            if !finite {
                return Err(TrainError::Data(format!(
                    "trajectory {i} holds a non-finite value"
                )));
            }
            days.push(day);
        }
        let mut sum = vec![0f64; s];
        let mut sq = vec![0f64; s];
        let mut count = 0f64;
        for day in &days {
            for row in day.states.chunks_exact(s) {
                for k in 0..s {
                    sum[k] += row[k] as f64;
                    sq[k] += (row[k] as f64) * (row[k] as f64);
                }
                count += 1.0;
            }
        }
        let s_mean: Vec<f32> = sum.iter().map(|v| (v / count) as f32).collect();
        let s_std: Vec<f32> = sum
            .iter()
            .zip(&sq)
            .map(|(a, b)| {
                let m = a / count;
                let sd = (b / count - m * m).max(0.0).sqrt();
                if sd < 1e-6 {
                    1.0
                } else {
                    sd as f32
                }
            })
            .collect();
        let mean_return = days.iter().map(|d| d.rtg[0] as f64).sum::<f64>() / days.len() as f64;
        let rtg_scale = if mean_return < 1e-6 {
            1.0
        } else {
            mean_return as f32
        };
        Ok(Self {
            config: config.clone(),
            days,
            s_mean,
            s_std,
            rtg_scale,
        })
    }

    /// The fitted normalisation: state means, state standard deviations,
    /// return scale (see [`DtModel::with_normalisation`]).
    pub fn normalisation(&self) -> (&[f32], &[f32], f32) {
        (&self.s_mean, &self.s_std, self.rtg_scale)
    }

    /// Trajectories in the set.
    pub fn len(&self) -> usize {
        self.days.len()
    }

    /// Whether the set is empty (never: [`new`](Self::new) refuses).
    pub fn is_empty(&self) -> bool {
        self.days.is_empty()
    }

    /// `size` random windows, deterministic in `seed`: a trajectory
    /// uniformly, a first step uniform in `-(K-1) ..= T-1`, the steps of
    /// `[first, first + K)` inside the day (see the [DT module
    /// docs](crate::tar::dt)).
    pub fn batch(&self, size: usize, seed: u64) -> Result<DtBatch, TrainError> {
        let mut rng = SplitMix::new(seed);
        let (k, s) = (self.config.context as i64, self.config.state_features);
        let mut windows = Vec::with_capacity(size);
        for _ in 0..size {
            let day = &self.days[(rng.next_u64() % self.days.len() as u64) as usize];
            let t = day.actions.len() as i64;
            let first = (rng.next_u64() % (t + k - 1) as u64) as i64 - (k - 1);
            let (a, b) = (first.max(0) as usize, (first + k).min(t) as usize);
            windows.push(DtWindow {
                rtg: day.rtg[a..b].to_vec(),
                states: day.states[a * s..b * s].to_vec(),
                actions: day.actions[a..b].to_vec(),
                start_step: a,
            });
        }
        DtBatch::new(&self.config, &windows)
    }
}

/// `(weight, bias)` of a LayerNorm.
#[derive(Debug, Clone)]
struct LnP(Tensor, Tensor);

/// A linear layer: `weight [out, in]`, `bias [out]` as a `[1, out]` view.
#[derive(Debug, Clone)]
struct Lin {
    w: Tensor,
    b: Tensor,
}

impl Lin {
    /// `x W^T + b` for `x: [N, in]`, with `ones: [N, 1]`. The bias is added
    /// as the rank-1 product `ones b` rather than broadcast: the backward
    /// pass of a broadcast sums the gradient over rows with a slow strided
    /// loop in candle's CPU backend, the product's is one small matmul.
    fn apply(&self, x: &Tensor, ones: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.w.t()?)? + ones.matmul(&self.b)?
    }
}

#[derive(Debug, Clone)]
struct BlockP {
    ln1: LnP,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    ln2: LnP,
    fc1: Lin,
    fc2: Lin,
}

/// The model's trained parameters as candle tensors (each backed by a
/// variable of the [`VarMap`]).
#[derive(Debug, Clone)]
struct Params {
    rtg: Lin,
    state: Lin,
    action: Lin,
    time: Tensor,
    embed_ln: LnP,
    blocks: Vec<BlockP>,
    ln_f: LnP,
    head: Lin,
}

fn var(vb: &VarBuilder, shape: &[usize], name: &str) -> candle_core::Result<Tensor> {
    vb.get_with_hints(shape, name, Init::Const(0.0))
}

fn linear(vb: &VarBuilder, inp: usize, out: usize, prefix: &str) -> candle_core::Result<Lin> {
    let w = var(vb, &[out, inp], &format!("{prefix}.weight"))?;
    let b = var(vb, &[out], &format!("{prefix}.bias"))?.reshape((1, out))?;
    Ok(Lin { w, b })
}

/// LayerNorm parameters as `[1, D]` views.
fn ln_params(vb: &VarBuilder, d: usize, prefix: &str) -> candle_core::Result<LnP> {
    Ok(LnP(
        var(vb, &[d], &format!("{prefix}.weight"))?.reshape((1, d))?,
        var(vb, &[d], &format!("{prefix}.bias"))?.reshape((1, d))?,
    ))
}

impl Params {
    fn new(c: &DtConfig, vb: &VarBuilder) -> candle_core::Result<Self> {
        let (d, s, m) = (c.d_model, c.state_features, c.mlp);
        let blocks = (0..c.blocks)
            .map(|b| {
                let p = format!("blocks.{b}");
                Ok(BlockP {
                    ln1: ln_params(vb, d, &format!("{p}.ln1"))?,
                    q: linear(vb, d, d, &format!("{p}.attn.q"))?,
                    k: linear(vb, d, d, &format!("{p}.attn.k"))?,
                    v: linear(vb, d, d, &format!("{p}.attn.v"))?,
                    o: linear(vb, d, d, &format!("{p}.attn.o"))?,
                    ln2: ln_params(vb, d, &format!("{p}.ln2"))?,
                    fc1: linear(vb, d, m, &format!("{p}.mlp.fc1"))?,
                    fc2: linear(vb, m, d, &format!("{p}.mlp.fc2"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            rtg: linear(vb, 1, d, "embed.rtg")?,
            state: linear(vb, s, d, "embed.state")?,
            action: linear(vb, 1, d, "embed.action")?,
            time: var(vb, &[c.max_steps, d], "embed.time")?,
            embed_ln: ln_params(vb, d, "embed.ln")?,
            blocks,
            ln_f: ln_params(vb, d, "ln_f")?,
            head: linear(vb, d, 1, "head")?,
        })
    }
}

/// LayerNorm of the rows of `x: [N, D]` (biased variance, eps 1e-5), from
/// differentiable primitives; `ones: [N, 1]` (see [`Lin::apply`]).
fn layer_norm(x: &Tensor, p: &LnP, ones: &Tensor) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + LN_EPS as f64)?.sqrt()?)?;
    (xn * ones.matmul(&p.0)?)? + ones.matmul(&p.1)?
}

/// `x sigmoid(2 sqrt(2/pi) x (1 + 0.044715 x^2))`: GPT-2's tanh `gelu`
/// from primitives whose backward passes are cheap (candle's `gelu`
/// backward recomputes `powf` and `tanh` and dominated a training step).
fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    let z = ((x.sqr()? * 0.044_715)? + 1.0)?.mul(x)?;
    x.mul(&candle_nn::ops::sigmoid(&(z * GELU_SCALE as f64)?)?)
}

/// Softmax over the last dimension, differentiable (the max shift is
/// detached).
fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let num = x.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// The Decision Transformer as candle variables: the forward pass of the
/// [DT module docs](crate::tar::dt), batched and differentiable,
/// initialised from and exported to a [`DtModel`].
pub struct CandleDt {
    config: DtConfig,
    varmap: VarMap,
    params: Params,
    /// `norm.*`: constants, not variables.
    s_mean: Vec<f32>,
    s_std: Vec<f32>,
    rtg_scale: f32,
}

impl std::fmt::Debug for CandleDt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleDt")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CandleDt {
    /// A candle copy of `model` (every weight tensor becomes a variable of
    /// the same name; the normalisation is kept as constants).
    pub fn from_model(model: &DtModel) -> Result<Self, TrainError> {
        let config = model.config().clone();
        config.validate()?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let params = Params::new(&config, &vb)?;
        let (m, sd, r) = model.normalisation();
        let mut this = Self {
            config,
            varmap,
            params,
            s_mean: m.to_vec(),
            s_std: sd.to_vec(),
            rtg_scale: r,
        };
        this.load(model)?;
        Ok(this)
    }

    /// Overwrites every variable (and the normalisation) with `model`'s
    /// tensor of the same name.
    pub fn load(&mut self, model: &DtModel) -> Result<(), TrainError> {
        if model.config() != &self.config {
            return Err(TrainError::Config {
                field: "model",
                message: "the model's configuration differs from this one's".into(),
            });
        }
        let vars = self.vars()?;
        let mut set = 0usize;
        for (name, shape, data) in model.tensors() {
            if name.starts_with("norm.") {
                continue;
            }
            let Some(var) = vars.get(&name) else {
                return Err(TarError::MissingTensor { name }.into());
            };
            if var.dims() != shape.as_slice() {
                return Err(TarError::Shape {
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
            return Err(TrainError::Data(format!(
                "{set} of the {} variables were set from the model",
                vars.len()
            )));
        }
        let (m, sd, r) = model.normalisation();
        self.s_mean = m.to_vec();
        self.s_std = sd.to_vec();
        self.rtg_scale = r;
        Ok(())
    }

    fn vars(&self) -> Result<HashMap<String, Var>, TrainError> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| TrainError::Candle("the variable map's lock is poisoned".into()))?;
        Ok(data.clone())
    }

    /// The current weights (and normalisation) as an inference model.
    pub fn to_model(&self) -> Result<DtModel, TrainError> {
        let mut tensors = HashMap::new();
        for (name, var) in self.vars()? {
            let shape = var.dims().to_vec();
            let data = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            tensors.insert(name, (shape, data));
        }
        let s = self.config.state_features;
        tensors.insert("norm.s_mean".into(), (vec![s], self.s_mean.clone()));
        tensors.insert("norm.s_std".into(), (vec![s], self.s_std.clone()));
        tensors.insert("norm.rtg_scale".into(), (vec![1], vec![self.rtg_scale]));
        Ok(DtModel::from_tensors(self.config.clone(), &tensors)?)
    }

    /// The configuration.
    pub fn config(&self) -> &DtConfig {
        &self.config
    }

    /// The trained variables, named as in the weights file (for an
    /// optimiser).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The predicted action of every step slot, `[B, K]` (padded slots
    /// hold garbage: mask them), differentiable.
    pub fn forward(&self, batch: &DtBatch) -> Result<Tensor, TrainError> {
        if batch.config != self.config {
            return Err(TrainError::Config {
                field: "batch",
                message: "the batch was built for another model configuration".into(),
            });
        }
        Ok(self.forward_inner(batch)?)
    }

    fn forward_inner(&self, batch: &DtBatch) -> candle_core::Result<Tensor> {
        let p = &self.params;
        let c = &self.config;
        let (b, k, d, s) = (batch.size, c.context, c.d_model, c.state_features);
        let (l, heads) = (3 * k, c.heads);
        let hd = d / heads;
        let dev = Device::Cpu;
        let s_mean = Tensor::from_slice(&self.s_mean, s, &dev)?;
        let s_std = Tensor::from_slice(&self.s_std, s, &dev)?;

        // Every activation is a 2-D `[rows, width]` tensor (rows: B K
        // steps or B 3K tokens) outside the attention.
        let (n, nt) = (b * k, b * l);
        let ones_n = Tensor::ones((n, 1), DType::F32, &dev)?;
        let ones_t = Tensor::ones((nt, 1), DType::F32, &dev)?;
        let te = p.time.index_select(&batch.times, 0)?;
        let r = p.rtg.apply(
            &(batch.rtg.reshape((n, 1))? / self.rtg_scale as f64)?,
            &ones_n,
        )?;
        let sn = batch
            .states
            .reshape((n, s))?
            .broadcast_sub(&s_mean)?
            .broadcast_div(&s_std)?;
        let st = p.state.apply(&sn, &ones_n)?;
        let a = p.action.apply(&batch.actions.reshape((n, 1))?, &ones_n)?;
        // Interleave (R, s, a) per step: [B K, 3, D] -> [B 3K, D].
        let tokens = Tensor::stack(&[(r + &te)?, (st + &te)?, (a + &te)?], 1)?.reshape((nt, d))?;
        let mut u = layer_norm(&tokens, &p.embed_ln, &ones_t)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for blk in &p.blocks {
            let h = layer_norm(&u, &blk.ln1, &ones_t)?;
            let split = |x: Tensor| -> candle_core::Result<Tensor> {
                x.reshape((b, l, heads, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = split(blk.q.apply(&h, &ones_t)?)?;
            let kk = split(blk.k.apply(&h, &ones_t)?)?;
            let v = split(blk.v.apply(&h, &ones_t)?)?;
            let logits = (q.matmul(&kk.transpose(2, 3)?.contiguous()?)? * scale)?
                .broadcast_add(&batch.bias)?;
            let att = softmax_last(&logits)?
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((nt, d))?;
            u = (u + blk.o.apply(&att, &ones_t)?)?;
            let h = layer_norm(&u, &blk.ln2, &ones_t)?;
            let m = gelu(&blk.fc1.apply(&h, &ones_t)?)?;
            u = (&u + blk.fc2.apply(&m, &ones_t)?)?;
        }
        let u = layer_norm(&u, &p.ln_f, &ones_t)?;
        let states = u
            .reshape((b, k, 3, d))?
            .narrow(2, 1, 1)?
            .contiguous()?
            .reshape((n, d))?;
        p.head.apply(&states, &ones_n)?.reshape((b, k))
    }

    /// The mean squared error of the predicted against the logged actions
    /// over the batch's real steps (a scalar tensor, differentiable).
    pub fn loss(&self, batch: &DtBatch) -> Result<Tensor, TrainError> {
        let pred = self.forward(batch)?;
        let target = batch.actions.squeeze(2)?;
        let se = ((pred - target)?.sqr()? * &batch.mask)?;
        Ok((se.sum_all()? / batch.real.max(1) as f64)?)
    }

    /// [`DtModel::predict`] through the candle graph: the same inputs, the
    /// predicted action of the last step (the parity check).
    pub fn predict(
        &self,
        rtg: &[f32],
        states: &[f32],
        actions: &[f32],
        start_step: usize,
    ) -> Result<f32, TrainError> {
        let all = self.predict_all(rtg, states, actions, start_step)?;
        all.last()
            .copied()
            .ok_or_else(|| TrainError::Data("empty window".into()))
    }

    /// [`DtModel::predict_all`] through the candle graph.
    pub fn predict_all(
        &self,
        rtg: &[f32],
        states: &[f32],
        actions: &[f32],
        start_step: usize,
    ) -> Result<Vec<f32>, TrainError> {
        let n = rtg.len();
        let mut actions = actions.to_vec();
        if actions.len() + 1 == n {
            // The last action token cannot affect any prediction (causal).
            actions.push(0.0);
        }
        let window = DtWindow {
            rtg: rtg.to_vec(),
            states: states.to_vec(),
            actions,
            start_step,
        };
        let batch = DtBatch::new(&self.config, &[window])?;
        let pred = self.forward(&batch)?.detach().to_vec2::<f32>()?;
        let row = pred.into_iter().next().unwrap_or_default();
        row.get(self.config.context.saturating_sub(n)..)
            .map(<[f32]>::to_vec)
            .ok_or_else(|| TrainError::Data("the forward pass returned no row".into()))
    }
}

/// Hyper-parameters of [`train_dt`].
///
/// Defaults: 600 steps of 64 windows (38,400 windows), AdamW at 1e-3 with
/// weight decay 1e-4 (DT's decay), 40 warm-up steps, a cosine decay to
/// 1e-4, the gradient norm clipped at 1 (DT clips at 0.25 with a 10x
/// smaller rate). At the default model a step takes about 45 ms of one
/// core, so the defaults train in about 25-35 s on two cores whatever the
/// dataset's size. candle's CPU thread pool spin-waits; on a machine whose
/// cores are busy with other work, `RAYON_NUM_THREADS=1` (read by candle)
/// is faster than the default (these tensors are too small to gain from
/// threads).
#[derive(Debug, Clone, PartialEq)]
pub struct DtTrainConfig {
    /// Optimiser steps.
    pub steps: usize,
    /// Windows per step.
    pub batch: usize,
    /// Peak AdamW learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Steps of linear warm-up from `lr / warmup` to `lr`.
    pub warmup: usize,
    /// The learning rate ends at `lr x final_lr_fraction` (cosine decay
    /// after the warm-up); 1 keeps it constant.
    pub final_lr_fraction: f64,
    /// Largest global gradient norm (larger gradients are scaled down); 0
    /// disables clipping.
    pub grad_clip: f64,
    /// Seeds the initial weights ([`DtModel::random`]) and the windows.
    pub seed: u64,
}

impl Default for DtTrainConfig {
    fn default() -> Self {
        Self {
            steps: 600,
            batch: 64,
            lr: 1e-3,
            weight_decay: 1e-4,
            warmup: 40,
            final_lr_fraction: 0.1,
            grad_clip: 1.0,
            seed: 1,
        }
    }
}

impl DtTrainConfig {
    /// Every field in range: a positive batch, finite positive rate,
    /// finite non-negative decay and clip, a final fraction in `[0, 1]`.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |field: &'static str, message: String| Err(TrainError::Config { field, message });
        if self.batch == 0 || self.batch > 1 << 20 {
            return bad("batch", format!("{} is not in 1..=2^20", self.batch));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("{} is not a positive number", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight_decay",
                format!("{} is not a non-negative number", self.weight_decay),
            );
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return bad(
                "grad_clip",
                format!("{} is not a non-negative number", self.grad_clip),
            );
        }
        if !(0.0..=1.0).contains(&self.final_lr_fraction) {
            return bad(
                "final_lr_fraction",
                format!("{} is not in [0, 1]", self.final_lr_fraction),
            );
        }
        Ok(())
    }

    /// The learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let x = ((step - self.warmup) as f64 / span).min(1.0);
        let f = self.final_lr_fraction;
        self.lr * (f + (1.0 - f) * 0.5 * (1.0 + (std::f64::consts::PI * x).cos()))
    }
}

/// What [`train_dt_with`] reports after each step (instead of printing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DtProgress {
    /// Steps done so far (1 after the first).
    pub step: usize,
    /// The batch's loss before that step's update.
    pub loss: f32,
    /// The learning rate used.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f32,
    /// Wall time of the step.
    pub seconds: f64,
}

/// Training state, one [`step`](DtTrainer::step) at a time.
pub struct DtTrainer {
    set: DtTrainSet,
    model: CandleDt,
    optimizer: candle_nn::AdamW,
    config: DtTrainConfig,
    step: usize,
}

impl std::fmt::Debug for DtTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtTrainer")
            .field("config", &self.config)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl DtTrainer {
    /// Starts training `model` (its current weights and normalisation are
    /// the initialisation) on `set`.
    pub fn new(
        set: DtTrainSet,
        model: CandleDt,
        config: DtTrainConfig,
    ) -> Result<Self, TrainError> {
        config.validate()?;
        if set.config != model.config {
            return Err(TrainError::Config {
                field: "model",
                message: "the training set was prepared for another configuration".into(),
            });
        }
        let optimizer = candle_nn::AdamW::new(
            model.varmap().all_vars(),
            candle_nn::ParamsAdamW {
                lr: config.lr_at(0),
                weight_decay: config.weight_decay,
                ..Default::default()
            },
        )?;
        Ok(Self {
            set,
            model,
            optimizer,
            config,
            step: 0,
        })
    }

    /// One AdamW step on `batch` fresh windows. Returns the loss before
    /// the update; fails (without updating) if it is not finite.
    pub fn step(&mut self) -> Result<DtProgress, TrainError> {
        let started = Instant::now();
        let c = &self.config;
        let seed = c.seed ^ (self.step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (1 << 62);
        let batch = self.set.batch(c.batch, seed)?;
        let loss = self.model.loss(&batch)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(TrainError::Diverged {
                step: self.step,
                loss: value,
            });
        }
        let mut grads = loss.backward()?;
        let vars = self.model.varmap().all_vars();
        let mut sumsq = 0f64;
        for v in &vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                sumsq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = sumsq.sqrt();
        if !norm.is_finite() {
            return Err(TrainError::Diverged {
                step: self.step,
                loss: norm as f32,
            });
        }
        if c.grad_clip > 0.0 && norm > c.grad_clip {
            let f = c.grad_clip / norm;
            for v in &vars {
                if let Some(g) = grads.remove(v.as_tensor()) {
                    grads.insert(v.as_tensor(), (g * f)?);
                }
            }
        }
        let lr = c.lr_at(self.step);
        self.optimizer.set_learning_rate(lr);
        self.optimizer.step(&grads)?;
        self.step += 1;
        Ok(DtProgress {
            step: self.step,
            loss: value,
            lr,
            grad_norm: norm as f32,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Steps done so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// The model being trained.
    pub fn model(&self) -> &CandleDt {
        &self.model
    }

    /// The training set.
    pub fn train_set(&self) -> &DtTrainSet {
        &self.set
    }

    /// Ends training, returning the model.
    pub fn into_model(self) -> CandleDt {
        self.model
    }
}

/// Trains a DT of `model_config` on `data`: normalisation fitted on the
/// data ([`DtTrainSet::new`]), weights from [`DtModel::random`]`(config,
/// train.seed)`, `train.steps` AdamW steps; returns the inference model
/// (save it with [`DtModel::save`]).
pub fn train_dt(
    data: &Dataset,
    model_config: &DtConfig,
    train: &DtTrainConfig,
) -> Result<DtModel, TrainError> {
    train_dt_with(data, model_config, train, |_| {})
}

/// [`train_dt`], reporting each step to `progress`.
pub fn train_dt_with(
    data: &Dataset,
    model_config: &DtConfig,
    train: &DtTrainConfig,
    mut progress: impl FnMut(DtProgress),
) -> Result<DtModel, TrainError> {
    train.validate()?;
    let set = DtTrainSet::new(data, model_config)?;
    let (m, sd, r) = set.normalisation();
    let init = DtModel::random(model_config.clone(), train.seed)?.with_normalisation(m, sd, r)?;
    let mut trainer = DtTrainer::new(set, CandleDt::from_model(&init)?, train.clone())?;
    for _ in 0..train.steps {
        progress(trainer.step()?);
    }
    trainer.into_model().to_model()
}
