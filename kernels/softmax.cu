// softmax.cu: in-place softmax of the first `len` entries of each row, one
// warp per row (building block; BAR's attention fuses its own softmax).
// max-subtracted, so huge logits do not overflow; len == 0 leaves the row.

extern "C" __global__ void nann_softmax_rows(float* x, int ldx, int rows, int len) {
  const int lane = threadIdx.x & 31;
  const nann_i64 row = (nann_i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave together: no later shuffle is split
  float* r = x + row * ldx;
  float m = -__int_as_float(0x7f800000);  // -inf
  for (int t = lane; t < len; t += 32) m = fmaxf(m, r[t]);
  m = nann_warp_max(m);
  if (m == -__int_as_float(0x7f800000)) m = 0.0f;  // every entry -inf or NaN
  float s = 0.0f;
  for (int t = lane; t < len; t += 32) {
    float e = expf(r[t] - m);
    r[t] = e;
    s += e;
  }
  s = nann_warp_sum(s);
  float inv = 1.0f / s;
  for (int t = lane; t < len; t += 32) r[t] *= inv;
}
