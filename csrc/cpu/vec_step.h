// Step<T>: moves Vectorized<T>::size() elements of T (one step) as kVecs float32 vectors, one
// vector for float, two for bf16/fp16 (a 16-bit Vectorized holds twice as many lanes). A short
// step (a row's tail, `n` < kLen) loads zeros past `n` and stores only `n` elements, so every
// element goes through the same vector arithmetic.
//
// Included inside each kernel build's ISA namespace (layer_norm_kernel.h, activation_kernel.h),
// after <ATen/cpu/vec/vec.h> and the namespace's `fVec` / `kF`: the struct is compiled once per
// ISA build, like the kernels that use it.
template <typename T>
struct Step {
  static constexpr int64_t kLen = at::vec::Vectorized<T>::size();
  static constexpr int kVecs = static_cast<int>(kLen / kF);
  using F = std::array<fVec, kVecs>;

  static inline F load(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
      return {fVec::loadu(p)};
    } else {
      auto [a, b] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
      return {a, b};
    }
  }
  static inline F load(const T* p, int64_t n) {
    if (n == kLen) return load(p);
    if constexpr (std::is_same_v<T, float>) {
      return {fVec::loadu(p, n)};
    } else {
      auto [a, b] = at::vec::convert_to_float<T>(
          at::vec::Vectorized<T>::loadu(p, static_cast<int>(n)));
      return {a, b};
    }
  }
  static inline void store(T* p, const F& v, int64_t n = kLen) {
    if constexpr (std::is_same_v<T, float>) {
      v[0].store(p, static_cast<int>(n));
    } else {
      at::vec::convert_from_float<T>(v[0], v[1]).store(p, static_cast<int>(n));
    }
  }
  // The float32 values that storing v as T would produce.
  static inline F round(const F& v) {
    if constexpr (std::is_same_v<T, float>) {
      return v;
    } else {
      auto [a, b] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v[0], v[1]));
      return {a, b};
    }
  }
};
