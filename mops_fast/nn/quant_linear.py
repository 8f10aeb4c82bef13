"""QuantLinear: a frozen GPTQ-quantized linear layer, y = x W^T + b straight from the packed weight.

Buffers follow the standard GPTQ layout in memory (see mops_fast/quant/pack.py): qweight int32
(K*bits/32, N), qzeros int32 (G, N*bits/32) holding TRUE zero points (gptq_v2), scales (G, N) fp16, g_idx
int32 (K,), optional bias (N,). The weight has no gradient; backward gives dx = dy W only, which is all that
training prompts and gates on a frozen backbone needs. 4-bit layers run the fused kernels
(mops_fast.ops.int4_matmul); 2/3/8-bit layers dequantize (reference path).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mops_fast.ops.int4_matmul import act_order_repack, check_int4_weight, int4_matmul, int4_matmul_checked
from mops_fast.ops.tracing import traced
from mops_fast.quant.pack import SUPPORTED_BITS, default_g_idx, dequantize, num_groups, packed_rows


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, bits: int = 4,
                 group_size: int = 128, scales_dtype: torch.dtype = torch.float16,
                 bias_dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantLinear: {bits}-bit weights are not supported; use one of {SUPPORTED_BITS}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        G = num_groups(in_features, group_size)
        kw = packed_rows(in_features, bits)  # raises when K does not fill whole packing blocks
        nw = packed_rows(out_features, bits)
        self.register_buffer("qweight", torch.zeros(kw, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(G, nw, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=scales_dtype, device=device))
        self.register_buffer("g_idx", default_g_idx(in_features, group_size, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None
        self._invalidate()

    # -- derived state ------------------------------------------------------------------------------
    def _invalidate(self):
        self._trivial = None  # (the g_idx checked, whether it is arange(K) // group_size): checked lazily
        self._sorted = None  # (qweight, g_idx, their act-order repack for the CUDA kernels or None)
        self._checked = None  # the 4-bit weight as int4_matmul validated it (ops.int4_matmul.Int4Weight)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._invalidate()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._invalidate()
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")

    @property
    def weight_group_size(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    def has_trivial_g_idx(self) -> bool | None:
        """Whether g_idx is arange(K) // group_size (the kernels then compute groups from the row), checked
        once per g_idx tensor; None while tracing before any eager call has checked it (the check reads
        the tensor's values, which a graph cannot branch on)."""
        g = self._buffers["g_idx"]
        known = self._trivial
        if known is None or known[0] is not g:
            if traced(g):
                return None
            ref = default_g_idx(self.in_features, self.group_size, device=g.device)
            known = self._trivial = (g, bool(torch.equal(g, ref)))
        return known[1]

    @torch.no_grad()
    def set_quantized(self, qweight, qzeros, scales, g_idx, bias=None):
        """Copy packed tensors (qzeros with true zero points) in, checking their shapes."""
        for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
            buf = getattr(self, name)
            if tuple(t.shape) != tuple(buf.shape):
                raise ValueError(f"QuantLinear.set_quantized: {name} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(buf.shape)}")
            buf.copy_(t)
        if bias is not None:
            if self.bias is None:
                raise ValueError("QuantLinear.set_quantized: got a bias for a layer built with bias=False")
            self.bias.copy_(bias)
        self._invalidate()

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight W (N, K)."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            y = self._forward_int4(x)
        else:
            y = F.linear(x, self.dequantize_weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _forward_int4(self, x):
        # Buffers straight from _buffers: nn.Module.__getattr__ costs about 0.6 us a lookup on this CPU, and
        # a decode step makes four a layer (2026-11-28: the cached weight's check from 3.8 to 0.6 us)
        b = self._buffers
        qweight, qzeros, scales, g_idx = b["qweight"], b["qzeros"], b["scales"], b["g_idx"]
        if self.has_trivial_g_idx():  # None (unknown while tracing) falls through to the g_idx path
            w = self._checked
            if w is None or not w.holds(qweight, qzeros, scales, g_idx):
                w = self._checked = check_int4_weight(qweight, qzeros, scales, g_idx, self.weight_group_size)
            return int4_matmul_checked(x, w)
        if x.is_cuda and not traced(x):
            # act-order: sort the input dim by group once (per qweight and g_idx), so that the GPU kernels
            # read one scale row per tile. Not while tracing: the sort reads g_idx's values
            known = self._sorted
            if known is None or known[0] is not qweight or known[1] is not g_idx:
                rep = act_order_repack(qweight, g_idx, self.weight_group_size)
                if rep is not None:
                    rep = (*rep, default_g_idx(self.in_features, self.group_size, device=x.device))
                known = self._sorted = (qweight, g_idx, rep)
            if known[2] is not None:
                perm, qweight_sorted, g_sorted = known[2]
                return int4_matmul(x.index_select(-1, perm), qweight_sorted, qzeros, scales, g_sorted,
                                   self.weight_group_size)
        # groups read from g_idx (any order; also a traced call that could not check it)
        return int4_matmul(x, qweight, qzeros, scales, g_idx, 0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, sym: bool = True):
        """Round-to-nearest quantization of a dense nn.Linear (a quick baseline; GPTQ lives in quant.gptq)."""
        from mops_fast.quant.rtn import quantize_weight_rtn

        q = quantize_weight_rtn(linear.weight.detach(), bits=bits, group_size=group_size, sym=sym)
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, bits=bits,
                    group_size=group_size, device=linear.weight.device)
        layer.set_quantized(*q.pack(), bias=None if linear.bias is None else linear.bias.detach())
        return layer
