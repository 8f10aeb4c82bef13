"""Response-token language-model loss, computing logits only where labels exist."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mops_fast.train.data import IGNORE


def response_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over response tokens.

    Returns (nll_sum scalar, per-sample nll sums (B,), per-sample token counts (B,)). The LM head runs
    only on positions whose next token is a label: on instruction data that skips the prompt's share of
    the largest matrix product (vocab x hidden) in both forward and backward.
    """
    dev = next(model.parameters()).device
    ids = batch["input_ids"].to(dev)
    att = batch["attention_mask"].to(dev)
    kwargs = {}
    if "gate_mask" in batch and hasattr(model, "mops"):
        kwargs["gate_mask"] = batch["gate_mask"].to(dev)
    hidden = model.model(input_ids=ids, attention_mask=att, use_cache=False, **kwargs).last_hidden_state
    targets = batch["labels"].to(dev)[:, 1:]
    sel = targets != IGNORE  # (B, S-1): position t predicts token t+1
    h = hidden[:, :-1][sel]
    logits = model.lm_head(h).float()
    nll = F.cross_entropy(logits, targets[sel], reduction="none")
    rows = torch.nonzero(sel)[:, 0]
    B = ids.shape[0]
    per_sample = torch.zeros(B, device=dev, dtype=nll.dtype).index_add(0, rows, nll)
    counts = sel.sum(1)
    return nll.sum(), per_sample, counts
