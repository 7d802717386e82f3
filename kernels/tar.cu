// tar.cu: the TAR model's generation (src/tar/model/mod.rs has the
// equations; src/cuda/tar.rs drives these kernels and documents the data
// flow). Generic pieces (matmul, layer norm, attention) exist elsewhere for
// BAR; TAR's decision path runs at batch 1 on a few dozen rows, where the
// launch count is the latency, so the kernels here fuse what the equations
// chain: a normalisation or activation into the linear layer that reads it,
// the gate and the residual into the one that writes it.
//
//   nann_tar_linear   y = [y +] (act(pro(x) W^T + b) * gate * alpha + add_alpha * add + addrow)
//                     pro: none | LayerNorm (affine) | AdaLN modulate LN0(x)(1 + s) + b | silu
//   nann_tar_attend   multi-head attention of nq queries over one key/value set (a KV cache
//                     prefix: the block-causal mask; or the cross-attention memory)
//   nann_tar_add3     y = (a + b) + c with broadcast rows (scale 0's tokens, c + start)
//   nann_tar_guide    classifier-free guidance of the head outputs, u + g (c - u)
//   nann_tar_down     adaptive average pooling (down) of the T rows of fhat to n rows
//   nann_tar_up       linear interpolation (up, align_corners false) from a host table
//   nann_tar_top_p    top-p sampling per token from a host-drawn uniform, then the codebook row
//   nann_tar_nearest  nearest codebook row per latent row (ties to the lowest index)
//
// Numerics follow the CPU reference (src/tar/model/nn.rs, sample.rs) step for
// step: LayerNorm with biased variance and eps 1e-5, gelu in tanh form,
// silu = x sigmoid(x), the same operation order where it is cheap to keep;
// sums are formed in another order (the 1e-4 parity tolerance covers it).

#define TAR_PRO_NONE 0
#define TAR_PRO_LN 1
#define TAR_PRO_MODULATE 2
#define TAR_PRO_SILU 3

#define TAR_ACT_NONE 0
#define TAR_ACT_GELU 1
#define TAR_ACT_SILU 2

#define TAR_LN_EPS 1e-5f

#define TAR_TM 64
#define TAR_TN 64
#define TAR_TK 16

#define TAR_ATT_PER_LANE 8  // output columns per lane per pass (256 per warp)

#define TAR_SORT_SHARED 2048  // codebooks up to this size sort in shared memory
#define TAR_SAMPLE_THREADS 128

