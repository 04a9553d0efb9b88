// CPU attention kernels: operands packed into the layouts the micro-kernels and tiles read
// (mask and Q blocks transposed, K/V converted or tiled once per call, float views).
// No include guard: kernels.h includes it once per instruction-set build.

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
