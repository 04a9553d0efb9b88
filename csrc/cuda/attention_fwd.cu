// Attention forward.
//  * bf16/fp16: FlashAttention-2 style. A block owns block_m query rows of one (batch, head);
//    each warp owns 16-row mma tiles. S = Q K^T and O += P V run on mma.sync.m16n8k16 with
//    fp32 accumulation; the softmax is online (running max / sum per row, O rescaled). K and V
//    tiles stream through shared memory with cp.async: the copy of V_j overlaps S_j = Q K_j^T
//    and the copy of K_{j+1} overlaps the softmax and P V_j.
//  * float32: a SIMT kernel (a warp per query row pair, a key per lane) with the same semantics.
// Packed variable-length sequences (kVarlen) run the same kernels: blockIdx.z is the sequence,
// whose row offsets and lengths come from cu_seqlens (seq_span); query blocks past its length
// exit at once.
#include "attention_common.cuh"

namespace fastattn::cuda {
namespace detail {

struct FwdArgs : AttnArgs {
  AttnFwdParams p;
  bool vec_out;
};

template <int kHeadDim>
struct FwdTraits {
  static constexpr AttnFwdTile kTile = attn_fwd_tile(kHeadDim);
  static constexpr int kNWarps = kTile.n_warps;
  static constexpr int kThreads = 32 * kNWarps;
  static constexpr int kMTiles = kTile.m_tiles;
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr bool kQInRegs = kTile.q_in_regs;
  static constexpr int kPitch = smem_pitch(kHeadDim, 2);
  static constexpr int kKSteps = kHeadDim / 16;  // k-steps of Q K^T over the head dim
  static constexpr int kNTiles = kBlockN / 8;    // n-tiles of S
  static constexpr int kDTiles = kHeadDim / 8;   // n-tiles of O
  static_assert(kBlockM == 16 * kMTiles * kNWarps, "warps tile the query rows");
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "ldmatrix.x4 covers 16 columns");
};

template <class T, int kHeadDim, bool kVarlen>
__global__ void __launch_bounds__(FwdTraits<kHeadDim>::kThreads)
    attention_fwd_mma_kernel(const FwdArgs args) {
  using Tr = FwdTraits<kHeadDim>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kPitch = Tr::kPitch;
  constexpr int kMTiles = Tr::kMTiles, kNTiles = Tr::kNTiles, kDTiles = Tr::kDTiles;
  constexpr int kKSteps = Tr::kKSteps, kThreads = Tr::kThreads;
  const AttnFwdParams& p = args.p;

  const int tid = int(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t4 = lane & 3;  // mma quad row / column pair
  // heavy (late, for causal) query blocks first
  const int m_block = int(gridDim.x) - 1 - int(blockIdx.x);
  const int h = int(blockIdx.y), b = int(blockIdx.z);
  const int hk = h / (p.heads / p.kv_heads);
  const int m0 = m_block * kBlockM;
  const SeqSpan sq = seq_span<kVarlen>(p, args, b);
  if (kVarlen && m0 >= sq.len_q) return;  // past this sequence's queries (uniform over the block)
  const int rows_valid = min_i(kBlockM, sq.len_q - m0);
  const int m_last = m0 + rows_valid - 1;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h +
               (sq.q0 + m0) * p.q_stride_l;
  const T* k =
      static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h + sq.k0 * p.k_stride_s;
  const T* v =
      static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h + sq.k0 * p.v_stride_s;
  // (varlen has no mask: a compile-time null keeps the mask code out of that instantiation)
  const T* mask = kVarlen ? nullptr : static_cast<const T*>(p.mask);
  if (mask != nullptr) mask += b * p.mask_stride_b + h * p.mask_stride_h;

  T* sQ = reinterpret_cast<T*>(smem_base());
  T* sK = sQ + kBlockM * kPitch;
  T* sV = sK + kBlockN * kPitch;

  // keys any row of this block may see
  const int n_lo = max_i(0, m0 + sq.lo_rel);
  const int n_hi = min_i(sq.len_k, m_last + sq.hi_rel + 1);
  const int nb_lo = n_lo / kBlockN;
  const int nb_hi = n_hi > n_lo ? (n_hi + kBlockN - 1) / kBlockN : nb_lo;

  load_tile_async<kBlockM, kHeadDim, kPitch, kThreads>(sQ, q, p.q_stride_l, rows_valid, p.head_dim,
                                                       args.vec_q, tid);
  cp_async_commit();
  if (nb_lo < nb_hi) {
    const int n0 = nb_lo * kBlockN;
    load_tile_async<kBlockN, kHeadDim, kPitch, kThreads>(sK, k + int64_t(n0) * p.k_stride_s,
                                                         p.k_stride_s, min_i(kBlockN, sq.len_k - n0),
                                                         p.head_dim, args.vec_k, tid);
  }
  cp_async_commit();

  float acc_o[kMTiles][kDTiles][4];
  float row_max[kMTiles][2], row_sum[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.0f;
    }
    row_max[mt][0] = row_max[mt][1] = kNegInf;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }
  constexpr int kQRegTiles = Tr::kQInRegs ? kMTiles : 1;
  constexpr int kQRegSteps = Tr::kQInRegs ? kKSteps : 1;
  uint32_t q_frag[kQRegTiles][kQRegSteps][4];

  const int warp_row0 = warp * kMTiles * 16;  // first row of this warp within the block
  // ldmatrix row addresses: A operand (16 rows x 16 cols), lanes 0-15 rows at col 0, 16-31 col 8
  const int a_row = lane % 16, a_col = (lane / 16) * 8;
  // B operand from an [n][k] tile (K): matrices (n0-7,k0-7) (n0-7,k8-15) (n8-15,k0-7) (n8-15,k8-15)
  const int bk_row = (lane / 16) * 8 + lane % 8, bk_col = ((lane / 8) % 2) * 8;
  // B operand from a [k][n] tile (V, transposed load): (k0-7,n0-7) (k8-15,n0-7) (k0-7,n8-15) ...
  const int bv_row = ((lane / 8) % 2) * 8 + lane % 8, bv_col = (lane / 16) * 8;

  for (int nb = nb_lo; nb < nb_hi; ++nb) {
    const int n0 = nb * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // K_nb (and Q) landed; every warp is done with V_{nb-1}
    if (Tr::kQInRegs && nb == nb_lo) {
#pragma unroll
      for (int mt = 0; mt < kQRegTiles; ++mt) {
#pragma unroll
        for (int ks = 0; ks < kQRegSteps; ++ks) {
          ldmatrix_x4(q_frag[mt][ks],
                      sQ + (warp_row0 + mt * 16 + a_row) * kPitch + ks * 16 + a_col);
        }
      }
    }
    load_tile_async<kBlockN, kHeadDim, kPitch, kThreads>(sV, v + int64_t(n0) * p.v_stride_s,
                                                         p.v_stride_s, min_i(kBlockN, sq.len_k - n0),
                                                         p.head_dim_v, args.vec_v, tid);
    cp_async_commit();

    // ---- S = Q K^T --------------------------------------------------------------------------
    float acc_s[kMTiles][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = 0.0f;
      }
    }
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        if constexpr (Tr::kQInRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[mt][i] = q_frag[mt][ks][i];
        } else {
          ldmatrix_x4(a[mt], sQ + (warp_row0 + mt * 16 + a_row) * kPitch + ks * 16 + a_col);
        }
      }
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t bb[4];
        ldmatrix_x4(bb, sK + (np * 16 + bk_row) * kPitch + ks * 16 + bk_col);
        const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<T>(acc_s[mt][2 * np], a[mt], b0);
          mma_16816<T>(acc_s[mt][2 * np + 1], a[mt], b1);
        }
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V_nb landed; every warp is done with K_nb
    if (nb + 1 < nb_hi) {
      const int n1 = n0 + kBlockN;
      load_tile_async<kBlockN, kHeadDim, kPitch, kThreads>(
          sK, k + int64_t(n1) * p.k_stride_s, p.k_stride_s, min_i(kBlockN, sq.len_k - n1),
          p.head_dim, args.vec_k, tid);
    }
    cp_async_commit();

    // ---- scale, mask, online softmax ----------------------------------------------------------
    // A block needs per-element masking only where it crosses the window or the end of the keys
    // or an additive mask is given; the test is uniform over the block.
    const bool full = mask == nullptr && n0 + kBlockN <= sq.len_k && n0 - m_last >= sq.lo_rel &&
                      n0 + kBlockN - 1 - m0 <= sq.hi_rel;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float s = acc_s[mt][nt][e] * args.scale_log2;
          if (!full) {
            const int row = m0 + warp_row0 + mt * 16 + g + (e >= 2 ? 8 : 0);
            const int col = n0 + nt * 8 + 2 * t4 + (e & 1);
            const int rel = col - row;
            const bool vis = col < sq.len_k && rel >= sq.lo_rel && rel <= sq.hi_rel;
            if (vis && mask != nullptr && row < sq.len_q) {
              s += to_float(mask[int64_t(row) * p.mask_stride_l + int64_t(col) * p.mask_stride_s]) *
                   kLog2e;
            }
            s = vis ? s : kNegInf;
          }
          acc_s[mt][nt][e] = s;
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[mt][r];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          mx = max_f(mx, max_f(acc_s[mt][nt][2 * r], acc_s[mt][nt][2 * r + 1]));
        }
        mx = quad_max(mx);
        // a row with nothing visible yet keeps max -inf; subtracting 0 then keeps exp2 at 0
        const float m_use = mx == kNegInf ? 0.0f : mx;
        const float alpha = exp2_approx(row_max[mt][r] - m_use);
        row_max[mt][r] = mx;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          const float p0 = exp2_approx(acc_s[mt][nt][2 * r] - m_use);
          const float p1 = exp2_approx(acc_s[mt][nt][2 * r + 1] - m_use);
          acc_s[mt][nt][2 * r] = p0;
          acc_s[mt][nt][2 * r + 1] = p1;
          sum += p0 + p1;
        }
        // per-thread partial sums; the quad is reduced once at the end
        row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          acc_o[mt][dt][2 * r] *= alpha;
          acc_o[mt][dt][2 * r + 1] *= alpha;
        }
      }
    }

    // ---- O += P V: the S accumulators of n-tiles 2kk, 2kk+1 are the A fragment of key step kk
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        a[mt][0] = pack2<T>(acc_s[mt][2 * kk][0], acc_s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(acc_s[mt][2 * kk][2], acc_s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(acc_s[mt][2 * kk + 1][0], acc_s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(acc_s[mt][2 * kk + 1][2], acc_s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, sV + (kk * 16 + bv_row) * kPitch + dp * 16 + bv_col);
        const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<T>(acc_o[mt][2 * dp], a[mt], b0);
          mma_16816<T>(acc_o[mt][2 * dp + 1], a[mt], b1);
        }
      }
    }
  }

  // ---- epilogue: normalise, lse, stage O through this warp's rows of sQ, coalesced store ------
  cp_async_wait<0>();
  __syncthreads();  // no copy into sQ in flight (the Q load when no key block was visited)
  // varlen: the sequence's rows are read again here rather than held in registers through the
  // key loop (at d = 256 those registers made the sm_90a kernel spill)
  const SeqSpan se = kVarlen ? seq_span<kVarlen>(p, args, b) : sq;
  float* lse = p.lse + b * p.lse_stride_b + h * p.lse_stride_h + se.q0;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(row_sum[mt][r]);
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      const int row_local = warp_row0 + mt * 16 + g + 8 * r;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        store_u32(sQ + row_local * kPitch + dt * 8 + 2 * t4,
                  pack2<T>(acc_o[mt][dt][2 * r] * inv, acc_o[mt][dt][2 * r + 1] * inv));
      }
      const int row = m0 + row_local;
      if (t4 == 0 && row < se.len_q) {
        lse[row] = l > 0.0f ? row_max[mt][r] * kLn2 + log_f(l) : kNegInf;
      }
    }
  }
  __syncwarp();
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kWarpRows = kMTiles * 16;
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + h * p.out_stride_h +
           se.q0 * p.out_stride_l;
