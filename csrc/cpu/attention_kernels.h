// Attention kernels, written once and compiled twice by attention.cpp (the way ATen builds its
// CPU_CAPABILITY kernels): once portable, and once inside a `#pragma GCC target("avx512...")`
// region with FA_AVX512 defined, each time in its own namespace. The dispatcher picks one at run
// time from what the CPU supports. No include guard on purpose; the including file has already
// included every system/ATen header this file uses.
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

// ---------------------------------------------------------------------------------------------
// 16-lane float / int vectors
// ---------------------------------------------------------------------------------------------
#ifdef FA_AVX512
#define FA_INLINE inline __attribute__((always_inline))
using vf = __m512;
using vi = __m512i;
using vm = __mmask16;
FA_INLINE vf vload(const float* p) { return _mm512_loadu_ps(p); }
FA_INLINE void vstore(float* p, vf a) { _mm512_storeu_ps(p, a); }
FA_INLINE vf vset1(float x) { return _mm512_set1_ps(x); }
FA_INLINE vf vzero() { return _mm512_setzero_ps(); }
FA_INLINE vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
FA_INLINE vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
FA_INLINE vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
FA_INLINE vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
FA_INLINE vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
FA_INLINE vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
FA_INLINE vm vcmp_gt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
FA_INLINE vf vsel(vm m, vf if_false, vf if_true) {
  return _mm512_mask_blend_ps(m, if_false, if_true);
}
FA_INLINE vf vmaskz(vm m, vf a) { return _mm512_maskz_mov_ps(m, a); }
FA_INLINE vm vcmp_eq(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
FA_INLINE vm vcmp_neq(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ); }
FA_INLINE float vhmax(vf a) { return _mm512_reduce_max_ps(a); }
FA_INLINE float vhsum(vf a) { return _mm512_reduce_add_ps(a); }
FA_INLINE vi viload(const int32_t* p) { return _mm512_loadu_si512(p); }
FA_INLINE vi viset1(int32_t x) { return _mm512_set1_epi32(x); }
FA_INLINE vi viiota() {
  return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
}
FA_INLINE vi viadd(vi a, vi b) { return _mm512_add_epi32(a, b); }
FA_INLINE vi vimul(vi a, vi b) { return _mm512_mullo_epi32(a, b); }
FA_INLINE vi vixor(vi a, vi b) { return _mm512_xor_si512(a, b); }
FA_INLINE vi vishr(vi a, int s) { return _mm512_srli_epi32(a, s); }
FA_INLINE vm vi_le(vi a, vi b) { return _mm512_cmple_epi32_mask(a, b); }
FA_INLINE vm vi_lt(vi a, vi b) { return _mm512_cmplt_epi32_mask(a, b); }
FA_INLINE vm vu_ge(vi a, vi b) { return _mm512_cmpge_epu32_mask(a, b); }
FA_INLINE bool vm_all(vm m) { return m == static_cast<vm>(0xffff); }
FA_INLINE bool vm_none(vm m) { return m == 0; }

// 2^f for f in [-0.5, 0.5], degree 5 with the constant term exactly 1 (minimax fit):
// 1.7e-7 relative error in fp32 (~1.4 ulp), and exactly 1 at f = 0. The bf16 paths use it for
// the probabilities, whose sum is the softmax denominator saved as lse: the backward recomputes
// P = exp(y - lse) with the accurate exp, so the sum has to be accurate too. The degree 3 it
// replaces (7.5e-5, and 0.99992806 at f = 0) was far below the bf16 rounding of P but left the
// lse up to 7.2e-5 too low, and dQ/dK/dV that much too large.
FA_INLINE vf vexp2_poly5(vf f) {
  vf p = _mm512_set1_ps(1.3264728477224708e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6715129911899570e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507335811853410e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022242426872253e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314700365066530e-01f));
  return _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
}
// 2^x = 2^round(x) * poly(x - round(x)) with vreduceps giving x - round(x) directly; exact 0
// for -inf (vreduceps(-inf) = 0, vscalefps(1, -inf) = 0), exact 1 for 0, NaN stays NaN.
// DEG 6 is ~1 ulp (fp32 paths, backward, decode); DEG 5 (vexp2_poly5) saves one FMA for the
// bf16 forward's softmax.
template <int DEG>
FA_INLINE vf vexp2(vf x) {
  const vf n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf p;
  if constexpr (DEG >= 6) {
    p = _mm512_set1_ps(1.5345799329224974e-04f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399932067841291e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6184890717267990e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503286421298980e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022646248340607e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718246459960e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  } else {
    static_assert(DEG == 5, "vexp2: degree 5 or 6");
    p = vexp2_poly5(f);
  }
  return _mm512_scalef_ps(p, n);
}
// 2^x for finite x (clamped at -126, so tiny results are 2^-126 instead of 0), vexp2_poly5:
// the hot loop of the bf16 paths, where no logit is masked. vrndscaleps / vreduceps
// are 2 uops each on port 0; the magic-number rounding and the exponent add below use single-uop
// instructions that also issue on port 5 (~2x the softmax throughput measured).
FA_INLINE vf vexp2_unmasked(vf x) {
  const vf magic = _mm512_set1_ps(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf xc = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const vf t = _mm512_add_ps(xc, magic);
  const vf f = _mm512_sub_ps(xc, _mm512_sub_ps(t, magic));
  const vf p = vexp2_poly5(f);
  // the low mantissa bits of t hold round(x); shifted into the exponent field they scale p
  return _mm512_castsi512_ps(
      _mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(_mm512_castps_si512(t), 23)));
}
#else  // portable: plain loops the compiler vectorises for the baseline ISA
#define FA_INLINE inline
struct vf {
  float x[16];
};
struct vi {
  int32_t x[16];
};
using vm = uint32_t;
#define FA_LANES for (int t_ = 0; t_ < 16; ++t_)
FA_INLINE vf vload(const float* p) {
  vf r;
  FA_LANES r.x[t_] = p[t_];
  return r;
}
FA_INLINE void vstore(float* p, vf a) { FA_LANES p[t_] = a.x[t_]; }
FA_INLINE vf vset1(float v) {
  vf r;
  FA_LANES r.x[t_] = v;
  return r;
}
FA_INLINE vf vzero() { return vset1(0.f); }
FA_INLINE vf vadd(vf a, vf b) {
  FA_LANES a.x[t_] += b.x[t_];
  return a;
}
FA_INLINE vf vsub(vf a, vf b) {
  FA_LANES a.x[t_] -= b.x[t_];
  return a;
}
FA_INLINE vf vmul(vf a, vf b) {
  FA_LANES a.x[t_] *= b.x[t_];
  return a;
}
FA_INLINE vf vfma(vf a, vf b, vf c) {
  FA_LANES c.x[t_] = a.x[t_] * b.x[t_] + c.x[t_];
  return c;
}
FA_INLINE vf vmax(vf a, vf b) {
  FA_LANES a.x[t_] = a.x[t_] > b.x[t_] ? a.x[t_] : b.x[t_];
  return a;
}
FA_INLINE vf vmin(vf a, vf b) {
  FA_LANES a.x[t_] = a.x[t_] < b.x[t_] ? a.x[t_] : b.x[t_];
  return a;
}
FA_INLINE vm vcmp_gt(vf a, vf b) {
  vm m = 0;
  FA_LANES m |= (a.x[t_] > b.x[t_] ? 1u : 0u) << t_;
  return m;
}
FA_INLINE vf vsel(vm m, vf a, vf b) {
  FA_LANES a.x[t_] = (m >> t_) & 1u ? b.x[t_] : a.x[t_];
  return a;
}
FA_INLINE vf vmaskz(vm m, vf a) {
  FA_LANES a.x[t_] = (m >> t_) & 1u ? a.x[t_] : 0.f;
  return a;
}
FA_INLINE vm vcmp_eq(vf a, vf b) {
  vm m = 0;
  FA_LANES m |= (a.x[t_] == b.x[t_] ? 1u : 0u) << t_;
  return m;
}
FA_INLINE vm vcmp_neq(vf a, vf b) { return ~vcmp_eq(a, b) & 0xffffu; }
FA_INLINE float vhmax(vf a) {
  float r = a.x[0];
  FA_LANES r = a.x[t_] > r ? a.x[t_] : r;
  return r;
}
FA_INLINE float vhsum(vf a) {
  float r = 0.f;
  FA_LANES r += a.x[t_];
  return r;
}
FA_INLINE vi viload(const int32_t* p) {
  vi r;
  FA_LANES r.x[t_] = p[t_];
  return r;
}
FA_INLINE vi viset1(int32_t v) {
  vi r;
  FA_LANES r.x[t_] = v;
  return r;
}
FA_INLINE vi viiota() {
  vi r;
  FA_LANES r.x[t_] = t_;
  return r;
}
FA_INLINE vi viadd(vi a, vi b) {
  FA_LANES a.x[t_] =
      static_cast<int32_t>(static_cast<uint32_t>(a.x[t_]) + static_cast<uint32_t>(b.x[t_]));
  return a;
}
FA_INLINE vi vimul(vi a, vi b) {
  FA_LANES a.x[t_] =
      static_cast<int32_t>(static_cast<uint32_t>(a.x[t_]) * static_cast<uint32_t>(b.x[t_]));
  return a;
}
FA_INLINE vi vixor(vi a, vi b) {
  FA_LANES a.x[t_] ^= b.x[t_];
  return a;
}
FA_INLINE vi vishr(vi a, int s) {
  FA_LANES a.x[t_] = static_cast<int32_t>(static_cast<uint32_t>(a.x[t_]) >> s);
  return a;
}
FA_INLINE vm vi_le(vi a, vi b) {
  vm m = 0;
  FA_LANES m |= (a.x[t_] <= b.x[t_] ? 1u : 0u) << t_;
  return m;
}
FA_INLINE vm vi_lt(vi a, vi b) {
  vm m = 0;
  FA_LANES m |= (a.x[t_] < b.x[t_] ? 1u : 0u) << t_;
  return m;
}
FA_INLINE vm vu_ge(vi a, vi b) {
  vm m = 0;
  FA_LANES m |= (static_cast<uint32_t>(a.x[t_]) >= static_cast<uint32_t>(b.x[t_]) ? 1u : 0u) << t_;
  return m;
}
FA_INLINE bool vm_all(vm m) { return (m & 0xffffu) == 0xffffu; }
FA_INLINE bool vm_none(vm m) { return (m & 0xffffu) == 0; }
template <int DEG>
FA_INLINE vf vexp2(vf a) {
  FA_LANES a.x[t_] = std::exp2(a.x[t_]);
  return a;
}
FA_INLINE vf vexp2_unmasked(vf a) { return vexp2<5>(a); }
#undef FA_LANES
#endif

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// element conversion (inputs are float, c10::BFloat16 or c10::Half; accumulation is float)
// ---------------------------------------------------------------------------------------------
template <typename T>
FA_INLINE float to_f(T x) {
  return static_cast<float>(x);
}

// dst[i] = src[i * stride] as float, i < n
template <typename T>
FA_INLINE void load_f32(const T* src, int64_t stride, int64_t n, float* dst) {
#ifdef FA_AVX512
  if (stride == 1) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      if constexpr (std::is_same_v<T, float>) {
        _mm512_storeu_ps(dst + i, _mm512_loadu_ps(src + i));
      } else if constexpr (std::is_same_v<T, c10::Half>) {
        _mm512_storeu_ps(
            dst + i,
            _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
      } else {
        const __m512i w =
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
      }
    }
    for (; i < n; ++i) dst[i] = to_f(src[i]);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i * stride]);
}

// ---------------------------------------------------------------------------------------------
// broadcast GEMM micro-kernels:  C[m][0:16*NV] (=0 | =C | =C*colscale) += sum_k A(m,k) * B[k][:]
// A(m, k) = a[m * lda + k * ak] is read as a broadcast scalar (any strides: K/V straight from
// their tensors); B rows are 16*NV contiguous lanes (packed scratch). fp32 FMA, or bf16 pairs
// with vdpbf16ps where each "element" is a 32-bit pair and K counts pairs.
// ---------------------------------------------------------------------------------------------
enum class CInit { zero, load, scale };

