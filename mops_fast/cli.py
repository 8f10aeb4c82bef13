"""The `mops-fast` command: train, eval, generate, compress, refine, federate, experiment."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_train(args) -> int:
    from mops_fast.train.run import load_config, run

    cfg = load_config(args.config)
    if args.name:
        cfg["name"] = args.name
    if args.out_dir:
        cfg["out_dir"] = args.out_dir
    results = run(cfg)
    from mops_fast.train.report import markdown_table

    print()
    print(markdown_table(results))
    return 0


def _cmd_eval(args) -> int:
    from mops_fast.train.run import evaluate_run, load_config

    cfg = load_config(args.config)
    if args.name:
        cfg["name"] = args.name
    print(json.dumps(evaluate_run(cfg), indent=2))
    return 0


def _optional(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"mops-fast {what} is unavailable: {e}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mops-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train and evaluate none/prompt/mops on one backbone (centralized)")
    t.add_argument("--config", required=True, help="YAML or JSON run config (see configs/)")
    t.add_argument("--name", help="run name (default: the config's)")
    t.add_argument("--out-dir", help="parent folder of the run (default: runs/)")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="evaluate the adapters of a finished run")
    e.add_argument("--config", required=True)
    e.add_argument("--name")
    e.set_defaults(fn=_cmd_eval)

    g = sub.add_parser("generate", help="answer JSON Lines requests with saved adapters, several in one batch")
    g.set_defaults(fn=lambda a: _optional("mops_fast.serve", "generate").run_generate(a) or 0,
                   add=("mops_fast.serve", "add_generate_args"))

    c = sub.add_parser("compress", help="GPTQ / RTN quantization or pruning of a backbone")
    c.set_defaults(fn=lambda a: _optional("mops_fast.quant.cli", "compress").run_compress(a) or 0,
                   add=("mops_fast.quant.cli", "add_compress_args"))

    r = sub.add_parser("refine", help="tune a GPTQ checkpoint's scales by distillation from its dense model")
    r.set_defaults(fn=lambda a: _optional("mops_fast.quant.cli", "refine").run_refine(a) or 0,
                   add=("mops_fast.quant.cli", "add_refine_args"))

    f = sub.add_parser("federate", help="federated MoPs (in-process simulation or Flower)")
    f.set_defaults(fn=lambda a: _optional("mops_fast.federated.run", "federate").run_federate(a) or 0,
                   add=("mops_fast.federated.run", "add_federate_args"))

    x = sub.add_parser("experiment", help="the experiment grid and ablations")
    x.set_defaults(fn=lambda a: _optional("mops_fast.experiments", "experiment").run_experiment(a) or 0,
                   add=("mops_fast.experiments", "add_experiment_args"))

    # Subcommands living in optional modules add their own arguments when those modules import.
    import importlib

    for sp in (g, c, r, f, x):
        mod, fn = sp.get_default("add")
        try:
            getattr(importlib.import_module(mod), fn)(sp)
        except (ImportError, AttributeError):
            sp.add_argument("--config", help="(module unavailable in this installation)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"mops-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
