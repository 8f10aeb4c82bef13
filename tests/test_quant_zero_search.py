"""Zero-point search: RTN codes whose group grids and integer zeros are chosen by the layer's output error."""
import copy

import pytest
import torch

from mops_fast.quant.compress import QuantSettings, quantize_model
from mops_fast.quant.pack import dequantize
from mops_fast.quant.rtn import quantize_weight_rtn
from mops_fast.quant.zero_search import zero_search_quantize
from tests.conftest import smollm2_blocks, tiny_model
from tests.test_quant_grid_check import q41_like

pytestmark = pytest.mark.usefixtures("one_thread")


def out_err(W, q, H):
    E = q.dequantize().double() - W.double()
    return float(torch.trace(E @ H.double() @ E.t()))


def hessian(K, n=300, mean=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(K, n, generator=g) + mean * torch.randn(K, 1, generator=g)  # a shared mean, as in LLMs
    return X @ X.t()


@pytest.mark.parametrize("N,K,group", [(24, 96, 32), (7, 80, 32), (16, 64, -1), (5, 50, 16)])
def test_never_worse_than_rtn_and_reported_loss_is_true(N, K, group):
    torch.manual_seed(N + K)
    W, H = torch.randn(N, K), hessian(K)
    q, st = zero_search_quantize(W, H, 4, group)
    r = quantize_weight_rtn(W, 4, group, sym=False)
    assert st["loss_nearest"] == pytest.approx(out_err(W, r, H) / N, rel=1e-4)
    assert st["loss"] == pytest.approx(out_err(W, q, H) / N, rel=1e-4)
    assert out_err(W, q, H) <= out_err(W, r, H) * (1 + 1e-6)
    assert ((q.zeros >= 0) & (q.zeros <= 15)).all() and ((q.codes >= 0) & (q.codes <= 15)).all()
    assert not q.sym and q.g_idx.tolist() == (torch.arange(K) // (K if group == -1 else group)).tolist()


def test_q41_blocks_offsets_cancel():
    """Q4_1-like blocks (float minimum): RTN leaves a constant offset per block; choosing the rounding
    direction per block cuts the output error by a wide margin, with the codes of the blocks kept exact."""
    W, H = q41_like(32, 128).float(), hessian(128)
    q, st = zero_search_quantize(W, H, 4, 32)
    assert st["changed"] > 0 and st["loss"] < 0.8 * st["loss_nearest"]
    # every block's error is one constant (an offset), whichever direction was chosen
    E = (q.dequantize() - W).reshape(32, 4, 32)
    assert ((E.amax(-1) - E.amin(-1)) < 1e-3 * E.abs().amax(-1)).all()


def test_uncoupled_groups_keep_nearest():
    """With H = I each weight's error counts alone: nearest rounding is already optimal, nothing moves."""
    W = q41_like(16, 64).float()
    q, st = zero_search_quantize(W, torch.eye(64), 4, 32)
    assert st["changed"] == 0 and st["loss"] == pytest.approx(st["loss_nearest"], rel=1e-6)


def test_packs_into_the_gptq_layout():
    W, H = torch.randn(16, 64), hessian(64)
    q, _ = zero_search_quantize(W, H, 4, 32)
    packed = q.pack()
    assert packed[2].dtype == torch.float16 and torch.equal(packed[2].float(), q.scales)  # fp16-exact scales
    assert torch.equal(dequantize(*packed, bits=4), q.dequantize())


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="--asym"):
        QuantSettings(zero_search=True, sym=True).validate()
    with pytest.raises(ValueError, match="use one of them"):
        QuantSettings(zero_search=True, sym=False, mse=True).validate()
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="round-to-nearest variant"):
        quantize_model(model, torch.zeros(2, 8, dtype=torch.long), "gptq", QuantSettings(zero_search=True, sym=False))
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_model(model, None, "rtn", QuantSettings(zero_search=True, sym=False))
    with pytest.raises(ValueError, match="max_sweeps"):
        zero_search_quantize(torch.randn(4, 32), torch.eye(32), 4, 32, max_sweeps=-1)


def test_quantize_model_lowers_output_error_against_rtn():
    model = tiny_model("llama")
    calib = torch.randint(0, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    s = QuantSettings(bits=4, group_size=16, sym=False)
    quantize_model(a, None, "rtn", s)
    qs = quantize_model(b, calib, "rtn", QuantSettings(bits=4, group_size=16, sym=False, zero_search=True), log=None)
    assert len(qs) == 7 * model.config.num_hidden_layers
    with torch.no_grad():
        ref = model(calib).logits
        ea = (a(calib).logits - ref).pow(2).mean()
        eb = (b(calib).logits - ref).pow(2).mean()
    assert eb < ea


@pytest.mark.integration
def test_real_smollm2_layers_lower_error_than_rtn(smollm2):
    """Two blocks of the real SmolLM2 (Q4_1 blocks in every layer), g32: the search lowers every layer's
    output error below RTN's on the calibration data."""
    from mops_fast.quant.sequential import compress_sequential

    small, calib = smollm2_blocks(smollm2, n_blocks=2, n_samples=8)
    ratios = {}

    def fn(name, lin, stats):
        q, st = zero_search_quantize(lin.weight.detach(), stats.hessian, 4, 32)
        ratios[name] = st["loss"] / st["loss_nearest"]

    compress_sequential(small, calib, fn, "hessian", True, batch_size=8, log=None)
    assert len(ratios) == 14 and all(v < 1.0 for v in ratios.values()), ratios
    assert sum(ratios.values()) / len(ratios) < 0.8, ratios


def test_cli_flag_and_refusals(tmp_path):
    import argparse

    from mops_fast.quant.cli import add_compress_args, resolve_settings
    from mops_fast.quant.compress import prune_model

    s = resolve_settings(add_compress_args(argparse.ArgumentParser()).parse_args(
        ["--method", "rtn", "--asym", "--zero-search", "--out", str(tmp_path)]))
    assert s["zero_search"] is True
    with pytest.raises(ValueError, match="round-to-nearest option"):
        prune_model(tiny_model("llama"), torch.zeros(2, 8, dtype=torch.long), "sparsegpt",
                    then_gptq=QuantSettings(zero_search=True, sym=False))
