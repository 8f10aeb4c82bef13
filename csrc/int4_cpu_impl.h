// Int4 GPTQ matmul on the CPU, written once over GCC/Clang vector extensions and compiled three
// times: int4_cpu_avx512.cpp (adds 16-lane decode paths), int4_cpu_avx2.cpp (-mavx2 -mfma -mf16c)
// and int4_cpu_generic.cpp (baseline flags). The including file defines MOPS_ISA, the namespace
// that receives this copy; bindings_cpu.cpp picks one at run time with __builtin_cpu_supports.
//
// Layout (DESIGN §3): qweight (K/8, N) int32, code of (k, n) at bits 4*(k%8) of qweight[k/8, n];
// qzeros (G, N/8) int32 packed the same way along n; scales (G, N); g_idx (K,).
// W[n, k] = (code - zero[g_idx[k], n]) * scale[g_idx[k], n]. The float weight is never built whole:
// M == 1 (and, with AVX-512, M <= 8) streams qweight once; larger M dequantizes one K-block x
// N-tile into a small buffer at a time.
#ifndef MOPS_ISA
#error "define MOPS_ISA before including int4_cpu_impl.h"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include "common.h"
#include "threadpool.h"

namespace mops {
namespace MOPS_ISA {
namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

inline v8f ld(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void st(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
inline v8i ldi(const int32_t* p) {
  v8i v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline v8f splat(float f) { return v8f{f, f, f, f, f, f, f, f}; }
inline v8i splati(int32_t i) { return v8i{i, i, i, i, i, i, i, i}; }
inline v8u splatu(uint32_t i) { return v8u{i, i, i, i, i, i, i, i}; }
inline v8f cvt(v8i v) { return __builtin_convertvector(v, v8f); }
inline float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// Eight consecutive scales as floats.
inline v8f load8_scales(const void* p, int dtype, int64_t off) {
  if (dtype == kF32) return ld(static_cast<const float*>(p) + off);
  const uint16_t* h = static_cast<const uint16_t*>(p) + off;
  if (dtype == kBF16) {
    v8h raw;
    std::memcpy(&raw, h, sizeof raw);
    v8u u = __builtin_convertvector(raw, v8u) << 16;
    return (v8f)u;
  }
#if defined(__F16C__) && defined(__AVX__)
  __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
  v8f r;
  std::memcpy(&r, &f, sizeof r);
  return r;
#else
  v8f r;
  for (int i = 0; i < 8; ++i) r[i] = f16_to_f32(h[i]);
  return r;
#endif
}

// The eight zero points held by one qzeros word, as floats (column 8*i+j at bits 4j).
inline v8f zeros8(int32_t word) {
  const v8u shifts = {0, 4, 8, 12, 16, 20, 24, 28};
  v8u z = (splatu(uint32_t(word)) >> shifts) & 15u;
  return cvt((v8i)z);
}

// Codes j = 0..7 of eight packed words (one per column) as floats.
template <int J>
inline v8f codes(v8i q) {
  v8u u = ((v8u)q >> (4 * J)) & 15u;
  return cvt((v8i)u);
}

// Per-thread scratch (the pool's threads live for the process; buffers are reused across calls).
float* scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// rowg[i] = the group shared by all 8 inputs packed in qweight row i, or -1 when they differ
// (act-order). Returns whether every row has a single group (the common, in-order case).
bool row_groups(const int32_t* g_idx, int64_t K8, std::vector<int32_t>& rowg) {
  rowg.resize(size_t(K8));
  bool uniform = true;
  for (int64_t i = 0; i < K8; ++i) {
    const int32_t* g = g_idx + 8 * i;
    bool same = true;
    for (int j = 1; j < 8; ++j) same &= (g[j] == g[0]);
    rowg[size_t(i)] = same ? g[0] : -1;
    uniform &= same;
  }
  return uniform;
}

// ---------------------------------------------------------------------------------------------
// Forward, M == 1 (decode): y[n] = sum_k x[k] (code - z) s, streaming qweight exactly once.
// In-order groups, AVX2/portable: vectorise along k. One qweight word holds 8 consecutive k of one
// column, so broadcast it, shift lanes by 0,4,..,28 and multiply by x[8r .. 8r+7] (one plain
// load): one accumulator per column, one fma per row each, 8 independent chains, fits 16 registers.
// (The AVX-512 copy vectorises along n instead, see fwd_m1_runs16.)
// Per run of rows sharing group g: y += s * (sum_k x_k code_k - z * sum_k x_k).
// ---------------------------------------------------------------------------------------------
struct Run {
  int64_t r0, r1;  // qweight rows [r0, r1)
  int32_t g;
  float xsum;      // sum of x over the run's inputs
};

// Two-input lane shuffle with a constant index list (clang and GCC >= 12 spell it
// __builtin_shufflevector; older GCC only has __builtin_shuffle with a mask vector).
#if defined(__clang__)
#define MOPS_SHUF(a, b, i0, i1, i2, i3, i4, i5, i6, i7) \
  __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define MOPS_SHUF(a, b, i0, i1, i2, i3, i4, i5, i6, i7) \
  __builtin_shuffle(a, b, v8i{i0, i1, i2, i3, i4, i5, i6, i7})
#endif

// Lane-sums of eight vectors: out[c] = sum over lanes of v[c].
inline v8f hsum8x8(const v8f* v) {
  const v8f u01 = MOPS_SHUF(v[0], v[1], 0, 8, 2, 10, 4, 12, 6, 14) + MOPS_SHUF(v[0], v[1], 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f u23 = MOPS_SHUF(v[2], v[3], 0, 8, 2, 10, 4, 12, 6, 14) + MOPS_SHUF(v[2], v[3], 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f u45 = MOPS_SHUF(v[4], v[5], 0, 8, 2, 10, 4, 12, 6, 14) + MOPS_SHUF(v[4], v[5], 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f u67 = MOPS_SHUF(v[6], v[7], 0, 8, 2, 10, 4, 12, 6, 14) + MOPS_SHUF(v[6], v[7], 1, 9, 3, 11, 5, 13, 7, 15);
  // u01 = [a01, b01, a23, b23, a45, b45, a67, b67] (pairwise sums of v[0] = a and v[1] = b)
  const v8f w0 = MOPS_SHUF(u01, u23, 0, 1, 8, 9, 4, 5, 12, 13) + MOPS_SHUF(u01, u23, 2, 3, 10, 11, 6, 7, 14, 15);
  const v8f w1 = MOPS_SHUF(u45, u67, 0, 1, 8, 9, 4, 5, 12, 13) + MOPS_SHUF(u45, u67, 2, 3, 10, 11, 6, 7, 14, 15);
  // w0 = [a_lo, b_lo, c_lo, d_lo, a_hi, b_hi, c_hi, d_hi] (lo: lanes 0-3, hi: lanes 4-7)
  return MOPS_SHUF(w0, w1, 0, 1, 2, 3, 8, 9, 10, 11) + MOPS_SHUF(w0, w1, 4, 5, 6, 7, 12, 13, 14, 15);
}

template <int V>
void fwd_m1_runs(const Int4Args& a, const float* x, const Run* runs, size_t nruns, int64_t n0,
                 float* y) {
  const int64_t N = a.N;
  const v8u shifts = {0, 4, 8, 12, 16, 20, 24, 28};
  v8f out[V];
  for (int v = 0; v < V; ++v) out[v] = splat(0.f);
  for (size_t ri = 0; ri < nruns; ++ri) {
    const Run& run = runs[ri];
    const int64_t g = run.g;
    // One 8-column slice at a time; the slices after the first find the run's rows in L1.
    for (int v = 0; v < V; ++v) {
      v8f acc[8];
      for (int c = 0; c < 8; ++c) acc[c] = splat(0.f);
      const int32_t* qp = a.qweight + run.r0 * N + n0 + 8 * v;
      for (int64_t r = run.r0; r < run.r1; ++r, qp += N) {
        const v8f xv = ld(x + 8 * r);
        for (int c = 0; c < 8; ++c) {
          v8u u = (splatu(uint32_t(qp[c])) >> shifts) & 15u;
          acc[c] += cvt((v8i)u) * xv;
        }
      }
      const v8f s = load8_scales(a.scales, a.scales_dtype, g * N + n0 + 8 * v);
      const v8f z = zeros8(a.qzeros[g * (N / 8) + n0 / 8 + v]);
      out[v] += s * (hsum8x8(acc) - z * run.xsum);
    }
  }
  for (int v = 0; v < V; ++v) st(y + n0 + 8 * v, ld(y + n0 + 8 * v) + out[v]);
}

// Act-order variant: inputs of one qweight row belong to different groups, so partial sums are
// kept per group (a G x 8V buffer in L1/L2) and scaled once at the end. Vectorised along n; the
// masked lanes hold code * 16^(k%4) (nibbles 0-3 need no shift, nibbles 4-7 one 16-bit shift), so
// x comes pre-scaled by 16^-(k%4): exact, since the factor is a power of two.
template <int V>
void fwd_m1_groups(const Int4Args& a, const float* xs, const float* xsum_g, int64_t n0, float* y) {
  const int64_t N = a.N, G = a.G, K8 = a.K / 8;
  float* accg = scratch(size_t(G * V * 8));
  std::fill(accg, accg + G * V * 8, 0.f);
  const v8i m0 = splati(0xF), m1 = splati(0xF0), m2 = splati(0xF00), m3 = splati(0xF000);
  for (int64_t r = 0; r < K8; ++r) {
    const int32_t* qrow = a.qweight + r * N + n0;
    const float* xr = xs + 8 * r;
    const int32_t* gr = a.g_idx + 8 * r;
    float* p[8];
    for (int j = 0; j < 8; ++j) p[j] = accg + int64_t(gr[j]) * V * 8;
    for (int v = 0; v < V; ++v) {
      const v8i q = ldi(qrow + 8 * v);
      v8u hu = (v8u)q >> 16;
      const v8i h = (v8i)hu;
      float* o = nullptr;
      o = p[0] + 8 * v; st(o, ld(o) + cvt(q & m0) * splat(xr[0]));
      o = p[1] + 8 * v; st(o, ld(o) + cvt(q & m1) * splat(xr[1]));
      o = p[2] + 8 * v; st(o, ld(o) + cvt(q & m2) * splat(xr[2]));
      o = p[3] + 8 * v; st(o, ld(o) + cvt(q & m3) * splat(xr[3]));
      o = p[4] + 8 * v; st(o, ld(o) + cvt(h & m0) * splat(xr[4]));
      o = p[5] + 8 * v; st(o, ld(o) + cvt(h & m1) * splat(xr[5]));
      o = p[6] + 8 * v; st(o, ld(o) + cvt(h & m2) * splat(xr[6]));
      o = p[7] + 8 * v; st(o, ld(o) + cvt(h & m3) * splat(xr[7]));
    }
  }
  v8f out[V];
  for (int v = 0; v < V; ++v) out[v] = splat(0.f);
  for (int64_t g = 0; g < G; ++g) {
    for (int v = 0; v < V; ++v) {
      const v8f s = load8_scales(a.scales, a.scales_dtype, g * N + n0 + 8 * v);
      const v8f z = zeros8(a.qzeros[g * (N / 8) + n0 / 8 + v]);
      out[v] += s * (ld(accg + (g * V + v) * 8) - z * xsum_g[g]);
    }
  }
  for (int v = 0; v < V; ++v) st(y + n0 + 8 * v, out[v]);
}

#if defined(__AVX512F__)
// AVX-512 copy only: vectorise along n, 16 columns per register. The masked lanes hold
// code * 16^(k%4) (nibbles 0-3 need no shift, nibbles 4-7 one 16-bit shift), so x comes pre-scaled
// by 16^-(k%4) (exact: a power of two) and each 16 weights cost one and, one convert and one fma.
// With 32 registers the 8 accumulators, 8 broadcast inputs and 4 masks all stay in registers.
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

inline v16f ld16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline v16f splat16(float f) { return v16f{} + f; }
inline v16i splati16(int32_t i) { return v16i{} + i; }
inline v16f cvt16(v16i v) { return __builtin_convertvector(v, v16f); }
inline v16f pair8(v8f lo, v8f hi) {
  float t[16];
  st(t, lo);
  st(t + 8, hi);
  return ld16(t);
}

template <int V>
void fwd_m1_runs16(const Int4Args& a, const float* xs, const Run& run, int64_t n0, float* y) {
  const int64_t N = a.N;
  const v16i m0 = splati16(0xF), m1 = splati16(0xF0), m2 = splati16(0xF00), m3 = splati16(0xF000);
  v16f acc0[V], acc1[V];
  for (int v = 0; v < V; ++v) acc0[v] = acc1[v] = splat16(0.f);
  for (int64_t r = run.r0; r < run.r1; ++r) {
    const int32_t* qrow = a.qweight + r * N + n0;
    const float* xr = xs + 8 * r;
    const v16f x0 = splat16(xr[0]), x1 = splat16(xr[1]), x2 = splat16(xr[2]), x3 = splat16(xr[3]);
    const v16f x4 = splat16(xr[4]), x5 = splat16(xr[5]), x6 = splat16(xr[6]), x7 = splat16(xr[7]);
    for (int v = 0; v < V; ++v) {
      v16i q;
      std::memcpy(&q, qrow + 16 * v, sizeof q);
      const v16i h = (v16i)((v16u)q >> 16);
      acc0[v] += cvt16(q & m0) * x0;
      acc1[v] += cvt16(q & m1) * x1;
      acc0[v] += cvt16(q & m2) * x2;
      acc1[v] += cvt16(q & m3) * x3;
      acc0[v] += cvt16(h & m0) * x4;
      acc1[v] += cvt16(h & m1) * x5;
      acc0[v] += cvt16(h & m2) * x6;
      acc1[v] += cvt16(h & m3) * x7;
    }
  }
  const int64_t g = run.g;
  for (int v = 0; v < V; ++v) {
    const int64_t n = n0 + 16 * v;
    const v16f s = pair8(load8_scales(a.scales, a.scales_dtype, g * N + n),
                         load8_scales(a.scales, a.scales_dtype, g * N + n + 8));
    const int32_t* zw = a.qzeros + g * (N / 8) + n / 8;
    const v16f z = pair8(zeros8(zw[0]), zeros8(zw[1]));
    float* o = y + n;
    const v16f out = ld16(o) + s * ((acc0[v] + acc1[v]) - z * run.xsum);
    std::memcpy(o, &out, sizeof out);
  }
}
#endif

void fwd_m1(const Int4Args& a, const float* x, float* y) {
  const int64_t K = a.K, N = a.N, K8 = K / 8;
  std::vector<int32_t> rowg;
  const bool uniform = row_groups(a.g_idx, K8, rowg);
  std::vector<Run> runs;
  std::vector<float> xsum_g, xs;
  static const float kPre[4] = {1.f, 1.f / 16, 1.f / 256, 1.f / 4096};
#if defined(__AVX512F__)
  xs.resize(size_t(K));
  for (int64_t k = 0; k < K; ++k) xs[size_t(k)] = x[k] * kPre[k & 3];
#endif
  if (uniform) {
    for (int64_t r = 0; r < K8;) {
      // Runs of at most 32 rows keep a 32-column tile's slice of qweight in L1 between slices.
      int64_t e = r + 1;
      while (e < K8 && e - r < 32 && rowg[size_t(e)] == rowg[size_t(r)]) ++e;
      double sx = 0;
      for (int64_t k = 8 * r; k < 8 * e; ++k) sx += x[k];
      runs.push_back(Run{r, e, rowg[size_t(r)], float(sx)});
      r = e;
    }
  } else {
    xs.resize(size_t(K));
    for (int64_t k = 0; k < K; ++k) xs[size_t(k)] = x[k] * kPre[k & 3];
    std::vector<double> sx(size_t(a.G), 0.0);
    for (int64_t k = 0; k < K; ++k) sx[size_t(a.g_idx[k])] += x[k];
    xsum_g.assign(sx.begin(), sx.end());
  }
  constexpr int64_t kTile = 32;  // 4 vectors of 8 columns
  const int64_t ntiles = (N + kTile - 1) / kTile;
  if (uniform) {
    // Threads split K and sweep all columns of their rows, so qweight is read as a few long
    // sequential streams (a column-tile split would hop pages on every row). The runs form a fixed
    // number of chunks, each summed into its own copy of y and added up in chunk order: the result
    // does not depend on the thread count or on which thread took which chunk.
    const int64_t nruns = int64_t(runs.size());
    const int64_t nchunks = std::min<int64_t>(nruns, 8);
    std::vector<float> part(size_t(nchunks) * size_t(N), 0.f);
    parallel_for(a.nthreads, nchunks, [&](int64_t ch, int) {
     float* yp = part.data() + ch * N;
     for (int64_t ri = ch * nruns / nchunks; ri < (ch + 1) * nruns / nchunks; ++ri) {
#if defined(__AVX512F__)
      const Run& run = runs[size_t(ri)];
      int64_t n0 = 0;
      for (; n0 + 64 <= N; n0 += 64) fwd_m1_runs16<4>(a, xs.data(), run, n0, yp);
      switch (int((N - n0) / 16)) {
        case 3: fwd_m1_runs16<3>(a, xs.data(), run, n0, yp); n0 += 48; break;
        case 2: fwd_m1_runs16<2>(a, xs.data(), run, n0, yp); n0 += 32; break;
        case 1: fwd_m1_runs16<1>(a, xs.data(), run, n0, yp); n0 += 16; break;
        default: break;
      }
      if (n0 < N) fwd_m1_runs<1>(a, x, &run, 1, n0, yp);  // last 8 columns
#else
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t n0 = t * kTile;
        switch (int(std::min<int64_t>(kTile, N - n0) / 8)) {
          case 4: fwd_m1_runs<4>(a, x, &runs[size_t(ri)], 1, n0, yp); break;
          case 3: fwd_m1_runs<3>(a, x, &runs[size_t(ri)], 1, n0, yp); break;
          case 2: fwd_m1_runs<2>(a, x, &runs[size_t(ri)], 1, n0, yp); break;
          default: fwd_m1_runs<1>(a, x, &runs[size_t(ri)], 1, n0, yp); break;
        }
      }
#endif
     }
    });
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.f;
      for (int64_t c = 0; c < nchunks; ++c) acc += part[size_t(c * N + n)];
      y[n] = acc;
    }
    return;
  }
  parallel_for(a.nthreads, ntiles, [&](int64_t t, int) {
    const int64_t n0 = t * kTile;
    switch (int(std::min<int64_t>(kTile, N - n0) / 8)) {
      case 4: fwd_m1_groups<4>(a, xs.data(), xsum_g.data(), n0, y); break;
      case 3: fwd_m1_groups<3>(a, xs.data(), xsum_g.data(), n0, y); break;
      case 2: fwd_m1_groups<2>(a, xs.data(), xsum_g.data(), n0, y); break;
      default: fwd_m1_groups<1>(a, xs.data(), xsum_g.data(), n0, y); break;
    }
  });
}

#if defined(__AVX512F__)
// AVX-512, 2 <= M <= 8, in-order groups, N % 16 == 0: the decode kernel with MR rows of x, so a
// code is decoded once (and + convert) and feeds MR fma (x broadcast straight from memory). Beats
// dequantize-then-GEMM by several times at these M, where decoding dominates.
template <int MR, int V>
void fwd_small_runs16(const Int4Args& a, const float* xs, int64_t K, const Run& run,
                      const float* xsum, int64_t n0, float* y, int64_t N) {
  const v16i m0 = splati16(0xF), m1 = splati16(0xF0), m2 = splati16(0xF00), m3 = splati16(0xF000);
  v16f acc[MR][V];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < V; ++v) acc[m][v] = splat16(0.f);
  for (int64_t r = run.r0; r < run.r1; ++r) {
    const int32_t* qrow = a.qweight + r * N + n0;
    const float* xr = xs + 8 * r;
    for (int v = 0; v < V; ++v) {
      v16i q;
      std::memcpy(&q, qrow + 16 * v, sizeof q);
      const v16i h = (v16i)((v16u)q >> 16);
      const v16f c[8] = {cvt16(q & m0), cvt16(q & m1), cvt16(q & m2), cvt16(q & m3),
                         cvt16(h & m0), cvt16(h & m1), cvt16(h & m2), cvt16(h & m3)};
      for (int j = 0; j < 8; ++j)
        for (int m = 0; m < MR; ++m) acc[m][v] += c[j] * xr[m * K + j];
    }
  }
  const int64_t g = run.g;
  for (int v = 0; v < V; ++v) {
    const int64_t n = n0 + 16 * v;
    const v16f s = pair8(load8_scales(a.scales, a.scales_dtype, g * N + n),
                         load8_scales(a.scales, a.scales_dtype, g * N + n + 8));
    const int32_t* zw = a.qzeros + g * (N / 8) + n / 8;
    const v16f z = pair8(zeros8(zw[0]), zeros8(zw[1]));
    for (int m = 0; m < MR; ++m) {
      float* o = y + m * N + n;
      const v16f out = ld16(o) + s * (acc[m][v] - z * xsum[m]);
      std::memcpy(o, &out, sizeof out);
    }
  }
}

template <int MR>
void fwd_small_tile(const Int4Args& a, const float* xs, const Run& run, const float* xsum,
                    float* yp) {
  const int64_t N = a.N, K = a.K;
  int64_t n0 = 0;
  // Two column vectors per pass while the MR x 2 accumulators and 8 decoded codes fit the 32
  // registers; one beyond that.
  if (MR <= 4)
    for (; n0 + 32 <= N; n0 += 32) fwd_small_runs16<MR, 2>(a, xs, K, run, xsum, n0, yp, N);
  for (; n0 < N; n0 += 16) fwd_small_runs16<MR, 1>(a, xs, K, run, xsum, n0, yp, N);
}

bool fwd_small_m(const Int4Args& a, const float* X, int64_t ldx, float* Y, int64_t ldy) {
  const int64_t M = a.M, K = a.K, N = a.N, K8 = K / 8;
  if (M < 2 || M > 8 || N % 16 != 0) return false;
  std::vector<int32_t> rowg;
  if (!row_groups(a.g_idx, K8, rowg)) return false;  // act-order: the general path
  static const float kPre[4] = {1.f, 1.f / 16, 1.f / 256, 1.f / 4096};
  std::vector<float> xs(size_t(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xs[size_t(m * K + k)] = X[m * ldx + k] * kPre[k & 3];
  std::vector<Run> runs;
  std::vector<float> xsum;  // M per run
  for (int64_t r = 0; r < K8;) {
    int64_t e = r + 1;
    while (e < K8 && e - r < 32 && rowg[size_t(e)] == rowg[size_t(r)]) ++e;
    runs.push_back(Run{r, e, rowg[size_t(r)], 0.f});
    for (int64_t m = 0; m < M; ++m) {
      double sx = 0;
      for (int64_t k = 8 * r; k < 8 * e; ++k) sx += X[m * ldx + k];
      xsum.push_back(float(sx));
    }
    r = e;
  }
  // Fixed chunks of runs with their own partial outputs, summed in order (see fwd_m1).
  const int64_t nruns = int64_t(runs.size());
  const int64_t nchunks = std::min<int64_t>(nruns, 8);
  std::vector<float> part(size_t(nchunks) * size_t(M * N), 0.f);
  parallel_for(a.nthreads, nchunks, [&](int64_t ch, int) {
   float* yp = part.data() + ch * M * N;
   for (int64_t ri = ch * nruns / nchunks; ri < (ch + 1) * nruns / nchunks; ++ri) {
    const Run& run = runs[size_t(ri)];
    const float* xsr = xsum.data() + ri * M;
    switch (M) {
      case 2: fwd_small_tile<2>(a, xs.data(), run, xsr, yp); break;
      case 3: fwd_small_tile<3>(a, xs.data(), run, xsr, yp); break;
      case 4: fwd_small_tile<4>(a, xs.data(), run, xsr, yp); break;
      case 5: fwd_small_tile<5>(a, xs.data(), run, xsr, yp); break;
      case 6: fwd_small_tile<6>(a, xs.data(), run, xsr, yp); break;
      case 7: fwd_small_tile<7>(a, xs.data(), run, xsr, yp); break;
      default: fwd_small_tile<8>(a, xs.data(), run, xsr, yp); break;
    }
   }
  });
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.f;
      for (int64_t c = 0; c < nchunks; ++c) acc += part[size_t(c * M * N + m * N + n)];
      Y[m * ldy + n] = acc;
    }
  return true;
}
#endif

// ---------------------------------------------------------------------------------------------
// M > 1: dequantize a block into a small row-major buffer B, then a register-blocked GEMM
//   C[m, c] (+)= sum_r A[m, r] * B[r, c]
// Forward: r = input k, c = output n (B = W^T block). Transposed: r = output n, c = input k
// (B = W block, W's own row layout). One micro-kernel serves both.
// ---------------------------------------------------------------------------------------------
template <int MR, int NV>
inline void micro(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t kk, float* C,
                  int64_t ldc, bool first) {
  v8f acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = first ? splat(0.f) : ld(C + m * ldc + 8 * v);
  for (int64_t r = 0; r < kk; ++r) {
    v8f b[NV];
    for (int v = 0; v < NV; ++v) b[v] = ld(B + r * ldb + 8 * v);
    for (int m = 0; m < MR; ++m) {
      const v8f am = splat(A[m * lda + r]);
      for (int v = 0; v < NV; ++v) acc[m][v] += am * b[v];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) st(C + m * ldc + 8 * v, acc[m][v]);
}

template <int NV>
inline void micro_m(int mr, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t kk,
                    float* C, int64_t ldc, bool first) {
  switch (mr) {
    case 6: micro<6, NV>(A, lda, B, ldb, kk, C, ldc, first); break;
    case 5: micro<5, NV>(A, lda, B, ldb, kk, C, ldc, first); break;
    case 4: micro<4, NV>(A, lda, B, ldb, kk, C, ldc, first); break;
    case 3: micro<3, NV>(A, lda, B, ldb, kk, C, ldc, first); break;
    case 2: micro<2, NV>(A, lda, B, ldb, kk, C, ldc, first); break;
    default: micro<1, NV>(A, lda, B, ldb, kk, C, ldc, first); break;
  }
}

// C[0:M, 0:ncols] (+)= A[0:M, 0:kk] @ B[0:kk, 0:ncols]; ncols a multiple of 8.
void gemm_block(int64_t M, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t kk,
                float* C, int64_t ldc, int64_t ncols, bool first) {
  constexpr int MR = 6;
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const int mr = int(std::min<int64_t>(MR, M - m0));
    int64_t c = 0;
    for (; c + 16 <= ncols; c += 16)
      micro_m<2>(mr, A + m0 * lda, lda, B + c, ldb, kk, C + m0 * ldc + c, ldc, first);
    for (; c < ncols; c += 8)
      micro_m<1>(mr, A + m0 * lda, lda, B + c, ldb, kk, C + m0 * ldc + c, ldc, first);
  }
}

// Float tables S[g, n] = scale and ZS[g, n] = zero * scale, so that W = code * S - ZS (one fma).
void build_tables(const Int4Args& a, float* S, float* ZS) {
  const int64_t N = a.N;
  parallel_for(a.nthreads, a.G, [&](int64_t g, int) {
    for (int64_t n = 0; n < N; n += 8) {
      const v8f s = load8_scales(a.scales, a.scales_dtype, g * N + n);
      const v8f z = zeros8(a.qzeros[g * (N / 8) + n / 8]);
      st(S + g * N + n, s);
      st(ZS + g * N + n, z * s);
    }
  });
}

// Forward block: B[8*(r-r0)+j, c] = W[n0+c, 8r+j] for qweight rows [r0, r1), columns [n0, n0+nc).
void dequant_fwd(const Int4Args& a, const int32_t* rowg, const float* S, const float* ZS,
                 int64_t r0, int64_t r1, int64_t n0, int64_t nc, float* B, int64_t ldb) {
  const int64_t N = a.N;
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t g = rowg[r];
    float* brow = B + 8 * (r - r0) * ldb;
    for (int64_t c = 0; c < nc; c += 8) {
      const v8i q = ldi(a.qweight + r * N + n0 + c);
      if (g >= 0) {
        const v8f s = ld(S + g * N + n0 + c), zs = ld(ZS + g * N + n0 + c);
        st(brow + 0 * ldb + c, codes<0>(q) * s - zs);
        st(brow + 1 * ldb + c, codes<1>(q) * s - zs);
        st(brow + 2 * ldb + c, codes<2>(q) * s - zs);
        st(brow + 3 * ldb + c, codes<3>(q) * s - zs);
        st(brow + 4 * ldb + c, codes<4>(q) * s - zs);
        st(brow + 5 * ldb + c, codes<5>(q) * s - zs);
        st(brow + 6 * ldb + c, codes<6>(q) * s - zs);
        st(brow + 7 * ldb + c, codes<7>(q) * s - zs);
      } else {
        const int32_t* gr = a.g_idx + 8 * r;
#define MOPS_DEQ_J(J)                                                                   \
  st(brow + J * ldb + c,                                                                \
     codes<J>(q) * ld(S + gr[J] * N + n0 + c) - ld(ZS + gr[J] * N + n0 + c));
        MOPS_DEQ_J(0) MOPS_DEQ_J(1) MOPS_DEQ_J(2) MOPS_DEQ_J(3)
        MOPS_DEQ_J(4) MOPS_DEQ_J(5) MOPS_DEQ_J(6) MOPS_DEQ_J(7)
#undef MOPS_DEQ_J
      }
    }
  }
}

// Transposed block: B[n-n0, 8*(r-r0)+j] = W[n, 8r+j] (W's own layout) for the same ranges.
void dequant_t(const Int4Args& a, const int32_t* rowg, const float* S, const float* ZS,
               int64_t r0, int64_t r1, int64_t n0, int64_t nn, float* B, int64_t ldb) {
  const int64_t N = a.N;
  const v8u shifts = {0, 4, 8, 12, 16, 20, 24, 28};
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t g = rowg[r];
    const int32_t* gr = a.g_idx + 8 * r;
    const int32_t* qrow = a.qweight + r * N;
    float* bcol = B + 8 * (r - r0);
    for (int64_t n = n0; n < n0 + nn; ++n) {
      v8u u = (splatu(uint32_t(qrow[n])) >> shifts) & 15u;
      const v8f cd = cvt((v8i)u);
      v8f s, zs;
      if (g >= 0) {
        s = splat(S[g * N + n]);
        zs = splat(ZS[g * N + n]);
      } else {
        for (int j = 0; j < 8; ++j) {
          s[j] = S[gr[j] * N + n];
          zs[j] = ZS[gr[j] * N + n];
        }
      }
      st(bcol + (n - n0) * ldb, cd * s - zs);
    }
  }
}

// Activations as float rows (converted once when bf16/fp16) and a float output to accumulate in.
struct FloatIO {
  const float* X;
  int64_t ldx;
  float* Y;
  int64_t ldy;
  std::vector<float> xbuf, ybuf;

  FloatIO(const Int4Args& a, int64_t xlen, int64_t ylen) {
    if (a.x_dtype == kF32) {
      X = static_cast<const float*>(a.x);
      ldx = a.x_stride;
    } else {
      xbuf.resize(size_t(a.M * xlen));
      const uint16_t* src = static_cast<const uint16_t*>(a.x);
      const int dt = a.x_dtype;
      float* dst = xbuf.data();
      const int64_t stride = a.x_stride;
      parallel_for(a.nthreads, a.M, [&](int64_t m, int) {
        const uint16_t* s = src + m * stride;
        float* d = dst + m * xlen;
        if (dt == kBF16)
          for (int64_t i = 0; i < xlen; ++i) d[i] = bf16_to_f32(s[i]);
        else
          for (int64_t i = 0; i < xlen; ++i) d[i] = f16_to_f32(s[i]);
      });
      X = xbuf.data();
      ldx = xlen;
    }
    if (a.x_dtype == kF32) {
      Y = static_cast<float*>(a.y);
      ldy = a.y_stride;
    } else {
      ybuf.resize(size_t(a.M * ylen));
      Y = ybuf.data();
      ldy = ylen;
    }
  }

  void finish(const Int4Args& a, int64_t ylen) {
    if (a.x_dtype == kF32) return;
    uint16_t* dst = static_cast<uint16_t*>(a.y);
    const int dt = a.x_dtype;
    const int64_t stride = a.y_stride;
    const float* src = ybuf.data();
    parallel_for(a.nthreads, a.M, [&](int64_t m, int) {
      const float* s = src + m * ylen;
      uint16_t* d = dst + m * stride;
      if (dt == kBF16)
        for (int64_t i = 0; i < ylen; ++i) d[i] = f32_to_bf16(s[i]);
      else
        for (int64_t i = 0; i < ylen; ++i) d[i] = f32_to_f16(s[i]);
    });
  }
};

// Validates the sizes and returns the arguments with the thread count to use: a small product
// (under ~4M multiply-adds, e.g. a SmolLM2 layer at decode) runs on the calling thread alone,
// because waking helpers costs more than they save, and far more on a busy machine.
Int4Args prepare(const Int4Args& a) {
  if (a.K <= 0 || a.N <= 0 || a.G <= 0 || a.M < 0 || a.K % 8 || a.N % 8)
    throw std::invalid_argument("int4 matmul: need K, N > 0 and multiples of 8, G > 0");
  Int4Args b = a;
  if (double(a.K) * double(a.N) * double(std::max<int64_t>(a.M, 1)) < double(1 << 22)) b.nthreads = 1;
  return b;
}

}  // namespace

void int4_matmul(const Int4Args& args) {
  const Int4Args a = prepare(args);
  if (a.M == 0) return;
  const int64_t K = a.K, N = a.N, K8 = K / 8;
  FloatIO io(a, K, N);
  if (a.M == 1) {
    fwd_m1(a, io.X, io.Y);
    io.finish(a, N);
    return;
  }
#if defined(__AVX512F__)
  if (fwd_small_m(a, io.X, io.ldx, io.Y, io.ldy)) {
    io.finish(a, N);
    return;
  }
#endif
  std::vector<float> S(size_t(a.G * N)), ZS(size_t(a.G * N));
  build_tables(a, S.data(), ZS.data());
  std::vector<int32_t> rowg;
  row_groups(a.g_idx, K8, rowg);
  constexpr int64_t NT = 64, KB = 128;  // B block = 32 KiB, stays in L1/L2
  const int64_t ntiles = (N + NT - 1) / NT;
  parallel_for(a.nthreads, ntiles, [&](int64_t t, int) {
    const int64_t n0 = t * NT, nc = std::min(NT, N - n0);
    float* B = scratch(size_t(KB * NT));
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
      const int64_t kb = std::min(KB, K - k0);
      dequant_fwd(a, rowg.data(), S.data(), ZS.data(), k0 / 8, (k0 + kb) / 8, n0, nc, B, NT);
      gemm_block(a.M, io.X + k0, io.ldx, B, NT, kb, io.Y + n0, io.ldy, nc, k0 == 0);
    }
  });
  io.finish(a, N);
}

void int4_matmul_t(const Int4Args& args) {
  const Int4Args a = prepare(args);
  if (a.M == 0) return;
  const int64_t K = a.K, N = a.N, G = a.G, K8 = K / 8;
  FloatIO io(a, N, K);
  std::vector<int32_t> rowg;
  row_groups(a.g_idx, K8, rowg);
  if (a.M == 1) {
    // dx[k] = sum_n dy[n] s[g,n] code(k,n) - sum_n dy[n] s[g,n] z[g,n], with g = g_idx[k]:
    // DS[g, n] = dy[n] s[g, n] and c[g] are tiny next to qweight, which is then read once.
    const float* dy = io.X;
    std::vector<float> DS(static_cast<size_t>(G * N)), cg(static_cast<size_t>(G));
    parallel_for(a.nthreads, G, [&](int64_t g, int) {
      v8f acc = splat(0.f);
      for (int64_t n = 0; n < N; n += 8) {
        const v8f ds = ld(dy + n) * load8_scales(a.scales, a.scales_dtype, g * N + n);
        st(DS.data() + g * N + n, ds);
        acc += ds * zeros8(a.qzeros[g * (N / 8) + n / 8]);
      }
      cg[size_t(g)] = hsum(acc);
    });
    float* dx = io.Y;
    constexpr int64_t RB = 4;  // qweight rows per task
    parallel_for(a.nthreads, (K8 + RB - 1) / RB, [&](int64_t t, int) {
      for (int64_t r = t * RB; r < std::min(K8, (t + 1) * RB); ++r) {
        const int32_t* qrow = a.qweight + r * N;
        const int32_t* gr = a.g_idx + 8 * r;
        v8f acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = splat(0.f);
        if (rowg[size_t(r)] >= 0) {
          const float* d = DS.data() + int64_t(rowg[size_t(r)]) * N;
          for (int64_t n = 0; n < N; n += 8) {
            const v8i q = ldi(qrow + n);
            const v8f ds = ld(d + n);
            acc[0] += codes<0>(q) * ds; acc[1] += codes<1>(q) * ds;
            acc[2] += codes<2>(q) * ds; acc[3] += codes<3>(q) * ds;
            acc[4] += codes<4>(q) * ds; acc[5] += codes<5>(q) * ds;
            acc[6] += codes<6>(q) * ds; acc[7] += codes<7>(q) * ds;
          }
        } else {
          const float* d[8];
          for (int j = 0; j < 8; ++j) d[j] = DS.data() + int64_t(gr[j]) * N;
          for (int64_t n = 0; n < N; n += 8) {
            const v8i q = ldi(qrow + n);
            acc[0] += codes<0>(q) * ld(d[0] + n); acc[1] += codes<1>(q) * ld(d[1] + n);
            acc[2] += codes<2>(q) * ld(d[2] + n); acc[3] += codes<3>(q) * ld(d[3] + n);
            acc[4] += codes<4>(q) * ld(d[4] + n); acc[5] += codes<5>(q) * ld(d[5] + n);
            acc[6] += codes<6>(q) * ld(d[6] + n); acc[7] += codes<7>(q) * ld(d[7] + n);
          }
        }
        for (int j = 0; j < 8; ++j) dx[8 * r + j] = hsum(acc[j]) - cg[size_t(gr[j])];
      }
    });
    io.finish(a, K);
    return;
  }
  std::vector<float> S(size_t(G * N)), ZS(size_t(G * N));
  build_tables(a, S.data(), ZS.data());
  constexpr int64_t KT = 64, NC = 128;  // B block (NC x KT floats) = 32 KiB
  const int64_t ntiles = (K + KT - 1) / KT;
  parallel_for(a.nthreads, ntiles, [&](int64_t t, int) {
    const int64_t k0 = t * KT, kt = std::min(KT, K - k0);
    float* B = scratch(size_t(NC * KT));
    for (int64_t n0 = 0; n0 < N; n0 += NC) {
      const int64_t nn = std::min(NC, N - n0);
      dequant_t(a, rowg.data(), S.data(), ZS.data(), k0 / 8, (k0 + kt) / 8, n0, nn, B, KT);
      gemm_block(a.M, io.X + n0, io.ldx, B, KT, nn, io.Y + k0, io.ldy, kt, n0 == 0);
    }
  });
  io.finish(a, K);
}

}  // namespace MOPS_ISA
}  // namespace mops
