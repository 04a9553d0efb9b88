// Attention backward from the saved lse (P is recomputed, never stored).
//  1. row statistics: delta_i = sum_d dO_id O_id - grad_lse_i, lse in base 2 (+inf on rows
//     that see no key, so their P is 0);
//  2. dK, dV: a block per (key block, kv head); it loops over the query heads of its GQA group
//     and the query blocks that can see its keys, so the group sum happens in registers;
//  3. dQ (and dmask): a block per (query block, head), looping over the visible key blocks.
// Splitting dK/dV from dQ recomputes Q K^T and dO V^T once more but needs no atomics: the result
// is bitwise repeatable, which is what `deterministic` asks for.
// bf16/fp16 with head dims <= 128 use mma.sync.m16n8k16 (fp32 accumulation); float32 and larger
// head dims use SIMT kernels with the same structure.
// Packed variable-length sequences (kVarlen) run the same kernels: blockIdx.z is the sequence,
// whose row offsets, lengths and visibility come from cu_seqlens (seq_span); blocks past its
// length exit at once. Their row statistics are indexed (head, packed row).
#include "attention_common.cuh"

namespace fastattn::cuda {
namespace detail {

struct BwdArgs : AttnArgs {
  AttnBwdParams p;
  bool vec_do;                  // 16-byte loads
  bool vec_dq, vec_dk, vec_dv;  // 16-byte stores
  float* delta;                      // (B, H, L); varlen: (H, total_q)
  float* lse2;                       // the same, base-2 lse, +inf on empty rows
};

// Query rows of a sequence that may see some key of [k_first, k_last]: [k_first - hi,
// k_last - lo].
FA_DEVICE void query_range(const SeqSpan& sq, int k_first, int k_last, int* lo, int* hi) {
  *lo = max_i(0, k_first - sq.hi_rel);
  *hi = min_i(sq.len_q, k_last - sq.lo_rel + 1);
}

// Index of row i of sequence b (span sq), head h, in delta / lse2.
template <bool kVarlen>
FA_DEVICE int64_t stat_row(const BwdArgs& a, int b, int h, const SeqSpan& sq, int i) {
  if constexpr (kVarlen) return int64_t(h) * a.p.total_q + sq.q0 + i;
  return (int64_t(b) * a.p.heads + h) * a.p.len_q + i;
}

template <int kTiles>
FA_DEVICE void zero_tiles(float (&acc)[kTiles][4]) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.0f;
  }
}

// ---- 1. row statistics -------------------------------------------------------------------------
template <class T>
__global__ void __launch_bounds__(128) attention_bwd_rowstats_kernel(const BwdArgs args) {
  const AttnBwdParams& p = args.p;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  // varlen: one batch of total_q packed rows (the b strides are 0), as stat_row indexes them
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t len = varlen ? p.total_q : p.len_q;
  const int64_t rows = (varlen ? 1 : int64_t(p.batch)) * p.heads * len;
  const int64_t row = int64_t(blockIdx.x) * 4 + warp;
  if (row >= rows) return;  // whole warps
  const int64_t i = row % len;
  const int h = int((row / len) % p.heads);
  const int b = int(row / (len * p.heads));
  const T* dout = static_cast<const T*>(p.grad_out) + b * p.do_stride_b + h * p.do_stride_h +
                  i * p.do_stride_l;
  const T* out =
      static_cast<const T*>(p.out) + b * p.o_stride_b + h * p.o_stride_h + i * p.o_stride_l;
  float acc = 0.0f;
  for (int d = lane; d < p.head_dim_v; d += 32) acc += to_float(dout[d]) * to_float(out[d]);
  acc = warp_sum(acc);
  if (lane == 0) {
    if (p.grad_lse != nullptr) acc -= p.grad_lse[b * p.glse_stride_b + h * p.glse_stride_h + i];
    const float lse = p.lse[b * p.lse_stride_b + h * p.lse_stride_h + i];
    args.delta[row] = acc;
    args.lse2[row] = lse == kNegInf ? kInf : lse * kLog2e;
  }
}

// ---- 2./3. tensor-core kernels ---------------------------------------------------------------
template <int kHeadDim>
struct BwdTraits {
  static constexpr int kPitch = smem_pitch(kHeadDim, 2);
  static constexpr int kKSteps = kHeadDim / 16;
  static constexpr int kDTiles = kHeadDim / 8;
  static_assert(kHeadDim <= kAttnBwdMmaMaxHeadDim, "register budget of the mma backward");
};

// ldmatrix lane offsets, as in the forward kernel
struct Lanes {
  int a_row, a_col;    // A operand, 16x16 from a row-major tile
  int bk_row, bk_col;  // B operand from an [n][k] tile
  int bv_row, bv_col;  // B operand from a [k][n] tile (transposed load)
  FA_DEVICE explicit Lanes(int lane)
      : a_row(lane % 16),
        a_col((lane / 16) * 8),
        bk_row((lane / 16) * 8 + lane % 8),
        bk_col(((lane / 8) % 2) * 8),
        bv_row(((lane / 8) % 2) * 8 + lane % 8),
        bv_col((lane / 16) * 8) {}
};

