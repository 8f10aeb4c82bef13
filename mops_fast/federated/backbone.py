"""Backbones for federated runs: a real model by name or path, or a tiny random Llama built from a spec.

Every process of a Flower run (ServerApp, each ClientApp) builds its own backbone from the same string,
so the frozen weights must be a pure function of it: `tiny-llama` models come from a fixed seed and a
byte-level tokenizer built in code (no files, no network), which makes them identical everywhere.
"""
from __future__ import annotations

import torch

TINY_PREFIX = "tiny-llama"
TINY_DEFAULTS = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "seed": 0, "max_len": 256}


def parse_tiny_spec(spec: str) -> dict:
    """'tiny-llama' or 'tiny-llama:layers=2,hidden=32,seed=0' -> dict of ints (unknown keys rejected)."""
    opts = dict(TINY_DEFAULTS)
    _, _, rest = spec.partition(":")
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, sep, v = item.partition("=")
        if not sep or k not in TINY_DEFAULTS:
            raise ValueError(f"model spec {spec!r}: bad option {item!r}; options are {sorted(TINY_DEFAULTS)} "
                             "as key=int, e.g. 'tiny-llama:layers=2,hidden=32,seed=0'")
        try:
            opts[k] = int(v)
        except ValueError:
            raise ValueError(f"model spec {spec!r}: {k} must be an integer, got {v!r}") from None
    if opts["hidden"] % opts["heads"] or opts["heads"] % opts["kv_heads"]:
        raise ValueError(f"model spec {spec!r}: hidden must divide by heads and heads by kv_heads")
    return opts


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <pad>, <eos>) built in code, identical in every process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    return fast


def tiny_llama(spec: str = TINY_PREFIX):
    """(model, tokenizer): a random LlamaForCausalLM from a fixed seed and the byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    o = parse_tiny_spec(spec)
    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=o["hidden"], intermediate_size=2 * o["hidden"],
                      num_hidden_layers=o["layers"], num_attention_heads=o["heads"],
                      num_key_value_heads=o["kv_heads"], max_position_embeddings=o["max_len"],
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    # A private generator state: building the model must not depend on (or disturb) the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(o["seed"])
        model = LlamaForCausalLM(cfg)
    tok.model_max_length = o["max_len"]
    return model.eval(), tok


def load_backbone(spec: str, dtype=None):
    """(model, tokenizer) for a model name/path (mops_fast.load_model) or a `tiny-llama[:...]` spec."""
    if spec == TINY_PREFIX or spec.startswith(TINY_PREFIX + ":"):
        model, tok = tiny_llama(spec)
        if dtype not in (None, "float32", "fp32", torch.float32):
            raise ValueError(f"tiny-llama backbones are float32; got dtype {dtype!r}")
        return model, tok
    from mops_fast.hf.loading import load_model

    return load_model(spec, dtype=dtype)
