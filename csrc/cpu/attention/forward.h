// CPU attention kernels: the forward over (b, h, query block) tasks.
// No include guard: kernels.h includes it once per instruction-set build.

// O^T [Ev][bm] / l -> out (B, H, L, Ev) at strides a.so (last dim contiguous); lse
template <typename T>
void write_out(const AttnArgs& a, const QBlock& qb, const float* ot, const float* m2,
               const float* l, T* out, float* lse) {
  alignas(64) float inv[256];
  for (int64_t i = 0; i < qb.bm; ++i) inv[i] = l[i] > 0.f ? 1.f / l[i] : 0.f;
  const int64_t row0 = (qb.b * a.H + qb.h) * a.L + qb.q0;
  if (a.sinks) {
    // the sink joins the denominator: lse = log(e^sink + l e^m2), out = O^T e^(m2 - lse)
    const float sink = a.sinks[qb.h];
    for (int64_t i = 0; i < qb.bm; ++i) {
      if (!(l[i] > 0.f)) {
        inv[i] = 0.f;
        if (i < qb.nq) lse[row0 + i] = sink;
        continue;
      }
      const float ls = m2[i] + std::log(l[i]);
      const float hi = std::max(ls, sink);
      const float lt = hi + std::log1p(std::exp(-std::fabs(ls - sink)));
      inv[i] = std::exp(m2[i] - lt);
      if (i < qb.nq) lse[row0 + i] = lt;
    }
  } else {
    for (int64_t i = 0; i < qb.nq; ++i)
      lse[row0 + i] = l[i] > 0.f ? m2[i] + std::log(l[i]) : kNegInf;
  }
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

// The forward over all (b, h, query block) tasks. T: element type of q/k/v/mask/out.
template <typename T, Path P>
void attention_fwd_impl(const AttnArgs& a, T* out, float* lse) {
  const int64_t G = a.H / a.Hkv;
  // query block: 16 lanes per vector, up to 64 queries (32 rows of AMX tiles pairs)
  // queries per block (16 SIMD lanes per vector; AMX tiles pair 2 x 16 queries); keys per block:
  // 256 for AMX halves the per-key cost of the O^T tile loads/stores against 128 (measured
  // -20% time per key at d = 64 and 128), 64 for the FMA kernels (their scratch stays in L1)
  const int64_t rows = rows_hint(a);
  const int bm = P == Path::amx ? (rows <= 32 ? 32 : 64) : (rows <= 16 ? 16 : (rows <= 32 ? 32 : 64));
  const int NV = bm / 16;
  // (a shorter sequence takes one block of its own length, rounded to the 32-key AMX tile pair:
  // packing and the P @ V tiles then skip the padding of a 256-key block)
  const int64_t bn = P == Path::amx
                         ? std::min<int64_t>(256, round_up(std::max<int64_t>(
                                                      a.varlen() ? a.vmax_k : a.S, 1), 32))
                         : 64;
  // varlen: the blocks of every sequence, vblocks[i] the first row of block i
  const std::vector<int64_t> vblocks = varlen_blocks(a, a.vq, bm);
  const int64_t nqb = a.varlen() ? static_cast<int64_t>(vblocks.size()) : (a.L + bm - 1) / bm;
  // with softcap / ALiBi the score tiles are turned into logits first (mods_tile) and the softmax
  // runs on them with scale 1
  AttnArgs as = a;
  if (a.mods()) as.scale = 1.f;

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
    if (a.varlen()) {
      const QBlock blk = make_qblock(a, 0, 0, vblocks[qb], bm);
      cost[t] = std::max<int64_t>(blk.khi - blk.klo + 1, 0) + 1;
      continue;
    }
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

        const QBlock qb = make_qblock(a, b, h, a.varlen() ? vblocks[qbi] : qbi * bm, bm);
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
              if (a.mods()) mods_tile(a, b, h, qb.q0, qb.nq, n0, nk, s, 1, bm, nullptr);
              softmax_block<false, true>(as, qb, n0, nk, nk, s, mkp, full, rlo, rhi, m2, l, alpha,
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
                if (a.mods()) mods_tile(a, b, h, qb.q0, qb.nq, n0, nk, s, 1, bm, nullptr);
                const bool rescale = softmax_block<true, false>(as, qb, n0, nk, nkp, s, mkp, full,
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
                if (a.mods()) mods_tile(a, b, h, qb.q0, qb.nq, n0, nk, s, 1, bm, nullptr);
                softmax_block<true, false>(as, qb, n0, nk, nkp, s, mkp, full, rlo, rhi, m2, l, alpha,
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
