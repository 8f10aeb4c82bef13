"""Centralized runs: train and evaluate `none`, `prompt` and `mops` (and `lora`, the outside reference
through PEFT) on one backbone, write results.

A run writes under runs/<name>/: results.json (DESIGN.md §6), results.md, ppl_by_category.png, and per
method a checkpoint (resumable) and the trained adapter.
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch

from mops_fast.config import (DEFAULT_METHODS, METHODS, MoPsConfig, check_eval_config, check_lr_candidates,
                              lr_candidates, method_overrides)
from mops_fast.config_file import check_keys, read_config_file
from mops_fast.hf.adapter import detach_adapter, load_adapter, save_adapter
from mops_fast.hf.attach import attach, init_prompts_from_kv
from mops_fast.hf.lora import LoraSettings, attach_lora
from mops_fast.hf.loading import load_model
from mops_fast.machine import machine_record
from mops_fast.train.data import Formatter, collate, load_records, per_category, select_categories
from mops_fast.train.evaluate import evaluate_perplexity, gate_result_keys
from mops_fast.train.report import bar_plot, markdown_table, reduction
from mops_fast.train.trainer import Trainer, TrainConfig

TOP_KEYS = {"name", "model", "dtype", "compression", "data", "mops", "lora", "train", "methods",
            "method_overrides", "lr_search", "eval", "init", "out_dir", "seed", "threads"}


def load_config(path) -> dict:
    """Read a YAML or JSON run config and check its top-level keys."""
    return check_config(read_config_file(path, example="configs/demo.yaml"), f"config {path}")


def check_config(cfg: dict, where: str = "config") -> dict:
    """A centralized run config's keys, methods and settings are valid (errors name `where`)."""
    check_keys(cfg, TOP_KEYS, where)
    methods = cfg.get("methods", DEFAULT_METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"{where}: unknown method(s) {bad}; choose from {list(METHODS)}")
    # settings are checked before the model loads, not when a method's turn comes minutes later
    LoraSettings.from_dict(cfg.get("lora", {}))
    MoPsConfig.from_dict(cfg.get("mops", {}))
    train = dict(cfg.get("train") or {})
    TrainConfig.from_dict(train)
    for over in method_overrides(cfg, where).values():
        TrainConfig.from_dict({**train, **over})
    if (cfg.get("lr_search") or {}).get("candidates") is not None:
        check_lr_candidates(cfg["lr_search"], where)
    # eval.every: also evaluate the test records every that many training steps (a learning curve)
    check_eval_config(cfg.get("eval"), where, curve=True)
    return cfg


