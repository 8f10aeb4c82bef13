"""Gated-prefix attention for CPU training, forward + backward: the cascade (mops_fast/ops/cpu_cascade.py,
torch's CPU flash op for the own keys) against the PyTorch reference it replaced (materialized scores,
plain autograd).

SmolLM2-135M's attention (Hq=9, Hkv=3, d=64), B=4, J*L=64 prompt tokens, fp32, causal, S in {256, 1024,
2048}; one call = forward, then backward of o.sum()-like random gradients. Each row also records the
bytes autograd saves for the backward (`saved_bytes`: the activation memory a layer holds during
training, counted once per storage by saved_tensors_hooks; inputs included).

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
IMPLS = {"cascade": "1", "reference": "0"}  # MOPS_FAST_CPU_CASCADE


def inputs(S: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = [r(B, HQ, S, D), r(B, HKV, S, D), r(B, HKV, S, D), r(J, L, HKV, D) * 0.5, r(J, L, HKV, D) * 0.5,
         torch.log_softmax(r(B, J), -1)]
    return [x.requires_grad_(True) for x in t], r(B, HQ, S, D)


def call(impl: str, leaves, go):
    """One forward and backward with `impl`; returns the bytes autograd saved for the backward."""
    os.environ["MOPS_FAST_CPU_CASCADE"] = IMPLS[impl]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    a = ap.parse_args(argv)
    rows = []
    try:
        for S in SEQS:
            leaves, go = inputs(S)
            saved = {impl: call(impl, leaves, go) for impl in IMPLS}  # also the warm-up
            times = time_interleaved({impl: (lambda i=impl: call(i, leaves, go)) for impl in IMPLS},
                                     reps=max(2, a.reps if S <= 1024 else a.reps // 2), warmup=0)
            shape = {"B": B, "Hq": HQ, "Hkv": HKV, "d": D, "S": S, "prompt_tokens": J * L, "dtype": "float32"}
            for impl in IMPLS:
                rows.append(make_row(shape, impl, "fwd+bwd", times[impl], tokens=B * S, saved_bytes=saved[impl]))
            c, r = (next(x for x in rows[-2:] if x["impl"] == i) for i in ("cascade", "reference"))
            print(f"S={S:5d}: cascade {c['median_ms']:8.1f} ms, {c['saved_bytes'] / 2**20:6.0f} MiB saved | "
                  f"reference {r['median_ms']:8.1f} ms, {r['saved_bytes'] / 2**20:6.0f} MiB saved | "
                  f"{r['median_ms'] / c['median_ms']:.2f}x faster", flush=True)
    finally:
        os.environ.pop("MOPS_FAST_CPU_CASCADE", None)
    doc = result_doc("cpu_attention", rows, baseline_impl="reference",
                     timing=f"interleaved medians, {a.reps} reps (half from S = 2048), after one warm-up call")
    print("wrote", write_result(doc, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
