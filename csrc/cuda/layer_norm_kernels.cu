// LayerNorm / RMSNorm forward and backward.
//  * Vectorised kernels: a row lives in registers, spread over 32 * warps_per_row threads that
//    each hold vecs_per_thread 16-byte vectors (consecutive threads read consecutive 16 bytes);
//    statistics in float32 by warp shuffles (plus shared memory across the warps of a row).
//    The variance is a second pass over the registers, not E[x^2] - E[x]^2.
//  * Generic kernels (rows that are not 16-byte aligned or longer than the largest config):
//    a block per row, passes over global memory.
//  * Backward: grad_weight / grad_bias are summed per block into a partial buffer
//    (one row per row slot) and reduced over the partials in a fixed order: deterministic.
#include "common.cuh"
#include "layer_norm.h"

namespace fastattn::cuda {
namespace detail {

template <class T>
constexpr int vec_elems() {
  return 16 / int(sizeof(T));
}

template <class T>
FA_DEVICE void load_vec(const T* p, float (&f)[vec_elems<T>()]) {
  const uint4 u = load16(p);
  T v[vec_elems<T>()];
  __builtin_memcpy(static_cast<void*>(v), &u, 16);
#pragma unroll
  for (int e = 0; e < vec_elems<T>(); ++e) f[e] = to_float(v[e]);
}

template <class T>
FA_DEVICE void store_vec(T* p, const float (&f)[vec_elems<T>()]) {
  T v[vec_elems<T>()];
#pragma unroll
  for (int e = 0; e < vec_elems<T>(); ++e) v[e] = from_float<T>(f[e]);
  uint4 u;
  __builtin_memcpy(&u, static_cast<const void*>(v), 16);
  store16(p, u);
}

// kVec parameters (weight or bias) starting at col, stored as T or as float32.
template <class T>
FA_DEVICE void load_param_vec(const void* w, bool is_float, int64_t col,
                              float (&f)[vec_elems<T>()]) {
  constexpr int kVec = vec_elems<T>();
  if (is_float) {
    const float* wf = static_cast<const float*>(w) + col;
#pragma unroll
    for (int j = 0; j < kVec / 4; ++j) {
      const uint4 u = load16(wf + 4 * j);
      __builtin_memcpy(&f[4 * j], &u, 16);
    }
  } else {
    load_vec<T>(static_cast<const T*>(w) + col, f);
  }
}

FA_DEVICE float load_param(const void* w, bool is_float, int64_t col, DType dtype) {
  if (is_float) return static_cast<const float*>(w)[col];
  switch (dtype) {
    case DType::kFloat16:
      return to_float(static_cast<const fp16*>(w)[col]);
    case DType::kBFloat16:
      return to_float(static_cast<const bf16*>(w)[col]);
    default:
      return static_cast<const float*>(w)[col];
  }
}

// Sum over the kW warps of a row; red holds kRows x kW floats. Every thread of the block calls it.
template <int kW, int kRows>
FA_DEVICE float row_sum(float v, float* red, int slot, int warp_in_row, int lane) {
  v = warp_sum(v);
  if constexpr (kW == 1) {
    return v;
  } else {
    if (lane == 0) red[slot * kW + warp_in_row] = v;
    __syncthreads();
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kW; ++w) s += red[slot * kW + w];
    __syncthreads();  // red is reused by the next reduction
    return s;
  }
}

struct LnFwdArgs {
  LayerNormFwdParams p;
  DType dtype;
};

template <class T, int kW, int kVPT, int kRows>
__global__ void __launch_bounds__(32 * kW * kRows) layer_norm_fwd_kernel(const LnFwdArgs args) {
  constexpr int kVec = vec_elems<T>(), kTPR = 32 * kW;
  const LayerNormFwdParams& p = args.p;
  const int tid = int(threadIdx.x), slot = tid / kTPR, t = tid % kTPR;
  const int warp_in_row = t / 32, lane = tid % 32;
  const int64_t row = int64_t(blockIdx.x) * kRows + slot;
  const bool active = row < p.rows;
  float* red = reinterpret_cast<float*>(smem_base());

  float x[kVPT][kVec];
  float sum = 0.0f;
#pragma unroll
  for (int v = 0; v < kVPT; ++v) {
    const int64_t col = int64_t(v * kTPR + t) * kVec;
    if (active && col < p.cols) {
      load_vec<T>(static_cast<const T*>(p.input) + row * p.input_stride + col, x[v]);
      if (p.residual != nullptr) {
        float r[kVec];
        load_vec<T>(static_cast<const T*>(p.residual) + row * p.residual_stride + col, r);
        // the sum is rounded to the input dtype first, as input + residual in PyTorch
#pragma unroll
        for (int e = 0; e < kVec; ++e) x[v][e] = to_float(from_float<T>(x[v][e] + r[e]));
        store_vec<T>(static_cast<T*>(p.residual_out) + row * p.residual_out_stride + col, x[v]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) x[v][e] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum += x[v][e];
  }
  const float n_inv = 1.0f / float(p.cols);
  const float mean = p.rms ? 0.0f : row_sum<kW, kRows>(sum, red, slot, warp_in_row, lane) * n_inv;
  float sq = 0.0f;
#pragma unroll
  for (int v = 0; v < kVPT; ++v) {
    const int64_t col = int64_t(v * kTPR + t) * kVec;
    if (active && col < p.cols) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) sq += (x[v][e] - mean) * (x[v][e] - mean);
    }
  }
  const float var = row_sum<kW, kRows>(sq, red + kRows * kW, slot, warp_in_row, lane) * n_inv;
  const float rstd = rsqrt_approx(var + p.eps);
  if (!active) return;  // no barrier below
  if (t == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
#pragma unroll
  for (int v = 0; v < kVPT; ++v) {
    const int64_t col = int64_t(v * kTPR + t) * kVec;
    if (col >= p.cols) continue;
    float w[kVec], b[kVec], y[kVec];
    if (p.weight != nullptr) {
      load_param_vec<T>(p.weight, p.param_float32, col, w);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) w[e] = 1.0f;
    }
    if (p.bias != nullptr) {
      load_param_vec<T>(p.bias, p.param_float32, col, b);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) b[e] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) y[e] = (x[v][e] - mean) * rstd * w[e] + b[e];
    store_vec<T>(static_cast<T*>(p.out) + row * p.out_stride + col, y);
  }
}