// acc[kNT][4] += A(16 x kK*16, rows a_base) * B^T with B an [n][k] tile of kNT*8 rows.
template <class T, int kNT, int kSteps, int kPitch>
FA_DEVICE void mma_rows_x_rows(float (&acc)[kNT][4], const T* a_base, const T* b_base,
                               const Lanes& ln) {
  // unrolled by 2 only: fully unrolled, ptxas hoists every ldmatrix of the loop and the dK/dV
  // kernel at d = 128 spills on sm_80 (255 registers); by 2 it needs 234 and no spill
#pragma unroll 2
  for (int ks = 0; ks < kSteps; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, a_base + ln.a_row * kPitch + ks * 16 + ln.a_col);
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t bb[4];
      ldmatrix_x4(bb, b_base + (np * 16 + ln.bk_row) * kPitch + ks * 16 + ln.bk_col);
      const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
      mma_16816<T>(acc[2 * np], a, b0);
      mma_16816<T>(acc[2 * np + 1], a, b1);
    }
  }
}

// acc[kDT][4] += P(16 x kK, accumulator layout, kK/8 n-tiles) * B with B a [k][n] tile.
template <class T, int kK, int kDT, int kPitch>
FA_DEVICE void mma_acc_x_tile(float (&acc)[kDT][4], const float (&pm)[kK / 8][4], const T* b_base,
                              const Lanes& ln) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    a[0] = pack2<T>(pm[2 * kk][0], pm[2 * kk][1]);
    a[1] = pack2<T>(pm[2 * kk][2], pm[2 * kk][3]);
    a[2] = pack2<T>(pm[2 * kk + 1][0], pm[2 * kk + 1][1]);
    a[3] = pack2<T>(pm[2 * kk + 1][2], pm[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < kDT / 2; ++dp) {
      uint32_t bb[4];
      ldmatrix_x4_trans(bb, b_base + (kk * 16 + ln.bv_row) * kPitch + dp * 16 + ln.bv_col);
      const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
      mma_16816<T>(acc[2 * dp], a, b0);
      mma_16816<T>(acc[2 * dp + 1], a, b1);
    }
  }
}

// Writes a warp's 16 x kHeadDim accumulator (times mul) as T through its rows of `stage` (which
// the caller has finished reading), then to global rows [row0, row0 + 16) with 16-byte stores.
template <class T, int kHeadDim, int kPitch>
FA_DEVICE void store_warp_rows(const float (&acc)[kHeadDim / 8][4], float mul, T* stage, T* gmem,
                               int64_t stride, int row0, int rows, int cols, bool vec, int lane) {
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int dt = 0; dt < kHeadDim / 8; ++dt) {
    store_u32(stage + g * kPitch + dt * 8 + 2 * t4, pack2<T>(acc[dt][0] * mul, acc[dt][1] * mul));
    store_u32(stage + (g + 8) * kPitch + dt * 8 + 2 * t4,
              pack2<T>(acc[dt][2] * mul, acc[dt][3] * mul));
  }
  __syncwarp();
  constexpr int kChunks = kHeadDim / 8;
#pragma unroll
  for (int it = 0; it < 16 * kChunks / 32; ++it) {
    const int c = lane + 32 * it;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    if (row0 + r >= rows || col >= cols) continue;
    const T* src = stage + r * kPitch + col;
    T* dst = gmem + int64_t(row0 + r) * stride + col;
    if (vec) {
      store16(dst, load16(src));
    } else {
      const int n = min_i(8, cols - col);
      for (int e = 0; e < n; ++e) dst[e] = src[e];
    }
  }
}

