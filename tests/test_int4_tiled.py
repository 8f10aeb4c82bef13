"""qweight in the tiled order (a 3-D (ceil(N/32), K/8, 32) tensor, mops_fast.quant.pack.tile_qweight): every
int4 path on the CPU gives what it gives on GPTQ order (the Triton kernels under the interpreter, the
chunked path, the C++ kernels and the reference), and malformed tiled weights are refused."""
import pytest
import torch

from mops_fast.ops import int4_matmul as op
from mops_fast.quant.pack import tile_qweight
from test_int4_matmul import make_weight

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    (256, 72, 64, False),    # N not a multiple of 32: the last tile padded
    (520, 40, 128, False),   # K not a multiple of the group; one full tile and a padded one
    (256, 96, 32, True),     # act-order: groups gathered through g_idx
]


@pytest.mark.parametrize("K, N, group, act", CASES)
def test_triton_kernels_read_the_tiled_order(K, N, group, act):
    qw, qz, sc, gi = make_weight(K, N, group, act_order=act, seed=K + N)
    qt = tile_qweight(qw)
    promise = 0 if act else group
    x = torch.randn(5, K, dtype=torch.float16)
    dy = torch.randn(5, N, dtype=torch.float16)
    for unpack in (0, 1):
        cfg = {"UNPACK": unpack}
        assert torch.equal(op.int4_matmul_triton(x, qt, qz, sc, gi, promise, config=cfg),
                           op.int4_matmul_triton(x, qw, qz, sc, gi, promise, config=cfg)), unpack
        assert torch.equal(op.int4_matmul_t_triton(dy, qt, qz, sc, gi, promise, config=cfg),
                           op.int4_matmul_t_triton(dy, qw, qz, sc, gi, promise, config=cfg)), unpack
    # the chunked path's dequantization kernel, on slices that cut through a tile
    assert torch.equal(op.int4_matmul_chunked(x, qt, qz, sc, gi, promise, chunk=24),
                       op.int4_matmul_chunked(x, qw, qz, sc, gi, promise, chunk=24))
    assert torch.equal(op.int4_matmul_t_chunked(dy, qt, qz, sc, gi, promise, chunk=128),
                       op.int4_matmul_t_chunked(dy, qw, qz, sc, gi, promise, chunk=128))


@pytest.mark.parametrize("K, N, group, act", CASES)
def test_dispatch_reference_and_autograd_take_the_tiled_order(K, N, group, act, monkeypatch):
    qw, qz, sc, gi = make_weight(K, N, group, act_order=act, seed=K + N + 1)
    qt = tile_qweight(qw)
    promise = 0 if act else group
    assert torch.equal(op.dequantize_int4(qt, qz, sc, gi), op.dequantize_int4(qw, qz, sc, gi))
    for impl in ("auto", "ref"):  # the C++ kernel when built (it untiles), and the reference
        monkeypatch.setenv("MOPS_FAST_INT4_IMPL", impl)
        x = torch.randn(2, 3, K, requires_grad=True)
        y = op.int4_matmul(x, qt, qz, sc, gi, promise)
        assert y.shape == (2, 3, N)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        x2 = x.detach().clone().requires_grad_()
        y2 = op.int4_matmul(x2, qw, qz, sc, gi, promise)
        (g2,) = torch.autograd.grad(y2.square().sum(), x2)
        assert torch.equal(y, y2) and torch.equal(g, g2), impl
        dy = torch.randn(4, N)
        assert torch.equal(op.int4_matmul_t(dy, qt, qz, sc, gi, promise), op.int4_matmul_t(dy, qw, qz, sc, gi, promise))


def test_malformed_tiled_weights_are_refused():
    qw, qz, sc, gi = make_weight(256, 72, 64, seed=3)
    qt = tile_qweight(qw)
    x = torch.randn(1, 256)
    with pytest.raises(ValueError, match="tiled order"):
        op.int4_matmul(x, qt[:2], qz, sc, gi)  # a tile missing
    with pytest.raises(ValueError, match="tiled order"):
        op.int4_matmul(x, qt.reshape(3, 64, 16), qz, sc, gi)  # tiles of 16 columns
    with pytest.raises(ValueError, match="qweight must be an int32"):
        op.int4_matmul(x, qt.unsqueeze(0), qz, sc, gi)
    with pytest.raises(ValueError, match="GPTQ order"):
        op.act_order_repack(qt, gi, 64)
    with pytest.raises(ValueError, match="must be contiguous"):  # the kernels index words from the shape
        op.int4_matmul(x, qw.t().contiguous().t(), qz, sc, gi)


def test_quant_linear_keeps_gptq_order_outside_its_kernels():
    # a layer holding the tiled order (what a CUDA layer does under cuda_weight_order() == "tiled") computes
    # the same, and state_dict, loading, set_quantized, dequantize_weight and moves off CUDA all see GPTQ order
    from mops_fast.nn.quant_linear import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 72, bias=True)
    layer = QuantLinear.from_linear(lin, group_size=64)
    qw = layer.qweight.clone()
    x = torch.randn(3, 256)
    want, w_want = layer(x), layer.dequantize_weight()
    layer._use_order(True)
    assert layer.qweight.shape == (3, 32, 32)
    assert torch.equal(layer(x), want) and torch.equal(layer.dequantize_weight(), w_want)
    sd = layer.state_dict()
    assert torch.equal(sd["qweight"], qw) and torch.equal(layer.gptq_qweight(), qw)
    layer.load_state_dict(sd)
    assert torch.equal(layer.qweight, qw)
    layer._use_order(True)
    layer.set_quantized(qw, layer.qzeros, layer.scales, layer.g_idx)
    assert torch.equal(layer.qweight, qw)
    layer._use_order(True)
    layer.to("cpu")  # the tiled order is a CUDA layout: any move that leaves the layer off CUDA untiles
    assert torch.equal(layer.qweight, qw) and torch.equal(layer(x), want)


def test_cuda_weight_order_is_checked():
    assert op.cuda_weight_order() == "gptq"  # the default until the order is timed on a GPU
    with pytest.raises(ValueError, match="choose 'gptq' or 'tiled'"):
        op.set_cuda_weight_order("rows")
