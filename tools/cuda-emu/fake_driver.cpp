// A fake libcuda: device memory is host memory, kernels run on the emulator.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <map>
#include <functional>
namespace emu { int launch(const char*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void**); std::map<std::string, std::function<void(void**)>>& registry(); }
typedef int CUresult;
typedef unsigned long long CUdeviceptr;
static thread_local void* g_cur = nullptr;
static int g_ctx_dummy, g_mod_dummy;
static std::map<void*, std::string> g_funcs;
static long g_live_allocs = 0;
extern "C" {
CUresult cuInit(unsigned) { return 0; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return 0; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return 0; }
CUresult cuDeviceGet(int* d, int o) { if (o != 0) return 101; *d = 0; return 0; }
CUresult cuDevicePrimaryCtxRetain(void** c, int) { *c = &g_ctx_dummy; return 0; }
CUresult cuDevicePrimaryCtxRelease_v2(int) { return 0; }
CUresult cuCtxGetCurrent(void** c) { *c = g_cur; return 0; }
CUresult cuCtxSetCurrent(void* c) { g_cur = c; return 0; }
CUresult cuCtxSynchronize() { return 0; }
CUresult cuDeviceGetAttribute(int* v, int a, int) {
  *v = a == 75 ? 9 : a == 76 ? 0 : a == 115 ? 1 : a == 16 ? 132 : 0;
  return 0;
}
CUresult cuDeviceGetName(char* n, int len, int) { snprintf(n, len, "nann CPU emulator"); return 0; }
CUresult cuDeviceTotalMem_v2(size_t* b, int) { *b = (size_t)1 << 34; return 0; }
CUresult cuMemGetInfo_v2(size_t* f, size_t* t) { *f = *t = (size_t)1 << 34; return 0; }
CUresult cuStreamCreate(void** s, unsigned) { *s = malloc(8); return 0; }
CUresult cuStreamDestroy_v2(void* s) { free(s); return 0; }
CUresult cuStreamSynchronize(void*) { return 0; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return 0; }
CUresult cuEventCreate(void** e, unsigned) { *e = malloc(8); return 0; }
CUresult cuEventDestroy_v2(void* e) { free(e); return 0; }
CUresult cuEventRecord(void*, void*) { return 0; }
CUresult cuEventSynchronize(void*) { return 0; }
CUresult cuEventQuery(void*) { return 0; }
CUresult cuEventElapsedTime(float* ms, void*, void*) { *ms = 0.001f; return 0; }
CUresult cuEventElapsedTime_v2(float* ms, void*, void*) { *ms = 0.001f; return 0; }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, void*) {
  void* m = malloc(n ? n : 1);
  if (!m) return 2;
  memset(m, 0xAB, n);  // garbage, like fresh device memory
  *p = (CUdeviceptr)m;
  g_live_allocs++;
  return 0;
}
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) { return cuMemAllocAsync(p, n, nullptr); }
CUresult cuMemFreeAsync(CUdeviceptr p, void*) { free((void*)p); g_live_allocs--; return 0; }
CUresult cuMemFree_v2(CUdeviceptr p) { return cuMemFreeAsync(p, nullptr); }
CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void*) { memset((void*)p, v, n); return 0; }
CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) { memset((void*)p, v, n); return 0; }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, void*) { memcpy((void*)d, s, n); return 0; }
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) { memcpy((void*)d, s, n); return 0; }
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, void*) { memcpy(d, (void*)s, n); return 0; }
CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) { memcpy(d, (void*)s, n); return 0; }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void*) { memcpy((void*)d, (void*)s, n); return 0; }
CUresult cuModuleLoadData(void** m, const void* image) {
  if (!image || strstr((const char*)image, ".version") == nullptr) { fprintf(stderr, "EMU: module image is not PTX\n"); return 200; }
  *m = &g_mod_dummy;
  return 0;
}
CUresult cuModuleUnload(void*) { return 0; }
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
  auto& r = emu::registry();
  auto it = r.find(name);
  if (it == r.end()) return 500;
  *f = (void*)&it->first;
  return 0;
}
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned smem, void*, void** params, void**) {
  const std::string* name = (const std::string*)f;
  return emu::launch(name->c_str(), gx, gy, gz, bx, by, bz, smem, params);
}
CUresult cuGetErrorString(CUresult, const char** s) { *s = "emulated error"; return 0; }
CUresult cuGetErrorName(CUresult, const char** s) { *s = "EMU_ERROR"; return 0; }
}
