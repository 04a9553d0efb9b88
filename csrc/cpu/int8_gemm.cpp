// CPU kernels of the int8 family: quantize_per_token, int8_gemm, int8_weight_only_linear.
//
// int8_gemm runs on the best instruction set the CPU offers, chosen at run time:
//   amx    AMX-INT8 tiles (_tile_dpbssd, signed x signed): 16x16x64 MACs per instruction.
//   vnni   AVX512-VNNI (_mm512_dpbusd_epi32, unsigned x signed): a is shifted by +128 to make it
//          unsigned and 128 * colsum(b) is subtracted per column in the epilogue.
//   scalar portable C++ (any CPU).
// With AMX or VNNI, decode-sized M (a row or two; up to 8 rows without AMX) takes a dot-product
// kernel instead that streams b as it lies in memory (dpbusd, 64 k per instruction, no packing).
// FASTATTN_CPU_ISA caps the choice (cpu_features.h: amx, avx512_vnni, portable; the best path at
// or below the cap is used), which is how the tests exercise every path on one machine.
//
// Both SIMD paths read the second operand from the same packed "VNNI layout": groups of 16 rows
// of the (rows, K) int8 matrix, each group stored as (K/4, 16, 4) bytes, i.e. for every 4
// consecutive k the 16 rows' 4-byte words side by side. That is one zmm row for dpbusd and one
// 64-byte row of an AMX B tile. Padding (rows to the group multiple, K to 4 or 64) is zero, so
// padded products vanish and every tail is handled inside the kernels.
//
// The dequantizing epilogue (acc * a_scale[m] * b_scale[n] + bias[n], float32, then cast) runs on
// the int32 tile right after it is computed, in the same order of float operations as
// fastattn.reference.int8_gemm (no FMA contraction), so its float32 output is bit-identical.
//
// int8_weight_only_linear (float x, int8 w, float32 accumulation) takes, with AVX-512:
//   M < 12-16  a dot-product kernel converting w as it streams it (decoding: bandwidth-bound);
//   larger M   a GEMM over panels of w converted once per call into the micro-kernel's layout and
//              reused by every row of x: AMX-BF16 tiles for bfloat16 x, vdpbf16ps for bfloat16 x
//              on CPUs with AVX512-BF16 but no AMX, float32 FMA otherwise (see "weight-only
//              linear, large M" below).
// Without AVX-512, AVX2 + FMA CPUs run every M through an AVX2 dot-product kernel (see "weight-only
// linear (AVX2)" below). Under FASTATTN_CPU_ISA the AMX tiles need "amx", vdpbf16ps "avx512_bf16",
// the fp32 panels and dot products "avx512", the AVX2 dot-product kernel "avx2" (int8_gemm and
// quantize_per_token have no AVX2 path: they run portably there); "portable" runs the portable
// loops. fastattn.linear (float w) streams w through the same dot-product kernels for M <= 16
// (AVX-512 or AVX2; vdpbf16ps for bfloat16 x and w on AVX512-BF16) and calls at::linear above.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FASTATTN_NO_SIMD)
#define FASTATTN_X86 1
#include <immintrin.h>
#endif

// GCC 12 reports the intrinsics' own `_mm512_undefined_*()` placeholders as uninitialised when
// they are inlined into target("avx512...") functions; the warnings are about the headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace {

// ------------------------------------------------------------------------------------------------
// instruction-set choice
// ------------------------------------------------------------------------------------------------
using fastattn::cpu::cpu_isa;
using fastattn::cpu::Isa;
using fastattn::cpu::intel_cpu;

// The int8 GEMM's kernels: AMX-INT8 tiles at level amx, vpdpbusd at avx512_vnni, else scalar.
enum class GemmPath : int { kScalar = 0, kVnni = 1, kAmx = 2 };

GemmPath gemm_path(Isa isa) {
#ifdef FASTATTN_X86
  if (isa >= Isa::amx) return GemmPath::kAmx;
  if (isa >= Isa::avx512_vnni) return GemmPath::kVnni;
#endif
  (void)isa;
  return GemmPath::kScalar;
}

// The AVX-512 kernels other than the GEMM's (quantization, weight-only linear's fp32 panels).
bool use_avx512(Isa isa) {
#ifdef FASTATTN_X86
  return isa >= Isa::avx512;
#else
  (void)isa;
  return false;
#endif
}

#ifdef FASTATTN_X86
// Loops over register-blocked accumulators are unrolled before GCC decides where arrays of
// vectors live: left to -O3's later unrolling, acc[MR][NR] of the micro-kernels is kept in memory
// and stored on every iteration (measured 2x slower).
#define FA_UNROLL _Pragma("GCC unroll 32")
#define FA_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define FA_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
#define FA_TARGET_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,amx-tile,amx-int8")))
#define FA_TARGET_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))
#define FA_TARGET_AMX_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,amx-tile,amx-bf16")))

#endif

// weight-only linear blocking: 4 rows of w x 4 rows of x per micro-kernel (16 accumulators)
constexpr int kWoN = 4;
constexpr int kWoM = 4;

// Smallest work worth a parallel region: a region costs a wake-up and a barrier (~10 us on an
// idle machine, a scheduler time slice on a busy one), so small packing/quantization passes run on
// the calling thread.
constexpr int64_t kParallelPackBytes = int64_t(1) << 20;
constexpr int64_t kParallelQuantElems = int64_t(1) << 18;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// A 64-byte aligned per-thread scratch buffer (tile loads and zmm stores like alignment).
struct Scratch {
  std::vector<uint8_t> bytes;
  template <typename T>
  T* get(int64_t count) {
    bytes.resize(static_cast<size_t>(count) * sizeof(T) + 64);
    auto p = reinterpret_cast<uintptr_t>(bytes.data());
    return reinterpret_cast<T*>((p + 63) & ~uintptr_t(63));
  }
};

// ------------------------------------------------------------------------------------------------
// epilogue parameters, shared by all paths
// ------------------------------------------------------------------------------------------------
struct Epilogue {
  void* out = nullptr;
  int64_t ldo = 0;                     // row stride of out, in elements
  at::ScalarType dtype = at::kInt;     // kInt (raw accumulators), kFloat, kBFloat16, kHalf
  const float* a_scale = nullptr;      // (M,) or null
  const float* b_scale = nullptr;      // (N,) or null
  const float* bias = nullptr;         // (N,) or null
};

// 127 / absmax (0 unless absmax > 0) rounded exactly as the reference gets it: torch evaluates
// `127.0 / tensor` as reciprocal(tensor) * 127, two float32 roundings, which differs from one
// correctly rounded division in ~5% of cases and would flip some round-half-even ties.
inline float inverse_scale(float absmax) {
  return absmax > 0.0f ? (1.0f / absmax) * 127.0f : 0.0f;
}

// Scalar epilogue of one element; the same float operations in the same order as the reference.
inline void store_scalar(const Epilogue& ep, int64_t m, int64_t n, int32_t acc) {
  if (ep.dtype == at::kInt) {
    static_cast<int32_t*>(ep.out)[m * ep.ldo + n] = acc;
    return;
  }
  float v = static_cast<float>(acc);
  if (ep.a_scale) v = v * ep.a_scale[m];
  if (ep.b_scale) v = v * ep.b_scale[n];
  if (ep.bias) v = v + ep.bias[n];
  switch (ep.dtype) {
    case at::kFloat: static_cast<float*>(ep.out)[m * ep.ldo + n] = v; break;
    case at::kBFloat16: static_cast<at::BFloat16*>(ep.out)[m * ep.ldo + n] = at::BFloat16(v); break;
    case at::kHalf: static_cast<at::Half*>(ep.out)[m * ep.ldo + n] = at::Half(v); break;
    default: TORCH_CHECK(false, "int8_gemm: unsupported out_dtype");
  }
}

#ifdef FASTATTN_X86
// float32 -> bfloat16, round to nearest even, NaN -> quiet NaN (what c10::BFloat16 does).
FA_TARGET_AVX512 inline __m256i cvt_f32_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

FA_TARGET_AVX512 inline __m512 load_bf16(const void* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

FA_TARGET_AVX512 inline __m512 load_half(const void* p, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}

template <typename T>
FA_TARGET_AVX512 inline __m512 load_f32x16(const T* p, __mmask16 mask) {
  if constexpr (std::is_same_v<T, float>) return _mm512_maskz_loadu_ps(mask, p);
  else if constexpr (std::is_same_v<T, at::BFloat16>) return load_bf16(p, mask);
  else return load_half(p, mask);
}

inline __mmask16 tail_mask16(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1u);
}

// Epilogue of 16 accumulators (columns n0..n0+count-1 of row m).
FA_TARGET_AVX512 inline void store_row16(const Epilogue& ep, int64_t m, int64_t n0, int64_t count,
                                          __m512i acc) {
  const __mmask16 mask = tail_mask16(count);
  const int64_t off = m * ep.ldo + n0;
  if (ep.dtype == at::kInt) {
    _mm512_mask_storeu_epi32(static_cast<int32_t*>(ep.out) + off, mask, acc);
    return;
  }
  __m512 v = _mm512_cvtepi32_ps(acc);
  if (ep.a_scale) v = _mm512_mul_ps(v, _mm512_set1_ps(ep.a_scale[m]));
  if (ep.b_scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, ep.b_scale + n0));
  if (ep.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, ep.bias + n0));
  if (ep.dtype == at::kFloat) {
    _mm512_mask_storeu_ps(static_cast<float*>(ep.out) + off, mask, v);
  } else if (ep.dtype == at::kBFloat16) {
    _mm256_mask_storeu_epi16(static_cast<at::BFloat16*>(ep.out) + off, mask, cvt_f32_bf16(v));
  } else {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(static_cast<at::Half*>(ep.out) + off, mask, h);
  }
}

// In-register transpose of a 16x16 matrix of 32-bit words: r[i] lane j -> r[j] lane i.
FA_TARGET_AVX512 inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i a[16], b[16];
  FA_UNROLL for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // b[i + c] holds, in 128-bit lane L, column 4L + c of rows i..i+3
  FA_UNROLL for (int i = 0; i < 16; i += 4) {
    b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
    b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
    b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
    b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
  }
  FA_UNROLL for (int c = 0; c < 4; ++c) {
    const __m512i s0 = _mm512_shuffle_i32x4(b[c], b[4 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i s1 = _mm512_shuffle_i32x4(b[c], b[4 + c], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i s2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i s3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], _MM_SHUFFLE(3, 2, 3, 2));
    r[c] = _mm512_shuffle_i32x4(s0, s2, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + c] = _mm512_shuffle_i32x4(s0, s2, _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + c] = _mm512_shuffle_i32x4(s1, s3, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + c] = _mm512_shuffle_i32x4(s1, s3, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// Packs rows [0, rows) (rows <= 16) of an int8 (rows, K) matrix with row stride ld into one
// group of the VNNI layout: dst[k4][j][t] = src[j][4 * k4 + t], k4 < kp / 4 (kp % 4 == 0),
// zero beyond K and beyond rows. With colsum, also writes sum_k src[j][k] for j < 16.
FA_TARGET_VNNI void pack_vnni_group(const int8_t* src, int64_t ld, int64_t rows, int64_t K,
                                    int64_t kp, int8_t* dst, int32_t* colsum) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i sum = _mm512_setzero_si512();
  __m512i r[16];
  for (int64_t k0 = 0; k0 < kp; k0 += 64) {
    const int64_t valid = std::min<int64_t>(64, std::max<int64_t>(0, K - k0));
    const __mmask64 mask = valid >= 64 ? ~__mmask64(0) : ((__mmask64(1) << valid) - 1);
    FA_UNROLL for (int j = 0; j < 16; ++j)
      r[j] = j < rows ? _mm512_maskz_loadu_epi8(mask, src + j * ld + k0) : _mm512_setzero_si512();
    transpose16x16_epi32(r);
    const int64_t n4 = std::min<int64_t>(16, (kp - k0) / 4);
    int8_t* out = dst + k0 * 16;  // (k0 / 4) * 64
    for (int64_t q = 0; q < n4; ++q) {
      _mm512_storeu_si512(out + q * 64, r[q]);
      sum = _mm512_dpbusd_epi32(sum, ones, r[q]);  // each lane j adds its 4 bytes of row j
    }
  }
  if (colsum) _mm512_storeu_si512(colsum, sum);
}
#endif  // FASTATTN_X86

// ------------------------------------------------------------------------------------------------
// portable int8 GEMM (any CPU): int32 dot products, blocked for cache, parallel over tiles
// ------------------------------------------------------------------------------------------------
void gemm_scalar(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t M, int64_t N,
                 int64_t K, const Epilogue& ep) {
  constexpr int64_t kMB = 16, kNB = 64;
  const int64_t tm = ceil_div(M, kMB), tn = ceil_div(N, kNB);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, kMB * kNB * K));
  at::parallel_for(0, tm * tn, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t % tm) * kMB, n0 = (t / tm) * kNB;
      for (int64_t m = m0; m < std::min(M, m0 + kMB); ++m) {
        const int8_t* ar = a + m * lda;
        for (int64_t n = n0; n < std::min(N, n0 + kNB); ++n) {
          const int8_t* br = b + n * ldb;
          int32_t acc = 0;
          for (int64_t k = 0; k < K; ++k) acc += int32_t(ar[k]) * int32_t(br[k]);
          store_scalar(ep, m, n, acc);
        }
      }
    }
  });
}

