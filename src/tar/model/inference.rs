//! [`TarModel`]: loading and saving the weights, the VQ-VAE, and the
//! generator's two entry points ([`TarModel::generate`],
//! [`TarModel::teacher_forced`]).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use super::config::{TarConfig, ATTRIBUTES};
use super::error::TarError;
use super::generator::Session;
use super::sample::{self, SampleScratch};
use super::weights::{random_tensors, Raw, Weights};
use crate::tar::data::SplitMix;
use crate::tar::weights_file::{self, TensorFile};

/// How [`TarModel::generate`] samples codes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateOptions {
    /// Nucleus mass in `(0, 1]`: the most probable codes are kept until
    /// their probability reaches `top_p` (the most probable always).
    /// A tiny value picks the argmax.
    pub top_p: f32,
    /// Softmax temperature, `> 0`.
    pub temperature: f32,
    /// Classifier-free guidance scale `g >= 0` (VAR's): the head outputs
    /// are `u + g (c - u)` with `c` conditioned on the attributes and `u`
    /// on none (the model trained with condition dropout knows both), the
    /// observed history the same in both. `1` is the plain conditional
    /// model (one pass); larger values follow the attributes more closely
    /// at the price of a second pass per scale.
    pub guidance: f32,
}

impl Default for GenerateOptions {
    /// `top_p` 0.9, `temperature` 1, `guidance` 1 (none).
    fn default() -> Self {
        Self {
            top_p: 0.9,
            temperature: 1.0,
            guidance: 1.0,
        }
    }
}

impl GenerateOptions {
    /// Checks the options ([`TarError::Input`] naming the bad one):
    /// `temperature > 0` and finite, `top_p` in `(0, 1]`, `guidance >= 0`
    /// and finite. Every generator (CPU and CUDA) checks them this way.
    pub fn validate(&self) -> Result<(), TarError> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(input(
                "temperature",
                format!("{} is not a positive finite number", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(input("top_p", format!("{} is not in (0, 1]", self.top_p)));
        }
        if !(self.guidance >= 0.0 && self.guidance.is_finite()) {
            return Err(input(
                "guidance",
                format!("{} is not a finite number >= 0", self.guidance),
            ));
        }
        Ok(())
    }
}

/// Checks a generator's condition for `config`: `y` of `attr_dim` finite
/// values and `history` of `n x F` finite values with `n` in `0..=T`;
/// returns `n`. Shared with the CUDA generator.
pub(crate) fn check_condition(
    config: &TarConfig,
    y: &[f32],
    history: &[f32],
) -> Result<usize, TarError> {
    check_matrix("y", y, 1, config.attr_dim())?;
    let f = config.step_features;
    if !history.len().is_multiple_of(f) || history.len() / f > config.steps {
        return Err(input(
            "history",
            format!(
                "{} values; expected n x {f} with n in 0..={}",
                history.len(),
                config.steps
            ),
        ));
    }
    check_finite("history", history)?;
    Ok(history.len() / f)
}

/// The residual quantisation of a latent sequence ([`TarModel::quantize`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// Per scale, the `l_k` codebook indices; an empty vector per scale
    /// without quantisation.
    pub codes: Vec<Vec<u32>>,
    /// `L x C`: the `h_k` of every scale concatenated in scale order.
    pub h: Vec<f32>,
    /// `T x C`: `sum_k phi(up(h_k, T))`.
    pub fhat: Vec<f32>,
}

/// A generated trajectory ([`TarModel::generate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// Per scale, the `l_k` sampled codes; an empty vector per scale
    /// without quantisation.
    pub codes: Vec<Vec<u32>>,
    /// `L x C`: the `h_k` of every scale concatenated in scale order.
    pub h: Vec<f32>,
    /// `T x F`: the decoded trajectory, normalised
    /// ([`TarModel::denormalize_step`] gives raw features).
    pub x_hat: Vec<f32>,
}

