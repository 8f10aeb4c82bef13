"""Aggregators and server optimizers against hand computations; robustness of median and trimmed mean."""
import pytest
import torch

from mops_fast.federated.client import ClientUpdate
from mops_fast.federated.server import FederatedServer
from mops_fast.federated.strategies import (ServerOptimizer, StrategyConfig, coordinate_median, trimmed_mean,
                                            weighted_mean)


def state(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"prompt_k": torch.randn(2, 3, 4, generator=g) * scale,
            "gate.fc1.weight": torch.randn(5, 2, generator=g) * scale}


def server(global_state, name="fedavg", **kw):
    return FederatedServer(global_state, StrategyConfig(name=name, **kw), run_seed=0, num_clients=10)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "median", "trimmed_mean", "fedadam", "fedyogi"])
def test_identical_clients_are_the_identity(name):
    g = state(0)
    s = server(g, name)
    s.finish_round("B", 1, [ClientUpdate(c, {k: v.clone() for k, v in g.items()}, n) for c, n in [(0, 3), (1, 10), (2, 1)]])
    for k in g:
        torch.testing.assert_close(s.state[k], g[k], rtol=0, atol=1e-7)


def test_weighted_average_matches_hand_computation():
    a, b, c = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -2.0])}, {"w": torch.tensor([0.0, 10.0])}
    out = weighted_mean([a, b, c], [1.0, 3.0, 6.0])
    torch.testing.assert_close(out["w"], torch.tensor([(1 + 9 + 0) / 10, (2 - 6 + 60) / 10]))
    s = server({"w": torch.zeros(2)})
    rec = s.finish_round("B", 1, [ClientUpdate(2, c, 6), ClientUpdate(0, a, 1), ClientUpdate(1, b, 3)])
    torch.testing.assert_close(s.state["w"], torch.tensor([1.0, 5.6]))
    assert rec["clients"] == [0, 1, 2]


def test_median_and_trimmed_mean_hand_values():
    xs = [{"w": torch.tensor([v])} for v in (5.0, -1.0, 2.0, 100.0)]
    assert coordinate_median(xs)["w"].item() == pytest.approx(3.5)  # mean of the middle two of 4
    assert coordinate_median(xs[:3])["w"].item() == pytest.approx(2.0)
    assert trimmed_mean(xs, 0.25)["w"].item() == pytest.approx(3.5)  # drops -1 and 100
    assert trimmed_mean(xs, 0.0)["w"].item() == pytest.approx(26.5)
    with pytest.raises(ValueError, match="leaves nothing"):
        trimmed_mean(xs, 0.5)


@pytest.mark.parametrize("attack", ["large", "flipped"])
def test_median_and_trimmed_mean_withstand_a_minority_of_attackers(attack):
    g = state(0)
    target = state(1)
    honest = []
    for i in range(5):
        noise = state(100 + i, scale=0.01)
        honest.append({k: target[k] + noise[k] for k in g})
    bad = {k: (g[k] + 1e4 * torch.ones_like(g[k])) if attack == "large" else (g[k] - 10 * (target[k] - g[k]))
           for k in g}
    updates = [ClientUpdate(i, honest[i], 100) for i in range(5)] + [ClientUpdate(5 + j, bad, 100) for j in range(2)]
    err = {}
    for name in ("fedavg", "median", "trimmed_mean"):
        s = server(g, name, trim_ratio=0.3)
        s.finish_round("B", 1, updates)
        err[name] = max((s.state[k] - target[k]).abs().max().item() for k in g)
    assert err["median"] < 0.05 and err["trimmed_mean"] < 0.05  # close to the honest clients
    assert err["fedavg"] > 1.0  # the plain mean is dragged away


def test_server_optimizers_match_hand_computation():
    x0 = {"w": torch.tensor([1.0, -2.0], dtype=torch.float32)}
    aggs = [torch.tensor([1.5, -2.5]), torch.tensor([0.5, -1.0])]
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    for kind in ("avg", "adam", "yogi", "adagrad"):
        opt = ServerOptimizer(kind, 1.0 if kind == "avg" else lr, b1, b2, tau)
        x = x0
        m = v = torch.zeros(2, dtype=torch.float64)
        ref = x0["w"].double()
        for a in aggs:
            x = opt.step(x, {"w": a})
            d = a.double() - ref
            if kind == "avg":
                ref = ref + d
                continue
            m = b1 * m + (1 - b1) * d
            if kind == "adam":
                v = b2 * v + (1 - b2) * d * d
            elif kind == "yogi":
                v = v - (1 - b2) * d * d * torch.sign(v - d * d)
            else:
                v = v + d * d
            ref = ref + lr * m / (v.sqrt() + tau)
        torch.testing.assert_close(x["w"], ref.float(), rtol=1e-6, atol=1e-6)
        assert x["w"].dtype == torch.float32
    # Yogi and Adam differ once the second moment is non-zero
    a, y = ServerOptimizer("adam", lr), ServerOptimizer("yogi", lr)
    xa = xy = x0
    for agg in aggs:
        xa, xy = a.step(xa, {"w": agg}), y.step(xy, {"w": agg})
    assert not torch.allclose(xa["w"], xy["w"])


def test_fedadam_server_state_roundtrip():
    g = state(0)
    s1 = server(g, "fedadam")
    upd = [ClientUpdate(0, state(1), 5)]
    s1.finish_round("B", 1, upd)
    sd = s1.state_dict()
    s2 = server(state(7), "fedadam")
    s2.load_state_dict(sd)
    s1.finish_round("B", 2, [ClientUpdate(0, state(2), 5)])
    s2.finish_round("B", 2, [ClientUpdate(0, state(2), 5)])
    for k in g:
        assert torch.equal(s1.state[k], s2.state[k])
    with pytest.raises(ValueError, match="is for 'adam'"):
        server(g, "fedyogi").load_state_dict(sd)


def test_strategy_config_errors():
    with pytest.raises(ValueError, match="unknown name"):
        StrategyConfig(name="fedsgd")
    with pytest.raises(ValueError, match="trim_ratio"):
        StrategyConfig(name="trimmed_mean", trim_ratio=0.5)
    assert StrategyConfig(name="fedavg").mu == 0.0 and StrategyConfig(name="fedprox", prox_mu=0.1).mu == 0.1
    assert StrategyConfig(name="fedadam").lr == 0.01 and StrategyConfig(name="median").lr == 1.0
