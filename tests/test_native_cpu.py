"""C++ int4 GPTQ kernels (mops_fast._C) against an independent float64 dequantization.

The reference here is written from the format alone (DESIGN §3), not imported from mops_fast.ops,
so a packing mistake shared by both sides cannot hide. Every case runs each copy of the kernels the CPU
can run: AVX-512, AVX2 and the portable one.
"""
from __future__ import annotations

import math

import pytest
import torch

from mops_fast import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native CPU kernels: {native.unavailable_reason()}")

# --------------------------------------------------------------------------------------------------
# test helpers: random GPTQ weights and a float64 dequantization from the packed tensors
# --------------------------------------------------------------------------------------------------


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 holding an unsigned 32-bit pattern -> int32 with the same bits."""
    v = v & 0xFFFFFFFF
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """(R, C) 4-bit codes -> (R/8, C) int32, row 8i+j at bits 4j (qweight layout)."""
    R, C = codes.shape
    c = codes.to(torch.int64).reshape(R // 8, 8, C)
    shifts = (4 * torch.arange(8, dtype=torch.int64)).view(1, 8, 1)
    return _to_int32((c << shifts).sum(1))


def make_weight(K, N, group, *, sym=False, act_order=False, scales_dtype=torch.float16, seed=0):
    """Random GPTQ weight; group=None means one group over all of K. Returns (qw, qz, s, g, codes, zeros)."""
    gen = torch.Generator().manual_seed(seed)
    group = K if group is None else group
    G = math.ceil(K / group)
    codes = torch.randint(0, 16, (K, N), generator=gen)
    zeros = torch.full((G, N), 8) if sym else torch.randint(0, 16, (G, N), generator=gen)
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.002).to(scales_dtype)
    g_idx = torch.arange(K) // group
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    qweight = pack_rows(codes)
    qzeros = pack_rows(zeros.t().contiguous()).t().contiguous()  # packed along N
    return qweight, qzeros, scales, g_idx.to(torch.int32).contiguous(), codes, zeros


def dequant_f64(qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """W (N, K) float64 from the packed tensors, following the format description literally."""
    K8, N = qweight.shape
    K = 8 * K8
    dev = qweight.device
    q = qweight.to(torch.int64) & 0xFFFFFFFF
    k = torch.arange(K, device=dev)
    codes = (q[k // 8, :] >> (4 * (k % 8)).unsqueeze(1)) & 0xF  # (K, N)
    z = qzeros.to(torch.int64) & 0xFFFFFFFF
    n = torch.arange(N, device=dev)
    zeros = (z[:, n // 8] >> (4 * (n % 8))) & 0xF  # (G, N)
    g = g_idx.long()
    w = (codes - zeros[g, :]).double() * scales.double()[g, :]  # (K, N)
    return w.t().contiguous()


def tol_for(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}[dtype]


def assert_matches(out, ref, dtype, what):
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    err = (out.double() - ref).abs().max().item()
    scale = ref.abs().max().item() + 1e-12
    assert err <= tol_for(dtype) * scale, f"{what}: max abs error {err:.3e} vs output scale {scale:.3e}"


@pytest.fixture(params=["avx512", "avx2", "generic"])
def isa(request):
    from mops_fast import _C

    if not _C.cpu_supports(request.param):
        pytest.skip(f"this CPU or build cannot run the {request.param} kernels")
    old = _C.isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(old)


# layouts: (K, N, group, act_order) covering groups 32/64/128/one group, the short last group
# (K=576, group 128), act-order permutations and N = 40 / 200 (odd multiples of 8)
LAYOUTS = [
    (256, 40, 32, False),
    (256, 200, 64, True),
    (576, 200, 128, False),
    (576, 40, 128, True),
    (192, 40, None, False),
    (512, 72, 128, False),
    (512, 48, 64, False),  # N % 16 == 0: the AVX-512 small-M path (32- and 16-column tiles)
]


@pytest.mark.parametrize("M", [1, 3, 8, 17])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"K{l[0]}N{l[1]}g{l[2]}{'act' if l[3] else ''}")
@pytest.mark.parametrize("transposed", [False, True], ids=["fwd", "dx"])
def test_layouts(isa, M, layout, transposed):
    K, N, group, act = layout
    case = hash((K, N, M, transposed)) & 0xFFFF
    sym = bool(case & 1)
    x_dtype = [torch.float32, torch.bfloat16][(case >> 1) & 1]
    s_dtype = [torch.float16, torch.float32][(case >> 2) & 1]
    qw, qz, s, g, _, _ = make_weight(K, N, group, sym=sym, act_order=act, scales_dtype=s_dtype, seed=case)
    W = dequant_f64(qw, qz, s, g)
    gen = torch.Generator().manual_seed(1)
    if transposed:
        a = torch.randn(M, N, generator=gen).to(x_dtype)
        out = native.int4_matmul_t_cpu(a, qw, qz, s, g)
        ref = a.double() @ W
    else:
        a = torch.randn(M, K, generator=gen).to(x_dtype)
        out = native.int4_matmul_cpu(a, qw, qz, s, g)
        ref = a.double() @ W.t()
    assert_matches(out, ref, x_dtype, f"{isa} {layout} M={M} {'dx' if transposed else 'fwd'} "
                   f"sym={sym} x={x_dtype} scales={s_dtype}")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s_dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 17])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_dtypes(isa, x_dtype, s_dtype, M, sym):
    K, N = 576, 40
    qw, qz, s, g, _, _ = make_weight(K, N, 128, sym=sym, scales_dtype=s_dtype, seed=3)
    W = dequant_f64(qw, qz, s, g)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=gen).to(x_dtype)
    assert_matches(native.int4_matmul_cpu(x, qw, qz, s, g), x.double() @ W.t(), x_dtype, "fwd")
    dy = torch.randn(M, N, generator=gen).to(x_dtype)
    assert_matches(native.int4_matmul_t_cpu(dy, qw, qz, s, g), dy.double() @ W, x_dtype, "dx")


def test_reference_reads_generated_codes():
    """The test's own packing and dequantization agree with the codes they started from."""
    qw, qz, s, g, codes, zeros = make_weight(64, 16, 32, act_order=True, seed=5)
    W = dequant_f64(qw, qz, s, g)
    expect = (codes - zeros[g.long()]).double() * s.double()[g.long()]
    torch.testing.assert_close(W, expect.t())
    assert (qw < 0).any(), "sign bit of the packed words never exercised"


