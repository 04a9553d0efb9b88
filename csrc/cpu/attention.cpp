// CPU kernels of fastattn::attention_fwd / attention_bwd / attention_kvcache (schemas and exact
// semantics in csrc/fastattn.cpp).
//
// Flash-style: per (batch, head, block of queries) an online softmax over blocks of keys, in
// per-thread scratch of a few block x block tiles; the L x S score matrix never exists.
// The kernels live in attention/*.h, compiled twice: portable, and with AVX-512 enabled
// through a target pragma on that region only (the rest of the file, and any CPU without
// AVX-512, stays on the baseline ISA). The instruction set is chosen at run time:
//   amx          bf16 Q.K^T and P.V on AMX tiles (fp32 accumulation)
//   avx512_bf16  bf16 Q.K^T and P.V with vdpbf16ps (fp32 accumulation)
//   avx512       fp32 FMA micro-kernels (fp32, fp16 converted to fp32, bf16 without bf16 units)
//   portable     plain loops
// FASTATTN_CPU_ISA caps the choice (cpu_features.h; for testing every path on one machine).
// Measured on the Sapphire Rapids-class CPU this was tuned on: vdpbf16ps runs at ~1/4 of the
// fp32 FMA throughput there (25-35 vs 100-150 GFLOP/s per core in a register-only loop), while
// AMX tiles reach ~1.5 TFLOP/s per core, so bf16 prefers AMX and falls back to vdpbf16ps only
// on CPUs without AMX (Zen 4, Cooper Lake), where vdpbf16ps is the fast instruction.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../checks.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_features.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTATTN_X86_KERNELS 1
#include <immintrin.h>
#endif

