//! BAR: bidding-aware retrieval (Liu et al., arXiv 2508.05206) served from a
//! nann index.
//!
//! A user request is scored against ads by a neural model whose ad side is
//! precomputed (the HNSW vector `z_a` and the ad's raw feature tokens, stored
//! as the entry's payload) and whose user side is computed once per request.
//! The index proposes candidates with a plain L2 metric on `z_a`; the model
//! ranks them ([`Index::search_with`](crate::Index::search_with), NANN's beam
//! retrieval). When an ad's bids change, the near-line updater recomputes its
//! ad side and updates the entry in place while queries run.
//!
//! ```text
//!  offline            near-line (per bid event)         online (per request)
//!  ───────            ─────────────────────────         ────────────────────
//!  train (feature     AdFeatures ──► ad side ──► z_a    UserFeatures ──► user side
//!  `train`, candle)     item cate brand   │      tokens      │  z_u, K/V of the
//!      │                + 5 bid features  ▼        │         │  behaviour sequence
//!      ▼                        Index::update_with_payload   ▼
//!  weights.safetensors ───────────────────────────────► BarScorer ◄── CandidateBatch
//!   (config in its metadata)                            (z_a, tokens) per candidate
//! ```
//!
//! # The model (inference in [`model`], training in `train`)
//!
//! Notation: `E` = `emb_dim`, `D` = `d_model`, `A` = `d_attn`, `H` =
//! `head_hidden`, `L` = `max_seq_len`, `F` = number of user fields, `T` =
//! number of ad tokens (8 with bid features, 3 without). `Linear(x)` is
//! `W x + b` with `W` stored `[out, in]` (the PyTorch / candle convention).
//! `relu` between the layers of every two-layer network, none after the last.
//!
//! **User side** (once per request):
//! * `z_u = user_net.1(relu(user_net.0(concat_i emb.user.i[field_i])))`, in R^D.
//! * sequence tokens `s_t = concat(emb.item[item_t], emb.cate[cate_t])` in
//!   R^{2E}, `t < L`; positions with `item_t == 0` are padding and are masked.
//! * precomputed: `K1 = seq_attn.k(s)`, `V1 = seq_attn.v(s)`, `K2 =
//!   ctr_attn.k(s)`, `V2 = ctr_attn.v(s)`, and the `z_u` columns of every
//!   projection that reads `z_ua`.
//!
//! **Ad side** (near-line, once per ad version):
//! * tokens (ids): `[item, cate, brand, bid_type, bucket(log1p(bid_constraint)),
//!   bucket(budget_left_ratio), bucket(time_left_ratio),
//!   bucket(log1p(default_bid_value))]`, see [`features`]; without bid
//!   features only the first three. These ids are the index payload.
//! * `t_j` = the token's embedding in its table (`emb.item`, `emb.cate`,
//!   `emb.brand`, `emb.bid_type`, `emb.bid_constraint`, `emb.budget_left`,
//!   `emb.time_left`, `emb.default_bid`), in R^E.
//! * `z_a = ad_net.1(relu(ad_net.0(concat_j t_j)))`, in R^D: the HNSW vector.
//!
//! **Interaction** (per candidate, given `z_a` and the tokens):
//! * `attend(q, K, V, mask) = sum_t softmax_t(q . K_t / sqrt(A)) V_t` over the
//!   unmasked positions; with no unmasked position it is the zero vector.
//! * `z_seq = attend(seq_attn.q(z_a), K1, V1)`, in R^D.
//! * `z_ua = concat(z_u, z_seq, z_a)`, in R^{3D}.
//! * pCTR head: `q2 = ctr_attn.q(z_ua)`; `c = attend(q2, K2, V2)`;
//!   `h_ctr = relu(ctr_mlp.0(concat(c, q2)))` in R^H;
//!   `pctr = sigmoid(ctr_mlp.1(h_ctr))`.
//! * pBid head: `q3 = bid_attn.q(z_ua)`; `b = attend(q3, bid_attn.k(t),
//!   bid_attn.v(t))` over the T ad tokens (none masked);
//!   `h_bid = relu(bid_mlp.0(concat(b, q3)))` in R^H;
//!   `pbid_ratio = bid_mlp.1(h_bid)` (pBid / aBid, no activation).
//! * eCPM head: `p = ecpm.proj(z_ua)` in R^H;
//!   `score = ecpm_mlp.1(relu(ecpm_mlp.0(concat(h_ctr, h_bid, p))))`: the
//!   retrieval score (higher is better).
//!
//! # Tensors (all f32, little-endian, in one safetensors file)
//!
//! | name | shape |
//! |---|---|
//! | `emb.user.{i}` for each user field i | `[user_field_vocab[i], E]` |
//! | `emb.item`, `emb.cate`, `emb.brand` | `[item_vocab, E]`, `[cate_vocab, E]`, `[brand_vocab, E]` |
//! | `emb.bid_type` (bid features only) | `[bid_type_vocab, E]` |
//! | `emb.bid_constraint`, `emb.budget_left`, `emb.time_left`, `emb.default_bid` (bid features only) | `[buckets, E]` each |
//! | `user_net.0.weight` / `.bias` | `[user_hidden, F*E]` / `[user_hidden]` |
//! | `user_net.1.weight` / `.bias` | `[D, user_hidden]` / `[D]` |
//! | `ad_net.0.weight` / `.bias` | `[ad_hidden, T*E]` / `[ad_hidden]` |
//! | `ad_net.1.weight` / `.bias` | `[D, ad_hidden]` / `[D]` |
//! | `seq_attn.q`, `seq_attn.k`, `seq_attn.v` (`.weight` / `.bias`) | `[A, D]`, `[A, 2E]`, `[D, 2E]` / `[A]`, `[A]`, `[D]` |
//! | `ctr_attn.q`, `ctr_attn.k`, `ctr_attn.v` | `[A, 3D]`, `[A, 2E]`, `[A, 2E]` (+ biases `[A]`) |
//! | `ctr_mlp.0`, `ctr_mlp.1` | `[H, 2A]`, `[1, H]` (+ biases `[H]`, `[1]`) |
//! | `bid_attn.q`, `bid_attn.k`, `bid_attn.v` | `[A, 3D]`, `[A, E]`, `[A, E]` (+ biases `[A]`) |
//! | `bid_mlp.0`, `bid_mlp.1` | `[H, 2A]`, `[1, H]` (+ biases) |
//! | `ecpm.proj` | `[H, 3D]` (+ bias `[H]`) |
//! | `ecpm_mlp.0`, `ecpm_mlp.1` | `[H, 3H]`, `[1, H]` (+ biases) |
//!
//! The configuration ([`BarConfig`]) is stored in the file's metadata, one
//! `nann.bar.<field>` entry per field, so a weights file describes itself.

mod bar_scorer;
pub mod config;
mod error;
pub mod features;
pub mod market;
pub mod metrics;
pub mod model;
pub mod nearline;
#[cfg(feature = "train")]
pub mod train;

pub use bar_scorer::BarScorer;
pub use config::BarConfig;
pub use error::ModelError;
pub use features::{AdFeatures, AdTokens, BidFeatures, UserFeatures};
pub use model::{AdSide, BarModel, Heads, UserState};
