"""Launch variants of the int4 kernels on CUDA, timed side by side: the data behind the defaults in
mops_fast/ops/int4_matmul.py (UNPACK, CHUNKED_MIN_M, tile configs) and csrc/cuda/int4_small_m.cu (steps
in flight, warps a CTA). Every variant is checked against the fp32 product before it is timed.

  python benchmarks/tune_int4_gpu.py --out DIR     -> DIR/tune_int4-<gpu slug>.json, and a table

Small M (<= 64): CUDA-graph replays over weight copies beyond the L2 cache (common.bench_cuda_graph);
larger M: triton.testing.do_bench. fp16 activations, group 128, asym zeros. About 60-90 s on an H100;
--small-native: only the small-M CUDA variants (forward and backward) beside fp16 matmul, a read-only
kernel's speed on the same weights (benchmarks/bandwidth_probe.py: the floor), and the fixed cost of a
graph node (mode "floor": each kernel on a 34 KB weight). What each forward variant launched (kernel, K
slices, warps: native.int4_small_m_plan) goes into the JSON's "plans".
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
from common import bench_cuda_graph, weight_copies  # noqa: E402
from mops_fast.machine import slug  # noqa: E402

GROUP = 128
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
SMALL_MS = [1, 4, 16]
LARGE_MS = [64, 512, 4096]
# (steps, warps, ksplit, prefetch, pdl) of the small-M CUDA forward, 0 = the kernel's own choice (launch() and
# plan() in csrc/cuda/int4_small_m.cu): steps 4 (batches of 4 steps; the M > 8 default) and 22 (software-
# pipelined; the M <= 8 default); ksplit: K in that many slices, each a CTA of one thread-block cluster summed
# through distributed shared memory (sm_90), with the kernel's warps and with 4 or 8 forced; prefetch: L2
# prefetches of the weight rows that many 4-row steps ahead of the loads (no register holds them). The open
# question of both: at 4096x11008 a read-only kernel reaches 2.97 TB/s on an H200 with K split 4 ways, the
# forward runs at 2.2x that floor. pdl: a programmatic dependent of the previous call (on by default since
# 2026-11-28), timed once without to keep that verdict honest. The files in benchmarks/results hold rows of
# variants dropped since (steps 8, -4, -8, -22, 24, 32-38, a cp.async ring, the tiled order) under their names.
NATIVE_VARIANTS = [(0, 0, 0, 0, True), (0, 0, 0, 0, False), (4, 0, 0, 0, True), (22, 0, 0, 0, True),
                   (0, 0, 2, 0, True), (0, 0, 3, 0, True), (0, 0, 4, 0, True), (0, 0, 8, 0, True),
                   (0, 4, 2, 0, True), (0, 4, 4, 0, True), (0, 8, 2, 0, True), (0, 8, 4, 0, True),
                   (0, 0, 0, 8, True), (0, 0, 0, 16, True), (0, 0, 0, 32, True), (0, 0, 4, 16, True)]
# (prefetch, pdl) of the small-M CUDA backward (csrc/cuda/int4_small_m_t.cu): L2 prefetches that many
# 16-column steps ahead, as the forward's
NATIVE_BWD_VARIANTS = [(0, True), (0, False), (8, True), (16, True), (32, True)]
BIG_TILES = [dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3),
             dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4),
             dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=4)]


def make_weight(K, N, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    G = -(-K // GROUP)
    qw = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device="cuda", generator=g)
    qz = torch.randint(-2**31, 2**31 - 1, (G, N // 8), dtype=torch.int32, device="cuda", generator=g)
    sc = (torch.rand(G, N, device="cuda", generator=g) * 0.01 + 1e-3).half()
    gi = (torch.arange(K, device="cuda") // GROUP).to(torch.int32)
    return qw, qz, sc, gi


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--budget", type=float, default=100.0, help="seconds; later cases are skipped")
    ap.add_argument("--small-native", action="store_true",
                    help="only M <= 16: fp16 matmul, the small-M CUDA variants and the read-only floor (about 100 s)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("tune_int4_gpu: no CUDA device, nothing measured")
        return 0
    import triton
    from triton.testing import do_bench

    from mops_fast import native
    from mops_fast.ops import int4_matmul as op

    t0 = time.time()
    rows: list[dict] = []
    has_native = native.cuda_available()
    if not has_native:
        print("native CUDA kernel unavailable:", native.cuda_unavailable_reason())

    def record(shape, impl, mode, make, ref, sets, graph):
        try:
            y = make(0)()
            torch.cuda.synchronize()
            err = float((y.float() - ref).norm() / ref.norm())
            if graph:
                med, p20, p80 = bench_cuda_graph([make(i) for i in range(sets)])
            else:
                med, p20, p80 = do_bench(make(0), warmup=10, rep=40, quantiles=[0.5, 0.2, 0.8])
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  {impl} {mode} {shape} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            return None
        rows.append({"shape": shape, "impl": impl, "mode": mode, "median_ms": med, "p20_ms": p20, "p80_ms": p80,
                     "timing": "cuda_graph" if graph else "eager", "rel_err_vs_fp32": err})
        flag = "  BAD" if err > 2e-2 else ""
        print(f"  {str(shape):40s} {impl:28s} {mode} {med * 1e3:9.1f} us  err {err:.1e}{flag}", flush=True)
        return med

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tune_int4-{slug(torch.cuda.get_device_name())}.json"

    def write():
        path.write_text(json.dumps({"benchmark": "tune_int4", "device": torch.cuda.get_device_name(),
                                    "torch": torch.__version__, "triton": triton.__version__,
                                    "cuda": torch.version.cuda, "plans": plans, "rows": rows},
                                   indent=1) + "\n")

    weights: dict = {}

    def prepared(K, N):
        # (int4 weight copies, fp16 copies, W in fp32) for the graph timings, built once per shape
        if (K, N) not in weights:
            packed = make_weight(K, N, seed=K + N)
            W32 = op.dequantize_int4(*packed, torch.float32)
            W16 = W32.half()
            weights[(K, N)] = (*weight_copies(packed, W16), W32)
        return weights[(K, N)]

    plans: dict = {}  # "MxKxN" -> {variant: what it launched (native.int4_small_m_plan)}

    def record_read(K, N, qsets):
        # the read-only kernel on the weight copies, per K split: its sums checked, then timed
        from bandwidth_probe import read_sum, wrapped_sum

        shape, nbytes = {"M": 0, "K": K, "N": N}, qsets[0][0].numel() * 4
        sets = [q[0] for q in qsets]
        for ksplit in (1, 2, 4, 8, 16):  # 1-3 programs an SM at ksplit 1 (as the kernels' CTAs), many at 16
            name = f"read[ksplit={ksplit}]"
            try:
                ok = wrapped_sum(read_sum(sets[0], K, N, ksplit)) == wrapped_sum(qsets[0][0])
                med, p20, p80 = bench_cuda_graph([lambda q=q: read_sum(q, K, N, ksplit) for q in sets])
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  {name} {shape} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rows.append({"shape": shape, "impl": name, "mode": "read", "median_ms": med, "p20_ms": p20,
                         "p80_ms": p80, "timing": "cuda_graph", "bytes": nbytes,
                         "tb_per_s": nbytes / (med * 1e-3) / 1e12, "checksum_ok": ok})
            print(f"  {str(shape):40s} {name:28s} read {med * 1e3:9.1f} us  "
                  f"{nbytes / (med * 1e-3) / 1e12:.2f} TB/s{'' if ok else '  BAD SUM'}", flush=True)

    def record_floor():
        # The fixed cost of one graph node a kernel pays whatever it reads: each kernel on a weight of 8
        # packed rows and 132 column tiles (34 KB). Time against weight bytes has an intercept of 3-4 us
        # at the real shapes (H100, 2026-11-27); these rows measure it directly (mode "floor").
        from bandwidth_probe import read_sum

        K, N = 64, 32 * 132
        shape = {"M": 1, "K": K, "N": N}
        qw, qz, sc, gi = make_weight(K, N, 99)
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        W16 = op.dequantize_int4(qw, qz, sc, gi, torch.float16)
        fns = {"fp16": lambda: x @ W16.t(), "read[ksplit=1]": lambda: read_sum(qw, K, N)}
        if has_native:
            for pdl in (False, True):
                fns[f"native[steps=0,gs={GROUP}{',pdl' if pdl else ''}]"] = (
                    lambda d=pdl: native.int4_cuda_small_m_validated(x, qw, qz, sc, gi, K, N, 1, group_size=GROUP,
                                                                     pdl=d))
        for name, fn in fns.items():
            try:
                med, p20, p80 = bench_cuda_graph([fn])
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  floor {name} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rows.append({"shape": shape, "impl": name, "mode": "floor", "median_ms": med, "p20_ms": p20,
                         "p80_ms": p80, "timing": "cuda_graph"})
            print(f"  {str(shape):40s} {name:28s} floor {med * 1e3:9.2f} us", flush=True)

    if args.small_native:
        try:  # a side measurement: never the reason the variants go untimed
            record_floor()
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  floor rows failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    # Every shape's small-M rows first (the open question), then the large-M ones, so that a run cut
    # short by the budget still has the small-M variants of every shape.
    for Ms, (K, N) in [(ms, kn) for ms in ((SMALL_MS,) if args.small_native else (SMALL_MS, LARGE_MS))
                       for kn in SHAPES]:
        qsets, hsets, W32 = prepared(K, N)
        n_q, n_h = len(qsets), len(hsets)
        if args.small_native:
            record_read(K, N, qsets)
        for M in Ms:
            if time.time() - t0 > args.budget:
                print("budget reached, stopping")
                break
            graph = M <= 64
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            dy = torch.randn(M, N, device="cuda", dtype=torch.float16)
            ref_f, ref_b = x.float() @ W32.t(), dy.float() @ W32
            shape = {"M": M, "K": K, "N": N}
            nq, nh = (n_q, n_h) if graph else (1, 1)
            print(f"K={K} N={N} M={M}", flush=True)
            record(shape, "fp16", "fwd", lambda i: lambda: x @ hsets[i].t(), ref_f, nh, graph)
            record(shape, "fp16", "bwd", lambda i: lambda: dy @ hsets[i], ref_b, nh, graph)
            if M <= op.SMALL_M_NATIVE and has_native:
                G, key = qsets[0][2].shape[0], f"{M}x{K}x{N}"
                plans[key] = {}
                for steps, warps, ksplit, pf, pdl in NATIVE_VARIANTS:
                    for gs in ((GROUP, 0) if (steps, warps, ksplit, pf) == (0, 0, 0, 0) and pdl else (GROUP,)):
                        name = (f"native[steps={steps}" + (f",warps={warps}" if warps else "")
                                + (f",ksplit={ksplit}" if ksplit else "") + (f",prefetch={pf}" if pf else "")
                                + f",gs={gs}{',pdl' if pdl else ''}]")
                        try:  # a report, not a measurement
                            plans[key][name] = native.int4_small_m_plan(M, K, N, G, gs, steps, warps, ksplit)
                        except Exception as e:  # noqa: BLE001
                            plans[key][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                        record(shape, name, "fwd",
                               lambda i, s=steps, w=warps, k=ksplit, f=pf, g=gs, d=pdl: lambda:
                               native.int4_cuda_small_m_validated(x, *qsets[i], K, N, G, group_size=g, steps=s,
                                                                  warps=w, ksplit=k, prefetch=f, pdl=d),
                               ref_f, nq, graph)
                print(f"  launched: {plans[key]}", flush=True)
                for pf, pdl in NATIVE_BWD_VARIANTS:
                    record(shape, f"native[steps=0{f',prefetch={pf}' if pf else ''}{',pdl' if pdl else ''}]", "bwd",
                           lambda i, f=pf, d=pdl: lambda: native.int4_cuda_small_m_t_validated(
                               dy, *qsets[i][:3], K, N, G, GROUP, prefetch=f, pdl=d), ref_b, nq, graph)
            if args.small_native:
                continue
            for unpack in (0, 1):
                cfg = {"UNPACK": unpack}
                record(shape, f"triton[unpack={unpack}]", "fwd",
                       lambda i, c=cfg: lambda: op.int4_matmul_triton(x, *qsets[i], GROUP, config=c), ref_f, nq, graph)
                record(shape, f"triton[unpack={unpack}]", "bwd",
                       lambda i, c=cfg: lambda: op.int4_matmul_t_triton(dy, *qsets[i], GROUP, config=c), ref_b, nq,
                       graph)
            if M >= 64:
                record(shape, "chunked", "fwd", lambda i: lambda: op.int4_matmul_chunked(x, *qsets[i], GROUP), ref_f,
                       nq, graph)
                record(shape, "chunked", "bwd", lambda i: lambda: op.int4_matmul_t_chunked(dy, *qsets[i], GROUP),
                       ref_b, nq, graph)
            if M == 4096 and N == 11008:
                for tile in BIG_TILES:
                    for unpack in (0, 1):
                        cfg = dict(tile, UNPACK=unpack)
                        name = "triton[" + ",".join(f"{k}={v}" for k, v in cfg.items()) + "]"
                        record(shape, name, "fwd",
                               lambda i, c=cfg: lambda: op.int4_matmul_triton(x, *qsets[i], GROUP, config=c), ref_f,
                               1, False)
                        bcfg = dict(BM=tile["BM"], BK=tile["BN"] if tile["BN"] <= 128 else 128, BN=tile["BK"],
                                    num_warps=tile["num_warps"], num_stages=tile["num_stages"], UNPACK=unpack)
                        name = "triton[" + ",".join(f"{k}={v}" for k, v in bcfg.items()) + "]"
                        record(shape, name, "bwd",
                               lambda i, c=bcfg: lambda: op.int4_matmul_t_triton(dy, *qsets[i], GROUP, config=c),
                               ref_b, 1, False)
        write()  # after every shape: a run cut short still leaves its rows
    print(f"wrote {path} ({len(rows)} rows) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
