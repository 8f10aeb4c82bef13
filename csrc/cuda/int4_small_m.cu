// Int4 GPTQ matmul for small batches (M <= 16, decode) on tensor cores: y = x W^T.
//
// Format (DESIGN §3): qweight (K/8, N) int32, code of (k, n) at bits 4*(k%8) of qweight[k/8, n];
// qzeros (G, N/8) int32 packed along n; scales (G, N) fp16/bf16/fp32; g_idx (K,) int32.
// W[n, k] = (code - zero[g_idx[k], n]) * scale[g_idx[k], n].
//
// Work split. A CTA owns 32 output columns and a slice of K: all of it, or (K split, sm_90, grouped
// weights) one of the ksplit slices, the ksplit CTAs of a column tile forming one thread-block cluster
// whose rank 0 adds the others' sums from their shared memory (no workspace, no second kernel). Its
// warps each take a contiguous part of the CTA's slice and are summed through shared memory at the
// end. A warp step covers 4 qweight rows x 32 columns: lane (q = lane/4, t = lane%4)
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
//
// Groups. When the caller promises g_idx == arange(K) / group_size (GPTQ without act-order) the group
// of a row is computed, and each step's scales and zeros are loaded beside its weights: nothing waits
// on a dependent load in the loop and no g_idx table is built first. Act-order weights (and fp32
// scales) build a row-group table in shared memory and look scales up on a group change.
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

constexpr int kMaxWarps = 16;

struct Params {
  const void* x;
  const int32_t* qweight;
  const int32_t* qzeros;
  const void* scales;
  const int32_t* g_idx;
  void* y;
  int M, K, N, G;
  int scales_dtype;
  int group_shift;  // GROUPED kernels: qweight row r lies in group min(r >> group_shift, G - 1)
  int pf;           // L2 prefetch distance in 4-row steps (0: none; prefetch_step)
};

// A lane's 4 columns ncol .. ncol + 3 of qweight row r.
__device__ __forceinline__ const int4* weight_row(const Params& p, int ncol, int r) {
  return reinterpret_cast<const int4*>(p.qweight + (int64_t)r * p.N + ncol);
}

// The 4-row steps [s_begin, s_end) of this warp: the CTA's slice of the (K/8 + 3) / 4 steps (blockIdx.y of
// gridDim.y slices; all of them without a K split), split among its warps in contiguous parts.
__device__ __forceinline__ void warp_steps(int R, int warp, int nwarps, int& s_begin, int& s_end) {
  const int steps = (R + 3) / 4;
  const int per_cta = (steps + int(gridDim.y) - 1) / int(gridDim.y);
  const int c_end = min(steps, int(blockIdx.y + 1) * per_cta);
  const int per_warp = (per_cta + nwarps - 1) / nwarps;
  s_begin = int(blockIdx.y) * per_cta + warp * per_warp;
  s_end = min(c_end, s_begin + per_warp);
}

// L2 prefetch (p.pf > 0) of the weight rows of 4-row step s, if the warp's slice [.., s_end) holds it. A
// register kernel keeps at most 4 steps of loads in flight a warp (its registers hold them); a prefetch
// holds none, so the rows of later steps can be requested from DRAM meanwhile and the loads then find them
// in L2. Lanes q = 0 and q = 7 of row t name both ends of its 128 bytes (they may straddle two lines).
__device__ __forceinline__ void prefetch_step(const Params& p, int ncol, int lq, int lt, int s, int s_end) {
  const int r = 4 * s + lt;
  if ((lq == 0 || lq == 7) && s < s_end && r < p.K / 8 && ncol < p.N)
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p.qweight + (int64_t)r * p.N + ncol));
}

// The prefetches of a warp's first steps past the 4 its first loads cover: [s_begin + 4, s_begin + pf).
__device__ __forceinline__ void prefetch_start(const Params& p, int ncol, int lq, int lt, int s_begin, int s_end) {
  for (int s = s_begin + 4; s < min(s_begin + p.pf, s_end); ++s) prefetch_step(p, ncol, lq, lt, s, s_end);
}

