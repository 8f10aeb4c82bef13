"""Python side of the native extension: validation, then calls into mops_fast._C / _C_cuda.

The compiled modules take raw pointers, sizes and strides (no libtorch linkage, so one binary works
with any torch). Every check lives here and raises ValueError naming the problem and the fix.

Int4 weight format (standard GPTQ in the `gptq_v2` convention: true zero points, DESIGN §3):
  qweight int32 (K/8, N)  code of (k, n) at bits 4*(k%8) of qweight[k//8, n]
  qzeros  int32 (G, N/8)  zero of column n at bits 4*(n%8) of qzeros[g, n//8]
  scales  fp16/bf16/fp32 (G, N);  g_idx int32 (K,), group of input k (any order: act-order works)
  W[n, k] = (code(k, n) - zero(g_idx[k], n)) * scale(g_idx[k], n)

API:
  available()                 the CPU extension is built and not disabled (MOPS_FAST_DISABLE_NATIVE=1)
  int4_matmul_cpu(x, ...)     y = x W^T,  x (M, K) fp32/bf16/fp16 -> (M, N) in x's dtype
  int4_matmul_t_cpu(dy, ...)  dx = dy W,  dy (M, N) -> (M, K) in dy's dtype
  cuda_available()            a CUDA device is present and mops_fast._C_cuda loads (lazily)
  int4_matmul_cuda_small_m(x, ...)  y = x W^T on CUDA for M <= 16, x fp16/bf16
  int4_matmul_t_cuda_small_m(dy, ..., group_size)  dx = dy W on CUDA for M <= 16 (grouped weights)
  int4_cpu_validated, int4_cuda_small_m_validated  the same calls without the checks, for mops_fast.ops,
                              which validates each call once itself
  int4_small_m_plan(...)      what the CUDA small-M forward launches for a shape (benchmarks, tests)
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from mops_fast.quant.pack import num_groups

__all__ = [
    "available",
    "unavailable_reason",
    "int4_matmul_cpu",
    "int4_matmul_t_cpu",
    "cuda_available",
    "cuda_kernels_loaded",
    "cuda_unavailable_reason",
    "int4_matmul_cuda_small_m",
    "int4_cpu_validated",
    "int4_cuda_small_m_validated",
    "int4_matmul_t_cuda_small_m",
    "int4_cuda_small_m_t_validated",
    "small_m_t_supports",
    "int4_small_m_plan",
    "CUDA_SMALL_M_MAX",
    "CUDA_SMALL_M_DTYPES",
]

try:  # the current stream's cudaStream_t as an int, without building a torch.cuda.Stream object a call
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # builds without CUDA (and torch versions without it)
    def _raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream

# dtype codes shared with csrc/common.h
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CUDA_SMALL_M_MAX = 16  # rows the CUDA small-M kernel takes (decode and small batches)
CUDA_SMALL_M_DTYPES = (torch.float16, torch.bfloat16)  # tensor-core inputs; fp32 goes elsewhere

_NOT_LOADED = object()
_cpu_mod: object = _NOT_LOADED
_cpu_err: str = ""
_cuda_mod: object = _NOT_LOADED
_cuda_err: str = ""


def _disabled() -> bool:
    return os.environ.get("MOPS_FAST_DISABLE_NATIVE", "").strip().lower() in ("1", "true", "yes", "on")


def _load(name: str) -> tuple[ModuleType | None, str]:
    if _disabled():
        return None, "disabled by MOPS_FAST_DISABLE_NATIVE=1"
    try:
        return importlib.import_module(f"mops_fast.{name}"), ""
    except ImportError as e:  # not built (source checkout) or built for another Python
        return None, (
            f"mops_fast.{name} could not be imported ({e}); build it with `pip install -e .` or "
            "`python setup.py build_ext --inplace`"
        )


def _cpu() -> ModuleType | None:
    global _cpu_mod, _cpu_err
    if _cpu_mod is _NOT_LOADED:
        _cpu_mod, _cpu_err = _load("_C")
    return _cpu_mod  # type: ignore[return-value]


def _cuda() -> ModuleType | None:
    # Loaded only on first use, so a wheel with CUDA code imports fine on a machine without a GPU.
    global _cuda_mod, _cuda_err
    if _cuda_mod is _NOT_LOADED:
        _cuda_mod, _cuda_err = _load("_C_cuda")
        if _cuda_mod is None and not _disabled():
            _cuda_err += " with MOPS_FAST_CUDA=1 (needs nvcc)"
    return _cuda_mod  # type: ignore[return-value]


def available() -> bool:
    """Whether the compiled CPU kernels can be used (False: callers use the PyTorch reference)."""
    return _cpu() is not None


def unavailable_reason() -> str:
    """Why available() is False ('' when it is True)."""
    _cpu()
    return _cpu_err


def cuda_available() -> bool:
    """Whether a CUDA device is present and the compiled CUDA kernels load."""
    if _disabled() or not torch.cuda.is_available():
        return False
    return _cuda() is not None


def cuda_kernels_loaded() -> bool:
    """cuda_available() for a caller that holds CUDA tensors (so torch sees a device): whether the kernels
    load and are not disabled, without asking torch again on every call."""
    return not _disabled() and _cuda() is not None


def cuda_unavailable_reason() -> str:
    if _disabled():
        return "disabled by MOPS_FAST_DISABLE_NATIVE=1"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    _cuda()
    return _cuda_err


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _check_weight(op: str, qweight, qzeros, scales, g_idx, device: torch.device) -> tuple[int, int, int]:
    """Check the packed weight; returns (K, N, G)."""
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but the activations are on {device}; move all "
                "tensors to one device"
            )
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous; pass {name}.contiguous()")
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
        if t.dtype != torch.int32:
            raise ValueError(f"{op}: {name} must be int32 (GPTQ packing), got {t.dtype}; "
                             f"use {name}.to(torch.int32)")
    if scales.dtype not in _DTYPE_CODE:
        raise ValueError(f"{op}: scales must be float16, bfloat16 or float32, got {scales.dtype}")
    if qweight.dim() != 2:
        raise ValueError(f"{op}: qweight must be 2-D (K/8, N), got shape {tuple(qweight.shape)}")
    K8, N = qweight.shape
    K = 8 * K8
    if K == 0 or N == 0:
        raise ValueError(f"{op}: empty weight, qweight shape {tuple(qweight.shape)}")
    if N % 8 != 0:
        raise ValueError(f"{op}: N={N} (out_features) must be a multiple of 8 (qzeros packs 8 "
                         "zero points per int32); pad the layer's output dim")
    if scales.dim() != 2 or scales.shape[1] != N:
        raise ValueError(f"{op}: scales must be (G, N={N}), got {tuple(scales.shape)}")
    G = scales.shape[0]
    if G == 0:
        raise ValueError(f"{op}: scales has no groups (shape {tuple(scales.shape)})")
    if tuple(qzeros.shape) != (G, N // 8):
        raise ValueError(f"{op}: qzeros must be (G, N/8) = ({G}, {N // 8}) to match scales, "
                         f"got {tuple(qzeros.shape)}")
    if tuple(g_idx.shape) != (K,):
        raise ValueError(f"{op}: g_idx must be (K,) = ({K},) for qweight {tuple(qweight.shape)}, "
                         f"got {tuple(g_idx.shape)}")
    return K, N, G


def _check_act(op: str, x, width: int, width_name: str, allowed) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: activations must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: activations must be 2-D (M, {width_name}); got shape "
                         f"{tuple(x.shape)} (flatten leading dims with x.reshape(-1, x.shape[-1]))")
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{op}: activations must be {names}, got {x.dtype}")
    if x.shape[1] != width:
        raise ValueError(f"{op}: activations have {x.shape[1]} columns but the weight needs "
                         f"{width_name}={width}")
    if x.shape[0] > 0 and x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{op}: activations need unit stride along the last dim (got strides "
                         f"{x.stride()}); pass x.contiguous()")


def _check_g_idx_range_cpu(op: str, g_idx: torch.Tensor, G: int) -> None:
    # A frozen layer passes the same g_idx tensor on every call: check it once and mark the tensor itself
    # (the mark dies with it); an in-place change bumps its version and is checked again.
    mark = (g_idx._version, G)
    if getattr(g_idx, "_mops_range_ok", None) == mark:
        return
    lo, hi = int(g_idx.min()), int(g_idx.max())
    if lo < 0 or hi >= G:
        raise ValueError(f"{op}: g_idx values must lie in [0, G={G}), got range [{lo}, {hi}]")
    g_idx._mops_range_ok = mark


def _require_cpu_module(op: str) -> ModuleType:
    mod = _cpu()
    if mod is None:
        raise RuntimeError(f"{op}: native CPU kernels unavailable: {_cpu_err}. "
                           "Check mops_fast.native.available() first or use the PyTorch reference.")
    return mod


def _require_cuda_module(op: str) -> ModuleType:
    mod = _cuda()
    if mod is None:
        raise RuntimeError(f"{op}: CUDA kernels unavailable: {_cuda_err}")
    return mod


def _int4_cpu(op: str, a, qweight, qzeros, scales, g_idx, transposed: bool) -> torch.Tensor:
    if not isinstance(a, torch.Tensor) or a.device.type != "cpu":
        dev = a.device if isinstance(a, torch.Tensor) else None
        raise ValueError(f"{op}: CPU kernel got activations on {dev}; use the CUDA path for GPU tensors")
    K, N, G = _check_weight(op, qweight, qzeros, scales, g_idx, a.device)
    width, width_name = (N, "N") if transposed else (K, "K")
    _check_act(op, a, width, width_name, (torch.float32, torch.bfloat16, torch.float16))
    return int4_cpu_validated(a, qweight, qzeros, scales, g_idx, K, N, G, transposed)


def int4_cpu_validated(a, qweight, qzeros, scales, g_idx, K: int, N: int, G: int, transposed: bool):
    """The CPU kernel call for a caller that has already validated what _int4_cpu checks (mops_fast.ops does,
    once per call, instead of twice): shapes, dtypes, one device, contiguity, unit stride of `a`. Only the
    g_idx range, which decides memory safety and is cached per tensor version, is checked here."""
    op = "int4_matmul_t_cpu" if transposed else "int4_matmul_cpu"
    _check_g_idx_range_cpu(op, g_idx, G)
    mod = _require_cpu_module(op)
    out_w = K if transposed else N
    M = a.shape[0]
    y = torch.empty((M, out_w), dtype=a.dtype, device=a.device)
    if M == 0:
        return y
    mod.int4_matmul(
        a.data_ptr(), _DTYPE_CODE[a.dtype], a.stride(0), qweight.data_ptr(), qzeros.data_ptr(),
        scales.data_ptr(), _DTYPE_CODE[scales.dtype], g_idx.data_ptr(), M, K, N, G,
        y.data_ptr(), y.stride(0), torch.get_num_threads(), transposed,
    )
    return y


def int4_matmul_cpu(x, qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """y = x W^T on the CPU straight from the packed weight; x (M, K) -> y (M, N), x's dtype."""
    return _int4_cpu("int4_matmul_cpu", x, qweight, qzeros, scales, g_idx, transposed=False)


