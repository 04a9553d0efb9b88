// The public ops' argument rules (see checks.h for who calls them and why they live here).
#include "checks.h"

#include <c10/core/DispatchKey.h>
#include <c10/core/SymInt.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastattn::checks {
namespace {

bool accepted_float(c10::ScalarType dt) { return kernel_dtype(dt) || dt == at::kDouble; }

// A tensor whose values can be read here: a real CPU tensor, not a fake, meta or functional
// one seen while torch.compile traces.
bool host_readable(const at::Tensor& t) {
  return t.is_cpu() && !t.unsafeGetTensorImpl()->is_python_dispatch() &&
         !t.key_set().has(c10::DispatchKey::Functionalize);
}

void check_float(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(accepted_float(t.scalar_type()), fn, ": ", name,
                   " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

void check_device(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& ref,
                  const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), fn, ": ", name, " must be on the same device as ",
              ref_name, " (", ref.device(), "), got ", t.device());
}

void check_finite(const char* fn, const char* name, const at::Tensor& t) {
  // Non-finite scales turn whole rows or columns into NaN. Read only where that is free (host
  // tensors); a GPU check would synchronise.
  if (!host_readable(t) || t.numel() == 0) return;
  const at::Tensor c = t.contiguous();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "check_finite", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < c.numel(); ++i) ok &= std::isfinite(static_cast<double>(p[i]));
  });
  TORCH_CHECK_VALUE(ok, fn, ": ", name, " has non-finite values");
}

// (n,) float vector, e.g. a per-channel scale or a bias; name "what" it holds for the message.
void check_vector(const char* fn, const char* name, const at::Tensor& t, const c10::SymInt& n,
                  const at::Tensor& ref, const char* ref_name, const char* what) {
  TORCH_CHECK_TYPE(t.is_floating_point(), fn, ": ", name, " must be a floating-point tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.sym_size(0) == n, fn, ": ", name, " must have shape (", n,
                    ",) (", what, "), got ", t.sym_sizes());
  check_device(fn, name, t, ref, ref_name);
}

// attention_with_kvcache's paged cache: block_table int32 (B, max_blocks) on q's device, caches
// (num_blocks, Hkv, block_size, E) with block_size a positive multiple of 16.
void check_block_table(const char* fn, const at::Tensor& q, const at::Tensor& k_cache,
                       const at::Tensor& bt) {
  const auto qs = q.sym_sizes(), ks = k_cache.sym_sizes();
  TORCH_CHECK_TYPE(bt.scalar_type() == at::kInt, fn,
                   ": block_table must be None or an int32 tensor of shape (B, max_blocks), got ",
                   bt.scalar_type());
  TORCH_CHECK_VALUE(bt.dim() == 2 && bt.sym_size(0) == qs[0], fn,
                    ": block_table must have shape (B, max_blocks) with B = ", qs[0], ", got ",
                    bt.sym_sizes());
  check_device(fn, "block_table", bt, q, "q");
  TORCH_CHECK_VALUE(ks[3] == qs[3], fn,
                    ": k_cache must be (num_blocks, Hkv, block_size, E=", qs[3],
                    ") with block_table, got ", ks);
  TORCH_CHECK_VALUE(ks[2] > 0 && ks[2] % 16 == 0, fn,
                    ": the paged cache's block_size (k_cache.shape[2]) must be a positive "
                    "multiple of 16, got ", ks[2]);
}

// The entries that hold tokens [0, seqlens[b] + extra) of each sequence index a block of the pool.
void check_block_entries(const char* fn, const at::Tensor& block_table, const int32_t* seqlens,
                         int64_t extra, int64_t num_blocks, int64_t block_size) {
  const at::Tensor bt = block_table.contiguous();
  const int32_t* p = bt.const_data_ptr<int32_t>();
  const int64_t B = bt.size(0), nb = bt.size(1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t used = std::min<int64_t>(nb, (seqlens[b] + extra + block_size - 1) / block_size);
    for (int64_t x = 0; x < used; ++x)
      TORCH_CHECK_VALUE(p[b * nb + x] >= 0 && p[b * nb + x] < num_blocks, fn, ": block_table[", b,
                        ", ", x, "] = ", p[b * nb + x],
                        " must index a block of the cache: [0, num_blocks) = [0, ", num_blocks,
                        ")");
  }
}

}  // namespace

