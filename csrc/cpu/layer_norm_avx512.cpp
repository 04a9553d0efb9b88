// AVX-512 build of the LayerNorm / RMSNorm row kernels (layer_norm_kernel.h), chosen at run time
// by layer_norm.cpp when ATen runs at the AVX512 capability (F, BW, VL, DQ, as ATen requires).
#include "layer_norm.h"

#ifdef FASTATTN_LN_HAVE_X86_BUILDS
#define FASTATTN_LN_BUILD_AVX512
#include "layer_norm_kernel.h"
#endif
