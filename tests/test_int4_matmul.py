"""Int4 matmul on the CPU: the reference against float64, the custom ops (schema, fake, autograd), the
dispatch (C++ kernel when built, reference otherwise) and QuantLinear for 2/3/4/8 bits."""
import pytest
import torch
import torch.nn.functional as F

from mops_fast.nn.quant_linear import QuantLinear
from mops_fast.ops import int4_matmul as op
from mops_fast.quant.pack import default_g_idx, pack_cols, pack_rows
from mops_fast.quant.quantizer import QuantizedWeight


pytestmark = pytest.mark.usefixtures("one_thread")


def make_weight(K, N, group_size, act_order=False, sym=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = 1 if group_size == -1 else -(-K // group_size)
    codes = torch.randint(0, 16, (K, N), generator=g)
    zeros = torch.full((G, N), 8) if sym else torch.randint(0, 16, (G, N), generator=g)
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.001).half()
    g_idx = default_g_idx(K, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    return pack_rows(codes, 4), pack_cols(zeros, 4), scales, g_idx


def rel(a, b):
    return float((a.detach().double() - b).norm() / b.norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_reference_matches_float64(dtype, tol):
    qw, qz, sc, gi = make_weight(576, 72, 128, act_order=True, seed=1)
    W = op.dequantize_int4(qw, qz, sc, gi, torch.float64)
    x = torch.randn(3, 576).to(dtype)
    dy = torch.randn(3, 72).to(dtype)
    assert rel(op.int4_matmul_ref(x, qw, qz, sc, gi), x.double() @ W.t()) < tol
    assert rel(op.int4_matmul_t_ref(dy, qw, qz, sc, gi), dy.double() @ W) < tol


def test_dequantize_by_hand():
    # W[n, k] = (code - zero[g_idx[k], n]) * scale[g_idx[k], n] for one hand-made entry
    codes = torch.zeros(16, 8, dtype=torch.int64)
    codes[9, 3] = 13
    zeros = torch.tensor([[8] * 8, [2] * 8])
    scales = torch.tensor([[0.5] * 8, [0.25] * 8]).half()
    W = op.dequantize_int4(pack_rows(codes, 4), pack_cols(zeros, 4), scales, default_g_idx(16, 8))
    assert W.shape == (8, 16)
    assert W[3, 9] == (13 - 2) * 0.25 and W[0, 0] == -8 * 0.5 and W[3, 1] == -4.0


@pytest.mark.parametrize("group_size,act", [(128, False), (64, True), (-1, False)])
def test_op_forward_backward_any_leading_dims(group_size, act, monkeypatch):
    qw, qz, sc, gi = make_weight(576, 40, group_size, act_order=act, seed=2)
    W = op.dequantize_int4(qw, qz, sc, gi, torch.float64)
    x = torch.randn(2, 3, 576, requires_grad=True)
    y = op.int4_matmul(x, qw, qz, sc, gi, 0 if act else group_size)
    assert y.shape == (2, 3, 40)
    assert rel(y, x.detach().double() @ W.t()) < 1e-5
    dy = torch.randn_like(y)
    y.backward(dy)
    assert rel(x.grad, dy.double() @ W) < 1e-5
    dx = op.int4_matmul_t(dy, qw, qz, sc, gi)
    assert rel(dx, dy.double() @ W) < 1e-5


def test_custom_op_registration_passes_opcheck(monkeypatch):
    monkeypatch.setenv("MOPS_FAST_INT4_IMPL", "ref")
    qw, qz, sc, gi = make_weight(64, 16, 32, seed=3)
    x = torch.randn(4, 64, requires_grad=True)
    res = torch.library.opcheck(torch.ops.mops_fast.int4_matmul.default, (x, qw, qz, sc, gi, 32))
    assert all(v == "SUCCESS" for v in res.values()), res
    dy = torch.randn(4, 16)
    res = torch.library.opcheck(torch.ops.mops_fast.int4_matmul_t.default, (dy, qw, qz, sc, gi, 32))
    assert all(v == "SUCCESS" for v in res.values()), res


def test_gradcheck_through_reference(monkeypatch):
    monkeypatch.setenv("MOPS_FAST_INT4_IMPL", "ref")
    qw, qz, sc, gi = make_weight(32, 8, 16, seed=4)
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op.int4_matmul(t, qw, qz, sc, gi, 16), (x,))


@pytest.mark.parametrize("impl", ["auto", "native", "ref"])
def test_dispatch_cpu_native_or_reference_agree(impl, monkeypatch):
    # each CPU path (C++ kernel when built, else the reference) matches float64
    monkeypatch.setenv("MOPS_FAST_INT4_IMPL", impl)
    qw, qz, sc, gi = make_weight(576, 72, 128, act_order=True, seed=5)
    W = op.dequantize_int4(qw, qz, sc, gi, torch.float64)
    x = torch.randn(5, 576)
    assert rel(op.int4_matmul(x, qw, qz, sc, gi), x.double() @ W.t()) < 1e-4
    dy = torch.randn(5, 72)
    assert rel(op.int4_matmul_t(dy, qw, qz, sc, gi), dy.double() @ W) < 1e-4


def test_native_cpu_path_validates_once_and_keeps_its_safety_checks(monkeypatch):
    """ops.int4_matmul validates each call once: the native kernel is called without a second weight
    check, yet what only the native side checks still holds (g_idx range, scales dtype, one device)."""
    from mops_fast import native

    if not native.available():
        pytest.skip(f"native CPU kernels not built: {native.unavailable_reason()}")
    calls = []
    monkeypatch.setattr(native, "_check_weight", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("second validation")))
    qw, qz, sc, gi = make_weight(96, 24, 32, seed=7)
    W = op.dequantize_int4(qw, qz, sc, gi, torch.float64)
    x, dy = torch.randn(3, 96), torch.randn(3, 24)
    assert rel(op.int4_matmul(x, qw, qz, sc, gi), x.double() @ W.t()) < 1e-5
    assert rel(op.int4_matmul_t(dy, qw, qz, sc, gi), dy.double() @ W) < 1e-5
    assert calls == []
    bad = gi.clone()
    bad[5] = 3  # only 3 groups: index 3 would read past the scales
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, G=3\)"):
        op.int4_matmul(x, qw, qz, sc, bad)
    # fp64 scales are not a native dtype: the reference takes the call, still exact
    assert rel(op.int4_matmul(x.double(), qw, qz, sc.double(), gi), x.double() @ W.t()) < 1e-12
    with pytest.raises(ValueError, match="move one of them"):
        op.int4_matmul_t(dy.to("meta"), qw, qz, sc, gi)


