"""Zero-point search: round-to-nearest codes, with each group's grid and integer zero point chosen to minimize
the layer's output error tr(E H E^T) (E = dequantized - original weight, H = X X^T of the calibration inputs).

Why: a checkpoint dequantized from Q4_1 (the shipped SmolLM2) has every 32-block of inputs exactly on a
16-level grid with a *float* minimum (`grid_check`). The GPTQ format stores an *integer* zero point, so
even with the right step every block keeps a constant offset: rounding the float zero down or up leaves
-f or (1 - f) steps on every weight of the block. Nearest rounding always takes the smaller one, whatever
its sign; the output error, however, is a sum of these offsets over groups weighted by the activations,
and choosing the direction per group lets them cancel. The search is a coordinate descent over groups,
per output row, among three candidates per group:
  nearest   the ordinary RTN grid over [min(w, 0), max(w, 0)] (the start: never worse than RTN)
  floor/ceil  a grid anchored at the group's own minimum (codes exact for on-grid weights), with the
            float zero rounded down / up (offered only when that zero fits the code range)
Each step keeps a candidate only if it lowers the row's output error, so the proxy loss falls
monotonically. The result is an ordinary asymmetric GPTQ-format checkpoint (fp16 scales, integer zeros,
trivial g_idx).
"""
from __future__ import annotations

import torch

from mops_fast.quant.gptq import prepare_hessian
from mops_fast.quant.pack import default_g_idx, num_groups
from mops_fast.quant.quantizer import (
    _FP16_TINY,
    QuantizedWeight,
    check_quant_args,
    dequant_codes,
    find_params,
)


def _candidates(w: torch.Tensor, bits: int):
    """[(scale (N,), zero (N,), code_zero (N,), valid (N,) bool)] for one group's columns w (N, gs): codes are
    clamp(round(w / scale + code_zero)), dequantized with the integer zero."""
    maxq = 2**bits - 1
    s0, z0 = find_params(w, bits, sym=False)
    out = [(s0, z0, z0.double(), torch.ones_like(z0, dtype=torch.bool))]
    lo, hi = w.min(1).values, w.max(1).values
    s = ((hi - lo) / maxq).clamp(min=_FP16_TINY, max=65504.0).half().float()
    zr = (-lo / s).double()
    for z in (torch.floor(zr), torch.ceil(zr)):
        ok = (z >= 0) & (z <= maxq) & (hi > lo)
        out.append((s, z.clamp(0, maxq).to(torch.int64), zr, ok))
    return out


def _round_codes(w: torch.Tensor, scale: torch.Tensor, code_zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of w (rows, cols) on a grid whose code zero may be fractional (the anchored candidates)."""
    return torch.round(w.double() / scale[:, None] + code_zero[:, None]).clamp(0, 2**bits - 1).to(torch.int64)


@torch.no_grad()
def zero_search_quantize(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128,
                         max_sweeps: int = 8) -> tuple[QuantizedWeight, dict]:
    """Quantize W (N, K) asymmetrically given H (K, K). Returns the quantized weight and
    {"loss_nearest", "loss", "sweeps", "changed"}: tr(E H E^T) / N before (plain RTN) and after the search."""
    if max_sweeps < 0:
        raise ValueError(f"max_sweeps must be >= 0, got {max_sweeps}")
    N, K = W.shape
    check_quant_args(K, bits, group_size)
    gs = K if group_size == -1 else group_size
    G = num_groups(K, group_size)
    W, H64 = prepare_hessian(W, H)
    H = H64.float()
    del H64
    dev = W.device

    # per group, the candidates stacked along a leading dim C: scales, zeros, valid (C, N); codes, errors
    # (C, N, gs)
    sl = [slice(g * gs, min((g + 1) * gs, K)) for g in range(G)]
    cands = []
    for s in sl:
        rows_of = []
        for scale, zero, czero, ok in _candidates(W[:, s], bits):
            c = _round_codes(W[:, s], scale, czero, bits)
            rows_of.append((scale, zero, c, ok, dequant_codes(c, scale, zero) - W[:, s]))
        cands.append(tuple(torch.stack(x) for x in zip(*rows_of)))

    choice = torch.zeros(G, N, dtype=torch.int64, device=dev)  # start: nearest everywhere (plain RTN)
    E = torch.cat([cands[g][4][0] for g in range(G)], 1)
    EH = E @ H
    loss0 = float((E * EH).sum()) / N
    rows = torch.arange(N, device=dev)
    sweeps = changed_total = 0
    for sweeps in range(1, max_sweeps + 1):
        changed = 0
        for g, s in enumerate(sl):
            valid, errs = cands[g][3], cands[g][4]
            d = errs - E[:, s]  # (C, N, gs)
            gains = 2 * (d * EH[:, s]).sum(-1) + ((d @ H[s, s]) * d).sum(-1)  # (C, N); current choice: 0
            gains = torch.where(valid, gains, torch.full_like(gains, float("inf")))
            best = gains.argmin(0)
            move = (best != choice[g]) & (gains[best, rows] < -1e-9 * (EH[:, s].abs().sum(1) + 1e-30))
            if not move.any():
                continue
            step = torch.where(move[:, None], d[best, rows], torch.zeros_like(E[:, s]))
            E[:, s] += step
            EH += step @ H[s, :]
            choice[g] = torch.where(move, best, choice[g])
            changed += int(move.sum())
        changed_total += changed
        if changed == 0:
            break
    loss = float((E * (E @ H)).sum()) / N  # recomputed: no drift from the running updates

    pick = [tuple(x[choice[g], rows] for x in cands[g][:3]) for g in range(G)]
    scales = torch.stack([p[0] for p in pick])
    zeros = torch.stack([p[1] for p in pick])
    codes = torch.cat([p[2] for p in pick], 1)
    qw = QuantizedWeight(codes, scales, zeros, default_g_idx(K, group_size, dev), bits, group_size, sym=False)
    return qw, {"loss_nearest": loss0, "loss": loss, "sweeps": sweeps, "changed": changed_total}
