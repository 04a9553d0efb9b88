// CPU attention kernels: decoding against a KV cache (flash-decoding over cache chunks).
// No include guard: kernels.h includes it once per instruction-set build.

// ---------------------------------------------------------------------------------------------
// decoding: few query rows (G heads x Lq tokens <= 16 per kv head) against a long cache. Memory
// bound: every (b, kv head) reads its cache slice once for all its query rows, split along the
// cache length into chunks (flash-decoding) so that B * Hkv small still fills the threads; the
// chunks' partial (max, sum, output) are combined in a fixed order.
// ---------------------------------------------------------------------------------------------
// The key (or value) rows of one (sequence, kv head): contiguous at stride s_tok, or paged
// (attention_kvcache's block_table): token t in block blocks[t / bs], slot t % bs, blocks s_blk
// apart. A tile of up to 16 consecutive tokens costs one division.
template <typename T>
struct KvRows {
  const T* base;  // contiguous: the (b, kv head) slice; paged: the kv head's offset in the pool
  int64_t s_tok;
  const int32_t* blocks = nullptr;  // paged: the sequence's row of block_table
  int64_t bs = 0, s_blk = 0;
  // p[j] = the row of token t0 + j, j < n
  FA_INLINE void rows(int64_t t0, int64_t n, const T** p) const {
    if (blocks == nullptr) {
      for (int64_t j = 0; j < n; ++j) p[j] = base + (t0 + j) * s_tok;
      return;
    }
    int64_t blk = t0 / bs, slot = t0 - blk * bs;
    const T* bp = base + blocks[blk] * s_blk;
    for (int64_t j = 0; j < n; ++j, ++slot) {
      if (slot == bs) {
        slot = 0;
        bp = base + blocks[++blk] * s_blk;
      }
      p[j] = bp + slot * s_tok;
    }
  }
};

template <typename T>
FA_INLINE KvRows<T> kv_rows(const void* base, const int64_t* st, const KvPages& pg, int64_t b,
                            int64_t kvh) {
  const T* p = static_cast<const T*>(base);
  if (pg.table == nullptr) return KvRows<T>{p + b * st[0] + kvh * st[1], st[2]};
  return KvRows<T>{p + kvh * st[1], st[2], pg.table + b * pg.stride_b, pg.block_size, st[0]};
}

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
void decode_row(const AttnArgs& a, const T* qr, const KvRows<T>& kr_, const KvRows<T>& vr_,
                int64_t n_begin, int64_t n_end, int64_t hi, float* part_row, int64_t Ev16) {
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
  const T* kp[16];
  const T* vp[16];
  const T* pf[16];
  const int64_t kl = std::max<int64_t>(1, a.E * static_cast<int64_t>(sizeof(T)) / 64);
  const int64_t vl = std::max<int64_t>(1, a.Ev * static_cast<int64_t>(sizeof(T)) / 64);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 16) {
    const int64_t nk = std::min<int64_t>(16, n_end - n0);
    const int64_t npf = std::min<int64_t>(16, n_end - n0 - 48);
    if (npf > 0) {
      kr_.rows(n0 + 48, npf, pf);
      for (int64_t j = 0; j < npf; ++j)
        for (int64_t x = 0; x < kl; ++x)
          _mm_prefetch(reinterpret_cast<const char*>(pf[j]) + 64 * x, _MM_HINT_T0);
      vr_.rows(n0 + 48, npf, pf);
      for (int64_t j = 0; j < npf; ++j)
        for (int64_t x = 0; x < vl; ++x)
          _mm_prefetch(reinterpret_cast<const char*>(pf[j]) + 64 * x, _MM_HINT_T0);
    }
    kr_.rows(n0, nk, kp);
    vr_.rows(n0, nk, vp);
    for (int64_t j = 0; j < nk; ++j) {
      const T* kr = kp[j];
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
    const __m512 p = exp_from(s, _mm512_set1_ps(mnew));
    const float al = std::exp(m - mnew);
    l = l * al + _mm512_reduce_add_ps(p);
    m = mnew;
    _mm512_store_ps(sc, p);
    for (int c = 0; c < NC; ++c) o[c] = _mm512_mul_ps(o[c], _mm512_set1_ps(al));
    for (int64_t j = 0; j < nvis; ++j) {
      const T* vr = vp[j];
      const __m512 pj = _mm512_set1_ps(sc[j]);
      for (int c = 0; c < NC; ++c) o[c] = _mm512_fmadd_ps(pj, load_cvt(vr + 16 * c, mv[c]), o[c]);
    }
  }
  for (int c = 0; c < NC && 16 * c < Ev16; ++c) _mm512_storeu_ps(part_row + 16 * c, o[c]);
  part_row[Ev16] = m;
  part_row[Ev16 + 1] = l;
}
#endif

