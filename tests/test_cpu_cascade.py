"""The CPU training path of gated-prefix attention (ops/cpu_cascade.py: torch's CPU flash op for the own keys,
the prompts by matmuls) against the float64 reference, forward and every gradient, on awkward shapes."""
import pytest
import torch

from mops_fast.ops import cpu_cascade
from mops_fast.ops import gated_prefix_attention as gpa

pytestmark = [pytest.mark.skipif(not cpu_cascade.available(), reason="this torch lacks the CPU flash op"),
              pytest.mark.usefixtures("one_thread")]

NAMES = ("q", "k", "v", "prompt_k", "prompt_v", "gate_logw")


def make(B=3, Hq=6, Hkv=2, Sq=7, Sk=7, d=16, J=3, L=2, per_sample=False, gate="soft", pad=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    P = (B, 1, L, Hkv, d) if per_sample else (J, L, Hkv, d)
    t = {"q": r(B, Hq, Sq, d), "k": r(B, Hkv, Sk, d), "v": r(B, Hkv, Sk, d), "prompt_k": r(*P), "prompt_v": r(*P)}
    Jg = 1 if per_sample else J
    if gate == "soft":
        t["gate_logw"] = torch.log_softmax(r(B, Jg), -1)
    elif gate == "topk":  # expert 0 dropped everywhere, sample 1 keeps only expert 2
        lw = torch.log_softmax(r(B, Jg), -1)
        lw[:, 0] = float("-inf")
        lw[1, 1] = float("-inf")
        t["gate_logw"] = lw
    else:
        t["gate_logw"] = None
    kv = None
    if pad == "right":
        kv = torch.ones(B, Sk, dtype=torch.bool)
        kv[0, Sk - 3:] = False
        kv[B - 1, Sk - 1:] = False
    elif pad == "left":
        kv = torch.ones(B, Sk, dtype=torch.bool)
        kv[0, :2] = False
        kv[B - 1, :1] = False
    t["key_valid"] = kv
    return t


def grads(fn, t, go, causal):
    leaves = {n: t[n].clone().requires_grad_(True) for n in NAMES if t[n] is not None}
    args = [leaves.get(n, t[n]) for n in NAMES]
    o = fn(*args, t["key_valid"], causal)
    gs = torch.autograd.grad(o, list(leaves.values()), go.to(o.dtype))
    return o, dict(zip(leaves, gs))


def cascade(q, k, v, pk, pv, lw, kv, causal):
    return cpu_cascade.cascade_attention(q, k, v, pk, pv, lw, kv, q.shape[-1] ** -0.5, causal)


def reference64(q, k, v, pk, pv, lw, kv, causal):
    d = lambda x: None if x is None else x.double()  # noqa: E731
    return gpa.gated_prefix_attention_ref(d(q), d(k), d(v), d(pk), d(pv), d(lw), kv, causal=causal)[0]


CASES = {
    "gqa causal": {},
    "mha causal": dict(Hq=4, Hkv=4),
    "no gate": dict(gate=None),
    "top-k gate": dict(gate="topk"),
    "per-sample prompts": dict(per_sample=True),
    "right padded": dict(pad="right"),
    "left padded": dict(pad="left"),
    "fewer queries than keys": dict(Sq=3, Sk=10, pad="left"),
    "odd sizes": dict(B=2, Hq=3, Hkv=1, Sq=13, Sk=13, d=24, J=5, L=3, pad="right"),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, causal):
    t = make(**CASES[case])
    go = torch.randn(t["q"].shape, generator=torch.Generator().manual_seed(1))
    o, g = grads(cascade, t, go, causal)
    o_ref, g_ref = grads(reference64, t, go, causal)
    assert o.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-5, msg=n)  # g_ref: float64 math, fp32 leaves
        assert g[n].shape == t[n].shape and g[n].dtype == t[n].dtype
    qv = gpa.query_valid(t["key_valid"], t["q"].shape[2], t["k"].shape[2], causal)
    if qv is not None:  # padded queries of causal attention: o = 0 (the contract)
        assert (o.transpose(1, 2)[~qv] == 0).all()


