"""The compiled int4 kernels on a CUDA device (fp16/bf16, LLaMA-7B-sized weights), forward and backward to
the input, against an fp32 matmul with the dequantized weight. Skipped without CUDA. About 30 s on an H100
(mostly Triton compiles)."""
import pytest
import torch

from mops_fast.nn.quant_linear import QuantLinear
from mops_fast.ops import int4_matmul as op
from mops_fast.quant.pack import default_g_idx

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SYM_ZEROS = -2004318072  # 0x88888888: zero point 8 in all eight fields


def make_weight(K, N, group_size=128, sym=False, act_order=False, seed=0):
    """Random packed weight made on the device (any int32 word is 8 valid codes)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    G = 1 if group_size == -1 else -(-K // group_size)
    qw = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device="cuda", generator=g)
    if sym:
        qz = torch.full((G, N // 8), SYM_ZEROS, dtype=torch.int32, device="cuda")
    else:
        qz = torch.randint(-2**31, 2**31 - 1, (G, N // 8), dtype=torch.int32, device="cuda", generator=g)
    sc = (torch.rand(G, N, device="cuda", generator=g) * 0.01 + 1e-3).half()
    gi = default_g_idx(K, group_size, device="cuda")
    if act_order:
        gi = gi[torch.randperm(K, device="cuda", generator=g)]
    return qw, qz, sc, gi


def rel(a, b):
    return float((a.float() - b).norm() / b.norm())


TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}
CASES = [  # K, N, M, dtype, sym
    (4096, 11008, 1, torch.float16, True), (4096, 11008, 16, torch.float16, False),
    (4096, 11008, 64, torch.float16, True), (4096, 11008, 1024, torch.float16, False),
    (11008, 4096, 1, torch.float16, False), (11008, 4096, 16, torch.bfloat16, True),
    (11008, 4096, 512, torch.bfloat16, False), (4096, 4096, 4096, torch.float16, True),
    (4096, 4096, 33, torch.float32, False),
]


@pytest.mark.parametrize("K,N,M,dtype,sym", CASES)
def test_triton_forward_and_backward(K, N, M, dtype, sym):
    qw, qz, sc, gi = make_weight(K, N, 128, sym, seed=K + M)
    W = op.dequantize_int4(qw, qz, sc, gi, torch.float32)
    x = torch.randn(M, K, device="cuda").to(dtype)
    dy = torch.randn(M, N, device="cuda").to(dtype)
    y = op.int4_matmul_triton(x, qw, qz, sc, gi, 128)
    assert y.dtype == dtype and rel(y, x.float() @ W.t()) < TOL[dtype]
    dx = op.int4_matmul_t_triton(dy, qw, qz, sc, gi, 128)
    assert dx.dtype == dtype and rel(dx, dy.float() @ W) < TOL[dtype]
    # the dispatch (native small-M CUDA kernel, or dequantized slices + cuBLAS at large M) computes the same
    assert rel(op.int4_matmul(x, qw, qz, sc, gi, 128), x.float() @ W.t()) < TOL[dtype]
    assert rel(op.int4_matmul_t(dy, qw, qz, sc, gi, 128), dy.float() @ W) < TOL[dtype]


@pytest.mark.parametrize("M", [1, 16, 200])
def test_fp32_is_fp32_accurate(M):
    """fp32 activations take a tf32x3 dot (op._dot): within fp32's error, where a plain tf32 dot (10-bit
    mantissas) would be off by about 1e-3."""
    K, N = 4096, 1536
    qw, qz, sc, gi = make_weight(K, N, 128, False, seed=M + 7)
    W = op.dequantize_int4(qw, qz, sc, gi, torch.float64)
    x = torch.randn(M, K, device="cuda")
    dy = torch.randn(M, N, device="cuda")
    assert rel(op.int4_matmul_triton(x, qw, qz, sc, gi, 128), x.double() @ W.t()) < 3e-6
    assert rel(op.int4_matmul_t_triton(dy, qw, qz, sc, gi, 128), dy.double() @ W) < 3e-6


@pytest.mark.parametrize("K,N,M,dtype", [(4096, 11008, 16, torch.float16), (11008, 4096, 512, torch.bfloat16),
                                         (576, 1536, 33, torch.float32)])
def test_per_row_unpack_variant(K, N, M, dtype):
    qw, qz, sc, gi = make_weight(K, N, 128, False, seed=K + M + 1)
    W = op.dequantize_int4(qw, qz, sc, gi, torch.float32)
    x = torch.randn(M, K, device="cuda").to(dtype)
    dy = torch.randn(M, N, device="cuda").to(dtype)
    y = op.int4_matmul_triton(x, qw, qz, sc, gi, 128, config=dict(UNPACK=1))
    assert rel(y, x.float() @ W.t()) < TOL[dtype]
    dx = op.int4_matmul_t_triton(dy, qw, qz, sc, gi, 128, config=dict(UNPACK=1))
    assert rel(dx, dy.float() @ W) < TOL[dtype]


@pytest.mark.parametrize("group_size", [32, -1, 200])
def test_other_group_sizes(group_size):
    K, N = 4096, 4096 if group_size != 200 else 4096
    qw, qz, sc, gi = make_weight(K, N, group_size, seed=group_size + 7)
    W = op.dequantize_int4(qw, qz, sc, gi, torch.float32)
    x = torch.randn(48, K, device="cuda", dtype=torch.float16)
    dy = torch.randn(48, N, device="cuda", dtype=torch.float16)
    assert rel(op.int4_matmul_triton(x, qw, qz, sc, gi, group_size), x.float() @ W.t()) < 5e-3
    assert rel(op.int4_matmul_t_triton(dy, qw, qz, sc, gi, group_size), dy.float() @ W) < 5e-3


@pytest.mark.parametrize("M", [1, 64])
def test_act_order_quant_linear_forward_and_backward(M):
    K, N = 4096, 11008
    qw, qz, sc, gi = make_weight(K, N, 128, act_order=True, seed=M)
    layer = QuantLinear(K, N, bits=4, group_size=128, device="cuda")
    layer.set_quantized(qw, qz, sc, gi)
    W = layer.dequantize_weight(torch.float32)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16, requires_grad=True)
    y = layer(x)
    assert rel(y, x.detach().float() @ W.t()) < 5e-3
    dy = torch.randn_like(y)
    y.backward(dy)
    assert rel(x.grad, dy.float() @ W) < 5e-3
    # the unsorted gathering kernels agree with the act-order repack
    assert rel(op.int4_matmul_triton(x.detach(), qw, qz, sc, gi, 0), x.detach().float() @ W.t()) < 5e-3


def test_repeated_calls_are_deterministic_and_every_output_is_written():
    qw, qz, sc, gi = make_weight(4096, 11008, 128, seed=11)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.float16)
    a = op.int4_matmul_triton(x, qw, qz, sc, gi, 128)
    torch.cuda.empty_cache()
    junk = torch.full((8, 11008), float("nan"), device="cuda", dtype=torch.float16)  # poison the allocator
    del junk
    b = op.int4_matmul_triton(x, qw, qz, sc, gi, 128)
    assert torch.isfinite(b).all()
    assert rel(a, b.float()) < 1e-3  # split-K atomics reorder sums, nothing more
