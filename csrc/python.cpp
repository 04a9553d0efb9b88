// The Python module fastattn._C: the argument checks of the public ops (checks.h) for the Python
// layer, and the fast entry points of the calls a decoding step makes many times.
//
// A fast entry point takes the public function's arguments as Python objects, checks them and,
// when the CPU kernels run the call, calls the op through the dispatcher (autograd, dispatch
// modes and fake tensors all apply as for torch.ops.fastattn.*; its kernel checks the arguments)
// and returns its result; otherwise
// it returns None and the Python layer takes the call (another backend, or the reference). The op
// itself is the dispatcher's: this only skips the Python frames and the schema parsing of a
// torch.ops call, ~8 us of a ~4 us F.layer_norm-sized call (measured on 2 cores).
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/cpu_features.h"

namespace py = pybind11;

namespace fastattn::python {
namespace {

std::string type_name(py::handle h) { return Py_TYPE(h.ptr())->tp_name; }

const at::Tensor& tensor(py::handle h, const std::string& fn, const char* name) {
  if (!THPVariable_Check(h.ptr()))
    throw py::type_error(fn + ": " + name + " must be a torch.Tensor, got " + type_name(h));
  return THPVariable_Unpack(h.ptr());
}

std::optional<at::Tensor> optional_tensor(py::handle h, const std::string& fn, const char* name) {
  if (h.is_none()) return std::nullopt;
  if (!THPVariable_Check(h.ptr()))
    throw py::type_error(fn + ": " + name + " must be a torch.Tensor or None, got " +
                         type_name(h));
  return THPVariable_Unpack(h.ptr());
}

bool is_int(py::handle h) { return PyLong_Check(h.ptr()) && !PyBool_Check(h.ptr()); }

std::vector<int64_t> int_list(py::handle h, const std::string& fn, const char* name) {
  if (is_int(h)) return {PyLong_AsLongLong(h.ptr())};
  if (PyTuple_Check(h.ptr()) || PyList_Check(h.ptr())) {  // torch.Size is a tuple
    std::vector<int64_t> out;
    for (py::handle item : h) {
      if (!is_int(item)) break;
      out.push_back(PyLong_AsLongLong(item.ptr()));
    }
    if (static_cast<Py_ssize_t>(out.size()) == PySequence_Size(h.ptr())) return out;
  }
  throw py::type_error(fn + ": " + name + " must be an int or a sequence of ints, got " +
                       std::string(py::repr(h)));
}

double real(py::handle h, const std::string& fn, const char* name) {
  if (PyFloat_Check(h.ptr())) return PyFloat_AS_DOUBLE(h.ptr());
  if (is_int(h)) return PyLong_AsDouble(h.ptr());
  // other real numbers (numpy scalars); never a bool or a tensor
  if (!PyBool_Check(h.ptr()) && !THPVariable_Check(h.ptr()) && Py_TYPE(h.ptr())->tp_as_number &&
      Py_TYPE(h.ptr())->tp_as_number->nb_float) {
    const double v = PyFloat_AsDouble(h.ptr());
    if (!PyErr_Occurred()) return v;
    PyErr_Clear();
  }
  throw py::type_error(fn + ": " + name + " must be a float, got " + std::string(py::repr(h)));
}

py::object wrap(const at::Tensor& t) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(t)); }

// the largest head dim the attention kernels take (fastattn/ops/attention.py: _MAX_HEAD_DIM)
constexpr int64_t kMaxHeadDim = 256;

bool cpu_kernel_dtype(const std::optional<at::Tensor>& t) {
  return !t.has_value() || checks::kernel_dtype(t->scalar_type());
}

// Every tensor argument on the CPU: the call may go to the dispatcher, whose CPU kernel checks the
// arguments itself. A tensor on another device would make the dispatcher pick that device's
// kernel before any check names the argument, so such a call is checked here instead.
bool all_cpu(std::initializer_list<const at::Tensor*> ts,
             std::initializer_list<const std::optional<at::Tensor>*> opts = {}) {
  for (const at::Tensor* t : ts)
    if (!t->is_cpu()) return false;
  for (const std::optional<at::Tensor>* t : opts)
    if (t->has_value() && !(*t)->is_cpu()) return false;
  return true;
}

// ---- layer_norm / rms_norm ------------------------------------------------------------------
struct NormArgs {
  at::Tensor input;
  std::vector<int64_t> shape;
  std::optional<at::Tensor> weight, bias, residual;
  double eps;
};

