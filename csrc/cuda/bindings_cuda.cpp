// mops_fast._C_cuda: CUDA kernels bound with pybind11 (plain C++; the kernels sit behind a C
// interface in int4_small_m.h). Loaded lazily by mops_fast/native.py on the first CUDA op, so a
// wheel carrying it still imports on machines without a GPU.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "int4_small_m.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "mops_fast CUDA kernels (int4 GPTQ small-M matmul and its backward); called through mops_fast.native";
  m.def(
      "int4_matmul_small_m",
      [](uintptr_t x, int x_dtype, uintptr_t qweight, uintptr_t qzeros, uintptr_t scales,
         int scales_dtype, uintptr_t g_idx, int M, int K, int N, int G, int group_size, uintptr_t y,
         int device, uintptr_t stream, int steps, int warps, int ksplit, int prefetch, bool pdl) {
        char err[256] = {0};
        int rc;
        {
          py::gil_scoped_release nogil;
          rc = mops_int4_small_m(reinterpret_cast<const void*>(x), x_dtype,
                                 reinterpret_cast<const int32_t*>(qweight),
                                 reinterpret_cast<const int32_t*>(qzeros),
                                 reinterpret_cast<const void*>(scales), scales_dtype,
                                 reinterpret_cast<const int32_t*>(g_idx), M, K, N, G, group_size,
                                 pdl ? MOPS_INT4_PDL : 0, reinterpret_cast<void*>(y), device,
                                 reinterpret_cast<void*>(stream), steps, warps, ksplit, prefetch, err,
                                 int(sizeof err));
        }
        if (rc != 0) throw std::runtime_error(std::string("int4_matmul_small_m: ") + err);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("qweight"), py::arg("qzeros"), py::arg("scales"),
      py::arg("scales_dtype"), py::arg("g_idx"), py::arg("M"), py::arg("K"), py::arg("N"),
      py::arg("G"), py::arg("group_size"), py::arg("y"), py::arg("device"), py::arg("stream"),
      py::arg("steps") = 0, py::arg("warps") = 0, py::arg("ksplit") = 0, py::arg("prefetch") = 0,
      py::arg("pdl") = false,
      "y (M,N) = x (M,K) W^T on CUDA for M <= 16; pointers and the stream as integers. group_size > 0 "
      "promises g_idx == arange(K) / group_size; steps / warps / ksplit / prefetch > 0 override the tuned launch "
      "(benchmarks); pdl: launched as a programmatic dependent of the stream's previous grid (sm_90)");
  m.def(
      "int4_matmul_small_m_plan",
      [](int M, int K, int N, int G, int group_size, int scales_dtype, int x_dtype, int steps, int warps,
         int ksplit, int device) {
        int out[3] = {0, 0, 0};
        if (mops_int4_small_m_plan(M, K, N, G, group_size, scales_dtype, x_dtype, steps, warps, ksplit, device,
                                   out) != 0)
          throw std::invalid_argument("int4_matmul_small_m_plan: bad arguments");
        return py::make_tuple(out[0], out[1], out[2]);
      },
      py::arg("M"), py::arg("K"), py::arg("N"), py::arg("G"), py::arg("group_size"), py::arg("scales_dtype"),
      py::arg("x_dtype"), py::arg("steps"), py::arg("warps"), py::arg("ksplit"), py::arg("device"),
      "(kernel, K slices, warps a CTA) int4_matmul_small_m launches for these arguments: kernel 0 the g_idx "
      "table path, 1 batches of 4 steps, 2 software-pipelined");
  m.def(
      "int4_matmul_small_m_t_workspace",
      [](int M, int K, int N, int device) { return mops_int4_small_m_t_workspace(M, K, N, device); },
      py::arg("M"), py::arg("K"), py::arg("N"), py::arg("device"),
      "fp32 elements of workspace int4_matmul_small_m_t needs (0: none)");
  m.def(
      "int4_matmul_small_m_t",
      [](uintptr_t dy, int dy_dtype, uintptr_t qweight, uintptr_t qzeros, uintptr_t scales, int scales_dtype,
         int M, int K, int N, int G, int group_size, uintptr_t dx, uintptr_t workspace, long long workspace_floats,
         int device, uintptr_t stream, int prefetch, bool pdl) {
        char err[256] = {0};
        int rc;
        {
          py::gil_scoped_release nogil;
          rc = mops_int4_small_m_t(reinterpret_cast<const void*>(dy), dy_dtype,
                                   reinterpret_cast<const int32_t*>(qweight),
                                   reinterpret_cast<const int32_t*>(qzeros),
                                   reinterpret_cast<const void*>(scales), scales_dtype, M, K, N, G, group_size,
                                   reinterpret_cast<void*>(dx), reinterpret_cast<float*>(workspace),
                                   workspace_floats, device, reinterpret_cast<void*>(stream), prefetch,
                                   pdl ? MOPS_INT4_PDL : 0, err, int(sizeof err));
        }
        if (rc != 0) throw std::runtime_error(std::string("int4_matmul_small_m_t: ") + err);
      },
      py::arg("dy"), py::arg("dy_dtype"), py::arg("qweight"), py::arg("qzeros"), py::arg("scales"),
      py::arg("scales_dtype"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("G"), py::arg("group_size"),
      py::arg("dx"), py::arg("workspace"), py::arg("workspace_floats"), py::arg("device"), py::arg("stream"),
      py::arg("prefetch") = 0, py::arg("pdl") = false,
      "dx (M,K) = dy (M,N) W on CUDA for M <= 16, grouped weights; pointers and the stream as integers; "
      "prefetch > 0: L2 prefetches that many 16-column steps ahead; pdl: launched as a programmatic "
      "dependent of the stream's previous grid (sm_90)");
}
