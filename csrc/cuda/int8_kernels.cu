// int8 kernels: per-token quantization, the W8A8 GEMM on mma.sync.m16n8k32 (int32 accumulation,
// dequantising epilogue) and the weight-only (W8A16) GEMV-like linear for decoding.
#include "common.cuh"
#include "int8.h"

namespace fastattn::cuda {
namespace detail {

// ---- quantize_per_token ------------------------------------------------------------------------
struct QuantArgs {
  QuantizeParams p;
  bool vec;  // 16-byte loads of x and kVec-byte stores of q
};

FA_DEVICE int8_t quantize(float x, float inv) {
  int q = round_to_int(mul_rn(x, inv));
  q = q < -127 ? -127 : (q > 127 ? 127 : q);
  return int8_t(q);
}

// A warp per row: absmax on the float bit patterns (|x| as an unsigned compare, exact whatever
// the flush-to-zero mode), then a second pass that quantizes.
template <class T>
__global__ void __launch_bounds__(128) quantize_per_token_kernel(const QuantArgs args) {
  constexpr int kVec = 16 / int(sizeof(T));
  const QuantizeParams& p = args.p;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int64_t row = int64_t(blockIdx.x) * 4 + warp;
  if (row >= p.rows) return;  // whole warps
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  int8_t* q = p.q + row * p.q_stride;
  uint32_t m = 0;
  if (args.vec) {
    for (int64_t c = int64_t(lane) * kVec; c < p.cols; c += 32 * kVec) {
      const uint4 u = load16(x + c);
      T v[kVec];
      __builtin_memcpy(static_cast<void*>(v), &u, 16);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const uint32_t a = float_bits(to_float(v[e])) & 0x7fffffffu;
        m = a > m ? a : m;
      }
    }
  } else {
    for (int64_t c = lane; c < p.cols; c += 32) {
      const uint32_t a = float_bits(to_float(x[c])) & 0x7fffffffu;
      m = a > m ? a : m;
    }
  }
  const float absmax = bits_float(warp_max_u32(m));
  const float inv = absmax > 0.0f ? div_rn(127.0f, absmax) : 0.0f;
  if (lane == 0) p.scale[row] = div_rn(absmax, 127.0f);
  if (args.vec) {
    for (int64_t c = int64_t(lane) * kVec; c < p.cols; c += 32 * kVec) {
      const uint4 u = load16(x + c);
      T v[kVec];
      __builtin_memcpy(static_cast<void*>(v), &u, 16);
      int8_t out[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) out[e] = quantize(to_float(v[e]), inv);
      if constexpr (kVec == 8) {
        uint2 w;
        __builtin_memcpy(&w, out, 8);
        *reinterpret_cast<uint2*>(q + c) = w;
      } else {
        uint32_t w;
        __builtin_memcpy(&w, out, 4);
        *reinterpret_cast<uint32_t*>(q + c) = w;
      }
    }
  } else {
    for (int64_t c = lane; c < p.cols; c += 32) q[c] = quantize(to_float(x[c]), inv);
  }
}

// ---- W8A8 GEMM ---------------------------------------------------------------------------------
struct GemmArgs {
  Int8GemmParams p;
  bool vec_a, vec_b;  // 16-byte cp.async of the operands
};

template <class O>
FA_DEVICE void store_out(void* out, int64_t idx, float v) {
  static_cast<O*>(out)[idx] = from_float<O>(v);
}

// A block computes a block_m x block_n tile of C; warps_m x warps_n warps each own a
// (block_m / warps_m) x (block_n / warps_n) sub-tile of m16n8 accumulators. K slices of 64 bytes
// stream through `stages` shared-memory buffers with cp.async (rows padded by 16 bytes so the
// ldmatrix row reads hit distinct banks); tails in M, N, K are zero-filled.
template <int kBM, int kBN, int kWM, int kWN, int kStages, Int8Out kOut>
__global__ void __launch_bounds__(32 * kWM * kWN, 1) int8_gemm_kernel(const GemmArgs args) {
  constexpr int kBK = 64, kPitch = kBK + 16, kThreads = 32 * kWM * kWN;
  constexpr int kWarpM = kBM / kWM, kWarpN = kBN / kWN;
  constexpr int kMT = kWarpM / 16, kNT = kWarpN / 8;
  static_assert(kNT % 2 == 0, "ldmatrix.x4 loads two n-tiles");
  const Int8GemmParams& p = args.p;
  const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t4 = lane & 3;
  const int warp_m = warp / kWN, warp_n = warp % kWN;
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  int8_t* smem = reinterpret_cast<int8_t*>(smem_base());
  auto sA = [&](int s) { return smem + s * (kBM + kBN) * kPitch; };
  auto sB = [&](int s) { return smem + s * (kBM + kBN) * kPitch + kBM * kPitch; };

  // one 16-byte chunk of a row of A or B: cp.async with zero-fill, or byte copies
  auto load_chunk = [&](int8_t* dst, const int8_t* base, int64_t stride, int64_t row, int64_t rows,
                        int64_t kc, bool vec) {
    int64_t n = p.k - kc;
    n = n < 16 ? n : 16;
    if (row >= rows || n <= 0) {
      store16(dst, uint4{0u, 0u, 0u, 0u});
      return;
    }
    const int8_t* src = base + row * stride + kc;
    if (vec) {
      cp_async_16(dst, src, int(n));
    } else {
      int8_t tmp[16];
#pragma unroll
      for (int e = 0; e < 16; ++e) tmp[e] = e < n ? src[e] : int8_t(0);
      uint4 u;
      __builtin_memcpy(&u, tmp, 16);
      store16(dst, u);
    }
  };
  auto load_stage = [&](int kt, int s) {
    const int64_t k0 = int64_t(kt) * kBK;
    for (int c = tid; c < (kBM + kBN) * (kBK / 16); c += kThreads) {
      const int r = c / (kBK / 16), kc = (c % (kBK / 16)) * 16;
      if (r < kBM) {
        load_chunk(sA(s) + r * kPitch + kc, p.a, p.a_stride, m0 + r, p.m, k0 + kc, args.vec_a);
      } else {
        load_chunk(sB(s) + (r - kBM) * kPitch + kc, p.b, p.b_stride, n0 + (r - kBM), p.n, k0 + kc,
                   args.vec_b);
      }
    }
  };

  int32_t acc[kMT][kNT][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0;
    }
  }
  const int k_tiles = int((p.k + kBK - 1) / kBK);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  // ldmatrix lane offsets (bytes): the s8 m16n8k32 fragments are the b16 m16n8k16 ones
  const int a_row = lane % 16, a_col = (lane / 16) * 16;
  const int b_row = (lane / 16) * 8 + lane % 8, b_col = ((lane / 8) % 2) * 16;
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt landed; every warp is done with tile kt - 1's buffer
    if (kt + kStages - 1 < k_tiles) load_stage(kt + kStages - 1, (kt + kStages - 1) % kStages);
    cp_async_commit();
    const int8_t* a_s = sA(kt % kStages) + (warp_m * kWarpM) * kPitch;
    const int8_t* b_s = sB(kt % kStages) + (warp_n * kWarpN) * kPitch;
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        ldmatrix_x4(a[mt], a_s + (mt * 16 + a_row) * kPitch + ks * 32 + a_col);
      }
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bb[4];
        ldmatrix_x4(bb, b_s + (np * 16 + b_row) * kPitch + ks * 32 + b_col);
        const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16832_s8(acc[mt][2 * np], a[mt], b0);
          mma_16832_s8(acc[mt][2 * np + 1], a[mt], b1);
        }
      }
    }
  }
  cp_async_wait<0>();

  // epilogue straight from the accumulators: a quad writes 8 consecutive columns of a row
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = m0 + warp_m * kWarpM + mt * 16 + g + 8 * r;
      if (row >= p.m) continue;
      const float sa = p.a_scale != nullptr ? p.a_scale[row] : 1.0f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t col = n0 + warp_n * kWarpN + nt * 8 + 2 * t4 + e;
          if (col >= p.n) continue;
          const int32_t v = acc[mt][nt][2 * r + e];
          const int64_t idx = row * p.out_stride + col;
          if constexpr (kOut == Int8Out::kInt32) {
            static_cast<int32_t*>(p.out)[idx] = v;
          } else {
            float y = float(v) * sa;
            if (p.b_scale != nullptr) y *= p.b_scale[col];
            if (p.bias != nullptr) y += p.bias[col];
            if constexpr (kOut == Int8Out::kFloat32) store_out<float>(p.out, idx, y);
            if constexpr (kOut == Int8Out::kFloat16) store_out<fp16>(p.out, idx, y);
            if constexpr (kOut == Int8Out::kBFloat16) store_out<bf16>(p.out, idx, y);
          }
        }
      }
    }
  }
}

