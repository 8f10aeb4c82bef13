"""Adapter save/load roundtrip and every way a bad adapter is refused."""
import json

import pytest
import torch

import mops_fast
from mops_fast import MoPsConfig
from tests.conftest import tiny_model


def trained(model):
    mops_fast.attach(model, MoPsConfig(num_experts=3, prompt_len=2, gate_layer=1, init="random"))
    with torch.no_grad():
        for p in model.mops.parameters():
            p.add_(torch.randn_like(p))
    return model


def test_roundtrip(tmp_path):
    a = trained(tiny_model())
    ids = torch.randint(0, 128, (2, 6))
    out_a = a(input_ids=ids).logits
    mops_fast.save_adapter(a, tmp_path)
    b = mops_fast.load_adapter(tiny_model(), tmp_path)
    torch.testing.assert_close(b(input_ids=ids).logits, out_a, rtol=0, atol=0)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["model"]["num_hidden_layers"] == 4 and meta["mops_config"]["num_experts"] == 3


def test_other_model_is_refused(tmp_path):
    mops_fast.save_adapter(trained(tiny_model()), tmp_path)
    with pytest.raises(ValueError, match="num_hidden_layers: adapter 4 vs model 6"):
        mops_fast.load_adapter(tiny_model(layers=6), tmp_path)
    with pytest.raises(ValueError, match="model_type: adapter 'llama' vs model 'qwen2'"):
        mops_fast.load_adapter(tiny_model("qwen2"), tmp_path)


def test_corrupt_and_mismatched_files(tmp_path):
    mops_fast.save_adapter(trained(tiny_model()), tmp_path)
    w = tmp_path / "adapter.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[: len(good) // 2])
    m = tiny_model()
    with pytest.raises(ValueError, match="corrupt or truncated"):
        mops_fast.load_adapter(m, tmp_path)
    assert not hasattr(m, "mops")  # nothing half-attached
    from safetensors.torch import load_file, save_file

    w.write_bytes(good)
    t = load_file(str(w))
    t["prompt_k"] = t["prompt_k"][:, :2].contiguous()
    save_file(t, str(w))
    m = tiny_model()
    with pytest.raises(ValueError, match="shapes.*prompt_k"):
        mops_fast.load_adapter(m, tmp_path)
    assert not hasattr(m, "mops")  # refused before attaching
    t = load_file(str(w))
    t["prompt_k"] = torch.full((3, 3, 2, 2, 8), float("nan"))
    save_file(t, str(w))
    with pytest.raises(ValueError, match="non-finite"):
        mops_fast.load_adapter(tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        mops_fast.load_adapter(tiny_model(), tmp_path)
    with pytest.raises(FileNotFoundError, match="not a MoPs adapter"):
        mops_fast.load_adapter(tiny_model(), tmp_path / "nothing")


def test_non_finite_adapter_is_not_saved_over_a_good_one(tmp_path):
    a = trained(tiny_model())
    mops_fast.save_adapter(a, tmp_path)
    good = (tmp_path / "adapter.safetensors").read_bytes()
    with torch.no_grad():
        a.mops.prompt_v[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite values in \['prompt_v'\]; not saved"):
        mops_fast.save_adapter(a, tmp_path)
    assert (tmp_path / "adapter.safetensors").read_bytes() == good
    with pytest.raises(ValueError, match="not saved"):
        mops_fast.save_adapter(a, tmp_path / "new")
    assert not (tmp_path / "new").exists()
