//! `GpuBarScorer`: the BAR model's interaction (cross-attention and the
//! three Task-Attentive Refinement heads) on a CUDA device, as a
//! [`Scorer`] for [`Index::search_with`](crate::Index::search_with).
//!
//! It computes the forward pass of the [module docs of `bar`](crate::bar)
//! in its straight form (the CPU reference, `src/bar/model.rs`, computes
//! an algebraically equal rearrangement; both are checked against the
//! spec, the GPU against the CPU in `tests/cuda_parity.rs`):
//!
//! ```text
//!  per request (host, once)                     per batch of n candidates (device, one stream)
//!  ────────────────────────                     ──────────────────────────────────────────────
//!  UserFeatures ─► z_u = user_net(...)          z_a [n,D], tokens [n,T]  (uploaded, or gathered
//!  unmasked s_t ─► K1 V1 K2 V2 (seq/ctr k,v)        from a GpuAdTable by id)
//!  su = S[:, :D] z_u + b_S   (S = [ctr_attn.q;  q1    = seq_attn.q(z_a)                      linear
//!        bid_attn.q; ecpm.proj], [2A+H, 3D])    z_seq = attend(q1, K1, V1)                   attend_shared
//!  └─► one upload: GpuUserState                 P[:, A..] = su + S[:, D:2D] z_seq + S[:, 2D:] z_a
//!                                                        = [q2 | q3 | p]                     fill + 2 linear
//!                                               P[:, :A] = c = attend(q2, K2, V2)            attend_shared
//!                                               t_j = emb[tokens]; k_j, v_j = bid_attn.k/v(t_j)
//!                                                                                            gather + 2 linear
//!                                               b = attend_j(q3, k_j, v_j)                   attend_rows
//!                                               h_ctr = relu(ctr_mlp.0([c | q2]))            linear
//!                                               h_bid = relu(bid_mlp.0([b | q3]))            2 linear
//!                                               e = relu(ecpm_mlp.0([h_ctr | h_bid | p]))    2 linear
//!                                               score = ecpm_mlp.1(e) (+ pctr, pbid_ratio)   bar_outputs
//!                                               ──► download scores, synchronise
//! ```
//!
//! Layout: `P = [c | q2 | q3 | p]` (`n x (3A + H)`) and `[h_ctr | h_bid]`
//! are laid out so every concatenation of the spec is a column block of
//! one buffer (a view with a leading dimension), never a copy; a
//! concatenation that cannot be (`[b | q3]`, `[.. | p]`) is a split of the
//! weight's columns, accumulated.
//!
//! Concurrency: the scorer is `Sync`. Each call takes a workspace (its own
//! stream, cuBLAS handle and buffers) from a pool, or makes one, so
//! concurrent searches run on concurrent streams. Buffers are sized in
//! power-of-two buckets (>= 256 rows, at most `max_batch`) and reused; a
//! batch larger than `max_batch` runs in chunks. Kernels run on exactly
//! the batch's rows (no padded work).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;

use super::context::GpuDevice;
use super::error::CudaError;
use super::memory::{DevBuf, Mat};
use super::ops::{Act, BarLastLayers, Exec, MatmulBackend, TokenTables};
use crate::bar::model::{BarModel, Heads, AD_TABLES};
use crate::bar::{AdTokens, UserFeatures};
use crate::beam_retrieval::ScoredHit;
use crate::scorer::{CandidateBatch, Scorer};

/// Identifies a scorer instance, so a [`GpuUserState`] or [`GpuAdTable`]
/// is never used with another one (other weights, maybe another device).
static NEXT_SCORER_ID: AtomicU64 = AtomicU64::new(1);

/// Options of a [`GpuBarScorer`].
#[derive(Debug, Clone, PartialEq)]
pub struct GpuOptions {
    /// How linear layers are computed (default: cuBLAS fp32 if available).
    pub backend: MatmulBackend,
    /// Largest number of candidates one device pass handles (buffers are
    /// sized for it; larger batches run in chunks). Default 65536.
    pub max_batch: usize,
    /// Fill every device buffer with NaN before each pass, so an output a
    /// kernel failed to write shows up as NaN (tests). Default off.
    pub poison: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self {
            backend: MatmulBackend::Auto,
            max_batch: 1 << 16,
            poison: false,
        }
    }
}

/// One step of the device pass as timed by [`GpuBarScorer::profile`]: its
/// measured time and the work it cannot avoid, from which a floor follows
/// given the device's bandwidth and matmul rate.
#[derive(Debug, Clone, PartialEq)]
pub struct StepProfile {
    /// What the step computes (and which kernels).
    pub name: &'static str,
    /// Median time over the repetitions, in milliseconds.
    pub ms: f64,
    /// Floating-point operations (a multiply-add counts 2).
    pub flops: f64,
    /// Bytes the step must move through device memory (each operand read
    /// or written once; for the copies, over the bus).
    pub bytes: f64,
}

