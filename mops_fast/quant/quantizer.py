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


def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of w (rows, cols): returns (scale (rows,) fp32, zero (rows,) int64)."""
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)  # an all-zero row (e.g. pruned) still needs a valid grid
    xmin = torch.where(flat, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(flat, torch.full_like(xmax, 1.0), xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=_FP16_TINY, max=65504.0).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq).to(torch.int64)
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
