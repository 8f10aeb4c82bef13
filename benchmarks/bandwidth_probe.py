"""How fast a plain streaming kernel reads an int4 weight: the floor the small-M kernels are measured
against.

A kernel that only reads qweight, in the order a small-M CTA reads it (32 columns = 128 bytes of each of the
K/8 rows, rows 4 N bytes apart), and adds the words up, says how far the kernels' structure keeps them from
what the weight bytes allow. (On an H200, 2026-11-28, it read a 4096x11008 weight at 2.97 TB/s with K split
4 ways and 1.95 unsplit; a tiled order, each tile's words contiguous, changed nothing and was dropped.)

`read_sum(q, K, N, ksplit)` launches one program a 32-column tile (times ksplit slices of K); its int32
sums (wrapping) add up to the sum of all words, which the caller can check. Timed by
benchmarks/tune_int4_gpu.py (rows `read[ksplit=...]`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 32  # columns a small-M CTA owns (csrc/cuda/int4_small_m.cu)


@triton.jit
def _read_kernel(q_ptr, out_ptr, R, N, rows_per_split, BR: tl.constexpr):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.arange(0, 32)
    rows = tl.arange(0, BR)
    col_ok = tile * 32 + cols < N
    base = q_ptr + tile * 32 + cols[None, :]
    r_begin = split * rows_per_split
    r_end = tl.minimum(R, r_begin + rows_per_split)
    acc = tl.zeros((BR, 32), dtype=tl.int32)
    for r0 in range(r_begin, r_end, BR):
        r = r0 + rows
        ok = (r[:, None] < r_end) & col_ok[None, :]
        acc += tl.load(base + r[:, None] * N, mask=ok, other=0)
    tl.store(out_ptr + tile * tl.num_programs(1) + split, tl.sum(tl.sum(acc, axis=1), axis=0))


def read_sum(q: torch.Tensor, K: int, N: int, ksplit: int = 1, block_rows: int = 64,
             num_warps: int = 4) -> torch.Tensor:
    """int32 partial sums (one a program) of every word of q (K/8, N)."""
    R = K // 8
    tiles = -(-N // TILE)
    if q.dtype != torch.int32 or tuple(q.shape) != (R, N) or not q.is_contiguous():
        raise ValueError(f"read_sum: need a contiguous int32 {(R, N)}, got {q.dtype} {tuple(q.shape)}")
    if ksplit < 1:
        raise ValueError(f"read_sum: ksplit must be >= 1, got {ksplit}")
    rows_per_split = -(-R // ksplit)
    out = torch.empty(tiles * ksplit, dtype=torch.int32, device=q.device)
    _read_kernel[(tiles, ksplit)](q, out, R, N, rows_per_split, BR=block_rows, num_warps=num_warps)
    return out


def wrapped_sum(t: torch.Tensor) -> int:
    """The sum of an int32 tensor modulo 2^32, as a signed int32 value (what the kernel's sums add up to)."""
    s = int(t.to(torch.int64).sum().item()) & 0xFFFFFFFF
    return s - (1 << 32) if s >= 1 << 31 else s