// Keys visible to query i (of Lq) of a sequence with keys [begin, total): [lo, hi], the query at
// position total - Lq + i; causal and the window (a.wl, a.wr; -1 unbounded) bottom-right aligned.
struct DecodeRange {
  int64_t lo, hi;
};
FA_INLINE DecodeRange decode_range(const AttnArgs& a, int64_t begin, int64_t total, int64_t Lq,
                                   int64_t i, bool causal) {
  const int64_t qpos = total - Lq + i;
  int64_t hi = total - 1, lo = begin;
  if (causal) hi = std::min(hi, qpos);
  if (a.wr >= 0) hi = std::min(hi, qpos + a.wr);
  if (a.wl >= 0) lo = std::max(lo, qpos - a.wl);
  return {lo, hi};
}

// out (B, H, Lq, Ev) contiguous; lse (B, H, Lq) float32 or nullptr
template <typename T>
void attention_decode_impl(const AttnArgs& a, const int64_t* begin, const int64_t* total,
                           int64_t Lq, bool causal, const KvPages& pg, T* out, float* lse) {
  const int64_t B = a.B, H = a.H, Hkv = a.Hkv, E = a.E, Ev = a.Ev;
  const int64_t G = H / Hkv, R = G * Lq;
  const int64_t E16 = round_up(E, 16), Ev16 = round_up(Ev, 16);
  // the keys some query of sequence b sees: [first[b], stop[b]) (a window narrows it)
  std::vector<int64_t> first(static_cast<size_t>(B)), stop(static_cast<size_t>(B));
  int64_t max_total = 0;
  for (int64_t b = 0; b < B; ++b) {
    const DecodeRange r0 = decode_range(a, begin[b], total[b], Lq, 0, causal);
    const DecodeRange r1 = decode_range(a, begin[b], total[b], Lq, Lq - 1, causal);
    first[b] = std::max(r0.lo, begin[b]);
    stop[b] = std::max(first[b], std::min(total[b], r1.hi + 1));
    max_total = std::max(max_total, stop[b] - first[b]);
  }
  const int64_t nthreads = at::get_num_threads();
  const int64_t want = std::max<int64_t>(1, (4 * nthreads + B * Hkv - 1) / (B * Hkv));
  const int64_t csz = round_up(std::max<int64_t>(256, (max_total + want - 1) / want), 64);
  const int64_t nchunk = std::max<int64_t>(1, (max_total + csz - 1) / csz);
  const int64_t pstride = R * (Ev16 + 2);
  std::vector<float> part(static_cast<size_t>(B * Hkv * nchunk * pstride));
  const float qscale = a.scale;
  AttnArgs a1 = a;
  a1.scale = 1.f;

  run_tasks(B * Hkv * nchunk, [&](int64_t t, Scratch& scratch) {
    const int64_t ch = t % nchunk, kvh = (t / nchunk) % Hkv, b = t / (nchunk * Hkv);
    // chunk ch covers keys [first + ch * csz, first + (ch + 1) * csz) of the visible span
    const int64_t c_begin = first[b] + ch * csz;
    const int64_t n_end = std::min(stop[b], c_begin + csz);
    const KvRows<T> krows = kv_rows<T>(a.k, a.sk, pg, b, kvh);
    const KvRows<T> vrows = kv_rows<T>(a.v, a.sv, pg, b, kvh);
#ifdef FA_AVX512
    // one query row per kv head (MHA decoding, the common case): registers only
    if (R == 1 && !a.mods() && a.sk[3] == 1 && a.sv[3] == 1 && a.sq[3] == 1 &&
        std::max(E, Ev) <= 256) {
      const T* qr = static_cast<const T*>(a.q) + b * a.sq[0] + kvh * a.sq[1];
      // Lq = 1: the query is the last position; [first, stop) is exactly what it sees
      const int64_t hi = stop[b] - 1;
      float* pr = part.data() + t * pstride;
      const int64_t nc = (std::max(E, Ev) + 15) / 16;
      if (nc <= 2)
        decode_row<T, 2>(a, qr, krows, vrows, c_begin, n_end, hi, pr, Ev16);
      else if (nc <= 4)
        decode_row<T, 4>(a, qr, krows, vrows, c_begin, n_end, hi, pr, Ev16);
      else if (nc <= 8)
        decode_row<T, 8>(a, qr, krows, vrows, c_begin, n_end, hi, pr, Ev16);
      else
        decode_row<T, 16>(a, qr, krows, vrows, c_begin, n_end, hi, pr, Ev16);
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
    const T* kp[16];
    const T* vp[16];
    // memory bound: keep a few KiB of K and V rows in flight ahead of the loads (the row loads
    // were ~70% of the time waiting on L3/DRAM before)
    const int64_t kline = std::max<int64_t>(1, E * static_cast<int64_t>(sizeof(T)) / 64);
    const int64_t vline = std::max<int64_t>(1, Ev * static_cast<int64_t>(sizeof(T)) / 64);
    const bool pf_rows = a.sk[3] == 1 && a.sv[3] == 1;
    for (int64_t n0 = c_begin; n0 < n_end; n0 += 16) {
      const int64_t nk = std::min<int64_t>(16, n_end - n0);
      const int64_t npf = std::min<int64_t>(16, n_end - n0 - 48);
      if (pf_rows && npf > 0) {
        krows.rows(n0 + 48, npf, kp);
        vrows.rows(n0 + 48, npf, vp);
        for (int64_t j = 0; j < npf; ++j) {
          for (int64_t x = 0; x < kline; ++x)
            __builtin_prefetch(reinterpret_cast<const char*>(kp[j]) + 64 * x, 0, 3);
          for (int64_t x = 0; x < vline; ++x)
            __builtin_prefetch(reinterpret_cast<const char*>(vp[j]) + 64 * x, 0, 3);
        }
      }
      krows.rows(n0, nk, kp);
      vrows.rows(n0, nk, vp);
      for (int64_t j = 0; j < nk; ++j) load_f32(kp[j], a.sk[3], E, kr + j * E16);
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t j = 0; j < nk; ++j) {
          vf acc = vzero();
          for (int64_t e = 0; e < E16; e += 16)
            acc = vfma(vload(qs + r * E16 + e), vload(kr + j * E16 + e), acc);
          sc[r * 16 + j] = vhsum(acc);
        }
        if (a.mods()) {  // q was scaled already: the modifiers with scale 1 (a1)
          const float slope = a.slope(b, kvh * G + r / Lq);
          const int64_t qpos = total[b] - Lq + r % Lq;
          for (int64_t j = 0; j < nk; ++j)
            sc[r * 16 + j] = mod_score(a1, sc[r * 16 + j], slope, qpos - (n0 + j), nullptr);
        }
        // query i sees keys [lo, hi] (causal / window)
        const DecodeRange vis = decode_range(a, begin[b], total[b], Lq, r % Lq, causal);
        const int64_t j0 = std::clamp<int64_t>(vis.lo - n0, 0, nk);
        const int64_t nvis = std::clamp<int64_t>(vis.hi - n0 + 1, j0, nk);
        for (int64_t j = 0; j < j0; ++j) sc[r * 16 + j] = kNegInf;
        for (int64_t j = nvis; j < 16; ++j) sc[r * 16 + j] = kNegInf;
        const vf s = vload(sc + r * 16);
        const float mnew = std::max(m2[r], vhmax(s));
        if (mnew == kNegInf) {
          vstore(sc + r * 16, vzero());
          al[r] = 1.f;
          continue;
        }
        const vf p = exp_from(s, vset1(mnew));
        al[r] = std::exp(m2[r] - mnew);  // 0 when m2 was -inf
        l[r] = l[r] * al[r] + vhsum(p);
        m2[r] = mnew;
        vstore(sc + r * 16, p);
      }
      for (int64_t j = 0; j < nk; ++j) load_f32(vp[j], a.sv[3], Ev, vr + j * Ev16);
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
      const int64_t g = r / Lq, i = r % Lq;
      // the sink joins the denominator (relative to M, as lsum)
      if (a.sinks && M != kNegInf) lsum += std::exp(a.sinks[kvh * G + g] - M);
      const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
      const int64_t row = (b * H + kvh * G + g) * Lq + i;
      T* orow = out + row * Ev;
      for (int64_t e = 0; e < Ev; ++e) orow[e] = static_cast<T>(acc[e] * inv);
      if (lse != nullptr)  // no visible key: the sink alone, or -inf
        lse[row] = M != kNegInf ? M + std::log(lsum) : a.sinks ? a.sinks[kvh * G + g] : kNegInf;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// the in-place append of k_new / v_new at cache_seqlens, with the rotary embedding of k_new and
// q (attention_kvcache's rotary_cos / rotary_sin): one pass over the new rows before attention
// ---------------------------------------------------------------------------------------------
// dst[i * stride] = src[i] rounded to T (nearest even, as c10's conversions), i < n
template <typename T>
FA_INLINE void store_f32(const float* src, int64_t n, T* dst, int64_t stride) {
#ifdef FA_AVX512
  if (stride == 1) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) store_as(dst + i, _mm512_loadu_ps(src + i), 16);
    if (i < n) {
      const int rest = static_cast<int>(n - i);
      store_as(dst + i, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << rest) - 1u), src + i),
               rest);
    }
    return;
  }
