// Int4 GPTQ matmul for small batches (M <= 16, decode) on tensor cores: y = x W^T.
//
// Format (DESIGN §3): qweight (K/8, N) int32, code of (k, n) at bits 4*(k%8) of qweight[k/8, n];
// qzeros (G, N/8) int32 packed along n; scales (G, N) fp16/bf16/fp32; g_idx (K,) int32.
// W[n, k] = (code - zero[g_idx[k], n]) * scale[g_idx[k], n]. Every kernel here also takes qweight in a
// tiled order, each CTA's 32 columns contiguous along K (QOrder; an experiment, opt-in).
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
#include <array>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>

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
  int tiled;        // qweight in the tiled order (QOrder in int4_common.cuh)
  QOrder order;     // where qweight's words lie
};

// A lane's 4 columns ncol .. ncol + 3 of qweight row r: qweight + w_off + r * row, with w_off =
// qword_col(order, ncol) decided once per thread (QOrder). In the tiled order a warp step of 4 rows reads
// one contiguous 512-byte block. The register kernel takes the order at compile time (qweight_order with a
// constant `tiled`): it sits at the 128-register cap, where a run-time form spilled 4-20 bytes; the others
// read p.order.
__device__ __forceinline__ const int4* weight_row(const Params& p, int w_off, int r, int row) {
  return reinterpret_cast<const int4*>(p.qweight + w_off + (int64_t)r * row);
}

