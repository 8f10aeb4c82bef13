"""MoPsConfig: the hyperparameters of one Mixture-of-Prompts adapter, validated with clear errors."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mops_fast.config_file import check_keys, dataclass_from_dict

# The methods a run compares (DESIGN.md §1): `none` the frozen backbone, `prompt` one deep prompt of J*L
# tokens, `mops`; and `lora` (PEFT, hf/lora.py), the outside reference, trained only where a config names it.
METHODS = ("none", "prompt", "mops", "lora")
DEFAULT_METHODS = ("none", "prompt", "mops")
TRAINED_METHODS = ("prompt", "mops", "lora")


def lr_candidates(lr_search: dict, method: str) -> list[float] | None:
    """The learning rates a search tries for `method`: `lr_search.candidates` is one list for every method,
    or a mapping of method (or `default`) to its own list; None when it has none for `method`."""
    cands = (lr_search or {}).get("candidates")
    if isinstance(cands, dict):
        cands = cands.get(method, cands.get("default"))
    return [float(c) for c in cands] if cands else None


def method_overrides(cfg: dict, where: str) -> dict[str, dict]:
    """A run config's `method_overrides` (train keys per method), checked to name methods and hold mappings."""
    overrides = cfg.get("method_overrides") or {}
    for m, over in overrides.items():
        if m not in METHODS or not isinstance(over, dict):
            raise ValueError(f"{where}: method_overrides.{m} must name a method and hold train keys")
    return overrides


def check_lr_candidates(lr_search: dict, where: str) -> None:
    """`lr_search.candidates` is a non-empty list of positive rates, or a mapping of trained methods (or
    `default`) to such lists."""
    cands = (lr_search or {}).get("candidates")
    lists = cands if isinstance(cands, dict) else {"candidates": cands}
    stray = sorted(set(lists) - set(TRAINED_METHODS) - {"default"}) if isinstance(cands, dict) else []
    if stray:
        raise ValueError(f"{where}: lr_search.candidates has unknown methods {stray}; use {list(TRAINED_METHODS)} "
                         "or 'default'")
    for k, v in lists.items():
        try:
            ok = isinstance(v, (list, tuple)) and len(v) > 0 and all(float(c) > 0 for c in v)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{where}: lr_search.candidates{'' if k == 'candidates' else '.' + k} must be a "
                             f"non-empty list of positive learning rates, got {v!r}")


def check_eval_config(ev, where: str, curve: bool) -> None:
    """A run config's `eval` section: batch_size and max_length (integers >= 1) and, where the runner draws
    a learning curve from it (`curve`, the centralized one), every (an integer >= 0)."""
    ev = {} if ev is None else ev
    known = {"batch_size", "max_length"} | ({"every"} if curve else set())
    check_keys(ev, known, f"{where}: eval")
    for k in sorted(known):
        v = ev.get(k)
        low = 0 if k == "every" else 1
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            what = "an integer >= 0 (0: evaluate only the finished model)" if k == "every" else "an integer >= 1"
            raise ValueError(f"{where}: eval.{k} must be {what}, got {v!r}")


@dataclass
class MoPsConfig:
    """Hyperparameters of DESIGN.md §1.

    num_experts   J, expert prompt groups (1 with gate=False is classic deep prefix tuning)
    prompt_len    L, tokens per expert
    gate_layer    g, the gate reads the hidden states entering layer g (None: round(10 * N / 32))
    first_layer   first injected layer (None: the gate layer); layers first_layer..N-1 get prompts
    gate_hidden   G, hidden size of the gate MLP
    temperature   tau of the gate softmax
    top_k         keep the k largest gate weights (None: all)
    mode          'scale' (gate scales each expert's attention mass) or 'mix' (per-sample mixed prompt)
    gate          False: no gate, plain prefix of J*L tokens (the `prompt` baseline)
    init          'kv' (backbone keys/values on real text) or 'random' (N(0, init_scale^2))
    init_scale    std of the random init (and of the noise added to kv init to break expert symmetry)
    """

    num_experts: int = 8
    prompt_len: int = 8
    gate_layer: int | None = None
    first_layer: int | None = None
    gate_hidden: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    mode: str = "scale"
    gate: bool = True
    init: str = "kv"
    init_scale: float = 0.5

    def __post_init__(self):
        self.validate()

    def validate(self, num_layers: int | None = None) -> None:
        def bad(msg):
            raise ValueError(f"MoPsConfig: {msg}")

        for name in ("num_experts", "prompt_len", "gate_hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            bad(f"temperature must be > 0, got {self.temperature!r}")
        if self.top_k is not None:
            if not isinstance(self.top_k, int) or self.top_k < 1:
                bad(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
            if self.top_k > self.num_experts:
                bad(f"top_k={self.top_k} exceeds num_experts={self.num_experts}; use top_k <= num_experts")
        if self.mode not in ("scale", "mix"):
            bad(f"mode must be 'scale' or 'mix', got {self.mode!r}")
        if self.init not in ("kv", "random"):
            bad(f"init must be 'kv' or 'random', got {self.init!r}")
        if not (self.init_scale >= 0):
            bad(f"init_scale must be >= 0, got {self.init_scale!r}")
        if not self.gate and self.num_experts != 1:
            bad("gate=False means one plain prompt: set num_experts=1 and prompt_len=J*L")
        if num_layers is not None:
            g, f = self.resolved_layers(num_layers)
            if not 0 <= g < num_layers:
                bad(f"gate_layer={g} is outside the model's layers 0..{num_layers - 1}")
            if not 0 <= f < num_layers:
                bad(f"first_layer={f} is outside the model's layers 0..{num_layers - 1}")
            if self.gate and f < g:
                bad(f"first_layer={f} comes before gate_layer={g}: prompts need the gate weights, "
                    "which exist only once layer gate_layer is reached")

    def resolved_layers(self, num_layers: int) -> tuple[int, int]:
        """(gate layer, first injected layer) for a model with num_layers layers."""
        g = round(10 * num_layers / 32) if self.gate_layer is None else self.gate_layer
        f = g if self.first_layer is None else self.first_layer
        return g, f

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoPsConfig":
        return dataclass_from_dict(cls, d, "MoPsConfig")

    @classmethod
    def prompt_baseline(cls, like: "MoPsConfig") -> "MoPsConfig":
        """One deep prompt with the same J*L tokens at the same layers and no gate."""
        g = like.gate_layer
        return dataclasses.replace(
            like, num_experts=1, prompt_len=like.num_experts * like.prompt_len, top_k=None, gate=False,
            mode="scale", gate_layer=g,
        )
