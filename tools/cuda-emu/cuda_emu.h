// CPU emulation of the CUDA kernel language subset used by kernels/*.cu.
// Threads of a block run as ucontext fibers; __syncthreads and warp
// shuffles are barriers checked for divergence (a deadlock aborts).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>
struct emu_uint3 { unsigned x, y, z; };
struct float4 { float x, y, z, w; };
namespace emu {
extern emu_uint3 g_block_idx, g_block_dim, g_grid_dim;
emu_uint3& cur_tid();
void syncthreads();
void syncwarp();
float shfl_xor(float v, int o);
float shfl_idx(float v, int src);
void* dyn_smem();
using Launcher = std::function<void(void**)>;
std::map<std::string, Launcher>& registry();
struct Reg { Reg(const char* n, Launcher l) { registry()[n] = std::move(l); } };
template <typename... A, size_t... I>
void call_impl(void (*k)(A...), void** p, std::index_sequence<I...>) {
  k(*reinterpret_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}
template <typename... A> Launcher make(void (*k)(A...)) {
  return [k](void** p) { call_impl(k, p, std::index_sequence_for<A...>{}); };
}
}  // namespace emu
#define threadIdx (emu::cur_tid())
#define blockIdx (emu::g_block_idx)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __syncthreads() emu::syncthreads()
#define __syncwarp(...) emu::syncwarp()
inline float __shfl_xor_sync(unsigned, float v, int o) { return emu::shfl_xor(v, o); }
inline float __shfl_sync(unsigned, float v, int s) { return emu::shfl_idx(v, s); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
using std::max;
using std::min;
