// CPU attention kernels: the online softmax of the forward, and the probabilities / dropout draw
// that the backward recomputes the same way.
// No include guard: kernels.h includes it once per instruction-set build.

// ---------------------------------------------------------------------------------------------
// the probabilities and the dropout draw, one definition for the forward and the backward: the
// backward recomputes P from lse and redraws the keep mask, so any difference in how they are
// computed would show as a gradient error
// ---------------------------------------------------------------------------------------------
// logits y = s * scale + mask (mk: the mask's 16 lanes, or nullptr for none)
FA_INLINE vf logits(vf s, vf scale, const float* mk) {
  return mk ? vfma(s, scale, vload(mk)) : vmul(s, scale);
}

// p = e^(y - ref) = 2^((y - ref) log2 e), subtracting before scaling so that the error of p does
// not grow with |ref|: the fp32 forward and decoding (ref = the running max), the backward
// (ref = lse), and the rescale factor of the running sum
FA_INLINE vf exp_from(vf y, vf ref) { return vexp2<6>(vmul(vsub(y, ref), vset1(kLog2e))); }

// Dropout::row of queries i0 .. i0 + 15, lanes along queries
FA_INLINE vi drop_rows(uint32_t key, int64_t i0) {
  alignas(64) int32_t r[16];
  for (int i = 0; i < 16; ++i) r[i] = static_cast<int32_t>(Dropout::row(key, i0 + i));
  return viload(r);
}
// j * kGolden32 of key j on every lane (lanes along queries)
FA_INLINE vi drop_col(int64_t j) {
  return viset1(static_cast<int32_t>(static_cast<uint32_t>(j) * kGolden32));
}
// keep mask of 16 cells, Dropout::cell(row, j) >= threshold, from their row hashes and their
// j * kGolden32 (one of the two a broadcast, whichever way the lanes run)
FA_INLINE vm drop_keep(const Dropout& d, vi rows, vi cols) {
  const vi h = vishr(vfmix32(viadd(rows, cols)), 8);
  return vu_ge(h, viset1(static_cast<int32_t>(d.threshold)));
}
// x / (1 - dropout_p) where kept, 0 where dropped
FA_INLINE vf drop_apply(const Dropout& d, vm keep, vf x) {
  return vmaskz(keep, vmul(x, vset1(d.inv_keep)));
}

// ---------------------------------------------------------------------------------------------
// the forward's online softmax
// ---------------------------------------------------------------------------------------------
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
        vf y = logits(vload(sq + j * bm + 16 * g), sc, mq ? mq + j * bm + 16 * g : nullptr);
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
    vstore(alpha + qv0 + 16 * g, exp_from(mold, msafe[g]));
    sum[g] = vzero();
  }
  // pass 2: probabilities
  vi drow[G] = {};  // set under dropout only; zeroed, else GCC 12 warns (maybe-uninitialized)
  if (a.drop.on) {
    const uint32_t dkey = a.drop.key(qb.b * a.H + qb.h);
    for (int g = 0; g < G; ++g) drow[g] = drop_rows(dkey, qb.q0 + qv0 + 16 * g);
  }
  auto prob = [&](int64_t j, int g) -> vf {
    if (j >= nk) return vzero();
    const vf x = vload(sq + j * bm + 16 * g);
    vf p;
    if constexpr (PRECISE) {
      p = exp_from(x, msafe[g]);
    } else {
      p = vexp2<5>(store_y ? vfma(x, log2e, negm2[g]) : vfma(x, c, negm2[g]));
    }
    sum[g] = vadd(sum[g], p);
    if (a.drop.on) p = drop_apply(a.drop, drop_keep(a.drop, drow[g], drop_col(n0 + j)), p);
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