template <int kBM, int kBN, int kWM, int kWN, int kStages, Int8Out kOut>
cudaError_t launch_gemm_tile(const GemmArgs& a, cudaStream_t stream) {
  constexpr Int8GemmTile kTile = {kBM, kBN, 64, kWM, kWN, kStages};
  auto kernel = int8_gemm_kernel<kBM, kBN, kWM, kWN, kStages, kOut>;
  const size_t smem = int8_gemm_smem_bytes(kTile);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(a.p.n, kBN), ceil_div(a.p.m, kBM));
  FA_LAUNCH(kernel, grid, dim3(32 * kWM * kWN), smem, stream, a);
  return launch_status();
}

template <Int8Out kOut>
cudaError_t launch_gemm(const GemmArgs& a, cudaStream_t stream) {
  constexpr Int8GemmTile L = kInt8GemmLarge, S = kInt8GemmSmall;
  static_assert(L.block_k == 64 && S.block_k == 64, "the kernel streams 64-byte K slices");
  if (int8_gemm_use_large(a.p.m, a.p.n, a.p.num_sms)) {
    return launch_gemm_tile<L.block_m, L.block_n, L.warps_m, L.warps_n, L.stages, kOut>(a, stream);
  }
  return launch_gemm_tile<S.block_m, S.block_n, S.warps_m, S.warps_n, S.stages, kOut>(a, stream);
}

