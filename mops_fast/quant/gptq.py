"""GPTQ (Frantar et al., 2022): quantize a weight column by column and spread each column's rounding error
over the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss.

For a linear layer with calibration inputs X (K x n), the loss ||W X - Q X||^2 has Hessian H = 2 X X^T / n.
With U the upper Cholesky factor of H^-1, quantizing column j to q_j and updating the remaining columns by
  W[:, j:] -= ((w_j - q_j) / U[j, j]) * U[j, j:]
is the optimal (OBS) compensation. Columns are processed in blocks; the updates of a block reach the later
columns in one matrix product ("lazy batch" updates).

Options: damping (a percentage of the mean diagonal added to H), act-order (desc_act: quantize columns in
order of decreasing H diagonal, i.e. most-activated inputs first, and record each input's group in g_idx),
group sizes (-1 = one group per row), sym/asym, 2/3/4/8 bits, static groups (group grids fixed from the
original weight before any update; off by default), and keep_zeros (pruned weights stay exactly zero: their
code is the zero point and their removal error is compensated like any rounding error), and mse (each
group's range may shrink to clip outliers when that lowers its rounding error).
"""
from __future__ import annotations

import torch

import contextlib

from mops_fast.quant.pack import num_groups
from mops_fast.quant.quantizer import QuantizedWeight, check_quant_args, find_params, quantize_codes


@contextlib.contextmanager
def small_op_threads():
    """One intra-op thread for the column loops: their ops are small (N x block), and splitting them over
    threads costs more in synchronization than it gains (20x slower seen on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def prepare_hessian(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 copy of H with dead inputs (never activated) given a unit diagonal; their weights zeroed."""
    K = W.shape[1]
    if tuple(H.shape) != (K, K):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match in_features {K}")
    H = H.detach().to(torch.float64).clone()
    if not torch.isfinite(H).all():
        raise ValueError("the Hessian has non-finite entries: calibration activations overflowed; calibrate in "
                         "float32")
    W = W.detach().float().clone()
    dead = torch.diagonal(H) == 0
    if dead.any():
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    return W, H


def inverse_hessian_cholesky(H: torch.Tensor, damp_percent: float = 0.01, max_tries: int = 10):
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 in float32, and the damping used.

    When H is not positive definite at the requested damping (too few calibration tokens for the width),
    the damping grows by 1% of the mean diagonal per try."""
    if not 0 <= damp_percent < 1:
        raise ValueError(f"damp_percent must be in [0, 1), got {damp_percent}")
    K = H.shape[0]
    mean_diag = torch.diagonal(H).mean()
    eye = torch.eye(K, dtype=H.dtype, device=H.device)
    damp = damp_percent
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if int(info) == 0:
            # H^-1 = L^-T L^-1 through a triangular solve and a product (BLAS-3; cholesky_inverse is
            # several times slower on the CPU)
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            U, info = torch.linalg.cholesky_ex(Linv.t() @ Linv, upper=True)
            if int(info) == 0:
                return U.float(), damp
        damp += 0.01
    raise ValueError(f"the Hessian is not positive definite even with damping {damp:.2f}: use more calibration "
                     "samples or a larger --damp-percent")


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                  desc_act: bool = False, damp_percent: float = 0.01, block_size: int = 128,
                  static_groups: bool = False, keep_zeros: bool = False,
                  mse: bool = False) -> tuple[QuantizedWeight, float]:
    """Quantize W (N, K) given the Hessian H (K, K). Returns the quantized weight and the OBS loss
    sum((w - q)^2 / U_jj^2) / 2 (the proxy error GPTQ minimizes)."""
    N, K = W.shape
    check_quant_args(K, bits, group_size)
    gs = K if group_size == -1 else group_size
    G = num_groups(K, group_size)
    dev = W.device
    keep = (W.detach() == 0) if keep_zeros else None  # before dead-input zeroing: only true pruned weights
    W, H = prepare_hessian(W, H)

    scales = torch.empty(G, N, device=dev)
    zeros = torch.empty(G, N, dtype=torch.int64, device=dev)
    if static_groups or group_size == -1:
        # grids fixed up front from the (unpermuted) weight
        for g in range(G):
            cols = W[:, g * gs:(g + 1) * gs]
            if keep is not None:
                cols = cols * ~keep[:, g * gs:(g + 1) * gs]
            scales[g], zeros[g] = find_params(cols, bits, sym, mse)

    perm = None
    if desc_act:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        if keep is not None:
            keep = keep[:, perm]
    U, _ = inverse_hessian_cholesky(H, damp_percent)
    del H

    # group of each (permuted) column: static grids follow the original input index
    orig = perm if perm is not None else torch.arange(K, device=dev)
    col_group = (orig // gs) if (static_groups or group_size == -1) else (torch.arange(K, device=dev) // gs)
    col_group_list = col_group.tolist()
    dynamic = not (static_groups or group_size == -1)

    codes = torch.empty(N, K, dtype=torch.int64, device=dev)
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    with small_op_threads() if dev.type == "cpu" else contextlib.nullcontext():
        _gptq_columns(W, U, keep, scales, zeros, codes, loss, col_group_list, dynamic, gs, K, bits, sym,
                      block_size, mse)

    if perm is not None:
        unperm = torch.empty_like(codes)
        unperm[:, perm] = codes
        codes = unperm
        g_idx = torch.empty(K, dtype=torch.int32, device=dev)
        g_idx[perm] = col_group.to(torch.int32)
    else:
        g_idx = col_group.to(torch.int32)
    qw = QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size, sym, desc_act)
    return qw, float(loss)


def _gptq_columns(W, U, keep, scales, zeros, codes, loss, col_group_list, dynamic, gs, K, bits, sym, block_size,
                  mse=False):
    """The GPTQ column loop (in place on W, scales, zeros, codes, loss); see gptq_quantize."""
    N = W.shape[0]
    dev = W.device
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        cnt = i2 - i1
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros(N, cnt, device=dev)
        U1 = U[i1:i2, i1:i2]
        for i in range(cnt):
            j = i1 + i
            if dynamic and j % gs == 0:
                # the group's grid from its weights as they are now, after all earlier updates
                e = min(j + gs, K)
                grp = W1[:, i:min(e - i1, cnt)]
                if e > i2:
                    beyond = W[:, i2:e] - E1[:, :i] @ U[i1:j, i2:e]
                    grp = torch.cat([grp, beyond], 1)
                if keep is not None:
                    grp = grp * ~keep[:, j:e]
                scales[j // gs], zeros[j // gs] = find_params(grp, bits, sym, mse)
            g = col_group_list[j]
            scale, zero = scales[g], zeros[g]
            w = W1[:, i]
            c = quantize_codes(w, scale, zero, bits)
            if keep is not None:
                c = torch.where(keep[:, j], zero, c)
            q = (c - zero).float() * scale
            codes[:, j] = c
            d = U1[i, i]
            err = (w - q) / d
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            E1[:, i] = err
        loss += (E1.double() ** 2).sum() / 2
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
