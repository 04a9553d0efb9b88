// CPU attention kernels: 16-lane vectors (AVX-512 or portable loops), the exp2 used by the
// softmax, element conversion, and the AVX-512 bf16 pair packing / transpose / stores.
// No include guard: kernels.h includes it once per instruction-set build.

// ---------------------------------------------------------------------------------------------
// 16-lane float / int vectors
// ---------------------------------------------------------------------------------------------
#ifdef FA_AVX512
#define FA_INLINE inline __attribute__((always_inline))
#define FA_INLINE_LAMBDA __attribute__((always_inline))  // [&](...) FA_INLINE_LAMBDA { ... }
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
#define FA_INLINE_LAMBDA
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
// AVX-512 only: bf16 VNNI pairs, 16 x 16 transposes, stores converting to T
// ---------------------------------------------------------------------------------------------
#ifdef FA_AVX512
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

// vector form of fmix32 (Dropout, attention.cpp): lanes hash independently
FA_INLINE vi vfmix32(vi x) {
  x = vixor(x, vishr(x, 16));
  x = vimul(x, viset1(static_cast<int32_t>(0x85ebca6bu)));
  x = vixor(x, vishr(x, 13));
  x = vimul(x, viset1(static_cast<int32_t>(0xc2b2ae35u)));
  return vixor(x, vishr(x, 16));
}