@pytest.mark.parametrize("M", [1, 4, 9])
def test_llama_shape_deterministic_across_threads(isa, M):
    """A LLaMA-sized row count: bitwise the same result for 1 and 2 threads and on every repeat.
    (K * N * M >= 2**22, so the kernels do split the work when given 2 threads.)"""
    K, N = 4096, 1024
    qw, qz, s, g, _, _ = make_weight(K, N, 128, seed=7)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    ref = x.double() @ dequant_f64(qw, qz, s, g).t()
    old = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 2, 2):
            torch.set_num_threads(nt)
            outs.append(native.int4_matmul_cpu(x, qw, qz, s, g))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        assert torch.equal(outs[0], o), "result depends on the thread count or the schedule"
    assert_matches(outs[0], ref, torch.float32, f"K=4096 M={M}")


def test_strided_rows_and_empty_batch():
    K, N = 128, 40
    qw, qz, s, g, _, _ = make_weight(K, N, 32, seed=9)
    W = dequant_f64(qw, qz, s, g)
    wide = torch.randn(5, K + 24)
    x = wide[:, 8 : 8 + K]  # row stride K+24, unit column stride
    assert not x.is_contiguous()
    assert_matches(native.int4_matmul_cpu(x, qw, qz, s, g), x.double() @ W.t(), torch.float32, "strided")
    assert_matches(native.int4_matmul_cpu(x[:1], qw, qz, s, g), x[:1].double() @ W.t(), torch.float32, "M=1")
    assert native.int4_matmul_cpu(torch.empty(0, K), qw, qz, s, g).shape == (0, N)
    assert native.int4_matmul_t_cpu(torch.empty(0, N), qw, qz, s, g).shape == (0, K)


