"""Training MoPs (and the `prompt` baseline): stage A gate pretraining, stage B joint training; and
LoRA (the outside reference, hf/lora.py), which has no gate and so only stage B.

Only the adapter's tensors train. Batches are drawn deterministically from (seed, step), so a run resumed
from its checkpoint sees exactly the batches an uninterrupted run would. Under torchrun, each rank
takes a slice of every global batch and gradients are summed over ranks (gloo on CPU, nccl on GPUs);
the loss is normalized by the global token count, so any world size gives the same update.
"""
from __future__ import annotations

import atexit
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mops_fast.config_file import dataclass_from_dict
from mops_fast.hf.attach import GateReached
from mops_fast.hf.lora import has_lora, load_lora_state_dict, lora_parameters, lora_state_dict
from mops_fast.train.data import Formatter, collate
from mops_fast.train.loss import response_nll


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 4  # global batch per optimizer step (split over ranks and accumulation steps)
    grad_accum: int = 1
    lr: float = 3e-3
    gate_lr: float | None = None  # default: lr
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    max_length: int = 256
    gate_pretrain_steps: int = 50  # stage A; 0 turns it off
    gate_pretrain_samples: int = 256
    gate_pretrain_lr: float = 1e-2
    # label smoothing of stage A's targets: with 0, the gate's softmax saturates (one-hot weights, no
    # gradient left for stage B); eps bounds the logit margin at log((1 - eps + eps / J) J / eps)
    gate_pretrain_smoothing: float = 0.0
    load_balance: float = 0.0
    ckpt_every: int = 0  # 0: only at the end
    log_every: int = 10
    seed: int = 0
    progress: bool = True
    # steps in a row whose loss or gradients are NaN/inf that are skipped (no update) before training stops
    # with NonFiniteLossError; 0 stops at the first
    max_nonfinite_steps: int = 3

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "gate_pretrain_steps", "ckpt_every", "gate_pretrain_samples",
                     "max_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig: {name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: lr must be > 0, got {self.lr}")
        if not 0.0 <= self.gate_pretrain_smoothing < 1.0:
            raise ValueError(f"TrainConfig: gate_pretrain_smoothing must be in [0, 1), got {self.gate_pretrain_smoothing}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return dataclass_from_dict(cls, d, "TrainConfig")


class NonFiniteLossError(RuntimeError):
    """Training stopped: the loss or the gradients were NaN/inf for more steps in a row than allowed."""


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def dist_info() -> tuple[int, int]:
    """(rank, world size); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        # a group left alive at interpreter exit can abort the process ("terminate called without an active
        # exception" from gloo's threads) after its work is done: tear it down first
        atexit.register(_destroy_process_group)
    if world > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def step_indices(n: int, seed: int, step: int, count: int) -> list[int]:
    """`count` record indices for optimizer step `step`, a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n, (count,), generator=g).tolist()


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    def __init__(self, model, tokenizer, train_records: list[dict], cfg: TrainConfig,
                 out_dir: str | Path | None = None, categories: list[str] | None = None):
        if not train_records:
            raise ValueError("Trainer: no training records")
        self.model, self.tok, self.records, self.cfg = model, tokenizer, train_records, cfg
        self.mops = getattr(model, "mops", None)  # None: LoRA trains
        if self.mops is None and not has_lora(model):
            raise ValueError("Trainer: the model has no adapter to train: attach MoPs (mops_fast.attach) or LoRA "
                             "(mops_fast.attach_lora) first")
        self.kind = "lora" if self.mops is None else "mops"  # also the adapter's key in checkpoints
        self.categories = categories or sorted({r["category"] for r in train_records})
        unknown = sorted({r["category"] for r in train_records} - set(self.categories))
        if unknown:
            raise ValueError(f"Trainer: records have categories {unknown} outside {self.categories}")
        self.fmt = Formatter(tokenizer, max_length=cfg.max_length)
        self.out_dir = Path(out_dir) if out_dir else None
        self.rank, self.world = dist_info()
        self.device = next(model.parameters()).device
        if self.kind == "lora":
            self.params = lora_parameters(model)
            groups = [{"params": self.params, "lr": cfg.lr}]
        else:
            self.params = [p for p in self.mops.parameters() if p.requires_grad]
            groups = [{"params": [self.mops.prompt_k, self.mops.prompt_v], "lr": cfg.lr}]
        if self.gate is not None:
            groups.append({"params": list(self.gate.parameters()), "lr": cfg.gate_lr or cfg.lr})
        for gr in groups:
            gr["base_lr"] = gr["lr"]
        self.opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.step = 0
        self.gate_pretrained = False
        self.history: list[dict] = []
        self.tokens_per_s: float | None = None
        self.nonfinite_run = 0  # skipped steps in a row (non-finite loss or gradients)

    @property
    def gate(self):
        return None if self.mops is None else self.mops.gate

    # ---------------------------------------------------------------- checkpoints
    def _adapter_state(self) -> dict:
        if self.kind == "lora":
            return {"lora": {k: v.detach() for k, v in lora_state_dict(self.model).items()}}
        return {"mops": self.mops.state_dict()}

    def _load_adapter_state(self, ck: dict) -> None:
        if self.kind not in ck:
            raise KeyError(f"it holds no {self.kind} tensors (keys {sorted(ck)})")
        if self.kind == "lora":
            load_lora_state_dict(self.model, ck["lora"])
        else:
            self.mops.load_state_dict(ck["mops"])

    @property
    def ckpt_path(self) -> Path | None:
        return self.out_dir / "checkpoint.pt" if self.out_dir else None

    def save_checkpoint(self) -> None:
        if self.ckpt_path is None or self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_save({"step": self.step, "gate_pretrained": self.gate_pretrained,
                      **self._adapter_state(), "optimizer": self.opt.state_dict(),
                      "history": self.history}, self.ckpt_path)

    def maybe_resume(self) -> bool:
        if self.ckpt_path is None or not self.ckpt_path.is_file():
            return False
        try:
            ck = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
            self._load_adapter_state(ck)
            self.opt.load_state_dict(ck["optimizer"])
        except Exception as e:  # a corrupt file must not be silently trained over
            raise ValueError(f"checkpoint {self.ckpt_path} is corrupt or from another config ({e}); "
                             "delete it to start over") from e
        self.step, self.gate_pretrained = int(ck["step"]), bool(ck["gate_pretrained"])
        self.history = list(ck.get("history", []))
        return True

    # ---------------------------------------------------------------- stage A
    def gate_targets(self, cats: torch.Tensor) -> torch.Tensor:
        return cats % self.mops.config.num_experts

    @torch.no_grad()
    def gate_features(self, records: list[dict], batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled gate inputs of `records`: the backbone runs only up to the gate layer."""
        state = self.mops.state
        feats, cats = [], []
        state.stop_after_gate = True
        try:
            for i in range(0, len(records), batch_size):
                batch = collate([self.fmt(r) for r in records[i: i + batch_size]], self.tok.pad_token_id,
                                self.categories)
                try:
                    self.model.model(input_ids=batch["input_ids"].to(self.device),
                                     attention_mask=batch["attention_mask"].to(self.device),
                                     gate_mask=batch["gate_mask"].to(self.device), use_cache=False)
                    raise RuntimeError("gate layer was not reached")
                except GateReached as g:
                    feats.append(g.pooled.float())
                cats.append(batch["category"])
        finally:
            state.stop_after_gate = False
        return torch.cat(feats), torch.cat(cats).to(self.device)

    def pretrain_gate(self) -> dict | None:
        """Stage A: train the gate alone to send category c to expert c mod J (cross-entropy)."""
        cfg = self.cfg
        if self.gate is None or cfg.gate_pretrain_steps == 0 or self.gate_pretrained:
            return None
        n = cfg.gate_pretrain_samples - cfg.gate_pretrain_samples % self.world or self.world
        idx = step_indices(len(self.records), cfg.seed, -1, n)
        mine = [self.records[i] for i in idx[self.rank::self.world]]
        feats, cats = self.gate_features(mine)
        bad = int((~torch.isfinite(feats).all(-1)).sum())
        if bad:
            raise NonFiniteLossError(
                f"gate pretraining: the backbone's hidden states entering the gate layer are NaN/inf for {bad} of "
                f"{feats.shape[0]} records; the backbone itself overflows or is broken (fp16 weights overflow "
                "more often than fp32 or bf16): check its plain outputs")
        if self.world > 1:  # every rank trains the gate on all features: identical results
            fs, cs = [torch.empty_like(feats) for _ in range(self.world)], [torch.empty_like(cats) for _ in range(self.world)]
            dist.all_gather(fs, feats)
            dist.all_gather(cs, cats)
            # rank r held idx[r::world]: interleave back to the order of idx
            feats, cats = torch.stack(fs, 1).flatten(0, 1), torch.stack(cs, 1).flatten(0, 1)
        target = self.gate_targets(cats)
        opt = torch.optim.AdamW(self.mops.gate.parameters(), lr=cfg.gate_pretrain_lr)
        g = torch.Generator().manual_seed(cfg.seed + 17)
        bs = min(64, feats.shape[0])
        for _ in range(cfg.gate_pretrain_steps):
            sel = torch.randint(feats.shape[0], (bs,), generator=g).to(self.device)
            logits = self.mops.gate(feats[sel].to(self.mops.gate.fc1.weight.dtype)).float()
            loss = torch.nn.functional.cross_entropy(logits, target[sel], label_smoothing=cfg.gate_pretrain_smoothing)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"gate pretraining: the loss is {loss.item()}; lower gate_pretrain_lr "
                                         f"(now {cfg.gate_pretrain_lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (self.mops.gate(feats.to(self.mops.gate.fc1.weight.dtype)).argmax(-1) == target).float().mean().item()
        self.gate_pretrained = True
        info = {"stage": "A", "loss": loss.item(), "routing_acc": acc}
        self.history.append(info)
        return info

    # ---------------------------------------------------------------- stage B
    def _micro_batches(self, step: int) -> list[dict]:
        cfg = self.cfg
        idx = step_indices(len(self.records), cfg.seed, step, cfg.batch_size)
        mine = idx[self.rank::self.world]
        if not mine:
            raise ValueError(f"batch_size={cfg.batch_size} is smaller than the world size {self.world}")
        per = math.ceil(len(mine) / cfg.grad_accum)
        return [collate([self.fmt(self.records[i]) for i in mine[j: j + per]], self.tok.pad_token_id,
                        self.categories) for j in range(0, len(mine), per)]

    def _allreduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def train_step(self) -> dict:
        cfg = self.cfg
        micro = self._micro_batches(self.step)
        n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total_tok = int(self._allreduce(torch.tensor(float(n_tok), device=self.device)).item())
        if total_tok == 0:
            raise ValueError(f"step {self.step}: the batch holds no response tokens (all truncated away?)")
        self.opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        lb_sum = 0.0
        for b in micro:
            nll, _, _ = response_nll(self.model, b)
            loss = nll / total_tok
            if cfg.load_balance > 0 and self.gate is not None:
                w = self.mops.state.logw.exp()
                lb = self.mops.config.num_experts * (w.mean(0) ** 2).sum()
                loss = loss + cfg.load_balance * lb * b["input_ids"].shape[0] / cfg.batch_size
                lb_sum += float(lb)
            loss.backward()
            loss_sum += nll.item()
        if self.world > 1:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params])
            dist.all_reduce(flat)
            off = 0
            for p in self.params:
                p.grad = flat[off: off + p.numel()].view_as(p).clone()
                off += p.numel()
        grads_finite = self._grads_finite(cfg.grad_clip)
        loss_total = float(self._allreduce(torch.tensor(loss_sum, device=self.device)).item())
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        self.step += 1
        if not (grads_finite and math.isfinite(loss_total)):
            # every rank sees the same all-reduced loss and gradients, so all skip together
            self.opt.zero_grad(set_to_none=True)
            self.nonfinite_run += 1
            self.history.append({"stage": "B", "step": self.step, "skipped": "non-finite loss or gradients"})
            if self.nonfinite_run > cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"step {self.step}: the loss or the gradients were NaN/inf in {self.nonfinite_run} step(s) in a "
                    f"row (more than max_nonfinite_steps={cfg.max_nonfinite_steps}); those steps did not change the "
                    f"adapter, and checkpoints hold only finite steps. Lower lr (now {cfg.lr}), use "
                    f"fp32 or bf16 instead of fp16 (the backbone is {self.model.dtype}), or check that the backbone's "
                    "own outputs are finite")
            return {"step": self.step, "loss": float("nan"), "tokens": tokens, "skipped": True}
        self.nonfinite_run = 0
        f = lr_factor(self.step - 1, cfg)
        for gr in self.opt.param_groups:
            gr["lr"] = gr["base_lr"] * f
        self.opt.step()
        return {"step": self.step, "loss": loss_total / total_tok, "tokens": tokens}

    def _grads_finite(self, clip: float) -> bool:
        """Clip the gradients to norm `clip` (if > 0); whether they are all finite."""
        # max_norm inf: the total norm without scaling (0 when no parameter has a gradient)
        return bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else math.inf)))

    def train(self, eval_fn=None, eval_every: int = 0) -> list[dict]:
        """Run stage A (if due) and stage B to cfg.steps, resuming from the checkpoint if present.

        `eval_fn()` (a dict) is recorded in the history every `eval_every` steps before the last one: the
        finished model's evaluation is the caller's, which evaluates it anyway.
        """
        cfg = self.cfg
        self.model.train()
        self.maybe_resume()
        self.pretrain_gate()
        bar = None
        if cfg.progress and self.rank == 0 and self.step < cfg.steps:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", leave=False)
        t0, tok0 = time.perf_counter(), 0
        running = None
        while self.step < cfg.steps:
            info = self.train_step()
            tok0 += info["tokens"]
            if not info.get("skipped"):
                running = info["loss"] if running is None else 0.9 * running + 0.1 * info["loss"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}")
            if cfg.log_every and self.step % cfg.log_every == 0:
                self.history.append({"stage": "B", "step": self.step, "loss": running})
            if eval_fn is not None and eval_every and self.step % eval_every == 0 and self.step < cfg.steps:
                self.history.append({"stage": "eval", "step": self.step, **eval_fn()})
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        dt = time.perf_counter() - t0
        if tok0:
            self.tokens_per_s = tok0 * self.world / dt
        self.save_checkpoint()
        self.model.eval()
        return self.history