// Sum the warps' partial tiles through shared memory (and, SPLIT, the cluster's CTAs through distributed
// shared memory) and store the tile. Every thread calls it. Lane (q, t) holds rows q and q+8, output
// columns n0 + 8t .. n0 + 8t + 7: accumulator i of slot c is row q + 8*(i/2), column n0 + 4*(2t + i%2) + c.
template <class T, int MT, bool SPLIT>
__device__ __forceinline__ void reduce_and_store(const float (&acc)[4][4], int32_t* smem, const Params& p, int n0,
                                                 int lane, int warp, int nwarps, int lq, int lt) {
  using Tr = Traits<T>;
  float tot[16];
  float* red = reinterpret_cast<float*>(smem);
  bool w0 = sum_over_warps<16>(*reinterpret_cast<const float(*)[16]>(&acc[0][0]), red, warp, nwarps, lane, tot);
  if (SPLIT) w0 = sum_over_cluster<16>(tot, red, w0, lane);
  if (!w0) return;
  const int col = n0 + 8 * lt;
  if (col >= p.N) return;
#pragma unroll
  for (int h = 0; h < (MT == 16 ? 2 : 1); ++h) {
    const int row = lq + 8 * h;
    if (row >= p.M) continue;
    uint32_t o[4];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int i = 2 * h + e;
      o[2 * e + 0] = uint32_t(Tr::to_bits(tot[0 * 4 + i])) | (uint32_t(Tr::to_bits(tot[1 * 4 + i])) << 16);
      o[2 * e + 1] = uint32_t(Tr::to_bits(tot[2 * 4 + i])) | (uint32_t(Tr::to_bits(tot[3 * 4 + i])) << 16);
    }
    *reinterpret_cast<uint4*>(static_cast<T*>(p.y) + (int64_t)row * p.N + col) = make_uint4(o[0], o[1], o[2], o[3]);
  }
}

// Dequantized B fragments of one step: b[c][j] = nibbles (j, j+4) of column slot c.
template <class T>
__device__ __forceinline__ void dequant_step(const int4 q, const typename Traits<T>::T2 (&ss)[4],
                                             const typename Traits<T>::T2 (&zz)[4], uint32_t (&b)[4][4]) {
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  const int32_t qw[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const T2 v = from_bits<T2>(lop3_and_or(uint32_t(qw[c]) >> (4 * j), 0x000f000fu, Tr::kMagic));
      b[c][j] = bits(__hmul2(__hsub2(v, zz[c]), ss[c]));
    }
}

// A fragments of one step from x[lq, 8r .. 8r+7] (xlo) and x[lq + 8, ...] (xhi, MT == 16): mma 0 takes
// input pairs (0,4),(1,5); mma 1 takes (2,6),(3,7).
template <int MT>
__device__ __forceinline__ void a_frags(const uint4& xlo, const uint4& xhi, uint32_t (&a0)[4], uint32_t (&a1)[4]) {
  a0[0] = __byte_perm(xlo.x, xlo.z, 0x5410);
  a0[2] = __byte_perm(xlo.x, xlo.z, 0x7632);
  a1[0] = __byte_perm(xlo.y, xlo.w, 0x5410);
  a1[2] = __byte_perm(xlo.y, xlo.w, 0x7632);
  if (MT == 16) {
    a0[1] = __byte_perm(xhi.x, xhi.z, 0x5410);
    a0[3] = __byte_perm(xhi.x, xhi.z, 0x7632);
    a1[1] = __byte_perm(xhi.y, xhi.w, 0x5410);
    a1[3] = __byte_perm(xhi.y, xhi.w, 0x7632);
  } else {
    a0[1] = a0[3] = a1[1] = a1[3] = 0u;
  }
}

// Cached scale and (bias + zero) of the lane's 4 column slots from one group's prefetched 16-bit scales
// (sv) and packed zero word (zv).
template <class T>
__device__ __forceinline__ void group_scales(uint2 sv, uint32_t zv, int lq, int scales_dtype,
                                             typename Traits<T>::T2 (&ss)[4], typename Traits<T>::T2 (&zz)[4]) {
  using Tr = Traits<T>;
  const uint32_t zw = zv >> (16 * (lq & 1));
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    ss[c] = Tr::from_float(scale16(sv, c, scales_dtype));
    zz[c] = from_bits<typename Tr::T2>((Tr::kBias + ((zw >> (4 * c)) & 0xfu)) * 0x10001u);
  }
}

