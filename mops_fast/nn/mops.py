"""The trainable part of MoPs: expert prompts for each injected layer, and the gate."""
from __future__ import annotations

import torch
from torch import nn

from mops_fast.config import MoPsConfig
from mops_fast.ops.tracing import traced


class Gate(nn.Module):
    """LayerNorm(D) -> Linear(D, G) -> GELU -> Linear(G, J) over the pooled gate hidden state."""

    def __init__(self, hidden: int, gate_hidden: int, num_experts: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, gate_hidden)
        self.fc2 = nn.Linear(gate_hidden, num_experts)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(pooled))))


def pool_gate_states(hidden: torch.Tensor, gate_mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, S, D) over the positions where gate_mask (B, S) is set, in float32."""
    m = gate_mask.to(torch.float32)
    counts = m.sum(1)
    if not traced(hidden) and bool((counts == 0).any()):  # a graph cannot branch on values: eager only
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"gate mask is empty for sample(s) {empty}: the gate needs at least one instruction/context "
            "token per sample (check the formatter's truncation or the gate_mask you passed)"
        )
    return torch.einsum("bs,bsd->bd", m, hidden.to(torch.float32)) / counts[:, None]


def gate_log_weights(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """log of softmax(logits / tau), with top-k: kept weights renormalized, the rest exactly -inf."""
    z = logits.to(torch.float32) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).indices
        keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, kth, True)
        z = z.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(z, dim=-1)


class MoPsModule(nn.Module):
    """Prompt keys/values (n_injected, J, L, Hkv, d) and the gate. Holds no backbone weights."""

    def __init__(self, config: MoPsConfig, *, hidden: int, num_kv_heads: int, head_dim: int,
                 num_layers: int):
        super().__init__()
        self.config = config
        g, f = config.resolved_layers(num_layers)
        self.gate_layer, self.first_layer = g, f
        self.injected_layers = list(range(f, num_layers))
        shape = (len(self.injected_layers), config.num_experts, config.prompt_len, num_kv_heads, head_dim)
        self.prompt_k = nn.Parameter(torch.randn(shape) * config.init_scale)
        self.prompt_v = nn.Parameter(torch.randn(shape) * config.init_scale)
        self.gate = Gate(hidden, config.gate_hidden, config.num_experts) if config.gate else None

    def layer_slot(self, layer_idx: int) -> int | None:
        i = layer_idx - self.first_layer
        return i if 0 <= i < len(self.injected_layers) else None

    def log_weights(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log gate weights (B, J), gate logits or None). Without a gate: zeros (B, 1)."""
        if self.gate is None:
            return pooled.new_zeros(pooled.shape[0], 1), None
        logits = self.gate(pooled)
        return gate_log_weights(logits, self.config.temperature, self.config.top_k), logits
