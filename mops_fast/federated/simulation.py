"""The round loop of one method, shared by every transport, and the in-process transport (the default).

`FederatedRun` owns the schedule: stage A (federated gate pretraining, mops only), then stage B rounds of
local training; per-round evaluation on the test subset; a checkpoint after every round. A dispatcher
delivers each round's work to the clients and returns their updates: `InProcessDispatcher` runs the
clients one after another on the one backbone in memory; the Flower dispatcher (flower_app.py) sends
them to SuperNodes. A run killed at any moment resumes from its last finished round and ends with the
same state as an uninterrupted run: every round is a pure function of (global state, seed, round).
Stage A does not depend on the stage-B learning rate, so the runs of a learning-rate search and the final
run share one stage A through `stage_a_dir` (its result is the same as a run's own stage A, bit for bit).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from mops_fast.federated.client import STAGE_GATE, STAGE_TRAIN, set_state
from mops_fast.federated.server import FederatedServer
from mops_fast.hf.adapter import save_adapter, trained_adapter
from mops_fast.train.evaluate import gate_result_keys

CKPT = "fed_checkpoint.pt"


def atomic_torch_save(obj, path: Path) -> None:
    """Write to a temporary file, flush it to disk, then rename: a kill leaves the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class InProcessDispatcher:
    """Simulated clients on the shared backbone, one after another (the adapter is reloaded per client)."""

    name = "simulation"

    def __init__(self, ctx):
        self.ctx = ctx

    def run_round(self, method: str, stage: str, rnd: int, clients: list[int], state: dict, spec: dict):
        updates = []
        for cid in clients:
            c = self.ctx.client(cid, method, lr=spec.get("lr"))
            if stage == STAGE_GATE:
                updates.append(c.fit_gate(state, rnd, spec["gate_local_steps"], spec["gate_samples"]))
            else:
                updates.append(c.fit(state, rnd, spec["local_steps"], spec["prox_mu"]))
        return updates, {}


