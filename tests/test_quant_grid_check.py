"""grid_check: finds blockwise affine grids (a checkpoint dequantized from Q4_1/RTN) and their zero offsets."""
import pytest
import torch

from mops_fast.quant.grid_check import affine_grid_stats, linear_weights
from tests.conftest import DOLLY


def q41_like(n, k, block=32, integer_zero=False, seed=0):
    """Rows of Q4_1-style blocks: d * code + m, codes 0..15 with both ends present in every block."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k // block, block), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15
    d = (torch.rand(n, k // block, 1, generator=g) * 0.01 + 1e-3).half().double()  # fp16 steps, as in GGUF
    z = torch.randint(1, 15, (n, k // block, 1), generator=g).double()  # blocks spanning zero
    if not integer_zero:
        z = z + torch.rand(n, k // block, 1, generator=g, dtype=torch.float64) * 0.8 + 0.1  # never near an integer
    return ((codes - z) * d).reshape(n, k)


def test_q41_blocks_found_with_their_float_zero():
    s = affine_grid_stats({"a.weight": q41_like(12, 96)})
    assert s["on_grid"] == s["blocks"] == 12 * 3
    assert s["zero_frac_mean"] > 0.05 and s["zero_frac_below_0.05"] == 0.0


def test_integer_zero_blocks_have_no_offset():
    s = affine_grid_stats({"a.weight": q41_like(8, 64, integer_zero=True)})
    assert s["on_grid_share"] == 1.0 and s["zero_frac_mean"] < 1e-6


def test_random_weights_are_not_on_a_grid_and_odd_widths_are_skipped():
    w = {"a.weight": torch.randn(16, 64), "odd.weight": torch.randn(4, 50), "bias": torch.randn(8)}
    s = affine_grid_stats(w)
    assert s["on_grid"] == 0 and s["blocks"] == 32 and s["skipped"] == ["odd.weight"] and s["zero_frac_mean"] is None
    # a grid with more levels is not a 16-level grid
    s8 = affine_grid_stats({"a.weight": q41_like(4, 64) * 1.0}, levels=8)
    assert s8["on_grid"] == 0


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="block"):
        affine_grid_stats({"a.weight": torch.randn(2, 32)}, block=1)
    with pytest.raises(ValueError, match="divisible by block=32"):
        affine_grid_stats({"a.weight": torch.randn(2, 30)})
    with pytest.raises(FileNotFoundError, match="safetensors"):
        linear_weights(tmp_path)


def test_real_smollm2_linears_are_q41_blocks():
    """The shipped 'dense' SmolLM2 is dequantized Q4_1: every 32-block of every linear is on a 16-level grid
    with a float minimum (docs/compression.md explains what that costs 4-bit GPTQ)."""
    if not DOLLY.is_dir():
        pytest.skip("../shared/data is not present")
    from mops_fast.hf.loading import resolve_model_path

    w = linear_weights(resolve_model_path("smollm2-135m"))
    w = {n: t for n, t in w.items() if ".layers.0." in n or ".layers.29." in n}
    s = affine_grid_stats(w)
    assert s["on_grid_share"] == 1.0 and 0.2 < s["zero_frac_mean"] < 0.3
