"""Triton gated-prefix attention under TRITON_INTERPRET=1 (CPU), against the float64 reference.

Forward (o, lse) and every gradient (q, k, v, prompt_k, prompt_v, gate_logw) on small, awkward shapes.
On a machine with CUDA these are skipped: tests/test_gated_prefix_attention_gpu.py covers the kernels
there (the interpreter would be slow on CUDA tensors and the GPU run is the real check).
"""
import importlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before anything imports the kernel module, so that its kernels are decorated as interpreted.
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from mops_fast.ops.gated_prefix_attention import (  # noqa: E402
    _gpa_fused,
    gated_prefix_attention,
    gated_prefix_attention_ref,
    gated_prefix_attention_with_lse,
)
from tests.conftest import check_padded_rows, padded_queries  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on CPU machines")


@pytest.fixture(scope="module")
def tk():
    """The kernel module, decorated in interpreter mode (reloaded if someone imported it before)."""
    os.environ["TRITON_INTERPRET"] = "1"
    from mops_fast.ops import triton_gated_prefix_attention as m

    if not m.INTERPRETED:
        m = importlib.reload(m)
    assert m.INTERPRETED
    return m


def make_inputs(B=2, Hq=6, Hkv=2, Sq=37, Sk=None, d=32, J=5, L=3, dtype=torch.float32,
                prompt_dtype=None, per_sample=False, pad="right", drop=True, gate=True, seed=0):
    Sk = Sq if Sk is None else Sk
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    q, k, v = rnd(B, Hq, Sq, d), rnd(B, Hkv, Sk, d), rnd(B, Hkv, Sk, d)
    pshape = (B, J, L, Hkv, d) if per_sample else (J, L, Hkv, d)
    pdt = prompt_dtype or dtype
    pk, pv = rnd(*pshape, dt=pdt), rnd(*pshape, dt=pdt)
    logw = None
    if gate:
        logw = torch.log_softmax(rnd(B, J, dt=torch.float32) * 2, -1)
        if drop and J > 1:  # top-k zeros: exact -inf log weights
            logw[0, 1] = -math.inf
            logw[B - 1, J - 1] = -math.inf
            if J > 3:
                logw[0, 3] = -math.inf
    kv = None
    if pad is not None:
        kv = torch.ones(B, Sk, dtype=torch.bool)
        if pad in ("right", "both"):
            kv[B - 1, Sk - max(1, Sk // 5):] = False
        if pad in ("left", "both"):
            kv[0, : max(1, Sk // 4)] = False
        if pad == "one_valid":  # sample 0: every own token padding but one
            kv[0] = False
            kv[0, Sk // 2] = True
    return q, k, v, pk, pv, logw, kv


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(inputs, tol, causal=True, use_lse=True, seed=1):
    """Fused (Triton, interpreted) vs float64 reference: o, lse and all six gradients."""
    q, k, v, pk, pv, logw, kv = inputs
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    lw = logw.clone().requires_grad_() if logw is not None else None
    o, lse = gated_prefix_attention_with_lse(*leaves, lw, kv, causal=causal, backend="triton")
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    padded = padded_queries(kv, q.shape[2], k.shape[2], causal)
    lse = check_padded_rows(o, lse, padded)

    r_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    r_lw = logw.detach().double().requires_grad_() if logw is not None else None
    ro, rlse = gated_prefix_attention_ref(*r_leaves, r_lw, kv, causal=causal)
    rlse = check_padded_rows(ro, rlse, padded)

    g = torch.Generator().manual_seed(seed)
    do = torch.randn(ro.shape, generator=g, dtype=torch.float64)
    dl = torch.randn(rlse.shape, generator=g, dtype=torch.float64)
    loss = (o.double() * do).sum() + ((lse.double() * dl).sum() if use_lse else 0)
    rloss = (ro * do).sum() + ((rlse * dl).sum() if use_lse else 0)
    loss.backward()
    rloss.backward()

    errs = {"o": rel(o, ro), "lse": rel(lse, rlse)}
    for name, a, b in zip(("dq", "dk", "dv", "dprompt_k", "dprompt_v"), leaves, r_leaves):
        assert a.grad is not None and a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
        assert torch.isfinite(a.grad).all(), name
        errs[name] = rel(a.grad, b.grad)
    if lw is not None:
        assert lw.grad.dtype == lw.dtype and torch.isfinite(lw.grad).all()
        errs["dlogw"] = rel(lw.grad, r_lw.grad)
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errs})"
    return errs


FP32 = 1e-5


def test_base_gqa3_awkward_lengths(tk):
    # S=37 not a multiple of 16; J=5, L=3 (tiles straddle experts); Hq/Hkv=3; padding on the right.
    check(make_inputs(), FP32)


def test_single_prompt_token_left_padding(tk):
    check(make_inputs(Sq=23, d=16, J=1, L=1, pad="left", Hq=4, Hkv=4), FP32)


def test_both_paddings_and_lse_unused(tk):
    check(make_inputs(Sq=33, pad="both", seed=3), FP32, use_lse=False)


def test_one_valid_token(tk):
    # Queries before the valid token see only the prompts: finite, and equal to the reference.
    check(make_inputs(Sq=29, pad="one_valid", seed=4), FP32)


@pytest.mark.parametrize("Sq,Sk", [(1, 29), (5, 40), (24, 38)])
def test_decode_sq_lt_sk(tk, Sq, Sk):
    # Sq*G <= 64 takes the packed (one program per KV head) forward; (24, 41) the per-head one.
    check(make_inputs(Sq=Sq, Sk=Sk, pad="left", seed=5 + Sq), FP32)


def test_per_sample_prompts_no_gate(tk):
    check(make_inputs(Sq=30, J=1, L=4, per_sample=True, gate=False, seed=7), FP32)


def test_per_sample_prompts_with_gate(tk):
    check(make_inputs(Sq=21, J=1, L=5, per_sample=True, pad="left", seed=8), FP32)


def test_strided_hf_layout(tk):
    # Hugging Face hands over (B, S, H, d) tensors transposed to (B, H, S, d): no copies, strides honored.
    q, k, v, pk, pv, logw, kv = make_inputs(Sq=22, seed=19)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous() and q.stride(-1) == 1
    check((q, k, v, pk, pv, logw, kv), FP32)


def test_not_causal(tk):
    check(make_inputs(Sq=26, pad="both", seed=9), FP32, causal=False)


@pytest.mark.parametrize("d", [64, 24])
def test_head_dims(tk, d):
    # 64: a real head dim; 24: padded to 32 inside the kernel with masked loads and stores.
    check(make_inputs(B=1, Hq=2, Hkv=1, Sq=19, d=d, J=2, L=5, seed=10 + d), FP32)


@pytest.mark.parametrize("cfg", [(32, 16), (16, 32), (16, 64)])
def test_block_shapes(tk, cfg):
    # Query and key tiles of different sizes move the diagonal and sequence ends inside tiles.
    bm, bn = cfg
    c = (bm, bn, 4, 1)
    with tk.override_configs(fwd=c, dkdv=c, dq=c):
        check(make_inputs(Sq=45, Sk=50, J=3, L=7, pad="both", seed=11 + bm), FP32)


ATOMIC_CASES = {
    "gqa3_right_pad": (dict(), FP32, True),
    "both_pads_d24_blocks": (dict(B=1, Hq=2, Hkv=1, Sq=45, Sk=50, d=24, J=3, L=7, pad="both", seed=31), FP32, True),
    "decode": (dict(Sq=5, Sk=40, pad="left", seed=32), FP32, True),
    "per_sample_not_causal": (dict(Sq=21, J=2, L=5, per_sample=True, pad="left", seed=33), FP32, False),
    "one_valid": (dict(Sq=29, pad="one_valid", seed=35), FP32, True),
    "bf16_fp32_prompts": (dict(Sq=27, dtype=torch.bfloat16, prompt_dtype=torch.float32, seed=36), 2e-2, True),
}


@pytest.mark.parametrize("case", list(ATOMIC_CASES))
def test_atomic_dq(tk, case):
    # dQ added by the dK/dV programs (fp32 atomics) instead of its own kernel: the same gradients.
    kw, tol, causal = ATOMIC_CASES[case]
    blocks = dict(dkdv=(16, 32, 4, 1)) if case.startswith("both_pads") else {}
    with tk.override_configs(dq_mode="atomic", **blocks):
        assert tk._dq_mode() == "atomic"
        check(make_inputs(**kw), tol, causal=causal)


def test_dq_mode_selection(tk, monkeypatch):
    assert tk._dq_mode() == tk.DEFAULT_DQ_MODE
    monkeypatch.setenv("MOPS_FAST_GPA_DQ", "atomic")
    assert tk._dq_mode() == "atomic"
    with tk.override_configs(dq_mode="split"):
        assert tk._dq_mode() == "split"
    torch.use_deterministic_algorithms(True)
    try:
        assert tk._dq_mode() == "split"  # atomics would change the summation order run to run
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("MOPS_FAST_GPA_DQ", "atomics")
    with pytest.raises(ValueError, match="MOPS_FAST_GPA_DQ"):
        tk._dq_mode()
    with pytest.raises(ValueError, match="dq_mode"):
        with tk.override_configs(dq_mode="fast"):
            pass


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_with_fp32_prompts(tk, dtype, tol):
    # fp32 prompt parameters with half activations (the training setup); bf16 dots are upcast
    # in interpreter mode, after the same rounding of P and dS the GPU does.
    check(make_inputs(Sq=27, dtype=dtype, prompt_dtype=torch.float32, seed=12), tol)


def test_nothing_visible_gives_zero_not_nan(tk):
    # All experts dropped for sample 0 and its first tokens padding: those rows would see nothing (a
    # softmax over nothing). They are padded queries: o = 0, lse = -inf and no gradient, in the kernels
    # and the reference alike.
    q, k, v, pk, pv, logw, kv = make_inputs(B=2, Hq=2, Hkv=1, Sq=20, J=2, L=2, pad="left", seed=13)
    logw[0] = -math.inf
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    lw = logw.clone().requires_grad_()
    o, lse = gated_prefix_attention_with_lse(*leaves, lw, kv, backend="triton")
    ro, rlse = gated_prefix_attention_ref(q.double(), k.double(), v.double(), pk.double(), pv.double(),
                                          logw.double(), kv)
    hidden = ~kv[:, None, :].expand(2, 2, 20)
    assert hidden[0].any() and not hidden[1].any() and not torch.isnan(ro).any()
    assert torch.isfinite(o).all()
    assert (o[hidden] == 0).all() and torch.isneginf(lse[hidden]).all() and (ro[hidden] == 0).all()
    assert rel(o[~hidden], ro[~hidden]) < FP32
    o.sum().backward()
    for t in leaves + [lw]:
        assert torch.isfinite(t.grad).all()
    assert (lw.grad[0] == 0).all()


def test_same_prompt_in_every_expert_is_plain_prefix(tk):
    # DESIGN identity: with one prompt in every expert the gate does not matter.
    q, k, v, pk, pv, logw, kv = make_inputs(Sq=18, J=4, L=3, drop=False, seed=14)
    pk_all, pv_all = pk[:1].expand_as(pk).contiguous(), pv[:1].expand_as(pv).contiguous()
    o = gated_prefix_attention(q, k, v, pk_all, pv_all, logw, kv, backend="triton")
    o1 = gated_prefix_attention(q, k, v, pk[:1], pv[:1], None, kv, backend="triton")
    assert rel(o, o1) < FP32


def fused_node(o) -> bool:
    """Whether o came from the fused kernels: the custom op (traced) or its eager autograd.Function."""
    name = type(o.grad_fn).__name__
    return "mops_fast" in name or "FusedGatedPrefixAttention" in name


def test_dispatch(tk, monkeypatch):
    q, k, v, pk, pv, logw, kv = make_inputs(B=1, Hq=2, Hkv=1, Sq=8, d=16, J=2, L=2, seed=15)
    q.requires_grad_()
    monkeypatch.delenv("MOPS_FAST_FORCE_TRITON", raising=False)
    o_ref = gated_prefix_attention(q, k, v, pk, pv, logw, kv)
    assert not fused_node(o_ref)  # CPU: the reference, plain autograd
    monkeypatch.setenv("MOPS_FAST_FORCE_TRITON", "1")
    o_fused = gated_prefix_attention(q, k, v, pk, pv, logw, kv)
    assert fused_node(o_fused)
    assert rel(o_fused, o_ref) < FP32
    # float64 always takes the reference; an explicit backend wins over the environment.
    o64 = gated_prefix_attention(q.double(), k.double(), v.double(), pk, pv, logw, kv)
    assert not fused_node(o64)
    o_r = gated_prefix_attention(q, k, v, pk, pv, logw, kv, backend="reference")
    assert not fused_node(o_r)


def test_eager_calls_skip_the_custom_op(tk, monkeypatch):
    # Eager calls launch the kernels directly (inference) or through a plain autograd.Function
    # (training): host time at decode and small shapes. torch.compile and fake tensors go through the
    # op; both give the same outputs and gradients.
    from mops_fast.ops import gated_prefix_attention as gm

    q, k, v, pk, pv, logw, kv = make_inputs(B=1, Hq=2, Hkv=1, Sq=9, d=16, J=2, L=2, seed=20)
    calls = []
    real = gm._gpa_fused

    def counting(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(gm, "_gpa_fused", counting)
    with torch.no_grad():
        o_inf = gated_prefix_attention(q, k, v, pk, pv, logw, kv, backend="triton")
    assert calls == []
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv, logw)]
    o_train, lse_train = gated_prefix_attention_with_lse(*leaves, kv, backend="triton")
    assert calls == [] and "FusedGatedPrefixAttention" in type(o_train.grad_fn).__name__
    assert torch.equal(o_inf, o_train.detach())
    g = torch.Generator().manual_seed(3)
    do, dl = torch.randn(o_train.shape, generator=g), torch.randn(lse_train.shape, generator=g)
    eager = torch.autograd.grad((o_train * do).sum() + (lse_train * dl).sum(), leaves)
    op_leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv, logw)]
    o_op, lse_op = real(*op_leaves, kv, 1.0 / math.sqrt(q.shape[-1]), True)
    traced = torch.autograd.grad((o_op * do).sum() + (lse_op * dl).sum(), op_leaves)
    assert torch.equal(o_op, o_train) and torch.equal(lse_op, lse_train)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)
    mode = torch._subclasses.FakeTensorMode()
    fq, fk, fv, fpk, fpv = (mode.from_tensor(t.detach()) for t in (q, k, v, pk, pv))
    with mode, torch.no_grad():
        assert gated_prefix_attention(fq, fk, fv, fpk, fpv, backend="triton").shape == q.shape
    assert calls == [1]


