// layernorm.cu: y = (x - mean) / sqrt(var + eps) * gamma + beta per row of
// width d, one warp per row, two passes (mean, then the centred variance:
// no cancellation). gamma / beta may be null (1 / 0). A building block for
// the TAR model; BAR has no normalisation.

extern "C" __global__ void nann_layer_norm_rows(const float* x, int ldx, float* y, int ldy,
                                                const float* gamma, const float* beta, int rows,
                                                int d, float eps) {
  const int lane = threadIdx.x & 31;
  const nann_i64 row = (nann_i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave together
  const float* xr = x + row * ldx;
  float* yr = y + row * ldy;
  float s = 0.0f;
  for (int c = lane; c < d; c += 32) s += xr[c];
  const float mean = nann_warp_sum(s) / (float)d;
  float v = 0.0f;
  for (int c = lane; c < d; c += 32) {
    float t = xr[c] - mean;
    v = fmaf(t, t, v);
  }
  const float inv = 1.0f / sqrtf(nann_warp_sum(v) / (float)d + eps);
  for (int c = lane; c < d; c += 32) {
    float t = (xr[c] - mean) * inv;
    if (gamma != 0) t *= gamma[c];
    if (beta != 0) t += beta[c];
    yr[c] = t;
  }
}
