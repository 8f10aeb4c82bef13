"""The real SmolLM2-135M on the shared dolly15k data: MoPs training lowers test perplexity."""
import pytest
import torch

import mops_fast
from mops_fast.train.data import Formatter, collate, load_records, per_category, select_categories
from mops_fast.train.evaluate import evaluate_perplexity
from mops_fast.train.trainer import Trainer, TrainConfig
from tests.conftest import DOLLY

pytestmark = pytest.mark.integration
CATS = ["classification", "brainstorming"]


def test_mops_training_lowers_test_perplexity_on_trained_categories(smollm2, tmp_path):
    model, tok = smollm2
    train = select_categories(load_records(DOLLY / "train.jsonl"), CATS)
    test = per_category(select_categories(load_records(DOLLY / "test.jsonl"), CATS), 6)
    mops_fast.attach(model, mops_fast.MoPsConfig(num_experts=4, prompt_len=4))
    try:
        fmt = Formatter(tok, max_length=192)
        b = collate([fmt(r) for r in train[:8]], tok.pad_token_id)
        mops_fast.init_prompts_from_kv(model, b["input_ids"], b["attention_mask"])
        before = evaluate_perplexity(model, tok, test, max_length=192)["ppl"]
        cfg = TrainConfig(steps=24, batch_size=4, lr=1e-2, warmup_steps=3, max_length=192,
                          gate_pretrain_steps=100, gate_pretrain_samples=32, progress=False)
        weights = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("mops.")}
        Trainer(model, tok, train, cfg, out_dir=tmp_path).train()
        after = evaluate_perplexity(model, tok, test, max_length=192)["ppl"]
        assert after["mean"] < before["mean"], (before, after)
        for c in CATS:
            assert after[c] < before[c], (c, before[c], after[c])
        # the frozen backbone is bit-identical after training
        sd = model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in weights.items())
        # the adapter roundtrips on the real model
        mops_fast.save_adapter(model, tmp_path / "adapter")
        x = collate([fmt(r) for r in test[:2]], tok.pad_token_id)
        ref = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    finally:
        mops_fast.detach(model)
    mops_fast.load_adapter(model, tmp_path / "adapter")
    try:
        out = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
        torch.testing.assert_close(out, ref)
    finally:
        mops_fast.detach(model)


def test_generate_on_real_model_matches_full_forward(smollm2):
    model, tok = smollm2
    rec = load_records(DOLLY / "test.jsonl")[:2]
    mops_fast.attach(model, mops_fast.MoPsConfig(num_experts=4, prompt_len=4, init="random", init_scale=0.3))
    try:
        tok.padding_side = "left"
        from mops_fast.train.data import prompt_text

        enc = tok([prompt_text(tok, r) for r in rec], return_tensors="pt", padding=True, add_special_tokens=False)
        n = 4
        g = model.generate(**enc, max_new_tokens=n, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        am = torch.cat([enc["attention_mask"], torch.ones(2, n, dtype=torch.long)], 1)
        gm = torch.cat([enc["attention_mask"], torch.zeros(2, n, dtype=torch.long)], 1)
        pos = (am.cumsum(1) - 1).clamp(min=0)
        full = model(input_ids=g.sequences, attention_mask=am, position_ids=pos, gate_mask=gm).logits
        S = enc["input_ids"].shape[1]
        for t in range(n):
            torch.testing.assert_close(g.logits[t], full[:, S + t - 1], rtol=1e-3, atol=1e-3)
    finally:
        tok.padding_side = "right"
        mops_fast.detach(model)


def test_two_adapters_and_the_backbone_in_one_batch(smollm2, tmp_path):
    # SmolLM2's GQA shapes (3 KV heads of 64): each sample as its own adapter alone gives it
    model, tok = smollm2
    x = collate([Formatter(tok, max_length=64)(r) for r in load_records(DOLLY / "test.jsonl")[:3]],
                tok.pad_token_id)
    batch = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}
    ref = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        mops_fast.attach(model, mops_fast.MoPsConfig(num_experts=4, prompt_len=4, init="random", init_scale=0.3))
        try:
            mops_fast.save_adapter(model, tmp_path / name)
            with torch.no_grad():
                ref[name] = model(**batch).logits
        finally:
            mops_fast.detach(model)
    with torch.no_grad():
        ref[None] = model(**batch).logits
    request = ["b", None, "a"]
    mops_fast.add_adapter(model, "a", tmp_path / "a")
    try:
        mops_fast.add_adapter(model, "b", tmp_path / "b")
        with torch.no_grad(), mops_fast.using_adapters(model, request):
            out = model(**batch).logits
    finally:
        mops_fast.detach(model)
    for i, name in enumerate(request):
        real = batch["attention_mask"][i].bool()
        torch.testing.assert_close(out[i][real], ref[name][i][real], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ref["a"][0], ref["b"][0])  # the adapters differ, so the check can fail


def test_lora_reference_trains_on_the_real_model_and_roundtrips(smollm2, tmp_path):
    # the outside reference through PEFT, on SmolLM2's shapes (q 576 -> 576, v 576 -> 192)
    model, tok = smollm2
    train = select_categories(load_records(DOLLY / "train.jsonl"), CATS)
    test = per_category(select_categories(load_records(DOLLY / "test.jsonl"), CATS), 4)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = evaluate_perplexity(model, tok, test, max_length=160)["ppl"]
    mops_fast.attach_lora(model, mops_fast.LoraSettings(r=4), seed=0)
    try:
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 30 * 4 * (2 * 576 + 576 + 192)
        cfg = TrainConfig(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, max_length=160, progress=False)
        Trainer(model, tok, train, cfg).train()
        after = evaluate_perplexity(model, tok, test, max_length=160)["ppl"]
        assert after["mean"] < before["mean"], (before, after)
        mops_fast.save_adapter(model, tmp_path / "lora")
        x = collate([Formatter(tok, max_length=64)(r) for r in test[:2]], tok.pad_token_id)
        with torch.no_grad():
            ref = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    finally:
        mops_fast.detach_adapter(model)
    sd = model.state_dict()
    assert set(sd) == set(weights) and all(torch.equal(sd[k], v) for k, v in weights.items())
    mops_fast.load_adapter(model, tmp_path / "lora")
    try:
        with torch.no_grad():
            out = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
        torch.testing.assert_close(out, ref)
    finally:
        mops_fast.detach_adapter(model)
