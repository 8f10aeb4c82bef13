"""Packaging of the native extension: the wheel, the nvcc build of the CUDA sources, the fallback.

Each test works in temporary directories (a copy of the sources, a fresh venv, a temp build dir),
so it never disturbs the checkout's own in-place build.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_DEPS = ("setuptools", "pybind11", "cmake", "ninja")

# A CPU op checked against an independent float64 dequantization (format of DESIGN §3).
CPU_OP_CHECK = textwrap.dedent(
    """
    import torch, mops_fast
    from mops_fast import native
    assert native.available(), native.unavailable_reason()
    g = torch.Generator().manual_seed(0)
    K, N, G = 256, 48, 2
    codes = torch.randint(0, 16, (K, N), generator=g)
    zeros = torch.randint(0, 16, (G, N), generator=g)
    scales = torch.rand(G, N, generator=g).half() * 0.01 + 0.001
    g_idx = (torch.arange(K) // 128).int()
    sh = 4 * torch.arange(8)
    def pack(c):  # (R, C) codes -> (R/8, C) int32, row 8i+j at bits 4j
        v = (c.reshape(-1, 8, c.shape[1]).long() << sh.view(1, 8, 1)).sum(1) & 0xFFFFFFFF
        return torch.where(v >= 2**31, v - 2**32, v).int()
    qweight, qzeros = pack(codes), pack(zeros.t().contiguous()).t().contiguous()
    W = ((codes - zeros[g_idx.long()]).double() * scales.double()[g_idx.long()]).t()
    x = torch.randn(3, K, generator=g)
    y = native.int4_matmul_cpu(x, qweight, qzeros, scales, g_idx)
    err = (y.double() - x.double() @ W.t()).abs().max().item()
    assert err < 1e-4, err
    print("OK", mops_fast.__file__)
    """
)


def _have_build_deps() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in BUILD_DEPS)


def _copy_sources(dst: Path) -> Path:
    src = dst / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "CMakeLists.txt", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    shutil.copytree(ROOT / "csrc", src / "csrc", ignore=ignore)
    shutil.copytree(ROOT / "mops_fast", src / "mops_fast", ignore=ignore)
    return src


def _run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def _build_wheel(src: Path, out: Path, cuda: bool) -> Path:
    env = {**os.environ, "MOPS_FAST_CUDA": "1" if cuda else "0"}
    env.pop("TORCH_CUDA_ARCH_LIST", None)  # the default list is what these tests check
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(src)]
    if _have_build_deps():
        cmd.insert(4, "--no-build-isolation")  # offline: use this environment's cmake/pybind11
    _run(cmd, env=env)  # without them, pip fetches the build requirements from PyPI
    (wheel,) = out.glob("mops_fast-*.whl")
    return wheel


def test_wheel_installs_into_fresh_venv_and_runs(tmp_path):
    src = _copy_sources(tmp_path)
    wheel = _build_wheel(src, tmp_path / "wheels", cuda=False)
    assert "linux" in wheel.name or "macosx" in wheel.name or "win" in wheel.name, wheel.name

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    vpy = venv / "bin" / "python"
    _run([str(vpy), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    # The fresh venv sees this environment's packages (torch, transformers) after its own, so the
    # wheel's mops_fast is the one imported.
    vsite = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (vsite / "zz_outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = _run([str(vpy), "-c", CPU_OP_CHECK], cwd=tmp_path,
               env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MOPS_FAST_DISABLE_NATIVE")})
    assert out.stdout.startswith("OK"), out.stdout
    assert str(venv) in out.stdout, f"imported the wrong mops_fast: {out.stdout}"


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="nvcc not found")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """MOPS_FAST_CUDA=1 builds _C_cuda for the default arch list (sm_80, sm_90, compute_90 PTX).

    About 1 minute on 2 cores; compile only (no GPU here). The module must import without a GPU, and no
    kernel may spill beyond SPILL_ALLOWED (cuobjdump's resource usage of the built module).
    """
    import zipfile

    src = _copy_sources(tmp_path)
    wheel = _build_wheel(src, tmp_path / "wheels", cuda=True)
    names = zipfile.ZipFile(wheel).namelist()
    (so_name,) = [n for n in names if n.startswith("mops_fast/_C_cuda")]
    assert any(n.startswith("mops_fast/_C.") for n in names), names
    flags = "".join(f.read_text() for f in src.rglob("build.ninja")) + "".join(
        f.read_text() for f in src.rglob("flags.make"))
    for arch in ("arch=compute_80,code=[sm_80]", "arch=compute_90,code=[sm_90]",
                 "arch=compute_90,code=[compute_90]"):
        assert arch in flags, f"{arch} missing from the CUDA flags"
    so = tmp_path / "so" / Path(so_name).name
    so.parent.mkdir()
    so.write_bytes(zipfile.ZipFile(wheel).read(so_name))
    # Loads on a GPU-less machine: nothing touches the driver until a kernel is launched.
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('mops_fast._C_cuda', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.int4_matmul_small_m.__doc__); "
            "print(m.int4_matmul_small_m_t.__doc__)")
    out = _run([sys.executable, "-c", code, str(so)])
    assert "M <= 16" in out.stdout and "dx (M,K) = dy (M,N) W" in out.stdout
    _check_spills(so)
    ldd = shutil.which("ldd")
    if ldd:
        deps = _run([ldd, str(so)]).stdout
        assert "libcudart" not in deps, f"_C_cuda should link cudart statically:\n{deps}"


# Kernels allowed to spill, and how much (bytes a thread; "{T}" stands for each activation type). None now:
# the act-order small-M forward at 16 rows sits at the 128-register cap (__launch_bounds__ of 512 threads) and
# spilled 8 bytes on sm_90 (ptxas, CUDA 13.0) while it also read the tiled weight order; with GPTQ order only
# it spills nothing on either architecture.
SPILL_ALLOWED: dict[str, int] = {}


def _resource_usage(so: Path) -> list[tuple[str, str, int]]:
    """(arch, demangled kernel, stack bytes) of every kernel in a module's fatbin (cuobjdump -res-usage)."""
    import re

    triton_bin = None
    try:
        import triton.backends.nvidia as nv
        triton_bin = Path(nv.__file__).parent / "bin" / "cuobjdump"
    except ImportError:
        pass
    tool = shutil.which("cuobjdump") or (str(triton_bin) if triton_bin and triton_bin.exists() else None)
    if tool is None:
        pytest.skip("no cuobjdump to read the kernels' resource usage")
    text = _run([tool, "-res-usage", str(so)]).stdout
    rows, arch = [], None
    for line in text.splitlines():
        if m := re.match(r"arch = (sm_\d+)", line.strip()):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif m := re.search(r"STACK:(\d+)", line):
            rows.append((arch, name, int(m.group(1))))
    names = [n for _, n, _ in rows]
    if shutil.which("c++filt"):
        names = _run(["c++filt"], input="\n".join(names)).stdout.splitlines()
    names = [n.removeprefix("void ").replace("(anonymous namespace)::", "").split("(")[0] for n in names]
    return [(a, n, st) for (a, _, st), n in zip(rows, names)]


def _check_spills(so: Path) -> None:
    usage = _resource_usage(so)
    assert {a for a, _, _ in usage} == {"sm_80", "sm_90"}, usage
    assert len(usage) > 40, usage
    allowed = {k.format(T=T): v for k, v in SPILL_ALLOWED.items() for T in ("__half", "__nv_bfloat16")}
    assert set(allowed) <= {n for _, n, _ in usage}, sorted({n for _, n, _ in usage})  # names parse
    bad = [(a, n, st) for a, n, st in usage if st > allowed.get(n, 0)]
    assert not bad, f"kernels spill (arch, kernel, stack bytes): {bad}"


def test_cuda_arch_list_mapping():
    text = (ROOT / "setup.py").read_text()
    # Evaluate only the helper (running setup.py would start a build).
    ns: dict = {}
    start = text.index("def cuda_architectures")
    end = text.index("def find_nvcc")
    exec("import re\n" + text[start:end], ns)
    f = ns["cuda_architectures"]
    assert f("8.0;9.0+PTX") == "80-real;90-real;90-virtual"
    assert f("9.0") == "90-real"
    assert f("8.6 9.0a") == "86-real;90a-real"
    with pytest.raises(SystemExit, match="not understood"):
        f("hopper")


@pytest.mark.parametrize("how", ["env", "missing"])
def test_fallback_without_native(how):
    """With the extension disabled (env var) or absent (import blocked), the package still works."""
    block = "" if how == "env" else "import sys; sys.modules['mops_fast._C'] = None\n"
    code = block + textwrap.dedent(
        """
        import torch
        from mops_fast import native
        from mops_fast.ops import int4_matmul as op
        assert not native.available()
        reason = native.unavailable_reason()
        print("reason:", reason)
        try:
            native.int4_matmul_cpu(torch.zeros(1, 8), torch.zeros(1, 8, dtype=torch.int32),
                                   torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 8),
                                   torch.zeros(8, dtype=torch.int32))
        except RuntimeError as e:
            assert "unavailable" in str(e), e
        else:
            raise AssertionError("int4_matmul_cpu ran without the extension")
        # The op's dispatch falls back to the PyTorch reference.
        g = torch.Generator().manual_seed(0)
        qweight = torch.randint(-2**31, 2**31 - 1, (8, 16), generator=g, dtype=torch.int32)
        qzeros = torch.randint(-2**31, 2**31 - 1, (1, 2), generator=g, dtype=torch.int32)
        scales = torch.rand(1, 16, generator=g) * 0.01
        g_idx = torch.zeros(64, dtype=torch.int32)
        x = torch.randn(2, 64, generator=g)
        y = op.int4_matmul(x, qweight, qzeros, scales, g_idx)
        ref = op.int4_matmul_ref(x, qweight, qzeros, scales, g_idx)
        assert torch.allclose(y, ref), (y - ref).abs().max()
        print("fallback OK")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if how == "env":
        env["MOPS_FAST_DISABLE_NATIVE"] = "1"
    else:
        env.pop("MOPS_FAST_DISABLE_NATIVE", None)
    out = _run([sys.executable, "-c", code], cwd=ROOT, env=env)
    assert "fallback OK" in out.stdout
    expect = "MOPS_FAST_DISABLE_NATIVE" if how == "env" else "could not be imported"
    assert expect in out.stdout, out.stdout