// ---- weight-only linear ------------------------------------------------------------------------
struct WoArgs {
  WeightOnlyParams p;
  bool vec;  // K % 16 == 0 and 16-byte aligned rows of x and w
};

// Each warp produces kWoColsPerWarp output columns for kWoRows rows of x: a lane takes 16
// consecutive k per step (one 16-byte load of each weight row), dequantisation is folded into
// the epilogue (w_scale[n] is per output channel).
template <class T>
__global__ void __launch_bounds__(32 * kWoWarps) int8_weight_only_kernel(const WoArgs args) {
  constexpr int kCols = kWoColsPerWarp, kRows = kWoRows, kVec = 16 / int(sizeof(T));
  const WeightOnlyParams& p = args.p;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int64_t n_base = (int64_t(blockIdx.x) * kWoWarps + warp) * kCols;
  const int64_t m0 = int64_t(blockIdx.y) * kRows;
  float acc[kRows][kCols];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) acc[r][j] = 0.0f;
  }
  const T* x = static_cast<const T*>(p.x);
  if (args.vec) {
    for (int64_t k = int64_t(lane) * 16; k < p.k; k += 32 * 16) {
      float w[kCols][16];
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        int8_t wb[16];
        if (n_base + j < p.n) {
          const uint4 u = load16(p.w + (n_base + j) * p.w_stride + k);
          __builtin_memcpy(wb, &u, 16);
        } else {
          __builtin_memset(wb, 0, 16);
        }
#pragma unroll
        for (int e = 0; e < 16; ++e) w[j][e] = float(wb[e]);
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (m0 + r >= p.m) break;
        const T* xr = x + (m0 + r) * p.x_stride + k;
#pragma unroll
        for (int h = 0; h < 16 / kVec; ++h) {
          const uint4 u = load16(xr + h * kVec);
          T xv[kVec];
          __builtin_memcpy(static_cast<void*>(xv), &u, 16);
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float xf = to_float(xv[e]);
#pragma unroll
            for (int j = 0; j < kCols; ++j) acc[r][j] += xf * w[j][h * kVec + e];
          }
        }
      }
    }
  } else {
    for (int64_t k = lane; k < p.k; k += 32) {
      float w[kCols];
#pragma unroll
      for (int j = 0; j < kCols; ++j)
        w[j] = n_base + j < p.n ? float(p.w[(n_base + j) * p.w_stride + k]) : 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (m0 + r >= p.m) break;
        const float xf = to_float(x[(m0 + r) * p.x_stride + k]);
#pragma unroll
        for (int j = 0; j < kCols; ++j) acc[r][j] += xf * w[j];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) acc[r][j] = warp_sum(acc[r][j]);
  }
  if (lane != 0) return;
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int64_t n = n_base + j;
    if (n >= p.n) continue;
    const float s = p.w_scale[n], b = p.bias != nullptr ? p.bias[n] : 0.0f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (m0 + r >= p.m) break;
      static_cast<T*>(p.out)[(m0 + r) * p.out_stride + n] = from_float<T>(acc[r][j] * s + b);
    }
  }
}

}  // namespace detail

