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
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from common import make_row, random_int4_layer, result_doc, time_interleaved, write_result  # noqa: E402
from mops_fast import native  # noqa: E402
from mops_fast.machine import cpu_name  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N): q/o proj, up/gate proj, down proj
MS = [1, 8, 256]
GROUP = 128


def run(out_dir: Path, quick: bool = False) -> Path:
    if not native.available():
        raise SystemExit(f"mops_fast._C unavailable: {native.unavailable_reason()}")
    torch.manual_seed(0)
    rows = []
    shapes = SHAPES[:1] if quick else SHAPES
    for K, N in shapes:
        packed, W = random_int4_layer(K, N, GROUP)
        for M in MS:
            x = torch.randn(M, K)
            reps = 3 if quick else (60 if M == 1 else (15 if M == 8 else 4))
            modes = [("fwd", time_interleaved(
                {"int4_cpp": lambda: native.int4_matmul_cpu(x, *packed), "fp32_matmul": lambda: x @ W.t()}, reps))]
            if M <= 8:
                dy = torch.randn(M, N)
                modes.append(("bwd", time_interleaved(
                    {"int4_cpp": lambda: native.int4_matmul_t_cpu(dy, *packed), "fp32_matmul": lambda: dy @ W}, reps)))
            for mode, times in modes:
                res = {impl: make_row({"M": M, "K": K, "N": N}, impl, mode, ts, tokens=M) for impl, ts in times.items()}
                rows += res.values()
                ratio = res["fp32_matmul"]["median_ms"] / res["int4_cpp"]["median_ms"]
                print(f"K={K:5d} N={N:5d} M={M:3d} {mode}: int4_cpp {res['int4_cpp']['median_ms']:8.3f} ms  "
                      f"fp32_matmul {res['fp32_matmul']['median_ms']:8.3f} ms  speedup {ratio:5.2f}x", flush=True)
    doc = result_doc("quant_cpu", rows)
    doc["device"] = f"{cpu_name()} ({torch.get_num_threads()} threads, isa={native_isa()})"
    path = write_result(doc, out_dir)
    print("wrote", path)
    return path


def native_isa() -> str:
    from mops_fast import _C

    return _C.isa()


# ---- pytest-benchmark functions (pytest benchmarks/bench_quant_cpu.py) ----------------------------
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    _LAYERS: dict = {}

    def _layer(K, N):
        if (K, N) not in _LAYERS:
            _LAYERS[(K, N)] = random_int4_layer(K, N, GROUP)
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