FA_DEVICE float block_sum(float v, float* red) {  // kNormGenericThreads threads
  constexpr int kWarps = kNormGenericThreads / 32;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += red[w];
  __syncthreads();
  return s;
}

template <class T>
__global__ void __launch_bounds__(kNormGenericThreads)
    layer_norm_fwd_generic_kernel(const LnFwdArgs args) {
  const LayerNormFwdParams& p = args.p;
  const int64_t row = blockIdx.x;
  float* red = reinterpret_cast<float*>(smem_base());
  const T* in = static_cast<const T*>(p.input) + row * p.input_stride;
  const T* res = static_cast<const T*>(p.residual);
  T* res_out = static_cast<T*>(p.residual_out);
  if (res != nullptr) {
    res += row * p.residual_stride;
    res_out += row * p.residual_out_stride;
  }
  float sum = 0.0f;
  for (int64_t c = threadIdx.x; c < p.cols; c += kNormGenericThreads) {
    float x = to_float(in[c]);
    if (res != nullptr) {
      const T xs = from_float<T>(x + to_float(res[c]));
      res_out[c] = xs;  // re-read below by this same thread
      x = to_float(xs);
    }
    sum += x;
  }
  const T* xs = res != nullptr ? res_out : in;
  const float n_inv = 1.0f / float(p.cols);
  const float mean = p.rms ? 0.0f : block_sum(sum, red) * n_inv;
  float sq = 0.0f;
  for (int64_t c = threadIdx.x; c < p.cols; c += kNormGenericThreads) {
    const float d = to_float(xs[c]) - mean;
    sq += d * d;
  }
  const float rstd = rsqrt_approx(block_sum(sq, red) * n_inv + p.eps);
  if (threadIdx.x == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
  T* out = static_cast<T*>(p.out) + row * p.out_stride;
  for (int64_t c = threadIdx.x; c < p.cols; c += kNormGenericThreads) {
    const float w =
        p.weight != nullptr ? load_param(p.weight, p.param_float32, c, args.dtype) : 1.0f;
    const float b = p.bias != nullptr ? load_param(p.bias, p.param_float32, c, args.dtype) : 0.0f;
    out[c] = from_float<T>((to_float(xs[c]) - mean) * rstd * w + b);
  }
}

struct LnBwdArgs {
  LayerNormBwdParams p;
  DType dtype;
  int partial_rows;        // rows of the partial buffer (dW partials, then dB partials)
  int64_t rows_per_split;  // column kernel: rows per partial row
};

template <class T>
FA_DEVICE void unpack_vec(const uint4& u, float (&f)[vec_elems<T>()]) {
  T v[vec_elems<T>()];
  __builtin_memcpy(static_cast<void*>(v), &u, 16);
#pragma unroll
  for (int e = 0; e < vec_elems<T>(); ++e) f[e] = to_float(v[e]);
}

// grad_input for rows in a grid-stride loop; with kAccum also the per-column partial sums of
// grad_weight (dy * xhat) and grad_bias (dy), one partial row per row slot of the block. x and
// dy stay packed in registers between the two passes over the row.
template <class T, int kW, int kVPT, int kRows, bool kAccum>
__global__ void __launch_bounds__(32 * kW * kRows, 1) layer_norm_bwd_kernel(const LnBwdArgs args) {
  static_assert(kRows == 1 || kW == 1, "row slots of one block never meet at a barrier");
  constexpr int kVec = vec_elems<T>(), kTPR = 32 * kW;
  constexpr int kAcc = kAccum ? kVPT : 1;
  const LayerNormBwdParams& p = args.p;
  const int tid = int(threadIdx.x), slot = tid / kTPR, t = tid % kTPR;
  const int warp_in_row = t / 32, lane = tid % 32;
  float* red = reinterpret_cast<float*>(smem_base());
  const float n_inv = 1.0f / float(p.cols);

  float dw[kAcc][kVec], db[kAcc][kVec];
#pragma unroll
  for (int v = 0; v < kAcc; ++v) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) dw[v][e] = db[v][e] = 0.0f;
  }
  auto load_w = [&](int64_t col, float (&w)[kVec]) {
    if (p.weight != nullptr) {
      load_param_vec<T>(p.weight, p.param_float32, col, w);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) w[e] = 1.0f;
    }
  };

  // kRows > 1 only with kW == 1 (no barrier), so slots may run different row counts
  const int64_t step = int64_t(gridDim.x) * kRows;
  const int64_t first = int64_t(blockIdx.x) * kRows + slot;
  const int64_t iters = (p.rows - int64_t(blockIdx.x) * kRows + step - 1) / step;
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t row = first + it * step;
    const bool active = row < p.rows;  // uniform over the row's threads
    const float mean = active ? p.mean[row] : 0.0f;
    const float rstd = active ? p.rstd[row] : 0.0f;
    uint4 x_raw[kVPT], dy_raw[kVPT];
    float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int v = 0; v < kVPT; ++v) {
      const int64_t col = int64_t(v * kTPR + t) * kVec;
      if (active && col < p.cols) {
        x_raw[v] = load16(static_cast<const T*>(p.x) + row * p.x_stride + col);
        dy_raw[v] = load16(static_cast<const T*>(p.grad_out) + row * p.grad_out_stride + col);
        float x[kVec], dy[kVec], w[kVec];
        unpack_vec<T>(x_raw[v], x);
        unpack_vec<T>(dy_raw[v], dy);
        load_w(col, w);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float xh = (x[e] - mean) * rstd;
          const float wdy = dy[e] * w[e];
          s1 += wdy;
          s2 += wdy * xh;
          if constexpr (kAccum) {
            dw[v][e] += dy[e] * xh;
            db[v][e] += dy[e];
          }
        }
      }
    }
    const float mean_wdy =
        p.rms ? 0.0f : row_sum<kW, kRows>(s1, red, slot, warp_in_row, lane) * n_inv;
    const float mean_wdy_xhat =
        row_sum<kW, kRows>(s2, red + kRows * kW, slot, warp_in_row, lane) * n_inv;
    if (!active) continue;
