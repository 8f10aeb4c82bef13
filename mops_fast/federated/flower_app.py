"""Flower (flwr >= 1.42) ServerApp and ClientApp around the same round, client and server logic.

The ServerApp runs `federate()` (run.py) with a dispatcher that sends each round's work to SuperNodes
through the SuperLink instead of training in-process: one SuperNode per client, identified by its node
config `partition-id` (0..C-1). Only the adapter tensors travel. The whole validated run config travels in
the Flower run config (key `federate-config`, JSON), so every machine trains with the same settings; a
SuperNode may point `train-file` (node config) at its own private JSON Lines file instead of its slice of
the shared training file. `write_flower_app` writes the Flower App folder that `flwr run` submits.

Flower 1.42 carries the Fleet API (SuperLink <-> SuperNodes) over HTTP(S); older releases used gRPC.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from mops_fast.federated.client import STAGE_GATE, ClientUpdate

CONFIG_KEY = "federate-config"
OUT_KEY = "out-dir"
log = logging.getLogger("mops_fast.federated")


# ------------------------------------------------------------------------------------------ encoding
def to_array_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    rec = ArrayRecord()
    for k, v in tensors.items():
        rec[k] = Array.from_numpy_ndarray(np.ascontiguousarray(v.detach().cpu().numpy()))
    return rec


def from_array_record(rec: ArrayRecord) -> dict[str, torch.Tensor]:
    # np.load of the wire bytes keeps the sender's dtype and shape: the server validates both.
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in rec.items()}


# ------------------------------------------------------------------------------------------ server side
class FlowerDispatcher:
    """Delivers a round to the SuperNodes of the sampled clients and collects their updates."""

    name = "flower"

    def __init__(self, grid: Grid, ctx, wait_nodes_s: float = 300.0, round_timeout_s: float | None = None,
                 logf=print):
        self.grid, self.ctx = grid, ctx
        self.wait_nodes_s, self.round_timeout_s = float(wait_nodes_s), round_timeout_s
        self.nodes: dict[int, int] | None = None  # client id -> node id
        self.log = logf

    def prepare(self) -> None:
        if self.nodes is None:
            self._discover()

    def _discover(self) -> None:
        """Wait for the SuperNodes and learn which client (partition-id) each one serves."""
        C = self.ctx.fed.partition.num_clients
        deadline = time.monotonic() + self.wait_nodes_s
        while True:
            ids = sorted(self.grid.get_node_ids())
            if len(ids) >= C:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(ids)} SuperNode(s) connected after {self.wait_nodes_s:.0f} s; this run has "
                    f"{C} clients and needs one SuperNode per client: start `flower-supernode ... "
                    f"--node-config 'partition-id=<i>'` for each i in 0..{C - 1}")
            time.sleep(1.0)
        msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY, group_id="discover")
                for n in ids]
        nodes: dict[int, int] = {}
        for r in self.grid.send_and_receive(msgs, timeout=self.wait_nodes_s):
            if r.has_error():
                self.log(f"SuperNode {r.metadata.src_node_id} failed the query: {r.error.reason}")
                continue
            cid = int(r.content["info"]["client-id"])
            if cid in nodes:
                raise RuntimeError(f"two SuperNodes ({nodes[cid]}, {r.metadata.src_node_id}) claim partition-id "
                                   f"{cid}; give every SuperNode its own partition-id")
            nodes[cid] = r.metadata.src_node_id
        missing = [c for c in range(C) if c not in nodes]
        if missing:
            raise RuntimeError(f"no SuperNode serves client(s) {missing}; start one with "
                               f"--node-config 'partition-id=<i>' for each")
        self.nodes = nodes
        self.log("SuperNodes: " + ", ".join(f"client {c} -> node {n}" for c, n in sorted(nodes.items())))

    def run_round(self, method: str, stage: str, rnd: int, clients: list[int], state: dict, spec: dict):
        if self.nodes is None:
            self._discover()
        conf = {"method": method, "stage": stage, "round": int(rnd), "local-steps": int(spec["local_steps"]),
                "prox-mu": float(spec["prox_mu"]), "gate-local-steps": int(spec["gate_local_steps"]),
                "gate-samples": int(spec["gate_samples"])}
        if spec.get("lr") is not None:
            conf["lr"] = float(spec["lr"])
        msgs = [Message(RecordDict({"global": to_array_record(state), "config": ConfigRecord(conf)}),
                        dst_node_id=self.nodes[c], message_type=MessageType.TRAIN, group_id=f"{method}/{stage}{rnd}")
                for c in clients]
        t0 = time.perf_counter()
        replies = list(self.grid.send_and_receive(msgs, timeout=self.round_timeout_s))
        wall = time.perf_counter() - t0
        by_node = {n: c for c, n in self.nodes.items()}
        updates, failed, seen = [], [], set()
        handler, train, setup, startup = [], [], [], []
        for r in replies:
            cid = by_node.get(r.metadata.src_node_id)
            seen.add(cid)
            if cid is None:
                reason, cid = "reply from a node that serves no client of this run", f"node {r.metadata.src_node_id}"
            elif r.has_error():
                reason = f"client error {r.error.code}: {r.error.reason}"
            else:
                try:
                    met = dict(r.content["metrics"])
                    n = met.pop("num-examples")
                    handler.append(float(met.get("handler_s", 0.0)))
                    train.append(float(met.get("train_s", 0.0)))
                    setup.append(float(met.get("setup_s", 0.0)))
                    startup.append(float(met.get("startup_s", 0.0)) + handler[-1])
                    updates.append(ClientUpdate(cid, from_array_record(r.content["update"]), n, met))
                    continue
                except Exception as e:  # garbage from a client must not stop the round
                    reason = f"unreadable reply ({type(e).__name__}: {e})"
            self.log(f"round {stage}{rnd}: client {cid} failed: {reason}")
            failed.append({"client": cid, "reason": reason})
        for c in clients:
            if c not in seen:
                failed.append({"client": c, "reason": f"no reply within the round timeout ({self.round_timeout_s} s)"})
        timing = {"failed": failed, "transport_wall_s": wall,
                  "client_handler_max_s": max(handler, default=0.0), "client_train_max_s": max(train, default=0.0),
                  "client_setup_max_s": max(setup, default=0.0),
                  # what the round waited for beyond the slowest client's own work: serialization, the
                  # SuperLink/SuperNode hops and polling, ClientApp process start-up and imports ...
                  "transport_overhead_s": wall - max(handler, default=0.0),
                  # ... of which the ClientApp process start-up (spawn, imports) of the slowest client
                  "client_startup_max_s": max((s - h for s, h in zip(startup, handler)), default=0.0),
                  # ... and the rest: messages and polling between ServerApp, SuperLink and SuperNodes
                  "network_polling_s": wall - max(startup, default=0.0)}
        return updates, timing


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    from mops_fast.federated.run import federate

    cfg = json.loads(str(context.run_config[CONFIG_KEY]))
    out = Path(str(context.run_config[OUT_KEY]))
    out.mkdir(parents=True, exist_ok=True)
    logfile = out / "serverapp.log"

    def logf(msg: str) -> None:
        line = time.strftime("%H:%M:%S ") + msg
        print(line, flush=True)
        with open(logfile, "a") as f:
            f.write(line + "\n")

    flower = cfg.get("flower") or {}
    try:
        federate(cfg, out, make_dispatcher=lambda ctx: FlowerDispatcher(grid, ctx, logf=logf, **flower), log=logf)
    except Exception as e:
        logf(f"ServerApp failed: {type(e).__name__}: {e}")
        raise


# ------------------------------------------------------------------------------------------ client side
_CTX: dict[str, object] = {}


def _fed_context(context: Context):
    from mops_fast.federated.context import FedContext

    key = str(context.run_config[CONFIG_KEY])
    if key not in _CTX:  # a ClientApp process may serve several messages of one run
        _CTX.clear()
        _CTX[key] = FedContext(json.loads(key))
    return _CTX[key]


def _client_id(context: Context, ctx) -> int:
    nc = context.node_config
    C = ctx.fed.partition.num_clients
    if "partition-id" not in nc:
        raise ValueError(f"this SuperNode has no partition-id: start it with --node-config 'partition-id=<i>' "
                         f"(i in 0..{C - 1})")
    cid = int(nc["partition-id"])
    if not 0 <= cid < C:
        raise ValueError(f"partition-id={cid} is outside 0..{C - 1} (the run has {C} clients)")
    if "num-partitions" in nc and int(nc["num-partitions"]) != C:
        raise ValueError(f"node config num-partitions={nc['num-partitions']} but the run has {C} clients")
    return cid


client_app = ClientApp()


@client_app.query()
def client_query(msg: Message, context: Context) -> Message:
    cid = _client_id(context, _fed_context(context))
    return Message(RecordDict({"info": ConfigRecord({"client-id": cid})}), reply_to=msg)


def _process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere): the ClientApp start-up cost."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    startup = _process_age_s()
    ctx = _fed_context(context)
    cid = _client_id(context, ctx)
    conf = msg.content["config"]
    method, stage, rnd = str(conf["method"]), str(conf["stage"]), int(conf["round"])
    records = None
    if "train-file" in context.node_config:  # this node's own private data instead of a partition slice
        from mops_fast.train.data import load_records

        records = load_records(str(context.node_config["train-file"]))
    state = from_array_record(msg.content["global"])
    ctx.attach(method, init=False)
    try:
        client = ctx.client(cid, method, lr=conf.get("lr"), records=records)
        setup = time.perf_counter() - t0
        if stage == STAGE_GATE:
            upd = client.fit_gate(state, rnd, int(conf["gate-local-steps"]), int(conf["gate-samples"]))
        else:
            upd = client.fit(state, rnd, int(conf["local-steps"]), float(conf["prox-mu"]))
    finally:
        ctx.detach()
    metrics = {k: float(v) for k, v in upd.metrics.items()}
    metrics.update({"num-examples": int(upd.num_examples), "setup_s": setup, "startup_s": startup,
                    "handler_s": time.perf_counter() - t0})
    return Message(RecordDict({"update": to_array_record(upd.tensors), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


# ------------------------------------------------------------------------------------------ app folder
def write_flower_app(app_dir, cfg: dict, out_dir) -> Path:
    """Write a Flower App (pyproject.toml) whose run config carries `cfg`; `flwr run DIR <connection>` runs it.

    The components refer to this module, so every machine needs mops_fast installed (the App folder holds
    no code); Flower's runtime dependency installation is not needed and may be disabled."""
    import tomli_w

    d = Path(app_dir)
    d.mkdir(parents=True, exist_ok=True)
    doc = {
        "project": {"name": "mops-fast-federated", "version": "1.0.0", "license": "Apache-2.0",
                    "description": f"mops_fast federated run {cfg.get('name', '')!s}",
                    "dependencies": ["mops_fast[federated]"]},
        "tool": {"flwr": {"app": {
            "publisher": "mops-fast",
            "components": {"serverapp": "mops_fast.federated.flower_app:server_app",
                           "clientapp": "mops_fast.federated.flower_app:client_app"},
            "config": {CONFIG_KEY: json.dumps(cfg, sort_keys=True), OUT_KEY: str(Path(out_dir).resolve())},
        }}},
    }
    tmp = d / "pyproject.toml.tmp"
    tmp.write_text(tomli_w.dumps(doc))
    tmp.replace(d / "pyproject.toml")
    return d.resolve()
