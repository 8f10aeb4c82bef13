"""Gated-prefix attention on CUDA: the fused Triton kernel against the materialize-prefix reference and
plain SDPA flash attention with no prefix.

Impls (rows of the JSON):
  fused          mops_fast.ops.gated_prefix_attention as it is by default, on the padded batch (one
                 sample right-padded, as tokenizers pad training batches), every expert active (dense gate):
                 right padding under causal attention needs no key mask (the padded queries are zeroed),
                 so the fused forward and, from 2048 keys, the cascade's backward ("auto")
  fused_fusedbwd the same inputs with the cascade off: the fused kernels both ways
  fused_top2     the same with top-2 gating (6 of 8 experts at log weight -inf: their tiles are skipped)
  fused_nopad    the fused kernels with no key padding (sdpa_noprefix's inputs plus the prompts) and the
                 cascade off, at the shapes of CASCADE_AT
  fused_cascade  the same inputs through the shared-prefix cascade both ways (prefix_cascade.py:
                 FlashAttention for the own keys, the Triton kernels for the prompts from its softmax state)
  fused_cascade_bwd  the fused forward and the cascade's backward (what the default, "auto", does from
                 2048 keys on); bwd and fwd+bwd
  fused_cascade_bwd_kdq  the same with cascade_dq="kernel": dQ of the prompts by its own kernel, not added
                 by the prompt pass's dK/dV programs (the default since 2026-11-27); bwd and fwd+bwd
  reference      per-sample prefix materialized by broadcast, concatenated with k/v (expanded to Hq heads),
                 torch SDPA with an explicit float mask holding the log weights, causal and padding masks
                 (the memory-efficient backend; gradients reach the log weights through the mask), and the
                 padded queries' rows zeroed, as the contract says
  sdpa_noprefix  SDPA flash backend, is_causal, the same sequence with no prefix and no padding
Modes: fwd, bwd (backward only, from a retained graph), fwd+bwd. bf16, d = 128, GQA 32/8.
Shapes: B=8 Hq=32 Hkv=8 d=128 S=2048 J=8 L=16 (main), S in {512, 1024, 4096}, J*L in {16, 128, 512}.
tflops counts the useful work: 4*d per visible (query, key) pair forward, 2.5x that backward, the prompt
keys included (so sdpa_noprefix does less work for the same sequence); tokens_per_s = B*S / median.
peak_mem_bytes is what one call allocates beyond its inputs.

  python benchmarks/bench_gated_prefix_attention.py --out DIR  -> DIR/gated_prefix_attention-<gpu slug>.json
  python benchmarks/bench_gated_prefix_attention.py --sweep    time all alternative tile configs (main shape;
                                                             by default only SWEEP_QUICK, if time remains)
  python benchmarks/bench_gated_prefix_attention.py --smoke-cpu  tiny shapes under the Triton interpreter:
                                                                checks this script, times nothing real
Registers, shared memory and spills of every kernel variant, no GPU needed:
  python benchmarks/offline_compile.py attention --cap 90

Targets (DESIGN §7), main shape, fwd+bwd: >= 2x faster than reference, <= 1.2x sdpa_noprefix, and lower
peak memory than reference. Budget: about 110 s on one H100 (it stops adding rows 90 s after start and
rewrites its JSON after every row).
"""
from __future__ import annotations

import time

T_IMPORT = time.time()

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

if "--smoke-cpu" in sys.argv:  # before triton is imported: the kernels must be decorated as interpreted
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["MOPS_FAST_FORCE_TRITON"] = "1"  # CPU tensors through the kernels, not the reference

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import result_doc, write_result  # noqa: E402

MAIN = dict(B=8, Hq=32, Hkv=8, d=128, S=2048, J=8, L=16)
SHAPES = [MAIN] + [dict(MAIN, S=s) for s in (512, 1024, 4096)] + [dict(MAIN, J=1), dict(MAIN, J=32)]
SMOKE = [dict(B=2, Hq=4, Hkv=2, d=32, S=48, J=3, L=4), dict(B=2, Hq=4, Hkv=2, d=32, S=40, J=1, L=5)]
BUDGET_S = 90.0  # seconds since the process started; run_gpu.sh kills the script at 110
T_START = T_IMPORT
# --sweep: alternative (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, main shape only; "dkdv_atomic"
# are dK/dV tiles with dq_mode="atomic" (dQ added by the dK/dV programs), "dkdv_cascade" the tiles of the
# cascade's prompt-only backward (no key padding).
SWEEP = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (64, 64, 4, 3)],
    "dkdv": [(16, 128, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2), (32, 64, 4, 2)],
    "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 128, 8, 2)],
    "dkdv_atomic": [(16, 64, 8, 2), (16, 128, 8, 2), (16, 128, 8, 1), (32, 64, 8, 2)],
    "dkdv_cascade": [(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 2), (16, 128, 8, 2), (32, 64, 8, 2)],
    "fwd_init": [(64, 64, 4, 2), (64, 64, 4, 1), (128, 128, 8, 1)],
}

