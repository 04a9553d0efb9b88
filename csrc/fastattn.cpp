// fastattn._C: the op schemas. Each backend adds its kernels under its dispatch key
// (csrc/cpu/*.cpp: CPU, csrc/cuda/*.cpp: CUDA), csrc/autograd.cpp their autograd; fake tensors
// are registered from Python (fastattn/ops/). The Python module itself (the fast entry points and
// the argument checks) is csrc/python.cpp. Importing the module is what registers everything.
#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  // ---- attention ---------------------------------------------------------------------------
  // q (B, H, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), any strides (last dim contiguous not
  // required). attn_mask: additive float mask in q's dtype, already broadcast to (B, H, L, S)
  // (stride 0 on broadcast dims). Query i may see key j iff
  //   (window_left < 0 || j >= i + diag_offset - window_left) &&
  //   (window_right < 0 || j <= i + diag_offset + window_right)
  // (diag_offset = 0 for top-left alignment, S - L for bottom-right; causal is window_right = 0).
  // H % Hkv == 0; head h reads kv head h / (H / Hkv). Rows with no visible key give out = 0 and
  // lse = -inf. out (B, H, L, Ev) in q's dtype, stored token-major: strides of
  // (B, L, H, Ev).transpose(1, 2), so out.transpose(1, 2) is contiguous; lse (B, H, L) float32.
  // dropout_p > 0: keep-probability 1 - dropout_p from a counter-based RNG keyed by seed.
  // Score modifiers, applied in this order to x = scale * q.k (before the mask and windows):
  //   softcap > 0: x = softcap * tanh(x / softcap) (0: none);
  //   alibi_slopes float32 (B, H) by strides (stride 0 on a broadcast batch):
  //     x -= slopes[b, h] * |i + diag_offset - j|;
  //   sinks float32 (H,): one more logit sinks[h] in each row's softmax denominator with no value
  //     row: out = sum_j p_j v_j with p_j = exp(x_j - lse), lse = log(exp(sinks[h]) +
  //     sum_j exp(x_j)) (a row with no visible key: out = 0, lse = sinks[h]).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, "
      "int window_left, int window_right, int diag_offset, float dropout_p, int seed, "
      "float softcap=0., Tensor? alibi_slopes=None, Tensor? sinks=None) "
      "-> (Tensor out, Tensor lse)");
  // Backward from the saved lse. delta = rowsum(grad_out * out) - grad_lse (grad_lse optional)
  // so a gradient flowing into lse is handled. dmask (B, H, L, S) in attn_mask's dtype when
  // compute_dmask, else an empty tensor. deterministic: no atomics, bitwise repeatable.
  // softcap / alibi_slopes / sinks as given to attention_fwd (softcap: dx *= 1 - tanh^2; the
  // slopes get no gradient). dsinks (H,) float32 = -sum over (b, i) of exp(sinks[h] - lse) *
  // delta when sinks are given, else an empty tensor.
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? grad_lse, Tensor? attn_mask, float scale, int window_left, int window_right, "
      "int diag_offset, float dropout_p, int seed, bool compute_dmask, bool deterministic, "
      "float softcap=0., Tensor? alibi_slopes=None, Tensor? sinks=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask, Tensor dsinks)");
  // The dropout keep mask that attention_fwd (cu_seqlens None) or attention_varlen_fwd (both
  // cu_seqlens given) draws with (dropout_p, seed) on the same backend, from the same RNG
  // function: bool, True = kept. attention_fwd: (B, H, L, S) from q (B, H, L, E) and
  // k (B, Hkv, S, E), the draw of every (query, key) pair, visible or not. attention_varlen_fwd:
  // (total_q, H, max_seqlen_k) from q (total_q, H, E) and k (total_k, Hkv, E), [r, h, j] the
  // flag of row r for key j of its own sequence, False past that sequence's keys (max_seqlen_q
  // bounds the sequences' rows: the GPU grid). dropout_p = 0:
  // every flag True (the sequences' keys). For tests and debugging (return_dropout_mask).
  m.def(
      "attention_dropout_mask(Tensor q, Tensor k, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float dropout_p, int seed) -> Tensor");
  // Decoding: q (B, H, Lq, E); caches (B, Hkv, capacity, E); cache_seqlens int32 (B,);
  // k_new/v_new (B, Hkv, Lq, E) written in place at cache_seqlens. Keys visible to query i of
  // batch b: [lp_b, total_b - Lq + i] if causal else [lp_b, total_b), total_b = seqlens[b]
  // (+ Lq with k_new), lp_b = cache_leftpad[b] (int32 (B,), left padding of the sequence; 0 when
  // None). A query that sees no key gives zeros. Returns (B, H, Lq, E).
  // Rotary embedding (rotary_cos/rotary_sin (max_pos, rotary_dim / 2) in q's dtype or float32,
  // any strides, both or neither, only with k_new): q token i and k_new token i of sequence b are
  // rotated at position p = seqlens[b] - lp_b + i (the token's position in its own sequence: the
  // left padding does not count), p < max_pos. Dims [0, rotary_dim) of each head are rotated,
  // the rest pass through; pairs (j, j + rotary_dim/2) (GPT-NeoX / Llama halves), or
  // (2j, 2j + 1) with rotary_interleaved (GPT-J); for a pair (x1, x2), c = cos[p, j],
  // s = sin[p, j]: (x1 c - x2 s, x2 c + x1 s), computed in float32 and rounded to q's dtype.
  // k_new is rotated before it is written to k_cache (the cache holds rotated keys); v_new is
  // not rotated; q and k_new themselves are not modified.
  // softcap / alibi_slopes ((B, H) by strides) / sinks as in attention_fwd, query i of sequence b
  // at position total_b - Lq + i and key j at j (cache positions: the distance is unchanged by
  // the left padding).
  // k_new/v_new may hold any number of tokens Lnew (B, Hkv, Lnew, E), not only Lq: then
  // total_b = seqlens[b] + Lnew, the queries are the last Lq positions (query i at
  // total_b - Lq + i; q token i rotated at total_b - Lq - lp_b + i, clamped at 0) and k_new token
  // i is written (and rotated) at seqlens[b] + i.
  // Paged cache (block_table int32 (B, max_blocks)): k_cache/v_cache are
  // (num_blocks, Hkv, block_size, E[v]), block_size % 16 == 0; token t of sequence b lives in
  // block block_table[b, t // block_size], slot t % block_size (k_new/v_new are written there);
  // max_blocks * block_size >= total_b and the entries of the blocks holding tokens [0, total_b)
  // lie in [0, num_blocks) (checked where the table is on the host; GPU kernels clamp).
  // window_left / window_right (-1: unbounded) as in attention_fwd with the bottom-right
  // alignment: query i of sequence b sees keys j with
  //   total_b - Lq + i - window_left <= j <= total_b - Lq + i + window_right
  // (causal: window_right = min(window_right, 0)), within [lp_b, total_b).
  m.def(
      "attention_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, "
      "Tensor? k_new, Tensor? v_new, float scale, bool causal, Tensor? cache_leftpad=None, "
      "Tensor? rotary_cos=None, Tensor? rotary_sin=None, bool rotary_interleaved=False, "
      "float softcap=0., Tensor? alibi_slopes=None, Tensor? sinks=None, "
      "Tensor? block_table=None, int window_left=-1, int window_right=-1) -> Tensor");
  // attention_kvcache that also returns lse (B, H, Lq) float32: the log-sum-exp of the row's
  // scaled, modified, masked scores (the sink included; -inf for a row with no visible key and
  // no sink), as attention_fwd's lse.
  m.def(
      "attention_kvcache_lse(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor cache_seqlens, Tensor? k_new, Tensor? v_new, float scale, bool causal, "
      "Tensor? cache_leftpad=None, Tensor? rotary_cos=None, Tensor? rotary_sin=None, "
      "bool rotary_interleaved=False, float softcap=0., Tensor? alibi_slopes=None, "
      "Tensor? sinks=None, Tensor? block_table=None, int window_left=-1, int window_right=-1) "
      "-> (Tensor out, Tensor lse)");
  // Packed variable-length attention (fastattn.attention_varlen): q (total_q, H, E), k (total_k,
  // Hkv, E), v (total_k, Hkv, Ev), any strides; cu_seqlens_q / cu_seqlens_k int32 (B + 1,): 0
  // first, non-decreasing, total_q / total_k last (fastattn::checks::check_varlen; the values
  // where they are on the host). Sequence b is the query rows [cu_q[b], cu_q[b + 1]) against the
  // keys [cu_k[b], cu_k[b + 1]), L_b x S_b, with attention_fwd's semantics per sequence:
  // window_left / window_right as there, with diag_offset = S_b - L_b when bottom_right, else
  // 0; dropout, softcap, sinks as there; alibi_slopes float32 (B, H) by strides (row b for
  // sequence b). max_seqlen_q / max_seqlen_k bound every L_b / S_b (the GPU grid is sized by
  // them). out (total_q, H, Ev) in q's dtype, contiguous; lse (H, total_q) float32.
  m.def(
      "attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, int window_left, "
      "int window_right, bool bottom_right, float dropout_p, int seed, float softcap=0., "
      "Tensor? alibi_slopes=None, Tensor? sinks=None) -> (Tensor out, Tensor lse)");
  // Backward from the saved lse, as attention_bwd (delta = rowsum(grad_out * out) - grad_lse;
  // deterministic: bitwise repeatable). dq (total_q, H, E), dk (total_k, Hkv, E), dv (total_k,
  // Hkv, Ev) in q's dtype, any strides; dsinks (H,) float32 when sinks are given, else empty.
  m.def(
      "attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? grad_lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float scale, int window_left, int window_right, bool bottom_right, "
      "float dropout_p, int seed, bool deterministic, float softcap=0., "
      "Tensor? alibi_slopes=None, Tensor? sinks=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dsinks)");
  // ---- layer norm / rms norm -------------------------------------------------------------------
  // input (*, *normalized_shape), any strides: rows of N = prod(normalized_shape) elements, read
  // in place when each row is contiguous, else copied once. residual the same shape and dtype;
  // weight/bias normalized_shape-shaped. Argument rules: fastattn::checks::check_norm.
  // rms: out = x * rstd * weight with rstd = 1/sqrt(mean(x^2) + eps), mean returned as zeros.
  // Statistics in float32. With residual, x = input + residual is rounded to input's dtype,
  // returned as residual_out (input's shape) and normalised; without, residual_out is an empty
  // tensor. out in input's shape and dtype (contiguous); mean, rstd float32 (M,), M rows.
  m.def(
      "layer_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "Tensor? residual, float eps, bool rms) "
      "-> (Tensor out, Tensor residual_out, Tensor mean, Tensor rstd)");
  // On the (M, N) rows: x is what was normalised (residual_out when fused, else input), with
  // stride(1) == 1; weight/bias (N,). grad_input = dL/dx
  // (+ grad_residual_out when given); it is the gradient of both input and residual.
  // grad_weight/grad_bias (N,) in weight/bias dtype, reduced deterministically; empty when the
  // corresponding tensor is None.
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor x, Tensor? weight, "
      "Tensor? bias, Tensor mean, Tensor rstd, bool rms) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // FlashAttention's layer_norm_fn / rms_norm_fn (and Gemma's offset), on the same rows.
  // Argument rules: fastattn::checks::check_norm_fused. With p = dropout_p, per row:
  //   x' = dropout(input * rowscale) (+ dropout(x1)) (+ residual)
  // in float32, rounded once to the residual dtype R (float32 if residual_in_fp32, else
  // residual's dtype, else input's): residual_out (input's shape, R) and what is normalised.
  // When x' is input itself (no residual, x1, rowscale or dropout, R = input's dtype),
  // residual_out is an empty tensor and input is what was normalised. dropout keeps an element with probability 1 - p (scaling it by 1 / (1 - p));
  // the masks (bool, input's shape, True = kept) are drawn by a counter-based generator keyed by
  // seed and returned (dropout_mask1 for x1; empty tensors when p == 0 or x1 is None).
  // rowscale (input.shape[:-nd]) scales input only. out = xhat * (offset + weight) + bias in
  // input's dtype; out1 = xhat * (offset + weight1) + bias1 when weight1 is given, else empty.
  // quantize: out is int8 = quantize_per_token(the output in input's dtype) and out_scale its
  // float32 per-row scale (input.shape[:-nd]); else out_scale is empty. mean, rstd (M,) float32.
  m.def(
      "layer_norm_fused_fwd(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "Tensor? residual, Tensor? x1, Tensor? weight1, Tensor? bias1, Tensor? rowscale, "
      "float eps, bool rms, float offset, float dropout_p, int seed, bool residual_in_fp32, "
      "bool quantize) -> (Tensor out, Tensor out1, Tensor residual_out, Tensor dropout_mask, "
      "Tensor dropout_mask1, Tensor mean, Tensor rstd, Tensor out_scale)");
  // On the (M, N) rows: x = residual_out, or input when residual_out is empty (stride(1) == 1), grad_out/grad_out1 in input_dtype,
  // grad_residual_out in x's dtype; weight/weight1 (N,) (offset added here); masks (M, N) bool;
  // rowscale (M,). d = dL/dx' (+ grad_residual_out) is grad_residual (residual_dtype; empty when
  // residual_dtype is None); grad_x1 = d * dropout_mask1 / (1 - p) (input_dtype; empty when
  // has_x1 is false); grad_input = d * dropout_mask / (1 - p) * rowscale (input_dtype).
  // grad_weight/grad_bias/grad_weight1/grad_bias1 (N,) float32, reduced deterministically;
  // empty when not wanted (grad_weight: weight given; grad_bias: has_bias; ...1 likewise).
  m.def(
      "layer_norm_fused_bwd(Tensor grad_out, Tensor? grad_out1, Tensor? grad_residual_out, "
      "Tensor x, Tensor? weight, Tensor? weight1, Tensor? dropout_mask, Tensor? dropout_mask1, "
      "Tensor? rowscale, Tensor mean, Tensor rstd, float offset, float dropout_p, bool rms, "
      "bool has_bias, bool has_bias1, bool has_x1, ScalarType input_dtype, "
      "ScalarType? residual_dtype) -> (Tensor grad_input, Tensor grad_residual, Tensor grad_x1, "
      "Tensor grad_weight, Tensor grad_bias, Tensor grad_weight1, Tensor grad_bias1)");
  // ---- activations -----------------------------------------------------------------------------
  // Llama-style gated MLP activation (vLLM's silu_and_mul): x (..., 2*I) is the output of one
  // fused gate/up projection, gate = x[..., :I], up = x[..., I:]. out (..., I) =
  // silu(gate) * up with silu(g) = g / (1 + exp(-g)), computed in float32 and rounded once to
  // x's dtype; out is contiguous. x: float16/bfloat16/float32, x.shape[-1] even and > 0, any
  // leading dims (M rows of 2*I): each row's 2*I elements must be contiguous to be read in place,
  // rows any (evenly spaced) stride apart, else x is copied once. Argument rules:
  // fastattn::checks::check_silu_mul.
  m.def("silu_mul_fwd(Tensor x) -> Tensor");
  // grad (..., I) of out, x as given to silu_mul_fwd: grad_x (..., 2*I) in x's dtype,
  // contiguous, with sig = 1 / (1 + exp(-gate)):
  //   grad_x[..., :I] = grad * up * sig * (1 + gate * (1 - sig)),  grad_x[..., I:] = grad * gate * sig
  m.def("silu_mul_bwd(Tensor grad, Tensor x) -> Tensor");
  // ---- int8 ------------------------------------------------------------------------------------
  // x (M, K) float16/bfloat16/float32, stride(1) == 1. Per row: absmax in float32,
  // scale = absmax / 127, q = clamp(round_half_even(x * (127 / absmax)), -127, 127), q = 0 where
  // absmax == 0. Bit-exact with fastattn.reference.quantize_per_token.
  m.def("quantize_per_token(Tensor x) -> (Tensor x_int8, Tensor scale)");
  // a int8 (M, K), b int8 (N, K) (nn.Linear weight layout): acc = a @ b.T in int32.
  // Both scales None: returns acc (int32). Otherwise the epilogue of the same kernel computes
  // acc * a_scale[m] * b_scale[n] + bias[n] in float32 and casts to out_dtype (default float32).
  m.def(
      "int8_gemm(Tensor a, Tensor b, Tensor? a_scale, Tensor? b_scale, Tensor? bias, "
      "ScalarType? out_dtype) -> Tensor");
  // Weight-only int8 for small M (decoding): x (..., K) float, w int8 (N, K), w_scale float32 (N,):
  // out (..., N) = (x @ w.T) * w_scale + bias, accumulated in float32, in x's dtype. Argument
  // rules: fastattn::checks::check_int8_linear.
  m.def(
      "int8_weight_only_linear(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias) -> Tensor");
  // The same on the CPU with float32 x of 16 rows or more rounded to bfloat16 for the products,
  // where the CPU multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16): float32 accumulation
  // and output, at the bfloat16 GEMM's speed. Otherwise (other dtypes, fewer rows, other CPUs)
  // exactly int8_weight_only_linear. What fastattn.nn.Int8Linear(activations="auto") runs on the
  // CPU above 16 rows.
  m.def(
      "int8_weight_only_linear_bf16(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias) -> "
      "Tensor");
  // F.linear for decoding: x (..., K) float, weight (N, K) and bias (N,) of x's dtype: out (..., N)
  // = x @ weight.T + bias, accumulated in float32 and rounded once to x's dtype. The CPU kernel
  // streams weight at the memory's speed for few rows (M <= 16, AVX-512); more rows, or CPUs
  // without AVX-512, run at::linear (a GEMM, compute-bound there). Argument rules:
  // fastattn::checks::check_linear.
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}