def test_bad_inputs(tk):
    q, k, v, pk, pv, logw, kv = make_inputs(B=1, Hq=2, Hkv=1, Sq=8, d=16, J=2, L=2, seed=16)
    with pytest.raises(ValueError, match="backend"):
        gated_prefix_attention(q, k, v, pk, pv, logw, kv, backend="cuda")
    with pytest.raises(ValueError, match="float64"):
        gated_prefix_attention(q.double(), k.double(), v.double(), pk, pv, logw, kv, backend="triton")
    with pytest.raises(ValueError, match="gate_logw"):
        gated_prefix_attention(q, k, v, pk, pv, logw[:, :1], kv, backend="triton")
    with pytest.raises(ValueError, match="key_valid"):
        gated_prefix_attention(q, k, v, pk, pv, logw, kv.int(), backend="triton")
    r = torch.randn
    with pytest.raises(ValueError, match="multiple"):
        gated_prefix_attention(r(1, 3, 8, 16), r(1, 2, 8, 16), r(1, 2, 8, 16), r(2, 2, 2, 16),
                               r(2, 2, 2, 16), backend="triton")
    with pytest.raises(ValueError, match="one device"):
        gated_prefix_attention(q.to("meta"), k, v, pk, pv, logw, kv, backend="triton")
    big = torch.randn(1, 1, 4, 320)
    with pytest.raises(ValueError, match="head dim"):
        gated_prefix_attention(big, big, big, torch.randn(1, 1, 1, 320), torch.randn(1, 1, 1, 320),
                               backend="triton")
    with pytest.raises(ValueError, match="block sizes"):
        with tk.override_configs(fwd=(24, 16, 4, 1), fwd_pack=(24, 16, 4, 1)):
            gated_prefix_attention(q, k, v, pk, pv, logw, kv, backend="triton")


