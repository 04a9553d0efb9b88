// Tiling and launch decisions of the fastattn CUDA kernels, as plain constexpr C++ shared by the
// kernels (template constants) and the host launchers, and unit-tested on the host.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastattn::cuda {

constexpr int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up64(int64_t a, int64_t b) { return ceil_div64(a, b) * b; }

// ---- attention ---------------------------------------------------------------------------------
// One kernel instantiation per bucket; head dims in between (40, 80, 111...) run in the next
// bucket with the tail columns zero-filled in shared memory and masked on store.
constexpr int kHeadDimBuckets[8] = {32, 64, 96, 128, 160, 192, 224, 256};
constexpr int kMaxHeadDim = 256;

constexpr int head_dim_bucket(int head_dim) {
  for (int b : kHeadDimBuckets) {
    if (head_dim <= b) return head_dim >= 1 ? b : -1;
  }
  return -1;
}

// Tensor-core forward (bf16/fp16). Each warp owns m_tiles x 16 query rows; K/V tiles of block_n
// keys are shared by all warps. Q fragments stay in registers up to d = 128; beyond, the O
// accumulator alone takes d/2 registers per thread, so Q is re-read from shared memory.
struct AttnFwdTile {
  int n_warps, m_tiles, block_m, block_n;
  bool q_in_regs;
};

constexpr AttnFwdTile attn_fwd_tile(int head_dim) {
  if (head_dim <= 64) return {8, 1, 128, 64, true};
  if (head_dim <= 128) return {8, 1, 128, 64, true};
  return {8, 1, 128, 32, false};
}

// Shared-memory rows are padded by 16 bytes: ldmatrix reads 8 rows of 16 bytes at once, and a
// pitch of 16 (mod 128) or 80 (mod 128) bytes puts those 8 rows in 8 distinct bank groups.
constexpr int smem_pitch(int head_dim, int elem_bytes) { return head_dim + 16 / elem_bytes; }

constexpr size_t attn_fwd_smem_bytes(int head_dim) {
  return size_t(attn_fwd_tile(head_dim).block_m + 2 * attn_fwd_tile(head_dim).block_n) *
         size_t(smem_pitch(head_dim, 2)) * 2;
}

// SIMT forward (float32 inputs): a warp per query row pair, 32-key chunks (a key per lane).
struct AttnSimtTile {
  int n_warps, rows_per_warp, block_m, chunk;
};
constexpr AttnSimtTile attn_simt_tile() { return {8, 2, 16, 32}; }

template <class T>
constexpr size_t attn_simt_smem_bytes(int head_dim) {
  // q rows (float, pre-scaled) + K chunk (pitch d + 1 floats: lane j reads row j) + V chunk
  return size_t(attn_simt_tile().block_m) * head_dim * 4 +
         size_t(attn_simt_tile().chunk) * (head_dim + 1) * 4 +
         size_t(attn_simt_tile().chunk) * head_dim * 4;
}

// Tensor-core backward (bf16/fp16, d <= 128): dK/dV kernel over key blocks (a warp per 16 keys,
// queries streamed in blocks of bwd_block_m), dQ kernel over query blocks (a warp per 16 queries,
// keys streamed in blocks of bwd_block_n). No atomics: deterministic by construction.
struct AttnBwdTile {
  int n_warps, block_keys, block_queries;
};
constexpr AttnBwdTile attn_bwd_dkdv_tile() { return {4, 64, 32}; }
constexpr AttnBwdTile attn_bwd_dq_tile() { return {4, 32, 64}; }
constexpr int kAttnBwdMmaMaxHeadDim = 128;

constexpr size_t attn_bwd_dkdv_smem_bytes(int head_dim) {
  // K, V (block_keys rows) + 2 stages of Q, dO (block_queries rows) + 2 stages of lse, delta
  return size_t(2 * attn_bwd_dkdv_tile().block_keys + 4 * attn_bwd_dkdv_tile().block_queries) *
             size_t(smem_pitch(head_dim, 2)) * 2 +
         size_t(4 * attn_bwd_dkdv_tile().block_queries) * 4;
}
constexpr size_t attn_bwd_dq_smem_bytes(int head_dim) {
  // Q, dO (block_queries rows) + 2 stages of K, V (block_keys rows)
  return size_t(2 * attn_bwd_dq_tile().block_queries + 4 * attn_bwd_dq_tile().block_keys) *
         size_t(smem_pitch(head_dim, 2)) * 2;
}

// SIMT backward (float32, or d > 128): a warp per query row pair (dQ) or key row pair (dK/dV).
constexpr size_t attn_simt_bwd_smem_bytes(int head_dim) {
  // own rows: 2 tensors x block rows (float); streamed chunk: 2 tensors x 32 rows (pitch d + 1)
  return size_t(2 * attn_simt_tile().block_m) * head_dim * 4 +
         size_t(2 * attn_simt_tile().chunk) * (head_dim + 1) * 4;
}

// Split-K decoding. A block serves up to kvcache_rows query rows of one kv head (the GQA group
// times the new tokens), streaming 32-key chunks through a 2-stage cp.async pipeline.
struct KvcacheTile {
  int n_warps, rows, chunk, stages;
};
constexpr KvcacheTile kvcache_tile() { return {8, 16, 32, 2}; }

// Blocks per (batch, kv head): the query rows of a GQA group (heads / kv_heads query heads
// times len_q new tokens) in blocks of kvcache_tile().rows.
constexpr int64_t kvcache_row_groups(int heads, int kv_heads, int len_q) {
  const int64_t group = kv_heads > 0 ? heads / kv_heads : 1;
  return ceil_div64(group * len_q, kvcache_tile().rows);
}

