// CPU attention kernels: the backward, dQ / dK / dV (and dmask) recomputing P from lse.
// No include guard: kernels.h includes it once per instruction-set build.

// ---------------------------------------------------------------------------------------------
// backward (fp32 compute for every dtype), two passes so that no output is accumulated by two
// threads: pass 1 owns dK/dV of one key block (summed over the heads of its GQA group and all
// queries), pass 2 owns dQ (and dmask) of one query block. P is recomputed from lse each time.
// ---------------------------------------------------------------------------------------------
// The backward's row-block passes (the fp32 statistics sweep, pass 2) work per query block, with
// queries along lanes. Their scratch: Q^T [E][bm], dO^T [Ev][bm], S^T, dP^T and the mask block
// [bn][bm], lse and each lane's key window [bm], then the pass's own `extra` floats.
struct RowBlock {
  int bm, NV;
  float *qt, *dot, *sb, *db, *mk, *df, *l2, *extra;
  int32_t *rlo, *rhi;
};

FA_INLINE RowBlock row_block(const AttnArgs& a, Scratch& scratch, int bm, int64_t bn,
                             size_t n_extra) {
  const size_t n_qt = static_cast<size_t>(a.E * bm), n_dot = static_cast<size_t>(a.Ev * bm);
  const size_t n_blk = static_cast<size_t>(bn * bm);
  RowBlock w;
  w.bm = bm;
  w.NV = bm / 16;
  w.qt = scratch.get(n_qt + n_dot + 4 * n_blk + 3 * static_cast<size_t>(bm) + n_extra);
  w.dot = w.qt + n_qt;
  w.sb = w.dot + n_dot;
  w.db = w.sb + n_blk;
  w.mk = w.db + n_blk;
  w.df = w.mk + n_blk;  // the softcap derivative of the block's logits (mods_tile)
  w.l2 = w.df + n_blk;
  w.rlo = reinterpret_cast<int32_t*>(w.l2 + bm);
  w.rhi = w.rlo + bm;
  w.extra = reinterpret_cast<float*>(w.rhi + bm);
  return w;
}

struct BwdRows {  // float views of the backward's operands
  F32Rows Q, DO, K, V;
};

// Packs Q^T, dO^T and lse of query block qb into w, then for each key block it sees computes
// S^T = K.Q^T into w.sb and dP^T = V.dO^T into w.db (with the block's mask and lane windows) and
// calls block(n0, nk, full).
template <typename T, class F>
void for_each_key_block(const AttnArgs& a, const QBlock& qb, int64_t bn, const BwdRows& x,
                        const float* lse, const RowBlock& w, F&& block) {
  const int bm = w.bm;
  const int64_t b = qb.b, h = qb.h, kvh = h / (a.H / a.Hkv);
  pack_t(x.Q.at(b, h, qb.q0), x.Q.s2, x.Q.s3, qb.nq, a.E, bm, bm, w.qt);
  pack_t(x.DO.at(b, h, qb.q0), x.DO.s2, x.DO.s3, qb.nq, a.Ev, bm, bm, w.dot);
  for (int i = 0; i < bm; ++i) w.l2[i] = i < qb.nq ? lse[(b * a.H + h) * a.L + qb.q0 + i] : kNegInf;
  // mods_tile writes the real (query, key) cells only; the rest multiply p = 0
  if (a.softcap > 0.f) std::fill(w.df, w.df + bn * bm, 1.f);
  for (int64_t kb = qb.klo / bn; kb <= qb.khi / bn; ++kb) {
    const int64_t n0 = kb * bn, nk = std::min<int64_t>(bn, a.S - n0);
    const bool full = block_window(a, qb, n0, nk, w.rlo, w.rhi);
    if (a.mask) pack_mask_t<T>(a, qb, n0, nk, w.mk);
    gemm_bcast<OpF32>(nk, w.NV, a.E, x.K.at(b, kvh, n0), x.K.s2, x.K.s3, w.qt, bm, w.sb, bm,
                      CInit::zero);
    gemm_bcast<OpF32>(nk, w.NV, a.Ev, x.V.at(b, kvh, n0), x.V.s2, x.V.s3, w.dot, bm, w.db, bm,
                      CInit::zero);
    if (a.mods()) mods_tile(a, b, h, qb.q0, qb.nq, n0, nk, w.sb, 1, bm, w.df);
    block(n0, nk, full);
  }
}

