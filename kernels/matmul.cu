// matmul.cu: the linear layer Y = act(beta * Y + X W^T + b), row-major with
// leading dimensions, W stored [out, in] (the PyTorch convention of the
// weights file), so a column block of a layer's weight is (pointer offset,
// same ldw). A building block for BAR and TAR; cuBLAS sgemm is the other
// backend (src/cuda/ops.rs picks; the benchmark measures both).
//
// Tiling: a block of 256 threads computes a 64 x 64 tile of Y; each thread
// a 4 x 4 sub-tile strided by 16 (rows ty + 16 i, outputs tx + 16 j), over
// K in steps of 16 staged in shared memory (transposed, so the inner loop
// reads consecutive addresses). Every load is bounds-checked: any shape.
//
// beta == 0: Y is only written (it may hold NaN before); beta == 1: added.
// Accumulation in fp32 with fused multiply-adds; the sum order differs from
// the CPU's, which is what the 1e-4 parity tolerance covers.

#define MM_TM 64
#define MM_TN 64
#define MM_TK 16

extern "C" __global__ void __launch_bounds__(256)
nann_linear_f32(const float* x, int ldx, const float* w, int ldw, const float* bias, float* y,
                int ldy, int rows, int outs, int k, float beta, int act) {
  __shared__ float xs[MM_TK][MM_TM + 1];
  __shared__ float ws[MM_TK][MM_TN + 1];
  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const nann_i64 r0 = (nann_i64)blockIdx.y * MM_TM;
  const int o0 = blockIdx.x * MM_TN;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int k0 = 0; k0 < k; k0 += MM_TK) {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      int e = tid + 256 * l;  // 0..1023: (row or out) = e / 16, kk = e % 16
      int rr = e >> 4, kk = e & 15;
      nann_i64 gr = r0 + rr;
      int go = o0 + rr, gk = k0 + kk;
      xs[kk][rr] = (gr < rows && gk < k) ? x[gr * ldx + gk] : 0.0f;
      ws[kk][rr] = (go < outs && gk < k) ? w[(nann_i64)go * ldw + gk] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < MM_TK; ++kk) {
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

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    nann_i64 r = r0 + ty + 16 * i;
    if (r >= rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      int o = o0 + tx + 16 * j;
      if (o >= outs) continue;
      float v = acc[i][j];
      if (bias != 0) v += bias[o];
      if (beta != 0.0f) v += beta * y[r * ldy + o];
      y[r * ldy + o] = nann_act(v, act);
    }
  }
}