// Sum the warps' partial tiles through shared memory and store the tile. Lane (q, t) holds rows q and
// q+8, output columns n0 + 8t .. n0 + 8t + 7: accumulator i of slot c is row q + 8*(i/2), column
// n0 + 4*(2t + i%2) + c.
template <class T, int MT>
__device__ __forceinline__ void reduce_and_store(const float (&acc)[4][4], int32_t* smem, const Params& p, int n0,
                                                 int lane, int warp, int nwarps, int lq, int lt) {
  using Tr = Traits<T>;
  float tot[16];
  if (!sum_over_warps<16>(*reinterpret_cast<const float(*)[16]>(&acc[0][0]), reinterpret_cast<float*>(smem), warp,
                          nwarps, lane, tot))
    return;
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
template <class T, int MT, bool GROUPED, bool TILED>
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
  const QOrder order = qweight_order(TILED, K, N);
  const int w_off = qword_col(order, ncol);
  griddep_launch_dependents();

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

  // This warp's contiguous slice of 4-row steps.
  const int steps = (R + 3) / 4;
  const int per_warp = (steps + nwarps - 1) / nwarps;
  const int s_begin = warp * per_warp;
  const int s_end = min(steps, s_begin + per_warp);

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
      if (ok && col_ok) qv[u] = __ldg(weight_row(p, w_off, r, order.row));
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
  reduce_and_store<T, MT>(acc, smem, p, n0, lane, warp, nwarps, lq, lt);
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
  int lq, lt, ncol, w_off, s_end;
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
    if (ok && l.col_ok) {
      const int g = min(r >> p.group_shift, p.G - 1);
      b.q[u] = __ldg(weight_row(p, l.w_off, r, p.order.row));
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

template <class T, int MT>
__global__ void __launch_bounds__(kMaxWarps * 32)
    int4_small_m_pipe_kernel(const Params p) {
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  extern __shared__ int32_t smem[];  // the reduction buffer

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int R = p.K / 8;
  const int n0 = blockIdx.x * 32;
  const int steps = (R + 3) / 4;
  const int per_warp = (steps + nwarps - 1) / nwarps;
  const int s_begin = warp * per_warp;
  Lane l;
  l.lq = lane >> 2;
  l.lt = lane & 3;
  l.ncol = n0 + 4 * l.lq;
  l.w_off = qword_col(p.order, l.ncol);
  l.s_end = min(steps, s_begin + per_warp);
  l.col_ok = l.ncol < p.N;
  l.row_lo = l.lq < p.M;
  l.row_hi = MT == 16 && l.lq + 8 < p.M;

  // Both batches in flight before anything waits; their x only once the previous grid has finished.
  griddep_launch_dependents();
  Batch<MT> a, b;
  issue_weights<MT>(p, l, s_begin, a);
  issue_weights<MT>(p, l, s_begin + kPipeSteps, b);
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

  reduce_and_store<T, MT>(acc, smem, p, n0, lane, warp, nwarps, l.lq, l.lt);
}

// ---------------------------------------------------------------------------------------------------
// Streamed variant (grouped weights; steps_hint 32). The register kernels wait for DRAM once a batch:
// at 4096x4096 a warp's slice is 8 steps, so a warp waits 3-4 times in a row, and the bytes a warp can
// hold in flight are capped by its registers. Here every lane issues cp.async copies of its whole share
// of the CTA's slice at the start (its weight words, the x fragments it will read, and, lanes t == 0,
// the scales and zeros of every group the warp's slice touches) into shared memory, in kStreamChunks
// commit groups along its steps, and then computes chunk c once cp.async.wait_group(kStreamChunks - 1 - c)
// returns: a warp waits for DRAM about once, no register holds a load in flight, and the whole weight is
// requested within the first microsecond (where every CTA is resident at once; stream_warps). A CTA's
// slices must fit in shared memory (16 K + 2 M K bytes); where they do not the launch takes the default.

// Shared-memory layout of the streamed kernel, the same on host and device. Per warp: its steps' weight
// words [i * 32 + lane] (16 bytes each), its x fragments [(i * M + m) * 4 + t] (16 bytes: x[m, 8r .. 8r+7]
// of row r = 4 (s_begin + i) + t), and per group it touches 8 scale quads [gi * 8 + q] (8 bytes) and the
// CTA's 4 zero words [gi * 4 + q / 2]. The reduction at the end reuses the start once every warp is done.
// Every byte counts: at 4096x11008, M = 1, three CTAs must share an SM's 228 KB.
struct StreamLayout {
  int per_warp;  // steps a warp
  int ngw;       // group slots a warp: the most groups any warp's slice touches
  int x_off, s_off, z_off, bytes;
};

// xg: the x fragments are read from global memory instead (no x region).
inline StreamLayout stream_layout(const Params& p, int nwarps, bool xg) {
  StreamLayout l;
  const int R = p.K / 8, steps = (R + 3) / 4;
  l.per_warp = (steps + nwarps - 1) / nwarps;
  l.ngw = 1;
  for (int w = 0; w < nwarps && 4 * w * l.per_warp < R; ++w) {
    const int r0 = 4 * w * l.per_warp, r1 = std::min(4 * (w + 1) * l.per_warp, R) - 1;
    const int g0 = std::min(r0 >> p.group_shift, p.G - 1), g1 = std::min(r1 >> p.group_shift, p.G - 1);
    l.ngw = std::max(l.ngw, g1 - g0 + 1);
  }
  const int64_t w = int64_t(nwarps) * l.per_warp * 512;
  const int64_t x = xg ? 0 : int64_t(nwarps) * l.per_warp * p.M * 64;
  const int64_t s = int64_t(nwarps) * l.ngw * 8 * 8;
  const int64_t z = int64_t(nwarps) * l.ngw * 4 * 4;
  const int64_t red = int64_t(nwarps) * 16 * 32 * 4;
  const int64_t total = std::max(w + x + s + z, red);
  l.x_off = int(w);
  l.s_off = int(w + x);
  l.z_off = int(w + x + s);
  l.bytes = total > (int64_t(1) << 30) ? -1 : int(total);
  return l;
}

// FOLD (steps_hint 34; groups of at least 4 packed rows, so that a step lies in one group): the scales
// and zeros are applied after the mma instead of to each weight. The mma sums x * (magic + code) over a
// group into raw, a second pair of mma against ones sums x into xsum, and at the group's end each output
// takes acc += scale * (raw - (magic + zero) * xsum): 2 bit operations a nibble pair instead of 4. (No
// 16-bit weight is rounded; the fp32 sums carry the magic offset instead: about the same error.)
template <class T, int MT>
__device__ __forceinline__ void fold_group(float (&acc)[4][4], float (&raw)[4][4], float (&xsum)[4], uint2 sv0,
                                           uint2 sv1, uint32_t zw, int scales_dtype) {
  // Accumulator i of slot c is column n0 + 4 (2t + i % 2) + c: its scale is slot c of lane 2t + i % 2's
  // quad (sv0 / sv1), its zero nibble 4 (i % 2) + c of the word of columns n0 + 8t .. + 7 (zw).
#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int i = 0; i < (MT == 16 ? 4 : 2); ++i) {  // MT == 8: rows 8-15 are zero
      const int e = i & 1;
      const float s = scale16(e ? sv1 : sv0, c, scales_dtype);
      const float zb = Traits<T>::kMagicF + float((zw >> (4 * (4 * e + c))) & 0xfu);
      acc[c][i] = fmaf(s, fmaf(-zb, xsum[i], raw[c][i]), acc[c][i]);
      raw[c][i] = 0.f;
    }
#pragma unroll
  for (int i = 0; i < 4; ++i) xsum[i] = 0.f;
}

// XG (steps_hint 36; 38 with FOLD): x stays in global memory (L2: every CTA reads the same x) and each
// step's fragments are loaded one step ahead into registers. x then takes no shared memory, which at
// M > 1 is what keeps every CTA resident (x is per CTA: 2 M K bytes, beside 16 K of weights).
template <class T, int MT, bool FOLD, bool XG>
__global__ void __launch_bounds__(kMaxWarps * 32)
    int4_small_m_stream_kernel(const Params p, const StreamLayout lay) {
  extern __shared__ int32_t smem[];
  unsigned char* sb = reinterpret_cast<unsigned char*>(smem);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int lq = lane >> 2, lt = lane & 3;
  const int M = p.M, K = p.K, N = p.N, G = p.G, R = K / 8;
  const int n0 = blockIdx.x * 32;
  const int ncol = n0 + 4 * lq;
  const bool col_ok = ncol < N;
  const int w_off = qword_col(p.order, ncol);
  const bool row_lo = lq < M, row_hi = MT == 16 && lq + 8 < M;
  const int steps = (R + 3) / 4;
  const int s_begin = warp * lay.per_warp;
  const int nst = max(0, min(steps, s_begin + lay.per_warp) - s_begin);  // this warp's steps

  int4* wq = reinterpret_cast<int4*>(sb) + warp * lay.per_warp * 32;
  uint4* xq = reinterpret_cast<uint4*>(sb + lay.x_off) + warp * lay.per_warp * M * 4;
  uint2* sq = reinterpret_cast<uint2*>(sb + lay.s_off) + warp * lay.ngw * 8;
  uint32_t* zq = reinterpret_cast<uint32_t*>(sb + lay.z_off) + warp * lay.ngw * 4;
  const int g0 = min((4 * s_begin) >> p.group_shift, G - 1);  // the slice's first group

  const T* xg = static_cast<const T*>(p.x);
  // x[m, 8r .. 8r + 7]: the 16 bytes of x a lane's step reads for row m
  auto x_at = [&](int m, int r) { return reinterpret_cast<const uint4*>(xg + (int64_t)m * K + 8 * r); };
  const unsigned short* sc16 = static_cast<const unsigned short*>(p.scales);
  griddep_launch_dependents();
  if (lt == 0 && nst > 0) {  // the scales and zeros of the slice's groups, in the first chunk
    const int g1 = min((min(4 * (s_begin + nst), R) - 1) >> p.group_shift, G - 1);
    for (int g = g0; g <= g1; ++g) {
      cp_async<8>(sq + (g - g0) * 8 + lq, col_ok ? (const void*)(sc16 + (int64_t)g * N + ncol) : p.scales, col_ok);
      if ((lq & 1) == 0)  // one zero word holds 8 columns: lanes q and q + 1 share it
        cp_async<4>(zq + (g - g0) * 4 + lq / 2,
                    col_ok ? (const void*)(p.qzeros + (int64_t)g * (N / 8) + ncol / 8) : (const void*)p.qzeros,
                    col_ok);
    }
  }
  if (!XG) griddep_wait();  // x is copied beside the weights
  stream_issue(nst, [&](int i) {
    const int r = 4 * (s_begin + i) + lt;
    const bool ok = r < R;
    const bool w_ok = ok && col_ok;
    cp_async<16>(wq + i * 32 + lane, w_ok ? (const void*)weight_row(p, w_off, r, p.order.row) : p.qweight, w_ok);
    if (!XG && row_lo) cp_async<16>(xq + (i * M + lq) * 4 + lt, ok ? (const void*)x_at(lq, r) : p.x, ok);
    if (!XG && MT == 16 && row_hi)
      cp_async<16>(xq + (i * M + lq + 8) * 4 + lt, ok ? (const void*)x_at(lq + 8, r) : p.x, ok);
  });

  // x fragments of step i (rows past the end are zeros): from shared memory, or (XG) from the registers
  // loaded one step ahead, then the next step's load is issued
  uint4 nlo = make_uint4(0, 0, 0, 0), nhi = make_uint4(0, 0, 0, 0);
  auto load_x = [&](int i) {
    const int r = 4 * (s_begin + i) + lt;
    nlo = nhi = make_uint4(0, 0, 0, 0);
    if (r < R && row_lo) nlo = __ldg(x_at(lq, r));
    if (MT == 16 && r < R && row_hi) nhi = __ldg(x_at(lq + 8, r));
  };
  if (XG) griddep_wait();  // the whole slice of weights is in flight; x only from here on
  if (XG && nst > 0) load_x(0);
  auto x_frags = [&](int i, uint32_t (&a0)[4], uint32_t (&a1)[4]) {
    uint4 xlo = make_uint4(0, 0, 0, 0), xhi = make_uint4(0, 0, 0, 0);
    if (XG) {
      xlo = nlo;
      xhi = nhi;
      if (i + 1 < nst) load_x(i + 1);
    } else {
      if (row_lo) xlo = xq[(i * M + lq) * 4 + lt];  // rows past the end were copied as zeros
      if (MT == 16 && row_hi) xhi = xq[(i * M + lq + 8) * 4 + lt];
    }
    a_frags<MT>(xlo, xhi, a0, a1);
  };

  float acc[4][4];
  int cur_g = -1;
  typename Traits<T>::T2 ss[4], zz[4];
  init_state<T>(acc, ss, zz);
  if constexpr (!FOLD) {
    stream_consume(nst, [&](int i) {  // the barrier makes the scales lanes t == 0 copied visible
      const int r = 4 * (s_begin + i) + lt;
      const bool ok = r < R;
      uint32_t a0[4], a1[4];
      x_frags(i, a0, a1);
      const int rg = ok ? min(r >> p.group_shift, G - 1) : cur_g;  // rows past the end keep the group
      if (rg != cur_g && col_ok) {
        group_scales<T>(sq[(rg - g0) * 8 + lq], zq[(rg - g0) * 4 + lq / 2], lq, p.scales_dtype, ss, zz);
        cur_g = rg;
      }
      uint32_t bf[4][4];
      dequant_step<T>(wq[i * 32 + lane], ss, zz, bf);
      __syncwarp();
      mma_step<T>(acc, a0, a1, bf);
    });
  } else {
    float raw[4][4], xsum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int c = 0; c < 4; ++c)
#pragma unroll
      for (int i = 0; i < 4; ++i) raw[c][i] = 0.f;
    uint2 sv0 = make_uint2(0, 0), sv1 = make_uint2(0, 0);
    uint32_t zw = 0;
    stream_consume(nst, [&](int i) {
      uint32_t a0[4], a1[4];
      x_frags(i, a0, a1);
      // the step's group, from its first row (always inside K); warp-uniform
      const int gs = min((4 * (s_begin + i)) >> p.group_shift, G - 1);
      if (gs != cur_g) {
        if (cur_g >= 0) fold_group<T, MT>(acc, raw, xsum, sv0, sv1, zw, p.scales_dtype);
        sv0 = sq[(gs - g0) * 8 + 2 * lt];
        sv1 = sq[(gs - g0) * 8 + 2 * lt + 1];
        zw = zq[(gs - g0) * 4 + lt];
        cur_g = gs;
      }
      const int4 q = wq[i * 32 + lane];
      const uint32_t qw[4] = {uint32_t(q.x), uint32_t(q.y), uint32_t(q.z), uint32_t(q.w)};
      uint32_t bf[4][4];
#pragma unroll
      for (int c = 0; c < 4; ++c)
#pragma unroll
        for (int j = 0; j < 4; ++j) bf[c][j] = lop3_and_or(qw[c] >> (4 * j), 0x000f000fu, Traits<T>::kMagic);
      __syncwarp();
      mma_step<T>(raw, a0, a1, bf);
      Traits<T>::mma(xsum, a0, Traits<T>::kOne2, Traits<T>::kOne2);
      Traits<T>::mma(xsum, a1, Traits<T>::kOne2, Traits<T>::kOne2);
    });
    if (cur_g >= 0) fold_group<T, MT>(acc, raw, xsum, sv0, sv1, zw, p.scales_dtype);
  }
  __syncthreads();  // every warp done with its slice before the reduction reuses the memory
  reduce_and_store<T, MT>(acc, smem, p, n0, lane, warp, nwarps, lq, lt);
}

