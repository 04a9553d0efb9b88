// C entry points into the emulated kernels and the launch-parameter helpers, loaded with ctypes
// by tests/test_cuda_build.py. Each takes flat arrays of sizes and element strides and calls the
// same torch-free launcher the CUDA build uses.
#include <cstdint>
#include <string>
#include <vector>

#include "../attention.h"
#include "../attention_params.h"
#include "../common.cuh"
#include "../int8.h"
#include "../launch_params.h"
#include "../layer_norm.h"

namespace fc = fastattn::cuda;

namespace {

std::string g_message;

int finish(cudaError_t err) {
  if (!fa_emu::last_error().empty()) {
    g_message = fa_emu::last_error();
    return err == cudaSuccess ? int(cudaErrorLaunchFailure) : int(err);
  }
  g_message = err == cudaSuccess ? "" : "launcher returned error " + std::to_string(int(err));
  return int(err);
}

fc::DType dtype_of(int code) {
  return code == 0 ? fc::DType::kFloat32 : (code == 1 ? fc::DType::kFloat16 : fc::DType::kBFloat16);
}

// Kernels with known defects, for checking that the emulator exposes them.
__global__ void selftest_smem_exchange_kernel(int* out, bool with_barrier) {
  int* smem = reinterpret_cast<int*>(fc::smem_base());
  const int t = int(threadIdx.x), n = int(blockDim.x);
  smem[t] = t;
  if (with_barrier) __syncthreads();
  out[t] = smem[(t + 32) % n];  // written by another warp
}

__global__ void selftest_divergent_shuffle_kernel(int* out) {
  const int lane = int(threadIdx.x) % 32;
  int v = lane;
  if (lane < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_sync(0xffffffffu, v, 0);
  }
  out[threadIdx.x] = v;
}

}  // namespace

