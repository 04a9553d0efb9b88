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
#include <limits>
#include <memory>
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

// ---- fused forward / backward (FusedFwdParams, FusedBwdParams) -------------------------------
// The row is combined, normalised and differentiated in float32 scratch rows (L1/L2-resident for
// the widths of Transformer models), so one code path covers every mix of input, residual and
// residual_out dtypes: the loads and stores below are the only dtype-specific parts.
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  using S = Step<T>;
  int64_t j = 0;
  for (; j + S::kLen <= n; j += S::kLen) {
    const auto v = S::load(src + j);
    for (int k = 0; k < S::kVecs; ++k) v[k].store(dst + j + k * kF);
  }
  if (j < n) {
    const auto v = S::load(src + j, n - j);
    alignas(64) float tmp[S::kLen];
    for (int k = 0; k < S::kVecs; ++k) v[k].store(tmp + k * kF);
    std::memcpy(dst + j, tmp, sizeof(float) * (n - j));
  }
}

// stores src as T; with kRound also writes the stored (rounded) values back to src
template <typename T, bool kRound>
inline void store_row(float* src, T* dst, int64_t n) {
  using S = Step<T>;
  int64_t j = 0;
  for (; j + S::kLen <= n; j += S::kLen) {
    typename S::F v;
    for (int k = 0; k < S::kVecs; ++k) v[k] = fVec::loadu(src + j + k * kF);
    S::store(dst + j, v);
    if constexpr (kRound && !std::is_same_v<T, float>) {
      v = S::round(v);
      for (int k = 0; k < S::kVecs; ++k) v[k].store(src + j + k * kF);
    }
  }
  for (; j < n; ++j) {
    dst[j] = static_cast<T>(src[j]);
    if constexpr (kRound) src[j] = static_cast<float>(dst[j]);
  }
}

inline void load_any(const void* src, c10::ScalarType dt, float* dst, int64_t n) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    load_row<T>(static_cast<const T*>(src), dst, n);
  });
}

template <bool kRound>
inline void store_any(float* src, c10::ScalarType dt, void* dst, int64_t n) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    store_row<T, kRound>(src, static_cast<T*>(dst), n);
  });
}

// mask[j] = keep bit of element base + j
inline void draw_keep(uint8_t* mask, uint64_t seed, uint64_t base, uint32_t threshold, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    mask[j] = keep_bits(seed, base + static_cast<uint64_t>(j)) >= threshold ? 1 : 0;
}

// buf[j] *= mask[j] * scale (a plain loop: the compiler vectorises it for this build's ISA)
inline void apply_keep(float* buf, const uint8_t* mask, float scale, int64_t n) {
  for (int64_t j = 0; j < n; ++j) buf[j] = buf[j] * (static_cast<float>(mask[j]) * scale);
}

inline void add_row(float* acc, const float* v, int64_t n) {
  int64_t j = 0;
  for (; j + kF <= n; j += kF) (fVec::loadu(acc + j) + fVec::loadu(v + j)).store(acc + j);
  for (; j < n; ++j) acc[j] += v[j];
}

inline void scale_row(float* buf, float s, int64_t n) {
  const fVec vs(s);
  int64_t j = 0;
  for (; j + kF <= n; j += kF) (fVec::loadu(buf + j) * vs).store(buf + j);
  for (; j < n; ++j) buf[j] *= s;
}

// (xb - mean) * rstd * w + b into y
inline void affine_row(const float* xb, float mean, float rstd, const float* w, const float* b,
                       float* y, int64_t n) {
  const fVec vm(mean), vr(rstd);
  int64_t j = 0;
  for (; j + kF <= n; j += kF)
    at::vec::fmadd((fVec::loadu(xb + j) - vm) * vr, fVec::loadu(w + j), fVec::loadu(b + j))
        .store(y + j);
  for (; j < n; ++j) y[j] = (xb[j] - mean) * rstd * w[j] + b[j];
}

