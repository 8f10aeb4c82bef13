"""Reading and writing GPTQ checkpoints in the standard layout, and saving pruned (dense) models.

On disk (the layout GPTQModel and AutoGPTQ use): per quantized linear `<name>.qweight` int32,
`<name>.qzeros` int32, `<name>.scales` fp16, `<name>.g_idx` int32 (and `<name>.bias`); every other tensor as
in a dense checkpoint; `config.json` with a `quantization_config` and a `quantize_config.json` beside it;
safetensors only (one file, or shards with model.safetensors.index.json). `checkpoint_format` `gptq` (v1)
stores zero points minus one, `gptq_v2` stores them as they are; in memory QuantLinear always holds true
zero points. Weights are never unpickled: safetensors, or torch.load(weights_only=True) for .bin files.
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from mops_fast.nn.quant_linear import QuantLinear
from mops_fast.quant.pack import (
    FORMATS,
    SUPPORTED_BITS,
    check_format,
    default_g_idx,
    num_groups,
    packed_rows,
    qzeros_from_format,
    qzeros_to_format,
)

QUANTIZER_TAG = "mops_fast:0.1.0"
QUANT_KEYS = ("qweight", "qzeros", "scales", "g_idx")
_IGNORED_UNEXPECTED = ("rotary_emb.inv_freq",)  # old checkpoints stored this derived buffer
_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float32": torch.float32, "fp32": torch.float32}


class CheckpointError(ValueError):
    """A GPTQ checkpoint that cannot be loaded as it is; the message names the problem and the fix."""


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


# ----------------------------------------------------------------------------------------------------
# quantization config
# ----------------------------------------------------------------------------------------------------
def make_quant_config(bits: int, group_size: int, sym: bool, desc_act: bool, fmt: str = "gptq",
                      damp_percent: float = 0.01, true_sequential: bool = True, static_groups: bool = False,
                      lm_head: bool = False, algorithm: str = "gptq", mse: bool = False) -> dict:
    fmt = check_format(fmt)
    meta = {"quantizer": [QUANTIZER_TAG], "uri": "https://github.com/mops-fast", "damp_percent": damp_percent,
            "true_sequential": true_sequential, "static_groups": static_groups, "algorithm": algorithm,
            "mse": 2.4 if mse else 0.0}  # the error norm of the range search, 0 = off (GPTQModel's meaning)
    return {
        "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym, "lm_head": lm_head,
        "quant_method": "gptq", "method": "gptq", "checkpoint_format": fmt, "format": fmt, "pack_dtype": "int32",
        "damp_percent": damp_percent, "true_sequential": true_sequential, "static_groups": static_groups,
        "meta": meta,
    }


def parse_quant_config(qcfg: dict, where: str = "quantization_config") -> dict:
    """Validate a GPTQ quantization config; return {bits, group_size, fmt, lm_head, desc_act, sym}."""
    if not isinstance(qcfg, dict):
        raise CheckpointError(f"{where} must be a JSON object, got {type(qcfg).__name__}")
    method = str(qcfg.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise CheckpointError(f"{where}: quant_method {method!r} is not GPTQ; mops_fast reads GPTQ checkpoints only")
    bits = qcfg.get("bits")
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{where}: bits={bits!r} is not supported; GPTQ checkpoints with bits in "
                              f"{SUPPORTED_BITS} load")
    gs = qcfg.get("group_size", -1)
    if isinstance(gs, bool) or not isinstance(gs, int) or (gs != -1 and gs < 1):
        raise CheckpointError(f"{where}: group_size={gs!r} is not supported; use -1 (one group per row) or a "
                              "positive integer")
    fmt = qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))
    if str(fmt).lower() not in FORMATS:
        raise CheckpointError(f"{where}: unknown checkpoint_format {fmt!r}; mops_fast reads {FORMATS} (convert "
                              "other kernels' formats, e.g. marlin or awq, back to gptq with their tool)")
    pack_dtype = str(qcfg.get("pack_dtype", "int32")).lower()
    if pack_dtype not in ("int32", "torch.int32"):
        raise CheckpointError(f"{where}: pack_dtype {pack_dtype!r} is not supported; only int32 packing loads")
    return {"bits": bits, "group_size": gs, "fmt": str(fmt).lower(), "lm_head": bool(qcfg.get("lm_head", False)),
            "desc_act": bool(qcfg.get("desc_act", False)), "sym": bool(qcfg.get("sym", True))}


# ----------------------------------------------------------------------------------------------------
# tensors on disk
# ----------------------------------------------------------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) {missing} named in model.safetensors.index.json are missing")
        return [path / s for s in shards]
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise CheckpointError(f"{path} holds no weights: expected model.safetensors (or shards with "
                          "model.safetensors.index.json)")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in _weight_files(path):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    out[k] = st.get_tensor(k)
        else:  # never unpickle arbitrary objects
            out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


# ----------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------
@contextmanager
def _params_on_meta():
    """Build modules with their parameters on the meta device (no memory, no random init cost) while
    buffers, such as rotary frequencies, are computed for real."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _load_config(path: Path):
    from transformers import AutoConfig

    with open(path / "config.json") as f:
        raw = json.load(f)
    qcfg = raw.get("quantization_config")
    qfile = path / "quantize_config.json"
    if qcfg is None and qfile.is_file():
        with open(qfile) as f:
            qcfg = json.load(f)
    if qcfg is None:
        raise CheckpointError(f"{path}: no quantization_config in config.json and no quantize_config.json; "
                              "this is not a GPTQ checkpoint (load it as a dense model)")
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build a plain model; the GPTQ layers are ours
    return config, qcfg