def int4_matmul_t_cpu(dy, qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """dx = dy W (the backward to the input); dy (M, N) -> dx (M, K), dy's dtype."""
    return _int4_cpu("int4_matmul_t_cpu", dy, qweight, qzeros, scales, g_idx, transposed=True)


def int4_matmul_cuda_small_m(x, qweight, qzeros, scales, g_idx, group_size: int = 0) -> torch.Tensor:
    """y = x W^T on CUDA for M <= 16 (decode); x (M, K) fp16/bf16 -> y (M, N), x's dtype.

    Tensor-core kernel, fp32 accumulation, on torch's current stream. group_size > 0 is the caller's
    promise that g_idx == arange(K) // group_size (GPTQ without act-order; -1 means one group): the kernel
    then computes each input's group instead of reading g_idx, which saves a table it would otherwise build
    per call. g_idx values are not range checked here (that would need a device sync on every call):
    out-of-range groups are clamped.
    """
    K, N, G = _check_cuda_small_m("int4_matmul_cuda_small_m", x, "x", qweight, qzeros, scales, g_idx,
                                  transposed=False)
    return int4_cuda_small_m_validated(x, qweight, qzeros, scales, g_idx, K, N, G,
                                       _group_promise("int4_matmul_cuda_small_m", group_size, K, G))


def _check_cuda_small_m(op: str, a, name: str, qweight, qzeros, scales, g_idx, transposed: bool):
    """The checks both small-M CUDA kernels need; returns (K, N, G)."""
    if not isinstance(a, torch.Tensor) or a.device.type != "cuda":
        dev = a.device if isinstance(a, torch.Tensor) else None
        cpu = "int4_matmul_t_cpu" if transposed else "int4_matmul_cpu"
        raise ValueError(f"{op}: needs CUDA activations, got {dev}; use {cpu} on the CPU")
    K, N, G = _check_weight(op, qweight, qzeros, scales, g_idx, a.device)
    _check_act(op, a, N if transposed else K, "N" if transposed else "K", CUDA_SMALL_M_DTYPES)
    M = a.shape[0]
    if M > CUDA_SMALL_M_MAX:
        raise ValueError(f"{op}: M={M} rows; this kernel handles M <= {CUDA_SMALL_M_MAX} "
                         "(use the Triton/GEMM path for larger batches)")
    if M > 0 and not a.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; pass {name}.contiguous()")
    for nm, t in ((name, a), ("qweight", qweight), ("scales", scales), ("g_idx", g_idx)):
        if M > 0 and t.data_ptr() % 16 != 0:
            raise ValueError(f"{op}: {nm} must be 16-byte aligned (the kernel uses 16-byte loads); "
                             f"pass {nm}.clone()")
    return K, N, G


def _group_promise(op: str, group_size: int, K: int, G: int) -> int:
    """The kernel's group_size argument: 0 (read g_idx) or a size consistent with K and G."""
    if group_size == 0:
        return 0
    gs = K if group_size == -1 else group_size
    if not isinstance(group_size, int) or gs <= 0 or num_groups(K, gs) != G:
        raise ValueError(f"{op}: group_size={group_size} does not fit K={K} with G={G} groups; pass the "
                         "layer's group size (-1 for one group), or 0 to read the groups from g_idx")
    return gs


def int4_cuda_small_m_validated(x, qweight, qzeros, scales, g_idx, K: int, N: int, G: int,
                                group_size: int = 0, steps: int = 0, warps: int = 0, ksplit: int = 0,
                                prefetch: int = 0, pdl: bool = False) -> torch.Tensor:
    """The CUDA small-M kernel call for a caller that has already validated what int4_matmul_cuda_small_m
    checks (mops_fast.ops does, once per call): at decode the kernel takes microseconds, so every check
    repeated in Python shows in the token rate. group_size > 0: g_idx == arange(K) // group_size (a
    promise). steps (4: batches of 4 steps, each waited for; 22: two batches in flight, one computed while
    the other loads), warps (a CTA), ksplit (1-8 slices of K, each a CTA of one thread-block cluster on
    sm_90, grouped weights only; elsewhere one slice) and prefetch (L2 prefetches of the weight rows that
    many 4-row steps ahead of the loads, 1-64; the same results) override the launch the kernel picks
    when nonzero (launch() and plan() in csrc/cuda/int4_small_m.cu; benchmarks/tune_int4_gpu.py). pdl: launch as a
    programmatic dependent of the stream's previous kernel (sm_90; ignored elsewhere): the kernel starts,
    and may fetch weights, while that kernel finishes, and reads x only after it has, so the previous
    kernel must not write the weights."""
    mod = _require_cuda_module("int4_matmul_cuda_small_m")
    M = x.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    # the kernel sets the device itself; the stream is the one torch uses on x's device
    mod.int4_matmul_small_m(
        x.data_ptr(), _DTYPE_CODE[x.dtype], qweight.data_ptr(), qzeros.data_ptr(),
        scales.data_ptr(), _DTYPE_CODE[scales.dtype], g_idx.data_ptr(), M, K, N, G, group_size,
        y.data_ptr(), x.device.index, _raw_stream(x.device.index), steps, warps, ksplit, prefetch, pdl,
    )
    return y


# the kernels of int4_small_m_plan's first field (csrc/cuda/int4_small_m.cu, Kind)
SMALL_M_KERNELS = ("table", "batches", "pipelined")


def int4_small_m_plan(M: int, K: int, N: int, G: int, group_size: int, steps: int = 0, warps: int = 0,
                      ksplit: int = 0, dtype: torch.dtype = torch.float16,
                      scales_dtype: torch.dtype = torch.float16, device: int | None = None) -> dict:
    """What int4_cuda_small_m_validated launches with these arguments on a device: {"kernel": one of
    SMALL_M_KERNELS, "ksplit": K slices, "warps": warps a CTA}. A ksplit hint the device cannot run (below
    sm_90, the g_idx table path, no room for the cluster) shows here as 1. For benchmarks and tests."""
    mod = _require_cuda_module("int4_small_m_plan")
    dev = torch.cuda.current_device() if device is None else device
    try:
        kind, ks, w = mod.int4_matmul_small_m_plan(M, K, N, G, group_size, _DTYPE_CODE[scales_dtype],
                                                   _DTYPE_CODE[dtype], steps, warps, ksplit, dev)
    except (ValueError, KeyError) as e:
        raise ValueError(f"int4_small_m_plan: bad arguments M={M} K={K} N={N} G={G} group_size={group_size} "
                         f"steps={steps} warps={warps} ksplit={ksplit} {dtype} scales {scales_dtype}") from e
    return {"kernel": SMALL_M_KERNELS[kind], "ksplit": ks, "warps": w}


def int4_matmul_t_cuda_small_m(dy, qweight, qzeros, scales, g_idx, group_size: int) -> torch.Tensor:
    """dx = dy W on CUDA for M <= 16 (the backward to the input at decode-sized batches); dy (M, N) fp16/bf16
    -> dx (M, K), dy's dtype. Grouped weights only: group_size is the promise g_idx == arange(K) // group_size
    (-1: one group) and must be a power-of-two multiple of 8 (GPTQ's 32, 64, 128) unless there is one group;
    scales fp16 or bf16. Act-order weights take the Triton kernel (mops_fast.ops.int4_matmul_t)."""
    op = "int4_matmul_t_cuda_small_m"
    K, N, G = _check_cuda_small_m(op, dy, "dy", qweight, qzeros, scales, g_idx, transposed=True)
    gs = _group_promise(op, group_size, K, G)
    if not small_m_t_supports(scales, gs, G):
        raise ValueError(f"{op}: needs 16-bit scales and group_size a power-of-two multiple of 8 (or one "
                         f"group), got {scales.dtype} and group_size={group_size}; use mops_fast.ops.int4_matmul_t")
    return int4_cuda_small_m_t_validated(dy, qweight, qzeros, scales, K, N, G, gs)


def small_m_t_supports(scales: torch.Tensor, group_size: int, G: int) -> bool:
    """Whether the CUDA small-M backward takes these weights (see int4_matmul_t_cuda_small_m)."""
    if scales.dtype not in (torch.float16, torch.bfloat16):
        return False
    rows = group_size // 8
    return G == 1 or (group_size > 0 and group_size % 8 == 0 and rows & (rows - 1) == 0)


def int4_cuda_small_m_t_validated(dy, qweight, qzeros, scales, K: int, N: int, G: int, group_size: int,
                                  prefetch: int = 0, pdl: bool = False):
    """The CUDA small-M backward for a caller that has validated what int4_matmul_t_cuda_small_m checks.
    prefetch: L2 prefetches of the weights that many 16-column steps ahead of the loads (1-64; the same
    results); pdl: as in int4_cuda_small_m_validated (dy is read only after the previous kernel finished)."""
    mod = _require_cuda_module("int4_matmul_t_cuda_small_m")
    M = dy.shape[0]
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    if M == 0:
        return dx
    dev = dy.device.index  # a CUDA tensor's device always carries its index
    need = mod.int4_matmul_small_m_t_workspace(M, K, N, dev)
    ws = torch.empty(need, dtype=torch.float32, device=dy.device) if need else None
    mod.int4_matmul_small_m_t(
        dy.data_ptr(), _DTYPE_CODE[dy.dtype], qweight.data_ptr(), qzeros.data_ptr(), scales.data_ptr(),
        _DTYPE_CODE[scales.dtype], M, K, N, G, group_size, dx.data_ptr(), 0 if ws is None else ws.data_ptr(), need,
        dev, _raw_stream(dev), prefetch, pdl,
    )
    return dx
