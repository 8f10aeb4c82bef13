"""`mops-fast generate`: requests for several adapters (and the backbone) answered in shared batches, each
as its own adapter answers it; bad requests and adapter arguments refused before any output is written."""
import json
from pathlib import Path

import pytest
import torch

import mops_fast
from mops_fast import cli
from mops_fast.serve import generate_responses, parse_adapter_args, request_adapters
from mops_fast.train.data import load_records
from tests.conftest import DOLLY


def test_adapter_arguments_and_request_routing():
    assert parse_adapter_args(["a=x/one", "x/two"]) == {"a": Path("x/one"), "two": Path("x/two")}
    with pytest.raises(ValueError, match="given twice"):
        parse_adapter_args(["a=x", "a=y"])
    with pytest.raises(ValueError, match="expected NAME=DIR"):
        parse_adapter_args(["=x"])
    recs = [{"instruction": "i"}, {"instruction": "i", "adapter": None}, {"instruction": "i", "adapter": "b"}]
    assert request_adapters(recs, ["a", "b"], "f") == ["a", None, "b"]
    assert request_adapters(recs[:2], [], "f") == [None, None]  # no adapter given: the backbone
    with pytest.raises(ValueError, match=r"f: request 3 asks for adapter 'b'; given: \['a'\]"):
        request_adapters(recs, ["a"], "f")
    from tests.conftest import tiny_model

    with pytest.raises(ValueError, match="none is added to the model"):
        generate_responses(tiny_model(), None, recs[:1], ["a"])
    with pytest.raises(ValueError, match="2 adapter entries for 1 requests"):
        generate_responses(tiny_model(), None, recs[:1], ["a", None])


@pytest.mark.integration
def test_generate_command_serves_each_request_with_its_adapter(smollm2, tmp_path):
    model, tok = smollm2
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        mops_fast.attach(model, mops_fast.MoPsConfig(num_experts=4, prompt_len=4, init="random", init_scale=0.3))
        try:
            mops_fast.save_adapter(model, tmp_path / name)
        finally:
            mops_fast.detach(model)
    recs = [{"instruction": r["instruction"], "context": r["context"]}
            for r in load_records(DOLLY / "test.jsonl", limit=4)]
    recs[1]["adapter"] = "b"
    recs[2]["adapter"] = None
    req = tmp_path / "requests.jsonl"
    req.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out" / "responses.jsonl"
    args = ["generate", "--model", "smollm2-135m", "--adapter", f"a={tmp_path / 'a'}", "--adapter",
            f"b={tmp_path / 'b'}", "--input", str(req), "--out", str(out), "--max-new-tokens", "6",
            "--batch-size", "3"]
    assert cli.main(args) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["adapter"] for g in got] == ["a", "b", None, "a"]  # no field: the first adapter
    assert [g["instruction"] for g in got] == [r["instruction"] for r in recs]
    # each response is the one its adapter alone gives (loaded as the model's own), in the same batches
    for name in ("a", "b", None):
        if name is not None:
            mops_fast.load_adapter(model, tmp_path / name)
        try:
            ref = generate_responses(model, tok, recs, batch_size=3, max_new_tokens=6)  # the model as it is
        finally:
            if name is not None:
                mops_fast.detach(model)
        for g, r in zip(got, ref):
            if g["adapter"] == name:
                assert g["response"] == r
    assert len({g["response"] for g in got}) > 1

    # a request for an adapter not given: an error naming it, and no output file
    recs[3]["adapter"] = "c"
    req.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out2 = tmp_path / "out2.jsonl"
    assert cli.main(args[:-6] + ["--out", str(out2), "--max-new-tokens", "6", "--batch-size", "3"]) == 2
    assert not out2.exists()
