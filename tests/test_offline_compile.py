"""The Triton kernels compile for the GPUs the package targets (sm_80, sm_90) here, with Triton's own
ptxas and no GPU (benchmarks/offline_compile.py): no compile error, no spill, tensor cores for every matmul,
shared memory within the part's limit. The interpreter the other tests use runs the kernels as NumPy, so
this is what catches a kernel that cannot compile (or spills) before a GPU session does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "offline_compile.py"
CAPS = (80, 90)
SMEM_LIMIT = {80: 166912, 90: 232448}  # opt-in shared memory per block: A100, H100

triton = pytest.importorskip("triton")


def _offline_api() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _offline_api(), reason="this Triton has no ASTSource / GPUTarget "
                                "(offline_compile.py is written against Triton 3.6-3.9)")


def _start(suite: str, cap: int, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen([sys.executable, str(SCRIPT), suite, "--cap", str(cap), "--json", str(out)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, out: Path) -> list[dict]:
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"offline compile failed:\n{log[-4000:]}"
    return json.loads(out.read_text())["rows"]


@pytest.fixture(scope="module")
def int4_rows(tmp_path_factory):
    """Rows of the int4 suite per capability; both compiled at once (one process each)."""
    tmp = tmp_path_factory.mktemp("offline_compile")
    procs = {cap: _start("int4", cap, tmp / f"int4-{cap}.json") for cap in CAPS}
    return {cap: _finish(p, tmp / f"int4-{cap}.json") for cap, p in procs.items()}


@pytest.mark.parametrize("cap", CAPS)
def test_int4_kernels_compile_without_spills(int4_rows, cap):
    rows = int4_rows[cap]
    labels = [r["label"] for r in rows]
    # fp16, bf16 and fp32: 2 groupings x (4 tile configs x fwd/bwd + dequant); the bandwidth probe
    assert len(rows) == 3 * 2 * 9 + 1, labels
    for want in ("fwd bf16 act-order M=16 split=4", "bwd fp16 grouped M=4096 split=1",
                 "dequant bf16 grouped", "fwd fp32 act-order M=512 split=1", "read"):
        assert want in labels
    for r in rows:
        where = f"sm_{cap} {r['label']} ({r['kernel']})"
        assert r["stack"] == 0, f"{where} spills {r['stack']} bytes a thread"
        assert r["shared"] <= SMEM_LIMIT[cap], f"{where} needs {r['shared']} bytes of shared memory"
        if r["kernel"] in ("_int4_fwd_kernel", "_int4_bwd_kernel"):
            # every dtype reaches the tensor cores (fp32 through its tf32x3 dot); no wgmma before sm_90
            assert r["dot"] in (("mma", "wgmma") if cap >= 90 else ("mma",)), f"{where} lowers to {r['dot']}"


def test_int4_rows_carry_a_ptx_digest(int4_rows):
    for cap in CAPS:
        assert all(len(r["ptx"]) == 16 and int(r["ptx"], 16) >= 0 for r in int4_rows[cap])
    by_label = [{r["label"]: r["ptx"] for r in int4_rows[cap]} for cap in CAPS]
    assert all(by_label[0][k] != by_label[1][k] for k in by_label[0])  # sm_80 and sm_90 code differ


def test_ptx_digest_ignores_source_locations_but_not_instructions():
    """The digest compares a refactor's generated code with the code before it, so moved source lines
    (.loc, .file, debug sections, comments) must not change it, and any instruction must."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); from offline_compile import ptx_digest as d\n"
        "a = '.version 8.4\\n.file 1 \"x.py\"\\n.loc 1 10 0\\nadd.s32 %r1, %r2, %r3; // y = a + b\\n"
        ".section .debug_info\\n{ .b8 1 }'\n"
        "b = '.version 8.4\\n.file 2 \"z.py\"\\n.loc 2 99 4\\n  add.s32 %r1, %r2, %r3;\\n"
        ".section .debug_info\\n{ .b8 7 }'\n"
        "c = a.replace('add.s32', 'sub.s32')\n"
        "print(d(a) == d(b), d(a) != d(c))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr


@pytest.mark.slow
def test_attention_kernels_compile_sm90(tmp_path):
    rows = _finish(_start("attention", 90, tmp_path / "attn.json"), tmp_path / "attn.json")
    assert len(rows) >= 40
    for r in rows:
        where = f"sm_90 {r['label']} ({r['kernel']})"
        assert r["shared"] <= SMEM_LIMIT[90], where
        if r["kernel"] != "_bwd_preprocess_kernel" and not r["label"].startswith("fp32"):
            assert r["dot"] in ("mma", "wgmma"), f"{where} lowers to {r['dot']}"
