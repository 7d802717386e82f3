//! The Decision Transformer on a CPU: weights (safetensors), checks, and the
//! forward pass of the [module docs](super) with the crate's f32 kernels.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use super::config::DtConfig;
use crate::linalg;
use crate::tar::data::SplitMix;
use crate::tar::model::TarError;
use crate::tar::weights_file::{self, TensorFile};

/// LayerNorm epsilon (PyTorch's default), shared with the trainer.
pub(crate) const LN_EPS: f32 = 1e-5;

/// GPT-2's `gelu`, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`,
/// written as the identical `x sigmoid(2 sqrt(2/pi) x (1 + 0.044715 x^2))`
/// (the trainer's form: its backward pass is much cheaper than candle's
/// `gelu` one).
#[inline]
fn gelu(x: f32) -> f32 {
    x * linalg::sigmoid(GELU_SCALE * x * (1.0 + 0.044_715 * x * x))
}

/// `2 sqrt(2 / pi)`.
pub(crate) const GELU_SCALE: f32 = 1.595_769;

/// LayerNorm of each `d`-row of `x` in place (biased variance).
fn layer_norm_rows(x: &mut [f32], d: usize, ln: &Ln) {
    for row in x.chunks_exact_mut(d) {
        layer_norm_row(row, ln);
    }
}

fn layer_norm_row(row: &mut [f32], ln: &Ln) {
    let d = row.len() as f32;
    let mean = row.iter().sum::<f32>() / d;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    let inv = 1.0 / (var + LN_EPS).sqrt();
    for ((v, w), b) in row.iter_mut().zip(&ln.w).zip(&ln.b) {
        *v = (*v - mean) * inv * w + b;
    }
}

/// A linear layer for the kernels: weight transposed (`[in, out]`).
#[derive(Clone)]
struct Lin {
    wt: Vec<f32>,
    b: Vec<f32>,
}

impl Lin {
    /// From the file layout `w: [out, in]`.
    fn new(w: &[f32], b: &[f32], out: usize, inp: usize) -> Self {
        Self {
            wt: linalg::transpose(w, out, inp),
            b: b.to_vec(),
        }
    }
}

#[derive(Clone)]
struct Ln {
    w: Vec<f32>,
    b: Vec<f32>,
}

#[derive(Clone)]
struct Block {
    ln1: Ln,
    /// q, k and v fused: `[D, 3D]`, output columns `q | k | v`.
    qkv: Lin,
    o: Lin,
    ln2: Ln,
    fc1: Lin,
    fc2: Lin,
}

/// The inference matrices derived from the tensors.
#[derive(Clone)]
struct Net {
    s_mean: Vec<f32>,
    s_std: Vec<f32>,
    rtg_scale: f32,
    /// `embed.rtg.weight` (`[D, 1]` is a `D`-vector) and bias.
    rtg_w: Vec<f32>,
    rtg_b: Vec<f32>,
    state: Lin,
    act_w: Vec<f32>,
    act_b: Vec<f32>,
    time: Vec<f32>,
    embed_ln: Ln,
    blocks: Vec<Block>,
    ln_f: Ln,
    head_w: Vec<f32>,
    head_b: f32,
}

