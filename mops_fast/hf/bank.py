"""Several trained adapters served in one batch over one frozen backbone.

`add_adapter(model, name, directory)` keeps a saved adapter under a name, beside the MoPs the model
already has; inside `with using_adapters(model, [name or None, ...]):` (one entry a sample) every forward
and `generate` runs each sample through its own adapter's gate and prompts, in one batch: the attention
takes per-sample prompts (B, J, L, Hkv, d) gathered from one stacked tensor a layer, and None runs that
sample through the backbone alone. Outside it, the model's own (attached or loaded) MoPs serve every
sample. The bank is for inference: its tensors take no gradient, and `save_adapter` saves the model's
own MoPs.

Adapters share what one forward needs to be common: the injected layers and the gate layer (one hook),
the attention mode, and the prompt layout (J, L). An adapter without a gate (the prompt baseline) of
the same J*L tokens joins a `scale` bank as J experts of weight 1: the same attention as its own.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mops_fast.nn.mops import MoPsModule

# log-weight of every expert for a sample served by the backbone alone: finite (no -inf - -inf in the
# kernels' running max) and far below any score, so exp() of it is exactly 0 in fp32.
NO_ADAPTER_LOGW = -1.0e4


class AdapterBank:
    """Named adapters laid out like the model's own MoPs (see the module docstring)."""

    def __init__(self, owner: MoPsModule):
        n, J, L, H, d = owner.prompt_k.shape
        self.layout = (n, J, L, H, d)
        self.mode = owner.config.mode
        self.layers = (owner.gate_layer, owner.first_layer)
        self.entries: dict[str, MoPsModule] = {}
        self._stacked = None  # (device, dtype, names, prompt_k, prompt_v): (n, A, J, L, H, d) each

    def names(self) -> list[str]:
        return list(self.entries)

    def add(self, name: str, module: MoPsModule, source: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self.entries:
            raise ValueError(f"an adapter named {name!r} is already added; remove_adapter(model, {name!r}) first")
        n, J, L, H, d = self.layout
        problems = []
        if (module.gate_layer, module.first_layer) != self.layers:
            problems.append(f"gate layer / first injected layer {(module.gate_layer, module.first_layer)} vs "
                            f"{self.layers}")
        if module.config.mode != self.mode:
            problems.append(f"mode {module.config.mode!r} vs {self.mode!r}")
        nk, Jk, Lk, Hk, dk = module.prompt_k.shape
        if (nk, Hk, dk) != (n, H, d):
            problems.append(f"prompt layers/heads/dim {(nk, Hk, dk)} vs {(n, H, d)}")
        elif module.gate is not None or self.mode != "scale":
            if (Jk, Lk) != (J, L):
                problems.append(f"J x L = {Jk} x {Lk} vs {J} x {L}")
        elif Jk * Lk != J * L:
            problems.append(f"{Jk * Lk} prompt tokens vs {J * L}")
        if problems:
            raise ValueError(f"adapter {source} cannot join this model's bank: " + "; ".join(problems) +
                             " (adapters served together need the model's MoPs layout; detach and attach "
                             "another config to serve a different one)")
        for p in module.parameters():
            p.requires_grad_(False)
        self.entries[name] = module
        self._stacked = None

    def remove(self, name: str) -> None:
        if name not in self.entries:
            raise KeyError(f"no adapter named {name!r}; added: {self.names()}")
        del self.entries[name]
        self._stacked = None

    def check_request(self, adapters) -> tuple:
        """using_adapters' names as a tuple of names or None, each one added."""
        if isinstance(adapters, str) or not isinstance(adapters, Sequence):
            raise ValueError(f"using_adapters needs a list with one adapter name (or None) a sample, got {adapters!r}")
        if not self.entries:
            raise ValueError("using_adapters: no adapter is added to this model; call mops_fast.add_adapter first")
        unknown = sorted({a for a in adapters if a is not None and a not in self.entries}, key=str)
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; added: {self.names()}")
        return tuple(adapters)

    def _stack(self, device, dtype):
        names = tuple(self.entries)
        s = self._stacked
        if s is None or s[:3] != (device, dtype, names):
            n, J, L, H, d = self.layout
            ks = [m.prompt_k.detach().reshape(n, J, L, H, d) for m in self.entries.values()]
            vs = [m.prompt_v.detach().reshape(n, J, L, H, d) for m in self.entries.values()]
            s = (device, dtype, names, torch.stack(ks, 1).to(device, dtype), torch.stack(vs, 1).to(device, dtype))
            self._stacked = s
        return s[3], s[4]

    def rows(self, request: tuple, B: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(index of each sample's adapter (B,), mask of the samples served by the backbone alone or None)."""
        if len(request) != B:
            raise ValueError(f"using_adapters has {len(request)} names for a batch of {B}: give one a sample "
                             "(generate's num_return_sequences / num_beams repeat samples: repeat the names too)")
        order = {name: i for i, name in enumerate(self.entries)}
        idx = torch.tensor([order.get(a, 0) for a in request], dtype=torch.long, device=device)
        none = [a is None for a in request]
        return idx, (torch.tensor(none, device=device) if any(none) else None)

    def log_weights(self, pooled: torch.Tensor, idx: torch.Tensor, none: torch.Tensor | None) -> torch.Tensor:
        """(B, J) float32 log gate weights, each sample through its own adapter's gate."""
        B, J = pooled.shape[0], self.layout[1]
        logw = pooled.new_zeros(B, J, dtype=torch.float32)
        for i, module in enumerate(self.entries.values()):
            sel = torch.nonzero(idx == i).flatten()
            if sel.numel() == 0 or module.gate is None:
                continue  # no gate: every expert at weight 1 (log 0)
            if module.gate.fc1.weight.device != pooled.device:
                module.to(pooled.device)
            lw, _ = module.log_weights(pooled.index_select(0, sel).to(module.gate.fc1.weight.dtype))
            logw.index_copy_(0, sel, lw.to(torch.float32))
        if none is not None:
            logw.masked_fill_(none[:, None], NO_ADAPTER_LOGW)
        return logw

    def prompts(self, slot: int, idx: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's prompt keys and values at injected layer `slot`: (B, J, L, Hkv, d) each."""
        k, v = self._stack(idx.device, dtype)
        return k[slot].index_select(0, idx), v[slot].index_select(0, idx)
