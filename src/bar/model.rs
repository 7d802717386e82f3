//! BAR inference on a CPU: weights, the user side (once per request), the ad
//! side (once per ad version) and the batched interaction (per candidate).
//!
//! The forward pass is exactly the one the [module docs](super) define; this
//! file computes it in a rearranged but algebraically equal way so that the
//! per-candidate work is a handful of small matrix products over blocks of
//! [`BLOCK`] candidates:
//!
//! ```text
//!  user side (per request)                 interaction (per block of candidates)
//!  ───────────────────────                 ─────────────────────────────────────
//!  z_u ──► q_user = S_u z_u + b_S  ──────► Q = q_user + Z_a S_a^T + P1 (V1 S_s^T)   [q2 | q3 | e]
//!  s_t ──► K1/√A · W_q  (scores1 = Z_a M1^T + c1)   P1 = softmax(scores1)
//!      ──► V1 S_s^T     (z_seq is never formed)      P2 = softmax(q2 K2^T/√A)
//!      ──► K2/√A, V2 C_c^T                          h_ctr = relu(C_q q2 + P2 (V2 C_c^T) + b)
//!                                                    h_bid = relu(B_q q3 + B_b W_v t̄ + b'), t̄ = Σ_j p_j t_j
//!                                                    score = e1 · relu(e + E_h [h_ctr | h_bid]) + b
//! ```
//!
//! * `S_u`, `S_s`, `S_a` stack the `z_u`, `z_seq` and `z_a` column blocks of
//!   `ctr_attn.q`, `bid_attn.q` and `ecpm_mlp.0[:, 2H..3H] · ecpm.proj`
//!   (the eCPM projection `p` only ever feeds that one layer, so it is folded
//!   into it and never formed).
//! * Sequence attention: `q1 . K1_t = z_a . (W_q^T K1_t) + b_q . K1_t`, so
//!   the per-candidate scores are one product with a per-user matrix; and
//!   `z_seq` only feeds linear maps, so `S_s z_seq = P1 (V1 S_s^T)`.
//! * pBid attention: `q3 . (W_k t_j + b_k)` differs across tokens only by
//!   `(W_k^T q3) . t_j` (the `q3 . b_k` term is the same for every token and
//!   cancels in the softmax), and `b = W_v t̄ + b_v` because the weights sum
//!   to one.
//! * Each fold is taken only when it costs fewer multiply-adds (per user for
//!   the sequence ones, which depend on the sequence length), which also
//!   keeps every derived matrix no larger than the weights it comes from.
//!
//! Padded positions are dropped when the user state is built (a masked
//! softmax over the rest); with none left, `z_seq` and `c` are zero.
//! `tests/bar_model.rs` checks all of this against a straight per-candidate
//! implementation of the spec.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::config::BarConfig;
use super::error::ModelError;
use super::features::{token_vocab, AdFeatures, AdTokens, UserFeatures};
use crate::linalg::{self, dot, fill_rows, gemm_acc, relu_in_place, sigmoid};

/// Candidates per block of the batched interaction: large enough for the
/// matrix products to reach full speed, small enough that a block's
/// intermediate activations stay in the L1/L2 cache.
pub const BLOCK: usize = 64;

/// The ad token embedding tables, in token order (also the CUDA scorer's
/// upload order).
pub(crate) const AD_TABLES: [&str; 8] = [
    "emb.item",
    "emb.cate",
    "emb.brand",
    "emb.bid_type",
    "emb.bid_constraint",
    "emb.budget_left",
    "emb.time_left",
    "emb.default_bid",
];

/// The linear layers, in file order; each is `<name>.weight` `[out, in]`
/// and `<name>.bias` `[out]`.
const LAYERS: [&str; 20] = [
    "user_net.0",
    "user_net.1",
    "ad_net.0",
    "ad_net.1",
    "seq_attn.q",
    "seq_attn.k",
    "seq_attn.v",
    "ctr_attn.q",
    "ctr_attn.k",
    "ctr_attn.v",
    "ctr_mlp.0",
    "ctr_mlp.1",
    "bid_attn.q",
    "bid_attn.k",
    "bid_attn.v",
    "bid_mlp.0",
    "bid_mlp.1",
    "ecpm.proj",
    "ecpm_mlp.0",
    "ecpm_mlp.1",
];
const USER0: usize = 0;
const USER1: usize = 1;
const AD0: usize = 2;
const AD1: usize = 3;
const SEQ_Q: usize = 4;
const SEQ_K: usize = 5;
const SEQ_V: usize = 6;
const CTR_Q: usize = 7;
const CTR_K: usize = 8;
const CTR_V: usize = 9;
const CTR_MLP0: usize = 10;
const CTR_MLP1: usize = 11;
const BID_Q: usize = 12;
const BID_K: usize = 13;
const BID_V: usize = 14;
const BID_MLP0: usize = 15;
const BID_MLP1: usize = 16;
const ECPM_PROJ: usize = 17;
const ECPM0: usize = 18;
const ECPM1: usize = 19;

/// Identifies a model instance, so a [`UserState`] is never used with a
/// model other than the one that computed it.
static NEXT_MODEL_ID: AtomicU64 = AtomicU64::new(1);

fn overflow(what: &str) -> ModelError {
    ModelError::Config {
        key: format!("{}{what}", super::config::METADATA_PREFIX),
        message: "the dimensions' product overflows".into(),
    }
}

fn mul(a: usize, b: usize, what: &str) -> Result<usize, ModelError> {
    a.checked_mul(b).ok_or_else(|| overflow(what))
}

/// `(out, in)` of every layer of [`LAYERS`] under `c`.
fn layer_shapes(c: &BarConfig) -> Result<[(usize, usize); 20], ModelError> {
    let (e, d, a, h) = (c.emb_dim, c.d_model, c.d_attn, c.head_hidden);
    let e2 = mul(2, e, "emb_dim")?;
    let d3 = mul(3, d, "d_model")?;
    let a2 = mul(2, a, "d_attn")?;
    let h3 = mul(3, h, "head_hidden")?;
    Ok([
        (c.user_hidden, mul(c.user_field_vocab.len(), e, "emb_dim")?),
        (d, c.user_hidden),
        (c.ad_hidden, mul(c.ad_tokens(), e, "emb_dim")?),
        (d, c.ad_hidden),
        (a, d),
        (a, e2),
        (d, e2),
        (a, d3),
        (a, e2),
        (a, e2),
        (h, a2),
        (1, h),
        (a, d3),
        (a, e),
        (a, e),
        (h, a2),
        (1, h),
        (h, d3),
        (h, h3),
        (1, h),
    ])
}