# "dkdv_cascade": tiles of the cascade's prompt-only dK/dV pass ("dkdv_prompt"), which with cascade_dq
# "fused" also adds dQ (a 128-key block holds all J*L = 128 prompts). On 2026-11-27 (32, 128, 8, 2) became
# its tile (3.83 ms the cascade's backward, against 4.03 with the dkdv tile (16, 128, 8, 2)); (16, 128, 8,
# 3) 3.86, (16, 128, 4, 2) 4.91. Still to try: 64 queries, or (32, 128, 8, 3).
SWEEP_QUICK = {"dkdv_cascade": [(64, 128, 8, 2), (32, 128, 8, 3), (32, 128, 8, 1)]}
# Shapes (by S, J) at which the cascade is timed beside the fused kernel on the same unpadded inputs.
CASCADE_AT = {(2048, 8), (512, 8), (4096, 8), (2048, 32)}


def make_inputs(shape, dev, dtype, topk=None, seed=0):
    B, Hq, Hkv, d, S, J, L = (shape[k] for k in ("B", "Hq", "Hkv", "d", "S", "J", "L"))
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(B, Hq, S, d, device=dev, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, d, device=dev, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, d, device=dev, generator=g).to(dtype)
    pk = torch.randn(J, L, Hkv, d, device=dev, generator=g).to(dtype)
    pv = torch.randn(J, L, Hkv, d, device=dev, generator=g).to(dtype)
    logits = torch.randn(B, J, device=dev, generator=g)
    if topk is not None and topk < J:
        drop = logits.argsort(-1, descending=True)[:, topk:]
        logits = logits.scatter(-1, drop, float("-inf"))
    logw = torch.log_softmax(logits, -1)
    kv = torch.ones(B, S, dtype=torch.bool, device=dev)
    kv[B - 1, S - S // 16:] = False  # one sample right-padded, as a training batch would be
    return [q, k, v, pk, pv, logw], kv


def reference_attention(q, k, v, pk, pv, logw, kv):
    """Materialize the per-sample prefix and one float mask, then one SDPA call."""
    B, Hq, S, d = q.shape
    J, L, Hkv, _ = pk.shape
    P, G = J * L, Hq // Hkv
    pk_b = pk.reshape(P, Hkv, d).permute(1, 0, 2).unsqueeze(0).expand(B, Hkv, P, d)
    pv_b = pv.reshape(P, Hkv, d).permute(1, 0, 2).unsqueeze(0).expand(B, Hkv, P, d)
    kk = torch.cat([pk_b, k], 2).repeat_interleave(G, 1)
    vv = torch.cat([pv_b, v], 2).repeat_interleave(G, 1)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    own = torch.zeros(B, 1, S, S, dtype=q.dtype, device=q.device).masked_fill(
        ~(causal[None, None] & kv[:, None, None, :]), float("-inf"))
    pre = logw.to(q.dtype)[:, None, None, :, None].expand(B, 1, S, J, L).reshape(B, 1, S, P)
    mask = torch.cat([pre, own], -1)
    o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
    return o.masked_fill(~kv[:, None, :, None], 0.0)  # queries at padded positions: 0 (the contract)


def useful_flops(shape, mode, prefix=True):
    B, Hq, d, S, P = shape["B"], shape["Hq"], shape["d"], shape["S"], shape["J"] * shape["L"]
    pairs = S * (S + 1) / 2 + (S * P if prefix else 0)
    fwd = 4.0 * d * B * Hq * pairs
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--sweep", action="store_true", help="also time alternative tile configs")
    ap.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from mops_fast.ops import triton_gated_prefix_attention as tk
    from mops_fast.ops.gated_prefix_attention import gated_prefix_attention

    smoke = args.smoke_cpu
    if smoke:
        dev, dtype, shapes = "cpu", torch.float32, SMOKE

        def do_bench(fn, warmup=0, rep=0, quantiles=None, grad_to_none=None):
            ts = []
            for _ in range(2):
                for x in grad_to_none or ():
                    x.grad = None
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e3)
            ts.sort()
            return ts[len(ts) // 2], ts[0], ts[-1]

        def peak_of(fn):
            fn()
            return None

        sync = lambda: None  # noqa: E731
    else:
        if not torch.cuda.is_available():
            print("bench_gated_prefix_attention: needs a CUDA device (or --smoke-cpu)", file=sys.stderr)
            return 2
        if tk.INTERPRETED:
            print("bench_gated_prefix_attention: TRITON_INTERPRET=1 is set; unset it", file=sys.stderr)
            return 2
        from triton.testing import do_bench

        dev, dtype, shapes = "cuda", torch.bfloat16, SHAPES
        sync = torch.cuda.synchronize

        def peak_of(fn):
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            sync()
            return torch.cuda.max_memory_allocated() - base

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_ctx(backends):
        return sdpa_kernel(backends) if not smoke else sdpa_kernel([SDPBackend.MATH])

    impls = {
        "fused": lambda ins, kv: gated_prefix_attention(*ins, kv),
        "reference": lambda ins, kv: reference_attention(*ins, kv),
    }

    gqa = {"mode": "enable_gqa"}

    def sdpa_noprefix(ins, kv):
        q, k, v = ins[:3]
        if gqa["mode"] == "enable_gqa":
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            except RuntimeError:  # a flash backend without native GQA: expand K/V (counted in the time)
                gqa["mode"] = "repeat_interleave"
        G = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                              is_causal=True)

    flash = [SDPBackend.FLASH_ATTENTION]
    backends = {
        "reference": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "sdpa_noprefix": flash,
        # the fused rows may take the cascade, which calls the flash op directly: keep it allowed
        **{impl: flash for impl in ("fused", "fused_top2", "fused_fusedbwd", "fused_nopad", "fused_cascade",
                                    "fused_cascade_bwd", "fused_cascade_bwd_kdq")},
    }

    rows, t0 = [], T_START
    budget = None if (smoke or args.sweep) else BUDGET_S  # the budget is for run_gpu.sh's default run
    device = "cpu" if smoke else "cuda"

    def save():
        # Rewritten after every row: if the run is cut short, what was measured is still on disk.
        doc = result_doc("gated_prefix_attention", rows, device=device, dtype=str(dtype).replace("torch.", ""),
                         smoke=smoke or None)
        if smoke:
            doc["device"] = "cpu-smoke"
        return write_result(doc, args.out, device=device)

    def measure(shape, impl, fn_fwd, ins, kv, modes=("fwd", "bwd", "fwd+bwd"), extra=None):
        for mode in modes:
            if budget is not None and time.time() - t0 > budget:
                print(f"budget reached: skipping {impl} {mode} {shape}", flush=True)
                return
            row = {"shape": dict(shape), "impl": impl, "mode": mode, **(extra or {})}
            leaves = [t for t in ins if t.requires_grad]
            try:
                with sdpa_ctx(backends.get(impl) or [SDPBackend.MATH]):
                    if mode == "fwd":
                        def fn():
                            with torch.no_grad():
                                fn_fwd(ins, kv)
                    else:
                        out = fn_fwd(ins, kv)
                        do = torch.randn_like(out)
                        if mode == "bwd":
                            def fn():
                                out.backward(do, retain_graph=True)
                        else:
                            def fn():
                                fn_fwd(ins, kv).backward(do)
                    fn()  # compile / warm up
                    for x in leaves:
                        x.grad = None
                    row["peak_mem_bytes"] = peak_of(fn)
                    for x in leaves:
                        x.grad = None
                    med, p20, p80 = do_bench(fn, warmup=10, rep=40, quantiles=[0.5, 0.2, 0.8],
                                             grad_to_none=leaves)
                row.update(median_ms=med, p20_ms=p20, p80_ms=p80)
                row["tflops"] = useful_flops(shape, mode, prefix=impl != "sdpa_noprefix") / (med * 1e-3) / 1e12
                row["tokens_per_s"] = shape["B"] * shape["S"] / (med * 1e-3)
            except Exception as e:  # keep going: one failing impl must not lose the other rows
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                print(f"ERROR {impl} {mode} {shape}: {row['error']}", flush=True)
            finally:
                out = do = None
                for x in leaves:
                    x.grad = None
                if not smoke:
                    torch.cuda.empty_cache()
            if impl == "sdpa_noprefix":
                row["gqa"] = gqa["mode"]
            rows.append(row)
            save()
            print(f"{impl:14s} {mode:8s} S={shape['S']:5d} JL={shape['J'] * shape['L']:4d} "
                  f"{row.get('median_ms', float('nan')):9.3f} ms  {row.get('tflops', float('nan')):7.1f} TFLOP/s  "
                  f"peak {((row.get('peak_mem_bytes') or 0) / 2**20):8.1f} MiB", flush=True)

    for si, shape in enumerate(shapes):
        ins, kv = make_inputs(shape, dev, dtype, seed=si)
        for t in ins:
            t.requires_grad_()
        # The comparison only means something if both compute the same function: check once per shape.
        try:
            with torch.no_grad(), sdpa_ctx(backends["reference"]):
                of, orf = impls["fused"](ins, kv).float(), impls["reference"](ins, kv).float()
            check = ((of - orf).norm() / orf.norm()).item()
            del of, orf
        except Exception as e:
            check = f"{type(e).__name__}: {e}"[:300]
        print(f"S={shape['S']} JL={shape['J'] * shape['L']}: fused vs reference output, relative error {check}",
              flush=True)
        measure(shape, "fused", impls["fused"], ins, kv, extra={"rel_err_vs_reference": check})
        if si == 0 or smoke:
            with tk.override_configs(cascade=False):
                measure(shape, "fused_fusedbwd", impls["fused"], ins, kv)
        if (shape["S"], shape["J"]) in CASCADE_AT or smoke:
            with tk.override_configs(cascade=False):
                measure(shape, "fused_nopad", impls["fused"], ins, None)
            with tk.override_configs(cascade=True):
                measure(shape, "fused_cascade", impls["fused"], ins, None)
            with tk.override_configs(cascade="bwd"):
                measure(shape, "fused_cascade_bwd", impls["fused"], ins, None, modes=("bwd", "fwd+bwd"))
            with tk.override_configs(cascade="bwd", cascade_dq="kernel"):
                measure(shape, "fused_cascade_bwd_kdq", impls["fused"], ins, None, modes=("bwd", "fwd+bwd"))
        if si == 0:
            ins2, kv2 = make_inputs(shape, dev, dtype, topk=2, seed=si)
            for t in ins2:
                t.requires_grad_()
            measure(shape, "fused_top2", impls["fused"], ins2, kv2, modes=("fwd+bwd",))
            del ins2, kv2
        measure(shape, "reference", impls["reference"], ins, kv)
        if si == 0 or shape["J"] == MAIN["J"]:  # sdpa_noprefix does not depend on J*L
            measure(shape, "sdpa_noprefix", sdpa_noprefix, ins, kv)
        del ins, kv

    # Tile configs other than the defaults, main shape: all with --sweep, else a few while time remains
    # (each costs a compile), so that one GPU run also says whether the defaults are the right ones.
    sweep = SWEEP if args.sweep else (SWEEP_QUICK if not smoke and time.time() - t0 < BUDGET_S - 20 else {})
    if sweep:
        shape = shapes[0]
        ins, kv = make_inputs(shape, dev, dtype, seed=0)
        for t in ins:
            t.requires_grad_()
        for kind, cfgs in sweep.items():
            for cfg in cfgs:
                over = {"dkdv_atomic": {"dq_mode": "atomic", "dkdv": cfg},
                        "dkdv_cascade": {"cascade": True, "dkdv_prompt": cfg},
                        "fwd_init": {"cascade": True, "fwd_init": cfg}}.get(kind, {kind: cfg})
                with tk.override_configs(**over):
                    measure(shape, f"fused[{kind}={','.join(map(str, cfg))}]", impls["fused"], ins,
                            None if kind in ("dkdv_cascade", "fwd_init") else kv,
                            modes=("fwd",) if kind in ("fwd", "fwd_init") else ("bwd",))

    path = save()

    # Summary: the targets at the main shape.
    def med(impl, mode, shape=shapes[0]):
        for r in rows:
            if r["impl"] == impl and r["mode"] == mode and r["shape"] == shape and "median_ms" in r:
                return r
        return None

    print(f"\nwrote {path}")
    print(f"{'mode':8s} {'fused ms':>10s} {'reference':>10s} {'sdpa_nopf':>10s} {'ref/fused':>9s} "
          f"{'fused/sdpa':>10s} {'mem f/ref':>9s}")
    for mode in ("fwd", "bwd", "fwd+bwd"):
        f, r, s = med("fused", mode), med("reference", mode), med("sdpa_noprefix", mode)
        fm = f["median_ms"] if f else math.nan
        rm = r["median_ms"] if r else math.nan
        sm = s["median_ms"] if s else math.nan
        mem = (f["peak_mem_bytes"] / r["peak_mem_bytes"]) if f and r and r.get("peak_mem_bytes") else math.nan
        print(f"{mode:8s} {fm:10.3f} {rm:10.3f} {sm:10.3f} {rm / fm:9.2f} {fm / sm:10.2f} {mem:9.2f}")
    s_all = {mode: med("sdpa_noprefix", mode) for mode in ("fwd", "bwd", "fwd+bwd")}
    for impl in ("fused_nopad", "fused_cascade", "fused_cascade_bwd", "fused_cascade_bwd_kdq"):
        parts = [f"{mode} {r['median_ms']:.3f} ms = {r['median_ms'] / s_all[mode]['median_ms']:.2f}x"
                 for mode in ("fwd", "bwd", "fwd+bwd") if (r := med(impl, mode)) and s_all[mode]]
        if parts:
            print(f"no padding, {impl:21s} " + ", ".join(parts) + " sdpa_noprefix")
    print("targets (fwd+bwd, main shape): ref/fused >= 2, fused/sdpa <= 1.2, mem f/ref < 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
