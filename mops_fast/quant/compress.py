"""Model-level compression: GPTQ, RTN, magnitude / Wanda / SparseGPT pruning, and pruning then GPTQ.

During a run, quantized layers stay nn.Linear holding their dequantized weights (exactly the values the
packed weight decodes to), so later blocks calibrate on what the final model computes; at the end they are
swapped for QuantLinear modules holding the packed tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mops_fast.nn.quant_linear import QuantLinear
from mops_fast.quant.gptq import gptq_quantize
from mops_fast.quant.pack import check_bits, num_groups, packed_rows
from mops_fast.quant.prune import magnitude_prune, parse_nm, sparsegpt_prune, wanda_prune
from mops_fast.quant.quantizer import QuantizedWeight
from mops_fast.quant.rtn import quantize_weight_rtn
from mops_fast.quant.sequential import compress_sequential, find_blocks
from mops_fast.quant.zero_search import zero_search_quantize

QUANT_METHODS = ("gptq", "rtn")
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
METHODS = QUANT_METHODS + PRUNE_METHODS


@dataclass
class QuantSettings:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    damp_percent: float = 0.01
    static_groups: bool = False
    true_sequential: bool = True
    block_size: int = 128
    mse: bool = False  # search a clipped range per group (see quantizer.find_params)
    zero_search: bool = False  # RTN only: grids and zeros chosen by output error (see zero_search.py)

    def validate(self):
        check_bits(self.bits)
        if self.zero_search and self.sym:
            raise ValueError("zero_search chooses asymmetric zero points: use it with --asym (the symmetric grid's "
                             "zero point is fixed)")
        if self.zero_search and self.mse:
            raise ValueError("zero_search and mse both choose the group grids: use one of them")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise ValueError(f"group_size must be -1 or a positive integer, got {self.group_size!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        return self


def block_linears(model) -> dict[str, nn.Linear]:
    """Full name -> nn.Linear for every linear layer inside the decoder blocks."""
    prefix, blocks = find_blocks(model)
    out = {}
    for bi, block in enumerate(blocks):
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                out[f"{prefix}.{bi}.{name}"] = mod
    return out


def check_quantizable(model, s: QuantSettings) -> None:
    """Fail before any work when a layer cannot be stored in the GPTQ format at these settings."""
    for name, lin in block_linears(model).items():
        try:
            packed_rows(lin.in_features, s.bits)
            packed_rows(lin.out_features, s.bits)
            num_groups(lin.in_features, s.group_size)
        except ValueError as e:
            raise ValueError(f"{name} ({lin.in_features} -> {lin.out_features}) cannot be quantized: {e}") from None


def _write_weight(lin: nn.Linear, w: torch.Tensor) -> None:
    lin.weight.data.copy_(w.to(lin.weight.dtype))


def quantize_model(model, calib: torch.Tensor | None, method: str = "gptq", settings: QuantSettings | None = None,
                   keep_zeros: bool = False, batch_size: int = 8, log=print) -> dict[str, QuantizedWeight]:
    """Quantize all decoder-block linears (GPTQ needs `calib`); weights are written back dequantized.
    Returns {layer name: QuantizedWeight}; call replace_with_quant_linear to swap the modules."""
    s = (settings or QuantSettings()).validate()
    check_quantizable(model, s)
    if s.zero_search and method != "rtn":
        raise ValueError(f"zero_search is a round-to-nearest variant (method 'rtn'), not a {method!r} option")
    if s.zero_search:
        if calib is None:
            raise ValueError("RTN with zero_search needs calibration data (it weighs the error by the inputs)")

        def zs(name, lin, stats):
            q, _ = zero_search_quantize(lin.weight.detach(), stats.hessian, s.bits, s.group_size)
            _write_weight(lin, q.dequantize())
            return q

        return compress_sequential(model, calib, zs, "hessian", s.true_sequential, batch_size, log)
    if method == "rtn":
        out = {}
        for name, lin in block_linears(model).items():
            q = quantize_weight_rtn(lin.weight.detach(), s.bits, s.group_size, s.sym, s.mse)
            _write_weight(lin, q.dequantize())
            out[name] = q
        return out
    if method != "gptq":
        raise ValueError(f"unknown quantization method {method!r}; choose one of {QUANT_METHODS}")
    if calib is None:
        raise ValueError("GPTQ needs calibration data")

    def fn(name, lin, stats):
        q, _ = gptq_quantize(lin.weight.detach(), stats.hessian, s.bits, s.group_size, s.sym, s.desc_act,
                             s.damp_percent, s.block_size, s.static_groups, keep_zeros=keep_zeros, mse=s.mse)
        _write_weight(lin, q.dequantize())
        return q

    return compress_sequential(model, calib, fn, "hessian", s.true_sequential, batch_size, log)


def prune_model(model, calib: torch.Tensor | None, method: str = "sparsegpt", sparsity: float = 0.5, nm=None,
                then_gptq: QuantSettings | None = None, damp_percent: float = 0.01, block_size: int = 128,
                true_sequential: bool = True, batch_size: int = 8, log=print):
    """Prune all decoder-block linears; with `then_gptq`, quantize each pruned layer right after pruning it
    (same Hessian; pruned weights stay zero). Returns ({name: mask}, {name: QuantizedWeight} or {})."""
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {PRUNE_METHODS}")
    nm = parse_nm(nm)
    if then_gptq is not None:
        then_gptq.validate()
        if then_gptq.zero_search:
            raise ValueError("zero_search is a round-to-nearest option; it does not apply to --then-gptq")
        check_quantizable(model, then_gptq)
    masks, quants = {}, {}

    def after(name, lin, w, mask, stats):
        masks[name] = mask
        _write_weight(lin, w)
        if then_gptq is not None:
            s = then_gptq
            q, _ = gptq_quantize(lin.weight.detach(), stats.hessian, s.bits, s.group_size, s.sym, s.desc_act,
                                 s.damp_percent, s.block_size, s.static_groups, keep_zeros=True, mse=s.mse)
            _write_weight(lin, q.dequantize())
            quants[name] = q

    if method == "magnitude" and then_gptq is None:
        for name, lin in block_linears(model).items():
            w, mask = magnitude_prune(lin.weight, sparsity, nm)
            after(name, lin, w, mask, None)
        return masks, quants
    if calib is None:
        raise ValueError(f"{method} pruning{' then GPTQ' if then_gptq else ''} needs calibration data")

    def fn(name, lin, stats):
        if method == "magnitude":
            w, mask = magnitude_prune(lin.weight, sparsity, nm)
        elif method == "wanda":
            w, mask = wanda_prune(lin.weight, stats.sq_norm, sparsity, nm)
        else:
            w, mask = sparsegpt_prune(lin.weight, stats.hessian, sparsity, nm, block_size, damp_percent)
        after(name, lin, w, mask, stats)

    kind = "sqnorm" if (method == "wanda" and then_gptq is None) else "hessian"
    seq = then_gptq.true_sequential if then_gptq is not None else true_sequential
    compress_sequential(model, calib, fn, kind, seq, batch_size, log)
    return masks, quants


def replace_with_quant_linear(model, quants: dict[str, QuantizedWeight]) -> nn.Module:
    """Swap each named nn.Linear for a QuantLinear holding its packed weight (in place; returns model)."""
    for name, q in quants.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, child)
        ql = QuantLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, bits=q.bits,
                         group_size=q.group_size, bias_dtype=lin.weight.dtype, device=lin.weight.device)
        ql.set_quantized(*q.pack(), bias=None if lin.bias is None else lin.bias.detach())
        setattr(parent, child, ql)
    return model


def sparsity_report(model) -> dict:
    """Fraction of exact zeros per decoder-block linear weight, and overall."""
    total = zero = 0
    per = {}
    dense = set(block_linears(model))
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name in dense:
            w = mod.weight
            per[name] = float((w == 0).float().mean())
            total += w.numel()
            zero += int((w == 0).sum())
        elif isinstance(mod, QuantLinear):
            w = mod.dequantize_weight()
            per[name] = float((w == 0).float().mean())
            total += w.numel()
            zero += int((w == 0).sum())
    return {"overall": zero / max(total, 1), "layers": per}
