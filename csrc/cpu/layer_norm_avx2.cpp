// AVX2 + FMA build of the LayerNorm / RMSNorm row kernels (layer_norm_kernel.h), chosen at run
// time by layer_norm.cpp when ATen runs at the AVX2 capability.
#include "layer_norm.h"

#ifdef FASTATTN_LN_HAVE_X86_BUILDS
#define FASTATTN_LN_BUILD_AVX2
#include "layer_norm_kernel.h"
#endif
