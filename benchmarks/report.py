"""Every benchmark JSON under benchmarks/results/ -> docs/benchmarks.md with tables and PNG plots.

  python benchmarks/report.py [--results DIR] [--out docs/benchmarks.md] [--img docs/img/benchmarks]

Reads the DESIGN §6 files (<benchmark>-<device slug>.json) and pytest-benchmark JSON files; says which known
benchmarks have no results yet (e.g. the GPU ones before a GPU run). Each table and figure names its device.
Numbers are copied from the JSON as they are; nothing here measures anything.
"""
from __future__ import annotations

import argparse
import json
import os

import sys
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # mops_fast.quant.quality renders the compression-quality table
    sys.path.insert(0, str(ROOT))
# Known benchmarks, the script that writes each, and where it runs; listed as "no results yet" when absent.
KNOWN = OrderedDict([
    ("train_step_cpu", ("benchmarks/bench_train_step_cpu.py", "CPU")),
    ("e2e_cpu", ("benchmarks/bench_e2e_cpu.py", "CPU")),
    ("quant_cpu", ("benchmarks/bench_quant_cpu.py", "CPU")),
    ("cpu_attention", ("benchmarks/bench_cpu_attention.py", "CPU")),
    ("adapter_bank_cpu", ("benchmarks/bench_adapter_bank_cpu.py", "CPU")),
    ("e2e_gpu", ("benchmarks/bench_e2e_gpu.py", "GPU")),
    ("gated_prefix_attention", ("benchmarks/bench_gated_prefix_attention.py", "GPU")),
    ("gptq_matmul", ("benchmarks/bench_gptq_matmul.py", "GPU")),
    ("int4_cuda_small_m", ("benchmarks/bench_int4_cuda_small_m.py", "GPU")),
    ("tune_int4", ("benchmarks/tune_int4_gpu.py", "GPU")),
    ("profile_decode", ("benchmarks/profile_decode_host.py --device cuda", "GPU")),
])
# Baseline implementation of a speedup, by preference, when a file does not name its own (`baseline_impl`).
BASELINES = ("peft", "per_adapter", "fp16", "fp16_matmul", "fp32_matmul", "torch_fp16", "materialize_sdpa", "materialize",
             "sdpa_materialize", "dense", "reference", "ref")


