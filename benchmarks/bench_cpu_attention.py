"""Gated-prefix attention on the CPU: in training (forward + backward) the cascade (mops_fast/ops/cpu_cascade.py,
torch's CPU flash op for the own keys) against the PyTorch reference it replaced (materialized scores, plain
autograd); in inference (no gradient) the one-SDPA path against the reference.

SmolLM2-135M's attention (Hq=9, Hkv=3, d=64), B=4, J*L=64 prompt tokens, causal; q, k, v in fp32 and bf16
(prompts and gate fp32); training at S in {256, 1024, 2048} (forward, then backward of random gradients),
inference at S in {256, 1024}. Training rows also record the bytes autograd saves for the backward
(`saved_bytes`: the activation memory a layer holds during training, counted once per storage by
saved_tensors_hooks; inputs included).

  python benchmarks/bench_cpu_attention.py [--reps 5] [--out DIR]
      -> DIR/cpu_attention-<device slug>.json (DESIGN §6); the implementations alternate rep by rep
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from common import make_row, result_doc, time_interleaved, write_result  # noqa: E402
from mops_fast.ops import gated_prefix_attention as gpa  # noqa: E402

B, HQ, HKV, D, J, L = 4, 9, 3, 64, 8, 8
SEQS = (256, 1024, 2048)
INFER_SEQS = (256, 1024)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inputs(S: int, dtype, seed: int = 0):
    """q, k, v in `dtype`; prompts and gate fp32 (the model's training dtypes); and a gradient for o."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = [r(B, HQ, S, D).to(dtype), r(B, HKV, S, D).to(dtype), r(B, HKV, S, D).to(dtype), r(J, L, HKV, D) * 0.5,
         r(J, L, HKV, D) * 0.5, torch.log_softmax(r(B, J), -1)]
    return t, r(B, HQ, S, D).to(dtype)


def train_call(impl: str, leaves, go):
    """One forward and backward (`cascade` or `reference`); returns the bytes autograd saved for the backward."""
    os.environ["MOPS_FAST_CPU_CASCADE"] = "1" if impl == "cascade" else "0"
    saved = {}  # storage address -> bytes: a tensor saved twice (or views of one) counts once

    def pack(t):
        st = t.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o = gpa.gated_prefix_attention(*leaves, None, causal=True)
    torch.autograd.backward(o, go)
    for x in leaves:
        x.grad = None
    return sum(saved.values())


def infer_call(impl: str, t):
    with torch.no_grad():
        gpa.gated_prefix_attention(*t, None, causal=True, backend="reference" if impl == "reference" else None)


def _report(rows, S, dtype, mode, extra=""):
    new, ref = rows[-2], rows[-1]
    print(f"{mode:8s} {dtype:8s} S={S:5d}: {new['impl']} {new['median_ms']:8.1f} ms | reference "
          f"{ref['median_ms']:8.1f} ms | {ref['median_ms'] / new['median_ms']:.2f}x{extra}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    a = ap.parse_args(argv)
    rows = []
    try:
        for dname, dtype in DTYPES.items():
            for S in SEQS:  # training: the CPU cascade against the reference
                t, go = inputs(S, dtype)
                leaves = [x.requires_grad_(True) for x in t]
                saved = {impl: train_call(impl, leaves, go) for impl in ("cascade", "reference")}  # + warm-up
                times = time_interleaved({impl: (lambda i=impl: train_call(i, leaves, go)) for impl in saved},
                                         reps=max(2, a.reps if S <= 1024 else a.reps // 2), warmup=0)
                shape = {"B": B, "Hq": HQ, "Hkv": HKV, "d": D, "S": S, "prompt_tokens": J * L, "dtype": dname}
                rows += [make_row(shape, impl, "fwd+bwd", times[impl], tokens=B * S, saved_bytes=saved[impl])
                         for impl in saved]
                _report(rows, S, dname, "fwd+bwd", f"; saved {saved['cascade'] / 2**20:.0f} vs "
                        f"{saved['reference'] / 2**20:.0f} MiB")
            for S in INFER_SEQS:  # inference (no gradient): one SDPA call against the reference
                t, _ = inputs(S, dtype)
                times = time_interleaved({impl: (lambda i=impl: infer_call(i, t)) for impl in ("sdpa", "reference")},
                                         reps=a.reps, warmup=1)
                shape = {"B": B, "Hq": HQ, "Hkv": HKV, "d": D, "S": S, "prompt_tokens": J * L, "dtype": dname}
                rows += [make_row(shape, impl, "fwd", times[impl], tokens=B * S) for impl in ("sdpa", "reference")]
                _report(rows, S, dname, "fwd")
    finally:
        os.environ.pop("MOPS_FAST_CPU_CASCADE", None)
    doc = result_doc("cpu_attention", rows, baseline_impl="reference",
                     timing=f"interleaved medians, {a.reps} reps (training: half from S = 2048), after a warm-up call")
    print("wrote", write_result(doc, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