/// The Decision Transformer's weights and CPU forward pass.
///
/// Inputs are a window of `n` consecutive steps (`1 <= n <=
/// config.context`) starting at tick `start_step`: per step the
/// return-to-go (efficiency units, [`returns_to_go`](super::returns_to_go)),
/// the **raw** state features (the first 16 of
/// [`step_features`](crate::tar::data::step_features); the model
/// normalises them with its stored statistics) and the action `alpha /
/// CPA`. The output is the predicted action `alpha / CPA` of the last step
/// (read from its state token, so it never depends on the last step's own
/// action: pass `n - 1` actions, or `n` and the last is ignored).
///
/// ```
/// use nann::tar::dt::{DtConfig, DtModel, STATE_FEATURES};
///
/// let model = DtModel::random(DtConfig::default(), 7)?;
/// // Two steps of context, ticks 5 and 6: returns-to-go, raw state
/// // features (2 x 16), and the action taken at tick 5.
/// let rtg = [0.9, 0.85];
/// let states = vec![0.5f32; 2 * STATE_FEATURES];
/// let action = model.predict(&rtg, &states, &[1.0], 5)?; // alpha / CPA at tick 6
/// assert!(action.is_finite());
/// // Inputs are checked, never trusted:
/// assert!(model.predict(&rtg, &states[1..], &[1.0], 5).is_err());
/// assert!(model.predict(&rtg, &states, &[1.0], 287).is_err()); // past max_steps
/// # Ok::<(), nann::tar::model::TarError>(())
/// ```
#[derive(Clone)]
pub struct DtModel {
    config: DtConfig,
    /// The tensors in [`DtConfig::tensor_shapes`] order (the file's).
    tensors: Vec<Vec<f32>>,
    net: Net,
}

impl fmt::Debug for DtModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DtModel")
            .field("config", &self.config)
            .field("parameters", &self.parameter_count())
            .finish_non_exhaustive()
    }
}

impl DtModel {
    /// A model with deterministic random weights: every linear layer's
    /// weight and bias `~ U(-1/sqrt(in), 1/sqrt(in))` (PyTorch's default),
    /// the timestep table `~ N(0, 0.02^2)` (GPT-2's), LayerNorms the
    /// identity, normalisation the identity (mean 0, std 1, scale 1; set it
    /// with [`with_normalisation`](Self::with_normalisation)).
    pub fn random(config: DtConfig, seed: u64) -> Result<Self, TarError> {
        config.validate()?;
        let specs = config.tensor_shapes();
        let mut rng = SplitMix::new(seed ^ 0xd7_0000_0000_0000);
        let mut tensors = Vec::with_capacity(specs.len());
        // The fan-in of a `.weight [out, in]` bounds it and the next `.bias`.
        let mut bound = 1.0;
        for (name, shape) in &specs {
            let len: usize = shape.iter().product();
            let data: Vec<f32> = if name == "norm.s_std" || name == "norm.rtg_scale" {
                vec![1.0; len]
            } else if name == "norm.s_mean" {
                vec![0.0; len]
            } else if name == "embed.time" {
                (0..len).map(|_| (0.02 * rng.normal()) as f32).collect()
            } else if name.ends_with("ln.weight")
                || name.ends_with("ln1.weight")
                || name.ends_with("ln2.weight")
                || name == "ln_f.weight"
            {
                vec![1.0; len]
            } else if name.ends_with("ln.bias")
                || name.ends_with("ln1.bias")
                || name.ends_with("ln2.bias")
                || name == "ln_f.bias"
            {
                vec![0.0; len]
            } else {
                if shape.len() == 2 {
                    bound = 1.0 / (shape[1].max(1) as f64).sqrt();
                }
                (0..len)
                    .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            };
            tensors.push(data);
        }
        Self::assemble(config, tensors)
    }

    /// A model from named tensors `(shape, data)`, e.g. a trainer's
    /// parameters. Checks the configuration, then every tensor it needs:
    /// present ([`TarError::MissingTensor`]), of the right shape with `data`
    /// matching it ([`TarError::Shape`]), finite ([`TarError::NonFinite`]);
    /// the normalisation's standard deviations and scale must be positive
    /// ([`TarError::Config`]). Names the model does not use are ignored.
    pub fn from_tensors(
        config: DtConfig,
        tensors: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    ) -> Result<Self, TarError> {
        config.validate()?;
        let specs = config.tensor_shapes();
        let mut data = Vec::with_capacity(specs.len());
        for (name, expected) in &specs {
            let (shape, values) = tensors
                .get(name)
                .ok_or_else(|| TarError::MissingTensor { name: name.clone() })?;
            if shape != expected {
                return Err(TarError::Shape {
                    name: name.clone(),
                    expected: expected.clone(),
                    found: shape.clone(),
                });
            }
            let len: usize = expected.iter().product();
            if values.len() != len {
                return Err(TarError::Shape {
                    name: name.clone(),
                    expected: expected.clone(),
                    found: vec![values.len()],
                });
            }
            data.push(values.clone());
        }
        Self::assemble(config, data)
    }

