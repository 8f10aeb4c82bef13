"""Fused gated-prefix attention on a CUDA device, at realistic sizes, against the float64 reference.

The same cases as the interpreter tests (awkward lengths, padding on both sides, top-k zeros, a sample
with one valid token, J*L = 1 and 15, decode with Sq < Sk, per-sample prompts, GQA 4 and 3), in fp16, bf16
and fp32, plus torch.compile(fullgraph=True). Cases share kernel variants where they can (about 20
compiles in all); the non-causal variant is left to the interpreter tests.
"""
import importlib
import math
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
pytest.importorskip("triton")

from mops_fast.ops.gated_prefix_attention import (  # noqa: E402
    gated_prefix_attention,
    gated_prefix_attention_ref,
    gated_prefix_attention_with_lse,
)
from tests.conftest import check_padded_rows, padded_queries  # noqa: E402

DEV = "cuda"
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def tk():
    """The kernel module compiled for the GPU, even if another test module set TRITON_INTERPRET=1."""
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        from mops_fast.ops import triton_gated_prefix_attention as m

        if m.INTERPRETED:
            m = importlib.reload(m)
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    assert not m.INTERPRETED
    return m


@pytest.fixture(autouse=True)
def _no_tf32():
    # fp32 runs IEEE dots unless TF32 is allowed; keep another test's global setting out of ours.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def make_inputs(B=2, Hq=32, Hkv=8, Sq=1000, Sk=None, d=128, J=8, L=16, dtype=torch.bfloat16,
                per_sample=False, pad="both", drop=True, gate=True, seed=0):
    Sk = Sq if Sk is None else Sk
    g = torch.Generator(device=DEV).manual_seed(seed)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g, device=DEV).to(dt)  # noqa: E731
    q, k, v = rnd(B, Hq, Sq, d), rnd(B, Hkv, Sk, d), rnd(B, Hkv, Sk, d)
    pshape = (B, J, L, Hkv, d) if per_sample else (J, L, Hkv, d)
    pk, pv = rnd(*pshape, dt=torch.float32), rnd(*pshape, dt=torch.float32)  # fp32 parameters
    logw = None
    if gate:
        logw = torch.log_softmax(rnd(B, J, dt=torch.float32) * 2, -1)
        if drop and J > 1:  # top-k: exact zeros
            logw[0, 1::2] = -math.inf
            logw[B - 1, 0] = -math.inf
    kv = None
    if pad is not None:
        kv = torch.ones(B, Sk, dtype=torch.bool, device=DEV)
        if pad in ("both", "left"):
            kv[0, : Sk // 3] = False
        if pad in ("both", "right"):
            kv[B - 1, Sk - Sk // 4:] = False
        if pad == "one_valid":
            kv[0] = False
            kv[0, Sk // 2] = True
    return q, k, v, pk, pv, logw, kv


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(inputs, tol, causal=True, seed=1, use_lse=True):
    q, k, v, pk, pv, logw, kv = inputs
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    lw = logw.clone().requires_grad_() if logw is not None else None
    o, lse = gated_prefix_attention_with_lse(*leaves, lw, kv, causal=causal)
    # CUDA tensors take the fused kernels: the custom op's eager autograd.Function here
    assert "FusedGatedPrefixAttention" in type(o.grad_fn).__name__
    padded = padded_queries(kv, q.shape[2], k.shape[2], causal)
    lse = check_padded_rows(o, lse, padded)
    g = torch.Generator(device=DEV).manual_seed(seed)
    # Upstream gradients representable in the compute dtype, so both sides see the same numbers.
    do = torch.randn(o.shape, generator=g, device=DEV).to(q.dtype).double()
    dl = torch.randn(lse.shape, generator=g, device=DEV).double() * float(use_lse)
    loss = (o.double() * do).sum()
    (loss + (lse.double() * dl).sum() if use_lse else loss).backward()

    r_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    r_lw = logw.detach().double().requires_grad_() if logw is not None else None
    ro, rlse = gated_prefix_attention_ref(*r_leaves, r_lw, kv, causal=causal)
    rlse = check_padded_rows(ro, rlse, padded)
    ((ro * do).sum() + (rlse * dl).sum()).backward()

    errs = {"o": rel(o, ro), "lse": rel(lse, rlse)}
    for name, a, b in zip(("dq", "dk", "dv", "dprompt_k", "dprompt_v"), leaves, r_leaves):
        assert a.grad.dtype == a.dtype and torch.isfinite(a.grad).all(), name
        errs[name] = rel(a.grad, b.grad)
    if lw is not None:
        assert torch.isfinite(lw.grad).all()
        errs["dlogw"] = rel(lw.grad, r_lw.grad)
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errs})"
    return leaves, lw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_main_shape(tk, dtype):
    # S=1000 (not a multiple of any tile), padding left and right, top-k zeros, GQA 4.
    check(make_inputs(dtype=dtype), TOL[dtype])


def test_backward_is_repeatable(tk):
    # dq_mode "split": dq, dk, dv come from plain stores, bitwise equal across runs; the prompt
    # gradients use fp32 atomics over the batch, so only their summation order may differ.
    q, k, v, pk, pv, logw, kv = make_inputs(B=4, Sq=512, seed=2)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv, logw)]
    do = torch.randn_like(q)
    grads = []
    for _ in range(2):
        o = gated_prefix_attention(*leaves[:5], leaves[5], kv)
        with tk.override_configs(dq_mode="split"):
            grads.append(torch.autograd.grad(o, leaves, do))
    for i in range(3):
        assert torch.equal(grads[0][i], grads[1][i])
    for i in range(3, 6):
        assert rel(grads[0][i], grads[1][i]) < 1e-5


