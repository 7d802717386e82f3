// topk.cu: the best k scores of n on the device, by rounds of block-wise
// bitonic sorts: each block sorts up to 2048 (score, index) pairs in shared
// memory and keeps its first k (k <= 1024), so every round shrinks the
// input by at least half; the host launches rounds until one block holds
// everything (src/cuda/ops.rs, `top_k`).
//
// Order: higher score first; NaN ranks below every number (its key is
// -inf, the Scorer trait's rule); ties go to the lower index, so the
// result is deterministic. Output scores are the keys (NaN reported as
// -inf). Padding slots (index 0xffffffff) sort after everything.

#define TOPK_N 2048

__device__ __forceinline__ bool topk_before(float ka, nann_u32 ia, float kb, nann_u32 ib) {
  const bool va = ia != 0xffffffffu, vb = ib != 0xffffffffu;
  if (va != vb) return va;
  if (ka != kb) return ka > kb;
  return ia < ib;
}

// scores [n]; idx_in [n] or null (then the index is the position); writes
// min(k, count in block) pairs per block at out_* + blockIdx.x * k, padding
// the rest of the block's k slots with (-inf, 0xffffffff).
extern "C" __global__ void __launch_bounds__(1024)
nann_topk_block(const float* scores, const nann_u32* idx_in, int n, int k, float* out_scores,
                nann_u32* out_idx) {
  __shared__ float key[TOPK_N];
  __shared__ nann_u32 idx[TOPK_N];
  const nann_i64 start = (nann_i64)blockIdx.x * TOPK_N;
  for (int t = threadIdx.x; t < TOPK_N; t += blockDim.x) {
    nann_i64 g = start + t;
    if (g < n) {
      float s = scores[g];
      key[t] = s != s ? -__int_as_float(0x7f800000) : s;
      idx[t] = idx_in != 0 ? idx_in[g] : (nann_u32)g;
    } else {
      key[t] = -__int_as_float(0x7f800000);
      idx[t] = 0xffffffffu;
    }
  }
  for (int size = 2; size <= TOPK_N; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int p = threadIdx.x; p < TOPK_N / 2; p += blockDim.x) {
        const int i = 2 * p - (p & (stride - 1));
        const int j = i + stride;
        const bool best_first = (i & size) == 0;
        const bool swap = best_first ? topk_before(key[j], idx[j], key[i], idx[i])
                                     : topk_before(key[i], idx[i], key[j], idx[j]);
        if (swap) {
          float tk = key[i];
          key[i] = key[j];
          key[j] = tk;
          nann_u32 ti = idx[i];
          idx[i] = idx[j];
          idx[j] = ti;
        }
      }
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < k; t += blockDim.x) {
    out_scores[(nann_i64)blockIdx.x * k + t] = key[t];
    out_idx[(nann_i64)blockIdx.x * k + t] = idx[t];
  }
}