#endif
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (stride == 1) {  // bit operations the compiler vectorises
      uint16_t* d = reinterpret_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) {
        uint32_t u;
        std::memcpy(&u, src + i, sizeof(u));
        d[i] = src[i] != src[i] ? uint16_t{0x7fc0}
                                : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
      }
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<T>(src[i]);
}

template <typename T>
FA_INLINE void copy_row(const T* src, int64_t ss, int64_t n, T* dst, int64_t ds) {
  if (ss == 1 && ds == 1) {
    std::memcpy(static_cast<void*>(dst), static_cast<const void*>(src),
                static_cast<size_t>(n) * sizeof(T));
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i * ds] = src[i * ss];
}

// dst = the E elements of x (stride xs) with dims [0, 2 * half) rotated by the table rows c / s
// (strides cst / sst) and the rest passed through; in float32, rounded to T once.
// buf: 2 * E + 2 * half floats.
template <typename T, typename C>
FA_INLINE void rotary_row(const T* x, int64_t xs, int64_t E, const C* c, int64_t cst, const C* s,
                          int64_t sst, int64_t half, bool interleaved, float* buf, T* dst,
                          int64_t ds) {
  float* xf = buf;
  float* yf = xf + E;
  float* cf = yf + E;
  float* sf = cf + half;
  load_f32(x, xs, E, xf);
  load_f32(c, cst, half, cf);
  load_f32(s, sst, half, sf);
  if (interleaved) {  // GPT-J: pairs (2j, 2j + 1)
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = xf[2 * j], x2 = xf[2 * j + 1];
      yf[2 * j] = x1 * cf[j] - x2 * sf[j];
      yf[2 * j + 1] = x2 * cf[j] + x1 * sf[j];
    }
  } else {  // GPT-NeoX / Llama (rotate_half): pairs (j, j + half)
    const float* x2p = xf + half;
    float* y2p = yf + half;
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = xf[j], x2 = x2p[j];
      yf[j] = x1 * cf[j] - x2 * sf[j];
      y2p[j] = x2 * cf[j] + x1 * sf[j];
    }
  }
  for (int64_t e = 2 * half; e < E; ++e) yf[e] = xf[e];
  store_f32(yf, E, dst, ds);
}

