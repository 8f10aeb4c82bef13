// Shared declarations for the CPU extension mops_fast._C.
// The interface is plain pointers + sizes (no libtorch): Python validates and passes data_ptr()s,
// so one binary works with any torch version.
#pragma once

#include <cstdint>
#include <cstring>

namespace mops {

// Element types crossing the Python boundary (mops_fast/native.py keeps the same codes).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// One int4 GPTQ matmul call. Forward: y (M,N) = x (M,K) W^T. Transposed: y (M,K) = x (M,N) W.
// W[n,k] = (code(k,n) - zero(g_idx[k],n)) * scale(g_idx[k],n), codes packed as in GPTQ (DESIGN §3).
struct Int4Args {
  const void* x;          // activations, rows of length K (forward) or N (transposed), unit stride
  int x_dtype;            // DType
  int64_t x_stride;       // elements between rows of x
  const int32_t* qweight; // (K/8, N)
  const int32_t* qzeros;  // (G, N/8)
  const void* scales;     // (G, N)
  int scales_dtype;       // DType
  const int32_t* g_idx;   // (K,), values in [0, G)
  int64_t M, K, N, G;
  void* y;                // output, same dtype as x, contiguous rows
  int64_t y_stride;
  int nthreads;
};

// --- scalar conversions (portable; only used outside the innermost loops) ---
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // keep NaN a NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                         // round to nearest even
  return uint16_t(u >> 16);
}
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
    u = sign | (uint32_t(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: overflow to inf
  if (a < 0x38800000u) {                                  // result is subnormal or zero
    if (a < 0x33000000u) return uint16_t(sign);
    uint32_t e = a >> 23;
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e;  // 14..24
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = ((a >> 13) - (112u << 10));
  uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return uint16_t(sign | r);
}

inline float load_scalar(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kF32: return static_cast<const float*>(p)[i];
    case kF16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

// Kernels exist once per instruction set (same source, compiled with different flags).
namespace generic {
void int4_matmul(const Int4Args& a);
void int4_matmul_t(const Int4Args& a);
}  // namespace generic
namespace avx2 {
void int4_matmul(const Int4Args& a);
void int4_matmul_t(const Int4Args& a);
}  // namespace avx2
namespace avx512 {
void int4_matmul(const Int4Args& a);
void int4_matmul_t(const Int4Args& a);
}  // namespace avx512

}  // namespace mops
