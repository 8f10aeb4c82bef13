"""Shared fixtures: tiny random LLaMA-family models and the real SmolLM2-135M (session-scoped)."""
import os
from pathlib import Path

import torch

# Without a GPU, Triton kernels run in the interpreter. The flag must be set before any test module
# imports triton (kernels are bound to the interpreter when their module is first imported), so it is
# set here, once, for the whole session rather than in individual test modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DOLLY = SHARED / "data" / "dolly15k"


# gated-prefix attention: queries at padded positions (the interpreter and the GPU tests)
def padded_queries(kv, Sq, Sk, causal=True):
    """(B, 1, Sq) bool: queries at padded positions (o = 0, lse = -inf, no gradient: the contract; causal
    attention only, where a query has a position among the keys)."""
    if kv is None or not causal:
        return torch.zeros((1, 1, Sq), dtype=torch.bool)
    return ~kv[:, None, Sk - Sq:]


def check_padded_rows(o, lse, padded):
    """o is 0 and lse -inf exactly at the padded queries; everything else finite. lse with 0 there."""
    pad = padded.to(o.device).expand_as(lse)
    assert torch.isfinite(o).all() and (o[pad] == 0).all()
    assert torch.isneginf(lse[pad]).all() and torch.isfinite(lse[~pad]).all()
    return lse.masked_fill(pad, 0.0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-tensor tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    faster at these sizes, and far faster on a busy machine (no thread handoffs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(model_type="llama", layers=4, hidden=48, heads=6, kv_heads=2, vocab=128, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, num_attention_heads=heads,
                                num_key_value_heads=kv_heads, max_position_embeddings=256, **kw)


def tiny_model(model_type="llama", seed=0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(model_type, **kw))
    return m.eval()


class CharTok:
    """A tiny deterministic tokenizer (one id per character, ids 1..97) with no chat template."""

    eos_token = "$"
    pad_token_id = 0
    model_max_length = 256
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 + 1 for c in text]}


def synthetic_records(n=40, seed=0):
    """Records of 4 categories whose responses depend on the category (learnable by a tiny model)."""
    import random

    rnd = random.Random(seed)
    cats = ["alpha", "beta", "gamma", "delta"]
    out = []
    for i in range(n):
        c = cats[i % 4]
        out.append({"instruction": f"{c} task {rnd.randint(0, 99)}", "context": "",
                    "response": (c[0] * rnd.randint(3, 9)), "category": c})
    return out


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct; tests must detach what they attach."""
    if not DOLLY.is_dir():
        pytest.skip("../shared/data is not present")
    import mops_fast

    return mops_fast.load_model("smollm2-135m")


def smollm2_blocks(smollm2, n_blocks: int, n_samples: int):
    """A copy of the real SmolLM2 cut to its first `n_blocks` decoder blocks, and `n_samples` calibration
    windows of 128 dolly15k training tokens (for layer-level compression tests)."""
    import copy

    from mops_fast.quant.calibration import calibration_windows

    model, tok = smollm2
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:n_blocks]
    small.config.num_hidden_layers = n_blocks
    return small, calibration_windows(tok, DOLLY / "train.jsonl", n_samples=n_samples, seq_len=128, seed=0)


@pytest.fixture
def cascade_calls(monkeypatch):
    """Counts the shared-prefix cascade's own-key passes (prefix_cascade.py), so that a test knows which
    path ran. Request it after the module's `tk` fixture, which may reload the kernel module first."""
    from mops_fast.ops import prefix_cascade as pc

    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = pc._own_forward, pc._own_backward

    def count_fwd(*a):
        calls["fwd"] += 1
        return fwd(*a)

    def count_bwd(*a):
        calls["bwd"] += 1
        return bwd(*a)

    monkeypatch.setattr(pc, "_own_forward", count_fwd)
    monkeypatch.setattr(pc, "_own_backward", count_bwd)
    return calls


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
