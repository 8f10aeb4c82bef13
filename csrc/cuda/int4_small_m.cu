// Int4 GPTQ matmul for small batches (M <= 16, decode) on tensor cores: y = x W^T.
//
// Format (DESIGN §3): qweight (K/8, N) int32, code of (k, n) at bits 4*(k%8) of qweight[k/8, n];
// qzeros (G, N/8) int32 packed along n; scales (G, N) fp16/bf16/fp32; g_idx (K,) int32.
// W[n, k] = (code - zero[g_idx[k], n]) * scale[g_idx[k], n].
//
// Work split. A CTA owns 32 output columns and the whole K (no cross-CTA reduction, so no workspace
// and no extra kernel); its KW warps each take a contiguous slice of K and are summed through shared
// memory at the end. A warp step covers 4 qweight rows x 32 columns: lane (q = lane/4, t = lane%4)
// loads 16 bytes = qweight[row0 + t, n0 + 4q .. n0 + 4q + 3] (each row's 128 bytes coalesced).
//
// Tensor cores: mma.m16n8k16 (fp16 or bf16 in, fp32 accumulate). The reduction order inside one mma
// is free, so the k index of the mma is permuted to fit the packing: lane (q, t) supplies the B
// elements of column q at mma-k {2t, 2t+1, 2t+8, 2t+9} from its own word of row row0 + t, nibbles
// (0,4),(1,5) in the first mma and (2,6),(3,7) in the second, and the A fragment (x) is permuted the
// same way: x[m, 8*(row0+t) .. +7] is one 16-byte load and a few byte permutes. One 16-byte weight
// load thus feeds 8 mma (4 columns slots x 2). Column slot c of the mma (B column q) is output
// column n0 + 4q + c, which makes each lane's 8 accumulators for a row 8 contiguous outputs.
//
// Dequantization in registers: (nibbles j, j+4) masked into the mantissa of 1024.0 (fp16) or 128.0
// (bf16) give both codes exactly in one LOP3; subtracting (1024 + zero) is exact, one multiply by the
// scale rounds once. Rows whose 8 inputs share a group (all but act-order) reuse the cached scale
// and zero of the previous row; act-order rows look up the group of each nibble pair.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "int4_small_m.h"

namespace {

constexpr int kMaxWarps = 16;
constexpr int kStepsPerIter = 4;  // weight loads in flight per lane

template <class T>
struct Traits;

template <>
struct Traits<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both halves
  static constexpr uint32_t kBias = 0x6400u;
  static __device__ __forceinline__ T2 from_float(float f) { return __float2half2_rn(f); }
  static __device__ __forceinline__ T2 from_floats(float lo, float hi) {
    return __floats2half2_rn(lo, hi);
  }
  static __device__ __forceinline__ uint16_t to_bits(float f) {
    __half h = __float2half_rn(f);
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in both halves
  static constexpr uint32_t kBias = 0x4300u;
  static __device__ __forceinline__ T2 from_float(float f) { return __float2bfloat162_rn(f); }
  static __device__ __forceinline__ T2 from_floats(float lo, float hi) {
    return __floats2bfloat162_rn(lo, hi);
  }
  static __device__ __forceinline__ uint16_t to_bits(float f) {
    __nv_bfloat16 h = __float2bfloat16_rn(f);
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <class V>
__device__ __forceinline__ uint32_t bits(V v) {
  static_assert(sizeof(V) == 4, "32-bit pair");
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <class V>
__device__ __forceinline__ V from_bits(uint32_t u) {
  V v;
  memcpy(&v, &u, 4);
  return v;
}

// (x & mask) | magic as one LOP3.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t x, uint32_t mask, uint32_t magic) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(x), "r"(mask), "r"(magic));
  return r;
}

// Four consecutive scales (16-byte fp32 or 8-byte 16-bit loads).
__device__ __forceinline__ void load_scales4(const void* p, int dtype, int64_t i, float* s) {
  if (dtype == 0) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(p) + i));
    s[0] = v.x; s[1] = v.y; s[2] = v.z; s[3] = v.w;
    return;
  }
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(static_cast<const unsigned short*>(p) + i));
  const uint32_t w[2] = {v.x, v.y};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const uint32_t h = (w[c >> 1] >> (16 * (c & 1))) & 0xffffu;
    s[c] = dtype == 1 ? __half2float(__ushort_as_half((unsigned short)h)) : __uint_as_float(h << 16);
  }
}

