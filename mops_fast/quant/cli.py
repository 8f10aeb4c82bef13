"""`mops-fast compress`: GPTQ / RTN quantization and magnitude / Wanda / SparseGPT pruning of a model.

  mops-fast compress --model smollm2-135m --method gptq --bits 4 --group-size 128 --out runs/smollm2-gptq4
  mops-fast compress --method sparsegpt --sparsity 0.5 --then-gptq --out runs/smollm2-sp50-gptq4
  mops-fast compress --config my_compress.yaml           (same keys as the options; options given win)

Writes a model directory that `mops_fast.load_model(DIR)` reads: a standard GPTQ checkpoint for
quantization, an ordinary safetensors checkpoint for pruning alone. Also runnable as
`python -m mops_fast.quant.cli compress ...`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mops_fast.quant.compress import METHODS, PRUNE_METHODS

DEFAULTS = {
    "model": "smollm2-135m",
    "method": "gptq",
    "bits": 4,
    "group_size": 128,
    "sym": True,
    "desc_act": False,
    "damp_percent": 0.01,
    "static_groups": False,
    "true_sequential": True,
    "block_size": 128,
    "mse": False,
    "zero_search": False,
    "sparsity": None,
    "nm": None,
    "then_gptq": False,
    "calib_data": "../shared/data/dolly15k/train.jsonl",
    "calib_samples": 128,
    "calib_seqlen": 256,
    "seed": 0,
    "batch_size": 8,
    "refine_steps": 0,
    "refine_lr": 1e-3,
    "refine_batch": 4,
    "refine_samples": 512,
    "format": "gptq",
    "dtype": "float16",
    "threads": None,
    "out": None,
}
REFINE_STEPS = 200  # the default of `refine` (under compress refinement is off unless asked for)


def add_compress_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `compress`. Every default is None here, so that run_compress can tell options given on
    the command line (which win) from those left to the --config file or the built-in defaults."""
    d = DEFAULTS
    p.add_argument("--config", default=None, help="YAML file with the same keys as these options")
    p.add_argument("--model", default=None, help=f"model name or directory (default {d['model']})")
    p.add_argument("--method", default=None, choices=METHODS, help=f"compression method (default {d['method']})")
    p.add_argument("--bits", type=int, default=None, help="bits per weight: 2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=None, help="inputs per quantization group; -1 = one "
                   "group per row (default 128)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_const", const=True, default=None,
                   help="symmetric grid, zero point 2**(bits-1) (default)")
    g.add_argument("--asym", dest="sym", action="store_const", const=False, help="asymmetric grid")
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=None,
                   help="act-order: quantize inputs by decreasing Hessian diagonal (default off)")
    p.add_argument("--damp-percent", type=float, default=None, help="Hessian damping, fraction of the mean "
                   "diagonal (default 0.01)")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="fix group grids before GPTQ updates (default off)")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrate each sub-layer group on the already compressed earlier ones (default on)")
    p.add_argument("--block-size", type=int, default=None, help="GPTQ/SparseGPT column block (default 128)")
    p.add_argument("--mse", action=argparse.BooleanOptionalAction, default=None,
                   help="per group, search a clipped range that lowers the rounding error (default off)")
    p.add_argument("--zero-search", action=argparse.BooleanOptionalAction, default=None,
                   help="rtn --asym only: choose each group's grid and integer zero point to minimize the layer's "
                        "output error on the calibration data (default off; see mops_fast/quant/zero_search.py)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of weights pruned (default 0.5)")
    p.add_argument("--nm", default=None, help="N:M structured sparsity, e.g. 2:4 (keep N of every M)")
    p.add_argument("--then-gptq", action=argparse.BooleanOptionalAction, default=None,
                   help="after pruning each layer, GPTQ-quantize it (pruned weights stay zero)")
    p.add_argument("--calib-data", default=None, help=f"JSON Lines records (default {d['calib_data']})")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="tokens per window (default 256)")
    p.add_argument("--seed", type=int, default=None, help="calibration sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per calibration forward (default 8)")
    add_refine_options(p, prefix="refine-")
    p.add_argument("--format", default=None, choices=("gptq", "gptq_v2"),
                   help="checkpoint zero-point convention (default gptq: zeros stored minus one)")
    p.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                   help="dtype of the saved non-quantized tensors (default float16)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's "
                   "choice; 1 is faster on a busy machine)")
    p.add_argument("--out", default=None, help="output model directory (required)")
    return p


