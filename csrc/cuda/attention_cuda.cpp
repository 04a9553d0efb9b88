// CUDA kernels of fastattn::attention_fwd / attention_bwd / attention_kvcache: argument checks,
// output allocation and the call into the torch-free launchers (attention_*.cu).
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "attention.h"
#include "../checks.h"
#include "attention_params.h"
#include "binding_utils.h"

namespace fastattn::cuda {
namespace {

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  check_cuda_tensor(q, q, op, "q");
  check_cuda_tensor(k, q, op, "k");
  check_cuda_tensor(v, q, op, "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fastattn.", op,
              " (CUDA): q, k, v must be 4-D (B, H, L, E), got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "fastattn.",
              op, " (CUDA): q, k, v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  dtype_of(q, op, "q");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "fastattn.", op,
              " (CUDA): batch sizes of q, k, v differ");
  TORCH_CHECK(k.size(3) == q.size(3), "fastattn.", op, " (CUDA): k's head dim ", k.size(3),
              " differs from q's ", q.size(3));
  TORCH_CHECK(v.size(1) == k.size(1) && v.size(2) == k.size(2), "fastattn.", op,
              " (CUDA): v must be (B, Hkv, S, Ev) with k's Hkv and S, got ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "fastattn.", op, " (CUDA): q heads (",
              q.size(1), ") must be a multiple of k heads (", k.size(1), ")");
  TORCH_CHECK(q.size(3) >= 1 && v.size(3) >= 1, "fastattn.", op,
              " (CUDA): head dims must be at least 1, got ", q.size(3), " and ", v.size(3));
  TORCH_CHECK(q.size(3) <= kMaxHeadDim && v.size(3) <= kMaxHeadDim, "fastattn.", op,
              " (CUDA): head dims above ", kMaxHeadDim, " are not supported, got ", q.size(3),
              " and ", v.size(3));
}

void check_mask(const std::optional<at::Tensor>& mask, const at::Tensor& q, int64_t S,
                const char* op) {
  if (!mask.has_value()) return;
  check_cuda_tensor(*mask, q, op, "attn_mask");
  TORCH_CHECK(mask->scalar_type() == q.scalar_type(), "fastattn.", op,
              " (CUDA): attn_mask must be an additive mask in q's dtype (", q.scalar_type(),
              "), got ", mask->scalar_type());
  TORCH_CHECK(mask->dim() == 4 && mask->size(0) == q.size(0) && mask->size(1) == q.size(1) &&
                  mask->size(2) == q.size(2) && mask->size(3) == S,
              "fastattn.", op, " (CUDA): attn_mask must be (B, H, L, S) = (", q.size(0), ", ",
              q.size(1), ", ", q.size(2), ", ", S, "), got ", mask->sizes());
}

void check_no_dropout(double dropout_p, const char* op) {
  TORCH_CHECK(dropout_p == 0.0, "fastattn.", op,
              " (CUDA): dropout_p > 0 is not implemented by the CUDA kernels (got ", dropout_p,
              "); use backend='triton' or backend='reference' for attention dropout");
}

// softcap / alibi_slopes / sinks: not implemented by the CUDA kernels (the op layer's _supports
// sends such calls to Triton)
void check_no_score_mods(double softcap, const std::optional<at::Tensor>& alibi_slopes,
                         const std::optional<at::Tensor>& sinks, const char* op) {
  TORCH_CHECK(softcap == 0.0 && !alibi_slopes.has_value() && !sinks.has_value(), "fastattn.", op,
              " (CUDA): softcap, alibi_slopes and sinks are not implemented by the CUDA kernels; "
              "use backend='triton' or backend='reference'");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& attn_mask, double scale, int64_t window_left,
    int64_t window_right, int64_t diag_offset, double dropout_p, int64_t seed, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
  (void)seed;
  constexpr const char* op = "attention_fwd";
  check_no_score_mods(softcap, alibi_slopes, sinks, op);
  check_qkv(q_in, k_in, v_in, op);
  check_no_dropout(dropout_p, op);
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), E = q_in.size(3);
  const int64_t Hkv = k_in.size(1), S = k_in.size(2), Ev = v_in.size(3);
  check_mask(attn_mask, q_in, S, op);
  // (B, H, L, Ev) stored token-major, as (B, L, H, Ev), like the CPU kernels (see there)
  auto out = at::empty({B, L, H, Ev}, q_in.options()).transpose(1, 2);
  auto lse = at::empty({B, H, L}, q_in.options().dtype(at::kFloat));
  if (B * H * L == 0 || S == 0) {  // no key: out = 0, lse = -inf (as the reference)
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in);
  DeviceGuard guard(q.device());
  const AttnFwdParams p = attn_fwd_params(
      {B, H, Hkv, L, S, E, Ev}, float(scale), {window_left, window_right, diag_offset},
      attn_operand(q), attn_operand(k), attn_operand(v), attn_operand(attn_mask),
      attn_operand(out), attn_operand(lse));
  check_launch(attention_fwd(p, dtype_of(q, op, "q"), current_stream()), op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& attn_mask,
    double scale, int64_t window_left, int64_t window_right, int64_t diag_offset, double dropout_p,
    int64_t seed, bool compute_dmask, bool deterministic, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
  (void)seed;
  (void)deterministic;  // the kernels never use atomics: always bitwise repeatable
  constexpr const char* op = "attention_bwd";
  check_no_score_mods(softcap, alibi_slopes, sinks, op);
  const at::Tensor dsinks = at::empty({0}, q_in.options().dtype(at::kFloat));
  check_qkv(q_in, k_in, v_in, op);
  check_no_dropout(dropout_p, op);
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), E = q_in.size(3);
  const int64_t Hkv = k_in.size(1), S = k_in.size(2), Ev = v_in.size(3);
  check_mask(attn_mask, q_in, S, op);
  check_cuda_tensor(grad_out_in, q_in, op, "grad_out");
  check_cuda_tensor(out_in, q_in, op, "out");
  check_cuda_tensor(lse_in, q_in, op, "lse");
  TORCH_CHECK(grad_out_in.sizes() == out_in.sizes() && out_in.dim() == 4 && out_in.size(0) == B &&
                  out_in.size(1) == H && out_in.size(2) == L && out_in.size(3) == Ev,
              "fastattn.attention_bwd (CUDA): grad_out and out must be (B, H, L, Ev), got ",
              grad_out_in.sizes(), " and ", out_in.sizes());
  TORCH_CHECK(
      grad_out_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
      "fastattn.attention_bwd (CUDA): grad_out and out must have q's dtype");
  TORCH_CHECK(
      lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H && lse_in.size(2) == L,
      "fastattn.attention_bwd (CUDA): lse must be (B, H, L), got ", lse_in.sizes());
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  std::optional<at::Tensor> glse;
  if (grad_lse.has_value()) {
    check_cuda_tensor(*grad_lse, q_in, op, "grad_lse");
    TORCH_CHECK(grad_lse->sizes() == lse_in.sizes(),
                "fastattn.attention_bwd (CUDA): grad_lse must be (B, H, L), got ",
                grad_lse->sizes());
    glse = grad_lse->to(at::kFloat).contiguous();  // autograd may hand an expanded tensor
  }

