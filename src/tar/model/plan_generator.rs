//! [`PlanGenerator`]: a TAR model's generation behind a trait, so one
//! bidder ([`TarPolicy`](crate::tar::TarPolicy)) can plan on the CPU
//! ([`TarModel`]) or on a CUDA device (`nann::cuda::GpuTarModel`, feature
//! `cuda`) without knowing which.
//!
//! It exists for issue 7's latency target (a decision within 2 ms at batch
//! 1 on the H200): the policy keeps its [`TarModel`] for everything cheap
//! (normalisation, the condition vector, the configuration) and hands the
//! one expensive call, [`generate`](PlanGenerator::generate), to whichever
//! generator it was given
//! ([`TarPolicy::with_generator`](crate::tar::TarPolicy::with_generator)).

use std::fmt;
use std::sync::Arc;

use super::config::TarConfig;
use super::error::TarError;
use super::inference::{GenerateOptions, Generated, TarModel};
use crate::tar::data::SplitMix;

/// Generates a day's plan (a trajectory) from a TAR model: the contract of
/// [`TarModel::generate`], which every implementation follows.
///
/// * The same inputs: `y` is [`TarModel::condition`]'s vector, `history`
///   the `n_hist x F` observed normalised steps (`n_hist` in `0..=T`);
///   rejected inputs are [`TarError::Input`], as the CPU model's.
/// * The same draws: one `rng.uniform()` per token, in token order (none
///   without quantisation), so that given the same logits every
///   implementation samples the same codes and leaves `rng` in the same
///   state.
/// * The same output shape: [`Generated`] for [`config`](Self::config),
///   `x_hat` of `T x F`.
///
/// An implementation holds *one* model's weights; a bidder that uses it in
/// place of its [`TarModel`] needs it built from that same model (e.g.
/// `GpuTarModel::new(&model, device)`). Failures of the implementation
/// itself (a device error) are [`TarError::Backend`].
///
/// `Send + Sync` (a policy is moved to worker threads and generators are
/// shared behind an `Arc`) and `Debug` (policies print theirs).
pub trait PlanGenerator: Send + Sync + fmt::Debug {
    /// Where it runs, for reports and errors: `"cpu"`, `"cuda"`.
    fn backend(&self) -> &'static str;

    /// The configuration of the model it generates with.
    fn config(&self) -> &TarConfig;

    /// Generates a trajectory as [`TarModel::generate`] does (see the
    /// trait's contract).
    fn generate(
        &self,
        y: &[f32],
        history: &[f32],
        opts: &GenerateOptions,
        rng: &mut SplitMix,
    ) -> Result<Generated, TarError>;
}

/// The CPU reference: [`TarModel::generate`].
impl PlanGenerator for TarModel {
    fn backend(&self) -> &'static str {
        "cpu"
    }

    fn config(&self) -> &TarConfig {
        TarModel::config(self)
    }

    fn generate(
        &self,
        y: &[f32],
        history: &[f32],
        opts: &GenerateOptions,
        rng: &mut SplitMix,
    ) -> Result<Generated, TarError> {
        TarModel::generate(self, y, history, opts, rng)
    }
}

/// A generator held to the configuration of the model it stands in for: a
/// generator built from a model of another configuration, or one whose
/// output has the wrong shape, fails each call with
/// [`TarError::Backend`] instead of handing the caller a plan it would
/// index out of bounds.
#[derive(Debug)]
pub(crate) struct Matched {
    inner: Arc<dyn PlanGenerator>,
    /// Why `inner` does not fit, if it does not.
    mismatch: Option<String>,
    /// `T x F` of the expected configuration.
    x_hat_len: usize,
}

impl Matched {
    /// `inner`, checked against `config` (once, here).
    pub(crate) fn new(inner: Arc<dyn PlanGenerator>, config: &TarConfig) -> Self {
        let mismatch = (inner.config() != config).then(|| {
            format!(
                "it was built from a model of another configuration ({:?}) than the policy's \
                 ({config:?}); build it from the policy's own TarModel",
                inner.config()
            )
        });
        Self {
            inner,
            mismatch,
            x_hat_len: config.steps * config.step_features,
        }
    }
}

