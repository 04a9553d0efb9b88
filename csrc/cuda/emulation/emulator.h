// Host emulation of the subset of CUDA that the kernels in csrc/cuda use, so that those kernels
// run (slowly, exactly as written) on a machine without a GPU. Compiled with g++ when
// FASTATTN_EMULATE is defined; never part of the real build.
//
// Every CUDA thread is a fiber (ucontext) with its own stack; one OS thread schedules them.
//  * __syncthreads() parks a fiber until every live thread of the block has arrived.
//  * Warp-level operations (shuffles, ldmatrix, mma.sync, __syncwarp) are collectives: each lane
//    deposits its operand and parks; the last lane to arrive computes every lane's result from the
//    PTX ISA fragment layouts. Lanes of one warp reaching different collectives is reported as
//    divergence (undefined behaviour on the hardware too).
//  * cp.async copies are deferred until cp.async.wait_group (or done at issue, see
//    set_cp_async_eager), so a read of a tile before its wait sees stale data, as it may on a GPU.
//  * Shared memory starts filled with 0xFF bytes (NaN for floating point) and is followed by a
//    canary region checked after every block; the fibers resume in forward, reverse or shuffled
//    order at each barrier so missing barriers change the result.
// Errors (misaligned vector/cp.async/ldmatrix addresses, out-of-range shared memory addresses,
// divergence, deadlock, canary overwrite) abort the launch and are reported by last_error().
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <vector_types.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fa_emu {

constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kCanaryBytes = 4096;
constexpr size_t kMaxSmemBytes = 227 * 1024;  // sm_90 opt-in limit per block
constexpr unsigned char kCanary = 0xA5;

enum class Wait { kNone, kBarrier, kWarp };

struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;
  int src_bytes;
};

struct Thread {
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 tid;
  int linear = 0, lane = 0, warp = 0;
  Wait wait = Wait::kNone;
  unsigned wait_gen = 0;
  bool done = false, started = false;
  std::vector<PendingCopy> open_group;          // issued, not yet committed
  std::deque<std::vector<PendingCopy>> groups;  // committed, oldest first
};

struct WarpState {
  unsigned gen = 0;
  int arrived = 0;
  int live = 32;
  const char* tag = nullptr;
  alignas(16) unsigned char in[32][64];
  alignas(16) unsigned char out[32][64];
};

struct Runtime {
  ucontext_t sched;
  std::vector<Thread> threads;
  std::vector<WarpState> warps;
  Thread* cur = nullptr;
  dim3 grid, block, block_idx;
  char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<char> smem_storage;
  unsigned bar_gen = 0;
  int bar_arrived = 0, live = 0;
  std::function<void()> body;
  std::string error;
  bool aborted = false;
  // 0 forward, 1 reverse, 2 shuffled, 3 cycles through the three; 4 (default) runs one warp at a
  // time until all its lanes wait at a barrier (warps far apart: inter-warp races show), warps in
  // alternating order, lanes forward / reverse / shuffled by round
  int order_mode = 4;
  bool cp_async_eager = false;
  std::mt19937 rng{12345};
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
  long long collectives = 0;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline void yield_to_scheduler() { swapcontext(&rt().cur->ctx, &rt().sched); }

[[noreturn]] inline void fail(const std::string& msg) {
  Runtime& r = rt();
  if (r.error.empty()) {
    char where[160];
    if (r.cur != nullptr) {
      std::snprintf(where, sizeof(where), " [block (%u,%u,%u) thread %d]", r.block_idx.x,
                    r.block_idx.y, r.block_idx.z, r.cur->linear);
    } else {
      where[0] = '\0';
    }
    r.error = msg + where;
  }
  r.aborted = true;
  if (r.cur != nullptr) {
    swapcontext(&r.cur->ctx, &r.sched);  // never resumed
  }
  std::fprintf(stderr, "fa_emu: %s\n", r.error.c_str());
  std::abort();
}

inline void check(bool ok, const char* what) {
  if (!ok) fail(what);
}

inline const std::string& last_error() { return rt().error; }
inline void clear_error() {
  rt().error.clear();
  rt().aborted = false;
}
inline void set_order_mode(int mode) { rt().order_mode = mode; }
inline void set_cp_async_eager(bool eager) { rt().cp_async_eager = eager; }
inline long long collective_count() { return rt().collectives; }

// ---- shared memory ---------------------------------------------------------------------------
inline char* smem_base() { return rt().smem; }

inline void check_smem(const void* p, size_t bytes, size_t align, const char* what) {
  Runtime& r = rt();
  const char* c = static_cast<const char*>(p);
  if (c < r.smem || c + bytes > r.smem + r.smem_bytes) {
    fail(std::string(what) + ": shared memory address out of the block's dynamic allocation");
  }
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    fail(std::string(what) + ": misaligned shared memory address");
  }
}

