"""benchmarks/profile_decode_host.py --quick: the decode host-time profile runs for the plain, MoPs and 4-bit
models and reports a time and an op count for each."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_decode_host_quick(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_decode_host.py"), "--quick",
                           "--variants", "dense,mops,rtn4+mops", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense", "mops", "rtn4+mops"}
    for r in rows.values():
        assert r["loop_us"] > 0 and r["aten_ops"] > 0 and r["py_calls"] > 0
    # the injected layers' attention adds ops; the 4-bit layers replace each linear's aten ops by one kernel call
    assert rows["mops"]["aten_ops"] > rows["dense"]["aten_ops"]


def test_profile_decode_device_mode_on_cpu(tmp_path):
    # the GPU session's decode profile (--device cuda) runs the same path on the CPU: one model through the
    # stages, each with a step time, its host ops and the Python functions that cost the most
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_decode_host.py"), "--device", "cpu",
                           "--shape", "smoke", "--quick", "--variants", "dense,rtn4+mops", "--json", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "profile_decode-cpu.json").read_text())
    rows = {r["impl"]: r for r in doc["rows"]}
    assert set(rows) == {"dense", "rtn4+mops"} and doc["shape"] == "smoke" and doc["baseline_impl"] == "dense"
    for r in rows.values():
        assert r["median_ms"] > 0 and r["mode"] == "decode_step" and r["shape"]["prompt"] == 16
        assert r["host_top"] and r["python_top"] and r["gpu_busy_ms"] is None
    # the 4-bit layers' Python wrapper is among what the profile sees
    assert any("int4_matmul" in f["function"] for f in rows["rtn4+mops"]["python_top"]), rows["rtn4+mops"]
