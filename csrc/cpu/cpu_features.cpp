// Detection of the CPU's instruction-set level and the FASTATTN_CPU_ISA cap (cpu_features.h).
#include "cpu_features.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTATTN_CPUID 1
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace fastattn::cpu {
namespace {

Isa detect() {
#ifdef FASTATTN_CPUID
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") &&
        __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt")))
    return Isa::portable;
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
    return Isa::avx2;
  if (!__builtin_cpu_supports("avx512vnni")) return Isa::avx512;
  if (!__builtin_cpu_supports("avx512bf16")) return Isa::avx512_vnni;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return Isa::avx512_bf16;
  const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u, amx_int8 = (edx >> 25) & 1u;
  if (!(amx_tile && amx_int8 && amx_bf16)) return Isa::avx512_bf16;
#if defined(__linux__)
  // Linux hands out the 8 KiB tile state only on request (ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA, Linux >= 5.16); the permission covers the whole process, so it is asked
  // for here, once, for every family.
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) return Isa::amx;
#endif
  return Isa::avx512_bf16;
#else
  return Isa::portable;
#endif
}

}  // namespace

const char* isa_name(Isa isa) {
  constexpr const char* kNames[] = {"portable",    "avx2",        "avx512",
                                    "avx512_vnni", "avx512_bf16", "amx"};
  return kNames[static_cast<int>(isa)];
}

Isa vec_isa() {
  static const Isa aten = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX512" ? Isa::avx512 : (cap == "AVX2" ? Isa::avx2 : Isa::portable);
  }();
  return std::min(cpu_isa(), aten);
}

Isa hardware_isa() {
  static const Isa hw = detect();
  return hw;
}

Isa isa_cap() {
  const char* env = std::getenv("FASTATTN_CPU_ISA");
  if (env == nullptr || *env == '\0') return Isa::amx;
  for (int i = 0; i <= static_cast<int>(Isa::amx); ++i)
    if (std::strcmp(env, isa_name(static_cast<Isa>(i))) == 0) return static_cast<Isa>(i);
  TORCH_CHECK(false,
              "FASTATTN_CPU_ISA must be one of portable, avx2, avx512, avx512_vnni, avx512_bf16, "
              "amx (or unset); got '",
              env, "'");
  return Isa::portable;  // not reached
}

bool intel_cpu() {
#ifdef FASTATTN_CPUID
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
#else
  return false;
#endif
}

}  // namespace fastattn::cpu
