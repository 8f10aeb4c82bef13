"""Server: every kind of bad update is dropped with a log line naming the client and the reason; a round
with no valid update keeps the state; client sampling is seeded."""
import logging

import pytest
import torch

from mops_fast.federated.client import ClientUpdate
from mops_fast.federated.server import FederatedServer, sample_clients, validate_update
from mops_fast.federated.strategies import StrategyConfig

G = {"prompt_k": torch.zeros(2, 3), "gate.fc1.weight": torch.zeros(4, 2)}


def good(cid, value=1.0, n=10):
    return ClientUpdate(cid, {k: torch.full_like(v, value) for k, v in G.items()}, n)


def with_tensor(cid, key, t):
    u = good(cid)
    u.tensors[key] = t
    return u


BAD = {
    "missing name": (lambda: ClientUpdate(7, {"prompt_k": torch.ones(2, 3)}, 10), "missing ['gate.fc1.weight']"),
    "extra name": (lambda: with_tensor(7, "backbone.weight", torch.ones(1)), "unexpected ['backbone.weight']"),
    "shape": (lambda: with_tensor(7, "prompt_k", torch.ones(3, 2)), "has shape (3, 2), the global state's is (2, 3)"),
    "dtype": (lambda: with_tensor(7, "prompt_k", torch.ones(2, 3, dtype=torch.float64)), "dtype torch.float64"),
    "nan": (lambda: with_tensor(7, "prompt_k", torch.tensor([[1.0, float("nan"), 0], [0, 0, 0]])), "1 non-finite"),
    "inf": (lambda: with_tensor(7, "gate.fc1.weight", torch.full((4, 2), float("inf"))), "8 non-finite"),
    "count 0": (lambda: good(7, n=0), "example count must be a positive integer, got 0"),
    "count negative": (lambda: good(7, n=-3), "got -3"),
    "count fractional": (lambda: good(7, n=2.5), "got 2.5"),
    "not a tensor": (lambda: with_tensor(7, "prompt_k", [[0.0] * 3] * 2), "is a list, not a tensor"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_update_is_dropped_and_the_round_goes_on(kind, caplog):
    make, reason = BAD[kind]
    s = FederatedServer(G, StrategyConfig(), run_seed=0, num_clients=10)
    with caplog.at_level(logging.WARNING, logger="mops_fast.federated"):
        rec = s.finish_round("B", 3, [good(1, 1.0, 10), make(), good(2, 4.0, 30)])
    assert rec["clients"] == [1, 2]
    assert rec["dropped"] == [{"client": 7, "reason": rec["dropped"][0]["reason"]}]
    assert reason in rec["dropped"][0]["reason"]
    line = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(line) == 1 and "client 7" in line[0] and reason in line[0] and "round B3" in line[0]
    for k in G:  # the valid two are averaged by example count: (1*10 + 4*30) / 40
        torch.testing.assert_close(s.state[k], torch.full_like(G[k], 3.25))


def test_a_round_with_no_valid_update_keeps_the_state(caplog):
    start = {k: torch.full_like(v, 0.5) for k, v in G.items()}
    s = FederatedServer(start, StrategyConfig(name="fedadam"), run_seed=0, num_clients=10)
    with caplog.at_level(logging.WARNING, logger="mops_fast.federated"):
        rec = s.finish_round("B", 1, [make() for make, _ in BAD.values()])
    assert rec["clients"] == [] and len(rec["dropped"]) == len(BAD)
    assert any("no valid update" in r.getMessage() for r in caplog.records)
    for k in G:
        assert torch.equal(s.state[k], start[k])
    assert s.opt.m == {}  # the server optimizer did not step either
    rec = s.finish_round("B", 2, [])
    assert rec["clients"] == [] and all(torch.equal(s.state[k], start[k]) for k in G)


def test_gate_stage_expects_gate_tensors_only():
    s = FederatedServer(G, StrategyConfig(), run_seed=0, num_clients=3)
    full = good(0)
    rec = s.finish_round("A", 1, [full])
    assert rec["clients"] == [] and "unexpected ['prompt_k']" in rec["dropped"][0]["reason"]
    gate_only = ClientUpdate(1, {"gate.fc1.weight": torch.ones(4, 2)}, 5)
    s.finish_round("A", 2, [gate_only])
    assert torch.equal(s.state["gate.fc1.weight"], torch.ones(4, 2)) and torch.equal(s.state["prompt_k"], G["prompt_k"])


def test_validate_accepts_a_good_update_and_rejects_non_updates():
    assert validate_update(good(0), G) is None
    assert "not a client update" in validate_update({"prompt_k": 1}, G)


def test_sampling_is_seeded_sorted_and_in_range():
    a = sample_clients(0, "B", 5, 10, 4)
    assert a == sample_clients(0, "B", 5, 10, 4) == sorted(a) and len(set(a)) == 4 and all(0 <= c < 10 for c in a)
    rounds = {tuple(sample_clients(0, "B", r, 10, 4)) for r in range(1, 9)}
    assert len(rounds) > 4  # rounds differ
    assert sample_clients(1, "B", 5, 10, 4) != a or sample_clients(1, "B", 6, 10, 4) != sample_clients(0, "B", 6, 10, 4)
    with pytest.raises(ValueError, match="clients_per_round=11"):
        sample_clients(0, "B", 1, 10, 11)
