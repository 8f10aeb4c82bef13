"""Aggregation of client tensors and server optimizers, on plain dicts of tensors (no transport, no model).

A round is: aggregate the valid client states (weighted mean, coordinate-wise median or trimmed mean),
then let the server optimizer move the global state toward that aggregate. With the pseudo-gradient
g = global - aggregate, plain averaging is `global - lr * g` (lr 1: FedAvg), and FedAdam / FedYogi /
FedAdagrad are the adaptive server updates of Reddi et al., "Adaptive Federated Optimization" (2021),
without bias correction, as there. FedProx lives on the client (a proximal term); the server averages.
Arithmetic runs in float64 and in a fixed client order, so every transport gives bit-identical results.
"""
from __future__ import annotations

from mops_fast.config_file import dataclass_from_dict

from dataclasses import asdict, dataclass

import torch

AGGREGATORS = ("mean", "median", "trimmed_mean")
SERVER_OPTS = ("avg", "adam", "yogi", "adagrad")
# Named strategies -> (aggregator, server optimizer, uses the client proximal term)
NAMED = {
    "fedavg": ("mean", "avg", False),
    "fedprox": ("mean", "avg", True),
    "fedadam": ("mean", "adam", False),
    "fedyogi": ("mean", "yogi", False),
    "fedadagrad": ("mean", "adagrad", False),
    "median": ("median", "avg", False),
    "trimmed_mean": ("trimmed_mean", "avg", False),
}

State = dict[str, torch.Tensor]


@dataclass
class StrategyConfig:
    name: str = "fedavg"
    prox_mu: float = 0.01  # FedProx only
    trim_ratio: float = 0.2  # trimmed mean: fraction cut from each end per coordinate
    server_lr: float | None = None  # default: 1.0 for avg, 0.01 for the adaptive optimizers
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity (epsilon) of the adaptive server optimizers

    def __post_init__(self):
        if self.name not in NAMED:
            raise ValueError(f"strategy: unknown name {self.name!r}; choose from {sorted(NAMED)}")
        if not 0.0 <= self.trim_ratio < 0.5:
            raise ValueError(f"strategy: trim_ratio must be in [0, 0.5), got {self.trim_ratio!r}")
        if self.prox_mu < 0:
            raise ValueError(f"strategy: prox_mu must be >= 0, got {self.prox_mu!r}")
        if self.server_lr is not None and not self.server_lr > 0:
            raise ValueError(f"strategy: server_lr must be > 0, got {self.server_lr!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or not self.tau > 0:
            raise ValueError("strategy: need 0 <= beta1, beta2 < 1 and tau > 0")

    @classmethod
    def from_dict(cls, d: dict) -> "StrategyConfig":
        return dataclass_from_dict(cls, d, "strategy")

    @property
    def aggregator(self) -> str:
        return NAMED[self.name][0]

    @property
    def server_opt(self) -> str:
        return NAMED[self.name][1]

    @property
    def mu(self) -> float:
        """The proximal coefficient clients use (0 unless the strategy is FedProx)."""
        return float(self.prox_mu) if NAMED[self.name][2] else 0.0

    @property
    def lr(self) -> float:
        if self.server_lr is not None:
            return float(self.server_lr)
        return 1.0 if self.server_opt == "avg" else 0.01

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------- aggregators
def _stack(states: list[State], key: str) -> torch.Tensor:
    return torch.stack([s[key].to(torch.float64) for s in states])


def weighted_mean(states: list[State], weights: list[float]) -> State:
    """sum_i w_i x_i / sum_i w_i, per tensor (FedAvg with weights = example counts)."""
    if not states:
        raise ValueError("weighted_mean: no client states")
    if len(weights) != len(states) or any(not w > 0 for w in weights):
        raise ValueError(f"weighted_mean: need one weight > 0 per state, got {weights}")
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for k, ref in states[0].items():
        x = _stack(states, k)
        out[k] = torch.tensordot(w, x, dims=1).to(ref.dtype)
    return out


def coordinate_median(states: list[State]) -> State:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    if not states:
        raise ValueError("coordinate_median: no client states")
    n = len(states)
    out = {}
    for k, ref in states[0].items():
        x = torch.sort(_stack(states, k), dim=0).values
        med = x[(n - 1) // 2] if n % 2 else 0.5 * (x[n // 2 - 1] + x[n // 2])
        out[k] = med.to(ref.dtype)
    return out


def trimmed_mean(states: list[State], ratio: float) -> State:
    """Per coordinate: drop the floor(ratio * n) largest and smallest values, average the rest."""
    if not states:
        raise ValueError("trimmed_mean: no client states")
    n = len(states)
    cut = int(ratio * n)
    if n - 2 * cut < 1:
        raise ValueError(f"trimmed_mean: trimming {cut} from each end of {n} clients leaves nothing")
    out = {}
    for k, ref in states[0].items():
        x = torch.sort(_stack(states, k), dim=0).values
        out[k] = x[cut: n - cut].mean(0).to(ref.dtype)
    return out


def aggregate(states: list[State], weights: list[float], cfg: StrategyConfig) -> State:
    if cfg.aggregator == "mean":
        return weighted_mean(states, weights)
    if cfg.aggregator == "median":
        return coordinate_median(states)
    return trimmed_mean(states, cfg.trim_ratio)


# ---------------------------------------------------------------------------------------- server opts
class ServerOptimizer:
    """Moves the global state given the aggregate; holds its own moments (checkpointed)."""

    def __init__(self, kind: str, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        if kind not in SERVER_OPTS:
            raise ValueError(f"server optimizer must be one of {list(SERVER_OPTS)}, got {kind!r}")
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.m: State = {}
        self.v: State = {}

    @classmethod
    def from_strategy(cls, cfg: StrategyConfig) -> "ServerOptimizer":
        return cls(cfg.server_opt, cfg.lr, cfg.beta1, cfg.beta2, cfg.tau)

    def step(self, global_state: State, agg: State) -> State:
        out = {}
        for k, x in global_state.items():
            x64 = x.to(torch.float64)
            delta = agg[k].to(torch.float64) - x64  # = -(pseudo-gradient global - aggregate)
            if self.kind == "avg":
                out[k] = (x64 + self.lr * delta).to(x.dtype)
                continue
            m = self.m.get(k, torch.zeros_like(x64))
            v = self.v.get(k, torch.zeros_like(x64))
            m = self.beta1 * m + (1 - self.beta1) * delta
            d2 = delta * delta
            if self.kind == "adam":
                v = self.beta2 * v + (1 - self.beta2) * d2
            elif self.kind == "yogi":
                v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
            else:  # adagrad
                v = v + d2
            self.m[k], self.v[k] = m, v
            out[k] = (x64 + self.lr * m / (v.sqrt() + self.tau)).to(x.dtype)
        return out

    def state_dict(self) -> dict:
        return {"kind": self.kind, "m": {k: t.clone() for k, t in self.m.items()},
                "v": {k: t.clone() for k, t in self.v.items()}}

    def load_state_dict(self, sd: dict) -> None:
        if sd["kind"] != self.kind:
            raise ValueError(f"server optimizer state is for {sd['kind']!r}, this run uses {self.kind!r}")
        self.m = {k: t.to(torch.float64) for k, t in sd["m"].items()}
        self.v = {k: t.to(torch.float64) for k, t in sd["v"].items()}
