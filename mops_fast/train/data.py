"""Instruction data: JSON Lines loading, chat formatting, truncation, gate masks and response labels.

A record is {"instruction", "context", "response", "category"} (strings). The prompt (instruction and
context, in the tokenizer's chat template) forms the gate mask; labels cover response tokens only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

REQUIRED_FIELDS = ("instruction", "context", "response", "category")
IGNORE = -100


def load_records(path, limit: int | None = None, required: tuple = REQUIRED_FIELDS) -> list[dict]:
    """Read a JSON Lines file of records, validating every line (the `required` string fields);
    errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"data file {p} does not exist; the shared data lives in ../shared/data/<name>/{{train,test}}.jsonl"
        )
    records = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: malformed JSON ({e.msg}); each line must be one JSON object") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise ValueError(f"{p}:{lineno}: missing field(s) {missing}; records need {list(required)}")
            bad = [k for k in required if not isinstance(rec[k], str)]
            if bad:
                raise ValueError(f"{p}:{lineno}: field(s) {bad} must be strings")
            records.append(rec)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"data file {p} holds no records")
    return records


def load_hub_records(name: str, split: str = "train") -> list[dict]:
    """Records from the Hugging Face Hub (needs the `datasets` package and a network connection)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("loading from the Hub needs `pip install datasets`") from e
    ds = datasets.load_dataset(name, split=split)
    out = []
    for r in ds:
        rec = {"instruction": r.get("instruction", ""), "context": r.get("context", r.get("input", "")) or "",
               "response": r.get("response", r.get("output", "")), "category": r.get("category", "default")}
        out.append(rec)
    return out


def select_categories(records: list[dict], categories: list[str] | None) -> list[dict]:
    """Keep records of the given categories; an unknown category is an error, not an empty result."""
    if not categories:
        return records
    present = sorted({r["category"] for r in records})
    unknown = [c for c in categories if c not in present]
    if unknown:
        raise ValueError(f"unknown categor(y/ies) {unknown} in the config; the data has {present}")
    keep = set(categories)
    return [r for r in records if r["category"] in keep]


def per_category(records: list[dict], n: int | None, seed: int = 0) -> list[dict]:
    """The first n records of each category in a seeded shuffle (all when n is None)."""
    if n is None:
        return records
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(records), generator=g).tolist()
    counts: dict[str, int] = {}
    out = []
    for i in order:
        c = records[i]["category"]
        if counts.get(c, 0) < n:
            counts[c] = counts.get(c, 0) + 1
            out.append(records[i])
    return out


def prompt_text(tokenizer, rec: dict) -> str:
    user = rec["instruction"].strip()
    if rec["context"].strip():
        user += "\n\n" + rec["context"].strip()
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    return f"### Instruction:\n{user}\n\n### Response:\n"


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int  # the first n_prompt tokens are instruction/context (gate mask); the rest response
    category: str


class Formatter:
    """Turns records into token ids with a prompt/response split, truncated to max_length."""

    TAIL = 8  # prompt tokens kept at the end on truncation: the assistant header of the template

    def __init__(self, tokenizer, max_length: int = 256, truncate: bool = True):
        if max_length < 2 * self.TAIL:
            raise ValueError(f"max_length={max_length} is too short; use at least {2 * self.TAIL}")
        self.tok = tokenizer
        self.max_length = max_length
        self.truncate = truncate
        model_max = getattr(tokenizer, "model_max_length", None)
        self.model_max = model_max if model_max and model_max < 10**9 else None
        self.eos = tokenizer.eos_token or ""

    def __call__(self, rec: dict) -> Example:
        p = self.tok(prompt_text(self.tok, rec), add_special_tokens=False)["input_ids"]
        r = self.tok(rec["response"].strip() + self.eos, add_special_tokens=False)["input_ids"]
        if not self.truncate:
            limit = self.model_max or self.max_length
            if len(p) + len(r) > limit:
                raise ValueError(
                    f"example of {len(p) + len(r)} tokens exceeds the limit {limit} and truncation is off; "
                    "enable truncation or raise max_length"
                )
        elif len(p) + len(r) > self.max_length:
            # Keep the head and the assistant header of the prompt; give the response the rest, but
            # never less than a quarter of the budget.
            budget_p = min(len(p), max(self.max_length - len(r), self.max_length // 2))
            if budget_p < len(p):
                p = p[: budget_p - self.TAIL] + p[-self.TAIL:]
            r = r[: self.max_length - len(p)]
        if len(p) == 0:
            raise ValueError("an example has an empty prompt: the gate needs instruction/context tokens")
        return Example(p + r, len(p), rec["category"])


def collate(examples: list[Example], pad_id: int, categories: list[str] | None = None) -> dict:
    """Right-padded batch: input_ids, attention_mask, labels (response only), gate_mask, category ids."""
    S = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    att = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), IGNORE, dtype=torch.long)
    gate = torch.zeros(B, S, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        att[i, :n] = 1
        gate[i, : e.n_prompt] = 1
        labels[i, e.n_prompt:n] = ids[i, e.n_prompt:n]
    batch = {"input_ids": ids, "attention_mask": att, "labels": labels, "gate_mask": gate}
    if categories is not None:
        index = {c: i for i, c in enumerate(categories)}
        batch["category"] = torch.tensor([index[e.category] for e in examples], dtype=torch.long)
    return batch
