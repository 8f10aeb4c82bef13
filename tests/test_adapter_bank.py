"""Several adapters in one batch (add_adapter, using_adapters): each sample exactly as its own adapter
alone would give it, None as the backbone alone, generate included, and every bad request refused."""
import pytest
import torch

import mops_fast
from mops_fast import MoPsConfig
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def saved(tmp_path, name, seed, **cfg):
    """An adapter with random (distinct) prompts and gate, saved under tmp_path/name."""
    m = tiny_model()
    mops_fast.attach(m, MoPsConfig(**{"num_experts": 3, "prompt_len": 2, "gate_layer": 1, "init": "random", **cfg}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.mops.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return mops_fast.save_adapter(m, tmp_path / name)


def alone(directory, ids, am):
    """Logits of a fresh model with only this adapter (None: the plain backbone)."""
    m = tiny_model()
    if directory is not None:
        mops_fast.load_adapter(m, directory)
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=am).logits


def batch(B=4, S=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[1, :2] = 0  # left padding, as generate uses
    return ids, am


@pytest.mark.parametrize("mode,triton", [("scale", False), ("mix", False), ("scale", True)])
def test_each_sample_gets_its_own_adapter(tmp_path, monkeypatch, mode, triton):
    if triton:  # the fused kernels (interpreted here) with per-sample prompts and the backbone-only rows
        pytest.importorskip("triton")
        monkeypatch.setenv("MOPS_FAST_FORCE_TRITON", "1")
    a, b = saved(tmp_path, "a", 1, mode=mode), saved(tmp_path, "b", 2, mode=mode)
    m = tiny_model()
    mops_fast.add_adapter(m, "a", a)  # a bare model also takes a as its own
    mops_fast.add_adapter(m, "b", b)
    assert mops_fast.adapter_names(m) == ["a", "b"]
    ids, am = batch()
    request = ["b", "a", None, "b"]
    with torch.no_grad():
        with mops_fast.using_adapters(m, request):
            out = m(input_ids=ids, attention_mask=am).logits
        own = m(input_ids=ids, attention_mask=am).logits
    dirs = {"a": a, "b": b, None: None}
    for i, name in enumerate(request):
        ref = alone(dirs[name], ids, am)[i]
        real = am[i].bool()
        torch.testing.assert_close(out[i][real], ref[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(own, alone(a, ids, am), rtol=1e-4, atol=1e-4)  # outside: its own MoPs


def test_prompt_baseline_joins_a_scale_bank(tmp_path):
    # one deep prompt of J*L = 6 tokens and no gate, served as 3 experts of 2 tokens at weight 1
    mops = saved(tmp_path, "mops", 1)
    prompt = saved(tmp_path, "prompt", 2, num_experts=1, prompt_len=6, gate=False)
    m = tiny_model()
    mops_fast.add_adapter(m, "mops", mops)
    mops_fast.add_adapter(m, "prompt", prompt)
    ids, am = batch()
    with torch.no_grad(), mops_fast.using_adapters(m, ["prompt", "mops", "prompt", "mops"]):
        out = m(input_ids=ids, attention_mask=am).logits
    for i, d in enumerate([prompt, mops, prompt, mops]):
        real = am[i].bool()
        torch.testing.assert_close(out[i][real], alone(d, ids, am)[i][real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_serves_each_sample_with_its_adapter(tmp_path, cache):
    a, b = saved(tmp_path, "a", 1), saved(tmp_path, "b", 2)
    m = tiny_model()
    mops_fast.add_adapter(m, "a", a)
    mops_fast.add_adapter(m, "b", b)
    ids, am = batch(B=3)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with mops_fast.using_adapters(m, ["a", None, "b"]):
        out = m.generate(input_ids=ids, attention_mask=am, **kw,
                         **({"cache_implementation": "static"} if cache == "static" else {}))
    for i, d in enumerate([a, None, b]):
        ref = tiny_model()
        if d is not None:
            mops_fast.load_adapter(ref, d)
        one = ref.generate(input_ids=ids, attention_mask=am, **kw)
        assert torch.equal(out[i], one[i])
    # after the block, the model's own MoPs serve every sample again
    again = m.generate(input_ids=ids, attention_mask=am, **kw)
    own = tiny_model()
    mops_fast.load_adapter(own, a)
    assert torch.equal(again, own.generate(input_ids=ids, attention_mask=am, **kw))


def test_bad_requests_and_adapters_are_refused(tmp_path):
    a = saved(tmp_path, "a", 1)
    m = tiny_model()
    mops_fast.attach(m, MoPsConfig(num_experts=3, prompt_len=2, gate_layer=1, init="random"))
    ids, am = batch()
    with pytest.raises(ValueError, match="no adapter is added"):
        mops_fast.using_adapters(m, ["a"] * 4).__enter__()
    mops_fast.add_adapter(m, "a", a)
    with pytest.raises(ValueError, match="already added"):
        mops_fast.add_adapter(m, "a", a)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['z'\]; added: \['a'\]"):
        mops_fast.using_adapters(m, ["a", "z", None, "a"]).__enter__()
    with pytest.raises(ValueError, match="3 names for a batch of 4"):
        with mops_fast.using_adapters(m, ["a", None, "a"]):
            m(input_ids=ids, attention_mask=am)
    m(input_ids=ids, attention_mask=am)  # the failed block left nothing behind
    with pytest.raises(ValueError, match="one adapter name"):
        mops_fast.using_adapters(m, "a").__enter__()
    other = saved(tmp_path, "j4", 3, num_experts=4)
    with pytest.raises(ValueError, match=r"cannot join.*J x L = 4 x 2 vs 3 x 2"):
        mops_fast.add_adapter(m, "j4", other)
    layer = saved(tmp_path, "g2", 4, gate_layer=2)
    with pytest.raises(ValueError, match=r"gate layer / first injected layer \(2, 2\) vs \(1, 1\)"):
        mops_fast.add_adapter(m, "g2", layer)
    with pytest.raises(FileNotFoundError, match="is not a MoPs adapter"):
        mops_fast.add_adapter(m, "x", tmp_path / "missing")
    assert mops_fast.adapter_names(m) == ["a"]  # the refused ones left nothing behind
    mops_fast.remove_adapter(m, "a")
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        mops_fast.remove_adapter(m, "a")


def test_bank_takes_no_gradient_and_is_not_saved(tmp_path):
    a = saved(tmp_path, "a", 1)
    m = tiny_model()
    mops_fast.attach(m, MoPsConfig(num_experts=3, prompt_len=2, gate_layer=1, init="random"))
    mops_fast.add_adapter(m, "a", a)
    ids, am = batch()
    with mops_fast.using_adapters(m, ["a", "a", None, "a"]):
        loss = m(input_ids=ids, attention_mask=am, labels=ids).loss
    assert not loss.requires_grad  # nothing trainable took part: the model's own MoPs were not used
    assert not any(k.startswith("bank") for k in m.mops.state_dict())
    mops_fast.save_adapter(m, tmp_path / "own")
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "own" / "adapter.safetensors"))) == set(m.mops.state_dict())