# --------------------------------------------------------------------------------------------------
# bad inputs: each raises ValueError naming the problem
# --------------------------------------------------------------------------------------------------
def _good():
    qw, qz, s, g, _, _ = make_weight(64, 16, 32, seed=11)
    return torch.randn(2, 64), qw, qz, s, g


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x, qw, qz, s, g: (x, qw.long(), qz, s, g), "qweight must be int32"),
        (lambda x, qw, qz, s, g: (x, qw, qz, s, g.long()), "g_idx must be int32"),
        (lambda x, qw, qz, s, g: (x, qw, qz, s.int(), g), "scales must be float16"),
        (lambda x, qw, qz, s, g: (x, qw.t().contiguous().t(), qz, s, g), "qweight must be contiguous"),
        (lambda x, qw, qz, s, g: (x[:, :56], qw, qz, s, g), "needs K=64"),
        (lambda x, qw, qz, s, g: (x.unsqueeze(0), qw, qz, s, g), "must be 2-D"),
        (lambda x, qw, qz, s, g: (x.double(), qw, qz, s, g), "activations must be"),
        (lambda x, qw, qz, s, g: (x, qw, qz[:, :1], s, g), "qzeros must be"),
        (lambda x, qw, qz, s, g: (x, qw, qz, s, g[:32]), "g_idx must be"),
        (lambda x, qw, qz, s, g: (x, qw, qz, s, g + 5), r"g_idx values must lie in \[0, G=2\)"),
        (lambda x, qw, qz, s, g: (x, qw[:, :12].contiguous(), qz, s[:, :12].contiguous(), g), "multiple of 8"),
        (lambda x, qw, qz, s, g: (torch.randn(64, 2).t(), qw, qz, s, g), "unit stride"),
        (lambda x, qw, qz, s, g: (x, qw, qz, s[:, :8].contiguous(), g), "scales must be"),
    ],
)
def test_bad_inputs(mutate, match):
    args = mutate(*_good())
    with pytest.raises(ValueError, match=match):
        native.int4_matmul_cpu(*args)


def test_bad_inputs_transposed():
    x, qw, qz, s, g = _good()
    with pytest.raises(ValueError, match="needs N=16"):
        native.int4_matmul_t_cpu(x, qw, qz, s, g)  # dy must be (M, N), not (M, K)


def test_cuda_entry_rejects_cpu_tensors():
    x, qw, qz, s, g = _good()
    with pytest.raises(ValueError, match="needs CUDA activations"):
        native.int4_matmul_cuda_small_m(x.half(), qw, qz, s, g)
    with pytest.raises(ValueError, match="needs CUDA activations"):
        native.int4_matmul_t_cuda_small_m(torch.randn(2, qw.shape[1]).half(), qw, qz, s, g, 128)


def test_small_m_backward_takes_grouped_16_bit_weights_only():
    half, full = torch.zeros(4, 8, dtype=torch.float16), torch.zeros(4, 8)
    assert native.small_m_t_supports(half, 128, 4) and native.small_m_t_supports(half, 32, 4)
    assert native.small_m_t_supports(half.bfloat16(), 8, 4)
    assert native.small_m_t_supports(half[:1], 576, 1)  # one group of any size
    assert not native.small_m_t_supports(full, 128, 4)  # fp32 scales
    assert not native.small_m_t_supports(half, 0, 4)  # groups read from g_idx (act-order)
    assert not native.small_m_t_supports(half, 96, 4)  # 12 packed rows a group: not a power of two
    assert not native.small_m_t_supports(half, 4, 4)  # groups inside a packed row


def test_g_idx_range_rechecked_after_in_place_change():
    # The range check runs once per g_idx tensor; an in-place edit (new version) must be caught again.
    x, qw, qz, s, g = _good()
    native.int4_matmul_cpu(x, qw, qz, s, g)
    native.int4_matmul_cpu(x, qw, qz, s, g)
    g[5] = 9
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, G=2\)"):
        native.int4_matmul_cpu(x, qw, qz, s, g)


def test_int4_matmul_eager_paths_equal_the_custom_op():
    # Eager calls skip the custom op's dispatch: the kernel directly without a gradient, a plain
    # autograd.Function with one. Both must give the op's outputs and dx bit for bit.
    from mops_fast.ops.int4_matmul import _int4_matmul_op, int4_matmul

    x, qw, qz, s, g = _good()
    with torch.no_grad():
        fast = int4_matmul(x.view(1, 2, 64), qw, qz, s, g, 32)
    via_op = _int4_matmul_op(x, qw, qz, s, g, 32)
    torch.testing.assert_close(fast.view(2, 16), via_op, rtol=0, atol=0)
    xr = x.clone().requires_grad_(True)
    y = int4_matmul(xr, qw, qz, s, g, 32)
    node = y.grad_fn if "View" not in type(y.grad_fn).__name__ else y.grad_fn.next_functions[0][0]
    assert "Int4Matmul" in type(node).__name__  # the eager Function, not the op's autograd node
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(dy)
    xo = x.clone().requires_grad_(True)
    y_op = _int4_matmul_op(xo, qw, qz, s, g, 32)
    y_op.backward(dy)
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)
    torch.testing.assert_close(xr.grad, xo.grad, rtol=0, atol=0)
