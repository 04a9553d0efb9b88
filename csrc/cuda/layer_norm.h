// Torch-free host API of the fastattn CUDA LayerNorm / RMSNorm kernels (semantics: the
// layer_norm_fwd / layer_norm_bwd schemas in csrc/fastattn.cpp). Rows are (M, N) matrices whose
// last dimension is contiguous; row strides are free.
#pragma once

#include <driver_types.h>

#include <cstdint>

#include "dtype.h"
#include "launch_params.h"

namespace fastattn::cuda {

struct LayerNormFwdParams {
  const void* input = nullptr;
  const void* residual = nullptr;  // may be null
  const void* weight = nullptr;    // (N,), may be null; input's dtype or float32
  const void* bias = nullptr;      // (N,), may be null; same dtype as weight
  void* out = nullptr;
  void* residual_out = nullptr;  // required when residual is given
  float* mean = nullptr;         // (M,)
  float* rstd = nullptr;         // (M,)
  int64_t rows = 0, cols = 0;
  int64_t input_stride = 0, residual_stride = 0, out_stride = 0, residual_out_stride = 0;
  float eps = 1e-5f;
  bool rms = false;
  bool param_float32 = false;  // weight/bias are float32 (else input's dtype)
};

cudaError_t layer_norm_fwd(const LayerNormFwdParams& p, DType dtype, cudaStream_t stream);

// grad_input = dL/dx (+ grad_residual_out); grad_weight / grad_bias (N,) in the weight's dtype,
// reduced in a fixed order over `workspace` (layer_norm_bwd_workspace floats).
struct LayerNormBwdParams {
  const void* grad_out = nullptr;
  const void* grad_residual_out = nullptr;  // may be null
  const void* x = nullptr;
  const void* weight = nullptr;  // may be null
  const float* mean = nullptr;
  const float* rstd = nullptr;
  void* grad_input = nullptr;
  void* grad_weight = nullptr;  // null when weight is null
  void* grad_bias = nullptr;    // null when there is no bias
  float* workspace = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t grad_out_stride = 0, grad_residual_out_stride = 0, x_stride = 0, grad_input_stride = 0;
  bool rms = false;
  bool param_float32 = false;
  int num_sms = 1;
};

int64_t layer_norm_bwd_workspace(const LayerNormBwdParams& p, DType dtype);
cudaError_t layer_norm_bwd(const LayerNormBwdParams& p, DType dtype, cudaStream_t stream);

}  // namespace fastattn::cuda
