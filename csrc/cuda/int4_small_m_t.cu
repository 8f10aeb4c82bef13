// Int4 GPTQ backward to the input for small batches (M <= 16) on tensor cores: dx = dy W.
//
// Format as in int4_small_m.cu: qweight (K/8, N) int32, word (i, n) holds the codes of inputs
// k = 8i + j (nibble j) of column n; W[n, k] = (code - zero[g, n]) * scale[g, n] with g = k / group.
// This kernel takes grouped weights only (g_idx == arange(K) / group_size with whole packed rows a
// group, 16-bit scales); act-order weights use the Triton kernel.
//
// The reduction runs over n, which is the contiguous dimension of qweight, so the weight streams in
// row order. A warp step covers 8 packed rows (64 outputs k) x 16 columns n: lane (q = lane/4,
// t = lane%4) loads 16 bytes = qweight[i0 + q, n0 + 4t .. n0 + 4t + 3]. In mma.m16n8k16 terms the
// mma-k is n (its order is free, so lane (q, t)'s reduction slots 2t, 2t+1, 2t+8, 2t+9 are its own
// columns n0 + 4t .. + 3) and the mma-n is the packed row: mma j (0..7) computes the outputs
// k = 8 (i0 + c) + j, c = 0..7, from nibble j of every lane's words. A fragment = dy[m, n0 + 4t .. + 3],
// one 8-byte load per row. One 16-byte weight load thus feeds 8 mma.
//
// Work split: a CTA owns 8 packed rows and a slice of N (blockIdx.y of n_split slices); its warps
// split the slice and are summed in shared memory. With one slice the CTA writes dx; with several each
// writes fp32 partial sums to a workspace and a second kernel adds them (deterministic, no atomics).
// (A streamed variant, each warp's share copied into shared memory first, with or without the slices
// summed in a thread-block cluster, lost to this one on an H200 on 2026-11-28 and was dropped.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <cstdio>

#include "int4_common.cuh"
#include "int4_small_m.h"

namespace {
using namespace mops_int4;

constexpr int kWarps = 4;  // warps a CTA
constexpr int kSteps = 4;  // 16-column steps whose loads are issued together

struct TParams {
  const void* dy;
  const int32_t* qweight;
  const int32_t* qzeros;
  const void* scales;
  void* dx;         // (M, K) in T, written when n_split == 1
  float* partial;   // (n_split, M, K) fp32 otherwise
  int M, K, N, G;
  int scales_dtype;
  int group_shift;  // packed row i lies in group min(i >> group_shift, G - 1)
  int n_per_cta;    // columns of each N slice, a multiple of 16
  int pf;           // L2 prefetch distance in 16-column steps (0: none; t_prefetch)
};

// The 16 bytes of qweight at packed row `row`, columns col .. col + 3 (col a multiple of 4).
__device__ __forceinline__ const void* t_word(const TParams& p, int row, int col) {
  return p.qweight + (int64_t)row * p.N + col;
}

// L2 prefetch (p.pf > 0) of the weights of 16-column step s of the lane's row, if the warp's part [.., s_end)
// holds it: lanes t = 0 and 3 name both ends of the row's 64 bytes of the step (they may straddle two lines).
// No register holds the data (the loads hold at most 4 steps a warp), so more of the slice is in flight.
__device__ __forceinline__ void t_prefetch(const TParams& p, int row, bool row_ok, int lt, int nb, int s, int s_end) {
  const int col = nb + 16 * s + 4 * lt;
  if ((lt == 0 || lt == 3) && row_ok && s < s_end && col < p.N)
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(t_word(p, row, col)));
}

// A pair of column slots (n, n+1) of one packed row: nibble j of words a and b, dequantized.
template <class T>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t src, int shift, typename Traits<T>::T2 zz,
                                                 typename Traits<T>::T2 ss) {
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  const T2 v = from_bits<T2>(lop3_and_or(src >> shift, 0x000f000fu, Tr::kMagic));
  return bits(__hmul2(__hsub2(v, zz), ss));
}

