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

// The fused forward of fastattn::layer_norm_fused_fwd (FlashAttention's layer_norm_fn), per row:
//   x' = dropout(x * rowscale) (+ dropout(x1)) (+ residual), rounded to residual_out_dtype and
//   stored as residual_out; out = norm(x') * weight + bias; out1 = norm(x') * weight1 + bias1.
// weight/bias/weight1/bias1 are float32 (N,) with the offset already added to the weights, never
// null except weight1/bias1 (null: no out1). With q != nullptr, out is not written: the row of
// out rounded to dtype is quantized to q (int8, contiguous) and q_scale (float32 (M,)).
// Dropout keeps element e = row * N + col iff keep_bits(seed, e) >= keep_threshold (x) and
// keep_bits(seed ^ kX1Stream, e) >= keep_threshold (x1), written to mask / mask1 (0/1 bytes).
struct FusedFwdParams {
  const void* x;
  int64_t stride_x;
  const void* x1;  // nullptr: none; x's dtype
  int64_t stride_x1;
  const void* residual;  // nullptr: none
  int64_t stride_residual;
  c10::ScalarType residual_dtype;
  const float* rowscale;  // (M,) or nullptr
  const float* weight;
  const float* bias;
  const float* weight1;  // nullptr: no out1
  const float* bias1;
  void* out;   // x's dtype, contiguous
  void* out1;  // x's dtype, contiguous
  void* residual_out;  // contiguous, residual_out_dtype; nullptr when x' is x itself
  c10::ScalarType residual_out_dtype;
  uint8_t* mask;   // (M, N) when dropout_p > 0
  uint8_t* mask1;  // (M, N) when dropout_p > 0 and x1 given
  int8_t* q;       // quantize: (M, N) int8 instead of out
  float* q_scale;
  float* mean;
  float* rstd;
  int64_t M;
  int64_t N;
  float eps;
  bool rms;
  float dropout_p;
  uint64_t seed;
  c10::ScalarType dtype;  // of x, x1, out, out1
};

// Backward of the fused forward for rows [row_begin, row_end): with g = dy * weight
// (+ dy1 * weight1), d = rstd * (g - c1 - xhat * c2) + dres is the gradient of x' (and of the
// residual); the gradient of x1 is d * mask1 / (1 - p), of x d * mask / (1 - p) * rowscale.
// dw/db/dw1/db1 partials as in BwdParams, each null when not wanted.
struct FusedBwdParams {
  const void* dy;  // dtype
  int64_t stride_dy;
  const void* dy1;  // nullptr: no out1 gradient
  int64_t stride_dy1;
  const void* dres;  // x_dtype, nullptr when absent
  int64_t stride_dres;
  const void* x;  // residual_out rows, x_dtype
  int64_t stride_x;
  c10::ScalarType x_dtype;
  const float* weight;
  const float* weight1;  // nullptr: none
  const float* mean;
  const float* rstd;
  const uint8_t* mask;  // nullptr: no dropout
  const uint8_t* mask1;
  const float* rowscale;
  float dropout_p;
  void* dx;  // dtype, contiguous
  void* dx1;  // dtype, contiguous; nullptr: no x1
  void* dresidual;  // residual_dtype, contiguous; nullptr: no residual
  c10::ScalarType residual_dtype;
  float* dw_partial;
  float* db_partial;
  float* dw1_partial;
  float* db1_partial;
  int64_t N;
  bool rms;
  c10::ScalarType dtype;  // of dy, dy1, dx, dx1
};

// Dropout's random bits: a counter-based generator (splitmix64's finalizer on seed + e * golden),
// so every element is drawn independently of the thread that computes it, and the 24 high bits
// compared with keep_threshold = ceil(p * 2^24).
constexpr uint64_t kX1Stream = 0x5851F42D4C957F2DULL;
inline uint32_t keep_bits(uint64_t seed, uint64_t e) {
  uint64_t z = seed + (e + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 40);
}

using FwdFn = void (*)(const FwdParams&, int64_t row_begin, int64_t row_end);
using BwdFn = void (*)(const BwdParams&, int64_t row_begin, int64_t row_end);
using FusedFwdFn = void (*)(const FusedFwdParams&, int64_t row_begin, int64_t row_end);
using FusedBwdFn = void (*)(const FusedBwdParams&, int64_t row_begin, int64_t row_end);

// Each instruction-set build defines these in its own namespace.
#define FASTATTN_LN_DECLARE(isa)                                           \
  namespace isa {                                                          \
  void fwd_rows(const FwdParams& p, int64_t row_begin, int64_t row_end);   \
  void bwd_rows(const BwdParams& p, int64_t row_begin, int64_t row_end);   \
  void fused_fwd_rows(const FusedFwdParams& p, int64_t row_begin, int64_t row_end); \
  void fused_bwd_rows(const FusedBwdParams& p, int64_t row_begin, int64_t row_end); \
  }
FASTATTN_LN_DECLARE(generic)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTATTN_LN_HAVE_X86_BUILDS 1
FASTATTN_LN_DECLARE(avx2)
FASTATTN_LN_DECLARE(avx512)
#endif
#undef FASTATTN_LN_DECLARE

}  // namespace fastattn::cpu::layer_norm