template <class T, int kHeadDim, bool kVarlen>
__global__ void __launch_bounds__(32 * attn_bwd_dkdv_tile().n_warps)
    attention_bwd_dkdv_mma_kernel(const BwdArgs args) {
  using Tr = BwdTraits<kHeadDim>;
  constexpr AttnBwdTile kTile = attn_bwd_dkdv_tile();
  constexpr int kThreads = 32 * kTile.n_warps, kBlockN = kTile.block_keys;
  constexpr int kBlockM = kTile.block_queries, kPitch = Tr::kPitch, kDTiles = Tr::kDTiles;
  constexpr int kMT = kBlockM / 8;  // n-tiles of S^T (queries)
  static_assert(kBlockN == 16 * kTile.n_warps, "a warp per 16 keys");
  const AttnBwdParams& p = args.p;
  const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t4 = lane & 3;
  const Lanes ln(lane);
  const int hk = int(blockIdx.y), b = int(blockIdx.z);
  const int gqa = p.heads / p.kv_heads;
  const int n0 = int(blockIdx.x) * kBlockN;
  const SeqSpan sq = seq_span<kVarlen>(p, args, b);
  if (kVarlen && n0 >= sq.len_k) return;  // past this sequence's keys (uniform over the block)
  const int keys_valid = min_i(kBlockN, sq.len_k - n0);

  T* sK = reinterpret_cast<T*>(smem_base());
  T* sV = sK + kBlockN * kPitch;
  T* sQ0 = sV + kBlockN * kPitch;  // [stage][kBlockM][kPitch], then dO the same
  T* sdO0 = sQ0 + 2 * kBlockM * kPitch;
  float* sStat = reinterpret_cast<float*>(sdO0 + 2 * kBlockM * kPitch);  // [stage][lse2|delta][M]

  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h +
               (sq.k0 + n0) * p.k_stride_s;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h +
               (sq.k0 + n0) * p.v_stride_s;
  load_tile_async<kBlockN, kHeadDim, kPitch, kThreads>(sK, k, p.k_stride_s, keys_valid, p.head_dim,
                                                       args.vec_k, tid);
  load_tile_async<kBlockN, kHeadDim, kPitch, kThreads>(sV, v, p.v_stride_s, keys_valid,
                                                       p.head_dim_v, args.vec_v, tid);

  int i_lo, i_hi;
  query_range(sq, n0, n0 + keys_valid - 1, &i_lo, &i_hi);
  const int mb_lo = i_lo / kBlockM;
  const int n_mb = i_hi > i_lo ? (i_hi + kBlockM - 1) / kBlockM - mb_lo : 0;
  const int n_iter = gqa * n_mb;

  auto issue = [&](int it, int stage) {
    const int h = hk * gqa + it / n_mb;
    const int m0 = (mb_lo + it % n_mb) * kBlockM;
    const int rows = min_i(kBlockM, sq.len_q - m0);
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h +
                 (sq.q0 + m0) * p.q_stride_l;
    const T* dout = static_cast<const T*>(p.grad_out) + b * p.do_stride_b + h * p.do_stride_h +
                    (sq.q0 + m0) * p.do_stride_l;
    load_tile_async<kBlockM, kHeadDim, kPitch, kThreads>(
        sQ0 + stage * kBlockM * kPitch, q, p.q_stride_l, rows, p.head_dim, args.vec_q, tid);
    load_tile_async<kBlockM, kHeadDim, kPitch, kThreads>(
        sdO0 + stage * kBlockM * kPitch, dout, p.do_stride_l, rows, p.head_dim_v, args.vec_do, tid);
    const int64_t row_base = stat_row<kVarlen>(args, b, h, sq, m0);
    for (int r = tid; r < kBlockM; r += kThreads) {
      sStat[stage * 2 * kBlockM + r] = r < rows ? args.lse2[row_base + r] : kInf;
      sStat[stage * 2 * kBlockM + kBlockM + r] = r < rows ? args.delta[row_base + r] : 0.0f;
    }
  };

  float acc_dk[kDTiles][4], acc_dv[kDTiles][4];
  zero_tiles(acc_dk);
  zero_tiles(acc_dv);
  const int key_a = n0 + warp * 16 + g;  // keys of this thread's accumulator rows: key_a, +8

  if (n_iter > 0) issue(0, 0);
  cp_async_commit();  // K, V (and the first Q, dO)
  for (int it = 0; it < n_iter; ++it) {
    const int stage = it & 1;
    if (it + 1 < n_iter) issue(it + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // K, V and iteration it's tiles are in shared memory
    const int h = hk * gqa + it / n_mb;
    const int m0 = (mb_lo + it % n_mb) * kBlockM;
    const T* sQ = sQ0 + stage * kBlockM * kPitch;
    const T* sdO = sdO0 + stage * kBlockM * kPitch;
    const float* sLse2 = sStat + stage * 2 * kBlockM;
    const float* sDelta = sLse2 + kBlockM;
    const T* mask = static_cast<const T*>(p.mask);
    if (mask != nullptr) mask += b * p.mask_stride_b + h * p.mask_stride_h;

    // S^T = K Q^T (keys x queries), then P^T
    float acc_p[kMT][4];
    zero_tiles(acc_p);
    mma_rows_x_rows<T, kMT, Tr::kKSteps, kPitch>(acc_p, sK + warp * 16 * kPitch, sQ, ln);
#pragma unroll
    for (int nt = 0; nt < kMT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key_a + (e >= 2 ? 8 : 0);
        const int il = nt * 8 + 2 * t4 + (e & 1);
        const int row = m0 + il;
        const int rel = key - row;
        const bool vis = key < sq.len_k && row < sq.len_q && rel >= sq.lo_rel && rel <= sq.hi_rel;
        float s = acc_p[nt][e] * args.scale_log2;
        if (vis && mask != nullptr) {
          s += to_float(mask[int64_t(row) * p.mask_stride_l + int64_t(key) * p.mask_stride_s]) *
               kLog2e;
        }
        acc_p[nt][e] = vis ? exp2_approx(s - sLse2[il]) : 0.0f;
      }
    }
    // dV += P^T dO
    mma_acc_x_tile<T, kBlockM, kDTiles, kPitch>(acc_dv, acc_p, sdO, ln);
    // dP^T = V dO^T, dS^T = P^T (dP^T - delta)
    float acc_ds[kMT][4];
    zero_tiles(acc_ds);
    mma_rows_x_rows<T, kMT, Tr::kKSteps, kPitch>(acc_ds, sV + warp * 16 * kPitch, sdO, ln);
#pragma unroll
    for (int nt = 0; nt < kMT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = nt * 8 + 2 * t4 + (e & 1);
        acc_ds[nt][e] = acc_p[nt][e] * (acc_ds[nt][e] - sDelta[il]);
      }
    }
    // dK += dS^T Q (scaled at the end)
    mma_acc_x_tile<T, kBlockM, kDTiles, kPitch>(acc_dk, acc_ds, sQ, ln);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();
  __syncthreads();  // K, V copies done (n_iter == 0) and no warp reads sK / sV any more

  T* dk = static_cast<T*>(p.dk) + b * p.dk_stride_b + hk * p.dk_stride_h + sq.k0 * p.dk_stride_s;
  T* dv = static_cast<T*>(p.dv) + b * p.dv_stride_b + hk * p.dv_stride_h + sq.k0 * p.dv_stride_s;
  store_warp_rows<T, kHeadDim, kPitch>(acc_dk, p.scale, sK + warp * 16 * kPitch, dk, p.dk_stride_s,
                                       n0 + warp * 16, sq.len_k, p.head_dim, args.vec_dk, lane);
  store_warp_rows<T, kHeadDim, kPitch>(acc_dv, 1.0f, sV + warp * 16 * kPitch, dv, p.dv_stride_s,
                                       n0 + warp * 16, sq.len_k, p.head_dim_v, args.vec_dv, lane);
}

