"""Build driver for mops_fast's native extension: runs CMake (CMakeLists.txt) from setuptools.

Environment (see docs/native.md):
  MOPS_FAST_CUDA=0|1          also build mops_fast._C_cuda (default 0). Without nvcc this warns and
                              builds the CPU extension only: an install never fails for lack of CUDA.
  TORCH_CUDA_ARCH_LIST        CUDA targets, e.g. "8.0;9.0+PTX" (the default): machine code for
                              sm_80 and sm_90, plus compute_90 PTX that newer GPUs JIT-compile.
  MOPS_FAST_BUILD_TYPE        CMake build type (default Release; `build_ext --debug` gives Debug).
  MAX_JOBS / CMAKE_BUILD_PARALLEL_LEVEL   parallel compile jobs (default: number of CPUs).
If the C++ (or requested CUDA) compilation fails, the build fails loudly. A source checkout without
a built _C still works: mops_fast.native reports available() == False and the ops use PyTorch.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise SystemExit(f"{name}={os.environ[name]!r}: expected 0 or 1")


def cuda_architectures(arch_list: str) -> str:
    """Map a TORCH_CUDA_ARCH_LIST string ("8.0;9.0+PTX", "8.6 9.0a") to CMAKE_CUDA_ARCHITECTURES."""
    out: list[str] = []
    for token in re.split(r"[;,\s]+", arch_list.strip()):
        if not token:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", token, flags=re.IGNORECASE)
        if not m:
            raise SystemExit(
                f"TORCH_CUDA_ARCH_LIST entry {token!r} not understood: use compute capabilities "
                "like '8.0;9.0+PTX' (a trailing +PTX also embeds PTX for newer GPUs)"
            )
        arch = f"{m.group(1)}{m.group(2)}{m.group(3).lower()}"
        out.append(f"{arch}-real")
        if m.group(4):
            out.append(f"{arch}-virtual")
    if not out:
        raise SystemExit("TORCH_CUDA_ARCH_LIST is empty: give at least one compute capability")
    return ";".join(dict.fromkeys(out))


def find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    # versioned installs (/usr/local/cuda-13.0), newest first
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def find_cmake() -> str:
    exe = shutil.which("cmake")
    if exe is None:
        try:  # the `cmake` PyPI package (a build requirement in pyproject.toml)
            import cmake

            exe = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            raise SystemExit("cmake not found: `pip install cmake` (>= 3.20) or put cmake on PATH")
    return exe


def find_ninja() -> str | None:
    exe = shutil.which("ninja")
    if exe is None:
        try:
            import ninja

            exe = os.path.join(ninja.BIN_DIR, "ninja")
        except ImportError:
            return None
    return exe if os.path.exists(exe) else None


WANT_CUDA = env_flag("MOPS_FAST_CUDA")
NVCC = find_nvcc() if WANT_CUDA else None
if WANT_CUDA and NVCC is None:
    print(
        "mops_fast: MOPS_FAST_CUDA=1 but nvcc was not found (PATH, CUDACXX, CUDA_HOME): building "
        "the CPU extension only.",
        file=sys.stderr,
    )


class CMakeExtension(Extension):
    """A module built by CMakeLists.txt rather than by setuptools' compiler."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        self._cmake_done = False
        super().run()

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        target = self.get_ext_fullpath(ext.name)
        if not self._cmake_done:
            self._run_cmake(os.path.dirname(os.path.abspath(target)))
            self._cmake_done = True
        if not os.path.exists(target):
            raise RuntimeError(
                f"mops_fast: CMake finished but {target} is missing; see the CMake output above"
            )

    def _run_cmake(self, outdir: str) -> None:
        import pybind11

        cmake = find_cmake()
        ninja = find_ninja()
        build_type = os.environ.get("MOPS_FAST_BUILD_TYPE") or ("Debug" if self.debug else "Release")
        jobs = os.environ.get("MAX_JOBS") or os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL")
        jobs = jobs or str(os.cpu_count() or 1)
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake-" + ("ninja" if ninja else "make"))
        os.makedirs(build_dir, exist_ok=True)
        os.makedirs(outdir, exist_ok=True)
        args = [
            cmake,
            "-S", ROOT,
            "-B", build_dir,
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DMOPS_FAST_OUTPUT_DIR={outdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMOPS_FAST_CUDA={'ON' if NVCC else 'OFF'}",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if NVCC:
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
            args += [
                f"-DCMAKE_CUDA_COMPILER={NVCC}",
                f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures(arch_list)}",
            ]
        try:
            subprocess.run(args, check=True)
            subprocess.run([cmake, "--build", build_dir, "-j", jobs], check=True)
        except subprocess.CalledProcessError as e:
            raise SystemExit(
                f"mops_fast: building the native extension failed ({' '.join(e.cmd[:3])} ... exit "
                f"{e.returncode}); see the compiler output above. Fix the build, or use the package "
                "from a source checkout without installing: it falls back to PyTorch when _C is absent."
            ) from e


ext_modules = [CMakeExtension("mops_fast._C")]
if NVCC:
    ext_modules.append(CMakeExtension("mops_fast._C_cuda"))

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
