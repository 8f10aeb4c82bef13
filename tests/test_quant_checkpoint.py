"""GPTQ checkpoints: the GPTQModel fixture loads and reproduces its logits; ours reload identically in both
zero conventions and match the fixture's layout; bad checkpoints fail with errors that name the problem."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mops_fast.quant.checkpoint import (
    CheckpointError,
    load_gptq_model,
    make_quant_config,
    read_tensors,
    save_dense,
    save_quantized,
)
from mops_fast.quant.compress import QuantSettings, quantize_model, replace_with_quant_linear
from mops_fast.quant.pack import qzeros_to_format

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "gptqmodel-smollm2-135m-4bit-g128-sym"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/fixtures is not present")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def quantized_tiny(method="gptq", settings=None, seed=0, **kw):
    model = tiny_llama(seed, **kw)
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(seed))
    q = quantize_model(model, calib, method, settings or QuantSettings(bits=4, group_size=32), log=None)
    return replace_with_quant_linear(model, q)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------- fixture
@pytest.mark.integration
@needs_fixture
def test_gptqmodel_fixture_reproduces_reference_logits():
    import mops_fast
    from mops_fast.nn.quant_linear import QuantLinear

    model, tok = mops_fast.load_model(str(FIXTURE))
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(q) == 30 * 7 and all(m.bits == 4 and m.group_size == 128 for m in q)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the config says
    ref = load_file(str(FIXTURE / "reference_logits.safetensors"))
    with torch.no_grad():
        out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
    keep = ref["attention_mask"].bool()
    a, b = out[keep].float(), ref["logits"][keep].float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() == 1.0
    assert float((a - b).norm() / b.norm()) < 0.08  # GPTQModel's logits are bf16


@pytest.mark.integration
@needs_fixture
def test_fixture_read_with_the_wrong_zero_convention_is_visibly_wrong(tmp_path):
    # the same tensors declared gptq_v2 (zeros as stored, no +1): the logits move far away
    for f in FIXTURE.iterdir():
        if f.name != "config.json":
            (tmp_path / f.name).symlink_to(f)
    cfg = json.loads((FIXTURE / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = cfg["quantization_config"]["format"] = "gptq_v2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_gptq_model(tmp_path)
    ref = load_file(str(FIXTURE / "reference_logits.safetensors"))
    with torch.no_grad():
        out = model(input_ids=ref["input_ids"][:1]).logits[0]
    b = ref["logits"][0].float()
    assert float((out - b).norm() / b.norm()) > 0.2


@pytest.mark.integration
@needs_fixture
def test_our_checkpoint_layout_matches_gptqmodel(tmp_path):
    import mops_fast

    model, tok = mops_fast.load_model("smollm2-135m")
    q = quantize_model(model, None, "rtn", QuantSettings(bits=4, group_size=128, sym=True), log=None)
    replace_with_quant_linear(model, q)
    qcfg = make_quant_config(4, 128, True, False, "gptq")
    save_quantized(model, tmp_path, qcfg, tokenizer=tok)

    ours = load_file(str(tmp_path / "model.safetensors"))
    theirs = load_file(str(FIXTURE / "model.safetensors"))
    assert set(ours) == set(theirs)
    for k, t in theirs.items():
        assert ours[k].shape == t.shape, k
        if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
            assert ours[k].dtype == t.dtype, k
    # symmetric 4-bit v1: every stored zero field is 7, as in the fixture
    assert torch.equal(ours["model.layers.3.mlp.up_proj.qzeros"], theirs["model.layers.3.mlp.up_proj.qzeros"])
    cfg_ours = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    cfg_theirs = json.loads((FIXTURE / "config.json").read_text())["quantization_config"]
    shared = ["bits", "group_size", "desc_act", "sym", "lm_head", "quant_method", "checkpoint_format", "format",
              "pack_dtype"]
    assert {k: cfg_ours[k] for k in shared} == {k: cfg_theirs[k] for k in shared}
    assert {"damp_percent", "true_sequential"} <= set(cfg_ours)
    assert json.loads((tmp_path / "quantize_config.json").read_text()) == cfg_ours
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()

    back, _ = mops_fast.load_model(str(tmp_path))
    ids = torch.tensor([[1, 504, 3458, 28, 253, 1250, 30]])
    # saved non-quantized tensors are fp16: compare with the model rounded the same way
    for p in model.parameters():
        p.data = p.data.half().float()
    assert torch.equal(logits(back, ids), logits(model, ids))


# ------------------------------------------------------------------------------------------- roundtrips
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("settings", [QuantSettings(4, 32, True, False), QuantSettings(4, 32, False, True),
                                      QuantSettings(8, -1, False, False), QuantSettings(2, 32, False, True)],
                         ids=["4b-sym", "4b-asym-act", "8b-asym-g-1", "2b-asym-act"])
def test_checkpoint_roundtrip_is_exact(tmp_path, fmt, settings):
    model = quantized_tiny(settings=settings)
    qcfg = make_quant_config(settings.bits, settings.group_size, settings.sym, settings.desc_act, fmt)
    save_quantized(model, tmp_path, qcfg, dtype=torch.float32)
    back = load_gptq_model(tmp_path)
    assert torch.equal(logits(back, IDS), logits(model, IDS))
    disk = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj"
    mem = model.get_submodule(name).qzeros
    assert torch.equal(disk[f"{name}.qzeros"], qzeros_to_format(mem, settings.bits, fmt))
    assert "lm_head.weight" not in disk  # tied to the embedding


def test_asym_zero_point_zero_survives_the_v1_format(tmp_path):
    # all-positive weights give zero point 0 on an asymmetric grid: v1 stores it as a borrow
    model = tiny_llama(seed=3)
    with torch.no_grad():
        for p in model.model.layers[0].mlp.parameters():
            p.abs_()
    q = quantize_model(model, None, "rtn", QuantSettings(4, 32, sym=False), log=None)
    assert (q["model.layers.0.mlp.up_proj"].zeros == 0).any()
    replace_with_quant_linear(model, q)
    save_quantized(model, tmp_path, make_quant_config(4, 32, False, False, "gptq"), dtype=torch.float32)
    assert torch.equal(logits(load_gptq_model(tmp_path), IDS), logits(model, IDS))


def test_sharded_checkpoint_and_untied_head(tmp_path):
    model = quantized_tiny(tie_word_embeddings=False)
    save_quantized(model, tmp_path, make_quant_config(4, 32, True, False), dtype=torch.float32, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" in index["weight_map"]
    assert torch.equal(logits(load_gptq_model(tmp_path), IDS), logits(model, IDS))


def test_load_model_entry_point_reads_our_checkpoint(tmp_path):
    import mops_fast

    tok_dir = Path.home() / ".cache" / "mops_fast" / "smollm2-135m-instruct"
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.skip("the converted SmolLM2 cache (tokenizer files) is not present")
    model = quantized_tiny()
    save_quantized(model, tmp_path, make_quant_config(4, 32, True, False), source_dir=tok_dir, dtype=torch.float32)
    back, tok = mops_fast.load_model(str(tmp_path))
    assert tok.pad_token is not None
    assert torch.equal(logits(back, IDS), logits(model, IDS))


def test_pruned_model_saves_as_an_ordinary_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from mops_fast.quant.compress import prune_model

    model = tiny_llama()
    prune_model(model, None, "magnitude", 0.5, log=None)
    save_dense(model, tmp_path, dtype=torch.float32, compression={"method": "magnitude", "sparsity": 0.5})
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    w = back.model.layers[0].mlp.down_proj.weight
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.01
    assert torch.equal(logits(back, IDS), logits(model, IDS))
    assert json.loads((tmp_path / "config.json").read_text())["mops_fast_compression"]["method"] == "magnitude"


# ------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    save_quantized(quantized_tiny(), path, make_quant_config(4, 32, True, False), dtype=torch.float32)
    return path


def _variant(src: Path, dst: Path, tensors=None, qcfg_update=None):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dst / f.name)
    t = read_tensors(src)
    if tensors is not None:
        tensors(t)
    save_file(t, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    if qcfg_update:
        cfg["quantization_config"].update(qcfg_update)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


L0 = "model.layers.0.self_attn.q_proj"


def _set(key, value):
    def f(t):
        if value is None:
            del t[key]
        else:
            t[key] = value(t[key]) if callable(value) else value
    return f


BAD = {
    "missing": (dict(tensors=_set(f"{L0}.scales", None)), "misses 1 tensor"),
    "misshapen": (dict(tensors=_set(f"{L0}.qweight", lambda x: x[:-1].contiguous())), "qweight is torch.int32"),
    "wrong dtype": (dict(tensors=_set(f"{L0}.qzeros", lambda x: x.to(torch.int64))), "qzeros is torch.int64"),
    "non-finite": (dict(tensors=_set(f"{L0}.scales", lambda x: x.index_fill(1, torch.tensor([3]), float("inf")))),
                   "non-finite"),
    "g_idx range": (dict(tensors=_set(f"{L0}.g_idx", lambda x: x + 5)), "g_idx has groups"),
    "layer gone": (dict(tensors=lambda t: [t.pop(k) for k in list(t) if k.startswith(f"{L0}.")]),
                   "neither .*qweight"),
    "unexpected": (dict(tensors=_set("model.layers.0.extra", torch.zeros(2))), "the model does not"),
    "bits": (dict(qcfg_update={"bits": 5}), "bits=5 is not supported"),
    "group size": (dict(qcfg_update={"group_size": 0}), "group_size=0 is not supported"),
    "group size mismatch": (dict(qcfg_update={"group_size": 16}), r"expected torch.int32 \(4, 8\)"),
    "format": (dict(qcfg_update={"checkpoint_format": "marlin", "format": "marlin"}), "unknown checkpoint_format"),
    "method": (dict(qcfg_update={"quant_method": "awq"}), "not GPTQ"),
}


def test_older_writers_without_g_idx_and_with_zero_biases(good_checkpoint, tmp_path):
    def older(t):
        for k in [k for k in t if k.endswith(".g_idx")]:
            del t[k]
        t[f"{L0}.bias"] = torch.zeros(64, dtype=torch.float16)
    back = load_gptq_model(_variant(good_checkpoint, tmp_path / "a", tensors=older))
    assert torch.equal(logits(back, IDS), logits(load_gptq_model(good_checkpoint), IDS))
    with pytest.raises(CheckpointError, match="bias is non-zero"):
        load_gptq_model(_variant(good_checkpoint, tmp_path / "b", tensors=_set(f"{L0}.bias", torch.ones(64))))
    act = _variant(good_checkpoint, tmp_path / "c", tensors=_set(f"{L0}.g_idx", None), qcfg_update={"desc_act": True})
    with pytest.raises(CheckpointError, match="misses 1 tensor"):
        load_gptq_model(act)  # act-order needs its g_idx


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_fail_clearly(good_checkpoint, tmp_path, case):
    kw, pattern = BAD[case]
    path = _variant(good_checkpoint, tmp_path, **kw)
    with pytest.raises(CheckpointError, match=pattern):
        load_gptq_model(path)


def test_no_weights_file(tmp_path, good_checkpoint):
    shutil.copy(good_checkpoint / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_gptq_model(tmp_path)