NormArgs norm_args(bool rms, py::handle input, py::handle normalized_shape, py::handle weight,
                   py::handle bias, py::handle eps, py::handle residual) {
  const std::string fn = rms ? "fastattn.rms_norm" : "fastattn.layer_norm";
  NormArgs a{tensor(input, fn, "input"), int_list(normalized_shape, fn, "normalized_shape"),
             optional_tensor(weight, fn, "weight"), optional_tensor(bias, fn, "bias"),
             optional_tensor(residual, fn, "residual"), 0.0};
  if (rms && eps.is_none()) {  // F.rms_norm's default: the input dtype's machine epsilon
    switch (a.input.scalar_type()) {
      case at::kHalf: a.eps = 0.0009765625; break;
      case at::kBFloat16: a.eps = 0.0078125; break;
      case at::kDouble: a.eps = std::numeric_limits<double>::epsilon(); break;
      default: a.eps = std::numeric_limits<float>::epsilon();
    }
  } else {
    a.eps = real(eps, fn, "eps");
  }
  return a;
}

py::object norm(bool rms, py::handle input, py::handle normalized_shape, py::handle weight,
                py::handle bias, py::handle eps, py::handle residual) {
  HANDLE_TH_ERRORS
  NormArgs a = norm_args(rms, input, normalized_shape, weight, bias, eps, residual);
  // a residual of another dtype is the fused op's (fastattn/ops/layer_norm.py), not this one's
  if (a.residual.has_value() && a.residual->scalar_type() != a.input.scalar_type())
    return py::none();
  if (!(all_cpu({&a.input}, {&a.weight, &a.bias, &a.residual}) &&
        checks::kernel_dtype(a.input.scalar_type()) && cpu_kernel_dtype(a.weight) &&
        cpu_kernel_dtype(a.bias))) {
    checks::check_norm(rms, a.input, a.shape, a.weight, a.bias, a.residual, a.eps);
    return py::none();
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn::layer_norm_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, at::IntArrayRef, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, bool)>();
  auto [out, residual_out, mean, rstd] =
      op.call(a.input, a.shape, a.weight, a.bias, a.residual, a.eps, rms);
  if (!a.residual.has_value()) return wrap(out);
  return py::make_tuple(wrap(out), wrap(residual_out));
  END_HANDLE_TH_ERRORS_PYBIND
}

// -> (normalized_shape as a tuple, eps resolved)
py::tuple check_norm(bool rms, py::handle input, py::handle normalized_shape, py::handle weight,
                     py::handle bias, py::handle eps, py::handle residual) {
  HANDLE_TH_ERRORS
  NormArgs a = norm_args(rms, input, normalized_shape, weight, bias, eps, residual);
  checks::check_norm(rms, a.input, a.shape, a.weight, a.bias, a.residual, a.eps);
  return py::make_tuple(py::tuple(py::cast(a.shape)), a.eps);
  END_HANDLE_TH_ERRORS_PYBIND
}

// fastattn.layer_norm / rms_norm with FlashAttention's keywords -> (normalized_shape, eps)
py::tuple check_norm_fused(bool rms, py::handle input, py::handle normalized_shape,
                           py::handle weight, py::handle bias, py::handle eps, py::handle residual,
                           py::handle x1, py::handle weight1, py::handle bias1,
                           py::handle rowscale, py::handle offset, py::handle dropout_p,
                           bool residual_in_fp32, bool quantize) {
  HANDLE_TH_ERRORS
  const std::string fn = rms ? "fastattn.rms_norm" : "fastattn.layer_norm";
  NormArgs a = norm_args(rms, input, normalized_shape, weight, bias, eps, residual);
  checks::check_norm_fused(rms, a.input, a.shape, a.weight, a.bias, a.residual,
                           optional_tensor(x1, fn, "x1"), optional_tensor(weight1, fn, "weight1"),
                           optional_tensor(bias1, fn, "bias1"),
                           optional_tensor(rowscale, fn, "rowscale"), a.eps,
                           real(offset, fn, "offset"), real(dropout_p, fn, "dropout_p"),
                           residual_in_fp32, quantize);
  return py::make_tuple(py::tuple(py::cast(a.shape)), a.eps);
  END_HANDLE_TH_ERRORS_PYBIND
}

