"""Read a tune_int4 JSON (benchmarks/tune_int4_gpu.py --small-native) and say what it decides, by the rules
of docs/gpu_session.md, so that a GPU session spends its minutes running, not reading 200 rows.

  python benchmarks/decide_int4.py benchmarks/results/tune_int4-<gpu>.json

Prints, per small-M shape: fp16 matmul's time, the current default's (`steps=0`) speedup over it, and each
small-M CUDA variant's time relative to the default (below 1 is faster), forward and backward; the
read-only floor (`read[...]` rows) in TB/s beside the best forward's rate over the same weight bytes, and
the fixed cost of a graph node (mode "floor" rows: each kernel on a 34 KB weight). Then
one line per question: the fastest forward variant per M where it beats the default by more than `--margin`
on every shape, whether the tiled order and PDL win (median ratio over the shapes and variants they were
timed with), and the backward's best variant; last, all of it as the dispatch's settings (steps per M
bracket, M <= 8 and M > 8, as the kernels' defaults split), which `--env FILE` writes as shell exports.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NATIVE = re.compile(r"native\[steps=(-?\d+)(?:,warps=(\d+))?(?:,gs=(\d+))?((?:,\w+)*)\]")
GROUP = 128
MAX_REL_ERR = 2e-2  # tune_int4_gpu.py flags a row BAD above this error against the fp32 product


def parse_native(impl: str) -> dict | None:
    """native[steps=S,warps=W,gs=G,tiled,pdl] -> {"steps", "warps", "gs", "tiled", "pdl"}; None otherwise."""
    m = NATIVE.fullmatch(impl)
    if not m:
        return None
    flags = set(filter(None, m.group(4).split(",")))
    return {"steps": int(m.group(1)), "warps": int(m.group(2) or 0), "gs": int(m.group(3) or GROUP),
            "tiled": "tiled" in flags, "pdl": "pdl" in flags}


def variant_name(v: dict) -> str:
    return (f"steps={v['steps']}" + (f",warps={v['warps']}" if v["warps"] else "") + (",tiled" if v["tiled"] else "")
            + (",pdl" if v["pdl"] else ""))


def weight_bytes(K: int, N: int) -> int:
    """qweight, fp16 scales and packed zeros of a group-128 weight: what a small-M forward must read."""
    G = -(-K // GROUP)
    return K // 8 * N * 4 + G * N * 2 + G * N // 8 * 4


def collect(rows: list[dict]):
    """{(K, N, M): {"fp16": {mode: ms}, "native": {mode: {variant name: (variant, ms)}}}}, the read floors
    {(K, N): {impl: TB/s}}, the graph-node floors {impl: ms}, and the rows left out for wrong results."""
    table, floors, node, wrong = {}, {}, {}, []
    for r in rows:
        s = r["shape"]
        if r["mode"] == "floor":
            node[r["impl"]] = r["median_ms"]
            continue
        if r["mode"] == "read":
            floors.setdefault((s["K"], s["N"]), {})[r["impl"]] = r.get("tb_per_s") or 0.0
            continue
        cell = table.setdefault((s["K"], s["N"], s["M"]), {"fp16": {}, "native": {"fwd": {}, "bwd": {}}})
        if r["impl"] == "fp16":
            cell["fp16"][r["mode"]] = r["median_ms"]
            continue
        v = parse_native(r["impl"])
        if v is None or v["gs"] != GROUP or r["mode"] not in ("fwd", "bwd"):
            continue  # other kernels and the table path (gs=0) answer other questions
        if not r.get("rel_err_vs_fp32", 0.0) <= MAX_REL_ERR:  # NaN too: a wrong kernel is never a winner
            wrong.append(f"{r['mode']} {r['impl']} M={s['M']} {s['K']}x{s['N']}: rel err {r.get('rel_err_vs_fp32')}")
            continue
        cell["native"][r["mode"]][variant_name(v)] = (v, r["median_ms"])
    return table, floors, node, wrong


def analyze(rows: list[dict]) -> dict:
    """The comparisons the verdicts rest on: per-shape lines, {mode: {M: [{variant: time / default's}]}} over
    plain variants (no tiled, no pdl), and the tiled / PDL pairs' time ratios."""
    table, floors, node, wrong = collect(rows)
    lines, by_m = [], {"fwd": {}, "bwd": {}}
    tiled_gain, pdl_gain = [], {"fwd": [], "bwd": []}
    for (K, N, M), cell in sorted(table.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        for mode in ("fwd", "bwd"):
            nat, fp16 = cell["native"][mode], cell["fp16"].get(mode)
            if "steps=0" not in nat or fp16 is None:
                continue
            base = nat["steps=0"][1]
            rel = {name: ms / base for name, (_, ms) in nat.items()}
            best = min(nat, key=lambda n: nat[n][1])
            line = (f"{mode} M={M:<2d} {K}x{N}: fp16 {fp16 * 1e3:6.1f} us, default {base * 1e3:6.1f} us "
                    f"= {fp16 / base:4.2f}x fp16; best {best} {nat[best][1] * 1e3:6.1f} us = "
                    f"{fp16 / nat[best][1]:4.2f}x fp16")
            if mode == "fwd":
                line += f", {weight_bytes(K, N) / (nat[best][1] * 1e-3) / 1e12:.2f} TB/s"
            lines.append(line)
            lines.append("    " + "  ".join(f"{n} {r:.3f}" for n, r in sorted(rel.items(), key=lambda kv: kv[1])))
            for name, (v, ms) in nat.items():
                if v["tiled"] and variant_name({**v, "tiled": False}) in nat:
                    tiled_gain.append(ms / nat[variant_name({**v, "tiled": False})][1])
                if v["pdl"] and variant_name({**v, "pdl": False}) in nat:
                    pdl_gain[mode].append(ms / nat[variant_name({**v, "pdl": False})][1])
            # the steps verdicts weigh the kernels' own launches (forced warps are for comparison only)
            by_m[mode].setdefault(M, []).append(
                {n: r for n, r in rel.items() if not (nat[n][0]["tiled"] or nat[n][0]["pdl"] or nat[n][0]["warps"])})
    return {"floors": floors, "node": node, "lines": lines, "by_m": by_m, "tiled": tiled_gain, "pdl": pdl_gain,
            "wrong": wrong}


def winner(shapes: list[dict], margin: float) -> tuple[float, str] | None:
    """(worst ratio, variant) of the variant faster than the default by more than margin on every shape (the
    best such by its worst ratio), or None."""
    if not shapes:
        return None
    names = set.intersection(*(set(s) for s in shapes)) - {"steps=0"}
    wins = [(max(s[n] for s in shapes), n) for n in names if all(s[n] < 1 - margin for s in shapes)]
    return min(wins) if wins else None


def decide(an: dict, margin: float) -> dict:
    """What the dispatch should run: steps per M bracket (M <= 8, M > 8) forward and backward, PDL on or off,
    the CUDA weight order; as the environment variables that make it so (mops_fast/ops/int4_matmul.py)."""
    from mops_fast.ops.int4_matmul import SMALL_M_STEPS

    env = {}
    for mode, var in (("fwd", "MOPS_FAST_INT4_FWD_STEPS"), ("bwd", "MOPS_FAST_INT4_BWD_STEPS")):
        steps = []
        for small in (True, False):
            # only variants the dispatch can name (older files hold dropped ones)
            shapes = [{n: r for n, r in s.items() if int(n.split("=")[1]) in SMALL_M_STEPS[mode]}
                      for M, ss in an["by_m"][mode].items() if (M <= 8) == small for s in ss]
            w = winner(shapes, margin)
            steps.append(int(w[1].split("=")[1]) if w else 0)
        env[var] = f"{steps[0]},{steps[1]}"
    gains = an["pdl"]["fwd"] + an["pdl"]["bwd"]
    env["MOPS_FAST_INT4_PDL"] = "1" if gains and statistics.median(gains) < 1 - margin else "0"
    tiled = an["tiled"] and statistics.median(an["tiled"]) < 1 - margin
    env["MOPS_FAST_INT4_CUDA_ORDER"] = "tiled" if tiled else "gptq"
    return env


def report(rows: list[dict], margin: float = 0.02) -> list[str]:
    an = analyze(rows)
    out = []
    if an["node"]:
        out.append("graph-node floor (34 KB weight): "
                   + ", ".join(f"{k} {v * 1e3:.2f} us" for k, v in an["node"].items()))
    for (K, N), fl in sorted(an["floors"].items()):
        out.append(f"read floor {K}x{N}: " + ", ".join(f"{k} {v:.2f} TB/s" for k, v in sorted(fl.items())))
    out += [f"WRONG RESULTS, left out: {w}" for w in an["wrong"]]
    out += an["lines"] + [""]
    for mode, what in (("fwd", "forward"), ("bwd", "backward")):
        for M, shapes in sorted(an["by_m"][mode].items()):
            w = winner(shapes, margin)
            out.append(f"{what} M={M}: {w[1]} beats the default on all {len(shapes)} shapes (worst ratio "
                       f"{w[0]:.3f}) -> make it the default there" if w else
                       f"{what} M={M}: the default stays (no variant faster by {margin:.0%} on every shape)")
    if an["tiled"]:
        g = statistics.median(an["tiled"])
        out.append(f"tiled order: median {g:.3f} of the GPTQ order's time over {len(an['tiled'])} pairs -> "
                   + ("make it the default of cuda_weight_order()" if g < 1 - margin else "keep GPTQ order"))
    for mode in ("fwd", "bwd"):
        if an["pdl"][mode]:
            g = statistics.median(an["pdl"][mode])
            out.append(f"pdl {mode}: median {g:.3f} of the time without over {len(an['pdl'][mode])} pairs -> "
                       + ("turn _pdl_enabled() on by default" if g < 1 - margin else "leave it opt-in"))
    out.append("as settings (M <= 8, M > 8): " + " ".join(f"{k}={v}" for k, v in decide(an, margin).items()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--margin", type=float, default=0.02, help="a win must be faster by this fraction")
    ap.add_argument("--env", type=Path, default=None, help="also write the decisions as shell exports here "
                    "(run_gpu.sh's bench_int4_decided step sources them)")
    args = ap.parse_args(argv)
    doc = json.loads(args.json.read_text())
    print(f"{args.json.name}: {doc.get('device', '?')}, torch {doc.get('torch')}, {len(doc['rows'])} rows")
    print("\n".join(report(doc["rows"], args.margin)))
    if args.env:
        env = decide(analyze(doc["rows"]), args.margin)
        args.env.write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
