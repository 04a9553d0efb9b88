// Pieces shared by the attention kernels: compile-time dispatch over head-dim buckets and
// element types, the visibility rule, and the global -> shared tile loaders.
#pragma once

#include <type_traits>

#include "attention.h"
#include "common.cuh"
#include "launch_params.h"

// Bit i enables kHeadDimBuckets[i]. The package build compiles all of them; the compile check in
// tests/test_cuda_build.py may restrict the set to keep CI fast.
#ifndef FASTATTN_HEAD_DIM_MASK
#define FASTATTN_HEAD_DIM_MASK 0xFF
#endif

namespace fastattn::cuda {

constexpr int head_dim_index(int bucket) {
  for (int i = 0; i < 8; ++i) {
    if (kHeadDimBuckets[i] == bucket) return i;
  }
  return -1;
}

template <int kDim, class F>
inline cudaError_t call_with_head_dim(F& f) {
  if constexpr (((FASTATTN_HEAD_DIM_MASK >> head_dim_index(kDim)) & 1) != 0) {
    return f(std::integral_constant<int, kDim>());
  } else {
    return cudaErrorNotSupported;  // compiled out of this (test) build
  }
}

// f(std::integral_constant<int, D>) for the bucket D of head_dim.
template <class F>
inline cudaError_t dispatch_head_dim(int head_dim, F&& f) {
  switch (head_dim_bucket(head_dim)) {
    case 32:
      return call_with_head_dim<32>(f);
    case 64:
      return call_with_head_dim<64>(f);
    case 96:
      return call_with_head_dim<96>(f);
    case 128:
      return call_with_head_dim<128>(f);
    case 160:
      return call_with_head_dim<160>(f);
    case 192:
      return call_with_head_dim<192>(f);
    case 224:
      return call_with_head_dim<224>(f);
    case 256:
      return call_with_head_dim<256>(f);
    default:
      return cudaErrorInvalidValue;
  }
}

// Key j is visible to query i iff lo_rel <= j - i <= hi_rel (and j < S). Unbounded sides and
// out-of-range windows are clamped to [-(L + 1), S + 1], where they are always / never met, so
// the kernels do plain int32 arithmetic.
struct VisibleRange {
  int lo_rel, hi_rel;
};

constexpr VisibleRange visible_range(int64_t window_left, int64_t window_right, int64_t diag,
                                     int len_q, int len_k) {
  const int64_t floor_ = -(int64_t(len_q) + 1), ceil_ = int64_t(len_k) + 1;
  int64_t lo = window_left < 0 ? floor_ : diag - window_left;
  int64_t hi = window_right < 0 ? ceil_ : diag + window_right;
  lo = lo < floor_ ? floor_ : (lo > ceil_ ? ceil_ : lo);
  hi = hi < floor_ ? floor_ : (hi > ceil_ ? ceil_ : hi);
  return {int(lo), int(hi)};
}

// Sizes every attention launcher refuses (grid dims y/z are limited to 65535 blocks, and the
// kernels index rows and keys in int32 with headroom); empty problems are handled before.
inline bool attn_sizes_ok(const AttnProblem& p) {
  return p.kv_heads > 0 && p.heads % p.kv_heads == 0 && p.batch <= 65535 && p.heads <= 65535 &&
         p.len_q >= 0 && p.len_q < (1 << 30) && p.len_k >= 0 && p.len_k < (1 << 30);
}

// What the forward and backward kernels derive from AttnProblem on the host: the visibility
// range, the scale in base 2 (their softmax runs in base 2) and whether q, k, v can be read in
// 16-byte chunks.
struct AttnArgs {
  int lo_rel, hi_rel;  // visibility, see VisibleRange
  float scale_log2;
  bool vec_q, vec_k, vec_v;
};

inline AttnArgs attn_args(const AttnProblem& p, DType dtype) {
  const VisibleRange vr =
      visible_range(p.window_left, p.window_right, p.diag_offset, p.len_q, p.len_k);
  const int es = dtype_bytes(dtype);
  AttnArgs a;
  a.lo_rel = vr.lo_rel;
  a.hi_rel = vr.hi_rel;
  a.scale_log2 = p.scale * kLog2e;
  a.vec_q = vec_ok(p.q, es, p.q_stride_b, p.q_stride_h, p.q_stride_l);
  a.vec_k = vec_ok(p.k, es, p.k_stride_b, p.k_stride_h, p.k_stride_s);
  a.vec_v = vec_ok(p.v, es, p.v_stride_b, p.v_stride_h, p.v_stride_s);
  return a;
}

// The rows of one program's sequence: all of them, or with packed variable-length sequences
// (kVarlen) those of sequence b, read from cu_seqlens and clamped into the packed tensors and
// the maximum lengths, with its own visibility range (its diagonal depends on its lengths).
struct SeqSpan {
  int64_t q0, k0;  // first row of the sequence in q (out, lse, ...) and in k (v, ...)
  int len_q, len_k;
  int lo_rel, hi_rel;
};

template <bool kVarlen>
FA_DEVICE SeqSpan seq_span(const AttnProblem& p, const AttnArgs& a, int b) {
  if constexpr (!kVarlen) {
    return {0, 0, p.len_q, p.len_k, a.lo_rel, a.hi_rel};
  } else {
    auto clamp = [](int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); };
    const int64_t q0 = clamp(p.cu_seqlens_q[b], 0, p.total_q);
    const int64_t q1 = clamp(p.cu_seqlens_q[b + 1], q0, p.total_q);
    const int64_t k0 = clamp(p.cu_seqlens_k[b], 0, p.total_k);
    const int64_t k1 = clamp(p.cu_seqlens_k[b + 1], k0, p.total_k);
    const int len_q = int(q1 - q0 < p.len_q ? q1 - q0 : p.len_q);
    const int len_k = int(k1 - k0 < p.len_k ? k1 - k0 : p.len_k);
    const VisibleRange vr =
        visible_range(p.window_left, p.window_right,
                      p.bottom_right ? int64_t(len_k) - len_q : p.diag_offset, len_q, len_k);
    return {q0, k0, len_q, len_k, vr.lo_rel, vr.hi_rel};
  }
}

