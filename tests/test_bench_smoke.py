"""benchmarks/bench_gptq_matmul.py --smoke-cpu: the GPU benchmark's own code paths (every impl, the JSON
rows, the accuracy check) on tiny shapes under the Triton interpreter, so the script a GPU session runs
is known to work before a device is lent."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gptq_matmul_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gptq_matmul.py"), "--smoke-cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "failed" not in proc.stdout, proc.stdout[-3000:]
    doc = json.loads((tmp_path / "gptq_matmul-cpu-smoke.json").read_text())
    impls = {(r["impl"], r["mode"]) for r in doc["rows"]}
    for impl in ("fused", "fused_triton", "fp16", "unpack_matmul", "dequant_chunked"):
        assert {(impl, "fwd"), (impl, "bwd")} <= impls, impl
    assert all("warning" not in r and r["rel_err_vs_fp32"] < 2e-2 for r in doc["rows"])
