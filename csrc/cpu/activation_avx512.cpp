// AVX-512 (F, BW, VL, DQ) build of the SiLU-and-mul kernels (activation_kernel.h), chosen at run
// time by activation.cpp.
#include "activation.h"

#ifdef FASTATTN_ACT_HAVE_X86_BUILDS
#define FASTATTN_ACT_BUILD_AVX512
#include "activation_kernel.h"
#endif
