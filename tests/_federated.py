"""Helpers of the federated tests: learnable synthetic data and small configs on a tiny random Llama."""
from __future__ import annotations

import json
import random
from pathlib import Path

TINY = "tiny-llama:layers=2,hidden=32,heads=4,kv_heads=2,seed=0"
CATS = ["lower", "repeat", "reverse", "upper"]


def synthetic_records(n: int = 96, seed: int = 0) -> list[dict]:
    """Four categories whose responses are a fixed function of the instruction (a tiny model learns them)."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        c = CATS[i % len(CATS)]
        w = "".join(rnd.choice("abcdefgh") for _ in range(rnd.randint(3, 6)))
        resp = {"lower": w.lower(), "repeat": w + w, "reverse": w[::-1], "upper": w.upper()}[c]
        out.append({"instruction": f"{c} {w}", "context": "", "response": resp, "category": c})
    return out


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def tiny_config(tmp: Path, **fed) -> dict:
    """A validated-shape federated config over synthetic data in `tmp` (federated keys overridable)."""
    train = write_jsonl(tmp / "train.jsonl", synthetic_records(96, seed=0))
    test = write_jsonl(tmp / "test.jsonl", synthetic_records(16, seed=1))
    federated = {"partition": {"num_clients": 3, "scheme": "dominant", "k": 2, "mix": 0.25},
                 "rounds": 2, "clients_per_round": 2, "local_steps": 2, "gate_rounds": 1,
                 "gate_local_steps": 5, "gate_samples": 8, "eval_every": 0,
                 "strategy": {"name": "fedavg"}}
    federated.update(fed)
    return {
        "name": "tiny", "model": TINY, "seed": 0, "threads": 1,
        "data": {"train": train, "test": test},
        "methods": ["mops"],
        "mops": {"num_experts": 2, "prompt_len": 2, "gate_layer": 1, "gate_hidden": 8},
        "init": {"kv_samples": 4},
        "train": {"batch_size": 2, "lr": 1e-2, "max_length": 48},
        "eval": {"batch_size": 8},
        "federated": federated,
    }
