// LayerNorm / RMSNorm row kernels, written once with at::vec::Vectorized and compiled once per
// instruction set: layer_norm.cpp includes this file as is (the baseline "generic" build),
// layer_norm_avx2.cpp / layer_norm_avx512.cpp define FASTATTN_LN_BUILD_AVX2 / _AVX512 first.
// Everything that is not ISA-specific is included *before* the target pragma, so only the
// Vectorized code and the kernels below are compiled for the wider instruction set: inline
// functions shared with other translation units (c10, std, at::parallel_for) keep their baseline
// code, which is what keeps the extension loadable on a CPU without AVX2/AVX-512. No static
// initializers below this point (they would run at load time on any CPU).
//
// All statistics are float32. bf16/fp16 rows are widened to float32 vectors on load and rounded
// back (round-to-nearest-even) on store.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
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

#include "layer_norm.h"

#if defined(FASTATTN_LN_BUILD_AVX512) || defined(FASTATTN_LN_BUILD_AVX2)
#ifndef FASTATTN_LN_HAVE_X86_BUILDS
#error "the AVX2/AVX-512 builds need GCC on x86-64"
#endif
#pragma GCC push_options
#if defined(FASTATTN_LN_BUILD_AVX512)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define FASTATTN_LN_ISA avx512
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#else
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define FASTATTN_LN_ISA avx2
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
#define FASTATTN_LN_ISA generic
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace fastattn::cpu::layer_norm::FASTATTN_LN_ISA {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kF = fVec::size();

#include "vec_step.h"  // Step<T>, in this build's namespace

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

inline float hsum(const fVec& v) {
  alignas(64) float buf[kF];
  v.store(buf);
  float s = 0.f;
  for (int64_t i = 0; i < kF; ++i) s += buf[i];
  return s;
}

// Sum over a row of per-step float vectors, with two independent accumulator chains per vector
// lane group so the FMA latency is hidden (a single chain is latency-bound at N = 768).
template <typename T, typename VecBody, typename ScalarBody>
inline float row_sum(int64_t N, VecBody&& vec_body, ScalarBody&& scalar_body) {
  using S = Step<T>;
  typename S::F acc0, acc1;
  acc0.fill(fVec(0.f));
  acc1.fill(fVec(0.f));
  int64_t j = 0;
  for (; j + 2 * S::kLen <= N; j += 2 * S::kLen) {
    vec_body(j, acc0);
    vec_body(j + S::kLen, acc1);
  }
  if (j + S::kLen <= N) {
    vec_body(j, acc0);
    j += S::kLen;
  }
  fVec acc = acc0[0] + acc1[0];
  for (int k = 1; k < S::kVecs; ++k) acc = acc + acc0[k] + acc1[k];
  float tail = 0.f;
  for (; j < N; ++j) tail += scalar_body(j);
  return hsum(acc) + tail;
}

template <typename T>
void fwd_rows_impl(const FwdParams& p, int64_t row_begin, int64_t row_end) {
  using S = Step<T>;
  const int64_t N = p.N;
  const float inv_n = 1.f / static_cast<float>(N);
  const float* w = p.weight;
  const float* b = p.bias;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* x = static_cast<const T*>(p.x) + i * p.stride_x;
    T* out = static_cast<T*>(p.out) + i * N;
    float mean = 0.f;
    float ss = 0.f;  // sum of squares: of x for rms, of x - mean for layer norm
    const T* src = x;
    if (p.residual != nullptr) {
      // x + residual is rounded to T once: that rounded sum is residual_out and is what gets
      // normalised, exactly as the unfused `F.layer_norm(x + r)` does.
      const T* r = static_cast<const T*>(p.residual) + i * p.stride_residual;
      T* ro = static_cast<T*>(p.residual_out) + i * N;
      const float s = row_sum<T>(
          N,
          [&](int64_t j, typename S::F& acc) {
            auto a = S::load(x + j);
            const auto c = S::load(r + j);
            for (int k = 0; k < S::kVecs; ++k) a[k] = a[k] + c[k];
            S::store(ro + j, a);
            a = S::round(a);
            for (int k = 0; k < S::kVecs; ++k)
              acc[k] = p.rms ? at::vec::fmadd(a[k], a[k], acc[k]) : acc[k] + a[k];
          },
          [&](int64_t j) {
            ro[j] = static_cast<T>(to_f(x[j]) + to_f(r[j]));
            const float v = to_f(ro[j]);
            return p.rms ? v * v : v;
          });
      if (p.rms) {
        ss = s;
      } else {
        mean = s * inv_n;
      }
      src = ro;
    } else if (p.rms) {
      ss = row_sum<T>(
          N,
          [&](int64_t j, typename S::F& acc) {
            const auto a = S::load(x + j);
            for (int k = 0; k < S::kVecs; ++k) acc[k] = at::vec::fmadd(a[k], a[k], acc[k]);
          },
          [&](int64_t j) { return to_f(x[j]) * to_f(x[j]); });
    } else {
      const float s = row_sum<T>(
          N,
          [&](int64_t j, typename S::F& acc) {
            const auto a = S::load(x + j);
            for (int k = 0; k < S::kVecs; ++k) acc[k] = acc[k] + a[k];
          },
          [&](int64_t j) { return to_f(x[j]); });
      mean = s * inv_n;
    }
    if (!p.rms) {
      // second pass over the (now cached) row: the variance about the mean, not E[x^2] - mean^2,
      // which loses all precision when |mean| >> std
      const fVec vm(mean);
      ss = row_sum<T>(
          N,
          [&](int64_t j, typename S::F& acc) {
            const auto a = S::load(src + j);
            for (int k = 0; k < S::kVecs; ++k) {
              const fVec d = a[k] - vm;
              acc[k] = at::vec::fmadd(d, d, acc[k]);
            }
          },
          [&](int64_t j) {
            const float d = to_f(src[j]) - mean;
            return d * d;
          });
    }
    const float rstd = 1.f / std::sqrt(ss * inv_n + p.eps);
    p.mean[i] = mean;
    p.rstd[i] = rstd;
    const fVec vm(mean), vr(rstd);
    int64_t j = 0;
    for (; j + S::kLen <= N; j += S::kLen) {
      auto a = S::load(src + j);
      for (int k = 0; k < S::kVecs; ++k) {
        const int64_t c = j + k * kF;
        a[k] = at::vec::fmadd((a[k] - vm) * vr, fVec::loadu(w + c), fVec::loadu(b + c));
      }
      S::store(out + j, a);
    }
    for (; j < N; ++j) out[j] = static_cast<T>((to_f(src[j]) - mean) * rstd * w[j] + b[j]);
  }
}

