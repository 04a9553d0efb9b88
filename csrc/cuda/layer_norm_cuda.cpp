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

// fastattn::layer_norm_fused_fwd / bwd on the kernels above: the part of FlashAttention's
// keywords they compute, offset (folded into a float32 weight: w + offset) and a residual of
// input's dtype. Dropout, rowscale, x1/weight1/bias1, residual_in_fp32, a residual of another
// dtype and quantize have no CUDA kernel: the op layer's _supports_fused sends such calls to
// Triton (or the reference), and these entry points refuse them.
void check_fused_subset(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                        const std::optional<at::Tensor>& x1,
                        const std::optional<at::Tensor>& weight1,
                        const std::optional<at::Tensor>& rowscale, double dropout_p,
                        bool residual_in_fp32, bool quantize) {
  TORCH_CHECK(!x1.has_value() && !weight1.has_value() && !rowscale.has_value() &&
                  dropout_p == 0.0 && !residual_in_fp32 && !quantize &&
                  (!residual.has_value() || residual->scalar_type() == input.scalar_type()),
              "fastattn.layer_norm (CUDA): the CUDA kernels take offset and a residual of "
              "input's dtype only (no dropout, rowscale, x1/weight1/bias1, residual_in_fp32, "
              "residual of another dtype or quantize): use backend='triton'");
}

std::optional<at::Tensor> offset_weight(const std::optional<at::Tensor>& weight, double offset) {
  if (!weight.has_value() || offset == 0.0) return weight;
  return weight->to(at::kFloat).add(offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
layer_norm_fused_fwd_cuda(const at::Tensor& input, at::IntArrayRef normalized_shape,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual,
                          const std::optional<at::Tensor>& x1,
                          const std::optional<at::Tensor>& weight1,
                          const std::optional<at::Tensor>& bias1,
                          const std::optional<at::Tensor>& rowscale, double eps, bool rms,
                          double offset, double dropout_p, int64_t seed, bool residual_in_fp32,
                          bool quantize) {
  (void)seed;
  checks::check_norm_fused(rms, input, normalized_shape, weight, bias, residual, x1, weight1, bias1,
                           rowscale, eps, offset, dropout_p, residual_in_fp32, quantize);
  check_fused_subset(input, residual, x1, weight1, rowscale, dropout_p, residual_in_fp32,
                     quantize);
  // float32 weight (+ offset): the bias follows it to float32 (normalize_params)
  const std::optional<at::Tensor> w = offset_weight(weight, offset);
  auto [out, residual_out, mean, rstd] =
      layer_norm_fwd_cuda(input, normalized_shape, w, bias, residual, eps, rms);
  // without a residual x' is input itself: residual_out stays empty (the op's contract)
  const auto empty = [&] { return at::empty({0}, input.options()); };
  return {out,     empty(), residual.has_value() ? residual_out.view(input.sizes()) : empty(),
          empty(), empty(), mean,  rstd, at::empty({0}, input.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_norm_fused_bwd_cuda(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_out1,
                          const std::optional<at::Tensor>& grad_residual_out, const at::Tensor& x,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& weight1,
                          const std::optional<at::Tensor>& mask,
                          const std::optional<at::Tensor>& mask1,
                          const std::optional<at::Tensor>& rowscale, const at::Tensor& mean,
                          const at::Tensor& rstd, double offset, double dropout_p, bool rms,
                          bool has_bias, bool has_bias1, bool has_x1, at::ScalarType input_dtype,
                          std::optional<at::ScalarType> residual_dtype) {
  TORCH_CHECK(!(grad_out1.has_value() && grad_out1->numel() > 0) && !weight1.has_value() &&
                  !(mask.has_value() && mask->numel() > 0) &&
                  !(mask1.has_value() && mask1->numel() > 0) && !rowscale.has_value() &&
                  dropout_p == 0.0 && !has_bias1 && !has_x1 && x.scalar_type() == input_dtype &&
                  (!residual_dtype.has_value() || *residual_dtype == input_dtype),
              "fastattn.layer_norm_fused_bwd (CUDA): only offset and a residual of input's "
              "dtype have CUDA kernels");
  const int64_t N = x.dim() == 2 ? x.size(1) : 0;
  std::optional<at::Tensor> w;
  if (weight.has_value()) w = offset_weight(weight->reshape({N}), offset);
  // a float32 zero bias makes the kernel compute the bias gradient
  std::optional<at::Tensor> b;
  if (has_bias) b = at::zeros({N}, x.options().dtype(at::kFloat));
  std::optional<at::Tensor> gres;
  if (grad_residual_out.has_value() && grad_residual_out->numel() > 0) gres = grad_residual_out;
  auto [dx, dw, db] = layer_norm_bwd_cuda(grad_out, gres, x, w, b, mean, rstd, rms);
  const auto empty = [&] { return at::empty({0}, x.options()); };
  const auto empty32 = [&] { return at::empty({0}, x.options().dtype(at::kFloat)); };
  // x' = input + residual: both receive d
  at::Tensor dres = residual_dtype.has_value() ? dx.clone() : empty();
  return {dx,
          dres,
          empty(),
          weight.has_value() ? dw.to(at::kFloat) : empty32(),
          has_bias ? db.to(at::kFloat) : empty32(),
          empty32(),
          empty32()};
}

}  // namespace
}  // namespace fastattn::cuda

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("layer_norm_fwd", &fastattn::cuda::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &fastattn::cuda::layer_norm_bwd_cuda);
  m.impl("layer_norm_fused_fwd", &fastattn::cuda::layer_norm_fused_fwd_cuda);
  m.impl("layer_norm_fused_bwd", &fastattn::cuda::layer_norm_fused_bwd_cuda);
}