// fastattn.layer_norm / rms_norm with FlashAttention's keywords and dropout_p == 0 (decoding:
// Gemma's offset, a float32 residual stream, the int8 output): the CPU kernel through the
// dispatcher, the outputs in FlashAttention's order (fastattn/ops/layer_norm.py: _assemble).
// None when the call is not the CPU kernel's.
py::object norm_fused(bool rms, py::handle input, py::handle normalized_shape, py::handle weight,
                      py::handle bias, py::handle eps, py::handle residual, py::handle x1,
                      py::handle weight1, py::handle bias1, py::handle rowscale,
                      py::handle offset, bool residual_in_fp32, py::handle prenorm,
                      bool return_dropout_mask, bool quantize) {
  HANDLE_TH_ERRORS
  const std::string fn = rms ? "fastattn.rms_norm" : "fastattn.layer_norm";
  NormArgs a = norm_args(rms, input, normalized_shape, weight, bias, eps, residual);
  const std::optional<at::Tensor> x1t = optional_tensor(x1, fn, "x1"),
                                  w1 = optional_tensor(weight1, fn, "weight1"),
                                  b1 = optional_tensor(bias1, fn, "bias1"),
                                  rs = optional_tensor(rowscale, fn, "rowscale");
  const double off = real(offset, fn, "offset");
  checks::check_norm_fused(rms, a.input, a.shape, a.weight, a.bias, a.residual, x1t, w1, b1, rs,
                           a.eps, off, 0.0, residual_in_fp32, quantize);
  if (!(all_cpu({&a.input}, {&a.weight, &a.bias, &a.residual, &x1t, &w1, &b1, &rs}) &&
        checks::kernel_dtype(a.input.scalar_type()) && cpu_kernel_dtype(a.weight) &&
        cpu_kernel_dtype(a.bias) && cpu_kernel_dtype(a.residual) && cpu_kernel_dtype(w1) &&
        cpu_kernel_dtype(b1) && cpu_kernel_dtype(rs) && a.input.numel() > 0))
    return py::none();
  using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor, at::Tensor>;
  using Opt = const std::optional<at::Tensor>&;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn::layer_norm_fused_fwd", "")
          .typed<Out(const at::Tensor&, at::IntArrayRef, Opt, Opt, Opt, Opt, Opt, Opt, Opt,
                     double, bool, double, double, int64_t, bool, bool)>();
  auto [out, out1, residual_out, mask, mask1, mean, rstd, scale] =
      op.call(a.input, a.shape, a.weight, a.bias, a.residual, x1t, w1, b1, rs, a.eps, rms, off,
              0.0, 0, residual_in_fp32, quantize);
  py::list outs;
  outs.append(wrap(out));
  if (quantize) outs.append(wrap(scale));
  if (w1.has_value()) outs.append(wrap(out1));
  const bool pre = prenorm.is_none() ? a.residual.has_value() : PyObject_IsTrue(prenorm.ptr()) == 1;
  if (pre) {  // x', or the input itself when nothing was combined (residual_out is then empty)
    outs.append(residual_out.numel() > 0 ? wrap(residual_out)
                                         : py::reinterpret_borrow<py::object>(input));
  }
  if (return_dropout_mask) {
    outs.append(py::none());
    outs.append(py::none());
  }
  if (outs.size() == 1) return outs[0];
  return py::tuple(outs);
  END_HANDLE_TH_ERRORS_PYBIND
}

// ---- attention_with_kvcache -----------------------------------------------------------------
struct KvArgs {
  at::Tensor q, k_cache, v_cache, cache_seqlens;
  std::optional<at::Tensor> k_new, v_new, cache_leftpad, rotary_cos, rotary_sin;
  double scale;
  double softcap = 0.0;
  std::optional<at::Tensor> alibi_slopes, sinks, block_table;
  int64_t window_left = -1, window_right = -1;
};

int64_t window_side(py::handle h, const std::string& fn) {
  TORCH_CHECK_TYPE(is_int(h), fn, ": window sizes must be ints, got ", type_name(h));
  return h.cast<int64_t>();
}

