//! The Decision-Transformer baseline (Chen et al. 2021; AuctionNet's DT,
//! `models.md` §5): a small causal transformer over the last `K` steps of
//! (return-to-go, state, action) that predicts the next bid coefficient.
//!
//! * [`DtModel`]: weights (safetensors, `nann.dt.*` metadata) and the CPU
//!   forward pass with the crate's f32 kernels.
//! * [`DtPolicy`]: the model as a [`Policy`](crate::tar::sim::Policy) for
//!   the simulator.
//! * Training: `nann::tar::train::dt` (feature `train`, candle on CPU).
//!
//! One decision is one forward pass over at most 30 tokens: about 0.12 ms
//! on one core of the development machine (`tests/tar_dt.rs`,
//! `policy_latency_per_decision`; the TAR summary reports 2.6 ms per step
//! for DT, on unknown hardware and software).
//!
//! # Tokens
//!
//! A day is a sequence of steps `t = 0..T`; step `t` contributes three
//! tokens, the model sees the last `K` steps (default 10, so 30 tokens):
//!
//! ```text
//!  window: the last n = min(K, t + 1) steps, ticks t0 = t - n + 1 ..= t
//!
//!  token index:  0     1     2     3       4       5       ...  3n-3  3n-2
//!  token:        R_t0  s_t0  a_t0  R_t0+1  s_t0+1  a_t0+1  ...  R_t   s_t   (a_t: predicted)
//!                 │     │     │
//!  embedding:    Linear_rtg(R / rtg_scale), Linear_state((s - mean) / std), Linear_action(a)
//!                + embed.time[tick of the token's step]  ─►  embed.ln
//!                 │
//!                 ▼
//!  blocks x 3:   u += Attn(LN1(u)), causal: token i attends to tokens j <= i
//!                u += fc2(gelu(fc1(LN2(u))))
//!                 │
//!                 ▼
//!  output:       â_tau = head(ln_f(u at token s_tau)) for every step tau of the window
//!                alpha_t = â_t x CPA (the policy), MSE(â_tau, a_tau) (training)
//! ```
//!
//! * `R_t` (return-to-go) is in *efficiency* units: `R_t = (sum over tau >=
//!   t of conversions_tau) x CPA / budget` ([`returns_to_go`]), so a day's
//!   `R_0` is its conversions per conversion the budget buys at the target
//!   CPA: the first [data attribute](crate::tar::data::attributes) of a day
//!   that respects its CPA. It is divided by the stored constant
//!   `norm.rtg_scale` (the training days' mean `R_0`).
//! * `s_t` are the first 16 of [`step_features`](crate::tar::data::step_features)
//!   (scale-free), normalised with the stored `norm.s_mean`, `norm.s_std`
//!   (fitted on the training data). The 17th feature (the previous action)
//!   is left out: it is the previous step's action token.
//! * `a_t = alpha_t / CPA`, raw (it is already of order 1).
//! * The action is read from the state token `s_t` (which sees `R_t`, `s_t`
//!   and the earlier steps, never `a_t`) by a plain linear head: no `tanh`
//!   or softplus, so the output is unbounded and the policy clamps it to
//!   `[0, 10]` (alpha in `[0, 10 x CPA]`). A bounded output would cap the
//!   bids at an arbitrary level and flatten the gradient near it.
//! * The timestep embedding is indexed by the absolute tick (`0..max_steps`),
//!   not by the position in the window; there is no other position
//!   embedding (as in DT).
//!
//! # Day start and training windows
//!
//! At decision time the window is the last `min(K, t + 1)` steps: a
//! shorter context at the start of the day, no padding. Training samples
//! windows whose first step is uniform in `-(K-1) ..= T-1` (so every step
//! is covered by `K` windows, including the day's first and last ones),
//! keeps their steps inside the day and left-pads them to `K` steps; padded
//! tokens are masked as attention keys (their softmax weight is exactly 0)
//! and as loss positions, so a padded window computes exactly what the CPU
//! model computes on the shorter context. The loss is the mean squared
//! error of `â_t` against `a_t` over every real step of the window.
//!
//! # Equations (CPU and trainer)
//!
//! `Linear(x) = x W^T + b`, `W` stored `[out, in]`. LayerNorm eps `1e-5`
//! (biased variance). Block `b`: `u += Attn(LN1(u))`, `u += fc2(gelu(fc1(
//! LN2(u))))`, `Attn` with `H` heads of width `D / H` (consecutive column
//! blocks), `softmax(q k^T / sqrt(D / H) + causal) v`, then `o`. `gelu` is
//! GPT-2's tanh approximation, computed as `x sigmoid(2 sqrt(2/pi) x (1 +
//! 0.044715 x^2))` (the same function).

mod config;
mod model;
mod policy;

pub use config::{DtConfig, STATE_FEATURES};
pub use model::DtModel;
#[cfg(feature = "train")]
pub(crate) use model::{GELU_SCALE, LN_EPS};
pub use policy::{DtPolicy, MAX_ALPHA_FACTOR};

use crate::tar::data::Dataset;

/// Returns-to-go of a day in efficiency units: `out[t] = (sum over tau >=
/// t of rewards[tau]) x CPA / budget` (0 where the budget is not positive).
pub fn returns_to_go(rewards: &[f32], budget: f64, cpa_target: f64) -> Vec<f32> {
    let k = if budget > 0.0 && cpa_target.is_finite() {
        cpa_target / budget
    } else {
        0.0
    };
    let mut out = vec![0f32; rewards.len()];
    let mut acc = 0f64;
    for (o, &r) in out.iter_mut().zip(rewards).rev() {
        acc += r as f64;
        *o = (acc * k) as f32;
    }
    out
}

/// The `q`-quantile (`0..=1`) of the days' total returns `R_0` (efficiency
/// units, no CPA penalty) over `data`'s trajectories: a target for
/// [`DtPolicy`] (0 for an empty set).
pub fn day_return_quantile(data: &Dataset, q: f64) -> f32 {
    let mut v: Vec<f32> = data
        .trajectories
        .iter()
        .map(|t| returns_to_go(&t.rewards, t.budget, t.cpa_target))
        .filter_map(|r| r.first().copied())
        .filter(|r| r.is_finite())
        .collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f32::total_cmp);
    let q = if q.is_nan() { 0.5 } else { q.clamp(0.0, 1.0) };
    let at = ((v.len() - 1) as f64 * q).round() as usize;
    v[at]
}