  auto dq = at::empty({B, H, L, E}, q_in.options());
  auto dk = at::empty({B, Hkv, S, E}, q_in.options());
  auto dv = at::empty({B, Hkv, S, Ev}, q_in.options());
  const bool want_dmask = compute_dmask && attn_mask.has_value();
  auto dmask =
      want_dmask ? at::zeros({B, H, L, S}, attn_mask->options()) : at::empty({0}, q_in.options());
  if (B * H * L == 0 || S == 0) {  // nothing to differentiate through: zero gradients
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dmask, dsinks};
  }
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in), grad_out = last_dim_contiguous(grad_out_in),
                   out = last_dim_contiguous(out_in);
  auto workspace = at::empty({2 * B * H * L}, q_in.options().dtype(at::kFloat));
  DeviceGuard guard(q.device());
  const AttnBwdParams p = attn_bwd_params(
      {B, H, Hkv, L, S, E, Ev}, float(scale), {window_left, window_right, diag_offset},
      attn_operand(q), attn_operand(k), attn_operand(v), attn_operand(attn_mask),
      attn_operand(grad_out), attn_operand(out), attn_operand(lse), attn_operand(glse),
      attn_operand(dq), attn_operand(dk), attn_operand(dv),
      want_dmask ? attn_operand(dmask) : AttnOperand{}, workspace.data_ptr<float>());
  check_launch(attention_bwd(p, dtype_of(q, op, "q"), current_stream()), op);
  return {dq, dk, dv, dmask, dsinks};
}