namespace fastattn::cpu {

// ---- arguments shared by both builds of the kernels ------------------------------------------
// Dropout: keep (b, h, i, j) iff hash(seed, b*H + h, i, j) >> 8 >= threshold (a counter-based
// hash: no state, the same draw in the forward and in both backward passes, for any blocking).
inline uint32_t fmix32(uint32_t x) {  // murmur3 finaliser
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}
constexpr uint32_t kGolden32 = 0x9e3779b9u;

struct Dropout {
  bool on = false;
  uint32_t threshold = 0;  // dropout_p * 2^24
  float inv_keep = 1.f;    // 1 / (1 - dropout_p)
  uint64_t seed = 0;
  uint32_t key(int64_t bh) const {  // splitmix64 of (seed, b*H + h)
    uint64_t z = seed + static_cast<uint64_t>(bh + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return static_cast<uint32_t>(z ^ (z >> 31));
  }
  static uint32_t row(uint32_t k, int64_t i) { return fmix32(k ^ static_cast<uint32_t>(i)); }
  // the kernels evaluate this lane-wise: fmix32(row + j * golden) >> 8
  static uint32_t cell(uint32_t r, int64_t j) {
    return fmix32(r + static_cast<uint32_t>(j) * kGolden32) >> 8;
  }
  bool keep(uint32_t r, int64_t j) const { return !on || cell(r, j) >= threshold; }
};

inline Dropout make_dropout(double dropout_p, int64_t seed) {
  Dropout d;
  d.on = dropout_p > 0.0;
  if (d.on) {
    d.threshold = static_cast<uint32_t>(std::min(dropout_p * 16777216.0, 16777215.0));
    d.inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
    d.seed = static_cast<uint64_t>(seed);
  }
  return d;
}

struct AttnArgs {
  int64_t B, H, Hkv, L, S, E, Ev;
  const void* q;
  const void* k;
  const void* v;
  const void*
      mask;  // additive, q's dtype, (B, H, L, S) by strides (0 on broadcast dims); nullptr if none
  int64_t sq[4], sk[4], sv[4], sm[4];  // element strides
  int64_t so[3];  // out strides over (b, h, l); its last dim is contiguous
  float scale;
  int64_t wl, wr, off;  // window_left, window_right (-1: unbounded), diag_offset
  Dropout drop;
  // score modifiers (fastattn.cpp): x = scale * q.k -> softcap * tanh(x / softcap) (softcap > 0)
  // -> x - alibi[b * alibi_sb + h] * |i + off - j| (alibi != nullptr); sinks[h] joins each row's
  // softmax denominator (sinks != nullptr)
  float softcap = 0.f;
  const float* alibi = nullptr;
  int64_t alibi_sb = 0;
  const float* sinks = nullptr;
  bool mods() const { return softcap > 0.f || alibi != nullptr; }
  float slope(int64_t b, int64_t h) const { return alibi ? alibi[b * alibi_sb + h] : 0.f; }
  // attention_varlen: B == 1 and L, S are the packed lengths. Query row i belongs to sequence
  // s = vseq[i] of vnseq, whose rows are [vq[s], vq[s + 1]) and keys [vk[s], vk[s + 1]); it sees
  // only those keys, key j at distance i + voff[s] - j (voff[s]: the sequence's diagonal
  // offset, in packed rows), and its ALiBi slopes are row s of alibi. vmax_q / vmax_k: the
  // longest sequence's rows / keys (the block sizes follow them).
  const int32_t* vseq = nullptr;
  const int64_t* vq = nullptr;
  const int64_t* vk = nullptr;
  const int64_t* voff = nullptr;
  int64_t vnseq = 0, vmax_q = 0, vmax_k = 0;
  bool varlen() const { return vseq != nullptr; }
};

// attention_kvcache's append of the Lnew rows of k_new / v_new at seqlens[b] (decode.h:
// kvcache_prepare_impl), into the paged cache when block_table != nullptr, with the rotary
// embedding when half > 0: k_new token i rotated on its way into the cache at position
// seqlens[b] - leftpad[b] + i, q token i (the last Lq of the new tokens) rotated into qrot
// ((B, H, Lq, E) contiguous) at seqlens[b] - leftpad[b] + Lnew - Lq + i (clamped at 0).
struct KvPrepArgs {
  int64_t B, H, Hkv, Lq, E, Ev;
  int64_t Lnew;
  const void* q;  // read only with rotary
  const void* kn;  // nullptr: nothing to append
  const void* vn;
  void* kc;
  void* vc;
  int64_t sq[4], skn[4], svn[4], skc[4], svc[4];  // element strides
  const int32_t* seqlens;
  const int32_t* leftpad;  // nullptr: no left padding
  const void* cos;  // (max_pos, half) tables, float32 or T; half == 0: no rotary
  const void* sin;
  int64_t scos[2], ssin[2];
  int64_t half;
  bool interleaved;
  void* qrot;  // nullptr without rotary
  const int32_t* block_table = nullptr;  // (B, max_blocks) at row stride bt_stride
  int64_t bt_stride = 0, block_size = 0;
};

// attention_kvcache's paged cache (block_table (B, max_blocks) int32, row stride stride_b, caches
// (num_blocks, Hkv, block_size, E)); table == nullptr: contiguous caches (B, Hkv, capacity, E)
struct KvPages {
  const int32_t* table = nullptr;
  int64_t stride_b = 0, block_size = 0;
};

enum class Path { f32, dpbf16, amx };

namespace portable {
#include "attention/kernels.h"
}  // namespace portable

#ifdef FASTATTN_X86_KERNELS
// The portable loops once more, vectorised for AVX2 + FMA: CPUs without AVX-512 run these.
// Measured on a 2-core AVX2 EPYC, decoding (9 heads over 3 KV heads, E = 64, 1,000 keys): the
// baseline (SSE2) build reached half of F.scaled_dot_product_attention's rate.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "attention/kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

#ifdef FASTATTN_X86_KERNELS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,bmi2,avx512bf16,amx-tile,amx-bf16")
// GCC 12 reports its own _mm512_undefined_*() placeholders inside the intrinsics as uninitialised,
// and a null optional pointer on a branch not taken as out of bounds; both are false positives
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Warray-bounds"
namespace avx512 {
#define FA_AVX512
#include "attention/kernels.h"
#undef FA_AVX512
}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace {

// ---- argument checks -------------------------------------------------------------------------
void check_float_cpu(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.defined(), "fastattn::attention (cpu): ", name, " must be a defined tensor");
  TORCH_CHECK(t.device().is_cpu(), "fastattn::attention (cpu): ", name,
              " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dim, "fastattn::attention (cpu): ", name, " must be ", dim,
              "-D, got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "fastattn::attention (cpu): ", name, " must be float32, bfloat16 or float16, got ",
              dt);
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastattn::attention (cpu): ", name,
              " must have q's dtype (", ref.scalar_type(), "), got ", t.scalar_type());
}

// the (B, H) slopes and (H,) sinks as the kernels read them: float32 (checked by the op layer)
void set_mods(AttnArgs& a, double softcap, const std::optional<at::Tensor>& alibi_slopes,
              const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0,
              "fastattn::attention (cpu): softcap must be finite and >= 0 (0: none), got ", softcap);
  a.softcap = static_cast<float>(softcap);
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const at::Tensor& s = *alibi_slopes;
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.dim() == 2 &&
                    s.size(0) == a.B && s.size(1) == a.H && (a.H <= 1 || s.stride(1) == 1),
                "fastattn::attention (cpu): alibi_slopes must be a float32 CPU tensor (B, H) = (",
                a.B, ", ", a.H, ") with unit head stride, got ", s.scalar_type(), " ", s.sizes());
    a.alibi = s.data_ptr<float>();
    a.alibi_sb = a.B <= 1 ? 0 : s.stride(0);
  }
  if (sinks.has_value() && sinks->defined()) {
    const at::Tensor& s = *sinks;
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.dim() == 1 &&
                    s.size(0) == a.H && s.is_contiguous(),
                "fastattn::attention (cpu): sinks must be a contiguous float32 CPU tensor (H,) = (",
                a.H, ",), got ", s.scalar_type(), " ", s.sizes());
    a.sinks = s.data_ptr<float>();
  }
}

AttnArgs make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& attn_mask, double scale, int64_t window_left,
                   int64_t window_right, int64_t diag_offset, double dropout_p, int64_t seed) {
  check_float_cpu(q, "q", 4);
  check_float_cpu(k, "k", 4);
  check_float_cpu(v, "v", 4);
  check_same_dtype(k, q, "k");
  check_same_dtype(v, q, "v");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "fastattn::attention (cpu): batch sizes differ: q ",
              B, ", k ", k.size(0), ", v ", v.size(0));
  TORCH_CHECK(k.size(3) == E, "fastattn::attention (cpu): k.size(3) (", k.size(3),
              ") must equal q.size(3) (", E, ")");
  TORCH_CHECK(v.size(1) == Hkv && v.size(2) == S,
              "fastattn::attention (cpu): v must be (B, Hkv, S, Ev) with k's Hkv=", Hkv,
              " and S=", S, ", got ", v.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "fastattn::attention (cpu): q heads (", H,
              ") must be a multiple of k/v heads (", Hkv, ")");
  TORCH_CHECK(std::isfinite(scale), "fastattn::attention (cpu): scale must be finite, got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0,
              "fastattn::attention (cpu): dropout_p must be in [0, 1), got ", dropout_p);
  AttnArgs a{};
  a.B = B;
  a.H = H;
  a.Hkv = Hkv;
  a.L = L;
  a.S = S;
  a.E = E;
  a.Ev = Ev;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  for (int d = 0; d < 4; ++d) {
    a.sq[d] = q.stride(d);
    a.sk[d] = k.stride(d);
    a.sv[d] = v.stride(d);
  }
  a.mask = nullptr;
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK(m.device().is_cpu(),
                "fastattn::attention (cpu): attn_mask must be a CPU tensor, got ", m.device());
    TORCH_CHECK(m.scalar_type() == q.scalar_type(),
                "fastattn::attention (cpu): attn_mask must be an additive mask in q's dtype (",
                q.scalar_type(), "), got ", m.scalar_type());
    TORCH_CHECK(
        m.dim() == 4 && m.size(0) == B && m.size(1) == H && m.size(2) == L && m.size(3) == S,
        "fastattn::attention (cpu): attn_mask must be expanded to (B, H, L, S) = (", B, ", ", H,
        ", ", L, ", ", S, "), got ", m.sizes());
    a.mask = m.data_ptr();
    for (int d = 0; d < 4; ++d) a.sm[d] = m.stride(d);
  }
  a.scale = static_cast<float>(scale);
  a.wl = window_left < 0 ? -1 : window_left;
  a.wr = window_right < 0 ? -1 : window_right;
  a.off = diag_offset;
  a.drop = make_dropout(dropout_p, seed);
  return a;
}