/// Events recorded between the steps of a profiled pass.
struct Profiler {
    marks: Vec<(&'static str, f64, f64, CudaEvent)>,
}

impl Profiler {
    fn mark(
        &mut self,
        x: &Exec,
        name: &'static str,
        flops: f64,
        bytes: f64,
    ) -> Result<(), CudaError> {
        let event = x
            .device()
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        event.record(x.stream())?;
        self.marks.push((name, flops, bytes, event));
        Ok(())
    }
}

/// Model dimensions the device pass uses.
#[derive(Debug, Clone, Copy)]
struct Dims {
    e: usize,
    d: usize,
    a: usize,
    h: usize,
    /// Tokens per ad.
    t: usize,
    /// `2A + H`: width of `[q2 | q3 | p]`.
    w: usize,
    /// `1 / sqrt(A)`, as the CPU computes it.
    scale: f32,
}

/// A linear layer on the host: `[out, in]` weight, bias.
#[derive(Debug, Clone)]
struct HostLinear {
    w: Vec<f32>,
    b: Vec<f32>,
    inp: usize,
}

impl HostLinear {
    /// `W x + b` (f64 accumulation), optionally relu'd.
    fn apply(&self, x: &[f32], relu: bool) -> Result<Vec<f32>, CudaError> {
        if x.len() != self.inp || self.inp == 0 {
            return Err(CudaError::shape(
                "user side",
                format!("{} inputs for a layer of {}", x.len(), self.inp),
            ));
        }
        Ok(self
            .w
            .chunks_exact(self.inp)
            .zip(&self.b)
            .map(|(row, &b)| {
                let v = row
                    .iter()
                    .zip(x)
                    .fold(b as f64, |acc, (&w, &x)| acc + w as f64 * x as f64)
                    as f32;
                if relu && v < 0.0 {
                    0.0
                } else {
                    v
                }
            })
            .collect())
    }
}

/// What the user side needs, copied from the model once.
#[derive(Debug)]
struct HostUserSide {
    user_emb: Vec<Vec<f32>>,
    user0: HostLinear,
    user1: HostLinear,
    item: Vec<f32>,
    cate: Vec<f32>,
    seq_k: HostLinear,
    seq_v: HostLinear,
    ctr_k: HostLinear,
    ctr_v: HostLinear,
    /// `S[:, 0..D]` (`[W, D]`) and `b_S` (`[W]`).
    stack_u: HostLinear,
}

/// The interaction's weights on the device (read-only after upload).
#[derive(Debug)]
struct DevWeights {
    seq_q_w: DevBuf<f32>,
    seq_q_b: DevBuf<f32>,
    /// `S = [ctr_attn.q; bid_attn.q; ecpm.proj]`, `[W, 3D]`.
    stack_w: DevBuf<f32>,
    bid_k_w: DevBuf<f32>,
    bid_k_b: DevBuf<f32>,
    bid_v_w: DevBuf<f32>,
    bid_v_b: DevBuf<f32>,
    ctr0_w: DevBuf<f32>,
    ctr0_b: DevBuf<f32>,
    bid0_w: DevBuf<f32>,
    bid0_b: DevBuf<f32>,
    ecpm0_w: DevBuf<f32>,
    ecpm0_b: DevBuf<f32>,
    ctr1_w: DevBuf<f32>,
    ctr1_b: f32,
    bid1_w: DevBuf<f32>,
    bid1_b: f32,
    ecpm1_w: DevBuf<f32>,
    ecpm1_b: f32,
    tokens: TokenTables,
}

/// A request's user side on the device: made once per request by
/// [`GpuBarScorer::user_state`], then shared by every batch scored for it.
#[derive(Debug)]
pub struct GpuUserState {
    scorer: u64,
    lu: usize,
    buf: DevBuf<f32>,
    k1: usize,
    v1: usize,
    k2: usize,
    v2: usize,
    su: usize,
    z_u: Vec<f32>,
}

impl GpuUserState {
    /// Behaviour-sequence positions attended (unmasked, after truncation).
    pub fn seq_len(&self) -> usize {
        self.lu
    }

    /// `z_u` (`d_model` floats), as computed on the host.
    pub fn z_u(&self) -> &[f32] {
        &self.z_u
    }
}

/// Ads resident on the device (`z_a` and tokens), scored by id without
/// moving their features per batch: [`GpuBarScorer::score_table`],
/// [`GpuBarScorer::top_k_table`].
#[derive(Debug)]
pub struct GpuAdTable {
    scorer: u64,
    n: usize,
    z: DevBuf<f32>,
    tok: DevBuf<u32>,
    keys: Vec<u64>,
}

impl GpuAdTable {
    /// Ads in the table.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The key of the ad at position `i`.
    pub fn key(&self, i: usize) -> Option<u64> {
        self.keys.get(i).copied()
    }
}

/// Per-pass device buffers, `cap` rows.
#[derive(Debug)]
struct Buffers {
    cap: usize,
    za: DevBuf<f32>,
    tok: DevBuf<u32>,
    ids: DevBuf<u32>,
    q1: DevBuf<f32>,
    zseq: DevBuf<f32>,
    p: DevBuf<f32>,
    te: DevBuf<f32>,
    k3: DevBuf<f32>,
    v3: DevBuf<f32>,
    bq: DevBuf<f32>,
    hb: DevBuf<f32>,
    he: DevBuf<f32>,
    scores: DevBuf<f32>,
    heads: DevBuf<f32>,
}

impl Buffers {
    fn new(exec: &Exec, dims: &Dims, cap: usize) -> Result<Self, CudaError> {
        let s = exec.stream();
        let Dims {
            e, d, a, h, t, w, ..
        } = *dims;
        let z = |len: usize| DevBuf::<f32>::zeros(s, len);
        Ok(Self {
            cap,
            za: z(cap * d)?,
            tok: DevBuf::zeros(s, cap * t)?,
            ids: DevBuf::zeros(s, cap)?,
            q1: z(cap * a)?,
            zseq: z(cap * d)?,
            p: z(cap * (a + w))?,
            te: z(cap * t * e)?,
            k3: z(cap * t * a)?,
            v3: z(cap * t * a)?,
            bq: z(cap * a)?,
            hb: z(cap * 2 * h)?,
            he: z(cap * h)?,
            scores: z(cap)?,
            heads: z(cap * 3)?,
        })
    }

