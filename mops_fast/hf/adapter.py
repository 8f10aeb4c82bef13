"""Saving and loading a trained adapter: MoPs (and `prompt`) as `adapter.safetensors` plus
`adapter_config.json`; LoRA (the outside reference, hf/lora.py) in PEFT's layout. `save_adapter`,
`load_adapter` and `detach_adapter` take whichever the model or directory holds."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mops_fast.config import MoPsConfig
from mops_fast.hf import lora
from mops_fast.hf.attach import attach, detach, get_mops, new_mops_module
from mops_fast.nn.mops import MoPsModule

FORMAT_VERSION = 1
WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"


def _model_signature(model) -> dict:
    cfg = model.config
    return {
        "model_type": cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
    }


def _non_finite(tensors: dict) -> list[str]:
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def save_adapter(model, directory) -> Path:
    """Write the trainable MoPs tensors and their config (or the attached LoRA, in PEFT's layout); the
    backbone is not saved."""
    if lora.has_lora(model):
        return lora.save_lora(model, directory)
    mops = get_mops(model)
    d = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in mops.state_dict().items()}
    bad = _non_finite(tensors)
    if bad:  # load_adapter would refuse it: keep whatever adapter is already there
        raise ValueError(f"adapter holds non-finite values in {bad}; not saved ({d} is unchanged)")
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, d / WEIGHTS)
    meta = {"format_version": FORMAT_VERSION, "mops_config": mops.config.to_dict(), "model": _model_signature(model)}
    tmpc = d / (CONFIG + ".tmp")
    tmpc.write_text(json.dumps(meta, indent=2))
    os.replace(tmpc, d / CONFIG)
    return d


def _read_adapter(model, directory) -> tuple[MoPsConfig, dict]:
    """The config and tensors of a saved adapter, checked against the model's signature and for finite
    values; nothing is attached or loaded."""
    d = Path(directory)
    if lora.is_lora_dir(d):
        raise ValueError(f"{d} holds a LoRA adapter: load it alone with load_adapter; only MoPs and prompt "
                         "adapters serve together in one batch")
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d} is not a MoPs adapter: expected {CONFIG} and {WEIGHTS} in it")
    try:
        meta = json.loads((d / CONFIG).read_text())
        config = MoPsConfig.from_dict(meta["mops_config"])
        saved_sig = meta["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{d / CONFIG} is corrupt or not a MoPs adapter config ({e})") from e
    sig = _model_signature(model)
    diffs = [f"{k}: adapter {saved_sig.get(k)!r} vs model {v!r}" for k, v in sig.items() if saved_sig.get(k) != v]
    if diffs:
        raise ValueError("adapter was trained for another model: " + "; ".join(diffs))
    try:
        tensors = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{d / WEIGHTS} is corrupt or truncated ({e}); re-save the adapter") from e
    return config, tensors


def _load_tensors(mops: MoPsModule, tensors: dict) -> None:
    expected = mops.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"adapter tensors do not match: missing {missing}, unexpected {unexpected}, shapes {shapes}")
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(f"adapter holds non-finite values in {bad}; it cannot be used")
    mops.load_state_dict(tensors)


def load_adapter(model, directory):
    """Attach (if needed) and load an adapter saved by `save_adapter`, checking that it fits the model.
    A PEFT LoRA directory is attached as LoRA (the model must have no adapter)."""
    if lora.is_lora_dir(directory):
        return lora.load_lora(model, directory)
    if lora.has_lora(model):
        raise ValueError("this model has LoRA attached; call detach_adapter(model) before loading a MoPs adapter")
    config, tensors = _read_adapter(model, directory)
    if not hasattr(model, "mops"):
        # checked on a module of its own first, so that a bad file leaves the model as it was
        _load_tensors(new_mops_module(model, config), tensors)
        attach(model, config)
    mops = get_mops(model)
    if mops.config.to_dict() != config.to_dict():
        raise ValueError(
            f"model already has MoPs with another config ({mops.config.to_dict()}) than the adapter "
            f"({config.to_dict()}); detach it first"
        )
    _load_tensors(mops, tensors)
    return model


def trained_adapter(model):
    """What trains on `model`: its MoPs module, or a view of its LoRA tensors (lora.LoraView); either has
    `state_dict()` and `named_parameters()` over exactly the tensors that train and travel."""
    if lora.has_lora(model):
        return lora.LoraView(model)
    return get_mops(model)


def detach_adapter(model):
    """Remove whichever adapter is attached (MoPs, prompt or LoRA), restoring the model exactly."""
    if lora.has_lora(model):
        return lora.detach_lora(model)
    return detach(model)


def add_adapter(model, name: str, directory):
    """Keep the adapter saved in `directory` under `name`, to serve it with others in one batch (see
    `using_adapters`). A model without MoPs first loads this adapter as its own (load_adapter)."""
    config, tensors = _read_adapter(model, directory)
    module = new_mops_module(model, config)
    _load_tensors(module, tensors)
    if not hasattr(model, "mops"):
        attach(model, config)
        _load_tensors(get_mops(model), tensors)
    get_mops(model).bank.add(name, module, source=str(directory))
    return model


def remove_adapter(model, name: str):
    """Forget the adapter added under `name`."""
    get_mops(model).bank.remove(name)
    return model


def adapter_names(model) -> list[str]:
    """The names of the adapters added to `model`, in the order they were added."""
    return get_mops(model).bank.names()


@contextmanager
def using_adapters(model, names):
    """Within the block, every forward and `generate` serves sample i of its batch with the adapter added
    as names[i] (None: the backbone alone), all in one batch; outside it, the model's own MoPs:

        with mops_fast.using_adapters(model, ["owner_a", None, "owner_b"]):
            out = model.generate(**batch, max_new_tokens=32)
    """
    mops = get_mops(model)
    request = mops.bank.check_request(names)
    state = mops.state
    before = state.bank_request
    state.bank_request = request
    try:
        yield model
    finally:
        state.bank_request = before
        state.bank_rows = state.bank_none = None