template <class T, int kHeadDim, bool kVarlen>
__global__ void __launch_bounds__(32 * attn_bwd_dq_tile().n_warps)
    attention_bwd_dq_mma_kernel(const BwdArgs args) {
  using Tr = BwdTraits<kHeadDim>;
  constexpr AttnBwdTile kTile = attn_bwd_dq_tile();
  constexpr int kThreads = 32 * kTile.n_warps, kBlockN = kTile.block_keys;
  constexpr int kBlockM = kTile.block_queries, kPitch = Tr::kPitch, kDTiles = Tr::kDTiles;
  constexpr int kNT = kBlockN / 8;
  static_assert(kBlockM == 16 * kTile.n_warps, "a warp per 16 queries");
  const AttnBwdParams& p = args.p;
  const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t4 = lane & 3;
  const Lanes ln(lane);
  const int m_block = int(gridDim.x) - 1 - int(blockIdx.x);
  const int h = int(blockIdx.y), b = int(blockIdx.z);
  const int hk = h / (p.heads / p.kv_heads);
  const int m0 = m_block * kBlockM;
  const SeqSpan sq = seq_span<kVarlen>(p, args, b);
  if (kVarlen && m0 >= sq.len_q) return;  // past this sequence's queries (uniform over the block)
  const int rows_valid = min_i(kBlockM, sq.len_q - m0);
  const int m_last = m0 + rows_valid - 1;

  T* sQ = reinterpret_cast<T*>(smem_base());
  T* sdO = sQ + kBlockM * kPitch;
  T* sK0 = sdO + kBlockM * kPitch;  // [stage][K|V][kBlockN][kPitch]
  auto sK = [&](int stage) { return sK0 + stage * 2 * kBlockN * kPitch; };
  auto sV = [&](int stage) { return sK0 + (stage * 2 + 1) * kBlockN * kPitch; };

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h +
               (sq.q0 + m0) * p.q_stride_l;
  const T* dout = static_cast<const T*>(p.grad_out) + b * p.do_stride_b + h * p.do_stride_h +
                  (sq.q0 + m0) * p.do_stride_l;
  const T* k =
      static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h + sq.k0 * p.k_stride_s;
  const T* v =
      static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h + sq.k0 * p.v_stride_s;
  const T* mask = static_cast<const T*>(p.mask);
  if (mask != nullptr) mask += b * p.mask_stride_b + h * p.mask_stride_h;
  T* dmask = static_cast<T*>(p.dmask);
  if (dmask != nullptr) dmask += b * p.dmask_stride_b + h * p.dmask_stride_h;

  load_tile_async<kBlockM, kHeadDim, kPitch, kThreads>(sQ, q, p.q_stride_l, rows_valid, p.head_dim,
                                                       args.vec_q, tid);
  load_tile_async<kBlockM, kHeadDim, kPitch, kThreads>(sdO, dout, p.do_stride_l, rows_valid,
                                                       p.head_dim_v, args.vec_do, tid);
  const int n_lo = max_i(0, m0 + sq.lo_rel);
  const int n_hi = min_i(sq.len_k, m_last + sq.hi_rel + 1);
  const int nb_lo = n_lo / kBlockN;
  const int n_blocks = n_hi > n_lo ? (n_hi + kBlockN - 1) / kBlockN - nb_lo : 0;
  auto issue = [&](int j, int stage) {
    const int n0 = (nb_lo + j) * kBlockN;
    const int keys = min_i(kBlockN, sq.len_k - n0);
    load_tile_async<kBlockN, kHeadDim, kPitch, kThreads>(
        sK(stage), k + int64_t(n0) * p.k_stride_s, p.k_stride_s, keys, p.head_dim, args.vec_k, tid);
    load_tile_async<kBlockN, kHeadDim, kPitch, kThreads>(sV(stage), v + int64_t(n0) * p.v_stride_s,
                                                         p.v_stride_s, keys, p.head_dim_v,
                                                         args.vec_v, tid);
  };

  // statistics of this thread's two accumulator rows
  const int row_a = m0 + warp * 16 + g;
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_a + 8 * r;
    const int64_t idx = stat_row<kVarlen>(args, b, h, sq, row);
    lse2[r] = row < sq.len_q ? args.lse2[idx] : kInf;
    delta[r] = row < sq.len_q ? args.delta[idx] : 0.0f;
  }
  float acc_dq[kDTiles][4];
  zero_tiles(acc_dq);

  if (n_blocks > 0) issue(0, 0);
  cp_async_commit();  // Q, dO and the first K, V
  for (int j = 0; j < n_blocks; ++j) {
    const int stage = j & 1;
    const int n0 = (nb_lo + j) * kBlockN;
    if (j + 1 < n_blocks) issue(j + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    // S = Q K^T, P
    float acc_p[kNT][4];
    zero_tiles(acc_p);
    mma_rows_x_rows<T, kNT, Tr::kKSteps, kPitch>(acc_p, sQ + warp * 16 * kPitch, sK(stage), ln);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >= 2 ? 1 : 0;
        const int row = row_a + 8 * r;
        const int key = n0 + nt * 8 + 2 * t4 + (e & 1);
        const int rel = key - row;
        const bool vis = key < sq.len_k && row < sq.len_q && rel >= sq.lo_rel && rel <= sq.hi_rel;
        float s = acc_p[nt][e] * args.scale_log2;
        if (vis && mask != nullptr) {
          s += to_float(mask[int64_t(row) * p.mask_stride_l + int64_t(key) * p.mask_stride_s]) *
               kLog2e;
        }
        acc_p[nt][e] = vis ? exp2_approx(s - lse2[r]) : 0.0f;
      }
    }
    // dP = dO V^T, dS = P (dP - delta)
    float acc_ds[kNT][4];
    zero_tiles(acc_ds);
    mma_rows_x_rows<T, kNT, Tr::kKSteps, kPitch>(acc_ds, sdO + warp * 16 * kPitch, sV(stage), ln);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >= 2 ? 1 : 0;
        acc_ds[nt][e] = acc_p[nt][e] * (acc_ds[nt][e] - delta[r]);
        if (dmask != nullptr) {
          const int row = row_a + 8 * r;
          const int key = n0 + nt * 8 + 2 * t4 + (e & 1);
          if (row < sq.len_q && key < sq.len_k) {
            dmask[int64_t(row) * p.dmask_stride_l + int64_t(key) * p.dmask_stride_s] =
                from_float<T>(acc_ds[nt][e]);
          }
        }
      }
    }
    // dQ += dS K (scaled at the end)
    mma_acc_x_tile<T, kBlockN, kDTiles, kPitch>(acc_dq, acc_ds, sK(stage), ln);
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  T* dq = static_cast<T*>(p.dq) + b * p.dq_stride_b + h * p.dq_stride_h + sq.q0 * p.dq_stride_l;
  store_warp_rows<T, kHeadDim, kPitch>(acc_dq, p.scale, sQ + warp * 16 * kPitch, dq, p.dq_stride_l,
                                       m0 + warp * 16, sq.len_q, p.head_dim, args.vec_dq, lane);
}