struct Params {
  const void* x;
  const int32_t* qweight;
  const int32_t* qzeros;
  const void* scales;
  const int32_t* g_idx;
  void* y;
  int M, K, N, G;
  int scales_dtype;
};

// MT: 8 (M <= 8, the upper 8 mma rows are zero) or 16.
template <class T, int MT>
__global__ void __launch_bounds__(kMaxWarps * 32)
    int4_small_m_kernel(const Params p) {
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  extern __shared__ int32_t smem[];  // rowg[R] during the main loop, then the reduction buffer

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int lq = lane >> 2, lt = lane & 3;
  const int N = p.N, K = p.K, M = p.M, G = p.G;
  const int R = K / 8;                     // qweight rows
  const int n0 = blockIdx.x * 32;
  const int ncol = n0 + 4 * lq;            // this lane's 4 columns
  const bool col_ok = ncol < N;

  // Group of each qweight row (-1: its 8 inputs span several groups, as with act-order).
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    const int4 a = __ldg(reinterpret_cast<const int4*>(p.g_idx + 8 * r));
    const int4 b = __ldg(reinterpret_cast<const int4*>(p.g_idx + 8 * r + 4));
    const bool same = a.x == a.y && a.x == a.z && a.x == a.w && a.x == b.x && a.x == b.y &&
                      a.x == b.z && a.x == b.w;
    smem[r] = same ? min(max(a.x, 0), G - 1) : -1;
  }
  __syncthreads();

  // This warp's contiguous slice of 4-row steps.
  const int steps = (R + 3) / 4;
  const int per_warp = (steps + nwarps - 1) / nwarps;
  const int s_begin = warp * per_warp;
  const int s_end = min(steps, s_begin + per_warp);

  float acc[4][4];
