// C interface of the CUDA small-M int4 kernel, so that the pybind11 binding compiles with the host
// compiler and needs no CUDA headers.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif
// Flags of mops_int4_small_m and mops_int4_small_m_t. PDL: launch as a programmatic dependent of the
// stream's previous grid (sm_90; elsewhere ignored): the kernel may start, and fetch weights, while that
// grid finishes, and reads its activations only once it has (so nothing before it may write the weights).
#define MOPS_INT4_PDL 2

// y (M,N) = x (M,K) W^T for 1 <= M <= 16. x_dtype: 1 fp16, 2 bf16; scales_dtype: 0 f32, 1 f16,
// 2 bf16. group_size > 0 is the caller's promise that g_idx == arange(K) / group_size (the kernel
// then computes groups instead of reading g_idx); 0 reads g_idx. flags: MOPS_INT4_PDL. All pointers
// device pointers on `device`; stream is a cudaStream_t. steps_hint (0, 4, 22), warps_hint (warps a CTA),
// ksplit_hint (K slices, 0-8) and prefetch_hint (L2 prefetch distance in 4-row steps, 0-64) override the
// tuned choice when nonzero (benchmarks; launch() and plan() in int4_small_m.cu). Returns 0, or 1 with a
// message in err.
int mops_int4_small_m(const void* x, int x_dtype, const int32_t* qweight, const int32_t* qzeros,
                      const void* scales, int scales_dtype, const int32_t* g_idx, int M, int K,
                      int N, int G, int group_size, int flags, void* y, int device, void* stream,
                      int steps_hint, int warps_hint, int ksplit_hint, int prefetch_hint, char* err,
                      int err_len);

// What mops_int4_small_m launches for these arguments on `device`: out[0] the kernel (0 the g_idx table
// path, 1 batches of 4 steps, 2 software-pipelined), out[1] the K slices, out[2] the warps a CTA. Returns
// 0, or 1 on bad arguments (benchmarks and tests report it).
int mops_int4_small_m_plan(int M, int K, int N, int G, int group_size, int scales_dtype, int x_dtype,
                           int steps_hint, int warps_hint, int ksplit_hint, int device, int* out);

// dx (M,K) = dy (M,N) W for 1 <= M <= 16, the backward to the input. dy_dtype: 1 fp16, 2 bf16;
// scales fp16 or bf16; grouped weights only (group_size a power-of-two multiple of 8 with the promise
// above, or G == 1). workspace: fp32, at least mops_int4_small_m_t_workspace(M, K, N, device) elements
// (0: none needed, nullptr allowed). prefetch_hint: L2 prefetch distance in 16-column steps (0-64, 0 none;
// benchmarks). flags: MOPS_INT4_PDL (dy is read only after the previous grid finished). Returns 0, or 1
// with a message in err.
long long mops_int4_small_m_t_workspace(int M, int K, int N, int device);
int mops_int4_small_m_t(const void* dy, int dy_dtype, const int32_t* qweight, const int32_t* qzeros,
                        const void* scales, int scales_dtype, int M, int K, int N, int G, int group_size,
                        void* dx, float* workspace, long long workspace_floats, int device, void* stream,
                        int prefetch_hint, int flags, char* err, int err_len);
#ifdef __cplusplus
}
#endif
