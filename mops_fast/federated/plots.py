"""PNG figures of federated runs: the partition heatmap and test perplexity per round."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def partition_heatmap(categories: list[str], rows: list[list[int]], path, title: str = "") -> Path:
    """Examples per client (rows) and category (columns), with the counts written in the cells."""
    plt = _plt()
    import numpy as np

    a = np.asarray(rows, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(categories), 1.2 + 0.4 * len(rows)))
    im = ax.imshow(np.log1p(a), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"client {i}" for i in range(len(rows))], fontsize=8)
    hi = np.log1p(a).max() if a.size else 1.0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            v = int(a[i, j])
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if np.log1p(v) < 0.6 * hi else "black")
    fig.colorbar(im, ax=ax, label="log(1 + examples)")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def ppl_per_round(curves: dict[str, list[tuple[int, float]]], path, title: str = "",
                  flat: dict[str, float] | None = None) -> Path:
    """Mean test perplexity (round subset) per round for each method; `flat` adds horizontal references."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=name)
    for name, y in (flat or {}).items():
        ax.axhline(y, linestyle="--", color="gray", linewidth=1)
        ax.annotate(name, (0, y), textcoords="offset points", xytext=(2, 3), fontsize=8, color="gray")
    ax.set_xlabel("round")
    ax.set_ylabel("mean test perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
