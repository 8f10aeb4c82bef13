// mops_fast._C: CPU kernels bound with pybind11. Arguments are raw pointers (as integers), sizes and
// strides; mops_fast/native.py validates everything before calling. No libtorch linkage.
#include <pybind11/pybind11.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common.h"

namespace py = pybind11;
using mops::Int4Args;

namespace {

// Whether this CPU (and this build) can run a copy of the kernels.
bool cpu_supports(const std::string& isa) {
  if (isa == "generic") return true;
#if (defined(__x86_64__) || defined(__i386__)) && defined(MOPS_HAVE_AVX2_TU)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (isa == "avx2") return avx2;
#if defined(MOPS_HAVE_AVX512_TU)
  if (isa == "avx512")
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#endif
#endif
  return false;
}

// Chosen once at import: the widest copy the CPU runs. MOPS_FAST_CPU_ISA=avx2|generic caps it
// (tests use set_isa() to cover every copy on one machine).
std::string g_isa = [] {
  const char* env = std::getenv("MOPS_FAST_CPU_ISA");
  const std::string cap = env ? env : "";
  bool allowed = cap != "avx512" && cap != "avx2" && cap != "generic";  // no (valid) cap
  for (const char* isa : {"avx512", "avx2", "generic"}) {
    if (cap == isa) allowed = true;
    if (allowed && cpu_supports(isa)) return std::string(isa);
  }
  return std::string("generic");
}();

Int4Args make_args(uintptr_t x, int x_dtype, int64_t x_stride, uintptr_t qweight, uintptr_t qzeros,
                   uintptr_t scales, int scales_dtype, uintptr_t g_idx, int64_t M, int64_t K,
                   int64_t N, int64_t G, uintptr_t y, int64_t y_stride, int nthreads) {
  for (int dt : {x_dtype, scales_dtype})
    if (dt != mops::kF32 && dt != mops::kF16 && dt != mops::kBF16)
      throw std::invalid_argument("int4 matmul: dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  if (!qweight || !qzeros || !scales || !g_idx || (M > 0 && (!x || !y)))
    throw std::invalid_argument("int4 matmul: null data pointer");
  Int4Args a;
  a.x = reinterpret_cast<const void*>(x);
  a.x_dtype = x_dtype;
  a.x_stride = x_stride;
  a.qweight = reinterpret_cast<const int32_t*>(qweight);
  a.qzeros = reinterpret_cast<const int32_t*>(qzeros);
  a.scales = reinterpret_cast<const void*>(scales);
  a.scales_dtype = scales_dtype;
  a.g_idx = reinterpret_cast<const int32_t*>(g_idx);
  a.M = M;
  a.K = K;
  a.N = N;
  a.G = G;
  a.y = reinterpret_cast<void*>(y);
  a.y_stride = y_stride;
  a.nthreads = nthreads < 1 ? 1 : nthreads;
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mops_fast CPU kernels (int4 GPTQ matmul); called through mops_fast.native";

  m.def(
      "int4_matmul",
      [](uintptr_t x, int x_dtype, int64_t x_stride, uintptr_t qweight, uintptr_t qzeros,
         uintptr_t scales, int scales_dtype, uintptr_t g_idx, int64_t M, int64_t K, int64_t N,
         int64_t G, uintptr_t y, int64_t y_stride, int nthreads, bool transposed) {
        Int4Args a = make_args(x, x_dtype, x_stride, qweight, qzeros, scales, scales_dtype, g_idx,
                               M, K, N, G, y, y_stride, nthreads);
#ifdef MOPS_HAVE_AVX512_TU
        if (g_isa == "avx512") {
          transposed ? mops::avx512::int4_matmul_t(a) : mops::avx512::int4_matmul(a);
          return;
        }
#endif
#ifdef MOPS_HAVE_AVX2_TU
        if (g_isa == "avx2") {
          transposed ? mops::avx2::int4_matmul_t(a) : mops::avx2::int4_matmul(a);
          return;
        }
#endif
        transposed ? mops::generic::int4_matmul_t(a) : mops::generic::int4_matmul(a);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("x_stride"), py::arg("qweight"),
      py::arg("qzeros"), py::arg("scales"), py::arg("scales_dtype"), py::arg("g_idx"),
      py::arg("M"), py::arg("K"), py::arg("N"), py::arg("G"), py::arg("y"), py::arg("y_stride"),
      py::arg("nthreads"), py::arg("transposed"), py::call_guard<py::gil_scoped_release>(),
      "Forward: y (M,N) = x (M,K) W^T. Transposed: y (M,K) = x (M,N) W. Pointers as integers.");

  m.def("isa", [] { return g_isa; }, "Active copy of the CPU kernels: avx512, avx2 or generic");
  m.def("cpu_supports", &cpu_supports, py::arg("isa"),
        "Whether this CPU and build can run the given copy (avx512, avx2, generic)");
  m.def(
      "set_isa",
      [](const std::string& isa) {
        if (isa != "avx512" && isa != "avx2" && isa != "generic")
          throw std::invalid_argument("set_isa: expected 'avx512', 'avx2' or 'generic', got '" + isa + "'");
        if (!cpu_supports(isa))
          throw std::invalid_argument("set_isa: this CPU or build cannot run the " + isa + " copy");
        g_isa = isa;
      },
      "Switch the CPU kernels between the AVX2 and the portable copy (for tests)");
}