#ifdef FASTATTN_X86
// ------------------------------------------------------------------------------------------------
// AVX512-VNNI GEMM: out (M, N) = a (M, K) @ b (N, K).T
// ------------------------------------------------------------------------------------------------
constexpr int kVnniMR = 6;       // rows of a per micro-kernel
constexpr int kVnniNR = 4;       // zmm columns (x16) of b per micro-kernel: a 64-column panel
constexpr int64_t kVnniKC = 512; // K block: a 64 x 512 slice of packed b (32 KB) stays in L1d

// acc[MR][NR] over nk4 groups of 4 k: a_u8 rows (a + 128) broadcast 4 bytes at a time, b from
// the packed panel (NR groups, ldg bytes apart). Accumulators in c (MR, 64) int32 across K blocks.
template <int MR, int NR>
FA_TARGET_VNNI void vnni_kernel(const uint8_t* au, int64_t lda, const int8_t* bp, int64_t ldg,
                                int64_t nk4, int32_t* c, bool accumulate) {
  __m512i acc[MR][NR];
  FA_UNROLL for (int i = 0; i < MR; ++i)
    FA_UNROLL for (int j = 0; j < NR; ++j)
      acc[i][j] = accumulate ? _mm512_load_si512(c + i * 64 + j * 16) : _mm512_setzero_si512();
  for (int64_t q = 0; q < nk4; ++q) {
    __m512i bv[NR];
    FA_UNROLL for (int j = 0; j < NR; ++j) bv[j] = _mm512_loadu_si512(bp + j * ldg + q * 64);
    FA_UNROLL for (int i = 0; i < MR; ++i) {
      int32_t word;
      std::memcpy(&word, au + i * lda + q * 4, 4);
      const __m512i av = _mm512_set1_epi32(word);
      FA_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av, bv[j]);
    }
  }
  FA_UNROLL for (int i = 0; i < MR; ++i)
    FA_UNROLL for (int j = 0; j < NR; ++j) _mm512_store_si512(c + i * 64 + j * 16, acc[i][j]);
}

template <int MR>
FA_TARGET_VNNI void vnni_kernel_nr(int nr, const uint8_t* au, int64_t lda, const int8_t* bp,
                                   int64_t ldg, int64_t nk4, int32_t* c, bool accumulate) {
  switch (nr) {
    case 1: vnni_kernel<MR, 1>(au, lda, bp, ldg, nk4, c, accumulate); break;
    case 2: vnni_kernel<MR, 2>(au, lda, bp, ldg, nk4, c, accumulate); break;
    case 3: vnni_kernel<MR, 3>(au, lda, bp, ldg, nk4, c, accumulate); break;
    default: vnni_kernel<MR, kVnniNR>(au, lda, bp, ldg, nk4, c, accumulate); break;
  }
}

FA_TARGET_VNNI void vnni_micro(int mr, int nr, const uint8_t* au, int64_t lda, const int8_t* bp,
                               int64_t ldg, int64_t nk4, int32_t* c, bool accumulate) {
  switch (mr) {
    case 1: vnni_kernel_nr<1>(nr, au, lda, bp, ldg, nk4, c, accumulate); break;
    case 2: vnni_kernel_nr<2>(nr, au, lda, bp, ldg, nk4, c, accumulate); break;
    case 3: vnni_kernel_nr<3>(nr, au, lda, bp, ldg, nk4, c, accumulate); break;
    case 4: vnni_kernel_nr<4>(nr, au, lda, bp, ldg, nk4, c, accumulate); break;
    case 5: vnni_kernel_nr<5>(nr, au, lda, bp, ldg, nk4, c, accumulate); break;
    default: vnni_kernel_nr<kVnniMR>(nr, au, lda, bp, ldg, nk4, c, accumulate); break;
  }
}

// a (M, K) -> a + 128 as uint8, rows padded with zeros to kp bytes (padding meets zero b bytes).
FA_TARGET_AVX512 void shift_rows_u8(const int8_t* a, int64_t lda, int64_t m0, int64_t m1, int64_t K,
                                    int64_t kp, uint8_t* au) {
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t k = 0; k < kp; k += 64) {
      const int64_t valid = std::min<int64_t>(64, std::max<int64_t>(0, K - k));
      const __mmask64 in = valid >= 64 ? ~__mmask64(0) : ((__mmask64(1) << valid) - 1);
      const int64_t room = std::min<int64_t>(64, kp - k);
      const __mmask64 out = room >= 64 ? ~__mmask64(0) : ((__mmask64(1) << room) - 1);
      const __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(in, a + m * lda + k), bias);
      _mm512_mask_storeu_epi8(au + m * kp + k, out, _mm512_maskz_mov_epi8(in, v));
    }
  }
}

// The epilogue of one (mr, 64) accumulator block: subtract 128 * colsum(b), then store.
FA_TARGET_VNNI void vnni_store(const Epilogue& ep, const int32_t* c, const int32_t* comp, int64_t m0,
                               int mr, int64_t n0, int64_t N) {
  for (int i = 0; i < mr; ++i)
    for (int64_t j = 0; j < 64 && n0 + j < N; j += 16) {
      const __m512i acc = _mm512_sub_epi32(_mm512_load_si512(c + i * 64 + j),
                                           _mm512_loadu_si512(comp + n0 + j));
      store_row16(ep, m0 + i, n0 + j, N - n0 - j, acc);
    }
}

// ------------------------------------------------------------------------------------------------
// Small M (decoding): dot products along K. b is read row by row as it lies in memory, 64 k per
// dpbusd, so nothing is packed and the kernel streams b once at memory speed; the tile kernels
// would pack b or a and spend 32-row AMX tiles (or 6-row VNNI blocks) on a handful of rows.
// ------------------------------------------------------------------------------------------------
constexpr int kDotMR = 4;          // rows of a per micro-kernel
constexpr int kDotNR = 4;          // rows of b per micro-kernel

// Largest M for which the dot-product kernel beats the tile kernels (measured, K = N = 4096 and
// K = 768, N = 3072, one core): up to 8 rows against the VNNI tiles; against AMX only for one
// row, or two when K is long enough (>= 2048) for the streaming to dominate.
inline int64_t dot_max_m(GemmPath path, int64_t K) {
  if (path == GemmPath::kVnni) return 8;
  return K >= 2048 ? 2 : 1;
}

// acc[i][j] = sum_k au[i][k] * b[j][k] (au = a + 128, unsigned) and comp[j] = sum_k b[j][k];
// out[i * kDotNR + j] = acc - 128 * comp, the exact signed product.
template <int MR, int NR>
FA_TARGET_VNNI void dot_kernel(const uint8_t* au, int64_t lda, const int8_t* b, int64_t ldb,
                               int64_t K, int32_t* out) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[MR][NR], comp[NR];
  FA_UNROLL for (int j = 0; j < NR; ++j) {
    comp[j] = _mm512_setzero_si512();
    FA_UNROLL for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_setzero_si512();
  }
  for (int64_t k = 0; k < K; k += 64) {
    const int64_t valid = std::min<int64_t>(64, K - k);
    const __mmask64 mask = valid >= 64 ? ~__mmask64(0) : ((__mmask64(1) << valid) - 1);
    __m512i bv[NR];
    FA_UNROLL for (int j = 0; j < NR; ++j) {
      bv[j] = _mm512_maskz_loadu_epi8(mask, b + j * ldb + k);
      comp[j] = _mm512_dpbusd_epi32(comp[j], ones, bv[j]);
    }
    FA_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512i av = _mm512_loadu_si512(au + i * lda + k);  // rows padded to 64 bytes
      FA_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av, bv[j]);
    }
  }
  FA_UNROLL for (int j = 0; j < NR; ++j) {
    const int32_t c = _mm512_reduce_add_epi32(comp[j]);
    FA_UNROLL for (int i = 0; i < MR; ++i)
      out[i * kDotNR + j] = static_cast<int32_t>(
          static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[i][j])) - 128u * static_cast<uint32_t>(c));
  }
}

template <int MR>
FA_TARGET_VNNI void dot_kernel_nr(int nr, const uint8_t* au, int64_t lda, const int8_t* b,
                                  int64_t ldb, int64_t K, int32_t* out) {
  switch (nr) {
    case 1: dot_kernel<MR, 1>(au, lda, b, ldb, K, out); break;
    case 2: dot_kernel<MR, 2>(au, lda, b, ldb, K, out); break;
    case 3: dot_kernel<MR, 3>(au, lda, b, ldb, K, out); break;
    default: dot_kernel<MR, kDotNR>(au, lda, b, ldb, K, out); break;
  }
}

FA_TARGET_VNNI void dot_micro(int mr, int nr, const uint8_t* au, int64_t lda, const int8_t* b,
                              int64_t ldb, int64_t K, int32_t* out) {
  switch (mr) {
    case 1: dot_kernel_nr<1>(nr, au, lda, b, ldb, K, out); break;
    case 2: dot_kernel_nr<2>(nr, au, lda, b, ldb, K, out); break;
    case 3: dot_kernel_nr<3>(nr, au, lda, b, ldb, K, out); break;
    default: dot_kernel_nr<kDotMR>(nr, au, lda, b, ldb, K, out); break;
  }
}

FA_TARGET_AVX512 void shift_rows_u8(const int8_t* a, int64_t lda, int64_t m0, int64_t m1, int64_t K,
                                    int64_t kp, uint8_t* au);

// One task: rows [n0, n0 + 16) of b against every row of a; each a row's 16 results leave
// through one vector epilogue.
FA_TARGET_VNNI void dot_task(const uint8_t* au, int64_t kp, const int8_t* b, int64_t ldb, int64_t M,
                             int64_t N, int64_t K, int64_t n0, const Epilogue& ep) {
  alignas(64) int32_t res[kDotMR][16];
  int32_t acc[kDotMR * kDotNR];
  const int64_t n_end = std::min<int64_t>(N, n0 + 16);
  for (int64_t m = 0; m < M; m += kDotMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kDotMR, M - m));
    for (int64_t n = n0; n < n_end; n += kDotNR) {
      const int nr = static_cast<int>(std::min<int64_t>(kDotNR, n_end - n));
      dot_micro(mr, nr, au + m * kp, kp, b + n * ldb, ldb, K, acc);
      for (int i = 0; i < mr; ++i)
        for (int j = 0; j < nr; ++j) res[i][n - n0 + j] = acc[i * kDotNR + j];
    }
    for (int i = 0; i < mr; ++i)
      store_row16(ep, m + i, n0, n_end - n0, _mm512_load_si512(res[i]));
  }
}

void gemm_dot(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t M, int64_t N,
              int64_t K, const Epilogue& ep) {
  const int64_t kp = round_up(K, 64);
  at::Tensor au_t = at::empty({M * kp}, at::kByte);
  uint8_t* au = au_t.data_ptr<uint8_t>();
  shift_rows_u8(a, lda, 0, M, K, kp, au);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, 16 * K));
  at::parallel_for(0, ceil_div(N, 16), grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) dot_task(au, kp, b, ldb, M, N, K, t * 16, ep);
  });
}

