"""Pruning: exact sparsity and N:M patterns for magnitude / Wanda / SparseGPT, SparseGPT's lower output
error, whole-model pruning, and pruning then GPTQ keeping the zeros through the checkpoint."""
import pytest
import torch

from mops_fast.quant.prune import magnitude_prune, parse_nm, sparsegpt_prune, wanda_prune
from test_quant_gptq import correlated_problem


pytestmark = pytest.mark.usefixtures("one_thread")


def problem(N=48, K=128, n=1024, seed=0):
    return correlated_problem(N, K, n, seed, stats=True)


def out_err(W, P, X):
    return float(((W - P) @ X.t()).norm() ** 2)


def assert_nm(mask, n, m):
    groups = mask.reshape(mask.shape[0], -1, m)
    assert (groups.sum(-1) == m - n).all()


def test_magnitude_layerwise_and_nm():
    W, _, _ = problem()
    P, mask = magnitude_prune(W, 0.5)
    assert int(mask.sum()) == W.numel() // 2 and (P[mask] == 0).all() and torch.equal(P[~mask], W[~mask])
    assert W.abs()[mask].max() <= W.abs()[~mask].min()
    P, mask = magnitude_prune(W, nm="2:4")
    assert_nm(mask, 2, 4)
    P, mask = magnitude_prune(W, nm=(1, 4))
    assert_nm(mask, 1, 4)


def test_wanda_per_row_and_activation_aware():
    W, X, st = problem(seed=1)
    P, mask = wanda_prune(W, st.sq_norm, 0.5)
    assert (mask.sum(1) == W.shape[1] // 2).all()  # the same count in every output row
    loud = int(torch.argmax(st.sq_norm))
    assert mask[:, loud].float().mean() < 0.2  # the most active input keeps most of its weights
    _, mask = wanda_prune(W, st.sq_norm, nm="2:4")
    assert_nm(mask, 2, 4)
    assert out_err(W, P, X) < out_err(W, magnitude_prune(W, 0.5)[0], X)


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_sparsegpt_sparsity_and_lower_error(nm):
    W, X, st = problem(seed=2)
    P, mask = sparsegpt_prune(W, st.hessian, 0.5, nm, block_size=32)
    assert (P[mask] == 0).all() and not (P[~mask] == 0).any()
    if nm is None:
        assert int(mask.sum()) == W.numel() // 2
    else:
        assert_nm(mask, 2, 4)
    wanda = wanda_prune(W, st.sq_norm, 0.5, nm)[0]
    assert out_err(W, P, X) < 0.9 * out_err(W, wanda, X)  # the OBS update compensates what it removes


def test_bad_sparsity_arguments():
    W, _, st = problem(K=126)
    with pytest.raises(ValueError, match="0 < N < M"):
        parse_nm("4:2")
    with pytest.raises(ValueError, match="form N:M"):
        parse_nm("half")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        magnitude_prune(W, 1.5)
    with pytest.raises(ValueError, match="multiple of 4"):
        wanda_prune(W, st.sq_norm, nm="2:4")


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("method,nm", [("magnitude", None), ("wanda", None), ("sparsegpt", "2:4")])
def test_prune_model_every_block_linear(method, nm):
    from mops_fast.quant.compress import prune_model, sparsity_report

    model = tiny_llama()
    emb = model.model.embed_tokens.weight.clone()
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    masks, quants = prune_model(model, calib, method, 0.5, nm, log=None)
    assert len(masks) == 14 and quants == {}
    rep = sparsity_report(model)
    assert abs(rep["overall"] - 0.5) < 1e-3 and len(rep["layers"]) == 14
    assert torch.equal(model.model.embed_tokens.weight, emb)  # only the decoder blocks' linears
    if nm:
        assert_nm(model.model.layers[1].mlp.down_proj.weight == 0, 2, 4)


def test_prune_then_gptq_keeps_zeros_in_the_checkpoint(tmp_path):
    from mops_fast.quant.checkpoint import load_gptq_model, make_quant_config, save_quantized
    from mops_fast.quant.compress import QuantSettings, prune_model, replace_with_quant_linear

    model = tiny_llama()
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    masks, quants = prune_model(model, calib, "sparsegpt", 0.5, None, then_gptq=QuantSettings(4, 32, True), log=None)
    assert set(quants) == set(masks)
    replace_with_quant_linear(model, quants)
    save_quantized(model, tmp_path, make_quant_config(4, 32, True, False), dtype=torch.float32)
    back = load_gptq_model(tmp_path)
    for name, mask in masks.items():
        W = back.get_submodule(name).dequantize_weight()
        assert (W[mask] == 0).all(), name
        assert (W[~mask] != 0).float().mean() > 0.9  # the kept weights mostly stay non-zero