def load_gptq_model(path, dtype: torch.dtype | str = torch.float32, device: str | None = None):
    """Build the model of a GPTQ checkpoint directory with QuantLinear layers and load its tensors.

    Quantized layers: every nn.Linear inside the decoder blocks whose `<name>.qweight` is in the checkpoint
    (GPTQ tools quantize them all; a layer stored as `<name>.weight` stays dense), and lm_head when the
    config says lm_head: true. Non-quantized tensors are cast to `dtype`; scales keep their stored dtype."""
    from transformers import AutoModelForCausalLM

    from mops_fast.quant.sequential import find_blocks

    path = Path(path)
    dtype = as_dtype(dtype)
    config, raw_qcfg = _load_config(path)
    q = parse_quant_config(raw_qcfg)
    bits, gs = q["bits"], q["group_size"]
    tensors = read_tensors(path)

    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    # which linears are quantized
    prefix, blocks = find_blocks(model)
    targets = {}
    for bi, block in enumerate(blocks):
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                full = f"{prefix}.{bi}.{name}"
                if f"{full}.qweight" in tensors:
                    targets[full] = mod
                elif f"{full}.weight" not in tensors:
                    raise CheckpointError(f"{path}: layer {full} is missing: neither {full}.qweight (GPTQ) nor "
                                          f"{full}.weight (dense) is in the checkpoint; it is truncated or was "
                                          "written for another model")
    if not targets:
        raise CheckpointError(f"{path}: no quantized layer found (no '<layer>.qweight' tensor); the checkpoint "
                              "does not match its quantization_config")
    out_emb = model.get_output_embeddings()
    lm_name = next((n for n, m in model.named_modules() if m is out_emb), None)
    if q["lm_head"]:
        if lm_name is None or f"{lm_name}.qweight" not in tensors:
            raise CheckpointError(f"{path}: quantization_config says lm_head: true but {lm_name}.qweight is missing")
        targets[lm_name] = out_emb
        config.tie_word_embeddings = False  # a quantized head cannot share the embedding matrix

    for full, lin in targets.items():
        try:
            packed_rows(lin.in_features, bits)
            packed_rows(lin.out_features, bits)
        except ValueError as e:
            raise CheckpointError(f"{path}: layer {full} cannot hold {bits}-bit GPTQ weights: {e}") from None
        scales = tensors.get(f"{full}.scales")
        sdt = scales.dtype if scales is not None and scales.is_floating_point() else torch.float16
        ql = QuantLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, bits=bits, group_size=gs,
                         scales_dtype=sdt, bias_dtype=dtype)
        parent_name, _, child = full.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, ql)

    # expected tensors, minus the tied output embedding
    expected = model.state_dict(keep_vars=True)
    tied = bool(getattr(config, "tie_word_embeddings", False)) and lm_name is not None and not q["lm_head"]
    if tied:
        expected.pop(f"{lm_name}.weight", None)
    for full in targets:
        # older GPTQ writers: no g_idx without act-order, and all-zero biases on bias-free layers
        if f"{full}.g_idx" not in tensors and not q["desc_act"]:
            tensors[f"{full}.g_idx"] = default_g_idx(targets[full].in_features, gs)
        b = tensors.get(f"{full}.bias")
        if b is not None and f"{full}.bias" not in expected:
            if b.count_nonzero():
                raise CheckpointError(f"{path}: {full}.bias is non-zero but the model config has no bias for "
                                      "this layer (attention_bias / mlp_bias); the config does not match")
            del tensors[f"{full}.bias"]
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected and not k.endswith(_IGNORED_UNEXPECTED)
                  and not (tied and k == f"{lm_name}.weight")]
    if missing:
        raise CheckpointError(f"{path}: checkpoint misses {len(missing)} tensor(s), e.g. {missing[:5]}; it is "
                              "truncated or was written for another model configuration")
    if unexpected:
        raise CheckpointError(f"{path}: checkpoint has {len(unexpected)} tensor(s) the model does not, e.g. "
                              f"{unexpected[:5]}; its config.json does not describe these weights")

    state = {}
    for key, ref in expected.items():
        t = tensors[key]
        owner, _, leaf = key.rpartition(".")
        if owner in targets:
            t = _check_quant_tensor(path, owner, leaf, t, ref, targets[owner], bits, gs, q["fmt"])
        else:
            if tuple(t.shape) != tuple(ref.shape):
                raise CheckpointError(f"{path}: tensor {key} has shape {tuple(t.shape)}, the model expects "
                                      f"{tuple(ref.shape)}")
            if t.is_floating_point():
                t = t.to(dtype)
        state[key] = t
    for owner in targets:
        _check_group_index(path, owner, state[f"{owner}.g_idx"], state[f"{owner}.scales"].shape[0])
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{path}: tensors {left[:5]} were not loaded (model/checkpoint mismatch)")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m._invalidate()
    model.config.quantization_config = raw_qcfg
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _check_quant_tensor(path, owner, leaf, t, ref, lin, bits, gs, fmt):
    K, N = lin.in_features, lin.out_features
    G = num_groups(K, gs)
    want = {"qweight": (torch.int32, (packed_rows(K, bits), N)),
            "qzeros": (torch.int32, (G, packed_rows(N, bits))),
            "g_idx": (torch.int32, (K,))}
    if leaf in want:
        dt, shape = want[leaf]
        if leaf == "g_idx" and t.dtype in (torch.int64, torch.int16):
            t = t.to(torch.int32)
        if t.dtype != dt or tuple(t.shape) != shape:
            raise CheckpointError(f"{path}: {owner}.{leaf} is {t.dtype} {tuple(t.shape)}, expected {dt} {shape} "
                                  f"for a {bits}-bit layer {K} -> {N} with group_size {gs}; the checkpoint does "
                                  "not match its quantization_config")
        if leaf == "qzeros":
            t = qzeros_from_format(t, bits, fmt)
        return t
    if leaf == "scales":
        if not t.is_floating_point() or tuple(t.shape) != (G, N):
            raise CheckpointError(f"{path}: {owner}.scales is {t.dtype} {tuple(t.shape)}, expected float ({G}, {N}) "
                                  f"for group_size {gs}")
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: {owner}.scales holds {bad} non-finite value(s) (inf/NaN); the "
                                  "checkpoint is corrupt or overflowed fp16 when it was written; requantize it")
        return t
    if leaf == "bias":
        if tuple(t.shape) != (N,):
            raise CheckpointError(f"{path}: {owner}.bias has shape {tuple(t.shape)}, expected ({N},)")
        return t.to(ref.dtype)
    raise CheckpointError(f"{path}: unexpected tensor {owner}.{leaf} in a quantized layer")


