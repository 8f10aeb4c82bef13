// Device helpers shared by the int4 CUDA kernels: fp16/bf16 traits (the dequantization magic numbers and
// the m16n8k16 tensor-core mma), bit casts, and scale loads.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <cooperative_groups.h>

#include <array>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

namespace mops_int4 {

template <class T>
struct Traits;

template <>
struct Traits<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both halves
  static constexpr uint32_t kBias = 0x6400u;
  static constexpr int kCode = 1;  // dtype code of the C interfaces
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
  static constexpr int kCode = 2;
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

// Scale of column slot c from four prefetched 16-bit scales (fp16 or bf16 bits).
__device__ __forceinline__ float scale16(uint2 v, int c, int dtype) {
  const uint32_t h = ((c < 2 ? v.x : v.y) >> (16 * (c & 1))) & 0xffffu;
  return dtype == 1 ? __half2float(__ushort_as_half((unsigned short)h)) : __uint_as_float(h << 16);
}

// Sum R accumulators a lane over the CTA's warps through shared memory (red[(warp * R + r) * 32 + lane],
// conflict-free). Returns true in warp 0, whose tot then holds the sums; the other warps are done.
template <int R>
__device__ __forceinline__ bool sum_over_warps(const float (&acc)[R], float* red, int warp, int nwarps, int lane,
                                               float (&tot)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) red[(warp * R + r) * 32 + lane] = acc[r];
  __syncthreads();
  if (warp != 0) return false;
#pragma unroll
  for (int r = 0; r < R; ++r) tot[r] = 0.f;
  for (int w = 0; w < nwarps; ++w)
#pragma unroll
    for (int r = 0; r < R; ++r) tot[r] += red[(w * R + r) * 32 + lane];
  return true;
}

// Sum R accumulators a lane over the CTAs of a thread-block cluster (sm_90), after sum_over_warps: w0 is its
// answer (warp 0 holds its CTA's sums in tot) and red its buffer, no longer read. Rank 0 adds the other
// CTAs' sums from their shared memory (distributed shared memory) in rank order, so the result does not
// depend on timing. Every thread of every CTA must call it. Returns true in warp 0 of rank 0, whose tot
// then holds the cluster's sums.
template <int R>
__device__ __forceinline__ bool sum_over_cluster(float (&tot)[R], float* red, bool w0, int lane) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  // warp 0 publishes its sums in its own slots of red (sum_over_warps read them; only this lane did)
  if (w0)
#pragma unroll
    for (int r = 0; r < R; ++r) red[r * 32 + lane] = tot[r];
  cluster.sync();
  const bool lead = w0 && cluster.block_rank() == 0;
  if (lead)
    for (unsigned c = 1; c < cluster.num_blocks(); ++c) {
      const float* other = cluster.map_shared_rank(red, c);
#pragma unroll
      for (int r = 0; r < R; ++r) tot[r] += other[r * 32 + lane];
    }
  cluster.sync();  // the other CTAs keep their shared memory until rank 0 has read it
  return lead;
#else
  __trap();  // launched only on sm_90 and newer (DeviceInfo::sm90_features)
  return false;
#endif
}

// Programmatic dependent launch (sm_90). A forward kernel lets the next grid on its stream launch once
// all of its CTAs have started (launch_dependents), and, launched as a dependent itself, reads nothing
// the previous grid may write before griddep_wait returns: it may fetch the frozen weight first, never x.
// Both are no-ops in a kernel launched without the attribute (launch_maybe_pdl) and below sm_90.
__device__ __forceinline__ void griddep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Shift that maps a packed qweight row to its group (row >> shift) when g_idx == arange(K) / group_size
// with a power-of-two count of whole packed rows a group (GPTQ's 32, 64, 128, ...) or when there is one
// group; -1 when the group of a row cannot be computed that way.
inline int row_group_shift(int group_size, int G) {
  if (G == 1) return 30;
  if (group_size <= 0 || group_size % 8 || ((group_size / 8) & (group_size / 8 - 1))) return -1;
  int shift = 0;
  while ((8 << shift) < group_size) ++shift;
  return shift;
}

