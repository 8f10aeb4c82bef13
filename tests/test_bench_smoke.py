"""The GPU benchmarks' --smoke-cpu modes: their own code paths (every impl, the JSON rows, the accuracy
checks) on tiny shapes under the Triton interpreter, so the scripts a GPU session runs are known to work
before a device is lent. bench_gptq_matmul.py in `make test`; bench_gated_prefix_attention.py (about a
minute) in `make test-all`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    # act-order rows: the QuantLinear forward and the group-sorted backward, checked against the reference
    act = {(r["impl"], r["mode"]) for r in doc["rows"] if r["shape"]["act_order"]}
    assert {("fused", "fwd"), ("fused", "bwd")} <= act


@pytest.mark.slow
def test_gated_prefix_attention_benchmark_smoke(tmp_path):
    # bench_gated_prefix_attention.py --smoke-cpu: every impl and mode, the cascade rows included (~170 s)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gated_prefix_attention.py"),
                           "--smoke-cpu", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERROR" not in proc.stdout, proc.stdout[-3000:]
    doc = json.loads(next(tmp_path.glob("gated_prefix_attention-*.json")).read_text())
    got = {(r["impl"], r["mode"]) for r in doc["rows"] if "median_ms" in r}
    for impl in ("fused", "reference", "sdpa_noprefix"):
        assert {(impl, m) for m in ("fwd", "bwd", "fwd+bwd")} <= got, impl
    for impl in ("fused_fusedbwd", "fused_nopad", "fused_cascade"):
        assert {(impl, m) for m in ("fwd", "bwd", "fwd+bwd")} <= got, impl
    for impl in ("fused_cascade_bwd", "fused_cascade_bwd_kdq"):
        assert {(impl, "bwd"), (impl, "fwd+bwd")} <= got, impl
    assert all(r["rel_err_vs_reference"] < 1e-4 for r in doc["rows"] if "rel_err_vs_reference" in r)
