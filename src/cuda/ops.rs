//! The building blocks, one launcher per kernel (plus cuBLAS sgemm): the
//! pieces the BAR forward pass (scorer.rs) is assembled from, written for
//! reuse by the TAR model (matmul, softmax, layer norm, attention, gather,
//! top-k).
//!
//! ```text
//!  Exec (device + one stream + optional cuBLAS handle on that stream)
//!    linear       Y = act(beta Y + X W^T + b)   nann_linear_f32 | cuBLAS sgemm (+ fill / bias_act)
//!    attend_shared  many queries x one K/V set   nann_attend_shared_kv (online softmax)
//!    attend_rows    each row its own K/V          nann_attend_rows
//!    softmax_rows, layer_norm, fill_rows, bias_act, fill, copy
//!    gather_tokens, gather_rows_{f32,u32}, iota, top_k, bar_outputs
//! ```
//!
//! Every launcher checks its operands' shapes against each other and the
//! kernel's limits and returns [`CudaError::Shape`] instead of launching
//! out of bounds; operands are [`Mat`] views, each already checked to lie
//! inside its allocation.
//!
//! Launches are asynchronous on the `Exec`'s stream: results are there
//! after [`Exec::synchronize`] or a [`DevBuf::download`] (which waits).
//! The caller keeps to the stream discipline of [`memory`](super::memory):
//! allocate a call's buffers on the `Exec` that uses them (they are then
//! freed in stream order after its last launch); a buffer filled on another
//! stream must be complete (that stream synchronised) before use here, and
//! must outlive every launch that reads it. Breaking it gives wrong results
//! or a device fault (a [`CudaError::Driver`] at the next call), never
//! host memory unsafety: kernels touch device memory only. Those two checks are what every `unsafe` launch
//! below rests on: the kernel's signature (in `kernels/*.cu`) matches the
//! pushed arguments one for one (device addresses as `u64` for pointers,
//! `i32` for `int`, `i64` for `long long`, `f32` for `float`), and every
//! index a kernel forms stays inside the views it was given.

use std::sync::Arc;

use cudarc::cublas::sys::{cublasMath_t, cublasOperation_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};

use super::context::GpuDevice;
use super::error::CudaError;
use super::memory::{DevBuf, Mat};

/// Threads per block of the grid-stride and warp-per-row kernels.
const BLOCK: u32 = 256;
/// Rows per block of the warp-per-row kernels (`BLOCK / 32`).
const WARPS: usize = 8;
/// Most blocks a grid-stride kernel is launched with.
const MAX_GRID: usize = 1 << 16;
/// Width limit of the attention kernels (`ATT_MAX_PER_LANE * 32`).
const ATT_MAX_DIM: usize = 256;
/// Static shared-memory budget every launch stays within (no opt-in).
const SHARED_LIMIT: usize = 48 * 1024;
/// Elements one top-k block sorts.
const TOPK_N: usize = 2048;

/// Activation applied by [`Exec::linear`] and [`Exec::bias_act`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// None.
    None = 0,
    /// `max(x, 0)`, NaN kept.
    Relu = 1,
}

/// How linear layers are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulBackend {
    /// cuBLAS fp32 when the library loads, else [`Kernel`](Self::Kernel).
    #[default]
    Auto,
    /// cuBLAS `sgemm` in plain fp32 (`CUBLAS_DEFAULT_MATH`: no TF32).
    Cublas,
    /// cuBLAS with TF32 tensor cores (`CUBLAS_TF32_TENSOR_OP_MATH`): faster,
    /// 10-bit mantissa products; NOT held to the fp32 parity tolerance
    /// (see tests/cuda_parity.rs for its own).
    CublasTf32,
    /// The crate's own tiled kernel (`kernels/matmul.cu`), fp32.
    Kernel,
}

/// Checks a size fits a kernel's `int`.
fn int(op: &'static str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::shape(op, format!("{v} does not fit a 32-bit int")))
}

/// Blocks for a grid-stride kernel over `n` elements.
fn grid_for(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize).clamp(1, MAX_GRID) as u32
}

fn cfg(grid: (u32, u32), block: u32, shared: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: shared as u32,
    }
}

/// An optional operand's address (0 = null for the kernel).
fn opt_ptr<T>(m: Option<&Mat<'_, T>>) -> u64 {
    m.map_or(0, |m| m.ptr())
}

/// One stream on a device, with a cuBLAS handle bound to it when the
/// library is available: what every launcher runs on. Kernels launched on
/// one `Exec` run in launch order.
pub struct Exec {
    dev: Arc<GpuDevice>,
    stream: Arc<CudaStream>,
    blas: Option<CudaBlas>,
    backend: MatmulBackend,
}

impl std::fmt::Debug for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exec")
            .field("device", &self.dev.ordinal())
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        // cudarc's `CudaBlas::drop` unwraps cublasDestroy's status, which
        // can fail once the context holds a sticky error (an illegal
        // address, say): leak the handle then, rather than panic.
        if let Some(blas) = self.blas.take() {
            if self.stream.synchronize().is_err() {
                std::mem::forget(blas);
            }
        }
    }
}