def test_bad_impl_override_and_shapes(monkeypatch):
    qw, qz, sc, gi = make_weight(64, 16, 32, seed=6)
    with pytest.raises(ValueError, match="expects K=64"):
        op.int4_matmul(torch.randn(2, 63), qw, qz, sc, gi)
    with pytest.raises(ValueError, match="g_idx must be int32"):
        op.int4_matmul(torch.randn(2, 64), qw, qz, sc, gi.long())
    # a group size that disagrees with the scales' rows (64 / 32 = 2 here) is refused on both ops
    with pytest.raises(ValueError, match="group_size=16 does not fit K=64 with G=2"):
        op.int4_matmul(torch.randn(2, 64), qw, qz, sc, gi, 16)
    with pytest.raises(ValueError, match="group_size=64 does not fit K=64 with G=2"):
        op.int4_matmul_t(torch.randn(2, 16), qw, qz, sc, gi, 64)
    assert op.int4_matmul(torch.randn(2, 64), qw, qz, sc, gi, 32).shape == (2, 16)
    monkeypatch.setenv("MOPS_FAST_INT4_IMPL", "magic")
    with pytest.raises(ValueError, match="MOPS_FAST_INT4_IMPL"):
        op.int4_matmul(torch.randn(2, 64), qw, qz, sc, gi)


