// LayerNorm / RMSNorm on CPU: argument checks, threading and the choice of instruction set for
// fastattn::layer_norm_fwd / layer_norm_bwd (schemas and semantics in csrc/fastattn.cpp). The row
// kernels live in layer_norm_kernel.h; this file also holds their baseline (generic) build.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <cstdint>
#include <string>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../checks.h"
#include "cpu_features.h"
#include "layer_norm_kernel.h"  // the generic build

namespace fastattn::cpu::layer_norm {
namespace {

struct Kernels {
  FwdFn fwd;
  BwdFn bwd;
  FusedFwdFn fused_fwd;
  FusedBwdFn fused_bwd;
  const char* isa;
};

// The best build at or below both FASTATTN_CPU_ISA (cpu_features.h; read per call) and the
// capability ATen itself runs at, which the builds' vectorised helpers share (so
// ATEN_CPU_CAPABILITY=default or avx2 also selects the matching build here).
const Kernels& kernels() {
  static const Kernels generic_k{generic::fwd_rows, generic::bwd_rows, generic::fused_fwd_rows,
                                   generic::fused_bwd_rows, "generic"};
#ifdef FASTATTN_LN_HAVE_X86_BUILDS
  static const Kernels avx512_k{avx512::fwd_rows, avx512::bwd_rows, avx512::fused_fwd_rows,
                                   avx512::fused_bwd_rows, "avx512"};
  static const Kernels avx2_k{avx2::fwd_rows, avx2::bwd_rows, avx2::fused_fwd_rows,
                                   avx2::fused_bwd_rows, "avx2"};
  const Isa isa = vec_isa();
  if (isa >= Isa::avx512) return avx512_k;
  if (isa >= Isa::avx2) return avx2_k;
#endif
  return generic_k;
}

// Rows per parallel_for task: ~32K elements of work per task keeps the scheduling overhead
// small at N = 768 without starving threads at N = 64K.
int64_t grain_rows(int64_t N) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(N, 1));
}

// A fresh multi-MiB output is often new memory (glibc serves large blocks with mmap, and trims
// its heap after large frees), and the first touch of each 4 KiB page is a fault: measured here
// (a VM), 1.5-6 us per page, more than this kernel's own work on the page. F.layer_norm(8192 x
// 768 fp32) took 4.9K faults per call, (4096 x 4096) 16K. Asking for 2 MiB pages on the
// 2 MiB-aligned part of outputs >= 4 MiB cuts that to ~0.5K (the unaligned ends stay 4 KiB):
// up to 2x faster at these sizes. An mmap'd block is unmapped on free, so the advice outlives
// nothing; on a heap block it only means huge pages for that range later.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t bytes = t.nbytes();
  if (bytes < (uintptr_t{4} << 20)) return;  // small outputs are reused heap memory
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "fastattn::layer_norm: ",
              name, " must be float32, bfloat16 or float16, got ", dt);
}

void check_rows(const at::Tensor& t, const char* name, int64_t M, int64_t N,
                c10::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "fastattn::layer_norm (cpu): ", name,
              " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == M && t.size(1) == N, "fastattn::layer_norm: ", name,
              " must have shape (", M, ", ", N, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fastattn::layer_norm: ", name, " must have dtype ",
              dtype, ", got ", t.scalar_type());
  TORCH_CHECK(N <= 1 || t.stride(1) == 1, "fastattn::layer_norm: ", name,
              " must have stride(1) == 1 (rows may be strided), got strides ", t.strides());
}