// y = (xb - mean) * rstd * w + b rounded to T (the output as T holds it), in float32; returns
// max |y| (NaN when a y is NaN)
template <typename T, bool kNan>
inline float affine_round_absmax_impl(const float* xb, float mean, float rstd, const float* w,
                                      const float* b, float* y, int64_t n) {
  using S = Step<T>;
  const fVec vm(mean), vr(rstd);
  // four running maxima: one would chain every step on the latency of maximum (a max and a NaN
  // test); max is exact in any order, so the result is the same
  fVec m0(0.f), m1(0.f), m2(0.f), m3(0.f);
  // one step: y[j, j + kLen) and its max |y| into m (propagates NaN)
  const auto step = [&](int64_t j, fVec& m) __attribute__((always_inline)) {
    typename S::F a;
    for (int k = 0; k < S::kVecs; ++k) {
      const int64_t c = j + k * kF;
      a[k] = at::vec::fmadd((fVec::loadu(xb + c) - vm) * vr, fVec::loadu(w + c),
                            fVec::loadu(b + c));
    }
    a = S::round(a);
    for (int k = 0; k < S::kVecs; ++k) {
      a[k].store(y + j + k * kF);
      if constexpr (kNan) m = at::vec::maximum(m, a[k].abs());  // propagates NaN
      else m = at::vec::clamp_min(a[k].abs(), m);               // max(m, |a|)
    }
  };
  int64_t j = 0;
  for (; j + 4 * S::kLen <= n; j += 4 * S::kLen) {
    step(j, m0);
    step(j + S::kLen, m1);
    step(j + 2 * S::kLen, m2);
    step(j + 3 * S::kLen, m3);
  }
  for (; j + S::kLen <= n; j += S::kLen) step(j, m0);
  const fVec vmax = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
  alignas(64) float buf[kF];
  vmax.store(buf);
  float absmax = 0.f;
  bool nan = false;
  for (int64_t k = 0; k < kF; ++k) {
    nan |= std::isnan(buf[k]);
    absmax = std::max(absmax, buf[k]);
  }
  for (; j < n; ++j) {
    y[j] = static_cast<float>(static_cast<T>((xb[j] - mean) * rstd * w[j] + b[j]));
    nan |= std::isnan(y[j]);
    absmax = std::max(absmax, std::fabs(y[j]));
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : absmax;
}

// no_nan: the caller knows no y is NaN (see fused_fwd_rows), so the running maxima skip the NaN
// test of at::vec::maximum (a third of this loop's vector operations)
template <typename T>
inline float affine_round_absmax(const float* xb, float mean, float rstd, const float* w,
                                 const float* b, float* y, int64_t n, bool no_nan) {
  if (no_nan) return affine_round_absmax_impl<T, false>(xb, mean, rstd, w, b, y, n);
  return affine_round_absmax_impl<T, true>(xb, mean, rstd, w, b, y, n);
}

// quantize_per_token of one row y whose max |y| is absmax, with the float32 operations of
// fastattn.reference.quantize_per_token in the same order.
inline void quantize_row(float* y, float absmax, int8_t* q, float* scale, int64_t n) {
  // torch evaluates 127.0 / tensor as reciprocal(tensor) * 127: two roundings
  const float inv = absmax > 0.f ? (1.0f / absmax) * 127.0f : 0.f;
  *scale = absmax / 127.0f;
  const fVec vinv(inv), lo(-127.f), hi(127.f), zero(0.f);
  int64_t j = 0;
#if defined(FASTATTN_LN_BUILD_AVX512)
  if (std::isfinite(absmax) && absmax > 0.f) {
    // every |y| <= absmax is finite: y * inv is finite and at most 127 by an ulp, which rounds
    // to 127, so neither the NaN blend nor the clamp changes a value; cvtps2dq rounds half to
    // even (the default MXCSR mode), as round() does
    for (; j + kF <= n; j += kF) {
      const __m512i vi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(y + j), _mm512_set1_ps(inv)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), _mm512_cvtepi32_epi8(vi));
    }
  }
#endif
  for (; j + kF <= n; j += kF) {
    fVec v = (fVec::loadu(y + j) * vinv).round();  // round half to even
    v = fVec::blendv(zero, v, v == v);              // NaN -> 0, as torch's float -> int8
    // integral values in [-127, 127]: the conversions are exact; narrowed to int8 in registers
    // and stored as kF bytes (at::vec's int8 vector is wider than kF lanes: its partial store
    // is a memcpy call per vector, 17% of the kernel's time at 8192 x 768)
    const fVec c = at::vec::clamp(v, lo, hi);
#if defined(FASTATTN_LN_BUILD_AVX512)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c)));
#elif defined(FASTATTN_LN_BUILD_AVX2)
    const __m256i vi = _mm256_cvtps_epi32(c);
    const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(vi), _mm256_extracti128_si256(vi, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + j), _mm_packs_epi16(v16, v16));