// ---- dispatch --------------------------------------------------------------------------------
template <typename T, typename C>
void kvcache_prepare(const KvPrepArgs& a) {
  const Isa isa = cpu_isa();
#ifdef FASTATTN_X86_KERNELS
  if (isa >= Isa::avx512) return avx512::kvcache_prepare_impl<T, C>(a);
  if (isa >= Isa::avx2) return avx2::kvcache_prepare_impl<T, C>(a);
#endif
  (void)isa;
  portable::kvcache_prepare_impl<T, C>(a);
}

template <typename T>
void fwd_dispatch(const AttnArgs& a, T* out, float* lse) {
  const Isa isa = cpu_isa();
#ifdef FASTATTN_X86_KERNELS
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (isa >= Isa::amx) return avx512::attention_fwd_impl<T, Path::amx>(a, out, lse);
    if (isa >= Isa::avx512_bf16) return avx512::attention_fwd_impl<T, Path::dpbf16>(a, out, lse);
  }
  if (isa >= Isa::avx512) return avx512::attention_fwd_impl<T, Path::f32>(a, out, lse);
  if (isa >= Isa::avx2) return avx2::attention_fwd_impl<T, Path::f32>(a, out, lse);
#endif
  (void)isa;
  portable::attention_fwd_impl<T, Path::f32>(a, out, lse);
}

template <typename F>
void dispatch_dtype(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "fastattn::attention (cpu): unsupported dtype ", dt);
  }
}

