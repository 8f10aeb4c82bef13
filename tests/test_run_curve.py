"""The centralized runner's learning curve (`eval.every`): points on the test records, the finished model's
evaluation as the last one, training unchanged by it, kept when a finished run is reused."""
import json
from pathlib import Path

import pytest

from mops_fast.train.run import check_config, run

CATS = ["a", "b"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from mops_fast.federated.backbone import tiny_llama

    d = tmp_path_factory.mktemp("curve")
    model, tok = tiny_llama("tiny-llama")
    model.save_pretrained(d / "tiny")
    tok.save_pretrained(d / "tiny")
    recs = [{"instruction": f"question {i} about {c}?", "context": "", "response": f"answer {i} {c}", "category": c}
            for c in CATS for i in range(12)]
    for split in ("train", "test"):
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")

    def cfg(name, **ev):
        return check_config({
            "name": name, "out_dir": str(d / "runs"), "model": str(d / "tiny"), "dtype": "float32", "seed": 0,
            "methods": ["prompt", "mops"], "data": {"train": str(d / "train.jsonl"), "test": str(d / "test.jsonl"),
                                                    "test_per_category": 3},
            "mops": {"num_experts": 2, "prompt_len": 2, "gate_hidden": 8}, "init": {"kv_samples": 2},
            "train": {"steps": 5, "batch_size": 2, "max_length": 64, "warmup_steps": 1, "lr": 3e-2,
                      "gate_pretrain_steps": 2, "gate_pretrain_samples": 4, "log_every": 1, "progress": False},
            "eval": {"batch_size": 4, **ev}})
    return cfg


def _points(entry):
    return [(h["step"], h["ppl"]["mean"]) for h in entry["history"] if h.get("stage") == "eval"]


def test_curve_points_end_at_the_final_evaluation_and_leave_training_unchanged(tiny_run):
    log = lambda *_: None
    plain = run(tiny_run("plain"), log=log)
    curve = run(tiny_run("curve", every=2), log=log)
    for m in ("prompt", "mops"):
        pts = _points(curve["methods"][m])
        assert [s for s, _ in pts] == [2, 4, 5]
        assert pts[-1][1] == curve["methods"][m]["ppl"]["mean"]
        assert len({v for _, v in pts}) == 3  # the model changed between the points
        # evaluating along the way draws nothing from training's random state: the same final model
        assert curve["methods"][m]["ppl"] == plain["methods"][m]["ppl"]
        assert not _points(plain["methods"][m])
    # mops' points carry the gate's statistics
    assert all("gate_effective_experts" in h for h in curve["methods"]["mops"]["history"] if h.get("stage") == "eval")
    # the run's own results.md tables the curve
    md = (Path(tiny_run("curve")["out_dir"]) / "curve" / "results.md").read_text()
    assert "| step | prompt | mops |" in md and "| 4 | " in md
    assert "| step |" not in (Path(tiny_run("plain")["out_dir"]) / "plain" / "results.md").read_text()
    # a finished run is reused (adapters evaluated again), its curve kept
    again = run(tiny_run("curve", every=2), log=log)
    for m in ("prompt", "mops"):
        assert _points(again["methods"][m]) == _points(curve["methods"][m])


@pytest.mark.parametrize("ev, match", [({"every": -1}, "eval.every must be an integer >= 0"),
                                       ({"every": "10"}, "eval.every must be"),
                                       ({"every": True}, "eval.every must be"),
                                       ({"batch_size": 0}, "eval.batch_size must be an integer >= 1"),
                                       ({"evry": 10}, r"eval: unknown keys \['evry'\]")])
def test_bad_eval_settings(ev, match):
    with pytest.raises(ValueError, match=match):
        check_config({"data": {}, "eval": ev})


def test_federated_eval_section_is_checked_too():
    from mops_fast.federated.config import validate_config

    base = {"data": {"train": "t.jsonl", "test": "t.jsonl"}}
    assert validate_config({**base, "eval": {"batch_size": 4}})["eval"] == {"batch_size": 4}
    with pytest.raises(ValueError, match=r"eval: unknown keys \['every'\]"):  # its curve is federated.eval_every
        validate_config({**base, "eval": {"every": 5}})
    with pytest.raises(ValueError, match="eval.max_length must be an integer >= 1"):
        validate_config({**base, "eval": {"max_length": 0.5}})