// The kernels need up to 128 registers a thread, so an SM holds about 16 of their warps. Give each CTA
// as many warps (K slices) as keeps every CTA resident at once (no second wave), at least 4 for enough
// 16-byte loads in flight, and no more than there are 4-row steps.
int pick_warps(const Params& p, const DeviceInfo& dev, int warps_hint) {
  const int tiles = (p.N + 31) / 32;
  const int steps = (p.K / 8 + 3) / 4;
  const int ctas_per_sm = (tiles + dev.sm_count - 1) / dev.sm_count;
  int warps = warps_hint > 0 ? std::min(warps_hint, kMaxWarps)
                             : std::max(4, std::min(kMaxWarps, kMaxWarps / ctas_per_sm));
  return std::max(1, std::min(warps, steps));
}

template <class Kernel>
cudaError_t launch_kernel(Kernel kernel, const Params& p, const DeviceInfo& dev, int warps_hint, bool table,
                          bool pdl, cudaStream_t stream) {
  const int warps = pick_warps(p, dev, warps_hint);
  const size_t tbl = table ? size_t(p.K / 8) * 4 : 0;
  const size_t red = size_t(warps) * 16 * 32 * 4;
  const size_t smem = std::max(tbl, red);
  if (smem > 48 * 1024) {
    if (smem > size_t(dev.smem_optin)) return cudaErrorInvalidValue;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
  }
  return launch_maybe_pdl(kernel, (p.N + 31) / 32, warps * 32, smem, stream, pdl, p);
}

