// C interface of the CUDA small-M int4 kernel, so that the pybind11 binding compiles with the host
// compiler and needs no CUDA headers.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif
// y (M,N) = x (M,K) W^T for 1 <= M <= 16. x_dtype: 1 fp16, 2 bf16; scales_dtype: 0 f32, 1 f16,
// 2 bf16. group_size > 0 is the caller's promise that g_idx == arange(K) / group_size (the kernel
// then computes groups instead of reading g_idx); 0 reads g_idx. All pointers device pointers on
// `device`; stream is a cudaStream_t. steps_hint (8: 8 row steps in flight instead of 4) and
// warps_hint (warps a CTA) override the tuned choice when > 0 (benchmarks). Returns 0, or 1 with a
// message in err.
int mops_int4_small_m(const void* x, int x_dtype, const int32_t* qweight, const int32_t* qzeros,
                      const void* scales, int scales_dtype, const int32_t* g_idx, int M, int K,
                      int N, int G, int group_size, void* y, int device, void* stream,
                      int steps_hint, int warps_hint, char* err, int err_len);
#ifdef __cplusplus
}
#endif
