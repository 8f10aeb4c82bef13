"""Round-to-nearest (RTN) quantization: the baseline GPTQ must beat. Same grid, no error feedback."""
from __future__ import annotations

import torch

from mops_fast.quant.pack import default_g_idx, num_groups
from mops_fast.quant.quantizer import QuantizedWeight, check_quant_args, find_params, quantize_codes


@torch.no_grad()
def quantize_weight_rtn(W: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                        mse: bool = False) -> QuantizedWeight:
    """Quantize W (N, K) group by group along K (the last group is short when group_size does not divide K)."""
    N, K = W.shape
    check_quant_args(K, bits, group_size)
    gs = K if group_size == -1 else group_size
    G = num_groups(K, group_size)
    W = W.float()
    codes = torch.empty(N, K, dtype=torch.int64, device=W.device)
    scales = torch.empty(G, N, device=W.device)
    zeros = torch.empty(G, N, dtype=torch.int64, device=W.device)
    for g in range(G):
        cols = W[:, g * gs:(g + 1) * gs]
        scale, zero = find_params(cols, bits, sym, mse)
        scales[g], zeros[g] = scale, zero
        codes[:, g * gs:(g + 1) * gs] = quantize_codes(cols, scale, zero, bits)
    return QuantizedWeight(codes, scales, zeros, default_g_idx(K, group_size, W.device), bits, group_size, sym)