// weight/bias (+ offset) as N contiguous float32 values: the tensor's own data when it is float32,
// contiguous and has no offset to add (the common case), else a row owned by this object,
// converted from the tensor or filled with the constant when the tensor is absent. No ATen op:
// the at::zeros / Tensor::to these rows cost through the dispatcher took 2-7 us per call, more than
// the kernel itself on a decoding step's 576-wide row.
class AffineRow {
 public:
  AffineRow(const std::optional<at::Tensor>& t, const char* name, int64_t N, float fill,
            double offset = 0.0) {
    const auto off = static_cast<float>(offset);
    if (!t.has_value()) {
      row_.assign(static_cast<size_t>(N), fill + off);
      ptr_ = row_.data();
      return;
    }
    TORCH_CHECK(t->device().is_cpu(), "fastattn::layer_norm (cpu): ", name,
                " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->numel() == N, "fastattn::layer_norm: ", name, " must have ", N,
                " elements, got shape ", t->sizes());
    check_float_dtype(*t, name);
    if (t->scalar_type() == at::kFloat && off == 0.f && t->is_contiguous()) {
      ptr_ = t->const_data_ptr<float>();
      return;
    }
    const at::Tensor c = t->contiguous();
    row_.resize(static_cast<size_t>(N));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "layer_norm", [&] {
      const scalar_t* src = c.const_data_ptr<scalar_t>();
      for (int64_t j = 0; j < N; ++j) row_[j] = static_cast<float>(src[j]) + off;
    });
    ptr_ = row_.data();
  }
  AffineRow(const AffineRow&) = delete;
  AffineRow& operator=(const AffineRow&) = delete;
  const float* data() const { return ptr_; }

 private:
  std::vector<float> row_;
  const float* ptr_ = nullptr;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& input_in, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& residual_in, double eps, bool rms) {
  // the views and allocations below need no autograd tracking (~0.3 us each otherwise)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t N = checks::check_norm(rms, input_in, normalized_shape, weight_in, bias_in,
                                       residual_in, eps);
  check_float_dtype(input_in, "input");
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  const at::Tensor input = checks::as_rows(input_in, nd, N);  // (M, N)
  const int64_t M = input.size(0);
  const auto dtype = input.scalar_type();
  check_rows(input, "input", M, N, dtype);
  std::optional<at::Tensor> residual;
  if (residual_in.has_value()) residual = checks::as_rows(*residual_in, nd, N);
  // weight/bias are normalized_shape-shaped (check_norm): their N elements are the (N,) row
  const AffineRow w(weight_in, "weight", N, 1.f);
  const AffineRow b(bias_in, "bias", N, 0.f);

  // outputs are written in full by the kernel: at::empty, never zeros (one less pass); out has
  // input's shape, contiguous, so its rows are N apart
  at::Tensor out = at::empty(input_in.sizes(), input.options());
  at::Tensor residual_out = residual.has_value() ? at::empty(input_in.sizes(), input.options())
                                                 : at::empty({0}, input.options());
  // the kernels write every row's mean (0 for rms)
  at::Tensor mean = at::empty({M}, input.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, input.options().dtype(at::kFloat));
  if (M == 0) return {out, residual_out, mean, rstd};
  advise_huge_pages(out);
  if (residual.has_value()) advise_huge_pages(residual_out);

  FwdParams p{};
  p.x = input.const_data_ptr();
  p.stride_x = input.stride(0);
  p.residual = residual.has_value() ? residual->const_data_ptr() : nullptr;
  p.stride_residual = residual.has_value() ? residual->stride(0) : 0;
  p.weight = w.data();
  p.bias = b.data();
  p.out = out.mutable_data_ptr();
  p.residual_out = residual.has_value() ? residual_out.mutable_data_ptr() : nullptr;
  p.mean = mean.mutable_data_ptr<float>();
  p.rstd = rstd.mutable_data_ptr<float>();
  p.M = M;
  p.N = N;
  p.eps = static_cast<float>(eps);
  p.rms = rms;
  p.dtype = dtype;
  const FwdFn fwd = kernels().fwd;
  at::parallel_for(0, M, grain_rows(N), [&](int64_t begin, int64_t end) { fwd(p, begin, end); });
  return {out, residual_out, mean, rstd};
}

