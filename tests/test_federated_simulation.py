"""In-process simulation: resume after a kill (in-process and a real SIGKILL) equals the uninterrupted run;
checkpoints are atomic and refused when corrupt or foreign; `federate` writes the DESIGN §6 results."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mops_fast.federated.client import LocalClient
from mops_fast.federated.config import validate_config
from mops_fast.federated.context import FedContext
from mops_fast.federated.run import federate
from mops_fast.federated.simulation import CKPT, FederatedRun
from tests._federated import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_for(tmp_path, **fed):
    fed.setdefault("rounds", 3)
    fed.setdefault("eval_every", 1)
    fed.setdefault("strategy", {"name": "fedadam"})  # server optimizer moments must survive the restart
    return validate_config(tiny_config(tmp_path, **fed))


def run(cfg, out):
    return FederatedRun(FedContext(cfg), "mops", out_dir=out, log=lambda m: None).run()


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def killed_at_fit(monkeypatch, n: int, start) -> None:
    """start() with the n-th LocalClient.fit call raising KeyboardInterrupt (a kill mid-round); fit is
    whole again afterwards."""
    real_fit, calls = LocalClient.fit, []

    def dying_fit(self, *a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("killed")
        return real_fit(self, *a, **k)

    monkeypatch.setattr(LocalClient, "fit", dying_fit)
    with pytest.raises(KeyboardInterrupt):
        start()
    monkeypatch.setattr(LocalClient, "fit", real_fit)


def test_resume_after_a_kill_mid_round_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path)
    ref = run(cfg, tmp_path / "ref")
    killed_at_fit(monkeypatch, 4, lambda: run(cfg, tmp_path / "b"))  # the 2nd client of round 2
    ck = torch.load(tmp_path / "b" / CKPT, weights_only=True)
    assert ck["progress"]["A"] == 1 and ck["progress"]["B"] == 1  # round 1 was saved, round 2 was not
    resumed = run(cfg, tmp_path / "b")
    assert_same(resumed["final_state"], ref["final_state"])
    assert resumed["ppl"] == ref["ppl"]
    strip = lambda h: [{k: v for k, v in x.items() if not k.endswith("_s") and k not in ("client_metrics", "tokens_per_s")}
                       for x in h]
    assert strip(resumed["history"]) == strip(ref["history"])  # nothing lost, nothing done twice
    again = run(cfg, tmp_path / "b")  # a finished run only reports
    assert_same(again["final_state"], ref["final_state"])


def test_sigkill_at_any_moment_then_resume(tmp_path):
    """A real process killed with SIGKILL after its first checkpoint, then resumed here."""
    cfg = cfg_for(tmp_path, rounds=25, eval_every=0, local_steps=2, strategy={"name": "fedavg"})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "killed"
    code = ("import json,sys; from mops_fast.federated.context import FedContext;"
            "from mops_fast.federated.simulation import FederatedRun;"
            "cfg=json load".replace("json load", "json.load(open(sys.argv[1]))") + ";"
            "FederatedRun(FedContext(cfg),'mops',out_dir=sys.argv[2],log=lambda m:None).run()")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cfg.json"), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out / CKPT).is_file():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the simulation wrote no checkpoint in time"
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere inside a later round (or inside a checkpoint write)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ck = torch.load(out / CKPT, weights_only=True)
    assert ck["final"] is None and ck["progress"]["B"] < 25, "the process finished before the kill"
    resumed = run(cfg, out)
    ref = run(cfg, tmp_path / "ref")
    assert_same(resumed["final_state"], ref["final_state"])


def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    cfg = cfg_for(tmp_path, rounds=1)
    run(cfg, tmp_path / "a")
    other = cfg_for(tmp_path, rounds=2)
    with pytest.raises(ValueError, match="different config"):
        run(other, tmp_path / "a")
    (tmp_path / "a" / CKPT).write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        run(cfg, tmp_path / "a")


def test_federate_writes_results_table_and_plots(tmp_path):
    c = tiny_config(tmp_path, rounds=2, eval_every=1)
    c["methods"] = ["none", "prompt", "mops"]
    c["data"]["round_test_per_category"] = 2
    c["lr_search"] = {"methods": ["prompt"], "candidates": [1e-3, 1e-2], "rounds": 1, "heldout_per_category": 2}
    res = federate(validate_config(c), tmp_path / "run", log=lambda m: None)
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved["setting"] == "federated" and saved["methods"].keys() == {"none", "prompt", "mops"}
    for key in ("model", "data", "compression", "steps", "seed", "partition"):
        assert key in saved
    assert saved["partition"]["scheme"] == "dominant" and sum(saved["partition"]["sizes"]) == 96 - 8
    for m in ("none", "prompt", "mops"):
        ppl = saved["methods"][m]["ppl"]
        assert set(ppl) == {"lower", "repeat", "reverse", "upper", "mean"} and "train_tokens_per_s" in saved["methods"][m]
    assert saved["methods"]["prompt"]["lr"] in (1e-3, 1e-2) and set(saved["methods"]["prompt"]["lr_search"]) == {"0.001", "0.01"}
    rounds = [h["round"] for h in saved["methods"]["mops"]["history"] if h["stage"] == "eval" and not h.get("final")]
    assert rounds == [0, 1, 2]
    md = (out / "results.md").read_text()
    assert "| **mean** |" in md and "federated (scheme=dominant, num_clients=3" in md
    # the global gate's use of its experts on the test records, and the prompt's search, in the table
    assert 1.0 <= saved["methods"]["mops"]["gate_effective_experts"] <= 2.0 and "gate_max_weight" in saved["methods"]["mops"]
    assert "| gate: effective experts | - | - | %.2f |" % saved["methods"]["mops"]["gate_effective_experts"] in md
    assert "| lr search (held-out ppl) | - | 0.001: " in md
    for f in ("ppl_per_round.png", "partition.png", "partition.csv", "partition.md", "mops/adapter/adapter.safetensors"):
        assert (out / f).is_file(), f
    assert res["methods"]["mops"]["ppl"] == saved["methods"]["mops"]["ppl"]


def test_config_errors_name_the_fix(tmp_path):
    base = tiny_config(tmp_path)
    with pytest.raises(ValueError, match=r"clients_per_round=5 must be in 1..partition.num_clients=3"):
        validate_config({**base, "federated": {**base["federated"], "clients_per_round": 5}})
    with pytest.raises(ValueError, match="set by the federated schedule"):
        validate_config({**base, "train": {"steps": 10}})
    with pytest.raises(ValueError, match="unknown keys \\['rounds'\\]"):
        validate_config({**base, "rounds": 3})
    with pytest.raises(ValueError, match="federated: unknown keys"):
        validate_config({**base, "federated": {"round": 3}})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FedContext(validate_config({**base, "data": {"train": str(tmp_path / "nope.jsonl"), "test": "x"}})).train


def test_lora_reference_trains_federated_and_resumes(tmp_path, monkeypatch):
    # the outside reference in the same rounds: only its A and B tensors travel (PEFT's names), no stage A
    c = tiny_config(tmp_path, rounds=3, eval_every=0, strategy={"name": "fedavg"})
    c["methods"] = ["none", "lora"]
    c["lora"] = {"r": 4, "alpha": 8}
    c["lr_search"] = {"methods": ["lora"], "candidates": {"lora": [3e-3, 3e-2], "default": [1e-2]},
                      "rounds": 1, "heldout_per_category": 2}
    cfg = validate_config(c)
    res = federate(cfg, tmp_path / "run", log=lambda m: None)["methods"]
    assert res["lora"]["ppl"]["mean"] < res["none"]["ppl"]["mean"], res
    assert res["lora"]["gate_rounds"] == 0 and set(res["lora"]["lr_search"]) == {"0.003", "0.03"}
    assert (tmp_path / "run" / "lora" / "adapter" / "adapter_model.safetensors").is_file()

    ctx = FedContext(cfg)
    state = ctx.attach("lora")
    ctx.detach()
    assert state and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in state)
    assert all(k.startswith("base_model.model.model.layers.") for k in state)
    lr = res["lora"]["lr"]
    ref = FederatedRun(FedContext(cfg), "lora", out_dir=tmp_path / "ref", lr=lr, log=lambda m: None).run()
    killed_at_fit(monkeypatch, 3, lambda: FederatedRun(FedContext(cfg), "lora", out_dir=tmp_path / "b", lr=lr,
                                                       log=lambda m: None).run())  # round 2's first client
    resumed = FederatedRun(FedContext(cfg), "lora", out_dir=tmp_path / "b", lr=lr, log=lambda m: None).run()
    assert_same(resumed["final_state"], ref["final_state"])
    assert resumed["ppl"] == ref["ppl"]
    with pytest.raises(ValueError, match=r"lr_search.candidates.lora must be a non-empty list"):
        validate_config({**c, "lr_search": {**c["lr_search"], "candidates": {"lora": []}}})
    with pytest.raises(ValueError, match="unknown methods"):
        validate_config({**c, "lr_search": {**c["lr_search"], "candidates": {"lroa": [1e-3]}}})
    with pytest.raises(ValueError, match="lora: r must be"):
        validate_config({**c, "lora": {"r": 0}})


def test_stage_a_is_shared_across_learning_rates_and_equals_a_runs_own(tmp_path, monkeypatch):
    """The runs of a learning-rate search and the final run share one stage A (`stage_a_dir`): the same
    result as each run's own stage A, bit for bit; an unreadable cached stage A is trained again."""
    cfg = cfg_for(tmp_path, rounds=2, gate_rounds=2)
    ctx, cache = FedContext(cfg), tmp_path / "stage_a"
    fr = lambda out, lr, **k: FederatedRun(ctx, "mops", out_dir=tmp_path / out, lr=lr, log=logs.append, **k).run()
    logs = []
    ref = fr("ref", 3e-2)                                    # its own stage A, no cache
    first = fr("a", 1e-2, stage_a_dir=cache)                 # trains stage A and keeps it
    (kept,) = cache.iterdir()
    real, calls = LocalClient.fit_gate, []
    monkeypatch.setattr(LocalClient, "fit_gate", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    logs.clear()
    shared = fr("b", 3e-2, stage_a_dir=cache)
    assert calls == [] and any("reused" in m for m in logs)  # no gate round ran
    assert_same(shared["final_state"], ref["final_state"])
    assert shared["ppl"] == ref["ppl"]
    gate = lambda r: [{k: h[k] for k in ("round", "clients", "gate_loss")} for h in r["history"] if h["stage"] == "A"]
    assert gate(shared) == gate(ref) == gate(first)

    kept.write_bytes(b"\x00" * 10)  # a corrupt cache loses nothing: stage A runs again
    logs.clear()
    again = fr("c", 3e-2, stage_a_dir=cache)
    assert len(calls) == 2 * 2 and any("unreadable" in m for m in logs)
    assert_same(again["final_state"], ref["final_state"])
    logs.clear()
    fr("d", 1e-2, stage_a_dir=cache)                         # ... and is kept again
    assert len(calls) == 2 * 2 and any("reused" in m for m in logs)
    # another gate schedule is another stage A
    other = FederatedRun(FedContext(cfg_for(tmp_path, rounds=2, gate_rounds=2, gate_local_steps=3)), "mops",
                         lr=3e-2, stage_a_dir=cache)
    assert other._stage_a_path() != kept
