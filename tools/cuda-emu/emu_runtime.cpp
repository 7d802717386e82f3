#include "cuda_emu.h"
#include <ucontext.h>
#include <mutex>
namespace emu {
emu_uint3 g_block_idx, g_block_dim, g_grid_dim;
std::map<std::string, Launcher>& registry() { static std::map<std::string, Launcher> r; return r; }
enum State { RUN, BLK, WRP, DONE };
struct Fiber { ucontext_t ctx; emu_uint3 tid; State state; long wgen; char* stack; };
static std::vector<Fiber> fibers;
static ucontext_t sched;
static int cur = -1;
static std::function<void()> thunk;
static std::vector<float> slots;  // per thread shuffle slot
static std::vector<char> dyn;
static const char* kernel_name = "";
emu_uint3& cur_tid() { return fibers[cur].tid; }
void* dyn_smem() { return dyn.data(); }
static void yield(State s) {
  fibers[cur].state = s;
  swapcontext(&fibers[cur].ctx, &sched);
}
void syncthreads() { yield(BLK); }
void syncwarp() { fibers[cur].wgen++; yield(WRP); }
static float shfl_any(float v, int src_lane) {
  int lane = cur & 31, base = cur & ~31;
  slots[cur] = v;
  syncwarp();
  float r = slots[base + (src_lane & 31)];
  syncwarp();
  (void)lane;
  return r;
}
float shfl_xor(float v, int o) { return shfl_any(v, (cur & 31) ^ o); }
float shfl_idx(float v, int s) { return shfl_any(v, s); }
static void entry() {
  thunk();
  fibers[cur].state = DONE;
}
static const size_t STACK = 128 * 1024;
void run_block(int nthreads) {
  if ((int)fibers.size() < nthreads) {
    size_t old = fibers.size();
    fibers.resize(nthreads);
    for (size_t i = old; i < fibers.size(); ++i) fibers[i].stack = (char*)malloc(STACK);
  }
  slots.assign(nthreads, 0.0f);
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = fibers[i];
    f.tid = {(unsigned)i, 0, 0};
    f.state = RUN;
    f.wgen = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = STACK;
    f.ctx.uc_link = &sched;
    makecontext(&f.ctx, entry, 0);
  }
  for (;;) {
    bool ran = false;
    for (int i = 0; i < nthreads; ++i) {
      if (fibers[i].state == RUN) {
        cur = i;
        swapcontext(&sched, &fibers[i].ctx);
        ran = true;
      }
    }
    int live = 0, blk = 0;
    for (int i = 0; i < nthreads; ++i) {
      if (fibers[i].state != DONE) live++;
      if (fibers[i].state == BLK) blk++;
    }
    if (live == 0) break;
    bool released = false;
    if (blk == live) {
      int done = nthreads - live;
      if (done > 0) {
        fprintf(stderr, "EMU WARNING %s: __syncthreads with %d exited threads (block %u,%u)\n",
                kernel_name, done, g_block_idx.x, g_block_idx.y);
      }
      for (int i = 0; i < nthreads; ++i)
        if (fibers[i].state == BLK) fibers[i].state = RUN;
      released = true;
    }
    for (int w = 0; w < nthreads; w += 32) {
      int end = std::min(nthreads, w + 32), waiting = 0, alive = 0;
      long gen = -1;
      bool same = true;
      for (int i = w; i < end; ++i) {
        if (fibers[i].state != DONE) alive++;
        if (fibers[i].state == WRP) {
          waiting++;
          if (gen < 0) gen = fibers[i].wgen;
          else if (gen != fibers[i].wgen) same = false;
        }
      }
      if (waiting > 0 && waiting == alive) {
        if (alive != end - w) {
          fprintf(stderr, "EMU ERROR %s: warp shuffle with exited lanes (block %u, warp %d)\n",
                  kernel_name, g_block_idx.x, w / 32);
          abort();
        }
        if (!same) {
          fprintf(stderr, "EMU ERROR %s: lanes of warp %d at different shuffles\n", kernel_name, w / 32);
          abort();
        }
        for (int i = w; i < end; ++i) fibers[i].state = RUN;
        released = true;
      }
    }
    if (!ran && !released) {
      fprintf(stderr, "EMU ERROR %s: deadlock in block (%u,%u):", kernel_name, g_block_idx.x,
              g_block_idx.y);
      for (int i = 0; i < nthreads; ++i) fprintf(stderr, " %d", (int)fibers[i].state);
      fprintf(stderr, "\n");
      abort();
    }
  }
}
int launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
           unsigned bz, unsigned smem, void** params) {
  static std::mutex one_device;  // the emulator runs one launch at a time
  std::lock_guard<std::mutex> guard(one_device);
  auto it = registry().find(name);
  if (it == registry().end()) return 500;
  if (by != 1 || bz != 1 || bx == 0 || bx > 1024 || gx == 0 || gy == 0 || gz == 0 || gy > 65535 ||
      gz > 65535 || gx > 0x7fffffffu || smem > 48 * 1024) {
    fprintf(stderr, "EMU ERROR %s: bad launch config grid (%u,%u,%u) block (%u,%u,%u) smem %u\n", name,
            gx, gy, gz, bx, by, bz, smem);
    return 1;
  }
  kernel_name = name;
  dyn.assign(smem + 16, (char)0xff);  // NaN bytes: reads before writes show up
  g_grid_dim = {gx, gy, gz};
  g_block_dim = {bx, by, bz};
  Launcher& l = it->second;
  thunk = [&]() { l(params); };
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        g_block_idx = {x, y, z};
        run_block((int)bx);
      }
  return 0;
}
}  // namespace emu