inline void check_align(const void* p, size_t align, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    fail(std::string(what) + ": misaligned address");
  }
}

// ---- block barrier ---------------------------------------------------------------------------
inline void release_barrier_if_complete() {
  Runtime& r = rt();
  if (r.bar_arrived > 0 && r.bar_arrived == r.live) {
    r.bar_arrived = 0;
    ++r.bar_gen;
  }
}

inline void syncthreads() {
  Runtime& r = rt();
  Thread* t = r.cur;
  ++r.bar_arrived;
  t->wait = Wait::kBarrier;
  t->wait_gen = r.bar_gen;
  release_barrier_if_complete();
  yield_to_scheduler();
}

// ---- warp collectives ------------------------------------------------------------------------
// compute(ins, outs): ins[lane] / outs[lane] are the deposited operands / results of each lane.
template <class Out, class In, class F>
inline Out warp_collective(const char* tag, const In& in, F&& compute) {
  static_assert(sizeof(In) <= 64 && sizeof(Out) <= 64, "collective operand too large");
  static_assert(std::is_trivially_copyable<In>::value && std::is_trivially_copyable<Out>::value,
                "collective operands must be trivially copyable");
  Runtime& r = rt();
  Thread* t = r.cur;
  WarpState& w = r.warps[t->warp];
  if (w.live != 32) fail(std::string(tag) + ": warp collective with exited lanes");
  if (w.arrived == 0) {
    w.tag = tag;
  } else if (std::strcmp(w.tag, tag) != 0) {
    fail(std::string("warp divergence: one lane at ") + tag + ", another at " + w.tag);
  }
  std::memcpy(w.in[t->lane], &in, sizeof(In));
  const unsigned my_gen = w.gen;
  ++w.arrived;
  if (w.arrived == 32) {
    In ins[32];
    Out outs[32];
    for (int l = 0; l < 32; ++l) std::memcpy(&ins[l], w.in[l], sizeof(In));
    compute(ins, outs);
    for (int l = 0; l < 32; ++l) std::memcpy(w.out[l], &outs[l], sizeof(Out));
    w.arrived = 0;
    ++w.gen;
    ++r.collectives;
  }
  t->wait = Wait::kWarp;  // runnable again once the collective of generation my_gen completed
  t->wait_gen = my_gen;
  yield_to_scheduler();
  Out o;
  std::memcpy(&o, w.out[t->lane], sizeof(Out));
  return o;
}

inline void check_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("only full-warp masks are emulated");
}

template <class T>
inline T shfl_xor(unsigned mask, T v, int lane_mask) {
  check_full_mask(mask);
  return warp_collective<T>("shfl_xor", v, [lane_mask](const T* ins, T* outs) {
    for (int l = 0; l < 32; ++l) outs[l] = ins[(l ^ lane_mask) & 31];
  });
}

