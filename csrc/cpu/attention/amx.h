// CPU attention kernels: AMX tile configuration and the bf16 tile products Q.K^T and P.V.
// No include guard: kernels.h includes it once per instruction-set build.

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

// One 32-deep step of a 32 x 32 fp32 block in tiles 0-3: A rows in tiles 4, 5 (16 rows of 32 bf16
// each at a0, a1), B columns in tiles 6, 7 (VNNI pairs at b and b + 16, rows bm pairs apart).
FA_INLINE void amx_step(const uint16_t* a0, const uint16_t* a1, const uint32_t* b, int64_t bm) {
  _tile_loadd(4, a0, 64);
  _tile_loadd(5, a1, 64);
  _tile_loadd(6, b, bm * 4);
  _tile_loadd(7, b + 16, bm * 4);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}
FA_INLINE void amx_zero_block() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}
// tiles 0-3 -> the 32 x 32 block at c00, rows bm floats apart
FA_INLINE void amx_store_block(float* c00, int64_t bm) {
  _tile_stored(0, c00, bm * 4);
  _tile_stored(1, c00 + 16, bm * 4);
  _tile_stored(2, c00 + 16 * bm, bm * 4);
  _tile_stored(3, c00 + 16 * bm + 16, bm * 4);
}

// S^T[key][query] = K . Q^T for one key block: K in 1 KiB tiles [key/16][e/32] (contiguous,
// nEt = Ep/32 per key tile row), Q^T VNNI pairs [Ep/2][bm]; nkp, bm multiples of 32.
inline void amx_qk(int64_t nkp, int64_t bm, int64_t nEt, const uint16_t* kt, const uint32_t* qp,
                   float* s) {
  for (int64_t m = 0; m < nkp / 16; m += 2) {
    const uint16_t* a0 = kt + (m * nEt) * 512;
    const uint16_t* a1 = a0 + nEt * 512;
    for (int64_t n = 0; n < bm; n += 32) {
      amx_zero_block();
      for (int64_t u = 0; u < nEt; ++u)
        amx_step(a0 + u * 512, a1 + u * 512, qp + (u * 16) * bm + n, bm);
      amx_store_block(s + (m * 16) * bm + n, bm);
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
        amx_zero_block();
      } else {
        _tile_loadd(0, c00, bm * 4);
        _tile_loadd(1, c00 + 16, bm * 4);
        _tile_loadd(2, c00 + 16 * bm, bm * 4);
        _tile_loadd(3, c00 + 16 * bm + 16, bm * 4);
      }
      for (int64_t c = 0; c < nkc; ++c)
        amx_step(a0 + c * 512, a1 + c * 512, pp + (c * 16) * bm + n, bm);
      amx_store_block(c00, bm);
    }
  }
}

#endif