    fn poison(&self, exec: &Exec) -> Result<(), CudaError> {
        for b in [
            &self.za,
            &self.q1,
            &self.zseq,
            &self.p,
            &self.te,
            &self.k3,
            &self.v3,
            &self.bq,
            &self.hb,
            &self.he,
            &self.scores,
            &self.heads,
        ] {
            exec.fill(b, f32::NAN)?;
        }
        Ok(())
    }
}

/// One call's resources: a stream (with its cuBLAS handle), buffers and a
/// host staging vector for token ids.
#[derive(Debug)]
struct Workspace {
    exec: Exec,
    bufs: Option<Buffers>,
    tok_host: Vec<u32>,
}

/// Where a pass's candidates come from.
enum Source<'a> {
    /// Already in the workspace's `za` / `tok` (uploaded).
    Uploaded,
    /// Gathered from a device table by the ids in the workspace's `ids`.
    Table(&'a GpuAdTable),
    /// Rows `start..start + n` of a device table.
    TableRange(&'a GpuAdTable, u32),
}

/// The BAR model's interaction on a CUDA device (see the module docs):
/// a [`Scorer`] whose query is a [`GpuUserState`].
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use nann::bar::{model::BarModel, BarConfig, UserFeatures};
/// use nann::cuda::{GpuBarScorer, GpuDevice};
///
/// let model = Arc::new(BarModel::random(BarConfig::default(), 1)?);
/// let scorer = GpuBarScorer::new(Arc::clone(&model), GpuDevice::get(0)?)?;
/// let user = scorer.user_state(&UserFeatures { fields: vec![0; 5], ..Default::default() })?;
/// // index.search_with(&scorer, &user, &params)?, as with the CPU BarScorer.
/// # Ok(()) }
/// ```
pub struct GpuBarScorer {
    id: u64,
    model: Arc<BarModel>,
    dev: Arc<GpuDevice>,
    options: GpuOptions,
    dims: Dims,
    host: HostUserSide,
    weights: DevWeights,
    pool: Mutex<Vec<Workspace>>,
    backend: MatmulBackend,
}

impl std::fmt::Debug for GpuBarScorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBarScorer")
            .field("device", &self.dev)
            .field("options", &self.options)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// The model's tensors by name.
struct Tensors<'m>(Vec<(String, Vec<usize>, &'m [f32])>);

impl<'m> Tensors<'m> {
    fn get(&self, name: &str) -> Result<&'m [f32], CudaError> {
        self.0
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, d)| *d)
            .ok_or_else(|| CudaError::Invalid(format!("the model has no tensor `{name}`")))
    }

    fn linear(&self, name: &str) -> Result<HostLinear, CudaError> {
        let shape = self
            .0
            .iter()
            .find(|(n, _, _)| *n == format!("{name}.weight"))
            .map(|(_, s, _)| s.clone())
            .unwrap_or_default();
        let inp = match shape[..] {
            [_, inp] => inp,
            _ => {
                return Err(CudaError::Invalid(format!(
                    "the model has no 2-D `{name}.weight`"
                )))
            }
        };
        Ok(HostLinear {
            w: self.get(&format!("{name}.weight"))?.to_vec(),
            b: self.get(&format!("{name}.bias"))?.to_vec(),
            inp,
        })
    }

    /// The only bias value of a one-output layer.
    fn scalar_bias(&self, name: &str) -> Result<f32, CudaError> {
        self.get(&format!("{name}.bias"))?
            .first()
            .copied()
            .ok_or_else(|| CudaError::Invalid(format!("`{name}.bias` is empty")))
    }
}

impl GpuBarScorer {
    /// A scorer for `model` on `device` with default [`GpuOptions`]:
    /// uploads the interaction's weights once.
    pub fn new(model: Arc<BarModel>, device: Arc<GpuDevice>) -> Result<Self, CudaError> {
        Self::with_options(model, device, GpuOptions::default())
    }

    /// A scorer with explicit options.
    pub fn with_options(
        model: Arc<BarModel>,
        device: Arc<GpuDevice>,
        options: GpuOptions,
    ) -> Result<Self, CudaError> {
        if options.max_batch == 0 || options.max_batch > 1 << 24 {
            return Err(CudaError::Invalid(format!(
                "max_batch {}: 1..=2^24",
                options.max_batch
            )));
        }
        let c = model.config();
        let (e, d, a, h, t) = (c.emb_dim, c.d_model, c.d_attn, c.head_hidden, c.ad_tokens());
        let dims = Dims {
            e,
            d,
            a,
            h,
            t,
            w: 2 * a + h,
            scale: 1.0 / (a as f32).sqrt(),
        };
        // The attention kernels' limits, checked once here rather than at
        // the first batch: sequence attention (A, D) and (A, A), token
        // attention A <= 256.
        Exec::check_attend_shared_dims(a, d)?;
        Exec::check_attend_shared_dims(a, a)?;
        let tensors = Tensors(model.tensors());
        let mut user_emb = Vec::new();
        for i in 0..c.user_field_vocab.len() {
            user_emb.push(tensors.get(&format!("emb.user.{i}"))?.to_vec());
        }
        let (ctr_q, bid_q, proj) = (
            tensors.linear("ctr_attn.q")?,
            tensors.linear("bid_attn.q")?,
            tensors.linear("ecpm.proj")?,
        );
        // S = [ctr_attn.q; bid_attn.q; ecpm.proj], [W, 3D]; its z_u block
        // and bias stay on the host for the per-request term.
        let mut stack_w = Vec::with_capacity(dims.w * 3 * d);
        let mut stack_b = Vec::with_capacity(dims.w);
        for l in [&ctr_q, &bid_q, &proj] {
            stack_w.extend_from_slice(&l.w);
            stack_b.extend_from_slice(&l.b);
        }
        if stack_w.len() != dims.w * 3 * d {
            return Err(CudaError::Invalid("the stacked projections' shape".into()));
        }
        let stack_u = HostLinear {
            w: stack_w
                .chunks_exact(3 * d)
                .flat_map(|row| row[..d].iter().copied())
                .collect(),
            b: stack_b,
            inp: d,
        };
        let host = HostUserSide {
            user_emb,
            user0: tensors.linear("user_net.0")?,
            user1: tensors.linear("user_net.1")?,
            item: tensors.get("emb.item")?.to_vec(),
            cate: tensors.get("emb.cate")?.to_vec(),
            seq_k: tensors.linear("seq_attn.k")?,
            seq_v: tensors.linear("seq_attn.v")?,
            ctr_k: tensors.linear("ctr_attn.k")?,
            ctr_v: tensors.linear("ctr_attn.v")?,
            stack_u,
        };

        let exec = Exec::new(Arc::clone(&device), options.backend)?;
        let s = exec.stream();
        let up = |name: &str| -> Result<DevBuf<f32>, CudaError> {
            DevBuf::from_host(s, tensors.get(name)?)
        };
        let tables: Vec<&[f32]> = AD_TABLES[..t]
            .iter()
            .map(|name| tensors.get(name))
            .collect::<Result<_, _>>()?;
        let weights = DevWeights {
            seq_q_w: up("seq_attn.q.weight")?,
            seq_q_b: up("seq_attn.q.bias")?,
            stack_w: DevBuf::from_host(s, &stack_w)?,
            bid_k_w: up("bid_attn.k.weight")?,
            bid_k_b: up("bid_attn.k.bias")?,
            bid_v_w: up("bid_attn.v.weight")?,
            bid_v_b: up("bid_attn.v.bias")?,
            ctr0_w: up("ctr_mlp.0.weight")?,
            ctr0_b: up("ctr_mlp.0.bias")?,
            bid0_w: up("bid_mlp.0.weight")?,
            bid0_b: up("bid_mlp.0.bias")?,
            ecpm0_w: up("ecpm_mlp.0.weight")?,
            ecpm0_b: up("ecpm_mlp.0.bias")?,
            ctr1_w: up("ctr_mlp.1.weight")?,
            ctr1_b: tensors.scalar_bias("ctr_mlp.1")?,
            bid1_w: up("bid_mlp.1.weight")?,
            bid1_b: tensors.scalar_bias("bid_mlp.1")?,
            ecpm1_w: up("ecpm_mlp.1.weight")?,
            ecpm1_b: tensors.scalar_bias("ecpm_mlp.1")?,
            tokens: TokenTables::new(s, &tables, e)?,
        };
        // The weights are read from every workspace's stream: complete
        // them first.
        exec.synchronize()?;
        let backend = exec.backend();
        let workspace = Workspace {
            exec,
            bufs: None,
            tok_host: Vec::new(),
        };
        Ok(Self {
            id: NEXT_SCORER_ID.fetch_add(1, Ordering::Relaxed),
            model,
            dev: device,
            options,
            dims,
            host,
            weights,
            pool: Mutex::new(vec![workspace]),
            backend,
        })
    }

