//! `GpuTarModel`: the TAR model's generation (the decision path of
//! issue 7) as the crate's own CUDA kernels (`kernels/tar.cu`), checked
//! against the CPU reference [`TarModel`] (`tests/cuda_parity.rs`).
//!
//! It computes the equations of the [module docs of
//! `tar::model`](crate::tar::model) on the same scale-by-scale,
//! key/value-cached path as the CPU (`src/tar/model/generator.rs`), with
//! sampling on the device from uniforms the host draws from the caller's
//! [`SplitMix`] in the CPU's order (one per token, token order), so given
//! the same logits the GPU picks the same codes:
//!
//! ```text
//!  host: check inputs; draw L uniforms ─┐   one workspace (stream + buffers), reused across calls
//!  upload [history], y, uniforms ───────┴─► device, one stream, no host sync until the end:
//!
//!  c    = cond.fc2(silu(cond.fc1(y)))                              2 x linear (epilogue silu)
//!  ada  = [blocks' ada ; head_ada](silu(c))                        1 x linear (prologue silu)
//!  M    = [attr(y) ; hist(history) + hist_pos]                     2 x linear (+ add)
//!  KV_M = [cross.k ; cross.v] of every block (M)                   1 x linear
//!  for scale k (l_k tokens, offset o_k):
//!    u = k == 0 ? (c + start) + pos + level                        add3
//!              : word(down(fhat, l_k)) + pos + level               down + linear (+ add, + row)
//!    per block:  QKV[o_k..] = [q;k;v](LN0(u)(1 + s1) + b1)         linear (prologue modulate),
//!                                                                  K/V rows appended to the cache
//!                u += g1 * o(attend(Q, K[0..o_k + l_k], V[..]))     attend (block-causal = the
//!                                                                  cached prefix) + linear (gate)
//!                u += cross.o(attend(cross.q(LN(u)), KV_M))        linear (prologue LN) + attend
//!                                                                  + linear
//!                u += g2 * fc2(gelu(fc1(LN0(u)(1 + s2) + b2)))     2 x linear
//!    logits = head(LN0(u)(1 + s) + b)                              linear (prologue modulate)
//!    [guidance g != 1: the same for the unconditioned twin (y = 0, its own
//!     c, M, cache), logits = u + g (c - u)]                        guide
//!    codes, h_k = top-p(logits, u_i), codebook[codes]              top_p (no VQ: h_k = head out)
//!    fhat (+)= 0.5 up(h_k) + 0.5 phi.o(attend(phi.qkv(up(h_k))))   up + 2 x linear + attend
//!  x_hat = decoder(fhat)                                           7 launches
//!  ──► one download: [x_hat | h | codes], one synchronisation
//! ```
//!
//! 109 launches for the default model (scales 1, 4, 12, 48; 2 blocks;
//! guidance 1), 3 copies: the normalisations, activations, gates,
//! residuals and position additions are fused into the linear layers that
//! read or write them (`nann_tar_linear`'s prologue and epilogue), the
//! three projections of an attention are one layer (their weights stacked
//! at upload), and the key/value cache is the `[L, 3D]` output of that
//! layer, so nothing is copied. No CUDA graph: the CPU stand-in for the
//! driver (tools/cuda-emu), on which CI runs these paths, has none, and the
//! launch shapes depend on the history length.
//!
//! Also on the device, for parity and offline use: [`encode`], residual
//! [`quantize`] (nearest codebook rows, ties to the lowest index),
//! [`fhat_from_h`], [`decode`] and [`teacher_forced`] logits.
//!
//! Precision: fp32, sums in another order than the CPU's (held to a
//! relative error of 1e-4 against it); sampling decisions agree except
//! where the CPU's cumulative probability mass is within rounding of a
//! boundary (tests/cuda_parity.rs documents the allowance).
//!
//! [`encode`]: GpuTarModel::encode
//! [`quantize`]: GpuTarModel::quantize
//! [`fhat_from_h`]: GpuTarModel::fhat_from_h
//! [`decode`]: GpuTarModel::decode
//! [`teacher_forced`]: GpuTarModel::teacher_forced

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::context::GpuDevice;
use super::error::CudaError;
use super::memory::{DevBuf, Mat};
use super::ops::{Exec, MatmulBackend};
use crate::tar::data::SplitMix;
use crate::tar::model::{
    GenerateOptions, Generated, PlanGenerator, Quantized, TarConfig, TarError, TarModel,
};

/// Threads per block of the grid-stride kernels.
const BLOCK: u32 = 256;
/// Most blocks a grid-stride kernel is launched with.
const MAX_GRID: usize = 1 << 16;
/// Output tile of `nann_tar_linear` (rows and outputs per block).
const TILE: usize = 64;
/// Query rows per block of `nann_tar_attend` (one warp each).
const ATT_ROWS: usize = 8;
/// Codebooks up to this size sort in shared memory (`TAR_SORT_SHARED`).
const SORT_SHARED: usize = 2048;
/// Threads per block of `nann_tar_top_p` (`TAR_SAMPLE_THREADS`).
const SAMPLE_THREADS: u32 = 128;
/// LayerNorm epsilon of the model (the kernels' `TAR_LN_EPS`).
#[cfg(test)]
const LN_EPS: f32 = 1e-5;

/// Checks a size fits a kernel's `int`.
fn int(op: &'static str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::shape(op, format!("{v} does not fit a 32-bit int")))
}

/// Blocks for a grid-stride kernel over `n` elements.
fn grid_for(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize).clamp(1, MAX_GRID) as u32
}

fn cfg(grid: (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The device addresses `[start, end)` a `rows x cols` view with leading
/// dimension `ld` at `ptr` spans (`size` bytes per element).
fn span(ptr: u64, rows: usize, cols: usize, ld: usize, size: usize) -> (u64, u64) {
    let len = match rows {
        0 => 0,
        r => ((r - 1) * ld + cols) as u64,
    };
    (ptr, ptr + len * size as u64)
}

/// Whether two spans share a byte.
fn spans_meet(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 < a.1 && b.0 < b.1
}

/// Whether two float views share an element.
fn overlap(a: &Mat<'_>, b: &Mat<'_>) -> bool {
    let f = std::mem::size_of::<f32>();
    spans_meet(
        span(a.ptr(), a.rows, a.cols, a.ld, f),
        span(b.ptr(), b.rows, b.cols, b.ld, f),
    )
}

/// `nann_tar_linear`'s prologue modes (`TAR_PRO_*`).
const PRO_NONE: i32 = 0;
const PRO_LN: i32 = 1;
const PRO_MODULATE: i32 = 2;
const PRO_SILU: i32 = 3;

/// What `nann_tar_linear` applies to each input element as it loads it.
#[derive(Debug, Clone, Copy)]
enum Pro<'a> {
    None,
    /// LayerNorm with its affine parameters (`1 x k` each).
    Ln(Mat<'a>, Mat<'a>),
    /// AdaLN: `LN0(x) (1 + s) + b` (`s`, `b`: `1 x k`).
    Modulate(Mat<'a>, Mat<'a>),
    /// `silu(x)`.
    Silu,
}

/// Activation of `nann_tar_linear`'s epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TarAct {
    None = 0,
    Gelu = 1,
    Silu = 2,
}

/// One `nann_tar_linear` launch: `y = [y +] (act(pro(x) w^T + b) * gate *
/// alpha + add_alpha * add + addrow)`.
#[derive(Debug, Clone, Copy)]
struct Lin<'a> {
    x: Mat<'a>,
    pro: Pro<'a>,
    w: Mat<'a>,
    b: Mat<'a>,
    act: TarAct,
    gate: Option<Mat<'a>>,
    alpha: f32,
    add: Option<(Mat<'a>, f32)>,
    addrow: Option<Mat<'a>>,
    y: Mat<'a>,
    accumulate: bool,
}

impl<'a> Lin<'a> {
    /// `y = x w^T + b`.
    fn new(x: Mat<'a>, layer: (Mat<'a>, Mat<'a>), y: Mat<'a>) -> Self {
        Self {
            x,
            pro: Pro::None,
            w: layer.0,
            b: layer.1,
            act: TarAct::None,
            gate: None,
            alpha: 1.0,
            add: None,
            addrow: None,
            y,
            accumulate: false,
        }
    }
    fn pro(self, pro: Pro<'a>) -> Self {
        Self { pro, ..self }
    }
    fn act(self, act: TarAct) -> Self {
        Self { act, ..self }
    }
    fn gate(self, gate: Mat<'a>) -> Self {
        Self {
            gate: Some(gate),
            ..self
        }
    }
    fn alpha(self, alpha: f32) -> Self {
        Self { alpha, ..self }
    }
    fn add(self, add: Mat<'a>, add_alpha: f32) -> Self {
        Self {
            add: Some((add, add_alpha)),
            ..self
        }
    }
    fn addrow(self, row: Mat<'a>) -> Self {
        Self {
            addrow: Some(row),
            ..self
        }
    }
    fn accumulate(self, accumulate: bool) -> Self {
        Self { accumulate, ..self }
    }
}

