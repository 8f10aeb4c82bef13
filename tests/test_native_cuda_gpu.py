"""CUDA small-M int4 kernel (mops_fast._C_cuda) against a float64 dequantization, on a GPU.

Build first: MOPS_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace
(benchmarks/run_gpu.sh does). With a GPU present but the extension missing these tests fail, so a
broken CUDA build cannot pass as skipped.
"""
from __future__ import annotations

import functools

import pytest
import torch

from mops_fast import native
from test_native_cpu import dequant_f64, make_weight

pytestmark = pytest.mark.gpu

TOL = {torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


@pytest.fixture(scope="module", autouse=True)
def need_extension():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not native.cuda_available():
        pytest.fail(f"mops_fast._C_cuda unavailable: {native.cuda_unavailable_reason()}. Build it with "
                    "MOPS_FAST_CUDA=1 python3 setup.py build_ext --inplace")


@functools.lru_cache(maxsize=None)
def _layer(K, N, group, sym=False, act_order=False, scales_dtype=torch.float16, seed=0):
    """Packed weight on the GPU, built once per shape (the GPU session's test budget is short)."""
    qw, qz, s, g, _, _ = make_weight(K, N, group, sym=sym, act_order=act_order,
                                     scales_dtype=scales_dtype, seed=seed)
    return tuple(t.to("cuda") for t in (qw, qz, s, g))


def _weight(K, N, group, dev, seed=0, **kw):
    return list(_layer(K, N, group, seed=seed, **kw))


def _assert_matches(out, ref, dtype, what):
    torch.cuda.synchronize()
    assert out.shape == ref.shape and out.dtype == dtype, what
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max abs error {err:.3e}, output scale {scale:.3e}"


def _check(x, qw, qz, s, g, what, group_size=0):
    y = native.int4_matmul_cuda_small_m(x, qw, qz, s, g, group_size)
    _assert_matches(y, x.double() @ dequant_f64(qw, qz, s, g).t(), x.dtype, what)  # float64 on the GPU


@pytest.mark.parametrize("M", [1, 4, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_llama_up_proj(M, dtype):
    dev = torch.device("cuda")
    qw, qz, s, g = _weight(4096, 11008, 128, dev)
    x = torch.randn(M, 4096, device=dev, dtype=dtype)
    _check(x, qw, qz, s, g, f"4096x11008 M={M} {dtype}")  # groups read from g_idx
    _check(x, qw, qz, s, g, f"4096x11008 M={M} {dtype} grouped", group_size=128)  # groups computed


@pytest.mark.parametrize(
    "K, N, group, kw",
    [
        (576, 40, 128, {}),                                       # short last group, one CTA
        (576, 200, 128, {"act_order": True}),                     # act-order, partial column tile
        (11008, 4096, 128, {"sym": True}),                        # down_proj, 1376 rows
        (4096, 4096, 32, {"scales_dtype": torch.float32}),        # fp32 scales, many groups
        (1024, 72, None, {"scales_dtype": torch.bfloat16}),       # one group, bf16 scales
        (4104, 264, 64, {"act_order": True}),                     # K not a multiple of 32
    ],
    ids=["K576N40", "K576N200act", "down_proj", "fp32scales", "onegroup", "K4104act"],
)
@pytest.mark.parametrize("M", [1, 3, 16])
def test_awkward_shapes(K, N, group, kw, M):
    dev = torch.device("cuda")
    qw, qz, s, g = _weight(K, N, group, dev, seed=K + N, **kw)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(M, K, device=dev, dtype=dtype)
        _check(x, qw, qz, s, g, f"K={K} N={N} g={group} {kw} M={M} {dtype}")
        if not kw.get("act_order"):  # the promise g_idx == arange(K) // group_size holds
            _check(x, qw, qz, s, g, f"K={K} N={N} g={group} {kw} M={M} {dtype} grouped",
                   group_size=group or -1)


@pytest.mark.parametrize("steps, warps, ksplit", [(4, 0, 0), (4, 4, 0), (4, 3, 0), (4, 16, 0), (22, 0, 0), (22, 3, 0),
                                                  (22, 16, 0), (0, 0, 2), (0, 0, 3), (4, 0, 4), (22, 0, 8), (0, 4, 4),
                                                  (22, 3, 2), (4, 16, 6)])
def test_launch_overrides_compute_the_same(steps, warps, ksplit):
    # the launch variants the benchmarks time: every one must compute the product (a K split, on sm_90, sums
    # its slices in another order: close, not the same bits)
    qw, qz, s, g = _weight(4096, 11008, 128, torch.device("cuda"))
    for M in (1, 3, 8, 13):  # 8- and 16-row tiles
        x = torch.randn(M, 4096, device="cuda", dtype=torch.float16)
        want = native.int4_matmul_cuda_small_m(x, qw, qz, s, g)  # the g_idx table kernel
        y = native.int4_cuda_small_m_validated(x, qw, qz, s, g, 4096, 11008, 32, group_size=128, steps=steps,
                                               warps=warps, ksplit=ksplit)
        assert torch.allclose(y.float(), want.float(), rtol=1e-3, atol=1e-3), (M, steps, warps, ksplit)


@functools.lru_cache(maxsize=4)
def _dequant_t(qw, qz, s, g):
    """W^T (K, N) in float64 on the GPU, kept for the layers the tests reuse."""
    return dequant_f64(qw, qz, s, g).t().contiguous()


@pytest.mark.parametrize("steps, ksplit", [(22, 0), (4, 0), (22, 3), (4, 2), (22, 8)])
@pytest.mark.parametrize(
    "K, N, group, kw",
    [
        (576, 40, 128, {}),                                       # short last group, one CTA, 18 rows (5 steps)
        (4104, 264, 64, {"sym": True}),                           # K not a multiple of 32, partial tile
        (1024, 72, None, {"scales_dtype": torch.bfloat16}),       # one group
        (11008, 4096, 128, {}),                                   # down_proj: 16 warps, long slices
        (4096, 520, 32, {}),                                      # group 32: a group a step, many groups a warp
        (16384, 64, 128, {}),                                     # 2 column tiles, 512 steps
        (4104, 136, 16, {}),                                      # group 16: a step spans groups
    ],
    ids=["K576N40", "K4104N264", "onegroup", "down_proj", "g32", "K16384", "g16"],
)
def test_grouped_variants_awkward_shapes(steps, ksplit, K, N, group, kw):
    # batches of 4 steps, or two batches of 2 in flight per warp, each with K whole or split over a cluster
    # (sm_90; elsewhere whole): slices whose step count is odd, shorter than one batch, or ends inside a
    # batch, and more K slices asked for than there are steps (K576: 5)
    dev = torch.device("cuda")
    qw, qz, s, g = _weight(K, N, group, dev, seed=K + N, **kw)
    ref_w = dequant_f64(qw, qz, s, g).t()
    for dtype in (torch.float16, torch.bfloat16):
        for M in (1, 5, 8, 11, 16):
            x = torch.randn(M, K, device=dev, dtype=dtype)
            y = native.int4_cuda_small_m_validated(x, qw, qz, s, g, K, N, s.shape[0], group_size=group or K,
                                                   steps=steps, ksplit=ksplit)
            _assert_matches(y, x.double() @ ref_w, dtype, f"K={K} N={N} M={M} steps={steps} ksplit={ksplit} {dtype}")


def test_plan_takes_the_k_split_where_it_can():
    # what a launch runs (native.int4_small_m_plan): the K split asked for on sm_90 with grouped weights; one
    # slice for the g_idx table path, fp32 scales, the default, and below sm_90; never more slices than steps
    sm90 = torch.cuda.get_device_capability()[0] >= 9
    plan = native.int4_small_m_plan
    p = plan(1, 4096, 11008, 32, 128, ksplit=4)
    assert p["kernel"] == "pipelined" and p["ksplit"] == (4 if sm90 else 1) and p["warps"] >= 1
    assert plan(12, 4096, 11008, 32, 128, ksplit=2)["kernel"] == "batches"
    assert plan(1, 4096, 11008, 32, 128, steps=4, ksplit=3)["ksplit"] == (3 if sm90 else 1)
    assert plan(1, 4096, 11008, 32, 128)["ksplit"] == 1  # the default until a GPU run decides
    assert plan(1, 4096, 11008, 32, 0, ksplit=4) == {"kernel": "table", "ksplit": 1,
                                                     "warps": plan(1, 4096, 11008, 32, 0)["warps"]}
    assert plan(1, 4096, 4096, 128, 32, ksplit=4, scales_dtype=torch.float32)["kernel"] == "table"
    assert plan(1, 576, 40, 5, 128, ksplit=8)["ksplit"] == (5 if sm90 else 1)  # 18 packed rows: 5 steps
    assert plan(1, 4096, 4096, 32, 128, warps=3, ksplit=2)["warps"] == 3
    for bad in (dict(M=17), dict(ksplit=9), dict(ksplit=-1), dict(steps=32), dict(warps=-1)):
        args = {**dict(M=1, K=4096, N=4096, G=32, group_size=128), **bad}
        with pytest.raises(ValueError, match="bad arguments"):
            plan(**args)


@pytest.mark.parametrize(
    "K, N, group, kw",
    [
        (576, 40, 128, {}),                                       # 5 steps: the prefetches run past the slice
        (4104, 264, 64, {"sym": True}),                           # K not a multiple of 32, partial tile
        (576, 200, 128, {"act_order": True}),                     # act-order: the g_idx table kernel
        (4096, 11008, 128, {}),                                   # up_proj
    ],
    ids=["K576N40", "K4104N264", "K576N200act", "up_proj"],
)
def test_prefetch_changes_no_bit(K, N, group, kw):
    # L2 prefetches only move bytes closer: every kernel gives the bits it gives without them, at any
    # distance, with K split or not
    qw, qz, s, g = _weight(K, N, group, torch.device("cuda"), seed=K + N + 6, **kw)
    gs = 0 if kw.get("act_order") else group
    for M in (1, 6, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16 if M == 6 else torch.float16)
        for steps, ksplit in ((0, 0), (4, 0), (22, 0), (0, 3)):
            want = native.int4_cuda_small_m_validated(x, qw, qz, s, g, K, N, s.shape[0], group_size=gs, steps=steps,
                                                      ksplit=ksplit)
            for pf in (4, 16, 64):
                got = native.int4_cuda_small_m_validated(x, qw, qz, s, g, K, N, s.shape[0], group_size=gs,
                                                         steps=steps, ksplit=ksplit, prefetch=pf)
                torch.cuda.synchronize()
                assert torch.equal(got, want), (K, N, M, steps, ksplit, pf)


def test_k_split_is_deterministic_and_covers_every_column():
    # the cluster's sums are added in rank order: the same bits on every call; outputs of every column tile
    # are written (the output buffer is poisoned first)
    K, N = 4096, 11008
    qw, qz, s, g = _weight(K, N, 128, torch.device("cuda"), seed=21)
    for M in (1, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        first = native.int4_cuda_small_m_validated(x, qw, qz, s, g, K, N, s.shape[0], group_size=128, ksplit=4)
        junk = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)  # poison the allocator
        del junk
        for _ in range(3):
            again = native.int4_cuda_small_m_validated(x, qw, qz, s, g, K, N, s.shape[0], group_size=128, ksplit=4)
            torch.cuda.synchronize()
            assert torch.equal(again, first), M
        _assert_matches(first, x.double() @ _dequant_t(qw, qz, s, g), x.dtype, f"ksplit=4 M={M}")




@functools.lru_cache(maxsize=None)
def _chain_layers(K, n, group=128):
    """n K x K layers whose scales are divided by their float64 gain, so that a chain of them keeps its
    activations near unit size in fp16."""
    layers = []
    x = torch.randn(64, K, device="cuda", dtype=torch.float64)
    for i in range(n):
        qw, qz, s, g = _layer(K, K, group, seed=50 + i)
        gain = (x @ dequant_f64(qw, qz, s, g).t()).norm() / x.norm()
        layers.append((qw, qz, (s.double() / gain).half(), g))
    return layers


def _check_pdl_chain(chain, x0, what):
    """chain(x, pdl) launched as programmatic dependents gives the bits of ordinary launches, eagerly and
    as CUDA-graph replays on fresh inputs."""
    want = chain(x0, False)
    assert torch.isfinite(want).all() and want.abs().max() > 1e-3, what
    assert torch.equal(chain(x0, True), want), what
    side = torch.cuda.Stream()  # warm-up and capture off the default stream, as torch requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(x0, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x0, True)
    for trial in range(3):
        x0.copy_(torch.randn_like(x0))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, chain(x0, False)), (what, trial)


@pytest.mark.parametrize("steps, ksplit", [(0, 0), (4, 0), (22, 0), (0, 4), (4, 2)])
def test_pdl_chain_reads_x_after_the_previous_kernel(steps, ksplit):
    # launched as programmatic dependents, the kernels of a chain (each layer's input the previous one's
    # output, nothing in between) may start while the previous one finishes and fetch their weights, but
    # must read x only once it has; with a K split every CTA of the cluster waits
    K = 1024
    layers = _chain_layers(K, 4)

    def chain(x, pdl):
        for qw, qz, s, g in layers:
            x = native.int4_cuda_small_m_validated(x, qw, qz, s, g, K, K, s.shape[0], group_size=128, steps=steps,
                                                   ksplit=ksplit, pdl=pdl)
        return x

    for M in (1, 5, 16):
        _check_pdl_chain(chain, torch.randn(M, K, device="cuda", dtype=torch.float16),
                         f"steps={steps} ksplit={ksplit} M={M}")


def test_pdl_backward_chain_reads_dy_after_the_previous_kernel():
    # the backward's kernels (and the slices' sum where N is split: 1024 x 1024 splits) as programmatic
    # dependents, each reading the previous layer's dx as its dy
    K = 1024
    layers = _chain_layers(K, 4)

    def chain(dy, pdl):
        for qw, qz, s, _ in layers:
            dy = native.int4_cuda_small_m_t_validated(dy, qw, qz, s, K, K, s.shape[0], 128, pdl=pdl)
        return dy

    for M in (1, 9):
        _check_pdl_chain(chain, torch.randn(M, K, device="cuda", dtype=torch.float16), f"bwd M={M}")


def test_stream_and_empty_and_errors():
    dev = torch.device("cuda")
    qw, qz, s, g = _weight(512, 64, 128, dev, seed=1)
    x = torch.randn(2, 512, device=dev, dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # x was written on the default stream
    with torch.cuda.stream(side):
        y = native.int4_matmul_cuda_small_m(x, qw, qz, s, g)
    side.synchronize()
    ref = native.int4_matmul_cuda_small_m(x, qw, qz, s, g)
    torch.cuda.synchronize()
    assert torch.equal(y, ref)
    assert native.int4_matmul_cuda_small_m(x[:0], qw, qz, s, g).shape == (0, 64)
    with pytest.raises(ValueError, match="M <= 16"):
        native.int4_matmul_cuda_small_m(torch.randn(17, 512, device=dev, dtype=torch.float16), qw, qz, s, g)
    with pytest.raises(ValueError, match="float16, bfloat16"):
        native.int4_matmul_cuda_small_m(x.float(), qw, qz, s, g)
    with pytest.raises(ValueError, match="group_size=96 does not fit"):
        native.int4_matmul_cuda_small_m(x, qw, qz, s, g, 96)
    with pytest.raises(ValueError, match="is on cpu"):
        native.int4_matmul_cuda_small_m(x, qw.cpu(), qz, s, g)
    # launch overrides the kernels do not have are refused, not run as the default
    for steps, warps, ksplit, pf in ((8, 0, 0, 0), (-4, 0, 0, 0), (24, 0, 0, 0), (32, 0, 0, 0), (0, -1, 0, 0),
                                     (0, 0, 9, 0), (0, 0, -1, 0), (0, 0, 0, -1), (0, 0, 0, 65)):
        with pytest.raises(RuntimeError, match="unknown steps hint|warps hint|ksplit hint|prefetch hint"):
            native.int4_cuda_small_m_validated(x, qw, qz, s, g, 512, 64, 1, group_size=128, steps=steps,
                                               warps=warps, ksplit=ksplit, prefetch=pf)


def _check_t(dy, qw, qz, s, g, group_size, what):
    dx = native.int4_matmul_t_cuda_small_m(dy, qw, qz, s, g, group_size)
    _assert_matches(dx, dy.double() @ dequant_f64(qw, qz, s, g), dy.dtype, what)


@pytest.mark.parametrize("M", [1, 5, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_backward_llama_shapes(M, dtype):
    # 4096x11008 splits N over several CTAs (workspace + sum kernel); 11008x4096 has many row blocks
    for K, N in ((4096, 11008), (11008, 4096)):
        qw, qz, s, g = _weight(K, N, 128, torch.device("cuda"))
        dy = torch.randn(M, N, device="cuda", dtype=dtype)
        _check_t(dy, qw, qz, s, g, 128, f"backward {K}x{N} M={M} {dtype}")


@pytest.mark.parametrize(
    "K, N, group, kw",
    [
        (576, 40, 128, {}),                                  # 9 row blocks, the last short; N not a multiple of 16
        (576, 1536, 64, {"sym": True}),                      # SmolLM2 shapes
        (1024, 72, None, {"scales_dtype": torch.bfloat16}),  # one group (group_size -1), bf16 scales
        (4096, 264, 32, {}),                                 # group 32: 4 packed rows a group
        (4104, 136, 8, {}),                                  # group 8: one packed row a group; R % 8 != 0
    ],
    ids=["K576N40", "smollm2", "onegroup", "g32", "g8"],
)
@pytest.mark.parametrize("M", [1, 3, 16])
def test_backward_awkward_shapes(K, N, group, kw, M):
    qw, qz, s, g = _weight(K, N, group, torch.device("cuda"), seed=K + N + 1, **kw)
    for dtype in (torch.float16, torch.bfloat16):  # bf16 activations on fp16 scales convert them
        dy = torch.randn(M, N, device="cuda", dtype=dtype)
        _check_t(dy, qw, qz, s, g, group or -1, f"backward K={K} N={N} g={group} {kw} M={M} {dtype}")




@pytest.mark.parametrize("K, N, group", [(4096, 11008, 128), (576, 40, 128), (4104, 264, 64), (1024, 72, None)],
                         ids=["up_proj", "K576N40", "K4104N264", "onegroup"])
def test_backward_prefetch_changes_no_bit(K, N, group):
    # the backward's L2 prefetches (N split over CTAs at up_proj, rows straddling lines at N = 264) leave
    # every bit as it is
    qw, qz, s, g = _weight(K, N, group, torch.device("cuda"), seed=K + N + 8)
    for M in (1, 7, 16):
        dy = torch.randn(M, N, device="cuda", dtype=torch.float16)
        want = native.int4_cuda_small_m_t_validated(dy, qw, qz, s, K, N, s.shape[0], group or K)
        for pf in (4, 16, 64):
            got = native.int4_cuda_small_m_t_validated(dy, qw, qz, s, K, N, s.shape[0], group or K, prefetch=pf)
            torch.cuda.synchronize()
            assert torch.equal(got, want), (K, N, M, pf)
    with pytest.raises(RuntimeError, match="prefetch hint"):
        native.int4_cuda_small_m_t_validated(dy, qw, qz, s, K, N, s.shape[0], group or K, prefetch=65)


def test_backward_refusals_and_dispatch(monkeypatch):
    from mops_fast.ops import int4_matmul as op

    qw, qz, s, g = _weight(576, 200, 128, torch.device("cuda"), act_order=True, seed=5)
    dy = torch.randn(2, 200, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="power-of-two"):
        native.int4_matmul_t_cuda_small_m(dy, qw, qz, s, g, 0)  # act-order: groups must be read from g_idx
    qw, qz, s, g = _weight(4096, 264, 32, torch.device("cuda"), scales_dtype=torch.float32, seed=6)
    with pytest.raises(ValueError, match="16-bit scales"):
        native.int4_matmul_t_cuda_small_m(torch.randn(2, 264, device="cuda", dtype=torch.float16), qw, qz, s, g, 32)
    # by default the dispatch (what QuantLinear's backward calls) takes the kernel and agrees with float64
    qw, qz, s, g = _weight(4096, 11008, 128, torch.device("cuda"))
    dy = torch.randn(4, 11008, device="cuda", dtype=torch.float16)
    monkeypatch.delenv("MOPS_FAST_INT4_NATIVE_BWD", raising=False)
    _assert_matches(op.int4_matmul_t(dy, qw, qz, s, g, 128), dy.double() @ dequant_f64(qw, qz, s, g),
                    torch.float16, "dispatch, native backward by default")
    # MOPS_FAST_INT4_PDL=1 (the default): the dispatch launches both directions as programmatic dependents
    x = torch.randn(3, 4096, device="cuda", dtype=torch.float16)
    monkeypatch.setenv("MOPS_FAST_INT4_PDL", "1")
    _assert_matches(op.int4_matmul(x, qw, qz, s, g, 128), x.double() @ dequant_f64(qw, qz, s, g).t(),
                    torch.float16, "dispatch with PDL, forward")
    _assert_matches(op.int4_matmul_t(dy, qw, qz, s, g, 128), dy.double() @ dequant_f64(qw, qz, s, g),
                    torch.float16, "dispatch with PDL, backward")


def test_dispatch_takes_hints_from_env(monkeypatch):
    # MOPS_FAST_INT4_FWD_STEPS / _FWD_KSPLIT / _FWD_PREFETCH (M <= 8, M > 8): the dispatch launches exactly
    # those variants (prefetches change no bit)
    from mops_fast.ops import int4_matmul as op

    K, N = 4096, 11008
    qw, qz, s, g = _weight(K, N, 128, torch.device("cuda"), seed=9)
    G = s.shape[0]
    monkeypatch.setenv("MOPS_FAST_INT4_FWD_STEPS", "4,22")
    monkeypatch.setenv("MOPS_FAST_INT4_FWD_KSPLIT", "3,2")
    monkeypatch.setenv("MOPS_FAST_INT4_FWD_PREFETCH", "16,0")
    for M, fs, ks in ((3, 4, 3), (12, 22, 2)):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        assert torch.equal(op.int4_matmul(x, qw, qz, s, g, 128),
                           native.int4_cuda_small_m_validated(x, qw, qz, s, g, K, N, G, group_size=128, steps=fs,
                                                              ksplit=ks))
