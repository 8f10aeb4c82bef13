"""Host time of one decode step: a tiny random LLaMA (hidden 64, 4 layers, vocab 256, fp32, one CPU thread)
whose per-token work is almost all Python and dispatch, so that what an adapter or a quantized backbone
adds per generated token shows on its own (at decode on a GPU the same host time sets the token rate
whenever the kernels are shorter than their launches).

Variants: `dense` (the plain model), `peft` (PEFT prefix tuning, J*L virtual tokens; skipped without
peft), `mops` (mops_fast.attach, as benchmarks/bench_e2e_gpu.py does), `rtn4` (every decoder linear RTN
4-bit into QuantLinear, as bench_e2e_gpu.py quantizes) and `rtn4+mops`. For each:
  loop_us     one decode step of a manual loop, model(next token, cache=cache), batch 1: min over reps
              of the loop's time / steps
  gen_us      one step of greedy model.generate: (t(N + n) - t(N)) / n, min over reps of each
  aten_ops    aten ops of one loop step (a TorchDispatchMode counter)
  py_calls    Python function calls of one loop step (sys.setprofile)
The variants alternate rep by rep (the CPU may be shared: load then falls on all alike).

  python benchmarks/profile_decode_host.py [--quick] [--json PATH] [--variants dense,mops,...]
  python benchmarks/profile_decode_host.py --cprofile mops      # where one variant's step time goes
  python benchmarks/profile_decode_host.py --ops mops           # its aten ops, by count

On a GPU (`--device cuda`, LLaMA-7B-shaped bf16 by default: bench_e2e_gpu.py's model, 128-token prompt), one
model goes through dense -> mops -> rtn4 -> rtn4+mops (as bench_e2e_gpu.py does) and each stage reports, per
decode step: the wall time (synchronized), the GPU's busy time and kernel count (torch.profiler), and the
host's top ops by self CPU time, so that a token rate can be told apart into kernels and launches. Run by
`STEPS=profile_decode_gpu benchmarks/run_gpu.sh`; `--device cpu --shape smoke` runs the same path here.

  python benchmarks/profile_decode_host.py --device cuda [--shape 7b|1b] --json DIR/profile_decode-<gpu>.json
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import io
import json
import os
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e_gpu  # noqa: E402  (the LLaMA shapes and the on-device model build)

SHAPE = bench_e2e_gpu.SHAPES["smoke"]  # hidden 64, 4 layers, vocab 256
J, L = 8, 8  # 64 prompt tokens, as bench_e2e_gpu.py
PROMPT = 16
GPU_PROMPT = 128  # bench_e2e_gpu.py's generate prompt
VARIANTS = ("dense", "peft", "mops", "rtn4", "rtn4+mops")


def build_dense():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPE, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def quantize_rtn4(model):
    from mops_fast.quant.compress import QuantSettings, quantize_model, replace_with_quant_linear

    # group 32: the tiny layers hold 2-4 groups along K, as a 7B's hold many
    quants = quantize_model(model, None, "rtn", QuantSettings(bits=4, group_size=32, sym=True), log=lambda *a: None)
    return replace_with_quant_linear(model, quants)


def build(variant: str):
    """The model for `variant`, or None when it cannot be built here (peft missing)."""
    from mops_fast import MoPsConfig, attach

    model = build_dense()
    if variant.startswith("rtn4"):
        quantize_rtn4(model)
    if variant.endswith("mops"):
        attach(model, MoPsConfig(num_experts=J, prompt_len=L))
        model.eval()
    if variant == "peft":
        try:
            from peft import PrefixTuningConfig, get_peft_model
        except ImportError:
            return None
        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=J * L)).eval()
    return model


def prompt_ids(batch: int = 1, vocab: int = SHAPE["vocab_size"], length: int = PROMPT, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


class DecodeLoop:
    """Greedy decode by hand: prefill (untimed), then `step()` feeds one token with the KV cache, as
    generate's steady state does. A PEFT prompt-learning model prefills through its own forward (which
    puts the virtual tokens in the cache) and then decodes through the wrapped model, as its generate does."""

    def __init__(self, model, batch: int = 1, ids=None):
        self.model = model
        self.ids = prompt_ids(batch) if ids is None else ids
        self.peft = hasattr(model, "active_peft_config")
        self.decoder = model.base_model if self.peft else model

    @torch.no_grad()
    def prefill(self):
        from transformers import DynamicCache

        mask = torch.ones_like(self.ids)
        if self.peft:
            out = self.model(input_ids=self.ids, attention_mask=mask, use_cache=True)
            self.cache = out.past_key_values
        else:
            self.cache = DynamicCache()
            out = self.model(input_ids=self.ids, attention_mask=mask, cache=self.cache, use_cache=True)
        self.tok = out.logits[:, -1:].argmax(-1)
        self.mask = torch.ones(self.ids.shape[0], 2 * self.cache.get_seq_length() + 2, dtype=self.ids.dtype,
                               device=self.ids.device)

    @torch.no_grad()
    def step(self):
        # generate passes an all-ones mask one column longer each step: a view of a preallocated one
        # keeps the loop's own bookkeeping out of the measurement
        n = self.cache.get_seq_length() + 1
        out = self.decoder(input_ids=self.tok, attention_mask=self.mask_view(n), cache=self.cache, use_cache=True)
        self.tok = out.logits[:, -1:].argmax(-1)

    def mask_view(self, n):
        if self.mask.shape[1] < n:
            self.mask = torch.ones(self.mask.shape[0], 2 * n, dtype=self.mask.dtype, device=self.mask.device)
        return self.mask[:, :n]


def loop_timer(model, steps: int):
    """A function timing `steps` steady-state decode steps (after an untimed prefill and first step, whose
    lazy per-layer state is not the steady state): seconds per step."""
    loop = DecodeLoop(model)

    def run():
        loop.prefill()
        loop.step()
        t = time.perf_counter()
        for _ in range(steps):
            loop.step()
        return (time.perf_counter() - t) / steps

    return run


def generate_timer(model, short: int, extra: int):
    """A function timing greedy generate at `short` and `short + extra` new tokens: (t_short, t_long)."""
    ids = prompt_ids()

    @torch.no_grad()
    def gen(n):
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        dt = time.perf_counter() - t
        assert out.shape[1] == ids.shape[1] + n
        return dt

    return lambda: (gen(short), gen(short + extra))


def time_interleaved(models: dict, steps: int, short: int, extra: int, reps: int) -> dict:
    """{variant: (loop s/step, generate s/step)}: the variants alternate rep by rep, so that load from other
    processes falls on all alike; min over reps after one warm-up rep. A generate step is
    (min t(short + extra) - min t(short)) / extra."""
    loops = {v: loop_timer(m, steps) for v, m in models.items()}
    gens = {v: generate_timer(m, short, extra) for v, m in models.items()}
    best = {v: [float("inf")] * 3 for v in models}
    for r in range(reps + 1):
        for v in models:
            lt = loops[v]()
            gs, gl = gens[v]()
            if r:
                b = best[v]
                best[v] = [min(b[0], lt), min(b[1], gs), min(b[2], gl)]
    return {v: (b[0], (b[2] - b[1]) / extra) for v, b in best.items()}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_step(model):
    """(aten ops by name, Python calls) of one steady-state decode step."""
    loop = DecodeLoop(model)
    loop.prefill()
    loop.step()
    with OpCounter() as oc:
        loop.step()
    calls = [0]

    def prof(frame, event, arg):
        if event == "call":
            calls[0] += 1

    sys.setprofile(prof)
    try:
        loop.step()
    finally:
        sys.setprofile(None)
    return oc.ops, calls[0]


def cprofile_step(model, steps: int, top: int) -> str:
    loop = DecodeLoop(model)
    loop.prefill()
    loop.step()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        loop.step()
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    s.write(f"cProfile over {steps} decode steps (divide by {steps} for per step)\n")
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return s.getvalue()


def device_profile(model, ids, steps: int, top: int, sync) -> dict:
    """One stage of the device run: wall time per decode step (after a prefill and a first step, synchronized
    at both ends), then torch.profiler over `steps` steps: GPU busy time and kernels per step, and the host
    ops with the most self CPU time per step."""
    from torch.profiler import ProfilerActivity, profile

    loop = DecodeLoop(model, ids=ids)
    loop.prefill()
    loop.step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        loop.step()
    sync()
    wall = (time.perf_counter() - t) / steps
    cuda = ids.is_cuda
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            loop.step()
        sync()
    avgs = prof.key_averages()
    gpu_us = kernels = 0.0
    if cuda:
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                gpu_us += ev.device_time
                kernels += 1
    host = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    # the Python side, which the op profile does not see (the native kernels' wrappers, the dispatch)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        loop.step()
    sync()
    pr.disable()
    st = pstats.Stats(pr).stats  # {(file, line, func): (prim calls, calls, tottime, cumtime, callers)}
    py = sorted(st.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return {"step_ms": wall * 1e3, "gpu_busy_ms": gpu_us / steps / 1e3 if cuda else None,
            "kernels_per_step": kernels / steps if cuda else None,
            "host_top": [{"op": e.key, "self_cpu_us_per_step": e.self_cpu_time_total / steps,
                          "calls_per_step": e.count / steps} for e in host],
            "python_top": [{"function": f"{Path(f).name}:{line} {fn}", "tottime_us_per_step": v[2] / steps * 1e6,
                            "cumtime_us_per_step": v[3] / steps * 1e6, "calls_per_step": v[1] / steps}
                           for (f, line, fn), v in py]}


def device_main(a) -> int:
    """--device: one model through dense -> mops -> rtn4 -> rtn4+mops, each stage profiled (device_profile)."""
    from mops_fast import MoPsConfig, attach, detach
    from mops_fast.quant.compress import QuantSettings, quantize_model, replace_with_quant_linear

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("profile_decode_host: no CUDA device, nothing measured")
        return 0
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shape = bench_e2e_gpu.SHAPES[a.shape]
    steps = 4 if a.quick else a.steps
    t0 = time.time()
    model = bench_e2e_gpu.build_model(a.shape, a.device, dtype)
    ids = prompt_ids(1, shape["vocab_size"], GPU_PROMPT if dev.type == "cuda" else PROMPT, dev)
    want = a.variants.split(",")
    rows = []
    attached = False
    for stage in ("dense", "mops", "rtn4", "rtn4+mops"):
        if stage == "rtn4" and any(v.startswith("rtn4") for v in want):
            if attached:
                detach(model)
                attached = False
            # group 128 as bench_e2e_gpu.py; 32 on the smoke shape, whose layers are 64 wide
            gs = 128 if shape["hidden_size"] >= 1024 else 32
            quants = quantize_model(model, None, "rtn", QuantSettings(bits=4, group_size=gs, sym=True),
                                    log=lambda *x: None)
            replace_with_quant_linear(model, quants)
            del quants
        if stage not in want:
            continue
        if stage.endswith("mops") and not attached:
            attach(model, MoPsConfig(num_experts=J, prompt_len=L))
            model.eval()
            attached = True
        prof = device_profile(model, ids, steps, a.top, sync)
        # DESIGN §6 rows (benchmarks/report.py tables them against dense), the profile beside
        row = {"shape": {"model": f"llama-{a.shape}-random", "B": 1, "prompt": ids.shape[1]}, "impl": stage,
               "mode": "decode_step", "median_ms": prof["step_ms"], "tokens_per_s": 1e3 / prof["step_ms"], **prof}
        rows.append(row)
        busy = "" if row["gpu_busy_ms"] is None else (f", GPU busy {row['gpu_busy_ms']:.2f} ms in "
                                                      f"{row['kernels_per_step']:.0f} kernels")
        print(f"{stage:>10}: {row['step_ms']:.2f} ms a step{busy}", flush=True)
        for h in row["host_top"][:8]:
            print(f"{'':12}{h['self_cpu_us_per_step']:9.1f} us  {h['calls_per_step']:6.1f} x  {h['op']}", flush=True)
        for h in row["python_top"][:8]:
            print(f"{'':12}{h['tottime_us_per_step']:9.1f} us  {h['calls_per_step']:6.1f} x  {h['function']} "
                  "(Python, under cProfile)", flush=True)
    if a.json:
        name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
        triton = getattr(sys.modules.get("triton"), "__version__", None)
        doc = {"benchmark": "profile_decode", "device": name, "torch": torch.__version__, "triton": triton,
               "cuda": torch.version.cuda, "baseline_impl": "dense", "shape": a.shape, "dtype": str(dtype),
               "prompt": ids.shape[1], "steps": steps, "timing": "one pass of `steps` decode steps, synchronized",
               "rows": rows,
               "wall_s": round(time.time() - t0, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        out = Path(a.json)
        if out.is_dir() or not out.suffix:
            from mops_fast.machine import slug

            out = out / f"profile_decode-{slug(name)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps and reps")
    ap.add_argument("--variants", default=None, help=f"comma-separated, of {VARIANTS} (default: all; "
                    "with --device all but peft)")
    ap.add_argument("--steps", type=int, default=48, help="decode steps per timed loop")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the rows to this path")
    ap.add_argument("--cprofile", default=None, metavar="VARIANT", help="print cProfile of VARIANT's decode steps")
    ap.add_argument("--ops", default=None, metavar="VARIANT", help="print VARIANT's aten ops of one step")
    ap.add_argument("--device", default=None, help="cuda (or cpu): the device run (see above) instead")
    ap.add_argument("--shape", default="7b", choices=sorted(bench_e2e_gpu.SHAPES), help="with --device")
    ap.add_argument("--top", type=int, default=25, help="with --device: host ops kept per stage")
    a = ap.parse_args(argv)
    if a.device:
        a.variants = a.variants or "dense,mops,rtn4,rtn4+mops"
        if a.steps == 48:
            a.steps = 8  # the profiler's steps: a token each
        return device_main(a)
    a.variants = a.variants or ",".join(VARIANTS)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices (PEFT)
    steps, reps, gen_short, gen_extra = a.steps, a.reps, 4, 32
    if a.quick:
        steps, reps, gen_short, gen_extra = 8, 1, 2, 4
    if a.cprofile or a.ops:
        m = build(a.cprofile or a.ops)
        if m is None:
            print(f"{a.cprofile or a.ops}: cannot build here (peft missing?)")
            return 1
        if a.ops:
            ops, _ = count_step(m)
            for name, n in ops.most_common():
                print(f"{n:5d}  {name}")
        if a.cprofile:
            print(cprofile_step(m, steps, 40))
        return 0
    rows, models = [], {}
    for v in a.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {VARIANTS}")
        m = build(v)
        if m is None:
            print(f"{v:>10}: skipped (peft is not installed)", flush=True)
            rows.append({"variant": v, "skipped": "peft not installed"})
            continue
        ops, calls = count_step(m)
        models[v] = m
        rows.append({"variant": v, "aten_ops": sum(ops.values()), "py_calls": calls})
    times = time_interleaved(models, steps, gen_short, gen_extra, reps)
    for row in rows:
        if row["variant"] in times:
            row["loop_us"], row["gen_us"] = (t * 1e6 for t in times[row["variant"]])
    base = next((r for r in rows if r["variant"] == "dense" and "loop_us" in r), None)
    print(f"\n{'variant':>10} {'loop us':>9} {'gen us':>9} {'aten ops':>9} {'py calls':>9} {'loop vs dense':>14} "
          f"{'gen vs dense':>13}")
    for r in rows:
        if "loop_us" not in r:
            print(f"{r['variant']:>10}  skipped: {r['skipped']}")
            continue
        extra = f"{r['loop_us'] - base['loop_us']:+14.0f} {r['gen_us'] - base['gen_us']:+13.0f}" if base else ""
        print(f"{r['variant']:>10} {r['loop_us']:9.0f} {r['gen_us']:9.0f} {r['aten_ops']:9d} {r['py_calls']:9d} "
              f"{extra}")
    if a.json:
        from mops_fast.machine import cpu_name

        doc = {"benchmark": "profile_decode_host", "cpu": cpu_name(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "shape": SHAPE, "prompt": PROMPT, "steps": steps, "reps": reps,
               "quick": a.quick, "load_average": [round(x, 2) for x in os.getloadavg()], "rows": rows,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