// ---- SIMT kernels (float32, or head dims above the mma register budget) ---------------------
// Each warp owns 2 rows (queries for dQ, keys for dK/dV); the other side streams through shared
// memory in 32-row chunks, one per lane.
template <class T, int kHeadDim, bool kVarlen>
__global__ void __launch_bounds__(32 * attn_simt_tile().n_warps, 1)
    attention_bwd_dq_simt_kernel(const BwdArgs args) {
  constexpr AttnSimtTile kTile = attn_simt_tile();
  constexpr int kThreads = 32 * kTile.n_warps, kBlockM = kTile.block_m, kChunk = kTile.chunk;
  constexpr int kRows = kTile.rows_per_warp, kCols = kHeadDim / 32, kPitchC = kHeadDim + 1;
  const AttnBwdParams& p = args.p;
  const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int m_block = int(gridDim.x) - 1 - int(blockIdx.x);
  const int h = int(blockIdx.y), b = int(blockIdx.z);
  const int hk = h / (p.heads / p.kv_heads);
  const int m0 = m_block * kBlockM;
  const SeqSpan sq = seq_span<kVarlen>(p, args, b);
  if (kVarlen && m0 >= sq.len_q) return;  // past this sequence's queries (uniform over the block)
  const int rows_valid = min_i(kBlockM, sq.len_q - m0);
  const int m_last = m0 + rows_valid - 1;

  float* sQ = reinterpret_cast<float*>(smem_base());
  float* sdO = sQ + kBlockM * kHeadDim;
  float* sK = sdO + kBlockM * kHeadDim;
  float* sV = sK + kChunk * kPitchC;
  const T* k =
      static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h + sq.k0 * p.k_stride_s;
  const T* v =
      static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h + sq.k0 * p.v_stride_s;
  const T* mask = static_cast<const T*>(p.mask);
  if (mask != nullptr) mask += b * p.mask_stride_b + h * p.mask_stride_h;
  T* dmask = static_cast<T*>(p.dmask);
  if (dmask != nullptr) dmask += b * p.dmask_stride_b + h * p.dmask_stride_h;
  load_tile_float<kBlockM, kHeadDim, kHeadDim, kThreads>(
      sQ,
      static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h +
          (sq.q0 + m0) * p.q_stride_l,
      p.q_stride_l, rows_valid, p.head_dim, 1.0f, tid);
  load_tile_float<kBlockM, kHeadDim, kHeadDim, kThreads>(
      sdO,
      static_cast<const T*>(p.grad_out) + b * p.do_stride_b + h * p.do_stride_h +
          (sq.q0 + m0) * p.do_stride_l,
      p.do_stride_l, rows_valid, p.head_dim_v, 1.0f, tid);

  float lse2[kRows], delta[kRows], acc[kRows][kCols];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = m0 + warp * kRows + r;
    const int64_t idx = stat_row<kVarlen>(args, b, h, sq, row);
    lse2[r] = row < sq.len_q ? args.lse2[idx] : kInf;
    delta[r] = row < sq.len_q ? args.delta[idx] : 0.0f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = 0.0f;
  }
  const int n_lo = max_i(0, m0 + sq.lo_rel);
  const int n_hi = min_i(sq.len_k, m_last + sq.hi_rel + 1);
  for (int n0 = (n_lo / kChunk) * kChunk; n0 < n_hi; n0 += kChunk) {
    __syncthreads();
    const int keys = min_i(kChunk, sq.len_k - n0);
    load_tile_float<kChunk, kHeadDim, kPitchC, kThreads>(sK, k + int64_t(n0) * p.k_stride_s,
                                                         p.k_stride_s, keys, p.head_dim, 1.0f, tid);
    load_tile_float<kChunk, kHeadDim, kPitchC, kThreads>(
        sV, v + int64_t(n0) * p.v_stride_s, p.v_stride_s, keys, p.head_dim_v, 1.0f, tid);
    __syncthreads();
    const int key = n0 + lane;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int rl = warp * kRows + r, row = m0 + rl;
      float s = 0.0f, dp = 0.0f;
      for (int c = 0; c < kHeadDim; ++c) {
        s += sQ[rl * kHeadDim + c] * sK[lane * kPitchC + c];
        dp += sdO[rl * kHeadDim + c] * sV[lane * kPitchC + c];
      }
      const int rel = key - row;
      const bool vis = key < sq.len_k && row < sq.len_q && rel >= sq.lo_rel && rel <= sq.hi_rel;
      s *= args.scale_log2;
      if (vis && mask != nullptr) {
        s += to_float(mask[int64_t(row) * p.mask_stride_l + int64_t(key) * p.mask_stride_s]) *
             kLog2e;
      }
      const float pr = vis ? exp2_approx(s - lse2[r]) : 0.0f;
      const float ds = pr * (dp - delta[r]);
      if (dmask != nullptr && row < sq.len_q && key < sq.len_k) {
        dmask[int64_t(row) * p.dmask_stride_l + int64_t(key) * p.dmask_stride_s] =
            from_float<T>(ds);
      }
      for (int j = 0; j < kChunk; ++j) {
        const float dsj = __shfl_sync(0xffffffffu, ds, j);
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[r][c] += dsj * sK[j * kPitchC + lane + 32 * c];
      }
    }
  }
  T* dq = static_cast<T*>(p.dq) + b * p.dq_stride_b + h * p.dq_stride_h + sq.q0 * p.dq_stride_l;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = m0 + warp * kRows + r;
    if (row >= sq.len_q) continue;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = lane + 32 * c;
      if (col < p.head_dim)
        dq[int64_t(row) * p.dq_stride_l + col] = from_float<T>(acc[r][c] * p.scale);
    }
  }
}