#pragma unroll
  for (int it = 0; it < kWarpRows * kChunks / 32; ++it) {
    const int c = lane + 32 * it;
    const int row_local = warp_row0 + c / kChunks;
    const int col = (c % kChunks) * 8;
    const int row = m0 + row_local;
    if (row >= se.len_q || col >= p.head_dim_v) continue;
    const T* src = sQ + row_local * kPitch + col;
    T* dst = out + int64_t(row) * p.out_stride_l + col;
    if (args.vec_out) {
      store16(dst, load16(src));
    } else {
      const int n = min_i(8, p.head_dim_v - col);
      for (int e = 0; e < n; ++e) dst[e] = src[e];
    }
  }
}

// ---- float32: SIMT -------------------------------------------------------------------------
template <int kHeadDim, bool kVarlen>
__global__ void __launch_bounds__(32 * attn_simt_tile().n_warps, 1)
    attention_fwd_simt_kernel(const FwdArgs args) {
  constexpr AttnSimtTile kTile = attn_simt_tile();
  constexpr int kThreads = 32 * kTile.n_warps, kBlockM = kTile.block_m, kChunk = kTile.chunk;
  constexpr int kRows = kTile.rows_per_warp, kCols = kHeadDim / 32;
  constexpr int kPitchK = kHeadDim + 1;  // lane j reads row j: odd pitch, no bank conflicts
  static_assert(kChunk == 32, "a key per lane");
  const AttnFwdParams& p = args.p;
  const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int m_block = int(gridDim.x) - 1 - int(blockIdx.x);
  const int h = int(blockIdx.y), b = int(blockIdx.z);
  const int hk = h / (p.heads / p.kv_heads);
  const int m0 = m_block * kBlockM;
  const SeqSpan sq = seq_span<kVarlen>(p, args, b);
  if (kVarlen && m0 >= sq.len_q) return;  // past this sequence's queries (uniform over the block)
  const int rows_valid = min_i(kBlockM, sq.len_q - m0);
  const int m_last = m0 + rows_valid - 1;

  const float* q = static_cast<const float*>(p.q) + b * p.q_stride_b + h * p.q_stride_h +
                   (sq.q0 + m0) * p.q_stride_l;
  const float* k = static_cast<const float*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h +
                   sq.k0 * p.k_stride_s;
  const float* v = static_cast<const float*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h +
                   sq.k0 * p.v_stride_s;
  const float* mask = static_cast<const float*>(p.mask);
  if (mask != nullptr) mask += b * p.mask_stride_b + h * p.mask_stride_h;

  float* sQ = reinterpret_cast<float*>(smem_base());
  float* sK = sQ + kBlockM * kHeadDim;
  float* sV = sK + kChunk * kPitchK;
  // q pre-multiplied by scale * log2(e): scores come out in base 2
  load_tile_float<kBlockM, kHeadDim, kHeadDim, kThreads>(sQ, q, p.q_stride_l, rows_valid,
                                                         p.head_dim, args.scale_log2, tid);

  const int n_lo = max_i(0, m0 + sq.lo_rel);
  const int n_hi = min_i(sq.len_k, m_last + sq.hi_rel + 1);

  float acc[kRows][kCols], row_max[kRows], row_sum[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = kNegInf;
    row_sum[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = 0.0f;
  }

  for (int n0 = (n_lo / kChunk) * kChunk; n0 < n_hi; n0 += kChunk) {
    __syncthreads();  // previous chunk consumed (and sQ written, on the first pass)
    const int keys = min_i(kChunk, sq.len_k - n0);
    load_tile_float<kChunk, kHeadDim, kPitchK, kThreads>(sK, k + int64_t(n0) * p.k_stride_s,
                                                         p.k_stride_s, keys, p.head_dim, 1.0f, tid);
    load_tile_float<kChunk, kHeadDim, kHeadDim, kThreads>(
        sV, v + int64_t(n0) * p.v_stride_s, p.v_stride_s, keys, p.head_dim_v, 1.0f, tid);
    __syncthreads();
    const int key = n0 + lane;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row_local = warp * kRows + r;
      const int row = m0 + row_local;
      float s = 0.0f;
      const float* qr = sQ + row_local * kHeadDim;
      const float* kr = sK + lane * kPitchK;
#pragma unroll 8
      for (int c = 0; c < kHeadDim; ++c) s += qr[c] * kr[c];
      const int rel = key - row;
      const bool vis = key < sq.len_k && row < sq.len_q && rel >= sq.lo_rel && rel <= sq.hi_rel;
      if (vis && mask != nullptr) {
        s += mask[int64_t(row) * p.mask_stride_l + int64_t(key) * p.mask_stride_s] * kLog2e;
      }
      const float pr = online_softmax_chunk(vis ? s : kNegInf, row_max[r], row_sum[r], acc[r]);
      for (int j = 0; j < kChunk; ++j) {
        const float pj = __shfl_sync(0xffffffffu, pr, j);
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[r][c] += pj * sV[j * kHeadDim + lane + 32 * c];
      }
    }
  }

  float* out = static_cast<float*>(p.out) + b * p.out_stride_b + h * p.out_stride_h +
               sq.q0 * p.out_stride_l;
  float* lse = p.lse + b * p.lse_stride_b + h * p.lse_stride_h + sq.q0;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = m0 + warp * kRows + r;
    if (row >= sq.len_q) continue;
    const float l = row_sum[r];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = lane + 32 * c;
      if (col < p.head_dim_v) out[int64_t(row) * p.out_stride_l + col] = acc[r][c] * inv;
    }
    if (lane == 0) lse[row] = l > 0.0f ? row_max[r] * kLn2 + log_f(l) : kNegInf;
  }
}

