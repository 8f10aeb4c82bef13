"""Partitioning: determinism, coverage (every example in exactly one client), skew, errors, summaries."""
import numpy as np
import pytest

from mops_fast.federated.partition import (PartitionConfig, counts_table, partition, summary_markdown,
                                           write_summary)


def records(n_per_cat=(60, 40, 30, 20, 10, 50)):
    out = []
    for c, n in enumerate(n_per_cat):
        out += [{"instruction": f"i{c}-{j}", "context": "", "response": "r", "category": f"cat{c}"} for j in range(n)]
    return out


SCHEMES = [dict(scheme="dirichlet", alpha=0.1, min_examples=3), dict(scheme="dirichlet", alpha=1.0),
           dict(scheme="dominant", k=2), dict(scheme="dominant", k=1, mix=0.3), dict(scheme="iid")]


@pytest.mark.parametrize("kw", SCHEMES)
def test_deterministic_and_covering(kw):
    recs = records()
    cfg = PartitionConfig(num_clients=6, seed=3, **kw)
    a, b = partition(recs, cfg), partition(recs, cfg)
    assert a == b
    flat = sorted(i for p in a for i in p)
    assert flat == list(range(len(recs)))  # every example exactly once
    assert all(len(p) > 0 for p in a)
    other = partition(recs, PartitionConfig(num_clients=6, seed=4, **kw))
    assert other != a  # the seed matters


def _max_share(recs, parts):
    _, rows = counts_table(recs, parts)
    return float(np.mean([max(r) / sum(r) for r in rows]))


def test_dirichlet_alpha_controls_skew():
    recs = records((200,) * 8)
    severe = _max_share(recs, partition(recs, PartitionConfig(num_clients=10, alpha=0.1, min_examples=5)))
    mild = _max_share(recs, partition(recs, PartitionConfig(num_clients=10, alpha=100.0)))
    iid = _max_share(recs, partition(recs, PartitionConfig(num_clients=10, scheme="iid")))
    assert severe > 0.6 and mild < 0.3 and iid < 0.3
    p = partition(recs, PartitionConfig(num_clients=10, alpha=0.1, min_examples=50))
    assert min(len(x) for x in p) >= 50  # redraws enforce the minimum


def test_dominant_k_categories_per_client():
    recs = records()
    parts = partition(recs, PartitionConfig(num_clients=4, scheme="dominant", k=2))
    _, rows = counts_table(recs, parts)
    assert all(sum(v > 0 for v in r) <= 2 for r in rows)
    mixed = partition(recs, PartitionConfig(num_clients=4, scheme="dominant", k=2, mix=0.5))
    _, rows = counts_table(recs, mixed)
    assert all(sum(v > 0 for v in r) > 2 for r in rows)  # mix spreads a share of every category


def test_clear_errors():
    recs = records()
    with pytest.raises(ValueError, match="cannot cover all 6 categories"):
        partition(recs, PartitionConfig(num_clients=2, scheme="dominant", k=2))
    with pytest.raises(ValueError, match="cannot fill"):
        partition(recs[:3], PartitionConfig(num_clients=5, scheme="iid"))
    with pytest.raises(ValueError, match="min_examples"):
        partition(recs, PartitionConfig(num_clients=5, min_examples=100))
    with pytest.raises(ValueError, match="scheme must be one of"):
        PartitionConfig(scheme="labels")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        PartitionConfig(alpha=0)
    with pytest.raises(ValueError, match="unknown keys"):
        PartitionConfig.from_dict({"clients": 3})


def test_summary_files(tmp_path):
    recs = records()
    cfg = PartitionConfig(num_clients=4, alpha=0.5, min_examples=5)
    parts = partition(recs, cfg)
    desc = write_summary(recs, parts, cfg, tmp_path)
    assert sum(desc["sizes"]) == len(recs) and desc["scheme"] == "dirichlet" and desc["alpha"] == 0.5
    csv = (tmp_path / "partition.csv").read_text().splitlines()
    assert csv[0].split(",") == ["client"] + [f"cat{c}" for c in range(6)] + ["total"]
    assert [int(line.split(",")[-1]) for line in csv[1:]] == [len(p) for p in parts]
    md = (tmp_path / "partition.md").read_text()
    assert f"| **all** | 60 | 40 | 30 | 20 | 10 | 50 | {len(recs)} |" in md
    assert (tmp_path / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary_markdown(recs, parts) in md