#ifdef FA_AVX512
struct OpF32 {
  using elem = float;
  static FA_INLINE __m512 bcast(const float* p) { return _mm512_set1_ps(*p); }
  static FA_INLINE __m512 loadb(const float* p) { return _mm512_loadu_ps(p); }
  static FA_INLINE __m512 madd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
};
struct OpBf16 {
  using elem = uint32_t;  // two bf16: low half = even index
  static FA_INLINE __m512 bcast(const uint32_t* p) {
    return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(*p)));
  }
  static FA_INLINE __m512 loadb(const uint32_t* p) { return _mm512_loadu_ps(p); }
  static FA_INLINE __m512 madd(__m512 a, __m512 b, __m512 c) {
    return _mm512_dpbf16_ps(c, reinterpret_cast<__m512bh&>(a), reinterpret_cast<__m512bh&>(b));
  }
};

template <int MR, int NV, class Op>
FA_INLINE void ukernel(int64_t K, const typename Op::elem* a, int64_t lda, int64_t ak,
                       const typename Op::elem* b, int64_t ldb, float* c, int64_t ldc, CInit init,
                       const float* colscale) {
  __m512 acc[MR][NV];
  if (init == CInit::zero) {
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  } else if (init == CInit::load) {
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_loadu_ps(c + m * ldc + 16 * v);
  } else {
    for (int v = 0; v < NV; ++v) {
      const __m512 s = _mm512_loadu_ps(colscale + 16 * v);
      for (int m = 0; m < MR; ++m)
        acc[m][v] = _mm512_mul_ps(_mm512_loadu_ps(c + m * ldc + 16 * v), s);
    }
  }
  const typename Op::elem* ap[MR];
  for (int m = 0; m < MR; ++m) ap[m] = a + m * lda;
  int64_t koff = 0;
  const bool pf = ak > 16;  // A walks across rows (P.V: next key's row): fetch 8 rows ahead
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k, koff += ak, b += ldb) {
    if (pf) _mm_prefetch(reinterpret_cast<const char*>(ap[0] + koff + 8 * ak), _MM_HINT_T0);
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Op::loadb(b + 16 * v);
    for (int m = 0; m < MR; ++m) {
      const __m512 av = Op::bcast(ap[m] + koff);
      for (int v = 0; v < NV; ++v) acc[m][v] = Op::madd(av, bv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + m * ldc + 16 * v, acc[m][v]);
}

template <int NV, class Op>
void gemm_nv(int64_t M, int64_t K, const typename Op::elem* a, int64_t lda, int64_t ak,
             const typename Op::elem* b, int64_t ldb, float* c, int64_t ldc, CInit init,
             const float* cs) {
  // 24 accumulators + NV B vectors + 1 broadcast stay within the 32 zmm registers
  constexpr int MR = NV == 4 ? 6 : (NV == 2 ? 12 : 16);
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    ukernel<MR, NV, Op>(K, a + m * lda, lda, ak, b, ldb, c + m * ldc, ldc, init, cs);
  if constexpr (MR > 8) {
    if (m + 8 <= M) {
      ukernel<8, NV, Op>(K, a + m * lda, lda, ak, b, ldb, c + m * ldc, ldc, init, cs);
      m += 8;
    }
  }
  if (m + 4 <= M) {
    ukernel<4, NV, Op>(K, a + m * lda, lda, ak, b, ldb, c + m * ldc, ldc, init, cs);
    m += 4;
  }
  if (m + 2 <= M) {
    ukernel<2, NV, Op>(K, a + m * lda, lda, ak, b, ldb, c + m * ldc, ldc, init, cs);
    m += 2;
  }
  if (m < M) ukernel<1, NV, Op>(K, a + m * lda, lda, ak, b, ldb, c + m * ldc, ldc, init, cs);
}

template <class Op>
void gemm_bcast(int64_t M, int NV, int64_t K, const typename Op::elem* a, int64_t lda, int64_t ak,
                const typename Op::elem* b, int64_t ldb, float* c, int64_t ldc, CInit init,
                const float* cs = nullptr) {
  switch (NV) {
    case 1:
      gemm_nv<1, Op>(M, K, a, lda, ak, b, ldb, c, ldc, init, cs);
      break;
    case 2:
      gemm_nv<2, Op>(M, K, a, lda, ak, b, ldb, c, ldc, init, cs);
      break;
    default:
      gemm_nv<4, Op>(M, K, a, lda, ak, b, ldb, c, ldc, init, cs);
      break;
  }
}
#else
struct OpF32 {
  using elem = float;
};
template <class Op>
void gemm_bcast(int64_t M, int NV, int64_t K, const float* a, int64_t lda, int64_t ak,
                const float* b, int64_t ldb, float* c, int64_t ldc, CInit init,
                const float* cs = nullptr) {
  const int N = 16 * NV;
  for (int64_t m = 0; m < M; ++m) {
    float* cr = c + m * ldc;
    for (int n = 0; n < N; ++n)
      cr[n] = init == CInit::zero ? 0.f : (init == CInit::load ? cr[n] : cr[n] * cs[n]);
    for (int64_t k = 0; k < K; ++k) {
      const float av = a[m * lda + k * ak];
      const float* br = b + k * ldb;
      for (int n = 0; n < N; ++n) cr[n] += av * br[n];
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// AMX (bf16 tiles, 16 rows x 64 bytes each). Tiles 0-3 accumulate a 32x32 fp32 block, 4-5 hold
// the A rows, 6-7 the B (VNNI) columns.
// ---------------------------------------------------------------------------------------------
#ifdef FA_AVX512
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // ldtilecfg through asm so the compiler sees the read of cfg (GCC 12 drops the stores to a
  // config only passed to _tile_loadconfig as dead)
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}
inline void amx_release() { _tile_release(); }

// S^T[key][query] = K . Q^T for one key block: K in 1 KiB tiles [key/16][e/32] (contiguous,
// nEt = Ep/32 per key tile row), Q^T VNNI pairs [Ep/2][bm]; nkp, bm multiples of 32.
inline void amx_qk(int64_t nkp, int64_t bm, int64_t nEt, const uint16_t* kt, const uint32_t* qp,
                   float* s) {
  for (int64_t m = 0; m < nkp / 16; m += 2) {
    const uint16_t* a0 = kt + (m * nEt) * 512;
    const uint16_t* a1 = a0 + nEt * 512;
    for (int64_t n = 0; n < bm; n += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t u = 0; u < nEt; ++u) {
        _tile_loadd(4, a0 + u * 512, 64);
        _tile_loadd(5, a1 + u * 512, 64);
        _tile_loadd(6, qp + (u * 16) * bm + n, bm * 4);
        _tile_loadd(7, qp + (u * 16) * bm + n + 16, bm * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      float* c00 = s + (m * 16) * bm + n;
      _tile_stored(0, c00, bm * 4);
      _tile_stored(1, c00 + 16, bm * 4);
      _tile_stored(2, c00 + 16 * bm, bm * 4);
      _tile_stored(3, c00 + 16 * bm + 16, bm * 4);
    }
  }
}

// O^T[e][query] += V^T . P^T for one key block: V^T in 1 KiB tiles [e/16][key/32] (nKt tiles per
// e tile row, nkc = used key chunks), P^T VNNI pairs [nkc*16][bm]; Evp, bm multiples of 32.
inline void amx_pv(int64_t Evp, int64_t bm, int64_t nKt, int64_t nkc, const uint16_t* vt,
                   const uint32_t* pp, float* o, bool zero_o) {
  for (int64_t e = 0; e < Evp / 16; e += 2) {
    const uint16_t* a0 = vt + (e * nKt) * 512;
    const uint16_t* a1 = a0 + nKt * 512;
    for (int64_t n = 0; n < bm; n += 32) {
      float* c00 = o + (e * 16) * bm + n;
      if (zero_o) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      } else {
        _tile_loadd(0, c00, bm * 4);
        _tile_loadd(1, c00 + 16, bm * 4);
        _tile_loadd(2, c00 + 16 * bm, bm * 4);
        _tile_loadd(3, c00 + 16 * bm + 16, bm * 4);
      }
      for (int64_t c = 0; c < nkc; ++c) {
        _tile_loadd(4, a0 + c * 512, 64);
        _tile_loadd(5, a1 + c * 512, 64);
        _tile_loadd(6, pp + (c * 16) * bm + n, bm * 4);
        _tile_loadd(7, pp + (c * 16) * bm + n + 16, bm * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c00, bm * 4);
      _tile_stored(1, c00 + 16, bm * 4);
      _tile_stored(2, c00 + 16 * bm, bm * 4);
      _tile_stored(3, c00 + 16 * bm + 16, bm * 4);
    }
  }
}

// two rows of 16 fp32 (keys 2j, 2j+1 for 16 queries) -> 16 VNNI pairs of bf16 (round to nearest
// even), lane q = (bf16(hi[q]) << 16) | bf16(lo[q])
FA_INLINE __m512i pack_bf16_pairs(__m512 lo, __m512 hi) {
  const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // [lo16 | hi16]
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, both);
}
// In-register transpose of 16 x 16 32-bit elements: r[i] holds row i on entry, column i on exit.
FA_INLINE void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4g + x] now holds, in 128-bit lane l, elements (x of rows 4g..4g+3) of columns 4l..4l+3
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// first n lanes of x -> dst as T (round to nearest even, as c10's conversions)
template <typename T>
FA_INLINE void store_as(T* dst, __m512 x, int n) {
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(dst, m, x);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    _mm256_mask_storeu_epi16(dst, m,
                             _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16(dst, m, _mm512_cvtepi32_epi16(r));
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// shared arguments
// ---------------------------------------------------------------------------------------------
// vector form of fmix32 (Dropout, attention.cpp): lanes hash independently
FA_INLINE vi vfmix32(vi x) {
  x = vixor(x, vishr(x, 16));
  x = vimul(x, viset1(static_cast<int32_t>(0x85ebca6bu)));
  x = vixor(x, vishr(x, 13));
  x = vimul(x, viset1(static_cast<int32_t>(0xc2b2ae35u)));
  return vixor(x, vishr(x, 16));
}

// visible keys of query i: [lo(i), hi(i)] intersected with [0, S)
FA_INLINE int64_t vis_lo(const AttnArgs& a, int64_t i) {
  return a.wl < 0 ? 0 : std::max<int64_t>(0, i + a.off - a.wl);
}
FA_INLINE int64_t vis_hi(const AttnArgs& a, int64_t i) {
  return a.wr < 0 ? a.S - 1 : std::min<int64_t>(a.S - 1, i + a.off + a.wr);
}

// per-thread scratch, 64-byte aligned, reused across tasks
struct Scratch {
  float* p = nullptr;
  size_t cap = 0;
  ~Scratch() { std::free(p); }
  float* get(size_t n_floats) {
    if (n_floats > cap) {
      std::free(p);
      size_t bytes = ((n_floats * sizeof(float) + 63) / 64) * 64;
      p = static_cast<float*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(p != nullptr, "fastattn: out of memory allocating ", bytes, " bytes of scratch");
      cap = bytes / sizeof(float);
    }
    return p;
  }
};

// Runs fn(task, scratch) for every task in [0, n), tasks pulled dynamically by the threads of
// at::parallel_for (causal blocks differ in cost); each task's result does not depend on which
// thread ran it, so the outputs are bitwise identical for any thread count.
template <class F>
void run_tasks(int64_t n, F&& fn, bool amx = false) {
  if (n <= 0) return;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      Scratch scratch;
#ifdef FA_AVX512
      if (amx) amx_configure();
#endif
      for (;;) {
        const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
        if (t >= n) break;
        fn(t, scratch);
      }
#ifdef FA_AVX512
      if (amx) amx_release();
#endif
    }
  });
}

// Tasks sorted by decreasing cost (longest first keeps the dynamic schedule balanced).
inline std::vector<int64_t> order_by_cost(const std::vector<int64_t>& cost) {
  std::vector<int64_t> idx(cost.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
  return idx;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// per query block: window bounds of each lane and the mask block, transposed
// ---------------------------------------------------------------------------------------------
struct QBlock {
  int64_t b, h, q0, nq;  // queries q0 .. q0 + nq - 1
  int bm;                // lanes (>= nq, multiple of 16)
  int64_t klo, khi;      // union of visible keys (klo > khi: none)
};

FA_INLINE QBlock make_qblock(const AttnArgs& a, int64_t b, int64_t h, int64_t q0, int bm) {
  QBlock qb{b, h, q0, std::min<int64_t>(bm, a.L - q0), bm, 0, -1};
  if (a.S == 0) return qb;
  // lo/hi are non-decreasing in i, so the union is [lo(first), hi(last)] (rows may be empty)
  int64_t klo = a.S, khi = -1;
  for (int64_t i = q0; i < q0 + qb.nq; ++i) {
    const int64_t lo = vis_lo(a, i), hi = vis_hi(a, i);
    if (lo <= hi) {
      klo = std::min(klo, lo);
      khi = std::max(khi, hi);
    }
  }
  qb.klo = klo;
  qb.khi = khi;
  return qb;
}

// For key block [n0, n0 + nk): lanes' visible range relative to n0, [rlo, rhi), and whether all
// real lanes see all nk keys.
FA_INLINE bool block_window(const AttnArgs& a, const QBlock& qb, int64_t n0, int64_t nk,
                            int32_t* rlo, int32_t* rhi) {
  bool full = true;
  for (int i = 0; i < qb.bm; ++i) {
    int64_t lo = nk, hi = 0;  // padded lanes see nothing
    if (i < qb.nq) {
      lo = std::clamp<int64_t>(vis_lo(a, qb.q0 + i) - n0, 0, nk);
      hi = std::clamp<int64_t>(vis_hi(a, qb.q0 + i) - n0 + 1, 0, nk);
      if (lo != 0 || hi != nk) full = false;
    }
    rlo[i] = static_cast<int32_t>(lo);
    rhi[i] = static_cast<int32_t>(std::max(lo, hi));
  }
  return full;
}

// mk[j][i] = mask[b, h, q0 + i, n0 + j] (0 on padded lanes / keys)
template <typename T>
void pack_mask_t(const AttnArgs& a, const QBlock& qb, int64_t n0, int64_t nk, float* mk) {
  const T* m = static_cast<const T*>(a.mask) + qb.b * a.sm[0] + qb.h * a.sm[1] + qb.q0 * a.sm[2] +
               n0 * a.sm[3];
  const int bm = qb.bm;
  if (a.sm[2] == 0) {  // the same row for every query (key-padding masks): broadcast per key
    for (int64_t j = 0; j < nk; ++j) {
      const vf v = vset1(to_f(m[j * a.sm[3]]));
      for (int i = 0; i < bm; i += 16) vstore(mk + j * bm + i, v);
    }
    return;
  }
  float row[16];
  for (int64_t j = 0; j < nk; ++j) {
    for (int i0 = 0; i0 < bm; i0 += 16) {
      for (int i = 0; i < 16; ++i)
        row[i] = i0 + i < qb.nq ? to_f(m[(i0 + i) * a.sm[2] + j * a.sm[3]]) : 0.f;
      vstore(mk + j * bm + i0, vload(row));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------
// One key block of the online softmax, queries along lanes.
//   s  [nk][bm]: raw Q.K^T scores (overwritten with the logits y = s * scale + mask when needed)
//   out: fp32 P^T [nk][bm] (F32) or VNNI pairs [ceil(nkp/2)][bm] (bf16), zero for keys >= nk up
//   to nkp (the padded key count the P.V product runs over).
// The running max m and the logits are in natural units; p = 2^((y - m) * log2 e). PRECISE
// subtracts before scaling, so that the error of p does not grow with |m| (fp32 paths, where the
// result is held to fp32 torch's own error); the bf16 paths fold everything into one FMA.
// Updates m and the running sum l; alpha gets the factor O must be rescaled by. Returns whether
// any lane's alpha differs from 1.
// bf16 paths keep a stale running max until a block exceeds it by kLazy nats (p <= e^8 ~ 3e3
// stays exact in fp32 sums and bf16), so O is rarely rescaled; fp32 paths rescale for free in
// the P.V kernel and keep the exact max.
constexpr float kLazy = 8.f;

#ifdef FA_AVX512
// The common case of the bf16 softmax: one pass over an unmasked block against the running max
// m, which already holds for every lane (no -inf); finish() reports whether no logit exceeded m
// by more than kLazy, else the caller redoes the block in two passes.
template <int G>
struct LazyPass {
  vf negm2[G], sum[G], tmax[G];
  vf c;
  static bool ready(const float* m) {
    for (int g = 0; g < G; ++g)
      if (!vm_none(vcmp_eq(vload(m + 16 * g), vset1(kNegInf)))) return false;
    return true;
  }
  LazyPass(const AttnArgs& a, const float* m) : c(vset1(a.scale * kLog2e)) {
    for (int g = 0; g < G; ++g) {
      negm2[g] = vmul(vload(m + 16 * g), vset1(-kLog2e));
      sum[g] = vzero();
      tmax[g] = vset1(kNegInf);
    }
  }
  // t = (y - m) log2 e is the exp argument; the stale max holds iff max t <= kLazy log2 e
  FA_INLINE vf prob(const float* sj, int g) {
    const vf t = vfma(vload(sj + 16 * g), c, negm2[g]);
    tmax[g] = vmax(tmax[g], t);
    const vf p = vexp2_unmasked(t);
    sum[g] = vadd(sum[g], p);
    return p;
  }
  // keys [j0, j1), both even, all valid: VNNI pairs into pp
  FA_INLINE void keys(const float* s, int64_t bm, int64_t j0, int64_t j1, uint32_t* pp) {
    for (int64_t j = j0; j < j1; j += 2)
      for (int g = 0; g < G; ++g) {
        const vf p0 = prob(s + j * bm, g), p1 = prob(s + (j + 1) * bm, g);
        _mm512_storeu_si512(pp + (j / 2) * bm + 16 * g, pack_bf16_pairs(p0, p1));
      }
  }
  // the odd last key (if nk is odd), then zero pairs up to nkp
  FA_INLINE void tail(const float* s, int64_t bm, int64_t nk, int64_t nkp, uint32_t* pp) {
    for (int64_t j = nk & ~int64_t{1}; j < nkp; j += 2)
      for (int g = 0; g < G; ++g) {
        const vf p0 = j < nk ? prob(s + j * bm, g) : vzero();
        _mm512_storeu_si512(pp + (j / 2) * bm + 16 * g, pack_bf16_pairs(p0, vzero()));
      }
  }
  bool finish(float* l, float* alpha) {
    for (int g = 0; g < G; ++g)
      if (!vm_none(vcmp_gt(tmax[g], vset1(kLazy * kLog2e)))) return false;
    for (int g = 0; g < G; ++g) {
      vstore(alpha + 16 * g, vset1(1.f));
      vstore(l + 16 * g, vadd(vload(l + 16 * g), sum[g]));
    }
    return true;
  }
};
#else
template <int G>
struct LazyPass {  // the portable build has no bf16 path
  static bool ready(const float*) { return false; }
  LazyPass(const AttnArgs&, const float*) {}
  void keys(const float*, int64_t, int64_t, int64_t, uint32_t*) {}
  void tail(const float*, int64_t, int64_t, int64_t, uint32_t*) {}
  bool finish(float*, float*) { return false; }
};
#endif

// G query vectors (16 lanes each) at a time, keys outer: G independent max / sum chains, so the
// 4-cycle latency of vmaxps / vaddps is hidden (a single chain made pass 1 latency bound).
template <bool BF16OUT, bool PRECISE, int G>
bool softmax_group(const AttnArgs& a, const QBlock& qb, int qv0, int64_t n0, int64_t nk,
                   int64_t nkp, float* s, const float* mk, bool full, const int32_t* rlo,
                   const int32_t* rhi, float* m, float* l, float* alpha, void* out) {
  constexpr int DEG = PRECISE ? 6 : 5;
  const int bm = qb.bm;
  const vf sc = vset1(a.scale);
  const vf c = vset1(a.scale * kLog2e);
  const vf log2e = vset1(kLog2e);
  const vf ninf = vset1(kNegInf);
  // PRECISE keeps y for pass 2; else only masks/windows force a store
  const bool store_y = PRECISE || mk != nullptr || !full;
  float* sq = s + qv0;
  if constexpr (!PRECISE && BF16OUT) {
    // one pass against the running (stale) max when it holds for every lane (LazyPass); redo the
    // group in two passes only if some logit exceeds it by more than kLazy
    if (!store_y && !a.drop.on && LazyPass<G>::ready(m + qv0)) {
      LazyPass<G> lp(a, m + qv0);
      lp.keys(sq, bm, 0, nk & ~int64_t{1}, static_cast<uint32_t*>(out) + qv0);
      lp.tail(sq, bm, nk, nkp, static_cast<uint32_t*>(out) + qv0);
      if (lp.finish(l + qv0, alpha + qv0)) return false;
    }
  }
  // pass 1: logits and their max
  vf mx[G];
  if (store_y) {
    vi vlo[G], vhi[G];
    for (int g = 0; g < G; ++g) {
      mx[g] = ninf;
      vlo[g] = viload(rlo + qv0 + 16 * g);
      vhi[g] = viload(rhi + qv0 + 16 * g);
    }
    const float* mq = mk ? mk + qv0 : nullptr;
    for (int64_t j = 0; j < nk; ++j) {
      const vi vj = viset1(static_cast<int32_t>(j));
      for (int g = 0; g < G; ++g) {
        const vf x = vload(sq + j * bm + 16 * g);
        vf y = mq ? vfma(x, sc, vload(mq + j * bm + 16 * g)) : vmul(x, sc);
        if (!full) y = vsel(vi_le(vlo[g], vj) & vi_lt(vj, vhi[g]), ninf, y);
        vstore(sq + j * bm + 16 * g, y);
        mx[g] = vmax(mx[g], y);
      }
    }
  } else {  // max(s * scale) = scale * (max or min of s): one op per vector, two chains each
    vf r0[G], r1[G];
    for (int g = 0; g < G; ++g) r0[g] = r1[g] = vload(sq + 16 * g);
    const bool pos = a.scale >= 0.f;
    int64_t j = 1;
    for (; j + 1 < nk; j += 2) {
      for (int g = 0; g < G; ++g) {
        const vf x0 = vload(sq + j * bm + 16 * g), x1 = vload(sq + (j + 1) * bm + 16 * g);
        r0[g] = pos ? vmax(r0[g], x0) : vmin(r0[g], x0);
        r1[g] = pos ? vmax(r1[g], x1) : vmin(r1[g], x1);
      }
    }
    for (; j < nk; ++j)
      for (int g = 0; g < G; ++g)
        r0[g] = pos ? vmax(r0[g], vload(sq + j * bm + 16 * g))
                    : vmin(r0[g], vload(sq + j * bm + 16 * g));
    for (int g = 0; g < G; ++g) mx[g] = vmul(pos ? vmax(r0[g], r1[g]) : vmin(r0[g], r1[g]), sc);
  }
  bool rescale = false;
  vf msafe[G], negm2[G], sum[G];
  for (int g = 0; g < G; ++g) {
    const vf mold = vload(m + qv0 + 16 * g);
    vf mnew = vmax(mold, mx[g]);
    if constexpr (!PRECISE) mnew = vsel(vcmp_gt(mx[g], vadd(mold, vset1(kLazy))), mold, mnew);
    // lanes that saw no key yet keep max -inf: subtract 0 instead so exp2 gives exactly 0
    msafe[g] = vsel(vcmp_eq(mnew, ninf), mnew, vzero());
    negm2[g] = vmul(msafe[g], vset1(-kLog2e));
    if (!vm_all(vcmp_eq(mold, mnew))) rescale = true;
    vstore(m + qv0 + 16 * g, mnew);
    vstore(alpha + qv0 + 16 * g, vexp2<6>(vmul(vsub(mold, msafe[g]), log2e)));
    sum[g] = vzero();
  }
  // pass 2: probabilities
  vi drow[G];
  const uint32_t dkey = a.drop.on ? a.drop.key(qb.b * a.H + qb.h) : 0;
  if (a.drop.on) {
    for (int g = 0; g < G; ++g) {
      alignas(64) int32_t r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = static_cast<int32_t>(Dropout::row(dkey, qb.q0 + qv0 + 16 * g + i));
      drow[g] = viload(r);
    }
  }
  auto prob = [&](int64_t j, int g) -> vf {
    if (j >= nk) return vzero();
    const vf x = vload(sq + j * bm + 16 * g);
    vf p;
    if constexpr (PRECISE) {
      p = vexp2<DEG>(vmul(vsub(x, msafe[g]), log2e));
    } else {
      p = vexp2<DEG>(store_y ? vfma(x, log2e, negm2[g]) : vfma(x, c, negm2[g]));
    }
    sum[g] = vadd(sum[g], p);
    if (a.drop.on) {
      const vi h = vishr(
          vfmix32(viadd(drow[g],
                        viset1(static_cast<int32_t>(static_cast<uint32_t>(n0 + j) * kGolden32)))),
          8);
      p = vmaskz(vu_ge(h, viset1(static_cast<int32_t>(a.drop.threshold))),
                 vmul(p, vset1(a.drop.inv_keep)));
    }
    return p;
  };
  if constexpr (BF16OUT) {
#ifdef FA_AVX512
    uint32_t* pp = static_cast<uint32_t*>(out) + qv0;
    for (int64_t j = 0; j < nkp; j += 2)
      for (int g = 0; g < G; ++g) {
        const vf p0 = prob(j, g), p1 = prob(j + 1, g);
        _mm512_storeu_si512(pp + (j / 2) * bm + 16 * g, pack_bf16_pairs(p0, p1));
      }
#endif
  } else {
    float* pf = static_cast<float*>(out) + qv0;
    for (int64_t j = 0; j < nkp; ++j)
      for (int g = 0; g < G; ++g) vstore(pf + j * bm + 16 * g, prob(j, g));
  }
  for (int g = 0; g < G; ++g) {
    float* lp = l + qv0 + 16 * g;
    vstore(lp, vfma(vload(lp), vload(alpha + qv0 + 16 * g), sum[g]));
  }
  return rescale;
}

// One key block of the online softmax, queries along lanes.
//   s  [nk][bm]: raw Q.K^T scores (overwritten with the logits y = s * scale + mask when needed)
//   out: fp32 P^T [nk][bm] (F32) or VNNI pairs [ceil(nkp/2)][bm] (bf16), zero for keys >= nk up
//   to nkp (the padded key count the P.V product runs over).
// The running max m and the logits are in natural units; p = 2^((y - m) * log2 e). PRECISE
// subtracts before scaling, so that the error of p does not grow with |m| (fp32 paths, where the
// result is held to fp32 torch's own error); the bf16 paths fold everything into one FMA.
// Updates m and the running sum l; alpha gets the factor O must be rescaled by. Returns whether
// any lane's alpha differs from 1.
template <bool BF16OUT, bool PRECISE>
bool softmax_block(const AttnArgs& a, const QBlock& qb, int64_t n0, int64_t nk, int64_t nkp,
                   float* s, const float* mk, bool full, const int32_t* rlo, const int32_t* rhi,
                   float* m, float* l, float* alpha, void* out) {
  bool rescale = false;
  int qv = 0;
  for (; qv + 64 <= qb.bm; qv += 64)
    rescale |= softmax_group<BF16OUT, PRECISE, 4>(a, qb, qv, n0, nk, nkp, s, mk, full, rlo, rhi, m,
                                                  l, alpha, out);
  for (; qv + 32 <= qb.bm; qv += 32)
    rescale |= softmax_group<BF16OUT, PRECISE, 2>(a, qb, qv, n0, nk, nkp, s, mk, full, rlo, rhi, m,
                                                  l, alpha, out);
  for (; qv < qb.bm; qv += 16)
    rescale |= softmax_group<BF16OUT, PRECISE, 1>(a, qb, qv, n0, nk, nkp, s, mk, full, rlo, rhi, m,
                                                  l, alpha, out);
  return rescale;
}

// qt[e][i] = Q[q0 + i][e] as float (0 on padded lanes)
template <typename T>
void pack_q_f32(const AttnArgs& a, const QBlock& qb, float* qt) {
  const T* q = static_cast<const T*>(a.q) + qb.b * a.sq[0] + qb.h * a.sq[1] + qb.q0 * a.sq[2];
  const int bm = qb.bm;
  alignas(64) float rows[16 * 16];
  for (int64_t i0 = 0; i0 < bm; i0 += 16) {
    for (int64_t e0 = 0; e0 < a.E; e0 += 16) {
      const int64_t ne = std::min<int64_t>(16, a.E - e0);
      for (int64_t i = 0; i < 16; ++i) {  // 16 query rows of 16 e, zero padded
        if (i0 + i < qb.nq) {
          load_f32(q + (i0 + i) * a.sq[2] + e0 * a.sq[3], a.sq[3], ne, rows + i * 16);
          for (int64_t e = ne; e < 16; ++e) rows[i * 16 + e] = 0.f;
        } else {
          std::fill(rows + i * 16, rows + i * 16 + 16, 0.f);
        }
      }
#ifdef FA_AVX512
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(rows + i * 16);
      transpose16x16(r);
      for (int64_t e = 0; e < ne; ++e) _mm512_storeu_si512(qt + (e0 + e) * bm + i0, r[e]);
#else
      for (int64_t e = 0; e < ne; ++e)
        for (int64_t i = 0; i < 16; ++i) qt[(e0 + e) * bm + i0 + i] = rows[i * 16 + e];
#endif
    }
  }
}

#ifdef FA_AVX512
// Qp[e/2][i] = (Q[i][e], Q[i][e+1]) for e < Ep (zero padded)
inline void pack_q_bf16(const AttnArgs& a, const QBlock& qb, int64_t Ep, uint32_t* qp) {
  const uint16_t* q =
      static_cast<const uint16_t*>(a.q) + qb.b * a.sq[0] + qb.h * a.sq[1] + qb.q0 * a.sq[2];
  std::memset(qp, 0, static_cast<size_t>(Ep / 2 * qb.bm) * 4);
  for (int64_t i = 0; i < qb.nq; ++i) {
    const uint16_t* qr = q + i * a.sq[2];
    if (a.sq[3] == 1) {
      for (int64_t p = 0; p < a.E / 2; ++p) {
        uint32_t w;
        std::memcpy(&w, qr + 2 * p, 4);
        qp[p * qb.bm + i] = w;
      }
      if (a.E % 2) qp[(a.E / 2) * qb.bm + i] = qr[a.E - 1];
    } else {
      for (int64_t e = 0; e < a.E; ++e) {
        const uint32_t x = qr[e * a.sq[3]];
        qp[(e / 2) * qb.bm + i] |= (e % 2) ? (x << 16) : x;
      }
    }
  }
}
#endif

// O^T [Ev][bm] / l -> out (B, H, L, Ev) at strides a.so (last dim contiguous); lse
template <typename T>
void write_out(const AttnArgs& a, const QBlock& qb, const float* ot, const float* m2,
               const float* l, T* out, float* lse) {
  alignas(64) float inv[256];
  for (int64_t i = 0; i < qb.bm; ++i) inv[i] = l[i] > 0.f ? 1.f / l[i] : 0.f;
  const int64_t row0 = (qb.b * a.H + qb.h) * a.L + qb.q0;
  for (int64_t i = 0; i < qb.nq; ++i) lse[row0 + i] = l[i] > 0.f ? m2[i] + std::log(l[i]) : kNegInf;
  T* out0 = out + qb.b * a.so[0] + qb.h * a.so[1] + qb.q0 * a.so[2];  // row q0 of this (b, h)
#ifdef FA_AVX512
  // 16 x 16 blocks: rows e (queries in lanes) -> transposed -> rows of out
  for (int64_t q0 = 0; q0 < qb.nq; q0 += 16) {
    const __m512 vinv = _mm512_loadu_ps(inv + q0);
    for (int64_t e0 = 0; e0 < a.Ev; e0 += 16) {
      const int ne = static_cast<int>(std::min<int64_t>(16, a.Ev - e0));
      __m512i r[16];
      for (int x = 0; x < 16; ++x)
        r[x] = x < ne ? _mm512_castps_si512(
                            _mm512_mul_ps(_mm512_loadu_ps(ot + (e0 + x) * qb.bm + q0), vinv))
                      : _mm512_setzero_si512();
      transpose16x16(r);
      for (int64_t i = 0; i < std::min<int64_t>(16, qb.nq - q0); ++i)
        store_as<T>(out0 + (q0 + i) * a.so[2] + e0, _mm512_castsi512_ps(r[i]), ne);
    }
  }
#else
  for (int64_t i = 0; i < qb.nq; ++i) {
    T* o = out0 + i * a.so[2];
    for (int64_t e = 0; e < a.Ev; ++e) o[e] = static_cast<T>(ot[e * qb.bm + i] * inv[i]);
  }
#endif
}

// K/V operands of the forward for one (b, kv head). F32: float rows (the tensors themselves when
// they are float). bf16 paths: K row-major [Sp][Ep], V^T blocked [nkb][Evp][BN].
struct KVOperands {
  const float* kf = nullptr;
  const float* vf_ = nullptr;
  int64_t k_row = 0, k_col = 0, v_row = 0, v_col = 0;  // element strides within one head
  int64_t k_head = 0, v_head = 0, k_batch = 0, v_batch = 0;
  const uint16_t* kp = nullptr;
  const uint16_t* vt = nullptr;
  int64_t Sp = 0, Ep = 0, Evp = 0, bn = 0;
};

template <typename T>
void prepack_kv_f32(const AttnArgs& a, std::vector<float>& kbuf, std::vector<float>& vbuf,
                    KVOperands& kv) {
  if constexpr (std::is_same_v<T, float>) {
    kv.kf = static_cast<const float*>(a.k);
    kv.vf_ = static_cast<const float*>(a.v);
    kv.k_batch = a.sk[0];
    kv.k_head = a.sk[1];
    kv.k_row = a.sk[2];
    kv.k_col = a.sk[3];
    kv.v_batch = a.sv[0];
    kv.v_head = a.sv[1];
    kv.v_row = a.sv[2];
    kv.v_col = a.sv[3];
    (void)kbuf;
    (void)vbuf;
  } else {
    kbuf.resize(static_cast<size_t>(a.B * a.Hkv * a.S * a.E));
    vbuf.resize(static_cast<size_t>(a.B * a.Hkv * a.S * a.Ev));
    const T* k = static_cast<const T*>(a.k);
    const T* v = static_cast<const T*>(a.v);
    float* kb = kbuf.data();
    float* vb = vbuf.data();
    at::parallel_for(0, a.B * a.Hkv * a.S, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (a.Hkv * a.S), h = (r / a.S) % a.Hkv, n = r % a.S;
        load_f32(k + b * a.sk[0] + h * a.sk[1] + n * a.sk[2], a.sk[3], a.E, kb + r * a.E);
        load_f32(v + b * a.sv[0] + h * a.sv[1] + n * a.sv[2], a.sv[3], a.Ev, vb + r * a.Ev);
      }
    });
    kv.kf = kb;
    kv.vf_ = vb;
    kv.k_batch = a.Hkv * a.S * a.E;
    kv.k_head = a.S * a.E;
    kv.k_row = a.E;
    kv.k_col = 1;
    kv.v_batch = a.Hkv * a.S * a.Ev;
    kv.v_head = a.S * a.Ev;
    kv.v_row = a.Ev;
    kv.v_col = 1;
  }
}

#ifdef FA_AVX512
// bf16 K and V^T, packed once per (b, kv head, key block of bn) and shared by the query heads of a
// GQA group. tiles=true (AMX): K as 1 KiB tiles [key/16][e/32], V^T as tiles [e/16][key/32] per
// key block, each tile 16 rows x 32 bf16, in the order the tile loads consume them.
// tiles=false (vdpbf16ps): K row-major [Sp][Ep], V^T row-major [Evp][bn] per key block.
inline void prepack_kv_bf16(const AttnArgs& a, int64_t bn, bool tiles, std::vector<uint16_t>& kbuf,
                            std::vector<uint16_t>& vbuf, KVOperands& kv) {
  kv.bn = bn;
  kv.Sp = round_up(std::max<int64_t>(a.S, 1), bn);
  kv.Ep = round_up(a.E, 32);
  kv.Evp = round_up(a.Ev, 32);
  const int64_t nkb = kv.Sp / bn;
  const int64_t Ep = kv.Ep, Evp = kv.Evp, nEt = Ep / 32, nKt = bn / 32;
  kbuf.resize(static_cast<size_t>(a.B * a.Hkv * kv.Sp * Ep));
  vbuf.resize(static_cast<size_t>(a.B * a.Hkv * kv.Sp * Evp));
  const uint16_t* k = static_cast<const uint16_t*>(a.k);
  const uint16_t* v = static_cast<const uint16_t*>(a.v);
  at::parallel_for(0, a.B * a.Hkv * nkb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint16_t> row(static_cast<size_t>(std::max(Ep, Evp)));
    std::vector<uint16_t> vtmp(tiles ? static_cast<size_t>(bn * Evp) : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (a.Hkv * nkb), h = (t / nkb) % a.Hkv, kb = t % nkb;
      const int64_t n0 = kb * bn, nk = std::min<int64_t>(bn, a.S - n0);
      uint16_t* kd = kbuf.data() + ((b * a.Hkv + h) * kv.Sp + n0) * Ep;  // this block's keys
      uint16_t* vd = vbuf.data() + ((b * a.Hkv + h) * nkb + kb) * Evp * bn;
      std::memset(kd, 0, static_cast<size_t>(bn * Ep) * 2);
      if (!tiles) std::memset(vd, 0, static_cast<size_t>(bn * Evp) * 2);
      const uint16_t* ks = k + b * a.sk[0] + h * a.sk[1] + n0 * a.sk[2];
      const uint16_t* vs = v + b * a.sv[0] + h * a.sv[1] + n0 * a.sv[2];
      for (int64_t j = 0; j < nk; ++j) {
        const uint16_t* kr = ks + j * a.sk[2];
        uint16_t* dst;
        if (!tiles) {
          dst = kd + j * Ep;
        } else {
          dst = row.data();
        }
        if (a.sk[3] == 1) {
          std::memcpy(dst, kr, static_cast<size_t>(a.E) * 2);
        } else {
          for (int64_t e = 0; e < a.E; ++e) dst[e] = kr[e * a.sk[3]];
        }
        if (tiles) {  // key j -> row j % 16 of tiles (j / 16, u)
          for (int64_t e = a.E; e < Ep; ++e) row[static_cast<size_t>(e)] = 0;
          for (int64_t u = 0; u < nEt; ++u)
            std::memcpy(kd + ((j / 16) * nEt + u) * 512 + (j % 16) * 32, row.data() + u * 32, 64);
        }
      }
      // V^T: element (e, j) -> tiles: row e % 16 of tile (e / 16, j / 32), column j % 32
      if (tiles) {
        // rows of the block, zero padded to [bn][Evp], then per tile: key pairs interleaved into
        // 32-bit lanes (2p, 2p+1) and a 16x16 32-bit transpose
        uint16_t* vrows = vtmp.data();
        std::memset(vrows, 0, static_cast<size_t>(bn * Evp) * 2);
        for (int64_t j = 0; j < nk; ++j) {
          const uint16_t* vr = vs + j * a.sv[2];
          if (a.sv[3] == 1) {
            std::memcpy(vrows + j * Evp, vr, static_cast<size_t>(a.Ev) * 2);
          } else {
            for (int64_t e = 0; e < a.Ev; ++e) vrows[j * Evp + e] = vr[e * a.sv[3]];
          }
        }
        for (int64_t et = 0; et < Evp / 16; ++et) {
          for (int64_t c = 0; c < nKt; ++c) {
            __m512i r[16];
            for (int p = 0; p < 16; ++p) {
              const uint16_t* r0 = vrows + (c * 32 + 2 * p) * Evp + et * 16;
              const __m512i lo =
                  _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0)));
              const __m512i hi = _mm512_cvtepu16_epi32(
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + Evp)));
              r[p] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
            }
            transpose16x16(r);
            uint16_t* tile = vd + (et * nKt + c) * 512;
            for (int x = 0; x < 16; ++x) _mm512_storeu_si512(tile + x * 32, r[x]);
          }
        }
      } else {
        for (int64_t j = 0; j < nk; ++j) {
          const uint16_t* vr = vs + j * a.sv[2];
          for (int64_t e = 0; e < a.Ev; ++e) vd[e * bn + j] = vr[e * a.sv[3]];
        }
      }
    }
  });
  kv.kp = kbuf.data();
  kv.vt = vbuf.data();
}
#endif