template <class T, int MT, bool GROUPED>
cudaError_t launch_variant(const Params& p, const DeviceInfo& dev, int warps_hint, bool pdl, cudaStream_t stream) {
  if (p.tiled)
    return launch_kernel(int4_small_m_kernel<T, MT, GROUPED, true>, p, dev, warps_hint, !GROUPED, pdl, stream);
  return launch_kernel(int4_small_m_kernel<T, MT, GROUPED, false>, p, dev, warps_hint, !GROUPED, pdl, stream);
}

// Warps a CTA for the streamed kernel: the most (2 to 16) with which every CTA is resident at once, one
// wave (a CTA's shared memory barely depends on its warps: they split the same slice; registers and
// threads decide); else pick_warps' choice if one CTA fits (later CTAs request their whole slices as
// soon as they start, so the waves overlap their loads); 0 where no CTA fits. With pdl, "every CTA" is
// every CTA of two grids: a dependent grid's CTAs start only where an SM has room beside this grid's, so
// only then can the next layer stream its weights while this one finishes (at 4096x4096, 128 CTAs: 16
// warps fill an SM's registers, about 12 leave room for the next grid's CTA). warps_hint > 0 is taken as it is.
// Decided once per shape, launch kind and device (occupancy queries cost host time).
template <class T, int MT, bool FOLD, bool XG>
int stream_warps(const Params& p, const DeviceInfo& dev, int device, int warps_hint, bool pdl) {
  static std::mutex mu;
  static std::map<std::array<int, 8>, int> decided;
  const std::array<int, 8> key{p.M, p.K, p.N, p.G, p.group_shift, warps_hint, device, pdl ? 1 : 0};
  std::lock_guard<std::mutex> lock(mu);
  const auto it = decided.find(key);
  if (it != decided.end()) return it->second;
  auto kernel = int4_small_m_stream_kernel<T, MT, FOLD, XG>;
  if (!set_max_dynamic_smem<int4_small_m_stream_kernel<T, MT, FOLD, XG>>(device, dev.smem_optin))
    return 0;  // not remembered: a later call may succeed
  const int tiles = (p.N + 31) / 32;
  const int steps = (p.K / 8 + 3) / 4;
  auto per_sm = [&](int w) {
    const StreamLayout lay = stream_layout(p, w, XG);
    int n = 0;
    if (lay.bytes < 0 || lay.bytes > dev.smem_optin ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, w * 32, lay.bytes) != cudaSuccess)
      return 0;
    return n;
  };
  int chosen = 0;
  if (warps_hint > 0) {
    chosen = per_sm(warps_hint) > 0 ? warps_hint : 0;
  } else {
    const int most = std::min(kMaxWarps, steps);
    const int64_t resident = int64_t(tiles) * (pdl ? 2 : 1);
    for (int w = most; w >= std::min(2, most) && !chosen; --w)
      if (int64_t(per_sm(w)) * dev.sm_count >= resident) chosen = w;
    const int fallback = pick_warps(p, dev, 0);
    if (!chosen && per_sm(fallback) > 0) chosen = fallback;
  }
  decided[key] = chosen;
  return chosen;
}