// ---- ops -------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, double scale, int64_t window_left,
    int64_t window_right, int64_t diag_offset, double dropout_p, int64_t seed, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
  AttnArgs a =
      make_args(q, k, v, attn_mask, scale, window_left, window_right, diag_offset, dropout_p, seed);
  set_mods(a, softcap, alibi_slopes, sinks);
  // (B, H, L, Ev) stored token-major, as (B, L, H, Ev): the (B, L, H * Ev) rows the output
  // projection reads are then a view (torch's CPU flash attention returns the same layout)
  at::Tensor out = at::empty({a.B, a.L, a.H, a.Ev}, q.options()).transpose(1, 2);
  for (int d = 0; d < 3; ++d) a.so[d] = out.stride(d);
  at::Tensor lse = at::empty({a.B, a.H, a.L}, q.options().dtype(at::kFloat));
  if (a.B * a.H * a.L == 0) return {out, lse};
  if (a.S == 0) {  // no key at all: every row is empty (lse: the sink, where there is one)
    out.zero_();
    if (a.sinks)
      lse.copy_(sinks->view({1, a.H, 1}).expand({a.B, a.H, a.L}));
    else
      lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    fwd_dispatch<T>(a, static_cast<T*>(out.data_ptr()), lse.data_ptr<float>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const std::optional<at::Tensor>& attn_mask, double scale, int64_t window_left,
    int64_t window_right, int64_t diag_offset, double dropout_p, int64_t seed, bool compute_dmask,
    bool deterministic, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& sinks) {
  // every reduction runs in a fixed order on one thread: the result is bitwise repeatable for
  // any thread count whether or not `deterministic` is set
  (void)deterministic;
  AttnArgs a =
      make_args(q, k, v, attn_mask, scale, window_left, window_right, diag_offset, dropout_p, seed);
  set_mods(a, softcap, alibi_slopes, sinks);
  check_float_cpu(grad_out, "grad_out", 4);
  check_float_cpu(out, "out", 4);
  check_same_dtype(grad_out, q, "grad_out");
  check_same_dtype(out, q, "out");
  const std::vector<int64_t> oshape{a.B, a.H, a.L, a.Ev}, lshape{a.B, a.H, a.L};
  TORCH_CHECK(grad_out.sizes() == oshape,
              "fastattn::attention_bwd (cpu): grad_out must be (B, H, L, Ev) = ", oshape, ", got ",
              grad_out.sizes());
  TORCH_CHECK(out.sizes() == oshape,
              "fastattn::attention_bwd (cpu): out must be (B, H, L, Ev) = ", oshape, ", got ",
              out.sizes());
  TORCH_CHECK(
      lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.sizes() == lshape,
      "fastattn::attention_bwd (cpu): lse must be a float32 CPU tensor of shape (B, H, L) = ",
      lshape, ", got ", lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  at::Tensor glse;
  if (grad_lse.has_value() && grad_lse->defined()) {
    TORCH_CHECK(grad_lse->device().is_cpu() && grad_lse->scalar_type() == at::kFloat &&
                    grad_lse->sizes() == lshape,
                "fastattn::attention_bwd (cpu): grad_lse must be a float32 CPU tensor of shape (B, "
                "H, L) = ",
                lshape, ", got ", grad_lse->scalar_type(), " ", grad_lse->sizes());
    glse = grad_lse->contiguous();
  }
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::empty({a.B, a.H, a.L, a.E}, q.options());
  at::Tensor dk = at::empty({a.B, a.Hkv, a.S, a.E}, q.options());
  at::Tensor dv = at::empty({a.B, a.Hkv, a.S, a.Ev}, q.options());
  const bool want_dmask = compute_dmask && a.mask != nullptr;
  at::Tensor dmask = want_dmask ? at::zeros({a.B, a.H, a.L, a.S}, attn_mask->options())
                                : at::empty({0}, q.options());
  at::Tensor dsinks = at::zeros({a.sinks ? a.H : 0}, q.options().dtype(at::kFloat));
  if (a.B * a.H * a.L == 0 || a.S == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    // no key: out = 0, lse = sink, p_sink = 1, so dsink = sum of grad_lse
    if (a.sinks && glse.defined() && a.B * a.H * a.L > 0) dsinks.copy_(glse.sum({0, 2}));
    return {dq, dk, dv, dmask, dsinks};
  }
  const Isa isa = cpu_isa();
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* go = static_cast<const T*>(grad_out.data_ptr());
    const T* op = static_cast<const T*>(out.data_ptr());
    const int64_t sdo[4] = {grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
                            grad_out.stride(3)};
    const int64_t so[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
    const float* gl = glse.defined() ? glse.data_ptr<float>() : nullptr;
    T* dmp = want_dmask ? static_cast<T*>(dmask.data_ptr()) : nullptr;
    float* dsp = a.sinks ? dsinks.data_ptr<float>() : nullptr;
#ifdef FASTATTN_X86_KERNELS
    if (isa >= Isa::avx512) {
      avx512::attention_bwd_impl<T>(a, go, sdo, op, so, lse_c.data_ptr<float>(), gl,
                                    static_cast<T*>(dq.data_ptr()), static_cast<T*>(dk.data_ptr()),
                                    static_cast<T*>(dv.data_ptr()), dmp, dsp);
      return;
    }
    if (isa >= Isa::avx2) {
      avx2::attention_bwd_impl<T>(a, go, sdo, op, so, lse_c.data_ptr<float>(), gl,
                                  static_cast<T*>(dq.data_ptr()), static_cast<T*>(dk.data_ptr()),
                                  static_cast<T*>(dv.data_ptr()), dmp, dsp);
      return;
    }
#endif
    (void)isa;
    portable::attention_bwd_impl<T>(a, go, sdo, op, so, lse_c.data_ptr<float>(), gl,
                                    static_cast<T*>(dq.data_ptr()), static_cast<T*>(dk.data_ptr()),
                                    static_cast<T*>(dv.data_ptr()), dmp, dsp);
  });
  return {dq, dk, dv, dmask, dsinks};
}

// attention_kvcache and attention_kvcache_lse (want_lse): out, and lse (B, H, Lq) float32 or an
// undefined tensor
std::tuple<at::Tensor, at::Tensor> attention_kvcache_impl(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new, double scale,
    bool causal, const std::optional<at::Tensor>& cache_leftpad,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
    bool rotary_interleaved, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& block_table,
    int64_t window_left, int64_t window_right, bool want_lse) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal tensors need no tracking
  checks::check_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, cache_leftpad,
                        rotary_cos, rotary_sin, softcap, alibi_slopes, sinks, block_table,
                        window_left, window_right);
  check_float_cpu(q, "q", 4);  // the CPU kernels' dtypes and device
  check_float_cpu(k_cache, "k_cache", 4);
  check_float_cpu(v_cache, "v_cache", 4);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), E = q.size(3);
  const int64_t Hkv = k_cache.size(1), Ev = v_cache.size(3);
  const bool has_new = k_new.has_value();
  const int64_t Lnew = has_new ? k_new->size(2) : 0;
  // visible keys of sequence b: [begin[b], total[b]) (check_kvcache checked the ranges)
  const at::Tensor sl = cache_seqlens.contiguous();
  const int32_t* slp = sl.data_ptr<int32_t>();
  std::vector<int64_t> total(static_cast<size_t>(B)), begin(static_cast<size_t>(B), 0);
  for (int64_t b = 0; b < B; ++b) total[static_cast<size_t>(b)] = slp[b] + Lnew;
  at::Tensor lp;
  const int32_t* lpp = nullptr;
  if (cache_leftpad.has_value()) {
    lp = cache_leftpad->contiguous();
    lpp = lp.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) begin[static_cast<size_t>(b)] = lpp[b];
  }
  // the paged cache: block_table's entries were checked against the pool (check_kvcache)
  at::Tensor bt;
  KvPages pages;
  if (block_table.has_value()) {
    bt = block_table->contiguous();
    pages.table = bt.data_ptr<int32_t>();
    pages.stride_b = bt.size(1);
    pages.block_size = k_cache.size(2);
  }
  at::Tensor out = at::empty({B, H, Lq, Ev}, q.options());
  at::Tensor lse = want_lse ? at::empty({B, H, Lq}, q.options().dtype(at::kFloat)) : at::Tensor();
  if (out.numel() == 0 && !has_new) {
    if (want_lse) lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  // check_kvcache: both tables or neither, only with k_new, q's dtype or float32
  const bool rotary = rotary_cos.has_value() && has_new;
  // the window as attention_fwd's rules, bottom-right; causal folded into its right side
  const int64_t wl = window_left;
  const int64_t wr =
      causal ? (window_right < 0 ? 0 : std::min<int64_t>(window_right, 0)) : window_right;

  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    // the q rows rotated, read by the attention kernels in place of q
    std::unique_ptr<T[]> qrot(rotary && q.numel() > 0 ? new T[static_cast<size_t>(q.numel())]
                                                      : nullptr);
    if (has_new) {  // append in place (rotating k_new), and rotate q
      KvPrepArgs pa{};
      pa.B = B, pa.H = H, pa.Hkv = Hkv, pa.Lq = Lq, pa.E = E, pa.Ev = Ev, pa.Lnew = Lnew;
      pa.q = q.data_ptr(), pa.kn = k_new->data_ptr(), pa.vn = v_new->data_ptr();
      pa.kc = k_cache.data_ptr(), pa.vc = v_cache.data_ptr();
      for (int d = 0; d < 4; ++d) {
        pa.sq[d] = q.stride(d), pa.skn[d] = k_new->stride(d), pa.svn[d] = v_new->stride(d);
        pa.skc[d] = k_cache.stride(d), pa.svc[d] = v_cache.stride(d);
      }
      pa.seqlens = slp, pa.leftpad = lpp;
      pa.block_table = pages.table, pa.bt_stride = pages.stride_b;
      pa.block_size = pages.block_size;
      bool f32_tables = false;
      if (rotary) {
        pa.cos = rotary_cos->data_ptr(), pa.sin = rotary_sin->data_ptr();
        for (int d = 0; d < 2; ++d)
          pa.scos[d] = rotary_cos->stride(d), pa.ssin[d] = rotary_sin->stride(d);
        pa.half = rotary_cos->size(1);
        pa.interleaved = rotary_interleaved;
        pa.qrot = qrot.get();
        f32_tables = rotary_cos->scalar_type() == at::kFloat;
      }
      if (f32_tables)
        kvcache_prepare<T, float>(pa);
      else
        kvcache_prepare<T, T>(pa);
    }
    if (out.numel() == 0) {  // (Ev = 0 or no query rows: the append only)
      if (want_lse) lse.fill_(-std::numeric_limits<float>::infinity());
      return;
    }
    // the whole cache as keys (S = capacity, no mask/dropout); the per-sequence lengths are
    // passed to the kernels separately
    // a paged pool (num_blocks, ...) goes in as a (B, ...) view with the batch stride zero;
    // the kernels step blocks by the pool's stride
    auto batch_view = [&](const at::Tensor& c) {
      return pages.table == nullptr
                 ? c
                 : c.as_strided({B, c.size(1), c.size(2), c.size(3)},
                                {0, c.stride(1), c.stride(2), c.stride(3)}, c.storage_offset());
    };
    AttnArgs a = make_args(q, batch_view(k_cache), batch_view(v_cache), std::nullopt, scale, wl,
                           wr, 0, 0.0, 0);
    if (pages.table != nullptr) a.sk[0] = k_cache.stride(0), a.sv[0] = v_cache.stride(0);
    // (H,) slopes as a (B, H) view with a zero batch stride; unit head strides for the kernels
    std::optional<at::Tensor> slopes;
    if (alibi_slopes.has_value()) {
      slopes = alibi_slopes->contiguous();
      if (slopes->dim() == 1) slopes = slopes->unsqueeze(0).expand({B, H});
    }
    const at::Tensor sinks_c = sinks.has_value() ? sinks->contiguous() : at::Tensor();
    set_mods(a, softcap, slopes,
             sinks_c.defined() ? std::optional<at::Tensor>(sinks_c) : std::nullopt);
    for (int d = 0; d < 3; ++d) a.so[d] = out.stride(d);
    if (qrot) {
      a.q = qrot.get();
      a.sq[3] = 1, a.sq[2] = E, a.sq[1] = Lq * E, a.sq[0] = H * Lq * E;
    }
    T* op = static_cast<T*>(out.data_ptr());
    float* lp_out = want_lse ? lse.data_ptr<float>() : nullptr;
    const Isa isa = cpu_isa();
    if ((H / Hkv) * Lq <= 16) {
#ifdef FASTATTN_X86_KERNELS
      if (isa >= Isa::avx512)
        return avx512::attention_decode_impl<T>(a, begin.data(), total.data(), Lq, causal, pages,
                                                op, lp_out);
      if (isa >= Isa::avx2)
        return avx2::attention_decode_impl<T>(a, begin.data(), total.data(), Lq, causal, pages,
                                              op, lp_out);
#endif
      (void)isa;
      return portable::attention_decode_impl<T>(a, begin.data(), total.data(), Lq, causal, pages,
                                                op, lp_out);
    }
    // many query rows per kv head (prefill against a cache): the blocked forward, per sequence.
    // A paged sequence's visible keys are gathered into one contiguous buffer first: a copy of
    // (S, E) rows against Lq * S * E multiply-adds of the GEMM-rate kernel.
    std::vector<float> lse_scratch(want_lse ? 0 : static_cast<size_t>(H * Lq));
    for (int64_t b = 0; b < B; ++b) {
      AttnArgs ab = a;
      ab.B = 1;
      // the visible keys [begin, total) as a sequence of their own: bottom-right alignment is
      // relative to its end, so it is unchanged
      const int64_t kb = begin[static_cast<size_t>(b)];
      ab.S = total[static_cast<size_t>(b)] - kb;
      ab.q = static_cast<const T*>(a.q) + b * a.sq[0];
      ab.off = ab.S - Lq;
      if (a.alibi) ab.alibi = a.alibi + b * a.alibi_sb;
      T* ob = op + b * H * Lq * Ev;
      float* lb = want_lse ? lp_out + b * H * Lq : lse_scratch.data();
      if (ab.S == 0) {  // no key: out = 0 (with or without a sink)
        std::fill(ob, ob + H * Lq * Ev, T(0.f));
        for (int64_t h = 0; h < H; ++h)
          std::fill(lb + h * Lq, lb + (h + 1) * Lq,
                    a.sinks ? a.sinks[h] : -std::numeric_limits<float>::infinity());
        continue;
      }
      at::Tensor kg, vg;  // paged: the gathered keys / values, (Hkv, S, E[v]) contiguous
      if (pages.table != nullptr) {
        kg = at::empty({Hkv, ab.S, E}, q.options());
        vg = at::empty({Hkv, ab.S, Ev}, q.options());
        T* kd = static_cast<T*>(kg.data_ptr());
        T* vd = static_cast<T*>(vg.data_ptr());
        const T* kc = static_cast<const T*>(a.k);
        const T* vc = static_cast<const T*>(a.v);
        const int32_t* row = pages.table + b * pages.stride_b;
        at::parallel_for(0, Hkv * ab.S, 1024, [&](int64_t x0, int64_t x1) {
          for (int64_t x = x0; x < x1; ++x) {
            const int64_t h = x / ab.S, t = kb + x % ab.S;
            const int64_t blk = row[t / pages.block_size], slot = t % pages.block_size;
            portable::copy_row(kc + blk * a.sk[0] + h * a.sk[1] + slot * a.sk[2], a.sk[3], E,
                               kd + x * E, int64_t{1});
            portable::copy_row(vc + blk * a.sv[0] + h * a.sv[1] + slot * a.sv[2], a.sv[3], Ev,
                               vd + x * Ev, int64_t{1});
          }
        });
        ab.k = kd, ab.v = vd;
        ab.sk[0] = Hkv * ab.S * E, ab.sk[1] = ab.S * E, ab.sk[2] = E, ab.sk[3] = 1;
        ab.sv[0] = Hkv * ab.S * Ev, ab.sv[1] = ab.S * Ev, ab.sv[2] = Ev, ab.sv[3] = 1;
      } else {
        ab.k = static_cast<const T*>(a.k) + b * a.sk[0] + kb * a.sk[2];
        ab.v = static_cast<const T*>(a.v) + b * a.sv[0] + kb * a.sv[2];
      }
      fwd_dispatch<T>(ab, ob, lb);
    }
  });
  return {out, lse};
}

