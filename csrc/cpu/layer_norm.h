// LayerNorm / RMSNorm CPU kernels: the raw-pointer interface shared by the dispatch file
// (layer_norm.cpp) and the per-ISA builds of layer_norm_kernel.h (layer_norm_avx2.cpp,
// layer_norm_avx512.cpp). Nothing here depends on the instruction set.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

namespace fastattn::cpu::layer_norm {

// One call of the forward over an (M, N) problem. Rows of x/residual are N contiguous elements,
// `stride_*` elements apart; outputs are contiguous. weight/bias are float32 (N,) and never null
// (ones/zeros when the module has none), so the inner loop has no branches.
struct FwdParams {
  const void* x;
  int64_t stride_x;
  const void* residual;  // nullptr: no fused residual
  int64_t stride_residual;
  const float* weight;
  const float* bias;
  void* out;
  void* residual_out;  // written iff residual != nullptr
  float* mean;
  float* rstd;
  int64_t M;
  int64_t N;
  float eps;
  bool rms;
  c10::ScalarType dtype;  // of x, residual, out, residual_out
};

// Backward for rows [row_begin, row_end). dx = rstd * (g - c1 - xhat * c2) with g = dy * w,
// c1 = mean(g) (0 for rms), c2 = mean(g * xhat), plus grad_residual_out when given.
// When dw_partial != nullptr, sum(dy * xhat) and sum(dy) over these rows are added to
// dw_partial/db_partial (float32, N), in row order.
struct BwdParams {
  const void* dy;
  int64_t stride_dy;
  const void* dres;  // grad of residual_out, nullptr when absent
  int64_t stride_dres;
  const void* x;
  int64_t stride_x;
  const float* weight;
  const float* mean;
  const float* rstd;
  void* dx;  // contiguous (M, N)
  float* dw_partial;
  float* db_partial;
  int64_t N;
  bool rms;
  c10::ScalarType dtype;
};

using FwdFn = void (*)(const FwdParams&, int64_t row_begin, int64_t row_end);
using BwdFn = void (*)(const BwdParams&, int64_t row_begin, int64_t row_end);

// Each instruction-set build defines these in its own namespace.
#define FASTATTN_LN_DECLARE(isa)                                           \
  namespace isa {                                                          \
  void fwd_rows(const FwdParams& p, int64_t row_begin, int64_t row_end);   \
  void bwd_rows(const BwdParams& p, int64_t row_begin, int64_t row_end);   \
  }
FASTATTN_LN_DECLARE(generic)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTATTN_LN_HAVE_X86_BUILDS 1
FASTATTN_LN_DECLARE(avx2)
FASTATTN_LN_DECLARE(avx512)
#endif
#undef FASTATTN_LN_DECLARE

}  // namespace fastattn::cpu::layer_norm
