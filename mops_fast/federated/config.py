"""The federated run config (YAML or JSON), validated with errors that name the key and the fix.

Top level, shared with centralized runs: name, model, dtype, seed, threads, out_dir, data, methods, mops,
init, train (local TrainConfig keys), method_overrides, lr_search, eval, compression. Federated-only:
`federated:` (partition, schedule, strategy, gate pretraining), documented in docs/federated.md.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mops_fast.config import (DEFAULT_METHODS, METHODS, TRAINED_METHODS, MoPsConfig, check_eval_config,
                              check_lr_candidates, method_overrides)
from mops_fast.config_file import check_keys, read_config_file
from mops_fast.federated.partition import PartitionConfig
from mops_fast.federated.strategies import StrategyConfig
from mops_fast.hf.lora import LoraSettings

TOP_KEYS = {"name", "model", "dtype", "seed", "threads", "out_dir", "data", "methods", "mops", "lora", "init", "train",
            "method_overrides", "lr_search", "eval", "compression", "federated", "flower"}
FLOWER_KEYS = {"wait_nodes_s", "round_timeout_s"}
DATA_KEYS = {"name", "train", "test", "test_per_category", "round_test_per_category", "categories"}
LR_SEARCH_KEYS = {"methods", "candidates", "rounds", "heldout_per_category"}
# Set per round by the federated schedule; a config must not set them in `train:`.
SCHEDULED_TRAIN_KEYS = {"steps", "seed", "warmup_steps", "min_lr_ratio", "ckpt_every", "log_every", "progress",
                        "gate_pretrain_steps", "gate_pretrain_samples"}


@dataclass
class FedConfig:
    rounds: int = 10
    clients_per_round: int = 4
    local_steps: int = 8
    gate_rounds: int = 3  # stage A rounds (mops only; 0 turns gate pretraining off)
    gate_clients_per_round: int | None = None  # default: clients_per_round
    gate_local_steps: int = 30
    gate_samples: int = 64  # records per client whose pooled gate features train the gate each round
    eval_every: int = 1  # evaluate on the round test subset every n rounds (0: only at the end)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)

    def __post_init__(self):
        for name in ("rounds", "clients_per_round", "local_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"federated: {name} must be an integer >= 1, got {v!r}")
        for name in ("gate_rounds", "gate_local_steps", "gate_samples", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"federated: {name} must be an integer >= 0, got {v!r}")
        n = self.partition.num_clients
        for name in ("clients_per_round", "gate_clients_per_round"):
            v = getattr(self, name)
            if v is not None and not 1 <= v <= n:
                raise ValueError(f"federated: {name}={v} must be in 1..partition.num_clients={n}")
        if self.gate_rounds and (self.gate_local_steps < 1 or self.gate_samples < 1):
            raise ValueError("federated: gate_rounds > 0 needs gate_local_steps >= 1 and gate_samples >= 1")

    @property
    def gate_per_round(self) -> int:
        return self.gate_clients_per_round or self.clients_per_round

    @classmethod
    def from_dict(cls, d: dict, seed: int = 0) -> "FedConfig":
        check_keys(d or {}, set(cls.__dataclass_fields__), "federated")
        d = dict(d or {})
        part = dict(d.pop("partition", {}) or {})
        part.setdefault("seed", seed)
        strat = d.pop("strategy", {}) or {}
        if isinstance(strat, str):
            strat = {"name": strat}
        return cls(partition=PartitionConfig.from_dict(part), strategy=StrategyConfig.from_dict(strat), **d)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_path(path: str, base: Path | None = None) -> str:
    """Data paths in configs are relative to the repository root (where ../shared lives) unless absolute."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    root = base or Path(__file__).resolve().parents[2]
    return str(root / p)


def validate_config(cfg: dict) -> dict:
    """Check a federated run config; returns a normalized deep copy (federated defaults filled in)."""
    cfg = copy.deepcopy(cfg)
    check_keys(cfg, TOP_KEYS, "config")
    methods = cfg.setdefault("methods", list(DEFAULT_METHODS))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"config: methods {methods} invalid; choose a non-empty subset of {list(METHODS)}")
    data = cfg.get("data") or {}
    if "train" not in data or "test" not in data:
        raise ValueError("config: data.train and data.test (JSON Lines paths) are required")
    unknown = set(data) - DATA_KEYS
    if unknown:
        raise ValueError(f"config: unknown data keys {sorted(unknown)}; known keys are {sorted(DATA_KEYS)}")
    train = cfg.get("train") or {}
    sched = sorted(set(train) & SCHEDULED_TRAIN_KEYS)
    if sched:
        raise ValueError(f"config: train.{sched} are set by the federated schedule; use federated.local_steps, "
                         "federated.gate_local_steps and federated.gate_samples instead")
    for m, over in method_overrides(cfg, "config").items():
        sched = sorted(set(over) & SCHEDULED_TRAIN_KEYS)
        if sched:
            raise ValueError(f"config: method_overrides.{m}.{sched} are set by the federated schedule")
    MoPsConfig.from_dict(cfg.get("mops") or {})  # raises on bad keys or values
    check_eval_config(cfg.get("eval"), "config", curve=False)  # per-round evaluation: federated.eval_every
    LoraSettings.from_dict(cfg.get("lora") or {})
    unknown = set(cfg.get("flower") or {}) - FLOWER_KEYS
    if unknown:
        raise ValueError(f"config: unknown flower keys {sorted(unknown)}; known keys are {sorted(FLOWER_KEYS)}")
    seed = cfg.setdefault("seed", 0)
    cfg["federated"] = FedConfig.from_dict(cfg.get("federated") or {}, seed=seed).to_dict()
    ls = cfg.get("lr_search")
    if ls:
        unknown = set(ls) - LR_SEARCH_KEYS
        if unknown:
            raise ValueError(f"config: unknown lr_search keys {sorted(unknown)}; known keys are {sorted(LR_SEARCH_KEYS)}")
        check_lr_candidates(ls, "config")
        if int(ls.get("heldout_per_category", 0)) < 1:
            raise ValueError("config: lr_search needs heldout_per_category >= 1 (held-out training records)")
        bad = [m for m in ls.get("methods", ["prompt", "mops"]) if m not in TRAINED_METHODS]
        if bad:
            raise ValueError(f"config: lr_search.methods {bad} invalid; choose from {list(TRAINED_METHODS)}")
    return cfg


def fed_config(cfg: dict) -> FedConfig:
    f = dict(cfg["federated"])
    return FedConfig(partition=PartitionConfig(**f.pop("partition")), strategy=StrategyConfig(**f.pop("strategy")), **f)


def load_federated_config(path) -> dict:
    return validate_config(read_config_file(path, example="configs/dolly_federated.yaml"))