// An output written in 16-byte chunks also needs rows of whole chunks (cols elements each).
inline bool vec_store_ok(const void* base, int elem_bytes, int64_t s0, int64_t s1, int64_t s2,
                         int cols) {
  return vec_ok(base, elem_bytes, s0, s1, s2) && cols % (16 / elem_bytes) == 0;
}

// f(TypeTag<T>, std::integral_constant<int, D>) for the element type of dtype and the bucket D
// of head_dim.
template <class F>
inline cudaError_t dispatch_dtype_head_dim(DType dtype, int head_dim, F&& f) {
  return dispatch_dtype(dtype, [&](auto tag) {
    return dispatch_head_dim(head_dim, [&](auto hd) { return f(tag, hd); });
  });
}

// One key chunk of the online softmax of a row whose scores (base 2, -inf where not visible) lie
// a key per lane, as in the SIMT kernels: updates the running max and sum, rescales the row's
// accumulator and returns this lane's probability against the new max, for P V.
template <int kCols>
FA_DEVICE float online_softmax_chunk(float s, float& row_max, float& row_sum,
                                     float (&acc)[kCols]) {
  const float mx = max_f(row_max, warp_max(s));
  const float m_use = mx == kNegInf ? 0.0f : mx;  // no visible key yet: keep 2^(-inf - 0) = 0
  const float alpha = exp2_approx(row_max - m_use);
  const float pr = exp2_approx(s - m_use);
  row_max = mx;
  row_sum = row_sum * alpha + warp_sum(pr);
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] *= alpha;
  return pr;
}