// attention_kvcache and attention_kvcache_lse: out (B, H, Lq, E) and, with want_lse, lse
// (B, H, Lq) float32 (else an empty tensor).
std::tuple<at::Tensor, at::Tensor> kvcache_impl(
    const at::Tensor& q_in, at::Tensor& k_cache, at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, double scale, bool causal,
    const std::optional<at::Tensor>& cache_leftpad, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& block_table, int64_t window_left, int64_t window_right,
    bool want_lse) {
  constexpr const char* op = "attention_kvcache";
  // shapes, dtypes, devices and (for host tensors) the values of cache_seqlens / block_table
  checks::check_kvcache(q_in, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, cache_leftpad,
                        rotary_cos, rotary_sin, softcap, alibi_slopes, sinks, block_table,
                        window_left, window_right);
  check_no_score_mods(softcap, alibi_slopes, sinks, op);
  const bool paged = block_table.has_value();
  check_cuda_tensor(q_in, q_in, op, "q");
  check_cuda_tensor(k_cache, q_in, op, "k_cache");
  check_cuda_tensor(v_cache, q_in, op, "v_cache");
  check_cuda_tensor(cache_seqlens, q_in, op, "cache_seqlens");
  TORCH_CHECK(q_in.dim() == 4 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "fastattn.attention_kvcache (CUDA): q must be (B, H, Lq, E) and the caches ",
              paged ? "(num_blocks, Hkv, block_size, E)" : "(B, Hkv, capacity, E)",
              " of one shape, got ", q_in.sizes(), ", ", k_cache.sizes(), ", ", v_cache.sizes());
  TORCH_CHECK(
      k_cache.scalar_type() == q_in.scalar_type() && v_cache.scalar_type() == q_in.scalar_type(),
      "fastattn.attention_kvcache (CUDA): k_cache/v_cache must have q's dtype");
  dtype_of(q_in, op, "q");
  const int64_t B = q_in.size(0), H = q_in.size(1), Lq = q_in.size(2), E = q_in.size(3);
  const int64_t Hkv = k_cache.size(1);
  TORCH_CHECK((paged || k_cache.size(0) == B) && k_cache.size(3) == E,
              "fastattn.attention_kvcache (CUDA): k_cache must be (B=", B, ", Hkv, capacity, E=", E,
              "), got ", k_cache.sizes());
  at::Tensor table;
  int64_t cap = k_cache.size(2);
  if (paged) {  // check_kvcache: int32 (B, max_blocks), block_size a positive multiple of 16
    check_cuda_tensor(*block_table, q_in, op, "block_table");
    table = block_table->contiguous();
    cap = table.size(1) * k_cache.size(2);
    TORCH_CHECK(cap < (int64_t(1) << 30) && k_cache.size(0) < (int64_t(1) << 31),
                "fastattn.attention_kvcache (CUDA): block_table.shape[1] * block_size = ", cap,
                " and num_blocks = ", k_cache.size(0), " must be below 2^30 and 2^31");
  }
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "fastattn.attention_kvcache (CUDA): q heads (", H,
              ") must be a multiple of cache heads (", Hkv, ")");
  TORCH_CHECK(E <= kMaxHeadDim, "fastattn.attention_kvcache (CUDA): head dim ", E, " above ",
              kMaxHeadDim, " is not supported");
  TORCH_CHECK(E <= 1 || (k_cache.stride(3) == 1 && v_cache.stride(3) == 1),
              "fastattn.attention_kvcache (CUDA): k_cache and v_cache are updated in place and "
              "must have a contiguous last dimension (stride 1)");
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == B,
              "fastattn.attention_kvcache (CUDA): cache_seqlens must be int32 of shape (", B,
              ",), got ", cache_seqlens.scalar_type(), " ", cache_seqlens.sizes());
  TORCH_CHECK(k_new.has_value() == v_new.has_value(),
              "fastattn.attention_kvcache (CUDA): k_new and v_new must be given together");
  at::Tensor leftpad;
  if (cache_leftpad.has_value() && cache_leftpad->defined()) {
    check_cuda_tensor(*cache_leftpad, q_in, op, "cache_leftpad");
    TORCH_CHECK(cache_leftpad->scalar_type() == at::kInt && cache_leftpad->dim() == 1 &&
                    cache_leftpad->size(0) == B,
                "fastattn.attention_kvcache (CUDA): cache_leftpad must be int32 of shape (", B,
                ",), got ", cache_leftpad->scalar_type(), " ", cache_leftpad->sizes());
    leftpad = cache_leftpad->contiguous();
  }
  std::optional<at::Tensor> kn, vn;
  const int64_t Lnew = k_new.has_value() ? k_new->size(2) : 0;
  if (k_new.has_value()) {
    for (const at::Tensor* t : {&*k_new, &*v_new}) {
      check_cuda_tensor(*t, q_in, op, t == &*k_new ? "k_new" : "v_new");
      TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == Hkv && t->size(2) == Lnew &&
                      t->size(3) == E && t->scalar_type() == q_in.scalar_type(),
                  "fastattn.attention_kvcache (CUDA): k_new/v_new must be (B, Hkv, Lnew, E) in "
                  "q's dtype, got ",
                  t->sizes(), " ", t->scalar_type());
    }
    TORCH_CHECK(Lnew <= 65535, "fastattn.attention_kvcache (CUDA): k_new/v_new hold ", Lnew,
                " tokens, more than the 65535 the append kernel's grid allows");
    kn = last_dim_contiguous(*k_new);
    vn = last_dim_contiguous(*v_new);
  }
  auto out = at::empty({B, H, Lq, E}, q_in.options());
  auto lse = want_lse ? at::empty({B, H, Lq}, q_in.options().dtype(at::kFloat))
                      : at::empty({0}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor q = last_dim_contiguous(q_in);
  const at::Tensor seqlens = cache_seqlens.contiguous();
  DeviceGuard guard(q.device());
  KvcacheParams p = kvcache_params(
      {B, H, Hkv, Lq, cap, E, E}, float(scale), causal, attn_operand(q), attn_operand(k_cache),
      attn_operand(v_cache), attn_operand(kn), attn_operand(vn), attn_operand(out),
      seqlens.data_ptr<int32_t>(), leftpad.defined() ? leftpad.data_ptr<int32_t>() : nullptr);
  kvcache_serving(p, Lnew, window_left, window_right, want_lse ? lse.data_ptr<float>() : nullptr,
                  want_lse ? lse.stride(0) : 0, want_lse ? lse.stride(1) : 0,
                  paged ? table.data_ptr<int32_t>() : nullptr, paged ? table.stride(0) : 0,
                  paged ? table.size(1) : 0, k_cache.size(0), k_cache.size(2));  if (rotary_cos.has_value() && k_new.has_value()) {
    // check_kvcache: both tables, 2-D (max_pos >= 1, rotary_half >= 1), one dtype: q's or float32
    const at::Tensor& c = *rotary_cos;
    const at::Tensor& s = *rotary_sin;
    check_cuda_tensor(c, q_in, op, "rotary_cos");
    check_cuda_tensor(s, q_in, op, "rotary_sin");
    kvcache_rotary(p, c.data_ptr(), s.data_ptr(), c.stride(0), c.stride(1), s.stride(0),
                   s.stride(1), c.size(0), c.size(1), rotary_interleaved,
                   c.scalar_type() == at::kFloat);
  }
  const KvcacheWorkspace ws = kvcache_plan(p, sm_count());
  at::Tensor partial_out, partial_lse;
  if (p.num_splits > 1) {
    partial_out = at::empty({ws.partial_out_floats}, q.options().dtype(at::kFloat));
    partial_lse = at::empty({ws.partial_lse_floats}, q.options().dtype(at::kFloat));
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
  }
  check_launch(attention_kvcache(p, dtype_of(q, op, "q"), current_stream()), op);
  return {out, lse};
}

