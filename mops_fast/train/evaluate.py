"""Response-token perplexity per category, and the mean over categories."""
from __future__ import annotations

import math

import torch

from mops_fast.train.data import Formatter, collate
from mops_fast.train.loss import response_nll


@torch.no_grad()
def evaluate_perplexity(model, tokenizer, records: list[dict], *, batch_size: int = 8,
                        max_length: int = 256, progress: bool = False) -> dict:
    """{"ppl": {category: ppl, ..., "mean": mean of the category ppls}, "tokens": {category: n}}, and for
    a model with a MoPs gate over J > 1 experts "gate": {"max_weight", "effective_experts"}: the means over
    the records of the largest gate weight and of exp(entropy of the weights) (J when uniform, 1 when
    one-hot: a saturated gate).

    Perplexity of a category is exp(total NLL / total response tokens) over its records; batches are
    length-sorted so that little is spent on padding.
    """
    if not records:
        raise ValueError("evaluate_perplexity: no records to evaluate")
    fmt = Formatter(tokenizer, max_length=max_length)
    examples = sorted((fmt(r) for r in records), key=lambda e: len(e.input_ids))
    was_training = model.training
    model.eval()
    nll: dict[str, float] = {}
    tokens: dict[str, int] = {}
    mops = getattr(model, "mops", None)
    gated = mops is not None and getattr(mops, "gate", None) is not None and mops.config.num_experts > 1
    gate_max, gate_eff = [], []
    batches = range(0, len(examples), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="eval", leave=False)
    for i in batches:
        chunk = examples[i: i + batch_size]
        batch = collate(chunk, tokenizer.pad_token_id)
        _, per_sample, counts = response_nll(model, batch)
        if gated and mops.state.logw is not None:
            w = mops.state.logw.float().exp()
            gate_max.append(w.max(-1).values)
            gate_eff.append(torch.special.entr(w).sum(-1).exp())
        for e, s, c in zip(chunk, per_sample.tolist(), counts.tolist()):
            nll[e.category] = nll.get(e.category, 0.0) + s
            tokens[e.category] = tokens.get(e.category, 0) + int(c)
    model.train(was_training)
    ppl = {c: math.exp(nll[c] / tokens[c]) for c in sorted(nll) if tokens[c] > 0}
    if not ppl:
        raise ValueError("evaluate_perplexity: the records hold no response tokens")
    ppl["mean"] = sum(ppl.values()) / len(ppl)
    out = {"ppl": ppl, "tokens": tokens}
    if gate_max:
        out["gate"] = {"max_weight": torch.cat(gate_max).mean().item(),
                       "effective_experts": torch.cat(gate_eff).mean().item()}
    return out


def gate_result_keys(res: dict) -> dict:
    """A result entry's gate keys from an evaluate_perplexity result: {} where it measured no gate."""
    if "gate" not in res:
        return {}
    return {"gate_effective_experts": res["gate"]["effective_experts"], "gate_max_weight": res["gate"]["max_weight"]}