/// Every tensor `c` needs, `(name, shape)`, in the canonical order of
/// [`BarModel::tensors`].
fn tensor_specs(c: &BarConfig) -> Result<Vec<(String, Vec<usize>)>, ModelError> {
    c.validate()?;
    tensor_shapes(c)
}

/// The tensors' names and shapes under `c`, without validating `c` (its
/// dimensions must be positive; products are checked).
pub(crate) fn tensor_shapes(c: &BarConfig) -> Result<Vec<(String, Vec<usize>)>, ModelError> {
    let mut specs = Vec::new();
    for (i, &vocab) in c.user_field_vocab.iter().enumerate() {
        specs.push((format!("emb.user.{i}"), vec![vocab, c.emb_dim]));
    }
    for (name, (_, vocab)) in AD_TABLES.iter().zip(token_vocab(c)).take(c.ad_tokens()) {
        specs.push((name.to_string(), vec![vocab, c.emb_dim]));
    }
    for (name, (out, inp)) in LAYERS.iter().zip(layer_shapes(c)?) {
        specs.push((format!("{name}.weight"), vec![out, inp]));
        specs.push((format!("{name}.bias"), vec![out]));
    }
    for (name, shape) in &specs {
        shape
            .iter()
            .try_fold(1usize, |acc, &s| acc.checked_mul(s))
            .ok_or_else(|| overflow(name))?;
    }
    Ok(specs)
}

/// One linear layer: the file's `[out, in]` weight, its transpose for the
/// kernels, and the bias.
#[derive(Clone)]
struct Layer {
    w: Vec<f32>,
    wt: Vec<f32>,
    b: Vec<f32>,
    out: usize,
    inp: usize,
}

impl Layer {
    fn new(w: Vec<f32>, b: Vec<f32>, out: usize, inp: usize) -> Self {
        let wt = linalg::transpose(&w, out, inp);
        Self { w, wt, b, out, inp }
    }

    /// Column `col` of row `row` of the `[out, in]` weight.
    fn at(&self, row: usize, col: usize) -> f32 {
        self.w[row * self.inp + col]
    }
}

/// How the pBid head turns the attended token embedding `t̄` into its
/// contribution to `h_bid`.
#[derive(Clone)]
enum TokenPath {
    /// `(B_b W_v)^T`, `[E, H]`: one product (taken when `H E <= A E + H A`).
    Folded(Vec<f32>),
    /// `b = t̄ W_v^T + b_v` (`[E, A]`), then `b B_b^T` (`[A, H]`).
    Direct { v_t: Vec<f32>, b_t: Vec<f32> },
}

/// Matrices derived from the weights once, at load time.
#[derive(Clone)]
struct Derived {
    /// `2A + H`: width of `Q = [q2 | q3 | e]`.
    w: usize,
    /// `[D, W]`: the `z_u` / `z_seq` / `z_a` column blocks of the stack.
    stack_u_t: Vec<f32>,
    stack_s_t: Vec<f32>,
    stack_a_t: Vec<f32>,
    /// `[W]`: `[ctr_attn.q.b ; bid_attn.q.b ; E_p b_p + ecpm_mlp.0.b]`.
    stack_b: Vec<f32>,
    /// `[A, H]`: the `c` and `q2` column blocks of `ctr_mlp.0`, transposed.
    ctr_c_t: Vec<f32>,
    ctr_q_t: Vec<f32>,
    /// `[A, E]`: `bid_attn.k.weight / sqrt(A)` (`q3 -> r = W_k^T q3 / sqrt(A)`).
    bid_r_t: Vec<f32>,
    /// `[A, H]`: the `q3` column block of `bid_mlp.0`, transposed.
    bid_q_t: Vec<f32>,
    token_path: TokenPath,
    /// `[2H]`: initial `[h_ctr | h_bid]` pre-activations (biases, with
    /// `B_b b_v` folded into the second half).
    hc_b: Vec<f32>,
    /// `[2H, H]`: the `[h_ctr | h_bid]` column blocks of `ecpm_mlp.0`, transposed.
    ecpm_h_t: Vec<f32>,
    /// `1 / sqrt(A)`.
    scale: f32,
}

/// A BAR model: its configuration and every weight tensor (see the table
/// in the [module docs](super)), ready for CPU inference.
///
/// Cheap to share behind an `Arc` (it is `Send + Sync` and never mutated
/// after construction). A request computes its [`UserState`] once with
/// [`user_side`](Self::user_side); ads carry their [`AdSide`] (the index
/// vector `z_a` and the tokens); [`score_into`](Self::score_into) ranks a
/// batch of them.
///
/// ```
/// use nann::bar::model::BarModel;
/// use nann::bar::{AdFeatures, BarConfig, BidFeatures, UserFeatures};
///
/// let model = BarModel::random(BarConfig::default(), 7)?;
/// let user = model.user_side(&UserFeatures {
///     fields: vec![1, 2, 0, 5, 3],
///     seq_items: vec![10, 11, 12],
///     seq_cates: vec![1, 1, 2],
/// })?;
/// let bid = BidFeatures {
///     bid_type: 0,
///     bid_constraint: 2.0,
///     budget_left_ratio: 0.5,
///     time_left_ratio: 0.3,
///     default_bid_value: 1.0,
/// };
/// let ads: Vec<_> = (1..=3)
///     .map(|item| model.ad_side(&AdFeatures { item, cate: 1, brand: 4, bid }))
///     .collect::<Result<_, _>>()?;
/// let z_a: Vec<f32> = ads.iter().flat_map(|a| a.vector.iter().copied()).collect();
/// let tokens: Vec<_> = ads.iter().map(|a| a.tokens).collect();
/// let mut scores = vec![0.0; ads.len()];
/// model.score_into(&user, &z_a, &tokens, &mut scores)?;
/// let heads = model.heads(&user, &z_a, &tokens)?;
/// assert_eq!(heads[2].score, scores[2]);
/// assert!(heads[0].pctr > 0.0 && heads[0].pctr < 1.0);
/// # Ok::<(), nann::bar::ModelError>(())
/// ```
#[derive(Clone)]
pub struct BarModel {
    config: BarConfig,
    id: u64,
    /// `emb.user.{i}`, `[user_field_vocab[i], E]` each.
    user_emb: Vec<Vec<f32>>,
    /// The ad token tables of [`AD_TABLES`] in use, `[vocab, E]` each.
    ad_emb: Vec<Vec<f32>>,
    /// The layers of [`LAYERS`].
    layers: Vec<Layer>,
    derived: Derived,
}

