"""`mops-fast compress`: option / config precedence, validation, and end-to-end runs on a tiny model
directory whose output load_model reads back."""
import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from mops_fast.quant.cli import add_compress_args, compress_with_settings, resolve_settings, run_compress

TOK_DIR = Path.home() / ".cache" / "mops_fast" / "smollm2-135m-instruct"


pytestmark = pytest.mark.usefixtures("one_thread")


def parse(*argv):
    return add_compress_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_defaults_config_file_and_options(tmp_path):
    s = resolve_settings(parse("--out", "x"))
    assert (s["method"], s["bits"], s["group_size"], s["sym"], s["desc_act"]) == ("gptq", 4, 128, True, False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: rtn\nbits: 3\ngroup-size: 64\nsym: false\nout: from_yaml\n")
    s = resolve_settings(parse("--config", str(cfg), "--bits", "8"))
    assert (s["method"], s["bits"], s["group_size"], s["sym"], s["out"]) == ("rtn", 8, 64, False, "from_yaml")
    s = resolve_settings(parse("--config", str(cfg), "--sym", "--out", "y"))
    assert s["sym"] is True and s["out"] == "y"
    cfg.write_text("compress:\n  method: sparsegpt\n  nm: '2:4'\n  out: o\n")
    s = resolve_settings(parse("--config", str(cfg)))
    assert s["sparsity"] == 0.5 and s["nm"] == "2:4"


@pytest.mark.parametrize("argv,pattern", [
    (("--method", "gptq", "--sparsity", "0.5", "--out", "o"), "apply to pruning methods"),
    (("--method", "wanda", "--nm", "2:4", "--sparsity", "0.3", "--out", "o"), "contradicts"),
    (("--method", "rtn",), "needs --out"),
])
def test_invalid_combinations(argv, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve_settings(parse(*argv))


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: gptq\nbitz: 4\n")
    with pytest.raises(ValueError, match="unknown key 'bitz'"):
        resolve_settings(parse("--config", str(cfg)))


def test_argparse_rejects_unknown_method():
    with pytest.raises(SystemExit):
        parse("--method", "awq")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama model directory with the SmolLM2 tokenizer and a small calibration file."""
    if not (TOK_DIR / "tokenizer.json").is_file():
        pytest.skip("the converted SmolLM2 cache (tokenizer files) is not present")
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True))
    model.save_pretrained(d / "model")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (TOK_DIR / f).is_file():
            shutil.copy(TOK_DIR / f, d / "model" / f)
    recs = [{"instruction": f"Say {i} things about cats.", "context": "Cats are small." * (i % 3),
             "response": "They purr. " * (i + 2), "category": "open_qa"} for i in range(40)]
    (d / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def _run(tiny_dir, tmp_path, *argv):
    out = tmp_path / "out"
    args = parse("--model", str(tiny_dir / "model"), "--calib-data", str(tiny_dir / "calib.jsonl"),
                 "--calib-samples", "8", "--calib-seqlen", "32", "--out", str(out), *argv)
    assert run_compress(args) == 0
    return out


def test_gptq_end_to_end(tiny_dir, tmp_path):
    import mops_fast
    from mops_fast.nn.quant_linear import QuantLinear

    out = _run(tiny_dir, tmp_path, "--method", "gptq", "--bits", "4", "--group-size", "32", "--asym", "--desc-act",
               "--format", "gptq_v2")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["checkpoint_format"]) == (4, 32, False, True,
                                                                                               "gptq_v2")
    model, tok = mops_fast.load_model(str(out))
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert json.loads((out / "compression.json").read_text())["settings"]["method"] == "gptq"


def test_sparsegpt_2_4_then_gptq_end_to_end(tiny_dir, tmp_path):
    import mops_fast

    out = _run(tiny_dir, tmp_path, "--method", "sparsegpt", "--nm", "2:4", "--then-gptq", "--group-size", "64")
    model, _ = mops_fast.load_model(str(out))
    W = model.model.layers[0].mlp.up_proj.dequantize_weight()
    assert ((W == 0).reshape(W.shape[0], -1, 4).sum(-1) >= 2).all()  # 2:4 kept through quantization
    assert json.loads((out / "config.json").read_text())["quantization_config"]["meta"]["algorithm"] == "sparsegpt+gptq"


def test_wanda_writes_a_dense_checkpoint(tiny_dir, tmp_path):
    import mops_fast

    out = _run(tiny_dir, tmp_path, "--method", "wanda", "--sparsity", "0.5", "--dtype", "float32")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, _ = mops_fast.load_model(str(out))
    w = model.model.layers[1].self_attn.q_proj.weight
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.02
    assert json.loads((out / "compression.json").read_text())["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_compressing_a_quantized_model_is_refused(tiny_dir, tmp_path):
    out = _run(tiny_dir, tmp_path, "--method", "rtn")
    s = resolve_settings(parse("--model", str(out), "--method", "rtn", "--out", str(tmp_path / "again")))
    with pytest.raises(ValueError, match="already quantized"):
        compress_with_settings(s)


def test_rtn_zero_search_end_to_end(tiny_dir, tmp_path):
    """--zero-search calibrates (RTN alone does not) and writes an ordinary asymmetric GPTQ checkpoint."""
    import mops_fast

    out = _run(tiny_dir, tmp_path, "--method", "rtn", "--asym", "--zero-search", "--group-size", "32")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["sym"], qc["group_size"], qc["meta"]["algorithm"]) == (False, 32, "rtn+zero_search")
    model, tok = mops_fast.load_model(str(out))
    with torch.no_grad():
        assert torch.isfinite(model(tok("Hi", return_tensors="pt")["input_ids"]).logits).all()


def test_compress_with_scale_refinement(tiny_dir, tmp_path):
    """--refine-steps distills the source model into the scales and records it; the checkpoint loads."""
    import mops_fast

    out = _run(tiny_dir, tmp_path, "--method", "rtn", "--asym", "--group-size", "32", "--refine-steps", "3",
               "--refine-samples", "6", "--refine-batch", "2")
    info = json.loads((out / "compression.json").read_text())
    assert info["refine"]["steps"] == 3 and info["refine"]["windows"] == 5 and info["refine"]["heldout_windows"] == 1
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["meta"]["algorithm"] == "rtn+scale_distill"
    model, tok = mops_fast.load_model(str(out))
    with torch.no_grad():
        assert torch.isfinite(model(tok("Hi", return_tensors="pt")["input_ids"]).logits).all()


def parse_refine(*argv):
    from mops_fast.quant.cli import add_refine_args

    return add_refine_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_refine_command_on_an_existing_checkpoint(tiny_dir, tmp_path):
    from mops_fast.quant.checkpoint import read_tensors
    from mops_fast.quant.cli import run_refine

    src = _run(tiny_dir, tmp_path, "--method", "gptq", "--asym", "--group-size", "32")
    out = tmp_path / "refined"
    assert run_refine(parse_refine("--model", str(src), "--out", str(out), "--steps", "4", "--samples", "6",
                                   "--batch", "2", "--lr", "0.01", "--calib-data", str(tiny_dir / "calib.jsonl"),
                                   "--calib-seqlen", "32")) == 0
    a, b = read_tensors(src), read_tensors(out)
    assert set(a) == set(b)
    key = "model.layers.0.mlp.down_proj"
    assert torch.equal(a[f"{key}.qweight"], b[f"{key}.qweight"]) and torch.equal(a[f"{key}.qzeros"], b[f"{key}.qzeros"])
    assert not torch.equal(a[f"{key}.scales"], b[f"{key}.scales"])
    info = json.loads((out / "compression.json").read_text())
    assert info["refined_from"] == str(src) and info["refine"]["steps"] == 4
    assert info["settings"]["method"] == "gptq"  # what made the input is kept
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["meta"]["algorithm"] == "gptq+scale_distill" and qc["group_size"] == 32 and qc["sym"] is False


def test_refine_refusals(tiny_dir, tmp_path):
    from mops_fast.quant.cli import run_refine

    calib = ("--calib-data", str(tiny_dir / "calib.jsonl"), "--calib-seqlen", "32", "--samples", "4")
    with pytest.raises(ValueError, match="is not quantized"):
        run_refine(parse_refine("--model", str(tiny_dir / "model"), "--out", str(tmp_path / "o"), *calib))
    src = _run(tiny_dir, tmp_path, "--method", "rtn")
    with pytest.raises(ValueError, match="new directory"):
        run_refine(parse_refine("--model", str(src), "--out", str(src), *calib))
    with pytest.raises(ValueError, match="steps >= 1"):
        run_refine(parse_refine("--model", str(src), "--out", str(tmp_path / "o"), "--steps", "0", *calib))
    (src / "compression.json").unlink()
    with pytest.raises(ValueError, match="pass --dense"):
        run_refine(parse_refine("--model", str(src), "--out", str(tmp_path / "o"), *calib))
    with pytest.raises(ValueError, match="with gptq, rtn or --then-gptq"):
        resolve_settings(parse("--method", "wanda", "--refine-steps", "5", "--out", "o"))
    with pytest.raises(ValueError, match="lr must be in"):
        resolve_settings(parse("--method", "gptq", "--refine-steps", "5", "--refine-lr", "2", "--out", "o"))