def resolve_data_path(path: str) -> str:
    """Data paths in configs are relative to the repository root (where ../shared lives)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    root = Path(__file__).resolve().parents[2]
    return str(root / p)


class RunContext:
    """What every method of a run shares: backbone, tokenizer, data, configs."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.name = cfg.get("name", "run")
        self.seed = int(cfg.get("seed", 0))
        self.out = Path(cfg.get("out_dir", "runs")) / self.name
        data = cfg.get("data", {})
        if "train" not in data or "test" not in data:
            raise ValueError("config: data.train and data.test (JSON Lines paths) are required")
        self.data_name = data.get("name", Path(data["train"]).parent.name)
        train = load_records(resolve_data_path(data["train"]))
        test = load_records(resolve_data_path(data["test"]))
        cats = data.get("categories")
        train, test = select_categories(train, cats), select_categories(test, cats)
        self.categories = sorted({r["category"] for r in train})
        heldout_n = int(cfg.get("lr_search", {}).get("heldout_per_category", 0))
        if heldout_n:  # held-out training records for choosing learning rates, never trained on
            held = per_category(train, heldout_n, seed=self.seed + 1)
            ids = {id(r) for r in held}
            self.heldout = held
            train = [r for r in train if id(r) not in ids]
        else:
            self.heldout = []
        self.train = train
        self.test = per_category(test, data.get("test_per_category"), seed=self.seed)
        self.model, self.tok = load_model(cfg.get("model", "smollm2-135m"), dtype=cfg.get("dtype"))
        self.mops_cfg = MoPsConfig.from_dict(cfg.get("mops", {}))
        self.train_cfg = cfg.get("train", {})
        ev = dict(cfg.get("eval") or {})
        self.eval_every = int(ev.pop("every", 0) or 0)
        self.eval_cfg = {"batch_size": 8, "max_length": self.train_cfg.get("max_length", 256), **ev}

    def method_config(self, method: str) -> MoPsConfig:
        return self.mops_cfg if method == "mops" else MoPsConfig.prompt_baseline(self.mops_cfg)

    def method_train_config(self, method: str, **extra) -> TrainConfig:
        d = dict(self.train_cfg)
        d.update(self.cfg.get("method_overrides", {}).get(method, {}))
        d.setdefault("seed", self.seed)
        d.update(extra)
        return TrainConfig.from_dict(d)

    def init_batch(self) -> dict:
        n = int(self.cfg.get("init", {}).get("kv_samples", 16))
        fmt = Formatter(self.tok, max_length=self.eval_cfg["max_length"])
        g = torch.Generator().manual_seed(self.seed + 7)
        idx = torch.randperm(len(self.train), generator=g)[:n].tolist()
        return collate([fmt(self.train[i]) for i in idx], self.tok.pad_token_id)

    def prepare(self, method: str) -> None:
        """Attach a fresh adapter for `method`, initialized as the config says."""
        if method == "lora":
            attach_lora(self.model, LoraSettings.from_dict(self.cfg.get("lora", {})), seed=self.seed)
            return
        mcfg = self.method_config(method)
        torch.manual_seed(self.seed)
        attach(self.model, mcfg)
        if mcfg.init == "kv":
            b = self.init_batch()
            dev = next(self.model.parameters()).device
            init_prompts_from_kv(self.model, b["input_ids"].to(dev), b["attention_mask"].to(dev), seed=self.seed)

    def evaluate(self, records=None) -> dict:
        return evaluate_perplexity(self.model, self.tok, records or self.test, **self.eval_cfg)


