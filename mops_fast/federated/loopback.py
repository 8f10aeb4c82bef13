"""A whole Flower deployment on this machine: one SuperLink and one SuperNode per client on loopback, the
run submitted with `flwr run`, everything stopped afterwards. The same processes and messages as a run
across machines, only the addresses differ (docs/federated.md), so its round times show what Flower's
transport costs.

    mops-fast federate --config configs/flower_smollm2.yaml --flower-loopback
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


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


def stop_all(procs: list[subprocess.Popen]) -> list[int]:
    """Terminate the processes and their descendants (SuperExec, ClientApps), by PID. Each PID is remembered
    with its start time, so a PID reused by an unrelated process is never signalled. Returns survivors."""
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
    return [pid for pid, start in tree if _alive(pid, start)]


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path.name} missing)"


class LoopbackError(RuntimeError):
    pass


def run_loopback(cfg: dict, out: Path, work: Path, timeout_s: float = 3600.0, log=print) -> Path:
    """Run the validated federated config `cfg` through Flower on loopback; results land in `out` as with the
    simulation. `work` holds FLWR_HOME, the App and the process logs. Returns the results.json path."""
    from mops_fast.federated.flower_app import write_flower_app

    out, work = Path(out), Path(work)
    home, logs = work / "flwr_home", work / "logs"
    home.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    (out / "results.json").unlink(missing_ok=True)  # a finished earlier run must not look like this one's
    n = cfg["federated"]["partition"]["num_clients"]
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    app = write_flower_app(work / "app", cfg, out)
    # SuperNodes start `flower-superexec` by name: this interpreter's bin must be on PATH; ClientApps
    # inherit PYTHONPATH, so mops_fast imports even when it is not pip-installed.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    threads = cfg.get("threads")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    procs: list[subprocess.Popen] = []

    def start(name, *args):
        f = open(logs / f"{name}.log", "wb")
        procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=work, stdout=f,
                                      stderr=subprocess.STDOUT))

    def diagnostics() -> str:
        return "\n".join(f"--- {p.name}\n{tail(p)}" for p in sorted(logs.glob("*.log"))) + \
            f"\n--- serverapp.log\n{tail(out / 'serverapp.log')}"

    try:
        start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
              "--disable-runtime-dependency-installation")
        for i in range(n):
            start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={n}")
        log(f"SuperLink on 127.0.0.1:{link}, {n} SuperNodes; logs in {logs}")
        deadline = time.monotonic() + 180  # `flwr run` fails until the SuperLink's API is up
        while True:
            r = subprocess.run([str(BIN / "flwr"), "run", str(app), "loopback"], env=env, cwd=work,
                               capture_output=True, text=True, timeout=180)
            if r.returncode == 0 and "Successfully started run" in r.stdout:
                break
            if time.monotonic() > deadline:
                raise LoopbackError(f"flwr run failed:\n{r.stdout}\n{r.stderr}\n{diagnostics()}")
            time.sleep(2)
        log(f"run submitted; progress in {out / 'serverapp.log'}")
        deadline = time.monotonic() + timeout_s
        while not (out / "results.json").is_file():
            dead = [p.args[0] for p in procs if p.poll() is not None]
            if dead:
                raise LoopbackError(f"{dead} exited early\n{diagnostics()}")
            if "ServerApp failed" in tail(out / "serverapp.log"):
                raise LoopbackError(diagnostics())
            if time.monotonic() > deadline:
                raise LoopbackError(f"no results after {timeout_s:.0f} s\n{diagnostics()}")
            time.sleep(1)
    finally:
        survivors = stop_all(procs)
    if survivors:
        raise LoopbackError(f"processes {survivors} survived SIGKILL")
    return out / "results.json"


SPLIT_KEYS = ("round_s", "client_train_max_s", "client_setup_max_s", "aggregate_s", "transport_overhead_s",
              "client_startup_max_s", "network_polling_s")


def round_split_table(results: dict) -> str:
    """Markdown: where each Flower round's time went, per method and round."""
    lines = ["| method | round | round s | local training s | client setup s | aggregation s | transport s "
             "| of which ClientApp start-up s | of which network/polling s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    tot = dict.fromkeys(SPLIT_KEYS, 0.0)
    for m, e in results["methods"].items():
        for h in e.get("history", []):
            if h.get("stage") not in ("A", "B") or "transport_overhead_s" not in h:
                continue
            lines.append(f"| {m} | {h['stage']}{h['round']} | " + " | ".join(
                f"{h[k]:.3f}" if k == "aggregate_s" else f"{h[k]:.2f}" for k in SPLIT_KEYS) + " |")
            for k in SPLIT_KEYS:
                tot[k] += h[k]
    if tot["round_s"] > 0:
        lines.append("| **all** | | " + " | ".join(
            f"{tot[k]:.2f} ({100 * tot[k] / tot['round_s']:.0f}%)" if k != "round_s" else f"{tot[k]:.2f}"
            for k in SPLIT_KEYS) + " |")
    return "\n".join(lines) + "\n"