void gemm_vnni(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t M, int64_t N,
               int64_t K, const Epilogue& ep) {
  const int64_t kp = round_up(K, 4);
  const int64_t groups = ceil_div(N, 16);
  const int64_t ldg = kp * 16;  // bytes of one packed group of 16 columns
  at::Tensor packed = at::empty({groups * ldg + 64}, at::kChar);
  at::Tensor comp_t = at::empty({groups * 16}, at::kInt);
  at::Tensor au_t = at::empty({M * kp + 64}, at::kByte);
  int8_t* bp = packed.data_ptr<int8_t>();
  int32_t* comp = comp_t.data_ptr<int32_t>();
  uint8_t* au = au_t.data_ptr<uint8_t>();
  // 1) pack b into the VNNI layout with 128 * colsum, and shift a to unsigned (both O(size))
  const int64_t prep_tasks = groups + ceil_div(M, 64);
  const bool prep_serial = (N + M) * kp < kParallelPackBytes;
  at::parallel_for(0, prep_tasks, prep_serial ? prep_tasks : 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (t < groups) {
        const int64_t n0 = t * 16;
        pack_vnni_group(b + n0 * ldb, ldb, std::min<int64_t>(16, N - n0), K, kp, bp + t * ldg,
                        comp + n0);
        for (int j = 0; j < 16; ++j) comp[n0 + j] *= 128;
      } else {
        const int64_t m0 = (t - groups) * 64;
        shift_rows_u8(a, lda, m0, std::min(M, m0 + 64), K, kp, au);
      }
    }
  });
  // 2) tiles: 64-column panels x row chunks, parallel
  const int64_t panels = ceil_div(groups, kVnniNR);
  const int threads = at::get_num_threads();
  int64_t mchunks = 1;
  if (panels < 4 * threads) mchunks = std::min(ceil_div(M, kVnniMR), ceil_div(4 * threads, panels));
  const int64_t mc = round_up(ceil_div(M, mchunks), kVnniMR);
  mchunks = ceil_div(M, mc);
  const int64_t work_per_task = mc * 64 * kp;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 21) / std::max<int64_t>(1, work_per_task));
  at::parallel_for(0, panels * mchunks, grain, [&](int64_t t0, int64_t t1) {
    Scratch scratch;
    int32_t* c = scratch.get<int32_t>(mc * 64);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t panel = t / mchunks, m_begin = (t % mchunks) * mc;
      const int64_t m_end = std::min(M, m_begin + mc);
      const int nr = static_cast<int>(std::min<int64_t>(kVnniNR, groups - panel * kVnniNR));
      const int8_t* bpanel = bp + panel * kVnniNR * ldg;
      for (int64_t k0 = 0; k0 < kp; k0 += kVnniKC) {
        const int64_t kc = std::min(kVnniKC, kp - k0);
        const bool first = k0 == 0, last = k0 + kc >= kp;
        for (int64_t m = m_begin; m < m_end; m += kVnniMR) {
          const int mr = static_cast<int>(std::min<int64_t>(kVnniMR, m_end - m));
          int32_t* cm = c + (m - m_begin) * 64;
          vnni_micro(mr, nr, au + m * kp + k0, kp, bpanel + k0 * 16, ldg, kc / 4, cm, !first);
          if (last) vnni_store(ep, cm, comp, m, mr, panel * 64, N);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// AMX GEMM. The tile product is C (rows of R, columns of Q) = R (P, K) @ Q (Qn, K).T, where R is
// read row-major by tile loads and Q is packed into the VNNI layout. Which of a and b plays R is
// chosen per call (see gemm_amx): packing costs O(size) byte shuffles, so the smaller operand, or
// the one whose packing is cheaper than transposing the output tiles, is packed.
// ------------------------------------------------------------------------------------------------
struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

FA_TARGET_AMX void amx_begin() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  // GCC 12 does not see _tile_loadconfig read cfg and drops the stores above as dead (the config
  // loaded is then whatever the stack held): the empty asm makes cfg's contents observable.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

FA_TARGET_AMX void amx_end() { _tile_release(); }

// One 32x32 block: tiles 0-3 accumulate C, 4-5 hold 16 rows of R each, 6-7 one Q group each.
// Loads are interleaved with the dot products so that a tile is reloaded only after its last
// reader issued (measured 2x faster than loading all four operands first).
FA_TARGET_AMX void amx_block(const int8_t* r, int64_t ldr, const int8_t* q0, const int8_t* q1,
                             int64_t chunks, int32_t* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int8_t* r1 = r + 16 * ldr;
  for (int64_t i = 0; i < chunks; ++i) {
    _tile_loadd(4, r + i * 64, ldr);
    _tile_loadd(6, q0 + i * 1024, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_loadd(7, q1 + i * 1024, 64);
    _tile_dpbssd(1, 4, 7);
    _tile_loadd(5, r1 + i * 64, ldr);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 16 * 32, 128);
  _tile_stored(3, c + 16 * 32 + 16, 128);
}

// Epilogue of a 32x32 block c (rows r0.. of R, columns q0.. of Q). When R is a, out[r][q] = c;
// when R is b (transposed), out[q][r] = c, transposed 16x16 at a time in registers.
FA_TARGET_AMX void amx_store(const Epilogue& ep, const int32_t* c, int64_t r0, int64_t rows,
                             int64_t q0, int64_t cols, bool transposed) {
  if (!transposed) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; j += 16)
        store_row16(ep, r0 + i, q0 + j, cols - j, _mm512_load_si512(c + i * 32 + j));
    return;
  }
  __m512i t[16];
  for (int64_t ih = 0; ih < rows; ih += 16)
    for (int64_t jh = 0; jh < cols; jh += 16) {
      FA_UNROLL for (int i = 0; i < 16; ++i) t[i] = _mm512_load_si512(c + (ih + i) * 32 + jh);
      transpose16x16_epi32(t);
      for (int64_t j = 0; j < std::min<int64_t>(16, cols - jh); ++j)
        store_row16(ep, q0 + jh + j, r0 + ih, rows - ih, t[j]);
    }
}

// Copies rows [r0, r0 + 32) of R (zero rows beyond P, zero bytes beyond K) to buf (ld kp + 64:
// a stride that is not a multiple of 4 KB keeps the 32 rows out of the same L1 set).
FA_TARGET_AVX512 void copy_rows_padded(const int8_t* src, int64_t ld, int64_t r0, int64_t P,
                                       int64_t K, int64_t kp, int8_t* buf, int64_t ldbuf) {
  for (int64_t i = 0; i < 32; ++i) {
    int8_t* dst = buf + i * ldbuf;
    if (r0 + i >= P) {
      std::memset(dst, 0, kp);
      continue;
    }
    const int8_t* s = src + (r0 + i) * ld;
    for (int64_t k = 0; k < kp; k += 64) {
      const int64_t valid = std::min<int64_t>(64, std::max<int64_t>(0, K - k));
      const __mmask64 mask = valid >= 64 ? ~__mmask64(0) : ((__mmask64(1) << valid) - 1);
      _mm512_storeu_si512(dst + k, _mm512_maskz_loadu_epi8(mask, s + k));
    }
  }
}

FA_TARGET_AMX void amx_tasks(int64_t t0, int64_t t1, const int8_t* R, int64_t ldr, int64_t P,
                             const int8_t* qp, int64_t Qn, int64_t K, int64_t kp, int64_t rblocks,
                             int64_t panel_cols, bool transposed, const Epilogue& ep) {
  Scratch scratch;
  const int64_t ldbuf = kp + 64;
  int8_t* rbuf = scratch.get<int8_t>(32 * ldbuf + 64 + 32 * 32 * 4);
  int32_t* c = reinterpret_cast<int32_t*>(rbuf + round_up(32 * ldbuf, 64));
  const int64_t chunks = kp / 64, ldq = kp * 16;
  const bool direct = K % 64 == 0;  // R rows are tile-loadable in place
  amx_begin();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t panel = t / rblocks, r0 = (t % rblocks) * 32;
    const int8_t* rb;
    int64_t ld;
    if (direct && r0 + 32 <= P) {
      rb = R + r0 * ldr;
      ld = ldr;
    } else {
      copy_rows_padded(R, ldr, r0, P, K, kp, rbuf, ldbuf);
      rb = rbuf;
      ld = ldbuf;
    }
    const int64_t q_begin = panel * panel_cols, q_end = std::min(Qn, q_begin + panel_cols);
    for (int64_t q0 = q_begin; q0 < q_end; q0 += 32) {
      const int8_t* g0 = qp + (q0 / 16) * ldq;
      amx_block(rb, ld, g0, g0 + ldq, chunks, c);
      amx_store(ep, c, r0, std::min<int64_t>(32, P - r0), q0, std::min<int64_t>(32, Qn - q0),
                transposed);
    }
  }
  amx_end();
}

void gemm_amx(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t M, int64_t N,
              int64_t K, const Epilogue& ep) {
  // Packing Q costs ~O(Qn * K) shuffles; the transposed epilogue (R = b) costs ~O(M * N) more
  // shuffles than the plain one. Pack b (R = a) only when b is not much larger than a.
  const bool transposed = static_cast<double>(N - M) * K > 3.0 * static_cast<double>(M) * N;
  const int8_t* R = transposed ? b : a;
  const int8_t* Q = transposed ? a : b;
  const int64_t ldr = transposed ? ldb : lda, ldq_src = transposed ? lda : ldb;
  const int64_t P = transposed ? N : M, Qn = transposed ? M : N;
  const int64_t kp = round_up(K, 64);
  const int64_t groups = round_up(Qn, 32) / 16;
  at::Tensor packed = at::empty({groups * kp * 16 + 64}, at::kChar);
  int8_t* qp = packed.data_ptr<int8_t>();
  // (packing is ~0.1 cycle per byte: below ~1 MB a parallel region costs more than it saves)
  at::parallel_for(0, groups, std::max<int64_t>(1, kParallelPackBytes / std::max<int64_t>(1, 16 * kp)),
                   [&](int64_t g0, int64_t g1) {
                     for (int64_t g = g0; g < g1; ++g)
                       pack_vnni_group(Q + g * 16 * ldq_src, ldq_src,
                                       std::clamp<int64_t>(Qn - g * 16, 0, 16), K, kp,
                                       qp + g * kp * 16, nullptr);
                   });
  // tasks: (column panel of Q) x (32-row block of R); consecutive tasks share the Q panel so it
  // stays in L2 while R blocks stream through.
  const int64_t panel_cols = std::min<int64_t>(round_up(Qn, 32), 256);
  const int64_t panels = ceil_div(Qn, panel_cols), rblocks = ceil_div(P, 32);
  const int64_t work = 32 * panel_cols * kp;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 21) / std::max<int64_t>(1, work));
  at::parallel_for(0, panels * rblocks, grain, [&](int64_t t0, int64_t t1) {
    amx_tasks(t0, t1, R, ldr, P, qp, Qn, K, kp, rblocks, panel_cols, transposed, ep);
  });
}

// ------------------------------------------------------------------------------------------------
// quantize_per_token (AVX-512): per row absmax, then q = clamp(rne(x * (127 / absmax)))
// ------------------------------------------------------------------------------------------------
template <typename T>
FA_TARGET_AVX512 void quantize_rows_avx512(const T* x, int64_t ldx, int64_t m0, int64_t m1,
                                           int64_t K, int8_t* q, float* scale) {
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  for (int64_t m = m0; m < m1; ++m) {
    const T* row = x + m * ldx;
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = load_f32x16(row + k, tail_mask16(K - k));
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    }
    float absmax = _mm512_reduce_max_ps(vmax);
    if (nan) absmax = std::numeric_limits<float>::quiet_NaN();
    const float inv = inverse_scale(absmax);
    scale[m] = absmax / 127.0f;
    const __m512 vinv = _mm512_set1_ps(inv);
    int8_t* qrow = q + m * K;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = tail_mask16(K - k);
      __m512 y = _mm512_mul_ps(load_f32x16(row + k, mask), vinv);
      y = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      // NaN (0 * inf, NaN input) -> 0, as torch's float -> int8 conversion gives on x86
      y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, y, _CMP_ORD_Q), y);
      y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
      _mm_mask_storeu_epi8(qrow + k, mask, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(y)));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// weight-only linear (AVX-512): out[m][n] = (sum_k x[m][k] * float(w[n][k])) * scale[n] + bias[n]
// ------------------------------------------------------------------------------------------------

// With few accumulators (MR * NR <= 8) the FMA latency (4 cycles) would bound the loop: K is
// then split over two independent accumulator banks (even/odd 16-element chunks).
// 16 weights of a row as float32: int8 sign-extended and converted (exact), float16 / bfloat16
// widened (exact), float32 loaded; zeros where the mask is off.
template <typename W>
FA_TARGET_AVX512 inline __m512 load_w16(const W* p, __mmask16 mask) {
  if constexpr (std::is_same_v<W, int8_t>) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
  } else {
    return load_f32x16(p, mask);
  }
}

template <int MR, int NR, typename W>
FA_TARGET_AVX512 void wo_kernel(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                                float* dots /* (MR, NR) */) {
  constexpr int kBanks = MR * NR <= 8 ? 2 : 1;
  __m512 acc[kBanks][MR][NR];
  FA_UNROLL for (int u = 0; u < kBanks; ++u)
    FA_UNROLL for (int i = 0; i < MR; ++i)
      FA_UNROLL for (int j = 0; j < NR; ++j) acc[u][i][j] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 16 * kBanks) {
    FA_UNROLL for (int u = 0; u < kBanks; ++u) {
      const int64_t k = k0 + 16 * u;
      const __mmask16 mask = tail_mask16(std::max<int64_t>(0, K - k));
      __m512 wv[NR];
      FA_UNROLL for (int j = 0; j < NR; ++j) wv[j] = load_w16(w + j * ldw + k, mask);
      FA_UNROLL for (int i = 0; i < MR; ++i) {
        const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * ldx + k);
        FA_UNROLL for (int j = 0; j < NR; ++j) acc[u][i][j] = _mm512_fmadd_ps(xv, wv[j], acc[u][i][j]);
      }
    }
  }
  FA_UNROLL for (int i = 0; i < MR; ++i)
    FA_UNROLL for (int j = 0; j < NR; ++j) {
      __m512 v = acc[0][i][j];
      if constexpr (kBanks == 2) v = _mm512_add_ps(v, acc[1][i][j]);
      dots[i * NR + j] = _mm512_reduce_add_ps(v);
    }
}

// How far ahead the weight-streaming loops prefetch w, in groups of kWoN rows: about
// kWoPrefetchBytes, into L2 (prefetcht1; the L1 prefetcher takes lines on from there). Rows of w
// are short (K elements: 576 for SmolLM2-135M) and each is read once per call, so the hardware
// prefetchers alone leave the loop waiting on memory. Measured on 2 Zen 4 cores, int8 576 x 49152
// at M = 1 from DRAM: 10 GB/s without software prefetch, 12-15 GB/s prefetching into L1 4 groups
// ahead (whose prefetches stalled once the L1 miss buffers filled), 23-25 GB/s into L2 16-18 KB
// ahead (4 or 8 groups; 20 with 2, 23 with 16). fastattn.linear, float32 576 x 960 ... 49152:
// 21-33 GB/s with 16 KB, 23-28 with 64 KB.
constexpr int64_t kWoPrefetchBytes = 16 * 1024;

inline int64_t prefetch_groups(int64_t K, size_t elem) {
  const int64_t group = std::max<int64_t>(1, kWoN * K * static_cast<int64_t>(elem));
  return std::max<int64_t>(1, ceil_div(kWoPrefetchBytes, group));
}