def choose_lr(ctx: RunContext, method: str, log) -> tuple[float, dict]:
    """Pick the learning rate of `method` on held-out training records (short runs, same init)."""
    ls = ctx.cfg["lr_search"]
    scores = {}
    for lr in lr_candidates(ls, method):
        ctx.prepare(method)
        try:
            tc = ctx.method_train_config(method, lr=float(lr), steps=int(ls["steps"]), progress=False,
                                         warmup_steps=min(int(ls["steps"]) // 5, 10))
            Trainer(ctx.model, ctx.tok, ctx.train, tc, categories=ctx.categories).train()
            scores[float(lr)] = ctx.evaluate(ctx.heldout)["ppl"]["mean"]
        finally:
            detach_adapter(ctx.model)
        log(f"  lr search {method}: lr={lr} held-out mean ppl {scores[float(lr)]:.3f}")
    best = min(scores, key=scores.get)
    return best, scores


def run_method(ctx: RunContext, method: str, log) -> dict:
    t0 = time.perf_counter()
    if method == "none":
        res = ctx.evaluate()
        return {"ppl": res["ppl"], "train_tokens_per_s": None, "wall_s": time.perf_counter() - t0}
    extra, search = {}, None
    mdir = ctx.out / method
    done = mdir / "adapter" / "adapter_config.json"
    if ctx.heldout and lr_candidates(ctx.cfg.get("lr_search", {}), method) and not done.is_file():
        best, scores = choose_lr(ctx, method, log)
        extra["lr"], search = best, {str(k): v for k, v in scores.items()}
        (mdir).mkdir(parents=True, exist_ok=True)
        (mdir / "lr_search.json").write_text(json.dumps({"best": best, "scores": search}, indent=2))
    elif (mdir / "lr_search.json").is_file():
        s = json.loads((mdir / "lr_search.json").read_text())
        extra["lr"], search = s["best"], s["scores"]
    tc = ctx.method_train_config(method, **extra)
    if done.is_file():  # finished earlier: reuse the adapter, only evaluate
        load_adapter(ctx.model, mdir / "adapter")
        tps, history = None, []
        prev = ctx.out / "results.json"
        if prev.is_file():  # keep what the training run measured (its speed, its loss and eval history)
            entry = json.loads(prev.read_text()).get("methods", {}).get(method, {})
            tps, history = entry.get("train_tokens_per_s"), entry.get("history") or []
    else:
        ctx.prepare(method)
        trainer = Trainer(ctx.model, ctx.tok, ctx.train, tc, out_dir=mdir, categories=ctx.categories)
        history = trainer.train(eval_fn=lambda: _curve_point(ctx.evaluate()), eval_every=ctx.eval_every)
        tps = trainer.tokens_per_s
        save_adapter(ctx.model, mdir / "adapter")
    trainable = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
    try:
        res = ctx.evaluate()
    finally:
        detach_adapter(ctx.model)
    if ctx.eval_every and not any(h.get("stage") == "eval" and h.get("step") == tc.steps for h in history):
        history = [*history, {"stage": "eval", "step": tc.steps, **_curve_point(res)}]  # the curve's last point
    out = {"ppl": res["ppl"], "train_tokens_per_s": tps, "lr": tc.lr, "wall_s": time.perf_counter() - t0,
           "trainable_params": trainable, "history": history, **gate_result_keys(res)}
    if search:
        out["lr_search"] = search
    return out


def _curve_point(res: dict) -> dict:
    """A learning-curve entry from an evaluation: its perplexities and gate statistics."""
    return {"ppl": res["ppl"], **gate_result_keys(res)}


def run(cfg: dict, log=print) -> dict:
    """Run every method of the config; returns the results dict (also written to runs/<name>/)."""
    threads = cfg.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    ctx = RunContext(cfg)
    ctx.out.mkdir(parents=True, exist_ok=True)
    results = {
        "model": cfg.get("model", "smollm2-135m"), "data": ctx.data_name, "setting": "centralized",
        "compression": cfg.get("compression", "dense"), "steps": ctx.method_train_config("mops").steps,
        "seed": ctx.seed, "methods": {},
        "eval": {"test_records": len(ctx.test), "categories": ctx.categories},
        "mops_config": ctx.mops_cfg.to_dict(),
        "machine": machine_record(str(next(ctx.model.parameters()).device)),
    }
    for method in cfg.get("methods", list(DEFAULT_METHODS)):
        log(f"[{ctx.name}] {method} ...")
        results["methods"][method] = run_method(ctx, method, log)
        log(f"[{ctx.name}] {method}: mean ppl {results['methods'][method]['ppl']['mean']:.3f} "
            f"({results['methods'][method]['wall_s']:.0f} s)")
    write_results(results, ctx.out)
    return results


def write_results(results: dict, out: Path) -> None:
    r = reduction(results)
    if r is not None:
        results["mops_vs_prompt_reduction"] = r
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(markdown_table(results))
    bar_plot(results, out / "ppl_by_category.png")


def evaluate_run(cfg: dict, log=print) -> dict:
    """`mops-fast eval`: evaluate the adapters a finished run saved (and the plain backbone)."""
    ctx = RunContext(cfg)
    out = {}
    for method in cfg.get("methods", list(DEFAULT_METHODS)):
        if method == "none":
            out[method] = ctx.evaluate()["ppl"]
            continue
        ad = ctx.out / method / "adapter"
        load_adapter(ctx.model, ad)
        try:
            out[method] = ctx.evaluate()["ppl"]
        finally:
            detach_adapter(ctx.model)
        log(f"{method}: mean ppl {out[method]['mean']:.3f}")
    return out


def deep_update(base: dict, upd: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