// C: the tables' element type (float, or T)
template <typename T, typename C>
void kvcache_prepare_impl(const KvPrepArgs& a) {
  const int64_t E = a.E, Ev = a.Ev, Lq = a.Lq, Ln = a.Lnew, half = a.half;
  const int64_t nk = a.kn != nullptr ? a.B * a.Hkv * Ln : 0;  // k_new / v_new rows
  const int64_t nq = a.qrot != nullptr ? a.B * a.H * Lq : 0;  // q rows (rotary only)
  const T* kn = static_cast<const T*>(a.kn);
  const T* vn = static_cast<const T*>(a.vn);
  const T* q = static_cast<const T*>(a.q);
  T* kc = static_cast<T*>(a.kc);
  T* vc = static_cast<T*>(a.vc);
  T* qrot = static_cast<T*>(a.qrot);
  const C* cos = static_cast<const C*>(a.cos);
  const C* sin = static_cast<const C*>(a.sin);
  // the token's position in its own sequence (left padding does not count); padding tokens among
  // the new ones (before leftpad[b]) are never attended to and are rotated at position 0
  auto position = [&](int64_t b, int64_t i) {
    return std::max<int64_t>(0, a.seqlens[b] - (a.leftpad != nullptr ? a.leftpad[b] : 0) + i);
  };
  // a decoding step has a few dozen rows of E elements (~1 us): threads only for many rows
  at::parallel_for(0, nk + nq, 256, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(half > 0 ? static_cast<size_t>(2 * E + 2 * half) : 0);
    for (int64_t r = r0; r < r1; ++r) {
      if (r < nk) {
        const int64_t b = r / (a.Hkv * Ln), h = (r / Ln) % a.Hkv, i = r % Ln;
        const int64_t pos = a.seqlens[b] + i;
        const T* ks = kn + b * a.skn[0] + h * a.skn[1] + i * a.skn[2];
        // the cache row of token pos: (b, pos), or paged (block_table[b, pos / bs], pos % bs)
        int64_t cb = b, slot = pos;
        if (a.block_table != nullptr) {
          cb = a.block_table[b * a.bt_stride + pos / a.block_size];
          slot = pos % a.block_size;
        }
        T* kd = kc + cb * a.skc[0] + h * a.skc[1] + slot * a.skc[2];
        if (half > 0) {
          const int64_t p = position(b, i);
          rotary_row(ks, a.skn[3], E, cos + p * a.scos[0], a.scos[1], sin + p * a.ssin[0],
                     a.ssin[1], half, a.interleaved, buf.data(), kd, a.skc[3]);
        } else {
          copy_row(ks, a.skn[3], E, kd, a.skc[3]);
        }
        copy_row(vn + b * a.svn[0] + h * a.svn[1] + i * a.svn[2], a.svn[3], Ev,
                 vc + cb * a.svc[0] + h * a.svc[1] + slot * a.svc[2], a.svc[3]);
      } else {
        // q token i is the position Lnew - Lq + i of the new tokens
        const int64_t x = r - nk, b = x / (a.H * Lq), h = (x / Lq) % a.H, i = x % Lq;
        const int64_t p = position(b, Ln - Lq + i);
        rotary_row(q + b * a.sq[0] + h * a.sq[1] + i * a.sq[2], a.sq[3], E, cos + p * a.scos[0],
                   a.scos[1], sin + p * a.ssin[0], a.ssin[1], half, a.interleaved, buf.data(),
                   qrot + x * E, int64_t{1});
      }
    }
  });
}