def test_opcheck(tk):
    q, k, v, pk, pv, logw, kv = make_inputs(B=1, Hq=2, Hkv=1, Sq=9, d=16, J=2, L=2, seed=17)
    args = [t.requires_grad_() for t in (q, k, v, pk, pv, logw)]
    torch.library.opcheck(_gpa_fused, (*args, kv, 0.25, True))


def test_torch_compile_fullgraph(tk):
    # aot_eager traces forward and backward through the fake implementations (no C++ compiler needed).
    q, k, v, pk, pv, logw, kv = make_inputs(B=1, Hq=2, Hkv=1, Sq=10, d=16, J=2, L=2, seed=18)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv, logw)]

    def f(q, k, v, pk, pv, logw):
        return gated_prefix_attention(q, k, v, pk, pv, logw, kv, backend="triton").square().sum()

    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rloss = gated_prefix_attention_ref(*ref_leaves, kv)[0].square().sum()
    rgrads = torch.autograd.grad(rloss, ref_leaves)
    assert abs(loss.item() - rloss.item()) <= FP32 * abs(rloss.item())
    for a, b in zip(grads, rgrads):
        assert rel(a, b) < FP32


# Shared-prefix cascade (prefix_cascade.py): own keys by FlashAttention -- here its float32 stand-in --,
# prompts by the Triton kernels from that softmax state; fp16 / bf16, no key padding or right padding.
CASCADE_CASES = {
    # right padding (sample 1's last 7 tokens): no key mask, the padded queries zeroed and hidden
    "right_pad_gqa3_bf16": (dict(B=3, Sq=37, dtype=torch.bfloat16, pad="right", seed=46), 2e-2, True),
    "gqa3_bf16": (dict(Sq=37, dtype=torch.bfloat16, pad=None, seed=41), 2e-2, True),
    "fp16_d24_one_prompt_token": (dict(B=1, Hq=2, Hkv=1, Sq=33, d=24, J=1, L=1, dtype=torch.float16,
                                       pad=None, seed=42), 2e-3, True),
    "per_sample_not_causal_sq_lt_sk": (dict(Sq=21, Sk=30, J=1, L=5, per_sample=True, dtype=torch.bfloat16,
                                            pad=None, seed=43), 2e-2, False),
    "fp32_prompts_top_k": (dict(Sq=40, J=6, L=3, dtype=torch.bfloat16, prompt_dtype=torch.float32,
                                pad=None, seed=44), 2e-2, True),
}


