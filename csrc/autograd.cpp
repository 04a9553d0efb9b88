// Autograd of the C++ ops, registered under the Autograd dispatch key so that a call never leaves
// C++: a Python autograd kernel (torch.library.register_autograd) costs ~15 us per call, more than
// a whole LayerNorm of a decoding step (F.layer_norm on (1, 576): ~4 us). The Triton ops, which
// are Python custom ops anyway, keep their autograd in Python (fastattn/ops/), with the same
// formulas as here.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "checks.h"

namespace fastattn::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

const auto& layer_norm_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn::layer_norm_fwd", "")
          .typed<Tensors4(const at::Tensor&, at::IntArrayRef, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                          double, bool)>();
  return op;
}

const auto& layer_norm_bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn::layer_norm_bwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const at::Tensor&, const at::Tensor&, bool)>();
  return op;
}

std::optional<at::Tensor> flat(const std::optional<at::Tensor>& t, int64_t n) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->reshape({n});
}

// layer_norm_fwd: gradients flow to input, residual (both receive dL/dx, x = input + residual),
// weight and bias; mean and rstd are not differentiable.
class LayerNormFn : public torch::autograd::Function<LayerNormFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               at::IntArrayRef normalized_shape,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual, double eps, bool rms) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, residual_out, mean, rstd] =
        layer_norm_fwd_op().call(input, normalized_shape, weight, bias, residual, eps, rms);
    // the backward needs what was normalised: the rounded sum when the residual is fused
    const bool fused = residual.has_value();
    ctx->save_for_backward({fused ? residual_out : input, weight.value_or(at::Tensor()),
                            bias.value_or(at::Tensor()), mean, rstd});
    // one entry (a map insertion each): nd << 2 | fused << 1 | rms
    ctx->saved_data["f"] =
        static_cast<int64_t>(normalized_shape.size()) << 2 | int64_t{fused} << 1 | int64_t{rms};
    ctx->mark_non_differentiable({mean, rstd});
    return {out, residual_out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor &weight = saved[1], &bias = saved[2];
    const int64_t flags = ctx->saved_data["f"].toInt();
    const bool rms = flags & 1, fused = (flags >> 1) & 1;
    const int64_t nd = flags >> 2;
    int64_t n = 1;
    for (int64_t d = x.dim() - nd; d < x.dim(); ++d) n *= x.size(d);
    const at::Tensor xr = checks::as_rows(x, nd, n);
    const at::Tensor go = checks::as_rows(grads[0], nd, n);
    std::optional<at::Tensor> gres;
    if (fused && grads[1].defined()) gres = checks::as_rows(grads[1], nd, n);
    auto [dx, dw, db] = layer_norm_bwd_op().call(
        go, gres, xr, flat(weight.defined() ? std::optional(weight) : std::nullopt, n),
        flat(bias.defined() ? std::optional(bias) : std::nullopt, n), saved[3], saved[4], rms);
    dx = dx.view(x.sizes());
    return {dx,
            at::Tensor(),
            weight.defined() ? dw.view(weight.sizes()) : at::Tensor(),
            bias.defined() ? db.view(bias.sizes()) : at::Tensor(),
            fused ? dx : at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

Tensors4 layer_norm_fwd_autograd(c10::DispatchKeySet ks, const at::Tensor& input,
                                 at::IntArrayRef normalized_shape,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual, double eps, bool rms) {
  auto recorded = [](const std::optional<at::Tensor>& t) { return t && t->requires_grad(); };
  if (!at::GradMode::is_enabled() ||
      !(input.requires_grad() || recorded(weight) || recorded(bias) || recorded(residual))) {
    // nothing to record (inference, or frozen weights on an input without grad): straight to
    // the kernel, as ATen's generated autograd kernels do; a Function costs ~1 us even then
    return layer_norm_fwd_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, input,
                                          normalized_shape, weight, bias, residual, eps, rms);
  }
  auto r = LayerNormFn::apply(input, normalized_shape, weight, bias, residual, eps, rms);
  return {r[0], r[1], r[2], r[3]};
}

const auto& silu_mul_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattn::silu_mul_fwd", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op;
}

const auto& silu_mul_bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattn::silu_mul_bwd", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op;
}

// silu_mul_fwd: the gradient of x (both halves) from x alone; nothing else is saved.
class SiluMulFn : public torch::autograd::Function<SiluMulFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = silu_mul_fwd_op().call(x);
    ctx->save_for_backward({x});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {silu_mul_bwd_op().call(grads[0], saved[0])};
  }
};

at::Tensor silu_mul_fwd_autograd(c10::DispatchKeySet ks, const at::Tensor& x) {
  if (!at::GradMode::is_enabled() || !x.requires_grad()) {
    // nothing to record: straight to the kernel (a Function costs ~1 us even then)
    return silu_mul_fwd_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, x);
  }
  return SiluMulFn::apply(x);
}

// The int8 ops are inference-only: quantization has no gradient. A call that autograd records
// runs as usual and its float outputs get a node whose backward raises, naming the op (instead of
// silently returning no gradient); a call that records nothing costs one scan of its arguments.
class InferenceOnlyFn : public torch::autograd::Function<InferenceOnlyFn> {
 public:
  // recorded: the inputs that require grad (the node's edges); runs the op below autograd on
  // the boxed stack and returns its float outputs
  static variable_list forward(AutogradContext* ctx, at::TensorList recorded,
                               const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                               torch::jit::Stack* stack) {
    (void)recorded;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
    }
    ctx->saved_data["op"] = op.schema().name().substr(std::string("fastattn::").size());
    variable_list outs;
    for (size_t i = stack->size() - op.schema().returns().size(); i < stack->size(); ++i)
      if ((*stack)[i].toTensor().is_floating_point()) outs.push_back((*stack)[i].toTensor());
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    (void)grads;
    TORCH_CHECK(false, "fastattn.", ctx->saved_data["op"].toStringRef(),
                " is inference-only: int8 quantization has no gradient. Run the int8 model under "
                "torch.no_grad() / torch.inference_mode(), or train the float model.");
  }
};

void inference_only(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const size_t num_args = op.schema().arguments().size();
  std::vector<at::Tensor> recorded;
  if (at::GradMode::is_enabled()) {
    for (size_t i = stack->size() - num_args; i < stack->size(); ++i) {
      const c10::IValue& v = (*stack)[i];
      if (v.isTensor() && v.toTensor().requires_grad()) recorded.push_back(v.toTensor());
    }
  }
  if (recorded.empty()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
    return;
  }
  const variable_list outs = InferenceOnlyFn::apply(at::TensorList(recorded), op, ks, stack);
  // the outputs with their history replace the stack's float outputs, in order
  size_t k = 0;
  for (size_t i = stack->size() - op.schema().returns().size(); i < stack->size(); ++i)
    if ((*stack)[i].toTensor().is_floating_point()) (*stack)[i] = outs[k++];
}

}  // namespace
}  // namespace fastattn::autograd

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) {
  m.impl("layer_norm_fwd", &fastattn::autograd::layer_norm_fwd_autograd);
  m.impl("silu_mul_fwd", &fastattn::autograd::silu_mul_fwd_autograd);
  for (const char* op : {"quantize_per_token", "int8_gemm", "int8_weight_only_linear",
                         "int8_weight_only_linear_bf16"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&fastattn::autograd::inference_only>());
}
