// Building blocks shared by the fastattn CUDA kernels: element types, the PTX instructions the
// kernels are built on (cp.async, ldmatrix, mma.sync), warp reductions and the launch macro.
// Torch-free.
//
// The hardware layer below (launch, fast math, vector memory access, cp.async, ldmatrix,
// mma.sync) is the only part that cannot run on a CPU. With FASTATTN_EMULATE the kernels compile
// as host C++ (tests/test_cuda_build.py) and emulation/seams.cuh supplies all of that layer
// instead, with the same names and fragment layouts; everything after it is shared as written.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "dtype.h"

namespace fastattn::cuda {
using bf16 = __nv_bfloat16;
using fp16 = __half;
}  // namespace fastattn::cuda

#if defined(FASTATTN_EMULATE)
#include "emulation/seams.cuh"
#else
#include <cuda_runtime.h>

#define FA_DEVICE __device__ __forceinline__
#define FA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)

namespace fastattn::cuda {

// ---- launch (host) ---------------------------------------------------------------------------
inline cudaError_t launch_status() { return cudaGetLastError(); }

// Kernels above the default 48 KB of dynamic shared memory must opt in once per function.
template <class Kernel>
inline cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

// ---- math ------------------------------------------------------------------------------------
FA_DEVICE float exp2_approx(float x) {  // 2^x; 2^-inf = 0 (softmax numerators)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

FA_DEVICE float log_f(float x) { return logf(x); }

FA_DEVICE float rsqrt_approx(float x) { return rsqrtf(x); }

// IEEE round-to-nearest division and product, whatever --use_fast_math says (quantization must
// match the reference bit for bit, subnormals included).
FA_DEVICE float div_rn(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
FA_DEVICE float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
// Round half to even and convert (saturating, NaN -> 0), like cvt.rni.s32.f32.
FA_DEVICE int round_to_int(float x) { return __float2int_rn(x); }

// ---- memory ----------------------------------------------------------------------------------
FA_DEVICE char* smem_base() {
  extern __shared__ __align__(16) char fastattn_smem[];
  return fastattn_smem;
}

// 16-byte global/shared vector access (callers guarantee 16-byte alignment).
FA_DEVICE uint4 load16(const void* p) { return *static_cast<const uint4*>(p); }
FA_DEVICE void store16(void* p, const uint4& v) { *static_cast<uint4*>(p) = v; }
// 4-byte store (callers guarantee 4-byte alignment).
FA_DEVICE void store_u32(void* p, uint32_t v) { *static_cast<uint32_t*>(p) = v; }

FA_DEVICE uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async.cg (L2 only, 16 bytes): copies src_bytes (0..16) from global, zero-fills the rest.
FA_DEVICE void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}
FA_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
FA_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ldmatrix .x4: lanes 8i..8i+7 pass the 16-byte row addresses of 8x8 matrix i; register i of
// lane l receives row l/4, columns 2(l%4)..+1 of matrix i (transposed with .trans).
FA_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_addr)));
}
FA_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_addr)));
}

// d += a * b on tensor cores, m16n8k16, fp32 accumulation.
template <class T>
FA_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
FA_DEVICE void mma_16816<bf16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
FA_DEVICE void mma_16816<fp16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += a * b, m16n8k32 int8 x int8 -> int32.
FA_DEVICE void mma_16832_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace fastattn::cuda
#endif  // FASTATTN_EMULATE

namespace fastattn::cuda {

// ---- launch helpers (host) -------------------------------------------------------------------
inline unsigned ceil_div(int64_t a, int64_t b) { return unsigned((a + b - 1) / b); }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A tensor can be moved in 16-byte chunks when its base is 16-byte aligned and every stride
// (in elements) keeps that alignment.
inline bool vec_ok(const void* base, int elem_bytes, int64_t s0, int64_t s1 = 0, int64_t s2 = 0) {
  const int64_t per = 16 / elem_bytes;
  return base != nullptr && aligned16(base) && s0 % per == 0 && s1 % per == 0 && s2 % per == 0;
}

template <class T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>) for the element type of dtype.
template <class F>
inline cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(TypeTag<float>());
    case DType::kFloat16:
      return f(TypeTag<fp16>());
    case DType::kBFloat16:
      return f(TypeTag<bf16>());
  }
  return cudaErrorInvalidValue;
}

// ---- element types ---------------------------------------------------------------------------
FA_DEVICE float to_float(float x) { return x; }
FA_DEVICE float to_float(bf16 x) { return __bfloat162float(x); }
FA_DEVICE float to_float(fp16 x) { return __half2float(x); }

template <class T>
FA_DEVICE T from_float(float x);
template <>
FA_DEVICE float from_float<float>(float x) {
  return x;
}
template <>
FA_DEVICE bf16 from_float<bf16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
FA_DEVICE fp16 from_float<fp16>(float x) {
  return __float2half_rn(x);
}

// Two floats rounded to a 16-bit type and packed low-first, as mma.sync operands expect.
template <class T>
FA_DEVICE uint32_t pack2(float lo, float hi);
template <>
FA_DEVICE uint32_t pack2<bf16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  static_assert(sizeof(v) == sizeof(u), "bf16x2 is 32 bits");
  __builtin_memcpy(&u, &v, sizeof(u));
  return u;
}
template <>
FA_DEVICE uint32_t pack2<fp16>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  __builtin_memcpy(&u, &v, sizeof(u));
  return u;
}

FA_DEVICE uint32_t float_bits(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof(u));
  return u;
}
FA_DEVICE float bits_float(uint32_t u) {
  float x;
  __builtin_memcpy(&x, &u, sizeof(x));
  return x;
}

// ---- math ------------------------------------------------------------------------------------
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kInf = __builtin_huge_valf();

FA_DEVICE float max_f(float a, float b) { return a > b ? a : b; }
FA_DEVICE int min_i(int a, int b) { return a < b ? a : b; }
FA_DEVICE int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
FA_DEVICE int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }
FA_DEVICE int max_i(int a, int b) { return a > b ? a : b; }

// ---- warp reductions -------------------------------------------------------------------------
FA_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
FA_DEVICE float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_f(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
FA_DEVICE uint32_t warp_max_u32(uint32_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    uint32_t w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}
// The four lanes of an mma quad (lane ^ 1, lane ^ 2) hold one accumulator row between them.
FA_DEVICE float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}
FA_DEVICE float quad_max(float v) {
  v = max_f(v, __shfl_xor_sync(0xffffffffu, v, 1));
  v = max_f(v, __shfl_xor_sync(0xffffffffu, v, 2));
  return v;
}

}  // namespace fastattn::cuda