@pytest.mark.parametrize("case", list(CASCADE_CASES))
def test_cascade(tk, cascade_calls, case):
    kw, tol, causal = CASCADE_CASES[case]
    # fwd_init: the prompt pass's own tile (16 queries x 32 prompt tokens here)
    with tk.override_configs(cascade=True, dkdv=(16, 16, 4, 1), fwd_init=(16, 32, 4, 1)):
        check(make_inputs(**kw), tol, causal=causal, use_lse=False)
    assert cascade_calls == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("case", ["gqa3_bf16", "per_sample_not_causal_sq_lt_sk", "fp32_prompts_top_k",
                                  "right_pad_gqa3_bf16"])
@pytest.mark.parametrize("cascade_dq", ["kernel", "fused"])
def test_cascade_backward_from_the_fused_forward(tk, cascade_calls, case, cascade_dq):
    # Mode "bwd" (what "auto" does on a GPU from CASCADE_MIN_S keys): the fused kernel's (o, lse) feed
    # the cascade's backward. cascade_dq "fused": the dK/dV programs add dQ where one 16-key block holds
    # every prompt (J*L = 15 and 5 here); J*L = 18 takes two blocks, so the dQ kernel again.
    kw, tol, causal = CASCADE_CASES[case]
    with tk.override_configs(cascade="bwd", cascade_dq=cascade_dq, dkdv=(16, 16, 4, 1)):
        check(make_inputs(**kw), tol, causal=causal, use_lse=False)
    assert cascade_calls == {"fwd": 0, "bwd": 1}