#pragma unroll
    for (int v = 0; v < kVPT; ++v) {
      const int64_t col = int64_t(v * kTPR + t) * kVec;
      if (col >= p.cols) continue;
      float x[kVec], dy[kVec], w[kVec], dx[kVec];
      unpack_vec<T>(x_raw[v], x);
      unpack_vec<T>(dy_raw[v], dy);
      load_w(col, w);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float xh = (x[e] - mean) * rstd;
        dx[e] = rstd * (dy[e] * w[e] - mean_wdy - xh * mean_wdy_xhat);
      }
      if (p.grad_residual_out != nullptr) {
        float g[kVec];
        load_vec<T>(
            static_cast<const T*>(p.grad_residual_out) + row * p.grad_residual_out_stride + col, g);
#pragma unroll
        for (int e = 0; e < kVec; ++e) dx[e] += g[e];
      }
      store_vec<T>(static_cast<T*>(p.grad_input) + row * p.grad_input_stride + col, dx);
    }
  }
  if constexpr (kAccum) {
    if (p.workspace == nullptr) return;
    const int64_t prow = int64_t(blockIdx.x) * kRows + slot;
    float* pdw = p.workspace + prow * p.cols;
    float* pdb = p.workspace + (int64_t(args.partial_rows) + prow) * p.cols;
#pragma unroll
    for (int v = 0; v < kVPT; ++v) {
      const int64_t col = int64_t(v * kTPR + t) * kVec;
      if (col >= p.cols) continue;
#pragma unroll
      for (int e = 0; e < kVec; e += 4) {
        store16(pdw + col + e, uint4{float_bits(dw[v][e]), float_bits(dw[v][e + 1]),
                                     float_bits(dw[v][e + 2]), float_bits(dw[v][e + 3])});
        store16(pdb + col + e, uint4{float_bits(db[v][e]), float_bits(db[v][e + 1]),
                                     float_bits(db[v][e + 2]), float_bits(db[v][e + 3])});
      }
    }
  }
}