// gelu, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
__device__ __forceinline__ float tar_gelu(float x) {
  const float c = 0.7978846f;  // sqrt(2 / pi), as the CPU's constant
  return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

// silu(x) = x sigmoid(x), the CPU's overflow-free sigmoid.
__device__ __forceinline__ float tar_silu(float x) { return x * nann_sigmoid(x); }

// A float's bits (NVRTC and the CPU emulator both accept the union).
__device__ __forceinline__ nann_u32 tar_float_bits(float x) {
  union {
    float f;
    nann_u32 u;
  } v;
  v.f = x;
  return v.u;
}

// The CPU sampler's sort key (sample.rs, descending_key): ascending order
// of the key is descending order of x, a total order on the bits.
__device__ __forceinline__ nann_u32 tar_descending_key(float x) {
  const nann_u32 b = tar_float_bits(x);
  const nann_u32 ascending = (b >> 31) == 1u ? ~b : (b | 0x80000000u);
  return ~ascending;
}

// Y = [beta Y +] (act(pro(X) W^T + b) * gate * alpha + add_alpha * ADD + addrow), row-major
// with leading dimensions; W is [outs, k] (ldw), the weights file's layout.
//
// pro (applied to each element of X as its tile is loaded):
//   TAR_PRO_LN        (x - mean) inv * pa[c] + pb[c]         (LayerNorm, affine)
//   TAR_PRO_MODULATE  (x - mean) inv * (1 + pa[c]) + pb[c]   (AdaLN: LN0(x)(1 + s) + b)
//   TAR_PRO_SILU      silu(x)
// with the row's mean and inv = 1 / sqrt(var + 1e-5) (biased variance,
// two passes) computed by the block for its 64 rows first.
// Epilogue per output (r, o): v = acc + bias[o]; act; v *= gate[o] (gate
// may be null); v *= alpha; v += add_alpha * add[r, o] (add may be null);
// v += addrow[o] (may be null); y = accumulate ? y + v : v.
//
// X and Y must not overlap (blocks read X while others write Y); ADD may be
// any other buffer. Tiling as matmul.cu: 64 x 64 outputs per block of 256
// threads, 4 x 4 per thread, K in steps of 16 through shared memory; every
// load is bounds-checked. Static shared memory 26.5 kB.
extern "C" __global__ void __launch_bounds__(256)
nann_tar_linear(const float* x, int ldx, int pro, const float* pa, const float* pb, const float* w,
                int ldw, const float* bias, int act, const float* gate, float alpha,
                const float* add, int ldadd, float add_alpha, const float* addrow, float* y,
                int ldy, int rows, int outs, int k, int accumulate) {
  __shared__ float xs[TAR_TK][TAR_TM + 1];
  __shared__ float ws[TAR_TK][TAR_TN + 1];
  __shared__ float row_mean[TAR_TM];
  __shared__ float row_inv[TAR_TM];
  __shared__ float partial[TAR_TM][4];
  __shared__ float tile[TAR_TM][TAR_TN + 1];
  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const nann_i64 r0 = (nann_i64)blockIdx.y * TAR_TM;
  const int o0 = blockIdx.x * TAR_TN;
  const bool norm = pro == TAR_PRO_LN || pro == TAR_PRO_MODULATE;
  if (norm) {
    // Four threads per row (256 threads, 64 rows), each a quarter of the
    // columns, combined through shared memory: a few block barriers
    // instead of warp-shuffle reductions row by row.
    const int rr = tid >> 2, part = tid & 3;
    const nann_i64 gr = r0 + rr;
    const float* xr = x + (gr < rows ? gr : 0) * ldx;
    float s = 0.0f;
    if (gr < rows)
      for (int c = part; c < k; c += 4) s += xr[c];
    partial[rr][part] = s;
    __syncthreads();
    const float* pr = partial[rr];
    const float mean = (pr[0] + pr[1] + pr[2] + pr[3]) / (float)k;
    float v = 0.0f;
    if (gr < rows)
      for (int c = part; c < k; c += 4) {
        const float t = xr[c] - mean;
        v += t * t;
      }
    __syncthreads();  // every thread has read the sums
    partial[rr][part] = v;
    __syncthreads();
    if (part == 0) {
      const float var = (pr[0] + pr[1] + pr[2] + pr[3]) / (float)k;
      row_mean[rr] = mean;
      row_inv[rr] = 1.0f / sqrtf(var + TAR_LN_EPS);
    }
    __syncthreads();
  }
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int k0 = 0; k0 < k; k0 += TAR_TK) {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int e = tid + 256 * l;  // 0..1023: (row or out) = e / 16, kk = e % 16
      const int rr = e >> 4, kk = e & 15;
      const nann_i64 gr = r0 + rr;
      const int go = o0 + rr, gk = k0 + kk;
      float xv = 0.0f;
      if (gr < rows && gk < k) {
        xv = x[gr * ldx + gk];
        if (pro == TAR_PRO_LN) {
          xv = (xv - row_mean[rr]) * row_inv[rr] * pa[gk] + pb[gk];
        } else if (pro == TAR_PRO_MODULATE) {
          xv = (xv - row_mean[rr]) * row_inv[rr];
          xv = xv * (1.0f + pa[gk]) + pb[gk];
        } else if (pro == TAR_PRO_SILU) {
          xv = tar_silu(xv);
        }
      }
      xs[kk][rr] = xv;
      ws[kk][rr] = (go < outs && gk < k) ? w[(nann_i64)go * ldw + gk] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < TAR_TK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  // The tile through shared memory, then one (not unrolled) pass applies
  // the epilogue: coalesced stores and a single copy of its code.
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) tile[ty + 16 * i][tx + 16 * j] = acc[i][j];
  __syncthreads();
#pragma unroll 1
  for (int e = tid; e < TAR_TM * TAR_TN; e += 256) {
    const int rr = e / TAR_TN, oo = e - rr * TAR_TN;
    const nann_i64 r = r0 + rr;
    const int o = o0 + oo;
    if (r >= rows || o >= outs) continue;
    float v = tile[rr][oo];
    if (bias != 0) v += bias[o];
    if (act == TAR_ACT_GELU) {
      v = tar_gelu(v);
    } else if (act == TAR_ACT_SILU) {
      v = tar_silu(v);
    }
    if (gate != 0) v *= gate[o];
    v *= alpha;
    if (add != 0) v += add_alpha * add[r * ldadd + o];
    if (addrow != 0) v += addrow[o];
    if (accumulate) v = y[r * ldy + o] + v;
    y[r * ldy + o] = v;
  }
}