@pytest.mark.parametrize("Sq,Sk", [(1, 1000), (300, 1000)])
def test_decode_and_chunked_prefill_one_prompt_token(tk, Sq, Sk):
    # Sq=1: packed GQA forward (one program per KV head); 300: per-head tiles with an offset diagonal.
    # J*L = 1: a single prompt token, the rest of its tile masked.
    check(make_inputs(Sq=Sq, Sk=Sk, J=1, L=1, seed=3), TOL[torch.bfloat16])


def test_awkward_gqa3_one_valid_token(tk):
    # J*L = 15 (prompt tiles ragged), Hq/Hkv = 3, S = 777, sample 0 has a single valid token.
    check(make_inputs(Hq=24, Hkv=8, Sq=777, J=5, L=3, pad="one_valid", seed=4), TOL[torch.bfloat16])


def test_per_sample_prompts(tk):
    check(make_inputs(Sq=640, J=1, L=16, per_sample=True, seed=5), TOL[torch.bfloat16])


def test_head_dim_64(tk):
    check(make_inputs(Hq=16, Hkv=4, Sq=700, d=64, seed=7), TOL[torch.bfloat16])


def test_nothing_visible_is_zero_not_nan(tk):
    q, k, v, pk, pv, logw, kv = make_inputs(Sq=400, seed=8)
    logw[0] = -math.inf  # sample 0: every expert dropped, and its first third is padding
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv, logw)]
    o, lse = gated_prefix_attention_with_lse(*leaves[:5], leaves[5], kv)
    assert torch.isfinite(o).all()
    hidden = torch.arange(400, device=DEV) < 400 // 3  # causal rows before sample 0's first valid key
    assert hidden.any()
    assert (o[0][:, hidden] == 0).all() and torch.isneginf(lse[0][:, hidden]).all()
    grads = torch.autograd.grad(o.float().square().sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[5][0] == 0).all()


def test_torch_compile_fullgraph(tk):
    q, k, v, pk, pv, logw, kv = make_inputs(Sq=256, seed=9)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv, logw)]

    def f(q, k, v, pk, pv, logw):
        return gated_prefix_attention(q, k, v, pk, pv, logw, kv)

    torch._dynamo.reset()
    o_c = torch.compile(f, fullgraph=True)(*leaves)
    g_c = torch.autograd.grad(o_c.float().sum(), leaves)
    o_e = f(*leaves)
    g_e = torch.autograd.grad(o_e.float().sum(), leaves)
    assert torch.equal(o_c, o_e)
    for a, b in zip(g_c[:3], g_e[:3]):
        assert torch.equal(a, b)
    for a, b in zip(g_c[3:], g_e[3:]):
        assert rel(a, b) < 1e-5


# Each case compiles its own dK/dV variant on the GPU (seconds each): the dtypes and layouts that change
# the kernel, the rest is left to the interpreter tests (fp16, decode offsets).
ATOMIC_CASES = {
    "bf16": dict(),
    "fp32": dict(dtype=torch.float32, Sq=300, seed=11),
    "gqa3_one_valid_jl15": dict(Hq=24, Hkv=8, Sq=777, J=5, L=3, pad="one_valid", seed=12),
    "d64": dict(Hq=16, Hkv=4, Sq=700, d=64, seed=13),
    "per_sample": dict(Sq=640, J=1, L=16, per_sample=True, seed=15),
}