def load_results(results_dir: Path) -> tuple[list[dict], list[dict], list[dict], list[str]]:
    """(DESIGN §6 docs, pytest-benchmark docs, quality docs, problems). Unreadable or foreign files are
    reported, not fatal. Quality docs (`"benchmark": "compression_quality"`) hold perplexities, not timings."""
    docs, pyb, quality, problems = [], [], [], []
    for p in sorted(Path(results_dir).glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            problems.append(f"{p.name}: unreadable ({e})")
            continue
        if isinstance(d, dict) and "benchmarks" in d and "machine_info" in d:
            d["_file"] = p.name
            pyb.append(d)
        elif isinstance(d, dict) and d.get("benchmark") == "compression_quality" and isinstance(d.get("runs"), dict):
            d["_file"] = p.name
            quality.append(d)
        elif isinstance(d, dict) and isinstance(d.get("rows"), list) and "benchmark" in d:
            d["_file"] = p.name
            docs.append(d)
        else:
            problems.append(f"{p.name}: neither a DESIGN §6 result nor a pytest-benchmark file")
    return docs, pyb, quality, problems


def shape_label(shape) -> str:
    if not isinstance(shape, dict):
        return str(shape)
    return " ".join(f"{k}={v}" for k, v in shape.items() if k not in ("model", "dtype"))


def _num(v, spec):
    return "-" if v is None else spec % v


def baseline_of(doc: dict) -> str | None:
    impls = {r.get("impl") for r in doc["rows"]}
    if doc.get("baseline_impl") in impls:
        return doc["baseline_impl"]
    return next((b for b in BASELINES if b in impls), None)


def speedups(doc: dict) -> list[dict]:
    """Per row: baseline median / row median, within the same (shape, mode)."""
    base = baseline_of(doc)
    if base is None:
        return []
    ref = {(json.dumps(r.get("shape"), sort_keys=True), r.get("mode")): r["median_ms"]
           for r in doc["rows"] if r.get("impl") == base and r.get("median_ms")}
    out = []
    for r in doc["rows"]:
        k = (json.dumps(r.get("shape"), sort_keys=True), r.get("mode"))
        if r.get("impl") != base and k in ref and r.get("median_ms"):
            out.append({"shape": r.get("shape"), "mode": r.get("mode"), "impl": r["impl"], "baseline": base,
                        "speedup": ref[k] / r["median_ms"]})
    return out


def rows_table(doc: dict) -> str:
    sp = {(json.dumps(s["shape"], sort_keys=True), s["mode"], s["impl"]): s["speedup"] for s in speedups(doc)}
    base = baseline_of(doc)
    lines = ["| shape | impl | mode | median ms | p20-p80 ms | tokens/s | peak mem MiB | "
             + (f"speedup vs {base} |" if base else "|"),
             "| --- | --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if base else "")]
    for r in doc["rows"]:
        key = (json.dumps(r.get("shape"), sort_keys=True), r.get("mode"), r.get("impl"))
        mem = r.get("peak_mem_bytes")
        cells = [shape_label(r.get("shape")), str(r.get("impl")), str(r.get("mode")), _num(r.get("median_ms"), "%.3f"),
                 f"{_num(r.get('p20_ms'), '%.3f')}-{_num(r.get('p80_ms'), '%.3f')}",
                 _num(r.get("tokens_per_s"), "%.1f"), _num(None if mem is None else mem / 2**20, "%.1f")]
        if base:
            cells.append(_num(sp.get(key), "%.2fx") if r.get("impl") != base else "1.00x (baseline)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup(doc: dict, path: Path) -> Path | None:
    """Speedup against the baseline per shape, one line per (impl, mode)."""
    sp = speedups(doc)
    if not sp:
        return None
    plt = _plt()
    labels = list(OrderedDict.fromkeys(shape_label(s["shape"]) for s in sp))
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(labels) + 2), 3.8))
    series = OrderedDict()
    for s in sp:
        series.setdefault(f"{s['impl']} {s['mode']}", {})[shape_label(s["shape"])] = s["speedup"]
    for name, pts in series.items():
        xs = [i for i, lab in enumerate(labels) if lab in pts]
        ax.plot(xs, [pts[labels[i]] for i in xs], marker="o", label=name)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel(f"speedup vs {sp[0]['baseline']} (x)")
    ax.set_title(f"{doc['benchmark']} on {doc.get('device')}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def batch_key(shape) -> str | None:
    if isinstance(shape, dict):
        for k in ("B", "batch", "M"):
            if k in shape:
                return k
    return None


def plot_tokens_vs_batch(doc: dict, path: Path) -> Path | None:
    """tokens/s against the batch size (B, or M for matmuls), one line per (impl, mode, other shape keys)."""
    series = OrderedDict()
    for r in doc["rows"]:
        k = batch_key(r.get("shape"))
        if k is None or r.get("tokens_per_s") is None:
            continue
        rest = {a: b for a, b in r["shape"].items() if a != k and a not in ("model", "dtype")}
        name = f"{r['impl']} {r['mode']}" + (f" ({shape_label(rest)})" if rest else "")
        series.setdefault(name, []).append((r["shape"][k], r["tokens_per_s"]))
    series = OrderedDict((n, sorted(p)) for n, p in series.items() if len({x for x, _ in p}) >= 2)
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = plt.cm.tab20.colors  # more series than the default 10-colour cycle
    for i, (name, pts) in enumerate(series.items()):
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name, color=colors[i % 20],
                ls="--" if " bwd" in name else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (" + batch_key(doc["rows"][0].get("shape")) + ")" if batch_key(doc["rows"][0].get("shape")) else "batch")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{doc['benchmark']} on {doc.get('device')}", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _meta(doc: dict) -> str:
    bits = [f"device **{doc.get('device')}**", f"torch {doc.get('torch')}"]
    if doc.get("triton"):
        bits.append(f"triton {doc['triton']}")
    if doc.get("cuda"):
        bits.append(f"CUDA {doc['cuda']}")
    if doc.get("load_average") is not None:
        bits.append(f"load average at the end {doc['load_average']}")
    if doc.get("load_average_before") is not None:
        bits.append(f"at the start {doc['load_average_before']}")
    if doc.get("created"):
        bits.append(f"measured {doc['created']}")
    if doc.get("timing"):
        bits.append(f"timing: {doc['timing']}")
    return "; ".join(bits) + f" (file `benchmarks/results/{doc['_file']}`)"


def headline(doc: dict) -> list[str]:
    """Target checks a file records itself (ratio keys), quoted as they are."""
    out = []
    for k, v in doc.items():
        if (k.endswith("_tokens_per_s") and "_vs_" in k or k.endswith("_ratio") and "_vs_" in k) and isinstance(v, (int, float)):
            tgt = doc.get("target_ratio")
            out.append(f"- {k.replace('_', ' ')}: **{v:.3f}**" + (f" (target >= {tgt}; "
                       f"{'met' if v >= tgt else 'NOT met'})" if isinstance(tgt, (int, float)) else ""))
    if doc.get("notes"):
        out.append(f"- notes: {doc['notes']}")
    return out


def render(results_dir: Path, out: Path, img_dir: Path) -> str:
    docs, pyb, quality, problems = load_results(results_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(img_dir, out.parent)
    lines = ["# Benchmarks", "",
             "Generated by `python benchmarks/report.py` from the JSON files in `benchmarks/results/` (`make bench` "
             "runs the CPU suites and this report; `benchmarks/run_gpu.sh` writes the GPU files). Do not edit by hand: "
             "every number below is copied from a JSON file a benchmark wrote. A speed claim holds for the device named "
             "beside it only. CPU files carry the machine's load average: on a shared machine absolute times are inflated, "
             "and only the ratio of implementations timed interleaved (step by step, same process) compares.", ""]
    have = {d["benchmark"] for d in docs}
    missing = [b for b in KNOWN if b not in have]
    if missing:
        lines += ["## Benchmarks without results yet", ""]
        for b in missing:
            script, where = KNOWN[b]
            lines.append(f"- `{b}` ({where}): no JSON in benchmarks/results/ yet; run `{script}`"
                         + (" on a GPU machine (benchmarks/run_gpu.sh)" if where == "GPU" else ""))
        lines.append("")
    if problems:
        lines += ["## Files that could not be used", ""] + [f"- {p}" for p in problems] + [""]
    order = {b: i for i, b in enumerate(KNOWN)}
    for doc in sorted(docs, key=lambda d: (order.get(d["benchmark"], 99), d["_file"])):
        stem = doc["_file"][:-5]
        lines += [f"## {doc['benchmark']} on {doc.get('device')}", "", _meta(doc), ""]
        lines += headline(doc) + ([""] if headline(doc) else [])
        lines += [rows_table(doc), ""]
        for fn, suffix, what in ((plot_speedup, "speedup", "speedup vs shape"),
                                 (plot_tokens_vs_batch, "tokens", "tokens/s vs batch")):
            p = fn(doc, img_dir / f"{stem}-{suffix}.png")
            if p is not None:
                lines += [f"![{doc['benchmark']} {what} on {doc.get('device')}]({rel}/{p.name})", "",
                          f"*{what}, {doc.get('device')}*", ""]
    for d in quality:
        from mops_fast.quant.quality import markdown_table

        lines += [f"## Compression quality (`{d['_file']}`) on {d.get('device')}", "",
                  "Perplexity of compressed SmolLM2-135M backbones (what each method costs in quality; discussion in "
                  "[compression](compression.md)).", "", markdown_table(d), ""]
    for d in pyb:
        mi = d.get("machine_info", {})
        dev = (mi.get("cpu") or {}).get("brand_raw") or mi.get("processor") or "unknown CPU"
        lines += [f"## pytest-benchmark run `{d['_file']}` on {dev}", "", f"measured {d.get('datetime')}", "",
                  "| benchmark | group | rounds | median s | min s | max s |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for b in d["benchmarks"]:
            s = b.get("stats", {})
            lines.append(f"| {b.get('name')} | {b.get('group') or '-'} | {s.get('rounds')} | {_num(s.get('median'), '%.4f')} "
                         f"| {_num(s.get('min'), '%.4f')} | {_num(s.get('max'), '%.4f')} |")
        lines.append("")
    text = "\n".join(lines).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--img", default=str(ROOT / "docs" / "img" / "benchmarks"))
    a = ap.parse_args(argv)
    render(Path(a.results), Path(a.out), Path(a.img))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