// Multi-head scaled dot-product attention of nq query rows over ONE set of
// len keys and values: for head h (columns h hd .. (h + 1) hd of q, k, v
// and out), out[r] = sum_t softmax_t(scale q[r] . k[t]) v[t]. Queries of
// scale k over the cached keys 0..seen are the block-causal mask (no later
// token exists yet); the cross-attention passes the memory.
//
// One warp per (query row, head): grid (ceil(nq / 8), heads), 256 threads.
// Two passes over the keys, lane j taking keys j, j + 32, ... (its own dot
// product over hd): the maximum logit, then the weights exp(logit - max),
// which go through the warp's slice of shared memory, 32 at a time, to the
// lanes accumulating output columns c, c + 32, ... (256 columns per pass
// over the values: any hd works); the sum of the weights last. The CPU's
// max-shifted softmax, so no rescaling. len == 0 gives zeros.
extern "C" __global__ void __launch_bounds__(256)
nann_tar_attend(const float* q, int ldq, const float* k, int ldk, const float* v, int ldv,
                int nq, int len, int hd, float scale, float* out, int ldo) {
  __shared__ float weights[8][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const nann_i64 row = (nann_i64)blockIdx.x * (blockDim.x >> 5) + warp;
  if (row >= nq) return;  // whole warps leave together (no block barrier here)
  float* pw = weights[warp];
  const int col0 = blockIdx.y * hd;
  const float* qr = q + row * ldq + col0;
  float m = -__int_as_float(0x7f800000);
  for (int t = lane; t < len; t += 32) {
    const float* kr = k + (nann_i64)t * ldk + col0;
    float d = 0.0f;
    for (int c = 0; c < hd; ++c) d = fmaf(qr[c], kr[c], d);
    m = fmaxf(m, d * scale);
  }
  m = nann_warp_max(m);
  for (int c0 = 0; c0 < hd; c0 += 32 * TAR_ATT_PER_LANE) {
    float s = 0.0f;
    float acc[TAR_ATT_PER_LANE];
#pragma unroll
    for (int i = 0; i < TAR_ATT_PER_LANE; ++i) acc[i] = 0.0f;
    for (int t0 = 0; t0 < len; t0 += 32) {
      const int t = t0 + lane;
      float p = 0.0f;
      if (t < len) {
        const float* kr = k + (nann_i64)t * ldk + col0;
        float d = 0.0f;
        for (int c = 0; c < hd; ++c) d = fmaf(qr[c], kr[c], d);
        p = expf(d * scale - m);
      }
      s += p;
      pw[lane] = p;
      __syncwarp();
      const int cn = min(32, len - t0);
      for (int j = 0; j < cn; ++j) {
        const float pj = pw[j];
        const float* vr = v + (nann_i64)(t0 + j) * ldv + col0;
#pragma unroll
        for (int i = 0; i < TAR_ATT_PER_LANE; ++i) {
          const int c = c0 + lane + 32 * i;
          if (c < hd) acc[i] = fmaf(pj, vr[c], acc[i]);
        }
      }
      __syncwarp();  // every lane has read pw before the next chunk writes it
    }
    const float inv = len > 0 ? 1.0f / nann_warp_sum(s) : 0.0f;
#pragma unroll
    for (int i = 0; i < TAR_ATT_PER_LANE; ++i) {
      const int c = c0 + lane + 32 * i;
      if (c < hd) out[row * ldo + col0 + c] = len > 0 ? acc[i] * inv : 0.0f;
    }
  }
}

// y[r, c] = (a[r lda + c] + b[r ldb + c]) + cc[r ldc + c] for r < rows,
// c < cols; a leading dimension of 0 broadcasts row 0; cc may be null. The
// CPU's order of additions (scale 0: (c + start) + pos, then + level).
extern "C" __global__ void nann_tar_add3(float* y, int ldy, const float* a, int lda, const float* b,
                                         int ldb, const float* cc, int ldc, int rows, int cols) {
  NANN_GRID_LOOP(i, (nann_i64)rows * cols) {
    const nann_i64 r = i / cols;
    const int c = (int)(i - r * cols);
    float v = a[r * lda + c] + b[r * ldb + c];
    if (cc != 0) v += cc[r * ldc + c];
    y[r * ldy + c] = v;
  }
}

// Classifier-free guidance: out[r, j] = u[r, j] + g (c[r, j] - u[r, j]) with
// c the conditioned head outputs, u the unconditioned twin's (the CPU's
// formula and order). out may be c (in place, element by element).
extern "C" __global__ void nann_tar_guide(float* out, int ldo, const float* c, int ldc,
                                          const float* u, int ldu, int rows, int cols, float g) {
  NANN_GRID_LOOP(i, (nann_i64)rows * cols) {
    const nann_i64 r = i / cols;
    const int j = (int)(i - r * cols);
    const float uv = u[r * ldu + j];
    out[r * ldo + j] = uv + g * (c[r * ldc + j] - uv);
  }
}

// down(u, n): out[i, c] = mean of u rows floor(i t / n) .. ceil((i + 1) t / n)
// (adaptive average pooling), summed in row order then scaled by
// 1 / count, as the CPU does. One thread per output element.
extern "C" __global__ void nann_tar_down(const float* u, int ldu, int t, int n, int width,
                                         float* out, int ldo) {
  NANN_GRID_LOOP(e, (nann_i64)n * width) {
    const nann_i64 i = e / width;
    const int c = (int)(e - i * width);
    const int start = (int)(i * t / n);
    const int end = (int)(((i + 1) * t + n - 1) / n);
    float s = 0.0f;
    for (int r = start; r < end; ++r) s += u[(nann_i64)r * ldu + c];
    out[i * ldo + c] = s * (1.0f / (float)(end - start));
  }
}

// up(h, t): out[i, c] = (1 - w) h[i0, c] + w h[i1, c], or h[i0, c] where
// w == 0 (the identity and the broadcast stay exact), with (i0, i1) =
// idx[2 i], idx[2 i + 1] and w = wt[i] computed on the host by the CPU's
// formula (src = max((i + 0.5) n / t - 0.5, 0) in double).
extern "C" __global__ void nann_tar_up(const float* h, int ldh, const int* idx, const float* wt,
                                       int t, int width, float* out, int ldo) {
  NANN_GRID_LOOP(e, (nann_i64)t * width) {
    const nann_i64 i = e / width;
    const int c = (int)(e - i * width);
    const float w = wt[i];
    const float a = h[(nann_i64)idx[2 * i] * ldh + c];
    float v = a;
    if (w != 0.0f) v = (1.0f - w) * a + w * h[(nann_i64)idx[2 * i + 1] * ldh + c];
    out[i * ldo + c] = v;
  }
}

// Sum over a block of TAR_SAMPLE_THREADS threads (every thread gets it).
__device__ __forceinline__ float tar_block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = nann_warp_sum(v);
  __syncthreads();  // red is free (an earlier reduction has been read)
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.0f;
  for (int i = 0; i < TAR_SAMPLE_THREADS / 32; ++i) s += red[i];
  return s;
}