// One step of the backward: lane (q, t) brings the 16-byte word quad of its packed row at columns
// col .. col+3, their scales (sv) and zero word (zv), and dy[q, col .. col+3] (dlo) and dy[q + 8, ...]
// (dhi, MT == 16). Whole warp (mma.sync).
template <class T, int MT>
__device__ __forceinline__ void t_step(int col, int4 qv, uint2 sv, uint32_t zv, uint2 dlo, uint2 dhi,
                                       int scales_dtype, float (&acc)[8][4]) {
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  // A fragment: rows lq (a0, a2) and lq + 8 (a1, a3); reduction slots (2t, 2t+1) = columns col, col+1
  // and (2t+8, 2t+9) = col+2, col+3.
  const uint32_t a[4] = {dlo.x, MT == 16 ? dhi.x : 0u, dlo.y, MT == 16 ? dhi.y : 0u};
  // zeros and scales of columns (col, col+1) and (col+2, col+3)
  const uint32_t zw = zv >> (4 * (col & 7));
  const T2 zz0 = from_bits<T2>((Tr::kBias + (zw & 0xfu)) | ((Tr::kBias + ((zw >> 4) & 0xfu)) << 16));
  const T2 zz1 = from_bits<T2>((Tr::kBias + ((zw >> 8) & 0xfu)) | ((Tr::kBias + ((zw >> 12) & 0xfu)) << 16));
  T2 ss0, ss1;
  if (scales_dtype == Tr::kCode) {  // scale pairs are T2 bits as loaded
    ss0 = from_bits<T2>(sv.x);
    ss1 = from_bits<T2>(sv.y);
  } else {
    ss0 = Tr::from_floats(scale16(sv, 0, scales_dtype), scale16(sv, 1, scales_dtype));
    ss1 = Tr::from_floats(scale16(sv, 2, scales_dtype), scale16(sv, 3, scales_dtype));
  }
  // nibbles 0-3 (low halves) and 4-7 (high halves) of the word pairs (col, col+1), (col+2, col+3)
  const uint32_t w01[2] = {__byte_perm(uint32_t(qv.x), uint32_t(qv.y), 0x5410),
                           __byte_perm(uint32_t(qv.x), uint32_t(qv.y), 0x7632)};
  const uint32_t w23[2] = {__byte_perm(uint32_t(qv.z), uint32_t(qv.w), 0x5410),
                           __byte_perm(uint32_t(qv.z), uint32_t(qv.w), 0x7632)};
  uint32_t b[8][2];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    b[j][0] = dequant_pair<T>(w01[j >> 2], 4 * (j & 3), zz0, ss0);
    b[j][1] = dequant_pair<T>(w23[j >> 2], 4 * (j & 3), zz1, ss1);
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < 8; ++j) Tr::mma(acc[j], a, b[j][0], b[j][1]);
}

// Write the CTA's outputs from warp 0's sums (tot[4 j + i] = accumulator i of mma j over the warps): dx,
// or its slice's fp32 partial sums (p.partial).
template <class T, int MT>
__device__ __forceinline__ void t_write(const TParams& p, const float (&tot)[32], int lane, int i0) {
  using Tr = Traits<T>;
  const int lq = lane >> 2, lt = lane & 3, M = p.M, K = p.K, R = K / 8;

  // Accumulator i of mma j: row lq + 8 * (i / 2), packed row i0 + 2t + (i % 2), input k = 8 * that + j.
  // Lane (q, t) thus holds, for each of its rows, the 16 consecutive inputs 8 (i0 + 2t) .. + 15.
#pragma unroll
  for (int h = 0; h < (MT == 16 ? 2 : 1); ++h) {
    const int m = lq + 8 * h;
    if (m >= M) continue;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int prow = i0 + 2 * lt + e;
      if (prow >= R) continue;
      const int64_t off = (int64_t)m * K + 8 * prow;
      if (p.partial == nullptr) {
        uint32_t o[4];
#pragma unroll
        for (int j = 0; j < 8; j += 2)
          o[j / 2] = uint32_t(Tr::to_bits(tot[j * 4 + 2 * h + e])) |
                     (uint32_t(Tr::to_bits(tot[(j + 1) * 4 + 2 * h + e])) << 16);
        *reinterpret_cast<uint4*>(static_cast<T*>(p.dx) + off) = make_uint4(o[0], o[1], o[2], o[3]);
      } else {
        float* dst = p.partial + (int64_t)blockIdx.y * M * K + off;
        *reinterpret_cast<float4*>(dst) =
            make_float4(tot[0 * 4 + 2 * h + e], tot[1 * 4 + 2 * h + e], tot[2 * 4 + 2 * h + e], tot[3 * 4 + 2 * h + e]);
        *reinterpret_cast<float4*>(dst + 4) =
            make_float4(tot[4 * 4 + 2 * h + e], tot[5 * 4 + 2 * h + e], tot[6 * 4 + 2 * h + e], tot[7 * 4 + 2 * h + e]);
      }
    }
  }
}

