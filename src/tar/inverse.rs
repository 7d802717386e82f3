//! Inverse dynamics: the bid coefficient that makes a tick spend a given
//! share of the budget, learned from the log. How
//! [`TarPolicy`](super::TarPolicy) turns a generated plan into an action.
//!
//! TAR's plans carry their own actions (state-action fusion), but the
//! VQ-VAE reconstructs that one slot poorly: the behaviour policies' actions
//! are noisy tick to tick while the 16 state features are smooth, and the
//! codes go to the latter (BENCHMARKS.md, eleventh session: action MAE 0.3
//! against a within-day spread of 0.5). The plan's *budget* trajectory, on
//! the other hand, is reconstructed well. DiffBid (and AuctionNet's
//! Decision-Diffuser baseline) read actions the same way: generate states,
//! then `a_t = f(s_t, s_{t+1})` with a separately trained inverse-dynamics
//! model. Here `f` sees the *observed* state of the tick and the share of
//! the budget the plan spends before the next one:
//!
//! ```text
//!  observed x_t (17) ─┐
//!  spend share d_t x T ─┼─► normalise ─► Linear ─ relu ─ Linear ─ relu ─ Linear ─► alpha_t / CPA
//!  ln(budget / CPA) ───┘
//!  d_t = budget_left(observed, t) - budget_left(plan, t + 1), clamped to [0, budget_left(t)]
//! ```
//!
//! Trained by `nann::tar::train::train_inverse_dynamics` (feature `train`)
//! on `(x_t, cost_t / budget, ln(budget / CPA)) -> alpha_t / CPA` of every
//! logged tick with budget left; the day's own noise in `alpha` averages
//! out in the regression.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use super::data::SplitMix;
use super::model::{TarError, STEP_FEATURES};
use super::weights_file::{self, TensorFile};

/// Key prefix of the configuration in the weights file's metadata.
const METADATA_PREFIX: &str = "nann.tar_inverse.";

/// Inputs of the model: the step features, the spend share (times the
/// ticks of a day, so 1 is even pacing) and `ln(budget / CPA)`.
pub const INVERSE_INPUTS: usize = STEP_FEATURES + 2;

/// The inverse-dynamics model: a 3-layer MLP over normalised inputs.
#[derive(Clone)]
pub struct InverseDynamics {
    hidden: usize,
    /// `norm.mean`, `norm.std`, `fc1.weight`, `fc1.bias`, `fc2.weight`,
    /// `fc2.bias`, `out.weight`, `out.bias`, in [`tensor_shapes`] order.
    tensors: Vec<Vec<f32>>,
}

impl fmt::Debug for InverseDynamics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InverseDynamics")
            .field("hidden", &self.hidden)
            .finish_non_exhaustive()
    }
}

/// Every tensor with its shape, in file order (linear layers `[out, in]`).
pub fn tensor_shapes(hidden: usize) -> Vec<(String, Vec<usize>)> {
    let n = INVERSE_INPUTS;
    vec![
        ("norm.mean".into(), vec![n]),
        ("norm.std".into(), vec![n]),
        ("fc1.weight".into(), vec![hidden, n]),
        ("fc1.bias".into(), vec![hidden]),
        ("fc2.weight".into(), vec![hidden, hidden]),
        ("fc2.bias".into(), vec![hidden]),
        ("out.weight".into(), vec![1, hidden]),
        ("out.bias".into(), vec![1]),
    ]
}

fn check_hidden(hidden: usize) -> Result<(), TarError> {
    if hidden == 0 || hidden > 4096 {
        return Err(TarError::Config {
            field: "hidden",
            message: format!("{hidden} is not in 1..=4096"),
        });
    }
    Ok(())
}

impl InverseDynamics {
    /// Hidden width of the default model.
    pub const DEFAULT_HIDDEN: usize = 64;

    /// A model with random weights (He-scaled) and identity normalisation:
    /// the trainer's starting point and the tests' subject.
    pub fn random(hidden: usize, seed: u64) -> Result<Self, TarError> {
        check_hidden(hidden)?;
        let mut rng = SplitMix::new(seed);
        let tensors = tensor_shapes(hidden)
            .iter()
            .map(|(name, shape)| {
                let len: usize = shape.iter().product();
                match name.as_str() {
                    "norm.mean" => vec![0.0; len],
                    "norm.std" => vec![1.0; len],
                    n if n.ends_with(".bias") => vec![0.0; len],
                    _ => {
                        let scale = (2.0 / shape[1] as f32).sqrt();
                        (0..len)
                            .map(|_| (rng.uniform() as f32 * 2.0 - 1.0) * scale * 1.7)
                            .collect()
                    }
                }
            })
            .collect();
        Ok(Self { hidden, tensors })
    }