/// `nann_tar_linear` (see [`Lin`]), shapes checked.
fn linear(x: &Exec, l: &Lin<'_>) -> Result<(), CudaError> {
    const OP: &str = "tar linear";
    let (n, k, out) = (l.x.rows, l.x.cols, l.w.rows);
    l.w.expect(OP, "the weight", out, k)?;
    l.b.expect(OP, "the bias", 1, out)?;
    l.y.expect(OP, "the output", n, out)?;
    let (pro, pa, pb) = match l.pro {
        Pro::None => (PRO_NONE, 0u64, 0u64),
        Pro::Ln(a, b) | Pro::Modulate(a, b) => {
            a.expect(OP, "a normalisation parameter", 1, k)?;
            b.expect(OP, "a normalisation parameter", 1, k)?;
            let mode = if matches!(l.pro, Pro::Ln(..)) {
                PRO_LN
            } else {
                PRO_MODULATE
            };
            (mode, a.ptr(), b.ptr())
        }
        Pro::Silu => (PRO_SILU, 0, 0),
    };
    if let Some(g) = &l.gate {
        g.expect(OP, "the gate", 1, out)?;
    }
    if let Some((a, _)) = &l.add {
        a.expect(OP, "the addend", n, out)?;
    }
    if let Some(r) = &l.addrow {
        r.expect(OP, "the added row", 1, out)?;
    }
    if overlap(&l.x, &l.y) {
        return Err(CudaError::shape(OP, "the input and the output overlap"));
    }
    if n == 0 || out == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(CudaError::shape(OP, "an empty inner dimension"));
    }
    let grid_y = n.div_ceil(TILE);
    if grid_y > 65_535 {
        return Err(CudaError::shape(
            OP,
            format!("{n} rows: at most {}", 65_535 * TILE),
        ));
    }
    let (px, ldx, pw, ldw, pbias) = (l.x.ptr(), l.x.ld_i32(), l.w.ptr(), l.w.ld_i32(), l.b.ptr());
    let act = l.act as i32;
    let pg = l.gate.map_or(0, |g| g.ptr());
    let (padd, ldadd, add_alpha) = l
        .add
        .map_or((0, 0, 0.0f32), |(a, s)| (a.ptr(), a.ld_i32(), s));
    let prow = l.addrow.map_or(0, |r| r.ptr());
    let (py, ldy) = (l.y.ptr(), l.y.ld_i32());
    let (rows, outs, kk) = (int(OP, n)?, int(OP, out)?, int(OP, k)?);
    let (alpha, acc) = (l.alpha, i32::from(l.accumulate));
    let f = x.device().function("nann_tar_linear")?;
    let mut b = x.stream().launch_builder(f);
    b.arg(&px)
        .arg(&ldx)
        .arg(&pro)
        .arg(&pa)
        .arg(&pb)
        .arg(&pw)
        .arg(&ldw)
        .arg(&pbias)
        .arg(&act)
        .arg(&pg)
        .arg(&alpha)
        .arg(&padd)
        .arg(&ldadd)
        .arg(&add_alpha)
        .arg(&prow)
        .arg(&py)
        .arg(&ldy)
        .arg(&rows)
        .arg(&outs)
        .arg(&kk)
        .arg(&acc);
    let grid = (out.div_ceil(TILE) as u32, grid_y as u32);
    // SAFETY: nann_tar_linear(const float* x, int ldx, int pro, const float*
    // pa, const float* pb, const float* w, int ldw, const float* bias, int
    // act, const float* gate, float alpha, const float* add, int ldadd, float
    // add_alpha, const float* addrow, float* y, int ldy, int rows, int outs,
    // int k, int accumulate) matches the pushed (u64, i32, i32, u64, u64,
    // u64, i32, u64, i32, u64, f32, u64, i32, f32, u64, u64, i32, i32, i32,
    // i32, i32). Every access is guarded by r < rows, o < outs, c < k: it
    // reads x (rows x k), w (outs x k), bias, gate, addrow (1 x outs), add
    // (rows x outs), pa / pb (1 x k, read only for modes 1 and 2, where they
    // are the checked views) and reads / writes y (rows x outs): all views
    // checked above to lie in their allocations; null (0) pointers are
    // never dereferenced. 256 threads as its launch bounds require; static
    // shared memory 26.5 kB.
    unsafe { b.launch(cfg(grid, 256)) }?;
    Ok(())
}

/// `nann_tar_attend`: `heads` heads of width `q.cols / heads`, each query
/// row of `q` over the `k.rows` keys and values.
fn attend(
    x: &Exec,
    q: &Mat<'_>,
    k: &Mat<'_>,
    v: &Mat<'_>,
    heads: usize,
    out: &Mat<'_>,
) -> Result<(), CudaError> {
    const OP: &str = "tar attend";
    let (nq, width, len) = (q.rows, q.cols, k.rows);
    k.expect(OP, "the keys", len, width)?;
    v.expect(OP, "the values", len, width)?;
    out.expect(OP, "the output", nq, width)?;
    if heads == 0 || width % heads != 0 || width == 0 {
        return Err(CudaError::shape(
            OP,
            format!("width {width} is not a positive multiple of {heads} heads"),
        ));
    }
    if nq == 0 {
        return Ok(());
    }
    let hd = width / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let grid = (nq.div_ceil(ATT_ROWS), heads);
    if grid.1 > 65_535 || grid.0 > i32::MAX as usize {
        return Err(CudaError::shape(OP, format!("{nq} queries, {heads} heads")));
    }
    let (pq, ldq, pk, ldk, pv, ldv) = (
        q.ptr(),
        q.ld_i32(),
        k.ptr(),
        k.ld_i32(),
        v.ptr(),
        v.ld_i32(),
    );
    let (n, l, h) = (int(OP, nq)?, int(OP, len)?, int(OP, hd)?);
    let (po, ldo) = (out.ptr(), out.ld_i32());
    let f = x.device().function("nann_tar_attend")?;
    let mut b = x.stream().launch_builder(f);
    b.arg(&pq)
        .arg(&ldq)
        .arg(&pk)
        .arg(&ldk)
        .arg(&pv)
        .arg(&ldv)
        .arg(&n)
        .arg(&l)
        .arg(&h)
        .arg(&scale)
        .arg(&po)
        .arg(&ldo);
    // SAFETY: nann_tar_attend(const float* q, int ldq, const float* k, int
    // ldk, const float* v, int ldv, int nq, int len, int hd, float scale,
    // float* out, int ldo) matches the pushed (u64, i32, u64, i32, u64, i32,
    // i32, i32, i32, f32, u64, i32). Warp (r, head) reads q[r, head hd ..
    // (head + 1) hd) for r < nq, k and v rows t < len in the same columns,
    // and writes out[r, same columns]; heads hd = width, so every access is
    // inside the checked views (nq x width, len x width, nq x width). 256
    // threads; static shared memory 1 kB.
    unsafe { b.launch(cfg((grid.0 as u32, grid.1 as u32), 256)) }?;
    Ok(())
}

/// The leading dimension `nann_tar_add3` reads an operand with: its own
/// for a `rows x cols` view, 0 (broadcast) for a `1 x cols` one.
fn add3_ld(op: &'static str, m: &Mat<'_>, rows: usize, cols: usize) -> Result<i32, CudaError> {
    if m.cols == cols && m.rows == rows {
        Ok(m.ld_i32())
    } else if m.cols == cols && m.rows == 1 {
        Ok(0)
    } else {
        Err(CudaError::shape(
            op,
            format!("an operand of {} x {} for {rows} x {cols}", m.rows, m.cols),
        ))
    }
}

/// `y = (a + b) + c` elementwise, each operand `y`'s shape or one
/// broadcast row.
fn add3(
    x: &Exec,
    y: &Mat<'_>,
    a: &Mat<'_>,
    b: &Mat<'_>,
    c: Option<&Mat<'_>>,
) -> Result<(), CudaError> {
    const OP: &str = "tar add3";
    let (rows, cols) = (y.rows, y.cols);
    let (lda, ldb) = (add3_ld(OP, a, rows, cols)?, add3_ld(OP, b, rows, cols)?);
    let ldc = match c {
        Some(c) => add3_ld(OP, c, rows, cols)?,
        None => 0,
    };
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    int(OP, rows * cols)?;
    let (py, ldy, pa, pb, pc) = (
        y.ptr(),
        y.ld_i32(),
        a.ptr(),
        b.ptr(),
        c.map_or(0, |c| c.ptr()),
    );
    let (r, cc) = (int(OP, rows)?, int(OP, cols)?);
    let f = x.device().function("nann_tar_add3")?;
    let mut bl = x.stream().launch_builder(f);
    bl.arg(&py)
        .arg(&ldy)
        .arg(&pa)
        .arg(&lda)
        .arg(&pb)
        .arg(&ldb)
        .arg(&pc)
        .arg(&ldc)
        .arg(&r)
        .arg(&cc);
    // SAFETY: nann_tar_add3(float* y, int ldy, const float* a, int lda, const
    // float* b, int ldb, const float* cc, int ldc, int rows, int cols)
    // matches (u64, i32, u64, i32, u64, i32, u64, i32, i32, i32). Element
    // (r, c), r < rows, c < cols, writes y[r, c] (the checked view) and reads
    // row r (or row 0 with ld 0, a 1 x cols view) of each operand: inside
    // the views checked by add3_ld; cc is not read when null.
    unsafe { bl.launch(cfg((grid_for(rows * cols), 1), BLOCK)) }?;
    Ok(())
}

/// Classifier-free guidance: `out = u + g (c - u)` elementwise (`out`
/// may be `c`).
fn guide(x: &Exec, out: &Mat<'_>, c: &Mat<'_>, u: &Mat<'_>, g: f32) -> Result<(), CudaError> {
    const OP: &str = "tar guide";
    let (rows, cols) = (out.rows, out.cols);
    c.expect(OP, "the conditioned outputs", rows, cols)?;
    u.expect(OP, "the unconditioned outputs", rows, cols)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    int(OP, rows * cols)?;
    let (po, ldo, pc, ldc, pu, ldu) = (
        out.ptr(),
        out.ld_i32(),
        c.ptr(),
        c.ld_i32(),
        u.ptr(),
        u.ld_i32(),
    );
    let (r, cc) = (int(OP, rows)?, int(OP, cols)?);
    let f = x.device().function("nann_tar_guide")?;
    let mut b = x.stream().launch_builder(f);
    b.arg(&po)
        .arg(&ldo)
        .arg(&pc)
        .arg(&ldc)
        .arg(&pu)
        .arg(&ldu)
        .arg(&r)
        .arg(&cc)
        .arg(&g);
    // SAFETY: nann_tar_guide(float* out, int ldo, const float* c, int ldc,
    // const float* u, int ldu, int rows, int cols, float g) matches (u64,
    // i32, u64, i32, u64, i32, i32, i32, f32). Element (r, j), r < rows, j <
    // cols, reads c[r, j] and u[r, j] and then writes out[r, j]: inside the
    // three checked rows x cols views (out may be c: each element is read
    // before it is written by the same thread).
    unsafe { b.launch(cfg((grid_for(rows * cols), 1), BLOCK)) }?;
    Ok(())
}