// The forward over all (b, h, query block) tasks. T: element type of q/k/v/mask/out.
template <typename T, Path P>
void attention_fwd_impl(const AttnArgs& a, T* out, float* lse) {
  const int64_t G = a.H / a.Hkv;
  // query block: 16 lanes per vector, up to 64 queries (32 rows of AMX tiles pairs)
  // queries per block (16 SIMD lanes per vector; AMX tiles pair 2 x 16 queries); keys per block:
  // 256 for AMX halves the per-key cost of the O^T tile loads/stores against 128 (measured
  // -20% time per key at d = 64 and 128), 64 for the FMA kernels (their scratch stays in L1)
  const int bm = P == Path::amx ? (a.L <= 32 ? 32 : 64) : (a.L <= 16 ? 16 : (a.L <= 32 ? 32 : 64));
  const int NV = bm / 16;
  // (a shorter sequence takes one block of its own length, rounded to the 32-key AMX tile pair:
  // packing and the P @ V tiles then skip the padding of a 256-key block)
  const int64_t bn =
      P == Path::amx ? std::min<int64_t>(256, round_up(std::max<int64_t>(a.S, 1), 32)) : 64;
  const int64_t nqb = (a.L + bm - 1) / bm;

  KVOperands kv;
  std::vector<float> kbuf32, vbuf32;
  std::vector<uint16_t> kbuf16, vbuf16;
  if constexpr (P == Path::f32) {
    prepack_kv_f32<T>(a, kbuf32, vbuf32, kv);
  } else {
#ifdef FA_AVX512
    prepack_kv_bf16(a, bn, P == Path::amx, kbuf16, vbuf16, kv);
#endif
  }

  // tasks ordered (b, kv head, query block, head in group) so heads sharing K/V run together,
  // then sorted longest first
  const int64_t ntask = a.B * a.H * nqb;
  std::vector<int64_t> cost(ntask);
  for (int64_t t = 0; t < ntask; ++t) {
    const int64_t qb = (t / G) % nqb;
    const int64_t q0 = qb * bm, q1 = std::min<int64_t>(a.L, q0 + bm) - 1;
    const int64_t lo = a.wl < 0 ? 0 : std::clamp<int64_t>(q0 + a.off - a.wl, 0, a.S);
    const int64_t hi = a.wr < 0 ? a.S : std::clamp<int64_t>(q1 + a.off + a.wr + 1, 0, a.S);
    cost[t] = std::max<int64_t>(hi - lo, 0) + 1;
  }
  const std::vector<int64_t> order = order_by_cost(cost);

  const int64_t E = a.E, Ev = a.Ev;
  const int64_t Ep = P == Path::f32 ? E : kv.Ep;
  const int64_t Evx = P == Path::f32 ? Ev : kv.Evp;
  // scratch: qt | s | p | mk | ot | m2 | l | alpha | rlo | rhi
  const size_t n_qt = static_cast<size_t>(Ep * bm), n_s = static_cast<size_t>(bn * bm);
  const size_t n_ot = static_cast<size_t>(Evx * bm);
  const size_t total = n_qt + 3 * n_s + n_ot + 5 * static_cast<size_t>(bm);

  run_tasks(
      ntask,
      [&](int64_t task, Scratch& scratch) {
        const int64_t t = order[task];
        const int64_t g = t % G, qbi = (t / G) % nqb, kvh = (t / (G * nqb)) % a.Hkv,
                      b = t / (G * nqb * a.Hkv);
        const int64_t h = kvh * G + g;
        float* base = scratch.get(total);
        float* qt = base;
        float* s = qt + n_qt;
        float* pbuf = s + n_s;
        float* mk = pbuf + n_s;
        float* ot = mk + n_s;
        float* m2 = ot + n_ot;
        float* l = m2 + bm;
        float* alpha = l + bm;
        int32_t* rlo = reinterpret_cast<int32_t*>(alpha + bm);
        int32_t* rhi = rlo + bm;

        const QBlock qb = make_qblock(a, b, h, qbi * bm, bm);
        std::fill(m2, m2 + bm, kNegInf);
        std::fill(l, l + bm, 0.f);
        if (qb.klo > qb.khi)
          std::fill(ot, ot + n_ot, 0.f);  // else the first key block initialises O^T
        if (qb.klo <= qb.khi) {
          if constexpr (P == Path::f32) {
            pack_q_f32<T>(a, qb, qt);
          } else {
#ifdef FA_AVX512
            pack_q_bf16(a, qb, Ep, reinterpret_cast<uint32_t*>(qt));
#endif
          }
          bool first = true;
          for (int64_t kb = qb.klo / bn; kb <= qb.khi / bn; ++kb) {
            // keys past khi are invisible to every query of the block (causal diagonal): cut them
            const int64_t n0 = kb * bn, nk = std::min<int64_t>(bn, qb.khi + 1 - n0);
            const bool full = block_window(a, qb, n0, nk, rlo, rhi);
            const float* mkp = nullptr;
            if (a.mask) {
              pack_mask_t<T>(a, qb, n0, nk, mk);
              mkp = mk;
            }
            if constexpr (P == Path::f32) {
              const float* kr = kv.kf + b * kv.k_batch + kvh * kv.k_head + n0 * kv.k_row;
              const float* vr = kv.vf_ + b * kv.v_batch + kvh * kv.v_head + n0 * kv.v_row;
              gemm_bcast<OpF32>(nk, NV, E, kr, kv.k_row, kv.k_col, qt, bm, s, bm, CInit::zero);
              softmax_block<false, true>(a, qb, n0, nk, nk, s, mkp, full, rlo, rhi, m2, l, alpha,
                                         pbuf);
              gemm_bcast<OpF32>(Ev, NV, nk, vr, kv.v_col, kv.v_row, pbuf, bm, ot, bm,
                                first ? CInit::zero : CInit::scale, alpha);
            } else {
#ifdef FA_AVX512
              const int64_t nkb = kv.Sp / bn;
              const uint16_t* kp = kv.kp + ((b * a.Hkv + kvh) * kv.Sp + n0) * Ep;
              const uint16_t* vt = kv.vt + ((b * a.Hkv + kvh) * nkb + kb) * Evx * bn;
              const uint32_t* qp = reinterpret_cast<const uint32_t*>(qt);
              uint32_t* pp = reinterpret_cast<uint32_t*>(pbuf);
              if constexpr (P == Path::amx) {
                const int64_t nkp = round_up(nk, 32);
                amx_qk(nkp, bm, Ep / 32, kp, qp, s);
                const bool rescale = softmax_block<true, false>(a, qb, n0, nk, nkp, s, mkp, full,
                                                                rlo, rhi, m2, l, alpha, pp);
                if (rescale && !first) {
                  for (int64_t e = 0; e < Evx; ++e)
                    for (int i = 0; i < bm; i += 16)
                      vstore(ot + e * bm + i, vmul(vload(ot + e * bm + i), vload(alpha + i)));
                }
                amx_pv(Evx, bm, bn / 32, nkp / 32, vt, pp, ot, first);
              } else {
                const int64_t nkp = round_up(nk, 2);
                gemm_bcast<OpBf16>(nk, NV, Ep / 2, reinterpret_cast<const uint32_t*>(kp), Ep / 2, 1,
                                   qp, bm, s, bm, CInit::zero);
                softmax_block<true, false>(a, qb, n0, nk, nkp, s, mkp, full, rlo, rhi, m2, l, alpha,
                                           pp);
                gemm_bcast<OpBf16>(Ev, NV, nkp / 2, reinterpret_cast<const uint32_t*>(vt), bn / 2,
                                   1, pp, bm, ot, bm, first ? CInit::zero : CInit::scale, alpha);
              }
#endif
            }
            first = false;
          }
        }
        write_out<T>(a, qb, ot, m2, l, out, lse);
      },
      P == Path::amx);
}

