"""Server round logic, independent of transport: client sampling, validation of updates, aggregation.

Every client update is checked before it touches the global state (tensor names, shapes, dtypes, finite
values, example count > 0). A bad update is dropped with a log line naming the client and the reason; the
round goes on with the rest, and a round with no valid update keeps the previous global state.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from mops_fast.federated.client import STAGE_GATE, STAGE_TRAIN, ClientUpdate
from mops_fast.federated.strategies import ServerOptimizer, StrategyConfig, aggregate

log = logging.getLogger("mops_fast.federated")


def sample_clients(run_seed: int, stage: str, rnd: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of a round: a pure function of (seed, stage, round), sorted (a fixed aggregation order)."""
    if not 1 <= per_round <= num_clients:
        raise ValueError(f"clients_per_round={per_round} must be in 1..num_clients={num_clients}")
    s = {STAGE_GATE: 11, STAGE_TRAIN: 13}[stage]
    g = torch.Generator().manual_seed(int(run_seed) * 1_000_003 + s * 7_919 + int(rnd))
    return sorted(torch.randperm(num_clients, generator=g)[:per_round].tolist())


def validate_update(update, expected: dict[str, torch.Tensor]) -> str | None:
    """None if `update` may be aggregated against the global tensors `expected`, else the reason."""
    if not isinstance(update, ClientUpdate):
        return f"not a client update (got {type(update).__name__})"
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0 or n != int(n):
        return f"example count must be a positive integer, got {n!r}"
    if not isinstance(update.tensors, dict):
        return f"tensors must be a dict of name -> tensor, got {type(update.tensors).__name__}"
    names, want = set(update.tensors), set(expected)
    if names != want:
        parts = []
        if want - names:
            parts.append(f"missing {sorted(want - names)}")
        if names - want:
            parts.append(f"unexpected {sorted(names - want)}")
        return "tensor names differ from the global state: " + ", ".join(parts)
    for k, ref in expected.items():
        t = update.tensors[k]
        if not isinstance(t, torch.Tensor):
            return f"tensor {k!r} is a {type(t).__name__}, not a tensor"
        if tuple(t.shape) != tuple(ref.shape):
            return f"tensor {k!r} has shape {tuple(t.shape)}, the global state's is {tuple(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"tensor {k!r} has dtype {t.dtype}, the global state's is {ref.dtype}"
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            return f"tensor {k!r} holds {bad} non-finite value(s) (NaN/inf)"
    return None


class FederatedServer:
    """Global adapter state plus the server optimizer; one call of `finish_round` per round."""

    def __init__(self, global_state: dict[str, torch.Tensor], strategy: StrategyConfig, run_seed: int,
                 num_clients: int):
        self.state = {k: v.detach().cpu().clone() for k, v in global_state.items()}
        self.strategy = strategy
        self.run_seed, self.num_clients = int(run_seed), int(num_clients)
        # Stage B uses the configured server optimizer; stage A (a short warm-up of the gate MLP) moves the
        # gate to the aggregate directly, so adaptive-server hyperparameters never touch it.
        self.opt = ServerOptimizer.from_strategy(strategy)

    def sample(self, stage: str, rnd: int, per_round: int) -> list[int]:
        return sample_clients(self.run_seed, stage, rnd, self.num_clients, per_round)

    def keys(self, stage: str) -> list[str]:
        return [k for k in self.state if k.startswith("gate.")] if stage == STAGE_GATE else list(self.state)

    def finish_round(self, stage: str, rnd: int, updates: list) -> dict:
        """Validate, aggregate and apply one round's updates. Returns the round's record (for the history)."""
        t0 = time.perf_counter()
        expected = {k: self.state[k] for k in self.keys(stage)}
        valid, dropped = [], []
        for u in updates:
            reason = validate_update(u, expected)
            cid = getattr(u, "client_id", "?")
            if reason is None:
                valid.append(u)
            else:
                log.warning("round %s%d: dropped the update of client %s: %s", stage, rnd, cid, reason)
                dropped.append({"client": cid, "reason": reason})
        valid.sort(key=lambda u: u.client_id)  # a fixed order: identical sums on every transport
        rec = {"stage": stage, "round": rnd, "clients": [u.client_id for u in valid], "dropped": dropped}
        if not valid:
            log.warning("round %s%d: no valid update; the global state stays as it was", stage, rnd)
        else:
            agg = aggregate([u.tensors for u in valid], [float(u.num_examples) for u in valid], self.strategy)
            if stage == STAGE_GATE:
                self.state.update(agg)
            else:
                self.state.update(self.opt.step(expected, agg))
            for key in sorted({k for u in valid for k in u.metrics}):
                vals = [u.metrics[key] for u in valid if key in u.metrics]
                rec[key] = sum(vals) / len(vals)
            rec["client_metrics"] = {str(u.client_id): dict(u.metrics) for u in valid}
        rec["aggregate_s"] = time.perf_counter() - t0
        return rec

    def state_dict(self) -> dict:
        return {"global": {k: v.clone() for k, v in self.state.items()}, "opt": self.opt.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        missing = set(self.state) ^ set(sd["global"])
        if missing:
            raise ValueError(f"server checkpoint tensors differ from this run's adapter: {sorted(missing)}")
        self.state = {k: v.clone() for k, v in sd["global"].items()}
        self.opt.load_state_dict(sd["opt"])