bool kernel_dtype(c10::ScalarType dt) {
  return dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf;
}

int64_t check_norm(bool rms, const at::Tensor& input, c10::IntArrayRef normalized_shape,
                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& residual, double eps) {
  const char* fn = rms ? "fastattn.rms_norm" : "fastattn.layer_norm";
  TORCH_CHECK_TYPE(input.is_floating_point(), fn, ": input must be a floating-point tensor, got ",
                   input.scalar_type());
  check_float(fn, "input", input);
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK_VALUE(nd > 0, fn, ": normalized_shape must have at least one dimension");
  int64_t n = 1;
  for (const int64_t s : normalized_shape) {
    TORCH_CHECK_VALUE(s >= 0, fn, ": normalized_shape must not hold a negative size, got ",
                      normalized_shape);
    n *= s;
  }
  const auto shape = input.sym_sizes();
  bool match = nd <= input.dim();
  for (int64_t i = 0; match && i < nd; ++i)
    match = shape[input.dim() - nd + i] == normalized_shape[i];
  TORCH_CHECK_VALUE(match, fn, ": normalized_shape=", normalized_shape,
                    " must match the trailing dimensions of input, got input of shape ", shape);
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias}}) {
    if (!t->has_value()) continue;
    const at::Tensor& p = **t;
    TORCH_CHECK_TYPE(p.is_floating_point(), fn, ": ", name, " must be a floating-point tensor, got ",
                     p.scalar_type());
    check_float(fn, name, p);
    TORCH_CHECK_VALUE(p.sym_sizes() == c10::fromIntArrayRefSlow(normalized_shape), fn, ": ", name,
                      " must have shape ", normalized_shape, ", got ", p.sym_sizes());
    check_device(fn, name, p, input, "input");
  }
  TORCH_CHECK_VALUE(!(rms && bias.has_value()), fn, ": takes no bias");
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK_VALUE(r.sym_sizes() == shape, fn, ": residual must have input's shape ", shape,
                      ", got ", r.sym_sizes());
    TORCH_CHECK_TYPE(r.scalar_type() == input.scalar_type(), fn,
                     ": residual must have input's dtype (", input.scalar_type(), "), got ",
                     r.scalar_type());
    check_device(fn, "residual", r, input, "input");
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, fn, ": eps must be finite and >= 0, got ",
                    eps);
  return n;
}