template <class T>
constexpr size_t kvcache_smem_bytes(int head_dim) {
  return size_t(kvcache_tile().rows) * head_dim * 4 +
         size_t(kvcache_tile().stages) * 2 * kvcache_tile().chunk *
             size_t(smem_pitch(head_dim, int(sizeof(T)))) * sizeof(T);
}

// Number of key splits: enough blocks for two waves on the device, at least 128 keys per split
// (each split costs a partial write and a combine), at most 64 splits.
struct KvcacheSplit {
  int num_splits;
  int64_t split_len;  // keys per split, a multiple of the chunk
};

constexpr KvcacheSplit kvcache_split(int64_t blocks_without_split, int64_t max_keys, int num_sms) {
  const int chunk = kvcache_tile().chunk;
  if (max_keys <= 0 || blocks_without_split <= 0) return {1, chunk};
  int64_t want = ceil_div64(2 * int64_t(num_sms > 0 ? num_sms : 1), blocks_without_split);
  int64_t cap = ceil_div64(max_keys, 128);
  int64_t splits = want < cap ? want : cap;
  splits = splits < 64 ? splits : 64;
  splits = splits > 1 ? splits : 1;
  const int64_t len = round_up64(ceil_div64(max_keys, splits), chunk);
  return {int(ceil_div64(max_keys, len)), len};
}

// ---- layer norm ------------------------------------------------------------------------------
// A row lives in registers: threads_per_row = 32 * warps_per_row threads each hold vecs_per_thread
// 16-byte vectors. Rows longer than the largest config, or not 16-byte aligned, take the
// generic kernel (three passes over global memory).
struct NormConfig {
  int warps_per_row, vecs_per_thread, rows_per_block;
};
constexpr NormConfig kNormConfigs[6] = {
    {1, 1, 4}, {1, 4, 4}, {4, 4, 1}, {8, 4, 1}, {16, 4, 1}, {16, 8, 1},
};
// The backward of configs up to this index also sums grad_weight / grad_bias in registers (two
// accumulators of vecs_per_thread vectors per thread); above it the register file of 512-thread
// blocks is too small and a column kernel re-reads x and grad_out for them instead.
constexpr int kNormBwdFusedMaxConfig = 3;

constexpr int norm_config_index(int64_t n, int elem_bytes) {
  const int64_t vec = 16 / elem_bytes;
  for (int i = 0; i < 6; ++i) {
    if (n <= int64_t(kNormConfigs[i].warps_per_row) * 32 * kNormConfigs[i].vecs_per_thread * vec) {
      return i;
    }
  }
  return -1;
}

// Backward: blocks loop over rows with a stride; each writes per-column partial sums of
// grad_weight / grad_bias that a second kernel adds up in block order (deterministic). Two
// blocks per SM keep the partial buffer (blocks x N floats) small next to the gradients.
constexpr int norm_bwd_blocks(int64_t rows, int rows_per_block, int num_sms) {
  const int64_t need = ceil_div64(rows > 0 ? rows : 1, rows_per_block > 0 ? rows_per_block : 1);
  const int64_t want = 2 * int64_t(num_sms > 0 ? num_sms : 1);
  return int(need < want ? need : want);
}

// The generic (unaligned or very long rows) kernels: a block of norm_generic_threads per row.
constexpr int kNormGenericThreads = 256;

// Column kernel for grad_weight / grad_bias: a thread per column, rows split into chunks so
// that about 8 blocks of 256 threads per SM are busy; one partial row per chunk.
constexpr int norm_param_grad_splits(int64_t rows, int64_t cols, int num_sms) {
  const int64_t col_blocks = ceil_div64(cols > 0 ? cols : 1, 256);
  const int64_t want = ceil_div64(8 * int64_t(num_sms > 0 ? num_sms : 1), col_blocks);
  const int64_t max_splits = ceil_div64(rows > 0 ? rows : 1, 32);  // >= 32 rows per chunk
  int64_t s = want < max_splits ? want : max_splits;
  s = s < 1024 ? s : 1024;
  return int(s > 1 ? s : 1);
}

// ---- int8 ------------------------------------------------------------------------------------
// GEMM tiles over (M, N) with a 3-stage cp.async pipeline on 64-byte K slices.
struct Int8GemmTile {
  int block_m, block_n, block_k, warps_m, warps_n, stages;
};
constexpr Int8GemmTile kInt8GemmLarge = {128, 128, 64, 2, 4, 3};  // warp tile 64 x 32
constexpr Int8GemmTile kInt8GemmSmall = {64, 64, 64, 2, 2, 3};    // warp tile 32 x 32

constexpr int int8_gemm_smem_pitch(const Int8GemmTile& t) { return t.block_k + 16; }
constexpr size_t int8_gemm_smem_bytes(const Int8GemmTile& t) {
  return size_t(t.stages) * size_t(t.block_m + t.block_n) * size_t(int8_gemm_smem_pitch(t));
}

// The large tile once it alone fills the device, else the small one (more blocks).
constexpr bool int8_gemm_use_large(int64_t m, int64_t n, int num_sms) {
  return ceil_div64(m, kInt8GemmLarge.block_m) * ceil_div64(n, kInt8GemmLarge.block_n) >=
         int64_t(num_sms > 0 ? num_sms : 1);
}

// Weight-only linear: each warp produces wo_cols_per_warp output columns for up to wo_rows rows
// of x at a time; int8 weights are read once per group of wo_rows rows.
constexpr int kWoWarps = 4;
constexpr int kWoColsPerWarp = 4;
constexpr int kWoRows = 8;

}  // namespace fastattn::cuda
