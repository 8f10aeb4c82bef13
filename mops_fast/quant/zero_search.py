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


def round_codes(w: torch.Tensor, scale: torch.Tensor, code_zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of w (rows, ...) on a grid whose code zero may be fractional (the anchored candidates)."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    return (torch.round(w.double() / scale.view(shape) + code_zero.view(shape))).clamp(0, 2**bits - 1).to(torch.int64)


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

    cands, sl = [], []
    for g in range(G):
        s = slice(g * gs, min((g + 1) * gs, K))
        sl.append(s)
        cs = []
        for scale, zero, czero, ok in _candidates(W[:, s], bits):
            codes = round_codes(W[:, s], scale, czero, bits)
            err = dequant_codes(codes, scale, zero) - W[:, s]
            cs.append((scale, zero, codes, ok, err))
        cands.append(cs)

    choice = torch.zeros(G, N, dtype=torch.int64, device=dev)  # start: nearest everywhere (plain RTN)
    E = torch.cat([cands[g][0][4] for g in range(G)], 1)
    EH = E @ H
    loss0 = float((E * EH).sum()) / N
    rows = torch.arange(N, device=dev)
    sweeps = changed_total = 0
    for sweeps in range(1, max_sweeps + 1):
        changed = 0
        for g in range(G):
            s = sl[g]
            Hgg = H[s, s]
            cur = E[:, s]
            gains = []
            for (_, _, _, ok, err) in cands[g]:
                d = err - cur
                gain = 2 * (d * EH[:, s]).sum(1) + ((d @ Hgg) * d).sum(1)
                gains.append(torch.where(ok, gain, torch.full_like(gain, float("inf"))))
            gains = torch.stack(gains)  # (C, N); the current choice has gain 0
            best = gains.argmin(0)
            move = (best != choice[g]) & (gains[best, rows] < -1e-9 * (EH[:, s].abs().sum(1) + 1e-30))
            if not move.any():
                continue
            new = torch.stack([c[4] for c in cands[g]])[best, rows]  # (N, gs)
            d = torch.where(move[:, None], new - cur, torch.zeros_like(cur))
            E[:, s] += d
            EH += d @ H[s, :]
            choice[g] = torch.where(move, best, choice[g])
            changed += int(move.sum())
        changed_total += changed
        if changed == 0:
            break
    loss = float((E * (E @ H)).sum()) / N  # recomputed: no drift from the running updates

    codes = torch.empty(N, K, dtype=torch.int64, device=dev)
    scales = torch.empty(G, N, device=dev)
    zeros = torch.empty(G, N, dtype=torch.int64, device=dev)
    for g in range(G):
        c = choice[g]
        scales[g] = torch.stack([x[0] for x in cands[g]])[c, rows]
        zeros[g] = torch.stack([x[1] for x in cands[g]])[c, rows]
        codes[:, sl[g]] = torch.stack([x[2] for x in cands[g]])[c, rows]
    qw = QuantizedWeight(codes, scales, zeros, default_g_idx(K, group_size, dev), bits, group_size, sym=False)
    return qw, {"loss_nearest": loss0, "loss": loss, "sweeps": sweeps, "changed": changed_total}