// P^T and the dropout-scaled dP^T of key block [n0, n0 + nk) as both row-block passes recompute
// them from w: fn(j, p, dp) for each key j < nk of queries qv .. qv + 15, in key order (a row
// whose lse is -inf sees nothing: p = 0).
template <class F>
FA_INLINE void recompute_p_t(const AttnArgs& a, const QBlock& qb, const RowBlock& w, int qv,
                             int64_t n0, int64_t nk, bool full, uint32_t dkey, F&& fn) {
  const int bm = w.bm;
  const float* mk = a.mask ? w.mk : nullptr;
  const vf sc = vset1(a.mods() ? 1.f : a.scale);  // mods_tile folded the scale in
  const vf vl2 = vload(w.l2 + qv);
  const vm live = vcmp_neq(vl2, vset1(kNegInf));
  const vi vlo = viload(w.rlo + qv), vhi = viload(w.rhi + qv);
  vi drow{};
  if (a.drop.on) drow = drop_rows(dkey, qb.q0 + qv);
  for (int64_t j = 0; j < nk; ++j) {
    const vf y = logits(vload(w.sb + j * bm + qv), sc, mk ? mk + j * bm + qv : nullptr);
    vm vis = live;
    if (!full) {
      const vi vj = viset1(static_cast<int32_t>(j));
      vis = vis & vi_le(vlo, vj) & vi_lt(vj, vhi);
    }
    const vf p = vmaskz(vis, exp_from(y, vl2));
    vf dp = vload(w.db + j * bm + qv);
    if (a.drop.on) dp = drop_apply(a.drop, drop_keep(a.drop, drow, drop_col(n0 + j)), dp);
    fn(j, p, dp);
  }
}

