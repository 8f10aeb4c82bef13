"""Answering requests with trained adapters: `mops-fast generate`.

Requests are JSON Lines with `instruction`, optional `context` (the training prompt format, chat template
included) and optional `adapter`: the name of one of the adapters given (default: the first given),
or null for the backbone alone. Requests for different adapters share batches (the adapter bank,
mops_fast/hf/bank.py). Each output line is the request with `adapter` and `response` filled in, in
input order; the file is written whole at the end, so an error leaves no partial output.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mops_fast.hf.adapter import add_adapter, using_adapters
from mops_fast.train.data import load_records, prompt_text

_DEFAULT = object()


def parse_adapter_args(items: list[str]) -> dict[str, Path]:
    """NAME=DIR pairs (or a bare DIR, named after its folder) -> {name: directory}, in order."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep:
            name, directory = Path(item).name or item, item
        if not name or not directory:
            raise ValueError(f"--adapter {item!r}: expected NAME=DIR (or DIR)")
        if name in out:
            raise ValueError(f"--adapter: the name {name!r} is given twice; name them NAME=DIR")
        out[name] = Path(directory)
    return out


def request_adapters(records: list[dict], names: list[str], source: str) -> list[str | None]:
    """Each record's adapter: its `adapter` field (a given name, or null for the backbone alone), else the
    first given adapter (the backbone when none is given)."""
    default = names[0] if names else None
    out = []
    for i, rec in enumerate(records, 1):
        a = rec.get("adapter", _DEFAULT)
        if a is _DEFAULT:
            a = default
        elif a is not None and a not in names:
            raise ValueError(f"{source}: request {i} asks for adapter {a!r}; given: {names} "
                             "(add it with --adapter NAME=DIR, or null for the backbone alone)")
        out.append(a)
    return out


@torch.no_grad()
def generate_responses(model, tok, records: list[dict], adapters: list[str | None] | None = None, *,
                       batch_size: int = 8, max_new_tokens: int = 64) -> list[str]:
    """Greedy responses to `records` in batches of batch_size: request i through adapters[i] (a name added
    to the model's bank, or None for the backbone alone), or, without `adapters`, through the model as it
    is (its own MoPs, if it has them)."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    if adapters is not None:
        if len(adapters) != len(records):
            raise ValueError(f"{len(adapters)} adapter entries for {len(records)} requests: give one a request")
        if not (hasattr(model, "mops") and model.mops.bank.names()):
            raise ValueError("adapters are named but none is added to the model: call mops_fast.add_adapter first")
    device = next(model.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left"  # generate continues from the last position of every row
    out: list[str] = []
    try:
        for s in range(0, len(records), batch_size):
            chunk = records[s:s + batch_size]
            texts = [prompt_text(tok, {"instruction": r["instruction"], "context": r.get("context", "")})
                     for r in chunk]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            if adapters is not None:
                with using_adapters(model, adapters[s:s + batch_size]):
                    seq = model.generate(**enc, **kw)
            else:
                seq = model.generate(**enc, **kw)
            new = seq[:, enc["input_ids"].shape[1]:]
            out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return out


def run_generate(args) -> int:
    from mops_fast.hf.loading import load_model

    given = parse_adapter_args(args.adapter or [])
    records = load_records(args.input, required=("instruction",))
    for i, rec in enumerate(records, 1):
        if not isinstance(rec.get("context", ""), str):
            raise ValueError(f"{args.input}: request {i}: context must be a string")
    adapters = request_adapters(records, list(given), str(args.input))
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    for name, directory in given.items():
        add_adapter(model, name, directory)
    responses = generate_responses(model, tok, records, adapters if given else None, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec, a, r in zip(records, adapters, responses):
            f.write(json.dumps({**rec, "adapter": a, "response": r}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    print(f"wrote {len(responses)} responses to {out}")
    return 0


def add_generate_args(p) -> None:
    p.add_argument("--model", required=True, help="smollm2-135m or a model directory (dense, pruned or GPTQ)")
    p.add_argument("--adapter", action="append",
                   help="NAME=DIR of a saved adapter (repeat for several; requests pick one by name)")
    p.add_argument("--input", required=True, help="JSON Lines requests: instruction, context?, adapter?")
    p.add_argument("--out", required=True, help="JSON Lines output: each request with adapter and response")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
