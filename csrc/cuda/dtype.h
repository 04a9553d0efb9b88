// Element types the fastattn CUDA launchers accept (the bindings map at::ScalarType onto it).
#pragma once

namespace fastattn::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

inline int dtype_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

}  // namespace fastattn::cuda