// The step's 8 mma: column slot c, nibble pairs (0,4),(1,5) then (2,6),(3,7). Whole warp (mma.sync).
template <class T>
__device__ __forceinline__ void mma_step(float (&acc)[4][4], const uint32_t (&a0)[4], const uint32_t (&a1)[4],
                                         const uint32_t (&b)[4][4]) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    Traits<T>::mma(acc[c], a0, b[c][0], b[c][1]);
    Traits<T>::mma(acc[c], a1, b[c][2], b[c][3]);
  }
}

// Zero accumulators; no group cached yet (scale 0, bias + zero = the magic number: a row outside the
// weight dequantizes to 0).
template <class T>
__device__ __forceinline__ void init_state(float (&acc)[4][4], typename Traits<T>::T2 (&ss)[4],
                                           typename Traits<T>::T2 (&zz)[4]) {
  using Tr = Traits<T>;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[c][i] = 0.f;
    ss[c] = Tr::from_float(0.f);
    zz[c] = from_bits<typename Tr::T2>(Tr::kMagic);
  }
}

// MT: 8 (M <= 8, the upper 8 mma rows are zero) or 16.
// GROUPED: g_idx == arange(K) / group_size with 8 * 2^group_shift inputs a group (or one group), 16-bit
// scales. The group of a row is then arithmetic (no g_idx table to build before the first weight load)
// and each step's scales and zeros are loaded together with its weights, so no load waits on a group
// change. Otherwise (act-order, fp32 scales) a per-row group table is built in shared memory first and
// scales are fetched when the group changes.
// Each batch issues the loads of 4 four-row steps together (64 bytes of weights a lane in flight), then
// waits for them before its arithmetic; 8 steps spilled at the 128-register cap and ran slower.
// SPLIT: launched in clusters of gridDim.y CTAs, one a slice of K (grouped weights, sm_90).
template <class T, int MT, bool GROUPED, bool SPLIT>
__global__ void __launch_bounds__(kMaxWarps * 32)
    int4_small_m_kernel(const Params p) {
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  constexpr int STEPS = 4;
  // rowg[R] during the main loop (table path), then the reduction buffer
  extern __shared__ int32_t smem[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int lq = lane >> 2, lt = lane & 3;
  const int N = p.N, K = p.K, M = p.M, G = p.G;
  const int R = K / 8;                     // qweight rows
  const int n0 = blockIdx.x * 32;
  const int ncol = n0 + 4 * lq;            // this lane's 4 columns
  const bool col_ok = ncol < N;
  griddep_launch_dependents();
  int s_begin, s_end;
  warp_steps(R, warp, nwarps, s_begin, s_end);
  if (p.pf > 0) prefetch_start(p, ncol, lq, lt, s_begin, s_end);  // frozen weights: before griddep_wait

  if (!GROUPED) {
    // Group of each qweight row (-1: its 8 inputs span several groups, as with act-order).
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
      const int4 a = __ldg(reinterpret_cast<const int4*>(p.g_idx + 8 * r));
      const int4 b = __ldg(reinterpret_cast<const int4*>(p.g_idx + 8 * r + 4));
      const bool same = a.x == a.y && a.x == a.z && a.x == a.w && a.x == b.x && a.x == b.y &&
                        a.x == b.z && a.x == b.w;
      smem[r] = same ? min(max(a.x, 0), G - 1) : -1;
    }
    __syncthreads();
  }
  griddep_wait();  // x comes with the first batch's weights

  float acc[4][4];
  int cur_g = -1;
  T2 ss[4], zz[4];  // cached scale and (bias + zero) per column slot
  init_state<T>(acc, ss, zz);

  const T* xg = static_cast<const T*>(p.x);
  const unsigned short* sc16 = static_cast<const unsigned short*>(p.scales);
  const bool row_lo = lq < M, row_hi = MT == 16 && lq + 8 < M;

  for (int s0 = s_begin; s0 < s_end; s0 += STEPS) {
    int4 qv[STEPS];
    uint4 xlo[STEPS], xhi[STEPS];
    uint2 sv[STEPS];
    uint32_t zv[STEPS];
    // Issue every load of this iteration before using any.
#pragma unroll
    for (int u = 0; u < STEPS; ++u) {
      const int r = 4 * (s0 + u) + lt;
      const bool ok = s0 + u < s_end && r < R;
      qv[u] = make_int4(0, 0, 0, 0);
      xlo[u] = make_uint4(0, 0, 0, 0);
      xhi[u] = make_uint4(0, 0, 0, 0);
      sv[u] = make_uint2(0, 0);
      zv[u] = 0;
      if (ok && col_ok) qv[u] = __ldg(weight_row(p, ncol, r));
      if (p.pf > 0) prefetch_step(p, ncol, lq, lt, s0 + u + p.pf, s_end);
      if (ok && row_lo)
        xlo[u] = __ldg(reinterpret_cast<const uint4*>(xg + (int64_t)lq * K + 8 * r));
      if (MT == 16 && ok && row_hi)
        xhi[u] = __ldg(reinterpret_cast<const uint4*>(xg + (int64_t)(lq + 8) * K + 8 * r));
      if (GROUPED && ok && col_ok) {
        const int g = min(r >> p.group_shift, G - 1);
        sv[u] = __ldg(reinterpret_cast<const uint2*>(sc16 + (int64_t)g * N + ncol));
        zv[u] = uint32_t(__ldg(p.qzeros + (int64_t)g * (N / 8) + ncol / 8));
      }
    }
#pragma unroll
    for (int u = 0; u < STEPS; ++u) {
      if (s0 + u >= s_end) break;  // warp-uniform
      const int r = 4 * (s0 + u) + lt;
      const bool ok = r < R;

      uint32_t a0[4], a1[4];
      a_frags<MT>(xlo[u], xhi[u], a0, a1);

      // B fragments b[c][j] = dequantized nibbles (j, j+4) of column slot c. Computed on either
      // branch; the mma themselves run after reconvergence (mma.sync needs the whole warp).
      const int32_t qw[4] = {qv[u].x, qv[u].y, qv[u].z, qv[u].w};
      uint32_t b[4][4];
      // Rows past the end carry x = 0 and keep the current group.
      const int rg = GROUPED ? (ok ? min(r >> p.group_shift, G - 1) : cur_g) : (ok ? smem[r] : max(cur_g, 0));
      if (GROUPED || rg >= 0) {
        if (rg != cur_g && col_ok) {
          if (GROUPED) {
            group_scales<T>(sv[u], zv[u], lq, p.scales_dtype, ss, zz);
          } else {
            float s[4];
            load_scales4(p.scales, p.scales_dtype, (int64_t)rg * N + ncol, s);
            const uint32_t zw = uint32_t(__ldg(p.qzeros + (int64_t)rg * (N / 8) + ncol / 8)) >> (16 * (lq & 1));
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              ss[c] = Tr::from_float(s[c]);
              zz[c] = from_bits<T2>((Tr::kBias + ((zw >> (4 * c)) & 0xfu)) * 0x10001u);
            }
          }
          cur_g = rg;
        }
        dequant_step<T>(qv[u], ss, zz, b);
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
      mma_step<T>(acc, a0, a1, b);
    }
  }

  if (!GROUPED) __syncthreads();  // rowg no longer needed; reuse smem
  reduce_and_store<T, MT, SPLIT>(acc, smem, p, n0, lane, warp, nwarps, lq, lt);
}