def add_refine_options(p: argparse.ArgumentParser, prefix: str) -> None:
    """Options of the scale refinement (quant/refine.py), as --refine-* under compress and bare under refine."""
    d = DEFAULTS
    p.add_argument(f"--{prefix}steps", type=int, default=None,
                   help="steps of tuning the group scales by distillation from the dense model (compress: default "
                        f"{d['refine_steps']} = off; refine: default {REFINE_STEPS}, the setting of the SmolLM2 "
                        "results in docs/compression.md)")
    p.add_argument(f"--{prefix}lr", type=float, default=None, help=f"refinement learning rate (default {d['refine_lr']})")
    p.add_argument(f"--{prefix}batch", type=int, default=None,
                   help=f"calibration windows per refinement step (default {d['refine_batch']})")
    p.add_argument(f"--{prefix}samples", type=int, default=None,
                   help=f"calibration windows drawn for refinement, a tenth held out (default {d['refine_samples']})")


def _read_yaml(path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {p} does not exist")
    with open(p) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of option names to values")
    if isinstance(data.get("compress"), dict):  # a shared config file may nest the section
        data = data["compress"]
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key not in DEFAULTS:
            raise ValueError(f"{p}: unknown key {k!r}; compress takes {sorted(DEFAULTS)}")
        out[key] = v
    return out


def resolve_settings(args: argparse.Namespace) -> dict:
    """Built-in defaults < --config file < options given on the command line; then validated."""
    s = dict(DEFAULTS)
    if getattr(args, "config", None):
        s.update(_read_yaml(args.config))
    for k in DEFAULTS:
        v = getattr(args, k, None)
        if v is not None:
            s[k] = v
    if s["method"] not in METHODS:
        raise ValueError(f"method {s['method']!r} is unknown; choose one of {METHODS}")
    if not s["out"]:
        raise ValueError("compress needs --out DIR (where the compressed model is written)")
    pruning = s["method"] in PRUNE_METHODS
    if not pruning and (s["sparsity"] is not None or s["nm"] or s["then_gptq"]):
        raise ValueError(f"--sparsity, --nm and --then-gptq apply to pruning methods {PRUNE_METHODS}, not "
                         f"{s['method']!r}")
    if pruning:
        from mops_fast.quant.prune import parse_nm

        nm = parse_nm(s["nm"])
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if s["sparsity"] is not None and abs(float(s["sparsity"]) - implied) > 1e-9:
                raise ValueError(f"--sparsity {s['sparsity']} contradicts --nm {s['nm']} (which prunes {implied:g})")
            s["sparsity"] = implied
        elif s["sparsity"] is None:
            s["sparsity"] = 0.5
    if int(s["refine_steps"]) and pruning and not s["then_gptq"]:
        raise ValueError("--refine-steps tunes quantization scales: use it with gptq, rtn or --then-gptq, not with "
                         f"{s['method']!r} alone")
    refine_settings(s)  # range checks before any work
    return s


def refine_settings(s: dict):
    from mops_fast.quant.refine import RefineSettings

    return RefineSettings(steps=int(s["refine_steps"]), lr=float(s["refine_lr"]), batch_size=int(s["refine_batch"]),
                          samples=int(s["refine_samples"]), seed=int(s["seed"])).validate()


def refine_model(model, tok, dense, s: dict) -> dict:
    """Distill the dense model `dense` (a name or directory) into the scales of `model` (QuantLinear layers) on windows of
    the calibration data drawn with seed + 1 (not GPTQ's windows). Returns refine_scales' summary."""
    from mops_fast.hf.loading import load_model
    from mops_fast.quant.calibration import calibration_windows
    from mops_fast.quant.refine import refine_scales

    rs = refine_settings(s)
    teacher, _ = load_model(str(dense), dtype=torch.float32)
    windows = calibration_windows(tok, s["calib_data"], rs.samples, int(s["calib_seqlen"]), int(s["seed"]) + 1)
    print(f"[refine] {rs.steps} steps on {windows.shape[0]} windows x {windows.shape[1]} tokens from {s['calib_data']}")
    result = refine_scales(model, teacher, windows, rs)
    del teacher
    return result


def run_compress(args: argparse.Namespace) -> int:
    """Run `compress` with parsed options (the `mops-fast compress` entry); returns the exit status 0."""
    compress_with_settings(resolve_settings(args))
    return 0


def compress_with_settings(s: dict) -> Path:
    """Compress as `s` (resolved settings, see resolve_settings) says; returns the output directory."""
    from mops_fast.hf.loading import load_model, resolve_model_path
    from mops_fast.quant.calibration import calibration_windows
    from mops_fast.quant.checkpoint import make_quant_config, save_dense, save_quantized
    from mops_fast.quant.compress import (
        QuantSettings,
        prune_model,
        quantize_model,
        replace_with_quant_linear,
        sparsity_report,
    )

    if s["threads"]:
        torch.set_num_threads(int(s["threads"]))
    t0 = time.time()
    src = resolve_model_path(str(s["model"]))
    with open(src / "config.json") as f:
        if "quantization_config" in json.load(f):
            raise ValueError(f"{src} is already quantized; compress a dense model")
    model, tok = load_model(str(s["model"]), dtype=torch.float32)
    qs = QuantSettings(bits=int(s["bits"]), group_size=int(s["group_size"]), sym=bool(s["sym"]),
                       desc_act=bool(s["desc_act"]), damp_percent=float(s["damp_percent"]),
                       static_groups=bool(s["static_groups"]), true_sequential=bool(s["true_sequential"]),
                       block_size=int(s["block_size"]), mse=bool(s["mse"]),
                       zero_search=bool(s["zero_search"])).validate()
    method = s["method"]
    quantizing = method in ("gptq", "rtn") or bool(s["then_gptq"])
    needs_calib = method in ("gptq", "wanda", "sparsegpt") or bool(s["then_gptq"]) or qs.zero_search
    calib = None
    if needs_calib:
        calib = calibration_windows(tok, s["calib_data"], int(s["calib_samples"]), int(s["calib_seqlen"]),
                                    int(s["seed"]))
        print(f"[compress] calibration: {calib.shape[0]} windows x {calib.shape[1]} tokens from {s['calib_data']}")
    t1 = time.time()
    if method in ("gptq", "rtn"):
        quants = quantize_model(model, calib, method, qs, batch_size=int(s["batch_size"]))
    else:
        _, quants = prune_model(model, calib, method, float(s["sparsity"]), s["nm"],
                                then_gptq=qs if s["then_gptq"] else None, damp_percent=qs.damp_percent,
                                block_size=qs.block_size, true_sequential=qs.true_sequential,
                                batch_size=int(s["batch_size"]))
    t_compress = time.time() - t1
    summary = {"settings": {k: v for k, v in s.items() if k != "out"}, "source": str(src),
               "compress_seconds": round(t_compress, 1)}
    if method in PRUNE_METHODS:
        summary["sparsity"] = round(sparsity_report(model)["overall"], 6)
    out = Path(s["out"])
    if quantizing:
        algorithm = f"{method}+gptq" if s["then_gptq"] else (f"{method}+zero_search" if qs.zero_search else method)
        replace_with_quant_linear(model, quants)
        if int(s["refine_steps"]):
            summary["refine"] = refine_model(model, tok, src, s)
            algorithm += "+scale_distill"
        qcfg = make_quant_config(qs.bits, qs.group_size, qs.sym, qs.desc_act, s["format"], qs.damp_percent,
                                 qs.true_sequential, qs.static_groups, algorithm=algorithm, mse=qs.mse)
        save_quantized(model, out, qcfg, tokenizer=tok, source_dir=src, dtype=s["dtype"])
    else:
        save_dense(model, out, tokenizer=tok, source_dir=src, dtype=s["dtype"],
                   compression={"method": method, "sparsity": s["sparsity"], "nm": s["nm"]})
    summary["total_seconds"] = round(time.time() - t0, 1)
    with open(out / "compression.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[compress] {method} done in {t_compress:.0f}s (total {summary['total_seconds']:.0f}s) -> {out}")
    return out


def add_refine_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `refine`: scale refinement of an existing GPTQ checkpoint."""
    d = DEFAULTS
    p.add_argument("--model", required=True, help="GPTQ checkpoint directory to refine (written by compress or "
                   "any GPTQ tool)")
    p.add_argument("--dense", default=None, help="the dense model the checkpoint was made from (default: the "
                   "source recorded in its compression.json)")
    add_refine_options(p, prefix="")
    p.add_argument("--calib-data", default=None, help=f"JSON Lines records (default {d['calib_data']})")
    p.add_argument("--calib-seqlen", type=int, default=None, help="tokens per window (default 256)")
    p.add_argument("--seed", type=int, default=None, help="window sampling seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", required=True, help="output directory of the refined checkpoint")
    return p


def run_refine(args: argparse.Namespace) -> int:
    """The `mops-fast refine` entry."""
    s = dict(DEFAULTS, refine_steps=REFINE_STEPS)
    for key, opt in (("refine_steps", "steps"), ("refine_lr", "lr"), ("refine_batch", "batch"),
                     ("refine_samples", "samples"), ("calib_data", "calib_data"), ("calib_seqlen", "calib_seqlen"),
                     ("seed", "seed"), ("threads", "threads")):
        if getattr(args, opt, None) is not None:
            s[key] = getattr(args, opt)
    refine_checkpoint(args.model, args.out, args.dense, s)
    return 0


def refine_checkpoint(model_dir, out, dense, s: dict) -> Path:
    """Refine the scales of the GPTQ checkpoint at `model_dir` against `dense` and write it to `out`."""
    from mops_fast.hf.loading import load_model, resolve_model_path
    from mops_fast.quant.checkpoint import parse_quant_config, save_quantized

    if int(s["refine_steps"]) < 1:
        raise ValueError(f"refine needs --steps >= 1, got {s['refine_steps']}")
    refine_settings(s)
    if s["threads"]:
        torch.set_num_threads(int(s["threads"]))
    src = resolve_model_path(str(model_dir))
    cfg = json.loads((src / "config.json").read_text())
    qcfg = cfg.get("quantization_config")
    if qcfg is None:
        raise ValueError(f"{src} is not quantized (config.json has no quantization_config); refine tunes the scales "
                         "of a GPTQ checkpoint: run `mops-fast compress --method gptq` first")
    parse_quant_config(qcfg, f"{src}/config.json quantization_config")
    info_path = src / "compression.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if dense is None:
        dense = info.get("source")
        if not dense:
            raise ValueError(f"{src} records no dense source (no compression.json); pass --dense MODEL, the model "
                             "it was quantized from")
    if Path(out).resolve() == src.resolve():
        raise ValueError(f"--out {out} is the input checkpoint; write the refined model to a new directory")
    t0 = time.time()
    model, tok = load_model(str(src), dtype=torch.float32)
    result = refine_model(model, tok, dense, s)
    qcfg = json.loads(json.dumps(qcfg))
    meta = qcfg.setdefault("meta", {})
    meta["algorithm"] = f"{meta.get('algorithm', 'gptq')}+scale_distill"
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float16"
    out = save_quantized(model, out, qcfg, tokenizer=tok, source_dir=src, dtype=dtype)
    info.update(refine=result, refined_from=str(src), source=str(dense), total_seconds=round(time.time() - t0, 1))
    (out / "compression.json").write_text(json.dumps(info, indent=2))
    print(f"[refine] done in {time.time() - t0:.0f}s -> {out}")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mops-fast")
    sub = parser.add_subparsers(dest="command", required=True)
    add_compress_args(sub.add_parser("compress", help="quantize or prune a model"))
    r = sub.add_parser("refine", help="tune a GPTQ checkpoint's scales by distillation from its dense model")
    add_refine_args(r)
    args = parser.parse_args(argv)
    run_refine(args) if args.command == "refine" else run_compress(args)


if __name__ == "__main__":
    main()
