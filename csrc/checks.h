// The argument rules of the public ops, written once. The CPU and CUDA kernels call them, and the
// Python layer calls them (fastattn._C.check_*) in the fake functions and before the Triton and
// reference paths, so every backend raises the same error, worded in the public API's terms
// ("fastattn.layer_norm: weight must have shape [576], got [575]"), for the same bad call.
//
// Error kinds follow Python's: TypeError for a wrong type or dtype, ValueError for a wrong shape
// or value, RuntimeError for a device mismatch. Sizes are read as SymInts, so the checks also run
// on the symbolic shapes torch.compile traces. Nothing here reads tensor data: the data-dependent
// rules (cache_seqlens within the capacity) are checked by the CPU kernel, where the data is on the
// host; CUDA kernels clamp instead of synchronising.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>

namespace fastattn::checks {

// True for the float dtypes the kernels take (float16, bfloat16, float32). float64 passes the
// checks below (the reference runs it) but no kernel takes it.
bool kernel_dtype(c10::ScalarType dt);

// fastattn.layer_norm / rms_norm (rms: no bias). Returns N = prod(normalized_shape).
int64_t check_norm(bool rms, const at::Tensor& input, c10::IntArrayRef normalized_shape,
                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& residual, double eps);

// fastattn.layer_norm / rms_norm with FlashAttention's layer_norm_fn keywords (the
// layer_norm_fused_fwd schema in fastattn.cpp): everything check_norm checks, and residual (any
// float dtype that holds input + residual, or any with residual_in_fp32), x1 (input's shape and
// dtype), weight1/bias1 (as weight/bias; bias1 needs weight1), rowscale (input.shape[:-nd]),
// 0 <= dropout_p < 1, offset (finite; needs weight), quantize (no weight1). Returns N.
int64_t check_norm_fused(bool rms, const at::Tensor& input, c10::IntArrayRef normalized_shape,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& x1,
                         const std::optional<at::Tensor>& weight1,
                         const std::optional<at::Tensor>& bias1,
                         const std::optional<at::Tensor>& rowscale, double eps, double offset,
                         double dropout_p, bool residual_in_fp32, bool quantize);

// fastattn.attention_with_kvcache (shapes, dtypes, devices, scale, window; the values of
// cache_seqlens, cache_leftpad, the rotary positions and the block_table entries where they are
// on the host). block_table: the paged cache (block_size % 16 == 0, entries in [0, num_blocks)).
void check_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                   const std::optional<at::Tensor>& v_new, double scale,
                   const std::optional<at::Tensor>& cache_leftpad,
                   const std::optional<at::Tensor>& rotary_cos,
                   const std::optional<at::Tensor>& rotary_sin, double softcap = 0.0,
                   const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                   const std::optional<at::Tensor>& sinks = std::nullopt,
                   const std::optional<at::Tensor>& block_table = std::nullopt,
                   int64_t window_left = -1, int64_t window_right = -1);

// The score modifiers of the attention ops, q (B, H, L, E): softcap finite and >= 0 (0: none;
// the public functions take None for none and refuse 0), alibi_slopes float32 (H,) or (B, H),
// sinks float32 (H,), both on q's device.
void check_score_mods(const char* fn, const at::Tensor& q, double softcap,
                      const std::optional<at::Tensor>& alibi_slopes,
                      const std::optional<at::Tensor>& sinks);

// fastattn.attention_varlen: q (total_q, H, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev) of one
// float dtype and device, H a multiple of Hkv; cu_seqlens_q / cu_seqlens_k int32 (B + 1,) on q's
// device; max_seqlen_q / max_seqlen_k >= 0; scale finite; 0 <= dropout_p < 1; softcap finite and
// >= 0 (0: none); alibi_slopes float32 (H,) or (B, H); sinks float32 (H,). Where cu_seqlens are
// on the host (never a GPU synchronisation): 0 first, non-decreasing, total_q / total_k last,
// and no sequence longer than max_seqlen_q / max_seqlen_k.
void check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                  int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, double dropout_p,
                  double softcap, const std::optional<at::Tensor>& alibi_slopes,
                  const std::optional<at::Tensor>& sinks);

// fastattn.int8_weight_only_linear / int8_linear: x (..., K), w_int8 (N, K), w_scale (N,),
// bias (N,) or None.
void check_int8_linear(const char* fn, const at::Tensor& x, const at::Tensor& w_int8,
                       const at::Tensor& w_scale, const std::optional<at::Tensor>& bias);

// fastattn.linear: x (..., K) float, weight (N, K) and bias (N,) or None of x's dtype and device.
void check_linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias);

// fastattn.silu_mul: x (..., 2*I) float, the last dim even and > 0. With grad (the backward op):
// grad (..., I) of x's dtype and device.
void check_silu_mul(const at::Tensor& x, const std::optional<at::Tensor>& grad = std::nullopt);

// (*, <trailing dims>) -> (M, N) rows with unit column stride, N = the trailing dims' product:
// a view when each row's N elements are contiguous and the rows evenly spaced (any row stride),
// else a copy. The layout every row kernel (norms, int8) takes.
at::Tensor as_rows(const at::Tensor& t, int64_t trailing_dims, int64_t n);

}  // namespace fastattn::checks