def test_small_m_knobs_from_env(monkeypatch):
    # the small-M CUDA kernels' hints the dispatch passes: the kernel's own (0) unless the variables say
    # otherwise, per M bracket; a value the kernel does not take is refused with the allowed ones
    for var in ("MOPS_FAST_INT4_FWD_STEPS", "MOPS_FAST_INT4_FWD_KSPLIT", "MOPS_FAST_INT4_FWD_PREFETCH",
                "MOPS_FAST_INT4_BWD_PREFETCH", "MOPS_FAST_INT4_PDL", "MOPS_FAST_INT4_NATIVE_BWD"):
        monkeypatch.delenv(var, raising=False)
    assert [op.small_m_knob(k, M) for k in op.SMALL_M_KNOBS for M in (1, 16)] == [0] * 8
    monkeypatch.setenv("MOPS_FAST_INT4_FWD_STEPS", "22, 4")
    monkeypatch.setenv("MOPS_FAST_INT4_FWD_KSPLIT", "4")
    assert [op.small_m_knob("fwd_steps", M) for M in (1, 8, 9, 16)] == [22, 22, 4, 4]
    assert [op.small_m_knob("fwd_ksplit", M) for M in (1, 16)] == [4, 4]
    monkeypatch.setenv("MOPS_FAST_INT4_FWD_PREFETCH", "0,16")
    assert op.small_m_settings() == {"fwd_steps": [22, 4], "fwd_ksplit": [4, 4], "fwd_prefetch": [0, 16],
                                     "bwd_prefetch": [0, 0], "pdl": True, "native_bwd": True}
    for bad in ("5", "2,3,4", "fast", "2;4", "-1"):
        monkeypatch.setenv("MOPS_FAST_INT4_FWD_KSPLIT", bad)
        with pytest.raises(ValueError, match=r"MOPS_FAST_INT4_FWD_KSPLIT.*one of \(0, 1, 2, 3, 4, 6, 8\)"):
            op.small_m_knob("fwd_ksplit", 1)
    monkeypatch.setenv("MOPS_FAST_INT4_FWD_STEPS", "32")  # a dropped variant
    with pytest.raises(ValueError, match=r"MOPS_FAST_INT4_FWD_STEPS.*one of \(0, 4, 22\)"):
        op.small_m_knob("fwd_steps", 16)