template <typename T>
void attention_bwd_impl(const AttnArgs& a, const T* dout, const int64_t* sdo, const T* outp,
                        const int64_t* so, const float* lse, const float* glse, T* dq, T* dk, T* dv,
                        T* dmask, float* dsinks) {
  const int64_t B = a.B, H = a.H, Hkv = a.Hkv, L = a.L, S = a.S, E = a.E, Ev = a.Ev;
  const int64_t G = H / Hkv;
  const vf sc = vset1(a.mods() ? 1.f : a.scale);  // with mods, mods_tile folds the scale in
  const bool capped = a.softcap > 0.f;  // dS also carries d(softcap)/dx

  std::vector<float> qbuf, dobuf, kbuf, vbuf;
  const F32Rows Q = f32_rows<T>(static_cast<const T*>(a.q), a.sq, B, H, L, E, qbuf);
  const F32Rows DO = f32_rows<T>(dout, sdo, B, H, L, Ev, dobuf);
  const F32Rows K = f32_rows<T>(static_cast<const T*>(a.k), a.sk, B, Hkv, S, E, kbuf);
  const F32Rows V = f32_rows<T>(static_cast<const T*>(a.v), a.sv, B, Hkv, S, Ev, vbuf);
  const BwdRows x{Q, DO, K, V};

  // delta = rowsum(dO * O) - grad_lse
  std::vector<float> delta(static_cast<size_t>(B * H * L), 0.f);
  if (std::is_same_v<T, float> && glse)  // the fp32 sweep below overwrites rows that see keys
    for (int64_t r = 0; r < B * H * L; ++r) delta[static_cast<size_t>(r)] = -glse[r];
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
    const int64_t rows = rows_hint(a);
    const int bm = rows <= 16 ? 16 : (rows <= 32 ? 32 : 64);
    constexpr int64_t bn = 64;
    const std::vector<int64_t> vblocks = varlen_blocks(a, a.vq, bm);
    const int64_t nqb = a.varlen() ? static_cast<int64_t>(vblocks.size()) : (L + bm - 1) / bm;
    run_tasks(B * H * nqb, [&](int64_t t, Scratch& scratch) {
      const int64_t qbi = t % nqb, h = (t / nqb) % H, b = t / (nqb * H);
      const QBlock qb = make_qblock(a, b, h, a.varlen() ? vblocks[qbi] : qbi * bm, bm);
      if (qb.klo > qb.khi) return;
      const RowBlock w = row_block(a, scratch, bm, bn, 2 * static_cast<size_t>(bm));
      float* rs = w.extra;
      float* us = rs + bm;
      std::fill(rs, rs + 2 * bm, 0.f);
      const uint32_t dkey = a.drop.on ? a.drop.key(b * H + h) : 0;
      for_each_key_block<T>(a, qb, bn, x, lse, w, [&](int64_t n0, int64_t nk, bool full) {
        for (int qv = 0; qv < bm; qv += 16) {
          vf racc = vload(rs + qv), uacc = vload(us + qv);
          recompute_p_t(a, qb, w, qv, n0, nk, full, dkey,
                        [&](int64_t, vf p, vf dp) FA_INLINE_LAMBDA {
                          racc = vadd(racc, p);
                          uacc = vfma(p, dp, uacc);
                        });
          vstore(rs + qv, racc);
          vstore(us + qv, uacc);
        }
      });
      for (int64_t i = 0; i < qb.nq; ++i) {
        const int64_t row = (b * H + h) * L + qb.q0 + i;
        // the sink's share of the row (no dP: it has no value row)
        const float rt = rs[i] + (a.sinks && rs[i] > 0.f ? std::exp(a.sinks[h] - lse[row]) : 0.f);
        if (rs[i] > 0.f) {
          lse_ref[static_cast<size_t>(row)] = lse[row] + std::log(rt);
          delta[static_cast<size_t>(row)] = us[i] / rt - (glse ? glse[row] : 0.f);
        }
      }
    });
    lse = lse_ref.data();
  }

  // dsink[h] = -sum over (b, i) of p_sink * delta, p_sink = e^(sink - lse), in a fixed order
  if (dsinks) {
    at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) {
        double acc = 0.0;
        for (int64_t b = 0; b < B; ++b)
          for (int64_t i = 0; i < L; ++i) {
            const int64_t row = (b * H + h) * L + i;
            if (lse[row] == kNegInf) continue;
            acc += std::exp(static_cast<double>(a.sinks[h]) - lse[row]) * delta[static_cast<size_t>(row)];
          }
        dsinks[h] = static_cast<float>(-acc);
      }
    });
  }

  // ---- pass 1: dK, dV per (b, kv head, key block of 64) ------------------------------------
  {
    constexpr int64_t bn = 64, NV = 4, bq = 64;
    // varlen: the key blocks of each sequence (vkblocks[i] the first key of block i, vkseq[i]
    // its sequence), so that the queries that see a block are rows of one sequence
    const std::vector<int64_t> vkblocks = varlen_blocks(a, a.vk, bn);
    std::vector<int64_t> vkseq;
    for (int64_t s = 0; a.varlen() && s < a.vnseq; ++s)
      for (int64_t r = a.vk[s]; r < a.vk[s + 1]; r += bn) vkseq.push_back(s);
    const int64_t nkb = a.varlen() ? static_cast<int64_t>(vkblocks.size()) : (S + bn - 1) / bn;
    const int64_t ntask = B * Hkv * nkb;
    // key block kb: its first key and its keys (the sequence's end cuts it with varlen)
    auto kblock = [&](int64_t kb, int64_t& n0, int64_t& nk) {
      n0 = a.varlen() ? vkblocks[kb] : kb * bn;
      nk = std::min(bn, (a.varlen() ? a.vk[vkseq[kb] + 1] : S) - n0);
    };
    auto qrange = [&](int64_t kb, int64_t n0, int64_t nk, int64_t& i0, int64_t& i1) {
      if (a.varlen()) {  // the rows of the block's sequence s that see its keys
        const int64_t s = vkseq[kb], off = a.voff[s];
        i0 = a.wr < 0 ? a.vq[s] : std::max<int64_t>(a.vq[s], n0 - off - a.wr);
        i1 = a.wl < 0 ? a.vq[s + 1] : std::min<int64_t>(a.vq[s + 1], n0 + nk - 1 - off + a.wl + 1);
        return;
      }
      i0 = a.wr < 0 ? 0 : std::max<int64_t>(0, n0 - a.off - a.wr);
      i1 = a.wl < 0 ? L : std::min<int64_t>(L, n0 + nk - 1 - a.off + a.wl + 1);
    };
    std::vector<int64_t> cost(ntask);
    for (int64_t t = 0; t < ntask; ++t) {
      const int64_t kb = t % nkb;
      int64_t n0, nk, i0, i1;
      kblock(kb, n0, nk);
      qrange(kb, n0, nk, i0, i1);
      cost[t] = std::max<int64_t>(0, i1 - i0) + 1;
    }
    const std::vector<int64_t> order = order_by_cost(cost);
    const size_t n_kt = static_cast<size_t>(E * bn), n_vt = static_cast<size_t>(Ev * bn);
    const size_t n_blk = static_cast<size_t>(bq * bn);
    run_tasks(ntask, [&](int64_t task, Scratch& scratch) {
      const int64_t t = order[task];
      const int64_t kb = t % nkb, kvh = (t / nkb) % Hkv, b = t / (nkb * Hkv);
      int64_t n0, nk;
      kblock(kb, n0, nk);
      float* kt = scratch.get(2 * n_kt + 2 * n_vt + 3 * n_blk + bn);
      float* vt = kt + n_kt;
      float* dkt = vt + n_vt;
      float* dvt = dkt + n_kt;
      float* sb = dvt + n_vt;
      float* db = sb + n_blk;
      float* dfb = db + n_blk;  // the softcap derivative (mods_tile)
      float* mrow = dfb + n_blk;
      if (capped) std::fill(dfb, dfb + n_blk, 1.f);  // mods_tile writes the real cells only
      pack_t(K.at(b, kvh, n0), K.s2, K.s3, nk, E, bn, bn, kt);
      pack_t(V.at(b, kvh, n0), V.s2, V.s3, nk, Ev, bn, bn, vt);
      std::fill(dkt, dkt + n_kt, 0.f);
      std::fill(dvt, dvt + n_vt, 0.f);
      int64_t qa, qz;
      qrange(kb, n0, nk, qa, qz);
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
          if (a.mods()) mods_tile(a, b, h, i0, ni, n0, nk, sb, bn, 1, dfb);
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
              const vf y = logits(vload(srow + j), sc, mbase ? mrow + j : nullptr);
              const vf p = vmaskz(vis, exp_from(y, vl2));
              vf dp = vload(drow + j);
              vf pd = p;
              if (a.drop.on) {  // lanes along keys: the row hash is the broadcast
                const vm keep = drop_keep(a.drop, viset1(static_cast<int32_t>(drh)),
                                          vimul(viadd(vj, viset1(static_cast<int32_t>(n0))),
                                                viset1(static_cast<int32_t>(kGolden32))));
                const vf z = vmaskz(keep, vset1(a.drop.inv_keep));
                dp = vmul(dp, z);
                pd = vmul(p, z);
              }
              vstore(srow + j, pd);
              vf ds = vmul(p, vsub(dp, vdel));  // dS
              if (capped) ds = vmul(ds, vload(dfb + r * bn + j));
              vstore(drow + j, ds);
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
    const int64_t rows = rows_hint(a);
    const int bm = rows <= 16 ? 16 : (rows <= 32 ? 32 : 64);
    constexpr int64_t bn = 64;
    const std::vector<int64_t> vblocks = varlen_blocks(a, a.vq, bm);
    const int64_t nqb = a.varlen() ? static_cast<int64_t>(vblocks.size()) : (L + bm - 1) / bm;
    auto qstart = [&](int64_t qbi) { return a.varlen() ? vblocks[qbi] : qbi * bm; };
    const int64_t ntask = B * H * nqb;
    std::vector<int64_t> cost(ntask);
    for (int64_t t = 0; t < ntask; ++t) {
      const QBlock qb = make_qblock(a, 0, 0, qstart(t % nqb), bm);
      cost[t] = std::max<int64_t>(0, qb.khi - qb.klo + 1) + 1;
    }
    const std::vector<int64_t> order = order_by_cost(cost);
    run_tasks(ntask, [&](int64_t task, Scratch& scratch) {
      const int64_t t = order[task];
      const int64_t qbi = t % nqb, h = (t / nqb) % H, b = t / (nqb * H), kvh = h / G;
      const QBlock qb = make_qblock(a, b, h, qstart(qbi), bm);
      const RowBlock w = row_block(a, scratch, bm, bn, static_cast<size_t>(E * bm + bm));
      float* dqt = w.extra;
      float* del = dqt + E * bm;
      std::fill(dqt, dqt + E * bm, 0.f);
      if (qb.klo <= qb.khi) {
        for (int i = 0; i < bm; ++i)
          del[i] = i < qb.nq ? delta[static_cast<size_t>((b * H + h) * L + qb.q0 + i)] : 0.f;
        const uint32_t dkey = a.drop.on ? a.drop.key(b * H + h) : 0;
        for_each_key_block<T>(a, qb, bn, x, lse, w, [&](int64_t n0, int64_t nk, bool full) {
          for (int qv = 0; qv < bm; qv += 16) {
            const vf vdel = vload(del + qv);
            recompute_p_t(a, qb, w, qv, n0, nk, full, dkey,
                          [&](int64_t j, vf p, vf dp) FA_INLINE_LAMBDA {
                            vf ds = vmul(p, vsub(dp, vdel));  // dS^T
                            if (capped) ds = vmul(ds, vload(w.df + j * bm + qv));
                            vstore(w.db + j * bm + qv, ds);
                          });
          }
          if (dmask) {
            for (int64_t i = 0; i < qb.nq; ++i) {
              T* dm = dmask + ((b * H + h) * L + qb.q0 + i) * S + n0;
              for (int64_t j = 0; j < nk; ++j) dm[j] = static_cast<T>(w.db[j * bm + i]);
            }
          }
          // dQ^T[e][i] += sum_j K[j][e] dS^T[j][i]
          gemm_bcast<OpF32>(E, w.NV, nk, K.at(b, kvh, n0), K.s3, K.s2, w.db, bm, dqt, bm,
                            CInit::load);
        });
      }
      for (int64_t i = 0; i < qb.nq; ++i) {
        T* dqr = dq + ((b * H + h) * L + qb.q0 + i) * E;
        for (int64_t e = 0; e < E; ++e) dqr[e] = static_cast<T>(dqt[e * bm + i] * a.scale);
      }
    });
  }
}
