// elementwise.cu: fills, bias and activation epilogues, copies.
// Building blocks (BAR and TAR); launched by src/cuda/ops.rs.

// y[r, c] = v[c] for r < rows, c < cols: broadcast a row (a bias, or a
// request's precomputed user-side term) into every row of a matrix.
extern "C" __global__ void nann_fill_rows(float* y, int ldy, const float* v, int rows, int cols) {
  NANN_GRID_LOOP(i, (nann_i64)rows * cols) {
    nann_i64 r = i / cols;
    int c = (int)(i - r * cols);
    y[r * ldy + c] = v[c];
  }
}

// y[r, c] = act(y[r, c] + bias[c]) (bias may be null: activation only).
extern "C" __global__ void nann_bias_act(float* y, int ldy, const float* bias, int rows, int cols,
                                         int act) {
  NANN_GRID_LOOP(i, (nann_i64)rows * cols) {
    nann_i64 r = i / cols;
    int c = (int)(i - r * cols);
    float x = y[r * ldy + c];
    if (bias != 0) x += bias[c];
    y[r * ldy + c] = nann_act(x, act);
  }
}

// x[i] = value for i < n (poisoning buffers with NaN in tests, zeroing).
extern "C" __global__ void nann_fill_f32(float* x, float value, nann_i64 n) {
  NANN_GRID_LOOP(i, n) { x[i] = value; }
}

// dst[i] = src[i] for i < n4 float4s: the device-bandwidth probe of the
// benchmark (reads and writes 32 bytes per element pair). Both pointers
// 16-byte aligned (device allocations are 256-byte aligned).
extern "C" __global__ void nann_copy_f32x4(float4* dst, const float4* src, nann_i64 n4) {
  NANN_GRID_LOOP(i, n4) { dst[i] = src[i]; }
}