// Maximum over the block, NaN ignored (every thread gets it).
__device__ __forceinline__ float tar_block_max(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = nann_warp_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float m = red[0];
  for (int i = 1; i < TAR_SAMPLE_THREADS / 32; ++i) m = fmaxf(m, red[i]);
  return m;
}

// Top-p sampling, one block of 128 threads per token row r (the CPU's
// sample::top_p, step for step):
//   1. l_j = logits[r, j] / temperature; sort keys (descending_key(l_j) << 32) | j
//      ascending (a bitonic sort over the next power of two, p2, padded with
//      keys that sort last): descending l, ties to the lower index;
//   2. probabilities softmax(l) in fp32 (max-shifted; an all -inf row uses 0);
//   3. thread 0, in double as the CPU: keep entries in sorted order until
//      their mass reaches top_p (the first always), target = u[r] * mass, the
//      first kept entry whose running sum exceeds target (else the last kept);
//   4. codes[r] = the index (as a float: exact below 2^24), h[r, :] = its
//      codebook row (`c` columns).
// Codebooks up to 2048 entries sort in shared memory; larger ones in the
// global scratch (keys: rows x p2 u64, probs: rows x v floats).
extern "C" __global__ void __launch_bounds__(TAR_SAMPLE_THREADS)
nann_tar_top_p(const float* logits, int ldl, int v, int p2, float top_p, float temperature,
               const double* u, unsigned long long* keys_scratch, float* probs_scratch,
               const float* codebook, int c, float* h, int ldh, float* codes) {
  __shared__ unsigned long long sk[TAR_SORT_SHARED];
  __shared__ float sp[TAR_SORT_SHARED];
  __shared__ float red[TAR_SAMPLE_THREADS / 32];
  __shared__ int choice;
  const int tid = threadIdx.x;
  const nann_i64 r = blockIdx.x;
  const bool small = p2 <= TAR_SORT_SHARED;
  unsigned long long* keys = small ? sk : keys_scratch + r * p2;
  float* probs = small ? sp : probs_scratch + r * v;
  const float* lr = logits + r * ldl;
  const float neg_inf = -__int_as_float(0x7f800000);

  float mx = neg_inf;
  for (int j = tid; j < p2; j += TAR_SAMPLE_THREADS) {
    if (j < v) {
      const float l = lr[j] / temperature;
      probs[j] = l;
      keys[j] = ((unsigned long long)tar_descending_key(l) << 32) | (unsigned long long)j;
      mx = fmaxf(mx, l);
    } else {
      keys[j] = ~0ull;
    }
  }
  mx = tar_block_max(mx, red);
  if (mx == neg_inf) mx = 0.0f;  // every entry -inf or NaN
  float s = 0.0f;
  for (int j = tid; j < v; j += TAR_SAMPLE_THREADS) {
    const float e = expf(probs[j] - mx);
    probs[j] = e;
    s += e;
  }
  const float inv = 1.0f / tar_block_sum(s, red);
  for (int j = tid; j < v; j += TAR_SAMPLE_THREADS) probs[j] *= inv;

  // Bitonic sort, ascending, of keys[0..p2) (p2 a power of two).
  for (int size = 2; size <= p2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int p = tid; p < p2 / 2; p += TAR_SAMPLE_THREADS) {
        const int i = 2 * p - (p & (stride - 1));
        const int j = i + stride;
        const bool up = (i & size) == 0;
        const unsigned long long a = keys[i], b = keys[j];
        if ((a > b) == up) {
          keys[i] = b;
          keys[j] = a;
        }
      }
    }
  }
  __syncthreads();
  if (tid == 0) {
    int kept = 0;
    double mass = 0.0;
    for (int i = 0; i < v; ++i) {
      mass += (double)probs[(int)(keys[i] & 0xffffffffull)];
      kept += 1;
      if (mass >= (double)top_p) break;
    }
    const double target = u[r] * mass;
    double run = 0.0;
    int pick = (int)(keys[(kept > 1 ? kept : 1) - 1] & 0xffffffffull);
    for (int i = 0; i < kept; ++i) {
      const int j = (int)(keys[i] & 0xffffffffull);
      run += (double)probs[j];
      if (run > target) {
        pick = j;
        break;
      }
    }
    choice = pick;
  }
  __syncthreads();
  const int pick = choice;
  if (tid == 0) codes[r] = (float)pick;
  for (int col = tid; col < c; col += TAR_SAMPLE_THREADS)
    h[r * ldh + col] = codebook[(nann_i64)pick * c + col];
}

