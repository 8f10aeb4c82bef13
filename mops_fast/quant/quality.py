"""Quality of compressed backbones: dolly15k test response perplexity of SmolLM2-135M, dense against GPTQ,
RTN, Wanda, SparseGPT and SparseGPT + GPTQ, each made with the `compress` CLI code path, and GPTQ/RTN
checkpoints with their scales distilled from the dense model (the `refine` code path, from the run it names).

  python -m mops_fast.quant.quality --work-dir runs/compression \
      --out benchmarks/results/compression_quality-cpu.json [--per-category 30] [--only gptq4_g128 ...]
  python -m mops_fast.quant.quality --table --out benchmarks/results/compression_quality-cpu.json

Each compressed model is written to WORK_DIR/<name> (reused when it is already there) and loaded back with
mops_fast.load_model, so the numbers are those of the saved checkpoints. Perplexity is
mops_fast.train.evaluate.evaluate_perplexity (response tokens only, chat-template prompt, max 256 tokens).
The JSON is rewritten after every model, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mops_fast.machine import device_name
from mops_fast.quant.cli import DEFAULTS

ACT = {"bits": 4, "group_size": 128, "sym": False, "desc_act": True}  # the best 4-bit g128 settings found
RUNS = {
    "dense": None,
    "gptq4_g128_asym_act": {"method": "gptq", **ACT},
    "gptq4_g128_asym_act_mse": {"method": "gptq", **ACT, "mse": True},
    "rtn4_g128_asym": {"method": "rtn", "bits": 4, "group_size": 128, "sym": False},
    "gptq4_g128_sym": {"method": "gptq", "bits": 4, "group_size": 128, "sym": True},
    "rtn4_g128_sym": {"method": "rtn", "bits": 4, "group_size": 128, "sym": True},
    "wanda50": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt50": {"method": "sparsegpt", "sparsity": 0.5},
    "sparsegpt50_gptq4": {"method": "sparsegpt", "sparsity": 0.5, "then_gptq": True, **ACT},
    "gptq4_g32_asym_act": {"method": "gptq", **ACT, "group_size": 32},
    "rtn4_g32_asym": {"method": "rtn", "bits": 4, "group_size": 32, "sym": False},  # RTN at the same grid
    # RTN codes with grids and zero points chosen by output error (quant/zero_search.py)
    "rtn4_g32_asym_zs": {"method": "rtn", "bits": 4, "group_size": 32, "sym": False, "zero_search": True},
    "rtn4_g128_asym_zs": {"method": "rtn", "bits": 4, "group_size": 128, "sym": False, "zero_search": True},
    # the checkpoints above with their group scales distilled from the dense model (quant/refine.py)
    "gptq4_g32_asym_act_distill": {"refine_of": "gptq4_g32_asym_act", "refine_steps": 200},
    "gptq4_g128_asym_act_distill": {"refine_of": "gptq4_g128_asym_act", "refine_steps": 200},
    "rtn4_g32_asym_distill": {"refine_of": "rtn4_g32_asym", "refine_steps": 200},
    "sparsegpt50_gptq4_distill": {"refine_of": "sparsegpt50_gptq4", "refine_steps": 200},
    # an outside reference: GPTQModel 7.7's own 4-bit g128 sym checkpoint of the same model
    "gptqmodel_fixture_sym": "../shared/fixtures/gptqmodel-smollm2-135m-4bit-g128-sym",
}


def describe(spec) -> str:
    if spec is None:
        return "dense fp32 (the baseline)"
    if isinstance(spec, str):
        return f"outside checkpoint `{Path(spec).name}`"
    if "refine_of" in spec:
        return f"{describe(RUNS[spec['refine_of']])}, scales distilled ({spec['refine_steps']} steps)"
    parts = [spec["method"].upper() if spec["method"] in ("gptq", "rtn") else spec["method"].capitalize()]
    if spec.get("sparsity"):
        parts.append(f"{spec['sparsity']:.0%} unstructured")
    if spec["method"] in ("gptq", "rtn") or spec.get("then_gptq"):
        if spec.get("then_gptq"):
            parts.append("then GPTQ")
        parts.append(f"{spec.get('bits', 4)}-bit g{spec.get('group_size', 128)} {'sym' if spec.get('sym', True) else 'asym'}")
        if spec.get("desc_act"):
            parts.append("act-order")
        if spec.get("mse"):
            parts.append("clipped range (mse)")
        if spec.get("zero_search"):
            parts.append("zero search")
    return ", ".join(parts)


def markdown_table(result: dict) -> str:
    """One row per measured run: mean and per-category perplexity, change against dense."""
    runs = result["runs"]
    cats = [c for c in next(iter(runs.values()))["ppl"] if c != "mean"]
    short = {c: "".join(w[0] for w in c.split("_")) if "_" in c else c[:5] for c in cats}
    lines = ["| run | settings | mean ppl | vs dense | " + " | ".join(short[c] for c in cats) + " |",
             "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in cats) + " |"]
    for name, e in sorted(runs.items(), key=lambda kv: kv[1]["ppl"]["mean"]):
        d = e.get("mean_ppl_vs_dense")
        lines.append(f"| `{name}` | {describe(e.get('settings'))} | {e['ppl']['mean']:.3f} | "
                     + ("-" if name == "dense" or d is None else f"{100 * d:+.1f}%") + " | "
                     + " | ".join(f"{e['ppl'][c]:.2f}" for c in cats) + " |")
    ev = result["eval"]
    lines += ["", f"{ev['records']} dolly15k test records ({ev['per_category']} per category), response-token "
              f"perplexity, max {ev['max_length']} tokens; {result['device']}, torch {result['torch']}. Columns: "
              + ", ".join(f"{short[c]} = {c}" for c in cats) + "."]
    return "\n".join(lines) + "\n"


def ensure_checkpoint(name: str, args) -> Path:
    """WORK_DIR/<name>, made by the compress (or refine) code path unless it is already there."""
    from mops_fast.quant.cli import compress_with_settings, refine_checkpoint

    spec = RUNS[name]
    path = args.work_dir / name
    if (path / "config.json").is_file():
        return path
    s = dict(DEFAULTS)
    s.update(model=args.model, calib_data=args.calib_data, calib_samples=args.calib_samples,
             calib_seqlen=args.calib_seqlen, out=str(path), threads=args.threads)
    if "refine_of" in spec:
        s.update(refine_steps=spec["refine_steps"])
        refine_checkpoint(ensure_checkpoint(spec["refine_of"], args), path, args.model, s)
        return path
    s.update(spec)
    if s["method"] in ("magnitude", "wanda", "sparsegpt") and s["sparsity"] is None:
        s["sparsity"] = 0.5
    compress_with_settings(s)
    return path


def main(argv=None) -> int:
    from mops_fast.hf.loading import load_model
    from mops_fast.train.data import load_records, per_category
    from mops_fast.train.evaluate import evaluate_perplexity

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work-dir", type=Path, default=Path("runs/compression"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/compression_quality-cpu.json"))
    ap.add_argument("--test-data", default="../shared/data/dolly15k/test.jsonl")
    ap.add_argument("--calib-data", default=DEFAULTS["calib_data"])
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--per-category", type=int, default=None, help="test records per category (default all)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None, choices=list(RUNS))
    ap.add_argument("--table", action="store_true", help="only print the markdown table of the --out JSON")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())), end="")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    records = per_category(load_records(args.test_data), args.per_category, seed=0)
    result = {"benchmark": "compression_quality", "device": device_name("cpu"),
              "torch": torch.__version__, "model": args.model, "data": args.test_data,
              "eval": {"records": len(records), "per_category": args.per_category, "max_length": 256,
                       "metric": "response-token perplexity per category (evaluate_perplexity), mean over "
                                 "categories"},
              "calibration": {"data": args.calib_data, "samples": args.calib_samples, "seq_len": args.calib_seqlen},
              "runs": {}}
    if args.out.is_file():  # keep earlier measurements of runs not repeated now
        old = json.loads(args.out.read_text())
        if old.get("eval") == result["eval"]:
            result["runs"] = old.get("runs", {})
    names = args.only or list(RUNS)
    for name in names:
        spec = RUNS[name]
        entry = {"settings": spec}
        if spec is None:
            path = args.model
        elif isinstance(spec, str):
            path = Path(spec)
            if not path.is_dir():
                print(f"[quality] {name}: {path} is not present, skipped")
                continue
        else:
            path = ensure_checkpoint(name, args)
            info = json.loads((path / "compression.json").read_text())
            entry["compress_seconds"] = info.get("compress_seconds")
            entry["sparsity"] = info.get("sparsity")
            if "refine" in info:
                entry["refine"] = info["refine"]
        t0 = time.time()
        model, tok = load_model(str(path))
        ev = evaluate_perplexity(model, tok, records, batch_size=8, max_length=256)
        entry.update(ppl=ev["ppl"], tokens=ev["tokens"], eval_seconds=round(time.time() - t0, 1))
        result["runs"][name] = entry
        dense = result["runs"].get("dense")
        for e in result["runs"].values():
            if dense is not None:
                e["mean_ppl_vs_dense"] = round(e["ppl"]["mean"] / dense["ppl"]["mean"] - 1, 5)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[quality] {name}: mean ppl {ev['ppl']['mean']:.3f} ({entry['eval_seconds']:.0f}s eval)", flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