// Rows are split into a number of blocks that depends on (M, N) only, never on the thread
// count; each block sums its rows' dW/dB contributions in row order into its own float32 row,
// and the blocks are then added in block order: the result is bitwise the same for any number
// of threads. At most 64 blocks and at most 4M floats per partial buffer.
int64_t num_blocks(int64_t M, int64_t N) {
  const int64_t by_memory = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(N, 1));
  return std::max<int64_t>(1, std::min({M, int64_t{64}, by_memory}));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
    bool rms) {
  TORCH_CHECK(x.dim() == 2, "fastattn::layer_norm_bwd: x must be 2-D (M, N), got shape ",
              x.sizes());
  check_float_dtype(x, "x");
  const int64_t M = x.size(0), N = x.size(1);
  const auto dtype = x.scalar_type();
  check_rows(x, "x", M, N, dtype);
  check_rows(grad_out, "grad_out", M, N, dtype);
  const bool has_dres = grad_residual_out.has_value() && grad_residual_out->numel() > 0;
  if (has_dres) check_rows(*grad_residual_out, "grad_residual_out", M, N, dtype);
  auto check_stat = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 &&
                    t.size(0) == M,
                "fastattn::layer_norm_bwd: ", name, " must be a float32 CPU tensor of shape (",
                M, ",), got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  };
  check_stat(mean, "mean");
  check_stat(rstd, "rstd");
  const AffineRow w(weight, "weight", N, 1.f);
  if (bias.has_value()) (void)AffineRow(bias, "bias", N, 0.f);  // shape/dtype checks
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();

  at::Tensor dx = at::empty({M, N}, x.options());
  advise_huge_pages(dx);
  const bool partials = (weight.has_value() || bias.has_value()) && M > 0;
  const int64_t nb = num_blocks(M, N);
  at::Tensor dw_part, db_part;
  if (partials) {
    dw_part = at::zeros({nb, N}, x.options().dtype(at::kFloat));
    db_part = at::zeros({nb, N}, x.options().dtype(at::kFloat));
  }
  if (M > 0) {
    BwdParams p{};
    p.dy = grad_out.const_data_ptr();
    p.stride_dy = grad_out.stride(0);
    p.dres = has_dres ? grad_residual_out->const_data_ptr() : nullptr;
    p.stride_dres = has_dres ? grad_residual_out->stride(0) : 0;
    p.x = x.const_data_ptr();
    p.stride_x = x.stride(0);
    p.weight = w.data();
    p.mean = mean_c.const_data_ptr<float>();
    p.rstd = rstd_c.const_data_ptr<float>();
    p.dx = dx.mutable_data_ptr();
    p.N = N;
    p.rms = rms;
    p.dtype = dtype;
    const BwdFn bwd = kernels().bwd;
    const int64_t rows_per_block = (M + nb - 1) / nb;
    float* dwp = partials ? dw_part.mutable_data_ptr<float>() : nullptr;
    float* dbp = partials ? db_part.mutable_data_ptr<float>() : nullptr;
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      BwdParams q = p;
      for (int64_t blk = b0; blk < b1; ++blk) {
        q.dw_partial = partials ? dwp + blk * N : nullptr;
        q.db_partial = partials ? dbp + blk * N : nullptr;
        bwd(q, std::min(M, blk * rows_per_block), std::min(M, (blk + 1) * rows_per_block));
      }
    });
  }

  // fixed-order reduction of the block partials, parallel over columns
  auto reduce = [&](const at::Tensor& part, const std::optional<at::Tensor>& like) {
    at::Tensor sum = at::empty({N}, x.options().dtype(at::kFloat));
    float* s = sum.mutable_data_ptr<float>();
    if (M == 0) {
      std::fill(s, s + N, 0.f);
    } else {
      const float* src = part.const_data_ptr<float>();
      at::parallel_for(0, N, 4096, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) s[c] = src[c];
        for (int64_t blk = 1; blk < nb; ++blk) {
          const float* row = src + blk * N;
          for (int64_t c = c0; c < c1; ++c) s[c] += row[c];
        }
      });
    }
    return sum.to(like->scalar_type());
  };
  at::Tensor dw = weight.has_value() ? reduce(dw_part, weight) : at::empty({0}, x.options());
  at::Tensor db = bias.has_value() ? reduce(db_part, bias) : at::empty({0}, x.options());
  return {dx, dw, db};
}

std::optional<at::Tensor> opt_rows(const std::optional<at::Tensor>& t, int64_t nd, int64_t N) {
  if (!t.has_value()) return std::nullopt;
  return checks::as_rows(*t, nd, N);
}

using FusedOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor, at::Tensor>;

