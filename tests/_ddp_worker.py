"""Trains a tiny MoPs model for a few steps and saves its adapter (run alone or under torchrun)."""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import mops_fast  # noqa: E402
from mops_fast.train.trainer import Trainer, TrainConfig  # noqa: E402
from tests.conftest import CharTok, synthetic_records, tiny_model  # noqa: E402

out = sys.argv[1]
torch.manual_seed(0)
model = tiny_model()
mops_fast.attach(model, mops_fast.MoPsConfig(num_experts=2, prompt_len=3, gate_layer=1, init="random"))
cfg = TrainConfig(steps=4, batch_size=4, grad_accum=int(sys.argv[2]) if len(sys.argv) > 2 else 1, lr=1e-2,
                  warmup_steps=1, gate_pretrain_steps=5, gate_pretrain_samples=8, progress=False)
Trainer(model, CharTok(), synthetic_records(), cfg).train()
if int(__import__("os").environ.get("RANK", "0")) == 0:
    mops_fast.save_adapter(model, out)