KvArgs kv_args(py::handle q, py::handle k_cache, py::handle v_cache, py::handle cache_seqlens,
               py::handle k_new, py::handle v_new, py::handle scale, py::handle cache_leftpad,
               py::handle rotary_cos, py::handle rotary_sin, py::handle block_table,
               py::handle window_left, py::handle window_right) {
  const std::string fn = "fastattn.attention_with_kvcache";
  KvArgs a{tensor(q, fn, "q"),
           tensor(k_cache, fn, "k_cache"),
           tensor(v_cache, fn, "v_cache"),
           tensor(cache_seqlens, fn, "cache_seqlens"),
           optional_tensor(k_new, fn, "k_new"),
           optional_tensor(v_new, fn, "v_new"),
           optional_tensor(cache_leftpad, fn, "cache_leftpad"),
           optional_tensor(rotary_cos, fn, "rotary_cos"),
           optional_tensor(rotary_sin, fn, "rotary_sin"),
           0.0};
  if (scale.is_none()) {
    const int64_t e = a.q.dim() == 4 ? a.q.size(3) : 0;
    a.scale = e > 0 ? 1.0 / std::sqrt(static_cast<double>(e)) : 1.0;  // E = 0: all scores are 0
  } else {
    a.scale = real(scale, fn, "scale");
  }
  a.block_table = optional_tensor(block_table, fn, "block_table");
  a.window_left = window_side(window_left, fn);
  a.window_right = window_side(window_right, fn);
  return a;
}

// block_table, window_left / window_right (ints, -1: unbounded) and return_lse come after the
// arguments of the first version, so its callers keep working
py::object kvcache(py::handle q, py::handle k_cache, py::handle v_cache, py::handle cache_seqlens,
                   py::handle k_new, py::handle v_new, py::handle scale, py::handle causal,
                   py::handle cache_leftpad, py::handle rotary_cos, py::handle rotary_sin,
                   py::handle rotary_interleaved, py::handle block_table, py::handle window_left,
                   py::handle window_right, py::handle return_lse) {
  HANDLE_TH_ERRORS
  const int is_causal = PyObject_IsTrue(causal.ptr());  // any truthy value, as in Python
  if (is_causal < 0) throw py::error_already_set();
  const int interleaved = PyObject_IsTrue(rotary_interleaved.ptr());
  if (interleaved < 0) throw py::error_already_set();
  const int want_lse = PyObject_IsTrue(return_lse.ptr());
  if (want_lse < 0) throw py::error_already_set();
  KvArgs a = kv_args(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, cache_leftpad,
                     rotary_cos, rotary_sin, block_table, window_left, window_right);
  if (!(all_cpu({&a.q, &a.k_cache, &a.v_cache, &a.cache_seqlens},
                {&a.k_new, &a.v_new, &a.cache_leftpad, &a.rotary_cos, &a.rotary_sin,
                 &a.block_table}) &&
        checks::kernel_dtype(a.q.scalar_type()) && a.q.dim() == 4 && a.v_cache.dim() == 4 &&
        std::max(a.q.size(3), a.v_cache.size(3)) <= kMaxHeadDim)) {
    checks::check_kvcache(a.q, a.k_cache, a.v_cache, a.cache_seqlens, a.k_new, a.v_new, a.scale,
                          a.cache_leftpad, a.rotary_cos, a.rotary_sin, 0.0, std::nullopt,
                          std::nullopt, a.block_table, a.window_left, a.window_right);
    return py::none();
  }
  using Sig = at::Tensor(const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                         double, bool, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                         bool, double, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                         int64_t, int64_t);
  using SigLse = std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, bool,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, bool, double, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, int64_t);
  // (the fast path serves calls without score modifiers: the Python layer sends those here)
  if (want_lse == 1) {
    static const auto op_lse = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("fastattn::attention_kvcache_lse", "")
                                   .typed<SigLse>();
    auto [out, lse] = op_lse.call(a.q, a.k_cache, a.v_cache, a.cache_seqlens, a.k_new, a.v_new,
                                  a.scale, is_causal == 1, a.cache_leftpad, a.rotary_cos,
                                  a.rotary_sin, interleaved == 1, 0.0, std::nullopt, std::nullopt,
                                  a.block_table, a.window_left, a.window_right);
    return py::make_tuple(wrap(out), wrap(lse));
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattn::attention_kvcache", "")
                             .typed<Sig>();
  return wrap(op.call(a.q, a.k_cache, a.v_cache, a.cache_seqlens, a.k_new, a.v_new, a.scale,
                      is_causal == 1, a.cache_leftpad, a.rotary_cos, a.rotary_sin,
                      interleaved == 1, 0.0, std::nullopt, std::nullopt, a.block_table,
                      a.window_left, a.window_right));
  END_HANDLE_TH_ERRORS_PYBIND
}