int64_t check_norm_fused(bool rms, const at::Tensor& input, c10::IntArrayRef normalized_shape,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& x1,
                         const std::optional<at::Tensor>& weight1,
                         const std::optional<at::Tensor>& bias1,
                         const std::optional<at::Tensor>& rowscale, double eps, double offset,
                         double dropout_p, bool residual_in_fp32, bool quantize) {
  const char* fn = rms ? "fastattn.rms_norm" : "fastattn.layer_norm";
  const int64_t n = check_norm(rms, input, normalized_shape, weight, bias, std::nullopt, eps);
  const auto shape = input.sym_sizes();
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK_VALUE(r.sym_sizes() == shape, fn, ": residual must have input's shape ", shape,
                      ", got ", r.sym_sizes());
    TORCH_CHECK_TYPE(r.is_floating_point(), fn, ": residual must be a floating-point tensor, got ",
                     r.scalar_type());
    check_float(fn, "residual", r);
    const auto promoted = c10::promoteTypes(input.scalar_type(), r.scalar_type());
    TORCH_CHECK_TYPE(residual_in_fp32 || promoted == r.scalar_type(), fn, ": residual of dtype ",
                     r.scalar_type(), " cannot hold input + residual (", promoted,
                     " for an input of dtype ", input.scalar_type(),
                     "): pass a residual of dtype ", promoted, " or residual_in_fp32=True");
    check_device(fn, "residual", r, input, "input");
  }
  if (x1.has_value()) {
    TORCH_CHECK_VALUE(x1->sym_sizes() == shape, fn, ": x1 must have input's shape ", shape,
                      ", got ", x1->sym_sizes());
    TORCH_CHECK_TYPE(x1->scalar_type() == input.scalar_type(), fn, ": x1 must have input's dtype (",
                     input.scalar_type(), "), got ", x1->scalar_type());
    check_device(fn, "x1", *x1, input, "input");
  }
  for (const auto& [name, t] : {std::pair{"weight1", &weight1}, std::pair{"bias1", &bias1}}) {
    if (!t->has_value()) continue;
    const at::Tensor& p = **t;
    TORCH_CHECK_TYPE(p.is_floating_point(), fn, ": ", name, " must be a floating-point tensor, got ",
                     p.scalar_type());
    check_float(fn, name, p);
    TORCH_CHECK_VALUE(p.sym_sizes() == c10::fromIntArrayRefSlow(normalized_shape), fn, ": ", name,
                      " must have shape ", normalized_shape, ", got ", p.sym_sizes());
    check_device(fn, name, p, input, "input");
  }
  TORCH_CHECK_VALUE(!(rms && bias1.has_value()), fn, ": takes no bias1");
  TORCH_CHECK_VALUE(!bias1.has_value() || weight1.has_value(), fn,
                    ": bias1 needs weight1 (the second output is norm(x) * weight1 + bias1)");
  if (rowscale.has_value()) {
    const at::Tensor& rs = *rowscale;
    TORCH_CHECK_TYPE(rs.is_floating_point(), fn, ": rowscale must be a floating-point tensor, got ",
                     rs.scalar_type());
    check_float(fn, "rowscale", rs);
    const c10::SymIntArrayRef lead = shape.slice(0, input.dim() - nd);
    TORCH_CHECK_VALUE(rs.sym_sizes() == lead, fn,
                      ": rowscale must have input's leading shape ", lead,
                      " (one scale per normalised row), got ", rs.sym_sizes());
    check_device(fn, "rowscale", rs, input, "input");
  }
  TORCH_CHECK_VALUE(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p < 1.0, fn,
                    ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(std::isfinite(offset), fn, ": offset must be finite, got ", offset);
  TORCH_CHECK_VALUE(offset == 0.0 || weight.has_value(), fn,
                    ": offset needs weight (the output is norm(x) * (offset + weight))");
  TORCH_CHECK_VALUE(!(quantize && weight1.has_value()), fn,
                    ": quantize takes no weight1 (one output is quantized)");
  return n;
}

