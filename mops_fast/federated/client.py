"""Local training of one client, independent of transport (in-process simulation or a Flower ClientApp).

A client receives the global adapter tensors (MoPs, prompt or LoRA), loads them into the (shared, frozen)
backbone's adapter, trains
them for E local steps on its own records with the project's Trainer (a fresh optimizer every round, as
in FedAvg), and returns the trained tensors with its example count and metrics. Batches are a pure
function of (run seed, stage, round, client id), so any transport reproduces the same update.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mops_fast.hf.adapter import trained_adapter
from mops_fast.train.trainer import NonFiniteLossError, TrainConfig, Trainer

STAGE_GATE, STAGE_TRAIN = "A", "B"


@dataclass
class ClientUpdate:
    client_id: int
    tensors: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def client_seed(run_seed: int, stage: str, rnd: int, client_id: int) -> int:
    """A distinct, reproducible seed per (run, stage, round, client)."""
    s = {STAGE_GATE: 1, STAGE_TRAIN: 2}[stage]
    return (int(run_seed) * 1_000_003 + s * 7_919 + int(rnd) * 104_729 + int(client_id) * 15_485_863) % (2**31 - 1)


def gate_keys(mops) -> list[str]:
    return [k for k in mops.state_dict() if k.startswith("gate.")]


def get_state(mops, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the adapter tensors (all of them, or `keys`): what travels."""
    sd = mops.state_dict()
    keys = list(sd) if keys is None else keys
    return {k: sd[k].detach().cpu().clone() for k in keys}


@torch.no_grad()
def set_state(mops, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the adapter's tensors (a subset of keys is allowed: stage A sends the gate only)."""
    sd = mops.state_dict()
    unknown = sorted(set(state) - set(sd))
    if unknown:
        raise ValueError(f"global state holds tensors {unknown} that this adapter lacks ({sorted(sd)[:6]}...): "
                         "server and client were built with different adapter configs")
    for k, v in state.items():
        if v.shape != sd[k].shape:
            raise ValueError(f"global tensor {k!r} has shape {tuple(v.shape)}, the adapter's is {tuple(sd[k].shape)}")
        sd[k].copy_(v)


@torch.no_grad()
def add_proximal_grad(anchors: list[tuple[torch.Tensor, torch.Tensor]], mu: float) -> None:
    """FedProx: p.grad += mu * (p - w_global) for each (parameter, global value), the gradient of
    mu/2 ||w - w_global||^2."""
    for p, w0 in anchors:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(p - w0, alpha=mu)


def local_train_config(train: dict, **fixed) -> TrainConfig:
    """TrainConfig for local steps: constant lr (no warmup/decay inside a round), no checkpoints."""
    d = dict(train)
    d.update(warmup_steps=0, min_lr_ratio=1.0, ckpt_every=0, log_every=0, progress=False)
    d.update(fixed)
    return TrainConfig.from_dict(d)


class LocalClient:
    """One client: its records on a backbone that already has MoPs attached (shared across clients)."""

    def __init__(self, client_id: int, model, tokenizer, records: list[dict], categories: list[str],
                 train: dict, run_seed: int):
        if not records:
            raise ValueError(f"client {client_id} holds no records")
        self.client_id, self.model, self.tok = int(client_id), model, tokenizer
        self.records, self.categories, self.train, self.run_seed = records, categories, dict(train), run_seed

    def _trainer(self, **fixed) -> Trainer:
        cfg = local_train_config(self.train, **fixed)
        return Trainer(self.model, self.tok, self.records, cfg, categories=self.categories)

    def fit(self, global_state: dict[str, torch.Tensor], rnd: int, local_steps: int,
            prox_mu: float = 0.0) -> ClientUpdate:
        """Stage B: E local steps on the LM loss from the global tensors (FedProx when prox_mu > 0)."""
        t0 = time.perf_counter()
        mops = trained_adapter(self.model)
        set_state(mops, global_state)
        seed = client_seed(self.run_seed, STAGE_TRAIN, rnd, self.client_id)
        trainer = self._trainer(steps=local_steps, seed=seed, gate_pretrain_steps=0)
        handle = None
        if prox_mu > 0:
            anchors = [(p, global_state[k].to(p)) for k, p in mops.named_parameters() if p.requires_grad]
            # Added just before the optimizer step, after the data gradient was clipped: clipping must not
            # weaken the pull toward the global model.
            handle = trainer.opt.register_step_pre_hook(lambda *_: add_proximal_grad(anchors, prox_mu))
        losses, tokens = [], 0
        self.model.train()
        try:
            for _ in range(local_steps):
                info = trainer.train_step()
                if not info.get("skipped"):  # a skipped step (non-finite loss) changed nothing
                    losses.append(info["loss"])
                tokens += info["tokens"]
        finally:
            if handle is not None:
                handle.remove()
            self.model.eval()
        dt = time.perf_counter() - t0
        if not losses:
            raise NonFiniteLossError(f"client {self.client_id}, round {rnd}: every one of its {local_steps} local "
                                     "steps had a non-finite loss or gradients; it has no update to send")
        metrics = {"loss_first": losses[0], "loss_last": losses[-1], "loss_mean": sum(losses) / len(losses),
                   "skipped_steps": float(local_steps - len(losses)),
                   "tokens": float(tokens), "train_s": dt, "tokens_per_s": tokens / dt if dt > 0 else 0.0}
        return ClientUpdate(self.client_id, get_state(mops), len(self.records), metrics)

    def fit_gate(self, global_gate: dict[str, torch.Tensor], rnd: int, local_steps: int, samples: int,
                 lr: float | None = None) -> ClientUpdate:
        """Stage A: train the gate alone on pooled features of this client's records (Trainer.pretrain_gate:
        category c -> expert c mod J), starting from the global gate; only gate tensors travel."""
        t0 = time.perf_counter()
        mops = trained_adapter(self.model)
        if mops.gate is None:
            raise ValueError("gate pretraining needs a gated adapter; the prompt baseline has no gate")
        set_state(mops, global_gate)
        fixed = {"gate_pretrain_steps": local_steps, "gate_pretrain_samples": samples,
                 "seed": client_seed(self.run_seed, STAGE_GATE, rnd, self.client_id)}
        if lr is not None:
            fixed["gate_pretrain_lr"] = lr
        info = self._trainer(**fixed).pretrain_gate()
        metrics = {"gate_loss": info["loss"], "routing_acc": info["routing_acc"],
                   "train_s": time.perf_counter() - t0}
        return ClientUpdate(self.client_id, get_state(mops, gate_keys(mops)), len(self.records), metrics)