#ifdef FASTATTN_X86
// _mm_prefetch (into L2) of rows [r0, r0 + rows) of w (within [0, r_stop)), one per cache line
template <typename W>
inline void prefetch_rows(const W* w, int64_t ldw, int64_t r0, int64_t rows, int64_t r_stop,
                          int64_t K) {
  const int64_t r1 = std::min(r0 + rows, r_stop);
  constexpr int64_t kLine = 64 / sizeof(W);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t k = 0; k < K; k += kLine)
      _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + k), _MM_HINT_T1);
}
#endif

template <int MR, typename W>
FA_TARGET_AVX512 void wo_kernel_nr(int nr, const float* x, int64_t ldx, const W* w,
                                   int64_t ldw, int64_t K, float* dots) {
  switch (nr) {
    case 1: wo_kernel<MR, 1>(x, ldx, w, ldw, K, dots); break;
    case 2: wo_kernel<MR, 2>(x, ldx, w, ldw, K, dots); break;
    case 3: wo_kernel<MR, 3>(x, ldx, w, ldw, K, dots); break;
    default: wo_kernel<MR, kWoN>(x, ldx, w, ldw, K, dots); break;
  }
}

template <typename W>
FA_TARGET_AVX512 void wo_micro(int mr, int nr, const float* x, int64_t ldx, const W* w,
                               int64_t ldw, int64_t K, float* dots) {
  switch (mr) {
    case 1: wo_kernel_nr<1>(nr, x, ldx, w, ldw, K, dots); break;
    case 2: wo_kernel_nr<2>(nr, x, ldx, w, ldw, K, dots); break;
    case 3: wo_kernel_nr<3>(nr, x, ldx, w, ldw, K, dots); break;
    default: wo_kernel_nr<kWoM>(nr, x, ldx, w, ldw, K, dots); break;
  }
}

// bfloat16 x against bfloat16 w on AVX512-BF16 (fastattn.linear): vdpbf16ps multiplies 32 pairs
// per instruction, exactly, into float32 (denormal inputs read as zero, as oneDNN's bfloat16
// GEMM reads them). Widening w to float32 for an FMA instead took three vector ops per 16
// weights and bound M = 1 at ~14 GB/s on 2 Zen 4 cores, about F.linear's speed.
template <int MR, int NR>
FA_TARGET_BF16 void dpbf16_kernel(const at::BFloat16* x, int64_t ldx, const at::BFloat16* w,
                                  int64_t ldw, int64_t K, float* dots) {
  constexpr int kBanks = MR * NR <= 8 ? 2 : 1;
  __m512 acc[kBanks][MR][NR];
  FA_UNROLL for (int u = 0; u < kBanks; ++u)
    FA_UNROLL for (int i = 0; i < MR; ++i)
      FA_UNROLL for (int j = 0; j < NR; ++j) acc[u][i][j] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 32 * kBanks) {
    FA_UNROLL for (int u = 0; u < kBanks; ++u) {
      const int64_t k = k0 + 32 * u;
      const int64_t left = std::max<int64_t>(0, K - k);
      const __mmask32 mask = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
      __m512i wv[NR];
      FA_UNROLL for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_epi16(mask, w + j * ldw + k);
      FA_UNROLL for (int i = 0; i < MR; ++i) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i * ldx + k);
        FA_UNROLL for (int j = 0; j < NR; ++j)
          acc[u][i][j] = _mm512_dpbf16_ps(acc[u][i][j], xv, (__m512bh)wv[j]);
      }
    }
  }
  FA_UNROLL for (int i = 0; i < MR; ++i)
    FA_UNROLL for (int j = 0; j < NR; ++j) {
      __m512 v = acc[0][i][j];
      if constexpr (kBanks == 2) v = _mm512_add_ps(v, acc[1][i][j]);
      dots[i * NR + j] = _mm512_reduce_add_ps(v);
    }
}

template <int MR>
FA_TARGET_BF16 void dpbf16_kernel_nr(int nr, const at::BFloat16* x, int64_t ldx,
                                     const at::BFloat16* w, int64_t ldw, int64_t K, float* dots) {
  switch (nr) {
    case 1: dpbf16_kernel<MR, 1>(x, ldx, w, ldw, K, dots); break;
    case 2: dpbf16_kernel<MR, 2>(x, ldx, w, ldw, K, dots); break;
    case 3: dpbf16_kernel<MR, 3>(x, ldx, w, ldw, K, dots); break;
    default: dpbf16_kernel<MR, kWoN>(x, ldx, w, ldw, K, dots); break;
  }
}

FA_TARGET_BF16 void dpbf16_micro(int mr, int nr, const at::BFloat16* x, int64_t ldx,
                                 const at::BFloat16* w, int64_t ldw, int64_t K, float* dots) {
  switch (mr) {
    case 1: dpbf16_kernel_nr<1>(nr, x, ldx, w, ldw, K, dots); break;
    case 2: dpbf16_kernel_nr<2>(nr, x, ldx, w, ldw, K, dots); break;
    case 3: dpbf16_kernel_nr<3>(nr, x, ldx, w, ldw, K, dots); break;
    default: dpbf16_kernel_nr<kWoM>(nr, x, ldx, w, ldw, K, dots); break;
  }
}

// ------------------------------------------------------------------------------------------------
// weight-only linear and fastattn.linear (AVX2 + FMA, CPUs without AVX-512): the same dot
// products, 8 k per ymm, w int8 (weight-only linear) or float32 / bfloat16 / float16 (linear).
// Per 8 weights the loop issues one sign-extending load (vpmovsxbd), one vcvtdq2ps and one FMA;
// at M = 1 those three vector ops bound it (measured on Zen 3, K = 576: ~23 GB/s of w from L3
// against ~36 GB/s for a memcpy of the same bytes; a pshufb / shift expansion adds a fourth op
// and ran at 15-17 GB/s). From DRAM it reads w faster than memcpy copies it. This path also takes
// large M (no AVX2 panel GEMM): 2 rows of x x 4 rows of w reached ~60 GFLOP/s there, 4 x 4
// spilled the 16 ymm registers (~50 GFLOP/s).
// ------------------------------------------------------------------------------------------------
#define FA_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

FA_TARGET_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 8 consecutive weights as float32 (int8 and bfloat16 are exact in float32; float16 by F16C)
FA_TARGET_AVX2 inline __m256 load_w8(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
FA_TARGET_AVX2 inline __m256 load_w8(const float* p) { return _mm256_loadu_ps(p); }
FA_TARGET_AVX2 inline __m256 load_w8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
FA_TARGET_AVX2 inline __m256 load_w8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// dots[i * NR + j] = sum_k x[i][k] * w[j][k]. With MR * NR <= 4 accumulators the 4-cycle FMA
// latency would bound the loop: K then alternates between two accumulator banks (M = 1, 4 rows of
// w: 22 against 20 GB/s). The K tail (< 8) copies w's last elements into a zeroed block and reads
// x under a mask, so nothing past K is read (rows of x may be padded with NaN).
template <int MR, int NR, typename W>
FA_TARGET_AVX2 void wo_kernel_avx2(const float* x, int64_t ldx, const W* w, int64_t ldw,
                                   int64_t K, float* dots) {
  constexpr int kBanks = MR * NR <= 4 ? 2 : 1;
  __m256 acc[kBanks][MR][NR];
  FA_UNROLL for (int u = 0; u < kBanks; ++u)
    FA_UNROLL for (int i = 0; i < MR; ++i)
      FA_UNROLL for (int j = 0; j < NR; ++j) acc[u][i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * kBanks <= K; k += 8 * kBanks) {
    FA_UNROLL for (int u = 0; u < kBanks; ++u) {
      const int64_t kk = k + 8 * u;
      __m256 wv[NR];
      FA_UNROLL for (int j = 0; j < NR; ++j) wv[j] = load_w8(w + j * ldw + kk);
      FA_UNROLL for (int i = 0; i < MR; ++i) {
        const __m256 xv = _mm256_loadu_ps(x + i * ldx + kk);
        FA_UNROLL for (int j = 0; j < NR; ++j)
          acc[u][i][j] = _mm256_fmadd_ps(xv, wv[j], acc[u][i][j]);
      }
    }
  }
  for (; k < K; k += 8) {
    const int64_t count = std::min<int64_t>(8, K - k);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 wv[NR];
    FA_UNROLL for (int j = 0; j < NR; ++j) {
      W tail[8] = {};
      std::memcpy(tail, w + j * ldw + k, static_cast<size_t>(count) * sizeof(W));
      wv[j] = load_w8(tail);
    }
    FA_UNROLL for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_maskload_ps(x + i * ldx + k, mask);
      FA_UNROLL for (int j = 0; j < NR; ++j)
        acc[0][i][j] = _mm256_fmadd_ps(xv, wv[j], acc[0][i][j]);
    }
  }
  FA_UNROLL for (int i = 0; i < MR; ++i)
    FA_UNROLL for (int j = 0; j < NR; ++j) {
      __m256 v = acc[0][i][j];
      if constexpr (kBanks == 2) v = _mm256_add_ps(v, acc[1][i][j]);
      dots[i * NR + j] = hsum8(v);
    }
}

template <int MR, typename W>
FA_TARGET_AVX2 void wo_kernel_avx2_nr(int nr, const float* x, int64_t ldx, const W* w,
                                      int64_t ldw, int64_t K, float* dots) {
  switch (nr) {
    case 1: wo_kernel_avx2<MR, 1>(x, ldx, w, ldw, K, dots); break;
    case 2: wo_kernel_avx2<MR, 2>(x, ldx, w, ldw, K, dots); break;
    case 3: wo_kernel_avx2<MR, 3>(x, ldx, w, ldw, K, dots); break;
    default: wo_kernel_avx2<MR, kWoN>(x, ldx, w, ldw, K, dots); break;
  }
}

// The (mr, nr) block of wo_micro, dots[i * nr + j]; 3-4 rows of x run as 2 + 1 or 2 + 2 (their
// dots rows are contiguous), each pass converting the 4 rows of w again from L1.
template <typename W>
FA_TARGET_AVX2 void wo_micro_avx2(int mr, int nr, const float* x, int64_t ldx, const W* w,
                                  int64_t ldw, int64_t K, float* dots) {
  for (int i = 0; i < mr; i += 2) {
    float* d = dots + i * nr;
    if (mr - i == 1) {
      wo_kernel_avx2_nr<1>(nr, x + i * ldx, ldx, w, ldw, K, d);
    } else {
      wo_kernel_avx2_nr<2>(nr, x + i * ldx, ldx, w, ldw, K, d);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// weight-only linear, large M: a GEMM over dequantized panels of w.
//
// The dot-product kernel above converts every int8 weight inside its inner loop, once per 4 rows
// of x; with many rows that conversion (and the horizontal sums) dominates and the op ran at
// 0.3-0.4x of F.linear on the float weight. Here each task converts a panel of w once into the
// layout a register-blocked micro-kernel reads (a conversion only: int8 values are exact in
// float32 and bfloat16, w_scale is applied in the epilogue), and runs every row of x against it:
//   fp32   (x float32, or float16 / bfloat16 without bfloat16 units): w panel blocks packed as
//          float32 [k][48 columns], x rows packed as float32 [k][8 rows] (converted on the
//          way), an 8 x 48 FMA micro-kernel (24 zmm accumulators), K blocked so that the
//          48 x kWpKC panel block stays in L1; the epilogue runs in the last K block.
//   amx    (x bfloat16, AMX-BF16): w panel packed as bfloat16 pairs in the VNNI layout (one
//          64-byte B tile row = 16 columns x 2 k), 32 x 32 blocks of _tile_dpbf16ps reading x
//          rows in place (or from a zero-padded copy at the K and M tails).
//   vdpbf16ps (x bfloat16, AVX512-BF16 without AMX): the fp32 scheme on k pairs (w rows of
//          3 x 16 columns x 2 k, x packed as 32-bit pairs), 8 x 48 accumulators.
// float16 x does not take the bfloat16 instructions: float16 values are not exact in bfloat16.
// vdpbf16ps runs at ~1/4 of the FMA rate on Sapphire Rapids (see attention.cpp), so it is only
// chosen without AMX (Zen 4, Cooper Lake, where it is the fast instruction).
// ------------------------------------------------------------------------------------------------
constexpr int kWpMR = 8;          // rows of x per fp32 micro-kernel
constexpr int kWpNR = 48;         // columns (3 zmm) per fp32 micro-kernel and per packed panel
constexpr int64_t kWpKC = 192;    // K block of the fp32 path: 48 x 192 floats = 36 KB (L1d 48 KB)
constexpr int64_t kWpMC = 512;    // rows of x packed at a time (512 x 192 floats = 384 KB, L2)
constexpr int64_t kWaNB = 64;     // columns of w per AMX task panel (two 32-column blocks)

// Smallest M for the panel paths. Below it the dot-product kernel wins: converting a panel costs
// about as much as that kernel's whole pass over w, and the panel paths recover it only across
// enough rows of x. Measured on one Sapphire Rapids core, K x N = 768 x 3072 and 4096 x 4096: the
// AMX path is ahead from M ~ 8-12 (1.5x at 12), the float32 panels from M ~ 16 (tie at 16, 1.2x
// at 24, 1.5x at 48).
constexpr int64_t kWpMinM = 16;
constexpr int64_t kWaMinM = 12;

struct WoArgs {
  const int8_t* w;
  int64_t ldw;
  const float* scale;
  const float* bias;
  void* out;
  int64_t ldo;
  at::ScalarType dtype;
  int64_t M, N, K;
};

// Epilogue of 16 float32 dot products (columns n0..n0+count-1 of row m): * scale + bias, stored
// in the output dtype; two roundings (no FMA), as the reference computes them.
FA_TARGET_AVX512 inline void wo_store16(const WoArgs& a, int64_t m, int64_t n0, int64_t count,
                                        __m512 v) {
  const __mmask16 mask = tail_mask16(count);
  v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, a.scale + n0));
  if (a.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, a.bias + n0));
  const int64_t off = m * a.ldo + n0;
  if (a.dtype == at::kFloat) {
    _mm512_mask_storeu_ps(static_cast<float*>(a.out) + off, mask, v);
  } else if (a.dtype == at::kBFloat16) {
    _mm256_mask_storeu_epi16(static_cast<at::BFloat16*>(a.out) + off, mask, cvt_f32_bf16(v));
  } else {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(static_cast<at::Half*>(a.out) + off, mask, h);
  }
}

