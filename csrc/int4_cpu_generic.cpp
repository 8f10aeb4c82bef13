// Portable copy of the int4 CPU kernels (baseline flags of the target: SSE2 on x86-64, NEON on
// aarch64); used when the CPU lacks AVX2/FMA/F16C or when MOPS_FAST_CPU_ISA=generic.
#define MOPS_ISA generic
#include "int4_cpu_impl.h"