@pytest.mark.parametrize("pad", ["left", "both", "one_valid"])
def test_cascade_keeps_the_fused_kernels_for_other_padding(tk, cascade_calls, pad):
    # Padding before a real token: FlashAttention (no mask) would let real queries see it.
    with tk.override_configs(cascade=True, dkdv=(16, 16, 4, 1)):
        check(make_inputs(Sq=30, dtype=torch.bfloat16, pad=pad, seed=47), 2e-2, use_lse=False)
    assert cascade_calls == {"fwd": 0, "bwd": 0}


def test_right_padding_drops_the_key_mask(tk, monkeypatch):
    from mops_fast.ops import prefix_cascade as pc

    kv = torch.ones(3, 10, dtype=torch.bool)
    kv[1, 6:] = False
    kv[2, 9:] = False
    q, k = torch.randn(3, 2, 10, 16), torch.randn(3, 1, 10, 16)
    reads = []
    real_any = torch.Tensor.any
    monkeypatch.setattr(torch.Tensor, "any", lambda t, *a, **kw: reads.append(1) or real_any(t, *a, **kw))
    key_mask, rows = pc.masks(q, k, kv, True)
    assert key_mask is None and torch.equal(rows, kv)
    assert pc.masks(q, k, kv, True)[0] is None and len(reads) == 1  # read once, remembered on the tensor
    kv[0, 0] = False  # in place: a new version, read again; padding before a real token keeps the mask
    assert pc.masks(q, k, kv, True)[0] is kv and len(reads) == 2
    monkeypatch.setattr(torch.Tensor, "any", real_any)
    right = torch.ones(3, 10, dtype=torch.bool)
    right[0, 4:] = False
    assert pc.masks(q, k, right, False)[0] is right  # not causal: real queries would see later padding
    assert pc.masks(q[:, :, :4], k, right, True)[0] is right  # Sq != Sk (decode, chunks): the mask stays
    assert pc.masks(q[:, :, :4], k, right, True)[1] is None  # the kernels take the rows from the key mask
    meta = right.to("meta")
    assert pc.masks(q.to("meta"), k.to("meta"), meta, True)[0] is meta  # no host read while tracing
    # The fused kernels then run with no key mask and the rows mask alone.
    seen = {}
    fwd = tk.gpa_forward
    monkeypatch.setattr(tk, "gpa_forward", lambda *a, **kw: seen.update(kv=a[6], qv=kw.get("query_valid"))
                        or fwd(*a, **kw))
    q, k, v, pk, pv, logw, kvr = make_inputs(Sq=20, pad="right", seed=48)
    gated_prefix_attention(q, k, v, pk, pv, logw, kvr, backend="triton")
    assert seen["kv"] is None and torch.equal(seen["qv"], kvr)