// Streamed kernel where stream_warps finds room; *fits false and nothing launched otherwise.
template <class T, int MT, bool FOLD, bool XG>
cudaError_t launch_stream(const Params& p, const DeviceInfo& dev, int device, int warps_hint, bool pdl,
                          cudaStream_t stream, bool* fits) {
  const int warps = stream_warps<T, MT, FOLD, XG>(p, dev, device, warps_hint, pdl);
  *fits = warps > 0;
  if (!*fits) return cudaSuccess;
  const StreamLayout lay = stream_layout(p, warps, XG);
  return launch_maybe_pdl(int4_small_m_stream_kernel<T, MT, FOLD, XG>, (p.N + 31) / 32, warps * 32, lay.bytes,
                          stream, pdl, p, lay);
}

// Call f(fold, xg) with the two streamed-kernel flags as compile-time constants (std::bool_constant).
template <class F>
auto with_stream_flags(bool fold, bool xg, F&& f) {
  using Y = std::true_type;
  using N = std::false_type;
  if (fold) return xg ? f(Y{}, Y{}) : f(Y{}, N{});
  return xg ? f(N{}, Y{}) : f(N{}, N{});
}

// The streamed variant a steps hint names (32, 34 folded, 36 x from global, 38 both); false if none.
// Folding needs every step inside one group (groups of at least 4 packed rows); without it, no fold.
inline bool stream_flags(int steps_hint, int group_shift, bool* fold, bool* xg) {
  if (steps_hint != 32 && steps_hint != 34 && steps_hint != 36 && steps_hint != 38) return false;
  *fold = (steps_hint == 34 || steps_hint == 38) && group_shift >= 2;
  *xg = steps_hint >= 36;
  return true;
}

