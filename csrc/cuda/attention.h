// Torch-free host API of the fastattn CUDA attention kernels (raw pointers, element strides,
// cudaStream_t). Semantics are those of the op schemas in csrc/fastattn.cpp.
#pragma once

#include <driver_types.h>

#include <cstdint>

#include "dtype.h"
#include "launch_params.h"

namespace fastattn::cuda {

// What forward and backward share: q, k, v, the optional additive mask, the sizes, the scale
// and the visibility window. Query i may see key j iff j - i lies in
// [diag_offset - window_left, diag_offset + window_right] (a negative window side is unbounded)
// and j < len_k. The last dimension of q/k/v/out is contiguous; every other stride is free
// (broadcast dims of the mask may have stride 0).
struct AttnProblem {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* mask = nullptr;  // additive, q's dtype, (B, H, L, S) by strides; may be null
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_l = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;
  int64_t mask_stride_b = 0, mask_stride_h = 0, mask_stride_l = 0, mask_stride_s = 0;
  int batch = 0, heads = 0, kv_heads = 0, len_q = 0, len_k = 0, head_dim = 0, head_dim_v = 0;
  float scale = 1.0f;
  int64_t window_left = -1, window_right = -1, diag_offset = 0;
  // Packed variable-length sequences (attention_varlen) when cu_seqlens_q is non-null: `batch`
  // sequences, sequence b being rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q (and of out,
  // grad_out, dq, and of each head's lse row) against rows [cu_seqlens_k[b], cu_seqlens_k[b + 1])
  // of k/v (and dk/dv); the batch strides are unused (0). len_q / len_k are max_seqlen_q / _k:
  // they size the grid and bound each sequence's lengths. total_q / total_k are the packed row
  // counts; the offsets are clamped into them on the device (never synchronised). The diagonal
  // of sequence b is at S_b - L_b when bottom_right, else at diag_offset.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;
  bool bottom_right = false;
};

struct AttnFwdParams : AttnProblem {
  void* out = nullptr;   // (B, H, L, Ev), q's dtype
  float* lse = nullptr;  // (B, H, L); varlen: (H, total_q)
  int64_t out_stride_b = 0, out_stride_h = 0, out_stride_l = 0;
  int64_t lse_stride_b = 0, lse_stride_h = 0;
};

cudaError_t attention_fwd(const AttnFwdParams& p, DType dtype, cudaStream_t stream);

// Backward from the saved lse; delta = rowsum(grad_out * out) - grad_lse. Writes dq (B, H, L, E),
// dk (B, Hkv, S, E), dv (B, Hkv, S, Ev) in q's dtype and, when dmask is given, dmask = dS
// (gradient of the additive mask) at every (i, j) with i < L, j < S that a query can see
// (dmask must be zero-initialised: blocks outside the window are not visited). `workspace` is a
// float32 buffer of 2 * B * H * L elements (delta and the base-2 lse per row). Deterministic: no
// atomics anywhere (dK/dV and dQ are computed by separate kernels). Varlen: lse and grad_lse
// (H, total_q), the workspace 2 * H * total_q floats.
struct AttnBwdParams : AttnProblem {
  const void* grad_out = nullptr;
  const void* out = nullptr;
  const float* lse = nullptr;
  const float* grad_lse = nullptr;  // may be null
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* dmask = nullptr;  // may be null
  float* workspace = nullptr;
  int64_t do_stride_b = 0, do_stride_h = 0, do_stride_l = 0;
  int64_t o_stride_b = 0, o_stride_h = 0, o_stride_l = 0;
  int64_t lse_stride_b = 0, lse_stride_h = 0;
  int64_t glse_stride_b = 0, glse_stride_h = 0;
  int64_t dq_stride_b = 0, dq_stride_h = 0, dq_stride_l = 0;
  int64_t dk_stride_b = 0, dk_stride_h = 0, dk_stride_s = 0;
  int64_t dv_stride_b = 0, dv_stride_h = 0, dv_stride_s = 0;
  int64_t dmask_stride_b = 0, dmask_stride_h = 0, dmask_stride_l = 0, dmask_stride_s = 0;
};

cudaError_t attention_bwd(const AttnBwdParams& p, DType dtype, cudaStream_t stream);

// Decoding against a KV cache, split along the keys (flash-decoding) and combined.
// k_new/v_new (B, Hkv, Lnew, E), any Lnew = len_new, are first written into the caches at
// cache_seqlens[b] (positions past the capacity are dropped: lengths are clamped on the device,
// never synchronised). Query i of batch b sits at position total_b - Lq + i, total_b =
// seqlens[b] (+ Lnew with k_new), and sees keys j in [lp_b, total_b) with
// pos - window_left <= j <= pos + window_right (-1: unbounded; causal: window_right = 0),
// lp_b = leftpad[b] (0 when leftpad is null; clamped to [0, total_b]).
// Paged cache (block_table non-null): k_cache/v_cache are (num_blocks, Hkv, block_size, E) (the
// kc_stride_b / vc_stride_b fields are the block strides), capacity = max_blocks * block_size,
// and token t of batch b lives in block block_table[b * bt_stride_b + t / block_size] (clamped
// into [0, num_blocks)), slot t % block_size; the append goes through the table too.
// lse (B, H, Lq), optional: the natural-log log-sum-exp of each row's visible scaled scores
// (-inf for a row that sees no key). Last dims contiguous.
// Rotary embedding (rotary_cos non-null; with k_new): k_new token i of batch b rotated at
// position seqlens[b] - leftpad[b] + i and q token i at total_b - Lq - leftpad[b] + i (the same
// with Lnew = Lq), clamped into [0, max_pos), by the tables' row (see csrc/fastattn.cpp): k_new
// as it is appended, q as it is loaded (rounded to the dtype).
struct KvcacheParams {
  const void* q = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const int32_t* seqlens = nullptr;
  const int32_t* leftpad = nullptr;  // may be null: every sequence starts at cache position 0
  const void* k_new = nullptr;  // may be null (then v_new is null too)
  const void* v_new = nullptr;
  void* out = nullptr;           // (B, H, Lq, E)
  float* partial_out = nullptr;  // workspace: num_splits * B * H * Lq * E floats
  float* partial_lse = nullptr;  // workspace: num_splits * B * H * Lq floats
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_l = 0;
  int64_t kc_stride_b = 0, kc_stride_h = 0, kc_stride_s = 0;
  int64_t vc_stride_b = 0, vc_stride_h = 0, vc_stride_s = 0;
  int64_t kn_stride_b = 0, kn_stride_h = 0, kn_stride_l = 0;
  int64_t vn_stride_b = 0, vn_stride_h = 0, vn_stride_l = 0;
  int64_t out_stride_b = 0, out_stride_h = 0, out_stride_l = 0;
  int batch = 0, heads = 0, kv_heads = 0, len_q = 0, capacity = 0, head_dim = 0;
  int len_new = 0;  // tokens in k_new/v_new (0 without)
  float scale = 1.0f;
  bool causal = true;
  int64_t window_left = -1, window_right = -1;
  float* lse = nullptr;  // may be null
  int64_t lse_stride_b = 0, lse_stride_h = 0;
  const int32_t* block_table = nullptr;  // null: one contiguous cache per sequence
  int64_t bt_stride_b = 0;
  int block_size = 0, num_blocks = 0;
  int num_splits = 1;  // from kvcache_plan
  int64_t split_len = 0;
  // rotary tables (max_pos, rotary_half), float32 (rotary_f32) or the kernels' dtype; any strides
  const void* rotary_cos = nullptr;  // null: no rotary embedding
  const void* rotary_sin = nullptr;
  int64_t cos_stride_p = 0, cos_stride_j = 0, sin_stride_p = 0, sin_stride_j = 0;
  int max_pos = 0, rotary_half = 0;
  bool rotary_interleaved = false, rotary_f32 = true;
};

// Fills num_splits/split_len; returns the workspace sizes (in floats) the caller allocates.
struct KvcacheWorkspace {
  int64_t partial_out_floats, partial_lse_floats;
};
KvcacheWorkspace kvcache_plan(KvcacheParams& p, int num_sms);

cudaError_t attention_kvcache(const KvcacheParams& p, DType dtype, cudaStream_t stream);

}  // namespace fastattn::cuda
