// C interface of the CUDA small-M int4 kernel, so that the pybind11 binding compiles with the host
// compiler and needs no CUDA headers.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif
// Flags of mops_int4_small_m. TILED: qweight is in the tiled order (ceil(N/32), K/8, 32) of
// mops_fast.native.tile_qweight instead of GPTQ's (K/8, N). PDL: launch as a programmatic dependent of
// the stream's previous grid (sm_90; elsewhere ignored): the kernel may start, and fetch weights, while
// that grid finishes, and reads x only once it has (so nothing before it may write the weights).
#define MOPS_INT4_TILED 1
#define MOPS_INT4_PDL 2

// y (M,N) = x (M,K) W^T for 1 <= M <= 16. x_dtype: 1 fp16, 2 bf16; scales_dtype: 0 f32, 1 f16,
// 2 bf16. group_size > 0 is the caller's promise that g_idx == arange(K) / group_size (the kernel
// then computes groups instead of reading g_idx); 0 reads g_idx. flags: MOPS_INT4_* above. All pointers
// device pointers on `device`; stream is a cudaStream_t. steps_hint and warps_hint (warps a CTA)
// override the tuned choice when nonzero (benchmarks); the steps variants are listed at launch() in
// int4_small_m.cu (4-step batches, the software-pipelined kernel, the streamed ones). Returns 0, or 1
// with a message in err.
int mops_int4_small_m(const void* x, int x_dtype, const int32_t* qweight, const int32_t* qzeros,
                      const void* scales, int scales_dtype, const int32_t* g_idx, int M, int K,
                      int N, int G, int group_size, int flags, void* y, int device, void* stream,
                      int steps_hint, int warps_hint, char* err, int err_len);

// Warps a CTA the streamed kernel of steps_hint 32, 34, 36 or 38 takes for this shape on `device` with
// 16-bit scales and the group_size promise, launched as a programmatic dependent when pdl (sm_90): 0 where
// it falls back to the default kernel, -1 on bad arguments (benchmarks and tests report it).
int mops_int4_small_m_stream_warps(int M, int K, int N, int G, int group_size, int x_dtype, int steps_hint,
                                   int pdl, int device);

// dx (M,K) = dy (M,N) W for 1 <= M <= 16, the backward to the input. dy_dtype: 1 fp16, 2 bf16;
// scales fp16 or bf16; grouped weights only (group_size a power-of-two multiple of 8 with the promise
// above, or G == 1). workspace: fp32, at least mops_int4_small_m_t_workspace(M, K, N, device) elements
// (0: none needed, nullptr allowed). steps_hint: 0 the register kernel, 32 the streamed one where it applies,
// 33 that with its N slices summed in a thread-block cluster on sm_90 (int4_small_m_t.cu; benchmarks).
// flags: MOPS_INT4_TILED (qweight in the tiled order) and MOPS_INT4_PDL (dy is read only after the
// previous grid finished). Returns 0, or 1 with a message in err.
long long mops_int4_small_m_t_workspace(int M, int K, int N, int device);
int mops_int4_small_m_t(const void* dy, int dy_dtype, const int32_t* qweight, const int32_t* qzeros,
                        const void* scales, int scales_dtype, int M, int K, int N, int G, int group_size,
                        void* dx, float* workspace, long long workspace_floats, int device, void* stream,
                        int steps_hint, int flags, char* err, int err_len);
#ifdef __cplusplus
}
#endif