    /// The model.
    pub fn model(&self) -> &Arc<BarModel> {
        &self.model
    }

    /// The device.
    pub fn device(&self) -> &Arc<GpuDevice> {
        &self.dev
    }

    /// The options.
    pub fn options(&self) -> &GpuOptions {
        &self.options
    }

    /// The matmul backend in use (never `Auto`).
    pub fn backend(&self) -> MatmulBackend {
        self.backend
    }

    /// Runs `f` on a pooled workspace (or a new one). A workspace whose
    /// call failed is synchronised (so nothing it launched still reads
    /// the caller's buffers) and dropped, not pooled.
    fn with_workspace<R>(
        &self,
        f: impl FnOnce(&mut Workspace) -> Result<R, CudaError>,
    ) -> Result<R, CudaError> {
        let pooled = self
            .pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        let mut ws = match pooled {
            Some(ws) => ws,
            None => Workspace {
                exec: Exec::new(Arc::clone(&self.dev), self.options.backend)?,
                bufs: None,
                tok_host: Vec::new(),
            },
        };
        let result = f(&mut ws);
        match result {
            Ok(_) => self
                .pool
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(ws),
            Err(_) => {
                let _ = ws.exec.synchronize();
            }
        }
        result
    }

    /// Buffers for `n` rows (a power-of-two bucket >= 256, at most
    /// `max_batch`; `n <= max_batch`).
    fn ensure<'w>(
        &self,
        ws: &'w mut Workspace,
        n: usize,
    ) -> Result<(&'w Exec, &'w Buffers), CudaError> {
        let need = n.max(1);
        let fits = ws.bufs.as_ref().is_some_and(|b| b.cap >= need);
        if !fits {
            let cap = need
                .max(256)
                .checked_next_power_of_two()
                .unwrap_or(need)
                .min(self.options.max_batch)
                .max(need);
            ws.bufs = None; // free the old set first
            ws.bufs = Some(Buffers::new(&ws.exec, &self.dims, cap)?);
        }
        let bufs = ws
            .bufs
            .as_ref()
            .ok_or_else(|| CudaError::Invalid("workspace buffers".into()))?;
        Ok((&ws.exec, bufs))
    }

    fn check_user(&self, user: &GpuUserState) -> Result<(), CudaError> {
        if user.scorer != self.id {
            return Err(CudaError::Invalid(
                "the user state was made by another GpuBarScorer".into(),
            ));
        }
        Ok(())
    }

    /// The user side of a request, computed on the host and uploaded once:
    /// checks the features, keeps the last `max_seq_len` sequence entries,
    /// drops padding (item id 0), and precomputes the sequence keys and
    /// values and the `z_u` term of `[q2 | q3 | p]`.
    pub fn user_state(&self, features: &UserFeatures) -> Result<GpuUserState, CudaError> {
        let c = self.model.config();
        features.check(c)?;
        let Dims { e, d, a, w, .. } = self.dims;
        let hs = &self.host;
        let row = |table: &[f32], id: u32| -> Result<Vec<f32>, CudaError> {
            let start = id as usize * e;
            table
                .get(start..start + e)
                .map(<[f32]>::to_vec)
                .ok_or_else(|| CudaError::Invalid(format!("id {id} outside its table")))
        };
        let mut x = Vec::with_capacity(hs.user_emb.len() * e);
        for (table, &id) in hs.user_emb.iter().zip(&features.fields) {
            x.extend(row(table, id)?);
        }
        let z_u = hs.user1.apply(&hs.user0.apply(&x, true)?, false)?;
        let start = features.seq_items.len().saturating_sub(c.max_seq_len);
        let (mut k1, mut v1, mut k2, mut v2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut lu = 0;
        for (&item, &cate) in features.seq_items[start..]
            .iter()
            .zip(&features.seq_cates[start..])
        {
            if item == 0 {
                continue;
            }
            let mut s = row(&hs.item, item)?;
            s.extend(row(&hs.cate, cate)?);
            k1.extend(hs.seq_k.apply(&s, false)?);
            v1.extend(hs.seq_v.apply(&s, false)?);
            k2.extend(hs.ctr_k.apply(&s, false)?);
            v2.extend(hs.ctr_v.apply(&s, false)?);
            lu += 1;
        }
        let su = hs.stack_u.apply(&z_u, false)?;
        debug_assert_eq!((k1.len(), v1.len(), su.len()), (lu * a, lu * d, w));
        let (o_k1, o_v1) = (0, k1.len());
        let o_k2 = o_v1 + v1.len();
        let o_v2 = o_k2 + k2.len();
        let o_su = o_v2 + v2.len();
        let mut packed = k1;
        packed.extend(v1);
        packed.extend(k2);
        packed.extend(v2);
        packed.extend(su);
        let buf = self.with_workspace(|ws| {
            let buf = DevBuf::from_host(ws.exec.stream(), &packed)?;
            // Read from any workspace's stream later: complete it now.
            ws.exec.synchronize()?;
            Ok(buf)
        })?;
        Ok(GpuUserState {
            scorer: self.id,
            lu,
            buf,
            k1: o_k1,
            v1: o_v1,
            k2: o_k2,
            v2: o_v2,
            su: o_su,
            z_u,
        })
    }

    /// The device pass for `n` candidates whose `z_a` / tokens come from
    /// `source`: scores into `scores` (`1 x n`), heads into `heads`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Exec,
        b: &Buffers,
        user: &GpuUserState,
        n: usize,
        source: Source<'_>,
        scores: &Mat<'_>,
        heads: Option<&Mat<'_>>,
        mut prof: Option<&mut Profiler>,
    ) -> Result<(), CudaError> {
        let Dims {
            e,
            d,
            a,
            h,
            t,
            w,
            scale,
        } = self.dims;
        let lu = user.lu;
        let wt = &self.weights;
        // Work per step (flops, bytes) for the profile; f32 = 4 bytes.
        let (nf, ef, df, af, hf, tf, wf, lf) = (
            n as f64, e as f64, d as f64, a as f64, h as f64, t as f64, w as f64, lu as f64,
        );
        let mut mark = |name: &'static str, flops: f64, floats: f64| -> Result<(), CudaError> {
            match prof.as_deref_mut() {
                Some(p) => p.mark(x, name, flops, 4.0 * floats),
                None => Ok(()),
            }
        };
        let za = b.za.mat(0, n, d, d)?;
        let tok = b.tok.mat(0, n, t, t)?;
        match source {
            Source::Uploaded => {}
            Source::Table(table) => {
                let ids = b.ids.mat(0, 1, n, n)?;
                x.gather_rows_f32(&table.z.mat(0, table.n, d, d)?, &ids, &za)?;
                x.gather_rows_u32(&table.tok.mat(0, table.n, t, t)?, &ids, &tok)?;
            }
            Source::TableRange(table, start) => {
                let ids = b.ids.mat(0, 1, n, n)?;
                x.iota(&ids, start)?;
                x.gather_rows_f32(&table.z.mat(0, table.n, d, d)?, &ids, &za)?;
                x.gather_rows_u32(&table.tok.mat(0, table.n, t, t)?, &ids, &tok)?;
            }
        }
        if !matches!(source, Source::Uploaded) {
            mark("gather z_a + tokens by id", 0.0, nf + 2.0 * nf * (df + tf))?;
        }
        let q1 = b.q1.mat(0, n, a, a)?;
        let zseq = b.zseq.mat(0, n, d, d)?;
        let p = b.p.mat(0, n, a + w, a + w)?;
        let (c_blk, q2, q3, pe, pq) = (
            p.sub(n, 0, a)?,
            p.sub(n, a, a)?,
            p.sub(n, 2 * a, a)?,
            p.sub(n, 3 * a, h)?,
            p.sub(n, a, w)?,
        );
        let te = b.te.mat(0, n * t, e, e)?;
        let k3 = b.k3.mat(0, n * t, a, a)?;
        let v3 = b.v3.mat(0, n * t, a, a)?;
        let bq = b.bq.mat(0, n, a, a)?;
        let hb = b.hb.mat(0, n, 2 * h, 2 * h)?;
        let (hctr, hbid) = (hb.sub(n, 0, h)?, hb.sub(n, h, h)?);
        let he = b.he.mat(0, n, h, h)?;
        let (k1, v1, k2, v2, su) = (
            user.buf.mat(user.k1, lu, a, a)?,
            user.buf.mat(user.v1, lu, d, d)?,
            user.buf.mat(user.k2, lu, a, a)?,
            user.buf.mat(user.v2, lu, a, a)?,
            user.buf.mat(user.su, 1, w, w)?,
        );

        // z_seq = attend(seq_attn.q(z_a), K1, V1).
        x.linear(
            &za,
            &wt.seq_q_w.mat(0, a, d, d)?,
            Some(&wt.seq_q_b.row()?),
            &q1,
            0.0,
            Act::None,
        )?;
        mark(
            "q1 = seq_attn.q(z_a)            linear",
            2.0 * nf * df * af,
            nf * df + af * df + nf * af,
        )?;
        x.attend_shared(&q1, &k1, &v1, scale, &zseq)?;
        mark(
            "z_seq = attend(q1, K1, V1)      attend_shared",
            2.0 * nf * lf * (af + df),
            nf * af + lf * (af + df) + nf * df,
        )?;
        // [q2 | q3 | p] = S z_ua + b_S, z_ua = [z_u | z_seq | z_a]: the z_u
        // part (with the bias) per request, the rest per candidate.
        let s_full = wt.stack_w.mat(0, w, 3 * d, 3 * d)?;
        x.fill_rows(&pq, &su)?;
        x.linear(&zseq, &s_full.sub(w, d, d)?, None, &pq, 1.0, Act::None)?;
        x.linear(&za, &s_full.sub(w, 2 * d, d)?, None, &pq, 1.0, Act::None)?;
        mark(
            "[q2|q3|p] = S z_ua              fill + 2 linear",
            4.0 * nf * df * wf,
            2.0 * nf * df + 2.0 * df * wf + nf * wf,
        )?;
        // pCTR attention: c = attend(q2, K2, V2), beside q2 in P.
        x.attend_shared(&q2, &k2, &v2, scale, &c_blk)?;
        mark(
            "c = attend(q2, K2, V2)          attend_shared",
            4.0 * nf * lf * af,
            2.0 * nf * af + 2.0 * lf * af,
        )?;
        // pBid attention over the ad's own tokens.
        x.gather_tokens(&wt.tokens, &tok, &te)?;
        mark(
            "t_j = emb[tokens]               gather_tokens",
            0.0,
            nf * tf + nf * tf * ef,
        )?;
        x.linear(
            &te,
            &wt.bid_k_w.mat(0, a, e, e)?,
            Some(&wt.bid_k_b.row()?),
            &k3,
            0.0,
            Act::None,
        )?;
        x.linear(
            &te,
            &wt.bid_v_w.mat(0, a, e, e)?,
            Some(&wt.bid_v_b.row()?),
            &v3,
            0.0,
            Act::None,
        )?;
        mark(
            "k_j, v_j = bid_attn.k/v(t_j)    2 linear",
            4.0 * nf * tf * ef * af,
            nf * tf * ef + 2.0 * nf * tf * af + 2.0 * af * ef,
        )?;
        x.attend_rows(&q3, &k3, &v3, t, scale, &bq)?;
        mark(
            "b = attend_j(q3, k_j, v_j)      attend_rows",
            4.0 * nf * tf * af,
            2.0 * nf * af + 2.0 * nf * tf * af,
        )?;
        // h_ctr = relu(ctr_mlp.0([c | q2])).
        x.linear(
            &p.sub(n, 0, 2 * a)?,
            &wt.ctr0_w.mat(0, h, 2 * a, 2 * a)?,
            Some(&wt.ctr0_b.row()?),
            &hctr,
            0.0,
            Act::Relu,
        )?;
        mark(
            "h_ctr = relu(ctr_mlp.0([c|q2])) linear",
            4.0 * nf * af * hf,
            2.0 * nf * af + 2.0 * af * hf + nf * hf,
        )?;
        // h_bid = relu(bid_mlp.0([b | q3])): b's columns, then q3's.
        let bid0 = wt.bid0_w.mat(0, h, 2 * a, 2 * a)?;
        x.linear(
            &bq,
            &bid0.sub(h, 0, a)?,
            Some(&wt.bid0_b.row()?),
            &hbid,
            0.0,
            Act::None,
        )?;
        x.linear(&q3, &bid0.sub(h, a, a)?, None, &hbid, 1.0, Act::Relu)?;
        mark(
            "h_bid = relu(bid_mlp.0([b|q3])) 2 linear",
            4.0 * nf * af * hf,
            2.0 * nf * af + 2.0 * af * hf + nf * hf,
        )?;
        // e = relu(ecpm_mlp.0([h_ctr | h_bid | p])).
        let e0 = wt.ecpm0_w.mat(0, h, 3 * h, 3 * h)?;
        x.linear(
            &hb,
            &e0.sub(h, 0, 2 * h)?,
            Some(&wt.ecpm0_b.row()?),
            &he,
            0.0,
            Act::None,
        )?;
        x.linear(&pe, &e0.sub(h, 2 * h, h)?, None, &he, 1.0, Act::Relu)?;
        mark(
            "e = relu(ecpm_mlp.0(...))       2 linear",
            6.0 * nf * hf * hf,
            3.0 * nf * hf + 3.0 * hf * hf + nf * hf,
        )?;
        let last = BarLastLayers {
            ctr: wt.ctr1_w.mat(0, 1, h, h)?,
            ctr_b: wt.ctr1_b,
            bid: wt.bid1_w.mat(0, 1, h, h)?,
            bid_b: wt.bid1_b,
            ecpm: wt.ecpm1_w.mat(0, 1, h, h)?,
            ecpm_b: wt.ecpm1_b,
        };
        x.bar_outputs(&hb, &he, &last, scores, heads)?;
        mark(
            "score = ecpm_mlp.1(e)           bar_outputs",
            2.0 * nf * hf,
            nf * hf + nf,
        )
    }

    /// Checks a candidate set's shapes and tokens.
    fn check_candidates(
        &self,
        z_a: &[f32],
        n: usize,
        out_len: usize,
        out_what: &str,
    ) -> Result<(), CudaError> {
        let d = self.dims.d;
        if n.checked_mul(d) != Some(z_a.len()) {
            return Err(CudaError::Invalid(format!(
                "{} floats of z_a for {n} candidates of dimension {d}",
                z_a.len()
            )));
        }
        if out_len != n {
            return Err(CudaError::Invalid(format!(
                "{out_what} has {out_len} entries for {n} candidates"
            )));
        }
        Ok(())
    }

    /// Scores (and optionally heads) of host candidates, in chunks of
    /// `max_batch`: `z_a` `n x D`, `ids` the `n x T` checked token ids.
    fn run_host(
        &self,
        ws: &mut Workspace,
        user: &GpuUserState,
        z_a: &[f32],
        ids: &[u32],
        out: &mut [f32],
        mut heads: Option<&mut [f32]>,
    ) -> Result<(), CudaError> {
        let Dims { d, t, .. } = self.dims;
        let n = out.len();
        let chunk = self.options.max_batch;
        let mut start = 0;
        while start < n {
            let m = chunk.min(n - start);
            let (x, b) = self.ensure(ws, m)?;
            if self.options.poison {
                b.poison(x)?;
            }
            b.za.upload(x.stream(), 0, &z_a[start * d..(start + m) * d])?;
            b.tok
                .upload(x.stream(), 0, &ids[start * t..(start + m) * t])?;
            let scores = b.scores.mat(0, 1, m, m)?;
            let hm = b.heads.mat(0, m, 3, 3)?;
            self.forward(
                x,
                b,
                user,
                m,
                Source::Uploaded,
                &scores,
                heads.as_ref().map(|_| &hm),
                None,
            )?;
            if let Some(h) = heads.as_deref_mut() {
                b.heads
                    .download(x.stream(), 0, &mut h[start * 3..(start + m) * 3])?;
            }
            b.scores
                .download(x.stream(), 0, &mut out[start..start + m])?;
            start += m;
        }
        Ok(())
    }

    /// The retrieval score of every candidate into `out` (`z_a` is `n x
    /// d_model`, row-major; `out.len() == tokens.len()`): the device
    /// counterpart of [`BarModel::score_into`].
    pub fn score_into(
        &self,
        user: &GpuUserState,
        z_a: &[f32],
        tokens: &[AdTokens],
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        self.check_user(user)?;
        self.check_candidates(z_a, tokens.len(), out.len(), "the output")?;
        if tokens.is_empty() {
            return Ok(());
        }
        let c = self.model.config();
        let mut ids = Vec::with_capacity(tokens.len() * self.dims.t);
        for tok in tokens {
            ids.extend_from_slice(AdTokens::from_ids(c, tok.ids())?.ids());
        }
        self.with_workspace(|ws| self.run_host(ws, user, z_a, &ids, out, None))
    }

    /// All three heads of every candidate: the device counterpart of
    /// [`BarModel::heads`].
    pub fn heads(
        &self,
        user: &GpuUserState,
        z_a: &[f32],
        tokens: &[AdTokens],
    ) -> Result<Vec<Heads>, CudaError> {
        self.check_user(user)?;
        self.check_candidates(z_a, tokens.len(), tokens.len(), "the output")?;
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.model.config();
        let mut ids = Vec::with_capacity(tokens.len() * self.dims.t);
        for tok in tokens {
            ids.extend_from_slice(AdTokens::from_ids(c, tok.ids())?.ids());
        }
        let mut scores = vec![0.0; tokens.len()];
        let mut raw = vec![0.0; tokens.len() * 3];
        self.with_workspace(|ws| self.run_host(ws, user, z_a, &ids, &mut scores, Some(&mut raw)))?;
        Ok(raw
            .chunks_exact(3)
            .map(|h| Heads {
                pctr: h[0],
                pbid_ratio: h[1],
                score: h[2],
            })
            .collect())
    }

    /// Uploads ads (`z_a` `n x d_model` row-major, their tokens and keys)
    /// to the device once, for [`score_table`](Self::score_table) and
    /// [`top_k_table`](Self::top_k_table).
    pub fn upload_ads(
        &self,
        keys: &[u64],
        z_a: &[f32],
        tokens: &[AdTokens],
    ) -> Result<GpuAdTable, CudaError> {
        self.check_candidates(z_a, tokens.len(), keys.len(), "the keys")?;
        if u32::try_from(tokens.len()).is_err() || i32::try_from(tokens.len()).is_err() {
            return Err(CudaError::Invalid(format!(
                "{} ads: at most 2^31 - 1",
                tokens.len()
            )));
        }
        let c = self.model.config();
        let mut ids = Vec::with_capacity(tokens.len() * self.dims.t);
        for tok in tokens {
            ids.extend_from_slice(AdTokens::from_ids(c, tok.ids())?.ids());
        }
        let (z, tok) = self.with_workspace(|ws| {
            let s = ws.exec.stream();
            let z = DevBuf::from_host(s, z_a)?;
            let tok = DevBuf::from_host(s, &ids)?;
            ws.exec.synchronize()?;
            Ok((z, tok))
        })?;
        Ok(GpuAdTable {
            scorer: self.id,
            n: tokens.len(),
            z,
            tok,
            keys: keys.to_vec(),
        })
    }

    fn check_table(&self, table: &GpuAdTable) -> Result<(), CudaError> {
        if table.scorer != self.id {
            return Err(CudaError::Invalid(
                "the ad table was uploaded by another GpuBarScorer".into(),
            ));
        }
        Ok(())
    }

    /// Scores the table's ads at positions `ids` (gathered on the device:
    /// only the ids move per batch). A position past the table scores NaN.
    pub fn score_table(
        &self,
        user: &GpuUserState,
        table: &GpuAdTable,
        ids: &[u32],
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        self.check_user(user)?;
        self.check_table(table)?;
        if out.len() != ids.len() {
            return Err(CudaError::Invalid(format!(
                "an output of {} for {} ids",
                out.len(),
                ids.len()
            )));
        }
        self.with_workspace(|ws| {
            let chunk = self.options.max_batch;
            let mut start = 0;
            while start < ids.len() {
                let m = chunk.min(ids.len() - start);
                let (x, b) = self.ensure(ws, m)?;
                if self.options.poison {
                    b.poison(x)?;
                }
                b.ids.upload(x.stream(), 0, &ids[start..start + m])?;
                let scores = b.scores.mat(0, 1, m, m)?;
                self.forward(x, b, user, m, Source::Table(table), &scores, None, None)?;
                b.scores
                    .download(x.stream(), 0, &mut out[start..start + m])?;
                start += m;
            }
            Ok(())
        })
    }

    /// The table's best `k` ads for `user` (`1 <= k <= 1024`): every ad
    /// scored on the device, the top `k` selected there, best first (ties
    /// to the lower position); only `k` results cross the bus.
    pub fn top_k_table(
        &self,
        user: &GpuUserState,
        table: &GpuAdTable,
        k: usize,
    ) -> Result<Vec<ScoredHit>, CudaError> {
        self.check_user(user)?;
        self.check_table(table)?;
        if table.n == 0 {
            return Ok(Vec::new());
        }
        let best = self.with_workspace(|ws| {
            let all = DevBuf::<f32>::zeros(ws.exec.stream(), table.n)?;
            if self.options.poison {
                ws.exec.fill(&all, f32::NAN)?;
            }
            let chunk = self.options.max_batch;
            let mut start = 0;
            while start < table.n {
                let m = chunk.min(table.n - start);
                let (x, b) = self.ensure(ws, m)?;
                if self.options.poison {
                    b.poison(x)?;
                }
                let scores = all.mat(start, 1, m, m)?;
                // `start` fits u32: the table holds < 2^31 ads.
                self.forward(
                    x,
                    b,
                    user,
                    m,
                    Source::TableRange(table, start as u32),
                    &scores,
                    None,
                    None,
                )?;
                start += m;
            }
            let best = ws.exec.top_k(&all.row()?, k)?;
            Ok(best)
        })?;
        best.into_iter()
            .map(|(score, i)| {
                let key = table.key(i as usize).ok_or_else(|| {
                    CudaError::Invalid(format!("top-k returned position {i} past the table"))
                })?;
                Ok(ScoredHit { key, score })
            })
            .collect()
    }
}

