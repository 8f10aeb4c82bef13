"""The uniform quantization grid shared by RTN and GPTQ: per-group scale and zero point, codes, packing.

Asymmetric: the grid spans [min(w, 0), max(w, 0)] with an integer zero point. Symmetric: it spans
[-max|w|, max|w|] and the zero point is the middle code 2**(bits-1) (8 for 4 bits), as GPTQ tools store it.
Scales are rounded to fp16 before the codes are chosen, because the checkpoint stores fp16 scales: the
error GPTQ compensates is then the error of the weights the model will really use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mops_fast.quant.pack import check_bits, num_groups, pack_gptq

_FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): a scale must not round to zero


def _grid(xmin, xmax, bits, sym):
    maxq = 2**bits - 1
    scale = ((xmax - xmin) / maxq).clamp(min=_FP16_TINY, max=65504.0).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq).to(torch.int64)
    return scale, zero


def find_params(w: torch.Tensor, bits: int, sym: bool, mse: bool = False, grid: int = 100,
                max_shrink: float = 0.8, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of w (rows, cols): returns (scale (rows,) fp32, zero (rows,) int64).

    mse: also try ranges shrunk by 1 - i/grid (i < max_shrink * grid) and keep, per row, the one with the
    least sum |w - q|^norm: clipping a few outliers buys a finer grid for all other weights."""
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)  # an all-zero row (e.g. pruned) still needs a valid grid
    xmin = torch.where(flat, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(flat, torch.full_like(xmax, 1.0), xmax)
    scale, zero = _grid(xmin, xmax, bits, sym)
    if not mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        s1, z1 = _grid(p * xmin, p * xmax, bits, sym)
        err = (dequant_codes(quantize_codes(w, s1, z1, bits), s1, z1) - w).abs_().pow_(norm).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of w (rows, ...) on the grid of each row: clamp(round(w / scale) + zero, 0, maxq)."""
    maxq = 2**bits - 1
    shape = (-1,) + (1,) * (w.dim() - 1)
    return (torch.round(w / scale.view(shape)) + zero.view(shape)).clamp(0, maxq).to(torch.int64)


def dequant_codes(codes, scale, zero):
    shape = (-1,) + (1,) * (codes.dim() - 1)
    return (codes - zero.view(shape)).float() * scale.view(shape)


@dataclass
class QuantizedWeight:
    """A quantized weight in unpacked form: codes (N, K) in the original input order, per-group scales and
    zero points (G, N), and g_idx (K,) mapping each input to its group."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    desc_act: bool = False

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return (self.codes - self.zeros.t()[:, g]).float() * self.scales.float().t()[:, g]

    def pack(self, scales_dtype: torch.dtype = torch.float16):
        """(qweight, qzeros with true zero points, scales, g_idx) in the GPTQ layout."""
        return pack_gptq(self.codes, self.zeros, self.scales, self.g_idx, self.bits, scales_dtype)


def check_quant_args(in_features: int, bits: int, group_size: int) -> None:
    check_bits(bits)
    num_groups(in_features, group_size)  # validates group_size