// 16 int8 weights of row `row` (zeros when absent) as float32.
FA_TARGET_AVX512 inline __m512i load_w16_f32(const int8_t* row, __mmask16 mask) {
  const __m512i v = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, row));
  return _mm512_castps_si512(_mm512_cvtepi32_ps(v));
}

// Packs w rows [n0, n0 + 48) x k [k0, k0 + kc) as float32 dst[kk][48] (zero beyond N): 16 rows x
// 16 k converted and transposed in registers at a time.
FA_TARGET_AVX512 void pack_w_f32(const WoArgs& a, int64_t n0, int64_t k0, int64_t kc, float* dst) {
  __m512i r[16];
  for (int sub = 0; sub < kWpNR / 16; ++sub) {
    const int64_t nb = n0 + sub * 16;
    const int64_t rows = std::clamp<int64_t>(a.N - nb, 0, 16);
    for (int64_t kk = 0; kk < kc; kk += 16) {
      const __mmask16 mask = tail_mask16(kc - kk);
      FA_UNROLL for (int j = 0; j < 16; ++j)
        r[j] = j < rows ? load_w16_f32(a.w + (nb + j) * a.ldw + k0 + kk, mask)
                        : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      const int64_t n = std::min<int64_t>(16, kc - kk);
      for (int64_t q = 0; q < n; ++q)
        _mm512_store_si512(dst + (kk + q) * kWpNR + sub * 16, r[q]);
    }
  }
}

// c[i][0..48) (+)= sum_k xp[k][i] * bp[k][0..48), i < MR (xp: packed rows of x, kWpMR per k).
// With `last` (the final K block) the sums leave through the epilogue to out rows m.., columns
// n0.. instead of going back to c: acc is never read again, and no separate epilogue pass.
template <int MR>
FA_TARGET_AVX512 void wp_f32_kernel(const float* xp, const float* bp, int64_t kc, float* c,
                                    bool accumulate, bool last, const WoArgs& a, int64_t m,
                                    int64_t n0) {
  __m512 acc[MR][3];
  FA_UNROLL for (int i = 0; i < MR; ++i)
    FA_UNROLL for (int j = 0; j < 3; ++j)
      acc[i][j] = accumulate ? _mm512_load_ps(c + i * kWpNR + j * 16) : _mm512_setzero_ps();
  // the next call's partial sums (usually out of L2: acc spans every panel) arrive meanwhile
  FA_UNROLL for (int l = 0; l < MR * 3; ++l)
    _mm_prefetch(reinterpret_cast<const char*>(c + kWpMR * kWpNR + l * 16), _MM_HINT_T0);
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(bp + k * kWpNR);
    const __m512 b1 = _mm512_load_ps(bp + k * kWpNR + 16);
    const __m512 b2 = _mm512_load_ps(bp + k * kWpNR + 32);
    FA_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_set1_ps(xp[k * kWpMR + i]);
      acc[i][0] = _mm512_fmadd_ps(xv, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(xv, b1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(xv, b2, acc[i][2]);
    }
  }
  if (last) {
    const int64_t cols = std::min<int64_t>(kWpNR, a.N - n0);
    FA_UNROLL for (int i = 0; i < MR; ++i)
      FA_UNROLL for (int j = 0; j < 3; ++j)
        if (j * 16 < cols) wo_store16(a, m + i, n0 + j * 16, cols - j * 16, acc[i][j]);
    return;
  }
  FA_UNROLL for (int i = 0; i < MR; ++i)
    FA_UNROLL for (int j = 0; j < 3; ++j) _mm512_store_ps(c + i * kWpNR + j * 16, acc[i][j]);
}

FA_TARGET_AVX512 void wp_f32_micro(int mr, const float* xp, const float* bp, int64_t kc, float* c,
                                   bool accumulate, bool last, const WoArgs& a, int64_t m,
                                   int64_t n0) {
  switch (mr) {
    case 1: wp_f32_kernel<1>(xp, bp, kc, c, accumulate, last, a, m, n0); break;
    case 2: wp_f32_kernel<2>(xp, bp, kc, c, accumulate, last, a, m, n0); break;
    case 3: wp_f32_kernel<3>(xp, bp, kc, c, accumulate, last, a, m, n0); break;
    case 4: wp_f32_kernel<4>(xp, bp, kc, c, accumulate, last, a, m, n0); break;
    case 5: wp_f32_kernel<5>(xp, bp, kc, c, accumulate, last, a, m, n0); break;
    case 6: wp_f32_kernel<6>(xp, bp, kc, c, accumulate, last, a, m, n0); break;
    case 7: wp_f32_kernel<7>(xp, bp, kc, c, accumulate, last, a, m, n0); break;
    default: wp_f32_kernel<kWpMR>(xp, bp, kc, c, accumulate, last, a, m, n0); break;
  }
}

// Packs x rows [m0, m1) x k [k0, k0 + kc) as float32 [(m - m0) / 8][kk][8] (zero rows past m1):
// the micro-kernel's broadcasts then read 32 contiguous bytes per k, whatever x's row stride
// and dtype. 8 rows x 16 k are converted and transposed in registers at a time.
template <typename T>
FA_TARGET_AVX512 void pack_x_f32(const T* x, int64_t ldx, int64_t m0, int64_t m1, int64_t k0,
                                 int64_t kc, float* dst) {
  __m512i r[16];
  for (int64_t m = m0; m < m1; m += kWpMR) {
    const int64_t rows = std::min<int64_t>(kWpMR, m1 - m);
    float* d = dst + (m - m0) * kc;
    for (int64_t kk = 0; kk < kc; kk += 16) {
      const __mmask16 mask = tail_mask16(kc - kk);
      FA_UNROLL for (int j = 0; j < 16; ++j)
        r[j] = j < rows ? _mm512_castps_si512(load_f32x16(x + (m + j) * ldx + k0 + kk, mask))
                        : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      const int64_t n = std::min<int64_t>(16, kc - kk);
      for (int64_t q = 0; q < n; ++q)
        _mm256_store_si256(reinterpret_cast<__m256i*>(d + (kk + q) * kWpMR),
                           _mm512_castsi512_si256(r[q]));
    }
  }
}

// Splits M into chunks when there are too few column panels to keep every thread busy.
inline int64_t m_chunk_rows(int64_t M, int64_t panels, int64_t align) {
  const int64_t threads = at::get_num_threads();
  if (panels >= 4 * threads) return M;
  const int64_t chunks = std::min(ceil_div(M, align), ceil_div(4 * threads, panels));
  return round_up(ceil_div(M, chunks), align);
}

// 32 int8 weights (zeros where masked off) as 32 bfloat16: exact, |w| <= 128 has at most 8
// significant bits, so the top half of the float32 is the value.
FA_TARGET_AVX512 inline __m512i load_w32_bf16(const int8_t* row, __mmask32 mask) {
  const __m256i b = _mm256_maskz_loadu_epi8(mask, row);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  const __m256i l16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(lo), 16));
  const __m256i h16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(hi), 16));
  return _mm512_inserti64x4(_mm512_castsi256_si512(l16), h16, 1);
}

// Packs w rows [n0, n0 + 16) x k [k0, k0 + kc) (kc a multiple of 32; zero beyond N and K) as
// one bfloat16 VNNI group: row p of dst (ld elements apart) holds the 16 pairs
// (w[n0 + j][k0 + 2p], w[n0 + j][k0 + 2p + 1]), one 32-bit word each. A row of 32 converted k is
// 16 such words, so a 16 x 16 word transpose makes 16 rows: AMX B tile rows (ld 32), or one of
// the three zmm per k pair of a vdpbf16ps panel (ld 96).
FA_TARGET_AVX512 void pack_w_bf16_group(const WoArgs& a, int64_t n0, int64_t k0, int64_t kc,
                                        uint16_t* dst, int64_t ld) {
  const int64_t rows = std::clamp<int64_t>(a.N - n0, 0, 16);
  __m512i r[16];
  for (int64_t kk = 0; kk < kc; kk += 32) {
    const int64_t valid = std::clamp<int64_t>(a.K - k0 - kk, 0, 32);
    const __mmask32 mask = valid >= 32 ? ~__mmask32(0) : ((__mmask32(1) << valid) - 1);
    FA_UNROLL for (int j = 0; j < 16; ++j)
      r[j] = j < rows ? load_w32_bf16(a.w + (n0 + j) * a.ldw + k0 + kk, mask)
                      : _mm512_setzero_si512();
    transpose16x16_epi32(r);
    FA_UNROLL for (int q = 0; q < 16; ++q) _mm512_storeu_si512(dst + (kk / 2 + q) * ld, r[q]);
  }
}

// Copies rows [m0, m0 + 32) of x (zero rows beyond M, zero beyond K) to buf (ld elements).
FA_TARGET_AVX512 void copy_x_bf16(const uint16_t* x, int64_t ldx, int64_t m0, int64_t M, int64_t K,
                                  int64_t kp, uint16_t* buf, int64_t ld) {
  for (int64_t i = 0; i < 32; ++i) {
    uint16_t* dst = buf + i * ld;
    for (int64_t k = 0; k < kp; k += 32) {
      const int64_t valid = m0 + i < M ? std::clamp<int64_t>(K - k, 0, 32) : 0;
      const __mmask32 mask = valid >= 32 ? ~__mmask32(0) : ((__mmask32(1) << valid) - 1);
      _mm512_storeu_si512(dst + k, _mm512_maskz_loadu_epi16(mask, x + (m0 + i) * ldx + k));
    }
  }
}

// One 32 x 32 float32 block c = x rows (32 x kp bfloat16, row stride ldx_bytes) @ two packed
// groups: tiles 0-3 accumulate, 4-5 hold 16 rows of x each, 6-7 one group's 16 k-pair rows.
FA_TARGET_AMX_BF16 void amx_block_bf16(const uint16_t* x, int64_t ldx_bytes, const uint16_t* g0,
                                       const uint16_t* g1, int64_t chunks, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const char* r0 = reinterpret_cast<const char*>(x);
  const char* r1 = r0 + 16 * ldx_bytes;
  for (int64_t i = 0; i < chunks; ++i) {
    _tile_loadd(4, r0 + i * 64, ldx_bytes);
    _tile_loadd(6, g0 + i * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, g1 + i * 512, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, r1 + i * 64, ldx_bytes);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 16 * 32, 128);
  _tile_stored(3, c + 16 * 32 + 16, 128);
}

// Tasks [t0, t1) of wo_gemm_amx: task t = (64-column panel t / mchunks, row chunk t % mchunks).
FA_TARGET_AMX_BF16 void wo_amx_tasks(int64_t t0, int64_t t1, const uint16_t* x, int64_t ldx,
                                     const WoArgs& a, int64_t mc, int64_t mchunks) {
  const int64_t kp = round_up(a.K, 32), ldbuf = kp + 32;  // + 64 bytes: rows off one 4 KB set
  Scratch scratch;
  uint16_t* wpk = scratch.get<uint16_t>(kWaNB * kp + 32 * ldbuf + 2 * 32 * 32);
  uint16_t* xbuf = wpk + kWaNB * kp;
  float* c = reinterpret_cast<float*>(xbuf + 32 * ldbuf);
  const bool direct = a.K % 32 == 0;  // x rows are tile-loadable in place
  const int64_t chunks = kp / 32, ldg = kp * 16;  // elements of one packed group
  int64_t packed = -1;
  amx_begin();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t panel = t / mchunks, n_begin = panel * kWaNB;
    const int64_t n_end = std::min(a.N, n_begin + kWaNB);
    if (panel != packed) {
      for (int64_t g = 0; g < ceil_div(n_end - n_begin, 32) * 2; ++g)
        pack_w_bf16_group(a, n_begin + g * 16, 0, kp, wpk + g * ldg, 32);
      packed = panel;
    }
    const int64_t m_begin = (t % mchunks) * mc, m_end = std::min(a.M, m_begin + mc);
    for (int64_t m0 = m_begin; m0 < m_end; m0 += 32) {
      const uint16_t* xb = x + m0 * ldx;
      int64_t ldb = ldx;
      if (!direct || m0 + 32 > a.M) {
        copy_x_bf16(x, ldx, m0, a.M, a.K, kp, xbuf, ldbuf);
        xb = xbuf;
        ldb = ldbuf;
      }
      const int64_t rows = std::min<int64_t>(32, m_end - m0);
      for (int64_t n0 = n_begin; n0 < n_end; n0 += 32) {
        const uint16_t* g0 = wpk + ((n0 - n_begin) / 16) * ldg;
        amx_block_bf16(xb, ldb * 2, g0, g0 + ldg, chunks, c);
        const int64_t cols = std::min<int64_t>(32, n_end - n0);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < cols; j += 16)
            wo_store16(a, m0 + i, n0 + j, cols - j, _mm512_load_ps(c + i * 32 + j));
      }
    }
  }
  amx_end();
}