#else
    alignas(64) float t[kF];
    c.store(t);
    for (int64_t k = 0; k < kF; ++k) q[j + k] = static_cast<int8_t>(static_cast<int32_t>(t[k]));
#endif
  }
  for (; j < n; ++j) {
    const float v = std::nearbyint(y[j] * inv);
    q[j] = static_cast<int8_t>(
        static_cast<int32_t>(std::isnan(v) ? 0.f : std::min(127.f, std::max(-127.f, v))));
  }
}

inline void row_stats(const float* xb, int64_t n, bool rms, float eps, float* mean_out,
                      float* rstd_out) {
  const float inv_n = 1.f / static_cast<float>(n);
  fVec a0(0.f), a1(0.f);
  int64_t j = 0;
  float mean = 0.f, ss = 0.f;
  if (rms) {
    for (; j + 2 * kF <= n; j += 2 * kF) {
      const fVec u = fVec::loadu(xb + j), v = fVec::loadu(xb + j + kF);
      a0 = at::vec::fmadd(u, u, a0);
      a1 = at::vec::fmadd(v, v, a1);
    }
    float tail = 0.f;
    for (; j < n; ++j) tail += xb[j] * xb[j];
    ss = hsum(a0 + a1) + tail;
  } else {
    for (; j + 2 * kF <= n; j += 2 * kF) {
      a0 = a0 + fVec::loadu(xb + j);
      a1 = a1 + fVec::loadu(xb + j + kF);
    }
    float tail = 0.f;
    for (; j < n; ++j) tail += xb[j];
    mean = (hsum(a0 + a1) + tail) * inv_n;
    // the variance about the mean (a second pass over the cached row)
    const fVec vm(mean);
    a0 = fVec(0.f);
    a1 = fVec(0.f);
    for (j = 0; j + 2 * kF <= n; j += 2 * kF) {
      const fVec u = fVec::loadu(xb + j) - vm, v = fVec::loadu(xb + j + kF) - vm;
      a0 = at::vec::fmadd(u, u, a0);
      a1 = at::vec::fmadd(v, v, a1);
    }
    tail = 0.f;
    for (; j < n; ++j) tail += (xb[j] - mean) * (xb[j] - mean);
    ss = hsum(a0 + a1) + tail;
  }
  *mean_out = mean;
  *rstd_out = 1.f / std::sqrt(ss * inv_n + eps);
}

// an output row (x - mean) * rstd * w + b in dtype: float32 written in place, other dtypes
// through the scratch row tb
inline void write_affine(const float* xr, float mean, float rstd, const float* w, const float* b,
                         float* tb, c10::ScalarType dtype, void* out, int64_t n) {
  if (dtype == c10::ScalarType::Float) {
    affine_row(xr, mean, rstd, w, b, static_cast<float*>(out), n);
    return;
  }
  affine_row(xr, mean, rstd, w, b, tb, n);
  store_any<false>(tb, dtype, out, n);
}