// Sum the warps' accumulators through shared memory (red: kWarps * 32 * 32 floats) and write the outputs.
template <class T, int MT>
__device__ __forceinline__ void t_store(const TParams& p, const float (&acc)[8][4], float* red, int warp, int lane,
                                        int i0) {
  float tot[32];
  if (sum_over_warps<32>(*reinterpret_cast<const float(*)[32]>(&acc[0][0]), red, warp, kWarps, lane, tot))
    t_write<T, MT>(p, tot, lane, i0);
}

template <class T, int MT>
__global__ void __launch_bounds__(kWarps * 32)
    int4_small_m_t_kernel(const TParams p) {
  __shared__ float red[kWarps * 32 * 32];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int lq = lane >> 2, lt = lane & 3;
  const int N = p.N, K = p.K, M = p.M;
  const int R = K / 8;
  const int i0 = blockIdx.x * 8;
  const int row = i0 + lq;  // this lane's packed row
  const bool row_ok = row < R;
  const int g = row_ok ? min(row >> p.group_shift, p.G - 1) : 0;

  const int nb = blockIdx.y * p.n_per_cta;
  const int ne = min(N, nb + p.n_per_cta);
  const int steps = (max(ne - nb, 0) + 15) / 16;
  const int per_warp = (steps + kWarps - 1) / kWarps;
  const int s_begin = warp * per_warp;
  const int s_end = min(steps, s_begin + per_warp);

  float acc[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;

  const T* dyg = static_cast<const T*>(p.dy);
  const unsigned short* sc16 = static_cast<const unsigned short*>(p.scales);
  const bool m_lo = lq < M, m_hi = MT == 16 && lq + 8 < M;
  griddep_launch_dependents();
  if (p.pf > 0)  // the first steps past the first batch's loads; frozen weights, so before griddep_wait
    for (int s = s_begin + kSteps; s < min(s_begin + p.pf, s_end); ++s) t_prefetch(p, row, row_ok, lt, nb, s, s_end);
  griddep_wait();  // dy comes with the first batch's weights

  for (int s0 = s_begin; s0 < s_end; s0 += kSteps) {
    int4 qv[kSteps];
    uint2 sv[kSteps], dlo[kSteps], dhi[kSteps];
    uint32_t zv[kSteps];
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const int col = nb + 16 * (s0 + u) + 4 * lt;
      // N is a multiple of 8 and col of 4, so col < N means all four columns exist
      const bool ok = s0 + u < s_end && col < N;
      qv[u] = make_int4(0, 0, 0, 0);
      sv[u] = dlo[u] = dhi[u] = make_uint2(0, 0);
      zv[u] = 0;
      if (p.pf > 0) t_prefetch(p, row, row_ok, lt, nb, s0 + u + p.pf, s_end);
      if (ok && row_ok) {
        qv[u] = __ldg(reinterpret_cast<const int4*>(t_word(p, row, col)));
        sv[u] = __ldg(reinterpret_cast<const uint2*>(sc16 + (int64_t)g * N + col));
        zv[u] = uint32_t(__ldg(p.qzeros + (int64_t)g * (N / 8) + col / 8));
      }
      if (ok && m_lo) dlo[u] = __ldg(reinterpret_cast<const uint2*>(dyg + (int64_t)lq * N + col));
      if (MT == 16 && ok && m_hi) dhi[u] = __ldg(reinterpret_cast<const uint2*>(dyg + (int64_t)(lq + 8) * N + col));
    }
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      if (s0 + u >= s_end) break;  // warp-uniform
      t_step<T, MT>(nb + 16 * (s0 + u) + 4 * lt, qv[u], sv[u], zv[u], dlo[u], dhi[u], p.scales_dtype, acc);
    }
  }

  t_store<T, MT>(p, acc, red, warp, lane, i0);
}

// dx[i] = sum over slices of partial[s][i], rounded once to T.
template <class T>
__global__ void sum_slices_kernel(const float* partial, int n_split, int64_t count, T* dx) {
  using Tr = Traits<T>;
  griddep_launch_dependents();
  griddep_wait();  // the partial sums of the kernel before
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < n_split; ++k) s += partial[k * count + i];
    const uint16_t b = Tr::to_bits(s);
    reinterpret_cast<uint16_t*>(dx)[i] = b;
  }
}

