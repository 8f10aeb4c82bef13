"""`mops-fast federate`: the federated comparison of `none`, `prompt` and `mops` (and `lora`, the outside
reference, where named) under one partition.

    mops-fast federate --config configs/dolly_federated.yaml           # in-process simulation (default)
    mops-fast federate --config ... --write-flower-app DIR              # the same run as a Flower App
    mops-fast federate --config ... --flower-loopback                   # through Flower on this machine

Writes under runs/<name>/: partition.{md,csv,json,png}, results.json (DESIGN.md §6, "setting":
"federated"), results.md, ppl_per_round.png, and per method a round checkpoint (resumable) and the final
adapter. Killing the command and starting it again continues from the last finished round.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mops_fast.config import METHODS, lr_candidates
from mops_fast.federated.config import load_federated_config, resolve_path, validate_config
from mops_fast.federated.context import FedContext
from mops_fast.federated.partition import write_summary
from mops_fast.federated.simulation import FederatedRun, atomic_write_text
from mops_fast.machine import machine_record
from mops_fast.train.report import history_curve, ppl_table_lines, reduction, reduction_lines


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


def markdown_table(results: dict) -> str:
    p = results["partition"]
    f = results["federated"]
    part = ", ".join(f"{k}={p[k]}" for k in ("scheme", "num_clients", "alpha", "k", "mix") if k in p)
    lines = [
        f"**{results['model']}** on **{results['data']}**, federated ({part}), compression "
        f"{results['compression']}, seed {results['seed']}",
        "",
        f"{f['rounds']} rounds x {f['clients_per_round']} clients x {f['local_steps']} local steps "
        f"(batch {results.get('batch_size')}), strategy {f['strategy']['name']}; mops gate pretraining: "
        f"{f['gate_rounds']} rounds x {f['gate_local_steps']} local steps. Test: {results['eval']['test_records']} records.",
        "",
        *ppl_table_lines(results),
    ]
    lines += reduction_lines(results)
    return "\n".join(lines) + "\n"


def _cached_eval(ctx: FedContext, records, path: Path) -> dict:
    """Evaluate the plain backbone once per run (kept on disk, so a resumed run does not redo it)."""
    if path.is_file():
        return json.loads(path.read_text())
    res = ctx.evaluate(records)["ppl"]
    atomic_write_text(path, json.dumps(res))
    return res


def federate(cfg: dict, out_dir: str | Path | None = None, make_dispatcher=None, log=_log) -> dict:
    """Run every method of a validated config. `make_dispatcher(ctx)` picks the transport (default: in-process)."""
    ctx = FedContext(cfg)
    out = Path(out_dir) if out_dir else Path(cfg.get("out_dir", "runs")) / ctx.name
    out.mkdir(parents=True, exist_ok=True)
    dispatcher = make_dispatcher(ctx) if make_dispatcher else None
    if hasattr(dispatcher, "prepare"):
        dispatcher.prepare()  # e.g. wait for the SuperNodes, outside any round's timing
    fed = ctx.fed
    desc = write_summary(ctx.train, ctx.parts, fed.partition, out)
    log(f"[{ctx.name}] {len(ctx.train)} training records in {fed.partition.num_clients} clients "
        f"({fed.partition.scheme}); sizes {desc['sizes']}; table in {out / 'partition.md'}")
    results = {
        "model": cfg.get("model", "smollm2-135m"), "data": cfg["data"].get("name", Path(cfg["data"]["train"]).parent.name),
        "setting": "federated", "compression": cfg.get("compression", "dense"),
        # optimizer steps of all clients together (the compute a centralized run of `steps` would spend)
        "steps": fed.rounds * fed.clients_per_round * fed.local_steps, "seed": ctx.seed, "methods": {},
        "partition": desc, "federated": fed.to_dict(), "batch_size": ctx.train_cfg.get("batch_size", 4),
        "local_steps_per_client_round": fed.local_steps,
        "transport": getattr(dispatcher, "name", "simulation"),
        "machine": machine_record(str(next(ctx.model.parameters()).device)),
        "eval": {"test_records": len(ctx.test), "round_test_records": len(ctx.round_test),
                 "categories": ctx.categories},
        "mops_config": ctx.mops_cfg.to_dict(),
    }
    curves, flat = {}, {}
    ls = cfg.get("lr_search") or {}
    for method in cfg["methods"]:
        t0 = time.perf_counter()
        if method == "none":
            ppl = _cached_eval(ctx, ctx.test, out / "none" / "ppl.json")
            results["methods"]["none"] = {"ppl": ppl, "train_tokens_per_s": None}
            if ctx.round_test is not ctx.test:
                flat["none"] = _cached_eval(ctx, ctx.round_test, out / "none" / "ppl_round_subset.json")["mean"]
            else:
                flat["none"] = ppl["mean"]
            log(f"[{ctx.name}] none: mean test ppl {ppl['mean']:.3f}")
            continue
        lr, search = None, None
        if ls and method in ls.get("methods", ["prompt", "mops"]):
            search = {}
            for cand in lr_candidates(ls, method) or []:
                r = FederatedRun(ctx, method, dispatcher, out / "lr_search" / f"{method}-lr{float(cand):g}",
                                 lr=float(cand), rounds=int(ls.get("rounds", 1)), eval_records=ctx.heldout,
                                 round_eval_records=[], log=log, stage_a_dir=out / "stage_a").run()
                search[f"{float(cand):g}"] = r["ppl"]["mean"]
                log(f"[{ctx.name}] lr search {method}: lr={float(cand):g} held-out mean ppl {r['ppl']['mean']:.3f}")
            lr = float(min(search, key=search.get))
        r = FederatedRun(ctx, method, dispatcher, out / method, lr=lr, log=log, stage_a_dir=out / "stage_a").run()
        entry = {k: r[k] for k in ("ppl", "train_tokens_per_s", "lr", "rounds", "gate_rounds")}
        entry.update({k: r[k] for k in ("gate_effective_experts", "gate_max_weight") if k in r})  # gated mops only
        entry["wall_s"] = time.perf_counter() - t0
        entry["history"] = [{k: v for k, v in h.items() if k != "client_metrics"} for h in r["history"]]
        if search:
            entry["lr_search"] = search
        results["methods"][method] = entry
        curves[method] = history_curve(r["history"], "round")
    r = reduction(results)
    if r is not None:
        results["mops_vs_prompt_reduction"] = r
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "results.md", markdown_table(results))
    if curves:
        from mops_fast.federated.plots import ppl_per_round

        p = desc
        ppl_per_round(curves, out / "ppl_per_round.png", flat=flat,
                      title=f"{results['model']} / {results['data']} / federated {p['scheme']} "
                            f"C={p['num_clients']}" + (f" alpha={p['alpha']}" if "alpha" in p else "")
                            + f" ({len(ctx.round_test)} test records)")
    log(f"[{ctx.name}] results in {out}")
    return results


def add_federate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="federated run config (YAML/JSON), e.g. configs/dolly_federated.yaml")
    parser.add_argument("--name", help="run name (default: the config's)")
    parser.add_argument("--out-dir", help="parent folder of the run (default: the config's out_dir or runs/)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="override the config's methods")
    parser.add_argument("--write-flower-app", metavar="DIR",
                        help="instead of simulating, write a Flower App for this run to DIR (see docs/federated.md)")
    parser.add_argument("--flower-loopback", action="store_true",
                        help="run through Flower on this machine: a SuperLink and one SuperNode per client on "
                             "loopback, then the round-time split (local training / aggregation / transport)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="--flower-loopback: give up after this long")
    return parser


def run_federate(args) -> int:
    cfg = load_federated_config(args.config)
    if getattr(args, "name", None):
        cfg["name"] = args.name
    if getattr(args, "out_dir", None):
        cfg["out_dir"] = args.out_dir
    if getattr(args, "methods", None):
        cfg["methods"] = list(args.methods)
    cfg = validate_config(cfg)
    # Absolute paths: the config may travel to other processes and machines (Flower).
    for k in ("train", "test"):
        cfg["data"][k] = str(Path(resolve_path(cfg["data"][k])).resolve())
    out = Path(cfg.get("out_dir", "runs")).resolve() / cfg.get("name", "federated")
    if getattr(args, "write_flower_app", None):
        from mops_fast.federated.flower_app import write_flower_app

        app = write_flower_app(args.write_flower_app, cfg, out)
        print(f"Flower App written to {app}; run it with `flwr run {app} <superlink-connection>` "
              "(docs/federated.md shows the SuperLink and SuperNode commands)")
        return 0
    if getattr(args, "flower_loopback", False):
        from mops_fast.federated.loopback import round_split_table, run_loopback

        path = run_loopback(cfg, out, out / "flower", timeout_s=args.timeout_s, log=_log)
        results = json.loads(path.read_text())
        split = round_split_table(results)
        atomic_write_text(out / "round_split.md", split)
        print()
        print(markdown_table(results))
        print("Where each Flower round's time went (seconds; clients of a round train in parallel):\n")
        print(split)
        return 0
    results = federate(cfg, out)
    print()
    print(markdown_table(results))
    return 0


def main(argv=None) -> int:
    p = add_federate_args(argparse.ArgumentParser(prog="mops-fast federate", description=__doc__,
                                                  formatter_class=argparse.RawDescriptionHelpFormatter))
    return run_federate(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