// ---------------------------------------------------------------------------------------------------
// Software-pipelined variant (grouped weights). The kernel above issues a batch of loads and then waits
// for it before any arithmetic, so each warp's memory traffic stops while it dequantizes and multiplies
// (Nsight Compute on an H100: 36% of DRAM bandwidth, 6.4 cycles per issued instruction). Here each warp
// holds two batches of 2 steps: while it computes one, the other's weights, scales, zeros and x are in
// flight, and the batch just computed is refilled at once. (4-step batches spill at the 128-register
// cap; with x staged in shared memory instead they fit, and measured 0-8% slower on an H100.)
constexpr int kPipeSteps = 2;

// One warp's loads for kPipeSteps 4-row steps.
template <int MT>
struct Batch {
  int4 q[kPipeSteps];
  uint2 s[kPipeSteps];
  uint32_t z[kPipeSteps];
  uint4 xlo[kPipeSteps], xhi[MT == 16 ? kPipeSteps : 1];
};

// The per-lane constants of a warp's slice.
struct Lane {
  int lq, lt, ncol, s_end;
  bool col_ok, row_lo, row_hi;
};

// A batch's weights, scales and zeros (issue_weights) and its x (issue_x): split so that the first
// batches' weights can be requested before griddep_wait.
template <int MT>
__device__ __forceinline__ void issue_weights(const Params& p, const Lane& l, int s0, Batch<MT>& b) {
  const unsigned short* sc16 = static_cast<const unsigned short*>(p.scales);
  const int R = p.K / 8;
#pragma unroll
  for (int u = 0; u < kPipeSteps; ++u) {
    const int r = 4 * (s0 + u) + l.lt;
    const bool ok = s0 + u < l.s_end && r < R;
    b.q[u] = make_int4(0, 0, 0, 0);
    b.s[u] = make_uint2(0, 0);
    b.z[u] = 0;
    if (p.pf > 0) prefetch_step(p, l.ncol, l.lq, l.lt, s0 + u + p.pf, l.s_end);
    if (ok && l.col_ok) {
      const int g = min(r >> p.group_shift, p.G - 1);
      b.q[u] = __ldg(weight_row(p, l.ncol, r));
      b.s[u] = __ldg(reinterpret_cast<const uint2*>(sc16 + (int64_t)g * p.N + l.ncol));
      b.z[u] = uint32_t(__ldg(p.qzeros + (int64_t)g * (p.N / 8) + l.ncol / 8));
    }
  }
}

