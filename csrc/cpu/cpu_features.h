// The instruction set the CPU kernels run at: one vocabulary for the three families (attention,
// int8 GEMM / weight-only linear, LayerNorm / RMSNorm), what the CPU supports detected once per
// process, and one cap, the environment variable FASTATTN_CPU_ISA, which is how every path is
// tested on one machine.
//
// Levels, each one including those before it:
//   portable     plain C++ loops (every family)
//   avx2         + AVX2, FMA, F16C, BMI/BMI2: LayerNorm's avx2 build
//   avx512       + AVX-512 F/BW/VL/DQ: attention's fp32 FMA kernels (fp32, fp16, bf16), LayerNorm's
//                avx512 build, int8 weight-only linear's fp32 panels and dot products
//   avx512_vnni  + AVX512-VNNI: int8 GEMM with vpdpbusd
//   avx512_bf16  + AVX512-BF16: attention's bf16 vdpbf16ps kernels, int8 weight-only linear's
//                vdpbf16ps panels for bf16 x
//   amx          + AMX tiles (AMX-TILE, AMX-INT8, AMX-BF16, and the Linux permission to use
//                them): attention's bf16 kernels, int8 GEMM and bf16 weight-only linear on tiles
// Each family runs its best path at or below min(the CPU's level, FASTATTN_CPU_ISA); unset or
// empty means no cap. A CPU's level is the highest one whose features it has along with all the
// earlier ones (no CPU sold has AVX512-BF16 without VNNI, or AMX without both). LayerNorm also
// stays at or below the capability ATen runs at (ATEN_CPU_CAPABILITY lowers it), since its builds
// share ATen's vectorised helpers. A value outside the list raises a RuntimeError.
#pragma once

namespace fastattn::cpu {

enum class Isa : int { portable = 0, avx2, avx512, avx512_vnni, avx512_bf16, amx };

// What the CPU supports. The first call detects it (cpuid) and, on Linux, asks the kernel once
// for the AMX tile state (arch_prctl(ARCH_REQ_XCOMP_PERM)): AMX counts only where that succeeds.
Isa hardware_isa();

// FASTATTN_CPU_ISA, read on every call (a getenv is cheap next to any kernel, and a test that
// changes the variable takes effect at once); Isa::amx when unset or empty.
Isa isa_cap();

// The level the kernels of this call run at.
inline Isa cpu_isa() {
  const Isa hw = hardware_isa(), cap = isa_cap();
  return cap < hw ? cap : hw;
}

// cpu_isa() capped by the capability ATen's own vectorised code runs at (at::vec,
// ATEN_CPU_CAPABILITY): the level of the kernel builds that use at::vec helpers.
Isa vec_isa();

const char* isa_name(Isa isa);

// True on an Intel CPU (cpuid vendor "GenuineIntel"), detected once. Libraries tuned per vendor
// (MKL's sgemm) take their fastest paths only there.
bool intel_cpu();

}  // namespace fastattn::cpu