// -> the scale resolved
// softcap: 0 for none (the Python layer refuses softcap <= 0 before passing it)
double check_kvcache(py::handle q, py::handle k_cache, py::handle v_cache,
                     py::handle cache_seqlens, py::handle k_new, py::handle v_new,
                     py::handle scale, py::handle cache_leftpad, py::handle rotary_cos,
                     py::handle rotary_sin, double softcap, py::handle alibi_slopes,
                     py::handle sinks, py::handle block_table, py::handle window_left,
                     py::handle window_right) {
  HANDLE_TH_ERRORS
  const std::string fn = "fastattn.attention_with_kvcache";
  KvArgs a = kv_args(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, cache_leftpad,
                     rotary_cos, rotary_sin, block_table, window_left, window_right);
  a.softcap = softcap;
  a.alibi_slopes = optional_tensor(alibi_slopes, fn, "alibi_slopes");
  a.sinks = optional_tensor(sinks, fn, "sinks");
  checks::check_kvcache(a.q, a.k_cache, a.v_cache, a.cache_seqlens, a.k_new, a.v_new, a.scale,
                        a.cache_leftpad, a.rotary_cos, a.rotary_sin, a.softcap, a.alibi_slopes,
                        a.sinks, a.block_table, a.window_left, a.window_right);
  return a.scale;
  END_HANDLE_TH_ERRORS_PYBIND
}

// ---- int8 linear ----------------------------------------------------------------------------
struct LinearArgs {
  at::Tensor x, w_int8, w_scale;
  std::optional<at::Tensor> bias;
};

LinearArgs linear_args(const std::string& fn, py::handle x, py::handle w_int8, py::handle w_scale,
                       py::handle bias) {
  if (w_scale.is_none())
    throw py::type_error(fn + ": w_scale is required: the float32 (N,) per-channel scale of w_int8");
  return {tensor(x, fn, "x"), tensor(w_int8, fn, "w_int8"), tensor(w_scale, fn, "w_scale"),
          optional_tensor(bias, fn, "bias")};
}

py::object int8_weight_only_linear(py::handle x, py::handle w_int8, py::handle w_scale,
                                   py::handle bias) {
  HANDLE_TH_ERRORS
  const std::string fn = "fastattn.int8_weight_only_linear";
  LinearArgs a = linear_args(fn, x, w_int8, w_scale, bias);
  if (!(all_cpu({&a.x, &a.w_int8, &a.w_scale}, {&a.bias}) &&
        checks::kernel_dtype(a.x.scalar_type()))) {
    checks::check_int8_linear(fn.c_str(), a.x, a.w_int8, a.w_scale, a.bias);
    return py::none();
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn::int8_weight_only_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&)>();
  return wrap(op.call(a.x, a.w_int8, a.w_scale, a.bias));
  END_HANDLE_TH_ERRORS_PYBIND
}

void check_int8_linear(const std::string& fn, py::handle x, py::handle w_int8, py::handle w_scale,
                       py::handle bias) {
  HANDLE_TH_ERRORS
  LinearArgs a = linear_args(fn, x, w_int8, w_scale, bias);
  checks::check_int8_linear(fn.c_str(), a.x, a.w_int8, a.w_scale, a.bias);
  END_HANDLE_TH_ERRORS_PYBIND
}

// ---- linear ----------------------------------------------------------------------------------
py::object linear(py::handle x, py::handle weight, py::handle bias) {
  HANDLE_TH_ERRORS
  static const std::string fn = "fastattn.linear";
  const at::Tensor& xt = tensor(x, fn, "x");
  const at::Tensor& wt = tensor(weight, fn, "weight");
  std::optional<at::Tensor> b = optional_tensor(bias, fn, "bias");
  if (!(all_cpu({&xt, &wt}, {&b}) && checks::kernel_dtype(xt.scalar_type()))) {
    checks::check_linear(xt, wt, b);
    return py::none();
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattn::linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&)>();
  return wrap(op.call(xt, wt, b));
  END_HANDLE_TH_ERRORS_PYBIND
}

void check_linear(py::handle x, py::handle weight, py::handle bias) {
  HANDLE_TH_ERRORS
  static const std::string fn = "fastattn.linear";
  checks::check_linear(tensor(x, fn, "x"), tensor(weight, fn, "weight"),
                       optional_tensor(bias, fn, "bias"));
  END_HANDLE_TH_ERRORS_PYBIND
}

