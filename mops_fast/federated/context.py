"""What the server and the clients of one federated run share: the backbone, the data, the partition, the
adapter of each method and how it is initialized. Built lazily from the validated config, so a Flower
ClientApp loads only what a client needs and the ServerApp only what the server needs.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from mops_fast.config import MoPsConfig
from mops_fast.federated.backbone import load_backbone
from mops_fast.federated.client import LocalClient, get_state
from mops_fast.federated.config import fed_config, resolve_path
from mops_fast.federated.partition import partition
from mops_fast.hf.adapter import detach_adapter, trained_adapter
from mops_fast.hf.attach import attach, init_prompts_from_kv
from mops_fast.hf.lora import LoraSettings, attach_lora, has_lora
from mops_fast.train.data import Formatter, collate, load_records, per_category, select_categories
from mops_fast.train.evaluate import evaluate_perplexity


class FedContext:
    def __init__(self, cfg: dict, base_dir: str | Path | None = None):
        self.cfg = cfg
        self.name = cfg.get("name", "federated")
        self.seed = int(cfg.get("seed", 0))
        self.fed = fed_config(cfg)
        self.base = Path(base_dir) if base_dir else None
        self.data_cfg = cfg["data"]
        self.mops_cfg = MoPsConfig.from_dict(cfg.get("mops") or {})
        self.train_cfg = dict(cfg.get("train") or {})
        self.eval_cfg = {"batch_size": 8, "max_length": self.train_cfg.get("max_length", 256),
                         **(cfg.get("eval") or {})}

    # ------------------------------------------------------------------------------------------ data
    def _path(self, key: str) -> str:
        return resolve_path(self.data_cfg[key], self.base)

    @cached_property
    def _train_and_heldout(self) -> tuple[list[dict], list[dict]]:
        train = select_categories(load_records(self._path("train")), self.data_cfg.get("categories"))
        n = int((self.cfg.get("lr_search") or {}).get("heldout_per_category", 0))
        if not n:
            return train, []
        # Held-out training records for choosing learning rates: never part of any client.
        held = per_category(train, n, seed=self.seed + 1)
        ids = {id(r) for r in held}
        return [r for r in train if id(r) not in ids], held

    @property
    def train(self) -> list[dict]:
        return self._train_and_heldout[0]

    @property
    def heldout(self) -> list[dict]:
        return self._train_and_heldout[1]

    @cached_property
    def categories(self) -> list[str]:
        cats = self.data_cfg.get("categories")
        return sorted(cats) if cats else sorted({r["category"] for r in self.train})

    @cached_property
    def parts(self) -> list[list[int]]:
        return partition(self.train, self.fed.partition)

    def client_records(self, cid: int) -> list[dict]:
        if not 0 <= cid < len(self.parts):
            raise ValueError(f"client id {cid} is outside 0..{len(self.parts) - 1} (partition.num_clients)")
        return [self.train[i] for i in self.parts[cid]]

    @cached_property
    def _test_all(self) -> list[dict]:
        return select_categories(load_records(self._path("test")), self.data_cfg.get("categories"))

    @cached_property
    def test(self) -> list[dict]:
        return per_category(self._test_all, self.data_cfg.get("test_per_category"), seed=self.seed)

    @cached_property
    def round_test(self) -> list[dict]:
        """The per-round evaluation subset (the first n per category of the same shuffle as `test`)."""
        n = self.data_cfg.get("round_test_per_category")
        return self.test if n is None else per_category(self._test_all, n, seed=self.seed)

    # ------------------------------------------------------------------------------------------ model
    @cached_property
    def backbone(self):
        threads = self.cfg.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        return load_backbone(self.cfg.get("model", "smollm2-135m"), dtype=self.cfg.get("dtype"))

    @property
    def model(self):
        return self.backbone[0]

    @property
    def tok(self):
        return self.backbone[1]

    def method_config(self, method: str) -> MoPsConfig:
        if method not in ("prompt", "mops"):
            raise ValueError(f"method {method!r} has no MoPs adapter; MoPs methods are 'prompt' and 'mops'")
        return self.mops_cfg if method == "mops" else MoPsConfig.prompt_baseline(self.mops_cfg)

    @cached_property
    def lora_settings(self) -> LoraSettings:
        return LoraSettings.from_dict(self.cfg.get("lora") or {})

    def adapter_settings(self, method: str) -> dict:
        """The settings of `method`'s adapter (a MoPs config, or LoRA's), as a plain dict."""
        return self.lora_settings.to_dict() if method == "lora" else self.method_config(method).to_dict()

    def method_train(self, method: str, lr: float | None = None) -> dict:
        d = dict(self.train_cfg)
        d.update((self.cfg.get("method_overrides") or {}).get(method, {}))
        if lr is not None:
            d["lr"] = float(lr)
        return d

    def init_batch(self) -> dict:
        """Real training text for the key/value initialization of the prompts (same draw as centralized runs)."""
        n = int((self.cfg.get("init") or {}).get("kv_samples", 16))
        fmt = Formatter(self.tok, max_length=self.eval_cfg["max_length"])
        g = torch.Generator().manual_seed(self.seed + 7)
        idx = torch.randperm(len(self.train), generator=g)[:n].tolist()
        return collate([fmt(self.train[i]) for i in idx], self.tok.pad_token_id)

    def attach(self, method: str, init: bool = True) -> dict[str, torch.Tensor]:
        """Attach `method`'s adapter to the backbone; with `init`, initialize it and return its tensors
        (the initial global state). Clients attach without init: the global state overwrites it."""
        if method == "lora":  # B = 0: the global model starts as the backbone, as PEFT's LoRA does
            attach_lora(self.model, self.lora_settings, seed=self.seed)
            return get_state(trained_adapter(self.model))
        mcfg = self.method_config(method)
        torch.manual_seed(self.seed)
        attach(self.model, mcfg)
        if init and mcfg.init == "kv":
            b = self.init_batch()
            dev = next(self.model.parameters()).device
            init_prompts_from_kv(self.model, b["input_ids"].to(dev), b["attention_mask"].to(dev), seed=self.seed)
        return get_state(self.model.mops)

    def detach(self) -> None:
        if hasattr(self.model, "mops") or has_lora(self.model):
            detach_adapter(self.model)

    def client(self, cid: int, method: str, lr: float | None = None, records: list[dict] | None = None) -> LocalClient:
        recs = self.client_records(cid) if records is None else records
        return LocalClient(cid, self.model, self.tok, recs, self.categories, self.method_train(method, lr), self.seed)

    def evaluate(self, records: list[dict]) -> dict:
        return evaluate_perplexity(self.model, self.tok, records, batch_size=int(self.eval_cfg["batch_size"]),
                                   max_length=int(self.eval_cfg["max_length"]))