extern "C" {

// 0: the exchange with a barrier, 1: without (a race), 2: shuffles in divergent branches.
int fa_emu_selftest(int which, int* out, int n) {
  fa_emu::clear_error();
  if (which == 2) {
    auto k = selftest_divergent_shuffle_kernel;
    FA_LAUNCH(k, dim3(1), dim3(unsigned(n)), 0, nullptr, out);
  } else {
    auto k = selftest_smem_exchange_kernel;
    FA_LAUNCH(k, dim3(1), dim3(unsigned(n)), size_t(n) * sizeof(int), nullptr, out, which == 0);
  }
  return finish(fc::launch_status());
}

const char* fa_emu_message() { return g_message.c_str(); }

// order: 0 forward, 1 reverse, 2 shuffled, 3 cycling; eager: cp.async lands at issue time
void fa_emu_configure(int order_mode, int cp_async_eager) {
  fa_emu::set_order_mode(order_mode);
  fa_emu::set_cp_async_eager(cp_async_eager != 0);
}

long long fa_emu_collectives() { return fa_emu::collective_count(); }

// ---- launch parameters -----------------------------------------------------------------------
int fa_emu_head_dim_bucket(int d) { return fc::head_dim_bucket(d); }

void fa_emu_attn_fwd_tile(int d, int* out5) {
  const fc::AttnFwdTile t = fc::attn_fwd_tile(d);
  out5[0] = t.n_warps;
  out5[1] = t.m_tiles;
  out5[2] = t.block_m;
  out5[3] = t.block_n;
  out5[4] = t.q_in_regs ? 1 : 0;
}

long long fa_emu_smem_bytes(int which, int d) {
  switch (which) {
    case 0:
      return (long long)fc::attn_fwd_smem_bytes(d);
    case 1:
      return (long long)fc::attn_simt_smem_bytes<float>(d);
    case 2:
      return (long long)fc::attn_bwd_dkdv_smem_bytes(d);
    case 3:
      return (long long)fc::attn_bwd_dq_smem_bytes(d);
    case 4:
      return (long long)fc::attn_simt_bwd_smem_bytes(d);
    case 5:
      return (long long)fc::kvcache_smem_bytes<float>(d);
    case 6:
      return (long long)fc::kvcache_smem_bytes<fc::bf16>(d);
    case 7:
      return (long long)fc::int8_gemm_smem_bytes(fc::kInt8GemmLarge);
    case 8:
      return (long long)fc::int8_gemm_smem_bytes(fc::kInt8GemmSmall);
  }
  return -1;
}

void fa_emu_kvcache_split(long long blocks, long long max_keys, int sms, long long* out2) {
  const fc::KvcacheSplit s = fc::kvcache_split(blocks, max_keys, sms);
  out2[0] = s.num_splits;
  out2[1] = s.split_len;
}

int fa_emu_norm_config_index(long long n, int elem_bytes) {
  return fc::norm_config_index(n, elem_bytes);
}

int fa_emu_norm_bwd_blocks(long long rows, int rows_per_block, int sms) {
  return fc::norm_bwd_blocks(rows, rows_per_block, sms);
}

int fa_emu_int8_gemm_use_large(long long m, long long n, int sms) {
  return fc::int8_gemm_use_large(m, n, sms) ? 1 : 0;
}

// ---- attention -------------------------------------------------------------------------------
// st: q(b,h,l) k(b,h,s) v(b,h,s) mask(b,h,l,s) out(b,h,l) lse(b,h); sz: B H Hkv L S E Ev
int fa_emu_attention_fwd(int dtype, const void* q, const void* k, const void* v, const void* mask,
                         void* out, float* lse, const int64_t* st, const int* sz, float scale,
                         int64_t wl, int64_t wr, int64_t diag) {
  fa_emu::clear_error();
  const fc::AttnShape shape{sz[0], sz[1], sz[2], sz[3], sz[4], sz[5], sz[6]};
  const fc::AttnFwdParams p = fc::attn_fwd_params(
      shape, scale, {wl, wr, diag}, {q, st[0], st[1], st[2]}, {k, st[3], st[4], st[5]},
      {v, st[6], st[7], st[8]}, {mask, st[9], st[10], st[11], st[12]},
      {out, st[13], st[14], st[15]}, {lse, st[16], st[17]});
  return finish(fc::attention_fwd(p, dtype_of(dtype), nullptr));
}

// Packed variable-length sequences. st: q(t,h) k(t,h) v(t,h) out(t,h) lse(h) (token and head
// strides); sz: B H Hkv max_seqlen_q max_seqlen_k E Ev; totals: total_q total_k.
int fa_emu_attention_varlen_fwd(int dtype, const void* q, const void* k, const void* v, void* out,
                                float* lse, const int64_t* st, const int* sz,
                                const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
                                const int64_t* totals, float scale, int64_t wl, int64_t wr,
                                int bottom_right) {
  fa_emu::clear_error();
  const fc::AttnShape shape{sz[0], sz[1], sz[2], sz[3], sz[4], sz[5], sz[6]};
  fc::AttnFwdParams p = fc::attn_fwd_params(
      shape, scale, {wl, wr, 0}, {q, 0, st[1], st[0]}, {k, 0, st[3], st[2]},
      {v, 0, st[5], st[4]}, {}, {out, 0, st[7], st[6]}, {lse, 0, st[8]});
  fc::set_varlen(p, cu_seqlens_q, cu_seqlens_k, totals[0], totals[1], bottom_right != 0);
  return finish(fc::attention_fwd(p, dtype_of(dtype), nullptr));
}

// st: do(t,h) q k v o(t,h) lse(h) glse(h) dq dk dv(t,h); sz, totals as the forward's.
int fa_emu_attention_varlen_bwd(int dtype, const void* grad_out, const void* q, const void* k,
                                const void* v, const void* out, const float* lse,
                                const float* grad_lse, void* dq, void* dk, void* dv,
                                const int64_t* st, const int* sz, const int32_t* cu_seqlens_q,
                                const int32_t* cu_seqlens_k, const int64_t* totals, float scale,
                                int64_t wl, int64_t wr, int bottom_right) {
  fa_emu::clear_error();
  const fc::AttnShape shape{sz[0], sz[1], sz[2], sz[3], sz[4], sz[5], sz[6]};
  std::vector<float> workspace(size_t(2) * size_t(shape.heads * totals[0]) + 1, 0.0f);
  fc::AttnBwdParams p = fc::attn_bwd_params(
      shape, scale, {wl, wr, 0}, {q, 0, st[3], st[2]}, {k, 0, st[5], st[4]},
      {v, 0, st[7], st[6]}, {}, {grad_out, 0, st[1], st[0]}, {out, 0, st[9], st[8]},
      {lse, 0, st[10]}, {grad_lse, 0, st[11]}, {dq, 0, st[13], st[12]}, {dk, 0, st[15], st[14]},
      {dv, 0, st[17], st[16]}, {}, workspace.data());
  fc::set_varlen(p, cu_seqlens_q, cu_seqlens_k, totals[0], totals[1], bottom_right != 0);
  return finish(fc::attention_bwd(p, dtype_of(dtype), nullptr));
}

// st: q(b,h,l) kc(b,h,s) vc(b,h,s) kn(b,h,l) vn(b,h,l) out(b,h,l); sz: B H Hkv Lq cap E
// (paged: kc/vc's b stride is the block stride and cap is ignored); ext: Lnew, window_left,
// window_right, lse(b,h) strides, block_table's row stride, max_blocks, num_blocks, block_size.
// Returns the number of splits used in *splits_out. Workspaces are allocated here.
int fa_emu_attention_kvcache(int dtype, const void* q, void* k_cache, void* v_cache,
                             const int32_t* seqlens, const int32_t* leftpad, const void* k_new,
                             const void* v_new, void* out, const int64_t* st, const int* sz,
                             float scale, int causal, int num_sms, int* splits_out,
                             const void* cos, const void* sin, const int64_t* rst, int max_pos,
                             int rotary_half, int interleaved, int tables_f32, float* lse,
                             const int32_t* block_table, const int64_t* ext) {
  fa_emu::clear_error();
  const fc::AttnShape shape{sz[0], sz[1], sz[2], sz[3], sz[4], sz[5], sz[5]};
  fc::KvcacheParams p = fc::kvcache_params(
      shape, scale, causal != 0, {q, st[0], st[1], st[2]}, {k_cache, st[3], st[4], st[5]},
      {v_cache, st[6], st[7], st[8]}, {k_new, st[9], st[10], st[11]},
      {v_new, st[12], st[13], st[14]}, {out, st[15], st[16], st[17]}, seqlens, leftpad);
  fc::kvcache_serving(p, ext[0], ext[1], ext[2], lse, ext[3], ext[4], block_table, ext[5], ext[6],
                      ext[7], ext[8]);
  if (cos != nullptr)  // rst: cos(p, j) sin(p, j)
    fc::kvcache_rotary(p, cos, sin, rst[0], rst[1], rst[2], rst[3], max_pos, rotary_half,
                       interleaved != 0, tables_f32 != 0);
  const fc::KvcacheWorkspace ws = fc::kvcache_plan(p, num_sms);
  std::vector<float> partial_out(size_t(ws.partial_out_floats) + 1, 0.0f);
  std::vector<float> partial_lse(size_t(ws.partial_lse_floats) + 1, 0.0f);
  if (p.num_splits > 1) {
    p.partial_out = partial_out.data();
    p.partial_lse = partial_lse.data();
  }
  *splits_out = p.num_splits;
  return finish(fc::attention_kvcache(p, dtype_of(dtype), nullptr));
}

// st: do(b,h,l) q k v o(b,h,l) lse(b,h) glse(b,h) mask(b,h,l,s) dq dk dv(b,h,l) dmask(b,h,l,s)
// sz: B H Hkv L S E Ev
int fa_emu_attention_bwd(int dtype, const void* grad_out, const void* q, const void* k,
                         const void* v, const void* out, const float* lse, const float* grad_lse,
                         const void* mask, void* dq, void* dk, void* dv, void* dmask,
                         const int64_t* st, const int* sz, float scale, int64_t wl, int64_t wr,
                         int64_t diag) {
  fa_emu::clear_error();
  const fc::AttnShape shape{sz[0], sz[1], sz[2], sz[3], sz[4], sz[5], sz[6]};
  std::vector<float> workspace(size_t(2) * size_t(shape.batch * shape.heads * shape.len_q) + 1,
                               0.0f);
  const fc::AttnBwdParams p = fc::attn_bwd_params(
      shape, scale, {wl, wr, diag}, {q, st[3], st[4], st[5]}, {k, st[6], st[7], st[8]},
      {v, st[9], st[10], st[11]}, {mask, st[19], st[20], st[21], st[22]},
      {grad_out, st[0], st[1], st[2]}, {out, st[12], st[13], st[14]}, {lse, st[15], st[16]},
      {grad_lse, st[17], st[18]}, {dq, st[23], st[24], st[25]}, {dk, st[26], st[27], st[28]},
      {dv, st[29], st[30], st[31]}, {dmask, st[32], st[33], st[34], st[35]}, workspace.data());
  return finish(fc::attention_bwd(p, dtype_of(dtype), nullptr));
}

// ---- layer norm ------------------------------------------------------------------------------
// st: input residual out residual_out (row strides); flags: rms, param_float32
int fa_emu_layer_norm_fwd(int dtype, const void* input, const void* residual, const void* weight,
                          const void* bias, void* out, void* residual_out, float* mean, float* rstd,
                          long long rows, long long cols, const int64_t* st, float eps, int rms,
                          int param_float32) {
  fa_emu::clear_error();
  fc::LayerNormFwdParams p;
  p.input = input;
  p.residual = residual;
  p.weight = weight;
  p.bias = bias;
  p.out = out;
  p.residual_out = residual_out;
  p.mean = mean;
  p.rstd = rstd;
  p.rows = rows;
  p.cols = cols;
  p.input_stride = st[0], p.residual_stride = st[1], p.out_stride = st[2];
  p.residual_out_stride = st[3];
  p.eps = eps;
  p.rms = rms != 0;
  p.param_float32 = param_float32 != 0;
  return finish(fc::layer_norm_fwd(p, dtype_of(dtype), nullptr));
}

// st: grad_out grad_residual_out x grad_input (row strides)
int fa_emu_layer_norm_bwd(int dtype, const void* grad_out, const void* grad_residual_out,
                          const void* x, const void* weight, const float* mean, const float* rstd,
                          void* grad_input, void* grad_weight, void* grad_bias, long long rows,
                          long long cols, const int64_t* st, int rms, int param_float32,
                          int num_sms) {
  fa_emu::clear_error();
  fc::LayerNormBwdParams p;
  p.grad_out = grad_out;
  p.grad_residual_out = grad_residual_out;
  p.x = x;
  p.weight = weight;
  p.mean = mean;
  p.rstd = rstd;
  p.grad_input = grad_input;
  p.grad_weight = grad_weight;
  p.grad_bias = grad_bias;
  p.rows = rows;
  p.cols = cols;
  p.grad_out_stride = st[0], p.grad_residual_out_stride = st[1], p.x_stride = st[2];
  p.grad_input_stride = st[3];
  p.rms = rms != 0;
  p.param_float32 = param_float32 != 0;
  p.num_sms = num_sms;
  std::vector<float> ws(size_t(fc::layer_norm_bwd_workspace(p, dtype_of(dtype))) + 4, 0.0f);
  // 16-byte aligned like a torch allocation
  float* base = ws.data();
  while (reinterpret_cast<uintptr_t>(base) % 16 != 0) ++base;
  p.workspace = base;
  return finish(fc::layer_norm_bwd(p, dtype_of(dtype), nullptr));
}

// ---- int8 ------------------------------------------------------------------------------------
int fa_emu_quantize_per_token(int dtype, const void* x, int8_t* q, float* scale, long long rows,
                              long long cols, long long x_stride, long long q_stride) {
  fa_emu::clear_error();
  fc::QuantizeParams p;
  p.x = x;
  p.q = q;
  p.scale = scale;
  p.rows = rows, p.cols = cols, p.x_stride = x_stride, p.q_stride = q_stride;
  return finish(fc::quantize_per_token(p, dtype_of(dtype), nullptr));
}

// out_type: 0 int32, 1 float32, 2 float16, 3 bfloat16; mnk and strides (a, b, out)
int fa_emu_int8_gemm(const int8_t* a, const int8_t* b, const float* a_scale, const float* b_scale,
                     const float* bias, void* out, const int64_t* mnk, const int64_t* st,
                     int out_type, int num_sms) {
  fa_emu::clear_error();
  fc::Int8GemmParams p;
  p.a = a;
  p.b = b;
  p.a_scale = a_scale;
  p.b_scale = b_scale;
  p.bias = bias;
  p.out = out;
  p.m = mnk[0], p.n = mnk[1], p.k = mnk[2];
  p.a_stride = st[0], p.b_stride = st[1], p.out_stride = st[2];
  p.out_type = static_cast<fc::Int8Out>(out_type);
  p.num_sms = num_sms;
  return finish(fc::int8_gemm(p, nullptr));
}

int fa_emu_int8_weight_only(int dtype, const void* x, const int8_t* w, const float* w_scale,
                            const float* bias, void* out, const int64_t* mnk, const int64_t* st) {
  fa_emu::clear_error();
  fc::WeightOnlyParams p;
  p.x = x;
  p.w = w;
  p.w_scale = w_scale;
  p.bias = bias;
  p.out = out;
  p.m = mnk[0], p.n = mnk[1], p.k = mnk[2];
  p.x_stride = st[0], p.w_stride = st[1], p.out_stride = st[2];
  return finish(fc::int8_weight_only_linear(p, dtype_of(dtype), nullptr));
}

}  // extern "C"