template <class T, int MT>
__device__ __forceinline__ void issue_x(const Params& p, const Lane& l, int s0, Batch<MT>& b) {
  const T* xg = static_cast<const T*>(p.x);
  const int R = p.K / 8;
#pragma unroll
  for (int u = 0; u < kPipeSteps; ++u) {
    const int r = 4 * (s0 + u) + l.lt;
    const bool ok = s0 + u < l.s_end && r < R;
    b.xlo[u] = make_uint4(0, 0, 0, 0);
    if (ok && l.row_lo) b.xlo[u] = __ldg(reinterpret_cast<const uint4*>(xg + (int64_t)l.lq * p.K + 8 * r));
    if (MT == 16) {
      b.xhi[u] = make_uint4(0, 0, 0, 0);
      if (ok && l.row_hi)
        b.xhi[u] = __ldg(reinterpret_cast<const uint4*>(xg + (int64_t)(l.lq + 8) * p.K + 8 * r));
    }
  }
}

template <class T, int MT>
__device__ __forceinline__ void issue_batch(const Params& p, const Lane& l, int s0, Batch<MT>& b) {
  issue_weights<MT>(p, l, s0, b);
  issue_x<T, MT>(p, l, s0, b);
}

template <class T, int MT>
__device__ __forceinline__ void compute_batch(const Params& p, const Lane& l, int s0, const Batch<MT>& b, int& cur_g,
                                              typename Traits<T>::T2 (&ss)[4], typename Traits<T>::T2 (&zz)[4],
                                              float (&acc)[4][4]) {
  const int R = p.K / 8;
#pragma unroll
  for (int u = 0; u < kPipeSteps; ++u) {
    if (s0 + u >= l.s_end) break;  // warp-uniform
    const int r = 4 * (s0 + u) + l.lt;
    const bool ok = r < R;
    uint4 xhi = make_uint4(0, 0, 0, 0);
    if (MT == 16) xhi = b.xhi[u];
    uint32_t a0[4], a1[4];
    a_frags<MT>(b.xlo[u], xhi, a0, a1);
    // Rows past the end carry x = 0 and keep the current group.
    const int rg = ok ? min(r >> p.group_shift, p.G - 1) : cur_g;
    if (rg != cur_g && l.col_ok) {
      group_scales<T>(b.s[u], b.z[u], l.lq, p.scales_dtype, ss, zz);
      cur_g = rg;
    }
    uint32_t bf[4][4];
    dequant_step<T>(b.q[u], ss, zz, bf);
    __syncwarp();
    mma_step<T>(acc, a0, a1, bf);
  }
}