class FederatedRun:
    """One method trained federatedly; `run()` returns its result dict (resuming from `out_dir` if present)."""

    def __init__(self, ctx, method: str, dispatcher=None, out_dir: str | Path | None = None,
                 lr: float | None = None, rounds: int | None = None, eval_records=None,
                 round_eval_records=None, log=print, stage_a_dir: str | Path | None = None):
        self.ctx, self.method, self.lr = ctx, method, lr
        self.stage_a_dir = Path(stage_a_dir) if stage_a_dir else None
        self.fed = ctx.fed
        self.rounds = int(rounds if rounds is not None else self.fed.rounds)
        self.gate_rounds = self.fed.gate_rounds if method == "mops" and ctx.method_config(method).gate else 0
        self.dispatcher = dispatcher or InProcessDispatcher(ctx)
        self.out = Path(out_dir) if out_dir else None
        self.eval_records = ctx.test if eval_records is None else eval_records
        self.round_eval_records = ctx.round_test if round_eval_records is None else round_eval_records
        self.log = log

    # -------------------------------------------------------------------------------- checkpoints
    def fingerprint(self, stage_a: bool = False) -> str:
        """Everything that determines the result; a checkpoint from another config is refused.
        `stage_a`: what determines stage A alone (all but the stage-B learning rate and round count)."""
        c = self.ctx.cfg
        train = self.ctx.method_train(self.method, self.lr)
        key = {"method": self.method, "lr": self.lr, "rounds": self.rounds, "model": c.get("model"),
               "seed": self.ctx.seed, "mops": self.ctx.adapter_settings(self.method), "train": train,
               "federated": c["federated"], "data": c["data"], "init": c.get("init"), "eval": self.ctx.eval_cfg}
        if stage_a:
            key.update(lr=None, rounds=None, train={k: v for k, v in train.items() if k != "lr"})
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _stage_a_path(self) -> Path | None:
        if self.stage_a_dir is None or not self.gate_rounds:
            return None
        return self.stage_a_dir / f"{self.method}-{self.fingerprint(stage_a=True)}.pt"

    def _reuse_stage_a(self, server, progress: dict, history: list) -> bool:
        """Take a finished stage A of the same config from `stage_a_dir` (an unreadable one is recomputed)."""
        p = self._stage_a_path()
        if p is None or progress["A"] or not p.is_file():
            return False
        before = server.state_dict()
        try:
            ck = torch.load(p, map_location="cpu", weights_only=True)
            if ck.get("fingerprint") != self.fingerprint(stage_a=True):
                raise ValueError("its fingerprint does not match its name")
            server.load_state_dict(ck["server"])
        except Exception as e:  # a cache: nothing is lost by training stage A again
            server.load_state_dict(before)
            self.log(f"[{self.method}] stage A in {p} is unreadable ({e}); training it again")
            p.unlink(missing_ok=True)
            return False
        history.extend(ck["history"])
        progress["A"] = self.gate_rounds
        self.log(f"[{self.method}] stage A ({self.gate_rounds} gate rounds) reused from {p}")
        return True

    def _keep_stage_a(self, server, history: list) -> None:
        p = self._stage_a_path()
        if p is not None and not p.is_file():
            atomic_torch_save({"fingerprint": self.fingerprint(stage_a=True), "server": server.state_dict(),
                               "history": [h for h in history if h.get("stage") == STAGE_GATE]}, p)

    @property
    def ckpt_path(self) -> Path | None:
        return self.out / CKPT if self.out else None

    def _save(self, server, progress: dict, history: list, final: dict | None = None) -> None:
        if self.ckpt_path is None:
            return
        atomic_torch_save({"fingerprint": self.fingerprint(), "progress": dict(progress), "server": server.state_dict(),
                           "history": history, "final": final}, self.ckpt_path)

    def _load(self):
        p = self.ckpt_path
        if p is None or not p.is_file():
            return None
        try:
            ck = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt file must not be silently trained over
            raise ValueError(f"checkpoint {p} is corrupt ({e}); delete it to start this method over") from e
        if ck.get("fingerprint") != self.fingerprint():
            raise ValueError(f"checkpoint {p} was written by a different config (method, data, schedule or "
                             "hyperparameters changed); delete it or choose another run name")
        return ck

    # -------------------------------------------------------------------------------- the loop
    def _spec(self) -> dict:
        f = self.fed
        return {"local_steps": f.local_steps, "prox_mu": f.strategy.mu, "gate_local_steps": f.gate_local_steps,
                "gate_samples": f.gate_samples, "lr": self.lr}

    def _evaluate(self, server, records) -> dict:
        set_state(trained_adapter(self.ctx.model), server.state)
        t0 = time.perf_counter()
        res = self.ctx.evaluate(records)
        return {"ppl": res["ppl"], "eval_s": time.perf_counter() - t0, **({"gate": res["gate"]} if "gate" in res else {})}

    def _round(self, server, stage: str, rnd: int, per_round: int) -> dict:
        t0 = time.perf_counter()
        clients = server.sample(stage, rnd, per_round)
        keys = server.keys(stage)
        updates, timing = self.dispatcher.run_round(self.method, stage, rnd, clients,
                                                    {k: server.state[k] for k in keys}, self._spec())
        t1 = time.perf_counter()
        failed = timing.pop("failed", [])  # clients that returned an error or nothing (transport level)
        rec = server.finish_round(stage, rnd, updates)
        rec["dropped"].extend(failed)
        rec.update(sampled=clients, dispatch_s=t1 - t0, round_s=time.perf_counter() - t0, **timing)
        return rec

    @staticmethod
    def _split(rec: dict) -> str:
        """'12.3 s' or, for a networked round, where the time went."""
        if "transport_overhead_s" not in rec:
            return f"{rec['round_s']:.1f} s"
        return (f"{rec['round_s']:.1f} s: local training {rec['client_train_max_s']:.2f} s, client setup "
                f"{rec['client_setup_max_s']:.2f} s, aggregation {rec['aggregate_s']:.3f} s, transport "
                f"{rec['transport_overhead_s']:.2f} s")

    def run(self) -> dict:
        ctx, fed, name = self.ctx, self.fed, self.method
        init_state = ctx.attach(name, init=True)
        try:
            server = FederatedServer(init_state, fed.strategy, ctx.seed, fed.partition.num_clients)
            progress, history = {"A": 0, "B": 0, "evaluated": -1}, []
            ck = self._load()
            if ck is not None:
                if ck.get("final") is not None:
                    self.log(f"[{name}] finished earlier; results from {self.ckpt_path}")
                    server.load_state_dict(ck["server"])
                    set_state(trained_adapter(ctx.model), server.state)
                    return {**ck["final"], "history": ck["history"], "final_state": dict(server.state)}
                server.load_state_dict(ck["server"])
                progress, history = dict(ck["progress"]), list(ck["history"])
                self.log(f"[{name}] resuming after stage A round {progress['A']}, stage B round {progress['B']}")

            if self._reuse_stage_a(server, progress, history):
                self._save(server, progress, history)
            for rnd in range(progress["A"], self.gate_rounds):
                rec = self._round(server, STAGE_GATE, rnd + 1, fed.gate_per_round)
                history.append(rec)
                progress["A"] = rnd + 1
                self._save(server, progress, history)
                self.log(f"[{name}] gate round {rnd + 1}/{self.gate_rounds}: clients {rec['clients']} "
                         f"loss {rec.get('gate_loss', float('nan')):.3f} routing acc "
                         f"{rec.get('routing_acc', float('nan')):.2f} ({self._split(rec)})")
                if rnd + 1 == self.gate_rounds and progress["B"] == 0:
                    self._keep_stage_a(server, history)

            for rnd in range(progress["B"], self.rounds + 1):
                if rnd > progress["B"]:  # round 0 is the initial state: evaluated, not trained
                    rec = self._round(server, STAGE_TRAIN, rnd, fed.clients_per_round)
                    progress["B"] = rnd
                    history.append(rec)
                    self.log(f"[{name}] round {rnd}/{self.rounds}: clients {rec['clients']} loss "
                             f"{rec.get('loss_first', float('nan')):.3f} -> {rec.get('loss_last', float('nan')):.3f} "
                             f"({self._split(rec)})" + (f", dropped {len(rec['dropped'])}" if rec["dropped"] else ""))
                due = fed.eval_every and rnd % fed.eval_every == 0 and rnd < self.rounds
                if due and progress["evaluated"] < rnd and self.round_eval_records:
                    ev = self._evaluate(server, self.round_eval_records)
                    history.append({"stage": "eval", "round": rnd, **ev})
                    progress["evaluated"] = rnd
                    self.log(f"[{name}] round {rnd}: test ppl (round subset) {ev['ppl']['mean']:.3f} "
                             f"({ev['eval_s']:.0f} s)")
                self._save(server, progress, history)

            ev = self._evaluate(server, self.eval_records)
            history.append({"stage": "eval", "round": self.rounds, "final": True, **ev})
            if self.round_eval_records is not self.eval_records and self.round_eval_records:
                sub = self._evaluate(server, self.round_eval_records)
                history.append({"stage": "eval", "round": self.rounds, **sub})
            train_s = sum(m["train_s"] for h in history if h.get("stage") == STAGE_TRAIN
                          for m in h.get("client_metrics", {}).values())
            tokens = sum(m.get("tokens", 0.0) for h in history if h.get("stage") == STAGE_TRAIN
                         for m in h.get("client_metrics", {}).values())
            final = {"ppl": ev["ppl"], "train_tokens_per_s": tokens / train_s if train_s else None,
                     "lr": float(ctx.method_train(name, self.lr)["lr"]), "rounds": self.rounds,
                     "gate_rounds": self.gate_rounds}
            final.update(gate_result_keys(ev))  # how many experts the global gate uses on the test records
            if self.out is not None:
                save_adapter(ctx.model, self.out / "adapter")  # the trained global adapter, loadable as usual
            self._save(server, progress, history, final=final)
            self.log(f"[{name}] final test ppl {ev['ppl']['mean']:.3f}")
            return {**final, "history": history, "final_state": dict(server.state)}
        finally:
            ctx.detach()