template <class T>
inline T shfl(unsigned mask, T v, int src_lane) {
  check_full_mask(mask);
  struct In {
    T v;
    int src;
  };
  return warp_collective<T>("shfl", In{v, src_lane}, [](const In* ins, T* outs) {
    for (int l = 0; l < 32; ++l) outs[l] = ins[ins[l].src & 31].v;
  });
}

inline void syncwarp(unsigned mask) {
  check_full_mask(mask);
  warp_collective<int>("syncwarp", 0, [](const int*, int* outs) {
    for (int l = 0; l < 32; ++l) outs[l] = 0;
  });
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
// matrix i (16 bytes each). Without .trans, lane l receives row l/4, elements 2(l%4), 2(l%4)+1 of
// matrix i in register i; with .trans, elements (2(l%4), l/4) and (2(l%4)+1, l/4).
inline void ldmatrix_x4(uint32_t (&regs)[4], const void* row_addr, bool trans) {
  check_smem(row_addr, 16, 16, "ldmatrix");
  struct Out {
    uint32_t r[4];
  };
  Out o = warp_collective<Out>(
      trans ? "ldmatrix.trans" : "ldmatrix", row_addr, [trans](const void* const* ins, Out* outs) {
        for (int l = 0; l < 32; ++l) {
          for (int i = 0; i < 4; ++i) {
            uint16_t lo, hi;
            if (!trans) {
              const uint16_t* row = static_cast<const uint16_t*>(ins[8 * i + l / 4]);
              lo = row[2 * (l % 4)];
              hi = row[2 * (l % 4) + 1];
            } else {
              const uint16_t* r0 = static_cast<const uint16_t*>(ins[8 * i + 2 * (l % 4)]);
              const uint16_t* r1 = static_cast<const uint16_t*>(ins[8 * i + 2 * (l % 4) + 1]);
              lo = r0[l / 4];
              hi = r1[l / 4];
            }
            outs[l].r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
          }
        }
      });
  for (int i = 0; i < 4; ++i) regs[i] = o.r[i];
}

// The C/D fragment of the m16n8 mma shapes (f32 or s32 elements): lane l = 4g + t holds
// C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1].
template <class Acc>
inline void acc_fragment_in(Acc (&C)[16][8], int lane, const Acc (&c)[4]) {
  const int g = lane >> 2, t = lane & 3;
  C[g][2 * t] = c[0];
  C[g][2 * t + 1] = c[1];
  C[g + 8][2 * t] = c[2];
  C[g + 8][2 * t + 1] = c[3];
}
template <class Acc>
inline void acc_fragment_out(const Acc (&D)[16][8], int lane, Acc (&d)[4]) {
  const int g = lane >> 2, t = lane & 3;
  d[0] = D[g][2 * t];
  d[1] = D[g][2 * t + 1];
  d[2] = D[g + 8][2 * t];
  d[3] = D[g + 8][2 * t + 1];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, PTX ISA fragment layouts:
// groupID g = lane >> 2, t = lane % 4.
//   A (16x16): reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..], reg3 =
//   A[g+8][2t+8..] B (16x8, k x n): reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g] C/D (16x8):
//   c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
template <bool kBf16>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct In {
    uint32_t a[4], b[2];
    float c[4];
  };
  struct Out {
    float d[4];
  };
  In in;
  for (int i = 0; i < 4; ++i) in.a[i] = a[i], in.c[i] = d[i];
  in.b[0] = b[0];
  in.b[1] = b[1];
  auto to_f = [](uint16_t bits) {
    if (kBf16) {
      __nv_bfloat16_raw raw;
      raw.x = bits;
      return __bfloat162float(__nv_bfloat16(raw));
    }
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  };
  Out o = warp_collective<Out>(kBf16 ? "mma.bf16" : "mma.f16", in, [&](const In* ins, Out* outs) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      const int rows[4] = {g, g + 8, g, g + 8};
      const int cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
      for (int i = 0; i < 4; ++i) {
        A[rows[i]][cols[i]] = to_f(uint16_t(ins[l].a[i] & 0xffff));
        A[rows[i]][cols[i] + 1] = to_f(uint16_t(ins[l].a[i] >> 16));
      }
      B[2 * t][g] = to_f(uint16_t(ins[l].b[0] & 0xffff));
      B[2 * t + 1][g] = to_f(uint16_t(ins[l].b[0] >> 16));
      B[2 * t + 8][g] = to_f(uint16_t(ins[l].b[1] & 0xffff));
      B[2 * t + 9][g] = to_f(uint16_t(ins[l].b[1] >> 16));
      acc_fragment_in(C, l, ins[l].c);
    }
    float D[16][8];
    for (int m = 0; m < 16; ++m) {
      for (int n = 0; n < 8; ++n) {
        float acc = C[m][n];
        for (int k = 0; k < 16; ++k) acc += A[m][k] * B[k][n];
        D[m][n] = acc;
      }
    }
    for (int l = 0; l < 32; ++l) acc_fragment_out(D, l, outs[l].d);
  });
  for (int i = 0; i < 4; ++i) d[i] = o.d[i];
}

// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (byte i of a register is element i):
//   A (16x32): reg0 = A[g][4t..4t+3], reg1 = A[g+8][4t..], reg2 = A[g][4t+16..], reg3 =
//   A[g+8][4t+16..] B (32x8, k x n): reg0 = B[4t..4t+3][g], reg1 = B[4t+16..4t+19][g] C/D as for
//   the f32 shape, in s32.
inline void mma_16832_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct In {
    uint32_t a[4], b[2];
    int32_t c[4];
  };
  struct Out {
    int32_t d[4];
  };
  In in;
  for (int i = 0; i < 4; ++i) in.a[i] = a[i], in.c[i] = d[i];
  in.b[0] = b[0];
  in.b[1] = b[1];
  Out o = warp_collective<Out>("mma.s8", in, [](const In* ins, Out* outs) {
    int A[16][32], B[32][8], C[16][8];
    auto byte = [](uint32_t v, int i) { return int(int8_t(uint8_t(v >> (8 * i)))); };
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      const int rows[4] = {g, g + 8, g, g + 8};
      const int cols[4] = {4 * t, 4 * t, 4 * t + 16, 4 * t + 16};
      for (int r = 0; r < 4; ++r) {
        for (int i = 0; i < 4; ++i) A[rows[r]][cols[r] + i] = byte(ins[l].a[r], i);
      }
      for (int i = 0; i < 4; ++i) {
        B[4 * t + i][g] = byte(ins[l].b[0], i);
        B[4 * t + 16 + i][g] = byte(ins[l].b[1], i);
      }
      acc_fragment_in(C, l, ins[l].c);
    }
    int D[16][8];
    for (int m = 0; m < 16; ++m) {
      for (int n = 0; n < 8; ++n) {
        int64_t acc = C[m][n];
        for (int k = 0; k < 32; ++k) acc += A[m][k] * B[k][n];
        D[m][n] = int32_t(acc);
      }
    }
    for (int l = 0; l < 32; ++l) acc_fragment_out(D, l, outs[l].d);
  });
  for (int i = 0; i < 4; ++i) d[i] = o.d[i];
}

// ---- cp.async --------------------------------------------------------------------------------
inline void do_copy(const PendingCopy& c) {
  if (c.src_bytes > 0) std::memcpy(c.dst, c.src, size_t(c.src_bytes));
  if (c.bytes > c.src_bytes) {
    std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, size_t(c.bytes - c.src_bytes));
  }
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: copies src_bytes and zero-fills the rest.
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  check_smem(dst, 16, 16, "cp.async dst");
  check(src_bytes >= 0 && src_bytes <= 16, "cp.async: src-size must be in [0, 16]");
  if (src_bytes > 0) check_align(src, 16, "cp.async src");
  PendingCopy c{dst, src, 16, src_bytes};
  if (rt().cp_async_eager) {
    do_copy(c);
  } else {
    rt().cur->open_group.push_back(c);
  }
}