at::Tensor attention_kvcache_cuda(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new, double scale,
    bool causal, const std::optional<at::Tensor>& cache_leftpad,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
    bool rotary_interleaved, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& block_table,
    int64_t window_left, int64_t window_right) {
  return std::get<0>(kvcache_impl(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal,
                                  cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved,
                                  softcap, alibi_slopes, sinks, block_table, window_left,
                                  window_right, false));
}

std::tuple<at::Tensor, at::Tensor> attention_kvcache_lse_cuda(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new, double scale,
    bool causal, const std::optional<at::Tensor>& cache_leftpad,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
    bool rotary_interleaved, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& block_table,
    int64_t window_left, int64_t window_right) {
  return kvcache_impl(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal,
                      cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved, softcap,
                      alibi_slopes, sinks, block_table, window_left, window_right, true);
}

// ---- attention_varlen --------------------------------------------------------------------------
// checks::check_varlen (shapes and dtypes, and the cu_seqlens values where they are on the
// host), then what the CUDA kernels add: every tensor on q's device, no dropout or score
// modifiers, and sizes their int32 indexing holds.
void check_varlen_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                       int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, double dropout_p,
                       double softcap, const std::optional<at::Tensor>& alibi_slopes,
                       const std::optional<at::Tensor>& sinks, const char* op) {
  checks::check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                       dropout_p, softcap, alibi_slopes, sinks);
  check_no_score_mods(softcap, alibi_slopes, sinks, op);
  check_no_dropout(dropout_p, op);
  check_cuda_tensor(q, q, op, "q");
  check_cuda_tensor(k, q, op, "k");
  check_cuda_tensor(v, q, op, "v");
  check_cuda_tensor(cu_seqlens_q, q, op, "cu_seqlens_q");
  check_cuda_tensor(cu_seqlens_k, q, op, "cu_seqlens_k");
  dtype_of(q, op, "q");
  TORCH_CHECK(q.size(2) >= 1 && v.size(2) >= 1 && q.size(2) <= kMaxHeadDim &&
                  v.size(2) <= kMaxHeadDim,
              "fastattn.", op, " (CUDA): head dims must lie in [1, ", kMaxHeadDim, "], got ",
              q.size(2), " and ", v.size(2));
  TORCH_CHECK(cu_seqlens_q.size(0) - 1 <= 65535, "fastattn.", op,
              " (CUDA): at most 65535 sequences (cu_seqlens_q.shape[0] - 1), got ",
              cu_seqlens_q.size(0) - 1);
  TORCH_CHECK(max_seqlen_q < (int64_t(1) << 30) && max_seqlen_k < (int64_t(1) << 30) &&
                  q.size(0) < (int64_t(1) << 31) && k.size(0) < (int64_t(1) << 31),
              "fastattn.", op, " (CUDA): max_seqlen_q / max_seqlen_k must be below 2^30 and "
              "total_q / total_k below 2^31, got ", max_seqlen_q, ", ", max_seqlen_k, ", ",
              q.size(0), ", ", k.size(0));
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double dropout_p, int64_t seed, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
  (void)seed;
  constexpr const char* op = "attention_varlen_fwd";
  check_varlen_cuda(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    scale, dropout_p, softcap, alibi_slopes, sinks, op);
  const int64_t total_q = q_in.size(0), H = q_in.size(1), E = q_in.size(2);
  const int64_t total_k = k_in.size(0), Hkv = k_in.size(1), Ev = v_in.size(2);
  const int64_t B = cu_seqlens_q.size(0) - 1;
  // out (total_q, H, Ev) contiguous: the (total_q, H * Ev) rows of the output projection
  auto out = at::empty({total_q, H, Ev}, q_in.options());
  auto lse = at::empty({H, total_q}, q_in.options().dtype(at::kFloat));
  if (total_q * H == 0) return {out, lse};
  if (total_k == 0 || max_seqlen_k == 0 || max_seqlen_q == 0 || B == 0) {
    // no key in any sequence (or, by max_seqlen, no query): out = 0, lse = -inf
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in);
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  DeviceGuard guard(q.device());
  AttnFwdParams p = attn_fwd_params(
      {B, H, Hkv, max_seqlen_q, max_seqlen_k, E, Ev}, float(scale),
      {window_left, window_right, 0}, packed_operand(q), packed_operand(k), packed_operand(v),
      AttnOperand{}, packed_operand(out), AttnOperand{lse.data_ptr(), 0, lse.stride(0), 1, 0});
  set_varlen(p, cu_q.data_ptr<int32_t>(), cu_k.data_ptr<int32_t>(), total_q, total_k,
             bottom_right);
  check_launch(attention_fwd(p, dtype_of(q, op, "q"), current_stream()), op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p, int64_t seed,
    bool deterministic, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& sinks) {
  (void)seed;
  (void)deterministic;  // the kernels never use atomics: always bitwise repeatable
  constexpr const char* op = "attention_varlen_bwd";
  check_varlen_cuda(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    scale, dropout_p, softcap, alibi_slopes, sinks, op);
  const int64_t total_q = q_in.size(0), H = q_in.size(1), E = q_in.size(2);
  const int64_t total_k = k_in.size(0), Hkv = k_in.size(1), Ev = v_in.size(2);
  const int64_t B = cu_seqlens_q.size(0) - 1;
  check_cuda_tensor(grad_out_in, q_in, op, "grad_out");
  check_cuda_tensor(out_in, q_in, op, "out");
  check_cuda_tensor(lse_in, q_in, op, "lse");
  const std::vector<int64_t> oshape{total_q, H, Ev}, lshape{H, total_q};
  TORCH_CHECK(grad_out_in.sizes() == oshape && out_in.sizes() == oshape,
              "fastattn.attention_varlen_bwd (CUDA): grad_out and out must be (total_q, H, Ev) = ",
              oshape, ", got ", grad_out_in.sizes(), " and ", out_in.sizes());
  TORCH_CHECK(
      grad_out_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
      "fastattn.attention_varlen_bwd (CUDA): grad_out and out must have q's dtype");
  TORCH_CHECK(lse_in.sizes() == lshape,
              "fastattn.attention_varlen_bwd (CUDA): lse must be (H, total_q) = ", lshape,
              ", got ", lse_in.sizes());
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  std::optional<at::Tensor> glse;
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_cuda_tensor(*grad_lse, q_in, op, "grad_lse");
    TORCH_CHECK(grad_lse->sizes() == lshape,
                "fastattn.attention_varlen_bwd (CUDA): grad_lse must be (H, total_q) = ", lshape,
                ", got ", grad_lse->sizes());
    glse = grad_lse->to(at::kFloat).contiguous();  // autograd may hand an expanded tensor
  }
  // the kernels write (heads, total, dim) rows: returned as (total, heads, dim) views
  auto dq = at::empty({H, total_q, E}, q_in.options()).transpose(0, 1);
  auto dk = at::empty({Hkv, total_k, E}, q_in.options()).transpose(0, 1);
  auto dv = at::empty({Hkv, total_k, Ev}, q_in.options()).transpose(0, 1);
  const at::Tensor dsinks = at::empty({0}, q_in.options().dtype(at::kFloat));
  if (total_q * H == 0 || total_k == 0 || max_seqlen_q == 0 || max_seqlen_k == 0 || B == 0) {
    dq.zero_();  // nothing to differentiate through
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dsinks};
  }
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in), grad_out = last_dim_contiguous(grad_out_in),
                   out = last_dim_contiguous(out_in);
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  auto workspace = at::empty({2 * H * total_q}, q_in.options().dtype(at::kFloat));
  DeviceGuard guard(q.device());
  auto stat = [](const at::Tensor& t) { return AttnOperand{t.data_ptr(), 0, t.stride(0), 1, 0}; };
  AttnBwdParams p = attn_bwd_params(
      {B, H, Hkv, max_seqlen_q, max_seqlen_k, E, Ev}, float(scale),
      {window_left, window_right, 0}, packed_operand(q), packed_operand(k), packed_operand(v),
      AttnOperand{}, packed_operand(grad_out), packed_operand(out), stat(lse),
      glse.has_value() ? stat(*glse) : AttnOperand{}, packed_operand(dq), packed_operand(dk),
      packed_operand(dv), AttnOperand{}, workspace.data_ptr<float>());
  set_varlen(p, cu_q.data_ptr<int32_t>(), cu_k.data_ptr<int32_t>(), total_q, total_k,
             bottom_right);
  check_launch(attention_bwd(p, dtype_of(q, op, "q"), current_stream()), op);
  return {dq, dk, dv, dsinks};
}

}  // namespace
}  // namespace fastattn::cuda

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("attention_varlen_fwd", &fastattn::cuda::attention_varlen_fwd_cuda);
  m.impl("attention_varlen_bwd", &fastattn::cuda::attention_varlen_bwd_cuda);
  m.impl("attention_fwd", &fastattn::cuda::attention_fwd_cuda);
  m.impl("attention_bwd", &fastattn::cuda::attention_bwd_cuda);
  m.impl("attention_kvcache", &fastattn::cuda::attention_kvcache_cuda);
  m.impl("attention_kvcache_lse", &fastattn::cuda::attention_kvcache_lse_cuda);
}
