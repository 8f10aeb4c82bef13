"""Sequential layer-by-layer compression of a decoder-only model (the GPTQ / SparseGPT / Wanda procedure).

The calibration batch is run up to the first decoder block and its inputs (and the keyword arguments the
model passes to blocks: masks, rotary embeddings) are kept. Then, block by block:
  1. the block's linear layers are grouped by the tensor they read (q/k/v share one, gate/up another),
     in execution order;
  2. for each group (true sequential), the block is run on the calibration inputs until that group's input
     is seen, accumulating the group's input statistics (Hessian 2 X X^T / n, or squared norms for Wanda);
     the run stops there, so earlier groups, already compressed, shape the statistics of later ones;
  3. each layer of the group is compressed by `compress_fn` (which writes the new weight in place);
  4. the compressed block's outputs become the next block's inputs.
Nothing here knows about Llama: blocks are the model's ModuleList of num_hidden_layers modules.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn


class _Stop(Exception):
    """Raised by a hook to end a forward pass early once the needed input was seen."""


def find_blocks(model) -> tuple[str, nn.ModuleList]:
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n:
            return name, mod
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
                     f"num_hidden_layers={n} modules")


class Stats:
    """Input statistics of one group of linear layers: the Hessian 2 X X^T / n, or the squared column
    norms sum_t X[t, j]^2 (all that Wanda needs, K instead of K^2 numbers)."""

    def __init__(self, K: int, kind: str, device):
        self.kind = kind
        self.n = 0
        self.acc = torch.zeros((K, K) if kind == "hessian" else (K,), dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.kind == "hessian":
            self.acc.addmm_(x.t(), x)
        else:
            self.acc += (x * x).sum(0)
        self.n += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.acc * (2.0 / max(self.n, 1))

    @property
    def sq_norm(self) -> torch.Tensor:
        return self.acc if self.kind == "sqnorm" else torch.diagonal(self.acc).clone()


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model, blocks: nn.ModuleList, calib: torch.Tensor, batch_size: int):
    """Run the model up to block 0 on each calibration batch; return (hidden states, block kwargs) per batch."""
    hs, kws = [], []

    def hook(mod, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        hs.append(h.detach())
        kws.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    dev = next(model.parameters()).device
    try:
        for i in range(0, calib.shape[0], batch_size):
            try:
                model(input_ids=calib[i:i + batch_size].to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(hs) != -(-calib.shape[0] // batch_size):
        raise RuntimeError("the calibration forward never reached the first decoder block")
    return hs, kws


def linear_groups(block: nn.Module, h: torch.Tensor, kw: dict) -> list[list[tuple[str, nn.Linear]]]:
    """The block's nn.Linear layers in execution order, grouped by the input tensor they share."""
    # the input tensors themselves are kept (not just their addresses) so that the allocator cannot
    # reuse one's memory for a later, different input and make two groups look alike
    calls: list[tuple[str, nn.Linear, torch.Tensor]] = []
    handles = []
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: calls.append((name, m, a[0]))))
    try:
        block(h, **kw)
    finally:
        for hd in handles:
            hd.remove()
    groups: list[list[tuple[str, nn.Linear]]] = []
    seen = set()
    last = None
    for name, mod, inp in calls:
        if name in seen:  # a layer called twice (shared module): compress once
            continue
        seen.add(name)
        if groups and last is not None and inp is last:
            groups[-1].append((name, mod))
        else:
            groups.append([(name, mod)])
        last = inp
    return groups


@torch.no_grad()
def compress_sequential(model, calib: torch.Tensor, compress_fn: Callable, stats_kind: str = "hessian",
                        true_sequential: bool = True, batch_size: int = 8, log: Callable | None = print) -> dict:
    """Compress every linear layer of every decoder block in place.

    compress_fn(full_name, linear, stats) -> anything (kept in the returned {full_name: result} dict);
    it must write the compressed weight into linear.weight so that later layers see its effect."""
    if stats_kind not in ("hessian", "sqnorm"):
        raise ValueError(f"stats_kind must be 'hessian' or 'sqnorm', got {stats_kind!r}")
    prefix, blocks = find_blocks(model)
    was_training = model.training
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    hs, kws = capture_block_inputs(model, blocks, calib, batch_size)
    results = {}
    t0 = time.time()
    for bi, block in enumerate(blocks):
        groups = linear_groups(block, hs[0], kws[0])
        passes = groups if true_sequential else [sum(groups, [])]
        for members in passes:
            # one statistic per distinct input: layers of a group read the same tensor
            heads = [grp[0] for grp in groups if grp[0] in members] if not true_sequential else [members[0]]
            stats = {name: Stats(mod.in_features, stats_kind, mod.weight.device) for name, mod in heads}
            handles = []
            last = heads[-1][0]
            for name, mod in heads:
                def hook(m, a, name=name):
                    stats[name].add(a[0])
                    if true_sequential and name == last:
                        raise _Stop  # the rest of the block is not needed for this group
                handles.append(mod.register_forward_pre_hook(hook))
            try:
                for h, kw in zip(hs, kws):
                    try:
                        block(h, **kw)
                    except _Stop:
                        pass
            finally:
                for hd in handles:
                    hd.remove()
            owner = {}
            for grp in groups:
                for name, _ in grp:
                    owner[name] = grp[0][0]
            for name, mod in members:
                full = f"{prefix}.{bi}.{name}"
                results[full] = compress_fn(full, mod, stats[owner[name]])
        hs = [_block_out(block(h, **kw)).detach() for h, kw in zip(hs, kws)]
        if log is not None:
            log(f"[compress] block {bi + 1}/{len(blocks)} done, {time.time() - t0:.0f}s")
    if use_cache is not None:
        model.config.use_cache = use_cache
    model.train(was_training)
    return results
