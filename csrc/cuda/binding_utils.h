// Glue between at::Tensor and the torch-free launchers: the current stream, the device guard,
// the SM count, dtype mapping and argument checks that name the offending argument.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "dtype.h"

#if defined(FASTATTN_CUDA_SYNTAX_CHECK)
// Syntax check of the bindings on a machine whose torch is a CPU build (no c10/cuda headers):
// the three torch CUDA entry points below are declared, not included. Never used in a build.
namespace fastattn::cuda {
cudaStream_t current_stream();
int sm_count();
struct DeviceGuard {
  explicit DeviceGuard(const at::Device& device);
};
}  // namespace fastattn::cuda
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace fastattn::cuda {
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
using DeviceGuard = c10::cuda::CUDAGuard;
}  // namespace fastattn::cuda
#endif

namespace fastattn::cuda {

inline DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "fastattn.", op, " (CUDA): ", name,
              " must be float16, bfloat16 or float32, got ", t.scalar_type());
}

inline void check_cuda_tensor(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastattn.", op, " (CUDA): ", name, " must be a CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.device() == ref.device(), "fastattn.", op, " (CUDA): ", name, " must be on ",
              ref.device(), ", got ", t.device());
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastattn.", op,
              " (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

// The kernels need a contiguous last dimension; anything else is copied once.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// Stride of dim d, or 0 where the dim has one element (torch leaves arbitrary strides there,
// which would needlessly disable 16-byte accesses).
inline int64_t stride_or_zero(const at::Tensor& t, int64_t d) {
  return t.size(d) == 1 ? 0 : t.stride(d);
}

}  // namespace fastattn::cuda