// grad_input for rows that are not 16-byte aligned or too long for the vector configs.
template <class T>
__global__ void __launch_bounds__(kNormGenericThreads)
    layer_norm_bwd_generic_kernel(const LnBwdArgs args) {
  const LayerNormBwdParams& p = args.p;
  float* red = reinterpret_cast<float*>(smem_base());
  const float n_inv = 1.0f / float(p.cols);
  const int64_t row = blockIdx.x;
  const float mean = p.mean[row], rstd = p.rstd[row];
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  const T* dy = static_cast<const T*>(p.grad_out) + row * p.grad_out_stride;
  float s1 = 0.0f, s2 = 0.0f;
  for (int64_t c = threadIdx.x; c < p.cols; c += kNormGenericThreads) {
    const float w =
        p.weight != nullptr ? load_param(p.weight, p.param_float32, c, args.dtype) : 1.0f;
    const float xh = (to_float(x[c]) - mean) * rstd;
    const float wdy = to_float(dy[c]) * w;
    s1 += wdy;
    s2 += wdy * xh;
  }
  const float mean_wdy = p.rms ? 0.0f : block_sum(s1, red) * n_inv;
  const float mean_wdy_xhat = block_sum(s2, red) * n_inv;
  T* dx = static_cast<T*>(p.grad_input) + row * p.grad_input_stride;
  const T* g = static_cast<const T*>(p.grad_residual_out);
  for (int64_t c = threadIdx.x; c < p.cols; c += kNormGenericThreads) {
    const float w =
        p.weight != nullptr ? load_param(p.weight, p.param_float32, c, args.dtype) : 1.0f;
    const float xh = (to_float(x[c]) - mean) * rstd;
    float v = rstd * (to_float(dy[c]) * w - mean_wdy - xh * mean_wdy_xhat);
    if (g != nullptr) v += to_float(g[row * p.grad_residual_out_stride + c]);
    dx[c] = from_float<T>(v);
  }
}

// Partial grad_weight / grad_bias of the rows of chunk blockIdx.y: a thread per column.
template <class T>
__global__ void __launch_bounds__(256) layer_norm_param_grad_partial_kernel(const LnBwdArgs args) {
  const LayerNormBwdParams& p = args.p;
  const int64_t c = int64_t(blockIdx.x) * 256 + threadIdx.x;
  if (c >= p.cols) return;
  const int64_t r0 = int64_t(blockIdx.y) * args.rows_per_split;
  const int64_t r1 = r0 + args.rows_per_split < p.rows ? r0 + args.rows_per_split : p.rows;
  float aw = 0.0f, ab = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const float d = to_float(static_cast<const T*>(p.grad_out)[r * p.grad_out_stride + c]);
    const float xh =
        (to_float(static_cast<const T*>(p.x)[r * p.x_stride + c]) - p.mean[r]) * p.rstd[r];
    aw += d * xh;
    ab += d;
  }
  p.workspace[int64_t(blockIdx.y) * p.cols + c] = aw;
  p.workspace[(int64_t(args.partial_rows) + blockIdx.y) * p.cols + c] = ab;
}