at::Tensor attention_kvcache(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                             const at::Tensor& cache_seqlens,
                             const std::optional<at::Tensor>& k_new,
                             const std::optional<at::Tensor>& v_new, double scale, bool causal,
                             const std::optional<at::Tensor>& cache_leftpad,
                             const std::optional<at::Tensor>& rotary_cos,
                             const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
                             double softcap, const std::optional<at::Tensor>& alibi_slopes,
                             const std::optional<at::Tensor>& sinks,
                             const std::optional<at::Tensor>& block_table, int64_t window_left,
                             int64_t window_right) {
  return std::get<0>(attention_kvcache_impl(
      q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal, cache_leftpad, rotary_cos,
      rotary_sin, rotary_interleaved, softcap, alibi_slopes, sinks, block_table, window_left,
      window_right, false));
}

std::tuple<at::Tensor, at::Tensor> attention_kvcache_lse(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new, double scale,
    bool causal, const std::optional<at::Tensor>& cache_leftpad,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
    bool rotary_interleaved, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& block_table,
    int64_t window_left, int64_t window_right) {
  return attention_kvcache_impl(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal,
                                cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved, softcap,
                                alibi_slopes, sinks, block_table, window_left, window_right, true);
}

// ---- attention_varlen ------------------------------------------------------------------------
// The packed sequences run as one (1, H, total_q, E) x (1, Hkv, total_k, E) call of the sdpa
// kernels whose query rows see only the keys of their own sequence (AttnArgs' varlen fields):
// one schedule of (sequence, head, query block) tasks over all the sequences, K/V converted or
// packed once, dropout / deterministic mode / score modifiers exactly as for sdpa.
struct VarlenLayout {
  std::vector<int32_t> seq;         // packed query row -> its sequence
  std::vector<int64_t> cq, ck, off;  // (B + 1) row and key offsets; (B) diagonal offsets
  int64_t max_q = 0, max_k = 0;
};

