"""The reference gated-prefix attention against a naive float64 loop, forward and backward."""
import math

import pytest
import torch

from mops_fast.ops.gated_prefix_attention import gated_prefix_attention, gated_prefix_attention_with_lse


def naive(q, k, v, pk, pv, logw, key_valid, causal=True):
    B, Hq, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    rows = []
    for b in range(B):
        P = pk if pk.dim() == 4 else pk[b]
        PV = pv if pv.dim() == 4 else pv[b]
        J, L = P.shape[:2]
        for h in range(Hq):
            hk = h // G
            for i in range(Sq):
                if causal and key_valid is not None and Sq <= Sk and not bool(key_valid[b, Sk - Sq + i]):
                    rows.append(q.new_zeros(d))  # a causal query at a padded position: o = 0 (the contract)
                    continue
                scores, vals = [], []
                for e in range(J):
                    for t in range(L):
                        bias = logw[b, e] if logw is not None else 0.0
                        scores.append(q[b, h, i] @ P[e, t, hk] / math.sqrt(d) + bias)
                        vals.append(PV[e, t, hk])
                for j in range(Sk):
                    ok = key_valid is None or bool(key_valid[b, j])
                    ok = ok and (not causal or j <= Sk - Sq + i)
                    if ok:
                        scores.append(q[b, h, i] @ k[b, hk, j] / math.sqrt(d))
                        vals.append(v[b, hk, j])
                p = torch.softmax(torch.stack(scores), 0)
                rows.append(p @ torch.stack(vals))
    return torch.stack(rows).view(B, Hq, Sq, d)


def make(B=2, Hq=6, Hkv=2, Sq=7, Sk=7, d=8, J=3, L=2, per_sample=False, pad=True, topk_zero=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    q, k, v = r(B, Hq, Sq, d), r(B, Hkv, Sk, d), r(B, Hkv, Sk, d)
    shape = (B, J, L, Hkv, d) if per_sample else (J, L, Hkv, d)
    pk, pv = r(*shape), r(*shape)
    logw = torch.log_softmax(r(B, J), -1)
    if topk_zero and J > 1:
        logw[0, 0] = float("-inf")
        logw[0] = logw[0] - torch.logsumexp(logw[0], 0)
    kv = torch.ones(B, Sk, dtype=torch.bool)
    if pad:
        kv[0, :2] = False  # left padding
        kv[-1, -3:] = False  # right padding
    return q, k, v, pk, pv, logw, kv


@pytest.mark.parametrize("case", [
    dict(), dict(Sq=1, Sk=9), dict(J=5, L=3, Hq=3, Hkv=1), dict(J=1, L=1), dict(per_sample=True, J=1, L=4),
    dict(Sq=5, Sk=11, d=4, B=3),
])
def test_reference_matches_naive_forward_and_backward(case):
    q, k, v, pk, pv, logw, kv = make(**case)
    ts = [t.requires_grad_() for t in (q, k, v, pk, pv, logw)]
    out = gated_prefix_attention(*ts, kv)
    ref = naive(*ts, kv)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(out)
    g1 = torch.autograd.grad(out, ts, go, allow_unused=True)
    g2 = torch.autograd.grad(ref, ts, go, allow_unused=True)
    for a, b in zip(g1, g2):
        # -inf log weights give zero (or nan-free) gradients in both
        torch.testing.assert_close(torch.nan_to_num(a, 0.0, 0.0, 0.0), torch.nan_to_num(b, 0.0, 0.0, 0.0),
                                   rtol=1e-9, atol=1e-9)


def test_all_padding_but_one_and_lse():
    q, k, v, pk, pv, logw, kv = make(pad=False)
    kv[1] = False
    kv[1, 3] = True
    o, lse = gated_prefix_attention_with_lse(q, k, v, pk, pv, logw, kv)
    # queries at padded positions: o = 0, lse = -inf (the contract); every other row is finite
    assert torch.isfinite(o).all() and (o[1, :, [0, 1, 2, 4, 5, 6]] == 0).all()
    assert torch.isneginf(lse[1, :, [0, 1, 2, 4, 5, 6]]).all()
    assert torch.isfinite(lse[0]).all() and torch.isfinite(lse[1, :, 3]).all()
    torch.testing.assert_close(o, naive(q, k, v, pk, pv, logw, kv))


def test_padded_queries_pass_no_gradient():
    q, k, v, pk, pv, logw, kv = make()  # left padding in sample 0, right padding in sample 1
    ts = [t.requires_grad_() for t in (q, k, v)]
    o, lse = gated_prefix_attention_with_lse(*ts, pk, pv, logw, kv)
    padded = ~kv  # Sq == Sk: a query's own position is its index
    o.masked_select(padded[:, None, :, None]).sum().backward()  # only the padded rows' outputs
    for t in ts:
        assert (t.grad == 0).all()


def test_identity_equal_experts_equals_single_prompt():
    """If all experts hold the same prompt, `scale` is plain prefix attention whatever the gate says."""
    q, k, v, pk, pv, logw, kv = make(J=4, L=3, topk_zero=True)
    one_k, one_v = pk[:1], pv[:1]
    same_k, same_v = one_k.expand_as(pk).clone(), one_v.expand_as(pv).clone()
    a = gated_prefix_attention(q, k, v, same_k, same_v, logw, kv)
    b = gated_prefix_attention(q, k, v, one_k, one_v, None, kv)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_zero_weight_expert_contributes_nothing():
    q, k, v, pk, pv, logw, kv = make(J=3)
    logw[:, 1] = float("-inf")
    a = gated_prefix_attention(q, k, v, pk, pv, logw, kv)
    pk2, pv2 = pk.clone(), pv.clone()
    pk2[1] += 100.0
    pv2[1] -= 50.0
    b = gated_prefix_attention(q, k, v, pk2, pv2, logw, kv)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", ["qdim", "gqa", "prompt_heads", "logw_shape", "mask_dtype", "short_k"])
def test_bad_inputs_raise_clear_errors(bad):
    q, k, v, pk, pv, logw, kv = make()
    if bad == "qdim":
        q = q[0]
    elif bad == "gqa":
        q = q[:, :5]
    elif bad == "prompt_heads":
        pk, pv = pk[:, :, :1], pv[:, :, :1]
    elif bad == "logw_shape":
        logw = logw[:, :2]
    elif bad == "mask_dtype":
        kv = kv.long()
    elif bad == "short_k":
        k, v, kv = k[:, :, :3], v[:, :, :3], kv[:, :3]
    with pytest.raises(ValueError, match="gated_prefix_attention"):
        gated_prefix_attention(q, k, v, pk, pv, logw, kv)


# --- inference path: one SDPA call over [prompts; own keys] when nothing needs a gradient ---------------
from mops_fast.ops import gated_prefix_attention as gpa_mod  # noqa: E402


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls = []
    real = gpa_mod._prefix_sdpa

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(gpa_mod, "_prefix_sdpa", counting)
    return calls


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", [
    dict(), dict(Sq=1, Sk=9), dict(J=5, L=3, Hq=3, Hkv=1), dict(J=1, L=1), dict(per_sample=True, J=1, L=4),
    dict(Sq=5, Sk=11, d=4, B=3), dict(Sq=1, Sk=9, pad=False), dict(Hq=2, Hkv=2, pad=False),
])
def test_inference_path_matches_naive(case, causal, sdpa_calls):
    q, k, v, pk, pv, logw, kv = make(**case)
    with torch.no_grad():
        out = gated_prefix_attention(q, k, v, pk, pv, logw, kv, causal=causal)
    assert sdpa_calls == [1]
    torch.testing.assert_close(out, naive(q, k, v, pk, pv, logw, kv, causal=causal), rtol=1e-10, atol=1e-10)
    # no gate and no padding mask: the other branches of the mask
    with torch.no_grad():
        out = gated_prefix_attention(q, k, v, pk, pv, None, None, causal=causal)
    torch.testing.assert_close(out, naive(q, k, v, pk, pv, None, None, causal=causal), rtol=1e-10, atol=1e-10)