#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[c][i] = 0.f;

  int cur_g = -1;
  T2 ss[4], zz[4];  // cached scale and (bias + zero) per column slot
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    ss[c] = Tr::from_float(0.f);
    zz[c] = from_bits<T2>(Tr::kMagic);
  }

  const T* xg = static_cast<const T*>(p.x);
  const bool row_lo = lq < M, row_hi = MT == 16 && lq + 8 < M;

  for (int s0 = s_begin; s0 < s_end; s0 += kStepsPerIter) {
    int4 qv[kStepsPerIter];
    uint4 xlo[kStepsPerIter], xhi[kStepsPerIter];
    // Issue every load of this iteration before using any.
#pragma unroll
    for (int u = 0; u < kStepsPerIter; ++u) {
      const int r = 4 * (s0 + u) + lt;
      const bool ok = s0 + u < s_end && r < R;
      qv[u] = make_int4(0, 0, 0, 0);
      xlo[u] = make_uint4(0, 0, 0, 0);
      xhi[u] = make_uint4(0, 0, 0, 0);
      if (ok && col_ok) qv[u] = __ldg(reinterpret_cast<const int4*>(p.qweight + (int64_t)r * N + ncol));
      if (ok && row_lo)
        xlo[u] = __ldg(reinterpret_cast<const uint4*>(xg + (int64_t)lq * K + 8 * r));
      if (MT == 16 && ok && row_hi)
        xhi[u] = __ldg(reinterpret_cast<const uint4*>(xg + (int64_t)(lq + 8) * K + 8 * r));
    }
#pragma unroll
    for (int u = 0; u < kStepsPerIter; ++u) {
      if (s0 + u >= s_end) break;  // warp-uniform
      const int r = 4 * (s0 + u) + lt;
      const bool ok = r < R;
      // Rows past the end carry x = 0; give them any valid group so that no load goes astray.
      const int rg = ok ? smem[r] : max(cur_g, 0);

      // A fragments: mma 0 takes input pairs (0,4),(1,5); mma 1 takes (2,6),(3,7).
      uint32_t a0[4], a1[4];
      a0[0] = __byte_perm(xlo[u].x, xlo[u].z, 0x5410);
      a0[2] = __byte_perm(xlo[u].x, xlo[u].z, 0x7632);
      a1[0] = __byte_perm(xlo[u].y, xlo[u].w, 0x5410);
      a1[2] = __byte_perm(xlo[u].y, xlo[u].w, 0x7632);
      if (MT == 16) {
        a0[1] = __byte_perm(xhi[u].x, xhi[u].z, 0x5410);
        a0[3] = __byte_perm(xhi[u].x, xhi[u].z, 0x7632);
        a1[1] = __byte_perm(xhi[u].y, xhi[u].w, 0x5410);
        a1[3] = __byte_perm(xhi[u].y, xhi[u].w, 0x7632);
      } else {
        a0[1] = a0[3] = a1[1] = a1[3] = 0u;
      }

      // B fragments b[c][j] = dequantized nibbles (j, j+4) of column slot c. Computed on either
      // branch; the mma themselves run after reconvergence (mma.sync needs the whole warp).
      const int32_t qw[4] = {qv[u].x, qv[u].y, qv[u].z, qv[u].w};
      uint32_t b[4][4];
      if (rg >= 0) {
        if (rg != cur_g && col_ok) {
          float s[4];
          load_scales4(p.scales, p.scales_dtype, (int64_t)rg * N + ncol, s);
          const uint32_t zw = uint32_t(__ldg(p.qzeros + (int64_t)rg * (N / 8) + ncol / 8)) >> (16 * (lq & 1));
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            ss[c] = Tr::from_float(s[c]);
            zz[c] = from_bits<T2>((Tr::kBias + ((zw >> (4 * c)) & 0xfu)) * 0x10001u);
          }
          cur_g = rg;
        }
#pragma unroll
        for (int c = 0; c < 4; ++c)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const T2 v = from_bits<T2>(lop3_and_or(uint32_t(qw[c]) >> (4 * j), 0x000f000fu, Tr::kMagic));
            b[c][j] = bits(__hmul2(__hsub2(v, zz[c]), ss[c]));
          }
      } else {
        // Act-order row: nibble pair (j, j+4) may come from two different groups.
        const int32_t* gr = p.g_idx + 8 * r;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int ga = min(max(__ldg(gr + j), 0), G - 1), gb = min(max(__ldg(gr + j + 4), 0), G - 1);
          float sa[4] = {0.f, 0.f, 0.f, 0.f}, sb[4] = {0.f, 0.f, 0.f, 0.f};
          uint32_t za = 0, zb = 0;
          if (col_ok) {
            load_scales4(p.scales, p.scales_dtype, (int64_t)ga * N + ncol, sa);
            load_scales4(p.scales, p.scales_dtype, (int64_t)gb * N + ncol, sb);
            za = uint32_t(__ldg(p.qzeros + (int64_t)ga * (N / 8) + ncol / 8)) >> (16 * (lq & 1));
            zb = uint32_t(__ldg(p.qzeros + (int64_t)gb * (N / 8) + ncol / 8)) >> (16 * (lq & 1));
          }
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const T2 s2 = Tr::from_floats(sa[c], sb[c]);
            const uint32_t z2 = (Tr::kBias + ((za >> (4 * c)) & 0xfu)) |
                                ((Tr::kBias + ((zb >> (4 * c)) & 0xfu)) << 16);
            const T2 v = from_bits<T2>(lop3_and_or(uint32_t(qw[c]) >> (4 * j), 0x000f000fu, Tr::kMagic));
            b[c][j] = bits(__hmul2(__hsub2(v, from_bits<T2>(z2)), s2));
          }
        }
      }
      __syncwarp();
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        Tr::mma(acc[c], a0, b[c][0], b[c][1]);
        Tr::mma(acc[c], a1, b[c][2], b[c][3]);
      }
    }
  }

  // Sum the warps' partial tiles: red[(w*16 + reg)*32 + lane], conflict-free.
  __syncthreads();  // rowg no longer needed; reuse smem
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[(warp * 16 + c * 4 + i) * 32 + lane] = acc[c][i];
  __syncthreads();
  if (warp != 0) return;
  float tot[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) tot[i] = 0.f;
  for (int w = 0; w < nwarps; ++w)