void check_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                   const std::optional<at::Tensor>& v_new, double scale,
                   const std::optional<at::Tensor>& cache_leftpad,
                   const std::optional<at::Tensor>& rotary_cos,
                   const std::optional<at::Tensor>& rotary_sin, double softcap,
                   const std::optional<at::Tensor>& alibi_slopes,
                   const std::optional<at::Tensor>& sinks,
                   const std::optional<at::Tensor>& block_table, int64_t window_left,
                   int64_t window_right) {
  constexpr const char* fn = "fastattn.attention_with_kvcache";
  for (const auto& [name, t] : {std::pair{"q", &q}, std::pair{"k_cache", &k_cache},
                                std::pair{"v_cache", &v_cache}}) {
    TORCH_CHECK_VALUE(t->dim() == 4, fn, ": ", name, " must be 4-D, got shape ", t->sym_sizes());
    check_float(fn, name, *t);
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), fn, ": ", name, " must have q's dtype (",
                     q.scalar_type(), "), got ", t->scalar_type());
    check_device(fn, name, *t, q, "q");
  }
  const auto qs = q.sym_sizes(), ks = k_cache.sym_sizes(), vs = v_cache.sym_sizes();
  const bool paged = block_table.has_value();
  if (paged) {
    check_block_table(fn, q, k_cache, *block_table);
  } else {
    TORCH_CHECK_VALUE(ks[0] == qs[0] && ks[3] == qs[3], fn, ": k_cache must be (B=", qs[0],
                      ", Hkv, capacity, E=", qs[3], "), got ", ks);
  }
  TORCH_CHECK_VALUE(vs[0] == ks[0] && vs[1] == ks[1] && vs[2] == ks[2], fn,
                    paged ? ": v_cache must be (num_blocks, Hkv, block_size, Ev) like k_cache "
                          : ": v_cache must be (B, Hkv, capacity, Ev) like k_cache ",
                    ks, ", got ", vs);
  TORCH_CHECK_VALUE(ks[1] != 0 && qs[1] % ks[1] == 0, fn, ": q heads (", qs[1],
                    ") must be a multiple of the cache heads (", ks[1], ")");
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, fn,
                   ": cache_seqlens must be an int32 tensor of shape (B,), got ",
                   cache_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.sym_size(0) == qs[0], fn,
                    ": cache_seqlens must have shape (", qs[0], ",), got ",
                    cache_seqlens.sym_sizes());
  check_device(fn, "cache_seqlens", cache_seqlens, q, "q");
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), fn,
                    ": k_new and v_new must be given together");
  if (k_new.has_value()) {
    for (const auto& [name, t, e] : {std::tuple{"k_new", &*k_new, qs[3]},
                                     std::tuple{"v_new", &*v_new, vs[3]}}) {
      // any number of new tokens Lnew (k_new's), not only Lq
      const std::vector<c10::SymInt> want{qs[0], ks[1], k_new->sym_size(2), e};
      TORCH_CHECK_VALUE(t->dim() == 4 && t->sym_sizes() == c10::SymIntArrayRef(want), fn, ": ",
                        name, " must have shape (B, Hkv, Lnew, E) = ", c10::SymIntArrayRef(want),
                        ", got ", t->sym_sizes());
      TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), fn, ": ", name,
                       " must have q's dtype (", q.scalar_type(), "), got ", t->scalar_type());
      check_device(fn, name, *t, q, "q");
    }
  }
  if (cache_leftpad.has_value()) {
    const at::Tensor& lp = *cache_leftpad;
    TORCH_CHECK_TYPE(lp.scalar_type() == at::kInt, fn,
                     ": cache_leftpad must be None or an int32 tensor of shape (B,), got ",
                     lp.scalar_type());
    TORCH_CHECK_VALUE(lp.dim() == 1 && lp.sym_size(0) == qs[0], fn,
                      ": cache_leftpad must have shape (", qs[0], ",), got ", lp.sym_sizes());
    check_device(fn, "cache_leftpad", lp, q, "q");
  }
  const bool rotary = rotary_cos.has_value() || rotary_sin.has_value();
  if (rotary) {
    TORCH_CHECK_VALUE(rotary_cos.has_value() && rotary_sin.has_value(), fn, ": ",
                      rotary_cos.has_value() ? "rotary_sin" : "rotary_cos",
                      " is missing: rotary_cos and rotary_sin must be given together");
    TORCH_CHECK_VALUE(k_new.has_value(), fn,
                      ": rotary_cos/rotary_sin need k_new and v_new (the new keys are rotated "
                      "before they are written to the cache, whose keys are already rotated)");
    for (const auto& [name, t] : {std::pair{"rotary_cos", &*rotary_cos},
                                  std::pair{"rotary_sin", &*rotary_sin}}) {
      TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type() || t->scalar_type() == at::kFloat, fn,
                       ": ", name, " must have q's dtype (", q.scalar_type(),
                       ") or float32, got ", t->scalar_type());
      TORCH_CHECK_VALUE(t->dim() == 2, fn, ": ", name,
                        " must be 2-D (max_pos, rotary_dim / 2), got shape ", t->sym_sizes());
      check_device(fn, name, *t, q, "q");
    }
    TORCH_CHECK_TYPE(rotary_sin->scalar_type() == rotary_cos->scalar_type(), fn,
                     ": rotary_sin must have rotary_cos's dtype (", rotary_cos->scalar_type(),
                     "), got ", rotary_sin->scalar_type());
    const auto cs = rotary_cos->sym_sizes();
    TORCH_CHECK_VALUE(rotary_sin->sym_sizes() == cs, fn,
                      ": rotary_sin must have rotary_cos's shape ", cs, ", got ",
                      rotary_sin->sym_sizes());
    TORCH_CHECK_VALUE(cs[0] >= 1, fn,
                      ": rotary_cos must have at least one position (row), got shape ", cs);
    TORCH_CHECK_VALUE(cs[1] >= 1 && cs[1] * 2 <= qs[3], fn,
                      ": rotary_cos must have shape (max_pos, rotary_dim / 2) with rotary_dim "
                      "even and 2 <= rotary_dim <= E = ", qs[3],
                      " (the first rotary_dim dims of each head are rotated), got shape ", cs,
                      ", i.e. rotary_dim = ", cs[1] * 2);
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, fn,
                    ": window sizes must be >= 0 (or -1 for unbounded), got (", window_left, ", ",
                    window_right, ")");
  check_score_mods(fn, q, softcap, alibi_slopes, sinks);
  if (!host_readable(cache_seqlens)) return;
  // the values, where they are on the host already
  const int64_t B = q.size(0), extra = k_new.has_value() ? k_new->size(2) : 0;
  const int64_t cap = paged ? block_table->size(1) * k_cache.size(2) : k_cache.size(2);
  const at::Tensor sl = cache_seqlens.contiguous();
  const int32_t* slp = sl.const_data_ptr<int32_t>();
  int64_t lo = 0, hi = 0;
  for (int64_t b = 0; b < B; ++b) {
    lo = b == 0 ? slp[b] : std::min<int64_t>(lo, slp[b]);
    hi = b == 0 ? slp[b] : std::max<int64_t>(hi, slp[b]);
  }
  TORCH_CHECK_VALUE(B == 0 || (lo >= 0 && hi + extra <= cap), fn,
                    ": cache_seqlens must lie in [0, capacity - new tokens] = [0, ", cap - extra,
                    "]", paged ? " (capacity = block_table.shape[1] * block_size)" : "",
                    ", got values in [", lo, ", ", hi, "]");
  if (paged && host_readable(*block_table))
    check_block_entries(fn, *block_table, slp, extra, k_cache.size(0), k_cache.size(2));
  at::Tensor lp;
  const int32_t* lpp = nullptr;
  if (cache_leftpad.has_value()) {
    if (!host_readable(*cache_leftpad)) return;
    lp = cache_leftpad->contiguous();
    lpp = lp.const_data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK_VALUE(lpp[b] >= 0 && lpp[b] <= slp[b] + extra, fn, ": cache_leftpad[", b,
                        "] = ", lpp[b], " must lie in [0, cache_seqlens[", b,
                        "] + new tokens] = [0, ", slp[b] + extra, "]");
  }
  if (!rotary || extra == 0) return;
  // the last new token of sequence b is rotated at position seqlens[b] - leftpad[b] + Lq - 1
  int64_t reach = 0, at_b = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = slp[b] - (lpp != nullptr ? lpp[b] : 0) + extra;
    if (b == 0 || r > reach) reach = r, at_b = b;
  }
  TORCH_CHECK_VALUE(B == 0 || rotary_cos->sym_size(0) >= reach, fn, ": rotary_cos has ",
                    rotary_cos->sym_size(0), " positions (rows) but the new tokens of sequence ",
                    at_b, " reach position ", reach - 1,
                    " (cache_seqlens[b] - cache_leftpad[b] + Lq - 1): the tables need at least ",
                    reach, " rows");
}

