"""results.json -> Markdown table and bar plot (per-category perplexity of each method)."""
from __future__ import annotations

from pathlib import Path


def reduction(results: dict, method: str = "mops", baseline: str = "prompt") -> float | None:
    """Relative reduction of the mean perplexity of `method` against `baseline` (0.05 = 5% lower)."""
    m = results.get("methods", {})
    if method not in m or baseline not in m:
        return None
    return 1.0 - m[method]["ppl"]["mean"] / m[baseline]["ppl"]["mean"]


def reduction_lines(results: dict) -> list[str]:
    """The verdict under a results table: how much lower (or higher) mops is than prompt, and than LoRA
    (the outside reference) where the run has it."""
    lines = []
    for base, note in (("prompt", ""), ("lora", " (LoRA, the outside reference)")):
        r = reduction(results, baseline=base)
        if r is not None:
            lines.append(f"mops vs {base}{note}: mean perplexity {100 * r:.2f}% lower" if r >= 0 else
                         f"mops vs {base}{note}: mean perplexity {100 * -r:.2f}% HIGHER (mops does not win here)")
    return [""] + lines if lines else []


def ppl_table_lines(results: dict) -> list[str]:
    """The per-category perplexity table of every method (the best of each row in bold), then its learning
    rate (and search), training tokens/s, parameter and gate (exp of the weights' entropy on the test
    records) rows where any method records them."""
    methods = list(results["methods"])
    cats = list(dict.fromkeys(c for m in methods for c in results["methods"][m]["ppl"] if c != "mean"))
    lines = ["| category | " + " | ".join(methods) + " |", "| --- | " + " | ".join("---:" for _ in methods) + " |"]
    for c in cats + ["mean"]:
        vals = [results["methods"][m]["ppl"].get(c) for m in methods]
        best = min(v for v in vals if v is not None)
        cells = [("**%.3f**" if v == best else "%.3f") % v if v is not None else "-" for v in vals]
        name = "**mean**" if c == "mean" else c
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key, label, fmt in (("lr", "learning rate", "%g"), ("train_tokens_per_s", "train tokens/s", "%.0f"),
                            ("trainable_params", "trainable parameters", "%d"),
                            ("gate_effective_experts", "gate: effective experts", "%.2f")):
        vals = [results["methods"][m].get(key) for m in methods]
        if any(vals):
            lines.append(f"| {label} | " + " | ".join(fmt % v if v else "-" for v in vals) + " |")
        if key == "lr":
            lines += _lr_search_row([results["methods"][m].get("lr_search") or {} for m in methods])
    return lines


def _lr_search_row(searches: list[dict]) -> list[str]:
    """The held-out mean perplexity of each candidate rate of each method's search, the chosen one in bold."""
    if not any(searches):
        return []
    return ["| lr search (held-out ppl) | " + " | ".join(
        ", ".join((f"**{k}: {v:.3f}**" if v == min(s.values()) else f"{k}: {v:.3f}") for k, v in s.items()) or "-"
        for s in searches) + " |"]


def history_curve(history: list[dict] | None, unit: str) -> list[tuple[int, float]]:
    """Mean perplexity per `unit` ("round" or "step") from a history's eval entries. A federated run's final
    entry (the full test records) counts only for a round with no other entry: there the round subset is
    the test records themselves, and nothing else evaluated that round."""
    pts: dict[int, float] = {}
    for h in history or []:
        if h.get("stage") == "eval" and "ppl" in h and unit in h and (not h.get("final") or h[unit] not in pts):
            pts[h[unit]] = h["ppl"]["mean"]
    return sorted(pts.items())


def curves(res: dict) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """Each method's mean perplexity over training: ("round", ...) per federated round on the round test
    subset, or ("step", ...) every `eval.every` centralized steps on the test records, the finished model's
    evaluation included (history_curve)."""
    unit = "round" if res.get("setting") == "federated" else "step"
    out = {m: history_curve(entry.get("history"), unit) for m, entry in res.get("methods", {}).items()}
    return unit, {m: pts for m, pts in out.items() if pts}


def curve_table(res: dict) -> list[str]:
    """The curves as a table, a row per round or step (empty when the run recorded none)."""
    unit, cs = curves(res)
    if not cs:
        return []
    xs = sorted({x for pts in cs.values() for x, _ in pts})
    where = "round test subset" if unit == "round" else "test records"
    lines = [f"Mean perplexity over training ({where}):", "", f"| {unit} | " + " | ".join(cs) + " |",
             "| ---: |" + " ---: |" * len(cs)]
    for x in xs:
        lines.append(f"| {x} | " + " | ".join(_num(dict(pts).get(x)) for pts in cs.values()) + " |")
    return lines + [""]


def _num(v) -> str:
    return "-" if v is None else "%.3f" % v


def markdown_table(results: dict) -> str:
    lines = [
        f"**{results.get('model')}** on **{results.get('data')}**, {results.get('setting')}, "
        f"compression {results.get('compression')}, {results.get('steps')} steps, seed {results.get('seed')}",
        "",
        *ppl_table_lines(results),
    ]
    lines += reduction_lines(results)
    table = curve_table(results)
    if table:
        lines += [""] + table[:-1]
    return "\n".join(lines) + "\n"


def bar_plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = list(results["methods"])
    cats = [c for c in results["methods"][methods[0]]["ppl"] if c != "mean"] + ["mean"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cats)), 3.8))
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ys = [results["methods"][m]["ppl"][c] for c in cats]
        ax.bar([x + i * w for x in range(len(cats))], ys, width=w, label=m)
    ax.set_xticks([x + w * (len(methods) - 1) / 2 for x in range(len(cats))])
    ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("response perplexity")
    ax.set_title(f"{results.get('model')} / {results.get('data')} / {results.get('setting')} / "
                 f"{results.get('compression')}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
