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

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(MOPS_HAVE_AVX2_TU)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// Chosen once at import; MOPS_FAST_CPU_ISA=generic forces the portable path (tests use it to cover
// both copies on an AVX2 machine), set_isa() switches at run time.
std::string g_isa = [] {
  const char* env = std::getenv("MOPS_FAST_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "generic") == 0) return std::string("generic");
  return std::string(cpu_has_avx2() ? "avx2" : "generic");
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

  m.def("isa", [] { return g_isa; }, "Instruction set of the active CPU kernels: avx2 or generic");
  m.def("cpu_has_avx2", &cpu_has_avx2, "Whether this CPU and build can run the AVX2/FMA kernels");
  m.def(
      "set_isa",
      [](const std::string& isa) {
        if (isa != "avx2" && isa != "generic")
          throw std::invalid_argument("set_isa: expected 'avx2' or 'generic', got '" + isa + "'");
        if (isa == "avx2" && !cpu_has_avx2())
          throw std::invalid_argument("set_isa: this CPU or build has no AVX2/FMA/F16C path");
        g_isa = isa;
      },
      "Switch the CPU kernels between the AVX2 and the portable copy (for tests)");
}