template <class T, int kHeadDim, bool kVarlen>
__global__ void __launch_bounds__(32 * attn_simt_tile().n_warps, 1)
    attention_bwd_dkdv_simt_kernel(const BwdArgs args) {
  constexpr AttnSimtTile kTile = attn_simt_tile();
  constexpr int kThreads = 32 * kTile.n_warps, kBlockN = kTile.block_m, kChunk = kTile.chunk;
  constexpr int kRows = kTile.rows_per_warp, kCols = kHeadDim / 32, kPitchC = kHeadDim + 1;
  const AttnBwdParams& p = args.p;
  const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int hk = int(blockIdx.y), b = int(blockIdx.z);
  const int gqa = p.heads / p.kv_heads;
  const int n0 = int(blockIdx.x) * kBlockN;
  const SeqSpan sq = seq_span<kVarlen>(p, args, b);
  if (kVarlen && n0 >= sq.len_k) return;  // past this sequence's keys (uniform over the block)
  const int keys_valid = min_i(kBlockN, sq.len_k - n0);

  float* sK = reinterpret_cast<float*>(smem_base());
  float* sV = sK + kBlockN * kHeadDim;
  float* sQ = sV + kBlockN * kHeadDim;
  float* sdO = sQ + kChunk * kPitchC;
  load_tile_float<kBlockN, kHeadDim, kHeadDim, kThreads>(
      sK,
      static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h +
          (sq.k0 + n0) * p.k_stride_s,
      p.k_stride_s, keys_valid, p.head_dim, 1.0f, tid);
  load_tile_float<kBlockN, kHeadDim, kHeadDim, kThreads>(
      sV,
      static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h +
          (sq.k0 + n0) * p.v_stride_s,
      p.v_stride_s, keys_valid, p.head_dim_v, 1.0f, tid);

  float acc_dk[kRows][kCols], acc_dv[kRows][kCols];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc_dk[r][c] = acc_dv[r][c] = 0.0f;
  }
  int i_lo, i_hi;
  query_range(sq, n0, n0 + keys_valid - 1, &i_lo, &i_hi);
  for (int hh = 0; hh < gqa; ++hh) {
    const int h = hk * gqa + hh;
    const T* q =
        static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + sq.q0 * p.q_stride_l;
    const T* dout = static_cast<const T*>(p.grad_out) + b * p.do_stride_b + h * p.do_stride_h +
                    sq.q0 * p.do_stride_l;
    const T* mask = static_cast<const T*>(p.mask);
    if (mask != nullptr) mask += b * p.mask_stride_b + h * p.mask_stride_h;
    const int64_t stat_base = stat_row<kVarlen>(args, b, h, sq, 0);
    for (int m0 = (i_lo / kChunk) * kChunk; m0 < i_hi; m0 += kChunk) {
      __syncthreads();
      const int rows = min_i(kChunk, sq.len_q - m0);
      load_tile_float<kChunk, kHeadDim, kPitchC, kThreads>(
          sQ, q + int64_t(m0) * p.q_stride_l, p.q_stride_l, rows, p.head_dim, 1.0f, tid);
      load_tile_float<kChunk, kHeadDim, kPitchC, kThreads>(
          sdO, dout + int64_t(m0) * p.do_stride_l, p.do_stride_l, rows, p.head_dim_v, 1.0f, tid);
      __syncthreads();
      const int row = m0 + lane;
      const float lse2 = row < sq.len_q ? args.lse2[stat_base + row] : kInf;
      const float delta = row < sq.len_q ? args.delta[stat_base + row] : 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int kl = warp * kRows + r, key = n0 + kl;
        float s = 0.0f, dp = 0.0f;
        for (int c = 0; c < kHeadDim; ++c) {
          s += sK[kl * kHeadDim + c] * sQ[lane * kPitchC + c];
          dp += sV[kl * kHeadDim + c] * sdO[lane * kPitchC + c];
        }
        const int rel = key - row;
        const bool vis = key < sq.len_k && row < sq.len_q && rel >= sq.lo_rel && rel <= sq.hi_rel;
        s *= args.scale_log2;
        if (vis && mask != nullptr) {
          s += to_float(mask[int64_t(row) * p.mask_stride_l + int64_t(key) * p.mask_stride_s]) *
               kLog2e;
        }
        const float pr = vis ? exp2_approx(s - lse2) : 0.0f;
        const float ds = pr * (dp - delta);
        for (int j = 0; j < kChunk; ++j) {
          const float pj = __shfl_sync(0xffffffffu, pr, j);
          const float dsj = __shfl_sync(0xffffffffu, ds, j);
#pragma unroll
          for (int c = 0; c < kCols; ++c) {
            acc_dv[r][c] += pj * sdO[j * kPitchC + lane + 32 * c];
            acc_dk[r][c] += dsj * sQ[j * kPitchC + lane + 32 * c];
          }
        }
      }
    }
  }
  T* dk = static_cast<T*>(p.dk) + b * p.dk_stride_b + hk * p.dk_stride_h + sq.k0 * p.dk_stride_s;
  T* dv = static_cast<T*>(p.dv) + b * p.dv_stride_b + hk * p.dv_stride_h + sq.k0 * p.dv_stride_s;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int key = n0 + warp * kRows + r;
    if (key >= sq.len_k) continue;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = lane + 32 * c;
      if (col < p.head_dim)
        dk[int64_t(key) * p.dk_stride_s + col] = from_float<T>(acc_dk[r][c] * p.scale);
      if (col < p.head_dim_v) dv[int64_t(key) * p.dv_stride_s + col] = from_float<T>(acc_dv[r][c]);
    }
  }
}

