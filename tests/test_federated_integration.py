"""A short real federated run: SmolLM2-135M-Instruct on dolly15k, 3 clients with one category each, 2 rounds."""
import pytest

from mops_fast.federated.config import validate_config
from mops_fast.federated.context import FedContext
from mops_fast.federated.simulation import FederatedRun
from tests.conftest import DOLLY

CATS = ["brainstorming", "classification", "creative_writing"]


@pytest.mark.integration
def test_two_rounds_lower_perplexity_on_the_trained_categories(smollm2, tmp_path):
    cfg = validate_config({
        "name": "it", "model": "smollm2-135m", "seed": 0,
        "data": {"train": str(DOLLY / "train.jsonl"), "test": str(DOLLY / "test.jsonl"), "categories": CATS,
                 "test_per_category": 4},
        "methods": ["mops"],
        "mops": {"num_experts": 4, "prompt_len": 4, "gate_hidden": 32},
        "init": {"kv_samples": 8},
        "train": {"batch_size": 2, "lr": 1e-2, "max_length": 128},
        "federated": {"partition": {"num_clients": 3, "scheme": "dominant", "k": 1},
                      "rounds": 2, "clients_per_round": 3, "local_steps": 2, "gate_rounds": 1,
                      "gate_local_steps": 20, "gate_samples": 8, "eval_every": 2},
    })
    ctx = FedContext(cfg)
    ctx.backbone = smollm2  # the session's model; FederatedRun detaches what it attaches
    # each client holds exactly one of the categories
    assert sorted({r["category"] for c in range(3) for r in ctx.client_records(c)}) == CATS
    assert all(len({r["category"] for r in ctx.client_records(c)}) == 1 for c in range(3))
    res = FederatedRun(ctx, "mops", out_dir=tmp_path / "mops", log=print).run()
    evals = [h for h in res["history"] if h["stage"] == "eval"]
    start, end = evals[0]["ppl"], res["ppl"]
    assert evals[0]["round"] == 0
    assert end["mean"] < 0.98 * start["mean"], (start, end)
    assert sum(end[c] < start[c] for c in CATS) >= 2, (start, end)
    gate = [h for h in res["history"] if h["stage"] == "A"][0]
    assert gate["clients"] == [0, 1, 2] and gate["routing_acc"] > 0.5
    assert not hasattr(smollm2[0], "mops")
