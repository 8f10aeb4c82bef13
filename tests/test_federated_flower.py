"""Flower over the network on loopback: a real SuperLink, two SuperNodes and `flwr run`, on a tiny random
Llama. The aggregated adapter must equal the in-process simulation's with the same seed and client order,
and the round-time split (local training / aggregation / transport) is measured and logged."""
import json
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mops_fast.federated.config import validate_config
from mops_fast.federated.loopback import round_split_table, run_loopback
from mops_fast.federated.run import federate
from tests._federated import tiny_config

NUM_NODES = 2  # one SuperNode per client; two keep the test short on a 2-core machine


def test_flower_loopback_run_equals_the_simulation(tmp_path):
    cfg = validate_config(tiny_config(tmp_path, rounds=2, gate_rounds=1, clients_per_round=2,
                                      strategy={"name": "fedavg"},
                                      partition={"num_clients": NUM_NODES, "scheme": "dominant", "k": 2}))
    cfg["flower"] = {"wait_nodes_s": 240, "round_timeout_s": 300}
    out_flower, out_sim = tmp_path / "out_flower", tmp_path / "out_sim"
    t_start = time.perf_counter()
    run_loopback(cfg, out_flower, tmp_path / "work", timeout_s=480, log=lambda m: None)
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
    for h in hf:
        assert h["transport_wall_s"] >= h["client_handler_max_s"] >= h["client_train_max_s"] > 0
        assert h["transport_overhead_s"] >= h["network_polling_s"] - 1e-6 and h["client_startup_max_s"] > 0
    table = round_split_table(rf)
    assert table.count("\n| mops | ") == len(hf) and "**all**" in table
    assert round_split_table(rs).count("\n") == 2  # the simulation has no transport to split
    report = f"Flower loopback ({NUM_NODES} SuperNodes, tiny Llama), whole run {wall:.0f} s:\n{table}"
    print(report)
    sys.__stderr__.write(report + "\n")


def FedInit(cfg):
    from mops_fast.federated.context import FedContext

    ctx = FedContext(cfg)
    try:
        return ctx.attach("mops")
    finally:
        ctx.detach()
