"""One training step on the CPU: MoPs against PEFT prefix tuning and our `prompt` baseline (DESIGN §7).

SmolLM2-135M fp32, B=4, S=256 fixed-length windows of real dolly15k text, the first half of each window
labelled prompt and the second half response. One step = forward + backward + optimizer step.

  mops    J=8 experts x L=8 tokens, gated, layers g..N-1; mops_fast's loss path (`response_nll`, the LM
          head only on response positions), grad clipping and AdamW, exactly as the Trainer runs a step
  prompt  our baseline: one deep prompt of J*L=64 tokens at the same layers, same loss path
  peft    PEFT PrefixTuningConfig(num_virtual_tokens=64) (all layers), standard HF loss (labels=...)
  mops_bf16  mops with the backbone and activations in bf16 (prompts and gate stay fp32): what
          `dtype: bfloat16` trains at on a CPU with bf16 matmul instructions (AVX512-BF16, AMX)

  python benchmarks/bench_train_step_cpu.py [--reps 5] [--out DIR]
      -> DIR/train_step_cpu-<device slug>.json (DESIGN §6); the implementations alternate step by step
  pytest benchmarks/bench_train_step_cpu.py --benchmark-only     pytest-benchmark functions, same steps

Target: mops tokens/s >= 0.9x peft tokens/s.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

B, S, J, L = 4, 256, 8, 8
IMPLS = ("mops", "prompt", "peft", "mops_bf16")
DTYPES = {"mops_bf16": torch.bfloat16}  # the rest in fp32
TARGET = 0.9


def _mops_step(model, batch, params, lr: float = 3e-3, grad_clip: float = 1.0):
    """The Trainer's step (trainer.Trainer.train_step) on a fixed batch."""
    from mops_fast.train.loss import response_nll

    opt = torch.optim.AdamW(params, lr=lr)
    n_tok = int((batch["labels"][:, 1:] != -100).sum())

    def step():
        opt.zero_grad(set_to_none=True)
        nll, _, _ = response_nll(model, batch)
        (nll / n_tok).backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()

    return step


def build(impl: str, batch: dict, model_name: str = "smollm2-135m"):
    """A fresh backbone with `impl` attached; returns (step fn, number of trainable parameters)."""
    from mops_fast import MoPsConfig, attach, load_model

    model, _ = load_model(model_name, dtype=DTYPES.get(impl, torch.float32))
    if impl in ("mops", "prompt", "mops_bf16"):
        cfg = MoPsConfig(num_experts=J, prompt_len=L)
        attach(model, MoPsConfig.prompt_baseline(cfg) if impl == "prompt" else cfg)
        model.train()
        params = [p for p in model.mops.parameters() if p.requires_grad]
        return _mops_step(model, batch, params), sum(p.numel() for p in params)
    if impl == "peft":
        from peft import PrefixTuningConfig, get_peft_model

        pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=J * L))
        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            out = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        return step, sum(p.numel() for p in params)
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def make_batch(model_name: str = "smollm2-135m") -> dict:
    from mops_fast import load_model

    _, tok = load_model(model_name)
    return common.dolly_windows(tok, B, S)


def measure(reps: int = 5, warmup: int = 1, impls=IMPLS) -> dict:
    batch = make_batch()
    steps, nparams = {}, {}
    for impl in impls:
        steps[impl], nparams[impl] = build(impl, batch)
    load_before = common.load_average()
    times = common.time_interleaved(steps, reps=reps, warmup=warmup)
    shape = {"model": "smollm2-135m", "B": B, "S": S, "prompt_tokens": J * L, "J": J, "L": L}
    rows = [common.make_row({**shape, "dtype": str(DTYPES.get(impl, torch.float32)).replace("torch.", "")}, impl,
                            "step", times[impl], tokens=B * S, trainable_params=nparams[impl]) for impl in impls]
    tps = {r["impl"]: r["tokens_per_s"] for r in rows}
    ratio = tps["mops"] / tps["peft"] if "mops" in tps and "peft" in tps else None
    return common.result_doc(
        "train_step_cpu", rows, timing="interleaved, median of %d steps after %d warm-up" % (reps, warmup),
        load_average_before=load_before, mops_vs_peft_tokens_per_s=ratio, target_ratio=TARGET,
        meets_target=None if ratio is None else ratio >= TARGET,
        notes="tokens/s counts all B*S tokens of a step. mops/prompt use response_nll (LM head on the 128 "
              "response positions of each window); peft uses the standard HF loss (LM head on all positions). "
              "mops/prompt inject layers g..N-1 (21 of 30); PEFT prefix tuning injects all 30 layers.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed steps per implementation (default 5)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    doc = measure(a.reps, a.warmup)
    path = common.write_result(doc, a.out)
    for r in doc["rows"]:
        print(f"{r['impl']:>7}: {r['median_ms']:8.0f} ms/step (p20 {r['p20_ms']:.0f}, p80 {r['p80_ms']:.0f})  "
              f"{r['tokens_per_s']:7.1f} tokens/s  {r['trainable_params']} trainable params")
    if doc["mops_vs_peft_tokens_per_s"] is not None:
        print(f"mops / peft tokens/s = {doc['mops_vs_peft_tokens_per_s']:.3f} (target >= {TARGET}); "
              f"load average {doc['load_average_before']} -> {doc['load_average']}")
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------ pytest-benchmark
def _steps():
    batch = make_batch()
    return {impl: build(impl, batch)[0] for impl in IMPLS}


try:
    import pytest

    @pytest.fixture(scope="module")
    def train_steps():
        return _steps()

    @pytest.mark.parametrize("impl", IMPLS)
    def test_train_step_cpu(benchmark, train_steps, impl):
        benchmark.group = f"train_step_cpu B={B} S={S} J*L={J * L}"
        benchmark.extra_info["tokens_per_step"] = B * S
        benchmark.pedantic(train_steps[impl], rounds=3, warmup_rounds=1, iterations=1)
except ImportError:  # running as a script without pytest installed
    pass


if __name__ == "__main__":
    sys.exit(main())