inline void cp_async_commit() {
  Thread* t = rt().cur;
  t->groups.push_back(std::move(t->open_group));
  t->open_group.clear();
}

inline void cp_async_wait(int n) {
  Thread* t = rt().cur;
  while (int(t->groups.size()) > n) {
    for (const PendingCopy& c : t->groups.front()) do_copy(c);
    t->groups.pop_front();
  }
}

// ---- launch ----------------------------------------------------------------------------------
inline void fiber_entry() {
  Runtime& r = rt();
  r.body();
  Thread* t = r.cur;
  // copies still in flight land before the thread is gone
  for (auto& g : t->groups) {
    for (const PendingCopy& c : g) do_copy(c);
  }
  for (const PendingCopy& c : t->open_group) do_copy(c);
  t->groups.clear();
  t->open_group.clear();
  t->done = true;
  --r.live;
  --r.warps[t->warp].live;
  if (r.warps[t->warp].arrived > 0) fail("thread exited while its warp waits in a collective");
  release_barrier_if_complete();
  swapcontext(&t->ctx, &r.sched);
}

inline bool runnable(const Thread& t) {
  const Runtime& r = rt();
  if (t.done) return false;
  switch (t.wait) {
    case Wait::kNone:
      return true;
    case Wait::kBarrier:
      return r.bar_gen != t.wait_gen;
    case Wait::kWarp:
      return r.warps[t.warp].gen != t.wait_gen;
  }
  return false;
}

inline bool run_block(unsigned bx, unsigned by, unsigned bz, int round_seed) {
  Runtime& r = rt();
  const int n = int(r.block.x * r.block.y * r.block.z);
  r.block_idx = dim3(bx, by, bz);
  r.threads.assign(size_t(n), Thread());
  r.warps.assign(size_t(n / 32), WarpState());
  r.bar_gen = 0;
  r.bar_arrived = 0;
  r.live = n;
  std::memset(r.smem, 0xFF, r.smem_bytes);
  std::memset(r.smem + r.smem_bytes, kCanary, kCanaryBytes);
  for (int i = 0; i < n; ++i) {
    Thread& t = r.threads[size_t(i)];
    t.linear = i;
    t.tid = make_uint3(unsigned(i) % r.block.x, (unsigned(i) / r.block.x) % r.block.y,
                       unsigned(i) / (r.block.x * r.block.y));
    t.lane = i % 32;
    t.warp = i / 32;
    t.stack = r.stacks + size_t(i) * kStackBytes;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &r.sched;
    makecontext(&t.ctx, fiber_entry, 0);
  }
  std::vector<int> order(static_cast<size_t>(n));
  int round = round_seed;
  int finished = 0;
  const int n_warps = n / 32;
  // runs every runnable thread of order[begin, end) once; true if any ran
  auto run_once = [&](int begin, int end) {
    bool any = false;
    for (int k = begin; k < end; ++k) {
      Thread& t = r.threads[size_t(order[size_t(k)])];
      if (!runnable(t)) continue;
      t.wait = Wait::kNone;
      r.cur = &t;
      swapcontext(&r.sched, &t.ctx);
      r.cur = nullptr;
      any = true;
      if (r.aborted) return any;
      if (t.done) ++finished;
    }
    return any;
  };
  while (finished < n) {
    const int lane_mode = r.order_mode >= 3 ? round % 3 : r.order_mode;
    bool progressed = false;
    if (r.order_mode == 4) {
      for (int wi = 0; wi < n_warps; ++wi) {
        const int w = round % 2 == 0 ? wi : n_warps - 1 - wi;
        for (int l = 0; l < 32; ++l) order[size_t(w * 32 + l)] = w * 32 + l;
        if (lane_mode == 1) std::reverse(order.begin() + w * 32, order.begin() + w * 32 + 32);
        if (lane_mode == 2)
          std::shuffle(order.begin() + w * 32, order.begin() + w * 32 + 32, r.rng);
        while (run_once(w * 32, w * 32 + 32)) {
          progressed = true;
          if (r.aborted) return false;
        }
      }
    } else {
      for (int i = 0; i < n; ++i) order[size_t(i)] = i;
      if (lane_mode == 1) std::reverse(order.begin(), order.end());
      if (lane_mode == 2) std::shuffle(order.begin(), order.end(), r.rng);
      progressed = run_once(0, n);
      if (r.aborted) return false;
    }
    ++round;
    if (!progressed && finished < n) {
      int at_bar = 0, at_warp = 0;
      for (const Thread& t : r.threads) {
        if (!t.done) (t.wait == Wait::kBarrier ? at_bar : at_warp) += 1;
      }
      char msg[200];
      std::snprintf(msg, sizeof(msg),
                    "deadlock: %d threads wait at __syncthreads, %d in warp collectives, %d exited",
                    at_bar, at_warp, n - at_bar - at_warp);
      r.error = std::string(msg);
      r.aborted = true;
      return false;
    }
  }
  for (size_t i = 0; i < kCanaryBytes; ++i) {
    if (static_cast<unsigned char>(r.smem[r.smem_bytes + i]) != kCanary) {
      r.error = "shared memory written past the end of the dynamic allocation";
      r.aborted = true;
      return false;
    }
  }
  return true;
}

