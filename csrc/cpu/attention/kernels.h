// Attention kernels, written once and compiled twice by attention.cpp (the way ATen builds its
// CPU_CAPABILITY kernels): once portable, and once inside a `#pragma GCC target("avx512...")`
// region with FA_AVX512 defined, each time in its own namespace. The dispatcher picks one at run
// time (cpu_features.h). No include guards on purpose, here or in the headers below; the
// including file has already included every system/ATen header they use.
//
// Layout conventions (one query block of BM queries, one key block of BN keys):
//   the scores are computed transposed, S^T[key][query], with the queries along the 16 SIMD lanes.
//   That makes the online softmax purely vertical (row max / row sum of a query are lane-wise
//   max / add across key rows, no horizontal reductions), lets K and V be read as broadcast
//   operands straight from their strided storage (fp32), and the per-query state (running max,
//   sum, rescale factor) is one vector per 16 queries.
//   Q^T (E x BM), P^T (BN x BM) and O^T (Ev x BM) live in per-thread scratch; O^T is transposed
//   into the (B, H, L, Ev) output once per query block.
// bf16 operands use the pair-interleaved ("VNNI") layout on the lane side: Qp[e/2][query][2],
//   Pp[key/2][query][2]. K and V^T are packed once per (b, kv head, key block) and shared by every
//   query head of a GQA group: for AMX as 1 KiB tiles (16 rows x 32 bf16) in the order the tile
//   loads consume them, K as [key/16][E/32] and V^T as [Ev/16][key/32]; for vdpbf16ps row-major,
//   K [key][E padded to 32] and V^T [Ev padded][BN].
// fp32 / fp16 use fp32 FMA micro-kernels; bf16 uses them too on CPUs without bf16 instructions.

//
// The headers, in dependency order:
//   simd.h          16-lane vectors, exp2, element conversion, bf16 pair packing, transposes
//   microkernels.h  broadcast GEMM micro-kernels (fp32 FMA, vdpbf16ps)
//   amx.h           AMX tile configuration and tile products
//   tasks.h         visible key ranges, scratch, task schedule, query block state
//   pack.h          Q / mask / K / V operands in the kernels' layouts
//   softmax.h       the online softmax; P and the dropout draw as forward and backward compute them
//   forward.h       attention_fwd_impl
//   backward.h      attention_bwd_impl
//   decode.h        attention_decode_impl (KV cache)
#include "simd.h"
#include "microkernels.h"
#include "amx.h"
#include "tasks.h"
#include "pack.h"
#include "softmax.h"
#include "forward.h"
#include "backward.h"
#include "decode.h"

#undef FA_INLINE
#undef FA_INLINE_LAMBDA