// ---------------------------------------------------------------------------------------------
// backward (fp32 compute for every dtype), two passes so that no output is accumulated by two
// threads: pass 1 owns dK/dV of one key block (summed over the heads of its GQA group and all
// queries), pass 2 owns dQ (and dmask) of one query block. P is recomputed from lse each time.
// ---------------------------------------------------------------------------------------------
struct F32Rows {  // a (B, heads, rows, cols) float view
  const float* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  const float* at(int64_t b, int64_t h, int64_t r) const { return p + b * s0 + h * s1 + r * s2; }
};

// float views of a (B, Hx, N, D) tensor: the tensor itself when it is float, else a converted copy
template <typename T>
F32Rows f32_rows(const T* src, const int64_t* st, int64_t B, int64_t Hx, int64_t N, int64_t D,
                 std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    (void)B;
    (void)Hx;
    (void)N;
    (void)D;
    (void)buf;
    return {src, st[0], st[1], st[2], st[3]};
  } else {
    buf.resize(static_cast<size_t>(B * Hx * N * D));
    float* d = buf.data();
    at::parallel_for(0, B * Hx * N, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (Hx * N), h = (r / N) % Hx, n = r % N;
        load_f32(src + b * st[0] + h * st[1] + n * st[2], st[3], D, d + r * D);
      }
    });
    return {d, Hx * N * D, N * D, D, 1};
  }
}

