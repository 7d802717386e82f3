//! Training the trajectory models with candle on CPU (feature `train`):
//! the TAR model ([`train_tar`]) and the Decision-Transformer baseline ([`dt`]),
//! on a [`Dataset`](super::data::Dataset) of simulated days. Each trainer
//! holds one candle variable per tensor of the model's weights file (same
//! names, same shapes) and exports the CPU model directly; its forward pass
//! matches the CPU inference within 1e-4 (tested).

pub mod dt;
pub mod inverse;
mod tar_train;

pub use tar_train::{train_tar, CandleTar, Quantization, TarTrainConfig, TarTrainReport};

use super::model::TarError;

/// Everything training can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// candle reported an error (a shape bug in the trainer: report it).
    #[error("candle: {0}")]
    Candle(String),
    /// The model could not be built or exported.
    #[error(transparent)]
    Model(#[from] TarError),
    /// A training option is out of range.
    #[error("training configuration `{field}`: {message}")]
    Config {
        /// The option.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The dataset cannot train this model (empty, wrong trajectory length).
    #[error("training data: {0}")]
    Data(String),
    /// The loss became NaN or infinite.
    #[error("the loss diverged at step {step}: {loss}")]
    Diverged {
        /// The optimisation step.
        step: usize,
        /// The loss value.
        loss: f32,
    },
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Candle(e.to_string())
    }
}
