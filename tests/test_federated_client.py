"""Client: only trainable tensors travel, updates are reproducible, the FedProx term, federated stage A."""
import pytest
import torch

from mops_fast.federated.client import add_proximal_grad, client_seed
from mops_fast.federated.config import validate_config
from mops_fast.federated.context import FedContext
from tests._federated import tiny_config


@pytest.fixture
def ctx(tmp_path):
    c = FedContext(validate_config(tiny_config(tmp_path)))
    yield c
    c.detach()


def dist(a, b):
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


def test_fit_returns_only_the_adapter_and_is_reproducible(ctx):
    g = ctx.attach("mops")
    u1 = ctx.client(1, "mops").fit(g, rnd=3, local_steps=3)
    assert set(u1.tensors) == set(ctx.model.mops.state_dict()) == set(g)
    assert not any(k.startswith("model.") or "embed" in k for k in u1.tensors)
    assert u1.num_examples == len(ctx.client_records(1)) and u1.metrics["tokens"] > 0
    u2 = ctx.client(1, "mops").fit(g, rnd=3, local_steps=3)  # starts from the same global tensors
    for k in g:
        assert torch.equal(u1.tensors[k], u2.tensors[k])
    assert dist(u1.tensors, g) > 0
    u3 = ctx.client(1, "mops").fit(g, rnd=4, local_steps=3)  # another round: other batches
    assert dist(u3.tensors, u1.tensors) > 0
    assert client_seed(0, "B", 3, 1) != client_seed(0, "B", 4, 1) != client_seed(0, "B", 3, 2)


def test_proximal_gradient_is_mu_times_distance():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    w0 = torch.tensor([0.5, 0.0, 3.0])
    p.grad = torch.tensor([0.1, 0.1, 0.1])
    add_proximal_grad([(p, w0)], mu=0.2)
    torch.testing.assert_close(p.grad, torch.tensor([0.1 + 0.1, 0.1 - 0.4, 0.1]))
    q = torch.nn.Parameter(torch.ones(2))
    add_proximal_grad([(q, torch.zeros(2))], mu=3.0)  # no data gradient yet
    torch.testing.assert_close(q.grad, torch.full((2,), 3.0))


def test_fedprox_keeps_the_client_closer_to_the_global_model(ctx):
    g = ctx.attach("mops")
    free = ctx.client(0, "mops").fit(g, rnd=1, local_steps=6, prox_mu=0.0)
    prox = ctx.client(0, "mops").fit(g, rnd=1, local_steps=6, prox_mu=50.0)
    assert dist(prox.tensors, g) < 0.7 * dist(free.tensors, g)
    # the hook is removed after the round: training again without mu reproduces the free update
    again = ctx.client(0, "mops").fit(g, rnd=1, local_steps=6, prox_mu=0.0)
    assert all(torch.equal(again.tensors[k], free.tensors[k]) for k in g)


def test_gate_stage_moves_only_the_gate(ctx):
    g = ctx.attach("mops")
    gate = {k: v for k, v in g.items() if k.startswith("gate.")}
    u = ctx.client(2, "mops").fit_gate(gate, rnd=1, local_steps=10, samples=8)
    assert set(u.tensors) == set(gate) and dist(u.tensors, gate) > 0
    assert 0.0 <= u.metrics["routing_acc"] <= 1.0
    for k in ("prompt_k", "prompt_v"):
        assert torch.equal(ctx.model.mops.state_dict()[k], g[k])
    ctx.detach()
    ctx.attach("prompt")
    with pytest.raises(ValueError, match="no gate"):
        ctx.client(2, "prompt").fit_gate({}, rnd=1, local_steps=1, samples=2)


def test_prompt_baseline_has_the_same_budget_and_kv_init(ctx):
    gm = ctx.attach("mops")
    ctx.detach()
    gp = ctx.attach("prompt")
    assert gm["prompt_k"].numel() == gp["prompt_k"].numel() and "gate.fc1.weight" not in gp
    ctx.detach()
    raw = ctx.attach("prompt", init=False)  # the same seed without the key/value initialization
    assert not torch.equal(raw["prompt_k"], gp["prompt_k"])  # init from the backbone's keys/values happened
    again = FedContext(ctx.cfg)
    try:
        g2 = again.attach("prompt")
        assert all(torch.equal(g2[k], gp[k]) for k in gp)  # the initial global state is reproducible
    finally:
        again.detach()