@pytest.mark.parametrize("case", list(ATOMIC_CASES))
def test_atomic_dq(tk, case):
    # dQ added by the dK/dV programs with fp32 atomics (no dQ kernel): same tolerances as the default.
    kw = ATOMIC_CASES[case]
    with tk.override_configs(dq_mode="atomic"):
        check(make_inputs(**kw), TOL[kw.get("dtype", torch.bfloat16)])


# The shared-prefix cascade (prefix_cascade.py): the own keys by torch's FlashAttention, the prompts by
# the Triton kernels from its softmax state. No key padding, or right padding (the key mask is then
# redundant: the padded queries are zeroed and hidden from the backward).
CASCADE_CASES = {
    "right_pad_b3": (dict(B=3, Sq=900, pad="right", seed=26), True),
    "bf16": (dict(pad=None, seed=21), True),
    "fp16_gqa3_jl15": (dict(Hq=24, Hkv=8, Sq=777, J=5, L=3, dtype=torch.float16, pad=None, seed=22), True),
    "d64_per_sample_not_causal": (dict(Hq=16, Hkv=4, Sq=500, Sk=700, d=64, J=1, L=16, per_sample=True,
                                       pad=None, seed=23), False),
}


@pytest.mark.parametrize("case", list(CASCADE_CASES))
def test_cascade(tk, cascade_calls, case):
    kw, causal = CASCADE_CASES[case]
    with tk.override_configs(cascade=True):
        check(make_inputs(**kw), TOL[kw.get("dtype", torch.bfloat16)], causal=causal, use_lse=False)
    assert cascade_calls == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("case", ["bf16", "d64_per_sample_not_causal", "right_pad_b3"])
def test_cascade_fused_dq(tk, cascade_calls, case):
    # cascade_dq "fused": the prompt pass's dK/dV programs add dQ into FlashAttention's (J*L = 128 and
    # 16: one prompt block), with the fused forward in front (mode "bwd").
    kw, causal = CASCADE_CASES[case]
    with tk.override_configs(cascade="bwd", cascade_dq="fused"):
        check(make_inputs(**kw), TOL[kw.get("dtype", torch.bfloat16)], causal=causal, use_lse=False)
    assert cascade_calls == {"fwd": 0, "bwd": 1}


@pytest.mark.parametrize("pad", ["left", "both"])
def test_cascade_keeps_the_fused_kernels_for_other_padding(tk, cascade_calls, pad):
    with tk.override_configs(cascade=True):
        check(make_inputs(Sq=700, pad=pad, seed=27), TOL[torch.bfloat16], use_lse=False)
    assert cascade_calls == {"fwd": 0, "bwd": 0}


def test_cascade_lse_gradient_takes_the_fused_backward(tk, cascade_calls):
    with tk.override_configs(cascade=True):
        check(make_inputs(Sq=600, pad=None, seed=24), TOL[torch.bfloat16], use_lse=True)
    assert cascade_calls == {"fwd": 1, "bwd": 0}


def test_cascade_auto_is_the_backward_from_2048_keys(tk, cascade_calls, monkeypatch):
    # The default: the fused forward, and the cascade's backward from CASCADE_MIN_S own keys on.
    from mops_fast.ops import prefix_cascade as pc

    monkeypatch.delenv("MOPS_FAST_GPA_CASCADE", raising=False)
    S = pc.CASCADE_MIN_S
    q = torch.empty(1, 4, S, 64, device=DEV, dtype=torch.bfloat16)
    k = torch.empty(1, 2, S, 64, device=DEV, dtype=torch.bfloat16)
    assert pc.applies(q, k, None, True, True) and not pc.applies(q, k, None, True, False)
    assert not pc.applies(q[:, :, 1:], k[:, :, 1:], None, True, True)  # fewer keys: the fused backward
    check(make_inputs(B=1, Hq=16, Hkv=4, Sq=S + 37, pad=None, seed=25), TOL[torch.bfloat16], use_lse=False)
    assert cascade_calls == {"fwd": 0, "bwd": 1}
    # a right-padded training batch takes it too
    check(make_inputs(B=2, Hq=16, Hkv=4, Sq=S + 37, pad="right", seed=28), TOL[torch.bfloat16], use_lse=False)
    assert cascade_calls == {"fwd": 0, "bwd": 2}