template <class T, int kHeadDim, bool kVarlen>
cudaError_t launch_bwd(const BwdArgs& args, cudaStream_t stream) {
  const AttnBwdParams& p = args.p;
  const int64_t rows =
      kVarlen ? int64_t(p.heads) * p.total_q : int64_t(p.batch) * p.heads * p.len_q;
  auto rowstats = attention_bwd_rowstats_kernel<T>;
  FA_LAUNCH(rowstats, dim3(ceil_div(rows, 4)), dim3(128), 0, stream, args);
  cudaError_t err = launch_status();
  if (err != cudaSuccess) return err;
  constexpr bool kMma = !std::is_same<T, float>::value && kHeadDim <= kAttnBwdMmaMaxHeadDim;
  if constexpr (kMma) {
    constexpr AttnBwdTile kv = attn_bwd_dkdv_tile(), qt = attn_bwd_dq_tile();
    auto dkdv = attention_bwd_dkdv_mma_kernel<T, kHeadDim, kVarlen>;
    auto dq = attention_bwd_dq_mma_kernel<T, kHeadDim, kVarlen>;
    const size_t smem_kv = attn_bwd_dkdv_smem_bytes(kHeadDim);
    const size_t smem_q = attn_bwd_dq_smem_bytes(kHeadDim);
    if ((err = allow_smem(dkdv, smem_kv)) != cudaSuccess) return err;
    if ((err = allow_smem(dq, smem_q)) != cudaSuccess) return err;
    FA_LAUNCH(dkdv, dim3(ceil_div(p.len_k, kv.block_keys), unsigned(p.kv_heads), unsigned(p.batch)),
              dim3(32 * kv.n_warps), smem_kv, stream, args);
    if ((err = launch_status()) != cudaSuccess) return err;
    FA_LAUNCH(dq, dim3(ceil_div(p.len_q, qt.block_queries), unsigned(p.heads), unsigned(p.batch)),
              dim3(32 * qt.n_warps), smem_q, stream, args);
  } else {
    constexpr AttnSimtTile tile = attn_simt_tile();
    auto dkdv = attention_bwd_dkdv_simt_kernel<T, kHeadDim, kVarlen>;
    auto dq = attention_bwd_dq_simt_kernel<T, kHeadDim, kVarlen>;
    const size_t smem = attn_simt_bwd_smem_bytes(kHeadDim);
    if ((err = allow_smem(dkdv, smem)) != cudaSuccess) return err;
    if ((err = allow_smem(dq, smem)) != cudaSuccess) return err;
    FA_LAUNCH(dkdv, dim3(ceil_div(p.len_k, tile.block_m), unsigned(p.kv_heads), unsigned(p.batch)),
              dim3(32 * tile.n_warps), smem, stream, args);
    if ((err = launch_status()) != cudaSuccess) return err;
    FA_LAUNCH(dq, dim3(ceil_div(p.len_q, tile.block_m), unsigned(p.heads), unsigned(p.batch)),
              dim3(32 * tile.n_warps), smem, stream, args);
  }
  return launch_status();
}

}  // namespace detail

