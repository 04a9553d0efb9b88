// CUDA kernels of fastattn::layer_norm_fwd / layer_norm_bwd: argument checks, output
// allocation and the call into the torch-free launchers (layer_norm_kernels.cu).
#include <optional>
#include <tuple>

#include "../checks.h"
#include "binding_utils.h"
#include "layer_norm.h"

namespace fastattn::cuda {
namespace {

// The kernels take weight and bias in the input's dtype or both in float32; any other mix is
// promoted to float32 here (they are (N,) vectors: the copy is negligible).
struct Params {
  std::optional<at::Tensor> weight, bias;
  bool float32 = false;
};

Params normalize_params(const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t n,
                        const char* op) {
  Params out;
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    if (!t->has_value()) continue;
    check_cuda_tensor(**t, x, op, name);
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == n, "fastattn.", op, " (CUDA): ", name,
                " must have shape (", n, ",), got ", (*t)->sizes());
    TORCH_CHECK((*t)->is_floating_point(), "fastattn.", op, " (CUDA): ", name,
                " must be floating point, got ", (*t)->scalar_type());
  }
  const bool same = (!weight.has_value() || weight->scalar_type() == x.scalar_type()) &&
                    (!bias.has_value() || bias->scalar_type() == x.scalar_type());
  out.float32 = !same;
  auto prep = [&](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t.has_value()) return std::nullopt;
    return (out.float32 ? t->to(at::kFloat) : *t).contiguous();
  };
  out.weight = prep(weight);
  out.bias = prep(bias);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x_in, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& residual_x, double eps, bool rms) {
  constexpr const char* op = "layer_norm_fwd";
  const int64_t N =
      checks::check_norm(rms, x_in, normalized_shape, weight_in, bias_in, residual_x, eps);
  check_cuda_tensor(x_in, x_in, op, "input");
  const DType dtype = dtype_of(x_in, op, "input");
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  const at::Tensor input_in = checks::as_rows(x_in, nd, N);  // (M, N)
  const int64_t M = input_in.size(0);
  std::optional<at::Tensor> residual_in;
  if (residual_x.has_value()) residual_in = checks::as_rows(*residual_x, nd, N);
  auto flat = [&](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t.has_value()) return std::nullopt;
    return t->reshape({N});
  };
  const std::optional<at::Tensor> weight = flat(weight_in), bias = flat(bias_in);
  const Params prm = normalize_params(weight, bias, input_in, N, op);
  auto out = at::empty({M, N}, input_in.options());
  auto residual_out = residual_in.has_value() ? at::empty(x_in.sizes(), input_in.options())
                                              : at::empty({0}, input_in.options());
  auto mean = at::empty({M}, input_in.options().dtype(at::kFloat));
  auto rstd = at::empty({M}, input_in.options().dtype(at::kFloat));
  if (M == 0) return {out.view(x_in.sizes()), residual_out, mean, rstd};
  TORCH_CHECK(N > 0, "fastattn.layer_norm_fwd (CUDA): input must have at least one column");
  const at::Tensor input = last_dim_contiguous(input_in);
  std::optional<at::Tensor> residual;
  if (residual_in.has_value()) residual = last_dim_contiguous(*residual_in);
  DeviceGuard guard(input.device());
  LayerNormFwdParams p;
  p.input = input.data_ptr();
  p.residual = residual.has_value() ? residual->data_ptr() : nullptr;
  p.weight = prm.weight.has_value() ? prm.weight->data_ptr() : nullptr;
  p.bias = prm.bias.has_value() ? prm.bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.residual_out = residual.has_value() ? residual_out.data_ptr() : nullptr;
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = M;
  p.cols = N;
  p.input_stride = stride_or_zero(input, 0);
  p.residual_stride = residual.has_value() ? stride_or_zero(*residual, 0) : 0;
  p.out_stride = stride_or_zero(out, 0);
  p.residual_out_stride = residual.has_value() ? N : 0;
  p.eps = float(eps);
  p.rms = rms;
  p.param_float32 = prm.float32;
  check_launch(layer_norm_fwd(p, dtype, current_stream()), op);
  return {out.view(x_in.sizes()), residual_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_residual_out_in,
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    bool rms) {
  constexpr const char* op = "layer_norm_bwd";
  check_cuda_tensor(x_in, x_in, op, "x");
  check_cuda_tensor(grad_out_in, x_in, op, "grad_out");
  TORCH_CHECK(x_in.dim() == 2 && grad_out_in.sizes() == x_in.sizes() &&
                  grad_out_in.scalar_type() == x_in.scalar_type(),
              "fastattn.layer_norm_bwd (CUDA): grad_out and x must be (M, N) of one dtype, got ",
              grad_out_in.sizes(), " and ", x_in.sizes());
  const DType dtype = dtype_of(x_in, op, "x");
  const int64_t M = x_in.size(0), N = x_in.size(1);
  if (grad_residual_out_in.has_value()) {
    check_cuda_tensor(*grad_residual_out_in, x_in, op, "grad_residual_out");
    TORCH_CHECK(grad_residual_out_in->sizes() == x_in.sizes() &&
                    grad_residual_out_in->scalar_type() == x_in.scalar_type(),
                "fastattn.layer_norm_bwd (CUDA): grad_residual_out must match x");
  }
  for (const auto& [t, name] : {std::pair{&mean_in, "mean"}, std::pair{&rstd_in, "rstd"}}) {
    check_cuda_tensor(*t, x_in, op, name);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == M, "fastattn.layer_norm_bwd (CUDA): ", name,
                " must have shape (", M, ",), got ", t->sizes());
  }
  const Params prm = normalize_params(weight, bias, x_in, N, op);
  auto grad_input = at::empty({M, N}, x_in.options());
  // gradients of float32-promoted parameters are computed in float32 and cast back below
  const auto param_opts = x_in.options().dtype(prm.float32 ? at::kFloat : x_in.scalar_type());
  auto grad_weight =
      weight.has_value() ? at::empty({N}, param_opts) : at::empty({0}, x_in.options());
  auto grad_bias = bias.has_value() ? at::empty({N}, param_opts) : at::empty({0}, x_in.options());
  if (N == 0) return {grad_input, grad_weight, grad_bias};
  const at::Tensor x = last_dim_contiguous(x_in), grad_out = last_dim_contiguous(grad_out_in);
  std::optional<at::Tensor> grad_residual_out;
  if (grad_residual_out_in.has_value())
    grad_residual_out = last_dim_contiguous(*grad_residual_out_in);
  const at::Tensor mean = mean_in.to(at::kFloat).contiguous();
  const at::Tensor rstd = rstd_in.to(at::kFloat).contiguous();
  DeviceGuard guard(x.device());
  LayerNormBwdParams p;
  p.grad_out = grad_out.data_ptr();
  p.grad_residual_out = grad_residual_out.has_value() ? grad_residual_out->data_ptr() : nullptr;
  p.x = x.data_ptr();
  p.weight = prm.weight.has_value() ? prm.weight->data_ptr() : nullptr;
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.grad_input = grad_input.data_ptr();
  p.grad_weight = weight.has_value() ? grad_weight.data_ptr() : nullptr;
  p.grad_bias = bias.has_value() ? grad_bias.data_ptr() : nullptr;
  p.rows = M;
  p.cols = N;
  p.grad_out_stride = stride_or_zero(grad_out, 0);
  p.grad_residual_out_stride =
      grad_residual_out.has_value() ? stride_or_zero(*grad_residual_out, 0) : 0;
  p.x_stride = stride_or_zero(x, 0);
  p.grad_input_stride = stride_or_zero(grad_input, 0);
  p.rms = rms;
  p.param_float32 = prm.float32;
  p.num_sms = sm_count();
  const int64_t ws = layer_norm_bwd_workspace(p, dtype);
  at::Tensor workspace;
  if (ws > 0) {
    workspace = at::empty({ws}, x.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
  }
  check_launch(layer_norm_bwd(p, dtype, current_stream()), op);
  if (weight.has_value() && grad_weight.scalar_type() != weight->scalar_type()) {
    grad_weight = grad_weight.to(weight->scalar_type());
  }
  if (bias.has_value() && grad_bias.scalar_type() != bias->scalar_type()) {
    grad_bias = grad_bias.to(bias->scalar_type());
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace fastattn::cuda

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("layer_norm_fwd", &fastattn::cuda::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &fastattn::cuda::layer_norm_bwd_cuda);
}