def _quant_linear(bits, K, N, group_size, act, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = 1 if group_size == -1 else -(-K // group_size)
    codes = torch.randint(0, 2**bits, (N, K), generator=g)
    zeros = torch.randint(0, 2**bits, (G, N), generator=g)
    scales = (torch.rand(G, N, generator=g) * 0.02 + 1e-3).half().float()
    g_idx = default_g_idx(K, group_size)
    if act:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    q = QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size, sym=False, desc_act=act)
    layer = QuantLinear(K, N, bias=bias, bits=bits, group_size=group_size, bias_dtype=torch.float32)
    b = torch.randn(N, generator=g) if bias else None
    layer.set_quantized(*q.pack(), bias=b)
    return layer, q.dequantize(), b


@pytest.mark.parametrize("bits,K,group_size,act,bias", [(4, 576, 128, False, True), (4, 576, 128, True, False),
                                                        (3, 576, 64, False, False), (2, 256, 32, True, True),
                                                        (8, 200, -1, False, False)])
def test_quant_linear_matches_dense_forward_and_input_grad(bits, K, group_size, act, bias):
    layer, W, b = _quant_linear(bits, K, 96, group_size, act, bias, seed=bits)
    x = torch.randn(2, 5, K, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref = F.linear(x_ref, W, b)
    assert rel(y, y_ref.detach().double()) < 1e-5
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert rel(x.grad, x_ref.grad.double()) < 1e-5
    assert not any(p.requires_grad for p in layer.parameters())  # frozen: buffers only
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx"} | ({"bias"} if bias else set())


def test_quant_linear_state_dict_roundtrip_and_dtypes():
    layer, W, _ = _quant_linear(4, 576, 96, 128, True, True, seed=9)
    other = QuantLinear(576, 96, bias=True, bits=4, group_size=128, bias_dtype=torch.float32)
    other.load_state_dict(layer.state_dict())
    assert not other.has_trivial_g_idx()  # the cached flag was reset by the load
    x = torch.randn(3, 576)
    assert torch.equal(other(x), layer(x))
    y16 = other(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and rel(y16, layer(x).double()) < 1e-2


def test_quant_linear_follows_a_replaced_g_idx():
    # the g_idx order is checked once per g_idx tensor: buffers replaced by assignment (no load, no
    # set_quantized) with another layer's act-order ones give that layer's product, and back
    layer, W, _ = _quant_linear(4, 256, 64, 64, False, False, seed=12)
    other, W2, _ = _quant_linear(4, 256, 64, 64, True, False, seed=13)
    x = torch.randn(3, 256)
    assert layer.has_trivial_g_idx() and rel(layer(x), x.double() @ W.double().t()) < 1e-5
    saved = {n: getattr(layer, n) for n in ("qweight", "qzeros", "scales", "g_idx")}
    for n in saved:
        setattr(layer, n, getattr(other, n))
    assert not layer.has_trivial_g_idx() and rel(layer(x), x.double() @ W2.double().t()) < 1e-5
    for n, t in saved.items():
        setattr(layer, n, t)
    assert layer.has_trivial_g_idx() and rel(layer(x), x.double() @ W.double().t()) < 1e-5


@pytest.mark.parametrize("act", [False, True])
def test_quant_linear_compiles_fullgraph_before_any_eager_call(act):
    # torch.compile of a layer that has never run eagerly: the g_idx order check reads values, which a
    # graph cannot branch on, so the traced call reads groups from g_idx; the same product and grad
    layer, W, b = _quant_linear(4, 256, 64, 64, act, True, seed=14)
    x = torch.randn(2, 3, 256, requires_grad=True)
    torch._dynamo.reset()
    f = torch.compile(lambda t: layer(t).square().sum(), fullgraph=True, backend="aot_eager")
    loss = f(x)
    (gx,) = torch.autograd.grad(loss, x)
    xr = x.detach().double().requires_grad_()
    ref = F.linear(xr, W.double(), b.double()).square().sum()
    (gr,) = torch.autograd.grad(ref, xr)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert rel(gx, gr) < 1e-5


def test_quant_linear_checks_its_weight_once_and_again_when_it_changes(monkeypatch):
    # decoding calls each layer hundreds of times a token: the weight is validated once and kept
    # (Int4Weight); a new load, another dtype or device, a replaced buffer or one resized in place is
    # validated again, and a bad one still fails with the check's message
    layer, W, b = _quant_linear(4, 256, 64, 64, False, True, seed=4)
    x = torch.randn(2, 256)
    y = layer(x)
    checks = []
    real = op.check_int4_args
    monkeypatch.setattr(op, "check_int4_args", lambda *a: checks.append(1) or real(*a))
    assert torch.equal(layer(x), y) and torch.equal(layer(x), y) and checks == []
    assert layer._checked.holds(layer.qweight, layer.qzeros, layer.scales, layer.g_idx)
    other, _, _ = _quant_linear(4, 256, 64, 64, False, True, seed=5)
    layer.load_state_dict(other.state_dict())  # copied into the same tensors: new values, one new check
    assert torch.equal(layer(x), other(x)) and len(checks) == 2  # (other's own first call checks too)
    layer.to(torch.float64)  # _apply: new tensors
    assert rel(layer(x.double()), other(x).double()) < 1e-6 and len(checks) == 3
    layer.qzeros = torch.zeros(3, 8, dtype=torch.int32)  # a replaced buffer of the wrong shape
    with pytest.raises(ValueError, match=r"qzeros must be int32 \(4, 8\)"):
        layer(x.double())
    layer.qzeros = other.qzeros.clone()
    assert rel(layer(x.double()), other(x).double()) < 1e-6
    with torch.no_grad():
        layer.scales.resize_(2, 64)  # resized in place: the same object, another shape
    with pytest.raises(ValueError, match=r"qzeros must be int32 \(2, 8\)"):
        layer(x.double())


def test_quant_linear_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not supported"):
        QuantLinear(64, 64, bits=5)
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantLinear(48, 64, bits=3)
    layer = QuantLinear(64, 32, bits=4, group_size=32)
    with pytest.raises(ValueError, match="qweight has shape"):
        layer.set_quantized(torch.zeros(4, 32, dtype=torch.int32), layer.qzeros, layer.scales, layer.g_idx)


def test_from_linear_rtn_is_close_to_the_dense_layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, bias=True)
    q = QuantLinear.from_linear(lin, bits=4, group_size=64)
    x = torch.randn(8, 256)
    err = rel(q(x), lin(x).detach().double())
    assert 1e-4 < err < 0.1  # quantized (not equal), yet close
