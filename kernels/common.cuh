// common.cuh: helpers shared by every kernel file.
//
// src/cuda/kernels.rs prepends this text to each kernels/*.cu source before
// NVRTC compiles it (NVRTC reads no files and has no <math.h>; expf, sqrtf,
// fmaxf and the warp intrinsics are NVRTC builtins). A `#line` directive
// after it makes compiler messages name the .cu file and its own lines.
//
// Conventions of every kernel in kernels/:
// * names start with `nann_` and are `extern "C"` (no C++ mangling), so
//   src/cuda looks them up by name;
// * matrices are row-major with an explicit leading dimension (`ld*`, in
//   elements), so a kernel can read or write a column block of a wider
//   buffer;
// * pointers arrive as 64-bit device addresses, integers as 32-bit `int`
//   (the Rust side checks every size fits before the launch), and index
//   products are formed in 64 bits;
// * a NaN input propagates to the outputs it feeds (relu keeps NaN, as the
//   CPU reference does), so NaN-poisoned buffers expose unwritten outputs.

#define NANN_FULL_MASK 0xffffffffu
#define NANN_ACT_NONE 0
#define NANN_ACT_RELU 1

typedef unsigned int nann_u32;
typedef long long nann_i64;

// Sum over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float nann_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(NANN_FULL_MASK, v, o);
  return v;
}

// Maximum over the 32 lanes of a warp (NaN lanes are ignored, like the CPU
// reference's comparisons); every lane gets the result.
__device__ __forceinline__ float nann_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(NANN_FULL_MASK, v, o));
  return v;
}

// relu that keeps NaN (x < 0 is false for NaN), as the CPU reference does.
__device__ __forceinline__ float nann_relu(float x) { return x < 0.0f ? 0.0f : x; }

__device__ __forceinline__ float nann_act(float x, int act) {
  return act == NANN_ACT_RELU ? nann_relu(x) : x;
}

// The logistic function without overflow for large |x| (the CPU formula).
__device__ __forceinline__ float nann_sigmoid(float x) {
  if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
  float e = expf(x);
  return e / (1.0f + e);
}

// A quiet NaN, written where an input is invalid (an id outside its table).
__device__ __forceinline__ float nann_nan() { return __int_as_float(0x7fffffff); }

// Grid-stride loop over [0, n) in 64-bit indices.
#define NANN_GRID_LOOP(i, n)                                                          \
  for (nann_i64 i = (nann_i64)blockIdx.x * blockDim.x + threadIdx.x; i < (nann_i64)(n); \
       i += (nann_i64)gridDim.x * blockDim.x)