def test_cascade_fused_dq_skips_the_dq_kernel(tk, monkeypatch):
    launched = []
    real = tk._gpa_bwd_dq_kernel

    class Counting:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(tk, "_gpa_bwd_dq_kernel", Counting())
    kw = CASCADE_CASES["gqa3_bf16"][0]
    for mode, P, expect in (("fused", 15, 0), ("kernel", 15, 1), ("fused", 18, 1)):
        launched.clear()
        q, k, v, pk, pv, logw, _ = make_inputs(**{**kw, "J": P // 3, "L": 3})
        with tk.override_configs(cascade="bwd", cascade_dq=mode, dkdv=(16, 16, 4, 1)):
            o = gated_prefix_attention(q.requires_grad_(), k, v, pk, pv, logw, None, backend="triton")
            o.float().sum().backward()
        assert len(launched) == expect, (mode, P)
    with pytest.raises(ValueError, match="cascade_dq"):
        with tk.override_configs(cascade_dq="atomic"):
            pass


def test_cascade_with_lse_gradient_and_dropped_experts(tk, cascade_calls):
    # A gradient on lse: the forward is the cascade's, the backward the fused kernels' (FlashAttention's
    # backward takes no dlse), from the same saved (o, lse). Sample 0 drops every expert.
    q, k, v, pk, pv, logw, kv = make_inputs(Sq=26, J=3, L=2, dtype=torch.bfloat16, pad=None, seed=45)
    logw[0] = -math.inf
    with tk.override_configs(cascade=True):
        q_, k_, v_, pk_, pv_ = (t.clone().requires_grad_() for t in (q, k, v, pk, pv))
        o, lse = gated_prefix_attention_with_lse(q_, k_, v_, pk_, pv_, logw, None, backend="triton")
        (o.float().square().sum() + lse.sum()).backward()
    assert cascade_calls == {"fwd": 1, "bwd": 0}
    r = [t.double().requires_grad_() for t in (q, k, v, pk, pv)]
    ro, rlse = gated_prefix_attention_ref(*r, logw.double(), None)
    (ro.square().sum() + rlse.sum()).backward()
    assert rel(o, ro) < 2e-2 and rel(lse, rlse) < 1e-3
    for a, b in zip((q_, k_, v_, pk_, pv_), r):
        assert rel(a.grad, b.grad) < 2e-2


def test_cascade_applies(tk, monkeypatch):
    from mops_fast.ops import prefix_cascade as pc

    q, k = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16), torch.randn(1, 1, 8, 16, dtype=torch.bfloat16)
    monkeypatch.delenv("MOPS_FAST_GPA_CASCADE", raising=False)
    assert pc._mode() == pc.DEFAULT_MODE == "auto"
    for bwd in (False, True):
        assert not pc.applies(q, k, None, True, bwd)  # auto: CUDA only; the CPU stand-in only when asked
    with tk.override_configs(cascade=True):
        assert pc.applies(q, k, None, True, False) and pc.applies(q, k, None, True, True)
        assert not pc.applies(q, k, torch.ones(1, 8, dtype=torch.bool), True, True)  # key padding
        assert not pc.applies(q.float(), k.float(), None, True, True)  # fp32: FlashAttention has no fp32
        assert not pc.applies(q, k[:, :, :5], None, True, True)  # Sq != Sk with a causal diagonal
        assert pc.applies(q, k[:, :, :5], None, False, True)
        assert not pc.applies(q[..., :12], k[..., :12], None, True, True)  # head dim not a multiple of 8
        torch.use_deterministic_algorithms(True)
        try:
            assert not pc.applies(q, k, None, True, True)  # FlashAttention's dq is accumulated with atomics
        finally:
            torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("MOPS_FAST_GPA_CASCADE", "bwd")
    assert pc.applies(q, k, None, True, True) and not pc.applies(q, k, None, True, False)
    monkeypatch.setenv("MOPS_FAST_GPA_CASCADE", "yes")
    with pytest.raises(ValueError, match="MOPS_FAST_GPA_CASCADE"):
        pc.applies(q, k, None, True, True)
    with pytest.raises(ValueError, match="cascade"):
        with tk.override_configs(cascade="always"):
            pass


def test_cascade_flash_calls_trace_on_meta(tk):
    # The aten FlashAttention calls, traced on meta tensors: their signatures and the shapes that come
    # back (GQA keys, lse per query head) are what the merge expects. The GPU tests run them for real.
    from mops_fast.ops import prefix_cascade as pc

    q = torch.empty(2, 6, 40, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 2, 40, 64, device="meta", dtype=torch.bfloat16)
    o, lse = pc._flash_forward(q, k, k, 0.125, True)
    assert o.shape == q.shape and lse.shape == (2, 6, 40) and lse.dtype == torch.float32
    dq, dk, dv = pc._flash_backward(o, q, k, k, o, lse, 0.125, True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape


def test_tile_tables_per_kind(tk, monkeypatch):
    # The GPU tables (the interpreter has its own small tiles): the cascade's passes have their own
    # measured tiles where one was measured, else their base kernel's.
    monkeypatch.setattr(tk, "INTERPRETED", False)
    monkeypatch.setattr(tk, "_arch", lambda device: "sm90")
    bf = torch.bfloat16
    assert tk._config("dkdv_prompt", bf, 128, None) == (32, 128, 8, 2) != tk._config("dkdv", bf, 128, None)
    assert tk._config("dkdv_prompt", bf, 64, None) == tk._SM90["dkdv"][64]
    assert tk._config("fwd_init", bf, 128, None) == (64, 64, 4, 1)
    assert tk._config("fwd_init", bf, 256, None) == tk._SM90["fwd"][256]
    assert tk._config("dkdv_prompt", torch.float32, 128, None) == tk._FP32["dkdv"][128]
    with tk.override_configs(dkdv=(16, 16, 4, 1)):  # a dK/dV override holds for the prompt pass too
        assert tk._config("dkdv_prompt", bf, 128, None) == (16, 16, 4, 1)
        with tk.override_configs(dkdv_prompt=(64, 128, 8, 2)):
            assert tk._config("dkdv_prompt", bf, 128, None) == (64, 128, 8, 2)
    monkeypatch.setattr(tk, "_arch", lambda device: "sm80")  # untimed on an A100: the dK/dV tile
    assert tk._config("dkdv_prompt", bf, 128, None) == tk._SM80["dkdv"][128]


def test_arch_is_asked_once_a_device(tk, monkeypatch):
    """The tile tables' architecture is remembered per device index (every launch asks for it); a device
    without an index (the current one, which may change) is asked each time."""
    asked = []
    caps = {0: (9, 0), 1: (8, 0)}

    def capability(device):
        asked.append(device)
        return caps[device.index if device.index is not None else 1]

    monkeypatch.setattr(tk, "_ARCH", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    d0, d1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert [tk._arch(d0), tk._arch(d1), tk._arch(d0), tk._arch(d1)] == ["sm90", "sm80", "sm90", "sm80"]
    assert asked == [d0, d1]
    assert tk._arch(torch.device("cuda")) == "sm80" and tk._arch(torch.device("cuda")) == "sm80"
    assert len(asked) == 4