def test_inference_path_fp32_and_dispatch(sdpa_calls):
    q, k, v, pk, pv, logw, kv = (t.float() if t.is_floating_point() else t for t in make(Sq=6, Sk=13, seed=3))
    ref = gated_prefix_attention(q, k, v, pk, pv, logw, kv, backend="reference")  # explicit: the reference
    assert sdpa_calls == []
    out = gated_prefix_attention(q, k, v, pk, pv, logw, kv)  # no input requires grad
    assert sdpa_calls == [1] and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # bf16 too (fp32 prompts), as close to float64 as the reference's own bf16 run
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    with torch.no_grad():
        ob = gated_prefix_attention(qb, kb, vb, pk, pv, logw, kv)
    assert sdpa_calls == [1, 1] and ob.dtype == torch.bfloat16
    r64 = naive(q.double(), k.double(), v.double(), pk.double(), pv.double(), logw.double(), kv)
    rel = lambda a: float((a.double() - r64).norm() / r64.norm())  # noqa: E731
    assert rel(ob) <= 1.5 * rel(gated_prefix_attention(qb, kb, vb, pk, pv, logw, kv, backend="reference")) + 2e-3
    # training (a prompt requires grad) and the lse variant do not take it
    pk.requires_grad_()
    assert gated_prefix_attention(q, k, v, pk, pv, logw, kv).grad_fn is not None
    with torch.no_grad():
        gated_prefix_attention_with_lse(q, k, v, pk, pv, logw, kv)
    assert sdpa_calls == [1, 1]


def test_inference_path_rows_that_see_nothing_are_zero():
    # sample 0: every expert dropped and its first keys padding, so its first queries would see nothing
    # (a softmax over nothing: NaN); they sit at padded positions, so every path gives 0 there
    q, k, v, pk, pv, logw, kv = make(pad=False, Sq=6, Sk=6)
    logw[0] = float("-inf")
    kv[0, :3] = False
    with torch.no_grad():
        out = gated_prefix_attention(q, k, v, pk, pv, logw, kv)
    ref = gated_prefix_attention(q, k, v, pk, pv, logw, kv, backend="reference")
    assert not torch.isnan(ref).any() and (ref[0, :, :3] == 0).all() and (out[0, :, :3] == 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
