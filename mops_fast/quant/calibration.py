"""Calibration data for GPTQ, Wanda and SparseGPT: token windows cut from instruction records.

Records (instruction, context, response) are formatted as the model will see them in training and
evaluation (the tokenizer's chat template, user turn then assistant turn), tokenized and concatenated into
one stream in a seeded random order; `n_samples` windows of `seq_len` tokens are then cut at seeded random
offsets. The same seed gives the same windows.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch


def record_text(tokenizer, rec: dict) -> str:
    """One record as chat text: the user turn (instruction and context) and the assistant's response."""
    user = rec["instruction"].strip()
    if rec.get("context", "").strip():
        user += "\n\n" + rec["context"].strip()
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": rec["response"].strip()}],
            tokenize=False,
        )
    eos = tokenizer.eos_token or ""
    return f"### Instruction:\n{user}\n\n### Response:\n{rec['response'].strip()}{eos}\n"


def _load_records(path) -> list[dict]:
    try:
        from mops_fast.train.data import load_records
    except ImportError:  # the trainer package is optional for compression
        import json

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"calibration data {p} does not exist")
        with open(p, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    return load_records(path)


def calibration_windows(tokenizer, path, n_samples: int = 128, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """LongTensor (n_samples, seq_len) of token ids from the JSON Lines file at `path`."""
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    records = _load_records(path)
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    want = 2 * n_samples * seq_len  # enough stream for windows that overlap little
    stream: list[int] = []
    for i in order:
        stream.extend(tokenizer(record_text(tokenizer, records[i]), add_special_tokens=False)["input_ids"])
        if len(stream) >= want:
            break
    if len(stream) < seq_len + 1:
        raise ValueError(f"{path} holds only {len(stream)} tokens; calibration needs at least {seq_len + 1}")
    starts = [rng.randrange(0, len(stream) - seq_len) for _ in range(n_samples)]
    return torch.tensor([stream[s:s + seq_len] for s in starts], dtype=torch.long)