VarlenLayout varlen_layout(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                           bool bottom_right) {
  // (checks::check_varlen has checked the values: 0 first, non-decreasing, the totals last)
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
  const int32_t* pq = cq.const_data_ptr<int32_t>();
  const int32_t* pk = ck.const_data_ptr<int32_t>();
  const int64_t B = cq.numel() - 1;
  VarlenLayout v;
  v.cq.assign(pq, pq + B + 1);
  v.ck.assign(pk, pk + B + 1);
  v.off.resize(static_cast<size_t>(B));
  v.seq.resize(static_cast<size_t>(v.cq[static_cast<size_t>(B)]));
  for (int64_t b = 0; b < B; ++b) {
    const size_t u = static_cast<size_t>(b);
    const int64_t L = v.cq[u + 1] - v.cq[u], S = v.ck[u + 1] - v.ck[u];
    v.max_q = std::max(v.max_q, L);
    v.max_k = std::max(v.max_k, S);
    // query i (local) sits at key position i (top-left) or i + S - L (bottom-right) of its own
    // sequence: i + off in packed coordinates
    v.off[u] = v.ck[u] - v.cq[u] + (bottom_right ? S - L : 0);
    std::fill(v.seq.begin() + v.cq[u], v.seq.begin() + v.cq[u + 1], static_cast<int32_t>(b));
  }
  return v;
}

// (total, heads, dim) -> the (1, heads, total, dim) view the kernels index
at::Tensor as_bhld(const at::Tensor& t) { return t.unsqueeze(0).transpose(1, 2); }

