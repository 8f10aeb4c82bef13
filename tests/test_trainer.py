"""Trainer: learning, resume after a kill, gradient accumulation and 2-process data parallel."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import mops_fast
from mops_fast.train.evaluate import evaluate_perplexity
from mops_fast.train.trainer import Trainer, TrainConfig
from tests.conftest import ROOT, CharTok, synthetic_records, tiny_model


def fresh(seed=0, **cfg):
    torch.manual_seed(seed)
    m = tiny_model()
    mops_fast.attach(m, mops_fast.MoPsConfig(num_experts=2, prompt_len=3, gate_layer=1, init="random"))
    base = dict(steps=6, batch_size=4, lr=1e-2, warmup_steps=1, gate_pretrain_steps=5, gate_pretrain_samples=8,
                progress=False)
    base.update(cfg)
    return m, TrainConfig(**base)


def test_training_lowers_perplexity_and_pretrains_gate():
    m, cfg = fresh(steps=30, lr=3e-2, gate_pretrain_steps=100, gate_pretrain_samples=40)
    recs = synthetic_records()
    before = evaluate_perplexity(m, CharTok(), recs)["ppl"]["mean"]
    hist = Trainer(m, CharTok(), recs, cfg).train()
    after = evaluate_perplexity(m, CharTok(), recs)["ppl"]["mean"]
    assert after < 0.9 * before
    stage_a = [h for h in hist if h["stage"] == "A"][0]
    assert stage_a["routing_acc"] > 0.5  # 4 categories -> 2 experts, learned from pooled states


def test_gate_pretrain_smoothing_bounds_the_gate():
    # stage A on separable categories drives the plain gate towards one-hot weights; label smoothing eps
    # holds its optimum at weight 1 - eps + eps / J on the routed expert, so stage B keeps a gradient
    # (and evaluate_perplexity reports it: the mean top weight and exp(entropy), the effective experts)
    recs = synthetic_records()
    top, eff = {}, {}
    for eps in (0.0, 0.3):
        m, cfg = fresh(gate_pretrain_steps=300, gate_pretrain_samples=40, gate_pretrain_smoothing=eps)
        t = Trainer(m, CharTok(), recs, cfg)
        t.pretrain_gate()
        feats, _ = t.gate_features(recs)
        with torch.no_grad():
            top[eps] = m.mops.log_weights(feats)[0].exp().max(-1).values.mean().item()
        gate = evaluate_perplexity(m, CharTok(), recs)["gate"]
        assert gate["max_weight"] == pytest.approx(top[eps], abs=1e-5)  # the same records, the same gate
        eff[eps] = gate["effective_experts"]
    assert top[0.0] > 0.97, top
    assert 0.7 < top[0.3] < 0.9  # the optimum: 1 - 0.3 + 0.3 / 2 = 0.85
    assert 1.0 <= eff[0.0] < 1.05 < 1.3 < eff[0.3] < 2.0, eff  # 2 experts: 0.85 / 0.15 -> exp(0.42) = 1.53
    plain = tiny_model()
    assert "gate" not in evaluate_perplexity(plain, CharTok(), recs[:4])  # no MoPs, no gate numbers
    with pytest.raises(ValueError, match="gate_pretrain_smoothing must be in"):
        TrainConfig(steps=1, gate_pretrain_smoothing=1.0)


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    recs = synthetic_records()
    m1, cfg = fresh(ckpt_every=2)
    Trainer(m1, CharTok(), recs, cfg, out_dir=tmp_path / "a").train()

    m2, cfg = fresh(ckpt_every=2)
    t = Trainer(m2, CharTok(), recs, cfg, out_dir=tmp_path / "b")
    real_step = t.train_step

    def dying():
        if t.step == 3:
            raise KeyboardInterrupt("killed")
        return real_step()

    t.train_step = dying
    with pytest.raises(KeyboardInterrupt):
        t.train()
    m3, cfg = fresh(seed=123, ckpt_every=2)  # a new process: other random init, state from the checkpoint
    t3 = Trainer(m3, CharTok(), recs, cfg, out_dir=tmp_path / "b")
    t3.train()
    for k, v in m1.mops.state_dict().items():
        torch.testing.assert_close(m3.mops.state_dict()[k], v, rtol=1e-6, atol=1e-7)


def test_corrupt_checkpoint_is_refused(tmp_path):
    m, cfg = fresh()
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        Trainer(m, CharTok(), synthetic_records(), cfg, out_dir=tmp_path).train()


def test_grad_accumulation_equals_one_big_batch():
    recs = synthetic_records()
    m1, cfg1 = fresh(grad_accum=1)
    Trainer(m1, CharTok(), recs, cfg1).train()
    m2, cfg2 = fresh(grad_accum=2)
    Trainer(m2, CharTok(), recs, cfg2).train()
    for k, v in m1.mops.state_dict().items():
        torch.testing.assert_close(m2.mops.state_dict()[k], v, rtol=1e-4, atol=1e-4)


def test_two_process_ddp_equals_one_process(tmp_path):
    worker = str(ROOT / "tests" / "_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, worker, str(tmp_path / "one")], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
                    str(tmp_path / "two")], check=True, env=env, timeout=300)
    a = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)


def test_bad_train_config():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"stepz": 3})


def test_non_finite_steps_are_skipped_then_stop_training(monkeypatch, tmp_path):
    """A step whose loss (or gradients) is NaN/inf changes nothing; more than max_nonfinite_steps of them in a
    row stop training with an error that names the fix, and the checkpoint holds only finite steps."""
    import mops_fast.train.trainer as tr

    real = tr.response_nll
    poisoned = set()

    def nll(model, b):
        out = real(model, b)
        return (out[0] * float("nan"),) + tuple(out[1:]) if t.step in poisoned else out

    monkeypatch.setattr(tr, "response_nll", nll)
    m, cfg = fresh(steps=8, max_nonfinite_steps=2, gate_pretrain_steps=0, ckpt_every=1)
    t = Trainer(m, CharTok(), synthetic_records(), cfg, out_dir=tmp_path)
    t.train_step()
    before = {k: v.clone() for k, v in m.mops.state_dict().items()}
    poisoned.update({1, 2})
    assert t.train_step()["skipped"] and t.train_step()["skipped"]
    for k, v in m.mops.state_dict().items():
        assert torch.equal(v, before[k]), k  # no update
    info = t.train_step()  # a finite step again: trains and resets the count
    assert not info.get("skipped") and t.nonfinite_run == 0
    assert [h["step"] for h in t.history if h.get("skipped")] == [2, 3]

    # a grad that is inf while the loss is finite is skipped too
    h = m.mops.prompt_k.register_hook(lambda g: g * float("inf"))
    assert t.train_step()["skipped"]
    h.remove()

    poisoned.update(range(5, 20))
    with pytest.raises(tr.NonFiniteLossError, match=r"NaN/inf in 3 step\(s\) in a row .*Lower lr"):
        t.train()
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["mops"].values())
    assert all(torch.isfinite(v).all() for v in m.mops.state_dict().values())


def test_non_finite_gate_features_are_an_error(monkeypatch):
    m, cfg = fresh()
    t = Trainer(m, CharTok(), synthetic_records(), cfg)
    real = t.gate_features
    monkeypatch.setattr(t, "gate_features", lambda recs: (real(recs)[0] * float("nan"), real(recs)[1]))
    from mops_fast.train.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="hidden states entering the gate layer are NaN/inf for 8 of 8"):
        t.pretrain_gate()


def test_non_finite_gradients_are_caught_without_clipping():
    m, cfg = fresh(grad_clip=0.0, gate_pretrain_steps=0)
    t = Trainer(m, CharTok(), synthetic_records(), cfg)
    before = {k: v.clone() for k, v in m.mops.state_dict().items()}
    h = m.mops.prompt_v.register_hook(lambda g: g * float("nan"))
    assert t.train_step()["skipped"]
    h.remove()
    assert all(torch.equal(v, before[k]) for k, v in m.mops.state_dict().items())
    assert not t.train_step().get("skipped")