def test_rows_that_see_nothing_are_zero_without_gradient():
    # every expert dropped for sample 0 and its first two keys padding: its first two queries see nothing
    t = make(gate="soft", pad="left")
    t["gate_logw"][0] = float("-inf")
    go = torch.randn(t["q"].shape, generator=torch.Generator().manual_seed(2))
    o, g = grads(cascade, t, go, causal=True)
    assert (o[0, :, :2] == 0).all() and all(torch.isfinite(x).all() for x in g.values())
    assert (g["q"][0, :, :2] == 0).all()
    # with no gradient from the first two queries of every sample, the rest matches the reference run on
    # queries 2.. alone (same positions; the reference's unseen rows would be NaN)
    go[:, :, :2] = 0
    o, g = grads(cascade, t, go, causal=True)
    t2 = dict(t, q=t["q"][:, :, 2:].contiguous())
    o_ref, g_ref = grads(reference64, t2, go[:, :, 2:], causal=True)
    torch.testing.assert_close(o[:, :, 2:].double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g["q"][:, :, 2:], g_ref["q"], rtol=1e-4, atol=1e-5)
    for n in ("k", "v", "prompt_k", "prompt_v", "gate_logw"):
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-5, msg=n)


def test_training_calls_take_the_cascade_and_the_switch_restores_the_reference(monkeypatch):
    t = make(pad="right")
    leaves = [t[n].clone().requires_grad_(True) for n in NAMES]
    o = gpa.gated_prefix_attention(*leaves, t["key_valid"])
    assert type(o.grad_fn).__name__ == "_CascadeCPUBackward"
    monkeypatch.setenv("MOPS_FAST_CPU_CASCADE", "0")
    o2 = gpa.gated_prefix_attention(*leaves, t["key_valid"])
    assert type(o2.grad_fn).__name__ != "_CascadeCPUBackward"
    torch.testing.assert_close(o, o2, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # inference keeps the one-SDPA path
        assert gpa.gated_prefix_attention(*leaves, t["key_valid"]).grad_fn is None
    with pytest.raises(ValueError, match="gate_logw must be"):  # checked like every other path
        monkeypatch.setenv("MOPS_FAST_CPU_CASCADE", "1")
        gpa.gated_prefix_attention(*leaves[:5], leaves[5][:, :2], t["key_valid"])


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", ["gqa causal", "top-k gate", "per-sample prompts", "right padded", "left padded"])
def test_bf16_activations_as_accurate_as_the_reference(case):
    """bf16 q, k, v with fp32 prompts and gate (the model's training dtypes): o and every gradient as close
    to float64 as the reference's own bf16 run is (it computes in fp32 and rounds o), in the input dtypes."""
    t = make(**CASES[case])
    go = torch.randn(t["q"].shape, generator=torch.Generator().manual_seed(3))
    _, g64 = grads(reference64, t, go, True)
    o64 = reference64(*[t[n] for n in NAMES], t["key_valid"], True)
    tb = dict(t, **{n: t[n].bfloat16() for n in ("q", "k", "v")})

    def ref_bf16(q, k, v, pk, pv, lw, kv, causal):
        return gpa.gated_prefix_attention_ref(q, k, v, pk, pv, lw, kv, causal=causal)[0]

    o_c, g_c = grads(cascade, tb, go, True)
    o_r, g_r = grads(ref_bf16, tb, go, True)
    assert o_c.dtype == torch.bfloat16
    assert rel(o_c, o64) <= 1.5 * rel(o_r, o64) + 1e-3, (rel(o_c, o64), rel(o_r, o64))
    for n in g64:
        assert g_c[n].dtype == tb[n].dtype and g_c[n].shape == tb[n].shape, n
        assert rel(g_c[n], g64[n]) <= 1.5 * rel(g_r[n], g64[n]) + 2e-3, (n, rel(g_c[n], g64[n]), rel(g_r[n], g64[n]))


def test_probe_leaves_the_global_rng_alone():
    cpu_cascade.available.cache_clear()
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    assert cpu_cascade.available()
    assert torch.equal(torch.rand(3), a)
