"""The GPU benchmarks' --smoke-cpu modes: their own code paths (every impl, the JSON rows, the accuracy
checks) on tiny shapes under the Triton interpreter, so the scripts a GPU session runs are known to work
before a device is lent. bench_gptq_matmul.py and bench_e2e_gpu.py in `make test`; bench_gated_prefix_attention.py (about a
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


def test_e2e_gpu_benchmark_smoke(tmp_path):
    # every part on a 4-layer model: dense, mops, PEFT prefix tuning, LoRA, and the 4-bit model with both
    pytest.importorskip("peft")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e_gpu.py"), "--smoke-cpu", "--reps", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    doc = json.loads(next(tmp_path.glob("e2e_gpu_smoke-*.json")).read_text())
    assert not doc["errors"] and not doc["skipped"] and doc["complete"]
    steps = {r["impl"] for r in doc["rows"] if r["mode"] == "step"}
    assert steps == {"mops", "peft", "lora", "rtn4+mops", "rtn4+lora"}
    assert {"mops_vs_peft_train_tokens_per_s", "mops_vs_lora_train_tokens_per_s"} <= set(doc)


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


def test_bandwidth_probe_reads_every_word(monkeypatch):
    # the read-only kernel the tune script times beside the small-M kernels: with K split or not, its sums
    # add up to the sum of every word (so it reads each once, in bounds)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import torch

    from bandwidth_probe import read_sum, wrapped_sum

    g = torch.Generator().manual_seed(0)
    for K, N in ((256, 72), (520, 40)):
        q = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, generator=g)
        want = wrapped_sum(q)
        for ksplit in (1, 3):
            got = read_sum(q, K, N, ksplit=ksplit, block_rows=16)
            assert got.shape == (-(-N // 32) * ksplit,)
            assert wrapped_sum(got) == want, (K, N, ksplit)
    with pytest.raises(ValueError, match="need a contiguous int32"):
        read_sum(q.t(), K, N)
    with pytest.raises(ValueError, match="ksplit must be >= 1"):
        read_sum(q, K, N, ksplit=0)