// x bfloat16 rows (ldx), every column of out.
void wo_gemm_amx(const at::BFloat16* x, int64_t ldx, const WoArgs& a) {
  const int64_t panels = ceil_div(a.N, kWaNB);
  const int64_t mc = m_chunk_rows(a.M, panels, 32), mchunks = ceil_div(a.M, mc);
  at::parallel_for(0, panels * mchunks, 1, [&](int64_t t0, int64_t t1) {
    wo_amx_tasks(t0, t1, reinterpret_cast<const uint16_t*>(x), ldx, a, mc, mchunks);
  });
}

// ---- vdpbf16ps panels (bfloat16 x without AMX) ----

// Packs x rows [m0, m1) x k [k0, k0 + kc) of bfloat16 as k pairs, [(m - m0) / 8][p][8] 32-bit
// words (the second of an odd kc's last pair, and rows past m1, zero).
FA_TARGET_AVX512 void pack_x_pairs(const at::BFloat16* x, int64_t ldx, int64_t m0, int64_t m1,
                                   int64_t k0, int64_t kc, uint32_t* dst) {
  const int64_t np = ceil_div(kc, 2);
  __m512i r[16];
  for (int64_t m = m0; m < m1; m += kWpMR) {
    const int64_t rows = std::min<int64_t>(kWpMR, m1 - m);
    uint32_t* d = dst + (m - m0) * np;
    for (int64_t kk = 0; kk < kc; kk += 32) {
      const int64_t valid = std::min<int64_t>(32, kc - kk);
      const __mmask32 mask = valid >= 32 ? ~__mmask32(0) : ((__mmask32(1) << valid) - 1);
      FA_UNROLL for (int j = 0; j < 16; ++j)
        r[j] = j < rows ? _mm512_maskz_loadu_epi16(mask, x + (m + j) * ldx + k0 + kk)
                        : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      const int64_t n = std::min<int64_t>(16, np - kk / 2);
      for (int64_t q = 0; q < n; ++q)
        _mm256_store_si256(reinterpret_cast<__m256i*>(d + (kk / 2 + q) * kWpMR),
                           _mm512_castsi512_si256(r[q]));
    }
  }
}

// c[i][0..48) (+)= sum_p xp[p][i] . bp[p][0..48) over np k pairs (vdpbf16ps: two products per
// float32 lane and instruction); the epilogue with `last` as in wp_f32_kernel.
template <int MR>
FA_TARGET_BF16 void wp_bf16_kernel(const uint32_t* xp, const uint16_t* bp, int64_t np, float* c,
                                   bool accumulate, bool last, const WoArgs& a, int64_t m,
                                   int64_t n0) {
  __m512 acc[MR][3];
  FA_UNROLL for (int i = 0; i < MR; ++i)
    FA_UNROLL for (int j = 0; j < 3; ++j)
      acc[i][j] = accumulate ? _mm512_load_ps(c + i * kWpNR + j * 16) : _mm512_setzero_ps();
  FA_UNROLL for (int l = 0; l < MR * 3; ++l)
    _mm_prefetch(reinterpret_cast<const char*>(c + kWpMR * kWpNR + l * 16), _MM_HINT_T0);
  for (int64_t p = 0; p < np; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(bp + p * 2 * kWpNR);
    const __m512bh b1 = (__m512bh)_mm512_load_si512(bp + p * 2 * kWpNR + 32);
    const __m512bh b2 = (__m512bh)_mm512_load_si512(bp + p * 2 * kWpNR + 64);
    FA_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[p * kWpMR + i]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, b1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], xv, b2);
    }
  }
  if (last) {
    const int64_t cols = std::min<int64_t>(kWpNR, a.N - n0);
    FA_UNROLL for (int i = 0; i < MR; ++i)
      FA_UNROLL for (int j = 0; j < 3; ++j)
        if (j * 16 < cols) wo_store16(a, m + i, n0 + j * 16, cols - j * 16, acc[i][j]);
    return;
  }
  FA_UNROLL for (int i = 0; i < MR; ++i)
    FA_UNROLL for (int j = 0; j < 3; ++j) _mm512_store_ps(c + i * kWpNR + j * 16, acc[i][j]);
}

FA_TARGET_BF16 void wp_bf16_micro(int mr, const uint32_t* xp, const uint16_t* bp, int64_t np,
                                  float* c, bool accumulate, bool last, const WoArgs& a, int64_t m,
                                  int64_t n0) {
  switch (mr) {
    case 1: wp_bf16_kernel<1>(xp, bp, np, c, accumulate, last, a, m, n0); break;
    case 2: wp_bf16_kernel<2>(xp, bp, np, c, accumulate, last, a, m, n0); break;
    case 3: wp_bf16_kernel<3>(xp, bp, np, c, accumulate, last, a, m, n0); break;
    case 4: wp_bf16_kernel<4>(xp, bp, np, c, accumulate, last, a, m, n0); break;
    case 5: wp_bf16_kernel<5>(xp, bp, np, c, accumulate, last, a, m, n0); break;
    case 6: wp_bf16_kernel<6>(xp, bp, np, c, accumulate, last, a, m, n0); break;
    case 7: wp_bf16_kernel<7>(xp, bp, np, c, accumulate, last, a, m, n0); break;
    default: wp_bf16_kernel<kWpMR>(xp, bp, np, c, accumulate, last, a, m, n0); break;
  }
}

// ---- the panel task loop shared by the float32 and vdpbf16ps micro-kernels ----

// Tasks [t0, t1) of wo_gemm_panels: task t = (row chunk t / panels, 48-column panel t % panels).
// A thread takes its run of panels one K block at a time (GotoBLAS order): it packs x rows
// kWpMC at a time (in L2 while every panel passes over them), and for each panel converts the
// K block of w (36 KB, written to and read from L1) and runs the micro-kernel over those rows.
// The partial sums live in acc ([panel][M][48] float32) between K blocks. Measured alternatives:
// x rows read in place instead of packed, 0.7-0.8x at K >= 3072 (row strides of 12-16 KB: TLB
// misses); all of a thread's panels converted once per K block into one buffer (MBs, written to
// L3), a fixed cost of ~1.5 cycles per weight.
// kPairs: bfloat16 x, vdpbf16ps on k pairs (K block kWpKC * 2); else float32 FMA.
template <bool kPairs, typename T>
FA_TARGET_AVX512 void wo_panel_tasks(int64_t t0, int64_t t1, const T* x, int64_t ldx,
                                     const WoArgs& a, int64_t mc, int64_t panels, float* acc) {
  constexpr int64_t kKC = kPairs ? 2 * kWpKC : kWpKC;
  Scratch wscratch, xscratch;
  void* bp = wscratch.get<float>(kWpKC * kWpNR);  // 36 KB either way
  void* xp = xscratch.get<float>(kWpMC * kWpKC);
  while (t0 < t1) {
    // the run of tasks in one row chunk
    const int64_t chunk = t0 / panels, p_begin = t0 % panels;
    const int64_t p_end = std::min(panels, p_begin + (t1 - t0));
    const int64_t m_begin = chunk * mc, m_end = std::min(a.M, m_begin + mc);
    for (int64_t k0 = 0; k0 < a.K; k0 += kKC) {
      const int64_t kc = std::min(kKC, a.K - k0);
      const bool first = k0 == 0, last = k0 + kc >= a.K;
      for (int64_t mb = m_begin; mb < m_end; mb += kWpMC) {
        const int64_t mb_end = std::min(m_end, mb + kWpMC);
        if constexpr (kPairs) pack_x_pairs(x, ldx, mb, mb_end, k0, kc, static_cast<uint32_t*>(xp));
        else pack_x_f32(x, ldx, mb, mb_end, k0, kc, static_cast<float*>(xp));
        for (int64_t p = p_begin; p < p_end; ++p) {
          const int64_t n0 = p * kWpNR;
          float* c = acc + p * a.M * kWpNR;
          if constexpr (kPairs) {
            auto* w16 = static_cast<uint16_t*>(bp);
            for (int g = 0; g < 3; ++g)
              pack_w_bf16_group(a, n0 + g * 16, k0, round_up(kc, 32), w16 + g * 32, 2 * kWpNR);
            const int64_t np = ceil_div(kc, 2);
            for (int64_t m = mb; m < mb_end; m += kWpMR) {
              const int mr = static_cast<int>(std::min<int64_t>(kWpMR, mb_end - m));
              wp_bf16_micro(mr, static_cast<const uint32_t*>(xp) + (m - mb) * np, w16, np,
                            c + m * kWpNR, !first, last, a, m, n0);
            }
          } else {
            pack_w_f32(a, n0, k0, kc, static_cast<float*>(bp));
            for (int64_t m = mb; m < mb_end; m += kWpMR) {
              const int mr = static_cast<int>(std::min<int64_t>(kWpMR, mb_end - m));
              wp_f32_micro(mr, static_cast<const float*>(xp) + (m - mb) * kc,
                           static_cast<const float*>(bp), kc, c + m * kWpNR, !first, last, a, m,
                           n0);
            }
          }
        }
      }
    }
    t0 += p_end - p_begin;
  }
}

// x rows (ldx), every column of out: float32 FMA on float32, bfloat16 or float16 x (all exact in
// float32), or with kPairs vdpbf16ps on bfloat16 x.
template <bool kPairs, typename T>
void wo_gemm_panels(const T* x, int64_t ldx, const WoArgs& a) {
  const int64_t panels = ceil_div(a.N, kWpNR);
  const int64_t mc = m_chunk_rows(a.M, panels, kWpMR), mchunks = ceil_div(a.M, mc);
  const int64_t kc = kPairs ? 2 * kWpKC : kWpKC;
  at::Tensor acc_t = at::empty({a.K > kc ? panels * a.M * kWpNR + 16 : 16}, at::kFloat);
  float* acc = acc_t.data_ptr<float>();
  acc += (16 - (reinterpret_cast<uintptr_t>(acc) / sizeof(float)) % 16) % 16;  // 64-byte aligned
  at::parallel_for(0, panels * mchunks, 1, [&](int64_t t0, int64_t t1) {
    wo_panel_tasks<kPairs, T>(t0, t1, x, ldx, a, mc, panels, acc);
  });
}
#endif  // FASTATTN_X86

// ------------------------------------------------------------------------------------------------
// argument checks shared by the ops
// ------------------------------------------------------------------------------------------------
at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.stride(-1) == 1 || t.size(-1) <= 1) ? t : t.contiguous();
}

at::Tensor float_vector(const std::optional<at::Tensor>& t, int64_t n, const char* op,
                        const char* name) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(t->is_floating_point(), op, ": ", name, " must be a floating-point tensor, got ",
              t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, op, ": ", name, " must have shape (", n,
              ",), got ", t->sizes());
  return t->to(at::kFloat).contiguous();
}

// ------------------------------------------------------------------------------------------------
// ops
// ------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2, "quantize_per_token: x must be 2-D (M, K), got ", x_in.sizes());
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "quantize_per_token: x must be float32, bfloat16 or float16, got ", dt);
  const at::Tensor x = rows_contiguous(x_in);
  const int64_t M = x.size(0), K = x.size(1), ldx = x.stride(0);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kParallelQuantElems / std::max<int64_t>(1, K));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "quantize_per_token", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
#ifdef FASTATTN_X86
    if (use_avx512(cpu_isa())) {
      at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
        quantize_rows_avx512<scalar_t>(xp, ldx, m0, m1, K, qp, sp);
      });
      return;
    }
#endif
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const scalar_t* row = xp + m * ldx;
        float absmax = 0.0f;
        bool nan = false;
        for (int64_t k = 0; k < K; ++k) {
          const float v = static_cast<float>(row[k]);
          nan |= std::isnan(v);
          absmax = std::max(absmax, std::fabs(v));
        }
        if (nan) absmax = std::numeric_limits<float>::quiet_NaN();
        const float inv = inverse_scale(absmax);
        sp[m] = absmax / 127.0f;
        for (int64_t k = 0; k < K; ++k) {
          float y = std::nearbyint(static_cast<float>(row[k]) * inv);  // round half to even
          y = std::isnan(y) ? 0.0f : std::min(127.0f, std::max(-127.0f, y));
          qp[m * K + k] = static_cast<int8_t>(y);
        }
      }
    });
  });
  return {q, scale};
}