// grad_weight[c] = sum_r partial[r][c] in order r = 0, 1, ...; same for grad_bias.
template <class P>
__global__ void __launch_bounds__(256) layer_norm_param_grad_kernel(const LnBwdArgs args) {
  const LayerNormBwdParams& p = args.p;
  const int64_t c = int64_t(blockIdx.x) * 256 + threadIdx.x;
  if (c >= p.cols) return;
  float sw = 0.0f, sb = 0.0f;
  for (int r = 0; r < args.partial_rows; ++r) {
    sw += p.workspace[int64_t(r) * p.cols + c];
    sb += p.workspace[(int64_t(args.partial_rows) + r) * p.cols + c];
  }
  if (p.grad_weight != nullptr) static_cast<P*>(p.grad_weight)[c] = from_float<P>(sw);
  if (p.grad_bias != nullptr) static_cast<P*>(p.grad_bias)[c] = from_float<P>(sb);
}

// The config a row of `cols` elements takes, or -1 for the generic kernel.
inline int fwd_config(const LayerNormFwdParams& p, int es) {
  const int idx = norm_config_index(p.cols, es);
  const bool vec = p.cols % (16 / es) == 0 && vec_ok(p.input, es, p.input_stride) &&
                   vec_ok(p.out, es, p.out_stride) &&
                   (p.residual == nullptr || (vec_ok(p.residual, es, p.residual_stride) &&
                                              vec_ok(p.residual_out, es, p.residual_out_stride))) &&
                   (p.weight == nullptr || aligned16(p.weight)) &&
                   (p.bias == nullptr || aligned16(p.bias));
  return vec ? idx : -1;
}

inline int bwd_config(const LayerNormBwdParams& p, int es) {
  const int idx = norm_config_index(p.cols, es);
  const bool vec = p.cols % (16 / es) == 0 && vec_ok(p.x, es, p.x_stride) &&
                   vec_ok(p.grad_out, es, p.grad_out_stride) &&
                   vec_ok(p.grad_input, es, p.grad_input_stride) &&
                   (p.grad_residual_out == nullptr ||
                    vec_ok(p.grad_residual_out, es, p.grad_residual_out_stride)) &&
                   (p.weight == nullptr || aligned16(p.weight));
  return vec ? idx : -1;
}

struct BwdPlan {
  int config;  // vector config, -1 for the generic kernel
  bool fused;  // the grad_input kernel also sums grad_weight / grad_bias
  int blocks;  // grid of the grad_input kernel
  int partial_rows;
  int64_t rows_per_split;  // column kernel (not fused)
};

inline BwdPlan bwd_plan(const LayerNormBwdParams& p, int es) {
  BwdPlan plan{};
  plan.config = bwd_config(p, es);
  plan.fused = plan.config >= 0 && plan.config <= kNormBwdFusedMaxConfig;
  if (plan.fused) {
    const int rpb = kNormConfigs[plan.config].rows_per_block;
    plan.blocks = norm_bwd_blocks(p.rows, rpb, p.num_sms);
    plan.partial_rows = plan.blocks * rpb;
  } else {
    const int64_t want = 4 * int64_t(p.num_sms > 0 ? p.num_sms : 1);
    plan.blocks = plan.config >= 0 ? int(p.rows < want ? p.rows : want) : int(p.rows);
    plan.partial_rows = norm_param_grad_splits(p.rows, p.cols, p.num_sms);
    plan.rows_per_split = (p.rows + plan.partial_rows - 1) / plan.partial_rows;
  }
  return plan;
}

template <class T, int kCfg>
cudaError_t launch_fwd_config(const LnFwdArgs& a, cudaStream_t stream) {
  constexpr NormConfig c = kNormConfigs[kCfg];
  auto kernel = layer_norm_fwd_kernel<T, c.warps_per_row, c.vecs_per_thread, c.rows_per_block>;
  const size_t smem = size_t(2 * c.rows_per_block * c.warps_per_row) * sizeof(float);
  FA_LAUNCH(kernel, dim3(ceil_div(a.p.rows, c.rows_per_block)),
            dim3(32 * c.warps_per_row * c.rows_per_block), smem, stream, a);
  return launch_status();
}

template <class T, int kCfg>
cudaError_t launch_bwd_config(const LnBwdArgs& a, int blocks, cudaStream_t stream) {
  constexpr NormConfig c = kNormConfigs[kCfg];
  auto kernel = layer_norm_bwd_kernel<T, c.warps_per_row, c.vecs_per_thread, c.rows_per_block,
                                      (kCfg <= kNormBwdFusedMaxConfig)>;
  const size_t smem = size_t(2 * c.rows_per_block * c.warps_per_row) * sizeof(float);
  FA_LAUNCH(kernel, dim3(unsigned(blocks)), dim3(32 * c.warps_per_row * c.rows_per_block), smem,
            stream, a);
  return launch_status();
}