/// A TAR model: its configuration and every weight tensor (see the
/// [module docs](super) for the equations), ready for CPU inference.
///
/// Immutable after construction, so it can be shared behind an `Arc`;
/// [`generate`](Self::generate) takes the random generator explicitly and
/// is deterministic given its state.
///
/// ```
/// use nann::tar::data::SplitMix;
/// use nann::tar::model::{GenerateOptions, TarConfig, TarModel, ACTION_SLOT, STEP_FEATURES};
///
/// let model = TarModel::random(TarConfig::default(), 7)?;
/// // Condition on (target score, budget, CPA target) and the 5 steps seen.
/// let y = model.condition(Some(&[0.8, 0.95, 0.9, 3.5]));
/// let seen = vec![0.1; 5 * STEP_FEATURES];
/// let history = model.normalize_step(&seen)?;
/// let mut rng = SplitMix::new(1);
/// let out = model.generate(&y, &history, &GenerateOptions::default(), &mut rng)?;
/// assert_eq!(out.x_hat.len(), 48 * STEP_FEATURES);
/// assert_eq!(out.codes.iter().map(Vec::len).sum::<usize>(), 65);
/// // The next action: the previous-action slot of the next step.
/// let raw = model.denormalize_step(&out.x_hat)?;
/// let action = raw[5 * STEP_FEATURES + ACTION_SLOT];
/// assert!(action.is_finite());
/// # Ok::<(), nann::tar::model::TarError>(())
/// ```
#[derive(Clone)]
pub struct TarModel {
    config: TarConfig,
    /// `config.tensor_shapes()`.
    specs: Vec<(String, Vec<usize>)>,
    /// The tensors in `specs` order, file layout.
    raw: Raw,
    w: Weights,
}

impl fmt::Debug for TarModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TarModel")
            .field("config", &self.config)
            .field("parameters", &self.parameter_count())
            .finish_non_exhaustive()
    }
}

fn input(input: &'static str, message: String) -> TarError {
    TarError::Input { input, message }
}

/// Checks that `x` holds `rows x width` finite values (also the CUDA
/// generator's check).
pub(crate) fn check_matrix(
    name: &'static str,
    x: &[f32],
    rows: usize,
    width: usize,
) -> Result<(), TarError> {
    if x.len() != rows * width {
        return Err(input(
            name,
            format!(
                "{} values; expected {rows} x {width} = {}",
                x.len(),
                rows * width
            ),
        ));
    }
    check_finite(name, x)
}

fn check_finite(name: &'static str, x: &[f32]) -> Result<(), TarError> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(input(name, format!("element {i} is {}", x[i]))),
        None => Ok(()),
    }
}

impl TarModel {
    /// A model with deterministic random weights (the same for the same
    /// `config` and `seed`): every linear layer's weight and bias uniform
    /// in `±1/sqrt(fan_in)` (PyTorch's default), LayerNorm weights `1`
    /// and biases `0` plus `N(0, 0.05²)` noise, the codebook `N(0, 1)`,
    /// position tables and the start token `N(0, 0.05²)`, and identity
    /// normalisation (means 0, scales 1). The starting point for training
    /// and a stand-in for tests.
    pub fn random(config: TarConfig, seed: u64) -> Result<Self, TarError> {
        config.validate()?;
        let specs = config.tensor_shapes();
        let raw = random_tensors(&specs, seed);
        Self::assemble(config, specs, raw)
    }

    /// A model from named tensors `(shape, data)`, e.g. a trainer's
    /// parameters. Checks the configuration, then every tensor of
    /// [`TarConfig::tensor_shapes`]: present ([`TarError::MissingTensor`]),
    /// of that exact shape with `data` matching it ([`TarError::Shape`]),
    /// finite ([`TarError::NonFinite`]); `norm.x_std` and `norm.attr_std`
    /// must be positive ([`TarError::Config`]). Other names are ignored.
    pub fn from_tensors(
        config: TarConfig,
        mut tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    ) -> Result<Self, TarError> {
        config.validate()?;
        let specs = config.tensor_shapes();
        let mut raw = Vec::with_capacity(specs.len());
        for (name, expected) in &specs {
            let (shape, data) = tensors
                .remove(name)
                .ok_or_else(|| TarError::MissingTensor { name: name.clone() })?;
            if &shape != expected {
                return Err(TarError::Shape {
                    name: name.clone(),
                    expected: expected.clone(),
                    found: shape,
                });
            }
            if data.len() != expected.iter().product::<usize>() {
                return Err(TarError::Shape {
                    name: name.clone(),
                    expected: expected.clone(),
                    found: vec![data.len()],
                });
            }
            raw.push(data);
        }
        Self::assemble(config, specs, raw)
    }

