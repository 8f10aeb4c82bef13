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