/// `out = down(u, out.rows)` (adaptive average pooling of `u`'s rows).
fn down(x: &Exec, u: &Mat<'_>, out: &Mat<'_>) -> Result<(), CudaError> {
    const OP: &str = "tar down";
    let (t, width, n) = (u.rows, u.cols, out.rows);
    out.expect(OP, "the output", n, width)?;
    if n == 0 || width == 0 {
        return Ok(());
    }
    if n > t {
        return Err(CudaError::shape(OP, format!("{t} rows down to {n}")));
    }
    int(OP, n * width)?;
    int(OP, (n + 1) * t)?;
    let (pu, ldu, tt, nn, w, po, ldo) = (
        u.ptr(),
        u.ld_i32(),
        int(OP, t)?,
        int(OP, n)?,
        int(OP, width)?,
        out.ptr(),
        out.ld_i32(),
    );
    let f = x.device().function("nann_tar_down")?;
    let mut b = x.stream().launch_builder(f);
    b.arg(&pu)
        .arg(&ldu)
        .arg(&tt)
        .arg(&nn)
        .arg(&w)
        .arg(&po)
        .arg(&ldo);
    // SAFETY: nann_tar_down(const float* u, int ldu, int t, int n, int width,
    // float* out, int ldo) matches (u64, i32, i32, i32, i32, u64, i32). Bin
    // i < n reads rows floor(i t / n) .. ceil((i + 1) t / n) <= t of u
    // (columns < width: the checked t x width view) and writes out[i, c]
    // (the n x width view); 1 <= n <= t keeps every bin non-empty.
    unsafe { b.launch(cfg((grid_for(n * width), 1), BLOCK)) }?;
    Ok(())
}

/// The interpolation `up` from one scale to `T` rows: per target row
/// `(i0, i1)` and `w`, computed on the host by the CPU's formula.
///
/// Invariant (by construction in [`GpuTarModel::new`]): every index is
/// below `n`, the scale's length.
#[derive(Debug, Clone, Copy)]
struct UpTable {
    /// The scale's length.
    n: usize,
    /// Offset of `(i0, i1)` pairs (`2 T` ints) in `up_idx`.
    idx: usize,
    /// Weights `w` (`T` floats) in the arena.
    w: Slot,
}

/// `out = up(h, T)` with `table` (`h` has exactly `table.n` rows).
fn up(
    x: &Exec,
    h: &Mat<'_>,
    idx: &Mat<'_, i32>,
    wt: &Mat<'_>,
    n: usize,
    out: &Mat<'_>,
) -> Result<(), CudaError> {
    const OP: &str = "tar up";
    let (t, width) = (out.rows, out.cols);
    h.expect(OP, "the scale's rows", n, width)?;
    idx.expect(OP, "the index table", 1, 2 * t)?;
    wt.expect(OP, "the weight table", 1, t)?;
    if t == 0 || width == 0 {
        return Ok(());
    }
    int(OP, t * width)?;
    let (ph, ldh, pi, pw, tt, w, po, ldo) = (
        h.ptr(),
        h.ld_i32(),
        idx.ptr(),
        wt.ptr(),
        int(OP, t)?,
        int(OP, width)?,
        out.ptr(),
        out.ld_i32(),
    );
    let f = x.device().function("nann_tar_up")?;
    let mut b = x.stream().launch_builder(f);
    b.arg(&ph)
        .arg(&ldh)
        .arg(&pi)
        .arg(&pw)
        .arg(&tt)
        .arg(&w)
        .arg(&po)
        .arg(&ldo);
    // SAFETY: nann_tar_up(const float* h, int ldh, const int* idx, const
    // float* wt, int t, int width, float* out, int ldo) matches (u64, i32,
    // u64, u64, i32, i32, u64, i32). Row i < t reads idx[2 i], idx[2 i + 1]
    // and wt[i] (the checked 1 x 2t and 1 x t views), h rows idx[..] < n
    // (the UpTable invariant; h is checked n x width) and writes out[i, c]
    // for c < width (the t x width view).
    unsafe { b.launch(cfg((grid_for(t * width), 1), BLOCK)) }?;
    Ok(())
}

/// The operands of one `nann_tar_top_p` launch.
struct TopP<'a> {
    logits: Mat<'a>,
    u: Mat<'a, f64>,
    keys: Mat<'a, u64>,
    probs: Mat<'a>,
    codebook: Mat<'a>,
    h: Mat<'a>,
    codes: Mat<'a>,
    top_p: f32,
    temperature: f32,
}

/// Top-p sampling of each row of `logits` with its uniform in `u`: the
/// codes (as floats) and their codebook rows.
fn top_p(x: &Exec, s: &TopP<'_>) -> Result<(), CudaError> {
    const OP: &str = "tar top_p";
    let (n, v) = (s.logits.rows, s.logits.cols);
    let c = s.codebook.cols;
    s.u.expect(OP, "the uniforms", 1, n)?;
    s.codebook.expect(OP, "the codebook", v, c)?;
    s.h.expect(OP, "the codebook rows", n, c)?;
    s.codes.expect(OP, "the codes", 1, n)?;
    if !s.codebook.is_contiguous() {
        return Err(CudaError::shape(OP, "the codebook must be contiguous"));
    }
    if n == 0 {
        return Ok(());
    }
    if v == 0 || v > 1 << 16 {
        return Err(CudaError::shape(OP, format!("{v} entries: 1..=65536")));
    }
    let p2 = v.next_power_of_two();
    if p2 > SORT_SHARED {
        s.keys.expect(OP, "the key scratch", n, p2)?;
        s.probs.expect(OP, "the probability scratch", n, v)?;
        if !s.keys.is_contiguous() || !s.probs.is_contiguous() {
            return Err(CudaError::shape(OP, "the scratch must be contiguous"));
        }
    }
    int(OP, n.saturating_mul(p2))?;
    let (pl, ldl, vv, pp2) = (s.logits.ptr(), s.logits.ld_i32(), int(OP, v)?, int(OP, p2)?);
    let (pu, pk, ppr, pcb, cc) = (
        s.u.ptr(),
        s.keys.ptr(),
        s.probs.ptr(),
        s.codebook.ptr(),
        int(OP, c)?,
    );
    let (ph, ldh, pc) = (s.h.ptr(), s.h.ld_i32(), s.codes.ptr());
    let (tp, temp) = (s.top_p, s.temperature);
    let f = x.device().function("nann_tar_top_p")?;
    let mut b = x.stream().launch_builder(f);
    b.arg(&pl)
        .arg(&ldl)
        .arg(&vv)
        .arg(&pp2)
        .arg(&tp)
        .arg(&temp)
        .arg(&pu)
        .arg(&pk)
        .arg(&ppr)
        .arg(&pcb)
        .arg(&cc)
        .arg(&ph)
        .arg(&ldh)
        .arg(&pc);
    // SAFETY: nann_tar_top_p(const float* logits, int ldl, int v, int p2,
    // float top_p, float temperature, const double* u, unsigned long long*
    // keys_scratch, float* probs_scratch, const float* codebook, int c,
    // float* h, int ldh, float* codes) matches (u64, i32, i32, i32, f32,
    // f32, u64, u64, u64, u64, i32, u64, i32, u64). Block r < n (the grid)
    // reads logits[r, 0..v) (n x v view) and u[r] (1 x n), sorts in shared
    // memory when p2 <= 2048 and otherwise in keys[r p2 .. (r + 1) p2) and
    // probs[r v .. (r + 1) v) (checked n x p2 and n x v, contiguous), reads
    // codebook row pick < v (v x c, contiguous), writes h[r, 0..c) (n x c)
    // and codes[r] (1 x n). 128 threads as its launch bounds require;
    // static shared memory 24.6 kB.
    unsafe { b.launch(cfg((n as u32, 1), SAMPLE_THREADS)) }?;
    Ok(())
}