// The steps hints launch() takes; anything else is refused (mops_int4_small_m).
inline bool known_steps_hint(int steps_hint) {
  switch (steps_hint) {
    case 0: case 4: case 22: case 32: case 34: case 36: case 38: return true;
    default: return false;
  }
}

// steps_hint selects the variant of grouped weights (act-order and fp32 scales always take the table path):
//   0        the default: 22 for M <= 8 (an H100, 2026-11-27: 3-7% faster than 4 at 4096x4096 and
//            11008x4096, even at 4096x11008), 4 for M > 8 (where 22 lost at 4096x11008);
//   4        batches of 4 steps, each waited for before its arithmetic;
//   22       software-pipelined: two batches of 2 steps in flight, one computed while the other loads;
//   32       streamed: each lane's whole share of the slice copied into shared memory with cp.async at
//            the start, computed chunk by chunk as it lands (where a CTA's slices fit in shared memory:
//            stream_warps; otherwise the default). Not yet timed on a GPU.
//   34       streamed with the scales applied after the mma (fold_group; groups of >= 32 inputs, else 32);
//   36, 38   32 and 34 with the x fragments read from global memory (XG), so x takes no shared memory.
// Dropped after the H100 runs of 2026-11-26/27 (benchmarks/results/tune_int4-*.json): batches of 8 steps
// (spills), x staged in shared memory for the register and pipelined kernels (-4, -8, -22, 24: 0-8% slower
// than 22 at M <= 4, ties at M = 16), and each step streamed through a cp.async ring (1.2-2.5x slower).
// pdl: launched as a programmatic dependent of the stream's previous grid (sm_90; griddep_wait); the
// streamed kernels then size their CTAs so that two grids are resident at once (stream_warps).
template <class T, int MT>
cudaError_t launch(const Params& p, const DeviceInfo& dev, int device, int steps_hint, int warps_hint, bool pdl,
                   cudaStream_t s) {
  if (p.group_shift < 0) return launch_variant<T, MT, false>(p, dev, warps_hint, pdl, s);
  bool fold = false, xg = false;
  if (stream_flags(steps_hint, p.group_shift, &fold, &xg)) {
    bool fits = false;
    const cudaError_t e = with_stream_flags(fold, xg, [&](auto f, auto g) {
      return launch_stream<T, MT, decltype(f)::value, decltype(g)::value>(p, dev, device, warps_hint, pdl, s,
                                                                          &fits);
    });
    if (e != cudaSuccess || fits) return e;
    steps_hint = 0;  // the slices do not fit in shared memory: the default
  }
  if (steps_hint == 22 || (steps_hint == 0 && MT == 8))
    return launch_kernel(int4_small_m_pipe_kernel<T, MT>, p, dev, warps_hint, false, pdl, s);
  return launch_variant<T, MT, true>(p, dev, warps_hint, pdl, s);
}

}  // namespace