void check_score_mods(const char* fn, const at::Tensor& q, double softcap,
                      const std::optional<at::Tensor>& alibi_slopes,
                      const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, fn,
                    ": softcap must be a finite float > 0 (or None), got ", softcap);
  const auto qs = q.sym_sizes();
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, fn,
                     ": alibi_slopes must be a float32 tensor, got ", a.scalar_type());
    const bool ok = (a.dim() == 1 && a.sym_size(0) == qs[1]) ||
                    (a.dim() == 2 && a.sym_size(0) == qs[0] && a.sym_size(1) == qs[1]);
    TORCH_CHECK_VALUE(ok, fn, ": alibi_slopes must have shape (H,) = (", qs[1],
                      ",) or (B, H) = (", qs[0], ", ", qs[1], "), got ", a.sym_sizes());
    check_device(fn, "alibi_slopes", a, q, "q");
  }
  if (sinks.has_value()) {
    const at::Tensor& s = *sinks;
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, fn, ": sinks must be a float32 tensor, got ",
                     s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.sym_size(0) == qs[1], fn,
                      ": sinks must have shape (H,) = (", qs[1], ",), got ", s.sym_sizes());
    check_device(fn, "sinks", s, q, "q");
  }
}

void check_int8_linear(const char* fn, const at::Tensor& x, const at::Tensor& w_int8,
                       const at::Tensor& w_scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_TYPE(x.is_floating_point(), fn, ": x must be a floating-point tensor, got ",
                   x.scalar_type());
  check_float(fn, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, fn, ": x must have at least one dimension (..., K)");
  TORCH_CHECK_TYPE(w_int8.scalar_type() == at::kChar, fn, ": w_int8 must be an int8 tensor, got ",
                   w_int8.scalar_type());
  TORCH_CHECK_VALUE(w_int8.dim() == 2, fn, ": w_int8 must be 2-D (N, K), got shape ",
                    w_int8.sym_sizes());
  TORCH_CHECK_VALUE(x.sym_size(-1) == w_int8.sym_size(1), fn, ": x.shape[-1] (", x.sym_size(-1),
                    ") must equal w_int8.shape[1] (", w_int8.sym_size(1), "): w_int8 is (N, K)");
  check_device(fn, "w_int8", w_int8, x, "x");
  const c10::SymInt n = w_int8.sym_size(0);
  check_vector(fn, "w_scale", w_scale, n, x, "x", "one scale per output channel");
  if (bias.has_value()) check_vector(fn, "bias", *bias, n, x, "x", "one value per output channel");
  check_finite(fn, "w_scale", w_scale);
}