impl fmt::Debug for BarModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BarModel")
            .field("config", &self.config)
            .field("parameters", &self.parameter_count())
            .finish_non_exhaustive()
    }
}

/// Everything about a request that does not depend on the ad, computed
/// once by [`BarModel::user_side`] and shared by every candidate scored for
/// it: `z_u`, the unmasked sequence positions' keys and values, and the
/// `z_u` part of every projection of `z_ua`.
///
/// Only valid with the model instance that computed it or a clone of it
/// (checked: another instance, even one loaded from the same file, gets a
/// [`ModelError::Feature`] rather than silently wrong scores).
#[derive(Clone)]
pub struct UserState {
    model_id: u64,
    z_u: Vec<f32>,
    /// Unmasked sequence positions.
    lu: usize,
    /// `[W]`: the `z_u` part of `Q` plus its bias.
    q_user: Vec<f32>,
    seq_scores: SeqScores,
    seq_values: Values,
    /// `[A, Lu]`: `K2^T / sqrt(A)`.
    k2_t: Vec<f32>,
    ctr_values: Values,
}

/// Sequence attention logits from `z_a`.
#[derive(Clone)]
enum SeqScores {
    /// `z_a M^T + c`: `m_t` `[D, Lu]` (`M_t = W_q^T K1_t / sqrt(A)`),
    /// `c_t = b_q . K1_t / sqrt(A)`.
    Folded { m_t: Vec<f32>, c: Vec<f32> },
    /// `q1 = seq_attn.q(z_a)`, then `q1 K1^T / sqrt(A)` (`k1_t` `[A, Lu]`).
    Direct { k1_t: Vec<f32> },
}

/// Values multiplied by attention weights `P` (`[Lu, width]`).
#[derive(Clone)]
enum Values {
    /// Already projected by the one layer that reads the attended value.
    Folded(Vec<f32>),
    /// The raw values; the projection follows.
    Direct(Vec<f32>),
}

impl fmt::Debug for UserState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserState")
            .field("z_u", &self.z_u)
            .field("seq_len", &self.lu)
            .finish_non_exhaustive()
    }
}

impl UserState {
    /// `z_u`, the user tower's output (`D` floats).
    pub fn z_u(&self) -> &[f32] {
        &self.z_u
    }

    /// Behaviour-sequence positions the attention reads: the last
    /// `max_seq_len` entries minus padding (item id 0).
    pub fn seq_len(&self) -> usize {
        self.lu
    }
}

/// An ad's precomputed side: what the index stores for it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdSide {
    /// `z_a` (`d_model` floats): the index vector.
    pub vector: Vec<f32>,
    /// The ad's tokens: the index payload ([`AdTokens::to_payload`]).
    pub tokens: AdTokens,
}

/// The three task heads' outputs for one candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heads {
    /// Predicted click-through rate, in `(0, 1)`.
    pub pctr: f32,
    /// Predicted bid over the ad's historical mean bid (`pBid / aBid`).
    pub pbid_ratio: f32,
    /// The retrieval score (eCPM head; higher is better).
    pub score: f32,
}

/// A counter-based generator for deterministic initialisation.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        (crate::level::splitmix64(self.0) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[-bound, bound)`.
    fn uniform(&mut self, bound: f64) -> f32 {
        ((self.next_f64() * 2.0 - 1.0) * bound) as f32
    }

    /// Normal with standard deviation `std` (Box-Muller).
    fn normal(&mut self, std: f64) -> f32 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
    }
}

impl BarModel {
    /// A model with deterministic random weights: embeddings ~ N(0, 0.1²),
    /// every linear layer's weight and bias ~ U(-1/√in, 1/√in) (PyTorch's
    /// default). The starting point for training and a stand-in for tests.
    ///
    /// ```
    /// use nann::bar::{model::BarModel, BarConfig};
    /// let a = BarModel::random(BarConfig::default(), 1)?;
    /// let b = BarModel::random(BarConfig::default(), 1)?;
    /// assert_eq!(a.tensors()[0].2, b.tensors()[0].2);
    /// # Ok::<(), nann::bar::ModelError>(())
    /// ```
    pub fn random(config: BarConfig, seed: u64) -> Result<Self, ModelError> {
        let specs = tensor_specs(&config)?;
        let mut rng = Rng(seed);
        let n_emb = config.user_field_vocab.len() + config.ad_tokens();
        let shapes = layer_shapes(&config)?;
        let mut tensors = Vec::with_capacity(specs.len());
        for (i, (_, shape)) in specs.iter().enumerate() {
            let len: usize = shape.iter().product();
            let data: Vec<f32> = if i < n_emb {
                (0..len).map(|_| rng.normal(0.1)).collect()
            } else {
                // Weight and bias of layer (i - n_emb) / 2: bound by its fan-in.
                let (_, inp) = shapes[(i - n_emb) / 2];
                let bound = 1.0 / (inp.max(1) as f64).sqrt();
                (0..len).map(|_| rng.uniform(bound)).collect()
            };
            tensors.push(data);
        }
        Self::assemble(config, tensors)
    }