impl GpuBarScorer {
    /// Times each step of the device pass for these candidates (`n <=
    /// max_batch`), `reps` times (median), including the upload of `z_a`
    /// and tokens and the download of the scores: what the benchmark
    /// compares with each step's floor.
    pub fn profile(
        &self,
        user: &GpuUserState,
        z_a: &[f32],
        tokens: &[AdTokens],
        reps: usize,
    ) -> Result<Vec<StepProfile>, CudaError> {
        self.check_user(user)?;
        let n = tokens.len();
        self.check_candidates(z_a, n, n, "the candidates")?;
        if n == 0 || n > self.options.max_batch || reps == 0 {
            return Err(CudaError::Invalid(format!(
                "profile {n} candidates x {reps}: 1..=max_batch ({}) candidates, reps >= 1",
                self.options.max_batch
            )));
        }
        let c = self.model.config();
        let mut ids = Vec::with_capacity(n * self.dims.t);
        for tok in tokens {
            ids.extend_from_slice(AdTokens::from_ids(c, tok.ids())?.ids());
        }
        let mut out = vec![0.0f32; n];
        let (d, t) = (self.dims.d, self.dims.t);
        let runs = self.with_workspace(|ws| {
            let mut runs: Vec<Vec<(&'static str, f64, f64, f64)>> = Vec::new();
            for _ in 0..reps {
                let (x, b) = self.ensure(ws, n)?;
                let mut p = Profiler { marks: Vec::new() };
                p.mark(x, "start", 0.0, 0.0)?;
                b.za.upload(x.stream(), 0, z_a)?;
                b.tok.upload(x.stream(), 0, &ids)?;
                p.mark(
                    x,
                    "upload z_a + tokens            H2D",
                    0.0,
                    4.0 * (n * (d + t)) as f64,
                )?;
                let scores = b.scores.mat(0, 1, n, n)?;
                self.forward(x, b, user, n, Source::Uploaded, &scores, None, Some(&mut p))?;
                b.scores.download(x.stream(), 0, &mut out)?;
                p.mark(x, "download scores                D2H", 0.0, 4.0 * n as f64)?;
                x.synchronize()?;
                let mut run = Vec::new();
                for pair in p.marks.windows(2) {
                    let ms = pair[0].3.elapsed_ms(&pair[1].3)? as f64;
                    run.push((pair[1].0, ms, pair[1].1, pair[1].2));
                }
                runs.push(run);
            }
            Ok(runs)
        })?;
        let steps = runs.first().map_or(0, Vec::len);
        Ok((0..steps)
            .map(|i| {
                let mut times: Vec<f64> = runs.iter().map(|r| r[i].1).collect();
                times.sort_by(f64::total_cmp);
                let (name, _, flops, bytes) = runs[0][i];
                StepProfile {
                    name,
                    ms: times[times.len() / 2],
                    flops,
                    bytes,
                }
            })
            .collect())
    }
}

impl Scorer for GpuBarScorer {
    type Query = GpuUserState;

