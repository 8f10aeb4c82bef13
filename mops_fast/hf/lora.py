"""LoRA through PEFT: the outside reference DESIGN.md §2 allows beside the `prompt` baseline.

Users choosing between MoPs and the tool they would pick instead mostly pick LoRA, so a run can train it
on the same backbone, data, steps and evaluation (`methods: [..., lora]`). PEFT's layers are injected into
the model in place (`inject_adapter_in_model`), so the model keeps its type and forward, the trainer and
the evaluation see the same model they see with MoPs, and a GPTQ backbone's QuantLinear takes LoRA too
(registered as a custom module: the int4 kernels compute the frozen part, LoRA adds its low-rank term).

The adapter is saved in PEFT's own layout (`adapter_config.json` with `peft_type: LORA`,
`adapter_model.safetensors` with `base_model.model.`-prefixed keys), so `PeftModel.from_pretrained` loads
it on a dense backbone, and `load_adapter` loads PEFT LoRA adapters trained elsewhere.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mops_fast.config_file import dataclass_from_dict

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_ADAPTER = "default"


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # LLaMA's attention projections, PEFT's and the LoRA paper's default for this family
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"lora: r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora: alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora: dropout must be in [0, 1), got {self.dropout!r}")
        if (isinstance(self.target_modules, str) or not self.target_modules
                or not all(isinstance(t, str) and t for t in self.target_modules)):
            raise ValueError(f"lora: target_modules must be a non-empty list of module names such as "
                             f"['q_proj', 'v_proj'], got {self.target_modules!r}")
        self.target_modules = list(self.target_modules)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSettings":
        return dataclass_from_dict(cls, d or {}, "lora")

    def to_dict(self) -> dict:
        return asdict(self)


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("the `lora` method needs PEFT: pip install 'peft>=0.15' (or `make install`, which "
                          "installs the `lora` extra)") from None
    return peft


def has_lora(model) -> bool:
    return getattr(model, "_mops_lora", None) is not None


def _check_free(model) -> None:
    if has_lora(model):
        raise ValueError("this model already has LoRA attached; call detach_adapter(model) first")
    if hasattr(model, "mops"):
        raise ValueError("this model has MoPs attached; LoRA and MoPs are not trained together: "
                         "call mops_fast.detach(model) first")


def _peft_config(settings: LoraSettings):
    peft = _peft()
    from peft.tuners.lora.layer import Linear as LoraLinear

    from mops_fast.nn.quant_linear import QuantLinear

    cfg = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                          target_modules=list(settings.target_modules), bias="none")
    # PEFT's Linear layer only calls its base layer for the frozen product, so our int4 layer works as one
    cfg._register_custom_module({QuantLinear: LoraLinear})
    return cfg


def _targets(model, settings: LoraSettings) -> dict[str, nn.Module]:
    """Module path -> module of every layer LoRA adapts (those whose last name is a target)."""
    from mops_fast.nn.quant_linear import QuantLinear

    found = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in settings.target_modules}
    wrong = [f"{n} ({type(m).__name__})" for n, m in found.items() if not isinstance(m, (nn.Linear, QuantLinear))]
    missing = [t for t in settings.target_modules if not any(n.rsplit(".", 1)[-1] == t for n in found)]
    if missing or wrong or not found:
        raise ValueError(f"lora: target_modules {settings.target_modules} do not fit this model: not found "
                         f"{missing}, not linear layers {wrong}; LLaMA-family models name theirs q_proj, k_proj, "
                         "v_proj, o_proj, gate_proj, up_proj, down_proj")
    return found


def expected_shapes(model, settings: LoraSettings) -> dict[str, tuple[int, ...]]:
    """On-disk key -> shape of every LoRA tensor `settings` gives `model` (nothing is attached)."""
    out = {}
    for n, m in _targets(model, settings).items():
        out[f"{_PREFIX}{n}.lora_A.weight"] = (settings.r, m.in_features)
        out[f"{_PREFIX}{n}.lora_B.weight"] = (m.out_features, settings.r)
    return out


def _disk_key(param_name: str) -> str:
    return _PREFIX + param_name.replace(f".{_ADAPTER}.", ".")


def attach_lora(model, settings: LoraSettings, seed: int | None = None):
    """Inject LoRA layers (float32, B = 0 so the model starts unchanged) and train only them."""
    _check_free(model)
    _targets(model, settings)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    if seed is not None:
        torch.manual_seed(seed)
    attrs = set(vars(model))
    model._mops_lora = (settings, saved, ())
    try:
        with warnings.catch_warnings():
            # PEFT warns of any layer type it does not know; QuantLinear is registered above on purpose
            warnings.filterwarnings("ignore", message="Unsupported layer type .*QuantLinear")
            _peft().inject_adapter_in_model(_peft_config(settings), model, adapter_name=_ADAPTER)
    except BaseException:
        model._mops_lora = (settings, saved, tuple(set(vars(model)) - attrs - {"_mops_lora"}))
        detach_lora(model)  # whatever PEFT injected before it failed goes, the flags come back
        raise
    added = tuple(set(vars(model)) - attrs - {"_mops_lora"})  # PEFT's bookkeeping (peft_config)
    for n, p in model.named_parameters():
        if ".lora_" in n:
            # float32 like the MoPs tensors: bf16 / fp16 Adam updates of small adapters lose their steps
            p.data = p.data.float()
            p.requires_grad_(True)
    model._mops_lora = (settings, saved, added)
    return model


def detach_lora(model):
    """Put the original layers back and restore every parameter's gradient flag."""
    if not has_lora(model):
        raise ValueError("this model has no LoRA attached")
    from peft.tuners.tuners_utils import BaseTunerLayer

    _, saved, added = model._mops_lora
    for name, m in list(model.named_modules()):
        if isinstance(m, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.get_base_layer())
    for a in added:
        delattr(model, a)
    del model._mops_lora
    for n, p in model.named_parameters():
        p.requires_grad_(saved.get(n, p.requires_grad))
    return model