    /// A model from named tensors `(shape, data)`, e.g. a trainer's
    /// parameters. Checks the configuration, then every tensor it needs:
    /// present ([`ModelError::MissingTensor`]), of the right shape with
    /// `data` matching it ([`ModelError::Shape`]) and finite
    /// ([`ModelError::NonFinite`]). Names the model does not use are
    /// ignored, so a checkpoint may also carry optimiser state or other
    /// heads.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use nann::bar::{model::BarModel, BarConfig, ModelError};
    /// let model = BarModel::random(BarConfig::default(), 3)?;
    /// let mut tensors: HashMap<String, (Vec<usize>, Vec<f32>)> = model
    ///     .tensors()
    ///     .into_iter()
    ///     .map(|(name, shape, data)| (name, (shape, data.to_vec())))
    ///     .collect();
    /// let again = BarModel::from_tensors(model.config().clone(), &tensors)?;
    /// assert_eq!(again.parameter_count(), model.parameter_count());
    /// tensors.remove("ecpm_mlp.1.bias");
    /// assert!(matches!(
    ///     BarModel::from_tensors(model.config().clone(), &tensors),
    ///     Err(ModelError::MissingTensor { .. })
    /// ));
    /// # Ok::<(), ModelError>(())
    /// ```
    pub fn from_tensors(
        config: BarConfig,
        tensors: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    ) -> Result<Self, ModelError> {
        let specs = tensor_specs(&config)?;
        let mut data = Vec::with_capacity(specs.len());
        for (name, expected) in &specs {
            let (shape, values) = tensors
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor { name: name.clone() })?;
            if shape != expected {
                return Err(ModelError::Shape {
                    name: name.clone(),
                    expected: expected.clone(),
                    found: shape.clone(),
                });
            }
            let len: usize = expected.iter().product();
            if values.len() != len {
                return Err(ModelError::Shape {
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
    /// metadata ([`BarConfig::from_metadata`]), then every tensor as in
    /// [`from_tensors`](Self::from_tensors); tensors must be F32
    /// ([`ModelError::DType`]). Bytes that are not a well-formed
    /// safetensors file give [`ModelError::Format`]. Never panics, whatever
    /// the bytes; allocates only for tensors whose size the file backs.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, ModelError> {
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| ModelError::Format(e.to_string()))?;
        let empty = HashMap::new();
        let entries = metadata.metadata().as_ref().unwrap_or(&empty);
        let config = BarConfig::from_metadata(entries)?;
        let specs = tensor_specs(&config)?;
        let body = header_len
            .checked_add(8)
            .and_then(|start| bytes.get(start..))
            .ok_or_else(|| ModelError::Format("the header runs past the end".into()))?;
        let mut data = Vec::with_capacity(specs.len());
        for (name, expected) in &specs {
            let info = metadata
                .info(name)
                .ok_or_else(|| ModelError::MissingTensor { name: name.clone() })?;
            if info.dtype != safetensors::Dtype::F32 {
                return Err(ModelError::DType {
                    name: name.clone(),
                    dtype: format!("{:?}", info.dtype),
                });
            }
            if &info.shape != expected {
                return Err(ModelError::Shape {
                    name: name.clone(),
                    expected: expected.clone(),
                    found: info.shape.clone(),
                });
            }
            let (start, end) = info.data_offsets;
            let raw = body.get(start..end).ok_or_else(|| {
                ModelError::Format(format!("tensor `{name}`'s data lies outside the file"))
            })?;
            let len: usize = expected.iter().product();
            if Some(raw.len()) != len.checked_mul(4) {
                return Err(ModelError::Shape {
                    name: name.clone(),
                    expected: expected.clone(),
                    found: vec![raw.len() / 4],
                });
            }
            // Little-endian, possibly unaligned: decode element by element.
            data.push(
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            );
        }
        Self::assemble(config, data)
    }

    /// Reads a weights file written by [`save`](Self::save) (or by the
    /// trainer); see [`from_safetensors`](Self::from_safetensors).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| io_error(path, &e))?;
        Self::from_safetensors(&bytes)
    }

    /// The model as a safetensors file: every tensor of
    /// [`tensors`](Self::tensors) (F32, little-endian) and the
    /// configuration as metadata ([`BarConfig::to_metadata`]), so the file
    /// describes itself.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, ModelError> {
        let tensors = self.tensors();
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, data)| data.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let mut views = Vec::with_capacity(tensors.len());
        for ((name, shape, _), raw) in tensors.iter().zip(&bytes) {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), raw)
                    .map_err(|e| ModelError::Format(e.to_string()))?;
            views.push((name.clone(), view));
        }
        safetensors::serialize(views, Some(self.config.to_metadata()))
            .map_err(|e| ModelError::Format(e.to_string()))
    }

    /// Writes [`to_safetensors`](Self::to_safetensors) to `path`
    /// atomically: into a temporary file in the same directory, flushed to
    /// disk, then renamed over `path`, so a reader (or a crash) sees the
    /// old file or the new one, never a torn one.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), ModelError> {
        let path = path.as_ref();
        let bytes = self.to_safetensors()?;
        crate::persist::io::write_atomically(&crate::persist::FsStorage, path, &[&bytes]).map_err(
            |e| ModelError::Io {
                path: path.display().to_string(),
                message: e.to_string(),
            },
        )
    }

    /// The configuration.
    pub fn config(&self) -> &BarConfig {
        &self.config
    }

    /// Number of weights (f32 values) over all tensors.
    pub fn parameter_count(&self) -> usize {
        self.tensors().iter().map(|(_, _, d)| d.len()).sum()
    }

    /// Every tensor as `(name, shape, data)` in a fixed order: `emb.user.{i}`
    /// for each field, the ad token tables (`emb.item`, `emb.cate`,
    /// `emb.brand`, then with bid features `emb.bid_type`,
    /// `emb.bid_constraint`, `emb.budget_left`, `emb.time_left`,
    /// `emb.default_bid`), then each layer's `.weight` and `.bias` in the
    /// order `user_net.0`, `user_net.1`, `ad_net.0`, `ad_net.1`,
    /// `seq_attn.{q,k,v}`, `ctr_attn.{q,k,v}`, `ctr_mlp.{0,1}`,
    /// `bid_attn.{q,k,v}`, `bid_mlp.{0,1}`, `ecpm.proj`, `ecpm_mlp.{0,1}`.
    /// Names and shapes are those of the table in the [module docs](super);
    /// weights are `[out, in]`. What a trainer initialises from and what
    /// [`to_safetensors`](Self::to_safetensors) writes.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        let e = self.config.emb_dim;
        let mut out = Vec::with_capacity(self.user_emb.len() + self.ad_emb.len() + 40);
        for (i, table) in self.user_emb.iter().enumerate() {
            out.push((
                format!("emb.user.{i}"),
                vec![table.len() / e, e],
                &table[..],
            ));
        }
        for (name, table) in AD_TABLES.iter().zip(&self.ad_emb) {
            out.push((name.to_string(), vec![table.len() / e, e], &table[..]));
        }
        for (name, layer) in LAYERS.iter().zip(&self.layers) {
            out.push((
                format!("{name}.weight"),
                vec![layer.out, layer.inp],
                &layer.w[..],
            ));
            out.push((format!("{name}.bias"), vec![layer.out], &layer.b[..]));
        }
        out
    }

    /// Builds the model from tensors in [`tensor_specs`] order (shapes
    /// already checked): checks finiteness, derives the inference matrices.
    fn assemble(config: BarConfig, tensors: Vec<Vec<f32>>) -> Result<Self, ModelError> {
        let specs = tensor_specs(&config)?;
        if specs.len() != tensors.len() {
            return Err(ModelError::Format("internal: tensor count".into()));
        }
        for ((name, _), data) in specs.iter().zip(&tensors) {
            if let Some(position) = data.iter().position(|v| !v.is_finite()) {
                return Err(ModelError::NonFinite {
                    name: name.clone(),
                    position,
                });
            }
        }
        let mut it = tensors.into_iter();
        let user_emb: Vec<Vec<f32>> = it.by_ref().take(config.user_field_vocab.len()).collect();
        let ad_emb: Vec<Vec<f32>> = it.by_ref().take(config.ad_tokens()).collect();
        let mut layers = Vec::with_capacity(LAYERS.len());
        for (out, inp) in layer_shapes(&config)? {
            let (Some(w), Some(b)) = (it.next(), it.next()) else {
                return Err(ModelError::Format("internal: tensor count".into()));
            };
            layers.push(Layer::new(w, b, out, inp));
        }
        let derived = derive(&config, &layers);
        Ok(Self {
            config,
            id: NEXT_MODEL_ID.fetch_add(1, Ordering::Relaxed),
            user_emb,
            ad_emb,
            layers,
            derived,
        })
    }

    /// The user side of a request (once per request): checks the features
    /// against the configuration, keeps the last `max_seq_len` sequence
    /// entries, drops padding (item id 0), and precomputes everything the
    /// interaction needs from the user.
    pub fn user_side(&self, user: &UserFeatures) -> Result<UserState, ModelError> {
        let c = &self.config;
        user.check(c)?;
        let (e, d, a, h) = (c.emb_dim, c.d_model, c.d_attn, c.head_hidden);
        let dv = &self.derived;
        let w = dv.w;

        // z_u = user_net.1(relu(user_net.0(concat_i emb.user.i[field_i]))).
        let mut x = Vec::with_capacity(user.fields.len() * e);
        for (table, &id) in self.user_emb.iter().zip(&user.fields) {
            x.extend_from_slice(row(table, id as usize, e)?);
        }
        let l0 = &self.layers[USER0];
        let mut hidden = vec![0.0; l0.out];
        linalg::linear(&x, 1, &l0.wt, &l0.b, &mut hidden);
        relu_in_place(&mut hidden);
        let l1 = &self.layers[USER1];
        let mut z_u = vec![0.0; d];
        linalg::linear(&hidden, 1, &l1.wt, &l1.b, &mut z_u);

        let mut q_user = dv.stack_b.clone();
        gemm_acc(&z_u, d, 1, d, &dv.stack_u_t, w, &mut q_user, w);

        // The unmasked positions of the last max_seq_len entries.
        let start = user.seq_items.len().saturating_sub(c.max_seq_len);
        let mut s = Vec::new();
        for (&item, &cate) in user.seq_items[start..].iter().zip(&user.seq_cates[start..]) {
            if item != 0 {
                s.extend_from_slice(row(&self.ad_emb[0], item as usize, e)?);
                s.extend_from_slice(row(&self.ad_emb[1], cate as usize, e)?);
            }
        }
        let lu = s.len() / (2 * e);
        let project = |layer: usize, scale: f32| {
            let l = &self.layers[layer];
            let mut out = vec![0.0; lu * l.out];
            linalg::linear(&s, lu, &l.wt, &l.b, &mut out);
            if scale != 1.0 {
                out.iter_mut().for_each(|v| *v *= scale);
            }
            out
        };
        let k1 = project(SEQ_K, dv.scale); // [Lu, A], scaled
        let v1 = project(SEQ_V, 1.0); // [Lu, D]
        let k2 = project(CTR_K, dv.scale); // [Lu, A], scaled
        let v2 = project(CTR_V, 1.0); // [Lu, A]

        let seq_scores = if lu * d <= a * d + lu * a {
            // M = K1 W_q ([Lu, A] x [A, D]: the stored weight is the
            // transposed operand), c_t = b_q . K1_t.
            let q = &self.layers[SEQ_Q];
            let mut m = vec![0.0; lu * d];
            gemm_acc(&k1, a, lu, a, &q.w, d, &mut m, d);
            let c = k1.chunks_exact(a).map(|k| dot(&q.b, k)).collect();
            SeqScores::Folded {
                m_t: linalg::transpose(&m, lu, d),
                c,
            }
        } else {
            SeqScores::Direct {
                k1_t: linalg::transpose(&k1, lu, a),
            }
        };
        let seq_values = if lu * w <= lu * d + d * w {
            let mut v = vec![0.0; lu * w];
            gemm_acc(&v1, d, lu, d, &dv.stack_s_t, w, &mut v, w);
            Values::Folded(v)
        } else {
            Values::Direct(v1)
        };
        let ctr_values = if lu * h <= lu * a + a * h {
            let mut v = vec![0.0; lu * h];
            gemm_acc(&v2, a, lu, a, &dv.ctr_c_t, h, &mut v, h);
            Values::Folded(v)
        } else {
            Values::Direct(v2)
        };
        Ok(UserState {
            model_id: self.id,
            z_u,
            lu,
            q_user,
            seq_scores,
            seq_values,
            k2_t: linalg::transpose(&k2, lu, a),
            ctr_values,
        })
    }

    /// The ad side of one ad: its tokens (bid features bucketised, ids
    /// checked) and `z_a`.
    pub fn ad_side(&self, ad: &AdFeatures) -> Result<AdSide, ModelError> {
        let tokens = ad.tokens(&self.config)?;
        let vector = self.ad_vector(&tokens)?;
        Ok(AdSide { vector, tokens })
    }

    /// `z_a` for one ad's tokens (`d_model` floats). Errors if the tokens do
    /// not fit this model's configuration.
    pub fn ad_vector(&self, tokens: &AdTokens) -> Result<Vec<f32>, ModelError> {
        self.ad_vectors(std::slice::from_ref(tokens))
    }

    /// `z_a` of many ads at once (`tokens.len() x d_model`, row-major),
    /// computed in blocks: the fast way to build an index of many ads.
    ///
    /// ```
    /// use nann::bar::{model::BarModel, AdTokens, BarConfig};
    /// let model = BarModel::random(BarConfig::default(), 1)?;
    /// let tokens: Vec<AdTokens> = (1..100)
    ///     .map(|i| AdTokens::from_ids(model.config(), &[i, 1, 2, 0, 3, 4, 5, 6]))
    ///     .collect::<Result<_, _>>()?;
    /// let z = model.ad_vectors(&tokens)?;
    /// assert_eq!(z.len(), 99 * 64);
    /// assert_eq!(&z[64..128], &model.ad_vector(&tokens[1])?[..]);
    /// # Ok::<(), nann::bar::ModelError>(())
    /// ```
    pub fn ad_vectors(&self, tokens: &[AdTokens]) -> Result<Vec<f32>, ModelError> {
        let c = &self.config;
        let (e, d, t) = (c.emb_dim, c.d_model, c.ad_tokens());
        for tok in tokens {
            self.check_tokens(tok)?;
        }
        let l0 = &self.layers[AD0];
        let l1 = &self.layers[AD1];
        let mut out = vec![0.0; tokens.len() * d];
        let rows = tokens.len().min(BLOCK);
        let mut x = vec![0.0; rows * t * e];
        let mut hidden = vec![0.0; rows * l0.out];
        for (block, z) in tokens.chunks(BLOCK).zip(out.chunks_mut(BLOCK * d)) {
            let nb = block.len();
            for (tok, xr) in block.iter().zip(x.chunks_exact_mut(t * e)) {
                for (j, (&id, table)) in tok.ids().iter().zip(&self.ad_emb).enumerate() {
                    xr[j * e..(j + 1) * e].copy_from_slice(row(table, id as usize, e)?);
                }
            }
            let hidden = &mut hidden[..nb * l0.out];
            linalg::linear(&x[..nb * t * e], nb, &l0.wt, &l0.b, hidden);
            relu_in_place(hidden);
            linalg::linear(hidden, nb, &l1.wt, &l1.b, z);
        }
        Ok(out)
    }

    /// All three heads for a batch of candidates: `z_a` is `n x d_model`
    /// (row-major, e.g. the index vectors), `tokens` the `n` candidates'
    /// tokens (e.g. decoded payloads). Same computation as
    /// [`score_into`](Self::score_into), which is the faster call when only
    /// the score is needed.
    pub fn heads(
        &self,
        user: &UserState,
        z_a: &[f32],
        tokens: &[AdTokens],
    ) -> Result<Vec<Heads>, ModelError> {
        let mut scores = vec![0.0; tokens.len()];
        let mut heads = vec![
            Heads {
                pctr: 0.0,
                pbid_ratio: 0.0,
                score: 0.0
            };
            tokens.len()
        ];
        self.forward(user, z_a, tokens, &mut scores, Some(&mut heads))?;
        Ok(heads)
    }

    /// The retrieval score of every candidate into `out` (`out.len() ==
    /// tokens.len()`; `z_a` is `n x d_model`): the serving hot path, in
    /// blocks of [`BLOCK`] candidates with no allocation per candidate.
    /// Errors (and writes nothing meaningful) if a dimension does not match,
    /// a token is outside the vocabularies, or `user` came from another
    /// model instance.
    pub fn score_into(
        &self,
        user: &UserState,
        z_a: &[f32],
        tokens: &[AdTokens],
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        self.forward(user, z_a, tokens, out, None)
    }

    fn check_tokens(&self, tokens: &AdTokens) -> Result<(), ModelError> {
        AdTokens::from_ids(&self.config, tokens.ids()).map(|_| ())
    }

    fn forward(
        &self,
        user: &UserState,
        z_a: &[f32],
        tokens: &[AdTokens],
        scores: &mut [f32],
        mut heads: Option<&mut [Heads]>,
    ) -> Result<(), ModelError> {
        let d = self.config.d_model;
        if user.model_id != self.id {
            return Err(ModelError::Feature {
                feature: "user state",
                message: "computed by a different model instance".into(),
            });
        }
        if tokens.len().checked_mul(d) != Some(z_a.len()) {
            return Err(ModelError::Feature {
                feature: "z_a",
                message: format!(
                    "{} floats for {} candidates of dimension {d}",
                    z_a.len(),
                    tokens.len()
                ),
            });
        }
        if scores.len() != tokens.len() {
            return Err(ModelError::Feature {
                feature: "scores",
                message: format!(
                    "an output of {} for {} candidates",
                    scores.len(),
                    tokens.len()
                ),
            });
        }
        for tok in tokens {
            self.check_tokens(tok)?;
        }
        let mut scratch = Scratch::new(&self.config, user.lu, tokens.len().min(BLOCK));
        for (b, (tok, za)) in tokens.chunks(BLOCK).zip(z_a.chunks(BLOCK * d)).enumerate() {
            let range = b * BLOCK..b * BLOCK + tok.len();
            let hb = heads.as_deref_mut().map(|h| &mut h[range.clone()]);
            self.block(user, za, tok, &mut scratch, &mut scores[range], hb);
        }
        Ok(())
    }

    /// The interaction for one block of (checked) candidates.
    fn block(
        &self,
        u: &UserState,
        za: &[f32],
        tokens: &[AdTokens],
        sc: &mut Scratch,
        scores: &mut [f32],
        heads: Option<&mut [Heads]>,
    ) {
        let c = &self.config;
        let (e, d, a, h) = (c.emb_dim, c.d_model, c.d_attn, c.head_hidden);
        let dv = &self.derived;
        let (w, lu, nb, h2) = (dv.w, u.lu, tokens.len(), 2 * h);

        // Q = [q2 | q3 | e] = q_user + z_a S_a^T + S_s z_seq.
        let q = &mut sc.q[..nb * w];
        fill_rows(q, w, nb, &u.q_user);
        gemm_acc(za, d, nb, d, &dv.stack_a_t, w, q, w);
        let hc = &mut sc.hc[..nb * h2];
        fill_rows(hc, h2, nb, &dv.hc_b);
        if lu > 0 {
            // Sequence attention weights P1.
            let p1 = &mut sc.p1[..nb * lu];
            match &u.seq_scores {
                SeqScores::Folded { m_t, c } => {
                    fill_rows(p1, lu, nb, c);
                    gemm_acc(za, d, nb, d, m_t, lu, p1, lu);
                }
                SeqScores::Direct { k1_t } => {
                    let sq = &self.layers[SEQ_Q];
                    let q1 = &mut sc.tmp_a[..nb * a];
                    fill_rows(q1, a, nb, &sq.b);
                    gemm_acc(za, d, nb, d, &sq.wt, a, q1, a);
                    p1.fill(0.0);
                    gemm_acc(q1, a, nb, a, k1_t, lu, p1, lu);
                }
            }
            linalg::softmax_rows(p1, lu, nb, lu);
            match &u.seq_values {
                Values::Folded(v) => gemm_acc(p1, lu, nb, lu, v, w, q, w),
                Values::Direct(v) => {
                    let z_seq = &mut sc.tmp_d[..nb * d];
                    z_seq.fill(0.0);
                    gemm_acc(p1, lu, nb, lu, v, d, z_seq, d);
                    gemm_acc(z_seq, d, nb, d, &dv.stack_s_t, w, q, w);
                }
            }
            // pCTR attention weights P2 = softmax(q2 K2^T / sqrt(A)), and
            // its value c through ctr_mlp.0's c columns.
            let p2 = &mut sc.p2[..nb * lu];
            p2.fill(0.0);
            gemm_acc(q, w, nb, a, &u.k2_t, lu, p2, lu);
            linalg::softmax_rows(p2, lu, nb, lu);
            match &u.ctr_values {
                Values::Folded(v) => gemm_acc(p2, lu, nb, lu, v, h, hc, h2),
                Values::Direct(v) => {
                    let cv = &mut sc.tmp_a[..nb * a];
                    cv.fill(0.0);
                    gemm_acc(p2, lu, nb, lu, v, a, cv, a);
                    gemm_acc(cv, a, nb, a, &dv.ctr_c_t, h, hc, h2);
                }
            }
        }
        // h_ctr's q2 columns.
        gemm_acc(q, w, nb, a, &dv.ctr_q_t, h, hc, h2);

        // pBid attention over the ad's tokens: r = W_k^T q3 / sqrt(A),
        // logits r . t_j, t̄ = sum_j p_j t_j.
        let r = &mut sc.r[..nb * e];
        r.fill(0.0);
        gemm_acc(&q[a..], w, nb, a, &dv.bid_r_t, e, r, e);
        let tbar = &mut sc.tbar[..nb * e];
        tbar.fill(0.0);
        let t = c.ad_tokens();
        for ((tok, ri), tb) in tokens
            .iter()
            .zip(r.chunks_exact(e))
            .zip(tbar.chunks_exact_mut(e))
        {
            let mut logits = [0.0f32; 8];
            let mut rows: [&[f32]; 8] = [&[]; 8];
            for (j, (&id, table)) in tok.ids().iter().zip(&self.ad_emb).enumerate() {
                let start = id as usize * e;
                rows[j] = &table[start..start + e];
                logits[j] = dot(ri, rows[j]);
            }
            linalg::softmax_row::<linalg::Plain>(&mut logits[..t]);
            for (&pj, rj) in logits[..t].iter().zip(&rows[..t]) {
                for (o, &v) in tb.iter_mut().zip(rj.iter()) {
                    *o += pj * v;
                }
            }
        }
        let hb = &mut hc[h..];
        gemm_acc(&q[a..], w, nb, a, &dv.bid_q_t, h, hb, h2);
        match &dv.token_path {
            TokenPath::Folded(wbv_t) => gemm_acc(tbar, e, nb, e, wbv_t, h, hb, h2),
            TokenPath::Direct { v_t, b_t } => {
                // b_v's contribution is folded into `hc_b`.
                let bv = &mut sc.tmp_a[..nb * a];
                bv.fill(0.0);
                gemm_acc(tbar, e, nb, e, v_t, a, bv, a);
                gemm_acc(bv, a, nb, a, b_t, h, hb, h2);
            }
        }
        relu_in_place(hc);

        // eCPM: relu(e + E_h [h_ctr | h_bid]) . ecpm_mlp.1.
        let eh = &mut sc.eh[..nb * h];
        for (dst, src) in eh.chunks_exact_mut(h).zip(q.chunks_exact(w)) {
            dst.copy_from_slice(&src[2 * a..2 * a + h]);
        }
        gemm_acc(hc, h2, nb, h2, &dv.ecpm_h_t, h, eh, h);
        relu_in_place(eh);
        let e1 = &self.layers[ECPM1];
        for (s, ei) in scores.iter_mut().zip(eh.chunks_exact(h)) {
            *s = dot(ei, &e1.w) + e1.b[0];
        }
        if let Some(heads) = heads {
            let (c1, b1) = (&self.layers[CTR_MLP1], &self.layers[BID_MLP1]);
            for ((hd, hci), &s) in heads.iter_mut().zip(hc.chunks_exact(h2)).zip(&*scores) {
                *hd = Heads {
                    pctr: sigmoid(dot(&hci[..h], &c1.w) + c1.b[0]),
                    pbid_ratio: dot(&hci[h..], &b1.w) + b1.b[0],
                    score: s,
                };
            }
        }
    }
}

