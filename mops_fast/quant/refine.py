"""Scale refinement by distillation: after GPTQ (or RTN), tune each group's scale so that the quantized model's
next-token distribution matches the dense model's on calibration text.

GPTQ fits each layer to its own inputs (a layer-wise proxy) and cannot see how the errors of 210 layers
compound through the network. Here the codes, the integer zero points and g_idx stay exactly as quantized;
only the per-group scales (fp16 in the checkpoint, one per group and output row) move, by Adam on

    KL(p_dense || p_quant)   averaged over every token of the calibration windows,

so the target is the dense model itself, never the text's labels: the refined model is still a compression
of the dense one, not a fine-tuned model. Each scale is parametrized as s0 * (1 + delta), delta starting at 0,
so one learning rate suits layers of any magnitude, and is rounded to fp16 at the end as the checkpoint stores
it. Pruned weights keep the zero-point code, so sparsity survives exactly. The result is an ordinary GPTQ
checkpoint: any GPTQ reader loads it, no kernel changes.

Cost: a forward of the dense model and a forward and backward of the quantized one per step. The dense model
is held as loaded (float32 by the CLI) beside the quantized one, whose layers keep their (code - zero) matrices
as int8 during the run and rebuild each float weight per forward (one weight-sized float temporary per layer).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mops_fast.nn.quant_linear import QuantLinear
from mops_fast.quant.pack import dequantize


@dataclass
class RefineSettings:
    steps: int = 0  # 0 = no refinement
    lr: float = 1e-3  # Adam learning rate of the relative scale change delta
    batch_size: int = 4  # windows per step
    samples: int = 512  # calibration windows drawn for refinement (a tenth of them, at least one, held out)
    seed: int = 0

    def validate(self) -> "RefineSettings":
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"refine steps must be a non-negative integer, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and 0 < self.lr < 1):
            raise ValueError(f"refine lr must be in (0, 1), got {self.lr!r} (1e-3 is the tested value)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"refine batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.samples, int) or self.samples < 2:
            raise ValueError(f"refine samples must be an integer >= 2 (one is held out), got {self.samples!r}")
        return self


class _ScaleTuned(nn.Module):
    """Stands in for a QuantLinear during refinement: W = (code - zero) * s0 * (1 + delta), delta trainable."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        ones = torch.ones(q.scales.shape, dtype=torch.float32, device=q.scales.device)
        cmz = dequantize(q.qweight, q.qzeros, ones, q.g_idx, q.bits, torch.float32)
        # code - zero is an integer in (-2^bits, 2^bits): int8 up to 7 bits keeps it at a quarter of fp32
        self.register_buffer("cmz", cmz.to(torch.int8 if q.bits <= 7 else torch.int16))
        self.register_buffer("g_idx", q.g_idx.long())
        self.register_buffer("s0", q.scales.float())
        self.delta = nn.Parameter(torch.zeros_like(self.s0))
        self.bias = None if q.bias is None else q.bias.detach().float()

    def scales(self) -> torch.Tensor:
        return self.s0 * (1 + self.delta)

    def forward(self, x):
        w = self.cmz.float() * self.scales().index_select(0, self.g_idx).t()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _swap(model, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _check_pair(student, teacher) -> None:
    sc, tc = student.config, teacher.config
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(sc, key, None) != getattr(tc, key, None):
            raise ValueError(f"refine: the dense model's {key}={getattr(tc, key, None)} differs from the quantized "
                             f"model's {getattr(sc, key, None)}; pass the dense model this checkpoint was made from")
    if next(student.parameters()).device != next(teacher.parameters()).device:
        raise ValueError("refine: the dense and the quantized model are on different devices; move both to one")


def _kl(student, teacher, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        t = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1).flatten(0, 1)
    s = F.log_softmax(student(input_ids=ids, use_cache=False).logits.float(), -1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def refine_scales(student, teacher, windows: torch.Tensor, settings: RefineSettings, log=print) -> dict:
    """Tune the scales of every QuantLinear of `student` (in place) to match `teacher` on `windows`.

    windows: LongTensor (n, seq_len) of token ids; 10% of them (at least one) are held out to measure the KL
    before and after. Returns {"steps", "kl_heldout_before", "kl_heldout_after", "seconds"}. The model is
    left unchanged when refinement fails (non-finite loss)."""
    s = settings.validate()
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError("refine: windows must be a LongTensor (n_windows, seq_len) of token ids")
    if windows.shape[0] < 2:
        raise ValueError(f"refine: need at least 2 windows (one is held out), got {windows.shape[0]}")
    _check_pair(student, teacher)
    qlayers = {n: m for n, m in student.named_modules() if isinstance(m, QuantLinear)}
    if not qlayers:
        raise ValueError("refine: the model has no QuantLinear layer; quantize it first (refinement tunes the "
                         "scales of a GPTQ/RTN checkpoint)")
    dev = next(student.parameters()).device
    n_held = max(1, windows.shape[0] // 10)
    held, train = windows[:n_held].to(dev), windows[n_held:].to(dev)
    tuned = {n: _ScaleTuned(m) for n, m in qlayers.items()}
    frozen = [p for p in student.parameters() if p.requires_grad]
    was_training = student.training
    teacher_training = teacher.training
    teacher.eval()
    for p in frozen:
        p.requires_grad_(False)
    for n, t in tuned.items():
        _swap(student, n, t)

    student.eval()

    def heldout_kl() -> float:
        with torch.no_grad():
            vals = [float(_kl(student, teacher, held[i:i + s.batch_size]))
                    for i in range(0, held.shape[0], s.batch_size)]
        return sum(vals) / len(vals)

    t0 = time.time()
    ok = False
    try:
        before = heldout_kl()
        params = [t.delta for t in tuned.values()]
        opt = torch.optim.Adam(params, lr=s.lr)
        # cosine decay to zero: the last steps settle the scales instead of jittering them
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / s.steps)))
        gen = torch.Generator().manual_seed(s.seed)
        # eval mode throughout: the target is the dense model's deterministic output, so no dropout
        for step in range(s.steps):
            idx = torch.randint(0, train.shape[0], (min(s.batch_size, train.shape[0]),), generator=gen)
            loss = _kl(student, teacher, train[idx.to(dev)])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"refine: the distillation loss became {loss.item()} at step {step}; "
                                         f"lower the learning rate (now {s.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log is not None and (step % 25 == 0 or step == s.steps - 1):
                log(f"[refine] step {step + 1}/{s.steps} kl {loss.item():.4f} ({time.time() - t0:.0f}s)")
        with torch.no_grad():
            for t in tuned.values():  # the checkpoint stores fp16 scales: measure what it will hold
                stored = t.scales().half().float()
                t.delta.copy_(torch.where(t.s0 != 0, stored / t.s0.masked_fill(t.s0 == 0, 1) - 1, 0.0))
                if not torch.isfinite(t.delta).all():
                    raise FloatingPointError("refine: a tuned scale left the fp16 range; lower the learning rate")
        after = heldout_kl()
        ok = True
    finally:
        for n, m in qlayers.items():
            if ok:
                with torch.no_grad():
                    m.set_quantized(m.qweight, m.qzeros, tuned[n].scales().to(m.scales.dtype), m.g_idx)
            _swap(student, n, m)
        for p in frozen:
            p.requires_grad_(True)
        student.train(was_training)
        teacher.train(teacher_training)
    result = {"steps": s.steps, "lr": s.lr, "batch_size": s.batch_size, "windows": int(train.shape[0]),
              "heldout_windows": n_held, "kl_heldout_before": before, "kl_heldout_after": after,
              "seconds": round(time.time() - t0, 1)}
    if log is not None:
        log(f"[refine] held-out KL {before:.4f} -> {after:.4f} in {result['seconds']:.0f}s")
    return result
