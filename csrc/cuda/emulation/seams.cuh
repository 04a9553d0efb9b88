// The host twins of the hardware layer of ../common.cuh: launch, fast math, vector memory
// access, cp.async, ldmatrix and mma.sync, with the same names and signatures, backed by the
// fiber emulator of emulator.h. common.cuh includes this header instead of its own definitions
// when FASTATTN_EMULATE is defined; nothing else in csrc/cuda knows about the emulator.
#pragma once

#ifndef FASTATTN_EMULATE
#error "emulation/seams.cuh is only for the FASTATTN_EMULATE host build"
#endif

#include <driver_types.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "emulator.h"

#define FA_DEVICE inline
#define FA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), ::fa_emu::launch(kernel, grid, block, smem, __VA_ARGS__))

namespace fastattn::cuda {

// ---- launch (host) ---------------------------------------------------------------------------
inline cudaError_t launch_status() {
  return ::fa_emu::last_error().empty() ? cudaSuccess : cudaErrorLaunchFailure;
}

// The opt-in itself has no host equivalent; the emulator only enforces the per-block limit.
template <class Kernel>
inline cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  (void)kernel;
  return bytes <= ::fa_emu::kMaxSmemBytes ? cudaSuccess : cudaErrorInvalidValue;
}

// ---- math ------------------------------------------------------------------------------------
FA_DEVICE float exp2_approx(float x) { return std::exp2(x); }

FA_DEVICE float log_f(float x) { return std::log(x); }

FA_DEVICE float rsqrt_approx(float x) { return 1.0f / std::sqrt(x); }

// volatile keeps the host compiler from contracting or reassociating the rounding step
FA_DEVICE float div_rn(float a, float b) {
  volatile float r = a / b;
  return r;
}
FA_DEVICE float mul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
// cvt.rni.s32.f32: round half to even, saturating, NaN -> 0
FA_DEVICE int round_to_int(float x) {
  if (x != x) return 0;
  if (x >= 2147483647.0f) return 2147483647;
  if (x <= -2147483648.0f) return -2147483647 - 1;
  return int(std::nearbyint(x));
}

// ---- memory ----------------------------------------------------------------------------------
FA_DEVICE char* smem_base() { return ::fa_emu::smem_base(); }

// Vector accesses are checked for the alignment the hardware would fault on.
FA_DEVICE uint4 load16(const void* p) {
  ::fa_emu::check_align(p, 16, "16-byte load");
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
FA_DEVICE void store16(void* p, const uint4& v) {
  ::fa_emu::check_align(p, 16, "16-byte store");
  std::memcpy(p, &v, 16);
}
FA_DEVICE void store_u32(void* p, uint32_t v) {
  ::fa_emu::check_align(p, 4, "4-byte store");
  std::memcpy(p, &v, 4);
}

FA_DEVICE void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  ::fa_emu::cp_async_16(smem, gmem, src_bytes);
}
FA_DEVICE void cp_async_commit() { ::fa_emu::cp_async_commit(); }
template <int N>
FA_DEVICE void cp_async_wait() {
  ::fa_emu::cp_async_wait(N);
}

FA_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
  ::fa_emu::ldmatrix_x4(r, row_addr, false);
}
FA_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
  ::fa_emu::ldmatrix_x4(r, row_addr, true);
}

template <class T>
FA_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
FA_DEVICE void mma_16816<bf16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::fa_emu::mma_16816<true>(d, a, b);
}
template <>
FA_DEVICE void mma_16816<fp16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::fa_emu::mma_16816<false>(d, a, b);
}

FA_DEVICE void mma_16832_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::fa_emu::mma_16832_s8(d, a, b);
}

}  // namespace fastattn::cuda