impl Exec {
    /// A new stream on `dev` computing linear layers with `backend`
    /// ([`MatmulBackend::Auto`]: cuBLAS fp32 if it loads and initialises,
    /// else the kernel; asking for cuBLAS explicitly without it is an
    /// error).
    pub fn new(dev: Arc<GpuDevice>, backend: MatmulBackend) -> Result<Self, CudaError> {
        let stream = dev.new_stream()?;
        let blas = match backend {
            MatmulBackend::Kernel => None,
            MatmulBackend::Auto => {
                if dev.has_cublas() {
                    CudaBlas::new(Arc::clone(&stream)).ok()
                } else {
                    None
                }
            }
            MatmulBackend::Cublas | MatmulBackend::CublasTf32 => {
                if !dev.has_cublas() {
                    return Err(CudaError::Blas("libcublas could not be loaded".into()));
                }
                Some(CudaBlas::new(Arc::clone(&stream))?)
            }
        };
        let backend = match (backend, &blas) {
            (MatmulBackend::Auto, Some(_)) => MatmulBackend::Cublas,
            (MatmulBackend::Auto, None) => MatmulBackend::Kernel,
            (b, _) => b,
        };
        if let Some(blas) = &blas {
            let mode = if backend == MatmulBackend::CublasTf32 {
                cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
            } else {
                cublasMath_t::CUBLAS_DEFAULT_MATH
            };
            // SAFETY: the handle is live (owned by `blas`) and the mode is
            // one of cuBLAS's enumerators.
            unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) }.result()?;
        }
        Ok(Self {
            dev,
            stream,
            blas,
            backend,
        })
    }

    /// The backend in use (never `Auto`).
    pub fn backend(&self) -> MatmulBackend {
        self.backend
    }

    /// The device.
    pub fn device(&self) -> &Arc<GpuDevice> {
        &self.dev
    }

    /// The stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for everything launched so far.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }

    /// `y[r, :] = v` for every row of `y` (`v` is `1 x y.cols`).
    pub fn fill_rows(&self, y: &Mat<'_>, v: &Mat<'_>) -> Result<(), CudaError> {
        const OP: &str = "fill_rows";
        v.expect(OP, "the row", 1, y.cols)?;
        if y.rows == 0 || y.cols == 0 {
            return Ok(());
        }
        let (py, ldy, pv) = (y.ptr(), y.ld_i32(), v.ptr());
        let (rows, cols) = (int(OP, y.rows)?, int(OP, y.cols)?);
        let f = self.dev.function("nann_fill_rows")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&py).arg(&ldy).arg(&pv).arg(&rows).arg(&cols);
        // SAFETY: nann_fill_rows(float* y, int ldy, const float* v, int rows,
        // int cols) matches the pushed (u64, i32, u64, i32, i32); it writes
        // y[r * ldy + c] for r < rows, c < cols (inside the checked view `y`)
        // and reads v[c], c < cols (inside `v`, checked 1 x cols).
        unsafe { b.launch(cfg((grid_for(y.rows * y.cols), 1), BLOCK, 0)) }?;
        Ok(())
    }

    /// `y = act(y + bias)` (bias `1 x y.cols`, or none: activation only).
    pub fn bias_act(&self, y: &Mat<'_>, bias: Option<&Mat<'_>>, act: Act) -> Result<(), CudaError> {
        const OP: &str = "bias_act";
        if let Some(bias) = bias {
            bias.expect(OP, "the bias", 1, y.cols)?;
        }
        if y.rows == 0 || y.cols == 0 || (bias.is_none() && act == Act::None) {
            return Ok(());
        }
        let (py, ldy, pb) = (y.ptr(), y.ld_i32(), opt_ptr(bias));
        let (rows, cols, a) = (int(OP, y.rows)?, int(OP, y.cols)?, act as i32);
        let f = self.dev.function("nann_bias_act")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&py).arg(&ldy).arg(&pb).arg(&rows).arg(&cols).arg(&a);
        // SAFETY: nann_bias_act(float* y, int ldy, const float* bias, int
        // rows, int cols, int act) matches (u64, i32, u64, i32, i32, i32);
        // it touches y[r * ldy + c] (inside `y`) and bias[c] (inside the
        // checked 1 x cols bias, or not at all when the address is 0).
        unsafe { b.launch(cfg((grid_for(y.rows * y.cols), 1), BLOCK, 0)) }?;
        Ok(())
    }

    /// Every element of `buf` set to `value` (e.g. NaN, to poison).
    pub fn fill(&self, buf: &DevBuf<f32>, value: f32) -> Result<(), CudaError> {
        let (p, n) = (buf.addr(0)?, buf.len() as i64);
        let f = self.dev.function("nann_fill_f32")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&p).arg(&value).arg(&n);
        // SAFETY: nann_fill_f32(float* x, float value, long long n) matches
        // (u64, f32, i64); it writes x[0..n), exactly the allocation.
        unsafe { b.launch(cfg((grid_for(buf.len()), 1), BLOCK, 0)) }?;
        Ok(())
    }

    /// Copies the first `n4 * 4` floats of `src` to `dst` (the bandwidth
    /// probe).
    pub fn copy_f32x4(
        &self,
        dst: &DevBuf<f32>,
        src: &DevBuf<f32>,
        n4: usize,
    ) -> Result<(), CudaError> {
        let need = n4.saturating_mul(4);
        if need > dst.len() || need > src.len() {
            return Err(CudaError::shape(
                "copy",
                format!(
                    "{need} floats; buffers hold {} and {}",
                    dst.len(),
                    src.len()
                ),
            ));
        }
        let (pd, ps, n) = (dst.addr(0)?, src.addr(0)?, n4 as i64);
        let f = self.dev.function("nann_copy_f32x4")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&pd).arg(&ps).arg(&n);
        // SAFETY: nann_copy_f32x4(float4* dst, const float4* src, long long
        // n4) matches (u64, u64, i64); it accesses float4 i < n4, i.e.
        // floats < 4 n4 <= both lengths (checked); allocations are 256-byte
        // aligned, as float4 needs.
        unsafe { b.launch(cfg((grid_for(n4), 1), BLOCK, 0)) }?;
        Ok(())
    }

    /// `y = act(beta * y + x w^T + bias)`: `x` is `n x k`, `w` `out x k`
    /// (a layer's `[out, in]` weight or a column block of it), `y` `n x
    /// out`, `bias` `1 x out` or none; `beta` 0 (y only written: it may
    /// hold NaN) or 1.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        x: &Mat<'_>,
        w: &Mat<'_>,
        bias: Option<&Mat<'_>>,
        y: &Mat<'_>,
        beta: f32,
        act: Act,
    ) -> Result<(), CudaError> {
        const OP: &str = "linear";
        let (n, k, out) = (x.rows, x.cols, w.rows);
        w.expect(OP, "the weight", out, k)?;
        y.expect(OP, "the output", n, out)?;
        if let Some(bias) = bias {
            bias.expect(OP, "the bias", 1, out)?;
        }
        if beta != 0.0 && beta != 1.0 {
            return Err(CudaError::shape(OP, format!("beta {beta}: 0 or 1")));
        }
        if n == 0 || out == 0 {
            return Ok(());
        }
        if k == 0 {
            return Err(CudaError::shape(OP, "an empty inner dimension"));
        }
        match &self.blas {
            Some(blas) if self.backend != MatmulBackend::Kernel => {
                // Bias first (then accumulate), activation last.
                let mut beta = beta;
                if let Some(bias) = bias {
                    if beta == 0.0 {
                        self.fill_rows(y, bias)?;
                    } else {
                        self.bias_act(y, Some(bias), Act::None)?;
                    }
                    beta = 1.0;
                }
                self.sgemm(blas, x, w, y, beta)?;
                self.bias_act(y, None, act)
            }
            _ => self.linear_kernel(x, w, bias, y, beta, act),
        }
    }

    /// Row-major `y = beta y + x w^T` through column-major cuBLAS: computes
    /// `y^T (out x n, ld ldy) = W (out x k) x^T (k x n)`, where `w`
    /// row-major `[out, k]` (ld ldw) is `W^T` column-major: `transa = T`.
    fn sgemm(
        &self,
        blas: &CudaBlas,
        x: &Mat<'_>,
        w: &Mat<'_>,
        y: &Mat<'_>,
        beta: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "sgemm";
        let (m, n, k) = (int(OP, w.rows)?, int(OP, x.rows)?, int(OP, x.cols)?);
        let (lda, ldb, ldc) = (w.ld_i32(), x.ld_i32(), y.ld_i32());
        let alpha = 1.0f32;
        // SAFETY: cublasSgemm reads A = w (k x m column-major, lda = w.ld >=
        // k), B = x (k x n, ldb = x.ld >= k) and writes C = y (m x n, ldc =
        // y.ld >= m): exactly the elements of the views `w` (m x k), `x`
        // (n x k) and `y` (n x m) row-major, all inside their allocations;
        // alpha and beta are host scalars (the handle's default pointer
        // mode); the handle is bound to this Exec's stream, so the product
        // is ordered with the kernels around it.
        unsafe {
            cudarc::cublas::result::sgemm(
                *blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                &alpha,
                w.ptr() as *const f32,
                lda,
                x.ptr() as *const f32,
                ldb,
                &beta,
                y.ptr() as *mut f32,
                ldc,
            )
        }?;
        Ok(())
    }

    fn linear_kernel(
        &self,
        x: &Mat<'_>,
        w: &Mat<'_>,
        bias: Option<&Mat<'_>>,
        y: &Mat<'_>,
        beta: f32,
        act: Act,
    ) -> Result<(), CudaError> {
        const OP: &str = "linear_kernel";
        // 64-row tiles; grid.y is limited to 65535, so very tall inputs
        // run in slabs of rows.
        const SLAB: usize = 65535 * 64;
        let f = self.dev.function("nann_linear_f32")?;
        let mut start = 0;
        while start < x.rows {
            let rows = SLAB.min(x.rows - start);
            let (xs, ys) = (x.rows(start, rows)?, y.rows(start, rows)?);
            let (px, ldx, pw, ldw, pb) =
                (xs.ptr(), xs.ld_i32(), w.ptr(), w.ld_i32(), opt_ptr(bias));
            let (py, ldy) = (ys.ptr(), ys.ld_i32());
            let (r, o, k) = (int(OP, rows)?, int(OP, w.rows)?, int(OP, w.cols)?);
            let a = act as i32;
            let mut b = self.stream.launch_builder(f);
            b.arg(&px)
                .arg(&ldx)
                .arg(&pw)
                .arg(&ldw)
                .arg(&pb)
                .arg(&py)
                .arg(&ldy)
                .arg(&r)
                .arg(&o)
                .arg(&k)
                .arg(&beta)
                .arg(&a);
            let grid = (w.rows.div_ceil(64) as u32, rows.div_ceil(64) as u32);
            // SAFETY: nann_linear_f32(const float* x, int ldx, const float*
            // w, int ldw, const float* bias, float* y, int ldy, int rows, int
            // outs, int k, float beta, int act) matches the pushed (u64, i32,
            // u64, i32, u64, u64, i32, i32, i32, i32, f32, i32). Every load
            // and store is guarded by r < rows, o < outs, k < K, so it
            // touches x (rows x k), w (outs x k), y (rows x outs) and bias
            // (1 x outs, or none when 0) only inside those checked views;
            // 256 threads as the kernel's launch bounds require; static
            // shared memory 8.3 kB.
            unsafe { b.launch(cfg(grid, 256, 0)) }?;
            start += rows;
        }
        Ok(())
    }

    /// Checks `(da, dv)` fit the shared-key/value attention kernel (register
    /// and shared-memory limits).
    pub(crate) fn check_attend_shared_dims(da: usize, dv: usize) -> Result<usize, CudaError> {
        const OP: &str = "attend_shared";
        if da == 0 || da > ATT_MAX_DIM || dv == 0 || dv > ATT_MAX_DIM {
            return Err(CudaError::shape(
                OP,
                format!("da {da}, dv {dv}: each must be in 1..={ATT_MAX_DIM}"),
            ));
        }
        let shared = 4 * (WARPS * da + 32 * (da + 1) + 32 * dv);
        if shared > SHARED_LIMIT {
            return Err(CudaError::shape(
                OP,
                format!("da {da}, dv {dv} need {shared} bytes of shared memory"),
            ));
        }
        Ok(shared)
    }

    /// `out[r] = sum_t softmax_t(scale q[r] . k_t) v_t` over one shared
    /// key/value set (`k` `len x da`, `v` `len x dv`); zero rows when
    /// `len == 0`.
    pub fn attend_shared(
        &self,
        q: &Mat<'_>,
        k: &Mat<'_>,
        v: &Mat<'_>,
        scale: f32,
        out: &Mat<'_>,
    ) -> Result<(), CudaError> {
        const OP: &str = "attend_shared";
        let (n, da, len, dv) = (q.rows, q.cols, k.rows, v.cols);
        k.expect(OP, "the keys", len, da)?;
        v.expect(OP, "the values", len, dv)?;
        out.expect(OP, "the output", n, dv)?;
        let shared = Self::check_attend_shared_dims(da, dv)?;
        if n == 0 {
            return Ok(());
        }
        // With len == 0 the kernel reads no key or value: any address does.
        let (pq, ldq, pk, ldk, pv, ldv) = (
            q.ptr(),
            q.ld_i32(),
            k.ptr(),
            k.ld_i32(),
            v.ptr(),
            v.ld_i32(),
        );
        let (l, a, d) = (int(OP, len)?, int(OP, da)?, int(OP, dv)?);
        let (po, ldo, rows) = (out.ptr(), out.ld_i32(), int(OP, n)?);
        let f = self.dev.function("nann_attend_shared_kv")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&pq)
            .arg(&ldq)
            .arg(&pk)
            .arg(&ldk)
            .arg(&pv)
            .arg(&ldv)
            .arg(&l)
            .arg(&a)
            .arg(&d)
            .arg(&scale)
            .arg(&po)
            .arg(&ldo)
            .arg(&rows);
        // SAFETY: nann_attend_shared_kv(const float* q, int ldq, const float*
        // k, int ldk, const float* v, int ldv, int len, int da, int dv, float
        // scale, float* out, int ldo, int rows) matches the pushed (u64, i32,
        // u64, i32, u64, i32, i32, i32, i32, f32, u64, i32, i32). It reads
        // q[r, 0..da) for r < rows, k[t, 0..da) and v[t, 0..dv) for t < len,
        // writes out[r, 0..dv): all inside the views checked above (n x da,
        // len x da, len x dv, n x dv). da, dv <= 256 is the kernel's
        // register bound; the dynamic shared memory passed is exactly its
        // layout (8 da + 32 (da + 1) + 32 dv floats), under 48 kB; 256
        // threads as its launch bounds require.
        unsafe { b.launch(cfg((n.div_ceil(WARPS) as u32, 1), 256, shared)) }?;
        Ok(())
    }

    /// Row `r` attends over its own `len` keys / values: `k` is `(n len) x
    /// da`, `v` `(n len) x dv`, row `r`'s at rows `r len .. (r + 1) len`.
    pub fn attend_rows(
        &self,
        q: &Mat<'_>,
        k: &Mat<'_>,
        v: &Mat<'_>,
        len: usize,
        scale: f32,
        out: &Mat<'_>,
    ) -> Result<(), CudaError> {
        const OP: &str = "attend_rows";
        let (n, da, dv) = (q.rows, q.cols, v.cols);
        let total = n.saturating_mul(len);
        k.expect(OP, "the keys", total, da)?;
        v.expect(OP, "the values", total, dv)?;
        out.expect(OP, "the output", n, dv)?;
        if da == 0 || da > ATT_MAX_DIM || dv == 0 || dv > ATT_MAX_DIM {
            return Err(CudaError::shape(
                OP,
                format!("da {da}, dv {dv}: each must be in 1..={ATT_MAX_DIM}"),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let (pq, ldq, pk, ldk, pv, ldv) = (
            q.ptr(),
            q.ld_i32(),
            k.ptr(),
            k.ld_i32(),
            v.ptr(),
            v.ld_i32(),
        );
        let k_row = (len * k.ld) as i64;
        let v_row = (len * v.ld) as i64;
        let (l, a, d) = (int(OP, len)?, int(OP, da)?, int(OP, dv)?);
        let (po, ldo, rows) = (out.ptr(), out.ld_i32(), int(OP, n)?);
        let f = self.dev.function("nann_attend_rows")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&pq)
            .arg(&ldq)
            .arg(&pk)
            .arg(&k_row)
            .arg(&ldk)
            .arg(&pv)
            .arg(&v_row)
            .arg(&ldv)
            .arg(&l)
            .arg(&a)
            .arg(&d)
            .arg(&scale)
            .arg(&po)
            .arg(&ldo)
            .arg(&rows);
        // SAFETY: nann_attend_rows(const float* q, int ldq, const float* k,
        // long long k_row, int ldk, const float* v, long long v_row, int ldv,
        // int len, int da, int dv, float scale, float* out, int ldo, int
        // rows) matches the pushed (u64, i32, u64, i64, i32, u64, i64, i32,
        // i32, i32, i32, f32, u64, i32, i32). Row r reads k at rows r len + t
        // (t < len) of the (n len) x da view (k_row = len ldk), v likewise,
        // q[r, 0..da) and writes out[r, 0..dv): inside the checked views.
        // da, dv <= 256 (its register bound); 256 threads.
        unsafe { b.launch(cfg((n.div_ceil(WARPS) as u32, 1), 256, 0)) }?;
        Ok(())
    }

    /// In-place softmax over each row of `x` (all `x.cols` entries).
    pub fn softmax_rows(&self, x: &Mat<'_>) -> Result<(), CudaError> {
        const OP: &str = "softmax_rows";
        if x.rows == 0 || x.cols == 0 {
            return Ok(());
        }
        let (px, ldx, rows, len) = (x.ptr(), x.ld_i32(), int(OP, x.rows)?, int(OP, x.cols)?);
        let f = self.dev.function("nann_softmax_rows")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&px).arg(&ldx).arg(&rows).arg(&len);
        // SAFETY: nann_softmax_rows(float* x, int ldx, int rows, int len)
        // matches (u64, i32, i32, i32); row r < rows touches x[r, 0..len),
        // inside the checked view; one warp per row, 8 per block.
        unsafe { b.launch(cfg((x.rows.div_ceil(WARPS) as u32, 1), 256, 0)) }?;
        Ok(())
    }

    /// `y = (x - mean) / sqrt(var + eps) * gamma + beta` per row.
    pub fn layer_norm(
        &self,
        x: &Mat<'_>,
        y: &Mat<'_>,
        gamma: Option<&Mat<'_>>,
        beta: Option<&Mat<'_>>,
        eps: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "layer_norm";
        let (n, d) = (x.rows, x.cols);
        y.expect(OP, "the output", n, d)?;
        for (what, p) in [("gamma", gamma), ("beta", beta)] {
            if let Some(p) = p {
                p.expect(OP, what, 1, d)?;
            }
        }
        if n == 0 || d == 0 {
            return Ok(());
        }
        let (px, ldx, py, ldy) = (x.ptr(), x.ld_i32(), y.ptr(), y.ld_i32());
        let (pg, pb, rows, dd) = (opt_ptr(gamma), opt_ptr(beta), int(OP, n)?, int(OP, d)?);
        let f = self.dev.function("nann_layer_norm_rows")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&px)
            .arg(&ldx)
            .arg(&py)
            .arg(&ldy)
            .arg(&pg)
            .arg(&pb)
            .arg(&rows)
            .arg(&dd)
            .arg(&eps);
        // SAFETY: nann_layer_norm_rows(const float* x, int ldx, float* y,
        // int ldy, const float* gamma, const float* beta, int rows, int d,
        // float eps) matches (u64, i32, u64, i32, u64, u64, i32, i32, f32);
        // row r < rows reads x[r, 0..d), gamma/beta[0..d) (checked 1 x d, or
        // null) and writes y[r, 0..d): inside the checked views.
        unsafe { b.launch(cfg((n.div_ceil(WARPS) as u32, 1), 256, 0)) }?;
        Ok(())
    }

    /// `out[i t + j] = tables.row(j, ids[i, j])`: the candidates' token
    /// embeddings (`ids` `n x t`, `out` contiguous `(n t) x e`).
    pub(crate) fn gather_tokens(
        &self,
        tables: &TokenTables,
        ids: &Mat<'_, u32>,
        out: &Mat<'_>,
    ) -> Result<(), CudaError> {
        const OP: &str = "gather_tokens";
        let (n, t, e) = (ids.rows, tables.tokens, tables.width);
        ids.expect(OP, "the ids", n, t)?;
        if !ids.is_contiguous() {
            return Err(CudaError::shape(OP, "the ids must be contiguous"));
        }
        out.expect(OP, "the output", n * t, e)?;
        if !out.is_contiguous() {
            return Err(CudaError::shape(OP, "the output must be contiguous"));
        }
        if n == 0 {
            return Ok(());
        }
        let (pt, pbase, pvocab) = (
            tables.table.addr(0)?,
            tables.base.addr(0)?,
            tables.vocab.addr(0)?,
        );
        let (pi, rows, tt, ee, po) = (ids.ptr(), int(OP, n)?, int(OP, t)?, int(OP, e)?, out.ptr());
        int(OP, n * t * e)?;
        let f = self.dev.function("nann_gather_tokens")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&pt)
            .arg(&pbase)
            .arg(&pvocab)
            .arg(&pi)
            .arg(&rows)
            .arg(&tt)
            .arg(&ee)
            .arg(&po);
        // SAFETY: nann_gather_tokens(const float* tables, const int* base,
        // const int* vocab, const unsigned* ids, int rows, int t, int e,
        // float* out) matches (u64 x 4, i32 x 3, u64). It reads ids[0..n t)
        // (the contiguous n x t view), base[j] and vocab[j] for j < t (both
        // hold exactly t entries: TokenTables' invariant), and
        // tables[(base[j] + id) e + c] only when id < vocab[j], which the
        // invariant base[j] + vocab[j] <= table rows keeps inside the table;
        // it writes out[0..n t e) (the contiguous (n t) x e view).
        unsafe { b.launch(cfg((grid_for(n * t * e), 1), BLOCK, 0)) }?;
        Ok(())
    }

    /// `out[i, :] = table[ids[i], :]` (f32); ids past the table give NaN
    /// rows.
    pub fn gather_rows_f32(
        &self,
        table: &Mat<'_>,
        ids: &Mat<'_, u32>,
        out: &Mat<'_>,
    ) -> Result<(), CudaError> {
        const OP: &str = "gather_rows_f32";
        let (n, width) = (ids.cols, table.cols);
        ids.expect(OP, "the ids", 1, n)?;
        out.expect(OP, "the output", n, width)?;
        if !table.is_contiguous() {
            return Err(CudaError::shape(OP, "the table must be contiguous"));
        }
        if n == 0 || width == 0 {
            return Ok(());
        }
        int(OP, n * width)?;
        let (ptab, trows, w, pi, rows) = (
            table.ptr(),
            int(OP, table.rows)?,
            int(OP, width)?,
            ids.ptr(),
            int(OP, n)?,
        );
        let (po, ldo) = (out.ptr(), out.ld_i32());
        let f = self.dev.function("nann_gather_rows_f32")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&ptab)
            .arg(&trows)
            .arg(&w)
            .arg(&pi)
            .arg(&rows)
            .arg(&po)
            .arg(&ldo);
        // SAFETY: nann_gather_rows_f32(const float* table, int table_rows,
        // int width, const unsigned* ids, int rows, float* out, int ldo)
        // matches (u64, i32, i32, u64, i32, u64, i32); it reads ids[0..n)
        // (1 x n view), table[id width + c] only for id < table_rows (the
        // contiguous table view) and writes out[r, 0..width) (n x width).
        unsafe { b.launch(cfg((grid_for(n * width), 1), BLOCK, 0)) }?;
        Ok(())
    }

    /// `out[i, :] = table[ids[i], :]` (u32 rows, both contiguous).
    pub fn gather_rows_u32(
        &self,
        table: &Mat<'_, u32>,
        ids: &Mat<'_, u32>,
        out: &Mat<'_, u32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "gather_rows_u32";
        let (n, width) = (ids.cols, table.cols);
        ids.expect(OP, "the ids", 1, n)?;
        out.expect(OP, "the output", n, width)?;
        if !table.is_contiguous() || !out.is_contiguous() {
            return Err(CudaError::shape(OP, "table and output must be contiguous"));
        }
        if n == 0 || width == 0 {
            return Ok(());
        }
        int(OP, n * width)?;
        let (ptab, trows, w, pi, rows, po) = (
            table.ptr(),
            int(OP, table.rows)?,
            int(OP, width)?,
            ids.ptr(),
            int(OP, n)?,
            out.ptr(),
        );
        let f = self.dev.function("nann_gather_rows_u32")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&ptab)
            .arg(&trows)
            .arg(&w)
            .arg(&pi)
            .arg(&rows)
            .arg(&po);
        // SAFETY: nann_gather_rows_u32(const unsigned* table, int
        // table_rows, int width, const unsigned* ids, int rows, unsigned*
        // out) matches (u64, i32, i32, u64, i32, u64); reads ids[0..n),
        // table[id width + c] for id < table_rows only, writes out[0..n
        // width): inside the checked contiguous views.
        unsafe { b.launch(cfg((grid_for(n * width), 1), BLOCK, 0)) }?;
        Ok(())
    }

    /// `ids[i] = start + i` for the `1 x n` view.
    pub fn iota(&self, ids: &Mat<'_, u32>, start: u32) -> Result<(), CudaError> {
        const OP: &str = "iota";
        ids.expect(OP, "the ids", 1, ids.cols)?;
        if ids.cols == 0 {
            return Ok(());
        }
        let (p, n) = (ids.ptr(), int(OP, ids.cols)?);
        let f = self.dev.function("nann_iota_u32")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&p).arg(&start).arg(&n);
        // SAFETY: nann_iota_u32(unsigned* ids, unsigned start, int n)
        // matches (u64, u32, i32); writes ids[0..n), the checked 1 x n view.
        unsafe { b.launch(cfg((grid_for(ids.cols), 1), BLOCK, 0)) }?;
        Ok(())
    }

    /// BAR's last layer (kernels/bar.cu): scores (`1 x n`) and, with
    /// `heads` (`n x 3`), (pctr, pbid_ratio, score) per candidate.
    pub(crate) fn bar_outputs(
        &self,
        hb: &Mat<'_>,
        he: &Mat<'_>,
        last: &BarLastLayers<'_>,
        scores: &Mat<'_>,
        heads: Option<&Mat<'_>>,
    ) -> Result<(), CudaError> {
        const OP: &str = "bar_outputs";
        let (n, h) = (he.rows, he.cols);
        hb.expect(OP, "[h_ctr | h_bid]", n, 2 * h)?;
        for w in [&last.ctr, &last.bid, &last.ecpm] {
            w.expect(OP, "a last-layer weight", 1, h)?;
        }
        scores.expect(OP, "the scores", 1, n)?;
        if let Some(heads) = heads {
            heads.expect(OP, "the heads", n, 3)?;
            if !heads.is_contiguous() {
                return Err(CudaError::shape(OP, "the heads must be contiguous"));
            }
        }
        if n == 0 {
            return Ok(());
        }
        let (phb, ldhb, phe, ldhe) = (hb.ptr(), hb.ld_i32(), he.ptr(), he.ld_i32());
        let (pwc, pwb, pwe) = (last.ctr.ptr(), last.bid.ptr(), last.ecpm.ptr());
        let (bc, bb, be) = (last.ctr_b, last.bid_b, last.ecpm_b);
        let (hh, rows, ps, ph) = (int(OP, h)?, int(OP, n)?, scores.ptr(), opt_ptr(heads));
        let f = self.dev.function("nann_bar_outputs")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&phb)
            .arg(&ldhb)
            .arg(&phe)
            .arg(&ldhe)
            .arg(&pwc)
            .arg(&bc)
            .arg(&pwb)
            .arg(&bb)
            .arg(&pwe)
            .arg(&be)
            .arg(&hh)
            .arg(&rows)
            .arg(&ps)
            .arg(&ph);
        // SAFETY: nann_bar_outputs(const float* hb, int ldhb, const float*
        // he, int ldhe, const float* w_ctr, float b_ctr, const float* w_bid,
        // float b_bid, const float* w_ecpm, float b_ecpm, int h, int rows,
        // float* scores, float* heads) matches (u64, i32, u64, i32, u64, f32,
        // u64, f32, u64, f32, i32, i32, u64, u64). Row r < n reads hb[r,
        // 0..2h), he[r, 0..h), the three 1 x h weights, writes scores[r] and
        // (if heads is not null) heads[3 r .. 3 r + 3): all inside the views
        // checked above.
        unsafe { b.launch(cfg((n.div_ceil(WARPS) as u32, 1), 256, 0)) }?;
        Ok(())
    }

    /// The best `k` (`1..=1024`) of the `1 x n` scores on the device, best
    /// first: `(score, index)` pairs, `min(k, n)` of them. NaN ranks last
    /// (reported as -inf); ties go to the lower index.
    pub fn top_k(&self, scores: &Mat<'_>, k: usize) -> Result<Vec<(f32, u32)>, CudaError> {
        const OP: &str = "top_k";
        let n = scores.cols;
        scores.expect(OP, "the scores", 1, n)?;
        if k == 0 || k > TOPK_N / 2 {
            return Err(CudaError::shape(OP, format!("k = {k}: 1..={}", TOPK_N / 2)));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        int(OP, n)?;
        let f = self.dev.function("nann_topk_block")?;
        let blocks = n.div_ceil(TOPK_N);
        let cap = blocks * k;
        let bufs = [
            (
                DevBuf::<f32>::zeros(&self.stream, cap)?,
                DevBuf::<u32>::zeros(&self.stream, cap)?,
            ),
            (
                DevBuf::<f32>::zeros(&self.stream, cap)?,
                DevBuf::<u32>::zeros(&self.stream, cap)?,
            ),
        ];
        // Round 0 reads the scores (indices = positions); later rounds read
        // the previous round's (score, index) pairs.
        let mut input: Option<usize> = None;
        let mut len = n;
        let mut round = 0usize;
        loop {
            let blocks = len.div_ceil(TOPK_N);
            let (out_s, out_i) = &bufs[round % 2];
            let (ps, pi) = match input {
                None => (scores.ptr(), 0u64),
                Some(b) => (bufs[b].0.addr(0)?, bufs[b].1.addr(0)?),
            };
            let (nn, kk) = (int(OP, len)?, int(OP, k)?);
            let (pos, poi) = (out_s.addr(0)?, out_i.addr(0)?);
            let mut b = self.stream.launch_builder(f);
            b.arg(&ps).arg(&pi).arg(&nn).arg(&kk).arg(&pos).arg(&poi);
            // SAFETY: nann_topk_block(const float* scores, const unsigned*
            // idx_in, int n, int k, float* out_scores, unsigned* out_idx)
            // matches (u64, u64, i32, i32, u64, u64). Block b reads entries
            // [2048 b, 2048 b + 2048) clipped to n (the 1 x n scores view in
            // round 0, else the previous round's `len` <= cap pairs) and
            // writes k pairs at b k: blocks k <= cap entries of the output
            // pair, a buffer other than the input; 1024 threads as its launch
            // bounds require, 16 kB of static shared memory.
            unsafe { b.launch(cfg((blocks as u32, 1), 1024, 0)) }?;
            len = blocks * k;
            input = Some(round % 2);
            round += 1;
            if blocks == 1 {
                break;
            }
        }
        let last = round.saturating_sub(1) % 2;
        let take = k.min(n);
        let mut s = vec![0f32; take];
        let mut i = vec![0u32; take];
        bufs[last].0.download(&self.stream, 0, &mut s)?;
        bufs[last].1.download(&self.stream, 0, &mut i)?;
        Ok(s.into_iter().zip(i).collect())
    }
}