// dst[c * ld + r] = src[r * rs + c * cs] for r < nr, 0 for nr <= r < nr_pad; c < nc
inline void pack_t(const float* src, int64_t rs, int64_t cs, int64_t nr, int64_t nc, int64_t ld,
                   int64_t nr_pad, float* dst) {
  for (int64_t c = 0; c < nc; ++c) {
    float* d = dst + c * ld;
    const float* sp = src + c * cs;
    for (int64_t r = 0; r < nr; ++r) d[r] = sp[r * rs];
    for (int64_t r = nr; r < nr_pad; ++r) d[r] = 0.f;
  }
}

template <typename T>
void attention_bwd_impl(const AttnArgs& a, const T* dout, const int64_t* sdo, const T* outp,
                        const int64_t* so, const float* lse, const float* glse, T* dq, T* dk, T* dv,
                        T* dmask) {
  const int64_t B = a.B, H = a.H, Hkv = a.Hkv, L = a.L, S = a.S, E = a.E, Ev = a.Ev;
  const int64_t G = H / Hkv;
  const vf sc = vset1(a.scale), log2e = vset1(kLog2e);
  const vf ninf = vset1(kNegInf);

  std::vector<float> qbuf, dobuf, kbuf, vbuf;
  const F32Rows Q = f32_rows<T>(static_cast<const T*>(a.q), a.sq, B, H, L, E, qbuf);
  const F32Rows DO = f32_rows<T>(dout, sdo, B, H, L, Ev, dobuf);
  const F32Rows K = f32_rows<T>(static_cast<const T*>(a.k), a.sk, B, Hkv, S, E, kbuf);
  const F32Rows V = f32_rows<T>(static_cast<const T*>(a.v), a.sv, B, Hkv, S, Ev, vbuf);

  // delta = rowsum(dO * O) - grad_lse
  std::vector<float> delta(static_cast<size_t>(B * H * L), 0.f);
  if (!std::is_same_v<T, float>)
    at::parallel_for(0, B * H * L, 64, [&](int64_t r0, int64_t r1) {
      std::vector<float> orow(static_cast<size_t>(Ev));
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (H * L), h = (r / L) % H, i = r % L;
        load_f32(outp + b * so[0] + h * so[1] + i * so[2], so[3], Ev, orow.data());
        const float* d = DO.at(b, h, i);
        // in double: with |delta| ~ 10 a float running sum loses several ulps, and dS = P (dP -
        // delta) cancels down to far smaller values (O(L * Ev) work, free)
        double acc = 0.0;
        for (int64_t e = 0; e < Ev; ++e) acc += static_cast<double>(d[e * DO.s3]) * orow[e];
        delta[r] = static_cast<float>(acc - (glse ? glse[r] : 0.f));
      }
    });

  // ---- fp32: exact row statistics ----------------------------------------------------------
  // Two fp32-specific error sources, each of which alone made dq/dmask 3-4x less accurate than
  // fp32 PyTorch (which recomputes the softmax and uses delta = sum_j P dP):
  //  * a float32 lse carries up to half an ulp of |lse| of rounding (2.4e-7 for |lse| in [4, 8)),
  //    which every recomputed P inherits as a relative error;
  //  * delta = rowsum(dO * O) does not share the rounding of the dP values it is subtracted from
  //    in dS = P (dP - delta); where dP - delta cancels, dS keeps the full error of dP.
  // One extra sweep (Q.K^T and dO.V^T per block, ~25% of the backward) measures the row sums
  // r = sum_j exp(y - lse) and u = sum_j exp(y - lse) dP, computed exactly as the later passes
  // compute them (same kernels, same summation order, so bitwise the same P and dP), and uses
  // lse + log(r) and delta = u / r. bf16/fp16 inputs round far above this: they use the given lse
  // and rowsum(dO * O).
  std::vector<float> lse_ref;
  if constexpr (std::is_same_v<T, float>) {
    lse_ref.assign(lse, lse + B * H * L);
    const int bm = L <= 16 ? 16 : (L <= 32 ? 32 : 64);
    const int NV = bm / 16;
    constexpr int64_t bn = 64;
    const int64_t nqb = (L + bm - 1) / bm;
    const size_t n_qt = static_cast<size_t>(E * bm), n_dot = static_cast<size_t>(Ev * bm);
    const size_t n_blk = static_cast<size_t>(bn * bm);
    run_tasks(B * H * nqb, [&](int64_t t, Scratch& scratch) {
      const int64_t qbi = t % nqb, h = (t / nqb) % H, b = t / (nqb * H), kvh = h / G;
      const QBlock qb = make_qblock(a, b, h, qbi * bm, bm);
      if (qb.klo > qb.khi) return;
      float* qt = scratch.get(n_qt + n_dot + 3 * n_blk + 5 * static_cast<size_t>(bm));
      float* dot = qt + n_qt;
      float* sb = dot + n_dot;
      float* db = sb + n_blk;
      float* mk = db + n_blk;
      float* l2 = mk + n_blk;
      float* rs = l2 + bm;
      float* us = rs + bm;
      int32_t* rlo = reinterpret_cast<int32_t*>(us + bm);
      int32_t* rhi = rlo + bm;
      pack_t(Q.at(b, h, qb.q0), Q.s2, Q.s3, qb.nq, E, bm, bm, qt);
      pack_t(DO.at(b, h, qb.q0), DO.s2, DO.s3, qb.nq, Ev, bm, bm, dot);
      for (int i = 0; i < bm; ++i) {
        l2[i] = i < qb.nq ? lse[(b * H + h) * L + qb.q0 + i] : kNegInf;
        rs[i] = 0.f;
        us[i] = 0.f;
      }
      const uint32_t dkey = a.drop.on ? a.drop.key(b * H + h) : 0;
      for (int64_t kb = qb.klo / bn; kb <= qb.khi / bn; ++kb) {
        const int64_t n0 = kb * bn, nk = std::min<int64_t>(bn, S - n0);
        const bool full = block_window(a, qb, n0, nk, rlo, rhi);
        if (a.mask) pack_mask_t<T>(a, qb, n0, nk, mk);
        gemm_bcast<OpF32>(nk, NV, E, K.at(b, kvh, n0), K.s2, K.s3, qt, bm, sb, bm, CInit::zero);
        gemm_bcast<OpF32>(nk, NV, Ev, V.at(b, kvh, n0), V.s2, V.s3, dot, bm, db, bm, CInit::zero);
        for (int qv = 0; qv < bm; qv += 16) {
          const vf vl2 = vload(l2 + qv);
          const vm live = vcmp_neq(vl2, ninf);
          const vi vlo = viload(rlo + qv), vhi = viload(rhi + qv);
          vi drow{};
          if (a.drop.on) {
            alignas(64) int32_t rr[16];
            for (int i = 0; i < 16; ++i)
              rr[i] = static_cast<int32_t>(Dropout::row(dkey, qb.q0 + qv + i));
            drow = viload(rr);
          }
          vf racc = vload(rs + qv), uacc = vload(us + qv);
          for (int64_t j = 0; j < nk; ++j) {
            const vf y = a.mask ? vfma(vload(sb + j * bm + qv), sc, vload(mk + j * bm + qv))
                                : vmul(vload(sb + j * bm + qv), sc);
            vm vis = live;
            if (!full) {
              const vi vj = viset1(static_cast<int32_t>(j));
              vis = vis & vi_le(vlo, vj) & vi_lt(vj, vhi);
            }
            const vf p = vmaskz(vis, vexp2<6>(vmul(vsub(y, vl2), log2e)));
            vf dp = vload(db + j * bm + qv);
            if (a.drop.on) {
              const vi hsh =
                  vishr(vfmix32(viadd(drow, viset1(static_cast<int32_t>(
                                                static_cast<uint32_t>(n0 + j) * kGolden32)))),
                        8);
              dp = vmaskz(vu_ge(hsh, viset1(static_cast<int32_t>(a.drop.threshold))),
                          vmul(dp, vset1(a.drop.inv_keep)));
            }
            racc = vadd(racc, p);
            uacc = vfma(p, dp, uacc);
          }
          vstore(rs + qv, racc);
          vstore(us + qv, uacc);
        }
      }
      for (int64_t i = 0; i < qb.nq; ++i) {
        const int64_t row = (b * H + h) * L + qb.q0 + i;
        if (rs[i] > 0.f) {
          lse_ref[static_cast<size_t>(row)] = lse[row] + std::log(rs[i]);
          delta[static_cast<size_t>(row)] = us[i] / rs[i] - (glse ? glse[row] : 0.f);
        }
      }
    });
    lse = lse_ref.data();
  }

  // ---- pass 1: dK, dV per (b, kv head, key block of 64) ------------------------------------
  {
    constexpr int64_t bn = 64, NV = 4, bq = 64;
    const int64_t nkb = (S + bn - 1) / bn;
    const int64_t ntask = B * Hkv * nkb;
    auto qrange = [&](int64_t n0, int64_t nk, int64_t& i0, int64_t& i1) {
      i0 = a.wr < 0 ? 0 : std::max<int64_t>(0, n0 - a.off - a.wr);
      i1 = a.wl < 0 ? L : std::min<int64_t>(L, n0 + nk - 1 - a.off + a.wl + 1);
    };
    std::vector<int64_t> cost(ntask);
    for (int64_t t = 0; t < ntask; ++t) {
      const int64_t kb = t % nkb, n0 = kb * bn;
      int64_t i0, i1;
      qrange(n0, std::min(bn, S - n0), i0, i1);
      cost[t] = std::max<int64_t>(0, i1 - i0) + 1;
    }
    const std::vector<int64_t> order = order_by_cost(cost);
    const size_t n_kt = static_cast<size_t>(E * bn), n_vt = static_cast<size_t>(Ev * bn);
    const size_t n_blk = static_cast<size_t>(bq * bn);
    run_tasks(ntask, [&](int64_t task, Scratch& scratch) {
      const int64_t t = order[task];
      const int64_t kb = t % nkb, kvh = (t / nkb) % Hkv, b = t / (nkb * Hkv);
      const int64_t n0 = kb * bn, nk = std::min(bn, S - n0);
      float* kt = scratch.get(2 * n_kt + 2 * n_vt + 2 * n_blk + bn);
      float* vt = kt + n_kt;
      float* dkt = vt + n_vt;
      float* dvt = dkt + n_kt;
      float* sb = dvt + n_vt;
      float* db = sb + n_blk;
      float* mrow = db + n_blk;
      pack_t(K.at(b, kvh, n0), K.s2, K.s3, nk, E, bn, bn, kt);
      pack_t(V.at(b, kvh, n0), V.s2, V.s3, nk, Ev, bn, bn, vt);
      std::fill(dkt, dkt + n_kt, 0.f);
      std::fill(dvt, dvt + n_vt, 0.f);
      int64_t qa, qz;
      qrange(n0, nk, qa, qz);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kvh * G + g;
        const uint32_t dkey = a.drop.on ? a.drop.key(b * H + h) : 0;
        const T* mbase =
            a.mask ? static_cast<const T*>(a.mask) + b * a.sm[0] + h * a.sm[1] + n0 * a.sm[3]
                   : nullptr;
        for (int64_t i0 = qa; i0 < qz; i0 += bq) {
          const int64_t ni = std::min(bq, qz - i0);
          gemm_bcast<OpF32>(ni, NV, E, Q.at(b, h, i0), Q.s2, Q.s3, kt, bn, sb, bn, CInit::zero);
          gemm_bcast<OpF32>(ni, NV, Ev, DO.at(b, h, i0), DO.s2, DO.s3, vt, bn, db, bn, CInit::zero);
          for (int64_t r = 0; r < ni; ++r) {
            const int64_t i = i0 + r, row = (b * H + h) * L + i;
            float* srow = sb + r * bn;
            float* drow = db + r * bn;
            const int64_t jlo = std::clamp<int64_t>(vis_lo(a, i) - n0, 0, nk);
            const int64_t jhi = std::clamp<int64_t>(vis_hi(a, i) - n0 + 1, 0, nk);
            const float l2 = lse[row];
            if (jlo >= jhi || l2 == kNegInf) {
              for (int64_t j = 0; j < bn; j += 16) {
                vstore(srow + j, vzero());
                vstore(drow + j, vzero());
              }
              continue;
            }
            if (mbase) {
              load_f32(mbase + i * a.sm[2], a.sm[3], nk, mrow);
              for (int64_t j = nk; j < bn; ++j) mrow[j] = 0.f;
            }
            const vf vl2 = vset1(l2), vdel = vset1(delta[static_cast<size_t>(row)]);
            const vi vlo = viset1(static_cast<int32_t>(jlo)),
                     vhi = viset1(static_cast<int32_t>(jhi));
            const uint32_t drh = a.drop.on ? Dropout::row(dkey, i) : 0;
            for (int64_t j = 0; j < bn; j += 16) {
              const vi vj = viadd(viiota(), viset1(static_cast<int32_t>(j)));
              const vm vis = vi_le(vlo, vj) & vi_lt(vj, vhi);
              const vf y =
                  mbase ? vfma(vload(srow + j), sc, vload(mrow + j)) : vmul(vload(srow + j), sc);
              const vf p = vmaskz(vis, vexp2<6>(vmul(vsub(y, vl2), log2e)));
              vf dp = vload(drow + j);
              vf pd = p;
              if (a.drop.on) {
                const vi hsh =
                    vishr(vfmix32(viadd(viset1(static_cast<int32_t>(drh)),
                                        vimul(viadd(vj, viset1(static_cast<int32_t>(n0))),
                                              viset1(static_cast<int32_t>(kGolden32))))),
                          8);
                const vm keep = vu_ge(hsh, viset1(static_cast<int32_t>(a.drop.threshold)));
                const vf z = vmaskz(keep, vset1(a.drop.inv_keep));
                dp = vmul(dp, z);
                pd = vmul(p, z);
              }
              vstore(srow + j, pd);
              vstore(drow + j, vmul(p, vsub(dp, vdel)));  // dS
            }
          }
          // dV^T[e][j] += sum_r dO[r][e] Pd[r][j];  dK^T[e][j] += sum_r Q[r][e] dS[r][j]
          gemm_bcast<OpF32>(Ev, NV, ni, DO.at(b, h, i0), DO.s3, DO.s2, sb, bn, dvt, bn,
                            CInit::load);
          gemm_bcast<OpF32>(E, NV, ni, Q.at(b, h, i0), Q.s3, Q.s2, db, bn, dkt, bn, CInit::load);
        }
      }
      for (int64_t j = 0; j < nk; ++j) {
        T* dkr = dk + ((b * Hkv + kvh) * S + n0 + j) * E;
        T* dvr = dv + ((b * Hkv + kvh) * S + n0 + j) * Ev;
        for (int64_t e = 0; e < E; ++e) dkr[e] = static_cast<T>(dkt[e * bn + j] * a.scale);
        for (int64_t e = 0; e < Ev; ++e) dvr[e] = static_cast<T>(dvt[e * bn + j]);
      }
    });
  }

  // ---- pass 2: dQ (and dmask) per (b, head, query block) ------------------------------------
  {
    const int bm = L <= 16 ? 16 : (L <= 32 ? 32 : 64);
    const int NV = bm / 16;
    constexpr int64_t bn = 64;
    const int64_t nqb = (L + bm - 1) / bm;
    const int64_t ntask = B * H * nqb;
    std::vector<int64_t> cost(ntask);
    for (int64_t t = 0; t < ntask; ++t) {
      const QBlock qb = make_qblock(a, 0, 0, (t % nqb) * bm, bm);
      cost[t] = std::max<int64_t>(0, qb.khi - qb.klo + 1) + 1;
    }
    const std::vector<int64_t> order = order_by_cost(cost);
    const size_t n_qt = static_cast<size_t>(E * bm), n_dot = static_cast<size_t>(Ev * bm);
    const size_t n_blk = static_cast<size_t>(bn * bm);
    run_tasks(ntask, [&](int64_t task, Scratch& scratch) {
      const int64_t t = order[task];
      const int64_t qbi = t % nqb, h = (t / nqb) % H, b = t / (nqb * H), kvh = h / G;
      const QBlock qb = make_qblock(a, b, h, qbi * bm, bm);
      float* qt = scratch.get(2 * n_qt + n_dot + 3 * n_blk + 2 * static_cast<size_t>(bm) +
                              2 * static_cast<size_t>(bm));
      float* dqt = qt + n_qt;
      float* dot = dqt + n_qt;
      float* sb = dot + n_dot;
      float* db = sb + n_blk;
      float* mk = db + n_blk;
      float* l2 = mk + n_blk;
      float* del = l2 + bm;
      int32_t* rlo = reinterpret_cast<int32_t*>(del + bm);
      int32_t* rhi = rlo + bm;
      std::fill(dqt, dqt + n_qt, 0.f);
      if (qb.klo <= qb.khi) {
        pack_t(Q.at(b, h, qb.q0), Q.s2, Q.s3, qb.nq, E, bm, bm, qt);
        pack_t(DO.at(b, h, qb.q0), DO.s2, DO.s3, qb.nq, Ev, bm, bm, dot);
        for (int i = 0; i < bm; ++i) {
          const size_t row = static_cast<size_t>((b * H + h) * L + qb.q0 + i);
          l2[i] = i < qb.nq ? lse[row] : kNegInf;
          del[i] = i < qb.nq ? delta[row] : 0.f;
        }
        const uint32_t dkey = a.drop.on ? a.drop.key(b * H + h) : 0;
        for (int64_t kb = qb.klo / bn; kb <= qb.khi / bn; ++kb) {
          const int64_t n0 = kb * bn, nk = std::min<int64_t>(bn, S - n0);
          const bool full = block_window(a, qb, n0, nk, rlo, rhi);
          if (a.mask) pack_mask_t<T>(a, qb, n0, nk, mk);
          gemm_bcast<OpF32>(nk, NV, E, K.at(b, kvh, n0), K.s2, K.s3, qt, bm, sb, bm, CInit::zero);
          gemm_bcast<OpF32>(nk, NV, Ev, V.at(b, kvh, n0), V.s2, V.s3, dot, bm, db, bm, CInit::zero);
          for (int qv = 0; qv < bm; qv += 16) {
            const vf vl2 = vload(l2 + qv), vdel = vload(del + qv);
            const vm live = vcmp_neq(vl2, ninf);
            const vi vlo = viload(rlo + qv), vhi = viload(rhi + qv);
            vi drow{};
            if (a.drop.on) {
              alignas(64) int32_t rr[16];
              for (int i = 0; i < 16; ++i)
                rr[i] = static_cast<int32_t>(Dropout::row(dkey, qb.q0 + qv + i));
              drow = viload(rr);
            }
            for (int64_t j = 0; j < nk; ++j) {
              const vf y = a.mask ? vfma(vload(sb + j * bm + qv), sc, vload(mk + j * bm + qv))
                                  : vmul(vload(sb + j * bm + qv), sc);
              vm vis = live;
              if (!full) {
                const vi vj = viset1(static_cast<int32_t>(j));
                vis = vis & vi_le(vlo, vj) & vi_lt(vj, vhi);
              }
              const vf p = vmaskz(vis, vexp2<6>(vmul(vsub(y, vl2), log2e)));
              vf dp = vload(db + j * bm + qv);
              if (a.drop.on) {
                const vi hsh =
                    vishr(vfmix32(viadd(drow, viset1(static_cast<int32_t>(
                                                  static_cast<uint32_t>(n0 + j) * kGolden32)))),
                          8);
                dp = vmaskz(vu_ge(hsh, viset1(static_cast<int32_t>(a.drop.threshold))),
                            vmul(dp, vset1(a.drop.inv_keep)));
              }
              vstore(db + j * bm + qv, vmul(p, vsub(dp, vdel)));  // dS^T
            }
          }
          if (dmask) {
            for (int64_t i = 0; i < qb.nq; ++i) {
              T* dm = dmask + ((b * H + h) * L + qb.q0 + i) * S + n0;
              for (int64_t j = 0; j < nk; ++j) dm[j] = static_cast<T>(db[j * bm + i]);
            }
          }
          // dQ^T[e][i] += sum_j K[j][e] dS^T[j][i]
          gemm_bcast<OpF32>(E, NV, nk, K.at(b, kvh, n0), K.s3, K.s2, db, bm, dqt, bm, CInit::load);
        }
      }
      for (int64_t i = 0; i < qb.nq; ++i) {
        T* dqr = dq + ((b * H + h) * L + qb.q0 + i) * E;
        for (int64_t e = 0; e < E; ++e) dqr[e] = static_cast<T>(dqt[e * bm + i] * a.scale);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// decoding: few query rows (G heads x Lq tokens <= 16 per kv head) against a long cache. Memory
// bound: every (b, kv head) reads its cache slice once for all its query rows, split along the
// cache length into chunks (flash-decoding) so that B * Hkv small still fills the threads; the
// chunks' partial (max, sum, output) are combined in a fixed order.
// ---------------------------------------------------------------------------------------------
#ifdef FA_AVX512
// 16 elements from p (first n valid, zeros after) as float, without reading past n
template <typename T>
FA_INLINE __m512 load_cvt(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  } else {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
}

// One query row against keys [n_begin, n_end) of one kv head, everything in registers: q and
// the output accumulators are NC vectors each (E, Ev <= 16 * NC), K/V rows contiguous. Writes the
// unnormalised output, max and sum to part (layout of attention_decode_impl's partials).
template <typename T, int NC>
void decode_row(const AttnArgs& a, const T* qr, const T* kbase, const T* vbase, int64_t n_begin,
                int64_t n_end, int64_t hi, float* part_row, int64_t Ev16) {
  __m512 q[NC], o[NC];
  __mmask16 mk[NC], mv[NC];
  for (int c = 0; c < NC; ++c) {
    const int64_t ne = std::clamp<int64_t>(a.E - 16 * c, 0, 16),
                  nv = std::clamp<int64_t>(a.Ev - 16 * c, 0, 16);
    mk[c] = static_cast<__mmask16>((1u << ne) - 1u);
    mv[c] = static_cast<__mmask16>((1u << nv) - 1u);
    q[c] = _mm512_mul_ps(load_cvt(qr + 16 * c, mk[c]), _mm512_set1_ps(a.scale));
    o[c] = _mm512_setzero_ps();
  }
  float m = kNegInf, l = 0.f;
  alignas(64) float sc[16];
  const int64_t kl = std::max<int64_t>(1, a.E * static_cast<int64_t>(sizeof(T)) / 64);
  const int64_t vl = std::max<int64_t>(1, a.Ev * static_cast<int64_t>(sizeof(T)) / 64);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 16) {
    const int64_t nk = std::min<int64_t>(16, n_end - n0);
    for (int64_t j = n0 + 48; j < std::min(n0 + 64, n_end); ++j) {
      const char* kp = reinterpret_cast<const char*>(kbase + j * a.sk[2]);
      const char* vp = reinterpret_cast<const char*>(vbase + j * a.sv[2]);
      for (int64_t x = 0; x < kl; ++x) _mm_prefetch(kp + 64 * x, _MM_HINT_T0);
      for (int64_t x = 0; x < vl; ++x) _mm_prefetch(vp + 64 * x, _MM_HINT_T0);
    }
    for (int64_t j = 0; j < nk; ++j) {
      const T* kr = kbase + (n0 + j) * a.sk[2];
      __m512 acc = _mm512_mul_ps(q[0], load_cvt(kr, mk[0]));
      for (int c = 1; c < NC; ++c) acc = _mm512_fmadd_ps(q[c], load_cvt(kr + 16 * c, mk[c]), acc);
      sc[j] = _mm512_reduce_add_ps(acc);
    }
    // keys > hi (causal) and past the group are invisible
    const int64_t nvis = std::clamp<int64_t>(hi - n0 + 1, 0, nk);
    const __m512 s = _mm512_mask_blend_ps(static_cast<__mmask16>((1u << nvis) - 1u),
                                          _mm512_set1_ps(kNegInf), _mm512_load_ps(sc));
    const float mnew = std::max(m, _mm512_reduce_max_ps(s));
    if (mnew == kNegInf) continue;
    const __m512 p =
        vexp2<6>(_mm512_mul_ps(_mm512_sub_ps(s, _mm512_set1_ps(mnew)), _mm512_set1_ps(kLog2e)));
    const float al = std::exp(m - mnew);
    l = l * al + _mm512_reduce_add_ps(p);
    m = mnew;
    _mm512_store_ps(sc, p);
    for (int c = 0; c < NC; ++c) o[c] = _mm512_mul_ps(o[c], _mm512_set1_ps(al));
    for (int64_t j = 0; j < nvis; ++j) {
      const T* vr = vbase + (n0 + j) * a.sv[2];
      const __m512 pj = _mm512_set1_ps(sc[j]);
      for (int c = 0; c < NC; ++c) o[c] = _mm512_fmadd_ps(pj, load_cvt(vr + 16 * c, mv[c]), o[c]);
    }
  }
  for (int c = 0; c < NC && 16 * c < Ev16; ++c) _mm512_storeu_ps(part_row + 16 * c, o[c]);
  part_row[Ev16] = m;
  part_row[Ev16 + 1] = l;
}
#endif

template <typename T>
void attention_decode_impl(const AttnArgs& a, const int64_t* begin, const int64_t* total,
                           int64_t Lq, bool causal, T* out) {
  const int64_t B = a.B, H = a.H, Hkv = a.Hkv, E = a.E, Ev = a.Ev;
  const int64_t G = H / Hkv, R = G * Lq;
  const int64_t E16 = round_up(E, 16), Ev16 = round_up(Ev, 16);
  int64_t max_total = 0;
  for (int64_t b = 0; b < B; ++b) max_total = std::max(max_total, total[b]);
  const int64_t nthreads = at::get_num_threads();
  const int64_t want = std::max<int64_t>(1, (4 * nthreads + B * Hkv - 1) / (B * Hkv));
  const int64_t csz = round_up(std::max<int64_t>(256, (max_total + want - 1) / want), 64);
  const int64_t nchunk = std::max<int64_t>(1, (max_total + csz - 1) / csz);
  const int64_t pstride = R * (Ev16 + 2);
  std::vector<float> part(static_cast<size_t>(B * Hkv * nchunk * pstride));
  const float qscale = a.scale;

  run_tasks(B * Hkv * nchunk, [&](int64_t t, Scratch& scratch) {
    const int64_t ch = t % nchunk, kvh = (t / nchunk) % Hkv, b = t / (nchunk * Hkv);
#ifdef FA_AVX512
    // one query row per kv head (MHA decoding, the common case): registers only
    if (R == 1 && a.sk[3] == 1 && a.sv[3] == 1 && a.sq[3] == 1 && std::max(E, Ev) <= 256) {
      const T* qr = static_cast<const T*>(a.q) + b * a.sq[0] + kvh * a.sq[1];
      const T* kb = static_cast<const T*>(a.k) + b * a.sk[0] + kvh * a.sk[1];
      const T* vb = static_cast<const T*>(a.v) + b * a.sv[0] + kvh * a.sv[1];
      const int64_t n_begin = std::max(ch * csz, begin[b]), n_stop = std::min(total[b], (ch + 1) * csz);
      const int64_t hi = total[b] - 1;  // Lq = 1: the query is the last position and sees every key
      float* pr = part.data() + t * pstride;
      const int64_t nc = (std::max(E, Ev) + 15) / 16;
      if (nc <= 2)
        decode_row<T, 2>(a, qr, kb, vb, n_begin, n_stop, hi, pr, Ev16);
      else if (nc <= 4)
        decode_row<T, 4>(a, qr, kb, vb, n_begin, n_stop, hi, pr, Ev16);
      else if (nc <= 8)
        decode_row<T, 8>(a, qr, kb, vb, n_begin, n_stop, hi, pr, Ev16);
      else
        decode_row<T, 16>(a, qr, kb, vb, n_begin, n_stop, hi, pr, Ev16);
      return;
    }
#endif
    float* qs = scratch.get(
        static_cast<size_t>(R * E16 + R * Ev16 + 16 * E16 + 16 * Ev16 + 4 * R * 16 + 64));
    float* o = qs + R * E16;
    float* kr = o + R * Ev16;
    float* vr = kr + 16 * E16;
    float* sc = vr + 16 * Ev16;  // [R][16] scores, then probabilities
    float* m2 = sc + R * 16;
    float* l = m2 + R;
    float* al = l + R;
    const int64_t n_end = std::min(total[b], (ch + 1) * csz);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = r / Lq, i = r % Lq;
      const T* qr =
          static_cast<const T*>(a.q) + b * a.sq[0] + (kvh * G + g) * a.sq[1] + i * a.sq[2];
      load_f32(qr, a.sq[3], E, qs + r * E16);
      for (int64_t e = 0; e < E16; ++e) qs[r * E16 + e] = e < E ? qs[r * E16 + e] * qscale : 0.f;
      m2[r] = kNegInf;
      l[r] = 0.f;
    }
    std::fill(o, o + R * Ev16, 0.f);
    std::fill(kr, kr + 16 * E16, 0.f);
    std::fill(vr, vr + 16 * Ev16, 0.f);
    const T* kbase = static_cast<const T*>(a.k) + b * a.sk[0] + kvh * a.sk[1];
    const T* vbase = static_cast<const T*>(a.v) + b * a.sv[0] + kvh * a.sv[1];
    // memory bound: keep a few KiB of K and V rows in flight ahead of the loads (the row loads
    // were ~70% of the time waiting on L3/DRAM before)
    const int64_t kline = std::max<int64_t>(1, E * static_cast<int64_t>(sizeof(T)) / 64);
    const int64_t vline = std::max<int64_t>(1, Ev * static_cast<int64_t>(sizeof(T)) / 64);
    const bool pf_rows = a.sk[3] == 1 && a.sv[3] == 1;
    for (int64_t n0 = std::max(ch * csz, begin[b]); n0 < n_end; n0 += 16) {
      const int64_t nk = std::min<int64_t>(16, n_end - n0);
      if (pf_rows) {
        for (int64_t j = n0 + 48; j < std::min(n0 + 64, n_end); ++j) {
          const char* kp = reinterpret_cast<const char*>(kbase + j * a.sk[2]);
          const char* vp = reinterpret_cast<const char*>(vbase + j * a.sv[2]);
          for (int64_t x = 0; x < kline; ++x) __builtin_prefetch(kp + 64 * x, 0, 3);
          for (int64_t x = 0; x < vline; ++x) __builtin_prefetch(vp + 64 * x, 0, 3);
        }
      }
      for (int64_t j = 0; j < nk; ++j)
        load_f32(kbase + (n0 + j) * a.sk[2], a.sk[3], E, kr + j * E16);
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t j = 0; j < nk; ++j) {
          vf acc = vzero();
          for (int64_t e = 0; e < E16; e += 16)
            acc = vfma(vload(qs + r * E16 + e), vload(kr + j * E16 + e), acc);
          sc[r * 16 + j] = vhsum(acc);
        }
        // causal: query i of Lq sees keys [0, total - Lq + i]
        const int64_t hi = causal ? total[b] - Lq + r % Lq : total[b] - 1;
        const int64_t nvis = std::clamp<int64_t>(hi - n0 + 1, 0, nk);
        for (int64_t j = nvis; j < 16; ++j) sc[r * 16 + j] = kNegInf;
        const vf s = vload(sc + r * 16);
        const float mnew = std::max(m2[r], vhmax(s));
        if (mnew == kNegInf) {
          vstore(sc + r * 16, vzero());
          al[r] = 1.f;
          continue;
        }
        const vf p = vexp2<6>(vmul(vsub(s, vset1(mnew)), vset1(kLog2e)));
        al[r] = std::exp(m2[r] - mnew);  // 0 when m2 was -inf
        l[r] = l[r] * al[r] + vhsum(p);
        m2[r] = mnew;
        vstore(sc + r * 16, p);
      }
      for (int64_t j = 0; j < nk; ++j)
        load_f32(vbase + (n0 + j) * a.sv[2], a.sv[3], Ev, vr + j * Ev16);
      for (int64_t r = 0; r < R; ++r) {
        const float* pr = sc + r * 16;
        for (int64_t e = 0; e < Ev16; e += 16) {
          vf acc = vmul(vload(o + r * Ev16 + e), vset1(al[r]));
          for (int64_t j = 0; j < nk; ++j) acc = vfma(vset1(pr[j]), vload(vr + j * Ev16 + e), acc);
          vstore(o + r * Ev16 + e, acc);
        }
      }
    }
    float* pt = part.data() + t * pstride;
    for (int64_t r = 0; r < R; ++r) {
      std::copy(o + r * Ev16, o + (r + 1) * Ev16, pt + r * (Ev16 + 2));
      pt[r * (Ev16 + 2) + Ev16] = m2[r];
      pt[r * (Ev16 + 2) + Ev16 + 1] = l[r];
    }
  });

  // combine the chunks in order
  at::parallel_for(0, B * Hkv * R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> acc(static_cast<size_t>(Ev));
    for (int64_t x = r0; x < r1; ++x) {
      const int64_t r = x % R, kvh = (x / R) % Hkv, b = x / (R * Hkv);
      const float* p0 = part.data() + ((b * Hkv + kvh) * nchunk) * pstride + r * (Ev16 + 2);
      float M = kNegInf;
      for (int64_t ch = 0; ch < nchunk; ++ch) M = std::max(M, p0[ch * pstride + Ev16]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float lsum = 0.f;
      if (M != kNegInf) {
        for (int64_t ch = 0; ch < nchunk; ++ch) {
          const float* pc = p0 + ch * pstride;
          if (pc[Ev16] == kNegInf) continue;
          const float w = std::exp(pc[Ev16] - M);
          lsum += pc[Ev16 + 1] * w;
          for (int64_t e = 0; e < Ev; ++e) acc[e] += pc[e] * w;
        }
      }
      const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
      const int64_t g = r / Lq, i = r % Lq;
      T* orow = out + ((b * H + kvh * G + g) * Lq + i) * Ev;
      for (int64_t e = 0; e < Ev; ++e) orow[e] = static_cast<T>(acc[e] * inv);
    }
  });
}

#undef FA_INLINE