cudaError_t attention_bwd(const AttnBwdParams& p, DType dtype, cudaStream_t stream) {
  // empty problems write nothing: the caller returns zero gradients for them
  if (p.batch <= 0 || p.heads <= 0 || p.len_q <= 0 || p.len_k <= 0) return cudaSuccess;
  if (!attn_sizes_ok(p) || p.workspace == nullptr) return cudaErrorInvalidValue;
  const bool varlen = p.cu_seqlens_q != nullptr;
  if (varlen && (p.cu_seqlens_k == nullptr || p.mask != nullptr || p.dmask != nullptr ||
                 p.total_q < 0 || p.total_k < 0)) {
    return cudaErrorInvalidValue;
  }
  detail::BwdArgs args;
  static_cast<AttnArgs&>(args) = attn_args(p, dtype);
  args.p = p;
  const int es = dtype_bytes(dtype);
  args.vec_do = vec_ok(p.grad_out, es, p.do_stride_b, p.do_stride_h, p.do_stride_l);
  args.vec_dq = vec_store_ok(p.dq, es, p.dq_stride_b, p.dq_stride_h, p.dq_stride_l, p.head_dim);
  args.vec_dk = vec_store_ok(p.dk, es, p.dk_stride_b, p.dk_stride_h, p.dk_stride_s, p.head_dim);
  args.vec_dv =
      vec_store_ok(p.dv, es, p.dv_stride_b, p.dv_stride_h, p.dv_stride_s, p.head_dim_v);
  const int64_t rows =
      varlen ? int64_t(p.heads) * p.total_q : int64_t(p.batch) * p.heads * p.len_q;
  args.delta = p.workspace;
  args.lse2 = p.workspace + rows;
  const int dim = p.head_dim > p.head_dim_v ? p.head_dim : p.head_dim_v;
  return dispatch_dtype_head_dim(dtype, dim, [&](auto tag, auto hd) {
    using T = typename decltype(tag)::type;
    constexpr int kDim = decltype(hd)::value;
    return varlen ? detail::launch_bwd<T, kDim, true>(args, stream)
                  : detail::launch_bwd<T, kDim, false>(args, stream);
  });
}

}  // namespace fastattn::cuda
