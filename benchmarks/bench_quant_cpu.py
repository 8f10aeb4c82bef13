"""Int4 GPTQ matmul on the CPU: the C++ kernel (mops_fast._C) against fp32 torch.matmul.

LLaMA-7B layer shapes (K x N = 4096x4096, 4096x11008, 11008x4096) at M = 1 (decode), 8 and 256;
forward y = x W^T, plus the backward to the input dx = dy W for M = 1 and 8.

  python benchmarks/bench_quant_cpu.py [--out DIR] [--quick] [--threads T]
      writes DIR/quant_cpu-<device slug>.json (DESIGN §6 schema; the slug ends in the thread
      count); default DIR benchmarks/results
  pytest benchmarks/bench_quant_cpu.py            pytest-benchmark functions, same kernels

Timings interleave the implementations rep by rep, so that load from other processes on a shared
machine hits both alike; the ratio of medians is the number to compare.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mops_fast import native  # noqa: E402
from mops_fast.machine import cpu_name, device_slug  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N): q/o proj, up/gate proj, down proj
MS = [1, 8, 256]
GROUP = 128


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """(R, C) 4-bit codes -> (R/8, C) int32, row 8i+j at bits 4j."""
    R, C = codes.shape
    v = (codes.to(torch.int64).reshape(R // 8, 8, C) << (4 * torch.arange(8)).view(1, 8, 1)).sum(1)
    v = v & 0xFFFFFFFF
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def make_layer(K: int, N: int, group: int = GROUP, seed: int = 0):
    """A random GPTQ int4 layer (qweight, qzeros, scales fp16, g_idx) and its dense fp32 weight (N, K)."""
    g = torch.Generator().manual_seed(seed)
    G = math.ceil(K / group)
    codes = torch.randint(0, 16, (K, N), generator=g)
    zeros = torch.randint(0, 16, (G, N), generator=g)
    scales = (torch.rand(G, N, generator=g) * 0.01 + 0.001).half()
    g_idx = (torch.arange(K) // group).to(torch.int32)
    qweight = pack_rows(codes)
    qzeros = pack_rows(zeros.t().contiguous()).t().contiguous()
    W = ((codes - zeros[g_idx.long()]).float() * scales.float()[g_idx.long()]).t().contiguous()
    return (qweight, qzeros, scales, g_idx), W


def time_interleaved(fns: dict, reps: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for k, ts in times.items():
        ts.sort()
        q = lambda p: ts[min(len(ts) - 1, max(0, round(p * (len(ts) - 1))))]  # noqa: E731
        out[k] = {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8)}
    return out


def run(out_dir: Path, quick: bool = False) -> Path:
    if not native.available():
        raise SystemExit(f"mops_fast._C unavailable: {native.unavailable_reason()}")
    torch.manual_seed(0)
    rows = []
    shapes = SHAPES[:1] if quick else SHAPES
    for K, N in shapes:
        packed, W = make_layer(K, N)
        for M in MS:
            x = torch.randn(M, K)
            reps = 60 if M == 1 else (15 if M == 8 else 4)
            fwd = time_interleaved(
                {"int4_cpp": lambda: native.int4_matmul_cpu(x, *packed), "fp32_matmul": lambda: x @ W.t()},
                reps=3 if quick else reps,
            )
            modes = [("fwd", fwd)]
            if M <= 8:
                dy = torch.randn(M, N)
                bwd = time_interleaved(
                    {"int4_cpp": lambda: native.int4_matmul_t_cpu(dy, *packed), "fp32_matmul": lambda: dy @ W},
                    reps=3 if quick else reps,
                )
                modes.append(("bwd", bwd))
            for mode, res in modes:
                for impl, r in res.items():
                    rows.append({"shape": {"M": M, "K": K, "N": N}, "impl": impl, "mode": mode, **r,
                                 "peak_mem_bytes": None, "tokens_per_s": M / (r["median_ms"] / 1e3)})
                ratio = res["fp32_matmul"]["median_ms"] / res["int4_cpp"]["median_ms"]
                print(f"K={K:5d} N={N:5d} M={M:3d} {mode}: int4_cpp {res['int4_cpp']['median_ms']:8.3f} ms  "
                      f"fp32_matmul {res['fp32_matmul']['median_ms']:8.3f} ms  speedup {ratio:5.2f}x", flush=True)
    result = {
        "benchmark": "quant_cpu",
        "device": f"{cpu_name()} ({torch.get_num_threads()} threads, isa={native_isa()})",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"quant_cpu-{device_slug()}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", path)
    return path


def native_isa() -> str:
    from mops_fast import _C

    return _C.isa()


def _version(mod: str):
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001 - optional package
        return None


# ---- pytest-benchmark functions (pytest benchmarks/bench_quant_cpu.py) ----------------------------
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    _LAYERS: dict = {}

    def _layer(K, N):
        if (K, N) not in _LAYERS:
            _LAYERS[(K, N)] = make_layer(K, N)
        return _LAYERS[(K, N)]

    _params = pytest.mark.parametrize("K, N", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
    _needs_native = pytest.mark.skipif(not native.available(), reason="mops_fast._C not built")

    @_needs_native
    @_params
    @pytest.mark.parametrize("M", MS)
    def test_int4_cpp_fwd(benchmark, K, N, M):
        packed, _ = _layer(K, N)
        x = torch.randn(M, K)
        benchmark(native.int4_matmul_cpu, x, *packed)

    @_params
    @pytest.mark.parametrize("M", MS)
    def test_fp32_matmul_fwd(benchmark, K, N, M):
        _, W = _layer(K, N)
        x = torch.randn(M, K)
        benchmark(torch.matmul, x, W.t())

    @_needs_native
    @_params
    @pytest.mark.parametrize("M", [1, 8])
    def test_int4_cpp_bwd(benchmark, K, N, M):
        packed, _ = _layer(K, N)
        dy = torch.randn(M, N)
        benchmark(native.int4_matmul_t_cpu, dy, *packed)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--quick", action="store_true", help="one shape, 3 reps (smoke test)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads for both implementations (default: torch's own)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    run(args.out, args.quick)
