// AVX2 + FMA + F16C copy of the int4 CPU kernels (compiled with -mavx2 -mfma -mf16c; only called
// after __builtin_cpu_supports confirms the CPU has them).
#define MOPS_ISA avx2
#include "int4_cpu_impl.h"
