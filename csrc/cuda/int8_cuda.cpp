// CUDA kernels of fastattn::quantize_per_token / int8_gemm / int8_weight_only_linear: argument
// checks, output allocation and the call into the torch-free launchers (int8_kernels.cu).
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "binding_utils.h"
#include "int8.h"

namespace fastattn::cuda {
namespace {

// (n,) float32 contiguous copy of an optional per-row / per-column vector
std::optional<at::Tensor> float_vector(const std::optional<at::Tensor>& t, int64_t n,
                                       const at::Tensor& ref, const char* op, const char* name) {
  if (!t.has_value()) return std::nullopt;
  check_cuda_tensor(*t, ref, op, name);
  TORCH_CHECK(t->numel() == n && t->dim() <= 2, "fastattn.", op, " (CUDA): ", name, " must have ",
              n, " elements, got shape ", t->sizes());
  TORCH_CHECK(t->is_floating_point(), "fastattn.", op, " (CUDA): ", name,
              " must be floating point, got ", t->scalar_type());
  return t->reshape({n}).to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x_in) {
  constexpr const char* op = "quantize_per_token";
  check_cuda_tensor(x_in, x_in, op, "x");
  TORCH_CHECK(x_in.dim() == 2, "fastattn.quantize_per_token (CUDA): x must be (M, K), got ",
              x_in.sizes());
  const DType dtype = dtype_of(x_in, op, "x");
  const int64_t M = x_in.size(0), K = x_in.size(1);
  auto q = at::empty({M, K}, x_in.options().dtype(at::kChar));
  auto scale = at::empty({M}, x_in.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  if (K == 0) {  // absmax of an empty row is 0
    scale.zero_();
    return {q, scale};
  }
  const at::Tensor x = last_dim_contiguous(x_in);
  DeviceGuard guard(x.device());
  QuantizeParams p;
  p.x = x.data_ptr();
  p.q = q.data_ptr<int8_t>();
  p.scale = scale.data_ptr<float>();
  p.rows = M;
  p.cols = K;
  p.x_stride = stride_or_zero(x, 0);
  p.q_stride = stride_or_zero(q, 0);
  check_launch(quantize_per_token(p, dtype, current_stream()), op);
  return {q, scale};
}

at::Tensor int8_gemm_cuda(const at::Tensor& a_in, const at::Tensor& b_in,
                          const std::optional<at::Tensor>& a_scale,
                          const std::optional<at::Tensor>& b_scale,
                          const std::optional<at::Tensor>& bias,
                          std::optional<at::ScalarType> out_dtype) {
  constexpr const char* op = "int8_gemm";
  check_cuda_tensor(a_in, a_in, op, "a");
  check_cuda_tensor(b_in, a_in, op, "b");
  TORCH_CHECK(a_in.scalar_type() == at::kChar && b_in.scalar_type() == at::kChar,
              "fastattn.int8_gemm (CUDA): a and b must be int8, got ", a_in.scalar_type(), " and ",
              b_in.scalar_type());
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && a_in.size(1) == b_in.size(1),
              "fastattn.int8_gemm (CUDA): a must be (M, K) and b (N, K), got ", a_in.sizes(),
              " and ", b_in.sizes());
  const int64_t M = a_in.size(0), K = a_in.size(1), N = b_in.size(0);
  const auto sa = float_vector(a_scale, M, a_in, op, "a_scale");
  const auto sb = float_vector(b_scale, N, a_in, op, "b_scale");
  const auto bb = float_vector(bias, N, a_in, op, "bias");
  const bool scaled = sa.has_value() || sb.has_value();
  // the kernel writes int32, float32, float16 or bfloat16; other dtypes are a cast afterwards
  Int8Out kind = Int8Out::kInt32;
  at::ScalarType kernel_dtype = at::kInt;
  if (scaled) {
    const at::ScalarType want = out_dtype.value_or(at::kFloat);
    kind = want == at::kHalf ? Int8Out::kFloat16
                             : (want == at::kBFloat16 ? Int8Out::kBFloat16 : Int8Out::kFloat32);
    kernel_dtype = want == at::kHalf || want == at::kBFloat16 ? want : at::kFloat;
  }  // without scales the int32 accumulator is returned and bias is unused (as the reference)
  auto out = at::empty({M, N}, a_in.options().dtype(kernel_dtype));
  if (out.numel() > 0) {
    const at::Tensor a = last_dim_contiguous(a_in), b = last_dim_contiguous(b_in);
    DeviceGuard guard(a.device());
    Int8GemmParams p;
    p.a = a.data_ptr<int8_t>();
    p.b = b.data_ptr<int8_t>();
    p.a_scale = sa.has_value() ? sa->data_ptr<float>() : nullptr;
    p.b_scale = sb.has_value() ? sb->data_ptr<float>() : nullptr;
    p.bias = bb.has_value() ? bb->data_ptr<float>() : nullptr;
    p.out = out.data_ptr();
    p.m = M, p.n = N, p.k = K;
    p.a_stride = stride_or_zero(a, 0), p.b_stride = stride_or_zero(b, 0);
    p.out_stride = stride_or_zero(out, 0);
    p.out_type = kind;
    p.num_sms = sm_count();
    check_launch(int8_gemm(p, current_stream()), op);
  }
  const at::ScalarType final_dtype =
      scaled ? out_dtype.value_or(at::kFloat) : out_dtype.value_or(at::kInt);
  return final_dtype == out.scalar_type() ? out : out.to(final_dtype);
}

at::Tensor int8_weight_only_linear_cuda(const at::Tensor& x_nd, const at::Tensor& w_in,
                                        const at::Tensor& w_scale,
                                        const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "int8_weight_only_linear";
  checks::check_int8_linear("fastattn.int8_weight_only_linear", x_nd, w_in, w_scale, bias);
  check_cuda_tensor(x_nd, x_nd, op, "x");
  const at::Tensor x_in = checks::as_rows(x_nd, 1, x_nd.size(-1));  // (M, K)
  const DType dtype = dtype_of(x_in, op, "x");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w_in.size(0);
  const auto s = float_vector(std::optional<at::Tensor>(w_scale), N, x_in, op, "w_scale");
  const auto bb = float_vector(bias, N, x_in, op, "bias");
  std::vector<int64_t> out_shape(x_nd.sizes().begin(), x_nd.sizes().end());
  out_shape.back() = N;
  auto out = at::empty(out_shape, x_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor x = last_dim_contiguous(x_in), w = last_dim_contiguous(w_in);
  DeviceGuard guard(x.device());
  WeightOnlyParams p;
  p.x = x.data_ptr();
  p.w = w.data_ptr<int8_t>();
  p.w_scale = s->data_ptr<float>();
  p.bias = bb.has_value() ? bb->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.m = M, p.n = N, p.k = K;
  p.x_stride = stride_or_zero(x, 0), p.w_stride = stride_or_zero(w, 0);
  p.out_stride = N;
  check_launch(int8_weight_only_linear(p, dtype, current_stream()), op);
  return out;
}

}  // namespace
}  // namespace fastattn::cuda

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("quantize_per_token", &fastattn::cuda::quantize_per_token_cuda);
  m.impl("int8_gemm", &fastattn::cuda::int8_gemm_cuda);
  m.impl("int8_weight_only_linear", &fastattn::cuda::int8_weight_only_linear_cuda);
}