def _check_group_index(path, owner, g_idx, G):
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
        raise CheckpointError(f"{path}: {owner}.g_idx has groups in [{int(g_idx.min())}, {int(g_idx.max())}] but "
                              f"scales has {G} group(s)")


# ----------------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------------
def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += n
    if cur:
        shards.append(cur)
    return shards


def _write_tensors(out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, sh in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sh})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _tied_output_key(model) -> str | None:
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None or in_emb is None or getattr(out_emb, "weight", None) is not in_emb.weight:
        return None
    return next(f"{n}.weight" for n, m in model.named_modules() if m is out_emb)


def _prepare_out(out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()  # never leave shards of an earlier save beside the new ones
    return out


def _save_side_files(model, out: Path, tokenizer, source_dir) -> None:
    if getattr(model, "generation_config", None) is not None:
        try:
            model.generation_config.save_pretrained(str(out))
        except (ValueError, TypeError, OSError):
            pass  # a generation config that does not validate is not worth failing a compression run for
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    elif source_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                     "chat_template.jinja", "vocab.json", "merges.txt"):
            src = Path(source_dir) / name
            if src.is_file():
                shutil.copy2(src, out / name)


def save_quantized(model, out_dir, quant_config: dict, tokenizer=None, source_dir=None,
                   dtype: torch.dtype | str = torch.float16, max_shard_bytes: int = 4 << 30) -> Path:
    """Write a model holding QuantLinear layers as a standard GPTQ checkpoint.

    quant_config: from make_quant_config; its checkpoint_format decides how zero points are stored.
    Non-quantized float tensors are written in `dtype`; scales as fp16; the tied lm_head is not written."""
    dtype = as_dtype(dtype)
    parse_quant_config(quant_config)
    fmt = check_format(quant_config["checkpoint_format"])
    out = _prepare_out(out_dir)
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not qlayers:
        raise ValueError("save_quantized: the model has no QuantLinear layer; quantize it first")
    bad_bits = {m.bits for m in qlayers.values()} - {quant_config["bits"]}
    if bad_bits:
        raise ValueError(f"save_quantized: layers hold {sorted(bad_bits)}-bit weights but the config says "
                         f"bits={quant_config['bits']}")
    skip = _tied_output_key(model)
    tensors = {}
    for key, t in model.state_dict().items():
        if key == skip:
            continue
        owner, _, leaf = key.rpartition(".")
        if owner in qlayers:
            m = qlayers[owner]
            if leaf == "qzeros":
                t = qzeros_to_format(t, m.bits, fmt)
            elif leaf == "scales":
                t = t.to(torch.float16)
            elif leaf == "bias":
                t = t.to(torch.float16)
        elif t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.detach().cpu().contiguous().clone()
    _write_tensors(out, tensors, max_shard_bytes)

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["quantization_config"] = quant_config
    cfg["dtype"] = str(dtype).replace("torch.", "")
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    with open(out / "quantize_config.json", "w") as f:
        json.dump(quant_config, f, indent=2)
    _save_side_files(model, out, tokenizer, source_dir)
    return out


def save_dense(model, out_dir, tokenizer=None, source_dir=None, dtype: torch.dtype | str | None = None,
               compression: dict | None = None) -> Path:
    """Write a dense (e.g. pruned) model as an ordinary Hugging Face safetensors checkpoint that
    load_model / from_pretrained read. `compression` is recorded in config.json under `mops_fast_compression`."""
    out = _prepare_out(out_dir)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("save_dense: the model holds QuantLinear layers; use save_quantized")
    if dtype is not None:
        model = model.to(as_dtype(dtype))
    if compression is not None:
        model.config.mops_fast_compression = compression
    model.save_pretrained(str(out), safe_serialization=True)
    _save_side_files(model, out, tokenizer, source_dir)
    return out


def checkpoint_summary(path) -> dict:
    """Keys, dtypes and shapes of a checkpoint's tensors (for layout comparisons and debugging)."""
    return {k: (str(t.dtype).replace("torch.", ""), tuple(t.shape)) for k, t in read_tensors(Path(path)).items()}


__all__ = ["load_gptq_model", "save_quantized", "save_dense", "make_quant_config", "parse_quant_config",
           "read_tensors", "checkpoint_summary", "CheckpointError"]