void check_linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  constexpr const char* fn = "fastattn.linear";
  TORCH_CHECK_TYPE(x.is_floating_point(), fn, ": x must be a floating-point tensor, got ",
                   x.scalar_type());
  check_float(fn, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, fn, ": x must have at least one dimension (..., K)");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), fn, ": weight must have x's dtype (",
                   x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, fn, ": weight must be 2-D (N, K), got shape ",
                    weight.sym_sizes());
  TORCH_CHECK_VALUE(x.sym_size(-1) == weight.sym_size(1), fn, ": x.shape[-1] (", x.sym_size(-1),
                    ") must equal weight.shape[1] (", weight.sym_size(1), "): weight is (N, K)");
  check_device(fn, "weight", weight, x, "x");
  if (!bias.has_value()) return;
  TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), fn, ": bias must have x's dtype (",
                   x.scalar_type(), "), got ", bias->scalar_type());
  check_vector(fn, "bias", *bias, weight.sym_size(0), x, "x", "one value per output channel");
}

void check_silu_mul(const at::Tensor& x, const std::optional<at::Tensor>& grad) {
  constexpr const char* fn = "fastattn.silu_mul";
  TORCH_CHECK_TYPE(x.is_floating_point(), fn, ": x must be a floating-point tensor, got ",
                   x.scalar_type());
  check_float(fn, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, fn,
                    ": x must have at least one dimension (..., 2*I), got a 0-d tensor");
  const c10::SymInt n = x.sym_size(-1);
  TORCH_CHECK_VALUE(n > 0 && n % 2 == 0, fn,
                    ": x.shape[-1] must be even and > 0 (the gate and up halves, 2*I), got ", n);
  if (!grad.has_value()) return;
  const at::Tensor& g = *grad;
  TORCH_CHECK_TYPE(g.scalar_type() == x.scalar_type(), fn, ": grad must have x's dtype (",
                   x.scalar_type(), "), got ", g.scalar_type());
  std::vector<c10::SymInt> want(x.sym_sizes().begin(), x.sym_sizes().end());
  want.back() = n / 2;
  TORCH_CHECK_VALUE(g.sym_sizes() == c10::SymIntArrayRef(want), fn,
                    ": grad must have the output's shape ", c10::SymIntArrayRef(want), ", got ",
                    g.sym_sizes());
  check_device(fn, "grad", g, x, "x");
}