/// Per-call buffers of the interaction, sized for one block.
struct Scratch {
    q: Vec<f32>,
    p1: Vec<f32>,
    p2: Vec<f32>,
    hc: Vec<f32>,
    r: Vec<f32>,
    tbar: Vec<f32>,
    eh: Vec<f32>,
    tmp_a: Vec<f32>,
    tmp_d: Vec<f32>,
}

impl Scratch {
    fn new(c: &BarConfig, lu: usize, rows: usize) -> Self {
        let (e, d, a, h) = (c.emb_dim, c.d_model, c.d_attn, c.head_hidden);
        Self {
            q: vec![0.0; rows * (2 * a + h)],
            p1: vec![0.0; rows * lu],
            p2: vec![0.0; rows * lu],
            hc: vec![0.0; rows * 2 * h],
            r: vec![0.0; rows * e],
            tbar: vec![0.0; rows * e],
            eh: vec![0.0; rows * h],
            tmp_a: vec![0.0; rows * a],
            tmp_d: vec![0.0; rows * d],
        }
    }
}

/// Row `id` of a `[vocab, e]` table (ids are checked before, so an error
/// here means a table and the configuration disagree).
fn row(table: &[f32], id: usize, e: usize) -> Result<&[f32], ModelError> {
    id.checked_mul(e)
        .and_then(|start| table.get(start..start + e))
        .ok_or(ModelError::Feature {
            feature: "id",
            message: format!("id {id} is outside its embedding table"),
        })
}

