// SiLU-and-mul kernels, written once with at::vec::Vectorized and compiled once per instruction
// set, as the LayerNorm kernels are (layer_norm_kernel.h explains the scheme): activation.cpp
// includes this file as is (the baseline "generic" build), activation_avx2.cpp /
// activation_avx512.cpp define FASTATTN_ACT_BUILD_AVX2 / _AVX512 first. Everything that is not
// ISA-specific is included before the target pragma; no static initializers below it.
//
// The arithmetic is float32 whatever the storage dtype: bf16/fp16 values are widened on load and
// rounded once (round-to-nearest-even) on store. silu(g) = g / (1 + exp(-g)), the formula of
// PyTorch's silu, with an accurate exp: Vectorized<float>::exp() is SLEEF's expf_u10 (at most
// 1 ulp, the exp of ATen's own vectorised CPU ops) in the AVX2/AVX-512 builds and std::exp in
// the generic one. In float32 the forward agrees with F.silu(gate) * up to the last bit on all
// but ~1 element in 5000 (1 ulp there). exp(-g) overflows to inf for g < -88.7, where silu(g) is
// then -0 (the true value is below 1e-36), as in PyTorch.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

#include "activation.h"

#if defined(FASTATTN_ACT_BUILD_AVX512) || defined(FASTATTN_ACT_BUILD_AVX2)
#ifndef FASTATTN_ACT_HAVE_X86_BUILDS
#error "the AVX2/AVX-512 builds need GCC on x86-64"
#endif
#pragma GCC push_options
#if defined(FASTATTN_ACT_BUILD_AVX512)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define FASTATTN_ACT_ISA avx512
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#else
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define FASTATTN_ACT_ISA avx2
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
// g++ preprocesses the whole file before it applies a target pragma, so the ISA macros that
// headers test (sleef.h declares its __m256/__m512 functions under them) are set by hand
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#else
#define FASTATTN_ACT_ISA generic
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace fastattn::cpu::activation::FASTATTN_ACT_ISA {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kF = fVec::size();

#include "vec_step.h"  // Step<T>, in this build's namespace

// out[j] = silu(g[j]) * u[j] for j < n
template <typename T>
inline void fwd_span(const T* g, const T* u, T* out, int64_t n) {
  using S = Step<T>;
  const fVec one(1.f);
  for (int64_t j = 0; j < n; j += S::kLen) {
    const int64_t len = std::min<int64_t>(S::kLen, n - j);
    auto vg = S::load(g + j, len);
    const auto vu = S::load(u + j, len);
    for (int k = 0; k < S::kVecs; ++k) vg[k] = vg[k] / (one + vg[k].neg().exp()) * vu[k];
    S::store(out + j, vg, len);
  }
}

// dg[j] = dy * u * sig * (1 + g * (1 - sig)), du[j] = dy * g * sig with sig = 1 / (1 + exp(-g)),
// the formulas of PyTorch's silu_backward
template <typename T>
inline void bwd_span(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t n) {
  using S = Step<T>;
  const fVec one(1.f);
  for (int64_t j = 0; j < n; j += S::kLen) {
    const int64_t len = std::min<int64_t>(S::kLen, n - j);
    const auto vdy = S::load(dy + j, len);
    auto vg = S::load(g + j, len);
    auto vu = S::load(u + j, len);
    for (int k = 0; k < S::kVecs; ++k) {
      const fVec sig = one / (one + vg[k].neg().exp());
      const fVec s = vg[k] * sig;  // silu(g)
      const fVec d = vdy[k] * vu[k];
      vu[k] = vdy[k] * s;
      vg[k] = d * sig * at::vec::fmadd(vg[k], one - sig, one);
    }
    S::store(dg + j, vg, len);
    S::store(du + j, vu, len);
  }
}

template <typename T>
void fwd_pieces_impl(const Params& p, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t row = t / p.chunks_per_row;
    const int64_t c0 = (t - row * p.chunks_per_row) * p.chunk;
    const int64_t n = std::min(p.chunk, p.I - c0);
    const T* xr = x + row * p.stride_x + c0;
    fwd_span<T>(xr, xr + p.I, out + row * p.I + c0, n);
  }
}

template <typename T>
void bwd_pieces_impl(const Params& p, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.out);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t row = t / p.chunks_per_row;
    const int64_t c0 = (t - row * p.chunks_per_row) * p.chunk;
    const int64_t n = std::min(p.chunk, p.I - c0);
    const T* xr = x + row * p.stride_x + c0;
    T* dxr = dx + row * 2 * p.I + c0;
    bwd_span<T>(dy + row * p.stride_dy + c0, xr, xr + p.I, dxr, dxr + p.I, n);
  }
}

template <typename Fn>
inline void dispatch_dtype(c10::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case c10::ScalarType::Float:
      fn(float{});
      break;
    case c10::ScalarType::BFloat16:
      fn(c10::BFloat16{});
      break;
    case c10::ScalarType::Half:
      fn(c10::Half{});
      break;
    default:
      break;  // rejected by the caller's checks
  }
}

void silu_mul_fwd_pieces(const Params& p, int64_t begin, int64_t end) {
  dispatch_dtype(p.dtype, [&](auto tag) { fwd_pieces_impl<decltype(tag)>(p, begin, end); });
}

void silu_mul_bwd_pieces(const Params& p, int64_t begin, int64_t end) {
  dispatch_dtype(p.dtype, [&](auto tag) { bwd_pieces_impl<decltype(tag)>(p, begin, end); });
}

}  // namespace fastattn::cpu::activation::FASTATTN_ACT_ISA

#if defined(FASTATTN_ACT_BUILD_AVX512) || defined(FASTATTN_ACT_BUILD_AVX2)
#pragma GCC pop_options
#endif