extern "C" int mops_int4_small_m_stream_warps(int M, int K, int N, int G, int group_size, int x_dtype,
                                              int steps_hint, int pdl, int device) {
  if (small_m_shape_error(M, K, N, G) != nullptr || (x_dtype != 1 && x_dtype != 2) || group_size <= 0) return -1;
  const DeviceInfo* info = nullptr;
  if (use_device(device, &info) != nullptr) return -1;
  const int group_shift = row_group_shift(group_size, G);
  bool fold = false, xg = false;
  if (!stream_flags(steps_hint, group_shift, &fold, &xg)) return -1;
  if (group_shift < 0) return 0;
  const bool dependent = pdl && info->sm90_features();  // as mops_int4_small_m launches it
  const Params p{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, M, K, N, G, /*16-bit scales*/ 1,
                 group_shift, 0, qweight_order(false, K, N)};
  return with_stream_flags(fold, xg, [&](auto f, auto g) {
    constexpr bool F = decltype(f)::value, X = decltype(g)::value;
    if (x_dtype == 1)
      return M <= 8 ? stream_warps<__half, 8, F, X>(p, *info, device, 0, dependent)
                    : stream_warps<__half, 16, F, X>(p, *info, device, 0, dependent);
    return M <= 8 ? stream_warps<__nv_bfloat16, 8, F, X>(p, *info, device, 0, dependent)
                  : stream_warps<__nv_bfloat16, 16, F, X>(p, *info, device, 0, dependent);
  });
}

