"""CUDA small-M int4 GPTQ kernel (mops_fast._C_cuda) for decode: M in {1, 4, 8, 16}.

Compared with fp16 torch.matmul on the dequantized weight and, when importable, the Triton kernel
mops_fast.ops.int4_matmul.int4_matmul_triton. LLaMA-7B shapes K x N = 4096x4096, 4096x11008,
11008x4096, group size 128, fp16 activations. Timing: CUDA-graph replays over input copies beyond the L2
cache (common.bench_cuda_graph: median, p20, p80); the eager do_bench median is kept in each row.
int4_cuda computes groups from the group size (GPTQ without act-order, what QuantLinear passes) and
launches what the dispatch would: the variant (steps), the K split and programmatic dependent launch
of mops_fast.ops.int4_matmul's settings (MOPS_FAST_INT4_FWD_STEPS / _FWD_KSPLIT / _PDL; the JSON records
them); int4_cuda_gidx reads the groups from g_idx (the act-order path). Mode bwd: dx = dy W, the CUDA small-M backward
(csrc/cuda/int4_small_m_t.cu) against dy @ W16 and the Triton backward kernel.

  python benchmarks/bench_int4_cuda_small_m.py --out DIR    -> DIR/int4_cuda_small_m-<gpu slug>.json

CUDA only; build the kernel first: MOPS_FAST_CUDA=1 python3 setup.py build_ext --inplace.
Targets (DESIGN §7 and the issue): M=1 >= 3x faster than fp16 matmul on 4096x11008; faster than the
Triton kernel at every M <= 16. Runs in well under 90 s on an H100.
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

from common import bench_cuda_graph, random_int4_layer, weight_copies  # noqa: E402
from mops_fast.machine import slug  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
MS = [1, 4, 8, 16]
GROUP = 128


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_int4_cuda_small_m: no CUDA device, nothing measured")
        return 0
    from triton.testing import do_bench

    from mops_fast import native

    if not native.cuda_available():
        print(f"bench_int4_cuda_small_m: {native.cuda_unavailable_reason()}")
        return 1
    from mops_fast.ops import int4_matmul as op

    int4_matmul_triton = int4_matmul_t_triton = None
    if op.HAS_TRITON:  # optional comparison
        int4_matmul_triton, int4_matmul_t_triton = op.int4_matmul_triton, op.int4_matmul_t_triton
    else:
        print("Triton not importable: the int4_triton rows are skipped")
    # what the dispatch launches (the same functions it asks)
    settings = op.small_m_settings()
    pdl = settings["pdl"]
    print("dispatch settings (M <= 8, M > 8):", settings)

    t_start = time.time()
    dev = torch.device("cuda")
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"int4_cuda_small_m-{slug(torch.cuda.get_device_name())}.json"

    def write():  # after every shape, so a run cut short by a time limit still leaves its rows
        result = {
            "benchmark": "int4_cuda_small_m",
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "cuda": torch.version.cuda,
            "dispatch_settings": settings,
            "rows": rows,
        }
        path.write_text(json.dumps(result, indent=1) + "\n")

    for K, N in SHAPES:
        packed, W = random_int4_layer(K, N, GROUP, device=dev)
        W16 = W.half()
        del W
        G = packed[2].shape[0]
        # copies for graph timing: the bytes one graph cycles through exceed twice the L2 cache
        qsets, hsets = weight_copies(packed, W16)
        n_q, n_h = len(qsets), len(hsets)
        for M in MS:
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            dy = torch.randn(M, N, device=dev, dtype=torch.float16)
            modes = {  # mode -> (reference, {name: (factory over input copies, copies)})
                "fwd": (x.float() @ W16.float().t(), {
                    "int4_cuda": (lambda i: lambda: native.int4_cuda_small_m_validated(
                        x, *qsets[i], K, N, G, group_size=GROUP, steps=op.small_m_knob("fwd_steps", M),
                        ksplit=op.small_m_knob("fwd_ksplit", M), pdl=pdl), n_q),
                    "int4_cuda_gidx": (lambda i: lambda: native.int4_cuda_small_m_validated(
                        x, *qsets[i], K, N, G), n_q),
                    "fp16_matmul": (lambda i: lambda: x @ hsets[i].t(), n_h),
                }),
                "bwd": (dy.float() @ W16.float(), {
                    "int4_cuda": (lambda i: lambda: native.int4_cuda_small_m_t_validated(
                        dy, *qsets[i][:3], K, N, G, GROUP, pdl=pdl), n_q),
                    "fp16_matmul": (lambda i: lambda: dy @ hsets[i], n_h),
                }),
            }
            if int4_matmul_triton is not None:
                modes["fwd"][1]["int4_triton"] = (
                    lambda i: lambda: int4_matmul_triton(x, *qsets[i], group_size=GROUP), n_q)
                modes["bwd"][1]["int4_triton"] = (
                    lambda i: lambda: int4_matmul_t_triton(dy, *qsets[i], group_size=GROUP), n_q)
            for mode, (ref, impls) in modes.items():
                res = {}
                for name, (make, sets) in impls.items():
                    fn = make(0)
                    try:
                        y = fn()
                        torch.cuda.synchronize()
                        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                        eager = do_bench(fn, warmup=10, rep=40, quantiles=[0.5])
                        med, p20, p80 = bench_cuda_graph([make(i) for i in range(sets)])
                    except Exception as e:  # noqa: BLE001 - report and go on with the others
                        print(f"  {name} {mode} failed at K={K} N={N} M={M}: {e}")
                        continue
                    res[name] = med
                    weight_bytes = (packed[0].numel() * 4 + packed[2].numel() * 2 if name != "fp16_matmul"
                                    else W16.numel() * 2)
                    rows.append({"shape": {"M": M, "K": K, "N": N}, "impl": name, "mode": mode,
                                 "median_ms": med, "p20_ms": p20, "p80_ms": p80, "timing": "cuda_graph",
                                 "graph_input_sets": sets, "eager_median_ms": eager,
                                 "peak_mem_bytes": None, "tokens_per_s": M / (med / 1e3),
                                 "gb_per_s": weight_bytes / (med / 1e3) / 1e9, "max_rel_err_vs_fp16": err})
                line = "  ".join(f"{k} {v * 1e3:7.1f} us" for k, v in res.items())
                sp = ""
                if "int4_cuda" in res:
                    sp = "  ".join(f"vs {k}: {v / res['int4_cuda']:.2f}x" for k, v in res.items() if k != "int4_cuda")
                print(f"K={K:5d} N={N:5d} M={M:2d} {mode}  {line}  {sp}", flush=True)
            write()
        del packed, W16, qsets, hsets
    write()
    print(f"wrote {path} in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