// Copies a kRows x kCols tile of a row-major matrix (row stride `stride` elements; the first
// rows_valid rows and cols_valid columns are real) into shared memory with row pitch kPitch,
// zero-filling the rest. cp.async in 16-byte chunks when the source is 16-byte aligned (a partial
// last chunk uses cp.async's zero-fill), else synchronous element copies.
template <int kRows, int kCols, int kPitch, int kThreads, class T>
FA_DEVICE void load_tile_async(T* smem, const T* gmem, int64_t stride, int rows_valid,
                               int cols_valid, bool vec, int tid) {
  constexpr int kVec = 16 / int(sizeof(T));
  static_assert(kCols % kVec == 0 && kPitch % kVec == 0, "whole 16-byte chunks");
  constexpr int kChunks = kCols / kVec;
  constexpr int kTotal = kRows * kChunks;
  constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int c = tid + it * kThreads;
    if (kTotal % kThreads != 0 && c >= kTotal) break;
    const int r = c / kChunks;
    const int col = (c % kChunks) * kVec;
    T* dst = smem + r * kPitch + col;
    int n = cols_valid - col;
    n = n < kVec ? n : kVec;
    if (r >= rows_valid || n <= 0) {
      store16(dst, uint4{0u, 0u, 0u, 0u});
      continue;
    }
    const T* src = gmem + int64_t(r) * stride + col;
    if (vec) {
      cp_async_16(dst, src, n * int(sizeof(T)));
    } else {
      T tmp[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        if (e < n) {
          tmp[e] = src[e];
        } else {
          __builtin_memset(static_cast<void*>(&tmp[e]), 0, sizeof(T));
        }
      }
      uint4 u;
      __builtin_memcpy(&u, tmp, 16);
      store16(dst, u);
    }
  }
}

// load_tile_async of a tile whose row r starts at row_src(r) (rows gathered through the paged
// KV cache's block table). Its own loop on purpose: load_tile_async written as this function
// with a row-stride functor (or with the chunk copy factored out) makes ptxas spill in the
// sm_90a backward dQ kernel at head dim 64 (128 registers and 20 bytes of spill instead of 163
// registers).
template <int kRows, int kCols, int kPitch, int kThreads, class T, class RowSrc>
FA_DEVICE void load_rows_async(T* smem, const RowSrc& row_src, int rows_valid, int cols_valid,
                               bool vec, int tid) {
  constexpr int kVec = 16 / int(sizeof(T));
  static_assert(kCols % kVec == 0 && kPitch % kVec == 0, "whole 16-byte chunks");
  constexpr int kChunks = kCols / kVec;
  constexpr int kTotal = kRows * kChunks;
  constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int c = tid + it * kThreads;
    if (kTotal % kThreads != 0 && c >= kTotal) break;
    const int r = c / kChunks;
    const int col = (c % kChunks) * kVec;
    T* dst = smem + r * kPitch + col;
    int n = cols_valid - col;
    n = n < kVec ? n : kVec;
    if (r >= rows_valid || n <= 0) {
      store16(dst, uint4{0u, 0u, 0u, 0u});
      continue;
    }
    const T* src = row_src(r) + col;
    if (vec) {
      cp_async_16(dst, src, n * int(sizeof(T)));
    } else {
      T tmp[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        if (e < n) {
          tmp[e] = src[e];
        } else {
          __builtin_memset(static_cast<void*>(&tmp[e]), 0, sizeof(T));
        }
      }
      uint4 u;
      __builtin_memcpy(&u, tmp, 16);
      store16(dst, u);
    }
  }
}

// Float tile copy for the SIMT kernels: element-wise, coalesced along the row, converted to
// float and multiplied by `mul`; zero outside rows_valid x cols_valid.
template <int kRows, int kCols, int kPitch, int kThreads, class T>
FA_DEVICE void load_tile_float(float* smem, const T* gmem, int64_t stride, int rows_valid,
                               int cols_valid, float mul, int tid) {
  constexpr int kTotal = kRows * kCols;
  for (int c = tid; c < kTotal; c += kThreads) {
    const int r = c / kCols;
    const int col = c % kCols;
    float x = 0.0f;
    if (r < rows_valid && col < cols_valid) x = to_float(gmem[int64_t(r) * stride + col]) * mul;
    smem[r * kPitch + col] = x;
  }
}

}  // namespace fastattn::cuda