AttnArgs make_varlen_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const VarlenLayout& lay, double scale, int64_t window_left,
                          int64_t window_right, double dropout_p, int64_t seed, double softcap,
                          const std::optional<at::Tensor>& alibi_slopes,
                          const std::optional<at::Tensor>& sinks) {
  check_float_cpu(q, "q", 3);
  check_float_cpu(k, "k", 3);
  check_float_cpu(v, "v", 3);
  AttnArgs a = make_args(as_bhld(q), as_bhld(k), as_bhld(v), std::nullopt, scale, window_left,
                         window_right, 0, dropout_p, seed);
  set_mods(a, softcap, std::nullopt, sinks);
  const int64_t B = static_cast<int64_t>(lay.off.size());
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const at::Tensor& s = *alibi_slopes;  // (B, H) by strides, one row per sequence
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.dim() == 2 &&
                    s.size(0) == B && s.size(1) == a.H && (a.H <= 1 || s.stride(1) == 1),
                "fastattn::attention_varlen (cpu): alibi_slopes must be a float32 CPU tensor (B, "
                "H) = (", B, ", ", a.H, ") with unit head stride, got ", s.scalar_type(), " ",
                s.sizes());
    a.alibi = s.data_ptr<float>();
    a.alibi_sb = B <= 1 ? 0 : s.stride(0);
  }
  a.vseq = lay.seq.data();
  a.vq = lay.cq.data();
  a.vk = lay.ck.data();
  a.voff = lay.off.data();
  a.vnseq = B;
  a.vmax_q = lay.max_q;
  a.vmax_k = lay.max_k;
  return a;
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p, int64_t seed,
    double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& sinks) {
  checks::check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                       dropout_p, softcap, alibi_slopes, sinks);
  const VarlenLayout lay = varlen_layout(cu_seqlens_q, cu_seqlens_k, bottom_right);
  AttnArgs a = make_varlen_args(q, k, v, lay, scale, window_left, window_right, dropout_p, seed,
                                softcap, alibi_slopes, sinks);
  // out (total_q, H, Ev) contiguous: the (total_q, H * Ev) rows of the output projection
  at::Tensor out = at::empty({a.L, a.H, a.Ev}, q.options());
  const at::Tensor out4 = as_bhld(out);
  for (int d = 0; d < 3; ++d) a.so[d] = out4.stride(d);
  at::Tensor lse = at::empty({a.H, a.L}, q.options().dtype(at::kFloat));
  if (a.H * a.L == 0) return {out, lse};
  if (a.S == 0) {  // no key in any sequence: every row is empty (lse: the sink, if any)
    out.zero_();
    if (a.sinks)
      lse.copy_(sinks->view({a.H, 1}).expand({a.H, a.L}));
    else
      lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    fwd_dispatch<T>(a, static_cast<T*>(out.data_ptr()), lse.data_ptr<float>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double dropout_p, int64_t seed, bool deterministic, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
  // as attention_bwd: every reduction runs in a fixed order, bitwise repeatable either way
  (void)deterministic;
  checks::check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                       dropout_p, softcap, alibi_slopes, sinks);
  const VarlenLayout lay = varlen_layout(cu_seqlens_q, cu_seqlens_k, bottom_right);
  AttnArgs a = make_varlen_args(q, k, v, lay, scale, window_left, window_right, dropout_p, seed,
                                softcap, alibi_slopes, sinks);
  check_float_cpu(grad_out, "grad_out", 3);
  check_float_cpu(out, "out", 3);
  check_same_dtype(grad_out, q, "grad_out");
  check_same_dtype(out, q, "out");
  const std::vector<int64_t> oshape{a.L, a.H, a.Ev}, lshape{a.H, a.L};
  TORCH_CHECK(grad_out.sizes() == oshape,
              "fastattn::attention_varlen_bwd (cpu): grad_out must be (total_q, H, Ev) = ", oshape,
              ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == oshape,
              "fastattn::attention_varlen_bwd (cpu): out must be (total_q, H, Ev) = ", oshape,
              ", got ", out.sizes());
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.sizes() == lshape,
              "fastattn::attention_varlen_bwd (cpu): lse must be a float32 CPU tensor of shape "
              "(H, total_q) = ", lshape, ", got ", lse.scalar_type(), " ", lse.sizes());
  at::Tensor glse;
  if (grad_lse.has_value() && grad_lse->defined()) {
    TORCH_CHECK(grad_lse->device().is_cpu() && grad_lse->scalar_type() == at::kFloat &&
                    grad_lse->sizes() == lshape,
                "fastattn::attention_varlen_bwd (cpu): grad_lse must be a float32 CPU tensor of "
                "shape (H, total_q) = ", lshape, ", got ", grad_lse->scalar_type(), " ",
                grad_lse->sizes());
    glse = grad_lse->contiguous();
  }
  const at::Tensor lse_c = lse.contiguous();
  // the kernels write (1, H, total, E) rows: returned as (total, H, E) views
  at::Tensor dq = at::empty({a.H, a.L, a.E}, q.options());
  at::Tensor dk = at::empty({a.Hkv, a.S, a.E}, q.options());
  at::Tensor dv = at::empty({a.Hkv, a.S, a.Ev}, q.options());
  at::Tensor dsinks = at::zeros({a.sinks ? a.H : 0}, q.options().dtype(at::kFloat));
  if (a.H * a.L == 0 || a.S == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    // no key: out = 0, lse = sink, p_sink = 1, so dsink = sum of grad_lse
    if (a.sinks && glse.defined() && a.H * a.L > 0) dsinks.copy_(glse.sum({1}));
    return {dq.transpose(0, 1), dk.transpose(0, 1), dv.transpose(0, 1), dsinks};
  }
  const at::Tensor go4 = as_bhld(grad_out), out4 = as_bhld(out);
  const Isa isa = cpu_isa();
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* go = static_cast<const T*>(go4.data_ptr());
    const T* op = static_cast<const T*>(out4.data_ptr());
    const int64_t sdo[4] = {go4.stride(0), go4.stride(1), go4.stride(2), go4.stride(3)};
    const int64_t so[4] = {out4.stride(0), out4.stride(1), out4.stride(2), out4.stride(3)};
    const float* gl = glse.defined() ? glse.data_ptr<float>() : nullptr;
    float* dsp = a.sinks ? dsinks.data_ptr<float>() : nullptr;
    T* dqp = static_cast<T*>(dq.data_ptr());
    T* dkp = static_cast<T*>(dk.data_ptr());
    T* dvp = static_cast<T*>(dv.data_ptr());