cudaError_t quantize_per_token(const QuantizeParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows <= 0) return cudaSuccess;
  if (p.cols < 0 || p.rows > (int64_t(1) << 33)) return cudaErrorInvalidValue;
  detail::QuantArgs a{p, false};
  const int es = dtype_bytes(dtype), vec = 16 / es;
  a.vec = p.cols % vec == 0 && vec_ok(p.x, es, p.x_stride) &&
          reinterpret_cast<uintptr_t>(p.q) % vec == 0 && p.q_stride % vec == 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = detail::quantize_per_token_kernel<T>;
    FA_LAUNCH(kernel, dim3(ceil_div(p.rows, 4)), dim3(128), 0, stream, a);
    return launch_status();
  });
}

cudaError_t int8_gemm(const Int8GemmParams& p, cudaStream_t stream) {
  if (p.m <= 0 || p.n <= 0) return cudaSuccess;
  if (p.k < 0 || ceil_div64(p.m, kInt8GemmSmall.block_m) > 65535) return cudaErrorInvalidValue;
  detail::GemmArgs a{p, vec_ok(p.a, 1, p.a_stride), vec_ok(p.b, 1, p.b_stride)};
  switch (p.out_type) {
    case Int8Out::kInt32:
      return detail::launch_gemm<Int8Out::kInt32>(a, stream);
    case Int8Out::kFloat32:
      return detail::launch_gemm<Int8Out::kFloat32>(a, stream);
    case Int8Out::kFloat16:
      return detail::launch_gemm<Int8Out::kFloat16>(a, stream);
    case Int8Out::kBFloat16:
      return detail::launch_gemm<Int8Out::kBFloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t int8_weight_only_linear(const WeightOnlyParams& p, DType dtype, cudaStream_t stream) {
  if (p.m <= 0 || p.n <= 0) return cudaSuccess;
  if (p.k < 0 || p.w_scale == nullptr || ceil_div64(p.m, kWoRows) > 65535) {
    return cudaErrorInvalidValue;
  }
  const int es = dtype_bytes(dtype);
  detail::WoArgs a{p, p.k % 16 == 0 && vec_ok(p.x, es, p.x_stride) && vec_ok(p.w, 1, p.w_stride)};
  const dim3 grid(ceil_div(p.n, int64_t(kWoWarps) * kWoColsPerWarp), ceil_div(p.m, kWoRows));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = detail::int8_weight_only_kernel<T>;
    FA_LAUNCH(kernel, grid, dim3(32 * kWoWarps), 0, stream, a);
    return launch_status();
  });
}

}  // namespace fastattn::cuda