def lora_settings(model) -> LoraSettings:
    if not has_lora(model):
        raise ValueError("this model has no LoRA attached: call attach_lora(model, LoraSettings(...))")
    return model._mops_lora[0]


def lora_parameters(model) -> list[nn.Parameter]:
    return list(lora_state_dict(model).values())


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """On-disk key -> tensor (PEFT's names) of the attached LoRA."""
    lora_settings(model)
    return {_disk_key(n): p for n, p in model.named_parameters() if ".lora_" in n}


class LoraView:
    """The attached LoRA's tensors under PEFT's on-disk names, seen through the two methods the federated
    code reads an adapter module by (`state_dict`, `named_parameters`); it has no gate."""

    gate = None

    def __init__(self, model):
        lora_settings(model)
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return lora_state_dict(self.model)

    def named_parameters(self):
        return iter(lora_state_dict(self.model).items())


def load_lora_state_dict(model, tensors: dict) -> None:
    """Copy `tensors` (PEFT's names) into the attached LoRA, after checking names, shapes and values."""
    own = lora_state_dict(model)
    _check_tensors({k: tuple(v.shape) for k, v in own.items()}, tensors)
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k])


def _check_tensors(expected: dict, tensors: dict) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {expected[k]}"
              for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k])]
    if missing or unexpected or shapes:
        raise ValueError(f"LoRA tensors do not fit the model: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}, shapes {shapes[:4]}")
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"LoRA adapter holds non-finite values in {bad[:4]}; it cannot be used")


def is_lora_dir(directory) -> bool:
    p = Path(directory) / CONFIG
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("peft_type") == "LORA"
    except (json.JSONDecodeError, AttributeError):
        return False


def save_lora(model, directory) -> Path:
    """Write the attached LoRA as a PEFT adapter directory (the backbone is not saved)."""
    from safetensors.torch import save_file

    settings = lora_settings(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"LoRA adapter holds non-finite values in {bad[:4]}; not saved ({directory} is unchanged)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, d / WEIGHTS)
    meta = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.r, "lora_alpha": settings.alpha,
            "lora_dropout": settings.dropout, "target_modules": list(settings.target_modules), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "base_model_name_or_path": getattr(
                model.config, "_name_or_path", None) or None}
    tmpc = d / (CONFIG + ".tmp")
    tmpc.write_text(json.dumps(meta, indent=2))
    os.replace(tmpc, d / CONFIG)
    return d


def read_lora(model, directory) -> tuple[LoraSettings, dict]:
    """Settings and tensors of a PEFT LoRA directory, checked against `model`; nothing is attached."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d} is not a LoRA adapter: expected {CONFIG} and {WEIGHTS} in it")
    try:
        meta = json.loads((d / CONFIG).read_text())
        targets = meta["target_modules"]
        if isinstance(targets, str):
            raise ValueError("target_modules is a regular expression; only lists of module names are read")
        unsupported = {k: meta[k] for k in ("use_dora", "use_rslora", "fan_in_fan_out", "modules_to_save",
                                            "rank_pattern", "alpha_pattern", "layers_to_transform")
                       if meta.get(k)}
        if unsupported or meta.get("bias", "none") != "none":
            raise ValueError(f"options not supported here: {unsupported or {'bias': meta.get('bias')}}")
        settings = LoraSettings(r=int(meta["r"]), alpha=float(meta["lora_alpha"]),
                                dropout=float(meta.get("lora_dropout", 0.0)), target_modules=list(targets))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{d / CONFIG} is corrupt or not a LoRA config this package reads ({e})") from e
    try:
        tensors = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{d / WEIGHTS} is corrupt or truncated ({e}); re-save the adapter") from e
    _check_tensors(expected_shapes(model, settings), tensors)
    return settings, tensors


def load_lora(model, directory):
    """Attach the LoRA saved in `directory` (checked first, so a bad file leaves the model as it was)."""
    settings, tensors = read_lora(model, directory)
    _check_free(model)
    attach_lora(model, settings)
    load_lora_state_dict(model, tensors)
    return model