void check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                  int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, double dropout_p,
                  double softcap, const std::optional<at::Tensor>& alibi_slopes,
                  const std::optional<at::Tensor>& sinks) {
  constexpr const char* fn = "fastattn.attention_varlen";
  for (const auto& [name, t] : {std::pair{"q", &q}, std::pair{"k", &k}, std::pair{"v", &v}}) {
    TORCH_CHECK_VALUE(t->dim() == 3, fn, ": ", name,
                      " must be 3-D (total, heads, head dim), got shape ", t->sym_sizes());
    TORCH_CHECK_TYPE(t->is_floating_point(), fn, ": ", name,
                     " must be a floating-point tensor, got ", t->scalar_type());
    check_float(fn, name, *t);
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), fn, ": ", name, " must have q's dtype (",
                     q.scalar_type(), "), got ", t->scalar_type());
    check_device(fn, name, *t, q, "q");
  }
  const auto qs = q.sym_sizes(), ks = k.sym_sizes(), vs = v.sym_sizes();
  TORCH_CHECK_VALUE(ks[2] == qs[2], fn, ": k.shape[2] (", ks[2], ") must equal q.shape[2] (",
                    qs[2], "): the head dims of q and k differ");
  TORCH_CHECK_VALUE(vs[0] == ks[0], fn, ": v.shape[0] (", vs[0], ") must equal k.shape[0] (",
                    ks[0], "): k and v hold the same packed keys");
  TORCH_CHECK_VALUE(vs[1] == ks[1], fn, ": v.shape[1] (", vs[1], ") must equal k.shape[1] (",
                    ks[1], "): k and v have the same number of heads");
  TORCH_CHECK_VALUE(ks[1] != 0 && qs[1] % ks[1] == 0, fn, ": q heads (q.shape[1] = ", qs[1],
                    ") must be a multiple of the k/v heads (k.shape[1] = ", ks[1], ")");
  for (const auto& [name, t] : {std::pair{"cu_seqlens_q", &cu_seqlens_q},
                                std::pair{"cu_seqlens_k", &cu_seqlens_k}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kInt, fn, ": ", name,
                     " must be an int32 tensor of shape (B + 1,), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 1 && t->sym_size(0) >= 1, fn, ": ", name,
                      " must have shape (B + 1,) (batch size B >= 0), got ", t->sym_sizes());
    check_device(fn, name, *t, q, "q");
  }
  TORCH_CHECK_VALUE(cu_seqlens_k.sym_size(0) == cu_seqlens_q.sym_size(0), fn,
                    ": cu_seqlens_k must have cu_seqlens_q's shape (B + 1,) = (",
                    cu_seqlens_q.sym_size(0), ",), got ", cu_seqlens_k.sym_sizes());
  TORCH_CHECK_VALUE(max_seqlen_q >= 0, fn, ": max_seqlen_q must be >= 0, got ", max_seqlen_q);
  TORCH_CHECK_VALUE(max_seqlen_k >= 0, fn, ": max_seqlen_k must be >= 0, got ", max_seqlen_k);
  TORCH_CHECK_VALUE(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p < 1.0, fn,
                    ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, fn,
                    ": softcap must be a finite float > 0 (or None), got ", softcap);
  const c10::SymInt B = cu_seqlens_q.sym_size(0) - 1, H = qs[1];
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, fn,
                     ": alibi_slopes must be a float32 tensor, got ", a.scalar_type());
    const bool ok = (a.dim() == 1 && a.sym_size(0) == H) ||
                    (a.dim() == 2 && a.sym_size(0) == B && a.sym_size(1) == H);
    TORCH_CHECK_VALUE(ok, fn, ": alibi_slopes must have shape (H,) = (", H, ",) or (B, H) = (",
                      B, ", ", H, "), got ", a.sym_sizes());
    check_device(fn, "alibi_slopes", a, q, "q");
  }
  if (sinks.has_value()) {
    const at::Tensor& s = *sinks;
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, fn, ": sinks must be a float32 tensor, got ",
                     s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.sym_size(0) == H, fn, ": sinks must have shape (H,) = (",
                      H, ",), got ", s.sym_sizes());
    check_device(fn, "sinks", s, q, "q");
  }
  // the values, where they are on the host already: a bad offset would send a kernel to rows
  // outside q, k or v
  for (const auto& [name, t, total, max_name, max_len, what] :
       {std::tuple{"cu_seqlens_q", &cu_seqlens_q, &q, "max_seqlen_q", max_seqlen_q, "q.shape[0]"},
        std::tuple{"cu_seqlens_k", &cu_seqlens_k, &k, "max_seqlen_k", max_seqlen_k,
                   "k.shape[0]"}}) {
    if (!host_readable(*t)) continue;
    const at::Tensor c = t->contiguous();
    const int32_t* p = c.const_data_ptr<int32_t>();
    const int64_t n = c.numel(), packed = total->size(0);
    TORCH_CHECK_VALUE(p[0] == 0, fn, ": ", name, " must start at 0, got ", name, "[0] = ", p[0]);
    for (int64_t b = 0; b + 1 < n; ++b)
      TORCH_CHECK_VALUE(p[b + 1] >= p[b], fn, ": ", name, " must be non-decreasing, got ", name,
                        "[", b + 1, "] = ", p[b + 1], " < ", name, "[", b, "] = ", p[b]);
    TORCH_CHECK_VALUE(p[n - 1] == packed, fn, ": ", name, "[-1] = ", p[n - 1], " must equal ",
                      what, " = ", packed, " (the packed length)");
    for (int64_t b = 0; b + 1 < n; ++b)
      TORCH_CHECK_VALUE(p[b + 1] - p[b] <= max_len, fn, ": ", max_name, " = ", max_len,
                        " is smaller than sequence ", b, "'s length ", p[b + 1] - p[b], " (",
                        name, "[", b + 1, "] - ", name, "[", b, "])");
  }
}

at::Tensor as_rows(const at::Tensor& t, int64_t trailing_dims, int64_t n) {
  if (t.dim() == 2 && trailing_dims == 1 && (n <= 1 || t.stride(1) == 1)) return t;
  int64_t m = 1;
  for (int64_t d = 0; d < t.dim() - trailing_dims; ++d) m *= t.size(d);
  at::Tensor rows = t.reshape({m, n});
  if (n <= 1 || rows.stride(1) == 1) return rows;
  // an empty tensor counts as contiguous whatever its strides (an expanded gradient of zero
  // rows): a fresh one has unit column stride
  return rows.numel() == 0 ? at::empty({m, n}, t.options()) : rows.contiguous();
}

}  // namespace fastattn::checks
