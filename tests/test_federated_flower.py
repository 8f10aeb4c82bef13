"""Flower over the network on loopback: a real SuperLink, two SuperNodes and `flwr run`, on a tiny random
Llama. The aggregated adapter must equal the in-process simulation's with the same seed and client order,
and the round-time split (local training / aggregation / transport) is measured and logged."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mops_fast.federated.config import validate_config
from mops_fast.federated.flower_app import write_flower_app
from mops_fast.federated.run import federate
from tests._federated import tiny_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NUM_NODES = 2  # one SuperNode per client; two keep the test short on a 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ..., starttime at index 19), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _children() -> dict[int, list[int]]:
    """ppid -> child pids, from /proc (Linux)."""
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        st = _stat(int(d.name)) if d.name.isdigit() else None
        if st is not None:
            out.setdefault(int(st[1]), []).append(int(d.name))
    return out


def _alive(pid: int, start: str | None = None) -> bool:
    """Running (not a zombie) and, when `start` is given, still the same process (no PID reuse)."""
    st = _stat(pid)
    return st is not None and st[0] != "Z" and (start is None or st[19] == start)


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Terminate every process this test started and their descendants (SuperExec, ClientApps), by PID.
    Each PID is remembered with its start time, so a PID reused by an unrelated process is never signalled."""
    kids, tree = _children(), []
    todo = [p.pid for p in procs if p.poll() is None]  # a reaped child's PID may already be reused
    while todo:
        pid = todo.pop()
        st = _stat(pid)
        if st is not None:
            tree.append((pid, st[19]))
            todo += kids.get(pid, [])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, start in tree:
            if _alive(pid, start):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while any(_alive(pid, start) for pid, start in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    assert not [pid for pid, start in tree if _alive(pid, start)], "processes survived SIGKILL"


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path.name} missing)"


def test_flower_loopback_run_equals_the_simulation(tmp_path):
    cfg = validate_config(tiny_config(tmp_path, rounds=2, gate_rounds=1, clients_per_round=2,
                                      strategy={"name": "fedavg"},
                                      partition={"num_clients": NUM_NODES, "scheme": "dominant", "k": 2}))
    cfg["flower"] = {"wait_nodes_s": 240, "round_timeout_s": 300}
    home, logs = tmp_path / "flwr_home", tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    out_flower, out_sim = tmp_path / "out_flower", tmp_path / "out_sim"
    app = write_flower_app(tmp_path / "app", cfg, out_flower)
    # The SuperNode starts `flower-superexec` by name: the venv's bin must be on PATH even when the
    # tests run as `.venv/bin/python -m pytest` without an activated venv (as `make test` does).
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT), "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    procs: list[subprocess.Popen] = []

    def start(name, *args):
        f = open(logs / f"{name}.log", "wb")
        procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path, stdout=f,
                                      stderr=subprocess.STDOUT))
        return procs[-1]

    def diagnostics() -> str:
        return "\n".join(f"--- {p.name}\n{tail(p)}" for p in sorted(logs.glob("*.log"))) + \
            f"\n--- serverapp.log\n{tail(out_flower / 'serverapp.log')}"

    t_start = time.perf_counter()
    try:
        start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
              "--disable-runtime-dependency-installation")
        for i in range(NUM_NODES):
            start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={NUM_NODES}")
        # `flwr run` retries until the SuperLink's HTTP API is up
        deadline = time.monotonic() + 180
        while True:
            r = subprocess.run([str(BIN / "flwr"), "run", str(app), "loopback"], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=180)
            if r.returncode == 0 and "Successfully started run" in r.stdout:
                break
            assert time.monotonic() < deadline, f"flwr run failed:\n{r.stdout}\n{r.stderr}\n{diagnostics()}"
            time.sleep(2)
        deadline = time.monotonic() + 480
        while not (out_flower / "results.json").is_file():
            dead = [p.args[0] for p in procs if p.poll() is not None]
            assert not dead, f"{dead} exited early\n{diagnostics()}"
            assert "ServerApp failed" not in tail(out_flower / "serverapp.log"), diagnostics()
            assert time.monotonic() < deadline, f"no results in time\n{diagnostics()}"
            time.sleep(1)
    finally:
        stop_all(procs)
    assert all(p.returncode is not None for p in procs)
    wall = time.perf_counter() - t_start

    federate(cfg, out_sim, log=lambda m: None)  # the same run in-process
    a = load_file(str(out_flower / "mops" / "adapter" / "adapter.safetensors"))
    b = load_file(str(out_sim / "mops" / "adapter" / "adapter.safetensors"))
    assert set(a) == set(b) and {"prompt_k", "prompt_v"} <= set(a) and any(k.startswith("gate.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    init = FedInit(cfg)
    assert any(not torch.allclose(a[k], init[k]) for k in a)  # training really moved the adapter

    rf = json.loads((out_flower / "results.json").read_text())
    rs = json.loads((out_sim / "results.json").read_text())
    assert rf["transport"] == "flower" and rs["transport"] == "simulation"
    hf = [h for h in rf["methods"]["mops"]["history"] if h["stage"] in ("A", "B")]
    hs = [h for h in rs["methods"]["mops"]["history"] if h["stage"] in ("A", "B")]
    assert [(h["stage"], h["round"], h["clients"]) for h in hf] == [(h["stage"], h["round"], h["clients"]) for h in hs]
    assert [("A", 1), ("B", 1), ("B", 2)] == [(h["stage"], h["round"]) for h in hf]
    for x, y in zip(hf, hs):
        for key in ("loss_first", "loss_last", "gate_loss"):
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-5)
    assert rf["methods"]["mops"]["ppl"]["mean"] == pytest.approx(rs["methods"]["mops"]["ppl"]["mean"], rel=1e-5)

    # The round-time split of the Flower run
    rows = []
    for h in hf:
        assert h["transport_wall_s"] >= h["client_handler_max_s"] >= h["client_train_max_s"] > 0
        assert h["transport_overhead_s"] >= h["network_polling_s"] - 1e-6 and h["client_startup_max_s"] > 0
        rows.append({"round": f"{h['stage']}{h['round']}", "round_s": h["round_s"],
                     "local_train_s": h["client_train_max_s"], "client_setup_s": h["client_setup_max_s"],
                     "aggregate_s": h["aggregate_s"], "transport_s": h["transport_overhead_s"],
                     "startup_s": h["client_startup_max_s"], "network_s": h["network_polling_s"]})
    lines = [f"Flower loopback ({NUM_NODES} SuperNodes, tiny Llama), whole test {wall:.0f} s. Per round: local "
             "training = the slowest client's train steps; client setup = its model/data load in the ClientApp; "
             "transport = the rest of the round's wait, split into ClientApp start-up (process spawn, imports, "
             "FAB install) and network/polling (message hops between ServerApp, SuperLink and SuperNodes):"]
    for r in rows:
        lines.append("  round {round}: {round_s:.2f} s = local training {local_train_s:.3f} s + client setup "
                     "{client_setup_s:.3f} s + aggregation {aggregate_s:.4f} s + transport {transport_s:.2f} s "
                     "(ClientApp start-up {startup_s:.2f} s, network/polling ~{network_s:.2f} s)".format(**r))
    report = "\n".join(lines)
    print(report)
    (tmp_path / "round_time_split.txt").write_text(report)
    sys.__stderr__.write(report + "\n")


def FedInit(cfg):
    from mops_fast.federated.context import FedContext

    ctx = FedContext(cfg)
    try:
        return ctx.attach("mops")
    finally:
        ctx.detach()