template <class T, int MT, bool SPLIT>
__global__ void __launch_bounds__(kMaxWarps * 32)
    int4_small_m_pipe_kernel(const Params p) {
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  extern __shared__ int32_t smem[];  // the reduction buffer

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int R = p.K / 8;
  const int n0 = blockIdx.x * 32;
  int s_begin;
  Lane l;
  warp_steps(R, warp, nwarps, s_begin, l.s_end);
  l.lq = lane >> 2;
  l.lt = lane & 3;
  l.ncol = n0 + 4 * l.lq;
  l.col_ok = l.ncol < p.N;
  l.row_lo = l.lq < p.M;
  l.row_hi = MT == 16 && l.lq + 8 < p.M;

  // Both batches in flight before anything waits; their x only once the previous grid has finished.
  griddep_launch_dependents();
  Batch<MT> a, b;
  issue_weights<MT>(p, l, s_begin, a);
  issue_weights<MT>(p, l, s_begin + kPipeSteps, b);
  if (p.pf > 0) prefetch_start(p, l.ncol, l.lq, l.lt, s_begin, l.s_end);
  griddep_wait();
  issue_x<T, MT>(p, l, s_begin, a);
  issue_x<T, MT>(p, l, s_begin + kPipeSteps, b);

  float acc[4][4];
  int cur_g = -1;
  T2 ss[4], zz[4];
  init_state<T>(acc, ss, zz);

  for (int s0 = s_begin; s0 < l.s_end; s0 += 2 * kPipeSteps) {
    compute_batch<T, MT>(p, l, s0, a, cur_g, ss, zz, acc);
    issue_batch<T, MT>(p, l, s0 + 2 * kPipeSteps, a);
    compute_batch<T, MT>(p, l, s0 + kPipeSteps, b, cur_g, ss, zz, acc);
    issue_batch<T, MT>(p, l, s0 + 3 * kPipeSteps, b);
  }

  reduce_and_store<T, MT, SPLIT>(acc, smem, p, n0, lane, warp, nwarps, l.lq, l.lt);
}

// ---------------------------------------------------------------------------------------------------
// The kernels need up to 128 registers a thread, so an SM holds about 16 of their warps. Give each CTA
// as many warps (parts of its K slice) as keeps every CTA resident at once (no second wave), at least 4 for
// enough 16-byte loads in flight (2 with a K split, whose CTAs are ksplit times as many), and no more than
// the CTA has 4-row steps.
int pick_warps(const Params& p, const DeviceInfo& dev, int ksplit, int warps_hint) {
  const int ctas = (p.N + 31) / 32 * ksplit;
  const int steps = ((p.K / 8 + 3) / 4 + ksplit - 1) / ksplit;
  const int ctas_per_sm = (ctas + dev.sm_count - 1) / dev.sm_count;
  const int least = ksplit > 1 ? 2 : 4;
  const int warps = warps_hint > 0 ? std::min(warps_hint, kMaxWarps)
                                   : std::max(least, std::min(kMaxWarps, kMaxWarps / ctas_per_sm));
  return std::max(1, std::min(warps, steps));
}

// What a call launches: the kernel (kind), the K slices (CTAs a cluster) and the warps a CTA.
enum Kind { kTable = 0, kBatches = 1, kPipe = 2 };
struct Plan {
  Kind kind;
  int ksplit, warps;
  size_t smem;
};

// Dynamic shared memory: the row-group table (kTable) or the warps' reduction buffer, whichever is larger.
size_t plan_smem(const Params& p, Kind kind, int warps) {
  const size_t tbl = kind == kTable ? size_t(p.K / 8) * 4 : 0;
  return std::max(tbl, size_t(warps) * 16 * 32 * 4);
}