void fused_fwd_rows(const FusedFwdParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t N = p.N;
  const size_t esz_x = c10::elementSize(p.dtype);
  std::unique_ptr<float[]> scratch(new float[2 * N + 1]);
  float* xb = scratch.get();  // x' of the row
  float* tb = xb + N;         // an operand being added, then an output row
  const float keep_scale = p.dropout_p > 0.f ? 1.f / (1.f - p.dropout_p) : 1.f;
  const uint32_t threshold =
      static_cast<uint32_t>(std::ceil(static_cast<double>(p.dropout_p) * 16777216.0));
  // float32 x that is normalised as it is (nothing scaled, dropped or added): read in place
  const bool in_place = p.dtype == c10::ScalarType::Float && p.rowscale == nullptr &&
                        p.mask == nullptr && p.x1 == nullptr && p.residual == nullptr;
  // No y of a row is NaN when its statistics are finite with rstd > 0 (then sum (x - mean)^2 is
  // finite, so every |x - mean| * rstd is at most sqrt(N)) and weight and bias are finite.
  bool affine_finite = true;
  if (p.q != nullptr)
    for (int64_t j = 0; j < N; ++j)
      affine_finite &= std::isfinite(p.weight[j]) && std::isfinite(p.bias[j]);
  for (int64_t i = row_begin; i < row_end; ++i) {
    const uint64_t base = static_cast<uint64_t>(i) * static_cast<uint64_t>(N);
    // the row as normalised: x itself, or x' combined in xb below
    const float* xr = in_place ? static_cast<const float*>(p.x) + i * p.stride_x : xb;
    if (!in_place) load_any(static_cast<const char*>(p.x) + i * p.stride_x * esz_x, p.dtype, xb, N);
    if (p.rowscale != nullptr) scale_row(xb, p.rowscale[i], N);
    if (p.mask != nullptr) {
      draw_keep(p.mask + i * N, p.seed, base, threshold, N);
      apply_keep(xb, p.mask + i * N, keep_scale, N);
    }
    if (p.x1 != nullptr) {
      load_any(static_cast<const char*>(p.x1) + i * p.stride_x1 * esz_x, p.dtype, tb, N);
      if (p.mask1 != nullptr) {
        draw_keep(p.mask1 + i * N, p.seed ^ kX1Stream, base, threshold, N);
        apply_keep(tb, p.mask1 + i * N, keep_scale, N);
      }
      add_row(xb, tb, N);
    }
    if (p.residual != nullptr) {
      load_any(static_cast<const char*>(p.residual) +
                   i * p.stride_residual * c10::elementSize(p.residual_dtype),
               p.residual_dtype, tb, N);
      add_row(xb, tb, N);
    }
    // x' is rounded once to the residual dtype: that is residual_out and what is normalised
    // (nothing to store when x' is the input itself)
    if (p.residual_out != nullptr)
      store_any<true>(xb, p.residual_out_dtype,
                      static_cast<char*>(p.residual_out) +
                          i * N * c10::elementSize(p.residual_out_dtype),
                      N);
    float mean, rstd;
    row_stats(xr, N, p.rms, p.eps, &mean, &rstd);
    p.mean[i] = mean;
    p.rstd[i] = rstd;
    if (p.q != nullptr) {
      // quantize_per_token of the output as the input's dtype holds it
      float absmax = 0.f;
      dispatch_dtype(p.dtype, [&](auto tag) {
        absmax = affine_round_absmax<decltype(tag)>(
            xr, mean, rstd, p.weight, p.bias, tb, N,
            affine_finite && std::isfinite(mean) && rstd > 0.f && std::isfinite(rstd));
      });
      quantize_row(tb, absmax, p.q + i * N, p.q_scale + i, N);
    } else {
      write_affine(xr, mean, rstd, p.weight, p.bias, tb, p.dtype,
                   static_cast<char*>(p.out) + i * N * esz_x, N);
    }
    if (p.weight1 != nullptr)
      write_affine(xr, mean, rstd, p.weight1, p.bias1, tb, p.dtype,
                   static_cast<char*>(p.out1) + i * N * esz_x, N);
  }
}

