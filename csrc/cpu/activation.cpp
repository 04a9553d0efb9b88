// SiLU-and-mul on CPU: argument checks, threading and the choice of instruction set for
// fastattn::silu_mul_fwd / silu_mul_bwd (schemas and semantics in csrc/fastattn.cpp). The kernels
// live in activation_kernel.h; this file also holds their baseline (generic) build.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "activation_kernel.h"  // the generic build
#include "cpu_features.h"

namespace fastattn::cpu::activation {
namespace {

struct Kernels {
  Fn fwd;
  Fn bwd;
};

// The best build at or below both FASTATTN_CPU_ISA (cpu_features.h; read per call) and the
// capability ATen runs at, as for LayerNorm (layer_norm.cpp): the builds share ATen's vectorised
// helpers, and ATEN_CPU_CAPABILITY=default / avx2 then selects the matching build here too.
const Kernels& kernels() {
  static const Kernels generic_k{generic::silu_mul_fwd_pieces, generic::silu_mul_bwd_pieces};
#ifdef FASTATTN_ACT_HAVE_X86_BUILDS
  static const Kernels avx512_k{avx512::silu_mul_fwd_pieces, avx512::silu_mul_bwd_pieces};
  static const Kernels avx2_k{avx2::silu_mul_fwd_pieces, avx2::silu_mul_bwd_pieces};
  const Isa isa = vec_isa();
  if (isa >= Isa::avx512) return avx512_k;
  if (isa >= Isa::avx2) return avx2_k;
#endif
  return generic_k;
}

// Work is cut into pieces of at most kChunk columns of one row, and a thread takes at least
// kGrain elements: below that (a decoding step's single row, M = 1 and I <= 16K) the call runs
// on the calling thread with no parallel region at all. Measured on one core of the 2-core
// AVX-512 machine: the forward costs 0.43-0.52 ns an element (fp32, fp16, bf16), the backward
// 0.6-0.75 ns, so kGrain is 7-12 us of work, a few times what waking a second OpenMP thread
// costs.
constexpr int64_t kChunk = 4096;
constexpr int64_t kGrain = 16384;

void run(Fn fn, Params& p, int64_t M) {
  p.chunk = std::min(p.I, kChunk);
  p.chunks_per_row = (p.I + p.chunk - 1) / p.chunk;
  const int64_t pieces = M * p.chunks_per_row;
  if (M * p.I <= kGrain) {
    fn(p, 0, pieces);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrain / p.chunk);
  at::parallel_for(0, pieces, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
}

void check_kernel_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastattn::silu_mul (cpu): ", name,
              " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(checks::kernel_dtype(t.scalar_type()), "fastattn::silu_mul (cpu): ", name,
              " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

at::Tensor silu_mul_fwd_cpu(const at::Tensor& x_in) {
  // the views and allocations below need no autograd tracking
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  checks::check_silu_mul(x_in);
  check_kernel_tensor(x_in, "x");
  const int64_t I = x_in.size(-1) / 2;
  const at::Tensor x = checks::as_rows(x_in, 1, 2 * I);  // (M, 2I), unit column stride
  const int64_t M = x.size(0);
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = I;
  at::Tensor out = at::empty(shape, x.options());  // written in full by the kernel
  if (M == 0) return out;
  Params p{};
  p.x = x.const_data_ptr();
  p.stride_x = x.stride(0);
  p.out = out.mutable_data_ptr();
  p.I = I;
  p.dtype = x.scalar_type();
  run(kernels().fwd, p, M);
  return out;
}

at::Tensor silu_mul_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& x_in) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  checks::check_silu_mul(x_in, grad_in);
  check_kernel_tensor(x_in, "x");
  check_kernel_tensor(grad_in, "grad");
  const int64_t I = x_in.size(-1) / 2;
  const at::Tensor x = checks::as_rows(x_in, 1, 2 * I);  // (M, 2I)
  const at::Tensor dy = checks::as_rows(grad_in, 1, I);  // (M, I)
  const int64_t M = x.size(0);
  at::Tensor dx = at::empty(x_in.sizes(), x.options());  // contiguous (..., 2I)
  if (M == 0) return dx;
  Params p{};
  p.x = x.const_data_ptr();
  p.stride_x = x.stride(0);
  p.dy = dy.const_data_ptr();
  p.stride_dy = dy.stride(0);
  p.out = dx.mutable_data_ptr();
  p.I = I;
  p.dtype = x.scalar_type();
  run(kernels().bwd, p, M);
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("silu_mul_fwd", &silu_mul_fwd_cpu);
  m.impl("silu_mul_bwd", &silu_mul_bwd_cpu);
}

}  // namespace fastattn::cpu::activation
