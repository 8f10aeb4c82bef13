"""Compile the Triton kernels for an NVIDIA GPU on a machine without one, and report what each launch
would cost: shared memory, registers, spill (stack) bytes per thread, and whether its dots reach the
tensor cores. Triton ships ptxas and cuobjdump, so a compile error, a spill or a dot lowered to FMA shows
up here, before a GPU session spends minutes on it.

The kernels' launches are recorded, not run: each suite calls the ordinary Python entry points on empty
CPU tensors of the real shapes with the kernels replaced by recorders, so that every constexpr, tile
config and warp count is exactly what those entry points pick, and then compiles each recorded launch
with the runtime's specialization rules (16-divisible integers and pointers, 1 folded to a constant).
On the CPU the split-K choice sees no GPU (one split), so the int4 suite also forces split-K.

  python benchmarks/offline_compile.py int4 --cap 90 [--json FILE]        int4 matmul + bandwidth probe
  python benchmarks/offline_compile.py attention --cap 90 [--cases TEXT]  gated-prefix attention (~90 s)

Must run compiled, not interpreted: TRITON_INTERPRET is cleared before Triton is imported. Written
against Triton 3.9's compiler entry points (ASTSource, GPUTarget).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the suites need compiled kernels

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

POINTER_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                 torch.uint8: "u8"}


class Recorder:
    """Stands in for a JIT kernel: `kernel[grid](*args, **kwargs)` appends (kernel, args, kwargs) to calls."""

    def __init__(self, fn, calls: list):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *a, **kw: self.calls.append((self.fn, a, kw))


@contextlib.contextmanager
def recording(obj, names: tuple[str, ...]):
    """Replace the kernels obj.<name> by Recorders for the block; yields the list their launches go to."""
    calls: list = []
    saved = {n: getattr(obj, n) for n in names}
    try:
        for n, fn in saved.items():
            setattr(obj, n, Recorder(fn, calls))
        yield calls
    finally:
        for n, fn in saved.items():
            setattr(obj, n, fn)


def _signature(fn, args, kwargs):
    """(signature, constants, attributes, options) the runtime would build for this launch."""
    opts = {"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
    vals = dict(zip(fn.arg_names, args))
    vals.update({k: v for k, v in kwargs.items() if k not in opts})
    defaults = {n: p.default for n, p in inspect.signature(fn.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    missing = [n for n in fn.arg_names if n not in vals and n not in defaults]
    if missing:
        raise ValueError(f"{fn.__name__}: launch is missing arguments {missing}")
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = vals[name] if name in vals else defaults[name]
        dns = fn.params[i].do_not_specialize
        if fn.params[i].is_constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name], attrs[(i,)] = "*" + POINTER_TYPES[v.dtype], [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1 and not dns:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if v % 16 == 0 and not dns:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs, opts


def compile_launch(fn, args, kwargs, cap: int) -> dict:
    """Compile one recorded launch for sm_<cap>: {"kernel", "shared", "regs", "stack", "dot"} where dot
    is "wgmma", "mma" (mma.sync), or "fma" (no tensor-core instruction in the PTX)."""
    import triton
    import triton.backends.nvidia as nv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs, opts = _signature(fn, args, kwargs)
    kern = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cap, 32), options=opts)
    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kern.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    reg, stack = re.search(r"REG:(\d+)", res), re.search(r"STACK:(\d+)", res)
    ptx = kern.asm["ptx"]
    dot = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "fma")
    return {"kernel": fn.__name__, "shared": kern.metadata.shared, "regs": reg and int(reg.group(1)),
            "stack": stack and int(stack.group(1)), "dot": dot, "ptx": ptx_digest(ptx)}


def ptx_digest(ptx: str) -> str:
    """A digest of the PTX's instructions: the same for a refactor that leaves the generated code alone
    (source locations, debug sections and comments are left out, as they move with the source lines)."""
    keep = []
    for line in ptx.splitlines():
        t = line.split("//", 1)[0].strip()
        if not t or t.startswith((".loc", ".file")):
            continue
        if t.startswith(".section") and ".debug" in t:
            break  # the debug sections run to the end
        keep.append(t)
    return hashlib.sha256("\n".join(keep).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- int4 suite

INT4_K, INT4_N, INT4_GROUP = 4096, 4096, 128


def int4_launches() -> list[tuple[str, object, tuple, dict]]:
    """(label, kernel, args, kwargs) of every int4 Triton launch the dispatch can make at LLaMA-7B shapes:
    forward and backward-to-input at each tile config (M = 16 with split-K, 64, 512, 4096), fp16, bf16 and
    fp32 activations, grouped and act-order; the chunked path's dequantization; and the bandwidth probe."""
    import bandwidth_probe
    from mops_fast.ops import int4_matmul as im

    if im._interpreting():
        raise RuntimeError("offline_compile: TRITON_INTERPRET is set; run this script in its own process")
    K, N, gs = INT4_K, INT4_N, INT4_GROUP
    G = K // gs
    qw = torch.empty(K // 8, N, dtype=torch.int32)
    qzeros = torch.empty(G, N // 8, dtype=torch.int32)
    g_idx = torch.arange(K, dtype=torch.int32) // gs
    out = []
    kernels = im._kernels()
    names = ("fwd", "bwd", "dequant")
    with contextlib.ExitStack() as stack:
        calls: list = []
        stack.callback(lambda saved=im._kernels: setattr(im, "_kernels", saved))
        im._kernels = lambda: tuple(Recorder(k, calls) for k in kernels)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            scales = torch.empty(G, N, dtype=dtype if dtype != torch.float32 else torch.float16)
            dname = POINTER_TYPES[dtype]
            # group_size 0: the kernels look every row's group up (act-order; GROUPED=False)
            for grouping, group_size in (("grouped", gs), ("act-order", 0)):
                for M, split in ((16, 4), (64, 1), (512, 1), (4096, 1)):
                    cfg = {"SPLIT": split}
                    for op, fn in ((0, im.int4_matmul_triton), (1, im.int4_matmul_t_triton)):
                        calls.clear()
                        act = torch.empty(M, K if op == 0 else N, dtype=dtype)
                        fn(act, qw, qzeros, scales, g_idx, group_size, config=cfg)
                        for c in calls:
                            out.append((f"{names[op]} {dname} {grouping} M={M} split={split}", *c))
                calls.clear()
                im.dequantize_int4_slice_triton(qw, qzeros, scales, g_idx, 0, K, 0, 2048, dtype, group_size)
                for c in calls:
                    out.append((f"dequant {dname} {grouping}", *c))
    with recording(bandwidth_probe, ("_read_kernel",)) as calls:
        bandwidth_probe.read_sum(qw, K, N, ksplit=4)
        out.append(("read", *calls[0]))
    return out


# ----------------------------------------------------------------------------------------- attention suite

ATTENTION_CASES = {
    "bf16 d128": {}, "fp16 d128": dict(dtype=torch.float16), "fp32 d128": dict(dtype=torch.float32),
    "bf16 d64": dict(d=64), "bf16 d256": dict(d=256), "bf16 d96": dict(d=96),
    "bf16 decode": dict(S=1, Sk=1000), "bf16 J*L=15": dict(J=5, L=3),
    "bf16 d128 atomic-dQ": dict(dq_mode="atomic"), "bf16 d64 atomic-dQ": dict(d=64, dq_mode="atomic"),
    "bf16 d256 atomic-dQ": dict(d=256, dq_mode="atomic"),
    "fp32 d128 atomic-dQ": dict(dtype=torch.float32, dq_mode="atomic"),
    "bf16 d128 cascade": dict(cascade=True), "bf16 d64 cascade": dict(d=64, cascade=True),
    "bf16 d128 cascade fused-dQ": dict(cascade=True, cascade_dq="fused"),
    "bf16 d64 cascade fused-dQ": dict(d=64, cascade=True, cascade_dq="fused"),
}


def attention_launches(cap: int) -> list[tuple[str, object, tuple, dict]]:
    """The gated-prefix attention kernels' launches (forward, backward, cascade passes) for the cases of
    ATTENTION_CASES, with the tile tables of sm_<cap>."""
    from mops_fast.ops import triton_gated_prefix_attention as tk

    names = ("_gpa_fwd_kernel", "_gpa_bwd_dkdv_kernel", "_gpa_bwd_dq_kernel", "_bwd_preprocess_kernel")
    out = []
    saved = (tk._check_device, tk._arch)
    tk._check_device = lambda q: None
    tk._arch = lambda dev: {90: "sm90", 100: "sm90", 80: "sm80"}.get(cap, "small")
    try:
        with recording(tk, names) as calls:
            for label, case in ATTENTION_CASES.items():
                c = {**dict(B=2, Hq=32, Hkv=8, S=1000, Sk=None, d=128, J=8, L=16, dtype=torch.bfloat16,
                            dq_mode="split"), **case}
                Sk = c["Sk"] or c["S"]
                q = torch.empty(c["B"], c["Hq"], c["S"], c["d"], dtype=c["dtype"])
                k = torch.empty(c["B"], c["Hkv"], Sk, c["d"], dtype=c["dtype"])
                pk = torch.empty(c["J"], c["L"], c["Hkv"], c["d"], dtype=c["dtype"])
                lw, kv = torch.zeros(c["B"], c["J"]), torch.ones(c["B"], Sk, dtype=torch.bool)
                calls.clear()
                if c.get("cascade"):  # the prompt-only passes: forward from a softmax state, dq added in place
                    k0 = k[:, :, :0]
                    init = (torch.empty_like(q), torch.empty(q.shape[:3]))
                    o, lse = tk.gpa_forward(q, k0, k0, pk, pk, lw, None, 0.1, False, init=init)
                    with tk.override_configs(cascade_dq=c.get("cascade_dq", "kernel")):
                        tk.gpa_backward(o, None, q, k0, k0, pk, pk, lw, None, o, lse, 0.1, False,
                                        dq_init=torch.empty_like(q))
                else:
                    o, lse = tk.gpa_forward(q, k, k, pk, pk, lw, kv, 0.1, True)
                    with tk.override_configs(dq_mode=c["dq_mode"]):
                        tk.gpa_backward(o, None, q, k, k, pk, pk, lw, kv, o, lse, 0.1, True)
                for fn, a, kw in calls:
                    cfg = (kw.get("BLOCK_M"), kw.get("BLOCK_N"), kw.get("num_warps"), kw.get("num_stages"))
                    out.append((f"{label} cfg={cfg}", fn, a, kw))
    finally:
        tk._check_device, tk._arch = saved
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite", choices=("int4", "attention"))
    ap.add_argument("--cap", type=int, default=90, help="compute capability to compile for (80, 90, ...)")
    ap.add_argument("--cases", default="", help="only the launches whose label contains this text")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    launches = int4_launches() if args.suite == "int4" else attention_launches(args.cap)
    rows, seen = [], {}
    print(f"sm_{args.cap}: shared memory bytes, registers and stack (spill) bytes per thread, dot instruction")
    for label, fn, a, kw in launches:
        if args.cases and args.cases not in label:
            continue
        key = (fn.__name__, repr(_signature(fn, a, kw)))
        if key not in seen:  # launches that specialize alike compile once
            seen[key] = compile_launch(fn, a, kw, args.cap)
        row = {"label": label, **seen[key]}
        rows.append(row)
        print(f"  {label:44s} {row['kernel']:22s} smem={row['shared']:7d} regs={row['regs']} "
              f"stack={row['stack']} {row['dot']} ptx={row['ptx']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cap": args.cap, "suite": args.suite, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