// steps_hint selects the kernel of grouped weights (act-order and fp32 scales always take the table path):
//   0   the default: 22 for M <= 8 (an H100, 2026-11-27: 3-7% faster than 4 at 4096x4096 and 11008x4096,
//       even at 4096x11008), 4 for M > 8 (where 22 lost at 4096x11008);
//   4   batches of 4 steps, each waited for before its arithmetic;
//   22  software-pipelined: two batches of 2 steps in flight, one computed while the other loads.
// Dropped after timing (benchmarks/results/tune_int4-*.json): batches of 8 steps (spills), x staged in
// shared memory (-4, -8, -22, 24: 0-8% slower than 22 at M <= 4; H100, 2026-11-26/27), a cp.async ring per
// step (1.2-2.5x slower), each warp's whole slice streamed into shared memory at the start (32-38: 9.6-11.2
// us against the default's 8.5 at M = 1, 4096x4096; H200, 2026-11-28), and a tiled weight order (a tie).
// ksplit_hint: the K slices (1-8) of grouped weights on sm_90, each a CTA of one cluster; 0 the default, 1
// until a GPU run times it (benchmarks/tune_int4_gpu.py). Where a split cannot run (the table path, below
// sm_90, no room for the cluster) the launch takes one slice. prefetch_hint (Params::pf, any kernel): L2
// prefetches that many 4-row steps ahead of the loads (prefetch_step); 0, the default, none until timed.
template <class T, int MT>
Plan plan(const Params& p, const DeviceInfo& dev, int device, int steps_hint, int warps_hint, int ksplit_hint) {
  Plan pl;
  pl.kind = p.group_shift < 0 ? kTable : steps_hint == 22 || (steps_hint == 0 && MT == 8) ? kPipe : kBatches;
  const int steps = (p.K / 8 + 3) / 4;
  pl.ksplit = pl.kind == kTable || !dev.sm90_features() ? 1 : std::max(1, std::min(ksplit_hint, steps));
  for (;;) {
    pl.warps = pick_warps(p, dev, pl.ksplit, warps_hint);
    pl.smem = plan_smem(p, pl.kind, pl.warps);
    if (pl.ksplit == 1) return pl;
    const int block = pl.warps * 32;
    const bool fits = pl.kind == kPipe
                          ? cluster_fits<int4_small_m_pipe_kernel<T, MT, true>>(device, pl.ksplit, block, int(pl.smem))
                          : cluster_fits<int4_small_m_kernel<T, MT, true, true>>(device, pl.ksplit, block, int(pl.smem));
    if (fits) return pl;
    pl.ksplit = 1;
  }
}

template <class Kernel>
cudaError_t launch_kernel(Kernel kernel, const Params& p, const DeviceInfo& dev, const Plan& pl, bool pdl,
                          cudaStream_t stream) {
  if (pl.smem > 48 * 1024) {
    if (pl.smem > size_t(dev.smem_optin)) return cudaErrorInvalidValue;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(pl.smem));
    if (e != cudaSuccess) return e;
  }
  return launch_ex(kernel, dim3((p.N + 31) / 32, pl.ksplit), pl.ksplit > 1 ? unsigned(pl.ksplit) : 0u,
                   pl.warps * 32, pl.smem, stream, pdl, p);
}

// pdl: launched as a programmatic dependent of the stream's previous grid (sm_90; griddep_wait).
template <class T, int MT>
cudaError_t launch(const Params& p, const DeviceInfo& dev, const Plan& pl, bool pdl, cudaStream_t s) {
  const bool split = pl.ksplit > 1;
  switch (pl.kind) {
    case kTable: return launch_kernel(int4_small_m_kernel<T, MT, false, false>, p, dev, pl, pdl, s);
    case kPipe:
      return split ? launch_kernel(int4_small_m_pipe_kernel<T, MT, true>, p, dev, pl, pdl, s)
                   : launch_kernel(int4_small_m_pipe_kernel<T, MT, false>, p, dev, pl, pdl, s);
    default:
      return split ? launch_kernel(int4_small_m_kernel<T, MT, true, true>, p, dev, pl, pdl, s)
                   : launch_kernel(int4_small_m_kernel<T, MT, true, false>, p, dev, pl, pdl, s);
  }
}

// The plan for x's dtype and M (the two tile heights).
Plan plan_for(const Params& p, int x_dtype, const DeviceInfo& dev, int device, int steps_hint, int warps_hint,
              int ksplit_hint) {
  if (x_dtype == 1)
    return p.M <= 8 ? plan<__half, 8>(p, dev, device, steps_hint, warps_hint, ksplit_hint)
                    : plan<__half, 16>(p, dev, device, steps_hint, warps_hint, ksplit_hint);
  return p.M <= 8 ? plan<__nv_bfloat16, 8>(p, dev, device, steps_hint, warps_hint, ksplit_hint)
                  : plan<__nv_bfloat16, 16>(p, dev, device, steps_hint, warps_hint, ksplit_hint);
}

