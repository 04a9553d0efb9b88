// Decoding attention against a KV cache (flash-decoding):
//  1. append k_new/v_new at cache_seqlens (lengths clamped on the device, no host sync), through
//     the block table when the cache is paged;
//  2. split the keys of each sequence into num_splits ranges; a block serves up to 16 query rows
//     of one kv head (the GQA group times the new tokens, so K/V are read once per group) and
//     streams 32-key chunks through a 2-stage cp.async pipeline; a key per lane for Q K^T, the
//     probabilities broadcast by shuffles for P V; online softmax in base 2;
//  3. combine the per-split (out, lse) pairs (skipped when there is one split).
// A paged cache costs one block-table read per 16-byte chunk copied: its rows are gathered one
// by one, so a 32-key chunk may straddle blocks of any size (and start anywhere: at a left pad
// or a window's first key).
#include "attention_common.cuh"

namespace fastattn::cuda {
namespace detail {

struct KvArgs {
  KvcacheParams p;
  float scale_log2;
  int row_groups;  // ceil(G * Lq / rows)
  bool vec_k, vec_v;
};

FA_DEVICE int cache_len(const KvcacheParams& p, int b) {
  int n = p.seqlens[b];
  return n < 0 ? 0 : (n > p.capacity ? p.capacity : n);
}

// Element offset of token t (< capacity) of batch b in a cache whose batch (paged: block) and
// token strides are stride_b / stride_s; a block-table entry outside the pool is clamped into it.
FA_DEVICE int64_t cache_row(const KvcacheParams& p, int b, int t, int64_t stride_b,
                            int64_t stride_s) {
  if (p.block_table == nullptr) return b * stride_b + int64_t(t) * stride_s;
  int blk = p.block_table[b * p.bt_stride_b + t / p.block_size];
  blk = blk < 0 ? 0 : (blk >= p.num_blocks ? p.num_blocks - 1 : blk);
  return blk * stride_b + int64_t(t % p.block_size) * stride_s;
}

// the rotary position of token i of batch b: its position in its own sequence (the left padding
// does not count), clamped into the table
FA_DEVICE int64_t rotary_pos(const KvcacheParams& p, int b, int i) {
  const int64_t pos = int64_t(p.seqlens[b]) - (p.leftpad != nullptr ? p.leftpad[b] : 0) + i;
  return pos < 0 ? 0 : (pos >= p.max_pos ? p.max_pos - 1 : pos);
}

template <class T>
FA_DEVICE float rotary_table(const void* t, bool f32, int64_t idx) {
  return f32 ? static_cast<const float*>(t)[idx] : to_float(static_cast<const T*>(t)[idx]);
}

// element e of the row x (unit stride) rotated at position pos, in float32: dims
// e < 2 * rotary_half pair with e ^ 1 (interleaved, GPT-J) or e +- rotary_half (GPT-NeoX); for
// a pair (x1, x2) and its table column j: (x1 c - x2 s, x2 c + x1 s). Other dims pass through.
template <class T>
FA_DEVICE float rotary_elem(const KvcacheParams& p, const T* x, int e, int64_t pos) {
  const float xe = to_float(x[e]);
  if (e >= 2 * p.rotary_half) return xe;
  int j, partner;
  float sign;
  if (p.rotary_interleaved) {
    j = e >> 1;
    partner = e ^ 1;
    sign = (e & 1) ? 1.0f : -1.0f;
  } else {
    const bool first = e < p.rotary_half;
    j = first ? e : e - p.rotary_half;
    partner = first ? e + p.rotary_half : e - p.rotary_half;
    sign = first ? -1.0f : 1.0f;
  }
  const float c =
      rotary_table<T>(p.rotary_cos, p.rotary_f32, pos * p.cos_stride_p + j * p.cos_stride_j);
  const float s =
      rotary_table<T>(p.rotary_sin, p.rotary_f32, pos * p.sin_stride_p + j * p.sin_stride_j);
  return xe * c + sign * to_float(x[partner]) * s;
}

template <class T>
__global__ void __launch_bounds__(128) kvcache_append_kernel(const KvcacheParams p) {
  const int i = int(blockIdx.x), hk = int(blockIdx.y), b = int(blockIdx.z);
  const int pos = cache_len(p, b) + i;
  if (pos >= p.capacity) return;  // past the capacity: dropped (the caller validated on CPU)
  const T* kn = static_cast<const T*>(p.k_new) + b * p.kn_stride_b + hk * p.kn_stride_h +
                int64_t(i) * p.kn_stride_l;
  const T* vn = static_cast<const T*>(p.v_new) + b * p.vn_stride_b + hk * p.vn_stride_h +
                int64_t(i) * p.vn_stride_l;
  T* kc = static_cast<T*>(p.k_cache) + hk * p.kc_stride_h +
          cache_row(p, b, pos, p.kc_stride_b, p.kc_stride_s);
  T* vc = static_cast<T*>(p.v_cache) + hk * p.vc_stride_h +
          cache_row(p, b, pos, p.vc_stride_b, p.vc_stride_s);
  if (p.rotary_cos != nullptr) {
    const int64_t rp = rotary_pos(p, b, i);
    for (int e = int(threadIdx.x); e < p.head_dim; e += int(blockDim.x)) {
      kc[e] = from_float<T>(rotary_elem(p, kn, e, rp));
      vc[e] = vn[e];
    }
    return;
  }
  for (int e = int(threadIdx.x); e < p.head_dim; e += int(blockDim.x)) {
    kc[e] = kn[e];
    vc[e] = vn[e];
  }
}

template <class T, int kHeadDim>
__global__ void __launch_bounds__(32 * kvcache_tile().n_warps)
    kvcache_split_kernel(const KvArgs args) {
  constexpr KvcacheTile kTile = kvcache_tile();
  constexpr int kThreads = 32 * kTile.n_warps, kRows = kTile.rows, kChunk = kTile.chunk;
  constexpr int kRowsPerWarp = kRows / kTile.n_warps, kCols = kHeadDim / 32;
  constexpr int kPitch = smem_pitch(kHeadDim, int(sizeof(T)));
  constexpr int kVec = 16 / int(sizeof(T));
  static_assert(kChunk == 32 && kTile.stages == 2, "a key per lane, double buffer");
  const KvcacheParams& p = args.p;
  const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int split = int(blockIdx.x);
  const int hk = int(blockIdx.y) / args.row_groups, group = int(blockIdx.y) % args.row_groups;
  const int b = int(blockIdx.z);
  const int gqa = p.heads / p.kv_heads;
  const int rows_total = gqa * p.len_q;
  const int row0 = group * kRows;

  const int total = min_i(cache_len(p, b) + (p.k_new != nullptr ? p.len_new : 0), p.capacity);
  // query i sits at position total - Lq + i and sees keys [pos - wl, pos + wr] (-1: unbounded;
  // causal: wr = 0). The sides are clamped to 2^31, past any cache, so that the int64 sums
  // below cannot overflow whatever the caller's window.
  const int64_t pos0 = int64_t(total) - p.len_q;
  const int64_t kFar = int64_t(1) << 31;
  const int64_t wl = p.window_left < 0 ? -1 : min_i64(p.window_left, kFar);
  const int64_t wr = p.causal ? 0 : (p.window_right < 0 ? -1 : min_i64(p.window_right, kFar));
  // keys any row of this block may see: [first_any, last_any)
  int64_t first_any = wl < 0 ? 0 : pos0 - wl;
  int64_t last_any = wr < 0 ? total : pos0 + p.len_q + wr;
  if (p.leftpad != nullptr) first_any = max_i64(first_any, p.leftpad[b]);
  const int64_t s0_64 = max_i64(int64_t(split) * p.split_len, first_any);
  const int64_t s1_64 = min_i64(min_i64(int64_t(split) * p.split_len + p.split_len, total),
                                last_any);
  const int s1 = int(max_i64(s1_64, 0));
  // keys before the first real token of a left-padded sequence or the window are not seen:
  // this split starts there at the earliest
  const int s0 = int(min_i64(s0_64, s1));

  float* sQ = reinterpret_cast<float*>(smem_base());
  T* sKV = reinterpret_cast<T*>(sQ + kRows * kHeadDim);  // [stage][K|V][kChunk][kPitch]
  auto sK = [&](int stage) { return sKV + (stage * 2) * kChunk * kPitch; };
  auto sV = [&](int stage) { return sKV + (stage * 2 + 1) * kChunk * kPitch; };

  // q rows of this block: row R -> head hk * gqa + R / Lq, query R % Lq; scaled to base 2;
  // rotated first (rounded to T, as the other backends) with the rotary embedding
  const bool rotary = p.rotary_cos != nullptr && p.k_new != nullptr;
  const int q_rot_shift = p.len_new - p.len_q;  // q token i is at total - Lq + i
  for (int c = tid; c < kRows * kHeadDim; c += kThreads) {
    const int r = c / kHeadDim, col = c % kHeadDim, R = row0 + r;
    float x = 0.0f;
    if (R < rows_total && col < p.head_dim) {
      const int h = hk * gqa + R / p.len_q, i = R % p.len_q;
      const T* qrow = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h +
                      int64_t(i) * p.q_stride_l;
      x = rotary ? to_float(from_float<T>(
                       rotary_elem(p, qrow, col, rotary_pos(p, b, i + q_rot_shift))))
                 : to_float(qrow[col]);
      x *= args.scale_log2;
    }
    sQ[r * kHeadDim + col] = x;
  }

  const T* kc = static_cast<const T*>(p.k_cache) + hk * p.kc_stride_h;
  const T* vc = static_cast<const T*>(p.v_cache) + hk * p.vc_stride_h;
  auto load_chunk = [&](int n0, int stage) {
    const int keys = min_i(kChunk, s1 - n0);
    if (p.block_table == nullptr) {
      load_tile_async<kChunk, kHeadDim, kPitch, kThreads>(
          sK(stage), kc + b * p.kc_stride_b + int64_t(n0) * p.kc_stride_s, p.kc_stride_s, keys,
          p.head_dim, args.vec_k, tid);
      load_tile_async<kChunk, kHeadDim, kPitch, kThreads>(
          sV(stage), vc + b * p.vc_stride_b + int64_t(n0) * p.vc_stride_s, p.vc_stride_s, keys,
          p.head_dim, args.vec_v, tid);
    } else {
      load_rows_async<kChunk, kHeadDim, kPitch, kThreads>(
          sK(stage),
          [&](int r) { return kc + cache_row(p, b, n0 + r, p.kc_stride_b, p.kc_stride_s); }, keys,
          p.head_dim, args.vec_k, tid);
      load_rows_async<kChunk, kHeadDim, kPitch, kThreads>(
          sV(stage),
          [&](int r) { return vc + cache_row(p, b, n0 + r, p.vc_stride_b, p.vc_stride_s); }, keys,
          p.head_dim, args.vec_v, tid);
    }
  };

  // per row: keys [first, limit) are visible (and those of [s0, s1))
  int first[kRowsPerWarp], limit[kRowsPerWarp];
  float acc[kRowsPerWarp][kCols], row_max[kRowsPerWarp], row_sum[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int R = row0 + warp + kTile.n_warps * r;
    const int64_t pos = pos0 + R % p.len_q;
    const int64_t lo = wl < 0 ? 0 : pos - wl;
    const int64_t hi = wr < 0 ? total : pos + wr + 1;
    first[r] = int(min_i64(max_i64(lo, 0), total));
    limit[r] = R < rows_total ? int(min_i64(max_i64(hi, 0), total)) : 0;
    row_max[r] = kNegInf;
    row_sum[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = 0.0f;
  }

  const int n_chunks = (s1 - s0 + kChunk - 1) / kChunk;
  if (n_chunks > 0) load_chunk(s0, 0);
  cp_async_commit();
  for (int ci = 0; ci < n_chunks; ++ci) {
    const int n0 = s0 + ci * kChunk, stage = ci & 1;
    if (ci + 1 < n_chunks) load_chunk(n0 + kChunk, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // chunk ci landed for every thread (and sQ is written)
    const T* k_s = sK(stage);
    const T* v_s = sV(stage);
    const int key = n0 + lane;
    // s[r] = q_r . k_key, reading k_key in 16-byte vectors
    float s[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = 0.0f;
#pragma unroll 1
    for (int d = 0; d < kHeadDim; d += kVec) {
      const uint4 raw = load16(k_s + lane * kPitch + d);
      T kv[kVec];
      __builtin_memcpy(static_cast<void*>(kv), &raw, 16);
      float kf[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) kf[e] = to_float(kv[e]);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const float* qr = sQ + (warp + kTile.n_warps * r) * kHeadDim + d;
#pragma unroll
        for (int e = 0; e < kVec; ++e) s[r] += qr[e] * kf[e];
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      if (row0 + warp + kTile.n_warps * r >= rows_total) continue;  // warp-uniform
      const float sr = key >= first[r] && key < limit[r] && key < s1 ? s[r] : kNegInf;
      const float pr = online_softmax_chunk(sr, row_max[r], row_sum[r], acc[r]);
      for (int j = 0; j < kChunk; ++j) {
        const float pj = __shfl_sync(0xffffffffu, pr, j);
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[r][c] += pj * to_float(v_s[j * kPitch + lane + 32 * c]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int R = row0 + warp + kTile.n_warps * r;
    if (R >= rows_total) continue;
    const int h = hk * gqa + R / p.len_q, i = R % p.len_q;
    const float l = row_sum[r];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + b * p.out_stride_b + h * p.out_stride_h +
               int64_t(i) * p.out_stride_l;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int col = lane + 32 * c;
        if (col < p.head_dim) out[col] = from_float<T>(acc[r][c] * inv);
      }
      if (p.lse != nullptr && lane == 0) {
        p.lse[b * p.lse_stride_b + h * p.lse_stride_h + i] =
            l > 0.0f ? row_max[r] * kLn2 + log_f(l) : kNegInf;
      }
    } else {
      const int64_t row_id = ((int64_t(split) * p.batch + b) * p.heads + h) * p.len_q + i;
      float* po = p.partial_out + row_id * p.head_dim;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int col = lane + 32 * c;
        if (col < p.head_dim) po[col] = acc[r][c] * inv;
      }
      if (lane == 0) p.partial_lse[row_id] = l > 0.0f ? row_max[r] * kLn2 + log_f(l) : kNegInf;
    }
  }
}

// out = sum_s exp(lse_s - lse) * out_s with lse = log sum_s exp(lse_s); a warp per row.
template <class T>
__global__ void __launch_bounds__(128) kvcache_combine_kernel(const KvcacheParams p) {
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int64_t rows = int64_t(p.batch) * p.heads * p.len_q;
  const int64_t row = int64_t(blockIdx.x) * 4 + warp;
  if (row >= rows) return;  // whole warps exit together
  float m = kNegInf;
  for (int s = lane; s < p.num_splits; s += 32) m = max_f(m, p.partial_lse[s * rows + row]);
  m = warp_max(m);
  const int i = int(row % p.len_q);
  const int h = int((row / p.len_q) % p.heads);
  const int b = int(row / (int64_t(p.len_q) * p.heads));
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + h * p.out_stride_h +
           int64_t(i) * p.out_stride_l;
  if (p.lse != nullptr) {
    float den = 0.0f;
    if (m != kNegInf) {
      for (int s = lane; s < p.num_splits; s += 32) {
        const float lse = p.partial_lse[s * rows + row];
        den += lse == kNegInf ? 0.0f : exp2_approx((lse - m) * kLog2e);
      }
    }
    den = warp_sum(den);
    if (lane == 0) {
      p.lse[b * p.lse_stride_b + h * p.lse_stride_h + i] = den > 0.0f ? m + log_f(den) : kNegInf;
    }
  }
  for (int col = lane; col < p.head_dim; col += 32) {
    float num = 0.0f, den = 0.0f;
    if (m != kNegInf) {
      for (int s = 0; s < p.num_splits; ++s) {
        const float lse = p.partial_lse[s * rows + row];
        const float w = lse == kNegInf ? 0.0f : exp2_approx((lse - m) * kLog2e);
        num += w * p.partial_out[(s * rows + row) * p.head_dim + col];
        den += w;
      }
    }
    out[col] = from_float<T>(den > 0.0f ? num / den : 0.0f);
  }
}

template <class T, int kHeadDim>
cudaError_t launch_kvcache(const KvArgs& args, cudaStream_t stream) {
  const KvcacheParams& p = args.p;
  if (p.k_new != nullptr && p.len_new > 0) {
    auto append = kvcache_append_kernel<T>;
    FA_LAUNCH(append, dim3(unsigned(p.len_new), unsigned(p.kv_heads), unsigned(p.batch)),
              dim3(128), 0, stream, p);
    cudaError_t err = launch_status();
    if (err != cudaSuccess) return err;
  }
  const size_t smem = kvcache_smem_bytes<T>(kHeadDim);
  auto kernel = kvcache_split_kernel<T, kHeadDim>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(p.num_splits), unsigned(p.kv_heads * args.row_groups),
                  unsigned(p.batch));
  FA_LAUNCH(kernel, grid, dim3(32 * kvcache_tile().n_warps), smem, stream, args);
  err = launch_status();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t rows = int64_t(p.batch) * p.heads * p.len_q;
  auto combine = kvcache_combine_kernel<T>;
  FA_LAUNCH(combine, dim3(ceil_div(rows, 4)), dim3(128), 0, stream, p);
  return launch_status();
}

}  // namespace detail

KvcacheWorkspace kvcache_plan(KvcacheParams& p, int num_sms) {
  const int64_t blocks =
      int64_t(p.batch) * p.kv_heads * kvcache_row_groups(p.heads, p.kv_heads, p.len_q);
  // the cache length is only known on the device: plan for a full cache
  const KvcacheSplit s = kvcache_split(blocks, p.capacity, num_sms);
  p.num_splits = s.num_splits;
  p.split_len = s.split_len;
  const int64_t rows = int64_t(p.batch) * p.heads * p.len_q;
  if (p.num_splits == 1) return {0, 0};
  return {int64_t(p.num_splits) * rows * p.head_dim, int64_t(p.num_splits) * rows};
}

cudaError_t attention_kvcache(const KvcacheParams& p, DType dtype, cudaStream_t stream) {
  if (p.batch <= 0 || p.heads <= 0 || p.len_q <= 0) return cudaSuccess;
  if (p.kv_heads <= 0 || p.heads % p.kv_heads != 0 || p.batch > 65535 || p.len_q > 65535 ||
      (p.k_new != nullptr && (p.len_new < 0 || p.len_new > 65535)) ||
      (p.block_table != nullptr && (p.block_size <= 0 || p.num_blocks <= 0)) ||
      p.capacity < 0 || p.capacity >= (1 << 30) || p.num_splits < 1 || p.split_len <= 0 ||
      (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)) ||
      (p.rotary_cos != nullptr &&
       (p.rotary_sin == nullptr || p.max_pos < 1 || p.rotary_half < 1 ||
        2 * p.rotary_half > p.head_dim))) {
    return cudaErrorInvalidValue;
  }
  detail::KvArgs args;
  args.p = p;
  args.scale_log2 = p.scale * kLog2e;
  args.row_groups = int(kvcache_row_groups(p.heads, p.kv_heads, p.len_q));
  if (int64_t(p.kv_heads) * args.row_groups > 65535) return cudaErrorInvalidValue;
  const int es = dtype_bytes(dtype);
  args.vec_k = vec_ok(p.k_cache, es, p.kc_stride_b, p.kc_stride_h, p.kc_stride_s);
  args.vec_v = vec_ok(p.v_cache, es, p.vc_stride_b, p.vc_stride_h, p.vc_stride_s);
  return dispatch_dtype_head_dim(dtype, p.head_dim, [&](auto tag, auto hd) {
    return detail::launch_kvcache<typename decltype(tag)::type, decltype(hd)::value>(args, stream);
  });
}

}  // namespace fastattn::cuda
