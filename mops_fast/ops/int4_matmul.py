"""Int4 GPTQ matmul: y = x W^T straight from the packed weight, and its backward to the input dx = dy W.

Contract (DESIGN.md §4; the same layout the C++ kernels in mops_fast.native read):
  x        (..., K) fp16 / bf16 / fp32 activations
  qweight  int32 (K/8, N)   code of W[n, k] at bits 4j..4j+3 of qweight[k // 8, n], j = k % 8
  qzeros   int32 (G, N/8)   TRUE zero points (gptq_v2), zero of (g, n) at bits 4j.. of qzeros[g, n // 8], j = n % 8
  scales   (G, N) fp16 (or bf16 / fp32)
  g_idx    int32 (K,)       group of input k (act-order permutes it; otherwise k // group_size)
  W[n, k] = (code[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]
`group_size` > 0 is the caller's promise that g_idx == arange(K) // group_size; the kernels then read one
scale row per tile instead of gathering per input. 0 means "unknown": the kernels gather through g_idx.

This file holds the pure-PyTorch reference, the Triton kernels (dequantize tiles in registers; the whole
float weight is never materialized), the dispatch by device, and the torch custom ops with autograd
(the weight is frozen: backward returns dx only).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from mops_fast.ops.tracing import traced
from mops_fast.quant.pack import num_groups

try:  # Triton is optional: CPU installs run the reference or the C++ kernel
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "int4_matmul",
    "int4_matmul_t",
    "int4_matmul_ref",
    "int4_matmul_t_ref",
    "dequantize_int4",
    "int4_matmul_triton",
    "int4_matmul_t_triton",
    "act_order_repack",
    "check_int4_args",
    "check_int4_weight",
    "int4_matmul_checked",
    "Int4Weight",
]



def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_int4_args(qweight, qzeros, scales, g_idx) -> tuple[int, int, int]:
    """Validate the packed weight; return (K, N, G). Errors name the tensor and the expected shape."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"int4_matmul: qweight must be an int32 tensor (K/8, N), got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if N % 8:
        raise ValueError(f"int4_matmul: out_features N={N} must be a multiple of 8 (qzeros packs 8 per int32)")
    if scales.dim() != 2 or scales.shape[1] != N or not scales.is_floating_point():
        raise ValueError(f"int4_matmul: scales must be a float (G, {N}) tensor, got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    G = scales.shape[0]
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (G, N // 8):
        raise ValueError(f"int4_matmul: qzeros must be int32 ({G}, {N // 8}), got {qzeros.dtype} "
                         f"{tuple(qzeros.shape)}")
    if g_idx.dtype != torch.int32 or tuple(g_idx.shape) != (K,):
        raise ValueError(f"int4_matmul: g_idx must be int32 ({K},), got {g_idx.dtype} {tuple(g_idx.shape)}")
    devs = {t.device for t in (qweight, qzeros, scales, g_idx)}
    if len(devs) != 1:
        raise ValueError(f"int4_matmul: qweight, qzeros, scales and g_idx are on different devices {devs}")
    if not qweight.is_contiguous():  # the kernels index its words from the shape alone
        raise ValueError("int4_matmul: qweight must be contiguous; pass qweight.contiguous()")
    return K, N, G


# ----------------------------------------------------------------------------------------------------
# Reference (pure PyTorch). Also the CPU path when the C++ kernels are not built.
# ----------------------------------------------------------------------------------------------------
def _shifts(device):
    return torch.arange(0, 32, 4, dtype=torch.int32, device=device)


def _dequantize_t(qweight, qzeros, scales, g_idx, dtype) -> torch.Tensor:
    """W^T (K, N): this is the layout x @ W^T wants, so the reference never transposes."""
    sh = _shifts(qweight.device)
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    codes = ((qweight.unsqueeze(1) >> sh.view(1, 8, 1)) & 0xF).reshape(K, N)
    zeros = ((qzeros.unsqueeze(2) >> sh.view(1, 1, 8)) & 0xF).reshape(qzeros.shape[0], N)
    g = g_idx.long()
    return (codes - zeros.index_select(0, g)).to(dtype) * scales.index_select(0, g).to(dtype)


def dequantize_int4(qweight, qzeros, scales, g_idx, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight W (N, K)."""
    check_int4_args(qweight, qzeros, scales, g_idx)
    return _dequantize_t(qweight, qzeros, scales, g_idx, dtype).t()


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def int4_matmul_ref(x, qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """y = x W^T, accumulated in fp32 (fp64 for fp64 inputs), returned in x's dtype."""
    acc = _acc_dtype(x.dtype)
    wt = _dequantize_t(qweight, qzeros, scales, g_idx, acc)
    return (x.to(acc) @ wt).to(x.dtype)


def int4_matmul_t_ref(dy, qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """dx = dy W, accumulated in fp32 (fp64 for fp64 inputs), returned in dy's dtype."""
    acc = _acc_dtype(dy.dtype)
    wt = _dequantize_t(qweight, qzeros, scales, g_idx, acc)
    return (dy.to(acc) @ wt.t()).to(dy.dtype)


def act_order_repack(qweight, g_idx, group_size: int):
    """For act-order (desc_act) weights: reorder the input dim so that each group is contiguous.

    Returns (perm, qweight_sorted) with x[..., perm] @ W_sorted^T == x @ W^T and the sorted g_idx equal to
    arange(K) // group_size, so the fast grouped kernels apply. Returns None when the groups of g_idx do
    not have that shape (then the gathering kernels are used as they are)."""
    from mops_fast.quant.pack import pack_rows, unpack_rows

    if qweight.dim() != 2:
        raise ValueError(f"act_order_repack: needs qweight in GPTQ order (K/8, N), got {tuple(qweight.shape)}")
    K = g_idx.numel()
    if group_size <= 0:
        return None
    g = g_idx.long()
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], torch.arange(K, device=g.device) // group_size):
        return None
    codes = unpack_rows(qweight, 4)
    return perm, pack_rows(codes.index_select(0, perm), 4)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
if HAS_TRITON:
    # Plain functions, jitted lazily by _kernels(): Triton decides at decoration time whether a kernel is
    # compiled or interpreted (TRITON_INTERPRET), so decorating here would freeze the mode at import.
    #
    # Dequantization, MODE 1 (fp16) and 2 (bf16): OR-ing a 4-bit code into the bits of 1024.0 (fp16
    # 0x6400) or 128.0 (bf16 0x4300) gives 1024 + code (128 + code) exactly, with no int->float conversion
    # (a slow instruction on GPUs); (v - (1024 + zero)) is then an exact small integer and one multiply by
    # the scale rounds once, as the reference does. MODE 0 (fp32 activations) converts plainly.

    def _int4_fwd_kernel(
        x_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, y_ptr,
        M, N, K, GS, n_split,
        stride_xm, stride_xk, stride_ym, stride_yn,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
        ATOMIC: tl.constexpr, GROUPED: tl.constexpr, MODE: tl.constexpr, DOT: tl.constexpr,
        UNPACK: tl.constexpr,
    ):
        # y[m, n] = sum_k x[m, k] * W[n, k]; program = one (BM, BN) tile and one K slice (split-K)
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        # grouped tile order: neighbouring programs share weight tiles in L2
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gsize
        pid_n = (pid % width) // gsize

        offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        m_mask = offs_m < M
        n_mask = offs_n < N
        offs_kk = tl.arange(0, BK)
        offs_i = tl.arange(0, BK // 8)
        shifts = tl.arange(0, 8) * 4
        zshift = (offs_n % 8) * 4
        N8 = N // 8

        k_tiles = tl.cdiv(K, BK)
        per_split = tl.cdiv(k_tiles, n_split)
        k_begin = pid_k * per_split * BK
        k_end = tl.minimum(k_begin + per_split * BK, K)

        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BK):
            offs_k = k0 + offs_kk
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if UNPACK == 0:
                # packed rows, each int32 read once; the 8 codes of a word are unpacked in registers
                rows = k0 // 8 + offs_i
                qw = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :],
                             mask=(rows[:, None] < K // 8) & n_mask[None, :], other=0)
                codes = tl.reshape((qw[:, None, :] >> shifts[None, :, None]) & 0xF, (BK, BN))
            else:
                # each input row reads its word (8 rows share one, served by L1): no reshape
                qw = tl.load(qw_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :],
                             mask=k_mask[:, None] & n_mask[None, :], other=0)
                codes = (qw >> ((offs_k % 8) * 4)[:, None]) & 0xF
            if GROUPED:
                # the whole K tile lies in group k0 // GS (GS is a multiple of BK): one row of scales
                g = k0 // GS
                s = tl.load(sc_ptr + g * N + offs_n, mask=n_mask, other=0.0)[None, :]
                zw = tl.load(qz_ptr + g * N8 + offs_n // 8, mask=n_mask, other=0)
                z = ((zw >> zshift) & 0xF)[None, :]
            else:
                g = tl.load(gi_ptr + offs_k, mask=k_mask, other=0)
                kn_mask = k_mask[:, None] & n_mask[None, :]
                s = tl.load(sc_ptr + g[:, None] * N + offs_n[None, :], mask=kn_mask, other=0.0)
                zw = tl.load(qz_ptr + g[:, None] * N8 + (offs_n // 8)[None, :], mask=kn_mask, other=0)
                z = (zw >> zshift[None, :]) & 0xF
            if MODE == 1:
                v = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                zf = (z | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                w = (v - zf) * s.to(tl.float16)
            elif MODE == 2:
                v = (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                zf = (z | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                w = (v - zf) * s.to(tl.bfloat16)
            else:
                w = (codes - z).to(tl.float32) * s.to(tl.float32)
            if DOT == "":
                acc += tl.dot(x, w)
            else:
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=DOT)

        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        mask = m_mask[:, None] & n_mask[None, :]
        if ATOMIC:
            tl.atomic_add(y_ptrs, acc, mask=mask)
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    def _int4_bwd_kernel(
        dy_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, dx_ptr,
        M, N, K, GS, n_split,
        stride_dym, stride_dyn, stride_dxm, stride_dxk,
        BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
        ATOMIC: tl.constexpr, GROUPED: tl.constexpr, MODE: tl.constexpr, DOT: tl.constexpr,
        UNPACK: tl.constexpr,
    ):
        # dx[m, k] = sum_n dy[m, n] * W[n, k]; program = one (BM, BK) tile and one N slice (split-N)
        pid = tl.program_id(0)
        pid_s = tl.program_id(1)
        num_m = tl.cdiv(M, BM)
        num_k = tl.cdiv(K, BK)
        width = GROUP_M * num_k
        first_m = (pid // width) * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gsize
        pid_k = (pid % width) // gsize

        offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        offs_k = pid_k * BK + tl.arange(0, BK)
        offs_i = pid_k * (BK // 8) + tl.arange(0, BK // 8)
        m_mask = offs_m < M
        k_mask = offs_k < K
        i_mask = offs_i < K // 8
        shifts = tl.arange(0, 8) * 4
        N8 = N // 8
        if GROUPED:
            g = (pid_k * BK) // GS  # the K tile lies in one group for the whole N loop
        else:
            gk = tl.load(gi_ptr + offs_k, mask=k_mask, other=0)

        n_tiles = tl.cdiv(N, BN)
        per_split = tl.cdiv(n_tiles, n_split)
        n_begin = pid_s * per_split * BN
        n_end = tl.minimum(n_begin + per_split * BN, N)

        acc = tl.zeros((BM, BK), dtype=tl.float32)
        for n0 in range(n_begin, n_end, BN):
            offs_n = n0 + tl.arange(0, BN)
            n_mask = offs_n < N
            dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                         mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            if UNPACK == 0:
                qw = tl.load(qw_ptr + offs_i[None, :] * N + offs_n[:, None],
                             mask=n_mask[:, None] & i_mask[None, :], other=0)
                codes = tl.reshape((qw[:, :, None] >> shifts[None, None, :]) & 0xF, (BN, BK))
            else:
                qw = tl.load(qw_ptr + (offs_k // 8)[None, :] * N + offs_n[:, None],
                             mask=n_mask[:, None] & k_mask[None, :], other=0)
                codes = (qw >> ((offs_k % 8) * 4)[None, :]) & 0xF
            zshift = (offs_n % 8) * 4
            if GROUPED:
                s = tl.load(sc_ptr + g * N + offs_n, mask=n_mask, other=0.0)[:, None]
                zw = tl.load(qz_ptr + g * N8 + offs_n // 8, mask=n_mask, other=0)
                z = ((zw >> zshift) & 0xF)[:, None]
            else:
                nk_mask = n_mask[:, None] & k_mask[None, :]
                s = tl.load(sc_ptr + gk[None, :] * N + offs_n[:, None], mask=nk_mask, other=0.0)
                zw = tl.load(qz_ptr + gk[None, :] * N8 + (offs_n // 8)[:, None], mask=nk_mask, other=0)
                z = (zw >> zshift[:, None]) & 0xF
            if MODE == 1:
                v = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                zf = (z | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                w = (v - zf) * s.to(tl.float16)
            elif MODE == 2:
                v = (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                zf = (z | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                w = (v - zf) * s.to(tl.bfloat16)
            else:
                w = (codes - z).to(tl.float32) * s.to(tl.float32)
            if DOT == "":
                acc += tl.dot(dy, w)
            else:
                acc += tl.dot(dy.to(tl.float32), w.to(tl.float32), input_precision=DOT)

        dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
        mask = m_mask[:, None] & k_mask[None, :]
        if ATOMIC:
            tl.atomic_add(dx_ptrs, acc, mask=mask)
        else:
            tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)

    def _int4_dequant_kernel(
        qw_ptr, qz_ptr, sc_ptr, gi_ptr, out_ptr,
        N, K, k0, k1, n0, n1, GS, stride_o,
        BK: tl.constexpr, BN: tl.constexpr, GROUPED: tl.constexpr, MODE: tl.constexpr,
    ):
        # out[k - k0, n - n0] = W[n, k] for k in [k0, k1), n in [n0, n1): one slice of W^T (chunked path).
        # Each packed word is loaded once; nibble j of the (BK/8, BN) words is output rows 8i + j, stored
        # as one coalesced (BK/8, BN) tile per j: elementwise work with no reshape of the codes.
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        kt = k0 + pid_k * BK
        offs_i = kt // 8 + tl.arange(0, BK // 8)
        offs_n = n0 + pid_n * BN + tl.arange(0, BN)
        n_mask = offs_n < n1
        N8 = N // 8
        zshift = (offs_n % 8) * 4
        qw = tl.load(qw_ptr + offs_i[:, None] * N + offs_n[None, :],
                     mask=(offs_i * 8 < k1)[:, None] & n_mask[None, :], other=0)
        if GROUPED:  # the tile lies in group kt // GS: one row of scales and zeros
            g = kt // GS
            s = tl.load(sc_ptr + g * N + offs_n, mask=n_mask, other=0.0)[None, :]
            zw = tl.load(qz_ptr + g * N8 + offs_n // 8, mask=n_mask, other=0)
            z = ((zw >> zshift) & 0xF)[None, :]
        for j in tl.static_range(8):
            offs_k = offs_i * 8 + j
            k_mask = offs_k < k1
            codes = (qw >> (4 * j)) & 0xF
            if not GROUPED:
                g = tl.load(gi_ptr + offs_k, mask=k_mask, other=0)
                kn_mask = k_mask[:, None] & n_mask[None, :]
                s = tl.load(sc_ptr + g[:, None] * N + offs_n[None, :], mask=kn_mask, other=0.0)
                zw = tl.load(qz_ptr + g[:, None] * N8 + (offs_n // 8)[None, :], mask=kn_mask, other=0)
                z = (zw >> zshift[None, :]) & 0xF
            if MODE == 1:
                v = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                zf = (z | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                w = (v - zf) * s.to(tl.float16)
            elif MODE == 2:
                v = (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                zf = (z | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                w = (v - zf) * s.to(tl.bfloat16)
            else:
                w = (codes - z).to(tl.float32) * s.to(tl.float32)
            o_ptrs = out_ptr + (offs_k - k0)[:, None] * stride_o + (offs_n - n0)[None, :]
            tl.store(o_ptrs, w.to(out_ptr.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])


_JIT: dict = {}


def _kernels():
    """(forward, backward) kernels, decorated for the current mode (compiled, or interpreted on the CPU)."""
    mode = _interpreting()
    if mode not in _JIT:
        # M varies call to call: not specializing on it (M == 1, M % 16) saves compiles
        _JIT[mode] = (triton.jit(_int4_fwd_kernel, do_not_specialize=["M", "n_split"]),
                      triton.jit(_int4_bwd_kernel, do_not_specialize=["M", "n_split"]),
                      triton.jit(_int4_dequant_kernel, do_not_specialize=["k0", "k1", "n0", "n1"]))
    return _JIT[mode]


_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _pick_bk(group_size: int, K: int, prefs: tuple[int, ...]) -> tuple[int, int, bool]:
    """(BK, GS, grouped): the largest preferred BK whose tiles never straddle a group."""
    if group_size == -1 or (group_size > 0 and group_size >= K):
        bk = prefs[0]
        return bk, -(-K // bk) * bk, True  # one group: any multiple of BK >= K works as GS
    if group_size > 0:
        for bk in prefs:
            if group_size % bk == 0:
                return bk, group_size, True
    return prefs[-1] if prefs[-1] >= 32 else 32, 1, False


def _split(tiles: int, reduction_tiles: int, device) -> int:
    """Split the reduction when the output tiles alone cannot fill the GPU (small M)."""
    target = 2 * _sm_count(device)
    if tiles >= target or device.type != "cuda":
        return 1
    return max(1, min(reduction_tiles // 2, -(-target // tiles), 16))


# How the matmul kernels unpack a tile's codes (UNPACK): 0 reads each packed word once and reshapes its 8
# nibbles into rows; 1 has every input row read its word (8 rows share one, from L1) and shift it, with no
# reshape. On an H100 (benchmarks/results/tune_int4-*.json) 1 is faster for the backward (1.0-2.5x, all but
# one of 18 shapes: 0.95x at M = 16, 4096x4096) and for the forward from 512 rows (1.06-1.25x); 0 for the
# forward up to 64 rows (1.4-2.1x).


# fp32 activations (a tf32x3 dot, _dot): tiles with fp32 operands in shared memory and three products a
# pair, chosen as the largest of those swept that neither spill nor exceed 64 KB of shared memory on sm_80 and
# sm_90, forward and backward (benchmarks/offline_compile.py). (BM, BN, BK preferences, warps, stages) by M.
_FP32_TILES = ((16, (16, 64, (32,), 4, 2)), (64, (64, 64, (32,), 8, 2)), (None, (128, 64, (32,), 8, 2)))


def _fp32_tiles(M):
    return next(t for top, t in _FP32_TILES if top is None or M <= top)


def _fwd_config(M, N, K, group_size, device, dtype=torch.float16):
    if dtype == torch.float32:
        BM, BN, prefs, warps, stages = _fp32_tiles(M)
    elif M <= 16:
        BM, BN, prefs, warps, stages = 16, 64, (128, 64, 32), 4, 4
    elif M <= 64:
        BM, BN, prefs, warps, stages = 64, 64, (64, 32), 4, 4
    elif M <= 256:
        BM, BN, prefs, warps, stages = 64, 128, (64, 32), 4, 3
    else:
        BM, BN, prefs, warps, stages = 128, 128, (64, 32), 8, 3
    BK, GS, grouped = _pick_bk(group_size, K, prefs)
    tiles = -(-M // BM) * -(-N // BN)
    split = _split(tiles, -(-K // BK), device)
    return dict(BM=BM, BN=BN, BK=BK, GS=GS, GROUPED=grouped, SPLIT=split, GROUP_M=8, UNPACK=int(M > 64),
                num_warps=warps, num_stages=stages)


def _bwd_config(M, N, K, group_size, device, dtype=torch.float16):
    if dtype == torch.float32:
        BM, BN, prefs, warps, stages = _fp32_tiles(M)
    elif M <= 16:
        BM, BN, prefs, warps, stages = 16, 128, (64, 32), 4, 4
    elif M <= 64:
        BM, BN, prefs, warps, stages = 64, 64, (64, 32), 4, 4
    elif M <= 256:
        BM, BN, prefs, warps, stages = 64, 64, (128, 64, 32), 4, 3
    else:
        BM, BN, prefs, warps, stages = 128, 64, (128, 64, 32), 8, 3
    BK, GS, grouped = _pick_bk(group_size, K, prefs)
    tiles = -(-M // BM) * -(-K // BK)
    split = _split(tiles, -(-N // BN), device)
    return dict(BM=BM, BN=BN, BK=BK, GS=GS, GROUPED=grouped, SPLIT=split, GROUP_M=8, UNPACK=1,
                num_warps=warps, num_stages=stages)


def _check_act(x, K, name):
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"int4 matmul: {name} must be (M, {K}), got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"int4 matmul: {name} dtype {x.dtype} is not supported; use fp16, bf16 or fp32")


def _mode(dtype) -> int:
    """Dequantization mode of the kernels: 1 fp16 and 2 bf16 exponent tricks, 0 plain fp32 math. The
    Triton interpreter computes bf16 arithmetic wrongly (only loads, stores and casts are right), so bf16
    takes the fp32 math there; compiled, the bf16 path is checked by tests/test_int4_matmul_gpu.py."""
    if dtype == torch.float16:
        return 1
    if dtype == torch.bfloat16 and not _interpreting():
        return 2
    return 0


def _dot(dtype) -> str:
    """The kernels' DOT: "" multiplies the fp16/bf16 tiles as they are; otherwise both tiles go to fp32 and
    tl.dot takes this input precision. fp32 activations on a GPU take "tf32x3" (three tf32 tensor-core
    products, the small one of each pair dropped: about 2^-22 relative per product, fp32's own order;
    the dequantized weight splits exactly). An "ieee" dot there lowers to FMA and spilled 2.5-4.8 KB per
    thread at every tile config (benchmarks/offline_compile.py). Interpreted, fp32 takes "ieee", and so does
    bf16, whose dots the interpreter computes wrongly (PITFALLS.md)."""
    if _interpreting():
        return "ieee" if dtype in (torch.float32, torch.bfloat16) else ""
    return "tf32x3" if dtype == torch.float32 else ""


def int4_matmul_triton(x, qweight, qzeros, scales, g_idx, group_size: int = 0, config: dict | None = None):
    """y = x W^T with the Triton kernel. x (M, K) on the weight's device (CUDA, or CPU under
    TRITON_INTERPRET=1). `config` overrides the tile choice (tests use it to force split-K)."""
    if not HAS_TRITON:
        raise RuntimeError("int4_matmul_triton needs the triton package: pip install triton")
    K, N, _ = check_int4_args(qweight, qzeros, scales, g_idx)
    _check_act(x, K, "x")
    M = x.shape[0]
    cfg = _fwd_config(M, N, K, group_size, x.device, x.dtype)
    if config:
        cfg.update(config)
        if "BK" in config and "GS" not in config:
            cfg["BK"], cfg["GS"], cfg["GROUPED"] = _pick_bk(group_size, K, (config["BK"],))
    split = cfg["SPLIT"]
    out_dtype = torch.float32 if split > 1 else x.dtype
    y = (torch.zeros if split > 1 else torch.empty)((M, N), device=x.device, dtype=out_dtype)
    if M == 0:
        return y.to(x.dtype)
    grid = (-(-M // cfg["BM"]) * -(-N // cfg["BN"]), split)  # plain Python: triton.cdiv costs ~2 us a call
    _kernels()[0][grid](
        x, qweight, qzeros, scales, g_idx, y, M, N, K, cfg["GS"], split,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=cfg["GROUP_M"], ATOMIC=split > 1,
        GROUPED=cfg["GROUPED"], MODE=_mode(x.dtype), DOT=_dot(x.dtype), UNPACK=cfg["UNPACK"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y if y.dtype == x.dtype else y.to(x.dtype)


def int4_matmul_t_triton(dy, qweight, qzeros, scales, g_idx, group_size: int = 0, config: dict | None = None):
    """dx = dy W with the Triton kernel (the transposed tile walk over the same packed weight)."""
    if not HAS_TRITON:
        raise RuntimeError("int4_matmul_t_triton needs the triton package: pip install triton")
    K, N, _ = check_int4_args(qweight, qzeros, scales, g_idx)
    _check_act(dy, N, "dy")
    M = dy.shape[0]
    cfg = _bwd_config(M, N, K, group_size, dy.device, dy.dtype)
    if config:
        cfg.update(config)
        if "BK" in config and "GS" not in config:
            cfg["BK"], cfg["GS"], cfg["GROUPED"] = _pick_bk(group_size, K, (config["BK"],))
    split = cfg["SPLIT"]
    out_dtype = torch.float32 if split > 1 else dy.dtype
    dx = (torch.zeros if split > 1 else torch.empty)((M, K), device=dy.device, dtype=out_dtype)
    if M == 0:
        return dx.to(dy.dtype)
    grid = (-(-M // cfg["BM"]) * -(-K // cfg["BK"]), split)
    _kernels()[1][grid](
        dy, qweight, qzeros, scales, g_idx, dx, M, N, K, cfg["GS"], split,
        dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
        BM=cfg["BM"], BK=cfg["BK"], BN=cfg["BN"], GROUP_M=cfg["GROUP_M"], ATOMIC=split > 1,
        GROUPED=cfg["GROUPED"], MODE=_mode(dy.dtype), DOT=_dot(dy.dtype), UNPACK=cfg["UNPACK"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dx if dx.dtype == dy.dtype else dx.to(dy.dtype)


def dequantize_int4_slice_triton(qweight, qzeros, scales, g_idx, k0: int, k1: int, n0: int, n1: int,
                                 dtype: torch.dtype, group_size: int = 0, out: torch.Tensor | None = None):
    """W^T[k0:k1, n0:n1] (a (k1-k0, n1-n0) slice, in `dtype`) dequantized by a Triton kernel. k0 must be a
    multiple of 128 so that tiles never straddle a group."""
    K, N, _ = check_int4_args(qweight, qzeros, scales, g_idx)
    if k0 % 128 or not (0 <= k0 < k1 <= K and 0 <= n0 < n1 <= N):
        raise ValueError(f"bad slice [{k0}:{k1}, {n0}:{n1}] of W^T ({K}, {N}); k0 must be a multiple of 128")
    BK, GS, grouped = _pick_bk(group_size, K, (128, 64, 32))  # k0 % 128 == 0: tiles stay in one group
    BN = 128
    if out is None:
        out = torch.empty((k1 - k0, n1 - n0), device=qweight.device, dtype=dtype)
    grid = (-(-(k1 - k0) // BK), -(-(n1 - n0) // BN))
    _kernels()[2][grid](qweight, qzeros, scales, g_idx, out, N, K, k0, k1, n0, n1, GS, out.stride(0),
                        BK=BK, BN=BN, GROUPED=grouped, MODE=_mode(dtype), num_warps=4)
    return out


CHUNK = 2048  # weight columns (or rows) dequantized at a time by the chunked path


def int4_matmul_chunked(x, qweight, qzeros, scales, g_idx, group_size: int = 0, chunk: int = CHUNK):
    """y = x W^T by dequantizing CHUNK output columns of W^T at a time into a scratch buffer and calling
    the vendor GEMM on each: the whole float weight never exists, only a (K, CHUNK) slice. An alternative
    for large M, measured beside the fused kernel by benchmarks/bench_gptq_matmul.py."""
    K, N, _ = check_int4_args(qweight, qzeros, scales, g_idx)
    _check_act(x, K, "x")
    y = torch.empty((x.shape[0], N), device=x.device, dtype=x.dtype)
    buf = torch.empty((K, min(chunk, N)), device=x.device, dtype=x.dtype)
    for n0 in range(0, N, chunk):
        n1 = min(n0 + chunk, N)
        wt = dequantize_int4_slice_triton(qweight, qzeros, scales, g_idx, 0, K, n0, n1, x.dtype, group_size,
                                          out=buf[:, : n1 - n0])
        torch.mm(x, wt, out=y[:, n0:n1])
    return y


def int4_matmul_t_chunked(dy, qweight, qzeros, scales, g_idx, group_size: int = 0, chunk: int = CHUNK):
    """dx = dy W, dequantizing CHUNK rows of W^T (input features) at a time (see int4_matmul_chunked)."""
    K, N, _ = check_int4_args(qweight, qzeros, scales, g_idx)
    _check_act(dy, N, "dy")
    chunk = max(128, chunk // 128 * 128)
    dx = torch.empty((dy.shape[0], K), device=dy.device, dtype=dy.dtype)
    buf = torch.empty((min(chunk, K), N), device=dy.device, dtype=dy.dtype)
    for k0 in range(0, K, chunk):
        k1 = min(k0 + chunk, K)
        wt = dequantize_int4_slice_triton(qweight, qzeros, scales, g_idx, k0, k1, 0, N, dy.dtype, group_size,
                                          out=buf[: k1 - k0])
        torch.mm(dy, wt.t(), out=dx[:, k0:k1])
    return dx


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------
_IMPLS = ("auto", "ref", "triton", "native")


def _impl_override() -> str:
    impl = os.environ.get("MOPS_FAST_INT4_IMPL", "auto").lower()
    if impl not in _IMPLS:
        raise ValueError(f"MOPS_FAST_INT4_IMPL={impl!r}; choose one of {_IMPLS}")
    return impl


def _native():
    """The native module, or None when mops_fast.native cannot be imported (reference/Triton take over)."""
    try:
        from mops_fast import native
    except ImportError:
        return None
    return native


def _native_cpu():
    nat = _native()
    return nat if nat is not None and nat.available() else None


def _native_cuda_small_m():
    # asked with CUDA tensors in hand: torch sees a device
    nat = _native()
    return nat if nat is not None and nat.cuda_kernels_loaded() else None


SMALL_M_NATIVE = 16  # the native CUDA kernel covers M <= 16 (decode and small batches)
# From this many rows on, CUDA dequantizes CHUNK-wide slices of the weight with a Triton kernel and runs
# cuBLAS on each (int4_matmul_chunked): there the weight's bytes are amortized over many rows and the
# vendor GEMM's speed decides (H100: 2.6-3.3x faster than the fused kernel at M = 4096, slower at 512).
# Below it the fused kernel, which never writes the weight, is used.
CHUNKED_MIN_M = 1024
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight_fits_native(qweight, qzeros, scales, g_idx) -> bool:
    # what check_int4_args leaves to the native kernels: contiguous tensors and a scales dtype they read
    return (scales.dtype in _NATIVE_DTYPES and qweight.is_contiguous() and qzeros.is_contiguous()
            and scales.is_contiguous() and g_idx.is_contiguous())


def _native_small_m_fits(x, qweight, scales, g_idx) -> bool:
    # its contract: fp16/bf16 activations, 1 <= M <= 16, contiguous 16-byte aligned tensors
    if x.dtype not in (torch.float16, torch.bfloat16) or not 1 <= x.shape[0] <= SMALL_M_NATIVE:
        return False
    return all(t.data_ptr() % 16 == 0 for t in (x, qweight, scales, g_idx))


def _dims(qweight, scales) -> tuple[int, int, int]:
    return qweight.shape[0] * 8, scales.shape[1], scales.shape[0]


def _forward(x, qweight, qzeros, scales, g_idx, group_size):
    """y = x W^T on the best path for x's device and shape. The caller (int4_matmul) has run
    check_int4_args; the native kernels get the remaining checks here and no second validation."""
    impl = _impl_override()
    if impl == "ref":
        return int4_matmul_ref(x, qweight, qzeros, scales, g_idx)
    if x.is_cuda:
        if impl in ("auto", "native") and x.shape[0] <= SMALL_M_NATIVE:
            nat = _native_cuda_small_m()
            if nat is not None and _weight_fits_native(qweight, qzeros, scales, g_idx):
                xc = x.contiguous()
                if _native_small_m_fits(xc, qweight, scales, g_idx):
                    return nat.int4_cuda_small_m_validated(xc, qweight, qzeros, scales, g_idx, *_dims(qweight, scales),
                                                           group_size=max(int(group_size), 0),
                                                           steps=small_m_knob("fwd_steps", xc.shape[0]),
                                                           ksplit=small_m_knob("fwd_ksplit", xc.shape[0]),
                                                           prefetch=small_m_knob("fwd_prefetch", xc.shape[0]),
                                                           pdl=_pdl_enabled())
        if HAS_TRITON:
            if impl == "auto" and x.shape[0] >= CHUNKED_MIN_M:
                return int4_matmul_chunked(x, qweight, qzeros, scales, g_idx, group_size)
            return int4_matmul_triton(x, qweight, qzeros, scales, g_idx, group_size)
        return int4_matmul_ref(x, qweight, qzeros, scales, g_idx)
    if impl in ("auto", "native") and x.dtype in _NATIVE_DTYPES:
        nat = _native_cpu()
        if nat is not None and _weight_fits_native(qweight, qzeros, scales, g_idx):
            return nat.int4_cpu_validated(x.contiguous(), qweight, qzeros, scales, g_idx,
                                          *_dims(qweight, scales), transposed=False)
    return int4_matmul_ref(x, qweight, qzeros, scales, g_idx)


# Launch hints of the small-M CUDA kernels the dispatch passes (csrc/cuda/int4_small_m.cu, plan(), and
# int4_small_m_t.cu): the values
# each takes (0 is the kernel's own choice), what the dispatch passes at (M <= 8, M > 8) unless its variable
# names others, and that variable. Defaults stay the kernel's own until a GPU run decides otherwise
# (benchmarks/decide_int4.py --env writes the variables; docs/gpu_session.md).
#   fwd_steps   4 batches of 4 steps, 22 software-pipelined (the kernel's own: 22 at M <= 8, 4 above)
#   fwd_ksplit    K slices, each a CTA of one thread-block cluster (sm_90, grouped weights; the kernel's own: 1)
#   fwd_prefetch  L2 prefetch of the weight rows this many 4-row steps ahead of the loads (the kernel's own: none)
#   bwd_prefetch  the backward's, in 16-column steps (none)
SMALL_M_KNOBS = {
    "fwd_steps": {"values": (0, 4, 22), "default": (0, 0), "env": "MOPS_FAST_INT4_FWD_STEPS"},
    "fwd_ksplit": {"values": (0, 1, 2, 3, 4, 6, 8), "default": (0, 0), "env": "MOPS_FAST_INT4_FWD_KSPLIT"},
    "fwd_prefetch": {"values": (0, 4, 8, 16, 32), "default": (0, 0), "env": "MOPS_FAST_INT4_FWD_PREFETCH"},
    "bwd_prefetch": {"values": (0, 4, 8, 16, 32), "default": (0, 0), "env": "MOPS_FAST_INT4_BWD_PREFETCH"},
}
_KNOBS_PARSED: dict = {}


def small_m_knob(name: str, M: int) -> int:
    """The hint `name` (a key of SMALL_M_KNOBS) the dispatch passes a small-M CUDA kernel at M rows: its
    default unless its variable says otherwise, as "V" for every M or "V8,V16" (M <= 8, M > 8)."""
    knob = SMALL_M_KNOBS[name]
    raw = os.environ.get(knob["env"], "").strip()
    pair = _parse_knob(name, raw) if raw else knob["default"]
    return pair[0] if M <= 8 else pair[1]


def _parse_knob(name: str, raw: str) -> tuple[int, int]:
    if (name, raw) not in _KNOBS_PARSED:  # parsed once: the dispatch asks on every call
        knob = SMALL_M_KNOBS[name]
        parts = [p.strip() for p in raw.split(",")]
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            vals = []
        if len(parts) > 2 or not vals or any(v not in knob["values"] for v in vals):
            raise ValueError(f"{knob['env']}={raw!r}: give one value for every M or two (M <= 8, M > 8), each "
                             f"one of {knob['values']}")
        _KNOBS_PARSED[(name, raw)] = (vals[0], vals[-1])
    return _KNOBS_PARSED[(name, raw)]


def _pdl_enabled() -> bool:
    # Programmatic dependent launch of the small-M CUDA kernels (sm_90): each may start, and fetch its
    # weights, while the kernel before it on the stream finishes. Safe with frozen weights (only these
    # kernels trigger early, and none writes a weight). On by default: on an H200 (2026-11-28,
    # benchmarks/results/tune_int4-nvidia-h200.json) it took a median 0.945 of the forward's time and 0.956
    # of the backward's; MOPS_FAST_INT4_PDL=0 turns it off.
    return os.environ.get("MOPS_FAST_INT4_PDL", "1") != "0"


def small_m_settings() -> dict:
    """What the dispatch launches on CUDA at small M now: each hint at (M <= 8, M > 8), PDL, and whether the
    CUDA backward runs (the benchmarks record it)."""
    out = {name: [small_m_knob(name, m) for m in (1, 16)] for name in SMALL_M_KNOBS}
    return {**out, "pdl": _pdl_enabled(), "native_bwd": _native_backward_enabled()}


def _native_backward_enabled() -> bool:
    # The CUDA small-M backward (csrc/cuda/int4_small_m_t.cu) passed tests/test_native_cuda_gpu.py on an
    # H100 and ran 2.5-3.2x faster than the Triton one at M <= 16 (2026-11-27); MOPS_FAST_INT4_NATIVE_BWD=0
    # turns it off.
    return os.environ.get("MOPS_FAST_INT4_NATIVE_BWD", "1") != "0"


def _backward_input(dy, qweight, qzeros, scales, g_idx, group_size):
    impl = _impl_override()
    if impl == "ref":
        return int4_matmul_t_ref(dy, qweight, qzeros, scales, g_idx)
    if dy.is_cuda:
        if (impl in ("auto", "native") and dy.shape[0] <= SMALL_M_NATIVE and group_size > 0
                and _native_backward_enabled()):
            nat = _native_cuda_small_m()
            K, N, G = _dims(qweight, scales)
            gs = min(group_size, K)  # one group: any size >= K
            if (nat is not None and _weight_fits_native(qweight, qzeros, scales, g_idx)
                    and nat.small_m_t_supports(scales, gs, G)):
                dyc = dy.contiguous()
                if _native_small_m_fits(dyc, qweight, scales, g_idx):
                    return nat.int4_cuda_small_m_t_validated(dyc, qweight, qzeros, scales, K, N, G, gs,
                                                             prefetch=small_m_knob("bwd_prefetch", dyc.shape[0]),
                                                             pdl=_pdl_enabled())
        if HAS_TRITON:
            if impl == "auto" and dy.shape[0] >= CHUNKED_MIN_M:
                return int4_matmul_t_chunked(dy, qweight, qzeros, scales, g_idx, group_size)
            return int4_matmul_t_triton(dy, qweight, qzeros, scales, g_idx, group_size)
        return int4_matmul_t_ref(dy, qweight, qzeros, scales, g_idx)
    if impl in ("auto", "native") and dy.dtype in _NATIVE_DTYPES:
        nat = _native_cpu()
        if nat is not None and _weight_fits_native(qweight, qzeros, scales, g_idx):
            return nat.int4_cpu_validated(dy.contiguous(), qweight, qzeros, scales, g_idx,
                                          *_dims(qweight, scales), transposed=True)
    return int4_matmul_t_ref(dy, qweight, qzeros, scales, g_idx)


# Custom ops: torch.compile and autograd see one unit each.
@torch.library.custom_op("mops_fast::int4_matmul", mutates_args=())
def _int4_matmul_op(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, group_size: int) -> torch.Tensor:
    return _forward(x, qweight, qzeros, scales, g_idx, group_size)


@_int4_matmul_op.register_fake
def _(x, qweight, qzeros, scales, g_idx, group_size):
    return x.new_empty((x.shape[0], scales.shape[1]))


@torch.library.custom_op("mops_fast::int4_matmul_t", mutates_args=())
def _int4_matmul_t_op(dy: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      g_idx: torch.Tensor, group_size: int) -> torch.Tensor:
    return _backward_input(dy, qweight, qzeros, scales, g_idx, group_size)


@_int4_matmul_t_op.register_fake
def _(dy, qweight, qzeros, scales, g_idx, group_size):
    return dy.new_empty((dy.shape[0], qweight.shape[0] * 8))


def _setup_context(ctx, inputs, output):
    _, qweight, qzeros, scales, g_idx, group_size = inputs
    ctx.save_for_backward(qweight, qzeros, scales, g_idx)
    ctx.group_size = group_size


def _grad_input(ctx, dy, backward):
    """The autograd backward of both wrappers; `backward` is the op (traced) or the dispatch (eager)."""
    qweight, qzeros, scales, g_idx = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        dx = backward(dy.contiguous(), qweight, qzeros, scales, g_idx, ctx.group_size)
    return dx, None, None, None, None, None


def _backward(ctx, dy):
    return _grad_input(ctx, dy, _int4_matmul_t_op)


_int4_matmul_op.register_autograd(_backward, setup_context=_setup_context)


class _Int4Matmul(torch.autograd.Function):
    """Eager training (activations that need a gradient): the custom op's forward, context and
    backward without its dispatch, whose host time is paid by every quantized linear of the model,
    forward and backward."""

    @staticmethod
    def forward(ctx, x, qweight, qzeros, scales, g_idx, group_size):
        y = _forward(x, qweight, qzeros, scales, g_idx, group_size)
        _setup_context(ctx, (x, qweight, qzeros, scales, g_idx, group_size), y)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grad_input(ctx, dy, _backward_input)


def _check_group_promise(op: str, group_size: int, K: int, G: int) -> None:
    # A group size that disagrees with the scales' row count would make the kernels that trust it read
    # the wrong groups (or clamp to the last one) instead of failing.
    if group_size > 0 and num_groups(K, group_size) != G:
        raise ValueError(f"{op}: group_size={group_size} does not fit K={K} with G={G} scale rows; pass the "
                         "layer's group size (K for one group), or 0 to read the groups from g_idx")


class Int4Weight(NamedTuple):
    """A packed weight that passed check_int4_args and the group-size check (check_int4_weight), with its
    dimensions: a layer keeps one and hands it to int4_matmul_checked, so that decoding, which calls
    hundreds of layers a token at tiny shapes, does not validate the same frozen tensors on every call."""
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    group_size: int
    K: int
    N: int
    G: int
    shapes: tuple  # the four tensors' shapes when checked

    def holds(self, qweight, qzeros, scales, g_idx) -> bool:
        """Whether these are the very tensors checked, still of the checked shapes (a buffer replaced, or
        resized in place, needs a new check: the native kernels index the weight from its dimensions)."""
        return (qweight is self.qweight and qzeros is self.qzeros and scales is self.scales and g_idx is self.g_idx
                and (qweight.shape, qzeros.shape, scales.shape, g_idx.shape) == self.shapes)


def check_int4_weight(qweight, qzeros, scales, g_idx, group_size: int = 0, op: str = "int4_matmul") -> Int4Weight:
    """Validate a packed weight and the group-size promise once (see Int4Weight)."""
    K, N, G = check_int4_args(qweight, qzeros, scales, g_idx)
    _check_group_promise(op, group_size, K, G)
    return Int4Weight(qweight, qzeros, scales, g_idx, int(group_size), K, N, G,
                      (qweight.shape, qzeros.shape, scales.shape, g_idx.shape))


def int4_matmul(x, qweight, qzeros, scales, g_idx, group_size: int = 0) -> torch.Tensor:
    """y = x W^T for x (..., K); differentiable in x (dx = dy W). See the module docstring for the layout."""
    return int4_matmul_checked(x, check_int4_weight(qweight, qzeros, scales, g_idx, group_size))


def int4_matmul_checked(x, w: Int4Weight) -> torch.Tensor:
    """int4_matmul on a weight check_int4_weight has validated (QuantLinear keeps one a layer)."""
    K = w.K
    if x.shape[-1] != K:
        raise ValueError(f"int4_matmul: x has {x.shape[-1]} features, the weight expects K={K}")
    if x.device != w.qweight.device:
        raise ValueError(f"int4_matmul: x is on {x.device}, the weight on {w.qweight.device}; move one of them")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    args = (w.qweight, w.qzeros, w.scales, w.g_idx, w.group_size)
    if not traced(x2):
        # Decoding calls this hundreds of times per token at tiny shapes, where the custom op's dispatch
        # costs about as much as the kernel; outside compilation the op adds nothing: without a gradient
        # the kernel is called directly, with one through a plain autograd.Function.
        if torch.is_grad_enabled() and x2.requires_grad:
            y = _Int4Matmul.apply(x2, *args)
        else:
            y = _forward(x2, *args)
    else:
        y = _int4_matmul_op(x2, *args)
    return y.reshape(*lead, w.N)


def int4_matmul_t(dy, qweight, qzeros, scales, g_idx, group_size: int = 0) -> torch.Tensor:
    """dx = dy W for dy (..., N) (the backward of int4_matmul, exposed for tests and benchmarks)."""
    w = check_int4_weight(qweight, qzeros, scales, g_idx, group_size, op="int4_matmul_t")
    K, N = w.K, w.N
    if dy.shape[-1] != N:
        raise ValueError(f"int4_matmul_t: dy has {dy.shape[-1]} features, the weight has N={N}")
    if dy.device != qweight.device:
        raise ValueError(f"int4_matmul_t: dy is on {dy.device}, the weight on {qweight.device}; move one of them")
    lead = dy.shape[:-1]
    dx = _int4_matmul_t_op(dy.reshape(-1, N), qweight, qzeros, scales, g_idx, int(group_size))
    return dx.reshape(*lead, K)
