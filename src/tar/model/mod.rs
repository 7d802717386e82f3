//! The TAR model (Trajectory Auto-Regressive bidding): a multi-scale
//! residual VQ-VAE over augmented state trajectories and a scale-level
//! causal transformer that generates them coarse to fine.
//!
//! TAR treats a day of bidding as a sequence of `T` augmented steps
//! `x_t = [s_t ; a_{t-1}]` (the 16 state features and the previous bid
//! coefficient, normalised): *state-action fusion*, so the generated
//! trajectory carries its own actions. A VQ-VAE compresses the day into
//! tokens at `K` time scales (default 1, 4, 12, 48: day, 6 h, 2 h, 30 min);
//! a transformer generates the tokens scale by scale, conditioned on the
//! day's attributes (target score, budget, CPA target) and on the steps
//! observed so far; at decision time the next action is read from the
//! generated trajectory.
//!
//! This module is the CPU inference and the reference the trainer
//! (`nann::tar::train`, feature `train`) is checked against; the equations
//! below are the contract both implement. [`PlanGenerator`] is generation
//! behind a trait, so a bidder can run it on the CPU or, with feature
//! `cuda`, on a GPU (`nann::cuda::GpuTarModel`).
//!
//! # Data flow
//!
//! ```text
//!  training:   x (T x F) ─► encoder ─► f (T x C) ─► residual VQ over K scales ─► tokens, fhat
//!                                                                                  │
//!                                        x_hat (T x F) ◄─ decoder ◄────────────────┘
//!
//!  decision at tick t:
//!   attributes y ─► cond MLP ─► c ──────────────► AdaLN of every block and the head
//!                └► attr tokens ┐
//!   observed x_0..x_t ─► hist tokens ┴─► memory M (cross-attention keys)
//!   start ─► [scale 1] ─► logits ─► top-p ─► codes ─► fhat += phi(up(codebook[codes]))
//!            [scale 2] ◄── word(down(fhat)) ◄────────────────────────────────┘  (K passes,
//!             ...                                                               KV-cached)
//!   fhat ─► decoder ─► x_hat ─► action a_t = x_hat[t + 1][ACTION_SLOT] (denormalised)
//! ```
//!
//! # The equations
//!
//! Notation: `F` step features (17), `T` steps, `C` code channels, `V`
//! codebook entries, `E` VAE width, `D` generator width, `l_k` the length of
//! scale `k` (`k = 0..K`), `L = sum l_k`. `Linear(x) = x W^T + b` with `W`
//! stored `[out, in]`. All LayerNorms use eps `1e-5`; `gelu` is the tanh
//! approximation `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`;
//! `silu(x) = x sigmoid(x)`.
//!
//! **Attention** `Attn_p(Q_in, KV_in, mask)` with projections `p.{q,k,v,o}`
//! and `H` heads of width `h = width / H`: `q = Linear_q(Q_in)`,
//! `k = Linear_k(KV_in)`, `v = Linear_v(KV_in)`, split into heads by
//! consecutive column blocks of width `h`; per head `softmax(q k^T / sqrt(h)
//! + mask) v`; heads concatenated in order; `Linear_o`. `mask` is 0 or
//! `-inf` (never a whole row of `-inf`).
//!
//! **Plain block** (VQ-VAE, prefix `p`, heads `vae_heads`, no mask):
//! `u = u + Attn_{p.attn}(LN_{p.ln1}(u), LN_{p.ln1}(u))`;
//! `u = u + fc2(gelu(fc1(LN_{p.ln2}(u))))` with `p.mlp.fc1`, `p.mlp.fc2`.
//!
//! **Encoder**: `u = Linear_{enc.in}(x) + enc.pos`; plain block `enc.block`;
//! `f = Linear_{enc.out}(LN_{enc.ln}(u))` (`T x C`).
//!
//! **Decoder**: the same with `dec.*` from `fhat` (`T x C`) to `x_hat`
//! (`T x F`).
//!
//! **Resampling.** `down(u, n)`: bin `i` of `n` is the mean of rows
//! `floor(i T / n) .. ceil((i + 1) T / n)` (adaptive average pooling).
//! `up(u, T)` from `n` rows: row `i` is `(1 - w) u[i0] + w u[i1]` with
//! `src = max((i + 0.5) n / T - 0.5, 0)`, `i0 = floor(src)`,
//! `i1 = min(i0 + 1, n - 1)`, `w = src - i0` (linear, align_corners false;
//! `n = 1` broadcasts, `n = T` is the identity).
//!
//! **Refinement** `phi(u) = 0.5 u + 0.5 Attn_{quant.phi}(u, u)` (one head of
//! width `C`, shared by all scales): TAR's self-attention in place of VAR's
//! convolution.
//!
//! **Residual quantisation** of `f`: `rest = f`, `fhat = 0`; for each scale
//! `k`: `z_k = down(rest, l_k)`; with `quantize`, `idx_k[i] = argmin_j
//! ||z_k[i] - codebook[j]||^2` (ties to the lowest `j`) and `h_k =
//! codebook[idx_k]`, without it (`tar_no_vq`) `h_k = z_k`; then `r =
//! phi(up(h_k, T))`, `fhat += r`, `rest -= r`.
//!
//! **Generator.** Attributes `y` (`attr_dim = 4`: three normalised
//! attributes and a present flag; all 0 = no condition).
//! `c = Linear_{gen.cond.fc2}(silu(Linear_{gen.cond.fc1}(y)))`;
//! attribute tokens `Linear_{gen.attr}(y)` reshaped to `attr_tokens x D`
//! (row-major); history tokens `Linear_{gen.hist}(x_tau) + gen.hist_pos[tau]`
//! for the observed steps `tau = 0..n_hist` (`n_hist` may be 0); memory
//! `M = [attr tokens ; history tokens]`.
//! Token inputs: scale 0: every one of its `l_0` tokens is `c + gen.start`;
//! scale `k >= 1`: `Linear_{gen.word}(down(fhat_{<k}, l_k))` where
//! `fhat_{<k} = sum_{j<k} phi(up(h_j, T))`. Every token `i` (global index
//! over all scales) adds `gen.pos[i] + gen.level[scale(i)]`.
//! Block `b` (prefix `p = gen.blocks.b`), `g1, g2, s1, s2, b1, b2` = the six
//! consecutive `D`-chunks of `Linear_{p.ada}(silu(c))`, `LN0` = LayerNorm
//! without affine:
//! `u = u + g1 * Attn_{p.attn}(LN0(u)(1 + s1) + b1, same, block-causal)`;
//! `u = u + Attn_{p.cross}(LN_{p.cross_ln}(u), M)`;
//! `u = u + g2 * fc2(gelu(fc1(LN0(u)(1 + s2) + b2)))`.
//! Block-causal: token `i` sees token `j` iff `scale(j) <= scale(i)`.
//! Head: `(s, b)` = the two `D`-chunks of `Linear_{gen.head_ada}(silu(c))`;
//! `out = Linear_{gen.head}(LN0(u)(1 + s) + b)`: `V` logits, or `C` values
//! (the regressed `h_k`) without `quantize`.
//!
//! **Generation**: for `k = 0..K`, run the blocks on scale `k`'s tokens only
//! (keys and values of earlier scales cached), sample `idx_k` per token by
//! top-p (softmax at a temperature, keep the most probable entries until
//! their mass reaches `p`, the top one always, renormalise, draw), then
//! accumulate `fhat` as in quantisation; finally `x_hat = decoder(fhat)`.
//!
//! **Normalisation.** Step features are normalised `(x - norm.x_mean) /
//! norm.x_std`, attributes `(y - norm.attr_mean) / norm.attr_std` before the
//! flag is appended; both stats are stored in the weights file so a loaded
//! model is self-contained.

mod config;
mod error;
mod generator;
mod inference;
mod nn;
mod plan_generator;
mod sample;
mod weights;

pub use config::{TarConfig, ACTION_SLOT, ATTRIBUTES, STEP_FEATURES};
pub use error::TarError;
#[cfg(feature = "cuda")]
pub(crate) use inference::{check_condition, check_matrix};
pub use inference::{GenerateOptions, Generated, Quantized, TarModel};
pub(crate) use plan_generator::Matched;
pub use plan_generator::PlanGenerator;