// Nearest codebook row per latent row: idx[r] = argmin_j ||z[r] - cb[j]||^2
// (ties to the lowest j), written as a float (exact below 2^24), and h[r, :]
// = cb[idx[r]]. One warp per row, 8 rows per block; lane j scans entries j,
// j + 32, ... then the warp reduces (distance, index) pairs.
extern "C" __global__ void __launch_bounds__(256)
nann_tar_nearest(const float* z, int ldz, int rows, const float* cb, int v, int c, float* idx,
                 float* h, int ldh) {
  const int lane = threadIdx.x & 31;
  const nann_i64 row = (nann_i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave together
  const float* zr = z + row * ldz;
  const float inf = __int_as_float(0x7f800000);
  float best = inf;
  int best_j = 0x7fffffff;
  for (int j = lane; j < v; j += 32) {
    const float* e = cb + (nann_i64)j * c;
    float d = 0.0f;
    for (int col = 0; col < c; ++col) {
      const float t = zr[col] - e[col];
      d += t * t;
    }
    if (d < best) {
      best = d;
      best_j = j;
    }
  }
  // (distance, index) minimum over the warp; indices travel as floats
  // (exact: v <= 65536).
  float bj = best_j == 0x7fffffff ? inf : (float)best_j;
  for (int o = 16; o > 0; o >>= 1) {
    const float od = __shfl_xor_sync(NANN_FULL_MASK, best, o);
    const float oj = __shfl_xor_sync(NANN_FULL_MASK, bj, o);
    if (od < best || (od == best && oj < bj)) {
      best = od;
      bj = oj;
    }
  }
  const int pick = bj == inf ? 0 : (int)bj;
  if (lane == 0) idx[row] = (float)pick;
  for (int col = lane; col < c; col += 32) h[row * ldh + col] = cb[(nann_i64)pick * c + col];
}
