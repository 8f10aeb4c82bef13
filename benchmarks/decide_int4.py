"""Read a tune_int4 JSON (benchmarks/tune_int4_gpu.py --small-native) and say what it decides, by the rules
of docs/gpu_session.md, so that a GPU session spends its minutes running, not reading 200 rows.

  python benchmarks/decide_int4.py benchmarks/results/tune_int4-<gpu>.json

Prints, per small-M shape: fp16 matmul's time, the dispatch default's speedup over it, and each small-M CUDA
variant's time relative to that default (below 1 is faster), forward and backward; the read-only floor
(`read[...]` rows) in TB/s beside the best forward's rate over the same weight bytes, and the fixed cost of
a graph node (mode "floor" rows: each kernel on a 34 KB weight). Then one line per question: per M, the
forward steps variant, K split and L2 prefetch distance that beat the default by more than `--margin` on every shape, and
whether PDL wins (median ratio over the pairs timed with and without it); last, all of it as the dispatch's
settings per M bracket (M <= 8 and M > 8, as the kernels' defaults split), which `--env FILE` writes as
shell exports (mops_fast/ops/int4_matmul.py: SMALL_M_KNOBS, _pdl_enabled).

The default a variant is measured against is the dispatch's launch: `steps=0` with `pdl` where the file has
PDL rows (PDL is on by default since 2026-11-28), else `steps=0`. Files from the H200 run of 2026-11-28 (and earlier) name
variants dropped since (streamed steps 32-38, the tiled order); they are reported, never chosen.
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

NATIVE = re.compile(r"native\[steps=(-?\d+)(?:,warps=(\d+))?(?:,ksplit=(\d+))?(?:,prefetch=(\d+))?(?:,gs=(\d+))?"
                    r"((?:,\w+)*)\]")
KNOBS = ("steps", "ksplit", "prefetch")  # the hints of a variant's name
# the hints the dispatch passes, by mode (SMALL_M_KNOBS["<mode>_<knob>"] in mops_fast/ops/int4_matmul.py)
DECIDED = {"fwd": KNOBS, "bwd": ("prefetch",)}
GROUP = 128
MAX_REL_ERR = 2e-2  # tune_int4_gpu.py flags a row BAD above this error against the fp32 product


def parse_native(impl: str) -> dict | None:
    """native[steps=S,warps=W,ksplit=K,prefetch=P,gs=G,flags] -> {"steps", "warps", "ksplit", "prefetch", "gs",
    "tiled", "pdl"}; None otherwise (warps, ksplit, prefetch and gs may be absent: 0, 0, 0 and GROUP)."""
    m = NATIVE.fullmatch(impl)
    if not m:
        return None
    flags = set(filter(None, m.group(6).split(",")))
    return {"steps": int(m.group(1)), "warps": int(m.group(2) or 0), "ksplit": int(m.group(3) or 0),
            "prefetch": int(m.group(4) or 0), "gs": int(m.group(5) or GROUP), "tiled": "tiled" in flags,
            "pdl": "pdl" in flags}


def variant_name(v: dict) -> str:
    return (f"steps={v['steps']}" + (f",warps={v['warps']}" if v["warps"] else "")
            + (f",ksplit={v['ksplit']}" if v["ksplit"] else "")
            + (f",prefetch={v['prefetch']}" if v["prefetch"] else "") + (",tiled" if v["tiled"] else "")
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
    the variants launched as the dispatch would (the kernel's own warps, the default's PDL setting), and the
    PDL pairs' time ratios."""
    table, floors, node, wrong = collect(rows)
    lines, by_m = [], {"fwd": {}, "bwd": {}}
    pdl_gain = {"fwd": [], "bwd": []}
    for (K, N, M), cell in sorted(table.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        for mode in ("fwd", "bwd"):
            nat, fp16 = cell["native"][mode], cell["fp16"].get(mode)
            default = "steps=0,pdl" if "steps=0,pdl" in nat else "steps=0"
            if default not in nat or fp16 is None:
                continue
            base = nat[default][1]
            rel = {name: ms / base for name, (_, ms) in nat.items()}
            best = min(nat, key=lambda n: nat[n][1])
            line = (f"{mode} M={M:<2d} {K}x{N}: fp16 {fp16 * 1e3:6.1f} us, default ({default}) {base * 1e3:6.1f} us "
                    f"= {fp16 / base:4.2f}x fp16; best {best} {nat[best][1] * 1e3:6.1f} us = "
                    f"{fp16 / nat[best][1]:4.2f}x fp16")
            if mode == "fwd":
                line += f", {weight_bytes(K, N) / (nat[best][1] * 1e-3) / 1e12:.2f} TB/s"
            lines.append(line)
            lines.append("    " + "  ".join(f"{n} {r:.3f}" for n, r in sorted(rel.items(), key=lambda kv: kv[1])))
            for name, (v, ms) in nat.items():
                if v["pdl"] and variant_name({**v, "pdl": False}) in nat:
                    pdl_gain[mode].append(ms / nat[variant_name({**v, "pdl": False})][1])
            # the verdicts weigh launches the dispatch can make: the kernel's own warps, GPTQ order, and the
            # default's PDL setting (forced warps are for comparison only)
            want_pdl = default.endswith(",pdl")
            by_m[mode].setdefault(M, []).append(
                {n: r for n, r in rel.items()
                 if not (nat[n][0]["tiled"] or nat[n][0]["warps"]) and nat[n][0]["pdl"] == want_pdl})
    return {"floors": floors, "node": node, "lines": lines, "by_m": by_m, "pdl": pdl_gain, "wrong": wrong}


def winner(shapes: list[dict], margin: float, default: str) -> tuple[float, str] | None:
    """(worst ratio, variant) of the variant faster than the default by more than margin on every shape (the
    best such by its worst ratio), or None."""
    if not shapes:
        return None
    names = set.intersection(*(set(s) for s in shapes)) - {default}
    wins = [(max(s[n] for s in shapes), n) for n in names if all(s[n] < 1 - margin for s in shapes)]
    return min(wins) if wins else None


def _knob_candidates(shapes: list[dict], mode: str, knob: str) -> tuple[list[dict], str]:
    """The shapes' ratios restricted to the variants that differ from the default in `knob` only (one of
    KNOBS) and take a value the dispatch can pass (SMALL_M_KNOBS["<mode>_<knob>"]), and the default's name."""
    from mops_fast.ops.int4_matmul import SMALL_M_KNOBS

    allowed = SMALL_M_KNOBS[f"{mode}_{knob}"]["values"]
    out, default = [], "steps=0"
    for s in shapes:
        keep = {}
        for n, r in s.items():
            v = parse_native(f"native[{n}]")
            if v is None or v["tiled"]:
                continue
            default = "steps=0,pdl" if v["pdl"] else "steps=0"
            if all(v[k] == 0 for k in KNOBS if k != knob) and v[knob] in allowed:
                keep[n] = r
        out.append(keep)
    return out, default


def verdicts(an: dict, margin: float) -> dict:
    """{(mode, knob, small): (worst ratio, variant) or None} for each knob the dispatch passes (DECIDED) and
    the M brackets."""
    out = {}
    for mode, knobs in DECIDED.items():
        for knob in knobs:
            for small in (True, False):
                shapes = [s for M, ss in an["by_m"][mode].items() if (M <= 8) == small for s in ss]
                cands, default = _knob_candidates(shapes, mode, knob)
                out[(mode, knob, small)] = winner(cands, margin, default)
    return out


def decide(an: dict, margin: float) -> dict:
    """What the dispatch should run: each knob of DECIDED per M bracket (M <= 8, M > 8) and PDL on or off, as
    the environment variables that make it so (mops_fast/ops/int4_matmul.py: SMALL_M_KNOBS)."""
    from mops_fast.ops.int4_matmul import SMALL_M_KNOBS

    env = {}
    ver = verdicts(an, margin)
    for mode, knobs in DECIDED.items():
        for knob in knobs:
            wins = (ver[(mode, knob, small)] for small in (True, False))
            vals = [parse_native(f"native[{w[1]}]")[knob] if w else 0 for w in wins]
            env[SMALL_M_KNOBS[f"{mode}_{knob}"]["env"]] = f"{vals[0]},{vals[1]}"
    gains = an["pdl"]["fwd"] + an["pdl"]["bwd"]
    env["MOPS_FAST_INT4_PDL"] = "1" if gains and statistics.median(gains) < 1 - margin else "0"
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
    for (mode, knob, small), w in verdicts(an, margin).items():
        what = f"{'forward' if mode == 'fwd' else 'backward'} {knob}, {'M <= 8' if small else 'M > 8'}"
        out.append(f"{what}: {w[1]} beats the default on every shape (worst ratio {w[0]:.3f}) -> make it the "
                   "default there" if w else
                   f"{what}: the default stays (no variant faster by {margin:.0%} on every shape)")
    for mode in ("fwd", "bwd"):
        if an["pdl"][mode]:
            g = statistics.median(an["pdl"][mode])
            out.append(f"pdl {mode}: median {g:.3f} of the time without over {len(an['pdl'][mode])} pairs -> "
                       + ("keep _pdl_enabled() on" if g < 1 - margin else "turn _pdl_enabled() off by default"))
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
