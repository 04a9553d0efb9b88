// CPU attention kernels: the register-blocked broadcast GEMM micro-kernels (fp32 FMA and
// vdpbf16ps) behind every Q.K^T and P.V product outside the AMX path.
// No include guard: kernels.h includes it once per instruction-set build.

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