template <typename T, bool kPartials>
void bwd_rows_impl(const BwdParams& p, int64_t row_begin, int64_t row_end) {
  using S = Step<T>;
  const int64_t N = p.N;
  const float inv_n = 1.f / static_cast<float>(N);
  const float* w = p.weight;
  float* dwp = p.dw_partial;
  float* dbp = p.db_partial;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* dy = static_cast<const T*>(p.dy) + i * p.stride_dy;
    const T* x = static_cast<const T*>(p.x) + i * p.stride_x;
    T* dx = static_cast<T*>(p.dx) + i * N;
    const float mean = p.rms ? 0.f : p.mean[i];
    const float rstd = p.rstd[i];
    const fVec vm(mean), vr(rstd);
    // pass 1: c1 = sum(g), c2 = sum(g * xhat) with g = dy * w; the weight/bias gradients of this
    // row are added to the block's partial sums on the way
    fVec s1a(0.f), s1b(0.f), s2a(0.f), s2b(0.f);
    int64_t j = 0;
    for (; j + S::kLen <= N; j += S::kLen) {
      const auto vx = S::load(x + j);
      const auto vdy = S::load(dy + j);
      for (int k = 0; k < S::kVecs; ++k) {
        const int64_t c = j + k * kF;
        const fVec xhat = (vx[k] - vm) * vr;
        const fVec g = vdy[k] * fVec::loadu(w + c);
        // alternate chains by lane group so consecutive FMAs are independent
        if (k % 2 == 0) {
          s1a = s1a + g;
          s2a = at::vec::fmadd(g, xhat, s2a);
        } else {
          s1b = s1b + g;
          s2b = at::vec::fmadd(g, xhat, s2b);
        }
        if constexpr (kPartials) {
          at::vec::fmadd(vdy[k], xhat, fVec::loadu(dwp + c)).store(dwp + c);
          (fVec::loadu(dbp + c) + vdy[k]).store(dbp + c);
        }
      }
    }
    float s1 = hsum(s1a + s1b), s2 = hsum(s2a + s2b);
    for (int64_t jj = j; jj < N; ++jj) {
      const float xhat = (to_f(x[jj]) - mean) * rstd;
      const float d = to_f(dy[jj]);
      const float g = d * w[jj];
      s1 += g;
      s2 += g * xhat;
      if constexpr (kPartials) {
        dwp[jj] += d * xhat;
        dbp[jj] += d;
      }
    }
    const float c1 = p.rms ? 0.f : s1 * inv_n;
    const float c2 = s2 * inv_n;
    const fVec vc1(c1), vc2(c2);
    // pass 2: dx = rstd * (g - c1 - xhat * c2) (+ grad of residual_out)
    const T* dres = p.dres ? static_cast<const T*>(p.dres) + i * p.stride_dres : nullptr;
    for (j = 0; j + S::kLen <= N; j += S::kLen) {
      const auto vx = S::load(x + j);
      const auto vdy = S::load(dy + j);
      typename S::F out;
      for (int k = 0; k < S::kVecs; ++k) {
        const int64_t c = j + k * kF;
        const fVec xhat = (vx[k] - vm) * vr;
        const fVec g = vdy[k] * fVec::loadu(w + c);
        out[k] = (g - at::vec::fmadd(xhat, vc2, vc1)) * vr;
      }
      if (dres != nullptr) {
        const auto vd = S::load(dres + j);
        for (int k = 0; k < S::kVecs; ++k) out[k] = out[k] + vd[k];
      }
      S::store(dx + j, out);
    }
    for (; j < N; ++j) {
      const float xhat = (to_f(x[j]) - mean) * rstd;
      const float g = to_f(dy[j]) * w[j];
      float v = (g - (xhat * c2 + c1)) * rstd;
      if (dres != nullptr) v += to_f(dres[j]);
      dx[j] = static_cast<T>(v);
    }
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

void fwd_rows(const FwdParams& p, int64_t row_begin, int64_t row_end) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    fwd_rows_impl<T>(p, row_begin, row_end);
  });
}

void bwd_rows(const BwdParams& p, int64_t row_begin, int64_t row_end) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.dw_partial != nullptr) {
      bwd_rows_impl<T, true>(p, row_begin, row_end);
    } else {
      bwd_rows_impl<T, false>(p, row_begin, row_end);
    }
  });
}

}  // namespace fastattn::cpu::layer_norm::FASTATTN_LN_ISA

#if defined(FASTATTN_LN_BUILD_AVX512) || defined(FASTATTN_LN_BUILD_AVX2)
#pragma GCC pop_options
#endif
