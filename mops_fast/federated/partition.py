"""Splitting a training file into C clients with category skew: Dirichlet(alpha), k dominant categories,
or i.i.d. (the control). Deterministic from a seed; every example lands in exactly one client.

- `dirichlet`: for each category, client shares p ~ Dir(alpha * 1_C) and the category's examples are cut
  by those shares (the label-skew split of Wang et al. / Yurochkin et al.); small alpha gives each client a
  few dominant categories. A draw that leaves a client with fewer than `min_examples` is redrawn.
- `dominant`: each client holds k categories (assigned round-robin over a seeded shuffle so that every
  category has an owner); each category is split evenly among its owners. With `mix` > 0 that fraction of
  every category is first spread i.i.d. over all clients, so k categories dominate rather than exclude.
- `iid`: a seeded shuffle cut into C near-equal parts.
"""
from __future__ import annotations

from mops_fast.config_file import dataclass_from_dict

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMES = ("dirichlet", "dominant", "iid")


@dataclass
class PartitionConfig:
    num_clients: int = 10
    scheme: str = "dirichlet"
    alpha: float = 0.1  # dirichlet concentration
    k: int = 2  # dominant: categories per client
    mix: float = 0.0  # dominant: fraction of every category spread i.i.d. over all clients
    min_examples: int = 10  # dirichlet: redraw until every client holds at least this many
    seed: int = 0
    max_redraws: int = 1000

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"partition: {msg}")

        if not isinstance(self.num_clients, int) or self.num_clients < 1:
            bad(f"num_clients must be an integer >= 1, got {self.num_clients!r}")
        if self.scheme not in SCHEMES:
            bad(f"scheme must be one of {list(SCHEMES)}, got {self.scheme!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            bad(f"alpha must be > 0 (0.1 severe skew, 1.0 mild, large ~ i.i.d.), got {self.alpha!r}")
        if not isinstance(self.k, int) or self.k < 1:
            bad(f"k must be an integer >= 1, got {self.k!r}")
        if not 0.0 <= self.mix < 1.0:
            bad(f"mix must be in [0, 1), got {self.mix!r}")
        if not isinstance(self.min_examples, int) or self.min_examples < 0:
            bad(f"min_examples must be an integer >= 0, got {self.min_examples!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "PartitionConfig":
        return dataclass_from_dict(cls, d, "partition")

    def describe(self) -> dict:
        """The parameters that define the split (for results.json)."""
        d = {"scheme": self.scheme, "num_clients": self.num_clients, "seed": self.seed}
        if self.scheme == "dirichlet":
            d.update(alpha=self.alpha, min_examples=self.min_examples)
        elif self.scheme == "dominant":
            d.update(k=self.k, mix=self.mix)
        return d


def _by_category(records: list[dict]) -> tuple[list[str], dict[str, np.ndarray]]:
    cats = sorted({r["category"] for r in records})
    idx: dict[str, list[int]] = {c: [] for c in cats}
    for i, r in enumerate(records):
        idx[r["category"]].append(i)
    return cats, {c: np.asarray(v, dtype=np.int64) for c, v in idx.items()}


def _split_by_shares(idx: np.ndarray, shares: np.ndarray) -> list[np.ndarray]:
    cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
    return np.split(idx, cuts)


def partition(records: list[dict], cfg: PartitionConfig) -> list[list[int]]:
    """Client -> sorted record indices; a pure function of (records, cfg)."""
    n, C = len(records), cfg.num_clients
    if n < C:
        raise ValueError(f"partition: {n} records cannot fill {C} clients; lower num_clients or add data")
    rng = np.random.default_rng(cfg.seed)
    cats, by_cat = _by_category(records)
    # Shuffle inside each category once, so that cuts do not follow the file's order.
    by_cat = {c: rng.permutation(v) for c, v in by_cat.items()}
    parts: list[list[np.ndarray]] = [[] for _ in range(C)]

    if cfg.scheme == "iid":
        for i, chunk in enumerate(np.array_split(rng.permutation(n), C)):
            parts[i].append(chunk)
    elif cfg.scheme == "dirichlet":
        if cfg.min_examples * C > n:
            raise ValueError(f"partition: min_examples={cfg.min_examples} x {C} clients exceeds the {n} records")
        for attempt in range(cfg.max_redraws):
            trial: list[list[np.ndarray]] = [[] for _ in range(C)]
            for c in cats:
                shares = rng.dirichlet(np.full(C, float(cfg.alpha)))
                for i, chunk in enumerate(_split_by_shares(by_cat[c], shares)):
                    trial[i].append(chunk)
            sizes = [sum(len(x) for x in t) for t in trial]
            if min(sizes) >= cfg.min_examples:
                parts = trial
                break
        else:
            raise ValueError(
                f"partition: no Dirichlet(alpha={cfg.alpha}) draw in {cfg.max_redraws} gave every one of {C} "
                f"clients >= {cfg.min_examples} examples; raise alpha, lower min_examples or num_clients"
            )
    else:  # dominant
        if cfg.k > len(cats):
            raise ValueError(f"partition: k={cfg.k} exceeds the {len(cats)} categories in the data")
        if C * cfg.k < len(cats):
            raise ValueError(
                f"partition: {C} clients x k={cfg.k} categories cannot cover all {len(cats)} categories "
                "(every example must have a client); raise k or num_clients"
            )
        order = [cats[i] for i in rng.permutation(len(cats))]
        owners: dict[str, list[int]] = {c: [] for c in cats}
        for i in range(C):
            for j in range(cfg.k):
                owners[order[(i * cfg.k + j) % len(cats)]].append(i)
        for c in cats:
            idx = by_cat[c]
            n_mix = int(round(cfg.mix * len(idx)))
            for i, chunk in enumerate(np.array_split(idx[:n_mix], C)):
                parts[i].append(chunk)
            for o, chunk in zip(owners[c], np.array_split(idx[n_mix:], len(owners[c]))):
                parts[o].append(chunk)

    out = [sorted(int(i) for i in np.concatenate(p)) if p else [] for p in parts]
    empty = [i for i, p in enumerate(out) if not p]
    if empty:
        raise ValueError(f"partition: client(s) {empty} received no examples; use fewer clients or more data")
    return out


def counts_table(records: list[dict], parts: list[list[int]]) -> tuple[list[str], list[list[int]]]:
    """(categories, rows): rows[client][category] example counts."""
    cats = sorted({r["category"] for r in records})
    pos = {c: j for j, c in enumerate(cats)}
    rows = []
    for p in parts:
        row = [0] * len(cats)
        for i in p:
            row[pos[records[i]["category"]]] += 1
        rows.append(row)
    return cats, rows


def summary_markdown(records: list[dict], parts: list[list[int]], title: str = "") -> str:
    cats, rows = counts_table(records, parts)
    lines = [title, ""] if title else []
    lines.append("| client | " + " | ".join(cats) + " | total |")
    lines.append("| ---: | " + " | ".join("---:" for _ in cats) + " | ---: |")
    for i, row in enumerate(rows):
        lines.append(f"| {i} | " + " | ".join(str(v) for v in row) + f" | {sum(row)} |")
    tot = [sum(col) for col in zip(*rows)]
    lines.append("| **all** | " + " | ".join(str(v) for v in tot) + f" | {sum(tot)} |")
    return "\n".join(lines) + "\n"


def summary_csv(records: list[dict], parts: list[list[int]]) -> str:
    cats, rows = counts_table(records, parts)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["client", *cats, "total"])
    for i, row in enumerate(rows):
        w.writerow([i, *row, sum(row)])
    return buf.getvalue()


def write_summary(records: list[dict], parts: list[list[int]], cfg: PartitionConfig, out_dir,
                  plot: bool = True) -> dict:
    """Write partition.csv, partition.md, partition.json (and partition.png); return the description."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    desc = cfg.describe()
    title = "Partition: " + ", ".join(f"{k}={v}" for k, v in desc.items())
    (out / "partition.md").write_text(summary_markdown(records, parts, title))
    (out / "partition.csv").write_text(summary_csv(records, parts))
    cats, rows = counts_table(records, parts)
    desc = {**desc, "sizes": [sum(r) for r in rows], "categories": cats, "counts": rows}
    (out / "partition.json").write_text(json.dumps(desc, indent=1))
    if plot:
        from mops_fast.federated.plots import partition_heatmap

        partition_heatmap(cats, rows, out / "partition.png", title=title)
    return desc
