// Builds the parameter structs of attention.h from operands (a base pointer and its element
// strides) and the sizes of the problem: written once for attention_fwd, attention_bwd and
// attention_kvcache, and used by the torch bindings (attention_cuda.cpp) and the host emulator
// (emulation/emu_api.cc) alike, so that both hand the kernels the same fields. Torch-free.
#pragma once

#include <cstdint>
#include <optional>

#include "attention.h"

namespace fastattn::cuda {

// One operand as the kernels address it: its base and the element strides of its (batch, head,
// row) dims, and of its column dim for the mask (the last dim of every other operand is
// contiguous). A null data pointer is an absent optional operand.
struct AttnOperand {
  const void* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_row = 0, stride_col = 0;
};

// Any tensor type with data_ptr(), dim(), size(d) and stride(d) (at::Tensor in the bindings).
// A dim of one element gets stride 0: torch leaves arbitrary strides there, which would
// needlessly disable 16-byte accesses, and only index 0 is ever read along it.
template <class Tensor>
AttnOperand attn_operand(const Tensor& t) {
  AttnOperand o;
  o.data = t.data_ptr();
  int64_t* strides[4] = {&o.stride_b, &o.stride_h, &o.stride_row, &o.stride_col};
  for (int64_t d = 0; d < t.dim() && d < 4; ++d) *strides[d] = t.size(d) == 1 ? 0 : t.stride(d);
  return o;
}
template <class Tensor>
AttnOperand attn_operand(const std::optional<Tensor>& t) {
  return t.has_value() ? attn_operand(*t) : AttnOperand{};
}

// Sizes of an attention problem. For the KV cache, len_k is the cache capacity and head_dim_v
// equals head_dim.
struct AttnShape {
  int64_t batch, heads, kv_heads, len_q, len_k, head_dim, head_dim_v;
};

// The visibility window of forward and backward (see AttnProblem).
struct AttnWindow {
  int64_t left = -1, right = -1, diag_offset = 0;
};

namespace detail {

// An operand's base (cast to the field's pointer type: outputs are operands too) and strides.
template <class Ptr>
void bind_operand(const AttnOperand& t, Ptr& data, int64_t& stride_b, int64_t& stride_h,
          int64_t& stride_row) {
  data = static_cast<Ptr>(const_cast<void*>(t.data));
  stride_b = t.stride_b, stride_h = t.stride_h, stride_row = t.stride_row;
}

// Sizes and scale, under the same names in every params struct.
template <class P>
void set_sizes(P& p, const AttnShape& s, float scale) {
  p.batch = int(s.batch), p.heads = int(s.heads), p.kv_heads = int(s.kv_heads);
  p.len_q = int(s.len_q), p.head_dim = int(s.head_dim);
  p.scale = scale;
}

inline void set_problem(AttnProblem& p, const AttnShape& s, float scale, const AttnWindow& w,
                        const AttnOperand& q, const AttnOperand& k, const AttnOperand& v,
                        const AttnOperand& mask) {
  set_sizes(p, s, scale);
  p.len_k = int(s.len_k), p.head_dim_v = int(s.head_dim_v);
  p.window_left = w.left, p.window_right = w.right, p.diag_offset = w.diag_offset;
  bind_operand(q, p.q, p.q_stride_b, p.q_stride_h, p.q_stride_l);
  bind_operand(k, p.k, p.k_stride_b, p.k_stride_h, p.k_stride_s);
  bind_operand(v, p.v, p.v_stride_b, p.v_stride_h, p.v_stride_s);
  bind_operand(mask, p.mask, p.mask_stride_b, p.mask_stride_h, p.mask_stride_l);
  p.mask_stride_s = mask.stride_col;
}

}  // namespace detail

inline AttnFwdParams attn_fwd_params(const AttnShape& s, float scale, const AttnWindow& w,
                                     const AttnOperand& q, const AttnOperand& k,
                                     const AttnOperand& v, const AttnOperand& mask,
                                     const AttnOperand& out, const AttnOperand& lse) {
  AttnFwdParams p;
  detail::set_problem(p, s, scale, w, q, k, v, mask);
  detail::bind_operand(out, p.out, p.out_stride_b, p.out_stride_h, p.out_stride_l);
  int64_t unused_row = 0;  // lse is (B, H, L) with unit row stride
  detail::bind_operand(lse, p.lse, p.lse_stride_b, p.lse_stride_h, unused_row);
  return p;
}

// Packed variable-length sequences (see AttnProblem): the operands are (total, heads, dim)
// tensors addressed with stride_b = 0 and their token stride as the row stride (lse: (H,
// total_q) with stride_b = 0, its head stride, unit row stride); the shape's batch is the number
// of sequences and its len_q / len_k the maximum lengths.
template <class Tensor>
AttnOperand packed_operand(const Tensor& t) {  // (total, heads, dim)
  return {t.data_ptr(), 0, t.size(1) == 1 ? 0 : t.stride(1), t.stride(0), 0};
}

inline void set_varlen(AttnProblem& p, const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
                       int64_t total_q, int64_t total_k, bool bottom_right) {
  p.cu_seqlens_q = cu_seqlens_q;
  p.cu_seqlens_k = cu_seqlens_k;
  p.total_q = total_q;
  p.total_k = total_k;
  p.bottom_right = bottom_right;
}

// grad_lse and dmask may be absent; workspace: see AttnBwdParams.
inline AttnBwdParams attn_bwd_params(const AttnShape& s, float scale, const AttnWindow& w,
                                     const AttnOperand& q, const AttnOperand& k,
                                     const AttnOperand& v, const AttnOperand& mask,
                                     const AttnOperand& grad_out, const AttnOperand& out,
                                     const AttnOperand& lse, const AttnOperand& grad_lse,
                                     const AttnOperand& dq, const AttnOperand& dk,
                                     const AttnOperand& dv, const AttnOperand& dmask,
                                     float* workspace) {
  AttnBwdParams p;
  detail::set_problem(p, s, scale, w, q, k, v, mask);
  detail::bind_operand(grad_out, p.grad_out, p.do_stride_b, p.do_stride_h, p.do_stride_l);
  detail::bind_operand(out, p.out, p.o_stride_b, p.o_stride_h, p.o_stride_l);
  int64_t unused_row = 0;  // lse and grad_lse are (B, H, L) with unit row stride
  detail::bind_operand(lse, p.lse, p.lse_stride_b, p.lse_stride_h, unused_row);
  detail::bind_operand(grad_lse, p.grad_lse, p.glse_stride_b, p.glse_stride_h, unused_row);
  detail::bind_operand(dq, p.dq, p.dq_stride_b, p.dq_stride_h, p.dq_stride_l);
  detail::bind_operand(dk, p.dk, p.dk_stride_b, p.dk_stride_h, p.dk_stride_s);
  detail::bind_operand(dv, p.dv, p.dv_stride_b, p.dv_stride_h, p.dv_stride_s);
  detail::bind_operand(dmask, p.dmask, p.dmask_stride_b, p.dmask_stride_h, p.dmask_stride_l);
  p.dmask_stride_s = dmask.stride_col;
  p.workspace = workspace;
  return p;
}

// k_new/v_new may be absent (together); leftpad may be null. The split plan and its workspaces
// come after, from kvcache_plan.
inline KvcacheParams kvcache_params(const AttnShape& s, float scale, bool causal,
                                    const AttnOperand& q, const AttnOperand& k_cache,
                                    const AttnOperand& v_cache, const AttnOperand& k_new,
                                    const AttnOperand& v_new, const AttnOperand& out,
                                    const int32_t* seqlens, const int32_t* leftpad) {
  KvcacheParams p;
  detail::set_sizes(p, s, scale);
  p.capacity = int(s.len_k);
  p.causal = causal;
  detail::bind_operand(q, p.q, p.q_stride_b, p.q_stride_h, p.q_stride_l);
  detail::bind_operand(k_cache, p.k_cache, p.kc_stride_b, p.kc_stride_h, p.kc_stride_s);
  detail::bind_operand(v_cache, p.v_cache, p.vc_stride_b, p.vc_stride_h, p.vc_stride_s);
  detail::bind_operand(k_new, p.k_new, p.kn_stride_b, p.kn_stride_h, p.kn_stride_l);
  detail::bind_operand(v_new, p.v_new, p.vn_stride_b, p.vn_stride_h, p.vn_stride_l);
  detail::bind_operand(out, p.out, p.out_stride_b, p.out_stride_h, p.out_stride_l);
  p.seqlens = seqlens;
  p.leftpad = leftpad;
  p.len_new = k_new.data != nullptr ? int(s.len_q) : 0;
  return p;
}

// attention_kvcache's serving options: the number of new tokens (when not Lq), the window
// (-1: unbounded side), the lse output (B, H, Lq) (null: none) and the paged cache (block_table
// null: none; k_cache/v_cache then hold num_blocks blocks of block_size tokens, capacity =
// max_blocks * block_size).
inline void kvcache_serving(KvcacheParams& p, int64_t len_new, int64_t window_left,
                            int64_t window_right, float* lse, int64_t lse_stride_b,
                            int64_t lse_stride_h, const int32_t* block_table, int64_t bt_stride_b,
                            int64_t max_blocks, int64_t num_blocks, int64_t block_size) {
  if (p.k_new != nullptr) p.len_new = int(len_new);
  p.window_left = window_left;
  p.window_right = window_right;
  p.lse = lse;
  p.lse_stride_b = lse_stride_b;
  p.lse_stride_h = lse_stride_h;
  p.block_table = block_table;
  if (block_table != nullptr) {
    p.bt_stride_b = bt_stride_b;
    p.num_blocks = int(num_blocks);
    p.block_size = int(block_size);
    const int64_t cap = max_blocks * block_size;
    p.capacity = cap < (int64_t(1) << 30) ? int(cap) : (1 << 30);  // the launcher refuses 2^30
  }
}

// The rotary tables (max_pos, rotary_half) of attention_kvcache, with their element strides.
inline void kvcache_rotary(KvcacheParams& p, const void* cos, const void* sin, int64_t cos_stride_p,
                           int64_t cos_stride_j, int64_t sin_stride_p, int64_t sin_stride_j,
                           int64_t max_pos, int64_t rotary_half, bool interleaved, bool f32) {
  p.rotary_cos = cos;
  p.rotary_sin = sin;
  p.cos_stride_p = cos_stride_p;
  p.cos_stride_j = cos_stride_j;
  p.sin_stride_p = sin_stride_p;
  p.sin_stride_j = sin_stride_j;
  p.max_pos = int(max_pos);
  p.rotary_half = int(rotary_half);
  p.rotary_interleaved = interleaved;
  p.rotary_f32 = f32;
}

}  // namespace fastattn::cuda