FusedOut layer_norm_fused_fwd_cpu(
    const at::Tensor& input_in, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& residual_in, const std::optional<at::Tensor>& x1_in,
    const std::optional<at::Tensor>& weight1_in, const std::optional<at::Tensor>& bias1_in,
    const std::optional<at::Tensor>& rowscale_in, double eps, bool rms, double offset,
    double dropout_p, int64_t seed, bool residual_in_fp32, bool quantize) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t N = checks::check_norm_fused(rms, input_in, normalized_shape, weight_in, bias_in,
                                             residual_in, x1_in, weight1_in, bias1_in,
                                             rowscale_in, eps, offset, dropout_p,
                                             residual_in_fp32, quantize);
  check_float_dtype(input_in, "input");
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  const at::Tensor input = checks::as_rows(input_in, nd, N);  // (M, N)
  const int64_t M = input.size(0);
  const auto dtype = input.scalar_type();
  check_rows(input, "input", M, N, dtype);
  const std::optional<at::Tensor> residual = opt_rows(residual_in, nd, N);
  if (residual.has_value()) check_float_dtype(*residual, "residual");
  const std::optional<at::Tensor> x1 = opt_rows(x1_in, nd, N);
  if (x1.has_value()) check_rows(*x1, "x1", M, N, dtype);
  const auto res_dtype = residual_in_fp32       ? at::kFloat
                         : residual.has_value() ? residual->scalar_type()
                                                : dtype;
  const AffineRow w(weight_in, "weight", N, 1.f, offset);
  const AffineRow b(bias_in, "bias", N, 0.f);
  std::optional<AffineRow> w1, b1;
  if (weight1_in.has_value()) {
    w1.emplace(weight1_in, "weight1", N, 1.f, offset);
    b1.emplace(bias1_in, "bias1", N, 0.f);
  }
  at::Tensor rs;
  if (rowscale_in.has_value()) {
    rs = rowscale_in->reshape({M}).to(at::kFloat).contiguous();
    TORCH_CHECK(rs.device().is_cpu(), "fastattn::layer_norm (cpu): rowscale must be a CPU tensor");
  }

  const auto opts = input.options();
  // a fresh empty tensor per absent output: outputs may not alias
  const auto none = [&] { return at::empty({0}, opts); };
  at::Tensor out = at::empty(input_in.sizes(), quantize ? opts.dtype(at::kChar) : opts);
  at::Tensor out1 = weight1_in.has_value() ? at::empty(input_in.sizes(), opts) : none();
  const bool dropout = dropout_p > 0.0;
  // x' is the input itself when nothing is added, scaled or dropped and its dtype is kept: no
  // copy then (residual_out is empty and the input is what was normalised)
  const bool combined = residual.has_value() || x1.has_value() || rowscale_in.has_value() ||
                        dropout || res_dtype != dtype;
  at::Tensor residual_out =
      combined ? at::empty(input_in.sizes(), opts.dtype(res_dtype)) : none();
  at::Tensor mask = dropout ? at::empty(input_in.sizes(), opts.dtype(at::kBool)) : none();
  at::Tensor mask1 =
      dropout && x1.has_value() ? at::empty(input_in.sizes(), opts.dtype(at::kBool)) : none();
  at::Tensor mean = at::empty({M}, opts.dtype(at::kFloat));  // written by the kernel (0 for rms)
  at::Tensor rstd = at::empty({M}, opts.dtype(at::kFloat));
  at::Tensor scale = quantize ? at::empty(input_in.sizes().slice(0, input_in.dim() - nd),
                                          opts.dtype(at::kFloat))
                              : at::empty({0}, opts.dtype(at::kFloat));
  if (M == 0 || N == 0) {
    if (N == 0 && M > 0) {  // empty rows: statistics of nothing, as the reference gives
      mean.fill_(rms ? 0.f : std::numeric_limits<float>::quiet_NaN());
      rstd.fill_(1.f / std::sqrt(static_cast<float>(eps)));
      if (quantize) scale.zero_();
    }
    return {out, out1, residual_out, mask, mask1, mean, rstd, scale};
  }
  advise_huge_pages(out);
  if (combined) advise_huge_pages(residual_out);

  FusedFwdParams p{};
  p.x = input.const_data_ptr();
  p.stride_x = input.stride(0);
  p.x1 = x1.has_value() ? x1->const_data_ptr() : nullptr;
  p.stride_x1 = x1.has_value() ? x1->stride(0) : 0;
  p.residual = residual.has_value() ? residual->const_data_ptr() : nullptr;
  p.stride_residual = residual.has_value() ? residual->stride(0) : 0;
  p.residual_dtype = residual.has_value() ? residual->scalar_type() : dtype;
  p.rowscale = rs.defined() ? rs.const_data_ptr<float>() : nullptr;
  p.weight = w.data();
  p.bias = b.data();
  p.weight1 = w1.has_value() ? w1->data() : nullptr;
  p.bias1 = b1.has_value() ? b1->data() : nullptr;
  p.out = quantize ? nullptr : out.mutable_data_ptr();
  p.out1 = w1.has_value() ? out1.mutable_data_ptr() : nullptr;
  p.residual_out = combined ? residual_out.mutable_data_ptr() : nullptr;
  p.residual_out_dtype = res_dtype;
  p.mask = dropout ? static_cast<uint8_t*>(mask.mutable_data_ptr()) : nullptr;
  p.mask1 = mask1.numel() > 0 ? static_cast<uint8_t*>(mask1.mutable_data_ptr()) : nullptr;
  p.q = quantize ? out.mutable_data_ptr<int8_t>() : nullptr;
  p.q_scale = quantize ? scale.mutable_data_ptr<float>() : nullptr;
  p.mean = mean.mutable_data_ptr<float>();
  p.rstd = rstd.mutable_data_ptr<float>();
  p.M = M;
  p.N = N;
  p.eps = static_cast<float>(eps);
  p.rms = rms;
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.dtype = dtype;
  const FusedFwdFn fwd = kernels().fused_fwd;
  at::parallel_for(0, M, grain_rows(N), [&](int64_t begin, int64_t end) { fwd(p, begin, end); });
  return {out, out1, residual_out, mask, mask1, mean, rstd, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_norm_fused_bwd_cpu(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_out1,
                         const std::optional<at::Tensor>& grad_residual_out, const at::Tensor& x,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& weight1,
                         const std::optional<at::Tensor>& mask,
                         const std::optional<at::Tensor>& mask1,
                         const std::optional<at::Tensor>& rowscale, const at::Tensor& mean,
                         const at::Tensor& rstd, double offset, double dropout_p, bool rms,
                         bool has_bias, bool has_bias1, bool has_x1, at::ScalarType input_dtype,
                         std::optional<at::ScalarType> residual_dtype) {
  TORCH_CHECK(x.dim() == 2, "fastattn::layer_norm_fused_bwd: x must be 2-D (M, N), got shape ",
              x.sizes());
  check_float_dtype(x, "x");
  const int64_t M = x.size(0), N = x.size(1);
  check_rows(x, "x", M, N, x.scalar_type());
  check_rows(grad_out, "grad_out", M, N, input_dtype);
  const bool has_dy1 = grad_out1.has_value() && grad_out1->numel() > 0;
  if (has_dy1) check_rows(*grad_out1, "grad_out1", M, N, input_dtype);
  const bool has_dres = grad_residual_out.has_value() && grad_residual_out->numel() > 0;
  if (has_dres) check_rows(*grad_residual_out, "grad_residual_out", M, N, x.scalar_type());
  const bool dropout = dropout_p > 0.0 && mask.has_value() && mask->numel() > 0;
  if (dropout) check_rows(*mask, "dropout_mask", M, N, at::kBool);
  const bool dropout1 = dropout_p > 0.0 && mask1.has_value() && mask1->numel() > 0;
  if (dropout1) check_rows(*mask1, "dropout_mask1", M, N, at::kBool);
  TORCH_CHECK(mean.scalar_type() == at::kFloat && mean.numel() == M &&
                  rstd.scalar_type() == at::kFloat && rstd.numel() == M,
              "fastattn::layer_norm_fused_bwd: mean and rstd must be float32 (", M, ",)");
  const AffineRow w(weight, "weight", N, 1.f, offset);
  std::optional<AffineRow> w1;
  if (weight1.has_value()) w1.emplace(weight1, "weight1", N, 1.f, offset);
  TORCH_CHECK(!has_dy1 || w1.has_value(), "fastattn::layer_norm_fused_bwd: grad_out1 needs weight1");
  at::Tensor rs;
  if (rowscale.has_value()) rs = rowscale->reshape({M}).to(at::kFloat).contiguous();
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const auto opts = x.options();
  const auto none = [&] { return at::empty({0}, opts.dtype(input_dtype)); };
  at::Tensor dx = at::empty({M, N}, opts.dtype(input_dtype));
  at::Tensor dres = residual_dtype.has_value() ? at::empty({M, N}, opts.dtype(*residual_dtype))
                                               : none();
  at::Tensor dx1 = has_x1 ? at::empty({M, N}, opts.dtype(input_dtype)) : none();
  if (residual_dtype.has_value()) check_float_dtype(dres, "residual");
  advise_huge_pages(dx);

  const bool want_w = weight.has_value(), want_w1 = weight1.has_value();
  const int64_t nb = num_blocks(M, N);
  // partials: [dw, db, dw1, db1], each (nb, N) float32, zero-initialised
  std::array<at::Tensor, 4> part;
  // the gradients asked for, and the partial sums computed (none for out1 without its gradient)
  const std::array<bool, 4> out_wanted{want_w, has_bias, want_w1, has_bias1};
  const std::array<bool, 4> wanted{want_w, has_bias, want_w1 && has_dy1, has_bias1 && has_dy1};
  for (int k = 0; k < 4; ++k)
    if (wanted[k] && M > 0) part[k] = at::zeros({nb, N}, opts.dtype(at::kFloat));
  if (M > 0 && N > 0) {
    FusedBwdParams p{};
    p.dy = grad_out.const_data_ptr();
    p.stride_dy = grad_out.stride(0);
    p.dy1 = has_dy1 ? grad_out1->const_data_ptr() : nullptr;
    p.stride_dy1 = has_dy1 ? grad_out1->stride(0) : 0;
    p.dres = has_dres ? grad_residual_out->const_data_ptr() : nullptr;
    p.stride_dres = has_dres ? grad_residual_out->stride(0) : 0;
    p.x = x.const_data_ptr();
    p.stride_x = x.stride(0);
    p.x_dtype = x.scalar_type();
    p.weight = w.data();
    p.weight1 = w1.has_value() ? w1->data() : nullptr;
    p.mean = mean_c.const_data_ptr<float>();
    p.rstd = rstd_c.const_data_ptr<float>();
    p.mask = dropout ? static_cast<const uint8_t*>(mask->const_data_ptr()) : nullptr;
    p.mask1 = dropout1 ? static_cast<const uint8_t*>(mask1->const_data_ptr()) : nullptr;
    p.rowscale = rs.defined() ? rs.const_data_ptr<float>() : nullptr;
    p.dropout_p = static_cast<float>(dropout_p);
    p.dx = dx.mutable_data_ptr();
    p.dx1 = has_x1 ? dx1.mutable_data_ptr() : nullptr;
    p.dresidual = residual_dtype.has_value() ? dres.mutable_data_ptr() : nullptr;
    p.residual_dtype = residual_dtype.value_or(input_dtype);
    p.N = N;
    p.rms = rms;
    p.dtype = input_dtype;
    const FusedBwdFn bwd = kernels().fused_bwd;
    const int64_t rows_per_block = (M + nb - 1) / nb;
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      FusedBwdParams q = p;
      for (int64_t blk = b0; blk < b1; ++blk) {
        float* ptrs[4];
        for (int k = 0; k < 4; ++k)
          ptrs[k] = part[k].defined() ? part[k].mutable_data_ptr<float>() + blk * N : nullptr;
        q.dw_partial = ptrs[0];
        q.db_partial = ptrs[1];
        q.dw1_partial = ptrs[2];
        q.db1_partial = ptrs[3];
        bwd(q, std::min(M, blk * rows_per_block), std::min(M, (blk + 1) * rows_per_block));
      }
    });
  }
  // fixed-order reduction of the block partials, parallel over columns
  auto reduce = [&](int k) {
    if (!out_wanted[k]) return at::empty({0}, opts.dtype(at::kFloat));
    at::Tensor sum = at::zeros({N}, opts.dtype(at::kFloat));
    if (!part[k].defined() || N == 0) return sum;
    float* s = sum.mutable_data_ptr<float>();
    const float* src = part[k].const_data_ptr<float>();
    at::parallel_for(0, N, 4096, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) s[c] = src[c];
      for (int64_t blk = 1; blk < nb; ++blk) {
        const float* row = src + blk * N;
        for (int64_t c = c0; c < c1; ++c) s[c] += row[c];
      }
    });
    return sum;
  };
  return {dx, dres, dx1, reduce(0), reduce(1), reduce(2), reduce(3)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
  m.impl("layer_norm_fused_fwd", &layer_norm_fused_fwd_cpu);
  m.impl("layer_norm_fused_bwd", &layer_norm_fused_bwd_cpu);
}

}  // namespace fastattn::cpu::layer_norm