void fused_bwd_rows(const FusedBwdParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t N = p.N;
  const float inv_n = 1.f / static_cast<float>(N);
  const size_t esz = c10::elementSize(p.dtype), esz_x = c10::elementSize(p.x_dtype);
  std::unique_ptr<float[]> scratch(new float[4 * N + 1]);
  float* xb = scratch.get();  // x', then xhat
  float* gb = xb + N;         // dy, then g
  float* g1b = gb + N;        // dy1
  float* db = g1b + N;        // d: the gradient of x'
  const float keep_scale = p.dropout_p > 0.f ? 1.f / (1.f - p.dropout_p) : 1.f;
  for (int64_t i = row_begin; i < row_end; ++i) {
    load_any(static_cast<const char*>(p.x) + i * p.stride_x * esz_x, p.x_dtype, xb, N);
    load_any(static_cast<const char*>(p.dy) + i * p.stride_dy * esz, p.dtype, gb, N);
    if (p.dy1 != nullptr)
      load_any(static_cast<const char*>(p.dy1) + i * p.stride_dy1 * esz, p.dtype, g1b, N);
    const float mean = p.rms ? 0.f : p.mean[i];
    const float rstd = p.rstd[i];
    const fVec vm(mean), vr(rstd);
    fVec s1a(0.f), s2a(0.f);
    int64_t j = 0;
    // xhat in place of x', g = dy * w (+ dy1 * w1) in place of dy, and the dw/db (dw1/db1)
    // partials of this block on the way
    for (; j + kF <= N; j += kF) {
      const fVec xhat = (fVec::loadu(xb + j) - vm) * vr;
      xhat.store(xb + j);
      const fVec dy = fVec::loadu(gb + j);
      fVec g = dy * fVec::loadu(p.weight + j);
      if (p.dw_partial != nullptr)
        at::vec::fmadd(dy, xhat, fVec::loadu(p.dw_partial + j)).store(p.dw_partial + j);
      if (p.db_partial != nullptr) (fVec::loadu(p.db_partial + j) + dy).store(p.db_partial + j);
      if (p.dy1 != nullptr) {
        const fVec dy1 = fVec::loadu(g1b + j);
        g = at::vec::fmadd(dy1, fVec::loadu(p.weight1 + j), g);
        if (p.dw1_partial != nullptr)
          at::vec::fmadd(dy1, xhat, fVec::loadu(p.dw1_partial + j)).store(p.dw1_partial + j);
        if (p.db1_partial != nullptr)
          (fVec::loadu(p.db1_partial + j) + dy1).store(p.db1_partial + j);
      }
      g.store(gb + j);
      s1a = s1a + g;
      s2a = at::vec::fmadd(g, xhat, s2a);
    }
    float s1 = hsum(s1a), s2 = hsum(s2a);
    for (; j < N; ++j) {
      const float xhat = (xb[j] - mean) * rstd;
      xb[j] = xhat;
      const float dy = gb[j];
      float g = dy * p.weight[j];
      if (p.dw_partial != nullptr) p.dw_partial[j] += dy * xhat;
      if (p.db_partial != nullptr) p.db_partial[j] += dy;
      if (p.dy1 != nullptr) {
        const float dy1 = g1b[j];
        g += dy1 * p.weight1[j];
        if (p.dw1_partial != nullptr) p.dw1_partial[j] += dy1 * xhat;
        if (p.db1_partial != nullptr) p.db1_partial[j] += dy1;
      }
      gb[j] = g;
      s1 += g;
      s2 += g * xhat;
    }
    const float c1 = p.rms ? 0.f : s1 * inv_n;
    const float c2 = s2 * inv_n;
    const fVec vc1(c1), vc2(c2);
    for (j = 0; j + kF <= N; j += kF)
      ((fVec::loadu(gb + j) - at::vec::fmadd(fVec::loadu(xb + j), vc2, vc1)) * vr).store(db + j);
    for (; j < N; ++j) db[j] = (gb[j] - (xb[j] * c2 + c1)) * rstd;
    if (p.dres != nullptr) {
      load_any(static_cast<const char*>(p.dres) + i * p.stride_dres * esz_x, p.x_dtype, gb, N);
      add_row(db, gb, N);
    }
    if (p.dresidual != nullptr) {
      std::memcpy(gb, db, sizeof(float) * N);
      store_any<false>(
          gb, p.residual_dtype,
          static_cast<char*>(p.dresidual) + i * N * c10::elementSize(p.residual_dtype), N);
    }
    if (p.dx1 != nullptr) {
      std::memcpy(gb, db, sizeof(float) * N);
      if (p.mask1 != nullptr) apply_keep(gb, p.mask1 + i * N, keep_scale, N);
      store_any<false>(gb, p.dtype, static_cast<char*>(p.dx1) + i * N * esz, N);
    }
    if (p.mask != nullptr) apply_keep(db, p.mask + i * N, keep_scale, N);
    if (p.rowscale != nullptr) scale_row(db, p.rowscale[i], N);
    store_any<false>(db, p.dtype, static_cast<char*>(p.dx) + i * N * esz, N);
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