// Slices of N: enough CTAs for about 4 resident a multiprocessor (the kernel holds about 110 registers a
// thread, so 4 CTAs of 4 warps fit), each warp keeping at least 4 steps of 16 columns.
int n_split_for(int K, int N, int sm_count) {
  const int row_blocks = (K / 8 + 7) / 8;
  const int want = std::max(1, (4 * sm_count + row_blocks - 1) / row_blocks);
  const int most = std::max(1, N / (16 * kWarps * 4));
  return std::min(want, most);
}

int n_per_cta_for(int N, int n_split) { return ((N + n_split - 1) / n_split + 15) / 16 * 16; }

// The backward: the register kernel, then the slices' sum where N is split. pdl: each launched as a
// programmatic dependent of the grid before it (sm_90; griddep_wait).
template <class T, int MT>
cudaError_t launch_t(const TParams& p0, int n_split, int64_t count, bool pdl, cudaStream_t s) {
  TParams p = p0;
  p.n_per_cta = n_per_cta_for(p.N, n_split);
  const cudaError_t e = launch_maybe_pdl(int4_small_m_t_kernel<T, MT>, dim3((p.K / 8 + 7) / 8, n_split),
                                         kWarps * 32, 0, s, pdl, p);
  if (e != cudaSuccess || p.partial == nullptr) return e;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((count + threads - 1) / threads, 1024));
  return launch_maybe_pdl(sum_slices_kernel<T>, dim3(blocks), threads, 0, s, pdl, p.partial, n_split, count,
                          static_cast<T*>(p.dx));
}

}  // namespace

extern "C" long long mops_int4_small_m_t_workspace(int M, int K, int N, int device) {
  if (M < 1 || K <= 0 || N <= 0) return 0;
  const DeviceInfo* info = nullptr;
  if (use_device(device, &info) != nullptr) return 0;
  const int n_split = n_split_for(K, N, info->sm_count);
  return n_split > 1 ? (long long)n_split * M * K : 0;
}

extern "C" int mops_int4_small_m_t(const void* dy, int dy_dtype, const int32_t* qweight, const int32_t* qzeros,
                                   const void* scales, int scales_dtype, int M, int K, int N, int G,
                                   int group_size, void* dx, float* workspace, long long workspace_floats,
                                   int device, void* stream, int prefetch_hint, int flags, char* err,
                                   int err_len) {
  auto fail = [&](const char* msg) {
    std::snprintf(err, size_t(err_len), "%s", msg);
    return 1;
  };
  if (const char* msg = small_m_shape_error(M, K, N, G)) return fail(msg);
  if (dy_dtype != 1 && dy_dtype != 2) return fail("dy must be fp16 or bf16");
  if (scales_dtype != 1 && scales_dtype != 2) return fail("scales must be fp16 or bf16 here");
  if (flags & ~MOPS_INT4_PDL) return fail("unknown flags");
  if (prefetch_hint < 0 || prefetch_hint > 64) return fail("prefetch hint must be in [0, 64] steps (0: none)");
  const DeviceInfo* info = nullptr;
  if (const char* msg = use_device(device, &info)) return fail(msg);
  const int group_shift = row_group_shift(group_size, G);
  if (group_shift < 0)
    return fail("needs g_idx == arange(K) / group_size with a power-of-two multiple of 8 as group_size");
  const int n_split = n_split_for(K, N, info->sm_count);
  const int64_t count = (int64_t)M * K;
  if (n_split > 1 && (workspace == nullptr || workspace_floats < n_split * count))
    return fail("workspace too small: size it with mops_int4_small_m_t_workspace");
  TParams p{dy, qweight, qzeros, scales, dx, n_split > 1 ? workspace : nullptr, M, K, N, G, scales_dtype,
            group_shift, 0, prefetch_hint};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e;
  const DeviceInfo& dev = *info;
  const bool pdl = (flags & MOPS_INT4_PDL) && dev.sm90_features();  // earlier parts: ordinary launches
  if (dy_dtype == 1)
    e = M <= 8 ? launch_t<__half, 8>(p, n_split, count, pdl, s) : launch_t<__half, 16>(p, n_split, count, pdl, s);
  else
    e = M <= 8 ? launch_t<__nv_bfloat16, 8>(p, n_split, count, pdl, s)
               : launch_t<__nv_bfloat16, 16>(p, n_split, count, pdl, s);
  if (e != cudaSuccess) return fail(cudaGetErrorString(e));
  return 0;
}