impl PlanGenerator for Matched {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn config(&self) -> &TarConfig {
        self.inner.config()
    }

    fn generate(
        &self,
        y: &[f32],
        history: &[f32],
        opts: &GenerateOptions,
        rng: &mut SplitMix,
    ) -> Result<Generated, TarError> {
        let backend = self.inner.backend();
        if let Some(message) = &self.mismatch {
            return Err(TarError::Backend {
                backend,
                message: message.clone(),
            });
        }
        let g = self.inner.generate(y, history, opts, rng)?;
        if g.x_hat.len() != self.x_hat_len {
            return Err(TarError::Backend {
                backend,
                message: format!(
                    "it returned a plan of {} values; the model's is {}",
                    g.x_hat.len(),
                    self.x_hat_len
                ),
            });
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A generator that returns a plan of the wrong length.
    #[derive(Debug)]
    struct Short(TarModel);

    impl PlanGenerator for Short {
        fn backend(&self) -> &'static str {
            "test"
        }
        fn config(&self) -> &TarConfig {
            self.0.config()
        }
        fn generate(
            &self,
            y: &[f32],
            history: &[f32],
            opts: &GenerateOptions,
            rng: &mut SplitMix,
        ) -> Result<Generated, TarError> {
            let mut g = self.0.generate(y, history, opts, rng)?;
            g.x_hat.pop();
            Ok(g)
        }
    }

    fn small(steps: usize) -> TarConfig {
        TarConfig {
            steps,
            scales: vec![1, steps],
            d_model: 8,
            heads: 2,
            blocks: 1,
            vae_dim: 8,
            codebook_size: 8,
            ..TarConfig::default()
        }
    }

    #[test]
    fn the_cpu_generator_is_the_models_generate() {
        let model = TarModel::random(small(6), 1).unwrap();
        let y = model.condition(Some(&[0.8, 0.95, 0.9, 3.5]));
        let opts = GenerateOptions::default();
        let (mut a, mut b) = (SplitMix::new(3), SplitMix::new(3));
        let want = model.generate(&y, &[], &opts, &mut a).unwrap();
        let generator: &dyn PlanGenerator = &model;
        assert_eq!(generator.generate(&y, &[], &opts, &mut b).unwrap(), want);
        assert_eq!(a.next_u64(), b.next_u64());
        assert_eq!(generator.backend(), "cpu");
        let matched = Matched::new(Arc::new(model.clone()), model.config());
        let mut c = SplitMix::new(3);
        assert_eq!(matched.generate(&y, &[], &opts, &mut c).unwrap(), want);
    }

    #[test]
    fn a_generator_that_does_not_fit_is_a_typed_error() {
        let model = TarModel::random(small(6), 1).unwrap();
        let other = TarModel::random(small(8), 1).unwrap();
        let y = model.condition(None);
        let opts = GenerateOptions::default();
        let mut rng = SplitMix::new(1);
        let matched = Matched::new(Arc::new(other), model.config());
        let e = matched.generate(&y, &[], &opts, &mut rng).unwrap_err();
        assert!(
            matches!(&e, TarError::Backend { backend: "cpu", message } if message.contains("configuration")),
            "{e}"
        );
        let short = Matched::new(Arc::new(Short(model.clone())), model.config());
        let e = short.generate(&y, &[], &opts, &mut rng).unwrap_err();
        assert!(
            matches!(
                e,
                TarError::Backend {
                    backend: "test",
                    ..
                }
            ),
            "{e}"
        );
        // Input errors pass through as the model's own.
        let fit = Matched::new(Arc::new(model.clone()), model.config());
        let e = fit.generate(&y[..1], &[], &opts, &mut rng).unwrap_err();
        assert!(matches!(e, TarError::Input { input: "y", .. }), "{e}");
    }
}
