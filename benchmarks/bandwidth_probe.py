"""How fast a plain streaming kernel reads an int4 weight in a given order: the floor the small-M
kernels are measured against.

Every small-M CUDA variant timed on an H100 so far lands at 1.2-1.6 TB/s of weights. A kernel that only
reads qweight, in the order a small-M CTA reads it (GPTQ order: 32 columns = 128 bytes of each of the
K/8 rows, rows 4 N bytes apart; tiled order: the same words contiguous, native.tile_qweight), and adds
the words up, says which limit that is: if it reads GPTQ order near the fp16 matmul's 2.6-3 TB/s, the
kernels' structure is what holds them; if it reads GPTQ order slowly and tiled order fast, the order is.

`read_sum(q, K, N, order, ksplit)` launches one program a 32-column tile (times ksplit slices of K); its
int32 sums (wrapping) add up to the sum of all words, which the caller can check. Timed by
benchmarks/tune_int4_gpu.py (rows `read[order=...,ksplit=...]`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 32  # columns a small-M CTA owns (native.TILE_N)
ORDERS = ("gptq", "tiled")


@triton.jit
def _read_kernel(q_ptr, out_ptr, R, N, rows_per_split, TILE_STRIDE, ROW_STRIDE, BR: tl.constexpr):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.arange(0, 32)
    rows = tl.arange(0, BR)
    col_ok = tile * 32 + cols < N
    base = q_ptr + tile * TILE_STRIDE + cols[None, :]
    r_begin = split * rows_per_split
    r_end = tl.minimum(R, r_begin + rows_per_split)
    acc = tl.zeros((BR, 32), dtype=tl.int32)
    for r0 in range(r_begin, r_end, BR):
        r = r0 + rows
        ok = (r[:, None] < r_end) & col_ok[None, :]
        acc += tl.load(base + r[:, None] * ROW_STRIDE, mask=ok, other=0)
    tl.store(out_ptr + tile * tl.num_programs(1) + split, tl.sum(tl.sum(acc, axis=1), axis=0))


def read_sum(q: torch.Tensor, K: int, N: int, order: str = "gptq", ksplit: int = 1, block_rows: int = 64,
             num_warps: int = 4) -> torch.Tensor:
    """int32 partial sums (one a program) of every word of q: (K/8, N) in GPTQ order, or
    (ceil(N/32), K/8, 32) in the tiled order."""
    if order not in ORDERS:
        raise ValueError(f"read_sum: order {order!r}; choose one of {ORDERS}")
    R = K // 8
    tiles = -(-N // TILE)
    want = (R, N) if order == "gptq" else (tiles, R, TILE)
    if q.dtype != torch.int32 or tuple(q.shape) != want or not q.is_contiguous():
        raise ValueError(f"read_sum: need a contiguous int32 {want} for order {order!r}, got {q.dtype} "
                         f"{tuple(q.shape)}")
    if ksplit < 1:
        raise ValueError(f"read_sum: ksplit must be >= 1, got {ksplit}")
    rows_per_split = -(-R // ksplit)
    tile_stride, row_stride = (TILE, N) if order == "gptq" else (R * TILE, TILE)
    out = torch.empty(tiles * ksplit, dtype=torch.int32, device=q.device)
    _read_kernel[(tiles, ksplit)](q, out, R, N, rows_per_split, tile_stride, row_stride, BR=block_rows,
                                  num_warps=num_warps)
    return out


def wrapped_sum(t: torch.Tensor) -> int:
    """The sum of an int32 tensor modulo 2^32, as a signed int32 value (what the kernel's sums add up to)."""
    s = int(t.to(torch.int64).sum().item()) & 0xFFFFFFFF
    return s - (1 << 32) if s >= 1 << 31 else s