// ---- silu_mul --------------------------------------------------------------------------------
py::object silu_mul(py::handle x) {
  HANDLE_TH_ERRORS
  static const std::string fn = "fastattn.silu_mul";
  const at::Tensor& t = tensor(x, fn, "x");
  if (!(t.is_cpu() && checks::kernel_dtype(t.scalar_type()))) {
    checks::check_silu_mul(t);
    return py::none();
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattn::silu_mul_fwd", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return wrap(op.call(t));
  END_HANDLE_TH_ERRORS_PYBIND
}

// grad: None for the forward's rules, else the backward's (grad (..., I) of x's dtype and device)
void check_silu_mul(py::handle x, py::handle grad) {
  HANDLE_TH_ERRORS
  checks::check_silu_mul(tensor(x, "fastattn.silu_mul", "x"),
                         optional_tensor(grad, "fastattn.silu_mul", "grad"));
  END_HANDLE_TH_ERRORS_PYBIND
}

// ---- attention_varlen ------------------------------------------------------------------------
// checks::check_varlen for the Python layer -> the scale resolved (1/sqrt(E) for None).
// softcap: 0 for none (the Python layer refuses softcap <= 0 before passing it).
double check_varlen(py::handle q, py::handle k, py::handle v, py::handle cu_seqlens_q,
                    py::handle cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                    py::handle scale, double dropout_p, double softcap, py::handle alibi_slopes,
                    py::handle sinks) {
  HANDLE_TH_ERRORS
  const std::string fn = "fastattn.attention_varlen";
  const at::Tensor& qt = tensor(q, fn, "q");
  double sc;
  if (scale.is_none()) {
    const int64_t e = qt.dim() == 3 ? qt.size(2) : 0;
    sc = e > 0 ? 1.0 / std::sqrt(static_cast<double>(e)) : 1.0;  // E = 0: all scores are 0
  } else {
    sc = real(scale, fn, "scale");
  }
  checks::check_varlen(qt, tensor(k, fn, "k"), tensor(v, fn, "v"),
                       tensor(cu_seqlens_q, fn, "cu_seqlens_q"),
                       tensor(cu_seqlens_k, fn, "cu_seqlens_k"), max_seqlen_q, max_seqlen_k, sc,
                       dropout_p, softcap, optional_tensor(alibi_slopes, fn, "alibi_slopes"),
                       optional_tensor(sinks, fn, "sinks"));
  return sc;
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace
}  // namespace fastattn::python

PYBIND11_MODULE(_C, m) {
  using namespace fastattn::python;
  m.doc() = "fastattn's C++ extension: op kernels (registered with torch.library on import), "
            "argument checks and fast entry points";
  m.def("norm", &norm);
  m.def("check_norm", &check_norm);
  m.def("check_norm_fused", &check_norm_fused);
  m.def("norm_fused", &norm_fused);
  m.def("kvcache", &kvcache, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("cache_seqlens"), py::arg("k_new"), py::arg("v_new"), py::arg("scale"),
        py::arg("causal"), py::arg("cache_leftpad"), py::arg("rotary_cos"), py::arg("rotary_sin"),
        py::arg("rotary_interleaved"), py::arg("block_table") = py::none(),
        py::arg("window_left") = -1, py::arg("window_right") = -1,
        py::arg("return_lse") = false);
  m.def("check_kvcache", &check_kvcache, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("cache_seqlens"), py::arg("k_new"), py::arg("v_new"), py::arg("scale"),
        py::arg("cache_leftpad"), py::arg("rotary_cos"), py::arg("rotary_sin"),
        py::arg("softcap"), py::arg("alibi_slopes"), py::arg("sinks"),
        py::arg("block_table") = py::none(), py::arg("window_left") = -1,
        py::arg("window_right") = -1);
  m.def("int8_weight_only_linear", &int8_weight_only_linear);
  m.def("check_int8_linear", &check_int8_linear);
  m.def("linear", &linear);
  m.def("check_linear", &check_linear);
  m.def("silu_mul", &silu_mul);
  m.def("check_silu_mul", &check_silu_mul, py::arg("x"), py::arg("grad") = py::none());
  m.def("check_varlen", &check_varlen);
  m.def("cpu_isa", [] { return std::string(fastattn::cpu::isa_name(fastattn::cpu::cpu_isa())); },
        "The instruction-set level the CPU kernels run at now (FASTATTN_CPU_ISA caps it).");
}