    /// Reads a safetensors file's bytes: the configuration from its
    /// metadata ([`TarConfig::from_metadata`]), then every tensor as in
    /// [`from_tensors`](Self::from_tensors); tensors must be F32
    /// ([`TarError::DType`]). Bytes that are not a well-formed safetensors
    /// file give [`TarError::Format`]. Never panics, whatever the bytes;
    /// allocates only for tensors the file's bytes back.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, TarError> {
        let file = TensorFile::parse(bytes)?;
        let config = TarConfig::from_metadata(file.metadata())?;
        let specs = config.tensor_shapes();
        let raw = file.read(&specs)?;
        Self::assemble(config, specs, raw)
    }

    /// Reads a weights file written by [`save`](Self::save) (or by the
    /// trainer); see [`from_safetensors`](Self::from_safetensors).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TarError> {
        Self::from_safetensors(&weights_file::read_file(path.as_ref())?)
    }

    /// The model as a safetensors file: every tensor of
    /// [`tensors`](Self::tensors) (F32, little-endian) and the
    /// configuration as metadata ([`TarConfig::to_metadata`]), so the file
    /// describes itself.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, TarError> {
        weights_file::to_bytes(&self.tensors(), self.config.to_metadata())
    }

    /// Writes [`to_safetensors`](Self::to_safetensors) to `path`
    /// atomically: into a temporary file in the same directory, flushed to
    /// disk, then renamed over `path`, so a reader (or a crash) sees the
    /// old file or the new one, never a torn one.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), TarError> {
        weights_file::save_atomic(path.as_ref(), &self.to_safetensors()?)
    }

    /// Every tensor as `(name, shape, data)` in the order and with the
    /// shapes of [`TarConfig::tensor_shapes`]; linear weights are `[out,
    /// in]`. What a trainer initialises from and what
    /// [`to_safetensors`](Self::to_safetensors) writes.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        self.specs
            .iter()
            .zip(&self.raw)
            .map(|((name, shape), data)| (name.clone(), shape.clone(), &data[..]))
            .collect()
    }

    /// The configuration.
    pub fn config(&self) -> &TarConfig {
        &self.config
    }

    /// Number of weights (f32 values) over all tensors.
    pub fn parameter_count(&self) -> usize {
        self.raw.iter().map(Vec::len).sum()
    }

    fn assemble(
        config: TarConfig,
        specs: Vec<(String, Vec<usize>)>,
        raw: Raw,
    ) -> Result<Self, TarError> {
        let w = Weights::new(&config, &specs, &raw)?;
        Ok(Self {
            config,
            specs,
            raw,
            w,
        })
    }

    /// Normalises raw step features: any number of rows of `F` values,
    /// `(x - norm.x_mean) / norm.x_std` per feature.
    pub fn normalize_step(&self, raw: &[f32]) -> Result<Vec<f32>, TarError> {
        self.check_rows("raw", raw)?;
        Ok(raw
            .chunks_exact(self.config.step_features)
            .flat_map(|row| {
                row.iter()
                    .zip(self.w.x_mean.iter().zip(&self.w.x_std))
                    .map(|(x, (m, s))| (x - m) / s)
            })
            .collect())
    }

    /// The inverse of [`normalize_step`](Self::normalize_step):
    /// `x norm.x_std + norm.x_mean` per feature, any number of rows.
    pub fn denormalize_step(&self, x: &[f32]) -> Result<Vec<f32>, TarError> {
        self.check_rows("x", x)?;
        Ok(x.chunks_exact(self.config.step_features)
            .flat_map(|row| {
                row.iter()
                    .zip(self.w.x_mean.iter().zip(&self.w.x_std))
                    .map(|(x, (m, s))| x * s + m)
            })
            .collect())
    }

    fn check_rows(&self, name: &'static str, x: &[f32]) -> Result<(), TarError> {
        let f = self.config.step_features;
        if !x.len().is_multiple_of(f) {
            return Err(input(
                name,
                format!(
                    "{} values is not a whole number of {f}-feature steps",
                    x.len()
                ),
            ));
        }
        check_finite(name, x)
    }

    /// The generator's condition `y` (`attr_dim` values): with raw
    /// attributes (target score, budget, CPA target), the normalised
    /// attributes `(a - norm.attr_mean) / norm.attr_std` and the present
    /// flag 1; without, all zeros (the unconditional model).
    pub fn condition(&self, raw_attributes: Option<&[f32; ATTRIBUTES]>) -> Vec<f32> {
        let mut y = vec![0.0; self.config.attr_dim()];
        if let Some(a) = raw_attributes {
            for (i, ((a, m), s)) in a
                .iter()
                .zip(&self.w.attr_mean)
                .zip(&self.w.attr_std)
                .enumerate()
            {
                y[i] = (a - m) / s;
            }
            y[ATTRIBUTES] = 1.0;
        }
        y
    }

    /// The VQ-VAE encoder: a normalised trajectory `x` (`T x F`) to the
    /// latent sequence `f` (`T x C`).
    pub fn encode(&self, x: &[f32]) -> Result<Vec<f32>, TarError> {
        let c = &self.config;
        check_matrix("x", x, c.steps, c.step_features)?;
        Ok(self.w.enc.forward(x, c.steps, c.vae_heads))
    }

    /// The VQ-VAE decoder: `fhat` (`T x C`) to a normalised trajectory
    /// (`T x F`).
    pub fn decode(&self, fhat: &[f32]) -> Result<Vec<f32>, TarError> {
        let c = &self.config;
        check_matrix("fhat", fhat, c.steps, c.code_dim)?;
        Ok(self.w.dec.forward(fhat, c.steps, c.vae_heads))
    }

    /// Residual quantisation of a latent sequence `f` (`T x C`) over the
    /// scales: per scale `z_k = down(rest, l_k)`, `h_k` its nearest
    /// codebook rows (ties to the lowest index; `z_k` itself without
    /// quantisation), `r = phi(up(h_k, T))`, `fhat += r`, `rest -= r`.
    pub fn quantize(&self, f: &[f32]) -> Result<Quantized, TarError> {
        let cfg = &self.config;
        let (t, c) = (cfg.steps, cfg.code_dim);
        check_matrix("f", f, t, c)?;
        let mut rest = f.to_vec();
        let mut fhat = vec![0.0; t * c];
        let mut codes = Vec::with_capacity(cfg.scales.len());
        let mut h = Vec::with_capacity(cfg.tokens() * c);
        for &n in &cfg.scales {
            let mut z = vec![0.0; n * c];
            super::nn::down(&rest, t, c, n, &mut z);
            let h_k = if cfg.quantize {
                let idx: Vec<u32> = z.chunks_exact(c).map(|row| self.nearest(row)).collect();
                let h_k = self.codebook_rows(&idx);
                codes.push(idx);
                h_k
            } else {
                codes.push(Vec::new());
                z
            };
            let r = self.w.refine(cfg, &h_k, n);
            for ((f, rest), &r) in fhat.iter_mut().zip(rest.iter_mut()).zip(&r) {
                *f += r;
                *rest -= r;
            }
            h.extend_from_slice(&h_k);
        }
        Ok(Quantized { codes, h, fhat })
    }

    /// The index of the codebook row nearest to `z` (squared Euclidean
    /// distance; ties to the lowest index).
    fn nearest(&self, z: &[f32]) -> u32 {
        let mut best = (f32::INFINITY, 0u32);
        for (j, e) in self.w.codebook.chunks_exact(z.len()).enumerate() {
            let d: f32 = z.iter().zip(e).map(|(a, b)| (a - b) * (a - b)).sum();
            if d < best.0 {
                best = (d, j as u32);
            }
        }
        best.1
    }

    /// Codebook rows for checked indices, concatenated.
    fn codebook_rows(&self, idx: &[u32]) -> Vec<f32> {
        let c = self.config.code_dim;
        idx.iter()
            .flat_map(|&j| &self.w.codebook[j as usize * c..(j as usize + 1) * c])
            .copied()
            .collect()
    }

    /// `h` (`L x C`) from codes (one vector of `l_k` indices per scale):
    /// the codebook rows. Errors without quantisation, or with a code out of
    /// range or the wrong number of codes.
    pub fn h_from_codes(&self, codes: &[Vec<u32>]) -> Result<Vec<f32>, TarError> {
        let cfg = &self.config;
        if !cfg.quantize {
            return Err(input(
                "codes",
                "this model has no codebook (quantize = false)".into(),
            ));
        }
        if codes.len() != cfg.scales.len() {
            return Err(input(
                "codes",
                format!("{} scales; the model has {}", codes.len(), cfg.scales.len()),
            ));
        }
        for (k, (scale, &n)) in codes.iter().zip(&cfg.scales).enumerate() {
            if scale.len() != n {
                return Err(input(
                    "codes",
                    format!("scale {k} has {} codes; it needs {n}", scale.len()),
                ));
            }
            if let Some(&j) = scale.iter().find(|&&j| j as usize >= cfg.codebook_size) {
                return Err(input(
                    "codes",
                    format!(
                        "code {j} at scale {k} is not below the codebook size {}",
                        cfg.codebook_size
                    ),
                ));
            }
        }
        Ok(codes.iter().flat_map(|s| self.codebook_rows(s)).collect())
    }

    /// `fhat = sum_k phi(up(h_k, T))` (`T x C`) from `h` (`L x C`).
    pub fn fhat_from_h(&self, h: &[f32]) -> Result<Vec<f32>, TarError> {
        let cfg = &self.config;
        let c = cfg.code_dim;
        check_matrix("h", h, cfg.tokens(), c)?;
        let offsets = cfg.scale_offsets();
        let mut fhat = vec![0.0; cfg.steps * c];
        for (k, &n) in cfg.scales.iter().enumerate() {
            let r = self
                .w
                .refine(cfg, &h[offsets[k] * c..offsets[k + 1] * c], n);
            for (f, &r) in fhat.iter_mut().zip(&r) {
                *f += r;
            }
        }
        Ok(fhat)
    }

    /// Checks the generator's inputs; returns `n_hist`.
    fn check_condition(&self, y: &[f32], history: &[f32]) -> Result<usize, TarError> {
        check_condition(&self.config, y, history)
    }

    /// The generator's head outputs for known `h` (`L x head_outputs`):
    /// codebook logits, or the regressed `h_k` without quantisation. Scale
    /// `k`'s tokens are computed from `h_0 .. h_{k-1}` on the same
    /// scale-by-scale, key/value-cached path [`generate`](Self::generate)
    /// takes (teacher forcing). `y` is [`condition`](Self::condition)'s
    /// vector, `history` the `n_hist x F` observed normalised steps
    /// (`n_hist` in `0..=T`), `h` is `L x C`.
    pub fn teacher_forced(
        &self,
        y: &[f32],
        history: &[f32],
        h: &[f32],
    ) -> Result<Vec<f32>, TarError> {
        self.check_condition(y, history)?;
        let cfg = &self.config;
        let c = cfg.code_dim;
        check_matrix("h", h, cfg.tokens(), c)?;
        let offsets = cfg.scale_offsets();
        let mut session = Session::new(&self.w, cfg, y, history);
        let mut out = Vec::with_capacity(cfg.tokens() * cfg.head_outputs());
        for k in 0..cfg.scales.len() {
            out.extend_from_slice(session.run_scale(k));
            session.accumulate(k, &h[offsets[k] * c..offsets[k + 1] * c]);
        }
        Ok(out)
    }

    /// Generates a trajectory coarse to fine: for each scale, the
    /// generator's head on that scale's tokens (earlier scales cached),
    /// codes sampled by top-p (one `rng.uniform()` per token, in token
    /// order) or, without quantisation, `h_k` = the head output
    /// (deterministic); `fhat` accumulated as in
    /// [`quantize`](Self::quantize); finally `x_hat = decode(fhat)`.
    ///
    /// `y` is [`condition`](Self::condition)'s vector, `history` the
    /// `n_hist x F` observed normalised steps (`n_hist` in `0..=T`). Errors
    /// ([`TarError::Input`]) on wrong lengths, non-finite values, or
    /// options [`GenerateOptions::validate`] rejects.
    pub fn generate(
        &self,
        y: &[f32],
        history: &[f32],
        opts: &GenerateOptions,
        rng: &mut SplitMix,
    ) -> Result<Generated, TarError> {
        opts.validate()?;
        self.check_condition(y, history)?;
        let cfg = &self.config;
        let c = cfg.code_dim;
        let v = cfg.head_outputs();
        let mut session = Session::new(&self.w, cfg, y, history);
        // The unconditional twin for guidance: same history, no attributes.
        let unconditioned = vec![0.0; y.len()];
        let mut twin =
            (opts.guidance != 1.0).then(|| Session::new(&self.w, cfg, &unconditioned, history));
        let mut guided = Vec::new();
        let mut scratch = SampleScratch::default();
        let mut codes = Vec::with_capacity(cfg.scales.len());
        let mut h = Vec::with_capacity(cfg.tokens() * c);
        for k in 0..cfg.scales.len() {
            let mut out = session.run_scale(k);
            if let Some(twin) = twin.as_mut() {
                let g = opts.guidance;
                guided.clear();
                guided.extend(
                    out.iter()
                        .zip(twin.run_scale(k))
                        .map(|(c, u)| u + g * (c - u)),
                );
                out = &guided;
            }
            let start = h.len();
            if cfg.quantize {
                let idx: Vec<u32> = out
                    .chunks_exact(v)
                    .map(|logits| {
                        let u = rng.uniform();
                        sample::top_p(logits, opts.top_p, opts.temperature, u, &mut scratch) as u32
                    })
                    .collect();
                h.extend(self.codebook_rows(&idx));
                codes.push(idx);
            } else {
                h.extend_from_slice(out);
                codes.push(Vec::new());
            }
            session.accumulate(k, &h[start..]);
            if let Some(twin) = twin.as_mut() {
                twin.accumulate(k, &h[start..]);
            }
        }
        let fhat = session.into_fhat();
        let x_hat = self.w.dec.forward(&fhat, cfg.steps, cfg.vae_heads);
        Ok(Generated { codes, h, x_hat })
    }
}