template <class T>
cudaError_t launch_fwd(const LnFwdArgs& a, int cfg, cudaStream_t stream) {
  switch (cfg) {
    case 0:
      return launch_fwd_config<T, 0>(a, stream);
    case 1:
      return launch_fwd_config<T, 1>(a, stream);
    case 2:
      return launch_fwd_config<T, 2>(a, stream);
    case 3:
      return launch_fwd_config<T, 3>(a, stream);
    case 4:
      return launch_fwd_config<T, 4>(a, stream);
    case 5:
      return launch_fwd_config<T, 5>(a, stream);
    default:
      break;
  }
  auto kernel = layer_norm_fwd_generic_kernel<T>;
  FA_LAUNCH(kernel, dim3(unsigned(a.p.rows)), dim3(kNormGenericThreads),
            (kNormGenericThreads / 32) * sizeof(float), stream, a);
  return launch_status();
}

template <class T>
cudaError_t launch_bwd(const LnBwdArgs& a, const BwdPlan& plan, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (plan.blocks > 0) {
    switch (plan.config) {
      case 0:
        err = launch_bwd_config<T, 0>(a, plan.blocks, stream);
        break;
      case 1:
        err = launch_bwd_config<T, 1>(a, plan.blocks, stream);
        break;
      case 2:
        err = launch_bwd_config<T, 2>(a, plan.blocks, stream);
        break;
      case 3:
        err = launch_bwd_config<T, 3>(a, plan.blocks, stream);
        break;
      case 4:
        err = launch_bwd_config<T, 4>(a, plan.blocks, stream);
        break;
      case 5:
        err = launch_bwd_config<T, 5>(a, plan.blocks, stream);
        break;
      default: {
        auto kernel = layer_norm_bwd_generic_kernel<T>;
        FA_LAUNCH(kernel, dim3(unsigned(plan.blocks)), dim3(kNormGenericThreads),
                  (kNormGenericThreads / 32) * sizeof(float), stream, a);
        err = launch_status();
      }
    }
  }
  if (err != cudaSuccess || a.p.workspace == nullptr) return err;
  const unsigned grid = ceil_div(a.p.cols, 256);
  if (!plan.fused) {
    auto partial = layer_norm_param_grad_partial_kernel<T>;
    FA_LAUNCH(partial, dim3(grid, unsigned(plan.partial_rows)), dim3(256), 0, stream, a);
    if ((err = launch_status()) != cudaSuccess) return err;
  }
  if (a.p.param_float32) {
    auto kernel = layer_norm_param_grad_kernel<float>;
    FA_LAUNCH(kernel, dim3(grid), dim3(256), 0, stream, a);
  } else {
    auto kernel = layer_norm_param_grad_kernel<T>;
    FA_LAUNCH(kernel, dim3(grid), dim3(256), 0, stream, a);
  }
  return launch_status();
}

}  // namespace detail

cudaError_t layer_norm_fwd(const LayerNormFwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows <= 0) return cudaSuccess;
  if (p.cols <= 0 || p.rows > 2147483647LL ||
      (p.residual != nullptr && p.residual_out == nullptr)) {
    return cudaErrorInvalidValue;
  }
  detail::LnFwdArgs a{p, dtype};
  const int cfg = detail::fwd_config(p, dtype_bytes(dtype));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return detail::launch_fwd<T>(a, cfg, stream);
  });
}

int64_t layer_norm_bwd_workspace(const LayerNormBwdParams& p, DType dtype) {
  if (p.grad_weight == nullptr && p.grad_bias == nullptr) return 0;
  return 2 * int64_t(detail::bwd_plan(p, dtype_bytes(dtype)).partial_rows) * p.cols;
}

cudaError_t layer_norm_bwd(const LayerNormBwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.cols <= 0) return cudaSuccess;
  if (p.rows < 0 ||
      (p.workspace == nullptr && (p.grad_weight != nullptr || p.grad_bias != nullptr))) {
    return cudaErrorInvalidValue;
  }
  const detail::BwdPlan plan = detail::bwd_plan(p, dtype_bytes(dtype));
  detail::LnBwdArgs a{p, dtype, plan.partial_rows, plan.rows_per_split};
  if (p.grad_weight == nullptr && p.grad_bias == nullptr) a.p.workspace = nullptr;
  if (p.rows == 0 && a.p.workspace == nullptr) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return detail::launch_bwd<T>(a, plan, stream);
  });
}

}  // namespace fastattn::cuda