/// Nearest codebook row of each row of `z`: the indices (as floats) and
/// the rows.
fn nearest(
    x: &Exec,
    z: &Mat<'_>,
    codebook: &Mat<'_>,
    idx: &Mat<'_>,
    h: &Mat<'_>,
) -> Result<(), CudaError> {
    const OP: &str = "tar nearest";
    let (n, c, v) = (z.rows, z.cols, codebook.rows);
    codebook.expect(OP, "the codebook", v, c)?;
    idx.expect(OP, "the indices", 1, n)?;
    h.expect(OP, "the codebook rows", n, c)?;
    if !codebook.is_contiguous() {
        return Err(CudaError::shape(OP, "the codebook must be contiguous"));
    }
    if n == 0 {
        return Ok(());
    }
    if v == 0 || v > 1 << 16 {
        return Err(CudaError::shape(OP, format!("{v} entries: 1..=65536")));
    }
    let (pz, ldz, rows, pcb, vv, cc) = (
        z.ptr(),
        z.ld_i32(),
        int(OP, n)?,
        codebook.ptr(),
        int(OP, v)?,
        int(OP, c)?,
    );
    let (pi, ph, ldh) = (idx.ptr(), h.ptr(), h.ld_i32());
    let f = x.device().function("nann_tar_nearest")?;
    let mut b = x.stream().launch_builder(f);
    b.arg(&pz)
        .arg(&ldz)
        .arg(&rows)
        .arg(&pcb)
        .arg(&vv)
        .arg(&cc)
        .arg(&pi)
        .arg(&ph)
        .arg(&ldh);
    // SAFETY: nann_tar_nearest(const float* z, int ldz, int rows, const
    // float* cb, int v, int c, float* idx, float* h, int ldh) matches (u64,
    // i32, i32, u64, i32, i32, u64, u64, i32). Warp r < rows reads z[r,
    // 0..c) (n x c view), codebook rows j < v (v x c, contiguous), writes
    // idx[r] (1 x n) and h[r, 0..c) (n x c); the picked index is < v (or 0).
    unsafe { b.launch(cfg((n.div_ceil(8) as u32, 1), 256)) }?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Weights.

/// A `rows x cols` contiguous tensor at `off` in the weight arena.
#[derive(Debug, Clone, Copy)]
struct Slot {
    off: usize,
    rows: usize,
    cols: usize,
}

/// A linear layer: `[out, in]` weight and `1 x out` bias.
#[derive(Debug, Clone, Copy)]
struct LinSlot {
    w: Slot,
    b: Slot,
}

/// LayerNorm parameters (`1 x width` each).
#[derive(Debug, Clone, Copy)]
struct NormSlot {
    w: Slot,
    b: Slot,
}

/// One generator block.
#[derive(Debug, Clone, Copy)]
struct BlockSlots {
    /// `[attn.q; attn.k; attn.v]`, `[3D, D]`.
    qkv: LinSlot,
    o: LinSlot,
    cross_ln: NormSlot,
    cross_q: LinSlot,
    cross_o: LinSlot,
    fc1: LinSlot,
    fc2: LinSlot,
}

/// The encoder or the decoder.
#[derive(Debug, Clone, Copy)]
struct CoderSlots {
    inp: LinSlot,
    pos: Slot,
    ln1: NormSlot,
    /// `[q; k; v]`, `[3E, E]`.
    qkv: LinSlot,
    o: LinSlot,
    ln2: NormSlot,
    fc1: LinSlot,
    fc2: LinSlot,
    ln: NormSlot,
    out: LinSlot,
}

/// Every tensor's place in the arena.
#[derive(Debug, Clone)]
struct Slots {
    cond1: LinSlot,
    cond2: LinSlot,
    /// `[blocks.0.ada; ...; head_ada]`, `[(6 B + 2) D, D]`.
    ada: LinSlot,
    start: Slot,
    attr: LinSlot,
    hist: LinSlot,
    hist_pos: Slot,
    /// `[blocks.0.cross.k; blocks.0.cross.v; blocks.1.cross.k; ...]`,
    /// `[2 B D, D]`.
    cross_kv: LinSlot,
    word: LinSlot,
    pos: Slot,
    level: Slot,
    blocks: Vec<BlockSlots>,
    head: LinSlot,
    codebook: Option<Slot>,
    /// `[phi.q; phi.k; phi.v]`, `[3C, C]`.
    phi_qkv: LinSlot,
    phi_o: LinSlot,
    enc: CoderSlots,
    dec: CoderSlots,
    up: Vec<UpTable>,
}

/// The model's tensors by name, and the arena being filled.
struct Builder<'m> {
    tensors: HashMap<String, (Vec<usize>, &'m [f32])>,
    arena: Vec<f32>,
}

impl<'m> Builder<'m> {
    fn get(&self, name: &str) -> Result<(&[usize], &'m [f32]), CudaError> {
        self.tensors
            .get(name)
            .map(|(s, d)| (s.as_slice(), *d))
            .ok_or_else(|| CudaError::Invalid(format!("the model has no tensor `{name}`")))
    }

    fn put(&mut self, data: &[f32], rows: usize, cols: usize) -> Result<Slot, CudaError> {
        if data.len() != rows * cols {
            return Err(CudaError::Invalid(format!(
                "internal: {} values for {rows} x {cols}",
                data.len()
            )));
        }
        let off = self.arena.len();
        self.arena.extend_from_slice(data);
        Ok(Slot { off, rows, cols })
    }

    /// A tensor as one row (a vector) or as its 2-D shape.
    fn tensor(&mut self, name: &str) -> Result<Slot, CudaError> {
        let (shape, data) = self.get(name)?;
        let (rows, cols) = match *shape {
            [n] => (1, n),
            [r, c] => (r, c),
            _ => return Err(CudaError::Invalid(format!("`{name}` has shape {shape:?}"))),
        };
        self.put(data, rows, cols)
    }

    /// The layers `names` stacked along their outputs (one layer).
    fn linear(&mut self, names: &[String]) -> Result<LinSlot, CudaError> {
        let mut w = Vec::new();
        let mut b = Vec::new();
        let mut inp = None;
        for name in names {
            let (shape, data) = self.get(&format!("{name}.weight"))?;
            let (_, bias) = self.get(&format!("{name}.bias"))?;
            let i = match *shape {
                [o, i] if o == bias.len() => i,
                _ => {
                    return Err(CudaError::Invalid(format!(
                        "`{name}.weight` has shape {shape:?} for {} biases",
                        bias.len()
                    )))
                }
            };
            if inp.is_some_and(|p| p != i) {
                return Err(CudaError::Invalid(format!(
                    "`{name}` does not stack: {i} inputs"
                )));
            }
            inp = Some(i);
            w.extend_from_slice(data);
            b.extend_from_slice(bias);
        }
        let inp = inp.ok_or_else(|| CudaError::Invalid("internal: no layer".into()))?;
        let out = b.len();
        Ok(LinSlot {
            w: self.put(&w, out, inp)?,
            b: self.put(&b, 1, out)?,
        })
    }

    fn one(&mut self, name: &str) -> Result<LinSlot, CudaError> {
        self.linear(&[name.to_string()])
    }

    fn norm(&mut self, name: &str) -> Result<NormSlot, CudaError> {
        Ok(NormSlot {
            w: self.tensor(&format!("{name}.weight"))?,
            b: self.tensor(&format!("{name}.bias"))?,
        })
    }

    fn qkv(&mut self, prefix: &str) -> Result<LinSlot, CudaError> {
        self.linear(&["q", "k", "v"].map(|p| format!("{prefix}.{p}")))
    }

    fn coder(&mut self, side: &str) -> Result<CoderSlots, CudaError> {
        Ok(CoderSlots {
            inp: self.one(&format!("{side}.in"))?,
            pos: self.tensor(&format!("{side}.pos"))?,
            ln1: self.norm(&format!("{side}.block.ln1"))?,
            qkv: self.qkv(&format!("{side}.block.attn"))?,
            o: self.one(&format!("{side}.block.attn.o"))?,
            ln2: self.norm(&format!("{side}.block.ln2"))?,
            fc1: self.one(&format!("{side}.block.mlp.fc1"))?,
            fc2: self.one(&format!("{side}.block.mlp.fc2"))?,
            ln: self.norm(&format!("{side}.ln"))?,
            out: self.one(&format!("{side}.out"))?,
        })
    }
}

/// The model's dimensions (see [`TarConfig`]).
#[derive(Debug, Clone)]
struct Dims {
    /// Step features `F`.
    f: usize,
    /// Steps `T`.
    t: usize,
    /// Attribute inputs (`attr_dim`).
    a: usize,
    /// Attribute tokens.
    at: usize,
    /// Code channels `C`.
    c: usize,
    /// Codebook entries (0 without quantisation).
    v: usize,
    /// Head outputs.
    vout: usize,
    /// VAE width `E` and heads.
    e: usize,
    vae_heads: usize,
    /// Generator width `D`, heads, blocks.
    d: usize,
    heads: usize,
    blocks: usize,
    /// Tokens over all scales `L`.
    l: usize,
    scales: Vec<usize>,
    offsets: Vec<usize>,
    quantize: bool,
}

impl Dims {
    fn new(c: &TarConfig) -> Self {
        Self {
            f: c.step_features,
            t: c.steps,
            a: c.attr_dim(),
            at: c.attr_tokens,
            c: c.code_dim,
            v: if c.quantize { c.codebook_size } else { 0 },
            vout: c.head_outputs(),
            e: c.vae_dim,
            vae_heads: c.vae_heads,
            d: c.d_model,
            heads: c.heads,
            blocks: c.blocks,
            l: c.tokens(),
            scales: c.scales.clone(),
            offsets: c.scale_offsets(),
            quantize: c.quantize,
        }
    }

    /// Rows of the memory buffer (attribute tokens and every history step).
    fn mem_rows(&self) -> usize {
        self.at + self.t
    }

    /// Floats of the output buffer: `[x_hat (T x F) | h (L x C) | codes (L)]`.
    fn out_len(&self) -> usize {
        self.t * self.f + self.l * self.c + self.l
    }
}

// ---------------------------------------------------------------------------
// Workspace.

/// The buffers of one generator session (the conditioned one, or the
/// unconditioned twin of classifier-free guidance).
#[derive(Debug)]
struct SessionBufs {
    /// `y` (`attr_dim`).
    y: DevBuf<f32>,
    /// `silu(cond.fc1(y))`, `c`, `c + start` (`D` each).
    cond: DevBuf<f32>,
    c: DevBuf<f32>,
    c_start: DevBuf<f32>,
    /// `[blocks' (g1 g2 s1 s2 b1 b2) | head (s b)]`, `(6 B + 2) D`.
    ada: DevBuf<f32>,
    /// The memory `[attr tokens ; history tokens]`, `(AT + T) x D`.
    mem: DevBuf<f32>,
    /// Its cross-attention keys and values, `(AT + T) x 2 B D`.
    mem_kv: DevBuf<f32>,
    /// Per block `L x 3D`: `[q | k | v]` of every token so far (the
    /// key/value cache; the queries of the current scale).
    cache: DevBuf<f32>,
    /// The current scale's token states (`T x D`).
    u: DevBuf<f32>,
    /// Its head outputs (`T x head_outputs`).
    head: DevBuf<f32>,
}

impl SessionBufs {
    fn new(x: &Exec, d: &Dims) -> Result<Self, CudaError> {
        let z = |len: usize| DevBuf::<f32>::zeros(x.stream(), len);
        Ok(Self {
            y: z(d.a)?,
            cond: z(d.d)?,
            c: z(d.d)?,
            c_start: z(d.d)?,
            ada: z((6 * d.blocks + 2) * d.d)?,
            mem: z(d.mem_rows() * d.d)?,
            mem_kv: z(d.mem_rows() * 2 * d.blocks * d.d)?,
            cache: z(d.blocks * d.l * 3 * d.d)?,
            u: z(d.t * d.d)?,
            head: z(d.t * d.vout)?,
        })
    }

    fn floats(&self) -> [&DevBuf<f32>; 10] {
        [
            &self.y,
            &self.cond,
            &self.c,
            &self.c_start,
            &self.ada,
            &self.mem,
            &self.mem_kv,
            &self.cache,
            &self.u,
            &self.head,
        ]
    }
}

/// One call's resources: a stream and every buffer a call uses, sized for
/// the model once and reused by later calls.
#[derive(Debug)]
struct Workspace {
    x: Exec,
    /// Input rows: the history (`n_hist x F`), or a trajectory to encode.
    inp: DevBuf<f32>,
    /// The uniforms of the draws, one per token.
    uni: DevBuf<f64>,
    /// The conditioned session.
    main: SessionBufs,
    /// The unconditioned twin (made on the first guided call).
    twin: Option<SessionBufs>,
    /// Attention outputs, cross queries (`T x D`), MLP hidden (`T x 4D`),
    /// shared by the sessions (they run one after the other).
    att: DevBuf<f32>,
    cq: DevBuf<f32>,
    hid: DevBuf<f32>,
    /// `down(fhat)` (`T x C`).
    z: DevBuf<f32>,
    /// Sort scratch of big codebooks (`T x p2` keys, `T x V` floats), else
    /// one element each.
    keys: DevBuf<u64>,
    probs: DevBuf<f32>,
    /// `up(h_k)`, phi's `[q | k | v]` and attention (`T x C`, `T x 3C`).
    upb: DevBuf<f32>,
    pqkv: DevBuf<f32>,
    patt: DevBuf<f32>,
    /// `fhat` and (quantisation) `rest`, `T x C`.
    fhat: DevBuf<f32>,
    rest: DevBuf<f32>,
    /// The VQ-VAE coder's state, `[q|k|v]`, attention, hidden.
    cu: DevBuf<f32>,
    cqkv: DevBuf<f32>,
    catt: DevBuf<f32>,
    chid: DevBuf<f32>,
    /// `[x_hat (T x F) | h (L x C) | codes (L)]`: what a generation returns.
    out: DevBuf<f32>,
}

impl Workspace {
    fn new(dev: &Arc<GpuDevice>, d: &Dims) -> Result<Self, CudaError> {
        let x = Exec::new(Arc::clone(dev), MatmulBackend::Kernel)?;
        let s = x.stream();
        let z = |len: usize| DevBuf::<f32>::zeros(s, len);
        let big = d.quantize && d.v.next_power_of_two() > SORT_SHARED;
        let (keys, probs) = if big {
            (
                DevBuf::<u64>::zeros(s, d.t * d.v.next_power_of_two())?,
                z(d.t * d.v)?,
            )
        } else {
            (DevBuf::<u64>::zeros(s, 1)?, z(1)?)
        };
        Ok(Self {
            inp: z(d.t * d.f.max(d.c))?,
            uni: DevBuf::<f64>::zeros(s, d.l)?,
            main: SessionBufs::new(&x, d)?,
            twin: None,
            att: z(d.t * d.d)?,
            cq: z(d.t * d.d)?,
            hid: z(d.t * 4 * d.d)?,
            z: z(d.t * d.c)?,
            keys,
            probs,
            upb: z(d.t * d.c)?,
            pqkv: z(d.t * 3 * d.c)?,
            patt: z(d.t * d.c)?,
            fhat: z(d.t * d.c)?,
            rest: z(d.t * d.c)?,
            cu: z(d.t * d.e)?,
            cqkv: z(d.t * 3 * d.e)?,
            catt: z(d.t * d.e)?,
            chid: z(d.t * 4 * d.e)?,
            out: z(d.out_len())?,
            x,
        })
    }

    /// Fills every float buffer with NaN: an output no kernel wrote shows.
    fn poison(&self) -> Result<(), CudaError> {
        let shared = [
            &self.inp,
            &self.att,
            &self.cq,
            &self.hid,
            &self.z,
            &self.probs,
            &self.upb,
            &self.pqkv,
            &self.patt,
            &self.fhat,
            &self.rest,
            &self.cu,
            &self.cqkv,
            &self.catt,
            &self.chid,
            &self.out,
        ];
        let twin = self.twin.iter().flat_map(SessionBufs::floats);
        for b in shared.into_iter().chain(self.main.floats()).chain(twin) {
            self.x.fill(b, f32::NAN)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The model.

/// Options of a [`GpuTarModel`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuTarOptions {
    /// Fill every device buffer with NaN before each call, so an output a
    /// kernel failed to write shows up as NaN (tests). Default off.
    pub poison: bool,
}

/// The TAR model on a CUDA device (see the module docs): weights uploaded
/// once, then [`generate`](Self::generate) at batch 1, the decision path,
/// with three uploads, 109 launches (default model) and one download per
/// call.
///
/// `Sync`: each call takes a workspace (its own stream and buffers) from a
/// pool, or makes one, so concurrent calls run on concurrent streams.
///
/// A [`PlanGenerator`]: a [`TarPolicy`](crate::tar::TarPolicy) plans with
/// it through [`with_generator`](crate::tar::TarPolicy::with_generator).
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use nann::cuda::{GpuDevice, GpuTarModel};
/// use nann::tar::data::SplitMix;
/// use nann::tar::model::{GenerateOptions, TarConfig, TarModel};
///
/// let model = TarModel::random(TarConfig::default(), 7)?;
/// let gpu = GpuTarModel::new(&model, GpuDevice::get(0)?)?;
/// let y = model.condition(Some(&[0.8, 0.95, 0.9, 3.5]));
/// let mut rng = SplitMix::new(1);
/// let out = gpu.generate(&y, &[], &GenerateOptions::default(), &mut rng)?;
/// assert_eq!(out.x_hat.len(), 48 * 17);
/// # Ok(()) }
/// ```
pub struct GpuTarModel {
    dev: Arc<GpuDevice>,
    config: TarConfig,
    options: GpuTarOptions,
    d: Dims,
    s: Slots,
    arena: DevBuf<f32>,
    up_idx: DevBuf<i32>,
    pool: Mutex<Vec<Workspace>>,
}

impl std::fmt::Debug for GpuTarModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuTarModel")
            .field("device", &self.dev)
            .field("config", &self.config)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn invalid(input: &str, message: String) -> CudaError {
    CudaError::Invalid(format!("{input}: {message}"))
}

/// A rejected input as this backend's error (the checks are the CPU
/// model's, so both reject the same inputs with the same messages).
fn from_tar(e: TarError) -> CudaError {
    match e {
        TarError::Input { input, message } => invalid(input, message),
        other => CudaError::Invalid(other.to_string()),
    }
}

/// Checks that `x` holds `rows x width` finite values.
fn check_matrix(name: &'static str, x: &[f32], rows: usize, width: usize) -> Result<(), CudaError> {
    crate::tar::model::check_matrix(name, x, rows, width).map_err(from_tar)
}

/// Where the generator's scale-`k` codes come from.
#[derive(Clone, Copy)]
enum Codes<'a> {
    /// Sampled on the device (top-p with these options), or the head's
    /// regression without quantisation: generation.
    Sample(&'a GenerateOptions),
    /// Given (`h` uploaded): teacher forcing; the head outputs stay in the
    /// main session's `head`.
    Given,
}

impl GpuTarModel {
    /// Uploads `model`'s weights to `dev` (default options).
    pub fn new(model: &TarModel, dev: Arc<GpuDevice>) -> Result<Self, CudaError> {
        Self::with_options(model, dev, GpuTarOptions::default())
    }

    /// Uploads `model`'s weights to `dev`: the generator's attention
    /// projections and its per-block ada / cross-key-value layers stacked
    /// into single layers, the interpolation tables of `up`; then makes one
    /// workspace. Errors ([`CudaError`]) on a device failure or a
    /// dimension beyond the kernels' 32-bit sizes.
    pub fn with_options(
        model: &TarModel,
        dev: Arc<GpuDevice>,
        options: GpuTarOptions,
    ) -> Result<Self, CudaError> {
        let config = model.config().clone();
        let d = Dims::new(&config);
        let mut b = Builder {
            tensors: model
                .tensors()
                .into_iter()
                .map(|(name, shape, data)| (name, (shape, data)))
                .collect(),
            arena: Vec::new(),
        };
        let blocks: Vec<String> = (0..d.blocks).map(|i| format!("gen.blocks.{i}")).collect();
        let mut ada_names: Vec<String> = blocks.iter().map(|p| format!("{p}.ada")).collect();
        ada_names.push("gen.head_ada".into());
        let kv_names: Vec<String> = blocks
            .iter()
            .flat_map(|p| [format!("{p}.cross.k"), format!("{p}.cross.v")])
            .collect();
        let mut block_slots = Vec::with_capacity(d.blocks);
        for p in &blocks {
            block_slots.push(BlockSlots {
                qkv: b.qkv(&format!("{p}.attn"))?,
                o: b.one(&format!("{p}.attn.o"))?,
                cross_ln: b.norm(&format!("{p}.cross_ln"))?,
                cross_q: b.one(&format!("{p}.cross.q"))?,
                cross_o: b.one(&format!("{p}.cross.o"))?,
                fc1: b.one(&format!("{p}.mlp.fc1"))?,
                fc2: b.one(&format!("{p}.mlp.fc2"))?,
            });
        }
        // up's tables: per scale, per target row (i0, i1) and w, by the
        // CPU's formula (src/tar/model/nn.rs, `up`).
        let mut up_idx = Vec::with_capacity(d.scales.len() * 2 * d.t);
        let mut up = Vec::with_capacity(d.scales.len());
        for &n in &d.scales {
            let mut w = Vec::with_capacity(d.t);
            let idx = up_idx.len();
            for i in 0..d.t {
                let src = ((i as f64 + 0.5) * n as f64 / d.t as f64 - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(n - 1);
                let i1 = (i0 + 1).min(n - 1);
                w.push((src - i0 as f64) as f32);
                up_idx.push(int("tar up", i0)?);
                up_idx.push(int("tar up", i1)?);
            }
            up.push(UpTable {
                n,
                idx,
                w: b.put(&w, 1, d.t)?,
            });
        }
        let s = Slots {
            cond1: b.one("gen.cond.fc1")?,
            cond2: b.one("gen.cond.fc2")?,
            ada: b.linear(&ada_names)?,
            start: b.tensor("gen.start")?,
            attr: b.one("gen.attr")?,
            hist: b.one("gen.hist")?,
            hist_pos: b.tensor("gen.hist_pos")?,
            cross_kv: b.linear(&kv_names)?,
            word: b.one("gen.word")?,
            pos: b.tensor("gen.pos")?,
            level: b.tensor("gen.level")?,
            blocks: block_slots,
            head: b.one("gen.head")?,
            codebook: if d.quantize {
                Some(b.tensor("quant.codebook")?)
            } else {
                None
            },
            phi_qkv: b.qkv("quant.phi")?,
            phi_o: b.one("quant.phi.o")?,
            enc: b.coder("enc")?,
            dec: b.coder("dec")?,
            up,
        };
        // Every size a kernel sees fits an int (checked once here).
        int("tar model", b.arena.len())?;
        int("tar model", d.l * 3 * d.d * d.blocks)?;
        int("tar model", d.t * 4 * d.d.max(d.e))?;
        int("tar model", d.t * d.vout.max(d.v.next_power_of_two()))?;
        let setup = dev.new_stream()?;
        let arena = DevBuf::from_host(&setup, &b.arena)?;
        let up_idx = DevBuf::from_host(&setup, &up_idx)?;
        setup.synchronize()?;
        let workspace = Workspace::new(&dev, &d)?;
        Ok(Self {
            dev,
            config,
            options,
            d,
            s,
            arena,
            up_idx,
            pool: Mutex::new(vec![workspace]),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &TarConfig {
        &self.config
    }

    /// The device.
    pub fn device(&self) -> &Arc<GpuDevice> {
        &self.dev
    }

    /// The options.
    pub fn options(&self) -> &GpuTarOptions {
        &self.options
    }

    /// A weight tensor's view.
    fn m(&self, s: Slot) -> Result<Mat<'_>, CudaError> {
        self.arena.mat(s.off, s.rows, s.cols, s.cols)
    }

    fn lin(&self, l: LinSlot) -> Result<(Mat<'_>, Mat<'_>), CudaError> {
        Ok((self.m(l.w)?, self.m(l.b)?))
    }

    /// Runs `f` on a pooled workspace (or a new one; with the guidance
    /// twin's buffers when `twin`), poisoned first when the options say
    /// so. A workspace whose call failed is synchronised and dropped, not
    /// pooled.
    fn with_workspace<R>(
        &self,
        twin: bool,
        f: impl FnOnce(&Workspace) -> Result<R, CudaError>,
    ) -> Result<R, CudaError> {
        let pooled = self
            .pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        let mut ws = match pooled {
            Some(ws) => ws,
            None => Workspace::new(&self.dev, &self.d)?,
        };
        if twin && ws.twin.is_none() {
            ws.twin = Some(SessionBufs::new(&ws.x, &self.d)?);
        }
        let result = if self.options.poison {
            ws.poison().and_then(|()| f(&ws))
        } else {
            f(&ws)
        };
        match result {
            Ok(_) => self
                .pool
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(ws),
            Err(_) => {
                let _ = ws.x.synchronize();
            }
        }
        result
    }

    /// Checks the generator's inputs (as the CPU does); returns `n_hist`.
    fn check_condition(&self, y: &[f32], history: &[f32]) -> Result<usize, CudaError> {
        crate::tar::model::check_condition(&self.config, y, history).map_err(from_tar)
    }

    /// Generates a trajectory as [`TarModel::generate`] does: the same
    /// validation (errors are [`CudaError::Invalid`]), the same draws from
    /// `rng` in the same order (one `rng.uniform()` per token, token
    /// order, all drawn before the device runs; none without
    /// quantisation), so given the same logits the same codes; with
    /// `guidance != 1` the unconditioned twin runs beside (all-zero `y`,
    /// the same history) and the head outputs are `u + g (c - u)`; `h` and
    /// `x_hat` computed on the device. Three uploads, one download, one
    /// synchronisation.
    pub fn generate(
        &self,
        y: &[f32],
        history: &[f32],
        opts: &GenerateOptions,
        rng: &mut SplitMix,
    ) -> Result<Generated, CudaError> {
        opts.validate().map_err(from_tar)?;
        let n_hist = self.check_condition(y, history)?;
        let d = &self.d;
        let draws: Vec<f64> = if d.quantize {
            (0..d.l).map(|_| rng.uniform()).collect()
        } else {
            Vec::new()
        };
        let guided = opts.guidance != 1.0;
        let unconditioned = vec![0.0f32; y.len()];
        let mut out = vec![0.0f32; d.out_len()];
        self.with_workspace(guided, |ws| {
            let stream = ws.x.stream();
            ws.main.y.upload(stream, 0, y)?;
            ws.inp.upload(stream, 0, history)?;
            ws.uni.upload(stream, 0, &draws)?;
            self.condition(ws, &ws.main, n_hist)?;
            let twin = match (guided, &ws.twin) {
                (true, Some(twin)) => {
                    twin.y.upload(stream, 0, &unconditioned)?;
                    self.condition(ws, twin, n_hist)?;
                    Some(twin)
                }
                _ => None,
            };
            for k in 0..d.scales.len() {
                self.run_scale(ws, k, n_hist, Codes::Sample(opts), twin)?;
                self.refine(ws, k, false)?;
            }
            let (t, f) = (d.t, d.f);
            let fhat = ws.fhat.mat(0, t, d.c, d.c)?;
            let x_hat = ws.out.mat(0, t, f, f)?;
            self.coder(ws, &self.s.dec, &fhat, &x_hat)?;
            ws.out.download(stream, 0, &mut out)
        })?;
        let (xf, lc) = (d.t * d.f, d.l * d.c);
        let x_hat = out[..xf].to_vec();
        let h = out[xf..xf + lc].to_vec();
        let codes = if d.quantize {
            d.offsets
                .windows(2)
                .map(|w| {
                    out[xf + lc + w[0]..xf + lc + w[1]]
                        .iter()
                        .map(|&c| c as u32)
                        .collect()
                })
                .collect()
        } else {
            vec![Vec::new(); d.scales.len()]
        };
        Ok(Generated { codes, h, x_hat })
    }

    /// The generator's head outputs for known `h` (`L x C`), as
    /// [`TarModel::teacher_forced`]: `L x head_outputs` (codebook logits,
    /// or the regressed `h_k` without quantisation), scale by scale on the
    /// generation's path. Synchronises once per scale.
    pub fn teacher_forced(
        &self,
        y: &[f32],
        history: &[f32],
        h: &[f32],
    ) -> Result<Vec<f32>, CudaError> {
        let n_hist = self.check_condition(y, history)?;
        let d = &self.d;
        check_matrix("h", h, d.l, d.c)?;
        let mut out = vec![0.0f32; d.l * d.vout];
        self.with_workspace(false, |ws| {
            let stream = ws.x.stream();
            ws.main.y.upload(stream, 0, y)?;
            ws.inp.upload(stream, 0, history)?;
            ws.out.upload(stream, d.t * d.f, h)?;
            self.condition(ws, &ws.main, n_hist)?;
            for k in 0..d.scales.len() {
                self.run_scale(ws, k, n_hist, Codes::Given, None)?;
                let (off, n) = (d.offsets[k], d.scales[k]);
                ws.main
                    .head
                    .download(stream, 0, &mut out[off * d.vout..(off + n) * d.vout])?;
                self.refine(ws, k, false)?;
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The VQ-VAE encoder on the device, as [`TarModel::encode`]: a
    /// normalised trajectory (`T x F`) to the latent sequence (`T x C`).
    pub fn encode(&self, x: &[f32]) -> Result<Vec<f32>, CudaError> {
        let d = &self.d;
        check_matrix("x", x, d.t, d.f)?;
        let mut out = vec![0.0f32; d.t * d.c];
        self.with_workspace(false, |ws| {
            ws.inp.upload(ws.x.stream(), 0, x)?;
            let input = ws.inp.mat(0, d.t, d.f, d.f)?;
            let f = ws.rest.mat(0, d.t, d.c, d.c)?;
            self.coder(ws, &self.s.enc, &input, &f)?;
            ws.rest.download(ws.x.stream(), 0, &mut out)
        })?;
        Ok(out)
    }

    /// The VQ-VAE decoder on the device, as [`TarModel::decode`]: `fhat`
    /// (`T x C`) to a normalised trajectory (`T x F`).
    pub fn decode(&self, fhat: &[f32]) -> Result<Vec<f32>, CudaError> {
        let d = &self.d;
        check_matrix("fhat", fhat, d.t, d.c)?;
        let mut out = vec![0.0f32; d.t * d.f];
        self.with_workspace(false, |ws| {
            ws.fhat.upload(ws.x.stream(), 0, fhat)?;
            let input = ws.fhat.mat(0, d.t, d.c, d.c)?;
            let x_hat = ws.out.mat(0, d.t, d.f, d.f)?;
            self.coder(ws, &self.s.dec, &input, &x_hat)?;
            ws.out.download(ws.x.stream(), 0, &mut out)
        })?;
        Ok(out)
    }

    /// `fhat = sum_k phi(up(h_k, T))` (`T x C`) from `h` (`L x C`), as
    /// [`TarModel::fhat_from_h`].
    pub fn fhat_from_h(&self, h: &[f32]) -> Result<Vec<f32>, CudaError> {
        let d = &self.d;
        check_matrix("h", h, d.l, d.c)?;
        let mut out = vec![0.0f32; d.t * d.c];
        self.with_workspace(false, |ws| {
            ws.out.upload(ws.x.stream(), d.t * d.f, h)?;
            for k in 0..d.scales.len() {
                self.refine(ws, k, false)?;
            }
            ws.fhat.download(ws.x.stream(), 0, &mut out)
        })?;
        Ok(out)
    }

    /// Residual quantisation of a latent sequence `f` (`T x C`) on the
    /// device, as [`TarModel::quantize`]: per scale `z_k = down(rest,
    /// l_k)`, `h_k` its nearest codebook rows (ties to the lowest index;
    /// `z_k` without quantisation), `r = phi(up(h_k, T))`, `fhat += r`,
    /// `rest -= r`.
    pub fn quantize(&self, f: &[f32]) -> Result<Quantized, CudaError> {
        let d = &self.d;
        check_matrix("f", f, d.t, d.c)?;
        let mut hc = vec![0.0f32; d.l * d.c + d.l];
        let mut fhat = vec![0.0f32; d.t * d.c];
        self.with_workspace(false, |ws| {
            let x = &ws.x;
            ws.rest.upload(x.stream(), 0, f)?;
            let rest = ws.rest.mat(0, d.t, d.c, d.c)?;
            for k in 0..d.scales.len() {
                let (off, n) = (d.offsets[k], d.scales[k]);
                let h_k = self.h_rows(ws, off, n)?;
                match self.s.codebook {
                    Some(cb) => {
                        let z = ws.z.mat(0, n, d.c, d.c)?;
                        down(x, &rest, &z)?;
                        let idx = self.code_row(ws, off, n)?;
                        nearest(x, &z, &self.m(cb)?, &idx, &h_k)?;
                    }
                    None => down(x, &rest, &h_k)?,
                }
                self.refine(ws, k, true)?;
            }
            ws.out.download(x.stream(), d.t * d.f, &mut hc)?;
            ws.fhat.download(x.stream(), 0, &mut fhat)
        })?;
        let lc = d.l * d.c;
        let codes = if d.quantize {
            d.offsets
                .windows(2)
                .map(|w| hc[lc + w[0]..lc + w[1]].iter().map(|&c| c as u32).collect())
                .collect()
        } else {
            vec![Vec::new(); d.scales.len()]
        };
        hc.truncate(lc);
        Ok(Quantized { codes, h: hc, fhat })
    }

    /// Rows `off..off + n` of `h` (in the output buffer).
    fn h_rows<'w>(&self, ws: &'w Workspace, off: usize, n: usize) -> Result<Mat<'w>, CudaError> {
        let c = self.d.c;
        ws.out.mat(self.d.t * self.d.f + off * c, n, c, c)
    }

    /// Codes `off..off + n` (as floats, in the output buffer), one row.
    fn code_row<'w>(&self, ws: &'w Workspace, off: usize, n: usize) -> Result<Mat<'w>, CudaError> {
        let d = &self.d;
        ws.out.mat(d.t * d.f + d.l * d.c + off, 1, n, n)
    }

    /// A session's conditioning from its `y` and the history in `inp`:
    /// `c`, the modulations, `c + start`, the memory and its
    /// cross-attention keys and values (7 launches).
    fn condition(&self, ws: &Workspace, sb: &SessionBufs, n_hist: usize) -> Result<(), CudaError> {
        let (d, s, x) = (&self.d, &self.s, &ws.x);
        let (dm, f) = (d.d, d.f);
        let y = sb.y.row()?;
        let cond = sb.cond.row()?;
        let c = sb.c.row()?;
        linear(x, &Lin::new(y, self.lin(s.cond1)?, cond).act(TarAct::Silu))?;
        linear(x, &Lin::new(cond, self.lin(s.cond2)?, c))?;
        linear(
            x,
            &Lin::new(c, self.lin(s.ada)?, sb.ada.row()?).pro(Pro::Silu),
        )?;
        add3(x, &sb.c_start.row()?, &c, &self.m(s.start)?, None)?;
        // Memory: the attribute tokens (one row of AT x D), then the history.
        let attr_len = d.at * dm;
        let attr = sb.mem.mat(0, 1, attr_len, attr_len)?;
        linear(x, &Lin::new(y, self.lin(s.attr)?, attr))?;
        let hist_in = ws.inp.mat(0, n_hist, f, f)?;
        let hist = sb.mem.mat(attr_len, n_hist, dm, dm)?;
        let hist_pos = self.arena.mat(s.hist_pos.off, n_hist, dm, dm)?;
        linear(
            x,
            &Lin::new(hist_in, self.lin(s.hist)?, hist).add(hist_pos, 1.0),
        )?;
        let m_rows = d.at + n_hist;
        let kv_w = 2 * d.blocks * dm;
        let mem = sb.mem.mat(0, m_rows, dm, dm)?;
        let mem_kv = sb.mem_kv.mat(0, m_rows, kv_w, kv_w)?;
        linear(x, &Lin::new(mem, self.lin(s.cross_kv)?, mem_kv))
    }

    /// One of the six `D`-chunks of block `b`'s modulation (`g1 g2 s1 s2
    /// b1 b2`), or of the head's (`b == blocks`: `s b`).
    fn ada<'w>(&self, sb: &'w SessionBufs, b: usize, i: usize) -> Result<Mat<'w>, CudaError> {
        let dm = self.d.d;
        sb.ada.mat((6 * b + i) * dm, 1, dm, dm)
    }

    /// Scale `k` through the generator: the tokens' inputs, then per
    /// session (the twin too when guided) every block (keys and values
    /// appended to the cache) and the head; then the scale's codes and
    /// `h_k` (sampled, regressed or left to the caller, see [`Codes`]).
    fn run_scale(
        &self,
        ws: &Workspace,
        k: usize,
        n_hist: usize,
        codes: Codes<'_>,
        twin: Option<&SessionBufs>,
    ) -> Result<(), CudaError> {
        let (d, s, x) = (&self.d, &self.s, &ws.x);
        let (off, n) = (d.offsets[k], d.scales[k]);
        if k > 0 {
            let fhat = ws.fhat.mat(0, d.t, d.c, d.c)?;
            down(x, &fhat, &ws.z.mat(0, n, d.c, d.c)?)?;
        }
        let h_k = self.h_rows(ws, off, n)?;
        let main_head = ws.main.head.mat(0, n, d.vout, d.vout)?;
        // Without guidance or quantisation the head writes h_k itself.
        let direct = twin.is_none() && s.codebook.is_none() && matches!(codes, Codes::Sample(_));
        let head_out = if direct { h_k } else { main_head };
        self.session_scale(ws, &ws.main, k, n_hist, &head_out)?;
        let Codes::Sample(opts) = codes else {
            return Ok(());
        };
        if let Some(twin) = twin {
            let twin_head = twin.head.mat(0, n, d.vout, d.vout)?;
            self.session_scale(ws, twin, k, n_hist, &twin_head)?;
            let target = if s.codebook.is_some() { main_head } else { h_k };
            guide(x, &target, &main_head, &twin_head, opts.guidance)?;
        }
        match s.codebook {
            Some(cb) => {
                let p2 = d.v.next_power_of_two();
                let big = p2 > SORT_SHARED;
                top_p(
                    x,
                    &TopP {
                        logits: main_head,
                        u: ws.uni.mat(off, 1, n, n)?,
                        keys: if big {
                            ws.keys.mat(0, n, p2, p2)?
                        } else {
                            ws.keys.row()?
                        },
                        probs: if big {
                            ws.probs.mat(0, n, d.v, d.v)?
                        } else {
                            ws.probs.row()?
                        },
                        codebook: self.m(cb)?,
                        h: h_k,
                        codes: self.code_row(ws, off, n)?,
                        top_p: opts.top_p,
                        temperature: opts.temperature,
                    },
                )
            }
            // No VQ: h_k is the head's regression (written above).
            None => Ok(()),
        }
    }

    /// One session's pass over scale `k` (`down(fhat)` already in `z` for
    /// `k > 0`): the tokens' inputs, every block, the head into `head`.
    fn session_scale(
        &self,
        ws: &Workspace,
        sb: &SessionBufs,
        k: usize,
        n_hist: usize,
        head: &Mat<'_>,
    ) -> Result<(), CudaError> {
        let (d, s, x) = (&self.d, &self.s, &ws.x);
        let dm = d.d;
        let (off, n) = (d.offsets[k], d.scales[k]);
        let seen = off + n;
        let u = sb.u.mat(0, n, dm, dm)?;
        let pos = self.arena.mat(s.pos.off + off * dm, n, dm, dm)?;
        let level = self.arena.mat(s.level.off + k * dm, 1, dm, dm)?;
        if k == 0 {
            add3(x, &u, &sb.c_start.row()?, &pos, Some(&level))?;
        } else {
            let z = ws.z.mat(0, n, d.c, d.c)?;
            linear(
                x,
                &Lin::new(z, self.lin(s.word)?, u)
                    .add(pos, 1.0)
                    .addrow(level),
            )?;
        }
        let att = ws.att.mat(0, n, dm, dm)?;
        let cq = ws.cq.mat(0, n, dm, dm)?;
        let m_rows = d.at + n_hist;
        let kv_w = 2 * d.blocks * dm;
        let kv = sb.mem_kv.mat(0, m_rows, kv_w, kv_w)?;
        let hid = ws.hid.mat(0, n, 4 * dm, 4 * dm)?;
        for (b, blk) in s.blocks.iter().enumerate() {
            // Block-causal self-attention: this scale's q, k, v appended to
            // the cache, its queries over the cached prefix 0..seen.
            let cache = sb.cache.mat(b * d.l * 3 * dm, d.l, 3 * dm, 3 * dm)?;
            let qkv = cache.rows(off, n)?;
            linear(
                x,
                &Lin::new(u, self.lin(blk.qkv)?, qkv)
                    .pro(Pro::Modulate(self.ada(sb, b, 2)?, self.ada(sb, b, 4)?)),
            )?;
            let prefix = cache.rows(0, seen)?;
            attend(
                x,
                &qkv.sub(n, 0, dm)?,
                &prefix.sub(seen, dm, dm)?,
                &prefix.sub(seen, 2 * dm, dm)?,
                d.heads,
                &att,
            )?;
            linear(
                x,
                &Lin::new(att, self.lin(blk.o)?, u)
                    .gate(self.ada(sb, b, 0)?)
                    .accumulate(true),
            )?;
            // Cross-attention to the memory.
            linear(
                x,
                &Lin::new(u, self.lin(blk.cross_q)?, cq)
                    .pro(Pro::Ln(self.m(blk.cross_ln.w)?, self.m(blk.cross_ln.b)?)),
            )?;
            attend(
                x,
                &cq,
                &kv.sub(m_rows, 2 * b * dm, dm)?,
                &kv.sub(m_rows, (2 * b + 1) * dm, dm)?,
                d.heads,
                &att,
            )?;
            linear(
                x,
                &Lin::new(att, self.lin(blk.cross_o)?, u).accumulate(true),
            )?;
            // Gated MLP.
            linear(
                x,
                &Lin::new(u, self.lin(blk.fc1)?, hid)
                    .pro(Pro::Modulate(self.ada(sb, b, 3)?, self.ada(sb, b, 5)?))
                    .act(TarAct::Gelu),
            )?;
            linear(
                x,
                &Lin::new(hid, self.lin(blk.fc2)?, u)
                    .gate(self.ada(sb, b, 1)?)
                    .accumulate(true),
            )?;
        }
        let head_mod = Pro::Modulate(self.ada(sb, d.blocks, 0)?, self.ada(sb, d.blocks, 1)?);
        linear(x, &Lin::new(u, self.lin(s.head)?, *head).pro(head_mod))
    }

    /// `fhat (+)= r` with `r = phi(up(h_k, T)) = 0.5 up + 0.5 phi.o(attend(
    /// phi.qkv(up)))` (scale 0 writes `fhat`, later scales add); with
    /// `rest`, also `rest -= r` (quantisation).
    fn refine(&self, ws: &Workspace, k: usize, rest: bool) -> Result<(), CudaError> {
        let (d, s, x) = (&self.d, &self.s, &ws.x);
        let (t, c) = (d.t, d.c);
        let table = s.up[k];
        let h_k = self.h_rows(ws, d.offsets[k], table.n)?;
        let upb = ws.upb.mat(0, t, c, c)?;
        up(
            x,
            &h_k,
            &self.up_idx.mat(table.idx, 1, 2 * t, 2 * t)?,
            &self.m(table.w)?,
            table.n,
            &upb,
        )?;
        let pqkv = ws.pqkv.mat(0, t, 3 * c, 3 * c)?;
        linear(x, &Lin::new(upb, self.lin(s.phi_qkv)?, pqkv))?;
        let patt = ws.patt.mat(0, t, c, c)?;
        attend(
            x,
            &pqkv.sub(t, 0, c)?,
            &pqkv.sub(t, c, c)?,
            &pqkv.sub(t, 2 * c, c)?,
            1,
            &patt,
        )?;
        let fhat = ws.fhat.mat(0, t, c, c)?;
        linear(
            x,
            &Lin::new(patt, self.lin(s.phi_o)?, fhat)
                .alpha(0.5)
                .add(upb, 0.5)
                .accumulate(k > 0),
        )?;
        if rest {
            // rest + (-(0.5 o) - 0.5 up) = rest - r, bit for bit.
            let rest = ws.rest.mat(0, t, c, c)?;
            linear(
                x,
                &Lin::new(patt, self.lin(s.phi_o)?, rest)
                    .alpha(-0.5)
                    .add(upb, -0.5)
                    .accumulate(true),
            )?;
        }
        Ok(())
    }

    /// The encoder or decoder (`coder`) from `input` (`T x in`) to `out`
    /// (`T x out`): `u = in(x) + pos`, the plain block, `out(LN(u))`.
    fn coder(
        &self,
        ws: &Workspace,
        cs: &CoderSlots,
        input: &Mat<'_>,
        out: &Mat<'_>,
    ) -> Result<(), CudaError> {
        let (d, x) = (&self.d, &ws.x);
        let (t, e) = (d.t, d.e);
        let u = ws.cu.mat(0, t, e, e)?;
        linear(
            x,
            &Lin::new(*input, self.lin(cs.inp)?, u).add(self.m(cs.pos)?, 1.0),
        )?;
        let qkv = ws.cqkv.mat(0, t, 3 * e, 3 * e)?;
        linear(
            x,
            &Lin::new(u, self.lin(cs.qkv)?, qkv).pro(Pro::Ln(self.m(cs.ln1.w)?, self.m(cs.ln1.b)?)),
        )?;
        let att = ws.catt.mat(0, t, e, e)?;
        attend(
            x,
            &qkv.sub(t, 0, e)?,
            &qkv.sub(t, e, e)?,
            &qkv.sub(t, 2 * e, e)?,
            d.vae_heads,
            &att,
        )?;
        linear(x, &Lin::new(att, self.lin(cs.o)?, u).accumulate(true))?;
        let hid = ws.chid.mat(0, t, 4 * e, 4 * e)?;
        linear(
            x,
            &Lin::new(u, self.lin(cs.fc1)?, hid)
                .pro(Pro::Ln(self.m(cs.ln2.w)?, self.m(cs.ln2.b)?))
                .act(TarAct::Gelu),
        )?;
        linear(x, &Lin::new(hid, self.lin(cs.fc2)?, u).accumulate(true))?;
        linear(
            x,
            &Lin::new(u, self.lin(cs.out)?, *out).pro(Pro::Ln(self.m(cs.ln.w)?, self.m(cs.ln.b)?)),
        )
    }
}

/// The CUDA generator as a [`PlanGenerator`], for
/// [`TarPolicy::with_generator`](crate::tar::TarPolicy::with_generator):
/// [`GpuTarModel::generate`], with the CPU model's input checks run first
/// so a rejected input is the same [`TarError::Input`] as the CPU's, and
/// every device failure a [`TarError::Backend`] (`"cuda"`).
impl PlanGenerator for GpuTarModel {
    fn backend(&self) -> &'static str {
        "cuda"
    }

    fn config(&self) -> &TarConfig {
        &self.config
    }

    fn generate(
        &self,
        y: &[f32],
        history: &[f32],
        opts: &GenerateOptions,
        rng: &mut SplitMix,
    ) -> Result<Generated, TarError> {
        opts.validate()?;
        crate::tar::model::check_condition(&self.config, y, history)?;
        GpuTarModel::generate(self, y, history, opts, rng).map_err(to_tar)
    }
}

/// A failed CUDA generation as a [`TarError::Backend`]; device failures
/// say where the same plans can be had.
fn to_tar(e: CudaError) -> TarError {
    let hint = match e {
        CudaError::Invalid(_) | CudaError::Shape { .. } | CudaError::Model(_) => "",
        _ => {
            "; the CPU model generates the same plans (TarPolicy without \
             with_generator, or TarModel::generate)"
        }
    };
    TarError::Backend {
        backend: "cuda",
        message: format!("{e}{hint}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_constants_match() {
        let src = include_str!("../../kernels/tar.cu");
        for (name, value) in [
            ("TAR_TM", TILE),
            ("TAR_TN", TILE),
            ("TAR_SORT_SHARED", SORT_SHARED),
            ("TAR_SAMPLE_THREADS", SAMPLE_THREADS as usize),
            ("TAR_PRO_NONE", PRO_NONE as usize),
            ("TAR_PRO_LN", PRO_LN as usize),
            ("TAR_PRO_MODULATE", PRO_MODULATE as usize),
            ("TAR_PRO_SILU", PRO_SILU as usize),
            ("TAR_ACT_NONE", TarAct::None as usize),
            ("TAR_ACT_GELU", TarAct::Gelu as usize),
            ("TAR_ACT_SILU", TarAct::Silu as usize),
        ] {
            assert!(
                src.contains(&format!("#define {name} {value}")),
                "{name} is not {value} in tar.cu"
            );
        }
        assert!(src.contains(&format!("#define TAR_LN_EPS {LN_EPS:e}f")));
    }

    #[test]
    fn device_failures_are_backend_errors_with_a_way_out() {
        let e = to_tar(CudaError::Driver("out of memory".into()));
        assert!(
            matches!(&e, TarError::Backend { backend: "cuda", message }
                if message.contains("out of memory") && message.contains("CPU model")),
            "{e}"
        );
        let e = to_tar(CudaError::Invalid("y: 2 values".into()));
        assert!(
            matches!(&e, TarError::Backend { message, .. } if !message.contains("CPU model")),
            "{e}"
        );
    }

    #[test]
    fn the_model_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<GpuTarModel>();
    }

    #[test]
    fn views_overlap_only_when_their_spans_meet() {
        // 2 x 3 with ld 4 at 1000: floats 0..7, bytes 1000..1028.
        let a = span(1000, 2, 3, 4, 4);
        assert_eq!(a, (1000, 1028));
        assert!(!spans_meet(a, span(1028, 1, 2, 2, 4)));
        assert!(spans_meet(a, span(1024, 1, 2, 2, 4)));
        assert!(!spans_meet(a, span(1000, 0, 3, 4, 4)));
        assert!(spans_meet(a, span(900, 1, 26, 26, 4)));
    }
}
