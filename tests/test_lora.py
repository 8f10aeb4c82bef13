"""LoRA through PEFT, the outside reference: attach and detach exactly, train through the Trainer (dense and
int4 backbones), save in PEFT's layout (PEFT itself loads it), refuse bad settings and files."""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import mops_fast
from mops_fast.hf.lora import LoraSettings, attach_lora, detach_lora, has_lora, lora_parameters
from mops_fast.train.evaluate import evaluate_perplexity
from mops_fast.train.report import markdown_table
from mops_fast.train.run import check_config, lr_candidates
from mops_fast.train.trainer import Trainer, TrainConfig
from tests.conftest import CharTok, synthetic_records, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(1, 98, (2, 11), generator=torch.Generator().manual_seed(3))


def logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


def trained(m, steps=30, lr=3e-2, **kw):
    recs = synthetic_records()
    before = evaluate_perplexity(m, CharTok(), recs)["ppl"]["mean"]
    cfg = TrainConfig(steps=steps, batch_size=4, lr=lr, warmup_steps=1, progress=False, **kw)
    trainer = Trainer(m, CharTok(), recs, cfg)
    trainer.train()
    return before, evaluate_perplexity(m, CharTok(), recs)["ppl"]["mean"], trainer


def test_attach_starts_unchanged_trains_only_lora_and_detach_restores_exactly():
    m = tiny_model()
    m.lm_head.weight.requires_grad_(False)  # a flag of the user's own that detach must give back
    ref, types, attrs = logits(m), {n: type(x) for n, x in m.named_modules()}, set(vars(m))
    attach_lora(m, LoraSettings(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert has_lora(m)
    torch.testing.assert_close(logits(m), ref, rtol=0, atol=0)  # B starts at 0
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 3 * 4 and all(".lora_" in n for n in names)  # A and B, 3 targets, 4 layers
    assert all(p.dtype == torch.float32 for p in lora_parameters(m))
    assert sum(p.numel() for p in lora_parameters(m)) == 4 * 4 * ((48 + 48) + (48 + 16) + (96 + 48))
    with pytest.raises(ValueError, match="already has LoRA"):
        attach_lora(m, LoraSettings())
    with pytest.raises(ValueError, match="has LoRA attached"):
        mops_fast.attach(m, mops_fast.MoPsConfig(num_experts=2, prompt_len=2, gate_layer=1, init="random"))
    mops_fast.detach_adapter(m)
    assert not has_lora(m) and {n: type(x) for n, x in m.named_modules()} == types
    assert set(vars(m)) == attrs  # PEFT's peft_config goes too
    assert not m.lm_head.weight.requires_grad and m.model.embed_tokens.weight.requires_grad
    torch.testing.assert_close(logits(m), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no LoRA attached"):
        detach_lora(m)


def test_lora_trains_saves_in_peft_layout_and_peft_loads_it(tmp_path):
    m = tiny_model()
    backbone = {k: v.clone() for k, v in m.state_dict().items()}
    attach_lora(m, LoraSettings(r=4, alpha=8))
    before, after, trainer = trained(m)
    assert after < 0.9 * before, (before, after)
    assert trainer.gate is None and not [h for h in trainer.history if h["stage"] == "A"]  # no stage A
    sd = m.state_dict()
    assert all(torch.equal(sd[k.replace("q_proj.", "q_proj.base_layer.").replace("v_proj.", "v_proj.base_layer.")],
                           v) for k, v in backbone.items())  # the frozen backbone is untouched
    ref = logits(m)
    mops_fast.save_adapter(m, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["lora_alpha"] == 8
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 16
    mops_fast.detach_adapter(m)

    mops_fast.load_adapter(m, tmp_path / "a")  # ours, back
    torch.testing.assert_close(logits(m), ref)
    mops_fast.detach_adapter(m)

    from peft import PeftModel  # PEFT's own loader reads what we wrote

    peft_model = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_lora_checkpoint_resumes_where_it_stopped(tmp_path):
    cfg = TrainConfig(steps=8, batch_size=4, lr=1e-2, warmup_steps=1, ckpt_every=4, progress=False)

    def lora_after(name, kill_at=None):
        m = tiny_model()
        attach_lora(m, LoraSettings(r=2), seed=0)
        t = Trainer(m, CharTok(), synthetic_records(), cfg, out_dir=tmp_path / name)
        if kill_at is not None:
            step = t.train_step

            def dies():
                if t.step == kill_at:
                    raise KeyboardInterrupt
                return step()

            t.train_step = dies
            with pytest.raises(KeyboardInterrupt):
                t.train()
            return None
        t.train()
        return [p.detach().clone() for p in lora_parameters(m)]

    runs = {"straight": lora_after("straight")}
    lora_after("resumed", kill_at=6)  # killed after the checkpoint at step 4
    runs["resumed"] = lora_after("resumed")  # a fresh process: resumes at step 4
    for a, b in zip(runs["straight"], runs["resumed"]):
        torch.testing.assert_close(a, b)
    ck = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert "lora" in ck and "mops" not in ck
    m = tiny_model()
    mops_fast.attach(m, mops_fast.MoPsConfig(num_experts=2, prompt_len=2, gate_layer=1, init="random"))
    with pytest.raises(ValueError, match="holds no mops tensors"):  # a LoRA checkpoint under a MoPs run
        Trainer(m, CharTok(), synthetic_records(), TrainConfig(steps=9, progress=False),
                out_dir=tmp_path / "resumed").train()


def test_lora_trains_through_an_int4_backbone():
    from mops_fast.nn.quant_linear import QuantLinear
    from mops_fast.quant.compress import QuantSettings, quantize_model, replace_with_quant_linear

    m = tiny_model()
    calib = torch.randint(1, 98, (8, 32), generator=torch.Generator().manual_seed(0))
    replace_with_quant_linear(m, quantize_model(m, calib, "gptq", QuantSettings(4, 16), log=None))
    packed = {k: v.clone() for k, v in m.state_dict().items()}
    attach_lora(m, LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    assert all(isinstance(layer.self_attn.q_proj.base_layer, QuantLinear) for layer in m.model.layers)
    before, after, _ = trained(m)
    assert after < 0.9 * before, (before, after)
    mops_fast.detach_adapter(m)
    assert all(isinstance(layer.self_attn.q_proj, QuantLinear) for layer in m.model.layers)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in packed.items())


def test_an_injection_that_fails_halfway_leaves_the_model_as_it_was(monkeypatch):
    import peft

    m = tiny_model()
    m.lm_head.weight.requires_grad_(False)
    ref, types, attrs = logits(m), {n: type(x) for n, x in m.named_modules()}, set(vars(m))
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    real = peft.inject_adapter_in_model

    def breaks(*a, **kw):
        real(*a, **kw)
        raise RuntimeError("injection broke")

    monkeypatch.setattr(peft, "inject_adapter_in_model", breaks)
    with pytest.raises(RuntimeError, match="injection broke"):
        attach_lora(m, LoraSettings())
    assert not has_lora(m) and set(vars(m)) == attrs
    assert {n: type(x) for n, x in m.named_modules()} == types
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    torch.testing.assert_close(logits(m), ref, rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(r=0), "r must be an integer"), (dict(alpha=0), "alpha must be > 0"), (dict(dropout=1.0), "dropout"),
    (dict(target_modules="q_proj"), "non-empty list"), (dict(target_modules=[]), "non-empty list"),
])
def test_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        LoraSettings(**bad)


def test_bad_targets_models_and_files_leave_the_model_as_it_was(tmp_path, monkeypatch):
    m = tiny_model()
    with pytest.raises(ValueError, match=r"not found \['qkv'\]"):
        attach_lora(m, LoraSettings(target_modules=["q_proj", "qkv"]))
    with pytest.raises(ValueError, match="not linear layers"):
        attach_lora(m, LoraSettings(target_modules=["self_attn"]))
    assert not has_lora(m)
    mops_fast.attach(m, mops_fast.MoPsConfig(num_experts=2, prompt_len=2, gate_layer=1, init="random"))
    with pytest.raises(ValueError, match="has MoPs attached"):
        attach_lora(m, LoraSettings())
    mops_fast.detach(m)
    with pytest.raises(ValueError, match="no adapter to train"):
        Trainer(m, CharTok(), synthetic_records(), TrainConfig(steps=1, progress=False))

    attach_lora(m, LoraSettings(r=2))
    mops_fast.save_adapter(m, tmp_path / "a")
    mops_fast.detach_adapter(m)
    ref = logits(m)
    w = tmp_path / "a" / "adapter_model.safetensors"
    good = load_file(str(w))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    cases = {
        "missing": ({k: v for k, v in good.items() if k != key}, "missing"),
        "shape": ({**good, key: torch.zeros(3, 3)}, "shapes"),
        "nan": ({**good, key: torch.full_like(good[key], float("nan"))}, "non-finite"),
    }
    for name, (tensors, match) in cases.items():
        save_file(tensors, str(w))
        with pytest.raises(ValueError, match=match):
            mops_fast.load_adapter(m, tmp_path / "a")
        assert not has_lora(m), name
    w.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        mops_fast.load_adapter(m, tmp_path / "a")
    save_file(good, str(w))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="not a LoRA config this package reads"):
        mops_fast.load_adapter(m, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="only MoPs and prompt adapters serve together"):
        mops_fast.add_adapter(m, "x", tmp_path / "a")
    assert not has_lora(m) and not hasattr(m, "mops")
    torch.testing.assert_close(logits(m), ref, rtol=0, atol=0)

    monkeypatch.setitem(sys.modules, "peft", None)  # PEFT not installed
    with pytest.raises(ImportError, match="needs PEFT"):
        attach_lora(m, LoraSettings())


def test_run_config_and_report_take_lora():
    cfg = {"data": {}, "methods": ["prompt", "lora"], "lora": {"r": 4},
           "lr_search": {"candidates": {"lora": [1e-3, 3e-3], "default": [1e-2]}}}
    check_config(cfg)
    assert lr_candidates(cfg["lr_search"], "lora") == [1e-3, 3e-3]
    assert lr_candidates(cfg["lr_search"], "mops") == [1e-2]
    assert lr_candidates({"candidates": [3e-3]}, "lora") == [3e-3]
    assert lr_candidates({}, "lora") is None
    with pytest.raises(ValueError, match="r must be an integer"):
        check_config({**cfg, "lora": {"r": 0}})
    with pytest.raises(ValueError, match="unknown keys"):
        check_config({**cfg, "lora": {"rank": 4}})
    with pytest.raises(ValueError, match="unknown methods"):
        check_config({**cfg, "lr_search": {"candidates": {"lroa": [1e-3]}}})
    ppl = {"a": 10.0, "mean": 10.0}
    res = {"methods": {"prompt": {"ppl": ppl, "trainable_params": 1000},
                       "mops": {"ppl": {"a": 9.0, "mean": 9.0}, "trainable_params": 1200},
                       "lora": {"ppl": {"a": 8.0, "mean": 8.0}, "trainable_params": 900}}}
    table = markdown_table(res)
    assert "| trainable parameters | 1000 | 1200 | 900 |" in table
    assert "mops vs prompt: mean perplexity 10.00% lower" in table
    assert "mops vs lora (LoRA, the outside reference): mean perplexity 12.50% HIGHER" in table