template <class T, int kHeadDim, bool kVarlen>
cudaError_t launch_fwd(const FwdArgs& args, cudaStream_t stream) {
  const AttnFwdParams& p = args.p;
  if constexpr (std::is_same<T, float>::value) {
    constexpr AttnSimtTile kTile = attn_simt_tile();
    const size_t smem = attn_simt_smem_bytes<float>(kHeadDim);
    auto kernel = attention_fwd_simt_kernel<kHeadDim, kVarlen>;
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid(ceil_div(p.len_q, kTile.block_m), unsigned(p.heads), unsigned(p.batch));
    FA_LAUNCH(kernel, grid, dim3(32 * kTile.n_warps), smem, stream, args);
  } else {
    using Tr = FwdTraits<kHeadDim>;
    const size_t smem = attn_fwd_smem_bytes(kHeadDim);
    auto kernel = attention_fwd_mma_kernel<T, kHeadDim, kVarlen>;
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid(ceil_div(p.len_q, Tr::kBlockM), unsigned(p.heads), unsigned(p.batch));
    FA_LAUNCH(kernel, grid, dim3(Tr::kThreads), smem, stream, args);
  }
  return launch_status();
}

}  // namespace detail

cudaError_t attention_fwd(const AttnFwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.batch <= 0 || p.heads <= 0 || p.len_q <= 0) return cudaSuccess;
  if (!attn_sizes_ok(p)) return cudaErrorInvalidValue;
  const bool varlen = p.cu_seqlens_q != nullptr;
  if (varlen && (p.cu_seqlens_k == nullptr || p.mask != nullptr || p.total_q < 0 ||
                 p.total_k < 0)) {
    return cudaErrorInvalidValue;
  }
  detail::FwdArgs args;
  static_cast<AttnArgs&>(args) = attn_args(p, dtype);
  args.p = p;
  args.vec_out = vec_store_ok(p.out, dtype_bytes(dtype), p.out_stride_b, p.out_stride_h,
                              p.out_stride_l, p.head_dim_v);
  const int dim = p.head_dim > p.head_dim_v ? p.head_dim : p.head_dim_v;
  return dispatch_dtype_head_dim(dtype, dim, [&](auto tag, auto hd) {
    using T = typename decltype(tag)::type;
    constexpr int kDim = decltype(hd)::value;
    return varlen ? detail::launch_fwd<T, kDim, true>(args, stream)
                  : detail::launch_fwd<T, kDim, false>(args, stream);
  });
}

}  // namespace fastattn::cuda