    fn score_batch(
        &self,
        query: &GpuUserState,
        batch: &CandidateBatch<'_>,
        out: &mut [f32],
    ) -> crate::Result<()> {
        let c = self.model.config();
        if batch.dim() != self.dims.d {
            return Err(crate::Error::DimensionMismatch {
                expected: self.dims.d,
                actual: batch.dim(),
            });
        }
        if batch.payload_len() != c.payload_bytes() {
            return Err(crate::Error::Scorer {
                message: format!(
                    "candidates carry {}-byte payloads; the BAR model needs {} (its ad tokens)",
                    batch.payload_len(),
                    c.payload_bytes()
                ),
            });
        }
        self.check_user(query)?;
        self.check_candidates(batch.vectors(), batch.len(), out.len(), "the output")?;
        if batch.is_empty() {
            return Ok(());
        }
        self.with_workspace(|ws| {
            let mut ids = std::mem::take(&mut ws.tok_host);
            ids.clear();
            for p in batch.payloads().chunks_exact(c.payload_bytes()) {
                ids.extend_from_slice(AdTokens::from_payload(c, p)?.ids());
            }
            let result = self.run_host(ws, query, batch.vectors(), &ids, out, None);
            ws.tok_host = ids;
            result
        })?;
        Ok(())
    }
}