at::Tensor int8_gemm_cpu(const at::Tensor& a_in, const at::Tensor& b_in,
                         const std::optional<at::Tensor>& a_scale_in,
                         const std::optional<at::Tensor>& b_scale_in,
                         const std::optional<at::Tensor>& bias_in,
                         std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2, "int8_gemm: a (M, K) and b (N, K) must be 2-D, "
              "got a ", a_in.sizes(), " and b ", b_in.sizes());
  TORCH_CHECK(a_in.scalar_type() == at::kChar, "int8_gemm: a must be int8, got ", a_in.scalar_type());
  TORCH_CHECK(b_in.scalar_type() == at::kChar, "int8_gemm: b must be int8, got ", b_in.scalar_type());
  TORCH_CHECK(a_in.size(1) == b_in.size(1), "int8_gemm: a.shape[1] (", a_in.size(1),
              ") must equal b.shape[1] (", b_in.size(1), ")");
  TORCH_CHECK(a_in.device().is_cpu() && b_in.device().is_cpu(), "int8_gemm: CPU tensors expected");
  const int64_t M = a_in.size(0), N = b_in.size(0), K = a_in.size(1);
  const at::Tensor a_scale = float_vector(a_scale_in, M, "int8_gemm", "a_scale");
  const at::Tensor b_scale = float_vector(b_scale_in, N, "int8_gemm", "b_scale");
  const at::Tensor bias = float_vector(bias_in, N, "int8_gemm", "bias");
  const bool dequant = a_scale.defined() || b_scale.defined();
  at::ScalarType dtype = at::kInt;
  if (dequant) {
    dtype = out_dtype.value_or(at::kFloat);
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "int8_gemm: out_dtype must be float32, bfloat16 or float16, got ", dtype);
  } else {
    TORCH_CHECK(!bias.defined(), "int8_gemm: bias needs a_scale and/or b_scale (without scales "
                "the result is the raw int32 accumulator)");
    TORCH_CHECK(!out_dtype.has_value() || *out_dtype == at::kInt, "int8_gemm: without scales the "
                "result is int32; out_dtype must be None or torch.int32, got ", *out_dtype);
  }
  at::Tensor out = at::empty({M, N}, a_in.options().dtype(dtype));
  if (M == 0 || N == 0) return out;
  const at::Tensor a = rows_contiguous(a_in), b = rows_contiguous(b_in);
  Epilogue ep;
  ep.out = out.data_ptr();
  ep.ldo = N;
  ep.dtype = dtype;
  ep.a_scale = a_scale.defined() ? a_scale.const_data_ptr<float>() : nullptr;
  ep.b_scale = b_scale.defined() ? b_scale.const_data_ptr<float>() : nullptr;
  ep.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const int8_t* ap = a.const_data_ptr<int8_t>();
  const int8_t* bp = b.const_data_ptr<int8_t>();
  const GemmPath path = K == 0 ? GemmPath::kScalar : gemm_path(cpu_isa());
#ifdef FASTATTN_X86
  const int64_t dot_max = dot_max_m(path, K);
  if (path != GemmPath::kScalar && M <= dot_max) {
    gemm_dot(ap, a.stride(0), bp, b.stride(0), M, N, K, ep);
    return out;
  }
  if (path == GemmPath::kAmx) {
    gemm_amx(ap, a.stride(0), bp, b.stride(0), M, N, K, ep);
    return out;
  }
  if (path == GemmPath::kVnni) {
    gemm_vnni(ap, a.stride(0), bp, b.stride(0), M, N, K, ep);
    return out;
  }
#endif
  (void)path;
  gemm_scalar(ap, a.stride(0), bp, b.stride(0), M, N, K, ep);
  return out;
}

// ------------------------------------------------------------------------------------------------
// The weight-streaming loop for few rows of x (decoding): out (M, N) (float32, or x's dtype,
// rounded once) = (x w^T) * scale + bias, x float32 rows, w int8 (weight-only linear, scale per row of w) or float
// (linear, scale null). Rows of w are the parallel axis, each read once from memory per call and
// from L1 for the next rows of x; the AVX-512 or AVX2 dot kernels above, a scalar loop elsewhere.
// ------------------------------------------------------------------------------------------------
template <typename W, typename X = float, typename O = float>
void stream_rows(const X* xp, int64_t ldx, const W* wp, int64_t ldw, const float* sp,
                 const float* bp, int64_t M, int64_t N, int64_t K, O* op_, Isa isa) {
  // bfloat16 rows of x go with bfloat16 w on AVX512-BF16 only (the caller's choice)
  constexpr bool kDpbf16 = std::is_same_v<X, at::BFloat16>;
  static_assert(!kDpbf16 || std::is_same_v<W, at::BFloat16>);
  constexpr int64_t kNB = 16;  // rows of w per task
  const int64_t grain =
      std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, kNB * K * int64_t(sizeof(W))));
  const bool simd = use_avx512(isa);
#ifdef FASTATTN_X86
  const bool avx2 = !kDpbf16 && !simd && isa >= Isa::avx2;
#else
  const bool avx2 = false;
#endif
  const int64_t pf_groups = prefetch_groups(K, sizeof(W));
  at::parallel_for(0, ceil_div(N, kNB), grain, [&](int64_t t0, int64_t t1) {
    const int64_t n_stop = std::min(N, t1 * kNB);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n_end = std::min(N, (t + 1) * kNB);
      for (int64_t n = t * kNB; n < n_end; n += kWoN) {
        const int nr = static_cast<int>(std::min<int64_t>(kWoN, n_end - n));
#ifdef FASTATTN_X86
        if (simd || avx2) prefetch_rows(wp, ldw, n + pf_groups * kWoN, kWoN, n_stop, K);
#endif
        for (int64_t m = 0; m < M; m += kWoM) {
          const int mr = static_cast<int>(std::min<int64_t>(kWoM, M - m));
          float dots[kWoM * kWoN];
#ifdef FASTATTN_X86
          if (simd) {
            if constexpr (kDpbf16) {
              dpbf16_micro(mr, nr, xp + m * ldx, ldx, wp + n * ldw, ldw, K, dots);
            } else {
              wo_micro(mr, nr, xp + m * ldx, ldx, wp + n * ldw, ldw, K, dots);
            }
          } else if (avx2) {
            // (double w never gets here: fastattn.linear sends float64 to at::linear)
            if constexpr (!kDpbf16 && !std::is_same_v<W, double>)
              wo_micro_avx2(mr, nr, xp + m * ldx, ldx, wp + n * ldw, ldw, K, dots);
          } else
#endif
          {
            for (int i = 0; i < mr; ++i)
              for (int j = 0; j < nr; ++j) {
                float s = 0.0f;
                for (int64_t k = 0; k < K; ++k)
                  s += static_cast<float>(xp[(m + i) * ldx + k]) *
                       static_cast<float>(wp[(n + j) * ldw + k]);
                dots[i * nr + j] = s;
              }
          }
          for (int i = 0; i < mr; ++i)
            for (int j = 0; j < nr; ++j) {
              float v = dots[i * nr + j];
              if (sp) v = v * sp[n + j];
              if (bp) v = v + bp[n + j];
              op_[(m + i) * N + n + j] = static_cast<O>(v);  // rounded as Tensor.copy_ rounds
            }
        }
      }
    }
  });
  (void)simd;
  (void)avx2;
}

// x's (M, K) rows as float32 with row stride K: x's own data when it is float32 with unit inner
// stride, else converted into buf. (Tensor::to here cost ~5-7 us per call through the
// dispatcher, as much as a 576 x 576 int8 GEMV.)
inline const float* float_rows(const at::Tensor& x, Scratch& buf, int64_t* ldx) {
  const int64_t M = x.size(0), K = x.size(1);
  if (x.scalar_type() == at::kFloat && (K <= 1 || x.stride(1) == 1)) {
    *ldx = x.stride(0);
    return x.const_data_ptr<float>();
  }
  float* dst = buf.get<float>(M * K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "float_rows", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k)
        dst[m * K + k] = static_cast<float>(src[m * x.stride(0) + k * x.stride(1)]);
  });
  *ldx = K;
  return dst;
}

// stream_rows into out (M, N) of x's dtype (float32 / bfloat16 / float16)
template <typename W, typename X = float>
void stream_rows_into(const at::Tensor& out, const X* xp, int64_t ldx, const W* wp, int64_t ldw,
                      const float* sp, const float* bp, int64_t M, int64_t N, int64_t K, Isa isa) {
  switch (out.scalar_type()) {
    case at::kBFloat16:
      stream_rows(xp, ldx, wp, ldw, sp, bp, M, N, K, out.mutable_data_ptr<at::BFloat16>(), isa);
      break;
    case at::kHalf:
      stream_rows(xp, ldx, wp, ldw, sp, bp, M, N, K, out.mutable_data_ptr<at::Half>(), isa);
      break;
    default:
      stream_rows(xp, ldx, wp, ldw, sp, bp, M, N, K, out.mutable_data_ptr<float>(), isa);
  }
}

// ------------------------------------------------------------------------------------------------
// weight-only linear, M <= kWoSplitMaxM on VNNI CPUs: x split into int8 parts, one vpdpbusd per
// 64 weights and part.
//
// The FMA kernel above widens every weight (sign-extend, int -> float) before its FMA: three
// vector ops per 16 weights. On Zen 4, whose 512-bit ops run on 256-bit units, that bounds M = 1
// at ~7.5 GB/s of w per core, about half of what the memory delivers per core (SmolLM2-135M's
// 576 x 1536 matrices from DRAM, 1 thread). Here each row of x is written as P int8 parts,
//   x = s_1 q_1 + ... + s_P q_P + r,  s_1 = absmax / 127,  s_(p+1) = s_p / 254,  |q_p| <= 127,
// |r| <= s_P / 2: absmax * 6.1e-8 for P = 3 (float32 x: half an ulp of the largest element),
// absmax * 1.5e-5 for P = 2 (bfloat16 / float16 x, whose own rounding is 2^-9 / 2^-12), and
// w . x = sum_p s_p (w . q_p) + w . r with every w . q_p exact in int32: vpdpbusd multiplies
// u8 by s8, so w enters with its sign bit flipped (w + 128) and 128 * sum(q_p) is subtracted.
// One instruction covers 64 weights of a part.
// ------------------------------------------------------------------------------------------------
constexpr int64_t kWoSplitMaxM = 16;
// int32 lanes stay exact: each lane adds K / 16 products of |q + 128| <= 255 and |w| <= 128
constexpr int64_t kWoSplitMaxK = int64_t(1) << 15;

#ifdef FASTATTN_X86
inline __mmask64 tail_mask64(int64_t count) {
  return count >= 64 ? ~__mmask64(0) : (__mmask64(1) << count) - 1;
}

// Row x[0..K) as P int8 parts q_p at q[p * Kp + k] (zero in [K, Kp)), s[p] = s_p and
// qsum[p] = sum_k q_p[k]. False when the row is not finite (the caller runs the FMA kernel: inf
// and NaN propagate as the reference's products do).
template <int P, typename T>
FA_TARGET_AVX512 bool split_row(const T* x, int64_t K, int64_t Kp, int8_t* q, double* s,
                                int64_t* qsum) {
  __m512 vmax = _mm512_setzero_ps(), vsum = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 v = _mm512_abs_ps(load_f32x16(x + k, tail_mask16(K - k)));
    vmax = _mm512_max_ps(vmax, v);
    vsum = _mm512_add_ps(vsum, v);  // inf or NaN when an element is (max_ps drops NaN)
  }
  const float absmax = _mm512_reduce_max_ps(vmax);
  if (!std::isfinite(_mm512_reduce_add_ps(vsum))) return false;
  float sp[P], inv[P];
  sp[0] = absmax / 127.0f;
  for (int p = 1; p < P; ++p) sp[p] = sp[p - 1] / 254.0f;
  for (int p = 0; p < P; ++p) {
    inv[p] = sp[p] > 0.0f ? 1.0f / sp[p] : 0.0f;
    s[p] = sp[p];
  }
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  __m512i sums[P];
  FA_UNROLL for (int p = 0; p < P; ++p) sums[p] = _mm512_setzero_si512();
  for (int64_t k = 0; k < Kp; k += 16) {
    const __mmask16 mask = tail_mask16(std::max<int64_t>(0, K - k));
    __m512 r = load_f32x16(x + k, mask);
    FA_UNROLL for (int p = 0; p < P; ++p) {
      __m512 qf = _mm512_roundscale_ps(_mm512_mul_ps(r, _mm512_set1_ps(inv[p])),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      qf = _mm512_min_ps(_mm512_max_ps(qf, lo), hi);
      r = _mm512_fnmadd_ps(qf, _mm512_set1_ps(sp[p]), r);  // the remainder, rounded once
      const __m512i qi = _mm512_cvtps_epi32(qf);
      sums[p] = _mm512_add_epi32(sums[p], qi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + p * Kp + k), _mm512_cvtepi32_epi8(qi));
    }
  }
  FA_UNROLL for (int p = 0; p < P; ++p) qsum[p] = _mm512_reduce_add_epi32(sums[p]);
  return true;
}

// acc[p * NR + j] = sum_k (w[j][k] + 128) * q_p[k]: w made unsigned by flipping its sign bit
// (vpdpbusd takes u8 x s8), the 128 * sum_k q_p[k] this adds is taken off by the caller (a
// property of x, computed once per call). The loop body stays in this function: passed to a
// helper by reference, GCC copied every accumulator twice per iteration.
template <int P, int NR>
FA_TARGET_VNNI void split_tile(const int8_t* q, int64_t Kp, const int8_t* w, int64_t ldw,
                               int64_t K, int32_t* acc) {
  __m512i a[P][NR];
  FA_UNROLL for (int p = 0; p < P; ++p)
    FA_UNROLL for (int j = 0; j < NR; ++j) a[p][j] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = tail_mask64(K - k);
    __m512i wv[NR];
    FA_UNROLL for (int j = 0; j < NR; ++j)
      wv[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + j * ldw + k), flip);
    FA_UNROLL for (int p = 0; p < P; ++p) {
      const __m512i xv = _mm512_maskz_loadu_epi8(mask, q + p * Kp + k);
      FA_UNROLL for (int j = 0; j < NR; ++j) a[p][j] = _mm512_dpbusd_epi32(a[p][j], wv[j], xv);
    }
  }
  FA_UNROLL for (int p = 0; p < P; ++p)
    FA_UNROLL for (int j = 0; j < NR; ++j) acc[p * NR + j] = _mm512_reduce_add_epi32(a[p][j]);
}

