// CPU attention kernels: visible key ranges, per-thread scratch, the dynamic task schedule, and
// the per query block state shared by the forward and the backward.
// No include guard: kernels.h includes it once per instruction-set build.

// visible keys of query i: [lo(i), hi(i)] intersected with [0, S) (varlen: with the keys
// [vk[s], vk[s + 1]) of its sequence s, at that sequence's diagonal offset)
FA_INLINE int64_t vis_lo(const AttnArgs& a, int64_t i) {
  if (a.varlen()) {
    const int64_t s = a.vseq[i], k0 = a.vk[s];
    return a.wl < 0 ? k0 : std::max<int64_t>(k0, i + a.voff[s] - a.wl);
  }
  return a.wl < 0 ? 0 : std::max<int64_t>(0, i + a.off - a.wl);
}
FA_INLINE int64_t vis_hi(const AttnArgs& a, int64_t i) {
  if (a.varlen()) {
    const int64_t s = a.vseq[i], k1 = a.vk[s + 1];
    return a.wr < 0 ? k1 - 1 : std::min<int64_t>(k1 - 1, i + a.voff[s] + a.wr);
  }
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
// per query block: the keys any of its queries sees, and each lane's window in a key block
// ---------------------------------------------------------------------------------------------
struct QBlock {
  int64_t b, h, q0, nq;  // queries q0 .. q0 + nq - 1
  int bm;                // lanes (>= nq, multiple of 16)
  int64_t klo, khi;      // union of visible keys (klo > khi: none)
};

FA_INLINE QBlock make_qblock(const AttnArgs& a, int64_t b, int64_t h, int64_t q0, int bm) {
  // (varlen: a block ends with its sequence)
  const int64_t qend = a.varlen() && q0 < a.L ? a.vq[a.vseq[q0] + 1] : a.L;
  QBlock qb{b, h, q0, std::min<int64_t>(bm, qend - q0), bm, 0, -1};
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

// ---------------------------------------------------------------------------------------------
// score modifiers (softcap, ALiBi): applied to a tile of raw scores before the softmax, which then
// runs with scale 1 (the scale is folded in here)
// ---------------------------------------------------------------------------------------------
// x = scale * s -> softcap * tanh(x / softcap) -> x - slope * |dist|; *dfac = d(result)/dx
// (1 - tanh^2; 1 without softcap) when dfac is given
FA_INLINE float mod_score(const AttnArgs& a, float s, float slope, int64_t dist, float* dfac) {
  float x = s * a.scale;
  if (a.softcap > 0.f) {
    const float t = std::tanh(x / a.softcap);
    x = a.softcap * t;
    if (dfac) *dfac = 1.f - t * t;
  } else if (dfac) {
    *dfac = 1.f;
  }
  if (a.alibi) x -= slope * static_cast<float>(dist < 0 ? -dist : dist);
  return x;
}

// In place on a score tile of queries q0 + i (i < nq) and keys n0 + j (j < nk) of head (b, h):
// element (i, j) at s[i * si + j * sj]; dfac (same layout) gets the softcap derivative, if given.
// (varlen: the queries are rows of one sequence s, whose slope row and offset apply)
inline void mods_tile(const AttnArgs& a, int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t n0,
                      int64_t nk, float* s, int64_t si, int64_t sj, float* dfac) {
  if (nq <= 0) return;
  const int64_t seq = a.varlen() ? a.vseq[q0] : b;
  const int64_t off = a.varlen() ? a.voff[seq] : a.off;
  const float slope = a.slope(seq, h);
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t x = i * si + j * sj;
      s[x] = mod_score(a, s[x], slope, q0 + i + off - (n0 + j), dfac ? dfac + x : nullptr);
    }
}

// ---------------------------------------------------------------------------------------------
// varlen (attention_varlen): the row-block passes run over the bm-row blocks of each packed
// sequence, the key-block pass over the bn-key blocks of each sequence, so that a tile never
// holds the rows of two sequences (its slope row and diagonal offset are its sequence's)
// ---------------------------------------------------------------------------------------------
// First packed row of each bm-row query block; empty when not varlen (block i starts at i * bm)
inline std::vector<int64_t> varlen_blocks(const AttnArgs& a, const int64_t* cu, int64_t bm) {
  std::vector<int64_t> starts;
  if (!a.varlen()) return starts;
  for (int64_t s = 0; s < a.vnseq; ++s)
    for (int64_t r = cu[s]; r < cu[s + 1]; r += bm) starts.push_back(r);
  return starts;
}

// The longest sequence's rows (the block sizes follow it): the query rows L, or with varlen the
// longest packed sequence
FA_INLINE int64_t rows_hint(const AttnArgs& a) { return a.varlen() ? a.vmax_q : a.L; }
