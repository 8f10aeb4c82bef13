"""The Triton int4 kernels under TRITON_INTERPRET=1 (CPU) against the float64 dequantized reference:
forward y = x W^T and backward-to-input dx = dy W, on awkward shapes (M = 1, K not a multiple of the group
size, N an odd multiple of 8, act-order g_idx, asym zeros, split reductions). fp32/fp16 activations; bf16
goes through the kernels' fp32-dot path under the interpreter (its bf16 dot is wrong there, PITFALLS.md).
On a CUDA machine these are skipped: tests/test_int4_matmul_gpu.py checks the compiled kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

pytest.importorskip("triton")

from mops_fast.ops import int4_matmul as op  # noqa: E402
from mops_fast.quant.pack import default_g_idx  # noqa: E402
from test_int4_matmul import make_weight, rel  # noqa: E402

pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on CPU machines"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernels are decorated lazily, per mode


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CASES = [  # M, K, N, group_size, act_order, sym, dtype
    (1, 576, 40, 128, False, True, torch.float32),  # decode; 576 = 4 x 128 + 64 (short last group)
    (5, 200, 72, 64, False, False, torch.float16),  # last group of 8
    (33, 576, 72, 128, True, False, torch.float32),  # act-order: gathered scales, several M tiles
    (17, 256, 64, -1, False, True, torch.bfloat16),  # one group per row
    (20, 192, 48, 32, False, False, torch.float16),  # group 32
    (3, 200, 40, 40, False, False, torch.float32),  # group size no tile divides: the gathering path
]


@pytest.mark.parametrize("unpack", [0, 1], ids=["reshape", "per_row"])
@pytest.mark.parametrize("M,K,N,gs,act,sym,dtype", CASES)
def test_forward_and_backward_match_reference(M, K, N, gs, act, sym, dtype, unpack):
    qw, qz, sc, gi = make_weight(K, N, gs, act, sym, seed=M + K)
    W = op.dequantize_int4(qw, qz, sc, gi, torch.float64)
    x = torch.randn(M, K).to(dtype)
    dy = torch.randn(M, N).to(dtype)
    promise = 0 if act else gs
    y = op.int4_matmul_triton(x, qw, qz, sc, gi, promise, config=dict(UNPACK=unpack))
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel(y, x.double() @ W.t()) < TOL[dtype]
    dx = op.int4_matmul_t_triton(dy, qw, qz, sc, gi, promise, config=dict(UNPACK=unpack))
    assert dx.dtype == dtype and dx.shape == (M, K)
    assert rel(dx, dy.double() @ W) < TOL[dtype]


def test_gathering_path_equals_grouped_path():
    # the same weight through g_idx gathers (group_size unknown) and through per-tile scale rows
    qw, qz, sc, gi = make_weight(576, 72, 128, seed=3)
    x = torch.randn(4, 576)
    a = op.int4_matmul_triton(x, qw, qz, sc, gi, 0)
    b = op.int4_matmul_triton(x, qw, qz, sc, gi, 128)
    assert rel(a, b.double()) < 1e-6


def test_split_reductions():
    qw, qz, sc, gi = make_weight(576, 72, 128, seed=4)
    W = op.dequantize_int4(qw, qz, sc, gi, torch.float64)
    x = torch.randn(3, 576)
    dy = torch.randn(3, 72)
    y = op.int4_matmul_triton(x, qw, qz, sc, gi, 128, config=dict(SPLIT=3))
    assert rel(y, x.double() @ W.t()) < 1e-5
    dx = op.int4_matmul_t_triton(dy, qw, qz, sc, gi, 128, config=dict(SPLIT=2, BN=16))
    assert rel(dx, dy.double() @ W) < 1e-5
    y16 = op.int4_matmul_triton(x.half(), qw, qz, sc, gi, 128, config=dict(SPLIT=2))
    assert y16.dtype == torch.float16 and rel(y16, x.half().double() @ W.t()) < 2e-3


def test_large_tile_config_and_non_contiguous_input():
    qw, qz, sc, gi = make_weight(256, 136, 64, seed=5)  # N = 136: a partial 128-wide tile
    W = op.dequantize_int4(qw, qz, sc, gi, torch.float64)
    x = torch.randn(256, 40).t()  # (40, 256), strides (1, 40)
    y = op.int4_matmul_triton(x, qw, qz, sc, gi, 64, config=dict(BM=64, BN=128, BK=64))
    assert rel(y, x.double() @ W.t()) < 1e-5
    dy = torch.randn(136, 40).t()
    dx = op.int4_matmul_t_triton(dy, qw, qz, sc, gi, 64, config=dict(BM=64, BK=64, BN=64))
    assert rel(dx, dy.double() @ W) < 1e-5


def test_act_order_repack_gives_the_same_product():
    qw, qz, sc, gi = make_weight(576, 40, 128, act_order=True, seed=6)
    perm, qw_sorted = op.act_order_repack(qw, gi, 128)
    x = torch.randn(2, 576)
    want = x.double() @ op.dequantize_int4(qw, qz, sc, gi, torch.float64).t()
    y = op.int4_matmul_triton(x[:, perm], qw_sorted, qz, sc, default_g_idx(576, 128), 128)
    assert rel(y, want) < 1e-5
    assert op.act_order_repack(qw, gi[torch.randperm(576)] * 0, 128) is None  # groups of the wrong size


@pytest.mark.parametrize("dtype,gs", [(torch.float16, 128), (torch.float32, 0), (torch.bfloat16, -1)])
def test_chunked_dequantize_then_matmul(dtype, gs):
    qw, qz, sc, gi = make_weight(576, 200, 128 if gs == 0 else gs, act_order=gs == 0, seed=9)
    W = op.dequantize_int4(qw, qz, sc, gi, torch.float64)
    x = torch.randn(3, 576).to(dtype)
    dy = torch.randn(3, 200).to(dtype)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel(op.int4_matmul_chunked(x, qw, qz, sc, gi, gs, chunk=64), x.double() @ W.t()) < tol
    assert rel(op.int4_matmul_t_chunked(dy, qw, qz, sc, gi, gs, chunk=256), dy.double() @ W) < tol
    part = op.dequantize_int4_slice_triton(qw, qz, sc, gi, 128, 520, 8, 200, dtype, gs)
    want = W.t()[128:520, 8:200]
    if dtype == torch.bfloat16:  # the interpreter's fp32 -> bf16 cast truncates instead of rounding
        assert rel(part, want) < 1e-2
    else:
        assert torch.equal(part, want.to(dtype))  # one rounding, as the reference


def test_exponent_trick_constants():
    # the kernels' fp16/bf16 dequantization: code | 0x6400 is the fp16 bit pattern of 1024 + code, and
    # code | 0x4300 the bf16 pattern of 128 + code (checked here in torch; bf16 math is GPU-tested)
    c = torch.arange(16, dtype=torch.int16)
    assert torch.equal((c | 0x6400).view(torch.float16).float(), 1024 + c.float())
    assert torch.equal((c | 0x4300).view(torch.bfloat16).float(), 128 + c.float())


def test_empty_batch():
    qw, qz, sc, gi = make_weight(64, 16, 32, seed=7)
    assert op.int4_matmul_triton(torch.randn(0, 64), qw, qz, sc, gi, 32).shape == (0, 16)
    assert op.int4_matmul_t_triton(torch.randn(0, 16), qw, qz, sc, gi, 32).shape == (0, 64)


def test_bad_inputs_raise_clear_errors():
    qw, qz, sc, gi = make_weight(64, 16, 32, seed=8)
    with pytest.raises(ValueError, match=r"x must be \(M, 64\)"):
        op.int4_matmul_triton(torch.randn(2, 60), qw, qz, sc, gi, 32)
    with pytest.raises(ValueError, match="dtype"):
        op.int4_matmul_triton(torch.randn(2, 64, dtype=torch.float64), qw, qz, sc, gi, 32)
    with pytest.raises(ValueError, match="qzeros must be int32"):
        op.int4_matmul_triton(torch.randn(2, 64), qw, qz[:1], sc, gi, 32)
