// LayerNorm / RMSNorm on CPU: argument checks, threading and the choice of instruction set for
// fastattn::layer_norm_fwd / layer_norm_bwd (schemas and semantics in csrc/fastattn.cpp). The row
// kernels live in layer_norm_kernel.h; this file also holds their baseline (generic) build.
#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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
  const char* isa;
};

// The best build at or below both FASTATTN_CPU_ISA (cpu_features.h; read per call) and the
// capability ATen itself runs at, which the builds' vectorised helpers share (so
// ATEN_CPU_CAPABILITY=default or avx2 also selects the matching build here).
const Kernels& kernels() {
  static const Kernels generic_k{generic::fwd_rows, generic::bwd_rows, "generic"};
#ifdef FASTATTN_LN_HAVE_X86_BUILDS
  static const Kernels avx512_k{avx512::fwd_rows, avx512::bwd_rows, "avx512"};
  static const Kernels avx2_k{avx2::fwd_rows, avx2::bwd_rows, "avx2"};
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

// weight/bias as contiguous float32 (N,), or a constant row when the tensor is absent.
at::Tensor affine_f32(const std::optional<at::Tensor>& t, const char* name, int64_t N,
                      float fill) {
  if (!t.has_value()) {
    return fill == 0.f ? at::zeros({N}, at::kFloat) : at::ones({N}, at::kFloat);
  }
  TORCH_CHECK(t->device().is_cpu(), "fastattn::layer_norm (cpu): ", name,
              " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(t->numel() == N, "fastattn::layer_norm: ", name, " must have ", N,
              " elements, got shape ", t->sizes());
  check_float_dtype(*t, name);
  if (t->scalar_type() == at::kFloat && t->is_contiguous()) return *t;  // the common case
  return t->to(at::kFloat).contiguous();
}

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
  const at::Tensor w = affine_f32(weight_in, "weight", N, 1.f);
  const at::Tensor b = affine_f32(bias_in, "bias", N, 0.f);

  // outputs are written in full by the kernel: at::empty, never zeros (one less pass); out has
  // input's shape, contiguous, so its rows are N apart
  at::Tensor out = at::empty(input_in.sizes(), input.options());
  at::Tensor residual_out = residual.has_value() ? at::empty(input_in.sizes(), input.options())
                                                 : at::empty({0}, input.options());
  at::Tensor mean = rms ? at::zeros({M}, input.options().dtype(at::kFloat))
                        : at::empty({M}, input.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, input.options().dtype(at::kFloat));
  if (M == 0) return {out, residual_out, mean, rstd};
  advise_huge_pages(out);
  if (residual.has_value()) advise_huge_pages(residual_out);

  FwdParams p{};
  p.x = input.const_data_ptr();
  p.stride_x = input.stride(0);
  p.residual = residual.has_value() ? residual->const_data_ptr() : nullptr;
  p.stride_residual = residual.has_value() ? residual->stride(0) : 0;
  p.weight = w.const_data_ptr<float>();
  p.bias = b.const_data_ptr<float>();
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
  const at::Tensor w = affine_f32(weight, "weight", N, 1.f);
  if (bias.has_value()) (void)affine_f32(bias, "bias", N, 0.f);  // shape/dtype checks
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
    p.weight = w.const_data_ptr<float>();
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

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace fastattn::cpu::layer_norm
