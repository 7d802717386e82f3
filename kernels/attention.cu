// attention.cu: single-query scaled dot-product attention for many rows,
//   out[r] = sum_t softmax_t(scale * q[r] . k_t) v_t,
// with the softmax computed online (flash-attention style: a running max
// and sum, the accumulator rescaled when the max grows), so any length
// works in one pass. Zero output when len == 0 (every position masked:
// the spec's "no unmasked position" case; masked positions are dropped
// before the launch, as the CPU reference does). Building blocks for BAR
// and TAR.
//
// Limits (checked by src/cuda/ops.rs before a launch): da, dv <= 256.

#define ATT_WARPS 8
#define ATT_CHUNK 32
#define ATT_MAX_PER_LANE 8  // dv / 32 (and da / 32) accumulators per lane

// Many queries against ONE key/value set shared by all rows (BAR: every
// candidate against the request's behaviour sequence). One warp per query
// row, 8 rows per block; the block stages the keys and values in shared
// memory, 32 positions at a time, and all its warps use each chunk.
// Lane j scores position j of the chunk; lane c accumulates output columns
// c, c + 32, ...
//
// q [rows, da] (ldq), k [len, da] (ldk), v [len, dv] (ldv), out [rows, dv]
// (ldo). Dynamic shared memory: 4 * (8 da + 32 (da + 1) + 32 dv) bytes.
extern "C" __global__ void __launch_bounds__(256)
nann_attend_shared_kv(const float* q, int ldq, const float* k, int ldk, const float* v, int ldv,
                      int len, int da, int dv, float scale, float* out, int ldo, int rows) {
  extern __shared__ float smem[];
  float* qs = smem;                          // [ATT_WARPS][da]
  float* ks = qs + ATT_WARPS * da;           // [ATT_CHUNK][da + 1] (padded: no bank conflicts)
  float* vs = ks + ATT_CHUNK * (da + 1);     // [ATT_CHUNK][dv]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const nann_i64 row = (nann_i64)blockIdx.x * ATT_WARPS + warp;
  const bool active = row < rows;  // inactive warps still help load and sync
  float* qw = qs + warp * da;
  for (int c = lane; c < da; c += 32) qw[c] = active ? q[row * ldq + c] : 0.0f;

  const float neg_inf = -__int_as_float(0x7f800000);
  float m = neg_inf, s = 0.0f;
  float acc[ATT_MAX_PER_LANE];
#pragma unroll
  for (int i = 0; i < ATT_MAX_PER_LANE; ++i) acc[i] = 0.0f;

  for (int c0 = 0; c0 < len; c0 += ATT_CHUNK) {
    const int cn = min(ATT_CHUNK, len - c0);
    __syncthreads();  // the previous chunk is consumed (and qw is written)
    for (int e = threadIdx.x; e < cn * da; e += blockDim.x) {
      int j = e / da, c = e - j * da;
      ks[j * (da + 1) + c] = k[(nann_i64)(c0 + j) * ldk + c];
    }
    for (int e = threadIdx.x; e < cn * dv; e += blockDim.x) {
      int j = e / dv, c = e - j * dv;
      vs[j * dv + c] = v[(nann_i64)(c0 + j) * ldv + c];
    }
    __syncthreads();
    float logit = neg_inf;
    if (lane < cn) {
      float d = 0.0f;
      for (int c = 0; c < da; ++c) d = fmaf(qw[c], ks[lane * (da + 1) + c], d);
      logit = d * scale;
    }
    const float mn = fmaxf(m, nann_warp_max(logit));
    const float p = lane < cn ? expf(logit - mn) : 0.0f;
    const float corr = expf(m - mn);  // 0 on the first chunk (m = -inf)
    s = s * corr + nann_warp_sum(p);
#pragma unroll
    for (int i = 0; i < ATT_MAX_PER_LANE; ++i) acc[i] *= corr;
    for (int j = 0; j < cn; ++j) {  // cn is warp-uniform: every lane shuffles
      const float pj = __shfl_sync(NANN_FULL_MASK, p, j);
#pragma unroll
      for (int i = 0; i < ATT_MAX_PER_LANE; ++i) {
        const int c = lane + 32 * i;
        if (c < dv) acc[i] = fmaf(pj, vs[j * dv + c], acc[i]);
      }
    }
    m = mn;
  }
  if (!active) return;
  const float inv = len > 0 ? 1.0f / s : 0.0f;
#pragma unroll
  for (int i = 0; i < ATT_MAX_PER_LANE; ++i) {
    const int c = lane + 32 * i;
    if (c < dv) out[row * ldo + c] = len > 0 ? acc[i] * inv : 0.0f;
  }
}

// One query per row against that row's OWN keys and values (BAR's pBid
// head: each candidate's query over its T ad tokens). One warp per row;
// for each position the warp forms q . k_t cooperatively (coalesced), then
// updates the online softmax. Row r's position t key is at
// k + r * k_row + t * ldk (values likewise).
//
// q [rows, da] (ldq), out [rows, dv] (ldo).
extern "C" __global__ void __launch_bounds__(256)
nann_attend_rows(const float* q, int ldq, const float* k, nann_i64 k_row, int ldk, const float* v,
                 nann_i64 v_row, int ldv, int len, int da, int dv, float scale, float* out,
                 int ldo, int rows) {
  const int lane = threadIdx.x & 31;
  const nann_i64 row = (nann_i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave together
  float qr[ATT_MAX_PER_LANE];
#pragma unroll
  for (int i = 0; i < ATT_MAX_PER_LANE; ++i) {
    const int c = lane + 32 * i;
    qr[i] = c < da ? q[row * ldq + c] : 0.0f;
  }
  const float* kr = k + row * k_row;
  const float* vr = v + row * v_row;
  const float neg_inf = -__int_as_float(0x7f800000);
  float m = neg_inf, s = 0.0f;
  float acc[ATT_MAX_PER_LANE];
#pragma unroll
  for (int i = 0; i < ATT_MAX_PER_LANE; ++i) acc[i] = 0.0f;
  for (int t = 0; t < len; ++t) {
    float d = 0.0f;
#pragma unroll
    for (int i = 0; i < ATT_MAX_PER_LANE; ++i) {
      const int c = lane + 32 * i;
      if (c < da) d = fmaf(qr[i], kr[(nann_i64)t * ldk + c], d);
    }
    const float logit = nann_warp_sum(d) * scale;
    const float mn = fmaxf(m, logit);
    const float corr = expf(m - mn);
    const float p = expf(logit - mn);
    s = s * corr + p;
#pragma unroll
    for (int i = 0; i < ATT_MAX_PER_LANE; ++i) {
      const int c = lane + 32 * i;
      if (c < dv) acc[i] = fmaf(p, vr[(nann_i64)t * ldv + c], acc[i] * corr);
    }
    m = mn;
  }
  const float inv = len > 0 ? 1.0f / s : 0.0f;
#pragma unroll
  for (int i = 0; i < ATT_MAX_PER_LANE; ++i) {
    const int c = lane + 32 * i;
    if (c < dv) out[row * ldo + c] = len > 0 ? acc[i] * inv : 0.0f;
  }
}