    /// A model from tensors in [`tensor_shapes`] order; checks their
    /// lengths, that they are finite, and that the stds are positive.
    pub fn from_tensors(hidden: usize, tensors: Vec<Vec<f32>>) -> Result<Self, TarError> {
        check_hidden(hidden)?;
        let shapes = tensor_shapes(hidden);
        if tensors.len() != shapes.len() {
            return Err(TarError::Format(format!(
                "{} tensors given, the model has {}",
                tensors.len(),
                shapes.len()
            )));
        }
        for ((name, shape), data) in shapes.iter().zip(&tensors) {
            let len: usize = shape.iter().product();
            if data.len() != len {
                return Err(TarError::Shape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: vec![data.len()],
                });
            }
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(TarError::Format(format!(
                    "tensor `{name}` holds a non-finite value at {i}"
                )));
            }
            if name == "norm.std" && data.iter().any(|&s| s <= 0.0) {
                return Err(TarError::Format(
                    "tensor `norm.std` holds a value <= 0".into(),
                ));
            }
        }
        Ok(Self { hidden, tensors })
    }

    /// Parses a weights file written by [`to_safetensors`](Self::to_safetensors);
    /// a damaged or hostile file gives a typed error, never a panic.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, TarError> {
        let file = TensorFile::parse(bytes)?;
        let meta = file.metadata();
        let get = |k: &'static str| {
            meta.get(&format!("{METADATA_PREFIX}{k}"))
                .ok_or(TarError::Config {
                    field: k,
                    message: "missing from the file's metadata (not an inverse-dynamics file?)"
                        .into(),
                })
        };
        if get("version")? != "1" {
            return Err(TarError::Config {
                field: "version",
                message: "this build reads version 1".into(),
            });
        }
        let hidden_text = get("hidden")?;
        let hidden = hidden_text
            .trim()
            .parse::<usize>()
            .map_err(|e| TarError::Config {
                field: "hidden",
                message: format!("`{hidden_text}` is not an integer: {e}"),
            })?;
        check_hidden(hidden)?;
        let tensors = file.read(&tensor_shapes(hidden))?;
        Self::from_tensors(hidden, tensors)
    }

    /// Loads a weights file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TarError> {
        Self::from_safetensors(&weights_file::read_file(path.as_ref())?)
    }

    /// The model as a safetensors file.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, TarError> {
        let mut meta = HashMap::new();
        meta.insert(format!("{METADATA_PREFIX}version"), "1".to_string());
        meta.insert(format!("{METADATA_PREFIX}hidden"), self.hidden.to_string());
        weights_file::to_bytes(&self.tensors(), meta)
    }

    /// Saves the model atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), TarError> {
        weights_file::save_atomic(path.as_ref(), &self.to_safetensors()?)
    }

    /// Hidden width.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Every tensor with its name and shape, in file order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        tensor_shapes(self.hidden)
            .into_iter()
            .zip(&self.tensors)
            .map(|((name, shape), data)| (name, shape, data.as_slice()))
            .collect()
    }

    /// The raw inputs of one tick: the observed step `x_t` (raw
    /// [`step_features`](super::data::step_features)), the share of the
    /// budget to spend in the tick, the day's ticks and `ln(budget / CPA)`.
    pub fn inputs(
        x_t: &[f32; STEP_FEATURES],
        spend_share: f32,
        ticks: usize,
        log_budget_cpa: f32,
    ) -> [f32; INVERSE_INPUTS] {
        let mut v = [0.0; INVERSE_INPUTS];
        v[..STEP_FEATURES].copy_from_slice(x_t);
        v[STEP_FEATURES] = spend_share * ticks as f32;
        v[STEP_FEATURES + 1] = log_budget_cpa;
        v
    }

    /// The predicted `alpha_t / CPA target` for raw `inputs` (see
    /// [`inputs`](Self::inputs)). Not finite only if an input is not or a
    /// weight is extreme enough to overflow (a damaged file that still
    /// parses): [`TarPolicy`](super::TarPolicy) counts such a decision as
    /// failed and bids the CPA target.
    pub fn predict(&self, inputs: &[f32; INVERSE_INPUTS]) -> f32 {
        let h = self.hidden;
        let t = &self.tensors;
        let x: Vec<f32> = inputs
            .iter()
            .zip(&t[0])
            .zip(&t[1])
            .map(|((v, m), s)| (v - m) / s)
            .collect();
        let layer = |w: &[f32], b: &[f32], x: &[f32], relu: bool| -> Vec<f32> {
            w.chunks_exact(x.len())
                .zip(b)
                .map(|(row, b)| {
                    let y = row.iter().zip(x).map(|(w, x)| w * x).sum::<f32>() + b;
                    if relu {
                        y.max(0.0)
                    } else {
                        y
                    }
                })
                .collect()
        };
        let h1 = layer(&t[2], &t[3], &x, true);
        let h2 = layer(&t[4], &t[5], &h1, true);
        debug_assert_eq!(h2.len(), h);
        layer(&t[6], &t[7], &h2, false)[0]
    }
}