fn io_error(path: &Path, e: &std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The inference matrices derived from the weights (see the module docs).
fn derive(c: &BarConfig, layers: &[Layer]) -> Derived {
    let (e, d, a, h) = (c.emb_dim, c.d_model, c.d_attn, c.head_hidden);
    let w = 2 * a + h;
    let (ctr_q, bid_q, proj, e0) = (
        &layers[CTR_Q],
        &layers[BID_Q],
        &layers[ECPM_PROJ],
        &layers[ECPM0],
    );
    // Row `j` of the stack over z_ua's 3D columns, as f64 products.
    // Rows 2A..2A+H: F = E_p . W_p with E_p = ecpm_mlp.0[:, 2H..3H].
    let mut fold = vec![0.0f64; h * 3 * d];
    let mut fold_b = vec![0.0f64; h];
    for i in 0..h {
        for k in 0..h {
            let ep = e0.at(i, 2 * h + k) as f64;
            if ep == 0.0 {
                continue;
            }
            let src = &proj.w[k * 3 * d..(k + 1) * 3 * d];
            for (f, &v) in fold[i * 3 * d..(i + 1) * 3 * d].iter_mut().zip(src) {
                *f += ep * v as f64;
            }
            fold_b[i] += ep * proj.b[k] as f64;
        }
        fold_b[i] += e0.b[i] as f64;
    }
    let stack_at = |j: usize, col: usize| -> f32 {
        if j < a {
            ctr_q.at(j, col)
        } else if j < 2 * a {
            bid_q.at(j - a, col)
        } else {
            fold[(j - 2 * a) * 3 * d + col] as f32
        }
    };
    let block_t = |offset: usize| -> Vec<f32> {
        let mut t = vec![0.0; d * w];
        for dd in 0..d {
            for j in 0..w {
                t[dd * w + j] = stack_at(j, offset + dd);
            }
        }
        t
    };
    let mut stack_b = Vec::with_capacity(w);
    stack_b.extend_from_slice(&ctr_q.b);
    stack_b.extend_from_slice(&bid_q.b);
    stack_b.extend(fold_b.iter().map(|&v| v as f32));

    // Column block `[off, off + cols)` of a layer's `[out, in]` weight,
    // transposed to `[cols, out]`.
    let cols_t = |l: &Layer, off: usize, cols: usize| -> Vec<f32> {
        let mut t = vec![0.0; cols * l.out];
        for o in 0..l.out {
            for k in 0..cols {
                t[k * l.out + o] = l.at(o, off + k);
            }
        }
        t
    };
    let (ctr0, bid0, bid_k, bid_v) = (
        &layers[CTR_MLP0],
        &layers[BID_MLP0],
        &layers[BID_K],
        &layers[BID_V],
    );
    let scale = 1.0 / (a as f32).sqrt();
    // r = q3 . (W_k / sqrt(A)): the stored [A, E] weight is the operand.
    let bid_r_t: Vec<f32> = bid_k.w.iter().map(|v| v * scale).collect();
    // h_bid bias: bid_mlp.0.b + B_b b_v (B_b = bid_mlp.0[:, 0..A]).
    let mut hc_b = ctr0.b.clone();
    for i in 0..h {
        let mut acc = bid0.b[i] as f64;
        for k in 0..a {
            acc += bid0.at(i, k) as f64 * bid_v.b[k] as f64;
        }
        hc_b.push(acc as f32);
    }
    let token_path = if h * e <= a * e + h * a {
        // (B_b W_v)^T: [E, H].
        let mut t = vec![0.0; e * h];
        for i in 0..h {
            for col in 0..e {
                let mut acc = 0.0f64;
                for k in 0..a {
                    acc += bid0.at(i, k) as f64 * bid_v.at(k, col) as f64;
                }
                t[col * h + i] = acc as f32;
            }
        }
        TokenPath::Folded(t)
    } else {
        TokenPath::Direct {
            v_t: bid_v.wt.clone(),
            b_t: cols_t(bid0, 0, a),
        }
    };
    Derived {
        w,
        stack_u_t: block_t(0),
        stack_s_t: block_t(d),
        stack_a_t: block_t(2 * d),
        stack_b,
        ctr_c_t: cols_t(ctr0, 0, a),
        ctr_q_t: cols_t(ctr0, a, a),
        bid_r_t,
        bid_q_t: cols_t(bid0, a, a),
        token_path,
        hc_b,
        ecpm_h_t: cols_t(e0, 0, 2 * h),
        scale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_cover_the_table_and_random_is_deterministic() {
        for bid_features in [true, false] {
            let config = BarConfig {
                bid_features,
                ..BarConfig::default()
            };
            let specs = tensor_specs(&config).unwrap();
            assert_eq!(specs.len(), 5 + config.ad_tokens() + 40);
            let a = BarModel::random(config.clone(), 9).unwrap();
            let b = BarModel::random(config.clone(), 9).unwrap();
            let c = BarModel::random(config, 10).unwrap();
            let (ta, tb, tc) = (a.tensors(), b.tensors(), c.tensors());
            for (((x, y), z), (name, shape)) in ta.iter().zip(&tb).zip(&tc).zip(&specs) {
                assert_eq!(&x.0, name);
                assert_eq!(&x.1, shape);
                assert_eq!(x.2.len(), shape.iter().product::<usize>());
                assert_eq!(x.2, y.2);
                assert_ne!(x.2, z.2, "{name}");
            }
        }
        assert!(
            BarModel::random(BarConfig::default(), 0)
                .unwrap()
                .parameter_count()
                > 100_000
        );
    }

    #[test]
    fn user_state_from_another_model_is_rejected() {
        let a = BarModel::random(BarConfig::default(), 1).unwrap();
        let b = a.clone();
        let other = BarModel::random(BarConfig::default(), 1).unwrap();
        let user = a
            .user_side(&UserFeatures {
                fields: vec![0; 5],
                ..Default::default()
            })
            .unwrap();
        let tokens = AdTokens::from_ids(a.config(), &[1, 1, 0, 0, 0, 0, 0, 0]).unwrap();
        let z = a.ad_vector(&tokens).unwrap();
        let mut out = [0.0];
        assert!(b.score_into(&user, &z, &[tokens], &mut out).is_ok());
        assert!(other.score_into(&user, &z, &[tokens], &mut out).is_err());
    }
}
