"""MoPs on quantized backbones: training the prompts and gate through a frozen int4 backbone (dx = dy W in
every QuantLinear) lowers perplexity and leaves the packed weights untouched. A tiny GPTQ-quantized Llama
in `make test`; the real 4-bit SmolLM2 (the GPTQModel checkpoint in ../shared/fixtures) is marked slow
(minutes on 2 CPU cores: every int4 layer is dequantized in forward and backward)."""
from pathlib import Path

import pytest
import torch

import mops_fast
from mops_fast.nn.quant_linear import QuantLinear
from mops_fast.train.data import Formatter, collate, load_records, per_category, select_categories
from mops_fast.train.evaluate import evaluate_perplexity
from mops_fast.train.trainer import Trainer, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "gptqmodel-smollm2-135m-4bit-g128-sym"
DOLLY = ROOT.parent / "shared" / "data" / "dolly15k"
CATS = ["classification", "brainstorming"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_mops_trains_through_a_gptq_quantized_tiny_backbone():
    from mops_fast.quant.compress import QuantSettings, quantize_model, replace_with_quant_linear
    from tests.conftest import CharTok, synthetic_records, tiny_model

    m = tiny_model(seed=0)
    calib = torch.randint(1, 98, (8, 32), generator=torch.Generator().manual_seed(0))
    q = quantize_model(m, calib, "gptq", QuantSettings(4, 16, sym=False, desc_act=True), log=None)
    replace_with_quant_linear(m, q)
    assert sum(isinstance(x, QuantLinear) for x in m.modules()) == 28
    packed = {k: v.clone() for k, v in m.state_dict().items()}
    mops_fast.attach(m, mops_fast.MoPsConfig(num_experts=2, prompt_len=3, gate_layer=1, init="random"))
    recs = synthetic_records()
    before = evaluate_perplexity(m, CharTok(), recs)["ppl"]["mean"]
    cfg = TrainConfig(steps=30, batch_size=4, lr=3e-2, warmup_steps=1, gate_pretrain_steps=20,
                      gate_pretrain_samples=16, progress=False)
    Trainer(m, CharTok(), recs, cfg).train()
    after = evaluate_perplexity(m, CharTok(), recs)["ppl"]["mean"]
    assert after < 0.9 * before, (before, after)
    sd = m.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in packed.items())
    mops_fast.detach(m)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not (FIXTURE.is_dir() and DOLLY.is_dir()), reason="../shared is not present")
def test_mops_training_on_a_4bit_smollm2_lowers_test_perplexity(tmp_path):
    model, tok = mops_fast.load_model(str(FIXTURE))
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 210
    packed = {k: v.clone() for k, v in model.state_dict().items()}
    train = select_categories(load_records(DOLLY / "train.jsonl"), CATS)
    test = per_category(select_categories(load_records(DOLLY / "test.jsonl"), CATS), 4)
    mops_fast.attach(model, mops_fast.MoPsConfig(num_experts=4, prompt_len=4))
    fmt = Formatter(tok, max_length=160)
    b = collate([fmt(r) for r in train[:8]], tok.pad_token_id)
    mops_fast.init_prompts_from_kv(model, b["input_ids"], b["attention_mask"])
    before = evaluate_perplexity(model, tok, test, max_length=160)["ppl"]
    cfg = TrainConfig(steps=16, batch_size=4, lr=1e-2, warmup_steps=2, max_length=160, gate_pretrain_steps=40,
                      gate_pretrain_samples=24, progress=False)
    Trainer(model, tok, train, cfg, out_dir=tmp_path).train()
    after = evaluate_perplexity(model, tok, test, max_length=160)["ppl"]
    assert after["mean"] < before["mean"], (before, after)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in packed.items())  # the int4 backbone stayed frozen
    mops_fast.detach(model)
