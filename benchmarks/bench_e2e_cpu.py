"""End to end on the CPU: mops_fast against transformers + PEFT prefix tuning on SmolLM2-135M fp32.

  train step  B=4, S=256 real dolly windows (half prompt, half response), J*L = 64 prompt tokens:
              tokens/s (implementations alternating step by step) and peak memory (growth of the peak
              resident set over one step, each implementation in a fresh process)
  generate    greedy generate() of 32 new tokens after a 64-token prompt, B in {1, 4}: tokens/s for the
              plain model (`dense`), MoPs attached (`mops`), PEFT prefix tuning (`peft`); and, with a
              4-bit GPTQ SmolLM2 checkpoint (the shared GPTQModel fixture, loaded by mops_fast.load_model
              into QuantLinear layers), `gptq4` and `gptq4+mops`

  python benchmarks/bench_e2e_cpu.py [--reps 3] [--out DIR]   -> DIR/e2e_cpu-<device slug>.json
  pytest benchmarks/bench_e2e_cpu.py --benchmark-only          pytest-benchmark functions (generate)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_train_step_cpu import B, J, L, S, build, make_batch  # noqa: E402

GPTQ_FIXTURE = common.ROOT.parent / "shared" / "fixtures" / "gptqmodel-smollm2-135m-4bit-g128-sym"
PROMPT_LEN, NEW_TOKENS, GEN_BATCHES = 64, 32, (1, 4)
TRAIN_IMPLS = ("mops", "peft")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def mem_probe(impl: str) -> dict:
    """Run in a fresh process: peak RSS growth over one training step (after building the model)."""
    batch = make_batch()
    step, _ = build(impl, batch)
    base = _rss_kib("VmRSS")
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0), so the peak is this step's
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    step()
    return {"impl": impl, "peak_growth_bytes": (_rss_kib("VmHWM") - base) * 1024, "rss_before_bytes": base * 1024}


def peak_memory(impl: str) -> int | None:
    cmd = [sys.executable, __file__, "--mem-probe", impl, "--threads", str(torch.get_num_threads())]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        print(f"memory probe for {impl} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_growth_bytes"]


def gen_models(with_gptq: bool = True) -> dict:
    """name -> (model, tokenizer) ready for generate()."""
    from mops_fast import MoPsConfig, attach, load_model

    out = {}
    m, tok = load_model("smollm2-135m", dtype=torch.float32)
    out["dense"] = (m, tok)
    m, _ = load_model("smollm2-135m", dtype=torch.float32)
    out["mops"] = (attach(m, MoPsConfig(num_experts=J, prompt_len=L)), tok)
    from peft import PrefixTuningConfig, get_peft_model

    m, _ = load_model("smollm2-135m", dtype=torch.float32)
    out["peft"] = (get_peft_model(m, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=J * L)), tok)
    if with_gptq and (GPTQ_FIXTURE / "config.json").is_file():
        q, qtok = load_model(str(GPTQ_FIXTURE), dtype=torch.float32)
        out["gptq4"] = (q, qtok)
        q2, _ = load_model(str(GPTQ_FIXTURE), dtype=torch.float32)
        out["gptq4+mops"] = (attach(q2, MoPsConfig(num_experts=J, prompt_len=L)), qtok)
    for m, _ in out.values():
        m.eval()
    return out


def gen_fn(model, tok, batch_size: int):
    ids = make_prompts(tok, batch_size)

    @torch.no_grad()
    def run():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        if out.shape[1] != PROMPT_LEN + NEW_TOKENS:
            raise RuntimeError(f"generate returned {out.shape[1] - PROMPT_LEN} new tokens, not {NEW_TOKENS}")

    return run


_PROMPTS: dict = {}


def make_prompts(tok, batch_size: int) -> torch.Tensor:
    if batch_size not in _PROMPTS:
        _PROMPTS[batch_size] = common.dolly_windows(tok, batch_size, PROMPT_LEN, seed=1)["input_ids"]
    return _PROMPTS[batch_size]


def measure(reps: int = 3, with_mem: bool = True) -> dict:
    rows = []
    # training step
    batch = make_batch()
    steps = {impl: build(impl, batch)[0] for impl in TRAIN_IMPLS}
    times = common.time_interleaved(steps, reps=reps, warmup=1)
    del steps
    shape = {"model": "smollm2-135m", "dtype": "float32", "B": B, "S": S, "prompt_tokens": J * L}
    for impl in TRAIN_IMPLS:
        mem = peak_memory(impl) if with_mem else None
        rows.append(common.make_row(shape, impl, "step", times[impl], tokens=B * S, peak_mem_bytes=mem))
    # generate
    models = gen_models()
    for bs in GEN_BATCHES:
        fns = {name: gen_fn(m, tok, bs) for name, (m, tok) in models.items()}
        t = common.time_interleaved(fns, reps=reps, warmup=1)
        gshape = {"model": "smollm2-135m", "B": bs, "prompt": PROMPT_LEN, "new_tokens": NEW_TOKENS}
        for name in fns:
            rows.append(common.make_row(gshape, name, "generate", t[name], tokens=bs * NEW_TOKENS))
    tps = {(r["impl"], r["mode"], r["shape"]["B"]): r["tokens_per_s"] for r in rows}
    summary = {"mops_vs_peft_train_tokens_per_s": tps[("mops", "step", B)] / tps[("peft", "step", B)]}
    for bs in GEN_BATCHES:
        summary[f"mops_vs_peft_generate_B{bs}_tokens_per_s"] = tps[("mops", "generate", bs)] / tps[("peft", "generate", bs)]
        if ("gptq4", "generate", bs) in tps:
            summary[f"gptq4_vs_dense_generate_B{bs}_tokens_per_s"] = tps[("gptq4", "generate", bs)] / tps[("dense", "generate", bs)]
    return common.result_doc(
        "e2e_cpu", rows, timing=f"interleaved, median of {reps} after 1 warm-up", baseline_impl="peft",
        gptq_checkpoint=str(GPTQ_FIXTURE) if "gptq4" in models else None, **summary,
        notes="peak_mem_bytes: growth of the peak resident set over one training step in a fresh process. "
              "Generate: greedy, fixed 32 new tokens; MoPs weights random (speed does not depend on them); "
              "gptq4 = GPTQModel-written 4-bit g128 checkpoint in mops_fast QuantLinear layers (fp32 activations).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-memory probes (fresh processes)")
    ap.add_argument("--mem-probe", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.mem_probe:
        print(json.dumps(mem_probe(a.mem_probe)))
        return 0
    doc = measure(a.reps, with_mem=not a.no_mem)
    path = common.write_result(doc, a.out)
    for r in doc["rows"]:
        mem = "" if r["peak_mem_bytes"] is None else f"  peak +{r['peak_mem_bytes'] / 2**20:.0f} MiB"
        print(f"{r['mode']:>8} B={r['shape']['B']} {r['impl']:>10}: {r['median_ms']:9.0f} ms  "
              f"{r['tokens_per_s']:8.1f} tokens/s{mem}")
    for k, v in doc.items():
        if "_vs_" in k:
            print(f"{k} = {v:.3f}")
    print(f"load average {doc['load_average']}; wrote {path}")
    return 0


try:
    import pytest

    @pytest.fixture(scope="module")
    def e2e_models():
        return gen_models()

    @pytest.mark.parametrize("bs", GEN_BATCHES)
    @pytest.mark.parametrize("impl", ["dense", "mops", "peft", "gptq4", "gptq4+mops"])
    def test_generate_cpu(benchmark, e2e_models, impl, bs):
        if impl not in e2e_models:
            pytest.skip(f"no 4-bit checkpoint at {GPTQ_FIXTURE}")
        m, tok = e2e_models[impl]
        benchmark.group = f"generate_cpu B={bs} prompt={PROMPT_LEN} new={NEW_TOKENS}"
        benchmark.extra_info["tokens"] = bs * NEW_TOKENS
        benchmark.pedantic(gen_fn(m, tok, bs), rounds=2, warmup_rounds=1, iterations=1)
except ImportError:
    pass


if __name__ == "__main__":
    sys.exit(main())