/// The one-output last layers of BAR's heads, for [`Exec::bar_outputs`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct BarLastLayers<'a> {
    pub(crate) ctr: Mat<'a>,
    pub(crate) ctr_b: f32,
    pub(crate) bid: Mat<'a>,
    pub(crate) bid_b: f32,
    pub(crate) ecpm: Mat<'a>,
    pub(crate) ecpm_b: f32,
}

/// Embedding tables for a fixed number of token positions, concatenated on
/// the device: position `j`'s table is rows `base[j] .. base[j] +
/// vocab[j]` of one `[rows, width]` buffer.
///
/// Invariant (by construction, relied on by [`Exec::gather_tokens`]):
/// `base` and `vocab` hold exactly `tokens` entries and `base[j] +
/// vocab[j] <= rows` for each.
#[derive(Debug)]
pub(crate) struct TokenTables {
    table: DevBuf<f32>,
    base: DevBuf<i32>,
    vocab: DevBuf<i32>,
    tokens: usize,
    width: usize,
}

impl TokenTables {
    /// Uploads `tables` (each `[vocab_j, width]`, row-major) on `stream`
    /// and synchronises it (the tables are then read from any stream).
    pub(crate) fn new(
        stream: &Arc<CudaStream>,
        tables: &[&[f32]],
        width: usize,
    ) -> Result<Self, CudaError> {
        const OP: &str = "token tables";
        if width == 0 || tables.is_empty() {
            return Err(CudaError::shape(OP, "no tables or zero width"));
        }
        let mut all = Vec::new();
        let (mut base, mut vocab) = (Vec::new(), Vec::new());
        for t in tables {
            if t.len() % width != 0 {
                return Err(CudaError::shape(
                    OP,
                    format!("{} floats is not a multiple of {width}", t.len()),
                ));
            }
            base.push(int(OP, all.len() / width)?);
            vocab.push(int(OP, t.len() / width)?);
            all.extend_from_slice(t);
        }
        int(OP, all.len() / width)?;
        let out = Self {
            table: DevBuf::from_host(stream, &all)?,
            base: DevBuf::from_host(stream, &base)?,
            vocab: DevBuf::from_host(stream, &vocab)?,
            tokens: tables.len(),
            width,
        };
        stream.synchronize()?;
        Ok(out)
    }
}
