// SiLU-and-mul CPU kernels: the raw-pointer interface shared by the dispatch file
// (activation.cpp) and the per-ISA builds of activation_kernel.h (activation_avx2.cpp,
// activation_avx512.cpp). Nothing here depends on the instruction set.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

namespace fastattn::cpu::activation {

// One call over M rows of x (M, 2*I): gate = x[:, :I], up = x[:, I:]. Rows of x are 2*I
// contiguous elements, stride_x apart; dy (M, I) rows stride_dy apart (backward only); out is
// contiguous: (M, I) forward, dx (M, 2*I) backward. The work is cut into pieces of `chunk`
// columns of one row (chunks_per_row per row, the last one shorter), numbered row-major: a
// kernel call handles pieces [begin, end), so that one long row can be shared among threads as
// well as many short ones.
struct Params {
  const void* x;
  int64_t stride_x;
  const void* dy;  // backward only
  int64_t stride_dy;
  void* out;
  int64_t I;
  int64_t chunk;
  int64_t chunks_per_row;
  c10::ScalarType dtype;  // of x, dy, out
};

using Fn = void (*)(const Params&, int64_t begin, int64_t end);

// Each instruction-set build defines these in its own namespace.
#define FASTATTN_ACT_DECLARE(isa)                                            \
  namespace isa {                                                            \
  void silu_mul_fwd_pieces(const Params& p, int64_t begin, int64_t end);     \
  void silu_mul_bwd_pieces(const Params& p, int64_t begin, int64_t end);     \
  }
FASTATTN_ACT_DECLARE(generic)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTATTN_ACT_HAVE_X86_BUILDS 1
FASTATTN_ACT_DECLARE(avx2)
FASTATTN_ACT_DECLARE(avx512)
#endif
#undef FASTATTN_ACT_DECLARE

}  // namespace fastattn::cpu::activation
