// Torch-free host API of the fastattn CUDA int8 kernels (semantics: the quantize_per_token,
// int8_gemm and int8_weight_only_linear schemas in csrc/fastattn.cpp). Matrices are row-major
// with a contiguous last dimension; row strides are free.
#pragma once

#include <driver_types.h>

#include <cstdint>

#include "dtype.h"
#include "launch_params.h"

namespace fastattn::cuda {

// Per row: absmax in float32, scale = absmax / 127, q = clamp(rint(x * (127 / absmax)), -127,
// 127) with IEEE division/product and round-half-even (bit-exact with the reference); 0 rows give
// q = 0 and scale = 0.
struct QuantizeParams {
  const void* x = nullptr;
  int8_t* q = nullptr;
  float* scale = nullptr;
  int64_t rows = 0, cols = 0, x_stride = 0, q_stride = 0;
};

cudaError_t quantize_per_token(const QuantizeParams& p, DType dtype, cudaStream_t stream);

enum class Int8Out { kInt32, kFloat32, kFloat16, kBFloat16 };

// acc = a (M, K) @ b (N, K)^T in int32; out = acc (kInt32), or acc * a_scale[m] * b_scale[n] +
// bias[n] computed in float32 and cast (a null scale or bias counts as 1 or 0).
struct Int8GemmParams {
  const int8_t* a = nullptr;
  const int8_t* b = nullptr;
  const float* a_scale = nullptr;
  const float* b_scale = nullptr;
  const float* bias = nullptr;
  void* out = nullptr;
  int64_t m = 0, n = 0, k = 0, a_stride = 0, b_stride = 0, out_stride = 0;
  Int8Out out_type = Int8Out::kInt32;
  int num_sms = 1;
};

cudaError_t int8_gemm(const Int8GemmParams& p, cudaStream_t stream);

// out (M, N) = (x @ w^T) * w_scale + bias, float32 accumulation, in x's dtype; int8 weights are
// dequantised on the fly (a GEMV-like kernel meant for small M).
struct WeightOnlyParams {
  const void* x = nullptr;
  const int8_t* w = nullptr;
  const float* w_scale = nullptr;
  const float* bias = nullptr;  // may be null
  void* out = nullptr;
  int64_t m = 0, n = 0, k = 0, x_stride = 0, w_stride = 0, out_stride = 0;
};

cudaError_t int8_weight_only_linear(const WeightOnlyParams& p, DType dtype, cudaStream_t stream);

}  // namespace fastattn::cuda