    /// Reads a safetensors file's bytes: the configuration from its
    /// metadata ([`DtConfig::from_metadata`]), then every tensor as in
    /// [`from_tensors`](Self::from_tensors); tensors must be F32
    /// ([`TarError::DType`]). Bytes that are not a well-formed safetensors
    /// file give [`TarError::Format`]. Never panics, whatever the bytes.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, TarError> {
        let file = TensorFile::parse(bytes)?;
        let config = DtConfig::from_metadata(file.metadata())?;
        let specs = config.tensor_shapes();
        let raw = file.read(&specs)?;
        Self::assemble(config, raw)
    }

    /// Reads a weights file written by [`save`](Self::save) (or by the
    /// trainer); see [`from_safetensors`](Self::from_safetensors).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TarError> {
        Self::from_safetensors(&weights_file::read_file(path.as_ref())?)
    }

    /// The model as a safetensors file: every tensor of
    /// [`tensors`](Self::tensors) (F32, little-endian) and the
    /// configuration as metadata ([`DtConfig::to_metadata`]).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, TarError> {
        weights_file::to_bytes(&self.tensors(), self.config.to_metadata())
    }

    /// Writes [`to_safetensors`](Self::to_safetensors) to `path`
    /// atomically: into a temporary file in the same directory, flushed to
    /// disk, then renamed over `path`, so a reader (or a crash) sees the old
    /// file or the new one, never a torn one.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), TarError> {
        weights_file::save_atomic(path.as_ref(), &self.to_safetensors()?)
    }

    /// The configuration.
    pub fn config(&self) -> &DtConfig {
        &self.config
    }

    /// Number of values over all tensors (normalisation included).
    pub fn parameter_count(&self) -> usize {
        self.tensors.iter().map(Vec::len).sum()
    }

    /// Every tensor as `(name, shape, data)` in [`DtConfig::tensor_shapes`]
    /// order: what a trainer initialises from and what
    /// [`to_safetensors`](Self::to_safetensors) writes.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        self.config
            .tensor_shapes()
            .into_iter()
            .zip(&self.tensors)
            .map(|((name, shape), data)| (name, shape, &data[..]))
            .collect()
    }

    /// The stored normalisation: state means, state standard deviations and
    /// the return-to-go divisor.
    pub fn normalisation(&self) -> (&[f32], &[f32], f32) {
        (&self.net.s_mean, &self.net.s_std, self.net.rtg_scale)
    }

    /// The same weights with another normalisation (`norm.s_mean`,
    /// `norm.s_std`, `norm.rtg_scale`): `state_features` means and standard
    /// deviations (positive) and a positive return-to-go divisor, all finite.
    pub fn with_normalisation(
        self,
        s_mean: &[f32],
        s_std: &[f32],
        rtg_scale: f32,
    ) -> Result<Self, TarError> {
        let s = self.config.state_features;
        for (input, v) in [("s_mean", s_mean), ("s_std", s_std)] {
            if v.len() != s {
                return Err(TarError::Input {
                    input,
                    message: format!("{} values; the model has {s} state features", v.len()),
                });
            }
        }
        let mut tensors = self.tensors;
        // The first three tensors are the normalisation (tensor_shapes order).
        tensors[0] = s_mean.to_vec();
        tensors[1] = s_std.to_vec();
        tensors[2] = vec![rtg_scale];
        Self::assemble(self.config, tensors)
    }

    /// The predicted action `alpha / CPA` of the last step of the window
    /// (see the [type docs](Self)): `rtg` has `n` values (`1..=context`),
    /// `states` `n x state_features` raw features (row-major), `actions`
    /// `n - 1` or `n` (the last is ignored), the steps are the ticks
    /// `start_step .. start_step + n` (all below `max_steps`). Any other
    /// shape, or a non-finite input, is a [`TarError::Input`].
    pub fn predict(
        &self,
        rtg: &[f32],
        states: &[f32],
        actions: &[f32],
        start_step: usize,
    ) -> Result<f32, TarError> {
        let n = self.check(rtg, states, actions, start_step)?;
        let actions = &actions[..n - 1];
        Ok(self.forward(rtg, states, actions, start_step, true)[0])
    }

    /// The predicted action of every step of the window, as in training:
    /// `out[i]` is read from step `i`'s state token and depends only on the
    /// tokens before it (`rtg[..=i]`, `states[..=i]`, `actions[..i]`).
    /// Same inputs as [`predict`](Self::predict); with `n` actions, the
    /// sequence has all `3 n` tokens (the last action token changes nothing).
    pub fn predict_all(
        &self,
        rtg: &[f32],
        states: &[f32],
        actions: &[f32],
        start_step: usize,
    ) -> Result<Vec<f32>, TarError> {
        self.check(rtg, states, actions, start_step)?;
        Ok(self.forward(rtg, states, actions, start_step, false))
    }

    /// Checks the inputs; returns `n`.
    fn check(
        &self,
        rtg: &[f32],
        states: &[f32],
        actions: &[f32],
        start_step: usize,
    ) -> Result<usize, TarError> {
        let c = &self.config;
        let n = rtg.len();
        let bad = |input: &'static str, message: String| Err(TarError::Input { input, message });
        if n == 0 || n > c.context {
            return bad(
                "rtg",
                format!("{n} steps; the model reads 1..={} steps", c.context),
            );
        }
        if states.len() != n * c.state_features {
            return bad(
                "states",
                format!(
                    "{} values; {n} steps need {n} x {} = {}",
                    states.len(),
                    c.state_features,
                    n * c.state_features
                ),
            );
        }
        if actions.len() + 1 != n && actions.len() != n {
            return bad(
                "actions",
                format!("{} values; {n} steps need {} or {n}", actions.len(), n - 1),
            );
        }
        if start_step
            .checked_add(n)
            .is_none_or(|end| end > c.max_steps)
        {
            return bad(
                "start_step",
                format!(
                    "steps {start_step}..{start_step}+{n} reach past the timestep table ({} steps)",
                    c.max_steps
                ),
            );
        }
        for (input, v) in [("rtg", rtg), ("states", states), ("actions", actions)] {
            if let Some(p) = v.iter().position(|x| !x.is_finite()) {
                return bad(input, format!("element {p} is not finite ({})", v[p]));
            }
        }
        Ok(n)
    }

    /// The forward pass on checked inputs: the prediction of every step, or
    /// of the last one only (`last_only`).
    fn forward(
        &self,
        rtg: &[f32],
        states: &[f32],
        actions: &[f32],
        start: usize,
        last_only: bool,
    ) -> Vec<f32> {
        let c = &self.config;
        let net = &self.net;
        let (d, sf, m) = (c.d_model, c.state_features, c.mlp);
        let n = rtg.len();
        let na = actions.len().min(n);
        // Step i's tokens are rows 3i (return), 3i + 1 (state), 3i + 2
        // (action, when given); only the last step may lack its action.
        let l = 2 * n + na;

        // Token embeddings.
        let mut sn = vec![0f32; n * sf];
        for (row, raw) in sn.chunks_exact_mut(sf).zip(states.chunks_exact(sf)) {
            for (k, (o, &v)) in row.iter_mut().zip(raw).enumerate() {
                *o = (v - net.s_mean[k]) / net.s_std[k];
            }
        }
        let mut se = vec![0f32; n * d];
        linalg::linear(&sn, n, &net.state.wt, &net.state.b, &mut se);
        let mut x = vec![0f32; l * d];
        for i in 0..n {
            let te = &net.time[(start + i) * d..(start + i + 1) * d];
            let r = rtg[i] / net.rtg_scale;
            let row = &mut x[3 * i * d..(3 * i + 1) * d];
            for j in 0..d {
                row[j] = net.rtg_w[j] * r + net.rtg_b[j] + te[j];
            }
            let row = &mut x[(3 * i + 1) * d..(3 * i + 2) * d];
            for j in 0..d {
                row[j] = se[i * d + j] + te[j];
            }
            if i < na {
                let a = actions[i];
                let row = &mut x[(3 * i + 2) * d..(3 * i + 3) * d];
                for j in 0..d {
                    row[j] = net.act_w[j] * a + net.act_b[j] + te[j];
                }
            }
        }
        layer_norm_rows(&mut x, d, &net.embed_ln);

        // Pre-LN blocks with causal self-attention.
        let heads = c.heads;
        let hd = d / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut h = vec![0f32; l * d];
        let mut qkv = vec![0f32; l * 3 * d];
        let mut att = vec![0f32; l * d];
        let mut tmp = vec![0f32; l * d];
        let mut hid = vec![0f32; l * m];
        let mut scores = vec![0f32; l];
        let last_block = net.blocks.len().saturating_sub(1);
        for (bi, blk) in net.blocks.iter().enumerate() {
            // Query rows this block computes: all of them, except in the
            // last block of a last-step-only pass, where only the last row
            // (the last state token) is read afterwards. Keys and values
            // still come from every row.
            let r0 = if last_only && bi == last_block {
                l - 1
            } else {
                0
            };
            let rows = l - r0;
            h.copy_from_slice(&x);
            layer_norm_rows(&mut h, d, &blk.ln1);
            linalg::linear(&h, l, &blk.qkv.wt, &blk.qkv.b, &mut qkv);
            let att = &mut att[..rows * d];
            att.fill(0.0);
            for hh in 0..heads {
                let off = hh * hd;
                for i in r0..l {
                    let q = &qkv[i * 3 * d + off..i * 3 * d + off + hd];
                    for (j, s) in scores[..=i].iter_mut().enumerate() {
                        let k = &qkv[j * 3 * d + d + off..j * 3 * d + d + off + hd];
                        *s = linalg::dot(q, k) * scale;
                    }
                    linalg::softmax_rows(&mut scores[..=i], i + 1, 1, i + 1);
                    let out = &mut att[(i - r0) * d + off..(i - r0) * d + off + hd];
                    for (j, &p) in scores[..=i].iter().enumerate() {
                        let v = &qkv[j * 3 * d + 2 * d + off..j * 3 * d + 2 * d + off + hd];
                        for (o, &vv) in out.iter_mut().zip(v) {
                            *o += p * vv;
                        }
                    }
                }
            }
            let xr = &mut x[r0 * d..];
            let tmp = &mut tmp[..rows * d];
            linalg::linear(att, rows, &blk.o.wt, &blk.o.b, tmp);
            for (xv, t) in xr.iter_mut().zip(tmp.iter()) {
                *xv += t;
            }
            let h = &mut h[..rows * d];
            h.copy_from_slice(xr);
            layer_norm_rows(h, d, &blk.ln2);
            let hid = &mut hid[..rows * m];
            linalg::linear(h, rows, &blk.fc1.wt, &blk.fc1.b, hid);
            for v in hid.iter_mut() {
                *v = gelu(*v);
            }
            linalg::linear(hid, rows, &blk.fc2.wt, &blk.fc2.b, tmp);
            for (xv, t) in xr.iter_mut().zip(tmp.iter()) {
                *xv += t;
            }
        }

        // Final LayerNorm and the action head on the state tokens.
        let first = if last_only { n - 1 } else { 0 };
        let mut row = vec![0f32; d];
        (first..n)
            .map(|i| {
                row.copy_from_slice(&x[(3 * i + 1) * d..(3 * i + 2) * d]);
                layer_norm_row(&mut row, &net.ln_f);
                linalg::dot(&row, &net.head_w) + net.head_b
            })
            .collect()
    }

    /// Builds the model from tensors in [`DtConfig::tensor_shapes`] order
    /// (shapes already checked): checks values, derives the inference
    /// matrices.
    fn assemble(config: DtConfig, tensors: Vec<Vec<f32>>) -> Result<Self, TarError> {
        let specs = config.tensor_shapes();
        if specs.len() != tensors.len() {
            return Err(TarError::Format("internal: tensor count".into()));
        }
        for ((name, shape), data) in specs.iter().zip(&tensors) {
            if data.len() != shape.iter().product::<usize>() {
                return Err(TarError::Shape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: vec![data.len()],
                });
            }
            if let Some(position) = data.iter().position(|v| !v.is_finite()) {
                return Err(TarError::NonFinite {
                    name: name.clone(),
                    position,
                });
            }
        }
        let by_name: HashMap<&str, &[f32]> = specs
            .iter()
            .zip(&tensors)
            .map(|((name, _), data)| (name.as_str(), &data[..]))
            .collect();
        let get = |name: &str| -> Result<&[f32], TarError> {
            by_name
                .get(name)
                .copied()
                .ok_or_else(|| TarError::MissingTensor { name: name.into() })
        };
        for field in ["norm.s_std", "norm.rtg_scale"] {
            if let Some(p) = get(field)?.iter().position(|&v| v <= 0.0) {
                return Err(TarError::Config {
                    field,
                    message: format!("element {p} is not positive"),
                });
            }
        }
        let (d, sf, m) = (config.d_model, config.state_features, config.mlp);
        let ln = |p: &str| -> Result<Ln, TarError> {
            Ok(Ln {
                w: get(&format!("{p}.weight"))?.to_vec(),
                b: get(&format!("{p}.bias"))?.to_vec(),
            })
        };
        let lin = |p: &str, out: usize, inp: usize| -> Result<Lin, TarError> {
            Ok(Lin::new(
                get(&format!("{p}.weight"))?,
                get(&format!("{p}.bias"))?,
                out,
                inp,
            ))
        };
        let mut blocks = Vec::with_capacity(config.blocks);
        for b in 0..config.blocks {
            let p = format!("blocks.{b}");
            let mut w = Vec::with_capacity(3 * d * d);
            let mut bias = Vec::with_capacity(3 * d);
            for q in ["q", "k", "v"] {
                w.extend_from_slice(get(&format!("{p}.attn.{q}.weight"))?);
                bias.extend_from_slice(get(&format!("{p}.attn.{q}.bias"))?);
            }
            blocks.push(Block {
                ln1: ln(&format!("{p}.ln1"))?,
                qkv: Lin::new(&w, &bias, 3 * d, d),
                o: lin(&format!("{p}.attn.o"), d, d)?,
                ln2: ln(&format!("{p}.ln2"))?,
                fc1: lin(&format!("{p}.mlp.fc1"), m, d)?,
                fc2: lin(&format!("{p}.mlp.fc2"), d, m)?,
            });
        }
        let net = Net {
            s_mean: get("norm.s_mean")?.to_vec(),
            s_std: get("norm.s_std")?.to_vec(),
            rtg_scale: get("norm.rtg_scale")?.first().copied().unwrap_or(1.0),
            rtg_w: get("embed.rtg.weight")?.to_vec(),
            rtg_b: get("embed.rtg.bias")?.to_vec(),
            state: lin("embed.state", d, sf)?,
            act_w: get("embed.action.weight")?.to_vec(),
            act_b: get("embed.action.bias")?.to_vec(),
            time: get("embed.time")?.to_vec(),
            embed_ln: ln("embed.ln")?,
            blocks,
            ln_f: ln("ln_f")?,
            head_w: get("head.weight")?.to_vec(),
            head_b: get("head.bias")?.first().copied().unwrap_or(0.0),
        };
        Ok(Self {
            config,
            tensors,
            net,
        })
    }
}