inline bool run_grid(dim3 grid, dim3 block, size_t smem_bytes) {
  Runtime& r = rt();
  if (!r.error.empty()) return false;
  const size_t n = size_t(block.x) * block.y * block.z;
  if (n == 0 || n > 1024 || n % 32 != 0) {
    r.error = "block size must be a multiple of 32 in [32, 1024] (emulator requirement)";
    return false;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    r.error = "invalid grid dimensions";
    return false;
  }
  if (smem_bytes > kMaxSmemBytes) {
    r.error = "dynamic shared memory above the per-block limit";
    return false;
  }
  r.grid = grid;
  r.block = block;
  r.smem_bytes = smem_bytes;
  r.smem_storage.assign(smem_bytes + kCanaryBytes + 16, 0);
  r.smem = r.smem_storage.data();
  r.smem += (16 - reinterpret_cast<uintptr_t>(r.smem) % 16) % 16;
  if (r.stacks_bytes < n * kStackBytes) {
    if (r.stacks != nullptr) munmap(r.stacks, r.stacks_bytes);
    r.stacks_bytes = n * kStackBytes;
    void* p = mmap(nullptr, r.stacks_bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      r.stacks = nullptr;
      r.stacks_bytes = 0;
      r.error = "could not map fiber stacks";
      return false;
    }
    r.stacks = static_cast<char*>(p);
  }
  int seed = 0;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        if (!run_block(x, y, z, seed++)) return false;
      }
    }
  }
  return true;
}

template <class... Params, class... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  std::tuple<std::decay_t<Params>...> packed(std::forward<Args>(args)...);
  rt().body = [&]() { std::apply(kernel, packed); };
  run_grid(grid, block, smem);
  rt().body = nullptr;
}

}  // namespace fa_emu

// ---- the CUDA names the kernels use --------------------------------------------------------
#define threadIdx (::fa_emu::rt().cur->tid)
#define blockIdx (::fa_emu::rt().block_idx)
#define blockDim (::fa_emu::rt().block)
#define gridDim (::fa_emu::rt().grid)
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
inline void __syncthreads() { ::fa_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::fa_emu::syncwarp(mask); }
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int = 32) {
  return ::fa_emu::shfl_xor(mask, v, lane_mask);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int = 32) {
  return ::fa_emu::shfl(mask, v, src_lane);
}