#ifdef FASTATTN_X86_KERNELS
    if (isa >= Isa::avx512)
      return avx512::attention_bwd_impl<T>(a, go, sdo, op, so, lse_c.data_ptr<float>(), gl, dqp,
                                           dkp, dvp, nullptr, dsp);
    if (isa >= Isa::avx2)
      return avx2::attention_bwd_impl<T>(a, go, sdo, op, so, lse_c.data_ptr<float>(), gl, dqp,
                                         dkp, dvp, nullptr, dsp);
#endif
    (void)isa;
    portable::attention_bwd_impl<T>(a, go, sdo, op, so, lse_c.data_ptr<float>(), gl, dqp, dkp,
                                    dvp, nullptr, dsp);
  });
  return {dq.transpose(0, 1), dk.transpose(0, 1), dv.transpose(0, 1), dsinks};
}

// ---- attention_dropout_mask ------------------------------------------------------------------
// The keep flags the kernels above draw (Dropout::keep: the scalar form of softmax.h's
// drop_keep, from the same key / row hashes). sdpa: [b, h, i, j] = keep(b * H + h, i, j), bool
// (B, H, L, S). varlen (cu_seqlens given): the packed sequences run as batch entry 0 of
// (total_q, total_k) rows, so row r of sequence s keeps key j of its sequence iff
// keep(h, r, cu_k[s] + j): (total_q, H, max_seqlen_k), False past the sequence's keys (offsets
// clamped into the packed rows, as the GPU kernels do).
at::Tensor attention_dropout_mask(const at::Tensor& q, const at::Tensor& k,
                                  const std::optional<at::Tensor>& cu_seqlens_q,
                                  const std::optional<at::Tensor>& cu_seqlens_k,
                                  int64_t /*max_seqlen_q*/, int64_t max_seqlen_k,
                                  double dropout_p, int64_t seed) {
  const bool varlen = cu_seqlens_q.has_value() && cu_seqlens_q->defined();
  TORCH_CHECK(varlen == (cu_seqlens_k.has_value() && cu_seqlens_k->defined()),
              "fastattn::attention_dropout_mask (cpu): cu_seqlens_q and cu_seqlens_k must be "
              "given together");
  TORCH_CHECK(q.dim() == (varlen ? 3 : 4) && k.dim() == q.dim(),
              "fastattn::attention_dropout_mask (cpu): q and k must be ", varlen ? 3 : 4,
              "-D, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0,
              "fastattn::attention_dropout_mask (cpu): dropout_p must be in [0, 1), got ",
              dropout_p);
  const Dropout d = make_dropout(dropout_p, seed);
  if (!varlen) {
    const int64_t B = q.size(0), H = q.size(1), L = q.size(2), S = k.size(2);
    at::Tensor keep = at::empty({B, H, L, S}, q.options().dtype(at::kBool));
    bool* out = keep.data_ptr<bool>();
    at::parallel_for(0, B * H * L, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {  // r = (b * H + h) * L + i
        const uint32_t row = Dropout::row(d.key(r / L), r % L);
        for (int64_t j = 0; j < S; ++j) out[r * S + j] = d.keep(row, j);
      }
    });
    return keep;
  }
  TORCH_CHECK(max_seqlen_k >= 0, "fastattn::attention_dropout_mask (cpu): max_seqlen_k must be "
              ">= 0, got ", max_seqlen_k);
  const at::Tensor cq = cu_seqlens_q->to(at::kInt).contiguous();
  const at::Tensor ck = cu_seqlens_k->to(at::kInt).contiguous();
  TORCH_CHECK(cq.dim() == 1 && ck.sizes() == cq.sizes() && cq.numel() >= 1,
              "fastattn::attention_dropout_mask (cpu): cu_seqlens_q and cu_seqlens_k must be "
              "(B + 1,), got ", cq.sizes(), " and ", ck.sizes());
  const int64_t total_q = q.size(0), total_k = k.size(0), H = q.size(1), Smax = max_seqlen_k;
  at::Tensor keep = at::zeros({total_q, H, Smax}, q.options().dtype(at::kBool));
  bool* out = keep.data_ptr<bool>();
  const int32_t* pq = cq.const_data_ptr<int32_t>();
  const int32_t* pk = ck.const_data_ptr<int32_t>();
  auto clamp = [](int64_t x, int64_t lo, int64_t hi) { return std::min(std::max(x, lo), hi); };
  at::parallel_for(0, cq.numel() - 1, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t q0 = clamp(pq[s], 0, total_q), q1 = clamp(pq[s + 1], q0, total_q);
      const int64_t k0 = clamp(pk[s], 0, total_k), k1 = clamp(pk[s + 1], k0, total_k);
      const int64_t n = std::min(k1 - k0, Smax);
      for (int64_t r = q0; r < q1; ++r)
        for (int64_t h = 0; h < H; ++h) {
          const uint32_t row = Dropout::row(d.key(h), r);
          bool* o = out + (r * H + h) * Smax;
          for (int64_t j = 0; j < n; ++j) o[j] = d.keep(row, k0 + j);
        }
    }
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attention_dropout_mask", &attention_dropout_mask);
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_kvcache", &attention_kvcache);
  m.impl("attention_kvcache_lse", &attention_kvcache_lse);
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attention_varlen_fwd", &attention_varlen_fwd);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd);
}

}  // namespace fastattn::cpu
