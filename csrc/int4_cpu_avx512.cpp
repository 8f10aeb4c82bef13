// AVX-512 copy of the int4 CPU kernels (-mavx512f -mavx512vl -mavx512bw -mavx512dq -mfma -mf16c):
// the decode path uses 16-lane registers and all 32 of them; chosen at run time when the CPU has
// AVX-512F/VL/BW/DQ.
#define MOPS_ISA avx512
#include "int4_cpu_impl.h"