#pragma unroll
    for (int i = 0; i < 16; ++i) tot[i] += red[(w * 16 + i) * 32 + lane];

  // Lane (q, t) holds rows q and q+8, output columns n0 + 8t .. n0 + 8t + 7:
  // accumulator i of slot c is row q + 8*(i/2), column n0 + 4*(2t + i%2) + c.
  const int col = n0 + 8 * lt;
  if (col >= N) return;
#pragma unroll
  for (int h = 0; h < (MT == 16 ? 2 : 1); ++h) {
    const int row = lq + 8 * h;
    if (row >= M) continue;
    uint32_t o[4];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int i = 2 * h + e;
      o[2 * e + 0] = uint32_t(Tr::to_bits(tot[0 * 4 + i])) | (uint32_t(Tr::to_bits(tot[1 * 4 + i])) << 16);
      o[2 * e + 1] = uint32_t(Tr::to_bits(tot[2 * 4 + i])) | (uint32_t(Tr::to_bits(tot[3 * 4 + i])) << 16);
    }
    *reinterpret_cast<uint4*>(static_cast<T*>(p.y) + (int64_t)row * N + col) = make_uint4(o[0], o[1], o[2], o[3]);
  }
}

template <class T, int MT>
cudaError_t launch(const Params& p, int device, cudaStream_t stream) {
  static int sm_count[128] = {0};
  static int smem_optin[128] = {0};
  if (device < 0 || device >= 128) return cudaErrorInvalidDevice;
  if (sm_count[device] == 0) {
    cudaError_t e = cudaDeviceGetAttribute(&sm_count[device], cudaDevAttrMultiProcessorCount, device);
    if (e != cudaSuccess) return e;
    e = cudaDeviceGetAttribute(&smem_optin[device], cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e != cudaSuccess) return e;
  }
  const int tiles = (p.N + 31) / 32;
  const int steps = (p.K / 8 + 3) / 4;
  // The kernel needs up to 128 registers a thread, so an SM holds about 16 of its warps. Give each
  // CTA as many warps (K slices) as keeps every CTA resident at once (no second wave), at least 4
  // for enough 16-byte loads in flight, and no more than there are 4-row steps.
  const int ctas_per_sm = (tiles + sm_count[device] - 1) / sm_count[device];
  int warps = std::max(4, std::min(kMaxWarps, kMaxWarps / ctas_per_sm));
  warps = std::max(1, std::min(warps, steps));
  const size_t smem = std::max<size_t>(size_t(p.K / 8) * 4, size_t(warps) * 16 * 32 * 4);
  auto kernel = int4_small_m_kernel<T, MT>;
  if (smem > 48 * 1024) {
    if (smem > size_t(smem_optin[device])) return cudaErrorInvalidValue;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<tiles, warps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

extern "C" int mops_int4_small_m(const void* x, int x_dtype, const int32_t* qweight,
                                 const int32_t* qzeros, const void* scales, int scales_dtype,
                                 const int32_t* g_idx, int M, int K, int N, int G, void* y,
                                 int device, void* stream, char* err, int err_len) {
  auto fail = [&](const char* msg) {
    std::snprintf(err, size_t(err_len), "%s", msg);
    return 1;
  };
  if (M < 1 || M > 16) return fail("M must be in [1, 16]");
  if (K <= 0 || N <= 0 || K % 8 || N % 8 || G <= 0) return fail("need K, N > 0, multiples of 8, G > 0");
  if (x_dtype != 1 && x_dtype != 2) return fail("activations must be fp16 or bf16");
  if (scales_dtype < 0 || scales_dtype > 2) return fail("bad scales dtype");
  cudaError_t e = cudaSetDevice(device);  // our static cudart keeps its own current device
  if (e != cudaSuccess) return fail(cudaGetErrorString(e));
  Params p{x, qweight, qzeros, scales, g_idx, y, M, K, N, G, scales_dtype};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (x_dtype == 1)
    e = M <= 8 ? launch<__half, 8>(p, device, s) : launch<__half, 16>(p, device, s);
  else
    e = M <= 8 ? launch<__nv_bfloat16, 8>(p, device, s) : launch<__nv_bfloat16, 16>(p, device, s);
  if (e == cudaErrorInvalidValue && size_t(K / 8) * 4 > 48 * 1024)
    return fail("K too large for the shared-memory row-group table of this GPU");
  if (e != cudaSuccess) return fail(cudaGetErrorString(e));
  return 0;
}
