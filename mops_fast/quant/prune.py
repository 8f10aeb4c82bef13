"""Pruning of linear weights: magnitude, Wanda and SparseGPT; unstructured ratios and N:M (e.g. 2:4).

- magnitude: drop the smallest |W| of the layer (one threshold per layer; N:M within each group of M inputs).
- Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2 (input activation norm over the calibration tokens),
  compared within each output row; no weight update.
- SparseGPT (Frantar & Alistarh, 2023): the OBS update of GPTQ with "set to zero" in place of "round":
  columns are processed left to right, the mask of each block of columns is chosen by w^2 / [H^-1]_jj^2
  (adaptive across rows), and each removed weight's error is spread over the later columns.
N:M means N weights kept in every M consecutive inputs of a row (2:4: half of them, the GPU sparse format).
Every function returns (pruned weight (N, K) float32, mask (N, K) bool, True where a weight was removed).
"""
from __future__ import annotations

import torch

import contextlib

from mops_fast.quant.gptq import inverse_hessian_cholesky, prepare_hessian, small_op_threads


def parse_nm(nm) -> tuple[int, int] | None:
    """'2:4' -> (2, 4) (keep 2 of every 4); None/'' -> None."""
    if nm is None or nm == "" or nm is False:
        return None
    if isinstance(nm, (tuple, list)):
        n, m = (int(v) for v in nm)
    else:
        try:
            n, m = (int(v) for v in str(nm).split(":"))
        except ValueError:
            raise ValueError(f"N:M sparsity {nm!r} is not of the form N:M (e.g. 2:4 keeps 2 of every 4 weights)")
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity {n}:{m} needs 0 < N < M (N weights kept in every M)")
    return n, m


def _check_sparsity(sparsity: float, nm) -> None:
    if nm is None and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def _check_nm(K: int, nm) -> None:
    if nm is not None and K % nm[1]:
        raise ValueError(f"N:M sparsity {nm[0]}:{nm[1]} needs in_features ({K}) to be a multiple of {nm[1]}")


def _nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Within each group of m consecutive inputs of a row, mark the m - n lowest scores."""
    N, K = score.shape
    s = score.reshape(N, K // m, m)
    idx = torch.topk(s, m - n, dim=2, largest=False).indices
    mask = torch.zeros_like(s, dtype=torch.bool)
    mask.scatter_(2, idx, True)
    return mask.reshape(N, K)


def _lowest(score: torch.Tensor, k: int, dim: int | None) -> torch.Tensor:
    """Mask of the k lowest scores over the whole tensor (dim None) or along dim (per row), ties broken by
    topk, so the count is exact."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k <= 0:
        return mask
    if dim is None:
        idx = torch.topk(score.flatten(), k, largest=False).indices
        mask.view(-1)[idx] = True
    else:
        idx = torch.topk(score, k, dim=dim, largest=False).indices
        mask.scatter_(dim, idx, True)
    return mask


@torch.no_grad()
def magnitude_prune(W: torch.Tensor, sparsity: float = 0.5, nm=None):
    nm = parse_nm(nm)
    _check_sparsity(sparsity, nm)
    _check_nm(W.shape[1], nm)
    W = W.detach().float()
    score = W.abs()
    mask = _nm_mask(score, *nm) if nm else _lowest(score, int(W.numel() * sparsity), None)
    return W.masked_fill(mask, 0.0), mask


@torch.no_grad()
def wanda_prune(W: torch.Tensor, sq_norm: torch.Tensor, sparsity: float = 0.5, nm=None):
    """sq_norm: (K,) sum of squared input activations per input feature over the calibration tokens."""
    nm = parse_nm(nm)
    _check_sparsity(sparsity, nm)
    N, K = W.shape
    _check_nm(K, nm)
    if tuple(sq_norm.shape) != (K,):
        raise ValueError(f"wanda_prune: activation norms of shape {tuple(sq_norm.shape)}, expected ({K},)")
    W = W.detach().float()
    score = W.abs() * sq_norm.float().clamp(min=0).sqrt().to(W.device)[None, :]
    mask = _nm_mask(score, *nm) if nm else _lowest(score, int(K * sparsity), 1)
    return W.masked_fill(mask, 0.0), mask


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, nm=None, block_size: int = 128,
                    damp_percent: float = 0.01):
    nm = parse_nm(nm)
    _check_sparsity(sparsity, nm)
    N, K = W.shape
    _check_nm(K, nm)
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"block_size {block_size} must be a multiple of M={nm[1]} for N:M sparsity")
    W, H = prepare_hessian(W, H)
    U, _ = inverse_hessian_cholesky(H, damp_percent)
    del H
    mask = torch.zeros(N, K, dtype=torch.bool, device=W.device)
    with small_op_threads() if W.device.type == "cpu" else contextlib.nullcontext():
        _sparsegpt_columns(W, U, mask, sparsity, nm, block_size)
    return W, mask


def _sparsegpt_columns(W, U, mask, sparsity, nm, block_size):
    """The SparseGPT column loop (in place on W and mask); see sparsegpt_prune."""
    N, K = W.shape
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        cnt = i2 - i1
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros(N, cnt, device=W.device)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        if nm is None:
            # adaptive mask: the block's lowest OBS scores over all rows at once
            mask1 = _lowest(W1 ** 2 / d[None, :] ** 2, int(N * cnt * sparsity), None)
        else:
            mask1 = torch.zeros(N, cnt, dtype=torch.bool, device=W.device)
        for i in range(cnt):
            if nm is not None and i % nm[1] == 0:
                s = W1[:, i:i + nm[1]] ** 2 / d[None, i:i + nm[1]] ** 2
                mask1[:, i:i + nm[1]] = _nm_mask(s, *nm)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            err = (w - q) / d[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            W1[:, i] = q  # exactly zero where pruned (the update leaves rounding residue)
            E1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