template <int P>
FA_TARGET_VNNI void split_tile_nr(int nr, const int8_t* q, int64_t Kp, const int8_t* w,
                                  int64_t ldw, int64_t K, int32_t* acc) {
  switch (nr) {
    case 1: split_tile<P, 1>(q, Kp, w, ldw, K, acc); break;
    case 2: split_tile<P, 2>(q, Kp, w, ldw, K, acc); break;
    case 3: split_tile<P, 3>(q, Kp, w, ldw, K, acc); break;
    default: split_tile<P, kWoN>(q, Kp, w, ldw, K, acc); break;
  }
}

// out (M, N) float32 = x w^T * scale + bias through the split; false (nothing written) when a row
// of x is not finite.
template <int P, typename T>
bool wo_split_gemv(const T* x, int64_t ldx, const int8_t* w, int64_t ldw, const float* scale,
                   const float* bias, int64_t M, int64_t N, int64_t K, float* out) {
  const int64_t Kp = round_up(K, 64);
  // 64-byte aligned: a part's 64-byte loads would otherwise each span two cache lines
  Scratch qbuf;
  int8_t* q = qbuf.get<int8_t>(M * P * Kp);
  std::vector<double> sbuf(static_cast<size_t>(M * P));
  std::vector<int64_t> qsum(static_cast<size_t>(M * P));
  for (int64_t m = 0; m < M; ++m)
    if (!split_row<P>(x + m * ldx, K, Kp, q + m * P * Kp, sbuf.data() + m * P,
                      qsum.data() + m * P))
      return false;
  const double* s = sbuf.data();
  const int64_t* qs = qsum.data();
  constexpr int64_t kNB = 16;  // rows of w per task
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, kNB * K));
  at::parallel_for(0, ceil_div(N, kNB), grain, [&](int64_t t0, int64_t t1) {
    const int64_t n_stop = std::min(N, t1 * kNB);
    for (int64_t n = t0 * kNB; n < n_stop; n += kWoN) {
      const int nr = static_cast<int>(std::min<int64_t>(kWoN, n_stop - n));
      prefetch_rows(w, ldw, n + prefetch_groups(K, sizeof(int8_t)) * kWoN, kWoN, n_stop, K);
      int32_t acc[P * kWoN];
      for (int64_t m = 0; m < M; ++m) {
        split_tile_nr<P>(nr, q + m * P * Kp, Kp, w + n * ldw, ldw, K, acc);
        for (int j = 0; j < nr; ++j) {
          double dot = 0.0;
          for (int p = 0; p < P; ++p)
            dot += s[m * P + p] * static_cast<double>(static_cast<int64_t>(acc[p * nr + j]) -
                                                      128 * qs[m * P + p]);
          float v = static_cast<float>(dot) * scale[n + j];
          if (bias) v = v + bias[n + j];
          out[m * N + n + j] = v;
        }
      }
    }
  });
  return true;
}
#endif

// bf16_products (int8_weight_only_linear_bf16): float32 x of kWpMinM rows or more is rounded to
// bfloat16 for the products on CPUs that multiply bfloat16 natively (AMX-BF16 tiles, vdpbf16ps),
// float32 accumulation and output; every other call is exactly int8_weight_only_linear.
at::Tensor weight_only_linear(const at::Tensor& x_nd, const at::Tensor& w_in,
                              const at::Tensor& w_scale_in,
                              const std::optional<at::Tensor>& bias_in, bool bf16_products) {
  const char* op = bf16_products ? "int8_weight_only_linear_bf16" : "int8_weight_only_linear";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal tensors need no tracking
  fastattn::checks::check_int8_linear(
      bf16_products ? "fastattn.int8_weight_only_linear_bf16" : "fastattn.int8_weight_only_linear",
      x_nd, w_in, w_scale_in, bias_in);
  const auto dt = x_nd.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(x_nd.device().is_cpu() && w_in.device().is_cpu(), op, ": CPU tensors expected");
  const at::Tensor x_in = fastattn::checks::as_rows(x_nd, 1, x_nd.size(-1));  // (M, K)
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w_in.size(0);
  const at::Tensor w_scale = float_vector(w_scale_in, N, op, "w_scale");
  const at::Tensor bias = float_vector(bias_in, N, op, "bias");
  std::vector<int64_t> out_shape(x_nd.sizes().begin(), x_nd.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x_in.options());
  if (M == 0 || N == 0) return out;
  const at::Tensor w = rows_contiguous(w_in);
  const Isa isa = cpu_isa();
#ifdef FASTATTN_X86
  // float32 x rounded to bfloat16 (one pass over x, small here) for the bfloat16 kernels below;
  // the output stays float32
  const bool to_bf16 =
      bf16_products && dt == at::kFloat && M >= kWpMinM && K > 0 && isa >= Isa::avx512_bf16;
  const bool bf16_x = dt == at::kBFloat16 || to_bf16;
  const bool amx = bf16_x && M >= kWaMinM && K > 0 && isa >= Isa::amx;
  if (amx || (M >= kWpMinM && K > 0 && use_avx512(isa))) {
    const at::Tensor xr = to_bf16 ? x_in.to(at::kBFloat16).contiguous() : rows_contiguous(x_in);
    const WoArgs args{w.const_data_ptr<int8_t>(), w.stride(0), w_scale.const_data_ptr<float>(),
                      bias.defined() ? bias.const_data_ptr<float>() : nullptr, out.data_ptr(), N,
                      dt, M, N, K};
    if (amx) {
      wo_gemm_amx(xr.const_data_ptr<at::BFloat16>(), xr.stride(0), args);
    } else if (bf16_x && isa >= Isa::avx512_bf16) {
      wo_gemm_panels<true>(xr.const_data_ptr<at::BFloat16>(), xr.stride(0), args);
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "int8_weight_only_linear", [&] {
        wo_gemm_panels<false>(xr.const_data_ptr<scalar_t>(), xr.stride(0), args);
      });
    }
    return out;
  }
#endif
#ifdef FASTATTN_X86
  if (M <= kWoSplitMaxM && K > 0 && K <= kWoSplitMaxK && isa >= Isa::avx512_vnni) {
    const at::Tensor xr = rows_contiguous(x_in);
    at::Tensor acc = dt == at::kFloat ? out.view({M, N})
                                      : at::empty({M, N}, x_in.options().dtype(at::kFloat));
    const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
    bool done = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "int8_weight_only_linear", [&] {
      // float32 x: three parts (below its own rounding); bfloat16 / float16: two
      constexpr int P = std::is_same_v<scalar_t, float> ? 3 : 2;
      done = wo_split_gemv<P>(xr.const_data_ptr<scalar_t>(), xr.stride(0),
                              w.const_data_ptr<int8_t>(), w.stride(0),
                              w_scale.const_data_ptr<float>(), bp, M, N, K, acc.data_ptr<float>());
    });
    if (done) {
      if (dt != at::kFloat) out.view({M, N}).copy_(acc);
      return out;
    }
  }
#endif
  Scratch xbuf;
  int64_t ldx = 0;
  const float* xf = float_rows(x_in, xbuf, &ldx);  // float32 rows: x is small here
  stream_rows_into(out.view({M, N}), xf, ldx, w.const_data_ptr<int8_t>(), w.stride(0),
                   w_scale.const_data_ptr<float>(),
                   bias.defined() ? bias.const_data_ptr<float>() : nullptr, M, N, K, isa);
  return out;
}

at::Tensor int8_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& w,
                                       const at::Tensor& w_scale,
                                       const std::optional<at::Tensor>& bias) {
  return weight_only_linear(x, w, w_scale, bias, false);
}

at::Tensor int8_weight_only_linear_bf16_cpu(const at::Tensor& x, const at::Tensor& w,
                                            const at::Tensor& w_scale,
                                            const std::optional<at::Tensor>& bias) {
  return weight_only_linear(x, w, w_scale, bias, true);
}

// Rows of x at or below which fastattn.linear streams the weight (above: a GEMM, float_gemm).
constexpr int64_t kLinearMaxM = 16;

// The GEMM behind fastattn.linear above kLinearMaxM rows. at::linear runs float32 on MKL's
// sgemm, whose fast AVX-512 code is dispatched on Intel CPUs only: on a 2-core AMD EPYC (Zen 4)
// oneDNN's matmul, which PyTorch bundles and registers as mkldnn::_linear_pointwise, ran the
// same float32 GEMMs 1.26-2.0x faster (x (M, K) @ w.T, w (N, K): 3616x384x1152 1.26x,
// 3616x1536x384 1.35x, 128x576x1536 2.0x, 128x576x49152 1.63x; interleaved medians, one run).
// So float32 takes oneDNN's matmul on other vendors' CPUs, at::linear on Intel's; bfloat16 and
// float16 always take at::linear (its bfloat16 GEMM is oneDNN's already: 0.88-1.24x either
// way). FASTATTN_CPU_GEMM=aten|onednn (read per call) overrides the choice; "onednn" where
// PyTorch has no oneDNN falls back to at::linear.
const c10::OperatorHandle* onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op.has_value() ? &*op : nullptr;
}

bool use_onednn(at::ScalarType dt) {
  const char* env = std::getenv("FASTATTN_CPU_GEMM");
  bool want = dt == at::kFloat && !intel_cpu();
  if (env != nullptr && *env != '\0') {
    const std::string v(env);
    TORCH_CHECK(v == "aten" || v == "onednn",
                "FASTATTN_CPU_GEMM must be aten or onednn (or unset); got '", v, "'");
    want = v == "onednn" && (dt == at::kFloat || dt == at::kBFloat16);
  }
  return want && at::globalContext().userEnabledMkldnn() && onednn_linear_op() != nullptr;
}

at::Tensor float_gemm(const at::Tensor& x_nd, const at::Tensor& w,
                      const std::optional<at::Tensor>& bias) {
  const int64_t K = x_nd.size(-1), N = w.size(0);
  if (!(K > 0 && N > 0 && x_nd.numel() > 0 && use_onednn(x_nd.scalar_type())))
    return at::linear(x_nd, w, bias);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  std::vector<int64_t> out_shape(x_nd.sizes().begin(), x_nd.sizes().end());
  out_shape.back() = N;
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x_nd.reshape({-1, K}).contiguous());  // (M, K)
  stack.emplace_back(w.contiguous());
  stack.emplace_back(bias.has_value() ? c10::IValue(bias->contiguous()) : c10::IValue());
  stack.emplace_back(std::string("none"));  // no post-op
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  onednn_linear_op()->callBoxed(&stack);
  return stack[0].toTensor().view(out_shape);  // (M, N) contiguous
}

at::Tensor linear_cpu(const at::Tensor& x_nd, const at::Tensor& w_in,
                      const std::optional<at::Tensor>& bias_in) {
  fastattn::checks::check_linear(x_nd, w_in, bias_in);
  const auto dt = x_nd.scalar_type();
  const int64_t K = x_nd.size(-1), N = w_in.size(0);
  const int64_t M = K > 0 ? x_nd.numel() / K : 0;
  const Isa isa = cpu_isa();
  if (!(M >= 1 && M <= kLinearMaxM && K > 0 && N > 0 && dt != at::kDouble && isa >= Isa::avx2))
    return float_gemm(x_nd, w_in, bias_in);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal tensors need no tracking
  const at::Tensor x_in = fastattn::checks::as_rows(x_nd, 1, K);  // (M, K)
  std::vector<int64_t> out_shape(x_nd.sizes().begin(), x_nd.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x_in.options());
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous().to(at::kFloat) : at::Tensor();
  const at::Tensor out2 = out.view({M, N});
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const at::Tensor w = rows_contiguous(w_in);
#ifdef FASTATTN_X86
  if (dt == at::kBFloat16 && isa >= Isa::avx512_bf16) {
    const at::Tensor xr = rows_contiguous(x_in);
    stream_rows_into(out2, xr.const_data_ptr<at::BFloat16>(), xr.stride(0),
                     w.const_data_ptr<at::BFloat16>(), w.stride(0), nullptr, bp, M, N, K, isa);
    return out;
  }
#endif
  Scratch xbuf;
  int64_t ldx = 0;
  const float* xf = float_rows(x_in, xbuf, &ldx);  // float32 rows: x is small here
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "linear", [&] {
    stream_rows_into(out2, xf, ldx, w.const_data_ptr<scalar_t>(), w.stride(0), nullptr, bp, M, N,
                     K, isa);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("quantize_per_token", &quantize_per_token_cpu);
  m.impl("int8_gemm", &int8_gemm_cpu);
  m.impl("int8_weight_only_linear", &int8_weight_only_linear_cpu);
  m.impl("int8_weight_only_linear_bf16", &int8_weight_only_linear_bf16_cpu);
}