struct DeviceInfo {
  int sm_count = 0, smem_optin = 0, cc_major = 0;
  // The virtual architecture (10 major + minor) of the code this device runs from this library: below
  // cc_major * 10 where a build without sm_90 code (say "8.0+PTX") is JIT-compiled for an H100. Then
  // griddep_wait and the cluster kernels compile to nothing or a trap, so the host must not launch them.
  int code_arch = 0;
  bool sm90_features() const { return cc_major >= 9 && code_arch >= 90; }
};

// Multiprocessor count, opt-in shared memory per block, compute capability and code
// architecture of a device (0 <= device < 128, the current one), queried once. Internal linkage with
// the probe kernel: each translation unit asks through its own kernel and keeps its own table.
static __global__ void code_arch_probe() {}
static cudaError_t device_info(int device, const DeviceInfo** out) {
  static DeviceInfo info[128];
  DeviceInfo& d = info[device];
  if (d.sm_count == 0) {
    cudaError_t e = cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device);
    cudaFuncAttributes attr;
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, code_arch_probe);  // device is current (use_device)
    if (e == cudaSuccess) d.code_arch = attr.ptxVersion;
    if (e != cudaSuccess) {
      d.sm_count = 0;
      return e;
    }
  }
  *out = &d;
  return cudaSuccess;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent of the stream's previous
// grid when pdl (sm_90 and later: it may start while that grid finishes; see griddep_wait), and in thread-
// block clusters of (1, cluster_y, 1) CTAs when cluster_y > 0 (sm_90).
template <class... Params, class... Args>
cudaError_t launch_ex(void (*kernel)(Params...), dim3 grid, unsigned cluster_y, int block, size_t smem,
                      cudaStream_t stream, bool pdl, Args&&... args) {
  if (!pdl && cluster_y == 0) {
    kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (cluster_y > 0) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = 1;
    attr[n].val.clusterDim.y = cluster_y;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(block);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = n;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  return e != cudaSuccess ? e : cudaGetLastError();
}

// Whether the device (the current one) can place at least one cluster of (1, cluster_y, 1) CTAs of
// Kernel with `block` threads and `smem` bytes each: a restricted device (MIG, an MPS limit) may hold
// none, and a launch would then fail instead of falling back. Asked once per device, size and bytes.
template <auto Kernel>
bool cluster_fits(int device, unsigned cluster_y, int block, int smem) {
  static std::mutex mu;
  static std::map<std::array<int, 4>, bool> known;
  const std::array<int, 4> key{device, int(cluster_y), block, smem};
  std::lock_guard<std::mutex> lock(mu);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = 1;
  attr.val.clusterDim.y = cluster_y;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(1, cluster_y);
  cfg.blockDim = dim3(block);
  cfg.dynamicSmemBytes = size_t(smem);
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  const bool fits = cudaOccupancyMaxActiveClusters(&clusters, Kernel, &cfg) == cudaSuccess && clusters > 0;
  if (!fits) (void)cudaGetLastError();  // a refused query is an answer here, not an error for later calls
  known[key] = fits;
  return fits;
}

// launch_ex without clusters.
template <class... Params, class... Args>
cudaError_t launch_maybe_pdl(void (*kernel)(Params...), dim3 grid, int block, size_t smem, cudaStream_t stream,
                             bool pdl, Args&&... args) {
  return launch_ex(kernel, grid, 0u, block, smem, stream, pdl, std::forward<Args>(args)...);
}

// Shapes both small-M entry points take: 1 <= M <= 16 rows, K and N multiples of 8, G > 0. nullptr if
// they hold, else the message.
inline const char* small_m_shape_error(int M, int K, int N, int G) {
  if (M < 1 || M > 16) return "M must be in [1, 16]";
  if (K <= 0 || N <= 0 || K % 8 || N % 8 || G <= 0) return "need K, N > 0, multiples of 8, G > 0";
  return nullptr;
}

// Make `device` current (the extension's static cudart keeps its own current device, apart from torch's)
// and look up its info. nullptr on success, else the message.
static const char* use_device(int device, const DeviceInfo** out) {
  if (device < 0 || device >= 128) return "bad device index";
  cudaError_t e = cudaSetDevice(device);
  if (e == cudaSuccess) e = device_info(device, out);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace mops_int4