// The checks of the hints both entry points take; nullptr if they hold.
const char* hints_error(int steps_hint, int warps_hint, int ksplit_hint, int prefetch_hint) {
  if (steps_hint != 0 && steps_hint != 4 && steps_hint != 22) return "unknown steps hint: use 0 (the default), 4 or 22";
  if (warps_hint < 0) return "warps hint must be >= 0 (0: the kernel picks)";
  if (ksplit_hint < 0 || ksplit_hint > 8) return "ksplit hint must be in [0, 8] (0: the default)";
  if (prefetch_hint < 0 || prefetch_hint > 64) return "prefetch hint must be in [0, 64] steps (0: none)";
  return nullptr;
}

// Row-group arithmetic where the groups allow it (row_group_shift); anything else, and fp32 scales, take
// the g_idx table path.
int group_shift_for(int group_size, int G, int scales_dtype) {
  return group_size > 0 && scales_dtype != 0 ? row_group_shift(group_size, G) : -1;
}

}  // namespace

extern "C" int mops_int4_small_m_plan(int M, int K, int N, int G, int group_size, int scales_dtype, int x_dtype,
                                      int steps_hint, int warps_hint, int ksplit_hint, int device, int* out) {
  if (small_m_shape_error(M, K, N, G) != nullptr || (x_dtype != 1 && x_dtype != 2) || scales_dtype < 0 ||
      scales_dtype > 2 || group_size < 0 || hints_error(steps_hint, warps_hint, ksplit_hint, 0) != nullptr)
    return 1;
  const DeviceInfo* info = nullptr;
  if (use_device(device, &info) != nullptr) return 1;
  const Params p{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, M, K, N, G, scales_dtype,
                 group_shift_for(group_size, G, scales_dtype), 0};
  const Plan pl = plan_for(p, x_dtype, *info, device, steps_hint, warps_hint, ksplit_hint);
  out[0] = int(pl.kind);
  out[1] = pl.ksplit;
  out[2] = pl.warps;
  return 0;
}

extern "C" int mops_int4_small_m(const void* x, int x_dtype, const int32_t* qweight,
                                 const int32_t* qzeros, const void* scales, int scales_dtype,
                                 const int32_t* g_idx, int M, int K, int N, int G, int group_size,
                                 int flags, void* y, int device, void* stream, int steps_hint, int warps_hint,
                                 int ksplit_hint, int prefetch_hint, char* err, int err_len) {
  auto fail = [&](const char* msg) {
    std::snprintf(err, size_t(err_len), "%s", msg);
    return 1;
  };
  if (const char* msg = small_m_shape_error(M, K, N, G)) return fail(msg);
  if (x_dtype != 1 && x_dtype != 2) return fail("activations must be fp16 or bf16");
  if (scales_dtype < 0 || scales_dtype > 2) return fail("bad scales dtype");
  if (group_size < 0) return fail("group_size must be >= 0 (0: read the groups from g_idx)");
  if (const char* msg = hints_error(steps_hint, warps_hint, ksplit_hint, prefetch_hint)) return fail(msg);
  if (flags & ~MOPS_INT4_PDL) return fail("unknown flags");
  const DeviceInfo* info = nullptr;
  if (const char* msg = use_device(device, &info)) return fail(msg);
  const DeviceInfo& dev = *info;
  const int group_shift = group_shift_for(group_size, G, scales_dtype);
  const Params p{x, qweight, qzeros, scales, g_idx, y, M, K, N, G, scales_dtype, group_shift, prefetch_hint};
  const Plan pl = plan_for(p, x_dtype, dev, device, steps_hint, warps_hint, ksplit_hint);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool pdl = (flags & MOPS_INT4_PDL) && dev.sm90_features();  // earlier parts: an ordinary launch
  cudaError_t e;
  if (x_dtype == 1)
    e = M <= 8 ? launch<__half, 8>(p, dev, pl, pdl, s) : launch<__half, 16>(p, dev, pl, pdl, s);
  else
    e = M <= 8 ? launch<__nv_bfloat16, 8>(p, dev, pl, pdl, s) : launch<__nv_bfloat16, 16>(p, dev, pl, pdl, s);
  if (e == cudaErrorInvalidValue && group_shift < 0 && size_t(K / 8) * 4 > 48 * 1024)
    return fail("K too large for the shared-memory row-group table of this GPU");
  if (e != cudaSuccess) return fail(cudaGetErrorString(e));
  return 0;
}
