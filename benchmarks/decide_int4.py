"""Read a tune_int4 JSON (benchmarks/tune_int4_gpu.py --small-native) and say what it decides, by the rules
of docs/gpu_session.md, so that a GPU session spends its minutes running, not reading 200 rows.

  python benchmarks/decide_int4.py benchmarks/results/tune_int4-<gpu>.json

Prints, per small-M shape: fp16 matmul's time, the current default's (`steps=0`) speedup over it, and each
small-M CUDA variant's time relative to the default (below 1 is faster), forward and backward; the
read-only floor (`read[...]` rows) in TB/s beside the best forward's rate over the same weight bytes, and
the fixed cost of a graph node (mode "floor" rows: each kernel on a 34 KB weight). Then
one line per question: the fastest forward variant per M where it beats the default by more than `--margin`
on every shape, whether the tiled order and PDL win (median ratio over the shapes and variants they were
timed with), and the backward's best variant.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

NATIVE = re.compile(r"native\[steps=(-?\d+)(?:,warps=(\d+))?(?:,gs=(\d+))?((?:,\w+)*)\]")
GROUP = 128


def parse_native(impl: str) -> dict | None:
    """native[steps=S,warps=W,gs=G,tiled,pdl] -> {"steps", "warps", "gs", "tiled", "pdl"}; None otherwise."""
    m = NATIVE.fullmatch(impl)
    if not m:
        return None
    flags = set(filter(None, m.group(4).split(",")))
    return {"steps": int(m.group(1)), "warps": int(m.group(2) or 0), "gs": int(m.group(3) or GROUP),
            "tiled": "tiled" in flags, "pdl": "pdl" in flags}


def variant_name(v: dict) -> str:
    return f"steps={v['steps']}" + (",tiled" if v["tiled"] else "") + (",pdl" if v["pdl"] else "")


def weight_bytes(K: int, N: int) -> int:
    """qweight, fp16 scales and packed zeros of a group-128 weight: what a small-M forward must read."""
    G = -(-K // GROUP)
    return K // 8 * N * 4 + G * N * 2 + G * N // 8 * 4


def collect(rows: list[dict]):
    """{(K, N, M): {"fp16": {mode: ms}, "native": {mode: {variant name: (variant, ms)}}}}, the read floors
    {(K, N): {impl: TB/s}} and the graph-node floors {impl: ms}."""
    table, floors, node = {}, {}, {}
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
        if v is None or v["gs"] != GROUP or v["warps"] != 0 or r["mode"] not in ("fwd", "bwd"):
            continue  # other kernels, the table path (gs=0) and forced warp counts answer other questions
        cell["native"][r["mode"]][variant_name(v)] = (v, r["median_ms"])
    return table, floors, node


def report(rows: list[dict], margin: float = 0.02) -> list[str]:
    table, floors, node = collect(rows)
    out = []
    if node:
        out.append("graph-node floor (34 KB weight): " + ", ".join(f"{k} {v * 1e3:.2f} us" for k, v in node.items()))
    for (K, N), fl in sorted(floors.items()):
        out.append(f"read floor {K}x{N}: " + ", ".join(f"{k} {v:.2f} TB/s" for k, v in sorted(fl.items())))
    by_m_fwd: dict = {}
    tiled_gain, pdl_gain, bwd_best = [], [], {}
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
            out.append(line)
            out.append("    " + "  ".join(f"{n} {r:.3f}" for n, r in sorted(rel.items(), key=lambda kv: kv[1])))
            for name, (v, ms) in nat.items():
                if v["tiled"]:
                    twin = variant_name({**v, "tiled": False})
                    if twin in nat:
                        tiled_gain.append(ms / nat[twin][1])
                if v["pdl"]:
                    twin = variant_name({**v, "pdl": False})
                    if twin in nat:
                        pdl_gain.append((mode, ms / nat[twin][1]))
            if mode == "fwd":
                plain = {n: r for n, r in rel.items() if not (nat[n][0]["tiled"] or nat[n][0]["pdl"])}
                by_m_fwd.setdefault(M, []).append(plain)
            else:
                plain = {n: r for n, r in rel.items() if not nat[n][0]["pdl"]}
                bwd_best.setdefault(M, []).append(plain)
    out.append("")
    out += _decide("forward", by_m_fwd, margin)
    out += _decide("backward", bwd_best, margin)
    if tiled_gain:
        g = statistics.median(tiled_gain)
        out.append(f"tiled order: median {g:.3f} of the GPTQ order's time over {len(tiled_gain)} pairs -> "
                   + ("make it the default of cuda_weight_order()" if g < 1 - margin else "keep GPTQ order"))
    for mode in ("fwd", "bwd"):
        gains = [r for m, r in pdl_gain if m == mode]
        if gains:
            g = statistics.median(gains)
            out.append(f"pdl {mode}: median {g:.3f} of the time without over {len(gains)} pairs -> "
                       + ("turn _pdl_enabled() on by default" if g < 1 - margin else "leave it opt-in"))
    return out


def _decide(what: str, by_m: dict, margin: float) -> list[str]:
    """Per M: the variant faster than the default by more than margin on every shape timed, if any."""
    out = []
    for M, shapes in sorted(by_m.items()):
        names = set.intersection(*(set(s) for s in shapes)) - {"steps=0"}
        winners = [(max(s[n] for s in shapes), n) for n in names if all(s[n] < 1 - margin for s in shapes)]
        if winners:
            worst, name = min(winners)
            out.append(f"{what} M={M}: {name} beats the default on all {len(shapes)} shapes (worst ratio {worst:.3f})"
                       " -> make it the default there")
        else:
            out.append(f"{what} M={M}: the default stays (no variant faster by {margin:.0%} on every shape)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--margin", type=float, default=0.02, help="a win must be faster by this fraction")
    args = ap.parse_args(argv)
    doc = json.loads(args.json.read_text())
    print(f"{args.json.name}: {doc.get('device', '?')}, torch {doc.get('torch')}, {len(doc['rows'])} rows")
    print("\n".join(report(doc["rows"], args.margin)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