extern "C" int mops_int4_small_m(const void* x, int x_dtype, const int32_t* qweight,
                                 const int32_t* qzeros, const void* scales, int scales_dtype,
                                 const int32_t* g_idx, int M, int K, int N, int G, int group_size,
                                 int flags, void* y, int device, void* stream, int steps_hint, int warps_hint,
                                 char* err, int err_len) {
  auto fail = [&](const char* msg) {
    std::snprintf(err, size_t(err_len), "%s", msg);
    return 1;
  };
  if (const char* msg = small_m_shape_error(M, K, N, G)) return fail(msg);
  if (x_dtype != 1 && x_dtype != 2) return fail("activations must be fp16 or bf16");
  if (scales_dtype < 0 || scales_dtype > 2) return fail("bad scales dtype");
  if (group_size < 0) return fail("group_size must be >= 0 (0: read the groups from g_idx)");
  if (!known_steps_hint(steps_hint)) return fail("unknown steps hint: use 0 (the default), 4, 22, 32, 34, 36 or 38");
  if (warps_hint < 0) return fail("warps hint must be >= 0 (0: the kernel picks)");
  if (flags & ~(MOPS_INT4_TILED | MOPS_INT4_PDL)) return fail("unknown flags");
  const bool tiled = flags & MOPS_INT4_TILED;
  const DeviceInfo* info = nullptr;
  if (const char* msg = use_device(device, &info)) return fail(msg);
  const DeviceInfo& dev = *info;
  // Row-group arithmetic where the groups allow it (row_group_shift); anything else, and fp32 scales, take
  // the g_idx table path.
  const int group_shift = group_size > 0 && scales_dtype != 0 ? row_group_shift(group_size, G) : -1;
  cudaError_t e;
  Params p{x, qweight, qzeros, scales, g_idx, y, M, K, N, G, scales_dtype, group_shift, tiled ? 1 : 0,
           qweight_order(tiled, K, N)};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool pdl = (flags & MOPS_INT4_PDL) && dev.sm90_features();  // earlier parts: an ordinary launch
  if (x_dtype == 1)
    e = M <= 8 ? launch<__half, 8>(p, dev, device, steps_hint, warps_hint, pdl, s)
               : launch<__half, 16>(p, dev, device, steps_hint, warps_hint, pdl, s);
  else
    e = M <= 8 ? launch<__nv_bfloat16, 8>(p, dev, device, steps_hint, warps_hint, pdl, s)
               : launch<__nv_bfloat16, 16>(p, dev, device, steps_hint, warps_hint, pdl, s);
  if (e == cudaErrorInvalidValue && group_shift < 0 && size_t(K / 8) * 4 > 48 * 1024)
    return fail("K too large for the shared-memory row-group table of this GPU");
  if (e != cudaSuccess) return fail(cudaGetErrorString(e));
  return 0;
}
